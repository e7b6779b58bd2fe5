//! The HTTP surface: paths as the real API server lays them out, dispatched by method to discovery,
//! OpenAPI, object and watch handlers. Every failure becomes a `Status` body.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::error::{ApiError, ApiResult};
use crate::objects::{self, Ctx, DeleteOptions, FieldValidation};
use crate::patch::PatchKind;
use crate::persist::Persist;
use crate::requests::{self, Requests};
use crate::resource::ResourceDef;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::Store;
use crate::watch::{self, WatchRequest};
use crate::{discovery, openapi, table};

/// Request bodies larger than this are refused; test objects are far smaller.
const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Clone)]
pub struct App {
    pub store: Arc<Mutex<Store>>,
    /// host:port the server listens on, for /api's serverAddressByClientCIDRs.
    pub address: String,
    pub bookmark_interval: Duration,
    pub requests: Arc<Requests>,
    /// Where every change is written before it is answered; `None`: memory only.
    pub persist: Option<Arc<Mutex<Persist>>>,
    /// The bearer token every request but the health probes must carry; `None`: anyone may.
    pub token: Option<Arc<str>>,
}

impl App {
    fn lock(&self) -> ApiResult<MutexGuard<'_, Store>> {
        self.store.lock().map_err(|_| ApiError::internal("store lock poisoned"))
    }

    /// Runs `change` on the store and, when it changed anything, appends the change to the journal
    /// (fsynced) before the lock is released and before watchers hear of it: once the client has
    /// its answer, or a watcher its event, a crash cannot undo the change, and no reader sees a
    /// state that a crash could take back.
    fn write<T>(&self, change: impl FnOnce(&mut Store) -> ApiResult<T>) -> ApiResult<T> {
        let mut store = self.lock()?;
        let result = change(&mut store);
        let saved = match &self.persist {
            Some(persist) => match persist.lock() {
                Ok(mut persist) => persist.record(&store),
                Err(_) => Err(std::io::Error::other("the journal lock is poisoned")),
            },
            None => Ok(()),
        };
        // Memory has the change either way; watchers must agree with what lists show.
        store.publish();
        drop(store);
        if let Err(e) = saved {
            tracing::error!(error = %e, "cannot save the API server's objects");
            // As the real server answers when storage does not confirm a write: the outcome is
            // unknown to the client (here: in memory, not on disk).
            return Err(ApiError::internal(format!("the change could not be stored durably: {e}")));
        }
        result
    }

    /// Whether the request carries the token (always, without one). Health probes stay open, as
    /// the real server leaves them to anonymous callers.
    fn authorized(&self, path: &str, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else { return true };
        if matches!(path.trim_end_matches('/'), "/healthz" | "/readyz" | "/livez") {
            return true;
        }
        let given = header(headers, header::AUTHORIZATION);
        let Some(given) = given.strip_prefix("Bearer ") else { return false };
        same_secret(given.trim().as_bytes(), token.as_bytes())
    }
}

/// Compares without stopping at the first differing byte, so the time taken says nothing about
/// how much of a guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.to_status(), &[])
    }
}

fn json_response(code: StatusCode, body: &Value, warnings: &[String]) -> Response {
    let mut response = (code, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for warning in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - {warning:?}")) {
            headers.append(header::WARNING, v);
        }
    }
    response
}

fn ok(body: &Value) -> ApiResult<Response> {
    Ok(json_response(StatusCode::OK, body, &[]))
}

pub async fn handle(State(app): State<App>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if !app.authorized(parts.uri.path(), &parts.headers) {
        tracing::debug!(method = %parts.method, uri = %parts.uri, "request without the token");
        return ApiError::unauthorized().into_response();
    }
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return ApiError::bad_request(format!("reading the request body: {e}")).into_response(),
    };
    let query: HashMap<String, String> =
        Query::<HashMap<String, String>>::try_from_uri(&parts.uri).map(|q| q.0).unwrap_or_default();
    tracing::debug!(method = %parts.method, uri = %parts.uri, "request");
    let routed = if parts.method == Method::GET || parts.method == Method::HEAD {
        route(&app, &parts.method, parts.uri.path(), &query, &parts.headers, body)
    } else {
        // A write waits for its fsync: off the async workers, so that other tasks go on meanwhile.
        tokio::task::spawn_blocking(move || {
            route(&app, &parts.method, parts.uri.path(), &query, &parts.headers, body)
        })
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("the request failed: {e}"))))
    };
    match routed {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!(code = e.code, message = %e.message, "request failed");
            e.into_response()
        }
    }
}

fn route(
    app: &App,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let get_only = || {
        if method == Method::GET {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed(
                "the server does not allow this method on the requested resource",
            ))
        }
    };
    match segments.as_slice() {
        ["version"] => {
            get_only()?;
            ok(&discovery::version())
        }
        ["healthz"] | ["readyz"] | ["livez"] => Ok((StatusCode::OK, "ok").into_response()),
        ["debug", "requests"] => {
            get_only()?;
            ok(&app.requests.to_json())
        }
        ["api"] => {
            get_only()?;
            ok(&discovery::core_versions(&app.address))
        }
        ["apis"] => {
            get_only()?;
            ok(&discovery::group_list(app.lock()?.defs()))
        }
        ["api", version] => {
            get_only()?;
            gv_resources(app, "", version)
        }
        ["apis", group] => {
            get_only()?;
            discovery::group(app.lock()?.defs(), group)
                .map(|g| ok(&g))
                .unwrap_or_else(|| Err(ApiError::path_not_found()))
        }
        ["apis", group, version] => {
            get_only()?;
            gv_resources(app, group, version)
        }
        ["openapi", "v3"] => {
            let store = app.lock()?;
            ok(&openapi::root(store.defs(), store.discovery_generation))
        }
        ["openapi", "v3", "api", version] => openapi_gv(app, "", version),
        ["openapi", "v3", "apis", group, version] => openapi_gv(app, group, version),
        ["api", version, rest @ ..] => resource(app, method, "", version, rest, query, headers, body),
        ["apis", group, version, rest @ ..] => {
            resource(app, method, group, version, rest, query, headers, body)
        }
        _ => Err(ApiError::path_not_found()),
    }
}

fn gv_resources(app: &App, group: &str, version: &str) -> ApiResult<Response> {
    let store = app.lock()?;
    let defs: Vec<&ResourceDef> =
        store.defs().iter().filter(|d| d.group == group && d.version == version).collect();
    if defs.is_empty() {
        return Err(ApiError::path_not_found());
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    ok(&discovery::resource_list(&gv, &defs))
}

fn openapi_gv(app: &App, group: &str, version: &str) -> ApiResult<Response> {
    let store = app.lock()?;
    let defs: Vec<&ResourceDef> =
        store.defs().iter().filter(|d| d.group == group && d.version == version).collect();
    if defs.is_empty() {
        return Err(ApiError::path_not_found());
    }
    ok(&openapi::group_version(&defs))
}

struct Target {
    def: ResourceDef,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn resolve(store: &Store, group: &str, version: &str, rest: &[&str]) -> ApiResult<Target> {
    let namespaced_path = rest.len() >= 3
        && rest[0] == "namespaces"
        && store.find_def(group, version, rest[2]).is_some_and(|d| d.namespaced);
    let (namespace, rest) =
        if namespaced_path { (Some(rest[1].to_string()), &rest[2..]) } else { (None, rest) };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return Err(ApiError::path_not_found()),
    };
    let def = store.find_def(group, version, plural).ok_or_else(ApiError::path_not_found)?;
    if !def.namespaced && namespace.is_some() {
        return Err(ApiError::path_not_found());
    }
    if def.namespaced && namespace.is_none() && name.is_some() {
        return Err(ApiError::path_not_found());
    }
    Ok(Target { def, namespace, name, subresource })
}

fn header(headers: &HeaderMap, name: header::HeaderName) -> &str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// The field manager of a write: `fieldManager`, else the user agent's program name, as the real
/// server derives it.
fn manager(query: &HashMap<String, String>, headers: &HeaderMap) -> String {
    if let Some(m) = query.get("fieldManager") {
        return m.clone();
    }
    let agent = header(headers, header::USER_AGENT);
    let program = agent.split('/').next().unwrap_or_default();
    if program.is_empty() {
        "unknown".to_string()
    } else {
        program.to_string()
    }
}

fn decode_body(headers: &HeaderMap, body: &[u8]) -> ApiResult<Value> {
    let content_type = header(headers, header::CONTENT_TYPE);
    if content_type.contains("protobuf") {
        return Err(ApiError::unsupported_media_type(content_type));
    }
    let text =
        std::str::from_utf8(body).map_err(|_| ApiError::bad_request("the request body is not UTF-8"))?;
    if content_type.contains("yaml") {
        return serde_saphyr::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")));
    }
    serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}")))
}

fn is_true(query: &HashMap<String, String>, key: &str) -> bool {
    matches!(query.get(key).map(String::as_str), Some("true") | Some("1"))
}

#[allow(clippy::too_many_arguments)]
fn resource(
    app: &App,
    method: &Method,
    group: &str,
    version: &str,
    rest: &[&str],
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let target = resolve(&*app.lock()?, group, version, rest)?;
    let def = &target.def;
    app.requests.record(requests::verb(method, target.name.is_some(), is_true(query, "watch")), &def.plural);
    let namespace = target.namespace.clone().unwrap_or_default();
    let accept = header(headers, header::ACCEPT);
    let include = query.get("includeObject").cloned().unwrap_or_else(|| "Metadata".to_string());
    let labels = LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or_default())?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or_default())?;
    let dry_run = query.contains_key("dryRun");
    let ctx = Ctx {
        def,
        namespace: namespace.clone(),
        manager: manager(query, headers),
        validation: FieldValidation::parse(query.get("fieldValidation").map(String::as_str))?,
        dry_run,
    };
    let not_allowed =
        || ApiError::method_not_allowed("the server does not allow this method on the requested resource");
    match (method.clone(), target.name.as_deref()) {
        (Method::GET, None) if is_true(query, "watch") => {
            let timeout = query.get("timeoutSeconds").and_then(|t| t.parse().ok()).map(Duration::from_secs);
            let request = WatchRequest {
                def: def.clone(),
                namespace: target.namespace.clone(),
                labels,
                fields,
                resource_version: query.get("resourceVersion").cloned(),
                bookmarks: is_true(query, "allowWatchBookmarks"),
                send_initial_events: is_true(query, "sendInitialEvents"),
                timeout,
                table: table::wants_table(accept).then_some(include),
                bookmark_interval: app.bookmark_interval,
            };
            let body = watch::start(&app.store, request)?;
            let content_type = "application/json";
            let mut response = Response::new(body);
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            Ok(response)
        }
        (Method::GET, None) => {
            let store = app.lock()?;
            let items: Vec<Value> = store
                .select(&def.storage_key(), target.namespace.as_deref(), &labels)
                .into_iter()
                .filter(|o| fields.matches(o))
                .map(|o| objects::served(def, o))
                .collect();
            let rv = store.current_rv();
            if table::wants_table(accept) {
                ok(&table::table(def, &items, Some(rv), &include))
            } else {
                ok(&objects::list_object(def, items, rv))
            }
        }
        (Method::GET, Some(name)) => {
            objects::scope_for(def, target.subresource.as_deref())?;
            let object = objects::get(&*app.lock()?, def, &namespace, name)?;
            if table::wants_table(accept) && target.subresource.is_none() {
                ok(&table::table(def, &[object], None, &include))
            } else {
                ok(&object)
            }
        }
        (Method::POST, None) => {
            if def.namespaced && target.namespace.is_none() {
                return Err(not_allowed());
            }
            let object = decode_body(headers, &body)?;
            let written = app.write(|store| objects::create(store, &ctx, object))?;
            Ok(json_response(StatusCode::CREATED, &written.object, &written.warnings))
        }
        (Method::PUT, Some(name)) => {
            let scope = objects::scope_for(def, target.subresource.as_deref())?;
            let object = decode_body(headers, &body)?;
            let written = app.write(|store| objects::update(store, &ctx, name, scope, object))?;
            Ok(json_response(StatusCode::OK, &written.object, &written.warnings))
        }
        (Method::PATCH, Some(name)) => {
            let scope = objects::scope_for(def, target.subresource.as_deref())?;
            let content_type = header(headers, header::CONTENT_TYPE);
            let kind = PatchKind::from_content_type(content_type)
                .ok_or_else(|| ApiError::unsupported_media_type(content_type))?;
            let force = is_true(query, "force");
            let written = app.write(|store| objects::patch(store, &ctx, name, scope, kind, &body, force))?;
            let code = if written.created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(json_response(code, &written.object, &written.warnings))
        }
        (Method::DELETE, Some(name)) => {
            if target.subresource.is_some() {
                return Err(not_allowed());
            }
            let options =
                DeleteOptions::parse(&body, query.get("propagationPolicy").map(String::as_str), dry_run)?;
            let object = app.write(|store| objects::delete(store, def, &namespace, name, &options))?;
            ok(&object)
        }
        (Method::DELETE, None) => {
            let options =
                DeleteOptions::parse(&body, query.get("propagationPolicy").map(String::as_str), dry_run)?;
            app.write(|store| {
                let matching: Vec<Value> = store
                    .select(&def.storage_key(), target.namespace.as_deref(), &labels)
                    .into_iter()
                    .filter(|o| fields.matches(o))
                    .collect();
                let mut deleted = Vec::new();
                for object in matching {
                    let ns = object["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
                    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
                    deleted.push(objects::delete(store, def, &ns, &name, &options)?);
                }
                let rv = store.current_rv();
                ok(&objects::list_object(def, deleted, rv))
            })
        }
        _ => Err(not_allowed()),
    }
}
