//! The local runner: plays the kubelet for the bundles' Deployments. For each Deployment it
//! unpacks the image, starts its workerd with the environment a pod would get (`env`, and each
//! `envFrom` Secret's keys under their prefix), replaces it when the image or the pod template's
//! annotations change, marks the Deployment rolled out (so purge works as on a cluster), and
//! prints `serving ACCOUNT/SCRIPT on http://127.0.0.1:PORT` for each worker.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::unpack::unpack;
use crate::controller::bundle::workload::WORKERS_ANNOTATION;
use crate::crd::{ACCOUNT_LABEL, MANAGED_BY};
use crate::registry::Registries;

/// One Deployment's running workerd.
struct Running {
    /// What it was started from: the image and the pod template's annotations.
    started_from: String,
    child: Child,
    /// Worker name → host port.
    ports: BTreeMap<String, u16>,
}

pub struct Runner {
    client: Client,
    registries: Arc<Registries>,
    /// Where images are unpacked, one directory per digest.
    cache: PathBuf,
    running: HashMap<String, Running>,
    /// Host ports handed out, by `namespace/deployment/worker`, kept across restarts of workerd.
    ports: HashMap<String, u16>,
}

impl Runner {
    pub fn new(client: Client, registries: Arc<Registries>, cache: PathBuf) -> Self {
        Runner { client, registries, cache, running: HashMap::new(), ports: HashMap::new() }
    }

    /// Runs until `stop` completes; then stops every workerd it started.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        let deployments: Api<Deployment> = Api::all(self.client.clone());
        let config = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
        let mut events = watcher::watcher(deployments, config).boxed();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                event = events.next() => match event {
                    Some(Ok(Event::Apply(d) | Event::InitApply(d))) => self.apply(&d).await,
                    Some(Ok(Event::Delete(d))) => self.remove(&key(&d)).await,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => warn!(error = %e, "watching Deployments"),
                    None => break,
                },
            }
        }
        let keys: Vec<String> = self.running.keys().cloned().collect();
        for key in keys {
            self.remove(&key).await;
        }
    }

    async fn apply(&mut self, deployment: &Deployment) {
        let key = key(deployment);
        let Some(image) = image_of(deployment) else { return };
        let started_from = format!("{image} {:?}", pod_annotations(deployment));
        if self.running.get(&key).is_some_and(|r| r.started_from == started_from) {
            return;
        }
        match self.start(deployment, &image).await {
            Ok(mut running) => {
                running.started_from = started_from;
                if let Some(mut old) = self.running.remove(&key) {
                    let _ = old.child.kill().await;
                }
                let account = deployment.labels().get(ACCOUNT_LABEL).cloned().unwrap_or_default();
                for (worker, port) in &running.ports {
                    // Scripts read this line: keep its shape.
                    println!("serving {account}/{worker} on http://127.0.0.1:{port}");
                }
                self.running.insert(key, running);
                if let Err(e) = self.mark_rolled_out(deployment).await {
                    warn!(deployment = %deployment.name_any(), error = %e, "cannot mark the Deployment rolled out");
                }
            }
            Err(message) => {
                warn!(deployment = %deployment.name_any(), %image, error = %message, "cannot run the image")
            }
        }
    }

    async fn start(&mut self, deployment: &Deployment, image: &str) -> Result<Running, String> {
        let unpacked = unpack(image, &self.cache, &self.registries).await.map_err(|e| e.to_string())?;
        let workers = workers_of(deployment)?;
        let env = self.environment(deployment).await?;
        // The old workerd (if any) holds the ports: stop it before starting the new one.
        if let Some(mut old) = self.running.remove(&key(deployment)) {
            let _ = old.child.kill().await;
            let _ = old.child.wait().await;
        }
        let mut ports = BTreeMap::new();
        for (worker, container_port) in &workers {
            let id = format!("{}/{worker}", key(deployment));
            let port = match self.ports.get(&id) {
                Some(port) => *port,
                None => free_port(*container_port).map_err(|e| format!("no free port for {worker}: {e}"))?,
            };
            self.ports.insert(id, port);
            ports.insert(worker.clone(), port);
        }
        let workerd = unpacked.rootfs.join("usr/local/bin/workerd");
        let config = unpacked.rootfs.join("etc/workerd/config.capnp");
        let mut command = Command::new(&workerd);
        command.arg("serve").arg(&config);
        for (worker, port) in &ports {
            command.arg("--socket-addr").arg(format!("{worker}=127.0.0.1:{port}"));
        }
        let image_env = unpacked.config["config"]["Env"].as_array().cloned().unwrap_or_default();
        command
            .env_clear()
            .envs(image_env.iter().filter_map(|e| e.as_str()?.split_once('=')))
            .envs(env)
            .current_dir(&unpacked.rootfs)
            .stdin(Stdio::null())
            // stdout is for scripts: workerd's own output goes to stderr with the logs.
            .stdout(stderr_handle()?)
            .stderr(stderr_handle()?)
            .kill_on_drop(true);
        // Also when dev itself is killed (SIGKILL runs no destructor): the kernel ends workerd.
        // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| format!("cannot start {}: {e}", workerd.display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in ports.values() {
            while TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], *port))).is_err() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("workerd exited ({status}) before serving"));
                }
                if Instant::now() > deadline {
                    let _ = child.kill().await;
                    return Err(format!("workerd did not listen on port {port} within 20 s"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        info!(deployment = %deployment.name_any(), %image, "workerd started");
        Ok(Running { started_from: String::new(), child, ports })
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
        if let Some(mut running) = self.running.remove(key) {
            let _ = running.child.kill().await;
            let _ = running.child.wait().await;
            info!(deployment = key, "workerd stopped");
        }
    }
}

fn key(deployment: &Deployment) -> String {
    format!("{}/{}", deployment.namespace().unwrap_or_default(), deployment.name_any())
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

/// The container's own port when it is free on this machine, else any free port.
fn free_port(preferred: u16) -> std::io::Result<u16> {
    match TcpListener::bind(("127.0.0.1", preferred)) {
        Ok(listener) => Ok(listener.local_addr()?.port()),
        Err(_) => Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port()),
    }
}

fn stderr_handle() -> Result<Stdio, String> {
    use std::os::fd::AsFd;
    let fd =
        std::io::stderr().as_fd().try_clone_to_owned().map_err(|e| format!("cannot share stderr: {e}"))?;
    Ok(Stdio::from(fd))
}
