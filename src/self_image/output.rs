//! Where `self-image` writes: an OCI layout (all-or-nothing) or a registry. Opened BEFORE the
//! image is assembled, so an unusable path, a missing tag, a refused plain-HTTP host or an
//! unreachable registry is reported at once rather than after seconds of assembly.

use crate::base_image::PackagedImage;
use crate::image::layout::LayoutWriter;
use crate::image::reference::ImageRef;
use crate::registry::push::{learn_repository, push_blob_if_missing};
use crate::registry::{push_image, PushReport, Registries, RegistryRef};

use super::SelfImageError;

pub enum Destination {
    Layout { writer: LayoutWriter, tag: String },
    // Boxed: a registry client set is several times the size of a layout writer.
    Registry { out: RegistryRef, tag: String, registries: Box<Registries> },
}

impl Destination {
    /// Checks `output` and prepares to write there: a layout directory is staged (or found to be
    /// an existing layout), a registry is asked once what the tag holds now (which also proves it
    /// is reachable and the credentials work).
    pub async fn open(output: &ImageRef, registries: Registries) -> Result<Self, SelfImageError> {
        match output {
            ImageRef::Layout { dir, tag: Some(tag) } => {
                Ok(Destination::Layout { writer: LayoutWriter::begin(dir)?, tag: tag.clone() })
            }
            ImageRef::Registry(out) if out.digest.is_none() && out.tag.is_some() => {
                let tag = out.tag.clone().unwrap_or_default();
                let client = registries.client(&out.registry)?;
                learn_repository(&client, &registries.memory(&out.registry), &out.repository, &tag).await?;
                Ok(Destination::Registry { out: out.clone(), tag, registries: Box::new(registries) })
            }
            _ => Err(SelfImageError::Invalid(format!(
                "--output {output} must be oci:DIR:TAG or docker://HOST[:PORT]/REPO:TAG (a tag, no digest)"
            ))),
        }
    }

    /// Writes the image. For a registry: each blob is HEADed before it is sent (unless the tag's
    /// current manifest names it), so pushing the same runtime under a new tag uploads only the
    /// binary's layer and the config, and the same image under another tag only its manifest;
    /// the manifest goes last.
    pub async fn write(self, image: &PackagedImage) -> Result<Option<PushReport>, SelfImageError> {
        match self {
            Destination::Layout { writer, tag } => {
                image.write_layout(writer, &tag)?;
                Ok(None)
            }
            Destination::Registry { out, tag, registries } => {
                let client = registries.client(&out.registry)?;
                let memory = registries.memory(&out.registry);
                let before = client.request_count();
                let mut uploaded = 0;
                for blob in image.layers.iter().chain([&image.config]) {
                    let sent = push_blob_if_missing(
                        &client,
                        &memory,
                        &out.repository,
                        &blob.digest,
                        blob.bytes.clone(),
                        true,
                    )
                    .await?;
                    uploaded += usize::from(sent);
                }
                let (pushed, mut report) = push_image(
                    &client,
                    &memory,
                    &out.repository,
                    &tag,
                    image.push_blobs(),
                    image.manifest.media_type.as_ref(),
                    image.manifest.bytes.clone(),
                )
                .await?;
                if pushed != image.manifest.digest {
                    return Err(SelfImageError::DigestMoved {
                        pushed,
                        assembled: image.manifest.digest.clone(),
                    });
                }
                // The blobs sent above count as uploads, not as blobs push_image found there.
                report.uploaded += uploaded;
                report.skipped -= uploaded.min(report.skipped);
                report.requests = client.request_count() - before;
                Ok(Some(report))
            }
        }
    }
}
