//! Scaled dot-product attention on transposed projections, as BERT keeps them: `qkvt` is
//! `[3·hidden][tokens]` (Q, K and V stacked, each feature a row of every token), `mask` the
//! additive mask per token, and the context comes out as `[hidden][tokens]`, ready for the
//! output projection.
//!
//! With AVX-512 each (row, head) runs as one fused pass ([`x86`]): for a block of 32 queries
//! the scores against every key go to a `seq × 32` scratch (12 keys × 32 queries per register
//! tile, the head's keys packed once per unit), a softmax runs down its columns, and the value
//! product reads the probabilities from there and V in place, and writes the context rows in
//! place, scaled by each query's `1 / Σ`. Nothing of `batch × heads × seq²` is ever held, and
//! the scratch (16 KiB at 128 tokens) stays in L1/L2. Elsewhere the same runs as two GEMMs per
//! (row, head) on [`sgemm`] ([`by_gemm`]), which is also the reference the fused pass is
//! tested against.

use super::{act, sgemm, simd};
use crate::nn::error::NnError;

/// One attention pass's sizes, checked against its operands: `qkvt` holds `3·hidden·tokens`
/// floats and `mask` `tokens`, with `tokens = rows·seq` and `hidden = heads·head`, every
/// product computed without overflow. The fused kernel takes only this type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    seq: usize,
    hidden: usize,
    heads: usize,
    head: usize,
    tokens: usize,
    /// `rows · heads`: the (row, head) pairs, each one unit of work.
    units: usize,
}

impl Shape {
    /// `[rows, seq, hidden, heads]` checked against the lengths of `qkvt` and `mask`.
    pub(crate) fn new([rows, seq, hidden, heads]: [usize; 4], qkvt: usize, mask: usize) -> Result<Self, NnError> {
        let bad = || NnError::runtime("attention: operand sizes do not match");
        let head = hidden.checked_div(heads).ok_or_else(bad)?;
        let tokens = rows.checked_mul(seq).ok_or_else(bad)?;
        let floats = hidden.checked_mul(tokens).and_then(|f| f.checked_mul(3)).ok_or_else(bad)?;
        let units = rows.checked_mul(heads).ok_or_else(bad)?;
        if head * heads != hidden || qkvt != floats || mask != tokens {
            return Err(bad());
        }
        Ok(Self { seq, hidden, heads, head, tokens, units })
    }

    /// Whether the pass computes nothing (no tokens, or heads of no features): the kernels
    /// then never run, so none of them meets a zero-length head or sequence.
    fn is_empty(&self) -> bool {
        self.tokens == 0 || self.head == 0
    }
}

/// Attention over `qkvt` for `[rows, seq, hidden, heads]`, into `ctxt` (resized to
/// `hidden·tokens`; every value overwritten). Per row and head, query `i` attends to key `j`
/// with weight `softmax_j(q_i·k_j / √head + mask[j])`; a key masked with `f32::MIN` gets
/// weight e⁻⁸⁷ (as good as 0) unless the row's every key is masked.
pub(crate) fn attend(qkvt: &[f32], dims: [usize; 4], mask: &[f32], ctxt: &mut Vec<f32>) -> Result<(), NnError> {
    let shape = Shape::new(dims, qkvt.len(), mask.len())?;
    ctxt.resize(shape.hidden * shape.tokens, 0.0);
    if shape.is_empty() {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if simd::avx512() {
        x86::attend(&shape, qkvt, mask, ctxt);
        return Ok(());
    }
    by_gemm(&shape, qkvt, mask, ctxt)
}

/// Whether a pass is worth splitting across the pool (waking it costs tens of microseconds).
fn parallel(s: &Shape) -> bool {
    s.units > 1 && s.tokens.saturating_mul(s.seq).saturating_mul(s.hidden) >= 1 << 20
}

/// The pass on [`sgemm`]: per row and head, `Sᵀ = Kᵀ·Q` (one `seq × seq` block at a time,
/// with the mask as the product's per-row bias), a softmax down each column, then
/// `ctx = V·Sᵀ`. Runs on CPUs without AVX-512 (where the GEMM has AVX2 and portable paths).
pub(crate) fn by_gemm(s: &Shape, qkvt: &[f32], mask: &[f32], ctxt: &mut [f32]) -> Result<(), NnError> {
    let &Shape { heads, head, hidden, seq, tokens, .. } = s;
    if ctxt.len() != hidden * tokens {
        return Err(NnError::runtime("attention: operand sizes do not match"));
    }
    if s.is_empty() {
        return Ok(());
    }
    let scale = 1.0 / (head as f32).sqrt();
    let unit = |u: usize| -> Result<Vec<f32>, NnError> {
        let (b, h) = (u / heads, u % heads);
        let block = |part: usize, d: usize| {
            let at = (part * hidden + h * head + d) * tokens + b * seq;
            &qkvt[at..at + seq]
        };
        let mut q = Vec::with_capacity(head * seq);
        let mut kt = super::filled(seq * head, 0f32);
        let mut v = Vec::with_capacity(head * seq);
        for d in 0..head {
            q.extend(block(0, d).iter().map(|x| x * scale));
            for (j, &x) in block(1, d).iter().enumerate() {
                kt[j * head + d] = x;
            }
            v.extend_from_slice(block(2, d));
        }
        // Sᵀ[j][i]: key j against query i, plus key j's mask.
        let mut st = super::filled(seq * seq, 0f32);
        sgemm::gemm([seq, seq, head], &kt, None, &q, &mut st, Some(&mask[b * seq..(b + 1) * seq]), None)?;
        act::softmax_columns(&mut st, seq);
        let mut ctx = super::filled(head * seq, 0f32);
        sgemm::gemm([head, seq, seq], &v, None, &st, &mut ctx, None, None)?;
        Ok(ctx)
    };
    let units = s.units;
    let blocks: Vec<Vec<f32>> = if parallel(s) {
        use rayon::prelude::*;
        (0..units).into_par_iter().map(unit).collect::<Result<_, _>>()?
    } else {
        (0..units).map(unit).collect::<Result<_, _>>()?
    };
    for (u, ctx) in blocks.iter().enumerate() {
        let (b, h) = (u / heads, u % heads);
        for (d, row) in ctx.chunks_exact(seq).enumerate() {
            let at = (h * head + d) * tokens + b * seq;
            ctxt[at..at + seq].copy_from_slice(row);
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Shape;
    use crate::nn::kernels::act;
    use crate::nn::kernels::simd::{SharedOut, lanes16};

    /// Queries per block: two 16-lane registers, and the scratch's row length.
    const W: usize = 32;

    /// Runs every (row, head) of `s`, in parallel where it pays.
    ///
    /// The caller has checked that the CPU has AVX-512F; `s` was checked against `qkvt` and
    /// `mask` ([`Shape::new`]), and `ctxt` holds `hidden · tokens` floats (asserted).
    pub(super) fn attend(s: &Shape, qkvt: &[f32], mask: &[f32], ctxt: &mut [f32]) {
        assert!(
            ctxt.len() == s.hidden * s.tokens && !s.is_empty() && super::simd::avx512(),
            "attention: unchecked operands"
        );
        // Unit (b, h) writes only head h's rows at row b's columns; no two units share one.
        let out = SharedOut(ctxt.as_mut_ptr());
        // A scratch serves every unit a thread runs in turn: each writes the same positions,
        // so the zeros past the last key and feature stay zero.
        let unit = |scratch: &mut Scratch, u: usize| {
            // SAFETY: AVX-512F is available (asserted above); `s` was checked against `qkvt`
            // and `mask` by `Shape::new`, `ctxt` holds hidden·tokens floats (asserted), u <
            // rows·heads, `scratch` was made for `s`, and unit u alone writes its head's rows
            // at its row's columns.
            unsafe { unit512(s, qkvt, mask, out, u, scratch) }
        };
        let units = s.units;
        if super::parallel(s) {
            crate::nn::kernels::par::for_each_init(0..units, || Scratch::new(s), unit);
        } else {
            let mut scratch = Scratch::new(s);
            (0..units).for_each(|u| unit(&mut scratch, u));
        }
    }

    /// Keys per panel of the score tile, features per panel of the context tile.
    const KEYS: usize = 12;
    const FEATURES: usize = 8;

    /// A unit's buffers: the scores of one block of queries (`[seq][W]`), and this head's K in
    /// panels for the score tile (`[panel][head][KEYS]`, zero past the last key), so that each
    /// step broadcasts from one contiguous run. (V is read in place: its tile broadcasts from
    /// 8 rows at once, and packing it was a scatter, 11% of the pass.)
    ///
    /// The block's queries are copied too (`[head][W]`, zero past the last query): in place,
    /// their rows lie `tokens` floats apart, which at 1024 tokens puts every row on the same
    /// L1 sets, so each key panel read them from L2 again (a third of the pass at 8 × 128).
    pub(super) struct Scratch {
        scores: Vec<f32>,
        keys: Vec<f32>,
        queries: Vec<f32>,
    }

    impl Scratch {
        pub(super) fn new(s: &Shape) -> Self {
            Self {
                scores: super::super::filled(s.seq * W, 0.0),
                keys: super::super::filled(s.seq.div_ceil(KEYS) * KEYS * s.head, 0.0),
                queries: super::super::filled(s.head * W, 0.0),
            }
        }
    }

    /// Row `b`, head `h` of the pass (`u = b·heads + h`): K packed, then every block of
    /// up to 32 queries in turn, with `V` registers of queries (the last block takes one
    /// register when 16 or fewer queries are left).
    ///
    /// # Safety
    /// AVX-512F must be available; `s` must have been checked against `qkvt` and `mask`
    /// ([`Shape::new`]); `out` must be valid for writes of `hidden · tokens` floats, of which
    /// this call writes only rows `h·head..(h+1)·head` at columns `b·seq..(b+1)·seq`;
    /// `u < rows · heads`; `scratch` was made for `s`.
    #[target_feature(enable = "avx512f")]
    unsafe fn unit512(s: &Shape, qkvt: &[f32], mask: &[f32], out: SharedOut, u: usize, scratch: &mut Scratch) {
        let &Shape { seq, hidden, heads, head, tokens, .. } = s;
        let (b, h) = (u / heads, u % heads);
        for d in 0..head {
            // Feature d of this head's K, `seq` tokens from row b's first.
            let at = (hidden + h * head + d) * tokens + b * seq;
            for (p, keys) in qkvt[at..at + seq].chunks(KEYS).enumerate() {
                let at = (p * head + d) * KEYS;
                scratch.keys[at..at + keys.len()].copy_from_slice(keys);
            }
        }
        let mut ib = 0;
        while ib < seq {
            let w = (seq - ib).min(W);
            // SAFETY: forwarded from this function's contract; queries ib..ib+w lie in the row.
            unsafe {
                if w > 16 {
                    block::<2>(s, qkvt, mask, out, u, scratch, ib, w);
                } else {
                    block::<1>(s, qkvt, mask, out, u, scratch, ib, w);
                }
            }
            ib += W;
        }
    }

    /// Queries `ib..ib + w` (`w ≤ 16·V`) of unit `u`: scores into the scratch (`[seq][W]`, `V`
    /// registers of each row used), the softmax down its columns, then the context.
    ///
    /// # Safety
    /// As [`unit512`], with K packed into `scratch` for unit `u`, `ib + w ≤ seq`,
    /// `w ≤ 16·V` and `V ≤ 2`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const V: usize>(
        s: &Shape,
        qkvt: &[f32],
        mask: &[f32],
        out: SharedOut,
        u: usize,
        scratch: &mut Scratch,
        ib: usize,
        w: usize,
    ) {
        let &Shape { seq, heads, head, tokens, .. } = s;
        let (b, h) = (u / heads, u % heads);
        let col = b * seq;
        // This head's Q and V rows from this row's first token: element (d, i) at
        // `d · tokens + i`, inside `qkvt` for d < head and i < seq (`Shape::new`).
        let q = qkvt.as_ptr().wrapping_add(h * head * tokens + col);
        let v = qkvt.as_ptr().wrapping_add((2 * s.hidden + h * head) * tokens + col);
        let mask = &mask[col..col + seq];
        let masks: [__mmask16; V] = std::array::from_fn(|x| lanes16(w.saturating_sub(16 * x)));
        let scale = _mm512_set1_ps(1.0 / (head as f32).sqrt());
        let scores = &mut scratch.scores[..seq * W];
        let st = scores.as_mut_ptr();
        let queries = &mut scratch.queries[..head * W];
        for (d, row) in queries.chunks_exact_mut(W).enumerate() {
            for (x, &mask) in masks.iter().enumerate() {
                // SAFETY: d < head and queries ib.. are masked to the w that exist (ib + w ≤
                // seq): every read lies in this head's Q rows of `qkvt`; lanes 16x.. < W.
                unsafe {
                    let v = _mm512_maskz_loadu_ps(mask, q.add(d * tokens + ib + 16 * x));
                    _mm512_storeu_ps(row.as_mut_ptr().add(16 * x), v);
                }
            }
        }
        let queries = &*queries;

        // Scores: st[j][i] = q_i·k_j / √head + mask[j], a panel of KEYS keys at a time.
        for (p, keys) in scratch.keys.chunks_exact(head * KEYS).enumerate() {
            let jp = p * KEYS;
            let mut acc = [[_mm512_setzero_ps(); V]; KEYS];
            for (k, qd) in keys.chunks_exact(KEYS).zip(queries.chunks_exact(W)) {
                // SAFETY: each row of `queries` holds W = 16·2 ≥ 16·V floats.
                let qv: [__m512; V] = std::array::from_fn(|x| unsafe { _mm512_loadu_ps(qd.as_ptr().add(16 * x)) });
                for r in 0..KEYS {
                    let kb = _mm512_set1_ps(k[r]);
                    for x in 0..V {
                        acc[r][x] = _mm512_fmadd_ps(kb, qv[x], acc[r][x]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate().take(seq - jp) {
                let m = _mm512_set1_ps(mask[jp + r]);
                for (x, &a) in acc.iter().enumerate() {
                    // SAFETY: row jp + r < seq of the scratch's seq × W floats, lanes 16x.. < W.
                    unsafe { _mm512_storeu_ps(st.add((jp + r) * W + 16 * x), _mm512_fmadd_ps(a, scale, m)) };
                }
            }
        }

        // Softmax down each query's column: e^(s - max), and 1/Σ kept for the context.
        let mut inv = [0f32; W];
        {
            let used = 16 * V;
            let mut max = [f32::MIN; W];
            for row in scores.chunks_exact(W) {
                for (m, &x) in max[..used].iter_mut().zip(&row[..used]) {
                    *m = m.max(x);
                }
            }
            let mut sum = [0f32; W];
            for row in scores.chunks_exact_mut(W) {
                for ((x, &m), acc) in row[..used].iter_mut().zip(&max[..used]).zip(&mut sum[..used]) {
                    *x = act::exp(*x - m);
                    *acc += *x;
                }
            }
            for (i, total) in inv[..used].iter_mut().zip(&sum[..used]) {
                *i = 1.0 / total;
            }
        }
        // SAFETY: `inv` holds W = 32 floats; lanes 16x.. < W.
        let inv: [__m512; V] = std::array::from_fn(|x| unsafe { _mm512_loadu_ps(inv.as_ptr().add(16 * x)) });
        // The scores as the softmax left them (a pointer taken after its borrows end).
        let st = scores.as_ptr();

        // Context: ctx[d][i] = Σ_j v[d][j] · p[j][i] / Σ_i, a panel of FEATURES features at a
        // time, written in place.
        for dp in (0..head).step_by(FEATURES) {
            // Feature rows past the last are read as the last (computed, never stored).
            let rows: [*const f32; FEATURES] = std::array::from_fn(|r| v.wrapping_add((dp + r).min(head - 1) * tokens));
            let mut acc = [[_mm512_setzero_ps(); V]; FEATURES];
            for j in 0..seq {
                // SAFETY: row j < seq of the scratch, lanes < 16·V ≤ W; V's features
                // min(dp + r, head - 1) < head at key j < seq lie in this head's V rows.
                unsafe {
                    let pj: [__m512; V] = std::array::from_fn(|x| _mm512_loadu_ps(st.add(j * W + 16 * x)));
                    for r in 0..FEATURES {
                        let vb = _mm512_set1_ps(*rows[r].add(j));
                        for x in 0..V {
                            acc[r][x] = _mm512_fmadd_ps(vb, pj[x], acc[r][x]);
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate().take(head - dp) {
                // SAFETY: feature h·head + dp + r < hidden, columns col + ib + lane masked to
                // lanes < w (ib + w ≤ seq): inside `out`'s hidden · tokens floats, in this
                // unit's rows and columns.
                unsafe {
                    let row = out.at((h * head + dp + r) * tokens + col + ib);
                    for x in 0..V {
                        _mm512_mask_storeu_ps(row.add(16 * x), masks[x], _mm512_mul_ps(acc[x], inv[x]));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention in f64 on token-major projections (`qkv`: `[tokens][3·hidden]`), as
    /// transformers computes it.
    fn naive(qkv: &[f32], [rows, seq, hidden, heads]: [usize; 4], mask: &[f32]) -> Vec<f64> {
        let head = hidden / heads;
        let at = |t: usize, part: usize, f: usize| f64::from(qkv[t * 3 * hidden + part * hidden + f]);
        let mut out = vec![0f64; rows * seq * hidden];
        for b in 0..rows {
            for h in 0..heads {
                for i in 0..seq {
                    let scores: Vec<f64> = (0..seq)
                        .map(|j| {
                            let dot: f64 = (0..head)
                                .map(|d| at(b * seq + i, 0, h * head + d) * at(b * seq + j, 1, h * head + d))
                                .sum();
                            dot / (head as f64).sqrt() + f64::from(mask[b * seq + j])
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..head {
                        out[(b * seq + i) * hidden + h * head + d] =
                            (0..seq).map(|j| e[j] / sum * at(b * seq + j, 2, h * head + d)).sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_a_plain_reference_on_ragged_shapes_at_every_level() {
        // Queries in one or two registers and across several blocks (40, 130), heads whose
        // width leaves a partial panel of features (4, 20) or fills them (32, 80), padded keys.
        let shapes = [
            (1, 1, 4, 1),
            (2, 13, 12, 3),
            (3, 40, 64, 2),
            (1, 130, 96, 3),
            (2, 70, 160, 2),
            (4, 17, 384, 12),
            (2, 37, 40, 2),
        ];
        for level in simd::levels() {
            let _cap = simd::cap(level);
            for (rows, seq, hidden, heads) in shapes {
                let tokens = rows * seq;
                let qkv: Vec<f32> =
                    (0..tokens * 3 * hidden).map(|i| (((i * 7919) % 211) as f32 - 105.0) * 0.01).collect();
                // The last two keys of every row but the first are padding.
                let mask: Vec<f32> = (0..tokens)
                    .map(|t| if t / seq > 0 && t % seq + 2 >= seq && seq > 2 { f32::MIN } else { 0.0 })
                    .collect();
                let shape = [rows, seq, hidden, heads];
                let qkvt = act::transpose(&qkv, tokens, 3 * hidden).unwrap();
                // A reused buffer of the wrong size is resized, and every value overwritten.
                let mut ctxt = vec![f32::NAN; 3];
                attend(&qkvt, shape, &mask, &mut ctxt).unwrap();
                let want = naive(&qkv, shape, &mask);
                for t in 0..tokens {
                    for f in 0..hidden {
                        let (got, want) = (f64::from(ctxt[f * tokens + t]), want[t * hidden + f]);
                        assert!(
                            (got - want).abs() <= 1e-5,
                            "{level:?} {shape:?} token {t} feature {f}: {got} vs {want}"
                        );
                    }
                }
            }
        }
        // Nothing to compute is an empty result, not a panic: no rows, no tokens per row, heads
        // of no features.
        for (dims, qkvt, mask) in [([0, 5, 8, 2], 0, 0), ([3, 0, 8, 2], 0, 0), ([2, 3, 0, 4], 0, 6)] {
            let mut ctxt = vec![1.0; 4];
            attend(&vec![0.0; qkvt], dims, &vec![0.0; mask], &mut ctxt).unwrap();
            assert!(ctxt.is_empty(), "{dims:?}");
        }
        for bad in [[1, 2, 4, 2], [1, 2, 4, 0], [1, 2, 5, 2], [usize::MAX, 2, 4, 2], [usize::MAX, 0, 0, 2]] {
            assert!(attend(&[0.0; 10], bad, &[0.0; 2], &mut Vec::new()).is_err(), "{bad:?}: sizes that do not match");
        }
    }
}
