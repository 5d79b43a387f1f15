//! Activations over f32 slices, in place, vectorised: GELU with the error function (BERT's
//! `gelu`), its tanh approximation, ReLU, LSTM cells; and a transpose that turns squares in registers. libm's scalar `erff`
//! was 10% of a MiniLM pass; the rational approximation here is branch-free, so the compiler
//! vectorises it 16-wide under AVX-512 and 8-wide under AVX2.

use super::simd;

/// Runs `body(args)` built for the widest vectors this CPU has: AVX-512F, else AVX2 + FMA,
/// else the baseline. `body` must be `#[inline(always)]` safe code, so that each
/// `target_feature` build inlines (and vectorises) its own copy.
macro_rules! widest {
    ($body:ident($($arg:ident: $ty:ty),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) {
                $body($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                $body($($arg),*)
            }
            if simd::avx512() {
                // SAFETY: the CPU has AVX-512F (checked by `simd::avx512`); the body is safe code.
                unsafe { avx512($($arg),*) }
            } else if simd::fma() {
                // SAFETY: the CPU has AVX2 and FMA (checked by `simd::fma`); the body is safe code.
                unsafe { avx2($($arg),*) }
            } else {
                $body($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        $body($($arg),*)
    }};
}

/// An activation applied to a dense layer's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Act {
    /// `x · Φ(x)` with the exact error function.
    Gelu,
    /// GELU's tanh approximation.
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
    /// The error function itself (ONNX's `Erf`).
    Erf,
}

/// [`erf`]'s numerator `P(x²)` and denominator `Q(x²)`, highest power first (Horner's order);
/// the GEMM's fused GELU evaluates the same ones, so both agree to the bit.
pub(crate) const ERF_P: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_600_2e-3,
    -1.609_603_3e-2,
];
pub(crate) const ERF_Q: [f32; 5] = [-1.456_607_2e-5, -2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2];

/// `erf(x)`, a rational approximation `x·P(x²)/Q(x²)` on `x` clamped to [-4, 4] (beyond which
/// erf is ±1 in f32); within 1e-6 of the exact value (tested against libm).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let horner = |c: &[f32]| c[1..].iter().fold(c[0], |acc, &c| x2.mul_add(acc, c));
    x * horner(&ERF_P) / horner(&ERF_Q)
}

/// `e^x`, branch-free: `2^n · e^r` with `n = round(x / ln 2)`, `|r| ≤ ln 2 / 2` and e^r by its
/// Taylor series to r⁶ (relative error about 2e-7); `x` is clamped to where f32 stays
/// finite and normal. `n` is rounded by adding 1.5·2²³ (its integer then sits in the low
/// mantissa bits), not by `round` and `as i32`, whose saturating conversion kept the
/// compiler from vectorising the loop.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2²³
    let x = x.clamp(-87.3, 88.3);
    let t = x.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT;
    let scale = f32::from_bits(t.to_bits().wrapping_sub(SHIFT.to_bits()).wrapping_add(127) << 23);
    let r = n.mul_add(-0.693_145_75, x);
    let r = n.mul_add(-1.428_606_8e-6, r);
    let mut p = r.mul_add(1.0 / 720.0, 1.0 / 120.0);
    p = r.mul_add(p, 1.0 / 24.0);
    p = r.mul_add(p, 1.0 / 6.0);
    p = r.mul_add(p, 0.5);
    p = r.mul_add(p, 1.0);
    p = r.mul_add(p, 1.0);
    p * scale
}

/// Softmax down each column of `s` (`rows × cols`, row-major), in place: vectorised across
/// columns, each column normalised on its own. Always inlined, so that each `target_feature`
/// wrapper compiles it for its own vectors (else `mul_add` and `round` become libm calls).
#[inline(always)]
fn softmax_columns_body(s: &mut [f32], cols: usize) {
    let mut max = vec![f32::MIN; cols];
    for row in s.chunks_exact(cols) {
        for (m, &v) in max.iter_mut().zip(row) {
            *m = m.max(v);
        }
    }
    let mut sum = vec![0f32; cols];
    for row in s.chunks_exact_mut(cols) {
        for ((v, &m), acc) in row.iter_mut().zip(&max).zip(&mut sum) {
            *v = exp(*v - m);
            *acc += *v;
        }
    }
    for v in sum.iter_mut() {
        *v = 1.0 / *v;
    }
    for row in s.chunks_exact_mut(cols) {
        for (v, &inv) in row.iter_mut().zip(&sum) {
            *v *= inv;
        }
    }
}

/// Softmax down each column of `s` (`rows × cols`, row-major), in place. Scores a column
/// holds as `f32::MIN` (masked) get weight e⁻⁸⁷ (as good as 0) unless the whole column is
/// masked.
pub(crate) fn softmax_columns(s: &mut [f32], cols: usize) {
    if cols == 0 {
        return;
    }
    widest!(softmax_columns_body(s: &mut [f32], cols: usize))
}

/// Softmax along each row of `x` (`rows × cols`, row-major), in place: each row's maximum,
/// then `e^(v - max)` and their sum in 16 lanes, then the scale.
#[inline(always)]
fn softmax_rows_body(x: &mut [f32], cols: usize) {
    for row in x.chunks_exact_mut(cols) {
        let mut lanes = [f32::MIN; 16];
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            for (m, &v) in lanes.iter_mut().zip(c) {
                *m = m.max(v);
            }
        }
        let max = chunks.remainder().iter().fold(lanes.iter().fold(f32::MIN, |a, &b| a.max(b)), |a, &b| a.max(b));
        let mut sums = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for (acc, v) in sums.iter_mut().zip(c.iter_mut()) {
                *v = exp(*v - max);
                *acc += *v;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Softmax along each row of `x` (`rows × cols`), in place; `x` must hold whole rows (else
/// it is left as it is). A row masked whole with `-inf` comes out uniform (ONNX Runtime's
/// gives NaN); masks of `f32::MIN`, what exporters write, behave as in the reference.
pub(crate) fn softmax_rows(x: &mut [f32], cols: usize) {
    if cols == 0 || !x.len().is_multiple_of(cols) {
        return;
    }
    widest!(softmax_rows_body(x: &mut [f32], cols: usize))
}

/// Layer norm along each row of `x` (`rows × cols`, row-major: tokens × features), in place:
/// each row to mean 0 and variance 1 (sums in 16 lanes), then column `f` scaled by `gamma[f]`
/// and shifted by `beta[f]`.
#[inline(always)]
fn layer_norm_rows_body(x: &mut [f32], cols: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    let inv_n = 1.0 / cols as f32;
    for row in x.chunks_exact_mut(cols) {
        let mean = lanes_sum(row, |v| v) * inv_n;
        let var = lanes_sum(row, |v| (v - mean) * (v - mean)) * inv_n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = ((*v - mean) * inv).mul_add(g, b);
        }
    }
}

/// `Σ f(v)` over `row`, in 16 lanes (so that it vectorises) and then across them.
#[inline(always)]
fn lanes_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

/// Layer norm along each row of `x` (`tokens × features`), in place (see
/// `layer_norm_rows_body`). `gamma` and `beta` must hold one value per column, and `x` whole
/// rows; else `None`, untouched.
pub(crate) fn layer_norm_rows(x: &mut [f32], cols: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Option<()> {
    if cols == 0 || !x.len().is_multiple_of(cols) || gamma.len() != cols || beta.len() != cols {
        return None;
    }
    widest!(layer_norm_rows_body(x: &mut [f32], cols: usize, gamma: &[f32], beta: &[f32], eps: f32));
    Some(())
}

/// Layer norm down each column of `x` (`rows × cols`, row-major: features × tokens), in
/// place: each column normalised to mean 0 and variance 1 over its `rows` values, then row `f`
/// scaled by `gamma[f]` and shifted by `beta[f]`. Vectorised across columns.
#[inline(always)]
fn layer_norm_columns_body(x: &mut [f32], cols: usize, gamma: &[f32], beta: &[f32], eps: f32) {
    let rows = x.len() / cols;
    let inv_n = 1.0 / rows as f32;
    let mut mean = vec![0f32; cols];
    for row in x.chunks_exact(cols) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m *= inv_n);
    let mut var = vec![0f32; cols];
    for row in x.chunks_exact(cols) {
        for ((s, &v), &m) in var.iter_mut().zip(row).zip(&mean) {
            let d = v - m;
            *s = d.mul_add(d, *s);
        }
    }
    var.iter_mut().for_each(|v| *v = 1.0 / (*v * inv_n + eps).sqrt());
    for ((row, &g), &b) in x.chunks_exact_mut(cols).zip(gamma).zip(beta) {
        for ((v, &m), &inv) in row.iter_mut().zip(&mean).zip(&var) {
            *v = ((*v - m) * inv).mul_add(g, b);
        }
    }
}

/// Layer norm down each column of `x` (`features × tokens`), in place (see
/// `layer_norm_columns_body`). `gamma` and `beta` must hold one value per row of `x`, and
/// `x` whole rows; else `None`, untouched.
pub(crate) fn layer_norm_columns(x: &mut [f32], cols: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Option<()> {
    if cols == 0 || !x.len().is_multiple_of(cols) || gamma.len() != x.len() / cols || beta.len() != gamma.len() {
        return None;
    }
    if x.is_empty() {
        return Some(());
    }
    widest!(layer_norm_columns_body(x: &mut [f32], cols: usize, gamma: &[f32], beta: &[f32], eps: f32));
    Some(())
}

#[inline(always)]
fn apply(x: &mut [f32], act: Act) {
    match act {
        Act::Gelu => {
            for v in x {
                *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
        Act::GeluTanh => {
            const C: f32 = 0.797_884_6; // sqrt(2/pi)
            for v in x {
                // `tanh` here, not libm's `tanhf`: a call per element, which kept the loop from
                // vectorising.
                *v = 0.5 * *v * (1.0 + tanh(C * (*v + 0.044_715 * *v * *v * *v)));
            }
        }
        Act::Relu => {
            for v in x {
                *v = v.max(0.0);
            }
        }
        Act::Erf => {
            for v in x {
                *v = erf(*v);
            }
        }
    }
}

/// Applies `act` to every element of `x`, with the widest vectors this CPU has.
pub(crate) fn activate(x: &mut [f32], act: Act) {
    widest!(apply(x: &mut [f32], act: Act))
}

#[inline(always)]
fn sum_into_body(dst: &mut [std::mem::MaybeUninit<f32>], a: &[f32], b: &[f32]) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        d.write(x + y);
    }
}

/// `dst = a + b`, element by element, with the widest vectors this CPU has: a residual
/// connection's `Add` as a fused block writes its output. (Outside a `target_feature`
/// function the loop moved 16 bytes at a time.) All three are as long; a caller that passes
/// others has a bug, and panics.
pub(crate) fn sum_into(dst: &mut [std::mem::MaybeUninit<f32>], a: &[f32], b: &[f32]) {
    assert!(dst.len() == a.len() && a.len() == b.len(), "sum_into: lengths differ");
    widest!(sum_into_body(dst: &mut [std::mem::MaybeUninit<f32>], a: &[f32], b: &[f32]))
}

#[inline(always)]
fn add_assign_body(x: &mut [f32], r: &[f32]) {
    for (o, &v) in x.iter_mut().zip(r) {
        *o += v;
    }
}

/// `x += r`, element by element, as [`sum_into`]; both are as long.
pub(crate) fn add_assign(x: &mut [f32], r: &[f32]) {
    assert_eq!(x.len(), r.len(), "add_assign: lengths differ");
    widest!(add_assign_body(x: &mut [f32], r: &[f32]))
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `tanh(x) = 1 - 2 / (e^{2x} + 1)`, on the same `exp`.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

#[inline(always)]
fn lstm_cells_body(z: &[f32], c: &mut [f32], h: &mut [f32]) {
    let n = c.len().min(h.len()).min(z.len() / 4);
    let (zi, rest) = z.split_at(n);
    let (zo, rest) = rest.split_at(n);
    let (zf, zc) = rest.split_at(n);
    let gates = zi.iter().zip(zo).zip(zf).zip(&zc[..n]);
    for ((((&i, &o), &f), &g), (c, h)) in gates.zip(c.iter_mut().zip(h.iter_mut())) {
        *c = sigmoid(f) * *c + sigmoid(i) * tanh(g);
        *h = sigmoid(o) * tanh(*c);
    }
}

/// One step of `c.len()` LSTM cells (ONNX's gate order: input, output, forget, cell): from the
/// gates' pre-activations `z` (`4 × n`, gate by gate), updates the cell states `c` and writes
/// the hidden states `h`, with the widest vectors this CPU has (libm's scalar `expf` and
/// `tanhf`, and `mul_add` outside a `target_feature` function, are calls per element).
pub(crate) fn lstm_cells(z: &[f32], c: &mut [f32], h: &mut [f32]) {
    widest!(lstm_cells_body(z: &[f32], c: &mut [f32], h: &mut [f32]))
}

/// `src` (`rows × cols`, row-major) transposed into a new `cols × rows` buffer. Work goes by
/// 64 destination rows (64 source columns); within them, squares of 16x16 (AVX-512) or 8x8
/// (AVX) turn around in registers, one vector load per source row and one store per
/// destination row, and the ragged edges go element by element. Large transposes split the
/// work across the compute pool. `src` shorter than `rows·cols` is `None`.
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize) -> Option<Vec<f32>> {
    let len = rows.checked_mul(cols)?;
    let mut dst: Vec<f32> = Vec::with_capacity(len);
    if !transpose_into(src, rows, cols, &mut dst.spare_capacity_mut()[..len]) {
        return None;
    }
    // SAFETY: `transpose_into` returned true, so it wrote all `len` elements.
    unsafe { dst.set_len(len) };
    Some(dst)
}

/// [`transpose`] into `out` (`cols × rows`, every element written), which the caller
/// allocated (and could refuse to). False, with `out` untouched, where `src` is shorter than
/// `rows·cols` or `out` is not that long.
pub(crate) fn transpose_into(src: &[f32], rows: usize, cols: usize, out: &mut [std::mem::MaybeUninit<f32>]) -> bool {
    // Destination rows per unit of work: each band of squares reads 4 neighbouring cache
    // lines of a source row (64 columns) rather than one (640x1536: 0.63 -> 0.51 ms on one
    // thread; `transpose_against_the_crate`).
    const C: usize = 64;
    let Some(len) = rows.checked_mul(cols).filter(|&len| len == out.len()) else {
        return false;
    };
    let Some(src) = src.get(..len) else {
        return false;
    };
    if len == 0 {
        return true;
    }
    // Each block: columns c0..c0 + n of every row, turned into the block's n rows of `rows`.
    // (It fits: c0 + n ≤ cols, and the block holds n·rows floats, so this never declines.)
    let work = |(b, block): (usize, &mut [std::mem::MaybeUninit<f32>])| {
        let (c0, n) = (b * C, block.len() / rows);
        let turned = transpose_strided_into(&src[c0..], [rows, n], cols, block, rows);
        debug_assert!(turned, "transpose: a block outside its matrix");
    };
    // Below about a megabyte, waking the pool costs more than a second thread gains
    // (1536x64: 24 us on one thread, 43 on two). The blocks of `rows·C` cover all `len`
    // elements, and each writes every one of its elements once.
    if len >= 1 << 18 {
        super::par::for_each(out.chunks_mut(rows * C).enumerate(), work);
    } else {
        out.chunks_mut(rows * C).enumerate().for_each(work);
    }
    true
}

/// `src`'s `rows × cols` matrix, its rows `ld_src` floats apart, transposed into `out` (`cols`
/// rows of `rows` floats, `ld_out` apart), on the calling thread: a band of an image's planes
/// (rows = channels, `ld_src` = the plane) turned into pixels, or back. False, with `out`
/// untouched, where either operand is too short or a stride is shorter than its rows.
pub(crate) fn transpose_strided_into(
    src: &[f32],
    [rows, cols]: [usize; 2],
    ld_src: usize,
    out: &mut [std::mem::MaybeUninit<f32>],
    ld_out: usize,
) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    // The last element each side reads or writes, without overflow.
    let end = |n: usize, ld: usize, width: usize| (n - 1).checked_mul(ld)?.checked_add(width);
    let fits = |e: Option<usize>, len: usize| e.is_some_and(|e| e <= len);
    if ld_src < cols
        || ld_out < rows
        || !fits(end(rows, ld_src, cols), src.len())
        || !fits(end(cols, ld_out, rows), out.len())
    {
        return false;
    }
    let square = squares::side();
    let (whole_rows, whole_cols) = match square {
        0 => (0, 0),
        s => (rows - rows % s, cols - cols % s),
    };
    for r0 in (0..whole_rows).step_by(square.max(1)) {
        for j0 in (0..whole_cols).step_by(square) {
            squares::turn(square, &src[r0 * ld_src + j0..], ld_src, &mut out[j0 * ld_out + r0..], ld_out);
        }
    }
    // The rest element by element: the columns past the whole squares in their rows, and every
    // column of the rows past them.
    for r in 0..rows {
        let from = if r < whole_rows { whole_cols } else { 0 };
        for (j, &v) in src[r * ld_src + from..r * ld_src + cols].iter().enumerate() {
            out[(from + j) * ld_out + r].write(v);
        }
    }
    true
}

/// The squares [`transpose`] turns in registers.
mod squares {
    use std::mem::MaybeUninit;

    #[cfg(target_arch = "x86_64")]
    use super::simd;

    /// The side of the square this CPU turns in registers (0: none, element by element).
    pub(super) fn side() -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            if simd::avx512() {
                return 16;
            }
            if simd::fma() {
                return 8;
            }
        }
        0
    }

    /// Writes the `side × side` square of `src` (rows `ld_src` apart) transposed into `dst`
    /// (rows `ld_dst` apart). `side` must be what [`side`] returns (a nonzero one); both
    /// slices must hold the square (checked: panics otherwise).
    pub(super) fn turn(side: usize, src: &[f32], ld_src: usize, dst: &mut [MaybeUninit<f32>], ld_dst: usize) {
        assert!(
            side > 0 && src.len() >= (side - 1) * ld_src + side && dst.len() >= (side - 1) * ld_dst + side,
            "transpose: a square outside its operands"
        );
        #[cfg(target_arch = "x86_64")]
        match side {
            // SAFETY: `side` 16 comes from `side()` only where the CPU has AVX-512F, 8 where it
            // has AVX2 (and so AVX); both squares lie inside the slices (asserted above).
            16 => unsafe { x86::turn16(src.as_ptr(), ld_src, dst.as_mut_ptr().cast(), ld_dst) },
            8 => unsafe { x86::turn8(src.as_ptr(), ld_src, dst.as_mut_ptr().cast(), ld_dst) },
            _ => unreachable!("transpose: no {side}x{side} square on this CPU"),
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("transpose: no {side}x{side} square on this CPU");
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        use super::simd;

        /// # Safety
        /// The CPU must support AVX-512F; `src` must be readable for 16 rows of 16 floats
        /// `ld_src` apart, `dst` writable for 16 rows of 16 floats `ld_dst` apart.
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::needless_range_loop)]
        pub(super) unsafe fn turn16(src: *const f32, ld_src: usize, dst: *mut f32, ld_dst: usize) {
            let mut r = [_mm512_setzero_ps(); 16];
            // SAFETY: rows i < 16 of the square, each 16 floats (this function's contract).
            unsafe {
                for i in 0..16 {
                    r[i] = _mm512_loadu_ps(src.add(i * ld_src));
                }
                simd::transpose16(&mut r);
                for i in 0..16 {
                    _mm512_storeu_ps(dst.add(i * ld_dst), r[i]);
                }
            }
        }

        /// # Safety
        /// The CPU must support AVX; `src` must be readable for 8 rows of 8 floats `ld_src`
        /// apart, `dst` writable for 8 rows of 8 floats `ld_dst` apart.
        #[target_feature(enable = "avx")]
        #[allow(clippy::needless_range_loop)]
        pub(super) unsafe fn turn8(src: *const f32, ld_src: usize, dst: *mut f32, ld_dst: usize) {
            let mut r = [_mm256_setzero_ps(); 8];
            // SAFETY: rows i < 8 of the square, each 8 floats (this function's contract).
            unsafe {
                for i in 0..8 {
                    r[i] = _mm256_loadu_ps(src.add(i * ld_src));
                }
                simd::transpose8(&mut r);
                for i in 0..8 {
                    _mm256_storeu_ps(dst.add(i * ld_dst), r[i]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_exact_at_every_level_and_length() {
        for level in simd::levels() {
            let _cap = simd::cap(level);
            // Lengths around each vector width, with a partial vector at either end.
            for n in [0, 1, 7, 8, 15, 16, 17, 33, 100] {
                let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
                let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 1e-3).collect();
                let mut dst = vec![std::mem::MaybeUninit::new(f32::NAN); n];
                sum_into(&mut dst, &a, &b);
                let mut x = a.clone();
                add_assign(&mut x, &b);
                for i in 0..n {
                    // SAFETY: every element was initialised (NaN above, the sum by `sum_into`).
                    let got = unsafe { dst[i].assume_init() };
                    assert_eq!(got.to_bits(), (a[i] + b[i]).to_bits(), "{level:?} {n} {i}");
                    assert_eq!(x[i].to_bits(), (a[i] + b[i]).to_bits(), "{level:?} {n} {i}");
                }
            }
        }
    }

    #[test]
    fn lstm_cells_match_their_equations_at_every_level() {
        let n = 37; // a partial vector at either width
        let z: Vec<f32> = (0..4 * n).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let c0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 2.0).collect();
        let sig = |v: f32| 1.0 / (1.0 + (-f64::from(v)).exp());
        for level in simd::levels() {
            let _cap = simd::cap(level);
            let (mut c, mut h) = (c0.clone(), vec![f32::NAN; n]);
            lstm_cells(&z, &mut c, &mut h);
            for j in 0..n {
                let (i, o, f, g) = (sig(z[j]), sig(z[n + j]), sig(z[2 * n + j]), f64::from(z[3 * n + j]).tanh());
                let cw = f * f64::from(c0[j]) + i * g;
                let hw = o * cw.tanh();
                assert!((f64::from(c[j]) - cw).abs() < 1e-6 && (f64::from(h[j]) - hw).abs() < 1e-6, "{level:?} {j}");
            }
        }
        for x in [-100.0f32, -9.0, -1e-3, 0.0, 1e-3, 0.5, 9.0, 100.0] {
            assert!((f64::from(tanh(x)) - f64::from(x).tanh()).abs() < 2e-7, "tanh({x})");
            assert!((f64::from(sigmoid(x)) - sig(x)).abs() < 2e-7, "sigmoid({x})");
        }
    }

    #[test]
    fn erf_is_within_1e6_of_libm_everywhere() {
        let mut worst = 0f32;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((erf(x) - libm_erf(x)).abs());
        }
        for x in [f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30] {
            let y = erf(x);
            assert!(y.is_finite() && (y.abs() - 1.0).abs() <= 1e-6 && y.signum() == x.signum(), "erf({x}) = {y}");
        }
        assert!(worst <= 1e-6, "worst |erf - libm erf| = {worst:e}");
    }

    /// The exact error function (candle's port of libm's, in f64).
    fn libm_erf(x: f32) -> f32 {
        candle_core::cpu::erf::erf_f64(f64::from(x)) as f32
    }

    #[test]
    fn every_level_computes_the_same_activations() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013).collect();
        for act in [Act::Gelu, Act::GeluTanh, Act::Relu, Act::Erf] {
            let mut want = x.clone();
            {
                let _portable = simd::cap(simd::Level::Portable);
                activate(&mut want, act);
            }
            for level in simd::levels() {
                let _cap = simd::cap(level);
                let mut got = x.clone();
                activate(&mut got, act);
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst <= 1e-6, "{act:?} at {level:?}: {worst:e}");
            }
            let exact = |v: f32| match act {
                Act::Gelu => 0.5 * f64::from(v) * (1.0 + f64::from(libm_erf(v * std::f32::consts::FRAC_1_SQRT_2))),
                Act::GeluTanh => {
                    let v = f64::from(v);
                    0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
                }
                Act::Relu => f64::from(v.max(0.0)),
                Act::Erf => f64::from(libm_erf(v)),
            };
            for (&v, &g) in x.iter().zip(&want) {
                assert!((f64::from(g) - exact(v)).abs() <= 2e-6 * (1.0 + f64::from(v.abs())), "{act:?}({v}) = {g}");
            }
        }
    }

    /// Row layer norm against f64 at every SIMD level, rows shorter and longer than 16 lanes.
    #[test]
    fn row_layer_norm_matches_the_exact_one() {
        for (rows, cols) in [(3, 5), (4, 384), (2, 33)] {
            let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 37) % 53) as f32 * 0.3 - 7.0).collect();
            let gamma: Vec<f32> = (0..cols).map(|i| 0.5 + i as f32 / cols as f32).collect();
            let beta: Vec<f32> = (0..cols).map(|i| i as f32 * 0.01 - 0.2).collect();
            for level in simd::levels() {
                let _cap = simd::cap(level);
                let mut got = x.clone();
                layer_norm_rows(&mut got, cols, &gamma, &beta, 1e-12).expect("whole rows");
                for r in 0..rows {
                    let row: Vec<f64> = x[r * cols..(r + 1) * cols].iter().map(|&v| f64::from(v)).collect();
                    let mean = row.iter().sum::<f64>() / cols as f64;
                    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
                    for c in 0..cols {
                        let want = (row[c] - mean) / (var + 1e-12).sqrt() * f64::from(gamma[c]) + f64::from(beta[c]);
                        assert!((f64::from(got[r * cols + c]) - want).abs() <= 1e-4, "{level:?} {cols} ({r}, {c})");
                    }
                }
            }
        }
        assert!(layer_norm_rows(&mut [0.0; 5], 2, &[1.0; 2], &[0.0; 2], 1e-5).is_none());
    }

    /// Row softmax against f64 at every SIMD level, on rows shorter and longer than 16
    /// lanes, with a masked entry.
    #[test]
    fn row_softmax_matches_the_exact_one() {
        for (rows, cols) in [(5, 3), (7, 16), (3, 130)] {
            let s: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 101) as f32 * 0.17 - 8.0).collect();
            for level in simd::levels() {
                let _cap = simd::cap(level);
                let mut got = s.clone();
                got[cols - 1] = f32::MIN; // masked
                softmax_rows(&mut got, cols);
                for r in 0..rows {
                    let row: Vec<f64> = (0..cols)
                        .map(|c| if (r, c) == (0, cols - 1) { f64::NEG_INFINITY } else { f64::from(s[r * cols + c]) })
                        .collect();
                    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let total: f64 = row.iter().map(|v| (v - max).exp()).sum();
                    for c in 0..cols {
                        let want = (row[c] - max).exp() / total;
                        assert!((f64::from(got[r * cols + c]) - want).abs() <= 1e-6, "{level:?} {cols} ({r}, {c})");
                    }
                }
            }
        }
    }

    #[test]
    fn exp_and_column_softmax_match_the_exact_ones() {
        let mut worst = 0f64;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let want = f64::from(x).exp();
            worst = worst.max((f64::from(exp(x)) - want).abs() / want);
        }
        assert!(worst <= 1e-6, "worst relative error of exp: {worst:e}");
        assert!(exp(-1e30) >= 0.0 && exp(1e30).is_finite() && exp(f32::MIN) >= 0.0);
        let (rows, cols) = (37, 21);
        let s: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 101) as f32 * 0.17 - 8.0).collect();
        for level in simd::levels() {
            let _cap = simd::cap(level);
            let mut got = s.clone();
            got[5 * cols + 3] = f32::MIN; // masked
            softmax_columns(&mut got, cols);
            for c in 0..cols {
                let col: Vec<f64> = (0..rows)
                    .map(|r| if (r, c) == (5, 3) { f64::NEG_INFINITY } else { f64::from(s[r * cols + c]) })
                    .collect();
                let max = col.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = col.iter().map(|v| (v - max).exp()).sum();
                for r in 0..rows {
                    let want = (col[r] - max).exp() / total;
                    assert!((f64::from(got[r * cols + c]) - want).abs() <= 1e-6, "{level:?} ({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn column_layer_norm_matches_a_plain_one() {
        let (rows, cols) = (45, 19);
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 97) as f32 * 0.3 - 12.0).collect();
        let gamma: Vec<f32> = (0..rows).map(|f| 0.5 + f as f32 * 0.01).collect();
        let beta: Vec<f32> = (0..rows).map(|f| f as f32 * -0.02).collect();
        for level in simd::levels() {
            let _cap = simd::cap(level);
            let mut got = x.clone();
            layer_norm_columns(&mut got, cols, &gamma, &beta, 1e-12).unwrap();
            for c in 0..cols {
                let col: Vec<f64> = (0..rows).map(|r| f64::from(x[r * cols + c])).collect();
                let mean = col.iter().sum::<f64>() / rows as f64;
                let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / rows as f64;
                for r in 0..rows {
                    let want = (col[r] - mean) / (var + 1e-12).sqrt() * f64::from(gamma[r]) + f64::from(beta[r]);
                    assert!((f64::from(got[r * cols + c]) - want).abs() <= 1e-5, "{level:?} ({r}, {c})");
                }
            }
        }
        let mut y = x.clone();
        assert!(layer_norm_columns(&mut y, cols, &gamma[1..], &beta, 1e-12).is_none(), "one gamma short");
        assert_eq!(y, x, "untouched");
        // Empty and zero shapes, at every level.
        for level in simd::levels() {
            let _cap = simd::cap(level);
            assert!(layer_norm_columns(&mut [], 0, &[], &[], 1e-12).is_none(), "no columns");
            assert_eq!(layer_norm_columns(&mut [], 5, &[], &[], 1e-12), Some(()), "no rows");
            assert!(layer_norm_columns(&mut [1.0; 7], 5, &[1.0], &[0.0], 1e-12).is_none(), "ragged rows");
            softmax_columns(&mut [], 0);
            softmax_columns(&mut [], 4);
            activate(&mut [], Act::Gelu);
        }
    }

    /// Not a test: `cargo test -p eir --lib act::tests::transpose_against_the_crate -- --ignored
    /// --nocapture` times [`transpose`] against the `transpose` crate on one thread, on the
    /// shapes a transformer's dense layers turn around (tokens × features and back), and
    /// ours on every thread of the pool.
    #[test]
    #[ignore]
    fn transpose_against_the_crate() {
        let time = |f: &mut dyn FnMut()| crate::nn::kernels::median_time(31, f);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        for (rows, cols) in [(64, 384), (64, 1536), (1536, 64), (128, 1152), (640, 384), (640, 1536), (37, 70)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut out = vec![0f32; rows * cols];
            let ours = one.install(|| time(&mut || drop(std::hint::black_box(transpose(&src, rows, cols)))));
            let all = time(&mut || drop(std::hint::black_box(transpose(&src, rows, cols))));
            let crate_ = time(&mut || {
                transpose::transpose(&src, &mut out, cols, rows);
                std::hint::black_box(&out);
            });
            eprintln!(
                "{rows:>5}x{cols:<5}: EIR {:>8.1} us (all threads {:>8.1} us) | crate {:>8.1} us | EIR / crate = {:.2}x",
                ours.as_secs_f64() * 1e6,
                all.as_secs_f64() * 1e6,
                crate_.as_secs_f64() * 1e6,
                ours.as_secs_f64() / crate_.as_secs_f64()
            );
        }
    }

    #[test]
    fn transpose_handles_ragged_blocks() {
        // Whole squares and ragged edges of both, serial and parallel (from 2^18 elements).
        for level in simd::levels() {
            let _cap = simd::cap(level);
            for (rows, cols) in
                [(37, 70), (1, 1), (16, 16), (8, 24), (33, 17), (300, 517), (520, 517), (256, 384), (7, 1000)]
            {
                let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
                let t = transpose(&src, rows, cols).unwrap();
                assert_eq!(t.len(), rows * cols);
                assert!(
                    (0..rows * cols).all(|i| t[(i % cols) * rows + i / cols] == src[i]),
                    "{rows}x{cols} at {level:?}"
                );
            }
        }
        let src = vec![0f32; 37 * 70];
        assert!(transpose(&src, 38, 70).is_none(), "too short a source");
        assert!(transpose(&src, usize::MAX, 2).is_none(), "overflow");
        assert_eq!(transpose(&src, 0, 5), Some(vec![]));
    }
}
