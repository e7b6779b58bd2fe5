//! The workerd base image, assembled from package archives with no Docker and no network: workerd
//! from its npm tarball, glibc and CA certificates from Debian packages. Two layers: the runtime
//! (glibc, CA bundle, a few directories), which changes with Debian security updates, and workerd
//! itself, which changes with workerd releases.

mod archive;
pub mod recipe;

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::image::{
    ImageManifestBuilder, MediaType, ANNOTATION_CREATED, ANNOTATION_DESCRIPTION, ANNOTATION_TITLE,
    ANNOTATION_VERSION,
};
use serde_json::json;
use tracing::info;

use crate::digest::Digest;
use crate::image::assemble::{AssembleError, Blob};
use crate::image::canonical::{rfc3339, to_canonical_json};
use crate::image::layer::{Entry, LayerBuilder, MEDIA_TYPE_LAYER_GZIP};
use crate::image::layout::{LayoutError, LayoutWriter};
pub use recipe::{Recipe, BUILTIN_RECIPE};

#[derive(Debug, thiserror::Error)]
pub enum BaseImageError {
    #[error("archive {archive} is not in {dir}: run base-images/workerd/fetch.py to download the pinned archives ({source})")]
    MissingArchive { archive: String, dir: PathBuf, source: std::io::Error },
    #[error("archive {archive} has sha256 {actual}, but the recipe pins {pinned}: run base-images/workerd/fetch.py (or --refresh-pins to update the pins)")]
    PinMismatch { archive: String, actual: String, pinned: String },
    #[error("archive {archive}: {message}")]
    Archive { archive: String, message: String },
    #[error("{0}")]
    Recipe(String),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error("output: {0}")]
    Output(#[from] LayoutError),
}

/// The archive cache: `$WORKERBUNDLE_ARCHIVES`, else `$XDG_CACHE_HOME/workerbundle/archives`, else
/// `~/.cache/workerbundle/archives` (the same rule as fetch.py).
pub fn default_archive_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WORKERBUNDLE_ARCHIVES") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("workerbundle/archives")
}

/// The two layers, ready to write.
pub struct BaseLayers {
    pub runtime: LayerBuilder,
    pub workerd: LayerBuilder,
}

fn read_pinned(dir: &Path, archive: &str, sha256: &str) -> Result<Vec<u8>, BaseImageError> {
    let bytes = fs::read(dir.join(archive)).map_err(|source| BaseImageError::MissingArchive {
        archive: archive.into(),
        dir: dir.into(),
        source,
    })?;
    let actual = Digest::of(&bytes).hex().to_owned();
    if actual != sha256 {
        return Err(BaseImageError::PinMismatch { archive: archive.into(), actual, pinned: sha256.into() });
    }
    Ok(bytes)
}

/// Reads the pinned archives and lays out the base image's files.
pub fn collect_layers(recipe: &Recipe, archives: &Path) -> Result<BaseLayers, BaseImageError> {
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

    let npm = &recipe.workerd;
    let tgz = read_pinned(archives, &npm.archive, &npm.sha256)?;
    let mut binary = None;
    archive::for_each_tar_entry(flate2::read::GzDecoder::new(tgz.as_slice()), |path, entry| {
        if path == npm.binary {
            let mut content = Vec::new();
            entry.read_to_end(&mut content).map_err(|e| format!("{path}: {e}"))?;
            binary = Some(content);
        }
        Ok(())
    })
    .map_err(|message| BaseImageError::Archive { archive: npm.archive.clone(), message })?;
    let binary = binary.ok_or_else(|| BaseImageError::Archive {
        archive: npm.archive.clone(),
        message: format!("has no {}", npm.binary),
    })?;
    let mut workerd = LayerBuilder::new();
    workerd.file(&npm.install_as, binary, 0o755);
    Ok(BaseLayers { runtime, workerd })
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
    let created = rfc3339(source_date_epoch).ok_or(AssembleError::Epoch(source_date_epoch))?;
    let mtime = u64::try_from(source_date_epoch).map_err(|_| AssembleError::Epoch(source_date_epoch))?;
    // The output is checked before the seconds of assembly, not after: an unusable path (a file
    // in the way, a directory that is not a layout, no permission) fails at once. A new layout is
    // staged beside the target and removed again if anything below fails.
    let writer = LayoutWriter::begin(out_dir)?;
    let layers = collect_layers(recipe, archives)?;

    let mut blobs = Vec::new();
    let mut diff_ids = Vec::new();
    for (role, layer) in [("runtime", &layers.runtime), ("workerd", &layers.workerd)] {
        let (digests, bytes) = layer.to_blob(mtime).map_err(AssembleError::Layer)?;
        info!(layer = role, digest = %digests.digest, size = digests.size, "base layer assembled");
        diff_ids.push(digests.diff_id.to_string());
        blobs.push(Blob {
            media_type: MediaType::Other(MEDIA_TYPE_LAYER_GZIP.into()),
            digest: digests.digest,
            bytes,
        });
    }

    let settings = &recipe.config;
    let mut process = json!({ "Entrypoint": settings.entrypoint, "Env": settings.env });
    if let Some(user) = &settings.user {
        process["User"] = json!(user);
    }
    if let Some(dir) = &settings.working_dir {
        process["WorkingDir"] = json!(dir);
    }
    let packages: Vec<String> =
        std::iter::once(format!("{}@{}", recipe.workerd.npm_package, recipe.workerd.version))
            .chain(recipe.debs.iter().map(|d| format!("{}={}", d.package, d.version)))
            .collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": process,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": [
            { "created": created, "created_by": format!("workerbundle base-image: {}", packages[1..].join(" ")) },
            { "created": created, "created_by": format!("workerbundle base-image: {}", packages[0]) },
        ],
    });
    let serialize = |e: serde_json::Error| AssembleError::Serialize(e.to_string());
    let config = Blob::from_bytes(MediaType::ImageConfig, to_canonical_json(&config).map_err(serialize)?);
    let annotations: HashMap<String, String> = [
        (ANNOTATION_CREATED, created.clone()),
        (ANNOTATION_TITLE, "workerd base image".to_owned()),
        (ANNOTATION_VERSION, recipe.workerd.version.clone()),
        (ANNOTATION_DESCRIPTION, format!("workerd and its runtime, from {}", packages.join(", "))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.descriptor()?)
        .layers(blobs.iter().map(Blob::descriptor).collect::<Result<Vec<_>, _>>()?)
        .annotations(annotations)
        .build()
        .map_err(|e| AssembleError::Serialize(e.to_string()))?;
    let manifest =
        Blob::from_bytes(MediaType::ImageManifest, to_canonical_json(&manifest).map_err(serialize)?);

    for blob in blobs.iter().chain([&config, &manifest]) {
        writer.put_blob(&blob.digest, &blob.bytes)?;
    }
    writer.commit(tag, &manifest.descriptor()?)?;
    Ok(manifest.digest)
}
