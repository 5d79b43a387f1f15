//! Capabilities: a plugin sees only what it was granted.

use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;

use eir::grants::{DirGrant, Grants};
use eir::plugin::PluginConfig;

use crate::common::{load, request, runtime, strings};

fn attempts(grants: Grants) -> Vec<String> {
    let (rt, _cache) = runtime();
    let plugin = load(&rt, "hostile", PluginConfig { grants, ..Default::default() });
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let response = tokio.block_on(plugin.handle(&request(&[("attack", "escape")], vec![]))).unwrap();
    strings(&response.outputs[0])
}

#[test]
fn without_grants_no_file_is_visible() {
    let out = attempts(Grants::default());
    assert_eq!(out.len(), 5);
    for line in &out {
        assert!(line.contains("denied"), "{line}");
    }
}

#[test]
fn a_read_only_preopen_is_readable_but_not_writable_and_cannot_be_escaped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "granted").unwrap();
    let grants = Grants {
        dirs: vec![DirGrant { host: dir.path().into(), guest: "/data".into(), writable: false }],
        ..Default::default()
    };
    let out = attempts(grants);
    assert!(out[0].starts_with("read /etc/passwd: denied"), "{}", out[0]);
    assert!(out[1].starts_with("read /data/../../etc/passwd: denied"), "{}", out[1]);
    assert!(out[2].starts_with("read ../etc/passwd: denied"), "{}", out[2]);
    assert_eq!(out[3], "read /data/secret.txt: 7 bytes");
    assert!(out[4].starts_with("write /data/written.txt: denied"), "{}", out[4]);
    assert!(!dir.path().join("written.txt").exists());
}

#[test]
fn a_writable_preopen_accepts_writes() {
    let dir = tempfile::tempdir().unwrap();
    let grants = Grants {
        dirs: vec![DirGrant { host: dir.path().into(), guest: "/data".into(), writable: true }],
        ..Default::default()
    };
    let out = attempts(grants);
    assert_eq!(out[4], "write /data/written.txt: ok");
    assert_eq!(std::fs::read_to_string(dir.path().join("written.txt")).unwrap(), "x");
}

#[tokio::test]
async fn only_granted_environment_variables_are_visible() {
    let (rt, _cache) = runtime();
    let grants = Grants { env: vec![("MODEL".into(), "minilm".into())], ..Default::default() };
    let plugin = load(&rt, "hostile", PluginConfig { grants, ..Default::default() });
    let response = plugin.handle(&request(&[("attack", "env")], vec![])).await.unwrap();
    assert_eq!(strings(&response.outputs[0]), ["MODEL=minilm"]);
}

#[tokio::test]
async fn the_network_is_denied_unless_granted() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (rt, _cache) = runtime();

    let denied = load(&rt, "hostile", PluginConfig::default());
    let response = denied.handle(&request(&[("attack", "network"), ("addr", &addr)], vec![])).await.unwrap();
    let result = &strings(&response.outputs[0])[0];
    assert!(result.starts_with("denied"), "{result}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(listener.accept().is_err(), "no connection may reach the host");

    let granted = load(
        &rt,
        "hostile",
        PluginConfig { grants: Grants { network: true, ..Default::default() }, ..Default::default() },
    );
    let response = granted.handle(&request(&[("attack", "network"), ("addr", &addr)], vec![])).await.unwrap();
    let result = &strings(&response.outputs[0])[0];
    assert_eq!(result, &format!("connected to {addr}"));
    listener.set_nonblocking(false).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    let mut buf = Vec::new();
    let _ = conn.read_to_end(&mut buf);
}

#[test]
fn a_missing_directory_fails_at_load_with_its_path() {
    let (rt, _cache) = runtime();
    let grants = Grants { dirs: vec!["/no/such/dir::/data".parse().unwrap()], ..Default::default() };
    let err = rt
        .load_plugin("hostile", &crate::common::guest("hostile"), PluginConfig { grants, ..Default::default() }, false)
        .err()
        .expect("load must fail");
    assert!(err.to_string().contains("/no/such/dir"), "{err}");
}
