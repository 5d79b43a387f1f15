//! Depthwise convolution on channel blocks: the NCHWc layout inside one kernel.
//!
//! A plane-at-a-time kernel vectorises along an output row, which wastes most lanes where
//! mobile networks spend their depthwise time (7x7 and 14x14 planes, 5x5 taps, stride 2). Here
//! a block of `L` channels (16 with AVX-512, 8 otherwise) of one image is copied into a
//! zero-bordered tile with the channels innermost (`[row][col][L]`), so that every tap, for
//! every output pixel, is one full-width multiply-add whatever the plane's size, stride or
//! dilation. The output block is written back to NCHW with bias and clamp on the way out.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{Tensor, TensorId};

use super::conv::Geometry;
use crate::nn::kernels::sgemm::Clamp;
use crate::nn::kernels::simd;

/// The widest channel block (AVX-512: 16 lanes); per-thread buffers are sized for it.
pub(super) const MAX_LANES: usize = 16;

/// The floats of a band's tile (at most; at least one output row): 32 KiB.
const TILE_FLOATS: usize = 8192;

/// Output pixels of one row accumulated together: each tap's weights are loaded once for
/// this many multiply-adds.
const RUN: usize = 8;

/// One block's work, compiled for one CPU level; unsafe to call where the CPU lacks it.
type Unit<const L: usize> =
    unsafe fn(&Depthwise, Block<'_, L>, (usize, usize), &mut [[f32; L]], &mut [[f32; L]], &mut Dst<'_, L>);

/// Where [`Depthwise::run_banded`] takes a range's input from, instead of the whole input:
/// given the image and its input rows `(ya, yb)`, fills the buffer with those rows of every
/// channel (`[c][(yb - ya) × w]`), or returns false (an error it keeps; the range is skipped).
pub(super) type Source<'a> = dyn Fn(usize, (usize, usize), &mut Vec<f32>) -> bool + Sync + 'a;

/// What [`Depthwise::run_banded`] hands each range of rows to: the image, the rows, the
/// scratch (`[c][rows × ow]`) and the range's item.
pub(super) type Then<'a, T> = dyn Fn(usize, (usize, usize), &[f32], T) + Sync + 'a;

/// Where a unit's output goes: per channel of its block (`None` past the last channel), its
/// rows of the output plane.
type Dst<'a, const L: usize> = [Option<&'a mut [MaybeUninit<f32>]>; L];

/// The inputs of one block of `lanes` channels of one image.
struct Block<'a, const L: usize> {
    /// Its input planes, `plane` floats apart, holding input rows from `row0` on.
    src: &'a [f32],
    plane: usize,
    row0: usize,
    lanes: usize,
    /// Per tap, the block's weights (lanes past the last channel zero).
    weights: &'a [[f32; L]],
    bias: [f32; L],
    clamp: Option<Clamp>,
}

/// A depthwise convolution's geometry, from sizes [`super::conv::ConvPlan`] has checked:
/// `h, w, kh, kw, oh, ow` and strides and dilations at least 1, and the padded tile
/// (`ph x pw`) covers every tap of every output and the whole input.
pub(super) struct Depthwise {
    h: usize,
    w: usize,
    pt: usize,
    pl: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    /// Whether any tap is dilated (then only the blocked units run).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    dilated: bool,
    oh: usize,
    ow: usize,
    pw: usize,
    /// Output rows computed together: their tile (input rows, channels innermost) stays in
    /// the L1 cache.
    band: usize,
    /// Rows of a band's tile.
    tile_rows: usize,
    /// Per tap (row-major over the kernel): its offset in the tile from an output pixel's
    /// first tap.
    offsets: Vec<usize>,
}

impl Depthwise {
    /// The geometry of `[h, w]` planes by a `[kh, kw]` kernel into `[oh, ow]`, or `None` when
    /// a tile's size overflows.
    pub(super) fn new([h, w]: [usize; 2], [kh, kw]: [usize; 2], [oh, ow]: [usize; 2], g: &Geometry) -> Option<Self> {
        let [sh, sw] = g.strides;
        let [dh, dw] = g.dilations;
        let (pt, pl) = (g.pads[0].0, g.pads[1].0);
        let reach = |o: usize, s: usize, k: usize, d: usize| {
            o.checked_sub(1)?.checked_mul(s)?.checked_add(k.checked_sub(1)?.checked_mul(d)?)?.checked_add(1)
        };
        let ph = reach(oh, sh, kh, dh)?.max(h.checked_add(pt)?);
        let pw = reach(ow, sw, kw, dw)?.max(w.checked_add(pl)?);
        ph.checked_mul(pw)?.checked_mul(MAX_LANES)?;
        // As many output rows as keep the tile within TILE_FLOATS (at least one); a band's
        // tile has at most `ph` rows, so nothing below overflows.
        let reach_k = (kh - 1) * dh + 1;
        let fit = (TILE_FLOATS / (pw * MAX_LANES)).saturating_sub(reach_k) / sh + 1;
        let band = fit.min(oh);
        let tile_rows = (band - 1) * sh + reach_k;
        let offsets = (0..kh * kw).map(|t| (t / kw) * dh * pw + (t % kw) * dw).collect();
        let dilated = dh != 1 || dw != 1;
        Some(Depthwise { h, w, pt, pl, kh, kw, sh, sw, dh, dilated, oh, ow, pw, band, tile_rows, offsets })
    }

    /// Input rows (at most) that `rows` output rows read.
    pub(super) fn input_rows(&self, rows: usize) -> usize {
        (rows.max(1) - 1) * self.sh + (self.kh - 1) * self.dh + 1
    }

    /// The input rows `ya..yb` that output rows `oy0..oy1` (`oy0 < oy1 ≤ oh`) read, within the
    /// input (padding rows are not among them).
    pub(super) fn input_span(&self, oy0: usize, oy1: usize) -> (usize, usize) {
        let reach = (self.kh - 1) * self.dh + 1;
        let top = oy0 * self.sh;
        let ya = top.saturating_sub(self.pt).min(self.h);
        let yb = (top + (oy1 - oy0 - 1) * self.sh + reach).saturating_sub(self.pt).min(self.h).max(ya);
        (ya, yb)
    }

    /// How many times the input rows that `rows` output rows read exceed the rows they advance
    /// by (`rows` times the stride): what a producer computing each range's input computes.
    pub(super) fn halo(&self, rows: usize) -> f64 {
        self.input_rows(rows) as f64 / (rows.max(1) * self.sh) as f64
    }

    /// Floats one worker thread holds: its input tile and its output band.
    pub(super) fn thread_floats(&self) -> u64 {
        // Both are below the checked `ph * pw * MAX_LANES` and `oh * ow` (the output's size).
        ((self.tile_rows * self.pw + self.band * self.ow) * MAX_LANES) as u64
    }

    /// Convolves every channel of `xs` (`[n, c, h, w]`) with its kernel in `ws` (`[c, kh, kw]`)
    /// into `out` (`[n, c, oh, ow]`, need not be initialised: every element is written), with
    /// `bias` (`c` values) and `clamp`, the weights blocked once where `keep` holds them.
    /// Blocks of channels run in parallel.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        &self,
        xs: &[f32],
        ws: &[f32],
        out: &mut [MaybeUninit<f32>],
        [n, c]: [usize; 2],
        bias: Option<&[f32]>,
        clamp: Option<Clamp>,
        keep: Keep<'_>,
    ) {
        assert!(
            xs.len() >= n * c * self.h * self.w
                && ws.len() >= c * self.kh * self.kw
                && out.len() >= n * c * self.oh * self.ow
                && bias.is_none_or(|b| b.len() >= c),
            "depthwise: operands smaller than their shapes"
        );
        if n == 0 || c == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if simd::avx512() {
                return self.blocks::<16>(xs, ws, out, [n, c], (bias, clamp, keep), self.unit512());
            }
            if simd::fma() {
                return self.blocks::<8>(xs, ws, out, [n, c], (bias, clamp, keep), Self::unit_avx2);
            }
        }
        self.blocks::<8>(xs, ws, out, [n, c], (bias, clamp, keep), Self::unit_portable)
    }

    /// Whether [`Depthwise::channels_last`] takes this geometry: stride 1, undilated, a 3x3 or
    /// 5x5 kernel padded by half its size on every side (the output plane is the input's), on
    /// planes at most [`CHANNELS_LAST_WIDTH`] wide, with AVX-512.
    pub(super) fn takes_channels_last(&self) -> bool {
        self.takes_banded()
            && self.sh == 1
            && [self.pt, self.pl] == [self.kh / 2; 2]
            && [self.oh, self.ow] == [self.h, self.w]
            && (1..=CHANNELS_LAST_WIDTH).contains(&self.w)
    }

    /// The convolution of `n` images laid out channels last (`xs`: `[n][h][w][c]`) into `out`
    /// (the same layout; every element written), `c` a multiple of 16. Each output row takes
    /// one accumulator per pixel and 16 channels, and every tap (the padding's included, as
    /// zeros) one multiply-add in the blocked kernel's order (bias first, then the taps row by
    /// row), so it computes the same numbers as [`Depthwise::run`] on the same images laid out
    /// planar. For small planes (EfficientNet's 7x7 stage) whose pointwise products run
    /// channels last too, so nothing is transposed between them. Returns false, untouched,
    /// where [`Depthwise::takes_channels_last`] does not hold or `c` is not a multiple of 16.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn channels_last(
        &self,
        xs: &[f32],
        ws: &[f32],
        [n, c]: [usize; 2],
        bias: Option<&[f32]>,
        clamp: Option<Clamp>,
        keep: Keep<'_>,
        out: &mut [MaybeUninit<f32>],
    ) -> bool {
        let taps = self.kh * self.kw;
        if !self.takes_channels_last() || !c.is_multiple_of(16) {
            return false;
        }
        // (w ≤ 8 and kh·kw ≤ 25 here; n·h·w·c is checked.)
        let row = self.w * c;
        let total = n.checked_mul(self.h).and_then(|rows| rows.checked_mul(row));
        assert!(
            total.is_some_and(|t| xs.len() >= t && out.len() >= t)
                && c.checked_mul(taps).is_some_and(|ct| ws.len() >= ct)
                && bias.is_none_or(|b| b.len() >= c),
            "depthwise: operands smaller than their shapes"
        );
        if n == 0 || c == 0 {
            return true;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let blocked = Blocked::get::<16>(ws, bias, c, taps, keep);
            let (wb, bb) = blocked.lanes::<16>();
            // Units of output rows, as many per image as there are threads (the whole image on
            // one thread): each unit runs block by block of channels, so a block's few input
            // pixels stay in L1 for all of the unit's rows.
            let (h, k) = (self.h, self.kh);
            let per = h.div_ceil(rayon::current_num_threads().clamp(1, h));
            let units: Vec<(usize, usize, &mut [MaybeUninit<f32>])> = out[..n * h * row]
                .chunks_exact_mut(h * row)
                .enumerate()
                .flat_map(|(i, image)| image.chunks_mut(per * row).enumerate().map(move |(u, o)| (i, u * per, o)))
                .collect();
            crate::nn::kernels::par::for_each(units, |(i, oy0, orows)| {
                let image = &xs[i * h * row..(i + 1) * h * row];
                // SAFETY: the CPU has AVX-512F (`takes_channels_last`); the kernel is 3x3 or
                // 5x5 and the width at most MAX_WIDTH (the same); the image holds h rows of
                // `row` = w·c floats, `c` a multiple of 16 (checked above), `wb` and `bb` are
                // blocked for `c` channels of `taps` taps, and `orows` holds whole output rows
                // from `oy0`.
                unsafe { last::rows(image, oy0, (wb, bb), clamp, [h, self.w, c, k], orows) };
            });
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = keep;
            false
        }
    }

    /// Whether [`Depthwise::rows_last`] takes this geometry: undilated, a square 3x3 or 5x5 kernel
    /// at stride 1 or 2 both ways, any padding and width, with AVX-512.
    pub(super) fn takes_banded(&self) -> bool {
        cfg!(target_arch = "x86_64")
            && simd::avx512()
            && !self.dilated
            && self.kh == self.kw
            && matches!(self.kh, 3 | 5)
            && self.sh == self.sw
            && matches!(self.sh, 1 | 2)
    }

    /// The most input rows `rows` consecutive output rows read (`None` on overflow).
    pub(super) fn rows_read(&self, rows: usize) -> Option<usize> {
        rows.saturating_sub(1).checked_mul(self.sh)?.checked_add(self.kh)
    }

    /// The convolution row by row on images laid out channels last, for a block that computes
    /// its input a band of rows at a time ([`super::conv::channels_last_banded`]): `None` where
    /// [`Depthwise::takes_banded`] does not hold, `c` is not a multiple of 16, or the weights
    /// (`[c, kh·kw]`) or bias are shorter than `c` channels.
    pub(super) fn rows_last(
        &self,
        ws: &[f32],
        bias: Option<&[f32]>,
        c: usize,
        clamp: Option<Clamp>,
        keep: Keep<'_>,
    ) -> Option<RowsLast<'_>> {
        let taps = self.kh * self.kw;
        let short = c.checked_mul(taps).is_none_or(|ct| ws.len() < ct) || bias.is_some_and(|b| b.len() < c);
        if !self.takes_banded() || c == 0 || !c.is_multiple_of(16) || short {
            return None;
        }
        Some(RowsLast { dw: self, c, clamp, blocked: Blocked::get::<16>(ws, bias, c, taps, keep) })
    }

    /// Runs the convolution `rows` output rows of one image at a time (the last range of an
    /// image may be shorter), every channel into a scratch buffer (`[c][rows × ow]`), which
    /// `then` gets with the image, the rows and that range's item of `items` (one per image
    /// and range, images first) while it is still in cache. Ranges run in parallel. With a
    /// `source`, each range's input rows come from it (`xs` is then unused): a producer whose
    /// output need never exist whole. Returns whether every range reached `then` (a range
    /// whose source failed is skipped, and its rows of the output are left unwritten).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_banded<T: Send>(
        &self,
        xs: &[f32],
        ws: &[f32],
        [n, c]: [usize; 2],
        bias: Option<&[f32]>,
        clamp: Option<Clamp>,
        keep: Keep<'_>,
        rows: usize,
        items: Vec<T>,
        (source, then): (Option<&Source<'_>>, &Then<'_, T>),
    ) -> bool {
        assert!(
            (source.is_some() || xs.len() >= n * c * self.h * self.w)
                && ws.len() >= c * self.kh * self.kw
                && bias.is_none_or(|b| b.len() >= c)
                && rows > 0
                && items.len() == n * self.oh.div_ceil(rows),
            "depthwise: operands smaller than their shapes"
        );
        if n == 0 || c == 0 {
            return true;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if simd::avx512() {
                return self.banded::<16, T>(
                    xs,
                    ws,
                    [n, c],
                    (bias, clamp, keep),
                    (rows, items, source, then),
                    self.unit512(),
                );
            }
            if simd::fma() {
                return self.banded::<8, T>(
                    xs,
                    ws,
                    [n, c],
                    (bias, clamp, keep),
                    (rows, items, source, then),
                    Self::unit_avx2,
                );
            }
        }
        self.banded::<8, T>(xs, ws, [n, c], (bias, clamp, keep), (rows, items, source, then), Self::unit_portable)
    }

    /// [`Depthwise::run_banded`] with `unit` (one the CPU can run).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn banded<const L: usize, T: Send>(
        &self,
        xs: &[f32],
        ws: &[f32],
        [_, c]: [usize; 2],
        (bias, clamp, keep): (Option<&[f32]>, Option<Clamp>, Keep<'_>),
        (rows, items, source, then): (usize, Vec<T>, Option<&Source<'_>>, &Then<'_, T>),
        unit: Unit<L>,
    ) -> bool {
        let taps = self.kh * self.kw;
        let groups = c.div_ceil(L);
        let blocked = Blocked::get::<L>(ws, bias, c, taps, keep);
        let (wb, bb) = blocked.lanes::<L>();
        let plane = self.h * self.w;
        let ranges = self.oh.div_ceil(rows);
        let units: Vec<(usize, usize, T)> =
            items.into_iter().enumerate().map(|(u, t)| (u / ranges, (u % ranges) * rows, t)).collect();
        let skipped = std::sync::atomic::AtomicBool::new(false);
        crate::nn::kernels::par::for_each_init(
            units,
            || {
                let tile = super::filled(self.tile_rows * self.pw, [0f32; L]);
                // The scratch is written whole by each range's units before `then` reads it.
                let mut scratch: Vec<MaybeUninit<f32>> = Vec::new();
                scratch.resize_with(c * rows * self.ow, MaybeUninit::uninit);
                (tile, super::filled(self.band * self.ow, [0f32; L]), scratch, Vec::new())
            },
            |(tile, obuf, scratch, input), (i, oy0, item)| {
                let oy1 = (oy0 + rows).min(self.oh);
                let len = (oy1 - oy0) * self.ow;
                // The input rows these output rows read: from `source`, or this image's.
                let (ya, yb) = self.input_span(oy0, oy1);
                let (src, plane, row0) = match source {
                    Some(source) => {
                        if !source(i, (ya, yb), input) || input.len() < c * (yb - ya) * self.w {
                            skipped.store(true, std::sync::atomic::Ordering::Relaxed);
                            return;
                        }
                        (&input[..], (yb - ya) * self.w, ya)
                    }
                    None => (&xs[i * c * plane..(i + 1) * c * plane], plane, 0),
                };
                let scratch = &mut scratch[..c * len];
                {
                    let mut channels = scratch.chunks_exact_mut(len);
                    for gi in 0..groups {
                        let lanes = L.min(c - gi * L);
                        let first = gi * L * plane;
                        let block = Block {
                            src: &src[first..first + lanes * plane],
                            plane,
                            row0,
                            lanes,
                            weights: &wb[gi * taps..(gi + 1) * taps],
                            bias: bb[gi],
                            clamp,
                        };
                        let mut dsts: Dst<'_, L> =
                            std::array::from_fn(|cl| if cl < lanes { channels.next() } else { None });
                        // SAFETY: `run_banded` chose `unit` for features this CPU has.
                        unsafe { unit(self, block, (oy0, oy1), tile, obuf, &mut dsts) }
                    }
                }
                // SAFETY: the c channels' rows are the `channels` chunks above, each handed to
                // one unit as a destination, and a unit writes every element of its
                // destinations (it panics on one shorter than its rows, as for `run`'s
                // uninitialised output); MaybeUninit<f32> has f32's layout.
                let scratch = unsafe { std::slice::from_raw_parts(scratch.as_ptr().cast::<f32>(), scratch.len()) };
                then(i, (oy0, oy1), scratch, item);
            },
        );
        !skipped.into_inner()
    }

    /// Splits the work into blocks of `L` channels of one image and runs `unit` on each, in
    /// parallel. `unit` must be one the CPU can run (`run` chooses it by the CPU's features).
    #[allow(clippy::too_many_arguments)]
    fn blocks<const L: usize>(
        &self,
        xs: &[f32],
        ws: &[f32],
        out: &mut [MaybeUninit<f32>],
        [n, c]: [usize; 2],
        (bias, clamp, keep): (Option<&[f32]>, Option<Clamp>, Keep<'_>),
        unit: Unit<L>,
    ) {
        let taps = self.kh * self.kw;
        let groups = c.div_ceil(L);
        let blocked = Blocked::get::<L>(ws, bias, c, taps, keep);
        let (wb, bb) = blocked.lanes::<L>();
        // Each unit of work: one image's block of channels over a range of output rows (whole
        // bands), and for each of its channels, those rows of the output. Blocks split into
        // row ranges where there are too few of them to share out evenly (9 blocks of 16
        // channels on 2 threads would leave one thread idle a ninth of the time).
        let (plane, oplane) = (self.h * self.w, self.oh * self.ow);
        let bands = self.oh.div_ceil(self.band);
        let splits = (4 * rayon::current_num_threads()).div_ceil(n * groups).clamp(1, bands);
        let rows = bands.div_ceil(splits) * self.band;
        let mut units = Vec::with_capacity(n * groups * splits);
        let mut rest = &mut out[..n * c * oplane];
        for i in 0..n {
            for gi in 0..groups {
                let lanes = L.min(c - gi * L);
                let (dst, tail) = rest.split_at_mut(lanes * oplane);
                rest = tail;
                let mut planes = dst.chunks_exact_mut(oplane).map(|d| d.chunks_mut(rows * self.ow));
                let mut per_channel: [_; L] = std::array::from_fn(|_| planes.next());
                for oy0 in (0..self.oh).step_by(rows) {
                    let dsts: Dst<'_, L> = std::array::from_fn(|cl| per_channel[cl].as_mut().and_then(Iterator::next));
                    units.push((i, gi, lanes, oy0, dsts));
                }
            }
        }
        crate::nn::kernels::par::for_each_init(
            units,
            // Per job of the loop: the tile (its border columns stay zero: every band writes
            // the same interior) and the output band.
            || (super::filled(self.tile_rows * self.pw, [0f32; L]), super::filled(self.band * self.ow, [0f32; L])),
            |(tile, obuf), (i, gi, lanes, oy0, mut dsts)| {
                // The neighbouring blocks' weights, which this thread most likely takes next
                // (the loop's caller runs its items in order, its helpers in reverse).
                for next in [gi.checked_sub(1), Some(gi + 1)].into_iter().flatten() {
                    if let Some(ws) = wb.get(next * taps..(next + 1) * taps) {
                        crate::nn::kernels::simd::prefetch(ws);
                    }
                }
                let first = (i * c + gi * L) * plane;
                let block = Block {
                    src: &xs[first..first + lanes * plane],
                    plane,
                    row0: 0,
                    lanes,
                    weights: &wb[gi * taps..(gi + 1) * taps],
                    bias: bb[gi],
                    clamp,
                };
                let oy1 = (oy0 + rows).min(self.oh);
                // SAFETY: `run` chose `unit` for features this CPU has.
                unsafe { unit(self, block, (oy0, oy1), tile, obuf, &mut dsts) }
            },
        );
    }

    /// One block: fill the tile, every tap, and the output back to NCHW (the layout changes
    /// `L` pixels at a time, as `L x L` squares transposed in registers by `K`).
    ///
    /// # Safety
    /// The CPU must run `K`.
    #[inline(always)]
    unsafe fn unit<const L: usize, K: Lanes<L>>(
        &self,
        b: Block<'_, L>,
        (from, to): (usize, usize),
        tile: &mut [[f32; L]],
        obuf: &mut [[f32; L]],
        dst: &mut Dst<'_, L>,
    ) {
        let (plane, w) = (b.plane, self.w);
        let reach = (self.kh - 1) * self.dh + 1;
        for oy0 in (from..to).step_by(self.band) {
            let oy1 = (oy0 + self.band).min(to);
            // The padded rows this band reads, and the input rows among them.
            let (top, rows) = (oy0 * self.sh, (oy1 - oy0 - 1) * self.sh + reach);
            let ya = top.saturating_sub(self.pt).min(self.h);
            let yb = (top + rows).saturating_sub(self.pt).min(self.h).max(ya);
            // Padding rows (zero) above and below the input's: where the input's rows start in
            // the tile (none of them may fall in it, with pads beyond the kernel's reach).
            let first = self.pt.saturating_sub(top).min(rows);
            for r in (0..first).chain(first + yb - ya..rows) {
                tile[r * self.pw + self.pl..][..w].fill([0.0; L]);
            }
            // In: `L` pixels of every channel, turned into `L` pixels of `L` channels each.
            let span = ((ya - b.row0) * w, (yb - b.row0) * w);
            let pixel = |p: usize| (p / w + first) * self.pw + p % w + self.pl;
            let whole = (span.1 - span.0) - (span.1 - span.0) % L;
            // Each channel's input rows of this band, checked once.
            let ins: [&[f32]; L] =
                std::array::from_fn(|cl| if cl < b.lanes { &b.src[cl * plane..][span.0..span.1] } else { &[] });
            let mut ats = [0usize; L];
            for p0 in (0..whole).step_by(L) {
                let (mut at, mut x) = (pixel(p0), p0 % w);
                for a in &mut ats {
                    *a = at;
                    x += 1;
                    at += 1;
                    if x == w {
                        (x, at) = (0, at + self.pw - w);
                    }
                }
                // SAFETY: the caller's CPU runs `K`.
                unsafe { K::transpose_in(&ins, b.lanes, p0, tile, &ats) };
            }
            for p in whole..span.1 - span.0 {
                for (t, src) in tile[pixel(p)].iter_mut().zip(&ins[..b.lanes]) {
                    *t = src[p];
                }
            }
            let out = &mut obuf[..(oy1 - oy0) * self.ow];
            // SAFETY: the caller's CPU runs `K` (as it runs `tr`).
            unsafe { self.taps::<L, K>(tile, b.weights, b.bias, b.clamp, out) };
            // Out: `L` pixels of `L` channels, turned into `L` pixels of each channel.
            let at = (oy0 - from) * self.ow;
            let whole = out.len() - out.len() % L;
            for (p0, pixels) in out[..whole].chunks_exact(L).enumerate() {
                let pixels: &[[f32; L]; L] = pixels.try_into().unwrap_or_else(|_| unreachable!("chunks of L"));
                // SAFETY: as above.
                unsafe { K::transpose_out(pixels, dst, at + p0 * L) };
            }
            // Channel `cl` to destination `cl`, as `transpose_out` does.
            for (cl, d) in dst.iter_mut().enumerate().filter_map(|(cl, d)| Some((cl, d.as_mut()?))) {
                for (d, o) in d[at + whole..at + out.len()].iter_mut().zip(&out[whole..]) {
                    d.write(o[cl]);
                }
            }
        }
    }

    /// [`Depthwise::unit`] on 16 lanes, compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn unit_avx512(
        &self,
        b: Block<'_, 16>,
        rows: (usize, usize),
        tile: &mut [[f32; 16]],
        obuf: &mut [[f32; 16]],
        dst: &mut Dst<'_, 16>,
    ) {
        // SAFETY: this CPU supports AVX-512F (this function's own precondition).
        unsafe { self.unit::<16, x86::Avx512>(b, rows, tile, obuf, dst) }
    }

    /// The AVX-512 unit for this geometry: rows of each channel in place ([`direct`]) where
    /// output rows are wide and taps undilated with a column stride of 1 or 2, else the
    /// blocked one.
    #[cfg(target_arch = "x86_64")]
    fn unit512(&self) -> Unit<16> {
        if !self.dilated && self.ow >= direct::MIN_WIDTH && matches!(self.sw, 1 | 2) {
            Self::unit_direct
        } else {
            Self::unit_avx512
        }
    }

    /// [`direct::unit`] in [`Unit`]'s shape (it needs neither the tile nor the output band).
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `self` must not be dilated, with a column stride of 1
    /// or 2 ([`Depthwise::unit512`] chooses it only then).
    #[cfg(target_arch = "x86_64")]
    unsafe fn unit_direct(
        &self,
        b: Block<'_, 16>,
        rows: (usize, usize),
        _: &mut [[f32; 16]],
        _: &mut [[f32; 16]],
        dst: &mut Dst<'_, 16>,
    ) {
        // SAFETY: forwarded (this function's own preconditions).
        unsafe { direct::unit(self, &b, rows, dst) }
    }

    /// [`Depthwise::unit`] on 8 lanes, compiled for AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn unit_avx2(
        &self,
        b: Block<'_, 8>,
        rows: (usize, usize),
        tile: &mut [[f32; 8]],
        obuf: &mut [[f32; 8]],
        dst: &mut Dst<'_, 8>,
    ) {
        // SAFETY: this CPU supports AVX2 (this function's own precondition).
        unsafe { self.unit::<8, x86::Avx2>(b, rows, tile, obuf, dst) }
    }

    /// [`Depthwise::unit`] on 8 lanes, without FMA (any CPU).
    ///
    /// # Safety
    /// None: `unsafe` only to share [`Unit`]'s type.
    unsafe fn unit_portable(
        &self,
        b: Block<'_, 8>,
        rows: (usize, usize),
        tile: &mut [[f32; 8]],
        obuf: &mut [[f32; 8]],
        dst: &mut Dst<'_, 8>,
    ) {
        // SAFETY: `Portable` runs on any CPU.
        unsafe { self.unit::<8, Portable>(b, rows, tile, obuf, dst) }
    }

    /// Every output pixel of the block: bias plus each tap's weights times the tile, clamped.
    ///
    /// # Safety
    /// The CPU must run `K`.
    #[inline(always)]
    unsafe fn taps<const L: usize, K: Lanes<L>>(
        &self,
        tile: &[[f32; L]],
        wb: &[[f32; L]],
        bias: [f32; L],
        clamp: Option<Clamp>,
        obuf: &mut [[f32; L]],
    ) {
        // SAFETY: the caller's CPU runs `K`.
        unsafe {
            match self.sw {
                1 => self.rows::<L, K, 1>(tile, wb, bias, clamp, obuf),
                2 => self.rows::<L, K, 2>(tile, wb, bias, clamp, obuf),
                _ => self.rows::<L, K, 0>(tile, wb, bias, clamp, obuf),
            }
        }
    }

    /// [`Depthwise::taps`] for a column stride of `S` (0: `self.sw`, known only at run time).
    /// Each run of [`RUN`] pixels of a row reads, per tap, one window of the tile: one bounds
    /// check per tap and run, and with `S` known, none inside the window.
    ///
    /// # Safety
    /// The CPU must run `K`.
    #[inline(always)]
    unsafe fn rows<const L: usize, K: Lanes<L>, const S: usize>(
        &self,
        tile: &[[f32; L]],
        wb: &[[f32; L]],
        bias: [f32; L],
        clamp: Option<Clamp>,
        obuf: &mut [[f32; L]],
    ) {
        let sw = if S == 0 { self.sw } else { S };
        for (oy, orow) in obuf.chunks_exact_mut(self.ow).enumerate() {
            let row0 = oy * self.sh * self.pw;
            let mut runs = orow.chunks_exact_mut(RUN);
            for (i, run) in runs.by_ref().enumerate() {
                // SAFETY (all below): the caller's CPU runs `K`.
                unsafe { self.pixels::<L, K, S, RUN>(tile, row0 + i * RUN * sw, wb, bias, clamp, run) };
            }
            // The row's last pixels as one shorter run.
            let base = row0 + (self.ow - self.ow % RUN) * sw;
            let rest = runs.into_remainder();
            unsafe {
                match rest.len() {
                    1 => self.pixels::<L, K, S, 1>(tile, base, wb, bias, clamp, rest),
                    2 => self.pixels::<L, K, S, 2>(tile, base, wb, bias, clamp, rest),
                    3 => self.pixels::<L, K, S, 3>(tile, base, wb, bias, clamp, rest),
                    4 => self.pixels::<L, K, S, 4>(tile, base, wb, bias, clamp, rest),
                    5 => self.pixels::<L, K, S, 5>(tile, base, wb, bias, clamp, rest),
                    6 => self.pixels::<L, K, S, 6>(tile, base, wb, bias, clamp, rest),
                    7 => self.pixels::<L, K, S, 7>(tile, base, wb, bias, clamp, rest),
                    _ => {}
                }
            }
        }
    }

    /// `R` neighbouring pixels of an output row (`out`), the first reading the tile from
    /// `base`: `R` independent accumulators, each tap's weights loaded once for all of them.
    ///
    /// # Safety
    /// The CPU must run `K`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pixels<const L: usize, K: Lanes<L>, const S: usize, const R: usize>(
        &self,
        tile: &[[f32; L]],
        base: usize,
        wb: &[[f32; L]],
        bias: [f32; L],
        clamp: Option<Clamp>,
        out: &mut [[f32; L]],
    ) {
        if S != 0 && !self.dilated && self.kh == self.kw {
            // SAFETY (both): the caller's CPU runs `K`; the kernel is `kh`×`kh`, undilated,
            // with column stride `S` (checked here).
            match self.kh {
                3 => return unsafe { self.pixels_fixed::<L, K, S, R, 3>(tile, base, wb, bias, clamp, out) },
                5 => return unsafe { self.pixels_fixed::<L, K, S, R, 5>(tile, base, wb, bias, clamp, out) },
                _ => {}
            }
        }
        let sw = if S == 0 { self.sw } else { S };
        let span = (R - 1) * sw + 1;
        let mut acc = [bias; R];
        for (&off, wv) in self.offsets.iter().zip(wb) {
            let win = &tile[base + off..][..span];
            // SAFETY (both): the caller's CPU runs `K`.
            if S == 0 {
                for (a, t) in acc.iter_mut().zip(win.iter().step_by(sw)) {
                    unsafe { K::fma(a, t, wv) };
                }
            } else {
                for (r, a) in acc.iter_mut().enumerate() {
                    unsafe { K::fma(a, &win[r * S], wv) };
                }
            }
        }
        for (a, o) in acc.into_iter().zip(out) {
            // SAFETY: as above.
            *o = unsafe { finish::<L, K>(a, clamp) };
        }
    }

    /// [`Depthwise::pixels`] for an undilated `KS`×`KS` kernel at column stride `S`: the taps
    /// unrolled, and the window they read checked once rather than per tap (the per-tap
    /// slicing and the loop over the offsets cost about as much as the multiply-adds).
    ///
    /// # Safety
    /// The CPU must run `K`; `self` must be undilated with `kh = kw = KS` and `sw = S`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pixels_fixed<const L: usize, K: Lanes<L>, const S: usize, const R: usize, const KS: usize>(
        &self,
        tile: &[[f32; L]],
        base: usize,
        wb: &[[f32; L]],
        bias: [f32; L],
        clamp: Option<Clamp>,
        out: &mut [[f32; L]],
    ) {
        let pw = self.pw;
        // Every tap of the `R` pixels: tap (ky, kx) of pixel r reads `ky·pw + kx + r·S` past
        // `base` (the offsets of `new`, undilated), at most `(KS-1)·pw + (KS-1) + (R-1)·S`.
        let win = &tile[base..base + (KS - 1) * pw + (R - 1) * S + KS];
        let wb = &wb[..KS * KS];
        let mut acc = [bias; R];
        for ky in 0..KS {
            for kx in 0..KS {
                let wv = &wb[ky * KS + kx];
                for (r, a) in acc.iter_mut().enumerate() {
                    // SAFETY: ky < KS, kx < KS and r < R, so the index is at most the bound
                    // above, below `win.len()`.
                    let t = unsafe { win.get_unchecked(ky * pw + kx + r * S) };
                    // SAFETY: the caller's CPU runs `K`.
                    unsafe { K::fma(a, t, wv) };
                }
            }
        }
        for (a, o) in acc.into_iter().zip(out) {
            // SAFETY: as above.
            *o = unsafe { finish::<L, K>(a, clamp) };
        }
    }
}

/// A depthwise convolution's weights (`[c, taps]`) and bias by blocks of `lanes` channels, as
/// the blocked unit reads them: per block and tap, `lanes` weights; per block, `lanes` biases
/// (lanes past the last channel zero). Made once per weight: remade on every run, it took
/// 16% of a 7x7 convolution of 1,152 channels.
pub(crate) struct Blocked {
    lanes: usize,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

/// Where a convolution keeps its [`Blocked`] weights, under the ids of the weight and bias
/// tensors they come from and the lane count.
pub(crate) type BlockedWeights = super::Derived<Blocked, (TensorId, Option<TensorId>, usize)>;

/// A [`BlockedWeights`] cache and the ids of the weight and bias tensors at hand; `None` makes
/// the blocks for this run only.
pub(crate) type Keep<'a> = Option<(&'a BlockedWeights, TensorId, Option<TensorId>)>;

impl Blocked {
    /// The weights (`[c, taps]`, at least `c·taps`) and bias (at least `c`, if any) by blocks
    /// of `lanes` channels.
    fn new(ws: &[f32], bias: Option<&[f32]>, c: usize, taps: usize, lanes: usize) -> Self {
        let groups = c.div_ceil(lanes);
        let mut weights = vec![0f32; groups * taps * lanes];
        // (No taps, no weights: `chunks_exact` takes no empty chunks.)
        if taps > 0 {
            for (ch, k) in ws.chunks_exact(taps).take(c).enumerate() {
                let block = &mut weights[(ch / lanes) * taps * lanes..];
                for (t, &v) in k.iter().enumerate() {
                    block[t * lanes + ch % lanes] = v;
                }
            }
        }
        let mut by_lane = vec![0f32; groups * lanes];
        if let Some(b) = bias {
            by_lane[..c.min(b.len())].copy_from_slice(&b[..c.min(b.len())]);
        }
        Blocked { lanes, weights, bias: by_lane }
    }

    /// Those of `keep` for these operands, made if it holds none (or none for `L` lanes).
    fn get<const L: usize>(ws: &[f32], bias: Option<&[f32]>, c: usize, taps: usize, keep: Keep<'_>) -> Arc<Self> {
        let make = || Blocked::new(ws, bias, c, taps, L);
        match keep {
            Some((cache, w, b)) => cache.get((w, b, L), make),
            None => Arc::new(make()),
        }
    }

    /// The weights and biases as blocks of `L` lanes. Panics where they were made for another
    /// lane count.
    fn lanes<const L: usize>(&self) -> (&[[f32; L]], &[[f32; L]]) {
        assert_eq!(self.lanes, L, "depthwise: weights blocked for {} lanes, read as {L}", self.lanes);
        (self.weights.as_chunks::<L>().0, self.bias.as_chunks::<L>().0)
    }
}

/// Blocks `w` (a constant depthwise weight `[c, 1, kh, kw]`, with its constant `bias` if any)
/// into `cache` ahead of the first run, for the lane count this CPU runs.
pub(crate) fn prepare(cache: &BlockedWeights, w: &Tensor, bias: Option<&Tensor>) {
    let (c, taps) = match w.dims() {
        // (A kernel without taps is left to the plan to refuse.)
        &[c, 1, kh, kw] if kh > 0 && kw > 0 => match kh.checked_mul(kw) {
            Some(taps) => (c, taps),
            None => return,
        },
        _ => return,
    };
    let bias = bias.filter(|b| b.dtype() == candle_core::DType::F32 && b.elem_count() == c);
    let _ = super::with_f32(w, |ws| {
        let bs = bias.map(|b| super::with_f32(b, <[f32]>::to_vec)).transpose()?;
        let keep = Some((cache, w.id(), bias.map(Tensor::id)));
        if lanes() == 16 {
            Blocked::get::<16>(ws, bs.as_deref(), c, taps, keep);
        } else {
            Blocked::get::<8>(ws, bs.as_deref(), c, taps, keep);
        }
        Ok::<_, crate::nn::error::NnError>(())
    });
}

/// At most what [`prepare`] allocates for `w`: its blocks (channels rounded up to a block of the
/// widest lanes, with as many biases) kept, and up to two copies each of `w` and the bias while
/// it reads them.
pub(crate) fn prepared_bytes(w: &Tensor) -> super::Prepared {
    let (c, taps) = match w.dims() {
        &[c, 1, kh, kw] => (c as u64, (kh as u64).saturating_mul(kw as u64)),
        _ => return Default::default(),
    };
    let channels = c.div_ceil(MAX_LANES as u64).saturating_mul(MAX_LANES as u64);
    super::Prepared {
        kept: super::f32_bytes(channels.saturating_mul(taps.saturating_add(1))),
        // A constant that is not contiguous is copied twice on its way to f32s, as is the bias.
        transient: super::f32_bytes(c.saturating_mul(taps.saturating_add(1)).saturating_mul(2)),
    }
}

/// The channels per block the kernels run at on this CPU.
fn lanes() -> usize {
    if cfg!(target_arch = "x86_64") && simd::avx512() { 16 } else { 8 }
}

/// The two operations of the tap loop on `L` lanes, as one vector instruction each where the
/// CPU has them (so the compiler cannot vectorise the loop the wrong way round, across pixels).
trait Lanes<const L: usize> {
    /// `acc += t * w`, lane by lane.
    ///
    /// # Safety
    /// The CPU must have the implementation's instructions.
    unsafe fn fma(acc: &mut [f32; L], t: &[f32; L], w: &[f32; L]);

    /// `acc` clamped to `lo..=hi`.
    ///
    /// # Safety
    /// As for [`Lanes::fma`].
    unsafe fn clamp(acc: [f32; L], lo: f32, hi: f32) -> [f32; L];

    /// Into the tile: `tile[at[j]][i] = rows[i][p0 + j]` for the first `lanes` rows, zero in
    /// the lanes past them (`L` pixels of `L` channel rows, turned into pixels of channels).
    /// Panics where a row is shorter than `p0 + L` or an `at` lies outside the tile. The
    /// vector levels turn the square in registers (inlined into the unit: a call per square
    /// cost more than the shuffles); this default, through memory, is the portable one.
    ///
    /// # Safety
    /// As for [`Lanes::fma`].
    #[inline(always)]
    unsafe fn transpose_in(rows: &[&[f32]; L], lanes: usize, p0: usize, tile: &mut [[f32; L]], at: &[usize; L]) {
        let mut square = [[0f32; L]; L];
        for (row, src) in square.iter_mut().zip(&rows[..lanes]) {
            row.copy_from_slice(&src[p0..p0 + L]);
        }
        transpose(&mut square);
        for (v, &at) in square.iter().zip(at) {
            tile[at] = *v;
        }
    }

    /// Out of the output band: `dst[i][at + j] = pixels[j][i]` for every channel `i` with a
    /// destination (`L` pixels of `L` channels, turned into `L` pixels of each channel).
    /// Panics where a destination is shorter than `at + L`.
    ///
    /// # Safety
    /// As for [`Lanes::fma`].
    #[inline(always)]
    unsafe fn transpose_out(pixels: &[[f32; L]; L], dst: &mut Dst<'_, L>, at: usize) {
        let mut square = *pixels;
        transpose(&mut square);
        for (row, d) in square.iter().zip(dst.iter_mut()) {
            if let Some(d) = d {
                // One vector store per row (an element-wise `write` loop stays scalar).
                d[at..][..L].copy_from_slice(&row.map(MaybeUninit::new));
            }
        }
    }
}

/// `acc`, clamped when there is a clamp.
///
/// # Safety
/// The CPU must run `K`.
#[inline(always)]
unsafe fn finish<const L: usize, K: Lanes<L>>(acc: [f32; L], clamp: Option<Clamp>) -> [f32; L] {
    match clamp {
        // SAFETY: the caller's CPU runs `K`.
        Some(Clamp { lo, hi }) => unsafe { K::clamp(acc, lo, hi) },
        None => acc,
    }
}

/// Plain Rust, any CPU: separate multiply and add.
struct Portable;

impl<const L: usize> Lanes<L> for Portable {
    #[inline(always)]
    unsafe fn fma(acc: &mut [f32; L], t: &[f32; L], w: &[f32; L]) {
        for l in 0..L {
            acc[l] += t[l] * w[l];
        }
    }

    #[inline(always)]
    unsafe fn clamp(acc: [f32; L], lo: f32, hi: f32) -> [f32; L] {
        acc.map(|v| v.max(lo).min(hi))
    }
}

/// Transposes a square in place (any CPU).
fn transpose<const L: usize>(m: &mut [[f32; L]; L]) {
    let copy = *m;
    for (i, row) in m.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = copy[j][i];
        }
    }
}

/// The transposes in vector registers.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lanes;
    use crate::nn::kernels::simd;

    /// AVX-512F: 16 lanes, fused multiply-add.
    pub(super) struct Avx512;

    impl Lanes<16> for Avx512 {
        #[inline(always)]
        unsafe fn fma(acc: &mut [f32; 16], t: &[f32; 16], w: &[f32; 16]) {
            // SAFETY: each array is 16 floats, one unaligned 512-bit load or store; the caller's
            // CPU has AVX-512F (this trait's precondition).
            unsafe {
                let v = _mm512_fmadd_ps(
                    _mm512_loadu_ps(t.as_ptr()),
                    _mm512_loadu_ps(w.as_ptr()),
                    _mm512_loadu_ps(acc.as_ptr()),
                );
                _mm512_storeu_ps(acc.as_mut_ptr(), v);
            }
        }

        #[inline(always)]
        unsafe fn clamp(acc: [f32; 16], lo: f32, hi: f32) -> [f32; 16] {
            let mut out = [0f32; 16];
            // SAFETY: as above.
            unsafe {
                let v =
                    _mm512_min_ps(_mm512_max_ps(_mm512_loadu_ps(acc.as_ptr()), _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
                _mm512_storeu_ps(out.as_mut_ptr(), v);
            }
            out
        }

        /// Straight from the rows into registers and from there into the tile: through a
        /// square on the stack, each vector was stored and loaded three times (a third of
        /// the unit's samples at 28x28, stride 2).
        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn transpose_in(rows: &[&[f32]; 16], lanes: usize, p0: usize, tile: &mut [[f32; 16]], at: &[usize; 16]) {
            // SAFETY (all below): the caller's CPU has AVX-512F; every load reads a row's
            // 16 floats from p0 and every store one pixel of the tile, both slices checked.
            unsafe {
                // A whole block (every block of a channel count divisible by 16) without a
                // comparison per lane (144 x 56 x 56 5x5 stride 2 on one thread: 0.121-0.131
                // -> 0.116-0.121 ms).
                let mut r = if lanes == 16 {
                    std::array::from_fn(|i| _mm512_loadu_ps(rows[i][p0..p0 + 16].as_ptr()))
                } else {
                    std::array::from_fn(|i| {
                        if i < lanes { _mm512_loadu_ps(rows[i][p0..p0 + 16].as_ptr()) } else { _mm512_setzero_ps() }
                    })
                };
                simd::transpose16(&mut r);
                for j in 0..16 {
                    _mm512_storeu_ps(tile[at[j]].as_mut_ptr(), r[j]);
                }
            }
        }

        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn transpose_out(pixels: &[[f32; 16]; 16], dst: &mut super::Dst<'_, 16>, at: usize) {
            // SAFETY (all below): as above; each store writes 16 floats of a destination
            // sliced to them (MaybeUninit<f32> has f32's layout).
            unsafe {
                let mut r = [_mm512_setzero_ps(); 16];
                for i in 0..16 {
                    r[i] = _mm512_loadu_ps(pixels[i].as_ptr());
                }
                simd::transpose16(&mut r);
                for i in 0..16 {
                    if let Some(d) = &mut dst[i] {
                        _mm512_storeu_ps(d[at..at + 16].as_mut_ptr().cast::<f32>(), r[i]);
                    }
                }
            }
        }
    }

    /// AVX2 + FMA: 8 lanes, fused multiply-add.
    pub(super) struct Avx2;

    impl Lanes<8> for Avx2 {
        #[inline(always)]
        unsafe fn fma(acc: &mut [f32; 8], t: &[f32; 8], w: &[f32; 8]) {
            // SAFETY: each array is 8 floats, one unaligned 256-bit load or store; the caller's
            // CPU has AVX2 and FMA (this trait's precondition).
            unsafe {
                let v = _mm256_fmadd_ps(
                    _mm256_loadu_ps(t.as_ptr()),
                    _mm256_loadu_ps(w.as_ptr()),
                    _mm256_loadu_ps(acc.as_ptr()),
                );
                _mm256_storeu_ps(acc.as_mut_ptr(), v);
            }
        }

        #[inline(always)]
        unsafe fn clamp(acc: [f32; 8], lo: f32, hi: f32) -> [f32; 8] {
            let mut out = [0f32; 8];
            // SAFETY: as above.
            unsafe {
                let v =
                    _mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(acc.as_ptr()), _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
                _mm256_storeu_ps(out.as_mut_ptr(), v);
            }
            out
        }

        /// As [`Avx512`]'s: straight from the rows, through registers, into the tile.
        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn transpose_in(rows: &[&[f32]; 8], lanes: usize, p0: usize, tile: &mut [[f32; 8]], at: &[usize; 8]) {
            // SAFETY (all below): the caller's CPU has AVX; every load reads a row's 8 floats
            // from p0 and every store one pixel of the tile, both slices checked.
            unsafe {
                let mut r = [_mm256_setzero_ps(); 8];
                for i in 0..8 {
                    if i < lanes {
                        r[i] = _mm256_loadu_ps(rows[i][p0..p0 + 8].as_ptr());
                    }
                }
                simd::transpose8(&mut r);
                for j in 0..8 {
                    _mm256_storeu_ps(tile[at[j]].as_mut_ptr(), r[j]);
                }
            }
        }

        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn transpose_out(pixels: &[[f32; 8]; 8], dst: &mut super::Dst<'_, 8>, at: usize) {
            // SAFETY (all below): as above; each store writes 8 floats of a destination sliced
            // to them (MaybeUninit<f32> has f32's layout).
            unsafe {
                let mut r = [_mm256_setzero_ps(); 8];
                for i in 0..8 {
                    r[i] = _mm256_loadu_ps(pixels[i].as_ptr());
                }
                simd::transpose8(&mut r);
                for i in 0..8 {
                    if let Some(d) = &mut dst[i] {
                        _mm256_storeu_ps(d[at..at + 8].as_mut_ptr().cast::<f32>(), r[i]);
                    }
                }
            }
        }
    }

    /// Transposes a 16x16 square in place through [`simd::transpose16`], as the unit's
    /// `transpose_in` and `transpose_out` do (for the tests).
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn transpose16(m: &mut [[f32; 16]; 16]) {
        // SAFETY (all below): this CPU has AVX-512F; each row is 16 floats, what one
        // unaligned 512-bit load or store covers.
        unsafe {
            let mut r = [_mm512_setzero_ps(); 16];
            for i in 0..16 {
                r[i] = _mm512_loadu_ps(m[i].as_ptr());
            }
            simd::transpose16(&mut r);
            for i in 0..16 {
                _mm512_storeu_ps(m[i].as_mut_ptr(), r[i]);
            }
        }
    }

    /// Transposes an 8x8 square in place through [`simd::transpose8`] (for the tests).
    ///
    /// # Safety
    /// The CPU must support AVX.
    #[cfg(test)]
    #[target_feature(enable = "avx")]
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn transpose8(m: &mut [[f32; 8]; 8]) {
        // SAFETY (all below): this CPU has AVX; each row is 8 floats, what one unaligned
        // 256-bit load or store covers.
        unsafe {
            let mut r = [_mm256_setzero_ps(); 8];
            for i in 0..8 {
                r[i] = _mm256_loadu_ps(m[i].as_ptr());
            }
            simd::transpose8(&mut r);
            for i in 0..8 {
                _mm256_storeu_ps(m[i].as_mut_ptr(), r[i]);
            }
        }
    }
}

/// A depthwise convolution run one output row at a time on input rows laid out channels last
/// (each `w·c` floats), which the caller computes a band at a time and keeps only while rows
/// still read them ([`Depthwise::rows_last`]).
pub(super) struct RowsLast<'a> {
    dw: &'a Depthwise,
    c: usize,
    clamp: Option<Clamp>,
    blocked: Arc<Blocked>,
}

impl RowsLast<'_> {
    /// The input rows (within the image) that output rows `rows` read.
    pub(super) fn reads(&self, rows: std::ops::Range<usize>) -> std::ops::Range<usize> {
        let d = self.dw;
        if rows.is_empty() {
            return 0..0;
        }
        let lo = (rows.start * d.sh).saturating_sub(d.pt).min(d.h);
        let hi = ((rows.end - 1) * d.sh + d.kh).saturating_sub(d.pt).min(d.h);
        lo..hi.max(lo)
    }

    /// Output row `oy` (`ow` pixels of `c` channels) into `out`, from the input rows `row`
    /// hands out (`row(y)`: row `y` of the image, `w·c` floats, for every `y` in
    /// [`RowsLast::reads`] of this row). Bias first, then every tap row by row, the padding's
    /// taps multiplying zeros: the blocked kernel's order, so the numbers are
    /// [`Depthwise::run`]'s on the same image laid out planar, to the bit. Panics where a row
    /// or `out` is shorter than its pixels.
    pub(super) fn row<'r>(&self, oy: usize, row: impl Fn(usize) -> &'r [f32], out: &mut [MaybeUninit<f32>]) {
        let d = self.dw;
        let (wb, bb) = self.blocked.lanes::<16>();
        let input = |ky: usize| (oy * d.sh + ky).checked_sub(d.pt).filter(|&y| y < d.h).map(&row);
        #[cfg(target_arch = "x86_64")]
        {
            let geometry = [d.w, self.c, d.ow, d.pl];
            macro_rules! run {
                ($k:literal, $s:literal, $p:literal) => {{
                    let rows: [Option<&[f32]>; $k] = std::array::from_fn(input);
                    // SAFETY: the CPU has AVX-512F (`takes_banded`, checked by `rows_last`); the
                    // kernel is k×k at stride s as matched; `c` is a multiple of 16 and the
                    // weights are blocked for it (`rows_last`); the operands' lengths are
                    // asserted by the kernel.
                    unsafe { last::strided::<$k, $s, $p>(rows, (wb, bb), self.clamp, geometry, out) }
                }};
            }
            match (d.kh, d.sh) {
                (3, 1) => run!(3, 1, 8),
                (3, 2) => run!(3, 2, 8),
                (5, 1) => run!(5, 1, 4),
                _ => run!(5, 2, 4),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (wb, bb, input, out);
            unreachable!("depthwise: `rows_last` runs only with AVX-512");
        }
    }
}

/// Widest plane [`Depthwise::channels_last`] takes: its kernel keeps an accumulator per pixel
/// of a row, beside the row's inputs, in the 32 registers.
const CHANNELS_LAST_WIDTH: usize = 8;

/// The channels-last kernel of [`Depthwise::channels_last`].
#[cfg(target_arch = "x86_64")]
mod last {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{CHANNELS_LAST_WIDTH as MAX_WIDTH, Clamp};

    /// Output rows `oy0..` (`out`: whole rows of `w` pixels of `c` channels) of one image
    /// (`image`: `h` rows of `w·c` floats) by a `k`×`k` kernel (3 or 5) at stride 1, padded by
    /// `k / 2`, with the weights and biases blocked by 16 channels (`wb`: per block, `k·k`
    /// taps; `bb`: per block).
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `k` 3 or 5, `w` in 1..=MAX_WIDTH, `c` a multiple of 16.
    /// The operands' lengths are asserted.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows(
        image: &[f32],
        oy0: usize,
        (wb, bb): (&[[f32; 16]], &[[f32; 16]]),
        clamp: Option<Clamp>,
        [h, w, c, k]: [usize; 4],
        out: &mut [MaybeUninit<f32>],
    ) {
        macro_rules! widths {
            ($k:literal) => {
                match w {
                    1 => blocks::<$k, 1>(image, oy0, (wb, bb), clamp, [h, c], out),
                    2 => blocks::<$k, 2>(image, oy0, (wb, bb), clamp, [h, c], out),
                    3 => blocks::<$k, 3>(image, oy0, (wb, bb), clamp, [h, c], out),
                    4 => blocks::<$k, 4>(image, oy0, (wb, bb), clamp, [h, c], out),
                    5 => blocks::<$k, 5>(image, oy0, (wb, bb), clamp, [h, c], out),
                    6 => blocks::<$k, 6>(image, oy0, (wb, bb), clamp, [h, c], out),
                    7 => blocks::<$k, 7>(image, oy0, (wb, bb), clamp, [h, c], out),
                    _ => blocks::<$k, 8>(image, oy0, (wb, bb), clamp, [h, c], out),
                }
            };
        }
        assert!((1..=MAX_WIDTH).contains(&w) && matches!(k, 3 | 5), "depthwise: rows this kernel does not take");
        if k == 3 { widths!(3) } else { widths!(5) }
    }

    /// One output row of a `K`×`K` kernel at stride `S` from `K` input rows (`rows`: each `w`
    /// pixels of `c` channels, `None` for a padding row), padded by `pl` columns on the left
    /// and as many as the output needs on the right: block by block of 16 channels, `P` output
    /// pixels at a time where every tap lies inside the row (then 4, 2 or 1 at a time), one at
    /// a time at the edges. Bias first, then the taps row by row, padding taps multiplying
    /// zeros (the blocked kernel's order).
    ///
    /// # Safety
    /// The CPU must support AVX-512F. The operands' lengths are asserted.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn strided<const K: usize, const S: usize, const P: usize>(
        rows: [Option<&[f32]>; K],
        (wb, bb): (&[[f32; 16]], &[[f32; 16]]),
        clamp: Option<Clamp>,
        [w, c, ow, pl]: [usize; 4],
        out: &mut [MaybeUninit<f32>],
    ) {
        let groups = c / 16;
        let row = w.checked_mul(c);
        assert!(
            c.is_multiple_of(16)
                && row.is_some_and(|row| rows.iter().flatten().all(|r| r.len() >= row))
                && ow.checked_mul(c).is_some_and(|o| out.len() >= o)
                && wb.len() >= groups * K * K
                && bb.len() >= groups,
            "depthwise: operands smaller than their shapes"
        );
        let zero = _mm512_setzero_ps();
        // Output pixels whose every tap lies inside the row: input column ox·S + kx − pl in
        // 0..w for every kx < K.
        let first = pl.div_ceil(S).min(ow);
        let end = match w.checked_add(pl).and_then(|wp| wp.checked_sub(K)) {
            Some(last) => (last / S + 1).min(ow).max(first),
            None => first,
        };
        for g in 0..groups {
            let taps = &wb[g * K * K..(g + 1) * K * K];
            // SAFETY (loads of `taps`, `bb[g]`): each entry is 16 floats.
            let wv: [[__m512; K]; K] = std::array::from_fn(|ky| {
                std::array::from_fn(|kx| unsafe { _mm512_loadu_ps(taps[ky * K + kx].as_ptr()) })
            });
            // SAFETY: as above.
            let bias = unsafe { _mm512_loadu_ps(bb[g].as_ptr()) };
            let at = |ox: usize| 16 * g + ox * c;
            let job = Inside::<K, S> { rows: &rows, wv: &wv, bias, clamp, c, g, pl };
            // P pixels at a time, then what is left of the inside 4, 2 or 1 at a time: a step's
            // pixels are independent chains of multiply-adds, where a pixel alone is one chain.
            let mut ox = first;
            while ox < end {
                // SAFETY (each step): the CPU has AVX-512F (this function's contract); the
                // step's pixels ox..ox + q lie in first..end (ox ≥ first, q ≤ end − ox), where
                // `first` and `end` are defined so that every tap reads inside the row.
                ox += match end - ox {
                    left if left >= P => unsafe { job.run::<P>(ox, out) },
                    4.. => unsafe { job.run::<4>(ox, out) },
                    2 | 3 => unsafe { job.run::<2>(ox, out) },
                    _ => unsafe { job.run::<1>(ox, out) },
                };
            }
            // The edges, a pixel at a time, each tap checked.
            for ox in (0..first).chain(end..ow) {
                let mut acc = bias;
                for (ky, input) in rows.iter().enumerate() {
                    for kx in 0..K {
                        let x = match (input, (ox * S + kx).checked_sub(pl).filter(|&x| x < w)) {
                            // SAFETY: column x < w of the row, channels 16g..16g + 16 ≤ c.
                            (Some(input), Some(x)) => unsafe { _mm512_loadu_ps(input.as_ptr().add(at(x))) },
                            _ => zero,
                        };
                        acc = _mm512_fmadd_ps(x, wv[ky][kx], acc);
                    }
                }
                let dst = &mut out[at(ox)..][..16];
                // SAFETY: `dst` holds 16 floats.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr().cast::<f32>(), job.finish(acc)) };
            }
        }
    }

    /// One block of channels (`g`: channels 16g..16g + 16 of `c`) of a [`strided`] row: its
    /// `K` input rows, the block's weights and bias, the clamp, and the left padding.
    struct Inside<'a, const K: usize, const S: usize> {
        rows: &'a [Option<&'a [f32]>; K],
        wv: &'a [[__m512; K]; K],
        bias: __m512,
        clamp: Option<Clamp>,
        c: usize,
        g: usize,
        pl: usize,
    }

    impl<const K: usize, const S: usize> Inside<'_, K, S> {
        /// `acc` clamped, if the block is.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn finish(&self, acc: __m512) -> __m512 {
            match self.clamp {
                Some(Clamp { lo, hi }) => _mm512_min_ps(_mm512_max_ps(acc, _mm512_set1_ps(lo)), _mm512_set1_ps(hi)),
                None => acc,
            }
        }

        /// Output pixels `ox..ox + Q` of the block into `out` (indexed checked): bias first,
        /// then the taps row by row, padding rows multiplying zeros. Returns `Q`.
        ///
        /// # Safety
        /// The CPU must support AVX-512F; every tap of these pixels must lie inside its row:
        /// input columns (ox + p)·S + kx − pl in 0..w for p < Q and kx < K, where each row
        /// holds w·c floats (as `strided` asserts), and 16g + 16 ≤ c.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn run<const Q: usize>(&self, ox: usize, out: &mut [MaybeUninit<f32>]) -> usize {
            let at = |ox: usize| 16 * self.g + ox * self.c;
            let mut acc = [self.bias; Q];
            for (ky, input) in self.rows.iter().enumerate() {
                match input {
                    Some(input) => {
                        // Pixel ox·S − pl of the row (inside it, by the contract).
                        let base = input.as_ptr().wrapping_add(at(ox * S - self.pl));
                        for kx in 0..K {
                            for (p, acc) in acc.iter_mut().enumerate() {
                                // SAFETY: input column (ox + p)·S + kx − pl lies inside the
                                // row and channels 16g..16g + 16 inside the pixel (contract).
                                let x = unsafe { _mm512_loadu_ps(base.add((p * S + kx) * self.c)) };
                                *acc = _mm512_fmadd_ps(x, self.wv[ky][kx], *acc);
                            }
                        }
                    }
                    None => {
                        for kx in 0..K {
                            for acc in acc.iter_mut() {
                                *acc = _mm512_fmadd_ps(_mm512_setzero_ps(), self.wv[ky][kx], *acc);
                            }
                        }
                    }
                }
            }
            for (p, acc) in acc.into_iter().enumerate() {
                let dst = &mut out[at(ox + p)..][..16];
                // SAFETY: `dst` holds 16 floats (MaybeUninit<f32> has f32's layout).
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr().cast::<f32>(), self.finish(acc)) };
            }
            Q
        }
    }

    /// [`rows`] for a `K`×`K` kernel on rows of `W` pixels, block by block of 16 channels.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn blocks<const K: usize, const W: usize>(
        image: &[f32],
        oy0: usize,
        (wb, bb): (&[[f32; 16]], &[[f32; 16]]),
        clamp: Option<Clamp>,
        [h, c]: [usize; 2],
        out: &mut [MaybeUninit<f32>],
    ) {
        let (groups, row) = (c / 16, W * c);
        assert!(row > 0 && out.len().is_multiple_of(row), "depthwise: output rows not whole");
        let count = out.len() / row;
        assert!(
            c.is_multiple_of(16)
                && wb.len() >= groups * K * K
                && bb.len() >= groups
                && image.len() >= h * row
                && oy0 + count <= h,
            "depthwise: operands smaller than their shapes"
        );
        let (lo, hi) = clamp.map_or((f32::NEG_INFINITY, f32::INFINITY), |c| (c.lo, c.hi));
        let zero = _mm512_setzero_ps();
        for g in 0..groups {
            let taps = &wb[g * K * K..(g + 1) * K * K];
            for (r, orow) in out.chunks_exact_mut(row).enumerate() {
                let oy = oy0 + r;
                // SAFETY: `bb[g]` is 16 floats.
                let mut acc = [unsafe { _mm512_loadu_ps(bb[g].as_ptr()) }; W];
                for ky in 0..K {
                    // The input row's pixels at this block (zeros for a padding row: the
                    // blocked kernel multiplies its padding too, so the sums match it to the
                    // bit).
                    let mut x = [zero; W];
                    if let Some(y) = (oy + ky).checked_sub(K / 2).filter(|&y| y < h) {
                        let input = &image[y * row..(y + 1) * row];
                        for (p, x) in x.iter_mut().enumerate() {
                            // SAFETY: pixel p < W of the row, channels 16g..16g + 16 ≤ c:
                            // inside its W·c floats.
                            *x = unsafe { _mm512_loadu_ps(input.as_ptr().add(p * c + 16 * g)) };
                        }
                    }
                    for kx in 0..K {
                        // SAFETY: tap ky·K + kx < K·K of the block's 16-lane weights.
                        let wv = unsafe { _mm512_loadu_ps(taps[ky * K + kx].as_ptr()) };
                        for (o, acc) in acc.iter_mut().enumerate() {
                            // Input pixel o + kx - K/2; zero past either edge.
                            let at = (o + kx).checked_sub(K / 2).filter(|&p| p < W);
                            *acc = _mm512_fmadd_ps(at.map_or(zero, |p| x[p]), wv, *acc);
                        }
                    }
                }
                for (o, acc) in acc.iter().enumerate() {
                    let v = match clamp {
                        Some(_) => _mm512_min_ps(_mm512_max_ps(*acc, _mm512_set1_ps(lo)), _mm512_set1_ps(hi)),
                        None => *acc,
                    };
                    let dst = &mut orow[o * c + 16 * g..][..16];
                    // SAFETY: `dst` holds 16 floats (MaybeUninit<f32> has f32's layout).
                    unsafe { _mm512_storeu_ps(dst.as_mut_ptr().cast::<f32>(), v) };
                }
            }
        }
    }
}

/// Depthwise convolution along rows, for planes wide enough to fill 16 lanes with output
/// pixels of one channel: nothing changes layout (the blocked unit spends most of its time
/// turning 16 planes into pixels of 16 channels and back). Per channel, the input rows a
/// range reads are copied once into zero-bordered rows (for a column stride of 2, split into
/// their even and odd columns), so that every tap of 16 neighbouring outputs is one
/// unaligned load; four vectors of a row share each tap's weight. 3x3 and 5x5 kernels at
/// column stride 2 read the input rows in place instead ([`strided`]).
#[cfg(target_arch = "x86_64")]
mod direct {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{Block, Depthwise, Dst};
    use crate::nn::kernels::simd::lanes16;

    /// Narrowest output row the direct unit takes. EfficientNet-Lite0 at batch 1 (`bench
    /// onnx`, 100 passes, three runs each): direct from 48 columns (its 112- and 56-wide
    /// planes) 6.08-6.37 ms against 6.43-6.94 blocked; from 28 columns its 28-wide blocks
    /// ran slower (5x5 taps on 2 vectors, 4 of 32 lanes idle: 0.44 -> 0.54 ms for one).
    pub(super) const MIN_WIDTH: usize = 48;

    /// Vectors of an output row accumulated together.
    const GROUP: usize = 4;

    thread_local! {
        /// The padded rows of the channel at hand, reused by every unit a thread runs.
        static ROWS: std::cell::Cell<Rows> = const { std::cell::Cell::new(Rows { data: Vec::new(), borders: None }) };
    }

    /// A thread's padded rows, and the layout whose border columns are zero in them (row
    /// stride, the input's first column and width, rows), if any: with a column stride of 1,
    /// [`fill`] then copies only the input's columns of each row (filling the borders per row
    /// cost a tenth of a 56x56 convolution in `memset` calls).
    #[derive(Default)]
    struct Rows {
        data: Vec<f32>,
        borders: Option<[usize; 4]>,
    }

    /// How one channel's padded input rows are laid out: `count` rows of `stride` floats, each
    /// (stride 2) its even columns then its odd ones, `half` floats apart.
    struct Layout {
        count: usize,
        stride: usize,
        half: usize,
    }

    impl Layout {
        fn new(d: &Depthwise, (from, to): (usize, usize)) -> Self {
            let count = (to - from - 1) * d.sh + d.kh;
            // Every tap of every vector of a row, its last vector whole: up to
            // (⌈ow/16⌉·16 - 1)·sw + kw columns, and the input's own (pl + w).
            // At stride 1, also the vector after the last ([`fixed_group`] shifts taps out of
            // two neighbouring vectors).
            let last = d.ow.next_multiple_of(16);
            let reach = ((last - 1) * d.sw + d.kw).max(if d.sw == 1 { last + 16 } else { 0 });
            let cols = reach.max(d.pl + d.w).next_multiple_of(32);
            let half = cols / 2 + 16;
            let stride = if d.sw == 2 { 2 * half } else { cols };
            Layout { count, stride, half }
        }

        /// At stride 2, per pair of 16-float vectors of a row's even and odd halves, the
        /// masked loads of its 32 padded columns: the same for every row (worked out per load,
        /// they cost half of a 56-wide 5x5 convolution's time). None at stride 1.
        fn windows(&self, d: &Depthwise) -> Vec<[Window; 2]> {
            if d.sw != 2 {
                return Vec::new();
            }
            let pairs = (self.stride / 32).min(self.half / 16).min((self.stride - self.half) / 16);
            (0..pairs).map(|i| [Window::new(d.w, i * 32, d.pl), Window::new(d.w, i * 32 + 16, d.pl)]).collect()
        }

        /// Whether each row holds the 16 floats every tap loads for every whole output
        /// vector (true by construction in [`Layout::new`]; [`unit`] checks it once).
        fn covers(&self, d: &Depthwise) -> bool {
            let last = d.ow.div_ceil(16) * 16;
            match d.sw {
                1 => d.kw - 1 + last <= self.stride && last + 16 <= self.stride,
                2 => (d.kw - 1) / 2 + last <= self.half && self.half + (d.kw - 1) / 2 + last <= self.stride,
                _ => false,
            }
        }
    }

    /// Every channel of block `b` over output rows `from..to`, into `dst` (each channel's rows
    /// from `from` on).
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `d` must not be dilated, with a column stride of 1 or 2.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn unit(d: &Depthwise, b: &Block<'_, 16>, (from, to): (usize, usize), dst: &mut Dst<'_, 16>) {
        if from >= to {
            return;
        }
        if d.sw == 2 && d.kh == d.kw && matches!(d.kw, 3 | 5) {
            // SAFETY: AVX-512F and an undilated geometry are this function's preconditions;
            // the column stride is 2 and the kernel 3x3 or 5x5 (matched here).
            unsafe { strided(d, b, (from, to), dst) };
            return;
        }
        let layout = Layout::new(d, (from, to));
        assert!(layout.covers(d), "depthwise: padded rows too short for their taps");
        // Every float of the rows is written by `fill` before it is read, or (the borders
        // with a column stride of 1) zeroed here once per layout.
        let mut rows = ROWS.with(|r| r.take());
        let need = layout.count * layout.stride;
        if rows.data.len() < need {
            rows.data.resize(need, 0.0);
        }
        let key = [layout.stride, d.pl, d.w, layout.count];
        let borders = d.sw == 1 && rows.borders.is_some_and(|[s, p, w, n]| [s, p, w] == key[..3] && n >= layout.count);
        if d.sw == 1 && !borders {
            rows.data[..need].fill(0.0);
            rows.borders = Some(key);
        } else if d.sw != 1 {
            // `fill` writes every column of these rows.
            rows.borders = None;
        }
        let rows = &mut rows;
        let windows = layout.windows(d);
        let mut taps = vec![0f32; b.weights.len()];
        for (cl, out) in dst.iter_mut().enumerate().take(b.lanes) {
            let Some(out) = out.as_deref_mut() else { continue };
            let plane = &b.src[cl * b.plane..(cl + 1) * b.plane];
            fill(d, plane, b.row0, from * d.sh, &layout, &windows, &mut rows.data);
            for (t, w) in taps.iter_mut().zip(b.weights) {
                *t = w[cl];
            }
            // SAFETY: AVX-512F and the geometry are this function's preconditions; `rows` was
            // filled for `layout` and this range (resized above to hold its rows), `taps` holds
            // `kh·kw` weights; `channel` checks `out`'s length per row (and panics if short).
            unsafe { channel(d, &rows.data, &layout, &taps, b.bias[cl], b.clamp, (from, to), out) };
        }
        ROWS.with(|r| r.set(std::mem::take(rows)));
    }

    /// [`unit`] for 3x3 and 5x5 kernels at column stride 2, read straight from the input
    /// rows: each output vector's taps are split into even and odd columns in registers
    /// (`vpermt2ps`), and the taps past the first pair shifted out of the next pair
    /// (`valignd`). Copying every row into split padded rows first ([`fill`]) cost more than
    /// the taps themselves on a 112-wide plane (`perf`: a row of 112 floats is 4 pairs of
    /// vectors, each copy with its own loop and bounds checks).
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `d` undilated, with a column stride of 2 and a 3x3 or
    /// 5x5 kernel.
    #[target_feature(enable = "avx512f")]
    unsafe fn strided(d: &Depthwise, b: &Block<'_, 16>, (from, to): (usize, usize), dst: &mut Dst<'_, 16>) {
        let vectors = d.ow.div_ceil(16);
        // Pair i of a padded row holds its columns 32i..32i + 32. Output vector j's taps read
        // columns 32j..=32j + 30 + kw - 1: pairs j and j + 1.
        let mut windows = Vec::with_capacity(vectors + 1);
        for i in 0..=vectors {
            windows.push([Window::new(d.w, i * 32, d.pl), Window::new(d.w, i * 32 + 16, d.pl)]);
        }
        let (even, odd) = halves();
        let split = Split { windows, whole: d.pl.div_ceil(32)..(d.pl + d.w) / 32, pl: d.pl, even, odd };
        let mut taps = vec![0f32; b.weights.len()];
        for (cl, out) in dst.iter_mut().enumerate().take(b.lanes) {
            let Some(out) = out.as_deref_mut() else { continue };
            let plane = &b.src[cl * b.plane..(cl + 1) * b.plane];
            for (t, w) in taps.iter_mut().zip(b.weights) {
                *t = w[cl];
            }
            let (lo, hi) = b.clamp.map_or((f32::NEG_INFINITY, f32::INFINITY), |c| (c.lo, c.hi));
            for oy in from..to {
                let orow = out
                    .get_mut((oy - from) * d.ow..(oy - from + 1) * d.ow)
                    .expect("depthwise: output rows shorter than the range");
                // The input row of each kernel row, None where it is padding.
                let mut rows: [Option<&[f32]>; 5] = [None; 5];
                for (ky, row) in rows.iter_mut().enumerate().take(d.kh) {
                    if let Some(y) = (oy * d.sh + ky).checked_sub(d.pt).filter(|&y| y < d.h) {
                        let y = y.checked_sub(b.row0).expect("depthwise: a band starts below the rows it reads");
                        *row = Some(&plane[y * d.w..(y + 1) * d.w]);
                    }
                }
                let mut v0 = 0;
                while v0 < vectors {
                    let n = GROUP.min(vectors - v0);
                    let args = (&split, taps.as_slice(), b.bias[cl], (lo, hi), v0, d.ow);
                    // SAFETY: AVX-512F (this function's precondition); K is d's kernel size,
                    // and vectors v0..v0 + n exist in the row.
                    unsafe {
                        match (n, d.kw) {
                            (4, 3) => strided_group::<4, 3>(&rows, args, orow),
                            (3, 3) => strided_group::<3, 3>(&rows, args, orow),
                            (2, 3) => strided_group::<2, 3>(&rows, args, orow),
                            (_, 3) => strided_group::<1, 3>(&rows, args, orow),
                            (4, _) => strided_group::<4, 5>(&rows, args, orow),
                            (3, _) => strided_group::<3, 5>(&rows, args, orow),
                            (2, _) => strided_group::<2, 5>(&rows, args, orow),
                            (_, _) => strided_group::<1, 5>(&rows, args, orow),
                        }
                    }
                    v0 += n;
                }
            }
        }
    }

    /// How [`strided`] loads pair `i` of a padded row: plainly where its 32 columns all lie
    /// in the input (`whole`), through its two windows (`windows[i]`) elsewhere; then split
    /// into even and odd columns by the permutations `even` and `odd`.
    struct Split {
        windows: Vec<[Window; 2]>,
        whole: std::ops::Range<usize>,
        pl: usize,
        even: __m512i,
        odd: __m512i,
    }

    /// Output vectors `v0..v0 + N` of one row (`orow`, `ow` floats) of a `K`×`K` kernel at
    /// column stride 2, from the input row of each kernel row (`rows[ky]`, `None`: padding).
    ///
    /// # Safety
    /// The CPU must support AVX-512F (`K` and the length of `taps` are checked: 3 or 5, `K·K`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::type_complexity)]
    unsafe fn strided_group<const N: usize, const K: usize>(
        rows: &[Option<&[f32]>; 5],
        (split, taps, bias, (lo, hi), v0, ow): (&Split, &[f32], f32, (f32, f32), usize, usize),
        orow: &mut [MaybeUninit<f32>],
    ) {
        const { assert!((K == 3 || K == 5) && N <= 4, "3x3 or 5x5 taps, at most 4 vectors") };
        assert!(taps.len() == K * K, "depthwise: one weight per tap");
        let mut acc = [_mm512_set1_ps(bias); N];
        for (ky, row) in rows.iter().enumerate().take(K) {
            // Pairs v0..=v0 + N, split: tap kx of output vector j is the even (kx even) or odd
            // half of pair j, shifted by kx / 2 lanes into pair j + 1.
            let mut even = [_mm512_setzero_ps(); 5];
            let mut odd = [_mm512_setzero_ps(); 5];
            if let Some(input) = *row {
                for j in 0..=N {
                    let i = v0 + j;
                    let (a, b) = if split.whole.contains(&i) {
                        let pair = &input[i * 32 - split.pl..][..32];
                        // SAFETY: AVX-512F (this function's feature); `pair` holds 32 floats.
                        unsafe { (_mm512_loadu_ps(pair.as_ptr()), _mm512_loadu_ps(pair.as_ptr().add(16))) }
                    } else {
                        let [wa, wb] = split.windows[i];
                        (wa.load(input), wb.load(input))
                    };
                    even[j] = _mm512_permutex2var_ps(a, split.even, b);
                    odd[j] = _mm512_permutex2var_ps(a, split.odd, b);
                }
            }
            for kx in 0..K {
                let w = _mm512_set1_ps(taps[ky * K + kx]);
                let half = if kx % 2 == 0 { &even } else { &odd };
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(shifted(half[j], half[j + 1], kx / 2), w, *acc);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            let x0 = (v0 + j) * 16;
            let v = _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), *acc));
            let lanes = (ow - x0).min(16);
            let dst = &mut orow[x0..x0 + lanes];
            // SAFETY: the mask covers exactly `lanes` floats, all inside `dst`.
            unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr().cast::<f32>(), lanes16(lanes), v) };
        }
    }

    /// The padded rows (from padded row `top` on) of one channel's `plane` (input rows from
    /// `row0` on): zeros where a row or column is padding, except that with a column stride
    /// of 1 the border columns of input rows are left as they are (the caller zeroes them
    /// once). `plane` must hold every input row the range reads (a caller's band cut short is
    /// a bug, and panics rather than reading zeros).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn fill(
        d: &Depthwise,
        plane: &[f32],
        row0: usize,
        top: usize,
        l: &Layout,
        windows: &[[Window; 2]],
        rows: &mut [f32],
    ) {
        for (r, dst) in rows.chunks_exact_mut(l.stride).enumerate().take(l.count) {
            let input = (top + r).checked_sub(d.pt).filter(|&y| y < d.h).map(|y| {
                let y = y.checked_sub(row0).expect("depthwise: a band starts below the rows it reads");
                &plane[y * d.w..(y + 1) * d.w]
            });
            let Some(input) = input else {
                dst.fill(0.0);
                continue;
            };
            if d.sw == 2 {
                let (even, odd) = dst.split_at_mut(l.half);
                // 32 columns at a time into 16 even and 16 odd (`half` is a multiple of 16).
                let (pe, po) = halves();
                // The pairs whose 32 columns all lie in the input (padded columns pl..pl + w)
                // load plainly; the masks' arithmetic per vector had cost as much as the loads.
                let whole = d.pl.div_ceil(32)..(d.pl + d.w) / 32;
                // Indexed, not a zip of chunk iterators: that zip's constructor, left out of line
                // here, divided by the chunk sizes on every row (1% of a batch-1 pass).
                for (i, [wa, wb]) in windows.iter().enumerate() {
                    let (e, o) = (&mut even[i * 16..][..16], &mut odd[i * 16..][..16]);
                    // The padded row's 32 columns from 32i, read from the input row where they
                    // lie (copying the row into a padded one first cost a fifth of a 112x112
                    // stride-2 convolution); `e` and `o` hold 16 floats each.
                    let (a, b) = if whole.contains(&i) {
                        let pair = &input[i * 32 - d.pl..][..32];
                        // SAFETY: AVX-512F (this function's feature); `pair` holds 32 floats.
                        unsafe { (_mm512_loadu_ps(pair.as_ptr()), _mm512_loadu_ps(pair.as_ptr().add(16))) }
                    } else {
                        (wa.load(input), wb.load(input))
                    };
                    // SAFETY: `e` and `o` hold 16 floats each.
                    unsafe {
                        _mm512_storeu_ps(e.as_mut_ptr(), _mm512_permutex2var_ps(a, pe, b));
                        _mm512_storeu_ps(o.as_mut_ptr(), _mm512_permutex2var_ps(a, po, b));
                    }
                }
            } else {
                // The border columns are zero already (`unit`). Sixteen floats at a time, inline:
                // `copy_from_slice` of a row's run-time length is a call to `memmove` per row.
                let dst = &mut dst[d.pl..d.pl + d.w];
                let (whole, rest) = input.as_chunks::<16>();
                let (to, tail) = dst.as_chunks_mut::<16>();
                for (t, s) in to.iter_mut().zip(whole) {
                    *t = *s;
                }
                for (t, s) in tail.iter_mut().zip(rest) {
                    *t = *s;
                }
            }
        }
    }

    /// Columns `j..j + 16` of a row of `w` floats with `pl` zero columns before it and zeros
    /// after: the row's `input[j + i - pl]` in lane `i` where that lies in it, zero elsewhere.
    /// Worked out once for every row of a layout; the load is masked to those lanes, so
    /// nothing outside the row is read.
    #[derive(Clone, Copy)]
    pub(super) struct Window {
        /// The input columns the live lanes read, `start..end`.
        start: usize,
        end: usize,
        /// Lanes before the first live one.
        lo: usize,
        /// The live lanes, `lo..lo + (end - start)`.
        mask: u16,
    }

    impl Window {
        /// Columns `j..j + 16` of a row of `w` floats with `pl` zero columns before it.
        pub(super) fn new(w: usize, j: usize, pl: usize) -> Self {
            // Lanes before the input's first column, the input column of the first lane after
            // them, and how many lanes from there lie in the input.
            let lo = pl.saturating_sub(j).min(16);
            let start = j.saturating_sub(pl);
            let live = w.saturating_sub(start).min(16 - lo);
            if live == 0 {
                return Window { start: 0, end: 0, lo: 0, mask: 0 };
            }
            Window { start, end: start + live, lo, mask: (((1u32 << live) - 1) << lo) as u16 }
        }

        /// One past the last input column the window reads (0 if it reads none).
        #[cfg(test)]
        pub(super) fn end(self) -> usize {
            self.end
        }

        /// The window's lanes of `input` (one row; panics if it is shorter than the window
        /// reaches), zeros elsewhere.
        #[target_feature(enable = "avx512f")]
        #[inline]
        pub(super) fn load(self, input: &[f32]) -> __m512 {
            assert!(self.end <= input.len(), "depthwise: a row shorter than its window");
            if self.mask == 0 {
                return _mm512_setzero_ps();
            }
            // Lane i reads input[start - lo + i], for lo ≤ i < lo + live: input[start..end].
            let base = input.as_ptr().wrapping_add(self.start).wrapping_sub(self.lo);
            // SAFETY: AVX-512F (this function's feature); only the lanes in `mask` are read
            // (`new`: lo..lo + end - start), each an element of `input` (end ≤ input.len(),
            // checked above); the others are not accessed.
            unsafe { _mm512_maskz_loadu_ps(self.mask, base) }
        }
    }

    /// One channel's output rows `from..to` from its padded rows.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `rows` must hold `l.count` rows of `l.stride` floats
    /// made by [`fill`] for `d` and this range, `taps` `kh·kw` weights.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn channel(
        d: &Depthwise,
        rows: &[f32],
        l: &Layout,
        taps: &[f32],
        bias: f32,
        clamp: Option<super::Clamp>,
        (from, to): (usize, usize),
        out: &mut [MaybeUninit<f32>],
    ) {
        let vectors = d.ow.div_ceil(16);
        let (lo, hi) = clamp.map_or((f32::NEG_INFINITY, f32::INFINITY), |c| (c.lo, c.hi));
        // EfficientNet's and MobileNet's kernels, with every tap's weight broadcast once per
        // channel and the taps unrolled: the general loop below spent as much on its
        // per-tap loads, broadcasts and loop counters as on its multiply-adds.
        // SAFETY (each arm): as this function's contract, with the kernel's size and column
        // stride those of `d` (matched here).
        unsafe {
            match (d.kh, d.kw, d.sw) {
                (3, 3, 1) => return fixed::<3>(d, rows, l, taps, bias, (lo, hi), (from, to), out),
                (5, 5, 1) => return fixed::<5>(d, rows, l, taps, bias, (lo, hi), (from, to), out),
                _ => {}
            }
        }
        for oy in from..to {
            let orow = out
                .get_mut((oy - from) * d.ow..(oy - from + 1) * d.ow)
                .expect("depthwise: output rows shorter than the range");
            let first = (oy - from) * d.sh;
            let mut v0 = 0;
            while v0 < vectors {
                let n = GROUP.min(vectors - v0);
                // SAFETY: as this function's contract; vectors v0..v0 + n exist in the row.
                unsafe {
                    match n {
                        4 => group::<4>(d, rows, l, taps, bias, (lo, hi), first, v0, orow),
                        3 => group::<3>(d, rows, l, taps, bias, (lo, hi), first, v0, orow),
                        2 => group::<2>(d, rows, l, taps, bias, (lo, hi), first, v0, orow),
                        _ => group::<1>(d, rows, l, taps, bias, (lo, hi), first, v0, orow),
                    }
                }
                v0 += n;
            }
        }
    }

    /// [`channel`] for a `K`×`K` kernel at column stride 1 (`d`'s own): the taps' weights
    /// broadcast once, and every tap of a group of output vectors unrolled. (At column stride
    /// 2, 3x3 and 5x5 kernels take [`strided`] instead.)
    ///
    /// # Safety
    /// As [`channel`], with `d.kh = d.kw = K` and `d.sw = 1`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn fixed<const K: usize>(
        d: &Depthwise,
        rows: &[f32],
        l: &Layout,
        taps: &[f32],
        bias: f32,
        (lo, hi): (f32, f32),
        (from, to): (usize, usize),
        out: &mut [MaybeUninit<f32>],
    ) {
        assert!(taps.len() == K * K, "depthwise: one weight per tap");
        let weights: [[__m512; K]; K] =
            std::array::from_fn(|ky| std::array::from_fn(|kx| _mm512_set1_ps(taps[ky * K + kx])));
        let vectors = d.ow.div_ceil(16);
        for oy in from..to {
            let orow = out
                .get_mut((oy - from) * d.ow..(oy - from + 1) * d.ow)
                .expect("depthwise: output rows shorter than the range");
            // Padded row of the first tap, and where its vectors start.
            let base = rows.as_ptr().wrapping_add((oy - from) * d.sh * l.stride);
            let mut v0 = 0;
            while v0 < vectors {
                let n = GROUP.min(vectors - v0);
                // SAFETY: as this function's contract; vectors v0..v0 + n exist in the row,
                // and its padded rows (oy - from)·sh.. + K lie in `rows` (`Layout::new`).
                unsafe {
                    match n {
                        4 => fixed_group::<4, K>(l, &weights, bias, (lo, hi), base, v0, d.ow, orow),
                        3 => fixed_group::<3, K>(l, &weights, bias, (lo, hi), base, v0, d.ow, orow),
                        2 => fixed_group::<2, K>(l, &weights, bias, (lo, hi), base, v0, d.ow, orow),
                        _ => fixed_group::<1, K>(l, &weights, bias, (lo, hi), base, v0, d.ow, orow),
                    }
                }
                v0 += n;
            }
        }
    }

    /// [`group`] for [`fixed`]: output vectors `v0..v0 + N` of one row (`orow`, `ow` floats)
    /// from the padded rows at `base`, with the `K`×`K` taps' weights broadcast in `weights`.
    ///
    /// # Safety
    /// AVX-512F; as [`group`], `base` the first of `K` padded rows inside a buffer of `l`'s
    /// layout that `l.covers` a `K`-wide kernel of column stride 1.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn fixed_group<const N: usize, const K: usize>(
        l: &Layout,
        weights: &[[__m512; K]; K],
        bias: f32,
        (lo, hi): (f32, f32),
        base: *const f32,
        v0: usize,
        ow: usize,
        orow: &mut [MaybeUninit<f32>],
    ) {
        const { assert!(K <= 5 && N <= 4, "taps at most 5 wide, at most 4 vectors") };
        let mut acc = [_mm512_set1_ps(bias); N];
        let vectors = base.wrapping_add(v0 * 16);
        for (ky, weights) in weights.iter().enumerate() {
            let row = vectors.wrapping_add(ky * l.stride);
            // Each vector of the row and the one after it loaded once, and every tap's columns
            // shifted out of the pair in registers: a third of the loads, none of them split
            // across cache lines by a tap's offset.
            // SAFETY: as `group`, and the vector after the group's last lies inside the row
            // too (`Layout::covers`: last + 16 ≤ stride at stride 1).
            let loaded: [__m512; 5] = std::array::from_fn(|j| {
                if j <= N { unsafe { _mm512_loadu_ps(row.add(16 * j)) } } else { _mm512_setzero_ps() }
            });
            for (kx, &w) in weights.iter().enumerate() {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let x = shifted(loaded[j], loaded[j + 1], kx);
                    *acc = _mm512_fmadd_ps(x, w, *acc);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            let x0 = (v0 + j) * 16;
            let v = _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), *acc));
            let lanes = (ow - x0).min(16);
            let dst = &mut orow[x0..x0 + lanes];
            // SAFETY: the mask covers exactly `lanes` floats, all inside `dst`.
            unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr().cast::<f32>(), lanes16(lanes), v) };
        }
    }

    /// Lanes `by..16` of `a` then lanes `0..by` of `b`: 16 consecutive floats starting `by`
    /// into `a` where `b` follows `a` in memory (`by` < 16; up to 4 here).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn shifted(a: __m512, b: __m512, by: usize) -> __m512 {
        let (a, b) = (_mm512_castps_si512(a), _mm512_castps_si512(b));
        _mm512_castsi512_ps(match by {
            0 => a,
            1 => _mm512_alignr_epi32::<1>(b, a),
            2 => _mm512_alignr_epi32::<2>(b, a),
            3 => _mm512_alignr_epi32::<3>(b, a),
            4 => _mm512_alignr_epi32::<4>(b, a),
            _ => unreachable!("taps at most 5 wide"),
        })
    }

    /// Output vectors `v0..v0 + N` of one row (`orow`, `ow` floats), whose taps start at padded
    /// row `first`.
    ///
    /// # Safety
    /// As [`channel`], with `v0 + N ≤ ⌈ow/16⌉`, `first + kh ≤ l.count`, `rows` holding
    /// `l.count · l.stride` floats and `l.covers(d)`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn group<const N: usize>(
        d: &Depthwise,
        rows: &[f32],
        l: &Layout,
        taps: &[f32],
        bias: f32,
        (lo, hi): (f32, f32),
        first: usize,
        v0: usize,
        orow: &mut [MaybeUninit<f32>],
    ) {
        let mut acc = [_mm512_set1_ps(bias); N];
        let vectors = rows.as_ptr().wrapping_add(first * l.stride + v0 * 16);
        for ky in 0..d.kh {
            let row = vectors.wrapping_add(ky * l.stride);
            for kx in 0..d.kw {
                let w = _mm512_set1_ps(taps[ky * d.kw + kx]);
                // Column of output x's tap: x·sw + kx; with stride 2, (x + kx/2) of the even
                // or odd half.
                let at = row.wrapping_add(if d.sw == 2 { (kx % 2) * l.half + kx / 2 } else { kx });
                for (j, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: padded row first + ky < l.count lies in `rows`, and every tap of
                    // every whole vector of it lies inside the row (`Layout::covers`).
                    let x = unsafe { _mm512_loadu_ps(at.add(16 * j)) };
                    *acc = _mm512_fmadd_ps(x, w, *acc);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            let x0 = (v0 + j) * 16;
            let v = _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), *acc));
            let lanes = (d.ow - x0).min(16);
            let dst = &mut orow[x0..x0 + lanes];
            // SAFETY: the mask covers exactly `lanes` floats, all inside `dst`.
            unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr().cast::<f32>(), lanes16(lanes), v) };
        }
    }

    /// The permutations that take the even and the odd columns out of 32 consecutive ones
    /// held in two vectors (`_mm512_permutex2var_ps`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn halves() -> (__m512i, __m512i) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        (even, _mm512_add_epi32(even, _mm512_set1_epi32(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// The convolution in f64, straight from its definition.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        k: &[f32],
        bias: &[f32],
        [n, c, h, w]: [usize; 4],
        [kh, kw]: [usize; 2],
        [oh, ow]: [usize; 2],
        g: &Geometry,
        clamp: Clamp,
    ) -> Vec<f32> {
        let mut out = Vec::with_capacity(n * c * oh * ow);
        for p in 0..n * c {
            let ch = p % c;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = f64::from(bias[ch]);
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let y = (oy * g.strides[0] + ky * g.dilations[0]) as isize - g.pads[0].0 as isize;
                            let xx = (ox * g.strides[1] + kx * g.dilations[1]) as isize - g.pads[1].0 as isize;
                            if (0..h as isize).contains(&y) && (0..w as isize).contains(&xx) {
                                let v = x[p * h * w + y as usize * w + xx as usize];
                                acc += f64::from(v) * f64::from(k[(ch * kh + ky) * kw + kx]);
                            }
                        }
                    }
                    out.push((acc as f32).max(clamp.lo).min(clamp.hi));
                }
            }
        }
        out
    }

    /// Ragged channel counts (a block's lanes partly used), planes of many bands split across
    /// threads, rows shorter and longer than a run, strides 1 to 3, dilation, asymmetric
    /// padding and a batch: every SIMD level against the definition.
    #[test]
    fn matches_the_definition_on_ragged_shapes() {
        type Case = ([usize; 4], [usize; 2], [usize; 2], usize, [(usize, usize); 2]);
        let cases: [Case; 31] = [
            ([1, 1, 5, 4], [3, 3], [1, 1], 1, [(1, 1), (1, 1)]),
            // Rows wide enough for the direct unit: stride 2 (even and odd columns) with
            // EfficientNet's asymmetric pads, 5x5 taps, a last vector of 1 and of 13 lanes.
            ([1, 18, 20, 98], [3, 3], [2, 2], 1, [(0, 1), (0, 1)]),
            ([2, 17, 24, 122], [5, 5], [2, 2], 1, [(1, 2), (2, 1)]),
            ([1, 5, 9, 49], [5, 5], [1, 1], 1, [(2, 2), (2, 2)]),
            // Pads beyond the kernel's reach, above and below, on rows so wide that a band is
            // one row: bands that read no input row at all.
            ([1, 3, 10, 300], [3, 3], [1, 1], 1, [(4, 4), (1, 1)]),
            ([2, 5, 6, 200], [3, 3], [2, 1], 1, [(5, 6), (0, 2)]),
            ([3, 7, 9, 11], [3, 3], [2, 2], 1, [(0, 1), (0, 1)]),
            ([2, 17, 14, 14], [5, 5], [1, 1], 1, [(2, 2), (2, 2)]),
            ([1, 33, 7, 7], [5, 5], [2, 2], 1, [(1, 2), (2, 1)]),
            ([1, 20, 150, 37], [3, 3], [1, 1], 1, [(1, 1), (1, 1)]),
            ([1, 9, 61, 45], [5, 5], [2, 2], 1, [(2, 2), (1, 2)]),
            // Column stride 2 read straight from the rows, with left pads of a whole pair and
            // more: pairs of padding only, then pairs partly and wholly in the row.
            ([1, 3, 7, 150], [3, 3], [2, 2], 1, [(4, 4), (33, 2)]),
            ([1, 2, 5, 40], [5, 5], [2, 2], 1, [(1, 1), (60, 3)]),
            // ... in groups of 4 + 1, 4 + 2 and 4 + 3 vectors of each kernel, with row strides
            // 1 and 3, and a row of whole vectors (64 columns).
            ([1, 3, 9, 160], [3, 3], [1, 2], 1, [(1, 1), (1, 1)]),
            ([1, 2, 7, 220], [3, 3], [2, 2], 1, [(1, 1), (1, 1)]),
            ([1, 2, 6, 150], [5, 5], [2, 2], 1, [(2, 2), (2, 2)]),
            ([1, 2, 6, 190], [5, 5], [2, 2], 1, [(2, 2), (2, 2)]),
            ([1, 3, 11, 200], [5, 5], [3, 2], 1, [(2, 2), (2, 1)]),
            ([1, 2, 6, 128], [3, 3], [2, 2], 1, [(0, 1), (0, 1)]),
            // Other kernels at column stride 2 still copy split rows (7x7, 3x5).
            ([1, 3, 15, 110], [7, 7], [2, 2], 1, [(3, 3), (3, 3)]),
            ([1, 3, 9, 100], [3, 5], [2, 2], 1, [(1, 1), (2, 2)]),
            ([2, 12, 19, 23], [3, 3], [3, 3], 1, [(1, 1), (1, 1)]),
            ([1, 18, 30, 29], [3, 3], [2, 1], 2, [(2, 1), (1, 2)]),
            // Stride 1, in groups of 4 + 1, 4 + 2 and 4 + 3 vectors of each kernel, a row of
            // whole vectors, and a left pad past a whole vector.
            ([1, 2, 5, 90], [5, 5], [1, 1], 1, [(2, 2), (2, 2)]),
            ([1, 2, 5, 110], [5, 5], [1, 1], 1, [(2, 2), (2, 2)]),
            ([1, 2, 5, 75], [5, 5], [1, 1], 1, [(1, 1), (3, 1)]),
            ([1, 2, 6, 96], [3, 3], [1, 1], 1, [(1, 1), (1, 1)]),
            ([1, 2, 5, 60], [3, 3], [1, 1], 1, [(1, 1), (20, 0)]),
            // A stride-2 direct convolution that copies split rows (7x7) between two stride-1
            // ones of the same layout: it writes every column of a thread's rows, whose zero
            // borders the second must not take as kept.
            ([1, 5, 9, 49], [5, 5], [1, 1], 1, [(2, 2), (2, 2)]),
            ([1, 4, 12, 100], [7, 7], [2, 2], 1, [(3, 3), (3, 3)]),
            ([1, 5, 9, 49], [5, 5], [1, 1], 1, [(2, 2), (2, 2)]),
        ];
        // A tile too large to size is refused, not allocated.
        let g = Geometry { pads: [(1, 1); 2], strides: [1, 1], dilations: [1, 1], group: 1 };
        assert!(Depthwise::new([usize::MAX / 4, 3], [3, 3], [usize::MAX / 4, 3], &g).is_none());
        let clamp = Clamp { lo: -0.5, hi: 2.0 };
        // Once in the shared pool and once in a pool of one thread, where every case runs on
        // the same thread in order (what the stride-2-between case needs to be caught).
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a pool");
        for single in [false, true] {
            let run = || {
                for level in simd::levels() {
                    let _cap = simd::cap(level);
                    for ([n, c, h, w], [kh, kw], strides, dil, pads) in cases {
                        let g = Geometry { pads, strides, dilations: [dil, dil], group: c };
                        let len = |size: usize, (a, b): (usize, usize), k: usize, s: usize| {
                            (size + a + b - (k - 1) * dil - 1) / s + 1
                        };
                        let (oh, ow) = (len(h, pads[0], kh, strides[0]), len(w, pads[1], kw, strides[1]));
                        let x: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
                        let k: Vec<f32> = (0..c * kh * kw).map(|i| ((i * 13 % 29) as f32 - 14.0) / 20.0).collect();
                        let bias: Vec<f32> = (0..c).map(|i| i as f32 / 10.0 - 0.4).collect();
                        let want = reference(&x, &k, &bias, [n, c, h, w], [kh, kw], [oh, ow], &g, clamp);
                        let plan = Depthwise::new([h, w], [kh, kw], [oh, ow], &g).expect("fits");
                        let mut out = vec![MaybeUninit::new(f32::NAN); n * c * oh * ow];
                        plan.run(&x, &k, &mut out, [n, c], Some(&bias), Some(clamp), None);
                        // SAFETY: `run` wrote every element (and they started as NaN, which would fail).
                        let got: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
                        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                        assert!(
                            worst < 1e-4 && got.iter().all(|v| v.is_finite()),
                            "{level:?} {:?}: worst {worst}",
                            ([n, c, h, w], [kh, kw], strides, dil, pads)
                        );
                    }
                }
            };
            if single { one.install(run) } else { run() }
        }
    }

    /// The stride-2 row kernel's masked load against the padded row it stands for: padding
    /// before the row wider than a vector, rows shorter than one, an empty row; and a row
    /// shorter than the one its window was made for is refused.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn padded_loads_read_only_the_row() {
        if !simd::avx512() {
            eprintln!("no AVX-512 on this CPU");
            return;
        }
        for len in 0..=40 {
            let input: Vec<f32> = (0..len).map(|i| i as f32 + 1.0).collect();
            for pl in 0..=40 {
                let padded: Vec<f32> =
                    (0..pl).map(|_| 0.0).chain(input.iter().copied()).chain(std::iter::repeat(0.0)).take(96).collect();
                for j in (0..80).step_by(16) {
                    let mut got = [0f32; 16];
                    let window = direct::Window::new(len, j, pl);
                    // SAFETY: AVX-512F is present (checked above); `got` holds 16 floats.
                    unsafe {
                        std::arch::x86_64::_mm512_storeu_ps(got.as_mut_ptr(), window.load(&input));
                    }
                    assert_eq!(got[..], padded[j..j + 16], "len {len} pl {pl} j {j}");
                    // A row shorter than the window reaches is refused, not read past.
                    if window.end() > 0 {
                        // SAFETY: as above; the load panics before it reads.
                        let short = std::panic::catch_unwind(|| unsafe { window.load(&input[..window.end() - 1]) });
                        assert!(short.is_err(), "len {len} pl {pl} j {j}: a short row was read");
                    }
                }
            }
        }
    }

    /// Blocks kept for one weight are made again for another bias or lane count, and every
    /// weight and bias lands in its block and lane.
    #[test]
    fn blocked_weights_follow_their_tensors() {
        let dev = candle_core::Device::Cpu;
        let (c, taps) = (19, 9);
        let w = Tensor::arange(0f32, (c * taps) as f32, &dev).unwrap().reshape((c, 1, 3, 3)).unwrap();
        let (b1, b2) = (Tensor::ones(c, DType::F32, &dev).unwrap(), Tensor::zeros(c, DType::F32, &dev).unwrap());
        let ws: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let cache = BlockedWeights::default();
        let get = |b: &Tensor| {
            let bs: Vec<f32> = b.to_vec1().unwrap();
            Blocked::get::<16>(&ws, Some(&bs), c, taps, Some((&cache, w.id(), Some(b.id()))))
        };
        let first = get(&b1);
        assert!(Arc::ptr_eq(&first, &get(&b1)), "the same tensors reuse their blocks");
        let (wb, bb) = first.lanes::<16>();
        assert_eq!((wb.len(), bb.len()), (2 * taps, 2));
        for ch in 0..c {
            for t in 0..taps {
                assert_eq!(wb[(ch / 16) * taps + t][ch % 16], (ch * taps + t) as f32);
            }
            assert_eq!(bb[ch / 16][ch % 16], 1.0);
        }
        assert!(bb[1][3..].iter().chain(wb[taps][3..].iter()).all(|&v| v == 0.0), "lanes past c are zero");
        let other = get(&b2);
        assert!(other.lanes::<16>().1.iter().flatten().all(|&v| v == 0.0), "another bias, other blocks");
        let eight = Blocked::get::<8>(&ws, None, c, taps, Some((&cache, w.id(), None)));
        assert_eq!(eight.lanes::<8>().0.len(), 3 * taps);
        assert!(std::panic::catch_unwind(|| eight.lanes::<16>().0.len()).is_err(), "8 lanes read as 16");
    }

    /// Not a test: `cargo test -p eir --lib depthwise::tests::efficientnet_timings -- --ignored
    /// --nocapture` times EfficientNet-Lite0's depthwise convolutions at batch 1 on one thread
    /// (`DW_CASE=i`: only the i-th, for a profiler), beside ONNX Runtime 1.32's own per-node
    /// times for them on this machine (`benches/ort_profile.py models 1 1`, recorded here).
    #[test]
    #[ignore]
    fn efficientnet_timings() {
        // `DW_LEVEL=avx2` times the AVX2 kernels.
        let _cap = (std::env::var("DW_LEVEL").as_deref() == Ok("avx2")).then(|| simd::cap(simd::Level::Avx2));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        // Channels, plane, kernel, stride, ONNX Runtime's milliseconds: each node's time in
        // its own one-thread pass (`benches/ort_profile.py`), on the Intel Xeon these kernels
        // were first tuned on. On an AMD EPYC (Zen 5) they were, in this order: 0.080, 0.086,
        // 0.095, 0.050, 0.073, 0.016, 0.029, 0.046, 0.065, 0.022, 0.029, 0.018.
        let cases = [
            (32, 112, 3, 1, 0.17),
            (96, 112, 3, 2, 0.252),
            (144, 56, 3, 1, 0.183),
            (144, 56, 5, 2, 0.096),
            (240, 28, 5, 1, 0.133),
            (240, 28, 3, 2, 0.026),
            (480, 14, 3, 1, 0.053),
            (480, 14, 5, 1, 0.083),
            (672, 14, 5, 1, 0.116),
            (672, 14, 5, 2, 0.037),
            (1152, 7, 5, 1, 0.052),
            (1152, 7, 3, 1, 0.039),
        ];
        pool.install(|| {
            let (mut ours, mut theirs) = (0.0, 0.0);
            let only: Option<usize> = std::env::var("DW_CASE").ok().and_then(|v| v.parse().ok());
            for (i, (c, h, k, s, ort)) in cases.into_iter().enumerate() {
                if only.is_some_and(|o| o != i) {
                    continue;
                }
                let pads = if s == 1 { [(k / 2, k / 2); 2] } else { [(k / 2 - 1, k / 2); 2] };
                let g = Geometry { pads, strides: [s, s], dilations: [1, 1], group: c };
                let o = (h + pads[0].0 + pads[0].1 - k) / s + 1;
                let x: Vec<f32> = (0..c * h * h).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
                let w: Vec<f32> = (0..c * k * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 20.0).collect();
                let bias = vec![0.1f32; c];
                let plan = Depthwise::new([h, h], [k, k], [o, o], &g).unwrap();
                let mut out = vec![MaybeUninit::new(0f32); c * o * o];
                let (cache, wt, bt) =
                    (BlockedWeights::default(), Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu).unwrap(), None);
                let keep = Some((&cache, wt.id(), bt));
                let t = crate::nn::kernels::median_time(if only.is_some() { 5001 } else { 101 }, &mut || {
                    plan.run(&x, &w, &mut out, [1, c], Some(&bias), Some(Clamp { lo: 0.0, hi: 6.0 }), keep)
                });
                let ms = t.as_secs_f64() * 1e3;
                ours += ms;
                theirs += ort;
                eprintln!("{c:>5} x {h:>3} k{k} s{s}: EIR {ms:.4} ms | ORT {ort:.3} | {:.2}x", ms / ort);
                // The same layer channels last, row by row (`RowsLast`, the banded blocks'),
                // on the same floats read as pixels.
                if let Some(rows) = plan.rows_last(&w, Some(&bias), c, Some(Clamp { lo: 0.0, hi: 6.0 }), keep) {
                    let t = crate::nn::kernels::median_time(if only.is_some() { 5001 } else { 101 }, &mut || {
                        for (oy, dst) in out.chunks_exact_mut(o * c).enumerate() {
                            rows.row(oy, |y| &x[y * h * c..(y + 1) * h * c], dst);
                        }
                    });
                    eprintln!("{:>24} channels last {:.4} ms", "", t.as_secs_f64() * 1e3);
                }
            }
            eprintln!("sum: EIR {ours:.3} ORT {theirs:.3} = {:.2}x", ours / theirs);
        });
    }

    fn square<const L: usize>() -> [[f32; L]; L] {
        std::array::from_fn(|i| std::array::from_fn(|j| (i * L + j) as f32))
    }

    #[test]
    fn transposes_agree() {
        let mut m8 = square::<8>();
        transpose(&mut m8);
        assert!((0..8).all(|i| (0..8).all(|j| m8[i][j] == (j * 8 + i) as f32)));
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx") {
                let mut v = square::<8>();
                // SAFETY: the CPU supports AVX (checked above).
                unsafe { x86::transpose8(&mut v) };
                assert_eq!(v, m8);
            }
            if std::is_x86_feature_detected!("avx512f") {
                let (mut v, mut want) = (square::<16>(), square::<16>());
                transpose(&mut want);
                // SAFETY: the CPU supports AVX-512F (checked above).
                unsafe { x86::transpose16(&mut v) };
                assert_eq!(v, want);
            }
        }
    }
}
