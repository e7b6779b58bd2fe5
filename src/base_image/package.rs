//! Layers + settings → the blobs of an image (layers, config, manifest), for the images assembled
//! from package archives: the workerd base image and the controller's own image. Shared so both
//! get the same config shape, history and annotations, all from SOURCE_DATE_EPOCH.

use std::collections::HashMap;

use oci_spec::image::{
    Descriptor, ImageManifestBuilder, MediaType, ANNOTATION_CREATED, ANNOTATION_DESCRIPTION,
    ANNOTATION_TITLE, ANNOTATION_VERSION,
};
use serde_json::json;
use tracing::info;

use super::recipe::ImageSettings;
use crate::digest::Digest;
use crate::image::assemble::{AssembleError, Blob};
use crate::image::canonical::{rfc3339, to_canonical_json};
use crate::image::layer::{LayerBuilder, LayerDigests, MEDIA_TYPE_LAYER_GZIP};
use crate::image::layout::{LayoutError, LayoutWriter};
use crate::registry::{BlobSource, PushBlob};

/// One layer and the history line that says where its files came from.
pub struct PackagedLayer<'a> {
    /// For logs only (`runtime`, `workerd`, `binary`).
    pub role: &'a str,
    pub layer: &'a LayerBuilder,
    pub created_by: String,
}

/// The manifest's annotations besides `created`.
pub struct ImageLabels {
    pub title: String,
    pub version: String,
    pub description: String,
}

/// An image whose every blob is in memory.
pub struct PackagedImage {
    pub layers: Vec<Blob>,
    pub config: Blob,
    pub manifest: Blob,
    manifest_descriptor: Descriptor,
}

/// Writes the layers into memory, builds the config (the recipe's process settings, `created` and
/// every history entry from `source_date_epoch`) and the manifest.
pub fn package_image(
    layers: &[PackagedLayer<'_>],
    settings: &ImageSettings,
    labels: &ImageLabels,
    source_date_epoch: i64,
) -> Result<PackagedImage, AssembleError> {
    let mtime = u64::try_from(source_date_epoch).map_err(|_| AssembleError::Epoch(source_date_epoch))?;
    let mut blobs = Vec::with_capacity(layers.len());
    let mut written = Vec::with_capacity(layers.len());
    for packaged in layers {
        let (digests, bytes) = packaged.layer.to_blob(mtime).map_err(AssembleError::Layer)?;
        info!(layer = packaged.role, digest = %digests.digest, size = digests.size, "layer assembled");
        written.push(digests.clone());
        blobs.push(Blob {
            media_type: MediaType::Other(MEDIA_TYPE_LAYER_GZIP.into()),
            digest: digests.digest,
            bytes,
        });
    }
    let (config, manifest) = config_and_manifest(layers, &written, settings, labels, source_date_epoch)?;
    let manifest_descriptor = manifest.descriptor()?;
    Ok(PackagedImage { layers: blobs, config, manifest, manifest_descriptor })
}

/// An image written into a layout as it was packaged: only the small blobs stay in memory.
pub struct WrittenImage {
    pub digest: Digest,
    manifest: Blob,
}

impl WrittenImage {
    pub fn descriptor(&self) -> Result<Descriptor, AssembleError> {
        self.manifest.descriptor()
    }
}

/// [`package_image`], streaming each layer straight into the layout being written: memory stays
/// bounded whatever the size of the layers' files. The caller commits the tag.
pub fn package_image_into(
    writer: &LayoutWriter,
    layers: &[PackagedLayer<'_>],
    settings: &ImageSettings,
    labels: &ImageLabels,
    source_date_epoch: i64,
) -> Result<WrittenImage, PackageError> {
    let mtime = u64::try_from(source_date_epoch).map_err(|_| AssembleError::Epoch(source_date_epoch))?;
    let mut written = Vec::with_capacity(layers.len());
    for packaged in layers {
        let digests = writer.write_layer(packaged.layer, mtime, None)?;
        info!(layer = packaged.role, digest = %digests.digest, size = digests.size, "layer written");
        written.push(digests);
    }
    let (config, manifest) = config_and_manifest(layers, &written, settings, labels, source_date_epoch)?;
    for blob in [&config, &manifest] {
        writer.put_blob(&blob.digest, &blob.bytes)?;
    }
    Ok(WrittenImage { digest: manifest.digest.clone(), manifest })
}

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error(transparent)]
    Output(#[from] LayoutError),
}

/// The image config and manifest for layers already written.
fn config_and_manifest(
    layers: &[PackagedLayer<'_>],
    written: &[LayerDigests],
    settings: &ImageSettings,
    labels: &ImageLabels,
    source_date_epoch: i64,
) -> Result<(Blob, Blob), AssembleError> {
    let created = rfc3339(source_date_epoch).ok_or(AssembleError::Epoch(source_date_epoch))?;
    let diff_ids: Vec<String> = written.iter().map(|d| d.diff_id.to_string()).collect();
    let mut process = json!({ "Entrypoint": settings.entrypoint, "Env": settings.env });
    if let Some(user) = &settings.user {
        process["User"] = json!(user);
    }
    if let Some(dir) = &settings.working_dir {
        process["WorkingDir"] = json!(dir);
    }
    let history: Vec<_> =
        layers.iter().map(|l| json!({ "created": created, "created_by": l.created_by })).collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": process,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": history,
    });
    let serialize = |e: serde_json::Error| AssembleError::Serialize(e.to_string());
    let config = Blob::from_bytes(MediaType::ImageConfig, to_canonical_json(&config).map_err(serialize)?);
    let annotations: HashMap<String, String> = [
        (ANNOTATION_CREATED, created),
        (ANNOTATION_TITLE, labels.title.clone()),
        (ANNOTATION_VERSION, labels.version.clone()),
        (ANNOTATION_DESCRIPTION, labels.description.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let layer_descriptors = written
        .iter()
        .map(|d| Blob::descriptor_of(MediaType::Other(MEDIA_TYPE_LAYER_GZIP.into()), &d.digest, d.size))
        .collect::<Result<Vec<_>, _>>()?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.descriptor()?)
        .layers(layer_descriptors)
        .annotations(annotations)
        .build()
        .map_err(|e| AssembleError::Serialize(e.to_string()))?;
    let manifest =
        Blob::from_bytes(MediaType::ImageManifest, to_canonical_json(&manifest).map_err(serialize)?);
    Ok((config, manifest))
}

impl PackagedImage {
    /// Writes every blob through `writer` and tags the manifest (all-or-nothing: see
    /// [`LayoutWriter`]).
    pub fn write_layout(&self, writer: LayoutWriter, tag: &str) -> Result<(), LayoutError> {
        for blob in self.layers.iter().chain([&self.config, &self.manifest]) {
            writer.put_blob(&blob.digest, &blob.bytes)?;
        }
        writer.commit(tag, &self.manifest_descriptor)
    }

    /// The layers and the config, to push before the manifest.
    pub fn push_blobs(&self) -> Vec<PushBlob> {
        self.layers
            .iter()
            .chain([&self.config])
            .map(|blob| PushBlob {
                digest: blob.digest.clone(),
                size: blob.bytes.len() as u64,
                source: BlobSource::Memory(blob.bytes.clone()),
            })
            .collect()
    }

    /// Bytes of every blob (what a registry stores for this image).
    pub fn size(&self) -> u64 {
        self.layers.iter().chain([&self.config, &self.manifest]).map(|b| b.bytes.len() as u64).sum()
    }
}
