//! What a bundle's Deployment would run, without a kubelet: its container's environment as the
//! pod would get it, and its image copied out of the registry (skopeo), unpacked (umoci) and
//! served by the workerd inside it.

use std::collections::BTreeMap;
use std::process::Command;

use base64::Engine as _;
use serde_json::Value;

use super::cluster::Cluster;
use super::{serve_from_bundle, tempdir, umoci_unpack};

pub fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

pub fn secrets_hash(deployment: &Value) -> String {
    deployment["spec"]["template"]["metadata"]["annotations"]["workerbundle.dev/secrets-hash"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The environment the Deployment's container gets: its `env`, and each `envFrom` Secret's keys
/// under the prefix, with the values as the API server holds them. A missing Secret marked
/// `optional` adds nothing, as on a kubelet; a missing required one fails the test.
pub fn container_environment(cluster: &Cluster, deployment: &Value) -> Vec<(String, String)> {
    let container = container(deployment);
    let mut env: Vec<(String, String)> = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e["value"].as_str().unwrap_or_default().to_owned()))
        .collect();
    for source in container["envFrom"].as_array().into_iter().flatten() {
        let prefix = source["prefix"].as_str().unwrap_or_default();
        let name = source["secretRef"]["name"].as_str().expect("only Secret sources are expected");
        let Some(secret) = cluster.get("secret", name) else {
            assert_eq!(source["secretRef"]["optional"], true, "required secret {name} is missing");
            continue;
        };
        for (key, value) in secret["data"].as_object().into_iter().flatten() {
            let value = base64::engine::general_purpose::STANDARD.decode(value.as_str().unwrap()).unwrap();
            env.push((format!("{prefix}{key}"), String::from_utf8(value).unwrap()));
        }
    }
    env
}

/// Copies `image` out of the registry with skopeo, unpacks it with umoci and runs its workerd
/// with `env`; returns what each port answered.
pub fn serve(image: &str, env: &[(String, String)], ports: &[u16]) -> BTreeMap<u16, String> {
    let dir = tempdir();
    let layout = dir.path().join("layout");
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false", &format!("docker://{image}")])
        .arg(format!("oci:{}:bundle", layout.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo copy failed: {}", String::from_utf8_lossy(&out.stderr));
    let bundle = umoci_unpack(&layout, "bundle", dir.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    serve_from_bundle(&bundle, &env, ports).bodies
}

/// Marks the Deployment's current generation as fully rolled out, as the cluster would.
pub fn mark_rolled_out(cluster: &Cluster, name: &str) {
    let deployment = cluster.get("deployment", name).unwrap();
    let generation = deployment["metadata"]["generation"].as_i64().unwrap();
    let status = format!(
        r#"{{"status":{{"observedGeneration":{generation},"replicas":1,"updatedReplicas":1,"readyReplicas":1,"availableReplicas":1}}}}"#
    );
    cluster.kubectl_ok(&["patch", "deployment", name, "--subresource=status", "--type=merge", "-p", &status]);
}
