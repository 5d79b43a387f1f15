//! Sentence embeddings, sentence-transformers style, inside a plugin: tokenise with the model's
//! own `tokenizer.json` (BERT normaliser, WordPiece), run the encoder through wasi-nn, mean-pool
//! the token vectors over the attention mask (padding never counts), and optionally
//! L2-normalise. Shared by the `text-embed` and `rag-chat` plugins.

use std::borrow::Cow;
use std::sync::OnceLock;

use eir_guest::nn::{Graph, output};
use eir_guest::{Error, Result, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// How to embed.
#[derive(Clone, Debug)]
pub struct Options {
    /// Longest text in tokens; longer ones are truncated.
    pub max_tokens: usize,
    /// Texts per forward pass.
    pub batch_size: usize,
    /// L2-normalise each embedding.
    pub normalize: bool,
    /// Keep each text's token ids and count.
    pub keep_tokens: bool,
}

/// The embeddings of some texts.
#[derive(Clone, Debug, Default)]
pub struct Embedded {
    /// `texts × dim` values, row-major.
    pub values: Vec<f32>,
    /// The embedding size.
    pub dim: usize,
    /// Each text's token ids (with `keep_tokens`).
    pub ids: Vec<Vec<i64>>,
    /// Each text's token count (with `keep_tokens`).
    pub counts: Vec<i64>,
}

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

/// Embeds `texts` with the granted BERT model `model` and the tokenizer at `tokenizer_path`.
/// A batch the host refuses as over its compute budget (wasi-nn `too-large`) is split in
/// halves and retried, down to one text.
pub fn embed(model: &str, tokenizer_path: &str, texts: &[&str], opts: &Options) -> Result<Embedded> {
    if opts.max_tokens < 2 {
        return Err(Error::invalid_input("max_tokens must leave room for [CLS] and [SEP]"));
    }
    let graph = Graph::load_by_name(model)?;
    let tok = tokenizer(tokenizer_path, opts.max_tokens)?;
    let session = graph.session()?;
    let mut out = Embedded::default();
    // Batches still to run; one the host finds too large for its budget comes back halved.
    let mut pending: std::collections::VecDeque<&[&str]> = texts.chunks(opts.batch_size.max(1)).collect();
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
        out.dim = d as usize;
        out.values.extend(pool(hidden.values::<f32>()?, &b.mask, chunk.len(), b.seq, out.dim, opts.normalize));
        if opts.keep_tokens {
            out.ids.extend(b.ids.chunks(b.seq.max(1)).map(<[i64]>::to_vec));
            out.counts.extend(b.counts);
        }
    }
    Ok(out)
}
