//! The trigger phase of `wrangler deploy` (and `wrangler triggers deploy`): cron schedules,
//! routes and custom domains, sent after the new code is live. None of them is served yet, so a
//! non-empty one is refused by name and undoes the deploy it follows (see `undo`); an empty one is
//! what a worker without them sends, and is answered.
//!
//! Routes need zones: before the route PUT, wrangler looks up each route's zone and the routes
//! already in it. This server has no zones. It answers each looked-up host with a placeholder
//! zone that holds no routes, so that wrangler goes on to the route PUT, where routes are refused
//! and the deploy undone (a failed zone lookup would leave the new code live).

use std::collections::HashMap;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::auth::Caller;
use super::envelope::{json_body, ok, ok_list, ApiError};
use super::path::{ScriptPath, ZoneId, ZonePath};
use super::undo::refuse_after_deploy;
use super::Shared;

/// What wrangler's config calls each setting, in the refusals.
pub const CRONS_REFUSED: &str = "cron triggers ([triggers] crons) are not served yet";
pub const ROUTES_REFUSED: &str = "routes (route / routes in the config) are not served yet";
pub const DOMAINS_REFUSED: &str = "custom domains (routes with custom_domain = true) are not served yet";

/// `GET .../scripts/{script}/schedules`.
pub async fn schedules(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
) -> Result<Response, ApiError> {
    api.store.existing(&account, &script).await?;
    Ok(ok(json!({"schedules": []})))
}

/// A JSON list body, or a refusal naming what the call takes.
fn list(body: Result<Json<Value>, JsonRejection>, what: &str) -> Result<Vec<Value>, ApiError> {
    match json_body(body)? {
        Value::Array(list) => Ok(list),
        _ => Err(ApiError::Invalid(format!("{what} must be a JSON array"))),
    }
}

/// `PUT .../scripts/{script}/schedules` (`[triggers] crons`).
pub async fn put_schedules(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    if !list(body, "schedules")?.is_empty() {
        return Err(refuse_after_deploy(&api, &account, &script, CRONS_REFUSED).await);
    }
    api.store.existing(&account, &script).await?;
    Ok(ok(json!({"schedules": []})))
}

/// `PUT .../scripts/{script}/routes` (`route`/`routes` without `custom_domain`).
pub async fn put_routes(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    if !list(body, "routes")?.is_empty() {
        return Err(refuse_after_deploy(&api, &account, &script, ROUTES_REFUSED).await);
    }
    api.store.existing(&account, &script).await?;
    Ok(ok(Vec::<Value>::new()))
}

/// `PUT .../scripts/{script}/domains/records` (custom domains, stdout not a terminal).
pub async fn put_domains(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body)?;
    let origins = body["origins"].as_array().map(Vec::len).unwrap_or_default();
    if origins > 0 {
        return Err(refuse_after_deploy(&api, &account, &script, DOMAINS_REFUSED).await);
    }
    api.store.existing(&account, &script).await?;
    Ok(ok(Vec::<Value>::new()))
}

/// `POST .../scripts/{script}/domains/changeset` (custom domains, stdout a terminal).
pub async fn domains_changeset(
    State(api): State<Shared>,
    ScriptPath { account, script }: ScriptPath,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    if !list(body, "a domains changeset")?.is_empty() {
        return Err(refuse_after_deploy(&api, &account, &script, DOMAINS_REFUSED).await);
    }
    api.store.existing(&account, &script).await?;
    Ok(ok(json!({"added": [], "removed": [], "updated": [], "conflicting": []})))
}

/// A host name as wrangler looks zones up by: DNS characters only.
fn is_host(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// `GET /zones?name=HOST&account.id=ACCOUNT`: a placeholder zone for the host (see the module's
/// comment); the account, when named, must be one of the token's.
pub async fn zones(
    Extension(caller): Extension<Caller>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::Invalid(format!("the query is not valid: {}", e.body_text())))?;
    if let Some(account) = query.get("account.id") {
        if !caller.accounts.contains(account) {
            return Err(ApiError::Forbidden(account.clone()));
        }
    }
    let zones: Vec<Value> = query
        .get("name")
        .filter(|name| is_host(name))
        .map(|name| json!({"id": ZoneId::for_host(name).as_str(), "name": name, "status": "active"}))
        .into_iter()
        .collect();
    Ok(ok_list(zones))
}

/// `GET /zones/{zone}/workers/routes`: no zone here holds a route.
pub async fn zone_routes(ZonePath(zone): ZonePath) -> Response {
    tracing::debug!(%zone, "routes of a placeholder zone: none");
    ok_list(Vec::<Value>::new())
}
