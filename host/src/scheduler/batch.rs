//! One pass from several callers' inputs, and each caller's rows back out of its outputs.
//!
//! Only what a model's [`BatchSpec`] says is used: which inputs and outputs carry rows along
//! dimension 0, which have a sequence along dimension 1 (padded with zeros to the longest
//! row), and which input is the attention mask. Callers whose inputs differ in anything else
//! (names, types, other dimensions) never share a pass. Sequence lengths are bucketed by
//! powers of two, so a 500-token text never pads 31 ten-token ones to 500.

use crate::nn::backend::{BatchSpec, Named};
use crate::nn::bindings::tensor::TensorType;
use crate::nn::tensor::{HostTensor, element_size};

/// Shortest sequence bucket: rows up to this many tokens all batch together.
const MIN_BUCKET: usize = 16;

/// What a caller's inputs look like to the batcher.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    key: Key,
    /// Rows it brings.
    pub rows: usize,
    /// Its sequence length (0 without sequence inputs).
    pub seq: usize,
}

/// Callers with equal keys may share a pass.
#[derive(Clone, Debug, PartialEq)]
struct Key {
    /// Each input's name, type and dimensions after the batch (and sequence) dimension.
    inputs: Vec<(String, TensorType, Vec<u32>)>,
    /// The sequence bucket (0 without sequence inputs; the exact length when padding could
    /// not be masked).
    bucket: usize,
}

impl Shape {
    /// Whether `self` and `other` may share a pass.
    pub fn compatible(&self, other: &Shape) -> bool {
        self.key == other.key
    }

    /// Tokens (rows × sequence, or rows) it brings: the unit work is estimated and charged in.
    pub fn units(&self) -> u64 {
        (self.rows as u64).saturating_mul(self.seq.max(1) as u64)
    }
}

/// How a caller's inputs batch under `spec`, or `None` when they cannot (an input the spec
/// does not know, too few dimensions, rows or sequence lengths that disagree, an empty batch):
/// such a caller runs alone and the backend reports what is wrong with its inputs.
pub fn shape_of(spec: &BatchSpec, inputs: &Named) -> Option<Shape> {
    let mut rows = None;
    let mut seq = None;
    let mut key = Vec::with_capacity(inputs.len());
    for (name, t) in inputs {
        let &(_, sequence) = spec.inputs.iter().find(|(n, _)| n == name)?;
        let dims = t.dims();
        let skip = if sequence { 2 } else { 1 };
        if dims.len() < skip || key.iter().any(|(n, _, _): &(String, _, _)| n == name) {
            return None;
        }
        if *rows.get_or_insert(dims[0]) != dims[0] {
            return None;
        }
        if sequence && *seq.get_or_insert(dims[1]) != dims[1] {
            return None;
        }
        key.push((name.clone(), t.ty(), dims[skip..].to_vec()));
    }
    let rows = rows.filter(|&r| r > 0)? as usize;
    let seq = seq.unwrap_or(0) as usize;
    key.sort_by(|a, b| a.0.cmp(&b.0));
    // Padding is safe only where it can be masked: the caller sent the mask, or the batcher
    // can write one (integer sequence inputs).
    let maskable = spec.mask.as_ref().is_some_and(|m| {
        key.iter().any(|(n, _, _)| n == m)
            || key.iter().any(|(n, ty, _)| {
                spec.inputs.iter().any(|(i, s)| i == n && *s) && matches!(ty, TensorType::I64 | TensorType::I32)
            })
    });
    let bucket = match seq {
        0 => 0,
        s if maskable => s.next_power_of_two().max(MIN_BUCKET),
        s => s,
    };
    Some(Shape { key: Key { inputs: key, bucket }, rows, seq })
}

/// Where each caller's rows sit in a merged pass.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Each caller's (rows, sequence length), in merge order.
    parts: Vec<(usize, usize)>,
    /// The padded sequence length (0 without sequence inputs).
    pub seq: usize,
}

impl Layout {
    /// Rows of the merged pass.
    pub fn rows(&self) -> usize {
        self.parts.iter().map(|p| p.0).sum()
    }

    /// Padding tokens the pass computes beyond the callers' own.
    pub fn padding(&self) -> u64 {
        self.parts.iter().map(|&(r, s)| (r as u64) * (self.seq.saturating_sub(s)) as u64).sum()
    }

    /// Row ranges of each caller, in merge order.
    pub fn ranges(&self) -> Vec<std::ops::Range<usize>> {
        let mut at = 0;
        self.parts
            .iter()
            .map(|&(r, _)| {
                at += r;
                at - r..at
            })
            .collect()
    }
}

/// Merges callers' inputs (all with compatible [`Shape`]s under `spec`) into one pass.
pub fn merge(spec: &BatchSpec, calls: &[(&Named, &Shape)]) -> Result<(Named, Layout), String> {
    let seq = calls.iter().map(|(_, s)| s.seq).max().unwrap_or(0);
    let layout = Layout { parts: calls.iter().map(|(_, s)| (s.rows, s.seq)).collect(), seq };
    let rows = layout.rows();
    let padded = calls.iter().any(|(_, s)| s.seq != seq);
    let Some((first, _)) = calls.first() else { return Err("no calls to merge".into()) };
    let mut names: Vec<(String, TensorType, bool)> =
        first.iter().map(|(n, t)| (n.clone(), t.ty(), spec.inputs.iter().any(|(i, s)| i == n && *s))).collect();
    // Padded rows need a mask: written as ones over each caller's tokens when none was sent.
    let write_mask = match &spec.mask {
        Some(m) if padded && !names.iter().any(|(n, _, _)| n == m) => {
            let ty = names
                .iter()
                .find(|(_, ty, s)| *s && matches!(ty, TensorType::I64 | TensorType::I32))
                .map(|(_, ty, _)| *ty)
                .ok_or("padding without a mask")?;
            names.push((m.clone(), ty, true));
            Some(m.clone())
        }
        _ => None,
    };
    let mut merged = Vec::with_capacity(names.len());
    for (name, ty, sequence) in names {
        let elem = element_size(ty);
        let mut data = Vec::new();
        let mut inner_dims: Option<Vec<u32>> = None;
        for &(inputs, shape) in calls {
            let (dims, bytes) = match inputs.iter().find(|(n, _)| *n == name) {
                Some((_, t)) => (t.dims().to_vec(), Some(t.data())),
                None if write_mask.as_deref() == Some(name.as_str()) => {
                    (vec![shape.rows as u32, shape.seq as u32], None)
                }
                None => return Err(format!("input `{name}` is missing from one call")),
            };
            let skip = if sequence { 2 } else { 1 };
            let inner = dims.get(skip..).ok_or("too few dimensions")?;
            let inner_elems: usize = inner.iter().map(|&d| d as usize).product();
            inner_dims.get_or_insert_with(|| inner.to_vec());
            if !sequence {
                data.extend_from_slice(bytes.ok_or("a mask is a sequence input")?);
                continue;
            }
            let row = shape.seq * inner_elems * elem;
            let pad = (seq - shape.seq) * inner_elems * elem;
            for r in 0..shape.rows {
                match bytes {
                    Some(b) => data.extend_from_slice(b.get(r * row..(r + 1) * row).ok_or("a row out of range")?),
                    None => {
                        let one: &[u8] = if ty == TensorType::I64 { &1i64.to_le_bytes() } else { &1i32.to_le_bytes() };
                        for _ in 0..shape.seq {
                            data.extend_from_slice(one);
                        }
                    }
                }
                data.resize(data.len() + pad, 0);
            }
        }
        let mut dims = vec![u32::try_from(rows).map_err(|_| "too many rows")?];
        if sequence {
            dims.push(u32::try_from(seq).map_err(|_| "sequence too long")?);
        }
        dims.extend(inner_dims.unwrap_or_default());
        merged.push((name, HostTensor::new(dims, ty, data).map_err(|e| e.message)?));
    }
    Ok((merged, layout))
}

/// Cuts each caller's rows (and sequence length) out of a merged pass's outputs, in merge
/// order. An output that does not have the merged rows (or sequence) is an error: the model
/// does not batch the way its spec says, and the callers must run alone.
pub fn split(spec: &BatchSpec, outputs: Named, layout: &Layout) -> Result<Vec<Named>, String> {
    let rows = layout.rows();
    let mut each: Vec<Named> = layout.parts.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
    for (name, t) in outputs {
        let sequence = spec
            .outputs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .ok_or_else(|| format!("output `{name}` is not in the batch spec"))?;
        let dims = t.dims();
        if dims.first().map(|&d| d as usize) != Some(rows) {
            return Err(format!("output `{name}` has dimensions {dims:?}, not {rows} rows"));
        }
        if sequence && dims.get(1).map(|&d| d as usize) != Some(layout.seq) {
            return Err(format!("output `{name}` has dimensions {dims:?}, not a sequence of {}", layout.seq));
        }
        let skip = if sequence { 2 } else { 1 };
        let elem = element_size(t.ty());
        let inner: usize = dims[skip..].iter().map(|&d| d as usize).product::<usize>() * elem;
        let row = inner * if sequence { layout.seq } else { 1 };
        let mut at = 0;
        for (k, &(r, s)) in layout.parts.iter().enumerate() {
            let mut data = Vec::with_capacity(r * if sequence { s * inner } else { row });
            for i in 0..r {
                let start = (at + i) * row;
                let len = if sequence { s * inner } else { row };
                data.extend_from_slice(t.data().get(start..start + len).ok_or("an output row out of range")?);
            }
            let mut d = vec![r as u32];
            if sequence {
                d.push(s as u32);
            }
            d.extend_from_slice(&dims[skip..]);
            each[k].push((name.clone(), HostTensor::new(d, t.ty(), data).map_err(|e| e.message)?));
            at += r;
        }
    }
    Ok(each)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(rows: &[&[i64]]) -> HostTensor {
        let seq = rows[0].len();
        let data = rows.iter().flat_map(|r| r.iter().flat_map(|v| v.to_le_bytes())).collect();
        HostTensor::new(vec![rows.len() as u32, seq as u32], TensorType::I64, data).unwrap()
    }

    fn bert() -> BatchSpec {
        BatchSpec {
            inputs: vec![("input_ids".into(), true), ("attention_mask".into(), true), ("token_type_ids".into(), true)],
            mask: Some("attention_mask".into()),
            outputs: vec![("hidden".into(), true)],
        }
    }

    fn values(t: &HostTensor) -> Vec<i64> {
        t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn sequences_pad_with_a_written_mask_and_split_back() {
        let spec = bert();
        let a = vec![("input_ids".to_string(), ids(&[&[101, 7, 102]]))];
        let b = vec![("input_ids".to_string(), ids(&[&[101, 8, 9, 10, 102], &[101, 1, 2, 3, 102]]))];
        let (sa, sb) = (shape_of(&spec, &a).unwrap(), shape_of(&spec, &b).unwrap());
        assert!(sa.compatible(&sb), "3 and 5 tokens share the first bucket");
        assert_eq!((sb.rows, sb.seq, sb.units()), (2, 5, 10));
        let (merged, layout) = merge(&spec, &[(&a, &sa), (&b, &sb)]).unwrap();
        assert_eq!(layout.rows(), 3);
        assert_eq!(layout.padding(), 2);
        assert_eq!(layout.ranges(), vec![0..1, 1..3]);
        let get = |n: &str| &merged.iter().find(|(m, _)| m == n).unwrap().1;
        assert_eq!(get("input_ids").dims(), &[3, 5]);
        assert_eq!(values(get("input_ids")), vec![101, 7, 102, 0, 0, 101, 8, 9, 10, 102, 101, 1, 2, 3, 102]);
        assert_eq!(values(get("attention_mask")), vec![1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]);

        // An output [rows, seq, 2]: each caller gets its rows at its own length.
        let out: Vec<u8> = (0..30u32).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let out = HostTensor::new(vec![3, 5, 2], TensorType::Fp32, out).unwrap();
        let parts = split(&spec, vec![("hidden".into(), out)], &layout).unwrap();
        assert_eq!(parts[0][0].1.dims(), &[1, 3, 2]);
        let floats = |t: &HostTensor| -> Vec<f32> {
            t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
        };
        assert_eq!(floats(&parts[0][0].1), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(parts[1][0].1.dims(), &[2, 5, 2]);
        assert_eq!(floats(&parts[1][0].1)[..2], [10.0, 11.0]);
    }

    #[test]
    fn callers_that_differ_do_not_share_a_pass() {
        let spec = bert();
        let short = vec![("input_ids".to_string(), ids(&[&[1; 10]]))];
        let long = vec![("input_ids".to_string(), ids(&[&[1; 300]]))];
        let with_mask =
            vec![("input_ids".to_string(), ids(&[&[1; 10]])), ("attention_mask".to_string(), ids(&[&[1; 10]]))];
        let s = shape_of(&spec, &short).unwrap();
        assert!(!s.compatible(&shape_of(&spec, &long).unwrap()), "10 and 300 tokens are in different buckets");
        assert!(!s.compatible(&shape_of(&spec, &with_mask).unwrap()), "different inputs");
        assert!(shape_of(&spec, &vec![("other".to_string(), ids(&[&[1]]))]).is_none(), "unknown inputs run alone");
        let ragged = vec![("input_ids".to_string(), ids(&[&[1; 4]])), ("attention_mask".to_string(), ids(&[&[1; 5]]))];
        assert!(shape_of(&spec, &ragged).is_none(), "disagreeing lengths run alone");
    }

    #[test]
    fn outputs_that_do_not_carry_the_rows_are_refused() {
        let spec = BatchSpec { inputs: vec![("x".into(), false)], mask: None, outputs: vec![("y".into(), false)] };
        let x = |n: u32| HostTensor::new(vec![n, 2], TensorType::Fp32, vec![0; n as usize * 8]).unwrap();
        let (one, two) = (vec![("x".to_string(), x(1))], vec![("x".to_string(), x(2))]);
        let (s1, s2) = (shape_of(&spec, &one).unwrap(), shape_of(&spec, &two).unwrap());
        let (merged, layout) = merge(&spec, &[(&one, &s1), (&two, &s2)]).unwrap();
        assert_eq!(merged[0].1.dims(), &[3, 2]);
        assert_eq!(layout.seq, 0);
        let pooled = HostTensor::new(vec![1, 2], TensorType::Fp32, vec![0; 8]).unwrap();
        assert!(split(&spec, vec![("y".into(), pooled)], &layout).unwrap_err().contains("not 3 rows"));
        let parts = split(&spec, vec![("y".into(), x(3))], &layout).unwrap();
        assert_eq!((parts[0][0].1.dims(), parts[1][0].1.dims()), (&[1u32, 2][..], &[2u32, 2][..]));
    }
}
