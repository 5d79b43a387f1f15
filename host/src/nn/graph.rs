//! The graph and execution-context resources a guest holds.

use std::sync::Arc;

use super::backend::Model;

/// A `wasi:nn/graph.graph` resource: a handle on a shared, loaded model.
#[derive(Clone)]
pub struct HostGraph {
    pub(crate) name: Arc<str>,
    pub(crate) model: Arc<dyn Model>,
    /// How its computes batch.
    pub(crate) policy: crate::scheduler::BatchPolicy,
    /// For a graph loaded from bytes, its reservation on the plugin's ledger: given back when
    /// the last handle (graph or context) goes.
    pub(crate) _charge: Option<Arc<super::LoadCharge>>,
}

/// A `wasi:nn/inference.graph-execution-context` resource. Contexts on tensor models hold no
/// mutable state of their own (models are pure functions of their inputs), so any number may
/// compute on the same graph in parallel; a context on a language model holds its generation.
pub struct HostContext {
    pub(crate) graph: HostGraph,
    pub(crate) session: Option<Box<super::generate::Session>>,
}
