//! The wasi-nn host's answers: grants, error codes, caps, deadlines.

use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use eir::Runtime;
use eir::engine::EngineConfig;
use eir::grants::Grants;
use eir::limits::Limits;
use eir::nn::{CancelToken, NnGrants};
use eir::plugin::{ErrorKind, Plugin, PluginConfig};
use eir::registry::{ModelDecl, Registry};
use eir::scheduler::Scheduler;

use crate::common::{guest, request, strings};
use crate::embed::minilm_dir;

/// A runtime serving MiniLM on a one-slot compute pool.
fn runtime() -> (Runtime, tempfile::TempDir) {
    let cache = tempfile::tempdir().unwrap();
    let registry = Registry::new(
        [(
            "minilm".to_string(),
            ModelDecl {
                path: minilm_dir(),
                family: None,
                target: Default::default(),
                batch: Default::default(),
                llm: None,
            },
        )],
        Scheduler::for_this_machine(),
    );
    let config = EngineConfig { cache_dir: Some(cache.path().into()), ..Default::default() };
    (Runtime::with_registry(config, Arc::new(registry)).unwrap(), cache)
}

/// The hostile guest with these wasi-nn grants (no directory grants: a granted model's files
/// come with it) and limits.
fn load(rt: &Runtime, nn: NnGrants, limits: Limits) -> Plugin {
    let grants = Grants { nn, ..Default::default() };
    rt.load_plugin("hostile", &guest("hostile"), PluginConfig { grants, limits, ..Default::default() }, false).unwrap()
}

fn hostile(nn: NnGrants, limits: Limits) -> (Plugin, (Runtime, tempfile::TempDir)) {
    let rt = runtime();
    (load(&rt.0, nn, limits), rt)
}

fn granted() -> NnGrants {
    NnGrants { models: vec!["minilm".into()], ..Default::default() }
}

async fn answer(plugin: &Plugin, params: &[(&str, &str)]) -> String {
    let response = plugin.handle(&request(params, vec![])).await.unwrap_or_else(|e| panic!("{e}"));
    strings(&response.outputs[0]).remove(0)
}

#[tokio::test]
async fn load_by_name_needs_a_grant_and_a_registered_model() {
    let (plugin, _c) = hostile(granted(), Limits::default());
    assert_eq!(answer(&plugin, &[("attack", "nn-name")]).await, "ok: last_hidden_state: TensorType::Fp32 [1, 4, 384]");
    let got = answer(&plugin, &[("attack", "nn-name"), ("model", "other")]).await;
    assert!(got.starts_with("ErrorCode::Security"), "{got}");

    let (all, _c) = hostile(NnGrants { models: vec!["*".into()], ..Default::default() }, Limits::default());
    let got = answer(&all, &[("attack", "nn-name"), ("model", "other")]).await;
    assert!(got.starts_with("ErrorCode::NotFound"), "{got}");

    let (none, _c) = hostile(NnGrants::default(), Limits::default());
    let got = answer(&none, &[("attack", "nn-name")]).await;
    assert!(got.starts_with("ErrorCode::Security"), "{got}");
}

#[tokio::test]
async fn load_from_bytes_is_a_separate_capped_grant() {
    let (plugin, _c) = hostile(granted(), Limits::default());
    let got = answer(&plugin, &[("attack", "nn-bytes")]).await;
    assert!(got.starts_with("ErrorCode::Security"), "{got}");

    let small = NnGrants { load_from_bytes: Some(ByteSize::mib(1)), ..granted() };
    let (plugin, _c) = hostile(small, Limits::default());
    let got = answer(&plugin, &[("attack", "nn-bytes")]).await;
    assert!(got.starts_with("ErrorCode::TooLarge"), "{got}");

    let enough = NnGrants { load_from_bytes: Some(ByteSize::mib(200)), ..granted() };
    let (plugin, _c) = hostile(enough, Limits::default());
    assert_eq!(answer(&plugin, &[("attack", "nn-bytes")]).await, "ok: last_hidden_state: TensorType::Fp32 [1, 2, 384]");
    // The cap bounds what the plugin holds, not what it ever loaded: the graph went with its
    // call, so the next call may load again.
    assert_eq!(plugin.loaded_bytes(), 0);
    assert_eq!(answer(&plugin, &[("attack", "nn-bytes")]).await, "ok: last_hidden_state: TensorType::Fp32 [1, 2, 384]");
}

#[tokio::test]
async fn bad_inputs_and_targets_get_spec_error_codes() {
    let (plugin, _c) = hostile(granted(), Limits::default());
    let got = answer(&plugin, &[("attack", "nn-bad-input")]).await;
    assert!(got.starts_with("ErrorCode::InvalidArgument") && got.contains("999999"), "{got}");
    let enough = NnGrants { load_from_bytes: Some(ByteSize::mib(1)), ..granted() };
    let (plugin, _c) = hostile(enough, Limits::default());
    let got = answer(&plugin, &[("attack", "nn-gpu")]).await;
    assert!(got.starts_with("ErrorCode::UnsupportedOperation") && got.contains("cuda"), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_cuts_a_compute_wait_and_the_host_carries_on() {
    let limits = Limits { timeout: Duration::from_millis(500), ..Limits::default() };
    let (plugin, _c) = hostile(granted(), limits);
    let busy = request(&[("attack", "nn-busy")], vec![]);
    let call = plugin.handle(&busy);
    let outcome = tokio::time::timeout(Duration::from_secs(120), call).await.expect("the deadline must end the call");
    match outcome {
        Err(e) => assert_eq!(e.kind(), ErrorKind::DeadlineExceeded, "{e}"),
        Ok(r) => {
            let got = strings(&r.outputs[0]).remove(0);
            assert!(got.starts_with("ErrorCode::Timeout"), "the guest may see a timeout error instead: {got}");
        }
    }
    // The abandoned forward pass still holds the one compute slot until it ends; a caller
    // with time to wait gets its turn after it.
    let patient = load(&_c.0, granted(), Limits::default());
    assert!(answer(&patient, &[("attack", "nn-name")]).await.starts_with("ok"));
}

#[tokio::test]
async fn tensors_parked_in_the_host_are_capped() {
    let nn = NnGrants { max_tensor_bytes: ByteSize::mib(8), ..granted() };
    let (plugin, _c) = hostile(nn, Limits::default());
    let err = plugin.handle(&request(&[("attack", "nn-hoard")], vec![])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MemoryLimit, "{err}");
    assert!(err.to_string().contains("wasi-nn tensor bytes"), "{err}");
    assert!(answer(&plugin, &[("attack", "nn-name")]).await.starts_with("ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_stops_soon_keeps_its_instance_and_is_charged() {
    let (rt, _cache) = runtime();
    let grants = Grants { nn: granted(), ..Default::default() };
    let config = PluginConfig { grants, reuse: 10, ..Default::default() };
    let plugin = rt.load_plugin("hostile", &guest("hostile"), config, false).unwrap();
    async fn count(plugin: &Plugin) -> u32 {
        let r = plugin.handle(&request(&[("attack", "count")], vec![])).await.unwrap();
        r.parameters.iter().find(|(k, _)| k == "calls").map(|(_, v)| v.parse::<u32>().unwrap()).unwrap()
    }
    // Abandoned after `after` and once `ready` holds, the call must end within a minute (not
    // at its deadline, which the default limits put further out, nor never).
    async fn abandon_after(
        plugin: &Plugin,
        params: &[(&str, &str)],
        after: Duration,
        ready: impl Fn() -> bool,
    ) -> Result<eir::tensor::Response, eir::plugin::CallError> {
        let token = CancelToken::new();
        let req = request(params, vec![]);
        let call = plugin.handle_abandonable(&req, &token);
        let cancel = async {
            tokio::time::sleep(after).await;
            while !ready() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            token.cancel();
        };
        let ((result, _), ()) =
            tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(call, cancel) }).await.expect("it ends");
        result
    }
    assert_eq!(count(&plugin).await, 1);

    // Looping over forward passes: the pass running when the caller goes away stops, the guest
    // sees a timeout error and returns, and its instance stays warm.
    // Cancelled only once a forward pass has started: on a loaded machine, loading the model
    // (which a hang-up does not interrupt) can outlast the grace, and that case is the spinning
    // guest's below.
    let scheduler = rt.registry().scheduler().clone();
    let passes = scheduler.passes().0;
    let in_a_pass = move || scheduler.passes().0 > passes;
    let r = abandon_after(&plugin, &[("attack", "nn-busy")], Duration::from_millis(500), in_a_pass).await.unwrap();
    let got = strings(&r.outputs[0]).remove(0);
    assert!(got.starts_with("ErrorCode::Timeout"), "{got}");
    assert_eq!(count(&plugin).await, 2, "the same instance answers the next call");

    // Gone before it starts: nothing runs, and the instance is kept.
    let gone = CancelToken::new();
    gone.cancel();
    let (r, _) = plugin.handle_abandonable(&request(&[("attack", "count")], vec![]), &gone).await;
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Abandoned);
    assert_eq!(count(&plugin).await, 3, "nothing ran");

    // Plugin code that never calls the host is stopped after the grace, and the CPU it burnt
    // is charged to its tenant (as the forward passes are).
    let before = plugin.tenant().used_seconds();
    let started = std::time::Instant::now();
    let err = abandon_after(&plugin, &[("attack", "busy"), ("ms", "60000")], Duration::from_millis(300), || true)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Abandoned, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped long before its 30 s deadline: {:?}",
        started.elapsed()
    );
    let charged = plugin.tenant().used_seconds() - before;
    assert!(charged >= 0.1, "about 0.4 s of spinning was charged as {charged} s");
    assert_eq!(count(&plugin).await, 1, "a fresh instance after one was stopped mid-run");
}
