//! Publishing Events, one kube-runtime `Recorder` per involved object.
//!
//! A `Recorder` keeps every Event it published in the last six minutes (to count repeats as one
//! series) and sweeps that whole cache, under one lock, on every publish. Shared by the whole
//! controller that is quadratic: at 1,000 accounts (8,000 Events) each publish walked thousands of
//! entries while the other reconciles queued behind the lock. With one recorder per object, its
//! cache holds that object's few Events and repeats still become series exactly as kube makes
//! them; recorders idle for longer than kube's cache lifetime are dropped now and then.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;

/// kube-runtime forgets an Event six minutes after it was last seen; so does a recorder here.
const IDLE: Duration = Duration::from_secs(6 * 60);
/// The fewest recorders kept before idle ones are looked for.
const SWEEP_FROM: usize = 1024;

pub struct Recorders {
    client: Client,
    reporter: Reporter,
    by_object: Mutex<ByObject>,
}

#[derive(Default)]
struct ByObject {
    recorders: HashMap<String, (Recorder, Instant)>,
    /// The size at which idle recorders are next swept (twice what was left after the last
    /// sweep), so that sweeping costs a constant amount per publish.
    sweep_at: usize,
}

impl Recorders {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Recorders { client, reporter, by_object: Mutex::default() }
    }

    /// The recorder of the object `reference` names.
    pub fn recorder(&self, reference: &ObjectReference) -> Recorder {
        let key = match &reference.uid {
            Some(uid) => uid.clone(),
            None => format!(
                "{}/{}/{}",
                reference.kind.as_deref().unwrap_or_default(),
                reference.namespace.as_deref().unwrap_or_default(),
                reference.name.as_deref().unwrap_or_default()
            ),
        };
        let now = Instant::now();
        let mut by_object = self.by_object.lock().unwrap_or_else(|p| p.into_inner());
        if by_object.recorders.len() >= by_object.sweep_at.max(SWEEP_FROM) {
            by_object.recorders.retain(|_, (_, used)| now.duration_since(*used) < IDLE);
            by_object.sweep_at = 2 * by_object.recorders.len();
        }
        let (recorder, used) = by_object
            .recorders
            .entry(key)
            .or_insert_with(|| (Recorder::new(self.client.clone(), self.reporter.clone()), now));
        *used = now;
        recorder.clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_object.lock().map(|b| b.recorders.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(uid: &str) -> ObjectReference {
        ObjectReference { uid: Some(uid.into()), name: Some(uid.into()), ..Default::default() }
    }

    #[tokio::test]
    async fn one_recorder_per_object_and_idle_ones_are_swept() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let recorders = Recorders::new(client, Reporter { controller: "test".into(), instance: None });
        for i in 0..SWEEP_FROM {
            recorders.recorder(&reference(&format!("uid-{i}")));
        }
        recorders.recorder(&reference("uid-0"));
        assert_eq!(recorders.len(), SWEEP_FROM, "the same object, the same recorder");
        // Everything idle for longer than kube's cache lifetime goes at a sweep.
        {
            let mut by_object = recorders.by_object.lock().unwrap();
            let long_ago = Instant::now() - IDLE - Duration::from_secs(1);
            for (_, used) in by_object.recorders.values_mut() {
                *used = long_ago;
            }
        }
        // Sweeps come when the count doubles since the last one: the idle go, the recent stay.
        for i in 0..=SWEEP_FROM {
            recorders.recorder(&reference(&format!("new-{i}")));
        }
        assert_eq!(recorders.len(), SWEEP_FROM + 1);
    }
}
