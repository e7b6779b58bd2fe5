//! Image assembly: base layers + one layer per worker + the top-level config layer, a config that
//! keeps the base's settings, and a manifest. Pure: layers and the base's metadata in, blobs out;
//! writing them (to a layout or a registry) is the caller's job.
//!
//! The worker layers are given by reference ([`LayerRef`]): the CLI builds them a moment before,
//! the bundle controller takes them from its releases' statuses, where they were built and pushed
//! once. Either way only the config layer, the image config and the manifest are made here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use oci_spec::image::{
    Descriptor, ImageManifestBuilder, MediaType, ANNOTATION_BASE_IMAGE_DIGEST, ANNOTATION_BASE_IMAGE_NAME,
    ANNOTATION_CREATED,
};
use serde_json::{json, Value};

use super::block_cache::BlockCache;
use super::canonical::{rfc3339, to_canonical_json};
use super::layer::{LayerBuilder, LayerDigests, MEDIA_TYPE_LAYER_GZIP};
use super::workerd_config::{self, CONFIG_PATH};
use crate::digest::Digest;
use crate::oci::ImageMetadata;
use crate::worker::{ModuleContent, ServedWorker, WorkerCode};

/// Used when the base image names no entrypoint of its own.
pub const DEFAULT_WORKERD_PATH: &str = "/usr/local/bin/workerd";

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("{0}")]
    Workers(String),
    #[error("base image config is not usable: {0}")]
    BaseConfig(String),
    #[error("SOURCE_DATE_EPOCH {0} is outside the representable range")]
    Epoch(i64),
    #[error("cannot serialize the image: {0}")]
    Serialize(String),
    #[error("cannot write a layer: {0}")]
    Layer(#[from] std::io::Error),
}

#[derive(Clone, Debug)]
pub struct AssembleOptions {
    /// Seconds since the epoch for every mtime, `created` and the created annotation.
    pub source_date_epoch: i64,
    /// The base image's name for `org.opencontainers.image.base.name`.
    pub base_name: String,
}

impl AssembleOptions {
    /// The mtime of every file in the layers.
    pub fn mtime(&self) -> Result<u64, AssembleError> {
        u64::try_from(self.source_date_epoch).map_err(|_| AssembleError::Epoch(self.source_date_epoch))
    }
}

/// A blob in memory with its descriptor fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub media_type: MediaType,
    pub digest: Digest,
    pub bytes: Bytes,
}

impl Blob {
    pub fn from_bytes(media_type: MediaType, bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Blob { media_type, digest: Digest::of(&bytes), bytes }
    }

    pub fn descriptor(&self) -> Result<Descriptor, AssembleError> {
        descriptor(self.media_type.clone(), &self.digest, self.bytes.len() as u64)
    }

    /// The descriptor of a blob that is not in memory.
    pub fn descriptor_of(
        media_type: MediaType,
        digest: &Digest,
        size: u64,
    ) -> Result<Descriptor, AssembleError> {
        descriptor(media_type, digest, size)
    }
}

fn descriptor(media_type: MediaType, digest: &Digest, size: u64) -> Result<Descriptor, AssembleError> {
    let digest: oci_spec::image::Digest =
        digest.as_str().parse().map_err(|e| AssembleError::Serialize(format!("digest {digest}: {e}")))?;
    Ok(Descriptor::new(media_type, size, digest))
}

/// A gzipped layer as a manifest and an image config name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRef {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
}

impl LayerRef {
    fn descriptor(&self) -> Result<Descriptor, AssembleError> {
        descriptor(MediaType::Other(MEDIA_TYPE_LAYER_GZIP.into()), &self.digest, self.size)
    }
}

impl From<&LayerDigests> for LayerRef {
    fn from(d: &LayerDigests) -> Self {
        LayerRef { digest: d.digest.clone(), diff_id: d.diff_id.clone(), size: d.size }
    }
}

/// A layer this process made, with its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewLayer {
    pub diff_id: Digest,
    pub blob: Blob,
}

impl NewLayer {
    pub fn layer_ref(&self) -> LayerRef {
        LayerRef {
            digest: self.blob.digest.clone(),
            diff_id: self.diff_id.clone(),
            size: self.blob.bytes.len() as u64,
        }
    }
}

/// One worker of an image: how it is served, and its layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageWorker {
    pub served: ServedWorker,
    pub layer: LayerRef,
}

#[derive(Clone, Debug)]
pub struct AssembledImage {
    pub manifest: Blob,
    pub config: Blob,
    /// The top-level config layer (`config.capnp`).
    pub config_layer: NewLayer,
    /// The base's layers, reused as they are.
    pub base_layers: Vec<Descriptor>,
    /// The workers' layers, sorted by worker name (two workers may share one layer).
    pub worker_layers: Vec<LayerRef>,
}

impl AssembledImage {
    pub fn manifest_descriptor(&self) -> Result<Descriptor, AssembleError> {
        self.manifest.descriptor()
    }
}

/// Worker names and ports must each be unique within one image.
pub fn check_workers<'a>(workers: impl IntoIterator<Item = &'a ServedWorker>) -> Result<(), String> {
    let mut names = BTreeSet::new();
    let mut ports = BTreeMap::new();
    for w in workers {
        if !names.insert(w.name.as_str()) {
            return Err(format!("worker {:?} is given twice", w.name));
        }
        if let Some(other) = ports.insert(w.port, w.name.as_str()) {
            return Err(format!("workers {other:?} and {:?} both use port {}", w.name, w.port));
        }
    }
    if names.is_empty() {
        return Err("no workers: give at least one --worker".into());
    }
    Ok(())
}

/// A worker's layer: its module files under `src/` and the fragment that lists them.
pub fn worker_layer(code: &WorkerCode) -> LayerBuilder {
    let dir = workerd_config::worker_dir(&code.name);
    let mut layer = LayerBuilder::new();
    layer.file(&format!("{dir}/modules.capnp"), workerd_config::modules_fragment(code).into_bytes(), 0o644);
    for module in &code.modules {
        let path = format!("{dir}/{}", workerd_config::module_file(&module.path));
        match &module.content {
            ModuleContent::Memory(bytes) => layer.file(&path, bytes.clone(), 0o644),
            ModuleContent::File(source) => layer.stream_file(&path, source.clone(), 0o644),
        };
    }
    layer
}

/// Builds a worker's layer in memory, with the deflated blocks `cache` holds read from it.
pub fn build_worker_layer(
    code: &WorkerCode,
    mtime: u64,
    cache: Option<&Arc<BlockCache>>,
) -> Result<NewLayer, AssembleError> {
    make_layer(&worker_layer(code), mtime, cache)
}

/// The image of `workers` over `base`.
pub fn assemble(
    base: &ImageMetadata,
    workers: &[ImageWorker],
    options: &AssembleOptions,
) -> Result<AssembledImage, AssembleError> {
    check_workers(workers.iter().map(|w| &w.served)).map_err(AssembleError::Workers)?;
    let created =
        rfc3339(options.source_date_epoch).ok_or(AssembleError::Epoch(options.source_date_epoch))?;
    let mtime = options.mtime()?;

    let mut sorted: Vec<&ImageWorker> = workers.iter().collect();
    sorted.sort_by(|a, b| a.served.name.cmp(&b.served.name));
    let served: Vec<&ServedWorker> = sorted.iter().map(|w| &w.served).collect();

    let mut config_layer = LayerBuilder::new();
    config_layer.file(CONFIG_PATH, workerd_config::top_level_config(&served).into_bytes(), 0o644);
    let config_layer = make_layer(&config_layer, mtime, None)?;

    let worker_layers: Vec<LayerRef> = sorted.iter().map(|w| w.layer.clone()).collect();
    let mut roles: Vec<(String, &Digest)> =
        sorted.iter().map(|w| (format!("worker/{}", w.served.name), &w.layer.diff_id)).collect();
    roles.push(("config".into(), &config_layer.diff_id));
    let config = image_config(&base.config, &served, &roles, &created)?;
    let config = Blob::from_bytes(
        MediaType::ImageConfig,
        to_canonical_json(&config).map_err(|e| AssembleError::Serialize(e.to_string()))?,
    );

    let base_layers = base.manifest.layers().clone();
    let mut layers = base_layers.clone();
    for layer in &worker_layers {
        layers.push(layer.descriptor()?);
    }
    layers.push(config_layer.blob.descriptor()?);
    let annotations = [
        (ANNOTATION_CREATED.to_owned(), created),
        (ANNOTATION_BASE_IMAGE_NAME.to_owned(), options.base_name.clone()),
        (ANNOTATION_BASE_IMAGE_DIGEST.to_owned(), base.manifest_digest.to_string()),
    ];
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.descriptor()?)
        .layers(layers)
        .annotations(annotations.into_iter().collect::<std::collections::HashMap<_, _>>())
        .build()
        .map_err(|e| AssembleError::Serialize(e.to_string()))?;
    let manifest = Blob::from_bytes(
        MediaType::ImageManifest,
        to_canonical_json(&manifest).map_err(|e| AssembleError::Serialize(e.to_string()))?,
    );
    Ok(AssembledImage { manifest, config, config_layer, base_layers, worker_layers })
}

fn make_layer(
    layer: &LayerBuilder,
    mtime: u64,
    cache: Option<&Arc<BlockCache>>,
) -> Result<NewLayer, AssembleError> {
    let (digests, bytes) = layer.to_blob_cached(mtime, cache)?;
    let blob =
        Blob { media_type: MediaType::Other(MEDIA_TYPE_LAYER_GZIP.into()), digest: digests.digest, bytes };
    Ok(NewLayer { diff_id: digests.diff_id, blob })
}

/// The base's config with the workerd entrypoint, the workers' ports, the new diffIDs and history.
fn image_config(
    base: &Value,
    workers: &[&ServedWorker],
    new_layers: &[(String, &Digest)],
    created: &str,
) -> Result<Value, AssembleError> {
    let mut config = base.clone();
    let root = config.as_object_mut().ok_or_else(|| AssembleError::BaseConfig("not a JSON object".into()))?;
    root.insert("created".into(), json!(created));
    let process = root.entry("config").or_insert_with(|| json!({}));
    let process = process
        .as_object_mut()
        .ok_or_else(|| AssembleError::BaseConfig("\"config\" is not an object".into()))?;
    let workerd = process
        .get("Entrypoint")
        .and_then(|e| e.get(0))
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_WORKERD_PATH)
        .to_owned();
    process.insert("Entrypoint".into(), json!([workerd, "serve", format!("/{CONFIG_PATH}")]));
    process.remove("Cmd");
    let ports: serde_json::Map<String, Value> =
        workers.iter().map(|w| (format!("{}/tcp", w.port), json!({}))).collect();
    process.insert("ExposedPorts".into(), Value::Object(ports));

    let rootfs = root.entry("rootfs").or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
    let diff_ids = rootfs
        .get_mut("diff_ids")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| AssembleError::BaseConfig("rootfs.diff_ids is missing".into()))?;
    diff_ids.extend(new_layers.iter().map(|(_, diff_id)| json!(diff_id.as_str())));

    let history = root.entry("history").or_insert_with(|| json!([]));
    let history =
        history.as_array_mut().ok_or_else(|| AssembleError::BaseConfig("history is not a list".into()))?;
    history.extend(
        new_layers
            .iter()
            .map(|(role, _)| json!({"created": created, "created_by": format!("workerbundle: {role}")})),
    );
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{Module, ModuleKind, WorkerSettings};

    fn worker(name: &str, port: u16, code: &str) -> ImageWorker {
        let code = WorkerCode {
            name: name.into(),
            main_module: "index.js".into(),
            modules: vec![Module {
                path: "index.js".into(),
                kind: ModuleKind::EsModule,
                content: Bytes::from(code.to_owned()).into(),
            }],
        };
        let layer = build_worker_layer(&code, 0, None).unwrap().layer_ref();
        let settings = WorkerSettings {
            compatibility_date: "2024-09-23".into(),
            env_prefix: "P_".into(),
            ..WorkerSettings::default()
        };
        ImageWorker { served: ServedWorker { name: name.into(), port, settings }, layer }
    }

    fn base() -> ImageMetadata {
        let config = json!({"architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Entrypoint": ["/opt/workerd"], "Cmd": ["x"], "User": "65532"},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "1".repeat(64))]}});
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .config(descriptor(MediaType::ImageConfig, &Digest::of(b"c"), 1).unwrap())
            .layers(vec![descriptor(MediaType::ImageLayerGzip, &Digest::of(b"l"), 1).unwrap()])
            .build()
            .unwrap();
        ImageMetadata { manifest_digest: Digest::of(b"m"), manifest, config }
    }

    fn options() -> AssembleOptions {
        AssembleOptions { source_date_epoch: 0, base_name: "workerd-base".into() }
    }

    /// The worker layers, then the config layer.
    fn layer_digests(image: &AssembledImage) -> Vec<Digest> {
        let mut digests: Vec<Digest> = image.worker_layers.iter().map(|l| l.digest.clone()).collect();
        digests.push(image.config_layer.blob.digest.clone());
        digests
    }

    #[test]
    fn a_module_streamed_from_disk_gives_the_layer_it_gives_from_memory() {
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        std::fs::write(&path, &bytes).unwrap();
        let code = |big: ModuleContent| WorkerCode {
            name: "big".into(),
            main_module: "index.js".into(),
            modules: vec![
                Module { path: "big.bin".into(), kind: ModuleKind::Data, content: big },
                Module {
                    path: "index.js".into(),
                    kind: ModuleKind::EsModule,
                    content: Bytes::from_static(b"export default {}").into(),
                },
            ],
        };
        let in_memory = build_worker_layer(&code(Bytes::from(bytes.clone()).into()), 7, None).unwrap();
        let streamed =
            code(ModuleContent::File(super::super::file_source::FileSource::path(path, bytes.len() as u64)));
        assert!(streamed.streams_modules());
        let (digests, blob) = worker_layer(&streamed).write(Vec::new(), 7).unwrap();
        assert_eq!(LayerRef::from(&digests), in_memory.layer_ref());
        assert_eq!(blob, in_memory.blob.bytes);
    }

    #[test]
    fn config_keeps_base_settings_and_sets_entrypoint_ports_and_history() {
        let image = assemble(&base(), &[worker("b", 8081, "1"), worker("a", 8080, "2")], &options()).unwrap();
        let config: Value = serde_json::from_slice(&image.config.bytes).unwrap();
        assert_eq!(
            config["config"]["Entrypoint"],
            json!(["/opt/workerd", "serve", "/etc/workerd/config.capnp"])
        );
        assert_eq!(config["config"]["ExposedPorts"], json!({"8080/tcp": {}, "8081/tcp": {}}));
        assert_eq!(config["config"]["Env"], json!(["PATH=/bin"]));
        assert_eq!(config["config"]["User"], json!("65532"));
        assert!(config["config"].get("Cmd").is_none());
        assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 4);
        assert_eq!(config["created"], json!("1970-01-01T00:00:00Z"));
        let roles: Vec<&str> =
            config["history"].as_array().unwrap().iter().map(|h| h["created_by"].as_str().unwrap()).collect();
        assert_eq!(roles, ["workerbundle: worker/a", "workerbundle: worker/b", "workerbundle: config"]);
        let manifest: Value = serde_json::from_slice(&image.manifest.bytes).unwrap();
        assert_eq!(manifest["layers"].as_array().unwrap().len(), 4);
        assert_eq!(manifest["annotations"][ANNOTATION_BASE_IMAGE_NAME], json!("workerd-base"));
        assert_eq!(manifest["annotations"][ANNOTATION_BASE_IMAGE_DIGEST], json!(Digest::of(b"m").as_str()));
    }

    #[test]
    fn code_change_touches_only_that_workers_layer() {
        let before =
            assemble(&base(), &[worker("a", 8080, "1"), worker("b", 8081, "1")], &options()).unwrap();
        let after = assemble(&base(), &[worker("a", 8080, "1"), worker("b", 8081, "2")], &options()).unwrap();
        let (b, a) = (layer_digests(&before), layer_digests(&after));
        assert_eq!(b[0], a[0]);
        assert_ne!(b[1], a[1]);
        assert_eq!(b[2], a[2], "the top-level config layer must not change with code");
    }

    #[test]
    fn port_change_touches_only_the_config_layer() {
        let before =
            assemble(&base(), &[worker("a", 8080, "1"), worker("b", 8081, "1")], &options()).unwrap();
        let after = assemble(&base(), &[worker("a", 8080, "1"), worker("b", 9000, "1")], &options()).unwrap();
        let (b, a) = (layer_digests(&before), layer_digests(&after));
        assert_eq!(b[..2], a[..2]);
        assert_ne!(b[2], a[2]);
    }

    #[test]
    fn a_new_secret_name_touches_only_the_config_layer() {
        let before = assemble(&base(), &[worker("a", 8080, "1")], &options()).unwrap();
        let mut with_secret = worker("a", 8080, "1");
        with_secret.served.settings.secrets.insert("API_KEY".into());
        let after = assemble(&base(), &[with_secret], &options()).unwrap();
        let (b, a) = (layer_digests(&before), layer_digests(&after));
        assert_eq!(b[0], a[0]);
        assert_ne!(b[1], a[1]);
        assert_ne!(before.manifest.digest, after.manifest.digest);
    }

    #[test]
    fn duplicate_ports_and_names_are_refused() {
        let err =
            assemble(&base(), &[worker("a", 8080, "1"), worker("b", 8080, "1")], &options()).unwrap_err();
        assert!(err.to_string().contains("both use port 8080"), "{err}");
        let err =
            assemble(&base(), &[worker("a", 8080, "1"), worker("a", 8081, "1")], &options()).unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
    }
}
