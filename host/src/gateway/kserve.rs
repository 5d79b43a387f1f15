//! The KServe v2 (Open Inference Protocol) REST codec: JSON tensors, and the binary tensor
//! data extension (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data` /
//! `binary_data_output`) in both directions.

use crate::tensor::json;
use crate::tensor::{Datatype, Request, Response, TensorData};

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
    let wire = json::decode_request(head)?;
    let mut inputs = Vec::with_capacity(wire.inputs.len());
    for input in wire.inputs {
        let data = match input.binary_data_size {
            None => None,
            Some(size) => {
                let size = usize::try_from(size).ok().filter(|&s| s <= binary.len()).ok_or_else(|| {
                    format!("tensor `{}`: binary_data_size {size} runs past the end of the body", input.name)
                })?;
                let (chunk, rest) = binary.split_at(size);
                binary = rest;
                Some(decode_binary(input.datatype, chunk).map_err(|e| format!("tensor `{}`: {e}", input.name))?)
            }
        };
        inputs.push(input.into_tensor(data)?);
    }
    if !binary.is_empty() {
        return Err(format!("{} bytes of binary data belong to no input", binary.len()));
    }
    let binary_names: Vec<String> = wire.outputs.iter().filter(|o| o.binary_data()).map(|o| o.name.clone()).collect();
    let all_binary = wire.parameters.iter().any(|(k, v)| k == "binary_data_output" && v == "true");
    let binary = if all_binary {
        BinaryOutputs::All
    } else if binary_names.is_empty() {
        BinaryOutputs::None
    } else {
        BinaryOutputs::Some(binary_names)
    };
    let parameters = wire.parameters.into_iter().filter(|(k, _)| k != "binary_data_output").collect();
    let outputs = wire.outputs.into_iter().map(|o| o.name).collect();
    Ok(Decoded { request: Request { id: wire.id, inputs, outputs, parameters }, binary })
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

/// Appends the binary form of tensor data to `out`.
pub fn encode_binary(data: &TensorData, out: &mut Vec<u8>) {
    fn le<T: Copy, const N: usize>(v: &[T], out: &mut Vec<u8>, f: impl Fn(T) -> [u8; N]) {
        out.reserve(v.len() * N);
        for &x in v {
            out.extend_from_slice(&f(x));
        }
    }
    match data {
        TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        TensorData::Uint8(v) => out.extend_from_slice(v),
        TensorData::Int8(v) => out.extend(v.iter().map(|&x| x as u8)),
        TensorData::Uint16(v) | TensorData::Fp16(v) => le(v, out, u16::to_le_bytes),
        TensorData::Int16(v) => le(v, out, i16::to_le_bytes),
        TensorData::Uint32(v) => le(v, out, u32::to_le_bytes),
        TensorData::Int32(v) => le(v, out, i32::to_le_bytes),
        TensorData::Fp32(v) => le(v, out, f32::to_le_bytes),
        TensorData::Uint64(v) => le(v, out, u64::to_le_bytes),
        TensorData::Int64(v) => le(v, out, i64::to_le_bytes),
        TensorData::Fp64(v) => le(v, out, f64::to_le_bytes),
        TensorData::Bytes(v) => {
            for b in v {
                // An element over 4 GiB cannot be in a response: max_response is far below that.
                out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes());
                out.extend_from_slice(b);
            }
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
    let sizes: Vec<Option<usize>> = response
        .outputs
        .iter()
        .map(|t| {
            binary.wants(&t.name).then(|| {
                let start = blob.len();
                encode_binary(&t.data, &mut blob);
                blob.len() - start
            })
        })
        .collect();
    let json = json::ResponseJson { model, version: Some(version), id, response, binary_data_sizes: &sizes };
    // Serialising plain data into a vector cannot fail.
    let mut body = serde_json::to_vec(&json).unwrap_or_default();
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
    use crate::tensor::Tensor;
    use serde_json::{Value, json};

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
