//! Plugin call overhead: compile, cached load, and instantiate+call latency of a real plugin,
//! through EIR (fresh store per call, fuel, epoch deadline, limiter, grants) and, as the
//! baseline in the same run, through bare wasmtime on a default engine with a plain WASI
//! context. Reports medians and the EIR/baseline ratio.
//!
//! Run: `scripts/bench.sh call` (needs the guests from `scripts/build.sh`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use eir::Runtime;
use eir::engine::{Engine, EngineConfig};
use eir::plugin::PluginConfig;
use eir::plugin::bindings::PipelinePre;
use eir::tensor::{Request, Tensor, TensorData};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

struct Bare {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Bare {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn guest(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} is missing: run scripts/build.sh first", path.display());
    path
}

fn request() -> Request {
    Request {
        id: String::new(),
        inputs: vec![Tensor {
            name: "text".into(),
            shape: vec![1],
            data: TensorData::Bytes(vec!["  The Quick   Brown Fox ﬁnds Ａ café  ".as_bytes().to_vec()]),
        }],
        outputs: vec![],
        parameters: vec![],
    }
}

fn main() -> anyhow::Result<()> {
    let iterations: usize = std::env::var("BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let path = guest("text_normalize");
    let bytes = std::fs::read(&path)?;
    println!("component: {} ({} KiB)", path.display(), bytes.len() / 1024);

    // Compile (no cache) and cached load.
    let engine = Engine::new(EngineConfig { cache_dir: None, ..EngineConfig::default() })?;
    let compile = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let _ = engine.load_bytes("c", &bytes, false);
                t.elapsed()
            })
            .collect(),
    );
    let cache = tempfile::tempdir()?;
    let cached = Engine::new(EngineConfig { cache_dir: Some(cache.path().into()), ..EngineConfig::default() })?;
    cached.load_bytes("c", &bytes, false)?;
    let load = median(
        (0..50)
            .map(|_| {
                let t = Instant::now();
                let _ = cached.load_bytes("c", &bytes, false);
                t.elapsed()
            })
            .collect(),
    );
    println!("compile (Cranelift, no cache): {compile:.1?}   cached load (hash + mmap): {load:.2?}");

    let req = request();
    for pooling in [true, false] {
        let runtime = Runtime::new(EngineConfig { cache_dir: None, pooling, ..EngineConfig::default() })?;
        let plugin = runtime.load_plugin("bench", &path, PluginConfig::default(), false)?;
        let eir_samples: Vec<Duration> = rt.block_on(async {
            let mut samples = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let t = Instant::now();
                let response = plugin.handle(&req).await.expect("call");
                std::hint::black_box(response);
                samples.push(t.elapsed());
            }
            samples
        });

        // Baseline: bare wasmtime, same allocator choice, no fuel/epoch/limiter.
        let mut config = wasmtime::Config::new();
        if pooling {
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::pooling());
        }
        let bare_engine = wasmtime::Engine::new(&config)?;
        let component = Component::from_binary(&bare_engine, &bytes)?;
        let mut linker: Linker<Bare> = Linker::new(&bare_engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        let pre = PipelinePre::new(linker.instantiate_pre(&component)?)?;
        let bare_samples: Vec<Duration> = rt.block_on(async {
            let mut samples = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let t = Instant::now();
                let mut store = wasmtime::Store::new(
                    &bare_engine,
                    Bare { wasi: WasiCtxBuilder::new().build(), table: ResourceTable::new() },
                );
                let instance = pre.instantiate_async(&mut store).await.expect("instantiate");
                let response = instance
                    .eir_plugin_handler()
                    .call_handle(&mut store, &req)
                    .await
                    .expect("call")
                    .expect("plugin answers");
                std::hint::black_box(response);
                samples.push(t.elapsed());
            }
            samples
        });
        let (e, b) = (median(eir_samples), median(bare_samples));
        println!(
            "instantiate+call, {} allocator, median of {iterations}: EIR {e:.1?}  bare wasmtime {b:.1?}  ratio {:.2}x",
            if pooling { "pooling" } else { "on-demand" },
            e.as_secs_f64() / b.as_secs_f64()
        );
    }
    Ok(())
}
