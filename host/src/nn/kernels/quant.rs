//! Quantized matrix-vector products for GGUF models: weights in ggml's Q4_1 or Q8_0 blocks
//! against activations quantized per token to Q8_1 blocks (as llama.cpp does), so the inner
//! loop is an 8-bit integer dot product with one scale per 32 elements.
//!
//! Weights are validated once ([`QMatrix::new`]); activations are made only by
//! [`Activations::quantize`]; the vector kernels take only those two types, whose lengths they
//! check before the first load. The AVX2 (+FMA, F16C) kernels, and the same tiles with AVX-512
//! VNNI's byte dot product where present, are chosen at run time ([`Kernel::best`]) and tested
//! against the scalar one.

use bytemuck::Zeroable;
use half::f16;
use rayon::prelude::*;

use super::simd;
use crate::nn::error::NnError;

/// Elements per block (ggml's `QK4_1` = `QK8_0` = `QK8_1`).
pub(crate) const QK: usize = 32;

/// ggml's `block_q4_1`: 32 weights as `d·q + m` with `q` in `0..16`; element `j < 16` is the
/// low nibble of `qs[j]`, element `j + 16` its high nibble. `d`, `m` are f16 bits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub(crate) struct BlockQ4_1 {
    pub d: u16,
    pub m: u16,
    pub qs: [u8; 16],
}

/// ggml's `block_q8_0`: 32 weights as `d·q`, `q` signed bytes; `d` is f16 bits.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub(crate) struct BlockQ8_0 {
    pub d: u16,
    pub qs: [i8; 32],
}

/// 32 activations as `d·q`, with `s = d·Σq` for Q4_1's offset term. `d` and `s` are kept as
/// f32 but rounded through f16, as llama.cpp stores them, so products match its results.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub(crate) struct BlockQ8_1 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; 32],
}

// SAFETY: each block is `repr(C)` of integer and float fields and arrays with no padding
// (the sizes asserted below are the sums of the fields' sizes), so every bit pattern is a valid
// value and the all-zero one too: bytemuck's conditions for `Pod` and `Zeroable`.
unsafe impl Zeroable for BlockQ4_1 {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for BlockQ4_1 {}
// SAFETY: as above.
unsafe impl Zeroable for BlockQ8_0 {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for BlockQ8_0 {}
// SAFETY: as above.
unsafe impl Zeroable for BlockQ8_1 {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for BlockQ8_1 {}
const _: () = assert!(size_of::<BlockQ4_1>() == 2 + 2 + 16 && size_of::<BlockQ8_0>() == 2 + 32);
const _: () = assert!(size_of::<BlockQ8_1>() == 4 + 4 + 32);

/// A ggml block type the kernels take as weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QType {
    Q4_1,
    Q8_0,
}

impl QType {
    /// Bytes of one block in a file.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            QType::Q4_1 => size_of::<BlockQ4_1>(),
            QType::Q8_0 => size_of::<BlockQ8_0>(),
        }
    }
}

enum Blocks {
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
}

/// A `rows × cols` weight matrix in quantized blocks, rows contiguous. Made only by
/// [`QMatrix::new`], which proves `cols` is a positive multiple of [`QK`] and the blocks cover
/// exactly `rows × cols`.
pub(crate) struct QMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

impl QMatrix {
    /// Copies a matrix out of a file's bytes (ggml's layout), checking its size.
    pub(crate) fn new(qtype: QType, rows: usize, cols: usize, bytes: &[u8]) -> Result<QMatrix, NnError> {
        if cols == 0 || !cols.is_multiple_of(QK) || rows == 0 {
            return Err(NnError::invalid_encoding(format!(
                "a {qtype:?} matrix of {rows}x{cols}: a row's length must be a positive multiple of {QK}"
            )));
        }
        let n = rows
            .checked_mul(cols / QK)
            .filter(|n| n.checked_mul(qtype.block_bytes()) == Some(bytes.len()))
            .ok_or_else(|| {
                NnError::invalid_encoding(format!(
                    "a {qtype:?} matrix of {rows}x{cols} does not hold {} bytes",
                    bytes.len()
                ))
            })?;
        // Copy into typed, aligned storage (file offsets need not be aligned for the blocks).
        let blocks = match qtype {
            QType::Q4_1 => {
                let mut v = vec![BlockQ4_1::zeroed(); n];
                bytemuck::cast_slice_mut::<BlockQ4_1, u8>(&mut v).copy_from_slice(bytes);
                Blocks::Q4_1(v)
            }
            QType::Q8_0 => {
                let mut v = vec![BlockQ8_0::zeroed(); n];
                bytemuck::cast_slice_mut::<BlockQ8_0, u8>(&mut v).copy_from_slice(bytes);
                Blocks::Q8_0(v)
            }
        };
        Ok(QMatrix { rows, cols, blocks })
    }

    /// Bytes the blocks take.
    pub(crate) fn bytes(&self) -> usize {
        match &self.blocks {
            Blocks::Q4_1(v) => size_of_val(v.as_slice()),
            Blocks::Q8_0(v) => size_of_val(v.as_slice()),
        }
    }

    /// Row `r` as f32 (embedding lookups).
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), NnError> {
        let per = self.cols / QK;
        if r >= self.rows || out.len() != self.cols {
            return Err(NnError::invalid_argument(format!("row {r} of a {}x{} matrix", self.rows, self.cols)));
        }
        match &self.blocks {
            Blocks::Q4_1(v) => {
                for (b, o) in v[r * per..(r + 1) * per].iter().zip(out.chunks_exact_mut(QK)) {
                    let (d, m) = (f16::from_bits(b.d).to_f32(), f16::from_bits(b.m).to_f32());
                    for j in 0..16 {
                        o[j] = f32::from(b.qs[j] & 0xf) * d + m;
                        o[j + 16] = f32::from(b.qs[j] >> 4) * d + m;
                    }
                }
            }
            Blocks::Q8_0(v) => {
                for (b, o) in v[r * per..(r + 1) * per].iter().zip(out.chunks_exact_mut(QK)) {
                    let d = f16::from_bits(b.d).to_f32();
                    for (o, &q) in o.iter_mut().zip(&b.qs) {
                        *o = f32::from(q) * d;
                    }
                }
            }
        }
        Ok(())
    }

    /// `dst[t·rows + r] = row r · activation t` for every row and token, on the compute pool.
    pub(crate) fn matmul(&self, x: &Activations, dst: &mut [f32]) -> Result<(), NnError> {
        if x.cols != self.cols || Some(dst.len()) != x.n.checked_mul(self.rows) {
            return Err(NnError::runtime(format!(
                "quantized product: {}x{} weights, {} activations of {}, {} outputs",
                self.rows,
                self.cols,
                x.n,
                x.cols,
                dst.len()
            )));
        }
        let kernel = Kernel::best();
        let per = self.cols / QK;
        // Chunks of rows small enough that both threads stay busy on the narrowest matrix
        // (192 rows), large enough that the pool's overhead stays small.
        let chunk = ROWS_PER_TASK.min(self.rows.div_ceil(4 * rayon::current_num_threads()).max(8));
        let chunks = self.rows.div_ceil(chunk);
        // Split each token's output row at the chunk boundaries, so every task owns its
        // outputs for every token.
        let mut parts: Vec<Vec<&mut [f32]>> = (0..chunks).map(|_| Vec::with_capacity(x.n)).collect();
        for mut row in dst.chunks_exact_mut(self.rows) {
            for part in parts.iter_mut() {
                let (head, rest) = row.split_at_mut(chunk.min(row.len()));
                part.push(head);
                row = rest;
            }
        }
        let work = |(c, mut outs): (usize, Vec<&mut [f32]>)| {
            let r0 = c * chunk;
            let rows = outs.first().map_or(0, |o| o.len());
            // Tiles of up to 2 rows x 4 tokens: each weight block is unpacked once per 4
            // tokens, and each activation block loaded once per 2 rows.
            for r in (0..rows).step_by(2) {
                let nr = (rows - r).min(2);
                for t in (0..x.n).step_by(4) {
                    let nt = (x.n - t).min(4);
                    let mut res = [[0f32; 4]; 2];
                    let row = |i: usize| (r0 + r + i.min(nr - 1)) * per;
                    let toks: [&[BlockQ8_1]; 4] = std::array::from_fn(|j| x.token(t + j.min(nt - 1)));
                    match &self.blocks {
                        Blocks::Q4_1(v) => {
                            let ws: [&[BlockQ4_1]; 2] = std::array::from_fn(|i| &v[row(i)..row(i) + per]);
                            kernel.q4_1(ws, toks, nr, nt, &mut res);
                        }
                        Blocks::Q8_0(v) => {
                            let ws: [&[BlockQ8_0]; 2] = std::array::from_fn(|i| &v[row(i)..row(i) + per]);
                            kernel.q8_0(ws, toks, nr, nt, &mut res);
                        }
                    }
                    for (i, res) in res.iter().enumerate().take(nr) {
                        for (j, &v) in res.iter().enumerate().take(nt) {
                            outs[t + j][r + i] = v;
                        }
                    }
                }
            }
        };
        if self.rows * self.cols * x.n < PARALLEL_MIN {
            parts.into_iter().enumerate().for_each(work);
        } else {
            parts.into_par_iter().enumerate().for_each(work);
        }
        Ok(())
    }
}

/// Most rows per parallel task.
const ROWS_PER_TASK: usize = 64;
/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// `n` rows of `cols` activations quantized to Q8_1, made by [`Activations::quantize`]
/// (which proves `cols` a multiple of [`QK`] and the blocks cover `n` rows).
#[derive(Default)]
pub(crate) struct Activations {
    n: usize,
    cols: usize,
    blocks: Vec<BlockQ8_1>,
}

impl Activations {
    /// Quantizes `x` (`n` rows of `cols`), reusing this buffer.
    pub(crate) fn quantize(&mut self, x: &[f32], cols: usize) -> Result<(), NnError> {
        if cols == 0 || !cols.is_multiple_of(QK) || !x.len().is_multiple_of(cols) {
            return Err(NnError::runtime(format!("cannot quantize {} values in rows of {cols}", x.len())));
        }
        self.n = x.len() / cols;
        self.cols = cols;
        self.blocks.clear();
        self.blocks.extend(x.chunks_exact(QK).map(quantize_block));
        Ok(())
    }

    /// Token `t`'s blocks.
    fn token(&self, t: usize) -> &[BlockQ8_1] {
        let per = self.cols / QK;
        &self.blocks[t * per..(t + 1) * per]
    }
}

/// llama.cpp's `quantize_row_q8_1` for one block: `d = max|x| / 127`, `q = round(x / d)`.
fn quantize_block(x: &[f32]) -> BlockQ8_1 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; 32];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        // |v·id| <= 127 by construction of d, except where 1/d overflows (amax below ~4e-37)
        // or v is not finite: the clamp keeps -128 out, which the kernels' `sign` trick needs.
        *q = (v * id).round().clamp(-127.0, 127.0) as i8;
        sum += i32::from(*q);
    }
    BlockQ8_1 { d: f16::from_f32(d).to_f32(), s: f16::from_f32(d * sum as f32).to_f32(), qs }
}

/// The dot-product kernels this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Scalar,
    /// AVX2 + FMA + F16C, 256-bit.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The same tiles with AVX-512 VNNI's one-instruction byte dot product (`vpdpbusd`).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// The widest kernel the CPU (and the test cap, [`simd::cap`]) allows.
    pub(crate) fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if simd::fma() && std::is_x86_feature_detected!("f16c") {
            if simd::avx512()
                && std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vl")
            {
                return Kernel::Avx512Vnni;
            }
            return Kernel::Avx2;
        }
        Kernel::Scalar
    }

    /// `out[i][j] = w[i] · x[j]` for `i < nr`, `j < nt` (Q4_1 weights); every slice in `w`
    /// and `x` must have the same length (the blocks of one row).
    fn q4_1(self, w: [&[BlockQ4_1]; 2], x: [&[BlockQ8_1]; 4], nr: usize, nt: usize, out: &mut [[f32; 4]; 2]) {
        let n = w[0].len();
        assert!(w.iter().all(|r| r.len() == n) && x.iter().all(|t| t.len() == n) && nr <= 2 && nt <= 4);
        match self {
            Kernel::Scalar => {
                for i in 0..nr {
                    for j in 0..nt {
                        out[i][j] = scalar::dot_q4_1(w[i], x[j]);
                    }
                }
            }
            // SAFETY: `best()` chose these kernels only after detecting their features (AVX2,
            // FMA, F16C; and AVX-512 VNNI + VL); the assert above proves the equal lengths
            // the tile reads by.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::tiles_q4_1::<false>(w, x, nr, nt, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { x86::tiles_q4_1::<true>(w, x, nr, nt, out) },
        }
    }

    /// As [`q4_1`](Self::q4_1) for Q8_0 weights.
    fn q8_0(self, w: [&[BlockQ8_0]; 2], x: [&[BlockQ8_1]; 4], nr: usize, nt: usize, out: &mut [[f32; 4]; 2]) {
        let n = w[0].len();
        assert!(w.iter().all(|r| r.len() == n) && x.iter().all(|t| t.len() == n) && nr <= 2 && nt <= 4);
        match self {
            Kernel::Scalar => {
                for i in 0..nr {
                    for j in 0..nt {
                        out[i][j] = scalar::dot_q8_0(w[i], x[j]);
                    }
                }
            }
            // SAFETY: as in `q4_1`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::tiles_q8_0::<false>(w, x, nr, nt, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { x86::tiles_q8_0::<true>(w, x, nr, nt, out) },
        }
    }
}

mod scalar {
    use super::*;

    pub(super) fn dot_q4_1(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        let mut sum = 0f32;
        for (b, y) in w.iter().zip(x) {
            let mut acc = 0i32;
            for j in 0..16 {
                acc += i32::from(b.qs[j] & 0xf) * i32::from(y.qs[j]);
                acc += i32::from(b.qs[j] >> 4) * i32::from(y.qs[j + 16]);
            }
            let (d, m) = (f16::from_bits(b.d).to_f32(), f16::from_bits(b.m).to_f32());
            sum += d * y.d * acc as f32 + m * y.s;
        }
        sum
    }

    pub(super) fn dot_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_1]) -> f32 {
        let mut sum = 0f32;
        for (b, y) in w.iter().zip(x) {
            let acc: i32 = b.qs.iter().zip(&y.qs).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
            sum += f16::from_bits(b.d).to_f32() * y.d * acc as f32;
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, BlockQ8_0, BlockQ8_1};

    /// `[d, m]` of a Q4_1 block as f32 (F16C).
    #[inline(always)]
    unsafe fn scales(b: &BlockQ4_1) -> (f32, f32) {
        // SAFETY (caller): F16C is available. The two u16 fields are read by value.
        unsafe {
            let v = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(b.d) | (i32::from(b.m) << 16)));
            (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps::<1>(v, v)))
        }
    }

    /// The 32 4-bit values of a block as bytes: low nibbles (elements 0..16), then high.
    #[inline(always)]
    unsafe fn nibbles(b: &BlockQ4_1) -> __m256i {
        // SAFETY (caller): AVX2. `qs` is 16 readable bytes (an unaligned load of the array).
        unsafe {
            let q = _mm_loadu_si128(b.qs.as_ptr().cast());
            let lo = _mm_and_si128(q, _mm_set1_epi8(0x0f));
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), _mm_set1_epi8(0x0f));
            _mm256_set_m128i(hi, lo)
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY (caller): AVX.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }

    /// `Σ u8·i8` of 32 byte pairs into 8 i32 lanes: VNNI's `dpbusd`, or `maddubs` (pairs
    /// summed to i16: at most 2·15·127 for nibbles, 2·128·127 for sign-folded Q8_0, no
    /// saturation) then `madd` by ones.
    #[inline(always)]
    unsafe fn dot_u8i8<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY (caller): AVX2, and AVX-512 VNNI + VL when `VNNI`.
        unsafe {
            if VNNI {
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
            } else {
                _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
            }
        }
    }

    /// One `R × T` tile of Q4_1 · Q8_1 dot products: per block, each row's nibbles are
    /// unpacked once and each token's bytes loaded once; one FMA by `d_w·d_x` per pair.
    #[inline(always)]
    unsafe fn tile_q4_1<const R: usize, const T: usize, const VNNI: bool>(
        w: [&[BlockQ4_1]; 2],
        x: [&[BlockQ8_1]; 4],
        out: &mut [[f32; 4]; 2],
    ) {
        // SAFETY (whole body; caller): AVX2, FMA, F16C (and VNNI + VL when `VNNI`); all
        // slices have the same length `n`, so every index below is in bounds.
        unsafe {
            let n = w[0].len();
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            let mut offset = [[0f32; T]; R];
            for b in 0..n {
                let mut ys = [_mm256_setzero_si256(); T];
                for (t, y) in ys.iter_mut().enumerate() {
                    *y = _mm256_loadu_si256(x[t].get_unchecked(b).qs.as_ptr().cast());
                }
                for r in 0..R {
                    let blk = w[r].get_unchecked(b);
                    let (d, m) = scales(blk);
                    let q = nibbles(blk);
                    for t in 0..T {
                        let yb = x[t].get_unchecked(b);
                        let p = dot_u8i8::<VNNI>(q, ys[t]);
                        acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(d * yb.d), _mm256_cvtepi32_ps(p), acc[r][t]);
                        offset[r][t] += m * yb.s;
                    }
                }
            }
            for r in 0..R {
                for t in 0..T {
                    out[r][t] = hsum(acc[r][t]) + offset[r][t];
                }
            }
        }
    }

    /// One `R × T` tile of Q8_0 · Q8_1: signed × signed through `sign` (|w| as unsigned, x
    /// takes w's sign).
    #[inline(always)]
    unsafe fn tile_q8_0<const R: usize, const T: usize, const VNNI: bool>(
        w: [&[BlockQ8_0]; 2],
        x: [&[BlockQ8_1]; 4],
        out: &mut [[f32; 4]; 2],
    ) {
        // SAFETY (whole body; caller): as `tile_q4_1`.
        unsafe {
            let n = w[0].len();
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            for b in 0..n {
                let mut ys = [_mm256_setzero_si256(); T];
                for (t, y) in ys.iter_mut().enumerate() {
                    *y = _mm256_loadu_si256(x[t].get_unchecked(b).qs.as_ptr().cast());
                }
                for r in 0..R {
                    let blk = w[r].get_unchecked(b);
                    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(blk.d))));
                    let q = _mm256_loadu_si256(blk.qs.as_ptr().cast());
                    let uq = _mm256_sign_epi8(q, q);
                    for t in 0..T {
                        let p = dot_u8i8::<VNNI>(uq, _mm256_sign_epi8(ys[t], q));
                        let yd = x[t].get_unchecked(b).d;
                        acc[r][t] = _mm256_fmadd_ps(_mm256_set1_ps(d * yd), _mm256_cvtepi32_ps(p), acc[r][t]);
                    }
                }
            }
            for r in 0..R {
                for t in 0..T {
                    out[r][t] = hsum(acc[r][t]);
                }
            }
        }
    }

    macro_rules! tiles {
        ($name:ident, $tile:ident, $block:ty, $plain:literal, $vnni:literal) => {
            /// Every tile shape up to 2 × 4 through one set of target features.
            ///
            /// # Safety
            /// The CPU has the enabled features; all slices of `w` and `x` have one length.
            #[target_feature(enable = $plain)]
            unsafe fn plain(w: [&[$block]; 2], x: [&[BlockQ8_1]; 4], nr: usize, nt: usize, out: &mut [[f32; 4]; 2]) {
                // SAFETY: this function's features; lengths per the contract.
                unsafe { dispatch::<false>(w, x, nr, nt, out) }
            }

            /// [`plain`] with VNNI.
            ///
            /// # Safety
            /// As `plain`, and the CPU has AVX-512 VNNI and VL.
            #[target_feature(enable = $vnni)]
            unsafe fn vnni(w: [&[$block]; 2], x: [&[BlockQ8_1]; 4], nr: usize, nt: usize, out: &mut [[f32; 4]; 2]) {
                // SAFETY: this function's features; lengths per the contract.
                unsafe { dispatch::<true>(w, x, nr, nt, out) }
            }

            #[inline(always)]
            unsafe fn dispatch<const VNNI: bool>(
                w: [&[$block]; 2],
                x: [&[BlockQ8_1]; 4],
                nr: usize,
                nt: usize,
                out: &mut [[f32; 4]; 2],
            ) {
                // SAFETY: the caller's features and lengths.
                unsafe {
                    match (nr, nt) {
                        (1, 1) => $tile::<1, 1, VNNI>(w, x, out),
                        (1, 2) => $tile::<1, 2, VNNI>(w, x, out),
                        (1, 3) => $tile::<1, 3, VNNI>(w, x, out),
                        (1, _) => $tile::<1, 4, VNNI>(w, x, out),
                        (_, 1) => $tile::<2, 1, VNNI>(w, x, out),
                        (_, 2) => $tile::<2, 2, VNNI>(w, x, out),
                        (_, 3) => $tile::<2, 3, VNNI>(w, x, out),
                        _ => $tile::<2, 4, VNNI>(w, x, out),
                    }
                }
            }

            /// The tile entry point: `VNNI` picks the feature set.
            ///
            /// # Safety
            /// As [`plain`] (and [`vnni`] when `VNNI`).
            pub(in crate::nn::kernels::quant) unsafe fn $name<const VNNI: bool>(
                w: [&[$block]; 2],
                x: [&[BlockQ8_1]; 4],
                nr: usize,
                nt: usize,
                out: &mut [[f32; 4]; 2],
            ) {
                // SAFETY: forwarded contract.
                unsafe { if VNNI { vnni(w, x, nr, nt, out) } else { plain(w, x, nr, nt, out) } }
            }
        };
    }

    mod q4 {
        use super::*;
        tiles!(tiles_q4_1, tile_q4_1, BlockQ4_1, "avx2,fma,f16c", "avx2,fma,f16c,avx512f,avx512vl,avx512vnni");
    }
    mod q8 {
        use super::*;
        tiles!(tiles_q8_0, tile_q8_0, BlockQ8_0, "avx2,fma,f16c", "avx2,fma,f16c,avx512f,avx512vl,avx512vnni");
    }
    pub(super) use q4::tiles_q4_1;
    pub(super) use q8::tiles_q8_0;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn q4_1_bytes(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let raw = noise(rows * cols, seed);
        let mut out = Vec::new();
        for block in raw.chunks_exact(QK) {
            let (lo, hi) = block.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let d = (hi - lo) / 15.0;
            let mut b = BlockQ4_1 { d: f16::from_f32(d).to_bits(), m: f16::from_f32(lo).to_bits(), qs: [0; 16] };
            let q = |v: f32| (((v - lo) / d).round() as u8).min(15);
            for j in 0..16 {
                b.qs[j] = q(block[j]) | (q(block[j + 16]) << 4);
            }
            out.extend_from_slice(bytemuck::bytes_of(&b));
        }
        out
    }

    fn q8_0_bytes(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let raw = noise(rows * cols, seed);
        let mut out = Vec::new();
        for block in raw.chunks_exact(QK) {
            let q = quantize_block(block);
            out.extend_from_slice(bytemuck::bytes_of(&BlockQ8_0 { d: f16::from_f32(q.d).to_bits(), qs: q.qs }));
        }
        out
    }

    fn typed<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
        let mut v = vec![T::zeroed(); bytes.len() / size_of::<T>()];
        bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
        v
    }

    /// The product in f64 over dequantized weights and activations, with Q4_1's offset term
    /// taken as `m · s` (the activation block's stored sum, as the kernels and ggml do).
    fn reference(w: &QMatrix, x: &Activations) -> Vec<f32> {
        let per = w.cols / QK;
        let mut out = vec![0f32; x.n * w.rows];
        for r in 0..w.rows {
            for t in 0..x.n {
                let mut acc = 0f64;
                for (blk, y) in x.token(t).iter().enumerate() {
                    let (d, m, q): (f64, f64, [f64; 32]) = match &w.blocks {
                        Blocks::Q4_1(v) => {
                            let b = &v[r * per + blk];
                            let mut q = [0f64; 32];
                            for j in 0..16 {
                                q[j] = f64::from(b.qs[j] & 0xf);
                                q[j + 16] = f64::from(b.qs[j] >> 4);
                            }
                            (f16::from_bits(b.d).to_f64(), f16::from_bits(b.m).to_f64(), q)
                        }
                        Blocks::Q8_0(v) => {
                            let b = &v[r * per + blk];
                            (f16::from_bits(b.d).to_f64(), 0.0, b.qs.map(f64::from))
                        }
                    };
                    let dot: f64 = q.iter().zip(&y.qs).map(|(a, &b)| a * f64::from(b)).sum();
                    acc += d * f64::from(y.d) * dot + m * f64::from(y.s);
                }
                out[t * w.rows + r] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn every_kernel_matches_the_dequantized_product_on_ragged_shapes() {
        for &(rows, cols, n) in &[(1, 32, 1), (7, 64, 3), (192, 576, 1), (65, 96, 5), (576, 1536, 2), (33, 160, 9)] {
            for qtype in [QType::Q4_1, QType::Q8_0] {
                let bytes = match qtype {
                    QType::Q4_1 => q4_1_bytes(rows, cols, rows as u64),
                    QType::Q8_0 => q8_0_bytes(rows, cols, rows as u64),
                };
                let w = QMatrix::new(qtype, rows, cols, &bytes).unwrap();
                let mut x = Activations::default();
                x.quantize(&noise(n * cols, 7 + cols as u64), cols).unwrap();
                let want = reference(&w, &x);
                for level in simd::levels() {
                    let _cap = simd::cap(level);
                    let mut got = vec![0f32; n * rows];
                    w.matmul(&x, &mut got).unwrap();
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        // f32 sums of up to 48 block products against an f64 reference.
                        assert!(
                            (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{qtype:?} {rows}x{cols}x{n} {level:?} ({:?}) at {i}: {g} vs {e}",
                            Kernel::best()
                        );
                    }
                }
            }
        }
    }

    /// Every kernel this CPU can run, against the scalar one, on every tile shape (the level
    /// test above reaches only the best kernel per level).
    #[test]
    fn each_kernel_matches_the_scalar_one_on_every_tile_shape() {
        #[allow(unused_mut)]
        let mut kernels = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                kernels.push(Kernel::Avx2);
                if has!("avx512f") && has!("avx512vl") && has!("avx512vnni") {
                    kernels.push(Kernel::Avx512Vnni);
                }
            }
        }
        for blocks in [1, 2, 3, 18, 48] {
            let cols = blocks * QK;
            let w4: Vec<BlockQ4_1> = typed(&q4_1_bytes(2, cols, blocks as u64));
            let w8: Vec<BlockQ8_0> = typed(&q8_0_bytes(2, cols, 9));
            let mut x = Activations::default();
            x.quantize(&noise(4 * cols, 11), cols).unwrap();
            let rows4: [&[BlockQ4_1]; 2] = [&w4[..blocks], &w4[blocks..]];
            let rows8: [&[BlockQ8_0]; 2] = [&w8[..blocks], &w8[blocks..]];
            let toks: [&[BlockQ8_1]; 4] = std::array::from_fn(|t| x.token(t));
            for nr in 1..=2 {
                for nt in 1..=4 {
                    for k in &kernels {
                        let (mut got4, mut got8) = ([[f32::NAN; 4]; 2], [[f32::NAN; 4]; 2]);
                        k.q4_1(rows4, toks, nr, nt, &mut got4);
                        k.q8_0(rows8, toks, nr, nt, &mut got8);
                        for i in 0..nr {
                            for j in 0..nt {
                                let (want4, want8) =
                                    (scalar::dot_q4_1(rows4[i], toks[j]), scalar::dot_q8_0(rows8[i], toks[j]));
                                let close = |g: f32, w: f32| (g - w).abs() <= 1e-4 * (1.0 + w.abs());
                                assert!(
                                    close(got4[i][j], want4),
                                    "{k:?} q4_1 {nr}x{nt} [{i}][{j}] x{blocks}: {} vs {want4}",
                                    got4[i][j]
                                );
                                assert!(
                                    close(got8[i][j], want8),
                                    "{k:?} q8_0 {nr}x{nt} [{i}][{j}] x{blocks}: {} vs {want8}",
                                    got8[i][j]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn quantization_round_trips_within_half_a_step() {
        let x = noise(64, 3);
        let mut a = Activations::default();
        a.quantize(&x, 64).unwrap();
        for (blk, y) in a.blocks.iter().enumerate() {
            let sum: i32 = y.qs.iter().map(|&q| i32::from(q)).sum();
            assert!((y.s - y.d * sum as f32).abs() <= 1e-2 * (1.0 + y.s.abs()));
            for j in 0..QK {
                let v = x[blk * QK + j];
                assert!((f32::from(y.qs[j]) * y.d - v).abs() <= y.d * 0.51 + 1e-3, "{v}");
            }
        }
        // All zeros quantize to zeros, not NaN.
        a.quantize(&[0.0; 32], 32).unwrap();
        assert_eq!(a.blocks[0], BlockQ8_1::default());
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(QMatrix::new(QType::Q4_1, 2, 33, &[0; 40]).is_err());
        assert!(QMatrix::new(QType::Q4_1, 2, 32, &[0; 39]).is_err());
        assert!(QMatrix::new(QType::Q8_0, usize::MAX, 64, &[0; 68]).is_err());
        let w = QMatrix::new(QType::Q4_1, 2, 32, &[0; 40]).unwrap();
        let mut x = Activations::default();
        assert!(x.quantize(&[0.0; 48], 32).is_err());
        x.quantize(&[0.0; 64], 64).unwrap();
        assert!(w.matmul(&x, &mut [0.0; 2]).is_err());
        let mut row = [0f32; 31];
        assert!(w.dequantize_row(0, &mut row).is_err());
    }
}
