//! `workerbundle api`: the Cloudflare-compatible HTTP API that unmodified wrangler deploys to.
//!
//! Uploads become versions in S3 (`<account>/<script>/<version-id>/`: the modules, then
//! `metadata.json`) and the WorkerDeployment of (account, script) is server-side-applied to point
//! at the version; the controller builds one WorkerRelease per version. Secrets live in one
//! Kubernetes Secret per script. Every route below `/client/v4` is authenticated and authorised
//! (the token's account must be the path's) before anything is read or written.
//!
//! - [`routes`]: the route table the router is built from (tests walk it);
//! - `path`: every path parameter checked, once, before anything else (names become keys);
//! - `auth`: tokens → accounts; `limits`: sizes and the per-token rate;
//! - `upload`: the multipart form, validated whole; `store`: S3 and Kubernetes I/O;
//! - `scripts`, `versions`, `secrets`, `settings`, `triggers`: the handlers; `undo`: a deploy
//!   whose trigger phase is refused is undone; `envelope`: Cloudflare's response shape.

mod auth;
mod envelope;
mod limits;
mod path;
mod scripts;
mod secrets;
mod settings;
mod store;
mod triggers;
mod undo;
mod upload;
#[cfg(test)]
mod upload_hostile_tests;
mod versions;

pub use auth::{check_account_id, token_hash, TokenSource, TokenTable};
pub use limits::Limits;
pub use path::PARAMETERS as PATH_PARAMETERS;
pub use store::Placement;
pub use upload::{secret_name, METADATA_FIELDS};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, on, MethodFilter, MethodRouter};
use axum::Router;
use tracing::{info, info_span, warn, Instrument};

use crate::source::s3::{S3Options, S3Source};
use crate::source::S3Url;
use crate::startup_check::StartupChecker;
use envelope::ApiError;
use limits::RateLimits;

/// Where wrangler's `CLOUDFLARE_API_BASE_URL` points: `http://HOST:PORT/client/v4`.
pub const BASE_PATH: &str = "/client/v4";

/// Everything a request handler may use.
pub struct ApiState {
    store: store::Store,
    tokens: auth::Tokens,
    rate: RateLimits,
    limits: Limits,
    /// Loads each upload in workerd before it is stored; `None` only when the operator turned it
    /// off (`--no-startup-check`).
    startup_check: Option<StartupChecker>,
}

type Shared = Arc<ApiState>;

/// One route of the API, below [`BASE_PATH`].
pub struct Route {
    pub method: Method,
    /// axum path syntax: `{account_id}` marks the account the route acts on.
    pub path: &'static str,
    handler: fn(MethodFilter) -> MethodRouter<Shared>,
}

/// The API's routes; the router is built from exactly this table.
pub fn routes() -> Vec<Route> {
    fn route(method: Method, path: &'static str, handler: fn(MethodFilter) -> MethodRouter<Shared>) -> Route {
        Route { method, path, handler }
    }
    vec![
        route(Method::GET, "/memberships", |m| on(m, scripts::memberships)),
        route(Method::GET, "/accounts/{account_id}/workers/subdomain", |m| on(m, scripts::account_subdomain)),
        route(Method::GET, "/accounts/{account_id}/workers/scripts", |m| on(m, scripts::list)),
        // `wrangler delete` looks for the worker's Workers Sites KV namespaces: there are none.
        route(Method::GET, "/accounts/{account_id}/storage/kv/namespaces", |m| on(m, scripts::kv_namespaces)),
        route(Method::GET, "/accounts/{account_id}/workers/services/{script_name}", |m| {
            on(m, scripts::service)
        }),
        // `wrangler delete` deletes the service; a script and its service are the same thing here.
        route(Method::DELETE, "/accounts/{account_id}/workers/services/{script_name}", |m| {
            on(m, scripts::delete)
        }),
        route(Method::GET, "/accounts/{account_id}/workers/scripts/{script_name}", |m| {
            on(m, scripts::content)
        }),
        route(Method::PUT, "/accounts/{account_id}/workers/scripts/{script_name}", |m| {
            on(m, scripts::upload)
        }),
        route(Method::DELETE, "/accounts/{account_id}/workers/scripts/{script_name}", |m| {
            on(m, scripts::delete)
        }),
        // `wrangler delete` without --force: what depends on the worker first.
        route(Method::GET, "/accounts/{account_id}/workers/scripts/{script_name}/references", |m| {
            on(m, scripts::references)
        }),
        route(Method::GET, "/accounts/{account_id}/workers/tails/by-consumer/{script_name}", |m| {
            on(m, scripts::tail_producers)
        }),
        route(Method::GET, "/accounts/{account_id}/workers/scripts/{script_name}/settings", |m| {
            on(m, settings::settings)
        }),
        // `wrangler secret bulk`.
        route(Method::PATCH, "/accounts/{account_id}/workers/scripts/{script_name}/settings", |m| {
            on(m, settings::patch_settings)
        }),
        route(Method::GET, "/accounts/{account_id}/workers/scripts/{script_name}/script-settings", |m| {
            on(m, settings::script_settings)
        }),
        route(Method::PATCH, "/accounts/{account_id}/workers/scripts/{script_name}/script-settings", |m| {
            on(m, settings::patch_script_settings)
        }),
        route(Method::GET, "/accounts/{account_id}/workers/scripts/{script_name}/subdomain", |m| {
            on(m, scripts::subdomain)
        }),
        route(Method::POST, "/accounts/{account_id}/workers/scripts/{script_name}/subdomain", |m| {
            on(m, scripts::subdomain)
        }),
        // The trigger phase of a deploy, after the new code is live (see `triggers` and `undo`).
        route(Method::GET, "/accounts/{account_id}/workers/scripts/{script_name}/schedules", |m| {
            on(m, triggers::schedules)
        }),
        route(Method::PUT, "/accounts/{account_id}/workers/scripts/{script_name}/schedules", |m| {
            on(m, triggers::put_schedules)
        }),
        route(Method::PUT, "/accounts/{account_id}/workers/scripts/{script_name}/routes", |m| {
            on(m, triggers::put_routes)
        }),
        route(Method::PUT, "/accounts/{account_id}/workers/scripts/{script_name}/domains/records", |m| {
            on(m, triggers::put_domains)
        }),
        route(Method::POST, "/accounts/{account_id}/workers/scripts/{script_name}/domains/changeset", |m| {
            on(m, triggers::domains_changeset)
        }),
        route(Method::GET, "/zones", |m| on(m, triggers::zones)),
        route(Method::GET, "/zones/{zone_id}/workers/routes", |m| on(m, triggers::zone_routes)),
        route(Method::GET, "/accounts/{account_id}/workers/scripts/{script_name}/versions", |m| {
            on(m, versions::list)
        }),
        route(Method::POST, "/accounts/{account_id}/workers/scripts/{script_name}/versions", |m| {
            on(m, versions::upload)
        }),
        route(
            Method::GET,
            "/accounts/{account_id}/workers/scripts/{script_name}/versions/{version_id}",
            |m| on(m, versions::get),
        ),
        route(Method::GET, "/accounts/{account_id}/workers/scripts/{script_name}/deployments", |m| {
            on(m, versions::deployments)
        }),
        route(Method::POST, "/accounts/{account_id}/workers/scripts/{script_name}/deployments", |m| {
            on(m, versions::deploy)
        }),
        route(Method::GET, "/accounts/{account_id}/workers/scripts/{script_name}/secrets", |m| {
            on(m, secrets::list)
        }),
        route(Method::PUT, "/accounts/{account_id}/workers/scripts/{script_name}/secrets", |m| {
            on(m, secrets::put)
        }),
        route(
            Method::DELETE,
            "/accounts/{account_id}/workers/scripts/{script_name}/secrets/{secret_name}",
            |m| on(m, secrets::delete),
        ),
    ]
}

/// The whole HTTP service: `/healthz`, and the routes below [`BASE_PATH`] behind authentication,
/// rate limits and the request log.
pub fn router(state: Shared) -> Router {
    let mut api = Router::new();
    for route in routes() {
        // Start-up only: every method in the table is one axum can route.
        let filter = MethodFilter::try_from(route.method.clone()).expect("a routable method");
        api = api.route(route.path, (route.handler)(filter));
    }
    // Outermost first: the request log, the path check (before any I/O, the token table's too),
    // authentication, then the handler.
    let api = api
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route_layer(middleware::from_fn(path::check_path))
        .route_layer(middleware::from_fn(log_request))
        .method_not_allowed_fallback(unknown_route)
        .layer(DefaultBodyLimit::max(state.limits.max_upload_bytes));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .nest(BASE_PATH, api)
        .fallback(unknown_route)
        .with_state(state)
}

/// Token → accounts → the path's (checked) account, then the token's rate; all before the handler
/// runs.
async fn authenticate(State(api): State<Shared>, mut request: Request, next: Next) -> Response {
    let table = match api.tokens.current().await {
        Ok(table) => table,
        Err(e) => {
            warn!(error = %e, "request refused: no usable token table");
            return ApiError::Backend("the server's token table is unusable; its log says why".into())
                .into_response();
        }
    };
    let header = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    // Fail closed: without the path check's result the account would read as "none".
    let Some(checked) = request.extensions().get::<path::CheckedPath>() else {
        warn!("request refused: its path was not checked (the route table is misconfigured)");
        return ApiError::Backend("the server's route table is misconfigured; its log says why".into())
            .into_response();
    };
    let account = checked.account.clone();
    let caller = match auth::authorize(&table, header, account.as_ref().map(path::AccountId::as_str)) {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = api.rate.check(&caller.token_hash) {
        return e.into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// One line per request: method, route, account, status, duration. Never a header or a body.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let account = auth::account_in_path(request.uri().path()).unwrap_or("-").to_owned();
    let span = info_span!("request", %method, %route, %account);
    let start = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let duration_ms = (start.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    span.in_scope(|| info!(status = response.status().as_u16(), duration_ms, "request"));
    response
}

/// Anything wrangler asks that we do not serve: a Cloudflare "not found" naming the request, and a
/// log line, so a new wrangler's new call is easy to spot.
async fn unknown_route(method: Method, uri: axum::http::Uri) -> Response {
    warn!(%method, path = uri.path(), "request for a route this API does not serve");
    ApiError::NotFound(format!("this server does not serve {method} {}", uri.path())).into_response()
}

/// How `workerbundle api` runs.
#[derive(Clone, Debug)]
pub struct ApiOptions {
    pub listen: SocketAddr,
    pub bucket: String,
    pub tokens: TokenSource,
    pub placement: Placement,
    pub limits: Limits,
    pub s3: S3Options,
    /// See [`ApiState`]: `None` stores uploads without loading them first.
    pub startup_check: Option<StartupChecker>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--bucket: {0}")]
    Bucket(String),
    #[error("cannot reach the Kubernetes API (KUBECONFIG or ~/.kube/config, else the in-cluster service account): {0}")]
    Connect(kube::Error),
    #[error("{0}")]
    Tokens(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("the HTTP server stopped: {0}")]
    Serve(std::io::Error),
}

/// Serves until SIGINT or SIGTERM; requests in flight finish first. `listening` is told the
/// address actually bound (port 0 picks a free one).
pub async fn serve(options: ApiOptions, listening: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let kube = kube::Client::try_default().await.map_err(ServeError::Connect)?;
    serve_with(options, kube, crate::shutdown_signal(), listening).await
}

/// [`serve`] with a given Kubernetes client, until `shutdown` completes (`workerbundle dev`
/// serves the API beside its own control plane).
pub async fn serve_with(
    options: ApiOptions,
    kube: kube::Client,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let listener = std::net::TcpListener::bind(options.listen)
        .map_err(|source| ServeError::Listen { addr: options.listen, source })?;
    serve_on(options, listener, kube, shutdown, listening).await
}

/// [`serve_with`] on a listener bound by the caller (`workerbundle dev` binds every port it
/// serves before it starts anything, so a port in use stops it at once).
pub async fn serve_on(
    options: ApiOptions,
    listener: std::net::TcpListener,
    kube: kube::Client,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    S3Url::parse(&format!("s3://{}/", options.bucket)).map_err(ServeError::Bucket)?;
    let kube_for_tokens = matches!(options.tokens, TokenSource::Secret { .. }).then(|| kube.clone());
    let tokens =
        auth::Tokens::load(options.tokens.clone(), kube_for_tokens).await.map_err(ServeError::Tokens)?;
    let s3 = S3Source::new(options.s3.clone()).await;
    let state = Arc::new(ApiState {
        store: store::Store::new(
            options.bucket.clone(),
            s3.client().clone(),
            kube,
            options.placement.clone(),
        ),
        tokens,
        rate: RateLimits::new(options.limits.requests_per_minute),
        limits: options.limits.clone(),
        startup_check: options.startup_check.clone(),
    });
    let listen_error = |source| ServeError::Listen { addr: options.listen, source };
    listener.set_nonblocking(true).map_err(listen_error)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(listen_error)?;
    let addr = listener.local_addr().map_err(listen_error)?;
    info!(%addr, bucket = %options.bucket, placement = ?options.placement, "API listening");
    listening(addr);
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await.map_err(ServeError::Serve)?;
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_unique_and_names_its_account() {
        let table = routes();
        let mut seen = std::collections::BTreeSet::new();
        for r in &table {
            assert!(seen.insert((r.method.to_string(), r.path)), "{} {} twice", r.method, r.path);
            assert!(MethodFilter::try_from(r.method.clone()).is_ok());
            if r.path.starts_with("/accounts/") {
                assert!(r.path.starts_with("/accounts/{account_id}/"), "{}", r.path);
                assert_eq!(auth::account_in_path(r.path), Some("{account_id}"));
            }
        }
    }
}
