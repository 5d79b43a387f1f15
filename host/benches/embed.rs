//! The embedding pipeline through a plugin against native candle on the same token ids, in
//! one run: batch 1 and batch 32. Native = candle BertModel forward + mean pooling + L2
//! normalisation in Rust on the host; plugin = `text-embed` (tokenise and pool in WASM,
//! forward through wasi-nn on the same backend). Reports medians and the plugin/native ratio.
//!
//! First, EIR's BERT forward pass against ONNX Runtime on the same weights (MiniLM as ONNX,
//! built by `scripts/make_minilm_onnx.py`) and token ids, same threads, per shape.
//!
//! Run: `EIR_BENCH_PYTHON=<python with onnxruntime, onnx, numpy> scripts/bench.sh embed` (needs
//! the guests and `eir models fetch minilm`).

// The allocator the `eir` binary uses, so passes are measured as served.
eir::global_allocator!();

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor as CTensor};
use eir::Runtime;
use eir::engine::EngineConfig;
use eir::grants::Grants;
use eir::nn::NnGrants;
use eir::nn::backends::bert::Bert;
use eir::plugin::{Plugin, PluginConfig};
use eir::registry::{ModelDecl, Registry};
use eir::scheduler::Scheduler;
use eir::tensor::{Request, Tensor, TensorData};

const SENTENCES: [&str; 8] = [
    "A man is eating food.",
    "The girl is carrying a baby.",
    "Edge servers run inference plugins under strict limits.",
    "What is the capital of France?",
    "Crème brûlée is a dessert, naïve as it sounds.",
    "The price rose 3.75% to $1,234.56 on Tuesday morning.",
    "WebAssembly components call models through wasi-nn.",
    "Short one.",
];

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn texts(n: usize) -> Vec<String> {
    (0..n).map(|i| SENTENCES[i % SENTENCES.len()].to_string()).collect()
}

fn request(texts: &[String], params: &[(&str, &str)]) -> Request {
    Request {
        id: String::new(),
        inputs: vec![Tensor {
            name: "text".into(),
            shape: vec![texts.len() as u64],
            data: TensorData::Bytes(texts.iter().map(|t| t.as_bytes().to_vec()).collect()),
        }],
        outputs: vec![],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

fn native(bert: &Bert, ids: &[i64], mask: &[i64], n: usize, seq: usize) -> Vec<f32> {
    let dev = Device::Cpu;
    let t = |v: &[i64]| CTensor::from_slice(v, (n, seq), &dev).expect("tensor");
    let types = vec![0i64; n * seq];
    let hidden = bert.forward(&t(ids), &t(&types), &t(mask)).expect("forward");
    let mask_f = t(mask).to_dtype(candle_core::DType::F32).expect("mask").unsqueeze(2).expect("unsqueeze");
    let summed = hidden.broadcast_mul(&mask_f).and_then(|h| h.sum(1)).expect("sum");
    let counts = mask_f.sum(1).expect("count");
    let mean = summed.broadcast_div(&counts).expect("mean");
    let norm = mean.sqr().and_then(|m| m.sum_keepdim(1)).and_then(|s| s.sqrt()).expect("norm");
    mean.broadcast_div(&norm).and_then(|m| m.flatten_all()).and_then(|m| m.to_vec1()).expect("vec")
}

fn main() -> anyhow::Result<()> {
    // As the `eir` binary does: candle's element-wise kernels in the one compute pool.
    // SAFETY: the first statement of `main`: no other thread is started yet.
    unsafe { eir::scheduler::one_compute_pool() };
    // `EIR_BERT_PROFILE=1` logs each pass's time by stage, `EIR_ONNX_PROFILE=1` the ONNX
    // graph's by operator (through tracing).
    if std::env::var_os("EIR_BERT_PROFILE").is_some() || std::env::var_os("EIR_ONNX_PROFILE").is_some() {
        tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    }
    let iters: usize = std::env::var("BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let models = std::env::var_os("EIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("models"));
    let dir = eir::registry::fetch::locate("minilm", &models)?;
    let wasm = root.join("plugins/dist/text_embed.wasm");
    anyhow::ensure!(wasm.exists(), "{} is missing: run scripts/build.sh", wasm.display());

    let registry = Arc::new(Registry::new(
        [(
            "minilm".to_string(),
            ModelDecl {
                path: dir.clone(),
                family: None,
                target: Default::default(),
                batch: Default::default(),
                llm: None,
            },
        )],
        Scheduler::for_this_machine(),
    ));
    let cache = tempfile::tempdir()?;
    let rt =
        Runtime::with_registry(EngineConfig { cache_dir: Some(cache.path().into()), ..Default::default() }, registry)?;
    let grants = Grants { nn: NnGrants { models: vec!["minilm".into()], ..Default::default() }, ..Default::default() };
    // Warm instances (the parsed tokenizer survives between calls), as a server runs it; and
    // a fresh instance per call, the strictest isolation.
    let plugin: Plugin = rt.load_plugin(
        "text-embed",
        &wasm,
        PluginConfig { grants: grants.clone(), reuse: 10_000, ..Default::default() },
        false,
    )?;
    let fresh: Plugin = rt.load_plugin("text-embed", &wasm, PluginConfig { grants, ..Default::default() }, false)?;
    let config = std::fs::read_to_string(dir.join("config.json"))?;
    let bert = Bert::from_dir(&dir, &config, &Device::Cpu, &eir::nn::Meter::with_budget(u64::MAX))?;
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;

    versus_onnx_runtime(&bert, &dir, iters)?;

    println!("threads: {}  iterations: {iters}", std::thread::available_parallelism()?);
    for batch in [1usize, 32] {
        let sentences = texts(batch);
        // The plugin's own token ids feed the native path, so both encode the same thing.
        let tokens = tokio.block_on(plugin.handle(&request(&sentences, &[("return_tokens", "true")])))?;
        let ids_t = tokens.outputs.iter().find(|t| t.name == "token_ids").expect("token ids");
        let TensorData::Int64(ids) = &ids_t.data else { anyhow::bail!("ids") };
        let (n, seq) = (ids_t.shape[0] as usize, ids_t.shape[1] as usize);
        let mask: Vec<i64> = ids.iter().map(|&i| i64::from(i != 0)).collect();
        let req = request(&sentences, &[]);

        let (mut nat, mut warm, mut cold) = (Vec::new(), Vec::new(), Vec::new());
        // Interleave so drift on a noisy machine hits all three alike.
        for _ in 0..iters {
            let t = Instant::now();
            std::hint::black_box(native(&bert, ids, &mask, n, seq));
            nat.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(tokio.block_on(plugin.handle(&req))?);
            warm.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(tokio.block_on(fresh.handle(&req))?);
            cold.push(t.elapsed());
        }
        let (a, b, c) = (median(nat), median(warm), median(cold));
        let ratio = |x: Duration| x.as_secs_f64() / a.as_secs_f64();
        println!(
            "batch {batch:>2} (seq {seq:>3}): native {a:>9.2?} | plugin, warm instance {b:>9.2?} = {:.3}x | \
             plugin, fresh instance {c:>9.2?} = {:.3}x | {:.0} / {:.0} / {:.0} sentences/s",
            ratio(b),
            ratio(c),
            batch as f64 / a.as_secs_f64(),
            batch as f64 / b.as_secs_f64(),
            batch as f64 / c.as_secs_f64()
        );
    }
    Ok(())
}

/// The shapes (batch × tokens) EIR's BERT is compared with ONNX Runtime on.
const ORT_SHAPES: [(usize, usize); 4] = [(1, 8), (1, 128), (32, 20), (8, 128)];

/// `[CLS] t t ... [SEP]` per row, t = 1000 + (7919 k) mod 20000 over the flattened position k
/// (the same ids as `ort_bert.py`).
fn synthetic_ids(batch: usize, seq: usize) -> Vec<i64> {
    (0..batch * seq)
        .map(|k| match k % seq {
            0 => 101,
            j if j == seq - 1 => 102,
            _ => 1000 + (7919 * k as i64) % 20000,
        })
        .collect()
}

/// EIR's BERT forward pass against ONNX Runtime's on MiniLM, per shape: medians and the ratio.
fn versus_onnx_runtime(bert: &Bert, dir: &std::path::Path, iters: usize) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism()?.get();
    let python = std::env::var("EIR_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/ort_bert.py");
    // `EIR_BENCH_SHAPES="1x8,4x8,16x8"` compares other shapes (batch x tokens) instead.
    let picked: Vec<(usize, usize)> = match std::env::var("EIR_BENCH_SHAPES") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                let (b, t) = s.trim().split_once('x').unwrap_or(("", ""));
                Ok((b.parse()?, t.parse()?))
            })
            .collect::<Result<_, std::num::ParseIntError>>()
            .map_err(|e| anyhow::anyhow!("EIR_BENCH_SHAPES={list:?}: want BATCHxTOKENS,...: {e}"))?,
        Err(_) => ORT_SHAPES.to_vec(),
    };
    let shapes: Vec<String> = picked.iter().map(|(b, s)| format!("{b}x{s}")).collect();
    let graph_dir = tempfile::tempdir()?;
    let graph = graph_dir.path().join("minilm.onnx");
    let out = std::process::Command::new(&python)
        .env("EIR_BERT_ONNX", &graph)
        .arg(&script)
        .arg(dir)
        .arg(iters.to_string())
        .arg(threads.to_string())
        .args(&shapes)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "ONNX Runtime side failed (set EIR_BENCH_PYTHON to a Python with onnxruntime, onnx and numpy): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ort: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    println!("EIR BERT vs ONNX Runtime {} (forward pass, {threads} threads, medians of {iters}):", ort["version"]);
    println!("  (and EIR's ONNX backend on the graph ONNX Runtime ran: the generic path for transformer graphs)");
    let graph = eir::nn::backend::load(eir::nn::backend::Source::Path(&graph), eir::nn::backend::Target::Cpu)?;
    let dev = Device::Cpu;
    for ((batch, seq), name) in picked.iter().zip(&shapes) {
        let ids = CTensor::from_vec(synthetic_ids(*batch, *seq), (*batch, *seq), &dev)?;
        let mask = CTensor::ones((*batch, *seq), candle_core::DType::I64, &dev)?;
        let types = CTensor::zeros((*batch, *seq), candle_core::DType::I64, &dev)?;
        // Timed on a worker of the compute pool, where the scheduler runs passes
        // (`rayon::spawn`): the pass's parallel sections share out with the pool's other
        // thread, as ONNX Runtime's caller joins its own pool, rather than waking the pool from
        // outside and sleeping until it is done.
        // Each pass keeps the other threads awake as the scheduler does for a pass running
        // alone (`EIR_BENCH_SPIN=0`: not).
        let awake = eir::scheduler::Awake::new(std::env::var("EIR_BENCH_SPIN").map_or(true, |v| v != "0"));
        let times = rayon::scope(|_| -> anyhow::Result<Vec<Duration>> {
            bert.forward(&ids, &types, &mask)?;
            let mut times = Vec::with_capacity(iters);
            for _ in 0..iters {
                let t = Instant::now();
                std::hint::black_box(awake.run(|| bert.forward(&ids, &types, &mask))?);
                times.push(t.elapsed());
            }
            Ok(times)
        })?;
        let eir = median(times).as_secs_f64();
        // The same ids through EIR's ONNX backend.
        let ints = |v: Vec<i64>| {
            eir::nn::tensor::HostTensor::new(
                vec![*batch as u32, *seq as u32],
                eir::nn::bindings::tensor::TensorType::I64,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        };
        let feed = || -> anyhow::Result<Vec<(String, eir::nn::tensor::HostTensor)>> {
            Ok(vec![
                ("input_ids".into(), ints(synthetic_ids(*batch, *seq))?),
                ("attention_mask".into(), ints(vec![1; batch * seq])?),
                ("token_type_ids".into(), ints(vec![0; batch * seq])?),
            ])
        };
        let onnx_times = rayon::scope(|_| -> anyhow::Result<Vec<Duration>> {
            graph.compute(feed()?)?;
            let mut times = Vec::with_capacity(iters);
            for _ in 0..iters {
                let inputs = feed()?;
                let t = Instant::now();
                std::hint::black_box(awake.run(|| graph.compute(inputs))?);
                times.push(t.elapsed());
            }
            Ok(times)
        })?;
        let eir_onnx = median(onnx_times).as_secs_f64();
        let o = ort[name].as_f64().unwrap_or(f64::NAN);
        println!(
            "  MiniLM {batch:>2} x {seq:>3}: EIR {:>8.2} ms | ONNX Runtime {:>8.2} ms | EIR / ORT = {:.2}x | \
             EIR's ONNX backend {:>8.2} ms = {:.2}x",
            eir * 1e3,
            o * 1e3,
            eir / o,
            eir_onnx * 1e3,
            eir_onnx / o
        );
    }
    println!();
    Ok(())
}
