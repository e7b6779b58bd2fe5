//! A script upload (wrangler's multipart form): read part by part under the limits, then validated
//! whole — metadata, every module, the main module among them, bindings we can serve — before
//! anything is stored. Also what a stored version means as a WorkerDeployment template.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::multipart::{Multipart, MultipartError};
use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::envelope::ApiError;
use super::limits::Limits;
use super::path::{AccountId, ScriptName, VersionId};
use super::store::ObjectKey;
use crate::crd::{VarType, WorkerTemplate, WorkerVar};
use crate::worker::names::{check_module_path, check_worker_name, tenant_env_prefix};
use crate::worker::{ModuleContent, ModuleKind, Overrides, Worker, WorkerFiles, METADATA_FILE};

/// The form part that carries the metadata JSON.
const METADATA_PART: &str = "metadata";
/// Metadata is a small JSON document; anything bigger is not metadata.
const MAX_METADATA_BYTES: usize = 1 << 20;
/// Binding types that are accepted but carry nothing to store (see `validate`).
const SECRET_TYPES: [&str; 2] = ["secret_text", "inherit"];

/// One part of the form, read whole.
#[derive(Clone, Debug)]
pub struct Part {
    pub name: String,
    /// The part's Content-Type: wrangler's module type (see [`check_module_type`]).
    pub content_type: Option<String>,
    pub bytes: Bytes,
}

/// A validated upload: what goes to S3.
#[derive(Clone, Debug)]
pub struct Upload {
    /// Module path → content, sorted by path.
    pub modules: BTreeMap<String, Bytes>,
    /// The `metadata.json` stored beside the modules: Cloudflare's format, with only what we
    /// serve (no secret values, ever).
    pub metadata: Value,
    /// Vars of the running version the upload asks to keep (see [`inherit_vars`]).
    pub keep: Keep,
    /// The worker as workerd will load it, for the start-up check.
    pub worker: Worker,
}

/// Vars an upload keeps from the version that runs now: all plain-text or all JSON ones
/// (`keep_bindings`, wrangler's `keep_vars = true`), or some by name (`inherit` bindings).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keep {
    pub text: bool,
    pub json: bool,
    pub names: BTreeSet<String>,
}

impl Keep {
    pub fn is_empty(&self) -> bool {
        !self.text && !self.json && self.names.is_empty()
    }
}

/// Reads the form part by part, refusing as soon as a limit is passed. The body's total size is
/// capped by the router's body limit; a body cut off there is reported as too large.
pub async fn read_parts(multipart: &mut Multipart, limits: &Limits) -> Result<Vec<Part>, ApiError> {
    let mut parts = Vec::new();
    let mut modules = 0;
    while let Some(mut field) = multipart.next_field().await.map_err(|e| form_error(e, limits))? {
        let name = field.name().unwrap_or_default().to_owned();
        let content_type = field.content_type().map(str::to_owned);
        if name != METADATA_PART {
            modules += 1;
        }
        if modules > limits.max_modules {
            return Err(ApiError::TooLarge(format!(
                "the upload has more than {} modules (the limit)",
                limits.max_modules
            )));
        }
        let cap = if name == METADATA_PART { MAX_METADATA_BYTES } else { limits.max_module_bytes };
        let mut bytes = BytesMut::new();
        while let Some(chunk) = field.chunk().await.map_err(|e| form_error(e, limits))? {
            if bytes.len() + chunk.len() > cap {
                return Err(ApiError::TooLarge(format!(
                    "part {name:?} is larger than the limit of {cap} bytes per {}",
                    if name == METADATA_PART { "metadata part" } else { "module" }
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        parts.push(Part { name, content_type, bytes: bytes.freeze() });
    }
    Ok(parts)
}

fn form_error(error: MultipartError, limits: &Limits) -> ApiError {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(format!(
            "the upload is larger than the limit of {} bytes",
            limits.max_upload_bytes
        ))
    } else {
        ApiError::Invalid(format!(
            "the upload is not a valid multipart/form-data body: {}",
            error.body_text()
        ))
    }
}

/// What this server does with one top-level field of an upload's metadata.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Stored with the version and served.
    Served,
    /// Accepted: the value asks for nothing this server would have to do (an empty list, `false`,
    /// `observability`: a worker's logs go to workerd's output, where the pod's log collects them).
    NothingToDo,
    /// Refused, saying which setting and why.
    Refused(String),
}

/// Every top-level metadata field wrangler 4.86.0 can send (`createWorkerUploadForm`, the draft
/// worker of `secret put` / `secret bulk`, `versions secret put`, with `unsafe.metadata` any other
/// name), and `usage_model` from Cloudflare's API. Each has a verdict in [`metadata_verdict`].
pub const METADATA_FIELDS: [&str; 20] = [
    "main_module",
    "body_part",
    "bindings",
    "compatibility_date",
    "compatibility_flags",
    "keep_bindings",
    "annotations",
    "migrations",
    "capnp_schema",
    "logpush",
    "placement",
    "tail_consumers",
    "streaming_tail_consumers",
    "limits",
    "keep_assets",
    "assets",
    "observability",
    "cache_options",
    "containers",
    "usage_model",
];

/// An empty setting: absent in all but name (null, false, [] or {}).
fn is_empty_setting(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// The verdict on metadata field `field` with `value`: every field is served or refused by name,
/// never dropped, so a deploy never silently loses a setting.
pub fn metadata_verdict(field: &str, value: &Value) -> Verdict {
    let refused = |message: &str| Verdict::Refused(message.to_owned());
    let unless_empty = |message: &str| {
        if is_empty_setting(value) {
            Verdict::NothingToDo
        } else {
            refused(message)
        }
    };
    match field {
        "main_module"
        | "bindings"
        | "compatibility_date"
        | "compatibility_flags"
        | "keep_bindings"
        | "annotations" => Verdict::Served,
        // Where a worker's console output and exceptions go is not a per-worker choice here.
        "observability" => Verdict::NothingToDo,
        // No assets are served, so a version has none to keep.
        "keep_assets" if value.is_boolean() || value.is_null() => Verdict::NothingToDo,
        "keep_assets" => refused("keep_assets must be true or false"),
        "body_part" => refused(
            "the service-worker format (body_part) is not supported: upload ES modules (wrangler \
             does by default; main_module names the entry)",
        ),
        "logpush" => unless_empty("logpush (logpush = true) is not served yet"),
        "tail_consumers" => unless_empty("tail consumers (tail_consumers) are not served yet"),
        "streaming_tail_consumers" => {
            unless_empty("streaming tail consumers (streaming_tail_consumers) are not served yet")
        }
        "placement" if value["mode"] == "off" && value.get("hint").is_none() => Verdict::NothingToDo,
        "placement" => {
            unless_empty("placement ([placement] mode) is not served: a worker runs in its account's pods")
        }
        "limits" => unless_empty("limits ([limits] cpu_ms, subrequests) are not enforced yet"),
        "migrations" => unless_empty("migrations (Durable Objects) are not served yet"),
        "assets" => unless_empty("static assets ([assets]) are not served yet"),
        "containers" => unless_empty("containers ([[containers]]) are not served"),
        "cache_options" if value["enabled"] == false => Verdict::NothingToDo,
        "cache_options" => unless_empty("the cache setting ([cache] enabled) is not served yet"),
        "capnp_schema" => unless_empty("unsafe Cap'n Proto schemas (capnp_schema) are not served"),
        "usage_model" if value.is_null() || value == "standard" => Verdict::NothingToDo,
        "usage_model" => refused("usage models other than \"standard\" are not served"),
        other => Verdict::Refused(format!(
            "metadata field {other:?} is not known to this server (refused rather than dropped)"
        )),
    }
}

/// The annotations a version keeps: wrangler's `--message` and `--tag`.
const ANNOTATIONS: [&str; 2] = ["workers/message", "workers/tag"];

/// The metadata fields this server serves; every other field has passed [`metadata_verdict`].
#[derive(Debug, Deserialize)]
struct UploadMetadata {
    main_module: Option<String>,
    compatibility_date: Option<String>,
    #[serde(default)]
    compatibility_flags: Vec<String>,
    #[serde(default)]
    bindings: Vec<Value>,
    #[serde(default)]
    annotations: BTreeMap<String, Value>,
    #[serde(default)]
    keep_bindings: Vec<String>,
}

/// Parses the metadata part: every field gets its verdict; all refusals are named in one error.
fn parse_metadata(bytes: &[u8]) -> Result<UploadMetadata, ApiError> {
    let invalid = |e: serde_json::Error| {
        ApiError::Invalid(format!("the `metadata` part is not valid upload metadata JSON: {e}"))
    };
    let fields: Map<String, Value> = serde_json::from_slice(bytes).map_err(invalid)?;
    let refusals: Vec<String> = fields
        .iter()
        .filter_map(|(field, value)| match metadata_verdict(field, value) {
            Verdict::Refused(message) => Some(message),
            Verdict::Served | Verdict::NothingToDo => None,
        })
        .collect();
    if !refusals.is_empty() {
        return Err(ApiError::Invalid(format!(
            "the upload asks for what this server does not serve: {}",
            refusals.join("; ")
        )));
    }
    let served: Map<String, Value> = fields
        .into_iter()
        .filter(|(field, value)| metadata_verdict(field, value) == Verdict::Served && !value.is_null())
        .collect();
    serde_json::from_value(Value::Object(served)).map_err(invalid)
}

/// Validates a whole upload for worker `script`. Pure: nothing is read or written.
///
/// `secret_text` bindings: a value in the upload is refused (secrets go through `wrangler secret
/// put`, into the worker's Secret, never to S3); a `secret_text` or `inherit` binding without a
/// value is accepted and not stored, because the worker's Secret keeps its secrets across uploads.
pub fn validate(script: &str, mut parts: Vec<Part>, limits: &Limits) -> Result<Upload, ApiError> {
    check_worker_name(script).map_err(|e| ApiError::Invalid(format!("script name: {e}")))?;
    name_draft_module(&mut parts);
    let mut metadata_bytes = None;
    let mut modules = BTreeMap::new();
    for part in parts {
        if part.name == METADATA_PART {
            if metadata_bytes.replace(part.bytes).is_some() {
                return Err(ApiError::Invalid("the upload has two `metadata` parts".into()));
            }
            continue;
        }
        check_module_path(&part.name).map_err(|e| ApiError::Invalid(format!("module name: {e}")))?;
        if part.name == METADATA_FILE {
            return Err(ApiError::Invalid(format!(
                "a module may not be named {METADATA_FILE:?}: that name holds the worker's metadata"
            )));
        }
        check_module_type(&part.name, part.content_type.as_deref())?;
        if part.bytes.len() > limits.max_module_bytes {
            return Err(ApiError::TooLarge(format!(
                "module {:?} is {} bytes, over the limit of {} bytes per module",
                part.name,
                part.bytes.len(),
                limits.max_module_bytes
            )));
        }
        if modules.insert(part.name.clone(), part.bytes).is_some() {
            return Err(ApiError::Invalid(format!("module {:?} is uploaded twice", part.name)));
        }
    }
    if modules.len() > limits.max_modules {
        return Err(ApiError::TooLarge(format!(
            "the upload has {} modules, over the limit of {}",
            modules.len(),
            limits.max_modules
        )));
    }
    let metadata_bytes = metadata_bytes.ok_or_else(|| {
        ApiError::Invalid("the upload has no `metadata` part (Cloudflare's script upload format)".into())
    })?;
    let raw = parse_metadata(&metadata_bytes)?;
    let keep = Keep {
        text: raw.keep_bindings.iter().any(|k| k == "plain_text"),
        json: raw.keep_bindings.iter().any(|k| k == "json"),
        names: raw
            .bindings
            .iter()
            .filter(|b| b["type"] == "inherit")
            .filter_map(|b| b["name"].as_str().map(str::to_owned))
            .collect(),
    };
    let metadata = stored_metadata(raw)?;

    // The same validation every worker source gets (issue A): module paths, the main module among
    // the modules and JavaScript, compatibility date and flags, binding names.
    let mut files: BTreeMap<String, ModuleContent> =
        modules.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
    files.insert(METADATA_FILE.into(), bytes::Bytes::from(metadata.to_string().into_bytes()).into());
    // The environment prefix the controller gives a tenant's worker (never one from its name).
    let overrides = Overrides { env_prefix: Some(tenant_env_prefix(script)), ..Overrides::default() };
    let worker = Worker::from_files(WorkerFiles { name: script.to_owned(), files }, &overrides)
        .map_err(|e| ApiError::Invalid(e.message))?;
    Ok(Upload { modules, metadata, keep, worker })
}

/// `wrangler secret put` on a worker that does not exist yet first uploads a draft: one ES module
/// named like the worker, without an extension. The builder types modules by extension, so that
/// one module is stored as `<name>.mjs` (nothing can import it: it is the only module).
fn name_draft_module(parts: &mut [Part]) {
    let modules: Vec<usize> = (0..parts.len()).filter(|&i| parts[i].name != METADATA_PART).collect();
    let [only] = modules[..] else { return };
    let declared_esm =
        parts[only].content_type.as_deref().is_some_and(|c| c.starts_with("application/javascript+module"));
    if parts[only].name.contains(['.', '/']) || !declared_esm {
        return;
    }
    let name = parts[only].name.clone();
    let Some(meta) = parts.iter().position(|p| p.name == METADATA_PART) else { return };
    let Ok(mut metadata) = serde_json::from_slice::<Value>(&parts[meta].bytes) else { return };
    if metadata["main_module"] != name.as_str() {
        return;
    }
    let renamed = format!("{name}.mjs");
    metadata["main_module"] = json!(renamed);
    parts[meta].bytes = Bytes::from(metadata.to_string());
    parts[only].name = renamed;
}

/// The image builder decides a module's type by its extension (issue A's format has no per-module
/// type). wrangler says the type in each part's Content-Type; a module whose declared type is not
/// what its extension gives would run as the wrong kind, so it is refused, not silently changed.
pub fn check_module_type(name: &str, content_type: Option<&str>) -> Result<(), ApiError> {
    let Some(declared) = content_type.map(|c| c.split(';').next().unwrap_or_default().trim()) else {
        return Ok(());
    };
    let kind = ModuleKind::from_path(name);
    let fits = match declared {
        "application/javascript+module" => kind == ModuleKind::EsModule,
        "application/javascript" => kind == ModuleKind::CommonJs,
        "application/wasm" => kind == ModuleKind::Wasm,
        "text/plain" | "application/source-map" => kind == ModuleKind::Text,
        "application/json" => kind == ModuleKind::Json,
        "application/octet-stream" => kind == ModuleKind::Data,
        _ => false,
    };
    if fits {
        return Ok(());
    }
    Err(ApiError::Invalid(format!(
        "module {name:?} is sent as {declared:?}, but this server gives modules their type by \
         extension and would run it as {}: rename it (.js/.mjs ES module, .cjs CommonJS, .wasm, \
         .json, .txt/.html/... text, others data) or change the wrangler rule",
        kind.capnp_field()
    )))
}

fn stored_metadata(raw: UploadMetadata) -> Result<Value, ApiError> {
    let main_module =
        raw.main_module.ok_or_else(|| ApiError::Invalid("the metadata names no main_module".into()))?;
    let mut bindings = Vec::new();
    let mut names = BTreeSet::new();
    for binding in raw.bindings {
        let name = binding["name"].as_str().unwrap_or_default().to_owned();
        let kind = binding["type"].as_str().unwrap_or_default().to_owned();
        if name.is_empty() || kind.is_empty() {
            return Err(ApiError::Invalid(format!("a binding without a name or type: {binding}")));
        }
        if !names.insert(name.clone()) {
            return Err(ApiError::Invalid(format!("binding {name:?} is defined twice")));
        }
        match kind.as_str() {
            "plain_text" => {
                let text = binding["text"].as_str().ok_or_else(|| {
                    ApiError::Invalid(format!("plain_text binding {name:?} has no string \"text\""))
                })?;
                bindings.push(json!({"name": name, "type": "plain_text", "text": text}));
            }
            "json" => {
                let value = binding.get("json").ok_or_else(|| {
                    ApiError::Invalid(format!("json binding {name:?} has no \"json\" value"))
                })?;
                bindings.push(json!({"name": name, "type": "json", "json": value}));
            }
            "secret_text" if binding.get("text").is_some() => {
                return Err(ApiError::Invalid(format!(
                    "secret_text binding {name:?} carries its value in the upload; secrets are set with \
                     `wrangler secret put {name}` and never stored with the code"
                )))
            }
            t if SECRET_TYPES.contains(&t) => {}
            other => {
                return Err(ApiError::Invalid(format!(
                    "binding {name:?} has type {other:?}, which this server does not support yet \
                     (supported: plain_text and json vars; secrets through `wrangler secret put`)"
                )))
            }
        }
    }
    let mut stored = Map::new();
    stored.insert("main_module".into(), json!(main_module));
    if let Some(date) = raw.compatibility_date {
        stored.insert("compatibility_date".into(), json!(date));
    }
    if !raw.compatibility_flags.is_empty() {
        stored.insert("compatibility_flags".into(), json!(raw.compatibility_flags));
    }
    stored.insert("bindings".into(), Value::Array(bindings));
    // wrangler's --message and --tag: shown again by `versions list` and `deployments list`.
    let mut annotations = Map::new();
    for (key, value) in raw.annotations {
        if !ANNOTATIONS.contains(&key.as_str()) {
            return Err(ApiError::Invalid(format!(
                "annotation {key:?} is not served (only workers/message and workers/tag)"
            )));
        }
        match value {
            Value::String(_) => {
                annotations.insert(key, value);
            }
            Value::Null => {}
            other => {
                return Err(ApiError::Invalid(format!("annotation {key:?} must be a string, not {other}")))
            }
        }
    }
    if !annotations.is_empty() {
        stored.insert("annotations".into(), Value::Object(annotations));
    }
    Ok(Value::Object(stored))
}

/// Adds to an upload's metadata the vars of the running template it keeps and does not define
/// itself. An `inherit` of a name that is not a var is a secret: secrets stay in the worker's
/// Secret whatever the upload says.
pub fn inherit_vars(metadata: &mut Value, keep: &Keep, running: &WorkerTemplate) {
    let Some(bindings) = metadata.get_mut("bindings").and_then(Value::as_array_mut) else { return };
    for var in &running.vars {
        let defined = bindings.iter().any(|b| b["name"] == var.name.as_str());
        let kept = keep.names.contains(&var.name)
            || match var.kind {
                VarType::Text => keep.text,
                VarType::Json => keep.json,
            };
        if defined || !kept {
            continue;
        }
        bindings.push(match var.kind {
            VarType::Text => json!({"name": var.name, "type": "plain_text", "text": var.value}),
            VarType::Json => json!({"name": var.name, "type": "json",
                "json": serde_json::from_str::<Value>(&var.value).unwrap_or(Value::Null)}),
        });
    }
}

/// The Secret holding a script's secrets (in the account's namespace). A WorkerDeployment name is
/// at most 63 characters, so this stays well inside a Secret name's 253.
pub fn secret_name(script: &str) -> String {
    format!("{script}-secrets")
}

/// The template of version `version` of (account, script), from its stored metadata. A pure
/// function of what is in S3, so a version deployed later (`versions upload`, then `deployments`)
/// gets exactly the template an upload would have applied: the same release.
pub fn template_for(
    bucket: &str,
    account: &AccountId,
    script: &ScriptName,
    version: &VersionId,
    metadata: &Value,
) -> Result<WorkerTemplate, String> {
    let text = |key: &str| metadata[key].as_str().map(str::to_owned);
    let flags = metadata["compatibility_flags"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    let mut vars = Vec::new();
    for binding in metadata["bindings"].as_array().into_iter().flatten() {
        let name = binding["name"].as_str().unwrap_or_default().to_owned();
        match binding["type"].as_str() {
            Some("plain_text") => vars.push(WorkerVar {
                name,
                kind: VarType::Text,
                value: binding["text"].as_str().unwrap_or_default().to_owned(),
            }),
            Some("json") => {
                vars.push(WorkerVar { name, kind: VarType::Json, value: binding["json"].to_string() })
            }
            other => return Err(format!("stored metadata has a binding of type {other:?}")),
        }
    }
    Ok(WorkerTemplate {
        script_name: script.as_str().to_owned(),
        script_urls: vec![format!(
            "s3://{bucket}/{}",
            ObjectKey::version_prefix(account, script, version).as_str()
        )],
        main_module: Some(text("main_module").ok_or("stored metadata names no main_module")?),
        compatibility_date: text("compatibility_date"),
        compatibility_flags: flags,
        vars,
        secret_ref: Some(secret_name(script.as_str())),
        env_prefix: None,
        version_id: Some(version.as_str().to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str, content: &str) -> Part {
        Part { name: name.into(), content_type: None, bytes: Bytes::from(content.to_owned()) }
    }

    fn metadata(json: &str) -> Part {
        part("metadata", json)
    }

    const MAIN: &str = r#"{"main_module":"index.js","compatibility_date":"2024-09-23","bindings":[
        {"name":"GREETING","type":"plain_text","text":"hi"},{"name":"CFG","type":"json","json":{"a":[1,2]}},
        {"name":"OLD","type":"secret_text"}],"annotations":{"workers/message":"m"},
        "observability":{"enabled":false}}"#;

    fn upload(parts: Vec<Part>) -> Result<Upload, ApiError> {
        validate("hello", parts, &Limits::default())
    }

    fn invalid(parts: Vec<Part>) -> String {
        match upload(parts) {
            Err(ApiError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_good_upload_keeps_modules_and_the_metadata_we_serve() {
        let u = upload(vec![
            metadata(MAIN),
            part("index.js", "import t from './t.txt'; export default {}"),
            part("t.txt", "x"),
            part("add.wasm", "\0asm"),
        ])
        .unwrap();
        assert_eq!(u.modules.keys().collect::<Vec<_>>(), ["add.wasm", "index.js", "t.txt"]);
        assert_eq!(u.metadata["main_module"], "index.js");
        assert_eq!(u.metadata["bindings"].as_array().unwrap().len(), 2, "the secret is not stored");
        assert_eq!(u.metadata["annotations"], json!({"workers/message": "m"}));
        assert!(u.metadata.get("observability").is_none());
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let js = || part("index.js", "export default {}");
        assert!(invalid(vec![metadata(MAIN), part("../x.js", "")]).contains("'..'"));
        assert!(invalid(vec![metadata(MAIN), part("/x.js", "")]).contains("absolute"));
        assert!(invalid(vec![metadata(MAIN), part("a\0.js", "")]).contains("control character"));
        assert!(
            invalid(vec![metadata(r#"{"main_module":"main.js"}"#), js()]).contains("\"main.js\" is missing")
        );
        assert!(invalid(vec![metadata("{not json"), js()]).contains("not valid upload metadata JSON"));
        assert!(invalid(vec![js()]).contains("no `metadata` part"));
        assert!(invalid(vec![metadata(MAIN), metadata(MAIN), js()]).contains("two `metadata`"));
        assert!(
            invalid(vec![metadata(r#"{"body_part":"w.js"}"#), part("w.js", "")]).contains("service-worker")
        );
        let kv = r#"{"main_module":"index.js","bindings":[{"name":"CACHE","type":"kv_namespace","namespace_id":"x"}]}"#;
        let message = invalid(vec![metadata(kv), js()]);
        assert!(message.contains("\"CACHE\"") && message.contains("kv_namespace"), "{message}");
        let secret =
            r#"{"main_module":"index.js","bindings":[{"name":"K","type":"secret_text","text":"v"}]}"#;
        let message = invalid(vec![metadata(secret), js()]);
        assert!(message.contains("wrangler secret put K") && !message.contains("\"v\""), "{message}");
        assert!(invalid(vec![metadata(MAIN), js(), part("metadata.json", "{}")]).contains("metadata.json"));
        assert!(matches!(
            validate("Hello", vec![metadata(MAIN), js()], &Limits::default()),
            Err(ApiError::Invalid(m)) if m.contains("DNS-1123")
        ));
    }

    #[test]
    fn declared_module_types_must_match_the_extension() {
        for (name, declared) in [
            ("index.js", "application/javascript+module"),
            ("lib/old.cjs", "application/javascript"),
            ("add.wasm", "application/wasm"),
            ("t.txt", "text/plain; charset=utf-8"),
            ("index.js.map", "application/source-map"),
            ("cfg.json", "application/json"),
            ("blob.bin", "application/octet-stream"),
        ] {
            assert!(check_module_type(name, Some(declared)).is_ok(), "{name} {declared}");
        }
        assert!(check_module_type("index.js", None).is_ok());
        for (name, declared) in [
            ("index.js", "application/javascript"),
            ("q.sql", "text/plain"),
            ("index.js", "application/octet-stream"),
            ("t.txt", "application/octet-stream"),
            ("w.py", "text/x-python"),
        ] {
            let err = check_module_type(name, Some(declared)).unwrap_err();
            assert!(err.to_string().contains(name), "{name} {declared}: {err}");
        }
    }

    #[test]
    fn kept_vars_come_from_the_running_version_unless_redefined() {
        let keep_vars = r#"{"main_module":"index.js","keep_bindings":["plain_text","json","secret_text"],
            "bindings":[{"name":"A","type":"plain_text","text":"new"},{"name":"S","type":"inherit"}]}"#;
        let mut u = upload(vec![metadata(keep_vars), part("index.js", "export default {}")]).unwrap();
        assert_eq!(u.keep, Keep { text: true, json: true, names: ["S".to_owned()].into_iter().collect() });
        let running = WorkerTemplate {
            vars: vec![
                WorkerVar { name: "A".into(), kind: VarType::Text, value: "old".into() },
                WorkerVar { name: "B".into(), kind: VarType::Text, value: "kept".into() },
                WorkerVar { name: "C".into(), kind: VarType::Json, value: r#"{"x":1}"#.into() },
            ],
            ..WorkerTemplate::default()
        };
        inherit_vars(&mut u.metadata, &u.keep, &running);
        assert_eq!(
            u.metadata["bindings"],
            json!([{"name":"A","type":"plain_text","text":"new"},{"name":"B","type":"plain_text","text":"kept"},
                   {"name":"C","type":"json","json":{"x":1}}])
        );
        // Without keep_bindings, only what the upload names: B and C are gone, as on Cloudflare.
        let mut plain = upload(vec![metadata(MAIN), part("index.js", "export default {}")]).unwrap();
        let before = plain.metadata.clone();
        inherit_vars(&mut plain.metadata, &plain.keep, &running);
        assert_eq!(plain.metadata, before);
    }

    #[test]
    fn wranglers_draft_worker_gets_an_extension() {
        let esm = |name: &str| Part {
            name: name.into(),
            content_type: Some("application/javascript+module".into()),
            bytes: Bytes::from_static(b"export default { fetch() {} }"),
        };
        let u = upload(vec![metadata(r#"{"main_module":"fresh","bindings":[]}"#), esm("fresh")]).unwrap();
        assert_eq!(u.modules.keys().collect::<Vec<_>>(), ["fresh.mjs"]);
        assert_eq!(u.metadata["main_module"], "fresh.mjs");
        // Only that shape: with a second module the extension-less main stays refused.
        let two = vec![metadata(r#"{"main_module":"fresh"}"#), esm("fresh"), esm("lib.js")];
        assert!(matches!(upload(two), Err(ApiError::Invalid(m)) if m.contains("\"fresh\"")));
    }

    #[test]
    fn limits_are_enforced_on_validated_parts_too() {
        let limits = Limits { max_modules: 1, max_module_bytes: 4, ..Limits::default() };
        let r = validate("hello", vec![metadata(MAIN), part("index.js", "12345")], &limits);
        assert!(matches!(r, Err(ApiError::TooLarge(m)) if m.contains("per module")));
        let r = validate("hello", vec![metadata(MAIN), part("index.js", "1"), part("b.js", "2")], &limits);
        assert!(matches!(r, Err(ApiError::TooLarge(m)) if m.contains("limit of 1")));
    }

    #[test]
    fn the_template_follows_the_stored_metadata() {
        let u = upload(vec![metadata(MAIN), part("index.js", "export default {}")]).unwrap();
        let v = "0b8a5b8e-6f4e-4c39-9a57-2c4d2b7d8f10";
        let (account, script) = (AccountId::parse("1234").unwrap(), ScriptName::parse("hello").unwrap());
        let version = VersionId::parse(v).unwrap();
        let t = template_for("workers", &account, &script, &version, &u.metadata).unwrap();
        assert_eq!(t.script_urls, [format!("s3://workers/1234/hello/{v}/")]);
        assert_eq!(t.main_module.as_deref(), Some("index.js"));
        assert_eq!(t.compatibility_date.as_deref(), Some("2024-09-23"));
        assert_eq!(t.secret_ref.as_deref(), Some("hello-secrets"));
        assert_eq!(t.version_id.as_deref(), Some(v));
        assert_eq!(
            t.vars,
            [
                WorkerVar { name: "GREETING".into(), kind: VarType::Text, value: "hi".into() },
                WorkerVar { name: "CFG".into(), kind: VarType::Json, value: r#"{"a":[1,2]}"#.into() },
            ]
        );
        // Read back from S3 it is the same template: the same release.
        let reread: Value = serde_json::from_slice(u.metadata.to_string().as_bytes()).unwrap();
        assert_eq!(template_for("workers", &account, &script, &version, &reread).unwrap(), t);
    }

    /// Every top-level field wrangler 4.86.0 can send, with what this server does with it.
    #[test]
    fn every_metadata_field_is_served_or_refused_by_name() {
        use Verdict::{NothingToDo, Served};
        let refused = |words: &str| Verdict::Refused(words.to_owned());
        let table: Vec<(&str, Value, Verdict)> = vec![
            ("main_module", json!("index.js"), Served),
            ("body_part", json!("worker.js"), refused("service-worker format (body_part)")),
            ("bindings", json!([]), Served),
            ("compatibility_date", json!("2024-09-23"), Served),
            ("compatibility_flags", json!(["nodejs_compat"]), Served),
            ("keep_bindings", json!(["plain_text", "secret_text"]), Served),
            ("annotations", json!({"workers/message": "m"}), Served),
            ("migrations", json!({"new_tag": "v1"}), refused("migrations (Durable Objects)")),
            ("capnp_schema", json!("schema.capnp"), refused("capnp_schema")),
            ("logpush", json!(false), NothingToDo),
            ("logpush", json!(true), refused("logpush")),
            ("placement", json!({"mode": "off"}), NothingToDo),
            ("placement", json!({"mode": "smart"}), refused("placement ([placement] mode)")),
            ("placement", json!({"mode": "targeted", "region": "x"}), refused("placement")),
            ("tail_consumers", json!([]), NothingToDo),
            ("tail_consumers", json!([{"service": "x"}]), refused("tail consumers")),
            ("streaming_tail_consumers", json!([]), NothingToDo),
            ("streaming_tail_consumers", json!([{"service": "x"}]), refused("streaming tail consumers")),
            ("limits", json!({"cpu_ms": 50}), refused("limits")),
            ("keep_assets", json!(true), NothingToDo),
            ("assets", json!({"jwt": "x"}), refused("static assets")),
            ("observability", json!({"enabled": true, "head_sampling_rate": 0.5}), NothingToDo),
            ("cache_options", json!({"enabled": false}), NothingToDo),
            ("cache_options", json!({"enabled": true}), refused("cache")),
            ("containers", json!([]), NothingToDo),
            ("containers", json!([{"class_name": "C"}]), refused("containers")),
            ("usage_model", json!("standard"), NothingToDo),
            ("usage_model", json!("unbound"), refused("usage model")),
            ("no_such_field", json!(1), refused("\"no_such_field\" is not known")),
        ];
        for field in METADATA_FIELDS {
            assert!(table.iter().any(|(f, _, _)| *f == field), "{field} has no row");
        }
        for (field, value, expected) in table {
            let got = metadata_verdict(field, &value);
            match (&expected, &got) {
                (Verdict::Refused(words), Verdict::Refused(message)) => {
                    assert!(message.contains(words), "{field}={value}: {message:?} lacks {words:?}")
                }
                _ => assert_eq!(got, expected, "{field}={value}"),
            }
        }
    }

    #[test]
    fn refused_fields_are_all_named_and_nothing_is_dropped() {
        let js = || part("index.js", "export default {}");
        let meta = r#"{"main_module":"index.js","logpush":true,"tail_consumers":[{"service":"t"}],
            "limits":{"cpu_ms":5},"frobnicate":1}"#;
        let message = invalid(vec![metadata(meta), js()]);
        for words in ["logpush", "tail consumers", "limits", "\"frobnicate\""] {
            assert!(message.contains(words), "{message:?} lacks {words:?}");
        }
        let odd_annotation = r#"{"main_module":"index.js","annotations":{"workers/x":"y"}}"#;
        assert!(invalid(vec![metadata(odd_annotation), js()]).contains("workers/x"));
        // wrangler's draft worker (`secret put`/`secret bulk` on a new worker) passes.
        let draft = r#"{"main_module":"index.js","bindings":[],"logpush":false}"#;
        assert!(upload(vec![metadata(draft), js()]).is_ok());
    }
}
