//! A fault-injecting HTTP proxy on 127.0.0.1, for tests only: one request per connection; about
//! `fault_percent` of requests get a connection reset, a 500 or a 429 instead of reaching the
//! registry. Faults are decided before forwarding, from a fixed seed, so runs are repeatable.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub struct FaultProxy {
    pub port: u16,
    pub faults: Arc<AtomicU64>,
    pub forwarded: Arc<AtomicU64>,
    /// The request line of every request received (`GET /path HTTP/1.1`).
    pub seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(upstream: u16, fault_percent: u64, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let rng = Arc::new(AtomicU64::new(seed | 1));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (f, fw, st, sn) = (faults.clone(), forwarded.clone(), stop.clone(), seen.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let roll = next(&rng) % 100;
                let (f, fw, sn) = (f.clone(), fw.clone(), sn.clone());
                std::thread::spawn(move || {
                    let _ = handle(stream, upstream, roll, fault_percent, &f, &fw, &sn);
                });
            }
        });
        FaultProxy { port, faults, forwarded, seen, stop }
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

fn handle(
    client: TcpStream,
    upstream: u16,
    roll: u64,
    percent: u64,
    faults: &AtomicU64,
    forwarded: &AtomicU64,
    seen: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
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
            if let Ok(mut seen) = seen.lock() {
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
    if roll < percent {
        faults.fetch_add(1, Ordering::Relaxed);
        match roll % 3 {
            0 => return client.shutdown(Shutdown::Both),
            1 => client.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?,
            _ => client.write_all(
                b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?,
        }
        return client.shutdown(Shutdown::Both);
    }
    forwarded.fetch_add(1, Ordering::Relaxed);
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    up.write_all(&head)?;
    up.write_all(&body)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    client.write_all(&response)?;
    client.shutdown(Shutdown::Both)
}
