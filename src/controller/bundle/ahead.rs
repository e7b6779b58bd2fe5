//! The bundle image a release is about to make, worked out while the release's layer goes up.
//!
//! A changed worker used to cost the bundle a config upload a debounce after its layer's (the
//! account and the bundle wait for releases to settle): two PUTs on a registry gone idle, one
//! after the other. Here the account's plan and the bundle's image inputs, both pure, run on the
//! caches as they will be once the release is Ready. When that release is all that changes, the
//! image's config is known before the account even writes the bundle, and goes up beside the
//! layer; the bundle's own push then finds it there and sends the manifest alone. The request
//! count is the same. When something else changes meanwhile, the bundle's image differs and it
//! sends its own config: the early one cost its upload and nothing else.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::plan;
use crate::build::bundle::assemble_bundle;
use crate::controller::account::{self, plan::BundlePlan};
use crate::controller::Context;
use crate::crd::{WorkerAccount, WorkerBundle, WorkerRelease, WorkerReleaseStatus, ACCOUNT_LABEL};
use crate::image::assemble::{AssembleOptions, Blob};

/// Whether `release` changes a worker its account's bundle runs already: the case where the
/// bundle's next image can be worked out ahead ([`next_image_config`]), known before the release
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

/// The config blob of the image `release` will make of its bundle, for the repository
/// `repository`; `None` when it cannot be known yet: another release of the account still being
/// built (the account holds its bundle for it), a bundle that does not exist yet or would not
/// change, another repository, a base not read yet. Only the config: the image's config layer
/// (workers' names and ports) does not change with a worker's code, and when it does change the
/// bundle's push, which first learns what the repository holds, decides whether it goes up.
pub async fn next_image_config(
    release: &WorkerRelease,
    ready: &WorkerReleaseStatus,
    repository: &str,
    ctx: &Context,
) -> Option<Blob> {
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
    Some(image.config)
}

/// The account `release` belongs to (its label), from the cache.
fn account_of(release: &WorkerRelease, ctx: &Context) -> Option<Arc<WorkerAccount>> {
    ctx.caches.accounts.get(&release.namespace()?, release.labels().get(ACCOUNT_LABEL)?)
}
