//! EIR's ONNX backend against ONNX Runtime, in one run: EfficientNet-Lite0 at batch 1 and 8,
//! and Silero VAD per 32 ms chunk (state carried). Both sides use the same inputs and the same
//! number of threads; the ONNX Runtime side runs `ort_bench.py` with `$EIR_BENCH_PYTHON`
//! (a Python with onnxruntime and numpy). The two sides take turns (`BENCH_ROUNDS`); each row
//! reports medians and the median of the rounds' EIR / ONNX Runtime, with every round's.
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
/// Passes before timing: at least what the ONNX backend's tuner takes (nine candidates timed
/// eight times each, `ops::tune`).
const WARMUP: usize = 80;

fn median_time(iters: usize, mut f: impl FnMut() + Send) -> Duration {
    median_time_of(iters, || (), |()| f())
}

/// [`median_time`] of `f` on what `prepare` makes, made before each run and not timed: the
/// copy of an input that `compute` takes by value, as ONNX Runtime's side hands `run` an array
/// it made once (a 600 KB copy each pass was 1% of a batch-1 pass, and no cost of EIR's).
fn median_time_of<T: Send>(
    iters: usize,
    mut prepare: impl FnMut() -> T + Send,
    mut f: impl FnMut(T) + Send,
) -> Duration {
    let awake = eir::scheduler::Awake::new(std::env::var("EIR_BENCH_SPIN").map_or(true, |v| v != "0"));
    rayon::scope(|_| {
        // The first passes of a shape time each way its fused blocks can split (the ONNX
        // backend's tuner, eight runs of each of at most nine): those are warm-up, run as the
        // timed passes are, so the tuner times each split as it will run (with the pool
        // awake, a split with more parallel sections pays no wake-ups).
        for _ in 0..WARMUP {
            let input = prepare();
            awake.run(|| f(input));
        }
        let mut v: Vec<Duration> = (0..iters)
            .map(|_| {
                let input = prepare();
                let t = Instant::now();
                awake.run(|| f(input));
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
    // 300 passes a row, in 15 rounds of 20 (below): ONNX Runtime's first few passes in each
    // round's process run slow, so rounds need more than a handful.
    let iters: usize = std::env::var("BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let threads = rayon::current_num_threads();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let models = std::env::var_os("EIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("models"));
    let eff: Arc<dyn Model> =
        backend::load(Source::Path(&eir::registry::fetch::locate("efficientnet-lite0", &models)?), Target::Cpu)?;
    let vad: Arc<dyn Model> =
        backend::load(Source::Path(&eir::registry::fetch::locate("silero-vad", &models)?), Target::Cpu)?;

    // `EIR_BENCH_BATCH=1` (or 8) times one batch size of EfficientNet only, for a profiler:
    // no Silero and no ONNX Runtime side, whose samples would mix with it. `EIR_BENCH_BATCH=0`
    // times Silero only.
    let only: Option<u32> = std::env::var("EIR_BENCH_BATCH").ok().and_then(|v| v.parse().ok());
    let eir_rows = |iters: usize| -> Vec<(String, Duration)> {
        let mut eir = Vec::new();
        for batch in [1u32, 8].into_iter().filter(|b| only.is_none_or(|o| o == *b)) {
            let x = tensor(vec![batch, 3, 224, 224], &pattern(batch as usize * 3 * 224 * 224, 1.0));
            let t = median_time_of(
                iters,
                || vec![("input".into(), x.clone())],
                |input| {
                    std::hint::black_box(eff.compute(input).expect("compute"));
                },
            );
            eir.push((format!("efficientnet_b{batch}"), t));
        }
        if only.is_some_and(|o| o != 0) {
            return eir;
        }
        let chunks = pattern(100 * 576, 0.1);
        let sr = HostTensor::new(vec![], TensorType::I64, 16000i64.to_le_bytes().to_vec()).expect("sr");
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
        eir
    };
    if only.is_some() {
        for (name, t) in eir_rows(iters) {
            println!("{name:>16}: EIR {:>9.3} ms", t.as_secs_f64() * 1e3);
        }
        return Ok(());
    }

    let python = std::env::var("EIR_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/ort_bench.py");
    let ort_rows = |iters: usize| -> anyhow::Result<serde_json::Value> {
        let out =
            Command::new(&python).arg(&script).arg(&models).arg(iters.to_string()).arg(threads.to_string()).output()?;
        anyhow::ensure!(
            out.status.success(),
            "ONNX Runtime side failed (set EIR_BENCH_PYTHON to a Python with onnxruntime): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    // The two sides take turns (`BENCH_ROUNDS`, default 15, each of BENCH_ITERS / rounds
    // passes per row): on a shared 2-vCPU host the machine's speed drifts by 10-30% within
    // minutes, and one side measured after the other took that drift into the ratio. Each
    // round's ratio compares passes a few seconds apart; the median of the rounds is reported.
    // (With 3 rounds one run's EfficientNet batch-1 rounds were 0.79, 1.24 and 1.05: a speed
    // change within a round decided the median. With 15, a run's rounds mostly lie within
    // ±0.03 of their median.)
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(15).max(1);
    let per_round = (iters / rounds).max(3);
    let mut measured: Vec<(Vec<(String, Duration)>, serde_json::Value)> = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let eir = eir_rows(per_round);
        measured.push((eir, ort_rows(per_round)?));
    }
    let version = measured.first().and_then(|(_, o)| o["version"].as_str()).unwrap_or("?").to_string();
    println!("threads: {threads}; ONNX Runtime {version}; {rounds} alternating rounds of {per_round} passes per row");
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (row, (name, _)) in measured[0].0.iter().enumerate() {
        let eir: Vec<f64> = measured.iter().map(|(e, _)| e[row].1.as_secs_f64()).collect();
        let ort: Vec<f64> = measured.iter().map(|(_, o)| o[name].as_f64().unwrap_or(f64::NAN)).collect();
        let ratios: Vec<f64> = eir.iter().zip(&ort).map(|(e, o)| e / o).collect();
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "{name:>16}: EIR {:>9.3} ms | ONNX Runtime {:>9.3} ms | EIR / ORT = {:.2}x (rounds: {})",
            median(eir) * 1e3,
            median(ort) * 1e3,
            median(ratios),
            each.join(" ")
        );
    }
    Ok(())
}
