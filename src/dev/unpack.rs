//! Unpacking an image into a root filesystem on disk, for the local runner: each layer in order,
//! from an OCI layout or a registry, into a staging directory renamed into place when whole.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::build::Target;
use crate::digest::Digest;
use crate::image::layout::Layout;
use crate::oci::{descriptor_digest, ImageMetadata};
use crate::registry::pull::{fetch_blob, fetch_image};
use crate::registry::Registries;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("image {image}: {message}")]
    Image { image: String, message: String },
    #[error("cannot unpack into {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// An unpacked image: its root filesystem and its config.
#[derive(Clone, Debug)]
pub struct Unpacked {
    pub rootfs: PathBuf,
    pub config: serde_json::Value,
}

/// Unpacks `image` (`oci:DIR@sha256:...` or `HOST/REPO@sha256:...`) under `cache`, once per
/// digest: a second call finds it there.
pub async fn unpack(image: &str, cache: &Path, registries: &Registries) -> Result<Unpacked, UnpackError> {
    let fail = |message: String| UnpackError::Image { image: image.to_owned(), message };
    let (target, digest) = Target::parse_image(image).map_err(fail)?;
    let root = cache.join(digest.hex());
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| UnpackError::Io { path, source }
    };
    let metadata = read_metadata(&target, &digest, registries).await.map_err(fail)?;
    if root.join("rootfs").exists() {
        return Ok(Unpacked { rootfs: root.join("rootfs"), config: metadata.config });
    }
    let staging = cache.join(format!(".{}.partial-{}", digest.hex(), std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(staging.join("rootfs")).map_err(io(&staging))?;
    for layer in metadata.manifest.layers() {
        let layer_digest = descriptor_digest(layer).map_err(fail)?;
        let bytes = read_blob(&target, &layer_digest, registries).await.map_err(fail)?;
        let rootfs = staging.join("rootfs");
        tokio::task::spawn_blocking(move || extract(&bytes, &rootfs))
            .await
            .map_err(|e| fail(format!("unpacking stopped: {e}")))?
            .map_err(|e| fail(format!("layer {layer_digest}: {e}")))?;
    }
    fs::create_dir_all(cache).map_err(io(cache))?;
    fs::rename(&staging, &root).map_err(io(&root))?;
    Ok(Unpacked { rootfs: root.join("rootfs"), config: metadata.config })
}

async fn read_metadata(
    target: &Target,
    digest: &Digest,
    registries: &Registries,
) -> Result<ImageMetadata, String> {
    match target {
        Target::Layout(dir) => {
            let layout = Layout::open(dir).map_err(|e| e.to_string())?;
            layout.image_by_digest(digest).map_err(|e| e.to_string())
        }
        Target::Registry(r) => {
            let client = registries.client(&r.registry).map_err(|e| e.to_string())?;
            fetch_image(&client, &r.repository, digest.as_str()).await.map_err(|e| crate::error_chain(&e))
        }
    }
}

async fn read_blob(target: &Target, digest: &Digest, registries: &Registries) -> Result<Bytes, String> {
    match target {
        Target::Layout(dir) => {
            let path = dir.join("blobs/sha256").join(digest.hex());
            let bytes = tokio::fs::read(&path).await.map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(Bytes::from(bytes))
        }
        Target::Registry(r) => {
            let client = registries.client(&r.registry).map_err(|e| e.to_string())?;
            fetch_blob(&client, &r.repository, digest).await.map_err(|e| crate::error_chain(&e))
        }
    }
}

/// Extracts a gzipped tar layer over `rootfs`. `unpack_in` refuses entries that would land
/// outside it; our images hold no whiteouts, so none are interpreted.
fn extract(gzipped: &[u8], rootfs: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gzipped));
    archive.set_preserve_permissions(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        entry.unpack_in(rootfs)?;
    }
    let mut rest = Vec::new();
    archive.into_inner().read_to_end(&mut rest)?;
    Ok(())
}
