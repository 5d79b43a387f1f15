//! Cosign-compatible key signatures on bundles.
//!
//! As `cosign sign --key` does: the signed payload is cosign's "simple signing" JSON naming the
//! bundle's manifest digest; the signature is ECDSA P-256 over its SHA-256, DER, base64 in the
//! layer annotation `dev.cosignproject.cosign/signature`; the signature manifest is stored in
//! the bundle's repository under the tag `sha256-<hex>.sig` (distribution 2.8 has no referrers
//! API). Keys are PEM: PKCS#8 private keys, SPKI public keys (what `cosign verify --key` reads).

use base64::Engine as _;
use futures_util::StreamExt as _;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{DerSignature, SigningKey, VerifyingKey};
use p256::pkcs8::{
    DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _, EncodePublicKey as _, LineEnding,
};
use serde_json::{Value, json};

use super::registry::{Auth, client, registry_error};
use super::{BundleError, Digest, MANIFEST_MEDIA_TYPE};
use oci_client::{Reference, RegistryOperation};

/// The payload layer's media type.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation holding the signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Most bytes of a signature payload or manifest read back.
const MAX_SIGNATURE_BYTES: u64 = 64 << 10;

/// A new key pair: (private PKCS#8 PEM, public SPKI PEM).
pub fn keygen() -> Result<(String, String), BundleError> {
    let key = SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let private = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| BundleError::Invalid(format!("key: {e}")))?;
    let public = VerifyingKey::from(&key)
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| BundleError::Invalid(format!("key: {e}")))?;
    Ok((private.to_string(), public))
}

/// Reads a PKCS#8 PEM private key.
pub fn signing_key(pem: &str) -> Result<SigningKey, BundleError> {
    SigningKey::from_pkcs8_pem(pem).map_err(|e| BundleError::Invalid(format!("not a P-256 PKCS#8 private key: {e}")))
}

/// Reads an SPKI PEM public key.
pub fn verifying_key(pem: &str) -> Result<VerifyingKey, BundleError> {
    VerifyingKey::from_public_key_pem(pem).map_err(|e| BundleError::Invalid(format!("not a P-256 public key: {e}")))
}

/// Cosign's simple-signing payload for `digest` in repository `docker_reference`.
pub fn payload(docker_reference: &str, digest: &Digest) -> Vec<u8> {
    json!({
        "critical": {
            "identity": { "docker-reference": docker_reference },
            "image": { "docker-manifest-digest": digest.as_str() },
            "type": "cosign container image signature",
        },
        "optional": null,
    })
    .to_string()
    .into_bytes()
}

/// Signs `payload`: the base64 DER signature.
pub fn sign_payload(key: &SigningKey, payload: &[u8]) -> String {
    let sig: DerSignature = key.sign(payload);
    base64::engine::general_purpose::STANDARD.encode(sig.as_bytes())
}

/// Checks `signature` (base64 DER) over `payload`, and that the payload names `digest`.
pub fn verify_payload(key: &VerifyingKey, payload: &[u8], signature: &str, digest: &Digest) -> Result<(), BundleError> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .map_err(|_| BundleError::Signature("the signature is not base64".into()))?;
    let sig = DerSignature::try_from(der.as_slice())
        .map_err(|_| BundleError::Signature("the signature is not a DER ECDSA signature".into()))?;
    key.verify(payload, &sig).map_err(|_| BundleError::Signature("the signature does not match the key".into()))?;
    let p: Value = serde_json::from_slice(payload).map_err(|_| BundleError::Signature("payload is not JSON".into()))?;
    if p["critical"]["type"] != "cosign container image signature" {
        return Err(BundleError::Signature("not a cosign simple-signing payload".into()));
    }
    let signed = p["critical"]["image"]["docker-manifest-digest"].as_str().unwrap_or_default();
    if signed != digest.as_str() {
        return Err(BundleError::Signature(format!("the signature is for {signed}, not {digest}")));
    }
    Ok(())
}

/// The signature tag of `digest`.
pub fn signature_tag(digest: &Digest) -> String {
    format!("sha256-{}.sig", digest.hex())
}

fn with_tag(reference: &Reference, tag: &str) -> Reference {
    Reference::with_tag(reference.registry().to_string(), reference.repository().to_string(), tag.to_string())
}

/// The manifest digest `reference` names in its registry.
pub async fn remote_digest(reference: &Reference, auth: &Auth) -> Result<Digest, BundleError> {
    Ok(super::registry::fetch_manifest(&client(reference), reference, auth).await?.1)
}

/// Signs the bundle `reference` names in its registry with `key`, storing the signature next
/// to it as cosign does. Returns the signed digest.
pub async fn sign(reference: &Reference, key: &SigningKey, auth: &Auth) -> Result<Digest, BundleError> {
    let digest = remote_digest(reference, auth).await?;
    let docker_reference = format!("{}/{}", reference.registry(), reference.repository());
    let payload = payload(&docker_reference, &digest);
    let signature = sign_payload(key, &payload);
    let payload_digest = Digest::of(&payload);
    let config = json!({
        "architecture": "", "created": "0001-01-01T00:00:00Z", "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "", "rootfs": {"type": "layers", "diff_ids": [payload_digest.as_str()]}, "config": {},
    })
    .to_string()
    .into_bytes();
    let config_digest = Digest::of(&config);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.as_str(), "size": config.len() },
        "layers": [{
            "mediaType": SIMPLE_SIGNING_MEDIA_TYPE,
            "digest": payload_digest.as_str(),
            "size": payload.len(),
            "annotations": { SIGNATURE_ANNOTATION: signature },
        }],
    })
    .to_string()
    .into_bytes();
    let target = with_tag(reference, &signature_tag(&digest));
    let client = client(&target);
    client
        .auth(&target, &auth.oci(), RegistryOperation::Push)
        .await
        .map_err(|e| registry_error("authenticating", e))?;
    for (bytes, d) in [(&payload, &payload_digest), (&config, &config_digest)] {
        client.push_blob(&target, bytes, d.as_str()).await.map_err(|e| registry_error("pushing the signature", e))?;
    }
    let content_type = MANIFEST_MEDIA_TYPE.parse().map_err(|e| registry_error("content type", e))?;
    client
        .push_manifest_raw(&target, manifest, content_type)
        .await
        .map_err(|e| registry_error("pushing the signature manifest", e))?;
    tracing::info!(bundle = %reference, digest = %digest, "signed");
    Ok(digest)
}

/// Verifies that manifest `digest` in `reference`'s repository carries a signature by one of
/// `keys`.
pub async fn verify(
    reference: &Reference,
    digest: &Digest,
    keys: &[VerifyingKey],
    auth: &Auth,
) -> Result<(), BundleError> {
    let target = with_tag(reference, &signature_tag(digest));
    let client = client(&target);
    let (bytes, _) =
        client.pull_manifest_raw(&target, &auth.oci(), &[MANIFEST_MEDIA_TYPE]).await.map_err(|e| match e {
            // The registry could not be asked: an outage to retry, not a verdict on the bundle.
            oci_client::errors::OciDistributionError::RequestError(_)
            | oci_client::errors::OciDistributionError::IoError(_) => {
                super::registry::registry_error("fetching the signature", e)
            }
            oci_client::errors::OciDistributionError::ServerError { code, .. } if code >= 500 => {
                super::registry::registry_error("fetching the signature", e)
            }
            e => BundleError::Signature(format!("no signature for {digest}: {e}")),
        })?;
    if bytes.len() as u64 > MAX_SIGNATURE_BYTES {
        return Err(BundleError::Signature("an oversized signature manifest".into()));
    }
    let manifest: Value =
        serde_json::from_slice(&bytes).map_err(|e| BundleError::Signature(format!("signature manifest: {e}")))?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    let mut last = BundleError::Signature(format!("no signature for {digest}"));
    for layer in layers.iter().take(16) {
        let (Some(sig), Some(layer_digest), Some(size)) =
            (layer["annotations"][SIGNATURE_ANNOTATION].as_str(), layer["digest"].as_str(), layer["size"].as_u64())
        else {
            continue;
        };
        if layer["mediaType"] != SIMPLE_SIGNING_MEDIA_TYPE || size > MAX_SIGNATURE_BYTES {
            continue;
        }
        let layer_digest = Digest::parse(layer_digest)?;
        let mut stream = client
            .pull_blob_stream(&target, layer_digest.as_str())
            .await
            .map_err(|e| registry_error("pulling the signature payload", e))?;
        let mut payload = Vec::new();
        while let Some(chunk) = stream.stream.next().await {
            let chunk = chunk.map_err(|e| registry_error("pulling the signature payload", e))?;
            if (payload.len() + chunk.len()) as u64 > size {
                return Err(BundleError::Signature("the payload is longer than declared".into()));
            }
            payload.extend_from_slice(&chunk);
        }
        if Digest::of(&payload) != layer_digest {
            return Err(BundleError::Digest("the signature payload does not match its digest".into()));
        }
        for key in keys {
            match verify_payload(key, &payload, sig, digest) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_with_their_key_and_digest() {
        let (private, public) = keygen().unwrap();
        let key = signing_key(&private).unwrap();
        let public = verifying_key(&public).unwrap();
        let digest = Digest::of(b"manifest");
        let payload = payload("127.0.0.1:5000/eir/demo", &digest);
        let sig = sign_payload(&key, &payload);
        verify_payload(&public, &payload, &sig, &digest).unwrap();

        let other = verifying_key(&keygen().unwrap().1).unwrap();
        assert!(matches!(verify_payload(&other, &payload, &sig, &digest), Err(BundleError::Signature(_))));
        let elsewhere = Digest::of(b"another manifest");
        assert!(matches!(verify_payload(&public, &payload, &sig, &elsewhere), Err(BundleError::Signature(_))));
        let mut tampered = payload.clone();
        tampered[10] ^= 1;
        assert!(matches!(verify_payload(&public, &tampered, &sig, &digest), Err(BundleError::Signature(_))));
        assert!(matches!(verify_payload(&public, &payload, "%%%", &digest), Err(BundleError::Signature(_))));
        assert!(signing_key("not a key").is_err() && verifying_key(&private).is_err());
    }
}
