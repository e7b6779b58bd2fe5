//! A kubeconfig pointing kubectl and kube-rs at the server: loopback, and, when the server requires
//! a token, HTTPS with the server's CA and the token.

use base64::Engine;

/// What a client needs beyond the URL; both `None` for a plain-HTTP server open to all.
#[derive(Debug, Clone, Copy, Default)]
pub struct Access<'a> {
    pub token: Option<&'a str>,
    /// The CA certificate (PEM) of a server that speaks TLS.
    pub ca_pem: Option<&'a str>,
}

/// One cluster, user and context, all named `memory-apiserver`, with the context current.
pub fn render(url: &str, namespace: &str, access: Access<'_>) -> String {
    let ca = match access.ca_pem {
        Some(pem) => format!(
            "\n    certificate-authority-data: {}",
            base64::engine::general_purpose::STANDARD.encode(pem)
        ),
        None => String::new(),
    };
    let user = match access.token {
        // A JSON string is a YAML double-quoted scalar: a token of digits stays a string.
        Some(token) => format!("\n    token: {}", serde_json::Value::from(token)),
        None => " {}".to_string(),
    };
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: memory-apiserver
  cluster:
    server: {url}{ca}
users:
- name: memory-apiserver
  user:{user}
contexts:
- name: memory-apiserver
  context:
    cluster: memory-apiserver
    user: memory-apiserver
    namespace: {namespace}
current-context: memory-apiserver
preferences: {{}}
"
    )
}

/// Writes [`render`]'s kubeconfig to `path`: owner-only (it may hold the token) and atomically,
/// so a reader never sees half of it.
pub fn write(path: &std::path::Path, url: &str, namespace: &str, access: Access<'_>) -> std::io::Result<()> {
    crate::files::write_private(path, render(url, namespace, access).as_bytes())
}
