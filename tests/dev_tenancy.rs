//! What a tenant chooses (worker names, secret names) never reaches a variable the dynamic
//! loader, glibc or workerd reads, through `workerbundle dev` with unmodified wrangler: the
//! environment of the account's running workerd is read from /proc and checked.

mod support;

use support::dev::*;
use support::*;

/// The environment of the one workerd serving under `data`.
fn workerd_environment(data: &std::path::Path) -> Vec<String> {
    // A replaced workerd drains for a moment before it stops.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let serving = loop {
        let serving: Vec<String> =
            workerds(data).into_iter().filter(|l| l.contains("/workerd serve ")).collect();
        if serving.len() == 1 || std::time::Instant::now() > deadline {
            break serving;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(serving.len(), 1, "{serving:?}");
    let pid = serving[0].split_whitespace().next().unwrap().to_owned();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

#[test]
fn a_secret_named_to_set_ld_preload_stays_a_secret_of_its_worker() {
    let dir = tempdir();
    let mut dev = Dev::start(dir.path());
    let (wrangler, _) = dev.wrangler();
    // The attack as found: worker `ld`, secret `PRELOAD` once became LD_PRELOAD; and two
    // workers whose names and secrets once met in one variable (`col` + `X_K`, `col-x` + `K`).
    let source =
        "export default { async fetch(request, env) { return new Response(JSON.stringify(env)); } };\n";
    let mut urls = Vec::new();
    for (worker, secret, value) in
        [("ld", "PRELOAD", "/tmp/evil.so"), ("col", "X_K", "mine"), ("col-x", "K", "theirs")]
    {
        let project = dir.path().join(worker);
        write_worker(&project, worker, source, "");
        wrangler.ok(&project, &["deploy"]);
        let run = wrangler.run_with_input(&project, &["secret", "put", secret], Some(value));
        assert!(run.success(), "{}", run.text());
        urls.push((worker, dev.serving(worker), secret, value));
    }
    for (worker, url, secret, value) in &urls {
        let expected = format!("{{\"{secret}\":\"{value}\"}}");
        wait_for_answer(url, &expected, &dev);
        eprintln!("{worker} reads its own secret {secret} and nothing else");
    }
    let environment = workerd_environment(&dev.data);
    let names: Vec<&str> = environment.iter().filter_map(|v| v.split_once('=').map(|(k, _)| k)).collect();
    for reserved in ["LD_", "MALLOC_", "GLIBC_", "GCONV_", "LOCPATH", "TZ", "COL_"] {
        assert!(!names.iter().any(|n| n.starts_with(reserved)), "{reserved}* reached workerd: {names:?}");
    }
    let secrets: Vec<&&str> = names.iter().filter(|n| n.starts_with("WB")).collect();
    assert_eq!(secrets.len(), 3, "one variable per (worker, secret): {names:?}");
}
