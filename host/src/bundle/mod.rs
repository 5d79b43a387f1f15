//! EIR bundles: plugins and models packaged once as one OCI artifact, shipped through any
//! OCI registry, and checked out on each host.
//!
//! A bundle is an OCI image manifest with `artifactType` [`ARTIFACT_TYPE`]:
//! - its config ([`CONFIG_MEDIA_TYPE`]) is a [`BundleConfig`]: name, version, the minimum EIR
//!   version, the plugins (with their WIT world and the models they use) and the models (with
//!   family and files);
//! - one layer per plugin component (`application/wasm`), one per model file (uncompressed,
//!   ModelPack's media types, the file's path in the `org.cncf.model.filepath` annotation, so
//!   an update that changes one model moves one layer), one per data file of a directory a
//!   plugin is granted, and one layer holding the configuration fragment: only `[models.*]` and
//!   `[plugins.*]`, with paths inside the bundle. A bundle can never change `[server]` or
//!   `[tenants]`, grant a directory outside itself, or grant one writable.
//!
//! No precompiled code: hosts compile components themselves and cache them by digest.

pub mod registry;
pub mod serve;
pub mod sign;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use store::{Digest, Store};

/// The manifest's `artifactType`.
pub const ARTIFACT_TYPE: &str = "application/vnd.eir.bundle.v1";
/// The media type of the manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The config blob's media type.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.eir.bundle.config.v1+json";
/// A plugin component.
pub const WASM_MEDIA_TYPE: &str = "application/wasm";
/// A model's weights (ModelPack).
pub const WEIGHT_MEDIA_TYPE: &str = "application/vnd.cncf.model.weight.v1.raw";
/// A model's configuration or tokenizer file (ModelPack).
pub const WEIGHT_CONFIG_MEDIA_TYPE: &str = "application/vnd.cncf.model.weight.config.v1.raw";
/// A file of a directory granted to a plugin.
pub const FILE_MEDIA_TYPE: &str = "application/vnd.eir.bundle.file.v1";
/// The configuration fragment.
pub const FRAGMENT_MEDIA_TYPE: &str = "application/vnd.eir.config.fragment.v1+toml";
/// Where a layer's file goes in the checked-out bundle (ModelPack's annotation).
pub const PATH_ANNOTATION: &str = "org.cncf.model.filepath";

/// Most bytes of a manifest, config or fragment read from a store or registry.
pub const MAX_METADATA: u64 = 4 << 20;
/// Most layers a bundle may have.
pub const MAX_LAYERS: usize = 4096;

/// Why a bundle operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle or a part of it is malformed, or breaks a bundle rule.
    #[error("invalid bundle: {0}")]
    Invalid(String),
    /// A blob does not match its digest or declared size.
    #[error("digest mismatch: {0}")]
    Digest(String),
    /// Something named is not in the store.
    #[error("not found: {0}")]
    Missing(String),
    /// Reading or writing local files failed.
    #[error("i/o: {0}")]
    Io(String),
    /// The registry refused or failed.
    #[error("registry: {0}")]
    Registry(String),
    /// A signature is missing, malformed, or not by a trusted key.
    #[error("signature: {0}")]
    Signature(String),
}

/// The bundle's config blob.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleConfig {
    /// The bundle's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The oldest EIR that can serve it.
    pub min_eir_version: String,
    /// Its plugins.
    pub plugins: Vec<PluginEntry>,
    /// Its models.
    pub models: Vec<ModelEntry>,
}

/// A plugin in a bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// Its name in the configuration.
    pub name: String,
    /// The WIT world it targets (`eir:plugin/pipeline@0.1.0`, `wasi:cli/command`, or `core
    /// module`).
    pub world: String,
    /// The models it is granted.
    pub models: Vec<String>,
    /// Its component's path in the bundle.
    pub path: String,
}

/// A model in a bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Its name in the configuration.
    pub name: String,
    /// Its family, as the configuration declares it.
    pub family: Option<String>,
    /// Its files' paths in the bundle.
    pub files: Vec<String>,
}

/// A layer of a built or pulled bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What it holds.
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its annotations (the file path).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A bundle's manifest, as EIR writes and reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// 2.
    pub schema_version: u32,
    /// [`MANIFEST_MEDIA_TYPE`].
    pub media_type: String,
    /// [`ARTIFACT_TYPE`].
    pub artifact_type: String,
    /// The [`BundleConfig`] blob.
    pub config: Descriptor,
    /// The files.
    pub layers: Vec<Descriptor>,
    /// Name and version (`org.opencontainers.image.title`, `.version`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    /// Parses and checks a manifest: EIR's artifact type, well-formed digests, a bounded
    /// number of layers, and safe file paths.
    pub fn parse(bytes: &[u8]) -> Result<Self, BundleError> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| BundleError::Invalid(format!("manifest: {e}")))?;
        if m.artifact_type != ARTIFACT_TYPE || m.config.media_type != CONFIG_MEDIA_TYPE {
            return Err(BundleError::Invalid(format!(
                "not an EIR bundle (artifactType `{}`, config `{}`)",
                m.artifact_type, m.config.media_type
            )));
        }
        if m.layers.len() > MAX_LAYERS {
            return Err(BundleError::Invalid(format!("{} layers (at most {MAX_LAYERS})", m.layers.len())));
        }
        Digest::parse(&m.config.digest)?;
        let mut paths = std::collections::BTreeSet::new();
        for l in &m.layers {
            Digest::parse(&l.digest)?;
            let path = l.path()?;
            if !paths.insert(path.to_string()) {
                return Err(BundleError::Invalid(format!("two layers for `{path}`")));
            }
        }
        Ok(m)
    }

    /// The fragment's layer.
    pub fn fragment(&self) -> Result<&Descriptor, BundleError> {
        let mut it = self.layers.iter().filter(|l| l.media_type == FRAGMENT_MEDIA_TYPE);
        match (it.next(), it.next()) {
            (Some(l), None) => Ok(l),
            _ => Err(BundleError::Invalid("a bundle has exactly one configuration fragment".into())),
        }
    }
}

impl Descriptor {
    /// The layer's path in the checked-out bundle: relative, no `..`, no hidden tricks.
    pub fn path(&self) -> Result<&str, BundleError> {
        let p = self
            .annotations
            .get(PATH_ANNOTATION)
            .ok_or_else(|| BundleError::Invalid(format!("layer {} has no {PATH_ANNOTATION}", self.digest)))?;
        safe_relative(p)?;
        Ok(p)
    }
}

/// Checks that `p` is a plain relative path (normal components only).
fn safe_relative(p: &str) -> Result<(), BundleError> {
    let path = Path::new(p);
    let ok = !p.is_empty()
        && !p.contains('\\')
        && path.components().all(|c| matches!(c, Component::Normal(s) if !s.to_string_lossy().contains(':')));
    if ok { Ok(()) } else { Err(BundleError::Invalid(format!("unsafe path `{p}` in a bundle"))) }
}

/// What `eir bundle build` packages.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The configuration whose `[models]` and `[plugins]` go in.
    pub config: PathBuf,
    /// The bundle's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Only these plugins (and the models they are granted); empty: all.
    pub plugins: Vec<String>,
    /// Only these models as well (e.g. a model-only bundle); empty with `plugins` empty: all.
    pub models: Vec<String>,
}

/// A bundle in a store.
#[derive(Clone, Debug)]
pub struct Built {
    /// Its manifest's digest.
    pub digest: Digest,
    /// Its manifest's size.
    pub size: u64,
    /// The manifest.
    pub manifest: Manifest,
    /// Its config.
    pub config: BundleConfig,
}

fn layer(media_type: &str, digest: Digest, size: u64, path: &str) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: digest.to_string(),
        size,
        annotations: BTreeMap::from([(PATH_ANNOTATION.to_string(), path.to_string())]),
    }
}

/// Every regular file under `dir`, relative, sorted (symbolic links are refused).
fn files_under(dir: &Path) -> Result<Vec<PathBuf>, BundleError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries =
            std::fs::read_dir(dir.join(&rel)).map_err(|e| BundleError::Io(format!("{}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(|e| BundleError::Io(e.to_string()))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let ty = entry.file_type().map_err(|e| BundleError::Io(e.to_string()))?;
            let path = rel.join(&name);
            if ty.is_dir() {
                stack.push(path);
            } else if ty.is_file() {
                out.push(path);
            } else {
                return Err(BundleError::Invalid(format!("{} is not a regular file", dir.join(path).display())));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn media_type_of(file: &Path) -> &'static str {
    match file.extension().and_then(|e| e.to_str()) {
        Some("gguf" | "onnx" | "safetensors" | "bin" | "pt" | "data") => WEIGHT_MEDIA_TYPE,
        _ => WEIGHT_CONFIG_MEDIA_TYPE,
    }
}

/// The WIT world a component targets, from its exports.
fn world_of(bytes: &[u8]) -> String {
    if !wasmparser::Parser::is_component(bytes) {
        return "core module".into();
    }
    let mut exports = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        if let Ok(wasmparser::Payload::ComponentExportSection(section)) = payload {
            exports.extend(section.into_iter().flatten().map(|e| e.name.name.to_string()));
        }
    }
    if exports.iter().any(|e| e.starts_with("eir:plugin/handler")) {
        "eir:plugin/pipeline@0.1.0".into()
    } else if exports.iter().any(|e| e.starts_with("wasi:cli/run")) {
        "wasi:cli/command".into()
    } else {
        "unknown".into()
    }
}

/// Packages the selected `[models]` and `[plugins]` of a configuration into `store`, tagged
/// `NAME:VERSION`.
pub fn build(store: &Store, opts: &BuildOptions) -> Result<Built, BundleError> {
    let config = crate::config::Config::load(&opts.config).map_err(|e| BundleError::Invalid(e.to_string()))?;
    let text = std::fs::read_to_string(&opts.config).map_err(|e| BundleError::Io(e.to_string()))?;
    let raw: toml::Table = toml::from_str(&text).map_err(|e| BundleError::Invalid(e.to_string()))?;
    let base = opts.config.parent().unwrap_or(Path::new(".")).to_path_buf();
    let section = |name: &str| raw.get(name).and_then(|v| v.as_table()).cloned().unwrap_or_default();
    let (raw_models, raw_plugins) = (section("models"), section("plugins"));

    let everything = opts.plugins.is_empty() && opts.models.is_empty();
    let mut plugins: Vec<&String> = config.plugins.keys().filter(|p| everything || opts.plugins.contains(p)).collect();
    for p in &opts.plugins {
        if !config.plugins.contains_key(p) {
            return Err(BundleError::Missing(format!("plugin `{p}` is not in {}", opts.config.display())));
        }
    }
    plugins.sort();
    let mut models: std::collections::BTreeSet<String> =
        config.models.keys().filter(|m| everything || opts.models.contains(m)).cloned().collect();
    for p in &plugins {
        for m in &config.plugins[*p].config.grants.nn.models {
            if m == "*" {
                models.extend(config.models.keys().cloned());
            } else {
                models.insert(m.clone());
            }
        }
    }
    for m in &opts.models {
        if !config.models.contains_key(m) {
            return Err(BundleError::Missing(format!("model `{m}` is not in {}", opts.config.display())));
        }
    }

    let mut layers = Vec::new();
    let mut fragment_models = toml::Table::new();
    let mut model_entries = Vec::new();
    for name in &models {
        let decl = &config.models[name];
        let mut table = raw_models.get(name).and_then(|v| v.as_table()).cloned().unwrap_or_default();
        let mut files = Vec::new();
        if decl.path.is_dir() {
            for rel in files_under(&decl.path)? {
                let path = format!("models/{name}/{}", rel.display());
                tracing::info!(bundle = %opts.name, file = %path, "adding");
                let (digest, size) = store.put_file(&decl.path.join(&rel))?;
                layers.push(layer(media_type_of(&rel), digest, size, &path));
                files.push(path);
            }
            table.insert("path".into(), toml::Value::String(format!("models/{name}")));
        } else {
            let file = decl.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let path = format!("models/{name}/{file}");
            tracing::info!(bundle = %opts.name, file = %path, "adding");
            let (digest, size) = store.put_file(&decl.path)?;
            layers.push(layer(media_type_of(&decl.path), digest, size, &path));
            table.insert("path".into(), toml::Value::String(path.clone()));
            files.push(path);
        }
        fragment_models.insert(name.clone(), toml::Value::Table(table));
        model_entries.push(ModelEntry { name: name.clone(), family: decl.family.clone(), files });
    }

    let mut fragment_plugins = toml::Table::new();
    let mut plugin_entries = Vec::new();
    for name in plugins {
        let decl = &config.plugins[name];
        let mut table = raw_plugins.get(name).and_then(|v| v.as_table()).cloned().unwrap_or_default();
        let bytes = std::fs::read(&decl.path).map_err(|e| BundleError::Io(format!("{}: {e}", decl.path.display())))?;
        let path = format!("plugins/{name}.wasm");
        tracing::info!(bundle = %opts.name, file = %path, "adding");
        let digest = store.put_bytes(&bytes)?;
        layers.push(layer(WASM_MEDIA_TYPE, digest, bytes.len() as u64, &path));
        table.insert("path".into(), toml::Value::String(path.clone()));
        table.remove("optional");
        // Granted directories travel as the bundle's own read-only files.
        let mut dirs = Vec::new();
        for (i, grant) in decl.config.grants.dirs.iter().enumerate() {
            if grant.writable {
                return Err(BundleError::Invalid(format!(
                    "plugin `{name}`: a bundle's directories are read-only, `{}` is writable",
                    grant.guest
                )));
            }
            if !grant.host.starts_with(&base) {
                return Err(BundleError::Invalid(format!(
                    "plugin `{name}`: {} is outside the configuration's directory; a bundle carries only its own files",
                    grant.host.display()
                )));
            }
            let root = format!("files/{name}/{i}");
            for rel in files_under(&grant.host)? {
                let file = format!("{root}/{}", rel.display());
                let (digest, size) = store.put_file(&grant.host.join(&rel))?;
                layers.push(layer(FILE_MEDIA_TYPE, digest, size, &file));
            }
            dirs.push(toml::Value::String(format!("{root}::{}:ro", grant.guest)));
        }
        if !dirs.is_empty() {
            table.insert("dirs".into(), toml::Value::Array(dirs));
        }
        fragment_plugins.insert(name.clone(), toml::Value::Table(table));
        plugin_entries.push(PluginEntry {
            name: name.clone(),
            world: world_of(&bytes),
            models: decl.config.grants.nn.models.clone(),
            path,
        });
    }

    let mut fragment = toml::Table::new();
    fragment.insert("models".into(), toml::Value::Table(fragment_models));
    fragment.insert("plugins".into(), toml::Value::Table(fragment_plugins));
    let fragment = toml::to_string(&fragment).map_err(|e| BundleError::Invalid(e.to_string()))?;
    let digest = store.put_bytes(fragment.as_bytes())?;
    layers.push(layer(FRAGMENT_MEDIA_TYPE, digest, fragment.len() as u64, "eir.toml"));

    let bundle = BundleConfig {
        name: opts.name.clone(),
        version: opts.version.clone(),
        min_eir_version: env!("CARGO_PKG_VERSION").into(),
        plugins: plugin_entries,
        models: model_entries,
    };
    let config_bytes = serde_json::to_vec(&bundle).map_err(|e| BundleError::Invalid(e.to_string()))?;
    let config_digest = store.put_bytes(&config_bytes)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE.into(),
        artifact_type: ARTIFACT_TYPE.into(),
        config: Descriptor {
            media_type: CONFIG_MEDIA_TYPE.into(),
            digest: config_digest.to_string(),
            size: config_bytes.len() as u64,
            annotations: BTreeMap::new(),
        },
        layers,
        annotations: BTreeMap::from([
            ("org.opencontainers.image.title".to_string(), opts.name.clone()),
            ("org.opencontainers.image.version".to_string(), opts.version.clone()),
        ]),
    };
    let bytes = serde_json::to_vec(&manifest).map_err(|e| BundleError::Invalid(e.to_string()))?;
    let digest = store.put_bytes(&bytes)?;
    store.tag(&format!("{}:{}", opts.name, opts.version), &digest, bytes.len() as u64)?;
    Ok(Built { digest, size: bytes.len() as u64, manifest, config: bundle })
}

/// Reads bundle `name` (a tag or digest) from `store`, verifying what it reads.
pub fn open(store: &Store, name: &str) -> Result<Built, BundleError> {
    let digest = store.resolve(name)?;
    let bytes = store.read(&digest, MAX_METADATA)?;
    let manifest = Manifest::parse(&bytes)?;
    let config_bytes = store.read(&Digest::parse(&manifest.config.digest)?, MAX_METADATA)?;
    let config: BundleConfig =
        serde_json::from_slice(&config_bytes).map_err(|e| BundleError::Invalid(format!("config: {e}")))?;
    if newer(&config.min_eir_version, env!("CARGO_PKG_VERSION")) {
        return Err(BundleError::Invalid(format!(
            "bundle {}:{} needs EIR {} or later (this is {})",
            config.name,
            config.version,
            config.min_eir_version,
            env!("CARGO_PKG_VERSION")
        )));
    }
    Ok(Built { digest, size: bytes.len() as u64, manifest, config })
}

/// Whether version `wanted` (`MAJOR.MINOR.PATCH`, pre-release ignored) is newer than `have`.
fn newer(wanted: &str, have: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> {
        v.split(['-', '+']).next().unwrap_or_default().split('.').map(|p| p.parse().unwrap_or(u64::MAX)).collect()
    };
    parse(wanted) > parse(have)
}

/// Checks a fragment: only `[models.*]` and `[plugins.*]`, every path inside the bundle,
/// directories read-only.
pub fn check_fragment(text: &str) -> Result<(), BundleError> {
    let raw: toml::Table = toml::from_str(text).map_err(|e| BundleError::Invalid(format!("fragment: {e}")))?;
    for (key, value) in &raw {
        if key != "models" && key != "plugins" {
            return Err(BundleError::Invalid(format!("a bundle may only declare [models] and [plugins], not [{key}]")));
        }
        let Some(entries) = value.as_table() else {
            return Err(BundleError::Invalid(format!("[{key}] must be a table")));
        };
        for (name, entry) in entries {
            let path = entry.get("path").and_then(|p| p.as_str()).unwrap_or_default();
            safe_relative(path).map_err(|e| BundleError::Invalid(format!("[{key}.{name}] path: {e}")))?;
            for dir in entry.get("dirs").and_then(|d| d.as_array()).into_iter().flatten() {
                let grant: crate::grants::DirGrant = dir
                    .as_str()
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e| BundleError::Invalid(format!("[{key}.{name}] dirs: {e}")))?;
                safe_relative(&grant.host.to_string_lossy())?;
                if grant.writable {
                    return Err(BundleError::Invalid(format!("[{key}.{name}]: a bundle's directories are read-only")));
                }
            }
        }
    }
    Ok(())
}

/// Materialises bundle `name` under `dest` (files hard-linked from the store where possible)
/// and returns the path of its configuration fragment, which [`crate::config::Config`] loads
/// with every path resolved inside `dest`.
pub fn checkout(store: &Store, name: &str, dest: &Path) -> Result<PathBuf, BundleError> {
    let built = open(store, name)?;
    let io = |e: std::io::Error| BundleError::Io(format!("{}: {e}", dest.display()));
    let fragment = built.manifest.fragment()?;
    let text = store.read(&Digest::parse(&fragment.digest)?, MAX_METADATA)?;
    let text = String::from_utf8(text).map_err(|_| BundleError::Invalid("the fragment is not UTF-8".into()))?;
    check_fragment(&text)?;
    for l in &built.manifest.layers {
        let target = dest.join(l.path()?);
        let digest = Digest::parse(&l.digest)?;
        let blob = store.blob_path(&digest);
        let len = std::fs::metadata(&blob).map_err(|_| BundleError::Missing(l.digest.clone()))?.len();
        if len != l.size {
            return Err(BundleError::Digest(format!("blob {} is {len} bytes, the manifest says {}", l.digest, l.size)));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        if target.exists() {
            continue;
        }
        if std::fs::hard_link(&blob, &target).is_err() {
            std::fs::copy(&blob, &target).map_err(io)?;
        }
    }
    Ok(dest.join("eir.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_for_a_newer_eir_are_refused() {
        assert!(newer("0.2.0", "0.1.9") && newer("1.0.0", "0.99.0") && newer("0.1.10", "0.1.9"));
        assert!(!newer("0.1.0", "0.1.0") && !newer("0.0.9", "0.1.0") && !newer("0.1.0-rc1", "0.1.0"));
        assert!(newer("garbage", "0.1.0"), "an unreadable version is refused");
    }

    #[test]
    fn fragments_cannot_reach_outside_the_bundle() {
        assert!(check_fragment("[models.m]\npath = \"models/m\"\n[plugins.p]\npath = \"plugins/p.wasm\"\n").is_ok());
        for bad in [
            "[server]\nlisten = \"0.0.0.0:80\"\n",
            "[tenants.t]\nkeys_sha256 = []\n",
            "[models.m]\npath = \"/etc/passwd\"\n",
            "[models.m]\npath = \"../../x\"\n",
            "[plugins.p]\npath = \"plugins/p.wasm\"\ndirs = [\"/etc::/etc:ro\"]\n",
            "[plugins.p]\npath = \"plugins/p.wasm\"\ndirs = [\"files/p/0::/data:rw\"]\n",
        ] {
            assert!(matches!(check_fragment(bad), Err(BundleError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn manifests_with_unsafe_layers_are_refused() {
        let d = format!("sha256:{}", "0".repeat(64));
        let manifest = |path: &str, digest: &str| {
            serde_json::json!({
                "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE,
                "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": d, "size": 2},
                "layers": [{"mediaType": WASM_MEDIA_TYPE, "digest": digest, "size": 1,
                            "annotations": {PATH_ANNOTATION: path}}],
            })
            .to_string()
        };
        assert!(Manifest::parse(manifest("plugins/p.wasm", &d).as_bytes()).is_ok());
        for (path, digest) in [("../x", d.as_str()), ("/abs", &d), ("C:/x", &d), ("ok", "sha256:../../etc")] {
            assert!(matches!(Manifest::parse(manifest(path, digest).as_bytes()), Err(BundleError::Invalid(_))));
        }
        let other = manifest("p", &d).replace(ARTIFACT_TYPE, "application/vnd.other");
        assert!(matches!(Manifest::parse(other.as_bytes()), Err(BundleError::Invalid(_))));
    }
}
