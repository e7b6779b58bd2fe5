//! Fetch-and-assemble time for a 3-worker bundle from S3, cold and warm cache, beside
//! `aws s3 cp --recursive` of the same objects, all against one s3s-fs started here.
//!
//!     cargo run --release --example bench_s3 -- --runs 5
//!
//! Needs s3s-fs (scripts/setup installs it) and the AWS CLI (Debian's awscli).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use workerbundle::build::{build, BuildContext, BuildRequest};
use workerbundle::image::reference::ImageRef;
use workerbundle::registry::Registries;
use workerbundle::source::S3Options;
use workerbundle::source::WorkerInput;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// A base image layout (assembled with `workerbundle base-image`).
    #[arg(long, default_value = "oci:out/base:workerd")]
    base: String,
}

const ACCESS: &str = "bench-access";
const SECRET: &str = "bench-secret-key";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn seed(root: &Path) {
    // Three workers: 100 small modules each, one of them with 1 MiB of code.
    for (w, name) in ["alpha", "beta", "gamma"].iter().enumerate() {
        let dir = root.join("workers/acct").join(name).join("v1");
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        std::fs::write(dir.join("index.js"), "export default { fetch() { return new Response('hi'); } };\n")
            .unwrap();
        for i in 0..100 {
            std::fs::write(dir.join(format!("lib/m{i:03}.js")), format!("export const v{i} = {};\n", i * w))
                .unwrap();
        }
        if w == 0 {
            let code: String = (0..30_000)
                .map(|i| format!("export const k{i:05} = \"{:016x}\";\n", i * 2654435761u64))
                .collect();
            std::fs::write(dir.join("big.js"), &code.as_bytes()[..1 << 20]).unwrap();
        }
    }
}

fn main() {
    let args = Args::parse();
    let root = tempfile::tempdir().unwrap();
    seed(root.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let s3s =
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/s3s-fs")).filter(|p| p.exists());
    let mut server = Command::new(s3s.unwrap_or_else(|| "s3s-fs".into()))
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            ACCESS,
            "--secret-key",
            SECRET,
        ])
        .arg(root.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("s3s-fs");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let endpoint = format!("http://127.0.0.1:{port}");
    std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");

    let out = tempfile::tempdir().unwrap();
    let request = BuildRequest {
        base: ImageRef::parse(&args.base).expect("--base"),
        base_name: None,
        workers: ["alpha", "beta", "gamma"]
            .iter()
            .map(|n| WorkerInput::parse(&format!("{n}=s3://workers/acct/{n}/v1/")).unwrap())
            .collect(),
        output: ImageRef::parse(&format!("oci:{}:bench", out.path().join("img").display())).unwrap(),
        source_date_epoch: 0,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (mut cold, mut warm, mut cli) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs {
        // A new context is a cold cache, as in a new process.
        let context = BuildContext::new(
            Registries::new(Default::default()),
            S3Options { endpoint: Some(endpoint.clone()), ..Default::default() },
        );
        let start = Instant::now();
        runtime.block_on(build(&request, &context)).expect("cold build");
        cold.push(start.elapsed());
        let start = Instant::now();
        runtime.block_on(build(&request, &context)).expect("warm build");
        warm.push(start.elapsed());

        let target = out.path().join("cp");
        let _ = std::fs::remove_dir_all(&target);
        let start = Instant::now();
        let status = Command::new("/usr/bin/aws")
            .args(["s3", "cp", "--recursive", "--quiet", "--endpoint-url", &endpoint, "s3://workers/acct/"])
            .arg(&target)
            .status()
            .expect("aws (apt-get install awscli)");
        cli.push(start.elapsed());
        assert!(status.success(), "aws s3 cp failed");
    }
    let _ = server.kill();
    let _ = server.wait();
    let (cold, warm, cli) = (median(cold), median(warm), median(cli));
    println!("3 workers, 303 objects, 1.3 MiB, {} runs, medians", args.runs);
    println!("workerbundle fetch+assemble, cold cache: {cold:>10.1?}");
    println!("workerbundle fetch+assemble, warm cache: {warm:>10.1?}");
    println!("aws s3 cp --recursive (fetch only):      {cli:>10.1?}");
    println!("ratio cold: {:.1}x faster than aws s3 cp", cli.as_secs_f64() / cold.as_secs_f64());
}
