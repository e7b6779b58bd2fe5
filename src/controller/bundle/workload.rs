//! A bundle's workload, pure: the Deployment that runs its image (one container port per worker,
//! the workers' Secrets as environment variables under their prefixes, non-root on a read-only
//! root, probed on the image's health socket) and the Service in front of it, each stamped with a
//! hash of itself so that an unchanged object is never applied again.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, HTTPGetAction,
    LocalObjectReference, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretEnvSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use sha2::{Digest as _, Sha256};

use super::plan::account_name;
use crate::build::bundle::BundleWorkerLayer;
use crate::crd::{owned_by, WorkerBundle, ACCOUNT_LABEL, BUNDLE_LABEL, MANAGED_BY, SECRETS_HASH_ANNOTATION};
use crate::worker::ports::HEALTH_PORT;
use crate::worker::ServedWorker;

/// The container that runs workerd.
pub const CONTAINER: &str = "workerd";
/// On the Deployment and Service: a hash of what we applied, so an unchanged object is not
/// applied again (no write at all on a resync or a restart).
pub const APPLIED_HASH_ANNOTATION: &str = "workerbundle.dev/applied-hash";
/// On the Deployment: `worker=port,...`.
pub const WORKERS_ANNOTATION: &str = "workerbundle.dev/workers";
/// The container port of the image's health socket (see `image::workerd_config`): probed by the
/// kubelet, never in the Service.
pub const HEALTH_PORT_NAME: &str = "health";
/// How long the Deployment may go without progress before it reports `ProgressDeadlineExceeded`:
/// an image pull, the start-up probe's whole window ([`STARTUP_WINDOW_SECONDS`]) and
/// [`MIN_READY_SECONDS`], with room for a slow node.
pub const PROGRESS_DEADLINE_SECONDS: i32 = 300;
/// How long a new pod must stay ready before it counts as available and an old one goes: a
/// workerd that loaded every worker and then falls over at once is caught before it replaces one.
pub const MIN_READY_SECONDS: i32 = 3;
/// The start-up probe's period and the number of misses it allows: workerd has this long to load
/// every worker before the kubelet restarts it. Top-level code has no CPU limit in workerd (a
/// CPU-bound one delays the first answer by seconds), and a bundle loads all its workers.
const STARTUP_PERIOD_SECONDS: i32 = 2;
const STARTUP_FAILURES: i32 = 30;
pub const STARTUP_WINDOW_SECONDS: i32 = STARTUP_PERIOD_SECONDS * STARTUP_FAILURES;
const NAME_LABEL: &str = "app.kubernetes.io/name";
const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

fn labels(bundle: &WorkerBundle) -> BTreeMap<String, String> {
    let mut labels = selector_labels(bundle);
    labels.insert(NAME_LABEL.into(), "workerd".into());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    labels.insert(ACCOUNT_LABEL.into(), account_name(bundle));
    labels
}

pub(super) fn selector_labels(bundle: &WorkerBundle) -> BTreeMap<String, String> {
    [
        (BUNDLE_LABEL.to_owned(), bundle.name_any()),
        (INSTANCE_LABEL.to_owned(), bundle.spec.deployment_name.clone()),
    ]
    .into()
}

/// A port name for a worker: its own name where that is a valid port name (at most 15
/// characters, a letter among them, no `--`) other than the health port's, else a short form of
/// it with a hash.
pub fn port_name(worker: &str) -> String {
    let valid = |n: &str| {
        !n.is_empty()
            && n.len() <= 15
            && n.bytes().any(|b| b.is_ascii_lowercase())
            && !n.contains("--")
            && !n.starts_with('-')
            && !n.ends_with('-')
    };
    if valid(worker) && worker != HEALTH_PORT_NAME {
        return worker.to_owned();
    }
    let hash = hex::encode(Sha256::digest(worker.as_bytes()));
    let mut short: String = worker.replace("--", "-").chars().take(8).collect();
    short = short.trim_matches('-').to_owned();
    let name = format!("{short}-{}", &hash[..5]);
    if valid(&name) {
        name
    } else {
        format!("w{}", &hash[..14])
    }
}

/// The Deployment that runs the bundle's image: one container port per worker, the workers'
/// Secrets as environment variables under their prefixes, non-root on a read-only root.
pub fn deployment(
    bundle: &WorkerBundle,
    image: &str,
    workers: &[BundleWorkerLayer],
    secrets_hash: &str,
) -> Deployment {
    let pod = bundle.spec.pod_template.clone().unwrap_or_default();
    let mut sorted: Vec<&ServedWorker> = workers.iter().map(|w| &w.worker.served).collect();
    sorted.sort_by_key(|w| w.port);
    let port = |name: String, number: u16| ContainerPort {
        name: Some(name),
        container_port: i32::from(number),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let mut ports: Vec<ContainerPort> = sorted.iter().map(|w| port(port_name(&w.name), w.port)).collect();
    // Last, so that the workers' ports keep their places. No worker has this port
    // (`worker::ports`) or this name (`port_name`).
    ports.push(port(HEALTH_PORT_NAME.into(), HEALTH_PORT));
    let env_from = bundle
        .spec
        .workers
        .iter()
        .filter_map(|w| {
            let secret = w.secret_ref.clone()?;
            let prefix =
                sorted.iter().find(|s| s.name == w.worker_name).map(|s| s.settings.env_prefix.clone());
            Some(EnvFromSource {
                prefix,
                secret_ref: Some(SecretEnvSource { name: secret, optional: Some(true) }),
                ..EnvFromSource::default()
            })
        })
        .collect::<Vec<_>>();
    let (startup, readiness, liveness) = probes();
    let container = Container {
        name: CONTAINER.into(),
        image: Some(image.to_owned()),
        ports: Some(ports),
        env_from: (!env_from.is_empty()).then_some(env_from),
        resources: pod.resources.clone(),
        startup_probe: Some(startup),
        readiness_probe: Some(readiness),
        liveness_probe: Some(liveness),
        // workerd prints why it exits at start-up (`service <worker>: Uncaught Error: ...`) and
        // writes no termination message itself: its last log lines become the message, which the
        // bundle's status repeats (plan::stalled).
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let pod_spec = PodSpec {
        containers: vec![container],
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        image_pull_secrets: pod.image_pull_secret.clone().map(|name| vec![LocalObjectReference { name }]),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(vec![Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    };
    let mut metadata = meta(bundle);
    // Which worker is on which port, for people and for `workerbundle dev`'s runner (a port's
    // name is not always its worker's whole name).
    let workers_annotation: Vec<String> = sorted.iter().map(|w| format!("{}={}", w.name, w.port)).collect();
    metadata.annotations = Some([(WORKERS_ANNOTATION.to_owned(), workers_annotation.join(","))].into());
    let mut object = Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(pod.replicas.unwrap_or(1)),
            progress_deadline_seconds: Some(PROGRESS_DEADLINE_SECONDS),
            min_ready_seconds: Some(MIN_READY_SECONDS),
            selector: LabelSelector { match_labels: Some(selector_labels(bundle)), match_expressions: None },
            // One new pod beside the old ones and none of them taken away before it is
            // available: an image that does not start never costs the account a replica.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(bundle)),
                    annotations: Some([(SECRETS_HASH_ANNOTATION.to_owned(), secrets_hash.to_owned())].into()),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    };
    stamp(&mut object.metadata, &object.spec);
    object
}

/// The container's probes: start-up, readiness and liveness, all an HTTP GET on the health
/// socket. It answers only once workerd has loaded every worker, and not while any worker of the
/// process holds the one event loop, so it tells "serves" from "loading", "crashed" and "stuck".
/// (A TCP probe proved nothing: workerd accepts connections before it has loaded the workers.)
fn probes() -> (Probe, Probe, Probe) {
    let get = |period: i32, timeout: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/".into()),
            port: IntOrString::String(HEALTH_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(timeout),
        failure_threshold: Some(failures),
        success_threshold: Some(1),
        ..Probe::default()
    };
    // Start-up: up to STARTUP_WINDOW_SECONDS to load (liveness waits for it, so a slow start is
    // not killed); a top-level loop that never ends is restarted after that window, SIGKILLed
    // soon after SIGTERM, which a spinning workerd ignores.
    let startup = Probe {
        termination_grace_period_seconds: Some(2),
        ..get(STARTUP_PERIOD_SECONDS, 1, STARTUP_FAILURES)
    };
    // Readiness: out of the Service after two missed answers in a row (one slow answer is not
    // enough to take the account's only replica out).
    let readiness = get(2, 1, 2);
    // Liveness, the watchdog: workerd has no CPU limit and ignores SIGTERM while JS spins, so a
    // stuck worker stalls every worker of the process until something kills it. Three missed
    // answers 2 s apart (each given 1 s) is about 7 s of a stalled event loop; the kubelet then
    // sends SIGTERM and SIGKILL 2 s later (the probe's own grace period, not the pod's, which
    // stays for draining on ordinary rollouts): restarted within about 10 s.
    let liveness = Probe { termination_grace_period_seconds: Some(2), ..get(2, 1, 3) };
    (startup, readiness, liveness)
}

/// The Service in front of the Deployment: one port per worker, named as the container's.
pub fn service(bundle: &WorkerBundle, workers: &[BundleWorkerLayer]) -> Service {
    let mut ports: Vec<ServicePort> = workers
        .iter()
        .map(|w| ServicePort {
            name: Some(port_name(&w.worker.served.name)),
            port: i32::from(w.worker.served.port),
            target_port: Some(IntOrString::String(port_name(&w.worker.served.name))),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        })
        .collect();
    ports.sort_by_key(|p| p.port);
    let mut object = Service {
        metadata: meta(bundle),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(bundle)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    stamp(&mut object.metadata, &object.spec);
    object
}

pub(super) fn meta(bundle: &WorkerBundle) -> ObjectMeta {
    ObjectMeta {
        name: Some(bundle.spec.deployment_name.clone()),
        namespace: bundle.namespace(),
        labels: Some(labels(bundle)),
        owner_references: owned_by(bundle),
        ..ObjectMeta::default()
    }
}

/// Records a hash of the object's desired spec and metadata in an annotation.
pub(super) fn stamp<S: serde::Serialize>(metadata: &mut ObjectMeta, spec: &S) {
    let body = serde_json::to_vec(&(&*metadata, spec)).unwrap_or_default();
    let hash = hex::encode(Sha256::digest(&body))[..32].to_owned();
    metadata.annotations.get_or_insert_with(BTreeMap::new).insert(APPLIED_HASH_ANNOTATION.into(), hash);
}

/// Whether `existing` is what we would apply (same stamped hash): then nothing is written.
pub fn unchanged(existing: Option<&ObjectMeta>, desired: &ObjectMeta) -> bool {
    let hash = |m: &ObjectMeta| m.annotations.as_ref().and_then(|a| a.get(APPLIED_HASH_ANNOTATION)).cloned();
    existing.is_some_and(|e| hash(e).is_some() && hash(e) == hash(desired))
}
