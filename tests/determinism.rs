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

/// The block cache of `build` may only spare work: with it empty, full, or off, and with it
/// unusable, the same inputs give the same image; a change to a small module after a big one
/// deflates none of the big one's blocks again.
#[test]
fn the_block_cache_changes_no_byte_and_spares_unchanged_blocks_their_deflate() {
    let work = tempdir();
    let src = work.path().join("big");
    fs::create_dir_all(&src).unwrap();
    // 1 MiB of JavaScript-like text: two whole 512 KiB blocks, ahead of index.js in the tar.
    let mut big = String::new();
    let mut i = 0u64;
    while big.len() < 1 << 20 {
        i += 1;
        big.push_str(&format!("export const v{i:x} = \"{:x}\";\n", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    }
    big.truncate(1 << 20);
    fs::write(src.join("big.js"), big).unwrap();
    let index = src.join("index.js");
    fs::write(&index, "export default { fetch() { return new Response('v1'); } };\n").unwrap();

    let cache = work.path().join("cache").display().to_string();
    let build_with = |cache_args: &[&str], tag: &str| {
        let mut args = vec!["build", "--base", base_layout(), "--worker"];
        let worker = format!("big={}", src.display());
        let output = format!("oci:{}:{tag}", work.path().join(tag).display());
        args.extend([worker.as_str(), "--output", output.as_str()]);
        args.extend(cache_args);
        let out = workerbundle_env(&args, &[("RUST_LOG".into(), "warn,workerbundle::build=debug".into())]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "build {cache_args:?} failed:\n{stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        (stdout.lines().last().unwrap_or_default().to_owned(), stderr)
    };
    let cached = ["--cache-dir", cache.as_str()];

    let (empty, log) = build_with(&cached, "empty");
    assert!(log.contains("found=0 deflated=2 unhashed=0"), "the first build must fill the cache:\n{log}");
    let entries =
        fs::read_dir(&cache).unwrap().filter(|e| e.as_ref().unwrap().file_name().len() == 64).count();
    assert_eq!(entries, 4, "one entry per whole block, and the hasher states after each");
    let (full, log) = build_with(&cached, "full");
    assert!(
        log.contains("found=2 deflated=0 unhashed=2"),
        "the second build must find both blocks, and hash neither again:\n{log}"
    );
    let (off, _) = build_with(&["--no-cache"], "off");
    assert_eq!(empty, full);
    assert_eq!(empty, off);

    fs::write(&index, "export default { fetch() { return new Response('v2'); } };\n").unwrap();
    let (changed, log) = build_with(&cached, "changed");
    assert!(
        log.contains("found=2 deflated=0 unhashed=2"),
        "a change after the big module deflates and hashes none of it:\n{log}"
    );
    let (changed_off, _) = build_with(&["--no-cache"], "changed-off");
    assert_eq!(changed, changed_off);
    assert_ne!(changed, empty);

    // A cache that cannot be made is a warning, not a failed build.
    let not_a_dir = work.path().join("file");
    fs::write(&not_a_dir, "").unwrap();
    let (unusable, log) = build_with(&["--cache-dir", &not_a_dir.display().to_string()], "unusable");
    assert_eq!(unusable, changed);
    assert!(log.contains("building without it"), "{log}");
}
