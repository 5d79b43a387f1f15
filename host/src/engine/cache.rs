//! The on-disk cache of compiled artifacts.
//!
//! Entries are keyed by the SHA-256 of the wasm bytes together with the engine's compatibility
//! hash (wasmtime version, target, and every setting that changes generated code), so a cache
//! shared by differently configured engines never serves an incompatible artifact.
//! Deserialising an entry trusts it: the cache directory must be writable only by its owner.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

/// A directory of precompiled artifacts (`<key>.cwasm`).
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    engine_hash: [u8; 32],
}

impl CompileCache {
    /// Opens (creating if needed) the cache at `dir` for artifacts of `engine`.
    pub fn open(dir: &Path, engine: &wasmtime::Engine) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the compile cache directory {}", dir.display()))?;
        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self { dir: dir.to_path_buf(), engine_hash: hasher.0.finalize().into() })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of `wasm` for this engine.
    pub fn key(&self, wasm: &[u8]) -> String {
        let mut digest = Sha256::new();
        digest.update(self.engine_hash);
        digest.update(wasm);
        hex::encode(digest.finalize())
    }

    /// Where the artifact for `key` lives.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.cwasm"))
    }

    /// Reads the cached artifact for `key`, if present.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.path(key)).ok()
    }

    /// Stores an artifact atomically (write to a temporary file, then rename), so a concurrent
    /// reader sees either nothing or the whole artifact.
    pub fn put(&self, key: &str, artifact: &[u8]) -> anyhow::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)
            .with_context(|| format!("creating a file in {}", self.dir.display()))?;
        tmp.write_all(artifact).context("writing a compiled artifact")?;
        tmp.persist(self.path(key)).context("moving a compiled artifact into the cache")?;
        Ok(())
    }

    /// Removes a (corrupt or stale) entry.
    pub fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.path(key));
    }
}

/// Feeds `Hash` impls into SHA-256 so the engine hash is stable across processes.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_bytes_and_engine() {
        let dir = tempfile::tempdir().unwrap();
        let plain = wasmtime::Engine::default();
        let mut cfg = wasmtime::Config::new();
        cfg.consume_fuel(true);
        let fuel = wasmtime::Engine::new(&cfg).unwrap();
        let a = CompileCache::open(dir.path(), &plain).unwrap();
        let b = CompileCache::open(dir.path(), &fuel).unwrap();
        assert_eq!(a.key(b"x"), a.key(b"x"));
        assert_ne!(a.key(b"x"), a.key(b"y"));
        assert_ne!(a.key(b"x"), b.key(b"x"), "engine settings must be part of the key");
    }

    #[test]
    fn put_then_get_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path(), &wasmtime::Engine::default()).unwrap();
        let key = cache.key(b"module");
        assert!(cache.get(&key).is_none());
        cache.put(&key, b"artifact").unwrap();
        assert_eq!(cache.get(&key).as_deref(), Some(&b"artifact"[..]));
        cache.remove(&key);
        assert!(cache.get(&key).is_none());
    }
}
