//! A kubeconfig pointing kubectl and kube-rs at the server: plain HTTP, no credentials.

/// One cluster, user and context, all named `memory-apiserver`, with the context current.
pub fn render(url: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: memory-apiserver
  cluster:
    server: {url}
users:
- name: memory-apiserver
  user: {{}}
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
