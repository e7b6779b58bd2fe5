//! Faults at the control plane: the Kubernetes API server goes away (every watch stream breaks,
//! every request fails) and comes back on the same address with its objects. While it is down,
//! the controller must back off rather than spin (connections are counted); once it is back, the
//! controller must resume (re-list or resume its watches; the in-memory server answers 410 Gone
//! to a watch from a resourceVersion it no longer holds) and converge on what changed.
//!
//! Faults at the edges during a controller run: S3 and the registry each behind a fault proxy
//! (tests/support/fault_proxy.rs), first down the hard way (connections counted), then answering
//! with resets, 500s, 503s, 429s, slow and cut-off answers; every bundle must get a complete image.
//! The same faults against the CLI's S3 reads and registry push are in tests/s3_sources.rs and
//! tests/registry_push.rs.

mod support;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::cluster::{Cluster, Controller};
use support::fault_proxy::FaultProxy;
use support::registry::Registry;
use support::s3::{S3Server, SECRET_KEY};
use support::workload::container;
use support::*;

const WAIT: Duration = Duration::from_secs(120);
const DOWN: Duration = Duration::from_secs(10);

fn account_and_worker(account: &str) -> String {
    format!(
        "---\napiVersion: workerbundle.dev/v1alpha1\nkind: WorkerAccount\nmetadata:\n  name: \"{account}\"\nspec:\n  workerBundleName: workers-{account}\n\
         ---\napiVersion: workerbundle.dev/v1alpha1\nkind: WorkerDeployment\nmetadata:\n  name: w-{account}\n  labels:\n    workerbundle.dev/account: \"{account}\"\n\
         spec:\n  template:\n    scriptName: w-{account}\n    scriptUrls: [\"s3://workers/hello/\"]\n"
    )
}

/// The image the bundle's Deployment runs, once it is the bundle's current image.
fn running_image(cluster: &Cluster, controller: &Controller, bundle: &str) -> String {
    cluster.wait_for("workerbundle", bundle, WAIT, controller, |b| {
        let image = b["status"]["image"].as_str()?;
        let deployment = cluster.get("deployment", bundle)?;
        (container(&deployment)["image"].as_str() == Some(image)).then(|| image.to_owned())
    })
}

/// Accepts and at once closes every connection to `address` for `how_long`: a dependency that is
/// down the hard way (each attempt fails fast, the pattern that turns a missing backoff into a
/// hot loop). Returns how many connections were made.
fn count_connections(address: &str, how_long: Duration) -> usize {
    let listener = TcpListener::bind(address).expect("the API server's address is free");
    listener.set_nonblocking(true).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + how_long;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                count.fetch_add(1, Ordering::Relaxed);
                drop(stream);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    count.load(Ordering::Relaxed)
}

#[test]
fn the_api_server_restarting_breaks_every_watch_and_the_controller_converges_without_spinning() {
    let Some(mut cluster) = Cluster::start_restartable("apiserver-restart") else {
        eprintln!("KUBECONFIG names a real cluster, which this test cannot restart: skipped");
        return;
    };
    let registry = Registry::start(false);
    let base = registry.push_base();
    let s3 = S3Server::start();
    s3.put_dir("workers", "hello/", &repo_path("testdata/workers/hello"));
    // A leader that cannot renew for two thirds of its lease stops by design (see
    // tests/operations.rs); here the outage is shorter than that.
    let controller =
        Controller::start_pushing(&cluster, &registry.host(), &base, &s3, &["--lease-duration", "60"], &[]);
    let applied = cluster.apply_yaml(&account_and_worker("1111"));
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    running_image(&cluster, &controller, "workers-1111");

    // Down for 10 s; every connection the controller makes meanwhile is counted.
    let server = std::fs::read_to_string(cluster.kubeconfig()).unwrap();
    let address =
        server.split("server: http://").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let connections = cluster.restart_server(|| count_connections(&address, DOWN));
    let per_second = connections as f64 / DOWN.as_secs_f64();
    eprintln!("API server down {} s: {connections} connection attempts ({per_second:.1}/s)", DOWN.as_secs());
    assert!(connections > 0, "the controller never tried to reconnect");
    assert!(per_second < 10.0, "{connections} connections in {} s: the controller spins", DOWN.as_secs());
    assert!(controller.is_running(), "the controller gave up:\n{}", controller.log());

    // Back: what changed is picked up, what was there is still there.
    let started = Instant::now();
    let applied = cluster.apply_yaml(&account_and_worker("2222"));
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    running_image(&cluster, &controller, "workers-2222");
    eprintln!("after the restart, a new account ran its image in {} ms", started.elapsed().as_millis());
    running_image(&cluster, &controller, "workers-1111");
    assert!(!controller.log().contains("panicked"), "{}", controller.log());
}

/// Connections per minute that `proxy` refused while down for `how_long`.
fn refused_per_minute(proxy: &FaultProxy, how_long: Duration) -> f64 {
    let before = proxy.refused.load(Ordering::Relaxed);
    proxy.set_down(true);
    std::thread::sleep(how_long);
    proxy.set_down(false);
    (proxy.refused.load(Ordering::Relaxed) - before) as f64 * 60.0 / how_long.as_secs_f64()
}

/// The image `reference` (`host/repository@digest`) is whole in the registry: its manifest and
/// every blob it names, read straight from the registry, not through the proxy.
fn assert_whole(registry: &Registry, reference: &str) {
    let (name, digest) = reference.split_once('@').unwrap();
    let repository = name.split_once('/').unwrap().1;
    let (status, body) = registry.manifest(repository, digest);
    assert_eq!(status, 200, "{reference}: no manifest");
    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let blobs = manifest["layers"].as_array().unwrap().iter().chain([&manifest["config"]]);
    for blob in blobs.map(|b| b["digest"].as_str().unwrap()) {
        assert!(registry.blob_exists(repository, blob), "{reference}: blob {blob} missing");
    }
}

#[test]
fn s3_and_the_registry_down_then_faulty_the_controller_backs_off_and_converges() {
    const OUTAGE: Duration = Duration::from_secs(20);
    let cluster = Cluster::start("edge-faults");
    let registry = Registry::start(false);
    let s3 = S3Server::start();
    s3.put_dir("workers", "hello/", &repo_path("testdata/workers/hello"));
    let registry_proxy = FaultProxy::start(registry.port, 0, 0x0b5e);
    let s3_proxy = FaultProxy::start(s3.port, 0, 0x53f4);
    let host = format!("127.0.0.1:{}", registry_proxy.port);
    registry.push_base();
    let (prefix, base, endpoint) = (
        format!("{host}/workers"),
        format!("docker://{host}/workerd-base:1"),
        format!("http://127.0.0.1:{}", s3_proxy.port),
    );
    let args =
        ["--repository-prefix", &prefix, "--base-image", &base, "--insecure", "--s3-endpoint", &endpoint];
    let controller = Controller::start(&cluster, &args, &s3.env(SECRET_KEY));

    // S3 down: the release cannot read its script.
    let applied = cluster.apply_yaml(&account_and_worker("1111"));
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    let s3_rate = refused_per_minute(&s3_proxy, OUTAGE);
    // S3 back, the registry down: the release cannot push its layer.
    let registry_rate = refused_per_minute(&registry_proxy, OUTAGE);
    eprintln!(
        "while down {} s each: S3 {s3_rate:.0} connections/min, registry {registry_rate:.0} connections/min",
        OUTAGE.as_secs()
    );
    assert!(s3_rate > 0.0 && registry_rate > 0.0, "the controller never tried: {s3_rate} {registry_rate}");
    assert!(s3_rate < 120.0, "{s3_rate:.0} connections/min to a dead S3: the controller spins");
    assert!(
        registry_rate < 120.0,
        "{registry_rate:.0} connections/min to a dead registry: the controller spins"
    );

    // Both back, but faulty: 30% of requests meet a fault. Every bundle gets a whole image.
    registry_proxy.set_fault_percent(30);
    s3_proxy.set_fault_percent(30);
    let started = Instant::now();
    let accounts = ["1111", "2222", "3333", "4444", "5555"];
    for account in &accounts[1..] {
        let applied = cluster.apply_yaml(&account_and_worker(account));
        assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    }
    for account in accounts {
        let image = running_image(&cluster, &controller, &format!("workers-{account}"));
        assert!(image.starts_with(&format!("{host}/workers/{account}@sha256:")), "{image}");
        assert_whole(&registry, &image);
    }
    eprintln!(
        "through 30% faults, {} bundles ran whole images {} ms after the outages; registry faults: {}; S3 faults: {}",
        accounts.len(),
        started.elapsed().as_millis(),
        registry_proxy.summary(),
        s3_proxy.summary()
    );
    assert!(registry_proxy.missing_kinds().is_empty(), "registry faults: {}", registry_proxy.summary());
    assert!(s3_proxy.faults.load(Ordering::Relaxed) > 0, "no S3 fault was injected");
    assert!(controller.is_running() && !controller.log().contains("panicked"), "{}", controller.log());
}
