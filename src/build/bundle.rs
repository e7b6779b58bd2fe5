//! A bundle's image, as the controller builds it: the base's layers, each worker's layer (built
//! and pushed once, when its release was built) and a fresh config layer. Assembly is pure and
//! cheap, so the controller can tell whether the image changed before it sends anything; the push
//! then sends only what the repository lacks: the config layer, the image config and the manifest.

use super::pipeline::push_manifest;
use super::{BuildError, ResolvedBase};
use crate::image::assemble::{assemble, AssembleOptions, AssembledImage, ImageWorker};
use crate::registry::pull::fetch_blob;
use crate::registry::{BlobSource, PushBlob, PushReport, Registries, RegistryRef};

/// One worker of a bundle's image, and the repository (`registry/path`) its layer was pushed to.
#[derive(Clone, Debug)]
pub struct BundleWorkerLayer {
    pub worker: ImageWorker,
    pub repository: String,
}

/// Assembles a bundle's image without sending anything.
pub fn assemble_bundle(
    base: &ResolvedBase,
    workers: &[BundleWorkerLayer],
    options: &AssembleOptions,
) -> Result<AssembledImage, BuildError> {
    let entries: Vec<ImageWorker> = workers.iter().map(|w| w.worker.clone()).collect();
    Ok(assemble(&base.image, &entries, options)?)
}

/// Pushes an assembled bundle image to `target` under `tag`.
pub async fn push_bundle(
    image: &AssembledImage,
    base: &ResolvedBase,
    workers: &[BundleWorkerLayer],
    target: &RegistryRef,
    tag: &str,
    registries: &Registries,
) -> Result<PushReport, BuildError> {
    let mut blobs = base.push_blobs(target, registries).await?;
    for w in workers {
        let from = RegistryRef::parse(&w.repository).map_err(BuildError::Invalid)?;
        let layer = &w.worker.layer;
        let source = if from.registry == target.registry {
            // Same repository: there already (the push skips it); another one: mounted.
            BlobSource::Repository(from.repository)
        } else {
            let client = registries.client(&from.registry)?;
            BlobSource::Memory(fetch_blob(&client, &from.repository, &layer.digest).await?)
        };
        blobs.push(PushBlob { digest: layer.digest.clone(), size: layer.size, source });
    }
    let config_layer = &image.config_layer.blob;
    for blob in [config_layer, &image.config] {
        blobs.push(PushBlob {
            digest: blob.digest.clone(),
            size: blob.bytes.len() as u64,
            source: BlobSource::Memory(blob.bytes.clone()),
        });
    }
    push_manifest(target, tag, image, blobs, registries).await
}
