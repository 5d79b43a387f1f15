//! The [`Runtime`]: one engine and one linker, from which plugins are loaded. The CLI and the
//! gateway each hold one.

use std::path::Path;
use std::sync::Arc;

use crate::engine::{Artifact, Engine, EngineConfig};
use crate::plugin::{Linkers, LoadPluginError, Plugin, PluginConfig};
use crate::registry::Registry;

/// Loads and hosts plugins, and the models they share.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linkers: Arc<Linkers>,
    registry: Arc<Registry>,
}

impl Runtime {
    /// Creates the engine (see [`EngineConfig`]) and links every host interface; no models.
    pub fn new(config: EngineConfig) -> anyhow::Result<Self> {
        Self::with_registry(config, Arc::new(Registry::empty()))
    }

    /// Like [`Runtime::new`], serving the models of `registry`.
    pub fn with_registry(config: EngineConfig, registry: Arc<Registry>) -> anyhow::Result<Self> {
        let engine = Engine::new(config)?;
        let linkers = Arc::new(Linkers::new(engine.wasmtime())?);
        Ok(Self { engine, linkers, registry })
    }

    /// A runtime on the same engine and linkers serving the models of `registry` (a gateway
    /// reload: compiled components and warm slots are kept).
    pub fn with_models(&self, registry: Arc<Registry>) -> Self {
        Self { engine: self.engine.clone(), linkers: self.linkers.clone(), registry }
    }

    /// The model registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Loads the component at `path` as plugin `name`. `allow_precompiled` admits artifacts
    /// made by `eir compile` (trusted files only).
    pub fn load_plugin(
        &self,
        name: &str,
        path: &Path,
        config: PluginConfig,
        allow_precompiled: bool,
    ) -> Result<Plugin, LoadPluginError> {
        let artifact = self.engine.load_file(path, allow_precompiled)?;
        Plugin::new(&self.engine, &self.linkers, name, &self.registry, artifact, config)
    }

    /// Makes a plugin of an already loaded artifact (see [`Engine::load_file`]).
    pub fn plugin(&self, name: &str, artifact: Artifact, config: PluginConfig) -> Result<Plugin, LoadPluginError> {
        Plugin::new(&self.engine, &self.linkers, name, &self.registry, artifact, config)
    }

    /// Loads a plugin from bytes (binary, WAT, or a trusted precompiled artifact).
    pub fn load_plugin_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        config: PluginConfig,
        allow_precompiled: bool,
    ) -> Result<Plugin, LoadPluginError> {
        let artifact = self.engine.load_bytes(name, bytes, allow_precompiled)?;
        Plugin::new(&self.engine, &self.linkers, name, &self.registry, artifact, config)
    }
}
