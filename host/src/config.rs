//! The configuration file (TOML): models, plugins with their limits and grants, and (for the
//! gateway) tenants. Validated as a whole; every error names the file, the line and the reason.
//!
//! ```toml
//! [models.minilm]
//! path = "../models/minilm"          # relative paths resolve against this file's directory
//! family = "bert"                    # optional check
//!
//! [plugins.embed]
//! path = "dist/text_embed.wasm"
//! models = ["minilm"]                # wasi-nn grants (the model's files appear at /models/minilm)
//! dirs = ["data::/data:ro"]          # HOST::GUEST[:ro|:rw]
//! env = { LANG = "C" }
//! reuse = 1000                       # calls per instance (1 = fresh every call)
//! limits = { fuel = 5_000_000_000, timeout = "10s", max_memory = "256MiB" }
//!
//! [plugins.extra]
//! path = "dist/extra.wasm"
//! optional = true                    # not built yet: left out with a warning, served after a reload
//!
//! [tenants.acme]
//! keys_sha256 = ["<sha256 of the key, hex>"]   # `eir key new` makes a key and its hash
//! plugins = ["embed"]
//! max_concurrent = 8
//! rps = 50
//! burst = 100
//! ceilings = { timeout = "5s" }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytesize::ByteSize;
use serde::Deserialize;
use toml::Spanned;

use crate::grants::{DirGrant, Grants, Stdio};
use crate::limits::Limits;
use crate::nn::{NnGrants, Target};
use crate::plugin::PluginConfig;
use crate::registry::{ModelDecl, Registry};
use crate::scheduler::{BatchPolicy, Scheduler};

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    /// The configuration file.
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// A parsed and validated configuration file.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it was read from.
    pub file: PathBuf,
    /// Gateway settings.
    pub server: ServerDecl,
    /// Models by name.
    pub models: BTreeMap<String, ModelDecl>,
    /// Plugins by name.
    pub plugins: BTreeMap<String, PluginDecl>,
    /// Plugins declared `optional` whose component does not exist yet, with the path it is
    /// expected at: left out of what is served until a reload finds them built.
    pub absent: BTreeMap<String, PathBuf>,
    /// Tenants by name.
    pub tenants: BTreeMap<String, TenantDecl>,
}

/// A bundle the gateway serves: from a registry (`ref`), or already checked out in a
/// directory (`dir`, e.g. where `eir bundle install` put it: a KServe storage initializer's
/// `/mnt/models`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleDecl {
    /// `host[:port]/repository:tag` or `...@sha256:...` (pinned: served offline once pulled).
    #[serde(rename = "ref", default)]
    pub reference: Option<String>,
    /// A checked-out bundle (its `eir.toml` fragment and files), resolved against the
    /// configuration's directory.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

impl BundleDecl {
    /// A bundle from a registry.
    pub fn from_registry(reference: impl Into<String>) -> Self {
        Self { reference: Some(reference.into()), dir: None }
    }
}

/// What to do with a bundle whose signature is missing or not by a trusted key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrustMode {
    /// Refuse it (the running version keeps serving).
    #[default]
    Enforce,
    /// Serve it, logging a warning.
    Warn,
    /// Do not check signatures.
    Off,
}

/// The trust policy: public keys per registry scope.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustDecl {
    /// `enforce` (the default), `warn` or `off`.
    pub mode: TrustMode,
    /// Registry scopes and their keys.
    pub scopes: Vec<TrustScope>,
}

/// Keys trusted for the bundles under one registry prefix.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustScope {
    /// `host[:port]/path`: bundles whose `registry/repository` starts with it.
    pub prefix: String,
    /// Public keys (PEM), resolved against the configuration's directory.
    pub keys: Vec<PathBuf>,
}

impl TrustDecl {
    /// The policy with relative key paths resolved against `base` (the configuration's
    /// directory).
    pub fn resolved(mut self, base: &Path) -> Self {
        for key in self.scopes.iter_mut().flat_map(|s| s.keys.iter_mut()) {
            if key.is_relative() {
                *key = base.join(&*key);
            }
        }
        self
    }

    /// The keys trusted for `registry/repository`.
    pub fn keys_for(&self, repository: &str) -> Vec<PathBuf> {
        self.scopes
            .iter()
            .filter(|s| {
                let p = s.prefix.trim_end_matches('/');
                repository == p || repository.starts_with(&format!("{p}/"))
            })
            .flat_map(|s| s.keys.iter().cloned())
            .collect()
    }
}

/// A checked-out bundle's configuration fragment, merged into a configuration.
#[derive(Clone, Debug)]
pub struct Fragment {
    /// The bundle's name in the configuration.
    pub bundle: String,
    /// Where it is checked out (its paths are relative to it).
    pub dir: PathBuf,
    /// The fragment's text.
    pub text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFragment {
    #[serde(default)]
    models: BTreeMap<String, Spanned<RawModel>>,
    #[serde(default)]
    plugins: BTreeMap<String, Spanned<RawPlugin>>,
}

/// One plugin of the configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginDecl {
    /// The component (resolved against the file's directory).
    pub path: PathBuf,
    /// Its version, as the gateway serves it (`/v2/models/NAME/versions/VERSION`).
    pub version: String,
    /// How it runs.
    pub config: PluginConfig,
    /// Calls it runs at once in the gateway.
    pub concurrency: usize,
    /// Calls that may wait for a free slot; more are refused (503).
    pub queue: usize,
    /// A KServe v2 inference request (`[plugins.NAME.smoke]`) that must succeed before a
    /// version with this plugin is swapped in by the fleet agent's health gate.
    pub smoke: Option<serde_json::Value>,
}

/// Gateway settings (`[server]`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerDecl {
    /// Address to listen on.
    pub listen: String,
    /// SHA-256 (hex) of the admin key that may use the repository API (load/unload).
    pub admin_key_sha256: Option<String>,
    /// Largest request body accepted from anyone.
    pub max_body: ByteSize,
    /// Most connections held open at once; past it new ones wait to be accepted.
    pub max_connections: usize,
    /// Longest a client may take to send a request body (slow senders hold a slot).
    #[serde(with = "humantime_serde")]
    pub body_timeout: std::time::Duration,
    /// Activation memory all running forward passes may hold together (the scheduler admits
    /// a batch only if its estimate fits).
    pub compute_memory: ByteSize,
    /// Forward passes running at once (default: one per core). Each runs on the one compute
    /// pool, so fewer passes give each more of the cores: 1 suits models whose kernels use
    /// every core even on one row, more suit models that compute a row on one core.
    pub compute_passes: Option<usize>,
    /// Whether the compute pool's idle threads spin while a pass runs alone, rather than
    /// sleeping between its parallel sections (see `scheduler::awake`): faster passes at the
    /// cost of CPU time other threads (plugins) could have had while the pass runs.
    pub compute_spin: bool,
    /// Longest a refusal at admission (429 over a quota, 503 for a full queue) is held before
    /// it is answered, at most its own `Retry-After` (0 answers at once). Clients that ignore
    /// `Retry-After` would otherwise ask again at once, and the refusals themselves would cost
    /// other tenants CPU.
    #[serde(with = "humantime_serde")]
    pub refusal_hold: std::time::Duration,
}

/// The most forward passes `compute_passes` may run at once (each also sizes the model-load
/// pool's semaphore).
const MAX_COMPUTE_PASSES: usize = 1024;

impl Default for ServerDecl {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_key_sha256: None,
            max_body: ByteSize::mib(64),
            max_connections: 1024,
            body_timeout: std::time::Duration::from_secs(30),
            compute_memory: ByteSize::b(crate::scheduler::DEFAULT_MEMORY),
            compute_passes: None,
            compute_spin: true,
            refusal_hold: std::time::Duration::from_secs(1),
        }
    }
}

/// One tenant (`[tenants.NAME]`): who it is, what it may call, how much.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantDecl {
    /// SHA-256 (hex, lower case) of each API key that authenticates as this tenant.
    pub keys_sha256: Vec<String>,
    /// Plugins it may see and call (`"*"` for all).
    pub plugins: Vec<String>,
    /// Registry models it may call directly through the OpenAI-compatible API (`"*"` for all).
    pub models: Vec<String>,
    /// Language-model tokens (prompt + generated) it may use per minute (`None`: no quota);
    /// over it, generation requests are answered 429 with `Retry-After`.
    pub tokens_per_minute: Option<u64>,
    /// Requests it may have in flight at once.
    pub max_concurrent: usize,
    /// Sustained requests per second.
    pub rps: f64,
    /// Requests it may send at once above the sustained rate.
    pub burst: u32,
    /// Largest request body it may send.
    pub max_body: ByteSize,
    /// Per-request ceilings: a plugin's limits are lowered to these for this tenant.
    pub ceilings: Ceilings,
    /// Its share of compute against other tenants' (weighted fair queuing).
    pub weight: f64,
    /// Core-seconds of compute it may use per minute (`None`: no quota); over it, requests
    /// are answered 429 with `Retry-After`.
    pub compute_quota: Option<f64>,
}

impl TenantDecl {
    /// Whether the tenant may use `plugin`.
    pub fn may_use(&self, plugin: &str) -> bool {
        self.plugins.iter().any(|p| p == "*" || p == plugin)
    }

    /// Whether the tenant may call registry model `model` directly (`/v1` endpoints).
    pub fn may_use_model(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }
}

/// Per-request ceilings of a tenant.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ceilings {
    /// Fuel per request.
    pub fuel: Option<u64>,
    /// Time per request.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<std::time::Duration>,
    /// Linear memory per request.
    pub max_memory: Option<ByteSize>,
    /// Intermediate values per model computation.
    pub max_compute_memory: Option<ByteSize>,
}

impl Ceilings {
    /// `limits` lowered to these ceilings.
    pub fn apply(&self, limits: &Limits) -> Limits {
        let mut l = limits.clone();
        if let Some(f) = self.fuel {
            l.fuel = l.fuel.min(f);
        }
        if let Some(t) = self.timeout {
            l.timeout = l.timeout.min(t);
        }
        if let Some(m) = self.max_memory {
            l.max_memory = l.max_memory.min(m);
        }
        if let Some(m) = self.max_compute_memory {
            l.max_compute_memory = l.max_compute_memory.min(m);
        }
        l
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: ServerDecl,
    #[serde(default)]
    models: BTreeMap<String, Spanned<RawModel>>,
    #[serde(default)]
    plugins: BTreeMap<String, Spanned<RawPlugin>>,
    #[serde(default)]
    tenants: BTreeMap<String, Spanned<RawTenant>>,
    // Read (and checked) here; applied by `crate::bundle::serve::load_config`, which merges the
    // bundles' models and plugins in before this parse.
    #[serde(default)]
    #[allow(dead_code)]
    bundles: BTreeMap<String, BundleDecl>,
    #[serde(default)]
    #[allow(dead_code)]
    trust: TrustDecl,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    #[serde(default)]
    keys_sha256: Vec<Spanned<String>>,
    #[serde(default)]
    plugins: Vec<Spanned<String>>,
    #[serde(default)]
    models: Vec<Spanned<String>>,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
    #[serde(default = "default_concurrent")]
    max_concurrent: usize,
    #[serde(default = "default_rps")]
    rps: f64,
    #[serde(default)]
    burst: Option<u32>,
    #[serde(default)]
    max_body: Option<ByteSize>,
    #[serde(default)]
    ceilings: Ceilings,
    #[serde(default = "default_weight")]
    weight: f64,
    #[serde(default)]
    compute_quota: Option<f64>,
}

fn default_weight() -> f64 {
    1.0
}

fn default_concurrent() -> usize {
    16
}

fn default_rps() -> f64 {
    100.0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    path: Spanned<PathBuf>,
    #[serde(default)]
    family: Option<String>,
    #[serde(default)]
    target: Target,
    #[serde(default)]
    max_batch: Option<Spanned<usize>>,
    #[serde(default, with = "humantime_serde")]
    max_delay: Option<std::time::Duration>,
    #[serde(default)]
    llm: Option<crate::llm::Settings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    path: Spanned<PathBuf>,
    /// A missing component leaves the plugin out (with a warning) instead of failing the file.
    #[serde(default)]
    optional: bool,
    #[serde(default)]
    models: Vec<Spanned<String>>,
    #[serde(default)]
    load_from_bytes: Option<ByteSize>,
    #[serde(default)]
    dirs: Vec<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    network: bool,
    #[serde(default)]
    reuse: Option<u32>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    concurrency: Option<usize>,
    #[serde(default)]
    queue: Option<usize>,
    #[serde(default)]
    smoke: Option<Spanned<serde_json::Value>>,
}

impl Config {
    /// Reads and validates `file`.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.display().to_string(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(file, &text)
    }

    /// Parses and validates `text`, as if read from `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse_with(file, text, &[])
    }

    /// [`Config::parse`] with the models and plugins of checked-out bundles merged in (their
    /// paths resolved inside each bundle; a name declared twice is an error).
    pub fn parse_with(file: &Path, text: &str, fragments: &[Fragment]) -> Result<Self, ConfigError> {
        let err = |span: Option<std::ops::Range<usize>>, message: String| ConfigError {
            file: file.display().to_string(),
            line: span.map(|s| line_of(text, s.start)).unwrap_or(0),
            message,
        };
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| err(e.span(), e.message().to_string()))?;
        let base = file.parent().unwrap_or(Path::new("."));
        for f in fragments {
            let bad = |message: String| ConfigError {
                file: file.display().to_string(),
                line: 0,
                message: format!("bundle `{}`: {message}", f.bundle),
            };
            let frag: RawFragment = toml::from_str(&f.text).map_err(|e| bad(e.message().to_string()))?;
            for (name, mut model) in frag.models {
                let m = model.get_mut();
                *m.path.get_mut() = f.dir.join(m.path.get_ref());
                if raw.models.insert(name.clone(), model).is_some() {
                    return Err(bad(format!("model `{name}` is declared twice")));
                }
            }
            for (name, mut plugin) in frag.plugins {
                let p = plugin.get_mut();
                *p.path.get_mut() = f.dir.join(p.path.get_ref());
                for dir in &mut p.dirs {
                    let grant: DirGrant = dir.get_ref().parse().map_err(|e: String| bad(e))?;
                    let mode = if grant.writable { "rw" } else { "ro" };
                    *dir.get_mut() = format!("{}::{}:{mode}", f.dir.join(&grant.host).display(), grant.guest);
                }
                if raw.plugins.insert(name.clone(), plugin).is_some() {
                    return Err(bad(format!("plugin `{name}` is declared twice")));
                }
            }
        }
        let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };

        let mut models = BTreeMap::new();
        for (name, model) in raw.models {
            let span = model.span();
            let model = model.into_inner();
            let path = resolve(model.path.get_ref());
            if !path.exists() {
                return Err(err(
                    Some(model.path.span()),
                    format!(
                        "model `{name}`: {} does not exist (fetch pinned models with `eir models fetch`)",
                        path.display()
                    ),
                ));
            }
            if name.is_empty() {
                return Err(err(Some(span), "a model needs a name".into()));
            }
            let mut batch = BatchPolicy::default();
            if let Some(n) = &model.max_batch {
                if *n.get_ref() == 0 || *n.get_ref() > 4096 {
                    return Err(err(Some(n.span()), format!("model `{name}`: max_batch must be 1..=4096")));
                }
                batch.max_batch = *n.get_ref();
            }
            if let Some(d) = model.max_delay {
                if d > std::time::Duration::from_secs(1) {
                    return Err(err(Some(span), format!("model `{name}`: max_delay over 1s would only add latency")));
                }
                batch.max_delay = d;
            }
            models.insert(name, ModelDecl { path, family: model.family, target: model.target, batch, llm: model.llm });
        }

        let mut plugins = BTreeMap::new();
        let mut absent = BTreeMap::new();
        // Where each plugin grants a writable directory, for the check across tenants below.
        let mut writable: BTreeMap<String, std::ops::Range<usize>> = BTreeMap::new();
        for (name, plugin) in raw.plugins {
            let plugin = plugin.into_inner();
            let path = resolve(plugin.path.get_ref());
            if plugin.optional && !path.exists() {
                absent.insert(name, path);
                continue;
            }
            if !path.is_file() {
                return Err(err(
                    Some(plugin.path.span()),
                    format!(
                        "plugin `{name}`: {} is not a file (build the plugins with scripts/build.sh)",
                        path.display()
                    ),
                ));
            }
            for model in &plugin.models {
                if model.get_ref() != "*" && !models.contains_key(model.get_ref()) {
                    return Err(err(
                        Some(model.span()),
                        format!(
                            "plugin `{name}` is granted model `{}`, which is not declared under [models]",
                            model.get_ref()
                        ),
                    ));
                }
            }
            let mut dirs = Vec::new();
            for dir in &plugin.dirs {
                let mut grant: DirGrant = dir
                    .get_ref()
                    .parse()
                    .map_err(|e: String| err(Some(dir.span()), format!("plugin `{name}`: {e}")))?;
                grant.host = resolve(&grant.host);
                if grant.writable {
                    writable.entry(name.clone()).or_insert_with(|| dir.span());
                }
                if !grant.host.is_dir() {
                    return Err(err(
                        Some(dir.span()),
                        format!("plugin `{name}`: {} is not a directory", grant.host.display()),
                    ));
                }
                dirs.push(grant);
            }
            let grants = Grants {
                dirs,
                env: plugin.env.into_iter().collect(),
                args: vec![name.clone()],
                network: plugin.network,
                stdio: Stdio::Log,
                stdin: false,
                nn: NnGrants {
                    models: plugin.models.into_iter().map(Spanned::into_inner).collect(),
                    load_from_bytes: plugin.load_from_bytes,
                    ..NnGrants::default()
                },
            };
            if let Some(smoke) = &plugin.smoke {
                let body = serde_json::to_vec(smoke.get_ref()).unwrap_or_default();
                crate::gateway::kserve::decode(&body, None)
                    .map_err(|e| err(Some(smoke.span()), format!("plugin `{name}`: smoke request: {e}")))?;
            }
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let concurrency = plugin.concurrency.unwrap_or(2 * cores).max(1);
            let config = PluginConfig {
                limits: plugin.limits,
                grants,
                reuse: plugin.reuse.unwrap_or(1).max(1),
                warm: concurrency.max(PluginConfig::default().warm),
            };
            plugins.insert(
                name,
                PluginDecl {
                    path,
                    version: plugin.version.unwrap_or_else(|| "1".into()),
                    config,
                    concurrency,
                    queue: plugin.queue.unwrap_or(64),
                    smoke: plugin.smoke.map(Spanned::into_inner),
                },
            );
        }

        let mut tenants = BTreeMap::new();
        let mut seen_keys = std::collections::HashSet::new();
        for (name, tenant) in raw.tenants {
            let span = tenant.span();
            let tenant = tenant.into_inner();
            let mut keys = Vec::new();
            for key in &tenant.keys_sha256 {
                let k = key.get_ref().to_ascii_lowercase();
                if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(err(
                        Some(key.span()),
                        format!("tenant `{name}`: a key hash must be 64 hex digits (see `eir key new`)"),
                    ));
                }
                if !seen_keys.insert(k.clone()) {
                    return Err(err(
                        Some(key.span()),
                        format!("tenant `{name}`: this key already belongs to another tenant"),
                    ));
                }
                keys.push(k);
            }
            if keys.is_empty() {
                return Err(err(Some(span), format!("tenant `{name}` has no keys_sha256")));
            }
            for p in &tenant.plugins {
                if p.get_ref() != "*" && !plugins.contains_key(p.get_ref()) && !absent.contains_key(p.get_ref()) {
                    return Err(err(
                        Some(p.span()),
                        format!("tenant `{name}` may use plugin `{}`, which is not declared", p.get_ref()),
                    ));
                }
            }
            for m in &tenant.models {
                if m.get_ref() != "*" && !models.contains_key(m.get_ref()) {
                    return Err(err(
                        Some(m.span()),
                        format!("tenant `{name}` may use model `{}`, which is not declared", m.get_ref()),
                    ));
                }
            }
            if tenant.tokens_per_minute == Some(0) {
                return Err(err(Some(span), format!("tenant `{name}`: tokens_per_minute must be positive")));
            }
            if !tenant.rps.is_finite() || tenant.rps <= 0.0 {
                return Err(err(Some(span), format!("tenant `{name}`: rps must be positive")));
            }
            if !tenant.weight.is_finite() || tenant.weight <= 0.0 {
                return Err(err(Some(span), format!("tenant `{name}`: weight must be positive")));
            }
            if tenant.compute_quota.is_some_and(|q| !q.is_finite() || q <= 0.0) {
                return Err(err(
                    Some(span),
                    format!("tenant `{name}`: compute_quota (core-seconds per minute) must be positive"),
                ));
            }
            tenants.insert(
                name,
                TenantDecl {
                    keys_sha256: keys,
                    plugins: tenant.plugins.into_iter().map(Spanned::into_inner).collect(),
                    models: tenant.models.into_iter().map(Spanned::into_inner).collect(),
                    tokens_per_minute: tenant.tokens_per_minute,
                    max_concurrent: tenant.max_concurrent.max(1),
                    rps: tenant.rps,
                    burst: tenant.burst.unwrap_or(tenant.rps.ceil().max(1.0) as u32).max(1),
                    max_body: tenant.max_body.unwrap_or(raw.server.max_body).min(raw.server.max_body),
                    ceilings: tenant.ceilings,
                    weight: tenant.weight,
                    compute_quota: tenant.compute_quota,
                },
            );
        }
        // A writable directory is state: shared by two tenants, one could read or change what the
        // other wrote.
        for (plugin, span) in &writable {
            let users: Vec<&str> = tenants.iter().filter(|(_, t)| t.may_use(plugin)).map(|(n, _)| n.as_str()).collect();
            if users.len() > 1 {
                return Err(err(
                    Some(span.clone()),
                    format!(
                        "plugin `{plugin}` grants a writable directory and is served to tenants {}: one tenant \
                         could read or change what another wrote; declare a plugin per tenant, each with its own \
                         directory, or make it read-only",
                        users.join(", ")
                    ),
                ));
            }
        }
        if let Some(k) = &raw.server.admin_key_sha256
            && (k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(err(None, "server.admin_key_sha256 must be 64 hex digits".into()));
        }
        Ok(Self { file: file.to_path_buf(), server: raw.server, models, plugins, absent, tenants })
    }

    /// A registry of the configured models, computing through `scheduler`.
    pub fn registry(&self, scheduler: Scheduler) -> Arc<Registry> {
        Arc::new(Registry::new(self.models.clone(), scheduler))
    }

    /// The scheduler settings `[server]` asks for.
    pub fn scheduler_settings(&self) -> crate::scheduler::Settings {
        let machine = crate::scheduler::Settings::for_this_machine();
        crate::scheduler::Settings {
            memory: self.server.compute_memory.as_u64(),
            max_running: self.server.compute_passes.unwrap_or(machine.max_running).clamp(1, MAX_COMPUTE_PASSES),
            spin: self.server.compute_spin,
        }
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("models/minilm")).unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("p.wasm"), b"\0asm").unwrap();
        dir
    }

    #[test]
    fn smoke_requests_are_checked_when_the_file_is_read() {
        let dir = setup();
        let file = dir.path().join("eir.toml");
        let good = "[plugins.p]\npath = \"p.wasm\"\n[plugins.p.smoke]\n\
                    inputs = [{ name = \"text\", datatype = \"BYTES\", shape = [1], data = [\"hi\"] }]\n";
        let config = Config::parse(&file, good).unwrap();
        assert_eq!(config.plugins["p"].smoke.as_ref().unwrap()["inputs"][0]["name"], "text");
        let bad = "[plugins.p]\npath = \"p.wasm\"\n[plugins.p.smoke]\n\
                   inputs = [{ name = \"x\", datatype = \"FP32\", shape = [2], data = [1.0] }]\n";
        let e = Config::parse(&file, bad).unwrap_err();
        assert!(e.message.contains("smoke request") && e.line == 3, "{e}");
    }

    #[test]
    fn a_full_config_resolves_paths_and_grants() {
        let dir = setup();
        let file = dir.path().join("eir.toml");
        let text = r#"
[models.minilm]
path = "models/minilm"
family = "bert"

[plugins.embed]
path = "p.wasm"
models = ["minilm"]
dirs = ["data::/data:rw"]
env = { LANG = "C" }
reuse = 100
concurrency = 40
limits = { fuel = 1000, timeout = "2s", max_memory = "64MiB" }
"#;
        let config = Config::parse(&file, text).unwrap();
        assert_eq!(config.models["minilm"].path, dir.path().join("models/minilm"));
        let embed = &config.plugins["embed"];
        assert_eq!(embed.path, dir.path().join("p.wasm"));
        assert_eq!(embed.config.reuse, 100);
        assert_eq!((embed.concurrency, embed.config.warm), (40, 40), "as many stay warm as may run");
        assert_eq!(embed.config.limits.fuel, 1000);
        assert_eq!(embed.config.limits.timeout, std::time::Duration::from_secs(2));
        assert_eq!(embed.config.grants.nn.models, vec!["minilm".to_string()]);
        assert_eq!(embed.config.grants.dirs[0].host, dir.path().join("data"));
        assert!(embed.config.grants.dirs[0].writable);
        assert_eq!(embed.config.grants.env, vec![("LANG".to_string(), "C".to_string())]);
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let dir = setup();
        let file = dir.path().join("eir.toml");
        let cases = [
            ("[plugins.x]\npath = \"p.wasm\"\nmodels = [\"ghost\"]\n", 3, "not declared"),
            ("[models.m]\npath = \"nowhere\"\n", 2, "does not exist"),
            ("[plugins.x]\npath = \"p.wasm\"\n\nlimits = { fule = 1 }\n", 4, "fule"),
            ("[plugins.x]\npath = \"p.wasm\"\ndirs = [\"data\"]\n", 3, "HOST::GUEST"),
            ("[plugins.x]\npath = \"missing.wasm\"\n", 2, "not a file"),
            ("[plugins.x\n", 1, ""),
            (
                "[plugins.x]\npath = \"p.wasm\"\ndirs = [\"data::/d:rw\"]\n[tenants.a]\nkeys_sha256 = [\"{a}\"]\nplugins = [\"*\"]\n[tenants.b]\nkeys_sha256 = [\"{b}\"]\nplugins = [\"x\"]\n",
                3,
                "tenants a, b",
            ),
        ];
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        for (text, line, words) in cases {
            let text = text.replace("{a}", &a).replace("{b}", &b);
            let e = Config::parse(&file, &text).unwrap_err();
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.message.contains(words), "{text}: {e}");
            assert!(e.to_string().starts_with(&format!("{}:{line}: ", file.display())), "{e}");
        }
    }

    #[test]
    fn an_optional_plugin_not_built_yet_is_left_out_not_an_error() {
        let dir = setup();
        let file = dir.path().join("eir.toml");
        let text = format!(
            "[plugins.built]\npath = \"p.wasm\"\noptional = true\n[plugins.later]\npath = \"later.wasm\"\noptional = true\n\
             [tenants.a]\nkeys_sha256 = [\"{}\"]\nplugins = [\"later\"]\n",
            "a".repeat(64)
        );
        let config = Config::parse(&file, &text).unwrap();
        assert!(config.plugins.contains_key("built"));
        assert!(!config.plugins.contains_key("later"));
        assert_eq!(config.absent["later"], dir.path().join("later.wasm"));
        // Once built, the same file serves it.
        std::fs::write(dir.path().join("later.wasm"), b"\0asm").unwrap();
        let config = Config::parse(&file, &text).unwrap();
        assert!(config.plugins.contains_key("later") && config.absent.is_empty());
    }
}
