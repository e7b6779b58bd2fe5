//! WorkerBundle, pure: from the bundle, its workers' releases and Secrets, to the image's inputs,
//! the rollout's state, the images to purge and the bundle's status (the Deployment and Service
//! that run the image are built in workload.rs).
//!
//! The status tells the truth about the rollout: `image` is the image the bundle wants (pushed,
//! in the pod template), `rollout.servingImage` the one every available replica runs. While the
//! new image's pods cannot start (workerd exits at start-up when one worker throws, and its last
//! words name the worker), Ready is False with workerd's message, the old ReplicaSet keeps
//! serving (maxUnavailable 0), and no image is purged: images go only once a rollout is complete.
//!
//! The image is a function of what the rebuild rule names and nothing else: each worker's layer
//! (its release's), its resolved settings (date, flags, vars), its secret KEY names, its port,
//! and the base. Secret values only reach the pod template, as a hash, so a new value rolls the
//! pods without a new image.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sha2::{Digest as _, Sha256};

use super::super::context::{LastPush, Settings};
use super::super::release::plan::{account_repository, worker_settings};
use super::super::Error;
use super::workload::CONTAINER;
use crate::build::bundle::BundleWorkerLayer;
use crate::crd::{
    condition, set_condition, BaseImageStatus, ConditionStatus, ReleasePhase, RolloutStatus, WorkerBundle,
    WorkerBundleStatus, WorkerRelease, ACCOUNT_LABEL, READY,
};
use crate::digest::Digest;
use crate::image::assemble::{ImageWorker, LayerRef};
use crate::image::reference::ImageRef;
use crate::worker::names::{check_binding_name, check_secret_name};
use crate::worker::ServedWorker;

/// The Secrets a bundle's workers reference, by name; `None` for one that does not exist (yet).
pub type Secrets = BTreeMap<String, Option<Secret>>;

/// What the image is made of, or why it cannot be made yet.
#[derive(Debug)]
pub struct ImageInputs {
    pub workers: Vec<BundleWorkerLayer>,
    /// Secret keys that cannot be environment variables, so are not bound (reported, not fatal).
    pub skipped_keys: Vec<String>,
}

/// Each worker with its release's layer and settings and its Secret's key names.
pub fn image_inputs(
    bundle: &WorkerBundle,
    releases: &BTreeMap<String, WorkerRelease>,
    secrets: &Secrets,
) -> Result<ImageInputs, String> {
    let mut workers = Vec::with_capacity(bundle.spec.workers.len());
    let mut problems = Vec::new();
    let mut skipped_keys = Vec::new();
    for w in &bundle.spec.workers {
        let ready = releases.get(&w.release).and_then(|r| {
            let status = r.status.as_ref().filter(|s| s.phase == ReleasePhase::Ready)?;
            Some((status.layer.as_ref()?, status.settings.as_ref()?, status.repository.as_ref()?))
        });
        let Some((layer, settings, repository)) = ready else {
            problems.push(format!("worker {}: release {} is not ready", w.worker_name, w.release));
            continue;
        };
        let (Some(digest), Some(diff_id)) = (Digest::parse(&layer.digest), Digest::parse(&layer.diff_id))
        else {
            problems.push(format!(
                "worker {}: release {} records no valid layer digest",
                w.worker_name, w.release
            ));
            continue;
        };
        let mut settings = worker_settings(settings);
        if let Some(env_prefix) = &w.env_prefix {
            settings.env_prefix = env_prefix.clone();
        }
        if let Some(secret) =
            w.secret_ref.as_ref().and_then(|name| secrets.get(name)).and_then(Option::as_ref)
        {
            let (names, skipped) = secret_key_names(secret);
            settings.secrets.extend(names);
            skipped_keys.extend(skipped.into_iter().map(|k| format!("{}/{k}", secret.name_any())));
        }
        let served = ServedWorker { name: w.worker_name.clone(), port: w.worker_number, settings };
        let layer = LayerRef { digest, diff_id, size: u64::try_from(layer.size).unwrap_or_default() };
        workers.push(BundleWorkerLayer {
            worker: ImageWorker { served, layer },
            repository: repository.clone(),
        });
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    if workers.is_empty() {
        return Err("the bundle lists no workers".into());
    }
    Ok(ImageInputs { workers, skipped_keys })
}

/// A Secret's key names that can be bindings read from the environment, and those that cannot
/// (an environment variable name is a C identifier once the prefix is added).
pub fn secret_key_names(secret: &Secret) -> (BTreeSet<String>, Vec<String>) {
    let keys =
        secret.data.iter().flat_map(|d| d.keys()).chain(secret.string_data.iter().flat_map(|d| d.keys()));
    let mut names = BTreeSet::new();
    let mut skipped = Vec::new();
    for key in keys {
        let identifier = key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if identifier && check_binding_name(key).is_ok() && check_secret_name(key).is_ok() {
            names.insert(key.clone());
        } else {
            skipped.push(key.clone());
        }
    }
    (names, skipped)
}

/// A hash of which version of every referenced Secret the pods run (its name, uid and
/// resourceVersion), for the pod template: a new value rolls the pods. Never of the values: a hash
/// of a value in the pod template would let anyone who can read Deployments test guesses of it
/// offline.
pub fn secrets_hash(secrets: &Secrets) -> String {
    let mut hash = Sha256::new();
    for (name, secret) in secrets {
        hash.update(name.as_bytes());
        hash.update([0]);
        match secret {
            None => hash.update(b"(missing)"),
            Some(secret) => {
                for part in [&secret.metadata.uid, &secret.metadata.resource_version] {
                    let part = part.as_deref().unwrap_or_default();
                    hash.update((part.len() as u64).to_be_bytes());
                    hash.update(part.as_bytes());
                }
            }
        }
        hash.update([0xff]);
    }
    hex::encode(hash.finalize())[..32].to_owned()
}

/// The names of the Secrets the bundle's workers reference.
pub fn referenced_secrets(bundle: &WorkerBundle) -> BTreeSet<String> {
    bundle.spec.workers.iter().filter_map(|w| w.secret_ref.clone()).collect()
}

/// The account the bundle belongs to: its account label, else its namespace.
pub fn account_name(bundle: &WorkerBundle) -> String {
    bundle.labels().get(ACCOUNT_LABEL).cloned().or_else(|| bundle.namespace()).unwrap_or_default()
}

/// Where the bundle's images go: its account's repository (where its releases pushed their layers).
pub fn repository(bundle: &WorkerBundle, settings: &Settings) -> Result<String, Error> {
    account_repository(bundle.spec.repository.as_deref(), &account_name(bundle), settings)
}

/// The bundle's base image: its own, else the controller's `--base-image`.
pub fn base_reference(bundle: &WorkerBundle, settings: &Settings) -> Result<ImageRef, Error> {
    match &bundle.spec.base_image {
        Some(text) => {
            // `docker://` may be left out: a bare `registry/repo@sha256:...` is a registry reference.
            let text = if text.starts_with("oci:") || text.starts_with("docker://") {
                text.clone()
            } else {
                format!("docker://{text}")
            };
            ImageRef::parse(&text).map_err(|e| Error::Invalid(format!("spec.baseImage: {e}")))
        }
        None => settings.base_image.clone().ok_or_else(|| {
            Error::Invalid(
                "no base image: set spec.baseImage on the WorkerAccount or start the controller with --base-image"
                    .into(),
            )
        }),
    }
}

/// The digest the bundle's base was pinned at, while its reference is unchanged.
pub fn pinned_base(bundle: &WorkerBundle, reference: &ImageRef) -> Option<Digest> {
    let pinned = bundle.status.as_ref()?.base_image.as_ref()?;
    (pinned.reference == reference.to_string()).then(|| Digest::parse(&pinned.digest)).flatten()
}

/// The tag images of a bundle are pushed under (they are referenced by digest; the tag is for people).
pub fn image_tag(bundle: &WorkerBundle) -> String {
    bundle.name_any()
}

/// Whether the bundle's `image` must be pushed under its tag: not when this process pushed it
/// last; when the bundle does not run it yet; and when it does, only to take the tag back from an
/// image a release pushed ahead that the bundle did not adopt, as its spec, rewritten since
/// (`generation` past the one the early image was worked out from), now shows. With no push since
/// this process started, a restart writes nothing; a reconcile on the bundle as it was before
/// the release (a cache not yet caught up) neither.
pub fn needs_push(runs_it: bool, last: Option<&LastPush>, image: &str, generation: i64) -> bool {
    match last {
        Some(last) if last.image == image => false,
        _ if !runs_it => true,
        Some(LastPush { ahead_of: Some(from), .. }) => generation > *from,
        _ => false,
    }
}

/// Whether the Deployment's pod template runs `image`.
fn runs(d: &Deployment, image: &str) -> bool {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .is_some_and(|p| p.containers.iter().any(|c| c.image.as_deref() == Some(image)))
}

/// Whether the Deployment's status is about its current spec.
fn observed(d: &Deployment) -> bool {
    let observed = d.status.as_ref().and_then(|s| s.observed_generation);
    observed.is_some() && observed >= d.metadata.generation
}

/// How far the Deployment has rolled `image` out (`servingImage` is filled in by
/// [`ready_status`], which knows what served before).
pub fn rollout(deployment: Option<&Deployment>, image: &str) -> RolloutStatus {
    let Some(d) = deployment else { return RolloutStatus::default() };
    let runs_image = runs(d, image);
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    let observed = observed(d);
    let replicas = status.replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let ready = status.ready_replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    RolloutStatus {
        observed_generation: status.observed_generation,
        replicas,
        updated_replicas: updated,
        ready_replicas: ready,
        available_replicas: available,
        complete: runs_image && observed && updated == wanted && replicas == wanted && available >= wanted,
        serving_image: None,
    }
}

/// The Ready reason while the new image's pods cannot start (see [`stalled`]).
pub const NEW_IMAGE_NOT_STARTING: &str = "NewImageNotStarting";
/// The Ready reason when the Deployment made no progress within `progressDeadlineSeconds`.
pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
/// The Ready reason when the Deployment cannot create pods (quota, admission).
pub const REPLICA_FAILURE: &str = "ReplicaFailure";
const STALL_REASONS: [&str; 3] = [NEW_IMAGE_NOT_STARTING, PROGRESS_DEADLINE_EXCEEDED, REPLICA_FAILURE];

/// Why a rollout cannot finish by itself: the Ready condition's reason, and what went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stalled {
    pub reason: &'static str,
    pub message: String,
}

/// Waiting reasons of a container that failed and that waiting will not start: the kubelet backs
/// off between attempts, or cannot pull the image or make the container at all.
const NOT_STARTING: [&str; 8] = [
    "CrashLoopBackOff",
    "Error",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The most of workerd's output a condition or Event repeats.
const MAX_OUTPUT_CHARS: usize = 1024;

/// Why the rollout of `image` cannot finish, if it cannot: a pod of `image` whose workerd failed
/// and has not been ready since (the first such pod, by name), else the Deployment's own word
/// (`ProgressDeadlineExceeded`, `ReplicaFailure`) on its current spec. Never for a complete
/// rollout: a replica that fails later is the Deployment's and the kubelet's to restart.
pub fn stalled<'a>(
    deployment: Option<&Deployment>,
    pods: impl IntoIterator<Item = &'a Pod>,
    image: &str,
    rollout: &RolloutStatus,
) -> Option<Stalled> {
    if rollout.complete {
        return None;
    }
    if let Some(message) = pods.into_iter().find_map(|p| not_starting(p, image)) {
        return Some(Stalled { reason: NEW_IMAGE_NOT_STARTING, message });
    }
    let d = deployment.filter(|d| runs(d, image) && observed(d))?;
    let conditions = d.status.as_ref()?.conditions.as_ref()?;
    let text = |reason: &Option<String>, message: &Option<String>| {
        [reason.as_deref(), message.as_deref()].into_iter().flatten().collect::<Vec<_>>().join(": ")
    };
    if let Some(c) = conditions.iter().find(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some(PROGRESS_DEADLINE_EXCEEDED)
    }) {
        return Some(Stalled {
            reason: PROGRESS_DEADLINE_EXCEEDED,
            message: format!(
                "the Deployment made no progress within its deadline: {}",
                text(&None, &c.message)
            ),
        });
    }
    let c = conditions.iter().find(|c| c.type_ == "ReplicaFailure" && c.status == "True")?;
    Some(Stalled {
        reason: REPLICA_FAILURE,
        message: format!("the Deployment cannot create pods: {}", text(&c.reason, &c.message)),
    })
}

/// What shows that `pod`, if it runs `image` and is not going away, cannot start it: its workerd
/// container is not ready and waits after a failure (CrashLoopBackOff, a pull error), or ended
/// with an error now or last time. Said with workerd's own last words when the termination
/// message holds them.
fn not_starting(pod: &Pod, image: &str) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    if !spec.containers.iter().any(|c| c.name == CONTAINER && c.image.as_deref() == Some(image)) {
        return None;
    }
    let status = pod.status.as_ref()?.container_statuses.as_ref()?.iter().find(|c| c.name == CONTAINER)?;
    if status.ready {
        return None;
    }
    let waiting = status
        .state
        .as_ref()
        .and_then(|s| s.waiting.as_ref())
        .filter(|w| w.reason.as_deref().is_some_and(|r| NOT_STARTING.contains(&r)));
    let failed = |t: &&ContainerStateTerminated| t.exit_code != 0;
    let terminated = status
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .filter(failed)
        .or_else(|| status.last_state.as_ref().and_then(|s| s.terminated.as_ref()).filter(failed));
    if waiting.is_none() && terminated.is_none() {
        return None;
    }
    let mut what = Vec::new();
    if let Some(reason) = waiting.and_then(|w| w.reason.as_deref()) {
        what.push(reason.to_owned());
    }
    if let Some(t) = terminated {
        match t.reason.as_deref().filter(|r| *r != "Error") {
            Some(reason) => what.push(format!("workerd exited with code {} ({reason})", t.exit_code)),
            None => what.push(format!("workerd exited with code {}", t.exit_code)),
        }
    }
    let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
    let mut message = format!("pod {pod_name} ({})", what.join(", "));
    let output = terminated.and_then(|t| t.message.as_deref()).map(workerd_output).filter(|o| !o.is_empty());
    let detail = output.or_else(|| waiting.and_then(|w| w.message.clone()).filter(|m| !m.is_empty()));
    if let Some(detail) = detail {
        message.push_str(": ");
        message.push_str(&detail);
    }
    Some(message)
}

/// workerd's own words in a container's termination message (its last log lines, as
/// `FallbackToLogsOnError` keeps them). With structured logging each line is a JSON object whose
/// `message` is the text: those are kept, only the error ones when there are any; lines that are
/// not JSON are kept as they are. At most [`MAX_OUTPUT_CHARS`] characters.
pub fn workerd_output(text: &str) -> String {
    let lines: Vec<(bool, String)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let json = serde_json::from_str::<serde_json::Value>(line).ok();
            let message = json.as_ref().and_then(|v| v.get("message")?.as_str());
            match message {
                Some(message) => {
                    let level = json.as_ref().and_then(|v| v.get("level")?.as_str()).unwrap_or_default();
                    (matches!(level, "error" | "fatal"), message.trim_end().to_owned())
                }
                None => (false, line.trim_end().to_owned()),
            }
        })
        .collect();
    let errors: Vec<&str> = lines.iter().filter(|(error, _)| *error).map(|(_, l)| l.as_str()).collect();
    let kept = if errors.is_empty() { lines.iter().map(|(_, l)| l.as_str()).collect() } else { errors };
    let text = kept.join("\n");
    match text.char_indices().nth(MAX_OUTPUT_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text,
    }
}

/// The image every available replica runs: `image` once its rollout is complete; else what
/// served before (the image of a rollout that was complete, or what served then), which the
/// Deployment's old ReplicaSet still runs.
pub fn serving_image(previous: Option<&WorkerBundleStatus>, image: &str, complete: bool) -> Option<String> {
    if complete {
        return Some(image.to_owned());
    }
    let previous = previous?;
    match previous.rollout.as_ref()? {
        r if r.complete => previous.image.clone(),
        r => r.serving_image.clone(),
    }
}

/// The Warning to publish (reason, note) when the rollout has just stalled: Ready turned to a
/// stall reason, or the image that stalls changed. Once: not again while it stays stalled, nor
/// after a restart of the controller (the previous status says so).
pub fn stall_warning(
    previous: Option<&WorkerBundleStatus>,
    desired: &WorkerBundleStatus,
) -> Option<(String, String)> {
    let ready = |s: &WorkerBundleStatus| s.conditions.iter().find(|c| c.type_ == READY).cloned();
    let now = ready(desired).filter(|c| c.status == "False" && STALL_REASONS.contains(&c.reason.as_str()))?;
    let before = previous.and_then(ready);
    let same = before.is_some_and(|b| b.reason == now.reason)
        && previous.and_then(|p| p.image.as_ref()) == desired.image.as_ref();
    (!same).then_some((now.reason, now.message))
}

/// Images to delete now: the stale ones nothing references, once `current` is fully rolled out.
/// Before that, nothing: the Deployment's old ReplicaSet may run any of them (the last image that
/// served, or one whose rollout never finished), and a rollout that stalls must leave the image
/// that serves in place, however many reconciles and new images come before it finishes.
pub fn purgeable(
    stale: &[String],
    current: &str,
    complete: bool,
    referenced: &BTreeSet<String>,
) -> Vec<String> {
    if !complete {
        return Vec::new();
    }
    stale.iter().filter(|i| *i != current && !referenced.contains(*i)).cloned().collect()
}

/// Whether the bundle has never run an image: then its repository holds nothing this bundle
/// pushed, and its first push skips the GET that learns what the tag points at (1 of 14 registry
/// requests of a new account). A repository that holds blobs all the same (a bundle deleted and
/// made again under its name, a push whose status write was lost) gets them uploaded again: a
/// few requests, never a wrong image, as the manifest still goes up only after every blob.
pub fn first_image(status: Option<&WorkerBundleStatus>) -> bool {
    status.is_none_or(|s| s.image.is_none() && s.last_image.is_none() && s.stale_images.is_empty())
}

/// `images` with `pushed` made current: the image it replaces becomes the last and stale one.
pub fn after_push(status: Option<&WorkerBundleStatus>, pushed: &str) -> (Option<String>, Vec<String>) {
    let previous = status.and_then(|s| s.image.clone());
    let mut stale = status.map(|s| s.stale_images.clone()).unwrap_or_default();
    match previous.filter(|p| p != pushed) {
        Some(previous) => {
            if !stale.contains(&previous) {
                stale.push(previous.clone());
            }
            stale.retain(|i| i != pushed);
            (Some(previous), stale)
        }
        None => (status.and_then(|s| s.last_image.clone()), stale),
    }
}

/// The status of a bundle without workers: nothing runs; `stale` are images not deleted yet.
pub fn empty_status(
    bundle: &WorkerBundle,
    last_image: Option<String>,
    stale_images: Vec<String>,
    now: Timestamp,
) -> WorkerBundleStatus {
    let current = bundle.status.clone().unwrap_or_default();
    let wanted = condition(
        READY,
        ConditionStatus::True,
        "NoWorkers",
        "the bundle lists no workers; nothing runs",
        bundle.metadata.generation,
    );
    WorkerBundleStatus {
        observed_generation: bundle.metadata.generation,
        image: None,
        last_image,
        stale_images,
        base_image: current.base_image,
        rollout: None,
        conditions: set_condition(&current.conditions, wanted, now),
    }
}

/// The status when the image cannot be built yet or failed.
pub fn waiting_status(
    bundle: &WorkerBundle,
    reason: &str,
    message: String,
    now: Timestamp,
) -> WorkerBundleStatus {
    let current = bundle.status.clone().unwrap_or_default();
    let wanted = condition(READY, ConditionStatus::False, reason, message, bundle.metadata.generation);
    WorkerBundleStatus {
        observed_generation: bundle.metadata.generation,
        conditions: set_condition(&current.conditions, wanted, now),
        ..current
    }
}

/// What the bundle's status says after an image was made current and the rollout looked at
/// (`stalled`: why the rollout cannot finish, see [`stalled`]).
#[allow(clippy::too_many_arguments)]
pub fn ready_status(
    bundle: &WorkerBundle,
    image: &str,
    last_image: Option<String>,
    stale_images: Vec<String>,
    base: BaseImageStatus,
    mut rollout: RolloutStatus,
    stalled: Option<&Stalled>,
    skipped_keys: &[String],
    now: Timestamp,
) -> WorkerBundleStatus {
    let generation = bundle.metadata.generation;
    let previous: &[Condition] = bundle.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    rollout.serving_image = serving_image(bundle.status.as_ref(), image, rollout.complete);
    let serving = match &rollout.serving_image {
        Some(serving) => format!("{serving} still serves"),
        None => "nothing serves yet".to_owned(),
    };
    let mut message = match stalled {
        _ if rollout.complete => format!("{image} rolled out to {} replicas", rollout.available_replicas),
        Some(stalled) => format!("{image} cannot roll out; {serving}: {}", stalled.message),
        None => format!(
            "rolling out {image}: {} of {} replicas updated, {} available; {serving}",
            rollout.updated_replicas, rollout.replicas, rollout.available_replicas
        ),
    };
    if !skipped_keys.is_empty() {
        message.push_str(&format!(
            "; secret keys that are not environment variable names are not bound: {}",
            skipped_keys.join(", ")
        ));
    }
    let wanted = match stalled {
        _ if rollout.complete => condition(READY, ConditionStatus::True, "RolledOut", message, generation),
        Some(stalled) => condition(READY, ConditionStatus::False, stalled.reason, message, generation),
        None => condition(READY, ConditionStatus::False, "RollingOut", message, generation),
    };
    WorkerBundleStatus {
        observed_generation: generation,
        image: Some(image.to_owned()),
        last_image,
        stale_images,
        base_image: Some(base),
        rollout: Some(rollout),
        conditions: set_condition(previous, wanted, now),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use k8s_openapi::ByteString;

    use super::super::workload::{self, deployment, port_name, service, unchanged, WORKERS_ANNOTATION};
    use super::*;
    use crate::crd::SECRETS_HASH_ANNOTATION;
    use crate::crd::{
        BundlePodTemplate, BundleWorker, LayerDescriptor, ResolvedSettings, WorkerBundleSpec,
        WorkerReleaseSpec, WorkerReleaseStatus, WorkerTemplate,
    };

    fn release(name: &str, code: &str) -> WorkerRelease {
        let mut r = WorkerRelease::new(name, WorkerReleaseSpec { template: WorkerTemplate::default() });
        r.status = Some(WorkerReleaseStatus {
            phase: ReleasePhase::Ready,
            layer: Some(LayerDescriptor {
                media_type: crate::image::layer::MEDIA_TYPE_LAYER_GZIP.into(),
                digest: Digest::of(code.as_bytes()).to_string(),
                diff_id: Digest::of(format!("tar {code}").as_bytes()).to_string(),
                size: 100,
            }),
            repository: Some("127.0.0.1:5000/workers/1234".into()),
            settings: Some(ResolvedSettings {
                compatibility_date: "2024-09-23".into(),
                secret_names: vec!["FROM_METADATA".into()],
                env_prefix: "API_".into(),
                ..ResolvedSettings::default()
            }),
            ..WorkerReleaseStatus::default()
        });
        r
    }

    fn bundle() -> WorkerBundle {
        let mut b = WorkerBundle::new(
            "workers-1234",
            WorkerBundleSpec {
                deployment_name: "workers-1234".into(),
                repository: None,
                base_image: None,
                workers: vec![
                    BundleWorker {
                        worker_name: "api".into(),
                        worker_number: 8080,
                        env_prefix: Some("API_".into()),
                        secret_ref: Some("api-secrets".into()),
                        release: "api-1".into(),
                    },
                    BundleWorker {
                        worker_name: "web".into(),
                        worker_number: 8081,
                        release: "web-1".into(),
                        ..Default::default()
                    },
                ],
                pod_template: Some(BundlePodTemplate {
                    image_pull_secret: Some("pull".into()),
                    replicas: Some(2),
                    resources: None,
                }),
            },
        );
        b.metadata.namespace = Some("tenants".into());
        b.metadata.uid = Some("bundle-uid".into());
        b.metadata.labels = Some([(ACCOUNT_LABEL.to_owned(), "1234".to_owned())].into());
        b
    }

    fn releases() -> BTreeMap<String, WorkerRelease> {
        [("api-1".to_owned(), release("api-1", "a")), ("web-1".to_owned(), release("web-1", "w"))].into()
    }

    fn secret(data: &[(&str, &str)]) -> Secrets {
        secret_version(data, "1")
    }

    /// The Secret as stored at `resource_version`.
    fn secret_version(data: &[(&str, &str)], resource_version: &str) -> Secrets {
        let mut s = Secret::default();
        s.metadata.name = Some("api-secrets".into());
        s.metadata.uid = Some("secret-uid".into());
        s.metadata.resource_version = Some(resource_version.into());
        s.data = Some(data.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect());
        [("api-secrets".to_owned(), Some(s))].into()
    }

    fn served<'a>(inputs: &'a ImageInputs, name: &str) -> &'a ServedWorker {
        &inputs.workers.iter().find(|w| w.worker.served.name == name).unwrap().worker.served
    }

    #[test]
    fn the_tag_follows_the_image_the_bundle_runs() {
        let (a, b, c) = ("img@sha256:a", "img@sha256:b", "img@sha256:c");
        let pushed = |image: &str| LastPush { image: image.to_owned(), ahead_of: None };
        let ahead = |image: &str, from| LastPush { image: image.to_owned(), ahead_of: Some(from) };
        // Never pushed by this process (a restart): only an image the bundle does not run yet.
        assert!(needs_push(false, None, b, 3));
        assert!(!needs_push(true, None, a, 3));
        // Pushed last (by the bundle, or ahead by a release): nothing to send.
        assert!(!needs_push(false, Some(&ahead(b, 3)), b, 3));
        assert!(!needs_push(true, Some(&pushed(a)), a, 3));
        // Another image pushed last and the bundle does not run this one: it goes up.
        assert!(needs_push(false, Some(&pushed(c)), b, 3));
        assert!(needs_push(false, Some(&ahead(c, 3)), b, 4));
        // The bundle runs this image and a release pushed another ahead: on the bundle as it was
        // (same generation: the account has not written it yet), nothing; once its spec was
        // rewritten without adopting the early image (a change undone), the tag comes back.
        assert!(!needs_push(true, Some(&ahead(c, 3)), a, 3));
        assert!(needs_push(true, Some(&ahead(c, 3)), a, 4));
    }

    #[test]
    fn secret_key_names_become_bindings_and_values_stay_out() {
        let inputs =
            image_inputs(&bundle(), &releases(), &secret(&[("API_KEY", "hunter2"), ("bad-key", "x")]))
                .unwrap();
        let api = served(&inputs, "api");
        assert_eq!(api.port, 8080);
        let secrets: Vec<&str> = api.settings.secrets.iter().map(String::as_str).collect();
        assert_eq!(secrets, ["API_KEY", "FROM_METADATA"]);
        assert_eq!(inputs.skipped_keys, ["api-secrets/bad-key"]);
        assert!(!format!("{inputs:?}").contains("hunter2"), "no secret value in the image's inputs");
        assert_eq!(served(&inputs, "web").settings.secrets.len(), 1, "web has no Secret");
    }

    #[test]
    fn a_missing_secret_binds_no_keys_and_a_release_not_ready_waits() {
        let missing: Secrets = [("api-secrets".to_owned(), None)].into();
        let inputs = image_inputs(&bundle(), &releases(), &missing).unwrap();
        assert_eq!(served(&inputs, "api").settings.secrets.len(), 1);
        let mut not_ready = releases();
        not_ready.get_mut("web-1").unwrap().status.as_mut().unwrap().phase = ReleasePhase::Failed;
        let err = image_inputs(&bundle(), &not_ready, &missing).unwrap_err();
        assert!(err.contains("web") && err.contains("web-1"), "{err}");
        let err = image_inputs(&bundle(), &BTreeMap::new(), &missing).unwrap_err();
        assert!(err.contains("api-1"), "{err}");
    }

    #[test]
    fn the_secrets_hash_moves_with_each_new_version_and_depends_on_no_value() {
        let a = secrets_hash(&secret_version(&[("API_KEY", "one")], "1"));
        let b = secrets_hash(&secret_version(&[("API_KEY", "two")], "2"));
        let missing = secrets_hash(&[("api-secrets".to_owned(), None)].into());
        assert_ne!(a, b, "a new value (a new resourceVersion) rolls the pods");
        assert_ne!(a, missing);
        // No offline guessing: the same version hashes the same whatever its value.
        assert_eq!(a, secrets_hash(&secret_version(&[("API_KEY", "guess")], "1")));
    }

    #[test]
    fn the_deployment_runs_the_image_by_digest_hardened_with_secrets_under_prefixes() {
        let inputs = image_inputs(&bundle(), &releases(), &secret(&[("API_KEY", "v")])).unwrap();
        let image = "127.0.0.1:5000/workers/1234@sha256:0123";
        let d = deployment(&bundle(), image, &inputs.workers, "h1");
        assert_eq!(d.metadata.name.as_deref(), Some("workers-1234"));
        assert_eq!(d.metadata.annotations.as_ref().unwrap()[WORKERS_ANNOTATION], "api=8080,web=8081");
        assert_eq!(d.metadata.owner_references.as_ref().unwrap()[0].uid, "bundle-uid");
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(2));
        let template = &spec.template;
        assert_eq!(
            template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()[SECRETS_HASH_ANNOTATION],
            "h1"
        );
        let pod = template.spec.as_ref().unwrap();
        assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "pull");
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some(image));
        let ports: Vec<(String, i32)> =
            c.ports.iter().flatten().map(|p| (p.name.clone().unwrap(), p.container_port)).collect();
        assert_eq!(ports, [("api".to_owned(), 8080), ("web".to_owned(), 8081), ("health".to_owned(), 8079)]);
        let env_from = c.env_from.as_ref().unwrap();
        assert_eq!(env_from.len(), 1);
        assert_eq!(env_from[0].prefix.as_deref(), Some("API_"));
        assert_eq!(env_from[0].secret_ref.as_ref().unwrap().name, "api-secrets");
        let security = c.security_context.as_ref().unwrap();
        assert_eq!(
            (
                security.read_only_root_filesystem,
                security.allow_privilege_escalation,
                security.run_as_non_root
            ),
            (Some(true), Some(false), Some(true))
        );
        let selector = spec.selector.match_labels.as_ref().unwrap();
        let labels = template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "the pods match the selector");
        assert_eq!(labels[ACCOUNT_LABEL], "1234");

        let s = service(&bundle(), &inputs.workers);
        let ports: Vec<(String, i32)> = s
            .spec
            .as_ref()
            .unwrap()
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.port))
            .collect();
        assert_eq!(ports, [("api".to_owned(), 8080), ("web".to_owned(), 8081)]);
    }

    #[test]
    fn an_unchanged_deployment_is_not_applied_again() {
        let inputs = image_inputs(&bundle(), &releases(), &secret(&[("K", "v")])).unwrap();
        let a = deployment(&bundle(), "r@sha256:1", &inputs.workers, "h1");
        assert!(unchanged(
            Some(&a.metadata),
            &deployment(&bundle(), "r@sha256:1", &inputs.workers, "h1").metadata
        ));
        assert!(!unchanged(
            Some(&a.metadata),
            &deployment(&bundle(), "r@sha256:2", &inputs.workers, "h1").metadata
        ));
        assert!(!unchanged(
            Some(&a.metadata),
            &deployment(&bundle(), "r@sha256:1", &inputs.workers, "h2").metadata
        ));
        assert!(!unchanged(None, &a.metadata));
    }

    #[test]
    fn port_names_are_valid_and_named_after_the_worker() {
        assert_eq!(port_name("api"), "api");
        for name in ["a-very-long-worker-name", "1234", "a--b", &"x".repeat(63)] {
            let p = port_name(name);
            assert!(
                p.len() <= 15 && p.bytes().any(|b| b.is_ascii_lowercase()) && !p.contains("--"),
                "{name} -> {p}"
            );
        }
        assert!(port_name("a-very-long-worker-name").starts_with("a-very-l"));
        assert_ne!(port_name(&"x".repeat(63)), port_name(&"x".repeat(62)));
    }

    fn rolled(
        image: &str,
        generation: i64,
        observed: i64,
        updated: i32,
        available: i32,
        replicas: i32,
    ) -> Deployment {
        let inputs = image_inputs(&bundle(), &releases(), &secret(&[])).unwrap();
        let mut d = deployment(&bundle(), image, &inputs.workers, "h");
        d.metadata.generation = Some(generation);
        d.status = Some(DeploymentStatus {
            observed_generation: Some(observed),
            replicas: Some(replicas),
            updated_replicas: Some(updated),
            ready_replicas: Some(available),
            available_replicas: Some(available),
            ..DeploymentStatus::default()
        });
        d
    }

    #[test]
    fn a_rollout_is_complete_only_when_every_replica_runs_the_new_image() {
        assert!(rollout(Some(&rolled("i@1", 2, 2, 2, 2, 2)), "i@1").complete);
        assert!(
            !rollout(Some(&rolled("i@1", 2, 1, 2, 2, 2)), "i@1").complete,
            "status of an older generation"
        );
        assert!(!rollout(Some(&rolled("i@1", 2, 2, 1, 2, 3)), "i@1").complete, "an old replica is left");
        assert!(!rollout(Some(&rolled("i@1", 2, 2, 2, 1, 2)), "i@1").complete, "not yet available");
        assert!(!rollout(Some(&rolled("i@0", 2, 2, 2, 2, 2)), "i@1").complete, "another image");
        assert!(!rollout(None, "i@1").complete);
    }

    #[test]
    fn only_a_bundle_that_never_had_an_image_skips_learning_its_repository() {
        assert!(first_image(None));
        assert!(first_image(Some(&WorkerBundleStatus::default())));
        let with = |image: Option<&str>, last: Option<&str>, stale: &[&str]| WorkerBundleStatus {
            image: image.map(str::to_owned),
            last_image: last.map(str::to_owned),
            stale_images: stale.iter().map(|s| s.to_string()).collect(),
            ..WorkerBundleStatus::default()
        };
        assert!(!first_image(Some(&with(Some("r@1"), None, &[]))), "it runs one");
        assert!(!first_image(Some(&with(None, Some("r@1"), &[]))), "emptied, its last image kept");
        assert!(!first_image(Some(&with(None, None, &["r@1"]))), "stale images not deleted yet");
    }

    #[test]
    fn stale_images_are_purged_after_the_rollout_unless_referenced() {
        let (last, stale) = after_push(None, "r@1");
        assert_eq!((last, stale.len()), (None, 0));
        let status = WorkerBundleStatus { image: Some("r@1".into()), ..WorkerBundleStatus::default() };
        let (last, stale) = after_push(Some(&status), "r@2");
        assert_eq!((last.as_deref(), stale.as_slice()), (Some("r@1"), ["r@1".to_owned()].as_slice()));
        let status = WorkerBundleStatus {
            image: Some("r@2".into()),
            stale_images: stale,
            last_image: last,
            ..WorkerBundleStatus::default()
        };
        let (last, stale) = after_push(Some(&status), "r@1");
        assert_eq!(
            (last.as_deref(), stale.as_slice()),
            (Some("r@2"), ["r@2".to_owned()].as_slice()),
            "going back"
        );
        let (_, same) = after_push(Some(&status), "r@2");
        assert_eq!(same, ["r@1"], "an unchanged image changes nothing");

        let stale = vec!["r@1".to_owned(), "r@2".to_owned()];
        assert!(purgeable(&stale, "r@3", false, &BTreeSet::new()).is_empty(), "not before the rollout");
        let referenced: BTreeSet<String> = ["r@2".to_owned()].into();
        assert_eq!(purgeable(&stale, "r@3", true, &referenced), ["r@1"]);
    }

    #[test]
    fn the_base_is_the_bundles_else_the_controllers_and_stays_pinned_while_unchanged() {
        let settings = Settings {
            repository_prefix: Some("reg/workers".into()),
            source_date_epoch: 0,
            base_image: None,
            network_policies: true,
            startup_check: None,
        };
        let err = base_reference(&bundle(), &settings).unwrap_err();
        assert!(err.message().contains("--base-image"), "{}", err.message());
        let mut b = bundle();
        b.spec.base_image = Some("127.0.0.1:5000/workerd-base@sha256:".to_owned() + &"a".repeat(64));
        let reference = base_reference(&b, &settings).unwrap();
        assert!(matches!(reference, ImageRef::Registry(_)));
        b.status = Some(WorkerBundleStatus {
            base_image: Some(BaseImageStatus {
                reference: reference.to_string(),
                digest: Digest::of(b"m").to_string(),
            }),
            ..WorkerBundleStatus::default()
        });
        assert_eq!(pinned_base(&b, &reference), Some(Digest::of(b"m")));
        let other = ImageRef::parse("docker://127.0.0.1:5000/workerd-base:2").unwrap();
        assert_eq!(pinned_base(&b, &other), None);
        assert_eq!(repository(&b, &settings).unwrap(), "reg/workers/1234");
    }

    #[test]
    fn the_pods_are_probed_on_the_health_socket_and_never_fewer_than_before() {
        use crate::worker::ports::HEALTH_PORT;
        let inputs = image_inputs(&bundle(), &releases(), &secret(&[])).unwrap();
        let d = deployment(&bundle(), "r@sha256:1", &inputs.workers, "h");
        let spec = d.spec.as_ref().unwrap();
        let rolling = spec.strategy.as_ref().unwrap().rolling_update.as_ref().unwrap();
        assert_eq!(
            (rolling.max_surge.clone(), rolling.max_unavailable.clone()),
            (Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))
        );
        assert!(spec.progress_deadline_seconds.unwrap() > workload::STARTUP_WINDOW_SECONDS);
        assert!((1..=10).contains(&spec.min_ready_seconds.unwrap()));
        let c = &spec.template.spec.as_ref().unwrap().containers[0];
        assert_eq!(c.termination_message_policy.as_deref(), Some("FallbackToLogsOnError"));
        let ports: Vec<(String, i32)> =
            c.ports.iter().flatten().map(|p| (p.name.clone().unwrap(), p.container_port)).collect();
        assert_eq!(ports.last(), Some(&("health".to_owned(), i32::from(HEALTH_PORT))));
        let probes = [&c.startup_probe, &c.readiness_probe, &c.liveness_probe];
        for probe in probes {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!((get.path.as_deref(), &get.port), (Some("/"), &IntOrString::String("health".into())));
        }
        // The watchdog: a stuck workerd is killed within about 10 s (three missed answers, each
        // given its timeout, then the probe's grace period), a slow start has a minute.
        let liveness = c.liveness_probe.as_ref().unwrap();
        let (period, timeout, failures) = (
            liveness.period_seconds.unwrap(),
            liveness.timeout_seconds.unwrap(),
            liveness.failure_threshold.unwrap(),
        );
        let killed_within =
            i64::from(period * failures + timeout) + liveness.termination_grace_period_seconds.unwrap();
        assert!(killed_within <= 10 && failures >= 2, "{killed_within} s");
        let startup = c.startup_probe.as_ref().unwrap();
        let window = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
        assert!(window >= 30, "a slow start is killed after {window} s");
        let readiness = c.readiness_probe.as_ref().unwrap();
        assert!(
            readiness.period_seconds.unwrap() <= 2 && (1..=2).contains(&readiness.failure_threshold.unwrap())
        );
        // The Service stays the workers' only.
        let s = service(&bundle(), &inputs.workers);
        assert!(s.spec.unwrap().ports.unwrap().iter().all(|p| p.port != i32::from(HEALTH_PORT)));
        // A worker named like the health port gets another port name.
        assert_ne!(port_name("health"), "health");
    }

    const IMAGE_A: &str = "r/w@sha256:aaaa";
    const IMAGE_B: &str = "r/w@sha256:bbbb";
    const IMAGE_C: &str = "r/w@sha256:cccc";
    const BOOM: &str = r#"{"timestamp":"1","level":"error","source":"server.c++:1","message":"service hello: Uncaught Error: boom\n  at m.js:1:7","context_depth":0}"#;

    fn pod(name: &str, image: &str, container_status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "tenants", "labels": {crate::crd::BUNDLE_LABEL: "workers-1234"}},
            "spec": {"containers": [{"name": CONTAINER, "image": image}]},
            "status": {"containerStatuses": [container_status]},
        }))
        .unwrap()
    }

    fn crash_looping(name: &str, image: &str) -> Pod {
        pod(
            name,
            image,
            serde_json::json!({
                "name": CONTAINER, "image": image, "imageID": "", "ready": false, "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": BOOM}},
            }),
        )
    }

    fn pending(d: &Deployment) -> RolloutStatus {
        rollout(Some(d), IMAGE_B)
    }

    #[test]
    fn a_new_image_whose_workerd_exits_stalls_the_rollout_with_workerds_words() {
        // The old ReplicaSet serves: 1 available, none updated.
        let d = rolled(IMAGE_B, 2, 2, 0, 1, 2);
        let failing = crash_looping("workers-1234-new", IMAGE_B);
        let stalled = stalled(Some(&d), [&failing], IMAGE_B, &pending(&d)).unwrap();
        assert_eq!(stalled.reason, NEW_IMAGE_NOT_STARTING);
        assert_eq!(
            stalled.message,
            "pod workers-1234-new (CrashLoopBackOff, workerd exited with code 1): service hello: Uncaught Error: boom\n  at m.js:1:7"
        );

        // Not the new image's pods: an old one that failed, one going away, one ready again.
        let old = crash_looping("workers-1234-old", IMAGE_A);
        assert_eq!(super::stalled(Some(&d), [&old], IMAGE_B, &pending(&d)), None);
        let mut leaving = crash_looping("workers-1234-new", IMAGE_B);
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH));
        assert_eq!(super::stalled(Some(&d), [&leaving], IMAGE_B, &pending(&d)), None);
        let recovered = pod(
            "p",
            IMAGE_B,
            serde_json::json!({
                "name": CONTAINER, "image": IMAGE_B, "imageID": "", "ready": true, "restartCount": 1,
                "state": {"running": {}}, "lastState": {"terminated": {"exitCode": 1, "message": BOOM}},
            }),
        );
        assert_eq!(super::stalled(Some(&d), [&recovered], IMAGE_B, &pending(&d)), None);
        // Starting for the first time: not (yet) a failure.
        let starting = pod(
            "p",
            IMAGE_B,
            serde_json::json!({
                "name": CONTAINER, "image": IMAGE_B, "imageID": "", "ready": false, "restartCount": 0,
                "state": {"running": {}},
            }),
        );
        assert_eq!(super::stalled(Some(&d), [&starting], IMAGE_B, &pending(&d)), None);
        // Restarted after it failed, and not ready since: still stalled, with the last words.
        let again = pod(
            "p",
            IMAGE_B,
            serde_json::json!({
                "name": CONTAINER, "image": IMAGE_B, "imageID": "", "ready": false, "restartCount": 4,
                "state": {"running": {}}, "lastState": {"terminated": {"exitCode": 1, "message": BOOM}},
            }),
        );
        let message = super::stalled(Some(&d), [&again], IMAGE_B, &pending(&d)).unwrap().message;
        assert!(message.contains("service hello: Uncaught Error: boom"), "{message}");
        // A pull that fails says what the kubelet says.
        let unpulled = pod(
            "p",
            IMAGE_B,
            serde_json::json!({
                "name": CONTAINER, "image": IMAGE_B, "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "manifest unknown"}},
            }),
        );
        let message = super::stalled(Some(&d), [&unpulled], IMAGE_B, &pending(&d)).unwrap().message;
        assert_eq!(message, "pod p (ImagePullBackOff): manifest unknown");
        // Killed by its start-up probe (a top-level loop): no words, the exit code.
        let killed = pod(
            "p",
            IMAGE_B,
            serde_json::json!({
                "name": CONTAINER, "image": IMAGE_B, "imageID": "", "ready": false, "restartCount": 1,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 137, "reason": "Error"}},
            }),
        );
        let message = super::stalled(Some(&d), [&killed], IMAGE_B, &pending(&d)).unwrap().message;
        assert_eq!(message, "pod p (CrashLoopBackOff, workerd exited with code 137)");

        // A complete rollout is never stalled, whatever a pod says.
        let done = rolled(IMAGE_B, 2, 2, 2, 2, 2);
        assert_eq!(super::stalled(Some(&done), [&failing], IMAGE_B, &rollout(Some(&done), IMAGE_B)), None);
    }

    #[test]
    fn the_deployments_own_word_stalls_a_rollout_when_no_pod_says_more() {
        use k8s_openapi::api::apps::v1::DeploymentCondition;
        let with = |observed: i64, type_: &str, status: &str, reason: &str| {
            let mut d = rolled(IMAGE_B, 2, observed, 0, 1, 2);
            d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
                type_: type_.into(),
                status: status.into(),
                reason: Some(reason.into()),
                message: Some("ReplicaSet \"w-1\" has timed out progressing.".into()),
                ..DeploymentCondition::default()
            }]);
            d
        };
        let d = with(2, "Progressing", "False", "ProgressDeadlineExceeded");
        let s = stalled(Some(&d), [], IMAGE_B, &pending(&d)).unwrap();
        assert_eq!(s.reason, PROGRESS_DEADLINE_EXCEEDED);
        assert!(s.message.contains("timed out progressing"), "{}", s.message);
        // About an older spec: not this rollout's.
        let d = with(1, "Progressing", "False", "ProgressDeadlineExceeded");
        assert_eq!(stalled(Some(&d), [], IMAGE_B, &pending(&d)), None);
        let d = with(2, "Progressing", "True", "ReplicaSetUpdated");
        assert_eq!(stalled(Some(&d), [], IMAGE_B, &pending(&d)), None);
        let d = with(2, "ReplicaFailure", "True", "FailedCreate");
        let s = stalled(Some(&d), [], IMAGE_B, &pending(&d)).unwrap();
        assert_eq!(s.reason, REPLICA_FAILURE);
        assert!(s.message.starts_with("the Deployment cannot create pods: FailedCreate: "), "{}", s.message);
        // A pod's words come first: they name the worker.
        let failing = crash_looping("p", IMAGE_B);
        let d = with(2, "Progressing", "False", "ProgressDeadlineExceeded");
        assert_eq!(
            stalled(Some(&d), [&failing], IMAGE_B, &pending(&d)).unwrap().reason,
            NEW_IMAGE_NOT_STARTING
        );
    }

    #[test]
    fn workerds_words_are_taken_from_its_structured_log_lines() {
        assert_eq!(workerd_output(BOOM), "service hello: Uncaught Error: boom\n  at m.js:1:7");
        let info = r#"{"level":"info","message":"starting"}"#;
        assert_eq!(
            workerd_output(&format!("{info}\n{BOOM}\n")),
            "service hello: Uncaught Error: boom\n  at m.js:1:7"
        );
        assert_eq!(workerd_output(info), "starting", "no error line: all of them");
        assert_eq!(
            workerd_output("service w: Uncaught Error: top-level boom\n  at m.js:1:7\n"),
            "service w: Uncaught Error: top-level boom\n  at m.js:1:7",
            "unstructured lines as they are"
        );
        let long = workerd_output(&"é".repeat(5000));
        assert_eq!(long.chars().count(), MAX_OUTPUT_CHARS + 3);
    }

    fn status_of(
        image: &str,
        rollout: Option<RolloutStatus>,
        ready: Option<(&str, &str)>,
    ) -> WorkerBundleStatus {
        let conditions = ready
            .map(|(status, reason)| {
                let status = if status == "True" { ConditionStatus::True } else { ConditionStatus::False };
                set_condition(&[], condition(READY, status, reason, "m", Some(1)), Timestamp::UNIX_EPOCH)
            })
            .unwrap_or_default();
        WorkerBundleStatus { image: Some(image.into()), rollout, conditions, ..WorkerBundleStatus::default() }
    }

    fn complete_rollout(complete: bool, serving: Option<&str>) -> Option<RolloutStatus> {
        Some(RolloutStatus {
            complete,
            serving_image: serving.map(str::to_owned),
            ..RolloutStatus::default()
        })
    }

    #[test]
    fn the_serving_image_is_the_last_one_rolled_out_everywhere() {
        assert_eq!(serving_image(None, IMAGE_A, false), None, "nothing served yet");
        assert_eq!(serving_image(None, IMAGE_A, true).as_deref(), Some(IMAGE_A));
        // A rolled out, B pushed and stalling: A serves, through any number of reconciles and
        // further images, until one completes.
        let a_done = status_of(IMAGE_A, complete_rollout(true, Some(IMAGE_A)), None);
        assert_eq!(serving_image(Some(&a_done), IMAGE_B, false).as_deref(), Some(IMAGE_A));
        let b_stalls = status_of(IMAGE_B, complete_rollout(false, Some(IMAGE_A)), None);
        assert_eq!(serving_image(Some(&b_stalls), IMAGE_B, false).as_deref(), Some(IMAGE_A));
        assert_eq!(serving_image(Some(&b_stalls), IMAGE_C, false).as_deref(), Some(IMAGE_A));
        assert_eq!(serving_image(Some(&b_stalls), IMAGE_C, true).as_deref(), Some(IMAGE_C));
        // A status written before the field: a complete rollout names its image.
        let older = status_of(IMAGE_A, complete_rollout(true, None), None);
        assert_eq!(serving_image(Some(&older), IMAGE_B, false).as_deref(), Some(IMAGE_A));
    }

    #[test]
    fn a_stalled_rollout_is_not_ready_keeps_the_serving_image_and_warns_once() {
        let mut b = bundle();
        b.metadata.generation = Some(4);
        b.status =
            Some(status_of(IMAGE_A, complete_rollout(true, Some(IMAGE_A)), Some(("True", "RolledOut"))));
        let base = BaseImageStatus { reference: "docker://base".into(), digest: "sha256:0".into() };
        let d = rolled(IMAGE_B, 2, 2, 0, 1, 2);
        let failing = crash_looping("workers-1234-new", IMAGE_B);
        let r = rollout(Some(&d), IMAGE_B);
        let why = stalled(Some(&d), [&failing], IMAGE_B, &r);
        let (last, stale) = after_push(b.status.as_ref(), IMAGE_B);
        let desired = ready_status(
            &b,
            IMAGE_B,
            last,
            stale.clone(),
            base.clone(),
            r,
            why.as_ref(),
            &[],
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(desired.image.as_deref(), Some(IMAGE_B), "the image the bundle wants");
        assert_eq!(desired.rollout.as_ref().unwrap().serving_image.as_deref(), Some(IMAGE_A));
        let ready = desired.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", NEW_IMAGE_NOT_STARTING));
        assert!(ready.message.contains("service hello: Uncaught Error: boom"), "{}", ready.message);
        assert!(ready.message.contains(&format!("{IMAGE_A} still serves")), "{}", ready.message);
        assert!(purgeable(&stale, IMAGE_B, desired.rollout.as_ref().unwrap().complete, &BTreeSet::new())
            .is_empty());

        // Warned when it begins; not again on the next reconcile, nor after a restart.
        let (reason, note) = stall_warning(b.status.as_ref(), &desired).unwrap();
        assert_eq!((reason.as_str(), note.as_str()), (NEW_IMAGE_NOT_STARTING, ready.message.as_str()));
        assert_eq!(stall_warning(Some(&desired), &desired), None);
        // A new image that stalls too is news.
        let mut next = desired.clone();
        next.image = Some(IMAGE_C.into());
        assert!(stall_warning(Some(&desired), &next).is_some());
        // An ordinary rollout in progress is no warning.
        let mut rolling = bundle();
        rolling.status = Some(desired.clone());
        let r = rollout(Some(&d), IMAGE_B);
        let calm = ready_status(&rolling, IMAGE_B, None, stale, base, r, None, &[], Timestamp::UNIX_EPOCH);
        assert_eq!(calm.conditions.iter().find(|c| c.type_ == READY).unwrap().reason, "RollingOut");
        assert_eq!(calm.rollout.as_ref().unwrap().serving_image.as_deref(), Some(IMAGE_A));
        assert_eq!(stall_warning(Some(&desired), &calm), None);
    }

    #[test]
    fn no_image_is_purged_across_reconciles_until_a_rollout_completes() {
        // A serves; B is pushed and stalls; C is pushed and stalls too; then D rolls out.
        let mut status = status_of(IMAGE_A, complete_rollout(true, Some(IMAGE_A)), None);
        let none = BTreeSet::new();
        for next in [IMAGE_B, IMAGE_C] {
            let (last, stale) = after_push(Some(&status), next);
            assert!(purgeable(&stale, next, false, &none).is_empty(), "{stale:?} purged while {next} stalls");
            status = WorkerBundleStatus {
                image: Some(next.into()),
                last_image: last,
                stale_images: stale,
                rollout: Some(RolloutStatus {
                    serving_image: serving_image(Some(&status), next, false),
                    ..RolloutStatus::default()
                }),
                ..WorkerBundleStatus::default()
            };
            assert_eq!(status.rollout.as_ref().unwrap().serving_image.as_deref(), Some(IMAGE_A));
            assert!(status.stale_images.contains(&IMAGE_A.to_owned()), "A stays listed to purge later");
        }
        let d = "r/w@sha256:dddd";
        let (_, stale) = after_push(Some(&status), d);
        assert_eq!(purgeable(&stale, d, true, &none), [IMAGE_A, IMAGE_B, IMAGE_C]);
    }
}
