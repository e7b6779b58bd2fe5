//! WorkerAccount: one account's workers. It owns the account's WorkerBundle and keeps its worker
//! list in step with the current, Ready release of every WorkerDeployment it selects.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "workerbundle.dev",
    version = "v1alpha1",
    kind = "WorkerAccount",
    namespaced,
    status = "WorkerAccountStatus",
    shortname = "wa",
    category = "workers",
    printcolumn(name = "Bundle", type_ = "string", json_path = ".status.workerBundleName"),
    printcolumn(name = "Workers", type_ = "integer", json_path = ".status.workers"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct WorkerAccountSpec {
    /// The account's WorkerBundle (and Deployment) name; defaults to `workers-<account name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub worker_bundle_name: Option<String>,
    /// Which WorkerDeployments (by their labels) run in this account; defaults to those labelled
    /// `workerbundle.dev/account: <account name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_release_selector: Option<LabelSelector>,
    /// The repository the account's layers and images are pushed to (`registry/path`); defaults
    /// to the controller's `--repository-prefix` plus the account name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub repository: Option<String>,
    /// A base image other than the controller's (`registry/repo@sha256:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub base_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<AccountPodTemplate>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AccountPodTemplate {
    /// A `kubernetes.io/dockerconfigjson` Secret used to pull the image and to push to the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secret: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerAccountStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_bundle_name: Option<String>,
    /// How many workers the bundle lists.
    #[serde(default)]
    pub workers: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
