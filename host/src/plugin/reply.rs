//! `eir:plugin/reply`: a pipeline plugin streams parts of its answer to its caller while it
//! runs. The parts travel through a small bounded channel, so a slow reader slows the plugin
//! down (up to the call's deadline) instead of making the host buffer its answer, and their
//! total size is held to the plugin's response limit.

use tokio::sync::mpsc;

use super::bindings::reply::{self, ReplyError};
use super::store::StoreState;
use crate::scheduler::without_turn;

/// Parts in flight between a plugin and its caller before `send` waits.
const PARTS_IN_FLIGHT: usize = 16;

/// Where one call's parts go: the sending half of a [`channel`], with its byte allowance.
#[derive(Debug)]
pub struct ReplySink {
    tx: mpsc::Sender<String>,
    bytes_left: u64,
}

/// A sink for one streamed call, and the receiver its caller reads the parts from. The
/// plugin's response limit is also applied to the parts (see [`super::Plugin::handle_streaming`]).
pub fn channel() -> (ReplySink, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel(PARTS_IN_FLIGHT);
    (ReplySink { tx, bytes_left: u64::MAX }, rx)
}

impl ReplySink {
    /// Caps the bytes all parts together may hold.
    pub(crate) fn limit(mut self, bytes: u64) -> Self {
        self.bytes_left = bytes;
        self
    }
}

impl reply::Host for StoreState {
    async fn streaming(&mut self) -> wasmtime::Result<bool> {
        Ok(self.reply.is_some())
    }

    async fn send(&mut self, text: String) -> wasmtime::Result<Result<(), ReplyError>> {
        let (deadline, abandoned) = (self.deadline(), self.abandoned_token());
        let (tenant, turn) = self.turns();
        let Some(sink) = &mut self.reply else { return Ok(Ok(())) };
        let len = text.len() as u64;
        if len > sink.bytes_left {
            return Ok(Err(ReplyError::TooLarge));
        }
        sink.bytes_left -= len;
        if text.is_empty() {
            return Ok(Ok(()));
        }
        // Room in the channel: sent at once. Else the call waits for a slow reader without
        // holding its tenant's turn at running plugin code.
        let text = match sink.tx.try_send(text) {
            Ok(()) => return Ok(Ok(())),
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(Err(ReplyError::Closed)),
            Err(mpsc::error::TrySendError::Full(text)) => text,
        };
        Ok(without_turn(&tenant, &turn, async {
            tokio::select! {
                sent = sink.tx.send(text) => sent.map_err(|_| ReplyError::Closed),
                () = abandoned.cancelled() => Err(ReplyError::Closed),
                () = tokio::time::sleep_until(deadline.into()) => Err(ReplyError::Closed),
            }
        })
        .await)
    }
}
