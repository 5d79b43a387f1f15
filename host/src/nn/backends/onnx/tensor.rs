//! ONNX `TensorProto` (initializers, `Constant` values) to candle tensors, once, at load.

use candle_core::{DType, Device, Tensor};

use super::proto::TensorProto;
use super::proto::tensor_proto::DataType;
use crate::nn::error::NnError;

/// The candle dtype EIR uses for an ONNX element type. INT8 and UINT16 widen (candle has no
/// such types); BOOL is U8.
pub(super) fn dtype_of(data_type: i32) -> Result<DType, NnError> {
    Ok(match DataType::try_from(data_type) {
        Ok(DataType::Float) => DType::F32,
        Ok(DataType::Double) => DType::F64,
        Ok(DataType::Float16) => DType::F16,
        Ok(DataType::Bfloat16) => DType::BF16,
        Ok(DataType::Uint8 | DataType::Bool) => DType::U8,
        Ok(DataType::Int8 | DataType::Int16) => DType::I16,
        Ok(DataType::Uint16 | DataType::Int32) => DType::I32,
        Ok(DataType::Uint32) => DType::U32,
        Ok(DataType::Int64 | DataType::Uint64) => DType::I64,
        _ => return Err(NnError::unsupported(format!("ONNX element type {data_type} is not supported"))),
    })
}

fn le<const N: usize, T>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    raw.chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

/// Converts a tensor proto. External data (weights in side files) is not supported.
pub(super) fn from_proto(t: &TensorProto) -> Result<Tensor, NnError> {
    if !t.external_data.is_empty() {
        return Err(NnError::unsupported(format!(
            "tensor `{}` keeps its data in an external file; re-export the model with data embedded",
            t.name
        )));
    }
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| NnError::invalid_encoding(format!("tensor `{}`: negative dim {d}", t.name)))
        })
        .collect::<Result<_, _>>()?;
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let count = count.ok_or_else(|| NnError::invalid_encoding(format!("tensor `{}`: dims overflow", t.name)))?;
    let raw = &t.raw_data;
    let dev = &Device::Cpu;
    let ty = DataType::try_from(t.data_type)
        .map_err(|_| NnError::invalid_encoding(format!("tensor `{}`: bad type", t.name)))?;
    let tensor = match ty {
        DataType::Float => {
            let v = if raw.is_empty() { t.float_data.clone() } else { le(raw, f32::from_le_bytes) };
            check(t, v.len(), count)?;
            Tensor::from_vec(v, dims, dev)?
        }
        DataType::Double => {
            let v = if raw.is_empty() { t.double_data.clone() } else { le(raw, f64::from_le_bytes) };
            check(t, v.len(), count)?;
            Tensor::from_vec(v, dims, dev)?
        }
        DataType::Float16 | DataType::Bfloat16 => {
            let bits: Vec<u16> = if raw.is_empty() {
                t.int32_data.iter().map(|&b| b as u16).collect()
            } else {
                le(raw, u16::from_le_bytes)
            };
            check(t, bits.len(), count)?;
            if ty == DataType::Float16 {
                Tensor::from_vec(bits.into_iter().map(half::f16::from_bits).collect::<Vec<_>>(), dims, dev)?
            } else {
                Tensor::from_vec(bits.into_iter().map(half::bf16::from_bits).collect::<Vec<_>>(), dims, dev)?
            }
        }
        DataType::Uint8 | DataType::Bool => {
            let v: Vec<u8> = if raw.is_empty() { t.int32_data.iter().map(|&x| x as u8).collect() } else { raw.clone() };
            check(t, v.len(), count)?;
            Tensor::from_vec(v, dims, dev)?
        }
        DataType::Int8 | DataType::Int16 => {
            let v: Vec<i16> = if raw.is_empty() {
                t.int32_data.iter().map(|&x| x as i16).collect()
            } else if ty == DataType::Int8 {
                raw.iter().map(|&b| i16::from(b as i8)).collect()
            } else {
                le(raw, i16::from_le_bytes)
            };
            check(t, v.len(), count)?;
            Tensor::from_vec(v, dims, dev)?
        }
        DataType::Int32 | DataType::Uint16 => {
            let v: Vec<i32> = if raw.is_empty() {
                t.int32_data.clone()
            } else if ty == DataType::Uint16 {
                le(raw, |b| i32::from(u16::from_le_bytes(b)))
            } else {
                le(raw, i32::from_le_bytes)
            };
            check(t, v.len(), count)?;
            Tensor::from_vec(v, dims, dev)?
        }
        DataType::Uint32 => {
            let v: Vec<u32> = if raw.is_empty() {
                t.uint64_data.iter().map(|&x| x as u32).collect()
            } else {
                le(raw, u32::from_le_bytes)
            };
            check(t, v.len(), count)?;
            Tensor::from_vec(v, dims, dev)?
        }
        DataType::Int64 | DataType::Uint64 => {
            let v: Vec<i64> = if raw.is_empty() {
                if ty == DataType::Int64 {
                    t.int64_data.clone()
                } else {
                    t.uint64_data.iter().map(|&x| x as i64).collect()
                }
            } else {
                le(raw, i64::from_le_bytes)
            };
            check(t, v.len(), count)?;
            Tensor::from_vec(v, dims, dev)?
        }
        other => {
            return Err(NnError::unsupported(format!("tensor `{}`: element type {other:?} is not supported", t.name)));
        }
    };
    Ok(tensor)
}

fn check(t: &TensorProto, got: usize, want: usize) -> Result<(), NnError> {
    if got != want {
        return Err(NnError::invalid_encoding(format!("tensor `{}`: {got} values for dims {:?}", t.name, t.dims)));
    }
    Ok(())
}
