//! Convolution: EIR's own f32 kernels, because the shapes of mobile vision models (depthwise
//! 3x3/5x5, 1x1 projections, asymmetric "same" padding) are where generic paths lose most.
//!
//! - depthwise: on blocks of channels, channels innermost ([`super::depthwise`]);
//! - 1x1, stride 1, no padding: one GEMM over the batch (`W · X`), no im2col;
//! - few input taps (a stem: 3 channels, 3x3): directly, 16 channels in registers ([`super::stem`]);
//! - anything else: im2col (padding as zeros) + GEMM per image and group;
//!
//! each with a fused epilogue: bias and an optional clamp (Relu, ReLU6/Clip), applied as the
//! output is written. Outputs are not zeroed first: each path writes every element (or zeroes
//! before it accumulates). Other dtypes
//! fall back to candle (1-D convolutions come here as 2-D ones with a height of 1).

use std::mem::MaybeUninit;

use candle_core::{DType, Tensor, TensorId};

use super::depthwise::{self, Depthwise, MAX_LANES};
use super::stem::Stem;
use super::with_f32;
use crate::nn::error::NnError;
use crate::nn::kernels::act;
use crate::nn::kernels::sgemm::{self, Clamp, Packed, gemm_into};

/// Geometry of a 2-D convolution.
pub(crate) struct Geometry {
    pub pads: [(usize, usize); 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub group: usize,
}

/// A convolution's weights packed for the GEMM kernel, one per group.
pub(crate) type PackedWeights = super::Derived<Vec<Packed>>;

/// `ws` (`[m, kdim]`) packed for the GEMM kernel, one per group; empty where it does not run.
fn pack_groups(ws: &[f32], m: usize, kdim: usize, group: usize) -> Vec<Packed> {
    let mg = m / group.max(1);
    (0..group)
        .filter_map(|i| ws.get(i * mg * kdim..(i + 1) * mg * kdim).and_then(|w| Packed::new(mg, kdim, w)))
        .collect()
}

/// Packs a constant weight `w` (`[m, c/group, k...]`) into `cache` ahead of the first run, for
/// the convolutions that take the GEMM paths (not depthwise ones).
pub(crate) fn prepack(cache: &PackedWeights, w: &Tensor, group: usize) {
    let (m, cg) = match w.dims() {
        [m, cg, ..] => (*m, *cg),
        _ => return,
    };
    if group == 0 || m % group != 0 || (cg == 1 && group == m) {
        return;
    }
    let kdim = w.elem_count() / m.max(1);
    let _ = with_f32(w, |ws| cache.get(w.id(), || pack_groups(ws, m, kdim, group)));
}

/// At most what [`prepack`] allocates for `w`: each group's rows in whole panels of up to 12
/// kept, and a copy of `w` while it is read as f32.
pub(crate) fn prepacked_bytes(w: &Tensor, group: usize) -> super::Prepared {
    let m = w.dims().first().copied().unwrap_or(0) as u64;
    let kdim = (w.elem_count() as u64).checked_div(m).unwrap_or(0);
    let rows = m.saturating_add((group as u64).saturating_mul(12));
    super::Prepared {
        kept: super::f32_bytes(rows.saturating_mul(kdim)),
        transient: super::f32_bytes(w.elem_count() as u64),
    }
}

/// Below this many elements a pass runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// Output length along one axis, or `None` when the kernel's reach exceeds the padded input
/// (or a size overflows). `k`, `s` and `d` are at least 1 (checked by [`ConvPlan::new`]).
fn out_len(len: usize, pad: (usize, usize), k: usize, s: usize, d: usize) -> Option<usize> {
    let padded = len.checked_add(pad.0)?.checked_add(pad.1)?;
    let reach = (k - 1).checked_mul(d)?.checked_add(1)?;
    padded.checked_sub(reach).map(|r| r / s + 1)
}

/// A 2-D convolution's sizes, proven consistent: `x` is `[n, c, h, w]` with `h, w >= 1`,
/// `w` is `[m, c/group, kh, kw]` with `kh, kw >= 1`, `group` divides `c` and `m`, strides and
/// dilations are at least 1, and the output `[n, m, oh, ow]` is not empty. Every buffer the
/// kernels allocate (output, im2col columns, padded planes) is sized by [`ConvPlan::bytes`]
/// with checked arithmetic, and the executor reserves that many bytes before the kernels run,
/// so no size product inside them can overflow.
pub(crate) struct ConvPlan {
    dims: [usize; 4],
    kernel: [usize; 4],
    out: [usize; 2],
    /// Floats of one padded input plane.
    plane: u64,
    /// The depthwise kernel's geometry, where the convolution is depthwise.
    depthwise: Option<Depthwise>,
    /// The direct kernel's, where the convolution has few input taps (a stem).
    pub(super) stem: Option<Stem>,
}

impl ConvPlan {
    /// Checks `x` (`[n, c, h, w]`) and `w` (`[m, c/group, kh, kw]`) against `g`.
    pub(crate) fn new(x: &[usize], w: &[usize], g: &Geometry) -> Result<Self, NnError> {
        let (&[n, c, h, wd], &[m, cg, kh, kw]) = (x, w) else {
            return Err(NnError::invalid_argument(format!("Conv of {x:?} by {w:?}: both must be 4-D here")));
        };
        if g.group == 0 || c % g.group != 0 || cg * g.group != c || m % g.group != 0 {
            return Err(NnError::invalid_argument(format!(
                "Conv: weight {w:?} and group {} do not fit {c} channels",
                g.group
            )));
        }
        if kh == 0 || kw == 0 || g.strides.contains(&0) || g.dilations.contains(&0) {
            return Err(NnError::invalid_argument("Conv: kernel, strides and dilations must be at least 1"));
        }
        if h == 0 || wd == 0 {
            return Err(NnError::invalid_argument(format!("Conv: an input plane of {h}x{wd}")));
        }
        let (Some(oh), Some(ow)) = (
            out_len(h, g.pads[0], kh, g.strides[0], g.dilations[0]),
            out_len(wd, g.pads[1], kw, g.strides[1], g.dilations[1]),
        ) else {
            return Err(NnError::invalid_argument("Conv: kernel larger than the padded input"));
        };
        // A padded plane covers the kernel's reach from every output and the whole input.
        let side = |o: usize, k: usize, d: usize, s: usize, len: usize, pad: usize| -> Option<u64> {
            let reach = (o as u64 - 1).checked_mul(s as u64)?.checked_add(((k - 1) as u64).checked_mul(d as u64)?)?;
            reach.checked_add(1)?.max((len as u64).checked_add(pad as u64)?).checked_add(2 * s as u64)
        };
        let plane = side(oh, kh, g.dilations[0], g.strides[0], h, g.pads[0].0)
            .zip(side(ow, kw, g.dilations[1], g.strides[1], wd, g.pads[1].0))
            .and_then(|(a, b)| a.checked_mul(b))
            .ok_or_else(|| NnError::too_large("Conv: the padded input does not fit in memory"))?;
        let depthwise = if g.group == c && m == c && cg == 1 {
            let plan = Depthwise::new([h, wd], [kh, kw], [oh, ow], g)
                .ok_or_else(|| NnError::too_large("Conv: the padded input does not fit in memory"))?;
            Some(plan)
        } else {
            None
        };
        let stem = Stem::new([n, c, h, wd], [m, cg, kh, kw], [oh, ow], g).filter(|s| s.shares(n));
        Ok(Self { dims: [n, c, h, wd], kernel: [m, cg, kh, kw], out: [oh, ow], plane, depthwise, stem })
    }

    /// The input's shape, `[n, c, h, w]`.
    pub(crate) fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// The output's height and width.
    pub(crate) fn out(&self) -> [usize; 2] {
        self.out
    }

    /// Whether [`channels_last_banded`] runs a block on this depthwise plan.
    pub(crate) fn takes_banded(&self) -> bool {
        self.depthwise.as_ref().is_some_and(Depthwise::takes_banded) && self.dims[1].is_multiple_of(16)
    }

    /// Whether [`channels_last`] runs a block on this depthwise plan.
    pub(crate) fn takes_channels_last(&self) -> bool {
        self.depthwise.as_ref().is_some_and(Depthwise::takes_channels_last) && self.dims[1].is_multiple_of(16)
    }

    /// The most bytes the kernels allocate: the output, one group's im2col columns, a padded
    /// plane for every worker thread, the depthwise kernel's weights by channel block and
    /// its tile and output band for every worker thread, and the direct kernel's weights by
    /// channel group and its phase rows for every worker thread.
    pub(crate) fn bytes(&self) -> Result<u64, NnError> {
        let [n, _, _, _] = self.dims;
        let [m, cg, kh, kw] = self.kernel;
        let [oh, ow] = self.out;
        let too_big =
            || NnError::too_large(format!("Conv of {:?} by {:?}: does not fit in memory", self.dims, self.kernel));
        let output = super::count(&[n, m, oh, ow])?;
        let columns = super::count(&[cg, kh, kw, oh, ow])?;
        let threads = rayon::current_num_threads() as u64 + 1;
        let planes = self.plane.checked_mul(threads).ok_or_else(too_big)?;
        let depthwise = match &self.depthwise {
            Some(d) => {
                let weights = super::count(&[m.next_multiple_of(MAX_LANES), kh * kw + 1])?;
                d.thread_floats().checked_mul(threads).and_then(|t| t.checked_add(weights)).ok_or_else(too_big)?
            }
            None => 0,
        };
        let stem = match &self.stem {
            Some(s) => s.floats(n, threads).ok_or_else(too_big)?,
            None => 0,
        };
        let floats = output
            .checked_add(columns)
            .and_then(|v| v.checked_add(stem))
            .and_then(|v| v.checked_add(planes))
            .and_then(|v| v.checked_add(depthwise))
            .ok_or_else(too_big)?;
        // f32 values; the non-f32 path (candle) makes a padded copy and may widen: count 8 bytes.
        floats.checked_mul(super::WIDE).ok_or_else(too_big)
    }
}

/// Output columns `ox` for which input column `ox*s + off` lies in `0..len` (`off` may be
/// negative): the valid range, so the inner loops need no bounds branches.
pub(super) fn valid(ow: usize, len: usize, s: usize, off: isize) -> (usize, usize) {
    let lo = if off < 0 { ((-off) as usize).div_ceil(s) } else { 0 };
    let last = len as isize - 1 - off;
    let hi = if last < 0 { 0 } else { (last as usize / s + 1).min(ow) };
    (lo.min(hi), hi)
}

/// A 2-D convolution of `x` `[n, c, h, w]` with `w` `[m, c/group, kh, kw]`, plus bias and clamp,
/// as `plan` (made from these shapes and `g`) says. `cache` keeps `w` packed between runs, under
/// the id of the weight tensor it came from, and `keep` blocked for a depthwise plan.
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    plan: &ConvPlan,
    g: &Geometry,
    clamp: Option<Clamp>,
    (cache, keep): (Option<(&PackedWeights, TensorId)>, depthwise::Keep<'_>),
) -> Result<Tensor, NnError> {
    if x.dims() != plan.dims || w.dims() != plan.kernel {
        return Err(NnError::runtime("Conv: the plan was made for other shapes"));
    }
    let [n, c, h, wd] = plan.dims;
    let [m, cg, kh, kw] = plan.kernel;
    let [oh, ow] = plan.out;
    let bias = bias.map(|b| with_f32(b, <[f32]>::to_vec)).transpose()?;
    if let Some(b) = &bias
        && b.len() != m
    {
        return Err(NnError::invalid_argument(format!("Conv: bias of {} for {m} output channels", b.len())));
    }
    // The output is not zeroed first: the fast paths write every element once, and the others
    // zero it themselves (`zeroed`).
    let len = n * m * oh * ow;
    let mut out = super::uninit_f32(len)?;
    let buf = &mut out.spare_capacity_mut()[..len];
    with_f32(x, |xs| {
        with_f32(w, |ws| {
            let packed = |grp: usize| {
                let (cache, key) = cache?;
                let all = cache.get(key, || pack_groups(ws, m, cg * kh * kw, g.group));
                all.get(grp).is_some().then_some(all)
            };
            if let Some(depthwise) = &plan.depthwise {
                depthwise.run(xs, ws, buf, [n, c], bias.as_deref(), clamp, keep);
                Ok(())
            } else if kh == 1 && kw == 1 && g.group == 1 && g.strides == [1, 1] && g.pads == [(0, 0); 2] {
                let packed = packed(0);
                let packed = packed.as_ref().map(|p| &p[0]);
                gemm_into(n, [m, h * wd, c], ws, packed, xs, buf, bias.as_deref(), clamp)
            } else if let Some(stem) = plan.stem.as_ref().filter(|_| crate::nn::kernels::simd::avx512()) {
                stem.run(xs, ws, n, bias.as_deref(), clamp, buf);
                Ok(())
            } else {
                let packed = packed(g.group - 1);
                let w = GemmWeights { ws, packed: packed.as_deref().map(Vec::as_slice), bias: bias.as_deref(), clamp };
                im2col_gemm(xs, w, buf, [n, c, h, wd], [m, kh, kw], [oh, ow], g)
            }
        })
    })???; // the two borrows, then the kernel's own result
    // SAFETY: the kernel above returned Ok, so it initialised all `len` elements (each path
    // writes every output element, or zeroes the buffer before it accumulates).
    unsafe { out.set_len(len) };
    Ok(Tensor::from_vec(out, (n, m, oh, ow), x.device())?)
}

/// Floats of a fused pass's depthwise result per range of rows (256 KiB), and of its
/// expanded input rows (1 MiB); a whole plane may take 576 KiB of each (with the product's
/// band, within a 2 MiB L2 cache), which spares a small plane's expand the rows it would
/// compute twice (`EIR_ONNX_PROFILE=nodes`, batch 8: EfficientNet's 14x14 blocks 3.7 → 3.1
/// ms; a 28x28 one as a whole plane of 768 KiB was slower, 2.6 → 3.1 ms).
const CHAIN_SCRATCH: usize = 1 << 16;
const EXPAND_SCRATCH: usize = 1 << 18;
const WHOLE_PLANE: usize = 9 << 14;

/// The most a fused expand may compute twice: the input rows a range reads over the rows its
/// outputs would read without the kernel's overlap (above this the expand runs on its own).
const MAX_HALO: f64 = 1.34;

/// The most of the expanded rows a fused expand may compute twice in a split that is timed
/// against the others ([`chain_candidates`]).
const TUNED_HALO: f64 = 1.6;

/// The fewest columns of a timed split's product: a narrower one would take the GEMM's
/// turned-around kernel, whose summation order differs, and every split must compute the
/// same numbers.
const TUNED_COLUMNS: usize = 16;

/// How a fused depthwise + pointwise pass splits its output: `rows` output rows of one image
/// at a time (ranges as even as they can be), or `None` where the split would leave threads
/// idle or products too narrow to pay (a batch of one 7x7 plane: the kernels then run one
/// after the other, each in parallel on its own). `expanding`: an expand convolution computes
/// the depthwise input range by range, which must fit [`EXPAND_SCRATCH`] without computing
/// more than [`MAX_HALO`] of it.
pub(crate) fn chain_rows(plan: &ConvPlan, expanding: bool) -> Option<usize> {
    let (most, threads) = chain_limit(plan, expanding)?;
    let [n, _, _, _] = plan.dims;
    let [oh, _] = plan.out;
    // At least two ranges per thread, and where there are few, as many for each thread (7
    // ranges on 2 threads take as long as 8: EfficientNet's first block at batch 1, 0.45 →
    // 0.31 ms as 8).
    let mut ranges = oh.div_ceil(most).max((2 * threads).div_ceil(n)).min(oh);
    if n * ranges < 8 * threads {
        ranges = (n * ranges).next_multiple_of(threads).div_ceil(n).min(oh);
    }
    let rows = oh.div_ceil(ranges);
    // (A range of a whole plane computes no row twice, whatever its padding.)
    if expanding && rows < oh && plan.depthwise.as_ref()?.halo(rows) > MAX_HALO {
        return None;
    }
    chain_pays(plan, rows, threads, 32).then_some(rows)
}

/// Every split of a fused pass worth timing ([`super::tune`]): [`chain_rows`]'s first, then
/// those giving each thread one, two or four ranges of rows, within the same scratch limits;
/// with `expanding`, none that computes more than [`TUNED_HALO`] of the expanded rows.
pub(crate) fn chain_candidates(plan: &ConvPlan, expanding: bool) -> Vec<usize> {
    let mut rows: Vec<usize> = chain_rows(plan, expanding).into_iter().collect();
    let (Some((most, threads)), Some(dw)) = (chain_limit(plan, expanding), plan.depthwise.as_ref()) else {
        return rows;
    };
    let [n, _, _, _] = plan.dims;
    let [oh, _] = plan.out;
    for per_thread in [1, 2, 4] {
        let ranges = (per_thread * threads).div_ceil(n).max(oh.div_ceil(most)).min(oh);
        let r = oh.div_ceil(ranges);
        let halo_ok = !expanding || r == oh || dw.halo(r) <= TUNED_HALO;
        if halo_ok && chain_pays(plan, r, threads, TUNED_COLUMNS) && !rows.contains(&r) {
            rows.push(r);
        }
    }
    rows
}

/// Whether every range of `rows` output rows (the last may be shorter) gives the fused
/// pass's products more than [`sgemm::TURNED_MAX`] columns: the project's, and with
/// `expanding` the expand's over the input rows the range reads. Narrower ones run turned
/// around, in another order of summation than the same columns in a wider product.
pub(crate) fn chain_tiled(plan: &ConvPlan, rows: usize, expanding: bool) -> bool {
    let [_, _, _, w] = plan.dims;
    let [oh, ow] = plan.out;
    let Some(dw) = plan.depthwise.as_ref() else { return false };
    rows > 0
        && (0..oh).step_by(rows).all(|oy0| {
            let oy1 = (oy0 + rows).min(oh);
            let (ya, yb) = dw.input_span(oy0, oy1);
            (oy1 - oy0) * ow > sgemm::TURNED_MAX && (!expanding || (yb - ya) * w > sgemm::TURNED_MAX)
        })
}

/// The most output rows one range of a fused pass may hold (its scratch within
/// [`CHAIN_SCRATCH`], and with `expanding` its expanded rows within [`EXPAND_SCRATCH`], unless
/// a whole plane fits [`WHOLE_PLANE`]), and the threads it is shared among; `None` for a
/// plan that is not depthwise or an empty batch.
fn chain_limit(plan: &ConvPlan, expanding: bool) -> Option<(usize, usize)> {
    let [n, c, _, w] = plan.dims;
    let [oh, ow] = plan.out;
    let dw = plan.depthwise.as_ref()?;
    if n == 0 || c == 0 {
        return None;
    }
    let whole = c * oh * ow <= WHOLE_PLANE && (!expanding || c * dw.input_rows(oh) * w <= WHOLE_PLANE);
    let mut most = if whole { oh } else { (CHAIN_SCRATCH / (c * ow).max(1)).clamp(1, oh) };
    if expanding && !whole {
        while most > 1 && c * dw.input_rows(most) * w > EXPAND_SCRATCH {
            most -= 1;
        }
    }
    Some((most, rayon::current_num_threads()))
}

/// Whether ranges of `rows` rows keep every thread busy and each range's product at least
/// `columns` wide.
fn chain_pays(plan: &ConvPlan, rows: usize, threads: usize, columns: usize) -> bool {
    let [n, _, _, _] = plan.dims;
    let [oh, ow] = plan.out;
    rows * ow >= columns && n * oh.div_ceil(rows) >= threads
}

/// The most bytes a fused pass (`plan` the depthwise convolution's, `m` the pointwise
/// outputs, `expand` the expand convolution's inputs where there is one) allocates beyond its
/// output: per worker thread, the depthwise scratch, tile and band, the product's band, and
/// the expanded input rows with the rows they come from.
pub(crate) fn chain_bytes(plan: &ConvPlan, m: usize, rows: usize, expand: Option<usize>) -> Result<u64, NnError> {
    let [_, c, _, w] = plan.dims;
    let [_, ow] = plan.out;
    let too_big = || NnError::too_large("Conv: the fused pass does not fit in memory");
    let dw = plan.depthwise.as_ref().ok_or_else(too_big)?;
    let expanded = match expand {
        Some(c_in) => super::count(&[c + c_in, dw.input_rows(rows), w])?,
        None => 0,
    };
    let per_job = super::count(&[c + m, rows, ow])?
        .checked_add(dw.thread_floats())
        .and_then(|f| f.checked_add(expanded))
        .ok_or_else(too_big)?;
    // The loop's caller and each of its helpers hold one set of buffers (`kernels::par`: at
    // most one per pool thread in all); the four per thread this keeps from rayon's former
    // split of about four jobs per thread over-reserve now.
    let jobs = 4 * rayon::current_num_threads() as u64 + 1;
    per_job.checked_mul(jobs).and_then(|f| f.checked_mul(4)).ok_or_else(too_big)
}

/// A pointwise convolution's operands: weights (`[m, c, 1, 1]`), bias, clamp, packing cache.
pub(crate) type Pointwise<'a> = (&'a Tensor, Option<&'a Tensor>, Option<Clamp>, Option<(&'a PackedWeights, TensorId)>);

/// A depthwise convolution (by `dw.0`, with its bias and clamp, planned as `plan`) whose only
/// reader is a pointwise one (`pw`), in one pass: each range of `rows` output rows of one
/// image runs the depthwise kernel for every channel into an L2-sized scratch buffer, and the
/// pointwise product reads it from there, so the depthwise result never goes out to memory
/// (at batch 8, EfficientNet's depthwise outputs are 75 MB written and read again). With
/// `expand` (a pointwise convolution whose only reader is the depthwise one), `x` is the
/// expand convolution's input and each range computes just the expanded rows it reads, so the
/// expanded tensor (the block's largest) never exists whole either. With `residual` (of the
/// output's shape), each range adds its rows of it as it writes the output (a residual
/// connection's `Add`, which would otherwise read both tensors from memory again).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub(crate) fn depthwise_pointwise(
    x: &Tensor,
    expand: Option<Pointwise<'_>>,
    (wd, bd, clamp_d, keep_d): (&Tensor, Option<&Tensor>, Option<Clamp>, depthwise::Keep<'_>),
    plan: &ConvPlan,
    rows: usize,
    (wp, bp, clamp_p, cache): Pointwise<'_>,
    residual: Option<&Tensor>,
) -> Result<Tensor, NnError> {
    let [n, c, h, w] = plan.dims;
    let [oh, ow] = plan.out;
    let dw = plan.depthwise.as_ref().ok_or_else(|| NnError::runtime("Conv: the plan is not depthwise"))?;
    let c_in = match expand {
        Some((we, ..)) => match (x.dims(), we.dims()) {
            (&[xn, ci, xh, xw], &[ce, wci, 1, 1]) if [xn, xh, xw] == [n, h, w] && ce == c && wci == ci => ci,
            (xd, wd) => {
                return Err(NnError::invalid_argument(format!(
                    "Conv: expand weight {wd:?} on {xd:?} before {c} channels"
                )));
            }
        },
        None if x.dims() == plan.dims => c,
        None => return Err(NnError::runtime("Conv: the plan was made for other shapes")),
    };
    if wd.dims() != plan.kernel {
        return Err(NnError::runtime("Conv: the plan was made for other shapes"));
    }
    let m = match wp.dims() {
        &[m, cp, 1, 1] if cp == c => m,
        d => return Err(NnError::invalid_argument(format!("Conv: pointwise weight {d:?} after {c} channels"))),
    };
    let (bd, bp) = (bias_floats(bd, c, "depthwise")?, bias_floats(bp, m, "pointwise")?);
    let be = bias_floats(expand.and_then(|e| e.1), c, "expand")?;
    let oplane = oh * ow;
    let len = n * m * oplane;
    if let Some(r) = residual
        && r.dims() != [n, m, oh, ow]
    {
        return Err(NnError::invalid_argument(format!("Add of {:?} and {:?}", [n, m, oh, ow], r.dims())));
    }
    if len == 0 || rows == 0 {
        return Ok(Tensor::zeros((n, m, oh, ow), DType::F32, x.device())?);
    }
    let mut out: Vec<f32> = Vec::new();
    out.try_reserve_exact(len).map_err(|_| NnError::too_large(format!("Conv: cannot allocate {len} floats")))?;
    // One item per (image, range of rows): each output channel's rows in that range.
    let mut items: Vec<Vec<&mut [MaybeUninit<f32>]>> = Vec::with_capacity(n * oh.div_ceil(rows));
    for image in out.spare_capacity_mut()[..len].chunks_exact_mut(m * oplane) {
        let mut planes: Vec<_> = image.chunks_exact_mut(oplane).map(|p| p.chunks_mut(rows * ow)).collect();
        for _ in (0..oh).step_by(rows) {
            items.push(planes.iter_mut().filter_map(Iterator::next).collect());
        }
    }
    let failed = std::sync::Mutex::new(None);
    let fail = |e: NnError| *failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
    let we = expand.map(|e| e.0).unwrap_or(wp);
    // The residual's floats, borrowed (without one, the depthwise weights stand in, unread).
    let has_residual = residual.is_some();
    let complete = with_f32(residual.unwrap_or(wd), |rs| {
        let residual = has_residual.then_some(rs);
        with_f32(x, |xs| {
            with_f32(wd, |wds| {
                with_f32(wp, |wps| {
                    with_f32(we, |wes| {
                        let packed = cache.map(|(cache, key)| cache.get(key, || pack_groups(wps, m, c, 1)));
                        let packed = packed.as_ref().and_then(|p| p.first());
                        let packed_e = expand
                            .and_then(|e| e.3)
                            .map(|(cache, key)| cache.get(key, || pack_groups(wes, c, c_in, 1)));
                        let packed_e = packed_e.as_ref().and_then(|p| p.first());
                        // The expanded rows `ya..yb` of image `i`: the expand product over just
                        // those rows of its input.
                        let source = |i: usize, (ya, yb): (usize, usize), input: &mut Vec<f32>| {
                            let cols = (yb - ya) * w;
                            let mut band = Vec::with_capacity(c_in * cols);
                            for plane in xs[i * c_in * h * w..(i + 1) * c_in * h * w].chunks_exact(h * w) {
                                band.extend_from_slice(&plane[ya * w..yb * w]);
                            }
                            input.clear();
                            input.reserve_exact(c * cols);
                            let clamp_e = expand.and_then(|e| e.2);
                            let dst = &mut input.spare_capacity_mut()[..c * cols];
                            match gemm_into(1, [c, cols, c_in], wes, packed_e, &band, dst, be.as_deref(), clamp_e) {
                                Ok(()) => {
                                    // SAFETY: `gemm_into` returned Ok, so it wrote all `c * cols`.
                                    unsafe { input.set_len(c * cols) };
                                    true
                                }
                                Err(e) => {
                                    fail(e);
                                    false
                                }
                            }
                        };
                        let then = |i: usize,
                                    (oy0, oy1): (usize, usize),
                                    scratch: &[f32],
                                    item: Vec<&mut [MaybeUninit<f32>]>| {
                            let cols = (oy1 - oy0) * ow;
                            let mut band: Vec<f32> = Vec::with_capacity(m * cols);
                            let result = gemm_into(
                                1,
                                [m, cols, c],
                                wps,
                                packed,
                                scratch,
                                band.spare_capacity_mut(),
                                bp.as_deref(),
                                clamp_p,
                            );
                            match result {
                                Ok(()) => {
                                    // SAFETY: `gemm_into` returned Ok, so it wrote all `m * cols` values.
                                    unsafe { band.set_len(m * cols) };
                                    for (ch, (dst, src)) in item.into_iter().zip(band.chunks_exact(cols)).enumerate() {
                                        match residual {
                                            Some(r) => {
                                                let at = ((i * m + ch) * oh + oy0) * ow;
                                                act::sum_into(dst, src, &r[at..at + cols]);
                                            }
                                            // A `memcpy` (this closure is not compiled for
                                            // AVX-512: a loop here moved 16 bytes at a time,
                                            // 7.6% of the first block on one thread).
                                            None => {
                                                dst.write_copy_of_slice(src);
                                            }
                                        }
                                    }
                                }
                                Err(e) => fail(e),
                            }
                        };
                        let source: Option<&depthwise::Source<'_>> = expand.is_some().then_some(&source);
                        dw.run_banded(xs, wds, [n, c], bd.as_deref(), clamp_d, keep_d, rows, items, (source, &then))
                    })
                })
            })
        })
    })?????;
    if let Some(e) = failed.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return Err(e);
    }
    if !complete {
        return Err(NnError::runtime("Conv: a range of the fused pass was skipped"));
    }
    // SAFETY: every item (each output channel's rows of each range of each image) was written
    // in full: every range reached `then` (`complete`), and each `then` wrote its item's rows
    // in full, its product having returned Ok (an error would have been recorded above).
    unsafe { out.set_len(len) };
    Ok(Tensor::from_vec(out, (n, m, oh, ow), x.device())?)
}

/// A fused block's bias `t` (if any) as floats, checked to hold `len` values (`what`: whose).
fn bias_floats(t: Option<&Tensor>, len: usize, what: &str) -> Result<Option<Vec<f32>>, NnError> {
    let v = t.map(|b| with_f32(b, <[f32]>::to_vec)).transpose()?;
    if let Some(v) = &v
        && v.len() != len
    {
        return Err(NnError::invalid_argument(format!("Conv: {what} bias of {} for {len} channels", v.len())));
    }
    Ok(v)
}

/// A pointwise convolution's operands for [`channels_last`]: weights (`[m, c, 1, 1]`), bias,
/// clamp, and where its weights are kept in strips.
pub(crate) type PointwiseStrips<'a> =
    (&'a Tensor, Option<&'a Tensor>, Option<Clamp>, &'a super::Derived<Option<sgemm::Strips>>);

/// Whether a block's products run channels last on the tile kernels' order of summation (more
/// than [`sgemm::TURNED_MAX`] pixels, at least 4 channels into each product), so that
/// [`channels_last`] computes what the planar splits compute, to the bit.
pub(crate) fn channels_last_tiled(plan: &ConvPlan, we: &Tensor, wp: &Tensor) -> bool {
    let [_, c, h, w] = plan.dims;
    let rows = |t: &Tensor| t.dims().first().is_some_and(|&r| r >= 4);
    h * w > sgemm::TURNED_MAX && c >= 4 && rows(we) && rows(wp)
}

/// What [`channels_last`] allocates for an `[n, c, h, w]` depthwise plan after an expand from
/// `c_in` channels and before a pointwise into `m`, output included.
pub(crate) fn channels_last_bytes(plan: &ConvPlan, c_in: usize, m: usize) -> Result<u64, NnError> {
    let [n, c, h, w] = plan.dims;
    let per_pixel = c_in
        .checked_add(c.checked_mul(2).ok_or_else(|| NnError::too_large("Conv: too many channels"))?)
        .and_then(|f| f.checked_add(m.checked_mul(2)?))
        .ok_or_else(|| NnError::too_large("Conv: too many channels"))?;
    super::count(&[n, h, w, per_pixel, 4])
}

/// The operands of an expand → depthwise → pointwise block that runs channels last
/// ([`channels_last`], [`channels_last_banded`]), checked against the depthwise plan: input
/// and expand weight `[c_in → c]`, pointwise weight `[c → m]`, the residual the output's
/// shape; the biases as floats, and both pointwise weights in strips (`None` inside where the
/// strips kernel cannot hold them: no AVX-512).
struct BlockOperands {
    c_in: usize,
    m: usize,
    be: Option<Vec<f32>>,
    bd: Option<Vec<f32>>,
    bp: Option<Vec<f32>>,
    se: std::sync::Arc<Option<sgemm::Strips>>,
    sp: std::sync::Arc<Option<sgemm::Strips>>,
}

impl BlockOperands {
    #[allow(clippy::type_complexity)]
    fn check(
        x: &Tensor,
        (we, be, strips_e): (&Tensor, Option<&Tensor>, &super::Derived<Option<sgemm::Strips>>),
        (wd, bd): (&Tensor, Option<&Tensor>),
        plan: &ConvPlan,
        (wp, bp, strips_p): (&Tensor, Option<&Tensor>, &super::Derived<Option<sgemm::Strips>>),
        residual: Option<&Tensor>,
    ) -> Result<Self, NnError> {
        let [n, c, h, w] = plan.dims;
        let [oh, ow] = plan.out;
        let shapes = |what: &str| NnError::invalid_argument(format!("Conv: {what} does not fit the fused block"));
        let c_in = match (x.dims(), we.dims()) {
            (&[xn, ci, xh, xw], &[ce, wci, 1, 1]) if [xn, xh, xw] == [n, h, w] && ce == c && wci == ci => ci,
            _ => return Err(shapes("the expand convolution")),
        };
        let m = match wp.dims() {
            &[m, cp, 1, 1] if cp == c => m,
            _ => return Err(shapes("the pointwise convolution")),
        };
        if wd.dims() != plan.kernel {
            return Err(NnError::runtime("Conv: the plan was made for other shapes"));
        }
        if residual.is_some_and(|r| r.dims() != [n, m, oh, ow]) {
            return Err(shapes("the residual"));
        }
        let (be, bd, bp) =
            (bias_floats(be, c, "expand")?, bias_floats(bd, c, "depthwise")?, bias_floats(bp, m, "pointwise")?);
        let se = with_f32(we, |ws| strips_e.get(we.id(), || sgemm::Strips::from_transposed(c, c_in, ws)))?;
        let sp = with_f32(wp, |ws| strips_p.get(wp.id(), || sgemm::Strips::from_transposed(m, c, ws)))?;
        // The products write exactly the channels the block's buffers are sized for (strips
        // kept for another shape under the same weights would not).
        let fits = |s: &Option<sgemm::Strips>, k: usize, n: usize| s.as_ref().is_none_or(|s| s.k() == k && s.n() == n);
        if !fits(&se, c_in, c) || !fits(&sp, c, m) {
            return Err(NnError::runtime("Conv: the block's weights in strips do not fit its shapes"));
        }
        Ok(Self { c_in, m, be, bd, bp, se, sp })
    }
}

/// An expand, a depthwise and a pointwise convolution (then `residual`, if given, added) run
/// channels last: the input turned into `[n·h·w, c_in]` rows of pixels, the two pointwise
/// products as `X·Wᵀ` on the strips kernel (pixels are rows there, and a ragged count of them
/// costs little, where the planar product's 49 columns of a 7x7 plane run a 32-, a 16- and a
/// one-column kernel), the depthwise convolution on the pixels' channels
/// ([`Depthwise::channels_last`]), and only the result turned back. Every product and tap is
/// summed in the order of the planar kernels, so the numbers are the same to the bit.
/// `Ok(None)` where it does not apply: a plan [`Depthwise::channels_last`] does not take, or
/// weights the strips kernel cannot hold (no AVX-512).
pub(crate) fn channels_last(
    x: &Tensor,
    (we, be, clamp_e, strips_e): PointwiseStrips<'_>,
    (wd, bd, clamp_d, keep_d): (&Tensor, Option<&Tensor>, Option<Clamp>, depthwise::Keep<'_>),
    plan: &ConvPlan,
    (wp, bp, clamp_p, strips_p): PointwiseStrips<'_>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>, NnError> {
    let [n, c, h, w] = plan.dims;
    let Some(dw) = plan.depthwise.as_ref().filter(|_| plan.takes_channels_last()) else {
        return Ok(None);
    };
    let ops = BlockOperands::check(x, (we, be, strips_e), (wd, bd), plan, (wp, bp, strips_p), residual)?;
    let BlockOperands { c_in, m, be, bd, bp, .. } = &ops;
    let (c_in, m) = (*c_in, *m);
    let (Some(se), Some(sp)) = (ops.se.as_ref(), ops.sp.as_ref()) else {
        return Ok(None);
    };
    let too_large = || NnError::too_large("Conv: the block does not fit in memory");
    let plane = h * w;
    let pixels = n.checked_mul(plane).ok_or_else(too_large)?;
    let size = |per_pixel: usize| pixels.checked_mul(per_pixel).ok_or_else(too_large);
    // The projection of every pixel's depthwise output (`rows`) into a new buffer.
    let product = |rows: &[f32], strips: &sgemm::Strips, bias: Option<&[f32]>, clamp| -> Result<Vec<f32>, NnError> {
        let len = size(strips.n())?;
        let mut v = super::uninit_f32(len)?;
        sgemm::gemm_strips_clamped(pixels, rows, strips, &mut v.spare_capacity_mut()[..len], (bias, clamp), true)?;
        // SAFETY: `gemm_strips_clamped` returned Ok, so it wrote all `pixels·n` values.
        unsafe { v.set_len(len) };
        Ok(v)
    };
    // The expand product reads each image's planes in place as the rows of its pixels.
    let expanded = with_f32(x, |xs| -> Result<Vec<f32>, NnError> {
        let (len, image) = (size(c)?, c_in.checked_mul(plane).ok_or_else(too_large)?);
        let mut v = super::uninit_f32(len)?;
        if len > 0 {
            for (i, dst) in v.spare_capacity_mut()[..len].chunks_exact_mut(plane * c).enumerate() {
                let src = xs
                    .get(i * image..(i + 1) * image)
                    .ok_or_else(|| NnError::runtime("Conv: the block's input is shorter than its shape"))?;
                sgemm::gemm_strips_turned(plane, (src, plane), se, dst, (be.as_deref(), clamp_e), true)?;
            }
        }
        // SAFETY: each image's product returned Ok, so it wrote its `plane · se.n()` values,
        // `se.n()` being `c` (`BlockOperands::check`), and the images tile `len` exactly.
        unsafe { v.set_len(len) };
        Ok(v)
    })??;
    let mid_len = size(c)?;
    let mut mid = super::uninit_f32(mid_len)?;
    let ran = with_f32(wd, |wds| {
        let out = &mut mid.spare_capacity_mut()[..mid_len];
        dw.channels_last(&expanded, wds, [n, c], bd.as_deref(), clamp_d, keep_d, out)
    })?;
    if !ran {
        return Ok(None);
    }
    // SAFETY: `channels_last` ran, and it writes every element of its n·h·w·c output.
    unsafe { mid.set_len(mid_len) };
    drop(expanded);
    let projected = product(&mid, sp, bp.as_deref(), clamp_p)?;
    drop(mid);
    let out = match residual {
        Some(r) => with_f32(r, |rs| into_planes(&projected, [n, m, plane], Some(rs)))??,
        None => into_planes(&projected, [n, m, plane], None)?,
    };
    Ok(Some(Tensor::from_vec(out, (n, m, h, w), x.device())?))
}

/// Channels of an image that [`into_planes`] turns back as one unit of parallel work.
const PLANES_PER_UNIT: usize = 64;

/// `pixels` (`n` images of `plane` pixels by `m` channels) turned back into planes
/// (`[n, m, plane]`), with `residual`'s (of that shape) added: runs of an image's channels
/// shared out over the pool, each turned and then added while it is in cache. On one thread
/// the turn and the add were a third of a 7x7 block's serial time.
fn into_planes(pixels: &[f32], [n, m, plane]: [usize; 3], residual: Option<&[f32]>) -> Result<Vec<f32>, NnError> {
    let len = usize::try_from(super::count(&[n, m, plane])?)
        .map_err(|_| NnError::too_large("Conv: the block's output does not fit in memory"))?;
    if pixels.len() < len || residual.is_some_and(|r| r.len() < len) {
        return Err(NnError::runtime("Conv: the block's output is shorter than its shape"));
    }
    let mut out = super::uninit_f32(len)?;
    if len == 0 {
        return Ok(out);
    }
    // (image, first channel, its run of planes): they tile the output exactly.
    let units: Vec<_> = out.spare_capacity_mut()[..len]
        .chunks_exact_mut(m * plane)
        .enumerate()
        .flat_map(|(i, image)| {
            // (Saturating: a run longer than the image is the whole image, in whole planes.)
            let runs = image.chunks_mut(PLANES_PER_UNIT.saturating_mul(plane)).enumerate();
            runs.map(move |(r, dst)| (i, r * PLANES_PER_UNIT, dst))
        })
        .collect();
    let failed = std::sync::atomic::AtomicBool::new(false);
    crate::nn::kernels::par::for_each(units, |(i, c0, dst)| {
        let channels = dst.len() / plane;
        let src = &pixels[i * m * plane + c0..];
        if !act::transpose_strided_into(src, [plane, channels], m, dst, plane) {
            failed.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        if let Some(r) = residual {
            // SAFETY: the transpose returned true, so it wrote all `channels · plane` floats
            // of `dst` (its `channels` rows of `plane`, `plane` apart, are exactly `dst`), and
            // MaybeUninit<f32> has f32's layout.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()) };
            let at = (i * m + c0) * plane;
            act::add_assign(dst, &r[at..at + dst.len()]);
        }
    });
    if failed.into_inner() {
        return Err(NnError::runtime("Conv: a transpose of the block's output failed"));
    }
    // SAFETY: every unit's transpose returned true (none failed), so each wrote its whole run
    // of planes, and the runs tile the first `len` floats.
    unsafe { out.set_len(len) };
    Ok(out)
}

thread_local! {
    /// [`channels_last_banded`]'s scratch (its ring of expanded rows, a band's pixels, its
    /// depthwise and pointwise outputs), reused by every unit a thread runs: grown, never
    /// zeroed again, and read only where the unit has written it.
    static BANDED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The most floats of [`BANDED`] scratch a thread keeps between passes (4 MiB; EfficientNet-
/// Lite0's largest band needs about a tenth of it).
const BANDED_KEPT: usize = 1 << 20;

/// One unit of [`channels_last_banded`]: an image, its first output row, and each output
/// channel's rows from there.
type BandedUnit<'a> = (usize, usize, Vec<&'a mut [MaybeUninit<f32>]>);

/// An expand, a depthwise and a pointwise convolution (then `residual`, if given, added) run
/// channels last a band of `band` output rows at a time, for planes of any width at stride 1
/// or 2: each band expands only the input rows it reads that earlier bands did not (kept in
/// a ring of rows until no later row reads them), from the block's planar input turned into
/// pixels row by row, then runs the depthwise convolution on the pixels' channels
/// ([`depthwise::RowsLast`]: one vector of 16 channels per pixel, so a column stride of 2 costs
/// nothing, where the planar kernels split every row into its even and odd columns) and the
/// projection on the band's pixels, and turns only that band back into planes. Nothing the
/// size of the expanded image is ever written. Each product and tap sums in the planar
/// kernels' order (pixel rows of more than [`sgemm::TURNED_MAX`] run the strips kernel, which
/// sums as the tile kernel), so the numbers are the planar splits', to the bit. `Ok(None)`
/// where it does not apply: a plan [`ConvPlan::takes_banded`] refuses, or no AVX-512.
#[allow(clippy::too_many_arguments)]
pub(crate) fn channels_last_banded(
    x: &Tensor,
    (we, be, clamp_e, strips_e): PointwiseStrips<'_>,
    (wd, bd, clamp_d, keep_d): (&Tensor, Option<&Tensor>, Option<Clamp>, depthwise::Keep<'_>),
    plan: &ConvPlan,
    band: usize,
    (wp, bp, clamp_p, strips_p): PointwiseStrips<'_>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>, NnError> {
    let [n, c, h, w] = plan.dims;
    let [oh, ow] = plan.out;
    // (An empty input plane leaves nothing for the ring to hold: the planar splits take it.)
    let Some(dw) = plan.depthwise.as_ref().filter(|_| plan.takes_banded() && h > 0 && w > 0) else {
        return Ok(None);
    };
    let ops = BlockOperands::check(x, (we, be, strips_e), (wd, bd), plan, (wp, bp, strips_p), residual)?;
    let BlockOperands { c_in, m, be, bd, bp, .. } = &ops;
    let (c_in, m) = (*c_in, *m);
    let (Some(se), Some(sp)) = (ops.se.as_ref(), ops.sp.as_ref()) else {
        return Ok(None);
    };
    let Some(banded) = with_f32(wd, |wds| dw.rows_last(wds, bd.as_deref(), c, clamp_d, keep_d))? else {
        return Ok(None);
    };
    let too_large = || NnError::too_large("Conv: the block does not fit in memory");
    let oplane = oh.checked_mul(ow).ok_or_else(too_large)?;
    let len = super::count(&[n, m, oh, ow])? as usize;
    let band = band.clamp(1, oh.max(1));
    let (ring, sizes, scratch) = banded_scratch(plan, m, band).ok_or_else(too_large)?;
    let row = w.checked_mul(c).ok_or_else(too_large)?;
    if len == 0 {
        return Ok(Some(Tensor::zeros((n, m, oh, ow), DType::F32, x.device())?));
    }
    let mut out = super::uninit_f32(len)?;
    // Units of (image, range of output rows), as many per image as there are threads: each
    // unit expands the few rows above its range again rather than wait for its neighbour.
    let per = oh.div_ceil(rayon::current_num_threads().clamp(1, oh));
    let mut units: Vec<BandedUnit<'_>> = Vec::with_capacity(n * oh.div_ceil(per));
    for (i, image) in out.spare_capacity_mut()[..len].chunks_exact_mut(m * oplane).enumerate() {
        let mut planes: Vec<_> = image.chunks_exact_mut(oplane).map(|p| p.chunks_mut(per * ow)).collect();
        for u in 0..oh.div_ceil(per) {
            units.push((i, u * per, planes.iter_mut().filter_map(Iterator::next).collect()));
        }
    }
    let count = units.len();
    let failed = std::sync::Mutex::new(None);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let has_residual = residual.is_some();
    with_f32(residual.unwrap_or(x), |rs| {
        let residual = has_residual.then_some(rs);
        with_f32(x, |xs| {
            // One unit: output rows oy_start.. of image i, band by band.
            let unit = |(i, oy_start, mut chans): BandedUnit<'_>, buf: &mut [f32]| -> Result<(), NnError> {
                let oy_end = (oy_start + per).min(oh);
                let (ring_buf, rest) = buf.split_at_mut(sizes[0]);
                let (mid, rest) = rest.split_at_mut(sizes[1]);
                let (proj, turned) = rest.split_at_mut(sizes[2]);
                let image = &xs[i * c_in * h * w..(i + 1) * c_in * h * w];
                let mut next = 0;
                for oy0 in (oy_start..oy_end).step_by(band) {
                    let oy1 = (oy0 + band).min(oy_end);
                    let need = banded.reads(oy0..oy1);
                    // Expand the rows not in the ring yet, as many at once as lie in a run of
                    // its slots (row y lives in slot y % ring: the band's rows, at most `ring`
                    // of them, never share a slot), their pixels read from the input's planes
                    // where they lie.
                    let mut y = next.max(need.start);
                    while y < need.end {
                        let slot = y % ring;
                        let rows = (need.end - y).min(ring - slot);
                        // SAFETY: only the GEMM writes through it, floats.
                        let dst = &mut unsafe { uninit(ring_buf) }[slot * row..(slot + rows) * row];
                        let pixels = (&image[y * w..], h * w);
                        sgemm::gemm_strips_turned(rows * w, pixels, se, dst, (be.as_deref(), clamp_e), false)?;
                        y += rows;
                    }
                    next = next.max(need.end);
                    let ring_buf = &*ring_buf;
                    for oy in oy0..oy1 {
                        // SAFETY: only the depthwise kernel writes through it, floats.
                        let dst = &mut unsafe { uninit(mid) }[(oy - oy0) * ow * c..][..ow * c];
                        banded.row(oy, |y| &ring_buf[(y % ring) * row..][..row], dst);
                    }
                    let pixels = (oy1 - oy0) * ow;
                    // SAFETY: only the GEMM writes through it, floats.
                    let proj_out = &mut unsafe { uninit(proj) }[..pixels * m];
                    sgemm::gemm_strips_clamped(
                        pixels,
                        &mid[..pixels * c],
                        sp,
                        proj_out,
                        (bp.as_deref(), clamp_p),
                        false,
                    )?;
                    // SAFETY: only the transpose writes through it, floats.
                    let turned_out = &mut unsafe { uninit(turned) }[..m * pixels];
                    if !act::transpose_strided_into(&proj[..pixels * m], [pixels, m], m, turned_out, pixels) {
                        return Err(NnError::runtime("Conv: a band of the block's output does not fit"));
                    }
                    let at = (oy0 - oy_start) * ow;
                    for (j, (dst, src)) in chans.iter_mut().zip(turned.chunks_exact(pixels)).enumerate() {
                        let dst = &mut dst[at..at + pixels];
                        match residual {
                            Some(r) => {
                                act::sum_into(dst, src, &r[((i * m + j) * oh + oy0) * ow..][..pixels]);
                            }
                            None => {
                                dst.write_copy_of_slice(src);
                            }
                        }
                    }
                }
                Ok(())
            };
            crate::nn::kernels::par::for_each(units, |item| {
                let mut buf = BANDED.with(|b| b.take());
                let result = if buf.len() >= scratch {
                    Ok(())
                } else {
                    buf.try_reserve_exact(scratch - buf.len())
                        .map(|()| buf.resize(scratch, 0.0))
                        .map_err(|_| NnError::too_large(format!("Conv: cannot allocate {scratch} floats of scratch")))
                };
                match result.and_then(|()| unit(item, &mut buf[..scratch])) {
                    Ok(()) => {
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => *failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e),
                }
                // A thread keeps its scratch for the next pass only up to a cap, so a model
                // with huge planes does not leave memory held past its pass.
                if buf.len() <= BANDED_KEPT {
                    BANDED.with(|b| b.replace(buf));
                }
            });
        })
    })??;
    if let Some(e) = failed.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return Err(e);
    }
    if done.into_inner() != count {
        return Err(NnError::runtime("Conv: a range of the banded pass was skipped"));
    }
    // SAFETY: every unit (each output channel's rows of each range of each image) returned Ok
    // (`done` counts all of them), and a unit that returns Ok has written all its rows: every
    // band of its range wrote `pixels` values into each channel's rows from `at`.
    unsafe { out.set_len(len) };
    Ok(Some(Tensor::from_vec(out, (n, m, oh, ow), x.device())?))
}

/// The rows of [`channels_last_banded`]'s ring (every input row a band reads, at most the
/// image's), and the floats of the scratch each of its threads holds: the ring, a band's
/// depthwise output, its projection and that turned back; and their sum (the expand product
/// reads the input's pixels where they lie). `None` where a size overflows or the plan is not
/// depthwise.
fn banded_scratch(plan: &ConvPlan, m: usize, band: usize) -> Option<(usize, [usize; 4], usize)> {
    let [_, c, h, w] = plan.dims;
    let [_, ow] = plan.out;
    let ring = plan.depthwise.as_ref()?.rows_read(band)?.min(h);
    let pixels = band.checked_mul(ow)?;
    let sizes =
        [ring.checked_mul(w)?.checked_mul(c)?, pixels.checked_mul(c)?, pixels.checked_mul(m)?, pixels.checked_mul(m)?];
    let total = sizes.iter().try_fold(0usize, |a, &b| a.checked_add(b))?;
    Some((ring, sizes, total))
}

/// What [`channels_last_banded`] allocates for an `[n, c, h, w]` depthwise plan before a
/// pointwise into `m`, `band` rows at a time: the output and every thread's scratch.
pub(crate) fn channels_last_banded_bytes(plan: &ConvPlan, m: usize, band: usize) -> Result<u64, NnError> {
    let [n, _, _, _] = plan.dims;
    let [oh, ow] = plan.out;
    let too_large = || NnError::too_large("Conv: the block does not fit in memory");
    let (_, _, per_thread) = banded_scratch(plan, m, band.clamp(1, oh.max(1))).ok_or_else(too_large)?;
    let threads = rayon::current_num_threads() as u64 + 1;
    let scratch = (per_thread as u64).checked_mul(threads).ok_or_else(too_large)?;
    let floats = super::count(&[n, m, oh, ow])?.checked_add(scratch).ok_or_else(too_large)?;
    floats.checked_mul(4).ok_or_else(too_large)
}

/// Initialised floats seen as possibly uninitialised ones, for kernels that only write them.
///
/// # Safety
/// Only initialised values may be written through the result (`v` is read as floats after
/// it): the GEMM and transpose kernels' outputs, which write floats and nothing else.
unsafe fn uninit(v: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller writes only floats through it.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<MaybeUninit<f32>>(), v.len()) }
}

/// A convolution's weights as its GEMMs take them, with the epilogue.
struct GemmWeights<'a> {
    ws: &'a [f32],
    /// Packed per group, where the AVX-512 kernel runs.
    packed: Option<&'a [Packed]>,
    bias: Option<&'a [f32]>,
    clamp: Option<Clamp>,
}

/// `dst[j] = src[j·step]` for every `j` in `dst` (`src` must reach that far). Out of line and
/// specialised for the common steps, so each loop vectorises (a stride-2 gather inside the
/// im2col closure ran one value at a time, with its bounds reloaded from the stack).
#[inline(never)]
pub(super) fn gather(dst: &mut [f32], src: &[f32], step: usize) {
    // One comparison per row: a short source would leave values unwritten, not fail.
    assert!(dst.is_empty() || src.len() > (dst.len() - 1) * step, "im2col: a gather past its source row");
    match step {
        1 => dst.copy_from_slice(&src[..dst.len()]),
        2 => {
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if crate::nn::kernels::simd::avx512() {
                // SAFETY: the CPU has AVX-512F (checked just above).
                done = unsafe { x86::gather2(dst, src) };
            }
            for (d, pair) in dst[done..].iter_mut().zip(src[2 * done..].chunks(2)) {
                *d = pair[0];
            }
        }
        _ => {
            for (d, &v) in dst.iter_mut().zip(src.iter().step_by(step.max(1))) {
                *d = v;
            }
        }
    }
}

/// im2col + GEMM per image and group; writes every element of `out` (it need not be
/// initialised).
fn im2col_gemm(
    xs: &[f32],
    GemmWeights { ws, packed, bias, clamp }: GemmWeights<'_>,
    out: &mut [MaybeUninit<f32>],
    [n, c, h, w]: [usize; 4],
    [m, kh, kw]: [usize; 3],
    [oh, ow]: [usize; 2],
    g: &Geometry,
) -> Result<(), NnError> {
    let [sh, sw] = g.strides;
    let [dh, dw] = g.dilations;
    let (pt, pl) = (g.pads[0].0 as isize, g.pads[1].0 as isize);
    let (cg, mg) = (c / g.group, m / g.group);
    let kdim = cg * kh * kw;
    let cols = oh * ow;
    let mut col = super::zeros_f32(kdim * cols)?;
    // Per column of the kernel: its offset in an input row, and the output columns that read
    // inside the row (the same for every channel and kernel row).
    let spans: Vec<(isize, usize, usize)> = (0..kw)
        .map(|kx| {
            let off = (kx * dw) as isize - pl;
            let (lo, hi) = valid(ow, w, sw, off);
            (off, lo, hi)
        })
        .collect();
    for i in 0..n {
        for grp in 0..g.group {
            let src = &xs[(i * c + grp * cg) * h * w..(i * c + (grp + 1) * cg) * h * w];
            // Each row of `col` is one (channel, ky, kx) tap over all output positions.
            let fill = |(ci, ky, kx): (usize, usize, usize), dst: &mut [f32]| {
                let plane = &src[ci * h * w..(ci + 1) * h * w];
                let (off, lo, hi) = spans[kx];
                for oy in 0..oh {
                    let drow = &mut dst[oy * ow..(oy + 1) * ow];
                    let iy = (oy * sh + ky * dh) as isize - pt;
                    if iy < 0 || iy >= h as isize || lo >= hi {
                        drow.fill(0.0);
                        continue;
                    }
                    let irow = &plane[iy as usize * w..(iy as usize + 1) * w];
                    drow[..lo].fill(0.0);
                    drow[hi..].fill(0.0);
                    // Input columns lo·sw + off, stepping by sw (`valid` keeps them inside
                    // the row); an iterator, not an index per element, so the copy is not
                    // bounds-checked and overflow-checked value by value (it was half of the
                    // stem convolution's time).
                    let first = ((lo * sw) as isize + off) as usize;
                    gather(&mut drow[lo..hi], &irow[first..], sw);
                }
            };
            if h == 1 && kh == 1 && col.len() < PARALLEL_MIN {
                // 1-D: each row of `col` is one (channel, kx) tap's strided window of the
                // channel's one input row. `col` starts zeroed and a column that is padding
                // is padding for every image and group, so only the inside is written: the
                // general path's per-row fills and `gather` calls cost more than these
                // few-float copies (Silero's convolutions: 4, 2 and 1 columns a row).
                let mut rows = col.chunks_exact_mut(cols);
                for irow in src.chunks_exact(w).take(cg) {
                    for &(off, lo, hi) in &spans {
                        let Some(dst) = rows.next() else { break };
                        if lo < hi {
                            let first = ((lo * sw) as isize + off) as usize;
                            for (d, &v) in dst[lo..hi].iter_mut().zip(irow[first..].iter().step_by(sw)) {
                                *d = v;
                            }
                        }
                    }
                }
            } else if col.len() < PARALLEL_MIN {
                // The taps in order, without a division per row: Silero's 1-D convolutions
                // have 4 columns a row, where working out each row's tap cost more than
                // copying it (im2col was a fifth of a chunk).
                let mut rows = col.chunks_mut(cols);
                for ci in 0..cg {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            if let Some(dst) = rows.next() {
                                fill((ci, ky, kx), dst);
                            }
                        }
                    }
                }
            } else {
                crate::nn::kernels::par::for_each(col.chunks_mut(cols).enumerate(), |(r, dst)| {
                    fill((r / (kh * kw), (r / kw) % kh, r % kw), dst)
                });
            }
            let wg = &ws[grp * mg * kdim..(grp + 1) * mg * kdim];
            let dst = &mut out[(i * m + grp * mg) * cols..(i * m + (grp + 1) * mg) * cols];
            let bias = bias.map(|b| &b[grp * mg..(grp + 1) * mg]);
            gemm_into(1, [mg, cols, kdim], wg, packed.map(|p| &p[grp]), &col, dst, bias, clamp)?;
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `dst[i] = src[2i]` for as many whole vectors of 16 as `src` holds 32 floats for (the
    /// stem convolution's stride-2 im2col, scalar a fifth of its time); returns how many it
    /// wrote.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gather2(dst: &mut [f32], src: &[f32]) -> usize {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let mut done = 0;
        for (d, pair) in dst.chunks_exact_mut(16).zip(src.chunks_exact(32)) {
            // SAFETY: `pair` holds 32 floats, `d` 16.
            unsafe {
                let (a, b) = (_mm512_loadu_ps(pair.as_ptr()), _mm512_loadu_ps(pair.as_ptr().add(16)));
                _mm512_storeu_ps(d.as_mut_ptr(), _mm512_permutex2var_ps(a, even, b));
            }
            done += 16;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`conv2d`] with its plan made here.
    pub(super) fn planned(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        g: &Geometry,
        clamp: Option<Clamp>,
        cache: Option<(&PackedWeights, TensorId)>,
    ) -> Result<Tensor, NnError> {
        let plan = ConvPlan::new(x.dims(), w.dims(), g)?;
        conv2d(x, w, bias, &plan, g, clamp, (cache, None))
    }
    use candle_core::{DType, Device};

    /// candle's own convolution on an explicitly padded input, as the reference.
    fn reference(x: &Tensor, w: &Tensor, g: &Geometry) -> Tensor {
        let mut xp = x.clone();
        for d in 0..2 {
            xp = xp.pad_with_zeros(2 + d, g.pads[d].0, g.pads[d].1).unwrap();
        }
        xp.conv2d(w, 0, g.strides[0], g.dilations[0], g.group).unwrap()
    }

    fn check(c: usize, m: usize, group: usize, k: usize, stride: usize, pads: [(usize, usize); 2]) {
        check_dilated(c, m, group, k, stride, 1, pads)
    }

    /// Compares with candle, plain and with a bias and a ReLU6 fused.
    fn check_dilated(c: usize, m: usize, group: usize, k: usize, stride: usize, dil: usize, pads: [(usize, usize); 2]) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, c, 11, 9), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (m, c / group, k, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, m, &dev).unwrap();
        let g = Geometry { pads, strides: [stride, stride], dilations: [dil, dil], group };
        let want = reference(&x, &w, &g);
        let want_fused = want.broadcast_add(&b.reshape((1, m, 1, 1)).unwrap()).unwrap().clamp(0f32, 6f32).unwrap();
        let cache = PackedWeights::default();
        for run in 0..2 {
            let got = planned(&x, &w, None, &g, None, None).unwrap();
            let fused =
                planned(&x, &w, Some(&b), &g, Some(Clamp { lo: 0.0, hi: 6.0 }), Some((&cache, w.id()))).unwrap();
            for (got, want) in [(got, &want), (fused, &want_fused)] {
                assert_eq!(got.dims(), want.dims());
                let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(
                    diff < 1e-4,
                    "c={c} m={m} group={group} k={k} stride={stride} dil={dil} pads={pads:?} run {run}: {diff}"
                );
            }
        }
    }

    /// im2col's gather at every step and length around the vector width, with sources cut
    /// to the shortest that hold the last value (the AVX-512 stride-2 path must not read on).
    #[test]
    fn gather_takes_every_step_th_value() {
        use crate::nn::kernels::simd;
        for level in simd::levels() {
            let _cap = simd::cap(level);
            for step in 1..4 {
                for len in [0, 1, 15, 16, 17, 31, 32, 33, 56, 112] {
                    let need = if len == 0 { 0 } else { (len - 1) * step + 1 };
                    for extra in [0, 1] {
                        let src: Vec<f32> = (0..need + extra).map(|i| i as f32).collect();
                        let mut dst = vec![f32::NAN; len];
                        gather(&mut dst, &src, step);
                        let want: Vec<f32> = (0..len).map(|i| (i * step) as f32).collect();
                        assert_eq!(dst, want, "{level:?} step {step} len {len} extra {extra}");
                    }
                }
            }
        }
    }

    #[test]
    fn kernels_match_candle() {
        use crate::nn::kernels::simd;
        for level in simd::levels() {
            let _cap = simd::cap(level);
            // depthwise, stride 1 and 2, symmetric and asymmetric padding
            check(6, 6, 6, 3, 1, [(1, 1), (1, 1)]);
            check(6, 6, 6, 5, 2, [(1, 2), (2, 1)]);
            check(6, 6, 6, 3, 2, [(0, 1), (0, 1)]);
            check(6, 6, 6, 3, 2, [(1, 0), (0, 0)]);
            check(6, 6, 6, 2, 2, [(0, 0), (1, 1)]);
            check(6, 6, 6, 3, 3, [(1, 1), (1, 1)]);
            check_dilated(6, 6, 6, 3, 1, 2, [(2, 2), (2, 2)]);
            check_dilated(6, 6, 6, 3, 2, 2, [(2, 1), (1, 2)]);
            check_dilated(3, 8, 1, 3, 1, 2, [(0, 0), (1, 1)]);
            // an empty batch is an empty output, through the depthwise kernel too
            let g6 = Geometry { pads: [(1, 1); 2], strides: [1, 1], dilations: [1, 1], group: 6 };
            let none = Tensor::zeros((0, 6, 5, 5), DType::F32, &Device::Cpu).unwrap();
            let w6 = Tensor::zeros((6, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
            assert_eq!(planned(&none, &w6, None, &g6, None, None).unwrap().dims(), &[0, 6, 5, 5]);
            // an empty plane is an error, not a panic
            let x = Tensor::zeros((1, 2, 0, 3), DType::F32, &Device::Cpu).unwrap();
            let w = Tensor::zeros((2, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
            let g = Geometry { pads: [(1, 1); 2], strides: [1, 1], dilations: [1, 1], group: 2 };
            assert!(planned(&x, &w, None, &g, None, None).is_err());
            // wide enough for the AVX-512 GEMM
            check(16, 24, 1, 1, 1, [(0, 0), (0, 0)]);
            check(8, 16, 2, 3, 1, [(1, 1), (1, 1)]);
            // pointwise
            check(5, 7, 1, 1, 1, [(0, 0), (0, 0)]);
            // general and grouped
            check(3, 8, 1, 3, 2, [(0, 1), (0, 1)]);
            check(4, 6, 2, 3, 1, [(1, 1), (1, 1)]);
            check(4, 4, 1, 1, 2, [(0, 0), (0, 0)]);
            // im2col's gather at steps 1, 2 and 3, with pads that cut rows short (more than
            // the direct kernel's 32 taps, so im2col runs at every level)
            check(4, 8, 1, 3, 3, [(1, 2), (2, 1)]);
            check(5, 8, 1, 3, 2, [(0, 1), (0, 1)]);
            check(2, 5, 1, 5, 2, [(2, 0), (0, 2)]);
            // the direct kernel (AVX-512), and im2col below it: a stem, stride 3
            check(3, 8, 1, 3, 3, [(1, 2), (2, 1)]);
        }
    }

    /// 1-D convolutions (a height of 1, as Silero's come) through im2col's 1-D path: widths
    /// down to one column, strides 1 to 3, dilation, groups, padding wider than the row (taps
    /// that read nothing), a batch of three (im2col's buffer reused image after image), all
    /// against candle at every SIMD level.
    #[test]
    fn one_d_convolutions_match_candle() {
        use crate::nn::kernels::simd;
        let dev = Device::Cpu;
        for level in simd::levels() {
            let _cap = simd::cap(level);
            // channels, outputs, group, kernel width, stride, dilation, pads, input width
            for (c, m, group, k, s, d, pads, w) in [
                (12, 8, 1, 3, 1, 1, (1, 1), 4),
                (12, 8, 1, 3, 2, 1, (1, 1), 4),
                (16, 6, 2, 3, 2, 1, (0, 1), 2),
                (12, 8, 1, 3, 1, 2, (2, 2), 5),
                (2, 7, 1, 17, 3, 1, (4, 3), 40),
                (12, 4, 1, 3, 1, 1, (0, 0), 3),
                (12, 4, 1, 5, 1, 1, (6, 6), 1),
                (1, 9, 1, 36, 8, 1, (4, 4), 64),
            ] {
                let x = Tensor::randn(0f32, 1.0, (3, c, 1, w), &dev).unwrap();
                let wt = Tensor::randn(0f32, 1.0, (m, c / group, 1, k), &dev).unwrap();
                let g = Geometry { pads: [(0, 0), pads], strides: [s, s], dilations: [d, d], group };
                let want = reference(&x, &wt, &g);
                let got = planned(&x, &wt, None, &g, None, None).unwrap();
                assert_eq!(got.dims(), want.dims());
                let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(
                    diff < 1e-4,
                    "{level:?} c={c} m={m} group={group} k={k} s={s} d={d} pads={pads:?} w={w}: {diff}"
                );
            }
        }
    }

    /// The fused depthwise + pointwise pass equals the convolutions one after the other, with
    /// and without an expand convolution in front, at every SIMD level, on splits of one row to
    /// whole planes and channel counts that leave blocks and tiles partly used.
    #[test]
    fn fused_depthwise_pointwise_is_the_convolutions_in_turn() {
        use crate::nn::kernels::simd;
        let dev = Device::Cpu;
        type Case = ([usize; 4], usize, usize, usize, usize, [(usize, usize); 2]);
        let cases: [Case; 6] = [
            // Rows wide enough for the direct depthwise unit, stride 2 and 1: each range's
            // input rows start mid-plane.
            ([1, 18, 10, 100], 5, 12, 3, 2, [(0, 1), (0, 1)]),
            ([2, 9, 7, 60], 4, 10, 3, 1, [(1, 1), (1, 1)]),
            ([3, 20, 9, 11], 5, 7, 3, 1, [(1, 1), (1, 1)]),
            ([2, 33, 16, 16], 8, 24, 5, 2, [(1, 2), (1, 2)]),
            ([1, 17, 40, 40], 3, 40, 3, 1, [(1, 1), (1, 1)]),
            ([4, 48, 7, 7], 16, 12, 5, 1, [(2, 2), (2, 2)]),
        ];
        let randn = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
        // One cache of blocked depthwise weights for every level and case: each has its own
        // weights, and a level its own lanes, which must not meet another's blocks.
        let blocked = depthwise::BlockedWeights::default();
        for level in simd::levels() {
            let _cap = simd::cap(level);
            for ([n, c, h, w], c_in, m, k, stride, pads) in cases {
                let (xin, we, be) = (randn(&[n, c_in, h, w]), randn(&[c, c_in, 1, 1]), randn(&[c]));
                let (wd, bd, wp, bp) = (randn(&[c, 1, k, k]), randn(&[c]), randn(&[m, c, 1, 1]), randn(&[m]));
                let g = Geometry { pads, strides: [stride; 2], dilations: [1, 1], group: c };
                let g1 = Geometry { pads: [(0, 0); 2], strides: [1, 1], dilations: [1, 1], group: 1 };
                let (six, three) = (Some(Clamp { lo: 0.0, hi: 6.0 }), Some(Clamp { lo: -3.0, hi: 3.0 }));
                let x = planned(&xin, &we, Some(&be), &g1, six, None).unwrap();
                let mid = planned(&x, &wd, Some(&bd), &g, six, None).unwrap();
                let want = planned(&mid, &wp, Some(&bp), &g1, three, None).unwrap();
                let plan = ConvPlan::new(x.dims(), wd.dims(), &g).unwrap();
                let (cache, cache_e) = (PackedWeights::default(), PackedWeights::default());
                // No pointwise outputs: an empty result, not a panic.
                let wp0 = Tensor::zeros((0, c, 1, 1), DType::F32, &dev).unwrap();
                let empty =
                    depthwise_pointwise(&x, None, (&wd, None, None, None), &plan, 1, (&wp0, None, None, None), None);
                assert_eq!(empty.unwrap().dims(), &[n, 0, plan.out[0], plan.out[1]]);
                for rows in [1, 2, plan.out[0]] {
                    for expanding in [false, true] {
                        let (input, expand) = if expanding {
                            (&xin, Some((&we, Some(&be), six, Some((&cache_e, we.id())))))
                        } else {
                            (&x, None)
                        };
                        // Without a residual, and with one added as the output is written.
                        // A different value at every element, so a misplaced row shows.
                        let residual = Tensor::arange(0f32, want.elem_count() as f32, &Device::Cpu)
                            .and_then(|t| t.reshape(want.shape())? * 1e-3)
                            .unwrap();
                        for r in [None, Some(&residual)] {
                            let got = depthwise_pointwise(
                                input,
                                expand,
                                (&wd, Some(&bd), six, Some((&blocked, wd.id(), Some(bd.id())))),
                                &plan,
                                rows,
                                (&wp, Some(&bp), three, Some((&cache, wp.id()))),
                                r,
                            )
                            .unwrap();
                            let want = match r {
                                Some(r) => (&want + r).unwrap(),
                                None => want.clone(),
                            };
                            let diff =
                                (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                            assert!(
                                diff < 1e-3,
                                "{level:?} {:?} rows {rows} expanding {expanding} residual {}: {diff}",
                                ([n, c, h, w], c_in, m, k, stride),
                                r.is_some()
                            );
                        }
                    }
                }
            }
        }
    }

    /// A block run channels last computes what its three convolutions compute one after the
    /// other (then the residual), to the bit where every product has more than TURNED_MAX
    /// pixels (both then sum in the tile kernels' order), and within float rounding on planes
    /// of fewer; batches, both kernel sizes, with and without the pointwise clamp. Planes it
    /// does not take (stride 2, wider than 8, channels not a multiple of 16) and CPUs without
    /// AVX-512 get `None`, and run another split.
    #[test]
    fn channels_last_is_the_three_convolutions() {
        // Holds the SIMD level (the cap's lock): a test capping it meanwhile would turn
        // AVX-512 off between the plan's check and the run.
        let _cap = crate::nn::kernels::simd::cap(crate::nn::kernels::simd::Level::Avx512);
        let dev = Device::Cpu;
        let randn = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
        let six = Some(Clamp { lo: 0.0, hi: 6.0 });
        // [n, c_in, h, w], expanded channels, outputs, kernel, stride.
        // (Outputs past one run of planes turned back per unit: 80 and 72, in two runs each.)
        let cases: [([usize; 4], usize, usize, usize, usize); 11] = [
            ([1, 24, 7, 7], 48, 16, 5, 1),
            ([1, 8, 7, 7], 32, 80, 3, 1),
            ([2, 8, 7, 7], 32, 72, 5, 1),
            ([2, 8, 7, 7], 32, 24, 3, 1),
            ([3, 5, 8, 6], 16, 7, 5, 1),
            ([1, 12, 4, 3], 32, 9, 3, 1),
            ([2, 3, 1, 1], 16, 4, 3, 1),
            ([1, 40, 7, 7], 400, 24, 3, 1),
            ([1, 8, 7, 7], 24, 8, 3, 1),
            ([1, 8, 14, 14], 32, 8, 3, 2),
            ([1, 8, 9, 9], 32, 8, 3, 1),
        ];
        for ([n, c_in, h, w], c, m, k, stride) in cases {
            let (x, we, be) = (randn(&[n, c_in, h, w]), randn(&[c, c_in, 1, 1]), randn(&[c]));
            let (wd, bd, wp, bp) = (randn(&[c, 1, k, k]), randn(&[c]), randn(&[m, c, 1, 1]), randn(&[m]));
            let p = k / 2;
            let pads = if stride == 1 { [(p, p); 2] } else { [(p - 1, p); 2] };
            let g = Geometry { pads, strides: [stride; 2], dilations: [1, 1], group: c };
            let g1 = Geometry { pads: [(0, 0); 2], strides: [1, 1], dilations: [1, 1], group: 1 };
            let plan = ConvPlan::new(&[n, c, h, w], wd.dims(), &g).unwrap();
            let takes = crate::nn::kernels::simd::avx512() && stride == 1 && w <= 8 && c % 16 == 0;
            assert_eq!(plan.takes_channels_last(), takes, "{:?}", (n, c_in, h, w, c, k, stride));
            for (clamp_p, with_residual) in [(None, true), (six, false)] {
                let e = planned(&x, &we, Some(&be), &g1, six, None).unwrap();
                let d = planned(&e, &wd, Some(&bd), &g, six, None).unwrap();
                let mut want = planned(&d, &wp, Some(&bp), &g1, clamp_p, None).unwrap();
                let residual = with_residual.then(|| randn(want.dims()));
                if let Some(r) = &residual {
                    want = (want + r).unwrap();
                }
                let (se, sp, blocked) = Default::default();
                let blocked: depthwise::BlockedWeights = blocked;
                let got = channels_last(
                    &x,
                    (&we, Some(&be), six, &se),
                    (&wd, Some(&bd), six, Some((&blocked, wd.id(), Some(bd.id())))),
                    &plan,
                    (&wp, Some(&bp), clamp_p, &sp),
                    residual.as_ref(),
                )
                .unwrap();
                let Some(got) = got else {
                    assert!(!takes, "{:?}: declined", (n, c_in, h, w, c, k));
                    continue;
                };
                assert!(takes, "{:?}: ran a plan it does not take", (n, c_in, h, w, c, k, stride));
                assert_eq!(got.dims(), want.dims());
                let (got, want) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                if h * w > sgemm::TURNED_MAX {
                    let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{:?}: not the same bits", (n, c_in, h, w, c, m, k));
                } else {
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{:?}: {a} vs {b}", (n, c_in, h, w, c, m, k));
                    }
                }
            }
        }
    }

    /// The banded channels-last pass against the three planar convolutions, bit for bit, on
    /// ragged widths (some narrower than the kernel), strides 1 and 2, 3x3 and 5x5 kernels,
    /// "same" (upper and lower), symmetric and oversized padding, batches, bands that do and do
    /// not divide the output, one thread and three, with and without a residual; and declined
    /// where the channels are not a multiple of 16.
    #[test]
    fn banded_is_the_three_convolutions() {
        let _cap = crate::nn::kernels::simd::cap(crate::nn::kernels::simd::Level::Avx512);
        let dev = Device::Cpu;
        let randn = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
        let six = Some(Clamp { lo: 0.0, hi: 6.0 });
        // [n, c_in, h, w], expanded channels, outputs, kernel, stride, padding: 0 k/2 on every
        // side, 1 "same" (upper: the extra row and column at the end), 2 "same" lower, 3 the
        // kernel's size on every side (rows and columns of padding alone).
        type Case = ([usize; 4], usize, usize, usize, usize, u8);
        let cases: [Case; 15] = [
            ([1, 16, 24, 24], 96, 24, 3, 2, 1),
            // 27 pixels inside each row of a 5x5 kernel: six steps of 4, then 2 and 1.
            ([1, 4, 8, 31], 16, 4, 5, 1, 0),
            // Narrower than the kernel's 5 taps, and than its 8 pixels at a time.
            ([1, 4, 12, 4], 16, 6, 5, 1, 0),
            ([2, 4, 9, 7], 32, 6, 3, 2, 0),
            ([2, 5, 17, 23], 32, 7, 3, 2, 1),
            ([1, 8, 19, 13], 48, 12, 5, 2, 1),
            ([3, 6, 12, 20], 16, 9, 5, 2, 0),
            ([1, 24, 15, 15], 144, 24, 3, 1, 0),
            ([2, 7, 11, 29], 32, 5, 5, 1, 0),
            ([1, 4, 9, 40], 16, 4, 3, 2, 0),
            ([1, 12, 30, 9], 64, 40, 3, 1, 0),
            ([1, 8, 16, 16], 24, 8, 3, 2, 1),
            ([1, 8, 5, 60], 32, 16, 5, 2, 1),
            ([1, 6, 14, 14], 32, 8, 3, 2, 2),
            ([1, 6, 10, 12], 16, 5, 3, 1, 3),
        ];
        let pools: Vec<rayon::ThreadPool> =
            [1, 3].iter().map(|&t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap()).collect();
        for ([n, c_in, h, w], c, m, k, stride, pad) in cases {
            let id = (n, c_in, h, w, c, m, k, stride);
            let (x, we, be) = (randn(&[n, c_in, h, w]), randn(&[c, c_in, 1, 1]), randn(&[c]));
            let (wd, bd, wp, bp) = (randn(&[c, 1, k, k]), randn(&[c]), randn(&[m, c, 1, 1]), randn(&[m]));
            let p = k / 2;
            let pads = match pad {
                1 => [(p - 1, p); 2],
                2 => [(p, p - 1); 2],
                3 => [(k, k); 2],
                _ => [(p, p); 2],
            };
            let g = Geometry { pads, strides: [stride; 2], dilations: [1, 1], group: c };
            let g1 = Geometry { pads: [(0, 0); 2], strides: [1, 1], dilations: [1, 1], group: 1 };
            let plan = ConvPlan::new(&[n, c, h, w], wd.dims(), &g).unwrap();
            let takes = crate::nn::kernels::simd::avx512() && c % 16 == 0;
            assert_eq!(plan.takes_banded(), takes, "{id:?}");
            let [oh, ow] = plan.out();
            assert!(h * w > sgemm::TURNED_MAX && oh * ow > sgemm::TURNED_MAX, "{id:?}: planar products turn around");
            for (clamp_p, with_residual) in [(None, true), (six, false)] {
                let e = planned(&x, &we, Some(&be), &g1, six, None).unwrap();
                let d = planned(&e, &wd, Some(&bd), &g, six, None).unwrap();
                let mut want = planned(&d, &wp, Some(&bp), &g1, clamp_p, None).unwrap();
                let residual = with_residual.then(|| randn(want.dims()));
                if let Some(r) = &residual {
                    want = (want + r).unwrap();
                }
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (pool, band) in pools.iter().flat_map(|p| [1, 2, 3, 8].map(|b| (p, b))) {
                    let (se, sp, blocked) = Default::default();
                    let blocked: depthwise::BlockedWeights = blocked;
                    let got = pool.install(|| {
                        channels_last_banded(
                            &x,
                            (&we, Some(&be), six, &se),
                            (&wd, Some(&bd), six, Some((&blocked, wd.id(), Some(bd.id())))),
                            &plan,
                            band,
                            (&wp, Some(&bp), clamp_p, &sp),
                            residual.as_ref(),
                        )
                        .unwrap()
                    });
                    let Some(got) = got else {
                        assert!(!takes, "{id:?}: declined");
                        continue;
                    };
                    assert!(takes, "{id:?}: ran a plan it does not take");
                    assert_eq!(got.dims(), [n, m, oh, ow]);
                    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let threads = pool.current_num_threads();
                    let same_bits = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same_bits, "{id:?}, band {band}, {threads} threads: not the same bits");
                }
            }
        }
    }

    /// Sizes a model file declares but no host could hold are refused by the plan or by the
    /// banded pass's own bound (`too-large`), never allocated or wrapped: a plane of 2^31 x
    /// 2^31, a band of `usize::MAX` rows, channels whose scratch overflows.
    #[test]
    fn banded_sizes_from_a_hostile_model_are_refused() {
        let g = Geometry { pads: [(1, 1); 2], strides: [1, 1], dilations: [1, 1], group: 16 };
        let huge = 1usize << 31;
        match ConvPlan::new(&[1, 16, huge, huge], &[16, 1, 3, 3], &g) {
            Err(e) => assert_eq!(e.code, crate::nn::bindings::errors::ErrorCode::TooLarge, "{e:?}"),
            Ok(plan) => {
                let e = channels_last_banded_bytes(&plan, 16, usize::MAX).unwrap_err();
                assert_eq!(e.code, crate::nn::bindings::errors::ErrorCode::TooLarge, "{e:?}");
            }
        }
        let plan = ConvPlan::new(&[1, 16, 8, 8], &[16, 1, 3, 3], &g).unwrap();
        assert!(banded_scratch(&plan, usize::MAX / 4, 4).is_none(), "the projection's scratch overflows");
        // A band longer than the plane is clamped to it, and costs what the whole plane does.
        let whole = channels_last_banded_bytes(&plan, 16, 8).unwrap();
        assert_eq!(channels_last_banded_bytes(&plan, 16, usize::MAX).unwrap(), whole);
    }

    /// Below AVX-512 (the AVX2 and portable levels) a block is declined by both channels-last
    /// passes, `Ok(None)`, and runs a planar split: the channels-last kernels are AVX-512 only.
    #[test]
    fn channels_last_declines_below_avx512() {
        let dev = Device::Cpu;
        let randn = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
        let (x, we, wd, wp) =
            (randn(&[1, 8, 7, 7]), randn(&[32, 8, 1, 1]), randn(&[32, 1, 3, 3]), randn(&[8, 32, 1, 1]));
        let g = Geometry { pads: [(1, 1); 2], strides: [1, 1], dilations: [1, 1], group: 32 };
        for level in
            crate::nn::kernels::simd::levels().into_iter().filter(|&l| l != crate::nn::kernels::simd::Level::Avx512)
        {
            let _cap = crate::nn::kernels::simd::cap(level);
            let plan = ConvPlan::new(&[1, 32, 7, 7], wd.dims(), &g).unwrap();
            assert!(!plan.takes_channels_last(), "{level:?}");
            let (se, sp, blocked) = Default::default();
            let blocked: depthwise::BlockedWeights = blocked;
            let got = channels_last(
                &x,
                (&we, None, None, &se),
                (&wd, None, None, Some((&blocked, wd.id(), None))),
                &plan,
                (&wp, None, None, &sp),
                None,
            );
            assert!(got.unwrap().is_none(), "{level:?}: ran without AVX-512");
            assert!(!plan.takes_banded(), "{level:?}");
            let got = channels_last_banded(
                &x,
                (&we, None, None, &se),
                (&wd, None, None, Some((&blocked, wd.id(), None))),
                &plan,
                2,
                (&wp, None, None, &sp),
                None,
            );
            assert!(got.unwrap().is_none(), "{level:?}: banded ran without AVX-512");
        }
    }

    #[test]
    fn epilogue_adds_bias_and_clamps() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[[1f32, -2.], [3., 9.]]]], &dev).unwrap();
        let w = Tensor::new(&[[[[1f32]]]], &dev).unwrap();
        let b = Tensor::new(&[0.5f32], &dev).unwrap();
        let g = Geometry { pads: [(0, 0); 2], strides: [1, 1], dilations: [1, 1], group: 1 };
        let y = planned(&x, &w, Some(&b), &g, Some(Clamp { lo: 0.0, hi: 6.0 }), None).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1.5, 0.0, 3.5, 6.0]);
    }
}

#[cfg(test)]
mod timing {
    use super::tests::planned;
    use super::*;
    use candle_core::Device;

    /// Not a test: `cargo test -p eir --lib conv::timing -- --ignored --nocapture` prints
    /// the kernels' time on EfficientNet-Lite0's typical layers.
    #[test]
    #[ignore]
    fn layer_timings() {
        let dev = Device::Cpu;
        type Case = (&'static str, [usize; 4], [usize; 4], usize, usize, [(usize, usize); 2]);
        let cases: [Case; 24] = [
            ("b1 pw 112->672 @14", [1, 112, 14, 14], [672, 112, 1, 1], 1, 1, [(0, 0), (0, 0)]),
            ("b1 dw 672 k5 s1 @14", [1, 672, 14, 14], [672, 1, 5, 5], 672, 1, [(2, 2), (2, 2)]),
            ("b1 pw 672->112 @14", [1, 672, 14, 14], [112, 672, 1, 1], 1, 1, [(0, 0), (0, 0)]),
            ("b1 pw 192->1152 @7", [1, 192, 7, 7], [1152, 192, 1, 1], 1, 1, [(0, 0), (0, 0)]),
            ("b1 dw 1152 k5 s1 @7", [1, 1152, 7, 7], [1152, 1, 5, 5], 1152, 1, [(2, 2), (2, 2)]),
            ("b1 pw 1152->192 @7", [1, 1152, 7, 7], [192, 1152, 1, 1], 1, 1, [(0, 0), (0, 0)]),
            ("b1 pw 1152->320 @7", [1, 1152, 7, 7], [320, 1152, 1, 1], 1, 1, [(0, 0), (0, 0)]),
            ("b1 pw 24->144 @56", [1, 24, 56, 56], [144, 24, 1, 1], 1, 1, [(0, 0), (0, 0)]),
            ("b1 dw 144 k5 s2 @56", [1, 144, 56, 56], [144, 1, 5, 5], 144, 2, [(1, 2), (1, 2)]),
            ("stem 3->32 k3 s2", [1, 3, 224, 224], [32, 3, 3, 3], 1, 2, [(0, 1), (0, 1)]),
            ("b8 stem 3->32 k3 s2", [8, 3, 224, 224], [32, 3, 3, 3], 1, 2, [(0, 1), (0, 1)]),
            ("dw 96 k3 s2 @112", [1, 96, 112, 112], [96, 1, 3, 3], 96, 2, [(0, 1), (0, 1)]),
            ("dw 144 k3 s1 @56", [1, 144, 56, 56], [144, 1, 3, 3], 144, 1, [(1, 1), (1, 1)]),
            ("dw 1152 k5 s1 @7", [1, 1152, 7, 7], [1152, 1, 5, 5], 1152, 1, [(2, 2), (2, 2)]),
            ("b8 dw 1152 k5 s1 @7", [8, 1152, 7, 7], [1152, 1, 5, 5], 1152, 1, [(2, 2), (2, 2)]),
            ("b8 dw 672 k5 s1 @14", [8, 672, 14, 14], [672, 1, 5, 5], 672, 1, [(2, 2), (2, 2)]),
            ("b8 dw 672 k5 s2 @14", [8, 672, 14, 14], [672, 1, 5, 5], 672, 2, [(1, 2), (1, 2)]),
            ("b8 dw 144 k3 s1 @56", [8, 144, 56, 56], [144, 1, 3, 3], 144, 1, [(1, 1), (1, 1)]),
            ("b8 dw 96 k3 s2 @112", [8, 96, 112, 112], [96, 1, 3, 3], 96, 2, [(0, 1), (0, 1)]),
            ("pw 16->96 @112", [1, 16, 112, 112], [96, 16, 1, 1], 1, 1, [(0, 0), (0, 0)]),
            ("pw 144->24 @56", [1, 144, 56, 56], [24, 144, 1, 1], 1, 1, [(0, 0), (0, 0)]),
            ("b8 pw 144->24 @56", [8, 144, 56, 56], [24, 144, 1, 1], 1, 1, [(0, 0), (0, 0)]),
            ("b8 pw 672->112 @14", [8, 672, 14, 14], [112, 672, 1, 1], 1, 1, [(0, 0), (0, 0)]),
            ("b8 pw 24->144 @56", [8, 24, 56, 56], [144, 24, 1, 1], 1, 1, [(0, 0), (0, 0)]),
        ];
        let only = std::env::var("EIR_CONV_CASE").unwrap_or_default();
        for (name, xs, ws, group, stride, pads) in cases.into_iter().filter(|c| c.0.contains(&only)) {
            let x = Tensor::randn(0f32, 1.0, xs.to_vec(), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, ws.to_vec(), &dev).unwrap();
            let g = Geometry { pads, strides: [stride, stride], dilations: [1, 1], group };
            let clamp = Some(Clamp { lo: 0.0, hi: 6.0 });
            let cache = PackedWeights::default();
            planned(&x, &w, None, &g, clamp, Some((&cache, w.id()))).unwrap();
            // Timed on a pool worker, as the scheduler runs passes.
            let t = rayon::scope(|_| {
                let t = std::time::Instant::now();
                let iters = if only.is_empty() { 200 } else { 2000 };
                let awake = crate::scheduler::Awake::new(true);
                let bw = depthwise::BlockedWeights::default();
                let plan = ConvPlan::new(x.dims(), w.dims(), &g).unwrap();
                awake.run(|| {
                    for _ in 0..iters {
                        conv2d(&x, &w, None, &plan, &g, clamp, (Some((&cache, w.id())), Some((&bw, w.id(), None))))
                            .unwrap();
                    }
                });
                t.elapsed() / iters
            });
            eprintln!("{name:>20}: {t:?}");
        }
    }
}

#[cfg(test)]
mod fused_timing {
    use super::*;
    use candle_core::Device;

    #[test]
    #[ignore]
    fn fused_timings() {
        let dev = Device::Cpu;
        let randn = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
        // `FUSED_CASE=block1` runs the cases whose names contain it, `FUSED_CASE='block1$'`
        // only the one of that name (for a profiler).
        let only = std::env::var("FUSED_CASE").unwrap_or_default();
        // name, x dims (input of the expand or of the dw), expanded c, m, k, stride, pads, rows
        type Case = (&'static str, [usize; 4], Option<usize>, usize, usize, usize, [(usize, usize); 2], usize);
        let cases: [Case; 5] = [
            ("block1", [1, 32, 112, 112], None, 16, 3, 1, [(1, 1), (1, 1)], 16),
            ("block14", [1, 112, 14, 14], Some(672), 112, 5, 1, [(2, 2), (2, 2)], 7),
            ("block2", [1, 16, 112, 112], Some(96), 24, 3, 2, [(0, 1), (0, 1)], 10),
            ("block7", [1, 192, 7, 7], Some(1152), 192, 5, 1, [(2, 2), (2, 2)], 7),
            ("block56", [1, 24, 56, 56], Some(144), 24, 3, 1, [(1, 1), (1, 1)], 8),
        ];
        for (name, xd, expand, m, k, stride, pads, rows) in
            cases.into_iter().filter(|c| only.strip_suffix('$').map_or(c.0.contains(&only), |o| c.0 == o))
        {
            let c = expand.unwrap_or(xd[1]);
            let xin = randn(&xd);
            let (we, be) = (randn(&[c, xd[1], 1, 1]), randn(&[c]));
            let (wd, bd, wp, bp) = (randn(&[c, 1, k, k]), randn(&[c]), randn(&[m, c, 1, 1]), randn(&[m]));
            let g = Geometry { pads, strides: [stride; 2], dilations: [1, 1], group: c };
            let plan = ConvPlan::new(&[xd[0], c, xd[2], xd[3]], wd.dims(), &g).unwrap();
            let (cache, cache_e) = (PackedWeights::default(), PackedWeights::default());
            let blocked = depthwise::BlockedWeights::default();
            let six = Some(Clamp { lo: 0.0, hi: 6.0 });
            let fused = || {
                depthwise_pointwise(
                    &xin,
                    expand.map(|_| (&we, Some(&be), six, Some((&cache_e, we.id())))),
                    (&wd, Some(&bd), six, Some((&blocked, wd.id(), Some(bd.id())))),
                    &plan,
                    rows,
                    (&wp, Some(&bp), None, Some((&cache, wp.id()))),
                    None,
                )
                .unwrap()
            };
            // A pass's median time as the scheduler runs it (on the pool, kept awake).
            let time = |run: &(dyn Fn() -> Tensor + Sync)| {
                rayon::scope(|_| {
                    let awake = crate::scheduler::Awake::new(true);
                    awake.run(|| crate::nn::kernels::median_time(2001, &mut || drop(run())))
                })
            };
            // Its largest difference from the planar fused pass.
            let diff =
                |got: Tensor| (got - &fused()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            eprintln!("{name}: {:?}", time(&fused));
            if expand.is_some() && plan.takes_channels_last() {
                let (s0, s1) = (super::super::Derived::default(), super::super::Derived::default());
                let run = || {
                    channels_last(
                        &xin,
                        (&we, Some(&be), six, &s0),
                        (&wd, Some(&bd), six, Some((&blocked, wd.id(), Some(bd.id())))),
                        &plan,
                        (&wp, Some(&bp), None, &s1),
                        None,
                    )
                    .unwrap()
                    .unwrap()
                };
                eprintln!("{name} channels last: {:?} (max diff {})", time(&run), diff(run()));
            }
            if expand.is_some() && plan.takes_banded() {
                let (s0, s1) = (super::super::Derived::default(), super::super::Derived::default());
                for band in [1, 2, 4, 8] {
                    let run = || {
                        channels_last_banded(
                            &xin,
                            (&we, Some(&be), six, &s0),
                            (&wd, Some(&bd), six, Some((&blocked, wd.id(), Some(bd.id())))),
                            &plan,
                            band,
                            (&wp, Some(&bp), None, &s1),
                            None,
                        )
                        .unwrap()
                        .unwrap()
                    };
                    eprintln!("{name} banded by {band}: {:?} (max diff {})", time(&run), diff(run()));
                }
            }
        }
    }
}
