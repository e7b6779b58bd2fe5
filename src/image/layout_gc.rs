//! Garbage collection of an OCI image layout: deleting an image (the controller's purge) removes
//! its tags and its manifest, but its config and layers stay, since another image may share them.
//! Without this, a layout that takes every redeploy of `workerbundle dev` only grows.

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, SystemTime};

use oci_spec::image::ImageManifest;

use super::layout::{Layout, LayoutError};
use crate::digest::Digest;

/// What a collection removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub blobs: usize,
    pub bytes: u64,
}

impl Layout {
    /// Removes the blobs that no manifest of `index.json` references (itself, its config, its
    /// layers) and that are older than `grace`. The grace keeps what a writer put there for an
    /// image not yet in the index (a release's layer, written before its bundle's manifest).
    /// Anything unreadable stops the collection before it removes a thing.
    pub fn collect_garbage(&self, grace: Duration) -> Result<Collected, LayoutError> {
        let mut live = BTreeSet::new();
        for descriptor in self.index()?.manifests() {
            let digest = Digest::parse(descriptor.digest().as_ref()).ok_or_else(|| LayoutError::Invalid {
                dir: self.dir().to_path_buf(),
                message: format!(
                    "index.json lists {}, not a sha256 digest: nothing collected",
                    descriptor.digest()
                ),
            })?;
            let bytes = fs::read(self.blob_path(&digest)).map_err(|source| LayoutError::Read {
                dir: self.dir().to_path_buf(),
                what: format!("manifest {digest}"),
                source,
            })?;
            let manifest: ImageManifest =
                serde_json::from_slice(&bytes).map_err(|e| LayoutError::Invalid {
                    dir: self.dir().to_path_buf(),
                    message: format!("manifest {digest} is not an image manifest ({e}): nothing collected"),
                })?;
            live.insert(digest.hex().to_owned());
            for referenced in std::iter::once(manifest.config()).chain(manifest.layers()) {
                let hex = referenced.digest().as_ref().trim_start_matches("sha256:").to_owned();
                live.insert(hex);
            }
        }
        let blobs = self.dir().join("blobs/sha256");
        let entries = fs::read_dir(&blobs).map_err(|source| LayoutError::Read {
            dir: self.dir().to_path_buf(),
            what: "blobs/sha256".into(),
            source,
        })?;
        let now = SystemTime::now();
        let mut collected = Collected::default();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if live.contains(&name) {
                continue;
            }
            let Ok(metadata) = entry.metadata() else { continue };
            let age = metadata.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
            if !metadata.is_file() || age < grace {
                continue;
            }
            if fs::remove_file(entry.path()).is_ok() {
                collected.blobs += 1;
                collected.bytes += metadata.len();
            }
        }
        Ok(collected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::layer::LayerBuilder;
    use crate::image::layout::LayoutWriter;

    /// Writes a one-layer image holding `content` under `tag`; returns its manifest digest.
    fn image(dir: &std::path::Path, content: &[u8], tag: &str) -> Digest {
        let mut layer = LayerBuilder::new();
        layer.file("a.txt", content.to_vec(), 0o644);
        let packaged = crate::base_image::package_image(
            &[crate::base_image::PackagedLayer { role: "test", layer: &layer, created_by: "test".into() }],
            &crate::base_image::Recipe::parse(crate::base_image::BUILTIN_RECIPE).unwrap().config,
            &crate::base_image::ImageLabels {
                title: "t".into(),
                version: "1".into(),
                description: "d".into(),
            },
            0,
        )
        .unwrap();
        let digest = packaged.manifest.digest.clone();
        packaged.write_layout(LayoutWriter::begin(dir).unwrap(), tag).unwrap();
        digest
    }

    #[test]
    fn only_blobs_no_manifest_references_go_and_only_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layout");
        let old = image(&path, b"old", "old");
        let kept = image(&path, b"kept", "kept");
        let layout = Layout::open(&path).unwrap();
        let before = fs::read_dir(path.join("blobs/sha256")).unwrap().count();
        assert!(layout.delete_image(&old).unwrap());
        // Within the grace: nothing goes (a writer may be about to reference it).
        assert_eq!(layout.collect_garbage(Duration::from_secs(3600)).unwrap(), Collected::default());
        let collected = layout.collect_garbage(Duration::ZERO).unwrap();
        assert_eq!(collected.blobs, 2, "the old image's config and layer");
        let after = fs::read_dir(path.join("blobs/sha256")).unwrap().count();
        assert_eq!(after, before - 3, "manifest, config, layer of the deleted image");
        // The image that stays is whole.
        let metadata = layout.image_by_digest(&kept).unwrap();
        for layer in metadata.manifest.layers() {
            let digest = Digest::parse(layer.digest().as_ref()).unwrap();
            assert!(layout.blob_path(&digest).exists(), "{digest} of the kept image was collected");
        }
        assert_eq!(layout.collect_garbage(Duration::ZERO).unwrap(), Collected::default(), "a second pass");
    }
}
