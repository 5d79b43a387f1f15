//! Shared helpers: locating guests and the binary, building runtimes and requests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use eir::Runtime;
use eir::engine::EngineConfig;
use eir::plugin::{Plugin, PluginConfig};
use eir::tensor::{Request, Tensor, TensorData};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ has a parent").to_path_buf()
}

/// A guest component built by `scripts/build.sh`: shipped plugins are in `plugins/dist`,
/// test guests in `tests/plugins/dist`.
pub fn guest(name: &str) -> PathBuf {
    let file = format!("{}.wasm", name.replace('-', "_"));
    for dir in ["plugins/dist", "tests/plugins/dist"] {
        let path = repo().join(dir).join(&file);
        if path.exists() {
            return path;
        }
    }
    panic!("guest component `{file}` is missing: build the guests first with `scripts/build.sh`");
}

/// A runtime with its own throw-away compile cache.
pub fn runtime() -> (Runtime, tempfile::TempDir) {
    let cache = tempfile::tempdir().expect("temp dir");
    let config = EngineConfig { cache_dir: Some(cache.path().to_path_buf()), ..EngineConfig::default() };
    (Runtime::new(config).expect("runtime"), cache)
}

/// The Python the tests run helpers with (`$EIR_TEST_PYTHON`, else `models/.venv`, which
/// scripts/test.sh fills with tritonclient, onnx and numpy).
pub fn test_python() -> PathBuf {
    std::env::var_os("EIR_TEST_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join("models/.venv/bin/python"))
}

/// Loads guest `name` with `config`.
pub fn load(runtime: &Runtime, name: &str, config: PluginConfig) -> Plugin {
    runtime.load_plugin(name, &guest(name), config, false).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// A request with the given parameters and inputs.
pub fn request(params: &[(&str, &str)], inputs: Vec<Tensor>) -> Request {
    Request {
        id: String::new(),
        inputs,
        outputs: vec![],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

/// A one-dimensional BYTES tensor of strings.
pub fn texts(name: &str, values: &[&str]) -> Tensor {
    Tensor {
        name: name.into(),
        shape: vec![values.len() as u64],
        data: TensorData::Bytes(values.iter().map(|v| v.as_bytes().to_vec()).collect()),
    }
}

/// The strings of a BYTES tensor.
pub fn strings(t: &Tensor) -> Vec<String> {
    match &t.data {
        TensorData::Bytes(v) => v.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect(),
        other => panic!("expected BYTES, got {:?}", other.datatype()),
    }
}

/// Runs the `eir` binary with a private cache directory.
pub fn eir(args: &[&str], cache: &Path) -> Output {
    eir_with(args, cache, |_| {})
}

/// Runs the `eir` binary, letting `setup` adjust the command (env, stdin).
pub fn eir_with(args: &[&str], cache: &Path, setup: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_eir"));
    cmd.args(args).env("EIR_CACHE_DIR", cache).env_remove("EIR_LOG").env_remove("RUST_LOG");
    setup(&mut cmd);
    cmd.output().expect("running eir")
}

/// stdout and stderr as text.
pub fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}
