//! `--input` and `--param` syntax of `eir run`.
//!
//! - `NAME=TEXT`: a `BYTES` element holding the UTF-8 text.
//! - `NAME=@FILE`: a `BYTES` element holding the file's bytes (`@-` reads stdin).
//! - `NAME:DTYPE=1,2,3`: a numeric tensor of shape `[3]`; `NAME:DTYPE[2,2]=1,2,3,4` gives the shape.
//!
//! Repeating a `BYTES` input appends elements: `--input text=a --input text=b` is shape `[2]`.

use std::io::Read;

use crate::tensor::{Datatype, Tensor, TensorData, json};
use anyhow::{Context, bail};

/// Builds the input tensors from `--input` values, in order of first appearance.
pub fn parse_inputs(specs: &[String]) -> anyhow::Result<Vec<Tensor>> {
    let mut tensors: Vec<Tensor> = Vec::new();
    for spec in specs {
        let tensor = parse_one(spec).with_context(|| format!("--input {spec:?}"))?;
        match tensors.iter_mut().find(|t| t.name == tensor.name) {
            Some(existing) => match (&mut existing.data, tensor.data) {
                (TensorData::Bytes(all), TensorData::Bytes(more)) => {
                    all.extend(more);
                    existing.shape = vec![all.len() as u64];
                }
                _ => bail!("--input {spec:?}: `{}` is given twice (only BYTES inputs may repeat)", tensor.name),
            },
            None => tensors.push(tensor),
        }
    }
    Ok(tensors)
}

fn parse_one(spec: &str) -> anyhow::Result<Tensor> {
    let (key, value) = spec.split_once('=').context("expected NAME=VALUE, NAME=@FILE or NAME:DTYPE[SHAPE]=V,V,...")?;
    let Some((name, typed)) = key.split_once(':') else {
        let bytes = match value.strip_prefix('@') {
            Some("-") => {
                let mut buf = Vec::new();
                std::io::stdin().read_to_end(&mut buf).context("reading stdin")?;
                buf
            }
            Some(path) => std::fs::read(path).with_context(|| format!("reading {path}"))?,
            None => value.as_bytes().to_vec(),
        };
        check_name(key)?;
        return Ok(Tensor { name: key.to_string(), shape: vec![1], data: TensorData::Bytes(vec![bytes]) });
    };
    check_name(name)?;
    let (dtype_name, shape) = match typed.split_once('[') {
        Some((d, rest)) => {
            let dims = rest.strip_suffix(']').context("shape must end with `]`")?;
            let shape = dims
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse::<u64>().with_context(|| format!("bad dimension `{s}`")))
                .collect::<anyhow::Result<Vec<u64>>>()?;
            (d, Some(shape))
        }
        None => (typed, None),
    };
    let datatype = Datatype::parse(dtype_name).with_context(|| {
        let names: Vec<&str> = Datatype::ALL.iter().map(|d| d.as_str()).collect();
        format!("unknown datatype `{dtype_name}` (one of {})", names.join(", "))
    })?;
    // The values as a JSON array, decoded like a request's `data`.
    let items: Vec<String> = if datatype == Datatype::Bytes {
        value.split(',').map(|s| serde_json::Value::String(s.to_string()).to_string()).collect()
    } else {
        value
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| json_scalar(s.trim()))
            .collect::<anyhow::Result<_>>()?
    };
    let data = json::decode_data(datatype, format!("[{}]", items.join(",")).as_bytes()).map_err(anyhow::Error::msg)?;
    let shape = shape.unwrap_or_else(|| vec![data.len() as u64]);
    let tensor = Tensor { name: name.to_string(), shape, data };
    tensor.validate().map_err(anyhow::Error::msg)?;
    Ok(tensor)
}

/// One `--input` value as JSON: numbers and booleans as they are, NaN and infinities as the
/// strings KServe JSON uses for them.
fn json_scalar(s: &str) -> anyhow::Result<String> {
    Ok(match s {
        "true" | "false" => s.to_string(),
        "nan" | "NaN" => "\"NaN\"".into(),
        "inf" | "Infinity" => "\"Infinity\"".into(),
        "-inf" | "-Infinity" => "\"-Infinity\"".into(),
        _ => {
            serde_json::from_str::<serde_json::Number>(s).with_context(|| format!("`{s}` is not a number"))?.to_string()
        }
    })
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() {
        bail!("the input name is empty");
    }
    Ok(())
}

/// Parses `--param KEY=VALUE`.
pub fn parse_param(spec: &str) -> Result<(String, String), String> {
    spec.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{spec}`: expected KEY=VALUE"))
}

/// Parses `--env NAME[=VALUE]`; a bare NAME takes the host's value.
pub fn parse_env(spec: &str) -> Result<(String, String), String> {
    match spec.split_once('=') {
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => std::env::var(spec)
            .map(|v| (spec.to_string(), v))
            .map_err(|_| format!("--env {spec}: not set in the host environment (use {spec}=VALUE)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_inputs_repeat_into_one_tensor() {
        let t = parse_inputs(&["text=hello".into(), "text=a=b".into()]).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].shape, vec![2]);
        assert_eq!(t[0].data, TensorData::Bytes(vec![b"hello".to_vec(), b"a=b".to_vec()]));
    }

    #[test]
    fn typed_inputs_carry_shapes() {
        let t = parse_inputs(&["x:FP32[2,2]=1,2,3,4.5".into(), "k:int64=7".into()]).unwrap();
        assert_eq!(t[0].shape, vec![2, 2]);
        assert_eq!(t[0].data, TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.5]));
        assert_eq!(t[1].data, TensorData::Int64(vec![7]));
        assert!(parse_inputs(&["x:FP32[3]=1,2".into()]).is_err());
        assert!(parse_inputs(&["x:FP33=1".into()]).is_err());
        assert!(parse_inputs(&["x:UINT8=300".into()]).is_err());
        assert!(parse_inputs(&["x:FP32=1".into(), "x:FP32=2".into()]).is_err());
    }

    #[test]
    fn file_inputs_read_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, [0u8, 159, 146, 150]).unwrap();
        let t = parse_inputs(&[format!("image=@{}", path.display())]).unwrap();
        assert_eq!(t[0].data, TensorData::Bytes(vec![vec![0, 159, 146, 150]]));
        assert!(parse_inputs(&["image=@/no/such/file".into()]).is_err());
    }
}
