//! Watch streams: newline-delimited JSON events, one chunk per event, from a resourceVersion out of
//! the bounded history (an ERROR event with a 410 Expired Status when it is too old, as the real
//! server sends it inside an HTTP 200 stream), from "now" with ADDED for every current object, or as
//! a streaming list (`sendInitialEvents=true`) closed by the `k8s.io/initial-events-end` bookmark.
//!
//! Approximation: an object that is modified so that it stops (or starts) matching the selectors is
//! not turned into a DELETED (or ADDED) event; it is simply no longer (or now) reported.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use crate::error::ApiError;
use crate::objects::served;
use crate::resource::ResourceDef;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Event, Since, Store};
use crate::table;

pub struct WatchRequest {
    pub def: ResourceDef,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub resource_version: Option<String>,
    pub bookmarks: bool,
    pub send_initial_events: bool,
    pub timeout: Option<Duration>,
    /// `Some(includeObject)` when the client asked for Table rows.
    pub table: Option<String>,
    pub bookmark_interval: Duration,
}

impl WatchRequest {
    fn matches(&self, object: &Value) -> bool {
        let ns_ok =
            self.namespace.as_deref().is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns));
        ns_ok && self.labels.matches(object) && self.fields.matches(object)
    }

    fn line(&self, kind: &str, object: Value) -> Bytes {
        let object = match &self.table {
            Some(include) if kind != "ERROR" && kind != "BOOKMARK" => {
                table::table(&self.def, &[object], None, include)
            }
            _ => object,
        };
        let mut text = json!({"type": kind, "object": object}).to_string();
        text.push('\n');
        Bytes::from(text)
    }

    fn event_line(&self, event: &Event) -> Option<Bytes> {
        if event.key != self.def.storage_key() || !self.matches(&event.object) {
            return None;
        }
        Some(self.line(event.kind.as_str(), served(&self.def, event.object.clone())))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        self.line(
            "BOOKMARK",
            json!({"kind": self.def.kind, "apiVersion": self.def.api_version(), "metadata": metadata}),
        )
    }
}

fn expired(requested: &str, oldest: u64) -> Value {
    ApiError::gone(format!("too old resource version: {requested} ({oldest})")).to_status()
}

/// Starts the watch: the initial events are computed under the store lock together with the
/// subscription, so no change falls between them.
pub fn start(store: &Arc<Mutex<Store>>, request: WatchRequest) -> Result<Body, ApiError> {
    let (initial, floor, receiver) = {
        let guard = store.lock().map_err(|_| ApiError::internal("store lock poisoned"))?;
        let receiver = guard.subscribe();
        let current = guard.current_rv();
        let mut lines = Vec::new();
        let from_now = matches!(request.resource_version.as_deref(), None | Some("") | Some("0"));
        if request.send_initial_events || from_now {
            let key = request.def.storage_key();
            for object in guard.select(&key, request.namespace.as_deref(), &request.labels) {
                if request.matches(&object) {
                    lines.push(request.line("ADDED", served(&request.def, object)));
                }
            }
            if request.send_initial_events {
                lines.push(request.bookmark(current, true));
            }
        } else {
            let requested = request.resource_version.clone().unwrap_or_default();
            let rv: u64 = requested
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {requested:?}")))?;
            match guard.since(rv) {
                Since::TooOld => {
                    let line = request.line("ERROR", expired(&requested, current.saturating_sub(1)));
                    return Ok(Body::from(line));
                }
                Since::Events(events) => lines.extend(events.iter().filter_map(|e| request.event_line(e))),
            }
        }
        (lines, current, receiver)
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(forward(request, initial, floor, receiver, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok::<Bytes, std::convert::Infallible>(chunk), rx))
    });
    Ok(Body::from_stream(stream))
}

async fn forward(
    request: WatchRequest,
    initial: Vec<Bytes>,
    floor: u64,
    mut receiver: broadcast::Receiver<Arc<Event>>,
    tx: mpsc::Sender<Bytes>,
) {
    for line in initial {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    let deadline = request.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last_rv = floor;
    let mut ticker = tokio::time::interval(request.bookmark_interval);
    ticker.tick().await;
    loop {
        let timeout = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let line = tokio::select! {
            _ = timeout => return,
            _ = tx.closed() => return,
            _ = ticker.tick() => {
                if !request.bookmarks { continue; }
                request.bookmark(last_rv, false)
            }
            received = receiver.recv() => match received {
                Ok(event) => {
                    if event.rv <= floor { continue; }
                    last_rv = event.rv;
                    match request.event_line(&event) {
                        Some(line) => line,
                        None => continue,
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let status = ApiError::gone("the watch fell behind and events were dropped").to_status();
                    let _ = tx.send(request.line("ERROR", status)).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if tx.send(line).await.is_err() {
            return;
        }
    }
}
