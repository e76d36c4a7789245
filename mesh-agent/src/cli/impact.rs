//! The mesh's own cost, measured, for `meshctl impact` and the dashboard: what the
//! agents spent over a window (CPU seconds, resident memory, time inside the agent per
//! request, policy evaluation time) projected to a request rate, beside the same figures
//! for a sidecar mesh from Istio's published numbers.
//!
//! How it projects: CPU grows with the load (the agents' cores per request rate measured,
//! times the rate asked for — their idle cost included, so it errs high); memory is the
//! agents' resident memory as measured (one agent per node, whatever the rate); latency
//! and policy time are per request and do not depend on the rate while cores are free.
//! A sidecar mesh puts two proxies on each request's path (the client's and the
//! server's), each 0.20 vCPU and 60 MB per 1000 requests per second, and adds 2.65 ms at
//! the 90th percentile (Istio's performance figures). A month is 730 hours.

use serde::Serialize;

use crate::cli::{
    graph::{quantile, Buckets},
    scrape::Window,
};

/// Istio's published sidecar figures.
pub const SIDECAR_VCPU_PER_1000_RPS: f64 = 0.20;
pub const SIDECAR_MIB_PER_1000_RPS: f64 = 60.0;
pub const SIDECAR_P90_MS: f64 = 2.65;
/// Sidecars on a request's path: the client's and the server's.
pub const SIDECARS_PER_REQUEST: f64 = 2.0;
pub const HOURS_PER_MONTH: f64 = 730.0;
/// Default prices: on-demand list prices of a general-purpose cloud VM (GCP e2,
/// us-central1), per vCPU-hour and per GiB-hour.
pub const DEFAULT_VCPU_HOUR: f64 = 0.021811;
pub const DEFAULT_GIB_HOUR: f64 = 0.002923;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prices {
    pub vcpu_hour: f64,
    pub gib_hour: f64,
}

/// A request's time inside one side's agents.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentTime {
    pub requests: f64,
    pub mean_ms: Option<f64>,
    pub p90_ms: Option<f64>,
}

/// What the agents measured over the window, all agents together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    pub window_seconds: f64,
    pub agents: usize,
    /// Requests through the mesh, each counted once.
    pub requests_per_second: f64,
    /// CPU cores the agents used; none when an agent does not export its CPU time.
    pub cpu_cores: Option<f64>,
    pub memory_mib: Option<f64>,
    /// Time inside the source agent (it routed the request) and the destination agent
    /// (it judged it).
    pub source_agent: AgentTime,
    pub destination_agent: AgentTime,
    /// The sum of both sides: what a request crossing both agents gains.
    pub latency_added_mean_ms: Option<f64>,
    pub latency_added_p90_ms: Option<f64>,
    pub policy_evaluations: f64,
    pub policy_evaluation_mean_us: Option<f64>,
    pub policy_evaluation_p90_us: Option<f64>,
}

/// One mesh's figures at the projected rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Costs {
    pub latency_added_p90_ms: Option<f64>,
    pub policy_evaluation_us: Option<f64>,
    pub memory_mib: Option<f64>,
    pub cpu_cores: Option<f64>,
    pub monthly_cost: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Impact {
    pub measured: Measured,
    /// The request rate the figures are projected to.
    pub requests_per_second: f64,
    pub prices: Prices,
    pub mesh: Costs,
    pub sidecar: Costs,
}

/// Sums, counts and buckets of one histogram over every agent's window.
#[derive(Default)]
struct Histogram {
    sum: f64,
    count: f64,
    buckets: Buckets,
}

impl Histogram {
    fn gather(windows: &[Window], name: &str, reporter: Option<&str>) -> Histogram {
        let mut histogram = Histogram::default();
        let (bucket, sum, count) = (
            format!("{name}_bucket"),
            format!("{name}_sum"),
            format!("{name}_count"),
        );
        for sample in windows.iter().flat_map(|w| &w.samples) {
            if reporter.is_some_and(|r| sample.label("reporter") != r) {
                continue;
            }
            if sample.name == bucket {
                *histogram
                    .buckets
                    .entry(sample.label("le").to_owned())
                    .or_default() += sample.value;
            } else if sample.name == sum {
                histogram.sum += sample.value;
            } else if sample.name == count {
                histogram.count += sample.value;
            }
        }
        histogram
    }

    /// The mean and the 90th percentile, scaled (seconds to `scale` units).
    fn mean_p90(&self, scale: f64) -> (Option<f64>, Option<f64>) {
        let mean = (self.count > 0.0).then(|| self.sum / self.count * scale);
        (mean, quantile(0.9, &self.buckets).map(|v| v * scale))
    }
}

/// A figure every agent exported, summed; none when one did not.
fn every_agent(windows: &[Window], name: &str, each: impl Fn(&Window, f64) -> f64) -> Option<f64> {
    if windows.is_empty() {
        return None;
    }
    windows
        .iter()
        .map(|w| {
            w.samples
                .iter()
                .find(|s| s.name == name && s.labels.is_empty())
                .map(|s| each(w, s.value))
        })
        .sum()
}

/// What the agents measured: `requests_per_second` is the graph's total (each request
/// once).
pub fn measure(windows: &[Window], requests_per_second: f64) -> Measured {
    let cpu_cores = every_agent(windows, "process_cpu_seconds_total", |w, seconds| {
        if w.seconds > 0.0 {
            seconds / w.seconds
        } else {
            0.0
        }
    });
    let memory_mib = every_agent(windows, "process_resident_memory_bytes", |_, bytes| {
        bytes / (1024.0 * 1024.0)
    });
    let side = |reporter: &str| {
        let histogram = Histogram::gather(windows, "mesh_request_agent_seconds", Some(reporter));
        let (mean_ms, p90_ms) = histogram.mean_p90(1e3);
        AgentTime {
            requests: histogram.count,
            mean_ms,
            p90_ms,
        }
    };
    let (source_agent, destination_agent) = (side("source"), side("destination"));
    let both = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    };
    let policy = Histogram::gather(windows, "mesh_policy_evaluation_seconds", None);
    let (policy_mean, policy_p90) = policy.mean_p90(1e6);
    Measured {
        window_seconds: windows.iter().map(|w| w.seconds).fold(0.0, f64::max),
        agents: windows.len(),
        requests_per_second,
        cpu_cores,
        memory_mib,
        latency_added_mean_ms: both(source_agent.mean_ms, destination_agent.mean_ms),
        latency_added_p90_ms: both(source_agent.p90_ms, destination_agent.p90_ms),
        source_agent,
        destination_agent,
        policy_evaluations: policy.count,
        policy_evaluation_mean_us: policy_mean,
        policy_evaluation_p90_us: policy_p90,
    }
}

fn monthly(cores: Option<f64>, memory_mib: Option<f64>, prices: &Prices) -> Option<f64> {
    Some((cores? * prices.vcpu_hour + memory_mib? / 1024.0 * prices.gib_hour) * HOURS_PER_MONTH)
}

/// The figures at `rps` requests per second (the measured rate when none is given).
pub fn project(measured: Measured, rps: Option<f64>, prices: Prices) -> Impact {
    let target = rps.unwrap_or(measured.requests_per_second);
    let cores = measured.cpu_cores.and_then(|cores| {
        if rps.is_none() {
            Some(cores)
        } else {
            (measured.requests_per_second > 0.0)
                .then(|| cores / measured.requests_per_second * target)
        }
    });
    let mesh = Costs {
        latency_added_p90_ms: measured.latency_added_p90_ms,
        policy_evaluation_us: measured.policy_evaluation_mean_us,
        memory_mib: measured.memory_mib,
        cpu_cores: cores,
        monthly_cost: monthly(cores, measured.memory_mib, &prices),
    };
    let sidecar_cores = SIDECARS_PER_REQUEST * SIDECAR_VCPU_PER_1000_RPS * target / 1000.0;
    let sidecar_memory = SIDECARS_PER_REQUEST * SIDECAR_MIB_PER_1000_RPS * target / 1000.0;
    let sidecar = Costs {
        latency_added_p90_ms: Some(SIDECAR_P90_MS),
        policy_evaluation_us: None,
        memory_mib: Some(sidecar_memory),
        cpu_cores: Some(sidecar_cores),
        monthly_cost: monthly(Some(sidecar_cores), Some(sidecar_memory), &prices),
    };
    Impact {
        measured,
        requests_per_second: target,
        prices,
        mesh,
        sidecar,
    }
}

/// The table rows: figure, this mesh, sidecars.
pub fn rows(impact: &Impact) -> Vec<[String; 3]> {
    use crate::cli::graph::figure;
    let (m, s) = (&impact.mesh, &impact.sidecar);
    let money = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("${v:.2}"));
    let unit = |v: Option<f64>, decimals: usize, unit: &str| {
        v.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$} {unit}"))
    };
    vec![
        [
            "requests per second".into(),
            figure(Some(impact.requests_per_second), 1),
            figure(Some(impact.requests_per_second), 1),
        ],
        [
            "latency added (p90)".into(),
            unit(m.latency_added_p90_ms, 3, "ms"),
            unit(s.latency_added_p90_ms, 3, "ms"),
        ],
        [
            "policy evaluation (mean)".into(),
            unit(m.policy_evaluation_us, 1, "µs"),
            unit(s.policy_evaluation_us, 1, "µs"),
        ],
        [
            "memory".into(),
            unit(m.memory_mib, 1, "MiB"),
            unit(s.memory_mib, 1, "MiB"),
        ],
        [
            "extra CPU cores".into(),
            figure(m.cpu_cores, 3),
            figure(s.cpu_cores, 3),
        ],
        [
            "monthly cost".into(),
            money(m.monthly_cost),
            money(s.monthly_cost),
        ],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::scrape::parse;

    fn window(text: &str, seconds: f64) -> Window {
        Window {
            url: "http://a:1/metrics".into(),
            seconds,
            samples: parse(text).expect("parsed"),
        }
    }

    const PRICES: Prices = Prices {
        vcpu_hour: 0.04,
        gib_hour: 0.005,
    };

    fn measured() -> Measured {
        // Two agents over 10 s: 1 and 0.5 CPU seconds, 30 and 34 MiB; four requests
        // timed at each side, two policy evaluations.
        let a = window(
            "process_cpu_seconds_total 1\nprocess_resident_memory_bytes 31457280\n\
             mesh_request_agent_seconds_bucket{reporter=\"source\",le=\"0.0001\"} 0\n\
             mesh_request_agent_seconds_bucket{reporter=\"source\",le=\"0.001\"} 4\n\
             mesh_request_agent_seconds_bucket{reporter=\"source\",le=\"+Inf\"} 4\n\
             mesh_request_agent_seconds_sum{reporter=\"source\"} 0.002\n\
             mesh_request_agent_seconds_count{reporter=\"source\"} 4\n",
            10.0,
        );
        let b = window(
            "process_cpu_seconds_total 0.5\nprocess_resident_memory_bytes 35651584\n\
             mesh_request_agent_seconds_bucket{reporter=\"destination\",le=\"0.0001\"} 2\n\
             mesh_request_agent_seconds_bucket{reporter=\"destination\",le=\"0.001\"} 4\n\
             mesh_request_agent_seconds_bucket{reporter=\"destination\",le=\"+Inf\"} 4\n\
             mesh_request_agent_seconds_sum{reporter=\"destination\"} 0.0008\n\
             mesh_request_agent_seconds_count{reporter=\"destination\"} 4\n\
             mesh_policy_evaluation_seconds_bucket{le=\"0.00001\"} 2\n\
             mesh_policy_evaluation_seconds_bucket{le=\"+Inf\"} 2\n\
             mesh_policy_evaluation_seconds_sum 0.000008\n\
             mesh_policy_evaluation_seconds_count 2\n",
            10.0,
        );
        measure(&[a, b], 50.0)
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn measured_figures_sum_the_agents() {
        let m = measured();
        assert_eq!((m.agents, m.window_seconds), (2, 10.0));
        assert!(close(m.cpu_cores, 0.15), "{m:?}");
        assert!(close(m.memory_mib, 64.0), "{m:?}");
        assert_eq!(m.source_agent.requests, 4.0);
        assert!(close(m.source_agent.mean_ms, 0.5));
        // Rank 3.6 of 4, all in (0.1 ms, 1 ms]: 0.1 + 0.9 × 0.9.
        assert!(close(m.source_agent.p90_ms, 0.91), "{m:?}");
        assert!(close(m.destination_agent.mean_ms, 0.2));
        // Rank 3.6: 1.6 of the 2 in (0.1, 1]: 0.1 + 0.9 × 0.8.
        assert!(close(m.destination_agent.p90_ms, 0.82), "{m:?}");
        assert!(close(m.latency_added_mean_ms, 0.7));
        assert!(close(m.latency_added_p90_ms, 1.73));
        assert_eq!(m.policy_evaluations, 2.0);
        assert!(close(m.policy_evaluation_mean_us, 4.0));
        assert!(close(m.policy_evaluation_p90_us, 9.0));
    }

    #[test]
    fn projection_scales_cpu_with_the_rate_and_keeps_memory_and_latency() {
        let impact = project(measured(), Some(1000.0), PRICES);
        assert_eq!(impact.requests_per_second, 1000.0);
        // 0.15 cores at 50 rps → 3 cores at 1000.
        assert!(close(impact.mesh.cpu_cores, 3.0), "{impact:?}");
        assert!(close(impact.mesh.memory_mib, 64.0));
        assert!(close(impact.mesh.latency_added_p90_ms, 1.73));
        assert!(close(impact.mesh.policy_evaluation_us, 4.0));
        // (3 × 0.04 + 0.0625 × 0.005) × 730.
        assert!(close(impact.mesh.monthly_cost, 87.828125), "{impact:?}");
        // Two sidecars: 0.4 vCPU and 120 MiB per 1000 rps.
        assert!(close(impact.sidecar.cpu_cores, 0.4));
        assert!(close(impact.sidecar.memory_mib, 120.0));
        assert!(close(impact.sidecar.latency_added_p90_ms, 2.65));
        assert_eq!(impact.sidecar.policy_evaluation_us, None);
        // (0.4 × 0.04 + 120/1024 × 0.005) × 730.
        assert!(close(
            impact.sidecar.monthly_cost,
            (0.016 + 120.0 / 1024.0 * 0.005) * 730.0
        ));
        let rows = rows(&impact);
        assert_eq!(
            rows[4],
            ["extra CPU cores".to_owned(), "3.000".into(), "0.400".into()]
        );
        assert_eq!(rows[5][1], "$87.83");
    }

    #[test]
    fn without_a_rate_the_measured_one_is_kept_and_without_traffic_cpu_is_not_projected() {
        let impact = project(measured(), None, PRICES);
        assert_eq!(impact.requests_per_second, 50.0);
        assert!(close(impact.mesh.cpu_cores, 0.15));
        let idle = Measured {
            requests_per_second: 0.0,
            ..measured()
        };
        let impact = project(idle, Some(1000.0), PRICES);
        assert_eq!(
            (impact.mesh.cpu_cores, impact.mesh.monthly_cost),
            (None, None)
        );
        // An agent without process metrics: no CPU or memory figure at all.
        let partial = measure(
            &[
                window("process_cpu_seconds_total 1\n", 1.0),
                window("other 1\n", 1.0),
            ],
            1.0,
        );
        assert_eq!((partial.cpu_cores, partial.memory_mib), (None, None));
    }
}
