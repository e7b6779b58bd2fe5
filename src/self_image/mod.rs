//! The controller's own image, built by its own builder (no Docker): the workerbundle binary over
//! the same pinned Debian runtime as the workerd base image (glibc, CA certificates) plus the
//! libraries a Rust binary links against (`base-images/controller/recipe.json`).
//!
//! Two layers: the runtime, which changes with Debian security updates, and the binary, so a new
//! build of workerbundle changes only its own layer. Same binary + same archives + same
//! SOURCE_DATE_EPOCH → same digest.

mod elf;
mod output;

use std::fs;
use std::path::{Path, PathBuf};

use crate::base_image::{
    package_image, runtime_layer, workerd_layer, BaseImageError, ControllerRecipe, ImageLabels,
    PackagedImage, PackagedLayer,
};
use crate::digest::Digest;
use crate::image::assemble::AssembleError;
use crate::image::layer::LayerBuilder;
use crate::image::layout::LayoutError;
use crate::registry::RegistryError;
pub use output::Destination;

#[derive(Debug, thiserror::Error)]
pub enum SelfImageError {
    #[error("cannot read the binary {path}: {source}")]
    ReadBinary { path: PathBuf, source: std::io::Error },
    #[error("the binary {path} cannot run in the image: {message}")]
    Unrunnable { path: PathBuf, message: String },
    #[error(transparent)]
    Archives(#[from] BaseImageError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error("output: {0}")]
    Output(#[from] LayoutError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Invalid(String),
    #[error("pushed manifest digest {pushed} differs from the assembled {assembled}")]
    DigestMoved { pushed: Digest, assembled: Digest },
}

/// The version the image is labelled with: this workerbundle's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Reads `binary` and the recipe's pinned archives and assembles the image in memory.
pub fn assemble_self_image(
    recipe: &ControllerRecipe,
    archives: &Path,
    binary: &Path,
    source_date_epoch: i64,
) -> Result<PackagedImage, SelfImageError> {
    let content =
        fs::read(binary).map_err(|source| SelfImageError::ReadBinary { path: binary.into(), source })?;
    let binary_digest = Digest::of(&content);
    let runtime = runtime_layer(&recipe.runtime, archives)?;
    let workerd = workerd_layer(&recipe.workerd, archives)?;
    // A library the recipe lacks would only show when the pod starts (exit 127 from the dynamic
    // loader): refuse here instead, naming it.
    elf::check_runs_on(&content, &runtime)
        .map_err(|message| SelfImageError::Unrunnable { path: binary.into(), message })?;
    let mut binary_layer = LayerBuilder::new();
    binary_layer.file(&recipe.binary.install_as, content, 0o755);

    let packages: Vec<String> =
        recipe.runtime.debs.iter().map(|d| format!("{}={}", d.package, d.version)).collect();
    let image = package_image(
        &[
            PackagedLayer {
                role: "runtime",
                layer: &runtime,
                created_by: format!("workerbundle self-image: {}", packages.join(" ")),
            },
            // Before the binary: it changes with every release of workerbundle, workerd seldom.
            PackagedLayer {
                role: "workerd",
                layer: &workerd,
                created_by: format!("workerbundle self-image: workerd {}", recipe.workerd.version),
            },
            PackagedLayer {
                role: "binary",
                layer: &binary_layer,
                created_by: format!("workerbundle self-image: workerbundle {VERSION} ({binary_digest})"),
            },
        ],
        &recipe.config,
        &ImageLabels {
            title: "workerbundle".to_owned(),
            version: VERSION.to_owned(),
            description: format!("the workerbundle controller and CLI, on {}", packages.join(", ")),
        },
        source_date_epoch,
    )?;
    Ok(image)
}
