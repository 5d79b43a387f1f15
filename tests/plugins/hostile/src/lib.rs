//! A plugin that misbehaves in the way its `attack` parameter names, so the tests can check
//! that each misbehaviour is stopped with the right error kind and the host carries on.
//! With no attack it echoes its inputs back.

use std::hint::black_box;
use std::io::Write;

use eir_guest::{Error, Plugin, Request, Response, Result, Tensor, TensorData};

struct Hostile;

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return 0;
    }
    recurse(depth + 1).wrapping_add(black_box(1))
}

/// Tries to reach things outside its grants and reports what happened to each attempt.
fn escape_attempts() -> Vec<String> {
    let reads = ["/etc/passwd", "/data/../../etc/passwd", "../etc/passwd", "/data/secret.txt"];
    let mut out: Vec<String> = reads
        .iter()
        .map(|p| match std::fs::read(p) {
            Ok(bytes) => format!("read {p}: {} bytes", bytes.len()),
            Err(e) => format!("read {p}: denied ({e})"),
        })
        .collect();
    let write = std::fs::File::create("/data/written.txt").and_then(|mut f| f.write_all(b"x"));
    out.push(match write {
        Ok(()) => "write /data/written.txt: ok".to_string(),
        Err(e) => format!("write /data/written.txt: denied ({e})"),
    });
    out
}

impl Plugin for Hostile {
    fn handle(request: Request) -> Result<Response> {
        match request.param("attack").unwrap_or("none") {
            "none" => Ok(Response { outputs: request.inputs, parameters: vec![] }),
            "loop" => {
                let mut x = 0u64;
                loop {
                    x = black_box(x.wrapping_add(1));
                }
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(Response::new())
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            "recursion" => Ok(Response::new().with_param("depth", recurse(0).to_string())),
            "panic" => panic!("hostile plugin panics on purpose"),
            "trap" => {
                #[cfg(target_arch = "wasm32")]
                core::arch::wasm32::unreachable();
                #[cfg(not(target_arch = "wasm32"))]
                unreachable!()
            }
            "exit" => std::process::exit(3),
            "big-output" => {
                let mib: usize = request.param_or("mib", 32)?;
                Ok(Response::new().with(Tensor::new("blob", [(mib << 20) as u64], vec![7u8; mib << 20])?))
            }
            "bad-output" => Ok(Response::new().with(Tensor {
                name: "wrong".into(),
                shape: vec![3, 3],
                data: TensorData::Fp32(vec![1.0; 4]),
            })),
            "escape" => Ok(Response::new().with(Tensor::strings("attempts", escape_attempts()))),
            "network" => {
                let addr = request.param("addr").unwrap_or("127.0.0.1:9");
                let result = match std::net::TcpStream::connect(addr) {
                    Ok(_) => format!("connected to {addr}"),
                    Err(e) => format!("denied ({e})"),
                };
                Ok(Response::new().with(Tensor::strings("network", [result])))
            }
            "env" => {
                let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
                Ok(Response::new().with(Tensor::strings("env", vars)))
            }
            "busy" => {
                // Computes for `ms` milliseconds, then answers normally.
                let ms: u64 = request.param_or("ms", 500)?;
                let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
                let mut x = 0u64;
                while std::time::Instant::now() < until {
                    x = black_box(x.wrapping_add(1));
                }
                Ok(Response::new().with_param("spins", x.to_string()))
            }
            "count" => {
                // Instance state: shows whether calls share an instance.
                static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                Ok(Response::new().with_param("calls", n.to_string()))
            }
            "nn-name" => {
                let model = request.param("model").unwrap_or("minilm");
                Ok(Response::new().with(Tensor::strings("nn", [nn_probe::load_by_name(model)])))
            }
            "nn-bytes" => Ok(Response::new().with(Tensor::strings("nn", [nn_probe::load_bytes()]))),
            "nn-onnx" => {
                let file = request.param("file").unwrap_or("model.onnx");
                let x: f32 = request.param_or("x", 1e15)?;
                Ok(Response::new().with(Tensor::strings("nn", [nn_probe::onnx(&format!("/data/{file}"), x)])))
            }
            "nn-bad-input" => Ok(Response::new().with(Tensor::strings("nn", [nn_probe::bad_input()]))),
            "nn-gpu" => Ok(Response::new().with(Tensor::strings("nn", [nn_probe::gpu()]))),
            "nn-busy" => Ok(Response::new().with(Tensor::strings("nn", [nn_probe::busy()]))),
            "nn-hoard" => {
                nn_probe::hoard();
                Ok(Response::new())
            }
            "log" => {
                println!("line on stdout");
                eprintln!("line on stderr");
                eir_guest::log(eir_guest::LogLevel::Warn, "structured record");
                Ok(Response::new())
            }
            other => Err(Error::invalid_input(format!("unknown attack `{other}`"))),
        }
    }
}

eir_guest::export_plugin!(Hostile);

/// Raw wasi-nn calls, reporting the exact error code the host answers with.
mod nn_probe {
    use eir_guest::bindings::wasi::nn::{errors, graph, tensor};

    fn describe(e: errors::Error) -> String {
        format!("{:?}: {}", e.code(), e.data())
    }

    fn ids(values: &[i64]) -> tensor::Tensor {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensor::Tensor::new(&[1, values.len() as u32], tensor::TensorType::I64, &bytes)
    }

    fn run(g: &graph::Graph, values: &[i64]) -> String {
        let ctx = match g.init_execution_context() {
            Ok(ctx) => ctx,
            Err(e) => return describe(e),
        };
        match ctx.compute(vec![("input_ids".to_string(), ids(values))]) {
            Ok(outputs) => outputs.iter().map(|(n, t)| format!("{n}: {:?} {:?}", t.ty(), t.dimensions())).collect(),
            Err(e) => describe(e),
        }
    }

    pub fn load_by_name(model: &str) -> String {
        match graph::load_by_name(model) {
            Ok(g) => format!("ok: {}", run(&g, &[101, 7592, 2088, 102])),
            Err(e) => describe(e),
        }
    }

    pub fn load_bytes() -> String {
        let (Ok(config), Ok(weights)) =
            (std::fs::read("/models/minilm/config.json"), std::fs::read("/models/minilm/model.safetensors"))
        else {
            return "cannot read /models/minilm".into();
        };
        match graph::load(&[config, weights], graph::GraphEncoding::Autodetect, graph::ExecutionTarget::Cpu) {
            Ok(g) => format!("ok: {}", run(&g, &[101, 102])),
            Err(e) => describe(e),
        }
    }

    /// Loads an ONNX file from bytes and computes it on `x` = [value]: "load: ..." or
    /// "compute: ..." with the host's answer.
    pub fn onnx(path: &str, value: f32) -> String {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => return format!("cannot read {path}: {e}"),
        };
        let g = match graph::load(&[bytes], graph::GraphEncoding::Onnx, graph::ExecutionTarget::Cpu) {
            Ok(g) => g,
            Err(e) => return format!("load: {}", describe(e)),
        };
        let ctx = match g.init_execution_context() {
            Ok(ctx) => ctx,
            Err(e) => return format!("load: {}", describe(e)),
        };
        let x = tensor::Tensor::new(&[1], tensor::TensorType::Fp32, &value.to_le_bytes());
        match ctx.compute(vec![("x".to_string(), x)]) {
            Ok(outputs) => {
                format!("ok: {}", outputs.iter().map(|(n, t)| format!("{n} {:?}", t.dimensions())).collect::<String>())
            }
            Err(e) => format!("compute: {}", describe(e)),
        }
    }

    pub fn bad_input() -> String {
        match graph::load_by_name("minilm") {
            Ok(g) => run(&g, &[101, 999_999, 102]),
            Err(e) => describe(e),
        }
    }

    pub fn gpu() -> String {
        match graph::load(&[b"{}".to_vec()], graph::GraphEncoding::Autodetect, graph::ExecutionTarget::Gpu) {
            Ok(_) => "ok".into(),
            Err(e) => describe(e),
        }
    }

    /// Computes on ever longer inputs until the host says stop (the deadline).
    pub fn busy() -> String {
        let g = match graph::load_by_name("minilm") {
            Ok(g) => g,
            Err(e) => return describe(e),
        };
        let long: Vec<i64> = std::iter::once(101).chain(std::iter::repeat_n(2088, 510)).chain([102]).collect();
        loop {
            let answer = run(&g, &long);
            if !answer.starts_with("last_hidden_state") {
                return answer;
            }
        }
    }

    /// Keeps tensors alive in the host until it refuses.
    pub fn hoard() {
        let chunk = vec![0u8; 1 << 20];
        let mut kept = Vec::new();
        loop {
            kept.push(tensor::Tensor::new(&[1 << 18], tensor::TensorType::Fp32, &chunk));
        }
    }
}
