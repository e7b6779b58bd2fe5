//! WorkerAccount reconcile: observe (the account, the deployments and releases of its namespace,
//! its bundle) → plan (pure) → apply the bundle → status.

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::apply::{apply, apply_status};
use super::{object_key, Context, Error};
use crate::crd::{WorkerAccount, WorkerBundle, WorkerDeployment, WorkerRelease};
use plan::BundlePlan;

const RESYNC: Duration = Duration::from_secs(600);

pub async fn reconcile(account: Arc<WorkerAccount>, ctx: Arc<Context>) -> Result<Action, Error> {
    if account.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = account.namespace().unwrap_or_default();
    let client = ctx.client.clone();
    let accounts: Api<WorkerAccount> = Api::namespaced(client.clone(), &namespace);
    let bundles: Api<WorkerBundle> = Api::namespaced(client.clone(), &namespace);

    // Observe.
    let deployments = Api::<WorkerDeployment>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default())
        .await?
        .items;
    let releases = Api::<WorkerRelease>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default())
        .await?
        .items;
    let existing = bundles.get_opt(&plan::bundle_name(&account)).await?;

    // Plan.
    let plan = plan::plan(&account, &deployments, &releases, existing.as_ref(), Timestamp::now());

    // Apply.
    match &plan.bundle {
        BundlePlan::Apply(bundle) => {
            let unchanged = existing.as_ref().is_some_and(|e| {
                e.spec == bundle.spec && bundle.labels().iter().all(|(k, v)| e.labels().get(k) == Some(v))
            });
            if !unchanged {
                apply(&bundles, bundle).await?;
                let workers: Vec<String> = bundle
                    .spec
                    .workers
                    .iter()
                    .map(|w| format!("{}:{}", w.worker_name, w.worker_number))
                    .collect();
                info!(bundle = %bundle.name_any(), ?workers, "bundle updated");
                ctx.event(
                    &*account,
                    false,
                    "BundleUpdated",
                    "UpdateBundle",
                    format!(
                        "WorkerBundle {} lists {}",
                        bundle.name_any(),
                        if workers.is_empty() { "no workers".into() } else { workers.join(", ") }
                    ),
                )
                .await;
            }
        }
        BundlePlan::Conflict(message) => {
            warn!(%message, "bundle name taken");
            if account.status.as_ref() != Some(&plan.status) {
                ctx.event(&*account, true, "BundleNameTaken", "UpdateBundle", message.clone()).await;
            }
        }
    }

    // Status.
    apply_status(&accounts, &*account, account.status.as_ref(), &plan.status).await?;
    ctx.backoff.succeeded(&object_key(&*account));
    Ok(Action::requeue(RESYNC))
}
