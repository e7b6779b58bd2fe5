//! Registry credentials and the auth challenge flow (anonymous, basic, bearer token).
//!
//! Credentials come from `--creds USER:PASS`, from a docker config.json (`--authfile`,
//! `$DOCKER_CONFIG/config.json`, `~/.docker/config.json`) or from a Kubernetes `.dockerconfigjson`
//! payload, which has the same `auths` shape.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::Deserialize;

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}:***)", self.username)
    }
}

impl Credentials {
    /// `USER:PASS`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (username, password) = text.split_once(':').ok_or("--creds must look like USER:PASS")?;
        Ok(Credentials { username: username.into(), password: password.into() })
    }

    pub fn basic_header(&self) -> String {
        format!("Basic {}", BASE64.encode(format!("{}:{}", self.username, self.password)))
    }
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Debug, Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Finds the credentials for `registry` in a docker config.json (or `.dockerconfigjson`) payload.
/// Keys may be bare hosts or URLs (`https://host/v1/`), as `docker login` writes them.
pub fn credentials_from_docker_config(json: &[u8], registry: &str) -> Result<Option<Credentials>, String> {
    let config: DockerConfig =
        serde_json::from_slice(json).map_err(|e| format!("not a docker config.json: {e}"))?;
    let entry = config.auths.iter().find(|(key, _)| {
        let host = key.trim_start_matches("https://").trim_start_matches("http://");
        host.split('/').next() == Some(registry)
    });
    let Some((key, auth)) = entry else { return Ok(None) };
    if let (Some(username), Some(password)) = (&auth.username, &auth.password) {
        return Ok(Some(Credentials { username: username.clone(), password: password.clone() }));
    }
    let Some(encoded) = &auth.auth else { return Ok(None) };
    let decoded =
        BASE64.decode(encoded.trim()).map_err(|e| format!("auths.{key}.auth is not base64: {e}"))?;
    let text = String::from_utf8(decoded).map_err(|_| format!("auths.{key}.auth is not UTF-8"))?;
    Credentials::parse(&text).map(Some).map_err(|_| format!("auths.{key}.auth is not USER:PASS"))
}

/// The docker config.json to read when none is given: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`.
pub fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(Path::new(&dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker/config.json"))
}

/// Resolves credentials the way the CLI documents: `--creds`, then `--authfile`, then the default
/// docker config (a missing default file means anonymous).
pub fn resolve_credentials(
    creds: Option<&str>,
    authfile: Option<&Path>,
    registry: &str,
) -> Result<Option<Credentials>, String> {
    if let Some(creds) = creds {
        return Credentials::parse(creds).map(Some);
    }
    let (path, required) = match authfile {
        Some(path) => (path.to_path_buf(), true),
        None => match default_docker_config() {
            Some(path) => (path, false),
            None => return Ok(None),
        },
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            credentials_from_docker_config(&bytes, registry).map_err(|e| format!("{}: {e}", path.display()))
        }
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read auth file {}: {e}", path.display())),
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut values = BTreeMap::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, tail) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_once(',').map_or((after, ""), |(v, t)| (v, t)),
        };
        values.insert(key.trim().to_ascii_lowercase(), value.to_owned());
        rest = tail.trim_start_matches([',', ' ']);
    }
    Some(Challenge::Bearer {
        realm: values.remove("realm")?,
        service: values.remove("service"),
        scope: values.remove("scope"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_config_auths_in_both_shapes() {
        let encoded = BASE64.encode("alice:s3cret");
        let json = format!(
            r#"{{"auths":{{"https://127.0.0.1:5000/v1/":{{"auth":"{encoded}"}},"r.example":{{"username":"bob","password":"pw"}}}}}}"#
        );
        let alice = credentials_from_docker_config(json.as_bytes(), "127.0.0.1:5000").unwrap().unwrap();
        assert_eq!((alice.username.as_str(), alice.password.as_str()), ("alice", "s3cret"));
        let bob = credentials_from_docker_config(json.as_bytes(), "r.example").unwrap().unwrap();
        assert_eq!(bob.username, "bob");
        assert!(credentials_from_docker_config(json.as_bytes(), "other:5000").unwrap().is_none());
        assert!(credentials_from_docker_config(b"not json", "x").is_err());
    }

    #[test]
    fn parses_challenges() {
        assert_eq!(parse_challenge("Basic realm=\"basic-realm\""), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }
}
