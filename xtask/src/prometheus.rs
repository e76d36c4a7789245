//! Prometheus, the sandbox's metrics server: Debian's `prometheus` (installed by `cargo
//! xtask setup`), started by `sandbox up` in a network namespace of its own on the nodes'
//! network (`msb-prometheus`, 10.200.0.251), scraping every node agent's `/metrics`
//! (port 15020) every two seconds, its query API and UI on 9090, its configuration and
//! TSDB in `run_dir/prometheus`. The nodes are fixed when the sandbox starts (`apply`
//! refuses Node objects), so the scrape targets are written once, in the configuration.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    daemon::{http_get, join_fabric, log_path, process_alive, start_daemon},
    progress,
};

/// Debian's package puts the server here (`prometheus` in `setup`'s packages).
const BINARY: &str = "/usr/bin/prometheus";
pub const NETNS: &str = "msb-prometheus";
/// The fabric port of Prometheus' namespace, beside the nodes' `up<N>` and `upjaeger`.
const FABRIC_PORT: &str = "upprometheus";
pub const IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 251);
pub const PORT: u16 = 9090;
/// The agents' metrics port.
const AGENT_METRICS_PORT: u16 = 15020;
/// Short, so that a test or a user sees a request in a query within seconds.
const SCRAPE_INTERVAL: &str = "2s";
/// The job of the agents' series, as `up{job="mesh-agent"}`.
pub const JOB: &str = "mesh-agent";
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What a running Prometheus left for `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrometheusState {
    pub pid: u32,
}

/// A node agent to scrape: its node's name and address.
pub struct Target<'a> {
    pub node: &'a str,
    pub ip: Ipv4Addr,
}

/// Prometheus' query API and UI.
pub fn url() -> String {
    format!("http://{IP}:{PORT}")
}

/// The configuration: one job for the agents, a static group per node so that each
/// series carries its `node` beside Prometheus' own `job` and `instance` (`ip:15020`).
fn config(targets: &[Target]) -> String {
    let mut text = format!(
        "global:
  scrape_interval: {SCRAPE_INTERVAL}
  scrape_timeout: {SCRAPE_INTERVAL}
  evaluation_interval: {SCRAPE_INTERVAL}
scrape_configs:
- job_name: {JOB}
  metrics_path: /metrics
  static_configs:
"
    );
    for target in targets {
        text.push_str(&format!(
            "  - targets: ['{}:{AGENT_METRICS_PORT}']\n    labels: {{node: '{}'}}\n",
            target.ip, target.node
        ));
    }
    text
}

/// Starts Prometheus in its namespace (joined to the nodes' network here) and cgroup
/// `cgroups/prometheus`, scraping the agents of `targets`; waits until it is ready.
pub fn start(run_dir: &Path, cgroups: &Path, targets: &[Target]) -> Result<PrometheusState> {
    if !Path::new(BINARY).is_file() {
        bail!("{BINARY} is missing: `cargo xtask setup` installs Debian's prometheus");
    }
    progress(&format!(
        "starting Prometheus: query API and UI {}, scraping {} agents every {SCRAPE_INTERVAL}",
        url(),
        targets.len()
    ));
    join_fabric(NETNS, FABRIC_PORT, IP)?;
    let dir = run_dir.join("prometheus");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let config_file = dir.join("prometheus.yml");
    std::fs::write(&config_file, config(targets))
        .with_context(|| format!("writing {}", config_file.display()))?;
    let cgroup = cgroups.join("prometheus");
    std::fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let started = Instant::now();
    let pid = start_daemon(
        Command::new(BINARY)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={IP}:{PORT}")),
        "prometheus.log",
        NETNS,
        cgroup,
    )?;
    let addr = SocketAddr::from((IP, PORT));
    loop {
        if let Ok((200, _)) = http_get(NETNS, addr, "/-/ready") {
            break;
        }
        if !process_alive(pid) || started.elapsed() > START_TIMEOUT {
            bail!(
                "Prometheus did not become ready (see {})",
                log_path("prometheus.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    progress(&format!(
        "Prometheus ready in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(PrometheusState { pid })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_nodes() -> String {
        config(&[
            Target {
                node: "node-a",
                ip: Ipv4Addr::new(10, 200, 0, 1),
            },
            Target {
                node: "node-b",
                ip: Ipv4Addr::new(10, 200, 0, 2),
            },
        ])
    }

    #[test]
    fn every_agent_is_scraped_with_its_node_label() {
        let value: serde_norway::Value = serde_norway::from_str(&two_nodes()).expect("YAML");
        assert_eq!(value["global"]["scrape_interval"].as_str(), Some("2s"));
        let jobs = value["scrape_configs"].as_sequence().expect("jobs");
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0]["job_name"].as_str(), Some("mesh-agent"));
        let groups: Vec<(String, String)> = jobs[0]["static_configs"]
            .as_sequence()
            .expect("groups")
            .iter()
            .map(|g| {
                let targets = g["targets"].as_sequence().expect("targets");
                assert_eq!(targets.len(), 1, "one agent per group: {g:?}");
                (
                    targets[0].as_str().expect("target").to_owned(),
                    g["labels"]["node"].as_str().expect("node").to_owned(),
                )
            })
            .collect();
        assert_eq!(
            groups,
            [
                ("10.200.0.1:15020".to_owned(), "node-a".to_owned()),
                ("10.200.0.2:15020".to_owned(), "node-b".to_owned())
            ]
        );
        assert_eq!(url(), "http://10.200.0.251:9090");
    }

    /// Prometheus' own checker accepts the configuration (intervals and timeouts agree,
    /// labels are valid): a mistake here would otherwise surface as a sandbox that does
    /// not start.
    #[test]
    fn promtool_accepts_the_configuration() {
        let file = std::env::temp_dir().join(format!("mesh-prometheus-{}.yml", std::process::id()));
        std::fs::write(&file, two_nodes()).expect("write");
        let output = Command::new("promtool")
            .arg("check")
            .arg("config")
            .arg(&file)
            .output()
            .expect("promtool (Debian's prometheus, installed by cargo xtask setup)");
        let _ = std::fs::remove_file(&file);
        assert!(
            output.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
