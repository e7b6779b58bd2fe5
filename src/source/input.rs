//! The workers a build is asked for (`NAME=SOURCE[@PORT]`), their ports, and reading them from
//! their sources into validated [`Worker`]s.

use std::path::PathBuf;

use tracing::info;

use super::{read_dir_source, S3Options, S3Source, S3Url, SourceError};
use crate::worker::ports::assign_ports;
use crate::worker::{Overrides, Worker, WorkerError, WorkerFiles};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("{0}")]
    Invalid(String),
}

/// Where a worker's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerSource {
    Dir(PathBuf),
    S3(S3Url),
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

/// The clients worker sources are read with, kept for the life of a process (the S3 client
/// caches what it downloaded).
pub struct Sources {
    s3_options: S3Options,
    s3: tokio::sync::OnceCell<S3Source>,
}

impl Sources {
    pub fn new(s3_options: S3Options) -> Self {
        Sources { s3_options, s3: tokio::sync::OnceCell::new() }
    }

    /// The S3 client, created on first use (so builds without S3 sources need no AWS config).
    pub async fn s3(&self) -> &S3Source {
        self.s3.get_or_init(|| S3Source::new(self.s3_options.clone())).await
    }
}

/// Ports default to 8080, 8081, ... in the order given, skipping ports other workers asked for;
/// two workers asking for one port is a mistake on the command line, not something to fix up.
pub fn worker_ports(workers: &[WorkerInput]) -> Result<Vec<u16>, String> {
    let mut asked = std::collections::BTreeMap::new();
    for w in workers {
        if let Some(port) = w.port {
            if let Some(other) = asked.insert(port, w.name.as_str()) {
                return Err(format!("workers {other:?} and {:?} both use port {port}", w.name));
            }
        }
    }
    let requests: Vec<(&str, Option<u16>)> = workers.iter().map(|w| (w.name.as_str(), w.port)).collect();
    assign_ports(&requests)
}

/// Reads and validates every worker, each with its port; S3 sources are read concurrently.
pub async fn load_workers(
    inputs: &[WorkerInput],
    sources: &Sources,
) -> Result<Vec<(Worker, u16)>, LoadError> {
    let ports = worker_ports(inputs).map_err(LoadError::Invalid)?;
    let loads = inputs.iter().zip(ports).map(|(input, port)| async move {
        let files = match &input.source {
            WorkerSource::Dir(dir) => read_dir_source(dir)?,
            WorkerSource::S3(url) => {
                let objects = sources.s3().await.read(url).await?;
                objects.into_iter().map(|(path, bytes)| (path, bytes.into())).collect()
            }
        };
        let overrides = Overrides { env_prefix: input.env_prefix.clone(), ..Overrides::default() };
        let worker = Worker::from_files(WorkerFiles { name: input.name.clone(), files }, &overrides)?;
        info!(worker = %input.name, port, modules = worker.code.modules.len(), "worker read");
        Ok::<_, LoadError>((worker, port))
    });
    futures::future::try_join_all(loads).await
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
            worker_ports(&[input("a", None), input("b", Some(8081)), input("c", None), input("d", None)])
                .unwrap();
        assert_eq!(ports, [8080, 8081, 8082, 8083]);
        let err = worker_ports(&[input("a", Some(9000)), input("b", Some(9000))]).unwrap_err();
        assert!(err.contains("both use port 9000"), "{err}");
    }
}
