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
pub mod cache;
mod context;
pub mod deployment;
mod error;
mod events;
pub mod health;
mod instrument;
pub mod leader;
pub mod metrics;
pub mod release;
mod trigger;

pub use apply::FIELD_MANAGER;
pub use context::{Context, Settings};
pub use error::Error;
pub use leader::LeaseOptions;

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::build::BuildContext;
use crate::crd::{WorkerAccount, WorkerBundle, WorkerDeployment, WorkerRelease, MANAGED_BY};
use health::Phase;
use instrument::instrumented;

/// An account is woken by every status change of each of its deployments and releases; it waits
/// for a short quiet moment so that a burst of them is one reconcile. Keeping its image from
/// changing once per release is the plan's hold (releases still being built), not this wait: at
/// 1 s / 0.5 s (account / bundle) a deploy reached its Deployment in ~1.6 s; at 200 / 100 ms in
/// ~0.4 s, with the same registry requests per account at 100 accounts and 2.5% more at 1,000
/// (scripts/bench-scale), and API requests per account growing 4-9% from 10 to 60 accounts
/// (tests/bundle.rs `api_requests_per_reconcile_do_not_grow_with_accounts`, bound 20%).
const ACCOUNT_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(200);
/// A bundle is woken by its spec, its own status writes and its Deployment's and Service's
/// changes: the same quiet moment collapses those bursts into one reconcile.
const BUNDLE_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(100);
/// How long, at shutdown, unused upload sessions are given to be cancelled.
const SHUTDOWN_CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Watch one namespace only; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Reconciles of each kind running at once.
    pub concurrency: Concurrency,
    pub settings: Settings,
    /// `/healthz`, `/readyz` and `/metrics`.
    pub health_listen: SocketAddr,
    /// Act only while holding this Lease; `None`: act at once (one replica only).
    pub leader_election: Option<LeaseOptions>,
}

/// Reconciles of each kind running at once. WorkerDeployment and WorkerAccount reconciles only
/// read caches and write to the API server; WorkerRelease and WorkerBundle reconciles also read
/// S3, build (CPU) and push to the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Concurrency {
    pub deployments: u16,
    pub releases: u16,
    pub accounts: u16,
    pub bundles: u16,
}

impl Concurrency {
    /// `api` for the kinds that only talk to the API server, `build` for those that build and push.
    pub fn new(api: u16, build: u16) -> Self {
        Concurrency { deployments: api, releases: build, accounts: api, bundles: build }
    }
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency::new(16, 8)
    }
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
    // Read for whether a bundle's new image starts: without the right to list them (an RBAC from
    // before), their cache would never fill and the controller never act; said here instead.
    check_listable(apis.get::<Pod>()).await?;

    // One watch per kind: its cache is what reconciles read, its changes are the triggers.
    let (mut watches, caches) = watches(&apis, options.settings.network_policies);
    let ctx = Arc::new(Context::new(client.clone(), build, options.settings.clone(), caches.clone()));
    let address = options.health_listen;
    let (health, _) =
        health::serve(address, ctx.clone()).await.map_err(|source| RunError::Health { address, source })?;
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

    let concurrency = options.concurrency;
    let config = |n: u16| ControllerConfig::default().concurrency(n);

    // Each controller is woken by changes to its own objects beyond their status (its own status
    // writes would only wake it again for nothing), and by any change to related objects.
    let trigger = trigger::beyond_status(watches.deployments.subscribe());
    let owned = watches.releases.subscribe();
    let deployments = Controller::for_shared_stream(trigger, caches.deployments.store())
        .owns_shared_stream(owned)
        .with_config(config(concurrency.deployments))
        .graceful_shutdown_on(stopped())
        .run(instrumented(deployment::reconcile), error_policy, ctx.clone())
        .for_each(log_outcome);
    let trigger = trigger::beyond_status(watches.releases.subscribe());
    let releases = Controller::for_shared_stream(trigger, caches.releases.store())
        .with_config(config(concurrency.releases))
        .graceful_shutdown_on(stopped())
        .run(instrumented(release::reconcile), error_policy, ctx.clone())
        .for_each(log_outcome);
    // A change to a deployment or release may change the bundle of the accounts that select it.
    let trigger = trigger::beyond_status(watches.accounts.subscribe());
    let owned = watches.bundles.subscribe();
    let (of_deployment, of_release) = (caches.accounts.clone(), caches.accounts.clone());
    let accounts = Controller::for_shared_stream(trigger, caches.accounts.store())
        .owns_shared_stream(owned)
        .watches_shared_stream(watches.deployments.subscribe(), move |d| {
            account::accounts_of(&of_deployment, &*d)
        })
        .watches_shared_stream(watches.releases.subscribe(), move |r| account::accounts_of(&of_release, &*r))
        .with_config(config(concurrency.accounts).debounce(ACCOUNT_DEBOUNCE))
        .graceful_shutdown_on(stopped())
        .run(instrumented(account::reconcile), error_policy, ctx.clone())
        .for_each(log_outcome);

    let trigger = trigger::beyond_status(watches.bundles.subscribe());
    let bundle_cache = caches.bundles.clone();
    let bundles = Controller::for_shared_stream(trigger, caches.bundles.store())
        .owns_shared_stream(watches.workloads.subscribe())
        .owns_shared_stream(watches.services.subscribe());
    let bundles = match watches.network_policies.as_mut() {
        Some(policies) => bundles.owns_shared_stream(policies.subscribe()),
        None => bundles,
    };
    let bundles = bundles
        // A Secret's keys change a bundle's image, its values the pods: either wakes the bundle.
        .watches_shared_stream(watches.secrets.subscribe(), move |s| {
            bundle::bundles_of_secret(&bundle_cache, &s)
        })
        // A pod's containers tell whether the bundle's new image starts (see bundle::plan::stalled).
        .watches_shared_stream(watches.pods.subscribe(), |p| bundle::bundle_of_pod(&p))
        .with_config(config(concurrency.bundles).debounce(BUNDLE_DEBOUNCE))
        .graceful_shutdown_on(stopped())
        .run(instrumented(bundle::reconcile), error_policy, ctx.clone())
        .for_each(log_outcome);

    // Ready once every cache has been filled.
    let synced = async move {
        caches.synced().await;
        info!("watch caches synced");
        health.set(Phase::Acting);
    };
    info!(namespace = options.namespace.as_deref().unwrap_or("(all)"), "controllers started");
    let controllers = async {
        // The watches serve the controllers: they stop when every controller has stopped.
        let controllers = async { tokio::join!(deployments, releases, accounts, bundles, synced) };
        tokio::select! {
            _ = controllers => {}
            () = watches.run() => {}
        }
    };
    match leadership {
        None => controllers.await,
        Some((elector, held)) => elector.lead(held, controllers).await?,
    }
    ctx.cancel_upload_sessions(SHUTDOWN_CANCEL_WAIT).await;
    info!("stopped");
    Ok(())
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

/// Lists one object of a built-in kind where the controller will watch it.
async fn check_listable<K>(api: Api<K>) -> Result<(), RunError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(source) => Err(RunError::CannotList { kind: K::kind(&()).into_owned(), source }),
    }
}

/// Only the Services, NetworkPolicies and pods we made are watched. Every Deployment is, for the
/// images it runs (an image another Deployment runs is never purged); those that are not ours
/// are cached trimmed to that.
fn managed_by_us() -> watcher::Config {
    watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"))
}

/// The watches of every kind the controllers read, and their caches.
fn watches(apis: &Apis, network_policies: bool) -> (cache::Watches, cache::Caches) {
    use cache::*;
    let all = watcher::Config::default;
    let (deployments, deployments_cache) = Watch::new(apis.get(), all(), deployment_keys);
    let (releases, releases_cache) = Watch::new(apis.get(), all(), release_keys);
    let (accounts, accounts_cache) = Watch::new(apis.get(), all(), account_keys);
    let (bundles, bundles_cache) = Watch::new(apis.get(), all(), bundle_keys);
    let (workloads, workloads_cache) = Watch::new(apis.get(), all(), workload_keys);
    let workloads = workloads.trimmed(foreign_deployment_trimmed);
    let (services, services_cache) = Watch::new(apis.get(), managed_by_us(), no_keys);
    let (secrets, secrets_cache) = Watch::new(apis.get(), all(), no_keys);
    // Only our bundles' pods (the pod template carries the label), for whether a new image starts.
    let (pods, pods_cache) = Watch::new(apis.get(), managed_by_us(), pod_keys);
    let pods = pods.trimmed(pod_trimmed);
    let (policies, policies_cache) = match network_policies {
        true => {
            let (watch, cache) = Watch::new(apis.get(), managed_by_us(), no_keys);
            (Some(watch), Some(cache))
        }
        false => (None, None),
    };
    (
        Watches {
            deployments,
            releases,
            accounts,
            bundles,
            workloads,
            services,
            secrets,
            network_policies: policies,
            pods,
        },
        Caches {
            deployments: deployments_cache,
            releases: releases_cache,
            accounts: accounts_cache,
            bundles: bundles_cache,
            workloads: workloads_cache,
            services: services_cache,
            secrets: secrets_cache,
            network_policies: policies_cache,
            pods: pods_cache,
        },
    )
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
