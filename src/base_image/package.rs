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
use crate::image::assemble::{AssembleError, Blob};
use crate::image::canonical::{rfc3339, to_canonical_json};
use crate::image::layer::{LayerBuilder, MEDIA_TYPE_LAYER_GZIP};
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

/// Writes the layers, builds the config (the recipe's process settings, `created` and every
/// history entry from `source_date_epoch`) and the manifest.
pub fn package_image(
    layers: &[PackagedLayer<'_>],
    settings: &ImageSettings,
    labels: &ImageLabels,
    source_date_epoch: i64,
) -> Result<PackagedImage, AssembleError> {
    let created = rfc3339(source_date_epoch).ok_or(AssembleError::Epoch(source_date_epoch))?;
    let mtime = u64::try_from(source_date_epoch).map_err(|_| AssembleError::Epoch(source_date_epoch))?;

    let mut blobs = Vec::with_capacity(layers.len());
    let mut diff_ids = Vec::with_capacity(layers.len());
    for packaged in layers {
        let (digests, bytes) = packaged.layer.to_blob(mtime).map_err(AssembleError::Layer)?;
        info!(layer = packaged.role, digest = %digests.digest, size = digests.size, "layer assembled");
        diff_ids.push(digests.diff_id.to_string());
        blobs.push(Blob {
            media_type: MediaType::Other(MEDIA_TYPE_LAYER_GZIP.into()),
            digest: digests.digest,
            bytes,
        });
    }

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
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.descriptor()?)
        .layers(blobs.iter().map(Blob::descriptor).collect::<Result<Vec<_>, _>>()?)
        .annotations(annotations)
        .build()
        .map_err(|e| AssembleError::Serialize(e.to_string()))?;
    let manifest =
        Blob::from_bytes(MediaType::ImageManifest, to_canonical_json(&manifest).map_err(serialize)?);
    let manifest_descriptor = manifest.descriptor()?;
    Ok(PackagedImage { layers: blobs, config, manifest, manifest_descriptor })
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
