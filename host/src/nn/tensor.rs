//! wasi-nn tensors on the host: validation of what a guest hands over, and conversion to and
//! from candle with a single copy each way.

use candle_core::{DType, Device, Tensor};

use super::bindings::tensor::TensorType;
use super::error::NnError;

/// A `wasi:nn/tensor.tensor` resource: dimensions, element type, little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    dims: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
}

/// Bytes per element of a wasi-nn tensor type.
pub fn element_size(ty: TensorType) -> usize {
    match ty {
        TensorType::U8 => 1,
        TensorType::Fp16 | TensorType::Bf16 => 2,
        TensorType::Fp32 | TensorType::I32 => 4,
        TensorType::Fp64 | TensorType::I64 => 8,
    }
}

/// The candle dtype holding a wasi-nn type.
pub fn dtype_of(ty: TensorType) -> DType {
    match ty {
        TensorType::U8 => DType::U8,
        TensorType::Fp16 => DType::F16,
        TensorType::Bf16 => DType::BF16,
        TensorType::Fp32 => DType::F32,
        TensorType::Fp64 => DType::F64,
        TensorType::I32 => DType::I32,
        TensorType::I64 => DType::I64,
    }
}

/// The wasi-nn type of a candle dtype, if the spec has one.
pub fn type_of(dtype: DType) -> Option<TensorType> {
    Some(match dtype {
        DType::U8 => TensorType::U8,
        DType::F16 => TensorType::Fp16,
        DType::BF16 => TensorType::Bf16,
        DType::F32 => TensorType::Fp32,
        DType::F64 => TensorType::Fp64,
        DType::I32 => TensorType::I32,
        DType::I64 => TensorType::I64,
        _ => return None,
    })
}

impl HostTensor {
    /// Checks that `data` holds exactly `dims` elements of `ty` (overflow-checked).
    pub fn new(dims: Vec<u32>, ty: TensorType, data: Vec<u8>) -> Result<Self, NnError> {
        let expected = dims
            .iter()
            .try_fold(element_size(ty) as u64, |acc, &d| acc.checked_mul(u64::from(d)))
            .ok_or_else(|| NnError::invalid_argument(format!("tensor dimensions {dims:?} overflow")))?;
        if expected != data.len() as u64 {
            return Err(NnError::invalid_argument(format!(
                "tensor dimensions {dims:?} of {ty:?} need {expected} bytes, got {}",
                data.len()
            )));
        }
        Ok(Self { dims, ty, data })
    }

    /// The dimensions.
    pub fn dims(&self) -> &[u32] {
        &self.dims
    }

    /// The element type.
    pub fn ty(&self) -> TensorType {
        self.ty
    }

    /// The raw little-endian bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Size in bytes.
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// A candle tensor with the same contents on `device` (one copy).
    pub fn to_candle(&self, device: &Device) -> Result<Tensor, NnError> {
        let shape: Vec<usize> = self.dims.iter().map(|&d| d as usize).collect();
        Ok(Tensor::from_raw_buffer(&self.data, dtype_of(self.ty), &shape, device)?)
    }

    /// A host tensor with the contents of `t` (moved to the CPU if needed; one copy when `t`
    /// is contiguous).
    pub fn from_candle(t: &Tensor) -> Result<Self, NnError> {
        let ty = type_of(t.dtype())
            .ok_or_else(|| NnError::unsupported(format!("wasi-nn has no tensor type for {:?}", t.dtype())))?;
        let dims = t
            .dims()
            .iter()
            .map(|&d| u32::try_from(d).map_err(|_| NnError::too_large(format!("dimension {d} does not fit u32"))))
            .collect::<Result<Vec<u32>, _>>()?;
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let data = contiguous_bytes(&t)?;
        Self::new(dims, ty, data)
    }
}

/// The bytes of a contiguous CPU tensor, copied once out of its storage.
fn contiguous_bytes(t: &Tensor) -> Result<Vec<u8>, NnError> {
    use candle_core::{CpuStorage, Storage};
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(NnError::runtime("tensor is not on the CPU"));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(NnError::runtime("tensor is not contiguous"));
    };
    fn bytes<T: bytemuck::Pod>(v: &[T], start: usize, end: usize) -> Vec<u8> {
        bytemuck::cast_slice(&v[start..end]).to_vec()
    }
    Ok(match cpu {
        CpuStorage::U8(v) => v[start..end].to_vec(),
        CpuStorage::I32(v) => bytes(v, start, end),
        CpuStorage::I64(v) => bytes(v, start, end),
        CpuStorage::F16(v) => bytes(v, start, end),
        CpuStorage::BF16(v) => bytes(v, start, end),
        CpuStorage::F32(v) => bytes(v, start, end),
        CpuStorage::F64(v) => bytes(v, start, end),
        _ => {
            return Err(NnError::unsupported(format!("wasi-nn has no tensor type for {:?}", t.dtype())));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_without_overflow() {
        assert!(HostTensor::new(vec![2, 2], TensorType::Fp32, vec![0; 16]).is_ok());
        let err = HostTensor::new(vec![2, 2], TensorType::Fp32, vec![0; 15]).unwrap_err();
        assert!(err.message.contains("need 16 bytes, got 15"), "{err}");
        let err = HostTensor::new(vec![u32::MAX; 4], TensorType::I64, vec![]).unwrap_err();
        assert!(err.message.contains("overflow"), "{err}");
    }

    #[test]
    fn round_trips_through_candle() {
        let values = [1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = HostTensor::new(vec![2, 3], TensorType::Fp32, data).unwrap();
        let c = t.to_candle(&Device::Cpu).unwrap();
        assert_eq!(c.dims(), &[2, 3]);
        assert_eq!(c.to_vec2::<f32>().unwrap(), vec![vec![1.5, -2.0, 3.25], vec![0.0, 7.0, 8.0]]);
        assert_eq!(HostTensor::from_candle(&c).unwrap(), t);
        // A transposed (non-contiguous) view comes back in row-major order.
        let back = HostTensor::from_candle(&c.t().unwrap()).unwrap();
        assert_eq!(back.dims(), &[3, 2]);
        let ints =
            HostTensor::new(vec![3], TensorType::I64, [1i64, -2, 3].iter().flat_map(|v| v.to_le_bytes()).collect())
                .unwrap();
        assert_eq!(ints.to_candle(&Device::Cpu).unwrap().to_vec1::<i64>().unwrap(), vec![1, -2, 3]);
    }
}
