//! The wasi-nn host (`wasi:nn@0.2.0-rc-2024-10-28`) on candle.
//!
//! - [`bindings`]: the WIT bindings, async, with resources mapped to the host types here.
//! - [`tensor`]: tensor validation and conversion to and from candle.
//! - [`backend`]: the [`Model`] trait each family implements, and format detection;
//!   [`backends`] holds one module per family.
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
mod generate;
mod graph;
mod host;
pub(crate) mod kernels;
pub mod legacy;
pub mod meter;
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
    /// Who this call's compute is charged to.
    pub(crate) tenant: Arc<crate::scheduler::Tenant>,
    /// The call's turn at running plugin code: given up while it waits for a forward pass.
    pub(crate) turn: crate::scheduler::TurnSlot,
    /// Cancelled when the call's caller goes away: computes then end at once (queued or
    /// running), so the guest returns soon and its instance stays usable.
    pub(crate) abandoned: CancelToken,
    /// Time spent in model computations (waiting for the pool included) during this call.
    pub(crate) compute_time: std::time::Duration,
    /// Cancels the generations this call started when the call ends, so none outlives it
    /// in a warm instance (each is charged to the call's tenant and holds KV cache).
    pub(crate) generations: Vec<CancelToken>,
    /// Bytes of intermediate values one compute may hold (`max_compute_memory`).
    pub(crate) compute_budget: u64,
    /// The plugin's graphs loaded from bytes, held at once across all its instances (counted
    /// against `load_from_bytes`).
    pub(crate) loaded: Arc<LoadLedger>,
}

/// What a plugin's graphs loaded from bytes hold, across all its instances and calls: each
/// graph reserves its size before it is loaded and gives it back when the guest drops the last
/// handle on it, so the `load_from_bytes` cap bounds what the plugin holds at once however many
/// instances run.
#[derive(Debug, Default)]
pub struct LoadLedger {
    held: std::sync::atomic::AtomicU64,
}

impl LoadLedger {
    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reserves `size` bytes if the total stays within `cap`; else says what it would be.
    pub(crate) fn reserve(self: &Arc<Self>, size: u64, cap: u64) -> Result<LoadCharge, u64> {
        use std::sync::atomic::Ordering;
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(size).filter(|&total| total <= cap)
            })
            .map(|_| LoadCharge { ledger: self.clone(), bytes: size })
            .map_err(|held| held.saturating_add(size))
    }
}

/// Bytes reserved on a [`LoadLedger`], given back when dropped.
#[derive(Debug)]
pub struct LoadCharge {
    ledger: Arc<LoadLedger>,
    bytes: u64,
}

impl Drop for LoadCharge {
    fn drop(&mut self) {
        self.ledger.held.fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

impl NnCtx {
    /// Ties a generation to the current call (see `generations`).
    pub(crate) fn own_generation(&mut self, token: CancelToken) {
        self.generations.retain(|t| !t.is_cancelled());
        self.generations.push(token);
    }

    /// Ends the current call's generations.
    pub(crate) fn end_call(&mut self) {
        for t in self.generations.drain(..) {
            t.cancel();
        }
    }

    /// State for one call that must finish by `deadline`, its compute charged to `tenant`.
    pub fn new(
        registry: Arc<Registry>,
        grants: Arc<NnGrants>,
        deadline: Instant,
        tenant: Arc<crate::scheduler::Tenant>,
    ) -> Self {
        Self {
            tenant,
            turn: Default::default(),
            abandoned: CancelToken::new(),
            registry,
            grants,
            deadline,
            tensor_bytes: 0,
            resources: 0,
            generations: Vec::new(),
            legacy: Default::default(),
            compute_time: std::time::Duration::ZERO,
            compute_budget: backend::DEFAULT_COMPUTE_BUDGET,
            loaded: Arc::default(),
        }
    }

    /// The same state charging bytes-loaded graphs to `ledger` (shared by a plugin's instances).
    pub fn with_load_ledger(mut self, ledger: Arc<LoadLedger>) -> Self {
        self.loaded = ledger;
        self
    }

    /// The same state with each compute limited to `bytes` of intermediate values.
    pub fn with_compute_budget(mut self, bytes: u64) -> Self {
        self.compute_budget = bytes;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_ledger_bounds_what_is_held_at_once_and_gives_back_on_drop() {
        let ledger = Arc::new(LoadLedger::default());
        let a = ledger.reserve(600, 1000).unwrap();
        assert_eq!(ledger.reserve(500, 1000).unwrap_err(), 1100, "over the cap, with the total it would reach");
        let b = ledger.reserve(400, 1000).unwrap();
        assert_eq!(ledger.held(), 1000);
        assert!(ledger.reserve(1, 1000).is_err());
        drop(a);
        assert_eq!(ledger.held(), 400);
        let c = ledger.reserve(600, 1000).unwrap();
        drop((b, c));
        assert_eq!(ledger.held(), 0);
        assert!(ledger.reserve(u64::MAX, u64::MAX).is_ok(), "no overflow at the top");
        assert!(ledger.reserve(1, u64::MAX).is_ok());
    }
}
