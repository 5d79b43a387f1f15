//! Turning bytes on disk into something wasmtime can instantiate: a component or a core
//! module, compiled once and then served from the [`CompileCache`](super::CompileCache).

use std::path::Path;
use std::time::Instant;

use wasmtime::Module;
use wasmtime::Precompiled;
use wasmtime::component::Component;

use super::Engine;

/// A compiled, ready-to-link WebAssembly artifact.
#[derive(Clone)]
pub enum Artifact {
    /// A component (pipeline plugin or WASI command).
    Component(Component),
    /// A core module (a `wasm32-wasip1` program).
    Module(Module),
}

/// Why a file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bytes are neither a wasm binary, WAT text, nor a wasmtime artifact.
    #[error("{name} is not WebAssembly: expected a component, a core module or WAT text")]
    NotWasm {
        /// The file or source name.
        name: String,
    },
    /// The file is WAT text that does not parse.
    #[error("{name}: invalid WAT: {message}")]
    InvalidWat {
        /// The file or source name.
        name: String,
        /// The parser's message.
        message: String,
    },
    /// A precompiled artifact was given without permission to load one.
    #[error(
        "{name} is a precompiled artifact; loading one runs its machine code unchecked, \
         so it needs --allow-precompiled (only for files you produced yourself with `eir compile`)"
    )]
    PrecompiledNotAllowed {
        /// The file or source name.
        name: String,
    },
    /// Validation or compilation failed.
    #[error("{name} failed to compile: {message}")]
    Compile {
        /// The file or source name.
        name: String,
        /// wasmtime's explanation.
        message: String,
    },
}

/// What the first bytes say a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Component,
    Module,
}

/// The binary header is `\0asm` then a 16-bit version and a 16-bit layer: layer 0 is a
/// core module, layer 1 a component.
fn sniff(bytes: &[u8]) -> Option<Format> {
    match bytes {
        [0, b'a', b's', b'm', _, _, 0, 0, ..] => Some(Format::Module),
        [0, b'a', b's', b'm', _, _, 1, 0, ..] => Some(Format::Component),
        _ => None,
    }
}

impl Engine {
    /// Loads the file at `path` (see [`Engine::load_bytes`]).
    pub fn load_file(&self, path: &Path, allow_precompiled: bool) -> Result<Artifact, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Io { path: path.display().to_string(), source })?;
        self.load_bytes(&path.display().to_string(), &bytes, allow_precompiled)
    }

    /// Loads a component or core module from wasm binary, WAT text, or (when allowed) a
    /// wasmtime artifact made by [`Engine::precompile`]. Compilation goes through the cache.
    pub fn load_bytes(&self, name: &str, bytes: &[u8], allow_precompiled: bool) -> Result<Artifact, LoadError> {
        if let Some(kind) = wasmtime::Engine::detect_precompiled(bytes) {
            if !allow_precompiled {
                return Err(LoadError::PrecompiledNotAllowed { name: name.to_string() });
            }
            // SAFETY: the caller vouched for the artifact (`allow_precompiled`); wasmtime
            // still checks that it was produced by a compatible engine.
            let loaded = unsafe {
                match kind {
                    Precompiled::Component => Component::deserialize(&self.inner, bytes).map(Artifact::Component),
                    Precompiled::Module => Module::deserialize(&self.inner, bytes).map(Artifact::Module),
                }
            };
            return loaded.map_err(|e| LoadError::Compile { name: name.to_string(), message: format!("{e:#}") });
        }
        let binary = to_binary(name, bytes)?;
        let format = sniff(&binary).ok_or_else(|| LoadError::NotWasm { name: name.to_string() })?;
        self.compile_cached(name, &binary, format)
    }

    /// Compiles `bytes` (binary or WAT) to an artifact that [`Engine::load_bytes`] accepts with
    /// `allow_precompiled`.
    pub fn precompile(&self, name: &str, bytes: &[u8]) -> Result<Vec<u8>, LoadError> {
        let binary = to_binary(name, bytes)?;
        let format = sniff(&binary).ok_or_else(|| LoadError::NotWasm { name: name.to_string() })?;
        self.compile_to_artifact(name, &binary, format)
    }

    fn compile_cached(&self, name: &str, binary: &[u8], format: Format) -> Result<Artifact, LoadError> {
        let Some(cache) = self.cache() else {
            let compiled = match format {
                Format::Component => Component::from_binary(&self.inner, binary).map(Artifact::Component),
                Format::Module => Module::from_binary(&self.inner, binary).map(Artifact::Module),
            };
            return compiled.map_err(|e| LoadError::Compile { name: name.to_string(), message: format!("{e:#}") });
        };
        let key = cache.key(binary);
        let path = cache.path(&key);
        if path.exists() && cache.trusted(&path) {
            match self.deserialize_file(&path, format) {
                Ok(artifact) => {
                    tracing::debug!(plugin = name, cache = %path.display(), "loaded compiled artifact from cache");
                    return Ok(artifact);
                }
                Err(err) => {
                    tracing::warn!(cache = %path.display(), error = %err, "discarding unusable cache entry");
                    cache.remove(&key);
                }
            }
        }
        let artifact = self.compile_to_artifact(name, binary, format)?;
        if let Err(err) = cache.put(&key, &artifact) {
            tracing::warn!(error = %format!("{err:#}"), "could not write the compile cache; continuing without it");
        }
        // SAFETY: these bytes were produced by this very engine a moment ago.
        let loaded = unsafe {
            match format {
                Format::Component => Component::deserialize(&self.inner, &artifact).map(Artifact::Component),
                Format::Module => Module::deserialize(&self.inner, &artifact).map(Artifact::Module),
            }
        };
        loaded.map_err(|e| LoadError::Compile { name: name.to_string(), message: format!("{e:#}") })
    }

    fn compile_to_artifact(&self, name: &str, binary: &[u8], format: Format) -> Result<Vec<u8>, LoadError> {
        let size = bytesize::ByteSize(binary.len() as u64);
        tracing::info!(plugin = name, %size, "compiling (first load; later loads use the cache)");
        let started = Instant::now();
        let artifact = match format {
            Format::Component => self.inner.precompile_component(binary),
            Format::Module => self.inner.precompile_module(binary),
        }
        .map_err(|e| LoadError::Compile { name: name.to_string(), message: format!("{e:#}") })?;
        tracing::info!(plugin = name, elapsed = ?started.elapsed(), "compiled");
        Ok(artifact)
    }

    fn deserialize_file(&self, path: &Path, format: Format) -> wasmtime::Result<Artifact> {
        // SAFETY: the caller checked `CompileCache::trusted`: the entry lies in a private
        // directory, is owned by this user and writable by no one else, so it was written by
        // `CompileCache::put` (atomically), keyed by the engine's compatibility hash.
        unsafe {
            Ok(match format {
                Format::Component => Artifact::Component(Component::deserialize_file(&self.inner, path)?),
                Format::Module => Artifact::Module(Module::deserialize_file(&self.inner, path)?),
            })
        }
    }
}

/// Accepts WAT text as well as binaries (handy for tests and small examples).
fn to_binary<'a>(name: &str, bytes: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, LoadError> {
    if bytes.starts_with(b"\0asm") {
        return Ok(bytes.into());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| LoadError::NotWasm { name: name.to_string() })?;
    if !text.trim_start().starts_with('(') {
        return Err(LoadError::NotWasm { name: name.to_string() });
    }
    wat::parse_str(text)
        .map(Into::into)
        .map_err(|e| LoadError::InvalidWat { name: name.to_string(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_layers() {
        assert_eq!(sniff(b"\0asm\x01\0\0\0"), Some(Format::Module));
        assert_eq!(sniff(b"\0asm\x0d\0\x01\0"), Some(Format::Component));
        assert_eq!(sniff(b"\x7fELF\x02\x01\x01\0"), None);
        assert_eq!(sniff(b"\0as"), None);
    }

    #[test]
    fn rejects_garbage_with_a_clear_error() {
        let engine =
            Engine::new(crate::engine::EngineConfig { cache_dir: None, pooling: false, ..Default::default() }).unwrap();
        let err = engine.load_bytes("junk", b"hello world", false).err().unwrap();
        assert!(matches!(err, LoadError::NotWasm { .. }), "{err}");
        let err = engine.load_bytes("bad.wat", b"(module (func (result i32)))", false).err().unwrap();
        assert!(matches!(err, LoadError::Compile { .. }), "{err}");
        let err = engine.load_bytes("bad.wat", b"(module (fnc))", false).err().unwrap();
        assert!(matches!(err, LoadError::InvalidWat { .. }), "{err}");
    }

    #[test]
    fn second_load_hits_the_cache_and_precompiled_needs_consent() {
        let dir = tempfile::tempdir().unwrap();
        let config =
            crate::engine::EngineConfig { cache_dir: Some(dir.path().into()), pooling: false, ..Default::default() };
        let engine = Engine::new(config).unwrap();
        let wat = b"(component (core module (func (export \"f\"))))";
        engine.load_bytes("c.wat", wat, false).unwrap();
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 1, "one artifact cached");
        assert!(matches!(engine.load_bytes("c.wat", wat, false).unwrap(), Artifact::Component(_)));

        let artifact = engine.precompile("c.wat", wat).unwrap();
        let err = engine.load_bytes("c.cwasm", &artifact, false).err().unwrap();
        assert!(matches!(err, LoadError::PrecompiledNotAllowed { .. }));
        assert!(matches!(engine.load_bytes("c.cwasm", &artifact, true).unwrap(), Artifact::Component(_)));
    }
}
