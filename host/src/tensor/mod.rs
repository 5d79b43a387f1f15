//! The tensors a plugin exchanges with its caller (the `eir:plugin/types` WIT records), their
//! validation, and their KServe v2 JSON form (shared by `eir run` and the gateway).

use base64::Engine as _;
use serde_json::{Map, Value, json};

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

/// The KServe v2 JSON form of a tensor. `BYTES` elements are strings when they are UTF-8, and
/// `{"b64": "..."}` otherwise (JSON cannot carry raw bytes; the binary extension can).
pub fn tensor_to_json(t: &Tensor) -> Value {
    let data: Vec<Value> = match &t.data {
        TensorData::Bool(v) => v.iter().map(|&x| json!(x)).collect(),
        TensorData::Uint8(v) => v.iter().map(|&x| json!(x)).collect(),
        TensorData::Uint16(v) => v.iter().map(|&x| json!(x)).collect(),
        TensorData::Uint32(v) => v.iter().map(|&x| json!(x)).collect(),
        TensorData::Uint64(v) => v.iter().map(|&x| json!(x)).collect(),
        TensorData::Int8(v) => v.iter().map(|&x| json!(x)).collect(),
        TensorData::Int16(v) => v.iter().map(|&x| json!(x)).collect(),
        TensorData::Int32(v) => v.iter().map(|&x| json!(x)).collect(),
        TensorData::Int64(v) => v.iter().map(|&x| json!(x)).collect(),
        TensorData::Fp16(v) => v.iter().map(|&x| float_json(half::f16::from_bits(x).to_f64())).collect(),
        TensorData::Fp32(v) => v.iter().map(|&x| f32_json(x)).collect(),
        TensorData::Fp64(v) => v.iter().map(|&x| float_json(x)).collect(),
        TensorData::Bytes(v) => v.iter().map(|b| bytes_json(b)).collect(),
    };
    json!({
        "name": t.name,
        "datatype": t.data.datatype().as_str(),
        "shape": t.shape,
        "data": data,
    })
}

/// JSON has no NaN or infinity: they are written as strings, as Python's json module reads them.
fn float_json(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else if x.is_nan() {
        json!("NaN")
    } else if x > 0.0 {
        json!("Infinity")
    } else {
        json!("-Infinity")
    }
}

/// An f32 written with the fewest digits that read back to the same f32 (not the long
/// expansion of its f64 widening).
fn f32_json(x: f32) -> Value {
    if !x.is_finite() {
        return float_json(f64::from(x));
    }
    let mut buf = ryu::Buffer::new();
    let short: f64 = buf.format_finite(x).parse().unwrap_or(f64::from(x));
    json!(short)
}

fn bytes_json(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => json!(s),
        Err(_) => json!({ "b64": base64::engine::general_purpose::STANDARD.encode(b) }),
    }
}

/// Parses a KServe v2 JSON input tensor (`name`, `datatype`, `shape`, `data` flat or nested).
pub fn tensor_from_json(v: &Value) -> Result<Tensor, String> {
    let obj = v.as_object().ok_or("a tensor must be a JSON object")?;
    let name = obj.get("name").and_then(Value::as_str).ok_or("tensor without a string `name`")?.to_string();
    let dt_name =
        obj.get("datatype").and_then(Value::as_str).ok_or_else(|| format!("tensor `{name}`: missing `datatype`"))?;
    let datatype = Datatype::parse(dt_name).ok_or_else(|| format!("tensor `{name}`: unknown datatype `{dt_name}`"))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("tensor `{name}`: missing `shape`"))?
        .iter()
        .map(|d| d.as_u64().ok_or_else(|| format!("tensor `{name}`: shape dimensions must be non-negative integers")))
        .collect::<Result<Vec<u64>, _>>()?;
    let mut flat = Vec::new();
    flatten(obj.get("data").ok_or_else(|| format!("tensor `{name}`: missing `data`"))?, &mut flat);
    let data = data_from_json(datatype, &flat).map_err(|e| format!("tensor `{name}`: {e}"))?;
    let tensor = Tensor { name, shape, data };
    tensor.validate()?;
    Ok(tensor)
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// Converts flat JSON values to elements of `datatype`, range-checking integers.
pub fn data_from_json(datatype: Datatype, values: &[&Value]) -> Result<TensorData, String> {
    fn ints<T: TryFrom<i64> + TryFrom<u64>>(values: &[&Value], what: &str) -> Result<Vec<T>, String> {
        values
            .iter()
            .map(|v| {
                let converted = if let Some(u) = v.as_u64() {
                    T::try_from(u).ok()
                } else {
                    v.as_i64().and_then(|i| T::try_from(i).ok())
                };
                converted.ok_or_else(|| format!("{v} is not a valid {what}"))
            })
            .collect()
    }
    fn floats(values: &[&Value]) -> Result<Vec<f64>, String> {
        values
            .iter()
            .map(|v| match v {
                Value::Number(n) => n.as_f64().ok_or_else(|| format!("{v} is not a number")),
                Value::String(s) if s == "NaN" => Ok(f64::NAN),
                Value::String(s) if s == "Infinity" => Ok(f64::INFINITY),
                Value::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
                _ => Err(format!("{v} is not a number")),
            })
            .collect()
    }
    Ok(match datatype {
        Datatype::Bool => TensorData::Bool(
            values
                .iter()
                .map(|v| v.as_bool().ok_or_else(|| format!("{v} is not a boolean")))
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Uint8 => TensorData::Uint8(ints(values, "UINT8")?),
        Datatype::Uint16 => TensorData::Uint16(ints(values, "UINT16")?),
        Datatype::Uint32 => TensorData::Uint32(ints(values, "UINT32")?),
        Datatype::Uint64 => TensorData::Uint64(ints(values, "UINT64")?),
        Datatype::Int8 => TensorData::Int8(ints(values, "INT8")?),
        Datatype::Int16 => TensorData::Int16(ints(values, "INT16")?),
        Datatype::Int32 => TensorData::Int32(ints(values, "INT32")?),
        Datatype::Int64 => TensorData::Int64(ints(values, "INT64")?),
        Datatype::Fp16 => {
            TensorData::Fp16(floats(values)?.into_iter().map(|x| half::f16::from_f64(x).to_bits()).collect())
        }
        Datatype::Fp32 => TensorData::Fp32(floats(values)?.into_iter().map(|x| x as f32).collect()),
        Datatype::Fp64 => TensorData::Fp64(floats(values)?),
        Datatype::Bytes => TensorData::Bytes(
            values
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_bytes().to_vec()),
                    Value::Object(o) => o
                        .get("b64")
                        .and_then(Value::as_str)
                        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                        .ok_or_else(|| format!("{v} is not a string or {{\"b64\": ...}}")),
                    _ => Err(format!("{v} is not a string")),
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// The KServe v2 JSON form of a response.
pub fn response_to_json(model: &str, id: &str, response: &Response) -> Value {
    let mut out = Map::new();
    out.insert("model_name".into(), json!(model));
    if !id.is_empty() {
        out.insert("id".into(), json!(id));
    }
    if !response.parameters.is_empty() {
        let params: Map<String, Value> = response.parameters.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        out.insert("parameters".into(), Value::Object(params));
    }
    out.insert("outputs".into(), Value::Array(response.outputs.iter().map(tensor_to_json).collect()));
    Value::Object(out)
}

/// Parses a KServe v2 JSON inference request body.
pub fn request_from_json(v: &Value) -> Result<Request, String> {
    let obj = v.as_object().ok_or("the request must be a JSON object")?;
    let id = obj.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
    let inputs = obj
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or("the request has no `inputs` array")?
        .iter()
        .map(tensor_from_json)
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = match obj.get("outputs") {
        Some(Value::Array(outs)) => outs
            .iter()
            .map(|o| {
                o.get("name").and_then(Value::as_str).map(str::to_string).ok_or("each requested output needs a `name`")
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err("`outputs` must be an array".into()),
        None => Vec::new(),
    };
    let parameters = match obj.get("parameters") {
        Some(Value::Object(params)) => params
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
            .collect(),
        Some(_) => return Err("`parameters` must be an object".into()),
        None => Vec::new(),
    };
    Ok(Request { id, inputs, outputs, parameters })
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

    #[test]
    fn json_round_trip_of_every_datatype() {
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
            let back = tensor_from_json(&tensor_to_json(&t)).unwrap();
            assert_eq!(back, t);
        }
    }

    #[test]
    fn nested_data_is_flattened_and_ranges_checked() {
        let t = tensor_from_json(&json!({"name":"m","datatype":"INT32","shape":[2,2],"data":[[1,2],[3,4]]})).unwrap();
        assert_eq!(t.data, TensorData::Int32(vec![1, 2, 3, 4]));
        let err = tensor_from_json(&json!({"name":"m","datatype":"UINT8","shape":[1],"data":[256]})).unwrap_err();
        assert!(err.contains("not a valid UINT8"), "{err}");
        let err = tensor_from_json(&json!({"name":"m","datatype":"FP32","shape":[3],"data":[1.0]})).unwrap_err();
        assert!(err.contains("3 elements but 1"), "{err}");
    }

    #[test]
    fn requests_parse_with_outputs_and_parameters() {
        let req = request_from_json(&json!({
            "id": "42",
            "inputs": [{"name":"text","datatype":"BYTES","shape":[1],"data":["hi"]}],
            "outputs": [{"name":"y"}],
            "parameters": {"k": 3, "mode": "fast"}
        }))
        .unwrap();
        assert_eq!(req.id, "42");
        assert_eq!(req.outputs, vec!["y".to_string()]);
        assert!(req.parameters.contains(&("k".into(), "3".into())));
        assert!(req.parameters.contains(&("mode".into(), "fast".into())));
    }
}
