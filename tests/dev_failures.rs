//! `workerbundle dev` when things go wrong, as a user meets it: a worker that cannot start is
//! refused at upload while its sibling keeps answering; a redeploy never refuses a sibling's
//! request; a port in use is named, and kept ports survive a restart; a second dev on the same
//! data exits at once; a worker stuck in a loop stalls its siblings only until the watchdog
//! restarts their workerd.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::dev::*;
use support::*;

/// A sibling that answers its name.
fn sibling_source(name: &str) -> String {
    format!("export default {{ async fetch() {{ return new Response({name:?}); }} }};\n")
}

/// The API server's objects of the account, by kind and name.
fn objects(dev: &Dev) -> String {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(dev.data.join("kubeconfig"))
        .args(["get", "workerdeployments,workerreleases,secrets", "-A", "-o", "name"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_worker_that_cannot_start_is_refused_and_its_sibling_never_stops() {
    let dir = tempdir();
    let mut dev = Dev::start(dir.path());
    let (wrangler, _) = dev.wrangler();
    let sibling = dir.path().join("sibling");
    let url = dev.deploy(&wrangler, &sibling, "sibling", &sibling_source("sibling"), "");
    wait_for_answer(&url, "sibling", &dev);

    let stored = files_under(&dev.data.join("s3"));
    let applied = objects(&dev);
    let poller = Poller::start(&url, "sibling", Duration::from_millis(5));
    let bad = dir.path().join("bad");
    let fine = "export default { fetch() { return new Response(\"fine\"); } };\n";
    let cases = [
        ("throws", "throw new Error(\"top-level boom\");\nexport default {};\n", "", "top-level boom"),
        (
            "missing module",
            // esbuild leaves `cloudflare:` imports to the runtime, which has no such module.
            "import nope from \"cloudflare:no-such-module\";\nexport default { fetch() { return new Response(String(nope)); } };\n",
            "",
            "No such module",
        ),
        ("loops", "while (true) {}\nexport default {};\n", "", "did not finish starting"),
        // Settings this workerd refuses: refused at upload too, with its reason.
        ("an experimental flag", fine, "compatibility_flags = [\"experimental\"]\n", "experimental"),
        ("an unknown flag", fine, "compatibility_flags = [\"no_such_flag_xyz\"]\n", "No such compatibility flag"),
    ];
    for (case, source, extra, expected) in cases {
        write_worker(&bad, "bad", source, extra);
        let run = wrangler.run(&bad, &["deploy"]);
        let text = run.text();
        assert!(!run.success(), "{case}: wrangler deploy succeeded:\n{text}");
        assert!(text.contains(expected) && text.contains("10021"), "{case}: {text}");
        eprintln!("{case}: refused in {} ms", run.elapsed.as_millis());
    }
    let report = poller.stop();
    assert!(
        report.failures.is_empty(),
        "the sibling failed while bad uploads were refused: {:?}",
        report.failures
    );
    assert!(report.ok > 100, "too few polls to show anything: {}", report.ok);
    eprintln!("sibling polled every 5 ms: {} answers, 0 failures", report.ok);
    assert_eq!(files_under(&dev.data.join("s3")), stored, "a refused upload stored something");
    assert_eq!(objects(&dev), applied, "a refused upload changed the control plane");
    assert!(!dev.log().contains("serving") || !dev.log().contains("/bad on"), "{}", dev.log());
}

#[test]
fn a_redeploy_and_a_secret_change_never_refuse_a_siblings_request() {
    let dir = tempdir();
    let mut dev = Dev::start(dir.path());
    let (wrangler, _) = dev.wrangler();
    let changing = dir.path().join("changing");
    let sibling = dir.path().join("sibling");
    let sibling_url = dev.deploy(&wrangler, &sibling, "sibling", &sibling_source("sibling"), "");
    let changing_url = dev.deploy(&wrangler, &changing, "changing", &sibling_source("v1"), "");
    wait_for_answer(&sibling_url, "sibling", &dev);
    wait_for_answer(&changing_url, "v1", &dev);

    let poller = Poller::start(&sibling_url, "sibling", Duration::from_millis(5));
    let started = Instant::now();
    for version in ["v2", "v3"] {
        write_worker(&changing, "changing", &sibling_source(version), "");
        wrangler.ok(&changing, &["deploy"]);
        wait_for_answer(&changing_url, version, &dev);
    }
    let run = wrangler.run_with_input(&changing, &["secret", "put", "TOKEN"], Some("s3cr3t"));
    assert!(run.success(), "{}", run.text());
    let builds = dev.log().matches("workerd serving").count();
    let deadline = Instant::now() + WAIT;
    while dev.log().matches("workerd serving").count() == builds {
        assert!(Instant::now() < deadline, "the secret change never restarted workerd:\n{}", dev.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2)); // past the old workerd's drain
    let report = poller.stop();
    eprintln!(
        "two redeploys and a secret change in {} ms: the sibling answered {} polls, {} failed",
        started.elapsed().as_millis(),
        report.ok,
        report.failures.len()
    );
    assert!(report.failures.is_empty(), "the sibling failed during redeploys: {:?}", report.failures);
    // The replaced root filesystems go: the running one and at most the one still draining.
    let unpacked = std::fs::read_dir(dev.data.join("run")).unwrap().count();
    assert!(unpacked <= 2, "{unpacked} unpacked images left under DATA/run");
}

#[test]
fn a_busy_port_is_named_and_kept_ports_survive_a_restart_and_a_second_dev_exits_at_once() {
    let dir = tempdir();
    // The first port of the range is held by someone else.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let first = held.local_addr().unwrap().port();
    let range = format!("{first}-{}", first.saturating_add(20));
    let mut dev = Dev::start_with(dir.path(), &range);
    let (wrangler, _) = dev.wrangler();
    let project = dir.path().join("hello");
    let url = dev.deploy(&wrangler, &project, "hello", &sibling_source("hello"), "");
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(port, first, "the busy port was handed out");
    assert!((first..=first + 20).contains(&port), "{url} is outside --worker-ports {range}");
    assert!(dev.log().contains(&format!("port={first}")), "the busy port is not named:\n{}", dev.log());
    wait_for_answer(&url, "hello", &dev);

    // A second dev on the same data: refused at once, nothing changed.
    let kubeconfig = std::fs::read(dev.data.join("kubeconfig")).unwrap();
    let started = Instant::now();
    let second = Command::new(BIN)
        .args(["dev", "--data"])
        .arg(&dev.data)
        .args(["--listen", "127.0.0.1:0", "--base-image", base_layout(), "--worker-ports", &range])
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second dev on the same data ran:\n{stderr}");
    assert!(stderr.contains("in use by another workerbundle dev"), "{stderr}");
    assert!(took < Duration::from_secs(2), "the second dev took {took:?} to give up");
    assert_eq!(
        std::fs::read(dev.data.join("kubeconfig")).unwrap(),
        kubeconfig,
        "the second dev rewrote the kubeconfig"
    );
    eprintln!("a second dev on the same data exited in {} ms", took.as_millis());
    wait_for_answer(&url, "hello", &dev);

    // Restarted, the worker keeps its port.
    drop(dev);
    let mut dev = Dev::start_with(dir.path(), &range);
    assert_eq!(dev.serving("hello"), url, "the worker's URL changed across a restart");
    wait_for_answer(&url, "hello", &dev);
    drop(dev);

    // A kept port held by another process stops dev at start, naming it.
    let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let out = Command::new(BIN)
        .args(["dev", "--data"])
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--base-image", base_layout(), "--worker-ports", &range])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "dev started without its kept port:\n{stderr}");
    assert!(stderr.contains(&format!("port {port} of worker")), "{stderr}");
    drop(held);
}

#[test]
fn a_worker_in_a_loop_stalls_its_siblings_only_until_the_watchdog_restarts_them() {
    let dir = tempdir();
    let mut dev = Dev::start(dir.path());
    let (wrangler, _) = dev.wrangler();
    let sibling = dir.path().join("sibling");
    let sibling_url = dev.deploy(&wrangler, &sibling, "sibling", &sibling_source("sibling"), "");
    let spinner = dir.path().join("spinner");
    write_worker(
        &spinner,
        "spinner",
        "export default { async fetch(request) {\n  if (new URL(request.url).pathname === \"/spin\") { while (true) {} }\n  return new Response(\"spinner\");\n} };\n",
        "",
    );
    wrangler.ok(&spinner, &["deploy"]);
    let spinner_url = dev.serving("spinner");
    wait_for_answer(&sibling_url, "sibling", &dev);
    wait_for_answer(&spinner_url, "spinner", &dev);

    let poller = Poller::start(&sibling_url, "sibling", Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(500));
    let spin = std::thread::spawn({
        let url = format!("{spinner_url}/spin");
        move || http_get(&url, Duration::from_secs(60))
    });
    // The watchdog kills the stuck workerd; the sibling answers again without any deploy.
    let spun = spin.join().unwrap();
    wait_for_answer(&sibling_url, "sibling", &dev);
    std::thread::sleep(Duration::from_millis(500));
    let report = poller.stop();
    let outage = report.longest_gap();
    eprintln!(
        "a worker in a loop stalled its sibling for {} ms ({} polls failed, {} answered); the spinning request got {spun:?}",
        outage.as_millis(),
        report.failures.len(),
        report.ok
    );
    let log = dev.log();
    assert!(
        log.contains("stopped answering its health probe")
            && log.contains("requests wait for an answer from spinner (the longest"),
        "the watchdog did not name the stuck worker:\n{log}"
    );
    // The bound SECURITY.md states: the watchdog's 3 missed probes, a restart, and slack for a
    // busy machine; without the watchdog the stall never ends.
    assert!(outage < Duration::from_secs(30), "the sibling was stalled for {outage:?}");
    assert!(spun.is_err() || spun.as_ref().is_ok_and(|(status, _)| *status != 200), "{spun:?}");
}

#[test]
fn a_workerd_that_dies_is_reported_with_its_last_lines_and_started_again() {
    let dir = tempdir();
    let mut dev = Dev::start(dir.path());
    let (wrangler, _) = dev.wrangler();
    let project = dir.path().join("hello");
    write_worker(
        &project,
        "hello",
        "export default { async fetch() { console.log(\"answering\"); return new Response(\"hello\"); } };\n",
        "",
    );
    wrangler.ok(&project, &["deploy"]);
    let url = dev.serving("hello");
    wait_for_answer(&url, "hello", &dev);

    // Killed from outside, as the kernel's OOM killer would.
    let serving = |data: &std::path::Path| -> Vec<String> {
        workerds(data).into_iter().filter(|l| l.contains("/workerd serve ")).collect()
    };
    let running = serving(&dev.data);
    assert_eq!(running.len(), 1, "{running:?}");
    let pid = running[0].split_whitespace().next().unwrap().to_owned();
    assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    // The same URL answers again, from a new process, without a deploy.
    wait_for_answer(&url, "hello", &dev);
    let again = serving(&dev.data);
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!(again[0].split_whitespace().next().unwrap(), pid, "the dead workerd still runs?");
    let log = dev.log();
    assert!(
        log.contains("ERROR") && log.contains("workerd exited (signal: 9"),
        "the death was not reported:\n{log}"
    );
    // Its console line is attributed to its worker.
    assert!(log.contains("worker=hello") && log.contains("console.log: answering"), "{log}");
}
