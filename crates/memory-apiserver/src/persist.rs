//! The objects on disk, so that an answered write survives a crash: a snapshot of the whole store
//! (`PATH`) and a journal of the writes since (`PATH.journal`), one line per write request, appended
//! and fsynced before the request is answered. Appending one write costs far less than rewriting
//! the whole store, whose size grows with every Event; when the journal outgrows the snapshot, the
//! snapshot is rewritten and the journal emptied. Both files hold every Secret: owner-only.
//!
//! A crash can leave a torn last line (its write was never answered): it is dropped at start. A
//! crash between rewriting the snapshot and emptying the journal leaves lines the snapshot already
//! has: each line carries its resourceVersion, and those not newer than the snapshot's are skipped.

use std::fs::File;
use std::io::{BufRead, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::files;
use crate::resource::StorageKey;
use crate::store::{EventType, Store};

/// The journal is never compacted below this size: a small store would otherwise be rewritten
/// every few writes.
const MIN_COMPACTION: u64 = 1 << 20;

pub struct Persist {
    snapshot: PathBuf,
    journal_path: PathBuf,
    journal: File,
    journal_len: u64,
    snapshot_len: u64,
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what}", path.display()))
}

/// `PATH.journal`
pub fn journal_path(snapshot: &Path) -> PathBuf {
    let mut name = snapshot.file_name().unwrap_or_default().to_os_string();
    name.push(".journal");
    snapshot.with_file_name(name)
}

impl Persist {
    /// Loads the snapshot and the journal into `store`, then compacts them: a fresh snapshot, an
    /// empty journal.
    pub fn open(snapshot: &Path, store: &mut Store) -> std::io::Result<Persist> {
        let journal_path = journal_path(snapshot);
        if snapshot.exists() {
            // It holds every Secret: an older version wrote it readable by all.
            files::make_private(snapshot)?;
            let bytes = std::fs::read(snapshot)?;
            let document: Value = serde_json::from_slice(&bytes).map_err(|e| invalid(snapshot, e))?;
            store.restore(&document).map_err(|e| invalid(snapshot, e))?;
        }
        if journal_path.exists() {
            files::make_private(&journal_path)?;
            replay(&journal_path, store)?;
        }
        let journal =
            std::fs::OpenOptions::new().append(true).create(true).mode(files::PRIVATE).open(&journal_path)?;
        journal.set_permissions(std::fs::Permissions::from_mode(files::PRIVATE))?;
        let mut persist = Persist {
            snapshot: snapshot.to_path_buf(),
            journal_path,
            journal,
            journal_len: 0,
            snapshot_len: 0,
        };
        persist.compact(store)?;
        Ok(persist)
    }

    /// Appends the write in progress (the store's held events) to the journal and fsyncs it.
    pub fn record(&mut self, store: &Store) -> std::io::Result<()> {
        let held = store.held();
        if held.is_empty() {
            return Ok(());
        }
        #[derive(serde::Serialize)]
        struct Line<'a> {
            rv: u64,
            changes: Vec<(&'a str, &'a str, &'static str, &'a Value)>,
        }
        let changes = held
            .iter()
            .map(|e| (e.key.group.as_str(), e.key.plural.as_str(), e.kind.as_str(), &e.object))
            .collect();
        let mut line =
            serde_json::to_vec(&Line { rv: store.current_rv(), changes }).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let appended = self.journal.write_all(&line).and_then(|()| self.journal.sync_data());
        if let Err(e) = appended {
            // A partial line would sit before the next ones and make the journal unreadable.
            let _ = self.journal.set_len(self.journal_len);
            return Err(e);
        }
        self.journal_len += line.len() as u64;
        if self.journal_len > self.snapshot_len.max(MIN_COMPACTION) {
            self.compact(store)?;
        }
        Ok(())
    }

    /// Rewrites the snapshot from `store` (fsynced) and then empties the journal.
    fn compact(&mut self, store: &Store) -> std::io::Result<()> {
        let bytes = store.snapshot_bytes().map_err(std::io::Error::other)?;
        files::write_private(&self.snapshot, &bytes)?;
        self.snapshot_len = bytes.len() as u64;
        self.journal.set_len(0)?;
        self.journal.sync_all()?;
        // The journal may be new: its directory entry must survive a crash too.
        files::sync_dir(&self.journal_path)?;
        self.journal_len = 0;
        Ok(())
    }
}

/// Redoes the journal's lines newer than the store; a torn last line is dropped.
fn replay(path: &Path, store: &mut Store) -> std::io::Result<()> {
    let reader = std::io::BufReader::new(File::open(path)?);
    let mut lines = reader.split(b'\n').peekable();
    let mut number = 0usize;
    while let Some(line) = lines.next() {
        let line = line?;
        number += 1;
        let last = lines.peek().is_none();
        let entry: Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(e) if last => {
                tracing::warn!(path = %path.display(), error = %e, "dropping a torn last journal line (a write never answered)");
                break;
            }
            Err(e) => return Err(invalid(path, format!("line {number}: {e}"))),
        };
        let rv = entry["rv"].as_u64().ok_or_else(|| invalid(path, format!("line {number}: no rv")))?;
        if rv <= store.current_rv() {
            continue;
        }
        let changes =
            entry["changes"].as_array().ok_or_else(|| invalid(path, format!("line {number}: no changes")))?;
        for change in changes {
            let (Some(group), Some(plural), Some(kind), Some(object)) = (
                change[0].as_str(),
                change[1].as_str(),
                change[2].as_str().and_then(EventType::parse),
                change.get(3),
            ) else {
                return Err(invalid(path, format!("line {number}: a malformed change")));
            };
            let key = StorageKey { group: group.to_string(), plural: plural.to_string() };
            store.replay(&key, kind, object.clone());
        }
        store.resume_at(rv);
    }
    Ok(())
}
