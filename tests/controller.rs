//! The controller end to end, as its own process, against a Kubernetes API (KUBECONFIG's cluster,
//! else the in-memory API server), the real registry and the real S3 server:
//! WorkerDeployment → WorkerRelease (layer built and pushed) → WorkerAccount → WorkerBundle.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::cluster::{Cluster, Controller};
use support::registry::Registry;
use support::s3::{S3Server, SECRET_KEY};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

fn deployment_yaml(name: &str, script: &str, url: &str, history: u32) -> String {
    format!(
        r#"apiVersion: workerbundle.dev/v1alpha1
kind: WorkerDeployment
metadata:
  name: {name}
  labels:
    workerbundle.dev/account: "1234"
spec:
  releaseHistoryLimit: {history}
  template:
    scriptName: {script}
    scriptUrls: ["{url}"]
"#
    )
}

const ACCOUNT: &str = r#"apiVersion: workerbundle.dev/v1alpha1
kind: WorkerAccount
metadata:
  name: "1234"
spec:
  workerBundleName: workers-1234
"#;

struct Setup {
    cluster: Cluster,
    registry: Registry,
    s3: S3Server,
    controller: Controller,
}

fn setup(test: &str) -> Setup {
    let registry = Registry::start(false);
    let s3 = S3Server::start();
    s3.put_dir("workers", "1234/hello/v1/", &repo_path("testdata/workers/hello"));
    s3.put_dir("workers", "1234/second/v1/", &repo_path("testdata/workers/secret"));
    let cluster = Cluster::start(test);
    let controller = start_controller(&cluster, &registry.host(), &s3);
    Setup { cluster, registry, s3, controller }
}

/// `workerbundle run` pushing to `<registry>/workers/<account>` and reading from `s3`.
fn start_controller(cluster: &Cluster, registry: &str, s3: &S3Server) -> Controller {
    let prefix = format!("{registry}/workers");
    let endpoint = s3.endpoint();
    Controller::start(
        cluster,
        &["--repository-prefix", &prefix, "--insecure", "--s3-endpoint", &endpoint],
        &s3.env(SECRET_KEY),
    )
}

/// The object's Ready condition when it is False.
fn not_ready(object: &Value) -> Option<Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready" && c["status"] == "False")
        .cloned()
}

fn apply_ok(cluster: &Cluster, yaml: &str) {
    let out = cluster.apply_yaml(yaml);
    assert!(out.status.success(), "kubectl apply failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn current_release(wd: &Value) -> Option<String> {
    wd["status"]["currentRelease"].as_str().map(str::to_owned)
}

fn ready_layer(release: &Value) -> Option<String> {
    (release["status"]["phase"] == "Ready")
        .then(|| release["status"]["layer"]["digest"].as_str().map(str::to_owned))?
}

fn bundle_workers(bundle: &Value) -> Vec<(String, u64, String)> {
    bundle["spec"]["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            (
                w["workerName"].as_str().unwrap_or_default().to_owned(),
                w["workerNumber"].as_u64().unwrap_or_default(),
                w["release"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn release_names(cluster: &Cluster, deployment: &str) -> Vec<String> {
    let mut names: Vec<String> = cluster
        .list("workerreleases", Some(&format!("workerbundle.dev/deployment={deployment}")))
        .iter()
        .map(|r| r["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn deployment_release_layer_account_bundle() {
    let Setup { cluster, registry, s3: _s3, controller } = setup("flow");
    apply_ok(&cluster, ACCOUNT);
    apply_ok(&cluster, &deployment_yaml("hello", "hello", "s3://workers/1234/hello/v1/", 5));

    // The deployment makes a release; the release's layer is built and is in the registry.
    let first = cluster.wait_for("workerdeployment", "hello", WAIT, &controller, current_release);
    let first_layer = cluster.wait_for("workerrelease", &first, WAIT, &controller, ready_layer);
    assert!(registry.blob_exists("workers/1234", &first_layer), "layer {first_layer} is not in the registry");
    let release = cluster.get("workerrelease", &first).unwrap();
    assert_eq!(release["metadata"]["ownerReferences"][0]["kind"], "WorkerDeployment");
    assert_eq!(release["metadata"]["labels"]["workerbundle.dev/account"], "1234");
    assert_eq!(release["status"]["mainModule"], "index.js");
    let modules = release["status"]["modules"].as_array().unwrap();
    assert!(
        modules
            .iter()
            .any(|m| m["source"] == "s3://workers/1234/hello/v1/index.js" && m["sha256"].is_string()),
        "{modules:?}"
    );
    assert_eq!(release["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(release["status"]["conditions"][0]["status"], "True");
    let release_uid = release["metadata"]["uid"].clone();
    let events = cluster.list("events.events.k8s.io", None);
    assert!(
        events.iter().any(|e| e["reason"] == "Built" && e["regarding"]["name"] == first.as_str()),
        "an Event reports the build: {events:?}"
    );

    // The account makes its bundle, listing the worker on 8080.
    let workers = cluster.wait_for("workerbundle", "workers-1234", WAIT, &controller, |b| {
        Some(bundle_workers(b)).filter(|w| !w.is_empty())
    });
    assert_eq!(workers, [("hello".to_owned(), 8080, first.clone())]);
    let bundle = cluster.get("workerbundle", "workers-1234").unwrap();
    assert_eq!(bundle["metadata"]["ownerReferences"][0]["kind"], "WorkerAccount");

    // A template change makes a new release, which the bundle then runs on the same port.
    cluster.kubectl_ok(&[
        "patch",
        "workerdeployment",
        "hello",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"compatibilityFlags":["nodejs_compat"]}}}"#,
    ]);
    let second = cluster.wait_for("workerdeployment", "hello", WAIT, &controller, |d| {
        current_release(d).filter(|r| *r != first)
    });
    cluster.wait_for("workerrelease", &second, WAIT, &controller, ready_layer);
    let workers = cluster.wait_for("workerbundle", "workers-1234", WAIT, &controller, |b| {
        Some(bundle_workers(b)).filter(|w| w.iter().any(|(_, _, r)| *r == second))
    });
    assert_eq!(workers, [("hello".to_owned(), 8080, second.clone())]);
    assert_eq!(release_names(&cluster, "hello"), sorted(&[&first, &second]));

    // Reverting reuses the first release: same object, no rebuild.
    cluster.kubectl_ok(&[
        "patch",
        "workerdeployment",
        "hello",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"compatibilityFlags":null}}}"#,
    ]);
    cluster.wait_for("workerdeployment", "hello", WAIT, &controller, |d| {
        current_release(d).filter(|r| *r == first)
    });
    let reused = cluster.get("workerrelease", &first).unwrap();
    assert_eq!(reused["metadata"]["uid"], release_uid, "the old release was recreated, not reused");
    assert_eq!(reused["status"]["layer"]["digest"].as_str(), Some(first_layer.as_str()));
    cluster.wait_for("workerbundle", "workers-1234", WAIT, &controller, |b| {
        Some(bundle_workers(b)).filter(|w| w.iter().any(|(_, _, r)| *r == first))
    });
    assert_eq!(
        controller.log().matches("release built").count(),
        2,
        "two templates, two builds:\n{}",
        controller.log()
    );

    // History is pruned to the limit, never the current release.
    cluster.kubectl_ok(&[
        "patch",
        "workerdeployment",
        "hello",
        "--type=merge",
        "-p",
        r#"{"spec":{"releaseHistoryLimit":0}}"#,
    ]);
    cluster.wait_for("workerdeployment", "hello", WAIT, &controller, |d| {
        (d["status"]["releaseHistory"].as_array().map(Vec::len) == Some(1)).then_some(())
    });
    let deadline = std::time::Instant::now() + WAIT;
    while release_names(&cluster, "hello") != [first.clone()] {
        assert!(
            std::time::Instant::now() < deadline,
            "history not pruned: {:?}",
            release_names(&cluster, "hello")
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Graceful shutdown on SIGTERM.
    assert!(controller.is_running());
    let status = controller.terminate();
    assert!(status.success(), "exit {status:?}:\n{}", controller.log());
}

fn sorted(names: &[&String]) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    names.sort();
    names
}

/// With `--cache-dir`, a release that changes the end of a big module (not its length) deflates
/// only its last blocks: the first ones are read back from the cache (no entry is added for
/// them), and the layer the registry holds unpacks to exactly the new module.
#[test]
fn a_controller_with_a_block_cache_rebuilds_a_big_worker_from_its_unchanged_blocks() {
    let registry = Registry::start(false);
    let s3 = S3Server::start();
    // 1.2 MiB of module: two whole 512 KiB blocks of the layer, then a tail block big enough to be
    // cached too, which the change falls in.
    let mut data: Vec<u8> = Vec::new();
    let mut state = 7u64;
    // Valid JavaScript (the controller loads it in workerd before the release is Ready): each
    // name unique by its line number.
    for line in 0.. {
        if data.len() >= 1_200_000 {
            break;
        }
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        data.extend(format!("export const v{line}x{:x} = {};\n", state >> 40, state % 100_000).as_bytes());
    }
    data.extend(b"export const last = 1;\n");
    let put_version = |version: &str, data: &[u8]| {
        let prefix = format!("1234/big/{version}/");
        s3.put(
            "workers",
            &format!("{prefix}index.js"),
            b"import \"./data.js\";\nexport default { fetch() { return new Response(\"big\"); } };\n",
        );
        s3.put("workers", &format!("{prefix}data.js"), data);
        s3.put(
            "workers",
            &format!("{prefix}metadata.json"),
            br#"{"main_module": "index.js", "compatibility_date": "2024-09-23"}"#,
        );
    };
    put_version("v1", &data);
    let cluster = Cluster::start("blockcache");
    let cache = tempdir();
    let cache_dir = cache.path().join("blocks");
    let prefix = format!("{}/workers", registry.host());
    let controller = Controller::start(
        &cluster,
        &[
            "--repository-prefix",
            &prefix,
            "--insecure",
            "--s3-endpoint",
            &s3.endpoint(),
            "--cache-dir",
            cache_dir.to_str().unwrap(),
        ],
        &s3.env(SECRET_KEY),
    );
    let entries = || {
        std::fs::read_dir(&cache_dir)
            .map_or(0, |d| d.filter(|e| e.as_ref().unwrap().file_name().len() == 64).count())
    };
    apply_ok(&cluster, ACCOUNT);
    apply_ok(&cluster, &deployment_yaml("big", "big", "s3://workers/1234/big/v1/", 5));
    let first = cluster.wait_for("workerdeployment", "big", WAIT, &controller, current_release);
    cluster.wait_for("workerrelease", &first, WAIT, &controller, ready_layer);
    let after_first = entries();
    // Three blocks, and the hasher states at the two boundaries.
    assert_eq!(after_first, 5, "the controller kept no blocks, or others");

    // The same length (the tar header before the module, in the first block, stays the same).
    let end = data.len() - 3;
    data[end..].copy_from_slice(b"2;\n");
    put_version("v2", &data);
    cluster.kubectl_ok(&[
        "patch",
        "workerdeployment",
        "big",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"scriptUrls":["s3://workers/1234/big/v2/"]}}}"#,
    ]);
    let second = cluster.wait_for("workerdeployment", "big", WAIT, &controller, |d| {
        current_release(d).filter(|r| *r != first)
    });
    let layer = cluster.wait_for("workerrelease", &second, WAIT, &controller, ready_layer);
    // The last block, which holds the change, is the one new entry: the two before it were found.
    assert_eq!(entries(), after_first + 1, "a block before the change was deflated again");

    let (status, blob) = registry.blob("workers/1234", &layer);
    assert_eq!(status, 200);
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
    let mut found = None;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().ends_with("data.js") {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            found = Some(bytes);
        }
    }
    assert!(found == Some(data), "the layer does not hold the new module");
}

/// A controller that starts (or restarts) while objects already exist must pick all of them up
/// from its first list, not only the ones that change afterwards.
#[test]
fn objects_made_before_the_controller_starts_are_built() {
    let registry = Registry::start(false);
    let s3 = S3Server::start();
    s3.put_dir("workers", "1234/hello/v1/", &repo_path("testdata/workers/hello"));
    s3.put_dir("workers", "1234/second/v1/", &repo_path("testdata/workers/secret"));
    let cluster = Cluster::start("existing");
    apply_ok(&cluster, ACCOUNT);
    apply_ok(&cluster, &deployment_yaml("hello", "hello", "s3://workers/1234/hello/v1/", 5));
    apply_ok(&cluster, &deployment_yaml("second", "second", "s3://workers/1234/second/v1/", 5));

    let controller = start_controller(&cluster, &registry.host(), &s3);
    let workers = cluster.wait_for("workerbundle", "workers-1234", WAIT, &controller, |b| {
        Some(bundle_workers(b)).filter(|w| w.len() == 2)
    });
    let names: Vec<&str> = workers.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(names, ["hello", "second"]);
    for (_, _, release) in &workers {
        let layer = cluster.wait_for("workerrelease", release, WAIT, &controller, ready_layer);
        assert!(registry.blob_exists("workers/1234", &layer));
    }
}

#[test]
fn a_missing_key_fails_that_release_and_the_controller_serves_the_rest() {
    let Setup { cluster, registry, s3: _s3, controller } = setup("missing");
    apply_ok(&cluster, ACCOUNT);
    apply_ok(&cluster, &deployment_yaml("broken", "broken", "s3://workers/1234/missing/v1/index.js", 10));

    let broken = cluster.wait_for("workerdeployment", "broken", WAIT, &controller, current_release);
    let message = cluster.wait_for("workerrelease", &broken, WAIT, &controller, |r| {
        not_ready(r)
            .filter(|_| r["status"]["phase"] == "Failed")
            .map(|c| c["message"].as_str().unwrap().to_owned())
    });
    assert!(message.contains("1234/missing/v1/index.js"), "the condition names the key: {message}");
    let condition = cluster.wait_for("workerdeployment", "broken", WAIT, &controller, not_ready);
    assert_eq!(condition["reason"], "ReleaseFailed");

    // Other objects are served meanwhile.
    apply_ok(&cluster, &deployment_yaml("second", "second", "s3://workers/1234/second/v1/", 10));
    let second = cluster.wait_for("workerdeployment", "second", WAIT, &controller, current_release);
    let layer = cluster.wait_for("workerrelease", &second, WAIT, &controller, ready_layer);
    assert!(registry.blob_exists("workers/1234", &layer));
    let workers = cluster.wait_for("workerbundle", "workers-1234", WAIT, &controller, |b| {
        Some(bundle_workers(b)).filter(|w| !w.is_empty())
    });
    assert_eq!(workers, [("second".to_owned(), 8080, second)], "the broken worker is left out");
    let account = cluster.wait_for("workeraccount", "1234", WAIT, &controller, not_ready);
    assert!(account["message"].as_str().unwrap().contains("broken"), "{account}");

    // Retries back off instead of looping: a few attempts in several seconds, not hundreds.
    std::thread::sleep(Duration::from_secs(3));
    let attempts = controller.log().matches("release failed").count();
    assert!((1..=4).contains(&attempts), "{attempts} attempts in ~3 s:\n{}", controller.log());
    assert!(controller.is_running(), "the controller died:\n{}", controller.log());
}

#[test]
fn a_registry_outage_fails_the_release_until_the_registry_is_back() {
    let s3 = S3Server::start();
    s3.put_dir("workers", "1234/hello/v1/", &repo_path("testdata/workers/hello"));
    let cluster = Cluster::start("outage");
    let port = support::registry::free_port();
    let controller = start_controller(&cluster, &format!("127.0.0.1:{port}"), &s3);
    apply_ok(&cluster, &deployment_yaml("hello", "hello", "s3://workers/1234/hello/v1/", 10));
    let release = cluster.wait_for("workerdeployment", "hello", WAIT, &controller, current_release);
    let condition = cluster.wait_for("workerrelease", &release, WAIT, &controller, not_ready);
    assert_eq!(condition["reason"], "RegistryError");
    let message = condition["message"].as_str().unwrap();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "the condition names the registry: {message}");

    // The registry comes up; a later retry pushes the layer without anyone touching the release.
    let registry = Registry::start_on(port, false);
    let layer = cluster.wait_for("workerrelease", &release, WAIT, &controller, ready_layer);
    assert!(registry.blob_exists("workers/1234", &layer));
    assert!(controller.is_running());
}

#[test]
fn without_the_crds_the_controller_stops_and_says_how_to_install_them() {
    // Always a fresh in-memory server: a real cluster's CRDs must not be removed for this.
    let server = memory_apiserver::MemoryApiServer::start().unwrap();
    let dir = tempdir();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, "default").unwrap();
    let out = workerbundle_env(
        &["run"],
        &[
            ("KUBECONFIG".into(), kubeconfig.display().to_string()),
            ("WORKERBUNDLE_WORKERD".into(), workerd_binary().display().to_string()),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("WorkerDeployment CRD is not installed")
            && stderr.contains("workerbundle crd | kubectl apply -f -"),
        "{stderr}"
    );
}

/// A worker that throws at start-up, applied with kubectl (the API's check never saw it): its
/// release fails with workerd's words, the bundle keeps running its image, nothing is purged.
#[test]
fn a_release_that_cannot_start_fails_and_the_bundle_keeps_its_image() {
    let registry = Registry::start(false);
    let base = registry.push_base();
    let s3 = S3Server::start();
    s3.put_dir("workers", "1234/hello/v1/", &repo_path("testdata/workers/hello"));
    s3.put(
        "workers",
        "1234/hello/bad/index.js",
        b"throw new Error(\"boom from kubectl\");\nexport default {};\n",
    );
    let cluster = Cluster::start("cannot-start");
    let controller = Controller::start_pushing(&cluster, &registry.host(), &base, &s3, &[], &[]);
    apply_ok(&cluster, ACCOUNT);
    apply_ok(&cluster, &deployment_yaml("hello", "hello", "s3://workers/1234/hello/v1/", 5));
    let image = cluster.wait_for("workerbundle", "workers-1234", WAIT, &controller, |b| {
        b["status"]["image"].as_str().map(str::to_owned)
    });
    let good = cluster.wait_for("workerdeployment", "hello", WAIT, &controller, current_release);

    cluster.kubectl_ok(&[
        "patch",
        "workerdeployment",
        "hello",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"scriptUrls":["s3://workers/1234/hello/bad/"]}}}"#,
    ]);
    let bad = cluster.wait_for("workerdeployment", "hello", WAIT, &controller, |d| {
        current_release(d).filter(|r| *r != good)
    });
    let condition = cluster.wait_for("workerrelease", &bad, WAIT, &controller, not_ready);
    assert_eq!(condition["reason"], "WorkerCannotStart", "{condition}");
    let message = condition["message"].as_str().unwrap_or_default();
    assert!(message.contains("boom from kubectl") && message.contains("index.js:1"), "{message}");
    let release = cluster.get("workerrelease", &bad).unwrap();
    assert!(release["status"]["layer"].is_null(), "a layer was pushed for a worker that cannot start");

    // The bundle keeps the good release and its image; the image is still in the registry.
    std::thread::sleep(Duration::from_secs(3));
    let bundle = cluster.get("workerbundle", "workers-1234").unwrap();
    assert_eq!(bundle_workers(&bundle)[0].2, good, "the bundle took the release that cannot start");
    assert_eq!(bundle["status"]["image"].as_str(), Some(image.as_str()));
    let digest = image.rsplit_once('@').unwrap().1;
    assert_eq!(registry.manifest("workers/1234", digest).0, 200, "the running image was purged");
    let events = cluster.list("events.events.k8s.io", None);
    assert!(!events.iter().any(|e| e["reason"] == "ImagePurged"), "{events:?}");
    assert!(
        events.iter().any(|e| e["reason"] == "WorkerCannotStart" && e["regarding"]["name"] == bad.as_str()),
        "no Event names the failure: {events:?}"
    );
}
