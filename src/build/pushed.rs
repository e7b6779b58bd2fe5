//! What this machine's last push to a repository left there, kept in the build cache, so that
//! the next `build` process knows which blobs the repository holds without asking.
//!
//! A fresh process otherwise learns it with one GET of the tag's manifest: a sixth request on
//! top of the five a one-worker change needs (POST + PUT of the layer and of the config, the
//! manifest PUT). The record is what the process before wrote after its manifest was accepted:
//! the digests of the blobs that manifest names, which the registry keeps while the tag points
//! at it.
//!
//! A record can be wrong: the tag moved and the registry was garbage-collected, or the
//! repository was deleted. The push then learns it from the manifest PUT, which a registry
//! refuses while a blob it names is missing (`MANIFEST_BLOB_UNKNOWN`), and sends what the
//! repository lacks, once (see `registry::push`). To keep that rare, a record is trusted for an
//! hour after it was written, the span of an edit-and-push session; an older one costs the GET.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::debug;

use crate::digest::Digest;
use crate::image::block_cache::{BlockCache, RecordKey};

/// How long after a push its record is trusted.
pub const TRUSTED_FOR: Duration = Duration::from_secs(60 * 60);
const FORMAT: &str = "workerbundle pushed 1";

fn key(registry: &str, repository: &str) -> RecordKey {
    RecordKey::new("pushed", &[registry, repository])
}

/// The blobs the last push from here to `registry`/`repository` left there, if it was less than
/// [`TRUSTED_FOR`] ago.
pub fn recall(cache: &BlockCache, registry: &str, repository: &str) -> Option<Vec<Digest>> {
    let bytes = cache.get_record(&key(registry, repository))?;
    let recalled = parse(&bytes, registry, repository, SystemTime::now());
    if recalled.is_none() {
        debug!(
            registry,
            repository, "the record of the last push is stale or unreadable; asking the registry"
        );
    }
    recalled
}

/// Records the blobs a manifest just accepted by `registry`/`repository` names.
pub fn record(cache: &BlockCache, registry: &str, repository: &str, blobs: &[Digest]) {
    let written = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    cache.put_record(&key(registry, repository), format(registry, repository, written, blobs).as_bytes());
}

fn format(registry: &str, repository: &str, written: u64, blobs: &[Digest]) -> String {
    let mut text = format!("{FORMAT}\n{registry}\n{repository}\n{written}\n");
    for blob in blobs {
        text.push_str(blob.as_str());
        text.push('\n');
    }
    text
}

/// The record's blobs; none unless it is whole, about this repository, and recent.
fn parse(bytes: &[u8], registry: &str, repository: &str, now: SystemTime) -> Option<Vec<Digest>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.lines();
    if lines.next()? != FORMAT || lines.next()? != registry || lines.next()? != repository {
        return None;
    }
    let written = UNIX_EPOCH + Duration::from_secs(lines.next()?.parse().ok()?);
    // A record from the future (a clock set back) is not trusted either.
    if now.duration_since(written).ok()? > TRUSTED_FOR {
        return None;
    }
    let blobs: Option<Vec<Digest>> = lines.map(Digest::parse).collect();
    blobs.filter(|b| !b.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> Vec<Digest> {
        vec![Digest::of(b"layer"), Digest::of(b"config")]
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_record_reads_back_for_its_repository_within_the_hour() {
        let text = format("127.0.0.1:5000", "acct/app", 1_000_000, &blobs());
        let read = |registry, repository, now| parse(text.as_bytes(), registry, repository, now);
        assert_eq!(read("127.0.0.1:5000", "acct/app", at(1_000_000)), Some(blobs()));
        assert_eq!(read("127.0.0.1:5000", "acct/app", at(1_000_000 + 3600)), Some(blobs()));
        assert_eq!(read("127.0.0.1:5000", "acct/app", at(1_000_000 + 3601)), None, "too old");
        assert_eq!(read("127.0.0.1:5000", "acct/app", at(999_999)), None, "written in the future");
        assert_eq!(read("127.0.0.1:5001", "acct/app", at(1_000_000)), None, "another registry");
        assert_eq!(read("127.0.0.1:5000", "acct/other", at(1_000_000)), None, "another repository");
    }

    #[test]
    fn anything_but_a_whole_record_is_not_trusted() {
        let text = format("r", "a/b", 10, &blobs());
        let ok = |bytes: &[u8]| parse(bytes, "r", "a/b", at(10)).is_some();
        assert!(ok(text.as_bytes()));
        assert!(!ok(text.replace("sha256:", "sha256:x").as_bytes()), "a digest that does not parse");
        assert!(!ok(text.replace(FORMAT, "workerbundle pushed 2").as_bytes()), "another format");
        assert!(!ok(format("r", "a/b", 10, &[]).as_bytes()), "no blobs");
        assert!(!ok(&text.as_bytes()[..20]), "cut short");
        assert!(!ok(b"\xff\xfe"), "not text");
    }

    #[test]
    fn recall_finds_what_record_wrote_in_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), crate::image::block_cache::DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(recall(&cache, "r:1", "a/b"), None);
        record(&cache, "r:1", "a/b", &blobs());
        assert_eq!(recall(&cache, "r:1", "a/b"), Some(blobs()));
        assert_eq!(recall(&cache, "r:1", "a/c"), None);
    }
}
