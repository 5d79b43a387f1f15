//! The one wasi-nn core both ABIs adapt: grants, byte caps, the load and compute budgets,
//! deadlines and cancellation live here, so the WIT bindings ([`super::host`]) and the witx
//! bindings ([`super::legacy`]) only translate handles, memory and error codes.

use std::sync::Arc;

use super::NnCtx;
use super::backend::{self, Named, Source, Target, load_budget};
use super::error::NnError;
use super::graph::HostGraph;
use super::meter::{CancelToken, Meter};
use crate::limits::HostLimitExceeded;
use crate::scheduler::Job;

/// How a guest says its model bytes are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// Let the host tell from the bytes.
    Autodetect,
    /// One ONNX `ModelProto`.
    Onnx,
    /// GGML/GGUF.
    Ggml,
    /// Anything else the spec names (OpenVINO, TensorFlow, ...).
    Other(&'static str),
}

impl NnCtx {
    /// Checks, before the guest's bytes are copied, that a model of `size` bytes may be loaded
    /// from bytes: the grant exists and the plugin's graphs stay within it.
    pub(crate) fn check_load_size(&self, size: u64) -> Result<(), NnError> {
        self.reserve_load(size).map(drop)
    }

    fn reserve_load(&self, size: u64) -> Result<super::LoadCharge, NnError> {
        let Some(cap) = self.grants.load_from_bytes else {
            return Err(NnError::security(
                "this plugin may not load models from bytes (grant `load_from_bytes`); use load-by-name",
            ));
        };
        self.loaded.reserve(size, cap.as_u64()).map_err(|total| {
            NnError::too_large(format!(
                "loading {size} more bytes of models would bring this plugin to {total}, over its cap of {cap} \
                 (the cap counts every graph its instances hold that was loaded from bytes)"
            ))
        })
    }

    /// Loads a model from the guest's buffers on the compute pool, under the load budget for
    /// its size and the call's deadline; the bytes count against the plugin's cap until the
    /// graph is dropped.
    pub(crate) async fn load_bytes(
        &mut self,
        parts: Vec<Vec<u8>>,
        encoding: Encoding,
        target: Target,
    ) -> Result<HostGraph, NnError> {
        let size: u64 = parts.iter().map(|b| b.len() as u64).sum();
        let charge = self.reserve_load(size)?;
        match encoding {
            Encoding::Autodetect => {}
            Encoding::Onnx => {
                if parts.len() != 1 || backend::sniff_file(&parts[0]) != "onnx" {
                    return Err(NnError::invalid_encoding("an ONNX graph is one buffer holding a ModelProto"));
                }
            }
            Encoding::Ggml => {
                return Err(NnError::unsupported(
                    "GGUF language models are loaded by name from the model registry (load-by-name), not from bytes",
                ));
            }
            Encoding::Other(name) => return Err(NnError::unsupported(format!("EIR has no {name} backend"))),
        }
        let token = CancelToken::new();
        let meter = Meter::for_load(load_budget(size), token.clone(), Some(self.deadline));
        let job = self
            .registry
            .scheduler()
            .loads()
            .run(&token, move || backend::load_with(Source::Bytes(&parts), target, &meter));
        let model = match tokio::time::timeout_at(self.deadline.into(), job).await {
            Ok(result) => result?,
            Err(_) => return Err(NnError::timeout("the deadline passed while loading the model")),
        };
        Ok(HostGraph { name: "<bytes>".into(), model, policy: Default::default(), _charge: Some(Arc::new(charge)) })
    }

    /// A registry model by name, if granted, waiting at most until the call's deadline.
    pub(crate) async fn load_by_name(&mut self, name: &str) -> Result<HostGraph, NnError> {
        if !self.grants.allows(name) {
            return Err(NnError::security(format!("model `{name}` is not granted to this plugin")));
        }
        let registry = self.registry.clone();
        match tokio::time::timeout_at(self.deadline.into(), registry.get(name)).await {
            Ok(model) => Ok(HostGraph {
                name: Arc::from(name),
                model: model?,
                policy: self.registry.batch_policy(name),
                _charge: None,
            }),
            Err(_) => Err(NnError::timeout(format!("the deadline passed while loading model `{name}`"))),
        }
    }

    /// One forward pass of `graph` through the scheduler (batched with other callers' where
    /// the model allows), charged to this call's tenant, under the call's compute budget and
    /// deadline. When the deadline passes (or the guest's call is dropped), the job is
    /// cancelled: queued, it never runs; running, its rows stop at the next layer or operator.
    pub(crate) async fn compute(&mut self, graph: &HostGraph, inputs: Named) -> Result<Named, NnError> {
        let gone = || NnError::timeout(format!("the caller went away; `{}` was not computed", graph.name));
        if self.abandoned.is_cancelled() {
            return Err(gone());
        }
        let job = self.registry.scheduler().submit(Job {
            model: graph.model.clone(),
            name: graph.name.clone(),
            policy: graph.policy,
            inputs,
            tenant: self.tenant.clone(),
            deadline: Some(self.deadline),
            budget: self.compute_budget,
        });
        let started = std::time::Instant::now();
        let abandoned = self.abandoned.clone();
        let outcome = crate::scheduler::without_turn(&self.tenant, &self.turn, async {
            tokio::select! {
                outcome = tokio::time::timeout_at(self.deadline.into(), job) => Some(outcome),
                () = abandoned.cancelled() => None, // drops (so cancels) the job
            }
        })
        .await;
        let outputs = match outcome {
            None => return Err(gone()),
            Some(Ok(outputs)) => outputs?,
            Some(Err(_)) => {
                return Err(NnError::timeout(format!("the deadline passed while `{}` was computing", graph.name)));
            }
        };
        self.compute_time += started.elapsed();
        tracing::debug!(model = %graph.name, elapsed = ?started.elapsed(), "compute");
        Ok(outputs)
    }

    /// Accounts for `bytes` more tensor data held in the host for the guest.
    pub(crate) fn hold_tensor_bytes(&mut self, bytes: u64) -> Result<(), HostLimitExceeded> {
        let limit = self.grants.max_tensor_bytes.as_u64();
        let requested = self.tensor_bytes.saturating_add(bytes);
        if requested > limit {
            return Err(HostLimitExceeded { what: "wasi-nn tensor bytes held in the host", requested, limit });
        }
        self.tensor_bytes = requested;
        Ok(())
    }

    /// Gives back what [`hold_tensor_bytes`](Self::hold_tensor_bytes) accounted for.
    pub(crate) fn release_tensor_bytes(&mut self, bytes: u64) {
        self.tensor_bytes = self.tensor_bytes.saturating_sub(bytes);
    }
}
