//! WorkerAccount reconcile: observe (the account, the deployments and releases it selects, its
//! bundle, all from the caches) → plan (pure) → apply the bundle (or hold a change while releases
//! deployed with it are still being built) → status.

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::apply::{apply, apply_status};
use super::cache::{account_key, custom_selector_key, Cache, Caches};
use super::{object_key, Context, Error};
use crate::crd::{WorkerAccount, WorkerBundle, WorkerDeployment, WorkerRelease, ACCOUNT_LABEL};
use plan::BundlePlan;

const RESYNC: Duration = Duration::from_secs(600);

/// What an account's plan is made from.
pub struct Observed {
    pub deployments: Vec<Arc<WorkerDeployment>>,
    pub releases: Vec<Arc<WorkerRelease>>,
    pub existing: Option<Arc<WorkerBundle>>,
}

/// The deployments and releases `account` selects and its bundle, from the caches: with the
/// default selector only the objects labelled with the account can be selected; a selector of
/// its own may select any of the namespace.
pub fn observe(account: &WorkerAccount, caches: &Caches) -> Observed {
    let namespace = account.namespace().unwrap_or_default();
    let (deployments, releases) = if account.spec.worker_release_selector.is_none() {
        let key = account_key(&namespace, &account.name_any());
        (caches.deployments.find(&key), caches.releases.find(&key))
    } else {
        (caches.deployments.in_namespace(&namespace), caches.releases.in_namespace(&namespace))
    };
    let existing = caches.bundles.get(&namespace, &plan::bundle_name(account));
    Observed { deployments, releases, existing }
}

pub async fn reconcile(account: Arc<WorkerAccount>, ctx: Arc<Context>) -> Result<Action, Error> {
    if account.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = account.namespace().unwrap_or_default();
    let client = ctx.client.clone();
    let accounts: Api<WorkerAccount> = Api::namespaced(client.clone(), &namespace);
    let bundles: Api<WorkerBundle> = Api::namespaced(client.clone(), &namespace);

    // Observe, from the caches.
    let Observed { deployments, releases, existing } = observe(&account, &ctx.caches);

    // Plan.
    let plan = plan::plan(&account, &deployments, &releases, existing.as_deref(), Timestamp::now());

    // Apply (unless releases being built alongside should land in the same image).
    let mut requeue = RESYNC;
    match &plan.bundle {
        BundlePlan::Apply(bundle) => {
            let unchanged = existing.as_ref().is_some_and(|e| {
                e.spec == bundle.spec && bundle.labels().iter().all(|(k, v)| e.labels().get(k) == Some(v))
            });
            if let Some(wait) = plan.hold.filter(|_| !unchanged) {
                debug!(?wait, "bundle change held for releases still being built");
                requeue = wait;
            } else if !unchanged {
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
    Ok(Action::requeue(requeue))
}

/// The accounts whose bundle a change of `object` (a WorkerDeployment or WorkerRelease) may change:
/// the account its label names, and those of its namespace with a selector of their own.
///
/// An object relabelled from one account to another wakes the new account at once and the old
/// one at its next resync.
pub fn accounts_of<K: Resource>(
    accounts: &Cache<WorkerAccount>,
    object: &K,
) -> Vec<ObjectRef<WorkerAccount>> {
    let namespace = object.meta().namespace.clone().unwrap_or_default();
    let labelled = object.labels().get(ACCOUNT_LABEL).map(|a| accounts.find(&account_key(&namespace, a)));
    let custom = accounts
        .find(&custom_selector_key(&namespace))
        .into_iter()
        .filter(|a| plan::selects(&plan::selector(a), object.labels()));
    labelled.into_iter().flatten().chain(custom).map(|a| ObjectRef::from_obj(&*a)).collect()
}
