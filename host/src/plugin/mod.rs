//! Plugins: loading a component, telling a pipeline plugin from a WASI command, and calling it
//! under its [`Limits`] and [`Grants`].
//!
//! Every call gets a fresh instance in a fresh store (cheap with the pooling allocator and a
//! pre-instantiated component), so a trap, a limit violation or leftover state never reaches
//! the next call, and one tenant's request never sees another's memory.

pub mod bindings;
mod call;
mod error;
mod linker;
mod reply;
pub(crate) mod store;

use std::sync::{Arc, Mutex};

use wasmtime::component::{Component, InstancePre};
use wasmtime_wasi::p2::bindings::CommandPre;

pub use call::CallStats;
pub use error::{CallError, ErrorKind};
pub use linker::Linkers;
pub use reply::{ReplySink, channel as reply_channel};
pub use store::StoreState;

use crate::engine::{Artifact, Engine, LoadError};
use crate::grants::{DirGrant, GrantError, Grants};
use crate::limits::Limits;
use crate::nn::NnGrants;
use crate::registry::Registry;

/// The interface a pipeline plugin exports (any 0.1.x version).
pub const HANDLER_INTERFACE: &str = "eir:plugin/handler@0.1";
/// The interface a WASI command exports (any 0.2.x version).
pub const RUN_INTERFACE: &str = "wasi:cli/run@0.2";
/// Prefix of the wasi-nn interfaces.
pub const NN_PREFIX: &str = "wasi:nn/";
/// The import module of the legacy witx wasi-nn ABI.
pub const LEGACY_NN_MODULE: &str = "wasi_ephemeral_nn::";

/// What a component is, judged by its exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginKind {
    /// Exports `eir:plugin/handler`: answers requests.
    Pipeline,
    /// Exports `wasi:cli/run`: a program with args, stdio and an exit code.
    Command,
}

impl PluginKind {
    /// "pipeline" or "command".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pipeline => "pipeline",
            Self::Command => "command",
        }
    }
}

/// Most idle instances a plugin keeps for reuse, unless configured otherwise
/// ([`PluginConfig::warm`]).
const MAX_IDLE_INSTANCES: usize = 16;

/// How a plugin runs: its limits, what it may touch, and how long its instances live.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginConfig {
    /// Limits of each call.
    pub limits: Limits,
    /// Capabilities.
    pub grants: Grants,
    /// Calls one instance may serve before it is discarded. 1 (the default) gives every call
    /// a fresh instance; more keeps warm state (a parsed tokenizer, say) between calls of the
    /// same plugin. An instance that fails in any way is never reused.
    pub reuse: u32,
    /// Most idle instances kept warm for reuse (with `reuse > 1`). A server sets it to the
    /// plugin's concurrency: with fewer, a batch of calls that end together (one batched
    /// forward pass) drops the surplus, and the next calls pay for fresh instances.
    pub warm: usize,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self { limits: Limits::default(), grants: Grants::default(), reuse: 1, warm: MAX_IDLE_INSTANCES }
    }
}

/// The imports and exports of a component, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    /// Imported interface or function names.
    pub imports: Vec<String>,
    /// Exported interface or function names.
    pub exports: Vec<String>,
}

impl Interface {
    /// Reads the names from a compiled component.
    pub fn of(component: &Component, engine: &wasmtime::Engine) -> Self {
        let ty = component.component_type();
        Self {
            imports: ty.imports(engine).map(|(name, _)| name.to_string()).collect(),
            exports: ty.exports(engine).map(|(name, _)| name.to_string()).collect(),
        }
    }

    /// The kind these exports make, if any (a core module exporting `_start` is a command).
    pub fn kind(&self) -> Option<PluginKind> {
        if self.exports.iter().any(|e| e.starts_with(HANDLER_INTERFACE)) {
            Some(PluginKind::Pipeline)
        } else if self.exports.iter().any(|e| e.starts_with(RUN_INTERFACE) || e == "_start") {
            Some(PluginKind::Command)
        } else {
            None
        }
    }

    /// Reads the names from a core module (`module::name` for imports).
    pub fn of_module(module: &wasmtime::Module) -> Self {
        Self {
            imports: module.imports().map(|i| format!("{}::{}", i.module(), i.name())).collect(),
            exports: module.exports().map(|e| e.name().to_string()).collect(),
        }
    }

    /// Whether the component imports any wasi-nn interface (or a module the witx ABI).
    pub fn imports_nn(&self) -> bool {
        self.imports.iter().any(|i| i.starts_with(NN_PREFIX) || i.starts_with(LEGACY_NN_MODULE))
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadPluginError {
    /// Reading or compiling failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A grant cannot be honoured.
    #[error(transparent)]
    Grant(#[from] GrantError),
    /// The component exports neither entry point.
    #[error(
        "{name} is neither a pipeline plugin (exporting {HANDLER_INTERFACE}.x) nor a command \
         (exporting {RUN_INTERFACE}.x, or `_start` for a core module); it exports: {exports}"
    )]
    NotAPlugin {
        /// The plugin.
        name: String,
        /// What it does export.
        exports: String,
    },
    /// A model granted to the plugin is not in the registry.
    #[error("{name} is granted model `{model}`, which is not registered (declare it, e.g. --model {model}=PATH)")]
    UnknownModel {
        /// The plugin.
        name: String,
        /// The model.
        model: String,
    },
    /// An import is not provided by the host.
    #[error("{name} cannot be linked: {message}")]
    Link {
        /// The plugin.
        name: String,
        /// wasmtime's explanation (names the missing import).
        message: String,
    },
    /// A limit is beyond what the engine was configured for.
    #[error("{name}: {message}")]
    Limits {
        /// The plugin.
        name: String,
        /// What is out of range.
        message: String,
    },
}

/// Pre-instantiated entry points.
enum Pre {
    Pipeline(bindings::PipelinePre<StoreState>),
    Command(CommandPre<StoreState>),
    /// A `wasm32-wasip1` program: WASI preview 1, `_start`.
    Module(wasmtime::InstancePre<StoreState>),
}

/// A loaded plugin, ready to be called any number of times, concurrently.
pub struct Plugin {
    name: Arc<str>,
    kind: PluginKind,
    interface: Interface,
    pre: Pre,
    config: PluginConfig,
    engine: Engine,
    registry: Arc<Registry>,
    nn_grants: Arc<NnGrants>,
    /// Graphs its instances loaded from bytes (bounded by the `load_from_bytes` grant).
    loaded: Arc<crate::nn::LoadLedger>,
    /// Who its compute is charged to (the gateway builds one plugin per tenant).
    tenant: Arc<crate::scheduler::Tenant>,
    idle: Mutex<Vec<call::Session>>,
}

impl Plugin {
    /// Links and pre-instantiates `artifact` as plugin `name`.
    pub fn new(
        engine: &Engine,
        linkers: &Linkers,
        name: &str,
        registry: &Arc<Registry>,
        artifact: Artifact,
        mut config: PluginConfig,
    ) -> Result<Self, LoadPluginError> {
        // A granted model's files (a tokenizer, labels) come with it: read-only, at /models/NAME.
        for model in &config.grants.nn.models {
            if let Some(decl) = registry.decl(model)
                && decl.path.is_dir()
            {
                let guest = format!("/models/{model}");
                if !config.grants.dirs.iter().any(|d| d.guest == guest) {
                    config.grants.dirs.push(DirGrant { host: decl.path.clone(), guest, writable: false });
                }
            }
        }
        config.grants.check()?;
        let pool_max = engine.config().max_memory_per_instance;
        if engine.config().pooling && config.limits.max_memory.as_u64() > pool_max {
            return Err(LoadPluginError::Limits {
                name: name.to_string(),
                message: format!(
                    "max_memory {} is above the engine's per-instance maximum of {}",
                    config.limits.max_memory,
                    bytesize::ByteSize(pool_max)
                ),
            });
        }
        let interface = match &artifact {
            Artifact::Component(c) => Interface::of(c, engine.wasmtime()),
            Artifact::Module(m) => Interface::of_module(m),
        };
        let nn = &config.grants.nn;
        if let Some(model) = nn.models.iter().find(|m| *m != "*" && registry.decl(m).is_none()) {
            return Err(LoadPluginError::UnknownModel { name: name.to_string(), model: model.clone() });
        }
        if interface.imports_nn() && nn.models.is_empty() && nn.load_from_bytes.is_none() {
            tracing::warn!(plugin = name, "imports wasi-nn but is granted no model; its loads will be refused");
        }
        let kind = interface.kind().ok_or_else(|| LoadPluginError::NotAPlugin {
            name: name.to_string(),
            exports: if interface.exports.is_empty() { "nothing".into() } else { interface.exports.join(", ") },
        })?;
        let link_err = |e: wasmtime::Error| LoadPluginError::Link { name: name.to_string(), message: format!("{e:#}") };
        let pre = match artifact {
            Artifact::Module(module) => Pre::Module(linkers.module.instantiate_pre(&module).map_err(link_err)?),
            Artifact::Component(component) => {
                let instance_pre: InstancePre<StoreState> =
                    linkers.component.instantiate_pre(&component).map_err(link_err)?;
                match kind {
                    PluginKind::Pipeline => Pre::Pipeline(bindings::PipelinePre::new(instance_pre).map_err(link_err)?),
                    PluginKind::Command => Pre::Command(CommandPre::new(instance_pre).map_err(link_err)?),
                }
            }
        };
        tracing::debug!(plugin = name, kind = kind.as_str(), "plugin ready");
        Ok(Self {
            name: name.into(),
            kind,
            interface,
            pre,
            nn_grants: Arc::new(config.grants.nn.clone()),
            loaded: Arc::default(),
            tenant: registry.scheduler().tenant(crate::scheduler::LOCAL),
            config,
            engine: engine.clone(),
            registry: registry.clone(),
            idle: Mutex::default(),
        })
    }

    /// The same plugin charging its compute to `tenant` (by default the local tenant).
    pub fn with_tenant(mut self, tenant: Arc<crate::scheduler::Tenant>) -> Self {
        self.tenant = tenant;
        self
    }

    /// The tenant its compute is charged to.
    pub fn tenant(&self) -> &Arc<crate::scheduler::Tenant> {
        &self.tenant
    }

    /// The plugin's name (used in logs and errors).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes of graphs its instances loaded from bytes and still hold.
    pub fn loaded_bytes(&self) -> u64 {
        self.loaded.held()
    }

    /// Pipeline plugin or command.
    pub fn kind(&self) -> PluginKind {
        self.kind
    }

    /// The component's imports and exports.
    pub fn interface(&self) -> &Interface {
        &self.interface
    }

    /// Idle instances kept warm for the next calls.
    pub fn warm_instances(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }

    /// Its limits and grants.
    pub fn config(&self) -> &PluginConfig {
        &self.config
    }
}
