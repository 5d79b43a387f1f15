//! The KServe v2 JSON form of requests, tensors and responses, shared by `eir run` and the
//! gateway.
//!
//! Both directions stream. Decoding puts each element straight into its typed buffer (an
//! `FP32` element costs 4 bytes, not a `serde_json::Value` of 32 bytes inside a tree of
//! vectors), so what a request may make the host allocate is a small multiple of its body.
//! Encoding writes elements as it goes, with no intermediate tree either.
//!
//! KServe does not fix the order of a tensor's keys. When `data` comes before `datatype`, the
//! first pass skips the data and a second pass over the same bytes decodes it, now typed: an
//! unusual order costs a second parse, never an untyped copy of the data.

use std::fmt;

use base64::Engine as _;
use serde::de::{self, DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Value, json};

use super::{Datatype, Metadata, Request, Response, Tensor, TensorData, TensorSpec};

/// A request as decoded from its JSON, before any binary sections are attached.
#[derive(Debug)]
pub struct WireRequest {
    /// The request id (a non-string id is kept as its JSON text).
    pub id: String,
    /// The input tensors, in order.
    pub inputs: Vec<WireInput>,
    /// The outputs asked for, in order.
    pub outputs: Vec<WireOutput>,
    /// Request parameters; strings as they are, any other value as its compact JSON text.
    pub parameters: Vec<(String, String)>,
}

/// One input tensor as decoded from JSON.
#[derive(Debug)]
pub struct WireInput {
    /// The tensor's name.
    pub name: String,
    /// Its element type.
    pub datatype: Datatype,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Its elements, when they were given in JSON.
    pub data: Option<TensorData>,
    /// The size of its elements in the binary section (`parameters.binary_data_size`).
    pub binary_data_size: Option<u64>,
}

/// One requested output.
#[derive(Debug, serde::Deserialize)]
pub struct WireOutput {
    /// The output's name.
    pub name: String,
    /// Its parameters (only `binary_data` is read).
    #[serde(default)]
    parameters: OutputParameters,
}

#[derive(Debug, Default, serde::Deserialize)]
struct OutputParameters {
    binary_data: Option<bool>,
}

impl WireOutput {
    /// Whether the caller wants this output in the binary section.
    pub fn binary_data(&self) -> bool {
        self.parameters.binary_data == Some(true)
    }
}

impl WireInput {
    /// The tensor, with `data` (from JSON or from the binary section), checked against its shape.
    pub fn into_tensor(self, data: Option<TensorData>) -> Result<Tensor, String> {
        let name = self.name;
        let data = match (self.data, data) {
            (Some(d), None) | (None, Some(d)) => d,
            (None, None) => return Err(format!("tensor `{name}`: missing `data`")),
            (Some(_), Some(_)) => return Err(format!("tensor `{name}` has both `data` and `binary_data_size`")),
        };
        let tensor = Tensor { name, shape: self.shape, data };
        tensor.validate()?;
        Ok(tensor)
    }
}

impl WireRequest {
    /// The plugin request, for JSON without binary sections.
    pub fn into_request(self) -> Result<Request, String> {
        let inputs = self
            .inputs
            .into_iter()
            .map(|i| match i.binary_data_size {
                Some(_) => Err(format!("tensor `{}`: binary data needs the binary tensor extension", i.name)),
                None => i.into_tensor(None),
            })
            .collect::<Result<_, _>>()?;
        Ok(Request {
            id: self.id,
            inputs,
            outputs: self.outputs.into_iter().map(|o| o.name).collect(),
            parameters: self.parameters,
        })
    }
}

/// Decodes a KServe v2 JSON inference request.
pub fn decode_request(json: &[u8]) -> Result<WireRequest, String> {
    let first = parse(json, RequestSeed { hints: &[] })?;
    if !first.deferred {
        return Ok(first.request);
    }
    // Some `data` came before its `datatype`: decode again, typed by what the first pass read.
    let hints: Vec<Datatype> = first.request.inputs.iter().map(|i| i.datatype).collect();
    Ok(parse(json, RequestSeed { hints: &hints })?.request)
}

/// Decodes a JSON array (possibly nested, flattened in order) into elements of `datatype`.
pub fn decode_data(datatype: Datatype, json: &[u8]) -> Result<TensorData, String> {
    parse(json, DataSeed { datatype, name: None })
}

fn parse<T>(json: &[u8], seed: impl for<'de> DeserializeSeed<'de, Value = T>) -> Result<T, String> {
    let describe = |e: serde_json::Error| match e.classify() {
        serde_json::error::Category::Data => e.to_string(),
        _ => format!("the request is not valid JSON: {e}"),
    };
    let mut de = serde_json::Deserializer::from_slice(json);
    let value = seed.deserialize(&mut de).map_err(describe)?;
    de.end().map_err(describe)?;
    Ok(value)
}

struct Decoded {
    request: WireRequest,
    deferred: bool,
}

/// Decodes a request; `hints` are the inputs' datatypes from a first pass.
struct RequestSeed<'h> {
    hints: &'h [Datatype],
}

impl<'de> DeserializeSeed<'de> for RequestSeed<'_> {
    type Value = Decoded;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Decoded, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RequestSeed<'_> {
    type Value = Decoded;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a KServe v2 inference request (a JSON object)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Decoded, A::Error> {
        let (mut id, mut inputs, mut outputs, mut parameters) = (String::new(), None, Vec::new(), Vec::new());
        let mut deferred = false;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "id" => id = map.next_value::<ParamText>()?.0,
                "inputs" => {
                    let (list, later) = map.next_value_seed(InputsSeed { hints: self.hints })?;
                    inputs = Some(list);
                    deferred = later;
                }
                "outputs" => outputs = map.next_value()?,
                "parameters" => parameters = map.next_value::<Parameters>()?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let inputs = inputs.ok_or_else(|| A::Error::custom("the request has no `inputs` array"))?;
        Ok(Decoded { request: WireRequest { id, inputs, outputs, parameters }, deferred })
    }
}

struct InputsSeed<'h> {
    hints: &'h [Datatype],
}

impl<'de> DeserializeSeed<'de> for InputsSeed<'_> {
    type Value = (Vec<WireInput>, bool);
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for InputsSeed<'_> {
    type Value = (Vec<WireInput>, bool);
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of input tensors")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let (mut inputs, mut deferred) = (Vec::new(), false);
        while let Some(t) = seq.next_element_seed(TensorSeed { hint: self.hints.get(inputs.len()).copied() })? {
            deferred |= t.deferred;
            inputs.push(t.input);
        }
        Ok((inputs, deferred))
    }
}

struct DecodedInput {
    input: WireInput,
    /// Its `data` came before its `datatype` and was skipped.
    deferred: bool,
}

struct TensorSeed {
    hint: Option<Datatype>,
}

impl<'de> DeserializeSeed<'de> for TensorSeed {
    type Value = DecodedInput;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<DecodedInput, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TensorSeed {
    type Value = DecodedInput;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a tensor (a JSON object with `name`, `datatype`, `shape` and `data`)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DecodedInput, A::Error> {
        let (mut name, mut datatype, mut shape, mut data) = (None::<String>, None, None, None);
        let (mut binary_data_size, mut deferred) = (None, false);
        let named = |name: &Option<String>, msg: String| match name {
            Some(n) => A::Error::custom(format!("tensor `{n}`: {msg}")),
            None => A::Error::custom(msg),
        };
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "name" => name = Some(map.next_value()?),
                "datatype" => {
                    let text: String = map.next_value()?;
                    let dt =
                        Datatype::parse(&text).ok_or_else(|| named(&name, format!("unknown datatype `{text}`")))?;
                    datatype = Some(dt);
                }
                "shape" => {
                    let dims: Vec<serde_json::Number> = map.next_value()?;
                    let dims = dims.iter().map(serde_json::Number::as_u64).collect::<Option<Vec<u64>>>();
                    let dims =
                        dims.ok_or_else(|| named(&name, "shape dimensions must be non-negative integers".into()))?;
                    shape = Some(dims);
                }
                "parameters" => binary_data_size = map.next_value::<InputParameters>()?.binary_data_size,
                "data" if data.is_some() || deferred => return Err(named(&name, "`data` appears twice".into())),
                "data" => match datatype.or(self.hint) {
                    Some(datatype) => data = Some(map.next_value_seed(DataSeed { datatype, name: name.as_deref() })?),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                        deferred = true;
                    }
                },
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let name = name.ok_or_else(|| A::Error::custom("tensor without a string `name`"))?;
        let datatype = datatype.ok_or_else(|| A::Error::custom(format!("tensor `{name}`: missing `datatype`")))?;
        let shape = shape.ok_or_else(|| A::Error::custom(format!("tensor `{name}`: missing `shape`")))?;
        Ok(DecodedInput { input: WireInput { name, datatype, shape, data, binary_data_size }, deferred })
    }
}

#[derive(serde::Deserialize)]
struct InputParameters {
    binary_data_size: Option<u64>,
}

/// Decodes `data` straight into a buffer of `datatype`.
struct DataSeed<'n> {
    datatype: Datatype,
    /// The tensor's name, for errors, when it came before its data.
    name: Option<&'n str>,
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_> {
    type Value = TensorData;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<TensorData, D::Error> {
        let mut out = empty(self.datatype);
        d.deserialize_any(Flat { out: &mut out }).map_err(|e| match self.name {
            Some(n) => D::Error::custom(format!("tensor `{n}`: {e}")),
            None => e,
        })?;
        Ok(out)
    }
}

fn empty(datatype: Datatype) -> TensorData {
    match datatype {
        Datatype::Bool => TensorData::Bool(Vec::new()),
        Datatype::Uint8 => TensorData::Uint8(Vec::new()),
        Datatype::Uint16 => TensorData::Uint16(Vec::new()),
        Datatype::Uint32 => TensorData::Uint32(Vec::new()),
        Datatype::Uint64 => TensorData::Uint64(Vec::new()),
        Datatype::Int8 => TensorData::Int8(Vec::new()),
        Datatype::Int16 => TensorData::Int16(Vec::new()),
        Datatype::Int32 => TensorData::Int32(Vec::new()),
        Datatype::Int64 => TensorData::Int64(Vec::new()),
        Datatype::Fp16 => TensorData::Fp16(Vec::new()),
        Datatype::Fp32 => TensorData::Fp32(Vec::new()),
        Datatype::Fp64 => TensorData::Fp64(Vec::new()),
        Datatype::Bytes => TensorData::Bytes(Vec::new()),
    }
}

/// Appends the elements of a (possibly nested) JSON array, or one scalar, to `out`. Nesting is
/// bounded by serde_json's recursion limit.
struct Flat<'a> {
    out: &'a mut TensorData,
}

impl<'de> DeserializeSeed<'de> for Flat<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flat<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} elements", self.out.datatype().as_str())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flat { out: &mut *self.out })?.is_some() {}
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        push(self.out, Scalar::Bool(v)).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        push(self.out, Scalar::U64(v)).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        push(self.out, Scalar::I64(v)).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        push(self.out, Scalar::F64(v)).map_err(E::custom)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        push(self.out, Scalar::Str(v)).map_err(E::custom)
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        push(self.out, Scalar::Null).map_err(E::custom)
    }
    /// `{"b64": "..."}`: a BYTES element that is not UTF-8.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut bytes = None;
        while let Some(key) = map.next_key::<String>()? {
            if key != "b64" || bytes.is_some() {
                return Err(A::Error::custom("an element object must be {\"b64\": \"...\"}"));
            }
            let text: String = map.next_value()?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| A::Error::custom(format!("a `b64` element is not base64: {e}")))?;
            bytes = Some(decoded);
        }
        let bytes = bytes.ok_or_else(|| A::Error::custom("an element object must be {\"b64\": \"...\"}"))?;
        push(self.out, Scalar::Bytes(bytes)).map_err(A::Error::custom)
    }
}

/// One JSON element on its way into a typed buffer.
enum Scalar<'s> {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(&'s str),
    Bytes(Vec<u8>),
}

impl fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Scalar::Null => f.write_str("null"),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::U64(v) => write!(f, "{v}"),
            Scalar::I64(v) => write!(f, "{v}"),
            Scalar::F64(v) => write!(f, "{v}"),
            Scalar::Str(s) => write!(f, "{s:?}"),
            Scalar::Bytes(_) => f.write_str("a b64 element"),
        }
    }
}

fn push(out: &mut TensorData, s: Scalar) -> Result<(), String> {
    fn int<T: TryFrom<u64> + TryFrom<i64>>(s: &Scalar, what: &str) -> Result<T, String> {
        let v = match *s {
            Scalar::U64(u) => T::try_from(u).ok(),
            Scalar::I64(i) => T::try_from(i).ok(),
            _ => None,
        };
        v.ok_or_else(|| format!("{s} is not a valid {what}"))
    }
    // JSON has no NaN or infinity: they come as strings, as Python's json module writes them.
    fn float(s: &Scalar) -> Result<f64, String> {
        match *s {
            Scalar::U64(u) => Ok(u as f64),
            Scalar::I64(i) => Ok(i as f64),
            Scalar::F64(f) => Ok(f),
            Scalar::Str("NaN") => Ok(f64::NAN),
            Scalar::Str("Infinity") => Ok(f64::INFINITY),
            Scalar::Str("-Infinity") => Ok(f64::NEG_INFINITY),
            _ => Err(format!("{s} is not a number")),
        }
    }
    match out {
        TensorData::Bool(v) => match s {
            Scalar::Bool(b) => v.push(b),
            other => return Err(format!("{other} is not a boolean")),
        },
        TensorData::Uint8(v) => v.push(int(&s, "UINT8")?),
        TensorData::Uint16(v) => v.push(int(&s, "UINT16")?),
        TensorData::Uint32(v) => v.push(int(&s, "UINT32")?),
        TensorData::Uint64(v) => v.push(int(&s, "UINT64")?),
        TensorData::Int8(v) => v.push(int(&s, "INT8")?),
        TensorData::Int16(v) => v.push(int(&s, "INT16")?),
        TensorData::Int32(v) => v.push(int(&s, "INT32")?),
        TensorData::Int64(v) => v.push(int(&s, "INT64")?),
        TensorData::Fp16(v) => v.push(half::f16::from_f64(float(&s)?).to_bits()),
        TensorData::Fp32(v) => v.push(float(&s)? as f32),
        TensorData::Fp64(v) => v.push(float(&s)?),
        TensorData::Bytes(v) => match s {
            Scalar::Str(text) => v.push(text.as_bytes().to_vec()),
            Scalar::Bytes(b) => v.push(b),
            other => return Err(format!("{other} is not a string or {{\"b64\": ...}}")),
        },
    }
    Ok(())
}

/// Request parameters: `(name, text)` pairs.
struct Parameters(Vec<(String, String)>);

impl<'de> de::Deserialize<'de> for Parameters {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Parameters;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`parameters` as a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parameters, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, ParamText>()? {
                    out.push((k, v.0));
                }
                Ok(Parameters(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A parameter value as text: a string as it is, anything else as its compact JSON.
struct ParamText(String);

impl<'de> de::Deserialize<'de> for ParamText {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = String::new();
        d.deserialize_any(Text { out: &mut out, top: true })?;
        Ok(ParamText(out))
    }
}

/// Writes any JSON value as compact JSON text (a top-level string unquoted), without a tree.
struct Text<'a> {
    out: &'a mut String,
    top: bool,
}

impl<'de> DeserializeSeed<'de> for Text<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Text<'_> {
    fn json<T: Serialize + ?Sized, E: de::Error>(self, v: &T) -> Result<(), E> {
        self.out.push_str(&serde_json::to_string(v).map_err(E::custom)?);
        Ok(())
    }
}

impl<'de> Visitor<'de> for Text<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.out.push_str("null");
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.json(&v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.json(&v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.json(&v)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.json(&v)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if self.top {
            self.out.push_str(v);
            Ok(())
        } else {
            self.json(v)
        }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.push('[');
        let mut first = true;
        loop {
            let mark = self.out.len();
            if !first {
                self.out.push(',');
            }
            if seq.next_element_seed(Text { out: &mut *self.out, top: false })?.is_none() {
                self.out.truncate(mark);
                break;
            }
            first = false;
        }
        self.out.push(']');
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.out.push('{');
        let mut first = true;
        while let Some(key) = map.next_key::<String>()? {
            if !first {
                self.out.push(',');
            }
            first = false;
            self.out.push_str(&serde_json::to_string(&key).map_err(A::Error::custom)?);
            self.out.push(':');
            map.next_value_seed(Text { out: &mut *self.out, top: false })?;
        }
        self.out.push('}');
        Ok(())
    }
}

/// Serialises a tensor's elements as a flat JSON array. Floats are written with the fewest
/// digits that read back to the same value; NaN and infinities as strings (JSON has none);
/// `BYTES` elements as strings when UTF-8, else `{"b64": "..."}`.
pub struct DataJson<'a>(pub &'a TensorData);

impl Serialize for DataJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        fn all<S: Serializer, T>(s: S, v: &[T], f: impl Fn(&T) -> Element) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(v.len()))?;
            for x in v {
                seq.serialize_element(&f(x))?;
            }
            seq.end()
        }
        match self.0 {
            TensorData::Bool(v) => all(s, v, |&x| Element::Bool(x)),
            TensorData::Uint8(v) => all(s, v, |&x| Element::U64(x.into())),
            TensorData::Uint16(v) => all(s, v, |&x| Element::U64(x.into())),
            TensorData::Uint32(v) => all(s, v, |&x| Element::U64(x.into())),
            TensorData::Uint64(v) => all(s, v, |&x| Element::U64(x)),
            TensorData::Int8(v) => all(s, v, |&x| Element::I64(x.into())),
            TensorData::Int16(v) => all(s, v, |&x| Element::I64(x.into())),
            TensorData::Int32(v) => all(s, v, |&x| Element::I64(x.into())),
            TensorData::Int64(v) => all(s, v, |&x| Element::I64(x)),
            TensorData::Fp16(v) => all(s, v, |&x| Element::F64(half::f16::from_bits(x).to_f64())),
            TensorData::Fp32(v) => all(s, v, |&x| Element::F32(x)),
            TensorData::Fp64(v) => all(s, v, |&x| Element::F64(x)),
            TensorData::Bytes(v) => all(s, v, |b| Element::Bytes(b)),
        }
    }
}

enum Element<'a> {
    Bool(bool),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bytes(&'a [u8]),
}

impl Serialize for Element<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        fn non_finite<S: Serializer>(s: S, x: f64) -> Result<S::Ok, S::Error> {
            s.serialize_str(if x.is_nan() {
                "NaN"
            } else if x > 0.0 {
                "Infinity"
            } else {
                "-Infinity"
            })
        }
        match *self {
            Element::Bool(b) => s.serialize_bool(b),
            Element::U64(v) => s.serialize_u64(v),
            Element::I64(v) => s.serialize_i64(v),
            // serde_json writes an f32 with the fewest digits that read back to the same f32.
            Element::F32(x) if x.is_finite() => s.serialize_f32(x),
            Element::F64(x) if x.is_finite() => s.serialize_f64(x),
            Element::F32(x) => non_finite(s, x.into()),
            Element::F64(x) => non_finite(s, x),
            Element::Bytes(b) => match std::str::from_utf8(b) {
                Ok(text) => s.serialize_str(text),
                Err(_) => {
                    let mut map = s.serialize_map(Some(1))?;
                    map.serialize_entry("b64", &base64::engine::general_purpose::STANDARD.encode(b))?;
                    map.end()
                }
            },
        }
    }
}

/// A tensor in KServe v2 JSON. With `binary_data_size`, its elements travel in the binary
/// section and the JSON says only how many bytes they take there.
pub struct TensorJson<'a> {
    /// The tensor.
    pub tensor: &'a Tensor,
    /// Set when the elements go in the binary section.
    pub binary_data_size: Option<usize>,
}

impl Serialize for TensorJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.tensor;
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("name", &t.name)?;
        map.serialize_entry("datatype", t.data.datatype().as_str())?;
        map.serialize_entry("shape", &t.shape)?;
        match self.binary_data_size {
            Some(size) => map.serialize_entry("parameters", &json!({ "binary_data_size": size }))?,
            None => map.serialize_entry("data", &DataJson(&t.data))?,
        }
        map.end()
    }
}

/// A response in KServe v2 JSON.
pub struct ResponseJson<'a> {
    /// `model_name`.
    pub model: &'a str,
    /// `model_version`, when there is one.
    pub version: Option<&'a str>,
    /// The request id (left out when empty).
    pub id: &'a str,
    /// The plugin's response.
    pub response: &'a Response,
    /// Per output, its size in the binary section when it goes there.
    pub binary_data_sizes: &'a [Option<usize>],
}

impl Serialize for ResponseJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Outputs<'a>(&'a ResponseJson<'a>);
        impl Serialize for Outputs<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let outputs = &self.0.response.outputs;
                let mut seq = s.serialize_seq(Some(outputs.len()))?;
                for (i, tensor) in outputs.iter().enumerate() {
                    let binary_data_size = self.0.binary_data_sizes.get(i).copied().flatten();
                    seq.serialize_element(&TensorJson { tensor, binary_data_size })?;
                }
                seq.end()
            }
        }
        struct Params<'a>(&'a [(String, String)]);
        impl Serialize for Params<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(Some(self.0.len()))?;
                for (k, v) in self.0 {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("model_name", self.model)?;
        if let Some(version) = self.version {
            map.serialize_entry("model_version", version)?;
        }
        if !self.id.is_empty() {
            map.serialize_entry("id", self.id)?;
        }
        if !self.response.parameters.is_empty() {
            map.serialize_entry("parameters", &Params(&self.response.parameters))?;
        }
        map.serialize_entry("outputs", &Outputs(self))?;
        map.end()
    }
}

/// The JSON form of plugin metadata (KServe v2 model metadata inputs/outputs).
pub fn metadata_to_json(name: &str, metadata: &Metadata) -> Value {
    let spec = |s: &TensorSpec| json!({ "name": s.name, "datatype": s.datatype.as_str(), "shape": s.shape });
    json!({
        "name": name,
        "description": metadata.description,
        "inputs": metadata.inputs.iter().map(spec).collect::<Vec<_>>(),
        "outputs": metadata.outputs.iter().map(spec).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_json(t: &Tensor) -> Vec<u8> {
        serde_json::to_vec(&TensorJson { tensor: t, binary_data_size: None }).unwrap()
    }

    /// One tensor, decoded as the only input of a request.
    fn decode_tensor(json: &[u8]) -> Result<Tensor, String> {
        let request = [&b"{\"inputs\":["[..], json, b"]}"].concat();
        Ok(decode_request(&request)?.into_request()?.inputs.remove(0))
    }

    #[test]
    fn every_datatype_round_trips() {
        let cases = vec![
            TensorData::Bool(vec![true, false]),
            TensorData::Uint8(vec![0, 255]),
            TensorData::Uint16(vec![0, 65535]),
            TensorData::Uint32(vec![0, u32::MAX]),
            TensorData::Uint64(vec![0, u64::MAX]),
            TensorData::Int8(vec![-128, 127]),
            TensorData::Int16(vec![-1, 1]),
            TensorData::Int32(vec![i32::MIN, i32::MAX]),
            TensorData::Int64(vec![i64::MIN, i64::MAX]),
            TensorData::Fp16(vec![half::f16::from_f32(1.5).to_bits(), half::f16::from_f32(-2.0).to_bits()]),
            TensorData::Fp32(vec![0.25, -1e30]),
            TensorData::Fp64(vec![f64::MIN_POSITIVE, 1e300]),
            TensorData::Bytes(vec![b"text".to_vec(), vec![0xff, 0x00]]),
        ];
        for data in cases {
            let t = Tensor { name: "t".into(), shape: vec![2], data };
            assert_eq!(decode_tensor(&to_json(&t)).unwrap(), t);
        }
    }

    #[test]
    fn floats_are_short_and_non_finite_values_are_strings() {
        let t = Tensor {
            name: "f".into(),
            shape: vec![4],
            data: TensorData::Fp32(vec![0.1, f32::NAN, -f32::INFINITY, 3.0]),
        };
        let text = String::from_utf8(to_json(&t)).unwrap();
        assert!(text.contains(r#""data":[0.1,"NaN","-Infinity",3.0]"#), "{text}");
        let back = decode_tensor(text.as_bytes()).unwrap();
        let TensorData::Fp32(v) = back.data else { panic!("not FP32") };
        assert!(v[1].is_nan() && v[2] == f32::NEG_INFINITY && v[0] == 0.1);
    }

    #[test]
    fn nested_data_is_flattened_and_ranges_checked() {
        let t = decode_tensor(br#"{"name":"m","datatype":"INT32","shape":[2,2],"data":[[1,2],[3,4]]}"#).unwrap();
        assert_eq!(t.data, TensorData::Int32(vec![1, 2, 3, 4]));
        let err = decode_tensor(br#"{"name":"m","datatype":"UINT8","shape":[1],"data":[256]}"#).unwrap_err();
        assert!(err.contains("tensor `m`: 256 is not a valid UINT8"), "{err}");
        let err = decode_tensor(br#"{"name":"m","datatype":"INT8","shape":[1],"data":[1.5]}"#).unwrap_err();
        assert!(err.contains("1.5 is not a valid INT8"), "{err}");
        let err = decode_tensor(br#"{"name":"m","datatype":"FP32","shape":[3],"data":[1.0]}"#).unwrap_err();
        assert!(err.contains("3 elements but 1"), "{err}");
        let err = decode_tensor(br#"{"name":"m","datatype":"FP32","shape":[-1],"data":[]}"#).unwrap_err();
        assert!(err.contains("non-negative integers"), "{err}");
        let err = decode_tensor(br#"{"name":"m","datatype":"BF16","shape":[1],"data":[1]}"#).unwrap_err();
        assert!(err.contains("unknown datatype `BF16`"), "{err}");
        let err = decode_tensor(br#"{"name":"m","datatype":"BYTES","shape":[1],"data":[{"b64":"%%"}]}"#).unwrap_err();
        assert!(err.contains("not base64"), "{err}");
    }

    #[test]
    fn data_before_datatype_is_decoded_typed_on_a_second_pass() {
        let req =
            decode_request(br#"{"inputs":[{"data":[[1,2],[3,4]],"shape":[4],"name":"x","datatype":"UINT64"},{"name":"y","datatype":"FP32","shape":[1],"data":[0.5]}]}"#)
                .unwrap()
                .into_request()
                .unwrap();
        assert_eq!(req.inputs[0].data, TensorData::Uint64(vec![1, 2, 3, 4]));
        assert_eq!(req.inputs[1].data, TensorData::Fp32(vec![0.5]));
        let err =
            decode_request(br#"{"inputs":[{"data":[-1],"shape":[1],"name":"x","datatype":"UINT64"}]}"#).unwrap_err();
        assert!(err.contains("-1 is not a valid UINT64"), "{err}");
    }

    #[test]
    fn requests_parse_with_outputs_and_parameters() {
        let req = decode_request(
            br#"{"id": 42, "inputs": [{"name":"text","datatype":"BYTES","shape":[1],"data":["hi"]}],
                "outputs": [{"name":"y","parameters":{"binary_data":true}}, {"name":"z"}],
                "parameters": {"k": 3, "mode": "fast", "list": [1, "a", {"b": null}], "x": 0.5}}"#,
        )
        .unwrap();
        assert_eq!(req.id, "42");
        assert!(req.outputs[0].binary_data() && !req.outputs[1].binary_data());
        let params: std::collections::HashMap<_, _> = req.parameters.iter().cloned().collect();
        assert_eq!(params["k"], "3");
        assert_eq!(params["mode"], "fast");
        assert_eq!(params["list"], r#"[1,"a",{"b":null}]"#);
        assert_eq!(params["x"], "0.5");
        let req = req.into_request().unwrap();
        assert_eq!(req.outputs, vec!["y".to_string(), "z".to_string()]);
    }

    #[test]
    fn malformed_requests_are_errors_that_say_what() {
        for (body, want) in [
            (&br#"[1,2]"#[..], "KServe v2 inference request"),
            (br#"{"id":"1"}"#, "no `inputs` array"),
            (br#"{"inputs":[{"datatype":"FP32","shape":[1],"data":[1]}]}"#, "without a string `name`"),
            (br#"{"inputs":[{"name":"x","shape":[1],"data":[1]}]}"#, "missing `datatype`"),
            (br#"{"inputs":[{"name":"x","datatype":"FP32","data":[1]}]}"#, "missing `shape`"),
            (br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1]}]}"#, "missing `data`"),
            (br#"{"inputs":[{"name":"x","datatype":"BOOL","shape":[1],"data":[1]}]}"#, "not a boolean"),
            (br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[null]}]}"#, "null is not a number"),
            (br#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1],"data":[2]}]}"#, "twice"),
            (br#"{"inputs":[]} trailing"#, "not valid JSON: trailing"),
            (br#"{not json"#, "not valid JSON"),
        ] {
            let err = decode_request(body).and_then(WireRequest::into_request).unwrap_err();
            assert!(err.contains(want), "{}: {err}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn responses_serialise_without_a_tree() {
        let response = Response {
            outputs: vec![
                Tensor { name: "y".into(), shape: vec![2], data: TensorData::Int64(vec![1, -1]) },
                Tensor { name: "s".into(), shape: vec![1], data: TensorData::Bytes(vec![vec![0xff]]) },
            ],
            parameters: vec![("p".into(), "v".into())],
        };
        let json = ResponseJson {
            model: "m",
            version: Some("1"),
            id: "7",
            response: &response,
            binary_data_sizes: &[Some(16)],
        };
        let v: Value = serde_json::to_value(&json).unwrap();
        assert_eq!(
            v,
            json!({"model_name":"m","model_version":"1","id":"7","parameters":{"p":"v"},"outputs":[
                {"name":"y","datatype":"INT64","shape":[2],"parameters":{"binary_data_size":16}},
                {"name":"s","datatype":"BYTES","shape":[1],"data":[{"b64":"/w=="}]}]})
        );
    }
}
