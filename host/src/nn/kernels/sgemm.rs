//! The f32 GEMM behind convolutions and dense layers, `dst = clamp(A · B + bias)` (or GELU of
//! it), with the epilogue fused.
//!
//! `A` holds weights (`m×k`, packed once at load) and `B` activations (`k×n`, rows contiguous in
//! `n`): a convolution's planes or a transformer's tokens. The AVX-512 kernel keeps a 12-row ×
//! 32-column tile of `C` in 24 registers over a slice of up to [`KC`] of `k` (so 12 rows of A
//! stay in L1 while B's strips stream past), reads B in place unless its row stride would
//! thrash L1 (then B is packed once, in 32-column strips), and writes each tile with bias and
//! clamp applied on the last slice, so there is no second pass over the output. Up to 8 columns
//! (a short sentence's tokens), the product runs turned around instead: each register holds 12
//! rows of one column, so no lane idles on columns that are not there. Work is split into
//! (row panels, column chunk) units across threads; each output element is computed by one
//! unit in a fixed order, so results do not depend on the thread count. With AVX2 + FMA only,
//! the same scheme runs 4 × 24 tiles (two per packed 8-row panel). CPUs with neither use the
//! `gemm` crate and a separate epilogue pass.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{act, simd};
use crate::nn::error::NnError;

/// An activation fused into a convolution's output pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Clamp {
    pub lo: f32,
    pub hi: f32,
}

/// Rows of `C` per AVX2 tile panel (two halves of 4 rows).
const MR: usize = 8;
/// Rows of `C` per AVX-512 tile: 12 rows × 32 columns keep 24 of the 32 registers
/// accumulating, with 2 for B's row and one for the broadcast of A. 12 divides BERT's widths
/// (384, 1152, 1536) and most of EfficientNet's channel counts; a partial last panel runs a
/// 4- or 8-row tile.
const MR512: usize = 12;
/// Columns of `C` per tile: two 16-lane registers.
const NR: usize = 32;
/// The deepest slice of `k` one AVX-512 tile reduces before its partial sums go back to `C`:
/// 12 rows of A at this depth (18 KiB) stay in L1 while B's strips stream past from L2.
const KC: usize = 384;
/// How many steps of `k` ahead the AVX-512 kernels ask for A's panels into L2, besides the 16
/// steps ahead they ask for into L1. In a model's pass the weights come from memory, not L3 (the
/// pass reads 18 MB of them, and the L3 is shared): 16 steps (768 bytes) did not cover that
/// latency. EfficientNet-Lite0's 7x7 blocks, one thread, in the pass: expand 120 → 101–104 µs,
/// project 128 → 112 µs; the pass 4.45–4.57 → 4.35–4.41 ms; MiniLM 32 × 20 tokens 31.5 → 29.5 ms.
const AHEAD: usize = 64;
/// Columns per unit of parallel work (rounded down to a multiple of the kernel's tile width),
/// small enough that `B`'s panel for short `k` stays in L1.
pub(super) const NC: usize = 256;
/// Fewest columns of C the AVX-512 kernels take when `A` is not packed already (fewer go to
/// dot products): packing A for a product this narrow costs about as much as the product.
const NARROW_MIN: usize = 8;
/// Below this many multiply-adds the product runs on the calling thread: waking a sleeping
/// pool costs tens of microseconds. Passes run with the pool kept awake
/// (`scheduler::Awake`), where sharing out a product costs a few: Silero's products of
/// 0.13–0.26 M multiply-adds on two threads took a chunk from 0.057 to 0.053 ms (at 1 M
/// before, they ran on one), and no other model's pass moved.
const PARALLEL_MIN: usize = 1 << 17;

/// The widest product (columns of C) that runs turned around (`x86::narrow`), which sums all
/// of `k` in one register where the tile adds slices of it through C.
pub(crate) const TURNED_MAX: usize = 8;

/// Whether a column of C comes out the same, to the bit, whichever other columns share its
/// product, for products of at least 4 rows and more than [`TURNED_MAX`] columns (fewer rows
/// stream B's rows instead, fewer columns run turned around): so with the AVX-512 kernels,
/// which compute every such element in one order (the AVX2 tile leaves mid-width products to
/// the `gemm` crate, whose blocking depends on the shape). Callers that choose between splits
/// of a product by timing rely on it.
pub(crate) fn columns_independent() -> bool {
    simd::avx512()
}

/// `A` (`m×k`) laid out for the tile kernels, `[panel][k][mr]` with rows past `m` zero: `mr`
/// is [`MR512`] for the AVX-512 tile and [`MR`] for the AVX2 one, chosen by the CPU when
/// packing. Convolution and dense-layer weights are packed once and kept.
pub(crate) struct Packed {
    m: usize,
    k: usize,
    mr: usize,
    data: Vec<f32>,
}

impl Packed {
    /// Packs `a` (`m×k`, row-major) for the tile kernel this CPU runs; `None` where neither
    /// runs (the CPU has neither AVX-512 nor AVX2 + FMA, or `k` is 0) or `a` is too short.
    pub(crate) fn new(m: usize, k: usize, a: &[f32]) -> Option<Packed> {
        if k == 0 || m.checked_mul(k).is_none_or(|mk| a.len() < mk) || !(simd::avx512() || simd::fma()) {
            return None;
        }
        let mr = if simd::avx512() { MR512 } else { MR };
        let mut data = vec![0f32; m.div_ceil(mr) * k * mr];
        for (t, panel) in data.chunks_exact_mut(k * mr).enumerate() {
            let rows = &a[t * mr * k..(t * mr + mr.min(m - t * mr)) * k];
            // Step by step through the panel's rows together: each step's values are one
            // contiguous run of the panel (a strided gather per row was slower by half).
            for (p, step) in panel.chunks_exact_mut(mr).enumerate() {
                for (slot, row) in step.iter_mut().zip(rows.chunks_exact(k)) {
                    *slot = row[p];
                }
            }
        }
        Some(Packed { m, k, mr, data })
    }
}

/// `B` (`k×n`) laid out for [`gemm_strips`]: 32-column strips, each `[k][32]` contiguous
/// (`[strip][k][32]`, zero past `n`). A dense layer's weights are packed so once, at load, and
/// then stream through the tile in order, as the right operand of `X·W`.
pub(crate) struct Strips {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl Strips {
    /// Packs `B` given as `Bᵀ` (`bt`, `n×k` row-major: a dense layer's `[out, in]` weights);
    /// `None` without AVX-512 (the only kernel that reads strips), for an empty `k` or `n`,
    /// where `bt` is too short, or where the strips cannot be allocated (the caller then runs
    /// the turned-around product: a host short of memory gets no abort).
    pub(crate) fn from_transposed(n: usize, k: usize, bt: &[f32]) -> Option<Strips> {
        Self::pack(k, n, bt, 0, [1, k], Vec::new()).ok().flatten()
    }

    /// Packs `B` (`k×n`) from where it lies: element `[p][j]` at `data[base + p·rs + j·cs]`
    /// (a matrix, its transpose, or a view out of a Transpose), into `buf` (reused, grown as
    /// needed; what lies past column `n` in the last strip is never stored, whatever it holds).
    /// `None` without AVX-512, for an empty `k` or `n`, or where an element lies outside `data`;
    /// `too-large` where the strips' size overflows or cannot be allocated.
    pub(crate) fn pack(
        k: usize,
        n: usize,
        data: &[f32],
        base: usize,
        [rs, cs]: [usize; 2],
        mut buf: Vec<f32>,
    ) -> Result<Option<Strips>, NnError> {
        let last = (k.checked_sub(1), n.checked_sub(1));
        let last = match last {
            (Some(p), Some(j)) => {
                p.checked_mul(rs).zip(j.checked_mul(cs)).and_then(|(a, b)| base.checked_add(a)?.checked_add(b))
            }
            _ => None,
        };
        if last.is_none_or(|last| last >= data.len()) || !simd::avx512() {
            return Ok(None);
        }
        let len = n
            .div_ceil(NR)
            .checked_mul(k)
            .and_then(|x| x.checked_mul(NR))
            .ok_or_else(|| NnError::too_large("gemm: the strips' size overflows"))?;
        if buf.len() < len {
            buf.try_reserve_exact(len - buf.len()).map_err(|_| NnError::too_large("gemm: cannot allocate strips"))?;
            buf.resize(len, 0.0);
        }
        buf.truncate(len);
        for (i, strip) in buf.chunks_exact_mut(k * NR).enumerate() {
            let width = NR.min(n - i * NR);
            if cs == 1 {
                // Rows of B contiguous (V as exporters leave it): one copy per step.
                for (p, step) in strip.chunks_exact_mut(NR).enumerate() {
                    let at = base + p * rs + i * NR;
                    step[..width].copy_from_slice(&data[at..at + width]);
                }
            } else {
                // Columns of B contiguous where `rs` is 1 (`Bᵀ`, or Kᵀ out of K): read down each
                // column.
                for c in 0..width {
                    let col = base + (i * NR + c) * cs;
                    for (p, step) in strip.chunks_exact_mut(NR).enumerate() {
                        step[c] = data[col + p * rs];
                    }
                }
            }
        }
        Ok(Some(Strips { k, n, data: buf }))
    }

    /// Columns of `B`.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Rows of `B` (the products' depth).
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// The strips' buffer back, to be filled again.
    pub(crate) fn into_data(self) -> Vec<f32> {
        self.data
    }
}

/// `dst[m×n] = gelu?(a[m×k] · B + bias[n])`, `B` packed in [`Strips`], `a` read in place
/// (row-major, rows `k` apart) and `bias` one value per column: a dense layer `X·W` over the
/// activations as they lie, with neither operand transposed nor the output turned back.
/// Every element of `dst`'s first `m·n` is written. Where [`gemm`] of `Bᵀ` by `aᵀ` runs its
/// tile kernels (AVX-512, more than [`TURNED_MAX`] rows of `a`, at least 4 columns of `B`),
/// the two compute the same products summed in the same order, so they agree to the bit
/// (NaN payloads aside).
pub(crate) fn gemm_strips(
    m: usize,
    a: &[f32],
    b: &Strips,
    dst: &mut [MaybeUninit<f32>],
    bias: Option<&[f32]>,
    gelu: bool,
) -> Result<(), NnError> {
    gemm_strips_lda(m, a, b.k, b, dst, bias, gelu)
}

/// [`gemm_strips`] with `a`'s rows `lda` floats apart (`lda ≥ k`): one head's rows of a
/// projection that holds every head side by side, read where they lie.
pub(crate) fn gemm_strips_lda(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &Strips,
    dst: &mut [MaybeUninit<f32>],
    bias: Option<&[f32]>,
    gelu: bool,
) -> Result<(), NnError> {
    strips_checked(m, (a, ARows::Apart(lda)), b, dst, (bias, None, gelu), true)
}

/// [`gemm_strips`] with `clamp` applied after the bias (a convolution's fused activation), as
/// [`gemm`]'s tile kernels apply it: the two still agree to the bit. Without `parallel` it
/// runs on the calling thread alone, for callers that share their own work out over the pool
/// already (a band of a channels-last block), where a product shared out again would only add
/// waits.
pub(crate) fn gemm_strips_clamped(
    m: usize,
    a: &[f32],
    b: &Strips,
    dst: &mut [MaybeUninit<f32>],
    (bias, clamp): (Option<&[f32]>, Option<Clamp>),
    parallel: bool,
) -> Result<(), NnError> {
    strips_checked(m, (a, ARows::Apart(b.k)), b, dst, (bias, clamp, false), parallel)
}

/// [`gemm_strips_clamped`] of `A` given turned, as `Aᵀ` (`k` rows of `m` values, `ld` floats
/// apart, `ld ≥ m`): a planar activation's channels (`k` planes, `ld` floats apart) read as
/// the rows of `m` pixels, in place. The same products as turning `A` around first and
/// calling [`gemm_strips_clamped`], summed in the same order, so the two agree to the bit;
/// the copy they skip was a fifth of a 7x7 block's serial time.
pub(crate) fn gemm_strips_turned(
    m: usize,
    (a, ld): (&[f32], usize),
    b: &Strips,
    dst: &mut [MaybeUninit<f32>],
    (bias, clamp): (Option<&[f32]>, Option<Clamp>),
    parallel: bool,
) -> Result<(), NnError> {
    strips_checked(m, (a, ARows::Turned(ld)), b, dst, (bias, clamp, false), parallel)
}

/// Where the strips products find value `p` of row `i` of `A`.
#[derive(Clone, Copy, Debug)]
enum ARows {
    /// At `i·lda + p`: rows `lda ≥ k` floats apart, each row's values contiguous.
    Apart(usize),
    /// At `p·ld + i`: `Aᵀ` row-major, `ld ≥ m` ([`gemm_strips_turned`]).
    Turned(usize),
}

impl ARows {
    /// One past the last float an `m × k` `A` laid out so reads (0 when empty), or None where
    /// the layout is too narrow for it (rows overlapping) or its extent overflows.
    fn extent(self, m: usize, k: usize) -> Option<usize> {
        if m == 0 || k == 0 {
            return Some(0);
        }
        let (outer, inner, stride) = match self {
            ARows::Apart(lda) => (m, k, lda),
            ARows::Turned(ld) => (k, m, ld),
        };
        (stride >= inner).then(|| (outer - 1).checked_mul(stride)?.checked_add(inner)).flatten()
    }

    /// The offset of row `i`, value `p` (below [`ARows::extent`] for `i < m`, `p < k`).
    fn at(self, i: usize, p: usize) -> usize {
        match self {
            ARows::Apart(lda) => i * lda + p,
            ARows::Turned(ld) => p * ld + i,
        }
    }
}

/// The operand checks of the strips products, then the kernel.
fn strips_checked(
    m: usize,
    (a, rows): (&[f32], ARows),
    b: &Strips,
    dst: &mut [MaybeUninit<f32>],
    (bias, clamp, gelu): (Option<&[f32]>, Option<Clamp>, bool),
    parallel: bool,
) -> Result<(), NnError> {
    let (k, n) = (b.k, b.n);
    let fits = |x: Option<usize>, have: usize| x.is_some_and(|x| x <= have);
    if !fits(rows.extent(m, k), a.len()) || !fits(m.checked_mul(n), dst.len()) || bias.is_some_and(|b| b.len() != n) {
        return Err(NnError::runtime("gemm: operand sizes do not match"));
    }
    if !simd::avx512() {
        return Err(NnError::runtime("gemm: packed strips need AVX-512"));
    }
    if m == 0 {
        return Ok(());
    }
    // SAFETY: the CPU has AVX-512F (checked above); `a` holds every value of the m×k A at its
    // offset under `rows` (`extent` checked above, without overflow: each offset is below it),
    // `dst` m·n floats (checked above, without overflow) and is a distinct &mut; `b.data`
    // holds its n.div_ceil(32) strips of k×32 floats (`Strips`' constructors); `bias` holds n
    // values (checked).
    unsafe {
        x86::gemm_strips(
            [m, n, k],
            a.as_ptr(),
            rows,
            &b.data,
            dst.as_mut_ptr().cast::<f32>(),
            (bias, clamp, gelu),
            parallel,
        )
    };
    Ok(())
}

/// [`gemm_strips_lda`] into an initialised buffer (overwritten).
pub(crate) fn gemm_strips_over(m: usize, a: &[f32], lda: usize, b: &Strips, dst: &mut [f32]) -> Result<(), NnError> {
    // SAFETY: MaybeUninit<f32> has f32's layout, and `gemm_strips_lda` writes only
    // initialised values.
    let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<MaybeUninit<f32>>(), dst.len()) };
    gemm_strips_lda(m, a, lda, b, dst, None, false)
}

/// `batch` products `[m×k]·[k×n]` whose sizes were checked against the operands they were
/// made for: `a` holds `m·k` floats, `b` `batch·k·n`, `dst` `batch·m·n` and `bias` (if any) `m`,
/// every product computed without overflow. The tile kernels take only this type.
pub(crate) struct GemmShape {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
}

impl GemmShape {
    fn new(
        batch: usize,
        [m, n, k]: [usize; 3],
        a: usize,
        b: usize,
        dst: usize,
        bias: Option<usize>,
    ) -> Result<Self, NnError> {
        let product = |x: &[usize]| x.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let fits = |need: Option<usize>, have: usize| need.is_some_and(|need| need <= have);
        if !fits(product(&[m, k]), a)
            || !fits(product(&[batch, k, n]), b)
            || !fits(product(&[batch, m, n]), dst)
            || bias.is_some_and(|len| len < m)
        {
            return Err(NnError::runtime("gemm: operand sizes do not match"));
        }
        Ok(Self { batch, m, n, k })
    }
}

/// `dst[m×n] = clamp(a[m×k] · b[k×n] + bias[m])`, all row-major and dense. `packed`, when
/// given for the same `m×k`, is `a` already packed.
pub(crate) fn gemm(
    dims: [usize; 3],
    a: &[f32],
    packed: Option<&Packed>,
    b: &[f32],
    dst: &mut [f32],
    bias: Option<&[f32]>,
    clamp: Option<Clamp>,
) -> Result<(), NnError> {
    // SAFETY: MaybeUninit<f32> has f32's layout, and `gemm_into` writes only initialised values.
    let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<MaybeUninit<f32>>(), dst.len()) };
    gemm_into(1, dims, a, packed, b, dst, bias, clamp)
}

/// The tile kernel for products of `n` columns on this CPU, where it beats the `gemm` crate.
/// The AVX2 tile does on wide products (`sgemm::timing`: 0.55–0.92x from 256 columns up), not
/// on narrower ones (1.1–1.4x on 7x7 and 14x14 planes, where the crate's blocking of deep `k`
/// wins; 1.5–1.65x at 8 tokens, where half-tiles of 4 rows load a broadcast per FMA), which stay
/// with the crate; up to 8 columns the AVX2 column kernel runs (`x86::columns_avx2`: a MiniLM
/// pass over 8 tokens capped to AVX2 on the Xeon, 6.35 against 2.40 ms with dot products; 5
/// tokens 5.09 against 1.74).
fn tile_kernel(n: usize, k: usize) -> Option<x86::Kernel> {
    if simd::avx512() {
        Some(if strided_rows_thrash(n, k) { x86::Kernel::Avx512Packed } else { x86::Kernel::Avx512 })
    } else if simd::fma() && (n >= NC || n <= x86::NT) {
        Some(x86::Kernel::Avx2)
    } else {
        None
    }
}

/// Whether `k` rows of a 32-column strip of B, read in place (rows `n` floats apart), fall on
/// so few L1 sets that they cannot stay cached while a tile runs: a typical L1 (64 sets of 64
/// bytes, 8 ways or more) holds only `8 × sets` of the strip's lines, and a row stride that is
/// a multiple of a power of two maps every row onto `64 / 2^j` sets. Only where that is one set
/// does packing B pay for its copy (`sgemm::timing`, Xeon with AVX-512, GFLOP/s in place against
/// packed: 1024 columns (one set) 193-234 against 241-306; 512 columns (two sets) 248-283
/// against 226-266 since the tile prefetches B's rows, 180-218 against 253-316 before; 128
/// columns (8 sets) 278-299 against 252-264; a 56x56 plane with 24 rows 121 against 58-69).
fn strided_rows_thrash(n: usize, k: usize) -> bool {
    let stride = n * 4;
    // Sets one column's lines cycle through: 64 / gcd(64, stride in lines), or all of them when
    // rows are not line-aligned relative to each other.
    let sets = if stride.is_multiple_of(64) { 64 >> (stride / 64).trailing_zeros().min(6) } else { 64 };
    let lines = k * (NR * 4).div_ceil(64);
    sets <= 1 && lines > 8 * sets
}

/// `buf` as initialised floats, zeroed.
pub(crate) fn zeroed(buf: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    for v in buf.iter_mut() {
        v.write(0.0);
    }
    // SAFETY: every element was just written, and MaybeUninit<f32> has f32's layout.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<f32>(), buf.len()) }
}

/// [`gemm`] for `batch` products with the same `a`, into a buffer that need not be initialised:
/// `b` holds `batch` `k×n` matrices and `dst` `batch` `m×n` ones, back to back (a 1x1
/// convolution over a batch of images), computed in one parallel pass. Every element of the
/// first `batch·m·n` is written (the tile kernels write each before they read it back, to add
/// a later slice of `k`), which spares the caller zeroing a fresh output.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    batch: usize,
    dims: [usize; 3],
    a: &[f32],
    packed: Option<&Packed>,
    b: &[f32],
    dst: &mut [MaybeUninit<f32>],
    bias: Option<&[f32]>,
    clamp: Option<Clamp>,
) -> Result<(), NnError> {
    product(batch, dims, a, packed, b, dst, bias, clamp, false)
}

/// [`gemm_into`] for one product, with GELU after the bias where `gelu` ([`gemm_gelu`]'s
/// epilogue), into a buffer that need not be initialised.
pub(crate) fn gemm_act_into(
    dims: [usize; 3],
    a: &[f32],
    packed: Option<&Packed>,
    b: &[f32],
    dst: &mut [MaybeUninit<f32>],
    bias: Option<&[f32]>,
    gelu: bool,
) -> Result<(), NnError> {
    product(1, dims, a, packed, b, dst, bias, None, gelu)
}

/// `dst[m×n] = gelu(a[m×k] · b[k×n] + bias[m])` ([`act::Act::Gelu`], exact erf), as [`gemm`]
/// does otherwise: the AVX-512 kernels apply GELU to each tile as soon as it is stored, in L1
/// and in parallel with the products (as a pass of its own afterwards, it ran on one thread
/// over an output that had left L1: a tenth of a MiniLM layer at 128 tokens).
pub(crate) fn gemm_gelu(
    dims: [usize; 3],
    a: &[f32],
    packed: Option<&Packed>,
    b: &[f32],
    dst: &mut [f32],
    bias: Option<&[f32]>,
) -> Result<(), NnError> {
    // SAFETY: MaybeUninit<f32> has f32's layout, and `product` writes only initialised values.
    let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<MaybeUninit<f32>>(), dst.len()) };
    product(1, dims, a, packed, b, dst, bias, None, true)
}

/// [`gemm_into`], with GELU after the clamp where `gelu` is set.
#[allow(clippy::too_many_arguments)]
fn product(
    batch: usize,
    [m, n, k]: [usize; 3],
    a: &[f32],
    packed: Option<&Packed>,
    b: &[f32],
    dst: &mut [MaybeUninit<f32>],
    bias: Option<&[f32]>,
    clamp: Option<Clamp>,
    gelu: bool,
) -> Result<(), NnError> {
    let shape = GemmShape::new(batch, [m, n, k], a.len(), b.len(), dst.len(), bias.map(<[f32]>::len))?;
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    let dst = &mut dst[..batch * m * n];
    // A few rows (a fully connected layer at batch 1): each output row is a sum of B's rows,
    // streamed once; tiles of 8 rows would waste most of their multiply-adds.
    let few_rows = m < 4 && n >= NR && k > 0;
    // Up to 8 columns run turned around (`x86::narrow512`); an unpacked A that narrow goes to
    // dot products of contiguous rows rather than pay for its packing.
    if let Some(kernel) = tile_kernel(n, k).filter(|_| !few_rows && (n >= NARROW_MIN || packed.is_some())) {
        let packed_here;
        let fits = |p: &&Packed| p.m == m && p.k == k && p.mr == kernel.panel_rows();
        let packed = match packed.filter(fits) {
            Some(p) => Some(p),
            None => {
                packed_here = Packed::new(m, k, a);
                packed_here.as_ref().filter(fits)
            }
        };
        if let Some(packed) = packed {
            let fused = gelu && kernel.fuses_gelu();
            // SAFETY: the CPU has the kernel's features (`simd::avx512()` / `simd::fma()` chose
            // it above); `shape` (a GemmShape) proves b holds batch·k·n floats, bias m, and dst
            // batch·m·n (sliced to exactly that above; the kernel writes all of it); `packed` is
            // for this m×k in the kernel's panel rows (`fits`, checked just above); dst is a
            // distinct &mut, so it aliases nothing.
            unsafe { x86::gemm(kernel, &shape, packed, b, dst.as_mut_ptr().cast::<f32>(), bias, clamp, fused) };
            if gelu && !fused {
                // SAFETY: x86::gemm initialised every element of dst (its contract above).
                let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()) };
                act::activate(dst, act::Act::Gelu);
            }
            return Ok(());
        }
    }
    let dst = zeroed(dst);
    if few_rows {
        for (i, dst) in dst.chunks_exact_mut(m * n).enumerate() {
            rows_of_b([m, n, k], a, &b[i * k * n..(i + 1) * k * n], dst);
        }
    } else {
        for (i, dst) in dst.chunks_exact_mut(m * n).enumerate() {
            let b = &b[i * k * n..(i + 1) * k * n];
            if n < NR / 2 { narrow([m, n, k], a, b, dst) } else { portable([m, n, k], a, b, dst)? }
        }
    }
    epilogue(dst, n, bias, clamp);
    if gelu {
        act::activate(dst, act::Act::Gelu);
    }
    Ok(())
}

/// `dst = a · b` for a narrow B (a convolution over a short sequence, n < 16): B's columns are
/// gathered once, then each output is one dot product of contiguous rows.
fn narrow([m, n, k]: [usize; 3], a: &[f32], b: &[f32], dst: &mut [f32]) {
    if k == 0 {
        dst.fill(0.0);
        return;
    }
    let mut bt = vec![0f32; n * k];
    for (p, row) in b.chunks_exact(n).take(k).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            bt[j * k + p] = v;
        }
    }
    let rows = |(i, out): (usize, &mut [f32])| {
        let arow = &a[i * k..(i + 1) * k];
        for (o, col) in out.iter_mut().zip(bt.chunks_exact(k)) {
            *o = dot(arow, col);
        }
    };
    if m * n * k < PARALLEL_MIN {
        dst.chunks_exact_mut(n).enumerate().for_each(rows);
    } else {
        dst.par_chunks_exact_mut(n).enumerate().for_each(rows);
    }
}

/// `Σ a[i]·b[i]` over the shorter of the two, vectorised for the CPU at hand.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    if simd::avx512() {
        // SAFETY: AVX-512F is available; the slices have the same length.
        return unsafe { x86::dot(a, b) };
    }
    // Eight independent lanes, which the compiler vectorises.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `dst = a · b` as `dst[i] = Σ_p a[i][p] · b[p]` over B's rows, columns split across threads.
fn rows_of_b([m, n, k]: [usize; 3], a: &[f32], b: &[f32], dst: &mut [f32]) {
    #[inline(always)]
    fn axpys<const FMA: bool>([m, n, k]: [usize; 3], a: &[f32], b: &[f32], j0: usize, out: &mut [f32]) {
        let w = out.len() / m;
        for i in 0..m {
            let o = &mut out[i * w..(i + 1) * w];
            o.fill(0.0);
            for p in 0..k {
                let av = a[i * k + p];
                let row = &b[p * n + j0..p * n + j0 + w];
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = if FMA { av.mul_add(v, *o) } else { *o + av * v };
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn axpys_fma(dims: [usize; 3], a: &[f32], b: &[f32], j0: usize, out: &mut [f32]) {
        axpys::<true>(dims, a, b, j0, out)
    }
    #[cfg(target_arch = "x86_64")]
    let fma = simd::fma();
    // Column blocks, each `[m][width]`, computed separately and then scattered into dst: two
    // per thread where the product is big enough to share (a classifier's 1000 columns were
    // one block, streaming all of B on one core), else one.
    let parallel = m * n * k >= PARALLEL_MIN;
    let per = if parallel { 2 * rayon::current_num_threads() } else { 1 };
    let width = n.div_ceil(per).next_multiple_of(16).clamp(64, NC * 4);
    let blocks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(width))
        .into_par_iter()
        .with_min_len(if parallel { 1 } else { usize::MAX })
        .map(|blk| {
            let j0 = blk * width;
            let mut out = vec![0f32; m * width.min(n - j0)];
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: the CPU supports AVX2 and FMA (checked above).
                unsafe { axpys_fma([m, n, k], a, b, j0, &mut out) };
                return (j0, out);
            }
            axpys::<false>([m, n, k], a, b, j0, &mut out);
            (j0, out)
        })
        .collect();
    for (j0, out) in blocks {
        let w = out.len() / m;
        for i in 0..m {
            dst[i * n + j0..i * n + j0 + w].copy_from_slice(&out[i * w..(i + 1) * w]);
        }
    }
}

/// The `gemm` crate's product (`dst = a · b`), for CPUs without AVX-512.
fn portable([m, n, k]: [usize; 3], a: &[f32], b: &[f32], dst: &mut [f32]) -> Result<(), NnError> {
    if k == 0 {
        dst.fill(0.0);
        return Ok(());
    }
    let parallelism = if m * n * k >= PARALLEL_MIN {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices hold at least m*k, k*n and m*n elements (`gemm_into` checked them with
    // a GemmShape and hands each image its own slices), all
    // row-major with the strides given; dst does not alias a or b (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// Applies bias (per row of `plane` elements) and clamp to `out`, in place.
pub(crate) fn epilogue(out: &mut [f32], plane: usize, bias: Option<&[f32]>, clamp: Option<Clamp>) {
    if bias.is_none() && clamp.is_none() {
        return;
    }
    let apply = |(c, row): (usize, &mut [f32])| {
        let b = bias.map(|b| b[c % b.len()]).unwrap_or(0.0);
        match clamp {
            Some(Clamp { lo, hi }) => row.iter_mut().for_each(|v| *v = (*v + b).max(lo).min(hi)),
            None => row.iter_mut().for_each(|v| *v += b),
        }
    };
    if out.len() < 1 << 16 {
        out.chunks_mut(plane.max(1)).enumerate().for_each(apply);
    } else {
        super::par::for_each(out.chunks_mut(plane.max(1)).enumerate(), apply);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Clamp, GemmShape, KC, MR, MR512, NC, NR, PARALLEL_MIN, Packed};
    use crate::nn::kernels::act::{ERF_P, ERF_Q};
    use crate::nn::kernels::simd::{SharedOut, lanes16};
    use crate::nn::kernels::split::Split;

    /// Which tile kernel runs (the AVX-512 ones read `A` packed in [`MR512`]-row panels, the
    /// AVX2 one in [`MR`]-row panels).
    #[derive(Clone, Copy, Debug)]
    pub enum Kernel {
        /// 12 rows × 32 columns in 24 of AVX-512's 32 registers, reading B in place.
        Avx512,
        /// The same tile reading B packed into contiguous `depth × 32` strips, each unit packing
        /// its own columns per `KC` slice (see [`super::strided_rows_thrash`] for where that
        /// pays).
        Avx512Packed,
        /// 4 rows × 24 columns (twice per 8-row panel) in 12 of AVX2's 16 registers: 7 loads
        /// per 12 FMAs, the best ratio that leaves registers for `B` and the broadcast.
        Avx2,
    }

    impl Kernel {
        /// Whether the kernel applies GELU to its tiles (`gemm`'s `gelu`); the AVX2 one leaves
        /// it to the caller.
        pub fn fuses_gelu(self) -> bool {
            matches!(self, Kernel::Avx512 | Kernel::Avx512Packed)
        }

        /// Rows per panel of the packed `A` this kernel reads.
        pub fn panel_rows(self) -> usize {
            match self {
                Kernel::Avx512 | Kernel::Avx512Packed => MR512,
                Kernel::Avx2 => MR,
            }
        }
    }

    /// Columns of one AVX2 tile: three 8-lane registers.
    const NR2: usize = 24;

    /// One unit of work for the AVX-512 tiles: row panels `panels` of one image's `C`, over
    /// its columns `j0..j1`.
    struct Unit<'a> {
        /// `A` packed in [`MR512`]-row panels (`[panel][k][MR512]`).
        a: &'a [f32],
        /// The image's `B` (`k × n`).
        b: &'a [f32],
        /// Whether the unit reads B packed: each slice of `k` of its columns copied into
        /// 32-column strips (`[strip][slice][NR]`, zero past `n`) before its tiles run.
        pack_b: bool,
        /// The image's `C` (`m × n`).
        c: *mut f32,
        /// `bias` padded to whole panels.
        bias: &'a [f32],
        clamp: Option<Clamp>,
        /// GELU after the clamp.
        gelu: bool,
        m: usize,
        n: usize,
        k: usize,
        panels: std::ops::Range<usize>,
        j0: usize,
        j1: usize,
    }

    /// # Safety
    /// `dst` must be valid for writes of `batch·m·n` floats (it need not be initialised) and
    /// not alias `b`; `b` must be the operand `shape` was checked against; the CPU must have
    /// `kernel`'s features (AVX-512F, or AVX2 and FMA). `packed` must be `shape`'s `m×k` in
    /// `kernel`'s panel rows (asserted: a mismatch is a bug, and every read of it is checked).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        kernel: Kernel,
        shape: &GemmShape,
        packed: &Packed,
        b: &[f32],
        dst: *mut f32,
        bias: Option<&[f32]>,
        clamp: Option<Clamp>,
        gelu: bool,
    ) {
        let &GemmShape { batch, m, n, k } = shape;
        let mr = kernel.panel_rows();
        assert!(
            packed.mr == mr && packed.m == m && packed.k == k,
            "sgemm: A packed as {}x{} in panels of {} for a {m}x{k} product in panels of {mr}",
            packed.m,
            packed.k,
            packed.mr
        );
        let (tiles, packed) = (m.div_ceil(mr), &packed.data);
        let mut bias_padded = vec![0f32; tiles * mr];
        if let Some(bias) = bias {
            bias_padded[..m].copy_from_slice(&bias[..m]);
        }
        let big = batch * m * n * k >= PARALLEL_MIN;
        if n <= NT {
            // SAFETY: forwarded from this function's contract; `packed` is m×k in the kernel's
            // panels (asserted above) and `bias_padded` has a value for each of their rows.
            unsafe { narrow(kernel, shape, packed, b, dst, &bias_padded, (clamp, gelu), big) };
            return;
        }
        let width = match kernel {
            Kernel::Avx512 | Kernel::Avx512Packed => NR,
            Kernel::Avx2 => NR2,
        };
        // Units of (image, columns, row panels), shared out so that the threads finish
        // together (`split`); run serially, each image's columns in as few ranges as L2 takes.
        let threads = if big { rayon::current_num_threads() } else { 1 };
        let copies_b = matches!(kernel, Kernel::Avx512Packed | Kernel::Avx2);
        let split = crate::nn::kernels::split::Split::choose(batch, [m, n], [mr, width], threads, copies_b);
        let out = SharedOut(dst);
        let unit = |u: usize| {
            let (img, cols, panels) = split.unit(u);
            let (b, out_at) = (&b[img * k * n..(img + 1) * k * n], img * m * n);
            let (j0, j1) = (cols.start, cols.end);
            if let Kernel::Avx512 | Kernel::Avx512Packed = kernel {
                let pack_b = matches!(kernel, Kernel::Avx512Packed);
                let c = out.at(out_at);
                let unit = Unit { a: packed, b, pack_b, c, bias: &bias_padded, clamp, gelu, m, n, k, panels, j0, j1 };
                // SAFETY: the CPU has AVX-512F (the caller's contract); `packed` is m×k in
                // MR512-row panels, `bias_padded` covers them, `b` is this image's k×n and
                // `out_at` its m×n in dst; this unit alone writes its panels' rows at columns
                // j0..j1 (each (image, chunk, group) is one unit).
                unsafe { unit512(&unit) };
                return;
            }
            // The AVX2 kernel reads B's strip packed (k × width, zero-padded), once per chunk
            // for every tile of the group.
            let mut strip = vec![0f32; k * width];
            let mut j = j0;
            while j < j1 {
                let cols = width.min(j1 - j);
                for (p, dst) in strip.chunks_exact_mut(width).enumerate() {
                    dst[..cols].copy_from_slice(&b[p * n + j..p * n + j + cols]);
                    dst[cols..].fill(0.0);
                }
                for t in panels.clone() {
                    let rows = MR.min(m - t * MR);
                    let panel = &packed[t * k * MR..(t + 1) * k * MR];
                    let bias = &bias_padded[t * MR..(t + 1) * MR];
                    let c = out.at(out_at + t * MR * n + j);
                    // SAFETY: the CPU has AVX2 and FMA (the caller's contract); the panel holds
                    // k*MR values, the strip k*NR2 (filled just above); the tile's rows
                    // t*MR..+rows and columns j..j+cols lie inside the image's dst (m×n), and
                    // no other unit writes them.
                    unsafe { tile_avx2(k, panel, &strip, c, n, rows, cols, bias, clamp) };
                }
                j += width;
            }
        };
        let units = split.units();
        if !big {
            (0..units).for_each(unit);
        } else {
            crate::nn::kernels::par::for_each(0..units, unit);
        }
    }

    /// `x · Φ(x)` on 16 lanes: the same operations, in the same order, as [`act::erf`]'s GELU
    /// (`act::activate(.., Act::Gelu)`), so fused and separate results agree to the bit. NaN
    /// stays NaN (the clamp keeps it).
    ///
    /// [`act::erf`]: super::act::erf
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gelu512(v: __m512) -> __m512 {
        let s = _mm512_set1_ps;
        let x = _mm512_mul_ps(v, s(std::f32::consts::FRAC_1_SQRT_2));
        // Constant first: max/min return their second operand when either is NaN.
        let x = _mm512_min_ps(s(4.0), _mm512_max_ps(s(-4.0), x));
        let x2 = _mm512_mul_ps(x, x);
        let horner = |c: &[f32]| c[1..].iter().fold(s(c[0]), |acc, &c| _mm512_fmadd_ps(x2, acc, s(c)));
        let (p, q) = (horner(&ERF_P), horner(&ERF_Q));
        let erf = _mm512_div_ps(_mm512_mul_ps(x, p), q);
        _mm512_mul_ps(_mm512_mul_ps(s(0.5), v), _mm512_add_ps(s(1.0), erf))
    }

    /// GELU on `rows` rows of `cols` floats at `c` (row stride `ldc`), in place: a tile just
    /// stored, still in L1. Kept out of the tile kernels, whose accumulators it would push out of
    /// registers (inlined there, it halved the tile's rate).
    ///
    /// # Safety
    /// AVX-512F must be available; `c` must be readable and writable for `rows` rows of `cols`
    /// floats with row stride `ldc`.
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    unsafe fn gelu_rows(c: *mut f32, rows: usize, cols: usize, ldc: usize) {
        for r in 0..rows {
            let mut j = 0;
            while j < cols {
                let mask = lanes16(cols - j);
                // SAFETY: row r < rows, columns j.. masked to those below cols (the contract).
                unsafe {
                    let at = c.add(r * ldc + j);
                    _mm512_mask_storeu_ps(at, mask, gelu512(_mm512_maskz_loadu_ps(mask, at)));
                }
                j += 16;
            }
        }
    }

    /// Most columns of C that [`narrow512`] takes: up to 8 (a short sentence's tokens), its
    /// 12 rows per register beat the tile's columns per register. Measured on a pool worker
    /// (Xeon, AVX-512, 2 threads), narrow against the tile, µs: MiniLM's qkv at 8 tokens
    /// (1152x8x384) 64 against 94; ffn1 (1536x8x384) 88 against 126; ffn2 (384x8x1536) 82
    /// against 134; at 4 tokens 58 against 134.
    pub const NT: usize = super::TURNED_MAX;

    /// `C = clamp(A·B + bias)` for `n ≤ NT` columns, turned around: each register holds 12
    /// rows of one column of `C` (a panel's step of A is one masked load), B's values are
    /// broadcast, and a group of panels keeps all of `k` in registers. Per step that is
    /// `P·n` FMAs on 12 of 16 lanes for `P + n` loads, where the tile would run 12 FMAs on
    /// `n` of 16 lanes for 13 loads: at 8 tokens, 1.6× the useful work per FMA, and A (which
    /// a short sentence's product streams from L3) goes by at up to twice the rate.
    ///
    /// With AVX2 the same runs on 8-row panels ([`columns_avx2`]), an 8-lane register per
    /// panel step, with fewer panels per group (16 registers).
    ///
    /// # Safety
    /// The CPU must have `kernel`'s features; `b` must be the operand `shape` was checked
    /// against, `dst` writable for `batch·m·n` floats and not alias `b`; `packed` must be
    /// `shape`'s `m×k` in `kernel`'s panels, `bias` one value per row of those panels. GELU
    /// (`gelu`) is applied here only with AVX-512 ([`Kernel::fuses_gelu`]).
    #[allow(clippy::too_many_arguments)]
    unsafe fn narrow(
        kernel: Kernel,
        shape: &GemmShape,
        packed: &[f32],
        b: &[f32],
        dst: *mut f32,
        bias: &[f32],
        (clamp, gelu): (Option<Clamp>, bool),
        big: bool,
    ) {
        let &GemmShape { batch, m, n, k } = shape;
        let mr = kernel.panel_rows();
        let panels = m.div_ceil(mr);
        // Panels per group: what the kernel for this `n` takes at once.
        let (group, many) = column_kernel(kernel, n, true);
        let (_, one) = column_kernel(kernel, n, false);
        // About sixteen units per thread, each a whole number of groups: a unit only streams
        // its panels past B's few columns, so small units cost nothing, and with four per
        // thread a classifier's 21 groups ran as 7 units, 4 on one thread and 3 on the other
        // (EfficientNet's 1280→1000 at batch 1, `EIR_ONNX_PROFILE=nodes`: 0.14–0.17 → 0.09–0.13
        // ms; ONNX Runtime 0.10).
        let want = 16 * rayon::current_num_threads();
        let per = panels.div_ceil(want.div_ceil(batch)).next_multiple_of(group);
        let units = panels.div_ceil(per);
        let out = SharedOut(dst);
        let unit = |u: usize| {
            let (img, first) = (u / units, (u % units) * per);
            let b = &b[img * k * n..(img + 1) * k * n];
            let mut t = first;
            while t < panels.min(first + per) {
                let (p, kernel_p) = if t + group <= panels { (group, many) } else { (1, one) };
                let job = Columns {
                    k,
                    a: &packed[t * k * mr..(t + p) * k * mr],
                    b,
                    c: out.at(img * m * n + t * mr * n),
                    ldc: n,
                    rows: (m - t * mr).min(p * mr),
                    bias: &bias[t * mr..(t + p) * mr],
                    clamp,
                };
                // SAFETY: the CPU has the kernel's features (the contract); `kernel_p` takes
                // `p` panels (`column_kernel`) and `n` columns; the group's panels hold k×mr
                // values each, B's image k×n, the bias p·mr; rows t·mr.. of this image's C (up
                // to m) are this unit's alone, and `n` is its row stride. GELU (AVX-512 only,
                // as `fuses_gelu` says) reads and writes those same `job.rows` rows of n
                // floats, just written.
                unsafe {
                    kernel_p(&job);
                    if gelu && kernel.fuses_gelu() {
                        gelu_rows(job.c, job.rows, n, n);
                    }
                }
                t += p;
            }
        };
        if big {
            crate::nn::kernels::par::for_each(0..batch * units, unit);
        } else {
            (0..batch * units).for_each(unit);
        }
    }

    /// A column kernel: `P` panels × `N` columns of C (see [`columns`]).
    type ColumnsFn = unsafe fn(&Columns<'_>);

    /// The column kernel for `n` (1..=[`NT`]) columns on `kernel`'s CPU and the panels it
    /// takes at once: with `many`, as many as leave registers for A's loads and B's broadcast
    /// (AVX-512: `P·n ≤ 24`, at most 4; AVX2: `P·(n + 1) < 16`), else one.
    fn column_kernel(kernel: Kernel, n: usize, many: bool) -> (usize, ColumnsFn) {
        match (kernel, many) {
            (Kernel::Avx2, true) => match n {
                1 => (4, columns_avx2::<1, 4>),
                2 => (4, columns_avx2::<2, 4>),
                3 => (3, columns_avx2::<3, 3>),
                4 => (3, columns_avx2::<4, 3>),
                5 => (2, columns_avx2::<5, 2>),
                6 => (2, columns_avx2::<6, 2>),
                _ => column_kernel(kernel, n, false),
            },
            (Kernel::Avx2, false) => match n {
                1 => (1, columns_avx2::<1, 1>),
                2 => (1, columns_avx2::<2, 1>),
                3 => (1, columns_avx2::<3, 1>),
                4 => (1, columns_avx2::<4, 1>),
                5 => (1, columns_avx2::<5, 1>),
                6 => (1, columns_avx2::<6, 1>),
                7 => (1, columns_avx2::<7, 1>),
                _ => (1, columns_avx2::<8, 1>),
            },
            (_, true) => match n {
                1 => (4, columns::<1, 4>),
                2 => (4, columns::<2, 4>),
                3 => (4, columns::<3, 4>),
                4 => (4, columns::<4, 4>),
                5 => (4, columns::<5, 4>),
                6 => (4, columns::<6, 4>),
                7 => (3, columns::<7, 3>),
                _ => (3, columns::<8, 3>),
            },
            (_, false) => match n {
                1 => (1, columns::<1, 1>),
                2 => (1, columns::<2, 1>),
                3 => (1, columns::<3, 1>),
                4 => (1, columns::<4, 1>),
                5 => (1, columns::<5, 1>),
                6 => (1, columns::<6, 1>),
                7 => (1, columns::<7, 1>),
                _ => (1, columns::<8, 1>),
            },
        }
    }

    /// [`columns`] with AVX2 + FMA on 8-row panels: `P` panels × `N` columns, each one 8-lane
    /// register over all of `k` (a panel's step of A is one load), then bias and clamp, and
    /// written row by row (AVX2 has no scatter).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `N == t.ldc`, `P·(N + 1) < 16`; `t.a` must hold
    /// `P·t.k·MR` values, `t.b` `t.k·N` and `t.bias` `P·MR`; `t.c` must be writable for
    /// `t.rows` (≤ `P·MR`) rows of `N` floats.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn columns_avx2<const N: usize, const P: usize>(t: &Columns<'_>) {
        assert!(
            t.ldc == N && t.b.len() >= t.k * N && t.a.len() >= P * t.k * MR && t.bias.len() >= P * MR,
            "sgemm: narrow operands do not match"
        );
        let mut acc = [[_mm256_setzero_ps(); N]; P];
        let stride = t.k * MR;
        let (mut ap, mut bp) = (t.a.as_ptr(), t.b.as_ptr());
        for _ in 0..t.k {
            let mut av = [_mm256_setzero_ps(); P];
            for q in 0..P {
                // SAFETY: panel q's step p (`ap` = a + p·MR, p < k): its 8 values.
                av[q] = unsafe { _mm256_loadu_ps(ap.add(q * stride)) };
                _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(q * stride + 16 * MR).cast::<i8>());
            }
            for j in 0..N {
                // SAFETY: row p of B (`bp` = b + p·N, p < k), column j < N.
                let bv = _mm256_set1_ps(unsafe { *bp.add(j) });
                for q in 0..P {
                    acc[q][j] = _mm256_fmadd_ps(av[q], bv, acc[q][j]);
                }
            }
            ap = ap.wrapping_add(MR);
            bp = bp.wrapping_add(N);
        }
        for q in 0..P {
            let live = t.rows.saturating_sub(q * MR).min(MR);
            if live == 0 {
                break;
            }
            let bias = &t.bias[q * MR..(q + 1) * MR];
            for j in 0..N {
                let mut lanes = [0f32; MR];
                // SAFETY: `lanes` holds MR = 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[q][j]) };
                for (r, (&v, &b)) in lanes.iter().zip(bias).take(live).enumerate() {
                    let mut x = v + b;
                    if let Some(Clamp { lo, hi }) = t.clamp {
                        x = x.max(lo).min(hi);
                    }
                    // SAFETY: row q·8 + r < t.rows, column j < N: inside C.
                    unsafe { *t.c.add((q * MR + r) * N + j) = x };
                }
            }
        }
    }

    /// One group of panels for [`columns`]: `rows` rows of C (the group's panels, the last
    /// maybe partial) at `c` (row stride `ldc`, which is also the number of columns).
    struct Columns<'a> {
        k: usize,
        /// The group's panels, `[panel][k][MR512]`.
        a: &'a [f32],
        /// The image's B, `k × ldc`.
        b: &'a [f32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        /// One value per row of the group's panels.
        bias: &'a [f32],
        clamp: Option<Clamp>,
    }

    /// `P` panels × `N` columns of C, each (panel, column) one register of 12 rows over all of
    /// `k`, then bias and clamp, and scattered into C's rows.
    ///
    /// # Safety
    /// AVX-512F must be available; `N == t.ldc`; `t.a` must hold `P·t.k·MR512` values, `t.b`
    /// `t.k·N` and `t.bias` `P·MR512`; `t.c` must be writable for `t.rows` (≤ `P·MR512`) rows
    /// of `N` floats.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn columns<const N: usize, const P: usize>(t: &Columns<'_>) {
        const PANEL: __mmask16 = (1 << MR512) - 1;
        assert!(
            t.ldc == N && t.b.len() >= t.k * N && t.a.len() >= P * t.k * MR512 && t.bias.len() >= P * MR512,
            "sgemm: narrow operands do not match"
        );
        let mut acc = [[_mm512_setzero_ps(); N]; P];
        let stride = t.k * MR512;
        let (mut ap, mut bp) = (t.a.as_ptr(), t.b.as_ptr());
        for _ in 0..t.k {
            let mut av = [_mm512_setzero_ps(); P];
            for q in 0..P {
                // SAFETY: panel q's step p (`ap` = a + p·MR512, p < k): 12 values, masked.
                av[q] = unsafe { _mm512_maskz_loadu_ps(PANEL, ap.add(q * stride)) };
                // Each panel is its own stream from L3 (see `tile` on why A is prefetched).
                // With one column, a step is a load and a multiply-add per panel, and the near
                // prefetch only took load slots: EfficientNet's 1280→1000 classifier at batch
                // 1, 0.042–0.054 → 0.039–0.045 ms and 0.040–0.043 → 0.038–0.041 ms in two
                // series of three alternating runs (`EIR_ONNX_PROFILE=nodes`). At 8 columns (a
                // short sentence) it pays: MiniLM's one-sentence pass ran 3–15% slower without.
                if N > 1 {
                    _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(q * stride + 16 * MR512).cast::<i8>());
                }
                _mm_prefetch::<_MM_HINT_T1>(ap.wrapping_add(q * stride + super::AHEAD * MR512).cast::<i8>());
            }
            for j in 0..N {
                // SAFETY: row p of B (`bp` = b + p·N, p < k), column j < N.
                let bv = _mm512_set1_ps(unsafe { *bp.add(j) });
                for q in 0..P {
                    acc[q][j] = _mm512_fmadd_ps(av[q], bv, acc[q][j]);
                }
            }
            ap = ap.wrapping_add(MR512);
            bp = bp.wrapping_add(N);
        }
        // Row r of a register goes to C's row r, `N` floats apart.
        let rows = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(N as i32),
        );
        for q in 0..P {
            let live = t.rows.saturating_sub(q * MR512).min(MR512);
            if live == 0 {
                break;
            }
            let mask = lanes16(live);
            // SAFETY: 12 bias values of panel q (masked).
            let bias = unsafe { _mm512_maskz_loadu_ps(PANEL, t.bias.as_ptr().add(q * MR512)) };
            for j in 0..N {
                let mut x = _mm512_add_ps(acc[q][j], bias);
                if let Some(Clamp { lo, hi }) = t.clamp {
                    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
                }
                // SAFETY: rows q·12 + r for r < live (≤ t.rows), column j < N: inside C.
                unsafe { _mm512_mask_i32scatter_ps::<4>(t.c.add(q * MR512 * N + j).cast(), mask, rows, x) };
            }
        }
    }

    thread_local! {
        /// [`unit512`]'s packed strips of B, reused by every unit this thread runs.
        static STRIPS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }

    /// Runs one unit's tiles: for each `KC`-deep slice of `k`, each row panel (whose slice of A
    /// then stays in L1) against each 32-column strip of B (streamed from L2, in place or
    /// packed). The first slice writes `C`, later ones add to it, and the last applies bias and
    /// clamp.
    ///
    /// # Safety
    /// AVX-512F must be available; `u.a` must hold `u.m`×`u.k` packed in [`MR512`]-row panels,
    /// `u.bias` one value per row of those panels, `u.b` `u.k`×`u.n` floats; `u.c` must be
    /// writable for `u.m`×`u.n` floats (row stride `u.n`), of which no other thread touches
    /// `u.panels`' rows at columns `u.j0..u.j1` (≤ `u.n`, `u.j0` a multiple of 32).
    #[target_feature(enable = "avx512f")]
    unsafe fn unit512(u: &Unit<'_>) {
        let &Unit { a, b, pack_b, c, bias, clamp, gelu, m, n, k, j0, j1, .. } = u;
        let slices = k.div_ceil(KC).max(1);
        let kc = k.div_ceil(slices);
        let strips = (j1 - j0).div_ceil(NR);
        // The last strip's columns past a whole register (all of them, if they are few) that
        // run turned around, for all of the unit's panels at once (`tail`).
        let tail = match (j1 - j0) - (strips - 1) * NR {
            c if c <= TAIL => c,
            c if c > 16 && c - 16 <= TAIL => c - 16,
            _ => 0,
        };
        // The strips of B this unit packs, one slice at a time: at most NC columns by KC rows
        // (384 KiB), kept per thread so no unit allocates. Taken out of the thread-local while
        // in use, so a nested use could never see it borrowed.
        let mut local = if pack_b { STRIPS.with(|s| s.take()) } else { Vec::new() };
        if pack_b {
            local.resize(strips * kc * NR, 0.0);
        }
        for s in 0..slices {
            let p0 = s * kc;
            let depth = kc.min(k - p0);
            let (first, last) = (s == 0, s + 1 == slices);
            if pack_b {
                // Row by row of B (one contiguous read of the unit's columns each), into the
                // strips: B's strided rows are read once per slice, not once per panel, and
                // the copy stays in this core's cache for the panels that read it.
                for p in 0..depth {
                    let row = &b[(p0 + p) * n..][j0..j1];
                    for (i, src) in row.chunks(NR).enumerate() {
                        let dst = &mut local[(i * depth + p) * NR..][..NR];
                        dst[..src.len()].copy_from_slice(src);
                        dst[src.len()..].fill(0.0);
                    }
                }
            }
            for t in u.panels.clone() {
                let rows = MR512.min(m - t * MR512);
                let panel = &a[(t * k + p0) * MR512..(t * k + p0 + depth) * MR512];
                let bias = &bias[t * MR512..(t + 1) * MR512];
                for i in 0..strips {
                    let j = j0 + i * NR;
                    let cols = NR.min(j1 - j) - if i + 1 == strips { tail } else { 0 };
                    if cols == 0 {
                        continue;
                    }
                    let (bp, ldb) =
                        if pack_b { (local[i * depth * NR..].as_ptr(), NR) } else { (b[p0 * n + j..].as_ptr(), n) };
                    let c = c.wrapping_add(t * MR512 * n + j);
                    let job = Tile { k: depth, a: panel, b: bp, ldb, c, ldc: n, rows, cols, bias, clamp, first, last };
                    // SAFETY: AVX-512F is available (the contract); the panel holds depth×MR512
                    // values; B's strip holds `depth` rows of `cols` columns at stride `ldb`
                    // (packed: this unit's strip i, `depth` rows at stride NR, packed above for
                    // this slice; in place: B from row p0, column j, with j + cols ≤ n); the
                    // tile's rows and columns lie inside C and belong to this unit. GELU reads
                    // and writes the same rows × cols at stride n, which the tile has just
                    // written (last slice).
                    unsafe {
                        match (rows, cols) {
                            (..=4, ..=16) => tile::<4, 1>(&job),
                            (..=4, _) => tile::<4, 2>(&job),
                            (..=8, ..=16) => tile::<8, 1>(&job),
                            (..=8, _) => tile::<8, 2>(&job),
                            (_, ..=16) => tile::<MR512, 1>(&job),
                            _ => tile::<MR512, 2>(&job),
                        }
                        if gelu && last {
                            gelu_rows(c, rows, cols, n);
                        }
                    }
                }
            }
            if tail > 0 {
                let jt = j1 - tail;
                let (bp, ldb) = if pack_b {
                    (local[(strips - 1) * depth * NR + (jt - j0 - (strips - 1) * NR)..].as_ptr(), NR)
                } else {
                    (b[p0 * n + jt..].as_ptr(), n)
                };
                let mut t = u.panels.start;
                while t < u.panels.end {
                    let (p, kernel) = tail_kernel(tail, u.panels.end - t);
                    let rows = (m - t * MR512).min(p * MR512);
                    let c = c.wrapping_add(t * MR512 * n + jt);
                    let job = Tail {
                        k: depth,
                        a: &a[(t * k + p0) * MR512..],
                        stride: k * MR512,
                        b: bp,
                        ldb,
                        c,
                        ldc: n,
                        rows,
                        bias: &bias[t * MR512..(t + p) * MR512],
                        clamp,
                        first,
                        last,
                    };
                    // SAFETY: AVX-512F is available (the contract); `kernel` takes `p` panels
                    // (`tail_kernel`, p ≤ the unit's panels left) of `tail` columns: panels
                    // t..t+p hold k×MR512 values each from `a[t·k·MR512..]`, and this slice's
                    // `depth` steps from p0 lie inside them; B's columns jt..j1 are inside its
                    // strip for `depth` rows at stride `ldb` (packed: the last strip, packed
                    // above for this slice; in place: from row p0, with j1 ≤ n); the rows
                    // t·MR512.. (up to m) at columns jt..j1 of C are this unit's alone, and
                    // GELU rewrites only those, just written.
                    unsafe {
                        kernel(&job);
                        if gelu && last {
                            gelu_rows(c, rows, tail, n);
                        }
                    }
                    t += p;
                }
            }
        }
        if pack_b {
            STRIPS.with(|s| s.replace(local));
        }
    }

    /// Most columns [`tail`] takes: a 12×16 tile spends 12 FMAs per step of `k` on them
    /// whatever their number, the turned-around kernel one per column per panel, for up to
    /// four panels at once (so the FMA chains hide each other's latency). A 7x7 plane's 49
    /// columns are a 32-column strip, a 16-column one and one column that way, where the
    /// strips alone ran 64 (EfficientNet's 7x7 products, 1152x49x192 and 192x49x1152, ran
    /// 1.2x faster; `sgemm::timing`).
    const TAIL: usize = 8;

    /// One slice of `k` for the last `N` (≤ [`TAIL`]) columns of a unit's strip, for `P`
    /// panels: `rows` rows of C at `c` (row stride `ldc`), the panels `stride` floats apart in
    /// `a` (each from this slice's first step).
    struct Tail<'a> {
        k: usize,
        a: &'a [f32],
        stride: usize,
        /// Row 0 of the columns in B (row stride `ldb`).
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        /// One value per row of the panels.
        bias: &'a [f32],
        clamp: Option<Clamp>,
        /// As [`Tile`]'s: C is written on the first slice, added to after it, and gets bias and
        /// clamp on the last.
        first: bool,
        last: bool,
    }

    /// The [`tail`] kernel for `n` (1..=[`TAIL`]) columns and the panels it takes, given
    /// `left` (at least 1) panels: as many as leave registers for A's loads and B's broadcast
    /// (`P·n ≤ 24`, at most 4) where that many are left, else one.
    fn tail_kernel(n: usize, left: usize) -> (usize, unsafe fn(&Tail<'_>)) {
        let many = left >= if n <= 6 { 4 } else { 3 };
        match (n, many) {
            (1, true) => (4, tail::<1, 4>),
            (2, true) => (4, tail::<2, 4>),
            (3, true) => (4, tail::<3, 4>),
            (4, true) => (4, tail::<4, 4>),
            (5, true) => (4, tail::<5, 4>),
            (6, true) => (4, tail::<6, 4>),
            (7, true) => (3, tail::<7, 3>),
            (_, true) => (3, tail::<8, 3>),
            (1, false) => (1, tail::<1, 1>),
            (2, false) => (1, tail::<2, 1>),
            (3, false) => (1, tail::<3, 1>),
            (4, false) => (1, tail::<4, 1>),
            (5, false) => (1, tail::<5, 1>),
            (6, false) => (1, tail::<6, 1>),
            (7, false) => (1, tail::<7, 1>),
            (_, false) => (1, tail::<8, 1>),
        }
    }

    /// `N` columns × `P` panels of C for one slice of `k`, turned around: each (panel, column)
    /// one register of 12 rows, a panel's step of A one masked load, B's values broadcast.
    /// Every element takes the same operations in the same order as in [`tile`] (products
    /// added from zero along the slice, then C's partial sum, then bias and clamp), so a
    /// column's values do not depend on which kernel ran it.
    ///
    /// # Safety
    /// AVX-512F must be available; `N ≤ TAIL`; `t.b` must be readable for `t.k` rows of `N`
    /// floats at stride `t.ldb`, and `t.c` readable and writable for `t.rows` rows of `N`
    /// floats at stride `t.ldc` (initialised unless `t.first`). The operands' lengths are
    /// asserted.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tail<const N: usize, const P: usize>(t: &Tail<'_>) {
        const PANEL: __mmask16 = (1 << MR512) - 1;
        assert!(
            t.rows <= P * MR512
                && t.bias.len() >= P * MR512
                && t.a.len() >= (P - 1) * t.stride + t.k * MR512
                && t.stride >= t.k * MR512,
            "sgemm: tail operands do not match"
        );
        let mut acc = [[_mm512_setzero_ps(); N]; P];
        let (mut ap, mut brow) = (t.a.as_ptr(), t.b);
        for _ in 0..t.k {
            let mut av = [_mm512_setzero_ps(); P];
            for q in 0..P {
                // SAFETY: panel q's step p (`ap` = a + p·MR512, p < k, within the asserted
                // length): 12 values, masked.
                av[q] = unsafe { _mm512_maskz_loadu_ps(PANEL, ap.add(q * t.stride)) };
                _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(q * t.stride + 16 * MR512).cast::<i8>());
                _mm_prefetch::<_MM_HINT_T1>(ap.wrapping_add(q * t.stride + super::AHEAD * MR512).cast::<i8>());
            }
            for j in 0..N {
                // SAFETY: row p of B's columns (`brow` = b + p·ldb, p < k), column j < N.
                let bv = _mm512_set1_ps(unsafe { *brow.add(j) });
                for q in 0..P {
                    acc[q][j] = _mm512_fmadd_ps(av[q], bv, acc[q][j]);
                }
            }
            ap = ap.wrapping_add(MR512);
            brow = brow.wrapping_add(t.ldb);
        }
        for q in 0..P {
            let live = t.rows.saturating_sub(q * MR512).min(MR512);
            if live == 0 {
                break;
            }
            // SAFETY: 12 bias values of panel q (asserted length), masked.
            let bias = unsafe { _mm512_maskz_loadu_ps(PANEL, t.bias.as_ptr().add(q * MR512)) };
            for j in 0..N {
                // Column j of the panel's rows: row r at `col + r·ldc`, r < live.
                let col = t.c.wrapping_add(q * MR512 * t.ldc + j);
                let mut x = acc[q][j];
                let mut lanes = [0f32; 16];
                if !t.first {
                    for (r, v) in lanes.iter_mut().enumerate().take(live) {
                        // SAFETY: row q·12 + r < rows, column j < N: inside C, initialised.
                        *v = unsafe { *col.add(r * t.ldc) };
                    }
                    // SAFETY: `lanes` holds 16 floats.
                    x = _mm512_add_ps(x, unsafe { _mm512_loadu_ps(lanes.as_ptr()) });
                }
                if t.last {
                    x = _mm512_add_ps(x, bias);
                    if let Some(Clamp { lo, hi }) = t.clamp {
                        x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
                    }
                }
                // SAFETY: `lanes` holds 16 floats.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), x) };
                for (r, &v) in lanes.iter().enumerate().take(live) {
                    // SAFETY: as above.
                    unsafe { *col.add(r * t.ldc) = v };
                }
            }
        }
    }

    /// `Σ a[i]·b[i]` in two 16-lane accumulators, the tail masked.
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            // SAFETY: elements i..i+32 of both slices exist.
            unsafe {
                s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
                s1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), _mm512_loadu_ps(pb.add(i + 16)), s1);
            }
            i += 32;
        }
        while i < n {
            let left = (n - i).min(16);
            let mask = lanes16(left);
            // SAFETY: masked to the `left` elements that exist from i on.
            unsafe {
                let (x, y) = (_mm512_maskz_loadu_ps(mask, pa.add(i)), _mm512_maskz_loadu_ps(mask, pb.add(i)));
                s0 = _mm512_fmadd_ps(x, y, s0);
            }
            i += left;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
    }

    /// One AVX-512 tile's operands: `rows` (≤ the kernel's `R`) × `cols` (≤ 16·`V`) of C
    /// over a slice of `k` values of the reduction.
    struct Tile<'a> {
        k: usize,
        /// A's panel for this slice, `[k][MR512]`.
        a: &'a [f32],
        /// Row 0 of B's strip (row stride `ldb`).
        b: *const f32,
        ldb: usize,
        /// The tile's corner in C (row stride `ldc`).
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        /// One value per row of the panel.
        bias: &'a [f32],
        clamp: Option<Clamp>,
        /// Whether this is the first slice of `k` (C is written, not added to).
        first: bool,
        /// Whether this is the last slice (bias and clamp are applied).
        last: bool,
    }

    /// An `R × cols` tile of C (`cols ≤ 16·V`): the slice of `k` in `R·V` registers, then added
    /// to C unless `first`, bias and clamp applied if `last`, and stored (once per slice).
    ///
    /// # Safety
    /// AVX-512F must be available; `R ≤ MR512` and `t.rows ≤ R`, `t.cols ≤ 16·V`; `t.a` must
    /// hold `t.k × MR512` values and `t.bias` `MR512`; `t.b` must be readable for `t.k` rows of
    /// `t.cols` columns with row stride `t.ldb`, and `t.c` readable and writable for `t.rows`
    /// rows of `t.cols` columns with row stride `t.ldc` (initialised unless `t.first`).
    // The epilogue indexes the accumulators by loop counter on purpose (see there).
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize, const V: usize>(t: &Tile<'_>) {
        let masks: [__mmask16; V] = std::array::from_fn(|v| lanes16(t.cols.saturating_sub(16 * v)));
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        // Pointers walk B's rows and the panel (no index arithmetic, which overflow checks
        // would test on every step of the hottest loop).
        let (mut brow, mut ap) = (t.b, t.a.as_ptr());
        let ahead_by = if t.ldb >= 256 { 8 * t.ldb } else { 0 };
        for _ in 0..t.k {
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, bv) in bv.iter_mut().enumerate() {
                // SAFETY: row p of B's strip (`brow` = b + p·ldb, p < k), masked to its columns.
                *bv = unsafe { _mm512_maskz_loadu_ps(masks[v], brow.add(16 * v)) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `ap` = a + p·MR512 and r < R ≤ MR512: inside the panel's k×MR512.
                let av = _mm512_set1_ps(unsafe { *ap.add(r) });
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(av, bv, *acc);
                }
            }
            // A's panel streams from L3 or memory when B is narrow (a short sentence: every
            // weight is used by 8 columns only), faster than the hardware prefetcher fetches
            // it: ask for it 16 steps ahead into L1 and AHEAD steps ahead into L2. A prefetch
            // never faults, so running past the panel is harmless.
            _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(16 * MR512).cast::<i8>());
            _mm_prefetch::<_MM_HINT_T1>(ap.wrapping_add(super::AHEAD * MR512).cast::<i8>());
            // B's rows, read in place, lie a row of C apart: the hardware prefetchers do not
            // follow a stride across pages, so ask for the row 8 steps ahead (both of its
            // ends, which may be 3 lines apart). Packed strips and short rows need no help
            // (`ahead` is then the row just loaded).
            let ahead = brow.wrapping_add(ahead_by);
            _mm_prefetch::<_MM_HINT_T0>(ahead.cast::<i8>());
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16 * V - 1).cast::<i8>());
            brow = brow.wrapping_add(t.ldb);
            ap = ap.wrapping_add(MR512);
        }
        // Constant indices only (`r` and `v` unroll): an index the compiler cannot resolve
        // would keep the accumulators in memory, stored on every step of the loop above.
        let mut row = t.c;
        for r in 0..R {
            if r >= t.rows {
                break;
            }
            let bias = _mm512_set1_ps(t.bias[r]);
            for v in 0..V {
                let at = row.wrapping_add(16 * v);
                let mut x = acc[r][v];
                if !t.first {
                    // SAFETY: row r < rows of the tile, masked to its columns; an earlier slice
                    // wrote it.
                    x = _mm512_add_ps(x, unsafe { _mm512_maskz_loadu_ps(masks[v], at) });
                }
                if t.last {
                    x = _mm512_add_ps(x, bias);
                    if let Some(Clamp { lo, hi }) = t.clamp {
                        x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
                    }
                }
                // SAFETY: as above.
                unsafe { _mm512_mask_storeu_ps(at, masks[v], x) };
            }
            row = row.wrapping_add(t.ldc);
        }
    }

    /// `dst[m×n] = gelu?(A·B + bias[n])` for `A` read in place (`m×k`, row-major) and `B` in
    /// [`super::Strips`]: units of row panels × 32-column strips, in parallel where the product
    /// is large and `parallel` allows. Each unit walks `k` in slices; per slice, each panel of 12 rows of `A` (its
    /// slice stays in L1) meets each of the unit's strips (streamed from L2).
    ///
    /// # Safety
    /// AVX-512F must be available; `a` must be readable at the offset `rows` gives every value
    /// of an `m × k` A (`ARows::extent` floats); `strips` must hold
    /// `n.div_ceil(32)` strips of `k×32` floats; `dst` must be writable for `m·n` floats (it need
    /// not be initialised) and alias neither; `bias`, if given, holds `n` values.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_strips(
        [m, n, k]: [usize; 3],
        a: *const f32,
        rows: super::ARows,
        strips: &[f32],
        dst: *mut f32,
        (bias, clamp, gelu): (Option<&[f32]>, Option<Clamp>, bool),
        parallel: bool,
    ) {
        let panels = m.div_ceil(MR512);
        let strips_n = n.div_ceil(NR);
        assert!(strips.len() >= strips_n * k * NR, "sgemm: strips too short for {k}x{n}");
        assert!(bias.is_none_or(|b| b.len() >= n), "sgemm: bias too short for {n} columns");
        let (a, out) = (SharedIn(a), SharedOut(dst));
        let run = |tiles: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
            // SAFETY: forwarded from this function's contract; each unit alone writes rows
            // `tiles` (×12) at columns `cols` (×32) of dst (the units tile them exactly once).
            unsafe { strips_unit([m, n, k], (a.get(), rows), strips, out.at(0), (bias, clamp, gelu), tiles, cols) };
        };
        let parallel = parallel && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN;
        // Which operand a thread's run of neighbouring units shares: where all of A fits in a
        // core's L2 beside a chunk of strips, the same strips (each thread then takes its own
        // columns: MiniLM as ONNX at 1 x 128, four alternating rounds, 3-8% faster than row
        // groups); else the same rows of A, which would otherwise stream from L3 for every
        // unit (at 1,024 tokens column-first ran 10% slower).
        let chunk_major = m.saturating_mul(k) <= A_IN_L2;
        if parallel && chunk_major {
            // Units of equal cost by the tile kernels' model (`Split`, whose neighbouring units
            // share columns). Cut as below, a partial panel or a narrow chunk fell to one
            // thread while the other waited: a 7x7 block's 49 pixels ran as 3 + 2 panels of
            // 12, and the caller waited 10-12 µs of each 55 µs product (`kernels::par`'s
            // sections traced at two threads).
            let split = Split::choose(1, [m, n], [MR512, NR], rayon::current_num_threads(), false);
            crate::nn::kernels::par::for_each(0..split.units(), |u| {
                let (_, cols, tiles) = split.unit(u);
                run(tiles, cols.start / NR..cols.end.div_ceil(NR));
            });
            return;
        }
        // About four units per thread: chunks of up to 8 strips (256 columns, 384 KiB of a
        // slice in L2), then as many row groups as that leaves wanting.
        let want = 4 * rayon::current_num_threads();
        let per_chunk = strips_n.div_ceil(strips_n.div_ceil(NC / NR)).max(1);
        let chunks = strips_n.div_ceil(per_chunk);
        let per_group = panels.div_ceil(want.div_ceil(chunks)).max(1);
        let groups = panels.div_ceil(per_group);
        let unit = |u: usize| {
            let (chunk, g) = if chunk_major { (u / groups, u % groups) } else { (u % chunks, u / chunks) };
            let tiles = g * per_group..panels.min((g + 1) * per_group);
            let cols = chunk * per_chunk..strips_n.min((chunk + 1) * per_chunk);
            run(tiles, cols);
        };
        let units = groups * chunks;
        if parallel {
            crate::nn::kernels::par::for_each(0..units, unit);
        } else {
            (0..units).for_each(unit);
        }
    }

    /// Floats of A (256 Ki: 1 MiB, half a core's L2) up to which [`gemm_strips`]' units share
    /// out columns first.
    const A_IN_L2: usize = 1 << 18;

    /// A read-only pointer shared by the units of one product (they only read through it).
    #[derive(Clone, Copy)]
    struct SharedIn(*const f32);
    // SAFETY: only read through, while the caller of `gemm_strips` keeps it alive and unwritten.
    unsafe impl Send for SharedIn {}
    // SAFETY: as above.
    unsafe impl Sync for SharedIn {}

    impl SharedIn {
        /// The pointer (a method, so that closures capture the whole `Send` wrapper).
        fn get(self) -> *const f32 {
            self.0
        }
    }

    /// One unit of [`gemm_strips`]: row panels `tiles` against strips `cols`.
    ///
    /// # Safety
    /// As [`gemm_strips`], with `tiles` within `m.div_ceil(12)` and `cols` within
    /// `n.div_ceil(32)`: the unit reads and writes only those rows and columns of dst.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn strips_unit(
        [m, n, k]: [usize; 3],
        (a, layout): (*const f32, super::ARows),
        strips: &[f32],
        c: *mut f32,
        (bias, clamp, gelu): (Option<&[f32]>, Option<Clamp>, bool),
        tiles: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) {
        let (turned, lda) = match layout {
            super::ARows::Apart(lda) => (false, lda),
            super::ARows::Turned(ld) => (true, ld),
        };
        // The same slices of k as `unit512`, so each element is summed in the same order.
        let slices = k.div_ceil(KC).max(1);
        let kc = k.div_ceil(slices);
        for s in 0..slices {
            let p0 = s * kc;
            let depth = kc.min(k - p0);
            let (first, last) = (s == 0, s + 1 == slices);
            for t in tiles.clone() {
                let rows = MR512.min(m - t * MR512);
                for i in cols.clone() {
                    let j = i * NR;
                    let width = NR.min(n - j);
                    let job = RowTile {
                        k: depth,
                        a: a.wrapping_add(layout.at(t * MR512, p0)),
                        lda,
                        b: strips[(i * k + p0) * NR..][..depth * NR].as_ptr(),
                        c: c.wrapping_add(t * MR512 * n + j),
                        ldc: n,
                        cols: width,
                        bias: bias.map(|b| b[j..].as_ptr()),
                        clamp,
                        first,
                        last,
                    };
                    // SAFETY: AVX-512F is available (the contract); A's rows t·12..+rows and this
                    // slice's columns p0..p0+depth lie inside it at their `layout` offsets (the
                    // contract), which `tile_rows` reads as its `turned` says; the
                    // strip's slice was sliced just above (depth steps of 32); C's rows × columns
                    // j..j+width lie inside m×n and belong to this unit; the bias has n - j ≥
                    // width values from j. GELU rewrites only the tile just stored.
                    unsafe {
                        if turned {
                            tile_rows_of::<true>(rows, &job)
                        } else {
                            tile_rows_of::<false>(rows, &job)
                        }
                        if gelu && last {
                            gelu_rows(job.c, rows, width, n);
                        }
                    }
                }
            }
        }
    }

    /// [`tile_rows`] for a tile of `rows` (1 to 12) rows.
    ///
    /// # Safety
    /// As [`tile_rows`], for `rows` rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_rows_of<const TURNED: bool>(rows: usize, job: &RowTile) {
        // SAFETY: forwarded from this function's contract, each arm with its number of rows.
        unsafe {
            match rows {
                12 => tile_rows::<12, TURNED>(job),
                11 => tile_rows::<11, TURNED>(job),
                10 => tile_rows::<10, TURNED>(job),
                9 => tile_rows::<9, TURNED>(job),
                8 => tile_rows::<8, TURNED>(job),
                7 => tile_rows::<7, TURNED>(job),
                6 => tile_rows::<6, TURNED>(job),
                5 => tile_rows::<5, TURNED>(job),
                4 => tile_rows::<4, TURNED>(job),
                3 => tile_rows::<3, TURNED>(job),
                2 => tile_rows::<2, TURNED>(job),
                _ => tile_rows::<1, TURNED>(job),
            }
        }
    }

    /// One [`tile_rows`] job: `R` rows of `A` in place against one strip of `B`.
    struct RowTile {
        k: usize,
        /// Row 0 of the tile's rows of A, at this slice's first column.
        a: *const f32,
        /// How far apart A's rows lie, or (turned) its columns, which are then `R` contiguous
        /// values each.
        lda: usize,
        /// The strip at this slice's first step (`k` steps of 32 floats).
        b: *const f32,
        /// The tile's corner in C (row stride `ldc`).
        c: *mut f32,
        ldc: usize,
        /// Columns of C written (≤ 32; the strip is zero past them).
        cols: usize,
        /// The bias at the tile's first column (`cols` values), added with the last slice.
        bias: Option<*const f32>,
        /// Applied after the bias, with the last slice.
        clamp: Option<Clamp>,
        first: bool,
        last: bool,
    }

    /// An `R × cols` tile of C over a slice of `k`: each step broadcasts one value of each of
    /// `R` rows of A read in place and multiplies two registers of the strip, as [`tile`] does
    /// with A's packed panel (the same FMAs in the same order); then C is added unless
    /// `first`, and the bias (one value per column) if `last`. `TURNED`: A's step `p` holds the
    /// `R` rows' values side by side, `t.lda` floats after step `p - 1`'s.
    ///
    /// # Safety
    /// AVX-512F must be available; `t.a` must be readable for `R` rows (stride `t.lda`) of
    /// `t.k` floats, or (`TURNED`) for `t.k` steps (stride `t.lda`) of `R` floats; `t.b` for
    /// `t.k × 32` floats; `t.c` readable (unless `t.first`) and
    /// writable for `R` rows of `t.cols` (≤ 32) floats at stride `t.ldc`; `t.bias`, if given,
    /// for `t.cols` floats.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_rows<const R: usize, const TURNED: bool>(t: &RowTile) {
        let masks = [lanes16(t.cols), lanes16(t.cols.saturating_sub(16))];
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // Rows of A by pointer (the offsets r·lda are loop-invariant), each advanced one column
        // per step (turned, A's steps are read from `t.a` instead).
        let rows: [*const f32; R] = std::array::from_fn(|r| if TURNED { t.a } else { t.a.wrapping_add(r * t.lda) });
        let mut b = t.b;
        for p in 0..t.k {
            // SAFETY: step p < k of the strip: 32 floats at b + 32p.
            let bv = unsafe { [_mm512_loadu_ps(b), _mm512_loadu_ps(b.add(16))] };
            // The strip is a layer's weights: inside a model's pass they stream from memory
            // (see AHEAD), so ask for them ahead into L2, both lines of each step. A prefetch
            // never faults, so running past the strip is harmless.
            let ahead = b.wrapping_add(super::AHEAD * NR);
            _mm_prefetch::<_MM_HINT_T1>(ahead.cast::<i8>());
            _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(16).cast::<i8>());
            for r in 0..R {
                // SAFETY: row r < R of A at column p < k (the contract, by layout).
                let av = _mm512_set1_ps(unsafe { *if TURNED { t.a.add(p * t.lda + r) } else { rows[r].add(p) } });
                acc[r][0] = _mm512_fmadd_ps(av, bv[0], acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(av, bv[1], acc[r][1]);
            }
            b = b.wrapping_add(NR);
        }
        let bias: [__m512; 2] = match t.bias {
            // SAFETY: `cols` bias values from t.bias (the contract), masked to them.
            Some(bias) if t.last => unsafe {
                [_mm512_maskz_loadu_ps(masks[0], bias), _mm512_maskz_loadu_ps(masks[1], bias.wrapping_add(16))]
            },
            _ => [_mm512_setzero_ps(); 2],
        };
        let mut row = t.c;
        for r in 0..R {
            for v in 0..2 {
                let at = row.wrapping_add(16 * v);
                let mut x = acc[r][v];
                if !t.first {
                    // SAFETY: row r < R of the tile, masked to its columns; an earlier slice
                    // wrote it.
                    x = _mm512_add_ps(x, unsafe { _mm512_maskz_loadu_ps(masks[v], at) });
                }
                if t.last {
                    x = _mm512_add_ps(x, bias[v]);
                    if let Some(Clamp { lo, hi }) = t.clamp {
                        x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
                    }
                }
                // SAFETY: as above.
                unsafe { _mm512_mask_storeu_ps(at, masks[v], x) };
            }
            row = row.wrapping_add(t.ldc);
        }
    }

    /// One `MR × cols` tile of C (`cols ≤ 24`) with AVX2 + FMA, as two halves of 4 rows
    /// ([`half_avx2`]) that each keep the whole of `k` in up to 12 registers; a partial strip
    /// (a 7x7 plane's 49th column) runs only the registers it needs.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `panel` must hold `k*MR` values, `strip` `k*24` (B's
    /// strip, zero past `cols`) and `bias` `MR`; `c` must be writable for `rows` (≤ MR) rows of
    /// `cols` (1..=24) columns with row stride `ldc`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2(
        k: usize,
        panel: &[f32],
        strip: &[f32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        bias: &[f32],
        clamp: Option<Clamp>,
    ) {
        let half = match cols {
            0..=8 => half_avx2::<1>,
            9..=16 => half_avx2::<2>,
            _ => half_avx2::<3>,
        };
        // SAFETY: the contract above. The second half's panel view starts 4 values in (k*MR - 4
        // long, read at p*MR + r for r < 4), its bias 4 in, and its rows 4 rows down (taken
        // only when the tile has them); V registers cover `cols`.
        unsafe {
            half(k, panel, strip, c, ldc, rows.min(4), cols, &bias[..4], clamp);
            if rows > 4 {
                half(k, &panel[4..], strip, c.add(4 * ldc), ldc, rows - 4, cols, &bias[4..], clamp);
            }
        }
    }

    /// Rows `0..rows` (≤ 4) of the packed panel (`panel[p*MR + r]`) times the packed strip
    /// (`strip[p*24..]`) in `4 × V` registers (8 columns each), then bias and clamp, stored
    /// once (through lane masks for a partial strip).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `V ≤ 3` and `8·(V-1) < cols ≤ 8·V`; `panel` must hold
    /// `(k-1)*MR + 4` values (or `k` be 0), `strip` `k*24` and `bias` 4; `c` must be writable
    /// for `rows` rows of `cols` columns with row stride `ldc`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn half_avx2<const V: usize>(
        k: usize,
        panel: &[f32],
        strip: &[f32],
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        bias: &[f32],
        clamp: Option<Clamp>,
    ) {
        let (a, b) = (panel.as_ptr(), strip.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); V]; 4];
        for p in 0..k {
            // SAFETY: the strip holds k*24 values (8·V ≤ 24 read per row) and the panel
            // (p*MR + 4) (the contract).
            unsafe {
                let row = b.add(p * NR2);
                let mut bv = [_mm256_setzero_ps(); V];
                for (i, v) in bv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(row.add(8 * i));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.add(p * MR + r));
                    for (acc, &bv) in acc.iter_mut().zip(&bv) {
                        *acc = _mm256_fmadd_ps(av, bv, *acc);
                    }
                }
            }
        }
        // Lane l of register v is stored when 8v + l < cols.
        let mask = |v: usize| -> __m256i {
            let live = cols.saturating_sub(8 * v).min(8) as i32;
            _mm256_cmpgt_epi32(_mm256_set1_epi32(live), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
        };
        for (r, acc) in acc.iter().enumerate().take(rows) {
            let bv = _mm256_set1_ps(bias[r]);
            let mut v = [_mm256_setzero_ps(); V];
            for (v, &acc) in v.iter_mut().zip(acc) {
                *v = _mm256_add_ps(acc, bv);
            }
            if let Some(Clamp { lo, hi }) = clamp {
                let (lo, hi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
                for v in &mut v {
                    *v = _mm256_min_ps(_mm256_max_ps(*v, lo), hi);
                }
            }
            // SAFETY: row r of the tile; a full tile has 8·V columns, a partial one is masked
            // (masked-off lanes are not touched; V is such that every register has a live
            // lane, and `wrapping_add` keeps even an all-masked one sound).
            unsafe {
                let row = c.add(r * ldc);
                if cols == 8 * V {
                    for (i, v) in v.iter().enumerate() {
                        _mm256_storeu_ps(row.add(8 * i), *v);
                    }
                } else {
                    for (i, v) in v.iter().enumerate() {
                        _mm256_maskstore_ps(row.wrapping_add(8 * i), mask(i), *v);
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::{Clamp, Packed};

    #[derive(Clone, Copy, Debug)]
    pub enum Kernel {
        Avx512,
        Avx512Packed,
        Avx2,
    }

    impl Kernel {
        pub fn panel_rows(self) -> usize {
            super::MR
        }
    }

    pub unsafe fn dot(_: &[f32], _: &[f32]) -> f32 {
        unreachable!("simd::avx512() is false off x86_64")
    }

    pub unsafe fn gemm(
        _: Kernel,
        _: &super::GemmShape,
        _: &Packed,
        _: &[f32],
        _: *mut f32,
        _: Option<&[f32]>,
        _: Option<Clamp>,
    ) {
        unreachable!("simd::avx512() and simd::fma() are false off x86_64")
    }

    pub unsafe fn gemm_strips(
        _: [usize; 3],
        _: *const f32,
        _: super::ARows,
        _: &[f32],
        _: *mut f32,
        _: (Option<&[f32]>, Option<Clamp>, bool),
        _: bool,
    ) {
        unreachable!("simd::avx512() is false off x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain triple loop in f64, the reference.
    fn reference([m, n, k]: [usize; 3], a: &[f32], b: &[f32], bias: &[f32], clamp: Option<Clamp>) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum::<f64>() + bias[i] as f64;
                out[i * n + j] = match clamp {
                    Some(Clamp { lo, hi }) => (s as f32).max(lo).min(hi),
                    None => s as f32,
                };
            }
        }
        out
    }

    #[test]
    fn matches_a_reference_on_ragged_shapes() {
        for level in simd::levels() {
            let _cap = simd::cap(level);
            let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
            // Edges in every direction: rows not a multiple of 8, columns around 16/32/256, k = 0.
            for [m, n, k] in [
                [8, 32, 16],
                [5, 7, 3],
                [4, 5, 0],
                [258, 4, 256],
                [9, 16, 5],
                [1, 1000, 64],
                [3, 1500, 7],
                // A few rows over enough columns to split across threads (a classifier).
                [1, 1000, 1280],
                [2, 4001, 130],
                [13, 49, 96],
                [24, 300, 40],
                [96, 1000, 16],
                [3, 17, 0],
                [40, 529, 9],
                // Narrow tiles (8..16 columns: one register per row) and just below them.
                [24, 8, 100],
                [17, 12, 384],
                [9, 16, 40],
                [33, 7, 50],
                // Up to 8 columns turned around (`narrow512`, packed A): each width, groups of
                // panels with a single panel left over, a partial last panel, k of 1.
                [50, 1, 33],
                [12, 2, 1],
                [100, 3, 70],
                [37, 4, 9],
                [130, 5, 1000],
                [37, 6, 200],
                [25, 7, 13],
                [61, 8, 500],
                [384, 8, 384],
                // Wide enough for the AVX2 tile: second halves of 1-3 rows, partial strips,
                // narrowed chunks (a single row tile), k of 1.
                [13, 300, 96],
                [6, 257, 33],
                [7, 270, 1],
                // Row strides on one or two L1 sets: the AVX-512 tile reads B packed.
                [13, 1024, 9],
                [9, 512, 12],
                [10, 1536, 20],
                [26, 2048, 300],
                // Deeper than one slice of k (partial sums go back to C, then bias and clamp),
                // in place and packed, with partial panels of 4 and 8 rows.
                [16, 40, 800],
                [20, 1024, 769],
                [12, 9, 1536],
            ] {
                let a: Vec<f32> = (0..m * k).map(value).collect();
                let b: Vec<f32> = (0..k * n).map(|i| value(i + 3)).collect();
                let bias: Vec<f32> = (0..m).map(|i| value(i + 11)).collect();
                for clamp in [None, Some(Clamp { lo: 0.0, hi: 6.0 })] {
                    let mut got = vec![f32::NAN; m * n];
                    gemm([m, n, k], &a, None, &b, &mut got, Some(&bias), clamp).unwrap();
                    if let Some(packed) = Packed::new(m, k, &a) {
                        let mut again = vec![f32::NAN; m * n];
                        gemm([m, n, k], &a, Some(&packed), &b, &mut again, Some(&bias), clamp).unwrap();
                        let want = reference([m, n, k], &a, &b, &bias, clamp);
                        if n >= NARROW_MIN {
                            assert_eq!(got, again, "prepacked");
                        } else {
                            // Below NARROW_MIN, only a packed A runs the narrow kernel.
                            let worst = again.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                            assert!(worst < 1e-4, "prepacked {m}x{n}x{k} {clamp:?}: {worst}");
                        }
                    }
                    let want = reference([m, n, k], &a, &b, &bias, clamp);
                    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                    assert!(worst < 1e-4, "{m}x{n}x{k} {clamp:?}: {worst}");
                    if simd::avx512() || simd::fma() {
                        // The portable path agrees too.
                        let mut other = vec![f32::NAN; m * n];
                        portable([m, n, k], &a, &b, &mut other).unwrap();
                        epilogue(&mut other, n, Some(&bias), clamp);
                        let worst = other.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                        assert!(worst < 1e-4, "portable {m}x{n}x{k}: {worst}");
                    }
                }
            }
        }
    }

    /// A column of C comes out the same, to the bit, whichever other columns share its product
    /// and whichever kernel runs it (a whole strip, a 16-column tile, the turned-around tail,
    /// B read in place or packed): a fused convolution block splits its rows into ranges of
    /// many sizes, and every split must compute the same numbers.
    #[test]
    fn a_column_does_not_depend_on_its_neighbours() {
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        for level in simd::levels() {
            let _cap = simd::cap(level);
            if !columns_independent() {
                continue;
            }
            // k deeper than one slice (partial sums go back to C) and not; partial panels.
            for [m, k] in [[24, 1152], [50, 192], [13, 40]] {
                let a: Vec<f32> = (0..m * k).map(value).collect();
                let bias: Vec<f32> = (0..m).map(|i| value(i + 11)).collect();
                let packed = Packed::new(m, k, &a);
                let clamp = Some(Clamp { lo: -0.5, hi: 6.0 });
                for n in [9, 14, 17, 21, 24, 28, 33, 40, 49, 56, 98, 196] {
                    let b: Vec<f32> = (0..k * n).map(|i| value(i + 3)).collect();
                    let columns = |from: usize, to: usize| -> Vec<f32> {
                        let w = to - from;
                        let part: Vec<f32> = b.chunks_exact(n).flat_map(|row| &row[from..to]).copied().collect();
                        let mut c = vec![f32::NAN; m * w];
                        gemm([m, w, k], &a, packed.as_ref(), &part, &mut c, Some(&bias), clamp).unwrap();
                        c
                    };
                    let whole = columns(0, n);
                    // Ranges of rows of a 7- or 14-wide plane, and cuts at every strip's edge.
                    for cut in [7, 9, 14, 16, 17, 21, 28, 32, 40, 48] {
                        if cut >= n || n - cut < 9 || cut < 9 {
                            continue;
                        }
                        for (from, to) in [(0, cut), (cut, n)] {
                            let part = columns(from, to);
                            for (r, row) in part.chunks_exact(to - from).enumerate() {
                                let want = &whole[r * n + from..r * n + to];
                                let same = row.iter().zip(want).all(|(x, y)| x.to_bits() == y.to_bits());
                                assert!(same, "{level:?} {m}x{n}x{k}, columns {from}..{to}, row {r}");
                            }
                        }
                    }
                    #[cfg(target_arch = "x86_64")]
                    if let (true, Some(packed)) = (simd::avx512(), &packed) {
                        let shape = GemmShape::new(1, [m, n, k], a.len(), b.len(), m * n, Some(m)).unwrap();
                        let mut c = vec![f32::NAN; m * n];
                        // SAFETY: the CPU has AVX-512F (checked); `shape` was checked against
                        // these operands; `packed` is this m×k; c holds m·n floats.
                        unsafe {
                            x86::gemm(
                                x86::Kernel::Avx512Packed,
                                &shape,
                                packed,
                                &b,
                                c.as_mut_ptr(),
                                Some(&bias),
                                clamp,
                                false,
                            )
                        };
                        assert!(c.iter().zip(&whole).all(|(x, y)| x.to_bits() == y.to_bits()), "packed B {m}x{n}x{k}");
                    }
                }
            }
        }
    }

    #[test]
    fn fused_gelu_is_the_separate_pass_to_the_bit() {
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 100.0) - 5.0;
        for level in simd::levels() {
            let _cap = simd::cap(level);
            // The tile (one slice of k and three), the narrow kernel, partial panels and strips.
            for [m, n, k] in [[13, 40, 30], [30, 70, 900], [25, 5, 64], [384, 8, 384], [7, 300, 9]] {
                let a: Vec<f32> = (0..m * k).map(|i| value(i) * 0.05).collect();
                let mut b: Vec<f32> = (0..k * n).map(|i| value(i + 3) * 0.05).collect();
                b[0] = f32::NAN; // stays NaN through the fused GELU, as through the pass
                let bias: Vec<f32> = (0..m).map(|i| value(i + 11)).collect();
                let packed = Packed::new(m, k, &a);
                let mut want = vec![0f32; m * n];
                gemm([m, n, k], &a, packed.as_ref(), &b, &mut want, Some(&bias), None).unwrap();
                act::activate(&mut want, act::Act::Gelu);
                let mut got = vec![f32::NAN; m * n];
                gemm_gelu([m, n, k], &a, packed.as_ref(), &b, &mut got, Some(&bias)).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{level:?} {m}x{n}x{k}");
                assert!(got[0].is_nan() && got[1..].iter().any(|v| *v != 0.0), "{level:?} {m}x{n}x{k}");
            }
        }
    }

    #[test]
    fn only_rows_on_one_l1_set_are_packed() {
        assert!(strided_rows_thrash(1024, 384), "every row on one set");
        assert!(!strided_rows_thrash(512, 384), "two sets: the prefetched rows keep up");
        assert!(!strided_rows_thrash(1024, 2), "4 lines fit one set's ways");
        assert!(!strided_rows_thrash(128, 384), "8 sets");
        assert!(!strided_rows_thrash(160, 1536), "32 sets");
        assert!(!strided_rows_thrash(49, 1152), "rows not line-aligned spread over every set");
        assert!(!strided_rows_thrash(112 * 112, 16), "4 sets, 32 lines");
    }

    #[test]
    fn the_packed_b_kernel_matches_a_reference_on_ragged_shapes() {
        // Pinned (and held: tests that lower the level wait) so that `Packed::new` packs the
        // AVX-512 kernel's panels.
        let _cap = simd::cap(simd::Level::Avx512);
        if !simd::avx512() {
            return; // the AVX-512 tile reading B packed; the AVX2 one always packs
        }
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        for [m, n, k] in [
            [13, 49, 96],
            [17, 12, 384],
            [9, 300, 40],
            [8, 33, 1],
            [24, 8, 100],
            [28, 70, 1000],
            [5, 17, 385],
            [40, 600, 800],
        ] {
            let a: Vec<f32> = (0..m * k).map(value).collect();
            let b: Vec<f32> = (0..k * n).map(|i| value(i + 3)).collect();
            let bias: Vec<f32> = (0..m).map(|i| value(i + 11)).collect();
            let clamp = Some(Clamp { lo: -0.5, hi: 6.0 });
            let packed = Packed::new(m, k, &a).unwrap();
            let shape = GemmShape::new(1, [m, n, k], a.len(), b.len(), m * n, Some(m)).unwrap();
            let mut got = vec![f32::NAN; m * n];
            // SAFETY: the CPU has AVX-512F (checked above); `shape` was checked against these
            // operands; `packed` is this m×k; `got` holds m·n floats and aliases nothing.
            unsafe {
                x86::gemm(x86::Kernel::Avx512Packed, &shape, &packed, &b, got.as_mut_ptr(), Some(&bias), clamp, false)
            };
            let want = reference([m, n, k], &a, &b, &bias, clamp);
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{m}x{n}x{k}: {worst}");
        }
    }

    /// However `gemm_strips` shares a product out (one thread, or units of equal cost over 2
    /// and 3), every output is the same to the bit: a unit only chooses which tiles it runs,
    /// never how a tile sums. The shapes are EfficientNet's channels-last products (49 and 196
    /// pixels: partial panels), MiniLM-sized ones and ragged ones.
    #[test]
    fn strips_split_over_threads_gives_the_same_bits() {
        let _cap = simd::cap(simd::Level::Avx512);
        if !simd::avx512() {
            return;
        }
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        for [m, n, k] in
            [[49, 1152, 192], [49, 192, 1152], [196, 672, 112], [100, 70, 1000], [37, 1000, 33], [64, 384, 384]]
        {
            let x: Vec<f32> = (0..m * k).map(value).collect();
            let wt: Vec<f32> = (0..n * k).map(|i| value(i + 5)).collect();
            let bias: Vec<f32> = (0..n).map(|i| value(i + 13)).collect();
            let strips = Strips::from_transposed(n, k, &wt).unwrap();
            let run = |threads: usize| -> Vec<u32> {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
                pool.install(|| gemm_strips(m, &x, &strips, &mut got, Some(&bias), false)).unwrap();
                // SAFETY: gemm_strips returned Ok, so it wrote all m·n values.
                got.iter().map(|v| unsafe { v.assume_init() }.to_bits()).collect()
            };
            let one = run(1);
            assert!(one.iter().all(|&b| !f32::from_bits(b).is_nan()), "{m}x{n}x{k}: an output left unwritten");
            for threads in [2, 3] {
                assert!(run(threads) == one, "{m}x{n}x{k} on {threads} threads: other bits than on one");
            }
        }
    }

    /// `X·W` with `W` in strips, `X` in place and the bias per column: against the f64
    /// reference on ragged shapes (rows of every count mod 12, a last strip of 1–31 columns,
    /// `k` past a slice), and to the bit against the turned-around product `(Wᵀ·Xᵀ)ᵀ` it
    /// replaces, with and without GELU.
    #[test]
    fn strips_match_a_reference_and_the_turned_around_product() {
        let _cap = simd::cap(simd::Level::Avx512);
        if !simd::avx512() {
            assert!(Strips::from_transposed(32, 4, &[0.0; 128]).is_none(), "strips only with AVX-512");
            return;
        }
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        for [m, n, k] in
            [[1, 16, 3], [13, 49, 96], [25, 33, 385], [12, 32, 1], [64, 384, 384], [100, 70, 1000], [7, 1536, 40]]
        {
            let x: Vec<f32> = (0..m * k).map(value).collect();
            // Wᵀ, [n, k]: a dense layer's weights as ONNX's Gemm with transB or PyTorch keep them.
            let wt: Vec<f32> = (0..n * k).map(|i| value(i + 3)).collect();
            let bias: Vec<f32> = (0..n).map(|i| value(i + 11)).collect();
            let strips = Strips::from_transposed(n, k, &wt).unwrap();
            for gelu in [false, true] {
                let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
                gemm_strips(m, &x, &strips, &mut got, Some(&bias), gelu).unwrap();
                // SAFETY: gemm_strips returned Ok, so it wrote all m·n values.
                let got: Vec<f32> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
                // The turned-around product: Yᵀ = Wᵀ·Xᵀ with the bias per row, turned back.
                let xt = act::transpose(&x, m, k).unwrap();
                let mut yt = vec![0f32; n * m];
                if gelu {
                    gemm_gelu([n, m, k], &wt, None, &xt, &mut yt, Some(&bias)).unwrap();
                } else {
                    gemm([n, m, k], &wt, None, &xt, &mut yt, Some(&bias), None).unwrap();
                }
                let turned = act::transpose(&yt, n, m).unwrap();
                if m > TURNED_MAX {
                    // Below that many rows the turned-around product runs the column kernel,
                    // which sums in another order.
                    let same = got.iter().zip(&turned).all(|(g, t)| g.to_bits() == t.to_bits());
                    assert!(same, "{m}x{n}x{k} (gelu {gelu}): not the turned-around product's bits");
                }
                // The f64 reference of X·W + bias: the reference takes Wᵀ as rows (so Yᵀ).
                let mut want = reference([n, m, k], &wt, &xt, &bias, None);
                if gelu {
                    act::activate(&mut want, act::Act::Gelu);
                }
                let want = act::transpose(&want, n, m).unwrap();
                let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "{m}x{n}x{k} (gelu {gelu}): {worst}");
            }
            // X's rows 3 floats further apart, read in place: the same bits.
            let lda = k + 3;
            let wide: Vec<f32> =
                (0..m * lda).map(|i| if i % lda < k { x[i / lda * k + i % lda] } else { f32::NAN }).collect();
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            gemm_strips_over(m, &x, k, &strips, &mut a).unwrap();
            gemm_strips_over(m, &wide[..(m - 1) * lda + k], lda, &strips, &mut b).unwrap();
            assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()), "{m}x{n}x{k}: lda {lda}");
            assert!(gemm_strips_over(m, &wide[..(m - 1) * lda + k - 1], lda, &strips, &mut b).is_err());
            assert!(gemm_strips_over(m, &x, k - 1, &strips, &mut b).is_err(), "lda below k");
            // X given turned (Xᵀ, k rows of m pixels 5 floats apart, as a planar activation's
            // channels), read in place, clamped, in parallel or not: the bits of turning it first.
            let ld = m + 5;
            let xt = act::transpose(&x, m, k).unwrap();
            let planes: Vec<f32> =
                (0..k * ld).map(|i| if i % ld < m { xt[i / ld * m + i % ld] } else { f32::NAN }).collect();
            let six = Some(Clamp { lo: 0.0, hi: 6.0 });
            let mut want = vec![MaybeUninit::new(f32::NAN); m * n];
            gemm_strips_clamped(m, &x, &strips, &mut want, (Some(&bias), six), true).unwrap();
            for parallel in [false, true] {
                let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
                let a = &planes[..(k - 1) * ld + m];
                gemm_strips_turned(m, (a, ld), &strips, &mut got, (Some(&bias), six), parallel).unwrap();
                // SAFETY: both products returned Ok, so each wrote all m·n values.
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| unsafe { g.assume_init().to_bits() == w.assume_init().to_bits() });
                assert!(same, "{m}x{n}x{k}: turned (parallel {parallel}) is not the rows' bits");
            }
            // Xᵀ one float short, or its rows closer than m: an error, nothing read past it.
            let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
            let short = &planes[..(k - 1) * ld + m - 1];
            assert!(gemm_strips_turned(m, (short, ld), &strips, &mut got, (None, None), true).is_err());
            assert!(
                gemm_strips_turned(m, (&planes, m - 1), &strips, &mut got, (None, None), true).is_err(),
                "ld below m"
            );
            // (With one step, no stride is ever taken.)
            let far = gemm_strips_turned(m, (&planes, usize::MAX), &strips, &mut got, (None, None), true);
            assert_eq!(far.is_err(), k > 1, "{m}x{n}x{k}: a stride whose extent overflows");
            // Without a bias, and with operands of the wrong size (an error, nothing written).
            let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
            gemm_strips(m, &x, &strips, &mut got, None, false).unwrap();
            assert!(gemm_strips(m + 1, &x, &strips, &mut got, None, false).is_err());
            assert!(gemm_strips(m, &x, &strips, &mut got[1..], None, false).is_err());
            assert!(gemm_strips(m, &x, &strips, &mut got, Some(&bias[1..]), false).is_err());
        }
        assert!(Strips::from_transposed(32, 4, &[0.0; 127]).is_none(), "Wᵀ too short");
        assert!(Strips::from_transposed(usize::MAX, 2, &[0.0; 8]).is_none(), "sizes overflow");
        assert!(Strips::from_transposed(32, 0, &[]).is_none(), "an empty k");
        // Strided packing: an element past the data, or strides that overflow, pack nothing.
        assert!(Strips::pack(4, 32, &[0.0; 128], 1, [32, 1], Vec::new()).unwrap().is_none());
        assert!(Strips::pack(4, 32, &[0.0; 128], 0, [usize::MAX, 1], Vec::new()).unwrap().is_none());
        // No rows: nothing to write; more rows than A holds, or sizes that overflow: an error.
        let strips = Strips::from_transposed(32, 4, &[0.5; 128]).unwrap();
        let mut none: [MaybeUninit<f32>; 0] = [];
        gemm_strips(0, &[], &strips, &mut none, None, false).unwrap();
        let mut out = vec![MaybeUninit::new(0f32); 64];
        assert!(gemm_strips_lda(usize::MAX, &[0.0; 8], 4, &strips, &mut out, None, false).is_err());
        assert!(gemm_strips_lda(2, &[0.0; 8], usize::MAX, &strips, &mut out, None, false).is_err());
    }

    #[test]
    fn a_batch_is_each_image_on_its_own() {
        for level in simd::levels() {
            let _cap = simd::cap(level);
            let value = |i: usize| ((i * 4409 % 997) as f32 / 500.0) - 1.0;
            // The last: deeper than a slice of k, and B packed at the AVX-512 level.
            for [m, n, k] in [[16, 200, 24], [2, 64, 5], [8, 9, 3], [30, 8, 40], [20, 1024, 800]] {
                let batch = 3;
                let a: Vec<f32> = (0..m * k).map(value).collect();
                let b: Vec<f32> = (0..batch * k * n).map(|i| value(i + 5)).collect();
                let bias: Vec<f32> = (0..m).map(|i| value(i + 7)).collect();
                let clamp = Some(Clamp { lo: -0.5, hi: 6.0 });
                let mut got = vec![MaybeUninit::new(f32::NAN); batch * m * n];
                gemm_into(batch, [m, n, k], &a, None, &b, &mut got, Some(&bias), clamp).unwrap();
                // SAFETY: initialised above (to NaN, then by gemm_into).
                let got: Vec<f32> = got.into_iter().map(|v| unsafe { v.assume_init() }).collect();
                for i in 0..batch {
                    let want = reference([m, n, k], &a, &b[i * k * n..(i + 1) * k * n], &bias, clamp);
                    let worst = got[i * m * n..(i + 1) * m * n]
                        .iter()
                        .zip(&want)
                        .map(|(g, w)| (g - w).abs())
                        .fold(0f32, f32::max);
                    assert!(worst < 1e-4, "{m}x{n}x{k} image {i}: {worst}");
                }
            }
        }
    }

    #[test]
    fn dot_matches_a_plain_sum_at_every_length() {
        for level in simd::levels() {
            let _cap = simd::cap(level);
            for n in [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 100, 257] {
                let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
                let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
                let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
                assert!((dot(&a, &b) as f64 - want).abs() < 1e-4, "n={n}");
            }
        }
    }

    #[test]
    fn mismatched_sizes_are_an_error() {
        let mut dst = vec![0f32; 4];
        assert!(gemm([2, 2, 3], &[0.0; 5], None, &[0.0; 6], &mut dst, None, None).is_err());
        assert!(gemm([2, 2, 1], &[0.0; 2], None, &[0.0; 2], &mut dst, Some(&[0.0]), None).is_err());
        // Sizes whose products overflow, over empty slices: refused, never handed to a kernel.
        for level in simd::levels() {
            let _cap = simd::cap(level);
            let huge = 1usize << 60;
            assert!(gemm_into(1, [1, huge, 0], &[], None, &[], &mut [], None, None).is_err());
            assert!(gemm_into(huge, [huge, huge, huge], &[], None, &[], &mut [], None, None).is_err());
            assert!(gemm_into(2, [16, huge / 8, 4], &[0.0; 64], None, &[], &mut [], None, None).is_err());
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// Not a test: `cargo test -p eir --lib sgemm::timing -- --ignored --nocapture` prints the
    /// tile kernel (at this CPU's best level, A prepacked as models keep it) against the `gemm`
    /// crate plus the epilogue pass it replaces, on EfficientNet's 1x1 convolutions and
    /// MiniLM's dense layers, as a ratio measured in the same run: the evidence for
    /// `tile_kernel`'s choice.
    #[test]
    #[ignore]
    fn kernel_against_the_gemm_crate() {
        let _cap = simd::cap(simd::Level::Avx512);
        let shapes: [(&str, [usize; 3]); 29] = [
            ("pw 32->16 @112x14rows", [16, 1568, 32]),
            ("pw 32->16 @112x4rows", [16, 448, 32]),
            ("pw 32->16 @112 whole", [16, 12544, 32]),
            ("onnx dense 384->1536 x 64 rows", [64, 1536, 384]),
            ("onnx dense 1536->384 x 64 rows", [64, 384, 1536]),
            ("onnx dense 384->384 x 64 rows", [64, 384, 384]),
            ("head 320->1280 @7", [1280, 49, 320]),
            ("bert qkv 384 x 64 tok", [1152, 64, 384]),
            ("bert ffn 384->1536 x 64 tok", [1536, 64, 384]),
            ("bert ffn 1536->384 x 64 tok", [384, 64, 1536]),
            ("expand 112->672 @14", [672, 196, 112]),
            ("project 672->112 @14", [112, 196, 672]),
            ("expand 112->672 @14x4rows", [672, 56, 112]),
            ("project 672->112 @14x4rows", [112, 56, 672]),
            ("pw 16->96 @112", [96, 12544, 16]),
            ("pw 144->24 @56", [24, 3136, 144]),
            ("pw 240->80 @14", [80, 196, 240]),
            ("pw 1152->192 @7", [192, 49, 1152]),
            ("bert qkv 384 x 8 tok", [1152, 8, 384]),
            ("bert qkv 384 x 128 tok", [1152, 128, 384]),
            ("bert ffn 384->1536 x 1024 tok", [1536, 1024, 384]),
            ("bert ffn 1536->384 x 160 tok", [384, 160, 1536]),
            ("bert ffn 384->1536 x 160 tok", [1536, 160, 384]),
            ("bert ffn 1536->384 x 1024 tok", [384, 1024, 1536]),
            ("bert qkv 384 x 640 tok", [1152, 640, 384]),
            ("bert ffn 1536->384 x 640 tok", [384, 640, 1536]),
            ("bert qkv 384 x 512 tok", [1152, 512, 384]),
            ("bert ffn 384->1536 x 512 tok", [1536, 512, 384]),
            ("bert ffn 1536->384 x 512 tok", [384, 512, 1536]),
        ];
        let time = |f: &mut dyn FnMut()| crate::nn::kernels::median_time(15, f);
        for (name, [m, n, k]) in shapes {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
            let bias = vec![0.5f32; m];
            let clamp = Some(Clamp { lo: 0.0, hi: 6.0 });
            // The tile itself, also where `gemm` leaves the product to the crate (that choice
            // is what this measures).
            let kernel = if simd::avx512() {
                x86::Kernel::Avx512
            } else if simd::fma() {
                x86::Kernel::Avx2
            } else {
                eprintln!("no tile kernel on this CPU");
                return;
            };
            let packed = Packed::new(m, k, &a).unwrap();
            let shape = GemmShape::new(1, [m, n, k], a.len(), b.len(), m * n, Some(m)).unwrap();
            let mut dst = vec![0f32; m * n];
            let mut run = |kernel| {
                time(&mut || {
                    // SAFETY: the CPU has `kernel`'s features (checked above); `shape` was
                    // checked against these operands; `packed` is this m×k; dst holds m·n floats.
                    unsafe { x86::gemm(kernel, &shape, &packed, &b, dst.as_mut_ptr(), Some(&bias), clamp, false) }
                })
            };
            let ours = run(kernel);
            if let x86::Kernel::Avx512 = kernel {
                let strip = run(x86::Kernel::Avx512Packed);
                let gflops = |t: std::time::Duration| 2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e9;
                let chosen = tile_kernel(n, k).map(|k| format!("{k:?}")).unwrap_or_default();
                eprintln!(
                    "{name:>30}: in place {:>8.3} ms ({:.0} GFLOP/s) | packed B {:>8.3} ms ({:.0} GFLOP/s) | \
                     packed / in place = {:.2}x (chosen: {chosen})",
                    ours.as_secs_f64() * 1e3,
                    gflops(ours),
                    strip.as_secs_f64() * 1e3,
                    gflops(strip),
                    strip.as_secs_f64() / ours.as_secs_f64()
                );
            }
            let theirs = time(&mut || {
                portable([m, n, k], &a, &b, &mut dst).unwrap();
                epilogue(&mut dst, n, Some(&bias), clamp);
            });
            let level = format!("{kernel:?}{}", if tile_kernel(n, k).is_some() { "" } else { ", gemm uses the crate" });
            eprintln!(
                "{name:>30} ({level}): EIR {:>8.3} ms | gemm crate {:>8.3} ms | EIR / crate = {:.2}x",
                ours.as_secs_f64() * 1e3,
                theirs.as_secs_f64() * 1e3,
                ours.as_secs_f64() / theirs.as_secs_f64()
            );
        }
    }

    /// Not a test: `cargo test -p eir --lib sgemm::timing::classifier -- --ignored --nocapture`
    /// prints EfficientNet's classifier at batch 1 (1280 → 1000, one column) on 1 and 2 threads.
    #[test]
    #[ignore]
    fn classifier() {
        let _cap = simd::cap(simd::Level::Avx512);
        let [m, n, k] = [1000, 1, 1280];
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let bias = vec![0.5f32; m];
        let packed = Packed::new(m, k, &a).unwrap();
        let mut dst: Vec<f32> = Vec::with_capacity(m * n);
        let mut product = || {
            gemm_into(1, [m, n, k], &a, Some(&packed), &b, &mut dst.spare_capacity_mut()[..m * n], Some(&bias), None)
                .unwrap()
        };
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let t = pool.install(|| crate::nn::kernels::median_time(400, &mut product));
            // As in a pass, where the rest of the model has pushed the weights out of cache:
            // each run after a sweep over 64 MiB.
            let mut sweep = vec![1f32; 16 << 20];
            let mut times: Vec<f64> = (0..100)
                .map(|i| {
                    sweep.iter_mut().step_by(16).for_each(|x| *x += i as f32);
                    let at = std::time::Instant::now();
                    pool.install(&mut product);
                    at.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            eprintln!(
                "classifier 1280->1000 x1, {threads} threads: {:.4} ms in cache, {:.4} ms after a sweep",
                t.as_secs_f64() * 1e3,
                times[50] * 1e3
            );
            std::hint::black_box(&sweep);
        }
    }

    /// Not a test: `cargo test -p eir --lib sgemm::timing::strips -- --ignored --nocapture`
    /// prints a dense layer `X·W + b` as `gemm_strips` runs it (X in place, W in strips)
    /// against the turned-around product it replaces (X transposed, `Wᵀ·Xᵀ`, turned back), on
    /// MiniLM's layers at several token counts, as a ratio measured in the same run.
    #[test]
    #[ignore]
    fn strips_against_turned_around() {
        let _cap = simd::cap(simd::Level::Avx512);
        if !simd::avx512() {
            eprintln!("no AVX-512 on this CPU");
            return;
        }
        let time = |f: &mut dyn FnMut()| crate::nn::kernels::median_time(15, f);
        for tokens in [8, 16, 24, 32, 64, 160, 640, 1024] {
            for (name, n, k) in [("qkv", 384, 384), ("ffn1", 1536, 384), ("ffn2", 384, 1536)] {
                let x: Vec<f32> = (0..tokens * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
                let wt: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
                let bias = vec![0.5f32; n];
                let strips = Strips::from_transposed(n, k, &wt).unwrap();
                let packed = Packed::new(n, k, &wt).unwrap();
                let mut y = vec![MaybeUninit::new(0f32); tokens * n];
                let ours = time(&mut || gemm_strips(tokens, &x, &strips, &mut y, Some(&bias), false).unwrap());
                let turned = time(&mut || {
                    let xt = act::transpose(&x, tokens, k).unwrap();
                    // As the ONNX backend runs it: into a fresh vector, not zeroed first.
                    let mut yt = Vec::with_capacity(n * tokens);
                    gemm_act_into([n, tokens, k], &wt, Some(&packed), &xt, yt.spare_capacity_mut(), Some(&bias), false)
                        .unwrap();
                    // SAFETY: gemm_act_into returned Ok, so it wrote all n·tokens values.
                    unsafe { yt.set_len(n * tokens) };
                    std::hint::black_box(act::transpose(&yt, n, tokens).unwrap());
                });
                let gflops = |t: std::time::Duration| 2.0 * (tokens * n * k) as f64 / t.as_secs_f64() / 1e9;
                eprintln!(
                    "{name:>5} x {tokens:>4} tokens: strips {:>7.3} ms ({:.0} GFLOP/s) | turned around {:>7.3} ms ({:.0}) | strips / turned = {:.2}x",
                    ours.as_secs_f64() * 1e3,
                    gflops(ours),
                    turned.as_secs_f64() * 1e3,
                    gflops(turned),
                    ours.as_secs_f64() / turned.as_secs_f64()
                );
            }
        }
    }

    /// Not a test: `cargo test -p eir --lib sgemm::timing::pointwise_layouts -- --ignored
    /// --nocapture` sets EfficientNet-Lite0's pointwise convolutions as they run (`W·X`, planes
    /// in NCHW) against the same products channels-last (`Xᵀ·Wᵀ` on strips), on one thread and
    /// two: what a channels-last layout would gain in its GEMMs alone. On this machine, about
    /// nothing on one thread (0.86–1.09× for the wide ones, 1.25–1.54× slower where the
    /// outputs are 16–40 channels).
    #[test]
    #[ignore]
    fn pointwise_layouts() {
        let _cap = simd::cap(simd::Level::Avx512);
        let time = |f: &mut dyn FnMut()| crate::nn::kernels::median_time(41, f);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                // Pixels, input channels, output channels.
                for [p, k, n] in [
                    [49, 192, 1152], [49, 1152, 192], [49, 1152, 320], [49, 320, 1280],
                    [196, 112, 672], [196, 672, 112], [56, 112, 672], [56, 672, 112],
                    [112, 40, 240], [112, 240, 40], [112, 24, 144], [112, 144, 24], [224, 16, 96], [224, 32, 16],
                ] {
                    let x: Vec<f32> = (0..p * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
                    let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
                    let bias = vec![0.5f32; n];
                    let strips = Strips::from_transposed(n, k, &w).unwrap();
                    let packed = Packed::new(n, k, &w).unwrap();
                    let mut y = vec![MaybeUninit::new(0f32); p * n];
                    let nhwc = time(&mut || gemm_strips(p, &x, &strips, &mut y, Some(&bias), false).unwrap());
                    let nchw = time(&mut || {
                        gemm_into(1, [n, p, k], &w, Some(&packed), &x, &mut y, Some(&bias), None).unwrap()
                    });
                    let gf = |t: std::time::Duration| 2.0 * (p * n * k) as f64 / t.as_secs_f64() / 1e9;
                    eprintln!(
                        "t{threads} {p:>4} px {k:>5}->{n:<5}: NCHW {:>7.4} ms ({:>3.0}) | strips {:>7.4} ms ({:>3.0}) | {:.2}x",
                        nchw.as_secs_f64() * 1e3, gf(nchw), nhwc.as_secs_f64() * 1e3, gf(nhwc),
                        nhwc.as_secs_f64() / nchw.as_secs_f64()
                    );
                }
            });
        }
    }

    /// Not a test: `cargo test -p eir --lib sgemm::timing::tile_in_l1 -- --ignored --nocapture`
    /// prints the AVX-512 tile's rate on one thread with every operand in L1, B aligned to a cache line
    /// and 4 floats off it: the kernel's own ceiling, against the CPU's peak (two 16-lane FMAs
    /// per cycle).
    #[test]
    #[ignore]
    fn tile_in_l1() {
        let _cap = simd::cap(simd::Level::Avx512);
        if !simd::avx512() {
            eprintln!("no AVX-512 on this CPU");
            return;
        }
        for ([m, n, k], off) in [([12, 32, 128], 0), ([12, 32, 128], 4), ([24, 64, 128], 0), ([24, 64, 128], 4)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
            let room: Vec<f32> = (0..k * n + 32).map(|i| (i % 7) as f32 * 0.1).collect();
            let skip = (64 - room.as_ptr() as usize % 64) / 4 % 16 + off;
            let b = &room[skip..skip + k * n];
            let packed = Packed::new(m, k, &a).unwrap();
            let shape = GemmShape::new(1, [m, n, k], a.len(), b.len(), m * n, Some(m)).unwrap();
            let bias = vec![0f32; m];
            let mut dst = vec![0f32; m * n];
            let reps = 200_000;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                // SAFETY: the CPU has AVX-512F (checked above); `shape` was checked against
                // these operands; `packed` is this m×k; dst holds m·n floats.
                unsafe {
                    x86::gemm(x86::Kernel::Avx512, &shape, &packed, b, dst.as_mut_ptr(), Some(&bias), None, false)
                };
            }
            let s = t.elapsed().as_secs_f64();
            eprintln!(
                "{m}x{n}x{k}, B {off} floats off a line: {:.1} GFLOP/s",
                2.0 * (m * n * k * reps) as f64 / s / 1e9
            );
        }
    }
}
