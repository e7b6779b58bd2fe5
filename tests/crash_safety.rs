//! Crash safety: the controller SIGKILLed at random points (seeded; the seed is printed and
//! `WB_CRASH_SEED` replays it) while 50 bundles build and push, restarted each time; then it must
//! converge with nothing lost and nothing left over. The API SIGKILLed in the middle of uploads:
//! no WorkerDeployment may point at a version whose objects are not all there.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::api::{form, ApiServer, BUCKET};
use support::cluster::{Cluster, Controller};
use support::registry::Registry;
use support::s3::S3Server;
use support::workload::container;
use support::*;

const ACCOUNTS: usize = 50;
const CRASHES: usize = 4;
const WAIT: Duration = Duration::from_secs(600);

fn seed() -> u64 {
    let seed =
        std::env::var("WB_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    eprintln!("crash seed: {seed} (WB_CRASH_SEED={seed} replays it)");
    seed
}

fn start_controller(cluster: &Cluster, registry: &Registry, s3: &S3Server) -> Controller {
    let base = format!("docker://{}/workerd-base:1", registry.host());
    // Takeovers are tested in tests/operations.rs; here each restart reconciles at once.
    Controller::start_pushing(cluster, &registry.host(), &base, s3, &["--leader-election", "false"], &[])
}

/// All accounts and their WorkerDeployments, in one kubectl apply.
fn objects_yaml() -> String {
    let mut yaml = String::new();
    for i in 0..ACCOUNTS {
        let account = format!("a{i:03}");
        yaml += &format!(
            "---\napiVersion: workerbundle.dev/v1alpha1\nkind: WorkerAccount\nmetadata:\n  name: {account}\nspec:\n  workerBundleName: workers-{account}\n"
        );
        yaml += &format!(
            "---\napiVersion: workerbundle.dev/v1alpha1\nkind: WorkerDeployment\nmetadata:\n  name: w-{account}\n  labels:\n    workerbundle.dev/account: {account}\nspec:\n  template:\n    scriptName: w-{account}\n    scriptUrls: [\"s3://workers/{account}/index.js\"]\n"
        );
    }
    yaml
}

/// Bundles whose Deployment runs their current image.
fn converged(cluster: &Cluster) -> BTreeMap<String, String> {
    let deployments: BTreeMap<String, Value> = cluster
        .list("deployments", None)
        .into_iter()
        .map(|d| (d["metadata"]["name"].as_str().unwrap().to_owned(), d))
        .collect();
    cluster
        .list("workerbundles", None)
        .into_iter()
        .filter_map(|b| {
            let name = b["metadata"]["name"].as_str()?.to_owned();
            let image = b["status"]["image"].as_str()?.to_owned();
            let runs = deployments.get(&name).and_then(|d| container(d)["image"].as_str().map(str::to_owned));
            (runs.as_deref() == Some(image.as_str())).then_some((name, image))
        })
        .collect()
}

/// Every manifest revision a repository in the registry's storage holds, by repository.
fn stored_manifests(registry: &Registry) -> BTreeMap<String, BTreeSet<String>> {
    let root = registry.storage_dir().join("docker/registry/v2/repositories");
    let mut found = BTreeMap::new();
    for (path, _) in tree(&root) {
        // REPO/_manifests/revisions/sha256/HEX/link
        if let Some((repo, rest)) = path.split_once("/_manifests/revisions/sha256/") {
            if let Some(hex) = rest.strip_suffix("/link") {
                found.entry(repo.to_owned()).or_insert_with(BTreeSet::new).insert(format!("sha256:{hex}"));
            }
        }
    }
    found
}

#[test]
fn the_controller_killed_at_random_points_converges_with_nothing_lost_or_left() {
    let mut rng = fastrand::Rng::with_seed(seed());
    let registry = Registry::start(false);
    registry.push_base();
    let s3 = S3Server::start();
    for i in 0..ACCOUNTS {
        let js = format!("export default {{ fetch() {{ return new Response('account {i}'); }} }};\n");
        s3.put("workers", &format!("a{i:03}/index.js"), js.as_bytes());
    }
    let cluster = Cluster::start("crash");
    let applied = cluster.apply_yaml(&objects_yaml());
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));

    // Kill it while it works: at a random moment of each run, SIGKILL.
    for crash in 0..CRASHES {
        let controller = start_controller(&cluster, &registry, &s3);
        controller.wait_for_log("controllers started", Duration::from_secs(30));
        let delay = Duration::from_millis(rng.u64(200..5000));
        std::thread::sleep(delay);
        let done = converged(&cluster).len();
        controller.kill();
        let pushed = controller.log().matches("image pushed").count();
        eprintln!(
            "crash {crash}: SIGKILL {} ms into leading ({pushed} images pushed in that run; {done}/{ACCOUNTS} bundles running)",
            delay.as_millis()
        );
    }

    // Then it converges.
    let controller = start_controller(&cluster, &registry, &s3);
    let started = Instant::now();
    let images = loop {
        let images = converged(&cluster);
        if images.len() == ACCOUNTS {
            break images;
        }
        assert!(controller.is_running(), "the controller stopped:\n{}", controller.log());
        assert!(
            started.elapsed() < WAIT,
            "{} of {ACCOUNTS} bundles converged:\n{}",
            images.len(),
            controller.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("converged {} ms after the last restart", started.elapsed().as_millis());

    // One release per WorkerDeployment: none duplicated by a repeated reconcile.
    let releases = cluster.list("workerreleases", None);
    let names: Vec<&str> = releases.iter().filter_map(|r| r["metadata"]["name"].as_str()).collect();
    assert_eq!(names.len(), ACCOUNTS, "releases: {names:?}");

    // Every image and every tag is whole: each blob of its manifest is in the repository.
    for (bundle, image) in &images {
        let (repo_and_host, digest) = image.rsplit_once('@').unwrap();
        let repo = repo_and_host.split_once('/').unwrap().1;
        for reference in [digest, bundle.as_str()] {
            let (status, body) = registry.manifest(repo, reference);
            assert_eq!(status, 200, "{repo}:{reference} has no manifest");
            let manifest: Value = serde_json::from_slice(&body).unwrap();
            let blobs = std::iter::once(&manifest["config"]).chain(manifest["layers"].as_array().unwrap());
            for blob in blobs {
                let blob = blob["digest"].as_str().unwrap();
                assert!(registry.blob_exists(repo, blob), "{repo}:{reference} names the missing blob {blob}");
            }
        }
    }

    // No image that no bundle references: every manifest is some bundle's image, last image or
    // a stale image waiting for its rollout (the documented retention).
    let mut referenced = BTreeSet::new();
    for bundle in cluster.list("workerbundles", None) {
        let status = &bundle["status"];
        let names = [&status["image"], &status["lastImage"]]
            .into_iter()
            .chain(status["staleImages"].as_array().into_iter().flatten());
        for image in names.filter_map(Value::as_str) {
            referenced.insert(image.rsplit_once('@').unwrap().1.to_owned());
        }
    }
    let base_repo = "workerd-base";
    for (repo, manifests) in stored_manifests(&registry) {
        if repo == base_repo {
            continue;
        }
        for digest in manifests {
            assert!(referenced.contains(&digest), "{repo}@{digest} is referenced by no bundle");
        }
    }
}

#[test]
fn the_api_killed_mid_upload_leaves_no_deployment_on_a_partial_version() {
    let mut rng = fastrand::Rng::with_seed(seed());
    let s3 = S3Server::start();
    let cluster = Cluster::start("api-crash");
    let token = "token-of-account-1234-crash-4b1d";
    let files = tempdir();
    // Many modules of some size, so that a kill lands between the first object and the apply.
    let big = "x".repeat(200 << 10);
    let mut modules: Vec<(String, Vec<u8>)> = vec![(
        "index.js".into(),
        b"import './m0.txt'; export default { fetch() { return new Response('ok'); } };".to_vec(),
    )];
    for i in 0..12 {
        modules.push((format!("m{i}.txt"), format!("{i}{big}").into_bytes()));
    }
    let meta = r#"{"main_module":"index.js","compatibility_date":"2024-09-23"}"#;
    let parts: Vec<(&str, &str, &[u8])> = modules
        .iter()
        .map(|(n, b)| {
            (
                n.as_str(),
                if n.ends_with(".js") { "application/javascript+module" } else { "text/plain" },
                b.as_slice(),
            )
        })
        .collect();
    let body = form(files.path(), meta, &parts);

    // The kills must land before, during and after the uploads. How long three concurrent
    // uploads to a fresh API take depends on what else loads the machine (in CI, the other test
    // of this file), so the window is measured the same way, then widened while every upload is
    // cut and narrowed while none is, for as long as the one outcome or the other is missing.
    let mut kill_within = {
        let api = ApiServer::start(&cluster, &s3, &[("1234", token)], &[]);
        let started = Instant::now();
        for code in upload_three(&api, token, "warm", &body).into_iter().map(finished) {
            assert_eq!(code, "200", "a warm-up upload failed");
        }
        (started.elapsed().as_millis() as u64 * 2).max(100)
    };
    let (mut completed, mut cut, mut rounds) = (0, 0, 0);
    while rounds < 10 || (rounds < 30 && (completed == 0 || cut == 0)) {
        let api = ApiServer::start(&cluster, &s3, &[("1234", token)], &[]);
        let uploads = upload_three(&api, token, &format!("w{}", rounds % 3), &body);
        let delay = rng.u64(0..=kill_within);
        std::thread::sleep(Duration::from_millis(delay));
        api.kill();
        let codes: Vec<String> = uploads.into_iter().map(finished).collect();
        let done = codes.iter().filter(|code| *code == "200").count();
        eprintln!("round {rounds}: SIGKILL after {delay} of {kill_within} ms, {done} of 3 uploads completed");
        completed += done;
        cut += codes.len() - done;
        rounds += 1;
        // Only a late kill that cut everything says the window is short, and only an early kill
        // that cut nothing says it is long.
        let late = delay > kill_within / 2;
        if completed == 0 && done == 0 && late {
            kill_within += kill_within / 2;
        } else if cut == 0 && done == codes.len() && !late {
            kill_within = (kill_within * 2 / 3).max(1);
        }
    }
    eprintln!("{rounds} kills: {completed} uploads completed before them, {cut} cut off");
    // Both must have happened, or the kills tested nothing.
    assert!(completed > 0 && cut > 0, "completed {completed}, cut {cut}: change the delays");

    // Whatever the API managed to apply points at a version with its metadata and every module
    // that metadata and the upload named.
    let objects = s3.objects(BUCKET);
    let deployments = cluster.list("workerdeployments", None);
    let versions: BTreeSet<&str> =
        objects.keys().filter_map(|k| k.rsplit_once('/').map(|(prefix, _)| prefix)).collect();
    let whole = versions.iter().filter(|v| objects.contains_key(&format!("{v}/metadata.json"))).count();
    eprintln!("S3: {} versions begun, {whole} with their metadata", versions.len());
    for deployment in &deployments {
        let url = deployment["spec"]["template"]["scriptUrls"][0].as_str().unwrap();
        let prefix = url.strip_prefix(&format!("s3://{BUCKET}/")).unwrap();
        for (name, _) in &modules {
            assert!(objects.contains_key(&format!("{prefix}{name}")), "{url} lacks {name}");
        }
        assert!(objects.contains_key(&format!("{prefix}metadata.json")), "{url} lacks its metadata");
    }
    eprintln!("{} WorkerDeployments, all on whole versions", deployments.len());
}

/// Three concurrent uploads of `body` as the script `name`, each by its own curl.
fn upload_three(api: &ApiServer, token: &str, name: &str, body: &[String]) -> Vec<std::process::Child> {
    let script = format!("{}/accounts/1234/workers/scripts/{name}", api.url);
    (0..3)
        .map(|_| {
            Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", "-H"])
                .arg(format!("Authorization: Bearer {token}"))
                .args(body.iter().flat_map(|field| ["-F", field.as_str()]))
                .arg(&script)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// The HTTP status curl printed, or what it printed instead when the connection was cut.
fn finished(upload: std::process::Child) -> String {
    String::from_utf8_lossy(&upload.wait_with_output().unwrap().stdout).into_owned()
}
