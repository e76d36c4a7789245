//! The mesh's own resource kinds, API group `policy.mesh.dev` (version `v1alpha1`), for
//! what Istio has no resource for. Read like Istio's kinds: camelCase fields, every field
//! optional, unknown fields refused; values are checked in [`super::validate`].
//!
//! `HTTPLocalRateLimitPolicy` is modelled on Linkerd's kind of the same name: a target (a
//! Service by `targetRef`, or workloads by `selector`), an overall rate (`total`), a rate
//! for each client identity (`identity`), and rates for named clients (`overrides`). Each
//! rate is a token bucket: `requestsPerSecond` refilled, up to `burst` at once (default:
//! one second's worth). Over a rate the request is answered `429` with `Retry-After`.

use serde::{Deserialize, Serialize};

use serde_json::Value;

use super::istio::{PolicyTargetReference, WorkloadSelector};
use super::openapi::{self, OpenApi};

/// The API group of the mesh's own kinds.
pub const GROUP: &str = "policy.mesh.dev";
/// The versions it is served as.
pub const VERSIONS: [&str; 1] = ["v1alpha1"];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpLocalRateLimitPolicy {
    /// The Service whose requests are limited (kind `Service`, same namespace unless set).
    pub target_ref: Option<PolicyTargetReference>,
    /// Or the workloads (pods, WorkloadEntries) of the policy's namespace whose requests
    /// are limited.
    pub selector: Option<WorkloadSelector>,
    /// For all requests to the target together.
    pub total: Option<RateLimit>,
    /// For each client identity (service account) on its own; clients without one share
    /// one bucket.
    pub identity: Option<RateLimit>,
    /// For the clients named, instead of `identity`.
    pub overrides: Vec<RateLimitOverride>,
}

/// A token bucket's parameters. Signed, so that a negative rate is reported by the
/// validator with the field's name rather than as a type error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RateLimit {
    pub requests_per_second: i64,
    /// Requests let through at once after a quiet spell; default `requestsPerSecond`.
    pub burst: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RateLimitOverride {
    pub requests_per_second: i64,
    pub burst: Option<i64>,
    pub client_refs: Vec<ClientRef>,
}

/// A client of an override: a service account (the identity mTLS proves).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClientRef {
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    /// Default: the policy's namespace.
    pub namespace: Option<String>,
}

impl OpenApi for HttpLocalRateLimitPolicy {
    fn schema() -> Value {
        openapi::message::<Self>(vec![
            Option::<PolicyTargetReference>::schema(),
            Option::<WorkloadSelector>::schema(),
            Option::<RateLimit>::schema(),
            Option::<RateLimit>::schema(),
            Vec::<RateLimitOverride>::schema(),
        ])
    }
}

impl OpenApi for RateLimit {
    fn schema() -> Value {
        openapi::message::<Self>(vec![i64::schema(), Option::<i64>::schema()])
    }
}

impl OpenApi for RateLimitOverride {
    fn schema() -> Value {
        openapi::message::<Self>(vec![
            i64::schema(),
            Option::<i64>::schema(),
            Vec::<ClientRef>::schema(),
        ])
    }
}

impl OpenApi for ClientRef {
    fn schema() -> Value {
        openapi::message::<Self>(vec![
            Option::<String>::schema(),
            String::schema(),
            String::schema(),
            Option::<String>::schema(),
        ])
    }
}

/// The mesh's own kinds, by kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MeshPolicies {
    pub http_local_rate_limits: Vec<super::Resource<HttpLocalRateLimitPolicy>>,
}
