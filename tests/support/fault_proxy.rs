//! A fault-injecting HTTP proxy on 127.0.0.1, for tests only: one request per connection; about
//! `fault_percent` of requests meet a fault instead of a plain answer. The faults take turns, so
//! that a run with a handful of them meets each kind:
//! - `reset`: the connection is closed before the request reaches upstream;
//! - `500`, `503`: an error status, the request never reaching upstream;
//! - `429`: too many requests, with `Retry-After: 1`;
//! - `slow`: the request reaches upstream, its answer is held back for [`SLOW`];
//! - `cut`: the request reaches upstream (and takes effect there), its answer is cut off halfway
//!   through the body (halfway through the head when there is no body).
//!
//! Which requests meet a fault is decided before forwarding, from a fixed seed. Faults are
//! transient: the same request (method and path) meets at most [`IN_A_ROW`] in a row, so a
//! client that retries enough always gets through, and a failure means it did not retry (at 30%
//! independent faults, 5 attempts of some request among a hundred all fail one run in five).
//!
//! The proxy can also play a dependency that is down the hard way ([`FaultProxy::set_down`]):
//! every connection is closed at once, and counted, which is what shows whether a client backs
//! off or spins.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const KINDS: [&str; 6] = ["reset", "500", "503", "429", "slow", "cut"];
pub const SLOW: Duration = Duration::from_millis(1500);
pub const IN_A_ROW: u32 = 2;

pub struct FaultProxy {
    pub port: u16,
    pub faults: Arc<AtomicU64>,
    pub forwarded: Arc<AtomicU64>,
    /// The request line of every request received (`GET /path HTTP/1.1`).
    pub seen: Arc<Mutex<Vec<String>>>,
    /// Each fault injected: its kind and the request line it met.
    pub injected: Arc<Mutex<Vec<(&'static str, String)>>>,
    /// Connections closed at once while down.
    pub refused: Arc<AtomicU64>,
    percent: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

struct Shared {
    upstream: u16,
    percent: Arc<AtomicU64>,
    faults: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<String>>>,
    injected: Arc<Mutex<Vec<(&'static str, String)>>>,
    /// Faults each request line has met in a row.
    streaks: Mutex<std::collections::HashMap<String, u32>>,
}

impl FaultProxy {
    pub fn start(upstream: u16, fault_percent: u64, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            upstream,
            percent: Arc::new(AtomicU64::new(fault_percent)),
            faults: Arc::new(AtomicU64::new(0)),
            forwarded: Arc::new(AtomicU64::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
            injected: Arc::new(Mutex::new(Vec::new())),
            streaks: Mutex::new(std::collections::HashMap::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let rng = AtomicU64::new(seed | 1);
        let (st, sh, dn, rf) = (stop.clone(), shared.clone(), down.clone(), refused.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                if dn.load(Ordering::Relaxed) {
                    rf.fetch_add(1, Ordering::Relaxed);
                    drop(stream);
                    continue;
                }
                let roll = next(&rng) % 100;
                let sh = sh.clone();
                std::thread::spawn(move || {
                    let _ = handle(stream, roll, &sh);
                });
            }
        });
        FaultProxy {
            port,
            faults: shared.faults.clone(),
            forwarded: shared.forwarded.clone(),
            seen: shared.seen.clone(),
            injected: shared.injected.clone(),
            percent: shared.percent.clone(),
            refused,
            down,
            stop,
        }
    }

    /// Down: every connection is closed at once (and counted in `refused`); up: back to normal.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// Faults from now on for about `percent` of requests.
    pub fn set_fault_percent(&self, percent: u64) {
        self.percent.store(percent, Ordering::Relaxed);
    }

    /// `reset 2, 500 1, ...`: the faults injected so far, by kind.
    pub fn summary(&self) -> String {
        let counts = self.counts();
        KINDS
            .iter()
            .map(|k| format!("{k} {}", counts.get(k).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = BTreeMap::new();
        for (kind, _) in self.injected.lock().unwrap().iter() {
            *counts.entry(*kind).or_default() += 1;
        }
        counts
    }

    /// The kinds of fault not injected yet.
    pub fn missing_kinds(&self) -> Vec<&'static str> {
        let counts = self.counts();
        KINDS.iter().copied().filter(|k| !counts.contains_key(k)).collect()
    }

    /// Whether a fault of `kind` met a request whose line satisfies `request`.
    pub fn met(&self, kind: &str, request: impl Fn(&str) -> bool) -> bool {
        self.injected.lock().unwrap().iter().any(|(k, line)| *k == kind && request(line))
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn next(state: &AtomicU64) -> u64 {
    let mut x = state.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    state.store(x, Ordering::Relaxed);
    x
}

fn handle(client: TcpStream, roll: u64, shared: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("connection:") {
            continue;
        }
        if head.is_empty() {
            if let Ok(mut seen) = shared.seen.lock() {
                seen.push(line.trim_end().to_owned());
            }
        }
        if line == "\r\n" {
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            break;
        }
        head.extend_from_slice(line.as_bytes());
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;
    let mut client = client;
    let line = String::from_utf8_lossy(head.split(|b| *b == b'\r').next().unwrap_or_default()).into_owned();
    let faulted = roll < shared.percent.load(Ordering::Relaxed) && {
        let mut streaks = shared.streaks.lock().unwrap();
        let streak = streaks.entry(line.clone()).or_default();
        *streak = if *streak < IN_A_ROW { *streak + 1 } else { 0 };
        *streak > 0
    };
    if !faulted {
        shared.streaks.lock().unwrap().remove(&line);
    }
    let fault = faulted.then(|| {
        let n = shared.faults.fetch_add(1, Ordering::Relaxed);
        let kind = KINDS[(n % KINDS.len() as u64) as usize];
        shared.injected.lock().unwrap().push((kind, line.clone()));
        kind
    });
    let status = |code: &str, extra: &str| {
        format!("HTTP/1.1 {code}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n")
    };
    match fault {
        Some("reset") => return client.shutdown(Shutdown::Both),
        Some("500") => client.write_all(status("500 Internal Server Error", "").as_bytes())?,
        Some("503") => client.write_all(status("503 Service Unavailable", "").as_bytes())?,
        Some("429") => client.write_all(status("429 Too Many Requests", "Retry-After: 1\r\n").as_bytes())?,
        _ => {
            shared.forwarded.fetch_add(1, Ordering::Relaxed);
            let mut up = TcpStream::connect(("127.0.0.1", shared.upstream))?;
            up.write_all(&head)?;
            up.write_all(&body)?;
            let mut response = Vec::new();
            up.read_to_end(&mut response)?;
            match fault {
                Some("slow") => {
                    std::thread::sleep(SLOW);
                    client.write_all(&response)?;
                }
                Some("cut") => client.write_all(&response[..cut_point(&response)])?,
                _ => client.write_all(&response)?,
            }
        }
    }
    client.shutdown(Shutdown::Both)
}

/// Halfway through the body, or halfway through the head when there is no body.
fn cut_point(response: &[u8]) -> usize {
    match response.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) if response.len() > end + 4 => end + 4 + (response.len() - end - 4) / 2,
        Some(end) => end / 2,
        None => response.len() / 2,
    }
}
