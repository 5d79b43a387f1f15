//! Fetching pinned model packages: `pip download` of each wheel (no install, no
//! dependencies), SHA-256 of every wheel and of every file unpacked from it, and, where a
//! model needs one, a conversion step run in a private venv with pinned packages (its output
//! is pinned too). Nothing is fetched at run time; this is a set-up step (`eir models fetch`,
//! run by the build scripts and CI).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const CATALOG: &str = include_str!("catalog.toml");

/// Conversion scripts the catalog may name, compiled in so `eir` needs no checkout.
const SCRIPTS: &[(&str, &str)] =
    &[("effnet_lite0_to_onnx.py", include_str!("../../../scripts/models/effnet_lite0_to_onnx.py"))];

/// One pinned model (or asset set).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    /// What it is.
    pub description: String,
    /// The wheels its files come from.
    pub sources: Vec<Source>,
    /// A conversion run after unpacking, if the shipped format is not one EIR reads.
    #[serde(default)]
    pub convert: Option<Convert>,
}

/// One pinned wheel and the files taken from it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The PyPI package.
    pub package: String,
    /// Its pinned version.
    pub version: String,
    /// Extra `pip download` arguments (platform pins for platform wheels).
    #[serde(default)]
    pub pip_args: Vec<String>,
    /// SHA-256 of the wheel.
    pub wheel_sha256: String,
    /// Folder inside the wheel that holds the files.
    pub prefix: String,
    /// Files to unpack (relative to `prefix`) and their SHA-256.
    pub files: BTreeMap<String, String>,
}

/// A conversion step: `python SCRIPT ARGS...` in the model's directory.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Convert {
    /// One of the compiled-in scripts.
    pub script: String,
    /// Pinned pip requirements of the script.
    pub requirements: Vec<String>,
    /// Its arguments (file names in the model directory).
    pub args: Vec<String>,
    /// The file it writes.
    pub output: String,
    /// SHA-256 of that file.
    pub sha256: String,
}

impl Package {
    /// Every file the model directory must hold, with its hash.
    pub fn files(&self) -> BTreeMap<&str, &str> {
        let mut all: BTreeMap<&str, &str> =
            self.sources.iter().flat_map(|s| s.files.iter().map(|(f, h)| (f.as_str(), h.as_str()))).collect();
        if let Some(c) = &self.convert {
            all.insert(&c.output, &c.sha256);
        }
        all
    }
}

/// The catalog of pinned packages, by model name.
pub fn catalog() -> BTreeMap<String, Package> {
    // The catalog is compiled in and covered by a unit test; a parse failure is a build bug.
    toml::from_str(CATALOG).unwrap_or_default()
}

/// `$EIR_MODELS_DIR`, else `./models`.
pub fn default_models_dir() -> PathBuf {
    std::env::var_os("EIR_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("models"))
}

/// The SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Whether `dir` holds every file of `pkg` with the pinned hash; the first mismatch otherwise.
pub fn verify(pkg: &Package, dir: &Path) -> Result<(), String> {
    for (file, want) in pkg.files() {
        let path = dir.join(file);
        match sha256_file(&path) {
            Ok(got) if got == want => {}
            Ok(got) => return Err(format!("{} has SHA-256 {got}, expected {want}", path.display())),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(())
}

fn python() -> String {
    std::env::var("EIR_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {what} (set EIR_PYTHON to another interpreter)"))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

/// Downloads and checks one wheel into `work`, then unpacks its files into `into`.
fn fetch_source(src: &Source, work: &Path, into: &Path) -> anyhow::Result<()> {
    let spec = format!("{}=={}", src.package, src.version);
    let dl = work.join(format!("{}-{}", src.package, src.version));
    std::fs::create_dir_all(&dl)?;
    tracing::info!(package = %spec, "downloading with pip");
    run(
        Command::new(python())
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d"])
            .arg(&dl)
            .args(&src.pip_args)
            .arg(&spec),
        &format!("pip download {spec}"),
    )?;
    let wheel = std::fs::read_dir(&dl)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip left no wheel for {spec}"))?;
    let got = sha256_file(&wheel)?;
    ensure!(got == src.wheel_sha256, "{} has SHA-256 {got}, expected {}", wheel.display(), src.wheel_sha256);
    let mut zip = zip::ZipArchive::new(File::open(&wheel)?).context("the wheel is not a zip file")?;
    for (file, want) in &src.files {
        let entry_name = format!("{}{file}", src.prefix);
        let mut entry = zip.by_name(&entry_name).with_context(|| format!("{entry_name} is not in {spec}"))?;
        let out = into.join(file);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        io::copy(&mut (&mut entry as &mut dyn Read), &mut File::create(&out)?)?;
        let got = sha256_file(&out)?;
        ensure!(&got == want, "{file} from {spec} has SHA-256 {got}, expected {want}");
    }
    tracing::info!(package = %spec, files = src.files.len(), "verified and unpacked");
    Ok(())
}

/// Runs a conversion step in a venv (under `models_dir/.venv`) with its pinned requirements.
fn convert(step: &Convert, models_dir: &Path, dir: &Path) -> anyhow::Result<()> {
    let script = SCRIPTS
        .iter()
        .find(|(name, _)| *name == step.script)
        .map(|(_, text)| *text)
        .with_context(|| format!("unknown conversion script {}", step.script))?;
    let venv = models_dir.join(".venv");
    let py = venv.join("bin").join("python");
    if !py.exists() {
        tracing::info!(venv = %venv.display(), "creating a Python venv for model conversion");
        run(Command::new(python()).args(["-m", "venv"]).arg(&venv), "python -m venv")?;
    }
    tracing::info!(requirements = ?step.requirements, "installing conversion requirements");
    run(
        Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .args(&step.requirements),
        "pip install (conversion requirements)",
    )?;
    let script_path = dir.join(format!(".{}", step.script));
    std::fs::write(&script_path, script)?;
    tracing::info!(script = %step.script, "converting");
    let result = run(Command::new(&py).arg(&script_path).args(&step.args).current_dir(dir), &step.script);
    let _ = std::fs::remove_file(&script_path);
    result?;
    let got = sha256_file(&dir.join(&step.output))?;
    ensure!(
        got == step.sha256,
        "{} from {} has SHA-256 {got}, expected {} (are the pinned requirements installed?)",
        step.output,
        step.script,
        step.sha256
    );
    Ok(())
}

/// Makes `models_dir/name` hold the verified files of model `name`, downloading only when
/// they are missing or wrong. Returns the model's directory.
pub fn fetch(name: &str, models_dir: &Path) -> anyhow::Result<PathBuf> {
    let catalog = catalog();
    let Some(pkg) = catalog.get(name) else {
        bail!("no model `{name}` in the catalog (known: {})", catalog.keys().cloned().collect::<Vec<_>>().join(", "));
    };
    let dest = models_dir.join(name);
    if verify(pkg, &dest).is_ok() {
        tracing::info!(model = name, dir = %dest.display(), "already present and verified");
        return Ok(dest);
    }
    std::fs::create_dir_all(models_dir).with_context(|| format!("creating {}", models_dir.display()))?;
    // Absolute, because the conversion step runs in the model's own directory.
    let models_dir = &std::path::absolute(models_dir)?;
    let work = tempfile::tempdir_in(models_dir).context("creating a work directory")?;
    let unpacked = work.path().join(name);
    std::fs::create_dir_all(&unpacked)?;
    for src in &pkg.sources {
        fetch_source(src, work.path(), &unpacked)?;
    }
    if let Some(step) = &pkg.convert {
        convert(step, models_dir, &unpacked)?;
    }
    verify(pkg, &unpacked).map_err(anyhow::Error::msg).context("a file does not match its pinned hash")?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest).with_context(|| format!("replacing {}", dest.display()))?;
    }
    std::fs::rename(&unpacked, &dest).with_context(|| format!("moving the model into {}", dest.display()))?;
    tracing::info!(model = name, dir = %dest.display(), "fetched and verified");
    Ok(dest)
}

/// Where model `name` is, or an error that says how to get it.
pub fn locate(name: &str, models_dir: &Path) -> anyhow::Result<PathBuf> {
    let catalog = catalog();
    let pkg = catalog.get(name).with_context(|| format!("no model `{name}` in the catalog"))?;
    let dir = models_dir.join(name);
    verify(pkg, &dir).map_err(|why| {
        anyhow::anyhow!(
            "model `{name}` is not available in {}: {why}\nget it with: eir models fetch {name} --dir {}",
            models_dir.display(),
            models_dir.display()
        )
    })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_parses_and_pins_everything() {
        let parsed: BTreeMap<String, Package> = toml::from_str(CATALOG).expect("catalog.toml parses");
        for name in ["minilm", "silero-vad", "efficientnet-lite0", "test-photos", "smollm2"] {
            assert!(parsed.contains_key(name), "{name}");
        }
        for (name, pkg) in &parsed {
            assert!(!pkg.sources.is_empty(), "{name}");
            for s in &pkg.sources {
                assert_eq!(s.wheel_sha256.len(), 64, "{name}");
            }
            assert!(pkg.files().values().all(|h| h.len() == 64), "{name}");
            if let Some(c) = &pkg.convert {
                assert!(SCRIPTS.iter().any(|(n, _)| *n == c.script), "{name}: script {} is not compiled in", c.script);
                assert!(c.requirements.iter().all(|r| r.contains("==")), "{name}: requirements must be pinned");
            }
        }
    }

    #[test]
    fn a_missing_model_says_how_to_fetch_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = locate("minilm", dir.path()).unwrap_err().to_string();
        assert!(err.contains("eir models fetch minilm"), "{err}");
    }
}
