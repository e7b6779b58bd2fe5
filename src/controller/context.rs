//! What every reconcile shares: the API client, the Event recorder, the builder's clients (kept
//! for the process's life so pushes and downloads are remembered), settings, retry state and
//! metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Client, Resource};
use sha2::{Digest as _, Sha256};
use tracing::warn;

use super::backoff::Backoff;
use super::bases::Bases;
use super::cache::Caches;
use super::events::Recorders;
use super::metrics::Metrics;
use super::Error;
use crate::build::bundle::BundleWorkerLayer;
use crate::build::{BuildContext, ResolvedBase};
use crate::digest::Digest;
use crate::image::assemble::{AssembleOptions, ImageWorker};
use crate::image::reference::ImageRef;
use crate::registry::Registries;

/// The key of a `kubernetes.io/dockerconfigjson` Secret.
pub const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

/// Controller settings from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `registry/path`: an account's repository is `<prefix>/<account>` unless its WorkerAccount
    /// names one.
    pub repository_prefix: Option<String>,
    /// mtime of every file in the layers built.
    pub source_date_epoch: i64,
    /// The workerd base image of bundles that name none.
    pub base_image: Option<ImageRef>,
    /// Give each bundle's pods a NetworkPolicy (bundle/network_policy.rs).
    pub network_policies: bool,
    /// Loads each release's worker alone in workerd before the release is Ready (releases made
    /// with kubectl never met the API's check); `None` when the operator turned it off.
    pub startup_check: Option<crate::startup_check::StartupChecker>,
}

/// Registry clients made from one account's pull secret, and a hash of the secret they came from.
type AccountRegistries = (Vec<u8>, Arc<Registries>);

pub struct Context {
    pub client: Client,
    pub build: BuildContext,
    pub settings: Settings,
    /// What reconciles read related objects from (kept current by one watch per kind).
    pub caches: Caches,
    pub backoff: Backoff,
    /// Base images resolved so far, by reference.
    pub bases: Bases,
    /// What every reconcile records (served on `/metrics`).
    pub metrics: Arc<Metrics>,
    recorders: Recorders,
    /// By `namespace/secret`; replaced when the secret's content changes, kept otherwise so that
    /// the push memory of an account's registries lives as long as the process.
    account_registries: Mutex<HashMap<String, AccountRegistries>>,
    /// The image this process last pushed for each bundle (by uid): a reconcile that runs on a
    /// cached bundle older than our own status write must not push the same image again.
    pushed: Mutex<HashMap<String, LastPush>>,
    /// The image last assembled for each bundle (by uid) and what it was assembled from. Most
    /// bundle reconciles change nothing the image is made of (a release settling, a Deployment's
    /// status): they get the image's reference from here instead of assembling it again.
    assembled: Mutex<HashMap<String, (AssemblyInputs, String)>>,
}

/// The image this process pushed last under a bundle's tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastPush {
    pub image: String,
    /// Set when a release pushed it ahead of the bundle: the bundle's generation it was worked
    /// out from.
    pub ahead_of: Option<i64>,
}

/// Everything a bundle's image is assembled from (the base by its manifest's digest), and the
/// repository its reference names: equal inputs give the same image, byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssemblyInputs {
    pub repository: String,
    pub base: Digest,
    pub base_name: String,
    pub source_date_epoch: i64,
    pub workers: Vec<ImageWorker>,
}

impl AssemblyInputs {
    pub fn of(
        repository: &str,
        base: &ResolvedBase,
        options: &AssembleOptions,
        workers: &[BundleWorkerLayer],
    ) -> Self {
        AssemblyInputs {
            repository: repository.to_owned(),
            base: base.image.manifest_digest.clone(),
            base_name: base.name.clone(),
            source_date_epoch: options.source_date_epoch,
            workers: workers.iter().map(|w| w.worker.clone()).collect(),
        }
    }
}

impl Context {
    pub fn new(client: Client, build: BuildContext, settings: Settings, caches: Caches) -> Self {
        let reporter = Reporter {
            controller: "workerbundle-controller".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorders: Recorders::new(client.clone(), reporter),
            client,
            build,
            settings,
            caches,
            backoff: Backoff::new(Duration::from_secs(2), Duration::from_secs(300)),
            bases: Bases::default(),
            account_registries: Mutex::default(),
            pushed: Mutex::default(),
            assembled: Mutex::default(),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Cancels the upload sessions opened ahead of a push that no push used (at shutdown, so
    /// that none is left on a registry), waiting at most `within`.
    pub async fn cancel_upload_sessions(&self, within: Duration) {
        let mut all = vec![self.build.registries.clone()];
        if let Ok(accounts) = self.account_registries.lock() {
            all.extend(accounts.values().map(|(_, registries)| registries.clone()));
        }
        let cancels = futures::future::join_all(all.iter().map(|r| r.cancel_open_sessions()));
        if tokio::time::timeout(within, cancels).await.is_err() {
            tracing::debug!("stopped cancelling unused upload sessions: the registry is slow to answer");
        }
    }

    /// The registries to push an account's blobs and images with: those made from its image pull
    /// secret (a `kubernetes.io/dockerconfigjson` Secret in `namespace`), else the controller's own.
    pub async fn registries(
        &self,
        namespace: &str,
        pull_secret: Option<&str>,
    ) -> Result<Arc<Registries>, Error> {
        let Some(name) = pull_secret else { return Ok(self.build.registries.clone()) };
        let secret = self.caches.secrets.get(namespace, name).ok_or_else(|| {
            Error::Invalid(format!("the image pull secret {namespace}/{name} does not exist"))
        })?;
        let payload = secret.data.as_ref().and_then(|d| d.get(DOCKER_CONFIG_KEY)).map(|b| b.0.clone()).ok_or_else(|| {
            Error::Invalid(format!(
                "the image pull secret {namespace}/{name} has no {DOCKER_CONFIG_KEY} key (it must be of type kubernetes.io/dockerconfigjson)"
            ))
        })?;
        let fingerprint = Sha256::digest(&payload).to_vec();
        let key = format!("{namespace}/{name}");
        let mut cache = self.account_registries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((seen, registries)) = cache.get(&key) {
            if *seen == fingerprint {
                return Ok(registries.clone());
            }
        }
        let registries = Arc::new(self.build.registries.with_docker_config(payload));
        cache.insert(key, (fingerprint, registries.clone()));
        Ok(registries)
    }

    /// The image this process pushed last under the bundle `uid`'s tag, if any since it started.
    pub fn last_push(&self, uid: &str) -> Option<LastPush> {
        self.pushed.lock().unwrap_or_else(|p| p.into_inner()).get(uid).cloned()
    }

    pub fn record_push(&self, uid: &str, image: &str) {
        self.set_last_push(uid, LastPush { image: image.to_owned(), ahead_of: None });
    }

    /// Records an image a release pushed for the bundle `uid`, worked out from its `generation`.
    pub fn record_ahead_push(&self, uid: &str, image: &str, generation: i64) {
        self.set_last_push(uid, LastPush { image: image.to_owned(), ahead_of: Some(generation) });
    }

    fn set_last_push(&self, uid: &str, push: LastPush) {
        self.pushed.lock().unwrap_or_else(|p| p.into_inner()).insert(uid.to_owned(), push);
    }

    /// The image last assembled for the bundle `uid`, if it was assembled from `inputs`.
    pub fn assembled_from(&self, uid: &str, inputs: &AssemblyInputs) -> Option<String> {
        let assembled = self.assembled.lock().unwrap_or_else(|p| p.into_inner());
        assembled.get(uid).filter(|(from, _)| from == inputs).map(|(_, image)| image.clone())
    }

    pub fn record_assembly(&self, uid: &str, inputs: AssemblyInputs, image: &str) {
        let mut assembled = self.assembled.lock().unwrap_or_else(|p| p.into_inner());
        assembled.insert(uid.to_owned(), (inputs, image.to_owned()));
    }

    /// Forgets what this process pushed and assembled for a bundle that is gone.
    pub fn forget_bundle(&self, uid: &str) {
        self.pushed.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
        self.assembled.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }

    /// Publishes an Event about `object`; a failure to publish is logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        let reference = object.object_ref(&());
        if let Err(e) = self.recorders.recorder(&reference).publish(&event, &reference).await {
            warn!(error = %e, reason, "cannot publish an Event");
        }
    }
}
