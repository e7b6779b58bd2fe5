//! The base image of a build: read from an OCI layout or a registry, and where its layers are
//! copied from when an image over it is written or pushed.

use bytes::Bytes;

use super::BuildError;
use crate::image::layout::{Layout, LayoutWriter};
use crate::image::reference::ImageRef;
use crate::oci::{descriptor_digest, ImageMetadata};
use crate::registry::pull::{fetch_blob, fetch_image};
use crate::registry::{BlobSource, PushBlob, Registries, RegistryRef};

/// Where the base image's blobs are.
#[derive(Clone, Debug)]
pub enum BaseSource {
    Layout(Layout),
    Registry(RegistryRef),
}

/// A base image, read once: where it is, its metadata and its name for the base annotation.
#[derive(Clone, Debug)]
pub struct ResolvedBase {
    pub source: BaseSource,
    pub image: ImageMetadata,
    /// `org.opencontainers.image.base.name` unless the caller names it otherwise.
    pub name: String,
}

impl ResolvedBase {
    /// The base pinned by digest, as a bundle's status records it: `docker://HOST/REPO@sha256:...`
    /// or `oci:DIR@sha256:...`.
    pub fn pinned(&self) -> String {
        match &self.source {
            BaseSource::Layout(layout) => {
                format!("oci:{}@{}", layout.dir().display(), self.image.manifest_digest)
            }
            BaseSource::Registry(r) => {
                format!("docker://{}/{}@{}", r.registry, r.repository, self.image.manifest_digest)
            }
        }
    }

    /// The base's layers as blobs to push to `target`: mounted from the base's repository on the
    /// same registry, read from the layout's files, or fetched from another registry first.
    pub async fn push_blobs(
        &self,
        target: &RegistryRef,
        registries: &Registries,
    ) -> Result<Vec<PushBlob>, BuildError> {
        let mut blobs = Vec::new();
        for layer in self.image.manifest.layers() {
            let digest = descriptor_digest(layer).map_err(BuildError::Invalid)?;
            let source = match &self.source {
                BaseSource::Layout(layout) => BlobSource::File(layout.blob_path(&digest)),
                BaseSource::Registry(r) if r.registry == target.registry => {
                    BlobSource::Repository(r.repository.clone())
                }
                BaseSource::Registry(r) => {
                    let client = registries.client(&r.registry)?;
                    BlobSource::Memory(fetch_blob(&client, &r.repository, &digest).await?)
                }
            };
            blobs.push(PushBlob { digest, size: layer.size(), source });
        }
        Ok(blobs)
    }

    /// Copies the base's layers into a layout being written.
    pub async fn write_layers(
        &self,
        writer: &LayoutWriter,
        registries: &Registries,
    ) -> Result<(), BuildError> {
        for layer in self.image.manifest.layers() {
            match &self.source {
                BaseSource::Layout(layout) => writer.copy_blob(layout, layer).map_err(BuildError::Output)?,
                BaseSource::Registry(r) => {
                    let digest = descriptor_digest(layer).map_err(BuildError::Invalid)?;
                    let client = registries.client(&r.registry)?;
                    let bytes: Bytes = fetch_blob(&client, &r.repository, &digest).await?;
                    writer.put_blob(&digest, &bytes).map_err(BuildError::Output)?;
                }
            }
        }
        Ok(())
    }
}

/// Reads the base image's manifest and config (a registry reference needs a tag or a digest).
pub async fn read_base(reference: &ImageRef, registries: &Registries) -> Result<ResolvedBase, BuildError> {
    match reference {
        ImageRef::Layout { dir, tag } => {
            let layout = Layout::open(dir).map_err(BuildError::Base)?;
            let image = layout.image(tag.as_deref()).map_err(BuildError::Base)?;
            let name = tag.clone().unwrap_or_else(|| image.manifest_digest.to_string());
            Ok(ResolvedBase { source: BaseSource::Layout(layout), image, name })
        }
        ImageRef::Registry(r) => {
            let manifest = r.manifest_reference().ok_or_else(|| {
                BuildError::Invalid(format!("base image {reference} needs a tag or a digest"))
            })?;
            let client = registries.client(&r.registry)?;
            let image = fetch_image(&client, &r.repository, &manifest).await?;
            let name = reference.to_string().trim_start_matches("docker://").to_owned();
            Ok(ResolvedBase { source: BaseSource::Registry(r.clone()), image, name })
        }
    }
}
