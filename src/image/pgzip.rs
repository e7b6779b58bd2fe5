//! Deterministic parallel gzip (pigz-style), for layers.
//!
//! The stream is cut into blocks of exactly [`BLOCK`] bytes (the last one shorter). Each block is
//! deflated on its own, primed with the last 32 KiB of the block before it as a preset dictionary,
//! and ended with a sync flush (an empty stored block, so it ends on a byte boundary); the last
//! block is finished instead. The deflate streams of the blocks, concatenated, are one valid
//! deflate stream, wrapped in ONE gzip member whose CRC32 is combined from the blocks' CRCs.
//!
//! A block's bytes depend only on its own input and the 32 KiB before it, never on which thread
//! compressed it or on how the stream was written, so the output (and a layer's digest) is the
//! same for any thread count. Blocks are compressed on a few worker threads while the caller keeps
//! writing; at most [`IN_FLIGHT_PER_THREAD`] blocks per thread are held, so memory is bounded
//! whatever the stream's size. A stream of one block is compressed on the caller's thread.
//!
//! For the same reason a block's bytes can be kept and used again: with a [`BlockCache`], a block
//! seen before (same input, same dictionary) is read back instead of deflated.
//!
//! The writer also hashes both streams (sha256 of the input, of the gzip bytes), in order, as each
//! block is written out. With a cache, it saves both hashers' states at each block boundary
//! under the keys of all the blocks before it; a stream whose first blocks were seen before takes
//! the states instead of hashing those blocks again.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use flate2::{Compress, Compression, FlushCompress, Status};
use sha2::{Digest as _, Sha256};

use super::block_cache::{BlockCache, BlockKey, PrefixKey, MIN_CACHED_INPUT};
use crate::digest::Digest;

/// Bytes of uncompressed input per block. Fixed: a different size gives different bytes.
pub const BLOCK: usize = 512 * 1024;
/// Deflate's window: how much of the previous block primes the next one.
const DICTIONARY: usize = 32 * 1024;
/// Blocks queued or being compressed per worker thread before `write` waits for the oldest.
const IN_FLIGHT_PER_THREAD: usize = 2;
/// Threads used by default: the machine's cores, at most this many.
const MAX_THREADS: usize = 8;
/// The gzip header's OS byte, fixed to "unknown" so the host's OS never shows in a digest.
const GZIP_OS_UNKNOWN: u8 = 255;

/// Worker threads for layer compression: the available cores, at most [`MAX_THREADS`]. Asked
/// once per process: `available_parallelism` reads the cgroup's CPU quota files on every call,
/// and a build asks for each of its layers.
pub fn default_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_THREADS))
}

/// The gzip header: no name, no mtime, XFL "fastest" (what flate2 writes for level 1), OS unknown.
fn header(level: u32) -> [u8; 10] {
    let xfl = if level >= 9 {
        2
    } else if level <= 1 {
        4
    } else {
        0
    };
    [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, GZIP_OS_UNKNOWN]
}

/// One block to compress: its input, the dictionary before it, and whether it is the last one.
struct Job {
    input: Vec<u8>,
    /// An empty buffer for the output, recycled like the input's.
    output: Vec<u8>,
    dictionary: Arc<Vec<u8>>,
    last: bool,
    done: SyncSender<io::Result<Compressed>>,
}

struct Compressed {
    output: Vec<u8>,
    crc: crc32fast::Hasher,
    /// The block's cache key, when it has one (a cache, and enough input).
    key: Option<BlockKey>,
    /// The block's input buffer, handed back for the next block (fresh pages cost page faults).
    input: Vec<u8>,
}

/// Deflates one block, or reads its bytes from `cache` when a block with the same input and
/// dictionary was deflated before (and stores them when not).
fn deflate_block(
    level: u32,
    cache: Option<&BlockCache>,
    input: &[u8],
    dictionary: &[u8],
    last: bool,
    mut output: Vec<u8>,
) -> io::Result<Compressed> {
    let Some(cache) = cache.filter(|_| input.len() >= MIN_CACHED_INPUT) else {
        return compress_block(level, input, dictionary, last, output);
    };
    let key = BlockKey::new(level, last, dictionary, input);
    if cache.get(&key, &mut output) {
        let mut crc = crc32fast::Hasher::new();
        crc.update(input);
        return Ok(Compressed { output, crc, key: Some(key), input: Vec::new() });
    }
    let compressed = compress_block(level, input, dictionary, last, output)?;
    cache.put(&key, &compressed.output);
    Ok(Compressed { key: Some(key), ..compressed })
}

/// Deflates one block with a fresh compressor. Not a reused one: a reset compressor can carry
/// state from the block it did before, and which blocks a thread gets depends on timing, so the
/// bytes would depend on timing too (a test caught it).
fn compress_block(
    level: u32,
    input: &[u8],
    dictionary: &[u8],
    last: bool,
    mut output: Vec<u8>,
) -> io::Result<Compressed> {
    let compressor = &mut new_compressor(level);
    if !dictionary.is_empty() {
        compressor.set_dictionary(dictionary).map_err(io::Error::other)?;
    }
    let flush = if last { FlushCompress::Finish } else { FlushCompress::Sync };
    // Deflate never grows data by more than ~0.1% plus a few bytes per 16 KiB stored block.
    output.clear();
    output.reserve(input.len() + input.len() / 64 + 64);
    let start = compressor.total_in();
    loop {
        let consumed = (compressor.total_in() - start) as usize;
        let status =
            compressor.compress_vec(&input[consumed..], &mut output, flush).map_err(io::Error::other)?;
        let all_in = (compressor.total_in() - start) as usize == input.len();
        let done = match status {
            Status::StreamEnd => true,
            // A sync flush is complete once all input is in and the output did not fill up.
            Status::Ok | Status::BufError => !last && all_in && output.len() < output.capacity(),
        };
        if done {
            break;
        }
        output.reserve(output.capacity().max(64 * 1024));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(input);
    Ok(Compressed { output, crc, key: None, input: Vec::new() })
}

fn new_compressor(level: u32) -> Compress {
    // Raw deflate: the gzip framing is ours.
    Compress::new(Compression::new(level), false)
}

/// Worker threads taking jobs from one queue.
struct Pool {
    jobs: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn start(threads: usize, level: u32, cache: Option<Arc<BlockCache>>) -> io::Result<Pool> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(threads * IN_FLIGHT_PER_THREAD);
        let queue = Arc::new(std::sync::Mutex::new(queue));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let (queue, cache) = (queue.clone(), cache.clone());
            let handle = std::thread::Builder::new().name(format!("gzip-{i}")).spawn(move || {
                loop {
                    let job = match queue.lock() {
                        Ok(queue) => queue.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    let result = deflate_block(
                        level,
                        cache.as_deref(),
                        &job.input,
                        &job.dictionary,
                        job.last,
                        job.output,
                    )
                    .map(|c| Compressed { input: job.input, ..c });
                    // The writer may have given up (an error elsewhere): nothing to tell it then.
                    let _ = job.done.send(result);
                }
            })?;
            handles.push(handle);
        }
        Ok(Pool { jobs: Some(jobs), threads: handles })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs.take();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// A gzip writer that compresses blocks in parallel; see the module docs. Call [`finish`] at the
/// end: dropping it unfinished loses the stream.
///
/// [`finish`]: ParallelGzip::finish
pub struct ParallelGzip<W: Write> {
    sink: W,
    level: u32,
    threads: usize,
    block: Vec<u8>,
    dictionary: Arc<Vec<u8>>,
    /// Results of the blocks handed out, oldest first.
    pending: VecDeque<Receiver<io::Result<Compressed>>>,
    pool: Option<Pool>,
    cache: Option<Arc<BlockCache>>,
    crc: crc32fast::Hasher,
    /// Input buffers of blocks already written, for the next blocks.
    spare: Vec<Vec<u8>>,
    /// Their output buffers: reused rather than freed, so that a long stream does not leave the
    /// allocator with ever more free half-MiB holes (it kept ~12 MiB more at the peak of 1 GiB).
    spare_output: Vec<Vec<u8>>,
    /// Uncompressed bytes so far (the trailer's ISIZE is this modulo 2^32).
    total_in: u64,
    header_written: bool,
    /// The input, hashed block by block as blocks are written out.
    input_hash: Sha256,
    /// The gzip bytes written, and their count.
    output_hash: Sha256,
    output_len: u64,
    /// The key of the blocks written so far, while each of them had one.
    prefix: Option<PrefixKey>,
    /// True while every block written so far took its hasher states from the cache (nothing has
    /// been hashed yet, nor needs to be).
    restoring: bool,
}

/// What [`ParallelGzip::finish`] learned of both streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamDigests {
    /// sha256 and length of the uncompressed input.
    pub input: (Digest, u64),
    /// sha256 and length of the gzip bytes.
    pub output: (Digest, u64),
}

impl<W: Write> ParallelGzip<W> {
    /// `threads` worker threads (1: everything on the caller's thread). They start with the
    /// second block, so a small stream starts none.
    pub fn new(sink: W, level: u32, threads: usize) -> Self {
        ParallelGzip {
            sink,
            level,
            threads: threads.max(1),
            block: Vec::with_capacity(BLOCK),
            dictionary: Arc::new(Vec::new()),
            pending: VecDeque::new(),
            pool: None,
            cache: None,
            crc: crc32fast::Hasher::new(),
            spare: Vec::new(),
            spare_output: Vec::new(),
            total_in: 0,
            header_written: false,
            input_hash: Sha256::new(),
            output_hash: Sha256::new(),
            output_len: 0,
            prefix: None,
            restoring: false,
        }
    }

    /// Reads blocks seen before from `cache`, and stores the others there: the bytes are the same.
    pub fn with_cache(mut self, cache: Option<Arc<BlockCache>>) -> Self {
        self.restoring = cache.is_some();
        self.cache = cache;
        self
    }

    /// Compresses what is left, writes the trailer, and returns the digests and lengths of the
    /// input and of the gzip bytes, and the sink.
    pub fn finish(mut self) -> io::Result<(StreamDigests, W)> {
        let block = std::mem::take(&mut self.block);
        self.submit(block, true)?;
        while let Some(result) = self.pending.pop_front() {
            self.emit(result)?;
        }
        self.write_header()?;
        let crc = std::mem::replace(&mut self.crc, crc32fast::Hasher::new());
        let mut trailer = [0u8; 8];
        trailer[..4].copy_from_slice(&crc.finalize().to_le_bytes());
        trailer[4..].copy_from_slice(&(self.total_in as u32).to_le_bytes());
        self.write_out(&trailer)?;
        let ParallelGzip { sink, pool, input_hash, output_hash, output_len, total_in, .. } = self;
        drop(pool);
        let digests = StreamDigests {
            input: (Digest::from_hasher(input_hash), total_in),
            output: (Digest::from_hasher(output_hash), output_len),
        };
        Ok((digests, sink))
    }

    fn write_header(&mut self) -> io::Result<()> {
        if !self.header_written {
            self.write_out(&header(self.level))?;
            self.header_written = true;
        }
        Ok(())
    }

    /// Writes gzip bytes to the sink, hashing and counting them.
    fn write_out(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sink.write_all(bytes)?;
        self.output_hash.update(bytes);
        self.output_len += bytes.len() as u64;
        Ok(())
    }

    /// Hands a full (or the last) block to a worker, or compresses it here.
    fn submit(&mut self, input: Vec<u8>, last: bool) -> io::Result<()> {
        self.total_in += input.len() as u64;
        let dictionary = std::mem::replace(&mut self.dictionary, Arc::new(tail(&input)));
        let one_block_stream = last && self.pending.is_empty() && self.pool.is_none();
        if self.threads == 1 || one_block_stream {
            let output = self.spare_output.pop().unwrap_or_default();
            let result = deflate_block(self.level, self.cache.as_deref(), &input, &dictionary, last, output)
                .map(|c| Compressed { input, ..c });
            // Keep the order: blocks handed out before this one go first.
            while let Some(earlier) = self.pending.pop_front() {
                self.emit(earlier)?;
            }
            let (done, receiver) = mpsc::sync_channel(1);
            let _ = done.send(result);
            return self.emit(receiver);
        }
        if self.pool.is_none() {
            self.pool = Some(Pool::start(self.threads, self.level, self.cache.clone())?);
        }
        if self.pending.len() >= self.threads * IN_FLIGHT_PER_THREAD {
            if let Some(oldest) = self.pending.pop_front() {
                self.emit(oldest)?;
            }
        }
        let (done, receiver) = mpsc::sync_channel(1);
        let jobs = self.pool.as_ref().and_then(|p| p.jobs.as_ref());
        let output = self.spare_output.pop().unwrap_or_default();
        let sent = jobs.is_some_and(|jobs| jobs.send(Job { input, output, dictionary, last, done }).is_ok());
        if !sent {
            return Err(io::Error::other("the gzip worker threads stopped"));
        }
        self.pending.push_back(receiver);
        Ok(())
    }

    fn emit(&mut self, result: Receiver<io::Result<Compressed>>) -> io::Result<()> {
        let compressed =
            result.recv().map_err(|_| io::Error::other("a gzip worker thread stopped mid-block"))??;
        self.write_header()?;
        self.hash_block(&compressed)?;
        self.crc.combine(&compressed.crc);
        if self.spare_output.len() < self.threads * IN_FLIGHT_PER_THREAD {
            self.spare_output.push(compressed.output);
        }
        if compressed.input.capacity() >= BLOCK && self.spare.len() < self.threads * IN_FLIGHT_PER_THREAD {
            let mut input = compressed.input;
            input.clear();
            self.spare.push(input);
        }
        Ok(())
    }
}

impl<W: Write> ParallelGzip<W> {
    /// Writes a block's gzip bytes out and hashes both of its sides, or, while the stream so far
    /// is one seen before, takes both hashers' states at its end from the cache.
    fn hash_block(&mut self, block: &Compressed) -> io::Result<()> {
        let boundary = (block.input.len() == BLOCK).then_some(block.key).flatten();
        self.prefix = boundary.map(|key| PrefixKey::extend(self.prefix.as_ref(), &key));
        let cache = self.cache.clone().filter(|_| self.prefix.is_some());
        let (Some(cache), Some(prefix)) = (cache, self.prefix) else {
            self.restoring = false;
            self.input_hash.update(&block.input);
            return self.write_out(&block.output);
        };
        if self.restoring {
            if let Some((input_hash, output_hash)) = cache.get_state(&prefix) {
                self.sink.write_all(&block.output)?;
                self.output_len += block.output.len() as u64;
                self.input_hash = input_hash;
                self.output_hash = output_hash;
                return Ok(());
            }
            self.restoring = false;
        }
        self.input_hash.update(&block.input);
        self.write_out(&block.output)?;
        cache.put_state(&prefix, &self.input_hash, &self.output_hash);
        Ok(())
    }
}

/// The last [`DICTIONARY`] bytes of a block.
fn tail(block: &[u8]) -> Vec<u8> {
    block[block.len().saturating_sub(DICTIONARY)..].to_vec()
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = buf.len().min(BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..take]);
        if self.block.len() == BLOCK {
            let next = self.spare.pop().unwrap_or_else(|| Vec::with_capacity(BLOCK));
            let block = std::mem::replace(&mut self.block, next);
            self.submit(block, false)?;
        }
        Ok(take)
    }

    /// Buffered bytes stay until a block is full or the stream ends: flushing early would change
    /// the block boundaries, and with them the bytes.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// Text that compresses like bundled JavaScript (~3x), from a fixed seed.
    fn sample(len: usize) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(7);
        let words =
            ["const ", "return ", "await ", "request", "response", "env.", "fetch(", "=> ", "{", "}\n"];
        let mut out = Vec::with_capacity(len + 64);
        while out.len() < len {
            out.extend_from_slice(words[rng.usize(..words.len())].as_bytes());
            out.extend_from_slice(format!("{:x}", rng.u32(..)).as_bytes());
        }
        out.truncate(len);
        out
    }

    fn gzip(data: &[u8], threads: usize, piece: usize) -> Vec<u8> {
        let mut writer = ParallelGzip::new(Vec::new(), 1, threads);
        for chunk in data.chunks(piece.max(1)) {
            writer.write_all(chunk).unwrap();
        }
        writer.finish().unwrap().1
    }

    #[test]
    fn same_bytes_for_1_2_and_8_threads_and_any_write_pattern() {
        for len in [0, 1, 1000, BLOCK, BLOCK + 1, 5 * BLOCK + 12_345] {
            let data = sample(len);
            let one = gzip(&data, 1, data.len());
            for (threads, piece) in [(2, 1000), (8, 7), (8, BLOCK * 3), (1, 513)] {
                assert!(
                    gzip(&data, threads, piece) == one,
                    "len {len}, {threads} threads, pieces of {piece}"
                );
            }
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&one[..]).read_to_end(&mut back).unwrap();
            assert!(back == data, "len {len}: the stream does not decompress to its input");
        }
    }

    #[test]
    fn a_cache_gives_the_same_bytes_and_deflates_only_the_changed_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(BlockCache::open(dir.path(), 1 << 30).unwrap());
        let cached = |data: &[u8], threads: usize| {
            let mut writer = ParallelGzip::new(Vec::new(), 1, threads).with_cache(Some(cache.clone()));
            writer.write_all(data).unwrap();
            writer.finish().unwrap().1
        };
        let mut data = sample(3 * BLOCK + 100 * 1024);
        let plain = gzip(&data, 1, data.len());
        assert!(cached(&data, 2) == plain, "an empty cache changed the bytes");
        assert_eq!(cache.counts(), (0, 4));
        assert!(cached(&data, 1) == plain, "a full cache changed the bytes");
        assert_eq!(cache.counts(), (4, 4));

        // A change in the second block: it and the block after it (whose dictionary it holds)
        // are deflated again; the first and the last are read back.
        data[2 * BLOCK - 10] ^= 0x20;
        assert!(cached(&data, 8) == gzip(&data, 1, data.len()));
        assert_eq!(cache.counts(), (6, 6));
        // The stream cut short: its first block is read back, its new last one deflated.
        let short = &data[..BLOCK + 200 * 1024];
        assert!(cached(short, 2) == gzip(short, 1, short.len()));
        assert_eq!(cache.counts(), (7, 7));
    }

    #[test]
    fn the_digests_are_of_both_streams_with_and_without_saved_hasher_states() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(BlockCache::open(dir.path(), 1 << 30).unwrap());
        let digests = |data: &[u8], threads: usize, cache: Option<Arc<BlockCache>>| {
            let mut writer = ParallelGzip::new(Vec::new(), 1, threads).with_cache(cache);
            writer.write_all(data).unwrap();
            let (digests, blob) = writer.finish().unwrap();
            let expected = StreamDigests {
                input: (Digest::of(data), data.len() as u64),
                output: (Digest::of(&blob), blob.len() as u64),
            };
            assert_eq!(digests, expected, "{} bytes, {threads} threads", data.len());
            blob
        };
        for len in [0, 1000, BLOCK, 3 * BLOCK + 100] {
            let data = sample(len);
            let plain = digests(&data, 2, None);
            // Empty cache (states saved), full cache (states taken), and one thread.
            assert!(digests(&data, 2, Some(cache.clone())) == plain);
            assert!(digests(&data, 2, Some(cache.clone())) == plain);
            assert!(digests(&data, 1, Some(cache.clone())) == plain);
        }
        // A change in the third block: the states end with the second block, and the rest is
        // hashed; a change in the first: nothing is taken.
        let mut data = sample(3 * BLOCK + 100);
        data[2 * BLOCK + 5] ^= 0x20;
        digests(&data, 2, Some(cache.clone()));
        data[5] ^= 0x20;
        digests(&data, 8, Some(cache.clone()));

        // Saved states of another shape (another hasher, a stray file) are not taken.
        let data = sample(2 * BLOCK + 100);
        digests(&data, 2, Some(cache.clone()));
        let first = PrefixKey::extend(None, &BlockKey::new(1, false, b"", &data[..BLOCK]));
        assert!(cache.get_state(&first).is_some(), "the first boundary's states were saved");
        cache.put_state_bytes(&first, b"not hasher states");
        digests(&data, 2, Some(cache.clone()));

        // And states of the right shape are taken as they are, not hashed again: states saved
        // for other input give other digests (which is why the cache is its owner's alone).
        let (other_input, other_output) =
            (Sha256::new_with_prefix(b"other input"), Sha256::new_with_prefix(b"other output"));
        cache.put_state(&first, &other_input, &other_output);
        // (One boundary only: the second's states, saved above, would replace the first's.)
        let one_boundary = &data[..BLOCK + 100];
        let mut writer = ParallelGzip::new(Vec::new(), 1, 2).with_cache(Some(cache.clone()));
        writer.write_all(one_boundary).unwrap();
        let (taken, _) = writer.finish().unwrap();
        assert_ne!(taken.input.0, Digest::of(one_boundary), "the saved states were not used");
    }

    #[test]
    fn one_gzip_member_with_a_fixed_header_and_a_checked_trailer() {
        let data = sample(3 * BLOCK + 5);
        let blob = gzip(&data, 2, 4096);
        assert_eq!(&blob[..10], [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, GZIP_OS_UNKNOWN]);
        let n = blob.len();
        assert_eq!(blob[n - 8..n - 4], crc32fast::hash(&data).to_le_bytes());
        assert_eq!(blob[n - 4..], (data.len() as u32).to_le_bytes());
        // A multi-member reader would accept concatenated members too; a single-member one only
        // one member: decode with it and check nothing is left over.
        let mut decoder = flate2::read::GzDecoder::new(&blob[..]);
        let mut back = Vec::new();
        decoder.read_to_end(&mut back).unwrap();
        assert_eq!(back.len(), data.len());
    }

    #[test]
    fn blocks_still_compress_like_one_stream() {
        let data = sample(8 * BLOCK);
        let parallel = gzip(&data, 2, data.len()).len();
        let mut single = flate2::write::GzEncoder::new(Vec::new(), Compression::new(1));
        single.write_all(&data).unwrap();
        let single = single.finish().unwrap().len();
        assert!(parallel * 100 <= single * 102, "parallel {parallel} vs one stream {single} bytes");
    }
}
