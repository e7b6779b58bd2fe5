//! A Kubernetes API for end-to-end tests: the cluster KUBECONFIG points at when it is set (each
//! test gets its own namespace there), else the in-memory API server (crates/memory-apiserver)
//! on 127.0.0.1. Tests talk to it with the real kubectl and run the real controller binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use memory_apiserver::MemoryApiServer;
use serde_json::Value;

pub struct Cluster {
    pub namespace: String,
    kubeconfig: PathBuf,
    cache: tempfile::TempDir,
    server: Option<MemoryApiServer>,
    /// How to start the in-memory server again, on the same address with the same objects.
    restart: Option<memory_apiserver::Options>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Connects to KUBECONFIG's cluster, else starts an in-memory API server; creates a fresh
    /// namespace named after the test and installs the CRDs.
    pub fn start(test: &str) -> Cluster {
        Self::start_with(test, false)
    }

    /// `start`, with an in-memory server that keeps its objects in a file, so that
    /// [`Cluster::restart_server`] can stop it and start it again. Not for KUBECONFIG's cluster:
    /// `None` then.
    pub fn start_restartable(test: &str) -> Option<Cluster> {
        let in_memory = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()).is_none();
        in_memory.then(|| Self::start_with(test, true))
    }

    fn start_with(test: &str, restartable: bool) -> Cluster {
        let dir = super::tempdir();
        let cache = super::tempdir();
        let namespace = format!("wb-{test}-{:x}", fastrand::u32(..));
        let (kubeconfig, server, restart) = match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
            Some(path) => (PathBuf::from(path), None, None),
            None => {
                let mut options = memory_apiserver::Options::default();
                if restartable {
                    options.data_file = Some(dir.path().join("objects.json"));
                }
                let server = MemoryApiServer::start_with(options.clone()).expect("in-memory API server");
                let path = dir.path().join("kubeconfig");
                server.write_kubeconfig(&path, &namespace).unwrap();
                options.listen = server.url().trim_start_matches("http://").parse().unwrap();
                (path, Some(server), restartable.then_some(options))
            }
        };
        let cluster = Cluster { namespace, kubeconfig, cache, server, restart, _dir: dir };
        // From YAML rather than `kubectl create namespace`, which sends protobuf: the in-memory
        // server speaks JSON only.
        let namespace =
            format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n", cluster.namespace);
        let out = cluster.kubectl_stdin(&["apply", "-f", "-"], Some(&namespace));
        assert!(
            out.status.success(),
            "cannot create the namespace:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.kubectl_ok(&["apply", "-f", &super::repo_path("deploy/crds.yaml").to_string_lossy()]);
        cluster
    }

    /// Stops the in-memory server (every connection and watch drops), runs `while_down`, then
    /// starts it again on the same address with the objects it had.
    pub fn restart_server<T>(&mut self, while_down: impl FnOnce() -> T) -> T {
        let options = self.restart.clone().expect("started with start_restartable");
        drop(self.server.take());
        let result = while_down();
        self.server = Some(MemoryApiServer::start_with(options).expect("the in-memory API server again"));
        result
    }

    /// Requests the in-memory API server has served, by (verb, resource); `None` against a real
    /// cluster.
    pub fn requests(&self) -> Option<memory_apiserver::RequestCounts> {
        self.server.as_ref().map(MemoryApiServer::requests)
    }

    /// `http://127.0.0.1:PORT` of the in-memory API server; `None` against a real cluster.
    pub fn url(&self) -> Option<String> {
        self.server.as_ref().map(MemoryApiServer::url)
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Runs kubectl against this cluster, in the test's namespace unless the args name one.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = Command::new("kubectl");
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--namespace", &self.namespace])
            .args(args)
            .env("KUBECACHEDIR", self.cache.path())
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("kubectl is not installed");
        if let Some(text) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(out.status.success(), "kubectl {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn apply_yaml(&self, yaml: &str) -> Output {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml))
    }

    /// The object as JSON, or None when it does not exist.
    pub fn get(&self, kind: &str, name: &str) -> Option<Value> {
        let out = self.kubectl(&["get", kind, name, "-o", "json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn list(&self, kind: &str, selector: Option<&str>) -> Vec<Value> {
        let mut args = vec!["get", kind, "-o", "json"];
        if let Some(selector) = selector {
            args.extend(["-l", selector]);
        }
        let list: Value = serde_json::from_str(&self.kubectl_ok(&args)).unwrap();
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// Polls until `check` returns Some for the object, or fails the test after `timeout` with
    /// the object's last state and the controller's log.
    pub fn wait_for<T>(
        &self,
        kind: &str,
        name: &str,
        timeout: Duration,
        controller: &Controller,
        check: impl Fn(&Value) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let object = self.get(kind, name);
            if let Some(found) = object.as_ref().and_then(&check) {
                return found;
            }
            if Instant::now() > deadline || !controller.is_running() {
                panic!(
                    "{kind}/{name} did not reach the expected state; last seen:\n{}\ncontroller log:\n{}",
                    serde_json::to_string_pretty(&object).unwrap(),
                    controller.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.server.is_none() && self.restart.is_none() {
            let _ = self.kubectl(&["delete", "namespace", &self.namespace.clone(), "--wait=false"]);
        }
    }
}

/// The controller, run as its own process (`workerbundle run`) against a cluster.
pub struct Controller {
    child: std::sync::Mutex<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Controller {
    pub fn start(cluster: &Cluster, args: &[&str], env: &[(String, String)]) -> Controller {
        let dir = super::tempdir();
        let log = dir.path().join("controller.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(super::BIN);
        command
            .args(["run", "--namespace", &cluster.namespace])
            // Probes and metrics on a free loopback port: tests run side by side.
            .args(["--health-listen", "127.0.0.1:0"])
            .args(args)
            .env("KUBECONFIG", cluster.kubeconfig())
            .env("WORKERBUNDLE_WORKERD", super::workerd_binary())
            // WB_CONTROLLER_LOG (a RUST_LOG filter) to see more of a failing run.
            .env("RUST_LOG", std::env::var("WB_CONTROLLER_LOG").unwrap_or_else(|_| "info,kube=warn".into()))
            .env_remove("SOURCE_DATE_EPOCH")
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            command.env(k, v);
        }
        Controller { child: std::sync::Mutex::new(command.spawn().unwrap()), log, _dir: dir }
    }

    /// The controller pushing to `registry` (plain HTTP, on this machine) over the base image
    /// `base` (`docker://...`), reading scripts from `s3`, with `extra` flags and environment.
    pub fn start_pushing(
        cluster: &Cluster,
        registry: &str,
        base: &str,
        s3: &super::s3::S3Server,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Controller {
        let (prefix, endpoint) = (format!("{registry}/workers"), s3.endpoint());
        let mut args = vec![
            "--repository-prefix",
            &prefix,
            "--base-image",
            base,
            "--insecure",
            "--s3-endpoint",
            &endpoint,
        ];
        args.extend_from_slice(extra);
        let mut all_env = s3.env(super::s3::SECRET_KEY);
        all_env.extend_from_slice(env);
        Controller::start(cluster, &args, &all_env)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running (it must survive bad objects).
    pub fn is_running(&self) -> bool {
        matches!(self.child.lock().unwrap().try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// SIGKILL (no chance to clean up), then waits for the process to be gone.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The first log line containing `needle`, waiting up to `timeout` for it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline && self.is_running(),
                "the controller logged no {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT` of /healthz, /readyz and /metrics, from the start-up log line.
    pub fn health_url(&self) -> String {
        let line = self.wait_for_log("serving /healthz", Duration::from_secs(30));
        let at = line.find("127.0.0.1:").unwrap_or_else(|| panic!("no address in {line}"));
        let address: String =
            line[at..].chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
        format!("http://{address}")
    }

    /// Waits for the process to exit by itself; its exit status.
    pub fn wait_for_exit(&self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "the controller is still running:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&self) -> std::process::ExitStatus {
        super::terminate(&self.child, "the controller", || self.log())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
