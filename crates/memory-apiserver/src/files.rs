//! Files that hold secrets (the objects, Secrets included, and kubeconfigs with a token): written
//! whole, readable by their owner only, and durable once the call returns, so that a crash a moment
//! later leaves either the old file or the new one, never a torn or lost one.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Owner read and write only.
pub const PRIVATE: u32 = 0o600;

/// The temporary file `write_private` writes before renaming it over `path`.
pub fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes`: a private temporary file beside it, fsynced, renamed over it, and
/// the directory fsynced so that the rename itself survives a crash.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temporary(path);
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(PRIVATE).open(&tmp)?;
    // `mode` applies only when the file is created; a temporary file left by an older version
    // may be wider.
    file.set_permissions(std::fs::Permissions::from_mode(PRIVATE))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// fsyncs the directory holding `path`, which makes a rename or creation in it durable.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Narrows an existing file to owner-only access (a data file an older version wrote 0644).
pub fn make_private(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE))
}
