//! The wasmtime engine every plugin runs on: its configuration, the epoch ticker behind
//! wall-clock deadlines, and loading (compiling or fetching from the cache) of components.

mod cache;
mod load;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use cache::CompileCache;
pub use load::{Artifact, LoadError};

/// How often the engine's epoch advances. Deadlines are checked on each tick, so this is
/// also the granularity of the wall-clock limit and of cooperative yielding.
pub const EPOCH_TICK: Duration = Duration::from_millis(2);

/// Settings of the shared wasmtime engine (they apply to every plugin it runs).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Where compiled components are cached; `None` disables the on-disk cache.
    pub cache_dir: Option<PathBuf>,
    /// Use the pooling instance allocator (fast instantiation, memory reserved up front).
    pub pooling: bool,
    /// Pooling: how many component instances may be alive at once across all plugins.
    pub max_concurrent_instances: u32,
    /// Pooling: the largest linear memory any plugin may be granted, in bytes.
    pub max_memory_per_instance: u64,
    /// Largest stack that wasm code may use, in bytes; deeper recursion traps.
    pub max_wasm_stack: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            cache_dir: default_cache_dir(),
            pooling: true,
            max_concurrent_instances: 256,
            max_memory_per_instance: 4 << 30,
            max_wasm_stack: 1 << 20,
        }
    }
}

/// `$EIR_CACHE_DIR`, else `$XDG_CACHE_HOME/eir`, else `~/.cache/eir`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("EIR_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("eir"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache").join("eir"))
}

/// A configured wasmtime engine with its epoch ticker and compile cache. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: wasmtime::Engine,
    cache: Option<Arc<CompileCache>>,
    config: Arc<EngineConfig>,
    idle: Arc<tokio::sync::Semaphore>,
    ticker: Arc<EpochTicker>,
}

impl Engine {
    /// Builds the engine. Falls back to on-demand allocation, with a warning, when the pooling
    /// allocator cannot reserve its memory (e.g. under a small virtual-memory ulimit).
    pub fn new(config: EngineConfig) -> anyhow::Result<Self> {
        let inner = match wasmtime::Engine::new(&wasmtime_config(&config, config.pooling)) {
            Ok(engine) => engine,
            Err(err) if config.pooling => {
                tracing::warn!(
                    error = %err,
                    "pooling allocator unavailable; falling back to on-demand instance allocation"
                );
                wasmtime::Engine::new(&wasmtime_config(&config, false))
                    .map_err(|e| anyhow::anyhow!("creating the wasmtime engine: {e}"))?
            }
            Err(err) => anyhow::bail!("creating the wasmtime engine: {err}"),
        };
        let cache = match &config.cache_dir {
            Some(dir) => Some(Arc::new(CompileCache::open(dir, &inner)?)),
            None => None,
        };
        let ticker = EpochTicker::start(inner.clone());
        // Half the instance pool may sit idle (warm, for reuse), across every plugin and tenant;
        // the other half is always there for calls.
        let idle = Arc::new(tokio::sync::Semaphore::new((config.max_concurrent_instances as usize / 2).max(1)));
        Ok(Self { inner, cache, config: Arc::new(config), idle, ticker: Arc::new(ticker) })
    }

    /// Keeps the epoch advancing (so deadlines and yields fire) until the guard is dropped.
    pub fn ticking(&self) -> Ticking {
        let shared = &self.ticker.shared;
        if shared.active.fetch_add(1, Ordering::AcqRel) == 0
            && let Some(t) = shared.thread.get()
        {
            t.unpark();
        }
        Ticking(shared.clone())
    }

    /// The underlying wasmtime engine.
    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner
    }

    /// The settings this engine was built with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The compile cache, when one is configured.
    pub fn cache(&self) -> Option<&CompileCache> {
        self.cache.as_deref()
    }

    /// A slot for keeping one idle instance warm, if the engine-wide budget has one: the idle
    /// instances of all plugins share half the instance pool, so warm pools never exhaust it.
    pub fn idle_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.idle.clone().try_acquire_owned().ok()
    }
}

fn wasmtime_config(config: &EngineConfig, pooling: bool) -> wasmtime::Config {
    let mut cfg = wasmtime::Config::new();
    cfg.wasm_component_model(true)
        .consume_fuel(true)
        .epoch_interruption(true)
        .max_wasm_stack(config.max_wasm_stack)
        // The fiber stack must hold the wasm stack plus the host frames below it.
        .async_stack_size(config.max_wasm_stack + (2 << 20))
        // EIR speaks WASI 0.2; component-model async (0.3) is not linked, and turning its
        // machinery off makes instantiation cheaper.
        .concurrency_support(false)
        // Enough frames to locate a trap; a runaway recursion would otherwise print thousands.
        .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(24))
        .cranelift_opt_level(wasmtime::OptLevel::Speed)
        .parallel_compilation(true);
    if pooling {
        let n = config.max_concurrent_instances.max(1);
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            .total_core_instances(n * 8)
            .total_memories(n * 2)
            .total_tables(n * 4)
            .total_stacks(n)
            .max_core_instances_per_component(64)
            .max_memories_per_component(8)
            .max_tables_per_component(16)
            .max_core_instance_size(4 << 20)
            .max_component_instance_size(1 << 20)
            .table_elements(100_000)
            .max_memory_size(usize::try_from(config.max_memory_per_instance).unwrap_or(usize::MAX))
            // Keep a little of each slot resident so reuse does not fault it all back in.
            .linear_memory_keep_resident(64 << 10);
        cfg.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    cfg
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on a background thread while any wasm may
/// run (a [`Ticking`] guard is held), and sleeps otherwise: an idle gateway then costs no CPU
/// (ticking unconditionally every 2 ms cost ~17 ms of CPU a second). Stops when dropped.
struct EpochTicker {
    shared: Arc<TickerShared>,
}

struct TickerShared {
    stop: AtomicBool,
    /// Calls that may be running wasm now.
    active: std::sync::atomic::AtomicUsize,
    thread: std::sync::OnceLock<std::thread::Thread>,
}

impl EpochTicker {
    fn start(engine: wasmtime::Engine) -> Self {
        let shared = Arc::new(TickerShared {
            stop: AtomicBool::new(false),
            active: Default::default(),
            thread: Default::default(),
        });
        let state = shared.clone();
        let spawned = std::thread::Builder::new().name("eir-epoch".into()).spawn(move || {
            while !state.stop.load(Ordering::Acquire) {
                if state.active.load(Ordering::Acquire) == 0 {
                    // Woken by the first `Ticking` (an unpark before this park is not lost).
                    std::thread::park();
                    continue;
                }
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        });
        match spawned {
            Ok(handle) => {
                let _ = shared.thread.set(handle.thread().clone());
            }
            // Without the ticker deadlines still hold through the async timeout, but wasm
            // that never calls the host could not be interrupted: make that loud.
            Err(err) => tracing::error!(error = %err, "could not start the epoch ticker thread"),
        }
        Self { shared }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.shared.thread.get() {
            t.unpark();
        }
    }
}

/// Keeps the epoch ticking while held: take one for as long as a store may run wasm.
pub struct Ticking(Arc<TickerShared>);

impl Drop for Ticking {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}
