//! The KServe v2 (Open Inference Protocol) REST codec: JSON tensors, and the binary tensor
//! data extension (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data` /
//! `binary_data_output`) in both directions.

use serde_json::{Map, Value, json};

use crate::tensor::{self, Datatype, Request, Response, Tensor, TensorData};

/// The header that splits a JSON header from binary tensor data.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// A decoded inference request, with what the caller wants back in binary.
pub struct Decoded {
    /// The plugin request.
    pub request: Request,
    /// Outputs to return as binary data (by name), or all of them.
    pub binary: BinaryOutputs,
}

/// Which outputs go back as binary data.
#[derive(Debug, Default, PartialEq)]
pub enum BinaryOutputs {
    /// None: JSON data only.
    #[default]
    None,
    /// Every output (`binary_data_output: true`).
    All,
    /// The named ones (`outputs[].parameters.binary_data`).
    Some(Vec<String>),
}

impl BinaryOutputs {
    fn wants(&self, name: &str) -> bool {
        match self {
            Self::None => false,
            Self::All => true,
            Self::Some(names) => names.iter().any(|n| n == name),
        }
    }
}

/// Decodes a request body; `header_len` is the value of [`HEADER_LENGTH`] when present.
pub fn decode(body: &[u8], header_len: Option<usize>) -> Result<Decoded, String> {
    let (head, mut binary) = match header_len {
        Some(n) if n <= body.len() => (&body[..n], &body[n..]),
        Some(n) => return Err(format!("{HEADER_LENGTH} is {n}, but the body has {} bytes", body.len())),
        None => (body, &[][..]),
    };
    let json: Value = serde_json::from_slice(head).map_err(|e| format!("the request is not JSON: {e}"))?;
    let obj = json.as_object().ok_or("the request must be a JSON object")?;
    let id = obj.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
    let params = obj.get("parameters").and_then(Value::as_object);
    let mut inputs = Vec::new();
    for input in obj.get("inputs").and_then(Value::as_array).ok_or("the request has no `inputs` array")? {
        let size = input
            .get("parameters")
            .and_then(|p| p.get("binary_data_size"))
            .map(|s| s.as_u64().ok_or("binary_data_size must be a non-negative integer"))
            .transpose()?;
        let t = match size {
            None => tensor::tensor_from_json(input)?,
            Some(size) => {
                let size = usize::try_from(size).map_err(|_| "binary_data_size too large")?;
                if size > binary.len() {
                    return Err(format!("binary_data_size {size} runs past the end of the body"));
                }
                let (chunk, rest) = binary.split_at(size);
                binary = rest;
                binary_tensor(input, chunk)?
            }
        };
        inputs.push(t);
    }
    if !binary.is_empty() {
        return Err(format!("{} bytes of binary data belong to no input", binary.len()));
    }
    let mut outputs = Vec::new();
    let mut binary_names = Vec::new();
    if let Some(outs) = obj.get("outputs") {
        for o in outs.as_array().ok_or("`outputs` must be an array")? {
            let name = o.get("name").and_then(Value::as_str).ok_or("each requested output needs a `name`")?;
            outputs.push(name.to_string());
            if o.get("parameters").and_then(|p| p.get("binary_data")).and_then(Value::as_bool) == Some(true) {
                binary_names.push(name.to_string());
            }
        }
    }
    let binary = if params.and_then(|p| p.get("binary_data_output")).and_then(Value::as_bool) == Some(true) {
        BinaryOutputs::All
    } else if binary_names.is_empty() {
        BinaryOutputs::None
    } else {
        BinaryOutputs::Some(binary_names)
    };
    let parameters = params
        .map(|p| {
            p.iter()
                .filter(|(k, _)| k.as_str() != "binary_data_output")
                .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(Decoded { request: Request { id, inputs, outputs, parameters }, binary })
}

/// A tensor whose elements come from the binary section.
fn binary_tensor(meta: &Value, bytes: &[u8]) -> Result<Tensor, String> {
    let name = meta.get("name").and_then(Value::as_str).ok_or("tensor without a string `name`")?.to_string();
    let dt =
        meta.get("datatype").and_then(Value::as_str).ok_or_else(|| format!("tensor `{name}`: missing `datatype`"))?;
    let datatype = Datatype::parse(dt).ok_or_else(|| format!("tensor `{name}`: unknown datatype `{dt}`"))?;
    let shape: Vec<u64> = meta
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("tensor `{name}`: missing `shape`"))?
        .iter()
        .map(|d| d.as_u64().ok_or_else(|| format!("tensor `{name}`: bad shape")))
        .collect::<Result<_, _>>()?;
    let data = decode_binary(datatype, bytes).map_err(|e| format!("tensor `{name}`: {e}"))?;
    let t = Tensor { name, shape, data };
    t.validate()?;
    Ok(t)
}

fn le<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Result<Vec<T>, String> {
    if !bytes.len().is_multiple_of(N) {
        return Err(format!("{} bytes is not a whole number of {N}-byte elements", bytes.len()));
    }
    Ok(bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect())
}

/// Raw little-endian elements; BYTES as 4-byte length-prefixed strings.
pub fn decode_binary(datatype: Datatype, bytes: &[u8]) -> Result<TensorData, String> {
    Ok(match datatype {
        Datatype::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        Datatype::Uint8 => TensorData::Uint8(bytes.to_vec()),
        Datatype::Int8 => TensorData::Int8(bytes.iter().map(|&b| b as i8).collect()),
        Datatype::Uint16 => TensorData::Uint16(le(bytes, u16::from_le_bytes)?),
        Datatype::Int16 => TensorData::Int16(le(bytes, i16::from_le_bytes)?),
        Datatype::Fp16 => TensorData::Fp16(le(bytes, u16::from_le_bytes)?),
        Datatype::Uint32 => TensorData::Uint32(le(bytes, u32::from_le_bytes)?),
        Datatype::Int32 => TensorData::Int32(le(bytes, i32::from_le_bytes)?),
        Datatype::Fp32 => TensorData::Fp32(le(bytes, f32::from_le_bytes)?),
        Datatype::Uint64 => TensorData::Uint64(le(bytes, u64::from_le_bytes)?),
        Datatype::Int64 => TensorData::Int64(le(bytes, i64::from_le_bytes)?),
        Datatype::Fp64 => TensorData::Fp64(le(bytes, f64::from_le_bytes)?),
        Datatype::Bytes => {
            let mut out = Vec::new();
            let mut rest = bytes;
            while !rest.is_empty() {
                if rest.len() < 4 {
                    return Err("a BYTES element is cut short".into());
                }
                let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                if rest.len() - 4 < n {
                    return Err("a BYTES element runs past its tensor".into());
                }
                out.push(rest[4..4 + n].to_vec());
                rest = &rest[4 + n..];
            }
            TensorData::Bytes(out)
        }
    })
}

/// The binary form of tensor data.
pub fn encode_binary(data: &TensorData) -> Vec<u8> {
    fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        let mut out = Vec::with_capacity(v.len() * N);
        for &x in v {
            out.extend_from_slice(&f(x));
        }
        out
    }
    match data {
        TensorData::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
        TensorData::Uint8(v) => v.clone(),
        TensorData::Int8(v) => v.iter().map(|&x| x as u8).collect(),
        TensorData::Uint16(v) | TensorData::Fp16(v) => le(v, u16::to_le_bytes),
        TensorData::Int16(v) => le(v, i16::to_le_bytes),
        TensorData::Uint32(v) => le(v, u32::to_le_bytes),
        TensorData::Int32(v) => le(v, i32::to_le_bytes),
        TensorData::Fp32(v) => le(v, f32::to_le_bytes),
        TensorData::Uint64(v) => le(v, u64::to_le_bytes),
        TensorData::Int64(v) => le(v, i64::to_le_bytes),
        TensorData::Fp64(v) => le(v, f64::to_le_bytes),
        TensorData::Bytes(v) => {
            let mut out = Vec::new();
            for b in v {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
            out
        }
    }
}

/// Encodes a response: the JSON body, and the binary section when any output is binary
/// (then the JSON length goes in [`HEADER_LENGTH`]).
pub fn encode(
    model: &str,
    version: &str,
    id: &str,
    response: &Response,
    binary: &BinaryOutputs,
) -> (Vec<u8>, Option<usize>) {
    let mut blob = Vec::new();
    let outputs: Vec<Value> = response
        .outputs
        .iter()
        .map(|t| {
            if binary.wants(&t.name) {
                let bytes = encode_binary(&t.data);
                let size = bytes.len();
                blob.extend(bytes);
                json!({
                    "name": t.name,
                    "datatype": t.data.datatype().as_str(),
                    "shape": t.shape,
                    "parameters": { "binary_data_size": size },
                })
            } else {
                tensor::tensor_to_json(t)
            }
        })
        .collect();
    let mut out = Map::new();
    out.insert("model_name".into(), json!(model));
    out.insert("model_version".into(), json!(version));
    if !id.is_empty() {
        out.insert("id".into(), json!(id));
    }
    if !response.parameters.is_empty() {
        out.insert(
            "parameters".into(),
            Value::Object(response.parameters.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
        );
    }
    out.insert("outputs".into(), Value::Array(outputs));
    let mut body = serde_json::to_vec(&Value::Object(out)).unwrap_or_default();
    if blob.is_empty() {
        return (body, None);
    }
    let header = body.len();
    body.extend(blob);
    (body, Some(header))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_inputs_follow_the_json_header() {
        let header = br#"{"id":"7","inputs":[{"name":"x","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}},{"name":"t","datatype":"BYTES","shape":[2],"parameters":{"binary_data_size":11}}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;
        let mut body = header.to_vec();
        body.extend(1.5f32.to_le_bytes());
        body.extend((-2f32).to_le_bytes());
        body.extend(3u32.to_le_bytes());
        body.extend(b"abc");
        body.extend(0u32.to_le_bytes());
        let d = decode(&body, Some(header.len())).unwrap();
        assert_eq!(d.request.id, "7");
        assert_eq!(d.request.inputs[0].data, TensorData::Fp32(vec![1.5, -2.0]));
        assert_eq!(d.request.inputs[1].data, TensorData::Bytes(vec![b"abc".to_vec(), vec![]]));
        assert_eq!(d.binary, BinaryOutputs::Some(vec!["y".into()]));
        assert!(decode(&body[..body.len() - 1], Some(header.len())).is_err(), "short binary data is an error");
    }

    #[test]
    fn binary_outputs_round_trip() {
        let response = Response {
            outputs: vec![
                Tensor { name: "y".into(), shape: vec![2], data: TensorData::Int64(vec![1, -1]) },
                Tensor { name: "s".into(), shape: vec![1], data: TensorData::Bytes(vec![b"hi".to_vec()]) },
            ],
            parameters: vec![],
        };
        let (body, header) = encode("m", "1", "", &response, &BinaryOutputs::Some(vec!["y".into()]));
        let header = header.unwrap();
        let json: Value = serde_json::from_slice(&body[..header]).unwrap();
        assert_eq!(json["outputs"][0]["parameters"]["binary_data_size"], 16);
        assert_eq!(json["outputs"][1]["data"], json!(["hi"]));
        assert_eq!(decode_binary(Datatype::Int64, &body[header..]).unwrap(), TensorData::Int64(vec![1, -1]));
    }
}
