//! `meshctl` as scripts use it on a node, without an agent: `check --pre` judging a host
//! (this one, and a host root missing features), `version`, the exit codes that tell a
//! failed check from an unreachable agent, YAML output and shell completions; `graph` and
//! `impact` against two fixed agents' metrics served in-process (exact figures), and
//! the refusals of `dashboard` and of the graph formats elsewhere.

use std::{path::Path, process::Command};

fn meshctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        // No agent listens on this port: nothing of the machine's own mesh is asked.
        .args(["--admin", "127.0.0.1:9"])
        .output()
        .expect("meshctl")
}

#[test]
fn check_pre_names_each_missing_feature_and_exits_with_5() {
    let root = std::env::temp_dir().join(format!("meshctl-check-{}", std::process::id()));
    std::fs::create_dir_all(root.join("proc/sys/kernel")).expect("mkdir");
    std::fs::create_dir_all(root.join("proc/self")).expect("mkdir");
    std::fs::write(
        root.join("proc/sys/kernel/osrelease"),
        "5.15.0-91-generic\n",
    )
    .expect("write");
    std::fs::write(
        root.join("proc/self/mounts"),
        "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n",
    )
    .expect("write");
    let out = meshctl(&[
        "check",
        "--pre",
        "--host-root",
        root.to_str().expect("path"),
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(5));
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let failed: Vec<(&str, &str)> = findings
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["ok"] == false)
        .map(|f| {
            (
                f["check"].as_str().expect("check"),
                f["detail"].as_str().expect("detail"),
            )
        })
        .collect();
    let names: Vec<&str> = failed.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["kernel", "btf", "bpffs"]);
    assert!(failed[0].1.contains("5.15.0-91-generic is older than 6.6"));
    assert!(failed[1].1.contains("CONFIG_DEBUG_INFO_BTF"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("3 of 6 checks failed"), "{stderr}");
    std::fs::remove_dir_all(&root).expect("cleanup");
}

#[test]
fn check_pre_passes_on_a_host_that_runs_the_mesh() {
    // The test machine runs the eBPF tests, so it has what the mesh needs.
    let out = meshctl(&["check", "--pre"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(Path::new("/sys/kernel/btf/vmlinux").exists());
}

#[test]
fn without_an_agent_check_and_status_say_so_with_their_own_codes() {
    let check = meshctl(&["check", "-o", "json"]);
    assert_eq!(check.status.code(), Some(5));
    let findings: serde_json::Value = serde_json::from_slice(&check.stdout).expect("JSON");
    let agent = findings
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["check"] == "agent")
        .expect("an agent finding");
    assert_eq!(agent["ok"], false);
    assert!(agent["detail"]
        .as_str()
        .is_some_and(|d| d.contains("no mesh agent answers at 127.0.0.1:9")));

    let status = meshctl(&["status"]);
    assert_eq!(status.status.code(), Some(3), "agent unreachable");

    let version = meshctl(&["version", "-o", "json"]);
    assert!(version.status.success());
    let version: serde_json::Value = serde_json::from_slice(&version.stdout).expect("JSON");
    assert_eq!(version["meshctl"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        version["meshctl"]["maps_layout"],
        mesh_common::MAPS_LAYOUT_VERSION
    );
    assert!(version["agent"].is_null());
}

#[test]
fn yaml_output_carries_what_json_does() {
    let json = meshctl(&["version", "-o", "json"]);
    let yaml = meshctl(&["version", "-o", "yaml"]);
    assert!(yaml.status.success());
    let from_json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    let from_yaml: serde_json::Value = serde_norway::from_slice(&yaml.stdout).expect("YAML");
    assert_eq!(from_yaml, from_json);
    assert!(String::from_utf8_lossy(&yaml.stdout).contains("maps_layout: "));
}

#[test]
fn completion_scripts_name_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = meshctl(&["completion", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for command in ["check", "uninstall", "policy", "validate"] {
            assert!(
                script.contains(command),
                "{shell} completion lacks {command}"
            );
        }
    }
    let bad = meshctl(&["completion", "cmd.exe"]);
    assert_eq!(bad.status.code(), Some(2), "invalid input");
}

/// Serves metrics as an agent would: `before` to the first scrape, `after` to every later
/// one. Returns the URL.
fn fake_agent(before: String, after: String) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/metrics", listener.local_addr().expect("address"));
    std::thread::spawn(move || {
        for (served, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let body = if served == 0 { &before } else { &after };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

const PEERS: &str = "source_workload=\"client-a\",source_workload_namespace=\"demo\",\
    destination_service=\"reviews.demo.svc.cluster.local\",destination_service_name=\"reviews\",\
    destination_service_namespace=\"demo\",destination_workload=\"reviews-v2\",\
    destination_workload_namespace=\"demo\"";

/// Node a's agent: client-a's requests as the source reports them, its own time inside.
fn node_a(
    requests: [u32; 2],
    buckets: [[u32; 3]; 2],
    agent: [u32; 3],
    agent_sum: f64,
    cpu: f64,
) -> String {
    let mut text = format!(
        "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n\
         process_resident_memory_bytes 20971520\n\
         istio_tcp_sent_bytes_total{{reporter=\"source\",{PEERS},connection_security_policy=\"mutual_tls\"}} {}\n",
        requests[0] * 100
    );
    for (index, code) in ["200", "500"].iter().enumerate() {
        let labels = format!("reporter=\"source\",{PEERS},response_code=\"{code}\",connection_security_policy=\"mutual_tls\"");
        text += &format!("istio_requests_total{{{labels}}} {}\n", requests[index]);
        for (le, count) in ["5", "10", "+Inf"].iter().zip(buckets[index]) {
            text += &format!(
                "istio_request_duration_milliseconds_bucket{{{labels},le=\"{le}\"}} {count}\n"
            );
        }
    }
    for (le, count) in ["0.0001", "0.001", "+Inf"].iter().zip(agent) {
        text += &format!(
            "mesh_request_agent_seconds_bucket{{reporter=\"source\",le=\"{le}\"}} {count}\n"
        );
    }
    text + &format!(
        "mesh_request_agent_seconds_sum{{reporter=\"source\"}} {agent_sum}\n\
         mesh_request_agent_seconds_count{{reporter=\"source\"}} {}\n",
        agent[2]
    )
}

/// Node b's agent: the same requests as the destination reports them (faster), and a
/// client outside the mesh that only the destination reports.
fn node_b(requests: u32, outside: u32, cpu: f64, agent_sum: f64, policy_sum: f64) -> String {
    // Policy evaluations within 5 µs: one per request from client-a.
    let labels = format!("reporter=\"destination\",{PEERS},response_code=\"200\",connection_security_policy=\"mutual_tls\"");
    let all = requests + outside;
    format!(
        "process_cpu_seconds_total {cpu}\nprocess_resident_memory_bytes 31457280\n\
         istio_requests_total{{{labels}}} {requests}\n\
         istio_request_duration_milliseconds_bucket{{{labels},le=\"5\"}} {requests}\n\
         istio_request_duration_milliseconds_bucket{{{labels},le=\"+Inf\"}} {requests}\n\
         istio_requests_total{{reporter=\"destination\",source_workload=\"unknown\",\
         source_workload_namespace=\"unknown\",destination_service=\"reviews.demo.svc.cluster.local\",\
         destination_workload=\"reviews-v2\",destination_workload_namespace=\"demo\",\
         response_code=\"200\",connection_security_policy=\"none\"}} {outside}\n\
         mesh_request_agent_seconds_bucket{{reporter=\"destination\",le=\"0.0001\"}} {all}\n\
         mesh_request_agent_seconds_bucket{{reporter=\"destination\",le=\"0.001\"}} {all}\n\
         mesh_request_agent_seconds_bucket{{reporter=\"destination\",le=\"+Inf\"}} {all}\n\
         mesh_request_agent_seconds_sum{{reporter=\"destination\"}} {agent_sum}\n\
         mesh_request_agent_seconds_count{{reporter=\"destination\"}} {all}\n\
         mesh_policy_evaluation_seconds_bucket{{le=\"0.000005\"}} {}\n\
         mesh_policy_evaluation_seconds_bucket{{le=\"0.00001\"}} {all}\n\
         mesh_policy_evaluation_seconds_bucket{{le=\"+Inf\"}} {all}\n\
         mesh_policy_evaluation_seconds_sum {policy_sum}\n\
         mesh_policy_evaluation_seconds_count {all}\n",
        requests
    )
}

/// Two agents over the window: node a gains 30 × 200 and 10 × 500 from client-a (the
/// source's latencies: 20 within 5 ms, all within 10 ms), 0.5 CPU seconds, 40 agent
/// times (10 under 0.1 ms, sum 12 ms); node b gains the same 40 and 8 from outside the
/// mesh, 0.3 CPU seconds, 48 agent times under 0.1 ms (sum 2.4 ms) and 48 policy
/// evaluations (40 within 5 µs, sum 192 µs).
fn two_agents() -> [String; 2] {
    [
        fake_agent(
            node_a(
                [100, 5],
                [[50, 100, 100], [0, 5, 5]],
                [10, 100, 100],
                0.1,
                10.0,
            ),
            node_a(
                [130, 15],
                [[70, 130, 130], [0, 15, 15]],
                [20, 140, 140],
                0.112,
                10.5,
            ),
        ),
        fake_agent(
            node_b(105, 0, 20.0, 0.01, 0.0005),
            node_b(145, 8, 20.3, 0.0124, 0.000692),
        ),
    ]
}

fn close(value: &serde_json::Value, expected: f64, tolerance: f64) -> bool {
    value
        .as_f64()
        .is_some_and(|v| (v - expected).abs() <= tolerance * expected.abs().max(1e-12))
}

#[test]
fn graph_counts_each_request_once_from_the_source_reporter() {
    let [a, b] = two_agents();
    let out = meshctl(&[
        "graph",
        "--metrics",
        &a,
        "--metrics",
        &b,
        "--window",
        "300ms",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let graph: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(graph["agents"], serde_json::json!([a, b]));
    let window = graph["window_seconds"].as_f64().expect("window");
    assert!(window >= 0.3, "{window}");
    let nodes: Vec<(&str, &str)> = graph["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["id"].as_str().expect("id"),
                n["kind"].as_str().expect("kind"),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        [
            ("demo/client-a", "workload"),
            ("demo/reviews-v2", "workload"),
            ("reviews.demo.svc.cluster.local", "service"),
            ("unknown", "unknown"),
        ]
    );
    let edges = graph["edges"].as_array().expect("edges");
    let edge = |from: &str, to: &str| {
        edges
            .iter()
            .find(|e| e["source"] == from && e["destination"] == to)
            .unwrap_or_else(|| panic!("{from} → {to} in {graph}"))
    };
    let client = edge("demo/client-a", "reviews.demo.svc.cluster.local");
    assert_eq!(client["reporters"], serde_json::json!(["source"]));
    assert_eq!(
        (&client["requests"], &client["errors"]),
        (&40.0.into(), &10.0.into())
    );
    assert_eq!(client["error_rate"], 0.25);
    // Ranks 20 and 39.6 of 40: the top of (0, 5] and 19.6 of 20 into (5, 10].
    assert_eq!(
        (&client["p50_ms"], &client["p99_ms"]),
        (&5.0.into(), &9.9.into())
    );
    assert_eq!(client["mutual_tls"], true);
    assert_eq!(client["protocol"], "http");
    // A window is the time between the readings of each agent (one agent here).
    assert!(
        close(&client["requests_per_second"], 40.0 / window, 0.01),
        "{client}"
    );
    assert!(
        close(&client["bytes_per_second"], 3000.0 / window, 0.01),
        "{client}"
    );
    let outside = edge("unknown", "reviews.demo.svc.cluster.local");
    assert_eq!(outside["reporters"], serde_json::json!(["destination"]));
    assert_eq!(
        (&outside["requests"], &outside["mutual_tls"]),
        (&8.0.into(), &false.into())
    );
    let serving = edge("reviews.demo.svc.cluster.local", "demo/reviews-v2");
    assert_eq!(serving["requests"], 48.0);
    assert_eq!(edges.len(), 3, "{graph}");
    let services = graph["services"].as_array().expect("services");
    assert_eq!(services.len(), 1);
    assert!(close(&services[0]["error_rate"], 10.0 / 48.0, 1e-12));

    let [a, b] = two_agents();
    let dot = meshctl(&[
        "graph",
        "--metrics",
        &a,
        "--metrics",
        &b,
        "--window",
        "100ms",
        "-o",
        "dot",
    ]);
    let dot = String::from_utf8_lossy(&dot.stdout);
    assert!(
        dot.contains("\"demo/client-a\" -> \"reviews.demo.svc.cluster.local\" [label=\"mTLS · "),
        "{dot}"
    );
    let [a, b] = two_agents();
    let svg = meshctl(&[
        "graph",
        "--metrics",
        &a,
        "--metrics",
        &b,
        "--window",
        "100ms",
        "-o",
        "svg",
    ]);
    let svg = String::from_utf8_lossy(&svg.stdout);
    assert!(
        svg.starts_with("<svg ") && svg.ends_with("</svg>\n"),
        "{svg}"
    );
    assert_eq!(svg.matches("class=\"edge\"").count(), 3);
}

#[test]
fn impact_projects_what_the_agents_measured_beside_sidecars() {
    let [a, b] = two_agents();
    let out = meshctl(&[
        "impact",
        "--metrics",
        &a,
        "--metrics",
        &b,
        "--window",
        "300ms",
        "--rps",
        "1000",
        "--price-vcpu-hour",
        "0.04",
        "--price-gb-hour",
        "0.005",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let impact: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let measured = &impact["measured"];
    assert_eq!(measured["agents"], 2);
    assert_eq!(measured["memory_mib"], 50.0);
    assert!(
        close(&measured["source_agent"]["mean_ms"], 0.3, 1e-9),
        "{measured}"
    );
    // Rank 36 of 40, 26 of the 30 in (0.1 ms, 1 ms].
    assert!(
        close(&measured["source_agent"]["p90_ms"], 0.88, 1e-9),
        "{measured}"
    );
    assert!(
        close(&measured["destination_agent"]["mean_ms"], 0.05, 1e-9),
        "{measured}"
    );
    assert!(
        close(&measured["destination_agent"]["p90_ms"], 0.09, 1e-9),
        "{measured}"
    );
    assert!(
        close(&measured["latency_added_p90_ms"], 0.97, 1e-9),
        "{measured}"
    );
    assert_eq!(measured["policy_evaluations"], 48.0);
    assert!(
        close(&measured["policy_evaluation_mean_us"], 4.0, 1e-9),
        "{measured}"
    );
    // Rank 43.2 of 48: 3.2 of the 8 in (5 µs, 10 µs].
    assert!(
        close(&measured["policy_evaluation_p90_us"], 7.0, 1e-9),
        "{measured}"
    );
    // 0.8 CPU seconds for 48 requests, whatever the window: 16.67 cores at 1000 rps.
    let window = measured["window_seconds"].as_f64().expect("window");
    assert!(
        close(&measured["requests_per_second"], 48.0 / window, 0.01),
        "{measured}"
    );
    assert!(
        close(&measured["cpu_cores"], 0.8 / window, 0.01),
        "{measured}"
    );
    assert_eq!(impact["requests_per_second"], 1000.0);
    let (mesh, sidecar) = (&impact["mesh"], &impact["sidecar"]);
    let cores = 0.8 / 48.0 * 1000.0;
    assert!(close(&mesh["cpu_cores"], cores, 0.01), "{mesh}");
    assert_eq!(mesh["memory_mib"], 50.0);
    assert!(close(&mesh["latency_added_p90_ms"], 0.97, 1e-9));
    assert!(
        close(
            &mesh["monthly_cost"],
            (cores * 0.04 + 50.0 / 1024.0 * 0.005) * 730.0,
            0.01
        ),
        "{mesh}"
    );
    assert!(close(&sidecar["cpu_cores"], 0.4, 1e-12));
    assert!(close(&sidecar["memory_mib"], 120.0, 1e-12));
    assert_eq!(sidecar["latency_added_p90_ms"], 2.65);
    assert!(close(
        &sidecar["monthly_cost"],
        (0.4 * 0.04 + 120.0 / 1024.0 * 0.005) * 730.0,
        1e-9
    ));

    let [a, b] = two_agents();
    let table = meshctl(&[
        "impact",
        "--metrics",
        &a,
        "--metrics",
        &b,
        "--window",
        "100ms",
        "--rps",
        "1000",
    ]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["latency", "added", "(p90)", "0.970", "ms", "2.650", "ms"]),
        "{table}"
    );
}

#[test]
fn an_unreachable_metrics_endpoint_is_named_and_exits_with_3() {
    let [a, _] = two_agents();
    let dead = "http://127.0.0.1:9/metrics";
    let out = meshctl(&[
        "graph",
        "--metrics",
        &a,
        "--metrics",
        dead,
        "--window",
        "100ms",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("no metrics at {dead}")),
        "{stderr}"
    );
    let bad = meshctl(&["impact", "--metrics", "https://127.0.0.1:9/metrics"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr)
        .contains("https://127.0.0.1:9/metrics: not an http:// URL"));
}

#[test]
fn the_dashboard_refuses_a_non_loopback_address_and_dot_is_for_the_graph() {
    let out = meshctl(&["dashboard", "--listen", "0.0.0.0:20001"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--listen 0.0.0.0:20001: the dashboard serves on a loopback address only"),
        "{stderr}"
    );
    let out = meshctl(&["version", "-o", "svg"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("-o dot and -o svg are for meshctl graph")
    );
}
