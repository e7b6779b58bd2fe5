//! End-to-end: the sample workers built into an image that tools nobody here wrote can read and
//! run: umoci unpacks it, workerd serves it from that rootfs, skopeo inspects it.

mod support;

use std::fs;
use std::process::Command;

use support::*;

#[test]
fn workerd_serves_every_worker_from_the_unpacked_rootfs() {
    let work = tempdir();
    // A third worker whose names and values try to break out of their Cap'n Proto literals.
    let hostile = work.path().join("hostile");
    fs::create_dir_all(&hostile).unwrap();
    fs::write(
        hostile.join("metadata.json"),
        serde_json::to_vec(&serde_json::json!({
            "main_module": "index.js",
            "bindings": [
                {"name": "Q\"), (name = \"INJECTED", "type": "plain_text", "text": "x\")]); const evil = (\n\\\"\u{1}"},
                {"name": "J", "type": "json", "json": {"k\"ey": "v\\al\"ue\n"}}
            ]
        }))
        .unwrap(),
    )
    .unwrap();
    fs::write(hostile.join("q\"uote.js"), "export const who = 'module with a quote';\n").unwrap();
    fs::write(
        hostile.join("index.js"),
        "import { who } from './q\"uote.js';\n\
         export default { fetch(req, env) { return Response.json({ who, env: Object.fromEntries(Object.entries(env)) }); } };\n",
    )
    .unwrap();

    let out = work.path().join("image");
    let mut workers = sample_worker_args();
    workers.extend(["--worker".to_owned(), format!("hostile={}", hostile.display())]);
    build(&workers, &format!("oci:{}:latest", out.display()));

    let bundle = umoci_unpack(&out, "latest", work.path());
    let served = serve_from_bundle(&bundle, &[("SECRET_API_KEY", "s3cr3t-from-env")], &[8080, 8081, 8082]);

    let hello: serde_json::Value = serde_json::from_str(&served.bodies[&8080])
        .unwrap_or_else(|e| panic!("hello answered {:?} ({e}); log:\n{}", served.bodies[&8080], served.log));
    assert_eq!(hello["greeting"], "Hello from workerbundle");
    assert_eq!(hello["answer"], 42, "json binding");
    assert_eq!(hello["sum"], 42, "wasm module");
    assert_eq!(hello["banner"], "workerd, one layer per worker", "text module");
    assert_eq!(hello["legacy"], "OK", "CommonJS module");
    assert_eq!(hello["about"], "tags: wasm, multi-module", "nested ES module");

    assert_eq!(served.bodies[&8081], "mode=production key=s3cr3t-from-env\n", "secret from the environment");

    let hostile: serde_json::Value = serde_json::from_str(&served.bodies[&8082]).unwrap();
    assert_eq!(hostile["who"], "module with a quote");
    assert_eq!(
        hostile["env"],
        serde_json::json!({
            "Q\"), (name = \"INJECTED": "x\")]); const evil = (\n\\\"\u{1}",
            "J": {"k\"ey": "v\\al\"ue\n"}
        }),
        "every binding arrives exactly as given, and nothing else does"
    );

    // The secret's value is nowhere in the image.
    for (path, bytes) in tree(&out) {
        assert!(!String::from_utf8_lossy(&bytes).contains("s3cr3t"), "secret value in {path}");
    }
}

#[test]
fn skopeo_shows_entrypoint_ports_and_annotations() {
    let work = tempdir();
    let out = work.path().join("image");
    let reference = format!("oci:{}:v1", out.display());
    let digest = build(&sample_worker_args(), &reference);

    let skopeo = |extra: &[&str]| -> serde_json::Value {
        let output =
            Command::new("skopeo").arg("inspect").args(extra).arg(&reference).output().expect("skopeo");
        assert!(output.status.success(), "skopeo: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let inspect = skopeo(&[]);
    assert_eq!(inspect["Digest"], digest.as_str());
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2 + 2 + 1, "2 base + 2 worker + 1 config layers");

    let config = skopeo(&["--config"]);
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/workerd", "serve", "/etc/workerd/config.capnp"])
    );
    assert_eq!(config["config"]["ExposedPorts"], serde_json::json!({"8080/tcp": {}, "8081/tcp": {}}));
    assert_eq!(config["created"], "1970-01-01T00:00:00Z");

    let raw = skopeo(&["--raw"]);
    let annotations = &raw["annotations"];
    assert_eq!(annotations["org.opencontainers.image.created"], "1970-01-01T00:00:00Z");
    assert_eq!(annotations["org.opencontainers.image.base.name"], "workerd");
    let base_digest =
        Command::new("skopeo").args(["inspect", "--format", "{{.Digest}}", base_layout()]).output().unwrap();
    assert_eq!(
        annotations["org.opencontainers.image.base.digest"],
        String::from_utf8_lossy(&base_digest.stdout).trim()
    );
}

#[test]
fn source_date_epoch_sets_every_timestamp() {
    let work = tempdir();
    let out = work.path().join("image");
    let mut args = vec!["build", "--base", base_layout(), "--output"];
    let reference = format!("oci:{}:t", out.display());
    args.push(&reference);
    let workers = sample_worker_args();
    args.extend(workers.iter().map(String::as_str));
    args.extend(["--source-date-epoch", "1700000000"]);
    let digest = workerbundle_ok(&args);
    let manifest = layout_json(&out, &digest);
    assert_eq!(manifest["annotations"]["org.opencontainers.image.created"], "2023-11-14T22:13:20Z");
    let config = layout_json(&out, manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
}
