//! The configuration file (TOML): models, plugins with their limits and grants, and (for the
//! gateway) tenants. Validated as a whole; every error names the file, the line and the reason.
//!
//! ```toml
//! [models.minilm]
//! path = "../models/minilm"          # relative paths resolve against this file's directory
//! family = "bert"                    # optional check
//!
//! [plugins.embed]
//! path = "dist/text_embed.wasm"
//! models = ["minilm"]                # wasi-nn grants (the model's files appear at /models/minilm)
//! dirs = ["data::/data:ro"]          # HOST::GUEST[:ro|:rw]
//! env = { LANG = "C" }
//! reuse = 1000                       # calls per instance (1 = fresh every call)
//! limits = { fuel = 5_000_000_000, timeout = "10s", max_memory = "256MiB" }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytesize::ByteSize;
use serde::Deserialize;
use toml::Spanned;

use crate::grants::{DirGrant, Grants, Stdio};
use crate::limits::Limits;
use crate::nn::{ComputePool, NnGrants, Target};
use crate::plugin::PluginConfig;
use crate::registry::{ModelDecl, Registry};

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    /// The configuration file.
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// A parsed and validated configuration file.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it was read from.
    pub file: PathBuf,
    /// Models by name.
    pub models: BTreeMap<String, ModelDecl>,
    /// Plugins by name.
    pub plugins: BTreeMap<String, PluginDecl>,
}

/// One plugin of the configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginDecl {
    /// The component (resolved against the file's directory).
    pub path: PathBuf,
    /// How it runs.
    pub config: PluginConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    models: BTreeMap<String, Spanned<RawModel>>,
    #[serde(default)]
    plugins: BTreeMap<String, Spanned<RawPlugin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    path: Spanned<PathBuf>,
    #[serde(default)]
    family: Option<String>,
    #[serde(default)]
    target: Target,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    path: Spanned<PathBuf>,
    #[serde(default)]
    models: Vec<Spanned<String>>,
    #[serde(default)]
    load_from_bytes: Option<ByteSize>,
    #[serde(default)]
    dirs: Vec<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    network: bool,
    #[serde(default)]
    reuse: Option<u32>,
    #[serde(default)]
    limits: Limits,
}

impl Config {
    /// Reads and validates `file`.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.display().to_string(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(file, &text)
    }

    /// Parses and validates `text`, as if read from `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let err = |span: Option<std::ops::Range<usize>>, message: String| ConfigError {
            file: file.display().to_string(),
            line: span.map(|s| line_of(text, s.start)).unwrap_or(0),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| err(e.span(), e.message().to_string()))?;
        let base = file.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };

        let mut models = BTreeMap::new();
        for (name, model) in raw.models {
            let span = model.span();
            let model = model.into_inner();
            let path = resolve(model.path.get_ref());
            if !path.exists() {
                return Err(err(
                    Some(model.path.span()),
                    format!(
                        "model `{name}`: {} does not exist (fetch pinned models with `eir models fetch`)",
                        path.display()
                    ),
                ));
            }
            if name.is_empty() {
                return Err(err(Some(span), "a model needs a name".into()));
            }
            models.insert(name, ModelDecl { path, family: model.family, target: model.target });
        }

        let mut plugins = BTreeMap::new();
        for (name, plugin) in raw.plugins {
            let plugin = plugin.into_inner();
            let path = resolve(plugin.path.get_ref());
            if !path.is_file() {
                return Err(err(
                    Some(plugin.path.span()),
                    format!(
                        "plugin `{name}`: {} is not a file (build the plugins with scripts/build.sh)",
                        path.display()
                    ),
                ));
            }
            for model in &plugin.models {
                if model.get_ref() != "*" && !models.contains_key(model.get_ref()) {
                    return Err(err(
                        Some(model.span()),
                        format!(
                            "plugin `{name}` is granted model `{}`, which is not declared under [models]",
                            model.get_ref()
                        ),
                    ));
                }
            }
            let mut dirs = Vec::new();
            for dir in &plugin.dirs {
                let mut grant: DirGrant = dir
                    .get_ref()
                    .parse()
                    .map_err(|e: String| err(Some(dir.span()), format!("plugin `{name}`: {e}")))?;
                grant.host = resolve(&grant.host);
                if !grant.host.is_dir() {
                    return Err(err(
                        Some(dir.span()),
                        format!("plugin `{name}`: {} is not a directory", grant.host.display()),
                    ));
                }
                dirs.push(grant);
            }
            let grants = Grants {
                dirs,
                env: plugin.env.into_iter().collect(),
                args: vec![name.clone()],
                network: plugin.network,
                stdio: Stdio::Log,
                stdin: false,
                nn: NnGrants {
                    models: plugin.models.into_iter().map(Spanned::into_inner).collect(),
                    load_from_bytes: plugin.load_from_bytes,
                    ..NnGrants::default()
                },
            };
            let config = PluginConfig { limits: plugin.limits, grants, reuse: plugin.reuse.unwrap_or(1).max(1) };
            plugins.insert(name, PluginDecl { path, config });
        }
        Ok(Self { file: file.to_path_buf(), models, plugins })
    }

    /// A registry of the configured models, computing on `pool`.
    pub fn registry(&self, pool: ComputePool) -> Arc<Registry> {
        Arc::new(Registry::new(self.models.clone(), pool))
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("models/minilm")).unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("p.wasm"), b"\0asm").unwrap();
        dir
    }

    #[test]
    fn a_full_config_resolves_paths_and_grants() {
        let dir = setup();
        let file = dir.path().join("eir.toml");
        let text = r#"
[models.minilm]
path = "models/minilm"
family = "bert"

[plugins.embed]
path = "p.wasm"
models = ["minilm"]
dirs = ["data::/data:rw"]
env = { LANG = "C" }
reuse = 100
limits = { fuel = 1000, timeout = "2s", max_memory = "64MiB" }
"#;
        let config = Config::parse(&file, text).unwrap();
        assert_eq!(config.models["minilm"].path, dir.path().join("models/minilm"));
        let embed = &config.plugins["embed"];
        assert_eq!(embed.path, dir.path().join("p.wasm"));
        assert_eq!(embed.config.reuse, 100);
        assert_eq!(embed.config.limits.fuel, 1000);
        assert_eq!(embed.config.limits.timeout, std::time::Duration::from_secs(2));
        assert_eq!(embed.config.grants.nn.models, vec!["minilm".to_string()]);
        assert_eq!(embed.config.grants.dirs[0].host, dir.path().join("data"));
        assert!(embed.config.grants.dirs[0].writable);
        assert_eq!(embed.config.grants.env, vec![("LANG".to_string(), "C".to_string())]);
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let dir = setup();
        let file = dir.path().join("eir.toml");
        let cases = [
            ("[plugins.x]\npath = \"p.wasm\"\nmodels = [\"ghost\"]\n", 3, "not declared"),
            ("[models.m]\npath = \"nowhere\"\n", 2, "does not exist"),
            ("[plugins.x]\npath = \"p.wasm\"\n\nlimits = { fule = 1 }\n", 4, "fule"),
            ("[plugins.x]\npath = \"p.wasm\"\ndirs = [\"data\"]\n", 3, "HOST::GUEST"),
            ("[plugins.x]\npath = \"missing.wasm\"\n", 2, "not a file"),
            ("[plugins.x\n", 1, ""),
        ];
        for (text, line, words) in cases {
            let e = Config::parse(&file, text).unwrap_err();
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.message.contains(words), "{text}: {e}");
            assert!(e.to_string().starts_with(&format!("{}:{line}: ", file.display())), "{e}");
        }
    }
}
