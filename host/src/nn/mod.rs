//! The wasi-nn host (`wasi:nn@0.2.0-rc-2024-10-28`) on candle.
//!
//! - [`bindings`]: the WIT bindings, async, with resources mapped to the host types here.
//! - [`tensor`]: tensor validation and conversion to and from candle.
//! - [`backend`]: the [`Model`] trait each family implements, and format detection;
//!   [`backends`] holds one module per family.
//! - [`scheduler`]: the bounded compute pool forward passes run on.
//! - [`meter`]: the memory budget, deadline and cancellation a compute or load runs under.
//! - `core`: grants, caps, budgets and deadlines, once for both ABIs;
//!   [`host`] (the WIT interfaces) and [`legacy`] (the witx ABI `wasi_ephemeral_nn` for
//!   core-module wasip1 guests) are thin adapters over it.
//!
//! Models are loaded once per registry and shared (`Arc`) across instances, plugins and
//! tenants; loading by name needs a grant, loading from bytes a separate one with a size cap.

pub mod backend;
pub mod backends;
pub mod bindings;
mod core;
mod error;
mod graph;
mod host;
pub mod legacy;
pub mod meter;
pub mod scheduler;
pub mod tensor;

use std::sync::Arc;
use std::time::Instant;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

pub use backend::{Model, Target};
pub use error::{NnError, code_name};
pub use graph::{HostContext, HostGraph};
pub use host::{Nn, NnView};
pub use meter::{CancelToken, Meter};
pub use scheduler::ComputePool;

use crate::registry::Registry;

/// The wasi-nn capabilities of a plugin. Nothing is granted by default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NnGrants {
    /// Registry models the plugin may `load-by-name` (`"*"` grants all).
    pub models: Vec<String>,
    /// Whether the plugin may `load` a model from bytes, and up to what total size.
    pub load_from_bytes: Option<ByteSize>,
    /// Most bytes of tensors the plugin may hold in the host at once.
    pub max_tensor_bytes: ByteSize,
    /// Most wasi-nn resources (tensors, graphs, contexts, errors) alive at once.
    pub max_resources: u32,
}

impl Default for NnGrants {
    fn default() -> Self {
        Self { models: Vec::new(), load_from_bytes: None, max_tensor_bytes: ByteSize::mib(256), max_resources: 4096 }
    }
}

impl NnGrants {
    /// Whether `name` may be loaded by name.
    pub fn allows(&self, name: &str) -> bool {
        self.models.iter().any(|m| m == name || m == "*")
    }
}

/// Per-call wasi-nn state: the registry, the plugin's grants and its deadline, and the
/// accounting that keeps a guest from parking unbounded data in the host.
pub struct NnCtx {
    pub(crate) registry: Arc<Registry>,
    pub(crate) grants: Arc<NnGrants>,
    pub(crate) deadline: Instant,
    pub(crate) tensor_bytes: u64,
    pub(crate) resources: u32,
    pub(crate) legacy: legacy::LegacyState,
    /// Time spent in model computations (waiting for the pool included) during this call.
    pub(crate) compute_time: std::time::Duration,
    /// Bytes of intermediate values one compute may hold (`max_compute_memory`).
    pub(crate) compute_budget: u64,
    /// Bytes of models loaded from bytes so far (counted against `load_from_bytes`).
    pub(crate) loaded_bytes: u64,
}

impl NnCtx {
    /// State for one call that must finish by `deadline`.
    pub fn new(registry: Arc<Registry>, grants: Arc<NnGrants>, deadline: Instant) -> Self {
        Self {
            registry,
            grants,
            deadline,
            tensor_bytes: 0,
            resources: 0,
            legacy: Default::default(),
            compute_time: std::time::Duration::ZERO,
            compute_budget: backend::DEFAULT_COMPUTE_BUDGET,
            loaded_bytes: 0,
        }
    }

    /// The same state with each compute limited to `bytes` of intermediate values.
    pub fn with_compute_budget(mut self, bytes: u64) -> Self {
        self.compute_budget = bytes;
        self
    }
}
