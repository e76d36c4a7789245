//! `cargo xtask bench [--quick] [-o json]`: the mesh's overhead, measured against a no-mesh
//! baseline taken in the same run. The bench sandbox (`deploy/bench`) holds the same
//! client and servers twice: in namespace `bench` (meshed) and `plain` (opted out, routed
//! directly). Each scenario runs on both, for servers on the client's node
//! (`same-node-l4`, carried pod to pod by the kernel alone; `same-node-l4-spliced`, by the
//! agent spliced in the kernel; `same-node-l4-copied`, copied through the agent), on
//! the other node (`cross-node-mtls`), and on the other node behind
//! an L7 AuthorizationPolicy (`l7-policy`, HTTP scenarios only), and on the other node
//! through a Service whose VirtualService the client's agent applies to every request
//! (`l7-routing`: a header match, a weighted split, retries), repeated to give a median
//! and a spread. Request telemetry's cost is the destination agent's CPU per request on
//! the `l7-policy` server against a twin whose Telemetry turns request metrics off,
//! alternated. Results go to the terminal as a table and to `target/bench/` as JSON.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::{
    api_scale::{self, ApiScale},
    build, progress, require_root,
    sandbox::{self, command_in, ExecTarget, SandboxState},
    setup, workspace,
};

/// The paths each scenario runs on: (path, baseline server in `plain`, mesh server in
/// `bench`). `l7-policy`: the server across nodes behind an AuthorizationPolicy that
/// needs the request (method and path), so the destination agent parses and judges each
/// one. `same-node-l4`: the kernel carries the flows pod to pod (nothing for the agent to
/// do). `same-node-l4-spliced`: the same-node server labelled `mesh/bypass: "false"`, so
/// the agent carries its flows, spliced in the kernel. `same-node-l4-copied`: labelled
/// `mesh/splice: "false"`, so they are copied through the agent.
/// `l7-routing`: the server across nodes through a Service whose VirtualService (a header
/// match, a weighted split, retries) the client's agent applies to every request.
const PATHS: [(&str, &str, &str); 6] = [
    ("same-node-l4", "server-near", "server-near"),
    ("same-node-l4-spliced", "server-near", "server-near-spliced"),
    ("same-node-l4-copied", "server-near", "server-near-copied"),
    ("cross-node-mtls", "server-far", "server-far"),
    ("l7-policy", "server-far", "server-l7"),
    ("l7-routing", "server-far", "server-routed"),
];
/// Throughput is measured on the L4 paths only: iperf3 does not speak HTTP.
const THROUGHPUT: [(&str, &str); 2] = [("throughput-1-stream", "1"), ("throughput-8-streams", "8")];
const LATENCY: [(&str, &str); 2] = [("latency-http1", "http1"), ("latency-http2", "http2")];
const LATENCY_METRICS: [(&str, &str); 4] =
    [("p50", "ms"), ("p90", "ms"), ("p99", "ms"), ("p99.9", "ms")];
const CHURN_METRICS: [(&str, &str); 3] = [
    ("connections-per-second", "conn/s"),
    ("p50", "ms"),
    ("p99", "ms"),
];
/// The kernel programs whose cost per run is reported: every one runs in any scenario.
const PROGRAMS: [&str; 3] = ["tc_from_pod", "tc_to_pod", "sockops_flows"];

/// Every figure a complete run reports, as (scenario, path, metric): `cargo xtask test`
/// checks the quick run's report against it.
pub fn expected_figures() -> Vec<(&'static str, &'static str, &'static str)> {
    let mut figures = Vec::new();
    for (path, _, _) in PATHS {
        if !path.starts_with("l7-") {
            for (scenario, _) in THROUGHPUT {
                figures.push((scenario, path, "throughput"));
            }
        }
        for (scenario, _) in LATENCY {
            for (metric, _) in LATENCY_METRICS {
                figures.push((scenario, path, metric));
            }
        }
        figures.push(("requests-keep-alive", path, "requests-per-second"));
        figures.push(("agent-cpu", path, "cpu-per-request"));
        figures.push(("agent-cpu", path, "cpu-per-request-busiest-agent"));
        for (metric, _) in CHURN_METRICS {
            figures.push(("connection-churn", path, metric));
        }
    }
    figures.push(("request-telemetry", "destination-agent", "cpu-per-request"));
    for (scenario, metrics) in SCALE_FIGURES {
        for (metric, _) in metrics {
            figures.push((scenario, SCALE_PATH, metric));
        }
    }
    for (scenario, metric, _) in api_scale::FIGURES {
        figures.push((scenario, api_scale::PATH, metric));
    }
    figures.push(("agent-rss", "per-agent", "idle"));
    figures.push(("agent-rss", "per-agent", "under-load"));
    for program in PROGRAMS {
        figures.push(("bpf-program-cost", program, "ns-per-run"));
    }
    figures
}

/// Whether a scenario's figures are compared with the no-mesh baseline (its median,
/// the ratio and the baseline's spread); the agents' own figures are not. For
/// `idle-connections-closed`, the "baseline" is the agents before the connections opened.
pub fn has_baseline(scenario: &str) -> bool {
    !matches!(
        scenario,
        "agent-cpu" | "agent-rss" | "bpf-program-cost" | "idle-connections" | "api-pod-change"
    )
}

/// The scale scenarios run on the cross-node path, through both agents.
const SCALE_PATH: &str = "cross-node-mtls";
/// The scale scenarios' figures, as (scenario, [(metric, unit)]).
const SCALE_FIGURES: [(&str, &[(&str, &str)]); 3] = [
    (
        "idle-connections",
        &[
            ("memory-per-connection", "KiB (both agents)"),
            ("descriptors-per-connection", "fds (both agents)"),
        ],
    ),
    (
        "idle-connections-closed",
        &[
            ("agent-rss", "MB (both agents, before → after)"),
            ("agent-descriptors", "fds (both agents, before → after)"),
        ],
    ),
    (
        "sustained-churn",
        &[("connections-per-second", "conn/s"), ("p99", "ms")],
    ),
];
/// The rate of `sustained-churn`.
const SUSTAINED_RATE: &str = "1000";

#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub scenario: &'static str,
    pub path: &'static str,
    pub metric: &'static str,
    pub unit: &'static str,
    pub baseline: Option<f64>,
    pub mesh: f64,
    /// mesh / baseline.
    pub ratio: Option<f64>,
    /// (max - min) / median of the repetitions.
    pub baseline_spread: Option<f64>,
    pub mesh_spread: f64,
}

impl Measurement {
    /// A figure against its baseline, each with the spread of its repetitions.
    pub fn against_baseline(
        (scenario, path, metric, unit): (&'static str, &'static str, &'static str, &'static str),
        (baseline, baseline_spread): (f64, f64),
        (mesh, mesh_spread): (f64, f64),
    ) -> Measurement {
        Measurement {
            scenario,
            path,
            metric,
            unit,
            baseline: Some(baseline),
            mesh,
            ratio: (baseline != 0.0).then(|| mesh / baseline),
            baseline_spread: Some(baseline_spread),
            mesh_spread,
        }
    }

    /// A figure of the mesh alone (no baseline has it), with the spread of its
    /// repetitions.
    pub fn mesh_only(
        (scenario, path, metric, unit): (&'static str, &'static str, &'static str, &'static str),
        (mesh, mesh_spread): (f64, f64),
    ) -> Measurement {
        Measurement {
            scenario,
            path,
            metric,
            unit,
            baseline: None,
            mesh,
            ratio: None,
            baseline_spread: None,
            mesh_spread,
        }
    }
}

struct Settings {
    repetitions: usize,
    seconds: f64,
    /// Connections `idle-connections` holds open.
    idle_connections: usize,
    /// How long `sustained-churn` runs.
    sustained_seconds: f64,
    api_scale: ApiScale,
}

/// The cluster IP of `bench/server-routed` (`deploy/bench/cluster.yaml`): the
/// `l7-routing` path addresses the Service, as routing needs.
const ROUTED_SERVICE_IP: &str = "10.96.60.8";

/// The median; callers never pass an empty list (every scenario runs at least once).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn spread(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    let mid = median(&mut sorted);
    let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
    if mid == 0.0 {
        0.0
    } else {
        (max - min) / mid
    }
}

fn in_pod(pod: &str, program: &str, args: &[&str]) -> Result<String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = command_in(&ExecTarget::Pod(pod.into()), program, &args)?
        .output()
        .with_context(|| format!("running {program} in {pod}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} in {pod} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pod_ip(state: &SandboxState, pod: &str) -> Result<String> {
    Ok(state.pod(pod)?.ip.to_string())
}

/// CPU seconds a process has used, from /proc.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime (fields 14 and 15 of the line, 12 and 13 after the name).
    let field = |index: usize, name: &str| -> Result<f64> {
        fields
            .get(index)
            .and_then(|f| f.parse::<f64>().ok())
            .with_context(|| format!("/proc/{pid}/stat has no {name}"))
    };
    let ticks = field(11, "utime")? + field(12, "stime")?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / per_second)
}

pub fn rss_megabytes(pid: u32) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

/// Runs `measure` against the baseline and the mesh servers, `repetitions` times each,
/// interleaved so that drift of the machine hits both alike.
/// Per metric: the baseline's and the mesh's values over the repetitions.
type Samples = BTreeMap<&'static str, (Vec<f64>, Vec<f64>)>;

fn compare(
    settings: &Settings,
    mut measure: impl FnMut(&str) -> Result<BTreeMap<&'static str, f64>>,
    baseline_server: &str,
    mesh_server: &str,
) -> Result<Samples> {
    let mut out = Samples::new();
    for _ in 0..settings.repetitions {
        for (is_mesh, server) in [(false, baseline_server), (true, mesh_server)] {
            for (metric, value) in measure(server)? {
                let entry = out.entry(metric).or_default();
                if is_mesh {
                    entry.1.push(value);
                } else {
                    entry.0.push(value);
                }
            }
        }
    }
    Ok(out)
}

/// Adds the medians of each metric of `units`; a metric measured on neither side, or on
/// one only, is an error naming it (a broken scenario must not pass as a zero).
fn push_comparison(
    results: &mut Vec<Measurement>,
    scenario: &'static str,
    path: &'static str,
    units: &[(&'static str, &'static str)],
    mut values: Samples,
) -> Result<()> {
    for (metric, unit) in units {
        let (baseline, mesh) = values.remove(metric).unwrap_or_default();
        if baseline.is_empty() || mesh.is_empty() {
            bail!(
                "{path}: {scenario}: {metric} was not measured (baseline: {} runs, mesh: {} runs)",
                baseline.len(),
                mesh.len()
            );
        }
        let (mut b, mut m) = (baseline.clone(), mesh.clone());
        let (b_median, m_median) = (median(&mut b), median(&mut m));
        results.push(Measurement::against_baseline(
            (scenario, path, metric, unit),
            (b_median, spread(&baseline)),
            (m_median, spread(&mesh)),
        ));
    }
    Ok(())
}

/// The number `key` of a mesh-bench or iperf3 report; missing or not a finite number is
/// an error naming the field.
fn figure(report: &Value, key: &str) -> Result<f64> {
    report[key]
        .as_f64()
        .filter(|v| v.is_finite())
        .with_context(|| format!("the report has no number {key}: {report}"))
}

fn load(client: &str, target: &str, args: &[&str]) -> Result<Value> {
    let mut all = vec!["load", target];
    all.extend_from_slice(args);
    let out = in_pod(client, "mesh-bench", &all)?;
    let report: Value = serde_json::from_str(out.trim()).context("mesh-bench output")?;
    if report["errors"].as_u64().unwrap_or(0) > 0 {
        bail!("{client} → {target}: {} failed requests", report["errors"]);
    }
    Ok(report)
}

pub fn run(quick: bool, json: bool, only_api_scale: bool) -> Result<()> {
    require_root()?;
    setup::ensure()?;
    build(crate::cross::Arch::Amd64)?;
    let settings = if quick {
        Settings {
            repetitions: 1,
            seconds: 1.0,
            idle_connections: 1_000,
            sustained_seconds: 1.0,
            api_scale: ApiScale {
                pods: 1_000,
                services: 100,
                changes: 20,
            },
        }
    } else {
        Settings {
            repetitions: 3,
            seconds: 5.0,
            idle_connections: 10_000,
            sustained_seconds: 30.0,
            api_scale: ApiScale {
                pods: 10_000,
                services: 1_000,
                changes: 100,
            },
        }
    };
    if only_api_scale {
        return report(&api_scale::run(&settings.api_scale)?, json, quick);
    }
    sandbox::up(
        &workspace().join("deploy/bench"),
        sandbox::ConfigSource::Dir,
    )?;
    let stats = Path::new("/proc/sys/kernel/bpf_stats_enabled");
    let stats_before = fs::read_to_string(stats).unwrap_or_else(|_| "0".into());
    fs::write(stats, "1").context("enabling kernel.bpf_stats_enabled")?;
    let outcome = measure_all(&settings);
    let _ = fs::write(stats, stats_before.trim());
    progress("tearing the bench sandbox down");
    sandbox::down()?;
    let mut results = outcome?;
    results.extend(api_scale::run(&settings.api_scale)?);
    report(&results, json, quick)
}

fn measure_all(settings: &Settings) -> Result<Vec<Measurement>> {
    let state = SandboxState::load()?;
    let agents: Vec<u32> = state
        .nodes
        .iter()
        .map(|n| crate::supervise::agent_pid(&n.name))
        .collect();
    let mut results = Vec::new();
    let idle_rss: f64 = agents
        .iter()
        .map(|pid| rss_megabytes(*pid))
        .sum::<Result<f64>>()?
        / agents.len() as f64;
    let mut loaded_rss: f64 = 0.0;
    let seconds = settings.seconds.to_string();
    for (path, server, mesh_server) in PATHS {
        let baseline = pod_ip(&state, &format!("plain/{server}"))?;
        let mesh = if path == "l7-routing" {
            ROUTED_SERVICE_IP.to_owned()
        } else {
            pod_ip(&state, &format!("bench/{mesh_server}"))?
        };
        let client_of = |ip: &str| {
            if ip == baseline {
                "plain/client"
            } else {
                "bench/client"
            }
        };

        let streams_scenarios: &[(&str, &str)] = if path.starts_with("l7-") {
            &[]
        } else {
            &THROUGHPUT
        };
        for &(scenario, streams) in streams_scenarios {
            progress(&format!("{path}: {scenario}"));
            let values = compare(
                settings,
                |ip| {
                    let out = in_pod(
                        client_of(ip),
                        "iperf3",
                        &["-c", ip, "-p", "5201", "-t", &seconds, "-P", streams, "-J"],
                    )?;
                    let report: Value = serde_json::from_str(&out).context("iperf3 JSON")?;
                    let bits = figure(&report["end"]["sum_received"], "bits_per_second")?;
                    for pid in &agents {
                        loaded_rss = loaded_rss.max(rss_megabytes(*pid)?);
                    }
                    Ok(BTreeMap::from([("throughput", bits / 1e9)]))
                },
                &baseline,
                &mesh,
            )
            .with_context(|| format!("{path}: {scenario}"))?;
            push_comparison(
                &mut results,
                scenario,
                path,
                &[("throughput", "Gbit/s")],
                values,
            )?;
        }

        for (scenario, protocol) in LATENCY {
            progress(&format!(
                "{path}: {scenario} at 1000 rps over 4 connections"
            ));
            let values = compare(
                settings,
                |ip| {
                    let report = load(
                        client_of(ip),
                        &format!("{ip}:8080"),
                        &[
                            "--protocol",
                            protocol,
                            "--connections",
                            "4",
                            "--rate",
                            "1000",
                            "--seconds",
                            &seconds,
                        ],
                    )?;
                    let ms = |key: &str| figure(&report, key).map(|us| us / 1000.0);
                    Ok(BTreeMap::from([
                        ("p50", ms("p50_us")?),
                        ("p90", ms("p90_us")?),
                        ("p99", ms("p99_us")?),
                        ("p99.9", ms("p999_us")?),
                    ]))
                },
                &baseline,
                &mesh,
            )
            .with_context(|| format!("{path}: {scenario}"))?;
            push_comparison(&mut results, scenario, path, &LATENCY_METRICS, values)?;
        }

        progress(&format!(
            "{path}: keep-alive requests at the maximum rate, and the agents' CPU"
        ));
        let mut cpu_per_request = Vec::new();
        let mut busiest_cpu_per_request = Vec::new();
        let values = compare(
            settings,
            |ip| {
                let before: Vec<f64> = agents
                    .iter()
                    .map(|p| cpu_seconds(*p))
                    .collect::<Result<_>>()?;
                let report = load(
                    client_of(ip),
                    &format!("{ip}:8080"),
                    &["--connections", "4", "--seconds", &seconds],
                )?;
                let after: Vec<f64> = agents
                    .iter()
                    .map(|p| cpu_seconds(*p))
                    .collect::<Result<_>>()?;
                let requests = figure(&report, "requests")?;
                if requests < 1.0 {
                    bail!("no request completed");
                }
                if ip == mesh {
                    let used: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
                    cpu_per_request.push(used.iter().sum::<f64>() / requests * 1e6);
                    busiest_cpu_per_request
                        .push(used.iter().copied().fold(0.0, f64::max) / requests * 1e6);
                }
                Ok(BTreeMap::from([(
                    "requests-per-second",
                    figure(&report, "rps")?,
                )]))
            },
            &baseline,
            &mesh,
        )
        .with_context(|| format!("{path}: requests-keep-alive"))?;
        push_comparison(
            &mut results,
            "requests-keep-alive",
            path,
            &[("requests-per-second", "req/s")],
            values,
        )?;
        // Filled on each mesh run of the comparison above, which ran at least once or
        // failed.
        let mut cpu = cpu_per_request.clone();
        results.push(Measurement::mesh_only(
            ("agent-cpu", path, "cpu-per-request", "µs (all agents)"),
            (median(&mut cpu), spread(&cpu_per_request)),
        ));
        let mut busiest = busiest_cpu_per_request.clone();
        results.push(Measurement::mesh_only(
            (
                "agent-cpu",
                path,
                "cpu-per-request-busiest-agent",
                "µs (the busiest agent)",
            ),
            (median(&mut busiest), spread(&busiest_cpu_per_request)),
        ));

        progress(&format!(
            "{path}: connection churn (a new connection per request)"
        ));
        let values = compare(
            settings,
            |ip| {
                let report = load(
                    client_of(ip),
                    &format!("{ip}:8080"),
                    &["--churn", "--connections", "4", "--seconds", &seconds],
                )?;
                Ok(BTreeMap::from([
                    ("connections-per-second", figure(&report, "rps")?),
                    ("p50", figure(&report, "p50_us")? / 1000.0),
                    ("p99", figure(&report, "p99_us")? / 1000.0),
                ]))
            },
            &baseline,
            &mesh,
        )
        .with_context(|| format!("{path}: connection-churn"))?;
        push_comparison(
            &mut results,
            "connection-churn",
            path,
            &CHURN_METRICS,
            values,
        )?;
    }
    results.push(request_telemetry_cost(settings, &state, &agents)?);
    for (metric, value) in [("idle", idle_rss), ("under-load", loaded_rss)] {
        results.push(Measurement::mesh_only(
            ("agent-rss", "per-agent", metric, "MB"),
            (value, 0.0),
        ));
    }
    results.extend(scale(settings, &state, &agents)?);
    results.extend(program_costs(&state)?);
    Ok(results)
}

/// The agents' resident memory and open descriptors, summed.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    rss_mb: f64,
    descriptors: f64,
}

fn footprint(agents: &[u32]) -> Result<Footprint> {
    let mut total = Footprint {
        rss_mb: 0.0,
        descriptors: 0.0,
    };
    for pid in agents {
        total.rss_mb += rss_megabytes(*pid)?;
        let fds = fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("listing the descriptors of agent {pid}"))?;
        total.descriptors += fds.count() as f64;
    }
    Ok(total)
}

/// The pods (all on node-a) that hold the idle connections between them: the agent lets
/// one pod hold 4,096 connections through it (`MAX_CONNECTIONS_PER_SOURCE` in
/// `proxy::outbound`), fewer than the full run's
/// 10,000.
const IDLE_HOLDERS: [&str; 3] = ["bench/client", "bench/idle-holder-1", "bench/idle-holder-2"];

/// `total` split into `parts` shares that differ by one at most.
fn shares(total: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

/// The scale scenarios on the cross-node path: `idle_connections` connections opened
/// through both agents and held idle (what each costs the agents in memory and
/// descriptors, and whether both return once the connections close), then 1,000 new
/// connections a second for `sustained_seconds` against the no-mesh baseline, every one
/// of which must succeed.
fn scale(settings: &Settings, state: &SandboxState, agents: &[u32]) -> Result<Vec<Measurement>> {
    use std::io::BufRead;
    let far = pod_ip(state, "bench/server-far")?;
    let count = settings.idle_connections;
    progress(&format!("{SCALE_PATH}: {count} idle connections"));
    let before = footprint(agents)?;
    let mut holders = Vec::new();
    for (pod, share) in IDLE_HOLDERS.iter().zip(shares(count, IDLE_HOLDERS.len())) {
        let holder = command_in(
            &ExecTarget::Pod((*pod).into()),
            "mesh-bench",
            &[
                "hold".into(),
                format!("{far}:8080"),
                "--connections".into(),
                share.to_string(),
            ],
        )?
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting mesh-bench hold in {pod}"))?;
        holders.push((pod, share, holder));
    }
    let mut lines = Vec::new();
    for (_, _, holder) in &mut holders {
        let mut line = String::new();
        if let Some(stdout) = holder.stdout.as_mut() {
            std::io::BufReader::new(stdout).read_line(&mut line)?;
        }
        lines.push(line);
    }
    let held = footprint(agents);
    // Closing standard input ends each hold whatever happened above.
    for (_, _, holder) in &mut holders {
        drop(holder.stdin.take());
    }
    for ((pod, share, holder), line) in holders.into_iter().zip(lines) {
        let out = holder.wait_with_output()?;
        if !out.status.success() || line.is_empty() {
            bail!(
                "idle-connections: mesh-bench hold in {pod} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let opened = figure(&serde_json::from_str(&line)?, "open").context("idle-connections")?;
        if opened as usize != share {
            bail!("idle-connections: {pod} opened {opened} of its {share} connections");
        }
    }
    let held = held?;
    // The agents let go of a closed connection's descriptors as they see its end, and
    // give freed memory back every few seconds: wait (30 s at most) for both to come
    // back to where they were, and report where they are then.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut after = footprint(agents)?;
    while (after.descriptors > before.descriptors || after.rss_mb > before.rss_mb * 1.1)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
        after = footprint(agents)?;
    }
    let per_connection = |value: f64| value / count as f64;
    let own = |metric, unit, mesh| {
        Measurement::mesh_only(("idle-connections", SCALE_PATH, metric, unit), (mesh, 0.0))
    };
    let before_after = |metric, unit, before: f64, after: f64| {
        Measurement::against_baseline(
            ("idle-connections-closed", SCALE_PATH, metric, unit),
            (before, 0.0),
            (after, 0.0),
        )
    };
    let [(_, idle), (_, closed), (_, sustained)] = SCALE_FIGURES;
    let mut results = vec![
        own(
            idle[0].0,
            idle[0].1,
            per_connection((held.rss_mb - before.rss_mb) * 1024.0),
        ),
        own(
            idle[1].0,
            idle[1].1,
            per_connection(held.descriptors - before.descriptors),
        ),
        before_after(closed[0].0, closed[0].1, before.rss_mb, after.rss_mb),
        before_after(
            closed[1].0,
            closed[1].1,
            before.descriptors,
            after.descriptors,
        ),
    ];

    let seconds = settings.sustained_seconds.to_string();
    progress(&format!(
        "{SCALE_PATH}: {SUSTAINED_RATE} new connections a second for {seconds} s"
    ));
    let baseline = pod_ip(state, "plain/server-far")?;
    let once = Settings {
        repetitions: 1,
        ..*settings
    };
    let values = compare(
        &once,
        |ip| {
            let client = if ip == baseline {
                "plain/client"
            } else {
                "bench/client"
            };
            let report = load(
                client,
                &format!("{ip}:8080"),
                &[
                    "--churn",
                    "--rate",
                    SUSTAINED_RATE,
                    "--connections",
                    "32",
                    "--seconds",
                    &seconds,
                ],
            )?;
            Ok(BTreeMap::from([
                ("connections-per-second", figure(&report, "rps")?),
                ("p99", figure(&report, "p99_us")? / 1000.0),
            ]))
        },
        &baseline,
        &far,
    )
    .context("sustained-churn")?;
    push_comparison(
        &mut results,
        "sustained-churn",
        SCALE_PATH,
        sustained,
        values,
    )?;
    Ok(results)
}

/// The destination agent's CPU per keep-alive request to `server-l7` (request metrics
/// on) against `server-l7-untallied` (a twin under the same policy, request metrics off by a
/// Telemetry): the difference is what counting a request costs. Twice the repetitions
/// of the other scenarios, alternated, since the difference is small beside the drift of
/// a shared machine.
fn request_telemetry_cost(
    settings: &Settings,
    state: &SandboxState,
    agents: &[u32],
) -> Result<Measurement> {
    progress("request telemetry: the destination agent's CPU per request, metrics on and off");
    let tallied = state.pod("bench/server-l7")?;
    let untallied = state.pod("bench/server-l7-untallied")?;
    let agent = state
        .nodes
        .iter()
        .position(|node| node.name == tallied.node)
        .and_then(|index| agents.get(index).copied())
        .with_context(|| format!("no agent on {}, server-l7's node", tallied.node))?;
    let seconds = settings.seconds.to_string();
    let alternated = Settings {
        repetitions: settings.repetitions * 2,
        ..*settings
    };
    let values = compare(
        &alternated,
        |ip| {
            let before = cpu_seconds(agent)?;
            let report = load(
                "bench/client",
                &format!("{ip}:8080"),
                &["--connections", "4", "--seconds", &seconds],
            )?;
            let used = cpu_seconds(agent)? - before;
            let requests = figure(&report, "requests")?;
            if requests < 1.0 {
                bail!("no request completed");
            }
            Ok(BTreeMap::from([("cpu-per-request", used / requests * 1e6)]))
        },
        &untallied.ip.to_string(),
        &tallied.ip.to_string(),
    )
    .context("request-telemetry")?;
    let mut results = Vec::new();
    push_comparison(
        &mut results,
        "request-telemetry",
        "destination-agent",
        &[("cpu-per-request", "µs (metrics off → on)")],
        values,
    )?;
    results.pop().context("request-telemetry: no measurement")
}

/// Nanoseconds per run of each kernel program, from the kernel's own statistics.
fn program_costs(state: &SandboxState) -> Result<Vec<Measurement>> {
    let mut totals: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut seen_ids = std::collections::BTreeSet::new();
    for node in &state.nodes {
        let out = command_in(
            &ExecTarget::Node(node.name.clone()),
            "meshctl",
            &["bpf".into(), "programs".into(), "-o".into(), "json".into()],
        )?
        .output()?;
        let rows: Value = serde_json::from_slice(&out.stdout).context("meshctl bpf programs")?;
        let rows = rows
            .as_array()
            .with_context(|| format!("meshctl bpf programs on {}: not a list", node.name))?;
        for row in rows {
            let id = row["program_id"]
                .as_u64()
                .with_context(|| format!("bpf-program-cost: no program_id in {row}"))?;
            if !seen_ids.insert(id) {
                continue;
            }
            let program = row["program"]
                .as_str()
                .with_context(|| format!("bpf-program-cost: no program in {row}"))?;
            let entry = totals.entry(program.to_owned()).or_default();
            entry.0 += figure(row, "run_time_ns").context("bpf-program-cost")?;
            entry.1 += figure(row, "run_count").context("bpf-program-cost")?;
        }
    }
    Ok(totals
        .into_iter()
        .filter(|(_, (_, runs))| *runs > 0.0)
        .map(|(program, (ns, runs))| {
            let path = PROGRAMS
                .into_iter()
                .find(|p| *p == program)
                .unwrap_or("other");
            Measurement::mesh_only(
                ("bpf-program-cost", path, "ns-per-run", "ns"),
                (ns / runs, 0.0),
            )
        })
        .collect())
}

fn machine() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default();
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let memory_gb = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| (kb / 1024.0 / 1024.0).round());
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model,
        "memory_gb": memory_gb,
        "kernel": kernel,
    })
}

fn report(results: &[Measurement], json: bool, quick: bool) -> Result<()> {
    let document = serde_json::json!({
        "machine": machine(),
        "quick": quick,
        "results": results,
    });
    let dir = workspace().join("target/bench");
    fs::create_dir_all(&dir)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let text = serde_json::to_string_pretty(&document)?;
    for name in [format!("bench-{stamp}.json"), "latest.json".into()] {
        let file: PathBuf = dir.join(name);
        fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
    }
    if json {
        println!("{text}");
        return Ok(());
    }
    println!(
        "{:<22} {:<16} {:<24} {:>12} {:>12} {:>9}  UNIT",
        "SCENARIO", "PATH", "METRIC", "BASELINE", "MESH", "RATIO"
    );
    for m in results {
        println!(
            "{:<22} {:<16} {:<24} {:>12} {:>12.3} {:>9}  {}",
            m.scenario,
            m.path,
            m.metric,
            m.baseline.map_or("-".into(), |b| format!("{b:.3}")),
            m.mesh,
            m.ratio.map_or("-".into(), |r| format!("{r:.2}×")),
            m.unit
        );
    }
    println!("(saved to {})", dir.join("latest.json").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_connections_are_shared_evenly_within_the_per_pod_limit() {
        assert_eq!(shares(10_000, 3), [3_334, 3_333, 3_333]);
        assert_eq!(shares(1_000, 3), [334, 333, 333]);
        assert_eq!(shares(2, 3), [1, 1, 0]);
        assert!(shares(10_000, IDLE_HOLDERS.len())
            .iter()
            .all(|share| *share <= 4_096));
    }
}
