//! The `eir` command as a user meets it.

use serde_json::Value;

use crate::common::{eir, eir_with, guest, text};

fn path(name: &str) -> String {
    guest(name).display().to_string()
}

#[test]
fn run_prints_a_pipeline_response_as_kserve_json() {
    let cache = tempfile::tempdir().unwrap();
    let out = eir(&["run", &path("text-normalize"), "--input", "text=  HeLLo  ", "--input", "text=ﬁx"], cache.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["model_name"], "text_normalize");
    assert_eq!(json["outputs"][0]["name"], "text");
    assert_eq!(json["outputs"][0]["datatype"], "BYTES");
    assert_eq!(json["outputs"][0]["shape"], serde_json::json!([2]));
    assert_eq!(json["outputs"][0]["data"], serde_json::json!(["hello", "fix"]));
}

#[test]
fn run_accepts_a_kserve_request_file_and_typed_inputs() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("req.json");
    std::fs::write(
        &req,
        r#"{"id":"r1","inputs":[{"name":"logits","datatype":"FP32","shape":[1,3],"data":[[1,3,2]]}],"parameters":{"k":2}}"#,
    )
    .unwrap();
    let out = eir(&["run", &path("topk"), "--request", req.to_str().unwrap(), "--output", "indices"], cache.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["id"], "r1");
    assert_eq!(json["outputs"].as_array().unwrap().len(), 1, "only the requested output");
    assert_eq!(json["outputs"][0]["data"], serde_json::json!([1, 2]));

    let out = eir(&["run", &path("topk"), "--input", "logits:FP32[2]=0,5", "-p", "k=1"], cache.path());
    let json: Value = serde_json::from_str(&text(&out).0).unwrap();
    assert_eq!(json["outputs"][1]["data"], serde_json::json!([1]));
}

#[test]
fn commands_get_args_env_dirs_stdio_and_exit_codes() {
    let cache = tempfile::tempdir().unwrap();
    let cmd = path("probe-cmd");
    let out = eir(&["run", &cmd, "args", "one", "--two"], cache.path());
    assert!(out.status.success());
    assert_eq!(text(&out).0, "one --two\n");

    let out = eir(&["run", &cmd, "exit", "7"], cache.path());
    assert_eq!(out.status.code(), Some(7));

    let out = eir(&["run", "--env", "GREETING=hi", &cmd, "env", "GREETING"], cache.path());
    assert_eq!(text(&out).0, "hi\n");
    let out = eir(&["run", &cmd, "env", "HOME"], cache.path());
    assert_eq!(out.status.code(), Some(4), "HOME is not granted");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.txt"), "file body").unwrap();
    let grant = format!("{}::/data", dir.path().display());
    let out = eir(&["run", "--dir", &grant, &cmd, "cat", "/data/f.txt"], cache.path());
    assert_eq!(text(&out).0, "file body");
    let out = eir(&["run", &cmd, "cat", "/data/f.txt"], cache.path());
    assert_eq!(out.status.code(), Some(5), "no grant, no file");

    let out = eir_with(&["run", &cmd, "stdin"], cache.path(), |c| {
        c.stdin(std::process::Stdio::piped());
    });
    assert!(out.status.success());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_eir"))
        .args(["run", &cmd, "stdin"])
        .env("EIR_CACHE_DIR", cache.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"shout").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SHOUT");
}

#[test]
fn limit_violations_exit_non_zero_and_name_the_limit() {
    let cache = tempfile::tempdir().unwrap();
    let hostile = path("hostile");
    let cases: [(&[&str], &str); 5] = [
        (&["-p", "attack=loop", "--fuel", "5000000"], "out of fuel"),
        (&["-p", "attack=loop", "--fuel", "100000000000000", "--timeout", "200ms"], "deadline"),
        (&["-p", "attack=memory", "--max-memory", "32MiB"], "memory limit"),
        (&["-p", "attack=recursion"], "stack"),
        (&["-p", "attack=panic"], "panics on purpose"),
    ];
    for (flags, words) in cases {
        let mut args = vec!["run", hostile.as_str()];
        args.extend_from_slice(flags);
        let out = eir(&args, cache.path());
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {stderr}");
        assert!(stderr.contains(words), "{flags:?} should say {words:?}: {stderr}");
    }
    let out = eir(&["run", "--timeout", "200ms", &path("probe-cmd"), "loop"], cache.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("deadline"), "{}", text(&out).1);
}

#[test]
fn inspect_tells_pipelines_from_commands() {
    let cache = tempfile::tempdir().unwrap();
    let out = eir(&["inspect", "--json", &path("topk")], cache.path());
    let json: Value = serde_json::from_str(&text(&out).0).unwrap();
    assert_eq!(json["kind"], "pipeline");
    assert!(
        json["exports"].as_array().unwrap().iter().any(|e| e.as_str().unwrap().starts_with("eir:plugin/handler@0.1"))
    );
    assert_eq!(json["metadata"]["inputs"][0]["name"], "logits");

    let out = eir(&["inspect", &path("probe-cmd")], cache.path());
    let (stdout, _) = text(&out);
    assert!(stdout.contains(": command,"), "{stdout}");
    assert!(stdout.contains("wasi:cli/run@0.2"), "{stdout}");
}

#[test]
fn the_second_start_skips_compilation_and_artifacts_need_consent() {
    let cache = tempfile::tempdir().unwrap();
    let normalize = path("text-normalize");
    let args = ["run", normalize.as_str(), "--input", "text=x"];
    let first = eir(&args, cache.path());
    assert!(text(&first).1.contains("compiling"), "first start compiles: {}", text(&first).1);
    let second = eir(&args, cache.path());
    assert!(second.status.success());
    assert!(!text(&second).1.contains("compiling"), "second start must hit the cache: {}", text(&second).1);
    assert_eq!(text(&first).0, text(&second).0);

    let out_dir = tempfile::tempdir().unwrap();
    let artifact = out_dir.path().join("n.cwasm");
    let out = eir(&["compile", &normalize, "-o", artifact.to_str().unwrap()], cache.path());
    assert!(out.status.success(), "{}", text(&out).1);
    let out = eir(&["run", artifact.to_str().unwrap(), "--input", "text=Y"], cache.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("--allow-precompiled"), "{}", text(&out).1);
    let out = eir(&["run", "--allow-precompiled", artifact.to_str().unwrap(), "--input", "text=Y"], cache.path());
    assert!(text(&out).0.contains("\"y\""), "{}", text(&out).1);
}

#[test]
fn bad_files_get_clear_errors() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("junk.wasm", "not WebAssembly at all".as_bytes().to_vec(), "is not WebAssembly"),
        ("core.wat", b"(module)".to_vec(), "`_start` for a core module"),
        ("empty.wat", b"(component)".to_vec(), "neither a pipeline plugin"),
        (
            "missing.wat",
            b"(component (import \"acme:widgets/spin@1.0.0\" (instance (export \"go\" (func)))) \
              (import \"wasi:cli/run@0.2.0\" (instance)) (export \"wasi:cli/run@0.2.0\" (instance 1)))"
                .to_vec(),
            "acme:widgets/spin",
        ),
    ];
    for (file, bytes, words) in cases {
        let p = dir.path().join(file);
        std::fs::write(&p, bytes).unwrap();
        let out = eir(&["run", p.to_str().unwrap()], cache.path());
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(stderr.contains(words), "{file} should say {words:?}: {stderr}");
    }
}

#[test]
fn the_shipped_config_runs_a_plugin_by_name() {
    crate::embed::minilm_dir();
    let cache = tempfile::tempdir().unwrap();
    let config = crate::common::repo().join("plugins/eir.toml");
    let out =
        eir(&["run", "--config", config.to_str().unwrap(), "text-embed", "--input", "text=Hello world"], cache.path());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["model_name"], "text-embed");
    assert_eq!(json["outputs"][0]["shape"], serde_json::json!([1, 384]));
}

#[test]
fn a_bad_config_names_its_file_and_line() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[plugins.x]\npath = \"x.wasm\"\nlimits = { fuel = \"lots\" }\n").unwrap();
    let out = eir(&["run", "--config", config.to_str().unwrap(), "x"], cache.path());
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains(&format!("{}:3:", config.display())), "{stderr}");
}
