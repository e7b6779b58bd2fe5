//! workerbundle: Cloudflare-style Workers in, one deterministic workerd container image out.
//!
//! The data flow is visible in the module names:
//! - [`worker`]: what a worker is (Cloudflare upload metadata, module kinds, validation, ports);
//! - [`source`]: where a worker's files come from (a directory, S3);
//! - [`image`]: the pure builder — deterministic layers, the workerd config, image assembly, OCI
//!   layouts;
//! - [`registry`]: push, pull, mount and delete over the distribution API;
//! - [`build`]: the pipelines the CLI and the controller call (sources → image → target);
//! - [`base_image`]: the workerd base image, assembled from package archives;
//! - [`self_image`]: workerbundle's own image, the same way (no Docker to ship the controller);
//! - [`crd`] and [`controller`]: the custom resources and their reconcilers;
//! - [`api`]: the Cloudflare-compatible API wrangler deploys to;
//! - [`dev`]: all of it in one process, with a local runner (`workerbundle dev`).

pub mod api;
pub mod base_image;
pub mod build;
pub mod cache_dir;
pub mod controller;
pub mod crd;
pub mod dev;
pub mod digest;
pub mod image;
pub mod oci;
pub mod registry;
pub mod self_image;
pub mod source;
pub mod startup_check;
pub mod worker;

/// An error and its sources on one line (`outer: inner: root cause`), for messages that must
/// say what actually went wrong without a debug dump.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Completes on SIGINT or SIGTERM: what stops every long-running command (`run`, `api`, `dev`).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

/// Cases per property of the hostile-input tests: 512 in `cargo test` (seconds, in every CI run),
/// `PROPTEST_CASES=200000 cargo test --lib hostile config_structure` for a long run by hand.
#[cfg(test)]
pub(crate) fn hostile_input_cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
}
