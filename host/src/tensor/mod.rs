//! The tensors a plugin exchanges with its caller (the `eir:plugin/types` WIT records), their
//! validation; [`json`] holds their KServe v2 JSON form (shared by `eir run` and the gateway).

pub mod json;

pub use json::metadata_to_json;

pub use crate::plugin::bindings::types::{
    Datatype, Error as PluginErrorRecord, ErrorCode, Metadata, Request, Response, Tensor, TensorData, TensorSpec,
};

impl Datatype {
    /// All datatypes, in WIT order.
    pub const ALL: [Datatype; 13] = [
        Datatype::Bool,
        Datatype::Uint8,
        Datatype::Uint16,
        Datatype::Uint32,
        Datatype::Uint64,
        Datatype::Int8,
        Datatype::Int16,
        Datatype::Int32,
        Datatype::Int64,
        Datatype::Fp16,
        Datatype::Fp32,
        Datatype::Fp64,
        Datatype::Bytes,
    ];

    /// The KServe v2 name (`"FP32"`, `"BYTES"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Uint8 => "UINT8",
            Datatype::Uint16 => "UINT16",
            Datatype::Uint32 => "UINT32",
            Datatype::Uint64 => "UINT64",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Fp16 => "FP16",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
            Datatype::Bytes => "BYTES",
        }
    }

    /// Parses a KServe v2 name, case-insensitively.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str().eq_ignore_ascii_case(name))
    }

    /// Bytes per element, or `None` for variable-size `BYTES`.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            Datatype::Bool | Datatype::Uint8 | Datatype::Int8 => 1,
            Datatype::Uint16 | Datatype::Int16 | Datatype::Fp16 => 2,
            Datatype::Uint32 | Datatype::Int32 | Datatype::Fp32 => 4,
            Datatype::Uint64 | Datatype::Int64 | Datatype::Fp64 => 8,
            Datatype::Bytes => return None,
        })
    }
}

/// What each BYTES element counts against `max_request`/`max_response` on top of its bytes:
/// a host vector header (24 bytes) plus the guest's list entry (8).
pub const BYTES_ELEMENT_OVERHEAD: u64 = 32;

impl TensorData {
    /// The datatype of these elements.
    pub fn datatype(&self) -> Datatype {
        match self {
            TensorData::Bool(_) => Datatype::Bool,
            TensorData::Uint8(_) => Datatype::Uint8,
            TensorData::Uint16(_) => Datatype::Uint16,
            TensorData::Uint32(_) => Datatype::Uint32,
            TensorData::Uint64(_) => Datatype::Uint64,
            TensorData::Int8(_) => Datatype::Int8,
            TensorData::Int16(_) => Datatype::Int16,
            TensorData::Int32(_) => Datatype::Int32,
            TensorData::Int64(_) => Datatype::Int64,
            TensorData::Fp16(_) => Datatype::Fp16,
            TensorData::Fp32(_) => Datatype::Fp32,
            TensorData::Fp64(_) => Datatype::Fp64,
            TensorData::Bytes(_) => Datatype::Bytes,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::Bool(v) => v.len(),
            TensorData::Uint8(v) => v.len(),
            TensorData::Uint16(v) | TensorData::Fp16(v) => v.len(),
            TensorData::Uint32(v) => v.len(),
            TensorData::Uint64(v) => v.len(),
            TensorData::Int8(v) => v.len(),
            TensorData::Int16(v) => v.len(),
            TensorData::Int32(v) => v.len(),
            TensorData::Int64(v) => v.len(),
            TensorData::Fp32(v) => v.len(),
            TensorData::Fp64(v) => v.len(),
            TensorData::Bytes(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Payload size in bytes (for `BYTES`, the sum of the element lengths).
    pub fn byte_size(&self) -> u64 {
        match self {
            // Each element also costs its own allocation on both sides of the call: a
            // million empty strings are not free.
            TensorData::Bytes(v) => v.iter().map(|b| b.len() as u64 + BYTES_ELEMENT_OVERHEAD).sum(),
            other => other.len() as u64 * other.datatype().element_size().unwrap_or(1) as u64,
        }
    }
}

/// The number of elements a shape holds, or `None` if the product overflows.
pub fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    /// Checks that the shape matches the number of elements.
    pub fn validate(&self) -> Result<(), String> {
        let expected = element_count(&self.shape)
            .ok_or_else(|| format!("tensor `{}`: shape {:?} overflows", self.name, self.shape))?;
        let actual = self.data.len() as u64;
        if expected != actual {
            return Err(format!(
                "tensor `{}`: shape {:?} holds {expected} elements but {actual} were given",
                self.name, self.shape
            ));
        }
        Ok(())
    }
}

/// Validates every tensor and that names are unique; returns the total payload size.
pub fn validate_tensors(tensors: &[Tensor]) -> Result<u64, String> {
    let mut seen = std::collections::HashSet::new();
    let mut size = 0u64;
    for t in tensors {
        t.validate()?;
        if !seen.insert(t.name.as_str()) {
            return Err(format!("tensor `{}` appears twice", t.name));
        }
        size = size.saturating_add(t.data.byte_size());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in Datatype::ALL {
            assert_eq!(Datatype::parse(d.as_str()), Some(d));
        }
        assert_eq!(Datatype::parse("fp32"), Some(Datatype::Fp32));
        assert_eq!(Datatype::parse("BF16"), None);
    }

    #[test]
    fn shape_overflow_and_mismatch_are_errors() {
        let t = Tensor { name: "x".into(), shape: vec![u64::MAX, 2], data: TensorData::Fp32(vec![]) };
        assert!(t.validate().unwrap_err().contains("overflows"));
        let t = Tensor { name: "x".into(), shape: vec![2, 2], data: TensorData::Fp32(vec![1.0; 3]) };
        assert!(t.validate().unwrap_err().contains("4 elements but 3"));
        let dup = vec![
            Tensor { name: "a".into(), shape: vec![1], data: TensorData::Int64(vec![1]) },
            Tensor { name: "a".into(), shape: vec![1], data: TensorData::Int64(vec![1]) },
        ];
        assert!(validate_tensors(&dup).unwrap_err().contains("twice"));
    }
}
