//! Quantized matrix-vector products for GGUF models: weights in ggml's Q4_1 or Q8_0 blocks
//! against activations quantized per token to Q8_1 blocks (as llama.cpp does), so the inner
//! loop is an 8-bit integer dot product with one scale per 32 elements.
//!
//! Weights are validated once ([`QMatrix::new`]); activations are made only by
//! [`Activations::quantize`]; the vector kernels take only those two types, whose lengths they
//! check before the first load. The AVX2 (+FMA, F16C) and AVX-512 (F + BW, with VNNI where
//! present) kernels are chosen at run time and tested against the scalar one.

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
                "a {qtype:?} matrix of {rows}x{cols}: rows must be a positive multiple of {QK} elements"
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
        let work = |(c, outs): (usize, Vec<&mut [f32]>)| {
            let r0 = c * chunk;
            for (t, out) in outs.into_iter().enumerate() {
                let xt = x.token(t);
                for (i, o) in out.iter_mut().enumerate() {
                    let r = r0 + i;
                    *o = match &self.blocks {
                        Blocks::Q4_1(v) => kernel.dot_q4_1(&v[r * per..(r + 1) * per], xt),
                        Blocks::Q8_0(v) => kernel.dot_q8_0(&v[r * per..(r + 1) * per], xt),
                    };
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
        // |v·id| <= 127 by construction of d, so the cast does not saturate.
        *q = (v * id).round() as i8;
        sum += i32::from(*q);
    }
    BlockQ8_1 { d: f16::from_f32(d).to_f32(), s: f16::from_f32(d * sum as f32).to_f32(), qs }
}

/// The dot-product kernels this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// The widest kernel the CPU (and the test cap, [`simd::cap`]) allows.
    pub(crate) fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if simd::fma() && std::is_x86_feature_detected!("f16c") {
            if simd::avx512() && std::is_x86_feature_detected!("avx512bw") {
                if std::is_x86_feature_detected!("avx512vnni") {
                    return Kernel::Avx512Vnni;
                }
                return Kernel::Avx512;
            }
            return Kernel::Avx2;
        }
        Kernel::Scalar
    }

    /// `Σ w·x` over one row of Q4_1 weights and one token's Q8_1 activations.
    fn dot_q4_1(self, w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        let n = w.len().min(x.len());
        let (w, x) = (&w[..n], &x[..n]);
        match self {
            Kernel::Scalar => scalar::dot_q4_1(w, x),
            // SAFETY: `best()` chose these kernels only after detecting their features
            // (AVX2, FMA, F16C; AVX-512F and BW; VNNI); `w` and `x` have equal lengths.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::dot_q4_1_avx2(w, x) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::dot_q4_1_avx512(w, x) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { x86::dot_q4_1_avx512_vnni(w, x) },
        }
    }

    /// `Σ w·x` over one row of Q8_0 weights and one token's activations.
    fn dot_q8_0(self, w: &[BlockQ8_0], x: &[BlockQ8_1]) -> f32 {
        let n = w.len().min(x.len());
        let (w, x) = (&w[..n], &x[..n]);
        match self {
            Kernel::Scalar => scalar::dot_q8_0(w, x),
            // SAFETY: as in `dot_q4_1`; the AVX-512 kernels need no more than AVX2 here.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Avx512 | Kernel::Avx512Vnni => unsafe { x86::dot_q8_0_avx2(w, x) },
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

    /// Q4_1 · Q8_1 with AVX2: per block, `maddubs` (unsigned nibbles × signed bytes, pairs
    /// summed; at most 2·15·128 so no saturation), `madd` to 8 i32 lanes, one FMA by `d_w·d_x`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `w.len() == x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1_avx2(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        debug_assert_eq!(w.len(), x.len());
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut offset = 0f32;
        for (b, y) in w.iter().zip(x) {
            // SAFETY: features per the contract; `y.qs` is 32 readable bytes.
            unsafe {
                let (d, m) = scales(b);
                let q = nibbles(b);
                let v = _mm256_loadu_si256(y.qs.as_ptr().cast());
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, v), ones);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(p), acc);
                offset += m * y.s;
            }
        }
        // SAFETY: AVX per the contract.
        unsafe { hsum(acc) + offset }
    }

    /// Q4_1 · Q8_1 with AVX-512 (F + BW): two blocks per 512-bit step.
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX-512BW, AVX2, FMA and F16C; `w.len() == x.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1_avx512(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        // SAFETY: the features the body needs are this function's.
        unsafe { q4_1_avx512::<false>(w, x) }
    }

    /// [`dot_q4_1_avx512`] with VNNI's `dpbusd` in place of `maddubs` + `madd`.
    ///
    /// # Safety
    /// As [`dot_q4_1_avx512`], and the CPU has AVX-512VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1_avx512_vnni(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        // SAFETY: the features the body needs are this function's.
        unsafe { q4_1_avx512::<true>(w, x) }
    }

    /// The body of both AVX-512 kernels, inlined into each so each compiles with its own
    /// features (the plain one must not pick up VNNI instructions).
    #[inline(always)]
    unsafe fn q4_1_avx512<const VNNI: bool>(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        debug_assert_eq!(w.len(), x.len());
        // SAFETY (whole body): the caller's features (AVX-512F/BW, AVX2, FMA, F16C, and VNNI
        // when `VNNI`); every load reads one block's array, and `w`, `x` have equal lengths.
        unsafe {
            let ones = _mm512_set1_epi16(1);
            let mut acc = _mm512_setzero_ps();
            let mut offset = 0f32;
            for i in 0..w.len() / 2 {
                let (b0, b1, y0, y1) = (&w[2 * i], &w[2 * i + 1], &x[2 * i], &x[2 * i + 1]);
                let (d0, m0) = scales(b0);
                let (d1, m1) = scales(b1);
                let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(nibbles(b0)), nibbles(b1));
                let v = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(y0.qs.as_ptr().cast())),
                    _mm256_loadu_si256(y1.qs.as_ptr().cast()),
                );
                let p = if VNNI {
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, v)
                } else {
                    _mm512_madd_epi16(_mm512_maddubs_epi16(q, v), ones)
                };
                let scale = _mm512_insertf32x8::<1>(
                    _mm512_castps256_ps512(_mm256_set1_ps(d0 * y0.d)),
                    _mm256_set1_ps(d1 * y1.d),
                );
                acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(p), acc);
                offset += m0 * y0.s + m1 * y1.s;
            }
            let mut sum = _mm512_reduce_add_ps(acc) + offset;
            if w.len() % 2 == 1 {
                let last = w.len() - 1;
                sum += dot_q4_1_avx2(&w[last..], &x[last..]);
            }
            sum
        }
    }

    /// Q8_0 · Q8_1 with AVX2: signed × signed via `sign` (|w| unsigned, x takes w's sign).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `w.len() == x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0_avx2(w: &[BlockQ8_0], x: &[BlockQ8_1]) -> f32 {
        debug_assert_eq!(w.len(), x.len());
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for (b, y) in w.iter().zip(x) {
            // SAFETY: features per the contract; both arrays are 32 readable bytes.
            unsafe {
                let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(b.d))));
                let q = _mm256_loadu_si256(b.qs.as_ptr().cast());
                let v = _mm256_loadu_si256(y.qs.as_ptr().cast());
                // |q| <= 128 fits an unsigned byte; -128·-128 pairs reach 32768 only if both
                // are -128, and ggml's rounding never writes -128 (|q| <= 127).
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(v, q)), ones);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(p), acc);
            }
        }
        // SAFETY: AVX per the contract.
        unsafe { hsum(acc) }
    }
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

    /// Every kernel this CPU can run, against the scalar one, block by block (the level test
    /// above reaches only the best kernel per level: on a VNNI CPU, not the plain AVX-512 one).
    #[test]
    fn each_x86_kernel_matches_the_scalar_one() {
        #[allow(unused_mut)]
        let mut kernels = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f: &str| match f {
                "avx2" => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
                "avx512" => std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw"),
                _ => std::is_x86_feature_detected!("avx512vnni"),
            };
            if has("avx2") && std::is_x86_feature_detected!("f16c") {
                kernels.push(Kernel::Avx2);
                if has("avx512") {
                    kernels.push(Kernel::Avx512);
                    if has("vnni") {
                        kernels.push(Kernel::Avx512Vnni);
                    }
                }
            }
        }
        for blocks in [1, 2, 3, 18, 48] {
            let w4: Vec<BlockQ4_1> = typed(&q4_1_bytes(1, blocks * QK, blocks as u64));
            let w8: Vec<BlockQ8_0> = typed(&q8_0_bytes(1, blocks * QK, 9));
            let mut x = Activations::default();
            x.quantize(&noise(blocks * QK, 11), blocks * QK).unwrap();
            let (want4, want8) = (scalar::dot_q4_1(&w4, &x.blocks), scalar::dot_q8_0(&w8, &x.blocks));
            for k in &kernels {
                let (got4, got8) = (k.dot_q4_1(&w4, &x.blocks), k.dot_q8_0(&w8, &x.blocks));
                assert!((got4 - want4).abs() <= 1e-4 * (1.0 + want4.abs()), "{k:?} q4_1 x{blocks}: {got4} vs {want4}");
                assert!((got8 - want8).abs() <= 1e-4 * (1.0 + want8.abs()), "{k:?} q8_0 x{blocks}: {got8} vs {want8}");
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
