//! The outcome of one proxied connection, recorded once: the proxy fills a
//! [`ConnResult`] as it goes (the flows it opened, how the bytes were carried, the bytes
//! both ways, the reason of a failure) and, when it is dropped — whatever path the
//! connection took, success or error — the records in the connection table are marked
//! finished, the carrying mode is counted and the access log line is written. Nothing is
//! counted twice or missed.

use std::{
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Instant, SystemTime},
};

use mesh_common::FlowKey;

use crate::{
    model::{access_log::LogEntry, telemetry::AccessLogs, Workload},
    telemetry::{conns::ConnTable, metrics::Metrics},
};

/// How a connection's bytes were carried (`mesh_connections_carried_total{how}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// Spliced in the kernel.
    Spliced,
    /// Copied through the agent.
    Copied,
    /// Parsed and judged request by request.
    Http,
    /// Over HBONE to another node.
    Tunnel,
    /// Routed request by request by a VirtualService.
    Routed,
    /// Straight from this node: outside the mesh, or PeerAuthentication DISABLE.
    Direct,
}

impl Carried {
    pub fn label(self) -> &'static str {
        match self {
            Carried::Spliced => "spliced",
            Carried::Copied => "copied",
            Carried::Http => "http",
            Carried::Tunnel => "tunnel",
            Carried::Routed => "routed",
            Carried::Direct => "direct",
        }
    }
}

/// Bytes carried each way, counted where the bytes pass (shared with the copier or the
/// HTTP connection while it runs).
#[derive(Debug, Default)]
pub struct ByteCounts {
    /// From the client towards the workload.
    pub sent: AtomicU64,
    /// From the workload back to the client.
    pub received: AtomicU64,
}

impl ByteCounts {
    pub fn add(&self, sent: u64, received: u64) {
        self.sent.fetch_add(sent, Ordering::Relaxed);
        self.received.fetch_add(received, Ordering::Relaxed);
    }

    /// Bytes either way so far.
    pub fn total(&self) -> u64 {
        self.sent.load(Ordering::Relaxed) + self.received.load(Ordering::Relaxed)
    }
}

/// Where a connection was seen: captured leaving a local pod, or arriving over HBONE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Outbound,
    Inbound,
}

/// One proxied connection's outcome, recorded when dropped.
pub struct ConnResult {
    conns: Arc<ConnTable>,
    metrics: Arc<Metrics>,
    side: Side,
    client: SocketAddrV4,
    /// Where the client connected (a Service address, say).
    original_dst: SocketAddrV4,
    /// The endpoint it reached.
    target: SocketAddrV4,
    source_principal: Option<String>,
    destination_principal: Option<String>,
    mutual_tls: bool,
    flows: Vec<FlowKey>,
    carried: Option<Carried>,
    bytes: Arc<ByteCounts>,
    failure: Option<String>,
    started: Instant,
    started_at: SystemTime,
    /// Where the connection is logged (a TCP connection: a request served one by one is
    /// logged per request instead), and the Envoy cluster name its line carries.
    logs: Option<(Arc<AccessLogs>, String)>,
}

impl ConnResult {
    pub fn new(
        conns: Arc<ConnTable>,
        metrics: Arc<Metrics>,
        side: Side,
        client: SocketAddrV4,
        target: SocketAddrV4,
    ) -> ConnResult {
        ConnResult {
            conns,
            metrics,
            side,
            client,
            original_dst: target,
            target,
            source_principal: None,
            destination_principal: None,
            mutual_tls: false,
            flows: Vec::new(),
            carried: None,
            bytes: Arc::default(),
            failure: None,
            started: Instant::now(),
            started_at: SystemTime::now(),
            logs: None,
        }
    }

    /// The identities on both ends, as the access log names them.
    pub fn set_principals(&mut self, source: Option<String>, destination: Option<String>) {
        self.source_principal = source;
        self.destination_principal = destination;
    }

    /// Where the connection went once resolved.
    pub fn set_target(&mut self, target: SocketAddrV4) {
        self.target = target;
    }

    /// Records what the proxy decided for a pod socket's flow, for the metrics to label
    /// the kernel's report of it; marked finished when this result is dropped.
    pub fn track(
        &mut self,
        flow: FlowKey,
        destination: Option<Arc<Workload>>,
        service: Option<String>,
        mutual_tls: bool,
    ) {
        self.mutual_tls |= mutual_tls;
        self.conns.insert(flow, destination, service, mutual_tls);
        self.flows.push(flow);
    }

    pub fn set_carried(&mut self, carried: Carried) {
        self.carried = Some(carried);
    }

    /// The byte counters the carrying code adds to.
    pub fn bytes(&self) -> Arc<ByteCounts> {
        self.bytes.clone()
    }

    /// Logs the connection to `logs` when it ends, as Envoy's TCP proxy would, unless its
    /// requests are logged one by one.
    pub fn log_to(&mut self, logs: Option<Arc<AccessLogs>>, cluster: String) {
        self.logs = logs.map(|logs| (logs, cluster));
    }

    /// The connection's access log line, as Envoy's TCP proxy fills it.
    fn log_entry(&self, cluster: &str) -> LogEntry {
        let entry = LogEntry::connection(
            self.started_at,
            self.started.elapsed(),
            (
                self.bytes.sent.load(Ordering::Relaxed),
                self.bytes.received.load(Ordering::Relaxed),
            ),
            self.client,
            self.original_dst,
            (self.target, cluster.to_owned()),
        );
        match &self.failure {
            Some(failure) => LogEntry {
                response_flags: "UF".into(),
                response_code_details: Some(failure.clone()),
                ..entry
            },
            None => entry,
        }
    }

    /// Records why the connection failed or was refused.
    pub fn fail(&mut self, reason: impl std::fmt::Display) {
        self.failure = Some(reason.to_string());
    }
}

impl Drop for ConnResult {
    fn drop(&mut self) {
        for flow in &self.flows {
            self.conns.finish(flow);
        }
        // Counted where the connection was captured: a delivery over HBONE was already
        // counted (`tunnel`) by the source's agent.
        if let (Some(carried), Side::Outbound) = (self.carried, self.side) {
            self.metrics.carried(carried.label());
        }
        let side = match self.side {
            Side::Outbound => "outbound",
            Side::Inbound => "inbound",
        };
        let per_request = matches!(self.carried, Some(Carried::Http | Carried::Routed));
        if let (Some((logs, cluster)), false) = (&self.logs, per_request) {
            let entry = self.log_entry(cluster);
            for (path, line) in logs.lines(&entry, self.mutual_tls, None) {
                self.metrics.access_logs.write(path, line);
            }
        }
        let principal = |p: &Option<String>| p.clone().unwrap_or_else(|| "unknown".into());
        tracing::debug!(
            target: "mesh::access",
            "{side} {} → {} ({}) source_principal={} destination_principal={} connection_security_policy={} carried={} sent={} received={} duration_ms={} outcome={}",
            self.client,
            self.original_dst,
            self.target,
            principal(&self.source_principal),
            principal(&self.destination_principal),
            if self.mutual_tls { "mutual_tls" } else { "none" },
            self.carried.map_or("-", Carried::label),
            self.bytes.sent.load(Ordering::Relaxed),
            self.bytes.received.load(Ordering::Relaxed),
            self.started.elapsed().as_millis(),
            self.failure.as_deref().unwrap_or("ok"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        access_log::LogFormat,
        telemetry::{LogFilter, LogSink},
        SharedState,
    };

    fn logs(path: &std::path::Path, filter: Option<&str>) -> Arc<AccessLogs> {
        Arc::new(AccessLogs {
            sinks: vec![Arc::new(LogSink {
                provider: "envoy".into(),
                path: path.to_owned(),
                format: LogFormat::default_text(),
            })],
            filter: filter.map(|f| Arc::new(LogFilter::compile(f).expect("CEL"))),
        })
    }

    #[tokio::test]
    async fn a_tcp_connection_is_one_line_and_a_connection_served_per_request_none() {
        let path = std::env::temp_dir().join(format!("mesh-tcp-log-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let metrics = Arc::new(Metrics::new(
            SharedState::default(),
            Arc::default(),
            crate::telemetry::metrics::test_requests(),
        ));
        let result = |carried| {
            let mut result = ConnResult::new(
                Arc::default(),
                metrics.clone(),
                Side::Outbound,
                "10.244.1.2:40000".parse().expect("client"),
                "10.96.0.10:9000".parse().expect("service"),
            );
            result.set_target("10.244.2.3:9000".parse().expect("endpoint"));
            result.log_to(
                Some(logs(&path, None)),
                "outbound|9000||echo.demo.svc.cluster.local".into(),
            );
            result.set_carried(carried);
            result.bytes().add(5, 7);
            result
        };
        drop(result(Carried::Tunnel));
        drop(result(Carried::Http));
        let mut text = String::new();
        for _ in 0..200 {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            if !text.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(
            lines[0].contains("\"- - -\" 0 - - - \"-\" 5 7 "),
            "no HTTP facts, 5 bytes in, 7 out: {}",
            lines[0]
        );
        assert!(lines[0].contains(
            "\"10.244.2.3:9000\" outbound|9000||echo.demo.svc.cluster.local - 10.96.0.10:9000 10.244.1.2:40000"
        ));
        let _ = std::fs::remove_file(&path);
    }
}
