//! Serving from bundles: the `[bundles.NAME]` of a configuration are pulled (retried with
//! backoff while the registry is unreachable), verified under the `[trust]` policy, checked out
//! from the local store, and their models and plugins merged into the configuration. A reload
//! that cannot do this fails, and the running version keeps serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use super::{BundleError, Store, registry, sign};
use crate::config::{Config, Fragment, TrustMode};

/// Tries per pull while the registry is unreachable, and the first wait (doubled each time).
const PULL_TRIES: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// The local store bundles are served from: `<cache dir>/bundles`.
pub fn store_dir() -> Option<PathBuf> {
    crate::engine::default_cache_dir().map(|d| d.join("bundles"))
}

/// Loads the configuration at `path` with its bundles merged in.
pub async fn load_config(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // The bundles and trust policy first (the rest may name plugins only bundles declare).
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default)]
        bundles: std::collections::BTreeMap<String, crate::config::BundleDecl>,
        #[serde(default)]
        trust: crate::config::TrustDecl,
    }
    let head: Head = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
    if head.bundles.is_empty() {
        return Ok(Config::parse(path, &text)?);
    }
    let trust = head.trust.resolved(path.parent().unwrap_or(Path::new(".")));
    let root = store_dir().context("no cache directory for the bundle store (set EIR_CACHE_DIR)")?;
    let store = Store::open(&root)?;
    let auth = registry::Auth::from_env();
    let mut fragments = Vec::new();
    for (name, decl) in &head.bundles {
        let reference = registry::reference(&decl.reference)?;
        let repository = format!("{}/{}", reference.registry(), reference.repository());
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
                anyhow::bail!("bundle `{name}`: no trusted key for {repository} and [trust] mode is enforce")
            }
            TrustMode::Enforce => Some(keys.as_slice()),
            TrustMode::Warn | TrustMode::Off => None,
        };
        let local = format!("served/{name}");
        let pinned = reference.digest().and_then(|d| super::Digest::parse(d).ok()).filter(|d| store.has(d));
        let digest = match pinned {
            // Pinned and here: served without the registry.
            Some(d) => d,
            None => pull_with_retries(&store, &reference, &local, &auth, trusted)
                .await
                .with_context(|| format!("bundle `{name}` ({})", decl.reference))?,
        };
        if trust.mode == TrustMode::Warn
            && let Err(e) = sign::verify(&reference, &digest, &keys, &auth).await
        {
            tracing::warn!(bundle = %name, error = %e, "serving a bundle whose signature does not verify ([trust] mode warn)");
        }
        let dir = root.join("checkouts").join(digest.hex());
        let fragment = super::checkout(&store, digest.as_str(), &dir)?;
        let text = std::fs::read_to_string(&fragment).with_context(|| format!("reading {}", fragment.display()))?;
        tracing::info!(bundle = %name, digest = %digest, "bundle checked out");
        fragments.push(Fragment { bundle: name.clone(), dir, text });
    }
    Ok(Config::parse_with(path, &text, &fragments)?)
}

/// Pulls, retrying with backoff while the registry fails (not when the bundle is refused).
async fn pull_with_retries(
    store: &Store,
    reference: &oci_client::Reference,
    local: &str,
    auth: &registry::Auth,
    trusted: Option<&[p256::ecdsa::VerifyingKey]>,
) -> Result<super::Digest, BundleError> {
    let mut wait = FIRST_BACKOFF;
    let mut tries = 0;
    loop {
        tries += 1;
        match registry::pull(store, reference, local, auth, trusted).await {
            Ok((digest, _)) => return Ok(digest),
            Err(BundleError::Registry(e)) if tries < PULL_TRIES => {
                tracing::warn!(bundle = %reference, error = %e, retry_in = ?wait, "registry unreachable; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => return Err(e),
        }
    }
}
