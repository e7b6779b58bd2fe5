//! What a WorkerDeployment runs, and what a WorkerRelease freezes: the worker's scripts in S3 and
//! the settings that go with them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct WorkerTemplate {
    /// The worker's name (Cloudflare's script name): a DNS-1123 label.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub script_name: String,
    /// Where the worker's files are, in order: `s3://bucket/prefix/` (every object under it) or
    /// `s3://bucket/key` (one object). A file found under a later URL replaces the same path from
    /// an earlier one. A `metadata.json` among them supplies defaults for the fields below.
    #[schemars(length(min = 1, max = 32), inner(regex(pattern = r"^s3://[a-z0-9][a-z0-9.-]*[a-z0-9]/.*$")))]
    pub script_urls: Vec<String>,
    /// The entry module; defaults to metadata.json's `main_module`, then index.js/index.mjs/worker.js.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub main_module: Option<String>,
    /// workerd compatibility date (YYYY-MM-DD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"))]
    pub compatibility_date: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub compatibility_flags: Vec<String>,
    /// Plain-text and JSON bindings (Cloudflare's `vars`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub vars: Vec<WorkerVar>,
    /// A Secret in the same namespace whose keys become `secret_text` bindings; values are read
    /// from the environment at start-up and never enter the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_ref: Option<String>,
    /// Prefix of the environment variables secrets are read from; defaults to the script name
    /// upper-cased with `-` turned to `_`, plus `_`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"), length(max = 128))]
    pub env_prefix: Option<String>,
    /// The Cloudflare version this template is (a UUID), set by the upload API: part of the
    /// template so that every upload makes its own WorkerRelease, and deploying an older version
    /// brings back exactly that version's template, hence its release, with no rebuild.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"))]
    pub version_id: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub struct WorkerVar {
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// `text`: the value as a string; `json`: the value is JSON text, parsed into the binding.
    #[serde(rename = "type", default)]
    pub kind: VarType,
    pub value: String,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum VarType {
    #[default]
    Text,
    Json,
}
