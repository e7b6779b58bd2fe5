//! With a token, the server speaks HTTPS and answers nobody who does not present the token (health
//! probes aside); the kubeconfig it writes carries the CA and the token, so kubectl goes on working.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use common::Cluster;
use memory_apiserver::{MemoryApiServer, Options};
use serde_json::{json, Value};

const TOKEN: &str = "0123456789";
const SECRETS: &str = "/api/v1/namespaces/default/secrets";

/// One HTTPS request trusting only the server's CA; (status, body).
fn request(
    server: &MemoryApiServer,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::pem::PemObject::from_pem_slice(server.ca_pem().expect("TLS").as_bytes())
        .expect("CA PEM");
    roots.add(ca).expect("CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let address = server.url().trim_start_matches("https://").to_string();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut stream = rustls::StreamOwned::new(connection, std::net::TcpStream::connect(&address).unwrap());
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut response = Vec::new();
    // The server may close without a TLS close_notify; what came before it is the answer.
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head: {text}"));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status code");
    (status, body.to_string())
}

#[test]
fn with_a_token_only_requests_that_carry_it_are_served() {
    let cluster = Cluster::start_with(Options { token: Some(TOKEN.to_string()), ..Options::default() });
    let server = &cluster.server;
    assert!(server.url().starts_with("https://127.0.0.1:"), "{}", server.url());
    let secret =
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}})
            .to_string();

    for (token, what) in
        [(None, "no token"), (Some("0123456788"), "a wrong token"), (Some("012345678"), "a prefix")]
    {
        for (method, path, body) in [
            ("GET", SECRETS, ""),
            ("POST", SECRETS, secret.as_str()),
            ("GET", "/version", ""),
            ("GET", "/api", ""),
        ] {
            let (code, body) = request(server, token, method, path, body);
            assert_eq!(code, 401, "{method} {path} with {what}: {body}");
            let status: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(status["kind"], "Status");
            assert_eq!(status["reason"], "Unauthorized");
            assert_eq!(status["code"], 401);
        }
    }
    // The refused POST stored nothing.
    let (code, body) = request(server, Some(TOKEN), "GET", &format!("{SECRETS}/s"), "");
    assert_eq!(code, 404, "{body}");

    // Probes stay open, as on a real server.
    for probe in ["/healthz", "/readyz", "/livez"] {
        assert_eq!(request(server, None, "GET", probe, "").0, 200, "{probe}");
    }

    let (code, body) = request(server, Some(TOKEN), "POST", SECRETS, &secret);
    assert_eq!(code, 201, "{body}");

    // kubectl reads the CA and the token from the kubeconfig, which only its owner may read.
    let kubeconfig = cluster.dir.path().join("kubeconfig");
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(text.contains(&format!("token: \"{TOKEN}\"")), "{text}");
    assert!(text.contains("certificate-authority-data: "), "{text}");
    assert_eq!(std::fs::metadata(&kubeconfig).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(cluster.ok(&["get", "secret", "s", "-o", "jsonpath={.data.k}"]), "dg==");
    assert_eq!(cluster.ok(&["get", "namespace", "default", "-o", "name"]).trim(), "namespace/default");

    // And kubectl with another token is refused.
    std::fs::write(&kubeconfig, text.replace(TOKEN, "9876543210")).unwrap();
    let (ok, _, stderr) = cluster.kubectl(&["get", "secret", "s"]);
    assert!(!ok);
    assert!(stderr.contains("provide credentials") || stderr.contains("Unauthorized"), "{stderr}");
}

#[test]
fn without_a_token_the_server_is_plain_http_and_the_kubeconfig_has_no_credentials() {
    let cluster = Cluster::start();
    assert!(cluster.server.url().starts_with("http://127.0.0.1:"));
    let text = std::fs::read_to_string(cluster.dir.path().join("kubeconfig")).unwrap();
    assert!(text.contains("user: {}") && !text.contains("token") && !text.contains("certificate"), "{text}");
    assert_eq!(common::request(&cluster.server.url(), "GET", SECRETS, "", "").status, 200);
}
