//! The build pipelines that the CLI and the controller call: sources → image → target. The pure
//! pieces they are made of (layers, the workerd config, assembly, OCI layouts) live in
//! [`crate::image`]; talking to registries lives in [`crate::registry`].
//!
//! - [`pipeline::build`]: the CLI's `build` — workers from directories or S3 over a base, written
//!   to an OCI layout or pushed to a registry;
//! - [`bundle`]: the controller's bundle image — worker layers already in the repository, a new
//!   config layer, pushed at the floor of round trips;
//! - [`base`]: reading the base image, and where its layers are copied from;
//! - [`pushed`]: what the last push to a repository left there, for the next process.

pub mod base;
pub mod bundle;
pub mod pipeline;
pub mod pushed;
pub mod target;

pub use base::{read_base, BaseSource, ResolvedBase};
pub use pipeline::{build, BuildOutcome, BuildRequest};
pub use target::Target;

use crate::image::assemble::AssembleError;
use crate::image::block_cache::BlockCache;
use crate::image::layout::LayoutError;
use crate::registry::{Registries, RegistryError};
use crate::source::{LoadError, S3Options, Sources};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("base image: {0}")]
    Base(#[source] LayoutError),
    #[error("output: {0}")]
    Output(#[source] LayoutError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    /// The request cannot be done as written.
    #[error("{0}")]
    Invalid(String),
    /// Something that should not happen did (a task stopped, a digest moved under us).
    #[error("{0}")]
    Internal(String),
}

/// What builds share for the life of a process: registry clients (and what they pushed), the
/// source clients (and what they downloaded), and where deflated layer blocks are kept.
pub struct BuildContext {
    pub registries: std::sync::Arc<Registries>,
    pub sources: Sources,
    /// Worker layers read the blocks they share with earlier builds from here.
    pub block_cache: Option<std::sync::Arc<BlockCache>>,
}

impl BuildContext {
    pub fn new(registries: Registries, s3_options: S3Options) -> Self {
        BuildContext {
            registries: std::sync::Arc::new(registries),
            sources: Sources::new(s3_options),
            block_cache: None,
        }
    }

    pub fn with_block_cache(mut self, cache: Option<BlockCache>) -> Self {
        self.block_cache = cache.map(std::sync::Arc::new);
        self
    }
}
