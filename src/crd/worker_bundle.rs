//! WorkerBundle: everything one account runs, as one image and one Deployment. Filled in by the
//! account's controller; built and rolled out by the bundle's.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Clone, Debug, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "workerbundle.dev",
    version = "v1alpha1",
    kind = "WorkerBundle",
    namespaced,
    status = "WorkerBundleStatus",
    shortname = "wb",
    category = "workers",
    printcolumn(name = "Deployment", type_ = "string", json_path = ".spec.deploymentName"),
    printcolumn(name = "Image", type_ = "string", json_path = ".status.image", priority = 1),
    printcolumn(
        name = "Serving",
        type_ = "string",
        json_path = ".status.rollout.servingImage",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct WorkerBundleSpec {
    /// The Deployment (and Service) that runs the bundle's image.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub deployment_name: String,
    /// The repository images are pushed to (`registry/path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// A base image other than the controller's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image: Option<String>,
    /// One entry per worker; names and ports are unique. At most 200, which keeps the uniqueness
    /// rules well inside the API server's CEL cost budget.
    #[serde(default)]
    #[schemars(length(max = 200))]
    #[x_kube(validation = Rule::new("self.all(w, self.exists_one(x, x.workerName == w.workerName))").message("workerName must be unique"))]
    #[x_kube(validation = Rule::new("self.all(w, self.exists_one(x, x.workerNumber == w.workerNumber))").message("workerNumber (the port) must be unique"))]
    pub workers: Vec<BundleWorker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<BundlePodTemplate>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BundleWorker {
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub worker_name: String,
    /// The port workerd serves this worker on; kept across releases.
    #[schemars(range(min = 1024, max = 65535))]
    pub worker_number: u16,
    /// Prefix of the environment variables this worker's secrets are read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_prefix: Option<String>,
    /// The Secret holding this worker's secret values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// The WorkerRelease whose layer runs.
    #[schemars(length(min = 1, max = 253))]
    pub release: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BundlePodTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerBundleStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The image the bundle wants, by digest (`registry/repository@sha256:...`): pushed, and the
    /// image of the Deployment's pod template. Whether it serves yet is `rollout.complete`; the
    /// image that serves meanwhile is `rollout.servingImage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The image before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_image: Option<String>,
    /// Images of this bundle that are no longer current and not deleted yet: they are deleted
    /// from the registry once `image` is fully rolled out, unless something still uses them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stale_images: Vec<String>,
    /// The base image the bundle is built on, pinned by digest when it was first resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image: Option<BaseImageStatus>,
    /// The Deployment's rollout of `image`, and the image that serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BaseImageStatus {
    /// The reference as configured (`docker://...` or `oci:DIR:TAG`).
    pub reference: String,
    /// Its manifest digest when it was resolved.
    pub digest: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The Deployment's generation the numbers below are about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub replicas: i32,
    pub updated_replicas: i32,
    pub ready_replicas: i32,
    pub available_replicas: i32,
    /// Whether every replica runs `image` and is available.
    pub complete: bool,
    /// The image every available replica runs: `image` once its rollout is complete, else the
    /// last image whose rollout completed (the Deployment's old ReplicaSet still runs it, and it
    /// is never purged while it does); absent before any rollout completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_image: Option<String>,
}
