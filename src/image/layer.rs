//! The deterministic layer writer.
//!
//! Entries are written sorted by path, owned by 0:0, with fixed modes and one mtime (from
//! SOURCE_DATE_EPOCH); no host metadata (user names, inode times, xattrs) is read or written. The
//! tar stream is hashed (the diffID), gzipped with a fixed level and header, and hashed again (the
//! blob digest) in ONE pass while it streams to the sink: no temp file, no second read.

use std::collections::BTreeMap;
use std::io::{self, Write};

use bytes::Bytes;
use flate2::{Compression, GzBuilder};

use crate::digest::{Digest, HashingWriter};

/// Fixed for reproducibility: a different level gives different bytes. Level 1 because layer
/// assembly must outpace `gzip -1`; workerd's deflate quick mode still shrinks code ~3-4x.
pub const GZIP_LEVEL: u32 = 1;
/// The gzip header's OS byte, fixed to "unknown" so the host's OS never shows in a digest.
const GZIP_OS_UNKNOWN: u8 = 255;

/// How much of the tar stream deflate is handed at once (see [`FixedBlocks`]).
const DEFLATE_BLOCK: usize = 256 * 1024;

pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Shared, not copied: a module's bytes go from the download to the tar stream as they are.
    File {
        content: Bytes,
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
        let compressed = HashingWriter::new(sink);
        let gzip = GzBuilder::new()
            .operating_system(GZIP_OS_UNKNOWN)
            .mtime(0)
            .write(compressed, Compression::new(GZIP_LEVEL));
        let uncompressed = HashingWriter::new(FixedBlocks::new(gzip));
        let mut tar = tar::Builder::new(uncompressed);
        for (path, entry) in &self.entries {
            append(&mut tar, path, entry, mtime)?;
        }
        let (diff_id, tar_size, gzip) = tar.into_inner()?.finish();
        let (digest, size, sink) = gzip.finish()?.finish()?.finish();
        Ok((LayerDigests { digest, diff_id, size, tar_size }, sink))
    }

    /// The layer in memory, for small layers and for pushing.
    pub fn to_blob(&self, mtime: u64) -> io::Result<(LayerDigests, Bytes)> {
        let (digests, bytes) = self.write(Vec::new(), mtime)?;
        Ok((digests, Bytes::from(bytes)))
    }
}

/// Hands the inner writer the stream in blocks of exactly [`DEFLATE_BLOCK`] bytes (the last one
/// shorter). Deflate's output depends on how its input is split into calls, so without this the
/// compressed bytes, and the layer digest, would depend on the write pattern of the tar crate
/// and of `std::io::copy`, which may change between versions. Large blocks are also faster.
struct FixedBlocks<W> {
    inner: W,
    block: Vec<u8>,
}

impl<W: Write> FixedBlocks<W> {
    fn new(inner: W) -> Self {
        FixedBlocks { inner, block: Vec::with_capacity(DEFLATE_BLOCK) }
    }

    /// Writes what is left and returns the inner writer.
    fn finish(mut self) -> io::Result<W> {
        if !self.block.is_empty() {
            self.inner.write_all(&self.block)?;
        }
        Ok(self.inner)
    }
}

impl<W: Write> Write for FixedBlocks<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = buf.len().min(DEFLATE_BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..take]);
        if self.block.len() == DEFLATE_BLOCK {
            self.inner.write_all(&self.block)?;
            self.block.clear();
        }
        Ok(take)
    }

    /// Buffered bytes stay until a block is full or the stream ends: flushing early would change
    /// the block boundaries.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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

    /// Records the size of every write it gets.
    struct Calls(Vec<usize>);
    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn deflate_sees_the_same_blocks_however_the_stream_is_written() {
        let data = vec![7u8; DEFLATE_BLOCK * 2 + 100];
        let mut pieces = Vec::new();
        for chunk in [1, 512, 8192, 100_000, data.len()] {
            let mut w = FixedBlocks::new(Calls(Vec::new()));
            for piece in data.chunks(chunk) {
                w.write_all(piece).unwrap();
            }
            pieces.push(w.finish().unwrap().0);
        }
        assert!(pieces.iter().all(|p| *p == [DEFLATE_BLOCK, DEFLATE_BLOCK, 100]), "{pieces:?}");
    }

    #[test]
    fn gzip_header_is_fixed() {
        let (_, blob) = sample().to_blob(0).unwrap();
        // magic, deflate, no flags, mtime 0, xfl, OS "unknown"
        assert_eq!(&blob[..4], [0x1f, 0x8b, 8, 0]);
        assert_eq!(&blob[4..8], [0, 0, 0, 0]);
        assert_eq!(blob[9], GZIP_OS_UNKNOWN);
    }
}
