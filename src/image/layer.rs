//! The deterministic layer writer.
//!
//! Entries are written sorted by path, owned by 0:0, with fixed modes and one mtime (from
//! SOURCE_DATE_EPOCH); no host metadata (user names, inode times, xattrs) is read or written. The
//! tar stream is gzipped with a fixed level and header, and both it (the diffID) and the gzip bytes
//! (the blob digest) are hashed in ONE pass while it streams to the sink: no temp file, no second
//! read.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::Arc;

use bytes::Bytes;

use super::block_cache::BlockCache;
use super::file_source::FileSource;
use super::pgzip::{self, ParallelGzip};
use crate::digest::Digest;

/// Fixed for reproducibility: a different level gives different bytes. Level 1 because layer
/// assembly must outpace `gzip -1`; workerd's deflate quick mode still shrinks code ~3-4x.
pub const GZIP_LEVEL: u32 = 1;

/// The version of the layer byte format: tar entry rules + gzip framing. Bump it (and say so in
/// the changelog) whenever the same entries would give different blob bytes, and so different
/// digests. 2: deflate in independent 512 KiB blocks compressed in parallel ([`pgzip`]); 1 was
/// one deflate stream fed in 256 KiB blocks.
pub const LAYER_FORMAT_VERSION: u32 = 2;

pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Shared, not copied: a module's bytes go from the download to the tar stream as they are.
    File {
        content: Bytes,
        mode: u32,
    },
    /// Read from its source while the layer is written, never held whole (big files).
    Stream {
        source: FileSource,
        mode: u32,
    },
    Dir {
        mode: u32,
    },
    Symlink {
        target: String,
    },
}

/// What identifies a written layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerDigests {
    /// sha256 of the gzipped blob.
    pub digest: Digest,
    /// sha256 of the uncompressed tar (the image config's `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// Size of the gzipped blob in bytes.
    pub size: u64,
    /// Size of the uncompressed tar in bytes.
    pub tar_size: u64,
}

/// The entries of one layer, kept sorted by path. Paths are relative (`etc/workerd/config.capnp`).
#[derive(Clone, Debug, Default)]
pub struct LayerBuilder {
    entries: BTreeMap<String, Entry>,
}

impl LayerBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a file and, where missing, its parent directories (mode 0755).
    pub fn file(&mut self, path: &str, content: impl Into<Bytes>, mode: u32) -> &mut Self {
        self.parents(path);
        self.entries.insert(path.to_owned(), Entry::File { content: content.into(), mode });
        self
    }

    /// Adds a file whose bytes are streamed from `source` when the layer is written.
    pub fn stream_file(&mut self, path: &str, source: FileSource, mode: u32) -> &mut Self {
        self.parents(path);
        self.entries.insert(path.to_owned(), Entry::Stream { source, mode });
        self
    }

    /// Adds (or re-modes) a directory and its missing parents.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let path = path.trim_end_matches('/');
        self.parents(path);
        self.entries.insert(path.to_owned(), Entry::Dir { mode });
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.parents(path);
        self.entries.insert(path.to_owned(), Entry::Symlink { target: target.to_owned() });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(p, e)| (p.as_str(), e))
    }

    fn parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            self.entries.entry(path[..end].to_owned()).or_insert(Entry::Dir { mode: 0o755 });
            end += 1;
        }
    }

    /// Writes the layer as a gzipped tar into `sink`, returning its digests and the sink.
    /// `mtime` is the modification time of every entry (seconds since the epoch).
    pub fn write<W: Write>(&self, sink: W, mtime: u64) -> io::Result<(LayerDigests, W)> {
        self.write_with_threads(sink, mtime, pgzip::default_threads())
    }

    /// [`write`](Self::write), reading the deflated blocks it has seen before from `cache` (and
    /// storing the others there): the bytes are the same with or without it.
    pub fn write_cached<W: Write>(
        &self,
        sink: W,
        mtime: u64,
        cache: Option<&Arc<BlockCache>>,
    ) -> io::Result<(LayerDigests, W)> {
        self.write_with(sink, mtime, pgzip::default_threads(), cache.cloned())
    }

    /// [`write`](Self::write) with `threads` compression threads: the bytes are the same for any.
    pub fn write_with_threads<W: Write>(
        &self,
        sink: W,
        mtime: u64,
        threads: usize,
    ) -> io::Result<(LayerDigests, W)> {
        self.write_with(sink, mtime, threads, None)
    }

    fn write_with<W: Write>(
        &self,
        sink: W,
        mtime: u64,
        threads: usize,
        cache: Option<Arc<BlockCache>>,
    ) -> io::Result<(LayerDigests, W)> {
        // The gzip writer hashes both the tar and the gzip bytes: with a cache, it can take the
        // hashes of a layer's unchanged first blocks instead of hashing them again.
        let gzip = ParallelGzip::new(sink, GZIP_LEVEL, threads).with_cache(cache);
        let mut tar = tar::Builder::new(gzip);
        for (path, entry) in &self.entries {
            append(&mut tar, path, entry, mtime)?;
        }
        let (digests, sink) = tar.into_inner()?.finish()?;
        let ((diff_id, tar_size), (digest, size)) = (digests.input, digests.output);
        Ok((LayerDigests { digest, diff_id, size, tar_size }, sink))
    }

    /// The layer in memory, for small layers and for pushing.
    pub fn to_blob(&self, mtime: u64) -> io::Result<(LayerDigests, Bytes)> {
        self.to_blob_cached(mtime, None)
    }

    /// [`to_blob`](Self::to_blob) with a block cache, as in [`write_cached`](Self::write_cached).
    pub fn to_blob_cached(
        &self,
        mtime: u64,
        cache: Option<&Arc<BlockCache>>,
    ) -> io::Result<(LayerDigests, Bytes)> {
        // Room for the worst case (stored, not shrunk) up front: growing by doubling would copy
        // the blob again and again; capacity never written to costs no memory.
        let files: u64 = self
            .entries
            .values()
            .map(|e| match e {
                Entry::File { content, .. } => content.len() as u64 + 1024,
                _ => 1024,
            })
            .sum();
        let capacity = usize::try_from(files + files / 64 + 4096).unwrap_or(0);
        let (digests, bytes) = self.write_cached(Vec::with_capacity(capacity), mtime, cache)?;
        Ok((digests, Bytes::from(bytes)))
    }
}

fn append<W: Write>(tar: &mut tar::Builder<W>, path: &str, entry: &Entry, mtime: u64) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    match entry {
        Entry::File { content, mode } => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(*mode);
            header.set_size(content.len() as u64);
            tar.append_data(&mut header, path, &content[..])
        }
        Entry::Stream { source, mode } => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(*mode);
            header.set_size(source.size());
            tar.append_data(&mut header, path, source.open()?)
        }
        Entry::Dir { mode } => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(*mode);
            header.set_size(0);
            tar.append_data(&mut header, format!("{path}/"), io::empty())
        }
        Entry::Symlink { target } => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            tar.append_link(&mut header, path, target)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn sample() -> LayerBuilder {
        let mut layer = LayerBuilder::new();
        layer.file("etc/workerd/b.js", b"b".to_vec(), 0o644);
        layer.file("etc/workerd/a.js", b"a".to_vec(), 0o644);
        layer.symlink("lib64/ld.so", "/lib/ld.so");
        layer.file(&format!("deep/{}/x.txt", "n".repeat(120)), b"long".to_vec(), 0o644);
        layer
    }

    #[test]
    fn digests_describe_the_bytes_written() {
        let (d, blob) = sample().to_blob(0).unwrap();
        assert_eq!(d.digest, Digest::of(&blob));
        assert_eq!(d.size, blob.len() as u64);
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&blob[..]).read_to_end(&mut tar).unwrap();
        assert_eq!(d.diff_id, Digest::of(&tar));
        assert_eq!(d.tar_size, tar.len() as u64);
    }

    #[test]
    fn entries_are_sorted_root_owned_with_fixed_times_and_parents() {
        let (_, blob) = sample().to_blob(1_700_000_000).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
            assert_eq!(h.mtime().unwrap(), 1_700_000_000);
            seen.push(entry.path().unwrap().to_string_lossy().trim_end_matches('/').to_owned());
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted);
        assert_eq!(
            &seen[..4],
            ["deep", &format!("deep/{}", "n".repeat(120)), &format!("deep/{}/x.txt", "n".repeat(120)), "etc"]
        );
        assert!(seen.contains(&"lib64".to_owned()));
    }

    #[test]
    fn same_entries_in_any_insertion_order_give_the_same_blob() {
        let mut reversed = LayerBuilder::new();
        reversed.file(&format!("deep/{}/x.txt", "n".repeat(120)), b"long".to_vec(), 0o644);
        reversed.symlink("lib64/ld.so", "/lib/ld.so");
        reversed.file("etc/workerd/a.js", b"a".to_vec(), 0o644);
        reversed.file("etc/workerd/b.js", b"b".to_vec(), 0o644);
        assert_eq!(sample().to_blob(0).unwrap(), reversed.to_blob(0).unwrap());
    }

    #[test]
    fn the_blob_is_the_same_for_any_thread_count() {
        let mut layer = sample();
        let big: Vec<u8> =
            (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 % 40 + 48).collect();
        layer.file("big.js", big, 0o644);
        let one = layer.write_with_threads(Vec::new(), 0, 1).unwrap();
        for threads in [2, 8] {
            assert_eq!(layer.write_with_threads(Vec::new(), 0, threads).unwrap(), one, "{threads} threads");
        }
    }

    #[test]
    fn gzip_header_is_fixed() {
        let (_, blob) = sample().to_blob(0).unwrap();
        // magic, deflate, no flags, mtime 0, xfl, OS "unknown"
        assert_eq!(&blob[..4], [0x1f, 0x8b, 8, 0]);
        assert_eq!(&blob[4..8], [0, 0, 0, 0]);
        assert_eq!(blob[9], 255);
    }
}
