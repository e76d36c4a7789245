//! Istio's resource kinds, field for field as Istio's API reference has them
//! (networking.istio.io v1alpha3/v1beta1/v1, security.istio.io v1beta1/v1,
//! telemetry.istio.io v1alpha1/v1). Unknown fields and bad enum values are errors; durations,
//! regular expressions and CIDRs are checked as they are read, so every such error carries
//! the field's path and line.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::openapi::{self, OpenApi};

/// Declares a message of Istio's API: camelCase fields, every field optional, unknown
/// fields refused.
macro_rules! message {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields, default)]
        pub struct $name { $($(#[$fmeta])* pub $field: $ty,)* }

        impl OpenApi for $name {
            fn schema() -> serde_json::Value {
                openapi::message::<$name>(vec![$(<$ty as OpenApi>::schema()),*])
            }
        }
    };
}

/// Declares an enum of Istio's API, spelled in SCREAMING_SNAKE_CASE.
macro_rules! enumeration {
    ($(#[$meta:meta])* pub enum $name:ident { $first:ident $(, $(#[$vmeta:meta])* $variant:ident)* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum $name { #[default] $first $(, $(#[$vmeta])* $variant)* }

        impl OpenApi for $name {
            fn schema() -> serde_json::Value {
                openapi::enumeration(&[$name::$first $(, $name::$variant)*])
            }
        }
    };
}

type Map<V> = BTreeMap<String, V>;

/// A port number as a map key: YAML writes `80:`, while the Kubernetes API, speaking JSON,
/// returns every key as a string (`"80":`). Both mean the same port.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct PortKey(u32);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PortKey, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a port number")
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<PortKey, E> {
                u32::try_from(value)
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("port {value} is out of range")))
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<PortKey, E> {
                u64::try_from(value)
                    .map_err(|_| E::custom(format!("port {value} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<PortKey, E> {
                value
                    .parse()
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("{value:?} is not a port number")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn port_keyed<'de, D, V>(deserializer: D) -> Result<BTreeMap<u32, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    let map = BTreeMap::<PortKey, V>::deserialize(deserializer)?;
    Ok(map
        .into_iter()
        .map(|(PortKey(port), v)| (port, v))
        .collect())
}

/// A protobuf duration as Istio writes it: `1s`, `0.5s`, `100ms`, `1h2m3s`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Duration {
    pub text: String,
    pub value: std::time::Duration,
}

pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid duration {text:?} (expected e.g. \"1s\", \"250ms\", \"1h30m\")");
    if text.is_empty() {
        return Err(bad());
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > 315_576_000_000.0 {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let value = parse_duration(&text).map_err(serde::de::Error::custom)?;
        Ok(Duration { text, value })
    }
}

/// What [`parse_duration`] reads, as far as a pattern can say it.
impl OpenApi for Duration {
    fn schema() -> serde_json::Value {
        serde_json::json!({"type": "string", "pattern": "^([0-9.]+(h|m|s|ms|us|µs|ns))+$"})
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

/// An IP address or CIDR block (`10.0.0.0/8`, `192.168.1.1`, `2001:db8::/32`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct IpBlock(pub String);

pub fn parse_ip_block(text: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (text, None),
    };
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("invalid CIDR {text:?}: {addr:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(len) => len
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("invalid CIDR {text:?}: prefix length must be 0-{max}"))?,
        None => max,
    };
    Ok((ip, len))
}

impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_ip_block(&text).map_err(serde::de::Error::custom)?;
        Ok(IpBlock(text))
    }
}

impl OpenApi for IpBlock {
    fn schema() -> serde_json::Value {
        String::schema()
    }
}

impl Serialize for IpBlock {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// A regular expression in RE2 syntax, checked when read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Regex(pub String);

impl<'de> Deserialize<'de> for Regex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        regex::Regex::new(&format!("^(?:{text})$"))
            .map_err(|e| serde::de::Error::custom(format!("invalid regex {text:?}: {e}")))?;
        Ok(Regex(text))
    }
}

impl OpenApi for Regex {
    fn schema() -> serde_json::Value {
        String::schema()
    }
}

impl Serialize for Regex {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

// ---------------------------------------------------------------- shared messages

message! {
    /// `exact`, `prefix` or `regex` (exactly one).
    pub struct StringMatch {
        pub exact: Option<String>,
        pub prefix: Option<String>,
        pub regex: Option<Regex>,
    }
}

message! {
    pub struct PortSelector {
        pub number: Option<u32>,
    }
}

message! {
    pub struct Destination {
        pub host: String,
        pub subset: Option<String>,
        pub port: Option<PortSelector>,
    }
}

message! {
    pub struct Percent {
        pub value: f64,
    }
}

message! {
    /// `selector` of the security and telemetry kinds.
    pub struct WorkloadSelector {
        pub match_labels: Map<String>,
    }
}

message! {
    pub struct PolicyTargetReference {
        pub group: Option<String>,
        pub kind: String,
        pub name: String,
        pub namespace: Option<String>,
    }
}

// ---------------------------------------------------------------- VirtualService

message! {
    pub struct VirtualService {
        pub hosts: Vec<String>,
        pub gateways: Vec<String>,
        pub http: Vec<HttpRoute>,
        pub tls: Vec<TlsRoute>,
        pub tcp: Vec<TcpRoute>,
        pub export_to: Vec<String>,
    }
}

message! {
    pub struct HttpRoute {
        pub name: Option<String>,
        #[serde(rename = "match")]
        pub matches: Vec<HttpMatchRequest>,
        pub route: Vec<HttpRouteDestination>,
        pub redirect: Option<HttpRedirect>,
        pub direct_response: Option<HttpDirectResponse>,
        pub delegate: Option<Delegate>,
        pub rewrite: Option<HttpRewrite>,
        pub timeout: Option<Duration>,
        pub retries: Option<HttpRetry>,
        pub fault: Option<HttpFaultInjection>,
        pub mirror: Option<Destination>,
        pub mirrors: Vec<HttpMirrorPolicy>,
        pub mirror_percentage: Option<Percent>,
        /// Deprecated: `mirrorPercentage`.
        pub mirror_percent: Option<u32>,
        pub cors_policy: Option<CorsPolicy>,
        pub headers: Option<Headers>,
    }
}

message! {
    pub struct HttpMatchRequest {
        pub name: Option<String>,
        pub uri: Option<StringMatch>,
        pub scheme: Option<StringMatch>,
        pub method: Option<StringMatch>,
        pub authority: Option<StringMatch>,
        pub headers: Map<StringMatch>,
        pub port: Option<u32>,
        pub source_labels: Map<String>,
        pub gateways: Vec<String>,
        pub query_params: Map<StringMatch>,
        pub ignore_uri_case: Option<bool>,
        pub without_headers: Map<StringMatch>,
        pub source_namespace: Option<String>,
        pub stat_prefix: Option<String>,
    }
}

message! {
    pub struct HttpRouteDestination {
        pub destination: Destination,
        pub weight: Option<i32>,
        pub headers: Option<Headers>,
    }
}

message! {
    pub struct Headers {
        pub request: Option<HeaderOperations>,
        pub response: Option<HeaderOperations>,
    }
}

message! {
    pub struct HeaderOperations {
        pub set: Map<String>,
        pub add: Map<String>,
        pub remove: Vec<String>,
    }
}

enumeration! {
    pub enum RedirectPortSelection { FromProtocolDefault, FromRequestPort }
}

message! {
    pub struct HttpRedirect {
        pub uri: Option<String>,
        pub authority: Option<String>,
        pub port: Option<u32>,
        pub derive_port: Option<RedirectPortSelection>,
        pub scheme: Option<String>,
        pub redirect_code: Option<u32>,
    }
}

message! {
    pub struct HttpBody {
        pub string: Option<String>,
        pub bytes: Option<String>,
    }
}

message! {
    pub struct HttpDirectResponse {
        pub status: u32,
        pub body: Option<HttpBody>,
    }
}

message! {
    pub struct Delegate {
        pub name: String,
        pub namespace: Option<String>,
    }
}

message! {
    pub struct RegexRewrite {
        #[serde(rename = "match")]
        pub pattern: Option<Regex>,
        pub rewrite: Option<String>,
    }
}

message! {
    pub struct HttpRewrite {
        pub uri: Option<String>,
        pub authority: Option<String>,
        pub uri_regex_rewrite: Option<RegexRewrite>,
    }
}

message! {
    pub struct HttpRetry {
        pub attempts: Option<i32>,
        pub per_try_timeout: Option<Duration>,
        pub retry_on: Option<String>,
        pub retry_remote_localities: Option<bool>,
    }
}

/// Envoy's `retry_on` conditions a route retries on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub retriable_4xx: bool,
    pub status_codes: Vec<u16>,
    /// gRPC status codes (`cancelled` 1, `deadline-exceeded` 4, `resource-exhausted` 8,
    /// `internal` 13, `unavailable` 14).
    pub grpc: Vec<u32>,
}

impl RetryOn {
    /// Reads Istio's `retryOn`: Envoy condition names and bare status codes (which Istio
    /// turns into `retriable-status-codes`).
    pub fn parse(text: &str) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        let mut status_codes_enabled = false;
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" | "reset-before-request" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "retriable-status-codes" => status_codes_enabled = true,
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                "envoy-ratelimited" | "retriable-headers" | "http3-post-connect-failure" => {}
                code => match code.parse::<u16>() {
                    Ok(code) if (100..600).contains(&code) => {
                        on.status_codes.push(code);
                        status_codes_enabled = true;
                    }
                    _ => return Err(format!("{code:?} is not a retry condition")),
                },
            }
        }
        if !status_codes_enabled {
            on.status_codes.clear();
        }
        Ok(on)
    }
}

/// gRPC status codes by their names, as `abort.grpcStatus` spells them.
pub fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as u32)
        .or_else(|| name.parse().ok().filter(|c| *c < 17))
}

message! {
    pub struct Delay {
        pub fixed_delay: Option<Duration>,
        pub exponential_delay: Option<Duration>,
        pub percentage: Option<Percent>,
        /// Deprecated: `percentage`.
        pub percent: Option<i32>,
    }
}

message! {
    pub struct Abort {
        pub http_status: Option<i32>,
        pub grpc_status: Option<String>,
        pub http2_error: Option<String>,
        pub percentage: Option<Percent>,
        /// Deprecated: `percentage`.
        pub percent: Option<i32>,
    }
}

message! {
    pub struct HttpFaultInjection {
        pub delay: Option<Delay>,
        pub abort: Option<Abort>,
    }
}

message! {
    pub struct HttpMirrorPolicy {
        pub destination: Destination,
        pub percentage: Option<Percent>,
    }
}

enumeration! {
    pub enum UnmatchedPreflights { Unspecified, Forward, Ignore }
}

message! {
    pub struct CorsPolicy {
        pub allow_origins: Vec<StringMatch>,
        /// Deprecated: `allowOrigins`.
        pub allow_origin: Vec<String>,
        pub allow_methods: Vec<String>,
        pub allow_headers: Vec<String>,
        pub expose_headers: Vec<String>,
        pub max_age: Option<Duration>,
        pub allow_credentials: Option<bool>,
        pub unmatched_preflights: Option<UnmatchedPreflights>,
    }
}

message! {
    pub struct TlsMatchAttributes {
        pub sni_hosts: Vec<String>,
        pub destination_subnets: Vec<IpBlock>,
        pub port: Option<u32>,
        pub source_labels: Map<String>,
        pub gateways: Vec<String>,
        pub source_namespace: Option<String>,
    }
}

message! {
    pub struct RouteDestination {
        pub destination: Destination,
        pub weight: Option<i32>,
    }
}

message! {
    pub struct TlsRoute {
        #[serde(rename = "match")]
        pub matches: Vec<TlsMatchAttributes>,
        pub route: Vec<RouteDestination>,
    }
}

message! {
    pub struct L4MatchAttributes {
        pub destination_subnets: Vec<IpBlock>,
        pub port: Option<u32>,
        pub source_subnet: Option<IpBlock>,
        pub source_labels: Map<String>,
        pub gateways: Vec<String>,
        pub source_namespace: Option<String>,
    }
}

message! {
    pub struct TcpRoute {
        #[serde(rename = "match")]
        pub matches: Vec<L4MatchAttributes>,
        pub route: Vec<RouteDestination>,
    }
}

// ---------------------------------------------------------------- DestinationRule

message! {
    pub struct DestinationRule {
        pub host: String,
        pub traffic_policy: Option<TrafficPolicy>,
        pub subsets: Vec<Subset>,
        pub export_to: Vec<String>,
        pub workload_selector: Option<WorkloadSelector>,
    }
}

message! {
    pub struct TrafficPolicy {
        pub load_balancer: Option<LoadBalancerSettings>,
        pub connection_pool: Option<ConnectionPoolSettings>,
        pub outlier_detection: Option<OutlierDetection>,
        pub tls: Option<ClientTlsSettings>,
        pub port_level_settings: Vec<PortTrafficPolicy>,
        pub tunnel: Option<TunnelSettings>,
        pub proxy_protocol: Option<ProxyProtocol>,
    }
}

message! {
    pub struct PortTrafficPolicy {
        pub port: Option<PortSelector>,
        pub load_balancer: Option<LoadBalancerSettings>,
        pub connection_pool: Option<ConnectionPoolSettings>,
        pub outlier_detection: Option<OutlierDetection>,
        pub tls: Option<ClientTlsSettings>,
    }
}

message! {
    pub struct Subset {
        pub name: String,
        pub labels: Map<String>,
        pub traffic_policy: Option<TrafficPolicy>,
    }
}

enumeration! {
    pub enum SimpleLb {
        Unspecified,
        /// Deprecated: `LEAST_REQUEST`.
        LeastConn,
        Random,
        Passthrough,
        RoundRobin,
        LeastRequest,
    }
}

message! {
    pub struct LoadBalancerSettings {
        pub simple: Option<SimpleLb>,
        pub consistent_hash: Option<ConsistentHashLb>,
        pub locality_lb_setting: Option<LocalityLoadBalancerSetting>,
        pub warmup_duration_secs: Option<Duration>,
        pub warmup: Option<WarmupConfiguration>,
    }
}

message! {
    pub struct WarmupConfiguration {
        pub duration: Option<Duration>,
        pub minimum_percent: Option<f64>,
        pub aggression: Option<f64>,
    }
}

message! {
    pub struct HttpCookie {
        pub name: String,
        pub path: Option<String>,
        pub ttl: Option<Duration>,
        pub attributes: Vec<CookieAttribute>,
    }
}

message! {
    pub struct CookieAttribute {
        pub name: String,
        pub value: Option<String>,
    }
}

message! {
    pub struct RingHash {
        pub minimum_ring_size: Option<u64>,
    }
}

message! {
    pub struct MagLev {
        pub table_size: Option<u64>,
    }
}

message! {
    pub struct ConsistentHashLb {
        pub http_header_name: Option<String>,
        pub http_cookie: Option<HttpCookie>,
        pub use_source_ip: Option<bool>,
        pub http_query_parameter_name: Option<String>,
        pub ring_hash: Option<RingHash>,
        pub maglev: Option<MagLev>,
        /// Deprecated: `ringHash.minimumRingSize`.
        pub minimum_ring_size: Option<u64>,
    }
}

message! {
    pub struct LocalityDistribute {
        pub from: String,
        pub to: BTreeMap<String, u32>,
    }
}

message! {
    pub struct LocalityFailover {
        pub from: String,
        pub to: String,
    }
}

message! {
    pub struct LocalityLoadBalancerSetting {
        pub distribute: Vec<LocalityDistribute>,
        pub failover: Vec<LocalityFailover>,
        pub failover_priority: Vec<String>,
        pub enabled: Option<bool>,
    }
}

message! {
    pub struct TcpKeepalive {
        pub probes: Option<u32>,
        pub time: Option<Duration>,
        pub interval: Option<Duration>,
    }
}

message! {
    pub struct TcpSettings {
        pub max_connections: Option<i32>,
        pub connect_timeout: Option<Duration>,
        pub tcp_keepalive: Option<TcpKeepalive>,
        pub max_connection_duration: Option<Duration>,
        pub idle_timeout: Option<Duration>,
    }
}

enumeration! {
    pub enum H2UpgradePolicy { Default, DoNotUpgrade, Upgrade }
}

message! {
    pub struct HttpSettings {
        pub http1_max_pending_requests: Option<i32>,
        pub http2_max_requests: Option<i32>,
        pub max_requests_per_connection: Option<i32>,
        pub max_retries: Option<i32>,
        pub idle_timeout: Option<Duration>,
        pub h2_upgrade_policy: Option<H2UpgradePolicy>,
        pub use_client_protocol: Option<bool>,
        pub max_concurrent_streams: Option<i32>,
    }
}

message! {
    pub struct ConnectionPoolSettings {
        pub tcp: Option<TcpSettings>,
        pub http: Option<HttpSettings>,
    }
}

message! {
    pub struct OutlierDetection {
        pub split_external_local_origin_errors: Option<bool>,
        pub consecutive_local_origin_failures: Option<u32>,
        pub consecutive_gateway_errors: Option<u32>,
        #[serde(rename = "consecutive5xxErrors")]
        pub consecutive_5xx_errors: Option<u32>,
        pub interval: Option<Duration>,
        pub base_ejection_time: Option<Duration>,
        pub max_ejection_percent: Option<i32>,
        pub min_health_percent: Option<i32>,
        /// Deprecated: `consecutive5xxErrors`.
        pub consecutive_errors: Option<i32>,
    }
}

enumeration! {
    pub enum ClientTlsMode { Disable, Simple, Mutual, IstioMutual }
}

message! {
    pub struct ClientTlsSettings {
        pub mode: Option<ClientTlsMode>,
        pub client_certificate: Option<String>,
        pub private_key: Option<String>,
        pub ca_certificates: Option<String>,
        pub credential_name: Option<String>,
        pub subject_alt_names: Vec<String>,
        pub sni: Option<String>,
        pub insecure_skip_verify: Option<bool>,
        pub ca_crl: Option<String>,
    }
}

message! {
    pub struct TunnelSettings {
        pub protocol: Option<String>,
        pub target_host: String,
        pub target_port: u32,
    }
}

enumeration! {
    pub enum ProxyProtocolVersion { V1, V2 }
}

message! {
    pub struct ProxyProtocol {
        pub version: Option<ProxyProtocolVersion>,
    }
}

// ---------------------------------------------------------------- Gateway

message! {
    pub struct Gateway {
        pub servers: Vec<Server>,
        pub selector: Map<String>,
    }
}

message! {
    pub struct Port {
        pub number: u32,
        pub protocol: Option<String>,
        pub name: Option<String>,
        pub target_port: Option<u32>,
    }
}

message! {
    pub struct Server {
        pub port: Option<Port>,
        pub bind: Option<String>,
        pub hosts: Vec<String>,
        pub tls: Option<ServerTlsSettings>,
        pub default_endpoint: Option<String>,
        pub name: Option<String>,
    }
}

enumeration! {
    pub enum ServerTlsMode { Passthrough, Simple, Mutual, AutoPassthrough, IstioMutual, OptionalMutual }
}

enumeration! {
    pub enum TlsProtocol {
        TlsAuto,
        #[serde(rename = "TLSV1_0")]
        Tlsv1_0,
        #[serde(rename = "TLSV1_1")]
        Tlsv1_1,
        #[serde(rename = "TLSV1_2")]
        Tlsv1_2,
        #[serde(rename = "TLSV1_3")]
        Tlsv1_3,
    }
}

message! {
    pub struct TlsCertificate {
        pub server_certificate: Option<String>,
        pub private_key: Option<String>,
        pub ca_certificates: Option<String>,
    }
}

message! {
    pub struct ServerTlsSettings {
        pub https_redirect: Option<bool>,
        pub mode: Option<ServerTlsMode>,
        pub server_certificate: Option<String>,
        pub private_key: Option<String>,
        pub ca_certificates: Option<String>,
        pub ca_crl: Option<String>,
        pub credential_name: Option<String>,
        pub credential_names: Vec<String>,
        pub tls_certificates: Vec<TlsCertificate>,
        pub subject_alt_names: Vec<String>,
        pub verify_certificate_spki: Vec<String>,
        pub verify_certificate_hash: Vec<String>,
        pub min_protocol_version: Option<TlsProtocol>,
        pub max_protocol_version: Option<TlsProtocol>,
        pub cipher_suites: Vec<String>,
    }
}

// ---------------------------------------------------------------- ServiceEntry, WorkloadEntry

enumeration! {
    pub enum Location { MeshExternal, MeshInternal }
}

enumeration! {
    pub enum Resolution { None, Static, Dns, DnsRoundRobin }
}

message! {
    pub struct ServiceEntryPort {
        pub number: u32,
        pub protocol: Option<String>,
        pub name: Option<String>,
        pub target_port: Option<u32>,
    }
}

message! {
    /// ServiceEntry's `workloadSelector` (`labels`, unlike the security kinds' `matchLabels`).
    pub struct LabelSelector {
        pub labels: Map<String>,
    }
}

message! {
    pub struct ServiceEntry {
        pub hosts: Vec<String>,
        pub addresses: Vec<IpBlock>,
        pub ports: Vec<ServiceEntryPort>,
        pub location: Option<Location>,
        pub resolution: Option<Resolution>,
        pub endpoints: Vec<WorkloadEntry>,
        pub workload_selector: Option<LabelSelector>,
        pub export_to: Vec<String>,
        pub subject_alt_names: Vec<String>,
    }
}

message! {
    pub struct WorkloadEntry {
        pub address: Option<String>,
        pub ports: BTreeMap<String, u32>,
        pub labels: Map<String>,
        pub network: Option<String>,
        pub locality: Option<String>,
        pub weight: Option<u32>,
        pub service_account: Option<String>,
    }
}

message! {
    pub struct WorkloadGroupObjectMeta {
        pub labels: Map<String>,
        pub annotations: Map<String>,
    }
}

message! {
    pub struct HttpHeader {
        pub name: String,
        pub value: String,
    }
}

message! {
    pub struct HttpHealthCheck {
        pub path: Option<String>,
        pub port: u32,
        pub host: Option<String>,
        pub scheme: Option<String>,
        pub http_headers: Vec<HttpHeader>,
    }
}

message! {
    pub struct TcpHealthCheck {
        pub host: Option<String>,
        pub port: u32,
    }
}

message! {
    pub struct ExecHealthCheck {
        pub command: Vec<String>,
    }
}

message! {
    pub struct GrpcHealthCheck {
        pub port: u32,
        pub service: Option<String>,
    }
}

message! {
    pub struct ReadinessProbe {
        pub initial_delay_seconds: Option<i32>,
        pub timeout_seconds: Option<i32>,
        pub period_seconds: Option<i32>,
        pub success_threshold: Option<i32>,
        pub failure_threshold: Option<i32>,
        pub http_get: Option<HttpHealthCheck>,
        pub tcp_socket: Option<TcpHealthCheck>,
        pub exec: Option<ExecHealthCheck>,
        pub grpc: Option<GrpcHealthCheck>,
    }
}

message! {
    pub struct WorkloadGroup {
        pub metadata: Option<WorkloadGroupObjectMeta>,
        pub template: WorkloadEntry,
        pub probe: Option<ReadinessProbe>,
    }
}

// ---------------------------------------------------------------- Sidecar

enumeration! {
    pub enum CaptureMode { Default, Iptables, None }
}

message! {
    pub struct IstioIngressListener {
        pub port: Option<Port>,
        pub bind: Option<String>,
        pub capture_mode: Option<CaptureMode>,
        pub default_endpoint: Option<String>,
        pub tls: Option<ServerTlsSettings>,
        pub connection_pool: Option<ConnectionPoolSettings>,
    }
}

message! {
    pub struct IstioEgressListener {
        pub port: Option<Port>,
        pub bind: Option<String>,
        pub capture_mode: Option<CaptureMode>,
        pub hosts: Vec<String>,
    }
}

enumeration! {
    pub enum OutboundTrafficMode { RegistryOnly, AllowAny }
}

message! {
    pub struct OutboundTrafficPolicy {
        pub mode: Option<OutboundTrafficMode>,
        pub egress_proxy: Option<Destination>,
    }
}

message! {
    pub struct Sidecar {
        pub workload_selector: Option<LabelSelector>,
        pub ingress: Vec<IstioIngressListener>,
        pub egress: Vec<IstioEgressListener>,
        pub inbound_connection_pool: Option<ConnectionPoolSettings>,
        pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    }
}

// ---------------------------------------------------------------- security.istio.io

enumeration! {
    pub enum MtlsMode { Unset, Disable, Permissive, Strict }
}

message! {
    pub struct MutualTls {
        pub mode: Option<MtlsMode>,
    }
}

message! {
    pub struct PeerAuthentication {
        pub selector: Option<WorkloadSelector>,
        pub mtls: Option<MutualTls>,
        #[serde(deserialize_with = "port_keyed")]
        pub port_level_mtls: BTreeMap<u32, MutualTls>,
    }
}

message! {
    pub struct JwtHeader {
        pub name: String,
        pub prefix: Option<String>,
    }
}

message! {
    pub struct ClaimToHeader {
        pub header: String,
        pub claim: String,
    }
}

message! {
    pub struct JwtRule {
        pub issuer: String,
        pub audiences: Vec<String>,
        pub jwks_uri: Option<String>,
        pub jwks: Option<String>,
        pub from_headers: Vec<JwtHeader>,
        pub from_params: Vec<String>,
        pub from_cookies: Vec<String>,
        pub output_payload_to_header: Option<String>,
        pub forward_original_token: Option<bool>,
        pub output_claim_to_headers: Vec<ClaimToHeader>,
        pub timeout: Option<Duration>,
    }
}

message! {
    pub struct RequestAuthentication {
        pub selector: Option<WorkloadSelector>,
        pub target_ref: Option<PolicyTargetReference>,
        pub target_refs: Vec<PolicyTargetReference>,
        pub jwt_rules: Vec<JwtRule>,
    }
}

enumeration! {
    pub enum AuthorizationAction { Allow, Deny, Audit, Custom }
}

message! {
    pub struct ExtensionProvider {
        pub name: String,
    }
}

message! {
    pub struct Source {
        pub principals: Vec<String>,
        pub not_principals: Vec<String>,
        pub request_principals: Vec<String>,
        pub not_request_principals: Vec<String>,
        pub namespaces: Vec<String>,
        pub not_namespaces: Vec<String>,
        pub service_accounts: Vec<String>,
        pub not_service_accounts: Vec<String>,
        pub ip_blocks: Vec<IpBlock>,
        pub not_ip_blocks: Vec<IpBlock>,
        pub remote_ip_blocks: Vec<IpBlock>,
        pub not_remote_ip_blocks: Vec<IpBlock>,
    }
}

message! {
    pub struct Operation {
        pub hosts: Vec<String>,
        pub not_hosts: Vec<String>,
        pub ports: Vec<String>,
        pub not_ports: Vec<String>,
        pub methods: Vec<String>,
        pub not_methods: Vec<String>,
        pub paths: Vec<String>,
        pub not_paths: Vec<String>,
    }
}

message! {
    pub struct RuleFrom {
        pub source: Source,
    }
}

message! {
    pub struct RuleTo {
        pub operation: Operation,
    }
}

message! {
    pub struct Condition {
        pub key: String,
        pub values: Vec<String>,
        pub not_values: Vec<String>,
    }
}

message! {
    pub struct Rule {
        pub from: Vec<RuleFrom>,
        pub to: Vec<RuleTo>,
        pub when: Vec<Condition>,
    }
}

message! {
    pub struct AuthorizationPolicy {
        pub selector: Option<WorkloadSelector>,
        pub target_ref: Option<PolicyTargetReference>,
        pub target_refs: Vec<PolicyTargetReference>,
        pub rules: Vec<Rule>,
        pub action: Option<AuthorizationAction>,
        pub provider: Option<ExtensionProvider>,
    }
}

// ---------------------------------------------------------------- telemetry.istio.io

message! {
    pub struct ProviderRef {
        pub name: String,
    }
}

enumeration! {
    pub enum WorkloadMode { ClientAndServer, Client, Server }
}

message! {
    pub struct TracingSelector {
        pub mode: Option<WorkloadMode>,
    }
}

message! {
    pub struct Literal {
        pub value: String,
    }
}

message! {
    pub struct EnvironmentTag {
        pub name: String,
        pub default_value: Option<String>,
    }
}

message! {
    pub struct RequestHeaderTag {
        pub name: String,
        pub default_value: Option<String>,
    }
}

message! {
    pub struct CustomTag {
        pub literal: Option<Literal>,
        pub environment: Option<EnvironmentTag>,
        pub header: Option<RequestHeaderTag>,
    }
}

message! {
    pub struct Tracing {
        #[serde(rename = "match")]
        pub selector: Option<TracingSelector>,
        pub providers: Vec<ProviderRef>,
        pub random_sampling_percentage: Option<f64>,
        pub disable_span_reporting: Option<bool>,
        pub custom_tags: Map<CustomTag>,
        pub use_request_id_for_trace_sampling: Option<bool>,
    }
}

enumeration! {
    pub enum IstioMetric {
        AllMetrics,
        RequestCount,
        RequestDuration,
        RequestSize,
        ResponseSize,
        TcpOpenedConnections,
        TcpClosedConnections,
        TcpSentBytes,
        TcpReceivedBytes,
        GrpcRequestMessages,
        GrpcResponseMessages,
    }
}

message! {
    pub struct MetricSelector {
        pub metric: Option<IstioMetric>,
        pub custom_metric: Option<String>,
        pub mode: Option<WorkloadMode>,
    }
}

enumeration! {
    pub enum TagOperation { Upsert, Remove }
}

message! {
    pub struct TagOverride {
        pub operation: Option<TagOperation>,
        pub value: Option<String>,
    }
}

message! {
    pub struct MetricsOverrides {
        #[serde(rename = "match")]
        pub selector: Option<MetricSelector>,
        pub disabled: Option<bool>,
        pub tag_overrides: Map<TagOverride>,
    }
}

message! {
    pub struct Metrics {
        pub providers: Vec<ProviderRef>,
        pub overrides: Vec<MetricsOverrides>,
        pub reporting_interval: Option<Duration>,
    }
}

message! {
    pub struct AccessLogFilter {
        pub expression: String,
    }
}

message! {
    pub struct AccessLogging {
        #[serde(rename = "match")]
        pub selector: Option<TracingSelector>,
        pub providers: Vec<ProviderRef>,
        pub disabled: Option<bool>,
        pub filter: Option<AccessLogFilter>,
    }
}

message! {
    pub struct Telemetry {
        pub selector: Option<WorkloadSelector>,
        pub target_ref: Option<PolicyTargetReference>,
        pub target_refs: Vec<PolicyTargetReference>,
        pub tracing: Vec<Tracing>,
        pub metrics: Vec<Metrics>,
        pub access_logging: Vec<AccessLogging>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit_and_bad_ones() {
        assert_eq!(parse_duration("1s"), Ok(std::time::Duration::from_secs(1)));
        assert_eq!(
            parse_duration("250ms"),
            Ok(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            parse_duration("1h30m"),
            Ok(std::time::Duration::from_secs(5400))
        );
        assert_eq!(
            parse_duration("0.5s"),
            Ok(std::time::Duration::from_millis(500))
        );
        for bad in ["", "1", "s", "1x", "1.2.3s", "-1s", "10 s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn port_level_mtls_ports_are_numbers_in_yaml_and_strings_from_the_api() {
        let from_yaml: PeerAuthentication =
            serde_norway::from_str("portLevelMtls: {80: {mode: DISABLE}}").expect("yaml");
        let from_api: PeerAuthentication =
            serde_norway::from_str("portLevelMtls: {'80': {mode: DISABLE}}").expect("api");
        assert_eq!(from_yaml, from_api);
        assert_eq!(from_api.port_level_mtls[&80].mode, Some(MtlsMode::Disable));
        for bad in ["{'http': {}}", "{-1: {}}", "{4294967296: {}}"] {
            let text = format!("portLevelMtls: {bad}");
            assert!(
                serde_norway::from_str::<PeerAuthentication>(&text).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn cidrs_and_addresses() {
        assert!(parse_ip_block("10.0.0.0/8").is_ok());
        assert!(parse_ip_block("192.168.1.7").is_ok());
        assert!(parse_ip_block("2001:db8::/32").is_ok());
        assert!(parse_ip_block("10.0.0.0/33").is_err());
        assert!(parse_ip_block("10.0.0/8").is_err());
        assert!(parse_ip_block("fe80::/129").is_err());
    }
}
