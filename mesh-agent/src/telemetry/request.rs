//! The outcome of one routed request, recorded in one place for the metrics and the
//! access log: its route, the endpoint (and pod) that served it, the response code,
//! Envoy's response flags, the number of tries and the duration.

use std::{fmt, net::SocketAddrV4, sync::Arc, time::Duration};

use http::StatusCode;

use crate::model::Workload;

/// Envoy's response flags, as its access logs spell them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    /// `UH`: no healthy upstream.
    NoHealthyUpstream,
    /// `UF`: upstream connection failure.
    UpstreamConnectionFailure,
    /// `UO`: upstream overflow (circuit breaking).
    UpstreamOverflow,
    /// `NR`: no route configured.
    NoRoute,
    /// `URX`: upstream retry limit exceeded.
    UpstreamRetryLimitExceeded,
    /// `UT`: upstream request timeout.
    UpstreamTimeout,
    /// `DI`: the request was delayed by fault injection.
    DelayInjected,
    /// `FI`: the request was aborted by fault injection.
    FaultInjected,
    /// `RL`: rate limited locally.
    RateLimited,
    /// `UC`: upstream connection termination.
    UpstreamConnectionTermination,
}

impl ResponseFlag {
    /// In the order Envoy writes them.
    const ALL: [ResponseFlag; 10] = [
        ResponseFlag::NoHealthyUpstream,
        ResponseFlag::UpstreamTimeout,
        ResponseFlag::UpstreamConnectionFailure,
        ResponseFlag::UpstreamConnectionTermination,
        ResponseFlag::UpstreamOverflow,
        ResponseFlag::NoRoute,
        ResponseFlag::DelayInjected,
        ResponseFlag::FaultInjected,
        ResponseFlag::RateLimited,
        ResponseFlag::UpstreamRetryLimitExceeded,
    ];

    pub fn code(self) -> &'static str {
        match self {
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::UpstreamTimeout => "UT",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::UpstreamConnectionTermination => "UC",
        }
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// A request's response flags: a set, written as Envoy writes it (comma-separated in
/// Envoy's order, `-` for none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u16);

impl ResponseFlags {
    pub fn insert(&mut self, flag: ResponseFlag) {
        self.0 |= flag.bit();
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut set = ResponseFlag::ALL
            .iter()
            .filter(|flag| self.0 & flag.bit() != 0);
        match set.next() {
            None => f.write_str("-"),
            Some(first) => {
                f.write_str(first.code())?;
                set.try_for_each(|flag| write!(f, ",{}", flag.code()))
            }
        }
    }
}

/// One routed request's outcome.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// The Service the client addressed.
    pub service: String,
    /// The route that took it (`None` when none did).
    pub route: Option<String>,
    /// The endpoint of the last try, and the meshed pod behind it.
    pub upstream: Option<SocketAddrV4>,
    pub destination: Option<Arc<Workload>>,
    /// The last try crossed nodes over mutual TLS.
    pub mutual_tls: bool,
    /// Envoy's name of the cluster it was sent to (`outbound|port|subset|host`).
    pub cluster: Option<String>,
    pub status: Option<StatusCode>,
    pub flags: ResponseFlags,
    /// Tries made (the first one and the retries).
    pub attempts: u32,
    pub duration: Duration,
    /// Time spent waiting for upstream response heads: every try and the backoff between
    /// tries (what Envoy reports as `x-envoy-upstream-service-time`).
    pub upstream_wait: Duration,
}

impl RequestRecord {
    pub fn new(service: &str) -> RequestRecord {
        RequestRecord {
            service: service.to_owned(),
            route: None,
            upstream: None,
            destination: None,
            mutual_tls: false,
            cluster: None,
            status: None,
            flags: ResponseFlags::default(),
            attempts: 0,
            duration: Duration::ZERO,
            upstream_wait: Duration::ZERO,
        }
    }

    pub fn flag(&mut self, flag: ResponseFlag) {
        self.flags.insert(flag);
    }

    pub fn finish(&mut self, status: StatusCode, duration: Duration) {
        self.status = Some(status);
        self.duration = duration;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_written_as_envoy_writes_them() {
        let mut record = RequestRecord::new("reviews.shop.svc.cluster.local");
        assert_eq!(record.flags.to_string(), "-");
        record.flag(ResponseFlag::UpstreamConnectionFailure);
        record.flag(ResponseFlag::UpstreamRetryLimitExceeded);
        record.flag(ResponseFlag::UpstreamConnectionFailure);
        assert_eq!(record.flags.to_string(), "UF,URX");
        record.flag(ResponseFlag::NoHealthyUpstream);
        assert_eq!(record.flags.to_string(), "UH,UF,URX");
    }
}
