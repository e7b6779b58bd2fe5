//! Layer assembly throughput beside `gzip -1 | openssl dgst -sha256` on the same bytes.
//!
//!     cargo run --release --example bench_layer -- --size-mib 128 --files 64
//!
//! Generates JavaScript-like modules (deterministic, compressible like real code), assembles them
//! into a layer with the builder's one-pass writer (tar -> sha256 -> gzip -> sha256), and pipes the
//! very same tar stream through `gzip -1 | openssl dgst -sha256`, the two taking turns. Prints the
//! median MiB/s of each (over the uncompressed tar size) and their ratio.

use std::io::{self, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use workerbundle::digest::Digest;
use workerbundle::image::layer::LayerBuilder;

#[derive(Parser)]
struct Args {
    /// Total size of the generated modules.
    #[arg(long, default_value_t = 128)]
    size_mib: usize,
    /// How many module files to split them into.
    #[arg(long, default_value_t = 64)]
    files: usize,
    /// Runs of each side; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

/// xorshift: deterministic, dependency-free pseudo-random words.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn javascript(size: usize, rng: &mut Rng) -> Vec<u8> {
    const WORDS: [&str; 24] = [
        "const", "return", "await", "request", "response", "headers", "env", "fetch", "JSON", "parse", "if",
        "else", "for", "of", "new", "URL", "export", "default", "async", "function", "=>", "null", "this",
        "length",
    ];
    let mut out = Vec::with_capacity(size + 64);
    while out.len() < size {
        let word = WORDS[(rng.next() % WORDS.len() as u64) as usize];
        out.extend_from_slice(word.as_bytes());
        match rng.next() % 16 {
            0 => out.extend_from_slice(b";\n  "),
            1 => out.extend_from_slice(format!("_{:x}", rng.next() % 4096).as_bytes()),
            2 => out.extend_from_slice(format!(" = \"{:x}\" ", rng.next()).as_bytes()),
            3 => out.extend_from_slice(b"() {\n    "),
            _ => out.push(b' '),
        }
    }
    out.truncate(size);
    out
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn mib_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / time.as_secs_f64()
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let per_file = args.size_mib * 1024 * 1024 / args.files.max(1);
    let mut layer = LayerBuilder::new();
    for i in 0..args.files {
        layer.file(
            &format!("etc/workerd/workers/bench/src/module{i:04}.js"),
            javascript(per_file, &mut rng),
            0o644,
        );
    }

    // The exact tar stream the builder hashes, for the peer to compress.
    let tar = {
        let (digests, blob) = layer.to_blob(0)?;
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&blob[..]).read_to_end(&mut tar)?;
        assert_eq!(Digest::of(&tar), digests.diff_id, "diffID must be the sha256 of the tar stream");
        tar
    };
    let tar_size = tar.len() as u64;

    let tar_file = tempfile::NamedTempFile::new()?;
    std::fs::write(tar_file.path(), &tar)?;
    // The two sides take turns, one run each, so that a slower stretch of the machine (a VM's
    // speed drifts within minutes) weighs on both alike instead of on whichever ran during it.
    let mut ours = Vec::new();
    let mut peer = Vec::new();
    let mut compressed = 0;
    for _ in 0..args.runs {
        let start = Instant::now();
        let (digests, _) = layer.write(io::sink(), 0)?;
        ours.push(start.elapsed());
        compressed = digests.size;

        let input = std::fs::File::open(tar_file.path())?;
        let start = Instant::now();
        let out = Command::new("sh")
            .args(["-c", "gzip -1 | openssl dgst -sha256"])
            .stdin(input)
            .stdout(Stdio::piped())
            .output()?;
        peer.push(start.elapsed());
        if !out.status.success() {
            return Err(io::Error::other("gzip -1 | openssl dgst -sha256 failed"));
        }
    }

    let (ours, peer) = (median(ours), median(peer));
    let mut stdout = io::stdout().lock();
    writeln!(
        stdout,
        "input: {} files, {:.1} MiB of tar, {} runs each (median)",
        args.files,
        tar_size as f64 / 1048576.0,
        args.runs
    )?;
    writeln!(
        stdout,
        "workerbundle layer (tar+sha256+gzip-1+sha256): {:>8.1} MiB/s  ({:?}, {:.1}x smaller)",
        mib_per_s(tar_size, ours),
        ours,
        tar_size as f64 / compressed as f64
    )?;
    writeln!(
        stdout,
        "gzip -1 | openssl dgst -sha256:                {:>8.1} MiB/s  ({:?})",
        mib_per_s(tar_size, peer),
        peer
    )?;
    writeln!(stdout, "ratio: {:.2}x", peer.as_secs_f64() / ours.as_secs_f64())?;
    Ok(())
}
