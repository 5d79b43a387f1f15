//! Streaming a plugin's answer to its caller while `handle` runs (`eir:plugin/reply`): an
//! OpenAI client with `stream: true` gets each part as a content delta the moment it is sent.
//! The response `handle` returns must still hold the whole answer, for callers that do not
//! stream.
//!
//! ```ignore
//! if eir_guest::reply::send("partial text").is_err() {
//!     // the caller went away: stop working
//! }
//! ```

use crate::bindings::eir::plugin::reply as wit;
pub use crate::bindings::eir::plugin::reply::ReplyError;

/// Whether the caller reads the answer as a stream (otherwise [`send`] does nothing).
pub fn streaming() -> bool {
    wit::streaming()
}

/// Sends the next part of the answer. An error means stop: the caller went away or the call's
/// deadline passed ([`ReplyError::Closed`]), or the parts outgrew the response size limit.
pub fn send(text: &str) -> Result<(), ReplyError> {
    wit::send(text)
}
