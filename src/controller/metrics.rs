//! What the controller counts, in the Prometheus text format on `/metrics`: reconciles and their
//! failures by kind and reason, how long layer builds and registry pushes take, what was sent to
//! registries, and how much work is waiting per kind.
//!
//! Every reconcile records through `ctx.metrics`; the registry traffic is read from the registry
//! clients when scraped (they count every request they send, see `registry/client.rs`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::registry::RegistryTraffic;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabel {
    registry: String,
}

/// The controller's metrics; one per process, shared through the reconcile `Context`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    build_seconds: Histogram,
    push_seconds: Histogram,
    registry_requests: Family<RegistryLabel, Counter>,
    registry_bytes: Family<RegistryLabel, Counter>,
    queue_depth: Family<KindLabel, Gauge>,
    /// Reconciles running now, per kind (one part of the queue depth).
    running: Mutex<BTreeMap<String, i64>>,
    /// Serializes scrapes, which bring the registry counters up to date.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("workerbundle"),
            reconciles: Family::default(),
            errors: Family::default(),
            // 10 ms .. ~80 s: a tiny worker's layer takes milliseconds, a large one or a slow
            // registry seconds.
            build_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            push_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            registry_requests: Family::default(),
            registry_bytes: Family::default(),
            queue_depth: Family::default(),
            running: Mutex::default(),
            scrape: Mutex::new(()),
        };
        let r = &mut metrics.registry;
        r.register("reconciles", "Reconciles run, by kind", metrics.reconciles.clone());
        r.register(
            "reconcile_errors",
            "Reconciles that failed, by kind and reason (the reason of the object's condition)",
            metrics.errors.clone(),
        );
        r.register("build_duration_seconds", "Time to build one layer", metrics.build_seconds.clone());
        r.register(
            "push_duration_seconds",
            "Time to push one layer (or image) to its registry",
            metrics.push_seconds.clone(),
        );
        r.register(
            "registry_requests",
            "HTTP requests sent to registries, retries and token requests included",
            metrics.registry_requests.clone(),
        );
        r.register(
            "registry_sent_bytes",
            "Request body bytes sent to registries (blobs, chunks, manifests)",
            metrics.registry_bytes.clone(),
        );
        r.register(
            "queue_depth",
            "Objects of a kind with work pending: reconciles running now plus objects waiting out a \
             retry delay after a failure. Objects whose watch event waits for a free reconcile slot \
             are not visible through kube-runtime and are not counted.",
            metrics.queue_depth.clone(),
        );
        metrics
    }

    /// One reconcile of `kind` ran (whatever its outcome).
    pub fn reconciled(&self, kind: &str) {
        self.reconciles.get_or_create(&KindLabel { kind: kind.to_owned() }).inc();
    }

    /// A reconcile of `kind` failed with `reason` (`Error::reason()`).
    pub fn error(&self, kind: &str, reason: &str) {
        self.errors.get_or_create(&ErrorLabels { kind: kind.to_owned(), reason: reason.to_owned() }).inc();
    }

    pub fn observe_build(&self, took: Duration) {
        self.build_seconds.observe(took.as_secs_f64());
    }

    pub fn observe_push(&self, took: Duration) {
        self.push_seconds.observe(took.as_secs_f64());
    }

    /// Marks a reconcile of `kind` as running until the guard is dropped.
    pub fn running(&self, kind: &str) -> Running<'_> {
        self.add_running(kind, 1);
        Running { metrics: self, kind: kind.to_owned() }
    }

    fn add_running(&self, kind: &str, delta: i64) {
        if let Ok(mut running) = self.running.lock() {
            *running.entry(kind.to_owned()).or_default() += delta;
        }
    }

    /// The metrics in the OpenMetrics text format (which Prometheus scrapes), brought up to date
    /// with what only exists at scrape time: the registry clients' totals and the objects waiting
    /// out a retry delay, per kind.
    pub fn encode(
        &self,
        traffic: Vec<RegistryTraffic>,
        waiting: BTreeMap<String, usize>,
    ) -> Result<String, std::fmt::Error> {
        let _one_at_a_time = self.scrape.lock().map_err(|_| std::fmt::Error)?;
        for traffic in traffic {
            let label = RegistryLabel { registry: traffic.registry };
            catch_up(&self.registry_requests.get_or_create(&label), traffic.requests);
            catch_up(&self.registry_bytes.get_or_create(&label), traffic.bytes_sent);
        }
        let mut depth = self.running.lock().map(|r| r.clone()).unwrap_or_default();
        for (kind, waiting) in waiting {
            *depth.entry(kind).or_default() += i64::try_from(waiting).unwrap_or(i64::MAX);
        }
        for (kind, n) in depth {
            self.queue_depth.get_or_create(&KindLabel { kind }).set(n);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Raises a counter to a total kept elsewhere (registry clients count for themselves and only
/// ever count up).
fn catch_up(counter: &Counter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

/// A running reconcile; counted in the queue depth until dropped.
pub struct Running<'a> {
    metrics: &'a Metrics,
    kind: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.metrics.add_running(&self.kind, -1);
    }
}

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counts_by_kind_and_reason_and_catches_up_with_registry_totals() {
        let metrics = Metrics::new();
        metrics.reconciled("WorkerRelease");
        metrics.reconciled("WorkerRelease");
        metrics.error("WorkerRelease", "SourceUnavailable");
        metrics.observe_build(Duration::from_millis(30));
        let running = metrics.running("WorkerDeployment");
        let traffic = |requests, bytes_sent| {
            vec![RegistryTraffic { registry: "127.0.0.1:5000".into(), requests, bytes_sent }]
        };
        let waiting = BTreeMap::from([("WorkerRelease".to_owned(), 1)]);
        let text = metrics.encode(traffic(3, 100), waiting.clone()).unwrap();
        assert_eq!(value(&text, r#"workerbundle_reconciles_total{kind="WorkerRelease"}"#), Some(2.0));
        assert_eq!(
            value(
                &text,
                r#"workerbundle_reconcile_errors_total{kind="WorkerRelease",reason="SourceUnavailable"}"#
            ),
            Some(1.0)
        );
        assert_eq!(value(&text, "workerbundle_build_duration_seconds_count"), Some(1.0));
        assert_eq!(value(&text, "workerbundle_push_duration_seconds_count"), Some(0.0));
        assert_eq!(value(&text, r#"workerbundle_queue_depth{kind="WorkerDeployment"}"#), Some(1.0));
        assert_eq!(value(&text, r#"workerbundle_queue_depth{kind="WorkerRelease"}"#), Some(1.0));
        drop(running);

        // The clients' totals grew: the counters follow them, never count twice.
        metrics.encode(traffic(5, 250), BTreeMap::new()).unwrap();
        let text = metrics.encode(traffic(5, 250), BTreeMap::new()).unwrap();
        assert_eq!(
            value(&text, r#"workerbundle_registry_requests_total{registry="127.0.0.1:5000"}"#),
            Some(5.0)
        );
        assert_eq!(
            value(&text, r#"workerbundle_registry_sent_bytes_total{registry="127.0.0.1:5000"}"#),
            Some(250.0)
        );
        assert_eq!(value(&text, r#"workerbundle_queue_depth{kind="WorkerDeployment"}"#), Some(0.0));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
