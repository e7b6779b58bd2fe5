//! The whole platform as separate processes, the way a cluster runs it: unmodified wrangler →
//! `workerbundle api` → the real S3 server → WorkerDeployment → WorkerRelease (worker layer) →
//! WorkerAccount → WorkerBundle (`workerbundle run`) → one image in the real registry → the
//! bundle's Deployment. With no kubelet here, each step's answer comes from the Deployment itself:
//! its image copied out with skopeo, unpacked with umoci and served by the workerd inside it with
//! exactly the environment the pod would get. The Kubernetes API is KUBECONFIG's cluster, else
//! the in-memory API server. (`tests/dev.rs` runs the same story through `workerbundle dev`.)

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;
use support::api::ApiServer;
use support::cluster::{Cluster, Controller};
use support::registry::{scan_registry, Registry};
use support::s3::S3Server;
use support::workload::*;
use support::wrangler::Wrangler;
use support::*;

const ACCOUNT: &str = "1234";
const TOKEN: &str = "token-of-account-1234-6f1d0c2a";
const BUNDLE: &str = "workers-1234";
const WAIT: Duration = Duration::from_secs(120);

struct Platform {
    cluster: Cluster,
    registry: Registry,
    controller: Controller,
    api: ApiServer,
    s3: S3Server,
}

impl Platform {
    /// The registry holding the workerd base image, the S3 server, the API and the controller,
    /// each its own process.
    fn start() -> Platform {
        let registry = Registry::start(false);
        let base = format!("{}/workerd-base:1", registry.host());
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false", base_layout(), &format!("docker://{base}")])
            .output()
            .expect("skopeo is not installed");
        assert!(out.status.success(), "skopeo copy of the base: {}", String::from_utf8_lossy(&out.stderr));
        let s3 = S3Server::start();
        let cluster = Cluster::start("full-path");
        // Every log line at every level, so that the secret scan at the end covers them all.
        let trace = [("RUST_LOG".to_owned(), "trace".to_owned())];
        let base = format!("docker://{base}");
        let controller = Controller::start_pushing(&cluster, &registry.host(), &base, &s3, &[], &trace);
        let api = ApiServer::start_logging(&cluster, &s3, &[(ACCOUNT, TOKEN)], &[], "trace");
        Platform { cluster, registry, controller, api, s3 }
    }

    /// The Deployment once it runs the bundle's current image and `accept` takes it.
    fn deployment(&self, what: &str, accept: impl Fn(&Value) -> bool) -> Value {
        let found = self.cluster.wait_for("workerbundle", BUNDLE, WAIT, &self.controller, |bundle| {
            let image = bundle["status"]["image"].as_str()?;
            let deployment = self.cluster.get("deployment", BUNDLE)?;
            (container(&deployment)["image"].as_str() == Some(image) && accept(&deployment))
                .then_some(deployment)
        });
        eprintln!("{what}: the Deployment runs {}", container(&found)["image"]);
        found
    }

    /// What each worker of the Deployment answers, by worker name, served from its image.
    fn answers(&self, deployment: &Value) -> Vec<(String, String)> {
        let workers = workers(deployment);
        let ports: Vec<u16> = workers.iter().map(|(_, port)| *port).collect();
        let env = container_environment(&self.cluster, deployment);
        let image = container(deployment)["image"].as_str().unwrap();
        assert!(image.starts_with(&format!("{}/workers/{ACCOUNT}@sha256:", self.registry.host())), "{image}");
        let bodies = serve(image, &env, &ports);
        workers.into_iter().map(|(name, port)| (name, bodies[&port].clone())).collect()
    }

    fn builds(&self) -> usize {
        self.controller.log().matches("release built").count()
    }
}

/// `worker=port` pairs of the Deployment's workers annotation, in port order.
fn workers(deployment: &Value) -> Vec<(String, u16)> {
    let annotation = deployment["metadata"]["annotations"]["workerbundle.dev/workers"].as_str().unwrap();
    annotation
        .split(',')
        .map(|pair| {
            let (name, port) = pair.split_once('=').unwrap();
            (name.to_owned(), port.parse().unwrap())
        })
        .collect()
}

fn image_of(deployment: &Value) -> String {
    container(deployment)["image"].as_str().unwrap().to_owned()
}

fn write_project(dir: &Path, name: &str, body: &str) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("wrangler.toml"),
        format!(
            "name = \"{name}\"\nmain = \"src/index.js\"\ncompatibility_date = \"2024-09-23\"\n[vars]\nGREETING = \"hi\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("src/index.js"),
        format!("export default {{ async fetch(request, env) {{ return new Response(`{body}`); }} }};\n"),
    )
    .unwrap();
}

/// Fails if a secret value (or its base64) is in S3 (which must hold at least `uploads` objects),
/// the registry, a log line or an object other than the Secret.
fn scan_for_secrets(platform: &Platform, values: &[&str], uploads: usize) {
    let encoded: Vec<String> = values.iter().map(|v| base64_of(v)).collect();
    let needles: Vec<&str> = values.iter().copied().chain(encoded.iter().map(String::as_str)).collect();
    let objects = platform.s3.objects(support::api::BUCKET);
    assert!(objects.len() >= uploads, "the bucket holds the uploads: {:?}", objects.keys());
    for (key, bytes) in objects {
        let text = String::from_utf8_lossy(&bytes);
        assert!(needles.iter().all(|n| !text.contains(n)), "S3 object {key} holds a secret value");
    }
    scan_registry(&platform.registry.storage_dir(), &needles);
    for (who, log) in [("controller", platform.controller.log()), ("api", platform.api.log())] {
        assert!(log.lines().count() > 100, "the {who} logged at trace level");
        for line in log.lines() {
            assert!(needles.iter().all(|n| !line.contains(n)), "the {who} logged a secret value: {line}");
        }
    }
    let kinds = "workerdeployments,workerreleases,workeraccounts,workerbundles,deployments,services,events,configmaps";
    let all = platform.cluster.kubectl_ok(&["get", kinds, "-o", "json"]);
    assert!(all.contains("\"WorkerRelease\"") && all.contains("\"Deployment\""), "{all}");
    for needle in &needles {
        assert!(!all.contains(needle), "an object other than the Secret holds a secret value:\n{all}");
    }
}

fn base64_of(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
fn wrangler_deploy_through_every_process_to_a_served_image() {
    let platform = Platform::start();
    let wrangler = Wrangler::new(&platform.api.url, TOKEN, Some(ACCOUNT));
    let projects = tempdir();
    let hello = projects.path().join("hello");
    let other = projects.path().join("other");
    let hello_v = |version: &str| format!("${{env.GREETING}} {version} token=${{env.TOKEN}}");

    // Two workers deployed: one image, one port each, both answer.
    let started = Instant::now();
    write_project(&hello, "hello", &hello_v("v1"));
    let first = wrangler.ok(&hello, &["deploy"]).version_id();
    write_project(&other, "other", "other ${env.GREETING}");
    wrangler.ok(&other, &["deploy"]);
    let deployment = platform.deployment("two workers", |d| workers(d).len() == 2);
    eprintln!(
        "wrangler deploy (2 workers) -> Deployment has the image: {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(
        platform.answers(&deployment),
        pairs(&[("hello", "hi v1 token=undefined"), ("other", "other hi")])
    );

    // A redeploy changes the answer (a new image).
    let v1_image = image_of(&deployment);
    write_project(&hello, "hello", &hello_v("v2"));
    wrangler.ok(&hello, &["deploy"]);
    let deployment = platform.deployment("redeploy", |d| image_of(d) != v1_image);
    assert_eq!(
        platform.answers(&deployment),
        pairs(&[("hello", "hi v2 token=undefined"), ("other", "other hi")])
    );

    // A new secret binds a new name (a new image); a new value changes only the environment:
    // the same image digest, a new secrets hash on the pod template.
    let v2_image = image_of(&deployment);
    let run = wrangler.run_with_input(&hello, &["secret", "put", "TOKEN"], Some("first-value"));
    assert!(run.success(), "{}", run.text());
    let deployment = platform.deployment("secret added", |d| image_of(d) != v2_image);
    assert_eq!(platform.answers(&deployment)[0].1, "hi v2 token=first-value");
    let (image, hash) = (image_of(&deployment), secrets_hash(&deployment));
    let builds = platform.builds();
    let run = wrangler.run_with_input(&hello, &["secret", "put", "TOKEN"], Some("second-value"));
    assert!(run.success(), "{}", run.text());
    let deployment = platform.deployment("secret value changed", |d| secrets_hash(d) != hash);
    assert_eq!(image_of(&deployment), image, "a secret's value changed the image");
    assert_eq!(platform.answers(&deployment)[0].1, "hi v2 token=second-value");
    assert_eq!(platform.builds(), builds, "a secret's value built a release");

    // A rollback to the first version answers as it did, with no new release built.
    wrangler.ok(&hello, &["rollback", &first, "--message", "back", "-y"]);
    let deployment = platform.deployment("rollback", |d| image_of(d) != image);
    assert_eq!(
        platform.answers(&deployment),
        pairs(&[("hello", "hi v1 token=second-value"), ("other", "other hi")])
    );
    assert_eq!(platform.builds(), builds, "the rollback built a release:\n{}", platform.controller.log());

    // The secret values went everywhere a value can go (wrangler, the API, the Secret, the pods'
    // environment): they are in no S3 object, registry blob, log line at any level, status,
    // Event or other object.
    scan_for_secrets(&platform, &["first-value", "second-value"], 6);
    let secret = platform.cluster.kubectl_ok(&["get", "secret", "hello-secrets", "-o", "json"]);
    assert!(secret.contains(&base64_of("second-value")), "the Secret holds the value: {secret}");

    // Deleting a script takes it out of the bundle, its port and its answer with it.
    wrangler.ok(&hello, &["delete", "--force"]);
    let deployment = platform.deployment("delete", |d| workers(d).len() == 1);
    assert_eq!(platform.answers(&deployment), pairs(&[("other", "other hi")]));
    // The health probe's port stays; the workers' ports are the rest.
    let ports =
        container(&deployment)["ports"].as_array().unwrap().iter().filter(|p| p["name"] != "health").count();
    assert_eq!(ports, 1, "the deleted worker's port is still declared");

    // The secret values went everywhere a value can go, the delete included: still nowhere else.
    scan_for_secrets(&platform, &["first-value", "second-value"], 2);

    // Nothing failed along the way in either server.
    for (who, log) in [("controller", platform.controller.log()), ("api", platform.api.log())] {
        assert!(!log.contains(" ERROR "), "the {who} logged an error:\n{log}");
    }
    assert!(platform.api.is_running() && platform.controller.is_running());
}
