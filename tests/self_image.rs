//! The controller's own image, built by its own builder: reproducible, readable by umoci and
//! skopeo, runnable from its unpacked rootfs as its non-root user, and pushable to a real registry.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};
use support::registry::Registry;
use support::*;

const ENTRYPOINT: [&str; 2] = ["/usr/local/bin/workerbundle", "run"];

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `skopeo inspect --config` of a reference: the image config as skopeo reads it.
fn skopeo_config(reference: &str) -> Value {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--config", reference])
        .output()
        .expect("skopeo is not installed (apt-get install skopeo)");
    assert!(out.status.success(), "skopeo inspect --config {reference}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_controller_config(config: &Value) {
    let process = &config["config"];
    assert_eq!(process["User"], "65532:65532");
    assert_eq!(process["Entrypoint"], json!(ENTRYPOINT));
    assert_eq!(process["WorkingDir"], "/");
    assert!(process["Env"].as_array().unwrap().iter().any(|e| e.as_str().unwrap().starts_with("PATH=")));
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["created"], "1970-01-01T00:00:00Z");
}

/// Runs `args` from an unpacked bundle's rootfs the way a container runtime would, without one:
/// in a private mount namespace, chrooted with /proc and the /dev nodes bind-mounted, as the
/// image's user with only the image's environment.
fn run_in_rootfs(bundle: &Path, args: &[&str]) -> Output {
    let runtime: Value = serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let process = &runtime["process"];
    let (uid, gid) = (process["user"]["uid"].as_u64().unwrap(), process["user"]["gid"].as_u64().unwrap());
    assert_eq!((uid, gid), (65532, 65532), "the image's user");
    let env: Vec<&str> = process["env"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();

    let rootfs = bundle.join("rootfs");
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    fs::create_dir_all(rootfs.join("proc")).unwrap();
    fs::create_dir_all(rootfs.join("dev")).unwrap();
    let mut script = String::from("set -eu\n");
    for dev in ["null", "zero", "random", "urandom"] {
        let node = rootfs.join("dev").join(dev);
        fs::write(&node, b"").unwrap();
        script += &format!("mount --bind /dev/{dev} {}\n", quote(&node.display().to_string()));
    }
    script += &format!("mount -t proc proc {}\n", quote(&rootfs.join("proc").display().to_string()));
    script += &format!(
        "exec env -i {} \"$(command -v chroot)\" --userspec={uid}:{gid} {} {}\n",
        env.iter().map(|e| quote(e)).collect::<Vec<_>>().join(" "),
        quote(&rootfs.display().to_string()),
        args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "),
    );
    Command::new("unshare").args(["--mount", "sh", "-c", &script]).output().unwrap()
}

#[test]
fn the_controller_image_is_reproducible_and_runs_from_its_rootfs_as_its_user() {
    let work = tempdir();
    let (first, second) = (work.path().join("first"), work.path().join("second"));
    let started = std::time::Instant::now();
    let digest = workerbundle_ok(&["self-image", "--output", &format!("oci:{}:test", first.display())]);
    eprintln!("self-image assembled and written in {:?}", started.elapsed());
    let again = workerbundle_ok(&["self-image", "--output", &format!("oci:{}:test", second.display())]);
    assert_eq!(digest, again, "two assemblies of the same binary and archives differ");
    assert_eq!(fs::read(first.join("index.json")).unwrap(), fs::read(second.join("index.json")).unwrap());

    // Three layers (runtime, workerd, binary), the process settings, and the version it is
    // labelled with.
    let manifest = layout_json(&first, &digest);
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 3);
    let annotations = &manifest["annotations"];
    assert_eq!(annotations["org.opencontainers.image.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(annotations["org.opencontainers.image.title"], "workerbundle");
    assert_eq!(annotations["org.opencontainers.image.created"], "1970-01-01T00:00:00Z");
    let config = layout_json(&first, manifest["config"]["digest"].as_str().unwrap());
    assert_controller_config(&config);
    assert_eq!(config["history"].as_array().unwrap().len(), 3);
    assert_controller_config(&skopeo_config(&format!("oci:{}:test", first.display())));

    let bundle = umoci_unpack(&first, "test", work.path());
    let rootfs = bundle.join("rootfs");
    let tmp_mode = fs::metadata(rootfs.join("tmp")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(tmp_mode, 0o1777, "/tmp is writable by the user, sticky");
    let certificates = fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(certificates.matches("BEGIN CERTIFICATE").count() > 100);

    let version = run_in_rootfs(&bundle, &["/usr/local/bin/workerbundle", "--version"]);
    assert!(version.status.success(), "workerbundle --version in the image: {}", stderr(&version));
    assert_eq!(stdout(&version).trim(), format!("workerbundle {}", env!("CARGO_PKG_VERSION")));

    // The workerd of the start-up check, runnable by the image's user.
    let workerd = run_in_rootfs(&bundle, &["/usr/local/bin/workerd", "--version"]);
    assert!(workerd.status.success(), "workerd --version in the image: {}", stderr(&workerd));
    assert!(stdout(&workerd).starts_with("workerd 2026-"), "{}", stdout(&workerd));

    let crd = run_in_rootfs(&bundle, &["/usr/local/bin/workerbundle", "crd"]);
    assert!(crd.status.success(), "workerbundle crd in the image: {}", stderr(&crd));
    assert!(
        stdout(&crd) == fs::read_to_string(repo_path("deploy/crds.yaml")).unwrap(),
        "workerbundle crd in the image prints something else than deploy/crds.yaml"
    );

    // The entrypoint as a Deployment runs it, with flags after it.
    let runtime: Value = serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let mut args: Vec<&str> =
        runtime["process"]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args, ENTRYPOINT);
    args.push("--help");
    let help = run_in_rootfs(&bundle, &args);
    assert!(help.status.success(), "workerbundle run --help in the image: {}", stderr(&help));
    assert!(stdout(&help).contains("--repository-prefix"), "{}", stdout(&help));
}

#[test]
fn pushed_to_a_registry_it_is_the_same_image_and_a_second_tag_sends_only_its_manifest() {
    let registry = Registry::start(false);
    let reference = format!("docker://{}/workerbundle:test", registry.host());
    let digest = workerbundle_ok(&["self-image", "--insecure", "--output", &reference]);

    assert_controller_config(&skopeo_config(&reference));
    let inspected = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}", &reference])
        .output()
        .unwrap();
    assert_eq!(stdout(&inspected).trim(), digest);

    let before = registry.requests().len();
    let second = format!("docker://{}/workerbundle:second", registry.host());
    let out = workerbundle(&["self-image", "--insecure", "--output", &second]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().last(), Some(digest.as_str()));
    let sent: Vec<_> = registry.requests()[before..].to_vec();
    let uploads: Vec<_> = sent.iter().filter(|r| r.method == "POST" || r.method == "PATCH").collect();
    assert!(uploads.is_empty(), "the same image under another tag uploaded blobs: {uploads:?}");
    assert_eq!(sent.iter().filter(|r| r.method == "PUT").count(), 1, "{sent:?}");
}

#[test]
fn an_unusable_output_is_refused_before_anything_is_read() {
    let work = tempdir();
    let missing = work.path().join("no-such-binary").display().to_string();
    let file = work.path().join("a-file");
    fs::write(&file, "not a directory").unwrap();

    // Naming a binary that does not exist shows the output was checked first.
    let under_a_file = format!("oci:{}:t", file.join("layout").display());
    let out = workerbundle(&["self-image", "--binary", &missing, "--output", &under_a_file]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("a-file") && !stderr(&out).contains("no-such-binary"), "{}", stderr(&out));

    let not_a_layout = work.path().join("busy");
    fs::create_dir_all(&not_a_layout).unwrap();
    fs::write(not_a_layout.join("notes.txt"), "mine").unwrap();
    let out = workerbundle(&[
        "self-image",
        "--binary",
        &missing,
        "--output",
        &format!("oci:{}:t", not_a_layout.display()),
    ]);
    assert!(stderr(&out).contains("not an OCI image layout"), "{}", stderr(&out));

    for untagged in [format!("oci:{}", work.path().join("new").display()), "docker://127.0.0.1:5/x".into()] {
        let out = workerbundle(&["self-image", "--binary", &missing, "--output", &untagged]);
        assert!(stderr(&out).contains("must be oci:DIR:TAG or docker://"), "{untagged}: {}", stderr(&out));
    }

    // A binary that cannot run in the image is refused, and nothing is written.
    let script = work.path().join("script");
    fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let target = work.path().join("out");
    let out = workerbundle(&[
        "self-image",
        "--binary",
        &script.display().to_string(),
        "--output",
        &format!("oci:{}:t", target.display()),
    ]);
    assert!(stderr(&out).contains("not an ELF executable"), "{}", stderr(&out));
    assert!(!target.exists());
    assert_eq!(fs::read_dir(work.path()).unwrap().count(), 3, "a staging directory was left behind");
}
