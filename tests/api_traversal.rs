//! Path traversal across accounts (issue Q item 2): every route of the API's own route table,
//! walked with each account's token and hostile encodings in each path parameter (`..%2F`,
//! `%2e%2e`, `%2F`, `%00`, overlong UTF-8 `%c0%ae`, double encoding, literal `..`), against the real
//! S3 server (s3s-fs, which resolves `..` in keys) and the in-memory Kubernetes API. Every answer
//! must be a refusal (400, 403 or 404) without a byte of the other account's data, and nothing
//! may change. Before the path check, `GET /accounts/A/workers/scripts/..%2FB%2Fbworker/versions/V`
//! with A's token answered B's version.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use support::api::{form, ApiServer, BUCKET};
use support::cluster::Cluster;
use support::s3::S3Server;
use support::*;

/// One account and what it owns; the markers are in its code, its var and its secret, so that
/// any answer carrying its data shows one of them.
struct Tenant {
    account: &'static str,
    token: &'static str,
    script: &'static str,
    version: String,
    markers: [&'static str; 3],
}

const A: (&str, &str) = ("1234", "token-of-account-1234-traversal");
const B: (&str, &str) = ("5678", "token-of-account-5678-traversal");

/// A request body: none, JSON, or curl `-F` fields.
#[derive(Clone)]
enum Body {
    None,
    Json(String),
    Form(Vec<String>),
}

/// One request with the real curl, the path sent exactly as written (`--path-as-is`: no dot
/// segments removed); returns the status and the raw body.
fn request(method: &str, url: &str, token: &str, body: &Body) -> (u16, String) {
    let mut command = Command::new("curl");
    command.args(["-s", "-g", "--path-as-is", "-o", "-", "-w", "\n%{http_code}", "-X", method, url]);
    command.args(["-H", &format!("Authorization: Bearer {token}")]);
    match body {
        Body::None => {}
        Body::Json(text) => {
            command.args(["-H", "Content-Type: application/json", "--data-binary", text]);
        }
        Body::Form(fields) => {
            for field in fields {
                command.args(["-F", field]);
            }
        }
    }
    let out = command.output().expect("curl is not installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

fn upload_form(dir: &Path, tenant: &str, marker_code: &str, marker_var: &str) -> Vec<String> {
    let metadata = json!({
        "main_module": "index.js",
        "compatibility_date": "2024-09-23",
        "bindings": [{"name": "MARK", "type": "plain_text", "text": marker_var}],
    })
    .to_string();
    let js = format!("export default {{ fetch() {{ return new Response({marker_code:?}); }} }};\n");
    let dir = dir.join(tenant);
    std::fs::create_dir_all(&dir).unwrap();
    form(&dir, &metadata, &[("index.js", "application/javascript+module", js.as_bytes())])
}

/// Deploys the tenant's worker and sets its secret; returns its version id.
fn deploy(api: &ApiServer, files: &Path, t: &Tenant) -> String {
    let url = format!("{}/accounts/{}/workers/scripts/{}", api.url, t.account, t.script);
    let (code, reply) =
        request("PUT", &url, t.token, &Body::Form(upload_form(files, t.account, t.markers[0], t.markers[1])));
    assert_eq!(code, 200, "{reply}\n{}", api.log());
    let reply: Value = serde_json::from_str(&reply).unwrap();
    let secret = json!({"name": "K", "text": t.markers[2], "type": "secret_text"}).to_string();
    let (code, answer) = request("PUT", &format!("{url}/secrets"), t.token, &Body::Json(secret));
    assert_eq!(code, 200, "{answer}");
    reply["result"]["deployment_id"].as_str().unwrap().to_owned()
}

/// A body the route would accept with good names, so that a refusal is about the path.
fn route_body(method: &str, path: &str, files: &Path) -> Body {
    match (method, path) {
        ("PUT" | "POST", p) if p.ends_with("{script_name}") || p.ends_with("/versions") => {
            Body::Form(upload_form(files, "walk", "walk-code", "walk-var"))
        }
        ("PATCH", p) if p.ends_with("/settings") => {
            std::fs::create_dir_all(files).unwrap();
            let file = files.join("settings.json");
            std::fs::write(&file, r#"{"bindings":[]}"#).unwrap();
            Body::Form(vec![format!("settings=<{}", file.display())])
        }
        ("PUT", p) if p.ends_with("/secrets") => {
            Body::Json(r#"{"name":"K","text":"walk","type":"secret_text"}"#.into())
        }
        ("PUT", p) if p.ends_with("/schedules") || p.ends_with("/routes") => Body::Json("[]".into()),
        ("PUT", p) if p.ends_with("/domains/records") => Body::Json(r#"{"origins":[]}"#.into()),
        ("POST", p) if p.ends_with("/domains/changeset") => Body::Json("[]".into()),
        ("POST", p) if p.ends_with("/deployments") => Body::Json(
            r#"{"versions":[{"version_id":"00000000-0000-4000-8000-000000000000","percentage":100}]}"#.into(),
        ),
        ("PATCH", _) => Body::Json(r#"{"observability":{"enabled":false}}"#.into()),
        ("POST", _) => Body::Json(r#"{"enabled":true}"#.into()),
        _ => Body::None,
    }
}

/// Hostile values for one path parameter of `own`'s requests, aimed at `other`'s objects.
fn payloads(parameter: &str, own: &Tenant, other: &Tenant) -> Vec<String> {
    let own_value = match parameter {
        "account_id" => own.account.to_owned(),
        "script_name" => own.script.to_owned(),
        "version_id" => own.version.clone(),
        "secret_name" => "K".to_owned(),
        _ => "0123456789abcdef0123456789abcdef".to_owned(),
    };
    let tails = [
        format!("{}%2F{}", other.account, other.script),
        format!("{}%2F{}%2F{}", other.account, other.script, other.version),
        format!("{}%2Fworkers%2Fscripts%2F{}", other.account, other.script),
    ];
    let mut values = vec![
        "..".to_owned(),
        "%2e%2e".to_owned(),
        "%2E%2E".to_owned(),
        ".%2e".to_owned(),
        "%c0%ae%c0%ae".to_owned(),
        "%00".to_owned(),
        format!("{own_value}%00"),
        format!("{own_value}%00..%2F"),
        format!("%2F{}", other.account),
    ];
    for tail in &tails {
        values.extend([
            format!("..%2F{tail}"),
            format!("..%2F..%2F{tail}"),
            format!("..%2F..%2F..%2F{tail}"),
            format!("%2e%2e%2F%2e%2e%2F{tail}"),
            format!("%2F{tail}"),
            format!("{own_value}%2F..%2F..%2F{tail}"),
            format!("%c0%ae%c0%ae%2F%c0%ae%c0%ae%2F{tail}"),
            format!("%c0%ae%c0%ae%c0%af{tail}"),
            format!("%252e%252e%252F{tail}"),
            format!("..%5C..%5C{tail}"),
        ]);
    }
    // Literal dot segments: they change which route matches, if any.
    values.push(format!("../../{}/workers/scripts/{}", other.account, other.script));
    values.push(format!("{own_value}/../../../{}/workers/scripts/{}", other.account, other.script));
    values
}

/// Every route path of the table with each parameter in turn replaced by each payload (the
/// others filled with `own`'s good values), with a body the route would accept.
fn hostile_requests(own: &Tenant, other: &Tenant, files: &Path) -> Vec<(String, &'static str, String, Body)> {
    let mut requests = Vec::new();
    for route in workerbundle::api::routes() {
        let method = route.method.to_string();
        let body = route_body(&method, route.path, &files.join(route.path.replace('/', "_")));
        let good = |path: &str| {
            path.replace("{account_id}", own.account)
                .replace("{script_name}", own.script)
                .replace("{version_id}", &own.version)
                .replace("{secret_name}", "K")
                .replace("{zone_id}", "0123456789abcdef0123456789abcdef")
        };
        for parameter in workerbundle::api::PATH_PARAMETERS {
            let marker = format!("{{{parameter}}}");
            if !route.path.contains(&marker) {
                continue;
            }
            for payload in payloads(parameter, own, other) {
                let path = good(&route.path.replace(&marker, &payload));
                requests.push((method.clone(), route.path, path, body.clone()));
            }
        }
    }
    requests
}

#[test]
fn no_route_reaches_another_account_through_its_path() {
    let s3 = S3Server::start();
    let cluster = Cluster::start("api-traversal");
    let api = ApiServer::start(&cluster, &s3, &[A, B], &["--rate-limit", "0"]);
    let files = tempdir();
    let mut a = Tenant {
        account: A.0,
        token: A.1,
        script: "aworker",
        version: String::new(),
        markers: ["A-CODE-MARKER-3b1f", "A-VAR-MARKER-91c2", "A-SECRET-MARKER-44de"],
    };
    let mut b = Tenant {
        account: B.0,
        token: B.1,
        script: "bworker",
        version: String::new(),
        markers: ["B-CODE-MARKER-5d1e", "B-VAR-MARKER-77aa", "B-SECRET-MARKER-c0de"],
    };
    a.version = deploy(&api, files.path(), &a);
    b.version = deploy(&api, files.path(), &b);

    // Controls: with good names, the markers do come back, so their absence below means something.
    let own = |t: &Tenant, tail: &str| {
        request(
            "GET",
            &format!("{}/accounts/{}/workers/scripts/{}{tail}", api.url, t.account, t.script),
            t.token,
            &Body::None,
        )
    };
    let (code, text) = own(&b, &format!("/versions/{}", b.version));
    assert!(code == 200 && text.contains(b.markers[1]), "{code} {text}");
    let (code, text) = own(&b, "");
    assert!(code == 200 && text.contains(b.markers[0]), "{code} {text}");

    // The reported request: A's token, A's account, B's version through `..%2F`.
    let reported = format!(
        "{}/accounts/{}/workers/scripts/..%2F{}%2F{}/versions/{}",
        api.url, a.account, b.account, b.script, b.version
    );
    let (code, text) = request("GET", &reported, a.token, &Body::None);
    assert_eq!(code, 400, "{text}");
    assert!(!b.markers.iter().any(|m| text.contains(m)), "{text}");

    let objects = s3.objects(BUCKET);
    let deployments = cluster.list("workerdeployments", None);
    let secrets = cluster.list("secrets", Some("workerbundle.dev/account"));
    let mut walked = 0;
    for (own, other) in [(&a, &b), (&b, &a)] {
        let requests = hostile_requests(own, other, files.path());
        walked += requests.len();
        let failures: Vec<String> = std::thread::scope(|scope| {
            let chunks: Vec<_> = requests.chunks(requests.len().div_ceil(8)).collect();
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    let api = &api;
                    scope.spawn(move || {
                        let mut failures = Vec::new();
                        for (method, route, path, body) in chunk {
                            let (code, text) =
                                request(method, &format!("{}{path}", api.url), own.token, body);
                            let leaked = other.markers.iter().find(|m| text.contains(*m));
                            let result = serde_json::from_str::<Value>(&text).map(|v| v["result"].clone());
                            if ![400, 403, 404].contains(&code)
                                || leaked.is_some()
                                || !matches!(result, Ok(Value::Null))
                            {
                                failures.push(format!(
                                    "{method} {path} ({route}) with {}'s token: {code} {text}",
                                    own.account
                                ));
                            }
                        }
                        failures
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert!(
            failures.is_empty(),
            "{} of {} requests were not refused cleanly:\n{}",
            failures.len(),
            requests.len(),
            failures.join("\n")
        );
    }
    eprintln!("{walked} hostile requests over {} routes: all refused", workerbundle::api::routes().len());

    // Nothing changed anywhere: no object, no worker, no secret.
    assert_eq!(s3.objects(BUCKET), objects, "the walk changed the bucket");
    let names = |list: &[Value]| -> Vec<(String, Value)> {
        list.iter().map(|o| (o["metadata"]["name"].as_str().unwrap().to_owned(), o["spec"].clone())).collect()
    };
    assert_eq!(names(&cluster.list("workerdeployments", None)), names(&deployments));
    let data = |list: &[Value]| -> Vec<Value> { list.iter().map(|s| s["data"].clone()).collect() };
    assert_eq!(data(&cluster.list("secrets", Some("workerbundle.dev/account"))), data(&secrets));
    assert!(api.is_running());
}
