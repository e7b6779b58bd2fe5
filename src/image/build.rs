//! One build: read every worker and the base, check everything, then assemble and write. Nothing
//! is written until every input has been read and validated.

use bytes::Bytes;
use tracing::info;

use super::assemble::{assemble, AssembleError, AssembleOptions, AssembledImage};
use super::layout::{descriptor_digest, Layout, LayoutError, LayoutImage, LayoutWriter};
use super::reference::ImageRef;
use crate::digest::Digest;
use crate::registry::pull::{fetch_blob, fetch_image};
use crate::registry::push::learn_repository;
use crate::registry::{push_image, BlobSource, PushBlob, PushReport, Registries, RegistryError, RegistryRef};
use crate::source::{load_workers, LoadError, S3Options, Sources, WorkerInput};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("base image: {0}")]
    Base(LayoutError),
    #[error("output: {0}")]
    Output(LayoutError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error("{0}")]
    Invalid(String),
}

/// What builds share for the life of a process: registry clients (and what they pushed) and the
/// source clients (and what they downloaded).
pub struct BuildContext {
    pub registries: Registries,
    pub sources: Sources,
}

impl BuildContext {
    pub fn new(registries: Registries, s3_options: S3Options) -> Self {
        BuildContext { registries, sources: Sources::new(s3_options) }
    }
}

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

/// Where the base image was read from, and its metadata.
enum Base {
    Layout(Layout),
    Registry(RegistryRef),
}

async fn read_base(
    reference: &ImageRef,
    registries: &Registries,
) -> Result<(Base, LayoutImage, String), BuildError> {
    match reference {
        ImageRef::Layout { dir, tag } => {
            let layout = Layout::open(dir).map_err(BuildError::Base)?;
            let image = layout.image(tag.as_deref()).map_err(BuildError::Base)?;
            let name = tag.clone().unwrap_or_else(|| image.manifest_digest.to_string());
            Ok((Base::Layout(layout), image, name))
        }
        ImageRef::Registry(r) => {
            let manifest = r
                .manifest_reference()
                .ok_or_else(|| BuildError::Invalid(format!("--base {reference} needs a tag or a digest")))?;
            let client = registries.client(&r.registry)?;
            let image = fetch_image(&client, &r.repository, &manifest).await?;
            let name = reference.to_string().trim_start_matches("docker://").to_owned();
            Ok((Base::Registry(r.clone()), image, name))
        }
    }
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
    let workers = load_workers(&request.workers, &context.sources).await?;
    let (base, base_image, default_name) = read_base(&request.base, registries).await?;
    let base_name = request.base_name.clone().unwrap_or(default_name);
    let options = AssembleOptions { source_date_epoch: request.source_date_epoch, base_name };
    // Assembly is CPU work: run it off the async threads and, when pushing, learn what the
    // repository holds at the same time, so that round trip costs no wall-clock time.
    let requests_before = match &request.output {
        ImageRef::Registry(out) => registries.client(&out.registry)?.request_count(),
        ImageRef::Layout { .. } => 0,
    };
    let assembling = tokio::task::spawn_blocking(move || assemble(&base_image, &workers, &options));
    let learning = async {
        match &request.output {
            ImageRef::Registry(out) => {
                let client = registries.client(&out.registry)?;
                learn_repository(&client, &registries.memory(&out.registry), &out.repository, &output_tag)
                    .await
            }
            ImageRef::Layout { .. } => Ok(()),
        }
    };
    let (assembled, learned) = tokio::join!(assembling, learning);
    learned?;
    let image = assembled.map_err(|e| BuildError::Invalid(format!("image assembly stopped: {e}")))??;

    let push = match &request.output {
        ImageRef::Layout { dir, .. } => {
            write_layout(dir, &output_tag, &image, &base, registries).await?;
            None
        }
        ImageRef::Registry(out) => {
            let mut report = push_to_registry(out, &output_tag, &image, &base, registries).await?;
            report.requests = registries.client(&out.registry)?.request_count() - requests_before;
            Some(report)
        }
    };
    info!(output = %request.output, digest = %image.manifest.digest, "image written");
    Ok(BuildOutcome { manifest_digest: image.manifest.digest.clone(), image, push })
}

async fn write_layout(
    dir: &std::path::Path,
    tag: &str,
    image: &AssembledImage,
    base: &Base,
    registries: &Registries,
) -> Result<(), BuildError> {
    let writer = LayoutWriter::begin(dir).map_err(BuildError::Output)?;
    for layer in &image.base_layers {
        match base {
            Base::Layout(layout) => writer.copy_blob(layout, layer).map_err(BuildError::Output)?,
            Base::Registry(r) => {
                let digest = descriptor_digest(layer).map_err(BuildError::Invalid)?;
                let client = registries.client(&r.registry)?;
                let bytes = fetch_blob(&client, &r.repository, &digest).await?;
                writer.put_blob(&digest, &bytes).map_err(BuildError::Output)?;
            }
        }
    }
    for layer in &image.new_layers {
        writer.put_blob(&layer.blob.digest, &layer.blob.bytes).map_err(BuildError::Output)?;
    }
    writer.put_blob(&image.config.digest, &image.config.bytes).map_err(BuildError::Output)?;
    writer.put_blob(&image.manifest.digest, &image.manifest.bytes).map_err(BuildError::Output)?;
    writer.commit(tag, &image.manifest_descriptor()?).map_err(BuildError::Output)
}

async fn push_to_registry(
    out: &RegistryRef,
    tag: &str,
    image: &AssembledImage,
    base: &Base,
    registries: &Registries,
) -> Result<PushReport, BuildError> {
    let mut blobs = Vec::new();
    for layer in &image.base_layers {
        let digest = descriptor_digest(layer).map_err(BuildError::Invalid)?;
        let source = match base {
            Base::Layout(layout) => BlobSource::File(layout.blob_path(&digest)),
            Base::Registry(r) if r.registry == out.registry => BlobSource::Repository(r.repository.clone()),
            Base::Registry(r) => {
                let client = registries.client(&r.registry)?;
                BlobSource::Memory(fetch_blob(&client, &r.repository, &digest).await?)
            }
        };
        blobs.push(PushBlob { digest, size: layer.size(), source });
    }
    let in_memory = image.new_layers.iter().map(|l| &l.blob).chain([&image.config]);
    for blob in in_memory {
        blobs.push(PushBlob {
            digest: blob.digest.clone(),
            size: blob.bytes.len() as u64,
            source: BlobSource::Memory(Bytes::from(blob.bytes.clone())),
        });
    }
    let client = registries.client(&out.registry)?;
    let memory = registries.memory(&out.registry);
    let manifest = Bytes::from(image.manifest.bytes.clone());
    let (digest, report) = push_image(
        &client,
        &memory,
        &out.repository,
        tag,
        blobs,
        image.manifest.media_type.as_ref(),
        manifest,
    )
    .await?;
    if digest != image.manifest.digest {
        return Err(BuildError::Invalid(format!(
            "pushed manifest digest {digest} differs from {}",
            image.manifest.digest
        )));
    }
    Ok(report)
}
