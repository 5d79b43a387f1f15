//! Bundles through a real OCI registry: Debian's `docker-registry` (CNCF distribution 2.8),
//! started here on 127.0.0.1 with basic authentication.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{eir_with, guest, text};

/// The test registry's user and password (its htpasswd holds the bcrypt hash of the password).
pub const USER: &str = "eir";
pub const PASSWORD: &str = "eir-secret";
const HTPASSWD: &str = "eir:$2y$05$Md0Yr.0EDQQmrGI0S6wyVelgFZN2I4p0DHJsperQE77VjvJmh/FeK\n";

/// A `docker-registry` serving on a free loopback port until dropped.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Registry {
    /// Starts one; a missing binary fails with how to install it.
    pub fn start() -> Self {
        let bin = which("docker-registry").unwrap_or_else(|| {
            panic!("docker-registry is not installed: apt-get install docker-registry (scripts/test.sh does)")
        });
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        std::fs::write(dir.path().join("htpasswd"), HTPASSWD).unwrap();
        let config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {data}\n\
             http:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: eir-test\n    path: {htpasswd}\n",
            data = dir.path().join("data").display(),
            htpasswd = dir.path().join("htpasswd").display(),
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = Self::spawn(&bin, dir.path(), &addr);
        Registry { child, dir, bin, addr }
    }

    fn spawn(bin: &Path, dir: &Path, addr: &str) -> Child {
        let child = Command::new(bin)
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        let started = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "docker-registry did not start on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// Stops it (an outage); [`Registry::restart`] brings it back with the same contents.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same address and storage.
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.bin, self.dir.path(), &self.addr);
    }

    /// Where it keeps blob `hex`'s bytes.
    pub fn blob_file(&self, hex: &str) -> PathBuf {
        self.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(bin)).find(|p| p.is_file())
}

/// `eir bundle ARGS` against `store`, with the registry's credentials unless `anonymous`.
pub fn bundle(store: &Path, args: &[&str], anonymous: bool) -> (bool, String, String) {
    let mut all = vec!["bundle", "--store", store.to_str().unwrap()];
    all.extend_from_slice(args);
    let cache = store.parent().unwrap();
    let out = eir_with(&all, cache, |c| {
        if !anonymous {
            c.env("EIR_REGISTRY_USER", USER).env("EIR_REGISTRY_PASSWORD", PASSWORD);
        }
    });
    let (stdout, stderr) = text(&out);
    (out.status.success(), stdout, stderr)
}

/// A configuration with a plugin, the model it uses, a plugin with a granted directory, and
/// the gateway sections a bundle must leave out.
fn write_config(dir: &Path, labels: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("labels")).unwrap();
    std::fs::write(dir.join("labels/labels.txt"), labels).unwrap();
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[models.silero-vad]
path = "{vad_model}"

[plugins.vad]
path = "{vad}"
models = ["silero-vad"]

[plugins.topk]
path = "{topk}"
dirs = ["labels::/labels:ro"]

[tenants.t]
keys_sha256 = ["0000000000000000000000000000000000000000000000000000000000000000"]
plugins = ["*"]
"#,
        vad_model = crate::onnx::model_dir("silero-vad").display(),
        vad = guest("vad").display(),
        topk = guest("topk").display(),
    );
    let path = dir.join("eir.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Builds the `topk` bundle of `config` as each tag and pushes it to `registry/eir/TAG`.
fn build_and_push(store: &Path, config: &Path, registry: &Registry, tags: &[&str]) {
    for tag in tags {
        let (ok, _, err) =
            bundle(store, &["build", "--config", config.to_str().unwrap(), "--tag", tag, "--plugin", "topk"], false);
        assert!(ok, "{err}");
        let (ok, _, err) = bundle(store, &["push", tag, &format!("{}/eir/{tag}", registry.addr)], false);
        assert!(ok, "{err}");
    }
}

fn fetched(pull_output: &str) -> (u64, u64) {
    // "NAME DIGEST: N blobs, B bytes fetched, K already here"
    let after = pull_output.split(": ").nth(1).unwrap_or_default();
    let nums: Vec<u64> = after.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
    (nums[0], nums[1])
}

/// Build, push, pull, check out; an update moves only what changed; credentials are required;
/// a tampered blob is refused and leaves nothing behind.
#[test]
fn bundles_travel_through_a_real_registry_verified() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (src, dst) = (work.path().join("a/bundles"), work.path().join("b/bundles"));
    let config = write_config(&work.path().join("cfg"), "cat\ndog\n");

    let (ok, out, err) = bundle(&src, &["build", "--config", config.to_str().unwrap(), "--tag", "demo:1"], false);
    assert!(ok, "{err}");
    assert!(out.starts_with("demo:1 sha256:"), "{out}");
    let (ok, inspect, err) = bundle(&src, &["inspect", "demo:1"], false);
    assert!(ok, "{err}");
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let paths: Vec<&str> = inspect["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["annotations"]["org.cncf.model.filepath"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "models/silero-vad/silero_vad.onnx",
            "plugins/topk.wasm",
            "files/topk/0/labels.txt",
            "plugins/vad.wasm",
            "eir.toml"
        ],
        "{inspect}"
    );
    assert_eq!(inspect["config"]["plugins"][1]["world"], "eir:plugin/pipeline@0.1.0", "{inspect}");
    assert_eq!(inspect["layers"][0]["mediaType"], "application/vnd.cncf.model.weight.v1.raw");

    let target = format!("{}/eir/demo:1", registry.addr);
    let (ok, _, err) = bundle(&src, &["push", "demo:1", &target], true);
    assert!(!ok && err.contains("pushing demo:1"), "anonymous pushes are refused: {err}");
    let (ok, out, err) = bundle(&src, &["push", "demo:1", &target], false);
    assert!(ok, "{err}");
    assert!(out.contains("pushed demo:1"), "{out}");

    let (ok, out, err) = bundle(&dst, &["pull", &target], false);
    assert!(ok, "{err}");
    let (blobs, whole) = fetched(&out);
    assert_eq!(blobs, 6, "config and five layers: {out}");
    let (ok, out, err) = bundle(&dst, &["pull", &target], false);
    assert!(ok, "{err}");
    assert_eq!(fetched(&out), (0, 0), "a second pull moves nothing: {out}");

    // Checked out: the files are the originals and the fragment loads with paths inside.
    let checkout = work.path().join("served");
    let (ok, out, err) = bundle(&dst, &["checkout", "demo:1", checkout.to_str().unwrap()], false);
    assert!(ok, "{err}");
    let fragment = PathBuf::from(out.trim());
    let loaded = eir::config::Config::load(&fragment).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.plugins["vad"].path, checkout.join("plugins/vad.wasm"));
    assert!(loaded.tenants.is_empty(), "a bundle carries no tenants");
    assert_eq!(std::fs::read(checkout.join("plugins/vad.wasm")).unwrap(), std::fs::read(guest("vad")).unwrap());
    assert_eq!(std::fs::read_to_string(checkout.join("files/topk/0/labels.txt")).unwrap(), "cat\ndog\n");
    let text = std::fs::read_to_string(&fragment).unwrap();
    assert!(!text.contains("[server]") && !text.contains("tenants"), "{text}");

    // Version 2 changes one file: the pull moves that file, the config and the manifest.
    let config = write_config(&work.path().join("cfg"), "cat\ndog\nbird\n");
    let (ok, _, err) = bundle(&src, &["build", "--config", config.to_str().unwrap(), "--tag", "demo:2"], false);
    assert!(ok, "{err}");
    let target2 = format!("{}/eir/demo:2", registry.addr);
    let (ok, out, err) = bundle(&src, &["push", "demo:2", &target2], false);
    assert!(ok, "{err}");
    assert!(out.contains(": 2 blobs") && out.contains("4 already there"), "a push sends only what changed: {out}");
    let (ok, out, err) = bundle(&dst, &["pull", &target2], false);
    assert!(ok, "{err}");
    let (blobs, update) = fetched(&out);
    assert_eq!(blobs, 2, "the changed file and the config: {out}");
    assert!(update * 100 < whole, "update {update} bytes of {whole}");
    eprintln!("bundle: whole pull {whole} bytes, one-file update {update} bytes");

    // A model-only update (same plugins, new weights): the pull moves the model's layer, the
    // config and the manifest.
    let weights = work.path().join("new-weights");
    std::fs::create_dir_all(&weights).unwrap();
    let mut onnx = std::fs::read(crate::onnx::model_dir("silero-vad").join("silero_vad.onnx")).unwrap();
    let last = onnx.len() - 1;
    onnx[last] ^= 1;
    std::fs::write(weights.join("silero_vad.onnx"), &onnx).unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    let vad_dir = crate::onnx::model_dir("silero-vad").display().to_string();
    std::fs::write(&config, text.replace(&vad_dir, &weights.display().to_string())).unwrap();
    let (ok, _, err) = bundle(&src, &["build", "--config", config.to_str().unwrap(), "--tag", "demo:3"], false);
    assert!(ok, "{err}");
    let target3 = format!("{}/eir/demo:3", registry.addr);
    let (ok, _, err) = bundle(&src, &["push", "demo:3", &target3], false);
    assert!(ok, "{err}");
    let (ok, out, err) = bundle(&dst, &["pull", &target3], false);
    assert!(ok, "{err}");
    let (blobs, model_update) = fetched(&out);
    assert_eq!(blobs, 2, "the model's layer and the config: {out}");
    assert!(model_update >= onnx.len() as u64 && model_update < onnx.len() as u64 + 4096, "{model_update}");
    eprintln!("bundle: model-only update {model_update} bytes ({} of them weights)", onnx.len());

    // Tampered in the registry: the pull fails on the digest and tags nothing.
    let layers = inspect["layers"].as_array().unwrap();
    let onnx = layers[0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let file = registry.blob_file(&onnx);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let fresh = work.path().join("c/bundles");
    let (ok, _, err) = bundle(&fresh, &["pull", &target], false);
    assert!(!ok && err.contains("digest"), "{err}");
    let (ok, _, err) = bundle(&fresh, &["inspect", "demo:1"], false);
    assert!(!ok && err.contains("not found"), "nothing half-applied: {err}");
}

/// Checks a cosign signature stored in the registry with Python's `cryptography`, independently
/// of EIR's code: the simple-signing payload names `digest` and the signature verifies with
/// `public_key`.
const INDEPENDENT_CHECK: &str = r#"
import base64, hashlib, json, sys, urllib.request
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
registry, repo, digest, key_file, user, password = sys.argv[1:7]
auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
def get(path, accept=None):
    req = urllib.request.Request(f"http://{registry}/v2/{repo}/{path}", headers={"Authorization": auth})
    if accept:
        req.add_header("Accept", accept)
    return urllib.request.urlopen(req).read()
manifest = json.loads(get("manifests/sha256-" + digest.split(":")[1] + ".sig", "application/vnd.oci.image.manifest.v1+json"))
layer = manifest["layers"][0]
assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json", layer
payload = get("blobs/" + layer["digest"])
assert "sha256:" + hashlib.sha256(payload).hexdigest() == layer["digest"]
claims = json.loads(payload)
assert claims["critical"]["type"] == "cosign container image signature", claims
assert claims["critical"]["image"]["docker-manifest-digest"] == digest, claims
assert claims["critical"]["identity"]["docker-reference"] == f"{registry}/{repo}", claims
key = serialization.load_pem_public_key(open(key_file, "rb").read())
signature = base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"])
key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
print("independently verified")
"#;

/// Cosign-style signatures: a signed bundle verifies (also with Python's `cryptography`) and
/// pulls with the trusted key; a wrong key, an unsigned bundle and a tag moved to other content
/// are refused before anything is staged.
#[test]
fn signed_bundles_pull_and_unsigned_or_wrongly_signed_ones_never_stage() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("a/bundles");
    let config = write_config(&work.path().join("cfg"), "cat\ndog\n");
    build_and_push(&src, &config, &registry, &["demo:1", "demo:2"]);
    let keys = work.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for k in ["alice", "mallory"] {
        let (ok, _, err) = bundle(&src, &["keygen", keys.join(k).to_str().unwrap()], false);
        assert!(ok, "{err}");
    }
    let key = |k: &str, ext: &str| keys.join(format!("{k}.{ext}")).to_str().unwrap().to_string();
    let one = format!("{}/eir/demo:1", registry.addr);
    let two = format!("{}/eir/demo:2", registry.addr);

    let (ok, out, err) = bundle(&src, &["sign", &one, "--key", &key("alice", "key")], false);
    assert!(ok, "{err}");
    let digest = out.split_whitespace().last().unwrap().to_string();
    let (ok, _, err) = bundle(&src, &["verify", &one, "--key", &key("alice", "pub")], false);
    assert!(ok, "{err}");
    let python = std::env::var("EIR_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let check = Command::new(&python)
        .args(["-c", INDEPENDENT_CHECK, &registry.addr, "eir/demo", &digest, &key("alice", "pub"), USER, PASSWORD])
        .output()
        .expect("running the test Python (scripts/test.sh installs cryptography)");
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    let pull = |store: &str, reference: &str, k: &str| {
        bundle(&work.path().join(store).join("bundles"), &["pull", reference, "--key", &key(k, "pub")], false)
    };
    let (ok, out, err) = pull("good", &one, "alice");
    assert!(ok, "{err}");
    assert!(out.contains(&digest), "{out}");
    let refused = [
        ("wrong", one.clone(), "mallory", "does not match the key"),
        ("unsigned", two.clone(), "alice", "no signature"),
    ];
    for (store, reference, k, why) in refused {
        let (ok, _, err) = pull(store, &reference, k);
        assert!(!ok && err.contains(why), "{store}: {err}");
        let (ok, _, _) = bundle(&work.path().join(store).join("bundles"), &["inspect", "demo:1"], false);
        assert!(!ok, "{store}: nothing staged");
        let blobs = std::fs::read_dir(work.path().join(store).join("bundles/blobs/sha256")).unwrap().count();
        assert_eq!(blobs, 0, "{store}: no blob fetched");
    }
    // The tag moved to other content: the signature names the old digest.
    let (ok, _, err) = bundle(&src, &["push", "demo:2", &one], false);
    assert!(ok, "{err}");
    let (ok, _, err) = pull("moved", &one, "alice");
    assert!(!ok && err.contains("no signature"), "{err}");
}

/// `eir serve` with `[bundles.NAME]` under `[trust] mode = "enforce"`: a signed bundle's plugin
/// is served (its granted directory comes from the bundle); an unsigned one is refused at start,
/// and a reload to it is refused while the running version keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_signed_bundles_and_refuses_unsigned_ones() {
    use crate::gateway::{Server, hash};
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("a/bundles");
    let config = write_config(&work.path().join("cfg"), "cat\ndog\nbird\n");
    build_and_push(&src, &config, &registry, &["demo:1", "demo:2"]);
    let key = work.path().join("ops");
    assert!(bundle(&src, &["keygen", key.to_str().unwrap()], false).0);
    let one = format!("{}/eir/demo:1", registry.addr);
    let (ok, _, err) = bundle(&src, &["sign", &one, "--key", key.with_extension("key").to_str().unwrap()], false);
    assert!(ok, "{err}");

    let gateway_config = |tag: &str| {
        format!(
            r#"
[server]
admin_key_sha256 = "{admin}"

[bundles.demo]
ref = "{addr}/eir/demo:{tag}"

[trust]
mode = "enforce"
scopes = [{{ prefix = "{addr}/eir", keys = ["{key}"] }}]

[tenants.alpha]
keys_sha256 = ["{alpha}"]
plugins = ["topk"]
"#,
            addr = registry.addr,
            key = key.with_extension("pub").display(),
            alpha = hash("alpha-key"),
            admin = hash("admin-key"),
        )
    };
    let env = [("EIR_REGISTRY_USER", USER), ("EIR_REGISTRY_PASSWORD", PASSWORD)];
    let cache = tempfile::tempdir().unwrap();
    let server = Server::start_with_env(&gateway_config("1"), cache.path(), &env);
    let client = reqwest::Client::new();
    let infer = || async {
        let body = serde_json::json!({
            "inputs": [{"name": "logits", "datatype": "FP32", "shape": [3], "data": [0.1, 3.0, 1.0]}],
            "parameters": {"k": 1, "labels_file": "/labels/labels.txt"}
        });
        let resp = client
            .post(format!("{}/v2/models/topk/infer", server.url))
            .bearer_auth("alpha-key")
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<serde_json::Value>().await.unwrap_or_default())
    };
    let (status, answer) = infer().await;
    assert_eq!(status, 200, "{answer}");
    let labels = answer["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "labels").unwrap();
    assert_eq!(labels["data"][0], "dog", "the label file came with the bundle: {answer}");

    // A reload to the unsigned version is refused, saying why; version 1 keeps serving.
    std::fs::write(server.config_file(), gateway_config("2")).unwrap();
    let resp = client
        .post(format!("{}/v2/repository/models/topk/load", server.url))
        .bearer_auth("admin-key")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err = resp.text().await.unwrap();
    assert!(err.contains("no signature"), "{err}");
    assert_eq!(infer().await.0, 200, "still serving version 1");

    // Started on the unsigned version: refused, saying why.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("eir.toml"), gateway_config("2")).unwrap();
    let out = eir_with(
        &["serve", "--config", dir.path().join("eir.toml").to_str().unwrap(), "--listen", "127.0.0.1:0"],
        cache.path(),
        |c| {
            c.env("EIR_REGISTRY_USER", USER).env("EIR_REGISTRY_PASSWORD", PASSWORD);
        },
    );
    assert!(!out.status.success());
    assert!(text(&out).1.contains("no signature"), "{}", text(&out).1);
}

/// A registry outage at start: the gateway retries with backoff and serves the bundle once the
/// registry is back.
#[test]
fn a_registry_outage_is_retried_until_the_bundle_arrives() {
    use crate::gateway::{Server, hash};
    let mut registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("a/bundles");
    let config = write_config(&work.path().join("cfg"), "cat\ndog\n");
    build_and_push(&src, &config, &registry, &["demo:1"]);
    let target = format!("{}/eir/demo:1", registry.addr);
    let gateway = format!(
        "[bundles.demo]\nref = \"{target}\"\n[trust]\nmode = \"off\"\n\
         [tenants.alpha]\nkeys_sha256 = [\"{}\"]\nplugins = [\"topk\"]\n",
        hash("alpha-key")
    );
    registry.stop();
    let cache = tempfile::tempdir().unwrap();
    let cache_path = cache.path().to_path_buf();
    let started = Instant::now();
    let server = std::thread::spawn(move || {
        Server::start_with_env(
            &gateway,
            &cache_path,
            &[("EIR_REGISTRY_USER", USER), ("EIR_REGISTRY_PASSWORD", PASSWORD)],
        )
    });
    // Down through the first tries (0.5 s, 1 s), back before the last.
    std::thread::sleep(Duration::from_millis(2000));
    assert!(!server.is_finished(), "the gateway waits for the registry");
    registry.restart();
    let server = server.join().expect("the gateway started once the registry was back");
    eprintln!("bundle: served after a {:?} registry outage", started.elapsed());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/v2/models/topk/infer", server.url))
            .bearer_auth("alpha-key")
            .json(&serde_json::json!({"inputs": [{"name": "logits", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}]}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
}

/// The storage initializer (`eir bundle install`, as KServe runs it into `/mnt/models`):
/// refuses to install unverified or wrongly signed bundles, installs a signed one, and the
/// gateway serves it from the directory (`[bundles.NAME] dir`).
#[test]
fn the_storage_initializer_installs_only_signed_bundles_and_the_gateway_serves_them() {
    use crate::gateway::{Server, hash};
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("a/bundles");
    let config = write_config(&work.path().join("cfg"), "cat\ndog\nbird\n");
    build_and_push(&src, &config, &registry, &["demo:1"]);
    for k in ["ops", "mallory"] {
        assert!(bundle(&src, &["keygen", work.path().join(k).to_str().unwrap()], false).0);
    }
    let source = format!("eir://{}/eir/demo:1", registry.addr);
    let key = work.path().join("ops.key");
    let (ok, _, err) = bundle(&src, &["sign", &source[6..], "--key", key.to_str().unwrap()], false);
    assert!(ok, "{err}");

    let models = work.path().join("mnt/models");
    let install = |keys: Option<&str>| {
        let cache = work.path().join("init");
        let all = ["bundle", "install", &source, models.to_str().unwrap()];
        let out = eir_with(&all, &cache, |c| {
            c.env("EIR_REGISTRY_USER", USER).env("EIR_REGISTRY_PASSWORD", PASSWORD);
            if let Some(k) = keys {
                c.env("EIR_TRUST_KEYS", k);
            }
        });
        let (stdout, stderr) = text(&out);
        (out.status.success(), stdout, stderr)
    };
    let (ok, _, err) = install(None);
    assert!(!ok && err.contains("refusing to install"), "{err}");
    let (ok, _, err) = install(Some(work.path().join("mallory.pub").to_str().unwrap()));
    assert!(!ok && err.contains("does not match the key"), "{err}");
    assert!(!models.join("eir.toml").exists(), "nothing installed");
    let (ok, out, err) = install(Some(work.path().join("ops.pub").to_str().unwrap()));
    assert!(ok, "{err}");
    assert_eq!(PathBuf::from(out.trim()), models.join("eir.toml"));

    let gateway = format!(
        "[bundles.model]\ndir = \"{}\"\n[tenants.alpha]\nkeys_sha256 = [\"{}\"]\nplugins = [\"topk\"]\n",
        models.display(),
        hash("alpha-key")
    );
    let cache = tempfile::tempdir().unwrap();
    let server = Server::start_with(&gateway, cache.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer: serde_json::Value = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/v2/models/topk/infer", server.url))
            .bearer_auth("alpha-key")
            .json(&serde_json::json!({
                "inputs": [{"name": "logits", "datatype": "FP32", "shape": [3], "data": [0.1, 0.2, 3.0]}],
                "parameters": {"k": 1, "labels_file": "/labels/labels.txt"}
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let labels = answer["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "labels").unwrap();
    assert_eq!(labels["data"][0], "bird", "{answer}");

    // `eir run --config` runs a bundle's plugin by name too.
    let config_file = work.path().join("run.toml");
    std::fs::write(&config_file, format!("[bundles.model]\ndir = \"{}\"\n", models.display())).unwrap();
    let out = eir_with(
        &[
            "run",
            "--config",
            config_file.to_str().unwrap(),
            "topk",
            "--input",
            "logits:FP32[3]=0.1,0.2,3.0",
            "-p",
            "k=1",
        ],
        cache.path(),
        |_| {},
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("\"indices\""), "{stdout}");

    // The same bundle from the command line (`eir serve --bundle REF`), under the file's trust.
    let gateway = format!(
        "[trust]\nmode = \"enforce\"\nscopes = [{{ prefix = \"{}/eir\", keys = [\"{}\"] }}]\n\
         [tenants.alpha]\nkeys_sha256 = [\"{}\"]\nplugins = [\"topk\"]\n",
        registry.addr,
        work.path().join("ops.pub").display(),
        hash("alpha-key")
    );
    let env = [("EIR_REGISTRY_USER", USER), ("EIR_REGISTRY_PASSWORD", PASSWORD)];
    let cache = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(&gateway, cache.path(), &env, &["--bundle", &source[6..]]);
    let status = rt.block_on(async {
        let (code, meta) = crate::gateway::get(&server, "/v2/models/topk", Some("alpha-key")).await;
        assert_eq!(code, 200, "{meta}");
        code
    });
    assert_eq!(status, 200);
}

/// A TCP proxy to `target` that cuts its first connection once it has carried `cut_after`
/// bytes back to the client (a registry failing in the middle of a blob), then passes
/// everything through.
struct CuttingProxy {
    addr: String,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CuttingProxy {
    fn start(target: String, cut_after: usize) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cuts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let counted = cuts.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(&target) else { continue };
                let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                });
                let (armed, counted) = (armed.clone(), counted.clone());
                std::thread::spawn(move || {
                    let (mut s_read, mut c_write) = (server, client);
                    let mut buf = [0u8; 16384];
                    let mut carried = 0;
                    loop {
                        let n = match s_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        carried += n;
                        if carried > cut_after && armed.swap(false, Ordering::SeqCst) {
                            counted.fetch_add(1, Ordering::SeqCst);
                            let _ = c_write.shutdown(std::net::Shutdown::Both);
                            let _ = s_read.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CuttingProxy { addr, cuts }
    }
}

/// The registry fails in the middle of a blob: the install retries and completes, the store
/// keeps no partial blob, and what is checked out is whole.
#[test]
fn a_registry_failing_mid_blob_is_retried_and_nothing_is_half_applied() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("a/bundles");
    let config = write_config(&work.path().join("cfg"), "cat\ndog\n");
    let (ok, _, err) = bundle(&src, &["build", "--config", config.to_str().unwrap(), "--tag", "demo:1"], false);
    assert!(ok, "{err}");
    let (ok, _, err) = bundle(&src, &["push", "demo:1", &format!("{}/eir/demo:1", registry.addr)], false);
    assert!(ok, "{err}");
    // The model's layer is 2.3 MB of the 2.6: the cut after 1 MB falls inside a blob.
    let proxy = CuttingProxy::start(registry.addr.clone(), 1 << 20);
    let dest = work.path().join("mnt/models");
    let cache = work.path().join("init");
    let source = format!("{}/eir/demo:1", proxy.addr);
    let out = eir_with(&["bundle", "install", &source, dest.to_str().unwrap(), "--insecure-no-verify"], &cache, |c| {
        c.env("EIR_REGISTRY_USER", USER).env("EIR_REGISTRY_PASSWORD", PASSWORD).env("EIR_LOG", "warn");
    });
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(proxy.cuts.load(std::sync::atomic::Ordering::SeqCst), 1, "the connection was cut once");
    assert!(stderr.contains("registry unreachable; retrying"), "{stderr}");
    let model = dest.join("models/silero-vad/silero_vad.onnx");
    let original = crate::onnx::model_dir("silero-vad").join("silero_vad.onnx");
    assert_eq!(std::fs::read(model).unwrap(), std::fs::read(original).unwrap(), "whole, byte for byte");
    // No partial blob left behind in the store: no half-written file, every blob matches its name.
    let staging: Vec<_> =
        std::fs::read_dir(cache.join("bundles/blobs")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(staging, ["sha256"], "no half-written blob");
    let blobs = cache.join("bundles/blobs/sha256");
    for entry in std::fs::read_dir(&blobs).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)), name, "{}", path.display());
    }
}
