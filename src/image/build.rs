//! One build: read every worker and the base, check everything, then assemble and write. Nothing
//! is written until every input has been read and validated.

use std::path::PathBuf;

use tracing::info;

use super::assemble::{assemble, AssembleError, AssembleOptions, AssembledImage};
use super::layout::{Layout, LayoutError, LayoutWriter};
use super::reference::ImageRef;
use crate::digest::Digest;
use crate::source::{read_dir_source, SourceError};
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
    Assemble(#[from] AssembleError),
    #[error("{0}")]
    Invalid(String),
}

/// Where a worker's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerSource {
    Dir(PathBuf),
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
    /// Parses `NAME=DIR[@PORT]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, rest) = text
            .split_once('=')
            .ok_or_else(|| format!("--worker {text:?} must look like NAME=DIR[@PORT]"))?;
        let (dir, port) = match rest.rsplit_once('@') {
            Some((dir, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                let port: u32 = port
                    .parse()
                    .map_err(|_| format!("--worker {text:?}: port {port} is outside 1-65535"))?;
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
        Ok(WorkerInput {
            name: name.into(),
            source: WorkerSource::Dir(dir.into()),
            port,
            env_prefix: None,
        })
    }
}

#[derive(Clone, Debug)]
pub struct BuildRequest {
    pub base: ImageRef,
    /// `org.opencontainers.image.base.name`; defaults to the base reference's tag.
    pub base_name: Option<String>,
    pub workers: Vec<WorkerInput>,
    pub output: ImageRef,
    pub source_date_epoch: i64,
}

#[derive(Clone, Debug)]
pub struct BuildOutcome {
    pub manifest_digest: Digest,
    pub image: AssembledImage,
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

/// Reads and validates every worker.
pub fn load_workers(inputs: &[WorkerInput]) -> Result<Vec<Worker>, BuildError> {
    let ports = assign_ports(inputs).map_err(BuildError::Invalid)?;
    inputs
        .iter()
        .zip(ports)
        .map(|(input, port)| {
            let files = match &input.source {
                WorkerSource::Dir(dir) => read_dir_source(dir)?,
            };
            let worker = Worker::from_files(WorkerFiles {
                name: input.name.clone(),
                port,
                env_prefix: input.env_prefix.clone(),
                files,
            })?;
            info!(worker = %worker.name, port, modules = worker.modules.len(), "worker read");
            Ok(worker)
        })
        .collect()
}

pub fn build(request: &BuildRequest) -> Result<BuildOutcome, BuildError> {
    let ImageRef::Layout {
        dir: out_dir,
        tag: out_tag,
    } = &request.output;
    let out_tag = out_tag.as_deref().ok_or_else(|| {
        BuildError::Invalid(format!("--output {} needs a tag: oci:DIR:TAG", request.output))
    })?;
    let workers = load_workers(&request.workers)?;

    let ImageRef::Layout {
        dir: base_dir,
        tag: base_tag,
    } = &request.base;
    let base_layout = Layout::open(base_dir).map_err(BuildError::Base)?;
    let base = base_layout.image(base_tag.as_deref()).map_err(BuildError::Base)?;
    let base_name = request
        .base_name
        .clone()
        .or_else(|| base_tag.clone())
        .unwrap_or_else(|| base.manifest_digest.to_string());

    let image = assemble(
        &base,
        &workers,
        &AssembleOptions {
            source_date_epoch: request.source_date_epoch,
            base_name,
        },
    )?;

    let writer = LayoutWriter::begin(out_dir).map_err(BuildError::Output)?;
    for layer in &image.base_layers {
        writer
            .copy_blob(&base_layout, layer)
            .map_err(BuildError::Output)?;
    }
    for layer in &image.new_layers {
        writer
            .put_blob(&layer.blob.digest, &layer.blob.bytes)
            .map_err(BuildError::Output)?;
    }
    writer
        .put_blob(&image.config.digest, &image.config.bytes)
        .map_err(BuildError::Output)?;
    writer
        .put_blob(&image.manifest.digest, &image.manifest.bytes)
        .map_err(BuildError::Output)?;
    writer
        .commit(out_tag, &image.manifest_descriptor()?)
        .map_err(BuildError::Output)?;
    info!(output = %request.output, digest = %image.manifest.digest, "image written");
    Ok(BuildOutcome {
        manifest_digest: image.manifest.digest.clone(),
        image,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, port: Option<u16>) -> WorkerInput {
        WorkerInput {
            name: name.into(),
            source: WorkerSource::Dir("d".into()),
            port,
            env_prefix: None,
        }
    }

    #[test]
    fn parses_worker_flags() {
        assert_eq!(
            WorkerInput::parse("api=dir/api@9000").unwrap(),
            WorkerInput {
                port: Some(9000),
                ..input("api", None)
            }
            .with_dir("dir/api")
        );
        assert_eq!(
            WorkerInput::parse("api=dir@x").unwrap(),
            input("api", None).with_dir("dir@x")
        );
        for bad in [
            "api",
            "=dir",
            "api=",
            "api=dir@0",
            "api=dir@65536",
            "api=dir@99999999999",
        ] {
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
        let ports = assign_ports(&[
            input("a", None),
            input("b", Some(8081)),
            input("c", None),
            input("d", None),
        ])
        .unwrap();
        assert_eq!(ports, [8080, 8081, 8082, 8083]);
        let ports = assign_ports(&[input("a", Some(8080)), input("b", None)]).unwrap();
        assert_eq!(ports, [8080, 8081]);
    }
}
