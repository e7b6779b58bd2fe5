//! Base images, resolved once per process: a bundle's status pins its base by digest, so after a
//! restart the same digest is read again (a tag that moved meanwhile changes nothing until the
//! bundle's base reference itself changes).

use std::collections::HashMap;
use std::sync::Arc;

use crate::build::{read_base, BuildError, ResolvedBase};
use crate::digest::Digest;
use crate::image::reference::ImageRef;
use crate::registry::Registries;

/// A base reference as configured, and the digest it was pinned at.
type BaseKey = (String, Option<Digest>);

fn base_key(reference: &ImageRef, pinned: Option<&Digest>) -> BaseKey {
    (reference.to_string(), pinned.cloned())
}

#[derive(Default)]
pub struct Bases {
    resolved: tokio::sync::Mutex<HashMap<BaseKey, Arc<ResolvedBase>>>,
}

impl Bases {
    /// The base `reference` names if it was resolved already: never a registry request.
    pub async fn cached(&self, reference: &ImageRef, pinned: Option<&Digest>) -> Option<Arc<ResolvedBase>> {
        self.resolved.lock().await.get(&base_key(reference, pinned)).cloned()
    }

    /// The base `reference` names, read at `pinned` when a digest was recorded for it before.
    pub async fn resolve(
        &self,
        reference: &ImageRef,
        pinned: Option<&Digest>,
        registries: &Registries,
    ) -> Result<Arc<ResolvedBase>, BuildError> {
        let key = base_key(reference, pinned);
        let mut resolved = self.resolved.lock().await;
        if let Some(base) = resolved.get(&key) {
            return Ok(base.clone());
        }
        let at = match (reference, pinned) {
            (ImageRef::Registry(r), Some(digest)) => {
                let mut r = r.clone();
                r.digest = Some(digest.clone());
                ImageRef::Registry(r)
            }
            _ => reference.clone(),
        };
        let mut base = read_base(&at, registries).await?;
        // The annotation names what the user asked for, not the pinned form it was read by: it is
        // part of the manifest, and so of the image digest.
        if let ImageRef::Registry(_) = reference {
            base.name = reference.to_string().trim_start_matches("docker://").to_owned();
        }
        if let Some(digest) = pinned.filter(|d| **d != base.image.manifest_digest) {
            return Err(BuildError::Invalid(format!(
                "base image {reference} is now {} but this bundle was built on {digest}; point the bundle's baseImage at the new one to move",
                base.image.manifest_digest
            )));
        }
        let base = Arc::new(base);
        // Read by tag, it is also what the bundle will ask for pinned at this digest once its
        // status records it: one read, not a second one for the same bytes.
        let pinned_key = (key.0.clone(), Some(base.image.manifest_digest.clone()));
        resolved.insert(pinned_key, base.clone());
        resolved.insert(key, base.clone());
        Ok(base)
    }
}
