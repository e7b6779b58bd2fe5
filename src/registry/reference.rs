//! `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]` references.

use std::fmt;

use crate::digest::Digest;
use crate::oci::check_tag;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryRef {
    /// `host` or `host:port`, as used in URLs and in docker config.json.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl RegistryRef {
    /// Parses what follows `docker://`. The registry must be named (`host[:port]/repo`): an image
    /// built for a private cluster should never go to Docker Hub by accident.
    pub fn parse(text: &str) -> Result<Self, String> {
        let fail = |why: &str| {
            format!("registry reference {text:?} {why}; expected HOST[:PORT]/REPO[:TAG|@sha256:...]")
        };
        let (registry, rest) = text.split_once('/').ok_or_else(|| fail("names no repository"))?;
        let looks_like_host = registry.contains(['.', ':']) || registry == "localhost";
        if registry.is_empty() || !looks_like_host {
            return Err(fail("names no registry host"));
        }
        let (rest, digest) = match rest.split_once('@') {
            Some((rest, digest)) => (
                rest,
                Some(Digest::parse(digest).ok_or_else(|| fail("has a digest that is not sha256:<64 hex>"))?),
            ),
            None => (rest, None),
        };
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag.to_owned())),
            _ => (rest, None),
        };
        let valid_repo = !repository.is_empty()
            && repository.split('/').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                    })
                    && part.as_bytes()[0].is_ascii_alphanumeric()
            });
        if !valid_repo {
            return Err(fail(
                "has an invalid repository name (lowercase letters, digits, '.', '_', '-', '/')",
            ));
        }
        if let Some(tag) = &tag {
            check_tag(tag).map_err(|e| fail(&e))?;
        }
        Ok(RegistryRef { registry: registry.to_owned(), repository: repository.to_owned(), tag, digest })
    }

    /// The tag or digest that names the manifest.
    pub fn manifest_reference(&self) -> Option<String> {
        self.digest.as_ref().map(|d| d.to_string()).or_else(|| self.tag.clone())
    }

    /// Whether the registry is on this machine, the only place plain HTTP is allowed.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => self.registry.split(':').next().unwrap_or_default(),
        };
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "docker://{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_tags_and_digests() {
        let r = RegistryRef::parse("127.0.0.1:5000/acct/app:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "acct/app", Some("v1"))
        );
        assert!(r.is_loopback());
        let d = format!("sha256:{}", "a".repeat(64));
        let r = RegistryRef::parse(&format!("registry.example.com/base@{d}")).unwrap();
        assert_eq!(r.digest.unwrap().as_str(), d);
        assert!(r.tag.is_none());
        assert!(!RegistryRef::parse("registry.example.com/x:y").unwrap().is_loopback());
        assert!(RegistryRef::parse("[::1]:5000/x").unwrap().is_loopback());
        assert!(RegistryRef::parse("localhost:5000/x").unwrap().is_loopback());
    }

    #[test]
    fn refuses_ambiguous_or_invalid_references() {
        for bad in [
            "app:v1",
            "ubuntu/app",
            "127.0.0.1:5000/",
            "127.0.0.1:5000/UPPER",
            "h.io/x@sha256:12",
            "h.io/x:bad tag",
        ] {
            assert!(RegistryRef::parse(bad).is_err(), "{bad}");
        }
    }
}
