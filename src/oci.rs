//! OCI vocabulary that both the image builder and the registry client speak: an image's metadata
//! (manifest and config), platform choice in an index, descriptor digests and tag syntax. It sits
//! below both, so neither has to import the other.

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use crate::digest::Digest;

/// An image's manifest and config, read from a layout or a registry (the config is kept as JSON
/// so that settings this tool does not know survive a rebuild).
#[derive(Clone, Debug)]
pub struct ImageMetadata {
    pub manifest_digest: Digest,
    pub manifest: ImageManifest,
    pub config: serde_json::Value,
}

/// The linux/amd64 image of an index: the platform workerd's npm binary runs on.
pub fn linux_amd64(index: &ImageIndex) -> Option<&Descriptor> {
    index.manifests().iter().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| p.os().to_string() == "linux" && p.architecture().to_string() == "amd64")
    })
}

pub fn descriptor_digest(descriptor: &Descriptor) -> Result<Digest, String> {
    let text = descriptor.digest().to_string();
    Digest::parse(&text).ok_or_else(|| format!("unsupported digest {text:?} (only sha256 is supported)"))
}

/// A tag as the distribution spec allows it: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn check_tag(tag: &str) -> Result<(), String> {
    let b = tag.as_bytes();
    let valid = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if !valid {
        return Err(format!("tag {tag:?} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"));
    }
    Ok(())
}
