//! Reading from a registry: manifests (with platform selection), configs and blobs, every byte
//! checked against its digest; and deleting an image by digest.

use bytes::Bytes;
use oci_spec::image::{ImageIndex, ImageManifest};
use reqwest::header::ACCEPT;
use reqwest::{Method, StatusCode};

use super::client::{RegistryClient, Req};
use super::RegistryError;
use crate::digest::Digest;
use crate::oci::{descriptor_digest, linux_amd64, ImageMetadata};

pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

const INDEX_TYPES: [&str; 2] =
    ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];

fn protocol(client: &RegistryClient, message: String) -> RegistryError {
    RegistryError::Protocol { registry: client.registry().into(), message }
}

/// GETs a manifest by tag or digest; returns its bytes and digest. A digest reference is verified.
pub async fn fetch_manifest(
    client: &RegistryClient,
    repo: &str,
    reference: &str,
) -> Result<(Bytes, Digest), RegistryError> {
    client.want_scope(repo, "pull");
    let req =
        Req::new(Method::GET, format!("/v2/{repo}/manifests/{reference}")).header(ACCEPT, MANIFEST_ACCEPT);
    let response = client.send(&req).await?;
    if response.status() != StatusCode::OK {
        return Err(client.status_error(&req, response, 1).await);
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| protocol(client, format!("reading manifest {repo}:{reference}: {e}")))?;
    let digest = Digest::of(&bytes);
    if reference.starts_with("sha256:") && reference != digest.as_str() {
        return Err(protocol(client, format!("manifest {repo}@{reference} arrived with digest {digest}")));
    }
    Ok((bytes, digest))
}

/// GETs a blob and checks its digest.
pub async fn fetch_blob(
    client: &RegistryClient,
    repo: &str,
    digest: &Digest,
) -> Result<Bytes, RegistryError> {
    client.want_scope(repo, "pull");
    let req = Req::new(Method::GET, format!("/v2/{repo}/blobs/{digest}"));
    let response = client.send(&req).await?;
    if response.status() != StatusCode::OK {
        return Err(client.status_error(&req, response, 1).await);
    }
    let bytes =
        response.bytes().await.map_err(|e| protocol(client, format!("reading blob {digest}: {e}")))?;
    if Digest::of(&bytes) != *digest {
        return Err(protocol(client, format!("blob {digest} arrived with different content")));
    }
    Ok(bytes)
}

/// The image's manifest and config; an index resolves to its linux/amd64 image.
pub async fn fetch_image(
    client: &RegistryClient,
    repo: &str,
    reference: &str,
) -> Result<ImageMetadata, RegistryError> {
    let (mut bytes, mut digest) = fetch_manifest(client, repo, reference).await?;
    let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
        .unwrap_or_default();
    if INDEX_TYPES.contains(&media_type.as_str()) {
        let index: ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|e| protocol(client, format!("image index {digest}: {e}")))?;
        let chosen = linux_amd64(&index)
            .ok_or_else(|| protocol(client, format!("image index {digest} has no linux/amd64 image")))?;
        (bytes, digest) = fetch_manifest(client, repo, chosen.digest().as_ref()).await?;
    }
    let manifest: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| protocol(client, format!("manifest {digest} is not an image manifest: {e}")))?;
    let config_digest = descriptor_digest(manifest.config()).map_err(|m| protocol(client, m))?;
    let config_bytes = fetch_blob(client, repo, &config_digest).await?;
    let config = serde_json::from_slice(&config_bytes)
        .map_err(|e| protocol(client, format!("image config {config_digest}: {e}")))?;
    Ok(ImageMetadata { manifest_digest: digest, manifest, config })
}

/// Deletes a manifest by digest (registries refuse deletion by tag). A manifest already gone is
/// not an error.
pub async fn delete_image(
    client: &RegistryClient,
    repo: &str,
    digest: &Digest,
) -> Result<bool, RegistryError> {
    client.want_scope(repo, "delete");
    let req = Req::new(Method::DELETE, format!("/v2/{repo}/manifests/{digest}"));
    let response = client.send(&req).await?;
    match response.status() {
        StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        _ => Err(client.status_error(&req, response, 1).await),
    }
}
