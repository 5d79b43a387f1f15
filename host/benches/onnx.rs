//! EIR's ONNX backend against ONNX Runtime, in one run: EfficientNet-Lite0 at batch 1 and 8,
//! and Silero VAD per 32 ms chunk (state carried). Both sides use the same inputs and the same
//! number of threads; the ONNX Runtime side runs `ort_bench.py` with `$EIR_BENCH_PYTHON`
//! (a Python with onnxruntime and numpy). Reports medians and EIR / ONNX Runtime.
//!
//! Run: `EIR_BENCH_PYTHON=/path/to/python scripts/bench.sh onnx` (needs `eir models fetch`).

// The allocator the `eir` binary uses, so passes are measured as served.
eir::global_allocator!();

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eir::nn::Model;
use eir::nn::backend::{self, Source, Target};
use eir::nn::bindings::tensor::TensorType;
use eir::nn::tensor::HostTensor;

fn pattern(n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|i| (scale * 2.0 * (0.001 * i as f64).sin()) as f32).collect()
}

fn tensor(dims: Vec<u32>, values: &[f32]) -> HostTensor {
    HostTensor::new(dims, TensorType::Fp32, values.iter().flat_map(|v| v.to_le_bytes()).collect()).expect("tensor")
}

/// The median of `iters` runs of `f`, timed on a worker of the compute pool, where the
/// scheduler runs passes (`rayon::spawn`): a pass's parallel sections then share out with the
/// pool's other threads, as ONNX Runtime's caller joins its own pool, rather than waking the
/// pool from outside and sleeping until it is done. Each run keeps the other threads awake as
/// the scheduler does for a pass running alone (`EIR_BENCH_SPIN=0`: not).
/// Passes before timing: at least what the ONNX backend's tuner takes.
const WARMUP: usize = 30;

fn median_time(iters: usize, mut f: impl FnMut() + Send) -> Duration {
    let awake = eir::scheduler::Awake::new(std::env::var("EIR_BENCH_SPIN").map_or(true, |v| v != "0"));
    rayon::scope(|_| {
        // The first passes of a shape time each way its fused blocks can split (the ONNX
        // backend's tuner, three runs of each of at most nine): those are warm-up.
        for _ in 0..WARMUP {
            f();
        }
        let mut v: Vec<Duration> = (0..iters)
            .map(|_| {
                let t = Instant::now();
                awake.run(&mut f);
                t.elapsed()
            })
            .collect();
        v.sort();
        v[v.len() / 2]
    })
}

fn main() -> anyhow::Result<()> {
    // As the `eir` binary does: candle's element-wise kernels in the one compute pool.
    // SAFETY: the first statement of `main`: no other thread is started yet.
    unsafe { eir::scheduler::one_compute_pool() };
    // `EIR_ONNX_PROFILE=1` logs each pass's time by operator (the executor logs through tracing).
    if std::env::var_os("EIR_ONNX_PROFILE").is_some() {
        // RUST_LOG=eir::nn::backends::onnx::ops::tune=debug adds which split each block chose.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let iters: usize = std::env::var("BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let threads = rayon::current_num_threads();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let models = std::env::var_os("EIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("models"));
    let eff: Arc<dyn Model> =
        backend::load(Source::Path(&eir::registry::fetch::locate("efficientnet-lite0", &models)?), Target::Cpu)?;
    let vad: Arc<dyn Model> =
        backend::load(Source::Path(&eir::registry::fetch::locate("silero-vad", &models)?), Target::Cpu)?;

    let mut eir = Vec::new();
    // `EIR_BENCH_BATCH=1` (or 8) times one batch size of EfficientNet only, for a profiler:
    // no Silero and no ONNX Runtime side, whose samples would mix with it.
    let only: Option<u32> = std::env::var("EIR_BENCH_BATCH").ok().and_then(|v| v.parse().ok());
    for batch in [1u32, 8].into_iter().filter(|b| only.is_none_or(|o| o == *b)) {
        let x = tensor(vec![batch, 3, 224, 224], &pattern(batch as usize * 3 * 224 * 224, 1.0));
        let t = median_time(iters, || {
            std::hint::black_box(eff.compute(vec![("input".into(), x.clone())]).expect("compute"));
        });
        eir.push((format!("efficientnet_b{batch}"), t));
    }
    if only.is_some() {
        for (name, t) in eir {
            println!("{name:>16}: EIR {:>9.3} ms", t.as_secs_f64() * 1e3);
        }
        return Ok(());
    }
    let chunks = pattern(100 * 576, 0.1);
    let sr = HostTensor::new(vec![], TensorType::I64, 16000i64.to_le_bytes().to_vec())?;
    let t = median_time((iters / 4).max(3), || {
        let mut state = tensor(vec![2, 1, 128], &[0.0; 256]);
        for c in chunks.chunks(576) {
            let out = vad
                .compute(vec![
                    ("input".into(), tensor(vec![1, 576], c)),
                    ("state".into(), state.clone()),
                    ("sr".into(), sr.clone()),
                ])
                .expect("compute");
            state = out[1].1.clone();
        }
    });
    eir.push(("silero_chunk".into(), t / 100));

    let python = std::env::var("EIR_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/ort_bench.py");
    let out =
        Command::new(&python).arg(&script).arg(&models).arg(iters.to_string()).arg(threads.to_string()).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ONNX Runtime side failed (set EIR_BENCH_PYTHON to a Python with onnxruntime): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ort: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    println!("threads: {threads}; ONNX Runtime {}; medians of {iters}", ort["version"].as_str().unwrap_or("?"));
    for (name, t) in eir {
        let o = ort[&name].as_f64().unwrap_or(f64::NAN);
        println!(
            "{name:>16}: EIR {:>9.3} ms | ONNX Runtime {:>9.3} ms | EIR / ORT = {:.2}x",
            t.as_secs_f64() * 1e3,
            o * 1e3,
            t.as_secs_f64() / o
        );
    }
    Ok(())
}
