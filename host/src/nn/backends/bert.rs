//! BERT encoders (`model_type: "bert"`) from `config.json` + `model.safetensors`, on
//! candle-transformers' `BertModel`.
//!
//! Inputs: `input_ids` (required), `attention_mask` (default all ones) and `token_type_ids`
//! (default zeros), I64 or I32, shape `[batch, seq]`. Output: `last_hidden_state`, FP32
//! `[batch, seq, hidden]`. Every input is checked (shapes, id ranges, sequence length) before
//! candle sees it, so a bad request is an `invalid-argument` error, never a panic.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

use crate::nn::backend::{Model, Named};
use crate::nn::bindings::tensor::TensorType;
use crate::nn::error::NnError;
use crate::nn::tensor::HostTensor;

/// The inputs a BERT graph takes, in order of importance.
pub const INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];
/// The output it produces.
pub const OUTPUT: &str = "last_hidden_state";

/// A loaded BERT encoder.
pub struct Bert {
    model: BertModel,
    config: Config,
    device: Device,
}

impl Bert {
    /// Loads `dir/model.safetensors` with the parsed `config.json` text.
    pub fn from_dir(dir: &Path, config: &str, device: &Device) -> Result<Self, NnError> {
        let weights = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| NnError::not_found(format!("{}: {e}", weights.display())))?;
        Self::from_bytes(config, &bytes, device)
    }

    /// Loads from a `config.json` text and the bytes of a safetensors file.
    pub fn from_bytes(config: &str, weights: &[u8], device: &Device) -> Result<Self, NnError> {
        let config: Config = serde_json::from_str(config)
            .map_err(|e| NnError::invalid_encoding(format!("config.json is not a BERT config: {e}")))?;
        let vb = VarBuilder::from_buffered_safetensors(weights.to_vec(), DType::F32, device)
            .map_err(|e| NnError::invalid_encoding(format!("model.safetensors: {e}")))?;
        let model = BertModel::load(vb, &config)
            .map_err(|e| NnError::invalid_encoding(format!("the weights do not match config.json: {e}")))?;
        Ok(Self { model, config, device: device.clone() })
    }

    /// The hidden size.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Runs the encoder on token ids already on this model's device (for benchmarks and
    /// direct callers; plugins go through [`Model::compute`]).
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor, NnError> {
        Ok(self.model.forward(ids, types, Some(mask))?)
    }
}

/// Reads an integer input as i64 values with its `[batch, seq]` shape.
fn ids(name: &str, t: &HostTensor) -> Result<(Vec<i64>, [usize; 2]), NnError> {
    let [b, s] = t.dims() else {
        return Err(NnError::invalid_argument(format!("`{name}` must be [batch, seq], got {:?}", t.dims())));
    };
    let values = match t.ty() {
        TensorType::I64 => {
            t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default())).collect()
        }
        TensorType::I32 => {
            t.data().chunks_exact(4).map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap_or_default()))).collect()
        }
        other => {
            return Err(NnError::invalid_argument(format!("`{name}` must be I64 or I32, got {other:?}")));
        }
    };
    Ok((values, [*b as usize, *s as usize]))
}

fn check_range(name: &str, values: &[i64], below: usize) -> Result<(), NnError> {
    match values.iter().find(|&&v| v < 0 || v as u64 >= below as u64) {
        Some(v) => Err(NnError::invalid_argument(format!("`{name}` holds {v}, outside 0..{below}"))),
        None => Ok(()),
    }
}

impl Model for Bert {
    fn family(&self) -> &'static str {
        "bert"
    }

    fn input_names(&self) -> Vec<String> {
        INPUTS.iter().map(|s| s.to_string()).collect()
    }

    fn compute(&self, inputs: Named) -> Result<Named, NnError> {
        let mut by_name: [Option<HostTensor>; 3] = [None, None, None];
        for (name, t) in inputs {
            let slot = INPUTS.iter().position(|i| *i == name).ok_or_else(|| {
                NnError::invalid_argument(format!("unknown input `{name}` (a BERT graph takes {})", INPUTS.join(", ")))
            })?;
            by_name[slot] = Some(t);
        }
        let [Some(input_ids), mask, types] = by_name else {
            return Err(NnError::invalid_argument("missing input `input_ids`"));
        };
        let (ids_v, shape) = ids("input_ids", &input_ids)?;
        let [batch, seq] = shape;
        if batch == 0 || seq == 0 {
            return Err(NnError::invalid_argument(format!("empty input_ids {shape:?}")));
        }
        if seq > self.config.max_position_embeddings {
            return Err(NnError::invalid_argument(format!(
                "sequence of {seq} tokens is longer than this model's {} positions; truncate it",
                self.config.max_position_embeddings
            )));
        }
        check_range("input_ids", &ids_v, self.config.vocab_size)?;
        let aux = |name: &str, t: Option<HostTensor>, below: usize, default: i64| -> Result<Vec<i64>, NnError> {
            match t {
                None => Ok(vec![default; batch * seq]),
                Some(t) => {
                    let (v, s) = ids(name, &t)?;
                    if s != shape {
                        return Err(NnError::invalid_argument(format!("`{name}` is {s:?} but input_ids is {shape:?}")));
                    }
                    check_range(name, &v, below)?;
                    Ok(v)
                }
            }
        };
        let mask_v = aux("attention_mask", mask, 2, 1)?;
        let types_v = aux("token_type_ids", types, self.config.type_vocab_size, 0)?;

        let to_tensor = |v: Vec<i64>| Tensor::from_vec(v, (batch, seq), &self.device);
        let hidden = self.forward(&to_tensor(ids_v)?, &to_tensor(types_v)?, &to_tensor(mask_v)?)?;
        Ok(vec![(OUTPUT.to_string(), HostTensor::from_candle(&hidden)?)])
    }
}
