//! Recording the requests a process sends to registries, for benchmarks: with
//! `WORKERBUNDLE_RECORD_REQUESTS=FILE`, each request (method, URL, the headers we set, body) and
//! the upload Location it was answered with are appended to FILE as one JSON line, so that
//! `scripts/replay-requests` can replay exactly that push to measure the registry's own floor.
//! Off (and free) unless the variable is set.
//!
//! Recording must not cost the push it records: base64 and JSON escaping of a 1 MiB layer took
//! ~2.5 ms, inside the very time `scripts/bench-controller-push` measures. So a request only
//! queues its parts (the body is a reference-counted `Bytes`), and one writer thread per process
//! encodes and appends them, each line in one write so that lines never interleave.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::HeaderMap;
use serde_json::json;

pub const RECORD_ENV: &str = "WORKERBUNDLE_RECORD_REQUESTS";

struct Request {
    method: String,
    url: String,
    headers: HeaderMap,
    body: Bytes,
    location: Option<String>,
}

struct Recorder {
    queue: Mutex<Option<Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// The process's recorder, if the environment asks for one. A file that cannot be opened is
/// reported once and recording is off: it is a benchmark aid, never a reason for a push to fail.
fn recorder() -> Option<&'static Recorder> {
    static RECORDER: OnceLock<Option<Recorder>> = OnceLock::new();
    RECORDER
        .get_or_init(|| {
            let path = std::env::var_os(RECORD_ENV)?;
            let file = match OpenOptions::new().create(true).append(true).open(&path) {
                Ok(file) => file,
                Err(e) => {
                    tracing::warn!(path = %std::path::Path::new(&path).display(), error = %e, "cannot record requests");
                    return None;
                }
            };
            let (queue, requests) = mpsc::channel();
            let writer = std::thread::Builder::new()
                .name("record-requests".into())
                .spawn(move || write_all(file, requests))
                .map_err(|e| tracing::warn!(error = %e, "cannot record requests"))
                .ok()?;
            Some(Recorder { queue: Mutex::new(Some(queue)), writer: Mutex::new(Some(writer)) })
        })
        .as_ref()
}

/// Whether requests are being recorded (so that callers skip even the queueing otherwise).
pub fn enabled() -> bool {
    recorder().is_some()
}

/// Queues one answered request for the writer.
pub fn record(method: &str, url: &str, headers: &HeaderMap, body: Bytes, location: Option<&str>) {
    let Some(recorder) = recorder() else { return };
    let request = Request {
        method: method.to_owned(),
        url: url.to_owned(),
        headers: headers.clone(),
        body,
        location: location.map(str::to_owned),
    };
    if let Ok(queue) = recorder.queue.lock() {
        if let Some(queue) = queue.as_ref() {
            let _ = queue.send(request);
        }
    }
}

/// Writes what is still queued and stops recording; called once, before the process exits.
pub fn finish() {
    let Some(recorder) = recorder() else { return };
    if let Ok(mut queue) = recorder.queue.lock() {
        queue.take();
    }
    let writer = recorder.writer.lock().ok().and_then(|mut w| w.take());
    if let Some(writer) = writer {
        let _ = writer.join();
    }
}

fn write_all(mut file: File, requests: mpsc::Receiver<Request>) {
    for request in requests {
        let headers: serde_json::Map<String, serde_json::Value> = request
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), json!(v.to_str().ok()?))))
            .collect();
        let mut line = json!({
            "method": request.method,
            "url": request.url,
            "headers": headers,
            "body_b64": base64::engine::general_purpose::STANDARD.encode(&request.body),
            "location": request.location,
        })
        .to_string();
        line.push('\n');
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "cannot record requests; recording stops");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_becomes_one_line_with_its_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.jsonl");
        let file = OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let (queue, requests) = mpsc::channel();
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/octet-stream".parse().unwrap());
        let body: Bytes = (0..=255u8).cycle().take(100_000).collect::<Vec<_>>().into();
        queue
            .send(Request {
                method: "POST".into(),
                url: "http://127.0.0.1:5000/v2/a/blobs/uploads/".into(),
                headers: HeaderMap::new(),
                body: Bytes::new(),
                location: Some("/v2/a/blobs/uploads/u1".into()),
            })
            .unwrap();
        queue
            .send(Request {
                method: "PUT".into(),
                url: "http://127.0.0.1:5000/v2/a/blobs/uploads/u1?digest=sha256:00".into(),
                headers,
                body: body.clone(),
                location: None,
            })
            .unwrap();
        drop(queue);
        write_all(file, requests);

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["method"], "POST");
        assert_eq!(lines[0]["location"], "/v2/a/blobs/uploads/u1");
        assert_eq!(lines[1]["headers"]["content-type"], "application/octet-stream");
        let decoded =
            base64::engine::general_purpose::STANDARD.decode(lines[1]["body_b64"].as_str().unwrap()).unwrap();
        assert_eq!(decoded, body);
    }
}
