//! Image references in skopeo's style: `oci:DIR[:TAG]` (an OCI image layout on disk) and
//! `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]` (a registry).

use std::fmt;
use std::path::PathBuf;

use crate::oci::check_tag;
use crate::registry::RegistryRef;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// An OCI image layout directory and, optionally, the tag (`org.opencontainers.image.ref.name`)
    /// of one image in it.
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
    Registry(RegistryRef),
}

impl ImageRef {
    /// Parses `oci:DIR[:TAG]` (the directory ends at the first `:` after the transport) or
    /// `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(rest) = text.strip_prefix("docker://") {
            return RegistryRef::parse(rest).map(ImageRef::Registry);
        }
        let Some(rest) = text.strip_prefix("oci:") else {
            return Err(format!(
                "image reference {text:?} has no known transport; expected oci:DIR[:TAG] or docker://HOST/REPO[:TAG]"
            ));
        };
        let (dir, tag) = match rest.split_once(':') {
            Some((dir, tag)) => (dir, Some(tag.to_owned())),
            None => (rest, None),
        };
        if dir.is_empty() {
            return Err(format!("image reference {text:?} names no directory"));
        }
        if let Some(tag) = &tag {
            check_tag(tag).map_err(|e| format!("image reference {text:?}: {e}"))?;
        }
        Ok(ImageRef::Layout { dir: PathBuf::from(dir), tag })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Layout { dir, tag: Some(tag) } => write!(f, "oci:{}:{tag}", dir.display()),
            ImageRef::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageRef::Registry(r) => r.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layout_references() {
        assert_eq!(
            ImageRef::parse("oci:out/app:v1").unwrap(),
            ImageRef::Layout { dir: "out/app".into(), tag: Some("v1".into()) }
        );
        assert_eq!(ImageRef::parse("oci:base").unwrap(), ImageRef::Layout { dir: "base".into(), tag: None });
        assert!(ImageRef::parse("docker-archive:x").is_err());
        assert!(
            matches!(ImageRef::parse("docker://127.0.0.1:5000/a/b:t").unwrap(), ImageRef::Registry(r) if r.repository == "a/b")
        );
        assert!(ImageRef::parse("oci::tag").is_err());
        assert!(ImageRef::parse("oci:dir:bad/tag").is_err());
    }
}
