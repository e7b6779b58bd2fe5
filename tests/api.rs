//! The Cloudflare-compatible API end to end: unmodified wrangler 4.86.0 → `workerbundle api` (its
//! own process) → the real S3 server and a Kubernetes API (KUBECONFIG's cluster, else the in-memory
//! API server) → the controller (`workerbundle run`), which builds each version's release.

mod support;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::api::{curl, form, token_line, ApiServer, Body, BUCKET};
use support::cluster::{Cluster, Controller};
use support::registry::Registry;
use support::s3::{S3Server, SECRET_KEY};
use support::wrangler::Wrangler;
use support::*;

const A: &str = "1234";
const B: &str = "5678";
const TOKEN_A: &str = "token-of-account-1234-0b8a5b8e";
const TOKEN_B: &str = "token-of-account-5678-2c4d2b7d";
const WAIT: Duration = Duration::from_secs(90);

struct Env {
    cluster: Cluster,
    s3: S3Server,
    api: ApiServer,
    /// With the controller: the registry it pushes to, and the controller itself.
    built: Option<(Registry, Controller)>,
}

impl Env {
    fn start(test: &str, with_controller: bool, api_args: &[&str]) -> Env {
        let s3 = S3Server::start();
        let cluster = Cluster::start(test);
        let built = with_controller.then(|| {
            let registry = Registry::start(false);
            let prefix = format!("{}/workers", registry.host());
            let endpoint = s3.endpoint();
            let controller = Controller::start(
                &cluster,
                &["--repository-prefix", &prefix, "--insecure", "--s3-endpoint", &endpoint],
                &s3.env(SECRET_KEY),
            );
            (registry, controller)
        });
        let api = ApiServer::start(&cluster, &s3, &[(A, TOKEN_A), (B, TOKEN_B)], api_args);
        Env { cluster, s3, api, built }
    }

    fn controller(&self) -> &Controller {
        &self.built.as_ref().expect("started without the controller").1
    }

    fn wrangler(&self, token: &str, account: Option<&str>) -> Wrangler {
        Wrangler::new(&self.api.url, token, account)
    }

    /// The current release of WorkerDeployment `name` once its template is at `version`.
    fn release_of(&self, name: &str, version: &str) -> String {
        self.cluster.wait_for("workerdeployment", name, WAIT, self.controller(), |d| {
            (d["spec"]["template"]["versionId"] == version
                && d["status"]["observedGeneration"] == d["metadata"]["generation"])
                .then(|| d["status"]["currentRelease"].as_str().map(str::to_owned))?
        })
    }

    /// Waits until the release is built; returns its layer digest.
    fn built_layer(&self, release: &str) -> String {
        self.cluster.wait_for("workerrelease", release, WAIT, self.controller(), |r| {
            (r["status"]["phase"] == "Ready")
                .then(|| r["status"]["layer"]["digest"].as_str().map(str::to_owned))?
        })
    }

    /// Object keys of the bucket under `prefix`.
    fn keys(&self, prefix: &str) -> BTreeSet<String> {
        self.s3.objects(BUCKET).into_keys().filter(|k| k.starts_with(prefix)).collect()
    }
}

fn write(dir: &Path, files: &[(&str, &[u8])]) {
    for (path, content) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
}

const HELLO_TOML: &str = r#"name = "hello"
main = "index.js"
compatibility_date = "2024-09-23"
"#;

fn hello_js(text: &str) -> String {
    format!("export default {{ fetch() {{ return new Response({text:?}); }} }};\n")
}

#[test]
fn deploy_redeploy_versions_rollback_and_memberships() {
    let env = Env::start("api-deploy", true, &[]);
    let wrangler = env.wrangler(TOKEN_A, Some(A));
    let project = tempdir();
    let dir = project.path();

    // A new worker.
    write(dir, &[("wrangler.toml", HELLO_TOML.as_bytes()), ("index.js", hello_js("first").as_bytes())]);
    let v1 = wrangler.ok(dir, &["deploy"]).version_id();
    let keys = env.keys(&format!("{A}/hello/{v1}/"));
    assert_eq!(
        keys,
        [format!("{A}/hello/{v1}/index.js"), format!("{A}/hello/{v1}/metadata.json")].into_iter().collect()
    );
    let wd = env.cluster.get("workerdeployment", "hello").expect("the upload applied the WorkerDeployment");
    let template = &wd["spec"]["template"];
    assert_eq!(template["versionId"], v1.as_str());
    assert_eq!(template["scriptUrls"], json!([format!("s3://{BUCKET}/{A}/hello/{v1}/")]));
    assert_eq!(template["mainModule"], "index.js");
    assert_eq!(template["compatibilityDate"], "2024-09-23");
    assert_eq!(template["secretRef"], "hello-secrets");
    assert_eq!(wd["metadata"]["labels"]["workerbundle.dev/account"], A);
    assert!(env.cluster.get("workeraccount", A).is_some(), "the account was created on first upload");
    let first = env.release_of("hello", &v1);
    env.built_layer(&first);
    let release = env.cluster.get("workerrelease", &first).unwrap();
    assert_eq!(release["spec"]["template"]["versionId"], v1.as_str(), "the release records its version");
    let first_uid = release["metadata"]["uid"].clone();

    // A changed worker: a new version beside the first, a new release.
    write(dir, &[("index.js", hello_js("second").as_bytes())]);
    let v2 = wrangler.ok(dir, &["deploy"]).version_id();
    assert_ne!(v1, v2);
    let objects = env.s3.objects(BUCKET);
    let module = |v: &str| String::from_utf8(objects[&format!("{A}/hello/{v}/index.js")].clone()).unwrap();
    assert!(module(&v1).contains("first") && module(&v2).contains("second"), "S3 holds both versions");
    let second = env.release_of("hello", &v2);
    assert_ne!(first, second);
    env.built_layer(&second);
    env.cluster.wait_for("workerdeployment", "hello", WAIT, env.controller(), |d| {
        (d["status"]["releaseHistory"].as_array().map(Vec::len) == Some(2)).then_some(())
    });

    // Both versions and both deployments are listed.
    let versions = wrangler.ok(dir, &["versions", "list"]).text();
    assert!(versions.contains(&v1) && versions.contains(&v2), "{versions}");
    let deployments = wrangler.ok(dir, &["deployments", "list"]).text();
    assert!(deployments.contains(&v1) && deployments.contains(&v2), "{deployments}");

    // Rollback to the first version: its release comes back, not rebuilt.
    let rollback = wrangler.ok(dir, &["rollback", &v1, "--message", "back to the first", "-y"]);
    assert_eq!(rollback.version_id(), v1);
    let back = env.release_of("hello", &v1);
    assert_eq!(back, first, "the first release is current again");
    let reused = env.cluster.get("workerrelease", &first).unwrap();
    assert_eq!(reused["metadata"]["uid"], first_uid, "the first release was reused, not recreated");
    env.cluster.wait_for("workerdeployment", "hello", WAIT, env.controller(), |d| {
        (d["status"]["conditions"][0]["status"] == "True").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let log = env.controller().log();
    assert_eq!(
        log.matches("release built").count(),
        2,
        "two versions, two builds, none for the rollback:\n{log}"
    );
    let listed: Value =
        serde_json::from_slice(&wrangler.ok(dir, &["deployments", "list", "--json"]).output.stdout).unwrap();
    let newest = listed.as_array().unwrap().last().unwrap().clone();
    assert_eq!(newest["versions"][0]["version_id"], v1.as_str(), "{listed}");
    assert_eq!(newest["annotations"]["workers/message"], "back to the first");

    // Without CLOUDFLARE_ACCOUNT_ID, wrangler finds the account through /memberships (in a fresh
    // project: wrangler caches the account under node_modules/.cache).
    let anonymous = env.wrangler(TOKEN_A, None);
    let fresh = tempdir();
    write(
        fresh.path(),
        &[("wrangler.toml", HELLO_TOML.as_bytes()), ("index.js", hello_js("third").as_bytes())],
    );
    let v3 = anonymous.ok(fresh.path(), &["deploy"]).version_id();
    assert_eq!(
        env.cluster.get("workerdeployment", "hello").unwrap()["spec"]["template"]["versionId"],
        v3.as_str()
    );
    let third = env.release_of("hello", &v3);
    env.built_layer(&third);
    let log = env.api.log();
    assert!(
        log.lines().any(|l| l.contains("route=/client/v4/memberships") && l.contains("status=200")),
        "wrangler asked /memberships:\n{log}"
    );
    assert!(!log.contains(TOKEN_A), "the token is never logged");

    // One log line per request, and a clean stop.
    assert!(log.contains(
        "method=PUT route=/client/v4/accounts/{account_id}/workers/scripts/{script_name} account=1234"
    ));
    assert!(log.lines().any(|l| l.contains("status=200") && l.contains("duration_ms=")), "{log}");
    assert!(env.api.terminate().success(), "{}", env.api.log());
}

#[test]
fn a_multi_module_worker_with_wasm_text_and_vars() {
    let env = Env::start("api-multi", true, &[]);
    let wrangler = env.wrangler(TOKEN_A, Some(A));
    let project = tempdir();
    let dir = project.path();
    let source = repo_path("testdata/workers/hello");
    copy_dir(&source, &dir.join("src"));
    std::fs::remove_file(dir.join("src/metadata.json")).unwrap();
    write(
        dir,
        &[(
            "wrangler.toml",
            br#"name = "multi"
main = "src/index.js"
compatibility_date = "2024-09-23"
compatibility_flags = ["nodejs_compat"]
no_bundle = true
find_additional_modules = true
rules = [
  { type = "ESModule", globs = ["**/*.js"] },
  { type = "CommonJS", globs = ["**/*.cjs"] },
  { type = "Text", globs = ["**/*.txt"] },
  { type = "CompiledWasm", globs = ["**/*.wasm"] },
]

[vars]
GREETING = "Hello from wrangler"
CONFIG = { answer = 42, tags = ["wasm", "multi-module"] }
"#,
        )],
    );
    let version = wrangler.ok(dir, &["deploy"]).version_id();

    // Every module reaches S3, byte for byte.
    let modules = ["add.wasm", "banner.txt", "index.js", "lib/describe.js", "lib/legacy.cjs"];
    let prefix = format!("{A}/multi/{version}/");
    let objects = env.s3.objects(BUCKET);
    for module in modules {
        let stored =
            objects.get(&format!("{prefix}{module}")).unwrap_or_else(|| panic!("{module} not in S3"));
        assert_eq!(stored, &std::fs::read(source.join(module)).unwrap(), "{module}");
    }
    let metadata: Value = serde_json::from_slice(&objects[&format!("{prefix}metadata.json")]).unwrap();
    assert_eq!(metadata["main_module"], "index.js");

    // Plain and JSON vars reach the template.
    let wd = env.cluster.get("workerdeployment", "multi").unwrap();
    let template = &wd["spec"]["template"];
    assert_eq!(template["compatibilityFlags"], json!(["nodejs_compat"]));
    let vars = template["vars"].as_array().unwrap();
    let var =
        |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("{name}: {vars:?}"));
    assert_eq!(
        (var("GREETING")["type"].as_str(), var("GREETING")["value"].as_str()),
        (Some("text"), Some("Hello from wrangler"))
    );
    assert_eq!(var("CONFIG")["type"], "json");
    let config: Value = serde_json::from_str(var("CONFIG")["value"].as_str().unwrap()).unwrap();
    assert_eq!(config, json!({"answer": 42, "tags": ["wasm", "multi-module"]}));

    // ... and the release's layer holds every module.
    let release = env.release_of("multi", &version);
    let digest = env.built_layer(&release);
    let status = env.cluster.get("workerrelease", &release).unwrap()["status"].clone();
    let names: BTreeSet<&str> =
        status["modules"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, modules.into_iter().collect());
    let registry = &env.built.as_ref().unwrap().0;
    let port: u16 = registry.host().rsplit(':').next().unwrap().parse().unwrap();
    let (code, blob) = support::registry::http(
        port,
        "GET",
        &format!("/v2/workers/{A}/blobs/{digest}"),
        &registry.auth_header(),
    );
    assert_eq!(code, 200);
    let mut layer = tar::Archive::new(flate2::read::GzDecoder::new(blob.as_slice()));
    let mut in_layer = std::collections::BTreeMap::new();
    for entry in layer.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        in_layer.insert(path, content);
    }
    for module in modules {
        let found = in_layer.iter().find(|(p, _)| p.ends_with(&format!("/{module}")));
        let (_, content) =
            found.unwrap_or_else(|| panic!("{module} not in the layer: {:?}", in_layer.keys()));
        assert_eq!(content, &std::fs::read(source.join(module)).unwrap(), "{module}");
    }
}

#[test]
fn secrets_put_list_delete() {
    let env = Env::start("api-secrets", false, &[]);
    let wrangler = env.wrangler(TOKEN_A, Some(A));
    let project = tempdir();
    let dir = project.path();
    write(dir, &[("wrangler.toml", HELLO_TOML.as_bytes()), ("index.js", hello_js("hi").as_bytes())]);
    wrangler.ok(dir, &["deploy"]);
    let before = env.cluster.get("workerdeployment", "hello").unwrap();

    const VALUE: &str = "s3cr3t-value-9f1c";
    let put = wrangler.run_with_input(dir, &["secret", "put", "API_KEY"], Some(VALUE));
    assert!(put.success(), "{}", put.text());
    let other = wrangler.run_with_input(dir, &["secret", "put", "OTHER"], Some("other-value"));
    assert!(other.success(), "{}", other.text());
    let secret = env.cluster.get("secret", "hello-secrets").expect("the Secret was created");
    assert_eq!(secret["data"]["API_KEY"], base64_of(VALUE));
    assert_eq!(secret["metadata"]["labels"]["workerbundle.dev/account"], A);

    let list = wrangler.ok(dir, &["secret", "list"]).text();
    assert!(list.contains("API_KEY") && list.contains("OTHER"), "{list}");
    assert!(!list.contains(VALUE), "secret list shows names only:\n{list}");

    let delete = wrangler.ok(dir, &["secret", "delete", "API_KEY"]);
    assert!(delete.text().contains("Deleted secret API_KEY"), "{}", delete.text());
    let secret = env.cluster.get("secret", "hello-secrets").unwrap();
    assert!(secret["data"].get("API_KEY").is_none(), "{secret}");
    assert_eq!(secret["data"]["OTHER"], base64_of("other-value"));

    // Secrets change only the Secret: the template (and so the release) stays as it was.
    let after = env.cluster.get("workerdeployment", "hello").unwrap();
    assert_eq!(after["spec"], before["spec"]);
    assert_eq!(after["metadata"]["generation"], before["metadata"]["generation"]);
    // A redeploy keeps the secrets: they live in the Secret, which uploads do not touch.
    write(dir, &[("index.js", hello_js("again").as_bytes())]);
    wrangler.ok(dir, &["deploy"]);
    let redeployed = env.cluster.get("workerdeployment", "hello").unwrap();
    assert_ne!(redeployed["spec"]["template"]["versionId"], before["spec"]["template"]["versionId"]);
    assert_eq!(redeployed["spec"]["template"]["secretRef"], "hello-secrets");
    let secret = env.cluster.get("secret", "hello-secrets").unwrap();
    assert_eq!(secret["data"]["OTHER"], base64_of("other-value"));
    let list = wrangler.ok(dir, &["secret", "list"]).text();
    assert!(list.contains("OTHER") && !list.contains("API_KEY"), "{list}");

    // The value is nowhere but in the Secret.
    assert!(!env.api.log().contains(VALUE), "the value is not logged");
    for (key, content) in env.s3.objects(BUCKET) {
        assert!(!String::from_utf8_lossy(&content).contains(VALUE), "the value reached S3 in {key}");
    }
    let events = env.cluster.kubectl_ok(&["get", "events", "-o", "json"]);
    assert!(!events.contains(VALUE));
    let status = env.cluster.kubectl_ok(&["get", "workerdeployment", "hello", "-o", "json"]);
    assert!(!status.contains(VALUE));
}

/// `wrangler versions upload` stores a version without running it; `versions deploy` runs it.
#[test]
fn versions_upload_then_deploy() {
    let env = Env::start("api-versions", false, &[]);
    let wrangler = env.wrangler(TOKEN_A, Some(A));
    let project = tempdir();
    let dir = project.path();
    write(dir, &[("wrangler.toml", HELLO_TOML.as_bytes()), ("index.js", hello_js("one").as_bytes())]);
    let v1 = wrangler.ok(dir, &["deploy"]).version_id();
    write(dir, &[("index.js", hello_js("two").as_bytes())]);
    let upload = wrangler.ok(dir, &["versions", "upload", "--message", "staged"]).text();
    let v2 = upload
        .lines()
        .find_map(|l| l.trim().strip_prefix("Worker Version ID: "))
        .unwrap_or_else(|| panic!("no version id:\n{upload}"))
        .to_owned();
    assert!(env.keys(&format!("{A}/hello/{v2}/")).contains(&format!("{A}/hello/{v2}/index.js")));
    let current =
        || env.cluster.get("workerdeployment", "hello").unwrap()["spec"]["template"]["versionId"].clone();
    assert_eq!(current(), v1.as_str(), "an uploaded version does not run until it is deployed");
    let listed = wrangler.ok(dir, &["versions", "view", &v2]).text();
    assert!(listed.contains("staged"), "the version keeps its message:\n{listed}");

    wrangler.ok(dir, &["versions", "deploy", &format!("{v2}@100"), "-y"]);
    assert_eq!(current(), v2.as_str());
}

/// `keep_vars = true`: a deploy without vars keeps the running version's (wrangler sends
/// `keep_bindings`), where a plain deploy without vars drops them, as on Cloudflare.
#[test]
fn keep_vars_keeps_the_running_vars() {
    let env = Env::start("api-keep-vars", false, &[]);
    let wrangler = env.wrangler(TOKEN_A, Some(A));
    let project = tempdir();
    let dir = project.path();
    let with_vars = format!("{HELLO_TOML}[vars]\nKEPT = \"yes\"\nCFG = {{ n = 1 }}\n");
    write(dir, &[("wrangler.toml", with_vars.as_bytes()), ("index.js", hello_js("one").as_bytes())]);
    wrangler.ok(dir, &["deploy"]);
    let names = || -> Vec<String> {
        let wd = env.cluster.get("workerdeployment", "hello").unwrap();
        let vars = wd["spec"]["template"]["vars"].as_array().cloned().unwrap_or_default();
        vars.iter().map(|v| v["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names(), ["KEPT", "CFG"]);

    write(dir, &[("wrangler.toml", format!("keep_vars = true\n{HELLO_TOML}").as_bytes())]);
    write(dir, &[("index.js", hello_js("two").as_bytes())]);
    wrangler.ok(dir, &["deploy"]);
    assert_eq!(names(), ["KEPT", "CFG"], "keep_vars kept them");

    write(dir, &[("wrangler.toml", HELLO_TOML.as_bytes()), ("index.js", hello_js("three").as_bytes())]);
    wrangler.ok(dir, &["deploy"]);
    assert!(names().is_empty(), "without keep_vars the upload's (no) vars are the vars");
}

/// `wrangler delete` asks what depends on the worker first (references, tail producers), then
/// deletes the service; `--force` skips the questions.
#[test]
fn wrangler_delete_removes_the_worker_its_secret_and_its_versions() {
    let env = Env::start("api-delete", false, &[]);
    let wrangler = env.wrangler(TOKEN_A, Some(A));
    let project = tempdir();
    let dir = project.path();
    let gone = |env: &Env| {
        assert!(env.cluster.get("workerdeployment", "hello").is_none());
        assert!(env.cluster.get("secret", "hello-secrets").is_none());
        assert!(env.keys(&format!("{A}/hello/")).is_empty());
        let (code, reply) = curl(
            "GET",
            &format!("{}/accounts/{A}/workers/services/hello", env.api.url),
            Some(TOKEN_A),
            Body::None,
        );
        assert_eq!((code, &reply["errors"][0]["code"]), (404, &json!(10007)));
    };
    for args in [&["delete"][..], &["delete", "--force"][..]] {
        write(dir, &[("wrangler.toml", HELLO_TOML.as_bytes()), ("index.js", hello_js("bye").as_bytes())]);
        wrangler.ok(dir, &["deploy"]);
        assert!(wrangler.run_with_input(dir, &["secret", "put", "K"], Some("v")).success());
        assert!(!env.keys(&format!("{A}/hello/")).is_empty());
        let run = wrangler.ok(dir, args);
        assert!(run.text().contains("Successfully deleted hello"), "{args:?}: {}", run.text());
        gone(&env);
    }
    let log = env.api.log();
    for route in ["/references", "/tails/by-consumer/{script_name}"] {
        assert!(
            log.lines().any(|l| l.contains(route) && l.contains("status=200")),
            "wrangler delete asked {route}:\n{log}"
        );
    }
    // Both answer "not found" for a worker that does not exist.
    for path in ["workers/scripts/hello/references", "workers/tails/by-consumer/hello"] {
        let url = format!("{}/accounts/{A}/{path}", env.api.url);
        let (code, reply) = curl("GET", &url, Some(TOKEN_A), Body::None);
        assert_eq!((code, &reply["errors"][0]["code"]), (404, &json!(10007)), "{path}: {reply}");
    }
}

/// `wrangler secret bulk`: the settings GET lists the worker's bindings (secrets by name), the
/// settings PATCH keeps them and sets the new secrets in the worker's Secret, and nothing else
/// changes; on a worker that does not exist wrangler creates a draft first.
#[test]
fn secret_bulk_sets_secrets_and_changes_nothing_else() {
    let env = Env::start("api-secret-bulk", false, &[]);
    let wrangler = env.wrangler(TOKEN_A, Some(A));
    let project = tempdir();
    let dir = project.path();
    let toml = format!("{HELLO_TOML}[vars]\nGREETING = \"hi\"\nCFG = {{ n = 1 }}\n");
    write(dir, &[("wrangler.toml", toml.as_bytes()), ("index.js", hello_js("bulk").as_bytes())]);
    wrangler.ok(dir, &["deploy"]);
    assert!(wrangler.run_with_input(dir, &["secret", "put", "OLD"], Some("old-value")).success());
    assert!(wrangler.run_with_input(dir, &["secret", "put", "KEPT"], Some("kept-value")).success());
    let before = env.cluster.get("workerdeployment", "hello").unwrap();

    const VALUE: &str = "bulk-s3cr3t-6e0d";
    let secrets = format!(r#"{{"API_KEY":"{VALUE}","OLD":"renewed"}}"#);
    write(dir, &[("secrets.json", secrets.as_bytes())]);
    let run = wrangler.ok(dir, &["secret", "bulk", "secrets.json"]);
    assert!(run.text().contains("2 secrets successfully uploaded"), "{}", run.text());
    let secret = env.cluster.get("secret", "hello-secrets").unwrap();
    assert_eq!(secret["data"]["API_KEY"], base64_of(VALUE));
    assert_eq!(secret["data"]["OLD"], base64_of("renewed"));
    assert_eq!(secret["data"]["KEPT"], base64_of("kept-value"));
    let after = env.cluster.get("workerdeployment", "hello").unwrap();
    assert_eq!(after["spec"], before["spec"], "the code and vars did not change");
    assert_eq!(after["metadata"]["generation"], before["metadata"]["generation"]);

    // The settings list the vars with their values and the secrets by name only.
    let settings = format!("{}/accounts/{A}/workers/scripts/hello/settings", env.api.url);
    let (code, reply) = curl("GET", &settings, Some(TOKEN_A), Body::None);
    assert_eq!(code, 200, "{reply}");
    let bindings = reply["result"]["bindings"].to_string();
    for name in ["GREETING", "CFG", "API_KEY", "OLD", "KEPT"] {
        assert!(bindings.contains(name), "{name} missing: {bindings}");
    }
    assert!(!bindings.contains(VALUE) && !bindings.contains("renewed"), "{bindings}");

    // A PATCH that would change a var, or leave a binding out, is refused by name; nothing changes.
    let files = tempdir();
    let keep = r#"{"type":"json","name":"CFG"},{"type":"secret_text","name":"API_KEY"},
        {"type":"secret_text","name":"OLD"},{"type":"secret_text","name":"KEPT"}"#;
    for (settings_json, words) in [
        (
            format!(r#"{{"bindings":[{{"type":"plain_text","name":"GREETING","text":"changed"}},{keep}]}}"#),
            "GREETING",
        ),
        (format!(r#"{{"bindings":[{keep}]}}"#), "var \"GREETING\" is left out"),
        (
            format!(r#"{{"bindings":[{{"type":"plain_text","name":"GREETING"}},{keep}],"logpush":true}}"#),
            "logpush",
        ),
    ] {
        let (code, reply) =
            curl("PATCH", &settings, Some(TOKEN_A), Body::Form(settings_form(files.path(), &settings_json)));
        assert_eq!((code, &reply["errors"][0]["code"]), (400, &json!(10021)), "{reply}");
        let message = reply["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(words), "{message:?} does not say {words:?}");
    }
    assert_eq!(env.cluster.get("secret", "hello-secrets").unwrap()["data"], secret["data"]);
    assert_eq!(env.cluster.get("workerdeployment", "hello").unwrap()["spec"], before["spec"]);

    // A worker that does not exist yet: wrangler creates a draft (no compatibility date), then
    // sets the secrets.
    let fresh = tempdir();
    write(
        fresh.path(),
        &[("wrangler.toml", "name = \"fresh\"\n".as_bytes()), ("secrets.json", secrets.as_bytes())],
    );
    let run = wrangler.ok(fresh.path(), &["secret", "bulk", "secrets.json"]);
    assert!(run.text().contains("2 secrets successfully uploaded"), "{}", run.text());
    let draft = env.cluster.get("workerdeployment", "fresh").expect("the draft worker");
    assert_eq!(draft["spec"]["template"]["mainModule"], "fresh.mjs");
    assert_eq!(env.cluster.get("secret", "fresh-secrets").unwrap()["data"]["API_KEY"], base64_of(VALUE));

    // The values are nowhere but in the Secrets.
    assert!(!env.api.log().contains(VALUE), "the value is not logged");
    for (key, content) in env.s3.objects(BUCKET) {
        assert!(!String::from_utf8_lossy(&content).contains(VALUE), "the value reached S3 in {key}");
    }
}

/// Cron schedules, routes and custom domains come after the code is live, in calls the upload does
/// not announce: refused, they undo the deploy (the previous version runs again; a first deploy's
/// worker is deleted), and wrangler's error names the setting.
#[test]
fn a_refused_trigger_undoes_the_deploy() {
    let env = Env::start("api-triggers", false, &[]);
    let wrangler = env.wrangler(TOKEN_A, Some(A));
    let project = tempdir();
    let dir = project.path();
    let current =
        || env.cluster.get("workerdeployment", "hello").unwrap()["spec"]["template"]["versionId"].clone();
    write(dir, &[("wrangler.toml", HELLO_TOML.as_bytes()), ("index.js", hello_js("one").as_bytes())]);
    let v1 = wrangler.ok(dir, &["deploy"]).version_id();

    for (extra, words) in [
        ("[triggers]\ncrons = [\"*/5 * * * *\"]\n", "cron triggers ([triggers] crons) are not served yet"),
        (
            "routes = [{ pattern = \"example.com/*\", zone_name = \"example.com\" }]\n",
            "routes (route / routes in the config) are not served yet",
        ),
        (
            "workers_dev = true\nroutes = [{ pattern = \"app.example.com\", custom_domain = true }]\n",
            "custom domains (routes with custom_domain = true) are not served yet",
        ),
    ] {
        let toml = format!("{HELLO_TOML}{extra}");
        write(dir, &[("wrangler.toml", toml.as_bytes()), ("index.js", hello_js("two").as_bytes())]);
        let run = wrangler.run(dir, &["deploy"]);
        assert!(!run.success(), "{extra}: {}", run.text());
        let expected = format!("{words}; the previous version keeps running");
        assert!(run.text().contains(&expected), "{extra}: no {expected:?} in\n{}", run.text());
        assert_eq!(current(), v1.as_str(), "{extra}: the first version runs again");
        let wd = env.cluster.get("workerdeployment", "hello").unwrap();
        let message = wd["metadata"]["annotations"]["workerbundle.dev/deployment-message"].as_str();
        assert!(message.is_some_and(|m| m.contains("undone")), "{wd}");
    }

    // Empty lists are what a worker without triggers sends: served.
    let toml = format!("{HELLO_TOML}[triggers]\ncrons = []\n");
    write(dir, &[("wrangler.toml", toml.as_bytes()), ("index.js", hello_js("three").as_bytes())]);
    let v3 = wrangler.ok(dir, &["deploy"]).version_id();
    assert_eq!(current(), v3.as_str());

    // A first deploy with crons leaves no worker behind.
    let fresh = tempdir();
    let toml = "name = \"cronw\"\nmain = \"index.js\"\ncompatibility_date = \"2024-09-23\"\n[triggers]\ncrons = [\"0 0 * * *\"]\n";
    write(fresh.path(), &[("wrangler.toml", toml.as_bytes()), ("index.js", hello_js("cron").as_bytes())]);
    let run = wrangler.run(fresh.path(), &["deploy"]);
    assert!(!run.success());
    assert!(run.text().contains("worker \"cronw\" was new and has been deleted"), "{}", run.text());
    assert!(env.cluster.get("workerdeployment", "cronw").is_none());
    assert!(env.keys(&format!("{A}/cronw/")).is_empty(), "{:?}", env.keys(&format!("{A}/cronw/")));
    let (code, reply) = curl(
        "GET",
        &format!("{}/accounts/{A}/workers/services/cronw", env.api.url),
        Some(TOKEN_A),
        Body::None,
    );
    assert_eq!((code, &reply["errors"][0]["code"]), (404, &json!(10007)));

    // logpush and tail consumers are refused by name at upload; observability is served.
    for (extra, words) in [
        ("logpush = true\n", "logpush"),
        ("tail_consumers = [{ service = \"tailer\" }]\n", "tail consumers"),
        ("[limits]\ncpu_ms = 50\n", "limits"),
    ] {
        let toml = format!("{HELLO_TOML}{extra}");
        write(dir, &[("wrangler.toml", toml.as_bytes()), ("index.js", hello_js("four").as_bytes())]);
        let run = wrangler.run(dir, &["deploy"]);
        assert!(!run.success() && run.text().contains(words), "{extra}: {}", run.text());
        assert_eq!(current(), v3.as_str());
    }
    let toml = format!("{HELLO_TOML}[observability]\nenabled = true\nhead_sampling_rate = 0.5\n");
    write(dir, &[("wrangler.toml", toml.as_bytes()), ("index.js", hello_js("five").as_bytes())]);
    let v5 = wrangler.ok(dir, &["deploy"]).version_id();
    assert_eq!(current(), v5.as_str());
}

/// The same through `workerbundle dev`, where the worker really answers: a redeploy with cron
/// triggers fails and the first version keeps answering.
#[test]
fn a_deploy_with_crons_leaves_the_old_version_answering() {
    use support::dev::{wait_for_answer, write_project, Dev};
    let dir = tempdir();
    let mut dev = Dev::start(dir.path());
    let (wrangler, _) = dev.wrangler();
    let project = dir.path().join("hello");
    write_project(&project, "v1");
    wrangler.ok(&project, &["deploy"]);
    let url = dev.serving("hello");
    wait_for_answer(&url, "hi v1 token=undefined", &dev);

    write_project(&project, "v2");
    let toml = std::fs::read_to_string(project.join("wrangler.toml")).unwrap();
    let toml = toml.replace("[vars]", "[triggers]\ncrons = [\"*/5 * * * *\"]\n\n[vars]");
    std::fs::write(project.join("wrangler.toml"), toml).unwrap();
    let run = wrangler.run(&project, &["deploy"]);
    assert!(!run.success(), "{}", run.text());
    assert!(run.text().contains("cron triggers ([triggers] crons) are not served yet"), "{}", run.text());
    // The first version answers, and keeps answering while the controllers settle.
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let answer = support::dev::get(&url);
        assert_eq!(answer.as_deref(), Some("hi v1 token=undefined"), "\n{}", dev.log());
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `wrangler secret put` on a worker that does not exist yet creates a draft worker, as on
/// Cloudflare, then sets the secret.
#[test]
fn secret_put_on_a_new_worker_creates_it() {
    let env = Env::start("api-draft", false, &[]);
    let wrangler = env.wrangler(TOKEN_A, Some(A));
    let project = tempdir();
    write(
        project.path(),
        &[("wrangler.toml", HELLO_TOML.as_bytes()), ("index.js", hello_js("x").as_bytes())],
    );
    let put = wrangler.run_with_input(project.path(), &["secret", "put", "FIRST"], Some("early"));
    assert!(put.success(), "{}", put.text());
    let wd = env.cluster.get("workerdeployment", "hello").expect("the draft worker");
    assert_eq!(wd["spec"]["template"]["mainModule"], "hello.mjs");
    assert_eq!(env.cluster.get("secret", "hello-secrets").unwrap()["data"]["FIRST"], base64_of("early"));
    // The real deploy replaces the draft and keeps the secret.
    wrangler.ok(project.path(), &["deploy"]);
    let wd = env.cluster.get("workerdeployment", "hello").unwrap();
    assert_eq!(wd["spec"]["template"]["mainModule"], "index.js");
    assert!(env.cluster.get("secret", "hello-secrets").unwrap()["data"]["FIRST"].is_string());
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

const META: &str = r#"{"main_module":"index.js","compatibility_date":"2024-09-23","bindings":[]}"#;

#[test]
fn bad_requests_are_refused_and_store_nothing() {
    let limits = ["--max-upload-bytes", "20000", "--max-modules", "3", "--max-module-bytes", "10000"];
    let env = Env::start("api-refusals", false, &limits);
    let files = tempdir();
    let url = format!("{}/accounts/{A}/workers/scripts/refused", env.api.url);
    let js: &[u8] = b"export default {}";
    let good = || form(files.path(), META, &[("index.js", "application/javascript+module", js)]);
    let refused = |token: Option<&str>, body: Body, status: u16, code: u64, words: &[&str]| {
        let (got, reply) = curl("PUT", &url, token, body);
        assert_eq!(got, status, "{reply}");
        assert_eq!(reply["success"], false, "{reply}");
        assert_eq!(reply["errors"][0]["code"], code, "{reply}");
        let message = reply["errors"][0]["message"].as_str().unwrap_or_default();
        for word in words {
            assert!(message.contains(word), "{message:?} does not say {word:?}");
        }
    };

    refused(None, Body::Form(good()), 401, 10000, &["Bearer"]);
    refused(Some("not-a-token"), Body::Form(good()), 401, 10000, &["not valid"]);
    refused(Some(TOKEN_B), Body::Form(good()), 403, 10000, &[A]);
    let big = vec![b'x'; 30_000];
    let over = form(
        files.path(),
        META,
        &[("index.js", "application/javascript+module", js), ("big.txt", "text/plain", &big)],
    );
    refused(Some(TOKEN_A), Body::Form(over), 413, 10027, &["20000"]);
    let bigger_module = vec![b'x'; 15_000];
    let one_big = form(
        files.path(),
        META,
        &[("index.js", "application/javascript+module", js), ("big.txt", "text/plain", &bigger_module)],
    );
    refused(Some(TOKEN_A), Body::Form(one_big), 413, 10027, &["big.txt", "10000"]);
    let many: Vec<(String, Vec<u8>)> = (0..4).map(|i| (format!("m{i}.js"), js.to_vec())).collect();
    let many: Vec<(&str, &str, &[u8])> =
        many.iter().map(|(n, c)| (n.as_str(), "application/javascript+module", c.as_slice())).collect();
    let mut too_many = many.clone();
    too_many[0].0 = "index.js";
    refused(Some(TOKEN_A), Body::Form(form(files.path(), META, &too_many)), 413, 10027, &["3 modules"]);
    let escape = form(
        files.path(),
        META,
        &[
            ("index.js", "application/javascript+module", js),
            ("../x.js", "application/javascript+module", js),
        ],
    );
    refused(Some(TOKEN_A), Body::Form(escape), 400, 10021, &["../x.js", ".."]);
    let no_main = form(
        files.path(),
        &META.replace("index.js", "main.js"),
        &[("index.js", "application/javascript+module", js)],
    );
    refused(Some(TOKEN_A), Body::Form(no_main), 400, 10021, &["main.js", "missing"]);
    // Over the upload limit in parts each under the module limit, with no Content-Length: the
    // body limit stops the stream.
    let chunk = vec![b'y'; 9_900];
    let streamed = form(
        files.path(),
        META,
        &[("c.txt", "text/plain", &chunk), ("a.txt", "text/plain", &chunk), ("b.txt", "text/plain", &chunk)],
    );
    refused(Some(TOKEN_A), Body::ChunkedForm(streamed), 413, 10027, &["20000"]);
    let commonjs_as_js = form(files.path(), META, &[("index.js", "application/javascript", js)]);
    refused(Some(TOKEN_A), Body::Form(commonjs_as_js), 400, 10021, &["index.js", "application/javascript"]);
    let garbage = Body::Raw("multipart/form-data; boundary=XYZ", b"--XYZ\r\nthis is not a part");
    refused(Some(TOKEN_A), garbage, 400, 10021, &["multipart"]);
    let not_form = Body::Raw("application/json", b"{}");
    refused(Some(TOKEN_A), not_form, 400, 10021, &["multipart"]);
    let bad_json =
        form(files.path(), "{\"main_module\": ", &[("index.js", "application/javascript+module", js)]);
    refused(Some(TOKEN_A), Body::Form(bad_json), 400, 10021, &["metadata", "JSON"]);
    let kv = r#"{"main_module":"index.js","bindings":[{"type":"kv_namespace","name":"CACHE","namespace_id":"abc"}]}"#;
    let kv_form = form(files.path(), kv, &[("index.js", "application/javascript+module", js)]);
    refused(Some(TOKEN_A), Body::Form(kv_form), 400, 10021, &["CACHE", "kv_namespace"]);

    // wrangler shows our message for an unsupported binding.
    let project = tempdir();
    write(
        project.path(),
        &[
            (
                "wrangler.toml",
                format!("{HELLO_TOML}kv_namespaces = [{{ binding = \"CACHE\", id = \"abc\" }}]\n").as_bytes(),
            ),
            ("index.js", hello_js("kv").as_bytes()),
        ],
    );
    let run = env.wrangler(TOKEN_A, Some(A)).run(project.path(), &["deploy"]);
    assert!(!run.success());
    assert!(run.text().contains("kv_namespace") && run.text().contains("CACHE"), "{}", run.text());

    // Nothing was stored anywhere.
    assert!(env.s3.objects(BUCKET).is_empty(), "{:?}", env.s3.objects(BUCKET).keys());
    assert!(env.cluster.list("workerdeployments", None).is_empty());
    assert!(env.cluster.list("workeraccounts", None).is_empty());
    assert!(env.cluster.list("secrets", Some("workerbundle.dev/account")).is_empty());
    assert!(env.api.is_running());
}

/// A body that `method path` of the route table accepts (an upload, a secret, a deployment of
/// `version`, ...), so that a refusal is about the token, not the body.
fn route_body(method: &str, path: &str, files: &std::path::Path, js: &[u8], version: &str) -> Body<'static> {
    match (method, path) {
        ("PUT" | "POST", p) if p.ends_with("{script_name}") || p.ends_with("/versions") => {
            Body::Form(form(files, META, &[("index.js", "application/javascript+module", js)]))
        }
        ("PUT", p) if p.ends_with("/secrets") => {
            Body::Json(r#"{"name":"K","text":"stolen","type":"secret_text"}"#.into())
        }
        ("PUT", p) if p.ends_with("/schedules") || p.ends_with("/routes") => Body::Json("[]".into()),
        ("PUT", p) if p.ends_with("/domains/records") => Body::Json(r#"{"origins":[]}"#.into()),
        ("POST", p) if p.ends_with("/domains/changeset") => Body::Json("[]".into()),
        ("POST", p) if p.ends_with("/deployments") => {
            Body::Json(format!(r#"{{"versions":[{{"version_id":"{version}","percentage":100}}]}}"#))
        }
        ("PATCH", p) if p.ends_with("/settings") => Body::Form(settings_form(files, r#"{"bindings":[]}"#)),
        ("PATCH", _) => Body::Json(r#"{"observability":{"enabled":false}}"#.into()),
        ("POST", _) => Body::Json(r#"{"enabled":false}"#.into()),
        _ => Body::None,
    }
}

/// The form of a settings PATCH (`wrangler secret bulk`): one part, `settings`, without a type.
fn settings_form(dir: &std::path::Path, settings: &str) -> Vec<String> {
    let file = dir.join("settings.part");
    std::fs::write(&file, settings).unwrap();
    vec![format!("settings=<{}", file.display())]
}

/// A zone id as Cloudflare's: 32 hex digits.
const ZONE: &str = "0123456789abcdef0123456789abcdef";

/// Every route of the router's own table, so a route added later is covered too.
#[test]
fn every_route_refuses_another_accounts_token_and_missing_or_bad_tokens() {
    let env = Env::start("api-tenancy", false, &[]);
    // Account B has a worker with a secret: what a leak would reach.
    let files = tempdir();
    let js: &[u8] = b"export default { fetch() { return new Response('b') } }";
    let b_script = format!("{}/accounts/{B}/workers/scripts/hello", env.api.url);
    let (code, reply) = curl(
        "PUT",
        &b_script,
        Some(TOKEN_B),
        Body::Form(form(files.path(), META, &[("index.js", "application/javascript+module", js)])),
    );
    assert_eq!(code, 200, "{reply}");
    let version = reply["result"]["deployment_id"].as_str().unwrap().to_owned();
    let (code, reply) = curl(
        "PUT",
        &format!("{b_script}/secrets"),
        Some(TOKEN_B),
        Body::Json(r#"{"name":"K","text":"v","type":"secret_text"}"#.into()),
    );
    assert_eq!(code, 200, "{reply}");
    let objects_before = env.s3.objects(BUCKET);
    let wd_before = env.cluster.get("workerdeployment", "hello").unwrap();
    let secret_before = env.cluster.get("secret", "hello-secrets").unwrap();

    let routes = workerbundle::api::routes();
    assert!(routes.len() >= 20, "the table lists every route ({})", routes.len());
    for route in &routes {
        let fill = |account: &str| {
            let path = route
                .path
                .replace("{account_id}", account)
                .replace("{script_name}", "hello")
                .replace("{version_id}", &version)
                .replace("{secret_name}", "K")
                .replace("{zone_id}", ZONE);
            format!("{}{path}", env.api.url)
        };
        let method = route.method.as_str();
        let body = || route_body(method, route.path, files.path(), js, &version);
        let scoped = route.path.contains("{account_id}");
        for (token, status) in [(None, 401), (Some("no-such-token"), 401)] {
            let (got, reply) = curl(method, &fill(B), token, body());
            assert_eq!(
                (got, &reply["errors"][0]["code"]),
                (status, &json!(10000)),
                "{method} {}: {reply}",
                route.path
            );
        }
        if scoped {
            let (got, reply) = curl(method, &fill(B), Some(TOKEN_A), body());
            assert_eq!(got, 403, "{method} {} with another account's token: {reply}", route.path);
            assert_eq!(reply["success"], false);
            assert_eq!(reply["errors"][0]["code"], 10000);
        } else if route.path == "/memberships" {
            let (got, reply) = curl(method, &fill(B), Some(TOKEN_A), body());
            assert_eq!(got, 200, "{method} {}: {reply}", route.path);
            let ids: Vec<&Value> =
                reply["result"].as_array().unwrap().iter().map(|m| &m["account"]["id"]).collect();
            assert_eq!(ids, [&json!(A)], "a token sees its own accounts only");
        } else {
            // The zone lookups of a routes deploy: placeholders that hold no account's data.
            let (got, reply) = curl(method, &fill(B), Some(TOKEN_A), body());
            assert_eq!(got, 200, "{method} {}: {reply}", route.path);
            assert!(!reply.to_string().contains(&version), "{reply}");
        }
    }
    // A zone lookup naming another account is refused.
    let zones = format!("{}/zones?name=example.com&account.id={B}", env.api.url);
    let (got, reply) = curl("GET", &zones, Some(TOKEN_A), Body::None);
    assert_eq!((got, &reply["errors"][0]["code"]), (403, &json!(10000)), "{reply}");

    // Nothing of B's changed, nothing was made for A.
    assert_eq!(env.s3.objects(BUCKET), objects_before);
    assert!(env.cluster.get("workeraccount", A).is_none());

    // A's token on A's own account path, aimed at B's objects by name or id: B's script `hello`
    // (in the shared namespace), and B's version id under a script of A's own. Every route of
    // the table must refuse, and no result may carry B's version id.
    let a_script = format!("{}/accounts/{A}/workers/scripts/own", env.api.url);
    let (code, reply) = curl(
        "PUT",
        &a_script,
        Some(TOKEN_A),
        Body::Form(form(files.path(), META, &[("index.js", "application/javascript+module", js)])),
    );
    assert_eq!(code, 200, "{reply}");
    let a_version = reply["result"]["deployment_id"].as_str().unwrap().to_owned();
    let objects_before = env.s3.objects(BUCKET);
    let own_before = env.cluster.get("workerdeployment", "own").unwrap();
    let mut refused = 0;
    for route in routes.iter().filter(|r| r.path.contains("{script_name}")) {
        for script in ["hello", "own"] {
            if script == "own"
                && !route.path.contains("{version_id}")
                && !route.path.ends_with("/deployments")
            {
                continue;
            }
            let path = route
                .path
                .replace("{account_id}", A)
                .replace("{script_name}", script)
                .replace("{version_id}", &version)
                .replace("{secret_name}", "K");
            let method = route.method.as_str();
            let body = route_body(method, route.path, files.path(), js, &version);
            let (got, reply) = curl(method, &format!("{}{path}", env.api.url), Some(TOKEN_A), body);
            let lists_own = script == "own" && method == "GET" && !route.path.contains("{version_id}");
            if lists_own {
                // A's own deployments list answers, with A's version only.
                assert_eq!(got, 200, "{method} {path}: {reply}");
            } else {
                assert!((400..500).contains(&got), "{method} {path} reached B's objects ({got}): {reply}");
                refused += 1;
            }
            // (An error message may echo the id the caller sent; a result must not hold it.)
            assert!(
                !reply["result"].to_string().contains(&version),
                "{method} {path} shows B's version: {reply}"
            );
        }
    }
    eprintln!("{refused} requests of A's token at B's objects through A's own paths: all refused");
    let own = env.cluster.get("workerdeployment", "own").unwrap();
    assert_eq!(own["spec"], own_before["spec"], "A's worker now runs something else");
    assert!(!own["spec"].to_string().contains(&version), "A's worker points at B's version: {own}");
    assert!(own["spec"].to_string().contains(&a_version), "{own}");
    assert_eq!(env.s3.objects(BUCKET), objects_before);

    // B's worker, secret and versions are untouched; nothing was made for A but its own worker.
    let wd = env.cluster.get("workerdeployment", "hello").unwrap();
    assert_eq!(wd["spec"], wd_before["spec"]);
    assert_eq!(wd["metadata"]["resourceVersion"], wd_before["metadata"]["resourceVersion"]);
    let secret = env.cluster.get("secret", "hello-secrets").unwrap();
    assert_eq!(secret["data"], secret_before["data"]);
}

#[test]
fn rate_limit_token_file_reload_health_and_shutdown() {
    let env = Env::start("api-limits", false, &["--rate-limit", "5"]);
    let (code, _) = curl("GET", &format!("{}/healthz", env.api.origin()), None, Body::None);
    assert_eq!(code, 200);
    let list = |account: &str, token: &str| {
        curl("GET", &format!("{}/accounts/{account}/workers/scripts", env.api.url), Some(token), Body::None)
    };
    for _ in 0..5 {
        assert_eq!(list(A, TOKEN_A).0, 200);
    }
    let (code, reply) = list(A, TOKEN_A);
    assert_eq!(code, 429, "{reply}");
    assert_eq!(reply["errors"][0]["code"], 971);
    assert_eq!(list(B, TOKEN_B).0, 200, "another token has its own budget");

    // The token table is re-read when it changes; a broken table refuses everything.
    const TOKEN_C: &str = "token-of-account-9999-added-later";
    assert_eq!(list("9999", TOKEN_C).0, 401);
    let table =
        format!("{}{}{}", token_line(A, TOKEN_A), token_line(B, TOKEN_B), token_line("9999", TOKEN_C));
    std::fs::write(&env.api.tokens, &table).unwrap();
    assert_eq!(list("9999", TOKEN_C).0, 200, "a token added to the file works without a restart");
    std::fs::write(&env.api.tokens, format!("{table}this line is broken\n")).unwrap();
    let (code, reply) = list("9999", TOKEN_C);
    assert_eq!(code, 502, "{reply}");
    std::fs::write(&env.api.tokens, token_line(B, TOKEN_B)).unwrap();
    assert_eq!(list("9999", TOKEN_C).0, 401, "a token removed from the file stops working");

    // Unknown routes name themselves; the log has a line per request and never a token.
    let (code, reply) =
        curl("GET", &format!("{}/accounts/{B}/workers/nothing-here", env.api.url), Some(TOKEN_B), Body::None);
    assert_eq!((code, &reply["errors"][0]["code"]), (404, &json!(10007)));
    assert!(reply["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("GET /client/v4/accounts/5678/workers/nothing-here"));
    let log = env.api.log();
    assert!(log.contains("status=429"), "{log}");
    for token in [TOKEN_A, TOKEN_B, TOKEN_C] {
        assert!(!log.contains(token), "a token was logged:\n{log}");
    }
    assert!(env.api.terminate().success(), "{}", env.api.log());
}

/// The token table in a Kubernetes Secret, and each account in its own namespace (created, with
/// its WorkerAccount, on the first upload).
#[test]
fn tokens_from_a_secret_and_a_namespace_per_account() {
    let s3 = S3Server::start();
    let cluster = Cluster::start("api-per-account");
    // A unique account, so that its namespace is this test's own on a real cluster too.
    let account = format!("t{:x}", fastrand::u32(..));
    let token = format!("token-of-{account}");
    let namespace = format!("workers-{account}");
    let tokens = token_line(&account, &token);
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: api-tokens\nstringData:\n  tokens: \"{}\"\n",
        tokens.trim_end()
    );
    let out = cluster.apply_yaml(&secret);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let source = format!("{}/api-tokens", cluster.namespace);
    let api = ApiServer::start_bare(&cluster, &s3, &["--tokens-secret", &source, "--namespace-per-account"]);

    let files = tempdir();
    let js: &[u8] = b"export default { fetch() { return new Response('ns') } }";
    let url = format!("{}/accounts/{account}/workers/scripts/hello", api.url);
    let upload = form(files.path(), META, &[("index.js", "application/javascript+module", js)]);
    let (code, reply) = curl("PUT", &url, Some(&token), Body::Form(upload));
    assert_eq!(code, 200, "{reply}\n{}", api.log());
    assert_eq!(curl("GET", &url, Some("some-other-token"), Body::None).0, 401);

    let get = |kind: &str, name: &str| {
        let out = cluster.kubectl(&["--namespace", &namespace, "get", kind, name, "-o", "json"]);
        assert!(
            out.status.success(),
            "{kind}/{name} in {namespace}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let wd = get("workerdeployment", "hello");
    assert_eq!(wd["metadata"]["labels"]["workerbundle.dev/account"], account.as_str());
    assert_eq!(get("workeraccount", &account)["metadata"]["name"], account.as_str());
    assert!(cluster.get("workerdeployment", "hello").is_none(), "nothing in the shared namespace");
    let _ = cluster.kubectl(&["delete", "namespace", &namespace, "--wait=false"]);
}

/// `wrangler deploy` wall time against the API (median of 5) and the API's own time per upload,
/// from its request log. Run: cargo test --test api -- --ignored --nocapture timing
#[test]
#[ignore]
fn timing() {
    let env = Env::start("api-timing", false, &[]);
    let wrangler = env.wrangler(TOKEN_A, Some(A));
    let project = tempdir();
    let dir = project.path();
    write(dir, &[("wrangler.toml", HELLO_TOML.as_bytes()), ("index.js", hello_js("warm-up").as_bytes())]);
    wrangler.ok(dir, &["deploy"]);
    let mut walls = Vec::new();
    for i in 0..5 {
        write(dir, &[("index.js", hello_js(&format!("run {i}")).as_bytes())]);
        let start = Instant::now();
        wrangler.ok(dir, &["deploy"]);
        walls.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let uploads: Vec<f64> = env
        .api
        .log()
        .lines()
        .filter(|l| {
            (l.contains("method=POST") && l.contains("/versions account"))
                || (l.contains("method=PUT") && l.contains("{script_name} account"))
        })
        .filter(|l| l.contains("status=200"))
        .filter_map(|l| l.split("duration_ms=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    let every_request: f64 = env
        .api
        .log()
        .lines()
        .filter_map(|l| l.split("duration_ms=").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
        .sum();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (mut w, mut u) = (walls.clone(), uploads.clone());
    println!("wrangler deploy wall time, ms: {walls:?}; median {:.0}", median(&mut w));
    println!(
        "API time per upload (PUT script / POST versions), ms: {uploads:?}; median {:.1}",
        median(&mut u)
    );
    println!("API time of all requests of one deploy, ms: mean {:.1} over 6 deploys", every_request / 6.0);
}
