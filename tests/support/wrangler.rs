//! Unmodified wrangler 4.86.0 (tests/wrangler, installed by scripts/setup), run with node against
//! the API: only CLOUDFLARE_API_BASE_URL, CLOUDFLARE_API_TOKEN and CLOUDFLARE_ACCOUNT_ID point it
//! at us. It runs non-interactively (CI=true), with its own HOME and temporary directory, no
//! metrics, and its npm update check sent to a closed port on 127.0.0.1 (only local traffic).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn wrangler_js() -> PathBuf {
    let path = super::repo_path("tests/wrangler/node_modules/wrangler/bin/wrangler.js");
    assert!(path.exists(), "wrangler is not installed: run scripts/setup (npm ci in tests/wrangler)");
    path
}

pub struct Wrangler {
    api: String,
    token: String,
    account: Option<String>,
    home: tempfile::TempDir,
}

/// What one wrangler run did.
#[derive(Debug)]
pub struct Run {
    pub output: Output,
    pub elapsed: Duration,
}

impl Run {
    pub fn success(&self) -> bool {
        self.output.status.success()
    }

    /// stdout and stderr together.
    pub fn text(&self) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }

    /// The id wrangler prints as "Current Version ID: ...".
    pub fn version_id(&self) -> String {
        let text = self.text();
        let id = text.lines().find_map(|l| l.trim().strip_prefix("Current Version ID: ")).map(str::to_owned);
        id.unwrap_or_else(|| panic!("no version id in wrangler's output:\n{text}"))
    }
}

impl Wrangler {
    /// `account` None leaves CLOUDFLARE_ACCOUNT_ID unset (wrangler then asks /memberships).
    pub fn new(api: &str, token: &str, account: Option<&str>) -> Wrangler {
        Wrangler {
            api: api.into(),
            token: token.into(),
            account: account.map(str::to_owned),
            home: super::tempdir(),
        }
    }

    pub fn run(&self, project: &Path, args: &[&str]) -> Run {
        self.run_with_input(project, args, None)
    }

    /// Runs wrangler with `input` on its stdin (`wrangler secret put` reads the value there).
    pub fn run_with_input(&self, project: &Path, args: &[&str], input: Option<&str>) -> Run {
        let home = self.home.path();
        let tmp = home.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let mut command = Command::new("node");
        command
            .arg(wrangler_js())
            .args(args)
            .current_dir(project)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("TMPDIR", &tmp)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .env("CI", "true")
            .env("NO_COLOR", "1")
            .env("WRANGLER_SEND_METRICS", "false")
            // wrangler's update check reads the registry with `rc("npm")`, i.e. from `npm_registry`;
            // a closed local port makes it fail at once instead of reaching the internet.
            .env("npm_registry", "http://127.0.0.1:9/")
            .env("npm_config_registry", "http://127.0.0.1:9/")
            .env("CLOUDFLARE_API_BASE_URL", &self.api)
            .env("CLOUDFLARE_API_TOKEN", &self.token);
        if let Some(account) = &self.account {
            command.env("CLOUDFLARE_ACCOUNT_ID", account);
        }
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = command.spawn().expect("node is not installed");
        let mut stdin = child.stdin.take().unwrap();
        if let Some(input) = input {
            stdin.write_all(input.as_bytes()).unwrap();
        }
        drop(stdin);
        let output = child.wait_with_output().unwrap();
        Run { output, elapsed: start.elapsed() }
    }

    /// Runs wrangler and fails the test with its output unless it succeeds.
    pub fn ok(&self, project: &Path, args: &[&str]) -> Run {
        let run = self.run(project, args);
        assert!(run.success(), "wrangler {args:?} failed:\n{}", run.text());
        run
    }
}
