//! Behaviours kubectl cannot show directly, checked over plain HTTP as kube-rs would use them.

mod common;

use std::time::Duration;

use common::{widget, with_crd, Cluster, WIDGETS};
use memory_apiserver::Options;
use serde_json::{json, Value};

fn item(name: &str) -> String {
    format!("{WIDGETS}/{name}")
}

#[test]
fn stale_resource_version_is_a_conflict() {
    let cluster = with_crd();
    let created = cluster.post(WIDGETS, &widget("w")).json();
    let mut first = created.clone();
    first["spec"]["size"] = json!(5);
    let updated = cluster.put(&item("w"), &first);
    assert_eq!(updated.status, 200, "{}", updated.body);
    let mut stale = created;
    stale["spec"]["size"] = json!(6);
    let conflict = cluster.put(&item("w"), &stale);
    assert_eq!(conflict.status, 409);
    let status = conflict.json();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "Conflict");
    assert_eq!(
        status["message"],
        "Operation cannot be fulfilled on widgets.example.dev \"w\": the object has been modified; please apply your \
         changes to the latest version and try again"
    );
    // The same precondition inside a merge patch.
    let patch = cluster.patch(
        &item("w"),
        "application/merge-patch+json",
        r#"{"metadata":{"resourceVersion":"1"},"spec":{"size":1}}"#,
    );
    assert_eq!(patch.status, 409);
    let missing = cluster.get(&item("nope"));
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["message"], "widgets.example.dev \"nope\" not found");
    let again = cluster.post(WIDGETS, &widget("w"));
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["reason"], "AlreadyExists");
}

#[test]
fn status_subresource_is_written_separately_and_generation_follows_spec() {
    let cluster = with_crd();
    let mut body = widget("w");
    body["status"] = json!({"observedGeneration": 7});
    let created = cluster.post(WIDGETS, &body).json();
    assert!(created.get("status").is_none(), "status is dropped on create: {created}");
    assert_eq!(created["metadata"]["generation"], 1);

    let status = cluster.patch(
        &format!("{}/status", item("w")),
        "application/merge-patch+json",
        r#"{"status":{"observedGeneration":1},"spec":{"size":99},"metadata":{"labels":{"x":"y"}}}"#,
    );
    assert_eq!(status.status, 200, "{}", status.body);
    let after = status.json();
    assert_eq!(after["status"]["observedGeneration"], 1);
    assert_eq!(after["spec"]["size"], 3, "spec untouched through /status");
    assert!(after["metadata"]["labels"].is_null(), "metadata untouched through /status");
    assert_eq!(after["metadata"]["generation"], 1);

    let main = cluster.patch(
        &item("w"),
        "application/merge-patch+json",
        r#"{"status":{"observedGeneration":5},"spec":{"size":4}}"#,
    );
    let main = main.json();
    assert_eq!(main["status"]["observedGeneration"], 1, "status untouched through the main resource");
    assert_eq!(main["spec"]["size"], 4);
    assert_eq!(main["metadata"]["generation"], 2);

    let mut replaced = main.clone();
    replaced["status"] = json!({"observedGeneration": 2});
    let put = cluster.put(&format!("{}/status", item("w")), &replaced).json();
    assert_eq!(put["status"]["observedGeneration"], 2);
    assert_eq!(put["metadata"]["generation"], 2, "status writes do not bump generation");
    assert!(put["metadata"]["managedFields"]
        .as_array()
        .is_some_and(|m| m.iter().any(|e| e["subresource"] == "status")));
}

#[test]
fn merge_json_and_strategic_patches() {
    let cluster = with_crd();
    cluster.post(WIDGETS, &widget("w"));
    let merged =
        cluster.patch(&item("w"), "application/merge-patch+json", r#"{"spec":{"labels":{"a":"1","b":"2"}}}"#);
    assert_eq!(merged.json()["spec"]["labels"], json!({"a": "1", "b": "2"}));
    let removed =
        cluster.patch(&item("w"), "application/merge-patch+json", r#"{"spec":{"labels":{"a":null}}}"#);
    assert_eq!(removed.json()["spec"]["labels"], json!({"b": "2"}));
    let jsonpatch = cluster.patch(
        &item("w"),
        "application/json-patch+json",
        r#"[{"op":"add","path":"/spec/workers","value":[{"workerNumber":1}]},{"op":"replace","path":"/spec/size","value":8}]"#,
    );
    let out = jsonpatch.json();
    assert_eq!(out["spec"]["workers"], json!([{"workerNumber": 1}]));
    assert_eq!(out["spec"]["size"], 8);
    let failed_test = cluster.patch(
        &item("w"),
        "application/json-patch+json",
        r#"[{"op":"test","path":"/spec/size","value":1}]"#,
    );
    assert_eq!(failed_test.status, 422);
    // Custom resources have no strategic merge patch, as on a real server.
    let smp = cluster.patch(&item("w"), "application/strategic-merge-patch+json", r#"{"spec":{"size":1}}"#);
    assert_eq!(smp.status, 415);
    assert_eq!(smp.json()["reason"], "UnsupportedMediaType");

    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"template": {"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}}}});
    assert_eq!(cluster.post("/apis/apps/v1/namespaces/default/deployments", &deployment).status, 201);
    let smp = cluster.patch(
        "/apis/apps/v1/namespaces/default/deployments/d",
        "application/strategic-merge-patch+json",
        r#"{"spec":{"template":{"spec":{"$setElementOrder/containers":[{"name":"a"},{"name":"b"}],"containers":[{"name":"b","image":"z"}]}}}}"#,
    );
    assert_eq!(
        smp.json()["spec"]["template"]["spec"]["containers"],
        json!([{"name": "a", "image": "x"}, {"name": "b", "image": "z"}])
    );
}

fn apply_widget(cluster: &Cluster, name: &str, body: &str, manager: &str, force: bool) -> common::Response {
    let path = format!("{}?fieldManager={manager}{}", item(name), if force { "&force=true" } else { "" });
    cluster.patch(&path, "application/apply-patch+yaml", body)
}

#[test]
fn server_side_apply_creates_updates_removes_and_conflicts() {
    let cluster = with_crd();
    let first = "apiVersion: example.dev/v1\nkind: Widget\nmetadata:\n  name: w\n  labels: {team: a}\nspec:\n  template: {scriptName: hi}\n  size: 2\n  labels: {x: '1', y: '2'}\n";
    let created = apply_widget(&cluster, "w", first, "ctl", false);
    assert_eq!(created.status, 201, "{}", created.body);
    let obj = created.json();
    let managed = &obj["metadata"]["managedFields"][0];
    assert_eq!(managed["manager"], "ctl");
    assert_eq!(managed["operation"], "Apply");
    assert_eq!(managed["fieldsType"], "FieldsV1");
    assert_eq!(managed["apiVersion"], "example.dev/v1");
    assert_eq!(managed["fieldsV1"]["f:spec"]["f:labels"]["f:x"], json!({}));
    assert_eq!(managed["fieldsV1"]["f:metadata"]["f:labels"]["f:team"], json!({}));

    // Another manager (an Update) adds a field; it survives the next apply.
    cluster.patch(
        &format!("{}?fieldManager=editor", item("w")),
        "application/merge-patch+json",
        r#"{"spec":{"mode":"fast"}}"#,
    );
    let second = first.replace("  labels: {x: '1', y: '2'}\n", "  labels: {x: '1'}\n");
    let updated = apply_widget(&cluster, "w", &second, "ctl", false);
    assert_eq!(updated.status, 200, "{}", updated.body);
    let obj = updated.json();
    assert_eq!(obj["spec"]["labels"], json!({"x": "1"}), "omitted field removed");
    assert_eq!(obj["spec"]["mode"], "fast", "other manager's field kept");
    assert_eq!(obj["metadata"]["generation"], 3);

    // A value owned by the other manager, changed without force: conflict.
    let conflicting = second.replace("size: 2", "size: 2\n  mode: slow");
    let conflict = apply_widget(&cluster, "w", &conflicting, "ctl", false);
    assert_eq!(conflict.status, 409);
    let status = conflict.json();
    let message = status["message"].as_str().unwrap_or_default();
    assert!(
        message
            .starts_with("Apply failed with 1 conflict: conflict with \"editor\" using example.dev/v1 at "),
        "{message}"
    );
    assert!(message.ends_with(": .spec.mode"), "{message}");
    assert_eq!(status["details"]["causes"][0]["field"], ".spec.mode");
    let forced = apply_widget(&cluster, "w", &conflicting, "ctl", true);
    assert_eq!(forced.status, 200);
    assert_eq!(forced.json()["spec"]["mode"], "slow");

    // Apply on /status, as controllers report status.
    let status_body =
        "apiVersion: example.dev/v1\nkind: Widget\nmetadata:\n  name: w\nstatus:\n  observedGeneration: 4\n";
    let applied = cluster.patch(
        &format!("{}/status?fieldManager=ctl&force=true", item("w")),
        "application/apply-patch+yaml",
        status_body,
    );
    assert_eq!(applied.status, 200, "{}", applied.body);
    assert_eq!(applied.json()["status"]["observedGeneration"], 4);
    assert_eq!(applied.json()["spec"]["mode"], "slow", "spec survives a status apply");

    // A resourceVersion in the applied configuration is a precondition.
    let stale = second.replace("  name: w\n", "  name: w\n  resourceVersion: '1'\n");
    assert_eq!(apply_widget(&cluster, "w", &stale, "ctl", true).status, 409);

    // JSON bodies work too, and kind/apiVersion are required.
    let missing_kind = apply_widget(
        &cluster,
        "v",
        r#"{"metadata":{"name":"v"},"spec":{"template":{"scriptName":"a"}}}"#,
        "ctl",
        true,
    );
    assert_eq!(missing_kind.status, 400);
    let wrong = apply_widget(
        &cluster,
        "v",
        r#"{"apiVersion":"example.dev/v2","kind":"Widget","metadata":{"name":"v"}}"#,
        "ctl",
        true,
    );
    assert_eq!(wrong.status, 400);
}

#[test]
fn watch_from_a_resource_version_and_410_when_too_old() {
    let cluster = Cluster::start_with(Options { watch_history: 3, ..Options::default() });
    let cms = "/api/v1/namespaces/default/configmaps";
    let first = cluster.post(cms, &json!({"metadata": {"name": "c0"}, "data": {}})).json();
    let from = first["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string();
    cluster.post(cms, &json!({"metadata": {"name": "c1"}}));
    let events =
        cluster.watch(&format!("{cms}?watch=true&resourceVersion={from}"), 1, Duration::from_secs(2));
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "c1");
    for i in 2..8 {
        cluster.post(cms, &json!({"metadata": {"name": format!("c{i}")}}));
    }
    let events = cluster.watch(&format!("{cms}?watch=1&resourceVersion={from}"), 1, Duration::from_secs(2));
    assert_eq!(events[0]["type"], "ERROR");
    assert_eq!(events[0]["object"]["code"], 410);
    assert_eq!(events[0]["object"]["reason"], "Expired");
}

#[test]
fn watch_initial_events_live_events_selectors_and_bookmarks() {
    let cluster =
        Cluster::start_with(Options { bookmark_interval: Duration::from_millis(200), ..Options::default() });
    let cms = "/api/v1/namespaces/default/configmaps";
    cluster.post(cms, &json!({"metadata": {"name": "a", "labels": {"app": "x"}}}));
    cluster.post(cms, &json!({"metadata": {"name": "b", "labels": {"app": "y"}}}));
    let url = cluster.server.url();
    let watcher = std::thread::spawn(move || {
        common::watch_events(
            &url,
            &format!("{cms}?watch=true&labelSelector=app%3Dx"),
            3,
            Duration::from_secs(3),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    cluster.patch(&format!("{cms}/b"), "application/merge-patch+json", r#"{"data":{"k":"v"}}"#);
    cluster.patch(&format!("{cms}/a"), "application/merge-patch+json", r#"{"data":{"k":"v"}}"#);
    cluster.delete(&format!("{cms}/a"));
    let events = watcher.join().expect("watcher");
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap_or_default()).collect();
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);
    assert!(events.iter().all(|e| e["object"]["metadata"]["name"] == "a"));

    // Streaming list, as kube-runtime's watcher can ask for it.
    let events = cluster.watch(
        &format!("{cms}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"),
        3,
        Duration::from_secs(3),
    );
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "b");
    assert_eq!(events[1]["type"], "BOOKMARK");
    assert_eq!(events[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
    assert_eq!(events[2]["type"], "BOOKMARK", "periodic bookmark");
    assert!(events[2]["object"]["metadata"]["resourceVersion"].is_string());

    // timeoutSeconds ends the stream.
    let started = std::time::Instant::now();
    let events = cluster.watch(
        &format!("{cms}?watch=true&resourceVersion=0&timeoutSeconds=1"),
        10,
        Duration::from_secs(5),
    );
    assert_eq!(events.len(), 1);
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[test]
fn lists_with_label_and_field_selectors() {
    let cluster = Cluster::start();
    let cms = "/api/v1/namespaces/default/configmaps";
    for (name, labels) in
        [("a", json!({"app": "web", "tier": "front"})), ("b", json!({"app": "api"})), ("c", json!({}))]
    {
        assert_eq!(cluster.post(cms, &json!({"metadata": {"name": name, "labels": labels}})).status, 201);
    }
    let names = |query: &str| -> Vec<String> {
        let list = cluster.get(&format!("{cms}?{query}")).json();
        assert_eq!(list["kind"], "ConfigMapList");
        assert!(list["metadata"]["resourceVersion"].is_string());
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| i["metadata"]["name"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(names("labelSelector=app%3Dweb"), ["a"]);
    assert_eq!(names("labelSelector=app%20in%20(web%2Capi)"), ["a", "b"]);
    assert_eq!(names("labelSelector=app%2C!tier"), ["b"]);
    assert_eq!(names("labelSelector=app!%3Dweb"), ["b", "c"]);
    assert_eq!(names("fieldSelector=metadata.name%3Dc"), ["c"]);
    assert_eq!(names("limit=500"), ["a", "b", "c"]);
    let all_namespaces = cluster.get("/api/v1/configmaps").json();
    assert_eq!(all_namespaces["items"].as_array().map(Vec::len), Some(3));
    let deleted = cluster.http("DELETE", &format!("{cms}?labelSelector=app"), "", "");
    assert_eq!(deleted.status, 200);
    assert_eq!(names(""), ["c"]);
}

#[test]
fn crd_registration_discovery_and_metadata_rules() {
    let cluster = with_crd();
    let crd =
        cluster.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.dev").json();
    let conditions = crd["status"]["conditions"].as_array().cloned().unwrap_or_default();
    assert!(conditions.iter().any(|c| c["type"] == "Established" && c["status"] == "True"));
    assert!(conditions.iter().any(|c| c["type"] == "NamesAccepted" && c["status"] == "True"));
    assert_eq!(crd["status"]["acceptedNames"]["kind"], "Widget");

    let list = cluster.get("/apis/example.dev/v1").json();
    assert_eq!(list["kind"], "APIResourceList");
    let names: Vec<&str> =
        list["resources"].as_array().into_iter().flatten().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["widgets", "widgets/status"]);
    assert_eq!(list["resources"][0]["shortNames"], json!(["wd"]));
    assert_eq!(list["resources"][0]["singularName"], "widget");
    let groups = cluster.get("/apis").json();
    let group =
        groups["groups"].as_array().into_iter().flatten().find(|g| g["name"] == "example.dev").cloned();
    assert_eq!(group.map(|g| g["preferredVersion"]["groupVersion"].clone()), Some(json!("example.dev/v1")));

    // generateName, namespace mismatch, missing namespace, cluster-scoped paths.
    let generated = cluster.post(
        WIDGETS,
        &json!({"apiVersion": "example.dev/v1", "kind": "Widget",
        "metadata": {"generateName": "gen-"}, "spec": {"template": {"scriptName": "a"}}}),
    );
    assert_eq!(generated.status, 201);
    assert!(generated.json()["metadata"]["name"]
        .as_str()
        .is_some_and(|n| n.starts_with("gen-") && n.len() == 9));
    let mut elsewhere = widget("x");
    elsewhere["metadata"]["namespace"] = json!("other");
    assert_eq!(cluster.post(WIDGETS, &elsewhere).status, 400);
    let missing_ns = cluster.post("/apis/example.dev/v1/namespaces/nowhere/widgets", &widget("x"));
    assert_eq!(missing_ns.status, 404);
    assert_eq!(missing_ns.json()["message"], "namespaces \"nowhere\" not found");
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "r"}, "rules": []});
    assert_eq!(cluster.post("/apis/rbac.authorization.k8s.io/v1/clusterroles", &role).status, 201);
    let ns = cluster.post("/api/v1/namespaces", &json!({"metadata": {"name": "team"}})).json();
    assert_eq!(ns["status"]["phase"], "Active");

    // Invalid: all causes collected, real status shape.
    let bad = cluster.post(
        WIDGETS,
        &json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "bad"},
        "spec": {"template": {}, "historyLimit": -1}}),
    );
    assert_eq!(bad.status, 422);
    let status = bad.json();
    assert_eq!(status["reason"], "Invalid");
    assert_eq!(status["details"]["kind"], "Widget");
    assert_eq!(status["details"]["group"], "example.dev");
    assert_eq!(status["details"]["causes"].as_array().map(Vec::len), Some(2));
    assert!(status["message"]
        .as_str()
        .unwrap_or_default()
        .starts_with("Widget.example.dev \"bad\" is invalid: ["));

    // Unknown fields are pruned silently without Strict, with a warning header.
    let mut extra = widget("extra");
    extra["spec"]["surprise"] = json!(true);
    let pruned = cluster.post(WIDGETS, &extra);
    assert_eq!(pruned.status, 201);
    assert!(pruned.json()["spec"].get("surprise").is_none());
    assert!(pruned.header("warning").is_some_and(|w| w.contains("unknown field")));
    let mut strict = widget("strict");
    strict["spec"]["surprise"] = json!(true);
    assert_eq!(cluster.post(&format!("{WIDGETS}?fieldValidation=Strict"), &strict).status, 400);
}

#[test]
fn deletion_policies_and_finalizers_over_http() {
    let cluster = with_crd();
    let owner = cluster.post(WIDGETS, &widget("owner")).json();
    let reference = json!([{"apiVersion": "example.dev/v1", "kind": "Widget", "name": "owner",
        "uid": owner["metadata"]["uid"], "blockOwnerDeletion": true}]);
    let cms = "/api/v1/namespaces/default/configmaps";
    let dependent =
        json!({"metadata": {"name": "dep", "ownerReferences": reference, "finalizers": ["example.dev/x"]}});
    cluster.post(cms, &dependent);

    // Orphan: the dependent loses its owner reference and stays.
    let orphan =
        cluster.http("DELETE", &item("owner"), "application/json", r#"{"propagationPolicy":"Orphan"}"#);
    assert_eq!(orphan.status, 200);
    let dep = cluster.get(&format!("{cms}/dep")).json();
    assert!(dep["metadata"]["ownerReferences"].is_null(), "{dep}");

    // Foreground: the owner waits (deletionTimestamp, foregroundDeletion) for its dependent.
    let owner = cluster.post(WIDGETS, &widget("owner")).json();
    let reference = json!([{"apiVersion": "example.dev/v1", "kind": "Widget", "name": "owner", "uid": owner["metadata"]["uid"]}]);
    cluster.patch(
        &format!("{cms}/dep"),
        "application/merge-patch+json",
        &json!({"metadata": {"ownerReferences": reference}}).to_string(),
    );
    let foreground =
        cluster.http("DELETE", &format!("{}?propagationPolicy=Foreground", item("owner")), "", "").json();
    assert!(foreground["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(foreground["metadata"]["finalizers"], json!(["foregroundDeletion"]));
    let dep = cluster.get(&format!("{cms}/dep")).json();
    assert!(dep["metadata"]["deletionTimestamp"].is_string(), "dependent is being deleted");
    // New finalizers cannot be added while deleting.
    let adding = cluster.patch(
        &format!("{cms}/dep"),
        "application/merge-patch+json",
        r#"{"metadata":{"finalizers":["example.dev/x","more"]}}"#,
    );
    assert_eq!(adding.status, 422);
    // Releasing the dependent's finalizer lets both go.
    let released = cluster.patch(
        &format!("{cms}/dep"),
        "application/merge-patch+json",
        r#"{"metadata":{"finalizers":null}}"#,
    );
    assert_eq!(released.status, 200, "{}", released.body);
    assert_eq!(cluster.get(&format!("{cms}/dep")).status, 404);
    assert_eq!(cluster.get(&item("owner")).status, 404);
}

#[test]
fn events_recorder_flow_and_secret_string_data() {
    let cluster = Cluster::start();
    let events = "/apis/events.k8s.io/v1/namespaces/default/events";
    let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "w.1"},
        "eventTime": "2025-01-01T00:00:00.000000Z", "reason": "Built", "action": "Build", "type": "Normal",
        "reportingController": "ctl", "reportingInstance": "ctl-1", "regarding": {"kind": "Widget", "name": "w"}});
    assert_eq!(cluster.post(events, &event).status, 201);
    let series = cluster.patch(
        &format!("{events}/w.1"),
        "application/merge-patch+json",
        r#"{"series":{"count":2,"lastObservedTime":"2025-01-01T00:00:01.000000Z"}}"#,
    );
    assert_eq!(series.status, 200);
    assert_eq!(series.json()["series"]["count"], 2);

    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"token": "abc"}, "data": {"x": "eA=="}});
    let created = cluster.post("/api/v1/namespaces/default/secrets", &secret).json();
    assert_eq!(created["data"], json!({"token": "YWJj", "x": "eA=="}));
    assert!(created.get("stringData").is_none());

    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}});
    assert_eq!(cluster.post("/apis/coordination.k8s.io/v1/namespaces/default/leases", &lease).status, 201);
    assert_eq!(cluster.get("/version").json()["gitVersion"], "v1.32.0");
    let unknown: Value = cluster.get("/apis/nothing.dev/v1/things").json();
    assert_eq!(unknown["code"], 404);
}

#[test]
fn kubeconfig_names_the_server_and_namespace() {
    let cluster = Cluster::start();
    let yaml = cluster.server.kubeconfig_yaml("team");
    assert!(yaml.contains(&format!("server: {}", cluster.server.url())));
    assert!(yaml.contains("namespace: team"));
    assert!(yaml.contains("current-context: memory-apiserver"));
    assert!(cluster.server.url().starts_with("http://127.0.0.1:"));
}

#[test]
fn with_a_data_file_objects_and_crds_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { data_file: Some(dir.path().join("objects.json")), ..Options::default() };
    let created = {
        let cluster = Cluster::start_with(options.clone());
        let (ok, _, err) = cluster.apply(common::CRD, &[]);
        assert!(ok, "{err}");
        cluster.post(WIDGETS, &widget("kept")).json()
        // Dropped here: the server stops and saves.
    };
    let cluster = Cluster::start_with(options);
    let got = cluster.get(&item("kept"));
    assert_eq!(got.status, 200, "{}", got.body);
    let got = got.json();
    assert_eq!(got["metadata"]["uid"], created["metadata"]["uid"]);
    assert_eq!(got["metadata"]["resourceVersion"], created["metadata"]["resourceVersion"]);
    let next = cluster.post(WIDGETS, &widget("next")).json();
    let rv = |o: &Value| o["metadata"]["resourceVersion"].as_str().unwrap().parse::<u64>().unwrap();
    assert!(rv(&next) > rv(&created), "resourceVersions go on from where they stopped");
}
