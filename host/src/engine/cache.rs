//! The on-disk cache of compiled artifacts.
//!
//! Entries are keyed by the SHA-256 of the wasm bytes together with the engine's compatibility
//! hash (wasmtime version, target, and every setting that changes generated code), so a cache
//! shared by differently configured engines never serves an incompatible artifact.
//! Deserialising an entry trusts it, so the cache trusts only what it wrote: the directory is
//! created private (0700), and a directory or an entry owned by another user, or writable by
//! group or others, is refused ([`CompileCache::open`] fails, [`CompileCache::trusted`] says no).

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
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).with_context(|| format!("creating the compile cache directory {}", dir.display()))?;
        let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        if let Err(why) = private(&meta) {
            anyhow::bail!(
                "the compile cache directory {} {why}; its artifacts would run as trusted code \
                 (fix its owner or mode, e.g. chmod 700, or set EIR_CACHE_DIR elsewhere)",
                dir.display()
            );
        }
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

    /// Whether the entry at `path` may be deserialised: a regular file owned by this user and
    /// writable by nobody else. An entry that is not is left alone and recompiled.
    pub fn trusted(&self, path: &Path) -> bool {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_file() => match private(&meta) {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!(cache = %path.display(), "refusing a compile cache entry that {why}");
                    false
                }
            },
            _ => false,
        }
    }

    /// Removes a (corrupt or stale) entry.
    pub fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.path(key));
    }
}

/// Whether `meta` belongs to this user and is writable by no one else; else why not.
fn private(meta: &std::fs::Metadata) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(format!("is owned by uid {} (this process runs as {me})", meta.uid()));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!("is writable by group or others (mode {:o})", meta.mode() & 0o7777));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    Ok(())
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

    #[cfg(unix)]
    #[test]
    fn entries_and_directories_others_can_write_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path(), &wasmtime::Engine::default()).unwrap();
        let key = cache.key(b"module");
        cache.put(&key, b"artifact").unwrap();
        assert!(cache.trusted(&cache.path(&key)));
        std::fs::set_permissions(cache.path(&key), std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(!cache.trusted(&cache.path(&key)), "a world-writable entry may have been replaced");
        let shared = tempfile::tempdir().unwrap();
        std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = CompileCache::open(shared.path(), &wasmtime::Engine::default()).unwrap_err();
        assert!(err.to_string().contains("writable by group or others"), "{err}");
    }
}
