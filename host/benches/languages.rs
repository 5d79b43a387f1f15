//! Plugins in Python, JavaScript and C against the Rust plugin doing the same job, in one run:
//! component size, Cranelift compile (no cache), cached load, instantiate (a fresh instance's
//! `describe`), and per-call time with a warm instance (`reuse`). Pairs:
//! py-embed / text-embed (one sentence), js-rank / text-embed (a query and four documents),
//! c-vad / vad (the 8.7 s speech fixture). Reports medians and the ratio to the Rust plugin.
//!
//! Run: `scripts/bench.sh languages` (needs the guests and `eir models fetch`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eir::Runtime;
use eir::engine::{Engine, EngineConfig};
use eir::grants::Grants;
use eir::nn::NnGrants;
use eir::plugin::{Plugin, PluginConfig};
use eir::registry::{ModelDecl, Registry};
use eir::scheduler::Scheduler;
use eir::tensor::{Request, Tensor, TensorData};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(n: usize, mut f: impl FnMut() -> T) -> Duration {
    median(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed()
            })
            .collect(),
    )
}

fn bytes(name: &str, items: &[&[u8]]) -> Tensor {
    Tensor {
        name: name.into(),
        shape: vec![items.len() as u64],
        data: TensorData::Bytes(items.iter().map(|b| b.to_vec()).collect()),
    }
}

fn request(inputs: Vec<Tensor>) -> Request {
    Request { id: String::new(), inputs, outputs: vec![], parameters: vec![] }
}

/// What is measured of one plugin.
struct Figures {
    size: usize,
    compile: Duration,
    cached_load: Duration,
    instantiate: Duration,
    call: Duration,
}

struct Bench {
    root: PathBuf,
    runtime: Runtime,
    tokio: tokio::runtime::Runtime,
    calls: usize,
}

impl Bench {
    fn figures(&self, name: &str, model: &str, req: &Request) -> anyhow::Result<Figures> {
        let path = self.root.join("plugins/dist").join(format!("{}.wasm", name.replace('-', "_")));
        anyhow::ensure!(path.exists(), "{} is missing: run scripts/build.sh first", path.display());
        let wasm = std::fs::read(&path)?;
        // Compile: the big components take seconds, so fewer samples.
        let engine = Engine::new(EngineConfig { cache_dir: None, ..EngineConfig::default() })?;
        let compile = time(if wasm.len() > 4 << 20 { 1 } else { 3 }, || engine.load_bytes(name, &wasm, false));
        let cache = tempfile::tempdir()?;
        let cached = Engine::new(EngineConfig { cache_dir: Some(cache.path().into()), ..EngineConfig::default() })?;
        cached.load_bytes(name, &wasm, false)?;
        let cached_load = time(10, || cached.load_bytes(name, &wasm, false).expect("cached load"));

        let grants = Grants { nn: NnGrants { models: vec![model.into()], ..Default::default() }, ..Default::default() };
        let load = |reuse| -> anyhow::Result<Plugin> {
            let config = PluginConfig { grants: grants.clone(), reuse, ..Default::default() };
            Ok(self.runtime.load_plugin(name, &path, config, false)?)
        };
        let fresh = load(1)?;
        let instantiate = self.tokio.block_on(async {
            let mut samples = Vec::new();
            for _ in 0..20 {
                let t = Instant::now();
                fresh.metadata().await.expect("describe");
                samples.push(t.elapsed());
            }
            median(samples)
        });
        let warm = load(u32::MAX)?;
        let call = self.tokio.block_on(async {
            warm.handle(req).await.expect("warm-up call");
            let mut samples = Vec::new();
            for _ in 0..self.calls {
                let t = Instant::now();
                std::hint::black_box(warm.handle(req).await.expect("call"));
                samples.push(t.elapsed());
            }
            median(samples)
        });
        Ok(Figures { size: wasm.len(), compile, cached_load, instantiate, call })
    }
}

fn row(language: &str, name: &str, f: &Figures, base: &Figures) {
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "| {language} | {name} | {:.1} MiB | {:.2?} ({:.1}x) | {:.2?} ({:.1}x) | {:.2?} ({:.1}x) | {:.2?} ({:.2}x) |",
        f.size as f64 / (1 << 20) as f64,
        f.compile,
        ratio(f.compile, base.compile),
        f.cached_load,
        ratio(f.cached_load, base.cached_load),
        f.instantiate,
        ratio(f.instantiate, base.instantiate),
        f.call,
        ratio(f.call, base.call),
    );
}

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let models = std::env::var_os("EIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("models"));
    let decl = |name: &str, family: Option<&str>| -> anyhow::Result<(String, ModelDecl)> {
        let path = eir::registry::fetch::locate(name, &models)?;
        Ok((
            name.to_string(),
            ModelDecl {
                path,
                family: family.map(Into::into),
                target: Default::default(),
                batch: Default::default(),
                llm: None,
            },
        ))
    };
    let registry =
        Registry::new([decl("minilm", Some("bert"))?, decl("silero-vad", None)?], Scheduler::for_this_machine());
    let bench = Bench {
        runtime: Runtime::with_registry(EngineConfig { cache_dir: None, ..Default::default() }, Arc::new(registry))?,
        tokio: tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?,
        calls: std::env::var("BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(30),
        root: root.clone(),
    };

    let sentence = request(vec![bytes("text", &[b"A man is eating food."])]);
    let docs: [&[u8]; 4] = [
        b"A man is eating a piece of bread.",
        b"The girl is carrying a baby.",
        b"A monkey is playing drums.",
        b"Edge servers run inference plugins.",
    ];
    let all: Vec<&[u8]> = std::iter::once(&b"A man is eating food."[..]).chain(docs).collect();
    let ranking = request(vec![bytes("query", &[b"A man is eating food."]), bytes("documents", &docs)]);
    let five = request(vec![bytes("text", &all)]);
    let speech = std::fs::read(root.join("tests/fixtures/speech.wav"))?;
    let audio = request(vec![bytes("audio", &[&speech])]);

    println!("| language | plugin | size | compile, no cache | cached load | instantiate | call, warm |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let rust_embed = bench.figures("text-embed", "minilm", &sentence)?;
    row("Rust", "text-embed, 1 sentence", &rust_embed, &rust_embed);
    row("Python", "py-embed, 1 sentence", &bench.figures("py-embed", "minilm", &sentence)?, &rust_embed);
    let rust_five = bench.figures("text-embed", "minilm", &five)?;
    row("Rust", "text-embed, 5 sentences", &rust_five, &rust_five);
    row("JavaScript", "js-rank, query + 4 documents", &bench.figures("js-rank", "minilm", &ranking)?, &rust_five);
    let rust_vad = bench.figures("vad", "silero-vad", &audio)?;
    row("Rust", "vad, 8.7 s of audio", &rust_vad, &rust_vad);
    row("C", "c-vad, 8.7 s of audio", &bench.figures("c-vad", "silero-vad", &audio)?, &rust_vad);
    Ok(())
}
