//! What the agent reports about the traffic it sees: Istio's metrics from the kernel's
//! flow events joined with the proxy's connection records, and the outcome of every
//! routed request.

pub mod access_log;
pub mod conns;
pub mod metrics;
pub mod process;
pub mod request;
pub mod request_metrics;
pub mod result;
pub mod spans;
pub mod tcp_metrics;
pub mod timing;
pub mod trace_context;
