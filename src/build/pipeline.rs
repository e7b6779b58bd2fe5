//! The CLI's build: read every worker and the base, check everything, then assemble and write.
//! Nothing is written until every input has been read and validated.

use std::sync::Arc;

use tracing::{debug, info, info_span, Instrument};

use super::base::{read_base, ResolvedBase};
use super::pushed;
use super::{BuildContext, BuildError};
use crate::digest::Digest;
use crate::image::assemble::{
    assemble, build_worker_layer, worker_layer, AssembleOptions, AssembledImage, ImageWorker, LayerRef,
    NewLayer,
};
use crate::image::block_cache::BlockCache;
use crate::image::layer::LayerBuilder;
use crate::image::layout::LayoutWriter;
use crate::image::reference::ImageRef;
use crate::registry::push::prepare_push;
use crate::registry::{push_image, BlobSource, PushBlob, PushReport, Registries, RegistryRef};
use crate::source::{load_workers, WorkerInput};
use crate::worker::ServedWorker;

/// Upload sessions opened while the image is assembled: a push that changes one worker sends two
/// new blobs, its layer and the image config.
const SESSIONS_AHEAD: usize = 2;

#[derive(Clone, Debug)]
pub struct BuildRequest {
    pub base: ImageRef,
    /// `org.opencontainers.image.base.name`; defaults to the base reference (its tag for a layout).
    pub base_name: Option<String>,
    pub workers: Vec<WorkerInput>,
    pub output: ImageRef,
    pub source_date_epoch: i64,
}

#[derive(Clone, Debug)]
pub struct BuildOutcome {
    pub manifest_digest: Digest,
    pub image: AssembledImage,
    /// For registry outputs: what the push cost.
    pub push: Option<PushReport>,
}

/// An assembled image with the worker layers this build made.
struct Built {
    image: AssembledImage,
    worker_layers: Vec<WorkerLayer>,
}

/// A worker layer this build made. A worker with big modules (streamed from disk, never held
/// whole) has its layer written to a file as it is compressed, so that the build's memory stays
/// the same whatever the size of its input.
enum WorkerLayer {
    Memory(NewLayer),
    /// Already in the output layout.
    InLayout(LayerRef),
    /// In a temporary file, removed when the build ends.
    Spooled {
        layer: LayerRef,
        file: tempfile::TempPath,
    },
}

impl WorkerLayer {
    fn layer_ref(&self) -> LayerRef {
        match self {
            WorkerLayer::Memory(layer) => layer.layer_ref(),
            WorkerLayer::InLayout(layer) | WorkerLayer::Spooled { layer, .. } => layer.clone(),
        }
    }
}

/// Makes a worker's layer: in memory, or for big modules into `layout` or a temporary file.
fn make_worker_layer(
    worker: &crate::worker::WorkerCode,
    mtime: u64,
    layout: Option<&LayoutWriter>,
    cache: Option<&Arc<BlockCache>>,
) -> Result<WorkerLayer, BuildError> {
    if !worker.streams_modules() {
        return Ok(WorkerLayer::Memory(build_worker_layer(worker, mtime, cache)?));
    }
    let builder = worker_layer(worker);
    match layout {
        Some(layout) => {
            let digests = layout.write_layer(&builder, mtime, cache).map_err(BuildError::Output)?;
            Ok(WorkerLayer::InLayout(LayerRef::from(&digests)))
        }
        None => spool_layer(&builder, mtime, cache),
    }
}

fn spool_layer(
    builder: &LayerBuilder,
    mtime: u64,
    cache: Option<&Arc<BlockCache>>,
) -> Result<WorkerLayer, BuildError> {
    let spool_err =
        |e: std::io::Error| BuildError::Internal(format!("cannot write a layer to a temporary file: {e}"));
    let file = tempfile::NamedTempFile::new().map_err(spool_err)?;
    let (spool, path) = file.into_parts();
    let (digests, writer) = builder
        .write_cached(std::io::BufWriter::with_capacity(1 << 20, spool), mtime, cache)
        .map_err(spool_err)?;
    writer.into_inner().map_err(|e| spool_err(e.into_error()))?;
    Ok(WorkerLayer::Spooled { layer: LayerRef::from(&digests), file: path })
}

pub async fn build(request: &BuildRequest, context: &BuildContext) -> Result<BuildOutcome, BuildError> {
    let registries = &context.registries;
    let output_tag = match &request.output {
        ImageRef::Layout { tag, .. } => tag.clone(),
        ImageRef::Registry(r) if r.digest.is_none() => r.tag.clone(),
        ImageRef::Registry(_) => None,
    };
    let output_tag = output_tag.ok_or_else(|| {
        BuildError::Invalid(format!("--output {} needs a tag (and no digest)", request.output))
    })?;
    // What the repository holds is learned (one GET of the tag's manifest, and the connection it
    // opens) on its own task from the very start, while the workers and the base are read and the
    // image is assembled, and the upload sessions the new blobs will most likely need are opened
    // then too: those round trips then cost no wall-clock time. Where this machine pushed to the
    // repository lately, the record of that push stands in for the GET.
    let learning = match &request.output {
        ImageRef::Registry(out) => {
            let (registries, out, tag) = (registries.clone(), out.clone(), output_tag.clone());
            let cache = context.block_cache.clone();
            Some(tokio::spawn(
                async move {
                    let client = registries.client(&out.registry)?;
                    let requests_before = client.request_count();
                    let memory = registries.memory(&out.registry);
                    let known =
                        cache.as_deref().and_then(|c| pushed::recall(c, &out.registry, &out.repository));
                    prepare_push(&client, &memory, &out.repository, &tag, known.as_deref(), SESSIONS_AHEAD)
                        .await?;
                    debug!(
                        from_the_last_push = known.is_some(),
                        "repository learned, upload sessions opened"
                    );
                    Ok::<u64, crate::registry::RegistryError>(requests_before)
                }
                .in_current_span(),
            ))
        }
        ImageRef::Layout { .. } => None,
    };
    // An unusable output directory is reported before anything is read or assembled.
    let layout = match &request.output {
        ImageRef::Layout { dir, .. } => Some(LayoutWriter::begin(dir).map_err(BuildError::Output)?),
        ImageRef::Registry(_) => None,
    };
    let workers = load_workers(&request.workers, &context.sources).await?;
    let base = read_base(&request.base, registries).await?;
    let base_name = request.base_name.clone().unwrap_or_else(|| base.name.clone());
    let options = AssembleOptions { source_date_epoch: request.source_date_epoch, base_name };
    // Assembly is CPU work: off the async threads.
    let base_image = base.image.clone();
    let cache = context.block_cache.clone();
    let assembling =
        tokio::task::spawn_blocking(move || -> Result<(Built, Option<LayoutWriter>), BuildError> {
            let _span = info_span!("assemble").entered();
            let mtime = options.mtime()?;
            let mut worker_layers = Vec::with_capacity(workers.len());
            let mut entries = Vec::with_capacity(workers.len());
            for (worker, port) in workers {
                let layer = make_worker_layer(&worker.code, mtime, layout.as_ref(), cache.as_ref())?;
                let served = ServedWorker { name: worker.code.name.clone(), port, settings: worker.settings };
                entries.push(ImageWorker { served, layer: layer.layer_ref() });
                worker_layers.push(layer);
            }
            let image = assemble(&base_image, &entries, &options)?;
            Ok((Built { image, worker_layers }, layout))
        });
    let (built, layout) =
        assembling.await.map_err(|e| BuildError::Internal(format!("image assembly stopped: {e}")))??;
    match &context.block_cache {
        Some(cache) => {
            let (found, deflated) = cache.counts();
            let unhashed = cache.blocks_not_hashed();
            debug!(
                found,
                deflated,
                unhashed,
                "image assembled; layer blocks found in the cache, deflated, and not hashed again"
            );
        }
        None => debug!("image assembled"),
    }
    let requests_before = match learning {
        Some(learning) => learning
            .await
            .map_err(|e| BuildError::Internal(format!("learning the repository stopped: {e}")))??,
        None => 0,
    };

    let push = match (&request.output, layout) {
        (ImageRef::Layout { .. }, Some(layout)) => {
            write_layout(layout, &output_tag, &built, &base, registries).await?;
            None
        }
        (ImageRef::Layout { .. }, None) => {
            return Err(BuildError::Internal("the output layout was not opened".into()))
        }
        (ImageRef::Registry(out), _) => {
            let mut report =
                push_to_registry(out, &output_tag, &built, &base, registries, context.block_cache.as_deref())
                    .await?;
            report.requests = registries.client(&out.registry)?.request_count() - requests_before;
            Some(report)
        }
    };
    let image = built.image;
    info!(output = %request.output, digest = %image.manifest.digest, "image written");
    Ok(BuildOutcome { manifest_digest: image.manifest.digest.clone(), image, push })
}

async fn write_layout(
    writer: LayoutWriter,
    tag: &str,
    built: &Built,
    base: &ResolvedBase,
    registries: &Registries,
) -> Result<(), BuildError> {
    base.write_layers(&writer, registries).await?;
    let image = &built.image;
    for layer in &built.worker_layers {
        match layer {
            WorkerLayer::Memory(layer) => {
                writer.put_blob(&layer.blob.digest, &layer.blob.bytes).map_err(BuildError::Output)?
            }
            WorkerLayer::InLayout(_) => {}
            WorkerLayer::Spooled { .. } => {
                return Err(BuildError::Internal("a layer for a layout was written elsewhere".into()))
            }
        }
    }
    for blob in [&image.config_layer.blob, &image.config, &image.manifest] {
        writer.put_blob(&blob.digest, &blob.bytes).map_err(BuildError::Output)?;
    }
    writer.commit(tag, &image.manifest_descriptor()?).map_err(BuildError::Output)
}

async fn push_to_registry(
    out: &RegistryRef,
    tag: &str,
    built: &Built,
    base: &ResolvedBase,
    registries: &Registries,
    cache: Option<&BlockCache>,
) -> Result<PushReport, BuildError> {
    let mut blobs = base.push_blobs(out, registries).await?;
    let image = &built.image;
    for layer in &built.worker_layers {
        let source = match layer {
            WorkerLayer::Memory(layer) => BlobSource::Memory(layer.blob.bytes.clone()),
            WorkerLayer::Spooled { file, .. } => BlobSource::File(file.to_path_buf()),
            WorkerLayer::InLayout(_) => {
                return Err(BuildError::Internal("a layer for a registry was written to a layout".into()))
            }
        };
        let layer_ref = layer.layer_ref();
        blobs.push(PushBlob { digest: layer_ref.digest, size: layer_ref.size, source });
    }
    for blob in [&image.config_layer.blob, &image.config] {
        blobs.push(PushBlob {
            digest: blob.digest.clone(),
            size: blob.bytes.len() as u64,
            source: BlobSource::Memory(blob.bytes.clone()),
        });
    }
    let names: Vec<Digest> = blobs.iter().map(|blob| blob.digest.clone()).collect();
    let report = push_manifest(out, tag, image, blobs, registries).await?;
    if let Some(cache) = cache {
        pushed::record(cache, &out.registry, &out.repository, &names);
    }
    Ok(report)
}

/// Pushes `blobs` (those the repository lacks) and then the image's manifest under `tag`.
pub(super) async fn push_manifest(
    out: &RegistryRef,
    tag: &str,
    image: &AssembledImage,
    blobs: Vec<PushBlob>,
    registries: &Registries,
) -> Result<PushReport, BuildError> {
    let client = registries.client(&out.registry)?;
    let memory = registries.memory(&out.registry);
    let (digest, report) = push_image(
        &client,
        &memory,
        &out.repository,
        tag,
        blobs,
        image.manifest.media_type.as_ref(),
        image.manifest.bytes.clone(),
    )
    .await?;
    if digest != image.manifest.digest {
        return Err(BuildError::Internal(format!(
            "pushed manifest digest {digest} differs from {}",
            image.manifest.digest
        )));
    }
    Ok(report)
}
