//! The proxy's one error type: what went wrong with a connection, with its source kept,
//! for the log line and the connection's recorded outcome.

use std::{io, net::SocketAddrV4};

use crate::proxy::{plan::PlanError, pool::PoolError};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{0}: denied by policy")]
    Denied(String),
    #[error("connecting to {target}")]
    Connect {
        target: SocketAddrV4,
        source: io::Error,
    },
    #[error("carrying the connection")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Tunnel(#[from] PoolError),
    #[error("HBONE stream")]
    Stream(#[from] h2::Error),
    #[error("serving HTTP")]
    Http(#[from] hyper::Error),
    #[error("{cluster}: over its connectionPool.tcp.maxConnections")]
    PoolOverflow { cluster: String },
    #[error("closed by the agent: {0}")]
    Ended(&'static str),
}

impl ProxyError {
    /// What serving an HTTP connection ended with: hyper's error, or the I/O beneath it.
    pub fn from_serving(err: Box<dyn std::error::Error + Send + Sync>) -> ProxyError {
        match err.downcast::<hyper::Error>() {
            Ok(err) => ProxyError::Http(*err),
            Err(err) => ProxyError::Io(std::io::Error::other(err)),
        }
    }
}
