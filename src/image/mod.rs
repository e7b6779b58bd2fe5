//! The embedded image builder, pure: deterministic layers, the workerd config, image assembly,
//! and OCI image layouts. [`crate::build`] ties them to sources and targets for the CLI and the
//! controller.

pub mod assemble;
pub mod block_cache;
pub mod canonical;
pub mod capnp;
pub mod file_source;
pub mod layer;
pub mod layout;
pub mod layout_gc;
pub mod pgzip;
pub mod reference;
pub mod workerd_config;

#[cfg(test)]
mod config_structure_tests;
