//! The host ports of the workers `workerbundle dev` serves. Each worker (`account/worker`) keeps
//! its port for good, across redeploys and restarts of dev (recorded in `DATA/ports.json`), so
//! its URL never changes; new workers take the lowest free port of `--worker-ports`. A port held
//! by another process is never silently replaced by a random one: a recorded port that is busy
//! stops dev at start, naming it; a busy port of the range is skipped with a warning naming it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::image::layout::write_atomically;

/// `--worker-ports FIRST-LAST`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const DEFAULT: PortRange = PortRange { first: 8080, last: 8179 };

    /// `FIRST-LAST` (or one port).
    pub fn parse(text: &str) -> Result<PortRange, String> {
        let (first, last) = text.split_once('-').unwrap_or((text, text));
        let port = |t: &str| t.trim().parse::<u16>().ok().filter(|p| *p != 0);
        match (port(first), port(last)) {
            (Some(first), Some(last)) if first <= last => Ok(PortRange { first, last }),
            _ => Err(format!("{text:?} is not a port range: give FIRST-LAST, e.g. 8080-8179")),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Binds a worker's port on loopback, where dev serves everything.
pub fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", port))
}

/// Which port each worker has, by `account/worker`.
#[derive(Debug)]
pub struct PortTable {
    path: PathBuf,
    range: PortRange,
    ports: BTreeMap<String, u16>,
}

impl PortTable {
    /// The table kept at `path` (none yet: empty).
    pub fn load(path: &Path, range: PortRange) -> Result<PortTable, String> {
        let ports = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!("{} is not a port table ({e}); remove it to start afresh", path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(PortTable { path: path.to_path_buf(), range, ports })
    }

    pub fn get(&self, worker: &str) -> Option<u16> {
        self.ports.get(worker).copied()
    }

    /// Every worker's port, bound now: what dev holds before anything starts. A busy one is an
    /// error that names it.
    pub fn bind_all(&self) -> Result<BTreeMap<String, TcpListener>, String> {
        self.ports
            .iter()
            .map(|(worker, port)| {
                let listener = bind(*port).map_err(|e| {
                    format!(
                        "port {port} of worker {worker} (kept in {}) cannot be bound: {e}; stop what holds it",
                        self.path.display()
                    )
                })?;
                Ok((worker.clone(), listener))
            })
            .collect()
    }

    /// A port for a worker that has none: the lowest of the range that no worker has and that
    /// can be bound now. Recorded before it is returned.
    pub fn assign(&mut self, worker: &str) -> Result<(u16, TcpListener), String> {
        for port in self.range.first..=self.range.last {
            if self.ports.values().any(|p| *p == port) {
                continue;
            }
            match bind(port) {
                Ok(listener) => {
                    self.ports.insert(worker.to_owned(), port);
                    self.save()?;
                    return Ok((port, listener));
                }
                Err(e) => {
                    warn!(port, %worker, error = %e, range = %self.range, "port of --worker-ports in use by another process: skipped")
                }
            }
        }
        Err(format!("no free port left in --worker-ports {} for worker {worker}", self.range))
    }

    fn save(&self) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(&self.ports).map_err(|e| e.to_string())?;
        write_atomically(&self.path, &bytes).map_err(|e| format!("cannot write {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_nonsense() {
        assert_eq!(PortRange::parse("8080-8179").unwrap(), PortRange { first: 8080, last: 8179 });
        assert_eq!(PortRange::parse("9000").unwrap(), PortRange { first: 9000, last: 9000 });
        for bad in ["", "0-10", "9-8", "a-b", "8080-", "70000-70001"] {
            assert!(PortRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_busy_port_is_skipped_and_assignments_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let busy = bind(0).unwrap();
        let first = busy.local_addr().unwrap().port();
        let range = PortRange { first, last: first.saturating_add(20) };
        let path = dir.path().join("ports.json");
        let mut table = PortTable::load(&path, range).unwrap();
        let (port, listener) = table.assign("acct/a").unwrap();
        assert!(port > first, "the busy port {first} was handed out");
        drop(listener);
        let reloaded = PortTable::load(&path, range).unwrap();
        assert_eq!(reloaded.get("acct/a"), Some(port));
        drop(busy);
        let held = bind(port).unwrap();
        let error = reloaded.bind_all().unwrap_err();
        assert!(error.contains(&format!("port {port} of worker acct/a")), "{error}");
        drop(held);
        assert!(reloaded.bind_all().unwrap().contains_key("acct/a"));
    }
}
