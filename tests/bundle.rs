//! The operator loop end to end, the controller as its own process against a Kubernetes API
//! (KUBECONFIG's cluster, else the in-memory API server), the real registry and the real S3
//! server: WorkerDeployments → releases → WorkerAccount → WorkerBundle → one image → a
//! Deployment. The image is then read back with skopeo, unpacked with umoci and served by the
//! workerd inside it, with exactly the environment the Deployment's container would get.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;
use support::cluster::{Cluster, Controller};
use support::registry::{scan_registry, Logged, Registry};
use support::s3::{S3Server, SECRET_KEY};
use support::workload::*;
use support::*;

const WAIT: Duration = Duration::from_secs(90);
const REPO: &str = "workers/1234";

const GREETER_V1: &str =
    "export default { async fetch(request, env) { return new Response(`greeter v1 token=${env.TOKEN}`); } };\n";
const GREETER_V2: &str =
    "export default { async fetch(request, env) { return new Response(`greeter v2 token=${env.TOKEN}`); } };\n";

fn account_yaml(name: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: workerbundle.dev/v1alpha1\nkind: WorkerAccount\nmetadata:\n  name: \"{name}\"\nspec:\n  workerBundleName: workers-{name}\n{extra_spec}"
    )
}

fn deployment_yaml(script: &str, url: &str, secret_ref: Option<&str>) -> String {
    let secret = secret_ref.map(|s| format!("    secretRef: {s}\n")).unwrap_or_default();
    format!(
        r#"apiVersion: workerbundle.dev/v1alpha1
kind: WorkerDeployment
metadata:
  name: {script}
  labels:
    workerbundle.dev/account: "1234"
spec:
  template:
    scriptName: {script}
    scriptUrls: ["{url}"]
{secret}"#
    )
}

fn secret_yaml(data: &[(&str, &str)]) -> String {
    let data: String = data.iter().map(|(k, v)| format!("  {k}: \"{v}\"\n")).collect();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: greeter-secrets\ntype: Opaque\nstringData:\n{data}"
    )
}

fn apply_ok(cluster: &Cluster, yaml: &str) {
    let out = cluster.apply_yaml(yaml);
    assert!(out.status.success(), "kubectl apply failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

struct Setup {
    cluster: Cluster,
    registry: Registry,
    s3: S3Server,
    base: String,
}

/// The registry with the workerd base image in it, S3 with the two workers' scripts, a cluster.
fn setup(test: &str) -> Setup {
    setup_with(test, false)
}

fn setup_with(test: &str, auth: bool) -> Setup {
    let registry = Registry::start(auth);
    let base = format!("{}/workerd-base:1", registry.host());
    let mut copy = Command::new("skopeo");
    copy.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    if auth {
        copy.arg(format!("--dest-creds={}:{}", support::registry::USER, support::registry::PASSWORD));
    }
    let out =
        copy.args([base_layout(), &format!("docker://{base}")]).output().expect("skopeo is not installed");
    assert!(out.status.success(), "skopeo copy of the base failed: {}", String::from_utf8_lossy(&out.stderr));
    let s3 = S3Server::start();
    s3.put("workers", "1234/greeter/v1/index.js", GREETER_V1.as_bytes());
    s3.put_dir("workers", "1234/hello/v1/", &repo_path("testdata/workers/hello"));
    let cluster = Cluster::start(test);
    Setup { cluster, registry, s3, base }
}

fn start_controller(setup: &Setup) -> Controller {
    let prefix = format!("{}/workers", setup.registry.host());
    let base = format!("docker://{}", setup.base);
    let endpoint = setup.s3.endpoint();
    Controller::start(
        &setup.cluster,
        &["--repository-prefix", &prefix, "--base-image", &base, "--insecure", "--s3-endpoint", &endpoint],
        &setup.s3.env(SECRET_KEY),
    )
}

/// The image the bundle's Deployment runs once it is the bundle's current image.
fn deployed_image(cluster: &Cluster, controller: &Controller, bundle: &str, not: Option<&str>) -> String {
    deployed_image_of(cluster, controller, bundle, not, 1)
}

/// `deployed_image`, once the Deployment runs at least `workers` workers (releases become Ready
/// one by one, so a bundle may run some of its workers first).
fn deployed_image_of(
    cluster: &Cluster,
    controller: &Controller,
    bundle: &str,
    not: Option<&str>,
    workers: usize,
) -> String {
    cluster.wait_for("workerbundle", bundle, WAIT, controller, |b| {
        let image = b["status"]["image"].as_str()?;
        if Some(image) == not {
            return None;
        }
        let deployment = cluster.get("deployment", bundle)?;
        let ports = worker_ports(&deployment).len();
        (container(&deployment)["image"].as_str() == Some(image) && ports >= workers)
            .then(|| image.to_owned())
    })
}

/// The container's ports but the health probe's: one per worker.
fn worker_ports(deployment: &Value) -> Vec<(String, u64)> {
    container(deployment)["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["containerPort"].as_u64().unwrap()))
        .filter(|(name, _)| name != "health")
        .collect()
}

fn digest_of(image: &str) -> &str {
    image.rsplit_once('@').unwrap().1
}

/// Requests that change the registry: uploads, manifests, deletes.
fn writes(requests: &[Logged]) -> Vec<&Logged> {
    requests.iter().filter(|r| matches!(r.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")).collect()
}

/// The digests of the blobs whose uploads completed.
fn uploaded_blobs(requests: &[Logged]) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.method == "PUT" && r.uri.contains("/blobs/uploads/") && r.status == 201)
        .filter_map(|r| {
            r.uri.split("digest=").nth(1).map(|d| d.replace("%3A", ":").split('&').next().unwrap().to_owned())
        })
        .collect()
}

/// Every object's resourceVersion of the kinds the controller writes, by kind/name.
fn resource_versions(cluster: &Cluster) -> BTreeMap<String, String> {
    let mut versions = BTreeMap::new();
    for kind in
        ["workerdeployments", "workerreleases", "workeraccounts", "workerbundles", "deployments", "services"]
    {
        for object in cluster.list(kind, None) {
            versions.insert(
                format!("{kind}/{}", object["metadata"]["name"].as_str().unwrap()),
                object["metadata"]["resourceVersion"].as_str().unwrap().to_owned(),
            );
        }
    }
    versions
}

#[test]
fn bundle_image_deployment_secrets_and_restart() {
    let setup = setup("bundle");
    let Setup { cluster, registry, s3, .. } = &setup;
    let controller = start_controller(&setup);
    let started = Instant::now();
    apply_ok(cluster, &secret_yaml(&[("TOKEN", "s3cr3t-value-1")]));
    apply_ok(cluster, &account_yaml("1234", ""));
    apply_ok(cluster, &deployment_yaml("greeter", "s3://workers/1234/greeter/v1/", Some("greeter-secrets")));
    apply_ok(cluster, &deployment_yaml("hello", "s3://workers/1234/hello/v1/", None));

    // The bundle's Deployment runs its image by digest, and the image serves both workers.
    let first = deployed_image_of(cluster, &controller, "workers-1234", None, 2);
    let first_ms = started.elapsed().as_millis();
    eprintln!("{}", log_interval(&controller.log(), "release created", "deployment applied"));
    assert!(first.starts_with(&format!("{}/{REPO}@sha256:", registry.host())), "{first}");
    // A new bundle's first push does not ask what its tag points at: it never pushed one.
    let tag_reads: usize = [200, 404]
        .into_iter()
        .map(|status| registry.answered("GET", &format!("/v2/{REPO}/manifests/"), status))
        .sum();
    assert_eq!(tag_reads, 0, "the first image read its tag:\n{}", controller.log());
    let deployment = cluster.get("deployment", "workers-1234").unwrap();
    assert_eq!(deployment["metadata"]["ownerReferences"][0]["kind"], "WorkerBundle");
    assert_eq!(worker_ports(&deployment), [("greeter".to_owned(), 8080), ("hello".to_owned(), 8081)]);
    // The health socket is a container port, probed by the kubelet, and not in the Service.
    let health = container(&deployment)["ports"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((health["name"].as_str(), health["containerPort"].as_u64()), (Some("health"), Some(8079)));
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(container(&deployment)[probe]["httpGet"]["port"], "health", "{probe}");
    }
    assert_eq!(container(&deployment)["terminationMessagePolicy"], "FallbackToLogsOnError");
    assert_eq!(container(&deployment)["securityContext"]["readOnlyRootFilesystem"], true);
    let service = cluster.get("service", "workers-1234").expect("the bundle's Service");
    assert_eq!(service["spec"]["ports"].as_array().unwrap().len(), 2);
    let env = container_environment(cluster, &deployment);
    // A tenant's worker: its secrets under a hashed prefix, never one made from its name.
    let greeter_token = format!("{}TOKEN", workerbundle::worker::names::tenant_env_prefix("greeter"));
    assert_eq!(env, [(greeter_token, "s3cr3t-value-1".to_owned())]);
    let bodies = serve(&first, &env, &[8080, 8081]);
    assert_eq!(bodies[&8080], "greeter v1 token=s3cr3t-value-1");
    let hello: Value = serde_json::from_str(&bodies[&8081]).unwrap();
    assert_eq!(
        (hello["sum"].as_i64(), hello["greeting"].as_str()),
        (Some(42), Some("Hello from workerbundle"))
    );
    eprintln!("WorkerDeployments applied -> Deployment runs the image: {first_ms} ms (test clock)");

    // A new secret value: the same image, new pods (the pod template's hash moves). The image
    // is not even assembled again: nothing it is made of changed.
    let health = controller.health_url();
    let builds = || {
        let (_, metrics) = http_request(&health, "GET", "/metrics", None).unwrap();
        metric_total(&metrics, "workerbundle_build_duration_seconds_count")
    };
    let builds_before = builds();
    let hash = secrets_hash(&deployment);
    apply_ok(cluster, &secret_yaml(&[("TOKEN", "s3cr3t-value-2")]));
    let moved = cluster.wait_for("deployment", "workers-1234", WAIT, &controller, |d| {
        Some(secrets_hash(d)).filter(|h| *h != hash)
    });
    assert!(!moved.is_empty());
    assert_eq!(builds(), builds_before, "an image assembled again for a secret value:\n{}", controller.log());
    let deployment = cluster.get("deployment", "workers-1234").unwrap();
    assert_eq!(
        container(&deployment)["image"].as_str(),
        Some(first.as_str()),
        "a value change rebuilt the image"
    );
    assert_eq!(
        cluster.get("workerbundle", "workers-1234").unwrap()["status"]["image"].as_str(),
        Some(first.as_str())
    );

    // A new key: a new image, whose config binds it.
    apply_ok(cluster, &secret_yaml(&[("TOKEN", "s3cr3t-value-2"), ("EXTRA", "extra-value")]));
    let second = deployed_image(cluster, &controller, "workers-1234", Some(&first));
    let bundle = cluster.get("workerbundle", "workers-1234").unwrap();
    assert_eq!(bundle["status"]["lastImage"].as_str(), Some(first.as_str()));

    // One worker's code changes: the only new blobs are its layer and the image config (the
    // config layer names modules by import, so code never changes it); then one manifest.
    let before = registry.requests().len();
    s3.put("workers", "1234/greeter/v2/index.js", GREETER_V2.as_bytes());
    cluster.kubectl_ok(&[
        "patch",
        "workerdeployment",
        "greeter",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"scriptUrls":["s3://workers/1234/greeter/v2/"]}}}"#,
    ]);
    let third = deployed_image(cluster, &controller, "workers-1234", Some(&second));
    // The image was worked out while the greeter's layer was sent: its config went up beside the
    // layer and its manifest right after (one request), and the bundle's own reconcile, a
    // debounce later, found it pushed and sent nothing.
    let log = controller.log();
    let pushed: Vec<&str> =
        log.lines().filter(|l| l.contains("image pushed") && l.contains(&third)).collect();
    assert_eq!(pushed.len(), 1, "one push of {third}:\n{log}");
    assert!(
        pushed[0].contains("bundle image pushed ahead") && pushed[0].contains(" requests=1 "),
        "{}",
        pushed[0]
    );
    let requests = registry.requests();
    let changed = &requests[before..];
    let manifest: Value = serde_json::from_slice(&registry.manifest(REPO, digest_of(&third)).1).unwrap();
    let layers: Vec<&str> =
        manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap()).collect();
    let old_manifest: Value = serde_json::from_slice(&registry.manifest(REPO, digest_of(&second)).1).unwrap();
    let old_layers: Vec<&str> =
        old_manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap()).collect();
    let new_layers: Vec<&str> = layers.iter().filter(|l| !old_layers.contains(l)).copied().collect();
    let greeter = cluster.get("workerdeployment", "greeter").unwrap()["status"]["currentRelease"]
        .as_str()
        .unwrap()
        .to_owned();
    let greeter_layer = cluster.get("workerrelease", &greeter).unwrap()["status"]["layer"]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(new_layers, [greeter_layer.as_str()], "only the greeter's layer is new");
    assert_eq!(layers.len(), old_layers.len());
    let mut expected: Vec<String> = new_layers.iter().map(|s| s.to_string()).collect();
    expected.push(manifest["config"]["digest"].as_str().unwrap().to_owned());
    let mut uploaded = uploaded_blobs(changed);
    uploaded.sort();
    expected.sort();
    assert_eq!(uploaded, expected, "uploads for one changed worker:\n{changed:#?}");
    let manifests =
        writes(changed).into_iter().filter(|r| r.method == "PUT" && r.uri.contains("/manifests/")).count();
    assert_eq!(manifests, 1, "{changed:#?}");
    eprintln!(
        "registry requests for one changed worker, end to end: {} ({} writes): {:?}",
        changed.len(),
        writes(changed).len(),
        changed.iter().map(|r| format!("{} {}", r.method, r.status)).collect::<Vec<_>>()
    );
    let deployment = cluster.get("deployment", "workers-1234").unwrap();
    let env = container_environment(cluster, &deployment);
    let bodies = serve(&third, &env, &[8080]);
    assert_eq!(bodies[&8080], "greeter v2 token=s3cr3t-value-2");

    // A restart with nothing changed writes nothing: not to the registry, not to any object.
    let status = controller.terminate();
    assert!(status.success(), "{}", controller.log());
    let first_log = controller.log();
    let versions = resource_versions(cluster);
    let before = registry.requests().len();
    let controller = start_controller(&setup);
    let deadline = Instant::now() + Duration::from_secs(8);
    while !controller.log().contains("controllers started") {
        assert!(Instant::now() < deadline && controller.is_running(), "{}", controller.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(5));
    let requests = registry.requests();
    assert!(
        writes(&requests[before..]).is_empty(),
        "registry writes after a restart: {:#?}",
        &requests[before..]
    );
    assert_eq!(
        resource_versions(cluster),
        versions,
        "objects written after a restart:\n{}",
        controller.log()
    );

    // No secret value anywhere: registry blobs, object statuses, Events, the controller's logs.
    let values = ["s3cr3t-value-1", "s3cr3t-value-2", "extra-value"];
    scan_registry(&registry.storage_dir(), &values);
    for kind in
        ["workerdeployments", "workerreleases", "workeraccounts", "workerbundles", "deployments", "services"]
    {
        for object in cluster.list(kind, None) {
            let text = object.to_string();
            for value in values {
                assert!(!text.contains(value), "{kind} holds a secret value: {text}");
            }
        }
    }
    let events = serde_json::to_string(&cluster.list("events.events.k8s.io", None)).unwrap();
    for value in values {
        assert!(!events.contains(value), "an Event holds a secret value");
        assert!(
            !first_log.contains(value) && !controller.log().contains(value),
            "a log line holds a secret value"
        );
    }
}

/// Whether every label of `selector` (a LabelSelector's matchLabels) is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let wanted = selector["matchLabels"].as_object().expect("matchLabels");
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels[k] == *v)
}

#[test]
fn each_bundle_gets_a_network_policy_that_goes_with_its_last_worker() {
    let setup = setup("netpol");
    let Setup { cluster, .. } = &setup;
    let controller = start_controller(&setup);
    apply_ok(cluster, &account_yaml("1234", ""));
    apply_ok(cluster, &deployment_yaml("hello", "s3://workers/1234/hello/v1/", None));
    deployed_image_of(cluster, &controller, "workers-1234", None, 1);

    // The policy applies to the bundle's pods, and lets in this account's workers but not another's.
    let policy = cluster.wait_for("networkpolicy", "workers-1234", WAIT, &controller, |p| Some(p.clone()));
    assert_eq!(policy["metadata"]["ownerReferences"][0]["kind"], "WorkerBundle");
    let deployment = cluster.get("deployment", "workers-1234").unwrap();
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&policy["spec"]["podSelector"], pod_labels), "{policy}\n{pod_labels}");
    assert_eq!(policy["spec"]["policyTypes"], serde_json::json!(["Ingress", "Egress"]));
    let peers = policy["spec"]["ingress"][0]["from"].as_array().unwrap();
    let this_account = serde_json::json!({"workerbundle.dev/account": "1234"});
    let other_account = serde_json::json!({"workerbundle.dev/account": "9999"});
    let pod_selected = |labels: &Value| {
        peers.iter().filter(|p| p["podSelector"].is_object()).any(|p| {
            let selector = &p["podSelector"];
            let by_labels = selector["matchLabels"].as_object().is_some_and(|m| !m.is_empty());
            let absent = selector["matchExpressions"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|e| e["operator"] == "DoesNotExist" && labels[e["key"].as_str().unwrap()].is_null());
            (by_labels && selects(selector, labels)) || (!by_labels && absent)
        })
    };
    assert!(pod_selected(pod_labels) && pod_selected(&this_account), "{policy}");
    assert!(!pod_selected(&other_account), "another account's worker is let in: {policy}");
    let egress = policy["spec"]["egress"].to_string();
    assert!(egress.contains("169.254.0.0/16") && egress.contains("10.0.0.0/8"), "{egress}");

    // The last worker goes: so do the Deployment, the Service and the policy.
    cluster.kubectl_ok(&["delete", "workerdeployment", "hello"]);
    cluster.wait_for("workerbundle", "workers-1234", WAIT, &controller, |_| {
        let gone = ["deployment", "service", "networkpolicy"]
            .iter()
            .all(|k| cluster.get(k, "workers-1234").is_none());
        gone.then_some(())
    });

    // With --network-policies false, a bundle runs without one.
    controller.terminate();
    let prefix = format!("{}/workers", setup.registry.host());
    let base = format!("docker://{}", setup.base);
    let endpoint = setup.s3.endpoint();
    let args = [
        "--repository-prefix",
        &prefix,
        "--base-image",
        &base,
        "--insecure",
        "--s3-endpoint",
        &endpoint,
        "--network-policies",
        "false",
    ];
    let controller = Controller::start(cluster, &args, &setup.s3.env(SECRET_KEY));
    apply_ok(cluster, &deployment_yaml("hello", "s3://workers/1234/hello/v1/", None));
    deployed_image_of(cluster, &controller, "workers-1234", None, 1);
    assert!(cluster.get("networkpolicy", "workers-1234").is_none());
}

/// The time between the first log line holding `from` and the first holding `to`, from the
/// controller's own timestamps.
fn log_interval(log: &str, from: &str, to: &str) -> String {
    let at = |needle: &str| {
        let line = log.lines().find(|l| l.contains(needle))?;
        let stamp = line.split_whitespace().find(|w| w.len() > 20 && w.as_bytes()[4] == b'-')?;
        chrono::DateTime::parse_from_rfc3339(
            stamp.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != ':' && c != '.' && c != '-'),
        )
        .ok()
    };
    match (at(from), at(to)) {
        (Some(a), Some(b)) => {
            format!("controller log: {from:?} -> {to:?}: {} ms", (b - a).num_milliseconds())
        }
        _ => format!("controller log: no {from:?} / {to:?} lines"),
    }
}

#[test]
fn an_accounts_pull_secret_pushes_its_layers_and_images() {
    let setup = setup_with("pullsecret", true);
    let Setup { cluster, registry, .. } = &setup;
    // No --creds: the account's own Secret is the only way in.
    let controller = start_controller(&setup);
    apply_ok(cluster, &account_yaml("1234", "  podTemplate:\n    imagePullSecret: regcred\n"));
    apply_ok(cluster, &deployment_yaml("hello", "s3://workers/1234/hello/v1/", None));
    let release = cluster.wait_for("workerdeployment", "hello", WAIT, &controller, |d| {
        d["status"]["currentRelease"].as_str().map(str::to_owned)
    });
    let message = cluster.wait_for("workerrelease", &release, WAIT, &controller, |r| {
        let condition = r["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready")?.clone();
        (condition["status"] == "False").then(|| condition["message"].as_str().unwrap_or_default().to_owned())
    });
    assert!(message.contains("regcred") && message.contains("does not exist"), "{message}");

    let auth = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        support::registry::USER,
        support::registry::PASSWORD
    ));
    let config = format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.host());
    apply_ok(
        cluster,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: regcred\ntype: kubernetes.io/dockerconfigjson\nstringData:\n  .dockerconfigjson: '{config}'\n"
        ),
    );
    let image = deployed_image(cluster, &controller, "workers-1234", None);
    let (status, _) = registry.manifest(REPO, digest_of(&image));
    assert_eq!(status, 200, "the image is in the registry");
    let deployment = cluster.get("deployment", "workers-1234").unwrap();
    assert_eq!(deployment["spec"]["template"]["spec"]["imagePullSecrets"][0]["name"], "regcred");
    let anonymous = registry.requests().iter().filter(|r| r.status == 401).count();
    assert!(anonymous >= 1, "the registry asked for credentials");
}

#[test]
fn old_images_are_purged_after_the_rollout_unless_another_bundle_runs_them() {
    let setup = setup("purge");
    let Setup { cluster, registry, .. } = &setup;
    let controller = start_controller(&setup);
    apply_ok(cluster, &deployment_yaml("hello", "s3://workers/1234/hello/v1/", None));
    apply_ok(cluster, &account_yaml("1234", ""));
    // A second account runs the same workers from the same repository: the same image.
    let selector = "  repository: REPOSITORY\n  workerReleaseSelector:\n    matchLabels:\n      workerbundle.dev/account: \"1234\"\n"
        .replace("REPOSITORY", &format!("{}/{REPO}", registry.host()));
    apply_ok(cluster, &account_yaml("mirror", &selector));
    let first = deployed_image(cluster, &controller, "workers-1234", None);
    let mirrored = deployed_image(cluster, &controller, "workers-mirror", None);
    assert_eq!(first, mirrored, "same workers, same base: the same image");
    mark_rolled_out(cluster, "workers-1234");
    mark_rolled_out(cluster, "workers-mirror");

    // A new base reference for account 1234 alone gives it a new image.
    let base_digest = {
        let (status, body) = registry.manifest("workerd-base", "1");
        assert_eq!(status, 200);
        format!("sha256:{}", hex_sha256(&body))
    };
    let pinned = format!("  baseImage: {}/workerd-base@{base_digest}\n", registry.host());
    apply_ok(cluster, &account_yaml("1234", &pinned));
    let second = deployed_image(cluster, &controller, "workers-1234", Some(&first));
    let bundle = cluster.get("workerbundle", "workers-1234").unwrap();
    assert_eq!(bundle["status"]["conditions"][0]["status"], "False", "not ready before the rollout");
    assert_eq!(registry.manifest(REPO, digest_of(&first)).0, 200);

    // Rolled out: the old image stays, since the mirror bundle runs it.
    mark_rolled_out(cluster, "workers-1234");
    cluster.wait_for("workerbundle", "workers-1234", WAIT, &controller, |b| {
        (b["status"]["conditions"][0]["status"] == "True").then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(registry.manifest(REPO, digest_of(&first)).0, 200, "an image another bundle runs was deleted");

    // Once the mirror moves on too, its old image (also 1234's old one) goes after its rollout.
    apply_ok(cluster, &account_yaml("mirror", &format!("{selector}{pinned}")));
    let mirror_second = deployed_image(cluster, &controller, "workers-mirror", Some(&first));
    assert_eq!(mirror_second, second);
    mark_rolled_out(cluster, "workers-mirror");
    let deadline = Instant::now() + WAIT;
    while registry.manifest(REPO, digest_of(&first)).0 != 404 {
        assert!(Instant::now() < deadline, "the old image was not purged:\n{}", controller.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(registry.manifest(REPO, digest_of(&second)).0, 200, "the current image stays");

    // Deleting an account deletes its bundle and, unless kept by annotation, its images.
    cluster.kubectl_ok(&["annotate", "workerbundle", "workers-mirror", "workerbundle.dev/keep-images=true"]);
    cluster.kubectl_ok(&["delete", "workeraccount", "mirror", "--wait=true", "--timeout=60s"]);
    let deadline = Instant::now() + WAIT;
    while cluster.get("workerbundle", "workers-mirror").is_some() {
        assert!(Instant::now() < deadline, "the mirror bundle was not deleted:\n{}", controller.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(registry.manifest(REPO, digest_of(&second)).0, 200, "kept by annotation, and 1234 runs it");
    cluster.kubectl_ok(&["delete", "workeraccount", "1234", "--wait=true", "--timeout=60s"]);
    let deadline = Instant::now() + WAIT;
    while registry.manifest(REPO, digest_of(&second)).0 != 404 {
        assert!(Instant::now() < deadline, "a deleted bundle's image was kept:\n{}", controller.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The controller's API requests, by (verb, resource), between two counts of the in-memory
/// server, without the Lease it renews on a timer and the watches it holds open.
fn controller_requests(
    before: &memory_apiserver::RequestCounts,
    after: &memory_apiserver::RequestCounts,
    ours: &BTreeMap<(String, String), u64>,
) -> BTreeMap<(String, String), u64> {
    after
        .iter()
        .map(|(key, n)| {
            let n = n - before.get(key).copied().unwrap_or(0) - ours.get(key).copied().unwrap_or(0);
            (key.clone(), n)
        })
        .filter(|((verb, resource), n)| *n > 0 && verb != "watch" && resource != "leases")
        .collect()
}

/// Creates `accounts` accounts of three workers each in the test's namespace over plain HTTP
/// (so that the test knows every request it made), then waits until each bundle's Deployment runs
/// its image. The requests the test made, by (verb, resource).
fn create_accounts(
    setup: &Setup,
    controller: &Controller,
    names: &[String],
) -> BTreeMap<(String, String), u64> {
    let Setup { cluster, s3, .. } = setup;
    let api = cluster.url().expect("the in-memory API server");
    let ns = &cluster.namespace;
    let mut ours: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut post = |resource: &str, body: Value| {
        let path = format!("/apis/workerbundle.dev/v1alpha1/namespaces/{ns}/{resource}");
        let (status, text) = http_request(&api, "POST", &path, Some(&body.to_string())).unwrap();
        assert_eq!(status, 201, "{text}");
        *ours.entry(("create".into(), resource.into())).or_default() += 1;
    };
    for account in names {
        for w in 0..3 {
            let script =
                format!("export default {{ fetch() {{ return new Response(\"{account} w{w}\"); }} }};\n");
            s3.put("workers", &format!("{account}/w{w}/v1/index.js"), script.as_bytes());
        }
        post(
            "workeraccounts",
            serde_json::json!({"apiVersion": "workerbundle.dev/v1alpha1", "kind": "WorkerAccount",
                "metadata": {"name": account}, "spec": {"workerBundleName": format!("workers-{account}")}}),
        );
        for w in 0..3 {
            post(
                "workerdeployments",
                serde_json::json!({"apiVersion": "workerbundle.dev/v1alpha1", "kind": "WorkerDeployment",
                    "metadata": {"name": format!("{account}-w{w}"), "labels": {"workerbundle.dev/account": account}},
                    "spec": {"template": {"scriptName": format!("w{w}"),
                        "scriptUrls": [format!("s3://workers/{account}/w{w}/v1/")]}}}),
            );
        }
    }
    let deadline = Instant::now() + WAIT * 2;
    loop {
        let mut get = |resource: &str, group: &str| -> Vec<Value> {
            let (_, text) =
                http_request(&api, "GET", &format!("/{group}/namespaces/{ns}/{resource}"), None).unwrap();
            *ours.entry(("list".into(), resource.into())).or_default() += 1;
            serde_json::from_str::<Value>(&text).unwrap()["items"].as_array().cloned().unwrap_or_default()
        };
        let bundles = get("workerbundles", "apis/workerbundle.dev/v1alpha1");
        let deployments = get("deployments", "apis/apps/v1");
        let running = |bundle: &Value| {
            let image = bundle["status"]["image"].as_str();
            image.is_some()
                && bundle["spec"]["workers"].as_array().map(Vec::len) == Some(3)
                && deployments.iter().any(|d| {
                    d["metadata"]["name"] == bundle["metadata"]["name"]
                        && container(d)["image"].as_str() == image
                })
        };
        let done = names
            .iter()
            .filter(|a| bundles.iter().any(|b| b["metadata"]["name"] == format!("workers-{a}") && running(b)))
            .count();
        if done == names.len() {
            return ours;
        }
        assert!(
            Instant::now() < deadline && controller.is_running(),
            "{done} of {} bundles run their image:\n{}",
            names.len(),
            controller.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The sum of a /metrics counter over its label sets.
fn metric_total(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn api_requests_per_reconcile_do_not_grow_with_accounts() {
    let setup = setup("scale");
    if setup.cluster.requests().is_none() {
        eprintln!("a real cluster: its API server's requests cannot be counted here");
        return;
    }
    let controller = start_controller(&setup);
    let health = controller.health_url();
    let deadline = Instant::now() + WAIT;
    while http_request(&health, "GET", "/readyz", None).map(|(s, _)| s).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "the controller never got ready:\n{}", controller.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let reconciles = || {
        let (_, metrics) = http_request(&health, "GET", "/metrics", None).unwrap();
        metric_total(&metrics, "workerbundle_reconciles_total")
    };

    // Two rounds on the same controller: 10 accounts, then 50 more.
    let mut per_account = Vec::new();
    for (round, count) in [("a", 10), ("b", 50)] {
        let names: Vec<String> = (0..count).map(|i| format!("{round}{i}")).collect();
        let before = setup.cluster.requests().unwrap();
        let reconciled = reconciles();
        let ours = create_accounts(&setup, &controller, &names);
        let after = setup.cluster.requests().unwrap();
        let reconciled = reconciles() - reconciled;
        let made = controller_requests(&before, &after, &ours);
        let total: u64 = made.values().sum();
        eprintln!(
            "{count} accounts: {total} API requests ({:.1} per account, {:.2} per reconcile over {reconciled} reconciles): {made:?}",
            total as f64 / count as f64,
            total as f64 / reconciled
        );
        // Everything related is read from the watch caches: no LIST and no GET after start-up.
        let reads: Vec<_> = made.iter().filter(|((verb, _), _)| verb == "list" || verb == "get").collect();
        assert!(reads.is_empty(), "the controller read from the API instead of its caches: {reads:?}");
        per_account.push(total as f64 / count as f64);
    }
    // Each account costs the same writes (its releases, bundle, Deployment, Service, statuses,
    // Events) however many others there are.
    assert!(
        per_account[1] <= per_account[0] * 1.2,
        "API requests per account grew from {:.1} (10 accounts) to {:.1} (60)",
        per_account[0],
        per_account[1]
    );
}

const HELLO_V2: &str = "export default { fetch() { return new Response(\"hello v2\"); } };\n";
const HELLO_V3: &str = "export default { fetch() { return new Response(\"hello v3\"); } };\n";
/// workerd's last words when a worker throws at start-up, as its structured log prints them and
/// the kubelet keeps them (`FallbackToLogsOnError`).
const BOOM: &str = r#"{"timestamp":"1","level":"error","source":"entry.rs:170","message":"service hello: Uncaught Error: boom\n  at index.js:1:7","context_depth":0}"#;

/// The Ready condition of `object`, once it exists.
fn ready(object: &Value) -> Option<&Value> {
    object["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready")
}

/// Points the `hello` WorkerDeployment at `version` (its single module uploaded first).
fn upload_hello(setup: &Setup, version: &str, code: &str) {
    setup.s3.put("workers", &format!("1234/hello/{version}/index.js"), code.as_bytes());
    let patch =
        format!(r#"{{"spec":{{"template":{{"scriptUrls":["s3://workers/1234/hello/{version}/"]}}}}}}"#);
    setup.cluster.kubectl_ok(&["patch", "workerdeployment", "hello", "--type=merge", "-p", &patch]);
}

/// Plays the kubelet and the Deployment controller in the middle of a rollout that does not
/// finish: one pod of the new ReplicaSet beside the old one, which is the only available replica.
fn play_new_pod_failing(cluster: &Cluster, deployment: &str, pod: &str, image: &str, restarts: u32) {
    let d = cluster.get("deployment", deployment).unwrap();
    let generation = d["metadata"]["generation"].as_i64().unwrap();
    let status = serde_json::json!({"status": {
        "observedGeneration": generation, "replicas": 2, "updatedReplicas": 1, "readyReplicas": 1,
        "availableReplicas": 1, "unavailableReplicas": 1,
        "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
            "message": format!("ReplicaSet \"{deployment}-new\" is progressing.")}],
    }});
    cluster.kubectl_ok(&[
        "patch",
        "deployment",
        deployment,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    if cluster.get("pod", pod).is_none() {
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        let object = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "labels": labels},
            "spec": {"containers": [{"name": "workerd", "image": image}]},
        });
        let out = cluster.kubectl_stdin(&["create", "-f", "-"], Some(&object.to_string()));
        assert!(out.status.success(), "kubectl create pod: {}", String::from_utf8_lossy(&out.stderr));
    }
    let status = serde_json::json!({"status": {"phase": "Running", "containerStatuses": [{
        "name": "workerd", "image": image, "imageID": "", "ready": false, "started": false,
        "restartCount": restarts,
        "state": {"waiting": {"reason": "CrashLoopBackOff",
            "message": "back-off 40s restarting failed container=workerd"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": BOOM}},
    }]}});
    cluster.kubectl_ok(&[
        "patch",
        "pod",
        pod,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
}

/// A bad bundle never replaces a good one, and its status says so. A good image rolls out; the
/// next one's workerd exits at start-up (a worker throws): the bundle is not Ready and says which
/// worker threw, in workerd's words, names the image that still serves, warns once, and deletes
/// no image while the old ReplicaSet runs one. A fixed worker then rolls out, and only then do
/// the images it replaces go.
#[test]
fn a_new_image_that_cannot_start_never_replaces_the_one_that_serves() {
    let setup = setup("badimage");
    let Setup { cluster, registry, .. } = &setup;
    if cluster.url().is_none() {
        eprintln!(
            "skipped a_new_image_that_cannot_start_never_replaces_the_one_that_serves: it plays the \
             kubelet (a pod's container states, a Deployment's status), which a real cluster's own \
             kubelet and Deployment controller would overwrite"
        );
        return;
    }
    let controller = start_controller(&setup);
    apply_ok(cluster, &account_yaml("1234", ""));
    apply_ok(cluster, &deployment_yaml("hello", "s3://workers/1234/hello/v1/", None));
    let good = deployed_image(cluster, &controller, "workers-1234", None);
    mark_rolled_out(cluster, "workers-1234");
    cluster.wait_for("workerbundle", "workers-1234", WAIT, &controller, |b| {
        (ready(b)?["status"] == "True" && b["status"]["rollout"]["servingImage"] == good.as_str())
            .then_some(())
    });

    // A new image whose workerd exits at start-up: its pod crash-loops beside the old one.
    upload_hello(&setup, "v2", HELLO_V2);
    let bad = deployed_image(cluster, &controller, "workers-1234", Some(&good));
    let pod = "workers-1234-new-1";
    play_new_pod_failing(cluster, "workers-1234", pod, &bad, 3);
    let condition = cluster.wait_for("workerbundle", "workers-1234", WAIT, &controller, |b| {
        let c = ready(b)?;
        (c["reason"] == "NewImageNotStarting").then(|| c.clone())
    });
    assert_eq!(condition["status"], "False");
    let message = condition["message"].as_str().unwrap();
    assert!(message.contains("service hello: Uncaught Error: boom"), "names the worker: {message}");
    assert!(message.contains(&format!("{good} still serves")), "{message}");
    assert!(message.contains(pod), "{message}");
    let bundle = cluster.get("workerbundle", "workers-1234").unwrap();
    assert_eq!(bundle["status"]["image"], bad.as_str(), "the image the bundle wants");
    assert_eq!(bundle["status"]["rollout"]["servingImage"], good.as_str(), "the image that serves");
    assert_eq!(bundle["status"]["rollout"]["complete"], false);

    // The kubelet restarts it again and again; later reconciles change nothing: the image that
    // serves stays in the registry, no image is purged, and the warning was given once.
    play_new_pod_failing(cluster, "workers-1234", pod, &bad, 4);
    // The pod's change wakes the bundle a debounce later; its reconcile takes milliseconds.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(registry.manifest(REPO, digest_of(&good)).0, 200, "the serving image was deleted");
    assert_eq!(registry.manifest(REPO, digest_of(&bad)).0, 200);
    let events = cluster.list("events.events.k8s.io", None);
    assert!(!events.iter().any(|e| e["reason"] == "ImagePurged"), "{events:#?}");
    let warnings: Vec<&Value> = events.iter().filter(|e| e["reason"] == "NewImageNotStarting").collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert_eq!(warnings[0]["type"], "Warning");
    assert!(warnings[0]["series"].is_null(), "warned more than once: {:#?}", warnings[0]);
    assert!(warnings[0]["note"].as_str().unwrap().contains("service hello: Uncaught Error: boom"));
    let deployment = cluster.get("deployment", "workers-1234").unwrap();
    assert_eq!(deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);

    // The worker is fixed: its image rolls out (the crash-looping pod goes with its ReplicaSet),
    // the bundle is Ready, and the images it replaced, the bad one too, are purged only now.
    upload_hello(&setup, "v3", HELLO_V3);
    let fixed = deployed_image(cluster, &controller, "workers-1234", Some(&bad));
    cluster.kubectl_ok(&["delete", "pod", pod]);
    mark_rolled_out(cluster, "workers-1234");
    cluster.wait_for("workerbundle", "workers-1234", WAIT, &controller, |b| {
        (ready(b)?["status"] == "True" && b["status"]["rollout"]["servingImage"] == fixed.as_str())
            .then_some(())
    });
    let deadline = Instant::now() + WAIT;
    while [&good, &bad].iter().any(|i| registry.manifest(REPO, digest_of(i)).0 != 404) {
        assert!(Instant::now() < deadline, "the replaced images were not purged:\n{}", controller.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(registry.manifest(REPO, digest_of(&fixed)).0, 200, "the serving image stays");
    let events = cluster.list("events.events.k8s.io", None);
    // kube's recorder counts Events of the same reason about one object as one series.
    let purged: u64 = events
        .iter()
        .filter(|e| e["reason"] == "ImagePurged")
        .map(|e| e["series"]["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(purged, 2, "{events:#?}");
}
