//! `workerbundle api` as its own process against a cluster (tests/support/cluster.rs) and the S3
//! server, with a token table written for the test; plus a small curl-based client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use serde_json::Value;

use super::cluster::Cluster;
use super::s3::{S3Server, SECRET_KEY};

pub const BUCKET: &str = "workers";

pub struct ApiServer {
    /// `http://127.0.0.1:PORT/client/v4`, as the API printed it.
    pub url: String,
    pub tokens: PathBuf,
    child: Mutex<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The token-table line of `token` for `account`.
pub fn token_line(account: &str, token: &str) -> String {
    format!("{account} {}\n", workerbundle::api::token_hash(token))
}

impl ApiServer {
    /// Starts the API on a free port, its objects in the cluster's test namespace, with a token
    /// table of `(account, token)` pairs.
    pub fn start(cluster: &Cluster, s3: &S3Server, tokens: &[(&str, &str)], args: &[&str]) -> ApiServer {
        Self::start_logging(cluster, s3, tokens, args, "info,kube=warn")
    }

    /// `start` with `RUST_LOG` set to `filter`.
    pub fn start_logging(
        cluster: &Cluster,
        s3: &S3Server,
        tokens: &[(&str, &str)],
        args: &[&str],
        filter: &str,
    ) -> ApiServer {
        let dir = super::tempdir();
        let table = dir.path().join("tokens");
        let text: String = tokens.iter().map(|(account, token)| token_line(account, token)).collect();
        std::fs::write(&table, format!("# account sha256(token)\n{text}")).unwrap();
        let mut all = vec!["--namespace".to_owned(), cluster.namespace.clone(), "--tokens".to_owned()];
        all.push(table.display().to_string());
        all.extend(args.iter().map(|a| a.to_string()));
        Self::spawn(cluster, s3, &all, table, dir, filter)
    }

    /// Starts the API with only `args` choosing the token source and the namespaces.
    pub fn start_bare(cluster: &Cluster, s3: &S3Server, args: &[&str]) -> ApiServer {
        let dir = super::tempdir();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Self::spawn(cluster, s3, &args, dir.path().join("no-token-file"), dir, "info,kube=warn")
    }

    fn spawn(
        cluster: &Cluster,
        s3: &S3Server,
        args: &[String],
        tokens: PathBuf,
        dir: tempfile::TempDir,
        filter: &str,
    ) -> ApiServer {
        s3.create_bucket(BUCKET);
        let log = dir.path().join("api.log");
        let mut command = Command::new(super::BIN);
        command
            .args(["api", "--listen", "127.0.0.1:0", "--bucket", BUCKET])
            .args(["--s3-endpoint", &s3.endpoint()])
            .args(args)
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("WORKERBUNDLE_WORKERD", super::workerd_binary())
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in s3.env(SECRET_KEY) {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().to_owned();
        assert!(
            url.starts_with("http://127.0.0.1:") && url.ends_with("/client/v4"),
            "the API printed {url:?} instead of its URL:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        ApiServer { url, tokens, child: Mutex::new(child), log, _dir: dir }
    }

    /// `http://127.0.0.1:PORT`, without the API's base path.
    pub fn origin(&self) -> String {
        self.url.trim_end_matches(workerbundle::api::BASE_PATH).to_owned()
    }

    /// The API's log, without terminal colours.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    pub fn is_running(&self) -> bool {
        matches!(self.child.lock().unwrap().try_wait(), Ok(None))
    }

    /// SIGKILL (no chance to finish anything), then waits for the process to be gone.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&self) -> std::process::ExitStatus {
        super::terminate(&self.child, "the API", || self.log())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A request body for [`curl`].
pub enum Body<'a> {
    None,
    Json(String),
    /// `-F` arguments (`name=@file;filename=...;type=...` or `name=value`).
    Form(Vec<String>),
    /// The same, sent chunked: no Content-Length for the server to check up front.
    ChunkedForm(Vec<String>),
    /// Raw bytes with a content type.
    Raw(&'a str, &'a [u8]),
}

/// One request with the real curl; returns the status and the JSON body (Null when not JSON).
pub fn curl(method: &str, url: &str, token: Option<&str>, body: Body) -> (u16, Value) {
    let dir = super::tempdir();
    let mut command = Command::new("curl");
    command.args(["-s", "-g", "-o", "-", "-w", "\n%{http_code}", "-X", method, url]);
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    match body {
        Body::None => {}
        Body::Json(text) => {
            command.args(["-H", "Content-Type: application/json", "--data-binary", &text]);
        }
        Body::Form(fields) => {
            for field in fields {
                command.args(["-F", &field]);
            }
        }
        Body::ChunkedForm(fields) => {
            command.args(["-H", "Transfer-Encoding: chunked"]);
            for field in fields {
                command.args(["-F", &field]);
            }
        }
        Body::Raw(content_type, bytes) => {
            let file = dir.path().join("body");
            std::fs::write(&file, bytes).unwrap();
            command
                .args(["-H", &format!("Content-Type: {content_type}"), "--data-binary"])
                .arg(format!("@{}", file.display()));
        }
    }
    let out = command.output().expect("curl is not installed");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A form for an upload: the metadata part and one part per (name, content type, file) module.
pub fn form(dir: &Path, metadata: &str, modules: &[(&str, &str, &[u8])]) -> Vec<String> {
    let meta = dir.join("metadata.part");
    std::fs::write(&meta, metadata).unwrap();
    let mut fields = vec![format!("metadata=<{};type=application/json", meta.display())];
    for (i, (name, content_type, content)) in modules.iter().enumerate() {
        let file = dir.join(format!("module-{i}"));
        std::fs::write(&file, content).unwrap();
        fields.push(format!("{name}=@{};filename={name};type={content_type}", file.display()));
    }
    fields
}
