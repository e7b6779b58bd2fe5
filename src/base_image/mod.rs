//! The workerd base image, assembled from package archives with no Docker and no network: workerd
//! from its npm tarball, glibc and CA certificates from Debian packages. Two layers: the runtime
//! (glibc, CA bundle, a few directories), which changes with Debian security updates, and workerd
//! itself, which changes with workerd releases.
//!
//! The runtime layer ([`runtime_layer`]) and the packaging ([`package`]) are shared with the
//! controller's own image (`crate::self_image`).

mod archive;
pub mod package;
pub mod recipe;

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::digest::{Digest, HashingWriter};
use crate::image::assemble::AssembleError;
use crate::image::file_source::FileSource;
use crate::image::layer::{Entry, LayerBuilder};
use crate::image::layout::{LayoutError, LayoutWriter};
pub use package::{package_image, package_image_into, ImageLabels, PackagedImage, PackagedLayer};
pub use recipe::{
    ControllerRecipe, NpmArchive, Recipe, RuntimeRecipe, BUILTIN_CONTROLLER_RECIPE, BUILTIN_RECIPE,
};

#[derive(Debug, thiserror::Error)]
pub enum BaseImageError {
    #[error("archive {archive} is not in {dir}: run scripts/setup, or base-images/workerd/fetch.py --recipe RECIPE, to download the pinned archives ({source})")]
    MissingArchive { archive: String, dir: PathBuf, source: std::io::Error },
    #[error("archive {archive} has sha256 {actual}, but the recipe pins {pinned}: run base-images/workerd/fetch.py --recipe RECIPE (add --refresh-pins to update the pins)")]
    PinMismatch { archive: String, actual: String, pinned: String },
    #[error("archive {archive}: {message}")]
    Archive { archive: String, message: String },
    #[error("{0}")]
    Recipe(String),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error("output: {0}")]
    Output(#[from] LayoutError),
    #[error(transparent)]
    Package(#[from] package::PackageError),
}

/// The archive cache: `$WORKERBUNDLE_ARCHIVES`, else `$XDG_CACHE_HOME/workerbundle/archives`, else
/// `~/.cache/workerbundle/archives` (the same rule as fetch.py).
pub fn default_archive_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WORKERBUNDLE_ARCHIVES") {
        return dir.into();
    }
    crate::cache_dir::workerbundle_cache("archives")
        .unwrap_or_else(|| PathBuf::from(".cache/workerbundle/archives"))
}

/// The two layers, ready to write.
pub struct BaseLayers {
    pub runtime: LayerBuilder,
    pub workerd: LayerBuilder,
}

fn missing(dir: &Path, archive: &str) -> impl FnOnce(io::Error) -> BaseImageError {
    let (archive, dir) = (archive.to_owned(), dir.to_owned());
    move |source| BaseImageError::MissingArchive { archive, dir, source }
}

fn check_pin(archive: &str, actual: &Digest, sha256: &str) -> Result<(), BaseImageError> {
    if actual.hex() != sha256 {
        return Err(BaseImageError::PinMismatch {
            archive: archive.into(),
            actual: actual.hex().to_owned(),
            pinned: sha256.into(),
        });
    }
    Ok(())
}

/// A small archive (a Debian package), read whole and checked against its pin.
fn read_pinned(dir: &Path, archive: &str, sha256: &str) -> Result<Vec<u8>, BaseImageError> {
    let bytes = fs::read(dir.join(archive)).map_err(missing(dir, archive))?;
    check_pin(archive, &Digest::of(&bytes), sha256)?;
    Ok(bytes)
}

/// A big archive (workerd's npm tarball), checked against its pin by streaming it through
/// sha256; returns its path, to be read again as the layer is written.
fn check_pinned_file(dir: &Path, archive: &str, sha256: &str) -> Result<PathBuf, BaseImageError> {
    let path = dir.join(archive);
    let mut file = BufReader::with_capacity(1 << 20, File::open(&path).map_err(missing(dir, archive))?);
    let mut hashing = HashingWriter::new(io::sink());
    io::copy(&mut file, &mut hashing).map_err(missing(dir, archive))?;
    check_pin(archive, &hashing.finish().0, sha256)?;
    Ok(path)
}

/// Reads the pinned Debian archives and lays out the runtime layer: the files the recipe takes
/// from each package, the CA bundle made from the certificates, and the empty directories.
pub fn runtime_layer(recipe: &RuntimeRecipe, archives: &Path) -> Result<LayerBuilder, BaseImageError> {
    let mut runtime = LayerBuilder::new();
    for deb in &recipe.debs {
        let bytes = read_pinned(archives, &deb.archive, &deb.sha256)?;
        let fail = |message| BaseImageError::Archive { archive: deb.archive.clone(), message };
        let data = archive::deb_data(&bytes).map_err(fail)?;
        let added = archive::add_tar_entries(&data, |p| deb.includes(p), &mut runtime).map_err(fail)?;
        if added == 0 {
            return Err(fail(format!("no entries match {:?}", deb.include)));
        }
    }
    let bundle = ca_bundle(&runtime, &recipe.ca_bundle.from);
    if bundle.is_empty() {
        return Err(BaseImageError::Recipe(format!("no certificates under {}", recipe.ca_bundle.from)));
    }
    runtime.file(&recipe.ca_bundle.to, bundle, 0o644);
    for dir in &recipe.directories {
        let mode = u32::from_str_radix(&dir.mode, 8).map_err(|_| {
            BaseImageError::Recipe(format!("directory {} has mode {:?}, not octal", dir.path, dir.mode))
        })?;
        runtime.dir(&dir.path, mode);
    }
    Ok(runtime)
}

/// Reads the pinned archives and lays out the base image's files.
pub fn collect_layers(recipe: &Recipe, archives: &Path) -> Result<BaseLayers, BaseImageError> {
    let runtime = runtime_layer(&recipe.runtime, archives)?;
    let workerd = workerd_layer(&recipe.workerd, archives)?;
    Ok(BaseLayers { runtime, workerd })
}

/// The workerd binary from its pinned npm archive, streamed: never held whole (155 MB).
pub fn workerd_layer(npm: &NpmArchive, archives: &Path) -> Result<LayerBuilder, BaseImageError> {
    let tgz = check_pinned_file(archives, &npm.archive, &npm.sha256)?;
    let fail = |message| BaseImageError::Archive { archive: npm.archive.clone(), message };
    let gunzip = |path: &Path| -> io::Result<flate2::read::GzDecoder<BufReader<File>>> {
        Ok(flate2::read::GzDecoder::new(BufReader::with_capacity(1 << 20, File::open(path)?)))
    };
    // Where the binary's bytes are in the decompressed tarball: the layer writer decompresses up
    // to there again and streams them, so the binary is never held whole (workerd is 155 MB).
    let (offset, size) =
        archive::locate_tar_member(gunzip(&tgz).map_err(|e| fail(e.to_string()))?, &npm.binary)
            .map_err(fail)?
            .ok_or_else(|| fail(format!("has no {}", npm.binary)))?;
    let what = format!("{} in {}", npm.binary, npm.archive);
    let binary = FileSource::new(what, size, move || {
        let mut reader = gunzip(&tgz)?;
        io::copy(&mut (&mut reader).take(offset), &mut io::sink())?;
        Ok(Box::new(reader) as Box<dyn Read + Send>)
    });
    let mut workerd = LayerBuilder::new();
    workerd.stream_file(&npm.install_as, binary, 0o755);
    Ok(workerd)
}

/// Concatenates the certificates under `from` in path order, each ending in a newline, as
/// update-ca-certificates does.
fn ca_bundle(layer: &LayerBuilder, from: &str) -> Vec<u8> {
    let mut bundle = Vec::new();
    for (path, entry) in layer.entries() {
        if let (true, Entry::File { content, .. }) = (path.starts_with(from) && path.ends_with(".crt"), entry)
        {
            bundle.extend_from_slice(content);
            if !content.ends_with(b"\n") {
                bundle.push(b'\n');
            }
        }
    }
    bundle
}

/// Assembles the base image and writes it to an OCI layout under `tag`. Returns the manifest digest.
pub fn build_base_image(
    recipe: &Recipe,
    archives: &Path,
    out_dir: &Path,
    tag: &str,
    source_date_epoch: i64,
) -> Result<Digest, BaseImageError> {
    // The output is checked before the seconds of assembly, not after: an unusable path (a file
    // in the way, a directory that is not a layout, no permission) fails at once. A new layout is
    // staged beside the target and removed again if anything below fails.
    let writer = LayoutWriter::begin(out_dir)?;
    let layers = collect_layers(recipe, archives)?;
    let packages: Vec<String> =
        std::iter::once(format!("{}@{}", recipe.workerd.npm_package, recipe.workerd.version))
            .chain(recipe.runtime.debs.iter().map(|d| format!("{}={}", d.package, d.version)))
            .collect();
    let image = package_image_into(
        &writer,
        &[
            PackagedLayer {
                role: "runtime",
                layer: &layers.runtime,
                created_by: format!("workerbundle base-image: {}", packages[1..].join(" ")),
            },
            PackagedLayer {
                role: "workerd",
                layer: &layers.workerd,
                created_by: format!("workerbundle base-image: {}", packages[0]),
            },
        ],
        &recipe.config,
        &ImageLabels {
            title: "workerd base image".to_owned(),
            version: recipe.workerd.version.clone(),
            description: format!("workerd and its runtime, from {}", packages.join(", ")),
        },
        source_date_epoch,
    )?;
    writer.commit(tag, &image.descriptor()?)?;
    Ok(image.digest)
}
