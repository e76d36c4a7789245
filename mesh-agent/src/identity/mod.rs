//! Workload identity: SPIFFE IDs and certificates, the TLS configurations of HBONE, the
//! mesh CA (server and client), and the renewal of every local workload's certificate.

pub mod ca;
pub mod certs;
pub mod spiffe;
pub mod tls;
pub mod token_review;
