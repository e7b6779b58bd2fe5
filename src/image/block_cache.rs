//! A disk cache of deflated layer blocks, so that a build which changes one module of a worker
//! deflates only the blocks whose input changed.
//!
//! [`pgzip`](super::pgzip) cuts a layer's tar stream into fixed blocks, and a block's deflated
//! bytes depend only on its input, the 32 KiB before it (the dictionary), the level, whether it
//! ends the stream, and the compressor's code. The key of an entry is the BLAKE3 hash of all of
//! those, so a hit gives exactly the bytes compressing would: a layer's digest is the same with an
//! empty cache, a full one, or none. Entries carry a checksum of their bytes; an entry that fails
//! it (a torn disk, a stray edit) is compressed again and replaced, never used.
//!
//! It also keeps, at each block boundary of a stream, the states of the stream's two sha256
//! hashers (of the tar and of the gzip bytes), keyed by every block before the boundary
//! ([`PrefixKey`]): a layer whose first blocks did not change is then hashed from the first block
//! that did, not from its start, and still gets the digests hashing all of it would give.
//!
//! And it keeps small records for the build beside them ([`RecordKey`]): what the last push to a
//! repository left there, so that the next process need not ask (see `build::pushed`).
//!
//! Everything here is best effort: a cache that cannot be read or written costs the deflate it
//! would have saved, and a warning once per process, never a failed build.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::Sha256;
use tracing::{debug, warn};

/// The compressor whose bytes the entries hold. Part of every key, so that entries written by
/// another deflate implementation are never taken for ours; a test checks it against Cargo.lock.
pub const CODEC: &str = "flate2 1.1.11, zlib-rs 0.6.8, raw deflate";
/// The hasher whose saved states the prefix entries hold, in every prefix key: sha2 promises that
/// a state saved by one 0.11 release restores in another, not across releases. A test checks it
/// against Cargo.lock.
pub const HASH_STATE: &str = "sha2 0.11, Sha256 state";
/// Blocks with less input are compressed, not cached: reading an entry (open, read, checksum)
/// costs more than deflating a few KiB, and small blocks are mostly the changing tail of a layer.
pub const MIN_CACHED_INPUT: usize = 64 * 1024;
/// The default bound on the cache's size on disk.
pub const DEFAULT_MAX_BYTES: u64 = 512 << 20;
/// How often the cache is trimmed to its bound: the trim lists every entry.
const TRIM_EVERY: Duration = Duration::from_secs(24 * 60 * 60);
/// Temporary files older than this were left by a process that died mid-write.
const STALE_TEMP: Duration = Duration::from_secs(60 * 60);
/// The first bytes of every entry, then the crc32 of its bytes (little-endian), then the bytes:
/// a block's deflated bytes, or a prefix's hasher states.
const MAGIC: &[u8; 8] = b"wbdflt1\n";
const HEADER: usize = MAGIC.len() + 4;
/// Larger than any entry (a block's input is at most 512 KiB, and deflate never grows it much): a
/// bigger file under an entry's name is not read, whatever put it there.
const MAX_ENTRY: u64 = 2 << 20;

/// The key of one block: see the module docs for what it covers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BlockKey([u8; 32]);

impl BlockKey {
    pub fn new(level: u32, last: bool, dictionary: &[u8], input: &[u8]) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"workerbundle deflate block\0");
        hasher.update(CODEC.as_bytes());
        hasher.update(&[0]);
        hasher.update(&level.to_le_bytes());
        hasher.update(&[u8::from(last)]);
        hasher.update(&(dictionary.len() as u64).to_le_bytes());
        hasher.update(dictionary);
        hasher.update(input);
        BlockKey(*hasher.finalize().as_bytes())
    }

    fn file_name(&self) -> String {
        hex::encode(self.0)
    }
}

/// The key of a stream's first blocks, up to one boundary: the keys of all of them, in order
/// (each block's key covers its input, the one before's tail, the level and the compressor).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PrefixKey([u8; 32]);

impl PrefixKey {
    /// The prefix that ends with `block`, after `before` (none: `block` is the stream's first).
    pub fn extend(before: Option<&PrefixKey>, block: &BlockKey) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"workerbundle stream prefix\0");
        hasher.update(HASH_STATE.as_bytes());
        hasher.update(&[0]);
        match before {
            Some(before) => hasher.update(&[1]).update(&before.0),
            None => hasher.update(&[0]),
        };
        hasher.update(&block.0);
        PrefixKey(*hasher.finalize().as_bytes())
    }

    fn file_name(&self) -> String {
        hex::encode(self.0)
    }
}

/// The key of a small record kept in the cache: its kind and what it is about, hashed under a
/// label no block or prefix key is made with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RecordKey([u8; 32]);

impl RecordKey {
    pub fn new(kind: &str, about: &[&str]) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"workerbundle record\0");
        hasher.update(kind.as_bytes());
        hasher.update(&[0]);
        for part in about {
            // Lengths first, so that ("ab", "c") and ("a", "bc") are different records.
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        RecordKey(*hasher.finalize().as_bytes())
    }

    fn file_name(&self) -> String {
        hex::encode(self.0)
    }
}

/// The cache in one directory. Shared by the compression threads of every layer of a process.
#[derive(Debug)]
pub struct BlockCache {
    dir: PathBuf,
    max_bytes: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    states_taken: AtomicU64,
    written: AtomicU64,
    warned: AtomicBool,
}

impl BlockCache {
    /// The cache in `dir`, made if missing: readable by its owner alone, since its entries are
    /// the workers' code. Whoever can write to it decides what the next builds' layers hold, so
    /// it is never a directory that others can write to.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> io::Result<BlockCache> {
        let dir = dir.into();
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        Ok(BlockCache {
            dir,
            max_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            states_taken: AtomicU64::new(0),
            written: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        })
    }

    /// The cache in `dir`, or none and a warning: a build goes on without a cache it cannot use.
    pub fn open_or_warn(dir: &Path) -> Option<BlockCache> {
        match BlockCache::open(dir, DEFAULT_MAX_BYTES) {
            Ok(cache) => Some(cache),
            Err(e) => {
                warn!("cannot use {} as the layer block cache ({e}); building without it", dir.display());
                None
            }
        }
    }

    /// `$XDG_CACHE_HOME/workerbundle/blocks`, else `~/.cache/workerbundle/blocks`; none without
    /// a home.
    pub fn default_dir() -> Option<PathBuf> {
        crate::cache_dir::workerbundle_cache("blocks")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Blocks found, and blocks compressed (and stored) for lack of an entry.
    pub fn counts(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    /// The deflated bytes of the block with `key`, into `output` (cleared first).
    pub fn get(&self, key: &BlockKey, output: &mut Vec<u8>) -> bool {
        let found = self.read(&key.file_name(), output);
        if found {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Stores a block's deflated bytes.
    pub fn put(&self, key: &BlockKey, deflated: &[u8]) {
        self.write(&key.file_name(), deflated);
    }

    /// Blocks whose hashing saved states spared: one per state found, the states at a block's
    /// end standing for the block.
    pub fn blocks_not_hashed(&self) -> u64 {
        self.states_taken.load(Ordering::Relaxed)
    }

    /// The two hashers (of the input, of the gzip bytes) saved at the end of the prefix `key`;
    /// none when there is no entry or it holds anything else.
    pub fn get_state(&self, key: &PrefixKey) -> Option<(Sha256, Sha256)> {
        let mut state = Vec::new();
        let hashers = self.read(&key.file_name(), &mut state).then(|| restore(&state)).flatten()?;
        self.states_taken.fetch_add(1, Ordering::Relaxed);
        Some(hashers)
    }

    /// Saves both hashers at the end of the prefix `key`.
    pub fn put_state(&self, key: &PrefixKey, input: &Sha256, output: &Sha256) {
        let mut state = input.serialize().to_vec();
        state.extend_from_slice(&output.serialize());
        self.write(&key.file_name(), &state);
    }

    /// The bytes of a record, if there is a whole one.
    pub fn get_record(&self, key: &RecordKey) -> Option<Vec<u8>> {
        let mut bytes = Vec::new();
        self.read(&key.file_name(), &mut bytes).then_some(bytes)
    }

    /// Stores a record, replacing the one under the same key.
    pub fn put_record(&self, key: &RecordKey, bytes: &[u8]) {
        self.write(&key.file_name(), bytes);
    }

    /// Any bytes under a prefix's name, as a stray file or another version might leave there.
    #[cfg(test)]
    pub(super) fn put_state_bytes(&self, key: &PrefixKey, bytes: &[u8]) {
        self.write(&key.file_name(), bytes);
    }

    fn read(&self, name: &str, output: &mut Vec<u8>) -> bool {
        let path = self.dir.join(name);
        match read_entry(&path, output) {
            Ok(found) => found,
            Err(e) => {
                self.warn_once("read", &path, &e);
                false
            }
        }
    }

    /// Written to a temporary file, then renamed, so a reader sees a whole entry or none.
    fn write(&self, name: &str, bytes: &[u8]) {
        let path = self.dir.join(name);
        let stored = (|| {
            let mut file = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&self.dir)?;
            let mut header = [0u8; HEADER];
            header[..MAGIC.len()].copy_from_slice(MAGIC);
            header[MAGIC.len()..].copy_from_slice(&crc32fast::hash(bytes).to_le_bytes());
            file.write_all(&header)?;
            file.write_all(bytes)?;
            file.persist(&path).map_err(|e| e.error)?;
            Ok::<_, io::Error>(())
        })();
        match stored {
            Ok(()) => {
                self.written.fetch_add((HEADER + bytes.len()) as u64, Ordering::Relaxed);
            }
            Err(e) => self.warn_once("write", &path, &e),
        }
    }

    fn warn_once(&self, what: &str, path: &Path, error: &io::Error) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            warn!(
                "cannot {what} the layer block cache entry {} ({error}); the build goes on, \
                 deflating what it cannot find (--no-cache turns the cache off)",
                path.display()
            );
        } else {
            debug!(path = %path.display(), %error, "block cache {what} failed");
        }
    }

    /// Keeps the cache within its bound: at most once a day, and only by a process that added to
    /// it, removes the least recently used entries until it holds three quarters of the bound.
    /// Call it when the build's pushing is done: it lists every entry.
    pub fn trim_if_due(&self) {
        if self.written.load(Ordering::Relaxed) == 0 {
            return;
        }
        let stamp = self.dir.join(".trimmed");
        let due = match fs::metadata(&stamp).and_then(|m| m.modified()) {
            Ok(at) => at.elapsed().map_or(true, |age| age >= TRIM_EVERY),
            Err(_) => true,
        };
        if !due {
            return;
        }
        let trimmed = File::create(&stamp).and_then(|_| self.trim());
        if let Err(e) = trimmed {
            self.warn_once("trim", &self.dir, &e);
        }
    }

    /// Removes stale temporary files and, oldest first, entries over three quarters of the bound.
    pub fn trim(&self) -> io::Result<()> {
        let mut entries = Vec::new();
        let mut total = 0u64;
        let now = SystemTime::now();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Ok(meta) = entry.metadata() else { continue };
            let modified = meta.modified().unwrap_or(now);
            if name.to_string_lossy().starts_with(".tmp-") {
                if now.duration_since(modified).is_ok_and(|age| age > STALE_TEMP) {
                    let _ = fs::remove_file(entry.path());
                }
                continue;
            }
            if !meta.is_file() || name.len() != 64 {
                continue;
            }
            total += meta.len();
            entries.push((modified, meta.len(), entry.path()));
        }
        if total <= self.max_bytes {
            return Ok(());
        }
        entries.sort();
        let keep = self.max_bytes / 4 * 3;
        for (_, len, path) in entries {
            if total <= keep {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
        debug!(dir = %self.dir.display(), bytes = total, "block cache trimmed");
        Ok(())
    }
}

/// The hashers [`BlockCache::put_state`] saved; none from bytes of another shape.
fn restore(state: &[u8]) -> Option<(Sha256, Sha256)> {
    let size = SerializedState::<Sha256>::default().len();
    if state.len() != 2 * size {
        return None;
    }
    let (input, output) = state.split_at(size);
    let input = SerializedState::<Sha256>::try_from(input).ok()?;
    let output = SerializedState::<Sha256>::try_from(output).ok()?;
    Some((Sha256::deserialize(&input).ok()?, Sha256::deserialize(&output).ok()?))
}

/// Reads one entry; `Ok(false)` when there is none or it fails its checksum.
fn read_entry(path: &Path, output: &mut Vec<u8>) -> io::Result<bool> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if !(HEADER as u64..=MAX_ENTRY).contains(&len) {
        return Ok(false);
    }
    let len = len as usize;
    let mut header = [0u8; HEADER];
    file.read_exact(&mut header)?;
    output.clear();
    output.reserve(len - HEADER);
    file.read_to_end(output)?;
    let crc = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if &header[..MAGIC.len()] != MAGIC || crc32fast::hash(output) != crc {
        debug!(path = %path.display(), "block cache entry fails its checksum; compressing again");
        return Ok(false);
    }
    // The entry's time says when it was last used, for the trim: the build goes on if it cannot.
    let _ = file.set_modified(SystemTime::now());
    Ok(true)
}

#[cfg(test)]
mod tests {
    use sha2::Digest as _;

    use super::*;

    #[test]
    fn an_entry_reads_back_and_a_damaged_one_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path().join("blocks"), DEFAULT_MAX_BYTES).unwrap();
        let key = BlockKey::new(1, false, b"", b"input");
        let mut out = Vec::new();
        assert!(!cache.get(&key, &mut out));
        cache.put(&key, b"deflated bytes");
        assert!(cache.get(&key, &mut out));
        assert_eq!(out, b"deflated bytes");

        let path = cache.dir().join(key.file_name());
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(!cache.get(&key, &mut out), "a flipped bit must not be served");
        fs::write(&path, &bytes[..5]).unwrap();
        assert!(!cache.get(&key, &mut out), "a torn entry must not be served");
        fs::write(&path, vec![0u8; MAX_ENTRY as usize + 1]).unwrap();
        assert!(!cache.get(&key, &mut out), "a file no entry can be is not read");
        assert_eq!(cache.counts(), (1, 4));
    }

    #[test]
    fn a_new_cache_is_its_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path().join("a/blocks"), DEFAULT_MAX_BYTES).unwrap();
        let mode = fs::metadata(cache.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let key = BlockKey::new(1, false, b"", b"module code");
        cache.put(&key, b"deflated");
        let mode = fs::metadata(cache.dir().join(key.file_name())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn the_key_covers_level_end_dictionary_and_input() {
        let base = BlockKey::new(1, false, b"dict", b"input");
        assert!(base == BlockKey::new(1, false, b"dict", b"input"));
        assert!(base != BlockKey::new(2, false, b"dict", b"input"));
        assert!(base != BlockKey::new(1, true, b"dict", b"input"));
        assert!(base != BlockKey::new(1, false, b"dicT", b"input"));
        assert!(base != BlockKey::new(1, false, b"dict", b"inpuT"));
        // The boundary between dictionary and input is part of the key.
        assert!(base != BlockKey::new(1, false, b"dic", b"tinput"));
    }

    #[test]
    fn trimming_removes_the_least_recently_used_entries_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), 3000).unwrap();
        let keys: Vec<BlockKey> = (0..4u8).map(|i| BlockKey::new(1, false, b"", &[i])).collect();
        for (i, key) in keys.iter().enumerate() {
            cache.put(key, &[0u8; 1000]);
            let at = SystemTime::now() - Duration::from_secs(100 - i as u64);
            File::options()
                .write(true)
                .open(cache.dir().join(key.file_name()))
                .unwrap()
                .set_modified(at)
                .unwrap();
        }
        // Using the oldest makes it the newest.
        assert!(cache.get(&keys[0], &mut Vec::new()));
        cache.trim().unwrap();
        let left: Vec<bool> = keys.iter().map(|k| cache.dir().join(k.file_name()).exists()).collect();
        // 4 x 1012 bytes over a bound of 3000: down to 2250, so two entries stay.
        assert_eq!(left, [true, false, false, true]);
    }

    #[test]
    fn the_codec_names_the_compressor_in_cargo_lock() {
        let lock = include_str!("../../Cargo.lock");
        let version = |name: &str| {
            let entry = format!("name = \"{name}\"\nversion = \"");
            let rest = &lock[lock.find(&entry).unwrap() + entry.len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        };
        let expected = format!("flate2 {}, zlib-rs {}, raw deflate", version("flate2"), version("zlib-rs"));
        assert_eq!(CODEC, expected, "a new compressor may give other bytes: name it in CODEC");
        let sha2 = version("sha2");
        let minor = &sha2[..sha2.rfind('.').unwrap()];
        assert!(
            HASH_STATE.starts_with(&format!("sha2 {minor},")),
            "saved states may not restore: name sha2 {minor}"
        );
    }

    #[test]
    fn a_prefix_key_covers_every_block_before_it_in_order() {
        let (a, b) = (BlockKey::new(1, false, b"", b"a"), BlockKey::new(1, false, b"a", b"b"));
        let ab = PrefixKey::extend(Some(&PrefixKey::extend(None, &a)), &b);
        assert!(ab == PrefixKey::extend(Some(&PrefixKey::extend(None, &a)), &b));
        assert!(ab != PrefixKey::extend(Some(&PrefixKey::extend(None, &b)), &a));
        assert!(ab != PrefixKey::extend(None, &b), "the first block is part of the key");
        assert!(PrefixKey::extend(None, &a).0 != a.0, "never a block entry's name");
    }

    #[test]
    fn a_record_reads_back_is_replaced_and_has_a_name_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let key = RecordKey::new("pushed", &["127.0.0.1:5000", "acct/app"]);
        assert!(cache.get_record(&key).is_none());
        cache.put_record(&key, b"first");
        cache.put_record(&key, b"second");
        assert_eq!(cache.get_record(&key).unwrap(), b"second");
        assert!(key != RecordKey::new("pushed", &["127.0.0.1:500", "0acct/app"]));
        assert!(key != RecordKey::new("other", &["127.0.0.1:5000", "acct/app"]));
        assert!(key != RecordKey::new("pushe", &["d127.0.0.1:5000", "acct/app"]));
        assert_eq!(cache.counts(), (0, 0), "records are not blocks");
    }

    #[test]
    fn a_state_reads_back_and_is_not_counted_as_a_block() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let key = PrefixKey::extend(None, &BlockKey::new(1, false, b"", b"a"));
        assert!(cache.get_state(&key).is_none());
        let (input, output) = (Sha256::new_with_prefix(b"tar"), Sha256::new_with_prefix(b"gzip"));
        cache.put_state(&key, &input, &output);
        let (back_input, back_output) = cache.get_state(&key).unwrap();
        assert_eq!(back_input.finalize(), input.finalize());
        assert_eq!(back_output.finalize(), output.finalize());
        assert_eq!(cache.counts(), (0, 0));
    }
}
