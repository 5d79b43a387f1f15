//! Typed access to tensors, so plugins never handle raw bytes.

use crate::{Datatype, Error, Result, Tensor, TensorData};

/// A Rust type that is the element type of a tensor datatype.
pub trait Element: Sized + Copy {
    /// The datatype whose elements are `Self`.
    const DATATYPE: Datatype;
    /// The elements, if `data` holds this type.
    fn slice(data: &TensorData) -> Option<&[Self]>;
    /// Wraps elements as tensor data.
    fn wrap(values: Vec<Self>) -> TensorData;
}

macro_rules! element {
    ($t:ty, $case:ident) => {
        impl Element for $t {
            const DATATYPE: Datatype = Datatype::$case;
            fn slice(data: &TensorData) -> Option<&[Self]> {
                match data {
                    TensorData::$case(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(values: Vec<Self>) -> TensorData {
                TensorData::$case(values)
            }
        }
    };
}

element!(bool, Bool);
element!(u8, Uint8);
element!(u16, Uint16);
element!(u32, Uint32);
element!(u64, Uint64);
element!(i8, Int8);
element!(i16, Int16);
element!(i32, Int32);
element!(i64, Int64);
element!(f32, Fp32);
element!(f64, Fp64);

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
}

impl Tensor {
    /// A tensor of `values` with `shape` (checked: the shape must hold exactly the values).
    pub fn new<T: Element>(name: impl Into<String>, shape: impl Into<Vec<u64>>, values: Vec<T>) -> Result<Self> {
        let name = name.into();
        let shape = shape.into();
        let count = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        if count != Some(values.len() as u64) {
            return Err(Error::internal(format!(
                "tensor `{name}`: shape {shape:?} does not hold {} values",
                values.len()
            )));
        }
        Ok(Self { name, shape, data: T::wrap(values) })
    }

    /// A one-dimensional `BYTES` tensor of UTF-8 strings.
    pub fn strings<S: Into<String>>(name: impl Into<String>, texts: impl IntoIterator<Item = S>) -> Self {
        let data: Vec<Vec<u8>> = texts.into_iter().map(|s| s.into().into_bytes()).collect();
        Self { name: name.into(), shape: vec![data.len() as u64], data: TensorData::Bytes(data) }
    }

    /// A one-dimensional `BYTES` tensor of byte strings.
    pub fn bytes(name: impl Into<String>, blobs: Vec<Vec<u8>>) -> Self {
        Self { name: name.into(), shape: vec![blobs.len() as u64], data: TensorData::Bytes(blobs) }
    }

    /// The datatype.
    pub fn datatype(&self) -> Datatype {
        self.data.datatype()
    }

    /// The elements as `T`, or an `invalid-input` error naming the expected datatype.
    pub fn values<T: Element>(&self) -> Result<&[T]> {
        T::slice(&self.data).ok_or_else(|| {
            Error::invalid_input(format!(
                "input `{}` must be {:?}, not {:?}",
                self.name,
                T::DATATYPE,
                self.data.datatype()
            ))
        })
    }

    /// The elements of a `BYTES` tensor as byte strings.
    pub fn blobs(&self) -> Result<&[Vec<u8>]> {
        match &self.data {
            TensorData::Bytes(v) => Ok(v),
            other => {
                Err(Error::invalid_input(format!("input `{}` must be BYTES, not {:?}", self.name, other.datatype())))
            }
        }
    }

    /// The elements of a `BYTES` tensor as UTF-8 strings.
    pub fn texts(&self) -> Result<Vec<&str>> {
        self.blobs()?
            .iter()
            .enumerate()
            .map(|(i, b)| {
                core::str::from_utf8(b)
                    .map_err(|_| Error::invalid_input(format!("input `{}` element {i} is not UTF-8", self.name)))
            })
            .collect()
    }
}
