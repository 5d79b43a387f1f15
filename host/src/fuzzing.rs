//! Fuzzing harnesses: what each cargo-fuzz target in `host/fuzz` runs on one input, shared with
//! the ordinary test that replays the committed corpus and regression inputs (so CI needs no
//! nightly toolchain). A harness must never panic, abort or allocate past its budgets on any
//! input: every failure is an error value.

use std::path::Path;

use candle_core::Device;

use crate::nn::backends::{bert, onnx};
use crate::nn::bindings::tensor::TensorType;
use crate::nn::tensor::HostTensor;
use crate::nn::{Meter, Model};

/// Budget of one harness run (load and compute each): small, so the fuzzer runs fast and a
/// missed bound shows up as a failed allocation or an RSS limit, not as a slow run.
const BUDGET: u64 = 64 << 20;

/// Most elements a harness input may have: a model may declare any input shape, and the
/// harness itself must stay small.
const MAX_INPUT: usize = 1 << 16;

/// An input tensor for `dtype` of `dims`, filled from `seed` (`None` past [`MAX_INPUT`]).
fn tensor_for(dtype: candle_core::DType, dims: &[usize], seed: &[u8]) -> Option<HostTensor> {
    let ty = match dtype {
        candle_core::DType::F32 => TensorType::Fp32,
        candle_core::DType::F64 => TensorType::Fp64,
        candle_core::DType::F16 => TensorType::Fp16,
        candle_core::DType::BF16 => TensorType::Bf16,
        candle_core::DType::U8 => TensorType::U8,
        candle_core::DType::I64 => TensorType::I64,
        _ => TensorType::I32,
    };
    let elem = crate::nn::tensor::element_size(ty);
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n <= MAX_INPUT)?;
    let data: Vec<u8> = (0..n * elem).map(|i| seed.get(i % seed.len().max(1)).copied().unwrap_or(0)).collect();
    HostTensor::new(dims.iter().map(|&d| d as u32).collect(), ty, data).ok()
}

/// ONNX: load `data` as a model under a load budget; if it loads, compute it on small inputs
/// of its declared types (symbolic dimensions 2), filled from the model's own bytes.
pub fn onnx(data: &[u8]) {
    let meter = Meter::for_load(BUDGET, Default::default(), None);
    let Ok(model) = onnx::Onnx::from_bytes_with(data, &Device::Cpu, &meter) else { return };
    let inputs: Vec<_> = model
        .input_types()
        .into_iter()
        .filter_map(|(name, dtype, dims)| Some((name, tensor_for(dtype, &dims, data)?)))
        .collect();
    let _ = model.compute_with(inputs, &Meter::with_budget(BUDGET));
}

/// BERT: `data` is `config.json`, a 0 byte, then a safetensors file; if it loads, one forward
/// pass on two tokens.
pub fn bert(data: &[u8]) {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (Ok(config), weights) = (std::str::from_utf8(&data[..split]), data.get(split + 1..).unwrap_or_default()) else {
        return;
    };
    let meter = Meter::for_load(BUDGET, Default::default(), None);
    let Ok(model) = bert::Bert::from_bytes(config, weights, &Device::Cpu, &meter) else { return };
    let ids = HostTensor::new(vec![1, 2], TensorType::I64, [1i64, 0].iter().flat_map(|v| v.to_le_bytes()).collect());
    if let Ok(ids) = ids {
        let _ = model.compute_with(vec![("input_ids".into(), ids)], &Meter::with_budget(BUDGET));
    }
}

/// KServe v2: `data` as a JSON body, and as a JSON header of `data[0]` bytes followed by
/// binary tensor data.
pub fn kserve(data: &[u8]) {
    let _ = crate::gateway::kserve::decode(data, None);
    if let Some(&n) = data.first() {
        let _ = crate::gateway::kserve::decode(&data[1..], Some(usize::from(n)));
    }
}

/// wasi-nn tensors: dimensions, type and data as a guest would hand them over.
pub fn tensor(data: &[u8]) {
    let Some((&head, rest)) = data.split_first() else { return };
    let rank = usize::from(head % 5);
    let ty = [
        TensorType::Fp16,
        TensorType::Fp32,
        TensorType::Fp64,
        TensorType::Bf16,
        TensorType::U8,
        TensorType::I32,
        TensorType::I64,
    ][usize::from(head / 5) % 7];
    let dims: Vec<u32> =
        rest.chunks(4).take(rank).map(|c| c.iter().fold(0u32, |a, &b| a << 8 | u32::from(b))).collect();
    let body = rest.get(4 * rank..).unwrap_or_default().to_vec();
    if let Ok(t) = HostTensor::new(dims, ty, body) {
        let _ = t.to_candle(&Device::Cpu);
    }
}

/// The TOML configuration, as `eir serve` reads it.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::parse(Path::new("fuzz/eir.toml"), text);
    }
}

/// A harness: one input, no result (it must simply not fail).
pub type Harness = fn(&[u8]);

/// Every harness by target name.
pub const TARGETS: [(&str, Harness); 5] =
    [("onnx", onnx), ("bert", bert), ("kserve", kserve), ("tensor", tensor), ("config", config)];

#[cfg(test)]
mod tests {
    /// Replays `host/fuzz/corpus/<target>` and `host/fuzz/regressions/<target>` through each
    /// harness: what the fuzzer found once stays fixed, with the stable toolchain.
    #[test]
    fn corpus_and_regressions_replay_cleanly() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut total = 0;
        for (target, harness) in super::TARGETS {
            let mut files = 0;
            for kind in ["corpus", "regressions"] {
                let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else { continue };
                for entry in dir.flatten() {
                    let data = std::fs::read(entry.path()).unwrap();
                    harness(&data);
                    files += 1;
                }
            }
            assert!(files > 0, "no corpus for fuzz target `{target}` under {}", root.display());
            total += files;
        }
        eprintln!("replayed {total} fuzz inputs");
    }
}
