//! Worker sources in a real S3-compatible server (s3s-fs, which checks SigV4 signatures).

mod support;

use std::fs;

use support::fault_proxy::FaultProxy;
use support::s3::{S3Server, SECRET_KEY};
use support::*;
use workerbundle::build::{build as build_image, BuildContext, BuildRequest};
use workerbundle::image::reference::ImageRef;
use workerbundle::registry::Registries;
use workerbundle::source::WorkerInput;
use workerbundle::source::{S3Options, S3Source, S3Url};

fn build_with_s3(
    s3: &S3Server,
    secret: &str,
    workers: &[&str],
    output: &str,
    extra: &[&str],
) -> std::process::Output {
    let endpoint = s3.endpoint();
    let mut args = vec!["build", "--base", base_layout(), "--output", output, "--s3-endpoint", &endpoint];
    for w in workers {
        args.extend(["--worker", w]);
    }
    args.extend(extra);
    workerbundle_env(&args, &s3.env(secret))
}

/// The sample workers in S3 under `acct/<name>/v1/`, and a third worker kept on disk.
fn seeded() -> (S3Server, tempfile::TempDir) {
    let s3 = S3Server::start();
    s3.put_dir("workers", "acct/hello/v1/", &repo_path("testdata/workers/hello"));
    s3.put_dir("workers", "acct/secret/v1/", &repo_path("testdata/workers/secret"));
    let local = tempdir();
    fs::write(
        local.path().join("index.js"),
        "export default { fetch() { return new Response('local'); } };\n",
    )
    .unwrap();
    (s3, local)
}

#[test]
fn s3_workers_build_the_same_image_as_the_same_files_on_disk() {
    let (s3, local) = seeded();
    let work = tempdir();
    let local_worker = format!("local={}", local.path().display());
    let from_s3 = build_with_s3(
        &s3,
        SECRET_KEY,
        &["hello=s3://workers/acct/hello/v1/", "secret=s3://workers/acct/secret/v1/", &local_worker],
        &format!("oci:{}:s3", work.path().join("s3").display()),
        &[],
    );
    assert!(from_s3.status.success(), "{}", String::from_utf8_lossy(&from_s3.stderr));
    let mut dirs = sample_worker_args();
    dirs.extend(["--worker".to_owned(), local_worker.clone()]);
    let from_disk = build(&dirs, &format!("oci:{}:disk", work.path().join("disk").display()));
    assert_eq!(String::from_utf8_lossy(&from_s3.stdout).trim(), from_disk);

    // One object as a whole worker: s3://BUCKET/KEY.
    s3.put(
        "workers",
        "acct/single/index.js",
        b"export default { fetch() { return new Response('one'); } };\n",
    );
    let single = build_with_s3(
        &s3,
        SECRET_KEY,
        &["single=s3://workers/acct/single/index.js"],
        &format!("oci:{}:single", work.path().join("single").display()),
        &[],
    );
    assert!(single.status.success(), "{}", String::from_utf8_lossy(&single.stderr));
}

#[test]
fn s3_errors_name_the_url_and_write_nothing() {
    let (s3, _local) = seeded();
    s3.create_bucket("empty");
    s3.put("workers", "acct/big/index.js", &vec![b'/'; 4096]);
    let work = tempdir();
    let out = work.path().join("out");
    let output = format!("oci:{}:x", out.display());
    struct Case<'a> {
        worker: &'a str,
        secret: &'a str,
        extra: &'a [&'a str],
        expected: &'a str,
    }
    let cases = [
        Case {
            worker: "w=s3://workers/acct/hello/v1/",
            secret: "wrong-secret",
            extra: &[],
            expected: "signature does not match",
        },
        Case {
            worker: "w=s3://no-such-bucket/acct/",
            secret: SECRET_KEY,
            extra: &[],
            expected: "bucket \"no-such-bucket\" does not exist",
        },
        Case {
            worker: "w=s3://workers/acct/nothing-here.js",
            secret: SECRET_KEY,
            extra: &[],
            expected: "no such key",
        },
        Case {
            worker: "w=s3://workers/acct/nobody/",
            secret: SECRET_KEY,
            extra: &[],
            expected: "holds no objects",
        },
        Case {
            worker: "w=s3://workers/acct/big/",
            secret: SECRET_KEY,
            extra: &["--s3-max-object-bytes", "1024"],
            expected: "over the per-object limit of 1024 bytes",
        },
        Case {
            worker: "w=s3://workers/acct/hello/v1/",
            secret: SECRET_KEY,
            extra: &["--s3-max-objects", "2"],
            expected: "more than the limit of 2 objects",
        },
        Case {
            worker: "w=s3://workers/acct/hello/v1/",
            secret: SECRET_KEY,
            extra: &["--s3-max-total-bytes", "100"],
            expected: "add up to more than the limit of 100 bytes",
        },
    ];
    for case in cases {
        let result = build_with_s3(&s3, case.secret, &[case.worker], &output, case.extra);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{} was accepted", case.worker);
        assert!(
            stderr.contains(case.expected),
            "{}: expected {:?} in:\n{stderr}",
            case.worker,
            case.expected
        );
        assert!(stderr.contains("s3://"), "{}: the error names no URL:\n{stderr}", case.worker);
        assert!(
            !stderr.contains("SdkError") && !stderr.contains("DispatchFailure"),
            "raw SDK dump:\n{stderr}"
        );
        assert!(!out.exists(), "{}: output written", case.worker);
    }

    // Nothing listens here.
    let dead = support::registry::free_port();
    let mut args =
        vec!["build", "--base", base_layout(), "--output", &output, "--worker", "w=s3://workers/acct/"];
    let endpoint = format!("http://127.0.0.1:{dead}");
    args.extend(["--s3-endpoint", &endpoint]);
    let result = workerbundle_env(&args, &s3.env(SECRET_KEY));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(stderr.contains("cannot reach the S3 endpoint") && stderr.contains(&endpoint), "{stderr}");
}

#[test]
fn a_thousand_objects_a_paged_listing_and_a_20_mib_object() {
    let s3 = S3Server::start();
    s3.put(
        "workers",
        "acct/many/index.js",
        b"export default { fetch() { return new Response('many'); } };\n",
    );
    for i in 0..1000 {
        s3.put("workers", &format!("acct/many/assets/a{i:04}.txt"), format!("asset {i}\n").as_bytes());
    }
    let big: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
    s3.put("workers", "acct/many/big.bin", &big);

    // Through the library with a small page size: the listing comes in 11 pages.
    let proxy = FaultProxy::start(s3.port, 0, 1);
    for (k, v) in s3.env(SECRET_KEY) {
        std::env::set_var(k, v);
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let options = S3Options {
        endpoint: Some(format!("http://127.0.0.1:{}", proxy.port)),
        page_size: 100,
        ..Default::default()
    };
    let source = runtime.block_on(S3Source::new(options));
    let files = runtime.block_on(source.read(&S3Url::parse("s3://workers/acct/many/").unwrap())).unwrap();
    assert_eq!(files.len(), 1002);
    assert_eq!(files["big.bin"], big);
    assert_eq!(&files["assets/a0999.txt"][..], b"asset 999\n");
    let lists = proxy.seen.lock().unwrap().iter().filter(|l| l.contains("list-type=2")).count();
    assert_eq!(lists, 11, "1002 keys at 100 per page");

    // And through the CLI, into an image.
    let work = tempdir();
    let result = build_with_s3(
        &s3,
        SECRET_KEY,
        &["many=s3://workers/acct/many/"],
        &format!("oci:{}:many", work.path().join("out").display()),
        &[],
    );
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
}

#[test]
fn two_builds_in_one_process_download_each_object_once() {
    let (s3, _local) = seeded();
    let proxy = FaultProxy::start(s3.port, 0, 1);
    for (k, v) in s3.env(SECRET_KEY) {
        std::env::set_var(k, v);
    }
    let work = tempdir();
    let context = BuildContext::new(
        Registries::new(Default::default()),
        S3Options { endpoint: Some(format!("http://127.0.0.1:{}", proxy.port)), ..Default::default() },
    );
    let request = |tag: &str| BuildRequest {
        base: ImageRef::parse(base_layout()).unwrap(),
        base_name: None,
        workers: ["hello=s3://workers/acct/hello/v1/", "secret=s3://workers/acct/secret/v1/"]
            .iter()
            .map(|w| WorkerInput::parse(w).unwrap())
            .collect(),
        output: ImageRef::parse(&format!("oci:{}:{tag}", work.path().join("out").display())).unwrap(),
        source_date_epoch: 0,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let first = runtime.block_on(build_image(&request("one"), &context)).unwrap();
    let second = runtime.block_on(build_image(&request("two"), &context)).unwrap();
    assert_eq!(first.manifest_digest, second.manifest_digest);

    let objects =
        tree(&repo_path("testdata/workers/hello")).len() + tree(&repo_path("testdata/workers/secret")).len();
    let gets: Vec<String> = proxy
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("GET ") && !l.contains("list-type"))
        .cloned()
        .collect();
    assert_eq!(gets.len(), objects, "each object is downloaded exactly once: {gets:#?}");
    let lists = proxy.seen.lock().unwrap().iter().filter(|l| l.contains("list-type=2")).count();
    assert_eq!(lists, 4, "each build lists each prefix (to see changes)");
}

#[test]
fn transient_s3_failures_are_retried() {
    let (s3, _local) = seeded();
    // 30% of requests meet a fault: reset, 500, 503, 429, slow, or cut off mid-answer.
    let proxy = FaultProxy::start(s3.port, 30, 0xfa17);
    let work = tempdir();
    let endpoint = format!("http://127.0.0.1:{}", proxy.port);
    let output = format!("oci:{}:x", work.path().join("out").display());
    let args = [
        "build",
        "--base",
        base_layout(),
        "--output",
        &output,
        "--s3-endpoint",
        &endpoint,
        "--worker",
        "hello=s3://workers/acct/hello/v1/",
        "--worker",
        "secret=s3://workers/acct/secret/v1/",
    ];
    let from_disk = build(&sample_worker_args(), &format!("oci:{}:d", work.path().join("disk").display()));
    // One build reads a handful of objects: build (each a fresh process, so nothing is cached)
    // until every kind of fault has been met, and an object's body has been cut off mid-download
    // (the SDK does not retry that); every build must succeed with the same image.
    let body_cut = || proxy.met("cut", |line| line.starts_with("GET ") && !line.contains("list-type"));
    let mut builds = 0;
    while builds == 0 || ((!proxy.missing_kinds().is_empty() || !body_cut()) && builds < 20) {
        let result = workerbundle_env(&args, &s3.env(SECRET_KEY));
        assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
        assert_eq!(String::from_utf8_lossy(&result.stdout).trim(), from_disk);
        builds += 1;
    }
    eprintln!("faults injected into {builds} builds' S3 reads: {}", proxy.summary());
    assert!(proxy.missing_kinds().is_empty(), "not every kind of fault was met: {}", proxy.summary());
    assert!(body_cut(), "no download was cut off mid-body: {:?}", proxy.injected.lock().unwrap());
}
