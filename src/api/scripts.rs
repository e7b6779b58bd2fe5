//! Scripts (workers) as wrangler sees them: upload-and-deploy, list, get, delete, and the small
//! per-script calls wrangler makes around them. Settings are in `settings`, the trigger phase of a
//! deploy (schedules, routes, domains) in `triggers`.

use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::{json, Value};

use super::auth::Caller;
use super::envelope::{ok, ok_list, ApiError};
use super::path::{AccountPath, ScriptPath, VersionId};
use super::store::{ObjectKey, DEPLOYED_AT};
use super::undo::UndoRecord;
use super::versions::{created, receive};
use super::Shared;
use crate::crd::WorkerDeployment;
use kube::ResourceExt;

fn modified(deployment: &WorkerDeployment) -> String {
    deployment.annotations().get(DEPLOYED_AT).cloned().unwrap_or_else(|| created(deployment))
}

/// A script as Cloudflare's scripts list and services calls show it.
pub fn script_json(deployment: &WorkerDeployment) -> Value {
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
pub async fn account_subdomain(AccountPath(account): AccountPath) -> Response {
    ok(json!({"subdomain": account.as_str()}))
}

/// `GET .../storage/kv/namespaces`: KV is not served here, so an account has none (`wrangler
/// delete` looks for its Workers Sites namespaces).
pub async fn kv_namespaces(AccountPath(_): AccountPath) -> Response {
    ok_list(Vec::<Value>::new())
}

/// `GET .../workers/scripts`.
pub async fn list(
    State(api): State<Shared>,
    AccountPath(account): AccountPath,
) -> Result<Response, ApiError> {
    let deployments = api.store.deployments(&account).await?;
    Ok(ok(deployments.iter().map(script_json).collect::<Vec<_>>()))
}

/// `GET .../workers/services/{script}`: 10007 tells wrangler the worker is new.
pub async fn service(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
) -> Result<Response, ApiError> {
    let deployment = api.store.existing(&account, &script).await?;
    Ok(ok(json!({
        "id": script.as_str(),
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
    ScriptPath { account, script }: ScriptPath,
) -> Result<Response, ApiError> {
    let deployment = api.store.existing(&account, &script).await?;
    let template = &deployment.spec.template;
    let not_ours =
        || ApiError::NotFound(format!("worker {:?} was not uploaded through this API", script.as_str()));
    let (Some(version), Some(main)) = (&template.version_id, &template.main_module) else {
        return Err(not_ours());
    };
    let version = VersionId::parse(version).map_err(|_| not_ours())?;
    let key = ObjectKey::module(&account, &script, &version, main)?;
    let (bytes, _) = api.store.get_object(&key).await?.ok_or_else(|| {
        ApiError::NotFound(format!("the main module of worker {:?} is missing", script.as_str()))
    })?;
    Ok(([(header::CONTENT_TYPE, "application/javascript+module")], bytes).into_response())
}

/// `PUT .../scripts/{script}` (`wrangler deploy` of a new worker, the draft worker of `wrangler
/// secret put`/`bulk`): store a version and deploy it.
pub async fn upload(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let (version, _, template) = receive(&api, &account, &script, &headers, multipart).await?;
    api.store.ensure_account(&account).await?;
    let before = api.store.deployment(&account, &script).await?;
    let undo = UndoRecord::new(before.as_ref(), &version, k8s_openapi::jiff::Timestamp::now());
    let deployment = api.store.apply_template(&account, &script, &template, None, Some(&undo)).await?;
    let mut result = script_json(&deployment);
    result["deployment_id"] = json!(version.as_str());
    result["startup_time_ms"] = json!(0);
    Ok(ok(result))
}

/// `DELETE .../scripts/{script}` and `DELETE .../services/{script}?force=` (`wrangler delete`): the
/// WorkerDeployment (its releases go with it), its Secret and every stored version. Nothing here
/// depends on another worker, so `force` changes nothing.
pub async fn delete(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    api.store.delete_script(&account, &script).await?;
    let objects = api.store.delete_versions(&account, &script).await?;
    tracing::info!(%account, %script, objects, "worker deleted");
    Ok(ok(json!({"id": script.as_str()})))
}

/// `GET .../scripts/{script}/references` (`wrangler delete` without `--force`): what depends on
/// the worker. Service bindings, Durable Object namespaces and dispatch namespaces are not served,
/// so nothing can.
pub async fn references(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    Ok(ok(json!({
        "services": {"incoming": [], "outgoing": []},
        "durable_objects": [],
        "dispatch_outbounds": [],
    })))
}

/// `GET .../workers/tails/by-consumer/{script}` (`wrangler delete` without `--force`): the workers
/// that send their tail events to this one. Tail consumers are not served, so none.
pub async fn tail_producers(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    Ok(ok(Vec::<Value>::new()))
}

/// `GET`/`POST .../scripts/{script}/subdomain`: every worker is reachable through its account's
/// bundle; there is no per-worker switch, so it always reads as enabled.
pub async fn subdomain(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    Ok(ok(json!({"enabled": true, "previews_enabled": false})))
}
