//! The generated CRDs against a Kubernetes API (KUBECONFIG's cluster, else the in-memory API
//! server) with the real kubectl: they install, the samples apply, and invalid objects are
//! refused by schema validation with a message that says what to fix.

mod support;

use support::cluster::Cluster;
use support::repo_path;

fn refused(cluster: &Cluster, yaml: &str) -> String {
    let out = cluster.apply_yaml(yaml);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "accepted:\n{yaml}\nstdout: {}", String::from_utf8_lossy(&out.stdout));
    stderr
}

#[test]
fn crds_install_and_samples_apply_with_kubectl() {
    let cluster = Cluster::start("samples");
    let out = cluster.kubectl_ok(&["apply", "-f", &repo_path("deploy/samples").to_string_lossy()]);
    for created in [
        "workeraccount.workerbundle.dev/1234",
        "workerdeployment.workerbundle.dev/hello",
        "workerrelease.workerbundle.dev/hello-sample",
        "workerbundle.workerbundle.dev/workers-1234-sample",
    ] {
        assert!(out.contains(created), "{created} missing from:\n{out}");
    }
    // Printer columns and short names come from the CRD.
    let table = cluster.kubectl_ok(&["get", "wd"]);
    assert!(table.contains("SCRIPT") && table.contains("hello"), "{table}");
    // The `workers` category lists every kind.
    let all = cluster.kubectl_ok(&["get", "workers", "-o", "name"]);
    for kind in ["workeraccount", "workerdeployment", "workerrelease", "workerbundle"] {
        assert!(all.contains(&format!("{kind}.workerbundle.dev/")), "{kind} missing from:\n{all}");
    }
    // Defaults from the schema are filled in by the server.
    let release = cluster.kubectl_ok(&["get", "workerrelease", "hello-sample", "-o", "yaml"]);
    assert!(release.contains("scriptName: hello"), "{release}");
    let deployment = cluster.kubectl_ok(&[
        "get",
        "workerdeployment",
        "hello",
        "-o",
        "jsonpath={.spec.template.vars[0].type}",
    ]);
    assert_eq!(deployment, "text", "the var type defaults to text");
    // Applying again changes nothing: no object gets a new resourceVersion.
    let versions = || {
        ["wd", "wr", "wa", "wb"].map(|kind| {
            cluster.kubectl_ok(&["get", kind, "-o", "jsonpath={.items[*].metadata.resourceVersion}"])
        })
    };
    let before = versions();
    assert!(before.iter().all(|v| !v.is_empty()), "{before:?}");
    cluster.kubectl_ok(&["apply", "-f", &repo_path("deploy/samples").to_string_lossy()]);
    assert_eq!(versions(), before);
}

#[test]
fn invalid_objects_are_refused_with_readable_messages() {
    let cluster = Cluster::start("invalid");
    let stderr = refused(
        &cluster,
        r#"apiVersion: workerbundle.dev/v1alpha1
kind: WorkerDeployment
metadata:
  name: bad
spec:
  releaseHistoryLimit: -1
  template:
    scriptName: Bad_Name
    scriptUrls: ["http://not-s3/x"]
    vars:
      - name: X
        type: yaml
        value: "1"
"#,
    );
    for expected in [
        "spec.releaseHistoryLimit",
        "greater than or equal to 0",
        "spec.template.scriptName",
        "spec.template.scriptUrls[0]",
        "spec.template.vars[0].type",
        "Unsupported value",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in:\n{stderr}");
    }

    let stderr = refused(
        &cluster,
        r#"apiVersion: workerbundle.dev/v1alpha1
kind: WorkerDeployment
metadata:
  name: no-urls
spec:
  template:
    scriptName: api
"#,
    );
    assert!(stderr.contains("spec.template.scriptUrls") && stderr.contains("Required value"), "{stderr}");

    let stderr = refused(
        &cluster,
        r#"apiVersion: workerbundle.dev/v1alpha1
kind: WorkerBundle
metadata:
  name: clash
spec:
  deploymentName: clash
  workers:
    - {workerName: a, workerNumber: 8080, release: a-1}
    - {workerName: b, workerNumber: 8080, release: b-1}
"#,
    );
    assert!(stderr.contains("workerNumber (the port) must be unique"), "{stderr}");
    let stderr = refused(
        &cluster,
        r#"apiVersion: workerbundle.dev/v1alpha1
kind: WorkerBundle
metadata:
  name: low-port
spec:
  deploymentName: low-port
  workers:
    - {workerName: c, workerNumber: 80, release: c-1}
"#,
    );
    assert!(stderr.contains("spec.workers[0].workerNumber") && stderr.contains("1024"), "{stderr}");

    // A release is immutable once made.
    let release = |main: &str| {
        format!(
            r#"apiVersion: workerbundle.dev/v1alpha1
kind: WorkerRelease
metadata:
  name: frozen
spec:
  template:
    scriptName: api
    scriptUrls: ["s3://workers/1234/api/"]
    mainModule: {main}
"#
        )
    };
    let out = cluster.apply_yaml(&release("index.js"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = refused(&cluster, &release("other.js"));
    assert!(stderr.contains("a WorkerRelease is immutable"), "{stderr}");
}
