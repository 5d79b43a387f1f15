//! The llama architecture (SmolLM2, Llama 2/3, TinyLlama, ...) on quantized weights.
//!
//! The weights are immutable and shared; every sequence brings its own [`KvCache`]. One
//! [`Llama::forward`] call runs any mix of sequences and token counts as one batch: a prompt's
//! chunk (prefill) and other sequences' next tokens (decode) go through each weight matrix
//! together, so the weights stream from memory once per step however many sequences run. Each
//! row attends only to its own sequence's cache, so batching never mixes sequences.
//!
//! The numerics follow llama.cpp's CPU path where it matters for identical greedy output:
//! activations quantized to Q8_1 per token, RMS norm and softmax sums in f64, rotary embedding
//! on adjacent pairs (GGUF's permuted Q/K weights) with llama.cpp's angle recurrence.

use rayon::prelude::*;

use super::file::{DType, Gguf};
use super::tokenizer::Token;
use crate::nn::error::NnError;
use crate::nn::kernels::quant::{Activations, QMatrix, QType};
use crate::nn::meter::Meter;

/// A llama model's shape, from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden size.
    pub dim: usize,
    /// Feed-forward size.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Leading values of each head the rotary embedding turns (even, at most `head_dim`).
    pub rope_dims: usize,
    /// Rotary embedding base.
    pub rope_base: f32,
    /// RMS norm epsilon.
    pub eps: f32,
    /// Context length the model was trained for.
    pub context: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl Config {
    /// Key/value width of one token in one layer.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes of KV cache one token takes across all layers (keys and values, f32).
    pub fn kv_bytes_per_token(&self) -> u64 {
        (2 * self.layers * self.kv_dim() * size_of::<f32>()) as u64
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    gate: QMatrix,
    up: QMatrix,
    down: QMatrix,
}

/// A loaded llama model: validated shapes and quantized weights.
pub struct Llama {
    /// Its shape.
    pub config: Config,
    embed: QMatrix,
    /// `None`: tied to `embed`.
    output: Option<QMatrix>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
}

fn bad(what: impl std::fmt::Display) -> NnError {
    NnError::invalid_encoding(format!("GGUF llama: {what}"))
}

/// Largest sizes accepted from a file (far above any small model; they keep products of sizes
/// far from overflow).
const MAX_DIM: usize = 1 << 15;
const MAX_LAYERS: usize = 512;
const MAX_VOCAB: usize = 1 << 20;
const MAX_CONTEXT: usize = 1 << 20;

impl Llama {
    /// Reads and checks the model's shape and weights, reserving their bytes on `meter`.
    pub fn from_gguf(g: &Gguf<'_>, meter: &Meter) -> Result<Llama, NnError> {
        let arch = g.str("general.architecture")?;
        if arch != "llama" {
            return Err(NnError::unsupported(format!("GGUF architecture `{arch}` (EIR runs `llama`)")));
        }
        let key = |k: &str| format!("llama.{k}");
        let dim = g.usize(&key("embedding_length"), MAX_DIM)?;
        let heads = g.usize(&key("attention.head_count"), MAX_DIM)?;
        // Optional keys default as llama.cpp defaults them; a present but invalid one is an error.
        let kv_heads = g.usize_or(&key("attention.head_count_kv"), MAX_DIM, heads)?;
        let head_dim = g.usize_or(&key("attention.key_length"), MAX_DIM, dim / heads)?;
        let rope_dims = g.usize_or(&key("rope.dimension_count"), MAX_DIM, head_dim)?;
        let tokens = g.array("tokenizer.ggml.tokens")?.len();
        let config = Config {
            layers: g.usize(&key("block_count"), MAX_LAYERS)?,
            dim,
            ffn: g.usize(&key("feed_forward_length"), 4 * MAX_DIM)?,
            heads,
            kv_heads,
            head_dim,
            rope_dims,
            rope_base: g.positive_or(&key("rope.freq_base"), 10_000.0)? as f32,
            eps: g.positive(&key("attention.layer_norm_rms_epsilon"))? as f32,
            context: g.usize(&key("context_length"), MAX_CONTEXT)?,
            vocab: g.usize_or(&key("vocab_size"), MAX_VOCAB, tokens)?,
        };
        if heads * head_dim != dim
            || !heads.is_multiple_of(kv_heads)
            || !rope_dims.is_multiple_of(2)
            || rope_dims > head_dim
        {
            return Err(bad(format!(
                "{heads} heads of {head_dim} with {kv_heads} KV heads do not fit a hidden size of {dim}"
            )));
        }
        if config.vocab != tokens || config.vocab > MAX_VOCAB {
            return Err(bad(format!("vocab_size {} but {tokens} tokens", config.vocab)));
        }
        let (d, kv, f) = (dim, config.kv_dim(), config.ffn);
        let matrix = |name: &str, cols: usize, rows: usize| -> Result<QMatrix, NnError> {
            let (info, bytes) = g.tensor(name)?;
            if info.dims != [cols as u64, rows as u64] {
                return Err(bad(format!("`{name}` has dims {:?}, expected [{cols}, {rows}]", info.dims)));
            }
            let qtype = match info.dtype {
                DType::Q4_1 => QType::Q4_1,
                DType::Q8_0 => QType::Q8_0,
                other => {
                    return Err(NnError::unsupported(format!(
                        "`{name}` is {other:?}; EIR's GGUF kernels take Q4_1 and Q8_0 weights"
                    )));
                }
            };
            meter.reserve(bytes.len() as u64, &format_args!("weights `{name}`"))?.keep();
            QMatrix::new(qtype, rows, cols, bytes).map_err(|e| bad(format!("`{name}`: {}", e.message)))
        };
        let vector = |name: &str| -> Result<Vec<f32>, NnError> {
            let (info, bytes) = g.tensor(name)?;
            if info.dims != [d as u64] || info.dtype != DType::F32 {
                return Err(bad(format!("`{name}` is {:?} {:?}, expected F32 [{d}]", info.dtype, info.dims)));
            }
            meter.reserve(bytes.len() as u64, &format_args!("weights `{name}`"))?.keep();
            Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let mut layers = Vec::with_capacity(config.layers);
        for l in 0..config.layers {
            meter.checkpoint(&format_args!("layer {l}"))?;
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            layers.push(Layer {
                attn_norm: vector(&n("attn_norm"))?,
                wq: matrix(&n("attn_q"), d, d)?,
                wk: matrix(&n("attn_k"), d, kv)?,
                wv: matrix(&n("attn_v"), d, kv)?,
                wo: matrix(&n("attn_output"), d, d)?,
                ffn_norm: vector(&n("ffn_norm"))?,
                gate: matrix(&n("ffn_gate"), d, f)?,
                up: matrix(&n("ffn_up"), d, f)?,
                down: matrix(&n("ffn_down"), f, d)?,
            });
        }
        let embed = matrix("token_embd.weight", d, config.vocab)?;
        let output = match g.tensors.contains_key("output.weight") {
            true => Some(matrix("output.weight", d, config.vocab)?),
            false => None,
        };
        Ok(Llama { norm: vector("output_norm.weight")?, embed, output, layers, config })
    }

    /// Bytes the weights take.
    pub fn weight_bytes(&self) -> usize {
        let m = |q: &QMatrix| q.bytes();
        self.layers
            .iter()
            .map(|l| m(&l.wq) + m(&l.wk) + m(&l.wv) + m(&l.wo) + m(&l.gate) + m(&l.up) + m(&l.down))
            .sum::<usize>()
            + m(&self.embed)
            + self.output.as_ref().map_or(0, m)
    }

    /// An empty KV cache for one sequence of up to `capacity` tokens (at most the model's
    /// context); it takes [`KvCache::bytes_for`] bytes, which the caller charges.
    pub fn cache(&self, capacity: usize) -> Result<KvCache, NnError> {
        if capacity == 0 || capacity > self.config.context {
            return Err(NnError::invalid_argument(format!(
                "a context of {capacity} tokens (this model takes 1 to {})",
                self.config.context
            )));
        }
        let n = self.config.layers * capacity * self.config.kv_dim();
        Ok(KvCache {
            layers: self.config.layers,
            kv_dim: self.config.kv_dim(),
            capacity,
            len: 0,
            k: vec![0.0; n],
            v: vec![0.0; n],
        })
    }

    /// Runs one step: every sequence in `steps` takes its tokens at the positions after what
    /// its cache holds, and the cache grows by them. Returns, per step that asked, the logits
    /// after its last token. Stops between layers when `meter` says so; the caches then hold
    /// what they held before the call.
    pub fn forward(&self, steps: &mut [Step<'_>], meter: &Meter) -> Result<Vec<Option<Vec<f32>>>, NnError> {
        let c = &self.config;
        let mut rows: Vec<Row> = Vec::new();
        for (seq, step) in steps.iter().enumerate() {
            if step.cache.layers != c.layers || step.cache.kv_dim != c.kv_dim() {
                return Err(NnError::invalid_argument("a KV cache made for another model"));
            }
            let left = step.cache.capacity - step.cache.len;
            if step.tokens.len() > left {
                return Err(NnError::too_large(format!(
                    "{} tokens do not fit the {left} left in this sequence's context of {}",
                    step.tokens.len(),
                    step.cache.capacity
                )));
            }
            for (i, &token) in step.tokens.iter().enumerate() {
                if token as usize >= c.vocab {
                    return Err(NnError::invalid_argument(format!(
                        "token {token} is outside the vocabulary of {}",
                        c.vocab
                    )));
                }
                rows.push(Row { seq, pos: step.cache.len + i, token });
            }
        }
        let mut out: Vec<Option<Vec<f32>>> = vec![None; steps.len()];
        let n = rows.len();
        if n == 0 {
            return Ok(out);
        }
        let (d, kv, f) = (c.dim, c.kv_dim(), c.ffn);
        // x, h, q, att, o; k, v; gate, up; and the quantized copy of the widest.
        let floats = n * (5 * d + 2 * kv + 2 * f) + n * f / 4;
        let _scratch = meter.reserve((floats * 4) as u64, &"the step's activations")?;

        let mut x = vec![0f32; n * d];
        for (row, xr) in rows.iter().zip(x.chunks_exact_mut(d)) {
            self.embed.dequantize_row(row.token as usize, xr)?;
        }
        let (mut h, mut q, mut att, mut o) =
            (vec![0f32; n * d], vec![0f32; n * d], vec![0f32; n * d], vec![0f32; n * d]);
        let (mut k, mut v) = (vec![0f32; n * kv], vec![0f32; n * kv]);
        let (mut gate, mut up) = (vec![0f32; n * f], vec![0f32; n * f]);
        let mut act = Activations::default();
        let rope = Rope::new(c, &rows);
        for (l, layer) in self.layers.iter().enumerate() {
            meter.checkpoint(&format_args!("layer {l}"))?;
            rms_norm(&x, &layer.attn_norm, c.eps, &mut h);
            act.quantize(&h, d)?;
            layer.wq.matmul(&act, &mut q)?;
            layer.wk.matmul(&act, &mut k)?;
            layer.wv.matmul(&act, &mut v)?;
            rope.apply(&mut q, c.heads, c.head_dim);
            rope.apply(&mut k, c.kv_heads, c.head_dim);
            for (i, row) in rows.iter().enumerate() {
                let cache = &mut *steps[row.seq].cache;
                let at = cache.at(l, row.pos);
                cache.k[at..at + kv].copy_from_slice(&k[i * kv..(i + 1) * kv]);
                cache.v[at..at + kv].copy_from_slice(&v[i * kv..(i + 1) * kv]);
            }
            let caches: Vec<&KvCache> = steps.iter().map(|s| &*s.cache).collect();
            attention(c, l, &rows, &caches, &q, &mut att);
            act.quantize(&att, d)?;
            layer.wo.matmul(&act, &mut o)?;
            add(&mut x, &o);
            rms_norm(&x, &layer.ffn_norm, c.eps, &mut h);
            act.quantize(&h, d)?;
            layer.gate.matmul(&act, &mut gate)?;
            layer.up.matmul(&act, &mut up)?;
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            act.quantize(&gate, f)?;
            layer.down.matmul(&act, &mut o)?;
            add(&mut x, &o);
        }
        // Logits after each asking step's last token.
        let wanted: Vec<(usize, usize)> = steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.logits && !s.tokens.is_empty())
            .map(|(seq, _)| (seq, rows.iter().rposition(|r| r.seq == seq).unwrap_or(0)))
            .collect();
        if !wanted.is_empty() {
            let m = wanted.len();
            let _logits = meter.reserve((m * c.vocab * 4) as u64, &"the logits")?;
            let mut last = vec![0f32; m * d];
            for (j, &(_, i)) in wanted.iter().enumerate() {
                rms_norm(&x[i * d..(i + 1) * d], &self.norm, c.eps, &mut last[j * d..(j + 1) * d]);
            }
            act.quantize(&last, d)?;
            let mut logits = vec![0f32; m * c.vocab];
            self.output.as_ref().unwrap_or(&self.embed).matmul(&act, &mut logits)?;
            for (&(seq, _), l) in wanted.iter().zip(logits.chunks_exact(c.vocab)) {
                out[seq] = Some(l.to_vec());
            }
        }
        for step in steps.iter_mut() {
            step.cache.len += step.tokens.len();
        }
        Ok(out)
    }
}

/// One row of a step: its sequence (index into the steps), position and token.
struct Row {
    seq: usize,
    pos: usize,
    token: Token,
}

/// `out = x / rms(x) · w`, row by row (ggml's `rms_norm` then `mul`: squares summed in f64).
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        let sum: f64 = xr.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (sum / xr.len() as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * w;
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `Σ a·b` in 8 lanes (so the compiler vectorises it).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Causal attention of every row over its own sequence's cache, one task per (row, head).
fn attention(c: &Config, layer: usize, rows: &[Row], caches: &[&KvCache], q: &[f32], out: &mut [f32]) {
    let hd = c.head_dim;
    let group = c.heads / c.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().with_min_len(4).for_each(|(i, o)| {
        let (r, h) = (i / c.heads, i % c.heads);
        let row = &rows[r];
        let cache = caches[row.seq];
        let kv_off = (h / group) * hd;
        let qh = &q[r * c.dim + h * hd..r * c.dim + (h + 1) * hd];
        let mut scores: Vec<f32> = (0..=row.pos)
            .map(|p| {
                let at = cache.at(layer, p) + kv_off;
                dot(qh, &cache.k[at..at + hd]) * scale
            })
            .collect();
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f64;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += f64::from(*s);
        }
        let inv = (1.0 / sum) as f32;
        o.fill(0.0);
        for (p, &w) in scores.iter().enumerate() {
            let at = cache.at(layer, p) + kv_off;
            let w = w * inv;
            for (o, &v) in o.iter_mut().zip(&cache.v[at..at + hd]) {
                *o += w * v;
            }
        }
    });
}

/// Rotary embedding angles for each row's position: ggml's "normal" mode (adjacent pairs),
/// `θ_i = pos · base^(-2i/dims)` by the same f32 recurrence ggml uses.
struct Rope {
    dims: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(c: &Config, rows: &[Row]) -> Rope {
        let half = c.rope_dims / 2;
        let theta_scale = c.rope_base.powf(-2.0 / c.rope_dims as f32);
        let (mut cos, mut sin) = (Vec::with_capacity(rows.len() * half), Vec::with_capacity(rows.len() * half));
        for row in rows {
            let mut theta = row.pos as f32;
            for _ in 0..half {
                cos.push(theta.cos());
                sin.push(theta.sin());
                theta *= theta_scale;
            }
        }
        Rope { dims: c.rope_dims, cos, sin }
    }

    /// Rotates the first `dims` values of every head of every row of `x`.
    fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize) {
        let half = self.dims / 2;
        for (r, xr) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            let (cos, sin) = (&self.cos[r * half..(r + 1) * half], &self.sin[r * half..(r + 1) * half]);
            for head in xr.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = x0 * cos[i] - x1 * sin[i];
                    head[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }
}

/// One sequence's part of a [`Llama::forward`] step.
pub struct Step<'a> {
    /// The sequence's cache (grows by `tokens`).
    pub cache: &'a mut KvCache,
    /// Tokens to run, in order.
    pub tokens: &'a [Token],
    /// Whether to return the logits after the last token.
    pub logits: bool,
}

/// One sequence's keys and values, `[layer][position][kv_dim]`, preallocated to its capacity.
pub struct KvCache {
    layers: usize,
    kv_dim: usize,
    capacity: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvCache {
    /// Bytes a cache of `capacity` tokens takes for a model of `config`.
    pub fn bytes_for(config: &Config, capacity: usize) -> u64 {
        config.kv_bytes_per_token().saturating_mul(capacity as u64)
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most tokens it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything from position `len` on (to reuse a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn at(&self, layer: usize, pos: usize) -> usize {
        (layer * self.capacity + pos) * self.kv_dim
    }
}
