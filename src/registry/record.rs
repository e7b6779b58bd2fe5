//! Recording the requests a process sends to registries, for benchmarks: with
//! `WORKERBUNDLE_RECORD_REQUESTS=FILE`, each request (method, URL, the headers we set, body) and
//! the upload Location it was answered with are appended to FILE as one JSON line, so that
//! `scripts/replay-requests` can replay exactly that push to measure the registry's own floor.
//! Off (and free) unless the variable is set.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Mutex;

use base64::Engine as _;
use reqwest::header::HeaderMap;
use serde_json::json;

pub const RECORD_ENV: &str = "WORKERBUNDLE_RECORD_REQUESTS";

pub struct Recorder {
    file: Mutex<File>,
}

impl Recorder {
    /// The recorder the environment asks for, if any. A file that cannot be opened is reported
    /// once and recording is off: it is a benchmark aid, never a reason for a push to fail.
    pub fn from_env() -> Option<Recorder> {
        let path = std::env::var_os(RECORD_ENV)?;
        match OpenOptions::new().create(true).append(true).open(&path) {
            Ok(file) => Some(Recorder { file: Mutex::new(file) }),
            Err(e) => {
                tracing::warn!(path = %std::path::Path::new(&path).display(), error = %e, "cannot record requests");
                None
            }
        }
    }

    pub fn record(&self, method: &str, url: &str, headers: &HeaderMap, body: &[u8], location: Option<&str>) {
        let headers: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), json!(v.to_str().ok()?))))
            .collect();
        let line = json!({
            "method": method,
            "url": url,
            "headers": headers,
            "body_b64": base64::engine::general_purpose::STANDARD.encode(body),
            "location": location,
        });
        if let Ok(mut file) = self.file.lock() {
            let _ = writeln!(file, "{line}");
        }
    }
}
