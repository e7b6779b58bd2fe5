//! With a data file, an answered write is on disk: the server killed (SIGKILL, no chance to save)
//! a few milliseconds after answering comes back with every write it answered. And the file, which
//! holds every Secret, is readable by its owner only.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{request, Cluster};
use memory_apiserver::Options;
use serde_json::{json, Value};

const CONFIGMAPS: &str = "/api/v1/namespaces/default/configmaps";
const SECRETS: &str = "/api/v1/namespaces/default/secrets";

/// The server program; killed when dropped, so that a failing test leaves none behind.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server program on a free port with `data`; its URL.
fn start(data: &Path) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_memory-apiserver"))
        .args(["--listen", "127.0.0.1:0", "--data-file"])
        .arg(data)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut url = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut url).expect("url line");
    (Server(child), url.trim().to_string())
}

fn must(url: &str, method: &str, path: &str, content_type: &str, body: &str, code: u16) -> Value {
    let response = request(url, method, path, content_type, body);
    assert_eq!(response.status, code, "{method} {path}: {}", response.body);
    response.json()
}

/// name -> data of every object in `path`'s list.
fn contents(url: &str, path: &str) -> BTreeMap<String, Value> {
    let list = must(url, "GET", path, "", "", 200);
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["metadata"]["name"].as_str().unwrap().to_string(), o["data"].clone()))
        .collect()
}

fn b64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[test]
fn every_answered_write_survives_a_sigkill_moments_later() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("objects.json");
    let mut configmaps: BTreeMap<String, Value> = BTreeMap::new();
    let mut secrets: BTreeMap<String, Value> = BTreeMap::new();
    let mut last_rv = 0u64;
    for round in 0..20u32 {
        let (mut child, url) = start(&data);
        // Everything answered in the rounds before, and not a write more.
        assert_eq!(contents(&url, CONFIGMAPS), configmaps, "configmaps after the kill in round {round}");
        assert_eq!(contents(&url, SECRETS), secrets, "secrets after the kill in round {round}");

        // create
        let name = format!("cm-{round}");
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"round": round.to_string()}});
        must(&url, "POST", CONFIGMAPS, "application/json", &body.to_string(), 201);
        configmaps.insert(name, json!({"round": round.to_string()}));
        // merge patch
        if round > 0 {
            let name = format!("cm-{}", round - 1);
            let patch = json!({"data": {"next": round.to_string()}}).to_string();
            must(&url, "PATCH", &format!("{CONFIGMAPS}/{name}"), "application/merge-patch+json", &patch, 200);
            configmaps.get_mut(&name).unwrap()["next"] = json!(round.to_string());
        }
        // server-side apply, creating
        let name = format!("s-{round}");
        let apply = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\ndata:\n  value: {}\n",
            b64(&format!("v{round}"))
        );
        must(
            &url,
            "PATCH",
            &format!("{SECRETS}/{name}?fieldManager=test"),
            "application/apply-patch+yaml",
            &apply,
            201,
        );
        secrets.insert(name, json!({"value": b64(&format!("v{round}"))}));
        // update (PUT) of the previous round's secret
        if round > 0 {
            let name = format!("s-{}", round - 1);
            let mut secret = must(&url, "GET", &format!("{SECRETS}/{name}"), "", "", 200);
            secret["data"]["value"] = json!(b64(&format!("changed in {round}")));
            must(&url, "PUT", &format!("{SECRETS}/{name}"), "application/json", &secret.to_string(), 200);
            secrets.insert(name, json!({"value": b64(&format!("changed in {round}"))}));
        }
        // delete, every third round
        if round % 3 == 2 {
            let name = format!("cm-{}", round - 2);
            must(&url, "DELETE", &format!("{CONFIGMAPS}/{name}"), "", "", 200);
            configmaps.remove(&name);
        }
        // The last write, whose answer the kill follows closely.
        let name = format!("cm-{round}");
        let patch = json!({"data": {"last": "yes"}}).to_string();
        let answered =
            must(&url, "PATCH", &format!("{CONFIGMAPS}/{name}"), "application/merge-patch+json", &patch, 200);
        configmaps.get_mut(&name).unwrap()["last"] = json!("yes");
        let rv: u64 = answered["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        assert!(rv > last_rv, "resourceVersions go on across restarts");
        last_rv = rv;

        std::thread::sleep(Duration::from_millis(fastrand::u64(1..=50)));
        child.0.kill().expect("SIGKILL");
        child.0.wait().expect("reaped");
    }
    let (_child, url) = start(&data);
    assert_eq!(contents(&url, CONFIGMAPS), configmaps);
    assert_eq!(contents(&url, SECRETS), secrets);
    let list = must(&url, "GET", CONFIGMAPS, "", "", 200);
    assert_eq!(list["metadata"]["resourceVersion"], json!(last_rv.to_string()));
}

#[test]
fn the_data_file_and_its_temporary_file_are_readable_by_their_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("objects.json");
    let tmp = dir.path().join("objects.json.tmp");
    // As an older version left them: readable by all.
    {
        let cluster = Cluster::start_with(Options { data_file: Some(data.clone()), ..Options::default() });
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}});
        cluster.post(SECRETS, &secret);
    }
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&tmp, "left over").unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;

    let cluster = Cluster::start_with(Options { data_file: Some(data.clone()), ..Options::default() });
    assert_eq!(mode(&data), 0o600, "narrowed at start");
    let secret =
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "t"}, "stringData": {"k": "w"}});
    assert_eq!(cluster.post(SECRETS, &secret).status, 201);
    assert_eq!(mode(&data), 0o600);
    let journal = dir.path().join("objects.json.journal");
    assert_eq!(mode(&journal), 0o600);
    assert!(!tmp.exists(), "the temporary file was written (owner-only) and renamed over the data file");
    let stored = std::fs::read_to_string(&data).unwrap() + &std::fs::read_to_string(&journal).unwrap();
    assert!(stored.contains("\"t\"") && stored.contains("\"s\""), "{stored}");
}

#[test]
fn a_torn_last_journal_line_is_dropped_and_the_rest_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("objects.json");
    let journal = dir.path().join("objects.json.journal");
    let options = Options { data_file: Some(data.clone()), ..Options::default() };
    {
        let cluster = Cluster::start_with(options.clone());
        for name in ["a", "b"] {
            let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}});
            assert_eq!(cluster.post(CONFIGMAPS, &cm).status, 201);
        }
        assert_eq!(cluster.delete(&format!("{CONFIGMAPS}/a")).status, 200);
    }
    // A write that was never answered: the crash came in the middle of its line.
    let mut text = std::fs::read_to_string(&journal).unwrap();
    assert_eq!(text.lines().count(), 3, "one line per write: {text}");
    text.push_str(r#"{"rv":99,"changes":[["","configmaps","ADDED",{"metadata":{"na"#);
    std::fs::write(&journal, text).unwrap();

    let cluster = Cluster::start_with(options);
    assert_eq!(contents(&cluster.server.url(), CONFIGMAPS).keys().collect::<Vec<_>>(), ["b"]);
    assert_eq!(std::fs::read_to_string(&journal).unwrap(), "", "compacted into the snapshot at start");
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
    assert_eq!(cluster.post(CONFIGMAPS, &cm).status, 201);
    assert_eq!(contents(&cluster.server.url(), CONFIGMAPS).keys().collect::<Vec<_>>(), ["b", "c"]);
}
