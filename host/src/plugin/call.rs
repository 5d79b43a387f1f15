//! One call into a plugin: a store with fuel, an epoch deadline and a limiter; the call; then
//! every failure classified into one [`CallError`].
//!
//! By default each call gets a fresh instance. A plugin configured with `reuse > 1` keeps
//! instances that finished a call cleanly and hands them the next calls (warm state such as a
//! parsed tokenizer survives); fuel and the deadline are reset per call, memory is not, and an
//! instance that failed in any way is discarded.

use std::future::Future;
use std::time::{Duration, Instant};

use wasmtime::{Store, UpdateDeadline};

use super::bindings::Pipeline;
use super::error::{CallError, CallerGone, Classifier, DeadlinePassed};
use super::store::StoreState;
use super::{Plugin, PluginKind, Pre};
use crate::grants::OutputTail;
use crate::limits::StoreLimiter;
use crate::nn::{CancelToken, NnCtx};
use crate::scheduler::on_cpu;
use crate::tensor::{self, Metadata, Request, Response};

/// What one call consumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Fuel burnt.
    pub fuel_used: u64,
    /// Linear memory the instance held at the end (its high-water mark: memory never shrinks).
    pub memory_bytes: u64,
    /// Wall-clock time of the call, instantiation included.
    pub elapsed: Duration,
    /// Part of `elapsed` spent in wasi-nn computations.
    pub compute: Duration,
}

/// A store, and the pipeline instance in it once instantiated.
pub(super) struct Session {
    store: Store<StoreState>,
    stderr: Option<OutputTail>,
    pipeline: Option<Pipeline>,
    calls: u32,
    /// Set when the current call stopped because its caller went away at a point where the
    /// instance is intact (before running, or between instantiation and the call).
    clean_stop: bool,
    /// While idle: its slot of the engine's idle budget, and since when it waits.
    idle: Option<(tokio::sync::OwnedSemaphorePermit, Instant)>,
}

/// How long an idle instance is kept for reuse; older ones are dropped (and free their slot).
const IDLE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl Plugin {
    /// Handles one request (pipeline plugins).
    pub async fn handle(&self, request: &Request) -> Result<Response, CallError> {
        self.handle_with_stats(request).await.0
    }

    /// [`Plugin::handle`], also reporting what the call consumed.
    pub async fn handle_with_stats(&self, request: &Request) -> (Result<Response, CallError>, CallStats) {
        self.handle_abandonable(request, &CancelToken::new()).await
    }

    /// [`Plugin::handle_with_stats`] for a caller that may go away (a client hanging up). It
    /// cancels `abandoned` rather than dropping the call: the call then stops before it starts
    /// more plugin code, its computes end at once (the guest sees a `timeout` error), and the
    /// guest gets a short grace (100 ms) to return. An instance that returns stays warm for
    /// the next call; dropping a call mid-run would discard it, and each resend would pay for
    /// a fresh one.
    pub async fn handle_abandonable(
        &self,
        request: &Request,
        abandoned: &CancelToken,
    ) -> (Result<Response, CallError>, CallStats) {
        self.handle_call(request, abandoned, None).await
    }

    /// [`Plugin::handle_abandonable`] for a caller that reads the answer as a stream: the
    /// parts the plugin sends through `eir:plugin/reply` go to `reply` (its receiver) as they
    /// are sent, together at most the plugin's response size limit.
    pub async fn handle_streaming(
        &self,
        request: &Request,
        abandoned: &CancelToken,
        reply: super::ReplySink,
    ) -> (Result<Response, CallError>, CallStats) {
        let reply = reply.limit(self.config.limits.max_response.as_u64());
        self.handle_call(request, abandoned, Some(reply)).await
    }

    async fn handle_call(
        &self,
        request: &Request,
        abandoned: &CancelToken,
        reply: Option<super::ReplySink>,
    ) -> (Result<Response, CallError>, CallStats) {
        let Pre::Pipeline(pre) = &self.pre else {
            return (Err(self.wrong_kind()), CallStats::default());
        };
        let limits = &self.config.limits;
        let size = match tensor::validate_tensors(&request.inputs) {
            Ok(size) => size,
            Err(msg) => return (Err(CallError::InvalidRequest(msg)), CallStats::default()),
        };
        if size > limits.max_request.as_u64() {
            let err =
                CallError::RequestTooLarge { plugin: self.name.to_string(), size, limit: limits.max_request.as_u64() };
            return (Err(err), CallStats::default());
        }
        let mut session = match self.checkout() {
            Ok(session) => session,
            Err(err) => return (Err(err), CallStats::default()),
        };
        session.store.data_mut().reply = reply;
        let (result, stats) = self
            .run(&mut session, abandoned, async |s: &mut Session| {
                let Session { store, pipeline, clean_stop, .. } = s;
                if pipeline.is_none() {
                    *pipeline = Some(pre.instantiate_async(&mut *store).await?);
                }
                // A fresh instance is kept for the next call even when this one is no longer
                // wanted.
                if store.data().abandoned() {
                    *clean_stop = true;
                    return Err(CallerGone.into());
                }
                let pipeline = pipeline.as_ref().ok_or_else(|| wasmtime::format_err!("instance missing"))?;
                pipeline.eir_plugin_handler().call_handle(&mut *store, request).await
            })
            .await;
        // Only an instance that returned normally (a typed plugin error included), or that
        // stopped between calls because its caller went away, is reused.
        if result.is_ok() || session.clean_stop {
            self.checkin(session);
        }
        let result = result.and_then(|answer| match answer {
            Ok(response) => self.check_response(request, response),
            Err(e) => Err(CallError::Plugin { plugin: self.name.to_string(), code: e.code, message: e.message }),
        });
        (result, stats)
    }

    /// Asks a pipeline plugin to describe its inputs and outputs.
    pub async fn metadata(&self) -> Result<Metadata, CallError> {
        let Pre::Pipeline(pre) = &self.pre else {
            return Err(self.wrong_kind());
        };
        let mut session = self.new_session()?;
        self.run(&mut session, &CancelToken::new(), async |s: &mut Session| {
            let instance = pre.instantiate_async(&mut s.store).await?;
            instance.eir_plugin_handler().call_describe(&mut s.store).await
        })
        .await
        .0
    }

    /// Runs a command component to completion and returns its exit code. Its arguments,
    /// environment and stdio come from the plugin's grants.
    pub async fn run_command(&self) -> Result<i32, CallError> {
        let mut session = self.new_session()?;
        let (result, _) = match &self.pre {
            Pre::Command(pre) => {
                self.run(&mut session, &CancelToken::new(), async |s: &mut Session| {
                    let command = pre.instantiate_async(&mut s.store).await?;
                    command.wasi_cli_run().call_run(&mut s.store).await
                })
                .await
            }
            Pre::Module(pre) => {
                self.run(&mut session, &CancelToken::new(), async |s: &mut Session| {
                    let instance = pre.instantiate_async(&mut s.store).await?;
                    let start = instance.get_typed_func::<(), ()>(&mut s.store, "_start")?;
                    start.call_async(&mut s.store, ()).await.map(Ok)
                })
                .await
            }
            Pre::Pipeline(_) => return Err(self.wrong_kind()),
        };
        match result {
            Ok(Ok(())) => Ok(0),
            Ok(Err(())) => Ok(1),
            Err(CallError::Exited { code, .. }) => Ok(code),
            Err(e) => Err(e),
        }
    }

    fn wrong_kind(&self) -> CallError {
        let what = match self.kind {
            PluginKind::Pipeline => "a pipeline plugin; call it with inputs, not as a command",
            PluginKind::Command => "a command; run it with arguments, not inputs",
        };
        CallError::InvalidRequest(format!("plugin `{}` is {what}", self.name))
    }

    fn internal(&self, message: impl Into<String>) -> CallError {
        CallError::Internal { plugin: self.name.to_string(), message: message.into() }
    }

    /// A store with the plugin's grants and limiter, not yet instantiated.
    fn new_session(&self) -> Result<Session, CallError> {
        let limits = &self.config.limits;
        let grants = &self.config.grants;
        let deadline = Instant::now() + limits.timeout;
        let nn = NnCtx::new(self.registry.clone(), self.nn_grants.clone(), deadline, self.tenant.clone())
            .with_compute_budget(limits.max_compute_memory.as_u64())
            .with_load_ledger(self.loaded.clone());
        let (state, stderr) = if let Pre::Module(_) = self.pre {
            let (p1, stderr) = grants.wasi_p1_ctx(&self.name).map_err(|e| self.internal(e.to_string()))?;
            let wasi = wasmtime_wasi::WasiCtxBuilder::new().build();
            let mut state = StoreState::new(self.name.clone(), wasi, nn, StoreLimiter::new(limits));
            state.set_p1(p1);
            (state, stderr)
        } else {
            let (wasi, stderr) = grants.wasi_ctx(&self.name).map_err(|e| self.internal(e.to_string()))?;
            (StoreState::new(self.name.clone(), wasi, nn, StoreLimiter::new(limits)), stderr)
        };
        let mut store = Store::new(self.engine.wasmtime(), state);
        store.limiter(|s| &mut s.limiter);
        // Every epoch tick: trap once past this call's deadline, else yield so other calls on
        // this executor thread make progress; when another call of the same tenant waits for a
        // turn at running plugin code, hand this call's turn on and queue for it again.
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().deadline() {
                return Err(DeadlinePassed.into());
            }
            if !ctx.data().turn_contended() {
                return Ok(UpdateDeadline::Yield(1));
            }
            let (tenant, slot) = ctx.data().turns();
            if let Some(turn) = slot.lock().ok().and_then(|mut t| t.take()) {
                return Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(async move {
                        drop(turn);
                        let next = tenant.turn().await;
                        if let Ok(mut t) = slot.lock() {
                            *t = next;
                        }
                    }),
                ));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        Ok(Session { store, stderr, pipeline: None, calls: 0, clean_stop: false, idle: None })
    }

    /// A warm instance if one is idle, else a new session.
    fn checkout(&self) -> Result<Session, CallError> {
        if self.config.reuse > 1
            && let Some(mut session) = self.idle.lock().ok().and_then(|mut idle| {
                expire(&mut idle);
                idle.pop()
            })
        {
            session.idle = None; // gives its idle slot back
            return Ok(session);
        }
        self.new_session()
    }

    /// Keeps a healthy instance for later calls, within the reuse count, this plugin's cap and
    /// the engine's idle budget; otherwise it is dropped here.
    fn checkin(&self, mut session: Session) {
        if session.calls >= self.config.reuse || session.pipeline.is_none() {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else { return };
        expire(&mut idle);
        if idle.len() < self.config.warm
            && let Some(slot) = self.engine.idle_slot()
        {
            session.idle = Some((slot, Instant::now()));
            idle.push(session);
        }
    }

    /// Runs `f` on `session` under the plugin's limits, with fuel and deadline reset.
    async fn run<T>(
        &self,
        session: &mut Session,
        abandoned: &CancelToken,
        f: impl AsyncFnOnce(&mut Session) -> wasmtime::Result<T>,
    ) -> (Result<T, CallError>, CallStats) {
        let started = Instant::now();
        let limits = &self.config.limits;
        let deadline = started + limits.timeout;
        // Epoch deadlines and yields need the ticker running while this store runs wasm.
        let _ticking = self.engine.ticking();
        session.calls += 1;
        session.clean_stop = false;
        session.store.data_mut().begin_call(deadline, abandoned.clone());
        if let Some(tail) = &session.stderr {
            tail.clear();
        }
        if let Err(e) = session.store.set_fuel(limits.fuel) {
            return (Err(self.internal(format!("{e:#}"))), CallStats::default());
        }
        session.store.set_epoch_deadline(1);

        // The timeout also covers time the guest spends awaiting the host, where no epoch
        // check can run, and the wait for the tenant's turn at running plugin code.
        // The CPU its polls take (instantiation, WebAssembly, inline host calls) is charged to
        // the tenant, whether the call finishes, fails, or its caller went away.
        let (tenant, slot) = session.store.data().turns();
        let (outcome, cpu) = on_cpu(bounded(deadline, async {
            let turn = tokio::select! {
                turn = tenant.turn() => turn,
                () = abandoned.cancelled() => {
                    session.clean_stop = true;
                    return Err(CallerGone.into());
                }
            };
            if let Ok(mut t) = slot.lock() {
                *t = turn;
            }
            // Past the grace the call is dropped at its next yield: plugin code yields at every
            // epoch tick, a guest waiting on the host at once.
            tokio::select! {
                outcome = f(&mut *session) => outcome,
                () = async {
                    abandoned.cancelled().await;
                    // A guest normally returns well within the grace (its computes end at
                    // once) and keeps its warm instance; one that runs on is dropped at its
                    // next yield (the epoch ticks make plugin code yield).
                    tokio::time::sleep(limits.abandon_grace).await;
                } => Err(CallerGone.into()),
            }
        }))
        .await;

        // Generations it started end with it; its reply stream closes.
        session.store.data_mut().end_call();
        // The turn goes back whether the call finished, failed or ran out of time.
        drop(slot.lock().ok().and_then(|mut t| t.take()));
        self.registry.scheduler().charge_plugin(&tenant, cpu.as_secs_f64());
        let fuel_left = session.store.get_fuel().unwrap_or(0);
        let state = session.store.data();
        let stats = CallStats {
            fuel_used: limits.fuel.saturating_sub(fuel_left),
            memory_bytes: state.limiter.memory_in_use(),
            elapsed: started.elapsed(),
            compute: state.compute_time(),
        };
        let classifier = Classifier {
            plugin: &self.name,
            fuel: limits.fuel,
            timeout: limits.timeout,
            limiter: &state.limiter,
            stderr: session.stderr.as_ref(),
        };
        let result = match outcome {
            None => Err(CallError::DeadlineExceeded { plugin: self.name.to_string(), timeout: limits.timeout }),
            Some(Ok(value)) => Ok(value),
            Some(Err(err)) => Err(classifier.classify(err)),
        };
        (result, stats)
    }

    fn check_response(&self, request: &Request, mut response: Response) -> Result<Response, CallError> {
        let invalid = |message: String| CallError::InvalidOutput { plugin: self.name.to_string(), message };
        let size = tensor::validate_tensors(&response.outputs).map_err(invalid)?;
        let limit = self.config.limits.max_response.as_u64();
        if size > limit {
            return Err(CallError::ResponseTooLarge { plugin: self.name.to_string(), size, limit });
        }
        if !request.outputs.is_empty() {
            // Exactly the outputs asked for, in the order asked.
            let mut asked = Vec::with_capacity(request.outputs.len());
            for wanted in &request.outputs {
                let Some(i) = response.outputs.iter().position(|t| &t.name == wanted) else {
                    return Err(CallError::Plugin {
                        plugin: self.name.to_string(),
                        code: tensor::ErrorCode::NotFound,
                        message: format!("the plugin produced no output named `{wanted}` (or it was asked for twice)"),
                    });
                };
                asked.push(response.outputs.swap_remove(i));
            }
            response.outputs = asked;
        }
        Ok(response)
    }
}

/// Awaits `fut` until `deadline`; `None` if the deadline came first.
async fn bounded<T>(deadline: Instant, fut: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout_at(deadline.into(), fut).await.ok()
}

/// Drops idle instances older than [`IDLE_TTL`] (oldest first in the list).
fn expire(idle: &mut Vec<Session>) {
    idle.retain(|s| s.idle.as_ref().is_none_or(|(_, since)| since.elapsed() < IDLE_TTL));
}
