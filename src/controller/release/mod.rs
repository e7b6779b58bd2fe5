//! WorkerRelease reconcile: observe (the release, its account) → fetch its scripts → plan (pure:
//! the worker and its repository) → build the worker's layer → push the blob → status.
//!
//! A release is built once. A failure is written to its status and retried with a growing delay,
//! so a missing key or a registry outage costs a request now and then, never a hot loop.

pub mod plan;

use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use tracing::{debug, info, warn};

use super::apply::apply_status;
use super::{bundle, object_key, Context, Error};
use crate::build::Target;
use crate::crd::{WorkerRelease, ACCOUNT_LABEL};
use crate::image::assemble::build_worker_layer;

pub async fn reconcile(release: Arc<WorkerRelease>, ctx: Arc<Context>) -> Result<Action, Error> {
    if release.metadata.deletion_timestamp.is_some() || plan::is_built(&release) {
        return Ok(Action::await_change());
    }
    let key = object_key(&*release);
    if let Some(wait) = ctx.backoff.wait_left(&key) {
        return Ok(Action::requeue(wait));
    }
    let releases: Api<WorkerRelease> =
        Api::namespaced(ctx.client.clone(), &release.namespace().unwrap_or_default());
    match build_and_push(&release, &ctx).await {
        Ok(status) => {
            ctx.backoff.succeeded(&key);
            let digest = status.layer.as_ref().map(|l| l.digest.clone()).unwrap_or_default();
            apply_status(&releases, &*release, release.status.as_ref(), &status).await?;
            info!(%digest, "release built");
            ctx.event(&*release, false, "Built", "BuildLayer", format!("layer {digest} pushed")).await;
            Ok(Action::await_change())
        }
        Err(error) => {
            ctx.metrics.error("WorkerRelease", error.reason());
            let wait = ctx.backoff.failed(&key);
            warn!(reason = error.reason(), error = %error.message(), retry_in = ?wait, "release failed");
            let status = plan::failed_status(&release, &error, Timestamp::now());
            let changed = release.status.as_ref() != Some(&status);
            apply_status(&releases, &*release, release.status.as_ref(), &status).await?;
            if changed {
                ctx.event(&*release, true, error.reason(), "BuildLayer", error.message()).await;
            }
            Ok(Action::requeue(wait))
        }
    }
}

async fn build_and_push(
    release: &WorkerRelease,
    ctx: &Context,
) -> Result<crate::crd::WorkerReleaseStatus, Error> {
    let template = &release.spec.template;
    let urls = plan::script_urls(template)?;

    // Observe: the account (for its repository, from the cache) and the scripts.
    let namespace = release.namespace().unwrap_or_default();
    let account =
        release.labels().get(ACCOUNT_LABEL).and_then(|name| ctx.caches.accounts.get(&namespace, name));
    let repository = plan::repository(release, account.as_deref(), &ctx.settings)?;
    let target = Target::parse(&repository).map_err(Error::Invalid)?;
    let pull_secret = account
        .as_ref()
        .and_then(|a| a.spec.pod_template.as_ref())
        .and_then(|p| p.image_pull_secret.as_deref());
    let registries = ctx.registries(&namespace, pull_secret).await?;
    // A layer this release recorded before (a rebuild after a restart) is probably there already;
    // a new release's layer almost never is, so its upload session is opened while S3 is read.
    let recorded_layer = release.status.as_ref().and_then(|s| s.layer.as_ref()).map(|l| l.digest.clone());
    let s3 = ctx.build.sources.s3().await;
    let reads = urls.iter().map(|url| async move { Ok::<_, Error>((url.clone(), s3.read(url).await?)) });
    let changes_a_running_worker = bundle::ahead::changes_a_running_worker(release, ctx);
    let session_ahead = async {
        if recorded_layer.is_none() {
            // The layer's session, and the bundle's next image config's when it can go up too.
            let count = if changes_a_running_worker { 2 } else { 1 };
            target.open_upload_sessions(&registries, count).await;
        }
    };
    let (fetched, ()) = tokio::join!(futures::future::try_join_all(reads), session_ahead);
    let fetched = fetched?;

    // Plan.
    let (worker, modules) = plan::resolve_worker(template, &fetched)?;
    // A worker that cannot start would stop every worker of its account's workerd: no layer,
    // no Ready, so no bundle ever takes it.
    if let Some(checker) = &ctx.settings.startup_check {
        let took = checker.check(&worker).await?;
        debug!(took = ?took, "start-up check passed");
    }

    // Build the layer off the async threads (large workers are CPU work), then push it.
    let mtime = u64::try_from(ctx.settings.source_date_epoch).unwrap_or(0);
    let code = worker.code.clone();
    let cache = ctx.build.block_cache.clone();
    let started = Instant::now();
    let layer = tokio::task::spawn_blocking(move || {
        let layer = build_worker_layer(&code, mtime, cache.as_ref());
        // At most once a day, by a process that added to it: within its bound however long we run.
        if let Some(cache) = &cache {
            cache.trim_if_due();
        }
        layer
    })
    .await
    .map_err(|e| Error::internal("the layer build stopped", e))?
    .map_err(|e| Error::internal("cannot write the worker's layer", e))?;
    ctx.metrics.observe_build(started.elapsed());
    debug!(took = ?started.elapsed(), bytes = layer.blob.bytes.len(), "layer built");
    let status =
        plan::ready_status(release, &worker, modules, &layer.layer_ref(), &repository, Timestamp::now());

    // The bundle's next image, when this release is all that changes in it: it is worked out
    // while the layer goes up, its config goes up beside the layer, and its manifest right after
    // both, while the registry is still busy with them. A debounce later, on a registry gone idle,
    // the same manifest PUT cost this machine 3-4x as long (see `bundle::ahead`); the bundle's own
    // reconcile then finds its image pushed and sends nothing.
    let started = Instant::now();
    let recorded = recorded_layer.as_deref() == Some(layer.blob.digest.as_str());
    let ahead = async {
        if recorded_layer.is_some() || !matches!(target, Target::Registry(_)) {
            return Ok(None);
        }
        let Some(next) = bundle::ahead::next_image(release, &status, &repository, ctx).await else {
            return Ok(None);
        };
        debug!(took = ?started.elapsed(), "next bundle image assembled ahead");
        let config = &next.image.config;
        target.put_blob(&registries, &config.digest, config.bytes.clone(), false).await?;
        Ok::<_, crate::build::BuildError>(Some(next))
    };
    let (uploaded, next) = tokio::join!(
        target.put_blob(&registries, &layer.blob.digest, layer.blob.bytes.clone(), recorded),
        ahead
    );
    let uploaded = uploaded?;
    let next = next.unwrap_or_else(|e| {
        // Not this release's failure: the bundle sends its config itself.
        debug!(error = %e, "the next bundle image's config did not go up ahead");
        None
    });
    let config_sent_ahead = next.is_some();
    // The manifest only for a change to a worker the bundle runs: a new account's bundle is
    // still being written while its releases finish (1,000 accounts at once: a third of the
    // images pushed ahead were not the ones the bundles made, each a wasted manifest and config
    // layer), and its first image does not follow an idle pause anyway.
    if let (Target::Registry(out), Some(next), true) = (&target, next, changes_a_running_worker) {
        bundle::ahead::push_next_image(out, next, &registries, &namespace, ctx).await;
    }
    ctx.metrics.observe_push(started.elapsed());
    if uploaded && !config_sent_ahead {
        // The bundle's image follows a debounce later, with one new blob (its config).
        target.open_upload_session_for_next_push(registries.clone());
    }
    Ok(status)
}
