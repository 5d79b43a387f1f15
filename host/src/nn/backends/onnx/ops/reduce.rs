//! Reductions over axes (given as an attribute or, in newer opsets, an input) and arg-max/min.

use candle_core::{DType, Tensor};

use super::{Built, Node, axis, i64s, input, op};
use crate::nn::error::NnError;

#[derive(Clone, Copy)]
enum Kind {
    Mean,
    Sum,
    Max,
    Min,
    Prod,
    SumSquare,
    L2,
}

pub(super) fn build(name: &str, node: &Node<'_>) -> Option<Built> {
    let kind = match name {
        "ReduceMean" => Kind::Mean,
        "ReduceSum" => Kind::Sum,
        "ReduceMax" => Kind::Max,
        "ReduceMin" => Kind::Min,
        "ReduceProd" => Kind::Prod,
        "ReduceSumSquare" => Kind::SumSquare,
        "ReduceL2" => Kind::L2,
        "ArgMax" | "ArgMin" => {
            let max = name == "ArgMax";
            let (ax, keep) = (node.int_or("axis", 0), node.int_or("keepdims", 1) != 0);
            if node.int_or("select_last_index", 0) != 0 {
                return Some(Err(NnError::unsupported(format!("{name} with select_last_index"))));
            }
            return Some(op(move |i| {
                let x = input(i, 0, "ArgMax")?;
                let a = axis(ax, x.rank())?;
                let y = if max { x.argmax_keepdim(a)? } else { x.argmin_keepdim(a)? }.to_dtype(DType::I64)?;
                Ok(vec![if keep { y } else { y.squeeze(a)? }])
            }));
        }
        _ => return None,
    };
    let keep = node.int_or("keepdims", 1) != 0;
    let noop_empty = node.int_or("noop_with_empty_axes", 0) != 0;
    let attr_axes = node.ints("axes");
    Some(op(move |i| {
        let x = input(i, 0, "Reduce")?;
        let axes = match (i.get(1).copied().flatten(), &attr_axes) {
            (Some(t), _) => i64s(t)?,
            (None, Some(a)) => a.clone(),
            (None, None) => vec![],
        };
        if axes.is_empty() && noop_empty {
            return Ok(vec![x.clone()]);
        }
        let mut axes: Vec<usize> = if axes.is_empty() {
            (0..x.rank()).collect()
        } else {
            axes.iter().map(|&a| axis(a, x.rank())).collect::<Result<_, _>>()?
        };
        axes.sort_unstable();
        axes.dedup();
        let mut y = match kind {
            Kind::SumSquare | Kind::L2 => x.sqr()?,
            _ => x.clone(),
        };
        for &a in axes.iter().rev() {
            y = match kind {
                Kind::Mean => y.mean_keepdim(a)?,
                Kind::Sum | Kind::SumSquare | Kind::L2 => y.sum_keepdim(a)?,
                Kind::Max => y.max_keepdim(a)?,
                Kind::Min => y.min_keepdim(a)?,
                Kind::Prod => {
                    // candle has no product reduction: exp(sum(log|x|)) with the sign restored.
                    let v = y.to_dtype(DType::F64)?;
                    let mut dims = v.dims().to_vec();
                    let n = dims[a];
                    dims[a] = 1;
                    let moved = v.transpose(a, v.rank() - 1)?.contiguous()?;
                    let flat = moved.flatten_all()?.to_vec1::<f64>()?;
                    let prods: Vec<f64> = flat.chunks(n.max(1)).map(|c| c.iter().product()).collect();
                    let mut tdims = moved.dims().to_vec();
                    let last = tdims.len() - 1;
                    tdims[last] = 1;
                    Tensor::from_vec(prods, tdims, x.device())?.transpose(a, v.rank() - 1)?.to_dtype(x.dtype())?
                }
            };
        }
        if let Kind::L2 = kind {
            y = y.sqrt()?;
        }
        if !keep {
            for &a in axes.iter().rev() {
                y = y.squeeze(a)?;
            }
        }
        Ok(vec![y])
    }))
}
