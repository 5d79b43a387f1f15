//! The per-call state behind a wasmtime `Store`: WASI context, resource table, limiter, and
//! the host side of EIR's own imports.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::limits::StoreLimiter;
use crate::nn::{CancelToken, NnCtx, NnView};

use super::bindings::log;

/// Longest log record a plugin may write; longer ones are cut, so a plugin cannot make the
/// host buffer unbounded text.
const MAX_LOG_RECORD: usize = 8 * 1024;

/// The data of one plugin call's store.
pub struct StoreState {
    pub(crate) plugin: Arc<str>,
    pub(crate) limiter: StoreLimiter,
    deadline: Instant,
    nn: NnCtx,
    wasi: WasiCtx,
    p1: Option<WasiP1Ctx>,
    http: WasiHttpCtx,
    http_hooks: DenyOutgoingHttp,
    table: ResourceTable,
    /// Where the current call streams its answer, when its caller reads a stream.
    pub(crate) reply: Option<super::ReplySink>,
}

impl StoreState {
    pub(crate) fn new(plugin: Arc<str>, wasi: WasiCtx, nn: NnCtx, limiter: StoreLimiter) -> Self {
        Self {
            plugin,
            limiter,
            deadline: nn.deadline,
            nn,
            wasi,
            p1: None,
            http: WasiHttpCtx::new(),
            http_hooks: DenyOutgoingHttp,
            table: ResourceTable::new(),
            reply: None,
        }
    }
}

impl StoreState {
    /// Starts a call that must end by `deadline`, whose caller cancels `abandoned` if it goes
    /// away.
    pub(crate) fn begin_call(&mut self, deadline: Instant, abandoned: CancelToken) {
        self.deadline = deadline;
        self.nn.deadline = deadline;
        self.nn.abandoned = abandoned;
        self.nn.compute_time = std::time::Duration::ZERO;
    }

    /// Ends what the call started that must not outlive it (its generations) and closes
    /// its reply stream.
    pub(crate) fn end_call(&mut self) {
        self.nn.end_call();
        self.reply = None;
    }

    /// Cancelled when the current call's caller goes away.
    pub(crate) fn abandoned_token(&self) -> CancelToken {
        self.nn.abandoned.clone()
    }

    /// Whether the current call's caller went away.
    pub(crate) fn abandoned(&self) -> bool {
        self.nn.abandoned.is_cancelled()
    }

    /// Time the current call spent in model computations.
    pub(crate) fn compute_time(&self) -> std::time::Duration {
        self.nn.compute_time
    }

    /// The tenant this store's calls are charged to, and the slot of the current call's turn.
    pub(crate) fn turns(&self) -> (std::sync::Arc<crate::scheduler::Tenant>, crate::scheduler::TurnSlot) {
        (self.nn.tenant.clone(), self.nn.turn.clone())
    }

    /// Whether another call of this store's tenant waits for a turn (checked every epoch tick,
    /// so without touching reference counts).
    pub(crate) fn turn_contended(&self) -> bool {
        self.nn.tenant.contended()
    }

    /// When the current call must end.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Makes this a core module's store: WASI preview 1 with this context.
    pub(crate) fn set_p1(&mut self, ctx: WasiP1Ctx) {
        self.p1 = Some(ctx);
    }

    /// The WASI preview 1 context (core modules); an empty one if none was set, which only a
    /// component store could meet, and components never call preview 1.
    pub(crate) fn p1(&mut self) -> &mut WasiP1Ctx {
        self.p1.get_or_insert_with(|| wasmtime_wasi::WasiCtxBuilder::new().build_p1())
    }

    /// The wasi-nn state (the witx ABI works on it directly).
    pub(crate) fn nn_mut(&mut self) -> &mut NnCtx {
        &mut self.nn
    }

    /// The generation interface's view of this store: the call's wasi-nn state (grants,
    /// registry, tenant, deadline) and the resource table.
    pub(crate) fn llm_view(&mut self) -> (&mut NnCtx, &mut wasmtime::component::ResourceTable) {
        (&mut self.nn, &mut self.table)
    }

    /// The wasi-nn host's view of this store.
    pub(crate) fn nn_view(&mut self) -> NnView<'_> {
        NnView { ctx: &mut self.nn, table: &mut self.table }
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for StoreState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.http_hooks }
    }
}

/// `wasi:http` types are linked so that guests importing them load; sending is denied.
struct DenyOutgoingHttp;

impl WasiHttpHooks for DenyOutgoingHttp {
    fn send_request(
        &mut self,
        _request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<wasmtime_wasi_http::WasiBody>,
                    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                )>,
            > + Send,
    > {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

impl log::Host for StoreState {
    async fn enabled(&mut self, level: log::Level) -> wasmtime::Result<bool> {
        Ok(match level {
            log::Level::Trace => tracing::enabled!(target: "eir::plugin", tracing::Level::TRACE),
            log::Level::Debug => tracing::enabled!(target: "eir::plugin", tracing::Level::DEBUG),
            log::Level::Info => tracing::enabled!(target: "eir::plugin", tracing::Level::INFO),
            log::Level::Warn => tracing::enabled!(target: "eir::plugin", tracing::Level::WARN),
            log::Level::Error => tracing::enabled!(target: "eir::plugin", tracing::Level::ERROR),
        })
    }

    async fn log(&mut self, level: log::Level, mut message: String) -> wasmtime::Result<()> {
        if message.len() > MAX_LOG_RECORD {
            let mut cut = MAX_LOG_RECORD;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [truncated]");
        }
        let plugin = &*self.plugin;
        match level {
            log::Level::Trace => tracing::trace!(target: "eir::plugin", plugin, "{message}"),
            log::Level::Debug => tracing::debug!(target: "eir::plugin", plugin, "{message}"),
            log::Level::Info => tracing::info!(target: "eir::plugin", plugin, "{message}"),
            log::Level::Warn => tracing::warn!(target: "eir::plugin", plugin, "{message}"),
            log::Level::Error => tracing::error!(target: "eir::plugin", plugin, "{message}"),
        }
        Ok(())
    }
}
