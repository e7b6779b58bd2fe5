//! `workerbundle dev` end to end, as a user meets it: start it, point unmodified wrangler at the
//! exports it prints, deploy, and curl the URL it prints. Then a redeploy changes the answer, a
//! secret's new value changes only the environment (the same image), a rollback brings the first
//! answer back without a build, deleting the script stops it, and SIGINT leaves no process behind.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::dev::*;
use support::wrangler::Wrangler;
use support::*;

#[test]
fn wrangler_deploy_to_workerbundle_dev_and_curl_it() {
    let dir = tempdir();
    let mut dev = Dev::start(dir.path());
    let api = dev.export("CLOUDFLARE_API_BASE_URL");
    let token = dev.export("CLOUDFLARE_API_TOKEN");
    let account = dev.export("CLOUDFLARE_ACCOUNT_ID");
    let wrangler = Wrangler::new(&api, &token, Some(&account));
    let project = dir.path().join("hello");

    // Deploy, then curl the URL dev prints.
    write_project(&project, "v1");
    let started = Instant::now();
    let first = wrangler.ok(&project, &["deploy"]).version_id();
    let url = dev.serving("hello");
    wait_for_answer(&url, "hi v1 token=undefined", &dev);
    eprintln!("wrangler deploy -> the worker answers: {} ms", started.elapsed().as_millis());

    // A redeploy changes the answer.
    write_project(&project, "v2");
    wrangler.ok(&project, &["deploy"]);
    let url = dev.serving("hello");
    wait_for_answer(&url, "hi v2 token=undefined", &dev);

    // A new secret binds a new name (a new image); a new value only changes the environment.
    let run = wrangler.run_with_input(&project, &["secret", "put", "TOKEN"], Some("first"));
    assert!(run.success(), "{}", run.text());
    let url = dev.serving("hello");
    wait_for_answer(&url, "hi v2 token=first", &dev);
    let image = dev.bundle_digest(&account);
    let run = wrangler.run_with_input(&project, &["secret", "put", "TOKEN"], Some("s3cr3t"));
    assert!(run.success(), "{}", run.text());
    let url = dev.serving("hello");
    wait_for_answer(&url, "hi v2 token=s3cr3t", &dev);
    assert_eq!(dev.bundle_digest(&account), image, "a secret value rebuilt the image");

    // A rollback to the first version answers as it did, with no new build.
    let builds = dev.log().matches("release built").count();
    wrangler.ok(&project, &["rollback", &first, "--message", "back", "-y"]);
    let url = dev.serving("hello");
    wait_for_answer(&url, "hi v1 token=s3cr3t", &dev);
    assert_eq!(dev.log().matches("release built").count(), builds, "the rollback rebuilt:\n{}", dev.log());

    // Deleting the script stops it.
    wrangler.ok(&project, &["delete", "--force"]);
    let deadline = Instant::now() + WAIT;
    while get(&url).is_some() {
        assert!(Instant::now() < deadline, "{url} still answers after the delete\n{}", dev.log());
        std::thread::sleep(Duration::from_millis(200));
    }

    // SIGINT stops everything; no workerd is left. (The delete took the script's secrets too.)
    write_project(&project, "v3");
    wrangler.ok(&project, &["deploy"]);
    let url = dev.serving("hello");
    wait_for_answer(&url, "hi v3 token=undefined", &dev);
    assert!(!workerds(&dev.data).is_empty(), "workerd runs from the data directory");
    let pid = dev.child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = dev.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "dev did not stop on SIGINT:\n{}", dev.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}\n{}", dev.log());
    assert!(workerds(&dev.data).is_empty(), "left behind: {:?}", workerds(&dev.data));
    assert!(get(&url).is_none());
}
