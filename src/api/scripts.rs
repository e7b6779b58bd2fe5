//! Scripts (workers) as wrangler sees them: upload-and-deploy, list, get, delete, and the small
//! per-script settings wrangler reads and writes on every deploy.

use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::auth::Caller;
use super::envelope::{json_body, ok, ok_list, ApiError};
use super::store::DEPLOYED_AT;
use super::upload::version_prefix;
use super::versions::{bindings_json, created, receive};
use super::Shared;
use crate::crd::WorkerDeployment;
use kube::ResourceExt;

fn modified(deployment: &WorkerDeployment) -> String {
    deployment.annotations().get(DEPLOYED_AT).cloned().unwrap_or_else(|| created(deployment))
}

/// A script as Cloudflare's scripts list and services calls show it.
fn script_json(deployment: &WorkerDeployment) -> Value {
    let template = &deployment.spec.template;
    json!({
        "id": deployment.name_any(),
        "tag": deployment.name_any(),
        "tags": [],
        "etag": template.version_id,
        "handlers": ["fetch"],
        // Not "dash": that makes wrangler fetch the dashboard's config to diff against.
        "last_deployed_from": "wrangler",
        "compatibility_date": template.compatibility_date,
        "compatibility_flags": template.compatibility_flags,
        "usage_model": "standard",
        "has_modules": true,
        "created_on": created(deployment),
        "modified_on": modified(deployment),
    })
}

/// `GET /memberships`: the token's accounts (wrangler asks when CLOUDFLARE_ACCOUNT_ID is unset).
pub async fn memberships(Extension(caller): Extension<Caller>) -> Response {
    let accounts: Vec<Value> = caller
        .accounts
        .iter()
        .map(|a| {
            json!({"id": a, "status": "accepted", "roles": ["Administrator"],
                   "account": {"id": a, "name": a}})
        })
        .collect();
    ok_list(accounts)
}

/// `GET .../workers/subdomain`: the account's workers.dev-style subdomain; here the account id.
pub async fn account_subdomain(Path(account): Path<String>) -> Response {
    ok(json!({"subdomain": account}))
}

/// `GET .../storage/kv/namespaces`: KV is not served here, so an account has none.
pub async fn kv_namespaces() -> Response {
    ok_list(Vec::<Value>::new())
}

/// `GET .../workers/scripts`.
pub async fn list(State(api): State<Shared>, Path(account): Path<String>) -> Result<Response, ApiError> {
    let deployments = api.store.deployments(&account).await?;
    Ok(ok(deployments.iter().map(script_json).collect::<Vec<_>>()))
}

/// `GET .../workers/services/{script}`: 10007 tells wrangler the worker is new.
pub async fn service(
    State(api): State<Shared>,
    Path((account, script)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let deployment = api.store.existing(&account, &script).await?;
    Ok(ok(json!({
        "id": script,
        "default_environment": {
            "environment": "production",
            "created_on": created(&deployment),
            "modified_on": modified(&deployment),
            "script": script_json(&deployment),
        },
        "created_on": created(&deployment),
        "modified_on": modified(&deployment),
    })))
}

/// `GET .../scripts/{script}`: the current version's main module, as Cloudflare returns it.
pub async fn content(
    State(api): State<Shared>,
    Path((account, script)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let deployment = api.store.existing(&account, &script).await?;
    let template = &deployment.spec.template;
    let (Some(version), Some(main)) = (&template.version_id, &template.main_module) else {
        return Err(ApiError::NotFound(format!("worker {script:?} was not uploaded through this API")));
    };
    let key = format!("{}{main}", version_prefix(&account, &script, version));
    let (bytes, _) = api
        .store
        .get_object(&key)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("the main module of worker {script:?} is missing")))?;
    Ok(([(header::CONTENT_TYPE, "application/javascript+module")], bytes).into_response())
}

/// `PUT .../scripts/{script}` (`wrangler deploy` of a new worker): store a version and deploy it.
pub async fn upload(
    State(api): State<Shared>,
    Path((account, script)): Path<(String, String)>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let (version, _, template) = receive(&api, &account, &script, &headers, multipart).await?;
    api.store.ensure_account(&account).await?;
    let deployment = api.store.apply_template(&account, &script, &template, None).await?;
    let mut result = script_json(&deployment);
    result["deployment_id"] = json!(version);
    result["startup_time_ms"] = json!(0);
    Ok(ok(result))
}

/// `DELETE .../scripts/{script}`: the WorkerDeployment (its releases go with it), its Secret and
/// every stored version.
pub async fn delete(
    State(api): State<Shared>,
    Path((account, script)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    api.store.delete_script(&account, &script).await?;
    let objects = api.store.delete_versions(&account, &script).await?;
    tracing::info!(%account, %script, objects, "worker deleted");
    Ok(ok(json!({"id": script})))
}

/// `GET .../scripts/{script}/settings`.
pub async fn settings(
    State(api): State<Shared>,
    Path((account, script)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let deployment = api.store.existing(&account, &script).await?;
    let template = &deployment.spec.template;
    Ok(ok(json!({
        "bindings": bindings_json(template),
        "compatibility_date": template.compatibility_date,
        "compatibility_flags": template.compatibility_flags,
        "usage_model": "standard",
        "logpush": false,
        "placement": {},
        "tail_consumers": [],
        "observability": {"enabled": false},
        "tags": [],
    })))
}

fn script_settings_json() -> Value {
    json!({"logpush": false, "observability": {"enabled": false}, "tags": [], "tail_consumers": []})
}

/// `GET .../scripts/{script}/script-settings`.
pub async fn script_settings(
    State(api): State<Shared>,
    Path((account, script)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    Ok(ok(script_settings_json()))
}

/// `PATCH .../scripts/{script}/script-settings`: observability, logpush and tags do not change what
/// runs here; accepted and not stored (wrangler only warns when this fails).
pub async fn patch_script_settings(
    State(api): State<Shared>,
    Path((account, script)): Path<(String, String)>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    json_body(body)?;
    api.store.existing(&account, &script).await?;
    Ok(ok(script_settings_json()))
}

/// `GET`/`POST .../scripts/{script}/subdomain`: every worker is reachable through its account's
/// bundle; there is no per-worker switch, so it always reads as enabled.
pub async fn subdomain(
    State(api): State<Shared>,
    Path((account, script)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    Ok(ok(json!({"enabled": true, "previews_enabled": false})))
}

/// `GET .../scripts/{script}/schedules`.
pub async fn schedules(
    State(api): State<Shared>,
    Path((account, script)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    Ok(ok(json!({"schedules": []})))
}

/// `PUT .../scripts/{script}/schedules`: cron triggers are not run by this server, so any are
/// refused rather than dropped; an empty list is what a worker without triggers sends.
pub async fn put_schedules(
    State(api): State<Shared>,
    Path((account, script)): Path<(String, String)>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body)?;
    api.store.existing(&account, &script).await?;
    match body.as_array() {
        Some(list) if list.is_empty() => Ok(ok(json!({"schedules": []}))),
        Some(_) => Err(ApiError::Invalid(
            "cron triggers are not supported by this server yet: remove [triggers] crons from the config"
                .into(),
        )),
        None => Err(ApiError::Invalid("schedules must be a JSON array of {\"cron\": ...}".into())),
    }
}
