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

use std::borrow::Cow;
use std::sync::OnceLock;

use eir_guest::nn::{Graph, output};
use eir_guest::{Datatype, Error, Metadata, Plugin, Request, Response, Result, Tensor, TensorSpec};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

struct TextEmbed;

/// Most texts one request may carry.
pub const MAX_TEXTS: usize = 1024;
/// Largest `batch_size`.
pub const MAX_BATCH: usize = 256;
/// Largest `max_tokens` (BERT's 512 positions).
pub const MAX_TOKENS: usize = 512;

/// The parsed tokenizer, set up for one `max_tokens`, kept for the life of the instance: an
/// instance that serves several requests parses and configures it once.
struct Cached {
    path: String,
    max_tokens: usize,
    tokenizer: Tokenizer,
}

static TOKENIZER: OnceLock<Cached> = OnceLock::new();

fn load_tokenizer(path: &str, max_tokens: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(path).map_err(|e| {
        Error::invalid_input(format!("cannot load tokenizer `{path}`: {e} (is the model directory granted?)"))
    })?;
    // Truncate like the reference (sentence-transformers' max_seq_length) and pad only to the
    // longest sentence of the batch, not to the file's fixed 128.
    tok.with_truncation(Some(TruncationParams { max_length: max_tokens, ..Default::default() }))
        .map_err(|e| Error::invalid_input(format!("max_tokens {max_tokens}: {e}")))?;
    tok.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..Default::default() }));
    Ok(tok)
}

/// The cached tokenizer when it matches, else a freshly loaded one (cached if none was).
fn tokenizer(path: &str, max_tokens: usize) -> Result<Cow<'static, Tokenizer>> {
    if let Some(c) = TOKENIZER.get() {
        if c.path == path && c.max_tokens == max_tokens {
            return Ok(Cow::Borrowed(&c.tokenizer));
        }
        return load_tokenizer(path, max_tokens).map(Cow::Owned);
    }
    let tokenizer = load_tokenizer(path, max_tokens)?;
    let cached = TOKENIZER.get_or_init(|| Cached { path: path.to_string(), max_tokens, tokenizer });
    Ok(Cow::Borrowed(&cached.tokenizer))
}

/// Token ids, attention mask and type ids of a batch, padded to its longest sentence.
struct Batch {
    ids: Vec<i64>,
    mask: Vec<i64>,
    types: Vec<i64>,
    counts: Vec<i64>,
    seq: usize,
}

fn encode(tok: &Tokenizer, texts: &[&str]) -> Result<Batch> {
    let encodings =
        tok.encode_batch(texts.to_vec(), true).map_err(|e| Error::invalid_input(format!("tokenising: {e}")))?;
    let seq = encodings.first().map(|e| e.get_ids().len()).unwrap_or(0);
    let mut batch = Batch { ids: vec![], mask: vec![], types: vec![], counts: vec![], seq };
    for e in &encodings {
        batch.ids.extend(e.get_ids().iter().map(|&x| i64::from(x)));
        batch.mask.extend(e.get_attention_mask().iter().map(|&x| i64::from(x)));
        batch.types.extend(e.get_type_ids().iter().map(|&x| i64::from(x)));
        batch.counts.push(e.get_attention_mask().iter().filter(|&&m| m == 1).count() as i64);
    }
    Ok(batch)
}

/// Mean of the token vectors whose mask is 1, per sentence; then optionally L2-normalised.
fn pool(hidden: &[f32], mask: &[i64], n: usize, seq: usize, dim: usize, normalize: bool) -> Vec<f32> {
    let mut out = vec![0f32; n * dim];
    for s in 0..n {
        let acc = &mut out[s * dim..(s + 1) * dim];
        let mut count = 0f32;
        for t in 0..seq {
            if mask[s * seq + t] == 0 {
                continue;
            }
            count += 1.0;
            let row = &hidden[(s * seq + t) * dim..(s * seq + t + 1) * dim];
            acc.iter_mut().zip(row).for_each(|(a, &h)| *a += h);
        }
        // sentence-transformers clamps the count at 1e-9.
        let count = count.max(1e-9);
        acc.iter_mut().for_each(|a| *a /= count);
        if normalize {
            let norm = acc.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
            acc.iter_mut().for_each(|a| *a /= norm);
        }
    }
    out
}

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
        if max_tokens < 2 {
            return Err(Error::invalid_input("max_tokens must leave room for [CLS] and [SEP]"));
        }

        let graph = Graph::load_by_name(model)?;
        // A granted model's directory is readable at /models/NAME.
        let default_tokenizer = format!("/models/{model}/tokenizer.json");
        let tok = tokenizer(request.param("tokenizer").unwrap_or(&default_tokenizer), max_tokens)?;
        let session = graph.session()?;
        let mut embeddings = Vec::new();
        let mut dim = 0;
        let mut all_ids: Vec<Vec<i64>> = Vec::new();
        let mut counts = Vec::new();
        // Batches still to run; one the host finds too large for its budget comes back halved.
        let mut pending: std::collections::VecDeque<&[&str]> = texts.chunks(batch_size).collect();
        while let Some(chunk) = pending.pop_front() {
            let b = encode(&tok, chunk)?;
            let shape = [chunk.len() as u64, b.seq as u64];
            let ids = Tensor::new("input_ids", shape, b.ids.clone())?;
            let mask = Tensor::new("attention_mask", shape, b.mask.clone())?;
            let types = Tensor::new("token_type_ids", shape, b.types)?;
            let Some(outputs) = session.compute_if_fits(&[&ids, &mask, &types])? else {
                if chunk.len() == 1 {
                    return Err(Error::invalid_input(format!(
                        "a text of {} tokens is over the host's compute budget; lower max_tokens",
                        b.seq
                    )));
                }
                let (a, rest) = chunk.split_at(chunk.len() / 2);
                pending.push_front(rest);
                pending.push_front(a);
                continue;
            };
            let hidden = output(&outputs, "last_hidden_state")?;
            let [n, seq, d] = hidden.shape[..] else {
                return Err(Error::model(format!("last_hidden_state has shape {:?}, expected 3-D", hidden.shape)));
            };
            if n as usize != chunk.len() || seq as usize != b.seq {
                return Err(Error::model(format!("last_hidden_state {:?} does not match the batch", hidden.shape)));
            }
            dim = d as usize;
            embeddings.extend(pool(hidden.values::<f32>()?, &b.mask, chunk.len(), b.seq, dim, normalize));
            if return_tokens {
                all_ids.extend(b.ids.chunks(b.seq.max(1)).map(<[i64]>::to_vec));
                counts.extend(b.counts);
            }
        }
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
