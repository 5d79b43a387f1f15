//! Plugins written in Python (`py-embed`), JavaScript (`js-rank`) and C (`c-vad`), built from
//! source by `scripts/build.sh`, checked against the same references as the Rust plugins:
//! sentence-transformers for embeddings and ranking, ONNX Runtime and the Rust `vad` plugin
//! for voice activity. Each runs in-process, through `eir run` and through the gateway.

use std::path::PathBuf;
use std::sync::Arc;

use eir::Runtime;
use eir::engine::EngineConfig;
use eir::grants::Grants;
use eir::nn::NnGrants;
use eir::plugin::{ErrorKind, Plugin, PluginConfig};
use eir::registry::{ModelDecl, Registry};
use eir::scheduler::Scheduler;
use eir::tensor::{ErrorCode, Request, Tensor, TensorData};
use serde_json::{Value, json};

use crate::common::{eir, guest, repo, request, strings, text, texts};
use crate::embed::{cosine, minilm_dir, output, reference as minilm_reference};
use crate::gateway::{Server, hash, infer};
use crate::onnx::{model_dir, reference as onnx_reference, wav_samples};

/// One compile cache for these tests, kept between runs under the target directory: the
/// Python and JavaScript components are 13-18 MB, and compiling them once is enough here
/// (first-compile behaviour is covered by the engine's own tests).
fn cache_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("language-plugins-cache");
    std::fs::create_dir_all(&dir).expect("creating the test compile cache");
    dir
}

/// A runtime with MiniLM and Silero VAD registered.
fn runtime() -> Runtime {
    let models = [
        (
            "minilm",
            ModelDecl {
                path: minilm_dir(),
                family: Some("bert".into()),
                target: Default::default(),
                batch: Default::default(),
                llm: None,
            },
        ),
        (
            "silero-vad",
            ModelDecl {
                path: model_dir("silero-vad"),
                family: None,
                target: Default::default(),
                batch: Default::default(),
                llm: None,
            },
        ),
    ];
    let registry = Registry::new(models.map(|(n, d)| (n.to_string(), d)), Scheduler::for_this_machine());
    Runtime::with_registry(EngineConfig { cache_dir: Some(cache_dir()), ..Default::default() }, Arc::new(registry))
        .expect("runtime")
}

/// Loads plugin `name`, granted `model` (whose files appear at /models/<model>).
fn load(rt: &Runtime, name: &str, model: &str) -> Plugin {
    let grants = Grants { nn: NnGrants { models: vec![model.into()], ..Default::default() }, ..Default::default() };
    rt.load_plugin(name, &guest(name), PluginConfig { grants, ..Default::default() }, false)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn f32s(t: &Tensor) -> &[f32] {
    match &t.data {
        TensorData::Fp32(v) => v,
        other => panic!("{}: expected FP32, got {:?}", t.name, other.datatype()),
    }
}

fn i64s(t: &Tensor) -> &[i64] {
    match &t.data {
        TensorData::Int64(v) => v,
        other => panic!("{}: expected INT64, got {:?}", t.name, other.datatype()),
    }
}

async fn error_kind(plugin: &Plugin, req: Request) -> (ErrorKind, String) {
    let err = plugin.handle(&req).await.expect_err("the request must fail");
    (err.kind(), err.to_string())
}

/// Request parameters, as (name, value) pairs.
type Params = &'static [(&'static str, &'static str)];

const INVALID: ErrorKind = ErrorKind::Plugin(ErrorCode::InvalidInput);
const MODEL: ErrorKind = ErrorKind::Plugin(ErrorCode::ModelError);

// ---- Python -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_embeddings_match_sentence_transformers() {
    let reference = minilm_reference();
    let plugin = load(&runtime(), "py-embed", "minilm");
    let sentences: Vec<&str> = reference.cases.iter().map(|c| c.text.as_str()).collect();
    let response =
        plugin.handle(&request(&[], vec![texts("text", &sentences)])).await.unwrap_or_else(|e| panic!("{e}"));
    let emb = output(&response.outputs, "embedding");
    assert_eq!(emb.shape, vec![sentences.len() as u64, 384]);
    let ids = output(&response.outputs, "token_ids");
    let width = ids.shape[1] as usize;
    let counts = i64s(output(&response.outputs, "token_counts"));
    let mut worst = 1.0f64;
    for (i, case) in reference.cases.iter().enumerate() {
        let n = counts[i] as usize;
        assert_eq!(&i64s(ids)[i * width..i * width + n], case.token_ids.as_slice(), "token ids of {:?}", case.text);
        let cos = cosine(&f32s(emb)[i * 384..(i + 1) * 384], &case.embedding);
        worst = worst.min(cos);
        assert!(cos >= reference.tolerance.cosine_min, "cosine {cos} for {:?}", case.text);
    }
    eprintln!("py-embed: worst cosine over {} sentences: {worst:.8}", reference.cases.len());
}

#[tokio::test]
async fn python_errors_are_typed() {
    let plugin = load(&runtime(), "py-embed", "minilm");
    let (kind, msg) = error_kind(&plugin, request(&[], vec![])).await;
    assert_eq!(kind, INVALID, "{msg}");
    assert!(msg.contains("missing input `text`"), "{msg}");
    let numbers = Tensor { name: "text".into(), shape: vec![1], data: TensorData::Fp32(vec![1.0]) };
    assert_eq!(error_kind(&plugin, request(&[], vec![numbers])).await.0, INVALID);
    let (kind, msg) = error_kind(&plugin, request(&[("max_tokens", "1")], vec![texts("text", &["x"])])).await;
    assert_eq!(kind, INVALID, "{msg}");
    let (kind, msg) = error_kind(&plugin, request(&[("model", "silero-vad")], vec![texts("text", &["x"])])).await;
    assert_eq!(kind, MODEL, "{msg}");
    assert!(msg.contains("not granted"), "{msg}");
    // The instance survives its errors.
    assert!(plugin.handle(&request(&[], vec![texts("text", &["still here"])])).await.is_ok());
}

// ---- JavaScript ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_ranking_matches_sentence_transformers() {
    let reference = minilm_reference();
    // Scores are cosines of the reference embeddings; the fixture's cosine tolerance bounds them.
    let tolerance = 1.0 - reference.tolerance.cosine_min;
    let case = |text: &str| reference.cases.iter().find(|c| c.text == text).expect("a fixture sentence");
    let query = case("A man is eating food.");
    let docs: Vec<&str> = [
        "A monkey is playing drums.",
        "A man is eating a piece of bread.",
        "Crème brûlée, naïve café, São Paulo, Zürich",
        "The girl is carrying a baby.",
        "Привет, как дела? Всё хорошо.",
        "東京は日本の首都です。北京是中国的首都。",
        "What?! No way... (really) -- yes: 100% [sure]; #1 @home & <tags> {braces}",
        "Emoji: 🚀🔥 are fun 😀 and ™ © ®",
    ]
    .to_vec();
    let expected: Vec<f64> = docs.iter().map(|d| cosine(&case(d).embedding, &query.embedding)).collect();

    let plugin = load(&runtime(), "js-rank", "minilm");
    let req = request(&[], vec![texts("query", &[&query.text]), texts("documents", &docs)]);
    let response = plugin.handle(&req).await.unwrap_or_else(|e| panic!("{e}"));
    let scores = f32s(output(&response.outputs, "scores"));
    assert_eq!(scores.len(), docs.len());
    for ((doc, got), want) in docs.iter().zip(scores).zip(&expected) {
        assert!((f64::from(*got) - want).abs() <= tolerance, "{doc:?}: score {got}, reference {want}");
    }
    let order: Vec<usize> = i64s(output(&response.outputs, "order")).iter().map(|&i| i as usize).collect();
    let mut want_order: Vec<usize> = (0..docs.len()).collect();
    want_order.sort_by(|&a, &b| expected[b].total_cmp(&expected[a]));
    for pair in want_order.windows(2) {
        // Only neighbours whose reference scores are further apart than the tolerance must keep their order.
        if expected[pair[0]] - expected[pair[1]] > 2.0 * tolerance {
            let at = |i| order.iter().position(|&o| o == i).unwrap();
            assert!(at(pair[0]) < at(pair[1]), "order {order:?}, reference {want_order:?}");
        }
    }
    assert_eq!(order[0], 1, "the bread sentence ranks first");
    let ranked = strings(output(&response.outputs, "ranked"));
    assert_eq!(ranked, order.iter().map(|&i| docs[i].to_string()).collect::<Vec<_>>());
}

#[tokio::test]
async fn javascript_errors_are_typed() {
    let plugin = load(&runtime(), "js-rank", "minilm");
    let (kind, msg) = error_kind(&plugin, request(&[], vec![texts("query", &["q"])])).await;
    assert_eq!(kind, INVALID, "{msg}");
    assert!(msg.contains("missing input `documents`"), "{msg}");
    let req = request(&[("model", "nope")], vec![texts("query", &["q"]), texts("documents", &["d"])]);
    let (kind, msg) = error_kind(&plugin, req).await;
    assert_eq!(kind, MODEL, "{msg}");
    assert!(msg.contains("not granted"), "{msg}");
    let req = request(&[], vec![texts("query", &["q"]), texts("documents", &["d"])]);
    assert!(plugin.handle(&req).await.is_ok(), "the instance survives its errors");
}

// ---- C ------------------------------------------------------------------------------------

/// A WAV file: `channels` interleaved copies of `samples`, as 16-bit PCM or 32-bit float.
fn wav(samples: &[f32], rate: u32, channels: u16, float: bool) -> Vec<u8> {
    let width: u16 = if float { 4 } else { 2 };
    let data: Vec<u8> = samples
        .iter()
        .flat_map(|&s| std::iter::repeat_n(s, usize::from(channels)))
        .flat_map(|s| if float { s.to_le_bytes().to_vec() } else { ((s * 32768.0) as i16).to_le_bytes().to_vec() })
        .collect();
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&(if float { 3u16 } else { 1 }).to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * u32::from(channels * width)).to_le_bytes());
    out.extend_from_slice(&(channels * width).to_le_bytes());
    out.extend_from_slice(&(width * 8).to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&data);
    out
}

fn audio(file: Vec<u8>) -> Tensor {
    Tensor { name: "audio".into(), shape: vec![1], data: TensorData::Bytes(vec![file]) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_vad_agrees_with_onnx_runtime_and_the_rust_plugin() {
    let reference = onnx_reference();
    let rt = runtime();
    let (c, rust) = (load(&rt, "c-vad", "silero-vad"), load(&rt, "vad", "silero-vad"));
    let speech = std::fs::read(repo().join("tests/fixtures/speech.wav")).unwrap();

    let response = c.handle(&request(&[], vec![audio(speech.clone())])).await.unwrap_or_else(|e| panic!("{e}"));
    let probs = f32s(output(&response.outputs, "probabilities"));
    assert_eq!(probs.len(), reference.silero.probabilities.len());
    let worst = probs.iter().zip(&reference.silero.probabilities).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= reference.tolerance.absolute, "per-chunk probabilities differ from ONNX Runtime by {worst}");
    assert_eq!(output(&response.outputs, "segments").shape, vec![2, 2], "two utterances");

    // The same answers as the Rust plugin, bit for bit, across parameters and WAV layouts.
    let samples = wav_samples(&repo().join("tests/fixtures/speech.wav"));
    let at_8khz: Vec<f32> = samples.iter().step_by(2).copied().collect();
    let cases: Vec<(Params, Vec<u8>)> = vec![
        (&[], speech.clone()),
        (&[("threshold", "0.9"), ("speech_pad_ms", "0")], speech.clone()),
        (&[("min_silence_ms", "600"), ("min_speech_ms", "1000")], speech.clone()),
        (&[("threshold", "0.3"), ("speech_pad_ms", "400")], speech.clone()),
        (&[], wav(&samples, 16000, 2, true)),
        (&[], wav(&at_8khz, 8000, 1, false)),
        (&[], wav(&samples[..300], 16000, 1, false)),
    ];
    for (params, file) in cases {
        let req = request(params, vec![audio(file)]);
        let (a, b) = (c.handle(&req).await.unwrap(), rust.handle(&req).await.unwrap());
        for name in ["probabilities", "segments", "chunk_seconds"] {
            let (x, y) = (output(&a.outputs, name), output(&b.outputs, name));
            assert_eq!((&x.shape, f32s(x)), (&y.shape, f32s(y)), "{name} with {params:?}");
        }
    }
}

#[tokio::test]
async fn c_vad_rejects_what_it_cannot_hear() {
    let c = load(&runtime(), "c-vad", "silero-vad");
    let speech = std::fs::read(repo().join("tests/fixtures/speech.wav")).unwrap();
    let samples = wav_samples(&repo().join("tests/fixtures/speech.wav"));
    let mut truncated = speech.clone();
    truncated.truncate(speech.len() / 2);
    let mut pcm24 = wav(&samples[..1000], 16000, 1, false);
    pcm24[34..36].copy_from_slice(&24u16.to_le_bytes());
    let bad: Vec<(Params, Vec<u8>, &str)> = vec![
        (&[], b"RIFF....not a wav".to_vec(), "not a WAV file"),
        (&[], truncated, "truncated"),
        (&[], wav(&samples[..4410], 44100, 1, false), "44100 Hz"),
        (&[], pcm24, "24-bit"),
        (&[("min_silence_ms", "soon")], speech.clone(), "min_silence_ms"),
        (&[("threshold", "high")], speech.clone(), "threshold"),
    ];
    for (params, file, says) in bad {
        let (kind, msg) = error_kind(&c, request(params, vec![audio(file)])).await;
        assert_eq!(kind, INVALID, "{msg}");
        assert!(msg.contains(says), "{msg:?} should mention {says:?}");
    }
    let (kind, msg) = error_kind(&c, request(&[("model", "minilm")], vec![audio(speech.clone())])).await;
    assert_eq!(kind, MODEL, "{msg}");
    assert!(c.handle(&request(&[], vec![audio(speech)])).await.is_ok(), "the instance survives its errors");
}

// ---- All three from the command line and over HTTP ----------------------------------------

fn json_f32s(v: &Value) -> Vec<f32> {
    v.as_array().expect("an array").iter().map(|x| x.as_f64().expect("a number") as f32).collect()
}

fn find<'a>(outputs: &'a Value, name: &str) -> &'a Value {
    outputs.as_array().expect("outputs").iter().find(|o| o["name"] == name).unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn each_language_runs_with_eir_run() {
    let reference = minilm_reference();
    let hello = &reference.cases[0];
    let minilm = format!("minilm={}", minilm_dir().display());
    let silero = format!("silero-vad={}", model_dir("silero-vad").display());
    let speech = format!("audio=@{}", repo().join("tests/fixtures/speech.wav").display());
    let run = |args: &[&str]| -> Value {
        let out = eir(args, &cache_dir());
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "eir {args:?}: {stderr}");
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    let py = guest("py-embed");
    let out = run(&["run", py.to_str().unwrap(), "--model", &minilm, "-i", &format!("text={}", hello.text)]);
    let cos = cosine(&json_f32s(&find(&out["outputs"], "embedding")["data"]), &hello.embedding);
    assert!(cos >= reference.tolerance.cosine_min, "py-embed via eir run: cosine {cos}");

    let js = guest("js-rank");
    let args = ["-i", "query=Hello", "-i", "documents=Goodbye moon", "-i", "documents=Hello world"];
    let out = run(&[&["run", js.to_str().unwrap(), "--model", &minilm][..], &args].concat());
    assert_eq!(find(&out["outputs"], "ranked")["data"], json!(["Hello world", "Goodbye moon"]));

    let c = guest("c-vad");
    let out = run(&["run", c.to_str().unwrap(), "--model", &silero, "-i", &speech]);
    assert_eq!(find(&out["outputs"], "segments")["shape"], json!([2, 2]));

    // Their metadata comes from their own `describe`.
    let out = run(&["run", c.to_str().unwrap(), "--metadata"]);
    assert_eq!(out["inputs"][0]["name"], "audio", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_language_serves_through_the_gateway() {
    let reference = minilm_reference();
    let config = format!(
        r#"
[models.minilm]
path = "{minilm}"
family = "bert"

[models.silero-vad]
path = "{silero}"

[plugins.py-embed]
path = "{py}"
models = ["minilm"]

[plugins.js-rank]
path = "{js}"
models = ["minilm"]

[plugins.c-vad]
path = "{c}"
models = ["silero-vad"]

[tenants.t]
keys_sha256 = ["{key}"]
plugins = ["*"]
"#,
        minilm = minilm_dir().display(),
        silero = model_dir("silero-vad").display(),
        py = guest("py-embed").display(),
        js = guest("js-rank").display(),
        c = guest("c-vad").display(),
        key = hash("k"),
    );
    let server = Server::start_with(&config, &cache_dir());

    let case = &reference.cases[1];
    let body = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [case.text]}]});
    let (status, _, out) = infer(&server, "py-embed", "k", &body).await;
    assert_eq!(status, 200, "{out}");
    let cos = cosine(&json_f32s(&find(&out["outputs"], "embedding")["data"]), &case.embedding);
    assert!(cos >= reference.tolerance.cosine_min, "py-embed over HTTP: cosine {cos}");

    let body = json!({"inputs": [
        {"name": "query", "datatype": "BYTES", "shape": [1], "data": ["A man is eating food."]},
        {"name": "documents", "datatype": "BYTES", "shape": [2], "data": ["A monkey is playing drums.", "A man is eating a piece of bread."]},
    ]});
    let (status, _, out) = infer(&server, "js-rank", "k", &body).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(find(&out["outputs"], "order")["data"], json!([1, 0]));
    // A plugin's typed error keeps its status over HTTP.
    let (status, _, out) = infer(&server, "js-rank", "k", &json!({"inputs": [body["inputs"][0]]})).await;
    assert_eq!(status, 400, "{out}");

    let speech = std::fs::read(repo().join("tests/fixtures/speech.wav")).unwrap();
    // JSON cannot carry raw bytes: the audio goes as the binary-data extension.
    let header = json!({"inputs": [{"name": "audio", "datatype": "BYTES", "shape": [1],
        "parameters": {"binary_data_size": speech.len() + 4}}]})
    .to_string();
    let mut payload = header.clone().into_bytes();
    payload.extend_from_slice(&(speech.len() as u32).to_le_bytes());
    payload.extend_from_slice(&speech);
    let resp = reqwest::Client::new()
        .post(format!("{}/v2/models/c-vad/infer", server.url))
        .bearer_auth("k")
        .header("Inference-Header-Content-Length", header.len())
        .header("content-type", "application/octet-stream")
        .body(payload)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let out: Value = resp.json().await.unwrap();
    assert_eq!(find(&out["outputs"], "segments")["shape"], json!([2, 2]), "{out}");
}
