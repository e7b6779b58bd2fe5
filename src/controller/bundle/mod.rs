//! WorkerBundle reconcile: observe (its releases, its workers' Secrets, its Deployment and its
//! pods, the base) → plan (pure: the image, the Deployment, Service and NetworkPolicy, the
//! rollout and whether it stalled, what to purge) → apply (push the image when it changed; apply
//! the Deployment, Service and NetworkPolicy when they changed; delete images nothing uses once
//! the new one is rolled out) → status (Ready False with workerd's own message while the new
//! image cannot start, and one Warning Event when that begins).
//!
//! A finalizer deletes a bundle's images from the registry when the bundle is deleted, unless it
//! is annotated `workerbundle.dev/keep-images: "true"`. While the registry cannot be reached the
//! deletion waits; the annotation lets a bundle go without it.

pub mod ahead;
pub mod network_policy;
pub mod plan;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::{Api, Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::apply::{apply, apply_status};
use super::cache::{bundle_pods_key, image_key, secret_key, Cache};
use super::context::AssemblyInputs;
use super::{object_key, Context, Error};
use crate::build::bundle::{assemble_bundle, push_bundle};
use crate::build::Target;
use crate::crd::{BaseImageStatus, WorkerBundle, WorkerRelease, BUNDLE_LABEL, KEEP_IMAGES_ANNOTATION};
use crate::image::assemble::AssembleOptions;
use crate::registry::push::assume_new_repository;

/// Held by every bundle until its images are deleted.
pub const FINALIZER: &str = "workerbundle.dev/images";
/// How often a settled bundle is looked at again without a change.
const RESYNC: Duration = Duration::from_secs(600);
/// How soon a rollout in progress is looked at again (its Deployment's changes also wake it).
const ROLLOUT_POLL: Duration = Duration::from_secs(30);

pub async fn reconcile(bundle: Arc<WorkerBundle>, ctx: Arc<Context>) -> Result<Action, Error> {
    let bundles: Api<WorkerBundle> =
        Api::namespaced(ctx.client.clone(), &bundle.namespace().unwrap_or_default());
    finalizer(&bundles, FINALIZER, bundle, |event| async {
        match event {
            FinalizerEvent::Apply(bundle) => reconcile_apply(bundle, ctx.clone()).await,
            FinalizerEvent::Cleanup(bundle) => cleanup(bundle, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        kube::runtime::finalizer::Error::AddFinalizer(e)
        | kube::runtime::finalizer::Error::RemoveFinalizer(e) => Error::Kube(e),
        other => Error::internal("the finalizer of a WorkerBundle", other),
    })
}

async fn reconcile_apply(bundle: Arc<WorkerBundle>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = object_key(&*bundle);
    if let Some(wait) = ctx.backoff.wait_left(&key) {
        return Ok(Action::requeue(wait));
    }
    let namespace = bundle.namespace().unwrap_or_default();
    let bundles: Api<WorkerBundle> = Api::namespaced(ctx.client.clone(), &namespace);
    match build_and_roll_out(&bundle, &ctx).await {
        Ok(action) => {
            ctx.backoff.succeeded(&key);
            Ok(action)
        }
        Err(Failure::Waiting(message)) => {
            // Not an error: the account lists only Ready releases, so this passes by itself.
            let status = plan::waiting_status(&bundle, "WaitingForReleases", message, Timestamp::now());
            apply_status(&bundles, &*bundle, bundle.status.as_ref(), &status).await?;
            Ok(Action::requeue(Duration::from_secs(5)))
        }
        Err(Failure::Error(error)) => {
            let status = plan::waiting_status(&bundle, error.reason(), error.message(), Timestamp::now());
            let changed = bundle.status.as_ref() != Some(&status);
            apply_status(&bundles, &*bundle, bundle.status.as_ref(), &status).await?;
            if changed {
                ctx.event(&*bundle, true, error.reason(), "BuildImage", error.message()).await;
            }
            Err(error)
        }
    }
}

enum Failure {
    Waiting(String),
    Error(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Error(e)
    }
}

impl From<kube::Error> for Failure {
    fn from(e: kube::Error) -> Self {
        Failure::Error(e.into())
    }
}

impl From<crate::build::BuildError> for Failure {
    fn from(e: crate::build::BuildError) -> Self {
        Failure::Error(e.into())
    }
}

async fn build_and_roll_out(bundle: &WorkerBundle, ctx: &Context) -> Result<Action, Failure> {
    let started = Instant::now();
    let namespace = bundle.namespace().unwrap_or_default();
    let client = ctx.client.clone();
    let bundles: Api<WorkerBundle> = Api::namespaced(client.clone(), &namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);

    // Observe, from the caches.
    let releases = observe_releases(bundle, ctx);
    let secrets = observe_secrets(bundle, ctx);
    let existing_deployment = ctx.caches.workloads.get(&namespace, &bundle.spec.deployment_name);
    let existing_service = ctx.caches.services.get(&namespace, &bundle.spec.deployment_name);
    let existing_policy =
        ctx.caches.network_policies.as_ref().map(|c| c.get(&namespace, &bundle.spec.deployment_name));

    // No workers left (the last script was deleted): nothing to run, nothing to keep.
    if bundle.spec.workers.is_empty() {
        let running = Running {
            deployment: existing_deployment.is_some(),
            service: existing_service.is_some(),
            network_policy: existing_policy.flatten().is_some(),
        };
        return stop_running(bundle, ctx, running).await;
    }

    // Plan: the image's inputs, then the image itself (pure and cheap: only the config layer is new).
    let inputs = plan::image_inputs(bundle, &releases, &secrets).map_err(Failure::Waiting)?;
    let repository = plan::repository(bundle, &ctx.settings)?;
    let target = Target::parse(&repository).map_err(Error::Invalid)?;
    let base_ref = plan::base_reference(bundle, &ctx.settings)?;
    let pull_secret = bundle.spec.pod_template.as_ref().and_then(|p| p.image_pull_secret.as_deref());
    let registries = ctx.registries(&namespace, pull_secret).await?;
    let base =
        ctx.bases.resolve(&base_ref, plan::pinned_base(bundle, &base_ref).as_ref(), &registries).await?;
    let options =
        AssembleOptions { source_date_epoch: ctx.settings.source_date_epoch, base_name: base.name.clone() };
    let uid = bundle.uid().unwrap_or_default();
    let assembly = AssemblyInputs::of(&repository, &base, &options, &inputs.workers);
    let assemble = || -> Result<_, Failure> {
        let assembling = Instant::now();
        let image = assemble_bundle(&base, &inputs.workers, &options)?;
        ctx.metrics.observe_build(assembling.elapsed());
        debug!(took = ?assembling.elapsed(), "image assembled");
        Ok(image)
    };
    let (image_ref, mut assembled) = match ctx.assembled_from(&uid, &assembly) {
        Some(image_ref) => (image_ref, None),
        None => {
            let image = assemble()?;
            let image_ref = target.image_ref(&image.manifest.digest);
            ctx.record_assembly(&uid, assembly, &image_ref);
            (image_ref, Some(image))
        }
    };

    // Apply: the image, only when it is not the one the bundle already runs.
    let status = bundle.status.as_ref();
    let (last_image, stale_images) = plan::after_push(status, &image_ref);
    let current = status.and_then(|s| s.image.as_deref()) == Some(image_ref.as_str());
    let generation = bundle.metadata.generation.unwrap_or(0);
    if plan::needs_push(current, ctx.last_push(&uid).as_ref(), &image_ref, generation) {
        // Known but not pushed (the push after that assembly failed, or an image pushed ahead
        // and not adopted took the tag): the bytes are needed now.
        let image = match assembled.take() {
            Some(image) => image,
            None => assemble()?,
        };
        let pushing = Instant::now();
        let tag = plan::image_tag(bundle);
        let requests = match &target {
            Target::Registry(r) => {
                if plan::first_image(status) {
                    assume_new_repository(&registries.memory(&r.registry), &r.repository);
                }
                push_bundle(&image, &base, &inputs.workers, r, &tag, &registries).await?.requests
            }
            Target::Layout(dir) => {
                Target::write_layout_image(dir, &image, &base, &inputs.workers, &tag, &registries).await?;
                0
            }
        };
        ctx.metrics.observe_push(pushing.elapsed());
        ctx.record_push(&uid, &image_ref);
        info!(image = %image_ref, requests, elapsed_ms = started.elapsed().as_millis() as u64, "image pushed");
        ctx.event(
            bundle,
            false,
            "ImagePushed",
            "BuildImage",
            format!("pushed {image_ref} ({requests} registry requests)"),
        )
        .await;
    }

    // Apply: the Deployment and Service, when they differ from what we applied last.
    let deployment = workload::deployment(bundle, &image_ref, &inputs.workers, &plan::secrets_hash(&secrets));
    let running = if workload::unchanged(
        existing_deployment.as_ref().map(|d| &d.metadata),
        &deployment.metadata,
    ) {
        existing_deployment
    } else {
        let applied = apply(&deployments, &deployment).await?;
        info!(deployment = %bundle.spec.deployment_name, image = %image_ref, elapsed_ms = started.elapsed().as_millis() as u64, "deployment applied");
        Some(Arc::new(applied))
    };
    let service = workload::service(bundle, &inputs.workers);
    if !workload::unchanged(existing_service.as_ref().map(|s| &s.metadata), &service.metadata) {
        apply(&services, &service).await?;
    }
    if let Some(existing) = existing_policy {
        let policy = network_policy::network_policy(bundle);
        if !workload::unchanged(existing.as_ref().map(|p| &p.metadata), &policy.metadata) {
            apply(&Api::<NetworkPolicy>::namespaced(client.clone(), &namespace), &policy).await?;
        }
    }

    // Purge: once the new image runs everywhere, the old ones nothing else uses. Never before:
    // the old ReplicaSet runs one of them until then, and it serves while the new image stalls.
    let rollout = plan::rollout(running.as_deref(), &image_ref);
    let pods = ctx.caches.pods.find(&bundle_pods_key(&namespace, &bundle.name_any()));
    let stalled = plan::stalled(running.as_deref(), pods.iter().map(|p| &**p), &image_ref, &rollout);
    let mut stale_images = stale_images;
    if rollout.complete && !stale_images.is_empty() {
        let referenced = referenced_images(ctx, bundle, &stale_images);
        for stale in plan::purgeable(&stale_images, &image_ref, true, &referenced) {
            delete(&stale, &registries).await?;
            info!(image = %stale, "previous image deleted");
            ctx.event(bundle, false, "ImagePurged", "PurgeImage", format!("deleted {stale}: no longer used"))
                .await;
            stale_images.retain(|i| *i != stale);
        }
        // Images another object still uses stay listed: deleted once that object moves on.
    }

    // Status.
    let base_status =
        BaseImageStatus { reference: base_ref.to_string(), digest: base.image.manifest_digest.to_string() };
    let complete = rollout.complete;
    let desired = plan::ready_status(
        bundle,
        &image_ref,
        last_image,
        stale_images,
        base_status,
        rollout,
        stalled.as_ref(),
        &inputs.skipped_keys,
        Timestamp::now(),
    );
    let was_complete = status.and_then(|s| s.rollout.as_ref()).is_some_and(|r| r.complete);
    apply_status(&bundles, bundle, status, &desired).await?;
    if complete && !was_complete {
        info!(image = %image_ref, "rolled out");
    }
    if let Some((reason, note)) = plan::stall_warning(status, &desired) {
        warn!(image = %image_ref, %reason, message = %note, "rollout stalled");
        ctx.event(bundle, true, &reason, "RollOut", note).await;
    }
    Ok(Action::requeue(if complete { RESYNC } else { ROLLOUT_POLL }))
}

/// Which of a bundle's workload objects exist.
struct Running {
    deployment: bool,
    service: bool,
    network_policy: bool,
}

/// A bundle without workers: its Deployment, Service and NetworkPolicy go, and its images once
/// nothing else runs them.
async fn stop_running(bundle: &WorkerBundle, ctx: &Context, running: Running) -> Result<Action, Failure> {
    let namespace = bundle.namespace().unwrap_or_default();
    let name = &bundle.spec.deployment_name;
    let params = kube::api::DeleteParams::background();
    if running.deployment {
        Api::<Deployment>::namespaced(ctx.client.clone(), &namespace).delete(name, &params).await?;
        info!(deployment = %name, "no workers left: deployment deleted");
    }
    if running.service {
        Api::<Service>::namespaced(ctx.client.clone(), &namespace).delete(name, &params).await?;
    }
    if running.network_policy {
        Api::<NetworkPolicy>::namespaced(ctx.client.clone(), &namespace).delete(name, &params).await?;
    }
    let current = bundle.status.clone().unwrap_or_default();
    let mut stale = current.stale_images.clone();
    if let Some(image) = current.image.as_ref().filter(|i| !stale.contains(i)) {
        stale.push(image.clone());
    }
    if !stale.is_empty() {
        let pull_secret = bundle.spec.pod_template.as_ref().and_then(|p| p.image_pull_secret.as_deref());
        let registries = ctx.registries(&namespace, pull_secret).await?;
        let referenced = referenced_images(ctx, bundle, &stale);
        for image in plan::purgeable(&stale, "", true, &referenced) {
            delete(&image, &registries).await?;
            info!(%image, "image of a bundle without workers deleted");
            stale.retain(|i| *i != image);
        }
    }
    let status = plan::empty_status(bundle, current.image.or(current.last_image), stale, Timestamp::now());
    let bundles: Api<WorkerBundle> = Api::namespaced(ctx.client.clone(), &namespace);
    apply_status(&bundles, bundle, bundle.status.as_ref(), &status).await?;
    Ok(Action::requeue(RESYNC))
}

fn observe_releases(bundle: &WorkerBundle, ctx: &Context) -> BTreeMap<String, WorkerRelease> {
    let namespace = bundle.namespace().unwrap_or_default();
    bundle
        .spec
        .workers
        .iter()
        .filter_map(|w| {
            Some((w.release.clone(), (*ctx.caches.releases.get(&namespace, &w.release)?).clone()))
        })
        .collect()
}

pub(super) fn observe_secrets(bundle: &WorkerBundle, ctx: &Context) -> plan::Secrets {
    let namespace = bundle.namespace().unwrap_or_default();
    plan::referenced_secrets(bundle)
        .into_iter()
        .map(|name| {
            let secret = ctx.caches.secrets.get(&namespace, &name).map(|s| (*s).clone());
            (name, secret)
        })
        .collect()
}

/// The images a bundle runs, or may still run in some pods while it rolls out: none of them may
/// be deleted by another bundle.
pub fn in_use(bundle: &WorkerBundle) -> Vec<String> {
    let Some(status) = &bundle.status else { return Vec::new() };
    let mut images: Vec<String> = status.image.iter().cloned().collect();
    if !status.rollout.as_ref().is_some_and(|r| r.complete) {
        images.extend(status.last_image.iter().cloned());
        images.extend(status.stale_images.iter().cloned());
    }
    images
}

/// Which of `candidates` some object other than `bundle` still uses (from the caches, by image):
/// other bundles' images (see [`in_use`]), and the images of Deployments it does not own.
fn referenced_images(ctx: &Context, bundle: &WorkerBundle, candidates: &[String]) -> BTreeSet<String> {
    let uid = bundle.uid().unwrap_or_default();
    let used_elsewhere = |image: &&String| {
        let key = image_key(image);
        ctx.caches.bundles.find(&key).iter().any(|b| b.uid().unwrap_or_default() != uid)
            || ctx
                .caches
                .workloads
                .find(&key)
                .iter()
                .any(|d| !d.owner_references().iter().any(|o| o.uid == uid))
    };
    candidates.iter().filter(used_elsewhere).cloned().collect()
}

/// Deletes `image` (`registry/repository@sha256:...`) from its registry.
async fn delete(image: &str, registries: &crate::registry::Registries) -> Result<(), Error> {
    let (target, digest) = Target::parse_image(image).map_err(Error::Invalid)?;
    target.delete_image(registries, &digest).await?;
    Ok(())
}

/// A deleted bundle: its images go too, unless kept or still used elsewhere.
async fn cleanup(bundle: Arc<WorkerBundle>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.forget_bundle(&bundle.uid().unwrap_or_default());
    if bundle.annotations().get(KEEP_IMAGES_ANNOTATION).is_some_and(|v| v == "true") {
        info!("bundle deleted; its images are kept ({KEEP_IMAGES_ANNOTATION})");
        return Ok(Action::await_change());
    }
    let Some(status) = &bundle.status else { return Ok(Action::await_change()) };
    let images: BTreeSet<String> = status.image.iter().chain(&status.stale_images).cloned().collect();
    if images.is_empty() {
        return Ok(Action::await_change());
    }
    let namespace = bundle.namespace().unwrap_or_default();
    let pull_secret = bundle.spec.pod_template.as_ref().and_then(|p| p.image_pull_secret.as_deref());
    // The pull secret may be gone with the account: the controller's own credentials then.
    let registries = match ctx.registries(&namespace, pull_secret).await {
        Ok(registries) => registries,
        Err(e) => {
            warn!(error = %e.message(), "deleting the images with the controller's own credentials");
            ctx.build.registries.clone()
        }
    };
    let images: Vec<String> = images.into_iter().collect();
    let referenced = referenced_images(&ctx, &bundle, &images);
    for image in images.iter().filter(|i| !referenced.contains(*i)) {
        delete(image, &registries).await?;
        info!(%image, "image of a deleted bundle deleted");
    }
    Ok(Action::await_change())
}

/// The bundles (from the controller's store) that a Secret concerns: those whose workers read it
/// or that push with it.
pub fn bundles_of_secret(
    bundles: &Cache<WorkerBundle>,
    secret: &Secret,
) -> Vec<kube::runtime::reflector::ObjectRef<WorkerBundle>> {
    let key = secret_key(&secret.namespace().unwrap_or_default(), &secret.name_any());
    bundles.find(&key).iter().map(|b| kube::runtime::reflector::ObjectRef::from_obj(&**b)).collect()
}

/// The bundle a pod belongs to (by the bundle label its Deployment's pod template gives it).
pub fn bundle_of_pod(pod: &Pod) -> Option<kube::runtime::reflector::ObjectRef<WorkerBundle>> {
    let bundle = pod.labels().get(BUNDLE_LABEL)?;
    Some(kube::runtime::reflector::ObjectRef::new(bundle).within(&pod.namespace().unwrap_or_default()))
}

/// The bundle a Deployment belongs to (by owner reference).
pub fn bundle_of_deployment(
    deployment: &Deployment,
) -> Option<kube::runtime::reflector::ObjectRef<WorkerBundle>> {
    let owner = deployment.owner_references().iter().find(|o| o.kind == WorkerBundle::kind(&()))?;
    Some(
        kube::runtime::reflector::ObjectRef::new(&owner.name)
            .within(&deployment.namespace().unwrap_or_default()),
    )
}
