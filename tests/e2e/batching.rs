//! Dynamic batching and fair share with real models: callers of different tenants share
//! forward passes, and every caller gets exactly the rows an unbatched run gives it.

use std::sync::Arc;
use std::time::Duration;

use eir::nn::backend::Model;
use eir::nn::bindings::tensor::TensorType;
use eir::nn::tensor::HostTensor;
use eir::registry::{ModelDecl, Registry};
use eir::scheduler::{BatchPolicy, Job, Scheduler, Settings};
use serde_json::{Value, json};

use crate::embed::{cosine, minilm_dir, reference};
use crate::gateway::{Server, hash, infer, metric};
use crate::onnx::model_dir;

/// A registry of `name` at `path` whose passes wait up to 300 ms for company, computing one
/// pass at a time: every job submitted together lands in as few passes as the rows allow.
async fn batching(name: &str, path: std::path::PathBuf, max_batch: usize) -> (Registry, Arc<dyn Model>) {
    let batch = BatchPolicy { max_batch, max_delay: Duration::from_millis(300) };
    let registry = Registry::new(
        [(name.to_string(), ModelDecl { path, family: None, target: Default::default(), batch, llm: None })],
        Scheduler::new(Settings { max_running: 1, ..Settings::for_this_machine() }),
    );
    let model = registry.get(name).await.unwrap_or_else(|e| panic!("{e}"));
    (registry, model)
}

fn job(
    registry: &Registry,
    name: &str,
    model: &Arc<dyn Model>,
    tenant: &str,
    inputs: Vec<(String, HostTensor)>,
) -> Job {
    Job {
        model: model.clone(),
        name: name.into(),
        policy: registry.batch_policy(name),
        inputs,
        tenant: registry.scheduler().tenant(tenant),
        deadline: None,
        budget: 1 << 30,
    }
}

fn f32s(t: &HostTensor) -> Vec<f32> {
    t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Mean of a `[1, seq, hidden]` output over its tokens.
fn mean_pool(t: &HostTensor) -> Vec<f32> {
    let (seq, hidden) = (t.dims()[1] as usize, t.dims()[2] as usize);
    let v = f32s(t);
    (0..hidden).map(|h| (0..seq).map(|s| v[s * hidden + h]).sum::<f32>() / seq as f32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bert_rows_batched_across_tenants_match_unbatched_runs() {
    let (registry, model) = batching("minilm", minilm_dir(), 32).await;
    let cases = reference().cases;
    let ids = |t: &[i64]| {
        HostTensor::new(vec![1, t.len() as u32], TensorType::I64, t.iter().flat_map(|v| v.to_le_bytes()).collect())
            .unwrap()
    };
    // Unbatched: each text alone, straight on the model.
    let alone: Vec<Vec<f32>> = cases
        .iter()
        .map(|c| mean_pool(&model.compute(vec![("input_ids".into(), ids(&c.token_ids))]).unwrap()[0].1))
        .collect();
    // Batched: all at once from three tenants (the scheduler pads and masks the shorter ones).
    let jobs: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let tenant = ["a", "b", "c"][i % 3];
            registry.scheduler().submit(job(
                &registry,
                "minilm",
                &model,
                tenant,
                vec![("input_ids".into(), ids(&c.token_ids))],
            ))
        })
        .collect();
    for (i, j) in jobs.into_iter().enumerate() {
        let out = j.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out[0].1.dims(), &[1, cases[i].token_ids.len() as u32, 384], "its own rows at its own length");
        let cos = cosine(&mean_pool(&out[0].1), &alone[i]);
        assert!(cos >= 0.99999, "{:?}: cosine {cos} against the unbatched run", cases[i].text);
    }
    let (passes, rows) = registry.scheduler().passes();
    assert_eq!(rows, cases.len() as u64);
    assert!(passes < rows / 2, "{rows} rows in {passes} passes: they were batched");
    for t in ["a", "b", "c"] {
        assert!(registry.scheduler().tenant(t).used_seconds() > 0.0, "tenant {t} was charged");
    }
}

/// A batched BERT pass whose middle caller went away drops that caller's rows between blocks:
/// they come back as zeros, and the other callers' rows are exactly what they would be alone.
#[test]
fn bert_drops_an_abandoned_callers_rows_and_keeps_the_others() {
    use eir::nn::meter::{Meter, Part};
    let model = eir::nn::backend::load(eir::nn::backend::Source::Path(&minilm_dir()), Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let cases = reference().cases;
    let texts: Vec<&[i64]> =
        cases.iter().filter(|c| c.token_ids.len() >= 6).take(4).map(|c| &c.token_ids[..6]).collect();
    let batch = |rows: &[&[i64]]| {
        let data = rows.iter().flat_map(|r| r.iter().flat_map(|v| v.to_le_bytes())).collect();
        vec![("input_ids".to_string(), HostTensor::new(vec![rows.len() as u32, 6], TensorType::I64, data).unwrap())]
    };
    // Three callers: rows 0, 1..3 (gone before the pass), 3.
    let gone = eir::nn::CancelToken::new();
    gone.cancel();
    let part = |rows, token| Part { rows, token, deadline: None };
    let meter = Meter::for_batch(
        u64::MAX,
        vec![part(0..1, eir::nn::CancelToken::new()), part(1..3, gone), part(3..4, eir::nn::CancelToken::new())],
    );
    let out = model.compute_with(batch(&texts), &meter).unwrap_or_else(|e| panic!("{e}"));
    let hidden = f32s(&out[0].1);
    let row = |r: usize| &hidden[r * 6 * 384..(r + 1) * 6 * 384];
    assert!(row(1).iter().chain(row(2)).all(|&v| v == 0.0), "the abandoned rows were not computed");
    for (r, text) in [(0, texts[0]), (3, texts[3])] {
        let alone = f32s(&model.compute(batch(&[text])).unwrap()[0].1);
        let worst = alone.iter().zip(row(r)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "row {r} differs from its run alone by {worst}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnx_logits_batched_across_tenants_match_unbatched_runs() {
    let (registry, model) = batching("efficientnet-lite0", model_dir("efficientnet-lite0"), 4).await;
    // Six pseudo-random images (a fixed LCG), normalised around 0.
    let mut state = 12345u32;
    let images: Vec<HostTensor> = (0..6)
        .map(|_| {
            let data = (0..3 * 224 * 224)
                .flat_map(|_| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    ((state >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0).to_le_bytes()
                })
                .collect();
            HostTensor::new(vec![1, 3, 224, 224], TensorType::Fp32, data).unwrap()
        })
        .collect();
    let alone: Vec<Vec<f32>> =
        images.iter().map(|x| f32s(&model.compute(vec![("input".into(), x.clone())]).unwrap()[0].1)).collect();
    let jobs: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let tenant = ["a", "b"][i % 2];
            registry.scheduler().submit(job(
                &registry,
                "efficientnet-lite0",
                &model,
                tenant,
                vec![("input".into(), x.clone())],
            ))
        })
        .collect();
    for (i, j) in jobs.into_iter().enumerate() {
        let out = j.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out[0].1.dims(), &[1, 1000]);
        let diff = f32s(&out[0].1).iter().zip(&alone[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-4, "image {i}: max |diff| {diff} against the unbatched run");
    }
    let (passes, rows) = registry.scheduler().passes();
    assert_eq!((passes, rows), (2, 6), "max_batch 4: a pass of 4 and one of 2");
}

fn config() -> String {
    let te = crate::common::guest("text-embed").display().to_string();
    format!(
        r#"
[server]
admin_key_sha256 = "{admin}"

[models.minilm]
path = "{minilm}"
max_batch = 32
max_delay = "300ms"

[plugins.text-embed]
path = "{te}"
models = ["minilm"]
reuse = 100
concurrency = 32

[tenants.a]
keys_sha256 = ["{a}"]
plugins = ["*"]
rps = 100000
burst = 100000
max_concurrent = 64

[tenants.b]
keys_sha256 = ["{b}"]
plugins = ["*"]
rps = 100000
burst = 100000
max_concurrent = 64
weight = 2

[tenants.metered]
keys_sha256 = ["{m}"]
plugins = ["*"]
compute_quota = 0.001
"#,
        admin = hash("admin-key"),
        minilm = minilm_dir().display(),
        a = hash("a-key"),
        b = hash("b-key"),
        m = hash("metered-key"),
    )
}

fn embedding(body: &Value) -> Vec<f32> {
    body["outputs"][0]["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_batches_tenants_together_charges_each_and_enforces_compute_quotas() {
    let cache = tempfile::tempdir().unwrap();
    let s = Server::start_with(&config(), cache.path());
    let texts = [
        "A man is eating food.",
        "The girl is carrying a baby on her back through the market.",
        "Edge servers run inference plugins.",
        "Short one.",
        "WebAssembly components call models through wasi-nn, and the host batches them.",
        "What is the capital of France?",
    ];
    let request = |t: &str| json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [t]}]});
    // One at a time: every pass carries one row.
    let mut alone = Vec::new();
    for t in texts {
        let (code, _, body) = infer(&s, "text-embed", "a-key", &request(t)).await;
        assert_eq!(code, 200, "{body}");
        alone.push(embedding(&body));
    }
    // All at once, from both tenants: they share passes and still get their own rows.
    let mut calls = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        for key in ["a-key", "b-key"] {
            let (url, body) = (s.url.clone(), request(t));
            calls.push(tokio::spawn(async move {
                let resp = reqwest::Client::new()
                    .post(format!("{url}/v2/models/text-embed/infer"))
                    .bearer_auth(key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                (i, resp.status().as_u16(), resp.json::<Value>().await.unwrap_or(Value::Null))
            }));
        }
    }
    for call in calls {
        let (i, code, body) = call.await.unwrap();
        assert_eq!(code, 200, "{body}");
        let cos = cosine(&embedding(&body), &alone[i]);
        assert!(cos >= 0.99999, "{:?}: cosine {cos} batched against alone", texts[i]);
    }
    let (_, metrics) = crate::gateway::get_text(&s, "/metrics", "admin-key").await;
    let passes = metric(&metrics, "eir_sched_batch_rows_count", "model=\"minilm\"");
    let rows = metric(&metrics, "eir_sched_batch_rows_sum", "model=\"minilm\"");
    assert_eq!(rows, 18.0, "6 alone + 12 together");
    // Arrivals spread over the time fresh instances take to parse the tokenizer (more on a
    // loaded machine); a 300 ms window still gathers them into a few passes.
    assert!(passes - 6.0 <= 8.0, "12 concurrent requests took {} passes", passes - 6.0);
    for t in ["a", "b"] {
        let used = metric(&metrics, "eir_sched_compute_seconds_total", &format!("tenant=\"{t}\""));
        assert!(used > 0.0, "tenant {t} is charged its compute: {metrics}");
    }
    // The model's metadata says how it batches.
    let (_, meta) = crate::gateway::get(&s, "/v2/models/text-embed", Some("a-key")).await;
    assert_eq!(meta["models"]["minilm"]["max_batch"], 32, "{meta}");

    // A tenant with a compute quota of 0.001 core-seconds per minute: its first request
    // overdraws it, the next is refused with 429 and a Retry-After until the minute refills.
    let (code, _, body) = infer(&s, "text-embed", "metered-key", &request("One request.")).await;
    assert_eq!(code, 200, "{body}");
    let (code, headers, body) = infer(&s, "text-embed", "metered-key", &request("Another.")).await;
    assert_eq!(code, 429, "{body}");
    assert!(body["error"].as_str().unwrap().contains("compute quota"), "{body}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After {retry}");
}
