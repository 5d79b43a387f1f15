//! Text generation on GGUF models: chat templates, sampling, and the engine that runs every
//! sequence of a model with continuous batching.
//!
//! - [`chat`]: the model's Jinja chat template, rendered under fuel.
//! - [`sample`]: temperature, top-k, top-p, min-p, repeat penalty, seeded.
//! - [`engine`]: one step loop per model. Active sequences decode together, one token each per
//!   forward step; new prompts prefill in chunks between steps; finished or cancelled sequences
//!   leave at once. Admission follows the tenants' weights and the KV-cache budget.

pub mod chat;
pub mod engine;
pub mod host;
pub mod model;
pub mod sample;

pub use chat::{ChatTemplate, Message};
pub use engine::{Engine, Event, Finish, GenerateRequest, Generation, Settings, Usage};
pub use model::Llm;
pub use sample::Sampling;

/// What can go wrong with a generation request, by kind (the gateway maps kinds to statuses).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    /// A parameter is out of range or malformed (400).
    #[error("{0}")]
    BadParameter(String),
    /// The prompt does not fit the context (400; WasmEdge's code 102).
    #[error("{0}")]
    PromptTooLong(String),
    /// Too many requests wait already, or the KV budget can never hold this one (429).
    #[error("{0}")]
    Busy(String),
    /// The model's chat template failed (500: the model file is at fault).
    #[error("{0}")]
    Template(String),
    /// The forward pass failed (500).
    #[error("{0}")]
    Compute(String),
}
