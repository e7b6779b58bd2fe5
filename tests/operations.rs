//! Operating the controller, end to end against a Kubernetes API (KUBECONFIG's cluster, else the
//! in-memory API server), the real registry and the real S3 server: leader election on a Lease
//! between controller processes, /healthz, /readyz, /metrics, and JSON logs.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use support::cluster::{Cluster, Controller};
use support::registry::Registry;
use support::s3::{S3Server, SECRET_KEY};
use support::*;

const WAIT: Duration = Duration::from_secs(60);
const LEASE: &str = "workerbundle-controller";

const ACCOUNT: &str = r#"apiVersion: workerbundle.dev/v1alpha1
kind: WorkerAccount
metadata:
  name: "1234"
spec:
  workerBundleName: workers-1234
"#;

fn deployment_yaml(name: &str, url: &str) -> String {
    format!(
        r#"apiVersion: workerbundle.dev/v1alpha1
kind: WorkerDeployment
metadata:
  name: {name}
  labels:
    workerbundle.dev/account: "1234"
spec:
  template:
    scriptName: {name}
    scriptUrls: ["{url}"]
"#
    )
}

struct Services {
    registry: Registry,
    s3: S3Server,
    cluster: Cluster,
}

fn services(test: &str) -> Services {
    let registry = Registry::start(false);
    let s3 = S3Server::start();
    s3.put_dir("workers", "1234/hello/v1/", &repo_path("testdata/workers/hello"));
    s3.put_dir("workers", "1234/second/v1/", &repo_path("testdata/workers/secret"));
    Services { registry, s3, cluster: Cluster::start(test) }
}

/// `workerbundle run` with `extra` arguments after the registry and S3 ones.
fn controller(services: &Services, extra: &[&str]) -> Controller {
    let prefix = format!("{}/workers", services.registry.host());
    let endpoint = services.s3.endpoint();
    let mut args = vec!["--repository-prefix", &prefix, "--insecure", "--s3-endpoint", &endpoint];
    args.extend_from_slice(extra);
    Controller::start(&services.cluster, &args, &services.s3.env(SECRET_KEY))
}

fn apply_ok(cluster: &Cluster, yaml: &str) {
    let out = cluster.apply_yaml(yaml);
    assert!(out.status.success(), "kubectl apply failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// The Lease's holderIdentity (None when it does not exist or names nobody).
fn holder(cluster: &Cluster) -> Option<String> {
    let lease = cluster.get("lease", LEASE)?;
    lease["spec"]["holderIdentity"].as_str().filter(|h| !h.is_empty()).map(str::to_owned)
}

/// Polls the Lease until `check` accepts its holder.
fn wait_for_holder(cluster: &Cluster, timeout: Duration, check: impl Fn(Option<&str>) -> bool) {
    let start = Instant::now();
    loop {
        let now = holder(cluster);
        if check(now.as_deref()) {
            return;
        }
        assert!(start.elapsed() < timeout, "the lease holder stayed {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long after `since` the Lease's holder took it: its acquireTime, which the new holder
/// writes as it takes over, so the test's own polling adds nothing. (One machine, one clock.)
fn acquired_after(cluster: &Cluster, since: Timestamp) -> Duration {
    let lease = cluster.get("lease", LEASE).unwrap();
    let acquired: Timestamp = lease["spec"]["acquireTime"].as_str().unwrap().parse().unwrap();
    Duration::try_from(acquired.duration_since(since))
        .unwrap_or_else(|_| panic!("acquired at {acquired}, before {since}"))
}

fn current_release(wd: &Value) -> Option<String> {
    wd["status"]["currentRelease"].as_str().map(str::to_owned)
}

fn ready_layer(release: &Value) -> Option<String> {
    (release["status"]["phase"] == "Ready")
        .then(|| release["status"]["layer"]["digest"].as_str().map(str::to_owned))?
}

/// Applies a WorkerDeployment and waits until its release's layer is built; returns the release.
fn deploy_and_build(cluster: &Cluster, controller: &Controller, name: &str, url: &str) -> String {
    apply_ok(cluster, &deployment_yaml(name, url));
    let release = cluster.wait_for("workerdeployment", name, WAIT, controller, current_release);
    cluster.wait_for("workerrelease", &release, WAIT, controller, ready_layer);
    release
}

/// GET over plain HTTP/1.1: (status, body).
fn http_get(base: &str, path: &str) -> std::io::Result<(u16, String)> {
    let address = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// The value of a sample `series` (`name{labels}` exactly as exposed) in a /metrics text.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The lease lasts 4 s in these tests; the leader renews every 4/3 s, followers look every 0.5 s.
const LEASE_SECONDS: u64 = 4;

fn lease_args(identity: &str) -> Vec<&str> {
    vec!["--lease-duration", "4", "--lease-identity", identity]
}

#[test]
fn only_the_leader_reconciles_and_a_follower_takes_over_after_sigkill() {
    let services = services("leader");
    let cluster = &services.cluster;
    let a = controller(&services, &lease_args("replica-a"));
    let b = controller(&services, &lease_args("replica-b"));

    // Exactly one of them leads, and the Lease names it.
    wait_for_holder(cluster, WAIT, |h| h.is_some());
    let first = holder(cluster).unwrap();
    let (leader, follower, follower_name) =
        if first == "replica-a" { (&a, &b, "replica-b") } else { (&b, &a, "replica-a") };
    follower.wait_for_log("another replica leads; standing by", WAIT);
    assert!(leader.log().contains("leader: holding the lease"), "{}", leader.log());
    assert!(!follower.log().contains("leader: holding the lease"), "{}", follower.log());
    // A follower is ready: ready to take over (see src/controller/health.rs).
    let (status, body) = http_get(&follower.health_url(), "/readyz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ok: standing by, another replica leads\n"));

    // A deployment applied now is built by the leader alone.
    apply_ok(cluster, ACCOUNT);
    let release = deploy_and_build(cluster, leader, "hello", "s3://workers/1234/hello/v1/");
    assert!(leader.log().contains("release built"), "{}", leader.log());
    let follower_log = follower.log();
    assert!(
        !follower_log.contains("reconcile{") && !follower_log.contains(&release),
        "the follower reconciled:\n{follower_log}"
    );
    assert_eq!(holder(cluster).as_deref(), Some(first.as_str()), "the leader kept its lease");

    // SIGKILL: no release; the follower takes over once the lease has gone unrenewed for its
    // duration (it looks every eighth of it, hence one look on top).
    let killed = Timestamp::now();
    leader.kill();
    wait_for_holder(cluster, WAIT, |h| h == Some(follower_name));
    let took = acquired_after(cluster, killed);
    eprintln!("takeover after SIGKILL: {took:?}");
    let lease = Duration::from_secs(LEASE_SECONDS);
    // A quarter second for the follower's read of the lease before it writes.
    assert!(took < lease + lease / 8 + Duration::from_millis(250), "takeover took {took:?}");
    // It waited for the lease to expire: the last renewal was at most a third of it before.
    assert!(took > lease / 2, "took over a live lease after {took:?}");

    // The new leader converges: a deployment applied after the kill is built.
    let second = deploy_and_build(cluster, follower, "second", "s3://workers/1234/second/v1/");
    assert!(services
        .registry
        .blob_exists("workers/1234", &ready_layer(&cluster.get("workerrelease", &second).unwrap()).unwrap()));
    assert!(follower.log().contains("leader: holding the lease"), "{}", follower.log());
    assert!(follower.is_running());
}

#[test]
fn sigterm_releases_the_lease_and_the_follower_takes_over_at_once() {
    let services = services("handover");
    let cluster = &services.cluster;
    // A long lease, so that a handover faster than it can only come from the release.
    let long = ["--lease-duration", "20"];
    let a = controller(&services, &[&long[..], &["--lease-identity", "replica-a"]].concat());
    wait_for_holder(cluster, WAIT, |h| h == Some("replica-a"));
    let b = controller(&services, &[&long[..], &["--lease-identity", "replica-b"]].concat());
    b.wait_for_log("another replica leads; standing by", WAIT);

    let terminated = Timestamp::now();
    let status = a.terminate();
    assert!(status.success(), "exit {status:?}:\n{}", a.log());
    assert!(a.log().contains("lease released"), "{}", a.log());
    assert_ne!(holder(cluster).as_deref(), Some("replica-a"), "the lease still names the stopped leader");

    wait_for_holder(cluster, WAIT, |h| h == Some("replica-b"));
    let took = acquired_after(cluster, terminated);
    eprintln!("takeover after SIGTERM: {took:?}");
    // The follower looks every eighth of the lease (2.5 s): a small part of the 20 s an
    // unreleased lease would take to expire.
    assert!(took < Duration::from_secs(20) / 4, "takeover took {took:?}");

    // And it acts.
    apply_ok(cluster, ACCOUNT);
    deploy_and_build(cluster, &b, "hello", "s3://workers/1234/hello/v1/");
}

#[test]
fn a_leader_that_loses_its_lease_stops_at_once() {
    let services = services("lost");
    let cluster = &services.cluster;
    let c = controller(&services, &lease_args("replica-a"));
    wait_for_holder(cluster, WAIT, |h| h == Some("replica-a"));

    // Someone else takes the lease: the leader's next renewal finds it gone and it exits
    // non-zero instead of acting on, within one renewal (a third of the lease).
    let taken = Instant::now();
    cluster.kubectl_ok(&[
        "patch",
        "lease",
        LEASE,
        "--type=merge",
        "-p",
        r#"{"spec":{"holderIdentity":"intruder"}}"#,
    ]);
    let status = c.wait_for_exit(WAIT);
    assert!(!status.success(), "exit {status:?}:\n{}", c.log());
    assert!(taken.elapsed() < Duration::from_secs(LEASE_SECONDS), "stopped after {:?}", taken.elapsed());
    let log = c.log();
    assert!(log.contains("lost the leadership") && log.contains("intruder holds it now"), "{log}");
    assert_eq!(holder(cluster).as_deref(), Some("intruder"), "it must not release what is not its own");
}

#[test]
fn probes_metrics_and_json_logs() {
    let services = services("ops");
    let cluster = &services.cluster;
    let started = Instant::now();
    let c = controller(&services, &["--log-format", "json", "--lease-duration", "4"]);
    let url = c.health_url();

    // /readyz from the moment the server listens: 503 until the watch caches are synced.
    let mut seen = Vec::new();
    loop {
        let (status, body) = http_get(&url, "/readyz").unwrap();
        let synced = c.log().contains("watch caches synced");
        seen.push(status);
        if status == 200 {
            assert!(synced, "/readyz was 200 before the caches were synced: {body}");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("not ready"), "{body}");
        assert!(started.elapsed() < WAIT, "never ready:\n{}", c.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("/readyz answers before 200: {}", seen.len() - 1);
    assert_eq!(http_get(&url, "/healthz").unwrap().0, 200);

    // One deployment builds; one points at a missing key and fails.
    apply_ok(cluster, ACCOUNT);
    let release = deploy_and_build(cluster, &c, "hello", "s3://workers/1234/hello/v1/");
    apply_ok(cluster, &deployment_yaml("broken", "s3://workers/1234/missing/v1/index.js"));
    let broken = cluster.wait_for("workerdeployment", "broken", WAIT, &c, current_release);
    cluster
        .wait_for("workerrelease", &broken, WAIT, &c, |r| (r["status"]["phase"] == "Failed").then_some(()));
    // The account waits for a quiet moment (its debounce) before it fills its bundle, and its
    // reconcile is counted once it has finished (after the bundle is written): wait for the count.
    let account_counted = r#"workerbundle_reconciles_total{kind="WorkerAccount"}"#;
    let metrics = loop {
        let (status, metrics) = http_get(&url, "/metrics").unwrap();
        assert_eq!(status, 200);
        if sample(&metrics, account_counted).is_some() {
            break metrics;
        }
        assert!(started.elapsed() < WAIT * 2, "no WorkerAccount reconcile counted:\n{metrics}\n{}", c.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let value =
        |series: &str| sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in:\n{metrics}"));
    for kind in ["WorkerDeployment", "WorkerRelease", "WorkerAccount"] {
        let reconciles = value(&format!(r#"workerbundle_reconciles_total{{kind="{kind}"}}"#));
        assert!(reconciles > 0.0, "{kind}: {reconciles}");
    }
    let registry = format!(r#"{{registry="{}"}}"#, services.registry.host());
    assert!(value(&format!("workerbundle_registry_requests_total{registry}")) > 0.0);
    assert!(value(&format!("workerbundle_registry_sent_bytes_total{registry}")) > 0.0);
    assert!(value("workerbundle_build_duration_seconds_count") > 0.0);
    assert!(value("workerbundle_push_duration_seconds_count") > 0.0);
    assert!(
        value(r#"workerbundle_reconcile_errors_total{kind="WorkerRelease",reason="SourceUnavailable"}"#)
            > 0.0
    );
    // The broken release waits out its retry delay: it is work pending.
    assert!(value(r#"workerbundle_queue_depth{kind="WorkerRelease"}"#) >= 1.0, "{metrics}");

    // JSON logs: one object a line, no colour codes, and each reconcile's lines carry its span.
    let log = c.log();
    assert!(!log.contains('\u{1b}'), "colour codes in a log file:\n{log}");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let built = lines
        .iter()
        .find(|l| l["fields"]["message"] == "release built")
        .unwrap_or_else(|| panic!("no 'release built' line:\n{log}"));
    assert_eq!(built["span"]["name"], "reconcile", "{built}");
    assert_eq!(built["span"]["kind"], "WorkerRelease", "{built}");
    assert_eq!(built["span"]["namespace"], cluster.namespace.as_str(), "{built}");
    assert_eq!(built["span"]["object"], release.as_str(), "{built}");
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "release failed" && l["span"]["object"] == broken.as_str()),
        "{log}"
    );
}
