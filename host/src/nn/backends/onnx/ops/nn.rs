//! Neural-network operators: convolution (with a direct depthwise kernel and a matmul path for
//! 1x1), normalisation, pooling, matrix products, softmax.

use candle_core::{D, DType, Tensor};
use rayon::prelude::*;

use super::elementwise::{broadcast_bound, broadcast_shape};
use super::{Built, Node, axis, count, input, op, op_sized, wide};
use super::{conv, depthwise};
use crate::nn::bindings::errors::ErrorCode;
use crate::nn::error::NnError;
use crate::nn::kernels::act;
use crate::nn::kernels::sgemm::{self, Clamp, Packed, Strips};

pub(super) fn build(name: &str, node: &Node<'_>) -> Option<Built> {
    Some(match name {
        "Conv" => Conv::build(node),
        "BatchNormalization" => {
            let eps = f64::from(node.float_or("epsilon", 1e-5));
            op_sized(channel_bound, move |i| Ok(vec![batch_norm(i, eps)?]))
        }
        "Gemm" => Gemm::build(node),
        "MatMul" => Ok(Box::new(MatMul {
            dense: Gemm {
                alpha: 1.0,
                beta: 1.0,
                ta: false,
                tb: false,
                weights: Default::default(),
                strips: Default::default(),
            },
            constant_b: std::sync::atomic::AtomicBool::new(false),
            bias: None,
            gelu: false,
        })),
        "Flatten" => {
            let ax = node.int_or("axis", 1);
            op(move |i| {
                let x = input(i, 0, "Flatten")?;
                let a = if ax < 0 { ax + x.rank() as i64 } else { ax } as usize;
                let outer: usize = x.dims()[..a.min(x.rank())].iter().product();
                Ok(vec![x.reshape((outer, x.elem_count() / outer.max(1)))?])
            })
        }
        "GlobalAveragePool" => op(|i| {
            let x = input(i, 0, "GlobalAveragePool")?;
            if x.dtype() == DType::F32 && x.rank() >= 3 {
                // One pass over each plane (candle's reductions over trailing axes copy first).
                let plane = x.dims()[2..].iter().product::<usize>();
                let means: Vec<f32> = super::with_f32(x, |v| plane_means(v, plane))?;
                let mut dims = x.dims()[..2].to_vec();
                dims.resize(x.rank(), 1);
                return Ok(vec![Tensor::from_vec(means, dims, x.device())?]);
            }
            let mut y = x.clone();
            for d in (2..x.rank()).rev() {
                y = y.mean_keepdim(d)?;
            }
            Ok(vec![y])
        }),
        "GlobalMaxPool" => op(|i| {
            let x = input(i, 0, "GlobalMaxPool")?;
            let mut y = x.clone();
            for d in (2..x.rank()).rev() {
                y = y.max_keepdim(d)?;
            }
            Ok(vec![y])
        }),
        "AveragePool" | "MaxPool" => Pool::build(node, name == "MaxPool"),
        "Softmax" | "LogSoftmax" => {
            let log = name == "LogSoftmax";
            let legacy = node.opset < 13;
            let ax = node.int_or("axis", if legacy { 1 } else { -1 });
            op(move |i| Ok(vec![softmax(input(i, 0, "Softmax")?, ax, legacy, log)?]))
        }
        "LayerNormalization" => {
            let ax = node.int_or("axis", -1);
            let eps = f64::from(node.float_or("epsilon", 1e-5));
            op(move |i| Ok(vec![layer_norm(i, ax, eps)?]))
        }
        "DequantizeLinear" => {
            let ax = node.int_or("axis", 1);
            op_sized(broadcast_bound(4), move |i| {
                let x = input(i, 0, "DequantizeLinear")?.to_dtype(DType::F32)?;
                let scale = input(i, 1, "DequantizeLinear")?.to_dtype(DType::F32)?;
                let zp = i.get(2).copied().flatten().map(|z| z.to_dtype(DType::F32)).transpose()?;
                // Per-axis: a 1-D scale (and zero point) along `axis`.
                let shape_for = |t: &Tensor| -> Result<Tensor, NnError> {
                    if t.rank() == 1 && t.elem_count() > 1 {
                        let a = axis(ax, x.rank())?;
                        let mut dims = vec![1usize; x.rank()];
                        dims[a] = t.elem_count();
                        Ok(t.reshape(dims)?)
                    } else {
                        Ok(t.clone())
                    }
                };
                let centred = match zp {
                    Some(z) => x.broadcast_sub(&shape_for(&z)?)?,
                    None => x.clone(),
                };
                Ok(vec![centred.broadcast_mul(&shape_for(&scale)?)?])
            })
        }
        _ => return None,
    })
}

/// What [`matmul`] allocates: the output and both operands broadcast over the batch axes.
fn matmul_bound(a: &[usize], b: &[usize]) -> Result<u64, NnError> {
    let a: Vec<usize> = if a.len() == 1 { vec![1, a[0]] } else { a.to_vec() };
    let b: Vec<usize> = if b.len() == 1 { vec![b[0], 1] } else { b.to_vec() };
    let (Some(&[m, k]), Some(&[k2, n])) =
        (a.last_chunk::<2>().map(|c| c.as_slice()), b.last_chunk::<2>().map(|c| c.as_slice()))
    else {
        return Err(NnError::invalid_argument(format!("MatMul of {a:?} and {b:?}")));
    };
    if k != k2 {
        return Err(NnError::invalid_argument(format!("MatMul of {a:?} and {b:?}: inner sizes differ")));
    }
    let batch = count(&broadcast_shape(&[&a[..a.len() - 2], &b[..b.len() - 2]])?)?;
    let per = [m, n, m, k, k, n].chunks(2).try_fold(0u64, |acc, p| acc.checked_add(count(p).ok()?));
    let per = per.ok_or_else(|| NnError::too_large("MatMul sizes overflow"))?;
    wide(batch, 1).and_then(|b| crate::nn::meter::mul(b, per, &"MatMul"))
}

/// What a per-channel operator (BatchNormalization) writes: `x` with its channel axis
/// broadcast against the parameters, twice.
fn channel_bound(i: &[Option<&Tensor>]) -> Result<u64, NnError> {
    let x = input(i, 0, "BatchNormalization")?;
    let mut dims = x.dims().to_vec();
    let widest = i.iter().skip(1).flatten().map(|t| t.elem_count()).max().unwrap_or(1);
    if let Some(c) = dims.get_mut(1)
        && *c == 1
    {
        *c = widest;
    }
    wide(count(&dims)?, 3)
}

/// `a · b` on EIR's GEMM for the case of a transformer's dense layers: f32 activations of any
/// rank against a 2-D `[K, N]` matrix (all leading axes of `a` are rows). `None` where it does
/// not apply (candle then computes it).
fn matmul_rows(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>, NnError> {
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 || b.rank() != 2 || a.rank() < 2 {
        return Ok(None);
    }
    let (k, n) = b.dims2()?;
    let mut dims = a.dims().to_vec();
    if dims.last() != Some(&k) || k == 0 || n == 0 {
        return Ok(None);
    }
    let m = a.elem_count() / k;
    let y = super::with_f32(a, |a_rows| super::with_f32(b, |b_kn| super::gemm_f32([m, n, k], a_rows, None, b_kn)))???;
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok(Some(Tensor::from_vec(y, dims, a.device())?))
}

/// `a · b` on EIR's GEMM for attention's products (`Q·Kᵀ`, `P·V`): f32 operands of the same
/// rank (3 or more) and the same batch axes, one product per batch entry, in parallel.
/// candle's batched matmul ran them one after another on one thread. `None` where it does not
/// apply.
fn matmul_batched(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>, NnError> {
    let r = a.rank();
    if a.dtype() != DType::F32
        || b.dtype() != DType::F32
        || r < 3
        || b.rank() != r
        || a.dims()[..r - 2] != b.dims()[..r - 2]
    {
        return Ok(None);
    }
    let ([m, k], [k2, n]) = ([a.dims()[r - 2], a.dims()[r - 1]], [b.dims()[r - 2], b.dims()[r - 1]]);
    if k != k2 || m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    let batch = a.elem_count() / (m * k);
    let len = batch * m * n;
    let mut y = super::uninit_f32(len)?;
    // A view (Kᵀ out of a Transpose) is copied out first (`matmul_bound` reserves it).
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    super::with_f32(&a, |a| {
        super::with_f32(&b, |b| {
            y.spare_capacity_mut()[..len]
                .par_chunks_mut(m * n)
                .zip(a.par_chunks(m * k))
                .zip(b.par_chunks(k * n))
                .try_for_each(|((y, a), b)| sgemm::gemm_into(1, [m, n, k], a, None, b, y, None, None))
        })
    })???;
    // SAFETY: every product returned Ok, so each wrote its `m·n` elements, and the `batch`
    // chunks of `m·n` cover all `len`.
    unsafe { y.set_len(len) };
    let mut dims = a.dims().to_vec();
    dims[r - 1] = n;
    Ok(Some(Tensor::from_vec(y, dims, a.device())?))
}

/// numpy `matmul`: 1-D operands are promoted and the added axis removed again.
pub(super) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor, NnError> {
    if let Some(y) = matmul_rows(a, b)? {
        return Ok(y);
    }
    if let Some(y) = matmul_batched(a, b)? {
        return Ok(y);
    }
    let (a1, b1) = (a.rank() == 1, b.rank() == 1);
    // Candle's kernel takes only operands whose batch axes collapse into one stride; a view
    // out of a Transpose (attention's Q·Kᵀ over [batch, heads, seq, head]) is copied out
    // first (`matmul_bound` reserves both operands' bytes).
    let a2 = if a1 { a.unsqueeze(0)? } else { a.contiguous()? };
    let b2 = if b1 { b.unsqueeze(1)? } else { b.contiguous()? };
    let mut y = if a2.rank() == 2 && b2.rank() == 2 { a2.matmul(&b2)? } else { a2.broadcast_matmul(&b2)? };
    if b1 {
        y = y.squeeze(D::Minus1)?;
    }
    if a1 {
        y = y.squeeze(if b1 { D::Minus1 } else { D::Minus2 })?;
    }
    Ok(y)
}

fn channel_view(t: &Tensor, rank: usize) -> Result<Tensor, NnError> {
    let mut dims = vec![1usize; rank];
    dims[1] = t.elem_count();
    Ok(t.reshape(dims)?)
}

/// Inference batch norm: `(x - mean) / sqrt(var + eps) * scale + bias`, per channel.
fn batch_norm(i: &[Option<&Tensor>], eps: f64) -> Result<Tensor, NnError> {
    let x = input(i, 0, "BatchNormalization")?;
    let [scale, bias, mean, var] = [1, 2, 3, 4].map(|k| input(i, k, "BatchNormalization"));
    let (scale, bias, mean, var) = (scale?, bias?, mean?, var?);
    let a = scale.broadcast_div(&(var + eps)?.sqrt()?)?;
    let b = (bias - mean.broadcast_mul(&a)?)?;
    Ok(x.broadcast_mul(&channel_view(&a, x.rank())?)?.broadcast_add(&channel_view(&b, x.rank())?)?)
}

fn softmax(x: &Tensor, ax: i64, legacy: bool, log: bool) -> Result<Tensor, NnError> {
    let a = axis(ax, x.rank())?;
    if x.elem_count() == 0 {
        // Nothing to normalise (candle's kernel panics on rows of length 0).
        return Ok(x.clone());
    }
    // Rows of the last axis (before opset 13, of everything from `a` on) in parallel on EIR's
    // vectorised exp: candle's runs on one thread (17 of a batched MiniLM graph's 185 ms).
    let cols = if legacy { x.dims()[a..].iter().product() } else { x.dims().get(a).copied().unwrap_or(0) };
    if !log && (legacy || a + 1 == x.rank()) && x.dtype() == DType::F32 && cols > 0 {
        let y = super::with_f32(x, |v| super::elementwise::map_rows(v, cols, |c| act::softmax_rows(c, cols)))??;
        return Ok(Tensor::from_vec(y, x.dims(), x.device())?);
    }
    let f = |t: &Tensor, d: usize| -> Result<Tensor, NnError> {
        Ok(if log {
            candle_nn::ops::log_softmax(t, d)?
        } else if d + 1 == t.rank() {
            candle_nn::ops::softmax_last_dim(&t.contiguous()?)?
        } else {
            candle_nn::ops::softmax(t, d)?
        })
    };
    if legacy {
        // Before opset 13 the input is seen as 2-D: [prod(dims[..axis]), prod(dims[axis..])].
        let outer: usize = x.dims()[..a].iter().product();
        let flat = x.reshape((outer, x.elem_count() / outer.max(1)))?;
        return Ok(f(&flat, 1)?.reshape(x.dims())?);
    }
    f(x, a)
}

fn layer_norm(i: &[Option<&Tensor>], ax: i64, eps: f64) -> Result<Tensor, NnError> {
    let x = input(i, 0, "LayerNormalization")?;
    let scale = input(i, 1, "LayerNormalization")?;
    let a = axis(ax, x.rank())?;
    let outer: usize = x.dims()[..a].iter().product();
    let inner = x.elem_count() / outer.max(1);
    let bias = i.get(2).copied().flatten();
    if x.dtype() == DType::F32
        && inner > 0
        && scale.elem_count() == inner
        && scale.dtype() == DType::F32
        && bias.is_none_or(|b| b.elem_count() == inner && b.dtype() == DType::F32)
    {
        // Rows in parallel, vectorised (candle's four passes ran on one thread).
        let gamma = super::with_f32(scale, <[f32]>::to_vec)?;
        let beta = match bias {
            Some(b) => super::with_f32(b, <[f32]>::to_vec)?,
            None => vec![0.0; inner],
        };
        let y = super::with_f32(x, |v| {
            super::elementwise::map_rows(v, inner, |c| {
                // Whole rows, one value per column: always `Some`.
                let _ = act::layer_norm_rows(c, inner, &gamma, &beta, eps as f32);
            })
        })??;
        return Ok(Tensor::from_vec(y, x.dims(), x.device())?);
    }
    let flat = x.reshape((outer, inner))?.to_dtype(DType::F32)?;
    let mean = flat.mean_keepdim(1)?;
    let centred = flat.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(x.dims())?.to_dtype(x.dtype())?;
    let mut y = normed.broadcast_mul(scale)?;
    if let Some(b) = i.get(2).copied().flatten() {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// Padding of one spatial dimension: explicit, or computed for `auto_pad`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

impl AutoPad {
    fn parse(node: &Node<'_>) -> Result<Self, NnError> {
        Ok(match node.string("auto_pad").as_deref().unwrap_or("NOTSET") {
            "NOTSET" => Self::NotSet,
            "SAME_UPPER" => Self::SameUpper,
            "SAME_LOWER" => Self::SameLower,
            "VALID" => Self::Valid,
            other => return Err(node.bad(format!("unknown auto_pad `{other}`"))),
        })
    }

    /// (begin, end) padding for input size `n`, kernel `k`, stride `s`, dilation `d` (all
    /// checked by the caller to be at least 1, except `n`).
    fn pads(self, explicit: (usize, usize), n: usize, k: usize, s: usize, d: usize) -> Result<(usize, usize), NnError> {
        Ok(match self {
            Self::NotSet => explicit,
            Self::Valid => (0, 0),
            Self::SameUpper | Self::SameLower => {
                let out = n.div_ceil(s.max(1));
                let reach = out
                    .saturating_sub(1)
                    .checked_mul(s)
                    .and_then(|a| a.checked_add(k.saturating_sub(1).checked_mul(d)?))
                    .and_then(|a| a.checked_add(1))
                    .ok_or_else(|| NnError::too_large("auto_pad: the padding does not fit in memory"))?;
                let total = reach.saturating_sub(n);
                let small = total / 2;
                if self == Self::SameUpper { (small, total - small) } else { (total - small, small) }
            }
        })
    }
}

/// Largest pad, stride, dilation or kernel extent accepted: far beyond any real model, and
/// small enough that every size computed from them stays well inside 64 bits.
pub(super) const MAX_GEOMETRY: i64 = 1 << 20;

/// A geometry attribute (`strides`, `pads`, ...), each value in `min..=MAX_GEOMETRY`, with
/// `per_axis` values per spatial axis when the rank is known. `None` when absent.
fn geometry_ints(node: &Node<'_>, name: &str, min: i64) -> Result<Option<Vec<usize>>, NnError> {
    let Some(v) = node.ints(name) else { return Ok(None) };
    v.iter()
        .map(|&x| {
            if (min..=MAX_GEOMETRY).contains(&x) {
                Ok(x as usize)
            } else {
                Err(node.bad(format!("attribute `{name}` holds {x}, outside {min}..={MAX_GEOMETRY}")))
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The spatial rank the geometry attributes agree on (`None` if none is given), or an error
/// naming the attribute whose length does not fit.
fn spatial_rank(node: &Node<'_>, attrs: &[(&str, &Option<Vec<usize>>, usize)]) -> Result<Option<usize>, NnError> {
    let mut rank = None;
    for &(name, values, per_axis) in attrs {
        let Some(v) = values else { continue };
        if v.is_empty() || v.len() % per_axis != 0 {
            return Err(node.bad(format!("attribute `{name}` has {} values", v.len())));
        }
        let r = v.len() / per_axis;
        match rank {
            Some(prev) if prev != r => {
                return Err(node.bad(format!("attribute `{name}` is for {r} spatial axes, others for {prev}")));
            }
            _ => rank = Some(r),
        }
    }
    Ok(rank)
}

/// Convolution over 1 or 2 spatial dimensions.
/// `Y = alpha·A'·B' + beta·C`. The common case (f32, `B` a weight matrix, alpha 1) runs on
/// EIR's GEMM turned around, `Yᵀ = B'ᵀ·A'ᵀ`: the weights, `[N, K]` row-major, are then the
/// product's left operand, packed once for the tile kernels, and the activations its right
/// one. A classifier over a small batch so becomes a few columns against a packed matrix (the
/// column kernel), where the activations as rows had left each weight read from memory at a
/// stride of one row per step (EfficientNet's 1280→1000 at batch 8: 0.86 ms; ORT 0.30).
/// Everything else runs on candle's matmul.
struct Gemm {
    alpha: f64,
    beta: f64,
    ta: bool,
    tb: bool,
    /// `B'ᵀ` contiguous `[N, K]`, and packed for the tile kernels where the CPU has them.
    weights: super::Derived<(Vec<f32>, Option<Packed>)>,
    /// `B'` in strips for `A'·B'` over at least [`STRIPS_MIN_ROWS`] rows, made on the first
    /// such product (or at load, for `MatMul`'s dense layers).
    strips: super::Derived<Option<Strips>>,
}

/// Fewest rows of `A'` that run as `A'·B'` on [`Strips`] (`sgemm::timing::strips`: from 24
/// rows up 0.43–0.83x the turned-around product with its two transposes, MiniLM's layers;
/// at 16 rows 0.94–1.12x; up to 8 the turned-around column kernel wins).
const STRIPS_MIN_ROWS: usize = 17;

impl Gemm {
    fn build(node: &Node<'_>) -> Built {
        Ok(Box::new(Gemm {
            alpha: f64::from(node.float_or("alpha", 1.0)),
            beta: f64::from(node.float_or("beta", 1.0)),
            ta: node.int_or("transA", 0) != 0,
            tb: node.int_or("transB", 0) != 0,
            weights: Default::default(),
            strips: Default::default(),
        }))
    }

    /// `B'ᵀ` as `[N, K]` row-major floats and packed (empty if `b` cannot be read so).
    fn weights(b: &Tensor, tb: bool) -> (Vec<f32>, Option<Packed>) {
        let b = if tb { Ok(b.clone()) } else { b.t() };
        let nk = b.and_then(|b| Ok((b.dims2()?, b.flatten_all()?.to_vec1::<f32>()?)));
        match nk {
            Ok(((n, k), w)) => {
                let packed = Packed::new(n, k, &w);
                (w, packed)
            }
            Err(_) => (Vec::new(), None),
        }
    }

    /// `B'`'s `(k, n)` where `prepare` derives its weights: a constant f32 matrix at least 16
    /// columns wide.
    fn prepares(&self, constants: &[Option<&Tensor>]) -> Option<(u64, u64)> {
        let b = constants.get(1).copied().flatten()?;
        let (b0, b1) = b.dims2().ok()?;
        let (k, n) = if self.tb { (b1, b0) } else { (b0, b1) };
        (b.dtype() == DType::F32 && n >= 16).then_some((k as u64, n as u64))
    }

    /// `B'` (of which `w` is `B'ᵀ`, `n×k`) in strips, made on first use.
    fn strips(&self, b: &Tensor, w: &[f32], n: usize, k: usize) -> std::sync::Arc<Option<Strips>> {
        self.strips.get(b.id(), || Strips::from_transposed(n, k, w))
    }

    /// `A'·B'` on EIR's GEMM, or `None` where it does not apply.
    fn fast(&self, a: &Tensor, b: &Tensor) -> Result<Option<Tensor>, NnError> {
        self.fast_with(a, b, None, false)
    }

    /// [`Gemm::fast`] with a bias per output column (`N` values) and, where `gelu`, GELU
    /// after it, both in the product's epilogue.
    fn fast_with(&self, a: &Tensor, b: &Tensor, bias: Option<&[f32]>, gelu: bool) -> Result<Option<Tensor>, NnError> {
        if a.dtype() != DType::F32 || b.dtype() != DType::F32 || a.rank() != 2 || b.rank() != 2 || self.ta {
            return Ok(None);
        }
        let ((m, k), (b0, b1)) = (a.dims2()?, b.dims2()?);
        let (kb, n) = if self.tb { (b1, b0) } else { (b0, b1) };
        if kb != k || n < 16 || bias.is_some_and(|b| b.len() != n) {
            return Ok(None);
        }
        let weights = self.weights.get(b.id(), || Self::weights(b, self.tb));
        let (w, packed) = &*weights;
        if w.len() != n * k {
            return Ok(None);
        }
        // (Strips are made only with AVX-512; a test may lower the level after they were.)
        if m >= STRIPS_MIN_ROWS
            && crate::nn::kernels::simd::avx512()
            && let Some(strips) = &*self.strips(b, w, n, k)
        {
            // A' in place against B' in strips: neither transposed, the output as it lies.
            let y = super::with_f32(a, |a| super::gemm_strips_f32(m, a, strips, bias, gelu))??;
            return Ok(Some(Tensor::from_vec(y, (m, n), a.device())?));
        }
        // A'ᵀ (`[K, M]`), the product's right operand.
        let at = super::with_f32(a, |a| act::transpose(a, m, k))?
            .ok_or_else(|| NnError::runtime("Gemm: operand sizes do not match"))?;
        // Yᵀ's rows are the output's columns: the bias is one value per row of the product.
        let yt = super::gemm_f32_with([n, m, k], w, packed.as_ref(), &at, bias, gelu)?;
        let y = act::transpose(&yt, n, m).ok_or_else(|| NnError::runtime("Gemm: operand sizes do not match"))?;
        Ok(Some(Tensor::from_vec(y, (m, n), a.device())?))
    }
}

impl super::Op for Gemm {
    fn bound(&self, i: &[Option<&Tensor>]) -> Result<u64, NnError> {
        let (a, b) = (input(i, 0, "Gemm")?, input(i, 1, "Gemm")?);
        let (Ok((a0, a1)), Ok((b0, b1))) = (a.dims2(), b.dims2()) else {
            return Err(NnError::invalid_argument(format!(
                "Gemm of {:?} and {:?}: both must be 2-D",
                a.dims(),
                b.dims()
            )));
        };
        let (m, k) = if self.ta { (a1, a0) } else { (a0, a1) };
        let n = if self.tb { b0 } else { b1 };
        let c = i.get(2).copied().flatten().map_or(Ok(0), |c| count(c.dims()))?;
        let out = count(&[m, n])?;
        // The output, its transpose and a copy with C added; B' (derived), its packing (whole
        // panels of up to 16 rows) and its strips (whole strips of 32 columns); A' and its
        // transpose; C.
        let packed = count(&[k, n.saturating_add(16)])?;
        let strips = count(&[k, n.saturating_add(31)])?;
        let all = [out, out, out, count(&[k, n])?, packed, strips, count(&[m, k])?, count(&[m, k])?, c]
            .iter()
            .try_fold(0u64, |acc, &x| acc.checked_add(x));
        wide(all.ok_or_else(|| NnError::too_large("Gemm sizes overflow"))?, 1)
    }

    fn prepare(&self, constants: &[Option<&Tensor>]) {
        if self.prepares(constants).is_some()
            && let Some(Some(b)) = constants.get(1)
        {
            let _ = self.weights.get(b.id(), || Self::weights(b, self.tb));
        }
    }

    fn prepared_bytes(&self, constants: &[Option<&Tensor>]) -> super::Prepared {
        // B'ᵀ and its packing (whole panels of up to 16 rows) kept; while they are made, B
        // turned contiguous and read out (two copies).
        self.prepares(constants).map_or_else(Default::default, |(k, n)| super::Prepared {
            kept: super::f32_bytes(k.saturating_mul(n.saturating_mul(2).saturating_add(16))),
            transient: super::f32_bytes(k.saturating_mul(n).saturating_mul(2)),
        })
    }

    fn run(&self, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        let a = input(i, 0, "Gemm")?;
        let b = input(i, 1, "Gemm")?;
        let c = i.get(2).copied().flatten();
        // C as one value per output column (`[N]` or `[1, N]`, as a classifier's bias) joins
        // the product's epilogue: added after it by candle, it was a tenth of EfficientNet's
        // classifier, with the other thread waiting.
        let row = c.filter(|c| {
            self.alpha == 1.0 && self.beta == 1.0 && c.dtype() == DType::F32 && matches!(c.dims(), [_] | [1, _])
        });
        if let Some(c) = row
            && let Some(y) = super::with_f32(c, |bias| self.fast_with(a, b, Some(bias), false))??
        {
            return Ok(vec![y]);
        }
        let mut y = match self.fast(a, b)? {
            Some(y) => y,
            None => {
                let a = if self.ta { a.t()? } else { a.clone() };
                let b = if self.tb { b.t()? } else { b.clone() };
                a.matmul(&b)?
            }
        };
        if self.alpha != 1.0 {
            y = y.affine(self.alpha, 0.0)?;
        }
        if let Some(c) = c {
            let c = if self.beta != 1.0 { c.affine(self.beta, 0.0)? } else { c.clone() };
            y = y.broadcast_add(&c)?;
        }
        Ok(vec![y])
    }
}

/// `MatMul`. Against a constant 2-D matrix (a transformer's dense layers, every leading axis of
/// `A` a row), it runs as [`Gemm`]'s turned-around product on the matrix packed once at load:
/// the weights stream through the tile kernels in order (as `A` rows, the weights were read in
/// place a row of the matrix apart; MiniLM as ONNX at 8x128 tokens: 146-151 → 133-139 ms),
/// and a following `Add` of a constant bias and an exact GELU (`x·½(1 + erf(x/√2))`, as
/// exporters write it, or ONNX's `Gelu`) run in its epilogue once the graph compiler fuses them.
/// Anything else: [`matmul`], then the fused bias and GELU.
struct MatMul {
    dense: Gemm,
    /// Whether `B` is a constant of the graph (seen by `prepare`): only then is its packing
    /// kept, so that a `B` computed per pass is not packed for nothing.
    constant_b: std::sync::atomic::AtomicBool,
    /// A fused `Add` of a constant vector along the last axis.
    bias: Option<Vec<f32>>,
    /// A fused GELU (after the bias).
    gelu: bool,
}

impl MatMul {
    /// `a · b` as `Gemm` computes it, or `None` where that does not apply.
    fn dense(&self, a: &Tensor, b: &Tensor) -> Result<Option<Tensor>, NnError> {
        if !self.constant_b.load(std::sync::atomic::Ordering::Relaxed) || a.rank() < 2 || b.rank() != 2 {
            return Ok(None);
        }
        let (k, n) = b.dims2()?;
        if a.dims().last() != Some(&k) || k == 0 {
            return Ok(None);
        }
        let m = a.elem_count() / k;
        let Some(y) = self.dense.fast_with(&a.reshape((m, k))?, b, self.bias.as_deref(), self.gelu)? else {
            return Ok(None);
        };
        let mut dims = a.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok(Some(y.reshape(dims)?))
    }

    /// The plain product with the fused bias and GELU applied after it.
    fn plain(&self, a: &Tensor, b: &Tensor) -> Result<Tensor, NnError> {
        let mut y = matmul(a, b)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&Tensor::from_slice(bias, bias.len(), y.device())?.to_dtype(y.dtype())?)?;
        }
        if self.gelu {
            y = super::elementwise::gelu_erf(&y)?;
        }
        Ok(y)
    }
}

impl super::Op for MatMul {
    fn bound(&self, i: &[Option<&Tensor>]) -> Result<u64, NnError> {
        let (a, b) = (input(i, 0, "MatMul")?.dims(), input(i, 1, "MatMul")?.dims());
        let mut plain = matmul_bound(a, b)?;
        if self.bias.is_some() || self.gelu {
            // The plain product's fused bias and GELU each write a copy of its output: at most
            // what the product's own bound holds.
            plain = plain.checked_mul(2).ok_or_else(|| NnError::too_large("MatMul sizes overflow"))?;
        }
        // The turned-around product's `Aᵀ`, `Yᵀ` and `Y` (its derived weights are kept
        // beside the model, as `Gemm`'s are).
        let (&[k, n], true) = (b, a.len() >= 2) else { return Ok(plain) };
        let m = count(a)? / (k.max(1) as u64);
        let extra = (m.checked_mul(n as u64).and_then(|mn| mn.checked_mul(2)))
            .and_then(|x| x.checked_add(m.checked_mul(k as u64)?))
            .ok_or_else(|| NnError::too_large("MatMul sizes overflow"))?;
        plain.checked_add(wide(extra, 1)?).ok_or_else(|| NnError::too_large("MatMul sizes overflow"))
    }

    fn prepare(&self, constants: &[Option<&Tensor>]) {
        if let Some(Some(b)) = constants.get(1) {
            self.constant_b.store(true, std::sync::atomic::Ordering::Relaxed);
            super::Op::prepare(&self.dense, &[None, Some(b)]);
            // A transformer's dense layers run over many tokens: their strips too, at load.
            if self.dense.prepares(constants).is_some()
                && let Ok((k, n)) = b.dims2()
            {
                let weights = self.dense.weights.get(b.id(), || Gemm::weights(b, self.dense.tb));
                if weights.0.len() == n * k {
                    let _ = self.dense.strips(b, &weights.0, n, k);
                }
            }
        }
    }

    fn prepared_bytes(&self, constants: &[Option<&Tensor>]) -> super::Prepared {
        // Gemm's, and the strips (whole strips of 32 columns).
        let strips = self.dense.prepares(constants).map_or(0, |(k, n)| super::f32_bytes(k.saturating_mul(n + 31)));
        super::Op::prepared_bytes(&self.dense, constants).then(super::Prepared { kept: strips, transient: 0 })
    }

    fn fuse_bias(&mut self, bias: &[f32]) -> bool {
        // A bias added after the GELU is not the dense layer's.
        if self.bias.is_some() || self.gelu {
            return false;
        }
        self.bias = Some(bias.to_vec());
        true
    }

    fn fuse_gelu(&mut self) -> bool {
        !std::mem::replace(&mut self.gelu, true)
    }

    fn run(&self, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        let (a, b) = (input(i, 0, "MatMul")?, input(i, 1, "MatMul")?);
        match self.dense(a, b)? {
            Some(y) => Ok(vec![y]),
            None => Ok(vec![self.plain(a, b)?]),
        }
    }
}

/// Scaled, masked dot-product attention as exporters write it, which the graph compiler fuses
/// into this one step: `MatMul(Softmax(Add(Mul(MatMul(Q, Kᵀ), scale), mask)), V)`, the scale a
/// `Mul` or a `Div` by a constant (or none), the mask any tensor that broadcasts to the scores
/// (or none), the softmax over the last axis. Each (batch, head) entry's `s_q × s_k` scores stay
/// in a per-thread scratch while they are scaled, masked and normalised and then multiply `V`;
/// unfused, the four steps wrote and read `batch × heads × s_q × s_k` through memory. The same
/// kernels as the unfused steps, in the same order, so the numbers are the same.
struct Attention {
    /// The constant the scores are multiplied by (or, where `divide`, divided by).
    scale: Option<(f32, bool)>,
    /// Whether input 3 is a mask added to the scaled scores.
    masked: bool,
}

/// The fused attention step ([`Attention`]); its inputs are `Q`, `Kᵀ`, `V` and the mask.
pub(in crate::nn::backends::onnx) fn attention(scale: Option<(f32, bool)>, masked: bool) -> Box<dyn super::Op> {
    Box::new(Attention { scale, masked })
}

impl Attention {
    /// The shape numpy's `matmul` gives `a · b`: 1-D operands promoted (and their added axis
    /// dropped again), batch axes broadcast.
    fn product_dims(a: &[usize], b: &[usize]) -> Result<Vec<usize>, NnError> {
        let bad = || NnError::invalid_argument(format!("MatMul of {a:?} and {b:?}"));
        let (a2, b2) = (
            if a.len() == 1 { vec![1, a[0]] } else { a.to_vec() },
            if b.len() == 1 { vec![b[0], 1] } else { b.to_vec() },
        );
        let (Some((ab, &[m, k])), Some((bb, &[k2, n]))) = (a2.split_last_chunk::<2>(), b2.split_last_chunk::<2>())
        else {
            return Err(bad());
        };
        if k != k2 {
            return Err(bad());
        }
        let mut dims = broadcast_shape(&[ab, bb])?;
        if a.len() > 1 {
            dims.push(m);
        }
        if b.len() > 1 {
            dims.push(n);
        }
        Ok(dims)
    }

    /// Entry `e`'s scores (`s`, rows of `sk`) scaled, masked and normalised, as the unfused
    /// steps do (`mask`: values over `[batch, mq, sk]`).
    fn normalise(s: &mut [f32], sk: usize, e: usize, scale: Option<(f32, bool)>, mask: Option<&(Vec<f32>, usize)>) {
        for (i, row) in s.chunks_exact_mut(sk).enumerate() {
            match scale {
                Some((c, true)) => row.iter_mut().for_each(|x| *x /= c),
                Some((c, false)) => row.iter_mut().for_each(|x| *x *= c),
                None => {}
            }
            if let Some((values, mq)) = mask {
                let at = (e * mq + if *mq == 1 { 0 } else { i }) * sk;
                row.iter_mut().zip(&values[at..at + sk]).for_each(|(x, m)| *x += m);
            }
        }
        act::softmax_rows(s, sk);
    }

    /// Every (batch, head) entry at once, or `None` where the operands are not f32 with the
    /// same batch axes, or the mask does not broadcast over whole rows of the scores.
    fn fused(&self, q: &Tensor, kt: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Option<Tensor>, NnError> {
        let r = q.rank();
        if r < 3 || kt.rank() != r || v.rank() != r || [q, kt, v].iter().any(|t| t.dtype() != DType::F32) {
            return Ok(None);
        }
        let axes = &q.dims()[..r - 2];
        if &kt.dims()[..r - 2] != axes || &v.dims()[..r - 2] != axes {
            return Ok(None);
        }
        let ([sq, d], [d2, sk], [sk2, dv]) = (
            [q.dims()[r - 2], q.dims()[r - 1]],
            [kt.dims()[r - 2], kt.dims()[r - 1]],
            [v.dims()[r - 2], v.dims()[r - 1]],
        );
        if d != d2 || sk != sk2 || [sq, sk, d, dv].contains(&0) {
            return Ok(None);
        }
        let batch: usize = axes.iter().product();
        // The mask over the batch axes (its rows stay one where it has one): `[batch, mq, sk]`.
        let mask = match mask {
            None => None,
            Some(m) if m.dtype() == DType::F32 && m.rank() <= r => {
                let mut md = vec![1usize; r - m.rank()];
                md.extend_from_slice(m.dims());
                let mq = md[r - 2];
                let fits = md[r - 1] == sk
                    && (mq == 1 || mq == sq)
                    && md[..r - 2].iter().zip(axes).all(|(&a, &b)| a == 1 || a == b);
                if !fits {
                    return Ok(None);
                }
                let target: Vec<usize> = [axes, &[mq, sk]].concat();
                let values = m.reshape(md)?.broadcast_as(target)?.flatten_all()?.to_vec1::<f32>()?;
                Some((values, mq))
            }
            Some(_) => return Ok(None),
        };
        let len = batch * sq * dv;
        let mut out = super::uninit_f32(len)?;
        let scale = self.scale;
        // Where both products run on the GEMM's tile (at least 4 rows, more than TURNED_MAX
        // columns), they run as `X·W` on strips instead, which sums in the tile's order: Q and
        // the scores are read in place, Kᵀ and V packed straight into strips from where they
        // lie. Otherwise each entry's operands are gathered.
        let strips = sq >= 4 && sk > sgemm::TURNED_MAX && dv > sgemm::TURNED_MAX && crate::nn::kernels::simd::avx512();
        // Q, Kᵀ and V are read where they lie (views out of Transposes, as exporters leave
        // them), each entry gathered into a per-thread buffer; copying them whole first (the
        // unfused steps' way) was a pass of its own over each.
        let mut run = |q: View<'_>, kt: View<'_>, v: View<'_>| {
            out.spare_capacity_mut()[..len].par_chunks_mut(sq * dv).enumerate().try_for_each_init(
                || [Vec::<f32>::new(), Vec::new(), Vec::new(), Vec::new()],
                |[scores, qe, kte, ve], (e, o)| -> Result<(), NnError> {
                    if strips {
                        if scores.len() < sq * sk {
                            scores.resize(sq * sk, 0.0);
                        }
                        let s = &mut scores[..sq * sk];
                        // Q in place where its rows are contiguous, else gathered.
                        let (qa, lda) = match q.rows_in_place(e) {
                            Some(rows) => rows,
                            None => {
                                qe.resize(sq * d, 0.0);
                                q.gather(e, qe);
                                (&qe[..sq * d], d)
                            }
                        };
                        // (No strips only where the SIMD level was lowered since `strips`
                        // was decided, in tests: the entry is then gathered below.)
                        if let (Some(ks), Some(vs)) =
                            (kt.strips(e, std::mem::take(kte))?, v.strips(e, std::mem::take(ve))?)
                        {
                            sgemm::gemm_strips_over(sq, qa, lda, &ks, s)?;
                            Self::normalise(s, sk, e, scale, mask.as_ref());
                            sgemm::gemm_strips_lda(sq, s, sk, &vs, o, None, false)?;
                            (*kte, *ve) = (ks.into_data(), vs.into_data());
                            return Ok(());
                        }
                    }
                    for (buf, want) in
                        [(&mut *scores, sq * sk), (&mut *qe, sq * d), (&mut *kte, d * sk), (&mut *ve, sk * dv)]
                    {
                        if buf.len() < want {
                            buf.resize(want, 0.0);
                        }
                    }
                    let (qe, kte, ve) = (&mut qe[..sq * d], &mut kte[..d * sk], &mut ve[..sk * dv]);
                    q.gather(e, qe);
                    kt.gather(e, kte);
                    v.gather(e, ve);
                    let s = &mut scores[..sq * sk];
                    sgemm::gemm([sq, sk, d], qe, None, kte, s, None, None)?;
                    Self::normalise(s, sk, e, scale, mask.as_ref());
                    sgemm::gemm_into(1, [sq, dv, sk], s, None, ve, o, None, None)
                },
            )
        };
        let viewed = super::with_f32_view(q, |qd, qs, qst| {
            super::with_f32_view(kt, |kd, ks, kst| {
                super::with_f32_view(v, |vd, vs, vst| {
                    let views = (
                        View::new(qd, qs, qst, q.dims()),
                        View::new(kd, ks, kst, kt.dims()),
                        View::new(vd, vs, vst, v.dims()),
                    );
                    match views {
                        (Some(a), Some(b), Some(c)) => Some(run(a, b, c)),
                        _ => None,
                    }
                })
            })
        });
        match viewed.flatten().flatten().flatten() {
            Some(done) => done?,
            None => return Ok(None),
        }
        // SAFETY: every entry's product returned Ok, so each wrote its `s_q·d_v` elements, and
        // the `batch` chunks of `s_q·d_v` cover all `len`.
        unsafe { out.set_len(len) };
        let mut dims = q.dims().to_vec();
        dims[r - 1] = dv;
        Ok(Some(Tensor::from_vec(out, dims, q.device())?))
    }
}

/// A rank-r f32 tensor as it lies in its storage: the batch entries' matrices (the last two
/// axes), each gathered on demand.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    start: usize,
    strides: &'a [usize],
    dims: &'a [usize],
}

impl<'a> View<'a> {
    /// `None` unless every element the shape and strides reach lies inside `data` (checked
    /// once, so gathering cannot run past it).
    fn new(data: &'a [f32], start: usize, strides: &'a [usize], dims: &'a [usize]) -> Option<Self> {
        if strides.len() != dims.len() || dims.len() < 2 || dims.contains(&0) {
            return None;
        }
        let last = dims.iter().zip(strides).try_fold(start, |at, (&n, &s)| at.checked_add((n - 1).checked_mul(s)?))?;
        (last < data.len()).then_some(View { data, start, strides, dims })
    }

    /// Where entry `e`'s matrix starts (`e` counts the batch axes in row-major order).
    fn base(&self, e: usize) -> usize {
        let r = self.dims.len();
        let (mut rest, mut base) = (e, self.start);
        for a in (0..r - 2).rev() {
            base += (rest % self.dims[a]) * self.strides[a];
            rest /= self.dims[a];
        }
        base
    }

    /// Entry `e`'s rows as they lie, and how far apart they start, where each row's values are
    /// contiguous and rows do not overlap.
    fn rows_in_place(&self, e: usize) -> Option<(&'a [f32], usize)> {
        let r = self.dims.len();
        let (rows, cols, rs, cs) = (self.dims[r - 2], self.dims[r - 1], self.strides[r - 2], self.strides[r - 1]);
        if cs != 1 || (rows > 1 && rs < cols) {
            return None;
        }
        // `new` checked that every element the view reaches lies inside `data`.
        let base = self.base(e);
        Some((&self.data[base..base + (rows - 1) * rs + cols], rs.max(cols)))
    }

    /// Entry `e`'s matrix (`k × n`) packed into strips for [`sgemm::gemm_strips_lda`], in
    /// `buf` (reused; grown as needed); `None` where this CPU has no strips kernel.
    fn strips(&self, e: usize, buf: Vec<f32>) -> Result<Option<sgemm::Strips>, NnError> {
        let r = self.dims.len();
        let (k, n, rs, cs) = (self.dims[r - 2], self.dims[r - 1], self.strides[r - 2], self.strides[r - 1]);
        sgemm::Strips::pack(k, n, self.data, self.base(e), [rs, cs], buf)
    }

    /// Entry `e`'s matrix (`e` counts the batch axes in row-major order), row-major into `out`.
    fn gather(&self, e: usize, out: &mut [f32]) {
        let r = self.dims.len();
        let base = self.base(e);
        let (cols, rs, cs) = (self.dims[r - 1], self.strides[r - 2], self.strides[r - 1]);
        for (i, row) in out.chunks_exact_mut(cols).take(self.dims[r - 2]).enumerate() {
            let at = base + i * rs;
            if cs == 1 {
                row.copy_from_slice(&self.data[at..at + cols]);
            } else {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = self.data[at + j * cs];
                }
            }
        }
    }
}

impl super::Op for Attention {
    fn bound(&self, i: &[Option<&Tensor>]) -> Result<u64, NnError> {
        let (q, kt, v) =
            (input(i, 0, "Attention")?.dims(), input(i, 1, "Attention")?.dims(), input(i, 2, "Attention")?.dims());
        // The unfused steps' (the fused path holds less): the scores' product, the scores
        // broadcast with the mask three times (scaled, masked, normalised), the mask broadcast
        // to them, and the second product.
        let mut scores = Self::product_dims(q, kt)?;
        if let Some(mask) = i.get(3).copied().flatten().filter(|_| self.masked) {
            scores = broadcast_shape(&[&scores, mask.dims()])?;
        }
        let n = count(&scores)?;
        let products = matmul_bound(q, kt)?.checked_add(matmul_bound(&scores, v)?);
        products
            .and_then(|p| p.checked_add(wide(n, 4).ok()?))
            .ok_or_else(|| NnError::too_large("attention sizes overflow"))
    }

    fn run(&self, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        let (q, kt, v) = (input(i, 0, "Attention")?, input(i, 1, "Attention")?, input(i, 2, "Attention")?);
        let mask = if self.masked { Some(input(i, 3, "Attention")?) } else { None };
        if let Some(y) = self.fused(q, kt, v, mask)? {
            return Ok(vec![y]);
        }
        // The steps as the graph wrote them.
        let mut s = matmul(q, kt)?;
        if let Some((c, divide)) = self.scale {
            let c = Tensor::new(c, s.device())?.to_dtype(s.dtype())?;
            s = if divide { s.broadcast_div(&c)? } else { s.broadcast_mul(&c)? };
        }
        if let Some(m) = mask {
            s = s.broadcast_add(m)?;
        }
        Ok(vec![matmul(&softmax(&s, -1, false, false)?, v)?])
    }
}

/// A convolution's checked 2-D geometry, its plan and the padding per spatial axis.
type ConvSetup = (conv::Geometry, conv::ConvPlan, Vec<(usize, usize)>);

struct Conv {
    auto_pad: AutoPad,
    pads: Option<Vec<usize>>,
    strides: Option<Vec<usize>>,
    dilations: Option<Vec<usize>>,
    group: usize,
    /// The declared kernel, checked against the weight's.
    kernel: Option<Vec<usize>>,
    clamp: Option<Clamp>,
    packed: conv::PackedWeights,
    /// A depthwise weight by blocks of channels.
    blocked: depthwise::BlockedWeights,
}

impl Conv {
    fn build(node: &Node<'_>) -> Built {
        let group = node.int_or("group", 1);
        if !(1..=MAX_GEOMETRY).contains(&group) {
            return Err(node.bad(format!("attribute `group` holds {group}; it must be at least 1")));
        }
        let strides = geometry_ints(node, "strides", 1)?;
        let dilations = geometry_ints(node, "dilations", 1)?;
        let pads = geometry_ints(node, "pads", 0)?;
        let kernel = geometry_ints(node, "kernel_shape", 1)?;
        spatial_rank(
            node,
            &[("strides", &strides, 1), ("dilations", &dilations, 1), ("pads", &pads, 2), ("kernel_shape", &kernel, 1)],
        )?;
        Ok(Box::new(Conv {
            auto_pad: AutoPad::parse(node)?,
            pads,
            strides,
            dilations,
            kernel,
            group: group as usize,
            clamp: None,
            packed: conv::PackedWeights::default(),
            blocked: Default::default(),
        }))
    }

    /// The convolution of `x` by `w` checked against the attributes: its 2-D geometry (1-D
    /// convolutions as 2-D ones with a height of 1), its plan, and the per-axis padding.
    fn plan(&self, x: &Tensor, w: &Tensor) -> Result<ConvSetup, NnError> {
        self.plan_dims(x.dims(), w.dims())
    }

    /// [`Conv::plan`] from the shapes alone.
    fn plan_dims(&self, x: &[usize], w: &[usize]) -> Result<ConvSetup, NnError> {
        let spatial = x.len().checked_sub(2).filter(|s| (1..=2).contains(s)).ok_or_else(|| {
            NnError::unsupported(format!(
                "Conv on a rank-{} input: only 1-D and 2-D convolutions are supported",
                x.len()
            ))
        })?;
        if w.len() != x.len() {
            return Err(NnError::invalid_argument(format!("Conv weight {:?} does not match input {:?}", w, x)));
        }
        let ks = &w[2..];
        if let Some(k) = &self.kernel
            && k.as_slice() != ks
        {
            return Err(NnError::invalid_argument(format!(
                "Conv: kernel_shape {k:?} but the weight's kernel is {ks:?}"
            )));
        }
        if ks.contains(&0) {
            return Err(NnError::invalid_argument(format!("Conv: an empty kernel {ks:?}")));
        }
        let strides = self.strides.clone().unwrap_or_else(|| vec![1; spatial]);
        let dil = self.dilations.clone().unwrap_or_else(|| vec![1; spatial]);
        let explicit = self.pads.clone().unwrap_or_else(|| vec![0; 2 * spatial]);
        if strides.len() != spatial || dil.len() != spatial || explicit.len() != 2 * spatial {
            return Err(NnError::invalid_argument("Conv: strides/dilations/pads do not match the input rank"));
        }
        let pads: Vec<(usize, usize)> = (0..spatial)
            .map(|d| self.auto_pad.pads((explicit[d], explicit[d + spatial]), x[2 + d], ks[d], strides[d], dil[d]))
            .collect::<Result<_, _>>()?;
        let g = if spatial == 1 {
            conv::Geometry {
                pads: [(0, 0), pads[0]],
                strides: [1, strides[0]],
                dilations: [1, dil[0]],
                group: self.group,
            }
        } else {
            conv::Geometry {
                pads: [pads[0], pads[1]],
                strides: [strides[0], strides[1]],
                dilations: [dil[0], dil[1]],
                group: self.group,
            }
        };
        let as2d = |d: &[usize]| if spatial == 1 { vec![d[0], d[1], 1, d[2]] } else { d.to_vec() };
        let plan = conv::ConvPlan::new(&as2d(x), &as2d(w), &g)?;
        Ok((g, plan, pads))
    }
}

impl super::Op for Conv {
    fn prepare(&self, constants: &[Option<&Tensor>]) {
        if let Some(Some(w)) = constants.get(1)
            && w.dtype() == DType::F32
        {
            conv::prepack(&self.packed, w, self.group);
            if self.is_depthwise(w.dims()) {
                depthwise::prepare(&self.blocked, w, constants.get(2).copied().flatten());
            }
        }
    }

    fn prepared_bytes(&self, constants: &[Option<&Tensor>]) -> super::Prepared {
        match constants.get(1) {
            Some(Some(w)) if w.dtype() == DType::F32 && self.is_depthwise(w.dims()) => depthwise::prepared_bytes(w),
            Some(Some(w)) if w.dtype() == DType::F32 => conv::prepacked_bytes(w, self.group),
            _ => Default::default(),
        }
    }

    fn fuse_clamp(&mut self, clamp: Clamp) -> bool {
        self.clamp = Some(match self.clamp {
            Some(c) => Clamp { lo: c.lo.max(clamp.lo), hi: c.hi.min(clamp.hi) },
            None => clamp,
        });
        true
    }

    fn bound(&self, i: &[Option<&Tensor>]) -> Result<u64, NnError> {
        let (x, w) = (input(i, 0, "Conv")?, input(i, 1, "Conv")?);
        self.plan(x, w)?.1.bytes()
    }

    fn run(&self, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        let x = input(i, 0, "Conv")?;
        let w = input(i, 1, "Conv")?;
        let bias = i.get(2).copied().flatten();
        let (g, plan, pads) = self.plan(x, w)?;
        let spatial = pads.len();
        if x.dtype() == DType::F32 {
            // 1-D convolutions run as 2-D ones with a height of 1.
            let (x2, w2) = if spatial == 1 { (x.unsqueeze(2)?, w.unsqueeze(2)?) } else { (x.clone(), w.clone()) };
            let keep = Some((&self.blocked, w.id(), bias.map(Tensor::id)));
            let y = conv::conv2d(&x2, &w2, bias, &plan, &g, self.clamp, (Some((&self.packed, w.id())), keep))?;
            return Ok(vec![if spatial == 1 { y.squeeze(2)? } else { y }]);
        }
        // Non-f32 convolutions: candle, on a padded copy if needed.
        let strides: Vec<usize> = g.strides[2 - spatial..].to_vec();
        let dil: Vec<usize> = g.dilations[2 - spatial..].to_vec();
        let mut y = conv_candle(x, w, &pads, &strides, &dil, self.group)?;
        if let Some(b) = bias {
            y = y.broadcast_add(&channel_view(b, y.rank())?)?;
        }
        if let Some(Clamp { lo, hi }) = self.clamp {
            y = y.clamp(lo, hi)?;
        }
        Ok(vec![y])
    }
}

impl Conv {
    /// Whether this convolution is depthwise for weights of shape `w` (one input channel per
    /// group, as many groups as output channels).
    fn is_depthwise(&self, w: &[usize]) -> bool {
        matches!(w, &[m, 1, _, _] if m == self.group)
    }

    /// Whether this convolution is pointwise for weights of shape `w`: 1x1, stride 1, no
    /// padding, one group.
    fn is_pointwise(&self, w: &[usize]) -> bool {
        let ones = |v: &Option<Vec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&x| x == 1));
        matches!(w, &[_, _, 1, 1])
            && self.group == 1
            && ones(&self.strides)
            && matches!(self.auto_pad, AutoPad::NotSet | AutoPad::Valid)
            && self.pads.as_ref().is_none_or(|p| p.iter().all(|&x| x == 0))
    }
}

/// A depthwise Conv whose output only a pointwise Conv reads (MobileNet and EfficientNet
/// blocks), fused by the graph compiler, with the pointwise "expand" Conv in front of it where
/// the depthwise one alone reads that: inputs `x`, then (expand weight and bias,) the
/// depthwise weight and bias, the pointwise weight and bias. Where [`conv::chain_rows`] finds
/// a split, one pass keeps each range's intermediate results in cache
/// ([`conv::depthwise_pointwise`]); otherwise the convolutions run one after the other.
/// With `residual` (an `Add` fused by the graph compiler), one more input follows, added to
/// the output as the pass writes it (or after, where its shape broadcasts).
pub(crate) struct ConvChain {
    expand: Option<Conv>,
    dw: Conv,
    pw: Conv,
    residual: bool,
    /// Per input shape, the fastest [`Split`] (every split computes the same numbers).
    tuner: super::tune::Tuner<Split>,
    /// The expand and pointwise weights in strips, for [`Split::ChannelsLast`].
    strips: [super::Derived<Option<Strips>>; 2],
    /// Per input shape, [`Op::bound`](super::Op::bound)'s bytes.
    bounds: super::ShapeMemo<u64>,
}

/// Each fused block's input shape and the split it ran, for the tests' check that every
/// split was tried and computed the same numbers.
#[cfg(test)]
pub(crate) static SPLITS_RUN: std::sync::Mutex<Vec<(Vec<usize>, String)>> = std::sync::Mutex::new(Vec::new());

/// How a [`ConvChain`] runs: the candidates its tuner times.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Split {
    /// The whole chain in one pass, `rows` output rows at a time (with an expand convolution,
    /// each range computes the expanded rows it reads).
    Fused(usize),
    /// The expand convolution on its own, then the rest in one pass of `rows` rows at a time.
    AfterExpand(usize),
    /// Each convolution on its own, in parallel within itself.
    Apart,
    /// The three convolutions channels last ([`conv::channels_last`]): small planes, whose
    /// ragged pixel count costs the planar products more than the transposes.
    ChannelsLast,
    /// The three convolutions channels last a band of this many output rows at a time
    /// ([`conv::channels_last_banded`]): wider planes, above all at stride 2, where the
    /// planar depthwise kernels split every row into its even and odd columns.
    Banded(usize),
}

/// The bands of output rows [`Split::Banded`] is timed with: fewer rows shorten the ring of
/// expanded rows, more give the products more pixels at once. (16, all of a 14x14 plane,
/// was no faster than 8 anywhere in EfficientNet-Lite0.)
const BANDS: [usize; 3] = [2, 4, 8];

/// Fuses `first` and `second` into a [`ConvChain`] if they are a depthwise Conv (weights
/// `w1`) and a pointwise one (weights `w2`, reading all of the first's channels), or a
/// pointwise Conv (`w1`) and a chain without an expand Conv that reads all its outputs;
/// otherwise hands them back.
#[allow(clippy::type_complexity)]
pub(crate) fn chain(
    first: Box<dyn super::Op>,
    w1: &[usize],
    second: Box<dyn super::Op>,
    w2: &[usize],
) -> Result<Box<dyn super::Op>, (Box<dyn super::Op>, Box<dyn super::Op>)> {
    let a = (*first).as_any().downcast_ref::<Conv>();
    let pair = match (a, (*second).as_any().downcast_ref::<Conv>()) {
        (Some(a), Some(b)) => a.is_depthwise(w1) && b.is_pointwise(w2) && w2.get(1) == w1.first(),
        _ => false,
    };
    let front = match (a, (*second).as_any().downcast_ref::<ConvChain>()) {
        // `w2` is then the chain's depthwise weight: its channels are the expand outputs.
        (Some(a), Some(chain)) => {
            chain.expand.is_none() && !chain.residual && a.is_pointwise(w1) && w1.first() == w2.first()
        }
        _ => false,
    };
    if !pair && !front {
        return Err((first, second));
    }
    let first = first.into_any().downcast::<Conv>().unwrap_or_else(|_| unreachable!("checked to be a Conv"));
    if pair {
        let pw = second.into_any().downcast::<Conv>().unwrap_or_else(|_| unreachable!("checked to be a Conv"));
        let tuner = Default::default();
        return Ok(Box::new(ConvChain {
            expand: None,
            dw: *first,
            pw: *pw,
            residual: false,
            tuner,
            strips: Default::default(),
            bounds: Default::default(),
        }));
    }
    let chain = second.into_any().downcast::<ConvChain>().unwrap_or_else(|_| unreachable!("checked to be a chain"));
    // A fresh memo: the bounds depend on the expand.
    Ok(Box::new(ConvChain { expand: Some(*first), bounds: Default::default(), ..*chain }))
}

impl super::Op for ConvChain {
    fn prepare(&self, constants: &[Option<&Tensor>]) {
        let o = self.offset();
        if let (Some(expand), Some(Some(w))) = (&self.expand, constants.get(1))
            && w.dtype() == DType::F32
        {
            conv::prepack(&expand.packed, w, 1);
        }
        if let Some(Some(w)) = constants.get(o + 3)
            && w.dtype() == DType::F32
        {
            conv::prepack(&self.pw.packed, w, 1);
        }
        // The depthwise Conv's own preparation, on its operands (its input is not a constant).
        super::Op::prepare(&self.dw, &self.dw_operands(constants));
    }

    fn prepared_bytes(&self, constants: &[Option<&Tensor>]) -> super::Prepared {
        let o = self.offset();
        let packed = |at: usize| match constants.get(at) {
            Some(Some(w)) if w.dtype() == DType::F32 => conv::prepacked_bytes(w, 1),
            _ => Default::default(),
        };
        let expand = if self.expand.is_some() { packed(1) } else { Default::default() };
        // The expand and project weights in strips, which a block run channels last keeps
        // (whole strips of 32 columns; the plane's size is not known here, so any block that
        // may run so is counted).
        let strips = |at: usize| match constants.get(at) {
            Some(Some(w)) if w.dtype() == DType::F32 && w.rank() == 4 => {
                let (n, k) = (w.dims()[0] as u64, w.dims()[1] as u64);
                super::f32_bytes(k.saturating_mul(n + 31))
            }
            _ => 0,
        };
        let kept = if self.expand.is_some() && crate::nn::kernels::simd::avx512() {
            strips(1).saturating_add(strips(o + 3))
        } else {
            0
        };
        expand
            .then(packed(o + 3))
            .then(super::Op::prepared_bytes(&self.dw, &self.dw_operands(constants)))
            .then(super::Prepared { kept, transient: 0 })
    }

    fn fuse_clamp(&mut self, clamp: Clamp) -> bool {
        // A clamp after the residual's addition would have to follow it.
        !self.residual && self.pw.fuse_clamp(clamp)
    }

    fn fuse_residual(&mut self) -> bool {
        // The bound counts the residual's addition where the pass does not fuse it.
        self.bounds.clear();
        // One residual: a second would have nowhere to go.
        !std::mem::replace(&mut self.residual, true)
    }

    fn bound(&self, i: &[Option<&Tensor>]) -> Result<u64, NnError> {
        self.bounds.get(i, || self.bound_fresh(i))
    }

    fn run(&self, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        let residual = self.residual(i)?;
        let (mut outs, added) = self.run_chain(i, residual)?;
        if let (Some(r), false) = (residual, added) {
            let y = outs.pop().ok_or_else(|| NnError::runtime("Conv produced no output"))?;
            outs.push(super::elementwise::add(&y, r)?);
        }
        Ok(outs)
    }
}

impl ConvChain {
    /// [`Op::bound`](super::Op::bound), worked out from the plans of every split.
    fn bound_fresh(&self, i: &[Option<&Tensor>]) -> Result<u64, NnError> {
        let plans = self.planned(i)?;
        let convs = self.bound_convs(i, &plans)?;
        // Where the residual is not added during the pass (it broadcasts, or the pass does not
        // fuse), its addition makes one more tensor: the output's shape broadcast against it.
        let added = match self.residual(i)? {
            Some(r) => {
                let (_, pw, _) = &plans;
                let [n, _, _, _] = pw.dims();
                let [oh, ow] = pw.out();
                let m = input(i, self.offset() + 3, "Conv")?.dims()[0];
                let out = [n, m, oh, ow];
                wide(count(&super::elementwise::broadcast_shape(&[&out, r.dims()])?)?, 1)?
            }
            None => 0,
        };
        Ok(convs.saturating_add(added))
    }
}

impl ConvChain {
    /// The fused residual, where there is one: the last input, after the convolutions'
    /// operands.
    fn residual<'a>(&self, i: &[Option<&'a Tensor>]) -> Result<Option<&'a Tensor>, NnError> {
        if !self.residual {
            return Ok(None);
        }
        if i.len() < self.offset() + 6 {
            return Err(NnError::runtime("Add: the fused block has no residual input"));
        }
        Ok(Some(input(i, i.len() - 1, "Add")?))
    }

    /// The depthwise and pointwise convolutions' plans for these inputs, and what the expand
    /// convolution (where there is one) holds.
    fn planned(&self, i: &[Option<&Tensor>]) -> Result<(conv::ConvPlan, conv::ConvPlan, u64), NnError> {
        let o = self.offset();
        let (x, wd, wp) = (input(i, 0, "Conv")?, input(i, o + 1, "Conv")?, input(i, o + 3, "Conv")?);
        // The expanded input's shape.
        let (xd, expanded) = match &self.expand {
            Some(e) => {
                let (_, plan, _) = e.plan(x, input(i, 1, "Conv")?)?;
                let [n, _, _, _] = plan.dims();
                let [h, w] = plan.out();
                (vec![n, input(i, 1, "Conv")?.dims()[0], h, w], plan.bytes()?)
            }
            None => (x.dims().to_vec(), 0),
        };
        let (_, dw, _) = self.dw.plan_dims(&xd, wd.dims())?;
        // The depthwise output's shape (1-D convolutions plan as 2-D ones of height 1).
        let [n, _, _, _] = dw.dims();
        let [oh, ow] = dw.out();
        let mid = if xd.len() == 3 { vec![n, wd.dims()[0], ow] } else { vec![n, wd.dims()[0], oh, ow] };
        let (_, pw, _) = self.pw.plan_dims(&mid, wp.dims())?;
        Ok((dw, pw, expanded))
    }

    /// What the convolutions allocate (without the residual's addition), planned as `planned`.
    fn bound_convs(
        &self,
        i: &[Option<&Tensor>],
        (dw, pw, expanded): &(conv::ConvPlan, conv::ConvPlan, u64),
    ) -> Result<u64, NnError> {
        let (x, m) = (input(i, 0, "Conv")?, input(i, self.offset() + 3, "Conv")?.dims()[0]);
        let expanded = *expanded;
        // Any split: the convolutions' own bounds (each output held while the next one runs),
        // or a fused pass's output and scratch; the largest.
        let apart = expanded.saturating_add(dw.bytes()?).saturating_add(pw.bytes()?);
        let mut most = apart;
        // The whole chain fused, or the expand on its own and the rest fused.
        let c_in = self.expand.as_ref().map(|_| x.dims()[1]);
        if c_in.is_some() {
            for rows in conv::chain_candidates(dw, true) {
                most = most.max(conv::chain_bytes(dw, m, rows, c_in)?.saturating_add(pw.bytes()?));
            }
        }
        for rows in conv::chain_candidates(dw, false) {
            let fused = conv::chain_bytes(dw, m, rows, None)?.saturating_add(pw.bytes()?);
            most = most.max(expanded.saturating_add(fused));
        }
        if let Some(c_in) = c_in {
            most = most.max(conv::channels_last_bytes(dw, c_in, m)?);
            if dw.takes_banded() {
                for band in BANDS {
                    most = most.max(conv::channels_last_banded_bytes(dw, m, band)?);
                }
            }
        }
        Ok(most)
    }

    /// The chain's output, and whether `residual` was added to it (by the fused pass, where
    /// it has the output's shape).
    fn run_chain(&self, i: &[Option<&Tensor>], residual: Option<&Tensor>) -> Result<(Vec<Tensor>, bool), NnError> {
        let o = self.offset();
        let x = input(i, 0, "Conv")?;
        let (wd, wp) = (input(i, o + 1, "Conv")?, input(i, o + 3, "Conv")?);
        let (bd, bp) = (i.get(o + 2).copied().flatten(), i.get(o + 4).copied().flatten());
        let expand = match &self.expand {
            Some(e) => Some((e, input(i, 1, "Conv")?, i.get(2).copied().flatten())),
            None => None,
        };
        // The depthwise and pointwise convolutions of `x` in one pass, after `expand` if given.
        // The residual where the block's output has its shape (the pass then adds it).
        let residual_for = |plan: &conv::ConvPlan| {
            let [n, _, _, _] = plan.dims();
            let [oh, ow] = plan.out();
            residual.filter(|r| r.dims() == [n, wp.dims()[0], oh, ow] && r.dtype() == DType::F32)
        };
        let keep = Some((&self.dw.blocked, wd.id(), bd.map(Tensor::id)));
        let fused = |x: &Tensor, expand, plan: &conv::ConvPlan, rows| -> Result<(Vec<Tensor>, bool), NnError> {
            let pointwise = (wp, bp, self.pw.clamp, Some((&self.pw.packed, wp.id())));
            let residual = residual_for(plan);
            let y =
                conv::depthwise_pointwise(x, expand, (wd, bd, self.dw.clamp, keep), plan, rows, pointwise, residual)?;
            Ok((vec![y], residual.is_some()))
        };
        let (plan, rule) = self.rule(x, expand.map(|e| e.1), wd, wp)?;
        // Keyed by what the candidates depend on: the operands' shapes (with the pool's size
        // and the kernels' instructions), and whether the GEMM computes columns independently.
        let mut key = super::shape_key([Some(x), expand.map(|e| e.1), Some(wd), Some(wp)]);
        key.push(usize::from(sgemm::columns_independent()));
        // The candidates are worked out only for a shape the tuner has not seen.
        let candidates = || match &plan {
            Some(plan) => self.candidates(plan, rule, expand.map(|e| e.1), wp),
            None => vec![rule],
        };
        let (split, ticket) = self.tuner.pick(&key, candidates).unwrap_or((rule, None));
        let expanded = |x: &Tensor| match expand {
            Some((e, we, be)) => super::Op::run(e, &[Some(x), Some(we), be]),
            None => Ok(vec![x.clone()]),
        };
        let apart = || -> Result<(Vec<Tensor>, bool), NnError> {
            let x = expanded(x)?;
            let x = x.first().ok_or_else(|| NnError::runtime("Conv produced no output"))?;
            let mid = super::Op::run(&self.dw, &[Some(x), Some(wd), bd])?;
            let mid = mid.first().ok_or_else(|| NnError::runtime("Conv produced no output"))?;
            Ok((super::Op::run(&self.pw, &[Some(mid), Some(wp), bp])?, false))
        };
        let run = |split: Split| -> Result<(Vec<Tensor>, bool), NnError> {
            #[cfg(test)]
            SPLITS_RUN
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((x.dims().to_vec(), format!("{split:?}")));
            match (split, &plan) {
                (Split::Fused(rows), Some(plan)) => {
                    fused(x, expand.map(|(e, we, be)| (we, be, e.clamp, Some((&e.packed, we.id())))), plan, rows)
                }
                (Split::AfterExpand(rows), Some(plan)) => {
                    let x = expanded(x)?;
                    fused(x.first().ok_or_else(|| NnError::runtime("Conv produced no output"))?, None, plan, rows)
                }
                (Split::ChannelsLast | Split::Banded(_), Some(plan)) => {
                    if let Some((e, we, be)) = expand {
                        let residual = residual_for(plan);
                        let (expand, pointwise) =
                            ((we, be, e.clamp, &self.strips[0]), (wp, bp, self.pw.clamp, &self.strips[1]));
                        let depthwise = (wd, bd, self.dw.clamp, keep);
                        let y = match split {
                            Split::Banded(band) => {
                                conv::channels_last_banded(x, expand, depthwise, plan, band, pointwise, residual)?
                            }
                            _ => conv::channels_last(x, expand, depthwise, plan, pointwise, residual)?,
                        };
                        if let Some(y) = y {
                            return Ok((vec![y], residual.is_some()));
                        }
                    }
                    apart()
                }
                _ => apart(),
            }
        };
        // A split other than the rule's that cannot allocate its larger scratch leaves the pass
        // to the rule's (and while being timed, is ruled out).
        let started = std::time::Instant::now();
        match (run(split), ticket) {
            (Ok(out), Some(ticket)) => {
                self.tuner.record(ticket, started.elapsed());
                Ok(out)
            }
            (Err(e), ticket) if split != rule && e.code == ErrorCode::TooLarge => {
                if let Some(ticket) = ticket {
                    self.tuner.reject(ticket);
                }
                run(rule)
            }
            (out, _) => out,
        }
    }
}

impl ConvChain {
    /// Where the depthwise operands start among the inputs (after the expand ones).
    fn offset(&self) -> usize {
        if self.expand.is_some() { 2 } else { 0 }
    }

    /// The depthwise Conv's own operands among the chain's constants: no input, its weight
    /// and bias.
    fn dw_operands<'a>(&self, constants: &[Option<&'a Tensor>]) -> [Option<&'a Tensor>; 3] {
        let o = self.offset();
        [None, constants.get(o + 1).copied().flatten(), constants.get(o + 2).copied().flatten()]
    }

    /// The depthwise convolution's plan on the expanded input where a fused pass can run
    /// (`we`: the expand convolution's weight, if there is one), and the split
    /// [`conv::chain_rows`]'s rule picks ([`Split::Apart`] where no fused pass runs).
    fn rule(
        &self,
        x: &Tensor,
        we: Option<&Tensor>,
        wd: &Tensor,
        wp: &Tensor,
    ) -> Result<(Option<conv::ConvPlan>, Split), NnError> {
        let f32s = [Some(x), we, Some(wd), Some(wp)].iter().flatten().all(|t| t.dtype() == DType::F32);
        let pointwise = |c: &Conv, w: &Tensor| c.is_pointwise(w.dims());
        let expand_ok = match (&self.expand, we) {
            (Some(e), Some(we)) => pointwise(e, we),
            (None, None) => true,
            _ => false,
        };
        if !f32s || x.rank() != 4 || !pointwise(&self.pw, wp) || !expand_ok {
            return Ok((None, Split::Apart));
        }
        let xd = match we {
            Some(we) => vec![x.dims()[0], we.dims()[0], x.dims()[2], x.dims()[3]],
            None => x.dims().to_vec(),
        };
        let (_, plan, _) = self.dw.plan_dims(&xd, wd.dims())?;
        let rule = match (we, conv::chain_rows(&plan, we.is_some()), conv::chain_rows(&plan, false)) {
            // Small planes (EfficientNet-Lite0's 7x7 stage, batch 1, in the pass: 218–236 µs
            // a block against 241–253 for the best planar split).
            (Some(we), ..) if plan.takes_channels_last() && conv::channels_last_tiled(&plan, we, wp) => {
                Split::ChannelsLast
            }
            (_, Some(rows), _) => Split::Fused(rows),
            (Some(_), None, Some(rows)) => Split::AfterExpand(rows),
            _ => Split::Apart,
        };
        Ok((Some(plan), rule))
    }

    /// The splits to time on `plan` (made by [`ConvChain::rule`]): the rule's first (the tuner
    /// keeps it unless another is clearly faster), then the other fused ones and
    /// [`Split::Apart`]. Where the GEMM's columns are not computed independently of each
    /// other, only the rule's.
    fn candidates(&self, plan: &conv::ConvPlan, rule: Split, we: Option<&Tensor>, wp: &Tensor) -> Vec<Split> {
        let mut splits = vec![rule];
        // Whether every product of a split runs on the tile kernel, which computes a column
        // the same whatever its neighbours (at least 4 rows, more than TURNED_MAX columns):
        // only then do all splits compute the same numbers.
        let [_, c, h, w] = plan.dims();
        let [oh, ow] = plan.out();
        let narrow = |cols: usize| cols <= sgemm::TURNED_MAX;
        let rows_ok = wp.dims()[0] >= 4 && (we.is_none() || c >= 4);
        let whole_ok = !narrow(oh * ow) && (we.is_none() || !narrow(h * w));
        let tiled = |split: Split| match split {
            Split::Fused(rows) => conv::chain_tiled(plan, rows, we.is_some()),
            Split::AfterExpand(rows) => conv::chain_tiled(plan, rows, false) && whole_ok,
            Split::Apart => whole_ok,
            // Its products' rows are the pixels (more than TURNED_MAX, as `whole_ok` asks of
            // the planar products' columns), so they run the strips kernel, which sums as the
            // tile kernels do.
            Split::ChannelsLast | Split::Banded(_) => whole_ok,
        };
        if !sgemm::columns_independent() || !rows_ok || !tiled(rule) {
            // Splits could differ in the last bits: the rule decides, untimed.
            return splits;
        }
        let fused = |expanding| conv::chain_candidates(plan, expanding).into_iter();
        let others: Vec<Split> = match we {
            Some(_) => fused(true).map(Split::Fused).chain(fused(false).map(Split::AfterExpand)).collect(),
            None => fused(false).map(Split::Fused).collect(),
        };
        let last = we.is_some() && plan.takes_channels_last();
        let last = last.then_some(Split::ChannelsLast);
        // Bands of rows channels last, for planes wider than `ChannelsLast` takes.
        let banded = we.is_some() && plan.takes_banded() && !plan.takes_channels_last();
        let banded = BANDS.iter().filter(|_| banded).map(|&b| Split::Banded(b));
        for split in others.into_iter().chain([Split::Apart]).chain(last).chain(banded) {
            if !splits.contains(&split) && tiled(split) {
                splits.push(split);
            }
        }
        splits
    }
}

fn conv_candle(
    x: &Tensor,
    w: &Tensor,
    pads: &[(usize, usize)],
    strides: &[usize],
    dil: &[usize],
    group: usize,
) -> Result<Tensor, NnError> {
    let c_in = x.dims()[1];
    if group == 0 || !c_in.is_multiple_of(group) || w.dims()[1] * group != c_in {
        return Err(NnError::invalid_argument(format!(
            "Conv: weight {:?} and group {group} do not fit {c_in} channels",
            w.dims()
        )));
    }
    let symmetric = pads.iter().all(|&(a, b)| a == b) && pads.iter().all(|p| p.0 == pads[0].0);
    let (x, pad) = if symmetric {
        (x.clone(), pads[0].0)
    } else {
        let mut x = x.clone();
        for (d, &(a, b)) in pads.iter().enumerate() {
            x = x.pad_with_zeros(2 + d, a, b)?;
        }
        (x, 0)
    };
    let same = |v: &[usize]| v.iter().all(|&s| s == v[0]);
    if !same(strides) || !same(dil) {
        return Err(NnError::unsupported("Conv with different strides or dilations per axis"));
    }
    Ok(match pads.len() {
        1 => x.conv1d(w, pad, strides[0], dil[0], group)?,
        _ => x.contiguous()?.conv2d(&w.contiguous()?, pad, strides[0], dil[0], group)?,
    })
}

/// Average or max pooling over 1 or 2 spatial dimensions.
struct Pool {
    max: bool,
    kernel: Vec<usize>,
    strides: Option<Vec<usize>>,
    pads: Option<Vec<usize>>,
    dilations: Option<Vec<usize>>,
    auto_pad: AutoPad,
    ceil: bool,
    count_pad: bool,
}

impl Pool {
    fn build(node: &Node<'_>, max: bool) -> Built {
        let kernel = geometry_ints(node, "kernel_shape", 1)?.ok_or_else(|| node.bad("missing kernel_shape"))?;
        if kernel.is_empty() || kernel.len() > 2 {
            return Err(NnError::unsupported(format!("{}: only 1-D and 2-D pooling", node.proto.op_type)));
        }
        let strides = geometry_ints(node, "strides", 1)?;
        let pads = geometry_ints(node, "pads", 0)?;
        let dilations = geometry_ints(node, "dilations", 1)?;
        let kernel_attr = Some(kernel.clone());
        let rank = spatial_rank(
            node,
            &[
                ("kernel_shape", &kernel_attr, 1),
                ("strides", &strides, 1),
                ("pads", &pads, 2),
                ("dilations", &dilations, 1),
            ],
        )?;
        debug_assert_eq!(rank, Some(kernel.len()));
        Ok(Box::new(Pool {
            max,
            strides,
            pads,
            dilations,
            auto_pad: AutoPad::parse(node)?,
            ceil: node.int_or("ceil_mode", 0) != 0,
            count_pad: node.int_or("count_include_pad", 0) != 0,
            kernel,
        }))
    }
}

/// A pooling's sizes, checked: `[n, c, h, w]` in, `[oh, ow]` out, and the 2-D geometry.
struct PoolPlan {
    dims: [usize; 4],
    out: [usize; 2],
    kernel: [usize; 2],
    strides: [usize; 2],
    dil: [usize; 2],
    pads: [(usize, usize); 2],
}

impl Pool {
    fn plan(&self, x: &Tensor) -> Result<PoolPlan, NnError> {
        let spatial = self.kernel.len();
        if x.rank() != spatial + 2 {
            return Err(NnError::invalid_argument(format!("pooling input {:?} is not {}-D", x.dims(), spatial)));
        }
        let d = x.dims();
        let (n, c, h, wd) = if spatial == 1 { (d[0], d[1], 1, d[2]) } else { (d[0], d[1], d[2], d[3]) };
        let k2 = |v: &[usize], one: usize| if spatial == 1 { [one, v[0]] } else { [v[0], v[1]] };
        let kernel = k2(&self.kernel, 1);
        let strides = k2(self.strides.as_deref().unwrap_or(&[1, 1]), 1);
        let dil = k2(self.dilations.as_deref().unwrap_or(&[1, 1]), 1);
        let explicit = self.pads.clone().unwrap_or_else(|| vec![0; 2 * spatial]);
        let (pb, pe) = if spatial == 1 {
            ([0, explicit[0]], [0, explicit[1]])
        } else {
            ([explicit[0], explicit[1]], [explicit[2], explicit[3]])
        };
        let mut pads = [(0, 0); 2];
        for d in 0..2 {
            let len = [h, wd][d];
            pads[d] = if spatial == 1 && d == 0 {
                (0, 0)
            } else {
                self.auto_pad.pads((pb[d], pe[d]), len, kernel[d], strides[d], dil[d])?
            };
        }
        let too_big = || NnError::too_large("pooling: the window does not fit in memory");
        let out_len = |d: usize| -> Result<usize, NnError> {
            let len = [h, wd][d].checked_add(pads[d].0 + pads[d].1).ok_or_else(too_big)?;
            let eff = (kernel[d] - 1).checked_mul(dil[d]).ok_or_else(too_big)? + 1;
            let span = len.saturating_sub(eff);
            let o = if self.ceil { span.div_ceil(strides[d]) } else { span / strides[d] } + 1;
            // With ceil_mode a last window may not start inside the padded input.
            Ok(if self.ceil && (o - 1) * strides[d] >= [h, wd][d] + pads[d].0 { o - 1 } else { o })
        };
        Ok(PoolPlan { dims: [n, c, h, wd], out: [out_len(0)?, out_len(1)?], kernel, strides, dil, pads })
    }
}

impl super::Op for Pool {
    fn bound(&self, i: &[Option<&Tensor>]) -> Result<u64, NnError> {
        let p = self.plan(input(i, 0, "Pool")?)?;
        let [n, c, h, w] = p.dims;
        let [oh, ow] = p.out;
        wide(count(&[n, c, oh, ow])?.saturating_add(count(&[n, c, h, w])?), 2)
    }

    fn run(&self, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        let x0 = input(i, 0, "Pool")?;
        let spatial = self.kernel.len();
        let PoolPlan { dims: [n, c, h, wd], out: [oh, ow], kernel, strides, dil, pads } = self.plan(x0)?;
        let dtype = x0.dtype();
        // 1-D pools run as 2-D with a height of 1.
        let x = if spatial == 1 { x0.unsqueeze(2)? } else { x0.clone() };
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = super::zeros_f32(n * c * oh * ow)?;
        let max = self.max;
        let count_pad = self.count_pad;
        crate::nn::kernels::par::for_each(out.chunks_mut(oh * ow).enumerate(), |(plane, dst)| {
            let src = &xs[plane * h * wd..(plane + 1) * h * wd];
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = if max { f32::NEG_INFINITY } else { 0.0 };
                    let mut count = 0usize;
                    let mut padded_count = 0usize;
                    for ky in 0..kernel[0] {
                        let iy = (oy * strides[0] + ky * dil[0]) as isize - pads[0].0 as isize;
                        for kx in 0..kernel[1] {
                            let ix = (ox * strides[1] + kx * dil[1]) as isize - pads[1].0 as isize;
                            let inside_padded = iy < (h + pads[0].1) as isize && ix < (wd + pads[1].1) as isize;
                            if inside_padded {
                                padded_count += 1;
                            }
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                let v = src[iy as usize * wd + ix as usize];
                                if max {
                                    acc = acc.max(v)
                                } else {
                                    acc += v
                                }
                                count += 1;
                            }
                        }
                    }
                    dst[oy * ow + ox] = if max {
                        acc
                    } else {
                        let denom = if count_pad { padded_count } else { count };
                        acc / denom.max(1) as f32
                    };
                }
            }
        });
        let y = Tensor::from_vec(out, (n, c, oh, ow), x.device())?;
        let y = if spatial == 1 { y.squeeze(2)? } else { y };
        Ok(vec![y.to_dtype(dtype)?])
    }
}

/// The mean of each `plane` consecutive values of `v` (a trailing partial plane is left
/// out). Each plane sums into eight lanes side by side, then the lanes and the plane's last few
/// values: summed one value after another, a plane is a chain of dependent adds, and
/// EfficientNet's 1280 planes of 49 values took 12 µs that way (`EIR_ONNX_PROFILE=nodes`,
/// against ONNX Runtime's 5 µs). Runs of planes are shared out over the pool where there are
/// enough values to pay for it: on one thread those 1280 planes were still 5.7 µs in which
/// the other thread waited.
fn plane_means(v: &[f32], plane: usize) -> Vec<f32> {
    /// Planes per unit of parallel work, and the values from which the work is shared out.
    const RUN: usize = 128;
    const SHARED: usize = 1 << 14;
    if plane == 0 {
        return Vec::new();
    }
    let planes = v.len() / plane;
    let v = &v[..planes * plane];
    let mean = |p: &[f32]| {
        let mut lanes = [0f32; 8];
        let mut eights = p.chunks_exact(8);
        for eight in &mut eights {
            for (lane, x) in lanes.iter_mut().zip(eight) {
                *lane += x;
            }
        }
        (lanes.iter().sum::<f32>() + eights.remainder().iter().sum::<f32>()) / plane as f32
    };
    let run = |(dst, src): (&mut [f32], &[f32])| {
        for (d, p) in dst.iter_mut().zip(src.chunks_exact(plane)) {
            *d = mean(p);
        }
    };
    let mut out = vec![0f32; planes];
    let runs = out.chunks_mut(RUN).zip(v.chunks(RUN.saturating_mul(plane)));
    if v.len() >= SHARED {
        crate::nn::kernels::par::for_each(runs, run);
    } else {
        runs.for_each(run);
    }
    out
}

#[cfg(test)]
mod plane_means_tests {
    #[test]
    fn plane_means_are_each_planes_mean() {
        // Up to 20 planes, and 1280 of 49 (EfficientNet's, shared out over the pool).
        for plane in [1usize, 2, 7, 8, 9, 49] {
            for planes in (0..20).chain((plane == 49).then_some(1280)) {
                let v: Vec<f32> = (0..planes * plane).map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0).collect();
                let got = super::plane_means(&v, plane);
                assert_eq!(got.len(), planes);
                for (p, got) in v.chunks(plane).zip(got) {
                    let want = p.iter().map(|&x| f64::from(x)).sum::<f64>() / plane as f64;
                    assert!((f64::from(got) - want).abs() <= 1e-5 * want.abs().max(1.0), "{planes} planes of {plane}");
                }
            }
        }
        assert!(super::plane_means(&[], 0).is_empty());
    }
}

#[cfg(test)]
mod batched_tests {
    use candle_core::Device;

    use super::*;

    /// Attention's batched products on EIR's GEMM equal candle's, on ragged sizes and on a
    /// transposed view (`Kᵀ`); operands it does not take (batch axes that broadcast) are
    /// left to candle.
    #[test]
    fn batched_products_match_candle() {
        let dev = Device::Cpu;
        let t = |dims: &[usize], seed: usize| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i * 31 + seed * 7) % 29) as f32 / 8.0 - 1.7).collect();
            Tensor::from_vec(v, dims, &dev).unwrap()
        };
        let cases: [(&[usize], &[usize]); 4] = [
            (&[2, 3, 5, 7], &[2, 3, 7, 4]),
            (&[8, 12, 20, 32], &[8, 12, 32, 20]),
            (&[1, 1, 1], &[1, 1, 1]),
            (&[3, 17, 33], &[3, 33, 9]),
        ];
        for (da, db) in cases {
            let (a, b) = (t(da, 1), t(db, 2));
            let got = matmul_batched(&a, &b).unwrap().expect("taken");
            let want = a.matmul(&b).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff =
                (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-4, "{da:?} x {db:?}: {diff}");
        }
        // Q·Kᵀ with Kᵀ a view out of a transpose.
        let (q, k) = (t(&[2, 4, 10, 16], 3), t(&[2, 4, 10, 16], 4));
        let kt = k.transpose(2, 3).unwrap();
        let got = matmul(&q, &kt).unwrap();
        let want = q.matmul(&kt.contiguous().unwrap()).unwrap();
        let diff =
            (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-4, "Q·Kᵀ: {diff}");
        assert!(matmul_batched(&t(&[2, 3, 4], 1), &t(&[1, 4, 5], 2)).unwrap().is_none());
        // Empty batches and rows: empty results of the right shape, on each new fast path.
        assert_eq!(matmul_batched(&t(&[0, 3, 4], 1), &t(&[0, 4, 5], 2)).unwrap().expect("taken").dims(), &[0, 3, 5]);
        assert_eq!(softmax(&t(&[0, 7], 1), -1, false, false).unwrap().dims(), &[0, 7]);
        assert_eq!(softmax(&t(&[3, 0, 7], 1), 1, true, false).unwrap().dims(), &[3, 0, 7]);
        assert_eq!(softmax(&t(&[2, 0], 1), -1, false, true).unwrap().dims(), &[2, 0]);
        let (x, g) = (t(&[0, 6], 1), t(&[6], 2));
        assert_eq!(layer_norm(&[Some(&x), Some(&g), Some(&g)], -1, 1e-5).unwrap().dims(), &[0, 6]);
    }
}
