//! Faults at the control plane: the Kubernetes API server goes away (every watch stream breaks,
//! every request fails) and comes back on the same address with its objects. While it is down,
//! the controller must back off rather than spin (connections are counted); once it is back, the
//! controller must resume (re-list or resume its watches; the in-memory server answers 410 Gone
//! to a watch from a resourceVersion it no longer holds) and converge on what changed.
//! Faults at S3 and the registry are in tests/s3_sources.rs and tests/registry_push.rs.

mod support;

use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::cluster::{Cluster, Controller};
use support::registry::Registry;
use support::s3::S3Server;
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
    let base = format!("{}/workerd-base:1", registry.host());
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", base_layout(), &format!("docker://{base}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s3 = S3Server::start();
    s3.put_dir("workers", "hello/", &repo_path("testdata/workers/hello"));
    // A leader that cannot renew for two thirds of its lease stops by design (see
    // tests/operations.rs); here the outage is shorter than that.
    let base = format!("docker://{base}");
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
