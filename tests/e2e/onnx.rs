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

#[test]
fn unsupported_operators_are_named_at_load_and_garbage_is_an_error() {
    let path = repo().join("tests/fixtures/unsupported_ops.onnx");
    let err = backend::load(Source::Path(&path), Target::Cpu).err().expect("must not load");
    assert_eq!(eir::nn::code_name(err.code), "unsupported-operation", "{err}");
    assert!(err.message.contains("Hardmax (2 nodes)") && err.message.contains("Det (1 node)"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(model_dir("silero-vad").join("silero_vad.onnx")).unwrap();
    for (name, data) in [("truncated.onnx", bytes[..bytes.len() / 3].to_vec()), ("noise.onnx", vec![0x08; 4096])] {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        let err = backend::load(Source::Path(&p), Target::Cpu).err().unwrap_or_else(|| panic!("{name} loaded"));
        assert_eq!(eir::nn::code_name(err.code), "invalid-encoding", "{name}: {err}");
    }
    // ONNX on the GPU target is refused clearly, not attempted.
    assert!(backend::load(Source::Path(&model_dir("silero-vad")), Target::Gpu).is_err());
}

#[test]
fn wrong_inputs_are_invalid_arguments() {
    let model = load("efficientnet-lite0");
    let err =
        model.compute(vec![("input".into(), f32_tensor(vec![1, 3, 32, 32], &vec![0.0; 3 * 32 * 32]))]).unwrap_err();
    assert_eq!(eir::nn::code_name(err.code), "invalid-argument", "{err}");
    assert!(err.message.contains("input"), "{err}");
    let err = model.compute(vec![("pixels".into(), f32_tensor(vec![1], &[0.0]))]).unwrap_err();
    assert!(err.message.contains("unknown input `pixels`"), "{err}");
}

mod plugins {
    use std::sync::Arc;

    use eir::Runtime;
    use eir::engine::EngineConfig;
    use eir::grants::Grants;
    use eir::nn::NnGrants;
    use eir::plugin::{ErrorKind, Plugin, PluginConfig};
    use eir::registry::{ModelDecl, Registry};
    use eir::scheduler::Scheduler;
    use eir::tensor::{ErrorCode, Tensor, TensorData};

    use super::{model_dir, reference};
    use crate::common::{guest, repo, request, strings};

    fn plugin(name: &str, model: &str) -> (Plugin, tempfile::TempDir) {
        let cache = tempfile::tempdir().unwrap();
        let registry = Registry::new(
            [(
                model.to_string(),
                ModelDecl {
                    path: model_dir(model),
                    family: None,
                    target: Default::default(),
                    batch: Default::default(),
                    llm: None,
                },
            )],
            Scheduler::for_this_machine(),
        );
        let rt = Runtime::with_registry(
            EngineConfig { cache_dir: Some(cache.path().into()), ..Default::default() },
            Arc::new(registry),
        )
        .unwrap();
        let grants = Grants { nn: NnGrants { models: vec![model.into()], ..Default::default() }, ..Default::default() };
        (rt.load_plugin(name, &guest(name), PluginConfig { grants, ..Default::default() }, false).unwrap(), cache)
    }

    fn bytes(name: &str, files: &[Vec<u8>]) -> Tensor {
        Tensor { name: name.into(), shape: vec![files.len() as u64], data: TensorData::Bytes(files.to_vec()) }
    }

    fn f32s(t: &Tensor) -> &[f32] {
        match &t.data {
            TensorData::Fp32(v) => v,
            other => panic!("expected FP32, got {:?}", other.datatype()),
        }
    }

    fn out<'a>(outputs: &'a [Tensor], name: &str) -> &'a Tensor {
        outputs.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no output {name}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vad_finds_the_speech_and_not_the_silence() {
        let reference = reference();
        let (vad, _c) = plugin("vad", "silero-vad");
        let wav = std::fs::read(repo().join("tests/fixtures/speech.wav")).unwrap();
        let response = vad.handle(&request(&[], vec![bytes("audio", &[wav])])).await.unwrap_or_else(|e| panic!("{e}"));
        let probs = f32s(out(&response.outputs, "probabilities"));
        assert_eq!(probs.len(), reference.silero.probabilities.len());
        let worst = probs.iter().zip(&reference.silero.probabilities).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= reference.tolerance.absolute, "per-chunk probabilities differ by {worst}");

        // The recording: 1 s silence, speech to ~4.0 s, 1.2 s silence, speech to ~7.65 s, 1 s silence.
        let seg = out(&response.outputs, "segments");
        assert_eq!(seg.shape, vec![2, 2], "two utterances: {:?}", f32s(seg));
        let s = f32s(seg);
        let (first, second) = ((s[0], s[1]), (s[2], s[3]));
        assert!(first.0 > 0.8 && first.0 < 1.5 && first.1 > 3.5 && first.1 < 4.3, "first segment {first:?}");
        assert!(second.0 > 4.9 && second.0 < 5.6 && second.1 > 7.0 && second.1 < 7.9, "second segment {second:?}");
    }

    #[tokio::test]
    async fn vad_rejects_what_it_cannot_hear() {
        let (vad, _c) = plugin("vad", "silero-vad");
        let err = vad.handle(&request(&[], vec![bytes("audio", &[b"RIFF....not a wav".to_vec()])])).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Plugin(ErrorCode::InvalidInput), "{err}");
        // 44.1 kHz: refused with the rate named.
        let mut wav = std::fs::read(repo().join("tests/fixtures/speech.wav")).unwrap();
        wav[24..28].copy_from_slice(&44100u32.to_le_bytes());
        wav[28..32].copy_from_slice(&(44100u32 * 2).to_le_bytes());
        let err = vad.handle(&request(&[], vec![bytes("audio", &[wav])])).await.unwrap_err();
        assert!(err.to_string().contains("44100 Hz"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn image_classify_agrees_with_onnx_runtime_on_real_photos() {
        let reference = reference();
        let (classify, _c) = plugin("image-classify", "efficientnet-lite0");
        let photos = model_dir("test-photos");
        let names = ["coffee.png", "rocket.jpg", "chelsea.png"];
        let files: Vec<Vec<u8>> = names.iter().map(|n| std::fs::read(photos.join(n)).unwrap()).collect();
        let response = classify
            .handle(&request(&[("k", "3")], vec![bytes("image", &files)]))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let labels = strings(out(&response.outputs, "labels"));
        let probs = f32s(out(&response.outputs, "probabilities"));
        let TensorData::Int64(indices) = &out(&response.outputs, "indices").data else { panic!("indices") };
        for (i, name) in names.iter().enumerate() {
            let want = &reference.efficientnet.photos[*name];
            let got = indices[i * 3] as usize;
            if *name == "chelsea.png" {
                // ORT's top two are a near tie (0.383 vs 0.370); resizing differs slightly from PIL's.
                assert!(want[..2].iter().any(|t| t.index == got), "{name}: top-1 {got} not in ORT's top 2");
            } else {
                assert_eq!(got, want[0].index, "{name}: top-1 {} vs ONNX Runtime's {}", labels[i * 3], want[0].label);
                assert!(
                    (probs[i * 3] - want[0].probability).abs() < 0.03,
                    "{name}: {} vs {}",
                    probs[i * 3],
                    want[0].probability
                );
            }
            assert_eq!(
                labels[i * 3],
                reference.efficientnet.photos[*name].iter().find(|t| t.index == got).map(|t| t.label.clone()).unwrap()
            );
        }
        assert_eq!(labels[0], "espresso");
    }

    #[tokio::test]
    async fn image_classify_rejects_non_images() {
        let (classify, _c) = plugin("image-classify", "efficientnet-lite0");
        let err = classify.handle(&request(&[], vec![bytes("image", &[b"GIF89a-nope".to_vec()])])).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Plugin(ErrorCode::InvalidInput), "{err}");
        assert!(err.to_string().contains("image 0"), "{err}");
    }
}

/// MiniLM as a plain ONNX graph, built from the fetched safetensors weights by
/// `scripts/make_minilm_onnx.py` (numpy and onnx, from the test Python).
fn minilm_onnx(dir: &std::path::Path) -> PathBuf {
    let python = crate::common::test_python();
    let out = dir.join("minilm.onnx");
    let run = std::process::Command::new(&python)
        .arg(repo().join("scripts/make_minilm_onnx.py"))
        .arg(crate::embed::minilm_dir())
        .arg(&out)
        .output();
    let ok = run.as_ref().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} could not build MiniLM as ONNX (it needs numpy and onnx: scripts/test.sh installs them into \
         models/.venv, or set EIR_TEST_PYTHON): {:?}",
        python.display(),
        run.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
    );
    out
}

/// A transformer graph, batched: attention's `Q · Kᵀ` hands MatMul a transposed operand, and
/// three padded rows of different lengths must each match the sentence-transformers reference.
#[test]
fn a_batched_transformer_graph_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = backend::load(Source::Path(&minilm_onnx(dir.path())), Target::Cpu).unwrap_or_else(|e| panic!("{e}"));
    let reference = crate::embed::reference();
    let cases: Vec<_> = reference.cases.iter().filter(|c| c.token_ids.len() > 4).take(3).collect();
    let seq = cases.iter().map(|c| c.token_ids.len()).max().unwrap();
    let (mut ids, mut mask) = (vec![0i64; 3 * seq], vec![0i64; 3 * seq]);
    for (row, case) in cases.iter().enumerate() {
        ids[row * seq..][..case.token_ids.len()].copy_from_slice(&case.token_ids);
        mask[row * seq..][..case.token_ids.len()].fill(1);
    }
    let ints = |v: &[i64]| {
        HostTensor::new(vec![3, seq as u32], TensorType::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()).unwrap()
    };
    let out = model
        .compute(vec![
            ("input_ids".into(), ints(&ids)),
            ("attention_mask".into(), ints(&mask)),
            ("token_type_ids".into(), ints(&vec![0; 3 * seq])),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out[0].1.dims(), &[3, seq as u32, 384]);
    let hidden = f32s(&out[0].1);
    for (row, case) in cases.iter().enumerate() {
        let n = case.token_ids.len();
        let mut e = vec![0f64; 384];
        for t in 0..n {
            for (d, v) in e.iter_mut().enumerate() {
                *v += f64::from(hidden[(row * seq + t) * 384 + d]) / n as f64;
            }
        }
        let norm = e.iter().map(|v| v * v).sum::<f64>().sqrt();
        let want_norm = case.embedding.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        let cos = e.iter().zip(&case.embedding).map(|(a, &b)| a * f64::from(b)).sum::<f64>() / (norm * want_norm);
        eprintln!("row {row} ({n} tokens of {seq}): cosine {cos}");
        assert!(cos >= reference.tolerance.cosine_min, "row {row} {:?}: cosine {cos}", case.text);
    }
}
