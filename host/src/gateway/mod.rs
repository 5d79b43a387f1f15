//! `eir serve`: the multi-tenant inference gateway.
//!
//! One process serves the pipeline plugins of many tenants over the KServe v2 REST protocol
//! ([`kserve`]), each plugin a "model". A request is authenticated (bearer key, stored as a
//! SHA-256 hash) to a tenant, admitted by the tenant's quotas ([`quota`]), queued for the
//! plugin (bounded), and run under the plugin's limits lowered to the tenant's ceilings, in
//! instances that are never shared between tenants. Everything a request needs is taken from
//! one immutable [`Snapshot`]; a reload (SIGHUP or the repository API) builds the next one
//! beside it and swaps it in atomically, so requests in flight finish on the old version.

pub mod health;
pub mod kserve;
pub mod listener;
pub mod metrics;
mod openai;
pub mod quota;
mod routes;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::Runtime;
use crate::config::{BundleDecl, Ceilings, Config, PluginDecl};
use crate::nn::CancelToken;
use crate::plugin::{Plugin, PluginConfig};
use crate::registry::Registry;
use crate::scheduler::Scheduler;
use crate::tensor::Metadata;

pub use metrics::Metrics;
pub use quota::TenantState;

/// One version of a plugin, as served.
pub struct Served {
    /// The plugin's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its declaration.
    pub decl: PluginDecl,
    /// What it accepts and returns.
    pub metadata: Metadata,
    /// One loaded plugin per tenant allowed to call it: limits lowered to the tenant's
    /// ceilings, and warm instances never shared across tenants.
    pub per_tenant: HashMap<String, Arc<Plugin>>,
    /// The tenants (and their ceilings) it was built for, to tell when a reload can keep it.
    tenants: Vec<(String, Ceilings)>,
    /// Calls running or queued; at most `concurrency + queue`.
    pub slots: Arc<Semaphore>,
    /// Calls running; at most `concurrency`.
    pub running: Arc<Semaphore>,
}

/// All versions of one plugin.
#[derive(Clone)]
pub struct ModelEntry {
    /// By version.
    pub versions: BTreeMap<String, Arc<Served>>,
    /// The version served when none is named.
    pub latest: String,
}

/// Everything the gateway serves at one moment.
#[derive(Clone)]
pub struct Snapshot {
    /// The runtime (shared engine; this configuration's models).
    pub runtime: Runtime,
    /// The configuration it was built from.
    pub config: Config,
    /// Plugins by name.
    pub models: BTreeMap<String, ModelEntry>,
    /// Tenants by the SHA-256 of their keys.
    pub by_key: HashMap<String, Arc<TenantState>>,
    /// Tenants by name.
    pub tenants: BTreeMap<String, Arc<TenantState>>,
}

impl Snapshot {
    /// The version `version` (or the latest) of `name`, if `tenant` may see it.
    pub fn resolve(&self, tenant: &TenantState, name: &str, version: Option<&str>) -> Option<Arc<Served>> {
        if !tenant.decl.may_use(name) {
            return None;
        }
        let entry = self.models.get(name)?;
        entry.versions.get(version.unwrap_or(&entry.latest)).cloned()
    }
}

/// The SHA-256 (hex) of an API key, as configurations store it.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// What a swap replaced, and the generation it made.
pub struct Swapped {
    /// The snapshot that was serving.
    pub previous: Arc<Snapshot>,
    /// The new version's generation ([`Gateway::generation`]).
    pub generation: u64,
}

/// The gateway: the current snapshot, and what outlives reloads.
pub struct Gateway {
    state: ArcSwap<Snapshot>,
    base: Runtime,
    config_path: PathBuf,
    metrics: Metrics,
    /// Held while a new version is built and swapped in, one at a time; holds the bundles
    /// assigned at run time (by the fleet agent), served beside the file's `[bundles]`.
    reloading: tokio::sync::Mutex<BTreeMap<String, BundleDecl>>,
    /// Bundles named on the command line (`eir serve --bundle`), served at every reload.
    fixed: BTreeMap<String, BundleDecl>,
    draining: AtomicBool,
    serving: health::Serving,
    /// Counts the versions swapped in (reloads, restores, unloads).
    generation: std::sync::atomic::AtomicU64,
    /// Plugin calls run on their own threads, so busy plugins never delay accepting and
    /// parsing other tenants' requests on the I/O threads.
    exec: Option<tokio::runtime::Runtime>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(rt) = self.exec.take() {
            rt.shutdown_background();
        }
    }
}

impl Gateway {
    /// Loads `config` (models preloaded, plugins compiled) and returns a gateway ready to serve.
    /// `fixed` (from the command line) and `assigned` (by the fleet agent) are the bundles
    /// beside the file's that `config` was loaded with.
    pub async fn start(
        base: Runtime,
        config_path: &Path,
        config: Config,
        fixed: BTreeMap<String, BundleDecl>,
        assigned: BTreeMap<String, BundleDecl>,
    ) -> anyhow::Result<Self> {
        let snapshot = build(&base, config, None).await?;
        let metrics = Metrics::default().with_scheduler(snapshot.runtime.registry().scheduler().metrics());
        // More threads than cores: a tenant's busy calls then share the cores with other
        // tenants' calls through the OS scheduler, instead of making them wait for a thread.
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let exec = tokio::runtime::Builder::new_multi_thread()
            .worker_threads((2 * cores).max(4))
            .thread_name("eir-plugin")
            .enable_all()
            .build()
            .context("starting the plugin threads")?;
        Ok(Self {
            state: ArcSwap::from_pointee(snapshot),
            base,
            config_path: config_path.to_path_buf(),
            metrics,
            reloading: tokio::sync::Mutex::new(assigned),
            fixed,
            draining: AtomicBool::new(false),
            serving: health::Serving::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
            exec: Some(exec),
        })
    }

    /// Runs a plugin call on the plugin threads, holding `held` (the request's admission
    /// slots) until the call has really ended. If the caller goes away (the client hung up),
    /// the call is told so rather than dropped: it stops within a short grace and keeps its
    /// warm instance, and until then its slots stay taken, so a client that hangs up and
    /// resends gains no extra concurrency.
    pub async fn call<H: Send + 'static>(
        &self,
        plugin: Arc<Plugin>,
        request: crate::tensor::Request,
        held: H,
    ) -> (Result<crate::tensor::Response, crate::plugin::CallError>, crate::plugin::CallStats) {
        self.call_with(plugin, request, held, None).await
    }

    /// [`Gateway::call`], streaming the parts of the answer the plugin sends into `reply`.
    /// Dropping the returned future (a client that hung up) cancels the call.
    pub async fn call_with<H: Send + 'static>(
        &self,
        plugin: Arc<Plugin>,
        request: crate::tensor::Request,
        held: H,
        reply: Option<crate::plugin::ReplySink>,
    ) -> (Result<crate::tensor::Response, crate::plugin::CallError>, crate::plugin::CallStats) {
        let abandoned = CancelToken::new();
        let token = abandoned.clone();
        let task = async move {
            let answer = match reply {
                Some(reply) => plugin.handle_streaming(&request, &token, reply).await,
                None => plugin.handle_abandonable(&request, &token).await,
            };
            drop(held);
            answer
        };
        let Some(exec) = &self.exec else { return task.await };
        let gone = abandoned.cancel_on_drop();
        let answer = exec.spawn(task).await;
        gone.disarm();
        match answer {
            Ok(answer) => answer,
            Err(e) => (
                Err(crate::plugin::CallError::Internal {
                    plugin: String::new(),
                    message: format!("plugin task failed: {e}"),
                }),
                Default::default(),
            ),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.load_full()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Re-reads the configuration file and swaps in what it describes. A configuration that
    /// does not validate or load is refused and the running one is kept.
    pub async fn reload(&self) -> anyhow::Result<()> {
        self.apply(None, |_| async { Ok(()) }).await.map(|_| ())
    }

    /// The one way a new version comes in: re-reads the configuration file with the run-time
    /// bundles (`assign`, or the current ones when `None`) merged in, builds the next snapshot
    /// beside the running one, passes it to `gate` (the fleet agent's health gate), and swaps it
    /// in only if the gate accepts. On any failure the running version keeps serving. Returns
    /// the snapshot that was replaced.
    pub async fn apply<F, Fut>(&self, assign: Option<BTreeMap<String, BundleDecl>>, gate: F) -> anyhow::Result<Swapped>
    where
        F: FnOnce(Arc<Snapshot>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let mut assigned = self.reloading.lock().await;
        let bundles = assign.unwrap_or_else(|| assigned.clone());
        let config = crate::bundle::serve::load_config_with(&self.config_path, &merged(&self.fixed, &bundles)?).await?;
        let current = self.snapshot();
        let next = Arc::new(build(&self.base, config, Some(&current)).await?);
        gate(next.clone()).await?;
        let summary: Vec<String> = next.models.iter().map(|(n, m)| format!("{n}@{}", m.latest)).collect();
        let swapped = self.swap(next);
        *assigned = bundles;
        tracing::info!(models = %summary.join(", "), "configuration reloaded");
        Ok(swapped)
    }

    /// Puts back a snapshot [`Gateway::apply`] replaced, built for `assigned` (an instant
    /// rollback: nothing is loaded or compiled again).
    pub async fn restore(&self, snapshot: Arc<Snapshot>, assigned: BTreeMap<String, BundleDecl>) -> Swapped {
        let mut current = self.reloading.lock().await;
        *current = assigned;
        tracing::info!("previous version restored");
        self.swap(snapshot)
    }

    /// Swaps `next` in: a new generation, judged on its own requests from now on.
    fn swap(&self, next: Arc<Snapshot>) -> Swapped {
        let previous = self.state.swap(next);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.serving.reset();
        Swapped { previous, generation }
    }

    /// How many versions have been swapped in since start.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The bundles assigned at run time that the running version serves.
    pub async fn assigned(&self) -> BTreeMap<String, BundleDecl> {
        self.reloading.lock().await.clone()
    }

    /// The rolling window of served requests (for heartbeats).
    pub fn serving(&self) -> &health::Serving {
        &self.serving
    }

    /// Stops serving `name` (new requests get 404; requests in flight finish).
    pub fn unload(&self, name: &str) -> bool {
        let mut next = (*self.snapshot()).clone();
        let found = next.models.remove(name).is_some();
        if found {
            self.swap(Arc::new(next));
            tracing::info!(model = name, "unloaded");
        }
        found
    }

    /// Whether the gateway is shutting down (readiness turns false).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// The bundles of the command line and of the fleet together (one name may not be both).
fn merged(
    fixed: &BTreeMap<String, BundleDecl>,
    assigned: &BTreeMap<String, BundleDecl>,
) -> anyhow::Result<BTreeMap<String, BundleDecl>> {
    let mut all = fixed.clone();
    for (name, decl) in assigned {
        if all.insert(name.clone(), decl.clone()).is_some() {
            anyhow::bail!("bundle `{name}` is both on the command line and assigned by the fleet");
        }
    }
    Ok(all)
}

/// Builds a snapshot for `config`, keeping from `previous` whatever did not change: loaded
/// models, tenants' admission state, and served plugins (with their warm instances).
async fn build(base: &Runtime, config: Config, previous: Option<&Snapshot>) -> anyhow::Result<Snapshot> {
    let registry = match previous {
        Some(p) => Registry::carrying_over(config.models.clone(), p.runtime.registry()),
        None => Registry::new(config.models.clone(), Scheduler::new(config.scheduler_settings())),
    };
    let scheduler = registry.scheduler().clone();
    let runtime = base.with_models(Arc::new(registry));
    runtime.registry().preload().await.map_err(|e| anyhow::anyhow!("{e}"))?;

    let mut tenants = BTreeMap::new();
    let mut by_key = HashMap::new();
    for (name, decl) in &config.tenants {
        let state = match previous.and_then(|p| p.tenants.get(name)) {
            Some(old) if old.same_quotas(decl) && old.decl == *decl => old.clone(),
            _ => Arc::new(TenantState::new(name, decl)),
        };
        scheduler.tenant(name).configure(decl.weight, decl.compute_quota);
        for key in &decl.keys_sha256 {
            by_key.insert(key.clone(), state.clone());
        }
        tenants.insert(name.clone(), state);
    }

    for (name, path) in &config.absent {
        tracing::warn!(
            plugin = %name,
            "left out: {} is not built yet (it is optional; scripts/build.sh builds it, and a reload \
             (SIGHUP) serves it)",
            path.display()
        );
    }
    let mut models = BTreeMap::new();
    for (name, decl) in &config.plugins {
        let audience: Vec<(String, Ceilings)> = config
            .tenants
            .iter()
            .filter(|(_, t)| t.may_use(name))
            .map(|(t, d)| (t.clone(), d.ceilings.clone()))
            .collect();
        let kept = previous
            .and_then(|p| p.models.get(name))
            .and_then(|m| m.versions.get(&decl.version))
            .filter(|s| s.decl == *decl && s.tenants == audience && same_models(&s.decl, previous, &config))
            .cloned();
        let served = match kept {
            Some(s) => s,
            None => Arc::new(serve_plugin(&runtime, name, decl, audience).await?),
        };
        let mut versions = BTreeMap::new();
        versions.insert(decl.version.clone(), served);
        models.insert(name.clone(), ModelEntry { versions, latest: decl.version.clone() });
    }
    Ok(Snapshot { runtime, config, models, by_key, tenants })
}

/// Aborts a spawned task when dropped.
/// Whether the models a plugin uses are declared the same way as before (a plugin bound to a
/// replaced model must be rebuilt on the new registry).
fn same_models(decl: &PluginDecl, previous: Option<&Snapshot>, config: &Config) -> bool {
    let Some(prev) = previous else { return false };
    decl.config.grants.nn.models.iter().all(|m| prev.config.models.get(m) == config.models.get(m))
        && !decl.config.grants.nn.models.iter().any(|m| m == "*")
}

async fn serve_plugin(
    runtime: &Runtime,
    name: &str,
    decl: &PluginDecl,
    audience: Vec<(String, Ceilings)>,
) -> anyhow::Result<Served> {
    let artifact = runtime.engine().load_file(&decl.path, false).with_context(|| format!("loading plugin `{name}`"))?;
    let describe = runtime.plugin(name, artifact.clone(), decl.config.clone())?;
    if describe.kind() != crate::plugin::PluginKind::Pipeline {
        anyhow::bail!("plugin `{name}` ({}) is a command, not a pipeline plugin", decl.path.display());
    }
    let metadata = describe.metadata().await.with_context(|| format!("asking plugin `{name}` to describe itself"))?;
    let mut per_tenant = HashMap::new();
    for (tenant, ceilings) in &audience {
        let config = PluginConfig { limits: ceilings.apply(&decl.config.limits), ..decl.config.clone() };
        let account = runtime.registry().scheduler().tenant(tenant);
        per_tenant
            .insert(tenant.clone(), Arc::new(runtime.plugin(name, artifact.clone(), config)?.with_tenant(account)));
    }
    tracing::info!(plugin = name, version = %decl.version, tenants = audience.len(), "plugin ready");
    Ok(Served {
        name: name.to_string(),
        version: decl.version.clone(),
        decl: decl.clone(),
        metadata,
        per_tenant,
        tenants: audience,
        slots: Arc::new(Semaphore::new(decl.concurrency + decl.queue)),
        running: Arc::new(Semaphore::new(decl.concurrency)),
    })
}

/// Runs the gateway until SIGTERM or Ctrl-C, then stops accepting and finishes what is in
/// flight. SIGHUP reloads the configuration.
/// With `fleet`, a device agent runs beside it ([`crate::fleet::agent`]); `bundles` (`eir
/// serve --bundle REF`) are served as if declared under `[bundles]`.
pub async fn serve(
    runtime: Runtime,
    config_path: &Path,
    listen: Option<String>,
    bundles: BTreeMap<String, BundleDecl>,
    fleet: Option<crate::fleet::agent::AgentOptions>,
) -> anyhow::Result<()> {
    // A device starts with the version it last ran, so it serves without the fleet or the
    // registry being reachable.
    let assigned = match &fleet {
        Some(f) => f.last_good(),
        None => BTreeMap::new(),
    };
    let (config, assigned) = match crate::bundle::serve::load_config_with(config_path, &merged(&bundles, &assigned)?)
        .await
    {
        Ok(c) => (c, assigned),
        Err(e) if !assigned.is_empty() => {
            tracing::error!(error = %format!("{e:#}"), "the last assigned bundle cannot be served; starting without it");
            (crate::bundle::serve::load_config_with(config_path, &bundles).await?, BTreeMap::new())
        }
        Err(e) => return Err(e),
    };
    let addr = listen.unwrap_or_else(|| config.server.listen.clone());
    let (max_body, max_connections) = (config.server.max_body, config.server.max_connections);
    tracing::info!(config = %config_path.display(), "loading models and plugins");
    let serving = assigned.clone();
    let gateway = Arc::new(Gateway::start(runtime, config_path, config, bundles, assigned).await?);
    let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("listening on {addr}"))?;
    let local = listener.local_addr()?;
    let listener = listener::Limited::new(listener, max_connections);
    tracing::info!(%local, "serving");
    // A line on stdout that scripts (and the tests) wait for.
    println!("eir serving on http://{local}");

    #[cfg(unix)]
    {
        let gw = gateway.clone();
        tokio::spawn(async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration");
                if let Err(e) = gw.reload().await {
                    tracing::error!(error = %format!("{e:#}"), "reload refused; the running configuration stays");
                }
            }
        });
    }
    if let Some(options) = fleet {
        let agent = crate::fleet::agent::Agent::new(options, gateway.clone(), local.to_string(), &serving);
        tokio::spawn(agent.run());
    }
    let gw = gateway.clone();
    axum::serve(listener, routes::router(gateway, max_body))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            gw.draining.store(true, Ordering::Relaxed);
            tracing::info!("shutting down: no new connections; finishing requests in flight");
        })
        .await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let term = async {
            if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                s.recv().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = term => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
