//! Publishing Events through kube-runtime `Recorder`s, each involved object always through the
//! same one of a fixed set.
//!
//! A `Recorder` keeps every Event it published in the last six minutes (to count repeats as one
//! series) and sweeps that whole cache, under one lock, on every publish. One recorder for the
//! whole controller is quadratic: at 1,000 accounts (8,000 Events) each publish walked thousands
//! of entries while the other reconciles queued behind the lock. Spread over [`SHARDS`]
//! recorders by object, each sweep walks a 64th of that and reconciles rarely meet at a lock;
//! repeats still become series exactly as kube makes them, since an object's Events always go
//! through the same recorder. (One recorder per object cost ~30 MiB at 1,000 accounts: each holds
//! its own client handle.)

use std::hash::{DefaultHasher, Hash, Hasher};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;

const SHARDS: usize = 64;

pub struct Recorders {
    shards: Vec<Recorder>,
}

impl Recorders {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Recorders { shards: (0..SHARDS).map(|_| Recorder::new(client.clone(), reporter.clone())).collect() }
    }

    /// The recorder of the object `reference` names: the same one every time.
    pub fn recorder(&self, reference: &ObjectReference) -> &Recorder {
        &self.shards[shard(reference)]
    }
}

fn shard(reference: &ObjectReference) -> usize {
    let mut hasher = DefaultHasher::new();
    (&reference.uid, &reference.kind, &reference.namespace, &reference.name).hash(&mut hasher);
    (hasher.finish() % SHARDS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(uid: &str) -> ObjectReference {
        ObjectReference { uid: Some(uid.into()), name: Some(uid.into()), ..Default::default() }
    }

    #[test]
    fn an_object_always_gets_the_same_recorder_and_objects_spread_over_all() {
        let first = shard(&reference("uid-1"));
        assert_eq!(shard(&reference("uid-1")), first);
        let used: std::collections::BTreeSet<usize> =
            (0..2000).map(|i| shard(&reference(&format!("uid-{i}")))).collect();
        assert_eq!(used.len(), SHARDS, "2,000 objects reach every recorder");
    }
}
