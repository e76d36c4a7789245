//! The mesh's user space: the per-node agent (`mesh-agent`) and the CLI (`meshctl`).
//!
//! Layers depend one way, lower to higher: `errors`, `http` (plumbing) ← `config` (resource kinds,
//! parsed and validated) ← `model` (the typed mesh state) ← `identity`, `policy` ←
//! `datapath`, `telemetry` ← `proxy` ← `app` (the agent's wiring); `cli` is meshctl.

pub mod app;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod errors;
pub mod http;
pub mod identity;
pub mod model;
pub mod policy;
pub mod proxy;
pub mod telemetry;
