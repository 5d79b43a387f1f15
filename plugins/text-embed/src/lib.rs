//! Sentence embeddings, sentence-transformers style: tokenise inside the sandbox with the
//! model's own `tokenizer.json` (BERT normaliser: clean-up, lower-casing, accent handling,
//! CJK splitting; WordPiece), run the encoder through wasi-nn, mean-pool the token vectors over
//! the attention mask (padding never counts), and L2-normalise.
//!
//! Input `text` (BYTES, one sentence per element). Output `embedding` (FP32 `[n, hidden]`),
//! and with `return_tokens=true` (or when requested by name) also `token_ids` (INT64
//! `[n, seq]`, 0-padded) and `token_counts` (INT64 `[n]`).
//!
//! Parameters: `model` (default `minilm`), `tokenizer` (default `/models/<model>/tokenizer.json`:
//! the host shows a granted model's directory there, read-only), `max_tokens` (default 256, sentence-transformers'
//! `max_seq_length` for all-MiniLM-L6-v2; longer sentences are truncated), `batch_size`
//! (default 32), `normalize` (default `true`).
//!
//! Bounds on what a request may ask (each an `invalid-input` error naming it): at most
//! [`MAX_TEXTS`] texts, `batch_size` at most [`MAX_BATCH`], `max_tokens` at most
//! [`MAX_TOKENS`] (the model's positions). A batch the host refuses as over its compute budget
//! (wasi-nn `too-large`) is split in halves and retried, down to one text.

use eir_guest::{Datatype, Error, Metadata, Plugin, Request, Response, Result, Tensor, TensorSpec};
use sentence_embed::{Embedded, Options, embed};

struct TextEmbed;

/// Most texts one request may carry.
pub const MAX_TEXTS: usize = 1024;
/// Largest `batch_size`.
pub const MAX_BATCH: usize = 256;
/// Largest `max_tokens` (BERT's 512 positions).
pub const MAX_TOKENS: usize = 512;

impl Plugin for TextEmbed {
    fn metadata() -> Metadata {
        Metadata {
            description: "Sentence embeddings (all-MiniLM-L6-v2 by default): tokenise, encode, mean-pool, normalise"
                .into(),
            inputs: vec![TensorSpec::new("text", Datatype::Bytes, [-1])],
            outputs: vec![
                TensorSpec::new("embedding", Datatype::Fp32, [-1, -1]),
                TensorSpec::new("token_ids", Datatype::Int64, [-1, -1]),
                TensorSpec::new("token_counts", Datatype::Int64, [-1]),
            ],
        }
    }

    fn handle(request: Request) -> Result<Response> {
        let texts = request.texts("text")?;
        if texts.is_empty() {
            return Err(Error::invalid_input("`text` has no sentences"));
        }
        let model = request.param("model").unwrap_or("minilm");
        if texts.len() > MAX_TEXTS {
            return Err(Error::invalid_input(format!(
                "`text` holds {} texts; at most {MAX_TEXTS} per request (send several requests)",
                texts.len()
            )));
        }
        let max_tokens: usize = request.param_or("max_tokens", 256)?;
        let batch_size: usize = request.param_or::<usize>("batch_size", 32)?.max(1);
        if max_tokens > MAX_TOKENS {
            return Err(Error::invalid_input(format!("max_tokens {max_tokens} is over {MAX_TOKENS}")));
        }
        if batch_size > MAX_BATCH {
            return Err(Error::invalid_input(format!("batch_size {batch_size} is over {MAX_BATCH}")));
        }
        let normalize: bool = request.param_or("normalize", true)?;
        // Token outputs are computed when asked for by parameter or by name (a KServe client
        // that requests every declared output gets them all).
        let return_tokens: bool = request.param_or("return_tokens", false)?
            || request.asks_for("token_ids")
            || request.asks_for("token_counts");
        // A granted model's directory is readable at /models/NAME.
        let default_tokenizer = format!("/models/{model}/tokenizer.json");
        let opts = Options { max_tokens, batch_size, normalize, keep_tokens: return_tokens };
        let Embedded { values: embeddings, dim, ids: all_ids, counts } =
            embed(model, request.param("tokenizer").unwrap_or(&default_tokenizer), &texts, &opts)?;
        let n = texts.len() as u64;
        let mut response = Response::new().with(Tensor::new("embedding", [n, dim as u64], embeddings)?);
        if return_tokens {
            let width = all_ids.iter().map(Vec::len).max().unwrap_or(0);
            let padded: Vec<i64> = all_ids
                .into_iter()
                .flat_map(|mut row| {
                    row.resize(width, 0);
                    row
                })
                .collect();
            response = response.with(Tensor::new("token_ids", [n, width as u64], padded)?).with(Tensor::new(
                "token_counts",
                [n],
                counts,
            )?);
        }
        Ok(response)
    }
}

eir_guest::export_plugin!(TextEmbed);
