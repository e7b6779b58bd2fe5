//! Where workerbundle keeps what it can download or compute again: one rule for every cache, the
//! same as base-images/workerd/fetch.py's.

use std::path::PathBuf;

/// `$XDG_CACHE_HOME/workerbundle/NAME`, else `~/.cache/workerbundle/NAME` (an empty variable counts
/// as unset); none without a home.
pub fn workerbundle_cache(name: &str) -> Option<PathBuf> {
    let set = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
    let root = set("XDG_CACHE_HOME").or_else(|| set("HOME").map(|home| home.join(".cache")))?;
    Some(root.join("workerbundle").join(name))
}
