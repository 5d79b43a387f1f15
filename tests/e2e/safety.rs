//! Host safety through the real gateway: hostile models end as errors of the right kind with
//! the host alive and its memory bounded; an oversized request stays within the compute budget
//! while another tenant is served; a passed deadline stops the CPU work, not only the wait.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{guest, repo};
use crate::embed::minilm_dir;
use crate::gateway::{Server, get, hash, infer};

/// Peak resident memory of process `pid` (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status");
    kb * 1024
}

/// CPU time (user + system) process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc stat");
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let rest = &stat[stat.rfind(')').expect("stat has a command") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100);
    Duration::from_millis(ticks * 1000 / hz)
}

fn config() -> String {
    format!(
        r#"
[models.minilm]
path = "{minilm}"

[plugins.hostile]
path = "{hostile}"
load_from_bytes = "16MiB"
dirs = ["{fixtures}::/data:ro"]
limits = {{ timeout = "20s" }}

[plugins.text-embed]
path = "{te}"
models = ["minilm"]
reuse = 100
# Generous: the big request below shares 2 cores with the rest of the suite.
limits = {{ timeout = "180s" }}

[plugins.text-normalize]
path = "{tn}"
reuse = 1000

[tenants.big]
keys_sha256 = ["{big}"]
plugins = ["*"]
max_concurrent = 1

[tenants.hurried]
keys_sha256 = ["{hurried}"]
plugins = ["text-embed"]
ceilings = {{ timeout = "1s" }}

[tenants.small]
keys_sha256 = ["{small}"]
plugins = ["text-normalize"]
rps = 100000
"#,
        minilm = minilm_dir().display(),
        hostile = guest("hostile").display(),
        fixtures = repo().join("tests/fixtures/hostile").display(),
        te = guest("text-embed").display(),
        tn = guest("text-normalize").display(),
        big = hash("big-key"),
        hurried = hash("hurried-key"),
        small = hash("small-key"),
    )
}

fn start() -> (Server, tempfile::TempDir) {
    let cache = tempfile::tempdir().unwrap();
    (Server::start_with(&config(), cache.path()), cache)
}

fn first_string(body: &Value) -> String {
    body["outputs"][0]["data"][0].as_str().unwrap_or_default().to_string()
}

/// The spec's error code as the guest prints it: `too-large` -> `ErrorCode::TooLarge`.
fn printed(code: &str) -> String {
    let camel: String = code
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect();
    format!("ErrorCode::{camel}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_models_end_as_errors_of_their_kind_with_the_host_alive_and_memory_bounded() {
    let (s, _cache) = start();
    let manifest: Vec<Value> =
        serde_json::from_slice(&std::fs::read(repo().join("tests/fixtures/hostile/manifest.json")).unwrap()).unwrap();
    assert!(manifest.len() >= 25, "the fixture set is complete");
    for case in &manifest {
        let (file, stage, code) =
            (case["file"].as_str().unwrap(), case["stage"].as_str().unwrap(), case["code"].as_str().unwrap());
        let body = json!({"inputs": [], "parameters": {"attack": "nn-onnx", "file": file}});
        let (status, _, answer) = infer(&s, "hostile", "big-key", &body).await;
        assert_eq!(status, 200, "{file}: {answer}");
        let got = first_string(&answer);
        let want = format!("{stage}: {}", printed(code));
        assert!(got.starts_with(&want), "{file}: expected `{want}`, got `{got}`");
    }
    let (live, _) = get(&s, "/v2/health/live", None).await;
    assert_eq!(live, 200, "the gateway survived every hostile model");
    let peak = peak_rss(s.pid());
    eprintln!("gateway peak RSS after {} hostile models: {} MiB", manifest.len(), peak >> 20);
    assert!(peak < 1 << 30, "peak RSS {} MiB: a hostile model made the host allocate", peak >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_stays_within_the_budget_while_another_tenant_is_served() {
    let (s, _cache) = start();
    let long = "lorem ipsum dolor sit amet ".repeat(150);
    let texts: Vec<&str> = vec![long.as_str(); 24];
    let body = json!({
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [24], "data": texts}],
        "parameters": {"max_tokens": 512, "batch_size": 24},
    });
    let before = peak_rss(s.pid());
    let small = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["  Hello  "]}]});
    let big = infer(&s, "text-embed", "big-key", &body);
    let served = async {
        // The other tenant keeps calling while the big request runs.
        let mut ok = 0;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            let (status, _, answer) = infer(&s, "text-normalize", "small-key", &small).await;
            assert_eq!(status, 200, "{answer}");
            ok += 1;
        }
        ok
    };
    let ((status, _, answer), ok) = tokio::join!(big, served);
    assert_eq!(status, 200, "the plugin shrinks its batch when the host says too-large: {answer}");
    assert_eq!(answer["outputs"][0]["shape"], json!([24, 384]));
    assert!(ok > 0, "the other tenant was served meanwhile");
    let peak = peak_rss(s.pid());
    eprintln!(
        "gateway peak RSS: {} MiB before, {} MiB after 24 x 512 tokens at batch 24 (other tenant: {ok} calls)",
        before >> 20,
        peak >> 20
    );
    assert!(peak < 2560 << 20, "peak RSS {} MiB is over the compute budget's bound", peak >> 20);

    // Past a shipped plugin's own bound: refused, naming it.
    let many: Vec<&str> = vec!["x"; 1025];
    let body = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1025], "data": many}]});
    let (status, _, answer) = infer(&s, "text-embed", "big-key", &body).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap_or_default().contains("at most 1024"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_stops_the_forward_pass_and_frees_the_cores() {
    let (s, _cache) = start();
    let long = "lorem ipsum dolor sit amet ".repeat(150);
    let texts: Vec<&str> = vec![long.as_str(); 64];
    let body = json!({
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [64], "data": texts}],
        "parameters": {"max_tokens": 512, "batch_size": 16},
    });
    // Warm the instance and the model first, so the deadline falls in a forward pass.
    let (status, _, answer) = infer(
        &s,
        "text-embed",
        "hurried-key",
        &json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["warm"]}]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // Idle, the gateway sleeps: the epoch ticker runs only while wasm may run (ticking every
    // 2 ms regardless cost ~35 ms of CPU in 2 s).
    let idle_from = cpu_time(s.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = cpu_time(s.pid()) - idle_from;
    eprintln!("CPU time the idle gateway spent in 2 s: {} ms", idle.as_millis());
    assert!(idle <= Duration::from_millis(20), "an idle gateway spent {idle:?} of CPU in 2 s");
    let (status, _, answer) = infer(&s, "text-embed", "hurried-key", &body).await;
    assert_eq!(status, 504, "{answer}");
    let at_504 = cpu_time(s.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = cpu_time(s.pid()) - at_504;
    eprintln!("CPU time the gateway spent in the 2 s after the 504: {} ms", after.as_millis());
    // Without cancellation the abandoned 16 x 512 batch keeps both cores busy for seconds.
    assert!(after < Duration::from_millis(100), "the forward pass went on after the 504: {after:?} of CPU");
}
