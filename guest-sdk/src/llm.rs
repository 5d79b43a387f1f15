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

use crate::Error;

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
