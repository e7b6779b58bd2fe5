//! The local runner: plays the kubelet for the bundles' Deployments, with a Service's front door
//! per worker. For each Deployment it unpacks the image and starts its workerd with the
//! environment a pod would get (`env`, and each `envFrom` Secret's keys under their prefix).
//!
//! A change (new image, new secret values) starts a new workerd BESIDE the running one; the
//! workers' front doors switch to it only once it serves, then the old one drains and stops. A
//! workerd that does not start is reported with its last lines and never switched to: the old one
//! keeps serving and the Deployment is not marked rolled out. A running workerd that exits, or
//! stops answering its health probe (a worker stuck in a loop stalls every worker of its process),
//! is logged as an error naming what it can (its last lines, the workers with requests waiting),
//! killed and started again with a growing delay.
//!
//! stdout: `serving ACCOUNT/SCRIPT on http://127.0.0.1:PORT` for each worker when it (re)starts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::front_door::FrontDoor;
use super::ports::{bind, PortTable};
use super::process::{self, healthy, Instance, Launch, LogContext};
use super::unpack::unpack;
use crate::build::Target;
use crate::controller::bundle::workload::WORKERS_ANNOTATION;
use crate::crd::{ACCOUNT_LABEL, MANAGED_BY};
use crate::registry::Registries;

/// How long a new workerd may take to load every worker.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replaced workerd keeps serving what it already accepted before it is stopped.
const DRAIN: Duration = Duration::from_secs(1);
/// SIGTERM to SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The watchdog: a probe of the health socket every period; this many missed in a row (each
/// waiting up to the timeout) and the process counts as stuck.
const PROBE_PERIOD: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const PROBES_MISSED: u32 = 3;
/// Restarts back off up to this; a process that served this long starts the count again.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// The image layouts dev owns are swept for blobs no image references at most this often, and
/// only of blobs at least this old (a release's layer is written before its bundle's manifest).
const LAYOUT_SWEEP_EVERY: Duration = Duration::from_secs(300);
const LAYOUT_GRACE: Duration = Duration::from_secs(600);

/// One Deployment's running workerd.
struct Running {
    id: u64,
    /// What it was started from: the image and the pod template's annotations.
    started_from: String,
    image: String,
    account: String,
    workers: Vec<String>,
    instance: Arc<Instance>,
    started: Instant,
    /// Failures in a row (exits, stuck) since it last served for [`STABLE_AFTER`].
    failures: u32,
    watchdog: tokio::task::JoinHandle<()>,
}

/// What the watchdogs and restart timers tell the runner.
pub enum Notice {
    Exited { key: String, id: u64 },
    Stuck { key: String, id: u64 },
    Restart { key: String },
}

pub struct Runner {
    client: Client,
    registries: Arc<Registries>,
    /// Where images are unpacked, one directory per digest.
    cache: PathBuf,
    /// The image layouts dev writes (one per account), swept of unreferenced blobs; `None` when
    /// dev pushes to a registry instead.
    layouts: Option<PathBuf>,
    last_sweep: Option<Instant>,
    ports: PortTable,
    /// `account/worker` → its front door.
    doors: HashMap<String, FrontDoor>,
    running: HashMap<String, Running>,
    /// The Deployments last seen, for restarts.
    deployments: HashMap<String, Deployment>,
    nonce: String,
    next_id: u64,
    notices: mpsc::UnboundedSender<Notice>,
}

impl Runner {
    /// `bound`: the workers' ports, bound by dev before anything started.
    pub fn new(
        client: Client,
        registries: Arc<Registries>,
        cache: PathBuf,
        layouts: Option<PathBuf>,
        ports: PortTable,
        bound: BTreeMap<String, TcpListener>,
    ) -> Result<(Runner, mpsc::UnboundedReceiver<Notice>), String> {
        let mut doors = HashMap::new();
        for (worker, listener) in bound {
            let door = FrontDoor::open(listener).map_err(|e| format!("the port of {worker}: {e}"))?;
            doors.insert(worker, door);
        }
        let (notices, receiver) = mpsc::unbounded_channel();
        let runner = Runner {
            client,
            registries,
            cache,
            layouts,
            last_sweep: None,
            ports,
            doors,
            running: HashMap::new(),
            deployments: HashMap::new(),
            nonce: uuid::Uuid::new_v4().simple().to_string(),
            next_id: 0,
            notices,
        };
        Ok((runner, receiver))
    }

    /// Runs until `stop` completes; then stops every workerd it started.
    pub async fn run(
        mut self,
        mut notices: mpsc::UnboundedReceiver<Notice>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let deployments: Api<Deployment> = Api::all(self.client.clone());
        let config = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
        let mut events = watcher::watcher(deployments, config).boxed();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                event = events.next() => match event {
                    Some(Ok(Event::Apply(d) | Event::InitApply(d))) => self.apply(&d, false).await,
                    Some(Ok(Event::Delete(d))) => self.remove(&key(&d)).await,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => warn!(error = %e, "watching Deployments"),
                    None => break,
                },
                Some(notice) = notices.recv() => self.notice(notice).await,
            }
        }
        let keys: Vec<String> = self.running.keys().cloned().collect();
        for key in keys {
            self.remove(&key).await;
        }
    }

    async fn apply(&mut self, deployment: &Deployment, restart: bool) {
        let key = key(deployment);
        self.deployments.insert(key.clone(), deployment.clone());
        let Some(image) = image_of(deployment) else { return };
        let started_from = format!("{image} {:?}", pod_annotations(deployment));
        if !restart && self.running.get(&key).is_some_and(|r| r.started_from == started_from) {
            return;
        }
        let account = account_of(deployment);
        let span = info_span!("workerd", %account, image = %short(&image));
        let started = Instant::now();
        match self.start(deployment, &image, &account).instrument(span.clone()).await {
            Ok((instance, workers)) => {
                span.in_scope(|| info!(took_ms = started.elapsed().as_millis() as u64, "workerd serving"));
                self.switch(key, deployment, &image, started_from, instance, workers).await;
            }
            Err(message) => {
                let old = if self.running.contains_key(&key) {
                    "the running workerd keeps serving"
                } else {
                    "nothing serves the account's workers"
                };
                span.in_scope(|| error!("the new workerd did not start; {old}: {message}"));
                if restart {
                    self.schedule_restart(&key);
                }
            }
        }
    }

    /// Unpacks the image and starts its workerd on ports of its own; every worker has its front
    /// door before it starts.
    async fn start(
        &mut self,
        deployment: &Deployment,
        image: &str,
        account: &str,
    ) -> Result<(Instance, Vec<String>), String> {
        let unpacked = unpack(image, &self.cache, &self.registries).await.map_err(|e| e.to_string())?;
        let workers: Vec<String> = workers_of(deployment)?.into_iter().map(|(name, _)| name).collect();
        for worker in &workers {
            self.door(account, worker)?;
        }
        let image_env = unpacked.config["config"]["Env"].as_array().cloned().unwrap_or_default();
        let mut env: Vec<(String, String)> = image_env
            .iter()
            .filter_map(|e| e.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        env.extend(self.environment(deployment).await?);
        let launch = Launch {
            workerd: unpacked.rootfs.join("usr/local/bin/workerd"),
            config: unpacked.rootfs.join("etc/workerd/config.capnp"),
            rootfs: unpacked.rootfs.clone(),
            workers: workers.clone(),
            env,
            log: LogContext { account: account.to_owned(), version: short(image), nonce: self.nonce.clone() },
        };
        let instance = process::start(&launch, START_TIMEOUT).await.map_err(|failed| {
            if failed.last_lines.is_empty() {
                failed.reason
            } else {
                format!("{}; its last lines:\n{}", failed.reason, failed.last_lines)
            }
        })?;
        Ok((instance, workers))
    }

    /// The new workerd serves: the doors switch to it, the old one drains and stops.
    async fn switch(
        &mut self,
        key: String,
        deployment: &Deployment,
        image: &str,
        started_from: String,
        instance: Instance,
        workers: Vec<String>,
    ) {
        let account = account_of(deployment);
        for worker in &workers {
            let backend = instance.ports.get(worker).map(|p| SocketAddr::from(([127, 0, 0, 1], *p)));
            if let Some(door) = self.doors.get(&door_key(&account, worker)) {
                door.switch_to(backend);
            }
        }
        let mut failures = 0;
        let mut replaced = None;
        if let Some(old) = self.running.remove(&key) {
            old.watchdog.abort();
            if old.started.elapsed() < STABLE_AFTER {
                failures = old.failures;
            }
            for gone in old.workers.iter().filter(|w| !workers.contains(w)) {
                self.doors.remove(&door_key(&old.account, gone));
            }
            replaced = Some(old.image.clone());
            let instance = old.instance;
            tokio::spawn(async move {
                tokio::time::sleep(DRAIN).await;
                instance.stop(STOP_GRACE).await;
            });
        }
        for worker in &workers {
            if let Some(door) = self.doors.get(&door_key(&account, worker)) {
                // Scripts read this line: keep its shape.
                println!("serving {account}/{worker} on http://127.0.0.1:{}", door.port());
            }
        }
        self.next_id += 1;
        let id = self.next_id;
        let instance = Arc::new(instance);
        let watchdog = tokio::spawn(watchdog(key.clone(), id, instance.clone(), self.notices.clone()));
        self.running.insert(
            key,
            Running {
                id,
                started_from,
                image: image.to_owned(),
                account,
                workers,
                instance,
                started: Instant::now(),
                failures,
                watchdog,
            },
        );
        if let Err(e) = self.mark_rolled_out(deployment).await {
            warn!(deployment = %deployment.name_any(), error = %e, "cannot mark the Deployment rolled out");
        }
        self.prune(replaced.as_deref());
        self.sweep_layouts();
    }

    /// Removes blobs no image references from the layouts dev owns: a purge deletes an image's
    /// manifest and tags, but leaves its config and layers (another image may share them).
    fn sweep_layouts(&mut self) {
        let Some(root) = &self.layouts else { return };
        if self.last_sweep.is_some_and(|at| at.elapsed() < LAYOUT_SWEEP_EVERY) {
            return;
        }
        self.last_sweep = Some(Instant::now());
        let root = root.clone();
        // Off the runner's loop: a layout can hold thousands of blobs.
        tokio::task::spawn_blocking(move || {
            for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                let Ok(layout) = crate::image::layout::Layout::open(&entry.path()) else { continue };
                match layout.collect_garbage(LAYOUT_GRACE) {
                    Ok(c) if c.blobs > 0 => {
                        info!(layout = %entry.path().display(), blobs = c.blobs, bytes = c.bytes, "unreferenced blobs removed")
                    }
                    Ok(_) => {}
                    Err(e) => warn!(layout = %entry.path().display(), error = %e, "cannot sweep the layout"),
                }
            }
        });
    }

    /// The front door of `account/worker`: its kept port, else a new one of the range.
    fn door(&mut self, account: &str, worker: &str) -> Result<(), String> {
        let key = door_key(account, worker);
        if self.doors.contains_key(&key) {
            return Ok(());
        }
        let listener = match self.ports.get(&key) {
            Some(port) => bind(port).map_err(|e| {
                format!("port {port} of worker {key} cannot be bound: {e}; stop what holds it")
            })?,
            None => self.ports.assign(&key)?.1,
        };
        let door = FrontDoor::open(listener).map_err(|e| format!("the port of {key}: {e}"))?;
        self.doors.insert(key, door);
        Ok(())
    }

    async fn notice(&mut self, notice: Notice) {
        match notice {
            Notice::Exited { key, id } => {
                let Some(running) = self.running.get(&key).filter(|r| r.id == id) else { return };
                let status = running.instance.exit().borrow().clone().unwrap_or_default();
                error!(
                    account = %running.account,
                    image = %short(&running.image),
                    "workerd exited ({status}): the account's workers refuse connections until it is started again; its last lines:\n{}",
                    running.instance.last_lines.text()
                );
                self.schedule_restart(&key);
            }
            Notice::Stuck { key, id } => {
                let Some(running) = self.running.get(&key).filter(|r| r.id == id) else { return };
                // Longest wait first: the requests of the others came in after it and wait behind it.
                let mut waiting: Vec<(Instant, &str)> = running
                    .workers
                    .iter()
                    .filter_map(|w| {
                        let since = self.doors.get(&door_key(&running.account, w))?.waiting_since()?;
                        Some((since, w.as_str()))
                    })
                    .collect();
                waiting.sort();
                let suspects = match waiting.split_first() {
                    None => "no worker has a request waiting".to_owned(),
                    Some(((since, first), rest)) => {
                        let others: Vec<String> = rest
                            .iter()
                            .map(|(s, w)| format!("{w} ({} ms)", s.elapsed().as_millis()))
                            .collect();
                        let then = if others.is_empty() {
                            String::new()
                        } else {
                            format!(", then {}", others.join(", "))
                        };
                        format!(
                            "requests wait for an answer from {first} (the longest, {} ms){then}",
                            since.elapsed().as_millis()
                        )
                    }
                };
                error!(
                    account = %running.account,
                    image = %short(&running.image),
                    "workerd stopped answering its health probe for {} s ({suspects}: a worker in a loop stalls every worker of its process); killing it and starting it again",
                    PROBES_MISSED * (PROBE_PERIOD + PROBE_TIMEOUT).as_secs() as u32
                );
                running.instance.kill();
                self.schedule_restart(&key);
            }
            Notice::Restart { key } => {
                if let Some(deployment) = self.deployments.get(&key).cloned() {
                    self.apply(&deployment, true).await;
                }
            }
        }
    }

    /// Starts the Deployment's workerd again after a delay that doubles with each failure in a row.
    fn schedule_restart(&mut self, key: &str) {
        let failures = match self.running.get_mut(key) {
            Some(running) => {
                if running.started.elapsed() >= STABLE_AFTER {
                    running.failures = 0;
                }
                running.failures += 1;
                running.failures
            }
            None => 1,
        };
        // The first restart at once (the account is down meanwhile), then 1 s, 2 s, 4 s, ...
        let delay = match failures {
            0 | 1 => Duration::ZERO,
            n => Duration::from_secs(1u64 << (n - 2).min(5)).min(MAX_RESTART_DELAY),
        };
        info!(deployment = key, in_ms = delay.as_millis() as u64, "workerd will be started again");
        let notices = self.notices.clone();
        let key = key.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = notices.send(Notice::Restart { key });
        });
    }

    /// Removes unpacked images no workerd runs from any more: the running ones and the one just
    /// replaced (still draining) stay; so do unpacks under way, which are never concurrent with
    /// this (the runner does one thing at a time).
    fn prune(&self, replaced: Option<&str>) {
        let keep: HashSet<String> = self
            .running
            .values()
            .map(|r| r.image.as_str())
            .chain(replaced)
            .filter_map(|image| Target::parse_image(image).ok().map(|(_, digest)| digest.hex().to_owned()))
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.cache) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                match std::fs::remove_dir_all(entry.path()) {
                    Ok(()) => debug!(dir = %entry.path().display(), "unpacked image removed"),
                    Err(e) => {
                        warn!(dir = %entry.path().display(), error = %e, "cannot remove an unpacked image")
                    }
                }
            }
        }
    }

    /// The environment the pod's container would get: `env` values and `envFrom` Secrets.
    async fn environment(&self, deployment: &Deployment) -> Result<Vec<(String, String)>, String> {
        let namespace = deployment.namespace().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        let container = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.first())
            .ok_or("the Deployment has no container")?;
        let mut env = Vec::new();
        for var in container.env.iter().flatten() {
            env.push((var.name.clone(), var.value.clone().unwrap_or_default()));
        }
        for source in container.env_from.iter().flatten() {
            let Some(reference) = &source.secret_ref else { continue };
            let optional = reference.optional.unwrap_or(false);
            let secret = match secrets.get_opt(&reference.name).await {
                Ok(Some(secret)) => secret,
                Ok(None) if optional => continue,
                Ok(None) => return Err(format!("Secret {namespace}/{} does not exist", reference.name)),
                Err(e) => return Err(format!("cannot read Secret {namespace}/{}: {e}", reference.name)),
            };
            let prefix = source.prefix.clone().unwrap_or_default();
            for (k, v) in secret.data.iter().flatten() {
                env.push((format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).into_owned()));
            }
        }
        Ok(env)
    }

    async fn mark_rolled_out(&self, deployment: &Deployment) -> Result<(), kube::Error> {
        let api: Api<Deployment> =
            Api::namespaced(self.client.clone(), &deployment.namespace().unwrap_or_default());
        let replicas = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let status = json!({"status": {
            "observedGeneration": deployment.metadata.generation,
            "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
        }});
        api.patch_status(&deployment.name_any(), &PatchParams::default(), &Patch::Merge(&status)).await?;
        Ok(())
    }

    async fn remove(&mut self, key: &str) {
        self.deployments.remove(key);
        if let Some(running) = self.running.remove(key) {
            running.watchdog.abort();
            for worker in &running.workers {
                // Closes the port: the worker's URL refuses connections, as a deleted one should.
                self.doors.remove(&door_key(&running.account, worker));
            }
            running.instance.stop(STOP_GRACE).await;
            info!(deployment = key, "workerd stopped");
            self.prune(None);
        }
    }
}

/// Probes the health socket until the process exits (reported) or is stuck (reported).
async fn watchdog(key: String, id: u64, instance: Arc<Instance>, notices: mpsc::UnboundedSender<Notice>) {
    let Some(port) = instance.health_port() else { return };
    let mut exit = instance.exit();
    let mut missed = 0;
    loop {
        tokio::select! {
            _ = exit.wait_for(Option::is_some) => {
                let _ = notices.send(Notice::Exited { key, id });
                return;
            }
            () = tokio::time::sleep(PROBE_PERIOD) => {}
        }
        if healthy(port, PROBE_TIMEOUT).await {
            missed = 0;
        } else if exit.borrow().is_none() {
            missed += 1;
            if missed >= PROBES_MISSED {
                let _ = notices.send(Notice::Stuck { key, id });
                return;
            }
        }
    }
}

fn key(deployment: &Deployment) -> String {
    format!("{}/{}", deployment.namespace().unwrap_or_default(), deployment.name_any())
}

fn door_key(account: &str, worker: &str) -> String {
    format!("{account}/{worker}")
}

fn account_of(deployment: &Deployment) -> String {
    deployment.labels().get(ACCOUNT_LABEL).cloned().unwrap_or_default()
}

/// `sha256:0123456789ab` of an image reference, for log lines.
fn short(image: &str) -> String {
    let digest = image.rsplit_once('@').map_or(image, |(_, d)| d);
    digest.chars().take("sha256:".len() + 12).collect()
}

fn image_of(deployment: &Deployment) -> Option<String> {
    deployment.spec.as_ref()?.template.spec.as_ref()?.containers.first()?.image.clone()
}

fn pod_annotations(deployment: &Deployment) -> BTreeMap<String, String> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default()
}

/// The Deployment's workers and their container ports, from its `workerbundle.dev/workers`
/// annotation (`name=port,...`).
fn workers_of(deployment: &Deployment) -> Result<Vec<(String, u16)>, String> {
    let text = deployment
        .annotations()
        .get(WORKERS_ANNOTATION)
        .ok_or_else(|| format!("the Deployment has no {WORKERS_ANNOTATION} annotation"))?;
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, port) =
                pair.split_once('=').ok_or_else(|| format!("{WORKERS_ANNOTATION}: {pair:?}"))?;
            let port = port.parse().map_err(|_| format!("{WORKERS_ANNOTATION}: {pair:?}"))?;
            Ok((name.to_owned(), port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_the_digest() {
        assert_eq!(short("oci:/d/images/a@sha256:0123456789abcdef"), "sha256:0123456789ab");
    }
}
