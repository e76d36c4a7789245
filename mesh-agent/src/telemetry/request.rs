//! The outcome of one routed request, recorded in one place for the metrics, the access
//! log and (later) the request telemetry: its route, the endpoint that served it, the
//! response code, Envoy's response flags, the number of tries and the duration.

use std::{fmt, net::SocketAddrV4, time::Duration};

use http::StatusCode;

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
}

/// One routed request's outcome.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// The Service the client addressed.
    pub service: String,
    /// The route that took it (`None` when none did).
    pub route: Option<String>,
    /// The endpoint of the last try.
    pub upstream: Option<SocketAddrV4>,
    pub status: Option<StatusCode>,
    flags: Vec<ResponseFlag>,
    /// Tries made (the first one and the retries).
    pub attempts: u32,
    pub duration: Duration,
}

impl RequestRecord {
    pub fn new(service: &str) -> RequestRecord {
        RequestRecord {
            service: service.to_owned(),
            route: None,
            upstream: None,
            status: None,
            flags: Vec::new(),
            attempts: 0,
            duration: Duration::ZERO,
        }
    }

    pub fn flag(&mut self, flag: ResponseFlag) {
        if !self.flags.contains(&flag) {
            self.flags.push(flag);
        }
    }

    pub fn finish(&mut self, status: StatusCode, duration: Duration) {
        self.status = Some(status);
        self.duration = duration;
    }

    /// The flags as Envoy writes them: comma-separated, `-` for none.
    pub fn flags(&self) -> Flags<'_> {
        Flags(&self.flags)
    }
}

pub struct Flags<'a>(&'a [ResponseFlag]);

impl fmt::Display for Flags<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("-");
        }
        for (i, flag) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(flag.code())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_written_as_envoy_writes_them() {
        let mut record = RequestRecord::new("reviews.shop.svc.cluster.local");
        assert_eq!(record.flags().to_string(), "-");
        record.flag(ResponseFlag::UpstreamConnectionFailure);
        record.flag(ResponseFlag::UpstreamRetryLimitExceeded);
        record.flag(ResponseFlag::UpstreamConnectionFailure);
        assert_eq!(record.flags().to_string(), "UF,URX");
    }
}
