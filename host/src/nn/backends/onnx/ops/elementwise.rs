//! Element-wise operators: arithmetic and comparison with numpy broadcasting, activations,
//! casts.

use candle_core::{DType, Tensor};

use std::mem::MaybeUninit;

use super::super::tensor::dtype_of;
use super::{Built, Node, count, input, op, op_sized, scalar_f64, wide};
use crate::nn::error::NnError;
use crate::nn::kernels::act::{self, Act};

/// Elements per parallel chunk of an element-wise pass (64 KiB of floats); smaller tensors run
/// on the calling thread.
const CHUNK: usize = 16 * 1024;

/// `f` applied in place to a copy of `src`, in chunks of whole rows of `row` floats (about
/// [`CHUNK`] floats each; `src` holds whole rows), each copied and then transformed while in
/// cache, in parallel when there are several. One pass over memory: a copy first and the
/// transform after cost more than candle's one-thread kernels.
pub(super) fn map_rows(src: &[f32], row: usize, f: impl Fn(&mut [f32]) + Sync) -> Result<Vec<f32>, NnError> {
    let mut out = super::uninit_f32(src.len())?;
    // `write_copy_of_slice` panics where the lengths differ (the chunks pair up exactly).
    let each = |(o, s): (&mut [MaybeUninit<f32>], &[f32])| f(o.write_copy_of_slice(s));
    let chunk = (CHUNK / row.max(1)).max(1) * row.max(1);
    if src.len() <= chunk {
        each((&mut out.spare_capacity_mut()[..src.len()], src));
    } else {
        crate::nn::kernels::par::for_each(
            out.spare_capacity_mut()[..src.len()].chunks_mut(chunk).zip(src.chunks(chunk)),
            each,
        );
    }
    // SAFETY: `write_copy_of_slice` initialised every one of the first `src.len()` elements
    // (the chunks cover them all).
    unsafe { out.set_len(src.len()) };
    Ok(out)
}

/// The four arithmetic operators, which have an f32 fast path.
#[derive(Clone, Copy, Debug)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

impl Arith {
    fn of(name: &str) -> Option<Self> {
        Some(match name {
            "Add" => Self::Add,
            "Sub" => Self::Sub,
            "Mul" => Self::Mul,
            "Div" => Self::Div,
            _ => return None,
        })
    }

    /// `a op b` for f32 operands where one is the other's shape, or repeats along the other's
    /// leading axes (a bias `[N]` against `[.., N]`, a scalar): in parallel chunks, vectorised.
    /// `None` for anything else (candle's broadcasting then computes it). candle's own
    /// kernels run on one thread: a batched MiniLM graph spent 17 of 136 ms in Add, Mul and Div.
    fn fast(self, a: &Tensor, b: &Tensor) -> Result<Option<Tensor>, NnError> {
        if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
            return Ok(None);
        }
        // The operand with the output's shape, and the other, which must repeat within it.
        let (big, small, swapped) = if repeats_in(b.dims(), a.dims()) {
            (a, b, false)
        } else if repeats_in(a.dims(), b.dims()) {
            (b, a, true)
        } else {
            return Ok(None);
        };
        let period = small.elem_count();
        if period == 0 || big.elem_count() == 0 {
            return Ok(None);
        }
        let small = super::with_f32(small, <[f32]>::to_vec)?;
        // One loop per operator and order, so that each compiles to plain vector arithmetic.
        let out = super::with_f32(big, |big| match (self, swapped) {
            (Self::Add, _) => repeat_with(big, &small, |o, s| o + s),
            (Self::Mul, _) => repeat_with(big, &small, |o, s| o * s),
            (Self::Sub, false) => repeat_with(big, &small, |o, s| o - s),
            (Self::Sub, true) => repeat_with(big, &small, |o, s| s - o),
            (Self::Div, false) => repeat_with(big, &small, |o, s| o / s),
            (Self::Div, true) => repeat_with(big, &small, |o, s| s / o),
        })??;
        Ok(Some(Tensor::from_vec(out, big.dims(), big.device())?))
    }
}

/// `f(big[i], small[i % small.len()])` for every `i`, where `big` holds whole repeats of
/// `small` (not empty): one pass, in parallel chunks of about [`CHUNK`] elements.
fn repeat_with(big: &[f32], small: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Vec<f32>, NnError> {
    let (n, period) = (big.len(), small.len());
    assert!(period > 0 && n.is_multiple_of(period), "repeat_with: `big` must hold whole repeats of `small`");
    let mut out = super::uninit_f32(n)?;
    let dst = &mut out.spare_capacity_mut()[..n];
    // Writes `o` from `b` (both within one repeat, aligned with `s`).
    let part = |o: &mut [MaybeUninit<f32>], b: &[f32], s: &[f32]| {
        for ((o, &b), &s) in o.iter_mut().zip(b).zip(s) {
            o.write(f(b, s));
        }
    };
    if period == 1 {
        let s = small[0];
        crate::nn::kernels::par::for_each(dst.chunks_mut(CHUNK).zip(big.chunks(CHUNK)), |(o, b)| {
            for (o, &b) in o.iter_mut().zip(b) {
                o.write(f(b, s));
            }
        });
    } else if period >= CHUNK {
        // Long repeats (the same shape): each split into chunks that run in parallel.
        for (o, b) in dst.chunks_mut(period).zip(big.chunks(period)) {
            crate::nn::kernels::par::for_each(
                o.chunks_mut(CHUNK).zip(b.chunks(CHUNK)).zip(small.chunks(CHUNK)),
                |((o, b), s)| part(o, b, s),
            );
        }
    } else {
        // Short ones (a bias): whole repeats per chunk.
        let per = (CHUNK / period) * period;
        crate::nn::kernels::par::for_each(dst.chunks_mut(per).zip(big.chunks(per)), |(o, b)| {
            for (o, b) in o.chunks_mut(period).zip(b.chunks(period)) {
                part(o, b, small);
            }
        });
    }
    // SAFETY: the chunks above cover all `n` elements (`big` holds whole repeats of `small`,
    // and each zip pairs equal lengths), and `part` wrote each one.
    unsafe { out.set_len(n) };
    Ok(out)
}

/// Whether a tensor of shape `small` broadcasts to `big` by repeating whole: its shape, less
/// leading 1s, is a suffix of `big`'s.
fn repeats_in(small: &[usize], big: &[usize]) -> bool {
    let first = small.iter().position(|&d| d != 1).unwrap_or(small.len());
    let core = &small[first..];
    small.len() <= big.len() && big.ends_with(core)
}

type Binary = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;

pub(super) fn build(name: &str, node: &Node<'_>) -> Option<Built> {
    let binary = |f: Binary| -> Built {
        let name = node.proto.op_type.clone();
        let arith = Arith::of(&name);
        op_sized(broadcast_bound(2), move |i| {
            let (a, b) = (input(i, 0, &name)?, input(i, 1, &name)?);
            if let Some(arith) = arith
                && let Some(y) = arith.fast(a, b)?
            {
                return Ok(vec![y]);
            }
            Ok(vec![f(a, b)?])
        })
    };
    let unary = |f: fn(&Tensor) -> candle_core::Result<Tensor>| -> Built {
        let name = node.proto.op_type.clone();
        op(move |i| {
            let x = input(i, 0, &name)?;
            if x.dtype().is_float() {
                return Ok(vec![f(x)?]);
            }
            // candle's element-wise functions have no integer kernels (they panic): integers go
            // through f64 (exact to 2^53) and back.
            Ok(vec![f(&x.to_dtype(DType::F64)?)?.to_dtype(x.dtype())?])
        })
    };
    Some(match name {
        "Add" => binary(Tensor::broadcast_add),
        "Sub" => binary(Tensor::broadcast_sub),
        "Mul" => binary(Tensor::broadcast_mul),
        "Div" => binary(Tensor::broadcast_div),
        "Equal" => binary(Tensor::broadcast_eq),
        "Less" => binary(Tensor::broadcast_lt),
        "LessOrEqual" => binary(Tensor::broadcast_le),
        "Greater" => binary(Tensor::broadcast_gt),
        "GreaterOrEqual" => binary(Tensor::broadcast_ge),
        "And" => binary(Tensor::broadcast_mul),
        "Or" => binary(Tensor::broadcast_maximum),
        "Xor" => binary(Tensor::broadcast_ne),
        "Max" => variadic(Tensor::broadcast_maximum),
        "Min" => variadic(Tensor::broadcast_minimum),
        "Sum" => variadic(Tensor::broadcast_add),
        "Mean" => op_sized(broadcast_bound(3), |i| {
            let n = i.iter().flatten().count();
            let sum = fold(i, Tensor::broadcast_add)?;
            Ok(vec![sum.affine(1.0 / n.max(1) as f64, 0.0)?])
        }),
        "Pow" => op_sized(broadcast_bound(4), pow),
        "Where" => op_sized(broadcast_bound(4), |i| {
            let (c, a, b) = (input(i, 0, "Where")?, input(i, 1, "Where")?, input(i, 2, "Where")?);
            let shape = broadcast_shape(&[c.dims(), a.dims(), b.dims()])?;
            let c = c.to_dtype(DType::U8)?.broadcast_as(shape.as_slice())?;
            Ok(vec![c.where_cond(&a.broadcast_as(shape.as_slice())?, &b.broadcast_as(shape.as_slice())?)?])
        }),
        "Not" => op(|i| Ok(vec![input(i, 0, "Not")?.eq(0u8)?])),
        "Relu" => unary(Tensor::relu),
        "Sigmoid" => unary(candle_nn::ops::sigmoid),
        "Tanh" => unary(Tensor::tanh),
        "Erf" => op(|i| {
            let x = input(i, 0, "Erf")?;
            if x.dtype() == DType::F32 {
                // candle's erf is scalar libm, one thread: 45 of a batched MiniLM graph's
                // 136 ms went there.
                let v = super::with_f32(x, |x| map_rows(x, 1, |c| act::activate(c, Act::Erf)))??;
                return Ok(vec![Tensor::from_vec(v, x.dims(), x.device())?]);
            }
            Ok(vec![x.to_dtype(DType::F64)?.erf()?.to_dtype(x.dtype())?])
        }),
        "Sqrt" => unary(Tensor::sqrt),
        "Exp" => unary(Tensor::exp),
        "Log" => unary(Tensor::log),
        "Abs" => unary(Tensor::abs),
        "Neg" => unary(Tensor::neg),
        "Reciprocal" => unary(Tensor::recip),
        "Floor" => unary(Tensor::floor),
        "Ceil" => unary(Tensor::ceil),
        "Round" => unary(Tensor::round),
        "Sin" => unary(Tensor::sin),
        "Cos" => unary(Tensor::cos),
        "Sign" => unary(Tensor::sign),
        "Identity" => op(|i| Ok(vec![input(i, 0, "Identity")?.clone()])),
        "Dropout" => op(|i| {
            let x = input(i, 0, "Dropout")?;
            Ok(vec![x.clone(), x.ones_like()?.to_dtype(DType::U8)?])
        }),
        "Softplus" => op(|i| {
            let x = input(i, 0, "Softplus")?;
            // log(1 + exp(x)), computed as relu(x) + log(1 + exp(-|x|)) so large x cannot overflow.
            Ok(vec![(x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?])
        }),
        "Gelu" => {
            let approximate = node.string("approximate").unwrap_or_else(|| "none".into());
            match approximate.as_str() {
                "none" => op(|i| Ok(vec![gelu_erf(input(i, 0, "Gelu")?)?])),
                "tanh" => unary(Tensor::gelu),
                other => Err(node.bad(format!("unknown approximate `{other}`"))),
            }
        }
        "LeakyRelu" => {
            let alpha = f64::from(node.float_or("alpha", 0.01));
            op(move |i| {
                let x = input(i, 0, "LeakyRelu")?;
                Ok(vec![(x.relu()? + x.neg()?.relu()?.affine(-alpha, 0.0)?)?])
            })
        }
        "Elu" => {
            let alpha = f64::from(node.float_or("alpha", 1.0));
            op(move |i| Ok(vec![input(i, 0, "Elu")?.elu(alpha)?]))
        }
        "HardSigmoid" => {
            let (alpha, beta) = (f64::from(node.float_or("alpha", 0.2)), f64::from(node.float_or("beta", 0.5)));
            op(move |i| Ok(vec![input(i, 0, "HardSigmoid")?.affine(alpha, beta)?.clamp(0f32, 1f32)?]))
        }
        "HardSwish" => op(|i| {
            let x = input(i, 0, "HardSwish")?;
            Ok(vec![(x * x.affine(1.0 / 6.0, 0.5)?.clamp(0f32, 1f32)?)?])
        }),
        "Clip" => {
            // Before opset 11 the bounds are attributes; from 11 on, optional inputs.
            let (amin, amax) = (node.float_or("min", f32::MIN), node.float_or("max", f32::MAX));
            op(move |i| {
                let x = input(i, 0, "Clip")?;
                let lo = match i.get(1).copied().flatten() {
                    Some(t) => scalar_f64(t)?,
                    None => f64::from(amin),
                };
                let hi = match i.get(2).copied().flatten() {
                    Some(t) => scalar_f64(t)?,
                    None => f64::from(amax),
                };
                Ok(vec![clamp(x, lo, hi)?])
            })
        }
        "Cast" => {
            let to = match node.int("to") {
                Some(to) => dtype_of(to as i32),
                None => Err(node.bad("missing `to`")),
            };
            match to {
                Ok(to) => op(move |i| Ok(vec![input(i, 0, "Cast")?.to_dtype(to)?])),
                Err(e) => Err(e),
            }
        }
        _ => return None,
    })
}

/// Clamps in the tensor's own dtype (bounds may be infinite).
fn clamp(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor, NnError> {
    let lo_t = Tensor::new(lo, x.device())?.to_dtype(x.dtype())?;
    let hi_t = Tensor::new(hi, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_maximum(&lo_t)?.broadcast_minimum(&hi_t)?)
}

fn fold(i: &[Option<&Tensor>], f: Binary) -> Result<Tensor, NnError> {
    let mut it = i.iter().flatten();
    let first = it.next().ok_or_else(|| NnError::invalid_argument("no inputs"))?;
    let mut acc = (*first).clone();
    for t in it {
        acc = f(&acc, t)?;
    }
    Ok(acc)
}

fn variadic(f: Binary) -> Built {
    op_sized(broadcast_bound(3), move |i| Ok(vec![fold(i, f)?]))
}

/// The bound of an operator that writes `copies` tensors of its inputs' broadcast shape.
pub(super) fn broadcast_bound(copies: u64) -> impl Fn(&[Option<&Tensor>]) -> Result<u64, NnError> + Send + Sync {
    move |i| {
        let shapes: Vec<&[usize]> = i.iter().flatten().map(|t| t.dims()).collect();
        wide(count(&broadcast_shape(&shapes)?)?, copies)
    }
}

/// `Pow`, exact for negative bases with integral exponents (x², common in STFT magnitudes).
fn pow(i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
    let (x, y) = (input(i, 0, "Pow")?, input(i, 1, "Pow")?);
    if y.elem_count() == 1 {
        let e = scalar_f64(y)?;
        let out = if e == 2.0 {
            x.sqr()?
        } else if e == 1.0 {
            x.clone()
        } else if e == 0.5 {
            x.sqrt()?
        } else {
            x.powf(e)?
        };
        return Ok(vec![out]);
    }
    let shape = broadcast_shape(&[x.dims(), y.dims()])?;
    let dtype = x.dtype();
    let xs = x.broadcast_as(shape.as_slice())?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let ys = y.broadcast_as(shape.as_slice())?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let out: Vec<f64> = xs.iter().zip(&ys).map(|(a, b)| a.powf(*b)).collect();
    Ok(vec![Tensor::from_vec(out, shape, x.device())?.to_dtype(dtype)?])
}

/// `a + b` with numpy broadcasting, on the parallel f32 path where it applies.
pub(super) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor, NnError> {
    match Arith::Add.fast(a, b)? {
        Some(t) => Ok(t),
        None => Ok(a.broadcast_add(b)?),
    }
}

/// The numpy broadcast of several shapes.
pub(super) fn broadcast_shape(shapes: &[&[usize]]) -> Result<Vec<usize>, NnError> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        for (k, &d) in s.iter().rev().enumerate() {
            let o = &mut out[rank - 1 - k];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(NnError::invalid_argument(format!("shapes {shapes:?} do not broadcast")));
            }
        }
    }
    Ok(out)
}

/// The exact (erf) GELU: f32 on EIR's vectorised kernel in parallel rows (candle's runs libm's
/// scalar erf on one thread), other types on candle's.
pub(super) fn gelu_erf(x: &Tensor) -> Result<Tensor, NnError> {
    if x.dtype() == DType::F32 {
        let v = super::with_f32(x, |x| map_rows(x, 1, |c| act::activate(c, Act::Gelu)))??;
        return Ok(Tensor::from_vec(v, x.dims(), x.device())?);
    }
    Ok(x.gelu_erf()?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The f32 fast path computes what candle's broadcasting does, element for element, in
    /// either operand order, on shapes small and large enough to run in parallel; shapes it
    /// does not take are left to candle.
    #[test]
    fn fast_arithmetic_matches_candle_broadcasting() {
        let dev = Device::Cpu;
        let t = |dims: &[usize], seed: usize| {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i * 7 + seed * 13) % 23) as f32 / 4.0 - 2.6).collect();
            Tensor::from_vec(v, dims, &dev).unwrap()
        };
        let pairs: [(&[usize], &[usize]); 7] = [
            (&[4, 5], &[4, 5]),
            (&[3, 7], &[7]),
            (&[2, 300, 384], &[384]),
            (&[2, 300, 384], &[1, 1, 384]),
            (&[300, 384], &[300, 384]),
            (&[5, 6], &[1]),
            (&[70_000], &[]),
        ];
        let ops: [(Arith, Binary); 4] = [
            (Arith::Add, Tensor::broadcast_add),
            (Arith::Sub, Tensor::broadcast_sub),
            (Arith::Mul, Tensor::broadcast_mul),
            (Arith::Div, Tensor::broadcast_div),
        ];
        for (da, db) in pairs {
            let (a, b) = (t(da, 1), t(db, 2));
            for (arith, reference) in ops {
                for (x, y) in [(&a, &b), (&b, &a)] {
                    let got = arith.fast(x, y).unwrap().unwrap_or_else(|| panic!("{arith:?} {da:?} {db:?} not taken"));
                    let want = reference(x, y).unwrap();
                    assert_eq!(got.dims(), want.dims(), "{arith:?} {:?} {:?}", x.dims(), y.dims());
                    let (got, want) = (
                        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    );
                    assert!(
                        got.iter().zip(&want).all(|(g, w)| g == w || (g.is_nan() && w.is_nan())),
                        "{arith:?} {:?} {:?}",
                        x.dims(),
                        y.dims()
                    );
                }
            }
        }
        // Broadcasting along an inner axis, and integers, stay with candle.
        assert!(Arith::Add.fast(&t(&[3, 4], 1), &t(&[3, 1], 2)).unwrap().is_none());
        let ints = Tensor::new(&[1i64, 2], &dev).unwrap();
        assert!(Arith::Mul.fast(&ints, &ints).unwrap().is_none());
    }
}

#[cfg(test)]
mod timing {
    use candle_core::Device;

    use super::*;

    /// Not a test: `cargo test -p eir --lib elementwise::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn arithmetic_timings() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (1024, 1536), &dev).unwrap();
        for b in [Tensor::randn(0f32, 1.0, 1536, &dev).unwrap(), Tensor::new(0.5f32, &dev).unwrap(), a.clone()] {
            let time = |f: &dyn Fn() -> Tensor| {
                f();
                let t = std::time::Instant::now();
                for _ in 0..50 {
                    std::hint::black_box(f());
                }
                t.elapsed() / 50
            };
            let ours = rayon::scope(|_| time(&|| Arith::Add.fast(&a, &b).unwrap().unwrap()));
            let candle = rayon::scope(|_| time(&|| a.broadcast_add(&b).unwrap()));
            let erf = rayon::scope(|_| {
                time(&|| {
                    let v = super::super::with_f32(&a, |x| map_rows(x, 1, |c| act::activate(c, Act::Erf)))
                        .unwrap()
                        .unwrap();
                    Tensor::from_vec(v, a.dims(), &dev).unwrap()
                })
            });
            let copy = rayon::scope(|_| {
                time(&|| {
                    Tensor::from_vec(super::super::with_f32(&a, <[f32]>::to_vec).unwrap(), a.dims(), &dev).unwrap()
                })
            });
            let serial = time(&|| Arith::Add.fast(&a, &b).unwrap().unwrap());
            eprintln!(
                "{:?} + {:?}: ours {ours:?} (off the pool {serial:?}), candle {candle:?}; erf {erf:?}; copy {copy:?}",
                a.dims(),
                b.dims()
            );
        }
    }
}
