//! Dense convolutions over few input taps, computed directly: a vision model's stem
//! (EfficientNet: 3 channels, 3x3, stride 2, 32 outputs on a 224x224 image).
//!
//! im2col would write 27 columns per output pixel (1.35 MB for one image) and the GEMM would
//! read them back with `k = 27`, too short to pay for a tile's stores: the stem ran no faster
//! on two threads than on one (`EIR_ONNX_PROFILE=nodes`, batch 1: 0.28–0.33 ms against 0.30).
//! Here each range of output rows first copies the input rows it reads, zero-padded and split
//! into stride phases (`row[j·s + q]` goes to phase `q`, position `j`), so every tap of 16
//! adjacent outputs is one contiguous load; then 16 output channels accumulate in registers
//! over all taps and are written once, with bias and clamp.

use std::mem::MaybeUninit;

use super::conv::{Geometry, gather, valid};
use crate::nn::kernels::sgemm::Clamp;

/// The most input taps (channels × kernel rows × kernel columns) the direct kernel takes: a
/// group's weights (`taps × 16` floats) then stay in L1, and deeper products suit the GEMM.
const MAX_TAPS: usize = 32;
/// The widest stride along a row: each stride is one phase copy of the input rows.
const MAX_STRIDE: usize = 4;
/// Output pixels per vector, and output channels per group of accumulators.
const L: usize = 16;

/// A convolution the direct kernel runs, its sizes proven by [`Stem::new`]: one group,
/// dilation 1, at most [`MAX_TAPS`] taps and a row stride of at most [`MAX_STRIDE`]; `owp`
/// is the output width rounded up to whole vectors and `len` the floats per phase of an
/// input row, enough for every tap of every (rounded-up) output column.
pub(crate) struct Stem {
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    pt: usize,
    pl: usize,
    oh: usize,
    ow: usize,
    owp: usize,
    len: usize,
}

impl Stem {
    /// The direct kernel's plan for `[n, c, h, w]` by `[m, c, kh, kw]` giving `[oh, ow]`
    /// planes (checked consistent by the caller's plan), or `None` where it does not apply.
    pub(crate) fn new(
        [_, c, h, w]: [usize; 4],
        [m, cg, kh, kw]: [usize; 4],
        [oh, ow]: [usize; 2],
        g: &Geometry,
    ) -> Option<Self> {
        let taps = c.checked_mul(kh)?.checked_mul(kw)?;
        let [sh, sw] = g.strides;
        let applies = g.group == 1
            && cg == c
            && c >= 1
            && g.dilations == [1, 1]
            && (kh > 1 || kw > 1)
            && taps <= MAX_TAPS
            && (1..=MAX_STRIDE).contains(&sw)
            && (1..=MAX_STRIDE).contains(&sh)
            && m >= 1
            && [h, w, oh, ow].iter().all(|&v| v >= 1);
        if !applies {
            return None;
        }
        let owp = ow.checked_next_multiple_of(L)?;
        let len = owp.checked_add((kw - 1) / sw + 1)?;
        // Every size the kernel forms: a range's phase rows and the output.
        c.checked_mul(h)?.checked_add(1)?.checked_mul(sw)?.checked_mul(len)?;
        m.checked_mul(oh)?.checked_mul(ow)?;
        Some(Self { c, h, w, m, kh, kw, sh, sw, pt: g.pads[0].0, pl: g.pads[1].0, oh, ow, owp, len })
    }

    /// The input rows output rows `oy0..oy1` read, clipped to the image (possibly empty).
    fn input_rows(&self, oy0: usize, oy1: usize) -> (usize, usize) {
        let top = (oy0 * self.sh).saturating_sub(self.pt).min(self.h);
        let bottom = ((oy1 - 1) * self.sh + self.kh).saturating_sub(self.pt).min(self.h).max(top);
        (top, bottom)
    }

    /// Floats a worker's phase rows take for `rows` output rows.
    fn thread_floats(&self, rows: usize) -> u64 {
        let input = ((rows.max(1) - 1) * self.sh + self.kh).min(self.h);
        (self.c * input * self.sw * self.len + self.sw * self.len) as u64
    }

    /// The most floats [`Stem::run`] allocates for `n` images beyond the output (what the plan
    /// reserves): the weights and bias by group, and the phase rows of up to `threads` workers.
    pub(crate) fn floats(&self, n: usize, threads: u64) -> Option<u64> {
        let groups = (self.m.div_ceil(L) * L) as u64;
        let weights = groups.checked_mul((self.c * self.kh * self.kw + 1) as u64)?;
        self.thread_floats(self.rows(n)).checked_mul(threads)?.checked_add(weights)
    }

    /// Whether `n` images give each thread at least two ranges of rows: one row per image (a
    /// 1-D convolution) would run each image on one thread, where the GEMM splits columns.
    pub(crate) fn shares(&self, n: usize) -> bool {
        n.saturating_mul(self.oh) >= 2 * rayon::current_num_threads()
    }

    /// Output rows per unit of parallel work: about four units per thread over the batch.
    fn rows(&self, n: usize) -> usize {
        let ranges = (4 * rayon::current_num_threads()).div_ceil(n.max(1)).clamp(1, self.oh);
        self.oh.div_ceil(ranges)
    }

    /// `out = clamp(conv(xs, ws) + bias)` for `n` images: `xs` `[n, c, h, w]`, `ws`
    /// `[m, c, kh, kw]`, `out` `[n, m, oh, ow]`, every element of which is written.
    pub(crate) fn run(
        &self,
        xs: &[f32],
        ws: &[f32],
        n: usize,
        bias: Option<&[f32]>,
        clamp: Option<Clamp>,
        out: &mut [MaybeUninit<f32>],
    ) {
        self.run_rows(xs, ws, n, (bias, clamp), self.rows(n), out);
    }

    /// [`Stem::run`], `rows` output rows of one image per unit of parallel work.
    fn run_rows(
        &self,
        xs: &[f32],
        ws: &[f32],
        n: usize,
        (bias, clamp): (Option<&[f32]>, Option<Clamp>),
        rows: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (c, m, oplane) = (self.c, self.m, self.oh * self.ow);
        let taps = c * self.kh * self.kw;
        assert!(
            rows >= 1
                && xs.len() >= n * c * self.h * self.w
                && ws.len() >= m * taps
                && bias.is_none_or(|b| b.len() >= m)
                && out.len() >= n * m * oplane,
            "stem: operands smaller than their shapes"
        );
        // Weights by group of 16 output channels, tap-major: `wb[g·taps + t][co]`.
        let groups = m.div_ceil(L);
        let mut wb = super::filled(groups * taps, [0f32; L]);
        let mut bb = super::filled(groups, [0f32; L]);
        for o in 0..m {
            for t in 0..taps {
                wb[(o / L) * taps + t][o % L] = ws[o * taps + t];
            }
            bb[o / L][o % L] = bias.map_or(0.0, |b| b[o]);
        }
        // One unit per (image, range of rows): each output channel's rows in that range.
        let mut units = Vec::with_capacity(n * self.oh.div_ceil(rows));
        for (i, image) in out[..n * m * oplane].chunks_exact_mut(m * oplane).enumerate() {
            let mut planes: Vec<_> = image.chunks_exact_mut(oplane).map(|p| p.chunks_mut(rows * self.ow)).collect();
            for oy0 in (0..self.oh).step_by(rows) {
                units.push((i, oy0, planes.iter_mut().filter_map(Iterator::next).collect::<Vec<_>>()));
            }
        }
        let plane = self.h * self.w;
        // Sized for the largest range up front: grown range by range, `resize` could double it.
        let phases = || Vec::with_capacity(self.thread_floats(rows) as usize);
        crate::nn::kernels::par::for_each_init(units, phases, |phases: &mut Vec<f32>, (i, oy0, mut dst)| {
            let oy1 = (oy0 + rows).min(self.oh);
            let (ya, yb) = self.input_rows(oy0, oy1);
            let image = &xs[i * c * plane..(i + 1) * c * plane];
            self.fill(image, (ya, yb), phases);
            let per_row = self.sw * self.len;
            // The zero row (padding above and below the image) follows the copied rows.
            let zero = c * (yb - ya) * per_row;
            for oy in oy0..oy1 {
                // Where each (channel, kernel row) of this output row starts in `phases`.
                let mut starts = [0usize; MAX_TAPS];
                for ci in 0..c {
                    for ky in 0..self.kh {
                        let iy = (oy * self.sh + ky).checked_sub(self.pt).filter(|&y| y >= ya && y < yb);
                        starts[ci * self.kh + ky] = iy.map_or(zero, |y| (ci * (yb - ya) + (y - ya)) * per_row);
                    }
                }
                let tap = self.taps(&starts);
                let at = (oy - oy0) * self.ow;
                for g in 0..groups {
                    let lanes = L.min(m - g * L);
                    let weights = &wb[g * taps..(g + 1) * taps];
                    let mut rows_out: [Option<&mut [MaybeUninit<f32>]>; L] = std::array::from_fn(|_| None);
                    for (slot, plane) in rows_out.iter_mut().zip(&mut dst[g * L..g * L + lanes]) {
                        *slot = Some(&mut plane[at..at + self.ow]);
                    }
                    self.row(phases, &tap, weights, bb[g], clamp, &mut rows_out);
                }
            }
        });
    }

    /// Copies the input rows `ya..yb` of every channel of `image` into `phases`, zero-padded
    /// and split by the row stride, followed by one zero row.
    fn fill(&self, image: &[f32], (ya, yb): (usize, usize), phases: &mut Vec<f32>) {
        let per_row = self.sw * self.len;
        phases.clear();
        phases.resize(self.c * (yb - ya) * per_row + per_row, 0.0);
        for ci in 0..self.c {
            for y in ya..yb {
                let src = &image[(ci * self.h + y) * self.w..(ci * self.h + y + 1) * self.w];
                let dst = &mut phases[(ci * (yb - ya) + (y - ya)) * per_row..][..per_row];
                for (q, phase) in dst.chunks_exact_mut(self.len).enumerate() {
                    // Position j holds input column j·sw + q − pl where that is in the row (the
                    // rest stays zero): the positions `lo..hi`, from column `first` on.
                    let (lo, hi) = valid(self.len, self.w, self.sw, q as isize - self.pl as isize);
                    if lo < hi {
                        let first = lo * self.sw + q - self.pl;
                        gather(&mut phase[lo..hi], &src[first..], self.sw);
                    }
                }
            }
        }
    }

    /// Where each tap's 16 inputs for the first vector of an output row's columns start in
    /// the phase rows, given where each (channel, kernel row) of that row starts (`starts`):
    /// its phase row, then the phase and offset of its kernel column. The same for every group
    /// of output channels, so worked out once per row.
    fn taps(&self, starts: &[usize; MAX_TAPS]) -> [usize; MAX_TAPS] {
        let mut tap = [0usize; MAX_TAPS];
        let (kh, kw) = (self.kh, self.kw);
        let mut slots = tap.iter_mut();
        for &start in &starts[..self.c * kh] {
            for kx in 0..kw {
                if let Some(slot) = slots.next() {
                    *slot = start + (kx % self.sw) * self.len + kx / self.sw;
                }
            }
        }
        tap
    }

    /// One output row of one group of channels: for each 16 output columns, every tap into 16
    /// accumulators (one per channel), then bias, clamp and the row's valid columns out.
    fn row(
        &self,
        phases: &[f32],
        tap: &[usize; MAX_TAPS],
        weights: &[[f32; L]],
        bias: [f32; L],
        clamp: Option<Clamp>,
        out: &mut [Option<&mut [MaybeUninit<f32>]>; L],
    ) {
        let taps = &tap[..self.c * self.kh * self.kw];
        // Every tap's last load ends within `phases`: `len` covers the rounded-up width.
        assert!(
            taps.iter().all(|&s| s + self.owp <= phases.len()) && weights.len() == taps.len(),
            "stem: a tap past its phase rows"
        );
        #[cfg(target_arch = "x86_64")]
        if crate::nn::kernels::simd::avx512() {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { x86::row(phases, taps, self.ow, weights, bias, clamp, out) };
        }
        portable(phases, taps, self.ow, weights, bias, clamp, out)
    }
}

/// One output row of up to 16 channels (`out`, `ow` columns each), 16 columns at a time:
/// `out[co][x] = clamp(bias[co] + Σ_t weights[t][co] · phases[taps[t] + x])`.
fn portable(
    phases: &[f32],
    taps: &[usize],
    ow: usize,
    weights: &[[f32; L]],
    bias: [f32; L],
    clamp: Option<Clamp>,
    out: &mut [Option<&mut [MaybeUninit<f32>]>; L],
) {
    for x0 in (0..ow).step_by(L) {
        let mut acc: [[f32; L]; L] = std::array::from_fn(|co| [bias[co]; L]);
        for (&t, w) in taps.iter().zip(weights) {
            let src = phases[t + x0..].first_chunk::<L>().expect("stem: a tap past its phase rows");
            for (a, &wc) in acc.iter_mut().zip(w) {
                // Not `mul_add`: without FMA in the build it is a libm call per element.
                for (v, &s) in a.iter_mut().zip(src) {
                    *v += wc * s;
                }
            }
        }
        let valid = L.min(ow - x0);
        for (a, dst) in acc.iter().zip(out.iter_mut()) {
            if let Some(dst) = dst {
                for (d, &v) in dst[x0..x0 + valid].iter_mut().zip(a) {
                    d.write(clamp.map_or(v, |c| v.max(c.lo).min(c.hi)));
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{Clamp, L};
    use crate::nn::kernels::simd;

    /// Output channels per pass over two vectors of columns.
    const HALF: usize = L / 2;

    /// [`super::portable`] on AVX-512. Two vectors of columns at a time, 8 channels per pass:
    /// 16 accumulators, two vector loads and 8 weights broadcast from memory per tap for 16
    /// FMAs, where one vector of all 16 channels took a broadcast per FMA. (With the taps'
    /// offsets worked out once per row rather than per group of channels, EfficientNet's stem
    /// on one thread went 0.143 → 0.121 ms, batch 8 1.16 → 0.98 ms.) The row's last vector,
    /// where it is alone, takes all 16 channels at once; each row's last columns are stored
    /// under a mask. Every sum runs in tap order from the bias, whichever way.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row(
        phases: &[f32],
        taps: &[usize],
        ow: usize,
        weights: &[[f32; L]],
        bias: [f32; L],
        clamp: Option<Clamp>,
        out: &mut [Option<&mut [MaybeUninit<f32>]>; L],
    ) {
        let bounds = clamp.map(|c| (_mm512_set1_ps(c.lo), _mm512_set1_ps(c.hi)));
        let finish = |a: __m512| match bounds {
            Some((lo, hi)) => _mm512_min_ps(_mm512_max_ps(a, lo), hi),
            None => a,
        };
        let mut x0 = 0;
        // Both vectors hold columns of the row: the second's loads stay within the row's
        // rounded-up width, which every tap's phase row holds (the caller's assert).
        while x0 + L < ow {
            for co0 in [0, HALF] {
                let mut acc: [[__m512; 2]; HALF] = std::array::from_fn(|co| [_mm512_set1_ps(bias[co0 + co]); 2]);
                for (&t, w) in taps.iter().zip(weights) {
                    // A checked array of 32, so both loads stay inside `phases`.
                    let src = phases[t + x0..].first_chunk::<{ 2 * L }>().expect("stem: a tap past its phase rows");
                    // SAFETY: `src` holds 32 floats.
                    let v = unsafe { [_mm512_loadu_ps(src.as_ptr()), _mm512_loadu_ps(src.as_ptr().add(L))] };
                    for (a, &wc) in acc.iter_mut().zip(&w[co0..co0 + HALF]) {
                        let wc = _mm512_set1_ps(wc);
                        a[0] = _mm512_fmadd_ps(wc, v[0], a[0]);
                        a[1] = _mm512_fmadd_ps(wc, v[1], a[1]);
                    }
                }
                for (a, dst) in acc.iter().zip(out[co0..co0 + HALF].iter_mut()) {
                    let Some(dst) = dst else { continue };
                    for (v, &a) in a.iter().enumerate() {
                        let from = x0 + v * L;
                        let valid = L.min(ow - from);
                        // A checked slice of `valid` floats: the masked store writes just those.
                        let dst = &mut dst[from..from + valid];
                        // SAFETY: the mask covers `valid` lanes, all inside `dst`.
                        unsafe {
                            _mm512_mask_storeu_ps(dst.as_mut_ptr().cast::<f32>(), simd::lanes16(valid), finish(a))
                        };
                    }
                }
            }
            x0 += 2 * L;
        }
        for x0 in (x0..ow).step_by(L) {
            let mut acc: [__m512; L] = std::array::from_fn(|co| _mm512_set1_ps(bias[co]));
            for (&t, w) in taps.iter().zip(weights) {
                // A checked array of 16, so the load stays inside `phases`.
                let src = phases[t + x0..].first_chunk::<L>().expect("stem: a tap past its phase rows");
                // SAFETY: `src` holds 16 floats.
                let v = unsafe { _mm512_loadu_ps(src.as_ptr()) };
                for (a, &wc) in acc.iter_mut().zip(w) {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(wc), v, *a);
                }
            }
            let valid = L.min(ow - x0);
            for (a, dst) in acc.iter().zip(out.iter_mut()) {
                if let Some(dst) = dst {
                    let a = finish(*a);
                    // A checked slice of `valid` floats: the masked store writes just those.
                    let dst = &mut dst[x0..x0 + valid];
                    // SAFETY: the mask covers `valid` lanes, all inside `dst`.
                    unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr().cast::<f32>(), simd::lanes16(valid), a) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(xs: &[f32], ws: &[f32], bias: &[f32], d: [usize; 4], k: [usize; 4], g: &Geometry) -> Vec<f32> {
        let ([n, c, h, w], [m, _, kh, kw]) = (d, k);
        let oh = (h + g.pads[0].0 + g.pads[0].1 - kh) / g.strides[0] + 1;
        let ow = (w + g.pads[1].0 + g.pads[1].1 - kw) / g.strides[1] + 1;
        let mut out = vec![0f32; n * m * oh * ow];
        for i in 0..n {
            for o in 0..m {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = bias[o] as f64;
                        for ci in 0..c {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * g.strides[0] + ky) as isize - g.pads[0].0 as isize;
                                    let ix = (ox * g.strides[1] + kx) as isize - g.pads[1].0 as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                        let x = xs[((i * c + ci) * h + iy as usize) * w + ix as usize];
                                        s += (x * ws[((o * c + ci) * kh + ky) * kw + kx]) as f64;
                                    }
                                }
                            }
                        }
                        out[((i * m + o) * oh + oy) * ow + ox] = s as f32;
                    }
                }
            }
        }
        out
    }

    /// Against the definition on ragged shapes, at every SIMD level, with and without bias and
    /// clamp, on ranges of 1, 2 and 3 rows and whole planes: widths that are not whole vectors
    /// and that are, channel counts that are not whole groups, asymmetric pads and pads wider
    /// than the kernel (whole rows, ranges and phases of padding), strides 1–4 (4 wider than
    /// the kernel), exactly 32 taps.
    #[test]
    fn matches_the_definition_on_ragged_shapes() {
        use crate::nn::kernels::simd;
        let cases = [
            // [n, c, h, w], [m, kh, kw], strides, pads (top, bottom), (left, right)
            ([1, 3, 17, 35], [32, 3, 3], [2, 2], [(0, 1), (0, 1)]),
            ([2, 3, 9, 16], [20, 3, 3], [2, 2], [(1, 1), (1, 1)]),
            ([1, 1, 5, 40], [7, 3, 5], [1, 1], [(2, 0), (1, 3)]),
            ([3, 2, 12, 19], [17, 2, 4], [3, 3], [(1, 2), (0, 2)]),
            ([1, 4, 6, 6], [16, 2, 2], [1, 2], [(0, 0), (0, 0)]),
            ([4, 3, 1, 50], [5, 1, 3], [1, 2], [(0, 0), (1, 1)]),
            ([1, 3, 4, 3], [9, 3, 3], [1, 1], [(4, 5), (3, 4)]),
            ([2, 2, 7, 33], [18, 3, 2], [4, 4], [(1, 1), (2, 0)]),
            ([1, 2, 8, 32], [33, 4, 4], [2, 1], [(1, 2), (2, 1)]),
        ];
        for (d, [m, kh, kw], strides, pads) in cases {
            let [n, c, h, w] = d;
            let g = Geometry { pads, strides, dilations: [1, 1], group: 1 };
            let xs: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
            let ws: Vec<f32> = (0..m * c * kh * kw).map(|i| ((i * 53 % 89) as f32 - 44.0) / 40.0).collect();
            let bias: Vec<f32> = (0..m).map(|o| o as f32 / 7.0 - 1.0).collect();
            let plain = reference(&xs, &ws, &vec![0.0; m], d, [m, c, kh, kw], &g);
            let biased = reference(&xs, &ws, &bias, d, [m, c, kh, kw], &g);
            let oh = (h + pads[0].0 + pads[0].1 - kh) / strides[0] + 1;
            let ow = (w + pads[1].0 + pads[1].1 - kw) / strides[1] + 1;
            let stem = Stem::new(d, [m, c, kh, kw], [oh, ow], &g).expect("applies");
            let clamp = Clamp { lo: -1.5, hi: 2.0 };
            for level in simd::levels() {
                let _cap = simd::cap(level);
                for rows in [1, 2, 3, oh] {
                    for (bias, clamp, want) in [(None, None, &plain), (Some(&bias[..]), Some(clamp), &biased)] {
                        let mut out = vec![MaybeUninit::new(f32::NAN); want.len()];
                        stem.run_rows(&xs, &ws, n, (bias, clamp), rows, &mut out);
                        for (j, (got, &want)) in out.iter().zip(want).enumerate() {
                            // SAFETY: initialised above (NaN where the kernel might not write).
                            let got = unsafe { got.assume_init() };
                            let want = clamp.map_or(want, |c| want.clamp(c.lo, c.hi));
                            assert!(
                                (got - want).abs() <= 1e-4,
                                "{level:?} {d:?} {m} {kh}x{kw} rows {rows} at {j}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// EfficientNet's stem takes the direct kernel where the plan is made.
    #[test]
    fn efficientnets_stem_is_planned_here() {
        let g = Geometry { pads: [(0, 1); 2], strides: [2, 2], dilations: [1, 1], group: 1 };
        let plan = super::super::conv::ConvPlan::new(&[1, 3, 224, 224], &[32, 3, 3, 3], &g).expect("plan");
        assert!(plan.stem.is_some());
    }

    #[test]
    fn declines_what_the_gemm_suits() {
        let g = |group, dilations| Geometry { pads: [(0, 0); 2], strides: [1, 1], dilations, group };
        // Too many taps, a group, a dilation, a 1x1 kernel.
        assert!(Stem::new([1, 16, 8, 8], [8, 16, 3, 3], [6, 6], &g(1, [1, 1])).is_none());
        assert!(Stem::new([1, 2, 8, 8], [2, 1, 3, 3], [6, 6], &g(2, [1, 1])).is_none());
        assert!(Stem::new([1, 3, 8, 8], [8, 3, 3, 3], [4, 4], &g(1, [2, 2])).is_none());
        assert!(Stem::new([1, 3, 8, 8], [8, 3, 1, 1], [8, 8], &g(1, [1, 1])).is_none());
        assert!(Stem::new([1, 3, 8, 8], [8, 3, 3, 3], [6, 6], &g(1, [1, 1])).is_some());
        // Sizes whose phase rows or output would overflow are refused, not wrapped.
        let huge = usize::MAX / 4;
        assert!(Stem::new([1, 3, 8, huge], [8, 3, 3, 3], [6, huge - 2], &g(1, [1, 1])).is_none());
        assert!(Stem::new([1, 3, huge, 8], [8, 3, 3, 3], [huge - 2, 6], &g(1, [1, 1])).is_none());
    }
}
