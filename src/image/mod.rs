//! The embedded image builder: deterministic layers, the workerd config, image assembly, and OCI
//! image layouts. [`build::build`] ties them together for the CLI; the controller will call the
//! same pieces.

pub mod assemble;
pub mod build;
pub mod canonical;
pub mod capnp;
pub mod layer;
pub mod layout;
pub mod reference;
pub mod workerd_config;
