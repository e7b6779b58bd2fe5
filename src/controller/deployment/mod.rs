//! WorkerDeployment reconcile: observe (the deployment, the releases it owns, from the cache) → plan (pure) →
//! apply (the current release; delete releases past the history) → status.

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use tracing::info;

use super::apply::{apply, apply_status};
use super::cache::deployment_key;
use super::{object_key, Context, Error};
use crate::crd::{WorkerDeployment, WorkerRelease};

/// How often a settled deployment is looked at again even without a change.
const RESYNC: Duration = Duration::from_secs(600);

pub async fn reconcile(deployment: Arc<WorkerDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    if deployment.metadata.deletion_timestamp.is_some() {
        // Its releases are owned by it: the garbage collector removes them.
        return Ok(Action::await_change());
    }
    let namespace = deployment.namespace().unwrap_or_default();
    let releases: Api<WorkerRelease> = Api::namespaced(ctx.client.clone(), &namespace);
    let deployments: Api<WorkerDeployment> = Api::namespaced(ctx.client.clone(), &namespace);

    // Observe (from the cache: its releases by their deployment label, then by owner).
    let uid = deployment.uid().unwrap_or_default();
    let owned: Vec<Arc<WorkerRelease>> = ctx
        .caches
        .releases
        .find(&deployment_key(&namespace, &deployment.name_any()))
        .into_iter()
        .filter(|r| r.owner_references().iter().any(|o| o.uid == uid))
        .collect();

    // Plan.
    let plan = plan::plan(&deployment, &owned, Timestamp::now())
        .map_err(|e| Error::internal("cannot serialize the template", e))?;

    // Apply.
    let release_name = plan.release.name_any();
    let existing = owned.iter().find(|r| r.name_any() == release_name);
    if existing.is_none_or(|r| r.spec != plan.release.spec) {
        apply(&releases, &plan.release).await?;
        info!(release = %release_name, "release created");
        ctx.event(
            &*deployment,
            false,
            "ReleaseCreated",
            "CreateRelease",
            format!("created WorkerRelease {release_name}"),
        )
        .await;
    }
    for name in &plan.delete {
        match releases.delete(name, &DeleteParams::background()).await {
            Ok(_) => {
                info!(release = %name, "release pruned");
                ctx.event(
                    &*deployment,
                    false,
                    "ReleasePruned",
                    "DeleteRelease",
                    format!("deleted WorkerRelease {name}: past the history limit"),
                )
                .await;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }

    // Status.
    apply_status(&deployments, &*deployment, deployment.status.as_ref(), &plan.status).await?;
    ctx.backoff.succeeded(&object_key(&*deployment));
    Ok(Action::requeue(RESYNC))
}
