//! The `gguf` family: quantized language models in llama.cpp's GGUF format.
//!
//! - [`file`]: a checked reader of the format (a hostile file costs at most its own size).
//! - [`llama`]: the llama architecture on EIR's quantized kernels, batched across sequences,
//!   each with its own KV cache.
//! - [`tokenizer`]: the tokenizer the file describes, and UTF-8-safe streaming of its output.
//!
//! Generation (sampling, chat templates, streaming, continuous batching) lives in `crate::llm`
//! on top of this family.

pub mod file;
pub mod llama;
pub mod tokenizer;

use file::Gguf;
use llama::Llama;
use tokenizer::Tokenizer;

use crate::nn::error::NnError;
use crate::nn::meter::Meter;

/// A loaded GGUF language model: weights, tokenizer and chat template, shared by every
/// sequence, plugin and tenant that uses it.
pub struct GgufModel {
    /// The network.
    pub llama: Llama,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The Jinja chat template from `tokenizer.chat_template`, if the file has one.
    pub chat_template: Option<String>,
    /// `general.name`, if given.
    pub name: Option<String>,
}

impl GgufModel {
    /// Parses and checks a GGUF file held in memory, reserving the weights' bytes on `meter`.
    pub fn from_bytes(bytes: &[u8], meter: &Meter) -> Result<GgufModel, NnError> {
        let g = Gguf::parse(bytes)?;
        let llama = Llama::from_gguf(&g, meter)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        if tokenizer.vocab_size() != llama.config.vocab {
            return Err(NnError::invalid_encoding(format!(
                "GGUF: {} tokens but the model's vocabulary is {}",
                tokenizer.vocab_size(),
                llama.config.vocab
            )));
        }
        let text = |k: &str| g.str(k).ok().map(str::to_string);
        Ok(GgufModel { chat_template: text("tokenizer.chat_template"), name: text("general.name"), llama, tokenizer })
    }
}

#[cfg(test)]
mod tests;
