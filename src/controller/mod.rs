//! The controller: one kube-runtime Controller per kind, each reconcile an observe → plan → apply
//! → status pipeline whose plan step is a pure function (see each kind's `plan.rs`).
//!
//! - WorkerDeployment → a WorkerRelease per distinct template (history pruned);
//! - WorkerRelease → the worker's layer, built and pushed once;
//! - WorkerAccount → its WorkerBundle, listing the Ready release of each selected deployment;
//! - WorkerBundle → one image (base + worker layers + config layer) → a Deployment and Service.
//!
//! Operations: `/healthz`, `/readyz` and `/metrics` (health.rs, metrics.rs), leader election on a
//! Lease (leader.rs), a span per reconciled object (instrument.rs).

pub mod account;
mod apply;
mod backoff;
mod bases;
pub mod bundle;
mod context;
pub mod deployment;
mod error;
pub mod health;
mod instrument;
pub mod leader;
pub mod metrics;
pub mod release;

pub use apply::FIELD_MANAGER;
pub use context::{Context, Settings};
pub use error::Error;
pub use leader::LeaseOptions;

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use kube::api::ListParams;
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};

use crate::build::BuildContext;
use crate::crd::{WorkerAccount, WorkerBundle, WorkerDeployment, WorkerRelease, MANAGED_BY};
use health::Phase;
use instrument::instrumented;

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Watch one namespace only; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Reconciles of one kind running at once.
    pub concurrency: u16,
    pub settings: Settings,
    /// `/healthz`, `/readyz` and `/metrics`.
    pub health_listen: SocketAddr,
    /// Act only while holding this Lease; `None`: act at once (one replica only).
    pub leader_election: Option<LeaseOptions>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach the Kubernetes API (KUBECONFIG or ~/.kube/config, else the in-cluster service account): {0}")]
    Connect(kube::Error),
    #[error(
        "the {kind} CRD is not installed ({source}); install it with `workerbundle crd | kubectl apply -f -`"
    )]
    MissingCrd { kind: String, source: kube::Error },
    #[error("cannot list {kind} objects ({source}); check the controller's RBAC (deploy/rbac.yaml) and the API server")]
    CannotList { kind: String, source: kube::Error },
    #[error(
        "cannot serve /healthz, /readyz and /metrics on {address} ({source}); choose another --health-listen"
    )]
    Health { address: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
}

/// Runs every controller until SIGINT or SIGTERM; in-flight reconciles finish first. With leader
/// election, only while holding the lease: a follower waits for it, and a leader that cannot
/// renew it returns `RunError::Leader` at once (the process must exit: it may no longer act).
pub async fn run(options: RunOptions, build: BuildContext) -> Result<(), RunError> {
    let client = Client::try_default().await.map_err(RunError::Connect)?;
    run_with(client, options, build, crate::shutdown_signal()).await
}

/// [`run`] with a given client, until `shutdown` completes (`workerbundle dev` runs the
/// controllers beside its own API server and stops them with everything else).
pub async fn run_with(
    client: Client,
    options: RunOptions,
    build: BuildContext,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let apis = Apis { client: client.clone(), namespace: options.namespace.clone() };
    check_crd(apis.get::<WorkerDeployment>()).await?;
    check_crd(apis.get::<WorkerRelease>()).await?;
    check_crd(apis.get::<WorkerAccount>()).await?;
    check_crd(apis.get::<WorkerBundle>()).await?;

    let ctx =
        Arc::new(Context::new(client.clone(), build, options.settings.clone(), options.namespace.clone()));
    let address = options.health_listen;
    let (health, _) =
        health::serve(address, ctx.clone()).await.map_err(|source| RunError::Health { address, source })?;
    let config = ControllerConfig::default().concurrency(options.concurrency);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    tokio::spawn(async move {
        shutdown.await;
        info!("shutting down: finishing reconciles in flight");
        let _ = stop_tx.send(true);
    });

    // Only the leader acts; a follower waits here (ready to take over) until it leads or stops.
    let leadership = match options.leader_election.clone() {
        None => None,
        Some(lease) => {
            let mut elector = leader::Elector::new(client, lease, options.namespace.as_deref());
            tokio::select! {
                held = elector.acquire(|| health.set(Phase::StandingBy)) => Some((elector, held?)),
                () = stopped() => {
                    info!("stopped while standing by");
                    return Ok(());
                }
            }
        }
    };
    health.set(Phase::Syncing);

    // Ready once every controller's cache of its own kind has been filled.
    let mut caches: Vec<BoxFuture<'static, ()>> = Vec::new();
    let deployments = Controller::new(apis.get::<WorkerDeployment>(), watcher::Config::default());
    caches.push(cache_synced(deployments.store()));
    let deployments = deployments
        .owns(apis.get::<WorkerRelease>(), watcher::Config::default())
        .with_config(config.clone())
        .graceful_shutdown_on(stopped())
        .run(instrumented(deployment::reconcile), error_policy, ctx.clone())
        .for_each(log_outcome);
    let releases = Controller::new(apis.get::<WorkerRelease>(), watcher::Config::default());
    caches.push(cache_synced(releases.store()));
    let releases = releases
        .with_config(config.clone())
        .graceful_shutdown_on(stopped())
        .run(instrumented(release::reconcile), error_policy, ctx.clone())
        .for_each(log_outcome);
    let accounts = Controller::new(apis.get::<WorkerAccount>(), watcher::Config::default());
    let store = accounts.store();
    let store2 = store.clone();
    caches.push(cache_synced(store.clone()));
    // Any change to a deployment or release may change the bundles of its namespace's accounts.
    let accounts = accounts
        .owns(apis.get::<WorkerBundle>(), watcher::Config::default())
        .watches(apis.get::<WorkerDeployment>(), watcher::Config::default(), move |d| accounts_of(&store, &d))
        .watches(apis.get::<WorkerRelease>(), watcher::Config::default(), move |r| accounts_of(&store2, &r))
        .with_config(config)
        .graceful_shutdown_on(stopped())
        .run(instrumented(account::reconcile), error_policy, ctx.clone())
        .for_each(log_outcome);

    let bundles = Controller::new(apis.get::<WorkerBundle>(), watcher::Config::default());
    let bundle_store = bundles.store();
    caches.push(cache_synced(bundle_store.clone()));
    let bundles = bundles
        .owns(apis.get::<Deployment>(), managed_by_us())
        .owns(apis.get::<Service>(), managed_by_us())
        // A Secret's keys change a bundle's image, its values the pods: either wakes the bundle.
        .watches(apis.get::<Secret>(), watcher::Config::default(), move |s| {
            bundle::bundles_of_secret(&bundle_store, &s)
        })
        .with_config(ControllerConfig::default().concurrency(options.concurrency))
        .graceful_shutdown_on(stopped())
        .run(instrumented(bundle::reconcile), error_policy, ctx)
        .for_each(log_outcome);

    let synced = async move {
        futures::future::join_all(caches).await;
        info!("watch caches synced");
        health.set(Phase::Acting);
    };
    info!(namespace = options.namespace.as_deref().unwrap_or("(all)"), "controllers started");
    let controllers = async {
        tokio::join!(deployments, releases, accounts, bundles, synced);
    };
    match leadership {
        None => controllers.await,
        Some((elector, held)) => elector.lead(held, controllers).await?,
    }
    info!("stopped");
    Ok(())
}

/// Completes once `store` holds its first complete list (or its controller stopped).
fn cache_synced<K>(store: Store<K>) -> BoxFuture<'static, ()>
where
    K: kube::runtime::reflector::Lookup + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    async move {
        let _ = store.wait_until_ready().await;
    }
    .boxed()
}

struct Apis {
    client: Client,
    namespace: Option<String>,
}

impl Apis {
    fn get<K>(&self) -> Api<K>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }
}

/// Lists one object of the kind where the controller will watch it: a 404 means the CRD is
/// missing; anything else (403, unreachable) is reported as it is.
async fn check_crd<K>(api: Api<K>) -> Result<(), RunError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let kind = K::kind(&()).into_owned();
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            Err(RunError::MissingCrd { kind, source: kube::Error::Api(e) })
        }
        Err(source) => Err(RunError::CannotList { kind, source }),
    }
}

/// Only the Deployments and Services we made are watched.
fn managed_by_us() -> watcher::Config {
    watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"))
}

fn accounts_of<K: Resource>(
    store: &kube::runtime::reflector::Store<WorkerAccount>,
    object: &K,
) -> Vec<ObjectRef<WorkerAccount>> {
    let namespace = object.meta().namespace.clone();
    store.state().iter().filter(|a| a.namespace() == namespace).map(|a| ObjectRef::from_obj(&**a)).collect()
}

/// `Kind/namespace/name`: the key of an object's retry state.
pub fn object_key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.name_any()
    )
}

fn error_policy<K: Resource<DynamicType = ()>>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let wait = ctx.backoff.failed(&object_key(&*object));
    ctx.metrics.error(&K::kind(&()), error.reason());
    warn!(object = %object_key(&*object), reason = error.reason(), error = %error.message(), retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

async fn log_outcome<T: Debug, E: std::error::Error>(outcome: Result<T, E>) {
    match outcome {
        Ok(done) => debug!(?done, "reconciled"),
        Err(e) => debug!(error = %crate::error_chain(&e), "reconcile did not run"),
    }
}
