//! Shape and indexing operators: reshape, transpose, slicing, gathering, concatenation,
//! padding, and the small integer computations exporters emit around them.

use candle_core::{Device, Tensor};

use super::super::tensor::from_proto;
use super::elementwise::broadcast_shape;
use super::{Built, Node, axis, count, i64s, input, op, op_sized, wide};
use crate::nn::error::NnError;

pub(super) fn build(name: &str, node: &Node<'_>) -> Option<Built> {
    let opset = node.opset;
    Some(match name {
        "Reshape" => {
            let allowzero = node.int_or("allowzero", 0) != 0;
            op(move |i| {
                let x = input(i, 0, "Reshape")?;
                let spec = i64s(input(i, 1, "Reshape")?)?;
                Ok(vec![x.reshape(infer_shape(x.dims(), &spec, allowzero)?)?])
            })
        }
        "Transpose" => {
            let perm = node.ints("perm");
            op(move |i| {
                let x = input(i, 0, "Transpose")?;
                let perm: Vec<usize> = match &perm {
                    Some(p) => p.iter().map(|&a| axis(a, x.rank())).collect::<Result<_, _>>()?,
                    None => (0..x.rank()).rev().collect(),
                };
                let mut seen = vec![false; x.rank()];
                if perm.len() != x.rank() || perm.iter().any(|&a| std::mem::replace(&mut seen[a], true)) {
                    return Err(NnError::invalid_argument(format!(
                        "Transpose: perm {perm:?} is not a permutation of {} axes",
                        x.rank()
                    )));
                }
                Ok(vec![x.permute(perm)?])
            })
        }
        "Squeeze" | "Unsqueeze" => {
            let squeeze = name == "Squeeze";
            let attr = node.ints("axes");
            op(move |i| {
                let x = input(i, 0, "Squeeze")?;
                let axes = match (i.get(1).copied().flatten(), &attr) {
                    (Some(t), _) => Some(i64s(t)?),
                    (None, Some(a)) => Some(a.clone()),
                    (None, None) => None,
                };
                Ok(vec![if squeeze { squeeze_axes(x, axes)? } else { unsqueeze_axes(x, &axes.unwrap_or_default())? }])
            })
        }
        "Concat" => {
            let ax = node.int_or("axis", 0);
            op(move |i| {
                let parts: Vec<&Tensor> = i.iter().flatten().copied().collect();
                let first = parts.first().ok_or_else(|| NnError::invalid_argument("Concat without inputs"))?;
                let a = axis(ax, first.rank())?;
                // Exporters concatenate empty placeholders; candle wants them gone.
                let parts: Vec<&Tensor> =
                    parts.iter().copied().filter(|t| t.elem_count() > 0 || t.rank() != first.rank()).collect();
                match parts.len() {
                    0 => Ok(vec![(*first).clone()]),
                    _ => Ok(vec![Tensor::cat(&parts, a)?]),
                }
            })
        }
        "Slice" => {
            // Before opset 10 starts/ends/axes are attributes.
            let attrs = (opset < 10).then(|| (node.ints("starts"), node.ints("ends"), node.ints("axes")));
            op(move |i| {
                let x = input(i, 0, "Slice")?;
                let (starts, ends, axes, steps) = match &attrs {
                    Some((s, e, a)) => (s.clone().unwrap_or_default(), e.clone().unwrap_or_default(), a.clone(), None),
                    None => (
                        i64s(input(i, 1, "Slice")?)?,
                        i64s(input(i, 2, "Slice")?)?,
                        i.get(3).copied().flatten().map(i64s).transpose()?,
                        i.get(4).copied().flatten().map(i64s).transpose()?,
                    ),
                };
                Ok(vec![slice(x, &starts, &ends, axes, steps)?])
            })
        }
        "Gather" => {
            let ax = node.int_or("axis", 0);
            op_sized(
                move |i| {
                    let (data, idx) = (input(i, 0, "Gather")?, input(i, 1, "Gather")?);
                    let a = axis(ax, data.rank())?;
                    let row = count(&data.dims()[a + 1..])?.saturating_mul(count(&data.dims()[..a])?);
                    wide(count(idx.dims())?.saturating_mul(row.max(1)).saturating_add(count(idx.dims())?), 2)
                },
                move |i| Ok(vec![gather(input(i, 0, "Gather")?, input(i, 1, "Gather")?, ax)?]),
            )
        }
        "GatherND" => {
            let batch = node.int_or("batch_dims", 0).max(0) as usize;
            op_sized(
                move |i| {
                    let (data, idx) = (input(i, 0, "GatherND")?, input(i, 1, "GatherND")?);
                    let k = idx.dims().last().copied().unwrap_or(0);
                    let tail = data.dims().get(batch.saturating_add(k)..).map_or(Ok(1), count)?;
                    wide(count(idx.dims())?.saturating_mul(tail.max(1)), 3)
                },
                move |i| Ok(vec![gather_nd(input(i, 0, "GatherND")?, input(i, 1, "GatherND")?, batch)?]),
            )
        }
        "Shape" => {
            let (start, end) = (node.int("start"), node.int("end"));
            // One value per axis, however few elements (a `[1, 1, 1]` input makes 3).
            op_sized(
                |i| wide(input(i, 0, "Shape")?.rank() as u64, 1),
                move |i| {
                    let dims: Vec<i64> = input(i, 0, "Shape")?.dims().iter().map(|&d| d as i64).collect();
                    let r = dims.len() as i64;
                    let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                    let (s, e) = (clampi(start.unwrap_or(0)), clampi(end.unwrap_or(r)));
                    let part = if s < e { dims[s..e].to_vec() } else { vec![] };
                    let n = part.len();
                    Ok(vec![Tensor::from_vec(part, n, &Device::Cpu)?])
                },
            )
        }
        // One value, even for an empty input.
        "Size" => {
            op_sized(|_| wide(1, 1), |i| Ok(vec![Tensor::new(input(i, 0, "Size")?.elem_count() as i64, &Device::Cpu)?]))
        }
        "Expand" => op_sized(
            |i| wide(count(&expand_shape(input(i, 0, "Expand")?, input(i, 1, "Expand")?)?)?, 1),
            |i| {
                let x = input(i, 0, "Expand")?;
                Ok(vec![x.broadcast_as(expand_shape(x, input(i, 1, "Expand")?)?)?])
            },
        ),
        "ConstantOfShape" => {
            let value = node.tensor("value").transpose();
            match value {
                Err(e) => Err(e),
                Ok(value) => {
                    let value = value.unwrap_or(match Tensor::new(&[0f32], &Device::Cpu) {
                        Ok(t) => t,
                        Err(e) => return Some(Err(e.into())),
                    });
                    op_sized(
                        |i| wide(count(&dims_of(input(i, 0, "ConstantOfShape")?)?)?, 1),
                        move |i| {
                            let dims = dims_of(input(i, 0, "ConstantOfShape")?)?;
                            Ok(vec![value.flatten_all()?.reshape(())?.broadcast_as(dims)?.contiguous()?])
                        },
                    )
                }
            }
        }
        "Range" => op_sized(
            |i| wide(range(i)?.3 as u64, 2),
            |i| {
                let (start, s, d, n) = range(i)?;
                let v: Vec<f64> = (0..n).map(|k| s + k as f64 * d).collect();
                Ok(vec![Tensor::from_vec(v, n, &Device::Cpu)?.to_dtype(start.dtype())?])
            },
        ),
        "Split" => {
            let ax = node.int_or("axis", 0);
            let attr = node.ints("split");
            let outputs = node.proto.output.len();
            op(move |i| {
                let x = input(i, 0, "Split")?;
                let a = axis(ax, x.rank())?;
                let len = x.dims()[a];
                let sizes: Vec<usize> = match (i.get(1).copied().flatten(), &attr) {
                    (Some(t), _) => i64s(t)?.iter().map(|&s| s.max(0) as usize).collect(),
                    (None, Some(s)) => s.iter().map(|&s| s.max(0) as usize).collect(),
                    (None, None) => {
                        let each = len.div_ceil(outputs.max(1));
                        (0..outputs).map(|k| each.min(len.saturating_sub(k * each))).collect()
                    }
                };
                if sizes.iter().try_fold(0usize, |a, &s| a.checked_add(s)) != Some(len) {
                    return Err(NnError::invalid_argument(format!("Split sizes {sizes:?} do not add up to {len}")));
                }
                let mut start = 0;
                let mut out = Vec::with_capacity(sizes.len());
                for s in sizes {
                    out.push(x.narrow(a, start, s)?);
                    start += s;
                }
                Ok(out)
            })
        }
        "Tile" => op_sized(
            |i| {
                let x = input(i, 0, "Tile")?;
                let reps = dims_of(input(i, 1, "Tile")?)?;
                if reps.len() != x.rank() {
                    return Err(NnError::invalid_argument(format!(
                        "Tile: {} repeats for rank {}",
                        reps.len(),
                        x.rank()
                    )));
                }
                wide(
                    count(x.dims())?.checked_mul(count(&reps)?).ok_or_else(|| NnError::too_large("Tile overflows"))?,
                    2,
                )
            },
            |i| {
                let x = input(i, 0, "Tile")?;
                let reps = dims_of(input(i, 1, "Tile")?)?;
                let out: Vec<usize> = x.dims().iter().zip(&reps).map(|(&d, &r)| d.saturating_mul(r)).collect();
                if out.contains(&0) {
                    // An empty result: candle's repeat would still list every repetition, and
                    // a repeat count is unbounded when another axis is empty.
                    return Ok(vec![Tensor::zeros(out, x.dtype(), x.device())?]);
                }
                Ok(vec![x.repeat(reps)?])
            },
        ),
        "Pad" => Pad::build(node),
        _ => return None,
    })
}

/// A shape read from a tensor of a model's or request's numbers: negative dimensions are 0
/// (ONNX's ConstantOfShape/Tile/Expand take none; exporters emit none).
fn dims_of(t: &Tensor) -> Result<Vec<usize>, NnError> {
    i64s(t)?
        .iter()
        .map(|&d| usize::try_from(d.max(0)).map_err(|_| NnError::too_large("a dimension over usize")))
        .collect()
}

/// Expand's output shape: the broadcast of `x`'s shape and the requested one.
fn expand_shape(x: &Tensor, want: &Tensor) -> Result<Vec<usize>, NnError> {
    broadcast_shape(&[x.dims(), &dims_of(want)?])
}

/// Range's (start tensor, start, delta, length), the length checked to be finite and to fit.
fn range<'a>(i: &[Option<&'a Tensor>]) -> Result<(&'a Tensor, f64, f64, usize), NnError> {
    let start = input(i, 0, "Range")?;
    let f = |t: &Tensor| -> Result<f64, NnError> { super::scalar_f64(t) };
    let (s, l, d) = (f(start)?, f(input(i, 1, "Range")?)?, f(input(i, 2, "Range")?)?);
    if d == 0.0 || !s.is_finite() || !l.is_finite() || !d.is_finite() {
        return Err(NnError::invalid_argument(format!(
            "Range({s}, {l}, {d}): needs finite bounds and a delta other than 0"
        )));
    }
    let n = ((l - s) / d).ceil().max(0.0);
    if n > (1u64 << 40) as f64 {
        return Err(NnError::too_large(format!("Range of {n} elements")));
    }
    Ok((start, s, d, n as usize))
}

/// Reshape's target: 0 copies the input dimension (unless `allowzero`), -1 is inferred.
fn infer_shape(dims: &[usize], spec: &[i64], allowzero: bool) -> Result<Vec<usize>, NnError> {
    let too_big = || NnError::too_large(format!("Reshape to {spec:?} does not fit in memory"));
    let total = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(too_big)?;
    let mut out = Vec::with_capacity(spec.len());
    let mut hole = None;
    for (k, &s) in spec.iter().enumerate() {
        match s {
            -1 if hole.is_none() => {
                hole = Some(k);
                out.push(1);
            }
            0 if !allowzero => {
                out.push(*dims.get(k).ok_or_else(|| NnError::invalid_argument("Reshape: 0 beyond the input rank"))?)
            }
            s if s >= 0 => out.push(usize::try_from(s).map_err(|_| too_big())?),
            _ => return Err(NnError::invalid_argument(format!("Reshape: bad target {spec:?}"))),
        }
    }
    let known = out.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(too_big)?;
    if let Some(k) = hole {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(NnError::invalid_argument(format!("Reshape: cannot infer {spec:?} from {dims:?}")));
        }
        out[k] = total / known;
    } else if known != total {
        return Err(NnError::invalid_argument(format!("Reshape: {dims:?} does not fit {spec:?}")));
    }
    Ok(out)
}

fn squeeze_axes(x: &Tensor, axes: Option<Vec<i64>>) -> Result<Tensor, NnError> {
    let rank = x.rank();
    let drop: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&a| axis(a, rank)).collect::<Result<_, _>>()?,
        None => (0..rank).filter(|&d| x.dims()[d] == 1).collect(),
    };
    let dims: Vec<usize> = x.dims().iter().enumerate().filter(|(d, _)| !drop.contains(d)).map(|(_, &n)| n).collect();
    Ok(x.reshape(dims)?)
}

fn unsqueeze_axes(x: &Tensor, axes: &[i64]) -> Result<Tensor, NnError> {
    let rank = x.rank() + axes.len();
    let mut at: Vec<usize> = axes.iter().map(|&a| axis(a, rank)).collect::<Result<_, _>>()?;
    at.sort_unstable();
    let mut dims = x.dims().to_vec();
    for a in at {
        dims.insert(a.min(dims.len()), 1);
    }
    Ok(x.reshape(dims)?)
}

fn slice(
    x: &Tensor,
    starts: &[i64],
    ends: &[i64],
    axes: Option<Vec<i64>>,
    steps: Option<Vec<i64>>,
) -> Result<Tensor, NnError> {
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(NnError::invalid_argument("Slice: starts, ends, axes and steps differ in length"));
    }
    let mut y = x.clone();
    for k in 0..starts.len() {
        let a = axis(axes[k], x.rank())?;
        let len = x.dims()[a] as i64;
        let step = steps[k];
        if step == 0 {
            return Err(NnError::invalid_argument("Slice step 0"));
        }
        let norm = |v: i64| if v < 0 { v.saturating_add(len) } else { v };
        let (s, e) = (norm(starts[k]), norm(ends[k]));
        let idx: Vec<i64> = if step > 0 {
            let (s, e) = (s.clamp(0, len), e.clamp(0, len));
            if step == 1 {
                y = y.narrow(a, s as usize, (e - s).max(0) as usize)?;
                continue;
            }
            (s..e).step_by(step as usize).collect()
        } else {
            let (s, e) = (s.clamp(-1, len - 1), e.clamp(-1, len - 1));
            let mut v = Vec::new();
            let mut i = s;
            while i > e {
                v.push(i);
                i += step;
            }
            v
        };
        let n = idx.len();
        y = y.index_select(&Tensor::from_vec(idx, n, &Device::Cpu)?, a)?;
    }
    Ok(y)
}

fn gather(data: &Tensor, indices: &Tensor, ax: i64) -> Result<Tensor, NnError> {
    let a = axis(ax, data.rank())?;
    let len = data.dims()[a] as i64;
    let raw = i64s(indices)?;
    let fixed: Vec<i64> = raw
        .iter()
        .map(|&v| {
            let v = if v < 0 { v + len } else { v };
            if v < 0 || v >= len {
                Err(NnError::invalid_argument(format!("Gather index {v} out of 0..{len}")))
            } else {
                Ok(v)
            }
        })
        .collect::<Result<_, _>>()?;
    let n = fixed.len();
    let picked = data.index_select(&Tensor::from_vec(fixed, n, &Device::Cpu)?, a)?;
    let mut dims = data.dims()[..a].to_vec();
    dims.extend_from_slice(indices.dims());
    dims.extend_from_slice(&data.dims()[a + 1..]);
    Ok(picked.reshape(dims)?)
}

fn gather_nd(data: &Tensor, indices: &Tensor, batch: usize) -> Result<Tensor, NnError> {
    let k = *indices.dims().last().ok_or_else(|| NnError::invalid_argument("GatherND: scalar indices"))?;
    if batch + k > data.rank() || batch >= indices.rank() {
        return Err(NnError::invalid_argument("GatherND: indices do not fit the data"));
    }
    let bdims = &data.dims()[..batch];
    let b: usize = bdims.iter().product();
    let idx_dims = &data.dims()[batch..batch + k];
    let tail: Vec<usize> = data.dims()[batch + k..].to_vec();
    let tail_n: usize = tail.iter().product();
    let rows: usize = idx_dims.iter().product();
    // data as [batch * rows, tail]; each index tuple becomes one row number.
    let flat = data.reshape((b * rows, tail_n))?;
    let ind = i64s(indices)?;
    let per_batch = ind.len() / b.max(1) / k.max(1);
    let mut picks = Vec::with_capacity(ind.len() / k.max(1));
    for (t, tuple) in ind.chunks(k.max(1)).enumerate() {
        let mut row = 0i64;
        for (j, &v) in tuple.iter().enumerate() {
            let n = idx_dims[j] as i64;
            let v = if v < 0 { v + n } else { v };
            if v < 0 || v >= n {
                return Err(NnError::invalid_argument(format!("GatherND index {v} out of 0..{n}")));
            }
            row = row * n + v;
        }
        picks.push((t / per_batch.max(1)) as i64 * rows as i64 + row);
    }
    let n = picks.len();
    let out = flat.index_select(&Tensor::from_vec(picks, n, &Device::Cpu)?, 0)?;
    let mut dims = indices.dims()[..indices.rank() - 1].to_vec();
    dims.extend(tail);
    Ok(out.reshape(dims)?)
}

/// `Pad` in constant, reflect or edge mode; negative pads crop.
struct Pad {
    mode: String,
    attr_pads: Option<Vec<i64>>,
    attr_value: f32,
}

impl Pad {
    fn build(node: &Node<'_>) -> Built {
        let mode = node.string("mode").unwrap_or_else(|| "constant".into());
        if !matches!(mode.as_str(), "constant" | "reflect" | "edge") {
            return Err(NnError::unsupported(format!("Pad mode `{mode}`")));
        }
        Ok(Box::new(Pad { mode, attr_pads: node.ints("pads"), attr_value: node.float_or("value", 0.0) }))
    }
}

impl Pad {
    /// The most elements any tensor along the way holds: the axes are padded one after the
    /// other (each cropped by its negative pads, then grown by its positive ones), so an axis
    /// grown early can be huge even when a later axis crops the result to nothing.
    fn largest(&self, i: &[Option<&Tensor>]) -> Result<u64, NnError> {
        let x = input(i, 0, "Pad")?;
        let (pads, axes) = self.pads(i)?;
        let mut dims = x.dims().to_vec();
        let mut largest = count(&dims)?;
        for (k, &a) in axes.iter().enumerate() {
            let (before, after) = (i128::from(pads[k]), i128::from(pads[k + axes.len()]));
            let cropped = (dims[a] as i128 - (-before).max(0) - (-after).max(0)).max(0);
            let grown = cropped + before.max(0) + after.max(0);
            dims[a] = usize::try_from(grown).map_err(|_| NnError::too_large("Pad: the output does not fit"))?;
            largest = largest.max(count(&dims)?);
        }
        Ok(largest)
    }

    fn pads(&self, i: &[Option<&Tensor>]) -> Result<(Vec<i64>, Vec<usize>), NnError> {
        let x = input(i, 0, "Pad")?;
        let pads = match (i.get(1).copied().flatten(), &self.attr_pads) {
            (Some(t), _) => i64s(t)?,
            (None, Some(p)) => p.clone(),
            (None, None) => return Err(NnError::invalid_argument("Pad without pads")),
        };
        let axes: Vec<usize> = match i.get(3).copied().flatten() {
            Some(t) => i64s(t)?.iter().map(|&a| axis(a, x.rank())).collect::<Result<_, _>>()?,
            None => (0..x.rank()).collect(),
        };
        if pads.len() != 2 * axes.len() {
            return Err(NnError::invalid_argument(format!("Pad: {} pads for {} axes", pads.len(), axes.len())));
        }
        Ok((pads, axes))
    }
}

impl super::Op for Pad {
    fn bound(&self, i: &[Option<&Tensor>]) -> Result<u64, NnError> {
        // The largest step's result, its parts and the previous step's result.
        wide(self.largest(i)?, 3)
    }

    fn run(&self, i: &[Option<&Tensor>]) -> Result<Vec<Tensor>, NnError> {
        let x = input(i, 0, "Pad")?;
        let (pads, axes) = self.pads(i)?;
        let value = match i.get(2).copied().flatten() {
            Some(t) if t.elem_count() > 0 => super::scalar_f64(t)?,
            _ => f64::from(self.attr_value),
        };
        let mut y = x.clone();
        for (k, &a) in axes.iter().enumerate() {
            let (b, e) = (pads[k], pads[k + axes.len()]);
            y = pad_axis(&y, a, b, e, &self.mode, value)?;
        }
        Ok(vec![y])
    }
}

fn pad_axis(x: &Tensor, a: usize, before: i64, after: i64, mode: &str, value: f64) -> Result<Tensor, NnError> {
    let mut x = x.clone();
    // Negative pads crop first.
    if before < 0 || after < 0 {
        let len = x.dims()[a] as i64;
        let (s, e) = (before.saturating_neg().max(0), len.saturating_sub(after.saturating_neg().max(0)));
        x = x.narrow(a, s.min(len) as usize, e.saturating_sub(s).clamp(0, len - s.min(len)) as usize)?;
    }
    let (b, e) = (before.max(0) as usize, after.max(0) as usize);
    if b == 0 && e == 0 {
        return Ok(x);
    }
    let len = x.dims()[a];
    match mode {
        "constant" if value == 0.0 => Ok(x.pad_with_zeros(a, b, e)?),
        "constant" => {
            let part = |n: usize| -> Result<Tensor, NnError> {
                let mut dims = x.dims().to_vec();
                dims[a] = n;
                Ok(Tensor::full(value, dims, x.device())?.to_dtype(x.dtype())?)
            };
            Ok(Tensor::cat(&[&part(b)?, &x, &part(e)?], a)?)
        }
        "edge" => Ok(x.pad_with_same(a, b, e)?),
        _ => {
            // reflect: mirror without repeating the edge element.
            if len < 2 || b >= len || e >= len {
                return Err(NnError::invalid_argument(format!("Pad reflect of {b}+{e} on an axis of {len}")));
            }
            let mut idx: Vec<i64> = (1..=b as i64).rev().collect();
            idx.extend(0..len as i64);
            idx.extend((len as i64 - 1 - e as i64..len as i64 - 1).rev());
            let n = idx.len();
            Ok(x.index_select(&Tensor::from_vec(idx, n, &Device::Cpu)?, a)?)
        }
    }
}

/// The value of a `Constant` node's attribute.
pub(super) fn constant_attr(node: &Node<'_>) -> Result<Tensor, NnError> {
    let dev = &Device::Cpu;
    for a in &node.proto.attribute {
        let t = match a.name.as_str() {
            "value" => a.t.as_ref().map(from_proto).transpose()?,
            "value_float" => Some(Tensor::new(a.f, dev)?),
            "value_floats" => Some(Tensor::new(a.floats.as_slice(), dev)?),
            "value_int" => Some(Tensor::new(a.i, dev)?),
            "value_ints" => Some(Tensor::new(a.ints.as_slice(), dev)?),
            _ => None,
        };
        if let Some(t) = t {
            return Ok(t);
        }
    }
    Err(node.bad("a Constant needs value, value_float(s) or value_int(s)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_infers_and_copies() {
        assert_eq!(infer_shape(&[2, 3, 4], &[0, -1], false).unwrap(), vec![2, 12]);
        assert_eq!(infer_shape(&[2, 3, 4], &[4, 0, 2], false).unwrap(), vec![4, 3, 2]);
        assert!(infer_shape(&[2, 3], &[4, -1], false).is_err());
    }

    #[test]
    fn slicing_handles_negative_steps_and_clamps() {
        let x = Tensor::arange(0i64, 10, &Device::Cpu).unwrap();
        let y = slice(&x, &[-1], &[i64::MIN], None, Some(vec![-2])).unwrap();
        assert_eq!(y.to_vec1::<i64>().unwrap(), vec![9, 7, 5, 3, 1]);
        let y = slice(&x, &[2], &[100], None, Some(vec![3])).unwrap();
        assert_eq!(y.to_vec1::<i64>().unwrap(), vec![2, 5, 8]);
    }

    #[test]
    fn reflect_padding_mirrors() {
        let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu).unwrap();
        let y = pad_axis(&x, 0, 2, 1, "reflect", 0.0).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![3., 2., 1., 2., 3., 4., 3.]);
        let y = pad_axis(&x, 0, 1, -2, "constant", 9.0).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![9., 1., 2.]);
    }

    #[test]
    fn gather_nd_picks_rows() {
        let data = Tensor::arange(0f32, 8., &Device::Cpu).unwrap().reshape((2, 2, 2)).unwrap();
        let idx = Tensor::new(&[[0i64, 1], [1, 0]], &Device::Cpu).unwrap();
        let y = gather_nd(&data, &idx, 0).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![2., 3.], vec![4., 5.]]);
    }
}
