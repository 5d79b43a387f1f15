//! A guest's stdout/stderr captured line by line into `tracing`, tagged with the plugin, at
//! most [`LOG_RATE`] lines a second per plugin (bursts of [`LOG_BURST`]): a plugin that prints
//! in a loop cannot flood the host's log or its disk. Lines over the rate are counted, and the
//! count is logged with the next line that gets through.

use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Longest line kept whole; longer output is logged in pieces of this size.
const MAX_LINE: usize = 16 * 1024;

/// How much of a guest's stderr is kept to explain a trap.
const TAIL_BYTES: usize = 2048;

/// Lines per second a plugin may log (stdout and stderr of all its instances together).
pub const LOG_RATE: u32 = 200;
/// Lines a plugin may log at once before the rate applies.
pub const LOG_BURST: u32 = 2000;

type Limiter = governor::DefaultKeyedRateLimiter<Arc<str>>;

/// One token bucket per plugin name.
fn limiter() -> &'static Limiter {
    static LIMITER: OnceLock<Limiter> = OnceLock::new();
    LIMITER.get_or_init(|| {
        let rate = NonZeroU32::new(LOG_RATE).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(LOG_BURST).unwrap_or(NonZeroU32::MIN);
        governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst))
    })
}

/// The last bytes a guest wrote to stderr (a Rust panic message, say), shared between the
/// stream and the code that reports the call's failure.
#[derive(Clone, Debug, Default)]
pub struct OutputTail(Arc<Mutex<Vec<u8>>>);

impl OutputTail {
    fn push(&self, bytes: &[u8]) {
        let Ok(mut tail) = self.0.lock() else { return };
        tail.extend_from_slice(bytes);
        let excess = tail.len().saturating_sub(TAIL_BYTES);
        tail.drain(..excess);
    }

    /// Forgets what was kept (a reused instance starts a new call).
    pub fn clear(&self) {
        if let Ok(mut tail) = self.0.lock() {
            tail.clear();
        }
    }

    /// The kept text, trimmed; `None` when the guest wrote nothing.
    pub fn text(&self) -> Option<String> {
        let tail = self.0.lock().ok()?;
        let text = String::from_utf8_lossy(&tail).trim().to_string();
        (!text.is_empty()).then_some(text)
    }
}

/// An output stream whose lines become `tracing` events of target `eir::plugin`.
#[derive(Clone, Debug)]
pub struct LogStream {
    plugin: Arc<str>,
    stream: &'static str,
    tail: Option<OutputTail>,
}

impl LogStream {
    /// Lines written to this stream are logged as coming from `plugin`'s `stream`; with a
    /// `tail`, the last of them are also kept there.
    pub fn new(plugin: Arc<str>, stream: &'static str, tail: Option<OutputTail>) -> Self {
        Self { plugin, stream, tail }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter { target: self.clone(), buf: Vec::new(), dropped: 0 })
    }
}

struct LineWriter {
    target: LogStream,
    buf: Vec<u8>,
    /// Lines not logged since the last one that was (over the plugin's rate).
    dropped: u64,
}

impl LineWriter {
    fn emit(&mut self, line: &[u8]) {
        if limiter().check_key(&self.target.plugin).is_err() {
            self.dropped += 1;
            return;
        }
        if self.dropped > 0 {
            tracing::warn!(
                target: "eir::plugin",
                plugin = %self.target.plugin,
                stream = self.target.stream,
                dropped = self.dropped,
                "the plugin logged faster than {LOG_RATE} lines/s; lines were dropped"
            );
            self.dropped = 0;
        }
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        tracing::info!(target: "eir::plugin", plugin = %self.target.plugin, stream = self.target.stream, "{text}");
    }

    fn drain_lines(&mut self) {
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            self.emit(&line[..line.len() - 1]);
        }
        while self.buf.len() >= MAX_LINE {
            let piece: Vec<u8> = self.buf.drain(..MAX_LINE).collect();
            self.emit(&piece);
        }
    }

    fn flush_partial(&mut self) {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.emit(&rest);
        }
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        if let Some(tail) = &self.target.tail {
            tail.push(data);
        }
        self.buf.extend_from_slice(data);
        self.drain_lines();
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.flush_partial();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.flush_partial();
    }
}
