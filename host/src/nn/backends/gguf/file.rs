//! A checked reader of GGUF files (versions 2 and 3): header, metadata and tensor table.
//!
//! Everything is read from a byte slice already in memory, and every count or length the file
//! states is checked against the bytes that remain before anything is allocated for it
//! (candle's reader allocates what a length field says first). What the parsed metadata takes
//! in memory is metered too: at most [`METADATA_FACTOR`] times the file's size, however the file
//! packs its values (a one-byte array element becomes a whole [`Value`]). Tensor data stays in
//! the slice; [`Gguf::tensor`] hands out checked views.

use std::collections::BTreeMap;

use crate::nn::error::NnError;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// `f32` or `f64`.
    F64(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array (of one element type).
    Array(Vec<Value>),
}

/// ggml tensor types this reader knows the size of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// ggml `Q4_0` (18-byte blocks of 32).
    Q4_0,
    /// ggml `Q4_1` (20-byte blocks of 32).
    Q4_1,
    /// ggml `Q8_0` (34-byte blocks of 32).
    Q8_0,
    /// ggml `Q8_1` (36-byte blocks of 32).
    Q8_1,
}

impl DType {
    fn from_ggml(t: u32) -> Option<DType> {
        Some(match t {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            8 => DType::Q8_0,
            9 => DType::Q8_1,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    fn block(self) -> (u64, u64) {
        match self {
            DType::F32 => (1, 4),
            DType::F16 => (1, 2),
            DType::Q4_0 => (32, 18),
            DType::Q4_1 => (32, 20),
            DType::Q8_0 => (32, 34),
            DType::Q8_1 => (32, 36),
        }
    }
}

/// One tensor's entry: its dims (innermost first, as ggml writes them), type and bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Dimensions, innermost (row length) first.
    pub dims: Vec<u64>,
    /// Element type.
    pub dtype: DType,
    /// Byte range within the file.
    range: std::ops::Range<usize>,
}

/// A parsed GGUF file borrowing its bytes.
pub struct Gguf<'a> {
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    bytes: &'a [u8],
}

impl std::fmt::Debug for Gguf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// Nesting of arrays inside arrays the reader accepts (GGUF writers use one level).
const MAX_DEPTH: u32 = 2;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

fn bad(what: impl std::fmt::Display) -> NnError {
    NnError::invalid_encoding(format!("GGUF: {what}"))
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Bytes the parsed values may still take.
    budget: u64,
}

/// The parsed metadata may take this many times the file's size (plus [`METADATA_SLACK`]).
pub const METADATA_FACTOR: u64 = 4;
const METADATA_SLACK: u64 = 1 << 20;

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], NnError> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(bad(format!("{what} needs {n} bytes at offset {}, the file has {left} left", self.pos)));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], NnError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, NnError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, NnError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, NnError> {
        let len = self.u64(what)?;
        let s = self.take(len, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| bad(format!("{what} is not UTF-8")))
    }

    /// A count of items each at least `min` bytes, checked against what remains.
    fn count(&mut self, min: u64, what: &str) -> Result<usize, NnError> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.checked_mul(min.max(1)).is_none_or(|need| need > left) {
            return Err(bad(format!("{what}: {n} items cannot fit in the {left} bytes left")));
        }
        Ok(n as usize)
    }

    /// Charges `n` bytes of parsed values against the budget.
    fn charge(&mut self, n: u64, what: &str) -> Result<(), NnError> {
        self.budget = self.budget.checked_sub(n).ok_or_else(|| {
            bad(format!("{what}: the metadata would take more than {METADATA_FACTOR}x the file's size in memory"))
        })?;
        Ok(())
    }

    fn value(&mut self, ty: u32, depth: u32, what: &str) -> Result<Value, NnError> {
        self.charge(size_of::<Value>() as u64, what)?;
        Ok(match ty {
            0 => Value::U64(u64::from(self.array::<1>(what)?[0])),
            1 => Value::I64(i64::from(self.array::<1>(what)?[0] as i8)),
            2 => Value::U64(u64::from(u16::from_le_bytes(self.array(what)?))),
            3 => Value::I64(i64::from(i16::from_le_bytes(self.array(what)?))),
            4 => Value::U64(u64::from(self.u32(what)?)),
            5 => Value::I64(i64::from(i32::from_le_bytes(self.array(what)?))),
            6 => Value::F64(f64::from(f32::from_le_bytes(self.array(what)?))),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(bad(format!("{what}: boolean byte {b}"))),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(bad(format!("{what}: arrays nested deeper than {MAX_DEPTH}")));
                }
                let elem = self.u32(what)?;
                let n = self.count(min_size(elem), what)?;
                self.charge((n as u64).saturating_mul(size_of::<Value>() as u64), what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(bad(format!("{what}: unknown value type {t}"))),
        })
    }
}

/// The fewest bytes a value of type `ty` takes (for checking counts).
fn min_size(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8..=12 => 8, // strings and arrays start with a u64 length
        _ => 1,
    }
}

impl<'a> Gguf<'a> {
    /// Parses `bytes`, checking every tensor's extent against the file.
    pub fn parse(bytes: &'a [u8]) -> Result<Gguf<'a>, NnError> {
        let budget = (bytes.len() as u64).saturating_mul(METADATA_FACTOR).saturating_add(METADATA_SLACK);
        let mut r = Reader { bytes, pos: 0, budget };
        if r.take(4, "magic")? != b"GGUF" {
            return Err(bad("not a GGUF file (magic)"));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("version {version} (EIR reads versions 2 and 3)")));
        }
        // Each tensor entry takes at least 8 (name) + 4 + 4 + 8 bytes, each metadata entry 8 + 4 + 1.
        let tensors = r.count(24, "tensor count")?;
        let kvs = r.count(13, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kvs {
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let value = r.value(ty, 0, &key)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(bad(format!("metadata key `{key}` appears twice")));
            }
        }
        let mut infos = Vec::with_capacity(tensors);
        for _ in 0..tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad(format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS})")));
            }
            let dims = (0..n_dims).map(|_| r.u64(&name)).collect::<Result<Vec<_>, _>>()?;
            let ty = r.u32(&name)?;
            let dtype = DType::from_ggml(ty)
                .ok_or_else(|| bad(format!("tensor `{name}` has ggml type {ty}, which EIR does not read")))?;
            let offset = r.u64(&name)?;
            infos.push((name, dims, dtype, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(Value::U64(a)) if a.is_power_of_two() && *a <= 1 << 16 => *a,
            Some(v) => {
                return Err(bad(format!("general.alignment is {}: expected a power of two up to 65536", describe(v))));
            }
        };
        let data_start = (r.pos as u64).next_multiple_of(alignment);
        // A file that ends before its (aligned) data starts has no data, even for empty tensors.
        let data_len = (bytes.len() as u64).checked_sub(data_start).ok_or_else(|| {
            bad(format!("the file ends at {} bytes, before its tensor data starts at {data_start}", bytes.len()))
        })?;
        let mut table = BTreeMap::new();
        for (name, dims, dtype, offset) in infos {
            let (per_block, block_bytes) = dtype.block();
            let elems = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let size = match elems {
                Some(e) if dims[0] % per_block == 0 => (e / per_block).checked_mul(block_bytes),
                _ => None,
            }
            .ok_or_else(|| bad(format!("tensor `{name}`: dims {dims:?} do not make whole {dtype:?} blocks")))?;
            if offset % alignment != 0 || offset.checked_add(size).is_none_or(|end| end > data_len) {
                return Err(bad(format!(
                    "tensor `{name}`: {size} bytes at data offset {offset} (aligned to {alignment}) do not fit the {data_len} bytes of data"
                )));
            }
            let start = (data_start + offset) as usize;
            let info = TensorInfo { dims, dtype, range: start..start + size as usize };
            if table.insert(name.clone(), info).is_some() {
                return Err(bad(format!("tensor `{name}` appears twice")));
            }
        }
        Ok(Gguf { metadata, tensors: table, bytes })
    }

    /// A tensor's info and bytes, or a `not-found`-style encoding error naming it.
    pub fn tensor(&self, name: &str) -> Result<(&TensorInfo, &'a [u8]), NnError> {
        let info = self.tensors.get(name).ok_or_else(|| bad(format!("no tensor `{name}`")))?;
        Ok((info, &self.bytes[info.range.clone()]))
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value, NnError> {
        self.metadata.get(key).ok_or_else(|| bad(format!("no metadata `{key}`")))
    }

    /// An unsigned integer the model needs, within `1..=max`.
    pub fn usize(&self, key: &str, max: usize) -> Result<usize, NnError> {
        match self.get(key)? {
            Value::U64(v) if (1..=max as u64).contains(v) => Ok(*v as usize),
            Value::I64(v) if (1..=max as i64).contains(v) => Ok(*v as usize),
            v => Err(bad(format!("`{key}` is {}; expected an integer in 1..={max}", describe(v)))),
        }
    }

    /// [`usize`](Self::usize) where the key is given, else `default`.
    pub fn usize_or(&self, key: &str, max: usize, default: usize) -> Result<usize, NnError> {
        if self.metadata.contains_key(key) { self.usize(key, max) } else { Ok(default) }
    }

    /// [`positive`](Self::positive) where the key is given, else `default`.
    pub fn positive_or(&self, key: &str, default: f64) -> Result<f64, NnError> {
        if self.metadata.contains_key(key) { self.positive(key) } else { Ok(default) }
    }

    /// A float the model needs, finite and positive.
    pub fn positive(&self, key: &str) -> Result<f64, NnError> {
        match self.get(key)? {
            Value::F64(v) if v.is_finite() && *v > 0.0 => Ok(*v),
            v => Err(bad(format!("`{key}` is {}; expected a positive number", describe(v)))),
        }
    }

    /// A string value.
    pub fn str(&self, key: &str) -> Result<&str, NnError> {
        match self.get(key)? {
            Value::Str(s) => Ok(s),
            v => Err(bad(format!("`{key}` is {}; expected a string", describe(v)))),
        }
    }

    /// An array value.
    pub fn array(&self, key: &str) -> Result<&[Value], NnError> {
        match self.get(key)? {
            Value::Array(a) => Ok(a),
            v => Err(bad(format!("`{key}` is a {}; expected an array", kind(v)))),
        }
    }
}

/// A value for an error message: scalars as they are, strings and arrays by kind and size (a
/// hostile file's huge value must not become a huge message).
fn describe(v: &Value) -> String {
    match v {
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Str(s) => format!("a string of {} bytes", s.len()),
        Value::Array(a) => format!("an array of {}", a.len()),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::U64(_) | Value::I64(_) => "integer",
        Value::F64(_) => "float",
        Value::Bool(_) => "boolean",
        Value::Str(_) => "string",
        Value::Array(_) => "array",
    }
}

/// Writes a GGUF file (tests and fuzz seeds): metadata, then tensors with their raw bytes.
#[cfg(any(test, fuzzing))]
pub fn write(metadata: &[(&str, Value)], tensors: &[(&str, &[u64], u32, &[u8])]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn value(out: &mut Vec<u8>, v: &Value, tag: bool) {
        let (ty, body): (u32, Vec<u8>) = match v {
            Value::U64(x) => (10, x.to_le_bytes().to_vec()),
            Value::I64(x) => (11, x.to_le_bytes().to_vec()),
            Value::F64(x) => (6, (*x as f32).to_le_bytes().to_vec()),
            Value::Bool(b) => (7, vec![u8::from(*b)]),
            Value::Str(s) => {
                let mut b = Vec::new();
                string(&mut b, s);
                (8, b)
            }
            Value::Array(items) => {
                let mut b = Vec::new();
                let elem = match items.first() {
                    Some(Value::U64(_)) => 10,
                    Some(Value::I64(_)) => 11,
                    Some(Value::F64(_)) => 6,
                    Some(Value::Bool(_)) => 7,
                    Some(Value::Array(_)) => 9,
                    _ => 8,
                };
                b.extend_from_slice(&(elem as u32).to_le_bytes());
                b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for i in items {
                    value(&mut b, i, false);
                }
                (9, b)
            }
        };
        if tag {
            out.extend_from_slice(&ty.to_le_bytes());
        }
        out.extend_from_slice(&body);
    }
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut out, k);
        value(&mut out, v, true);
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        string(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + data.len() as u64).next_multiple_of(32);
    }
    out.resize(out.len().next_multiple_of(32), 0);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(32), 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        write(
            &[
                ("general.architecture", Value::Str("llama".into())),
                ("n", Value::U64(3)),
                ("list", Value::Array(vec![Value::Str("a".into()), Value::Str("bc".into())])),
            ],
            &[("w", &[2, 3], 0, &[0u8; 24]), ("b", &[32], 3, &[1u8; 20])],
        )
    }

    #[test]
    fn reads_what_it_wrote() {
        let bytes = sample();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.str("general.architecture").unwrap(), "llama");
        assert_eq!(g.usize("n", 10).unwrap(), 3);
        assert_eq!(g.array("list").unwrap().len(), 2);
        let (info, data) = g.tensor("b").unwrap();
        assert_eq!((info.dtype, data), (DType::Q4_1, &[1u8; 20][..]));
        assert_eq!(g.tensor("w").unwrap().0.dims, vec![2, 3]);
        assert!(g.usize("n", 2).is_err());
        assert!(g.tensor("nope").unwrap_err().message.contains("nope"));
    }

    #[test]
    fn every_truncation_and_huge_count_is_an_error_not_an_allocation() {
        let bytes = sample();
        // The last 12 bytes are padding after the last tensor (20 bytes padded to 32).
        for cut in 0..bytes.len() - 12 {
            let err = Gguf::parse(&bytes[..cut]).err();
            assert!(err.is_some(), "truncated at {cut} parsed");
        }
        // A string claiming 2^63 bytes, a count of 2^60 tensors, an array of 2^62 items.
        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(Gguf::parse(&huge).unwrap_err().message.contains("cannot fit"));
        let mut huge = bytes.clone();
        huge[24..32].copy_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(Gguf::parse(&huge).is_err());
        let mut huge = bytes;
        let at = huge.windows(4).position(|w| w == b"list").unwrap() + 4 + 4 + 4;
        huge[at..at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(Gguf::parse(&huge).unwrap_err().message.contains("cannot fit"));
    }

    #[test]
    fn a_file_cut_before_its_data_is_an_error_even_for_empty_tensors() {
        let bytes = write(&[], &[("empty", &[0], 0, &[])]);
        // Header 24 bytes, then the entry: name 8 + 5, 1 dim (4 + 8), type 4, offset 8 = 61
        // bytes; the data would start at 64.
        let header_end = 24 + 13 + 12 + 4 + 8;
        assert_eq!(bytes.len(), 64);
        let err = Gguf::parse(&bytes[..header_end]).unwrap_err();
        assert!(err.message.contains("before its tensor data"), "{err}");
        assert!(Gguf::parse(&bytes).is_ok());
    }

    #[test]
    fn metadata_that_would_swell_in_memory_is_refused() {
        // A 1-byte-per-element array becomes 32 bytes per element parsed: over the budget.
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.push(b'a');
        bytes.extend_from_slice(&9u32.to_le_bytes()); // array
        bytes.extend_from_slice(&0u32.to_le_bytes()); // of u8
        let n = 4u64 << 20;
        bytes.extend_from_slice(&n.to_le_bytes());
        bytes.resize(bytes.len() + n as usize, 7);
        assert!(Gguf::parse(&bytes).unwrap_err().message.contains("memory"));
    }

    #[test]
    fn bad_tensor_entries_are_errors() {
        let ragged = write(&[], &[("q", &[33], 3, &[0u8; 21])]);
        assert!(Gguf::parse(&ragged).unwrap_err().message.contains("whole"));
        let overflow = write(&[], &[("q", &[u64::MAX, 2], 0, &[0u8; 8])]);
        assert!(Gguf::parse(&overflow).is_err());
        let unknown = write(&[], &[("q", &[32], 99, &[0u8; 8])]);
        assert!(Gguf::parse(&unknown).unwrap_err().message.contains("99"));
        let beyond = write(&[], &[("q", &[64], 0, &[0u8; 8])]);
        assert!(Gguf::parse(&beyond).unwrap_err().message.contains("do not fit"));
    }
}
