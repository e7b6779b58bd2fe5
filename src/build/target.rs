//! Where the controller puts an account's worker layers and bundle images: a registry repository
//! (`HOST[:PORT]/PATH`), or an OCI image layout on disk (`oci:DIR`) for air-gapped sites and for
//! `workerbundle dev`. Both are content-addressed; images are referenced by digest either way:
//! `HOST/PATH@sha256:...` or `oci:DIR@sha256:...`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::bundle::BundleWorkerLayer;
use super::{BaseSource, BuildError, ResolvedBase};
use crate::digest::Digest;
use crate::image::assemble::AssembledImage;
use crate::image::layout::{Layout, LayoutWriter};
use crate::oci::descriptor_digest;
use crate::registry::pull::{delete_image, fetch_blob};
use crate::registry::push::{keep_sessions, push_blob_if_missing};
use crate::registry::{Registries, RegistryRef};

/// Writes to layouts go one at a time: `index.json` is read, changed and replaced as a whole.
static LAYOUT_WRITES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Registry(RegistryRef),
    Layout(PathBuf),
}

impl Target {
    /// `oci:DIR` or `HOST[:PORT]/PATH`.
    pub fn parse(repository: &str) -> Result<Target, String> {
        match repository.strip_prefix("oci:") {
            Some("") => Err(format!("{repository:?} names no directory")),
            Some(dir) => Ok(Target::Layout(PathBuf::from(dir))),
            None => RegistryRef::parse(repository).map(Target::Registry),
        }
    }

    /// The image with manifest `digest` in this target, as a Deployment names it.
    pub fn image_ref(&self, digest: &Digest) -> String {
        match self {
            Target::Registry(r) => format!("{}/{}@{digest}", r.registry, r.repository),
            Target::Layout(dir) => format!("oci:{}@{digest}", dir.display()),
        }
    }

    /// Splits an image reference by digest into its target and digest.
    pub fn parse_image(image: &str) -> Result<(Target, Digest), String> {
        let (repository, digest) =
            image.rsplit_once('@').ok_or_else(|| format!("{image} is not a reference by digest"))?;
        let digest = Digest::parse(digest).ok_or_else(|| format!("{image} has no sha256 digest"))?;
        Ok((Target::parse(repository)?, digest))
    }

    /// Opens `count` upload sessions of the repository while the caller reads and builds a
    /// layer, so that each blob it then sends goes up with one request (see [`keep_sessions`]).
    /// Nothing to do for a layout; a failure is left to the upload, which opens its own session.
    pub async fn open_upload_sessions(&self, registries: &Registries, count: usize) {
        if let Target::Registry(r) = self {
            if let Ok(client) = registries.client(&r.registry) {
                keep_sessions(&client, &registries.memory(&r.registry), &r.repository, count).await;
            }
        }
    }

    /// After a layer went up alone: opens, in the background, the session the bundle's image
    /// config will use a debounce later (see [`keep_sessions`]).
    pub fn open_upload_session_for_next_push(&self, registries: Arc<Registries>) {
        let target = self.clone();
        tokio::spawn(async move { target.open_upload_sessions(&registries, 1).await });
    }

    /// Makes sure a blob (a worker's layer, a bundle's next image config) is there (known,
    /// present, or uploaded); `true` when it was uploaded. A registry is asked first (one HEAD)
    /// only when the blob is `likely_present`, e.g. a layer recorded by an earlier build.
    pub async fn put_blob(
        &self,
        registries: &Registries,
        digest: &Digest,
        bytes: Bytes,
        likely_present: bool,
    ) -> Result<bool, BuildError> {
        match self {
            Target::Registry(r) => {
                let client = registries.client(&r.registry)?;
                let memory = registries.memory(&r.registry);
                Ok(push_blob_if_missing(&client, &memory, &r.repository, digest, bytes, likely_present)
                    .await?)
            }
            Target::Layout(dir) => {
                let _one_at_a_time = LAYOUT_WRITES.lock().await;
                let layout = Layout::open_or_create(dir).map_err(BuildError::Output)?;
                let writer = LayoutWriter::begin(layout.dir()).map_err(BuildError::Output)?;
                writer.put_blob(digest, &bytes).map_err(BuildError::Output)?;
                Ok(true)
            }
        }
    }

    /// Writes a bundle's image into a layout under `tag`: the base's layers, the config layer,
    /// the image config and the manifest (the workers' layers are there from their releases).
    pub async fn write_layout_image(
        dir: &Path,
        image: &AssembledImage,
        base: &ResolvedBase,
        workers: &[BundleWorkerLayer],
        tag: &str,
        registries: &Registries,
    ) -> Result<(), BuildError> {
        let _one_at_a_time = LAYOUT_WRITES.lock().await;
        let layout = Layout::open_or_create(dir).map_err(BuildError::Output)?;
        let writer = LayoutWriter::begin(layout.dir()).map_err(BuildError::Output)?;
        for w in workers {
            if !layout.blob_path(&w.worker.layer.digest).exists() {
                return Err(BuildError::Invalid(format!(
                    "worker {}'s layer {} is not in {}: was its release built into another target?",
                    w.worker.served.name,
                    w.worker.layer.digest,
                    dir.display()
                )));
            }
        }
        for layer in base.image.manifest.layers() {
            let digest = descriptor_digest(layer).map_err(BuildError::Invalid)?;
            if layout.blob_path(&digest).exists() {
                continue;
            }
            match &base.source {
                BaseSource::Layout(from) => writer.copy_blob(from, layer).map_err(BuildError::Output)?,
                BaseSource::Registry(r) => {
                    let client = registries.client(&r.registry)?;
                    let bytes = fetch_blob(&client, &r.repository, &digest).await?;
                    writer.put_blob(&digest, &bytes).map_err(BuildError::Output)?;
                }
            }
        }
        for blob in [&image.config_layer.blob, &image.config, &image.manifest] {
            writer.put_blob(&blob.digest, &blob.bytes).map_err(BuildError::Output)?;
        }
        writer.commit(tag, &image.manifest_descriptor()?).map_err(BuildError::Output)
    }

    /// Deletes the image with manifest `digest`; returns whether it was there.
    pub async fn delete_image(&self, registries: &Registries, digest: &Digest) -> Result<bool, BuildError> {
        match self {
            Target::Registry(r) => {
                let client = registries.client(&r.registry)?;
                Ok(delete_image(&client, &r.repository, digest).await?)
            }
            Target::Layout(dir) => {
                let _one_at_a_time = LAYOUT_WRITES.lock().await;
                match Layout::open(dir) {
                    Ok(layout) => layout.delete_image(digest).map_err(BuildError::Output),
                    Err(_) => Ok(false),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_registries_layouts_and_images_by_digest() {
        let digest = Digest::of(b"m");
        let layout = Target::parse("oci:data/images/1234").unwrap();
        assert_eq!(layout, Target::Layout("data/images/1234".into()));
        let image = layout.image_ref(&digest);
        assert_eq!(image, format!("oci:data/images/1234@{digest}"));
        assert_eq!(Target::parse_image(&image).unwrap(), (layout, digest.clone()));
        let registry = Target::parse("127.0.0.1:5000/workers/1234").unwrap();
        let image = registry.image_ref(&digest);
        assert_eq!(image, format!("127.0.0.1:5000/workers/1234@{digest}"));
        assert_eq!(Target::parse_image(&image).unwrap().0, registry);
        assert!(Target::parse("oci:").is_err());
        assert!(Target::parse_image("127.0.0.1:5000/workers/1234:tag").is_err());
    }

    #[tokio::test]
    async fn a_layout_target_gains_layers_one_by_one_and_loses_images_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::Layout(dir.path().join("acct"));
        let registries = Registries::new(Default::default());
        let bytes = Bytes::from_static(b"layer");
        target.put_blob(&registries, &Digest::of(&bytes), bytes.clone(), false).await.unwrap();
        target.put_blob(&registries, &Digest::of(&bytes), bytes.clone(), false).await.unwrap();
        let layout = Layout::open(&dir.path().join("acct")).unwrap();
        assert!(layout.blob_path(&Digest::of(&bytes)).exists());
        assert!(layout.index().unwrap().manifests().is_empty());
        assert!(target.delete_image(&registries, &Digest::of(&bytes)).await.unwrap());
        assert!(!target.delete_image(&registries, &Digest::of(&bytes)).await.unwrap());
    }
}
