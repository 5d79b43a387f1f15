//! The local bundle store: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`), so bundles built or pulled here can also be read by other OCI tools
//! (`skopeo copy oci:DIR:NAME ...`). Blobs are content-addressed: a blob is written once,
//! verified against its digest before it becomes visible, and skipped when already present.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::BundleError;

/// A blob's address: `sha256:` and 64 lower-case hex digits. Checked on construction, so a
/// digest from a manifest can never name a path outside the store.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<64 hex>`.
    pub fn parse(s: &str) -> Result<Self, BundleError> {
        let hex =
            s.strip_prefix("sha256:").ok_or_else(|| BundleError::Invalid(format!("digest `{s}` is not sha256")))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(BundleError::Invalid(format!("malformed digest `{s}`")));
        }
        Ok(Self(s.to_string()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// As written in manifests.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A local OCI image layout holding bundles.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the layout at `root`, creating it if needed.
    pub fn open(root: &Path) -> Result<Self, BundleError> {
        let io = |e: std::io::Error| BundleError::Io(format!("{}: {e}", root.display()));
        std::fs::create_dir_all(root.join("blobs/sha256")).map_err(io)?;
        let layout = root.join("oci-layout");
        if !layout.exists() {
            std::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io)?;
        }
        let index = root.join("index.json");
        if !index.exists() {
            std::fs::write(&index, br#"{"schemaVersion":2,"manifests":[]}"#).map_err(io)?;
        }
        Ok(Self { root: root.to_path_buf() })
    }

    /// Holds the store's lock (`<store>/lock`) until dropped: `index.json` updates and garbage
    /// collection take it, so two processes sharing a store never lose a name or collect what
    /// the other is naming.
    fn lock(&self) -> Result<std::fs::File, BundleError> {
        let path = self.root.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| BundleError::Io(format!("{}: {e}", path.display())))?;
        file.lock().map_err(|e| BundleError::Io(format!("{}: {e}", path.display())))?;
        Ok(file)
    }

    /// Marks blob `digest` as just used (a pull that finds it here), so garbage collection,
    /// which leaves young blobs alone, cannot take it before the pull names its bundle.
    pub fn touch(&self, digest: &Digest) {
        if let Ok(f) = std::fs::File::options().write(true).open(self.blob_path(digest)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Where the store lives.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of blob `digest` (present or not).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Whether blob `digest` is here.
    pub fn has(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Stores `bytes`; their digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, BundleError> {
        let digest = Digest::of(bytes);
        if !self.has(&digest) {
            let mut ingest = self.ingest(&digest, bytes.len() as u64)?;
            ingest.write_all(bytes).map_err(|e| BundleError::Io(e.to_string()))?;
            ingest.commit()?;
        }
        Ok(digest)
    }

    /// Stores the file at `path` (streamed); its digest and size.
    pub fn put_file(&self, path: &Path) -> Result<(Digest, u64), BundleError> {
        let io = |e: std::io::Error| BundleError::Io(format!("{}: {e}", path.display()));
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut tmp = tempfile::NamedTempFile::new_in(self.root.join("blobs")).map_err(io)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).map_err(io)?;
            size += n as u64;
        }
        let digest = Digest(format!("sha256:{}", hex::encode(hasher.finalize())));
        if !self.has(&digest) {
            tmp.persist(self.blob_path(&digest)).map_err(|e| io(e.error))?;
        }
        Ok((digest, size))
    }

    /// A writer for blob `digest` of `size` bytes (what a manifest declares): it refuses more
    /// bytes than declared, and [`Ingest::commit`] makes the blob visible only if its length
    /// and digest match.
    pub fn ingest(&self, digest: &Digest, size: u64) -> Result<Ingest, BundleError> {
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("blobs"))
            .map_err(|e| BundleError::Io(format!("{}: {e}", self.root.display())))?;
        Ok(Ingest {
            tmp,
            hasher: Sha256::new(),
            written: 0,
            size,
            digest: digest.clone(),
            dest: self.blob_path(digest),
        })
    }

    /// Reads blob `digest`, at most `limit` bytes, verifying it.
    pub fn read(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, BundleError> {
        let path = self.blob_path(digest);
        let len = std::fs::metadata(&path).map_err(|_| BundleError::Missing(digest.to_string()))?.len();
        if len > limit {
            return Err(BundleError::Invalid(format!("blob {digest} is {len} bytes, over {limit}")));
        }
        let bytes = std::fs::read(&path).map_err(|e| BundleError::Io(format!("{}: {e}", path.display())))?;
        if Digest::of(&bytes) != *digest {
            return Err(BundleError::Digest(format!("blob {digest} in the store does not match its digest")));
        }
        Ok(bytes)
    }

    /// Names manifest `digest` (of `size` bytes) `name` in `index.json`, replacing what the name
    /// pointed at.
    pub fn tag(&self, name: &str, digest: &Digest, size: u64) -> Result<(), BundleError> {
        let _locked = self.lock()?;
        let mut index = self.index()?;
        let manifests = index["manifests"].as_array_mut().ok_or_else(|| BundleError::Invalid("index.json".into()))?;
        manifests.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != name);
        manifests.push(serde_json::json!({
            "mediaType": super::MANIFEST_MEDIA_TYPE,
            "digest": digest.as_str(),
            "size": size,
            "artifactType": super::ARTIFACT_TYPE,
            "annotations": { "org.opencontainers.image.ref.name": name },
        }));
        self.write_index(&index)
    }

    /// The manifest named `name`, or `name` itself when it is a digest held here.
    pub fn resolve(&self, name: &str) -> Result<Digest, BundleError> {
        if let Ok(d) = Digest::parse(name)
            && self.has(&d)
        {
            return Ok(d);
        }
        let index = self.index()?;
        index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
            .and_then(|m| m["digest"].as_str())
            .map(Digest::parse)
            .transpose()?
            .ok_or_else(|| BundleError::Missing(format!("no bundle `{name}` in {}", self.root.display())))
    }

    /// Removes the name `name` (the manifest stays until [`Store::gc`]).
    pub fn untag(&self, name: &str) -> Result<(), BundleError> {
        let _locked = self.lock()?;
        let mut index = self.index()?;
        let manifests = index["manifests"].as_array_mut().ok_or_else(|| BundleError::Invalid("index.json".into()))?;
        let before = manifests.len();
        manifests.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != name);
        if manifests.len() != before {
            self.write_index(&index)?;
        }
        Ok(())
    }

    /// Every name in the store, with the manifest it names.
    pub fn tags(&self) -> Result<Vec<(String, Digest)>, BundleError> {
        let index = self.index()?;
        Ok(index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let name = m["annotations"]["org.opencontainers.image.ref.name"].as_str()?;
                Some((name.to_string(), Digest::parse(m["digest"].as_str()?).ok()?))
            })
            .collect())
    }

    /// Deletes what no name reaches: the checkouts (`<store>/checkouts/<hex>`) of untagged
    /// bundles, and blobs that no tagged bundle uses and that are older than `min_age` (a pull
    /// in progress writes its blobs before its manifest, so young blobs are left alone).
    pub fn gc(&self, min_age: std::time::Duration) -> Result<Collected, BundleError> {
        let _locked = self.lock()?;
        let io = |e: std::io::Error| BundleError::Io(format!("{}: {e}", self.root.display()));
        // Something else removed it first: nothing to do.
        let gone = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        };
        let roots: std::collections::BTreeSet<Digest> = self.tags()?.into_iter().map(|(_, d)| d).collect();
        let mut live: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for root in &roots {
            live.insert(root.hex().to_string());
            // A named manifest that cannot be read keeps nothing else alive; it is not deleted.
            let Ok(bytes) = self.read(root, super::MAX_METADATA) else { continue };
            let Ok(manifest) = super::Manifest::parse(&bytes) else { continue };
            for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
                if let Ok(d) = Digest::parse(&d.digest) {
                    live.insert(d.hex().to_string());
                }
            }
        }
        let mut collected = Collected::default();
        let checkouts = self.root.join("checkouts");
        if checkouts.is_dir() {
            for entry in std::fs::read_dir(&checkouts).map_err(io)? {
                let entry = entry.map_err(io)?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !roots.iter().any(|r| r.hex() == name) {
                    gone(std::fs::remove_dir_all(entry.path()))?;
                    collected.checkouts += 1;
                }
            }
        }
        for entry in std::fs::read_dir(self.root.join("blobs/sha256")).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            let old = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age >= min_age);
            if !live.contains(&name) && old {
                gone(std::fs::remove_file(entry.path()))?;
                collected.blobs += 1;
                collected.bytes += meta.len();
            }
        }
        Ok(collected)
    }

    fn write_index(&self, index: &serde_json::Value) -> Result<(), BundleError> {
        let text = serde_json::to_vec_pretty(index).map_err(|e| BundleError::Invalid(e.to_string()))?;
        let mut tmp =
            tempfile::NamedTempFile::new_in(&self.root).map_err(|e| BundleError::Io(format!("index.json: {e}")))?;
        tmp.write_all(&text).map_err(|e| BundleError::Io(format!("index.json: {e}")))?;
        tmp.persist(self.root.join("index.json")).map_err(|e| BundleError::Io(format!("index.json: {}", e.error)))?;
        Ok(())
    }

    fn index(&self) -> Result<serde_json::Value, BundleError> {
        let path = self.root.join("index.json");
        let text = std::fs::read(&path).map_err(|e| BundleError::Io(format!("{}: {e}", path.display())))?;
        serde_json::from_slice(&text).map_err(|e| BundleError::Invalid(format!("{}: {e}", path.display())))
    }
}

/// What [`Store::gc`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Checkouts removed.
    pub checkouts: usize,
    /// Blobs removed.
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// A blob being written; see [`Store::ingest`].
pub struct Ingest {
    tmp: tempfile::NamedTempFile,
    hasher: Sha256,
    written: u64,
    size: u64,
    digest: Digest,
    dest: PathBuf,
}

impl Write for Ingest {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.size {
            return Err(std::io::Error::other(format!(
                "blob {} is longer than the {} bytes its descriptor declares",
                self.digest, self.size
            )));
        }
        let n = self.tmp.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tmp.flush()
    }
}

impl Ingest {
    /// Verifies length and digest, then makes the blob visible.
    pub fn commit(self) -> Result<(), BundleError> {
        if self.written != self.size {
            return Err(BundleError::Digest(format!(
                "blob {} has {} bytes, its descriptor declares {}",
                self.digest, self.written, self.size
            )));
        }
        let got = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        if got != self.digest.as_str() {
            return Err(BundleError::Digest(format!("blob {} arrived as {got}", self.digest)));
        }
        self.tmp.persist(&self.dest).map_err(|e| BundleError::Io(format!("{}: {}", self.dest.display(), e.error)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_so_they_cannot_name_other_paths() {
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_ok());
        for bad in ["sha256:../../etc/passwd", "md5:abc", &format!("sha256:{}", "A".repeat(64)), "sha256:"] {
            assert!(matches!(Digest::parse(bad), Err(BundleError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn blobs_are_verified_before_they_become_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = store.put_bytes(b"hello").unwrap();
        assert_eq!(d, Digest::of(b"hello"));
        assert_eq!(store.read(&d, 100).unwrap(), b"hello");
        assert!(matches!(store.read(&d, 2), Err(BundleError::Invalid(_))));

        // Wrong bytes for a digest: refused, nothing stored.
        let other = Digest::of(b"other");
        let mut ingest = store.ingest(&other, 5).unwrap();
        ingest.write_all(b"evil!").unwrap();
        assert!(matches!(ingest.commit(), Err(BundleError::Digest(_))));
        assert!(!store.has(&other));
        // More bytes than declared: refused while writing.
        let mut ingest = store.ingest(&other, 2).unwrap();
        assert!(ingest.write_all(b"other").is_err());
        // Fewer: refused at commit.
        let mut ingest = store.ingest(&other, 9).unwrap();
        ingest.write_all(b"other").unwrap();
        assert!(matches!(ingest.commit(), Err(BundleError::Digest(_))));
        assert!(!store.has(&other));

        store.tag("demo:1", &d, 5).unwrap();
        store.tag("demo:1", &d, 5).unwrap();
        assert_eq!(store.resolve("demo:1").unwrap(), d);
        assert_eq!(store.resolve(d.as_str()).unwrap(), d);
        assert!(matches!(store.resolve("demo:2"), Err(BundleError::Missing(_))));
        // Tampering on disk is caught on read.
        std::fs::write(store.blob_path(&d), b"HELLO").unwrap();
        assert!(matches!(store.read(&d, 100), Err(BundleError::Digest(_))));
    }

    /// A manifest over `files` (path, bytes), stored and named `name`.
    fn bundle(store: &Store, name: &str, files: &[(&str, &[u8])]) -> (Digest, Vec<Digest>) {
        let layer = |path: &str, bytes: &[u8]| {
            let d = store.put_bytes(bytes).unwrap();
            let desc = serde_json::json!({"mediaType": super::super::WASM_MEDIA_TYPE, "digest": d.as_str(),
                "size": bytes.len(), "annotations": {super::super::PATH_ANNOTATION: path}});
            (d, desc)
        };
        let config = store.put_bytes(name.as_bytes()).unwrap();
        let (digests, layers): (Vec<Digest>, Vec<serde_json::Value>) = files.iter().map(|(p, b)| layer(p, b)).unzip();
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": super::super::MANIFEST_MEDIA_TYPE,
            "artifactType": super::super::ARTIFACT_TYPE,
            "config": {"mediaType": super::super::CONFIG_MEDIA_TYPE, "digest": config.as_str(), "size": name.len()},
            "layers": layers,
        })
        .to_string();
        let m = store.put_bytes(manifest.as_bytes()).unwrap();
        store.tag(name, &m, manifest.len() as u64).unwrap();
        std::fs::create_dir_all(store.root().join("checkouts").join(m.hex())).unwrap();
        (m, digests)
    }

    #[test]
    fn gc_deletes_only_what_no_name_reaches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (one, one_layers) = bundle(&store, "fleet/one", &[("a", b"shared"), ("b", b"only in one")]);
        let (two, two_layers) = bundle(&store, "fleet/two", &[("a", b"shared"), ("b", b"only in two")]);
        // Young blobs are kept even when unreachable (a pull may be writing them).
        store.untag("fleet/one").unwrap();
        let young = store.gc(std::time::Duration::from_secs(3600)).unwrap();
        assert_eq!((young.checkouts, young.blobs), (1, 0));
        let swept = store.gc(std::time::Duration::ZERO).unwrap();
        assert_eq!((swept.checkouts, swept.blobs), (0, 3), "one's manifest, config and own layer");
        assert!(!store.has(&one) && !store.has(&one_layers[1]));
        assert!(store.has(&two) && two_layers.iter().all(|d| store.has(d)), "two is whole, shared layer too");
        assert!(store.root().join("checkouts").join(two.hex()).is_dir());
        assert_eq!(store.tags().unwrap(), vec![("fleet/two".to_string(), two)]);
    }
}
