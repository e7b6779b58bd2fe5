//! One workerd process of `workerbundle dev`: started on ports of its own (every socket on
//! `127.0.0.1:0`), ready when workerd has reported every socket on its control descriptor (it
//! does so only after loading every worker; a TCP connect proves nothing, workerd accepts before
//! loading) and its health socket answers. Its output becomes log lines that say which account,
//! image and worker they come from; the last lines are kept for the error that reports its end.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::image::workerd_config::{HEALTH_SOCKET, LOG_NONCE_VARIABLE};

/// Lines of workerd's output kept for the report of its end.
const KEPT_LINES: usize = 20;

/// Who a workerd's lines are about.
#[derive(Clone, Debug)]
pub struct LogContext {
    pub account: String,
    /// The image it runs, short (`sha256:0123456789ab`).
    pub version: String,
    /// Lines of the platform's log service start with it (see `workerd_config::LOGS_SERVICE`).
    pub nonce: String,
}

/// What to start.
#[derive(Debug)]
pub struct Launch {
    pub workerd: PathBuf,
    pub config: PathBuf,
    /// The working directory: the unpacked root filesystem.
    pub rootfs: PathBuf,
    /// The workers' socket names (the health socket is added).
    pub workers: Vec<String>,
    /// The environment a pod would get (the image's, then the Deployment's).
    pub env: Vec<(String, String)>,
    pub log: LogContext,
}

/// The last lines a workerd wrote.
#[derive(Clone, Debug, Default)]
pub struct LastLines(Arc<Mutex<VecDeque<String>>>);

impl LastLines {
    fn push(&self, line: String) {
        if let Ok(mut lines) = self.0.lock() {
            if lines.len() == KEPT_LINES {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }

    pub fn text(&self) -> String {
        self.0.lock().map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default()
    }
}

/// A running workerd.
#[derive(Debug)]
pub struct Instance {
    /// Socket name → the port it listens on.
    pub ports: BTreeMap<String, u16>,
    pub last_lines: LastLines,
    signals: mpsc::UnboundedSender<i32>,
    exit: watch::Receiver<Option<String>>,
}

impl Instance {
    pub fn health_port(&self) -> Option<u16> {
        self.ports.get(HEALTH_SOCKET).copied()
    }

    /// How it ended, once it has.
    pub fn exit(&self) -> watch::Receiver<Option<String>> {
        self.exit.clone()
    }

    /// SIGTERM, then SIGKILL after `grace` (a spinning isolate ignores SIGTERM); returns once it
    /// has exited.
    pub async fn stop(&self, grace: Duration) {
        let mut exit = self.exit.clone();
        let _ = self.signals.send(libc::SIGTERM);
        if tokio::time::timeout(grace, exit.wait_for(Option::is_some)).await.is_err() {
            let _ = self.signals.send(libc::SIGKILL);
            let _ = exit.wait_for(Option::is_some).await;
        }
    }

    pub fn kill(&self) {
        let _ = self.signals.send(libc::SIGKILL);
    }
}

/// Why a workerd did not become ready (it is stopped by then).
#[derive(Debug)]
pub struct StartFailed {
    pub reason: String,
    pub last_lines: String,
}

/// Starts workerd and waits (up to `timeout`) until every worker serves.
pub async fn start(launch: &Launch, timeout: Duration) -> Result<Instance, StartFailed> {
    let fail = |reason: String| StartFailed { reason, last_lines: String::new() };
    let (ours, theirs) = StdUnixStream::pair().map_err(|e| fail(format!("no control socket: {e}")))?;
    let mut sockets = launch.workers.clone();
    sockets.push(HEALTH_SOCKET.to_owned());
    let mut command = Command::new(&launch.workerd);
    command.arg("serve").arg(&launch.config).arg("--control-fd=3");
    for socket in &sockets {
        command.arg("--socket-addr").arg(format!("{socket}=127.0.0.1:0"));
    }
    command
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .env(LOG_NONCE_VARIABLE, &launch.log.nonce)
        .current_dir(&launch.rootfs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let control_fd = theirs.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, prctl), on this child's
    // own descriptors.
    unsafe {
        command.pre_exec(move || {
            // dup2 gives the copy no close-on-exec flag: workerd inherits it as descriptor 3.
            // Already 3, dup2 would do nothing: clear the flag instead.
            let inherited =
                if control_fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(control_fd, 3) };
            if inherited < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // When dev dies, even by SIGKILL, the kernel ends workerd too.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child =
        command.spawn().map_err(|e| fail(format!("cannot start {}: {e}", launch.workerd.display())))?;
    drop(theirs);
    let last_lines = LastLines::default();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(relay(BufReader::new(out), launch.log.clone(), last_lines.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(relay(BufReader::new(err), launch.log.clone(), last_lines.clone()));
    }
    let (signals, mut signal_rx) = mpsc::unbounded_channel::<i32>();
    let (exit_tx, exit) = watch::channel(None);
    // The child is waited for here only, so its pid is never signalled after it was reaped.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                status = child.wait() => {
                    let text = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    let _ = exit_tx.send(Some(text));
                    break;
                }
                Some(signal) = signal_rx.recv() => {
                    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                        // SAFETY: kill(2) on our own child, not yet reaped.
                        unsafe { libc::kill(pid, signal) };
                    }
                }
            }
        }
    });
    let instance = Instance { ports: BTreeMap::new(), last_lines, signals, exit };
    match tokio::time::timeout(timeout, ready(ours, &sockets, &instance)).await {
        Ok(Ok(ports)) => Ok(Instance { ports, ..instance }),
        Ok(Err(reason)) => Err(stopped(&instance, reason).await),
        Err(_) => Err(stopped(&instance, format!("not ready within {} s", timeout.as_secs())).await),
    }
}

async fn stopped(instance: &Instance, reason: String) -> StartFailed {
    instance.stop(Duration::from_secs(2)).await;
    // The output relays may still be writing the last lines.
    tokio::time::sleep(Duration::from_millis(50)).await;
    StartFailed { reason, last_lines: instance.last_lines.text() }
}

/// The port of every socket, from the control descriptor; then the health socket answers.
async fn ready(
    control: StdUnixStream,
    sockets: &[String],
    instance: &Instance,
) -> Result<BTreeMap<String, u16>, String> {
    control.set_nonblocking(true).map_err(|e| e.to_string())?;
    let control = tokio::net::UnixStream::from_std(control).map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(control).lines();
    let mut ports = BTreeMap::new();
    while ports.len() < sockets.len() {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => {
                let mut exit = instance.exit();
                let status = exit.wait_for(Option::is_some).await.ok().and_then(|s| s.clone());
                return Err(format!("workerd exited ({}) before serving", status.unwrap_or_default()));
            }
        };
        let event: Value = serde_json::from_str(&line).unwrap_or_default();
        if event["event"] == "listen" {
            if let (Some(socket), Some(port)) = (event["socket"].as_str(), event["port"].as_u64()) {
                if let Ok(port) = u16::try_from(port) {
                    ports.insert(socket.to_owned(), port);
                }
            }
        }
    }
    let health = ports.get(HEALTH_SOCKET).copied().ok_or("no health socket")?;
    while !healthy(health, Duration::from_secs(1)).await {
        if instance.exit.borrow().is_some() {
            return Err("workerd exited before its health socket answered".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(ports)
}

/// Whether the health socket answers 200 within `timeout`.
pub async fn healthy(port: u16, timeout: Duration) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: health\r\n\r\n").await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.") && &head[9..12] == b"200")
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(true)))
}

/// Logs each line of workerd's output with the account and image it comes from: the platform
/// log service's events with their worker, workerd's own lines at their level, and drops the
/// unattributed copies of the workers' `console` lines (the log service carries them).
async fn relay<R: tokio::io::AsyncBufRead + Unpin>(reader: R, log: LogContext, last_lines: LastLines) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(kept) = log_line(&line, &log) {
            last_lines.push(kept);
        }
    }
}

/// Logs one line; returns what to keep of it for the report of the process's end.
fn log_line(line: &str, log: &LogContext) -> Option<String> {
    let account = log.account.as_str();
    let version = log.version.as_str();
    let Ok(entry) = serde_json::from_str::<Value>(line) else {
        // Not workerd's structured log (a crash before logging started): as it is.
        warn!(%account, %version, "workerd: {line}");
        return Some(line.to_owned());
    };
    let message = entry["message"].as_str().unwrap_or_default();
    let level = entry["level"].as_str().unwrap_or("info");
    if let Some(event) = message.strip_prefix(log.nonce.as_str()).filter(|_| !log.nonce.is_empty()) {
        worker_event(event, log);
        return None;
    }
    // No source: a worker's own console line, whose attributed copy comes from the log service.
    entry.get("source")?;
    match level {
        // A request's uncaught exception: the log service reports it with its worker and stack.
        "error" if message.starts_with("Uncaught exception") => {
            debug!(%account, %version, "workerd: {message}")
        }
        "error" | "fatal" => error!(%account, %version, "workerd: {message}"),
        "warning" | "warn" => warn!(%account, %version, "workerd: {message}"),
        "info" | "log" => info!(%account, %version, "workerd: {message}"),
        _ => debug!(%account, %version, "workerd: {message}"),
    }
    Some(message.to_owned())
}

/// One event of the log service: a worker's console lines and uncaught exceptions.
fn worker_event(event: &str, log: &LogContext) {
    let account = log.account.as_str();
    let version = log.version.as_str();
    let Ok(event) = serde_json::from_str::<Value>(event) else { return };
    let worker = event["worker"].as_str().unwrap_or("?");
    for entry in event["logs"].as_array().into_iter().flatten() {
        let text: Vec<String> = entry["message"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|part| part.as_str().map(str::to_owned).unwrap_or_else(|| part.to_string()))
            .collect();
        let text = text.join(" ");
        match entry["level"].as_str().unwrap_or("log") {
            "error" => error!(%account, %worker, %version, "console.error: {text}"),
            "warn" => warn!(%account, %worker, %version, "console.warn: {text}"),
            "debug" => debug!(%account, %worker, %version, "console.debug: {text}"),
            _ => info!(%account, %worker, %version, "console.log: {text}"),
        }
    }
    for exception in event["exceptions"].as_array().into_iter().flatten() {
        let name = exception["name"].as_str().unwrap_or("Error");
        let message = exception["message"].as_str().unwrap_or_default();
        let stack = exception["stack"].as_str().unwrap_or_default();
        error!(%account, %worker, %version, "uncaught {name}: {message}\n{stack}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> LogContext {
        LogContext { account: "acct".into(), version: "sha256:0123".into(), nonce: "n0nce".into() }
    }

    #[test]
    fn console_copies_are_dropped_and_workerd_lines_kept() {
        let log = context();
        assert_eq!(log_line(r#"{"timestamp":1,"level":"log","message":"hello from a"}"#, &log), None);
        let event = r#"{"timestamp":1,"level":"log","message":"n0nce{\"worker\":\"a\",\"logs\":[],\"exceptions\":[]}"}"#;
        assert_eq!(log_line(event, &log), None);
        let own = r#"{"timestamp":"1","level":"error","source":"entry.rs:170","message":"service a: Uncaught Error: top boom\n  at a.js:1:7"}"#;
        assert_eq!(
            log_line(own, &log).as_deref(),
            Some("service a: Uncaught Error: top boom\n  at a.js:1:7")
        );
        assert_eq!(log_line("not json", &log).as_deref(), Some("not json"));
    }

    #[test]
    fn a_forged_event_without_the_nonce_is_a_dropped_console_line() {
        let forged = r#"{"timestamp":1,"level":"log","message":"{\"worker\":\"sibling\",\"logs\":[]}"}"#;
        assert_eq!(log_line(forged, &context()), None);
    }
}
