//! The `memory-apiserver` program: help, URL on stdout, kubeconfig file, stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn help_explains_the_program() {
    let out = Command::new(env!("CARGO_BIN_EXE_memory-apiserver")).arg("--help").output().expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for expected in ["in-memory Kubernetes API server", "--listen", "--kubeconfig", "--namespace", "SIGTERM"]
    {
        assert!(text.contains(expected), "{expected} in {text}");
    }
}

#[test]
fn serves_kubectl_until_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_memory-apiserver"))
        .args(["--listen", "127.0.0.1:0", "--namespace", "team", "--kubeconfig"])
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut url = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut url).expect("url line");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let written = std::fs::read_to_string(&kubeconfig).expect("kubeconfig written");
    assert!(written.contains(url.trim()) && written.contains("namespace: team"), "{written}");
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["get", "namespace", "default", "-o", "name"])
        .env("KUBECACHEDIR", dir.path().join("cache"))
        .output()
        .expect("kubectl runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "namespace/default");
    // An open watch must not keep the program from stopping.
    let address = url.trim().trim_start_matches("http://").to_string();
    let mut watch = std::net::TcpStream::connect(&address).expect("connect");
    let request = format!("GET /api/v1/namespaces?watch=true HTTP/1.1\r\nHost: {address}\r\n\r\n");
    std::io::Write::write_all(&mut watch, request.as_bytes()).expect("watch request");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let started = std::time::Instant::now();
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
    assert!(killed.success());
    let status = child.wait().expect("exits");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
