//! The mesh's user space: the per-node agent (`mesh-agent`) and the CLI (`meshctl`),
//! sharing the configuration model, the datapath driver and the map readers.

pub mod agent;
pub mod authz;
pub mod ca;
pub mod certs;
pub mod config;
pub mod datapath;
pub mod discovery;
pub mod http;
pub mod identity;
pub mod jwt;
pub mod lb;
pub mod maps;
pub mod meshctl;
pub mod metrics;
pub mod peerauth;
pub mod policycheck;
pub mod proxy;
pub mod state;
pub mod tls;
