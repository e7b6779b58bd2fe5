//! `workerbundle dev` as the tests drive it: the real binary with its own data directory,
//! worker ports and API port, its stdout lines read as a user's scripts read them.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{base_layout, BIN};

pub const WAIT: Duration = Duration::from_secs(120);

pub struct Dev {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::path::PathBuf,
    pub data: std::path::PathBuf,
}

impl Dev {
    pub fn start(dir: &Path) -> Dev {
        let first = super::registry::free_port();
        Dev::start_with(dir, &format!("{first}-{}", first.saturating_add(20)))
    }

    /// `workers`: the `--worker-ports` range.
    pub fn start_with(dir: &Path, workers: &str) -> Dev {
        let data = dir.join("data");
        let stderr = dir.join("dev.log");
        let port = super::registry::free_port();
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next stdout line that `check` accepts.
    pub fn next_line<T>(&mut self, what: &str, check: impl Fn(&str) -> Option<T>) -> T {
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

    pub fn export(&mut self, name: &str) -> String {
        let prefix = format!("export {name}=");
        self.next_line(name, |l| l.strip_prefix(&prefix).map(str::to_owned))
    }

    pub fn serving(&mut self, script: &str) -> String {
        let needle = format!("/{script} on ");
        self.next_line("a serving line", |l| {
            l.starts_with("serving ").then(|| l.split_once(&needle).map(|(_, url)| url.to_owned())).flatten()
        })
    }

    /// The digest the account's layout tags for its bundle.
    pub fn bundle_digest(&self, account: &str) -> String {
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

pub fn get(url: &str) -> Option<String> {
    let out = Command::new("curl").args(["-s", "--max-time", "5", url]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `url` until it answers `expected` (a workerd replaced by the runner takes a moment).
pub fn wait_for_answer(url: &str, expected: &str, dev: &Dev) {
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

pub fn write_project(dir: &Path, version: &str) {
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
pub fn workerds(data: &Path) -> Vec<String> {
    let out = Command::new("ps").args(["-eo", "pid,args"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("workerd") && l.contains(&data.display().to_string()))
        .map(str::to_owned)
        .collect()
}

impl Dev {
    /// Writes worker `name` into `project`, deploys it with wrangler and returns the URL dev serves
    /// it on.
    pub fn deploy(
        &mut self,
        wrangler: &super::wrangler::Wrangler,
        project: &Path,
        name: &str,
        source: &str,
        extra: &str,
    ) -> String {
        write_worker(project, name, source, extra);
        wrangler.ok(project, &["deploy"]);
        self.serving(name)
    }

    /// wrangler pointed at this dev, from the exports it printed.
    pub fn wrangler(&mut self) -> (super::wrangler::Wrangler, String) {
        let api = self.export("CLOUDFLARE_API_BASE_URL");
        let token = self.export("CLOUDFLARE_API_TOKEN");
        let account = self.export("CLOUDFLARE_ACCOUNT_ID");
        (super::wrangler::Wrangler::new(&api, &token, Some(&account)), account)
    }
}

/// A wrangler project in `dir`: worker `name` with `source` as its main module, `extra` appended
/// to wrangler.toml.
pub fn write_worker(dir: &Path, name: &str, source: &str, extra: &str) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("wrangler.toml"),
        format!("name = \"{name}\"\nmain = \"src/index.js\"\ncompatibility_date = \"2024-09-23\"\n{extra}"),
    )
    .unwrap();
    std::fs::write(dir.join("src/index.js"), source).unwrap();
}

/// One HTTP/1.0 GET over a new connection (no client library in the way): the status and body.
pub fn http_get(url: &str, timeout: Duration) -> Result<(u16, String), String> {
    let rest = url.strip_prefix("http://").ok_or("not http")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = std::net::TcpStream::connect(host).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| format!("read: {e}"))?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status =
        answer.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| format!("no status in {answer:?}"))?;
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Polls a URL from a thread every `every` until stopped, expecting `expected` each time.
pub struct Poller {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<PollReport>>,
}

#[derive(Debug, Default)]
pub struct PollReport {
    pub ok: usize,
    /// When (since the start) and why each failed request failed.
    pub failures: Vec<(Duration, String)>,
    /// When requests answered, for measuring an outage.
    pub answered: Vec<Duration>,
}

impl PollReport {
    /// The longest time between two answers (or the start and the first answer).
    pub fn longest_gap(&self) -> Duration {
        let mut last = Duration::ZERO;
        let mut longest = Duration::ZERO;
        for at in &self.answered {
            longest = longest.max(at.saturating_sub(last));
            last = *at;
        }
        longest
    }
}

impl Poller {
    pub fn start(url: &str, expected: &str, every: Duration) -> Poller {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (url, expected, flag) = (url.to_owned(), expected.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut report = PollReport::default();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match http_get(&url, Duration::from_secs(60)) {
                    Ok((200, body)) if body == expected => {
                        report.ok += 1;
                        report.answered.push(started.elapsed());
                    }
                    other => report.failures.push((started.elapsed(), format!("{other:?}"))),
                }
                std::thread::sleep(every);
            }
            report
        });
        Poller { stop, thread: Some(thread) }
    }

    pub fn stop(mut self) -> PollReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().map(|t| t.join().unwrap()).unwrap_or_default()
    }
}

/// The files under `dir`, relative, sorted: what a step left in a store.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(relative) = path.strip_prefix(dir) {
                files.push(relative.display().to_string());
            }
        }
    }
    files.sort();
    files
}
