//! The bundle image a release is about to make, worked out and pushed while the release's layer
//! goes up.
//!
//! A changed worker used to cost the bundle its config upload and its manifest a debounce after
//! the layer (the account and the bundle wait for releases to settle): PUTs on a registry gone
//! idle. On this kind of machine a request that follows 50-300 ms of quiet takes 3-4x as long as
//! the same request back to back (the manifest PUT: ~16 ms against ~4.6, measured with
//! `scripts/replay-requests --gap`). Here the account's plan and the bundle's image inputs, both
//! pure, run on the caches as they will be once the release is Ready. When that release is all
//! that changes, the bundle's image is known before the account even writes the bundle: its
//! config goes up beside the layer and, when the release changes a worker the bundle runs
//! already, its manifest under the bundle's tag right after both. The bundle's reconcile then
//! finds the image pushed by this process and sends nothing. The request count is the same.
//!
//! When something else changes meanwhile, the bundle's image differs and it pushes its own (the
//! early one cost its uploads and nothing else, and is left untagged for the registry's garbage
//! collection). When the bundle's spec is rewritten and it still runs the image it ran before (a
//! change undone within the debounce), its reconcile tags that image again
//! ([`super::plan::needs_push`]): the tag names the image the bundle runs. A reconcile on the
//! bundle as it was before the release (a cache not yet caught up) changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use tracing::{debug, info};

use super::plan;
use crate::build::bundle::{assemble_bundle, push_bundle, BundleWorkerLayer};
use crate::build::{ResolvedBase, Target};
use crate::controller::account::{self, plan::BundlePlan};
use crate::controller::context::AssemblyInputs;
use crate::controller::Context;
use crate::crd::{WorkerAccount, WorkerBundle, WorkerRelease, WorkerReleaseStatus, ACCOUNT_LABEL};
use crate::image::assemble::{AssembleOptions, AssembledImage};
use crate::registry::{Registries, RegistryRef};

/// Whether `release` changes a worker its account's bundle runs already: the case where the
/// bundle's next image can be worked out ahead ([`next_image`]), known before the release
/// is built (so that an upload session for that image's config is opened with the layer's).
pub fn changes_a_running_worker(release: &WorkerRelease, ctx: &Context) -> bool {
    let running = || {
        let account = account_of(release, ctx)?;
        let bundle = ctx.caches.bundles.get(&release.namespace()?, &account::plan::bundle_name(&account))?;
        let script = &release.spec.template.script_name;
        Some(bundle.spec.workers.iter().any(|w| w.worker_name == *script && w.release != release.name_any()))
    };
    running().unwrap_or(false)
}

/// The image `release` will make of its bundle, for the repository `repository`; `None` when it
/// cannot be known yet: another release of the account still being built (the account holds its
/// bundle for it), a bundle that does not exist yet or would not change, another repository, a
/// base not read yet.
pub async fn next_image(
    release: &WorkerRelease,
    ready: &WorkerReleaseStatus,
    repository: &str,
    ctx: &Context,
) -> Option<NextImage> {
    let account = account_of(release, ctx)?;
    if account.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let account::Observed { deployments, mut releases, existing } = account::observe(&account, &ctx.caches);
    let existing = existing?;

    // The releases as they will be: this one Ready.
    let mut built = release.clone();
    built.status = Some(ready.clone());
    let built = Arc::new(built);
    releases.retain(|r| r.name_any() != built.name_any());
    releases.push(built.clone());

    let planned = account::plan::plan(&account, &deployments, &releases, Some(&*existing), Timestamp::now());
    let BundlePlan::Apply(desired) = planned.bundle else { return None };
    let changes = desired.spec != existing.spec;
    if !changes
        || planned.hold.is_some()
        || !desired.spec.workers.iter().any(|w| w.release == built.name_any())
    {
        return None;
    }
    let bundle = WorkerBundle { spec: desired.spec, ..(*existing).clone() };
    if plan::repository(&bundle, &ctx.settings).ok()? != repository {
        return None;
    }

    // The releases the bundle will run, by name, as the bundle's own reconcile observes them.
    let releases: BTreeMap<String, WorkerRelease> = releases
        .iter()
        .filter(|r| bundle.spec.workers.iter().any(|w| w.release == r.name_any()))
        .map(|r| (r.name_any(), (**r).clone()))
        .collect();
    let inputs = plan::image_inputs(&bundle, &releases, &super::observe_secrets(&bundle, ctx)).ok()?;
    let base_ref = plan::base_reference(&bundle, &ctx.settings).ok()?;
    let base = ctx.bases.cached(&base_ref, plan::pinned_base(&bundle, &base_ref).as_ref()).await?;
    let options =
        AssembleOptions { source_date_epoch: ctx.settings.source_date_epoch, base_name: base.name.clone() };
    let image = assemble_bundle(&base, &inputs.workers, &options).ok()?;
    let assembly = AssemblyInputs::of(repository, &base, &options, &inputs.workers);
    Some(NextImage {
        generation: existing.metadata.generation.unwrap_or(0),
        bundle,
        image,
        base,
        workers: inputs.workers,
        assembly,
    })
}

/// A bundle's next image, worked out ahead, with what its push needs.
pub struct NextImage {
    /// The generation of the bundle the image was worked out from (before the release's change).
    pub generation: i64,
    /// The bundle as it will be: its uid, tag, pull secret, and what its events are about.
    pub bundle: WorkerBundle,
    pub image: AssembledImage,
    pub base: Arc<ResolvedBase>,
    pub workers: Vec<BundleWorkerLayer>,
    /// What the bundle's reconcile will assemble the image from (so that it need not again).
    pub assembly: AssemblyInputs,
}

/// The account `release` belongs to (its label), from the cache.
fn account_of(release: &WorkerRelease, ctx: &Context) -> Option<Arc<WorkerAccount>> {
    ctx.caches.accounts.get(&release.namespace()?, release.labels().get(ACCOUNT_LABEL)?)
}

/// Pushes a bundle's next image (its layer and config are up already: the push sends what the
/// repository still lacks, then the manifest) and records it as the bundle's last push and
/// assembly, so that the bundle's reconcile sends nothing for it. Only through the registries the
/// bundle's own push uses: another set has its own memory of what the repository holds. A failure
/// is not the release's: the bundle pushes its image itself.
pub async fn push_next_image(
    repository: &RegistryRef,
    next: NextImage,
    registries: &Arc<Registries>,
    namespace: &str,
    ctx: &Context,
) {
    let Some(uid) = next.bundle.uid() else { return };
    let pull_secret = next.bundle.spec.pod_template.as_ref().and_then(|p| p.image_pull_secret.as_deref());
    match ctx.registries(namespace, pull_secret).await {
        Ok(bundle_registries) if Arc::ptr_eq(&bundle_registries, registries) => {}
        _ => return,
    }
    let tag = plan::image_tag(&next.bundle);
    match push_bundle(&next.image, &next.base, &next.workers, repository, &tag, registries).await {
        Ok(report) => {
            let image = Target::Registry(repository.clone()).image_ref(&next.image.manifest.digest);
            ctx.record_assembly(&uid, next.assembly, &image);
            ctx.record_ahead_push(&uid, &image, next.generation);
            info!(%image, requests = report.requests, bundle = next.bundle.name_any(), "bundle image pushed ahead");
            let note = format!("pushed {image} ({} registry requests), ahead of the bundle", report.requests);
            ctx.event(&next.bundle, false, "ImagePushed", "BuildImage", note).await;
        }
        Err(e) => debug!(error = %e, "the bundle's next image did not go up ahead"),
    }
}
