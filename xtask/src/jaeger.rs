//! Jaeger, the sandbox's trace collector: built from its published Go module through
//! the project's module `xtask/go/jaeger` (which pins it) and kept in a versioned cache
//! directory, like the Kubernetes control plane; started by `sandbox up` in a network
//! namespace of its own on the nodes' network (`msb-jaeger`, 10.200.0.252), receiving
//! OTLP (4317 gRPC, 4318 HTTP) and serving its query API and UI on 16686, traces kept
//! in memory.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    daemon::{join_fabric, log_path, process_alive, start_daemon},
    go_build::GoBuild,
    ns, progress,
};

/// The Jaeger release the sandbox runs (Jaeger v2's all-in-one).
pub const JAEGER_VERSION: &str = "v1.75.0";
const PACKAGE: &str = "github.com/jaegertracing/jaeger/cmd/jaeger";

pub const NETNS: &str = "msb-jaeger";
/// The fabric port of Jaeger's namespace, beside the nodes' `up<N>`.
const FABRIC_PORT: &str = "upjaeger";
pub const IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 252);
pub const OTLP_GRPC_PORT: u16 = 4317;
pub const OTLP_HTTP_PORT: u16 = 4318;
pub const QUERY_PORT: u16 = 16686;
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What a running Jaeger left for `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JaegerState {
    pub pid: u32,
}

/// Where spans are sent (OTLP over HTTP).
pub fn otlp_url() -> String {
    format!("http://{IP}:{OTLP_HTTP_PORT}")
}

/// Jaeger's query API and UI.
pub fn query_url() -> String {
    format!("http://{IP}:{QUERY_PORT}")
}

/// Checks that `go_mod` (the text of xtask/go/jaeger/go.mod) builds [`JAEGER_VERSION`].
fn check_pin(go_mod: &str) -> Result<(), String> {
    let pin = format!("github.com/jaegertracing/jaeger {JAEGER_VERSION}");
    let tool = format!("tool {PACKAGE}");
    let has = |line: &str| go_mod.lines().any(|l| l.trim().starts_with(line));
    if !has(&pin) {
        return Err(format!("go.mod does not require {pin}"));
    }
    if !has(&tool) {
        return Err(format!("go.mod does not declare {tool}"));
    }
    Ok(())
}

fn build() -> GoBuild<'static> {
    GoBuild {
        what: "Jaeger",
        module: "xtask/go/jaeger",
        binaries: &[("jaeger", PACKAGE)],
        cache_name: format!("jaeger-{JAEGER_VERSION}"),
        ldflags: version_ldflags(),
        minutes: 12,
    }
}

/// Where the binary of this version is cached.
pub fn dir() -> PathBuf {
    build().dir()
}

pub fn binary() -> PathBuf {
    dir().join("jaeger")
}

/// Builds Jaeger unless its versioned directory already holds it.
pub fn ensure() -> Result<()> {
    if binary().is_file() {
        return Ok(());
    }
    let build = build();
    check_pin(&build.go_mod()?).map_err(|e| anyhow::anyhow!("{}/go.mod: {e}", build.module))?;
    build.ensure()
}

/// What Jaeger's own build stamps into its binary, so that it names its release.
fn version_ldflags() -> String {
    format!(
        "-s -w -X github.com/jaegertracing/jaeger/internal/version.latestVersion={JAEGER_VERSION}"
    )
}

/// Jaeger v2's configuration (an OpenTelemetry collector's): OTLP in, memory storage,
/// the query API and UI, every endpoint on the namespace's sandbox address.
fn config() -> String {
    format!(
        "service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none
    logs:
      level: info
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:13133
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    enable_tracing: false
    storage:
      traces: memstore
    http:
      endpoint: {IP}:{QUERY_PORT}
    grpc:
      endpoint: 127.0.0.1:16685
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {IP}:{OTLP_GRPC_PORT}
      http:
        endpoint: {IP}:{OTLP_HTTP_PORT}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"
    )
}

/// Starts Jaeger in its namespace (joined to the nodes' network here) and cgroup
/// `cgroups/jaeger`, its configuration in `run_dir/jaeger`; waits until it receives and
/// answers queries.
pub fn start(run_dir: &Path, cgroups: &Path) -> Result<JaegerState> {
    if !binary().is_file() {
        bail!(
            "{} is missing: `cargo xtask setup` builds it",
            binary().display()
        );
    }
    progress(&format!(
        "starting Jaeger {JAEGER_VERSION}: OTLP {}, query and UI {}",
        otlp_url(),
        query_url()
    ));
    join_fabric(NETNS, FABRIC_PORT, IP)?;
    let dir = run_dir.join("jaeger");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config_file = dir.join("config.yaml");
    std::fs::write(&config_file, config())
        .with_context(|| format!("writing {}", config_file.display()))?;
    let cgroup = cgroups.join("jaeger");
    std::fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let pid = start_daemon(
        Command::new(binary()).arg("--config").arg(&config_file),
        "jaeger.log",
        NETNS,
        cgroup,
    )?;
    let deadline = Instant::now() + START_TIMEOUT;
    for port in [OTLP_HTTP_PORT, QUERY_PORT] {
        let addr = SocketAddr::from((IP, port));
        loop {
            let up = ns::within(NETNS, move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                break;
            }
            if !process_alive(pid) || Instant::now() > deadline {
                bail!(
                    "Jaeger did not start (see {})",
                    log_path("jaeger.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(JaegerState { pid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_project_go_mod_pins_the_version_the_cache_is_named_after() {
        let text = build().go_mod().expect("go.mod");
        assert_eq!(check_pin(&text), Ok(()));
        assert_eq!(
            check_pin(&text.replace("jaeger v1.75.0", "jaeger v1.76.0")),
            Err("go.mod does not require github.com/jaegertracing/jaeger v1.75.0".into())
        );
        assert!(dir().ends_with("mesh/jaeger-v1.75.0"));
    }

    #[test]
    fn jaeger_listens_on_its_sandbox_address_only_where_the_nodes_reach_it() {
        let text = config();
        let value: serde_norway::Value = serde_norway::from_str(&text).expect("YAML");
        let otlp = &value["receivers"]["otlp"]["protocols"];
        assert_eq!(otlp["http"]["endpoint"].as_str(), Some("10.200.0.252:4318"));
        assert_eq!(otlp["grpc"]["endpoint"].as_str(), Some("10.200.0.252:4317"));
        assert_eq!(
            value["extensions"]["jaeger_query"]["http"]["endpoint"].as_str(),
            Some("10.200.0.252:16686")
        );
        assert_eq!(query_url(), "http://10.200.0.252:16686");
    }
}
