//! Versions and deployments. A version is an upload: its files in S3, its template (with its
//! `versionId`) frozen into a WorkerRelease once deployed. A deployment points the WorkerDeployment's
//! template at one version; deploying an older version (`wrangler rollback`) brings back exactly the
//! template of its release, so the controller reuses that release without a rebuild.

use std::collections::BTreeMap;

use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Json;
use kube::ResourceExt;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::envelope::{json_body, ok, ApiError};
use super::path::{AccountId, ScriptName, ScriptPath, VersionId, VersionPath};
use super::store::{DEPLOYED_AT, DEPLOY_MESSAGE};
use super::undo::UndoRecord;
use super::upload::{inherit_vars, read_parts, template_for, validate, Upload};
use super::Shared;
use crate::crd::{VarType, WorkerDeployment, WorkerRelease, WorkerTemplate};

/// What Cloudflare reports about one version.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionInfo {
    pub id: String,
    pub created_on: String,
    pub template: WorkerTemplate,
    /// `workers/message` and `workers/tag`, when the upload had them.
    pub annotations: Value,
}

/// One deployment: a version at 100%.
#[derive(Clone, Debug, PartialEq)]
pub struct DeploymentEntry {
    pub version_id: String,
    pub created_on: String,
    pub message: Option<String>,
}

/// The template's vars as Cloudflare bindings.
pub fn bindings_json(template: &WorkerTemplate) -> Vec<Value> {
    template
        .vars
        .iter()
        .map(|var| match var.kind {
            VarType::Text => json!({"type": "plain_text", "name": var.name, "text": var.value}),
            VarType::Json => json!({"type": "json", "name": var.name,
                "json": serde_json::from_str::<Value>(&var.value).unwrap_or(Value::Null)}),
        })
        .collect()
}

pub fn version_json(version: &VersionInfo, number: usize) -> Value {
    let t = &version.template;
    json!({
        "id": version.id,
        "number": number,
        "metadata": {
            "created_on": version.created_on,
            "modified_on": version.created_on,
            "source": "wrangler",
            "author_id": "",
            "author_email": "",
            "has_preview": false,
        },
        "annotations": version.annotations,
        "resources": {
            "script": {"etag": version.id, "handlers": ["fetch"], "last_deployed_from": "wrangler"},
            "script_runtime": {
                "compatibility_date": t.compatibility_date,
                "compatibility_flags": t.compatibility_flags,
                "usage_model": "standard",
                "limits": {},
            },
            "bindings": bindings_json(t),
        },
        "startup_time_ms": 0,
    })
}

/// A stable UUID for a deployment (we keep no deployment objects; the same history gives the same ids).
pub fn deployment_id(entry: &DeploymentEntry) -> String {
    let digest = Sha256::digest(format!("deployment:{}:{}", entry.version_id, entry.created_on));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
}

pub fn deployment_json(entry: &DeploymentEntry) -> Value {
    let mut annotations = serde_json::Map::new();
    if let Some(message) = &entry.message {
        annotations.insert("workers/message".into(), json!(message));
    }
    json!({
        "id": deployment_id(entry),
        "created_on": entry.created_on,
        "source": "wrangler",
        "strategy": "percentage",
        "author_email": "",
        "annotations": annotations,
        "versions": [{"version_id": entry.version_id, "percentage": 100}],
    })
}

/// When an object was created (RFC 3339), or "" when it was never stored.
pub fn created(object: &impl kube::Resource) -> String {
    object.meta().creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default()
}

/// The deployments of a WorkerDeployment, newest first: its current version, then the versions of
/// the releases it ran before (its status's release history), each once.
pub fn history(deployment: &WorkerDeployment, releases: &[WorkerRelease]) -> Vec<DeploymentEntry> {
    let mut entries: Vec<DeploymentEntry> = Vec::new();
    let annotations = deployment.annotations();
    if let Some(current) = &deployment.spec.template.version_id {
        entries.push(DeploymentEntry {
            version_id: current.clone(),
            created_on: annotations.get(DEPLOYED_AT).cloned().unwrap_or_else(|| created(deployment)),
            message: annotations.get(DEPLOY_MESSAGE).cloned(),
        });
    }
    let earlier = deployment.status.as_ref().map(|s| s.release_history.as_slice()).unwrap_or_default();
    for name in earlier {
        let Some(release) = releases.iter().find(|r| r.name_any() == *name) else { continue };
        let Some(version) = &release.spec.template.version_id else { continue };
        if entries.iter().all(|e| &e.version_id != version) {
            entries.push(DeploymentEntry {
                version_id: version.clone(),
                created_on: created(release),
                message: None,
            });
        }
    }
    entries
}

/// The version ids known for a script: its current one and its releases', newest release first.
pub fn known_versions(deployment: &WorkerDeployment, releases: &[WorkerRelease]) -> Vec<String> {
    let mut sorted: Vec<&WorkerRelease> = releases.iter().collect();
    sorted.sort_by_key(|r| std::cmp::Reverse(created(*r)));
    let mut ids: Vec<String> = deployment.spec.template.version_id.iter().cloned().collect();
    for id in sorted.iter().filter_map(|r| r.spec.template.version_id.clone()) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// The template of version `id`: from its release when there is one (exactly what was built), else
/// from what its upload stored.
pub(super) async fn version_info(
    api: &Shared,
    account: &AccountId,
    script: &ScriptName,
    deployment: Option<&WorkerDeployment>,
    releases: &[WorkerRelease],
    id: &VersionId,
) -> Result<Option<VersionInfo>, ApiError> {
    let stored = api.store.version(account, script, id).await?;
    let is_id = |v: &Option<String>| v.as_deref() == Some(id.as_str());
    let release = releases.iter().find(|r| is_id(&r.spec.template.version_id));
    let current = deployment.filter(|d| is_id(&d.spec.template.version_id));
    let template = match (release, current, &stored) {
        (Some(r), _, _) => r.spec.template.clone(),
        (None, Some(d), _) => d.spec.template.clone(),
        (None, None, Some(s)) => template_for(&api.store.bucket, account, script, id, &s.metadata)
            .map_err(|e| ApiError::Backend(format!("version {id}: {e}")))?,
        (None, None, None) => return Ok(None),
    };
    let created_on = stored
        .as_ref()
        .and_then(|s| s.created_on.clone())
        .or_else(|| release.map(created))
        .unwrap_or_default();
    let annotations = stored.as_ref().map(|s| s.metadata["annotations"].clone()).filter(Value::is_object);
    Ok(Some(VersionInfo {
        id: id.as_str().to_owned(),
        created_on,
        template,
        annotations: annotations.unwrap_or_else(|| json!({})),
    }))
}

/// Reads, validates and stores an upload as a new version; returns its id, the upload and the
/// template that runs it. Refused uploads store nothing.
pub async fn receive(
    api: &Shared,
    account: &AccountId,
    script: &ScriptName,
    headers: &HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(VersionId, Upload, WorkerTemplate), ApiError> {
    let limit = api.limits.max_upload_bytes;
    let length =
        headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if length.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge(format!(
            "the upload is {} bytes, over the limit of {limit} bytes",
            length.unwrap_or_default()
        )));
    }
    let mut multipart = multipart.map_err(|e| {
        ApiError::Invalid(format!("the upload is not a multipart/form-data body: {}", e.body_text()))
    })?;
    let parts = read_parts(&mut multipart, &api.limits).await?;
    let mut upload = validate(script.as_str(), parts, &api.limits)?;
    api.store.check_name_free(account, script).await?;
    check_startup(api, &upload).await?;
    if !upload.keep.is_empty() {
        if let Some(running) = api.store.deployment(account, script).await? {
            inherit_vars(&mut upload.metadata, &upload.keep, &running.spec.template);
        }
    }
    let version = VersionId::new_random();
    let template = template_for(&api.store.bucket, account, script, &version, &upload.metadata)
        .map_err(ApiError::Backend)?;
    api.store.put_version(account, script, &version, &upload).await?;
    Ok((version, upload, template))
}

/// Loads the upload's worker alone in workerd and refuses it, as Cloudflare does (10021 with the
/// exception and where it was thrown), when it cannot start: stored, it would stop every worker
/// of its account at the next start of the account's workerd.
async fn check_startup(api: &Shared, upload: &Upload) -> Result<(), ApiError> {
    let Some(checker) = &api.startup_check else { return Ok(()) };
    match checker.check(&upload.worker).await {
        Ok(took) => {
            tracing::debug!(took_ms = took.as_millis() as u64, "start-up check passed");
            Ok(())
        }
        Err(e) if e.is_workers_fault() => Err(ApiError::Invalid(format!(
            "{e}\n(the upload was not stored; the running version, if any, keeps serving)"
        ))),
        Err(e) => {
            tracing::error!(error = %e, "the start-up check could not run");
            Err(ApiError::Backend(
                "the server could not check that the worker starts; its log says why".into(),
            ))
        }
    }
}

/// `POST .../versions` (`wrangler deploy` of an existing worker, `wrangler versions upload`):
/// stores a version without deploying it.
pub async fn upload(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let (version, upload, template) = receive(&api, &account, &script, &headers, multipart).await?;
    let info = VersionInfo {
        id: version.as_str().to_owned(),
        created_on: k8s_openapi::jiff::Timestamp::now().to_string(),
        template,
        annotations: upload.metadata.get("annotations").cloned().unwrap_or_else(|| json!({})),
    };
    Ok(ok(version_json(&info, 0)))
}

/// `GET .../versions`: newest first.
pub async fn list(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
) -> Result<Response, ApiError> {
    let deployment = api.store.existing(&account, &script).await?;
    let releases = api.store.releases(&account, &script).await?;
    // Ids written by hand into a template or release that are not UUIDs name no stored version.
    let ids: Vec<VersionId> =
        known_versions(&deployment, &releases).iter().filter_map(|id| VersionId::parse(id).ok()).collect();
    let found = futures::future::try_join_all(
        ids.iter().map(|id| version_info(&api, &account, &script, Some(&deployment), &releases, id)),
    )
    .await?;
    let mut versions: Vec<VersionInfo> = found.into_iter().flatten().collect();
    versions.sort_by(|a, b| b.created_on.cmp(&a.created_on));
    let count = versions.len();
    let items: Vec<Value> = versions.iter().enumerate().map(|(i, v)| version_json(v, count - i)).collect();
    Ok(ok(json!({"items": items})))
}

/// `GET .../versions/{id}`.
pub async fn get(
    State(api): State<Shared>,
    VersionPath { account, script, version: id }: VersionPath,
) -> Result<Response, ApiError> {
    let deployment = api.store.deployment(&account, &script).await?;
    let releases = match &deployment {
        Some(_) => api.store.releases(&account, &script).await?,
        None => Vec::new(),
    };
    let info = version_info(&api, &account, &script, deployment.as_ref(), &releases, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("version {id} of worker {script:?} not found")))?;
    Ok(ok(version_json(&info, 0)))
}

/// `GET .../deployments`: newest first.
pub async fn deployments(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
) -> Result<Response, ApiError> {
    let deployment = api.store.existing(&account, &script).await?;
    let releases = api.store.releases(&account, &script).await?;
    let entries: Vec<Value> = history(&deployment, &releases).iter().map(deployment_json).collect();
    Ok(ok(json!({"deployments": entries})))
}

#[derive(Debug, Deserialize)]
pub struct DeployRequest {
    #[serde(default)]
    strategy: Option<String>,
    versions: Vec<Traffic>,
    #[serde(default)]
    annotations: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
struct Traffic {
    version_id: String,
    percentage: f64,
}

/// The one version a deployment request sends all traffic to.
pub fn single_version(request: &DeployRequest) -> Result<VersionId, ApiError> {
    if request.strategy.as_deref().is_some_and(|s| s != "percentage") {
        return Err(ApiError::Invalid(format!(
            "deployment strategy {:?} is not supported (only \"percentage\")",
            request.strategy.as_deref().unwrap_or_default()
        )));
    }
    match request.versions.as_slice() {
        [only] if (only.percentage - 100.0).abs() < f64::EPSILON => VersionId::parse(&only.version_id),
        _ => Err(ApiError::Invalid(
            "a deployment here sends 100% of traffic to one version: gradual deployments (several \
             versions, or less than 100%) are not supported by this server"
                .into(),
        )),
    }
}

/// `POST .../deployments` (`wrangler deploy` after a version upload, `wrangler rollback`,
/// `wrangler versions deploy`).
pub async fn deploy(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
    body: Result<Json<DeployRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_body(body)?;
    let version = single_version(&request)?;
    api.store.check_name_free(&account, &script).await?;
    let deployment = api.store.deployment(&account, &script).await?;
    let releases = match &deployment {
        Some(_) => api.store.releases(&account, &script).await?,
        None => Vec::new(),
    };
    let info = version_info(&api, &account, &script, deployment.as_ref(), &releases, &version)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("version {version} of worker {script:?} not found")))?;
    let message = request.annotations.get("workers/message").and_then(Value::as_str);
    api.store.ensure_account(&account).await?;
    let undo = UndoRecord::new(deployment.as_ref(), &version, k8s_openapi::jiff::Timestamp::now());
    let applied = api.store.apply_template(&account, &script, &info.template, message, Some(&undo)).await?;
    let entry = history(&applied, &[])
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Backend("the WorkerDeployment was applied without its version".into()))?;
    Ok(ok(deployment_json(&entry)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{WorkerDeploymentSpec, WorkerDeploymentStatus, WorkerReleaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const V1: &str = "11111111-1111-4111-8111-111111111111";
    const V2: &str = "22222222-2222-4222-8222-222222222222";

    fn template(version: &str) -> WorkerTemplate {
        WorkerTemplate {
            script_name: "hello".into(),
            script_urls: vec![format!("s3://workers/1234/hello/{version}/")],
            version_id: Some(version.into()),
            ..WorkerTemplate::default()
        }
    }

    fn release(name: &str, version: &str, created: &str) -> WorkerRelease {
        let mut r = WorkerRelease::new(name, WorkerReleaseSpec { template: template(version) });
        r.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
        r
    }

    fn deployment(current: &str, history: &[&str]) -> WorkerDeployment {
        let mut d = WorkerDeployment::new(
            "hello",
            WorkerDeploymentSpec { template: template(current), release_history_limit: 10 },
        );
        d.metadata.annotations =
            Some([(DEPLOYED_AT.to_owned(), "2026-01-03T00:00:00Z".to_owned())].into_iter().collect());
        d.status = Some(WorkerDeploymentStatus {
            release_history: history.iter().map(|s| s.to_string()).collect(),
            ..WorkerDeploymentStatus::default()
        });
        d
    }

    #[test]
    fn history_is_newest_first_with_each_version_once() {
        let releases =
            [release("hello-a", V1, "2026-01-01T00:00:00Z"), release("hello-b", V2, "2026-01-02T00:00:00Z")];
        // After a rollback to V1: V1 is current, V2 ran before it.
        let d = deployment(V1, &["hello-a", "hello-b"]);
        let h = history(&d, &releases);
        assert_eq!(h.iter().map(|e| e.version_id.as_str()).collect::<Vec<_>>(), [V1, V2]);
        assert_eq!(h[0].created_on, "2026-01-03T00:00:00Z");
        assert_eq!(h[1].created_on, "2026-01-02T00:00:00Z");
        // Before the controller has written any status: just the current version.
        let fresh = deployment(V2, &[]);
        assert_eq!(history(&fresh, &[]).len(), 1);
        assert_eq!(known_versions(&d, &releases), [V1, V2]);
    }

    #[test]
    fn deployment_shape_is_what_wrangler_reads() {
        let entry = DeploymentEntry {
            version_id: V1.into(),
            created_on: "2026-01-01T00:00:00Z".into(),
            message: None,
        };
        let j = deployment_json(&entry);
        assert_eq!(j["strategy"], "percentage");
        assert_eq!(j["versions"][0]["version_id"], V1);
        assert_eq!(j["versions"][0]["percentage"], 100);
        assert_eq!(j["id"], deployment_id(&entry), "stable ids");
        assert!(uuid::Uuid::parse_str(j["id"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn only_whole_deployments_of_one_version() {
        let parse = |s: &str| serde_json::from_str::<DeployRequest>(s).unwrap();
        let one = parse(&format!(
            r#"{{"strategy":"percentage","versions":[{{"version_id":"{V1}","percentage":100}}]}}"#
        ));
        assert_eq!(single_version(&one).unwrap().as_str(), V1);
        let split = parse(&format!(
            r#"{{"versions":[{{"version_id":"{V1}","percentage":50}},{{"version_id":"{V2}","percentage":50}}]}}"#
        ));
        assert!(matches!(single_version(&split), Err(ApiError::Invalid(m)) if m.contains("gradual")));
    }

    #[test]
    fn version_ids_must_be_uuids() {
        let mixed = "0b8a5b8e-6f4e-4c39-9a57-2c4d2b7d8f10";
        assert!(VersionId::parse(V1).is_ok() && VersionId::parse(mixed).is_ok());
        for bad in ["../x", "x", "11111111111141118111111111111111", &mixed.to_uppercase()] {
            assert!(VersionId::parse(bad).is_err(), "{bad}");
        }
    }
}
