//! The ONNX backend against ONNX Runtime (`tests/fixtures/onnx_reference.json`, made by
//! `make_onnx_reference.py`), model by model, and its handling of bad models.

use std::path::PathBuf;
use std::sync::Arc;

use eir::nn::Model;
use eir::nn::backend::{self, Source, Target};
use eir::nn::bindings::tensor::TensorType;
use eir::nn::tensor::HostTensor;
use serde::Deserialize;

use crate::common::repo;

#[derive(Deserialize)]
pub struct Reference {
    pub tolerance: Tolerance,
    pub efficientnet: Efficientnet,
    pub silero: Silero,
}

#[derive(Deserialize)]
pub struct Tolerance {
    pub absolute: f32,
}

#[derive(Deserialize)]
pub struct Efficientnet {
    pub logits: Vec<Vec<f32>>,
    pub photos: std::collections::BTreeMap<String, Vec<Top>>,
}

#[derive(Deserialize)]
pub struct Top {
    pub index: usize,
    pub label: String,
    pub probability: f32,
}

#[derive(Deserialize)]
pub struct Silero {
    pub probabilities: Vec<f32>,
}

pub fn reference() -> Reference {
    let path = repo().join("tests/fixtures/onnx_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reading the ONNX reference")).expect("fixture parses")
}

/// A fetched model's directory; a missing one fails with the command that fetches it.
pub fn model_dir(name: &str) -> PathBuf {
    let dir = std::env::var_os("EIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("models"));
    eir::registry::fetch::locate(name, &dir).unwrap_or_else(|e| panic!("{e:#}"))
}

fn f32_tensor(dims: Vec<u32>, values: &[f32]) -> HostTensor {
    HostTensor::new(dims, TensorType::Fp32, values.iter().flat_map(|v| v.to_le_bytes()).collect()).unwrap()
}

fn f32s(t: &HostTensor) -> Vec<f32> {
    assert_eq!(t.ty(), TensorType::Fp32);
    t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn load(name: &str) -> Arc<dyn Model> {
    backend::load(Source::Path(&model_dir(name)), Target::Cpu).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// 16-bit mono PCM samples of a WAV file, as f32 in [-1, 1).
pub fn wav_samples(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let data = bytes.windows(4).position(|w| w == b"data").expect("a data chunk") + 8;
    bytes[data..].chunks_exact(2).map(|c| f32::from(i16::from_le_bytes([c[0], c[1]])) / 32768.0).collect()
}

#[test]
fn efficientnet_logits_match_onnx_runtime() {
    let reference = reference();
    let model = load("efficientnet-lite0");
    let n = 2 * 3 * 224 * 224;
    let x: Vec<f32> = (0..n).map(|i| (2.0 * (0.001 * i as f64).sin()) as f32).collect();
    let out = model.compute(vec![("input".into(), f32_tensor(vec![2, 3, 224, 224], &x))]).unwrap();
    assert_eq!(out[0].0, "logits", "outputs keep the graph's names");
    assert_eq!(out[0].1.dims(), &[2, 1000]);
    let got = f32s(&out[0].1);
    let want: Vec<f32> = reference.efficientnet.logits.concat();
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("efficientnet: worst |EIR - ONNX Runtime| over 2000 logits = {worst:e}");
    assert!(worst <= reference.tolerance.absolute, "worst difference {worst}");
}

#[test]
fn silero_probabilities_match_onnx_runtime() {
    let reference = reference();
    let model = load("silero-vad");
    let audio = wav_samples(&repo().join("tests/fixtures/speech.wav"));
    let mut state = vec![0f32; 2 * 128];
    let mut context = vec![0f32; 64];
    let mut worst = 0f32;
    for (k, chunk) in audio.chunks(512).enumerate() {
        let mut chunk = chunk.to_vec();
        chunk.resize(512, 0.0);
        let x: Vec<f32> = context.iter().chain(&chunk).copied().collect();
        let sr = HostTensor::new(vec![], TensorType::I64, 16000i64.to_le_bytes().to_vec()).unwrap();
        let out = model
            .compute(vec![
                ("input".into(), f32_tensor(vec![1, 576], &x)),
                ("state".into(), f32_tensor(vec![2, 1, 128], &state)),
                ("sr".into(), sr),
            ])
            .unwrap_or_else(|e| panic!("chunk {k}: {e}"));
        let prob = f32s(&out[0].1)[0];
        state = f32s(&out[1].1);
        context = chunk[512 - 64..].to_vec();
        worst = worst.max((prob - reference.silero.probabilities[k]).abs());
    }
    eprintln!("silero: worst |EIR - ONNX Runtime| over {} chunks = {worst:e}", reference.silero.probabilities.len());
    assert!(worst <= reference.tolerance.absolute, "worst difference {worst}");
}
