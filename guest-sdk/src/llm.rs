//! Text generation on the host's language models (`eir:plugin/llm`): open a granted model,
//! build a chat prompt with its template, and stream the answer chunk by chunk.
//!
//! ```ignore
//! use eir_guest::llm::{self, Model, Options};
//! let model = Model::open("smollm2")?;
//! let prompt = model.chat_prompt(&[llm::user("What is edge computing?")])?;
//! let generation = model.generate(&prompt, &Options::greedy(64))?;
//! while let Some(chunk) = generation.next() {
//!     // forward chunk.text as it arrives
//! }
//! let how = generation.finished(); // reason and usage
//! ```

pub use crate::bindings::eir::plugin::llm::{
    Chunk, Error as LlmError, ErrorCode as LlmErrorCode, FinishReason, Finished, Generation, Message, Model, Options,
    Sampling, Usage,
};

use crate::{Error, Request, Response, Result};

/// A user message.
pub fn user(content: impl Into<String>) -> Message {
    Message { role: "user".into(), content: content.into() }
}

/// A system message.
pub fn system(content: impl Into<String>) -> Message {
    Message { role: "system".into(), content: content.into() }
}

impl Options {
    /// Greedy decoding of at most `max_tokens`.
    pub fn greedy(max_tokens: u32) -> Options {
        Options { sampling: Sampling::greedy(), max_tokens, stop: Vec::new() }
    }

    /// Sampling at `temperature` (top-p 0.95, min-p 0.05, top-k 40) of at most `max_tokens`.
    pub fn sampled(temperature: f32, max_tokens: u32, seed: Option<u64>) -> Options {
        Options {
            sampling: Sampling { temperature, top_k: 40, top_p: 0.95, min_p: 0.05, repeat_penalty: 1.0, seed },
            max_tokens,
            stop: Vec::new(),
        }
    }
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Sampling {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repeat_penalty: 1.0, seed: None }
    }
}

impl From<LlmError> for Error {
    fn from(e: LlmError) -> Self {
        match e.code {
            LlmErrorCode::InvalidArgument | LlmErrorCode::PromptTooLong => Error::invalid_input(e.message),
            LlmErrorCode::NotFound | LlmErrorCode::Denied => Error::model(e.message),
            LlmErrorCode::Busy | LlmErrorCode::Runtime => Error::model(e.message),
        }
    }
}

impl FinishReason {
    /// The reason as one lower-case word (`stop`, `length`, `context-full`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Deadline => "deadline",
            FinishReason::ContextFull => "context-full",
            FinishReason::Error => "error",
        }
    }
}

impl Finished {
    /// `"REASON PROMPT_TOKENS COMPLETION_TOKENS"`, e.g. `"stop 41 12"`.
    pub fn summary(&self) -> String {
        format!("{} {} {}", self.reason.as_str(), self.usage.prompt_tokens, self.usage.completion_tokens)
    }
}

/// Runs a generation to its end: the whole text and how it ended.
pub fn complete(generation: &Generation) -> (String, Option<Finished>) {
    let mut text = String::new();
    while let Some(chunk) = generation.next() {
        text.push_str(&chunk.text);
    }
    (text, generation.finished())
}

/// Runs a generation to its end like [`complete`], sending each chunk to the plugin's caller
/// as it comes when the caller reads a stream ([`crate::reply`]). If the caller went away it
/// stops reading; dropping the generation then cancels it.
pub fn stream_to_caller(generation: &Generation) -> (String, Option<Finished>) {
    let streaming = crate::reply::streaming();
    let mut text = String::new();
    while let Some(chunk) = generation.next() {
        if streaming && crate::reply::send(&chunk.text).is_err() {
            return (text, None);
        }
        text.push_str(&chunk.text);
    }
    (text, generation.finished())
}

/// A chat as `/v1/chat/completions` hands it to a plugin: inputs `role` and `content` (BYTES
/// `[n]`, the messages in order).
pub fn chat_messages(request: &Request) -> Result<Vec<Message>> {
    let roles = request.texts("role")?;
    let contents = request.texts("content")?;
    if roles.len() != contents.len() || roles.is_empty() {
        return Err(Error::invalid_input("`role` and `content` must hold one element per message"));
    }
    Ok(roles.iter().zip(&contents).map(|(r, c)| Message { role: r.to_string(), content: c.to_string() }).collect())
}

/// `defaults` with the generation parameters the caller set: `max_tokens`, `temperature`,
/// `top_p`, `top_k`, `min_p`, `repeat_penalty`, `seed` and `stop` (once per stop text).
pub fn options_from(request: &Request, defaults: Options) -> Result<Options> {
    let s = defaults.sampling;
    let temperature = request.param_or("temperature", s.temperature)?;
    let sampled = temperature > 0.0 && s.temperature <= 0.0;
    // Greedy defaults switched to sampling take the sampled defaults.
    let base = if sampled { Options::sampled(temperature, 0, None).sampling } else { s };
    let seed = match request.param("seed") {
        Some(_) => Some(request.param_or("seed", 0u64)?),
        None => base.seed,
    };
    let mut stop: Vec<String> = request.params("stop").map(str::to_string).collect();
    if stop.is_empty() {
        stop = defaults.stop;
    }
    Ok(Options {
        sampling: Sampling {
            temperature,
            top_k: request.param_or("top_k", base.top_k)?,
            top_p: request.param_or("top_p", base.top_p)?,
            min_p: request.param_or("min_p", base.min_p)?,
            repeat_penalty: request.param_or("repeat_penalty", base.repeat_penalty)?,
            seed,
        },
        max_tokens: request.param_or("max_tokens", defaults.max_tokens)?,
        stop,
    })
}

impl Response {
    /// Reports how a generation ended as the chat convention's response parameters
    /// (`finish_reason`: `stop` or `length`; `prompt_tokens`; `completion_tokens`).
    pub fn with_finished(self, finished: &Finished) -> Self {
        let reason = if finished.reason == FinishReason::Stop { "stop" } else { "length" };
        self.with_param("finish_reason", reason)
            .with_param("prompt_tokens", finished.usage.prompt_tokens.to_string())
            .with_param("completion_tokens", finished.usage.completion_tokens.to_string())
    }
}
