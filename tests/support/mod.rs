//! Test support: the real workerd base image, the real CLI, and real tools nobody here wrote
//! (umoci, skopeo, workerd, curl) to read back and run what the builder produced.
#![allow(dead_code)]

pub mod api;
pub mod cluster;
pub mod dev;
pub mod fault_proxy;
pub mod registry;
pub mod s3;
pub mod workload;
pub mod wrangler;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const BIN: &str = env!("CARGO_BIN_EXE_workerbundle");

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("wb-test-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// SIGTERM to a process the tests started, then its exit status; fails the test (with `log()`)
/// when it does not stop within 20 s.
pub fn terminate(
    child: &std::sync::Mutex<std::process::Child>,
    what: &str,
    log: impl Fn() -> String,
) -> std::process::ExitStatus {
    let pid = child.lock().unwrap().id();
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.lock().unwrap().try_wait() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "{what} did not stop on SIGTERM:\n{}", log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Runs the CLI with `SOURCE_DATE_EPOCH` unset, so only the arguments decide the output.
pub fn workerbundle(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("SOURCE_DATE_EPOCH").env("RUST_LOG", "warn").output().unwrap()
}

/// Runs the CLI with extra environment variables.
pub fn workerbundle_env(args: &[&str], env: &[(String, String)]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .env("RUST_LOG", std::env::var("WB_CLI_LOG").unwrap_or_else(|_| "warn".into()));
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

/// Runs the CLI and returns the digest it prints last, failing the test with its stderr otherwise.
pub fn workerbundle_ok(args: &[&str]) -> String {
    let out = workerbundle(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "workerbundle {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().unwrap_or_default().to_owned();
    assert!(last.starts_with("sha256:") && last.len() == 71, "last line is not a digest: {stdout}");
    last
}

/// The workerd base image, assembled once per test binary from the pinned package archives by
/// the real `workerbundle base-image`. The archives come from base-images/workerd/fetch.py.
pub fn base_layout() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        remove_bases_of_finished_runs();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("base-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let reference = format!("oci:{}:workerd", dir.display());
        let out = workerbundle(&["base-image", "--output", &reference]);
        assert!(
            out.status.success(),
            "assembling the base image failed (run base-images/workerd/fetch.py first):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        reference
    })
}

/// The pinned workerd (the base image's), extracted once per test binary from its npm archive in
/// the archive cache: what `api` and `run` load each worker with before storing or releasing it.
pub fn workerd_binary() -> &'static Path {
    static WORKERD: OnceLock<PathBuf> = OnceLock::new();
    WORKERD.get_or_init(|| {
        let recipe: serde_json::Value =
            serde_json::from_slice(&fs::read(repo_path("base-images/workerd/recipe.json")).unwrap()).unwrap();
        let archive = workerbundle::base_image::default_archive_dir()
            .join(recipe["workerd"]["archive"].as_str().unwrap());
        let member = recipe["workerd"]["binary"].as_str().unwrap();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("workerd-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let status =
            Command::new("tar").args(["xzf"]).arg(&archive).arg("-C").arg(&dir).arg(member).status().unwrap();
        assert!(
            status.success(),
            "cannot extract workerd from {} (run base-images/workerd/fetch.py)",
            archive.display()
        );
        dir.join(member)
    })
}

/// A static is never dropped, so each test binary's base layout (62 MB) outlives it: without this
/// sweep every `cargo test` left ten more of them in the target directory.
fn remove_bases_of_finished_runs() {
    let Ok(entries) = fs::read_dir(env!("CARGO_TARGET_TMPDIR")) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) =
            name.to_str().and_then(|n| n.strip_prefix("base-").or_else(|| n.strip_prefix("workerd-")))
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The testdata workers, as `--worker` arguments.
pub fn sample_worker_args() -> Vec<String> {
    vec![
        "--worker".into(),
        format!("hello={}", repo_path("testdata/workers/hello").display()),
        "--worker".into(),
        format!("secret={}", repo_path("testdata/workers/secret").display()),
    ]
}

pub fn build(workers: &[String], output: &str) -> String {
    let mut args: Vec<&str> = vec!["build", "--base", base_layout(), "--output", output];
    args.extend(workers.iter().map(String::as_str));
    workerbundle_ok(&args)
}

/// Reads a JSON blob of an OCI layout.
pub fn layout_json(dir: &Path, digest: &str) -> serde_json::Value {
    let hex = digest.strip_prefix("sha256:").unwrap();
    serde_json::from_slice(&fs::read(dir.join("blobs/sha256").join(hex)).unwrap()).unwrap()
}

pub fn manifest_layers(dir: &Path, manifest_digest: &str) -> Vec<String> {
    let manifest = layout_json(dir, manifest_digest);
    manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_owned()).collect()
}

/// Every file of a directory tree, by relative path.
pub fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(path.strip_prefix(root).unwrap().display().to_string(), fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            fs::copy(&path, &dest).unwrap();
        }
    }
}

/// `umoci unpack` of `oci:DIR:TAG` into a fresh bundle; returns the bundle directory.
pub fn umoci_unpack(layout_dir: &Path, tag: &str, into: &Path) -> PathBuf {
    let bundle = into.join("bundle");
    let out = Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:{tag}", layout_dir.display())])
        .arg(&bundle)
        .output()
        .expect("umoci is not installed (apt-get install umoci)");
    assert!(out.status.success(), "umoci unpack failed: {}", String::from_utf8_lossy(&out.stderr));
    bundle
}

/// What a worker answered.
#[derive(Debug)]
pub struct Served {
    pub bodies: BTreeMap<u16, String>,
    pub log: String,
}

/// Runs the image's own entrypoint from an unpacked bundle the way a container runtime would,
/// without one: in a private network and mount namespace, chrooted into the rootfs with /proc and
/// the /dev nodes bind-mounted, as the image's user, with the image's environment plus `extra_env`.
/// Then GETs `/` on every port and returns the bodies.
pub fn serve_from_bundle(bundle: &Path, extra_env: &[(&str, &str)], ports: &[u16]) -> Served {
    let runtime: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let process = &runtime["process"];
    let args: Vec<String> =
        process["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
    let (uid, gid) = (process["user"]["uid"].as_u64().unwrap(), process["user"]["gid"].as_u64().unwrap());
    let mut env: Vec<String> =
        process["env"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_owned()).collect();
    env.extend(extra_env.iter().map(|(k, v)| format!("{k}={v}")));

    let rootfs = bundle.join("rootfs");
    fs::create_dir_all(rootfs.join("proc")).unwrap();
    fs::create_dir_all(rootfs.join("dev")).unwrap();
    let devices = ["null", "zero", "random", "urandom"];
    for dev in devices {
        fs::write(rootfs.join("dev").join(dev), b"").unwrap();
    }
    let results = bundle.join("results");
    fs::create_dir_all(&results).unwrap();
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut script = String::from("set -u\nip link set lo up\n");
    for dev in devices {
        script += &format!(
            "mount --bind /dev/{dev} {}\n",
            quote(&rootfs.join("dev").join(dev).display().to_string())
        );
    }
    script += &format!("mount -t proc proc {}\n", quote(&rootfs.join("proc").display().to_string()));
    script += &format!(
        "env -i {} \"$(command -v chroot)\" --userspec={uid}:{gid} {} {} > {} 2>&1 &\npid=$!\n",
        env.iter().map(|e| quote(e)).collect::<Vec<_>>().join(" "),
        quote(&rootfs.display().to_string()),
        args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "),
        quote(&results.join("workerd.log").display().to_string()),
    );
    let curl_log = quote(&results.join("curl.log").display().to_string());
    for port in ports {
        script += &format!(
            "for i in $(seq 1 200); do curl -sS --max-time 10 -o {out} http://127.0.0.1:{port}/ 2>>{curl_log} && break; sleep 0.05; done\n",
            out = quote(&results.join(port.to_string()).display().to_string())
        );
    }
    script += &format!("kill -0 $pid 2>/dev/null || echo \"workerd exited early\" >> {curl_log}\n");
    script += "kill $pid\nwait $pid\nexit 0\n";
    let status = Command::new("unshare").args(["--net", "--mount", "sh", "-c", &script]).status().unwrap();
    assert!(status.success(), "the namespace script failed");
    let mut log = fs::read_to_string(results.join("workerd.log")).unwrap_or_default();
    let curl = fs::read_to_string(results.join("curl.log")).unwrap_or_default();
    if !curl.is_empty() {
        log += &format!("\n(curl: {})", curl.lines().rev().take(3).collect::<Vec<_>>().join(" | "));
    }
    let bodies = ports
        .iter()
        .map(|p| {
            (
                *p,
                fs::read_to_string(results.join(p.to_string()))
                    .unwrap_or_else(|_| panic!("no answer on port {p}; workerd said:\n{log}")),
            )
        })
        .collect();
    Served { bodies, log }
}

/// One plain HTTP/1.1 request to `base` (`http://host:port`); the status and the body.
pub fn http_request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let address = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let body = body.unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}
