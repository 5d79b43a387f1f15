//! Serving from bundles: the `[bundles.NAME]` of a configuration are pulled (retried with
//! backoff while the registry is unreachable), verified under the `[trust]` policy, checked out
//! from the local store, and their models and plugins merged into the configuration. A reload
//! that cannot do this fails, and the running version keeps serving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use super::{BundleError, Store, registry, sign};
use crate::config::{BundleDecl, Config, Fragment, TrustDecl, TrustMode};

/// Tries per pull while the registry is unreachable, and the first wait (doubled each time).
const PULL_TRIES: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// The local store bundles are served from: `<cache dir>/bundles`.
pub fn store_dir() -> Option<PathBuf> {
    crate::engine::default_cache_dir().map(|d| d.join("bundles"))
}

/// Loads the configuration at `path` with its bundles merged in.
pub async fn load_config(path: &Path) -> anyhow::Result<Config> {
    load_config_with(path, &BTreeMap::new()).await
}

/// The `[bundles]` and `[trust]` of a configuration file.
#[derive(serde::Deserialize)]
struct Head {
    #[serde(default)]
    bundles: BTreeMap<String, BundleDecl>,
    #[serde(default)]
    trust: TrustDecl,
}

fn read_head(path: &Path) -> anyhow::Result<(String, Head)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut head: Head = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
    head.trust = head.trust.resolved(path.parent().unwrap_or(Path::new(".")));
    Ok((text, head))
}

/// The trust policy of the configuration at `path` (key paths resolved).
pub fn trust_of(path: &Path) -> anyhow::Result<TrustDecl> {
    Ok(read_head(path)?.1.trust)
}

/// [`load_config`] with `extra` bundles (assigned at run time, e.g. by the fleet agent) served
/// beside the file's own; a name in both is an error.
pub async fn load_config_with(path: &Path, extra: &BTreeMap<String, BundleDecl>) -> anyhow::Result<Config> {
    // The bundles and trust policy first (the rest may name plugins only bundles declare).
    let (text, mut head) = read_head(path)?;
    for (name, decl) in extra {
        if head.bundles.insert(name.clone(), decl.clone()).is_some() {
            anyhow::bail!("bundle `{name}` is assigned at run time and also declared in {}", path.display());
        }
    }
    if head.bundles.is_empty() {
        return Ok(Config::parse(path, &text)?);
    }
    let store = default_store()?;
    let mut fragments = Vec::new();
    let base = path.parent().unwrap_or(Path::new("."));
    for (name, decl) in &head.bundles {
        let dir = match (&decl.reference, &decl.dir) {
            (Some(reference), None) => {
                // The fleet's bundle is named as the fleet agent names it, so its store
                // cleaning can drop it once it is neither served nor kept for rollback.
                let holder =
                    if name == crate::fleet::agent::BUNDLE_NAME { crate::fleet::agent::FLEET_TAG } else { "served" };
                let (digest, _) =
                    fetch(&store, &head.trust, reference, holder).await.with_context(|| format!("bundle `{name}`"))?;
                let dir = store.root().join("checkouts").join(digest.hex());
                super::checkout(&store, digest.as_str(), &dir)?;
                tracing::info!(bundle = %name, digest = %digest, "bundle checked out");
                dir
            }
            // Checked out by someone else (`eir bundle install`, verified there).
            (None, Some(dir)) => base.join(dir),
            _ => anyhow::bail!("bundle `{name}`: give either `ref` or `dir`"),
        };
        let fragment = dir.join("eir.toml");
        let text = std::fs::read_to_string(&fragment).with_context(|| format!("reading {}", fragment.display()))?;
        super::check_fragment(&text).with_context(|| format!("bundle `{name}`"))?;
        fragments.push(Fragment { bundle: name.clone(), dir, text });
    }
    Ok(Config::parse_with(path, &text, &fragments)?)
}

/// Brings bundle `reference` into `store` under the `trust` policy and returns its digest: a
/// pinned digest already in the store is used as it is (offline); otherwise it is pulled,
/// retried with backoff while the registry is unreachable, and its signature checked before
/// any blob moves (`enforce`) or after (`warn`, which only logs). Also what moved. It is named
/// `TAG/REFERENCE` in the store (`served`, `fleet`, `installed`: who holds it, for
/// [`Store::gc`]).
pub async fn fetch(
    store: &Store,
    trust: &TrustDecl,
    reference: &str,
    tag: &str,
) -> anyhow::Result<(super::Digest, registry::Transfer)> {
    let parsed = registry::reference(reference)?;
    let repository = format!("{}/{}", parsed.registry(), parsed.repository());
    let keys: Vec<p256::ecdsa::VerifyingKey> = trust
        .keys_for(&repository)
        .iter()
        .map(|k| {
            let pem = std::fs::read_to_string(k).with_context(|| format!("reading trusted key {}", k.display()))?;
            Ok(sign::verifying_key(&pem)?)
        })
        .collect::<anyhow::Result<_>>()?;
    let trusted = match trust.mode {
        TrustMode::Enforce if keys.is_empty() => {
            anyhow::bail!("no trusted key for {repository} and [trust] mode is enforce")
        }
        TrustMode::Enforce => Some(keys.as_slice()),
        TrustMode::Warn | TrustMode::Off => None,
    };
    let local = format!("{tag}/{}", parsed.whole());
    let pinned = parsed.digest().and_then(|d| super::Digest::parse(d).ok()).filter(|d| whole(store, d));
    if let Some(d) = pinned {
        // Pinned and wholly here: it was verified when it arrived. Named again (the names are
        // what the store's garbage collection keeps).
        let size = std::fs::metadata(store.blob_path(&d)).map(|m| m.len()).unwrap_or_default();
        store.tag(&local, &d, size)?;
        return Ok((d, registry::Transfer::default()));
    }
    let auth = registry::Auth::from_env();
    let (digest, transfer) = pull_with_retries(store, &parsed, &local, &auth, trusted)
        .await
        .with_context(|| format!("pulling {reference}"))?;
    if trust.mode == TrustMode::Warn
        && let Err(e) = sign::verify(&parsed, &digest, &keys, &auth).await
    {
        tracing::warn!(bundle = %reference, error = %e, "serving a bundle whose signature does not verify ([trust] mode warn)");
    }
    Ok((digest, transfer))
}

/// Whether bundle `digest`'s manifest and every blob it names are in `store`.
fn whole(store: &Store, digest: &super::Digest) -> bool {
    let Ok(bytes) = store.read(digest, super::MAX_METADATA) else { return false };
    let Ok(manifest) = super::Manifest::parse(&bytes) else { return false };
    std::iter::once(&manifest.config)
        .chain(&manifest.layers)
        .all(|l| super::Digest::parse(&l.digest).is_ok_and(|d| store.has(&d)))
}

/// The default store.
pub fn default_store() -> anyhow::Result<Store> {
    let root = store_dir().context("no cache directory for the bundle store (set EIR_CACHE_DIR)")?;
    Ok(Store::open(&root)?)
}

/// Pulls, retrying with backoff while the registry fails (not when the bundle is refused).
async fn pull_with_retries(
    store: &Store,
    reference: &oci_client::Reference,
    local: &str,
    auth: &registry::Auth,
    trusted: Option<&[p256::ecdsa::VerifyingKey]>,
) -> Result<(super::Digest, registry::Transfer), BundleError> {
    let mut wait = FIRST_BACKOFF;
    let mut tries = 0;
    loop {
        tries += 1;
        match registry::pull(store, reference, local, auth, trusted).await {
            Ok(pulled) => return Ok(pulled),
            Err(BundleError::Registry(e)) if tries < PULL_TRIES => {
                tracing::warn!(bundle = %reference, error = %e, retry_in = ?wait, "registry unreachable; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => return Err(e),
        }
    }
}
