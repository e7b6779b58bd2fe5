//! The start-up check: workerd loads one worker alone and runs its top-level code, before the
//! worker is stored (the API) or released (the release controller). A worker that throws at
//! start-up, imports a module that is not there, has a syntax error, asks for a compatibility date
//! or flag this workerd does not have, or does not finish starting within the limit, is refused
//! with workerd's own words, so that it never reaches the account's shared workerd, where it
//! would stop every worker of the account.
//!
//! How: the worker's files and a config holding it and a probe service with an empty test go to a
//! scratch directory, and `workerd test CONFIG _probe` runs there (see
//! `image::workerd_config::startup_check_config`). A top-level infinite loop never ends and
//! ignores SIGTERM, so the check kills workerd (SIGKILL) when the limit passes. workerd runs with
//! an empty environment: no secret, nothing of ours, reaches the checked code.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::Semaphore;

use crate::image::workerd_config::{
    module_file, modules_fragment, startup_check_config, worker_dir, CONFIG_PATH, PROBE_SERVICE,
};
use crate::worker::{ServedWorker, Worker};

/// How long a worker may take to start by default. Cloudflare allows 1 s of start-up CPU; this is
/// wall-clock time on a machine that may be busy, so it leaves room.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks that run at once: each is a workerd process of tens of MB.
const CONCURRENT_CHECKS: usize = 4;

/// The most of workerd's output kept as the reason of a refusal.
const MAX_MESSAGE_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The worker's own fault: workerd's words say what to fix.
    #[error("worker {worker:?} cannot start: {message}")]
    Refused { worker: String, message: String },
    #[error("worker {worker:?} did not finish starting within {} ms, and was stopped (a top-level loop, or too much work before the first request)", limit.as_millis())]
    TimedOut { worker: String, limit: Duration },
    /// Ours: the check itself could not run.
    #[error("the start-up check could not run {workerd}: {message}")]
    Unavailable { workerd: PathBuf, message: String },
}

impl StartupError {
    /// Whether the worker is at fault (refuse it), rather than the checker (retry later).
    pub fn is_workers_fault(&self) -> bool {
        !matches!(self, StartupError::Unavailable { .. })
    }
}

/// Runs start-up checks with one workerd binary, a few at a time.
#[derive(Clone, Debug)]
pub struct StartupChecker {
    workerd: PathBuf,
    timeout: Duration,
    permits: Arc<Semaphore>,
}

impl StartupChecker {
    pub fn new(workerd: PathBuf, timeout: Duration) -> StartupChecker {
        StartupChecker { workerd, timeout, permits: Arc::new(Semaphore::new(CONCURRENT_CHECKS)) }
    }

    pub fn workerd(&self) -> &Path {
        &self.workerd
    }

    /// Loads `worker` alone in workerd; `Ok` with the time it took when it starts.
    pub async fn check(&self, worker: &Worker) -> Result<Duration, StartupError> {
        let unavailable =
            |message: String| StartupError::Unavailable { workerd: self.workerd.clone(), message };
        let _permit = self.permits.acquire().await.map_err(|e| unavailable(e.to_string()))?;
        let scratch = tempfile::Builder::new()
            .prefix("workerbundle-check-")
            .tempdir()
            .map_err(|e| unavailable(format!("no scratch directory: {e}")))?;
        let config = write_files(scratch.path(), worker).map_err(|e| unavailable(e.to_string()))?;
        let started = Instant::now();
        let mut child = Command::new(&self.workerd)
            .arg("test")
            .arg(&config)
            .arg(PROBE_SERVICE)
            .env_clear()
            .current_dir(scratch.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| unavailable(e.to_string()))?;
        let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(unavailable("no pipes to workerd".into()));
        };
        let read_output = async {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let _ = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
            out.extend_from_slice(&err);
            out
        };
        let waited =
            tokio::time::timeout(self.timeout, async { tokio::join!(child.wait(), read_output) }).await;
        let name = worker.code.name.clone();
        match waited {
            Err(_) => {
                // SIGKILL: a spinning isolate ignores SIGTERM.
                let _ = child.kill().await;
                Err(StartupError::TimedOut { worker: name, limit: self.timeout })
            }
            Ok((Err(e), _)) => Err(unavailable(e.to_string())),
            Ok((Ok(status), _)) if status.success() => Ok(started.elapsed()),
            Ok((Ok(status), output)) => {
                let message = reason(&String::from_utf8_lossy(&output));
                if message.is_empty() {
                    return Err(unavailable(format!("workerd exited with {status} and said nothing")));
                }
                Err(StartupError::Refused { worker: name, message })
            }
        }
    }
}

/// The worker's modules under `workers/<name>/`, as in its image layer, and the check's config;
/// returns the config's path.
fn write_files(dir: &Path, worker: &Worker) -> std::io::Result<PathBuf> {
    let worker_dir = dir.join(worker_dir(&worker.code.name));
    for module in &worker.code.modules {
        let path = worker_dir.join(module_file(&module.path));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, module.content.read_all()?)?;
    }
    std::fs::write(worker_dir.join("modules.capnp"), modules_fragment(&worker.code))?;
    // The port is never bound: the check's config has no sockets.
    let served = ServedWorker { name: worker.code.name.clone(), port: 0, settings: worker.settings.clone() };
    // Where the image has it: the config finds the worker's fragment by a relative path.
    let config = dir.join(CONFIG_PATH);
    std::fs::write(&config, startup_check_config(&served))?;
    Ok(config)
}

/// What a user needs of workerd's output: its error lines, without the test runner's own lines
/// and native stack addresses, cut to a bounded size.
fn reason(output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .filter(|l| !l.contains("[ TEST ]") && !l.contains("[ PASS ]") && !l.contains("[ FAIL ]"))
        .filter(|l| !l.starts_with("stack: "))
        .collect();
    let mut text = lines.join("\n");
    if text.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(" …");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_keeps_workerds_error_and_drops_runner_noise() {
        let output = "service w: Uncaught Error: top-level boom\n  at m.js:1:7\n\
                      workerd/server/server/run.rs:642: debug: [ TEST ] _probe\nstack: a@1 b@2\n";
        assert_eq!(reason(output), "service w: Uncaught Error: top-level boom\n  at m.js:1:7");
    }

    #[test]
    fn reason_is_bounded_on_a_char_boundary() {
        let text = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = reason(&text);
        assert!(cut.len() <= MAX_MESSAGE_BYTES + " …".len(), "{}", cut.len());
        assert!(cut.ends_with(" …"));
    }
}
