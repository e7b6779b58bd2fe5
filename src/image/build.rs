//! One build: read every worker and the base, check everything, then assemble and write. Nothing
//! is written until every input has been read and validated.

use std::path::PathBuf;

use bytes::Bytes;
use tracing::info;

use super::assemble::{assemble, AssembleError, AssembleOptions, AssembledImage};
use super::layout::{descriptor_digest, Layout, LayoutError, LayoutImage, LayoutWriter};
use super::reference::ImageRef;
use crate::digest::Digest;
use crate::registry::pull::{fetch_blob, fetch_image};
use crate::registry::push::learn_repository;
use crate::registry::{push_image, BlobSource, PushBlob, PushReport, Registries, RegistryError, RegistryRef};
use crate::source::{read_dir_source, S3Options, S3Source, S3Url, SourceError};
use crate::worker::{Worker, WorkerError, WorkerFiles};

/// The first port handed out when a worker names none; the next worker gets the next one.
pub const FIRST_DEFAULT_PORT: u16 = 8080;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
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

/// Where a worker's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerSource {
    Dir(PathBuf),
    S3(S3Url),
}

/// What builds share for the life of a process: registry clients (and what they pushed) and the
/// S3 client (and what it downloaded).
pub struct BuildContext {
    pub registries: Registries,
    s3_options: S3Options,
    s3: tokio::sync::OnceCell<S3Source>,
}

impl BuildContext {
    pub fn new(registries: Registries, s3_options: S3Options) -> Self {
        BuildContext { registries, s3_options, s3: tokio::sync::OnceCell::new() }
    }

    /// The S3 client, created on first use (so builds without S3 sources need no AWS config).
    pub async fn s3(&self) -> &S3Source {
        self.s3.get_or_init(|| S3Source::new(self.s3_options.clone())).await
    }
}

/// One `--worker`: a name, a source and, optionally, a port and an environment prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInput {
    pub name: String,
    pub source: WorkerSource,
    pub port: Option<u16>,
    pub env_prefix: Option<String>,
}

impl WorkerInput {
    /// Parses `NAME=SOURCE[@PORT]`, where SOURCE is a directory, `s3://BUCKET/PREFIX/` or
    /// `s3://BUCKET/KEY`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, rest) = text
            .split_once('=')
            .ok_or_else(|| format!("--worker {text:?} must look like NAME=DIR[@PORT]"))?;
        let (dir, port) = match rest.rsplit_once('@') {
            Some((dir, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                let port: u32 =
                    port.parse().map_err(|_| format!("--worker {text:?}: port {port} is outside 1-65535"))?;
                let port = u16::try_from(port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("--worker {text:?}: port {port} is outside 1-65535"))?;
                (dir, Some(port))
            }
            _ => (rest, None),
        };
        if name.is_empty() || dir.is_empty() {
            return Err(format!("--worker {text:?} must look like NAME=DIR[@PORT]"));
        }
        let source = if dir.starts_with("s3://") {
            WorkerSource::S3(S3Url::parse(dir).map_err(|e| format!("--worker {text:?}: {e}"))?)
        } else {
            WorkerSource::Dir(dir.into())
        };
        Ok(WorkerInput { name: name.into(), source, port, env_prefix: None })
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

/// Ports default to 8080, 8081, ... in the order given, skipping ports other workers asked for.
pub fn assign_ports(workers: &[WorkerInput]) -> Result<Vec<u16>, String> {
    let taken: Vec<u16> = workers.iter().filter_map(|w| w.port).collect();
    let mut next = FIRST_DEFAULT_PORT;
    let mut ports = Vec::with_capacity(workers.len());
    for w in workers {
        ports.push(match w.port {
            Some(port) => port,
            None => {
                while taken.contains(&next) || ports.contains(&next) {
                    next = next.checked_add(1).ok_or("ran out of ports above 8080")?;
                }
                next
            }
        });
    }
    Ok(ports)
}

/// Reads and validates every worker; S3 sources are read concurrently.
pub async fn load_workers(inputs: &[WorkerInput], context: &BuildContext) -> Result<Vec<Worker>, BuildError> {
    let ports = assign_ports(inputs).map_err(BuildError::Invalid)?;
    let loads = inputs.iter().zip(ports).map(|(input, port)| async move {
        let files = match &input.source {
            WorkerSource::Dir(dir) => read_dir_source(dir)?,
            WorkerSource::S3(url) => context.s3().await.read(url).await?,
        };
        let worker = Worker::from_files(WorkerFiles {
            name: input.name.clone(),
            port,
            env_prefix: input.env_prefix.clone(),
            files,
        })?;
        info!(worker = %worker.name, port, modules = worker.modules.len(), "worker read");
        Ok::<_, BuildError>(worker)
    });
    futures::future::try_join_all(loads).await
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
    let workers = load_workers(&request.workers, context).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, port: Option<u16>) -> WorkerInput {
        WorkerInput { name: name.into(), source: WorkerSource::Dir("d".into()), port, env_prefix: None }
    }

    #[test]
    fn parses_worker_flags() {
        assert_eq!(
            WorkerInput::parse("api=dir/api@9000").unwrap(),
            WorkerInput { port: Some(9000), ..input("api", None) }.with_dir("dir/api")
        );
        assert_eq!(WorkerInput::parse("api=dir@x").unwrap(), input("api", None).with_dir("dir@x"));
        for bad in ["api", "=dir", "api=", "api=dir@0", "api=dir@65536", "api=dir@99999999999"] {
            assert!(WorkerInput::parse(bad).is_err(), "{bad}");
        }
    }

    impl WorkerInput {
        fn with_dir(mut self, dir: &str) -> Self {
            self.source = WorkerSource::Dir(dir.into());
            self
        }
    }

    #[test]
    fn default_ports_count_up_from_8080_around_explicit_ones() {
        let ports =
            assign_ports(&[input("a", None), input("b", Some(8081)), input("c", None), input("d", None)])
                .unwrap();
        assert_eq!(ports, [8080, 8081, 8082, 8083]);
        let ports = assign_ports(&[input("a", Some(8080)), input("b", None)]).unwrap();
        assert_eq!(ports, [8080, 8081]);
    }
}
