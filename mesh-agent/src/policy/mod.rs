//! Decisions on traffic: the one normalisation of a request head before it is judged,
//! AuthorizationPolicy evaluation, RequestAuthentication (JWT verification and the JWKS
//! they need), request path normalisation, the verdicts the kernel enforces, and the
//! explanation `meshctl policy check` prints.

pub mod authz;
pub mod check;
pub mod facts;
pub mod jwks;
pub mod jwt;
pub mod kernel;
pub mod path;
pub mod request;
