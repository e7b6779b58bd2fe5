//! One `workerbundle dev` per data directory: a second one on the same `--data` would run a second
//! set of controllers and workerds over the same objects and rewrite `DATA/kubeconfig` to point at
//! itself. The lock is taken before anything else, so the second exits at once, changing nothing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Held while dev runs; the kernel releases it when the process ends, however it ends.
#[derive(Debug)]
pub struct DataLock {
    _file: File,
}

/// Locks `data` (an existing directory) for this process, or says who holds it.
pub fn lock(data: &Path) -> Result<DataLock, String> {
    let path = data.join("lock");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
            return Err(format!(
                "{} is in use by another workerbundle dev{who}: stop it, or give another --data",
                data.display()
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(format!("cannot lock {}: {e}", path.display())),
    }
    // Who holds it, for the message above; the lock, not this text, is what excludes.
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| write!(file, "{}", std::process::id()))
        .and_then(|()| file.flush());
    if let Err(e) = written {
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(DataLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        let refused = lock(dir.path()).unwrap_err();
        assert!(refused.contains(&format!("pid {}", std::process::id())), "{refused}");
        drop(held);
        lock(dir.path()).unwrap();
    }
}
