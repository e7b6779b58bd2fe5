//! Where a worker's files come from. Each source yields the same thing: module paths (relative,
//! `/`-separated) mapped to contents, `metadata.json` included, ready for [`crate::worker::Worker::from_files`]. Contents are shared
//! ([`bytes::Bytes`]): from the download to the layer, a module's bytes are never copied.

mod dir;
mod input;
pub mod s3;

pub use dir::read_dir_source;
pub use input::{load_workers, worker_ports, LoadError, Sources, WorkerInput, WorkerSource};
pub use s3::{S3Options, S3Source, S3Url};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read worker directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("worker directory {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{url}: {message}")]
    S3 { url: String, message: String },
}
