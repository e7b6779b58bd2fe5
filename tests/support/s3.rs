//! A real S3-compatible server that checks SigV4 signatures: s3s-fs 0.14.1 (installed by
//! scripts/setup) on 127.0.0.1, storing objects as plain files under a temporary directory.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "wb-test-access";
pub const SECRET_KEY: &str = "wb-test-secret-0123456789";

pub struct S3Server {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> S3Server {
        let dir = super::tempdir();
        let port = super::registry::free_port();
        let child = Command::new(s3s_fs())
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                ACCESS_KEY,
                "--secret-key",
                SECRET_KEY,
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs is not installed (scripts/setup installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        S3Server { port, child, dir }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stores an object (s3s-fs keeps each object as a file named by its key).
    pub fn put(&self, bucket: &str, key: &str, content: &[u8]) {
        let path = self.dir.path().join(bucket).join(key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    pub fn create_bucket(&self, bucket: &str) {
        fs::create_dir_all(self.dir.path().join(bucket)).unwrap();
    }

    /// Uploads every file of a directory under `prefix`.
    pub fn put_dir(&self, bucket: &str, prefix: &str, dir: &Path) {
        for (path, content) in super::tree(dir) {
            self.put(bucket, &format!("{prefix}{path}"), &content);
        }
    }

    /// Every object of a bucket, by key (empty when the bucket holds nothing).
    pub fn objects(&self, bucket: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
        let dir = self.dir.path().join(bucket);
        if dir.exists() {
            super::tree(&dir)
        } else {
            Default::default()
        }
    }

    /// The environment the standard AWS credential chain reads.
    pub fn env(&self, secret: &str) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), secret.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3s_fs() -> PathBuf {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin/s3s-fs"));
    match cargo_bin {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("s3s-fs"),
    }
}
