//! Pushing bundles to and pulling them from OCI registries (crate `oci-client`).
//!
//! Plain HTTP is used only for registries on a loopback address; anything else is HTTPS.
//! Pushes skip blobs the repository already has.
//! Pulls verify the manifest's digest, refuse anything but an EIR bundle, skip blobs the store
//! already holds, and stream every other blob into the store, verified against its digest and
//! declared size before it becomes visible: an interrupted or tampered pull leaves nothing
//! half-applied.

use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::{BundleError, Digest, MANIFEST_MEDIA_TYPE, MAX_METADATA, Manifest, Store};

/// Credentials for a registry.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    /// None.
    #[default]
    Anonymous,
    /// HTTP basic authentication.
    Basic {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
}

impl Auth {
    /// From `EIR_REGISTRY_USER` and `EIR_REGISTRY_PASSWORD`, when set.
    pub fn from_env() -> Self {
        match (std::env::var("EIR_REGISTRY_USER"), std::env::var("EIR_REGISTRY_PASSWORD")) {
            (Ok(user), Ok(password)) => Auth::Basic { user, password },
            _ => Auth::Anonymous,
        }
    }

    pub(super) fn oci(&self) -> RegistryAuth {
        match self {
            Auth::Anonymous => RegistryAuth::Anonymous,
            Auth::Basic { user, password } => RegistryAuth::Basic(user.clone(), password.clone()),
        }
    }
}

/// What a push or pull moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Blobs sent or fetched.
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Blobs skipped (already at the other end).
    pub skipped: usize,
}

/// Parses `host[:port]/repo[:tag|@digest]`.
pub fn reference(s: &str) -> Result<Reference, BundleError> {
    s.parse::<Reference>().map_err(|e| BundleError::Invalid(format!("reference `{s}`: {e}")))
}

fn is_loopback(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) || host == "[::1]"
}

pub(super) fn client(reference: &Reference) -> Client {
    let registry = reference.resolve_registry().to_string();
    let protocol =
        if is_loopback(&registry) { ClientProtocol::HttpsExcept(vec![registry]) } else { ClientProtocol::Https };
    // A registry that stops answering must fail the pull (and be retried), never hang it.
    Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(30)),
        ..Default::default()
    })
}

pub(super) fn registry_error(doing: &str, e: impl std::fmt::Display) -> BundleError {
    BundleError::Registry(format!("{doing}: {e}"))
}

/// The manifest `reference` names, at most [`MAX_METADATA`] bytes, and its digest (checked
/// against the reference when it pins one).
pub(super) async fn fetch_manifest(
    client: &Client,
    reference: &Reference,
    auth: &Auth,
) -> Result<(Vec<u8>, Digest), BundleError> {
    let (bytes, _) = client
        .pull_manifest_raw(reference, &auth.oci(), &[MANIFEST_MEDIA_TYPE])
        .await
        .map_err(|e| registry_error("pulling the manifest", e))?;
    if bytes.len() as u64 > MAX_METADATA {
        return Err(BundleError::Invalid(format!("a manifest of {} bytes", bytes.len())));
    }
    let digest = Digest::of(&bytes);
    if let Some(pinned) = reference.digest()
        && pinned != digest.as_str()
    {
        return Err(BundleError::Digest(format!("the registry sent manifest {digest} for {pinned}")));
    }
    Ok((bytes, digest))
}

/// Pushes bundle `name` from `store` to `target` (its tag or digest names the manifest).
pub async fn push(store: &Store, name: &str, target: &Reference, auth: &Auth) -> Result<Transfer, BundleError> {
    let built = super::open(store, name)?;
    let client = client(target);
    client.auth(target, &auth.oci(), RegistryOperation::Push).await.map_err(|e| registry_error("authenticating", e))?;
    let mut transfer = Transfer::default();
    let blobs: Vec<&super::Descriptor> =
        std::iter::once(&built.manifest.config).chain(&built.manifest.layers).collect();
    let total = blobs.len();
    for (i, blob) in blobs.into_iter().enumerate() {
        let digest = Digest::parse(&blob.digest)?;
        // Already in the repository (a one-byte range read answers): not sent again, so an
        // update moves only what changed.
        if client.pull_blob_stream_partial(target, digest.as_str(), 0, Some(1)).await.is_ok() {
            transfer.skipped += 1;
            continue;
        }
        // Blobs are read whole: the largest is one model file.
        let bytes = store.read(&digest, u64::MAX)?;
        tracing::info!(blob = i + 1, of = total, bytes = bytes.len(), digest = %digest, "pushing");
        client
            .push_blob(target, &bytes, digest.as_str())
            .await
            .map_err(|e| registry_error(&format!("pushing {digest}"), e))?;
        transfer.blobs += 1;
        transfer.bytes += bytes.len() as u64;
    }
    let manifest = store.read(&built.digest, MAX_METADATA)?;
    let content_type = MANIFEST_MEDIA_TYPE.parse().map_err(|e| registry_error("content type", e))?;
    client
        .push_manifest_raw(target, manifest, content_type)
        .await
        .map_err(|e| registry_error("pushing the manifest", e))?;
    tracing::info!(target = %target, digest = %built.digest, "pushed");
    Ok(transfer)
}

/// Pulls bundle `source` into `store` (tagged `local_name`); the manifest's digest. With
/// `trusted` keys, the bundle must carry a signature by one of them, checked before any blob
/// is fetched: an unsigned or wrongly signed bundle is never staged.
pub async fn pull(
    store: &Store,
    source: &Reference,
    local_name: &str,
    auth: &Auth,
    trusted: Option<&[p256::ecdsa::VerifyingKey]>,
) -> Result<(Digest, Transfer), BundleError> {
    let client = client(source);
    client.auth(source, &auth.oci(), RegistryOperation::Pull).await.map_err(|e| registry_error("authenticating", e))?;
    let (bytes, digest) = fetch_manifest(&client, source, auth).await?;
    let manifest = Manifest::parse(&bytes)?;
    if let Some(keys) = trusted {
        super::sign::verify(source, &digest, keys, auth).await?;
        tracing::info!(source = %source, digest = %digest, "signature verified");
    }
    let mut transfer = Transfer::default();
    let blobs: Vec<&super::Descriptor> = std::iter::once(&manifest.config).chain(&manifest.layers).collect();
    let total = blobs.len();
    for (i, blob) in blobs.into_iter().enumerate() {
        let d = Digest::parse(&blob.digest)?;
        if store.has(&d) {
            store.touch(&d);
            transfer.skipped += 1;
            continue;
        }
        tracing::info!(blob = i + 1, of = total, bytes = blob.size, digest = %d, "pulling");
        let mut ingest = store.ingest(&d, blob.size)?;
        let mut stream = client
            .pull_blob_stream(source, d.as_str())
            .await
            .map_err(|e| registry_error(&format!("pulling {d}"), e))?;
        while let Some(chunk) = stream.stream.next().await {
            let chunk = chunk.map_err(|e| {
                // The client checks the digest as the stream ends: bytes that do not match are
                // a refusal, not an outage to retry.
                let mismatch = e.get_ref().is_some_and(|i| i.is::<oci_client::errors::DigestError>());
                if mismatch {
                    BundleError::Digest(format!("{d}: {e}"))
                } else {
                    registry_error(&format!("pulling {d}"), e)
                }
            })?;
            std::io::Write::write_all(&mut ingest, &chunk).map_err(|e| BundleError::Digest(e.to_string()))?;
        }
        ingest.commit()?;
        transfer.blobs += 1;
        transfer.bytes += blob.size;
    }
    // The manifest last: a bundle is visible only once every blob it names is here.
    store.put_bytes(&bytes)?;
    store.tag(local_name, &digest, bytes.len() as u64)?;
    tracing::info!(source = %source, digest = %digest, blobs = transfer.blobs, bytes = transfer.bytes, "pulled");
    Ok((digest, transfer))
}

#[cfg(test)]
mod tests {
    #[test]
    fn plain_http_only_for_loopback() {
        for r in ["127.0.0.1:5000", "localhost:5000", "localhost", "[::1]:5000"] {
            assert!(super::is_loopback(r), "{r}");
        }
        for r in ["registry.example.com", "10.0.0.1:5000", "127.0.0.1.evil.com:5000", "ghcr.io"] {
            assert!(!super::is_loopback(r), "{r}");
        }
    }
}
