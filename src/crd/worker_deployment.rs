//! WorkerDeployment: what to run for one script of one account. Each distinct template becomes
//! an immutable WorkerRelease; going back to an earlier template reuses its release.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::template::WorkerTemplate;

pub const DEFAULT_RELEASE_HISTORY_LIMIT: u32 = 10;

fn default_release_history_limit() -> u32 {
    DEFAULT_RELEASE_HISTORY_LIMIT
}

#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "workerbundle.dev",
    version = "v1alpha1",
    kind = "WorkerDeployment",
    namespaced,
    status = "WorkerDeploymentStatus",
    shortname = "wd",
    category = "workers",
    printcolumn(name = "Script", type_ = "string", json_path = ".spec.template.scriptName"),
    printcolumn(name = "Release", type_ = "string", json_path = ".status.currentRelease"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct WorkerDeploymentSpec {
    pub template: WorkerTemplate,
    /// Releases kept besides the current one, most recently current first; older ones are
    /// deleted. Going back to a kept template reuses its release without a rebuild.
    #[serde(default = "default_release_history_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub release_history_limit: u32,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerDeploymentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The release made from the current template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_release: Option<String>,
    /// Releases of this deployment, most recently current first (the current one included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub release_history: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
