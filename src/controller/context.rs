//! What every reconcile shares: the API client, the Event recorder, the builder's clients (kept
//! for the process's life so pushes and downloads are remembered), settings, retry state and
//! metrics.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use tracing::warn;

use super::backoff::Backoff;
use super::metrics::Metrics;
use crate::image::build::BuildContext;

/// Controller settings from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `registry/path`: an account's repository is `<prefix>/<account>` unless its WorkerAccount
    /// names one.
    pub repository_prefix: Option<String>,
    /// mtime of every file in the layers built.
    pub source_date_epoch: i64,
}

pub struct Context {
    pub client: Client,
    pub build: BuildContext,
    pub settings: Settings,
    pub backoff: Backoff,
    /// What every reconcile records (served on `/metrics`).
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
}

impl Context {
    pub fn new(client: Client, build: BuildContext, settings: Settings) -> Self {
        let reporter = Reporter {
            controller: "workerbundle-controller".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            build,
            settings,
            backoff: Backoff::new(Duration::from_secs(2), Duration::from_secs(300)),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Publishes an Event about `object`; a failure to publish is logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            warn!(error = %e, reason, "cannot publish an Event");
        }
    }
}
