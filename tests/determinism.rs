//! Same inputs, same bytes: no digest may depend on the host, the time, file metadata or the order
//! in which a directory lists its files; and each change touches exactly the layers it should.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use support::*;

/// Copies a worker directory creating files in reverse order, with other permissions, so the
/// copy differs from the original in everything but names and contents.
fn scrambled_copy(from: &Path, to: &Path) {
    let files = tree(from);
    for (path, content) in files.iter().rev() {
        let dest = to.join(path);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::write(&dest, content).unwrap();
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o600)).unwrap();
    }
    fs::set_permissions(to, fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn two_builds_at_different_times_from_different_places_are_bit_identical() {
    let work = tempdir();
    let first = work.path().join("first");
    let digest1 = build(&sample_worker_args(), &format!("oci:{}:latest", first.display()));

    std::thread::sleep(Duration::from_millis(1100));
    for name in ["hello", "secret"] {
        scrambled_copy(
            &repo_path(&format!("testdata/workers/{name}")),
            &work.path().join("elsewhere").join(name),
        );
    }
    let workers: Vec<String> = ["hello", "secret"]
        .iter()
        .flat_map(|n| {
            ["--worker".to_owned(), format!("{n}={}", work.path().join("elsewhere").join(n).display())]
        })
        .collect();
    let second = work.path().join("second");
    let digest2 = build(&workers, &format!("oci:{}:latest", second.display()));

    assert_eq!(digest1, digest2);
    let (a, b) = (tree(&first), tree(&second));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (path, bytes) in &a {
        assert!(b[path] == *bytes, "{path} differs between the two builds");
    }
}

#[test]
fn base_image_assembly_is_reproducible() {
    let work = tempdir();
    let again = format!("oci:{}:workerd", work.path().join("base").display());
    let digest = workerbundle_ok(&["base-image", "--output", &again]);
    let first = std::process::Command::new("skopeo")
        .args(["inspect", "--format", "{{.Digest}}", base_layout()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&first.stdout).trim(), digest);
}

struct Layers {
    base: Vec<String>,
    hello: String,
    secret: String,
    config: String,
}

fn layers_of(dir: &Path, digest: &str) -> Layers {
    let all = manifest_layers(dir, digest);
    assert_eq!(all.len(), 5);
    Layers { base: all[..2].to_vec(), hello: all[2].clone(), secret: all[3].clone(), config: all[4].clone() }
}

fn workers_in(dir: &Path, secret_port: &str) -> Vec<String> {
    vec![
        "--worker".into(),
        format!("hello={}", dir.join("hello").display()),
        "--worker".into(),
        format!("secret={}{secret_port}", dir.join("secret").display()),
    ]
}

#[test]
fn each_change_touches_exactly_its_layers() {
    let work = tempdir();
    let src = work.path().join("src");
    for name in ["hello", "secret"] {
        copy_dir(&repo_path(&format!("testdata/workers/{name}")), &src.join(name));
    }
    let out = work.path().join("out");
    let build_tag = |tag: &str, port: &str| {
        let digest = build(&workers_in(&src, port), &format!("oci:{}:{tag}", out.display()));
        layers_of(&out, &digest)
    };
    let v1 = build_tag("v1", "");

    // Code of one worker: only that worker's layer.
    let index = src.join("hello/index.js");
    let code = fs::read_to_string(&index).unwrap();
    fs::write(&index, format!("{code}\n// a change\n")).unwrap();
    let code_change = build_tag("code", "");
    assert_eq!(code_change.base, v1.base);
    assert_ne!(code_change.hello, v1.hello, "the changed worker's layer changes");
    assert_eq!(code_change.secret, v1.secret, "the other worker's layer stays");
    assert_eq!(code_change.config, v1.config, "the top-level config layer stays");
    fs::write(&index, code).unwrap();

    // A var: only the top-level config layer.
    let metadata = src.join("secret/metadata.json");
    let original = fs::read_to_string(&metadata).unwrap();
    fs::write(&metadata, original.replace("\"production\"", "\"staging\"")).unwrap();
    let var_change = build_tag("var", "");
    assert_eq!((&var_change.base, &var_change.hello, &var_change.secret), (&v1.base, &v1.hello, &v1.secret));
    assert_ne!(var_change.config, v1.config);
    fs::write(&metadata, original).unwrap();

    // A port: only the top-level config layer.
    let port_change = build_tag("port", "@9000");
    assert_eq!(
        (&port_change.base, &port_change.hello, &port_change.secret),
        (&v1.base, &v1.hello, &v1.secret)
    );
    assert_ne!(port_change.config, v1.config);

    // Back to the start: the very same image.
    let again = build(&workers_in(&src, ""), &format!("oci:{}:again", out.display()));
    assert_eq!(layers_of(&out, &again).config, v1.config);
}
