//! Neural-network operators: convolution (with a direct depthwise kernel and a matmul path for
//! 1x1), normalisation, pooling, matrix products, softmax.

use candle_core::{D, DType, Tensor};
use rayon::prelude::*;

use super::conv::{self, Clamp};
use super::{Built, Node, axis, input, op};
use crate::nn::error::NnError;

pub(super) fn build(name: &str, node: &Node<'_>) -> Option<Built> {
    Some(match name {
        "Conv" => Conv::build(node),
        "BatchNormalization" => {
            let eps = f64::from(node.float_or("epsilon", 1e-5));
            op(move |i| Ok(vec![batch_norm(i, eps)?]))
        }
        "Gemm" => Gemm::build(node),
        "MatMul" => op(|i| Ok(vec![matmul(input(i, 0, "MatMul")?, input(i, 1, "MatMul")?)?])),
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
                let (nc, plane) = (x.dims()[0] * x.dims()[1], x.dims()[2..].iter().product::<usize>());
                let means: Vec<f32> = super::with_f32(x, |v| {
                    v.chunks(plane.max(1)).take(nc).map(|p| p.iter().sum::<f32>() / plane as f32).collect()
                })?;
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
            op(move |i| {
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

/// numpy `matmul`: 1-D operands are promoted and the added axis removed again.
pub(super) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor, NnError> {
    let (a1, b1) = (a.rank() == 1, b.rank() == 1);
    let a2 = if a1 { a.unsqueeze(0)? } else { a.clone() };
    let b2 = if b1 { b.unsqueeze(1)? } else { b.clone() };
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

    /// (begin, end) padding for input size `n`, kernel `k`, stride `s`, dilation `d`.
    fn pads(self, explicit: (usize, usize), n: usize, k: usize, s: usize, d: usize) -> (usize, usize) {
        match self {
            Self::NotSet => explicit,
            Self::Valid => (0, 0),
            Self::SameUpper | Self::SameLower => {
                let out = n.div_ceil(s);
                let total = ((out.saturating_sub(1)) * s + (k - 1) * d + 1).saturating_sub(n);
                let small = total / 2;
                if self == Self::SameUpper { (small, total - small) } else { (total - small, small) }
            }
        }
    }
}

fn ints_or(node: &Node<'_>, name: &str, n: usize, default: usize) -> Result<Vec<usize>, NnError> {
    match node.ints(name) {
        None => Ok(vec![default; n]),
        Some(v) => v.iter().map(|&x| usize::try_from(x).map_err(|_| node.bad(format!("negative {name}")))).collect(),
    }
}

/// Convolution over 1 or 2 spatial dimensions.
/// `Y = alpha·A'·B' + beta·C`. The common case (f32, `B` a weight matrix, alpha 1) runs on the
/// convolution GEMM with `B'` laid out `[K, N]` once; everything else on candle's matmul.
struct Gemm {
    alpha: f64,
    beta: f64,
    ta: bool,
    tb: bool,
    /// `B'` contiguous `[K, N]` (transposed once when `transB`).
    b_kn: super::Derived<Vec<f32>>,
}

impl Gemm {
    fn build(node: &Node<'_>) -> Built {
        Ok(Box::new(Gemm {
            alpha: f64::from(node.float_or("alpha", 1.0)),
            beta: f64::from(node.float_or("beta", 1.0)),
            ta: node.int_or("transA", 0) != 0,
            tb: node.int_or("transB", 0) != 0,
            b_kn: Default::default(),
        }))
    }

    /// `B'` as `[K, N]` row-major floats (empty if `b` cannot be read so).
    fn b_kn(b: &Tensor, tb: bool) -> Vec<f32> {
        let b = if tb { b.t() } else { Ok(b.clone()) };
        b.and_then(|b| b.flatten_all()?.to_vec1::<f32>()).unwrap_or_default()
    }

    /// `A'·B'` on the convolution GEMM, or `None` where it does not apply.
    fn fast(&self, a: &Tensor, b: &Tensor) -> Result<Option<Tensor>, NnError> {
        if a.dtype() != DType::F32 || b.dtype() != DType::F32 || a.rank() != 2 || b.rank() != 2 || self.ta {
            return Ok(None);
        }
        let ((m, k), (b0, b1)) = (a.dims2()?, b.dims2()?);
        let (kb, n) = if self.tb { (b1, b0) } else { (b0, b1) };
        if kb != k || n < 16 {
            return Ok(None);
        }
        let b_kn = self.b_kn.get(b.id(), || Self::b_kn(b, self.tb));
        if b_kn.len() != k * n {
            return Ok(None);
        }
        let mut y = vec![0f32; m * n];
        super::with_f32(a, |a_rows| super::sgemm::gemm([m, n, k], a_rows, None, &b_kn, &mut y, None, None))??;
        Ok(Some(Tensor::from_vec(y, (m, n), a.device())?))
    }
}

impl super::Op for Gemm {
    fn prepare(&self, constants: &[Option<&Tensor>]) {
        if let Some(Some(b)) = constants.get(1)
            && b.dtype() == DType::F32
            && b.rank() == 2
            && b.dims()[if self.tb { 0 } else { 1 }] >= 16
        {
            let _ = self.b_kn.get(b.id(), || Self::b_kn(b, self.tb));
        }
    }

    fn run(&self, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        let a = input(i, 0, "Gemm")?;
        let b = input(i, 1, "Gemm")?;
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
        if let Some(c) = i.get(2).copied().flatten() {
            let c = if self.beta != 1.0 { c.affine(self.beta, 0.0)? } else { c.clone() };
            y = y.broadcast_add(&c)?;
        }
        Ok(vec![y])
    }
}

struct Conv {
    auto_pad: AutoPad,
    pads: Option<Vec<usize>>,
    strides: Option<Vec<usize>>,
    dilations: Option<Vec<usize>>,
    group: usize,
    clamp: Option<Clamp>,
    packed: conv::PackedWeights,
}

impl Conv {
    fn build(node: &Node<'_>) -> Built {
        let group = usize::try_from(node.int_or("group", 1)).map_err(|_| node.bad("negative group"))?;
        let strides = node.ints("strides").map(|_| ints_or(node, "strides", 0, 1)).transpose()?;
        let dilations = node.ints("dilations").map(|_| ints_or(node, "dilations", 0, 1)).transpose()?;
        let pads = node.ints("pads").map(|_| ints_or(node, "pads", 0, 0)).transpose()?;
        Ok(Box::new(Conv {
            auto_pad: AutoPad::parse(node)?,
            pads,
            strides,
            dilations,
            group: group.max(1),
            clamp: None,
            packed: conv::PackedWeights::default(),
        }))
    }
}

impl super::Op for Conv {
    fn prepare(&self, constants: &[Option<&Tensor>]) {
        if let Some(Some(w)) = constants.get(1)
            && w.dtype() == DType::F32
        {
            conv::prepack(&self.packed, w, self.group);
        }
    }

    fn fuse_clamp(&mut self, clamp: Clamp) -> bool {
        self.clamp = Some(match self.clamp {
            Some(c) => Clamp { lo: c.lo.max(clamp.lo), hi: c.hi.min(clamp.hi) },
            None => clamp,
        });
        true
    }

    fn run(&self, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        let x = input(i, 0, "Conv")?;
        let w = input(i, 1, "Conv")?;
        let bias = i.get(2).copied().flatten();
        let spatial = x.rank().checked_sub(2).filter(|s| (1..=2).contains(s)).ok_or_else(|| {
            NnError::unsupported(format!(
                "Conv on a rank-{} input: only 1-D and 2-D convolutions are supported",
                x.rank()
            ))
        })?;
        if w.rank() != x.rank() {
            return Err(NnError::invalid_argument(format!(
                "Conv weight {:?} does not match input {:?}",
                w.dims(),
                x.dims()
            )));
        }
        let strides = self.strides.clone().unwrap_or_else(|| vec![1; spatial]);
        let dil = self.dilations.clone().unwrap_or_else(|| vec![1; spatial]);
        let explicit = self.pads.clone().unwrap_or_else(|| vec![0; 2 * spatial]);
        if strides.len() != spatial || dil.len() != spatial || explicit.len() != 2 * spatial {
            return Err(NnError::invalid_argument("Conv: strides/dilations/pads do not match the input rank"));
        }
        let ks = &w.dims()[2..];
        let pads: Vec<(usize, usize)> = (0..spatial)
            .map(|d| {
                self.auto_pad.pads((explicit[d], explicit[d + spatial]), x.dims()[2 + d], ks[d], strides[d], dil[d])
            })
            .collect();
        if x.dtype() == DType::F32 {
            // 1-D convolutions run as 2-D ones with a height of 1.
            let (x2, w2, g) = if spatial == 1 {
                let g = conv::Geometry {
                    pads: [(0, 0), pads[0]],
                    strides: [1, strides[0]],
                    dilations: [1, dil[0]],
                    group: self.group,
                };
                (x.unsqueeze(2)?, w.unsqueeze(2)?, g)
            } else {
                let g = conv::Geometry {
                    pads: [pads[0], pads[1]],
                    strides: [strides[0], strides[1]],
                    dilations: [dil[0], dil[1]],
                    group: self.group,
                };
                (x.clone(), w.clone(), g)
            };
            let y = conv::conv2d(&x2, &w2, bias, &g, self.clamp, Some((&self.packed, w.id())))?;
            return Ok(vec![if spatial == 1 { y.squeeze(2)? } else { y }]);
        }
        // 1-D (STFT-style) and non-f32 convolutions: candle, on a padded copy if needed.
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
        let kernel = node.ints("kernel_shape").ok_or_else(|| node.bad("missing kernel_shape"))?;
        let kernel: Vec<usize> = kernel.iter().map(|&k| k.max(1) as usize).collect();
        if kernel.is_empty() || kernel.len() > 2 {
            return Err(NnError::unsupported(format!("{}: only 1-D and 2-D pooling", node.proto.op_type)));
        }
        Ok(Box::new(Pool {
            max,
            strides: node.ints("strides").map(|_| ints_or(node, "strides", 0, 1)).transpose()?,
            pads: node.ints("pads").map(|_| ints_or(node, "pads", 0, 0)).transpose()?,
            dilations: node.ints("dilations").map(|_| ints_or(node, "dilations", 0, 1)).transpose()?,
            auto_pad: AutoPad::parse(node)?,
            ceil: node.int_or("ceil_mode", 0) != 0,
            count_pad: node.int_or("count_include_pad", 0) != 0,
            kernel,
        }))
    }
}

impl super::Op for Pool {
    fn run(&self, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        let x0 = input(i, 0, "Pool")?;
        let spatial = self.kernel.len();
        if x0.rank() != spatial + 2 {
            return Err(NnError::invalid_argument(format!("pooling input {:?} is not {}-D", x0.dims(), spatial)));
        }
        let dtype = x0.dtype();
        // 1-D pools run as 2-D with a height of 1.
        let x = if spatial == 1 { x0.unsqueeze(2)? } else { x0.clone() };
        let (n, c, h, wd) = x.dims4()?;
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
                self.auto_pad.pads((pb[d], pe[d]), len, kernel[d], strides[d], dil[d])
            };
        }
        let out_len = |d: usize| {
            let len = [h, wd][d] + pads[d].0 + pads[d].1;
            let eff = (kernel[d] - 1) * dil[d] + 1;
            let span = len.saturating_sub(eff);
            let o = if self.ceil { span.div_ceil(strides[d]) } else { span / strides[d] } + 1;
            // With ceil_mode a last window may not start inside the padded input.
            if self.ceil && (o - 1) * strides[d] >= [h, wd][d] + pads[d].0 { o - 1 } else { o }
        };
        let (oh, ow) = (out_len(0), out_len(1));
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * c * oh * ow];
        let max = self.max;
        let count_pad = self.count_pad;
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane, dst)| {
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
