//! Element-wise operators: arithmetic and comparison with numpy broadcasting, activations,
//! casts.

use candle_core::{DType, Tensor};

use super::super::tensor::dtype_of;
use super::{Built, Node, count, input, op, op_sized, scalar_f64, wide};
use crate::nn::error::NnError;

type Binary = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;

pub(super) fn build(name: &str, node: &Node<'_>) -> Option<Built> {
    let binary = |f: Binary| -> Built {
        let name = node.proto.op_type.clone();
        op_sized(broadcast_bound(2), move |i| Ok(vec![f(input(i, 0, &name)?, input(i, 1, &name)?)?]))
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
        "Erf" => unary(Tensor::erf),
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
                "none" => unary(Tensor::gelu_erf),
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
