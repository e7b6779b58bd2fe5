//! A real CNCF distribution registry (Debian's `docker-registry`) on 127.0.0.1, optionally behind
//! htpasswd, with its access log parsed so tests can count the requests it received.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "pusher";
pub const PASSWORD: &str = "correct-horse";

pub struct Registry {
    pub port: u16,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    pub auth: bool,
}

/// One request as the registry logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    pub uri: String,
    pub status: u16,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Registry {
    pub fn start(auth: bool) -> Registry {
        Registry::start_on(free_port(), auth)
    }

    /// A registry on a given port (for tests where it comes up after its clients).
    pub fn start_on(port: u16, auth: bool) -> Registry {
        let dir = super::tempdir();
        let mut config = format!(
            "version: 0.1\nlog: {{ level: info, formatter: text }}\n\
             storage: {{ filesystem: {{ rootdirectory: {} }}, delete: {{ enabled: true }} }}\n\
             http: {{ addr: 127.0.0.1:{port}, secret: test-secret }}\n",
            dir.path().join("data").display()
        );
        if auth {
            let htpasswd = dir.path().join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", USER, PASSWORD])
                .output()
                .expect("htpasswd (apache2-utils)");
            fs::write(&htpasswd, out.stdout).unwrap();
            config +=
                &format!("auth: {{ htpasswd: {{ realm: test-realm, path: {} }} }}\n", htpasswd.display());
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let log = dir.path().join("registry.log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("docker-registry is not installed (apt-get install docker-registry)");
        let registry = Registry { port, child, log, _dir: dir, auth };
        let deadline = Instant::now() + Duration::from_secs(10);
        while http(port, "GET", "/v2/", &[]).0 == 0 {
            assert!(
                Instant::now() < deadline,
                "registry did not start: {}",
                fs::read_to_string(&registry.log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        registry
    }

    /// Copies the workerd base image (the test layout) to `workerd-base:1`, straight (not through
    /// any proxy); returns its `docker://` reference.
    pub fn push_base(&self) -> String {
        let reference = format!("docker://{}/workerd-base:1", self.host());
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false", super::base_layout(), &reference])
            .output()
            .expect("skopeo is not installed");
        assert!(out.status.success(), "skopeo copy of the base: {}", String::from_utf8_lossy(&out.stderr));
        reference
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where the registry keeps its blobs and manifests on disk.
    pub fn storage_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    pub fn creds_args(&self) -> Vec<String> {
        if self.auth {
            vec!["--creds".into(), format!("{USER}:{PASSWORD}")]
        } else {
            vec![]
        }
    }

    pub fn auth_header(&self) -> Vec<(String, String)> {
        if !self.auth {
            return vec![];
        }
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        vec![("Authorization".into(), format!("Basic {token}"))]
    }

    /// Every request the registry has answered so far, in order.
    pub fn requests(&self) -> Vec<Logged> {
        std::thread::sleep(Duration::from_millis(100));
        let text = fs::read_to_string(&self.log).unwrap();
        text.lines().filter_map(parse_log_line).collect()
    }

    /// How many `method` requests on URIs starting with `prefix` were answered with `status`.
    /// Unlike [`Registry::requests`], this counts the requests that ended in an error too.
    pub fn answered(&self, method: &str, prefix: &str, status: u16) -> usize {
        std::thread::sleep(Duration::from_millis(100));
        let text = fs::read_to_string(&self.log).unwrap();
        let status = status.to_string();
        // A request answered with several errors (a manifest naming five missing blobs) has a
        // line for each: requests are counted by their id.
        let ids: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| l.contains("msg=\"response completed"))
            .filter(|l| field(l, "http.request.method=") == Some(method))
            .filter(|l| field(l, "http.request.uri=").is_some_and(|u| u.starts_with(prefix)))
            .filter(|l| field(l, "http.response.status=") == Some(status.as_str()))
            .filter_map(|l| field(l, "http.request.id="))
            .collect();
        ids.len()
    }

    /// GET a blob; returns status and body.
    pub fn blob(&self, repo: &str, digest: &str) -> (u16, Vec<u8>) {
        http(self.port, "GET", &format!("/v2/{repo}/blobs/{digest}"), &self.auth_header())
    }

    /// GET a manifest (OCI accept header); returns status and body.
    pub fn manifest(&self, repo: &str, reference: &str) -> (u16, Vec<u8>) {
        let mut headers = self.auth_header();
        headers.push(("Accept".into(), "application/vnd.oci.image.manifest.v1+json".into()));
        http(self.port, "GET", &format!("/v2/{repo}/manifests/{reference}"), &headers)
    }

    pub fn blob_exists(&self, repo: &str, digest: &str) -> bool {
        http(self.port, "HEAD", &format!("/v2/{repo}/blobs/{digest}"), &self.auth_header()).0 == 200
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    let rest = &line[start..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split(' ').next(),
    }
}

/// A request the registry answered: a "response completed" line, or the warning it logs instead
/// when it answers 401 with an auth challenge.
fn parse_log_line(line: &str) -> Option<Logged> {
    let status = if line.contains("msg=\"response completed\"") {
        field(line, "http.response.status=")?.parse().ok()?
    } else if line.contains("msg=\"error authorizing context") {
        401
    } else {
        return None;
    };
    Some(Logged {
        method: field(line, "http.request.method=")?.to_owned(),
        uri: field(line, "http.request.uri=")?.to_owned(),
        status,
    })
}

/// A minimal HTTP/1.1 client for checks (status 0 when nothing answers).
pub fn http(port: u16, method: &str, path: &str, headers: &[(String, String)]) -> (u16, Vec<u8>) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return (0, vec![]) };
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request += &format!("{k}: {v}\r\n");
    }
    request += "\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, vec![]);
    }
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    if reader.read_line(&mut status_line).is_err() {
        return (0, vec![]);
    }
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut body = Vec::new();
    let _ = reader.read_to_end(&mut body);
    let body = match body.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => body[i + 4..].to_vec(),
        None => vec![],
    };
    (status, body)
}

/// Fails if any blob in the registry's storage (gzip layers unpacked) holds one of `values`.
pub fn scan_registry(dir: &Path, values: &[&str]) {
    let mut scanned = 0;
    for (path, bytes) in super::tree(dir) {
        let mut text = bytes.clone();
        if bytes.starts_with(&[0x1f, 0x8b]) {
            text.clear();
            flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut text).unwrap();
        }
        let text = String::from_utf8_lossy(&text);
        for value in values {
            assert!(!text.contains(value), "registry file {path} holds a secret value");
        }
        scanned += 1;
    }
    assert!(scanned > 10, "the registry's storage was not found: {}", dir.display());
}
