//! Watch caches: one watch per kind for the whole process, feeding a reflector store that every
//! reconcile reads related objects from (never a LIST or GET per reconcile), an index over that
//! store by the keys reconciles look up (namespace, account, deployment, secret, image), and the
//! triggers of every controller that a change of that kind wakes.
//!
//! kube-runtime's shared stores only pass on applied objects, not deletions; a deleted
//! WorkerDeployment must still wake its account. So each kind's watch is driven here, once, and
//! every change (applied or deleted) is handed to each subscriber as an `Arc` (the
//! `*_shared_stream` inputs of `Controller`).
//!
//! Two things kube-runtime's `Store` does not do well enough here, done here instead:
//! - readiness: `Store::wait_until_ready` keeps one waker, so of many reconciles waiting on one
//!   store at start-up only the last one polled is ever woken (the others hang for good). Each
//!   cache has its own `tokio::sync::watch` flag, which wakes every waiter, and it is raised only
//!   once the index, not just the store, holds the complete list;
//! - the objects of a (re-)list are passed on only once the list is complete and in the store: a
//!   trigger for an object the store does not hold yet is dropped by the controller
//!   (`ObjectNotFound`), and nothing would bring it back. Objects that vanished while the watch was
//!   down (deleted meanwhile) are passed on too, so that whatever depended on them is looked at.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::warn;

use crate::crd::{
    WorkerAccount, WorkerBundle, WorkerDeployment, WorkerRelease, ACCOUNT_LABEL, BUNDLE_LABEL,
    DEPLOYMENT_LABEL,
};

/// The keys an object is found by, besides its namespace and name.
pub type KeysOf<K> = fn(&K) -> Vec<String>;
/// What is dropped from an object before it is cached.
pub type Trim<K> = fn(&mut K);

/// Which objects of one kind carry which key: object references only, the objects themselves stay
/// in the store.
struct Index<K: Resource<DynamicType = ()> + Clone + 'static> {
    keys_of: KeysOf<K>,
    by_key: HashMap<String, HashSet<ObjectRef<K>>>,
    /// The keys each object was filed under, to unfile it when it changes or goes.
    filed: HashMap<ObjectRef<K>, Vec<String>>,
}

impl<K> Index<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    fn new(keys_of: KeysOf<K>) -> Self {
        Index { keys_of, by_key: HashMap::new(), filed: HashMap::new() }
    }

    fn remove(&mut self, object: &ObjectRef<K>) {
        for key in self.filed.remove(object).unwrap_or_default() {
            if let Some(set) = self.by_key.get_mut(&key) {
                set.remove(object);
                if set.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
    }

    fn insert(&mut self, object: &K) {
        let reference = ObjectRef::from_obj(object);
        self.remove(&reference);
        let mut keys = (self.keys_of)(object);
        keys.push(namespace_key(object.meta().namespace.as_deref().unwrap_or_default()));
        keys.sort();
        keys.dedup();
        for key in &keys {
            self.by_key.entry(key.clone()).or_default().insert(reference.clone());
        }
        self.filed.insert(reference, keys);
    }

    fn clear(&mut self) {
        self.by_key.clear();
        self.filed.clear();
    }

    /// Sorted by namespace and name, so that what reconciles read does not depend on hashing.
    fn get(&self, key: &str) -> Vec<ObjectRef<K>> {
        let mut found: Vec<ObjectRef<K>> =
            self.by_key.get(key).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        found.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        found
    }
}

/// The reading side of one kind's cache: cheap to clone, shared by every reconcile.
pub struct Cache<K: Resource<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    index: Arc<RwLock<Index<K>>>,
    synced: tokio::sync::watch::Receiver<bool>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Cache { store: self.store.clone(), index: self.index.clone(), synced: self.synced.clone() }
    }
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// The object `namespace/name`, as last seen.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<K>> {
        self.store.get(&ObjectRef::new(name).within(namespace))
    }

    /// The objects filed under `key` (see the `*_key` functions), sorted by namespace and name.
    pub fn find(&self, key: &str) -> Vec<Arc<K>> {
        let references = match self.index.read() {
            Ok(index) => index.get(key),
            Err(poisoned) => poisoned.into_inner().get(key),
        };
        references.iter().filter_map(|r| self.store.get(r)).collect()
    }

    /// The objects of one namespace.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<K>> {
        self.find(&namespace_key(namespace))
    }

    /// Completes once the first complete list is in the store and the index (at once
    /// afterwards). Any number of tasks may wait here at once.
    pub async fn synced(&self) {
        // Err: the watch is gone (shutting down); nothing more will come, so do not wait.
        let _ = self.synced.clone().wait_for(|synced| *synced).await;
    }
}

/// The driving side of one kind's cache: the watch, the store's writer, and the subscribers.
pub struct Watch<K: Resource<DynamicType = ()> + Clone + 'static> {
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    index: Arc<RwLock<Index<K>>>,
    trim: Trim<K>,
    subscribers: Vec<mpsc::UnboundedSender<Arc<K>>>,
    synced: tokio::sync::watch::Sender<bool>,
}

impl<K> Watch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    pub fn new(api: Api<K>, config: watcher::Config, keys_of: KeysOf<K>) -> (Watch<K>, Cache<K>) {
        let (store, writer) = reflector::store();
        let index = Arc::new(RwLock::new(Index::new(keys_of)));
        let (synced, synced_rx) = tokio::sync::watch::channel(false);
        let cache = Cache { store, index: index.clone(), synced: synced_rx };
        let watch = Watch {
            api,
            config,
            writer,
            index,
            trim: without_managed_fields,
            subscribers: Vec::new(),
            synced,
        };
        (watch, cache)
    }

    /// Caches objects as `trim` leaves them (managedFields are always dropped).
    pub fn trimmed(mut self, trim: Trim<K>) -> Self {
        self.trim = trim;
        self
    }

    /// Every change of this kind from now on (applied or deleted), for one controller's triggers.
    /// Unbounded: a controller's scheduler takes triggers as they come and only keeps object
    /// references, so nothing piles up here.
    pub fn subscribe(&mut self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let (tx, rx) = mpsc::unbounded();
        self.subscribers.push(tx);
        rx
    }

    /// Runs the watch (with [`WatchBackoff`] on errors) until dropped.
    pub async fn run(self) {
        let Watch { api, config, writer, index, trim, subscribers, synced } = self;
        let kind = K::kind(&()).into_owned();
        let store = writer.as_reader();
        let events = watcher(api, config)
            .modify(move |object| {
                without_managed_fields(object);
                trim(object);
            })
            .backoff(WatchBackoff::default())
            .reflect(writer);
        futures::pin_mut!(events);
        let mut relist = Relist::default();
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    warn!(%kind, error = %error, "watch failed; retrying");
                    continue;
                }
            };
            let (touched, list_done) = {
                let mut index = index.write().unwrap_or_else(|p| p.into_inner());
                relist.absorb(&mut index, event, || store.state())
            };
            if list_done {
                // Only the first time changes anything; waiters are woken once.
                synced.send_if_modified(|synced| !std::mem::replace(synced, true));
            }
            for object in touched {
                for subscriber in &subscribers {
                    // A controller that stopped no longer needs its triggers.
                    let _ = subscriber.unbounded_send(object.clone());
                }
            }
        }
    }
}

/// A list in progress: what the store held before it, and what it has brought so far.
struct Relist<K> {
    before: Vec<Arc<K>>,
    listed: Vec<Arc<K>>,
}

impl<K> Default for Relist<K> {
    fn default() -> Self {
        Relist { before: Vec::new(), listed: Vec::new() }
    }
}

impl<K> Relist<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    /// Files one watch event in the index (the store has already taken it) and returns the
    /// objects to pass on to subscribers, and whether a complete list has just come in.
    /// `stored` is what the store holds, read when a list starts (before it replaces them).
    fn absorb(
        &mut self,
        index: &mut Index<K>,
        event: watcher::Event<K>,
        stored: impl FnOnce() -> Vec<Arc<K>>,
    ) -> (Vec<Arc<K>>, bool) {
        match event {
            watcher::Event::Apply(object) => {
                index.insert(&object);
                (vec![Arc::new(object)], false)
            }
            watcher::Event::Delete(object) => {
                index.remove(&ObjectRef::from_obj(&object));
                (vec![Arc::new(object)], false)
            }
            watcher::Event::Init => {
                *self = Relist { before: stored(), listed: Vec::new() };
                (Vec::new(), false)
            }
            watcher::Event::InitApply(object) => {
                self.listed.push(Arc::new(object));
                (Vec::new(), false)
            }
            watcher::Event::InitDone => {
                let Relist { before, listed } = std::mem::take(self);
                index.clear();
                for object in &listed {
                    index.insert(object);
                }
                let present: HashSet<ObjectRef<K>> =
                    listed.iter().map(|o| ObjectRef::from_obj(&**o)).collect();
                let vanished = before.into_iter().filter(|o| !present.contains(&ObjectRef::from_obj(&**o)));
                let mut touched = listed;
                touched.extend(vanished);
                (touched, true)
            }
        }
    }
}

/// managedFields are most of an object's size and no reconcile reads them.
pub fn without_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Deployments this controller did not make are only read for the images they run: everything
/// else of them is dropped (a cluster may hold many).
pub fn foreign_deployment_trimmed(deployment: &mut Deployment) {
    let ours = deployment.labels().get("app.kubernetes.io/managed-by").map(String::as_str)
        == Some(crate::crd::MANAGED_BY);
    if ours {
        return;
    }
    let meta = &mut deployment.metadata;
    meta.annotations = None;
    meta.labels = None;
    deployment.status = None;
    if let Some(spec) = deployment.spec.as_mut() {
        let images: Vec<k8s_openapi::api::core::v1::Container> = spec
            .template
            .spec
            .as_ref()
            .map(|p| {
                p.containers
                    .iter()
                    .map(|c| k8s_openapi::api::core::v1::Container {
                        name: c.name.clone(),
                        image: c.image.clone(),
                        ..Default::default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        spec.template = k8s_openapi::api::core::v1::PodTemplateSpec {
            metadata: None,
            spec: Some(k8s_openapi::api::core::v1::PodSpec { containers: images, ..Default::default() }),
        };
        spec.selector = Default::default();
    }
}

/// A bundle's pods are read for one thing: whether the container of a new image starts. Their
/// names, labels, container images and container states are kept; everything else (volumes,
/// environment, node details, conditions) is dropped, as a cluster may run many.
pub fn pod_trimmed(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.annotations = None;
    meta.owner_references = None;
    if let Some(spec) = pod.spec.as_mut() {
        let containers = spec
            .containers
            .iter()
            .map(|c| k8s_openapi::api::core::v1::Container {
                name: c.name.clone(),
                image: c.image.clone(),
                ..Default::default()
            })
            .collect();
        *spec = k8s_openapi::api::core::v1::PodSpec { containers, ..Default::default() };
    }
    if let Some(status) = pod.status.as_mut() {
        *status = k8s_openapi::api::core::v1::PodStatus {
            container_statuses: status.container_statuses.take(),
            phase: status.phase.take(),
            ..Default::default()
        };
    }
}

pub fn namespace_key(namespace: &str) -> String {
    format!("ns:{namespace}")
}

/// Objects labelled with an account, in one namespace.
pub fn account_key(namespace: &str, account: &str) -> String {
    format!("account:{namespace}/{account}")
}

/// Releases of one WorkerDeployment (by label).
pub fn deployment_key(namespace: &str, deployment: &str) -> String {
    format!("deployment:{namespace}/{deployment}")
}

/// Bundles that read or push with one Secret.
pub fn secret_key(namespace: &str, secret: &str) -> String {
    format!("secret:{namespace}/{secret}")
}

/// Objects that run (or may still run) an image, in any namespace.
pub fn image_key(image: &str) -> String {
    format!("image:{image}")
}

/// The pods of one bundle (by its label, which the pod template carries).
pub fn bundle_pods_key(namespace: &str, bundle: &str) -> String {
    format!("bundle-pods:{namespace}/{bundle}")
}

/// Accounts that select objects by a selector of their own (not just their account label).
pub fn custom_selector_key(namespace: &str) -> String {
    format!("custom-selector:{namespace}")
}

fn label_key<K: Resource>(object: &K, label: &str, key: fn(&str, &str) -> String) -> Option<String> {
    let namespace = object.meta().namespace.as_deref().unwrap_or_default();
    object.labels().get(label).map(|value| key(namespace, value))
}

pub fn deployment_keys(deployment: &WorkerDeployment) -> Vec<String> {
    label_key(deployment, ACCOUNT_LABEL, account_key).into_iter().collect()
}

pub fn release_keys(release: &WorkerRelease) -> Vec<String> {
    [label_key(release, ACCOUNT_LABEL, account_key), label_key(release, DEPLOYMENT_LABEL, deployment_key)]
        .into_iter()
        .flatten()
        .collect()
}

/// An account selects by its account label unless it names a selector of its own.
pub fn account_keys(account: &WorkerAccount) -> Vec<String> {
    let namespace = account.namespace().unwrap_or_default();
    if account.spec.worker_release_selector.is_some() {
        vec![custom_selector_key(&namespace)]
    } else {
        vec![account_key(&namespace, &account.name_any())]
    }
}

pub fn bundle_keys(bundle: &WorkerBundle) -> Vec<String> {
    let namespace = bundle.namespace().unwrap_or_default();
    let mut keys: Vec<String> =
        super::bundle::plan::referenced_secrets(bundle).iter().map(|s| secret_key(&namespace, s)).collect();
    if let Some(secret) = bundle.spec.pod_template.as_ref().and_then(|p| p.image_pull_secret.as_deref()) {
        keys.push(secret_key(&namespace, secret));
    }
    keys.extend(super::bundle::in_use(bundle).iter().map(|i| image_key(i)));
    keys
}

pub fn workload_keys(deployment: &Deployment) -> Vec<String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.containers.iter().filter_map(|c| c.image.as_deref()).map(image_key).collect())
        .unwrap_or_default()
}

pub fn pod_keys(pod: &Pod) -> Vec<String> {
    label_key(pod, BUNDLE_LABEL, bundle_pods_key).into_iter().collect()
}

pub fn no_keys<K>(_: &K) -> Vec<String> {
    Vec::new()
}

/// Delays between failed watch attempts: 0.5 s doubling to 10 s, with jitter, back to 0.5 s as
/// soon as the watch delivers anything. kube's default (client-go's: up to 30 s, and no reset
/// until 120 s after the last error) kept each cache blind for up to a minute after an API server
/// restart, because the 410 that a restarted server answers to an old resourceVersion counts as
/// one more failure (tests/faults.rs). 10 s between attempts per kind is still far from a hot
/// loop while the server is down.
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(10);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(delay.mul_f64(0.8 + fastrand::f64() * 0.4))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Every kind the controllers read, one cache each.
#[derive(Clone)]
pub struct Caches {
    pub deployments: Cache<WorkerDeployment>,
    pub releases: Cache<WorkerRelease>,
    pub accounts: Cache<WorkerAccount>,
    pub bundles: Cache<WorkerBundle>,
    /// Only the Deployments and Services this controller made (by label).
    pub workloads: Cache<Deployment>,
    pub services: Cache<Service>,
    pub secrets: Cache<Secret>,
    /// Only those this controller made; `None` when it makes none (`--network-policies false`).
    pub network_policies: Option<Cache<NetworkPolicy>>,
    /// The pods of the bundles' Deployments (by label), trimmed to their containers' states.
    pub pods: Cache<Pod>,
}

impl Caches {
    /// Completes once every cache holds its first complete list.
    pub async fn synced(&self) {
        futures::join!(
            self.deployments.synced(),
            self.releases.synced(),
            self.accounts.synced(),
            self.bundles.synced(),
            self.workloads.synced(),
            self.services.synced(),
            self.secrets.synced(),
            self.pods.synced(),
            async {
                if let Some(cache) = &self.network_policies {
                    cache.synced().await;
                }
            },
        );
    }
}

/// The driving side of [`Caches`]: subscribe controllers, then run them all.
pub struct Watches {
    pub deployments: Watch<WorkerDeployment>,
    pub releases: Watch<WorkerRelease>,
    pub accounts: Watch<WorkerAccount>,
    pub bundles: Watch<WorkerBundle>,
    pub workloads: Watch<Deployment>,
    pub services: Watch<Service>,
    pub secrets: Watch<Secret>,
    pub network_policies: Option<Watch<NetworkPolicy>>,
    pub pods: Watch<Pod>,
}

impl Watches {
    /// Runs every watch until dropped.
    pub async fn run(self) {
        futures::join!(
            self.deployments.run(),
            self.releases.run(),
            self.accounts.run(),
            self.bundles.run(),
            self.workloads.run(),
            self.services.run(),
            self.secrets.run(),
            self.pods.run(),
            async {
                match self.network_policies {
                    Some(watch) => watch.run().await,
                    // Never done: the others' end decides.
                    None => futures::future::pending().await,
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(namespace: &str, name: &str, account: &str, deployment: &str) -> WorkerRelease {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "workerbundle.dev/v1alpha1",
            "kind": "WorkerRelease",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {ACCOUNT_LABEL: account, DEPLOYMENT_LABEL: deployment},
            },
            "spec": {"template": {"scriptName": deployment, "scriptUrls": ["s3://b/k"]}},
        }))
        .expect("a valid WorkerRelease")
    }

    fn names(objects: &[Arc<WorkerRelease>]) -> Vec<String> {
        objects.iter().map(|o| o.name_any()).collect()
    }

    #[test]
    fn a_list_is_passed_on_only_once_complete_with_what_vanished_meanwhile() {
        use watcher::Event::*;
        let mut index = Index::new(release_keys as KeysOf<WorkerRelease>);
        let mut relist = Relist::default();
        let mut absorb = |event, stored: Vec<Arc<WorkerRelease>>| relist.absorb(&mut index, event, || stored);

        // The first list: nothing passed on until it is complete (the store does not hold it yet).
        let (touched, done) = absorb(Init, vec![]);
        assert!(touched.is_empty() && !done);
        let (touched, done) = absorb(InitApply(release("a", "r1", "1", "hello")), vec![]);
        assert!(touched.is_empty() && !done);
        let (touched, done) = absorb(InitApply(release("a", "r2", "1", "other")), vec![]);
        assert!(touched.is_empty() && !done);
        let (touched, done) = absorb(InitDone, vec![]);
        assert_eq!((names(&touched), done), (vec!["r1".to_owned(), "r2".to_owned()], true));

        // Changes pass on at once.
        let (touched, done) = absorb(Apply(release("a", "r3", "1", "third")), vec![]);
        assert_eq!((names(&touched), done), (vec!["r3".to_owned()], false));

        // A re-list after the watch was down: r2 was deleted meanwhile, and is passed on too.
        let stored = vec![
            Arc::new(release("a", "r1", "1", "hello")),
            Arc::new(release("a", "r2", "1", "other")),
            Arc::new(release("a", "r3", "1", "third")),
        ];
        absorb(Init, stored);
        absorb(InitApply(release("a", "r1", "1", "hello")), vec![]);
        absorb(InitApply(release("a", "r3", "1", "third")), vec![]);
        let (touched, done) = absorb(InitDone, vec![]);
        assert_eq!((names(&touched), done), (vec!["r1".to_owned(), "r3".to_owned(), "r2".to_owned()], true));
        let filed: Vec<String> = index.get(&account_key("a", "1")).into_iter().map(|r| r.name).collect();
        assert_eq!(filed, ["r1", "r3"]);
    }

    #[test]
    fn an_object_is_filed_under_its_keys_and_refiled_when_they_change() {
        let mut index = Index::new(release_keys as KeysOf<WorkerRelease>);
        index.insert(&release("a", "r1", "1", "hello"));
        index.insert(&release("a", "r2", "1", "other"));
        index.insert(&release("b", "r1", "2", "hello"));
        let names =
            |refs: Vec<ObjectRef<WorkerRelease>>| refs.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(names(index.get(&account_key("a", "1"))), ["r1", "r2"]);
        assert_eq!(names(index.get(&deployment_key("a", "hello"))), ["r1"]);
        assert_eq!(names(index.get(&namespace_key("b"))), ["r1"]);

        // Relabelled: found under the new key only.
        index.insert(&release("a", "r1", "1", "renamed"));
        assert!(index.get(&deployment_key("a", "hello")).is_empty());
        assert_eq!(names(index.get(&deployment_key("a", "renamed"))), ["r1"]);

        // Removed: found nowhere, and no empty sets are left behind.
        index.remove(&ObjectRef::from_obj(&release("a", "r1", "1", "renamed")));
        assert!(index.get(&deployment_key("a", "renamed")).is_empty());
        assert_eq!(names(index.get(&account_key("a", "1"))), ["r2"]);
        index.remove(&ObjectRef::from_obj(&release("a", "r2", "1", "other")));
        index.remove(&ObjectRef::from_obj(&release("b", "r1", "2", "hello")));
        assert!(index.by_key.is_empty() && index.filed.is_empty());
    }
}
