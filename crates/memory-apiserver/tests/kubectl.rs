//! Each behaviour that kubectl can show, shown with kubectl 1.32 itself.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{with_crd, Cluster, CRD};

const ONE: &str = r#"
apiVersion: example.dev/v1
kind: Widget
metadata:
  name: one
  labels: {app: demo}
spec:
  template: {scriptName: hello}
  workers: [{name: first, workerNumber: 1}, {name: second, workerNumber: 2}]
"#;

#[test]
fn discovery_falls_back_from_aggregated_and_lists_crd_resources() {
    let cluster = with_crd();
    let version = cluster.ok(&["version", "-o", "json"]);
    assert!(version.contains("\"gitVersion\": \"v1.32.0\""), "{version}");
    let resources = cluster.ok(&["api-resources", "--api-group=example.dev", "-o", "wide"]);
    assert!(resources.contains("widgets"), "{resources}");
    assert!(resources.contains("wd"), "short name: {resources}");
    assert!(resources.contains("Widget"), "{resources}");
    let core = cluster.ok(&["api-resources", "--api-group="]);
    for name in ["namespaces", "secrets", "configmaps", "services", "events", "serviceaccounts"] {
        assert!(core.contains(name), "{name} in {core}");
    }
    let crd = cluster.ok(&["get", "crd", "widgets.example.dev", "-o", "yaml"]);
    assert!(crd.contains("type: Established"), "{crd}");
    assert!(crd.contains("type: NamesAccepted"), "{crd}");
    assert!(crd.contains("acceptedNames:"), "{crd}");
    // Categories work through discovery too.
    cluster.apply(ONE, &[]);
    let all = cluster.ok(&["get", "all"]);
    assert!(all.contains("widget.example.dev/one"), "{all}");
}

#[test]
fn apply_fills_metadata_and_defaults_and_reapply_bumps_generation() {
    let cluster = with_crd();
    let (ok, out, err) = cluster.apply(ONE, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("widget.example.dev/one created"), "{out}");
    let yaml = cluster.ok(&["get", "widget", "one", "-o", "yaml"]);
    for expected in [
        "uid: ",
        "creationTimestamp: ",
        "resourceVersion: ",
        "generation: 1",
        "namespace: default",
        "size: 3",
    ] {
        assert!(yaml.contains(expected), "{expected} missing in\n{yaml}");
    }
    let (ok, out, err) = cluster.apply(&ONE.replace("{name: second", "{name: third"), &[]);
    assert!(ok, "{err}");
    assert!(out.contains("configured"), "{out}");
    assert_eq!(cluster.ok(&["get", "wd", "one", "-o", "jsonpath={.metadata.generation}"]), "2");
    // A metadata-only change does not bump generation.
    cluster.ok(&["label", "wd", "one", "extra=yes"]);
    assert_eq!(cluster.ok(&["get", "wd", "one", "-o", "jsonpath={.metadata.generation}"]), "2");
    let (ok, out, _) = cluster.apply(&ONE.replace("{name: second", "{name: third"), &[]);
    assert!(ok && out.contains("unchanged"), "{out}");
}

#[test]
fn get_shows_printer_columns() {
    let cluster = with_crd();
    cluster.apply(ONE, &[]);
    cluster.ok(&[
        "patch",
        "wd",
        "one",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ]);
    let table = cluster.ok(&["get", "widgets"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "SIZE", "WORKER", "READY", "AGE"]);
    let row: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(&row[..4], ["one", "3", "first", "True"], "{table}");
    let builtin = cluster.ok(&["get", "namespaces"]);
    assert!(builtin.starts_with("NAME") && builtin.contains("default"), "{builtin}");
}

#[test]
fn get_watch_sees_changes_made_meanwhile() {
    let cluster = with_crd();
    cluster.apply(ONE, &[]);
    let mut watcher = cluster.spawn(&["get", "widgets", "-w", "--request-timeout=5s"]);
    std::thread::sleep(Duration::from_millis(700));
    cluster.ok(&["patch", "wd", "one", "--type=merge", "-p", r#"{"spec":{"size":42}}"#]);
    std::thread::sleep(Duration::from_millis(700));
    watcher.kill().expect("kill kubectl");
    let mut out = String::new();
    watcher.stdout.take().expect("stdout").read_to_string(&mut out).expect("read");
    let _ = watcher.wait();
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("one")).collect();
    assert!(rows.len() >= 2, "{out}");
    assert!(rows.last().is_some_and(|r| r.contains("42")), "{out}");
}

#[test]
fn delete_with_finalizer_waits_for_the_finalizer() {
    let cluster = with_crd();
    cluster.apply(&ONE.replace("  labels: {app: demo}", "  finalizers: [example.dev/cleanup]"), &[]);
    let out = cluster.ok(&["delete", "wd", "one", "--wait=false"]);
    assert!(out.contains("\"one\" deleted"), "{out}");
    let stamp = cluster.ok(&["get", "wd", "one", "-o", "jsonpath={.metadata.deletionTimestamp}"]);
    assert!(!stamp.is_empty(), "deletionTimestamp set");
    cluster.ok(&[
        "patch",
        "wd",
        "one",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let (ok, _, err) = cluster.kubectl(&["get", "wd", "one"]);
    assert!(!ok);
    assert!(err.contains(r#"widgets.example.dev "one" not found"#), "{err}");

    cluster.apply(ONE, &[]);
    cluster.ok(&["delete", "wd", "one"]);
    let (ok, _, err) = cluster.kubectl(&["get", "wd", "one"]);
    assert!(!ok && err.contains("not found"), "{err}");
}

#[test]
fn deleting_an_owner_garbage_collects_its_dependents() {
    let cluster = with_crd();
    cluster.apply(ONE, &[]);
    let uid = cluster.ok(&["get", "wd", "one", "-o", "jsonpath={.metadata.uid}"]);
    let dependent = format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: owned
  ownerReferences:
  - {{apiVersion: example.dev/v1, kind: Widget, name: one, uid: {uid}, controller: true}}
data: {{a: b}}
---
apiVersion: v1
kind: Secret
metadata:
  name: owned-by-configmap
stringData: {{token: abc}}
"#
    );
    let (ok, _, err) = cluster.apply(&dependent, &[]);
    assert!(ok, "{err}");
    assert_eq!(cluster.ok(&["get", "secret", "owned-by-configmap", "-o", "jsonpath={.data.token}"]), "YWJj");
    // Chain the secret to the configmap: GC must be transitive.
    let cm_uid = cluster.ok(&["get", "cm", "owned", "-o", "jsonpath={.metadata.uid}"]);
    let reference = format!(
        r#"{{"metadata":{{"ownerReferences":[{{"apiVersion":"v1","kind":"ConfigMap","name":"owned","uid":"{cm_uid}"}}]}}}}"#
    );
    cluster.ok(&["patch", "secret", "owned-by-configmap", "--type=merge", "-p", &reference]);
    cluster.ok(&["delete", "wd", "one"]);
    let (ok, _, err) = cluster.kubectl(&["get", "cm", "owned"]);
    assert!(!ok && err.contains(r#"configmaps "owned" not found"#), "{err}");
    let (ok, _, err) = cluster.kubectl(&["get", "secret", "owned-by-configmap"]);
    assert!(!ok && err.contains("not found"), "{err}");
}

#[test]
fn an_object_given_only_owners_that_do_not_exist_is_garbage_collected() {
    let cluster = with_crd();
    cluster.apply(ONE, &[]);
    let uid = cluster.ok(&["get", "wd", "one", "-o", "jsonpath={.metadata.uid}"]);
    let (ok, _, err) =
        cluster.apply("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kept\ndata: {a: b}\n", &[]);
    assert!(ok, "{err}");
    let (ok, _, err) =
        cluster.apply("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: orphan\ndata: {a: b}\n", &[]);
    assert!(ok, "{err}");
    let owner = |name: &str, uid: &str| {
        format!(
            r#"{{"metadata":{{"ownerReferences":[{{"apiVersion":"example.dev/v1","kind":"Widget","name":"{name}","uid":"{uid}"}}]}}}}"#
        )
    };
    // A live owner: kept. An owner that does not exist (wrong uid): collected at once.
    cluster.ok(&["patch", "cm", "kept", "--type=merge", "-p", &owner("one", &uid)]);
    cluster.ok(&["get", "cm", "kept"]);
    cluster.ok(&["patch", "cm", "orphan", "--type=merge", "-p", &owner("one", "not-its-uid")]);
    let (ok, _, err) = cluster.kubectl(&["get", "cm", "orphan"]);
    assert!(!ok && err.contains(r#"configmaps "orphan" not found"#), "{err}");
    cluster.ok(&["get", "cm", "kept"]);
}

#[test]
fn invalid_objects_are_refused_with_the_real_messages() {
    let cluster = with_crd();
    let bad = r#"
apiVersion: example.dev/v1
kind: Widget
metadata:
  name: bad
spec:
  template: {}
  historyLimit: -1
  mode: x
"#;
    let (ok, _, err) = cluster.apply(bad, &[]);
    assert!(!ok);
    assert!(err.contains(r#"The Widget "bad" is invalid"#), "{err}");
    assert!(err.contains("spec.template.scriptName: Required value"), "{err}");
    assert!(
        err.contains("spec.historyLimit: Invalid value: -1: spec.historyLimit in body should be greater than or equal to 0"),
        "{err}"
    );
    assert!(err.contains(r#"spec.mode: Unsupported value: "x": supported values: "fast", "slow""#), "{err}");

    let duplicate = ONE.replace("workerNumber: 2", "workerNumber: 1");
    let (ok, _, err) = cluster.apply(&duplicate, &[]);
    assert!(!ok);
    assert!(err.contains(r#"spec.workers: Invalid value: "array": workerNumber must be unique"#), "{err}");

    let (ok, _, err) = cluster.apply(&ONE.replace("scriptName: hello", "scriptName: Hello"), &[]);
    assert!(!ok);
    assert!(err.contains(r#"spec.template.scriptName: Invalid value: "Hello""#), "{err}");

    // kubectl apply asks the server for strict field validation: unknown fields are errors.
    let (ok, _, err) = cluster.apply(&ONE.replace("  template:", "  surprise: 1\n  template:"), &[]);
    assert!(!ok);
    assert!(err.contains(r#"strict decoding error: unknown field "spec.surprise""#), "{err}");

    // Transition rule: the template is immutable once set.
    cluster.apply(ONE, &[]);
    let (ok, _, err) = cluster.apply(&ONE.replace("scriptName: hello", "scriptName: other"), &[]);
    assert!(!ok);
    assert!(err.contains(r#"spec: Invalid value: "object": template is immutable"#), "{err}");

    let (ok, _, err) = cluster.apply(&ONE.replace("name: one", "name: Not_Valid"), &[]);
    assert!(!ok);
    assert!(err.contains(r#"metadata.name: Invalid value: "Not_Valid""#), "{err}");
}

#[test]
fn server_side_apply_with_kubectl() {
    let cluster = Cluster::start();
    let config = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\ndata:\n  a: '1'\n  b: '2'\n";
    let (ok, out, err) = cluster.apply(config, &["--server-side"]);
    assert!(ok && out.contains("serverside-applied"), "{out}{err}");
    let fields = cluster.ok(&["get", "cm", "cfg", "-o", "yaml", "--show-managed-fields"]);
    assert!(fields.contains("manager: kubectl") && fields.contains("operation: Apply"), "{fields}");
    assert!(fields.contains("f:a: {}"), "{fields}");
    // Another manager takes a field: re-applying a different value conflicts until forced.
    cluster.ok(&["patch", "cm", "cfg", "--type=merge", "-p", r#"{"data":{"a":"mine"}}"#]);
    let (ok, _, err) = cluster.apply(&config.replace("a: '1'", "a: '9'"), &["--server-side"]);
    assert!(!ok);
    assert!(err.contains("Apply failed with 1 conflict: conflict with \"kubectl-patch\""), "{err}");
    assert!(err.contains(".data.a"), "{err}");
    let (ok, _, err) =
        cluster.apply(&config.replace("  b: '2'\n", ""), &["--server-side", "--force-conflicts"]);
    assert!(ok, "{err}");
    // b was applied before and is omitted now: it is removed.
    assert_eq!(cluster.ok(&["get", "cm", "cfg", "-o", "jsonpath={.data}"]), r#"{"a":"1"}"#);
}

#[test]
fn crd_is_usable_right_after_apply_and_deleting_it_removes_its_objects() {
    let cluster = Cluster::start();
    let both = format!("{CRD}\n---\n{ONE}");
    // The same apply cannot create the object: discovery was read before the CRD existed.
    let (ok, out, _) = cluster.apply(&both, &[]);
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/widgets.example.dev created"),
        "{out}"
    );
    if !ok {
        cluster.apply(ONE, &[]);
    }
    cluster.ok(&["wait", "--for=condition=Established", "crd/widgets.example.dev", "--timeout=5s"]);
    assert!(cluster.ok(&["get", "wd"]).contains("one"));
    cluster.ok(&["delete", "crd", "widgets.example.dev"]);
    let (ok, _, err) = cluster.kubectl(&["get", "wd"]);
    assert!(!ok, "{err}");
    cluster.apply(CRD, &[]);
    let (ok, out, err) = cluster.kubectl(&["get", "wd"]);
    assert!(ok, "{err}");
    assert!(!out.contains("one"), "objects went with their CRD: {out}");
}
