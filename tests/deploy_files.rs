//! The files under deploy/ stay true to the code: the CRDs are what `workerbundle crd` generates,
//! and every sample is a valid object of our types.

use std::path::Path;

use serde_json::Value;
use workerbundle::crd::{crds_yaml, WorkerAccount, WorkerBundle, WorkerDeployment, WorkerRelease};

fn deploy(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn checked_in_crds_are_what_the_types_generate() {
    let generated = crds_yaml().unwrap();
    assert!(
        deploy("crds.yaml") == generated,
        "deploy/crds.yaml is stale: run `cargo run -- crd > deploy/crds.yaml` and commit it"
    );
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&generated).unwrap();
    let names: Vec<&str> = docs.iter().map(|d| d["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "workerdeployments.workerbundle.dev",
            "workerreleases.workerbundle.dev",
            "workeraccounts.workerbundle.dev",
            "workerbundles.workerbundle.dev"
        ]
    );
    for doc in &docs {
        let version = &doc["spec"]["versions"][0];
        assert_eq!(doc["spec"]["scope"], "Namespaced");
        assert_eq!(version["name"], "v1alpha1");
        assert!(
            version["subresources"]["status"].is_object(),
            "{} has a status subresource",
            doc["metadata"]["name"]
        );
        assert!(version["additionalPrinterColumns"].as_array().is_some_and(|c| !c.is_empty()));
    }
}

#[test]
fn samples_are_valid_objects_of_each_kind() {
    let account: WorkerAccount = serde_saphyr::from_str(&deploy("samples/workeraccount.yaml")).unwrap();
    assert_eq!(account.metadata.name.as_deref(), Some("1234"));
    let deployment: WorkerDeployment =
        serde_saphyr::from_str(&deploy("samples/workerdeployment.yaml")).unwrap();
    assert_eq!(deployment.spec.template.script_name, "hello");
    assert_eq!(deployment.metadata.labels.unwrap()["workerbundle.dev/account"], "1234");
    let release: WorkerRelease = serde_saphyr::from_str(&deploy("samples/workerrelease.yaml")).unwrap();
    assert_eq!(release.spec.template.script_name, "hello");
    let bundle: WorkerBundle = serde_saphyr::from_str(&deploy("samples/workerbundle.yaml")).unwrap();
    assert_eq!(bundle.spec.workers[0].worker_number, 8080);
}

#[test]
fn every_deploy_document_names_its_kind() {
    for file in ["rbac.yaml", "controller.yaml"] {
        let docs: Vec<Value> = serde_saphyr::from_str_multiple(&deploy(file)).unwrap();
        assert!(!docs.is_empty(), "{file}");
        for doc in docs {
            assert!(doc["apiVersion"].is_string() && doc["kind"].is_string(), "{file}: {doc}");
            assert!(doc["metadata"]["name"].is_string(), "{file}: {doc}");
        }
    }
}

#[test]
fn the_controller_may_hold_its_lease_and_is_probed_on_its_health_port() {
    let rbac: Vec<Value> = serde_saphyr::from_str_multiple(&deploy("rbac.yaml")).unwrap();
    let lease_verbs: Vec<&str> = rbac
        .iter()
        .filter(|d| d["kind"] == "Role")
        .flat_map(|d| d["rules"].as_array().unwrap())
        .filter(|r| r["apiGroups"][0] == "coordination.k8s.io" && r["resources"][0] == "leases")
        .flat_map(|r| r["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()))
        .collect();
    for verb in ["get", "create", "update"] {
        assert!(lease_verbs.contains(&verb), "no {verb} on leases: {lease_verbs:?}");
    }
    // The bundle controller watches its pods (whether a new image starts): read, never written.
    let pod_verbs: Vec<&str> = rbac
        .iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .flat_map(|d| d["rules"].as_array().unwrap())
        .filter(|r| r["apiGroups"][0] == "" && r["resources"].as_array().unwrap().iter().any(|p| p == "pods"))
        .flat_map(|r| r["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()))
        .collect();
    assert_eq!(pod_verbs, ["get", "list", "watch"]);

    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&deploy("controller.yaml")).unwrap();
    let container = &docs[0]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    let env: Vec<&str> =
        container["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"), "{env:?}");
}
