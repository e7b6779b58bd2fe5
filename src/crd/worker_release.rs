//! WorkerRelease: one template of a WorkerDeployment, frozen. The controller fetches its scripts,
//! builds the worker's image layer once and pushes it; the status records what was built.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::template::{WorkerTemplate, WorkerVar};

#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "workerbundle.dev",
    version = "v1alpha1",
    kind = "WorkerRelease",
    namespaced,
    status = "WorkerReleaseStatus",
    shortname = "wr",
    category = "workers",
    validation = Rule::new("self.spec == oldSelf.spec").message("a WorkerRelease is immutable: change its WorkerDeployment's template instead"),
    printcolumn(name = "Script", type_ = "string", json_path = ".spec.template.scriptName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Layer", type_ = "string", json_path = ".status.layer.digest", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct WorkerReleaseSpec {
    pub template: WorkerTemplate,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ReleasePhase {
    #[default]
    Pending,
    Ready,
    Failed,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerReleaseStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: ReleasePhase,
    /// The worker's layer, pushed to `repository`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerDescriptor>,
    /// `registry/repository` the layer blob was pushed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The entry module the layer was built with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_module: Option<String>,
    /// The files the scripts resolved to, in the order workerd sees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<ResolvedModule>,
    /// How the worker runs, resolved from the template over the uploaded metadata: the bundle
    /// writes its workerd config from this and never reads the scripts again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<ResolvedSettings>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LayerDescriptor {
    pub media_type: String,
    /// sha256 of the compressed layer (the blob's name in the registry).
    pub digest: String,
    /// sha256 of the uncompressed tar (the image config's diffID).
    #[serde(rename = "diffID")]
    pub diff_id: String,
    pub size: i64,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedModule {
    /// The module's path inside the worker.
    pub name: String,
    /// The S3 URL the file came from.
    pub source: String,
    pub size: i64,
    pub sha256: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedSettings {
    pub compatibility_date: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compatibility_flags: Vec<String>,
    /// Plain-text and JSON bindings, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vars: Vec<WorkerVar>,
    /// Names of the `secret_text` bindings the uploaded metadata declares (never values); the
    /// keys of the template's Secret are added to them in the bundle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_names: Vec<String>,
    /// Prefix of the environment variables the worker's secrets are read from.
    pub env_prefix: String,
}
