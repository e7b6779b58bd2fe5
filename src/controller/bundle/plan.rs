//! WorkerBundle, pure: from the bundle, its workers' releases and Secrets, to the image's inputs,
//! the rollout's state, the images to purge and the bundle's status (the Deployment and Service
//! that run the image are built in workload.rs).
//!
//! The image is a function of what the rebuild rule names and nothing else: each worker's layer
//! (its release's), its resolved settings (date, flags, vars), its secret KEY names, its port,
//! and the base. Secret values only reach the pod template, as a hash, so a new value rolls the
//! pods without a new image.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sha2::{Digest as _, Sha256};

use super::super::context::{LastPush, Settings};
use super::super::release::plan::{account_repository, worker_settings};
use super::super::Error;
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

/// A hash of every referenced Secret's data (names, keys and values), for the pod template: the
/// values are hashed, never copied.
pub fn secrets_hash(secrets: &Secrets) -> String {
    let mut hash = Sha256::new();
    for (name, secret) in secrets {
        hash.update(name.as_bytes());
        hash.update([0]);
        match secret {
            None => hash.update(b"(missing)"),
            Some(secret) => {
                let data: BTreeMap<&String, &[u8]> = secret
                    .data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k, v.0.as_slice()))
                    .chain(secret.string_data.iter().flatten().map(|(k, v)| (k, v.as_bytes())))
                    .collect();
                for (key, value) in data {
                    hash.update((key.len() as u64).to_be_bytes());
                    hash.update(key.as_bytes());
                    hash.update((value.len() as u64).to_be_bytes());
                    hash.update(value);
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

/// How far the Deployment has rolled `image` out.
pub fn rollout(deployment: Option<&Deployment>, image: &str) -> RolloutStatus {
    let Some(d) = deployment else { return RolloutStatus::default() };
    let spec = d.spec.as_ref();
    let runs_image = spec
        .and_then(|s| s.template.spec.as_ref())
        .is_some_and(|p| p.containers.iter().any(|c| c.image.as_deref() == Some(image)));
    let wanted = spec.and_then(|s| s.replicas).unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    let observed =
        status.observed_generation.is_some() && status.observed_generation >= d.metadata.generation;
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
    }
}

/// Images to delete now: the stale ones nothing references, once `current` is fully rolled out.
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

/// What the bundle's status says after an image was made current and the rollout looked at.
#[allow(clippy::too_many_arguments)]
pub fn ready_status(
    bundle: &WorkerBundle,
    image: &str,
    last_image: Option<String>,
    stale_images: Vec<String>,
    base: BaseImageStatus,
    rollout: RolloutStatus,
    skipped_keys: &[String],
    now: Timestamp,
) -> WorkerBundleStatus {
    let generation = bundle.metadata.generation;
    let previous: &[Condition] = bundle.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let mut message = if rollout.complete {
        format!("{image} rolled out to {} replicas", rollout.available_replicas)
    } else {
        format!(
            "rolling out {image}: {} of {} replicas updated, {} available",
            rollout.updated_replicas, rollout.replicas, rollout.available_replicas
        )
    };
    if !skipped_keys.is_empty() {
        message.push_str(&format!(
            "; secret keys that are not environment variable names are not bound: {}",
            skipped_keys.join(", ")
        ));
    }
    let wanted = if rollout.complete {
        condition(READY, ConditionStatus::True, "RolledOut", message, generation)
    } else {
        condition(READY, ConditionStatus::False, "RollingOut", message, generation)
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
    use k8s_openapi::ByteString;

    use super::super::workload::{deployment, port_name, service, unchanged, WORKERS_ANNOTATION};
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
        let mut s = Secret::default();
        s.metadata.name = Some("api-secrets".into());
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
    fn the_secrets_hash_moves_with_values_and_names_the_value_nowhere() {
        let a = secrets_hash(&secret(&[("API_KEY", "one")]));
        let b = secrets_hash(&secret(&[("API_KEY", "two")]));
        let missing = secrets_hash(&[("api-secrets".to_owned(), None)].into());
        assert_ne!(a, b);
        assert_ne!(a, missing);
        assert_eq!(a, secrets_hash(&secret(&[("API_KEY", "one")])));
        assert!(!a.contains("one"));
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
}
