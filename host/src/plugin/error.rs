//! What can go wrong when a plugin is loaded or called, as one typed error per stage, each
//! with a stable [`ErrorKind`] that callers (CLI exit codes, HTTP statuses, metrics) branch on.

use std::time::Duration;

use crate::grants::OutputTail;
use crate::limits::{HostLimitExceeded, LimitKind, Refusal, StoreLimiter};

use super::bindings::types::ErrorCode;

/// A stable, machine-readable name for each way a call can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The plugin ran out of fuel.
    OutOfFuel,
    /// The plugin ran past its wall-clock deadline.
    DeadlineExceeded,
    /// The plugin hit its memory (or table/instance) cap.
    MemoryLimit,
    /// The plugin recursed past its stack.
    StackOverflow,
    /// The plugin trapped (panic, `unreachable`, bad memory access, ...).
    Trap,
    /// The request was larger than the plugin's limit.
    RequestTooLarge,
    /// The response was larger than the plugin's limit.
    ResponseTooLarge,
    /// The request was malformed before it reached the plugin.
    InvalidRequest,
    /// The plugin answered with something malformed.
    InvalidOutput,
    /// The plugin refused the request with a typed error.
    Plugin(ErrorCode),
    /// The plugin called `exit` instead of returning.
    Exited,
    /// The caller went away before the plugin answered.
    Abandoned,
    /// The plugin could not be instantiated or the host failed.
    Internal,
}

impl ErrorKind {
    /// A snake_case name, for logs, metrics and JSON error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfFuel => "out_of_fuel",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::MemoryLimit => "memory_limit",
            Self::StackOverflow => "stack_overflow",
            Self::Trap => "trap",
            Self::RequestTooLarge => "request_too_large",
            Self::ResponseTooLarge => "response_too_large",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidOutput => "invalid_output",
            Self::Plugin(ErrorCode::InvalidInput) => "invalid_input",
            Self::Plugin(ErrorCode::NotFound) => "not_found",
            Self::Plugin(ErrorCode::Unsupported) => "unsupported",
            Self::Plugin(ErrorCode::ModelError) => "model_error",
            Self::Plugin(ErrorCode::Internal) => "plugin_internal",
            Self::Exited => "exited",
            Self::Abandoned => "abandoned",
            Self::Internal => "internal",
        }
    }

    /// The limit behind this kind, if it is a limit violation.
    pub fn limit(self) -> Option<LimitKind> {
        match self {
            Self::OutOfFuel => Some(LimitKind::Fuel),
            Self::DeadlineExceeded => Some(LimitKind::Deadline),
            Self::MemoryLimit => Some(LimitKind::Memory),
            Self::StackOverflow => Some(LimitKind::Stack),
            _ => None,
        }
    }
}

/// A failed call into a plugin. The host and the plugin stay usable: the next call runs in a
/// fresh instance.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Fuel ran out.
    #[error("plugin `{plugin}` ran out of fuel after {limit} units (raise the fuel limit, e.g. --fuel)")]
    OutOfFuel {
        /// The plugin.
        plugin: String,
        /// The fuel it was given.
        limit: u64,
    },
    /// The wall-clock deadline passed.
    #[error("plugin `{plugin}` exceeded its deadline of {} (raise the time limit, e.g. --timeout)", humantime::format_duration(*timeout))]
    DeadlineExceeded {
        /// The plugin.
        plugin: String,
        /// Its time limit.
        timeout: Duration,
    },
    /// Growth past a cap was refused and the plugin could not continue.
    #[error(
        "plugin `{plugin}` hit its memory limit ({what}): asked for {requested}, limit {limit}{}{}",
        if *what == "memory" { " (raise it, e.g. --max-memory)" } else { "" },
        detail.as_deref().map(|d| format!("; then: {d}")).unwrap_or_default()
    )]
    MemoryLimit {
        /// The plugin.
        plugin: String,
        /// "memory" or "table".
        what: &'static str,
        /// What it asked for (bytes or elements).
        requested: u64,
        /// The cap.
        limit: u64,
        /// What the plugin did next, when it trapped.
        detail: Option<String>,
    },
    /// The wasm stack overflowed.
    #[error("plugin `{plugin}` overflowed its stack (recursion too deep){}", fmt_backtrace(backtrace))]
    StackOverflow {
        /// The plugin.
        plugin: String,
        /// The wasm backtrace.
        backtrace: Option<String>,
    },
    /// Any other trap.
    #[error(
        "plugin `{plugin}` trapped: {message}{}{}",
        stderr.as_deref().map(|s| format!("\nits last stderr output:\n{s}")).unwrap_or_default(),
        fmt_backtrace(backtrace)
    )]
    Trap {
        /// The plugin.
        plugin: String,
        /// The trap message.
        message: String,
        /// The end of what the plugin wrote to stderr (a Rust panic's message, say).
        stderr: Option<String>,
        /// The wasm backtrace.
        backtrace: Option<String>,
    },
    /// The request exceeded `max_request`.
    #[error("request of {size} bytes exceeds plugin `{plugin}`'s limit of {limit} bytes")]
    RequestTooLarge {
        /// The plugin.
        plugin: String,
        /// Request size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The response exceeded `max_response`.
    #[error("plugin `{plugin}` returned {size} bytes, over its response limit of {limit} bytes")]
    ResponseTooLarge {
        /// The plugin.
        plugin: String,
        /// Response size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The request is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The plugin's answer is malformed.
    #[error("plugin `{plugin}` returned an invalid output: {message}")]
    InvalidOutput {
        /// The plugin.
        plugin: String,
        /// What is wrong.
        message: String,
    },
    /// The plugin returned its own typed error.
    #[error("plugin `{plugin}` failed ({}): {message}", ErrorKind::Plugin(*code).as_str())]
    Plugin {
        /// The plugin.
        plugin: String,
        /// The plugin's error code.
        code: ErrorCode,
        /// The plugin's message.
        message: String,
    },
    /// The guest called `exit(code)` (for a command this is its normal way to finish).
    #[error("plugin `{plugin}` exited with code {code} instead of returning")]
    Exited {
        /// The plugin.
        plugin: String,
        /// The exit code.
        code: i32,
    },
    /// The caller went away first; the call stopped (before running, or after a short grace).
    #[error("the caller of plugin `{plugin}` went away before it answered")]
    Abandoned {
        /// The plugin.
        plugin: String,
    },
    /// Instantiation or a host-side failure.
    #[error("plugin `{plugin}`: {message}")]
    Internal {
        /// The plugin.
        plugin: String,
        /// What failed.
        message: String,
    },
}

fn fmt_backtrace(backtrace: &Option<String>) -> String {
    match backtrace {
        Some(bt) => format!("\n{bt}"),
        None => String::new(),
    }
}

impl CallError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::OutOfFuel { .. } => ErrorKind::OutOfFuel,
            Self::DeadlineExceeded { .. } => ErrorKind::DeadlineExceeded,
            Self::MemoryLimit { .. } => ErrorKind::MemoryLimit,
            Self::StackOverflow { .. } => ErrorKind::StackOverflow,
            Self::Trap { .. } => ErrorKind::Trap,
            Self::RequestTooLarge { .. } => ErrorKind::RequestTooLarge,
            Self::ResponseTooLarge { .. } => ErrorKind::ResponseTooLarge,
            Self::InvalidRequest(_) => ErrorKind::InvalidRequest,
            Self::InvalidOutput { .. } => ErrorKind::InvalidOutput,
            Self::Plugin { code, .. } => ErrorKind::Plugin(*code),
            Self::Exited { .. } => ErrorKind::Exited,
            Self::Abandoned { .. } => ErrorKind::Abandoned,
            Self::Internal { .. } => ErrorKind::Internal,
        }
    }
}

/// Marks the error a call raises when it stops because its caller went away.
#[derive(Debug, thiserror::Error)]
#[error("the caller went away")]
pub(crate) struct CallerGone;

/// Marks the error an epoch callback raises when the deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("wall-clock deadline passed")]
pub(crate) struct DeadlinePassed;

/// Everything needed to turn a wasmtime error into a [`CallError`].
pub(crate) struct Classifier<'a> {
    pub plugin: &'a str,
    pub fuel: u64,
    pub timeout: Duration,
    pub limiter: &'a StoreLimiter,
    pub stderr: Option<&'a OutputTail>,
}

impl Classifier<'_> {
    /// Maps a trap or host error to exactly one kind. Order matters: a refused memory growth
    /// explains the `unreachable` a guest executes when its allocator gives up.
    pub fn classify(&self, err: wasmtime::Error) -> CallError {
        let plugin = self.plugin.to_string();
        if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
            return CallError::Exited { plugin, code: exit.0 };
        }
        if err.downcast_ref::<CallerGone>().is_some() {
            return CallError::Abandoned { plugin };
        }
        if err.downcast_ref::<DeadlinePassed>().is_some() {
            return CallError::DeadlineExceeded { plugin, timeout: self.timeout };
        }
        let backtrace = err.downcast_ref::<wasmtime::WasmBacktrace>().map(|bt| bt.to_string());
        let trap = err.downcast_ref::<wasmtime::Trap>().copied();
        match trap {
            Some(wasmtime::Trap::OutOfFuel) => {
                return CallError::OutOfFuel { plugin, limit: self.fuel };
            }
            Some(wasmtime::Trap::Interrupt) => {
                return CallError::DeadlineExceeded { plugin, timeout: self.timeout };
            }
            Some(wasmtime::Trap::StackOverflow) => {
                return CallError::StackOverflow { plugin, backtrace };
            }
            _ => {}
        }
        if let Some(host) = err.downcast_ref::<HostLimitExceeded>() {
            let HostLimitExceeded { what, requested, limit } = host.clone();
            return CallError::MemoryLimit { plugin, what, requested, limit, detail: None };
        }
        if let Some(refusal) = self.count_refusal(&err) {
            let Refusal { what, requested, limit } = refusal;
            return CallError::MemoryLimit { plugin, what, requested, limit, detail: None };
        }
        if let Some(Refusal { what, requested, limit }) = self.limiter.refusal().cloned() {
            let detail = trap.map(|t| t.to_string()).or_else(|| Some(root_message(&err)));
            return CallError::MemoryLimit { plugin, what, requested, limit, detail };
        }
        match trap {
            Some(trap) => CallError::Trap {
                plugin,
                message: trap.to_string(),
                stderr: self.stderr.and_then(OutputTail::text),
                backtrace,
            },
            None => CallError::Internal { plugin, message: format!("{err:#}") },
        }
    }
}

impl Classifier<'_> {
    /// wasmtime checks instance/table/memory counts itself, without asking the limiter to
    /// record anything, and reports "resource limit exceeded: {what} count too high at {n}".
    fn count_refusal(&self, err: &wasmtime::Error) -> Option<Refusal> {
        let message = root_message(err);
        let rest = message.strip_prefix("resource limit exceeded: ")?;
        let (what, n) = rest.split_once(" count too high at ")?;
        let what: &'static str = match what {
            "instance" => "instance count",
            "table" => "table count",
            "memory" => "memory count",
            _ => return None,
        };
        let limit = self.limiter.count_limit(what.trim_end_matches(" count"))? as u64;
        Some(Refusal { what, requested: n.trim().parse().ok()?, limit })
    }
}

/// The innermost message of an error chain (wasmtime wraps traps in context).
fn root_message(err: &wasmtime::Error) -> String {
    err.chain().last().map(|e| e.to_string()).unwrap_or_default()
}
