//! The shipped plugins give the right answers.

use eir::grants::{DirGrant, Grants};
use eir::plugin::{ErrorKind, PluginConfig};
use eir::tensor::{ErrorCode, Tensor, TensorData};

use crate::common::{load, request, runtime, strings, texts};

async fn normalize(params: &[(&str, &str)], input: &[&str]) -> Vec<String> {
    let (rt, _cache) = runtime();
    let plugin = load(&rt, "text-normalize", PluginConfig::default());
    let response = plugin.handle(&request(params, vec![texts("text", input)])).await.unwrap();
    strings(&response.outputs[0])
}

#[tokio::test]
async fn text_normalize_applies_nfkc_lowercase_and_whitespace_rules() {
    let input = ["  Héllo \t  WORLD ﬁ ", "Ａｂｃ①", "Straße", "a\u{0}b\nc", ""];
    assert_eq!(normalize(&[], &input).await, ["héllo world fi", "abc1", "straße", "a b c", ""]);
    assert_eq!(
        normalize(&[("strip_accents", "true")], &["Crème Brûlée", "naïve café"]).await,
        ["creme brulee", "naive cafe"]
    );
    assert_eq!(
        normalize(&[("form", "nfc"), ("lowercase", "false"), ("collapse_whitespace", "false")], &["ﬁ  Ａ"]).await,
        ["ﬁ  Ａ"]
    );
    // NFD keeps the decomposed form: e + combining acute.
    assert_eq!(normalize(&[("form", "nfd")], &["É"]).await, ["e\u{301}"]);
}

#[tokio::test]
async fn text_normalize_keeps_the_shape_and_rejects_bad_input() {
    let (rt, _cache) = runtime();
    let plugin = load(&rt, "text-normalize", PluginConfig::default());
    let input =
        Tensor { name: "text".into(), shape: vec![2, 1], data: TensorData::Bytes(vec![b"A".to_vec(), b"B".to_vec()]) };
    let response = plugin.handle(&request(&[], vec![input])).await.unwrap();
    assert_eq!(response.outputs[0].shape, vec![2, 1]);

    let bad_utf8 = Tensor { name: "text".into(), shape: vec![1], data: TensorData::Bytes(vec![vec![0xff, 0xfe]]) };
    let err = plugin.handle(&request(&[], vec![bad_utf8])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Plugin(ErrorCode::InvalidInput), "{err}");
    let err = plugin.handle(&request(&[("form", "nfx")], vec![texts("text", &["a"])])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Plugin(ErrorCode::InvalidInput), "{err}");
    let err = plugin.handle(&request(&[], vec![])).await.unwrap_err();
    assert!(err.to_string().contains("missing input `text`"), "{err}");
}

/// Softmax computed here, independently of the plugin.
fn reference_softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::MIN, f64::max);
    let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
    row.iter().map(|x| (x - m).exp() / z).collect()
}

#[tokio::test]
async fn topk_ranks_softmax_scores_and_attaches_labels() {
    let labels_dir = tempfile::tempdir().unwrap();
    std::fs::write(labels_dir.path().join("labels.txt"), "cat\ndog\nbird\nfish\n").unwrap();
    let grants = Grants {
        dirs: vec![DirGrant { host: labels_dir.path().into(), guest: "/labels".into(), writable: false }],
        ..Default::default()
    };
    let (rt, _cache) = runtime();
    let plugin = load(&rt, "topk", PluginConfig { grants, ..Default::default() });
    let rows = [[0.5f32, 2.0, -1.0, 1.0], [3.0, 3.0, 0.0, -2.0]];
    let logits = Tensor { name: "logits".into(), shape: vec![2, 4], data: TensorData::Fp32(rows.concat()) };
    let req = request(&[("k", "3"), ("labels_file", "/labels/labels.txt")], vec![logits]);
    let response = plugin.handle(&req).await.unwrap();
    let by_name = |n: &str| response.outputs.iter().find(|t| t.name == n).unwrap_or_else(|| panic!("no output {n}"));

    let TensorData::Int64(indices) = &by_name("indices").data else { panic!("indices must be INT64") };
    assert_eq!(indices, &[1, 3, 0, 0, 1, 2]);
    let TensorData::Fp32(scores) = &by_name("scores").data else { panic!("scores must be FP32") };
    assert_eq!(by_name("scores").shape, vec![2, 3]);
    for (r, row) in rows.iter().enumerate() {
        let expected = reference_softmax(&row.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
        for j in 0..3 {
            let i = indices[r * 3 + j] as usize;
            assert!((f64::from(scores[r * 3 + j]) - expected[i]).abs() < 1e-6, "row {r} rank {j}");
        }
    }
    assert_eq!(strings(by_name("labels")), ["dog", "fish", "cat", "cat", "dog", "bird"]);
}

#[tokio::test]
async fn topk_without_the_labels_grant_explains_itself() {
    let (rt, _cache) = runtime();
    let plugin = load(&rt, "topk", PluginConfig::default());
    let logits = Tensor { name: "logits".into(), shape: vec![2], data: TensorData::Fp32(vec![1.0, 2.0]) };
    let err = plugin.handle(&request(&[("labels_file", "/labels/labels.txt")], vec![logits])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Plugin(ErrorCode::InvalidInput), "{err}");
    assert!(err.to_string().contains("is its directory granted"), "{err}");
}

#[tokio::test]
async fn topk_asked_for_labels_without_a_labels_file_says_what_is_missing() {
    let (rt, _cache) = runtime();
    let plugin = load(&rt, "topk", PluginConfig::default());
    let logits = Tensor { name: "logits".into(), shape: vec![2], data: TensorData::Fp32(vec![1.0, 2.0]) };
    let mut req = request(&[], vec![logits]);
    req.outputs = vec!["scores".into(), "indices".into(), "labels".into()];
    let err = plugin.handle(&req).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Plugin(ErrorCode::InvalidInput), "{err}");
    assert!(err.to_string().contains("needs the `labels_file` parameter"), "{err}");
    // Without `labels` among them, the same outputs are served.
    req.outputs.pop();
    let response = plugin.handle(&req).await.unwrap();
    assert_eq!(response.outputs.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["scores", "indices"]);
}
