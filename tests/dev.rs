//! `workerbundle dev` end to end, as a user meets it: start it, point unmodified wrangler at the
//! exports it prints, deploy, and curl the URL it prints. Then a redeploy changes the answer, a
//! secret's new value changes only the environment (the same image), a rollback brings the first
//! answer back without a build, deleting the script stops it, and SIGINT leaves no process behind.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::wrangler::Wrangler;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

struct Dev {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::path::PathBuf,
    data: std::path::PathBuf,
}

impl Dev {
    fn start(dir: &Path) -> Dev {
        let first = support::registry::free_port();
        Dev::start_with(dir, &format!("{first}-{}", first.saturating_add(20)))
    }

    /// `workers`: the `--worker-ports` range.
    fn start_with(dir: &Path, workers: &str) -> Dev {
        let data = dir.join("data");
        let stderr = dir.join("dev.log");
        let port = support::registry::free_port();
        let mut child = Command::new(BIN)
            .args(["dev", "--data"])
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--base-image", base_layout()])
            .args(["--worker-ports", workers])
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Dev { child, lines, seen: Vec::new(), stderr, data }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next stdout line that `check` accepts.
    fn next_line<T>(&mut self, what: &str, check: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(found) = check(&line) {
                        return found;
                    }
                }
                Err(_) => panic!("no {what} on stdout; saw {:?}\nlog:\n{}", self.seen, self.log()),
            }
        }
    }

    fn export(&mut self, name: &str) -> String {
        let prefix = format!("export {name}=");
        self.next_line(name, |l| l.strip_prefix(&prefix).map(str::to_owned))
    }

    fn serving(&mut self, script: &str) -> String {
        let needle = format!("/{script} on ");
        self.next_line("a serving line", |l| {
            l.starts_with("serving ").then(|| l.split_once(&needle).map(|(_, url)| url.to_owned())).flatten()
        })
    }

    /// The digest the account's layout tags for its bundle.
    fn bundle_digest(&self, account: &str) -> String {
        let index = std::fs::read(self.data.join("images").join(account).join("index.json")).unwrap();
        let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
        let tagged = index["manifests"].as_array().unwrap().iter().find(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"] == format!("workers-{account}").as_str()
        });
        tagged.unwrap()["digest"].as_str().unwrap().to_owned()
    }
}

impl Drop for Dev {
    /// SIGINT first (dev stops its workerds), SIGKILL if it does not stop.
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(url: &str) -> Option<String> {
    let out = Command::new("curl").args(["-s", "--max-time", "5", url]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `url` until it answers `expected` (a workerd replaced by the runner takes a moment).
fn wait_for_answer(url: &str, expected: &str, dev: &Dev) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = get(url);
        if got.as_deref() == Some(expected) {
            return;
        }
        assert!(Instant::now() < deadline, "{url} answered {got:?}, not {expected:?}\nlog:\n{}", dev.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn write_project(dir: &Path, version: &str) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("wrangler.toml"),
        "name = \"hello\"\nmain = \"src/index.js\"\ncompatibility_date = \"2024-09-23\"\n[vars]\nGREETING = \"hi\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("src/index.js"),
        format!(
            "export default {{ async fetch(request, env) {{ return new Response(`${{env.GREETING}} {version} token=${{env.TOKEN}}`); }} }};\n"
        ),
    )
    .unwrap();
}

/// workerd processes started from this data directory.
fn workerds(data: &Path) -> Vec<String> {
    let out = Command::new("ps").args(["-eo", "pid,args"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("workerd") && l.contains(&data.display().to_string()))
        .map(str::to_owned)
        .collect()
}

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
