//! Image assembly: base layers + one layer per worker + the top-level config layer, a config that
//! keeps the base's settings, and a manifest. Pure: workers and the base's metadata in, blobs out;
//! writing them (to a layout, later to a registry) is the caller's job.

use std::collections::BTreeSet;

use oci_spec::image::{
    Descriptor, ImageManifestBuilder, MediaType, ANNOTATION_BASE_IMAGE_DIGEST, ANNOTATION_BASE_IMAGE_NAME,
    ANNOTATION_CREATED,
};
use serde_json::{json, Value};

use super::canonical::{rfc3339, to_canonical_json};
use super::layer::{LayerBuilder, MEDIA_TYPE_LAYER_GZIP};
use super::layout::LayoutImage;
use super::workerd_config::{self, CONFIG_PATH};
use crate::digest::Digest;
use crate::worker::Worker;

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

/// A blob in memory with its descriptor fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub media_type: MediaType,
    pub digest: Digest,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn from_bytes(media_type: MediaType, bytes: Vec<u8>) -> Self {
        Blob { media_type, digest: Digest::of(&bytes), bytes }
    }

    pub fn descriptor(&self) -> Result<Descriptor, AssembleError> {
        descriptor(self.media_type.clone(), &self.digest, self.bytes.len() as u64)
    }
}

fn descriptor(media_type: MediaType, digest: &Digest, size: u64) -> Result<Descriptor, AssembleError> {
    let digest: oci_spec::image::Digest =
        digest.as_str().parse().map_err(|e| AssembleError::Serialize(format!("digest {digest}: {e}")))?;
    Ok(Descriptor::new(media_type, size, digest))
}

/// A layer this build made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewLayer {
    /// `worker/<name>` or `config`.
    pub role: String,
    pub diff_id: Digest,
    pub blob: Blob,
}

#[derive(Clone, Debug)]
pub struct AssembledImage {
    pub manifest: Blob,
    pub config: Blob,
    /// The base's layers, reused as they are.
    pub base_layers: Vec<Descriptor>,
    /// One per worker (sorted by name), then the top-level config layer.
    pub new_layers: Vec<NewLayer>,
}

impl AssembledImage {
    pub fn manifest_descriptor(&self) -> Result<Descriptor, AssembleError> {
        self.manifest.descriptor()
    }
}

/// Worker names and ports must each be unique within one image.
pub fn check_workers(workers: &[Worker]) -> Result<(), String> {
    if workers.is_empty() {
        return Err("no workers: give at least one --worker".into());
    }
    let mut names = BTreeSet::new();
    let mut ports = std::collections::BTreeMap::new();
    for w in workers {
        if !names.insert(w.name.as_str()) {
            return Err(format!("worker {:?} is given twice", w.name));
        }
        if let Some(other) = ports.insert(w.port, w.name.as_str()) {
            return Err(format!("workers {other:?} and {:?} both use port {}", w.name, w.port));
        }
    }
    Ok(())
}

pub fn assemble(
    base: &LayoutImage,
    workers: &[Worker],
    options: &AssembleOptions,
) -> Result<AssembledImage, AssembleError> {
    check_workers(workers).map_err(AssembleError::Workers)?;
    let created =
        rfc3339(options.source_date_epoch).ok_or(AssembleError::Epoch(options.source_date_epoch))?;
    let mtime = u64::try_from(options.source_date_epoch)
        .map_err(|_| AssembleError::Epoch(options.source_date_epoch))?;

    let mut sorted: Vec<&Worker> = workers.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));

    let mut new_layers = Vec::with_capacity(sorted.len() + 1);
    for worker in &sorted {
        new_layers.push(make_layer(format!("worker/{}", worker.name), &worker_layer(worker), mtime)?);
    }
    let mut config_layer = LayerBuilder::new();
    config_layer.file(CONFIG_PATH, workerd_config::top_level_config(&sorted).into_bytes(), 0o644);
    new_layers.push(make_layer("config".into(), &config_layer, mtime)?);

    let config = image_config(&base.config, &sorted, &new_layers, &created)?;
    let config = Blob::from_bytes(
        MediaType::ImageConfig,
        to_canonical_json(&config).map_err(|e| AssembleError::Serialize(e.to_string()))?,
    );

    let base_layers = base.manifest.layers().clone();
    let mut layers = base_layers.clone();
    for layer in &new_layers {
        layers.push(layer.blob.descriptor()?);
    }
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
    Ok(AssembledImage { manifest, config, base_layers, new_layers })
}

/// A worker's layer: its module files under `src/` and the fragment that lists them.
pub fn worker_layer(worker: &Worker) -> LayerBuilder {
    let dir = workerd_config::worker_dir(&worker.name);
    let mut layer = LayerBuilder::new();
    layer.file(&format!("{dir}/modules.capnp"), workerd_config::modules_fragment(worker).into_bytes(), 0o644);
    for module in &worker.modules {
        layer.file(
            &format!("{dir}/{}", workerd_config::module_file(&module.path)),
            module.content.clone(),
            0o644,
        );
    }
    layer
}

fn make_layer(role: String, layer: &LayerBuilder, mtime: u64) -> Result<NewLayer, AssembleError> {
    let (digests, bytes) = layer.to_blob(mtime)?;
    let blob =
        Blob { media_type: MediaType::Other(MEDIA_TYPE_LAYER_GZIP.into()), digest: digests.digest, bytes };
    Ok(NewLayer { role, diff_id: digests.diff_id, blob })
}

/// The base's config with the workerd entrypoint, the workers' ports, the new diffIDs and history.
fn image_config(
    base: &Value,
    workers: &[&Worker],
    new_layers: &[NewLayer],
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
    diff_ids.extend(new_layers.iter().map(|l| json!(l.diff_id.as_str())));

    let history = root.entry("history").or_insert_with(|| json!([]));
    let history =
        history.as_array_mut().ok_or_else(|| AssembleError::BaseConfig("history is not a list".into()))?;
    history.extend(
        new_layers
            .iter()
            .map(|l| json!({"created": created, "created_by": format!("workerbundle: {}", l.role)})),
    );
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{Module, ModuleKind};

    fn worker(name: &str, port: u16, code: &str) -> Worker {
        Worker {
            name: name.into(),
            port,
            env_prefix: "P_".into(),
            main_module: "index.js".into(),
            compatibility_date: "2024-09-23".into(),
            compatibility_flags: vec![],
            bindings: vec![],
            modules: vec![Module {
                path: "index.js".into(),
                kind: ModuleKind::EsModule,
                content: code.as_bytes().to_vec(),
            }],
        }
    }

    fn base() -> LayoutImage {
        let config = json!({"architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Entrypoint": ["/opt/workerd"], "Cmd": ["x"], "User": "65532"},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", "1".repeat(64))]}});
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .config(descriptor(MediaType::ImageConfig, &Digest::of(b"c"), 1).unwrap())
            .layers(vec![descriptor(MediaType::ImageLayerGzip, &Digest::of(b"l"), 1).unwrap()])
            .build()
            .unwrap();
        LayoutImage { manifest_digest: Digest::of(b"m"), manifest, config }
    }

    fn options() -> AssembleOptions {
        AssembleOptions { source_date_epoch: 0, base_name: "workerd-base".into() }
    }

    fn layer_digests(image: &AssembledImage) -> Vec<Digest> {
        image.new_layers.iter().map(|l| l.blob.digest.clone()).collect()
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
        let roles: Vec<&str> = image.new_layers.iter().map(|l| l.role.as_str()).collect();
        assert_eq!(roles, ["worker/a", "worker/b", "config"]);
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
    fn duplicate_ports_and_names_are_refused() {
        let err =
            assemble(&base(), &[worker("a", 8080, "1"), worker("b", 8080, "1")], &options()).unwrap_err();
        assert!(err.to_string().contains("both use port 8080"), "{err}");
        let err =
            assemble(&base(), &[worker("a", 8080, "1"), worker("a", 8081, "1")], &options()).unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
    }
}
