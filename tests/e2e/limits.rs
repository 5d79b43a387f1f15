//! Each hostile behaviour is stopped with its own error kind, and the same plugin serves the
//! next call.

use std::time::Duration;

use bytesize::ByteSize;
use eir::limits::Limits;
use eir::plugin::{ErrorKind, PluginConfig};
use eir::tensor::{Tensor, TensorData};

use crate::common::{load, request, runtime, strings, texts};

/// Fails the test instead of hanging CI if a limit does not stop a call.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer after 120 s"))
}

fn tight() -> Limits {
    Limits {
        fuel: 2_000_000_000,
        timeout: Duration::from_secs(20),
        max_memory: ByteSize::mib(64),
        max_response: ByteSize::mib(8),
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_is_stopped_with_its_kind_and_the_next_call_works() {
    let (rt, _cache) = runtime();
    let plugin = load(&rt, "hostile", PluginConfig { limits: tight(), ..Default::default() });
    let cases = [
        ("loop", ErrorKind::OutOfFuel, "fuel"),
        ("memory", ErrorKind::MemoryLimit, "memory limit"),
        ("recursion", ErrorKind::StackOverflow, "stack"),
        ("panic", ErrorKind::Trap, "panics on purpose"),
        ("trap", ErrorKind::Trap, "unreachable"),
        ("big-output", ErrorKind::ResponseTooLarge, "response limit"),
        ("bad-output", ErrorKind::InvalidOutput, "holds 9 elements but 4"),
        ("exit", ErrorKind::Exited, "exited"),
    ];
    for (attack, kind, words) in cases {
        let err = within(attack, plugin.handle(&request(&[("attack", attack)], vec![]))).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{attack}: {err}");
        assert!(err.to_string().contains(words), "{attack}: message should mention {words:?}: {err}");

        let ok = within("echo", plugin.handle(&request(&[], vec![texts("x", &["still here"])]))).await;
        let ok = ok.unwrap_or_else(|e| panic!("call after {attack} failed: {e}"));
        assert_eq!(strings(&ok.outputs[0]), ["still here"], "after {attack}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_stops_busy_loops_and_host_waits() {
    let (rt, _cache) = runtime();
    let limits = Limits { fuel: u64::MAX / 2, timeout: Duration::from_millis(300), ..Limits::default() };
    let plugin = load(&rt, "hostile", PluginConfig { limits, ..Default::default() });
    // "loop" spins in wasm (stopped by the epoch check); "sleep" waits inside a host call
    // (stopped by the async timeout).
    for attack in ["loop", "sleep"] {
        let err = within(attack, plugin.handle(&request(&[("attack", attack)], vec![]))).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DeadlineExceeded, "{attack}: {err}");
        assert!(err.to_string().contains("deadline of 300ms"), "{err}");
    }
    let ok = within("echo", plugin.handle(&request(&[], vec![texts("x", &["ok"])]))).await.unwrap();
    assert_eq!(strings(&ok.outputs[0]), ["ok"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_call_does_not_stall_others_and_can_be_cancelled() {
    let (rt, _cache) = runtime();
    let limits = Limits { fuel: u64::MAX / 2, timeout: Duration::from_secs(60), ..Limits::default() };
    let plugin = std::sync::Arc::new(load(&rt, "hostile", PluginConfig { limits, ..Default::default() }));
    let spinner = {
        let plugin = plugin.clone();
        tokio::spawn(async move { plugin.handle(&request(&[("attack", "loop")], vec![])).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..20 {
        let word = format!("call {i}");
        let ok = within("echo", plugin.handle(&request(&[], vec![texts("x", &[&word])]))).await.unwrap();
        assert_eq!(strings(&ok.outputs[0]), [word]);
    }
    assert!(!spinner.is_finished(), "the spinning call should still be running (it has a 60 s deadline)");
    spinner.abort();
    assert!(spinner.await.unwrap_err().is_cancelled());
    let ok = within("echo", plugin.handle(&request(&[], vec![texts("x", &["after"])]))).await.unwrap();
    assert_eq!(strings(&ok.outputs[0]), ["after"]);
}

#[tokio::test]
async fn oversized_and_malformed_requests_never_reach_the_guest() {
    let (rt, _cache) = runtime();
    let limits = Limits { max_request: ByteSize::kib(1), ..Limits::default() };
    let plugin = load(&rt, "hostile", PluginConfig { limits, ..Default::default() });
    let big = Tensor { name: "x".into(), shape: vec![2048], data: TensorData::Uint8(vec![0; 2048]) };
    let err = plugin.handle(&request(&[], vec![big])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RequestTooLarge, "{err}");
    let bad = Tensor { name: "x".into(), shape: vec![2, 2], data: TensorData::Fp32(vec![1.0]) };
    let err = plugin.handle(&request(&[], vec![bad])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    let overflow = Tensor { name: "x".into(), shape: vec![u64::MAX, u64::MAX], data: TensorData::Fp32(vec![]) };
    let err = plugin.handle(&request(&[], vec![overflow])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
}

#[tokio::test]
async fn typed_plugin_errors_keep_their_code() {
    let (rt, _cache) = runtime();
    let plugin = load(&rt, "hostile", PluginConfig::default());
    let err = plugin.handle(&request(&[("attack", "no-such-attack")], vec![])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Plugin(eir::tensor::ErrorCode::InvalidInput), "{err}");
    assert!(err.to_string().contains("unknown attack"), "{err}");
}

#[tokio::test]
async fn instance_and_table_caps_apply() {
    let (rt, _cache) = runtime();
    let limits = Limits { max_instances: 1, ..Limits::default() };
    let plugin = load(&rt, "hostile", PluginConfig { limits, ..Default::default() });
    let err = plugin.handle(&request(&[], vec![])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MemoryLimit, "{err}");
    assert!(err.to_string().contains("instance"), "{err}");

    let limits = Limits { max_table_elements: 1, ..Limits::default() };
    let plugin = load(&rt, "hostile", PluginConfig { limits, ..Default::default() });
    let err = plugin.handle(&request(&[], vec![])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MemoryLimit, "{err}");
    assert!(err.to_string().contains("table"), "{err}");
}

#[tokio::test]
async fn reused_instances_keep_state_but_never_survive_a_failure() {
    let (rt, _cache) = runtime();
    async fn count(plugin: &eir::plugin::Plugin) -> u32 {
        let r = plugin.handle(&request(&[("attack", "count")], vec![])).await.unwrap();
        r.parameters.iter().find(|(k, _)| k == "calls").map(|(_, v)| v.parse::<u32>().unwrap()).unwrap()
    }
    let fresh = load(&rt, "hostile", PluginConfig::default());
    for _ in 0..3 {
        assert_eq!(count(&fresh).await, 1, "reuse = 1 gives every call a fresh instance");
    }
    let limits = Limits { fuel: 500_000_000, ..Limits::default() };
    let warm = load(&rt, "hostile", PluginConfig { limits, reuse: 3, ..Default::default() });
    assert_eq!([count(&warm).await, count(&warm).await, count(&warm).await], [1, 2, 3]);
    assert_eq!(count(&warm).await, 1, "the instance retired after 3 calls");
    assert_eq!(count(&warm).await, 2);
    // A failure discards the instance; fuel is per call, so the next calls still run.
    let err = warm.handle(&request(&[("attack", "loop")], vec![])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfFuel);
    assert_eq!(count(&warm).await, 1, "a fresh instance after the failure");
    assert_eq!(count(&warm).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_instances_stay_warm_than_configured() {
    let (rt, _cache) = runtime();
    let plugin = std::sync::Arc::new(load(&rt, "hostile", PluginConfig { reuse: 100, warm: 3, ..Default::default() }));
    // Calls at once, ending close together (as the callers of one batched forward pass do).
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let plugin = plugin.clone();
            tokio::spawn(async move { plugin.handle(&request(&[("attack", "busy"), ("ms", "20")], vec![])).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // How many instances the calls overlapped on depends on scheduling (11-16 of 20 here);
    // at most 3 stay.
    let kept = plugin.warm_instances();
    assert!((1..=3).contains(&kept), "{kept} instances kept warm with warm = 3");
}
