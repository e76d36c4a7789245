//! The agent's plain HTTP plumbing: small servers for metrics, readiness and admin.

pub mod server;
