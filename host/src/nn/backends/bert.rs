//! BERT encoders (`model_type: "bert"`) from `config.json` + `model.safetensors`. Candle loads
//! the weights and holds the inputs and outputs; the layers are written here (as transformers'
//! `BertLayer`, with Q, K and V as one matrix product) on EIR's own kernels
//! ([`crate::nn::kernels`]): the hidden states are kept transposed (`[hidden][tokens]`) from
//! the embeddings to the last layer, so every dense layer is one packed-weight GEMM with its
//! bias fused, attention runs per row and head as one fused pass
//! ([`crate::nn::kernels::attention`]), and the layer norms run across tokens. A forward pass can stop between its attention and feed-forward blocks.
//!
//! Inputs: `input_ids` (required), `attention_mask` (default all ones) and `token_type_ids`
//! (default zeros), I64 or I32, shape `[batch, seq]`. Output: `last_hidden_state`, FP32
//! `[batch, seq, hidden]`. Every input is checked (shapes, id ranges, sequence length) before
//! candle sees it, so a bad request is an `invalid-argument` error, never a panic. What the
//! forward pass will hold (the attention scores grow with batch × heads × seq²) is estimated
//! and reserved on the compute's meter before it starts, and the meter's deadline and
//! cancellation are checked before each block of each layer.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::nn::backend::{BatchSpec, Model, Named};
use crate::nn::bindings::tensor::TensorType;
use crate::nn::error::NnError;
use crate::nn::kernels::act::{self, Act};
use crate::nn::kernels::attention;
use crate::nn::kernels::sgemm::{self, Packed};
use crate::nn::meter::{Meter, mul};
use crate::nn::tensor::HostTensor;

/// Most layers, heads and hidden units a config may declare (checked before any weight is
/// read, so an absurd config is a clear error rather than a division by zero or a huge loop).
const MAX_LAYERS: usize = 256;
const MAX_WIDTH: usize = 1 << 16;

/// Tokens one step of a forward pass handles: a batch runs in chunks of whole rows holding
/// about this many tokens, each chunk through every layer, with a checkpoint before each block
/// (attention, feed-forward) of each layer of each chunk. A cancelled pass then stops within one
/// block of one chunk (about 1 GFLOP for MiniLM, ~20 ms on 2 cores), and only one chunk's
/// attention scores are held at a time.
/// Rows are independent in BERT, so chunking does not change the results.
const TOKENS_PER_STEP: usize = 512;

/// The stages `EIR_BERT_PROFILE=1` times, in a pass's order.
const STAGES: [&str; 8] =
    ["embeddings", "qkv", "attend", "attention_out", "attention_norm", "intermediate", "output", "output_norm"];

/// Where a pass's time went, by stage, when `EIR_BERT_PROFILE=1` is set (logged through
/// `tracing` at the end of each pass, as `EIR_ONNX_PROFILE` does for ONNX graphs).
struct Profile(Option<([std::time::Duration; STAGES.len()], std::time::Instant)>);

impl Profile {
    fn start() -> Self {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var("EIR_BERT_PROFILE").is_ok_and(|v| v == "1"));
        Self(on.then(|| (Default::default(), std::time::Instant::now())))
    }

    /// Charges the time since the last lap to `stage` (an index into [`STAGES`]).
    fn lap(&mut self, stage: usize) {
        if let Some((times, since)) = &mut self.0 {
            let now = std::time::Instant::now();
            times[stage] += now - *since;
            *since = now;
        }
    }

    fn log(self, tokens: usize) {
        if let Some((times, _)) = self.0 {
            let total: std::time::Duration = times.iter().sum();
            let rows: Vec<String> =
                STAGES.iter().zip(times).map(|(s, t)| format!("{s} {:.2}ms", t.as_secs_f64() * 1e3)).collect();
            tracing::info!(tokens, total_ms = total.as_secs_f64() * 1e3, "BERT profile: {}", rows.join(", "));
        }
    }
}

/// The inputs a BERT graph takes, in order of importance.
pub const INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];
/// The output it produces.
pub const OUTPUT: &str = "last_hidden_state";

/// What a BERT `config.json` says that the encoder needs (other keys are ignored).
#[derive(Clone, Debug, Deserialize)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default)]
    hidden_act: Activation,
    max_position_embeddings: usize,
    type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    layer_norm_eps: f64,
    /// Parsed only so that a kind other than absolute is refused.
    #[serde(default, rename = "position_embedding_type")]
    _positions: PositionEmbedding,
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

/// The feed-forward activation (transformers' names).
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Activation {
    /// GELU with the exact error function (`"gelu"`, BERT's default).
    #[default]
    Gelu,
    /// GELU's tanh approximation.
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluApproximate,
    Relu,
}

/// Only absolute position embeddings are implemented; a config asking for relative ones
/// is refused at load rather than computed wrongly.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PositionEmbedding {
    #[default]
    Absolute,
}

/// A loaded BERT encoder.
pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    config: Config,
    device: Device,
}

/// One encoder layer: self-attention, then the feed-forward block, each closed by a residual
/// add and a layer norm (transformers' `BertLayer`, inference only: no dropout).
struct Layer {
    /// Query, key and value projections stacked into one `[3 × hidden, hidden]` matrix.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    intermediate: Dense,
    activation: Activation,
    output: Dense,
    output_norm: Norm,
    heads: usize,
}

impl Layer {
    fn load(vb: VarBuilder, c: &Config) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let attn = vb.pp("attention");
        let projection = |name: &str| -> candle_core::Result<(Tensor, Tensor)> {
            let vb = attn.pp("self").pp(name);
            Ok((vb.get((h, h), "weight")?, vb.get(h, "bias")?))
        };
        let (q, k, v) = (projection("query")?, projection("key")?, projection("value")?);
        let qkv = Dense::new(&Tensor::cat(&[&q.0, &k.0, &v.0], 0)?, &Tensor::cat(&[&q.1, &k.1, &v.1], 0)?)?;
        let dense =
            |vb: VarBuilder, inp: usize, out: usize| Dense::new(&vb.get((out, inp), "weight")?, &vb.get(out, "bias")?);
        let norm = |vb: VarBuilder| Norm::load(vb.pp("LayerNorm"), h, c.layer_norm_eps);
        Ok(Self {
            qkv,
            attention_out: dense(attn.pp("output").pp("dense"), h, h)?,
            attention_norm: norm(attn.pp("output"))?,
            intermediate: dense(vb.pp("intermediate").pp("dense"), h, c.intermediate_size)?,
            activation: c.hidden_act,
            output: dense(vb.pp("output").pp("dense"), c.intermediate_size, h)?,
            output_norm: norm(vb.pp("output"))?,
            heads: c.num_attention_heads,
        })
    }

    /// Self-attention over `xt` (`[hidden][rows·seq]`: the hidden states transposed) with an
    /// additive `mask` per token, then the residual and layer norm. In this layout each head's
    /// Q, K and V are rows, every dense layer takes its operand as it is, and the layer norms
    /// run across tokens, so a pass transposes only on its way in and out. The result goes to
    /// `out`; `scratch` holds the intermediate values (see [`Scratch`]).
    fn attention(
        &self,
        xt: &[f32],
        [rows, seq]: [usize; 2],
        mask: &[f32],
        scratch: &mut Scratch,
        out: &mut Vec<f32>,
        profile: &mut Profile,
    ) -> candle_core::Result<()> {
        let tokens = rows * seq;
        let hidden = self.attention_out.out;
        if mask.len() != tokens || self.qkv.out != 3 * hidden || xt.len() != hidden * tokens {
            candle_core::bail!("attention: operand sizes do not match");
        }
        self.qkv.forward_t(xt, tokens, None, &mut scratch.qkvt)?;
        profile.lap(1);
        attend(&scratch.qkvt, [rows, seq, hidden, self.heads], mask, &mut scratch.ctxt)?;
        profile.lap(2);
        self.attention_out.forward_t(&scratch.ctxt, tokens, None, out)?;
        profile.lap(3);
        self.attention_norm.residual(out, xt, tokens)?;
        profile.lap(4);
        Ok(())
    }

    /// The feed-forward block on the attention's output (transposed, as above), then the
    /// residual and layer norm, into `out`.
    fn feed_forward(
        &self,
        xt: &[f32],
        tokens: usize,
        scratch: &mut Scratch,
        out: &mut Vec<f32>,
        profile: &mut Profile,
    ) -> candle_core::Result<()> {
        let act = match self.activation {
            Activation::Gelu => Act::Gelu,
            Activation::GeluApproximate => Act::GeluTanh,
            Activation::Relu => Act::Relu,
        };
        self.intermediate.forward_t(xt, tokens, Some(act), &mut scratch.inner)?;
        profile.lap(5);
        self.output.forward_t(&scratch.inner, tokens, None, out)?;
        profile.lap(6);
        self.output_norm.residual(out, xt, tokens)?;
        profile.lap(7);
        Ok(())
    }
}

/// A pass's intermediate values, reused by every layer: fresh buffers of a few MiB per layer
/// cost page faults on every first touch (a fifth of a MiniLM pass at 8×128 tokens).
#[derive(Default)]
struct Scratch {
    /// Q, K and V, transposed (`[3·hidden][tokens]`).
    qkvt: Vec<f32>,
    /// The attention's context (`[hidden][tokens]`).
    ctxt: Vec<f32>,
    /// The feed-forward block's inner activations (`[intermediate][tokens]`).
    inner: Vec<f32>,
}

/// A layer norm over the features of transposed hidden states (each token a column).
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn load(vb: VarBuilder, hidden: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            gamma: vb.get(hidden, "weight")?.to_vec1()?,
            beta: vb.get(hidden, "bias")?.to_vec1()?,
            eps: eps as f32,
        })
    }

    /// `xt = norm(xt + residual)`, both `[hidden][tokens]`.
    fn residual(&self, xt: &mut [f32], residual: &[f32], tokens: usize) -> candle_core::Result<()> {
        if residual.len() != xt.len() {
            candle_core::bail!("layer norm: operand sizes do not match");
        }
        for (o, &r) in xt.iter_mut().zip(residual) {
            *o += r;
        }
        act::layer_norm_columns(xt, tokens, &self.gamma, &self.beta, self.eps)
            .ok_or_else(|| candle_core::Error::Msg("layer norm: operand sizes do not match".into()))
    }
}

/// A dense layer, `y = x·Wᵀ + b` (torch's `Linear`), on EIR's GEMM. It computes `yᵀ = W·xᵀ`:
/// the weights are then the GEMM's left operand, packed once at load for its tile kernel, and
/// the bias its per-row epilogue; the activation runs on the way out. (Candle's matmul goes
/// through the `gemm` crate, whose stable build has no AVX-512 kernel: 35% of a MiniLM pass
/// was its AVX2 micro-kernel.)
struct Dense {
    /// The weights `[out][inp]`, row-major, and their packing.
    weight: Vec<f32>,
    packed: Option<Packed>,
    bias: Vec<f32>,
    out: usize,
    inp: usize,
}

impl Dense {
    fn new(weight: &Tensor, bias: &Tensor) -> candle_core::Result<Self> {
        let (out, inp) = weight.dims2()?;
        let weight: Vec<f32> = weight.flatten_all()?.to_vec1()?;
        let bias: Vec<f32> = bias.to_vec1()?;
        if bias.len() != out {
            candle_core::bail!("bias of {} values for {out} outputs", bias.len());
        }
        let packed = Packed::new(out, inp, &weight);
        Ok(Self { weight, packed, bias, out, inp })
    }

    /// `yᵀ = act(W·xᵀ + b)` on transposed values (`xt`: `[inp][tokens]`), into `yt` (resized).
    fn forward_t(&self, xt: &[f32], tokens: usize, act: Option<Act>, yt: &mut Vec<f32>) -> candle_core::Result<()> {
        if xt.len() != self.inp * tokens {
            candle_core::bail!("a dense layer of {} inputs given {} values for {tokens} tokens", self.inp, xt.len());
        }
        yt.resize(self.out * tokens, 0.0);
        let (dims, packed, bias) = ([self.out, tokens, self.inp], self.packed.as_ref(), Some(&self.bias[..]));
        match act {
            // Fused into the product's tiles.
            Some(Act::Gelu) => sgemm::gemm_gelu(dims, &self.weight, packed, xt, yt, bias),
            _ => sgemm::gemm(dims, &self.weight, packed, xt, yt, bias, None),
        }
        .map_err(|e| candle_core::Error::Msg(e.message))?;
        if let Some(act) = act.filter(|&a| a != Act::Gelu) {
            act::activate(yt, act);
        }
        Ok(())
    }
}

/// Scaled dot-product attention on transposed projections ([`attention::attend`]), with
/// candle's error type.
fn attend(qkvt: &[f32], dims: [usize; 4], mask: &[f32], ctxt: &mut Vec<f32>) -> candle_core::Result<()> {
    attention::attend(qkvt, dims, mask, ctxt).map_err(|e| candle_core::Error::Msg(e.message))
}

/// Word + position + token-type embeddings, then a layer norm (as BERT's), written straight
/// into the transposed layout the layers take.
struct Embeddings {
    /// `[vocab][hidden]`, `[positions][hidden]`, `[types][hidden]`, row-major.
    words: Vec<f32>,
    positions: Vec<f32>,
    types: Vec<f32>,
    hidden: usize,
    norm: Norm,
}

impl Embeddings {
    fn load(vb: VarBuilder, c: &Config) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let table = |n: usize, name: &str| -> candle_core::Result<Vec<f32>> {
            vb.pp(name).get((n, h), "weight")?.flatten_all()?.to_vec1()
        };
        Ok(Self {
            words: table(c.vocab_size, "word_embeddings")?,
            positions: table(c.max_position_embeddings, "position_embeddings")?,
            types: table(c.type_vocab_size, "token_type_embeddings")?,
            hidden: h,
            norm: Norm::load(vb.pp("LayerNorm"), h, c.layer_norm_eps)?,
        })
    }

    /// The embedded tokens of `ids` and `types` (`[rows][seq]`, flattened), transposed:
    /// `[hidden][rows·seq]`. An id outside its table is an `invalid-argument` error.
    fn forward_t(&self, ids: &[i64], types: &[i64], seq: usize) -> Result<Vec<f32>, NnError> {
        let h = self.hidden;
        let row = |table: &[f32], what: &str, i: i64| -> Result<std::ops::Range<usize>, NnError> {
            usize::try_from(i)
                .ok()
                .filter(|&i| i < table.len() / h.max(1))
                .map(|i| i * h..(i + 1) * h)
                .ok_or_else(|| NnError::invalid_argument(format!("{what} {i} is outside the model's table")))
        };
        if types.len() != ids.len() || seq == 0 {
            return Err(NnError::invalid_argument("token_type_ids and input_ids differ in shape"));
        }
        let mut x = Vec::with_capacity(ids.len() * h);
        for (t, (&id, &ty)) in ids.iter().zip(types).enumerate() {
            let (w, p, k) = (
                row(&self.words, "token id", id)?,
                row(&self.positions, "position", (t % seq) as i64)?,
                row(&self.types, "token type", ty)?,
            );
            x.extend(self.words[w].iter().zip(&self.positions[p]).zip(&self.types[k]).map(|((a, b), c)| a + b + c));
        }
        let tokens = ids.len();
        let mut xt = act::transpose(&x, tokens, h).ok_or_else(|| NnError::runtime("embedding sizes"))?;
        drop(x);
        act::layer_norm_columns(&mut xt, tokens, &self.norm.gamma, &self.norm.beta, self.norm.eps)
            .ok_or_else(|| NnError::runtime("embedding sizes"))?;
        Ok(xt)
    }
}

/// Checks the numbers of a config before they size anything.
fn check_config(c: &Config) -> Result<(), NnError> {
    let bad = |what: String| Err(NnError::invalid_encoding(format!("config.json: {what}")));
    if c.num_hidden_layers == 0 || c.num_hidden_layers > MAX_LAYERS {
        return bad(format!("num_hidden_layers is {}, outside 1..={MAX_LAYERS}", c.num_hidden_layers));
    }
    for (name, v) in [
        ("hidden_size", c.hidden_size),
        ("num_attention_heads", c.num_attention_heads),
        ("intermediate_size", c.intermediate_size),
    ] {
        if v == 0 || v > MAX_WIDTH {
            return bad(format!("{name} is {v}, outside 1..={MAX_WIDTH}"));
        }
    }
    if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return bad(format!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            c.hidden_size, c.num_attention_heads
        ));
    }
    if c.max_position_embeddings == 0 || c.vocab_size == 0 || c.type_vocab_size == 0 {
        return bad("vocab_size, type_vocab_size and max_position_embeddings must be at least 1".into());
    }
    Ok(())
}

impl Bert {
    /// Loads `dir/model.safetensors` with the parsed `config.json` text, under `meter`.
    pub fn from_dir(dir: &Path, config: &str, device: &Device, meter: &Meter) -> Result<Self, NnError> {
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| NnError::not_found(format!("{}: {e}", weights.display())))?;
        Self::from_bytes(config, &bytes, device, meter)
    }

    /// Loads from a `config.json` text and the bytes of a safetensors file, under `meter`: what
    /// loading holds (a copy of the file, and the weights converted to f32: at most twice the
    /// file for 16-bit weights) is reserved first, and the deadline is checked between layers.
    pub fn from_bytes(config: &str, weights: &[u8], device: &Device, meter: &Meter) -> Result<Self, NnError> {
        let config: Config = serde_json::from_str(config)
            .map_err(|e| NnError::invalid_encoding(format!("config.json is not a BERT config: {e}")))?;
        check_config(&config)?;
        let what = format!("loading a BERT model of {} bytes", weights.len());
        let _held = meter.reserve(mul(weights.len() as u64, 3, &what)?, &what)?;
        let vb = VarBuilder::from_buffered_safetensors(weights.to_vec(), DType::F32, device)
            .map_err(|e| NnError::invalid_encoding(format!("model.safetensors: {e}")))?;
        // Weights are named `embeddings.*` or `bert.embeddings.*` (as candle-transformers reads them).
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb };
        let mismatch =
            |e: candle_core::Error| NnError::invalid_encoding(format!("the weights do not match config.json: {e}"));
        let embeddings = Embeddings::load(vb.pp("embeddings"), &config).map_err(mismatch)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            meter.checkpoint(&format_args!("loading BERT layer {i}"))?;
            layers.push(Layer::load(vb.pp(format!("encoder.layer.{i}")), &config).map_err(mismatch)?);
        }
        Ok(Self { embeddings, layers, config, device: device.clone() })
    }

    /// The most bytes a forward pass over `batch × seq` tokens holds at once: per layer the
    /// attention scores and their softmax (`batch × heads × seq²`, three copies), a dozen
    /// `hidden`-wide and two `intermediate`-wide activations per token, all f32.
    pub fn forward_bytes(&self, batch: usize, seq: usize) -> Result<u64, NnError> {
        let c = &self.config;
        let what = &"the BERT forward pass";
        let tokens = mul(batch as u64, seq as u64, what)?;
        let scores = mul(mul(tokens, seq as u64, what)?, c.num_attention_heads as u64, what)?;
        // (An upper bound on what a layer holds per token: its input, Q/K/V, the context, the
        // output and a partial sum, each `hidden`-wide, the feed-forward's inner values, and the
        // embeddings' token-major copy; more than the layers hold at once.)
        let per_token = 14 * c.hidden_size as u64 + 6 * c.intermediate_size as u64;
        let floats = mul(scores, 3, what)?.checked_add(mul(tokens, per_token, what)?);
        mul(floats.ok_or_else(|| NnError::too_large("the BERT forward pass overflows"))?, 4, what)
    }

    /// How a pass over `batch × seq` tokens runs and what it holds: the rows per chunk, the
    /// bytes of the finished rows (kept twice: the chunks and their concatenation), and one
    /// chunk's working set.
    fn pass_plan(&self, batch: usize, seq: usize) -> Result<(usize, u64, u64), NnError> {
        let what = &"the BERT forward pass";
        let output = mul(mul(batch as u64, seq as u64, what)?, 4 * self.config.hidden_size as u64, what)?;
        // As many chunks as the cap needs, of rows shared out evenly: a short last chunk
        // runs its GEMMs on narrow products.
        let most = (TOKENS_PER_STEP / seq.max(1)).clamp(1, batch.max(1));
        let rows = batch.max(1).div_ceil(batch.max(1).div_ceil(most));
        Ok((rows, mul(output, 2, what)?, self.forward_bytes(rows, seq)?))
    }

    /// The hidden size.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Runs the encoder on token ids already on this model's device (for benchmarks and
    /// direct callers; plugins go through [`Model::compute`]), with no budget or deadline.
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor, NnError> {
        self.forward_with(ids, types, mask, &Meter::with_budget(u64::MAX))
    }

    /// [`forward`](Self::forward) under `meter`: its estimated memory reserved first, its
    /// deadline and cancellation checked between layers.
    pub fn forward_with(&self, ids: &Tensor, types: &Tensor, mask: &Tensor, meter: &Meter) -> Result<Tensor, NnError> {
        let (batch, seq) = ids.dims2()?;
        let what = format!("a BERT pass over {batch}x{seq} tokens");
        let (rows, outputs, step) = self.pass_plan(batch, seq)?;
        let _output = meter.reserve(outputs, &what)?;
        let _step = meter.reserve(step, &what)?;
        let mut done = Vec::with_capacity(batch.div_ceil(rows));
        // Buffers every layer of every chunk reuses: the attention's output, and the rest.
        let (mut mid, mut scratch) = (Vec::new(), Scratch::default());
        let mut profile = Profile::start();
        for start in (0..batch).step_by(rows) {
            let n = rows.min(batch - start);
            let (ids, types, mask) = (ids.narrow(0, start, n)?, types.narrow(0, start, n)?, mask.narrow(0, start, n)?);
            let h = self.config.hidden_size;
            let short = || NnError::runtime("the BERT pass: operand sizes do not match");
            // The hidden states, transposed ([hidden][rows·seq]) for the layers.
            let values =
                |t: &Tensor| -> Result<Vec<i64>, NnError> { Ok(t.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?) };
            let mut xt = self.embeddings.forward_t(&values(&ids)?, &values(&types)?, seq)?;
            profile.lap(0);
            // Per token: 0 where attended, f32::MIN where masked.
            let mut mask: Vec<f32> = mask
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(|m| if m == 0.0 { f32::MIN } else { 0.0 })
                .collect();
            // The chunk's rows still computed: in a batch, rows whose caller went away are
            // dropped between blocks (rows are independent), the rest go on.
            let mut alive: Vec<usize> = (start..start + n).collect();
            for (k, layer) in self.layers.iter().enumerate() {
                meter.checkpoint(&format_args!("BERT layer {k} (attention) of rows {start}..{}", start + n))?;
                if meter.is_batch() {
                    let keep: Vec<usize> = (0..alive.len()).filter(|&i| meter.row_wanted(alive[i])).collect();
                    if keep.is_empty() {
                        alive.clear();
                        break;
                    }
                    if keep.len() < alive.len() {
                        let mut kept = Vec::with_capacity(h * keep.len() * seq);
                        for feature in xt.chunks_exact(alive.len() * seq) {
                            for &i in &keep {
                                kept.extend_from_slice(&feature[i * seq..(i + 1) * seq]);
                            }
                        }
                        xt = kept;
                        mask = keep.iter().flat_map(|&i| mask[i * seq..(i + 1) * seq].iter().copied()).collect();
                        alive = keep.iter().map(|&i| alive[i]).collect();
                    }
                }
                layer.attention(&xt, [alive.len(), seq], &mask, &mut scratch, &mut mid, &mut profile)?;
                meter.checkpoint(&format_args!("BERT layer {k} (feed-forward) of rows {start}..{}", start + n))?;
                layer.feed_forward(&mid, alive.len() * seq, &mut scratch, &mut xt, &mut profile)?;
            }
            // Rows nobody waits for come back as zeros (their callers are gone).
            let mut out = crate::nn::kernels::filled(n * seq * h, 0f32);
            if !alive.is_empty() {
                let rows_out = act::transpose(&xt, h, alive.len() * seq).ok_or_else(short)?;
                for (row, &r) in rows_out.chunks_exact(seq * h).zip(&alive) {
                    out[(r - start) * seq * h..(r - start + 1) * seq * h].copy_from_slice(row);
                }
            }
            done.push(Tensor::from_vec(out, (n, seq, h), &self.device)?);
        }
        profile.log(batch * seq);
        Ok(if done.len() == 1 { done.remove(0) } else { Tensor::cat(&done, 0)? })
    }
}

/// Reads an integer input as i64 values with its `[batch, seq]` shape.
fn ids(name: &str, t: &HostTensor) -> Result<(Vec<i64>, [usize; 2]), NnError> {
    let [b, s] = t.dims() else {
        return Err(NnError::invalid_argument(format!("`{name}` must be [batch, seq], got {:?}", t.dims())));
    };
    let values = match t.ty() {
        TensorType::I64 => {
            t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default())).collect()
        }
        TensorType::I32 => {
            t.data().chunks_exact(4).map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap_or_default()))).collect()
        }
        other => {
            return Err(NnError::invalid_argument(format!("`{name}` must be I64 or I32, got {other:?}")));
        }
    };
    Ok((values, [*b as usize, *s as usize]))
}

fn check_range(name: &str, values: &[i64], below: usize) -> Result<(), NnError> {
    match values.iter().find(|&&v| v < 0 || v as u64 >= below as u64) {
        Some(v) => Err(NnError::invalid_argument(format!("`{name}` holds {v}, outside 0..{below}"))),
        None => Ok(()),
    }
}

impl Model for Bert {
    fn family(&self) -> &'static str {
        "bert"
    }

    fn input_names(&self) -> Vec<String> {
        INPUTS.iter().map(|s| s.to_string()).collect()
    }

    fn batching(&self) -> Option<BatchSpec> {
        Some(BatchSpec {
            inputs: INPUTS.iter().map(|i| (i.to_string(), true)).collect(),
            mask: Some(INPUTS[1].to_string()),
            outputs: vec![(OUTPUT.to_string(), true)],
        })
    }

    fn pass_bytes(&self, rows: usize, seq: usize) -> Option<u64> {
        // Exactly what `forward_with` reserves.
        let (_, outputs, step) = self.pass_plan(rows, seq).ok()?;
        outputs.checked_add(step)
    }

    fn compute_with(&self, inputs: Named, meter: &Meter) -> Result<Named, NnError> {
        let mut by_name: [Option<HostTensor>; 3] = [None, None, None];
        for (name, t) in inputs {
            let slot = INPUTS.iter().position(|i| *i == name).ok_or_else(|| {
                NnError::invalid_argument(format!("unknown input `{name}` (a BERT graph takes {})", INPUTS.join(", ")))
            })?;
            by_name[slot] = Some(t);
        }
        let [Some(input_ids), mask, types] = by_name else {
            return Err(NnError::invalid_argument("missing input `input_ids`"));
        };
        let (ids_v, shape) = ids("input_ids", &input_ids)?;
        let [batch, seq] = shape;
        if batch == 0 || seq == 0 {
            return Err(NnError::invalid_argument(format!("empty input_ids {shape:?}")));
        }
        if seq > self.config.max_position_embeddings {
            return Err(NnError::invalid_argument(format!(
                "sequence of {seq} tokens is longer than this model's {} positions; truncate it",
                self.config.max_position_embeddings
            )));
        }
        check_range("input_ids", &ids_v, self.config.vocab_size)?;
        let aux = |name: &str, t: Option<HostTensor>, below: usize, default: i64| -> Result<Vec<i64>, NnError> {
            match t {
                None => Ok(vec![default; batch * seq]),
                Some(t) => {
                    let (v, s) = ids(name, &t)?;
                    if s != shape {
                        return Err(NnError::invalid_argument(format!("`{name}` is {s:?} but input_ids is {shape:?}")));
                    }
                    check_range(name, &v, below)?;
                    Ok(v)
                }
            }
        };
        let mask_v = aux("attention_mask", mask, 2, 1)?;
        let types_v = aux("token_type_ids", types, self.config.type_vocab_size, 0)?;

        let to_tensor = |v: Vec<i64>| Tensor::from_vec(v, (batch, seq), &self.device);
        let hidden = self.forward_with(&to_tensor(ids_v)?, &to_tensor(types_v)?, &to_tensor(mask_v)?, meter)?;
        Ok(vec![(OUTPUT.to_string(), HostTensor::from_candle(&hidden)?)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny BERT of the fuzz corpus: `config.json`, a 0 byte, then a safetensors file.
    fn tiny() -> (String, Vec<u8>) {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/bert/tiny.bin");
        let data = std::fs::read(path).expect("the tiny BERT of host/fuzz/corpus");
        let split = data.iter().position(|&b| b == 0).expect("config, 0, weights");
        (String::from_utf8(data[..split].to_vec()).expect("UTF-8 config"), data[split + 1..].to_vec())
    }

    #[test]
    fn ids_outside_the_tables_are_errors_not_panics() {
        let (config, weights) = tiny();
        let bert = Bert::from_bytes(&config, &weights, &Device::Cpu, &Meter::with_budget(u64::MAX)).unwrap();
        let t = |v: Vec<i64>| Tensor::from_vec(v, (1, 3), &Device::Cpu).unwrap();
        let (types, mask) = (t(vec![0, 1, 0]), t(vec![1, 1, 1]));
        let out = bert.forward(&t(vec![1, 2, 9]), &types, &mask).expect("ids within the vocabulary of 10");
        assert_eq!(out.dims(), &[1, 3, 8]);
        for (ids, types) in
            [(vec![1, 10, 2], vec![0, 0, 0]), (vec![1, -1, 2], vec![0, 0, 0]), (vec![1, 2, 3], vec![0, 2, 0])]
        {
            let err = bert.forward(&t(ids.clone()), &t(types), &mask).expect_err("an id outside its table");
            assert_eq!(err.code, crate::nn::bindings::errors::ErrorCode::InvalidArgument, "{ids:?}: {}", err.message);
        }
    }

    #[test]
    fn dense_layers_match_a_plain_product_shallow_and_deep() {
        use crate::nn::kernels::simd;
        let dev = Device::Cpu;
        // Every SIMD level (weights packed for it), short sentences (the turned-around kernel)
        // and long ones, ReLU after the product and GELU fused into it.
        for level in simd::levels() {
            let _cap = simd::cap(level);
            for (out, inp, tokens) in [(3, 5, 1), (40, 384, 7), (24, 1100, 33), (384, 1536, 20), (36, 800, 128)] {
                let w: Vec<f32> = (0..out * inp).map(|i| (((i * 7919) % 199) as f32 - 99.0) * 0.003).collect();
                let b: Vec<f32> = (0..out).map(|i| i as f32 * 0.01).collect();
                let dense = Dense::new(
                    &Tensor::from_vec(w.clone(), (out, inp), &dev).unwrap(),
                    &Tensor::from_vec(b.clone(), out, &dev).unwrap(),
                )
                .unwrap();
                let xt: Vec<f32> = (0..inp * tokens).map(|i| (((i * 104729) % 97) as f32 - 48.0) * 0.01).collect();
                for act in [Act::Relu, Act::Gelu] {
                    // A reused buffer of the wrong size is resized, and every value overwritten.
                    let mut yt = vec![f32::NAN; 5];
                    dense.forward_t(&xt, tokens, Some(act), &mut yt).unwrap();
                    for o in 0..out {
                        for t in 0..tokens {
                            let pre: f64 = (0..inp)
                                .map(|i| f64::from(w[o * inp + i]) * f64::from(xt[i * tokens + t]))
                                .sum::<f64>()
                                + f64::from(b[o]);
                            let mut want = [pre as f32];
                            act::activate(&mut want, act);
                            let got = yt[o * tokens + t];
                            assert!(
                                (got - want[0]).abs() <= 1e-4,
                                "{level:?} {act:?} {out}x{inp}x{tokens} ({o}, {t}): {got} vs {}",
                                want[0]
                            );
                        }
                    }
                }
                assert!(dense.forward_t(&xt[1..], tokens, None, &mut vec![]).is_err(), "a short input");
            }
        }
    }

    #[test]
    fn loading_is_charged_to_the_load_budget_before_anything_is_copied() {
        let (config, weights) = tiny();
        let roomy = Meter::with_budget(3 * weights.len() as u64);
        Bert::from_bytes(&config, &weights, &Device::Cpu, &roomy).expect("fits in three times its size");
        let tight = Meter::with_budget(3 * weights.len() as u64 - 1);
        let err = Bert::from_bytes(&config, &weights, &Device::Cpu, &tight).err().expect("over the budget");
        assert!(err.message.contains("loading a BERT model"), "{}", err.message);
        let token = crate::nn::CancelToken::new();
        let cancelled = Meter::for_load(u64::MAX, token.clone(), None);
        token.cancel();
        assert!(Bert::from_bytes(&config, &weights, &Device::Cpu, &cancelled).is_err(), "a cancelled load stops");
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// The fetched, verified MiniLM (a missing one fails with the command that fetches it), from
    /// `EIR_MODELS_DIR` or the repository's `models/`.
    fn minilm() -> Bert {
        let models = std::env::var_os("EIR_MODELS_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"));
        let dir = crate::registry::fetch::locate("minilm", &models).unwrap_or_else(|e| panic!("{e:#}"));
        let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
        Bert::from_dir(&dir, &config, &Device::Cpu, &Meter::with_budget(u64::MAX)).unwrap()
    }

    /// Not a test: `cargo test -p eir --lib bert::timing -- --ignored --nocapture` prints where a
    /// MiniLM pass spends its time, per stage of one layer, at the embed bench's shapes.
    #[test]
    #[ignore]
    fn stages_of_a_minilm_layer() {
        let bert = minilm();
        let layer = &bert.layers[0];
        let time = |f: &mut dyn FnMut()| crate::nn::kernels::median_time(20, f).as_secs_f64() * 1e3;
        for (rows, seq) in [(1usize, 8usize), (1, 128), (32, 20), (8, 128)] {
            let tokens = rows * seq;
            let h = bert.config.hidden_size;
            let xt: Vec<f32> = (0..h * tokens).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
            let mask = vec![0f32; tokens];
            let (mut y, mut s) = (Vec::new(), Scratch::default());
            let qkv = time(&mut || layer.qkv.forward_t(&xt, tokens, None, &mut s.qkvt).unwrap());
            let dims = [rows, seq, h, layer.heads];
            let att = time(&mut || attend(&s.qkvt, dims, &mask, &mut s.ctxt).unwrap());
            // The same on two GEMMs per row and head (what CPUs without AVX-512 run).
            let shape = attention::Shape::new(dims, s.qkvt.len(), mask.len()).unwrap();
            let by_gemm = time(&mut || attention::by_gemm(&shape, &s.qkvt, &mask, &mut s.ctxt).unwrap());
            let out = time(&mut || layer.attention_out.forward_t(&xt, tokens, None, &mut y).unwrap());
            let mut normed = xt.clone();
            let norm = time(&mut || layer.attention_norm.residual(&mut normed, &xt, tokens).unwrap());
            let ffn1 = time(&mut || layer.intermediate.forward_t(&xt, tokens, Some(Act::Gelu), &mut s.inner).unwrap());
            let ffn2 = time(&mut || layer.output.forward_t(&s.inner, tokens, None, &mut y).unwrap());
            let (mut mid, mut next) = (Vec::new(), Vec::new());
            let whole = time(&mut || {
                layer.attention(&xt, [rows, seq], &mask, &mut s, &mut mid, &mut Profile(None)).unwrap();
                layer.feed_forward(&mid, tokens, &mut s, &mut next, &mut Profile(None)).unwrap();
            });
            let ids = Tensor::from_vec(vec![1000i64; tokens], (rows, seq), &Device::Cpu).unwrap();
            let ones = Tensor::ones((rows, seq), DType::I64, &Device::Cpu).unwrap();
            let zeros = Tensor::zeros((rows, seq), DType::I64, &Device::Cpu).unwrap();
            let pass = time(&mut || drop(bert.forward(&ids, &zeros, &ones).unwrap()));
            eprintln!(
                "{rows:>2} x {seq:>3}: pass {pass:.3} ms; layer {whole:.3} ms = qkv {qkv:.3} + attend {att:.3} + out {out:.3} + 2 norms {:.3} + ffn1+gelu {ffn1:.3} + ffn2 {ffn2:.3} (attend on two GEMMs: {by_gemm:.3})",
                2.0 * norm
            );
        }
    }

    /// Not a test: `cargo test -p eir --lib bert::timing::passes_side_by_side -- --ignored
    /// --nocapture` prints what a sentence of 8 tokens costs at the batch sizes the gateway
    /// forms (1, 7 and 16 rows), run on a pool of two threads as the scheduler runs passes:
    /// one pass at a time, two passes sharing the pool (the default `compute_passes`), and two
    /// passes each on a thread of its own. Milliseconds of wall time a row; how far batching
    /// on two cores can take text-embed's 32 connections.
    #[test]
    #[ignore]
    fn passes_side_by_side() {
        let bert = minilm();
        let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let awake = crate::scheduler::Awake::new(true);
        let passes = 60usize;
        for rows in [1usize, 7, 16] {
            let ids = Tensor::from_vec(vec![1000i64; rows * 8], (rows, 8), &Device::Cpu).unwrap();
            let ones = Tensor::ones((rows, 8), DType::I64, &Device::Cpu).unwrap();
            let zeros = Tensor::zeros((rows, 8), DType::I64, &Device::Cpu).unwrap();
            let pass = || drop(bert.forward(&ids, &zeros, &ones).unwrap());
            let per_row = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3 / (passes * rows) as f64;
            for _ in 0..3 {
                let t = std::time::Instant::now();
                two.install(|| (0..passes).for_each(|_| awake.run(pass)));
                let alone = per_row(t);
                let t = std::time::Instant::now();
                let half = || (0..passes / 2).for_each(|_| awake.run(pass));
                two.install(|| rayon::join(half, half));
                let sharing = per_row(t);
                let t = std::time::Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..2 {
                        s.spawn(|| {
                            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
                            one.install(|| (0..passes / 2).for_each(|_| pass()));
                        });
                    }
                });
                let apart = per_row(t);
                eprintln!(
                    "{rows:>2} rows: one pass at a time {alone:.3} | two sharing the pool {sharing:.3} | two on a thread each {apart:.3} ms a row"
                );
            }
        }
    }
}
