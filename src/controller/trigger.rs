//! What wakes a controller for its own kind: a change to an object beyond its status.
//!
//! Every status write a reconcile makes comes back on the watch as a change of the same object;
//! passed on, it wakes the same controller to find nothing to do. At 1,000 accounts that was
//! more than half of all reconciles. An object is passed on when it is new to the stream, or
//! when anything a reconcile acts on changed: the spec (its generation), the deletion timestamp,
//! finalizers, labels, annotations or owners. Related kinds (owned objects, releases an account
//! selects) still wake controllers on every change, status included: their status is input.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use futures::{future, Stream, StreamExt};
use kube::Resource;

/// Passes each object on unless only its status (or resourceVersion) changed since it last went by.
pub fn beyond_status<K, S>(objects: S) -> impl Stream<Item = Arc<K>> + Send + 'static
where
    K: Resource + Send + Sync + 'static,
    S: Stream<Item = Arc<K>> + Send + 'static,
{
    let mut last: HashMap<String, u64> = HashMap::new();
    objects.filter(move |object| {
        let meta = object.meta();
        let key = match &meta.uid {
            Some(uid) => uid.clone(),
            None => format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default()
            ),
        };
        let print = fingerprint(meta);
        future::ready(last.insert(key, print) != Some(print))
    })
}

fn fingerprint(meta: &kube::api::ObjectMeta) -> u64 {
    let mut hasher = DefaultHasher::new();
    meta.generation.hash(&mut hasher);
    meta.deletion_timestamp.as_ref().map(|t| t.0.as_second()).hash(&mut hasher);
    meta.finalizers.hash(&mut hasher);
    meta.labels.hash(&mut hasher);
    meta.annotations.hash(&mut hasher);
    for owner in meta.owner_references.iter().flatten() {
        (&owner.uid, &owner.kind, &owner.name, owner.controller).hash(&mut hasher);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{WorkerRelease, WorkerReleaseSpec, WorkerReleaseStatus};

    fn release(generation: i64, phase_ready: bool) -> Arc<WorkerRelease> {
        let mut r = WorkerRelease::new("r", WorkerReleaseSpec { template: Default::default() });
        r.metadata.uid = Some("uid-1".into());
        r.metadata.generation = Some(generation);
        if phase_ready {
            r.status =
                Some(WorkerReleaseStatus { phase: crate::crd::ReleasePhase::Ready, ..Default::default() });
        }
        Arc::new(r)
    }

    #[tokio::test]
    async fn status_only_changes_are_dropped_and_the_rest_pass() {
        let mut finalized = (*release(2, true)).clone();
        finalized.metadata.finalizers = Some(vec!["workerbundle.dev/cleanup".into()]);
        let mut deleting = finalized.clone();
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(9).unwrap(),
        ));
        let mut other = (*release(1, false)).clone();
        other.metadata.uid = Some("uid-2".into());
        let input = vec![
            release(1, false),   // new: passes
            release(1, true),    // its status changed: dropped
            release(2, true),    // its spec changed: passes
            Arc::new(finalized), // a finalizer: passes
            Arc::new(deleting),  // being deleted: passes
            Arc::new(other),     // another object: passes
        ];
        let passed: Vec<_> = beyond_status(futures::stream::iter(input)).collect().await;
        let generations: Vec<_> = passed.iter().map(|r| r.metadata.generation).collect();
        assert_eq!(generations, [Some(1), Some(2), Some(2), Some(2), Some(1)]);
    }
}
