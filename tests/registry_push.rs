//! Pushing to a real registry (Debian's docker-registry, CNCF distribution 2.8), plain and with
//! htpasswd: tools nobody here wrote read it back, requests are counted from the registry's own
//! access log, and a fault-injecting proxy proves a push survives failures without ever exposing
//! a tag whose blobs are missing.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::fault_proxy::FaultProxy;
use support::registry::{self as registry, Logged, Registry, PASSWORD, USER};
use support::*;
use workerbundle::build::{build as build_image, BuildContext, BuildRequest};
use workerbundle::image::reference::ImageRef;
use workerbundle::registry::{Registries, RegistryOptions};
use workerbundle::source::WorkerInput;

fn push_cli(registry_host: &str, extra: &[String], workers: &[String], target: &str) -> std::process::Output {
    let output = format!("docker://{registry_host}/{target}");
    let mut args: Vec<&str> = vec!["build", "--base", base_layout(), "--output", &output, "--insecure"];
    args.extend(extra.iter().map(String::as_str));
    args.extend(workers.iter().map(String::as_str));
    workerbundle(&args)
}

fn push_ok(registry: &Registry, workers: &[String], target: &str) -> String {
    let out = push_cli(&registry.host(), &registry.creds_args(), workers, target);
    assert!(out.status.success(), "push failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_owned()
}

fn skopeo(args: &[&str]) -> std::process::Output {
    let out = Command::new("skopeo").args(args).output().expect("skopeo is not installed");
    assert!(out.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn skopeo_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&skopeo(args).stdout).unwrap()
}

/// A copy of the sample workers that a test may change.
fn editable_workers(dir: &Path) -> Vec<String> {
    for name in ["hello", "secret"] {
        copy_dir(&repo_path(&format!("testdata/workers/{name}")), &dir.join(name));
    }
    ["hello", "secret"]
        .iter()
        .flat_map(|n| ["--worker".to_owned(), format!("{n}={}", dir.join(n).display())])
        .collect()
}

fn change_hello(dir: &Path, marker: &str) {
    let index = dir.join("hello/index.js");
    let code = fs::read_to_string(&index).unwrap();
    fs::write(&index, format!("{code}\n// {marker}\n")).unwrap();
}

fn base_layer_digests() -> Vec<String> {
    let out = skopeo_json(&["inspect", base_layout()]);
    out["Layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_owned()).collect()
}

#[test]
fn pushed_image_is_read_back_by_skopeo_and_served_by_workerd() {
    let registry = Registry::start(false);
    let digest = push_ok(&registry, &sample_worker_args(), "acct/app:v1");
    let remote = format!("docker://{}/acct/app:v1", registry.host());

    let inspect = skopeo_json(&["inspect", "--tls-verify=false", &remote]);
    assert_eq!(inspect["Digest"], digest.as_str());
    let config = skopeo_json(&["inspect", "--tls-verify=false", "--config", &remote]);
    assert_eq!(config["config"]["Entrypoint"][1], "serve");
    assert_eq!(config["config"]["ExposedPorts"], serde_json::json!({"8080/tcp": {}, "8081/tcp": {}}));

    // The same image as an offline build: pushing changes no byte.
    let work = tempdir();
    let offline = build(&sample_worker_args(), &format!("oci:{}:v1", work.path().join("offline").display()));
    assert_eq!(offline, digest);

    let pulled = work.path().join("pulled");
    skopeo(&["copy", "--src-tls-verify=false", &remote, &format!("oci:{}:v1", pulled.display())]);
    let bundle = umoci_unpack(&pulled, "v1", work.path());
    let served = serve_from_bundle(&bundle, &[("SECRET_API_KEY", "from-registry")], &[8080, 8081]);
    let hello: serde_json::Value = serde_json::from_str(&served.bodies[&8080]).unwrap();
    assert_eq!(hello["sum"], 42);
    assert_eq!(served.bodies[&8081], "mode=production key=from-registry\n");
}

#[test]
fn htpasswd_registry_takes_creds_and_authfile() {
    let registry = Registry::start(true);
    let digest = push_ok(&registry, &sample_worker_args(), "acct/app:v1");
    let remote = format!("docker://{}/acct/app:v1", registry.host());
    let creds = format!("{USER}:{PASSWORD}");
    let inspect = skopeo_json(&["inspect", "--tls-verify=false", "--creds", &creds, &remote]);
    assert_eq!(inspect["Digest"], digest.as_str());

    // Credentials from a docker config.json, as `docker login` writes it.
    use base64::Engine as _;
    let work = tempdir();
    let authfile = work.path().join("config.json");
    let encoded = base64::engine::general_purpose::STANDARD.encode(&creds);
    fs::write(&authfile, format!(r#"{{"auths":{{"{}":{{"auth":"{encoded}"}}}}}}"#, registry.host())).unwrap();
    let extra = vec!["--authfile".to_owned(), authfile.display().to_string()];
    let out = push_cli(&registry.host(), &extra, &sample_worker_args(), "acct/app:v2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
}

#[test]
fn wrong_password_fails_clearly_and_pushes_nothing() {
    let registry = Registry::start(true);
    let extra = vec!["--creds".to_owned(), format!("{USER}:wrong")];
    let out = push_cli(&registry.host(), &extra, &sample_worker_args(), "acct/app:v1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&registry.host()) && stderr.contains("401"), "unclear error: {stderr}");
    assert_eq!(registry.manifest("acct/app", "v1").0, 404);
    let created: Vec<Logged> =
        registry.requests().into_iter().filter(|r| r.status == 201 || r.status == 202).collect();
    assert!(created.is_empty(), "something was written: {created:?}");
}

#[test]
fn a_one_worker_change_in_the_same_process_costs_the_floor() {
    let registry = Registry::start(false);
    let work = tempdir();
    let workers = editable_workers(work.path());
    let context = BuildContext::new(
        Registries::new(RegistryOptions { insecure: true, ..Default::default() }),
        Default::default(),
    );
    let request = |tag: &str| BuildRequest {
        base: ImageRef::parse(base_layout()).unwrap(),
        base_name: None,
        workers: workers.chunks(2).map(|w| WorkerInput::parse(&w[1]).unwrap()).collect(),
        output: ImageRef::parse(&format!("docker://{}/acct/app:{tag}", registry.host())).unwrap(),
        source_date_epoch: 0,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(build_image(&request("live"), &context)).unwrap();
    let before = registry.requests().len();

    change_hello(work.path(), "change 1");
    let outcome = runtime.block_on(build_image(&request("live"), &context)).unwrap();
    let requests = registry.requests()[before..].to_vec();
    let mut methods: Vec<&str> = requests.iter().map(|r| r.method.as_str()).collect();
    methods.sort();
    // distribution 2.8 has no single-request upload: POST+PUT for the worker layer and the
    // config (in parallel), then the manifest, last.
    assert_eq!(methods, ["POST", "POST", "PUT", "PUT", "PUT"], "{requests:#?}");
    assert!(requests.last().unwrap().uri.contains("/manifests/live"), "{requests:#?}");
    assert!(requests.len() <= 5);
    assert_eq!(outcome.push.unwrap().requests, 5, "our own count agrees with the registry's log");
    let base = base_layer_digests();
    assert!(
        requests.iter().all(|r| base.iter().all(|b| !r.uri.contains(b.as_str()))),
        "a base layer was touched"
    );
    assert_eq!(registry.manifest("acct/app", "live").0, 200);
}

#[test]
fn a_fresh_process_adds_at_most_the_ping_and_one_manifest_get() {
    for auth in [false, true] {
        let registry = Registry::start(auth);
        let work = tempdir();
        let workers = editable_workers(work.path());
        push_ok(&registry, &workers, "acct/app:live");
        let before = registry.requests().len();

        change_hello(work.path(), "change 2");
        let digest = push_ok(&registry, &workers, "acct/app:live");
        let requests = registry.requests()[before..].to_vec();
        assert!(requests.len() <= 5 + 2, "auth={auth}: {} requests: {requests:#?}", requests.len());
        assert!(
            !requests.iter().any(|r| r.method == "HEAD"),
            "auth={auth}: no HEAD per base layer: {requests:#?}"
        );
        let gets = requests.iter().filter(|r| r.method == "GET" && r.uri.contains("/manifests/")).count();
        assert!(gets <= 2, "auth={auth}: {requests:#?}");
        let challenges = requests.iter().filter(|r| r.status == 401).count();
        assert_eq!(challenges, usize::from(auth), "auth={auth}: one challenge at most: {requests:#?}");
        let inspect = skopeo_json(&[
            "inspect",
            "--tls-verify=false",
            "--creds",
            &format!("{USER}:{PASSWORD}"),
            &format!("docker://{}/acct/app:live", registry.host()),
        ]);
        assert_eq!(inspect["Digest"], digest.as_str());
    }
}

/// A fresh process that pushed to the repository within the hour knows what it holds from the
/// record that push left in the cache: no GET, only the five requests of the change (plus the one
/// challenge of a registry that wants credentials). A record that a registry made wrong by losing
/// everything costs a refused manifest PUT and the uploads, never a broken image.
#[test]
fn the_record_of_the_last_push_replaces_the_get_and_a_wrong_one_is_recovered() {
    for auth in [false, true] {
        let work = tempdir();
        let workers = editable_workers(work.path());
        let port = registry::free_port();
        let push = |registry: &Registry, marker: &str| {
            change_hello(work.path(), marker);
            let mut extra = registry.creds_args();
            extra.extend(["--cache-dir".to_owned(), work.path().join("cache").display().to_string()]);
            let out = push_cli(&registry.host(), &extra, &workers, "acct/app:live");
            assert!(out.status.success(), "auth={auth}: {}", String::from_utf8_lossy(&out.stderr));
            (
                String::from_utf8_lossy(&out.stdout).trim().to_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        // Answered or not: the first push's GET finds no tag (404).
        let manifest_gets = |registry: &Registry| {
            registry.answered("GET", "/v2/acct/app/manifests/", 200)
                + registry.answered("GET", "/v2/acct/app/manifests/", 404)
        };
        {
            let registry = Registry::start_on(port, auth);
            push(&registry, "first");
            assert_eq!(manifest_gets(&registry), 1, "auth={auth}: no record yet, so one GET");
            let before = registry.requests().len();
            let (digest, stderr) = push(&registry, "second");
            let requests = registry.requests()[before..].to_vec();
            let mut methods: Vec<&str> =
                requests.iter().filter(|r| r.status != 401).map(|r| r.method.as_str()).collect();
            methods.sort();
            assert_eq!(methods, ["POST", "POST", "PUT", "PUT", "PUT"], "auth={auth}: {requests:#?}");
            assert_eq!(
                requests.iter().filter(|r| r.status == 401).count(),
                usize::from(auth),
                "{requests:#?}"
            );
            assert!(stderr.contains(&format!("; {} registry requests", 5 + usize::from(auth))), "{stderr}");
            let remote = format!("docker://{}/acct/app:live", registry.host());
            let creds = format!("{USER}:{PASSWORD}");
            let inspect = skopeo_json(&["inspect", "--tls-verify=false", "--creds", &creds, &remote]);
            assert_eq!(inspect["Digest"], digest.as_str());
        }

        // The same address, an empty registry: the record claims blobs it does not hold.
        let registry = Registry::start_on(port, auth);
        let (digest, _) = push(&registry, "third");
        assert_eq!(manifest_gets(&registry), 0, "auth={auth}: the record was trusted");
        let refused = registry.answered("PUT", "/v2/acct/app/manifests/live", 400);
        assert_eq!(refused, 1, "auth={auth}: the manifest naming missing blobs is refused once");
        let offline = build(&workers, &format!("oci:{}:v1", work.path().join("offline").display()));
        assert_eq!(digest, offline, "auth={auth}");
        // Every blob is there: skopeo copies the whole image out.
        let pulled = format!("oci:{}:live", work.path().join("pulled").display());
        let creds = format!("{USER}:{PASSWORD}");
        let remote = format!("docker://{}/acct/app:live", registry.host());
        skopeo(&["copy", "--src-tls-verify=false", "--src-creds", &creds, &remote, &pulled]);
    }
}

/// A fresh CLI opens two upload sessions while it assembles; each is used by a new blob or
/// cancelled after the push, so that none is left open on the registry.
#[test]
fn upload_sessions_opened_ahead_are_used_or_cancelled() {
    let registry = Registry::start(false);
    let work = tempdir();
    let workers = editable_workers(work.path());
    push_ok(&registry, &workers, "acct/app:live");
    let sessions = |requests: &[Logged]| {
        let count = |method: &str| {
            // Only answers that did what was asked: 202 opened, 201 completed, 204 cancelled.
            let done = |r: &Logged| matches!(r.status, 201 | 202 | 204);
            requests
                .iter()
                .filter(|r| r.method == method && r.uri.contains("/blobs/uploads/") && done(r))
                .count()
        };
        (count("POST"), count("PUT"), count("DELETE"))
    };

    // Nothing changed: no blob is new, both sessions are cancelled.
    let before = registry.requests().len();
    push_ok(&registry, &workers, "acct/app:live");
    assert_eq!(sessions(&registry.requests()[before..]), (2, 0, 2), "{:#?}", &registry.requests()[before..]);

    // One worker changed: its layer and the image config each use one session, nothing is cancelled.
    change_hello(work.path(), "ahead");
    let before = registry.requests().len();
    push_ok(&registry, &workers, "acct/app:live");
    assert_eq!(sessions(&registry.requests()[before..]), (2, 2, 0), "{:#?}", &registry.requests()[before..]);
}

/// The controller's kept session: at most one per repository however many releases ask at once;
/// used by the next blob; one the registry has dropped meanwhile costs a fresh POST, not a failed
/// push; what is left at shutdown is cancelled.
#[test]
fn kept_upload_sessions_are_as_many_as_asked_survive_expiry_and_are_cancelled() {
    use workerbundle::digest::Digest;
    use workerbundle::registry::push::{keep_sessions, push_blob_if_missing};

    let registry = Registry::start(false);
    let registries = Registries::new(RegistryOptions { insecure: true, ..Default::default() });
    let client = registries.client(&registry.host()).unwrap();
    let memory = registries.memory(&registry.host());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let uploads = |requests: &[Logged], method: &str, status: u16| {
        let upload =
            |r: &&Logged| r.method == method && r.uri.contains("/blobs/uploads/") && r.status == status;
        requests.iter().filter(upload).count()
    };

    // Eight releases of one account ask at once: one session is opened.
    let before = registry.requests().len();
    runtime
        .block_on(futures::future::join_all((0..8).map(|_| keep_sessions(&client, &memory, "acct/app", 1))));
    let requests = registry.requests()[before..].to_vec();
    assert_eq!(uploads(&requests, "POST", 202), 1, "{requests:#?}");
    assert_eq!(requests.len(), 1, "{requests:#?}");

    // The next blob goes up with that session: one PUT.
    let blob = bytes::Bytes::from_static(b"a layer that goes up with the kept session");
    let before = registry.requests().len();
    let uploaded = runtime
        .block_on(push_blob_if_missing(&client, &memory, "acct/app", &Digest::of(&blob), blob.clone(), false))
        .unwrap();
    assert!(uploaded);
    let requests = registry.requests()[before..].to_vec();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(uploads(&requests, "PUT", 201), 1, "{requests:#?}");

    // A session the registry no longer knows (here cancelled behind our back): the blob still
    // goes up, through a fresh session.
    runtime.block_on(keep_sessions(&client, &memory, "acct/app", 1));
    let kept = registry.requests().last().unwrap().clone();
    assert_eq!((kept.method.as_str(), kept.status), ("POST", 202), "{kept:#?}");
    // What distribution's upload purge does to an abandoned session.
    let uploads_dir = registry.storage_dir().join("docker/registry/v2/repositories/acct/app/_uploads");
    let open: Vec<_> = fs::read_dir(&uploads_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(open.len(), 1, "one session open: {open:?}");
    fs::remove_dir_all(&open[0]).unwrap();
    let other = bytes::Bytes::from_static(b"a layer whose session expired");
    let before = registry.requests().len();
    let refused_before = registry.answered("PUT", "/v2/acct/app/blobs/uploads/", 404);
    runtime
        .block_on(push_blob_if_missing(
            &client,
            &memory,
            "acct/app",
            &Digest::of(&other),
            other.clone(),
            false,
        ))
        .unwrap();
    let requests = registry.requests()[before..].to_vec();
    let refused = registry.answered("PUT", "/v2/acct/app/blobs/uploads/", 404) - refused_before;
    assert_eq!(refused, 1, "the gone session was tried first");
    assert_eq!(uploads(&requests, "POST", 202), 1, "then a fresh one opened: {requests:#?}");
    assert_eq!(uploads(&requests, "PUT", 201), 1, "{requests:#?}");
    assert!(registry.blob_exists("acct/app", &Digest::of(&other).to_string()));

    // A release that will also send its bundle's next config asks for two: with one open
    // already, one more is opened; asked again, none.
    runtime.block_on(keep_sessions(&client, &memory, "acct/app", 1));
    let before = registry.requests().len();
    runtime.block_on(keep_sessions(&client, &memory, "acct/app", 2));
    runtime.block_on(keep_sessions(&client, &memory, "acct/app", 2));
    let requests = registry.requests()[before..].to_vec();
    assert_eq!(uploads(&requests, "POST", 202), 1, "{requests:#?}");
    assert_eq!(requests.len(), 1, "{requests:#?}");

    // Shutdown: the sessions kept for a push that never came are cancelled.
    let before = registry.requests().len();
    runtime.block_on(registries.cancel_open_sessions());
    let requests = registry.requests()[before..].to_vec();
    assert_eq!(uploads(&requests, "DELETE", 204), 2, "{requests:#?}");
    assert_eq!(requests.len(), 2, "{requests:#?}");
}

#[test]
fn base_layers_are_mounted_from_another_repository() {
    let registry = Registry::start(false);
    let base = format!("docker://{}/platform/workerd-base:1", registry.host());
    skopeo(&["copy", "--dest-tls-verify=false", base_layout(), &base]);
    let before = registry.requests().len();

    let output = format!("docker://{}/acct/app:v1", registry.host());
    let mut args = vec!["build", "--base", &base, "--output", &output, "--insecure"];
    let workers = sample_worker_args();
    args.extend(workers.iter().map(String::as_str));
    let out = workerbundle(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let requests = registry.requests()[before..].to_vec();
    let mounts: Vec<&Logged> = requests.iter().filter(|r| r.uri.contains("mount=")).collect();
    assert_eq!(mounts.len(), 2, "{requests:#?}");
    assert!(mounts.iter().all(|m| m.status == 201), "{mounts:#?}");
    assert!(!requests.iter().any(|r| r.method == "PATCH"), "a base layer was uploaded: {requests:#?}");
    let manifest: serde_json::Value = serde_json::from_slice(&registry.manifest("acct/app", "v1").1).unwrap();
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.base.name"],
        format!("{}/platform/workerd-base:1", registry.host())
    );
}

#[test]
fn faults_on_thirty_percent_of_requests_never_expose_a_broken_tag() {
    let registry = Registry::start(false);
    let proxy = FaultProxy::start(registry.port, 30, 0x5eed);
    let done = Arc::new(AtomicBool::new(false));
    // Watch the tag from the side, straight at the registry, for the whole push.
    let watcher = {
        let (done, port) = (done.clone(), registry.port);
        std::thread::spawn(move || {
            let mut checks = 0;
            let mut broken = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let accept =
                    vec![("Accept".to_owned(), "application/vnd.oci.image.manifest.v1+json".to_owned())];
                let (status, body) = registry::http(port, "GET", "/v2/acct/app/manifests/v1", &accept);
                if status == 200 {
                    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let digests = manifest["layers"].as_array().unwrap().iter().chain([&manifest["config"]]);
                    for d in digests.map(|d| d["digest"].as_str().unwrap().to_owned()) {
                        if registry::http(port, "HEAD", &format!("/v2/acct/app/blobs/{d}"), &[]).0 != 200 {
                            broken.push(d);
                        }
                    }
                }
                checks += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            (checks, broken)
        })
    };
    let out = push_cli(&format!("127.0.0.1:{}", proxy.port), &[], &sample_worker_args(), "acct/app:v1");
    done.store(true, Ordering::Relaxed);
    let (checks, broken) = watcher.join().unwrap();
    assert!(out.status.success(), "push through faults failed: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("faults injected into the push: {}", proxy.summary());
    assert!(proxy.missing_kinds().is_empty(), "not every kind of fault was met: {}", proxy.summary());
    assert!(checks > 0);
    assert!(broken.is_empty(), "the tag pointed at missing blobs: {broken:?}");
    let digest = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_owned();
    let (status, body) = registry.manifest("acct/app", "v1");
    assert_eq!(status, 200);
    assert_eq!(workerbundle::digest::Digest::of(&body).to_string(), digest);
}

#[test]
fn images_are_deleted_by_digest() {
    let registry = Registry::start(false);
    let digest = push_ok(&registry, &sample_worker_args(), "acct/app:v1");
    let target = format!("docker://{}/acct/app@{digest}", registry.host());
    let out = workerbundle(&["delete", &target, "--insecure"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(registry.manifest("acct/app", &digest).0, 404);
    assert_eq!(registry.manifest("acct/app", "v1").0, 404);
    let by_tag =
        workerbundle(&["delete", &format!("docker://{}/acct/app:v1", registry.host()), "--insecure"]);
    assert!(!by_tag.status.success());
    assert!(String::from_utf8_lossy(&by_tag.stderr).contains("needs a digest"));
}

#[test]
fn a_blob_the_registry_lost_is_sent_again() {
    let registry = Registry::start(false);
    let work = tempdir();
    let workers = editable_workers(work.path());
    let context = BuildContext::new(
        Registries::new(RegistryOptions { insecure: true, ..Default::default() }),
        Default::default(),
    );
    let request = BuildRequest {
        base: ImageRef::parse(base_layout()).unwrap(),
        base_name: None,
        workers: workers.chunks(2).map(|w| WorkerInput::parse(&w[1]).unwrap()).collect(),
        output: ImageRef::parse(&format!("docker://{}/acct/app:live", registry.host())).unwrap(),
        source_date_epoch: 0,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(build_image(&request, &context)).unwrap();

    // Behind the process's back, the registry loses the unchanged worker's layer.
    let manifest: serde_json::Value =
        serde_json::from_slice(&registry.manifest("acct/app", "live").1).unwrap();
    let secret_layer = manifest["layers"][3]["digest"].as_str().unwrap().to_owned();
    let (status, _) =
        registry::http(registry.port, "DELETE", &format!("/v2/acct/app/blobs/{secret_layer}"), &[]);
    assert_eq!(status, 202);
    assert!(!registry.blob_exists("acct/app", &secret_layer));

    change_hello(work.path(), "after the loss");
    let outcome = runtime.block_on(build_image(&request, &context)).unwrap();
    let push = outcome.push.clone().unwrap();
    // Without the loss this push sends 2 blobs; after it, every blob held in memory goes up again
    // (both worker layers, the config layer, the image config) and the base layers are HEADed.
    assert_eq!((push.uploaded, push.skipped), (4, 2), "{push:?}");
    let (status, body) = registry.manifest("acct/app", "live");
    assert_eq!(status, 200);
    assert_eq!(workerbundle::digest::Digest::of(&body), outcome.manifest_digest);
    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for layer in manifest["layers"].as_array().unwrap().iter().chain([&manifest["config"]]) {
        let digest = layer["digest"].as_str().unwrap();
        assert!(registry.blob_exists("acct/app", digest), "{digest} is missing");
    }
}

/// Modules of 16 MiB or more are streamed from disk into their layer, and a layer pushed from a
/// file goes up one request body at a time (over 4 MiB: in chunks): the image is the same as the
/// offline build, byte for byte, and the big module comes back whole.
#[test]
fn big_modules_are_streamed_into_the_same_image_offline_and_pushed() {
    let registry = Registry::start(false);
    let work = tempdir();
    let worker = work.path().join("big");
    fs::create_dir_all(&worker).unwrap();
    fs::write(worker.join("index.js"), "export default { fetch() { return new Response('big'); } };\n")
        .unwrap();
    // Incompressible, so that the layer is over 4 MiB and goes up in chunks.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..17 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect();
    fs::write(worker.join("noise.bin"), &noise).unwrap();
    fs::write(worker.join("notes.txt"), "streamed text\n".repeat(150_000)).unwrap();
    let workers = ["--worker".to_owned(), format!("big={}", worker.display())];

    let offline = build(&workers, &format!("oci:{}:v1", work.path().join("offline").display()));
    let pushed = push_ok(&registry, &workers, "acct/big:v1");
    assert_eq!(pushed, offline, "the pushed image differs from the offline one");

    let remote = format!("docker://{}/acct/big:v1", registry.host());
    let pulled = work.path().join("pulled");
    skopeo(&["copy", "--src-tls-verify=false", &remote, &format!("oci:{}:v1", pulled.display())]);
    let bundle = umoci_unpack(&pulled, "v1", work.path());
    let src = bundle.join("rootfs/etc/workerd/workers/big/src");
    assert!(fs::read(src.join("noise.bin")).unwrap() == noise, "noise.bin came back changed");
    assert_eq!(fs::read(src.join("notes.txt")).unwrap().len(), 14 * 150_000);
}

#[test]
fn a_registry_that_refuses_connections_fails_at_once_and_says_so() {
    use workerbundle::build::pushed;
    use workerbundle::digest::Digest;
    use workerbundle::image::block_cache::{BlockCache, DEFAULT_MAX_BYTES};
    // Bound and released: nothing listens on this port.
    let port = registry::free_port();
    let registry_host = format!("127.0.0.1:{port}");
    let output = format!("docker://{registry_host}/acct/app:v1");
    let work = tempdir();
    let cache = work.path().join("cache");
    // With a record of a push there, the first POST goes where the GET would: it must fail as fast.
    let recorded = BlockCache::open(&cache, DEFAULT_MAX_BYTES).unwrap();
    pushed::record(&recorded, &registry_host, "acct/app", &[Digest::of(b"a layer")]);
    for cache_dir in [None, Some(cache.display().to_string())] {
        let mut args = vec!["build", "--base", base_layout(), "--output", &output, "--insecure"];
        let workers = sample_worker_args();
        args.extend(workers.iter().map(String::as_str));
        if let Some(dir) = &cache_dir {
            args.extend(["--cache-dir", dir.as_str()]);
        }
        // Debug lines of the registry client show every request it sends.
        let env = [("RUST_LOG".to_owned(), "warn,workerbundle::registry::client=debug".to_owned())];
        let out = workerbundle_env(&args, &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the push succeeded with no registry: {stderr}");
        let sent = stderr.lines().filter(|l| l.contains("sending")).count();
        let warnings = stderr.lines().filter(|l| l.contains("WARN")).count();
        assert!((1..=2).contains(&sent), "{sent} attempts on a registry that never answered:\n{stderr}");
        assert!(warnings <= 1, "{warnings} warnings:\n{stderr}");
        if cache_dir.is_some() {
            assert!(!stderr.contains("sending request=GET"), "the record was not used:\n{stderr}");
        }
        let error = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
        assert!(
            error.contains(&format!("registry {registry_host}: connection refused")),
            "the error does not say the registry refused connections:\n{stderr}"
        );
    }
}

#[test]
fn requests_are_paced_to_the_configured_rate() {
    let registry = Registry::start(false);
    let started = Instant::now();
    let out = push_cli(
        &registry.host(),
        &["--registry-requests-per-second".into(), "20".into()],
        &sample_worker_args(),
        "acct/paced:v1",
    );
    let elapsed = started.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let requests = registry.requests().len();
    assert!(requests > 10, "a cold push makes many requests ({requests})");
    // Evenly spaced at 20 per second: the first at once, each next one 50 ms after the last.
    let floor = Duration::from_millis(50 * (requests as u64 - 1));
    assert!(elapsed >= floor, "{requests} requests in {elapsed:?}, under the paced {floor:?}");
    eprintln!("{requests} requests paced at 20/s took {elapsed:?}");
}
