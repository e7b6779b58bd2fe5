//! An in-memory Kubernetes API server: the control plane of `workerbundle dev` and of the
//! project's tests. kubectl (1.32) and kube-rs clients (watchers, controllers, server-side apply,
//! event recorders) talk to it on 127.0.0.1 as they would to a real cluster.
//!
//! ```no_run
//! let server = memory_apiserver::MemoryApiServer::start()?;
//! server.write_kubeconfig(std::path::Path::new("kubeconfig"), "default")?;
//! // kubectl --kubeconfig kubeconfig apply -f crd.yaml ... ; kube::Client from the same file.
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Two ways to run it:
//! - Tests: [`MemoryApiServer::start`], plain HTTP, no credentials, memory only; anyone on the
//!   machine can reach it while it runs.
//! - `workerbundle dev` (and [`serve`], the `memory-apiserver` program): with
//!   [`Options::token`] every request but `/healthz`, `/readyz` and `/livez` must carry
//!   `Authorization: Bearer <token>` (401 otherwise), over HTTPS with a CA made at start, because
//!   kubectl sends credentials over TLS only; the kubeconfig written for it carries the CA and the
//!   token and is owner-only. With [`Options::data_file`] the objects (Secrets included) are kept
//!   in an owner-only file that is rewritten whole and fsynced, file and directory, before each
//!   write is answered and before watchers hear of it: an answered write survives a crash.
//!
//! # Faithful (behaves as the real server does, proven by the tests)
//! - Discovery: /version (v1.32.0), /api, /api/v1, /apis, /apis/{group}, /apis/{group}/{version}
//!   with verbs, scope, kind, shortNames, categories, singularName and `<plural>/status` entries.
//!   Aggregated discovery is not offered: kubectl falls back to these legacy documents.
//! - Built-in resources stored without schema: namespaces ("default" exists), secrets
//!   (`stringData` becomes base64 `data`), configmaps, services, pods (stored only: nothing
//!   schedules or runs them; tests play the kubelet by writing their status), events,
//!   serviceaccounts, deployments, events.k8s.io events, leases, RBAC roles/bindings, CRDs.
//! - CRDs: every served version is in discovery as soon as the CRD is written, with names, scope,
//!   status subresource, printer columns and schema; the CRD gets NamesAccepted and Established
//!   conditions and acceptedNames at once. Deleting a CRD removes its resource and objects.
//! - Metadata: uid, creationTimestamp, one global resourceVersion counter, generation (1 at
//!   create, +1 when anything but metadata and status changes), generateName, namespace from the
//!   path (400 on mismatch), 404 when creating in a namespace that does not exist.
//! - Errors are `Status` objects with the real reasons, codes and message wording.
//! - Optimistic concurrency: a stale metadata.resourceVersion on PUT or in a patch is a 409.
//! - Status subresource: writes to the main resource keep the stored status; writes to /status
//!   change only status. Without the subresource, status is an ordinary field.
//! - Patches: JSON merge patch, JSON patch; strategic merge patch for built-ins (415 for custom
//!   resources, as real, so kubectl uses merge patch for them).
//! - Server-side apply: create when missing (apiVersion and kind required), managedFields in
//!   FieldsV1 form, removal of fields the manager applied before and omits now, fields of other
//!   managers kept, 409 conflicts with the real message unless `force=true`, apply on /status.
//! - Watch: ADDED for current objects then live events, or events after a resourceVersion from a
//!   bounded history (an ERROR event with a 410 Expired Status when it is older), bookmarks,
//!   `sendInitialEvents=true` streaming lists ending with the `k8s.io/initial-events-end`
//!   bookmark, `timeoutSeconds`, label and field selectors.
//! - Deletion: finalizers hold an object with deletionTimestamp until an update empties them;
//!   Background, Foreground and Orphan propagation; garbage collection of dependents whose
//!   owners are all gone, across kinds and transitively; deletecollection with selectors.
//! - Custom resources are pruned, defaulted (on create, update and read) and validated against
//!   the CRD's structural schema, with all causes collected into one 422 with the real paths and
//!   wording; `fieldValidation=Strict` turns unknown fields into a 400 (Warn, the default, and
//!   Ignore prune them, Warn with a warning header). OpenAPI v3 documents tell kubectl that the
//!   server validates fields, so `kubectl apply` sends fieldValidation=Strict.
//! - `x-kubernetes-validations` CEL rules with `self`, transition rules with `oldSelf` (on update
//!   only), message, messageExpression, reason and fieldPath.
//! - Requests are counted by verb and resource (`GET /debug/requests`, `MemoryApiServer::requests`),
//!   as the real server's `apiserver_request_total` counts them.
//! - LIST and watch start take time in proportion to what they return: objects are kept sorted by
//!   namespace (one range each) and indexed by label (a selector with an equality reads only the
//!   objects carrying it).
//! - Tables for `kubectl get` (also on watch): NAME plus the CRD's printer columns, or NAME and
//!   AGE where a CRD declares none and for built-ins.
//!
//! # Approximated
//! - Strategic merge patch is merge patch that merges lists of objects by their `name` key and
//!   honours or drops the `$patch`/`$setElementOrder`/`$retainKeys`/`$deleteFromPrimitiveList`
//!   directives; there are no per-field patch strategies.
//! - Field ownership follows object keys only: a list is one atomic field (no `k:`/`v:` item
//!   keys, no `.` entries). Good for one apply manager per object plus Update managers.
//! - `limit` and `continue` are ignored: lists are always complete and never paginated.
//!   `resourceVersion` on list and get is ignored too (the latest state is served).
//! - Watches do not turn objects leaving or entering a selector into DELETED or ADDED events.
//! - Garbage collection runs inside the deleting request; namespace deletion removes the
//!   namespace's objects at once, ignoring their finalizers.
//! - Schema: `format` is checked only for int32 ranges; `x-kubernetes-embedded-resource` only
//!   keeps apiVersion/kind/metadata from pruning; list-type (`x-kubernetes-list-type`) rules are
//!   not enforced. CEL lacks the Kubernetes extension libraries; old values are correlated through
//!   object properties, not list items; a rule is a transition rule when it mentions `oldSelf`.
//!   CEL rules run only when every schema check passed (the real server still runs them after
//!   errors other than wrong types and unsupported enum values), so an object with a schema error
//!   and a rule violation reports the schema error alone.
//! - CRDs are checked only for what clients trip over (names, group, scope, one storage version,
//!   a schema per version); their table shows NAME and AGE rather than CREATED AT.
//! - Write requests take their field manager from `fieldManager`, else from the User-Agent's
//!   program name; `dryRun` computes the result without storing it.
//! - Authentication is one bearer token (or none), and whoever has it may do everything: no
//!   users, no authorization (RBAC objects are stored, not enforced), no admission webhooks, no
//!   conversion webhooks (all versions of a CRD share one stored form), no OpenAPI v2 (404;
//!   kubectl copes).
//! - Storage is one JSON file rewritten whole on every write, under the one lock that serializes
//!   all requests: fine for the hundreds of objects of a laptop or a test, not for a cluster's
//!   size or write rate. Events are kept like any object (no TTL), so the file grows with them.
//! - No protobuf: bodies are JSON (or YAML). kubectl's imperative typed commands that send
//!   protobuf (`kubectl create secret ...`, `kubectl create configmap ...`) get a 415; `kubectl
//!   apply`, `patch`, `label`, `delete`, `get` and friends, and kube-rs, all use JSON.

mod apply;
mod cel;
mod compiled;
mod crd;
mod discovery;
mod error;
mod files;
mod gc;
mod http;
mod kubeconfig;
mod objects;
mod openapi;
mod patch;
mod persist;
mod requests;
mod resource;
mod schema;
mod selector;
mod store;
mod table;
mod tls;
mod watch;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

pub use error::ApiError;
pub use tls::Tls;

/// Knobs tests may turn; `Default` is what `MemoryApiServer::start` uses.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Change events kept for watches that resume from a resourceVersion; older ones get 410.
    pub watch_history: usize,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// Keep every object in this file and load it at start: the state survives a restart, and a
    /// crash. Every change is written (whole file, fsynced, owner-only) before it is answered.
    /// `None`: memory only.
    pub data_file: Option<std::path::PathBuf>,
    /// Require `Authorization: Bearer <token>` on every request but `/healthz`, `/readyz` and
    /// `/livez`; others get 401. `None`: anyone who can reach the port may do anything. With a
    /// token the server speaks HTTPS (kubectl sends credentials over TLS only), with `tls`, or
    /// with certificates made at start when `tls` is `None`.
    pub token: Option<String>,
    /// Serve HTTPS with this identity (even without a token). A caller of [`serve`] that needs the
    /// CA certificate for its clients makes it here ([`Tls::generate`]).
    pub tls: Option<Tls>,
}

impl Options {
    /// The TLS identity to serve with: the given one, a new one when a token requires TLS, else
    /// none (plain HTTP).
    fn tls(&self) -> std::io::Result<Option<Tls>> {
        match (&self.tls, &self.token) {
            (Some(tls), _) => Ok(Some(tls.clone())),
            (None, Some(_)) => Tls::generate().map(Some),
            (None, None) => Ok(None),
        }
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            watch_history: store::DEFAULT_HISTORY,
            bookmark_interval: Duration::from_secs(1),
            data_file: None,
            token: None,
            tls: None,
        }
    }
}

/// The server, running on its own thread with its own tokio runtime so that both plain and
/// `#[tokio::test]` tests can use it. Dropping it stops the server.
pub struct MemoryApiServer {
    address: SocketAddr,
    token: Option<String>,
    tls: Option<Tls>,
    requests: Arc<requests::Requests>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

type SharedStore = Arc<Mutex<store::Store>>;

pub use requests::Counts as RequestCounts;

fn router(
    address: SocketAddr,
    options: &Options,
    (store, persist): (SharedStore, Option<persist::Persist>),
    requests: Arc<requests::Requests>,
) -> axum::Router {
    let app = http::App {
        store,
        address: address.to_string(),
        bookmark_interval: options.bookmark_interval,
        requests,
        persist: persist.map(|p| Arc::new(Mutex::new(p))),
        token: options.token.as_deref().map(Arc::from),
    };
    axum::Router::new().fallback(http::handle).with_state(app)
}

/// A new store, or the one `options.data_file` (and its journal) holds, with what keeps it there.
fn open_store(options: &Options) -> std::io::Result<(SharedStore, Option<persist::Persist>)> {
    let mut store = store::Store::new(options.watch_history);
    let persist = match &options.data_file {
        Some(path) => Some(persist::Persist::open(path, &mut store)?),
        None => None,
    };
    Ok((Arc::new(Mutex::new(store)), persist))
}

/// Serves on `listener` until `shutdown` completes; for callers that own a runtime (the binary).
/// Every change is on disk when it is answered, so there is nothing to save at the end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    options: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    let store = open_store(&options)?;
    let app = router(address, &options, store, Arc::default());
    match options.tls()? {
        Some(tls) => tls::serve(listener, &tls, app, shutdown).await,
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
    }
}

impl MemoryApiServer {
    pub fn start() -> std::io::Result<MemoryApiServer> {
        MemoryApiServer::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> std::io::Result<MemoryApiServer> {
        let listener = std::net::TcpListener::bind(options.listen)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let store = open_store(&options)?;
        let token = options.token.clone();
        let tls = options.tls()?;
        let serve_tls = tls.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("memory-apiserver")
            .enable_all()
            .build()?;
        let (shutdown, stop) = oneshot::channel::<()>();
        let requests = Arc::new(requests::Requests::default());
        let served = requests.clone();
        let thread = std::thread::Builder::new().name("memory-apiserver".to_string()).spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot use the listening socket");
                        return;
                    }
                };
                let app = router(address, &options, store, served);
                // Open watches would hold a graceful shutdown forever: stop serving at once.
                let served = async move {
                    match serve_tls {
                        Some(tls) => tls::serve(listener, &tls, app, std::future::pending()).await,
                        None => axum::serve(listener, app).await,
                    }
                };
                tokio::select! {
                    result = served => {
                        if let Err(e) = result {
                            tracing::error!(error = %e, "server stopped");
                        }
                    }
                    _ = stop => {}
                }
            });
            runtime.shutdown_timeout(Duration::from_millis(100));
        })?;
        Ok(MemoryApiServer { address, token, tls, requests, shutdown: Some(shutdown), thread: Some(thread) })
    }

    /// Requests served so far, by (verb, resource); also served as JSON on `GET /debug/requests`.
    pub fn requests(&self) -> RequestCounts {
        self.requests.counts()
    }

    /// `http://127.0.0.1:PORT`, or `https://` when the server speaks TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.address)
    }

    /// The CA certificate (PEM) clients trust the server by, when it speaks TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(Tls::ca_pem)
    }

    fn access(&self) -> kubeconfig::Access<'_> {
        kubeconfig::Access { token: self.token.as_deref(), ca_pem: self.ca_pem() }
    }

    /// A kubeconfig with one cluster (with the CA, over TLS), user (with the token, if the server
    /// requires one) and context (current) for this server.
    pub fn kubeconfig_yaml(&self, namespace: &str) -> String {
        kubeconfig::render(&self.url(), namespace, self.access())
    }

    /// Writes [`MemoryApiServer::kubeconfig_yaml`] to `path`, owner-only and atomically.
    pub fn write_kubeconfig(&self, path: &std::path::Path, namespace: &str) -> std::io::Result<()> {
        kubeconfig::write(path, &self.url(), namespace, self.access())
    }
}

impl Drop for MemoryApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // The server thread may already be gone; nothing to stop then.
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub use kubeconfig::{render as render_kubeconfig, write as write_kubeconfig, Access};
