//! Bad input gets a clear error, a non-zero exit, and writes nothing.

mod support;

use std::fs;
use std::path::Path;

use support::*;

/// Builds with `workers` (as `--worker` values) and asserts failure with `expected` in stderr and
/// no output directory.
fn refused(base: &str, workers: &[String], expected: &str) {
    let work = tempdir();
    let out = work.path().join("out");
    let reference = format!("oci:{}:latest", out.display());
    let mut args = vec!["build", "--base", base, "--output", &reference];
    for w in workers {
        args.extend(["--worker", w.as_str()]);
    }
    let output = workerbundle(&args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{workers:?} was accepted");
    assert!(stderr.contains(expected), "{workers:?}: expected {expected:?} in:\n{stderr}");
    assert!(!out.exists(), "{workers:?}: the output directory was written");
    let leftovers: Vec<_> = fs::read_dir(work.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "{workers:?}: left {leftovers:?}");
}

fn worker_dir(root: &Path, name: &str, files: &[(&str, &str)]) -> String {
    let dir = root.join(name);
    for (path, content) in files {
        fs::create_dir_all(dir.join(path).parent().unwrap()).unwrap();
        fs::write(dir.join(path), content).unwrap();
    }
    format!("{name}={}", dir.display())
}

#[test]
fn bad_workers_are_refused_before_anything_is_written() {
    let inputs = tempdir();
    let root = inputs.path();
    let good = worker_dir(root, "good", &[("index.js", "export default {}")]);
    let base = base_layout();

    let no_main =
        worker_dir(root, "nomain", &[("metadata.json", r#"{"main_module":"app.js"}"#), ("util.js", "")]);
    refused(base, &[no_main], "main module \"app.js\" is missing");
    let dotdot = worker_dir(
        root,
        "dotdot",
        &[("metadata.json", r#"{"main_module":"../../etc/x.js"}"#), ("index.js", "")],
    );
    refused(base, &[dotdot], "contains '..'");
    let absolute = worker_dir(
        root,
        "absolute",
        &[("metadata.json", r#"{"main_module":"/etc/passwd"}"#), ("index.js", "")],
    );
    refused(base, &[absolute], "is absolute");
    let bad_json = worker_dir(root, "badjson", &[("metadata.json", "{\"main_module\": "), ("index.js", "")]);
    refused(base, &[bad_json], "metadata.json is not valid");
    refused(
        base,
        &[format!("{good}@8080"), format!("other={}@8080", root.join("good").display())],
        "both use port 8080",
    );
    refused(base, &[format!("{good}@70000")], "outside 1-65535");
    refused(base, &[format!("{good}@0")], "outside 1-65535");
    refused(base, &[format!("Bad_Name={}", root.join("good").display())], "not a DNS-1123 label");
    refused(base, &[format!("missing={}", root.join("nope").display())], "cannot read worker directory");

    refused(
        &format!("oci:{}:workerd", root.join("no-such-layout").display()),
        std::slice::from_ref(&good),
        "oci-layout",
    );
    let not_layout = root.join("not-a-layout");
    fs::create_dir_all(&not_layout).unwrap();
    fs::write(not_layout.join("index.json"), "{}").unwrap();
    refused(&format!("oci:{}", not_layout.display()), std::slice::from_ref(&good), "oci-layout");
    let base_dir = base.strip_prefix("oci:").unwrap().rsplit_once(':').unwrap().0;
    refused(&format!("oci:{base_dir}:no-such-tag"), &[good], "has no image tagged \"no-such-tag\"");
}

#[test]
fn a_failed_build_leaves_an_existing_layout_untouched() {
    let work = tempdir();
    let out = work.path().join("out");
    let reference = format!("oci:{}:latest", out.display());
    build(&sample_worker_args(), &reference);
    let before = tree(&out);

    let broken = worker_dir(work.path(), "broken", &[("metadata.json", "not json"), ("index.js", "")]);
    let output =
        workerbundle(&["build", "--base", base_layout(), "--output", &reference, "--worker", &broken]);
    assert!(!output.status.success());
    assert_eq!(tree(&out), before, "the layout changed although the build failed");
}

#[test]
fn an_output_directory_that_is_not_a_layout_is_refused() {
    let work = tempdir();
    let out = work.path().join("out");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("precious.txt"), "keep me").unwrap();
    let reference = format!("oci:{}:latest", out.display());
    let mut args = vec!["build", "--base", base_layout(), "--output", &reference];
    let workers = sample_worker_args();
    args.extend(workers.iter().map(String::as_str));
    let output = workerbundle(&args);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not an OCI image layout"));
    assert_eq!(fs::read_dir(&out).unwrap().count(), 1);
}

#[test]
fn an_output_under_a_file_names_the_file() {
    let work = tempdir();
    let file = work.path().join("hostname");
    fs::write(&file, "a file, not a directory").unwrap();
    let reference = format!("oci:{}:t", file.join("out").display());
    let mut args = vec!["build", "--base", base_layout(), "--output", &reference];
    let workers = sample_worker_args();
    args.extend(workers.iter().map(String::as_str));
    let output = workerbundle(&args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    let expected = format!(
        "cannot create the OCI layout directory {}: {} is a file, not a directory",
        file.join("out").display(),
        file.display()
    );
    assert!(stderr.contains(&expected), "expected {expected:?} in:\n{stderr}");
    assert_eq!(fs::read_to_string(&file).unwrap(), "a file, not a directory");
    assert_eq!(fs::read_dir(work.path()).unwrap().count(), 1, "something was left beside the file");
}

#[test]
fn base_image_refuses_an_unusable_output_before_assembling() {
    let work = tempdir();
    let file = work.path().join("hostname");
    fs::write(&file, "a file").unwrap();
    let not_layout = work.path().join("not-a-layout");
    fs::create_dir_all(&not_layout).unwrap();
    fs::write(not_layout.join("precious.txt"), "keep me").unwrap();
    let cases = [
        (file.join("out"), format!("{} is a file, not a directory", file.display())),
        (not_layout.clone(), "is not an OCI image layout".to_owned()),
    ];
    let info = [("RUST_LOG".to_owned(), "info".to_owned())];
    for (dir, expected) in &cases {
        let reference = format!("oci:{}:workerd", dir.display());
        // With the real archives: no layer may be assembled before the output is refused.
        let output = workerbundle_env(&["base-image", "--output", &reference], &info);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{reference} was accepted");
        assert!(stderr.contains(expected.as_str()), "expected {expected:?} in:\n{stderr}");
        assert!(!stderr.contains("base layer assembled"), "assembled before checking the output:\n{stderr}");
        // With no archives at all, the output is still what is reported: it is checked first.
        let empty = work.path().join("no-archives");
        fs::create_dir_all(&empty).unwrap();
        let archives = empty.display().to_string();
        let output =
            workerbundle_env(&["base-image", "--output", &reference, "--archives", &archives], &info);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains(expected.as_str()), "expected {expected:?} in:\n{stderr}");
    }
    assert_eq!(fs::read_to_string(&file).unwrap(), "a file");
    assert_eq!(fs::read_dir(&not_layout).unwrap().count(), 1, "the directory that is not a layout changed");
    let left: Vec<_> = fs::read_dir(work.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 3, "staging left behind: {left:?}");
}
