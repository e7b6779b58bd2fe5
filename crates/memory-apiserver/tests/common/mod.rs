//! Test helpers: kubectl against a fresh server with its own kubeconfig and discovery cache, and a
//! minimal HTTP/1.1 client so plain-HTTP tests need no client library.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use memory_apiserver::{MemoryApiServer, Options};
use serde_json::Value;

pub struct Cluster {
    pub server: MemoryApiServer,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Cluster {
        let server = MemoryApiServer::start_with(options).expect("server starts");
        let dir = tempfile::tempdir().expect("temp dir");
        server.write_kubeconfig(&dir.path().join("kubeconfig"), "default").expect("kubeconfig");
        Cluster { server, dir }
    }

    fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("kubectl");
        command
            .arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .args(args)
            .env("KUBECACHEDIR", self.dir.path().join("cache"))
            .env_remove("KUBECONFIG");
        command
    }

    /// Runs kubectl; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.kubectl_command(args).output().expect("kubectl runs");
        outcome(out)
    }

    /// kubectl that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.kubectl(args);
        assert!(ok, "kubectl {args:?} failed:\n{stderr}\n{stdout}");
        stdout
    }

    /// `kubectl apply -f -` (plus `extra` flags) with `yaml` on stdin.
    pub fn apply(&self, yaml: &str, extra: &[&str]) -> (bool, String, String) {
        let mut args = vec!["apply", "-f", "-"];
        args.extend_from_slice(extra);
        let mut child = self
            .kubectl_command(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child.stdin.take().expect("stdin").write_all(yaml.as_bytes()).expect("write stdin");
        outcome(child.wait_with_output().expect("kubectl finishes"))
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.kubectl_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs")
    }

    pub fn http(&self, method: &str, path: &str, content_type: &str, body: &str) -> Response {
        request(&self.server.url(), method, path, content_type, body)
    }

    pub fn get(&self, path: &str) -> Response {
        self.http("GET", path, "", "")
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.http("POST", path, "application/json", &body.to_string())
    }

    pub fn put(&self, path: &str, body: &Value) -> Response {
        self.http("PUT", path, "application/json", &body.to_string())
    }

    pub fn patch(&self, path: &str, content_type: &str, body: &str) -> Response {
        self.http("PATCH", path, content_type, body)
    }

    pub fn delete(&self, path: &str) -> Response {
        self.http("DELETE", path, "", "")
    }

    /// Reads up to `count` watch events from `path` (a `watch=true` URL) within `within`.
    pub fn watch(&self, path: &str, count: usize, within: Duration) -> Vec<Value> {
        watch_events(&self.server.url(), path, count, within)
    }
}

fn outcome(out: Output) -> (bool, String, String) {
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

fn send(url: &str, method: &str, path: &str, content_type: &str, body: &str) -> TcpStream {
    send_as(url, None, method, path, content_type, body)
}

fn send_as(
    url: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> TcpStream {
    let address = host_port(url);
    let mut stream = TcpStream::connect(&address).expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: memtest/1.0\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if !content_type.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("write head");
    stream.write_all(body.as_bytes()).expect("write body");
    stream
}

fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("status line");
    let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status code");
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    (status, headers)
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
}

/// Reads one chunk of a chunked body; `None` at the end.
fn read_chunk(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut size_line = String::new();
    if reader.read_line(&mut size_line).ok()? == 0 {
        return None;
    }
    let size = usize::from_str_radix(size_line.trim(), 16).ok()?;
    let mut data = vec![0; size];
    reader.read_exact(&mut data).ok()?;
    let mut crlf = [0; 2];
    reader.read_exact(&mut crlf).ok()?;
    if size == 0 {
        None
    } else {
        Some(data)
    }
}

pub fn request(url: &str, method: &str, path: &str, content_type: &str, body: &str) -> Response {
    request_as(url, None, method, path, content_type, body)
}

/// `request` with `Authorization: Bearer <token>` when `token` is given.
pub fn request_as(
    url: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Response {
    let stream = send_as(url, token, method, path, content_type, body);
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let mut data = Vec::new();
    if is_chunked(&headers) {
        while let Some(chunk) = read_chunk(&mut reader) {
            data.extend(chunk);
        }
    } else {
        reader.read_to_end(&mut data).expect("body");
    }
    Response { status, headers, body: String::from_utf8_lossy(&data).into() }
}

pub fn watch_events(url: &str, path: &str, count: usize, within: Duration) -> Vec<Value> {
    let stream = send(url, "GET", path, "", "");
    // A read that outlasts the whole window ends the watch; chunks are never split by a timeout.
    stream.set_read_timeout(Some(within)).expect("timeout");
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    assert_eq!(status, 200, "watch status");
    let deadline = Instant::now() + within;
    let mut buffer = Vec::new();
    let mut events = Vec::new();
    while events.len() < count && Instant::now() < deadline {
        let chunk = if is_chunked(&headers) {
            match read_chunk(&mut reader) {
                Some(c) => c,
                None => break,
            }
        } else {
            let mut c = vec![0; 4096];
            match reader.read(&mut c) {
                Ok(0) => break,
                Ok(n) => c[..n].to_vec(),
                Err(_) => break,
            }
        };
        buffer.extend(chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            events.push(serde_json::from_slice(&line).expect("event is JSON"));
        }
    }
    events
}

pub const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.dev
spec:
  group: example.dev
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
    shortNames: [wd]
    categories: [all]
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
    additionalPrinterColumns:
    - name: Size
      type: integer
      jsonPath: .spec.size
    - name: Worker
      type: string
      jsonPath: .spec.workers[0].name
    - name: Ready
      type: string
      jsonPath: .status.conditions[?(@.type=="Ready")].status
    - name: Age
      type: date
      jsonPath: .metadata.creationTimestamp
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [template]
            x-kubernetes-validations:
            - rule: "!has(oldSelf.template) || self.template == oldSelf.template"
              message: template is immutable
            properties:
              template:
                type: object
                required: [scriptName]
                properties:
                  scriptName:
                    type: string
                    pattern: '^[a-z][a-z0-9-]*$'
              size:
                type: integer
                minimum: 0
                default: 3
              historyLimit:
                type: integer
                minimum: 0
              mode:
                type: string
                enum: [fast, slow]
              labels:
                type: object
                additionalProperties:
                  type: string
              workers:
                type: array
                x-kubernetes-validations:
                - rule: "self.all(w, self.exists_one(x, x.workerNumber == w.workerNumber))"
                  message: workerNumber must be unique
                items:
                  type: object
                  required: [workerNumber]
                  properties:
                    name:
                      type: string
                    workerNumber:
                      type: integer
          status:
            type: object
            properties:
              observedGeneration:
                type: integer
              conditions:
                type: array
                items:
                  type: object
                  x-kubernetes-preserve-unknown-fields: true
"#;

/// A cluster with the Widget CRD applied through kubectl.
pub fn with_crd() -> Cluster {
    let cluster = Cluster::start();
    let (ok, _, err) = cluster.apply(CRD, &[]);
    assert!(ok, "CRD apply failed: {err}");
    cluster
}

pub const WIDGETS: &str = "/apis/example.dev/v1/namespaces/default/widgets";

pub fn widget(name: &str) -> Value {
    serde_json::json!({
        "apiVersion": "example.dev/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"template": {"scriptName": "hello"}},
    })
}
