//! Decisions on traffic: AuthorizationPolicy evaluation, RequestAuthentication (JWT
//! verification and the JWKS they need), request path normalisation, the verdicts the
//! kernel enforces, and the explanation `meshctl policy check` prints.

pub mod authz;
pub mod check;
pub mod facts;
pub mod jwks;
pub mod jwt;
pub mod kernel;
pub mod path;
