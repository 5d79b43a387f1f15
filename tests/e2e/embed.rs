//! The text-embedding pipeline against the model's own Python implementation
//! (`tests/fixtures/minilm_reference.json`, made by `make_minilm_reference.py`).

use std::path::PathBuf;
use std::sync::Arc;

use eir::Runtime;
use eir::engine::EngineConfig;
use eir::grants::Grants;
use eir::nn::NnGrants;
use eir::plugin::{Plugin, PluginConfig};
use eir::registry::{ModelDecl, Registry};
use eir::scheduler::Scheduler;
use eir::tensor::{Tensor, TensorData};
use serde::Deserialize;

use crate::common::{guest, repo, request, texts};

#[derive(Deserialize)]
pub struct Reference {
    pub max_seq_length: usize,
    pub tolerance: Tolerance,
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Tolerance {
    pub cosine_min: f64,
}

#[derive(Deserialize)]
pub struct Case {
    pub text: String,
    pub token_ids: Vec<i64>,
    pub embedding: Vec<f32>,
}

/// The MiniLM reference fixture.
pub fn reference() -> Reference {
    let path = repo().join("tests/fixtures/minilm_reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("reading the reference fixture"))
        .expect("fixture parses")
}

/// The fetched MiniLM directory; a missing model fails with the command that fetches it.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("EIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("models"));
    eir::registry::fetch::locate("minilm", &dir).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The text-embed plugin with MiniLM registered and granted, and its directory preopened.
pub fn embed_plugin() -> (Plugin, tempfile::TempDir) {
    let dir = minilm_dir();
    let cache = tempfile::tempdir().unwrap();
    let registry = Registry::new(
        [(
            "minilm".to_string(),
            ModelDecl {
                path: dir.clone(),
                family: Some("bert".into()),
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
    // No directory grant: the model's files come with the model grant, at /models/minilm.
    let grants = Grants { nn: NnGrants { models: vec!["minilm".into()], ..Default::default() }, ..Default::default() };
    let plugin = rt
        .load_plugin("text-embed", &guest("text-embed"), PluginConfig { grants, ..Default::default() }, false)
        .unwrap();
    (plugin, cache)
}

/// Cosine similarity, in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The output called `name`.
pub fn output<'a>(outputs: &'a [Tensor], name: &str) -> &'a Tensor {
    outputs.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no output {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_outputs_asked_for_by_name_are_computed() {
    let reference = reference();
    let (plugin, _cache) = embed_plugin();
    let case = &reference.cases[0];
    let mut req = request(&[], vec![texts("text", &[case.text.as_str()])]);
    req.outputs = vec!["token_counts".into(), "token_ids".into()];
    let response = plugin.handle(&req).await.unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = response.outputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["token_counts", "token_ids"], "exactly the outputs asked for, in order");
    let TensorData::Int64(ids) = &output(&response.outputs, "token_ids").data else { panic!("token ids") };
    assert_eq!(ids, &case.token_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_match_sentence_transformers() {
    let reference = reference();
    assert_eq!(reference.max_seq_length, 256);
    let (plugin, _cache) = embed_plugin();
    let sentences: Vec<&str> = reference.cases.iter().map(|c| c.text.as_str()).collect();
    let response = plugin
        .handle(&request(&[("return_tokens", "true")], vec![texts("text", &sentences)]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let emb = output(&response.outputs, "embedding");
    assert_eq!(emb.shape, vec![sentences.len() as u64, 384]);
    let TensorData::Fp32(values) = &emb.data else { panic!("embedding must be FP32") };
    let TensorData::Int64(ids) = &output(&response.outputs, "token_ids").data else { panic!("token ids") };
    let width = output(&response.outputs, "token_ids").shape[1] as usize;
    let TensorData::Int64(counts) = &output(&response.outputs, "token_counts").data else { panic!("counts") };

    let mut worst = 1.0f64;
    for (i, case) in reference.cases.iter().enumerate() {
        let n = counts[i] as usize;
        assert_eq!(&ids[i * width..i * width + n], case.token_ids.as_slice(), "token ids of {:?}", case.text);
        let got = &values[i * 384..(i + 1) * 384];
        let cos = cosine(got, &case.embedding);
        worst = worst.min(cos);
        assert!(cos >= reference.tolerance.cosine_min, "cosine {cos} for {:?}", case.text);
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not normalised: {norm}");
    }
    eprintln!("worst cosine over {} sentences: {worst:.8}", reference.cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padding_never_changes_an_embedding() {
    let reference = reference();
    let (plugin, _cache) = embed_plugin();
    // "Hello world" alone (4 tokens, no padding) and next to a 178-token sentence (padded).
    let short = &reference.cases[0].text;
    let long = &reference.cases[17].text;
    let alone = plugin.handle(&request(&[], vec![texts("text", &[short])])).await.unwrap();
    let padded = plugin.handle(&request(&[], vec![texts("text", &[short, long])])).await.unwrap();
    let TensorData::Fp32(a) = &alone.outputs[0].data else { panic!() };
    let TensorData::Fp32(b) = &padded.outputs[0].data else { panic!() };
    let cos = cosine(&a[..384], &b[..384]);
    assert!(cos > 0.99999, "padding changed the embedding: cosine {cos}");
}

#[tokio::test]
async fn models_need_a_grant_and_bad_requests_are_errors() {
    let (plugin, _cache) = embed_plugin();
    let err = plugin.handle(&request(&[("model", "other")], vec![texts("text", &["x"])])).await.unwrap_err();
    assert!(err.to_string().contains("not granted"), "{err}");
    let err = plugin.handle(&request(&[], vec![texts("text", &[])])).await.unwrap_err();
    assert!(err.to_string().contains("no sentences"), "{err}");
}

#[test]
fn a_legacy_wasip1_wasi_nn_program_runs_unchanged() {
    let reference = reference();
    let hello = &reference.cases[0];
    assert_eq!(hello.text, "Hello world");
    let ids: Vec<String> = hello.token_ids.iter().map(|i| i.to_string()).collect();
    let model = format!("minilm={}", minilm_dir().display());
    let legacy = guest("legacy-nn");
    let cache = tempfile::tempdir().unwrap();
    let out = crate::common::eir(
        &["run", "--model", &model, legacy.to_str().unwrap(), "minilm", &ids.join(",")],
        cache.path(),
    );
    let (stdout, stderr) = crate::common::text(&out);
    assert!(out.status.success(), "{stderr}");
    let got: Vec<f32> = stdout.trim().split(',').map(|x| x.parse().unwrap()).collect();
    let cos = cosine(&got, &hello.embedding);
    assert!(cos >= reference.tolerance.cosine_min, "cosine {cos}");

    // Without the grant the program's load fails and it exits 1, saying why on stderr.
    let out = crate::common::eir(&["run", legacy.to_str().unwrap(), "minilm", &ids.join(",")], cache.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(crate::common::text(&out).1.contains("load_by_name(minilm)"), "{}", crate::common::text(&out).1);
}

#[test]
fn eir_run_prints_embeddings_from_the_command_line() {
    let reference = reference();
    let model = format!("minilm={}", minilm_dir().display());
    let plugin = guest("text-embed");
    let cache = tempfile::tempdir().unwrap();
    let out = crate::common::eir(
        &["run", plugin.to_str().unwrap(), "--model", &model, "--input", "text=A man is eating food."],
        cache.path(),
    );
    let (stdout, stderr) = crate::common::text(&out);
    assert!(out.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["outputs"][0]["name"], "embedding");
    assert_eq!(json["outputs"][0]["shape"], serde_json::json!([1, 384]));
    let got: Vec<f32> =
        json["outputs"][0]["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let case = reference.cases.iter().find(|c| c.text == "A man is eating food.").unwrap();
    assert!(cosine(&got, &case.embedding) >= reference.tolerance.cosine_min);
}
