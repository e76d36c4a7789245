//! Sandbox integration tests: a real two-node mesh on this machine (root needed), driven
//! through the same commands a user types — `cargo xtask sandbox …`, `meshctl`, curl.
//! One test walks the whole story so the sandbox is built once.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned()
}

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .current_dir(workspace())
        .output()
        .expect("running xtask")
}

fn ok(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn in_pod(pod: &str, script: &str) -> String {
    ok(
        xtask(&["sandbox", "exec", pod, "--", "sh", "-c", script]),
        &format!("in {pod}: {script}"),
    )
}

fn on_node(node: &str, args: &[&str]) -> String {
    let mut all = vec!["sandbox", "exec", "--node", node, "--"];
    all.extend_from_slice(args);
    ok(xtask(&all), &format!("on {node}: {args:?}"))
}

/// A command on a node whose exit code is part of its answer (`meshctl policy check`
/// exits with 4 on deny, `meshctl status` with 5 when not ready): the code and stdout.
fn on_node_answer(node: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["sandbox", "exec", "--node", node, "--"];
    all.extend_from_slice(args);
    let out = xtask(&all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn sha256_of_file(path: &str) -> String {
    let out = ok(
        Command::new("sha256sum")
            .arg(path)
            .output()
            .expect("sha256sum"),
        "sha256sum",
    );
    out.split_whitespace().next().expect("digest").to_owned()
}

fn download_digest(client: &str, url: &str) -> String {
    let out = in_pod(client, &format!("curl -sf --max-time 30 {url} | sha256sum"));
    out.split_whitespace().next().expect("digest").to_owned()
}

/// The cluster IP the sandbox gave a Service (`namespace/name`).
fn service_address(service: &str) -> String {
    ok(xtask(&["sandbox", "status"]), "status")
        .lines()
        .find(|l| l.split_whitespace().next() == Some(service))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no address for Service {service}"))
        .to_owned()
}

fn status_json() -> serde_json::Value {
    serde_json::from_str(&ok(xtask(&["sandbox", "status", "-o", "json"]), "status")).expect("JSON")
}

fn pod_ip(status: &serde_json::Value, name: &str) -> String {
    status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["ip"].as_str())
        .unwrap_or_else(|| panic!("pod {name} in the status"))
        .to_owned()
}

/// The value of the sample of `name` whose labels include every `labels` pair (none: a
/// sample without labels too).
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        if let Some(value) = rest.strip_prefix(' ') {
            return labels.is_empty().then(|| value.trim().parse().ok())?;
        }
        series_value(rest, labels)
    })
}

/// The sum of every series of `name` whose labels include `labels`.
fn total(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter_map(|line| series_value(line.strip_prefix(name)?, labels))
        .sum()
}

/// The value of a series written `{k="v",…} value`, if its labels include `labels`
/// (a value may hold commas, as response flags do: `UF,URX`).
fn series_value(series: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (set, value) = series.strip_prefix('{')?.rsplit_once("} ")?;
    let mut pairs = Vec::new();
    let mut rest = set;
    while let Some((key, after)) = rest.split_once("=\"") {
        let (label, tail) = after.split_once('"')?;
        pairs.push((key, label));
        rest = tail.strip_prefix(',').unwrap_or(tail);
    }
    labels
        .iter()
        .all(|(k, v)| pairs.contains(&(k, v)))
        .then(|| value.trim().parse().ok())?
}

/// Prometheus' own linter accepts the exposition.
fn promtool_check(metrics: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (installed by cargo xtask setup)");
    std::io::Write::write_all(
        &mut promtool.stdin.take().expect("stdin"),
        metrics.as_bytes(),
    )
    .expect("write");
    let output = promtool.wait_with_output().expect("promtool");
    // Istio's own name breaks one style rule (exit code 3: lint problems only); dashboards
    // query it by that name, so it stays.
    let istio_name =
        "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
    let problems = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let only_istio_names = output.status.code() == Some(3)
        && problems
            .lines()
            .all(|line| line.trim().is_empty() || line.trim() == istio_name);
    assert!(
        output.status.success() || only_istio_names,
        "promtool check metrics: {problems}"
    );
}

fn metrics(node: &str) -> String {
    on_node(node, &["curl", "-sf", "http://127.0.0.1:15020/metrics"])
}

/// The agent's status (`meshctl status` exits with 5 while the agent is not ready).
fn agent_status(node: &str) -> serde_json::Value {
    let (code, answer) = on_node_answer(node, &["meshctl", "status", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_str(&answer).expect("status JSON");
    let expected = if status["ready"] == true { 0 } else { 5 };
    assert_eq!(
        code,
        Some(expected),
        "meshctl status exit code for {status}"
    );
    status
}

/// Waits until `node`'s kernel holds its local `pod` under workload-wide STRICT
/// (`meshctl bpf workloads`): the PeerAuthentication reached the maps.
fn wait_strict_in_kernel(node: &str, pod: &str) {
    eventually(&format!("{node}'s kernel holds {pod} STRICT"), || {
        let maps: serde_json::Value = serde_json::from_str(&on_node(
            node,
            &["meshctl", "bpf", "workloads", "-o", "json"],
        ))
        .expect("JSON");
        maps["workloads"]
            .as_array()
            .expect("rows")
            .iter()
            .any(|w| w["pod"] == pod && w["local"] == true && w["mtls"] == "STRICT")
    });
}

/// Polls `check` for up to thirty seconds: pods start slowly on two loaded cores.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        sleep(Duration::from_millis(200));
    }
}

/// Polls `value` for up to thirty seconds until it equals `expected`; fails with the
/// last value seen.
fn eventually_eq<T: PartialEq + std::fmt::Debug>(
    what: &str,
    expected: T,
    mut value: impl FnMut() -> T,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = value();
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}: expected {expected:?}, last seen {seen:?}"
        );
        sleep(Duration::from_millis(200));
    }
}

/// The sandbox is machine-wide: one test at a time owns it, and tears it down even when
/// an assertion fails half-way.
struct Sandbox {
    _turn: std::sync::MutexGuard<'static, ()>,
}

static SANDBOX: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Sandbox {
    fn up() -> Sandbox {
        Sandbox::up_with(&[])
    }

    /// Up, with environment variables for `sandbox up` (e.g. the certificate lifetime).
    fn up_with(env: &[(&str, &str)]) -> Sandbox {
        Sandbox::up_with_args(&[], env)
    }

    /// Up, with arguments and environment variables for `sandbox up`.
    fn up_with_args(args: &[&str], env: &[(&str, &str)]) -> Sandbox {
        let turn = SANDBOX.lock().unwrap_or_else(|e| e.into_inner());
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["sandbox", "up"])
            .args(args)
            .envs(env.iter().copied())
            .current_dir(workspace())
            .output()
            .expect("sandbox up");
        ok(out, "sandbox up");
        Sandbox { _turn: turn }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = xtask(&["sandbox", "down"]);
    }
}

/// Applies (or deletes) YAML through `cargo xtask sandbox apply|delete -f`.
fn kubectl(verb: &str, name: &str, yaml: &str) {
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sandbox-test-{name}.yaml"));
    std::fs::write(&file, yaml).expect("write");
    ok(
        xtask(&["sandbox", verb, "-f", file.to_str().expect("path")]),
        &format!("{verb} {name}"),
    );
}

/// How many of `n` new connections to `url` (from client-a) each backend served, or what
/// the client saw when a request failed.
fn try_backends(url: &str, n: usize) -> Result<std::collections::BTreeMap<String, usize>, String> {
    let script = include_str!("count_backends.py");
    let out = xtask(&[
        "sandbox",
        "exec",
        "client-a",
        "--",
        "python3",
        "-c",
        script,
        url,
        &n.to_string(),
    ]);
    if !out.status.success() {
        return Err(format!(
            "{} of {n} requests to {url}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(serde_json::from_slice(&out.stdout).expect("counts"))
}

/// How many of `n` new connections to `url` (from client-a) each backend served; every
/// request must succeed.
#[track_caller]
fn backends(url: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    match try_backends(url, n) {
        Ok(spread) => spread,
        Err(seen) => panic!("a request failed: {seen}"),
    }
}

/// `pairs` as the map `backends` returns.
fn counts(pairs: &[(&str, usize)]) -> std::collections::BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[test]
fn sandbox_mesh_end_to_end() {
    let sandbox = Sandbox::up();

    // status -o json has the documented shape.
    let status = status_json();
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2);
    for node in nodes {
        for key in ["name", "netns", "ip", "uplink"] {
            assert!(node[key].is_string(), "node {key} in {node}");
        }
        assert!(node["agent"]["pid"].as_u64().is_some_and(|pid| pid > 0));
        assert!(node["agent"]["metrics"]
            .as_str()
            .is_some_and(|m| m.ends_with(":15020/metrics")));
    }
    assert!(status["pods"].as_array().expect("pods").len() >= 4);
    let (web_a, web_b) = (pod_ip(&status, "web-a"), pod_ip(&status, "web-b"));
    let web_a_blob = sha256_of_file("/run/mesh-sandbox/pods/demo-web-a/blob");
    let web_b_blob = sha256_of_file("/run/mesh-sandbox/pods/demo-web-b/blob");

    // Same node and across nodes, 4 MiB arrive intact.
    assert_eq!(
        download_digest("client-a", &format!("http://{web_a}:8080/blob")),
        web_a_blob
    );
    assert_eq!(
        download_digest("client-a", &format!("http://{web_b}:8080/blob")),
        web_b_blob
    );

    // A Service address reaches its endpoints, round robin.
    let mut served = Vec::new();
    for _ in 0..4 {
        let digest = download_digest("client-a", "http://10.96.0.100/blob");
        assert!(
            digest == web_a_blob || digest == web_b_blob,
            "the Service reached a non-endpoint"
        );
        served.push(digest);
    }
    assert!(
        served.contains(&web_a_blob) && served.contains(&web_b_blob),
        "round robin over both endpoints"
    );

    // Raw TCP through a Service to another node: 2 MiB echoed intact.
    let echo_vip = service_address("demo/echo");
    let echo_check = include_str!("echo_check.py");
    let echoed = ok(
        xtask(&[
            "sandbox", "exec", "client-a", "--", "python3", "-c", echo_check, &echo_vip, "9000",
        ]),
        "echo",
    );
    assert_eq!(echoed.trim(), "ok 2097152");

    // The agents' metrics carry the connection with Istio's labels and exact byte counts.
    let client_side = [
        ("reporter", "source"),
        ("source_workload", "client-a"),
        ("source_workload_namespace", "demo"),
        ("destination_workload", "echo-b"),
        ("destination_workload_namespace", "demo"),
        ("destination_service", "echo.demo.svc.cluster.local"),
    ];
    eventually("node-a reports the echo connection closed", || {
        sample(
            &metrics("node-a"),
            "istio_tcp_connections_closed_total",
            &client_side,
        ) == Some(1.0)
    });
    let node_a = metrics("node-a");
    assert_eq!(
        sample(&node_a, "istio_tcp_connections_opened_total", &client_side),
        Some(1.0)
    );
    assert_eq!(
        sample(&node_a, "istio_tcp_sent_bytes_total", &client_side),
        Some(2097152.0)
    );
    assert_eq!(
        sample(&node_a, "istio_tcp_received_bytes_total", &client_side),
        Some(2097152.0)
    );
    let server_side = [
        ("reporter", "destination"),
        ("source_workload", "client-a"),
        ("destination_workload", "echo-b"),
        ("destination_service", "echo.demo.svc.cluster.local"),
    ];
    eventually("node-b reports the echo connection closed", || {
        sample(
            &metrics("node-b"),
            "istio_tcp_connections_closed_total",
            &server_side,
        ) == Some(1.0)
    });
    assert_eq!(
        sample(
            &metrics("node-b"),
            "istio_tcp_received_bytes_total",
            &server_side
        ),
        Some(2097152.0)
    );
    promtool_check(&node_a);

    // node-b wires its pods on a bridge (as flannel does): web-b reaches echo-b at its
    // pod address, on the same subnet with no router between them, carried by the
    // kernel pod to pod (nothing for the agent to do), and node-b's agent reports the
    // connection with both workloads.
    let echo_b = pod_ip(&status, "echo-b");
    let echoed = ok(
        xtask(&[
            "sandbox", "exec", "web-b", "--", "python3", "-c", echo_check, &echo_b, "9000",
        ]),
        "echo on the bridge",
    );
    assert_eq!(echoed.trim(), "ok 2097152");
    let on_the_bridge = [
        ("reporter", "source"),
        ("source_workload", "web-b"),
        ("destination_workload", "echo-b"),
    ];
    eventually("node-b reports the bridged connection closed", || {
        sample(
            &metrics("node-b"),
            "istio_tcp_connections_closed_total",
            &on_the_bridge,
        ) == Some(1.0)
    });
    assert_eq!(
        sample(
            &metrics("node-b"),
            "istio_tcp_sent_bytes_total",
            &on_the_bridge
        ),
        Some(2097152.0)
    );
    assert_eq!(
        sample(
            &metrics("node-b"),
            "mesh_connections_carried_total",
            &[("how", "kernel")]
        ),
        Some(1.0)
    );
    let enrolled = agent_status("node-b");
    assert!(
        enrolled["enrolled"]["demo/web-b"]["bridged"] == true,
        "node-b's agent found web-b's veth on the bridge: {enrolled}"
    );
    // A pod on the bridge resolves the cluster's names through its node's agent too.
    let hosts = in_pod("web-b", "getent ahostsv4 web.demo.svc.cluster.local");
    assert!(hosts.starts_with("10.96.0.100 "), "{hosts}");

    // An open connection shows in the kernel's flow map with its workloads. (Its byte
    // counts refresh on incoming segments and may lag on a quiet connection; exact
    // counts are checked above, from the close events.)
    let slow = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "sandbox",
            "exec",
            "client-a",
            "--",
            "timeout",
            "6",
            "curl",
            "-s",
            "--limit-rate",
            "200k",
        ])
        .args(["-o", "/dev/null", &format!("http://{web_b}:8080/blob")])
        .current_dir(workspace())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("slow client");
    eventually("the open flow appears in meshctl bpf flows", || {
        let flows: serde_json::Value = serde_json::from_str(&on_node(
            "node-a",
            &["meshctl", "bpf", "flows", "-o", "json"],
        ))
        .expect("JSON");
        flows.as_array().expect("rows").iter().any(|f| {
            f["local_workload"] == "demo/client-a"
                && f["remote_workload"] == "demo/web-b"
                && f["role"] == "client"
        })
    });
    drop(slow);

    // Programs and maps are visible to meshctl; the agent reports its state.
    let programs = on_node("node-a", &["meshctl", "bpf", "programs"]);
    assert!(
        programs.contains("demo/client-a tc-from") && programs.contains("demo/web-a sockops"),
        "{programs}"
    );
    let workloads = on_node("node-a", &["meshctl", "bpf", "workloads"]);
    assert!(
        workloads.contains("10.96.0.100:80") && workloads.contains("echo-b"),
        "{workloads}"
    );
    let status = agent_status("node-a");
    assert_eq!(status["enrolled"].as_object().expect("enrolled").len(), 2);
    assert!(status["last_error"].is_null());
    // Two local pods on each node, enrolled.
    for node in ["node-a", "node-b"] {
        assert_eq!(
            sample(&metrics(node), "mesh_enrolled_pods", &[]),
            Some(2.0),
            "{node}"
        );
    }
    // How many loads the sandbox's start made depends on when the agent polled its
    // directory; from here on each change is one load, and every applied load is one
    // generation (metric and status alike).
    let generation = status["generation"].as_u64().expect("generation");
    assert!(generation >= 1, "{status}");
    let reloads = |generation: u64, rejected: u64| {
        let m = metrics("node-a");
        (
            agent_status("node-a")["generation"].as_u64(),
            sample(&m, "mesh_config_generation", &[]),
            sample(&m, "mesh_config_reloads_total", &[("result", "success")]),
            sample(&m, "mesh_config_reloads_total", &[("result", "rejected")]).unwrap_or(0.0),
        ) == (
            Some(generation),
            Some(generation as f64),
            Some(generation as f64),
            rejected as f64,
        )
    };
    assert!(reloads(generation, 0), "{}", metrics("node-a"));

    // A broken configuration change is rejected; the last good one keeps serving. (Files
    // appear whole, renamed into the directory: the agent never reads one half-written.)
    let config = Path::new("/run/mesh-sandbox/config");
    let put = |name: &str, text: &str| {
        let staged = Path::new("/run/mesh-sandbox").join(format!("{name}.staged"));
        std::fs::write(&staged, text).expect("write");
        std::fs::rename(&staged, config.join(name)).expect("rename");
    };
    put(
        "zz-broken.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x\n",
    );
    eventually("the agent reports the broken file", || {
        agent_status("node-a")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("zz-broken.yaml") && e.contains("YAML syntax"))
    });
    assert!(
        reloads(generation, 1),
        "one rejected load, the generation kept: {}",
        metrics("node-a")
    );
    assert_eq!(
        download_digest("client-a", &format!("http://{web_b}:8080/blob")),
        web_b_blob
    );
    std::fs::remove_file(config.join("zz-broken.yaml")).expect("remove");
    eventually("the configuration without the broken file applies", || {
        reloads(generation + 1, 1) && agent_status("node-a")["last_error"].is_null()
    });
    put(
        "zz-unknown.yaml",
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w, namespace: demo}\n",
    );
    eventually("the agent names the unknown kind and its object", || {
        agent_status("node-a")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Widget demo/w: unknown kind Widget"))
    });
    assert!(reloads(generation + 1, 2), "{}", metrics("node-a"));
    std::fs::remove_file(config.join("zz-unknown.yaml")).expect("remove");
    eventually("a good configuration clears the error", || {
        agent_status("node-a")["last_error"].is_null()
    });
    assert!(reloads(generation + 2, 2), "{}", metrics("node-a"));

    // apply adds a pod and a Service the mesh serves at once; delete takes them away.
    let extra = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sandbox-test-extra.yaml");
    std::fs::write(&extra, include_str!("extra.yaml")).expect("write");
    let extra = extra.to_str().expect("path");
    ok(xtask(&["sandbox", "apply", "-f", extra]), "apply");
    let status = status_json();
    assert!(status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .any(|p| p["name"] == "web-c" && p["node"] == "node-b"));
    let greeting = in_pod("client-a", "curl -sf --max-time 10 http://10.96.0.200/");
    assert!(greeting.contains("Directory listing"), "{greeting}");
    pods_resolve_names_through_their_node_agent();
    service_entries_without_addresses_get_one_and_resolve_their_hosts();
    ok(xtask(&["sandbox", "delete", "-f", extra]), "delete");
    assert!(!status_json()["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .any(|p| p["name"] == "web-c"));
    eventually("the deleted Service is gone from the kernel maps", || {
        !on_node("node-a", &["meshctl", "bpf", "workloads"]).contains("10.96.0.200")
    });
    let gone = xtask(&[
        "sandbox",
        "exec",
        "client-a",
        "--",
        "curl",
        "-sf",
        "--max-time",
        "2",
        "http://10.96.0.200/",
    ]);
    assert!(!gone.status.success(), "a deleted Service must not answer");

    // down leaves the machine as it was.
    ok(xtask(&["sandbox", "down"]), "sandbox down");
    drop(sandbox);
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns");
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains("msb-"),
        "namespaces left behind"
    );
    for path in ["/run/mesh-sandbox", "/sys/fs/bpf/mesh-sandbox"] {
        assert!(!Path::new(path).exists(), "{path} left behind");
    }
    let cgroup2 = cgroup2_mount();
    assert!(
        !Path::new(&cgroup2).join("mesh-sandbox").exists(),
        "cgroups left behind"
    );
}

/// The CA's answer (status code, body) to a signing request from `node`'s namespace with
/// `token`, for `identity` with a CSR that is not one (so an answer past authentication
/// and the node check is 400), naming the node `claimed` in `X-Mesh-Node`.
fn ca_answer(node: &str, token: &str, identity: &str, claimed: &str) -> (String, String) {
    let body = serde_json::json!({"identity": identity, "csr": "not a CSR"}).to_string();
    let out = on_node(
        node,
        &[
            "curl",
            "-s",
            "-m",
            "10",
            "-w",
            "\n%{http_code}",
            "--cacert",
            "/run/mesh-sandbox/ca/root-cert.pem",
            "--resolve",
            "mesh-ca:15012:10.200.0.254",
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
            "-H",
            &format!("X-Mesh-Node: {claimed}"),
            "-d",
            &body,
            "https://mesh-ca:15012/v1/certificates",
        ],
    );
    let (body, code) = out.rsplit_once('\n').expect("a status code");
    (code.to_owned(), body.to_owned())
}

/// On the API source the CA learns the asking node from the agent's ServiceAccount
/// token, as the API server reviews it, and signs only identities of pods there.
fn the_ca_signs_only_what_the_reviewed_token_s_node_hosts() {
    let agent_token =
        |node: &str| std::fs::read_to_string(format!("/run/mesh-sandbox/ca/token-{node}"));
    let (node_a, node_b) = (
        agent_token("node-a").expect("node-a's token"),
        agent_token("node-b").expect("node-b's token"),
    );
    // demo/client runs on node-a only (client-a).
    let client = "spiffe://cluster.local/ns/demo/sa/client";
    let answer = ca_answer("node-a", &node_a, client, "node-a");
    assert_eq!(
        answer.0, "400",
        "past authentication and the node check: {answer:?}"
    );
    assert!(
        answer.1.contains("certificate signing request"),
        "{answer:?}"
    );
    let answer = ca_answer("node-b", &node_b, client, "node-b");
    assert_eq!(answer.0, "403", "{answer:?}");
    assert!(
        answer.1.contains("node node-b: runs no pod of"),
        "{answer:?}"
    );
    // Saying to be node-a does not make node-b's token speak for it.
    let answer = ca_answer("node-b", &node_b, client, "node-a");
    assert_eq!(answer.0, "403", "{answer:?}");
    assert!(
        answer.1.contains("speaks for node node-b, not node-a"),
        "{answer:?}"
    );
    // Tokens that are not a node agent's for the CA are refused.
    let token = |args: &[&str]| {
        let mut all = vec!["create", "token"];
        all.extend_from_slice(args);
        ok(sandbox_kubectl(&all), "kubectl create token")
    };
    let bound = [
        "--bound-object-kind",
        "Node",
        "--bound-object-name",
        "node-a",
    ];
    let other_audience = token(
        &[
            &["mesh-agent", "-n", "mesh-system", "--audience", "other"][..],
            &bound[..],
        ]
        .concat(),
    );
    let unbound = token(&["mesh-agent", "-n", "mesh-system", "--audience", "mesh-ca"]);
    ok(
        sandbox_kubectl(&["create", "serviceaccount", "intruder", "-n", "demo"]),
        "kubectl create serviceaccount",
    );
    let intruder = token(
        &[
            &["intruder", "-n", "demo", "--audience", "mesh-ca"][..],
            &bound[..],
        ]
        .concat(),
    );
    for (token, says) in [
        (other_audience.as_str(), "not valid"),
        (unbound.as_str(), "bound to no pod or node"),
        (intruder.as_str(), "not the agents' ServiceAccount"),
        ("made-up", "not valid"),
    ] {
        let answer = ca_answer("node-a", token, client, "node-a");
        assert_eq!(answer.0, "401", "{says}: {answer:?}");
        assert!(answer.1.contains(says), "{says}: {answer:?}");
    }
}

/// The count of `mesh_dns_queries_total` with `result` on `node`'s agent.
fn dns_queries(node: &str, result: &str) -> u64 {
    let series = format!("mesh_dns_queries_total{{result=\"{result}\"}} ");
    metrics(node)
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map_or(0, |value| value.trim().parse().expect("a count"))
}

/// A pod's DNS goes to its node agent, whichever server it asks: the mesh's names are
/// answered there (every form of a Service's name, by the pod's namespace; a Service just
/// applied among them), an unknown cluster name does not exist, other names come from
/// the node's resolver, over UDP and TCP; and nobody but the node's pods is answered.
fn pods_resolve_names_through_their_node_agent() {
    let answered = dns_queries("node-a", "answered");
    for name in [
        "web",
        "web.demo",
        "web.demo.svc",
        "web.demo.svc.cluster.local",
    ] {
        let hosts = in_pod("client-a", &format!("getent ahostsv4 {name}"));
        assert!(hosts.starts_with("10.96.0.100 "), "{name}: {hosts}");
    }
    assert!(dns_queries("node-a", "answered") >= answered + 4);
    // By name, through the mesh: the Service applied a moment ago too.
    let reply = in_pod(
        "client-a",
        "curl -sf -m 10 http://web.demo.svc.cluster.local/name",
    );
    assert!(["web-a", "web-b"].contains(&reply.trim()), "{reply}");
    let greeting = in_pod("client-a", "curl -sf -m 10 http://web2/");
    assert!(greeting.contains("Directory listing"), "{greeting}");
    // The wire: the answer comes from the address and port the pod asked, even one
    // where no server is, and over TCP too.
    let script = workspace().join("xtask/tests/dns_query.py");
    let script = script.to_str().expect("path");
    let ask = |args: &str| in_pod("client-a", &format!("python3 {script} {args}"));
    assert_eq!(
        ask("web2.demo.svc.cluster.local").trim(),
        "from=10.96.0.10:53 rcode=0 answers=10.96.0.200"
    );
    assert_eq!(
        ask("--server 10.96.0.53 web.demo").trim(),
        "from=10.96.0.53:53 rcode=0 answers=10.96.0.100"
    );
    assert_eq!(
        ask("--tcp web.demo.svc.cluster.local").trim(),
        "rcode=0 answers=10.96.0.100"
    );
    // NXDOMAIN for an unknown name of the cluster, without asking anyone else.
    let nxdomain = dns_queries("node-a", "nxdomain");
    assert_eq!(
        ask("nope.demo.svc.cluster.local").trim(),
        "from=10.96.0.10:53 rcode=3 answers="
    );
    assert_eq!(dns_queries("node-a", "nxdomain"), nxdomain + 1);
    let missing = xtask(&[
        "sandbox",
        "exec",
        "client-a",
        "--",
        "getent",
        "ahostsv4",
        "nope.demo.svc.cluster.local",
    ]);
    assert_eq!(missing.status.code(), Some(2), "getent: not found");
    // Other names: the node's resolver (dnsmasq at 10.200.0.250) answers, over both.
    let forwarded = dns_queries("node-a", "forwarded");
    assert_eq!(
        ask("upstream.example.test").trim(),
        "from=10.96.0.10:53 rcode=0 answers=10.200.0.249"
    );
    assert_eq!(
        ask("--tcp upstream.example.test").trim(),
        "rcode=0 answers=10.200.0.249"
    );
    assert_eq!(dns_queries("node-a", "forwarded"), forwarded + 2);
    let hosts = in_pod("client-a", "getent ahostsv4 upstream.example.test");
    assert!(hosts.starts_with("10.200.0.249 "), "{hosts}");
    // The proxy's port, asked from the node's network: not a pod of the node, no answer.
    let refused = dns_queries("node-a", "refused");
    let outside = on_node(
        "node-a",
        &[
            "python3",
            script,
            "--server",
            "10.200.0.1",
            "--port",
            "15053",
            "web.demo",
        ],
    );
    assert_eq!(outside.trim(), "no answer");
    assert_eq!(dns_queries("node-a", "refused"), refused + 1);
}

/// A `resolution: DNS` ServiceEntry without addresses for a name the nodes' resolver
/// gives web-b's address (`shop.example.test`, see `xtask/src/resolver.rs`).
const SHOP_ENTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shop, namespace: demo}
spec:
  hosts: [shop.example.test]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: DNS
";

/// A ServiceEntry without addresses: its host gets an address of 240.240.0.0/16, which
/// the pods' DNS answers and the mesh captures like a cluster IP, and, `resolution:
/// DNS`, its endpoints are what the node's resolver says the host is. Deleted, the name
/// is the resolver's again.
fn service_entries_without_addresses_get_one_and_resolve_their_hosts() {
    let resolve = || in_pod("client-a", "getent ahostsv4 shop.example.test");
    assert!(resolve().starts_with("10.244.2.2 "), "{}", resolve());
    kubectl("apply", "shop-entry", SHOP_ENTRY);
    eventually("the host has an allocated address", || {
        resolve().starts_with("240.240.")
    });
    let allocated = resolve();
    let allocated = allocated.split_whitespace().next().expect("an address");
    eventually(
        "the host's endpoint is resolved and reached through the mesh",
        || {
            in_pod(
                "client-a",
                "curl -s -m 5 http://shop.example.test:8080/name || true",
            )
            .trim()
                == "web-b"
        },
    );
    let kernel = on_node("node-a", &["meshctl", "bpf", "workloads"]);
    assert!(kernel.contains(allocated), "{kernel}");
    kubectl("delete", "shop-entry", SHOP_ENTRY);
    eventually("the name is the resolver's again", || {
        resolve().starts_with("10.244.2.2 ")
    });
}

fn sandbox_kubectl(args: &[&str]) -> Output {
    let mut all = vec!["sandbox", "kubectl"];
    all.extend_from_slice(args);
    xtask(&all)
}

/// What the agent's Kubernetes API source makes of the objects the API server holds, read
/// from a node's network namespace as an agent there reads them.
fn api_validation(node: &str, kubeconfig: &str) -> serde_json::Value {
    let out = xtask(&[
        "sandbox",
        "exec",
        "--node",
        node,
        "--",
        "meshctl",
        "-o",
        "json",
        "validate",
        "--kube",
        "--kubeconfig",
        kubeconfig,
    ]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "meshctl validate --kube: {e}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn the_sandbox_runs_a_kubernetes_api_server_that_takes_the_istio_corpus() {
    let _sandbox = Sandbox::up();
    let status = status_json();
    let kubeconfig = status["kubeconfig"].as_str().expect("kubeconfig in status");
    assert!(Path::new(kubeconfig).is_file(), "{kubeconfig}");
    let version = ok(
        sandbox_kubectl(&["version", "-o", "json"]),
        "kubectl version",
    );
    let version: serde_json::Value = serde_json::from_str(&version).expect("version JSON");
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.37.2");

    // The Helm chart, rendered by the pinned helm, installs into the real API server.
    let chart = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chart.yaml");
    std::fs::write(
        &chart,
        ok(
            xtask(&["chart", "--set", "defaultEnrollment=ambient"]),
            "cargo xtask chart",
        ),
    )
    .expect("write");
    ok(
        sandbox_kubectl(&["apply", "-f", chart.to_str().expect("path")]),
        "kubectl apply the chart",
    );
    let agent: serde_json::Value = serde_json::from_str(&ok(
        sandbox_kubectl(&[
            "get",
            "-n",
            "mesh-system",
            "daemonset/mesh-agent",
            "-o",
            "json",
        ]),
        "kubectl get the DaemonSet",
    ))
    .expect("DaemonSet JSON");
    let env: std::collections::BTreeMap<&str, &str> = agent["spec"]["template"]["spec"]
        ["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    assert_eq!(env["MESH_CA_ADDRESS"], "mesh-ca.mesh-system.svc:15012");
    assert_eq!(env["MESH_DEFAULT_ENROLLMENT"], "ambient");
    assert_eq!(env["MESH_CONFIG_SOURCE"], "kube");
    let namespace: serde_json::Value = serde_json::from_str(&ok(
        sandbox_kubectl(&["get", "namespace", "mesh-system", "-o", "json"]),
        "kubectl get the namespace",
    ))
    .expect("namespace JSON");
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );

    // Istio's examples, as written (v1alpha3, v1beta1 and v1), into namespaces of their
    // own (made here where no file creates them). The only objects the API server refuses
    // are Pods without containers, which istioctl's analyzer test data holds and
    // Kubernetes rejects.
    let corpus = workspace().join("mesh-agent/tests/testdata/istio");
    for namespace in [
        "istio-system",
        "foo",
        "bar",
        "myapp",
        "httpbin-empty",
        "test-ambient",
        "other",
        "testns",
    ] {
        ok(
            sandbox_kubectl(&["create", "namespace", namespace]),
            "create namespace",
        );
    }
    // Twice: some files use a namespace before the document that creates it.
    let apply = || sandbox_kubectl(&["apply", "-R", "-f", corpus.to_str().expect("path")]);
    apply();
    let out = apply();
    let refused: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("Pod \"") || !l.contains("is invalid"))
        .map(str::to_owned)
        .collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");
    let listed = ok(
        sandbox_kubectl(&[
            "get",
            "vs,dr,gw,se,sidecars,pa,ra,ap,telemetry,we,wg",
            "-A",
            "-o",
            "name",
        ]),
        "kubectl get",
    );
    assert!(listed.lines().count() > 80, "{listed}");

    // What the model refuses by shape, the API server's schema refuses first, naming the
    // field: an unknown field, a value of the wrong type, an enum value Istio lacks, a
    // malformed duration.
    for (spec, field) in [
        (
            "{hosts: [web], http: [{rout: [{destination: {host: web}}]}]}",
            "spec.http[0].rout",
        ),
        (
            "{hosts: [web], http: [{route: [{destination: {host: web}, weight: heavy}]}]}",
            "spec.http[0].route[0].weight",
        ),
        (
            "{hosts: [web], http: [{route: [{destination: {host: web}}], timeout: 5 seconds}]}",
            "spec.http[0].timeout",
        ),
    ] {
        let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("refused-vs.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
                 metadata: {{name: refused, namespace: foo}}\nspec: {spec}\n"
            ),
        )
        .expect("write");
        let out = sandbox_kubectl(&["apply", "-f", file.to_str().expect("path")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec} accepted");
        assert!(stderr.contains(field), "{spec}: {stderr}");
    }
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("refused-dr.yaml");
    std::fs::write(
        &file,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: refused, namespace: foo}\n\
         spec: {host: web, trafficPolicy: {loadBalancer: {simple: FASTEST}}}\n",
    )
    .expect("write");
    let out = sandbox_kubectl(&["apply", "-f", file.to_str().expect("path")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("spec.trafficPolicy.loadBalancer.simple"),
        "{stderr}"
    );
    assert!(
        stderr.contains("ROUND_ROBIN"),
        "the values allowed: {stderr}"
    );

    // The agent's API source reads them through the same loader as the directory: an
    // invalid VirtualService the schema cannot catch is skipped (reported by name and
    // field), the rest served.
    let before = api_validation("node-a", kubeconfig);
    let broken = "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
                  metadata: {name: broken, namespace: foo}\n\
                  spec: {hosts: [web], http: [{route: [{destination: {host: web}, weight: 140}]}]}\n";
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("broken-vs.yaml");
    std::fs::write(&file, broken).expect("write");
    ok(
        sandbox_kubectl(&["apply", "-f", file.to_str().expect("path")]),
        "apply broken",
    );
    let after = api_validation("node-a", kubeconfig);
    assert_eq!(
        after["errors"],
        before["errors"].as_u64().expect("count") + 1
    );
    let skipped: Vec<&serde_json::Value> = after["diagnostics"]
        .as_array()
        .expect("diagnostics")
        .iter()
        .filter(|d| d["resource"] == "VirtualService foo/broken")
        .collect();
    assert_eq!(skipped.len(), 1, "{after:#}");
    assert_eq!(skipped[0]["field"], "spec.http[0].route[0].weight");
    assert!(
        skipped[0]["message"]
            .as_str()
            .is_some_and(|m| m.ends_with("(object skipped)")),
        "{:#}",
        skipped[0]
    );
}

#[test]
fn agents_on_the_kubernetes_api_follow_pods_created_and_deleted_through_it() {
    let _sandbox = Sandbox::up_with_args(&["--config-source", "kube"], &[]);
    assert_eq!(status_json()["config_source"], "kube");
    let agent = agent_status("node-a");
    assert_eq!(agent["source"], "https://10.200.0.253:6443/");
    assert_eq!(agent["workloads"], 4, "{agent:#}");
    // The pods as the API server holds them, with the status the sandbox set as the
    // kubelet would, and the UID the agents found their cgroups by.
    let pods = ok(
        sandbox_kubectl(&[
            "get",
            "pods",
            "-n",
            "demo",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.status.podIP}{\"\\n\"}{end}",
        ]),
        "kubectl get pods",
    );
    assert!(pods.contains("web-b Running 10.244.2.2"), "{pods}");
    let url = "http://10.96.0.100/name";
    let spread = backends(url, 4);
    assert_eq!(spread.values().sum::<usize>(), 4, "{spread:?}");

    // A pod created through the API joins the Service's rotation; deleted, it leaves.
    kubectl("apply", "web-c", WEB_C);
    eventually("web-c in the web Service's rotation", || {
        try_backends(url, 6).is_ok_and(|b| b.contains_key("web-c"))
    });
    // A Service created with kubectl (the API server picks its cluster IP) is reachable
    // by name from a pod: the node agent answers its name and carries the connection.
    ok(
        sandbox_kubectl(&[
            "expose",
            "pod",
            "web-c",
            "-n",
            "demo",
            "--name",
            "canary",
            "--port",
            "80",
            "--target-port",
            "8080",
        ]),
        "kubectl expose",
    );
    eventually("the canary Service answers by name", || {
        xtask(&[
            "sandbox",
            "exec",
            "client-a",
            "--",
            "curl",
            "-sf",
            "-m",
            "3",
            "http://canary/name",
        ])
        .stdout
            == b"web-c\n"
    });
    ok(
        sandbox_kubectl(&["delete", "service", "canary", "-n", "demo"]),
        "kubectl delete service",
    );
    // Relabelled with kubectl so the Service no longer selects it, web-c leaves the
    // rotation; labelled back, it returns.
    let relabel = |app: &str| {
        ok(
            sandbox_kubectl(&[
                "label",
                "pod",
                "web-c",
                "-n",
                "demo",
                &format!("app={app}"),
                "--overwrite",
            ]),
            "kubectl label",
        )
    };
    relabel("web-retired");
    eventually("the relabelled web-c out of the rotation", || {
        try_backends(url, 6).is_ok_and(|b| !b.contains_key("web-c"))
    });
    relabel("web");
    eventually("web-c back in the rotation once labelled back", || {
        try_backends(url, 6).is_ok_and(|b| b.contains_key("web-c"))
    });
    // A pod made with plain kubectl and no node: the sandbox's scheduler binds it to
    // the node running the fewest pods, that node's kubelet starts it and reports it
    // Ready once its probe passes, and it joins the rotation.
    let web_d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sandbox-test-web-d.yaml");
    std::fs::write(&web_d, WEB_D).expect("write");
    ok(
        sandbox_kubectl(&["apply", "-f", web_d.to_str().expect("path")]),
        "kubectl apply web-d",
    );
    let pod_line = |name: &str| {
        sandbox_kubectl(&[
            "get",
            "pod",
            name,
            "-n",
            "demo",
            "-o",
            "jsonpath={.spec.nodeName} {.status.phase} {.status.conditions[?(@.type==\"Ready\")].status}",
        ])
    };
    eventually_eq(
        "web-d scheduled, running and ready",
        "node-a Running True".to_owned(),
        || String::from_utf8_lossy(&pod_line("web-d").stdout).into_owned(),
    );
    eventually("web-d in the web Service's rotation", || {
        try_backends(url, 8).is_ok_and(|b| b.contains_key("web-d"))
    });
    // A headless Service's pod with a hostname and the Service as its subdomain (as a
    // StatefulSet names its pods) answers to its own name, completed from the asking
    // pod's namespace.
    let db = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sandbox-test-db.yaml");
    std::fs::write(&db, DB_0).expect("write");
    ok(
        sandbox_kubectl(&["apply", "-f", db.to_str().expect("path")]),
        "kubectl apply db",
    );
    eventually("db-0.db resolves to db-0's address from client-a", || {
        let address = sandbox_kubectl(&[
            "get",
            "pod",
            "db-0",
            "-n",
            "demo",
            "-o",
            "jsonpath={.status.podIP}",
        ])
        .stdout;
        let answer = xtask(&[
            "sandbox", "exec", "client-a", "--", "getent", "hosts", "db-0.db",
        ]);
        !address.is_empty() && answer.stdout.starts_with(&address)
    });
    ok(
        sandbox_kubectl(&["delete", "service", "db", "-n", "demo"]),
        "kubectl delete service db",
    );
    // Deleted with kubectl (gracefully: the API server waits for the kubelet), a pod is
    // stopped and leaves the rotation; kubectl returns once the kubelet confirmed it.
    let deleted = Instant::now();
    for pod in ["web-c", "web-d", "db-0"] {
        ok(
            sandbox_kubectl(&["delete", "pod", pod, "-n", "demo", "--timeout=30s"]),
            "kubectl delete pod",
        );
    }
    eventually("web-c, web-d and db-0 gone from node-a's agent", || {
        agent_status("node-a")["workloads"] == 4
    });
    // Reported, not asserted: timings on a shared machine are benchmarks.
    eprintln!(
        "node-a's agent dropped web-c, web-d and db-0 {:?} after `kubectl delete` began",
        deleted.elapsed()
    );
    let status = status_json();
    let pods: Vec<&str> = status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(
        ["web-c", "web-d", "db-0"]
            .iter()
            .all(|deleted| !pods.contains(deleted)),
        "the deleted pods still run: {pods:?}"
    );
    let spread = backends(url, 12);
    assert_eq!(spread.values().sum::<usize>(), 12, "{spread:?}");
    assert!(
        !spread.contains_key("web-c") && !spread.contains_key("web-d"),
        "{spread:?}"
    );

    // The Kubernetes API's own Service (`default/kubernetes`, no selector: its endpoint
    // is in the EndpointSlice the API server keeps) is reached from a pod through the
    // mesh, as pods reach it on any cluster: the node has no kube-proxy.
    let api = in_pod(
        "client-a",
        "curl -sk -m 5 -o /dev/null -w '%{http_code}' https://10.96.0.1/version",
    );
    assert!(
        ["200", "401", "403"].contains(&api.trim()),
        "the API server through its Service answered {api:?}"
    );

    the_ca_signs_only_what_the_reviewed_token_s_node_hosts();

    // An invalid VirtualService the schema cannot catch: the agents skip it, the rest
    // keeps serving, and it is reported on the object in one Event (two agents judged it).
    kubectl(
        "apply",
        "broken",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {name: broken, namespace: demo}\n\
         spec: {hosts: [web], http: [{route: [{destination: {host: web}, weight: 140}]}]}\n",
    );
    let events = || -> serde_json::Value {
        serde_json::from_str(&ok(
            sandbox_kubectl(&[
                "get",
                "events",
                "-n",
                "demo",
                "--field-selector",
                "reason=InvalidConfiguration,involvedObject.name=broken",
                "-o",
                "json",
            ]),
            "kubectl get events",
        ))
        .expect("events JSON")
    };
    eventually("an Event on the invalid VirtualService", || {
        events()["items"]
            .as_array()
            .is_some_and(|items| !items.is_empty())
    });
    let spread = backends(url, 4);
    assert_eq!(spread.values().sum::<usize>(), 4, "{spread:?}");
    let events = events();
    let items = events["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{events:#}");
    assert_eq!(items[0]["type"], "Warning");
    assert_eq!(items[0]["involvedObject"]["kind"], "VirtualService");
    let message = items[0]["message"].as_str().expect("message");
    assert!(
        message.starts_with("spec.http[0].route[0].weight: ")
            && message.ends_with("(object skipped)"),
        "{message}"
    );

    // The API server killed and started again under traffic: no request fails (the
    // agents serve what they hold), and their watches catch up: a pod created through
    // the restarted server joins the rotation.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut served, mut failures) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match try_backends(url, 2) {
                    Ok(spread) => served += spread.values().sum::<usize>(),
                    Err(failure) => failures.push(failure),
                }
            }
            (served, failures)
        })
    };
    sleep(Duration::from_secs(1));
    ok(xtask(&["sandbox", "restart-api"]), "sandbox restart-api");
    sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failures) = traffic.join().expect("the traffic thread");
    assert!(failures.is_empty(), "{failures:?}");
    assert!(served >= 2, "{served} requests served around the restart");
    kubectl("apply", "web-c", WEB_C);
    eventually(
        "web-c in the rotation after the API server's restart",
        || try_backends(url, 6).is_ok_and(|b| b.contains_key("web-c")),
    );
    kubectl("delete", "web-c", WEB_C);
    eventually("web-c gone again", || {
        agent_status("node-a")["workloads"] == 4
    });

    // Istio's MeshConfig, changed through the API (the sandbox created it from
    // cluster.yaml): its access log file and JSON encoding reach the agents, and the next
    // requests to web are logged at both ends.
    let log = "/run/mesh-sandbox/access-kube.log";
    json_access_log_to(log);
    eventually(
        "requests to web logged as the API's MeshConfig says",
        || {
            let _ = try_backends(url, 1);
            logged_lines(log).iter().any(|line| line["path"] == "/name")
        },
    );

    // A namespace joins by Istio ambient's label set through the API: its running pod
    // stays out until then.
    kubectl(
        "apply",
        "legacy",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: legacy}}\n---\n{}",
            probed_pod("old", "legacy", "app: old", "")
        ),
    );
    assert!(!enrolled_pods("node-a").contains(&"legacy/old".to_owned()));
    ok(
        sandbox_kubectl(&[
            "label",
            "namespace",
            "legacy",
            "istio.io/dataplane-mode=ambient",
        ]),
        "kubectl label namespace",
    );
    eventually(
        "the pod of the namespace labelled through the API is enrolled",
        || enrolled_pods("node-a").contains(&"legacy/old".to_owned()),
    );
}

/// Istio's MeshConfig (the ConfigMap `istio-system/istio`) applied with an access log
/// in JSON to `log`, emptied first.
fn json_access_log_to(log: &str) {
    let _ = std::fs::remove_file(log);
    kubectl(
        "apply",
        "mesh-config",
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\n\
             data:\n  mesh: |\n    accessLogFile: {log}\n    accessLogEncoding: JSON\n"
        ),
    );
}

/// The lines of a JSON access log, each parsed.
fn logged_lines(log: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

#[test]
fn meshctl_without_a_mesh_says_so() {
    let meshctl = Path::new(env!("CARGO_BIN_EXE_xtask")).with_file_name("meshctl");
    let out = Command::new(&meshctl)
        .args(["--bpffs", "/sys/fs/bpf/no-such-mesh", "bpf", "flows"])
        .output()
        .expect("meshctl");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no mesh maps at /sys/fs/bpf/no-such-mesh"),
        "{stderr}"
    );
    let out = Command::new(&meshctl)
        .args(["--admin", "127.0.0.1:9", "status"])
        .output()
        .expect("meshctl");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no mesh agent answers at 127.0.0.1:9"));
}

/// meshctl where no agent listens and no map is pinned — the API server's namespace,
/// outside every node — as a user with only the `mesh-operator` roles: what an operator's
/// workstation has.
fn meshctl_off_the_nodes(args: &[&str]) -> (Option<i32>, String, String) {
    let kubeconfig = status_json()["operator_kubeconfig"]
        .as_str()
        .expect("the sandbox's kubeconfig")
        .to_owned();
    let meshctl = Path::new(env!("CARGO_BIN_EXE_xtask")).with_file_name("meshctl");
    let out = Command::new("ip")
        .args(["netns", "exec", "msb-api"])
        .arg(meshctl)
        .args(["--kubeconfig", &kubeconfig])
        .args(args)
        .output()
        .expect("meshctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_off_the_nodes(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (code, stdout, stderr) = meshctl_off_the_nodes(&all);
    assert_eq!(code, Some(0), "meshctl {all:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("meshctl {all:?}: {e}\n{stdout}"))
}

#[test]
fn every_meshctl_command_reaches_a_nodes_agent_through_the_api_server() {
    let _sandbox = Sandbox::up_with_args(&["--config-source", "kube"], &[]);
    let status = status_json();
    let web_b = pod_ip(&status, "web-b");

    // The agent of the node named, or of the named pod's node, by port-forward.
    let agent = json_off_the_nodes(&["--node", "node-b", "status"]);
    assert_eq!(agent["node"], "node-b", "{agent:#}");
    assert_eq!(
        agent["enrolled"]["demo/web-b"]["ip"],
        web_b.as_str(),
        "{agent:#}"
    );
    assert_eq!(
        json_off_the_nodes(&["--pod", "demo/web-a", "status"])["node"],
        "node-a"
    );
    let version = json_off_the_nodes(&["--node", "node-b", "version"]);
    assert_eq!(version["agent"]["node"], "node-b", "{version:#}");
    assert_eq!(version["agent"]["version"], version["meshctl"]["version"]);
    let versions = json_off_the_nodes(&["--all-nodes", "version"]);
    let agents: Vec<(&str, &str)> = versions["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .filter_map(|a| Some((a["node"].as_str()?, a["version"].as_str()?)))
        .collect();
    let release = version["meshctl"]["version"].as_str().expect("release");
    assert_eq!(
        agents,
        [("node-a", release), ("node-b", release)],
        "{versions:#}"
    );

    // The node's maps, read by its agent.
    let kernel = json_off_the_nodes(&["--node", "node-b", "bpf", "workloads"]);
    let local: Vec<&str> = kernel["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .filter(|w| w["local"] == true)
        .filter_map(|w| w["pod"].as_str())
        .collect();
    assert!(
        local.contains(&"web-b") && !local.contains(&"web-a"),
        "{kernel:#}"
    );
    let (code, programs, stderr) = meshctl_off_the_nodes(&["--node", "node-b", "bpf", "programs"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(programs.contains("demo/web-b"), "{programs}");
    let kernel_metrics = json_off_the_nodes(&["--node", "node-a", "bpf", "metrics"]);
    assert!(
        kernel_metrics["verdicts"]["passed_pod_opened"].is_u64(),
        "{kernel_metrics:#}"
    );
    assert!(json_off_the_nodes(&["--node", "node-a", "bpf", "flows"]).is_array());

    // The agent's own answers, the same as on the node.
    let dump = json_off_the_nodes(&["--node", "node-a", "config-dump"]);
    assert!(dump.to_string().contains("web-b"), "{dump:#}");
    let certs = json_off_the_nodes(&["--node", "node-a", "certs"]);
    assert!(
        certs["certificates"].to_string().contains("/sa/web"),
        "{certs:#}"
    );
    // Each node's kernel, CNI and programs judged by its agent, and its CA contact; one
    // node, or every node at once.
    let every = json_off_the_nodes(&["--all-nodes", "check"]);
    let nodes: Vec<&str> = every
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert_eq!(nodes, ["node-a", "node-b"], "{every:#}");
    for (index, (node, wiring)) in [("node-a", "2 routed"), ("node-b", "2 on a bridge")]
        .into_iter()
        .enumerate()
    {
        let one = json_off_the_nodes(&["--node", node, "check"]);
        let findings = one.as_array().expect("findings");
        let names = |findings: &[serde_json::Value]| -> Vec<String> {
            findings
                .iter()
                .filter_map(|f| f["check"].as_str().map(str::to_owned))
                .collect()
        };
        assert_eq!(
            names(findings),
            names(every[index]["findings"].as_array().expect("findings"))
        );
        assert!(findings.iter().all(|f| f["ok"] == true), "{findings:#?}");
        let detail = |check: &str| {
            findings
                .iter()
                .find(|f| f["check"] == check)
                .and_then(|f| f["detail"].as_str())
                .unwrap_or_else(|| panic!("no {check} finding: {findings:#?}"))
                .to_owned()
        };
        assert!(detail("cni").contains(wiring), "{findings:#?}");
        assert_eq!(
            detail("programs"),
            "no other TCX program on the pods' interfaces"
        );
        assert!(
            detail("ca").starts_with("10.200.0.254:15012: last certificate signed"),
            "{findings:#?}"
        );
    }
    let check = [
        "policy",
        "check",
        "--from",
        "demo/client-a",
        "--to",
        "demo/web",
        "--port",
        "80",
    ];
    let on_the_node = on_node_answer("node-a", &[&["meshctl"][..], &check].concat());
    let (code, off_node, stderr) =
        meshctl_off_the_nodes(&[&["--node", "node-a"][..], &check].concat());
    assert_eq!((code, off_node), on_the_node, "{stderr}");
    let routes = on_node("node-a", &["meshctl", "routes", "demo/web"]);
    let (code, off_node, stderr) =
        meshctl_off_the_nodes(&["--node", "node-a", "routes", "demo/web"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(off_node, routes);

    // The graph from the metrics of the agents named, read the same way.
    for nodes in [&["--node", "node-a,node-b"][..], &["--all-nodes"]] {
        let graph = json_off_the_nodes(&[nodes, &["graph", "--window", "1s"]].concat());
        assert!(graph["edges"].is_array(), "{graph:#}");
    }
    let (code, _, stderr) = meshctl_off_the_nodes(&["--node", "node-a,node-b", "status"]);
    assert_eq!(code, Some(2), "{stderr}");

    // What cannot be reached says so, with the exit codes scripts tell apart.
    let (code, _, stderr) = meshctl_off_the_nodes(&["--node", "node-c", "status"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("no mesh agent runs on node node-c")
            && stderr.contains("agents run on node-a, node-b"),
        "{stderr}"
    );
    let (code, _, stderr) = meshctl_off_the_nodes(&["--pod", "demo/no-such-pod", "status"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, _, stderr) = meshctl_off_the_nodes(&["--node", "node-a", "uninstall"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("works on the node itself"), "{stderr}");
    // Without --node, meshctl looks on this machine, where no agent is.
    let (code, _, _) = meshctl_off_the_nodes(&["status"]);
    assert_eq!(code, Some(3));
}

const WEB_C: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: web-c
  namespace: demo
  labels: {app: web, track: canary}
spec:
  nodeName: node-b
  containers:
    - name: web
      command: [sh, -c, 'echo $POD_NAME > name && exec python3 -m http.server 8080']
      ports: [{name: http, containerPort: 8080}]
      readinessProbe: {tcpSocket: {port: 8080}}
";

/// A pod as a user writes it for kubectl: no node, an image.
const WEB_D: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: web-d
  namespace: demo
  labels: {app: web}
spec:
  containers:
    - name: web
      image: python:3.13-slim
      command: [sh, -c, 'echo $POD_NAME > name && exec python3 -m http.server 8080']
      ports: [{name: http, containerPort: 8080}]
      readinessProbe: {tcpSocket: {port: 8080}}
";

/// A headless Service and a pod named under it, as a StatefulSet's pod is.
const DB_0: &str = "\
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: tcp, port: 5432}]
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: demo
  labels: {app: db}
spec:
  hostname: db-0
  subdomain: db
  containers:
    - name: db
      image: python:3.13-slim
      command: [sleep, infinity]
";

fn web_service(selector: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\n\
         spec:\n  clusterIP: 10.96.0.100\n  selector: {selector}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n"
    )
}

fn web_rule(load_balancer: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: demo}}\n\
         spec:\n  host: web.demo.svc.cluster.local\n  trafficPolicy:\n    loadBalancer: {load_balancer}\n"
    )
}

#[test]
fn service_discovery_and_load_balancing_follow_configuration_changes() {
    let _sandbox = Sandbox::up();
    let url = "http://10.96.0.100/name";

    // A third endpoint joins; round robin gives each a third of 300 connections.
    kubectl("apply", "web-c", WEB_C);
    eventually("web-c joins the Service", || {
        try_backends(url, 6).is_ok_and(|b| b.contains_key("web-c"))
    });
    let spread = backends(url, 300);
    assert_eq!(
        spread.keys().collect::<Vec<_>>(),
        ["web-a", "web-b", "web-c"]
    );
    for (pod, count) in &spread {
        assert!(
            (95..=105).contains(count),
            "round robin gave {pod} {count} of 300: {spread:?}"
        );
    }

    // A long download runs through every change below, undisturbed.
    let web_b = pod_ip(&status_json(), "web-b");
    let web_b_blob = sha256_of_file("/run/mesh-sandbox/pods/demo-web-b/blob");
    let download = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["sandbox", "exec", "client-a", "--", "sh", "-c"])
        .arg(format!(
            "curl -sf --limit-rate 800k http://{web_b}:8080/blob | sha256sum"
        ))
        .current_dir(workspace())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("slow download");

    // consistentHash.useSourceIp: one client, one endpoint.
    kubectl(
        "apply",
        "rule",
        &web_rule("{consistentHash: {useSourceIp: true}}"),
    );
    eventually("source-IP hashing pins the client", || {
        backends(url, 30).len() == 1
    });
    // RANDOM: everyone gets a share.
    kubectl("apply", "rule", &web_rule("{simple: RANDOM}"));
    eventually("RANDOM spreads connections", || {
        let spread = backends(url, 150);
        spread.len() == 3 && spread.values().all(|n| *n >= 25)
    });
    kubectl("delete", "rule", &web_rule("{simple: RANDOM}"));
    // Round robin over three endpoints: 30 new connections, 10 each, wherever the
    // rotation starts.
    eventually("round robin again", || {
        backends(url, 30) == counts(&[("web-a", 10), ("web-b", 10), ("web-c", 10)])
    });

    // A selector change moves the Service to the canary only, and back.
    kubectl(
        "apply",
        "service",
        &web_service("{app: web, track: canary}"),
    );
    eventually("only the canary serves", || {
        backends(url, 20).keys().collect::<Vec<_>>() == ["web-c"]
    });
    kubectl("apply", "service", &web_service("{app: web}"));
    eventually("all three serve again", || backends(url, 30).len() == 3);

    // A pod that goes away leaves the rotation (requests may fail while it is going);
    // then the two left share it evenly and every request succeeds.
    kubectl("delete", "web-c", WEB_C);
    eventually("the deleted pod leaves the rotation", || {
        try_backends(url, 6).is_ok_and(|b| !b.contains_key("web-c"))
    });
    assert_eq!(
        backends(url, 40),
        counts(&[("web-a", 20), ("web-b", 20)]),
        "round robin over the two endpoints left"
    );

    let digest = ok(
        download.wait_with_output().expect("download"),
        "slow download",
    );
    assert_eq!(
        digest.split_whitespace().next(),
        Some(web_b_blob.as_str()),
        "the long download was disturbed"
    );

    // A ServiceEntry address is captured and reaches its endpoint.
    let status = status_json();
    let web_a = pod_ip(&status, "web-a");
    kubectl(
        "apply",
        "entry",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: legacy, namespace: demo}}\n\
             spec:\n  hosts: [legacy.example.internal]\n  addresses: [10.97.0.10]\n  ports: [{{number: 80, name: http}}]\n  \
             location: MESH_INTERNAL\n  resolution: STATIC\n  endpoints: [{{address: {web_a}, ports: {{http: 8080}}}}]\n"
        ),
    );
    eventually("the ServiceEntry address answers", || {
        try_backends("http://10.97.0.10/name", 3).is_ok_and(|b| b == counts(&[("web-a", 3)]))
    });
}

/// Where the cgroup v2 hierarchy is mounted, from /proc/mounts.
fn cgroup2_mount() -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
    mounts
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols[2] == "cgroup2").then(|| cols[1].to_owned())
        })
        .expect("cgroup2")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn traffic_between_nodes_is_mutual_tls_1_3_and_bad_peers_are_refused() {
    let _sandbox = Sandbox::up();
    let status = status_json();
    let web_b = pod_ip(&status, "web-b");
    let node_b = status["nodes"][1]["ip"]
        .as_str()
        .expect("node-b address")
        .to_owned();

    // Capture everything on the link between the nodes while pods talk across it.
    let pcap = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sandbox-between-nodes.pcap");
    let capture = Command::new("ip")
        .args([
            "netns",
            "exec",
            "msb-fabric",
            "tcpdump",
            "-i",
            "br0",
            "-U",
            "-B",
            "32768",
            "-s",
            "0",
            "-w",
        ])
        .arg(&pcap)
        .arg("tcp")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (installed by cargo xtask setup)");
    // Sentinels in the clear from node-a to node-b's readiness port (node traffic, not
    // the mesh's): tcpdump writes each packet as it sees it (-U), so once a sentinel is in
    // the file, everything on the link before it is too.
    let captured_sentinel = |sentinel: &str| {
        on_node(
            "node-a",
            &[
                "sh",
                "-c",
                &format!("curl -s -m 2 -o /dev/null http://{node_b}:15021/{sentinel} || true"),
            ],
        );
        std::fs::read(&pcap).is_ok_and(|bytes| contains(&bytes, sentinel.as_bytes()))
    };
    eventually("tcpdump captures the link", || {
        captured_sentinel("MESH-CAPTURE-START")
    });
    let marker = "MESH-PLAINTEXT-MARKER-7f3a9c";
    // The marker in the query string, which web-b's server ignores: it answers /name.
    assert_eq!(
        http(
            "client-a",
            &format!("-o /dev/null 'http://{web_b}:8080/name?{marker}'")
        ),
        "200 1",
        "the marker request went through (http.server answers HTTP/1.0)"
    );
    let blob = sha256_of_file("/run/mesh-sandbox/pods/demo-web-b/blob");
    assert_eq!(
        download_digest("client-a", &format!("http://{web_b}:8080/blob")),
        blob
    );
    eventually("tcpdump wrote the transfer out", || {
        captured_sentinel("MESH-CAPTURE-END")
    });
    // tcpdump (this test's own child, through `ip netns exec`, which execs it) writes out
    // what it holds on SIGINT.
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(capture.id() as i32, libc::SIGINT) };
    let report = capture.wait_with_output().expect("tcpdump");
    let report = String::from_utf8_lossy(&report.stderr);
    assert!(
        report
            .lines()
            .any(|l| l.trim() == "0 packets dropped by kernel"),
        "tcpdump dropped packets: {report}"
    );
    let captured = std::fs::read(&pcap).expect("capture");
    // Most of the 4 MiB must be there (frames merged beyond tcpdump's snapshot length of
    // 256 KiB lose their tail).
    assert!(
        captured.len() > 3 << 20,
        "the capture missed the transfer: {} bytes",
        captured.len()
    );
    assert!(
        !contains(&captured, marker.as_bytes()),
        "the request crossed the node link in the clear"
    );
    let payload = std::fs::read("/run/mesh-sandbox/pods/demo-web-b/blob").expect("blob");
    for offset in (0..payload.len() - 64).step_by(payload.len() / 97) {
        assert!(
            !contains(&captured, &payload[offset..offset + 32]),
            "response bytes at {offset} crossed in the clear"
        );
    }
    // The ServerHello's supported_versions extension selects TLS 1.3 (0x0304).
    assert!(
        contains(&captured, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]),
        "no TLS 1.3 ServerHello on the link"
    );

    // Without a client certificate the tunnel port refuses; its certificate names the
    // destination's SPIFFE ID.
    let s_client = ok(
        xtask(&["sandbox", "exec", "--node", "node-a", "--", "sh", "-c", &format!(
            "echo | openssl s_client -connect {node_b}:15008 -servername web.demo.sa.mesh -tls1_3 2>&1 | \
             tee /dev/stderr | openssl x509 -noout -ext subjectAltName"
        )]),
        "openssl s_client",
    );
    assert!(
        s_client.contains("URI:spiffe://cluster.local/ns/demo/sa/web"),
        "{s_client}"
    );
    let refused = |reason: &str| {
        sample(
            &metrics("node-b"),
            "mesh_tunnel_refusals_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    eventually_eq("node-b counts the one refused handshake", 1.0, || {
        refused("no_certificate")
    });

    // Metrics name both principals and the mTLS policy.
    let server_side = [
        ("reporter", "destination"),
        ("source_workload", "client-a"),
        ("destination_workload", "web-b"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/demo/sa/client",
        ),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/demo/sa/web",
        ),
        ("connection_security_policy", "mutual_tls"),
    ];
    // Two connections from client-a to web-b: the marker request and the download.
    eventually_eq("mTLS labels on node-b", Some(2.0), || {
        sample(
            &metrics("node-b"),
            "istio_tcp_connections_closed_total",
            &server_side,
        )
    });

    // meshctl certs lists the identities of each node.
    let certs = on_node("node-b", &["meshctl", "certs"]);
    assert!(
        certs.contains("spiffe://cluster.local/ns/demo/sa/web") && certs.contains("mesh root CA"),
        "{certs}"
    );
}

/// The certificate node-b's agent holds (and serves) for web-b's identity: its serial
/// and expiry (Unix seconds), from `meshctl certs`.
fn web_certificate() -> (String, i64) {
    let certs: serde_json::Value =
        serde_json::from_str(&on_node("node-b", &["meshctl", "certs", "-o", "json"]))
            .expect("JSON");
    let web = certs["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/demo/sa/web")
        .unwrap_or_else(|| panic!("no certificate for web on node-b: {certs}"));
    (
        web["serial"].as_str().expect("serial").to_owned(),
        web["not_after"].as_i64().expect("not_after"),
    )
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

#[test]
fn a_ca_outage_keeps_the_current_certificates_until_the_ca_is_back() {
    // 30 s certificates, renewed at half-life: with the CA down, renewals fail from 15 s
    // on, retried after 1, 2, 4, 8 s, while the certificate in hand still serves.
    let _sandbox = Sandbox::up_with(&[("MESH_SANDBOX_CERT_TTL", "30s")]);
    let web_b = pod_ip(&status_json(), "web-b");
    let across = || {
        assert_eq!(
            http(
                "client-a",
                &format!("-o /dev/null http://{web_b}:8080/name")
            ),
            "200 1",
            "a request across nodes"
        )
    };
    eventually("web-b answers across nodes", || {
        http(
            "client-a",
            &format!("-o /dev/null http://{web_b}:8080/name"),
        ) == "200 1"
    });

    let requests = |result: &str| {
        sample(
            &metrics("node-b"),
            "mesh_certificate_requests_total",
            &[("result", result)],
        )
        .unwrap_or(0.0)
    };
    let failed_before = requests("failed");
    ok(xtask(&["sandbox", "stop-ca"]), "stopping the CA");
    let (serial, not_after) = web_certificate();
    // Traffic goes on past half-life, when node-b's agent tries to renew and fails.
    eventually("node-b's agent counts a failed renewal", || {
        across();
        requests("failed") > failed_before
    });
    assert!(unix_now() < not_after, "the test outlived the certificate");
    assert_eq!(
        web_certificate(),
        (serial.clone(), not_after),
        "the certificate in hand stays while the CA is down"
    );
    across();

    // Back, the CA renews the certificate at the next retry; traffic goes on throughout.
    ok(xtask(&["sandbox", "start-ca"]), "starting the CA again");
    let issued_before = requests("issued");
    eventually("node-b's agent renews web's certificate", || {
        across();
        web_certificate().0 != serial
    });
    assert!(requests("issued") > issued_before, "the renewal is counted");
    across();
}

#[test]
fn certificates_rotate_every_few_seconds_without_a_failed_request() {
    let _sandbox = Sandbox::up_with(&[("MESH_SANDBOX_CERT_TTL", "4s")]);
    let serial = |node: &str| -> String {
        let certs: serde_json::Value =
            serde_json::from_str(&on_node(node, &["meshctl", "certs", "-o", "json"]))
                .expect("JSON");
        certs["certificates"][0]["serial"]
            .as_str()
            .expect("serial")
            .to_owned()
    };
    // New connections across nodes (backends fails on any failed request) until node-b
    // has rotated twice and node-a once (certificates live 4 s and are renewed every 2 s),
    // then once more on the newest certificates.
    let mut seen_b = std::collections::BTreeSet::from([serial("node-b")]);
    let first_a = serial("node-a");
    let mut total = 0;
    eventually("the certificates rotate under traffic", || {
        let spread = backends("http://10.96.0.100/name", 20);
        total += spread.values().sum::<usize>();
        seen_b.insert(serial("node-b"));
        seen_b.len() >= 3 && serial("node-a") != first_a
    });
    assert_eq!(
        backends("http://10.96.0.100/name", 100)
            .values()
            .sum::<usize>(),
        100
    );
    eprintln!("{total} requests through the rotations");
}

/// The node's kernel drop counters by verdict (`meshctl bpf metrics`).
fn kernel_drops(node: &str) -> std::collections::BTreeMap<String, u64> {
    let report: serde_json::Value =
        serde_json::from_str(&on_node(node, &["meshctl", "bpf", "metrics", "-o", "json"]))
            .expect("JSON");
    report["verdicts"]
        .as_object()
        .expect("verdicts")
        .iter()
        .filter(|(verdict, _)| verdict.starts_with("drop_"))
        .map(|(verdict, n)| (verdict.clone(), n.as_u64().expect("counter")))
        .collect()
}

/// Between two readings of `kernel_drops`, `verdict` grew (SYNs are retransmitted, so
/// by how much is not known) and no other drop counter moved, but `drop_ipv6`: the pods'
/// own IPv6 stacks send link-local packets (router solicitations, MLD) at their pace.
fn only_drops_of(
    verdict: &str,
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) {
    assert!(
        after[verdict] > before[verdict],
        "no {verdict} counted: {before:?} then {after:?}"
    );
    let others = |m: &std::collections::BTreeMap<String, u64>| {
        let mut m = m.clone();
        m.remove(verdict);
        m.remove("drop_ipv6");
        m
    };
    assert_eq!(others(after), others(before), "other drops moved");
}

fn peer_authentication(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n{spec}"
    )
}

#[test]
fn peer_authentication_strict_drops_plaintext_in_the_kernel() {
    let _sandbox = Sandbox::up();
    let status = status_json();
    let web_b = pod_ip(&status, "web-b");
    // A pod outside the mesh next to web-b: its plaintext is what STRICT refuses. (The
    // node itself still reaches web-b's probe port, 8080, as its kubelet must.) It serves
    // HTTP on 8000, for web-b's own connections.
    kubectl(
        "apply",
        "outsider",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: outsider, namespace: demo, labels: {istio.io/dataplane-mode: none}}\n\
         spec: {nodeName: node-b, containers: [{name: c, command: [python3, -m, http.server, \"8000\"]}]}\n",
    );
    let plaintext = || {
        xtask(&[
            "sandbox",
            "exec",
            "outsider",
            "--",
            "curl",
            "-sf",
            "-m",
            "2",
            &format!("http://{web_b}:8080/name"),
        ])
        .status
        .success()
    };
    assert!(plaintext(), "PERMISSIVE (the default) accepts plaintext");
    let drops_before = kernel_drops("node-b");

    // Namespace-wide STRICT: plaintext from outside the mesh is dropped by tc, counted;
    // mesh traffic, same node and across nodes, goes on.
    kubectl(
        "apply",
        "pa-ns",
        &peer_authentication("default", "  mtls: {mode: STRICT}\n"),
    );
    eventually("plaintext is refused under STRICT", || !plaintext());
    only_drops_of(
        "drop_plaintext_strict",
        &drops_before,
        &kernel_drops("node-b"),
    );
    assert_eq!(
        in_pod(
            "client-a",
            &format!("curl -sf -m 5 http://{web_b}:8080/name")
        )
        .trim(),
        "web-b"
    );
    // Same node under STRICT: web-b's connection to echo-b needs nothing of the agent, so
    // the kernel carries it pod to pod, and lets it into echo-b because it entered the
    // node on web-b's own veth.
    let echo_b = format!("{}:9000", pod_ip(&status, "echo-b"));
    let (direct_new, passed_strict) = (
        tc_packets("node-b", "direct_new"),
        tc_packets("node-b", "passed_direct_strict"),
    );
    assert_eq!(echo_round_trip_from("web-b", &echo_b, 70_000), "intact");
    assert_eq!(tc_packets("node-b", "direct_new"), direct_new + 1);
    assert!(tc_packets("node-b", "passed_direct_strict") > passed_strict);
    let through_service = in_pod("client-a", "curl -sf -m 5 http://10.96.0.100/name");
    assert!(
        ["web-a", "web-b"].contains(&through_service.trim()),
        "the web Service answered {through_service:?}"
    );
    // STRICT is about connections into the pod: web-b's own connection to the outsider
    // is answered (`passed_pod_opened`), and opens nothing into web-b.
    let outsider = pod_ip(&status_json(), "outsider");
    assert_eq!(
        in_pod(
            "web-b",
            &format!("curl -s -o /dev/null -w '%{{http_code}}' -m 5 http://{outsider}:8000/")
        ),
        "200"
    );
    assert!(!plaintext(), "web-b is still closed to the outsider");

    // A workload policy's portLevelMtls opens one port again.
    kubectl(
        "apply",
        "pa-web",
        &peer_authentication(
            "web",
            "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n",
        ),
    );
    eventually("port 8080 is PERMISSIVE again", plaintext);

    // DISABLE: no mutual TLS to the workload; the source agent reaches it in plaintext.
    kubectl(
        "apply",
        "pa-echo",
        &peer_authentication(
            "echo",
            "  selector: {matchLabels: {app: echo}}\n  mtls: {mode: DISABLE}\n",
        ),
    );
    // Until DISABLE reaches node-a's agent, the echo goes over HBONE as before; each
    // connection is waited for (closed, on node-a's metrics) before the next, so the
    // counts below are exact: this test sent client-a to echo-b nothing else.
    let echo_vip = service_address("demo/echo");
    let echo = || {
        xtask(&[
            "sandbox",
            "exec",
            "client-a",
            "--",
            "python3",
            "-c",
            include_str!("echo_check.py"),
            &echo_vip,
            "9000",
        ])
        .stdout
        .starts_with(b"ok 2097152")
    };
    let echo_closed = |policy: Option<&str>| {
        let mut labels = vec![
            ("reporter", "source"),
            ("source_workload", "client-a"),
            ("destination_workload", "echo-b"),
        ];
        labels.extend(policy.map(|p| ("connection_security_policy", p)));
        total(
            &metrics("node-a"),
            "istio_tcp_connections_closed_total",
            &labels,
        )
    };
    let direct = || {
        sample(
            &metrics("node-a"),
            "mesh_connections_carried_total",
            &[("how", "direct")],
        )
        .unwrap_or(0.0)
    };
    let direct_before = direct();
    assert_eq!(echo_closed(None), 0.0);
    eventually("echo is reached without mTLS", || {
        let closed = echo_closed(None);
        let answered = echo();
        eventually("node-a reports the echo connection closed", || {
            echo_closed(None) == closed + 1.0
        });
        answered && echo_closed(Some("none")) == 1.0
    });
    assert_eq!(
        direct(),
        direct_before + 1.0,
        "carried straight from node-a"
    );
    // And the next one, exactly once more.
    let mutual_tls = echo_closed(Some("mutual_tls"));
    assert!(echo(), "echo answers without mTLS");
    eventually("node-a reports the second plaintext echo", || {
        echo_closed(Some("none")) == 2.0
    });
    assert_eq!(direct(), direct_before + 2.0);
    assert_eq!(echo_closed(Some("mutual_tls")), mutual_tls);
}

/// A pod on node-a serving HTTP on 8080 (its name at `/name`) and 8081, with a readiness
/// probe as a kubelet runs it (from the node), in `namespace` with `labels`.
fn probed_pod(name: &str, namespace: &str, labels: &str, probe: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\n\
         spec:\n  nodeName: node-a\n  containers:\n  - name: web\n    \
         command: [sh, -c, 'echo $POD_NAME > name && python3 -m http.server 8081 & exec python3 -m http.server 8080']\n    \
         ports: [{{name: http, containerPort: 8080}}]\n{probe}"
    )
}

fn enrolled_pods(node: &str) -> Vec<String> {
    agent_status(node)["enrolled"]
        .as_object()
        .expect("enrolled")
        .keys()
        .cloned()
        .collect()
}

#[test]
fn pods_join_by_istio_ambient_labels_and_strict_pods_pass_only_the_kubelets_probes() {
    let _sandbox = Sandbox::up();
    let web_a = pod_ip(&status_json(), "web-a");

    // A namespace without the label stays out: its pod gets no programs and no identity,
    // and its traffic does not touch the mesh.
    kubectl(
        "apply",
        "legacy",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: legacy}}\n---\n{}",
            probed_pod(
                "old",
                "legacy",
                "app: old",
                "    readinessProbe: {tcpSocket: {port: 8080}}\n"
            )
        ),
    );
    let old = pod_ip(&status_json(), "old");
    assert!(!enrolled_pods("node-a").contains(&"legacy/old".to_owned()));
    let workloads = on_node("node-a", &["meshctl", "bpf", "workloads"]);
    assert!(!workloads.contains(&old), "{workloads}");
    assert_eq!(
        in_pod("client-a", &format!("curl -sf -m 5 http://{old}:8080/name")).trim(),
        "old"
    );
    assert_eq!(
        in_pod("old", &format!("curl -sf -m 5 http://{web_a}:8080/name")).trim(),
        "web-a"
    );
    // A Service of pods outside the mesh is reached through it from a meshed pod: the
    // agent takes the connection to the Service address and goes to the pod directly.
    kubectl(
        "apply",
        "legacy-service",
        "apiVersion: v1\nkind: Service\nmetadata: {name: old, namespace: legacy}\n\
         spec: {selector: {app: old}, ports: [{name: http, port: 80, targetPort: 8080}]}\n",
    );
    let old_vip = service_address("legacy/old");
    eventually("the Service of the pod outside the mesh answers", || {
        xtask(&[
            "sandbox",
            "exec",
            "client-a",
            "--",
            "curl",
            "-sf",
            "-m",
            "5",
            &format!("http://{old_vip}/name"),
        ])
        .stdout
            == b"old\n"
    });

    // A pod the kubelet reports not Ready gets none of its Service's traffic.
    kubectl(
        "apply",
        "unready",
        &format!(
            "{}status: {{conditions: [{{type: Ready, status: 'False'}}]}}\n",
            probed_pod("unready", "demo", "app: web", "")
        ),
    );
    eventually("the agent knows the pod that is not ready", || {
        enrolled_pods("node-a").contains(&"demo/unready".to_owned())
    });
    let answers: std::collections::BTreeSet<String> = (0..8)
        .map(|_| {
            in_pod("client-a", "curl -sf -m 5 http://10.96.0.100/name")
                .trim()
                .to_owned()
        })
        .collect();
    assert_eq!(
        answers,
        ["web-a", "web-b"].map(String::from).into_iter().collect(),
        "only ready endpoints answer"
    );

    // Labelling the namespace `ambient` enrolls the running pod.
    kubectl(
        "apply",
        "legacy-ambient",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    eventually("the pod of the labelled namespace is enrolled", || {
        enrolled_pods("node-a").contains(&"legacy/old".to_owned())
    });
    let programs = on_node("node-a", &["meshctl", "bpf", "programs"]);
    assert!(programs.contains("legacy/old tc-from"), "{programs}");

    // Under namespace-wide STRICT a pod created now becomes ready: its kubelet probe
    // (HTTP, from the node) passes the kernel. Nothing else from the node does.
    kubectl(
        "apply",
        "pa-strict",
        &peer_authentication("default", "  mtls: {mode: STRICT}\n"),
    );
    wait_strict_in_kernel("node-a", "web-a");
    let maps: serde_json::Value = serde_json::from_str(&on_node(
        "node-a",
        &["meshctl", "bpf", "workloads", "-o", "json"],
    ))
    .expect("JSON");
    let web_a_row = maps["workloads"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|w| w["pod"] == "web-a")
        .cloned()
        .expect("web-a in the kernel");
    assert_eq!(web_a_row["probe_ports"], serde_json::json!([8080]));
    // web-a's probe port answers the node under STRICT.
    assert_eq!(
        on_node(
            "node-a",
            &[
                "curl",
                "-sf",
                "-m",
                "5",
                &format!("http://{web_a}:8080/name")
            ]
        )
        .trim(),
        "web-a"
    );
    kubectl(
        "apply",
        "probed",
        &probed_pod(
            "probed",
            "demo",
            "app: probed",
            "    readinessProbe: {httpGet: {path: /name, port: http}}\n",
        ),
    );
    let probed = pod_ip(&status_json(), "probed");
    let node_curl = |port: u16| {
        xtask(&[
            "sandbox",
            "exec",
            "--node",
            "node-a",
            "--",
            "curl",
            "-sf",
            "-m",
            "2",
            &format!("http://{probed}:{port}/name"),
        ])
    };
    let passed = tc_packets("node-a", "passed_node_probe");
    assert!(passed > 0, "the probes that made the pod ready were let in");
    assert_eq!(
        ok(node_curl(8080), "the node's request to the probe port").trim(),
        "probed"
    );
    assert!(tc_packets("node-a", "passed_node_probe") > passed);
    let dropped = tc_packets("node-a", "drop_plaintext_strict");
    assert!(
        !node_curl(8081).status.success(),
        "a port no probe declares stays closed"
    );
    assert!(tc_packets("node-a", "drop_plaintext_strict") > dropped);
    // Through the mesh, both ports answer.
    for port in [8080, 8081] {
        assert_eq!(
            in_pod(
                "client-a",
                &format!("curl -sf -m 5 http://{probed}:{port}/name")
            )
            .trim(),
            "probed"
        );
    }
}

#[test]
fn meshctl_uninstall_leaves_the_node_as_it_was_once_the_agent_is_stopped() {
    let _sandbox = Sandbox::up();
    let status = status_json();
    let web_a = pod_ip(&status, "web-a");
    let agent_pid = current_agent("node-a");
    let direct = || {
        xtask(&[
            "sandbox",
            "exec",
            "client-a",
            "--",
            "curl",
            "-sf",
            "-m",
            "2",
            &format!("http://{web_a}:8080/name"),
        ])
        .status
        .success()
    };
    assert!(direct());

    // Refused while the agent runs: it would attach everything again.
    let refused = xtask(&[
        "sandbox",
        "exec",
        "--node",
        "node-a",
        "--",
        "meshctl",
        "uninstall",
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // With the agent gone and its programs still attached, meshed traffic fails closed.
    ok(
        xtask(&["sandbox", "stop-agent", "node-a"]),
        "stopping node-a's agent",
    );
    assert!(
        !Path::new(&format!("/proc/{agent_pid}")).exists(),
        "the agent exited with its supervisor"
    );
    assert!(
        !direct(),
        "no agent, no bypass: the capture has no listener"
    );

    // The maps pinned on node-a: the layout's fourteen (mesh-ebpf's `pinned` maps; the
    // splice maps are the agent's own and go with it).
    let bpffs = Path::new("/sys/fs/bpf/mesh-sandbox/node-a");
    let pinned_maps: std::collections::BTreeSet<String> = std::fs::read_dir(bpffs)
        .expect("node-a's bpffs")
        .flatten()
        .filter(|dir| dir.file_name().to_string_lossy().starts_with("maps-v"))
        .flat_map(|dir| std::fs::read_dir(dir.path()).expect("maps").flatten())
        .map(|map| map.path().display().to_string())
        .collect();
    assert_eq!(pinned_maps.len(), 14, "{pinned_maps:?}");
    let removed: serde_json::Value =
        serde_json::from_str(&on_node("node-a", &["meshctl", "uninstall", "-o", "json"]))
            .expect("JSON");
    // Two local pods, three links each (tc both ways, sockops); every map of the layout.
    assert_eq!(
        removed["links"].as_array().expect("links").len(),
        6,
        "{removed}"
    );
    let removed_maps: std::collections::BTreeSet<String> = removed["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .map(|m| m.as_str().expect("path").to_owned())
        .collect();
    assert_eq!(removed_maps, pinned_maps, "{removed}");
    assert_eq!(removed["rules"], 1, "{removed}");
    assert_eq!(removed["routes_flushed"], true, "{removed}");
    assert_eq!(removed["left"], serde_json::json!([]), "{removed}");

    // Nothing of the mesh is left on the node, and the pods talk directly.
    let rules = on_node("node-a", &["ip", "-4", "rule", "show"]);
    assert!(!rules.contains("lookup 133"), "{rules}");
    let routes = on_node("node-a", &["ip", "-4", "route", "show", "table", "133"]);
    assert!(routes.trim().is_empty(), "{routes}");
    // (With tc_from_pod still on client-a's veth, the SYN would go to the missing listener.)
    assert!(direct(), "pods reach each other without the mesh");
    let again: serde_json::Value =
        serde_json::from_str(&on_node("node-a", &["meshctl", "uninstall", "-o", "json"]))
            .expect("JSON");
    assert_eq!(
        again["links"],
        serde_json::json!([]),
        "a second run finds nothing"
    );
}

/// The Service `api` (HTTP/1.1 and HTTP/2 on one port) on node-b and the policies of the
/// authorization test, whose keys the agents fetch from the Service `keys` by its name.
fn api_and_policies() -> String {
    "apiVersion: v1
kind: ServiceAccount
metadata: {name: api, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: api-b, namespace: demo, labels: {app: api}}
spec:
  nodeName: node-b
  serviceAccountName: api
  containers:
    - name: api
      command: [mesh-bench, serve, --listen, 0.0.0.0:8080]
      ports: [{name: http, containerPort: 8080}]
      readinessProbe: {tcpSocket: {port: 8080}}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: demo}
spec:
  clusterIP: 10.96.0.150
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: api-jwt, namespace: demo}
spec:
  selector: {matchLabels: {app: api}}
  jwtRules:
    - issuer: testing@secure.istio.io
      jwksUri: http://keys.demo.svc.cluster.local/jwks.json
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-allow, namespace: demo}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
    - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
      to: [{operation: {methods: [GET], paths: [\"/public/*\"]}}]
    - from: [{source: {requestPrincipals: [testing@secure.istio.io/testing@secure.istio.io]}}]
      to: [{operation: {paths: [\"/private/*\"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-deny-admin, namespace: demo}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules: [{to: [{operation: {paths: [\"/admin/*\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-audit, namespace: demo}
spec:
  selector: {matchLabels: {app: api}}
  action: AUDIT
  rules: [{to: [{operation: {paths: [\"/public/*\"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-deny-client, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-only-web, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/web]}}]}]
"
    .to_owned()
}

/// A JWKS server outside the mesh on node-a, behind the Service `keys` (10.96.50.31:80).
fn jwks_server() -> String {
    let dir = workspace().join("mesh-agent/tests/testdata/jwt");
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: jwks-a, namespace: demo, labels: {{app: jwks, istio.io/dataplane-mode: none}}}}
spec:
  nodeName: node-a
  containers:
    - name: jwks
      command: [sh, -c, \"cd {} && exec python3 -m http.server 8000\"]
      readinessProbe: {{tcpSocket: {{port: 8000}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: keys, namespace: demo}}
spec:
  clusterIP: 10.96.50.31
  selector: {{app: jwks}}
  ports: [{{name: http, port: 80, targetPort: 8000}}]
",
        dir.display()
    )
}

/// `status body` of one curl request from `pod`.
/// What curl in `pod` reports: the body (unless redirected), the status and the HTTP
/// version; `000 0` when no response came (refused, reset or timed out), so a test can
/// wait for a Service that is still starting.
fn http(pod: &str, args: &str) -> String {
    let script = format!("curl -s -m 5 -w ' %{{http_code}} %{{http_version}}' {args}");
    let output = xtask(&["sandbox", "exec", pod, "--", "sh", "-c", &script]);
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// What a client sees sending "ping" over TCP: the echo, or the error.
fn tcp_echo(pod: &str, address: &str) -> String {
    let (host, port) = address.split_once(':').expect("host:port");
    in_pod(
        pod,
        &format!(
            "python3 -c \"
import socket
try:
    s = socket.create_connection(('{host}', {port}), timeout=3)
    s.sendall(b'ping')
    print(s.recv(16).decode() or 'closed')
except OSError as e:
    print(type(e).__name__)
\""
        ),
    )
    .trim()
    .to_owned()
}

#[test]
fn authorization_policies_and_jwt_are_enforced_across_nodes() {
    // Keys are fetched again every second: the server going away below makes the
    // agents' refreshes fail, and the keys in hand must stay.
    let _sandbox = Sandbox::up_with(&[("MESH_JWKS_REFRESH_INTERVAL", "1s")]);
    kubectl("apply", "jwks", &jwks_server());
    kubectl("apply", "authz", &api_and_policies());
    let token_file = workspace().join("mesh-agent/tests/testdata/jwt/demo.jwt");
    let token = std::fs::read_to_string(&token_file).expect("demo token");
    let token = token.trim();
    let api = "http://10.96.0.150";

    // ALLOW by principal, method and path, over HTTP/1.1 and HTTP/2, across nodes; the
    // response is the server's own 1 KiB body.
    eventually("the api Service answers", || {
        http("client-a", &format!("-o /dev/null {api}/public/a")) == "200 1.1"
    });
    eventually("the JWKS is fetched", || {
        http(
            "web-a",
            &format!("-o /dev/null -H 'Authorization: Bearer {token}' {api}/private/x"),
        ) == "200 1.1"
    });
    // Every request from here on is counted exactly below.
    let before = metrics("node-b");
    assert_eq!(
        http(
            "client-a",
            &format!("--http2-prior-knowledge -o /dev/null {api}/public/a")
        ),
        "200 2"
    );
    let body = in_pod("client-a", &format!("curl -sf -m 5 {api}/public/a | wc -c"));
    assert_eq!(body.trim(), "1024");

    // A request no ALLOW rule matches: 403 with Envoy's body, and the connection carries
    // the next request (one connect for both).
    let both = in_pod(
        "client-a",
        &format!("curl -s -m 5 -X POST -w ' %{{http_code}} %{{num_connects}}\\n' {api}/public/a --next -s -o /dev/null -w '%{{http_code}} %{{num_connects}}\\n' {api}/public/b"),
    );
    assert_eq!(
        both.lines().collect::<Vec<_>>(),
        ["RBAC: access denied 403 1", "200 0"],
        "{both}"
    );
    assert_eq!(
        http(
            "client-a",
            &format!("--http2-prior-knowledge -X DELETE {api}/public/a")
        ),
        "RBAC: access denied 403 2"
    );

    // DENY wins, and ambiguous spellings of the path cannot slip past it.
    for path in [
        "/admin/x",
        "/public/../admin/x",
        "/admin%2Fx",
        "//admin//x",
        "/%61dmin/x",
    ] {
        assert_eq!(
            http(
                "client-a",
                &format!("--path-as-is -o /dev/null '{api}{path}'")
            ),
            "403 1.1",
            "{path}"
        );
    }
    // Another identity matches no ALLOW rule.
    assert_eq!(
        http("web-a", &format!("-o /dev/null {api}/public/a")),
        "403 1.1"
    );

    // JWT: required on /private (no token → 403), a valid token → 200, a tampered one →
    // 401, wherever it is carried.
    assert_eq!(
        http("client-a", &format!("-o /dev/null {api}/private/x")),
        "403 1.1"
    );
    assert_eq!(
        http(
            "client-a",
            &format!("--http2-prior-knowledge -o /dev/null '{api}/private/x?access_token={token}'")
        ),
        "200 2"
    );
    // One signature character changed (not the last, whose low bits base64 ignores).
    let at = token.len() - 10;
    let flipped = if &token[at..=at] == "A" { "B" } else { "A" };
    let tampered = format!("{}{flipped}{}", &token[..at], &token[at + 1..]);
    assert_eq!(
        http(
            "client-a",
            &format!("-o /dev/null -H 'Authorization: Bearer {tampered}' {api}/public/a")
        ),
        "401 1.1"
    );
    assert_eq!(
        http(
            "client-a",
            &format!("--http2-prior-knowledge -o /dev/null -H 'Authorization: Bearer {tampered}' {api}/public/a")
        ),
        "401 2"
    );

    // Every agent fetches the keys (meshctl on node-a answers from node-a's agent); then
    // the JWKS server goes away: the fetched keys are kept.
    let jwt_check = || {
        on_node_answer(
            "node-a",
            &[
                "meshctl",
                "policy",
                "check",
                "--from",
                "demo/web-a",
                "--to",
                "demo/api",
                "--port",
                "80",
                "--path",
                "/private/x",
                "--jwt",
                token_file.to_str().expect("path"),
            ],
        )
    };
    eventually("node-a's agent has the keys", || {
        jwt_check().1.starts_with("ALLOW")
    });
    let jwks_uri = "http://keys.demo.svc.cluster.local/jwks.json";
    let jwks = |node: &str| -> serde_json::Value {
        let all: serde_json::Value = serde_json::from_str(&on_node(
            node,
            &["curl", "-sf", "http://127.0.0.1:15000/jwks"],
        ))
        .expect("JSON");
        all.as_array()
            .expect("URIs")
            .iter()
            .find(|u| u["uri"] == jwks_uri)
            .unwrap_or_else(|| panic!("{node}'s agent has no {jwks_uri}: {all}"))
            .clone()
    };
    kubectl("delete", "jwks", &jwks_server());
    // Both agents try to refresh and fail, and keep the one key they fetched.
    for node in ["node-a", "node-b"] {
        eventually(&format!("{node}'s JWKS refresh fails"), || {
            jwks(node)["failed_fetches"].as_u64() >= Some(1)
        });
        let status = jwks(node);
        assert_eq!(status["keys"], 1, "{node}: {status}");
        assert!(status["last_error"].is_string(), "{node}: {status}");
    }
    assert_eq!(
        http(
            "web-a",
            &format!("-o /dev/null -H 'Authorization: Bearer {token}' {api}/private/x")
        ),
        "200 1.1"
    );

    // L4: a DENY on identities alone. The source's identity is known on its own node, so
    // tc_from_pod there drops the SYN (counted) before any agent sees the connection,
    // whether the destination is on another node (client-a → echo-b) or the same one
    // (client-a → web-a, deny-by-default: only sa web may reach the web pods).
    let status = status_json();
    let echo = format!("{}:9000", pod_ip(&status, "echo-b"));
    assert_eq!(tcp_echo("web-a", &echo), "ping", "web may use echo");
    let drops = kernel_drops("node-a");
    assert_eq!(
        tcp_echo("client-a", &echo),
        "TimeoutError",
        "client may not"
    );
    only_drops_of("drop_policy_denied", &drops, &kernel_drops("node-a"));
    let web_a = pod_ip(&status, "web-a");
    let drops = kernel_drops("node-a");
    let code = in_pod(
        "client-a",
        &format!("curl -s -m 2 -o /dev/null -w '%{{http_code}}' http://{web_a}:8080/name || true"),
    );
    assert_eq!(code.trim(), "000");
    only_drops_of("drop_policy_denied", &drops, &kernel_drops("node-a"));
    assert_eq!(
        in_pod("web-b", &format!("curl -sf -m 5 http://{web_a}:8080/name")).trim(),
        "web-a"
    );

    // Every decision is counted by policy; token failures by reason. Since `before`,
    // at api-b: GET /public/a twice and /public/b once from client-a, /private/x with a
    // token twice (allowed by api-allow); POST and DELETE /public/a from client-a, GET
    // /public/a from web-a and /private/x without a token (no ALLOW rule matches); five
    // spellings of /admin/x (api-deny-admin); AUDIT on each of the six /public requests
    // judged; two tampered tokens refused before any policy (401).
    let b = metrics("node-b");
    let delta = |name: &str, labels: &[(&str, &str)]| {
        total(&b, name, labels) - total(&before, name, labels)
    };
    let decisions = |decision: &str, policy: &str| {
        delta(
            "mesh_authz_decisions_total",
            &[
                ("decision", decision),
                ("policy", policy),
                ("layer", "request"),
            ],
        )
    };
    assert_eq!(decisions("deny", "demo/api-deny-admin"), 5.0, "{b}");
    assert_eq!(decisions("deny", "-"), 4.0, "{b}");
    assert_eq!(decisions("allow", "demo/api-allow"), 5.0, "{b}");
    assert_eq!(decisions("audit", "demo/api-audit"), 6.0, "{b}");
    assert_eq!(
        delta(
            "mesh_authz_decisions_total",
            &[("layer", "request"), ("destination_workload", "api-b")]
        ),
        20.0,
        "no other decision on api-b's requests: {b}"
    );
    assert_eq!(
        delta(
            "mesh_jwt_validations_total",
            &[("result", "rejected"), ("reason", "bad_signature")]
        ),
        2.0,
        "{b}"
    );
    assert_eq!(
        delta("mesh_jwt_validations_total", &[("result", "rejected")]),
        2.0,
        "{b}"
    );
    assert_eq!(
        delta("mesh_jwt_validations_total", &[("result", "accepted")]),
        2.0,
        "{b}"
    );

    // meshctl policy check answers from the live configuration, with the deciding rule
    // and why the others did not match.
    let (code, answer) = on_node_answer(
        "node-b",
        &[
            "meshctl",
            "policy",
            "check",
            "--from",
            "demo/client-a",
            "--to",
            "demo/api",
            "--port",
            "80",
            "--method",
            "GET",
            "--path",
            "/admin/x",
            "-o",
            "json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&answer).expect("policy check JSON");
    assert_eq!(report["decision"], "deny", "{report}");
    assert_eq!(code, Some(4), "meshctl policy check exits with 4 on deny");
    assert_eq!(
        report["endpoints"][0]["decided_by"]["policy"],
        "demo/api-deny-admin"
    );
    assert_eq!(report["endpoints"][0]["outcome"], "403");
    let (code, text) = jwt_check();
    assert_eq!(code, Some(0), "meshctl policy check exits with 0 on allow");
    assert!(text.starts_with("ALLOW"), "{text}");
    assert!(text.contains("ALLOW demo/api-allow rules[1]"), "{text}");
    assert!(
        text.contains("DENY demo/api-deny-admin did not match"),
        "{text}"
    );

    // A client that asks to close has its wish passed on: the api pod closes first, and
    // node-b's agent does not keep its end (the client's address and port) in TIME_WAIT,
    // where it would refuse the client's next connection from that port for a minute.
    let client = pod_ip(&status_json(), "client-a");
    assert_eq!(
        http(
            "client-a",
            &format!("--local-port 30005 -H 'Connection: close' -o /dev/null {api}/public/a")
        ),
        "200 1.1"
    );
    sleep(Duration::from_secs(1));
    let held = on_node(
        "node-b",
        &[
            "ss",
            "-Htan",
            "state",
            "time-wait",
            "src",
            &format!("{client}:30005"),
        ],
    );
    assert!(held.trim().is_empty(), "node-b's agent holds: {held}");
}

/// Two TCP echo pods on node-a: one spliced in the kernel, one opted out (copied).
fn local_echoes() -> String {
    let pod = |name: &str, labels: &str| {
        format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo, labels: {{{labels}}}}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers:
    - name: echo
      command:
        - python3
        - -c
        - |
          import socketserver
          class Echo(socketserver.BaseRequestHandler):
              def handle(self):
                  while data := self.request.recv(65536):
                      self.request.sendall(data)
          socketserver.ThreadingTCPServer.allow_reuse_address = True
          socketserver.ThreadingTCPServer(('0.0.0.0', 9000), Echo).serve_forever()
      readinessProbe: {{tcpSocket: {{port: 9000}}}}
"
        )
    };
    format!(
        "{}---\n{}---\n{}",
        pod("echo-direct", "app: echo-local"),
        pod("echo-spliced", "app: echo-local, mesh/bypass: \"false\""),
        pod("echo-copied", "app: echo-local, mesh/splice: \"false\"")
    )
}

/// Sends `size` random bytes to `address`, reads their echo, half-closes once it is
/// all back, and reads to the end (the server's FIN). The client's FIN comes after the
/// agent has settled how the flow is carried (no byte passes before), so a same-node
/// flow is spliced whatever its size.
fn echo_round_trip(address: &str, size: usize) -> String {
    echo_round_trip_from("client-a", address, size)
}

/// `echo_round_trip` from `pod`.
fn echo_round_trip_from(pod: &str, address: &str, size: usize) -> String {
    let (host, port) = address.split_once(':').expect("host:port");
    in_pod(
        pod,
        &format!(
            "python3 -c \"
import socket, os, threading
data = os.urandom({size})
s = socket.create_connection(('{host}', {port}))
got = []
def read():
    while chunk := s.recv(1 << 16):
        got.append(chunk)
        if sum(map(len, got)) == len(data):
            s.shutdown(socket.SHUT_WR)
reader = threading.Thread(target=read)
reader.start()
s.sendall(data)
reader.join()
print('intact' if b''.join(got) == data else 'corrupted')
\""
        ),
    )
    .trim()
    .to_owned()
}

/// An HTTP request from client-a with its source port fixed to `port` (below the
/// ephemeral range, so no other connection holds it), `Connection: close`, read until the
/// server closes: the SYN's retransmissions, as TCP_INFO counts them once connected, and
/// the body.
fn request_from_port(ip: &str, port: u16) -> (u32, String) {
    let out = in_pod(
        "client-a",
        &format!(
            "python3 -c \"
import socket, struct
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.settimeout(10)
s.bind(('', {port}))
s.connect(('{ip}', 8080))
retransmitted = struct.unpack_from('I', s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 100)[0]
s.sendall(b'GET /name HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n')
response = b''
while chunk := s.recv(65536):
    response += chunk
print(retransmitted, response.split(b'\\r\\n\\r\\n', 1)[1].decode().strip())
\""
        ),
    );
    let (retransmitted, body) = out
        .trim()
        .split_once(' ')
        .expect("retransmissions and body");
    (retransmitted.parse().expect("a count"), body.to_owned())
}

/// Whether node-a's agent holds its end of client-a's connection from `port` to
/// `ip`:8080 in TIME_WAIT.
fn agent_end_in_time_wait(ip: &str, client: &str, port: u16) -> bool {
    !on_node(
        "node-a",
        &[
            "ss",
            "-Htan",
            "state",
            "time-wait",
            "src",
            &format!("{ip}:8080"),
            "dst",
            &format!("{client}:{port}"),
        ],
    )
    .trim()
    .is_empty()
}

/// A client reusing its port while node-a's agent still holds its end of the previous
/// connection in TIME_WAIT (the server closed first, so the agent did too): the new SYN
/// is captured as a new connection at once (`steered_reopened`), not answered with the
/// old connection's ACK and retransmitted.
fn reopened_connections_are_answered_at_the_first_syn(status: &serde_json::Value) {
    let client = pod_ip(status, "client-a");
    for (pod, port) in [("web-a", 30001), ("web-b", 30002)] {
        let ip = pod_ip(status, pod);
        assert_eq!(request_from_port(&ip, port).1, pod);
        eventually(
            &format!("node-a holds the connection to {pod} in TIME_WAIT"),
            || agent_end_in_time_wait(&ip, &client, port),
        );
        let reopened = tc_packets("node-a", "steered_reopened");
        assert_eq!(
            request_from_port(&ip, port),
            (0, pod.to_owned()),
            "the reopened connection to {pod}: answered at the first SYN"
        );
        assert_eq!(tc_packets("node-a", "steered_reopened"), reopened + 1);
    }
}

#[test]
fn same_node_flows_go_pod_to_pod_in_the_kernel_or_are_spliced_by_the_agent() {
    let _sandbox = Sandbox::up();
    kubectl("apply", "echoes", &local_echoes());
    let status = status_json();
    let carried = |how: &str| {
        sample(
            &metrics("node-a"),
            "mesh_connections_carried_total",
            &[("how", how)],
        )
        .unwrap_or(0.0)
    };
    // client-a's connections to `echo`, from node-a's metrics: closed, and the bytes
    // client-a sent and received, as client-a's socket (source) and the echo's
    // (destination) report them.
    let echo_flows = |echo: &str| {
        let m = metrics("node-a");
        let mut seen = Vec::new();
        for reporter in ["source", "destination"] {
            let labels = [
                ("reporter", reporter),
                ("source_workload", "client-a"),
                ("destination_workload", echo),
            ];
            for name in [
                "istio_tcp_connections_closed_total",
                "istio_tcp_sent_bytes_total",
                "istio_tcp_received_bytes_total",
            ] {
                seen.push(total(&m, name, &labels) as u64);
            }
        }
        seen
    };
    reopened_connections_are_answered_at_the_first_syn(&status);
    let (spliced, copied) = (carried("spliced"), carried("copied"));

    // Bytes both ways, each direction ended by its own FIN, intact whatever the size.
    let echo_spliced = format!("{}:9000", pod_ip(&status, "echo-spliced"));
    for size in [1, 70_000, 3 << 20] {
        assert_eq!(
            echo_round_trip(&echo_spliced, size),
            "intact",
            "{size} bytes"
        );
    }
    // The server speaks first and closes: python's http.server on web-a, 4 MiB.
    let web_a = pod_ip(&status, "web-a");
    assert_eq!(
        download_digest("client-a", &format!("http://{web_a}:8080/blob")),
        sha256_of_file("/run/mesh-sandbox/pods/demo-web-a/blob")
    );
    // All four spliced in the kernel (counted as each ends), none copied.
    eventually_eq("node-a counts four spliced flows", spliced + 4.0, || {
        carried("spliced")
    });
    assert_eq!(carried("copied"), copied, "none copied");
    let bytes = (1 + 70_000 + (3 << 20)) as u64;
    eventually_eq(
        "node-a reports the spliced echoes' bytes",
        vec![3, bytes, bytes, 3, bytes, bytes],
        || echo_flows("echo-spliced"),
    );

    // With nothing for the agent to do (no policy, no L7 work, no access log), the kernel
    // carries the flow from pod to pod: no agent socket, no splice, the same metrics from
    // the pods' own sockets.
    let (kernel, direct_new) = (carried("kernel"), tc_packets("node-a", "direct_new"));
    let echo_direct = format!("{}:9000", pod_ip(&status, "echo-direct"));
    for size in [1, 70_000, 3 << 20] {
        assert_eq!(
            echo_round_trip(&echo_direct, size),
            "intact",
            "{size} bytes, direct"
        );
    }
    eventually_eq(
        "node-a counts three flows the kernel carried",
        kernel + 3.0,
        || carried("kernel"),
    );
    assert_eq!(tc_packets("node-a", "direct_new"), direct_new + 3);
    assert_eq!(carried("spliced"), spliced + 4.0, "none spliced");
    let bytes = (1 + 70_000 + (3 << 20)) as u64;
    eventually_eq(
        "node-a reports the direct echoes' bytes",
        vec![3, bytes, bytes, 3, bytes, bytes],
        || echo_flows("echo-direct"),
    );

    // With access logs on everywhere the kernel still carries the connection: node-a's
    // agent writes client-a's line from the connection's close event.
    let log = "/run/mesh-sandbox/access-direct.log";
    json_access_log_to(log);
    eventually("node-a logs to the MeshConfig's file", || {
        on_node(
            "node-a",
            &["curl", "-sf", "http://127.0.0.1:15000/config_dump"],
        )
        .contains(log)
    });
    let kernel = carried("kernel");
    assert_eq!(echo_round_trip(&echo_direct, 5000), "intact");
    eventually("client-a's line for the direct connection", || {
        logged_lines(log).iter().any(|line| {
            line["upstream_host"] == echo_direct.as_str()
                && line["bytes_received"] == 5000
                && line["bytes_sent"] == 5000
        })
    });
    assert_eq!(carried("kernel"), kernel + 1.0, "carried by the kernel");

    // meshctl policy check says who carries each.
    let carried_by = |to: &str| {
        let answer = on_node(
            "node-a",
            &[
                "meshctl",
                "policy",
                "check",
                "--from",
                "demo/client-a",
                "--to",
                to,
                "--port",
                "9000",
                "-o",
                "json",
            ],
        );
        let report: serde_json::Value = serde_json::from_str(&answer).expect("policy check JSON");
        report["endpoints"][0]["carried_by"].clone()
    };
    assert_eq!(carried_by("demo/echo-direct"), "kernel");
    assert_eq!(carried_by("demo/echo-spliced"), "agent");

    // A pod labelled mesh/splice: "false" has its flows copied by the agent instead.
    let echo_copied = format!("{}:9000", pod_ip(&status, "echo-copied"));
    assert_eq!(echo_round_trip(&echo_copied, 3 << 20), "intact");
    eventually_eq("node-a counts one copied flow", copied + 1.0, || {
        carried("copied")
    });
    assert_eq!(carried("spliced"), spliced + 4.0);
    let bytes = (3 << 20) as u64;
    eventually_eq(
        "node-a reports the copied echo's bytes",
        vec![1, bytes, bytes, 1, bytes, bytes],
        || echo_flows("echo-copied"),
    );
}

/// A watcher on a pod's eth0 (sniff.py), capturing by the time `sniff` returns.
struct Sniffer {
    pod: String,
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

fn sniff(pod: &str, sentinel: &str) -> Sniffer {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["sandbox", "exec", pod, "--", "python3", "-c"])
        .arg(include_str!("sniff.py"))
        .arg(sentinel)
        .current_dir(workspace())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the sniffer");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("reading the sniffer");
    assert_eq!(line.trim(), "ready", "the sniffer in {pod} did not start");
    Sniffer {
        pod: pod.to_owned(),
        child,
        stdout,
    }
}

impl Sniffer {
    /// Waits for the sentinel and returns what the attacker got through to the pod.
    fn seen(mut self) -> Vec<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading the sniffer");
        let status = self.child.wait().expect("sniffer");
        let report: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("sniffer in {}: {e}: {line:?}", self.pod));
        assert!(
            status.success() && report["sentinel"] == true,
            "the sentinel request never reached {}: {report}",
            self.pod
        );
        report["seen"].as_array().cloned().unwrap_or_default()
    }
}

/// The node's `mesh_tc_packets_total` for one verdict (absent: none yet).
fn tc_packets(node: &str, verdict: &str) -> u64 {
    sample(
        &metrics(node),
        "mesh_tc_packets_total",
        &[("verdict", verdict)],
    )
    .unwrap_or(0.0) as u64
}

/// Sends the sentinel request through the mesh from client-a (HTTP to `ip`:8080, the
/// sentinel in the query string, which the server ignores): it reaches the pod after
/// any attack packet sent before it, and it must still work.
fn sentinel_request(ip: &str, sentinel: &str, expected_name: &str) {
    assert_eq!(
        in_pod(
            "client-a",
            &format!("curl -sf -m 10 'http://{ip}:8080/name?{sentinel}'")
        )
        .trim(),
        expected_name,
        "meshed traffic to {ip} still works"
    );
}

#[test]
fn a_hostile_pod_cannot_slip_past_the_kernel_with_fragments_or_forged_addresses() {
    let _sandbox = Sandbox::up();
    let status = status_json();
    let (web_a, web_b) = (pod_ip(&status, "web-a"), pod_ip(&status, "web-b"));
    kubectl(
        "apply",
        "pa-strict-attack",
        &peer_authentication("default", "  mtls: {mode: STRICT}\n"),
    );
    wait_strict_in_kernel("node-b", "web-b");
    let attack = include_str!("raw_attack.py");
    let sent = |target: &[&str], args: &[&str]| -> u64 {
        let mut all = vec!["sandbox", "exec"];
        all.extend_from_slice(target);
        all.extend_from_slice(&["--", "python3", "-c", attack]);
        all.extend_from_slice(args);
        ok(xtask(&all), &format!("raw_attack.py {args:?}"))
            .trim()
            .parse()
            .expect("packets sent")
    };

    // (a) A SYN to a meshed, STRICT pod, in fragments: from a meshed pod (tc_from_pod on
    // node-a) and from the node next to the pod, outside the mesh (tc_to_pod on node-b).
    let fragments_a = tc_packets("node-a", "drop_fragment");
    let fragments_b = tc_packets("node-b", "drop_fragment");
    let target = sniff("web-b", "sentinel-fragments");
    let from_pod = sent(&["client-a"], &["fragments", &web_b, "8080", "3"]);
    let from_node = sent(&["--node", "node-b"], &["fragments", &web_b, "8080", "2"]);
    assert_eq!((from_pod, from_node), (6, 4));
    sentinel_request(&web_b, "sentinel-fragments", "web-b");
    assert_eq!(target.seen(), Vec::<serde_json::Value>::new());
    eventually("node-a counts the pod's fragments", || {
        tc_packets("node-a", "drop_fragment") == fragments_a + from_pod
    });
    eventually("node-b counts the node's fragments", || {
        tc_packets("node-b", "drop_fragment") == fragments_b + from_node
    });

    // (b) SYNs with another pod's address: web-a's (same node) towards web-b, and web-b's
    // (the other node) towards web-a. Each of the two pods is a target once and the pod
    // whose address was forged (which would get the answers) once: neither sees anything.
    let spoofed = tc_packets("node-a", "drop_spoofed_source");
    let at_web_b = sniff("web-b", "sentinel-spoof-b");
    let at_web_a = sniff("web-a", "sentinel-spoof-a");
    let forged = sent(&["client-a"], &["spoof", &web_a, &web_b, "8080", "3"])
        + sent(&["client-a"], &["spoof", &web_b, &web_a, "8080", "2"]);
    assert_eq!(forged, 5);
    sentinel_request(&web_b, "sentinel-spoof-b", "web-b");
    sentinel_request(&web_a, "sentinel-spoof-a", "web-a");
    assert_eq!(at_web_b.seen(), Vec::<serde_json::Value>::new());
    assert_eq!(at_web_a.seen(), Vec::<serde_json::Value>::new());
    eventually("node-a counts the forged packets", || {
        tc_packets("node-a", "drop_spoofed_source") == spoofed + forged
    });
    // What the attacker sent never got further than its own veth.
    assert_eq!(tc_packets("node-b", "drop_spoofed_source"), 0);

    // (c) Data segments forged from the node with the addresses and ports of a live
    // connection the kernel carries pod to pod (echo-b's to web-b, same node): they did
    // not enter the node on echo-b's veth, so STRICT web-b takes none of them.
    let echo_b = pod_ip(&status, "echo-b");
    let direct = tc_packets("node-b", "passed_direct_strict");
    let held = HeldConnection::open("echo-b", &web_b, 41000);
    assert!(
        tc_packets("node-b", "passed_direct_strict") > direct,
        "echo-b's connection to web-b goes pod to pod"
    );
    let strict_drops = tc_packets("node-b", "drop_plaintext_strict");
    let at_web_b = sniff("web-b", "sentinel-segments");
    let forged = sent(
        &["--node", "node-b"],
        &["segment", &echo_b, "41000", &web_b, "8080", "3"],
    );
    assert_eq!(forged, 3);
    sentinel_request(&web_b, "sentinel-segments", "web-b");
    assert_eq!(at_web_b.seen(), Vec::<serde_json::Value>::new());
    eventually("node-b drops the forged segments", || {
        tc_packets("node-b", "drop_plaintext_strict") == strict_drops + forged
    });
    drop(held);
}

/// A connection `pod` holds open from its `port` to `ip`:8080 (for 30 s at most).
struct HeldConnection(std::process::Child);

impl HeldConnection {
    fn open(pod: &str, ip: &str, port: u16) -> HeldConnection {
        use std::io::BufRead;
        let script = format!(
            "import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('', {port}))
s.connect(('{ip}', 8080))
print('ready', flush=True)
time.sleep(30)"
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["sandbox", "exec", pod, "--", "python3", "-c", &script])
            .current_dir(workspace())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the connection's holder");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("reading the holder");
        assert_eq!(line.trim(), "ready", "{pod} did not connect to {ip}:8080");
        HeldConnection(child)
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `reviews` pod of `version` on `node`, serving `l7_server.py` on 9080.
fn reviews_pod(version: &str, node: &str) -> String {
    let server = workspace().join("xtask/tests/l7_server.py");
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: reviews-{version}\n  namespace: demo\n  \
         labels: {{app: reviews, version: {version}}}\nspec:\n  nodeName: {node}\n  containers:\n  \
         - name: reviews\n    command: [python3, {}, '9080']\n    ports: [{{name: http, containerPort: 9080}}]\n",
        server.display()
    )
}

const REVIEWS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: demo}
spec:
  clusterIP: 10.96.0.110
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
";

/// What `l7_client.py` saw making `count` requests to `path` of the reviews Service.
struct Answers {
    /// Answers by "status pod".
    counts: std::collections::BTreeMap<String, u64>,
    slowest_ms: f64,
    first: serde_json::Value,
}

impl Answers {
    fn count(&self, key: &str) -> u64 {
        self.counts.get(key).copied().unwrap_or(0)
    }

    fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The JSON the backend answered the first request with.
    fn first_echo(&self) -> serde_json::Value {
        let body = self.first["body"].as_str().expect("a body");
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
    }
}

fn reviews(path: &str, count: usize, headers: &str, connections: &str) -> Answers {
    l7_requests(
        &format!("http://10.96.0.110:9080{path}"),
        count,
        headers,
        connections,
    )
}

/// reviews-v2 on node-b, the Service `reviews` and a route sending it all its requests.
fn reviews_v2_on_node_b() {
    kubectl("apply", "reviews-v2", &reviews_pod("v2", "node-b"));
    kubectl("apply", "reviews", REVIEWS);
    kubectl(
        "apply",
        "routes",
        &reviews_routes(
            "  - name: to-v2\n    route:\n    - destination: {host: reviews, subset: v2}\n",
        ),
    );
}

/// What `l7_client.py` in client-a saw making `count` requests to `url`.
fn l7_requests(url: &str, count: usize, headers: &str, connections: &str) -> Answers {
    let script = include_str!("l7_client.py");
    let out = ok(
        xtask(&[
            "sandbox",
            "exec",
            "client-a",
            "--",
            "python3",
            "-c",
            script,
            url,
            &count.to_string(),
            headers,
            connections,
        ]),
        &format!("{count} requests to {url}"),
    );
    let value: serde_json::Value = serde_json::from_str(&out).expect("client JSON");
    Answers {
        counts: serde_json::from_value(value["counts"].clone()).expect("counts"),
        slowest_ms: value["slowest_ms"].as_f64().expect("slowest"),
        first: value["first"].clone(),
    }
}

fn reviews_routes(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: demo}}\n\
         spec:\n  hosts: [reviews]\n  http:\n{http}"
    )
}

/// How many connections the reviews pod has been sent requests on (a request of its own,
/// on a new client connection).
fn reviews_connections() -> u64 {
    reviews("/connections", 1, "{}", "new").first_echo()["connections"]
        .as_u64()
        .expect("a count")
}

/// The source agent's established sockets to `endpoint`, as `ss` shows them with timers.
fn agent_sockets_to(node: &str, endpoint: &str) -> String {
    on_node(
        node,
        &["ss", "-tnoH", "state", "established", "dst", endpoint],
    )
}

#[test]
fn routed_requests_follow_the_destination_rules_connection_settings() {
    let _sandbox = Sandbox::up();
    kubectl("apply", "reviews-v1", &reviews_pod("v1", "node-a"));
    kubectl("apply", "reviews", REVIEWS);
    kubectl(
        "apply",
        "routes",
        &reviews_routes("  - route: [{destination: {host: reviews}}]\n"),
    );
    eventually("reviews answers through its route", || {
        reviews("/", 3, "{}", "new").count("200 reviews-v1") == 3
    });
    let endpoint = format!("{}:9080", pod_ip(&status_json(), "reviews-v1"));

    // Unconfigured: kept-alive requests share one pooled upstream connection, without
    // TCP keepalive.
    let before = reviews_connections();
    assert_eq!(
        reviews("/", 6, "{}", "keepalive").count("200 reviews-v1"),
        6
    );
    assert_eq!(reviews_connections(), before, "one pooled connection");
    let sockets = agent_sockets_to("node-a", &endpoint);
    assert!(
        !sockets.is_empty() && !sockets.contains("keepalive"),
        "{sockets}"
    );

    // One request per connection, and TCP keepalive on the agent's sockets.
    let settings = |http: &str| {
        format!(
            "{REVIEWS}  trafficPolicy:\n    connectionPool:\n      http: {{{http}}}\n      \
             tcp: {{connectTimeout: 500ms, tcpKeepalive: {{time: 30s, interval: 5s, probes: 3}}}}\n"
        )
    };
    kubectl("apply", "reviews", &settings("maxRequestsPerConnection: 1"));
    let each_on_its_own = || {
        let before = reviews_connections();
        let answers = reviews("/", 5, "{}", "keepalive");
        // The five requests and the count's own.
        answers.count("200 reviews-v1") == 5 && reviews_connections() == before + 6
    };
    eventually("maxRequestsPerConnection applies", each_on_its_own);
    assert!(
        each_on_its_own(),
        "every request on a connection of its own"
    );

    // Idle connections are closed after idleTimeout, kept-alive ones reused before it.
    kubectl("apply", "reviews", &settings("idleTimeout: 2s"));
    eventually("the pooled connection is reused again", || {
        let before = reviews_connections();
        reviews("/", 4, "{}", "keepalive").count("200 reviews-v1") == 4
            && reviews_connections() == before
    });
    let sockets = agent_sockets_to("node-a", &endpoint);
    assert!(sockets.contains("keepalive"), "{sockets}");
    let before = reviews_connections();
    // Pacing, not waiting for a condition: the behaviour is the passing of idle time.
    std::thread::sleep(Duration::from_secs(4));

    // No pooled connection left, and the endpoint's answers vanish (a blackhole route in
    // its pod): each try gives up after the 500 ms connectTimeout instead of the default
    // 10 s, and the request fails after Istio's default retries with 503 and the connect
    // failure flags.
    let client_a = pod_ip(&status_json(), "client-a");
    in_pod(
        "reviews-v1",
        &format!("ip route add blackhole {client_a}/32"),
    );
    let failed = reviews("/", 1, "{}", "new");
    in_pod(
        "reviews-v1",
        &format!("ip route del blackhole {client_a}/32"),
    );
    assert_eq!(failed.count("503 -"), 1, "{:?}", failed.counts);
    assert!(failed.slowest_ms < 5_000.0, "{}", failed.slowest_ms);
    assert_eq!(
        sample(
            &metrics("node-a"),
            "mesh_routed_requests_total",
            &[("response_code", "503"), ("response_flags", "UF,URX")],
        ),
        Some(1.0)
    );

    assert_eq!(
        reviews_connections(),
        before + 1,
        "idle past 2 s: a new one"
    );
    assert_eq!(reviews_connections(), before + 1, "kept while in use");
}

/// A gRPC backend on node-b (`mesh-bench serve` answers `application/grpc` requests as
/// gRPC), its Service (port named `grpc`), and routes that retry on `unavailable`, do not
/// retry `/mesh.Test/Flaky/once…`, abort `/mesh.Test/Aborted` with a gRPC status, and
/// give `/mesh.Test/Slow/…` a 10 s route timeout that `grpc-timeout` overrides.
const GRPC: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: grpc-b, namespace: demo, labels: {app: grpc}}
spec:
  nodeName: node-b
  containers:
    - name: grpc
      command: [mesh-bench, serve, --listen, 0.0.0.0:50051]
      ports: [{name: grpc, containerPort: 50051}]
      readinessProbe: {tcpSocket: {port: 50051}}
---
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: demo}
spec:
  clusterIP: 10.96.0.180
  selector: {app: grpc}
  ports: [{name: grpc, port: 50051}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpc, namespace: demo}
spec:
  hosts: [grpc]
  http:
  - name: aborted
    match: [{uri: {exact: /mesh.Test/Aborted}}]
    fault: {abort: {grpcStatus: PERMISSION_DENIED, percentage: {value: 100}}}
    route: [{destination: {host: grpc}}]
  - name: once
    match: [{uri: {prefix: /mesh.Test/Flaky/once}}]
    retries: {attempts: 0}
    route: [{destination: {host: grpc}}]
  - name: slow
    match: [{uri: {prefix: /mesh.Test/Slow/}}]
    timeout: 10s
    route: [{destination: {host: grpc}}]
  - name: all
    match: [{uri: {prefix: /mesh.Test/}}]
    retries: {attempts: 2, retryOn: unavailable}
    route: [{destination: {host: grpc}}]
";

/// What a gRPC client sees calling `method` of the grpc Service from client-a with one
/// message (`hello`): the gRPC status (from the head, or the trailers), the HTTP status,
/// the bytes of the answer and the seconds it took.
struct GrpcCall {
    grpc_status: Option<u32>,
    http_status: u32,
    body_bytes: u64,
    seconds: f64,
}

fn grpc_call(method: &str, headers: &str) -> GrpcCall {
    try_grpc_call(method, headers).unwrap_or_else(|err| panic!("{err}"))
}

/// A gRPC call, or why curl could not make it (the Service not captured yet, say).
fn try_grpc_call(method: &str, headers: &str) -> Result<GrpcCall, String> {
    let script = format!(
        "printf '\\000\\000\\000\\000\\005hello' | curl -s --http2-prior-knowledge \
         -H 'content-type: application/grpc' -H 'te: trailers' {headers} \
         --data-binary @- -D - -o /dev/null \
         -w 'http=%{{http_code}} bytes=%{{size_download}} time=%{{time_total}}\\n' \
         http://10.96.0.180:50051{method}"
    );
    let run = xtask(&["sandbox", "exec", "client-a", "--", "sh", "-c", &script]);
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    if !run.status.success() {
        return Err(format!(
            "in client-a: {script} failed ({}):\n{out}",
            run.status
        ));
    }
    let field = |name: &str| {
        out.lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(str::to_owned)
    };
    let summary = out.lines().last().unwrap_or_default().to_owned();
    let part = |key: &str| {
        summary
            .split(' ')
            .find_map(|p| p.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in {out}"))
            .to_owned()
    };
    Ok(GrpcCall {
        grpc_status: field("grpc-status: ").and_then(|v| v.parse().ok()),
        http_status: part("http=").parse().expect("HTTP status"),
        body_bytes: part("bytes=").parse().expect("bytes"),
        seconds: part("time=").parse().expect("time"),
    })
}

#[test]
fn grpc_calls_are_routed_retried_aborted_and_timed_out_by_grpc_status() {
    let _sandbox = Sandbox::up();
    kubectl("apply", "grpc", GRPC);
    // Until the agents have the new Service, curl cannot connect at all: try again.
    eventually("the gRPC backend answers through its route", || {
        try_grpc_call("/mesh.Test/Echo", "")
            .is_ok_and(|call| call.http_status == 200 && call.grpc_status == Some(0))
    });
    let echoed = grpc_call("/mesh.Test/Echo", "");
    assert_eq!(echoed.body_bytes, 10, "the message comes back, framed");

    // The backend answers UNAVAILABLE to the first call of each Flaky key: retried on
    // `unavailable` the caller sees OK; on the route without retries, the failure.
    let retried = grpc_call("/mesh.Test/Flaky/retried", "");
    assert_eq!((retried.http_status, retried.grpc_status), (200, Some(0)));
    let once = grpc_call("/mesh.Test/Flaky/once", "");
    assert_eq!((once.http_status, once.grpc_status), (200, Some(14)));
    // Always UNAVAILABLE: three tries, the last answer stands (`URX`).
    let unavailable = grpc_call("/mesh.Test/Unavailable", "");
    assert_eq!(unavailable.grpc_status, Some(14));
    // An abort in gRPC terms, which never reaches the backend.
    let aborted = grpc_call("/mesh.Test/Aborted", "");
    assert_eq!((aborted.http_status, aborted.grpc_status), (200, Some(7)));
    // `grpc-timeout` replaces the route's 10 s: the agent gives up after 300 ms and
    // answers as Envoy does, UNAVAILABLE in a Trailers-Only response.
    let timed_out = grpc_call("/mesh.Test/Slow/3000", "-H 'grpc-timeout: 300m'");
    assert_eq!(
        (timed_out.http_status, timed_out.grpc_status),
        (200, Some(14))
    );
    assert!(timed_out.seconds < 2.5, "{}", timed_out.seconds);
    let patient = grpc_call("/mesh.Test/Slow/500", "");
    assert_eq!(patient.grpc_status, Some(0), "the route's 10 s is enough");

    let routed = |route: &str, flags: &str| {
        total(
            &metrics("node-a"),
            "mesh_routed_requests_total",
            &[("route", route), ("response_flags", flags)],
        )
    };
    assert_eq!(
        routed("all", "URX"),
        1.0,
        "the call that ran out of retries"
    );
    assert_eq!(routed("aborted", "FI"), 1.0);
    assert_eq!(routed("slow", "UT"), 1.0);
    assert_eq!(routed("once", "-"), 1.0);
}

#[test]
fn tcp_flows_to_a_service_follow_its_connection_pool() {
    let _sandbox = Sandbox::up();
    let echo = "10.96.0.10:9000";
    eventually("echo answers through its Service", || {
        tcp_echo("client-a", echo) == "ping"
    });
    kubectl(
        "apply",
        "echo-pool",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: echo, namespace: demo}\nspec:\n  host: echo\n  trafficPolicy:\n    \
         connectionPool: {tcp: {maxConnections: 1, idleTimeout: 2s}}\n",
    );
    // One connection held: a second is refused at once; the held one lives while it
    // talks, and is closed once idle for 2 s, which frees its place.
    let script = "
import json, socket, time
def echo(s):
    s.sendall(b'ping')
    return s.recv(16).decode() or 'closed'
def attempt(f):
    try:
        return f()
    except OSError as e:
        return type(e).__name__
connect = lambda: socket.create_connection(('10.96.0.10', 9000), timeout=5)
out = {}
held = connect()
out['held'] = attempt(lambda: echo(held))
out['over'] = attempt(lambda: echo(connect()))
out['talking'] = []
for _ in range(8):
    time.sleep(0.5)
    out['talking'].append(attempt(lambda: echo(held)))
time.sleep(3.5)
out['idle'] = attempt(lambda: echo(held))
out['after'] = attempt(lambda: echo(connect()))
print(json.dumps(out))
";
    let refused = || {
        sample(
            &metrics("node-a"),
            "mesh_connections_refused_total",
            &[("reason", "max_connections")],
        )
        .unwrap_or(0.0)
    };
    eventually("maxConnections applies", || {
        let before = refused();
        let out: serde_json::Value =
            serde_json::from_str(&in_pod("client-a", &format!("python3 -c \"{script}\"")))
                .expect("JSON");
        if out["over"] == "ping" {
            return false;
        }
        assert!(
            ["ConnectionResetError", "BrokenPipeError"]
                .contains(&out["over"].as_str().unwrap_or("")),
            "{out}"
        );
        assert_eq!(out["held"], "ping", "{out}");
        assert_eq!(out["talking"], serde_json::json!(vec!["ping"; 8]), "{out}");
        assert!(
            ["closed", "ConnectionResetError"].contains(&out["idle"].as_str().unwrap_or("")),
            "closed after 2 s idle: {out}"
        );
        assert_eq!(out["after"], "ping", "{out}");
        assert_eq!(refused(), before + 1.0, "the refusal is counted");
        true
    });
}

#[test]
fn virtual_services_route_requests_in_the_source_agent() {
    let _sandbox = Sandbox::up();
    kubectl("apply", "reviews-v1", &reviews_pod("v1", "node-a"));
    kubectl("apply", "reviews-v2", &reviews_pod("v2", "node-b"));
    kubectl("apply", "reviews-v3", &reviews_pod("v3", "node-b"));
    kubectl("apply", "reviews", REVIEWS);
    eventually("the three reviews pods answer", || {
        let answers = reviews("/", 30, "{}", "new");
        ["v1", "v2", "v3"]
            .iter()
            .all(|v| answers.count(&format!("200 reviews-{v}")) > 0)
    });

    // The canary: a header match goes to v2, everything else 90/10 to v1 and v3, decided
    // request by request on one keep-alive connection.
    kubectl(
        "apply",
        "routes",
        &reviews_routes(
            "  - name: jason\n    match: [{headers: {end-user: {exact: jason}}}]\n    \
             route: [{destination: {host: reviews, subset: v2}}]\n  \
             - name: split\n    route:\n    - {destination: {host: reviews, subset: v1}, weight: 90}\n    \
             - {destination: {host: reviews, subset: v3}, weight: 10}\n",
        ),
    );
    let routed = |route: &str, code: &str| {
        sample(
            &metrics("node-a"),
            "mesh_routed_requests_total",
            &[
                ("destination_service", "reviews.demo.svc.cluster.local"),
                ("route", route),
                ("response_code", code),
                ("response_flags", "-"),
            ],
        )
        .unwrap_or(0.0)
    };
    // Routed, not merely answered by v2: a connection may reach v2 unrouted by chance.
    eventually("the header match goes to v2", || {
        reviews("/", 5, r#"{"end-user": "jason"}"#, "keepalive").count("200 reviews-v2") == 5
            && routed("jason", "200") > 0.0
    });
    let split = reviews("/", 1000, "{}", "keepalive");
    let (v1, v3) = (split.count("200 reviews-v1"), split.count("200 reviews-v3"));
    assert_eq!(v1 + v3, 1000, "{:?}", split.counts);
    assert!((870..=930).contains(&v1), "90/10 gave {v1}/{v3}");
    let jason_before = routed("jason", "200");
    let jason = reviews("/", 50, r#"{"end-user": "jason"}"#, "new");
    assert_eq!(jason.count("200 reviews-v2"), 50, "{:?}", jason.counts);
    // An HTTP/2 client is routed the same way; the HTTP/1.1 backend gets HTTP/1.1.
    let h2 = in_pod(
        "client-a",
        "curl -s --http2-prior-knowledge -H 'end-user: jason' -D - -o /dev/null \
         -w '%{http_version}' http://10.96.0.110:9080/",
    );
    assert!(h2.contains("x-served-by: reviews-v2"), "{h2}");
    assert!(h2.trim_end().ends_with('2'), "not HTTP/2: {h2}");
    // meshctl says which route a request would take, and where it would go.
    let check = |header: &str| {
        on_node(
            "node-a",
            &[
                "meshctl",
                "route",
                "check",
                "--from",
                "demo/client-a",
                "--to",
                "demo/reviews",
                "--header",
                header,
            ],
        )
    };
    let jason_route = check("end-user=jason");
    assert!(jason_route.contains("route jason matches"), "{jason_route}");
    assert!(jason_route.contains("subset v2: 100%"), "{jason_route}");
    let split_route = check("end-user=someone");
    assert!(
        split_route.contains("route jason does not match"),
        "{split_route}"
    );
    assert!(split_route.contains("subset v1: 90%"), "{split_route}");
    assert!(split_route.contains("subset v3: 10%"), "{split_route}");
    assert_eq!(routed("split", "200"), 1000.0);
    // Count from after the probe, whose first tries may have gone unrouted.
    assert_eq!(routed("jason", "200"), jason_before + 51.0);

    // Rewrite and header changes: the backend sees the new path and headers, the client
    // the response header; no route for other paths answers 404.
    kubectl(
        "apply",
        "routes",
        &reviews_routes(
            "  - name: api\n    match: [{uri: {prefix: /old}}]\n    rewrite: {uri: /new}\n    \
             headers:\n      request: {set: {x-route: api}, remove: [x-secret]}\n      \
             response: {add: {x-routed: 'yes'}}\n    \
             route: [{destination: {host: reviews, subset: v2}}]\n",
        ),
    );
    eventually("the rewrite applies", || {
        reviews("/old/items?page=2", 1, r#"{"x-secret": "s"}"#, "new")
            .first_echo()
            .get("path")
            .and_then(|p| p.as_str())
            == Some("/new/items?page=2")
    });
    let rewritten = reviews("/old/items", 1, r#"{"x-secret": "s"}"#, "new");
    let echo = rewritten.first_echo();
    assert_eq!(echo["headers"]["x-route"], "api");
    assert!(echo["headers"].get("x-secret").is_none(), "{echo}");
    assert_eq!(rewritten.first["headers"]["x-routed"], "yes");
    assert_eq!(reviews("/other", 3, "{}", "new").count("404 -"), 3);

    // A flaky backend (every other request of a key fails with 500) made reliable by
    // retries on 5xx, and failing without them.
    kubectl(
        "apply",
        "routes",
        &reviews_routes(
            "  - name: no-retries\n    match: [{uri: {prefix: /flaky/plain}}]\n    retries: {attempts: 0}\n    \
             route: [{destination: {host: reviews, subset: v2}}]\n  \
             - name: retried\n    retries: {attempts: 3, retryOn: 5xx}\n    \
             route: [{destination: {host: reviews, subset: v2}}]\n",
        ),
    );
    eventually("the retry route applies", || {
        reviews("/flaky/probe", 4, "{}", "new").count("200 reviews-v2") == 4
    });
    let retried = reviews("/flaky/retried", 100, "{}", "keepalive");
    assert_eq!(retried.count("200 reviews-v2"), 100, "{:?}", retried.counts);
    let plain = reviews("/flaky/plain", 100, "{}", "keepalive");
    assert_eq!(plain.count("500 reviews-v2"), 50, "{:?}", plain.counts);
    assert_eq!(plain.count("200 reviews-v2"), 50, "{:?}", plain.counts);

    // A timeout answers 504 on time; a fault delays or aborts its share of requests.
    kubectl(
        "apply",
        "routes",
        &reviews_routes(
            "  - name: slow\n    match: [{uri: {prefix: /delay}}]\n    timeout: 500ms\n    \
             route: [{destination: {host: reviews, subset: v1}}]\n  \
             - name: faulty\n    fault: {abort: {httpStatus: 418, percentage: {value: 25}}}\n    \
             route: [{destination: {host: reviews, subset: v1}}]\n",
        ),
    );
    eventually("the timeout applies", || {
        reviews("/delay/3000", 1, "{}", "new").count("504 -") == 1
    });
    let timed_out = reviews("/delay/3000", 3, "{}", "new");
    assert_eq!(timed_out.count("504 -"), 3);
    assert!(
        timed_out.slowest_ms < 1500.0,
        "504 after {} ms",
        timed_out.slowest_ms
    );
    assert_eq!(
        reviews("/delay/10", 3, "{}", "new").count("200 reviews-v1"),
        3
    );
    let faulted = reviews("/", 800, "{}", "keepalive");
    let aborted = faulted.count("418 -");
    assert_eq!(aborted + faulted.count("200 reviews-v1"), 800);
    assert!(
        (150..=250).contains(&aborted),
        "25% aborts gave {aborted}/800"
    );

    // A mirror gets a copy of every request, its Host marked -shadow (before the port, as
    // Envoy does); the client sees
    // only the primary's answers.
    kubectl(
        "apply",
        "routes",
        &reviews_routes(
            "  - name: mirrored\n    mirror: {host: reviews, subset: v3}\n    \
             route: [{destination: {host: reviews, subset: v1}}]\n",
        ),
    );
    eventually("the mirror route applies", || {
        reviews("/", 1, "{}", "new").count("200 reviews-v1") == 1
    });
    // v3 is asked directly: a request to the Service would itself be mirrored.
    let v3 = pod_ip(&status_json(), "reviews-v3");
    let shadowed = || -> u64 {
        let seen = in_pod("client-a", &format!("curl -s http://{v3}:9080/seen"));
        let seen: serde_json::Value = serde_json::from_str(&seen).unwrap_or_default();
        seen["10.96.0.110-shadow:9080"].as_u64().unwrap_or(0)
    };
    // Each poll sends a request: the one that showed the route may have been served by
    // the previous configuration, which mirrored nothing.
    eventually("the first copy arrived", || {
        reviews("/", 1, "{}", "new");
        shadowed() >= 1
    });
    let before = shadowed();
    let mirrored = reviews("/", 40, "{}", "keepalive");
    assert_eq!(
        mirrored.count("200 reviews-v1"),
        40,
        "{:?}",
        mirrored.counts
    );
    eventually("v3 received a copy of each of the 40", || {
        shadowed() == before + 40
    });

    // Redirect and direct response.
    kubectl(
        "apply",
        "routes",
        &reviews_routes(
            "  - name: moved\n    match: [{uri: {exact: /moved}}]\n    redirect: {uri: /here, authority: reviews.demo}\n  \
             - name: teapot\n    directResponse: {status: 418, body: {string: short and stout}}\n",
        ),
    );
    eventually("the redirect applies", || {
        reviews("/moved", 1, "{}", "new").count("301 -") == 1
    });
    let moved = reviews("/moved", 1, "{}", "new");
    assert_eq!(
        moved.first["headers"]["location"],
        "http://reviews.demo/here"
    );
    let teapot = reviews("/anything", 1, "{}", "new");
    assert_eq!(teapot.count("418 -"), 1);
    assert_eq!(teapot.first["body"], "short and stout");
    assert_eq!(teapot.total(), 1);

    // Outlier detection: the endpoint answering 503 is ejected after three in a row, and
    // returns once its ejection time is over (to be ejected again, as it still fails).
    // Locality load balancing is off: with outlier detection Istio would keep client-a's
    // requests in its own zone, on v1 (the locality test shows that).
    kubectl(
        "apply",
        "reviews",
        &format!(
            "{REVIEWS}  trafficPolicy:\n    loadBalancer: {{localityLbSetting: {{enabled: false}}}}\n    \
             outlierDetection: {{consecutive5xxErrors: 3, interval: 1s, \
             baseEjectionTime: 3s, maxEjectionPercent: 100}}\n"
        ),
    );
    kubectl(
        "apply",
        "routes",
        &reviews_routes(
            "  - name: all\n    retries: {attempts: 0}\n    route: [{destination: {host: reviews}}]\n",
        ),
    );
    eventually("the whole host is routed", || {
        reviews("/", 6, "{}", "new").count("200 reviews-v2") >= 1
            && reviews("/moved", 1, "{}", "new").count("301 -") == 0
    });
    let ejecting = reviews("/failon/reviews-v3", 60, "{}", "keepalive");
    assert_eq!(ejecting.count("503 reviews-v3"), 3, "{:?}", ejecting.counts);
    assert_eq!(
        ejecting.count("200 reviews-v1") + ejecting.count("200 reviews-v2"),
        57
    );
    let routes = on_node("node-a", &["meshctl", "routes", "demo/reviews"]);
    assert!(
        routes
            .lines()
            .any(|l| l.contains("demo/reviews-v3") && l.contains("EJECTED")),
        "meshctl routes shows the ejection:\n{routes}"
    );
    let ejections = || {
        total(
            &metrics("node-a"),
            "mesh_outlier_ejections_total",
            &[
                ("cluster", "outbound|9080||reviews.demo.svc.cluster.local"),
                ("reason", "consecutive_5xx"),
            ],
        )
    };
    assert_eq!(ejections(), 1.0, "the ejection is counted");
    eventually("the ejected endpoint returns and is ejected again", || {
        reviews("/failon/reviews-v3", 6, "{}", "keepalive").count("503 reviews-v3") >= 1
    });
    eventually("the second ejection is counted", || {
        reviews("/failon/reviews-v3", 6, "{}", "keepalive");
        ejections() == 2.0
    });

    // Connection pool limits: one connection and one pending request; of five concurrent
    // slow requests two are served and three are refused at once with 503.
    kubectl(
        "apply",
        "reviews",
        &format!(
            "{REVIEWS}  trafficPolicy:\n    connectionPool:\n      tcp: {{maxConnections: 1}}\n      \
             http: {{http1MaxPendingRequests: 1}}\n"
        ),
    );
    let overflows = || {
        sample(
            &metrics("node-a"),
            "mesh_routed_requests_total",
            &[
                ("route", "all"),
                ("response_code", "503"),
                ("response_flags", "UO"),
            ],
        )
        .unwrap_or(0.0)
    };
    let mut overflows_before = 0.0;
    eventually("the pool limits apply", || {
        overflows_before = overflows();
        let timings = in_pod(
            "client-a",
            "for i in 1 2 3 4 5; do curl -s -o /dev/null -w '%{http_code} %{time_total}\\n' \
             http://10.96.0.110:9080/delay/1000 & done; wait",
        );
        let lines: Vec<(&str, f64)> = timings
            .lines()
            .filter_map(|l| {
                let (code, time) = l.split_once(' ')?;
                Some((code, time.parse().ok()?))
            })
            .collect();
        let refused_fast = lines
            .iter()
            .filter(|(code, time)| *code == "503" && *time < 0.5)
            .count();
        let served = lines.iter().filter(|(code, _)| *code == "200").count();
        refused_fast == 3 && served == 2
    });
    // The last round's three overflows, counted with the UO flag.
    eventually_eq(
        "overflows are counted with the UO flag",
        overflows_before + 3.0,
        overflows,
    );

    // Local rate limiting at the destination: a burst of 5, one more a second; 20 quick
    // requests get 5 answers and 15 times 429 with Retry-After.
    kubectl(
        "apply",
        "routes",
        &reviews_routes(
            "  - name: v1-only\n    route: [{destination: {host: reviews, subset: v1}}]\n",
        ),
    );
    eventually("v1 alone serves", || {
        reviews("/", 6, "{}", "new").count("200 reviews-v1") == 6
    });
    kubectl(
        "apply",
        "ratelimit",
        "apiVersion: policy.mesh.dev/v1alpha1\nkind: HTTPLocalRateLimitPolicy\n\
         metadata: {name: reviews, namespace: demo}\n\
         spec:\n  targetRef: {kind: Service, name: reviews}\n  total: {requestsPerSecond: 1, burst: 5}\n",
    );
    eventually("the rate limit applies", || {
        reviews("/", 10, "{}", "keepalive").count("429 -") > 0
    });
    // Let the bucket fill again (5 tokens at one a second).
    std::thread::sleep(Duration::from_secs(6));
    let limited = reviews("/", 20, "{}", "keepalive");
    assert_eq!(limited.count("200 reviews-v1"), 5, "{:?}", limited.counts);
    assert_eq!(limited.count("429 -"), 15, "{:?}", limited.counts);
    let refused = reviews("/", 1, "{}", "new");
    assert_eq!(refused.first["status"], 429);
    assert_eq!(refused.first["headers"]["retry-after"], "1");
}

/// How `l7_client.py`'s answers to one user's requests spread: "status pod" → count.
fn sticky_answers(user: &str, count: usize) -> std::collections::BTreeMap<String, u64> {
    reviews("/", count, &format!(r#"{{"x-user": "{user}"}}"#), "new").counts
}

#[test]
fn consistent_hashing_keeps_each_user_on_one_endpoint_by_header_and_by_cookie() {
    let _sandbox = Sandbox::up();
    kubectl("apply", "reviews-v1", &reviews_pod("v1", "node-a"));
    kubectl("apply", "reviews-v2", &reviews_pod("v2", "node-b"));
    kubectl("apply", "reviews-v3", &reviews_pod("v3", "node-b"));
    // No VirtualService: a DestinationRule that hashes on a header routes by itself.
    kubectl(
        "apply",
        "reviews",
        &format!(
            "{REVIEWS}  trafficPolicy:\n    loadBalancer:\n      consistentHash: {{httpHeaderName: x-user}}\n"
        ),
    );
    eventually("the three reviews pods answer", || {
        let answers = reviews("/", 30, "{}", "new");
        ["v1", "v2", "v3"]
            .iter()
            .all(|v| answers.count(&format!("200 reviews-{v}")) > 0)
    });
    eventually("requests are routed by the hash policy", || {
        sample(
            &metrics("node-a"),
            "mesh_routed_requests_total",
            &[("route", "default"), ("response_code", "200")],
        )
        .is_some_and(|n| n > 0.0)
    });
    // 200 requests, 20 users, each on a new connection: one endpoint per user.
    let mut owners = std::collections::BTreeSet::new();
    for user in 0..20 {
        let answers = sticky_answers(&format!("user-{user}"), 10);
        assert_eq!(answers.len(), 1, "user-{user} moved: {answers:?}");
        let (pod, count) = answers.iter().next().expect("an answer");
        assert_eq!(*count, 10, "user-{user}: {answers:?}");
        assert!(pod.starts_with("200 reviews-"), "user-{user}: {answers:?}");
        owners.insert(pod.clone());
    }
    assert!(owners.len() > 1, "every user on {owners:?}");
    let routes = on_node("node-a", &["meshctl", "routes", "demo/reviews"]);
    assert!(
        routes.contains(
            "load balancer (host): CONSISTENT_HASH; on header x-user, ring hash of at least 1024"
        ),
        "{routes}"
    );
    assert!(
        routes
            .lines()
            .any(|l| l.contains("demo/reviews-v1") && l.contains("r1/z-a")),
        "{routes}"
    );

    // By cookie with a ttl: the first answer sets it, and replaying it sticks.
    kubectl(
        "apply",
        "reviews",
        &format!(
            "{REVIEWS}  trafficPolicy:\n    loadBalancer:\n      consistentHash:\n        \
             httpCookie: {{name: session, path: /, ttl: 3600s}}\n"
        ),
    );
    eventually("the cookie is generated", || {
        reviews("/", 1, "{}", "new").first["headers"]
            .get("set-cookie")
            .is_some()
    });
    let first = reviews("/", 1, "{}", "new");
    let set_cookie = first.first["headers"]["set-cookie"]
        .as_str()
        .expect("a Set-Cookie")
        .to_owned();
    assert!(
        set_cookie.starts_with("session=\"")
            && set_cookie.ends_with("; Max-Age=3600; Path=/; HttpOnly"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().expect("the pair");
    let replayed = reviews("/", 20, &format!(r#"{{"cookie": {cookie:?}}}"#), "new");
    assert_eq!(replayed.counts.len(), 1, "{:?}", replayed.counts);
    assert_eq!(replayed.total(), 20);
    assert!(
        replayed.first["headers"].get("set-cookie").is_none(),
        "a request with the cookie gets none"
    );
    let mut spread = std::collections::BTreeSet::new();
    for session in 0..20 {
        let answers = reviews(
            "/",
            5,
            &format!(r#"{{"cookie": "session=s{session}"}}"#),
            "new",
        );
        assert_eq!(
            answers.counts.len(),
            1,
            "session s{session}: {:?}",
            answers.counts
        );
        spread.extend(answers.counts.keys().cloned());
    }
    assert!(spread.len() > 1, "every session on {spread:?}");
}

#[test]
fn locality_failover_keeps_requests_in_the_zone_until_its_endpoint_is_ejected() {
    // On the API source: the nodes' topology labels reach the agents through the API
    // server (the sticky-session test reads them from the directory).
    let _sandbox = Sandbox::up_with_args(&["--config-source", "kube"], &[]);
    kubectl("apply", "reviews-v1", &reviews_pod("v1", "node-a"));
    kubectl("apply", "reviews-v2", &reviews_pod("v2", "node-b"));
    // Outlier detection turns Istio's locality failover on: client-a (node-a, zone z-a)
    // goes to reviews-v1 (z-a) while it is healthy, to reviews-v2 (z-b) while it is
    // ejected.
    kubectl(
        "apply",
        "reviews",
        &format!(
            "{REVIEWS}  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n      \
             localityLbSetting: {{enabled: true}}\n    \
             outlierDetection: {{consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 10s, \
             maxEjectionPercent: 100}}\n"
        ),
    );
    kubectl(
        "apply",
        "routes",
        &reviews_routes(
            "  - name: all\n    retries: {attempts: 0}\n    route: [{destination: {host: reviews}}]\n",
        ),
    );
    let v2 = format!("http://{}:9080/", pod_ip(&status_json(), "reviews-v2"));
    eventually("reviews-v2 serves in the other zone", || {
        on_node_answer(
            "node-b",
            &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &v2],
        )
        .1
        .trim()
            == "200"
    });
    eventually("reviews-v1 serves, routed", || {
        reviews("/", 1, "{}", "new").count("200 reviews-v1") == 1
            && sample(
                &metrics("node-a"),
                "mesh_routed_requests_total",
                &[("route", "all"), ("response_code", "200")],
            )
            .is_some_and(|n| n > 0.0)
    });
    let local = reviews("/", 40, "{}", "keepalive");
    assert_eq!(local.count("200 reviews-v1"), 40, "{:?}", local.counts);
    let routes = on_node("node-a", &["meshctl", "routes", "demo/reviews"]);
    assert!(
        routes.contains("load balancer (host): ROUND_ROBIN; locality failover"),
        "{routes}"
    );
    // reviews-v1 starts failing: three 503s eject it, the rest fail over to the other zone.
    let failing = reviews("/failon/reviews-v1", 40, "{}", "keepalive");
    assert_eq!(failing.count("503 reviews-v1"), 3, "{:?}", failing.counts);
    assert_eq!(failing.count("200 reviews-v2"), 37, "{:?}", failing.counts);
    let ejected = on_node("node-a", &["meshctl", "routes", "demo/reviews"]);
    assert!(
        ejected
            .lines()
            .any(|l| l.contains("demo/reviews-v1") && l.contains("EJECTED")),
        "{ejected}"
    );
    // Once its ejection is over, the zone's endpoint takes every request again.
    eventually("requests return to the zone", || {
        reviews("/", 10, "{}", "keepalive").count("200 reviews-v1") == 10
    });
    let back = reviews("/", 40, "{}", "keepalive");
    assert_eq!(back.count("200 reviews-v1"), 40, "{:?}", back.counts);
}

const MESH_REQUEST_METRICS: &str = "\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  metrics:
  - providers: [{name: prometheus}]
";

/// Applies [`MESH_REQUEST_METRICS`] and waits until both agents hold it. A Telemetry
/// applies to connections opened after it reaches the agent: the source agent's pooled
/// upstream connection to a pod, opened by a request before then, would be carried
/// byte for byte by the destination agent, its requests never counted there.
fn apply_mesh_request_metrics() {
    kubectl("apply", "telemetry", MESH_REQUEST_METRICS);
    let holds = |node: &str| {
        on_node(node, &["curl", "-sf", "http://127.0.0.1:15000/config_dump"])
            .contains("istio-system/mesh-default")
    };
    eventually("both agents hold the mesh-wide Telemetry", || {
        holds("node-a") && holds("node-b")
    });
}

/// `multi_server.py` pods (TLS echo, HTTP, a server-first banner, on ports no Service
/// declares) on node-b, a subset each, behind one Service, with a VirtualService giving
/// it `http` routes by header and `tls` routes by server name.
fn multi_pods(cert: &Path, key: &Path) -> String {
    let server = workspace().join("xtask/tests/multi_server.py");
    let pod = |version: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: multi-{version}\n  namespace: demo\n  \
             labels: {{app: multi, version: {version}}}\nspec:\n  nodeName: node-b\n  containers:\n  \
             - name: multi\n    command: [python3, {}, {}, {}]\n    \
             readinessProbe: {{tcpSocket: {{port: 9080}}}}\n---\n",
            server.display(),
            cert.display(),
            key.display()
        )
    };
    format!(
        "{}{}apiVersion: v1
kind: Service
metadata: {{name: multi, namespace: demo}}
spec:
  clusterIP: 10.96.0.120
  selector: {{app: multi}}
  ports:
  - {{name: secure, port: 443, targetPort: 8443}}
  - {{name: web, port: 80, targetPort: 9080}}
  - {{name: greeting, port: 7000}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: multi, namespace: demo}}
spec:
  host: multi
  subsets: [{{name: a, labels: {{version: a}}}}, {{name: b, labels: {{version: b}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: multi, namespace: demo}}
spec:
  hosts: [multi]
  http:
  - name: beta
    match: [{{headers: {{x-beta: {{exact: 'on'}}}}}}]
    route: [{{destination: {{host: multi, subset: b}}}}]
  - name: default
    route: [{{destination: {{host: multi, subset: a}}}}]
  tls:
  - match: [{{sniHosts: [a.example]}}]
    route: [{{destination: {{host: multi, subset: a}}}}]
  - match: [{{sniHosts: ['*.b.example', b.example]}}]
    route: [{{destination: {{host: multi, subset: b}}}}]
",
        pod("a"),
        pod("b")
    )
}

/// From client-a: `count` TLS connections to the multi Service naming `sni`, each sending
/// one line; what each answered, one per line.
fn tls_answers(sni: &str, count: usize) -> String {
    let script = format!(
        "import socket, ssl
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
for i in range({count}):
    with context.wrap_socket(socket.create_connection(('10.96.0.120', 443), timeout=10), server_hostname='{sni}') as s:
        s.sendall(b'ping %d' % i)
        print(s.recv(1000).decode())"
    );
    ok(
        xtask(&[
            "sandbox", "exec", "client-a", "--", "python3", "-c", &script,
        ]),
        &format!("TLS to {sni}"),
    )
}

/// One HTTP request from client-a, as curl shows it: status line and headers.
fn curl_head(args: &str) -> String {
    in_pod("client-a", &format!("curl -s -D - -o /dev/null {args}")).to_ascii_lowercase()
}

#[test]
fn undeclared_ports_are_sniffed_and_tls_cors_and_delegated_routes_apply() {
    let _sandbox = Sandbox::up();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (cert, key) = (dir.join("multi-cert.pem"), dir.join("multi-key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=multi", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    ok(made, "a self-signed certificate");
    kubectl("apply", "multi", &multi_pods(&cert, &key));

    // tls routes: the source agent reads the ClientHello's server name and sends each
    // connection where it routes it, across nodes; the TLS session is the pods' own.
    eventually("a.example reaches multi-a", || {
        let out = xtask(&["sandbox", "exec", "client-a", "--", "python3", "-c",
            "import socket, ssl\nc = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\nc.check_hostname = False\n\
             c.verify_mode = ssl.CERT_NONE\ns = c.wrap_socket(socket.create_connection(('10.96.0.120', 443), timeout=5), server_hostname='a.example')\n\
             s.sendall(b'x')\nprint(s.recv(100).decode())"]);
        String::from_utf8_lossy(&out.stdout).trim() == "multi-a:x"
    });
    let lines =
        |prefix: &str| -> String { (0..10).map(|i| format!("{prefix}:ping {i}\n")).collect() };
    assert_eq!(tls_answers("a.example", 10), lines("multi-a"));
    assert_eq!(tls_answers("b.example", 10), lines("multi-b"));
    assert_eq!(
        tls_answers("x.B.example", 10),
        lines("multi-b"),
        "a wildcard, any case"
    );
    // A hostile hello (a record longer than the limit, then garbage) names nothing: it
    // goes to the Service as it is, whose TLS refuses it (closed or reset, never left
    // hanging), and the agent goes on routing.
    let hostile = r#"import socket
s = socket.create_connection(('10.96.0.120', 443), timeout=10)
s.sendall(b'\x16\x03\x01\xff\xff\x01\xff\xff\xff' + bytes(range(256)) * 80)
answered = b''
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        answered += chunk
except ConnectionResetError:
    pass
print('closed, answered', len(answered) < 100)"#;
    let out = ok(
        xtask(&[
            "sandbox", "exec", "client-a", "--", "python3", "-c", hostile,
        ]),
        "a hostile ClientHello",
    );
    assert_eq!(out.trim(), "closed, answered True");
    let three: String = (0..3).map(|i| format!("multi-a:ping {i}\n")).collect();
    assert_eq!(tls_answers("a.example", 3), three);
    let shown = on_node("node-a", &["meshctl", "routes", "demo/multi"]);
    for line in [
        "  tls sni a.example      → multi.demo.svc.cluster.local subset a 100%",
        "  tls sni *.b.example,b.example → multi.demo.svc.cluster.local subset b 100%",
        "port 443 (10.96.0.120:443, sniffed when routes need it)",
    ] {
        assert!(shown.lines().any(|l| l == line), "{line:?} in\n{shown}");
    }

    // An HTTP port no Service declares, sniffed: its requests are routed one by one on a
    // kept-alive connection by the VirtualService's header match.
    let multi =
        |headers: &str| l7_requests("http://10.96.0.120:80/", 20, headers, "keepalive").counts;
    let only = |key: &str| std::collections::BTreeMap::from([(key.to_owned(), 20u64)]);
    assert_eq!(multi(r#"{"x-beta": "on"}"#), only("200 multi-b"));
    assert_eq!(multi("{}"), only("200 multi-a"));
    let routed = sample(
        &metrics("node-a"),
        "mesh_routed_requests_total",
        &[
            ("destination_service", "multi.demo.svc.cluster.local"),
            ("route", "beta"),
            ("response_code", "200"),
            ("response_flags", "-"),
        ],
    );
    assert_eq!(routed, Some(20.0));

    // A server-first protocol on such a port: the client says nothing until the banner
    // comes, which the sniffing's short wait lets through.
    let banner = in_pod(
        "client-a",
        "python3 -c \"import socket\ns = socket.create_connection(('10.96.0.120', 7000), timeout=10)\n\
         f = s.makefile('rb')\nb = f.readline().decode()\ns.sendall(b'hi')\nprint(b.strip(), s.recv(100).decode())\"",
    );
    let pod = banner
        .split_whitespace()
        .nth(1)
        .expect("a banner")
        .to_owned();
    assert!(pod == "multi-a" || pod == "multi-b", "{banner}");
    assert_eq!(banner.trim(), format!("banner {pod} {pod}:hi"));

    // CORS on the reviews routes, and /api delegated to a VirtualService without hosts
    // that splits by header.
    kubectl("apply", "reviews-v1", &reviews_pod("v1", "node-a"));
    kubectl("apply", "reviews-v2", &reviews_pod("v2", "node-b"));
    kubectl("apply", "reviews-v3", &reviews_pod("v3", "node-b"));
    kubectl("apply", "reviews", REVIEWS);
    kubectl(
        "apply",
        "routes",
        &format!(
            "{}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews-api, namespace: demo}}
spec:
  http:
  - name: api-beta
    match: [{{headers: {{x-beta: {{exact: 'on'}}}}}}]
    route: [{{destination: {{host: reviews, subset: v3}}}}]
  - name: api-stable
    route: [{{destination: {{host: reviews, subset: v2}}}}]
",
            reviews_routes(
                "  - name: api\n    match: [{uri: {prefix: /api}}]\n    \
                 delegate: {name: reviews-api, namespace: demo}\n  \
                 - name: site\n    corsPolicy:\n      \
                 allowOrigins: [{exact: 'https://shop.example'}, {regex: 'https://[a-z]+[.]partner[.]example'}]\n      \
                 allowMethods: [GET, POST]\n      allowHeaders: [x-token]\n      exposeHeaders: [x-served-by]\n      \
                 maxAge: 1h\n      allowCredentials: true\n    \
                 route: [{destination: {host: reviews, subset: v1}}]\n",
            )
        ),
    );
    eventually("the delegated split applies", || {
        reviews("/api/items", 5, r#"{"x-beta": "on"}"#, "new").count("200 reviews-v3") == 5
    });
    let beta = reviews("/api/items", 30, r#"{"x-beta": "on"}"#, "keepalive");
    assert_eq!(beta.count("200 reviews-v3"), 30, "{:?}", beta.counts);
    let stable = reviews("/api/items", 30, "{}", "keepalive");
    assert_eq!(stable.count("200 reviews-v2"), 30, "{:?}", stable.counts);
    // The root's match holds as well: a beta header elsewhere is the site's.
    let site = reviews("/index", 30, r#"{"x-beta": "on"}"#, "keepalive");
    assert_eq!(site.count("200 reviews-v1"), 30, "{:?}", site.counts);

    // A preflight from an allowed origin is answered by the mesh; one from another
    // origin goes to the backend (unmatchedPreflights FORWARD); an actual request's
    // answer carries the CORS headers.
    let preflight = |origin: &str, host: &str| {
        curl_head(&format!(
            "-X OPTIONS -H 'Host: {host}' -H 'Origin: {origin}' \
             -H 'Access-Control-Request-Method: POST' http://10.96.0.110:9080/index"
        ))
    };
    let answered = preflight("https://app.partner.example", "allowed-preflight");
    let mut head: Vec<&str> = answered
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("access-control-") || l.starts_with("http/"))
        .collect();
    head.sort();
    assert_eq!(
        head,
        [
            "access-control-allow-credentials: true",
            "access-control-allow-headers: x-token",
            "access-control-allow-methods: get,post",
            "access-control-allow-origin: https://app.partner.example",
            "access-control-max-age: 3600",
            "http/1.1 200 ok",
        ],
        "{answered}"
    );
    assert!(!answered.contains("x-served-by"), "{answered}");
    let forwarded = preflight("https://evil.example", "other-preflight");
    assert!(forwarded.contains("x-served-by: reviews-v1"), "{forwarded}");
    assert!(!forwarded.contains("access-control-"), "{forwarded}");
    let v1 = pod_ip(&status_json(), "reviews-v1");
    let seen = in_pod("client-a", &format!("curl -s http://{v1}:9080/seen"));
    let seen: serde_json::Value = serde_json::from_str(&seen).expect("seen");
    assert_eq!(seen["other-preflight"], 1, "{seen}");
    assert!(seen.get("allowed-preflight").is_none(), "{seen}");
    let actual = curl_head("-H 'Origin: https://shop.example' http://10.96.0.110:9080/index");
    assert!(actual.contains("x-served-by: reviews-v1"), "{actual}");
    assert!(
        actual.contains("access-control-allow-origin: https://shop.example\r\n"),
        "{actual}"
    );
    assert!(
        actual.contains("access-control-allow-credentials: true"),
        "{actual}"
    );
    assert!(
        actual.contains("access-control-expose-headers: x-served-by"),
        "{actual}"
    );
    let shown = on_node("node-a", &["meshctl", "routes", "demo/reviews"]);
    assert!(
        shown.lines().any(|l| l.trim()
            == "CORS origins [\"exact https://shop.example\",\"regex ^(?:https://[a-z]+[.]partner[.]example)$\"], \
                methods GET,POST, headers x-token, expose x-served-by, max age 3600, credentials true"),
        "{shown}"
    );
    let foreign = curl_head("-H 'Origin: https://evil.example' http://10.96.0.110:9080/index");
    assert!(foreign.contains("x-served-by: reviews-v1"), "{foreign}");
    assert!(!foreign.contains("access-control-"), "{foreign}");
}

#[test]
fn request_metrics_are_reported_by_the_source_and_the_destination_agent() {
    let _sandbox = Sandbox::up();
    kubectl("apply", "reviews-v1", &reviews_pod("v1", "node-a"));
    kubectl("apply", "reviews-v2", &reviews_pod("v2", "node-b"));
    kubectl("apply", "reviews", REVIEWS);
    kubectl(
        "apply",
        "routes",
        &reviews_routes(
            "  - name: halves\n    route:\n    - {destination: {host: reviews, subset: v1}, weight: 50}\n    \
             - {destination: {host: reviews, subset: v2}, weight: 50}\n",
        ),
    );
    apply_mesh_request_metrics();
    let service = ("destination_service", "reviews.demo.svc.cluster.local");
    let source = |version: &str| -> f64 {
        total(
            &metrics("node-a"),
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "client-a"),
                service,
                ("destination_workload", &format!("reviews-{version}")),
                ("destination_version", version),
                ("response_code", "200"),
            ],
        )
    };
    let destination = |node: &str, version: &str, security: &str| -> f64 {
        total(
            &metrics(node),
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("source_workload", "client-a"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/demo/sa/client",
                ),
                service,
                ("destination_workload", &format!("reviews-{version}")),
                ("connection_security_policy", security),
                ("response_code", "200"),
            ],
        )
    };
    // Both pods answer, routed, and each destination agent reports what it serves.
    eventually("both versions answer", || {
        let answers = reviews("/", 20, "{}", "new");
        answers.count("200 reviews-v1") > 0 && answers.count("200 reviews-v2") > 0
    });
    eventually("each destination agent reports what it serves", || {
        reviews("/", 10, "{}", "new");
        destination("node-a", "v1", "none") > 0.0 && destination("node-b", "v2", "mutual_tls") > 0.0
    });

    let before = [
        source("v1"),
        source("v2"),
        destination("node-a", "v1", "none"),
        destination("node-b", "v2", "mutual_tls"),
    ];
    let answers = reviews("/", 200, "{}", "keepalive");
    let (v1, v2) = (
        answers.count("200 reviews-v1") as f64,
        answers.count("200 reviews-v2") as f64,
    );
    assert_eq!(v1 + v2, 200.0, "{:?}", answers.counts);
    // The last response is counted once its last byte is out: a moment after the client
    // has it.
    let counted = || {
        [
            source("v1") - before[0],
            source("v2") - before[1],
            destination("node-a", "v1", "none") - before[2],
            destination("node-b", "v2", "mutual_tls") - before[3],
        ]
    };
    eventually("every request is counted once by each reporter", || {
        counted() == [v1, v2, v1, v2]
    });
    let node_a = metrics("node-a");
    let latency = total(
        &node_a,
        "istio_request_duration_milliseconds_count",
        &[
            ("reporter", "source"),
            service,
            ("destination_workload", "reviews-v1"),
        ],
    );
    assert_eq!(latency, source("v1"), "one duration per request");
    assert!(
        sample(
            &node_a,
            "istio_response_bytes_sum",
            &[
                ("reporter", "source"),
                ("destination_workload", "reviews-v1")
            ],
        )
        .is_some_and(|bytes| bytes > 0.0),
        "response sizes are recorded"
    );
    promtool_check(&node_a);

    // Access logs: Istio's MeshConfig names the file and JSON, a Telemetry keeps only
    // the 5xx. Both ends of each request write a line.
    let log = "/run/mesh-sandbox/access.log";
    json_access_log_to(log);
    kubectl(
        "apply",
        "telemetry-logs",
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: errors, namespace: demo}\n\
         spec:\n  accessLogging:\n  - providers: [{name: envoy}]\n    filter: {expression: 'response.code >= 500'}\n",
    );
    let filtering = |node: &str| {
        on_node(node, &["curl", "-sf", "http://127.0.0.1:15000/config_dump"])
            .contains("response.code >= 500")
    };
    eventually("both agents log with the filter", || {
        filtering("node-a") && filtering("node-b")
    });
    let ok = reviews("/status/200", 10, "{}", "keepalive");
    let failed = reviews("/status/503", 4, "{}", "keepalive");
    assert_eq!((ok.total(), failed.total()), (10, 4));
    let lines = || logged_lines(log);
    // Istio's default retry policy tries a 503 three times: each client request is one
    // line at the source and three at the destination.
    eventually("the 503s, from both ends", || lines().len() >= 16);
    let logged = lines();
    assert_eq!(logged.len(), 16, "{logged:?}");
    let cluster =
        |line: &serde_json::Value| line["upstream_cluster"].as_str().unwrap_or("").to_owned();
    for line in &logged {
        assert_eq!(line["response_code"], 503, "{line}");
        assert_eq!(line["path"], "/status/503", "{line}");
        assert_eq!(line["method"], "GET", "{line}");
    }
    let outbound: Vec<_> = logged
        .iter()
        .filter(|l| cluster(l).starts_with("outbound|9080|v"))
        .collect();
    let inbound = logged
        .iter()
        .filter(|l| cluster(l) == "inbound|9080||")
        .count();
    assert_eq!((outbound.len(), inbound), (4, 12), "{logged:?}");
    for line in outbound {
        assert_eq!(line["response_flags"], "URX", "{line}");
        assert_eq!(line["route_name"], "halves", "{line}");
        assert_eq!(
            line["downstream_local_address"], "10.96.0.110:9080",
            "{line}"
        );
    }

    // A Telemetry that turns the server side off for the namespace: the destination
    // agents stop counting, the source agent goes on; and labels the TCP connections
    // its clients open by the address they dialled.
    kubectl(
        "apply",
        "telemetry-demo",
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: no-server, namespace: demo}\n\
         spec:\n  metrics:\n  - overrides:\n    - match: {mode: SERVER}\n      disabled: true\n    \
         - match: {metric: TCP_OPENED_CONNECTIONS, mode: CLIENT}\n      tagOverrides: {to: {value: destination.address}}\n",
    );
    let quiet = |node: &str| {
        on_node(node, &["curl", "-sf", "http://127.0.0.1:15000/config_dump"])
            .contains("demo/no-server")
    };
    eventually("both agents serve the new Telemetry", || {
        quiet("node-a") && quiet("node-b")
    });
    let (server_before, source_before) = (
        destination("node-b", "v2", "mutual_tls"),
        source("v1") + source("v2"),
    );
    let answers = reviews("/", 40, "{}", "new");
    assert_eq!(answers.total(), 40, "{:?}", answers.counts);
    eventually("the source still counts", || {
        source("v1") + source("v2") == source_before + 40.0
    });
    assert_eq!(destination("node-b", "v2", "mutual_tls"), server_before);
    // Each of the 40 connections client-a opened is counted under the address it
    // dialled, the label the Telemetry computes per connection.
    eventually_eq(
        "client-a's connections to reviews, labelled by the dialled address",
        40.0,
        || {
            total(
                &metrics("node-a"),
                "istio_tcp_connections_opened_total",
                &[
                    ("reporter", "source"),
                    ("source_workload", "client-a"),
                    ("to", "10.96.0.110:9080"),
                ],
            )
        },
    );
}

/// Tracing for the whole mesh, to the sandbox's Jaeger (MeshConfig's `jaeger` provider),
/// every request sampled.
const MESH_TRACING: &str = "\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-tracing, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: jaeger}]
    randomSamplingPercentage: 100
    customTags:
      sandbox: {literal: {value: 'yes'}}
";

/// reviews' server spans go to the same Jaeger over OTLP/HTTP, while every other span goes
/// over OTLP/gRPC (MeshConfig's `jaeger` provider sets no `http`): a trace crossing both
/// needs both exports to work.
const REVIEWS_TRACING_OVER_HTTP: &str = "\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: reviews-over-http, namespace: demo}
spec:
  selector: {matchLabels: {app: reviews}}
  tracing:
  - match: {mode: SERVER}
    providers: [{name: jaeger-http}]
    randomSamplingPercentage: 100
    customTags:
      sandbox: {literal: {value: 'yes'}}
";

/// The trace `id` as Jaeger's query API returns it, once it holds `spans` spans.
fn jaeger_trace(query: &str, id: &str, spans: usize) -> serde_json::Value {
    let mut found = serde_json::Value::Null;
    eventually(&format!("Jaeger holds {spans} spans of trace {id}"), || {
        let out = xtask(&[
            "sandbox",
            "exec",
            "--node",
            "node-a",
            "--",
            "curl",
            "-sf",
            &format!("{query}/api/traces/{id}"),
        ]);
        if !out.status.success() {
            return false;
        }
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return false;
        };
        found = answer["data"][0].clone();
        found["spans"].as_array().map_or(0, Vec::len) >= spans
    });
    found
}

/// The value of a span's tag (Jaeger's JSON: `tags: [{key, type, value}]`).
fn tag(span: &serde_json::Value, key: &str) -> Option<String> {
    span["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| match &t["value"] {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
}

/// The span id a span is the child of.
fn parent_of(span: &serde_json::Value) -> Option<String> {
    span["references"]
        .as_array()?
        .iter()
        .find(|r| r["refType"] == "CHILD_OF")
        .and_then(|r| r["spanID"].as_str())
        .map(str::to_owned)
}

/// The `traceparent` fields the backend received: trace id and parent span id.
fn received_traceparent(echo: &serde_json::Value) -> (String, String) {
    let header = echo["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent reached the backend: {echo}"));
    let fields: Vec<&str> = header.split('-').collect();
    assert_eq!(fields.len(), 4, "{header}");
    assert_eq!(fields[3], "01", "sampled: {header}");
    (fields[1].to_owned(), fields[2].to_owned())
}

#[test]
fn a_traced_request_keeps_its_trace_across_nodes_and_jaeger_holds_both_spans() {
    let _sandbox = Sandbox::up();
    let status = status_json();
    let query = status["jaeger"]["query"]
        .as_str()
        .expect("the status names Jaeger's query API")
        .to_owned();
    assert_eq!(query, "http://10.200.0.252:16686");
    assert_eq!(status["jaeger"]["otlp"], "http://10.200.0.252:4318");
    let client_ip = pod_ip(&status, "client-a");
    reviews_v2_on_node_b();
    kubectl("apply", "tracing", MESH_TRACING);
    kubectl("apply", "reviews-tracing", REVIEWS_TRACING_OVER_HTTP);
    // (decided by, export protocol) of each local workload's tracing on `side`.
    let tracing = |node: &str, side: &str| -> Vec<(String, String)> {
        let dump = on_node(node, &["curl", "-sf", "http://127.0.0.1:15000/config_dump"]);
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap_or_default();
        let Some(workloads) = dump["security"].as_object() else {
            return Vec::new();
        };
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        workloads
            .values()
            .map(|w| &w["telemetry"][side])
            .map(|t| (text(&t["decided_by"]), text(&t["collector"]["protocol"])))
            .collect()
    };
    eventually(
        "client-a's agent traces over gRPC, reviews' over HTTP",
        || {
            let grpc = ("istio-system/mesh-tracing".to_owned(), "grpc".to_owned());
            let http = ("demo/reviews-over-http".to_owned(), "http".to_owned());
            tracing("node-a", "client_tracing").contains(&grpc)
                && tracing("node-b", "server_tracing").contains(&http)
        },
    );
    eventually("reviews-v2 answers, routed", || {
        reviews("/", 1, "{}", "new").count("200 reviews-v2") == 1
    });

    // A request that arrives with a sampled W3C context keeps its trace id end to end.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let headers =
        format!(r#"{{"traceparent": "00-{trace_id}-{caller}-01", "user-agent": "tracer/1"}}"#);
    let answers = reviews("/traced", 1, &headers, "new");
    assert_eq!(answers.count("200 reviews-v2"), 1, "{:?}", answers.counts);
    let echo = answers.first_echo();
    let (seen_trace, seen_parent) = received_traceparent(&echo);
    assert_eq!(seen_trace, trace_id, "the backend sees the same trace");
    let request_id = echo["headers"]["x-request-id"]
        .as_str()
        .unwrap_or_else(|| panic!("no x-request-id reached the backend: {echo}"))
        .to_owned();
    assert_eq!(request_id.len(), 36, "a UUID: {request_id}");

    let trace = jaeger_trace(&query, trace_id, 2);
    let spans = trace["spans"].as_array().expect("spans").clone();
    assert_eq!(spans.len(), 2, "{trace}");
    let kind = |span: &serde_json::Value| tag(span, "span.kind").unwrap_or_default();
    let client = spans
        .iter()
        .find(|s| kind(s) == "client")
        .expect("a client span");
    let server = spans
        .iter()
        .find(|s| kind(s) == "server")
        .expect("a server span");
    let service = |span: &serde_json::Value| {
        let process = span["processID"].as_str().unwrap_or_default();
        trace["processes"][process]["serviceName"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // The source agent's client span is the caller's child; the destination agent's
    // server span is the client span's child, and the parent the backend sees.
    assert_eq!(parent_of(client).as_deref(), Some(caller), "{client}");
    assert_eq!(
        parent_of(server),
        client["spanID"].as_str().map(str::to_owned),
        "{server}"
    );
    assert_eq!(server["spanID"].as_str(), Some(seen_parent.as_str()));
    assert_eq!(
        client["operationName"],
        "reviews.demo.svc.cluster.local:9080/*"
    );
    assert_eq!(
        server["operationName"],
        "reviews.demo.svc.cluster.local:9080/*"
    );
    assert_eq!(service(client), "client.demo");
    assert_eq!(service(server), "reviews.demo");
    for span in [client, server] {
        for (key, value) in [
            ("http.method", "GET"),
            ("http.url", "http://10.96.0.110:9080/traced"),
            ("http.status_code", "200"),
            ("http.protocol", "HTTP/1.1"),
            ("user_agent", "tracer/1"),
            ("component", "proxy"),
            ("response_flags", "-"),
            ("istio.mesh_id", "cluster.local"),
            ("istio.namespace", "demo"),
            ("sandbox", "yes"),
        ] {
            assert_eq!(tag(span, key).as_deref(), Some(value), "{key} in {span}");
        }
        assert_eq!(tag(span, "guid:x-request-id"), Some(request_id.clone()));
        assert_eq!(tag(span, "error"), None, "{span}");
    }
    assert_eq!(
        tag(client, "istio.canonical_service").as_deref(),
        Some("client")
    );
    assert_eq!(
        tag(client, "upstream_cluster").as_deref(),
        Some("outbound|9080|v2|reviews.demo.svc.cluster.local")
    );
    assert_eq!(tag(client, "peer.address"), Some(client_ip.clone()));
    assert_eq!(
        tag(server, "istio.canonical_service").as_deref(),
        Some("reviews")
    );
    assert_eq!(
        tag(server, "istio.canonical_revision").as_deref(),
        Some("v2")
    );
    assert_eq!(
        tag(server, "upstream_cluster").as_deref(),
        Some("inbound|9080||")
    );
    assert_eq!(tag(server, "peer.address"), Some(client_ip.clone()));
    assert!(
        tag(server, "node_id")
            .is_some_and(|n| n.starts_with("sidecar~10.244.2.") && n.contains("~reviews-v2.demo~")),
        "{server}"
    );

    // Without a context, at 100% sampling, the source agent starts the trace: its client
    // span is the root.
    let fresh = reviews("/fresh", 1, "{}", "new");
    let (fresh_trace, fresh_parent) = received_traceparent(&fresh.first_echo());
    let trace = jaeger_trace(&query, &fresh_trace, 2);
    let spans = trace["spans"].as_array().expect("spans");
    assert_eq!(spans.len(), 2, "{trace}");
    let root = spans
        .iter()
        .find(|s| kind(s) == "client")
        .expect("a client span");
    let child = spans
        .iter()
        .find(|s| kind(s) == "server")
        .expect("a server span");
    assert_eq!(parent_of(root), None, "{root}");
    assert_eq!(parent_of(child), root["spanID"].as_str().map(str::to_owned));
    assert_eq!(child["spanID"].as_str(), Some(fresh_parent.as_str()));
    // Nothing was dropped or refused on the way.
    for node in ["node-a", "node-b"] {
        let text = metrics(node);
        for counter in [
            "mesh_spans_dropped_total 0",
            "mesh_spans_export_failed_total 0",
        ] {
            assert!(text.lines().any(|l| l == counter), "{node}: {counter}");
        }
    }
}

/// The series of an instant PromQL `query` to the sandbox's Prometheus at `url` (its
/// HTTP API, asked from node-a: the host has no route to the sandbox), each keyed by the
/// values of its `labels` joined by spaces.
fn promql(url: &str, query: &str, labels: &[&str]) -> std::collections::BTreeMap<String, f64> {
    let answer: serde_json::Value = serde_json::from_str(&on_node(
        "node-a",
        &[
            "curl",
            "-sf",
            "--get",
            "--data-urlencode",
            &format!("query={query}"),
            &format!("{url}/api/v1/query"),
        ],
    ))
    .expect("Prometheus answers JSON");
    assert_eq!(answer["status"], "success", "{query}: {answer}");
    answer["data"]["result"]
        .as_array()
        .unwrap_or_else(|| panic!("{query}: no vector in {answer}"))
        .iter()
        .map(|series| {
            let key: Vec<&str> = labels
                .iter()
                .map(|l| series["metric"][l].as_str().unwrap_or("-"))
                .collect();
            let value = series["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{query}: no value in {series}"));
            (key.join(" "), value)
        })
        .collect()
}

/// `pairs` as the map `promql` returns.
fn series(pairs: &[(&str, f64)]) -> std::collections::BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[test]
fn prometheus_scrapes_every_agent_and_answers_the_golden_signals() {
    let _sandbox = Sandbox::up_with(&[("MESH_METRICS_SERIES_EXPIRY", "3s")]);
    let status = status_json();
    let url = status["prometheus"]["url"]
        .as_str()
        .expect("the status names Prometheus")
        .to_owned();
    assert_eq!(url, "http://10.200.0.251:9090");
    // Every agent is a target that answers, named by its node and its metrics address.
    eventually_eq(
        "Prometheus scrapes every agent",
        series(&[
            ("node-a 10.200.0.1:15020", 1.0),
            ("node-b 10.200.0.2:15020", 1.0),
        ]),
        || promql(&url, r#"up{job="mesh-agent"}"#, &["node", "instance"]),
    );

    reviews_v2_on_node_b();
    apply_mesh_request_metrics();
    // Until the routes and the Telemetry are in place, requests may fail or go
    // uncounted; a code of its own (202) keeps that warm-up out of the counts below.
    let warm = |node: &str, reporter: &str| {
        total(
            &metrics(node),
            "istio_requests_total",
            &[
                ("reporter", reporter),
                ("destination_service_name", "reviews"),
                ("response_code", "202"),
            ],
        )
    };
    eventually_eq(
        "both agents count reviews-v2's answers",
        (1u64, true, true),
        || {
            (
                reviews("/status/202", 1, "{}", "new").count("202 reviews-v2"),
                warm("node-a", "source") > 0.0,
                warm("node-b", "destination") > 0.0,
            )
        },
    );

    let by_code = |reporter: &str| {
        promql(
            &url,
            &format!(
                r#"sum by (response_code) (istio_requests_total{{reporter="{reporter}",destination_service_name="reviews",response_code=~"200|404"}})"#
            ),
            &["response_code"],
        )
    };
    // Two batches of 200s, the second after Prometheus holds the first: a rate needs the
    // counter to grow between two samples (a series born at 30 has none).
    let first = reviews("/", 15, "{}", "keepalive");
    assert_eq!(first.count("200 reviews-v2"), 15, "{:?}", first.counts);
    for reporter in ["source", "destination"] {
        eventually_eq(
            &format!("Prometheus holds the first 15 requests ({reporter})"),
            series(&[("200", 15.0)]),
            || by_code(reporter),
        );
    }
    let more = reviews("/", 15, "{}", "keepalive");
    let missing = reviews("/status/404", 10, "{}", "keepalive");
    assert_eq!(
        (
            more.count("200 reviews-v2"),
            missing.count("404 reviews-v2")
        ),
        (15, 10),
        "{:?} {:?}",
        more.counts,
        missing.counts
    );
    for reporter in ["source", "destination"] {
        eventually_eq(
            &format!("Prometheus holds every request by code ({reporter})"),
            series(&[("200", 30.0), ("404", 10.0)]),
            || by_code(reporter),
        );
    }
    let rate = promql(
        &url,
        r#"sum by (destination_service) (rate(istio_requests_total{reporter="source",destination_service_name="reviews",response_code="200"}[1m]))"#,
        &["destination_service"],
    );
    assert!(
        rate.get("reviews.demo.svc.cluster.local")
            .is_some_and(|r| *r > 0.0),
        "request rate: {rate:?}"
    );
    let p99 = promql(
        &url,
        r#"histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds_bucket{reporter="source",destination_service_name="reviews"}[1m])))"#,
        &[],
    );
    assert!(
        p99.get("").is_some_and(|ms| ms.is_finite() && *ms > 0.0),
        "p99 latency: {p99:?}"
    );

    // The pod goes: once idle for the expiry time (3 s here), its series leave both
    // agents' metrics at the next sweep, and Prometheus marks them stale.
    let series_of_v2 = |node: &str| {
        metrics(node)
            .lines()
            .filter(|line| {
                line.starts_with("istio_") && line.contains(r#"destination_workload="reviews-v2""#)
            })
            .count()
    };
    assert!(series_of_v2("node-a") > 0 && series_of_v2("node-b") > 0);
    kubectl("delete", "reviews-v2", &reviews_pod("v2", "node-b"));
    for node in ["node-a", "node-b"] {
        eventually_eq(&format!("{node} forgets reviews-v2's series"), 0, || {
            series_of_v2(node)
        });
    }
    eventually_eq(
        "Prometheus holds no live series of reviews-v2",
        series(&[]),
        || {
            promql(
                &url,
                r#"count by (node) (istio_requests_total{destination_workload="reviews-v2"})"#,
                &["node"],
            )
        },
    );
}

/// `count` pods `spare-1`… on node-a serving HTTP on 8080, outside every Service.
/// Pods `spare-1` to `spare-<count>` on node-a; the last without a readiness probe: it
/// is the one that does not fit in a full workload map, whose answers cannot leave its
/// veth, so it would never become ready (the signal Kubernetes should get).
fn spare_pods(count: usize) -> String {
    (1..=count)
        .map(|n| {
            let probe = if n < count {
                "    readinessProbe: {tcpSocket: {port: 8080}}\n"
            } else {
                ""
            };
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: spare-{n}, namespace: demo, labels: {{app: spare}}}}\n\
                 spec:\n  nodeName: node-a\n  serviceAccountName: web\n  containers:\n  \
                 - name: web\n    command: [sh, -c, 'echo $POD_NAME > name && exec python3 -m http.server 8080']\n{probe}"
            )
        })
        .collect()
}

/// The HTTP status and body of the readiness endpoint of `node`'s agent.
fn readiness(node: &str) -> String {
    on_node(
        node,
        &[
            "curl",
            "-s",
            "-w",
            " %{http_code}",
            "http://127.0.0.1:15021/healthz/ready",
        ],
    )
}

/// Whether `url` answers within two seconds, fetched from `pod` or, with `--node`, from a
/// node namespace.
fn reachable(target: &[&str], url: &str) -> bool {
    let mut all = vec!["sandbox", "exec"];
    all.extend_from_slice(target);
    all.extend_from_slice(&["--", "curl", "-sf", "-m", "2", url]);
    xtask(&all).status.success()
}

#[test]
fn kernel_maps_that_fill_up_fail_closed_for_the_pods_that_do_not_fit() {
    // Four workload entries per node: the default cluster's four pods fit exactly.
    let _sandbox = Sandbox::up_with(&[("MESH_MAX_WORKLOADS", "4")]);
    let workloads_map =
        |node: &str, name: &str| sample(&metrics(node), name, &[("map", "MESH_WORKLOADS")]);
    assert_eq!(workloads_map("node-a", "mesh_map_capacity"), Some(4.0));
    assert_eq!(workloads_map("node-a", "mesh_map_entries"), Some(4.0));
    assert_eq!(
        workloads_map("node-a", "mesh_map_refused_entries"),
        Some(0.0)
    );
    assert!(readiness("node-a").ends_with(" 200"));

    // Three more pods on node-a: it needs 7 entries (5 local pods, 2 on node-b). The 4
    // lowest local addresses fit; spare-3 (the highest) and both remote pods do not.
    kubectl("apply", "spares", &spare_pods(3));
    eventually("node-a reports its full workload map", || {
        workloads_map("node-a", "mesh_map_refused_entries") == Some(3.0)
    });
    assert_eq!(workloads_map("node-a", "mesh_map_entries"), Some(4.0));
    let status = agent_status("node-a");
    assert_eq!(status["ready"], false);
    let reason = "MESH_WORKLOADS full: 3 of 7 entries refused (capacity 4)";
    assert_eq!(status["not_ready_reason"], reason);
    assert_eq!(status["capture_unknown"], true);
    let failing: Vec<&String> = status["failing_closed"]
        .as_object()
        .expect("failing_closed")
        .keys()
        .collect();
    assert_eq!(failing, ["demo/spare-3"]);
    assert_eq!(readiness("node-a"), format!("not ready: {reason}\n 503"));
    let (code, text) = on_node_answer("node-a", &["meshctl", "status"]);
    assert_eq!(code, Some(5), "meshctl status exits with 5 when not ready");
    assert!(
        text.contains("FULL: 3 refused") && text.contains("failing closed demo/spare-3"),
        "{text}"
    );
    // node-b needs the same 7 entries (2 local, 5 on node-a): full too, its pods first.
    eventually("node-b reports its full workload map", || {
        workloads_map("node-b", "mesh_map_refused_entries") == Some(3.0)
    });

    let status = status_json();
    let (spare_2, spare_3) = (pod_ip(&status, "spare-2"), pod_ip(&status, "spare-3"));
    let web_b = pod_ip(&status, "web-b");

    // The pod that did not fit cannot send (its source is no one's: dropped at its veth)…
    let spoofed = tc_packets("node-a", "drop_spoofed_source");
    assert!(!reachable(
        &["spare-3"],
        &format!("http://{web_b}:8080/name")
    ));
    assert!(tc_packets("node-a", "drop_spoofed_source") > spoofed);
    // …and plaintext from its node cannot reach it, while it reaches spare-2 (PERMISSIVE)
    // next to it: the difference is the map entry.
    let no_workload = tc_packets("node-a", "drop_no_workload");
    assert!(reachable(
        &["--node", "node-a"],
        &format!("http://{spare_2}:8080/name")
    ));
    assert!(!reachable(
        &["--node", "node-a"],
        &format!("http://{spare_3}:8080/name")
    ));
    assert!(tc_packets("node-a", "drop_no_workload") > no_workload);

    // The others keep working, judged: web-b is not in node-a's map, yet client-a's
    // connection to it is captured and tunnelled (not passed in plaintext).
    let tunnelled = || {
        sample(
            &metrics("node-a"),
            "mesh_connections_carried_total",
            &[("how", "tunnel")],
        )
        .unwrap_or(0.0)
    };
    let before = tunnelled();
    assert_eq!(
        in_pod(
            "client-a",
            &format!("curl -sf -m 10 http://{web_b}:8080/name")
        )
        .trim(),
        "web-b"
    );
    eventually("the connection to web-b was tunnelled", || {
        tunnelled() == before + 1.0
    });
    assert_eq!(
        in_pod(
            "client-a",
            &format!("curl -sf -m 10 http://{spare_2}:8080/name")
        )
        .trim(),
        "spare-2"
    );

    // Back within capacity: everything fits again and the agent is ready.
    kubectl("delete", "spares", &spare_pods(3));
    eventually("node-a's maps hold everything again", || {
        workloads_map("node-a", "mesh_map_refused_entries") == Some(0.0)
    });
    assert!(readiness("node-a").ends_with(" 200"));
    let status = agent_status("node-a");
    assert_eq!(status["capture_unknown"], false);
    assert_eq!(status["failing_closed"], serde_json::json!({}));
}

/// The (local, peer) ends of `node`'s established connections whose `filter` (`sport`
/// or `dport`) is the tunnel port, as `address:port` pairs.
fn tunnel_ends(node: &str, filter: &str) -> std::collections::BTreeSet<(String, String)> {
    on_node(
        node,
        &["ss", "-Htn", "state", "established", filter, "=", ":15008"],
    )
    .lines()
    .filter_map(|line| {
        let mut ends = line.split_whitespace().filter(|f| f.contains(':'));
        Some((ends.next()?.to_owned(), ends.next()?.to_owned()))
    })
    .collect()
}

#[test]
fn a_certificate_that_expires_under_a_pooled_connection_closes_it() {
    // Certificates live 4 s (renewed every 2 s): a pooled connection stands at most that.
    let _sandbox = Sandbox::up_with(&[("MESH_SANDBOX_CERT_TTL", "4s")]);
    let web_b = pod_ip(&status_json(), "web-b");
    let fetch = || {
        in_pod(
            "client-a",
            &format!("curl -sf -m 10 http://{web_b}:8080/name"),
        )
    };
    assert_eq!(fetch().trim(), "web-b");
    // node-a's ends (local, peer) of the pooled connection, and node-b's view of them.
    let first = tunnel_ends("node-a", "dport");
    assert!(
        !first.is_empty(),
        "no pooled HBONE connection after a request"
    );
    let seen_from_b: std::collections::BTreeSet<(String, String)> = first
        .iter()
        .map(|(local, peer)| (peer.clone(), local.clone()))
        .collect();
    assert!(tunnel_ends("node-b", "sport").is_superset(&seen_from_b));

    // No traffic from here on: the connection must end on its own, at both ends, once the
    // earlier of its certificates expires.
    eventually("the pooled connection closes at node-a", || {
        tunnel_ends("node-a", "dport").is_disjoint(&first)
    });
    eventually("and at node-b", || {
        tunnel_ends("node-b", "sport").is_disjoint(&seen_from_b)
    });

    // The next request makes a new connection, with the current certificates.
    assert_eq!(fetch().trim(), "web-b");
    let second = tunnel_ends("node-a", "dport");
    assert!(!second.is_empty() && second.is_disjoint(&first));
}

/// Traffic from client-a that runs until told to stop (`steady_client.py`).
struct Steady {
    child: std::process::Child,
    stop: PathBuf,
}

impl Steady {
    /// Starts `steady_client.py` with `args` (its mode first) and waits until its first
    /// exchange succeeded.
    fn start(name: &str, args: &[&str]) -> Steady {
        use std::io::BufRead;
        let stop = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("steady-{name}.stop"));
        let _ = std::fs::remove_file(&stop);
        let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
        command
            .args(["sandbox", "exec", "client-a", "--", "python3", "-c"])
            .arg(include_str!("steady_client.py"))
            .args(args)
            .arg(&stop)
            .current_dir(workspace())
            .stdout(std::process::Stdio::piped());
        let mut child = command.spawn().expect("steady client");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut first)
            .expect("read");
        assert_eq!(first.trim(), "started", "{name}: the traffic never flowed");
        Steady { child, stop }
    }

    /// Stops the traffic; what the client saw.
    fn finish(mut self) -> serde_json::Value {
        use std::io::Read;
        std::fs::write(&self.stop, "").expect("stop file");
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read");
        assert!(self.child.wait().expect("wait").success(), "{out}");
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}"))
    }
}

fn current_agent(node: &str) -> u64 {
    status_json()["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["agent"]["pid"].as_u64())
        .unwrap_or_else(|| panic!("{node}'s agent"))
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

#[test]
fn agents_replaced_under_traffic_drop_nothing_and_a_killed_one_is_back_at_once() {
    let _sandbox = Sandbox::up();
    kubectl("apply", "reviews-v1", &reviews_pod("v1", "node-b"));
    kubectl("apply", "reviews", REVIEWS);
    // Routed: node-a's agent serves the client's connection request by request.
    kubectl(
        "apply",
        "routes",
        &reviews_routes("  - route: [{destination: {host: reviews, subset: v1}}]\n"),
    );
    kubectl("apply", "local-echoes", &local_echoes());
    let status = status_json();
    let echo_b = pod_ip(&status, "echo-b");
    let echo_spliced = pod_ip(&status, "echo-spliced");
    eventually("reviews answers through its route", || {
        reviews("/", 1, "{}", "new").count("200 reviews-v1") == 1
            && sample(
                &metrics("node-a"),
                "mesh_routed_requests_total",
                &[("destination_service", "reviews.demo.svc.cluster.local")],
            )
            .is_some()
    });
    eventually("the local echo answers", || {
        echo_round_trip(&format!("{echo_spliced}:9000"), 1000) == "intact"
    });

    // A rolling update of both nodes' agents under three kinds of traffic: a TCP stream
    // across nodes (HBONE), a same-node stream spliced in the kernel, and HTTP/1.1 requests
    // on a kept-alive connection to a Service routed by node-a's agent.
    let across = Steady::start("across", &["echo", &echo_b, "9000"]);
    let local = Steady::start("local", &["echo", &echo_spliced, "9000"]);
    let requests = Steady::start("requests", &["http", "http://10.96.0.110:9080/"]);
    let mut replaced = Vec::new();
    for node in ["node-a", "node-b"] {
        let old = current_agent(node);
        ok(
            xtask(&["sandbox", "restart-agent", node, "--graceful"]),
            &format!("replacing {node}'s agent"),
        );
        let new = current_agent(node);
        assert_ne!(new, old, "{node}");
        // Still there: it drains the connections it carries instead of cutting them.
        assert!(alive(old), "{node}'s old agent {old} left its connections");
        replaced.push(old);
    }
    // New connections go to the new agents at once, on both nodes.
    assert_eq!(reviews("/", 20, "{}", "new").count("200 reviews-v1"), 20);
    assert_eq!(
        echo_round_trip(&format!("{echo_spliced}:9000"), 100_000),
        "intact"
    );
    let across = across.finish();
    let local = local.finish();
    let requests = requests.finish();
    assert_eq!(across["intact"], true, "{across}");
    assert_eq!(local["intact"], true, "{local}");
    assert_eq!(across["sent"], across["received"], "{across}");
    assert_eq!(requests["failed"], 0, "{requests}");
    // The kept-alive client was asked to reconnect (to node-a's new agent) after the
    // handover, once: node-b's agent carries none of its connections.
    assert_eq!(requests["connections"], 2, "{requests}");
    // Their connections done, the old agents leave on their own.
    for old in replaced {
        eventually(&format!("old agent {old} exits once drained"), || {
            !alive(old)
        });
    }

    // A crash under load: killed, started again by its supervisor; new connections work
    // as soon as it serves (the kernel failed closed meanwhile), with the maps and links
    // taken over. The requests in flight through the killed agent fail; the client's
    // next ones, on a new connection, succeed.
    let load = Steady::start("crash", &["http", "http://10.96.0.110:9080/"]);
    let killed = current_agent("node-a");
    let restarted = ok(
        xtask(&["sandbox", "restart-agent", "node-a"]),
        "killing node-a's agent",
    );
    eprintln!("{}", restarted.trim());
    assert!(!alive(killed));
    let load = load.finish();
    assert!(load["since_failure"].as_u64() >= Some(1), "{load}");
    assert_eq!(reviews("/", 20, "{}", "new").count("200 reviews-v1"), 20);
    assert_eq!(
        echo_round_trip(&format!("{echo_spliced}:9000"), 100_000),
        "intact"
    );
    assert_eq!(
        echo_round_trip(&format!("{echo_b}:9000"), 100_000),
        "intact"
    );
}

/// The Service `target` on node-b: `mesh-bench serve --echo` answers every request with
/// the head it received. Its policies judge host, path and headers, and its
/// RequestAuthentication sets `x-jwt-sub` from a verified token: the forms a hostile
/// client writes by hand must neither slip past them nor reach the backend other than as
/// judged.
fn target_and_policies(jwks_ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: ServiceAccount
metadata: {{name: target, namespace: demo}}
---
apiVersion: v1
kind: Pod
metadata: {{name: target-b, namespace: demo, labels: {{app: target}}}}
spec:
  nodeName: node-b
  serviceAccountName: target
  containers:
    - name: target
      command: [mesh-bench, serve, --listen, 0.0.0.0:8080, --echo]
      ports: [{{name: http, containerPort: 8080}}]
      readinessProbe: {{tcpSocket: {{port: 8080}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: target, namespace: demo}}
spec:
  clusterIP: 10.96.0.170
  selector: {{app: target}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: target-jwt, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: target}}}}
  jwtRules:
    - issuer: testing@secure.istio.io
      jwksUri: http://{jwks_ip}:8000/jwks.json
      outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: target-allow, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: target}}}}
  action: ALLOW
  rules:
    - to: [{{operation: {{paths: [\"/public/*\"]}}}}]
    - from: [{{source: {{requestPrincipals: [testing@secure.istio.io/testing@secure.istio.io]}}}}]
      to: [{{operation: {{paths: [\"/private/*\"]}}}}]
    - to: [{{operation: {{paths: [\"/vip/*\"]}}}}]
      when: [{{key: \"request.headers[x-jwt-sub]\", values: [testing@secure.istio.io]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: target-deny, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: target}}}}
  action: DENY
  rules:
    - to: [{{operation: {{paths: [\"/public/admin/*\"]}}}}]
    - to: [{{operation: {{hosts: [forbidden.example]}}}}]
    - when: [{{key: \"request.headers[x-user]\", values: [mallory]}}]
"
    )
}

/// One hand-written request of the hostile client (`raw_http.py`).
enum Raw<'a> {
    /// An HTTP/1.1 head, byte for byte (characters up to U+00FF are single bytes).
    H1(&'a str),
    /// HTTP/2 header fields in the order sent, pseudo-headers included.
    H2(&'a [(&'a str, &'a str)]),
}

/// Sends each request from `pod` to `address` on a connection of its own and returns
/// `(status, body)` per request (`(0, error)` when no response came).
fn raw_requests(pod: &str, address: &str, requests: &[Raw]) -> Vec<(u64, String)> {
    let (host, port) = address.split_once(':').expect("host:port");
    let cases: Vec<serde_json::Value> = requests
        .iter()
        .map(|r| match r {
            Raw::H1(head) => serde_json::json!({ "h1": head }),
            Raw::H2(fields) => serde_json::json!({ "h2": fields }),
        })
        .collect();
    let out = ok(
        xtask(&[
            "sandbox",
            "exec",
            pod,
            "--",
            "python3",
            "-c",
            include_str!("raw_http.py"),
            host,
            port,
            &serde_json::Value::from(cases).to_string(),
        ]),
        "raw requests",
    );
    let answers: Vec<serde_json::Value> = serde_json::from_str(&out).expect("answers JSON");
    answers
        .iter()
        .map(|a| {
            let text = a["body"].as_str().or(a["error"].as_str()).unwrap_or("");
            (a["status"].as_u64().expect("status"), text.to_owned())
        })
        .collect()
}

/// What the echo backend received: its target (the path and query; on HTTP/2 the
/// authority too, as `authority|path`) and every header field line, in order.
fn received(body: &str) -> (String, Vec<(String, String)>) {
    let echo: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not the backend's echo: {body}"));
    let target = match echo["authority"].as_str() {
        Some(authority) => format!("{authority}|{}", echo["target"].as_str().expect("target")),
        None => echo["target"].as_str().expect("target").to_owned(),
    };
    let headers = echo["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().expect("name").to_owned(),
                pair[1].as_str().expect("value").to_owned(),
            )
        })
        .collect();
    (target, headers)
}

/// An answer as the request-form test compares it: the status, and either the mesh's own
/// reply body or, for a request the backend served, `target` then one `name: value` line
/// per header field it received, sorted. The `x-request-id` the mesh gives every request
/// is random: shown as `*` when it is one UUID.
fn shown((status, body): &(u64, String)) -> (u64, String) {
    if !body.starts_with('{') {
        return (*status, body.clone());
    }
    let (target, headers) = received(body);
    let mut lines: Vec<String> = headers
        .iter()
        .map(|(n, v)| {
            let uuid = v.len() == 36 && v.chars().all(|c| c == '-' || c.is_ascii_hexdigit());
            if n == "x-request-id" && uuid {
                format!("{n}: *")
            } else {
                format!("{n}: {v}")
            }
        })
        .collect();
    lines.sort();
    lines.insert(0, target);
    (*status, lines.join("\n"))
}

#[test]
fn hand_written_requests_are_judged_as_the_backend_receives_them() {
    let _sandbox = Sandbox::up();
    kubectl("apply", "jwks", &jwks_server());
    let jwks_ip = pod_ip(&status_json(), "jwks-a");
    kubectl("apply", "target", &target_and_policies(&jwks_ip));
    let token = std::fs::read_to_string(workspace().join("mesh-agent/tests/testdata/jwt/demo.jwt"))
        .expect("demo token");
    let token = token.trim();
    let target = "10.96.0.170:80";
    eventually("the target Service answers and has the keys", || {
        let answers = raw_requests(
            "client-a",
            target,
            &[Raw::H1(&format!(
                "GET /private/a HTTP/1.1\r\nHost: target\r\nAuthorization: Bearer {token}\r\n\r\n"
            ))],
        );
        answers[0].0 == 200
    });

    let with_token = |head: &str| head.replace("TOKEN", token);
    let h1 = [
        // The baseline: served as sent.
        "GET /public/a HTTP/1.1\r\nHost: target\r\nX-User: alice\r\n\r\n".to_owned(),
        // Absolute-form: its authority is the host, judged and forwarded in `Host`.
        "GET http://target.demo/public/a HTTP/1.1\r\nHost: forbidden.example\r\n\r\n".to_owned(),
        "GET http://forbidden.example/public/a HTTP/1.1\r\nHost: target\r\n\r\n".to_owned(),
        // One form per host: case and a trailing dot do not walk around the DENY.
        "GET /public/a HTTP/1.1\r\nHost: FORBIDDEN.Example.\r\n\r\n".to_owned(),
        "GET /public/a HTTP/1.1\r\nHost: forbidden.example:80\r\n\r\n".to_owned(),
        // Ambiguous hosts: two of them, an empty label, userinfo.
        "GET /public/a HTTP/1.1\r\nHost: target\r\nHost: forbidden.example\r\n\r\n".to_owned(),
        "GET /public/a HTTP/1.1\r\nHost: forbidden..example\r\n\r\n".to_owned(),
        "GET /public/a HTTP/1.1\r\nHost: target@forbidden.example\r\n\r\n".to_owned(),
        "GET http://target@forbidden.example/public/a HTTP/1.1\r\nHost: target\r\n\r\n"
            .to_owned(),
        // Paths: judged in the form forwarded.
        "GET /public/%61dmin/x HTTP/1.1\r\nHost: target\r\n\r\n".to_owned(),
        "GET /public/x/..%2Fadmin/y HTTP/1.1\r\nHost: target\r\n\r\n".to_owned(),
        "GET /public//a/./b?q=%2F HTTP/1.1\r\nHost: target\r\n\r\n".to_owned(),
        "GET target:80 HTTP/1.1\r\nHost: target\r\n\r\n".to_owned(),
        "get /public/a HTTP/1.1\r\nHost: target\r\n\r\n".to_owned(),
        // Header values: UTF-8 is judged as text and forwarded as sent; other bytes
        // above 0x7F cannot be judged, so refused.
        "GET /public/a HTTP/1.1\r\nHost: target\r\nX-User: m\u{c3}\u{a4}llory\r\n\r\n".to_owned(),
        "GET /public/a HTTP/1.1\r\nHost: target\r\nX-User: mallory\u{ff}\r\n\r\n".to_owned(),
        "GET /public/a HTTP/1.1\r\nHost: target\r\nX-User: mallory\r\n\r\n".to_owned(),
        // Hop-by-hop: what `Connection` names is gone before judging, so neither the
        // policy nor the backend sees it; it may not name Host; upgrades are not carried.
        "GET /public/a HTTP/1.1\r\nHost: target\r\nConnection: x-user\r\nX-User: mallory\r\n\r\n"
            .to_owned(),
        "GET /public/a HTTP/1.1\r\nHost: target\r\nConnection: host\r\n\r\n".to_owned(),
        "GET /public/a HTTP/1.1\r\nHost: target\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nKeep-Alive: timeout=5\r\nTE: trailers, deflate\r\n\r\n"
            .to_owned(),
        with_token("GET /private/a HTTP/1.1\r\nHost: target\r\nConnection: authorization\r\nAuthorization: Bearer TOKEN\r\n\r\n"),
        with_token("GET /vip/a HTTP/1.1\r\nHost: target\r\nConnection: x-jwt-sub\r\nAuthorization: Bearer TOKEN\r\n\r\n"),
        // Tokens: one is verified, removed and turned into x-jwt-sub; two are ambiguous.
        with_token("GET /private/a HTTP/1.1\r\nHost: target\r\nAuthorization: Bearer TOKEN\r\nX-Jwt-Sub: admin\r\n\r\n"),
        with_token("GET /private/a HTTP/1.1\r\nHost: target\r\nAuthorization: Bearer TOKEN\r\nAuthorization: Bearer TOKEN\r\n\r\n"),
        with_token("GET /private/a?access_token=TOKEN&access_token=TOKEN HTTP/1.1\r\nHost: target\r\n\r\n"),
        with_token("GET /private/a?access_token=TOKEN HTTP/1.1\r\nHost: target\r\nAuthorization: Bearer TOKEN\r\n\r\n"),
        // Forged output headers: removed before judging, never forwarded.
        "GET /vip/a HTTP/1.1\r\nHost: target\r\nX-Jwt-Sub: testing@secure.istio.io\r\n\r\n"
            .to_owned(),
        "GET /public/a HTTP/1.1\r\nHost: target\r\nX-Jwt-Sub: testing@secure.istio.io\r\n\r\n"
            .to_owned(),
    ];
    let requests: Vec<Raw> = h1.iter().map(|h| Raw::H1(h)).collect();
    let answers: Vec<(u64, String)> = raw_requests("client-a", target, &requests)
        .iter()
        .map(shown)
        .collect();
    // What the backend received, as `shown` prints it: the target, then the header
    // lines given with the mesh's `x-request-id`, sorted.
    let served = |lines: &[&str]| {
        let mut headers: Vec<&str> = lines[1..].to_vec();
        headers.push("x-request-id: *");
        headers.sort();
        headers.insert(0, lines[0]);
        (200, headers.join("\n"))
    };
    let mesh = |status: u64, body: &str| (status, body.to_owned());
    let denied = mesh(403, "RBAC: access denied");
    let expected = vec![
        served(&["/public/a", "host: target", "x-user: alice"]),
        served(&["/public/a", "host: target.demo"]),
        denied.clone(),
        denied.clone(),
        denied.clone(),
        mesh(400, "Bad Request: multiple host headers"),
        mesh(400, "Bad Request: invalid host"),
        mesh(400, "Bad Request: invalid host"),
        mesh(400, "Bad Request: invalid host"),
        denied.clone(),
        denied.clone(),
        served(&["/public/a/b?q=%2F", "host: target"]),
        mesh(400, "Bad Request: invalid path"),
        mesh(400, "Bad Request: invalid method"),
        served(&["/public/a", "host: target", "x-user: m\u{e4}llory"]),
        mesh(400, "Bad Request: invalid header value"),
        denied.clone(),
        served(&["/public/a", "host: target"]),
        mesh(400, "Bad Request: invalid connection header"),
        served(&["/public/a", "host: target", "te: trailers"]),
        denied.clone(),
        served(&[
            "/vip/a",
            "host: target",
            "x-jwt-sub: testing@secure.istio.io",
        ]),
        served(&[
            "/private/a",
            "host: target",
            "x-jwt-sub: testing@secure.istio.io",
        ]),
        mesh(401, "Jwt verification fails"),
        mesh(401, "Jwt verification fails"),
        mesh(401, "Jwt verification fails"),
        denied.clone(),
        served(&["/public/a", "host: target"]),
    ];
    assert_eq!(answers, expected);

    // HTTP/2: `:authority` and `host` must agree, and the backend gets the authority once.
    fn get(
        authority: Option<&'static str>,
        path: &'static str,
    ) -> Vec<(&'static str, &'static str)> {
        let mut fields = vec![(":method", "GET"), (":scheme", "http")];
        if let Some(authority) = authority {
            fields.push((":authority", authority));
        }
        fields.push((":path", path));
        fields
    }
    fn with<'a>(
        mut fields: Vec<(&'a str, &'a str)>,
        more: &[(&'a str, &'a str)],
    ) -> Vec<(&'a str, &'a str)> {
        fields.extend_from_slice(more);
        fields
    }
    let bearer = format!("Bearer {token}");
    let bearer = bearer.as_str();
    let h2: Vec<Vec<(&str, &str)>> = vec![
        get(Some("target"), "/public/a"),
        with(
            get(Some("target"), "/public/a"),
            &[("host", "forbidden.example")],
        ),
        with(
            get(Some("forbidden.example"), "/public/a"),
            &[("host", "target")],
        ),
        with(get(Some("target"), "/public/a"), &[("host", "TARGET.")]),
        with(get(None, "/public/a"), &[("host", "forbidden.example")]),
        with(get(None, "/public/a"), &[("host", "target")]),
        with(
            get(Some("target"), "/public/a"),
            &[("host", "target"), ("host", "target")],
        ),
        get(Some("target@forbidden.example"), "/public/a"),
        get(Some("target"), "/public/%61dmin/x"),
        get(Some("target"), "/public//a/../b"),
        with(
            get(Some("target"), "/public/a"),
            &[("x-user", "mallory\u{ff}")],
        ),
        with(
            get(Some("target"), "/vip/a"),
            &[("x-jwt-sub", "testing@secure.istio.io")],
        ),
        with(
            get(Some("target"), "/private/a"),
            &[("authorization", bearer), ("authorization", bearer)],
        ),
        with(
            get(Some("target"), "/private/a"),
            &[("authorization", bearer), ("x-jwt-sub", "admin")],
        ),
        // HTTP/2 has no hop-by-hop headers: a request carrying one is malformed
        // (RFC 9113 §8.2.2), its stream reset with PROTOCOL_ERROR (1).
        with(
            get(Some("target"), "/public/a"),
            &[("connection", "x-user"), ("x-user", "mallory")],
        ),
        with(get(Some("target"), "/public/a"), &[("te", "gzip")]),
    ];
    let requests: Vec<Raw> = h2.iter().map(|f| Raw::H2(f)).collect();
    let answers: Vec<(u64, String)> = raw_requests("client-a", target, &requests)
        .iter()
        .map(shown)
        .collect();
    let mismatch = mesh(400, "Bad Request: :authority and host differ");
    // No response: the stream was reset (PROTOCOL_ERROR).
    let stream_reset = (0, "RST_STREAM 1".to_owned());
    let expected = vec![
        served(&["target|/public/a"]),
        mismatch.clone(),
        mismatch.clone(),
        served(&["target|/public/a"]),
        denied.clone(),
        served(&["target|/public/a"]),
        mesh(400, "Bad Request: multiple host headers"),
        mesh(400, "Bad Request: invalid host"),
        denied.clone(),
        served(&["target|/public/b"]),
        mesh(400, "Bad Request: invalid header value"),
        denied.clone(),
        mesh(401, "Jwt verification fails"),
        served(&["target|/private/a", "x-jwt-sub: testing@secure.istio.io"]),
        stream_reset.clone(),
        stream_reset,
    ];
    assert_eq!(answers, expected);

    // A VirtualService makes the source agent (node-a) read the requests to route them:
    // it normalises them as the destination does, so the ambiguous forms get their 400
    // there, routes match the judged head, and the destination (HTTP/1.1 on an `http`
    // port, whatever the client spoke) still judges and forwards the same head.
    kubectl(
        "apply",
        "target-routes",
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: target, namespace: demo}
spec:
  hosts: [target]
  http:
    - route: [{destination: {host: target}}]
      headers: {request: {set: {x-routed: source-agent}}}
",
    );
    eventually("the source agent routes the requests", || {
        let answers = raw_requests(
            "client-a",
            target,
            &[Raw::H1("GET /public/a HTTP/1.1\r\nHost: target\r\n\r\n")],
        );
        answers[0].1.contains("x-routed")
    });
    let h1 = [
        "GET http://target.demo/public/a HTTP/1.1\r\nHost: forbidden.example\r\n\r\n",
        "GET http://forbidden.example/public/a HTTP/1.1\r\nHost: target\r\n\r\n",
        "GET /public/a HTTP/1.1\r\nHost: target\r\nHost: forbidden.example\r\n\r\n",
        "GET /public/%61dmin/x HTTP/1.1\r\nHost: target\r\n\r\n",
        "GET /public/a HTTP/1.1\r\nHost: target\r\nConnection: x-user\r\nX-User: mallory\r\n\r\n",
        "GET /public/a HTTP/1.1\r\nHost: target\r\nConnection: host\r\n\r\n",
        "GET /vip/a HTTP/1.1\r\nHost: target\r\nX-Jwt-Sub: testing@secure.istio.io\r\n\r\n",
    ];
    let mut requests: Vec<Raw> = h1.iter().map(|h| Raw::H1(h)).collect();
    let h2 = [
        with(
            get(Some("target"), "/public/a"),
            &[("host", "forbidden.example")],
        ),
        with(get(None, "/public//a/../b"), &[("host", "target")]),
    ];
    requests.extend(h2.iter().map(|f| Raw::H2(f)));
    let answers: Vec<(u64, String)> = raw_requests("client-a", target, &requests)
        .iter()
        .map(shown)
        .collect();
    let routed = |lines: &[&str]| {
        let mut all = lines.to_vec();
        all.push("x-routed: source-agent");
        served(&all)
    };
    let expected = vec![
        routed(&["/public/a", "host: target.demo"]),
        denied.clone(),
        mesh(400, "Bad Request: multiple host headers"),
        denied.clone(),
        routed(&["/public/a", "host: target"]),
        mesh(400, "Bad Request: invalid connection header"),
        denied.clone(),
        mismatch.clone(),
        routed(&["/public/b", "host: target"]),
    ];
    assert_eq!(answers, expected);
}

/// The flood test's pods on node-a: `flood-a` (the hostile pod, its own identity) and
/// `sink-a`, which accepts connections and holds them. The sink keeps the agent on the
/// path of its same-node connections (`mesh/bypass: "false"`), which the kernel would
/// otherwise carry alone, out of the agent's reach.
fn flood_pods() -> String {
    let sink = workspace().join("xtask/tests/sink.py");
    format!(
        "apiVersion: v1
kind: ServiceAccount
metadata: {{name: flood, namespace: demo}}
---
apiVersion: v1
kind: Pod
metadata: {{name: flood-a, namespace: demo, labels: {{app: flood}}}}
spec:
  nodeName: node-a
  serviceAccountName: flood
  containers:
    - name: flood
      command: [sleep, infinity]
---
apiVersion: v1
kind: Pod
metadata: {{name: sink-a, namespace: demo, labels: {{app: sink, mesh/bypass: \"false\"}}}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers:
    - name: sink
      command: [python3, {}, '7000']
      readinessProbe: {{tcpSocket: {{port: 7000}}}}
",
        sink.display()
    )
}

/// The agent's limit of captured connections one pod may hold (`proxy/limits.rs`,
/// `MAX_CONNECTIONS_PER_SOURCE`): a user sees it as the resets past it.
const CONNECTIONS_PER_POD: u64 = 4096;

#[test]
fn a_pod_flooding_its_agent_with_connections_does_not_stop_its_neighbours() {
    let _sandbox = Sandbox::up();
    kubectl("apply", "flood", &flood_pods());
    let status = status_json();
    let sink = format!("{}:7000", pod_ip(&status, "sink-a"));
    let node_a = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == "node-a")
        .and_then(|n| n["ip"].as_str())
        .expect("node-a's address")
        .to_owned();
    // The neighbour's requests, each on a new connection captured by the same agent.
    let neighbour = || {
        in_pod(
            "client-a",
            "for i in $(seq 20); do curl -s -m 10 -o /dev/null -w '%{http_code} ' http://10.96.0.100/name; done",
        )
    };
    let all_ok = "200 ".repeat(20);
    eventually("the sink and the web Service answer", || {
        reachable(&["client-a"], "http://10.96.0.100/name") && tcp_connects("client-a", &sink)
    });
    assert_eq!(neighbour(), all_ok);
    let refused = || {
        sample(
            &metrics("node-a"),
            "mesh_connections_refused_total",
            &[("reason", "source_limit")],
        )
        .unwrap_or(0.0) as u64
    };
    let before = refused();
    let handshake_timeouts = || {
        sample(
            &metrics("node-a"),
            "mesh_tunnel_refusals_total",
            &[("reason", "handshake_timeout")],
        )
        .unwrap_or(0.0) as u64
    };
    let timeouts_before = handshake_timeouts();

    // The flood: idle connections to every port of the agent that a pod can reach, none
    // sending a byte (no TLS handshake on 15008, no request head on 15020 and 15021),
    // then 100 captured connections more than a pod may hold, all kept open.
    let extra = 100;
    let idle = serde_json::json!([
        [&node_a, 15008, 300],
        [&node_a, 15020, 300],
        [&node_a, 15021, 300]
    ]);
    let mut flood = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "sandbox",
            "exec",
            "flood-a",
            "--",
            "python3",
            "-c",
            include_str!("flood.py"),
        ])
        .arg(idle.to_string())
        .arg(&sink)
        .arg((CONNECTIONS_PER_POD + extra).to_string())
        .current_dir(workspace())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the flood");
    let mut to_flood = flood.stdin.take().expect("stdin");
    let mut from_flood = std::io::BufReader::new(flood.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut from_flood, &mut line).expect("the flood's report");
    assert_eq!(line.trim(), "ready", "the flood opened every connection");

    // Exactly the connections past the limit are refused, counted, and reset; the ones
    // within it stay open.
    eventually("the agent refused the connections past the limit", || {
        refused() - before == extra
    });
    let mut gone = || {
        std::io::Write::write_all(&mut to_flood, b"count\n").expect("ask the flood");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut from_flood, &mut line).expect("the flood's count");
        serde_json::from_str::<serde_json::Value>(&line).expect("counts JSON")
    };
    eventually(
        "the flood sees its connections past the limit reset",
        || gone()["flood"] == extra,
    );

    // Meanwhile the neighbour's requests all succeed and the agent stays ready.
    assert_eq!(neighbour(), all_ok);
    assert_eq!(readiness("node-a"), "ready\n 200");
    assert_eq!(agent_status("node-a")["ready"], true);

    // Connections that never send a byte are let go: no TLS handshake within 10 s on
    // 15008 (counted as handshake timeouts), no request head within 10 s on 15020 and
    // 15021. Those within the per-pod limit on 15001 are plain TCP to the sink, where
    // silence is legitimate: they stay.
    eventually("the agent let go of the idle connections", || {
        let counts = gone();
        counts["15008"] == 300 && counts["15020"] == 300 && counts["15021"] == 300
    });
    assert_eq!(handshake_timeouts() - timeouts_before, 300);
    assert_eq!(
        gone()["flood"],
        extra,
        "the connections within the limit are held"
    );
    assert_eq!(refused() - before, extra, "the neighbour was never refused");
    assert_eq!(neighbour(), all_ok);

    // The flood ends: its connections are released and the pod may connect again.
    drop(to_flood);
    assert!(flood.wait().expect("the flood exits").success());
    eventually("the flood pod connects again", || {
        tcp_connects("flood-a", &sink)
    });
    assert_eq!(refused() - before, extra);
}

/// Whether a TCP connection from `pod` to `address` is established and stays up (a
/// refused connection is reset right after its handshake).
fn tcp_connects(pod: &str, address: &str) -> bool {
    let (host, port) = address.split_once(':').expect("host:port");
    let script = format!(
        "import socket, time
s = socket.create_connection(('{host}', {port}), timeout=5)
s.settimeout(0.5)
try:
    print('closed' if s.recv(1) == b'' else 'data')
except socket.timeout:
    print('open')
except OSError:
    print('reset')"
    );
    let out = xtask(&["sandbox", "exec", pod, "--", "python3", "-c", &script]);
    String::from_utf8_lossy(&out.stdout).trim() == "open"
}

/// `mesh-bench serve --echo` pods on both nodes whose only port no Service declares HTTP,
/// and a RequestAuthentication giving them the token's subject in `x-jwt-sub` (no
/// AuthorizationPolicy: every connection is allowed); the TCP echo `echo-b` gets one too.
fn claims_pods(jwks_ip: &str) -> String {
    let pod = |node: &str| {
        format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: claims-{node}, namespace: demo, labels: {{app: claims}}}}
spec:
  nodeName: node-{node}
  containers:
    - name: claims
      command: [mesh-bench, serve, --listen, 0.0.0.0:8080, --echo]
      readinessProbe: {{tcpSocket: {{port: 8080}}}}
---
"
        )
    };
    format!(
        "{}{}apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: claims, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: claims}}}}
  jwtRules:
    - issuer: testing@secure.istio.io
      jwksUri: http://{jwks_ip}:8000/jwks.json
      outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: echo-claims, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  jwtRules:
    - issuer: testing@secure.istio.io
      jwksUri: http://{jwks_ip}:8000/jwks.json
      outputPayloadToHeader: x-jwt-payload
",
        pod("a"),
        pod("b")
    )
}

#[test]
fn claim_headers_cannot_be_forged_on_ports_not_declared_http() {
    let _sandbox = Sandbox::up();
    kubectl("apply", "jwks", &jwks_server());
    let jwks_ip = pod_ip(&status_json(), "jwks-a");
    kubectl("apply", "claims", &claims_pods(&jwks_ip));
    let token = std::fs::read_to_string(workspace().join("mesh-agent/tests/testdata/jwt/demo.jwt"))
        .expect("demo token");
    let token = token.trim();
    let status = status_json();
    // The same node (the capture's socket) and across nodes (an HBONE stream).
    for pod in ["claims-a", "claims-b"] {
        let address = format!("{}:8080", pod_ip(&status, pod));
        let forged =
            "GET /a HTTP/1.1\r\nHost: claims\r\nX-Jwt-Sub: testing@secure.istio.io\r\n\r\n";
        let verified =
            format!("GET /a HTTP/1.1\r\nHost: claims\r\nAuthorization: Bearer {token}\r\n\r\n");
        eventually(&format!("{pod} has the keys"), || {
            let answers = raw_requests("client-a", &address, &[Raw::H1(&verified)]);
            shown(&answers[0])
                .1
                .contains("x-jwt-sub: testing@secure.istio.io")
        });
        let answers: Vec<(u64, String)> = raw_requests(
            "client-a",
            &address,
            &[
                Raw::H1(forged),
                Raw::H1(&verified),
                Raw::H2(&[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":authority", "claims"),
                    (":path", "/a"),
                    ("x-jwt-sub", "testing@secure.istio.io"),
                ]),
            ],
        )
        .iter()
        .map(shown)
        .collect();
        // Read as the HTTP it is: the forged claim never reaches the workload, the
        // verified one does (and the token is not forwarded).
        assert_eq!(answers[0].0, 200, "{pod}: {answers:?}");
        assert!(!answers[0].1.contains("x-jwt-sub"), "{pod}: {answers:?}");
        assert_eq!(answers[1].0, 200, "{pod}: {answers:?}");
        assert!(
            answers[1].1.contains("x-jwt-sub: testing@secure.istio.io"),
            "{pod}: {answers:?}"
        );
        assert!(
            !answers[1].1.contains("authorization"),
            "{pod}: {answers:?}"
        );
        assert_eq!(answers[2].0, 200, "{pod}: {answers:?}");
        assert!(!answers[2].1.contains("x-jwt-sub"), "{pod}: {answers:?}");
        // A bad token on that port is refused as on a port declared HTTP.
        let bad = raw_requests(
            "client-a",
            &address,
            &[Raw::H1(
                "GET /a HTTP/1.1\r\nHost: claims\r\nAuthorization: Bearer not.a.token\r\n\r\n",
            )],
        );
        assert_eq!(bad[0].0, 401, "{pod}: {bad:?}");
    }
    // Bytes that are not HTTP go through unchanged, the sniffed prefix included.
    let echo_b = pod_ip(&status, "echo-b");
    assert_eq!(
        echo_round_trip(&format!("{echo_b}:9000"), 200_000),
        "intact"
    );
}

/// A process the test started, ended when the test ends (passing or not).
struct Started(std::process::Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `program` in `node`'s network namespace as a direct child (`nsenter` execs it), so
/// that ending the child ends the program.
fn in_node_netns(status: &serde_json::Value, node: &str, program: &Path) -> Command {
    let netns = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["netns"].as_str())
        .unwrap_or_else(|| panic!("{node}'s netns in {status}"))
        .to_owned();
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{netns}"))
        .arg(program);
    command
}

/// The release meshctl beside the xtask binary under test.
fn meshctl_binary() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_xtask")).with_file_name("meshctl")
}

/// Starts `meshctl graph` or `impact` over `window` against every agent, from node-a;
/// returns once it has taken its first readings.
fn meshctl_watching(
    status: &serde_json::Value,
    args: &[&str],
    window: &str,
) -> std::process::Child {
    use std::io::BufRead;
    let mut command = in_node_netns(status, "node-a", &meshctl_binary());
    command.args(args).args(["--window", window, "-o", "json"]);
    for node in status["nodes"].as_array().expect("nodes") {
        command.args([
            "--metrics",
            node["agent"]["metrics"].as_str().expect("metrics URL"),
        ]);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshctl");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.expect("meshctl's stderr");
        if line.starts_with("read the metrics of 2 agents") {
            return child;
        }
        seen.push(line);
    }
    let ended = child.wait();
    panic!("meshctl {args:?} ended ({ended:?}) before its first readings: {seen:?}");
}

/// The JSON a `meshctl_watching` process printed at the end of its window.
fn watched(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().expect("meshctl");
    assert!(out.status.success(), "meshctl: {}", out.status);
    serde_json::from_slice(&out.stdout).expect("meshctl JSON")
}

/// Pixels of `png` within 3 of `rgb` on every channel, and the share that is not white.
fn colour_count(png: &[u8], rgb: [u8; 3]) -> (usize, f64) {
    let decoder = png::Decoder::new(png);
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).expect("a frame");
    let channels = frame.color_type.samples();
    assert!(channels >= 3, "{:?}", frame.color_type);
    let pixels = &pixels[..frame.buffer_size()];
    let mut matching = 0;
    let mut coloured = 0;
    let mut total = 0;
    for pixel in pixels.chunks(channels) {
        total += 1;
        if pixel[..3].iter().any(|c| *c < 245) {
            coloured += 1;
        }
        if pixel[..3]
            .iter()
            .zip(rgb)
            .all(|(c, want)| c.abs_diff(want) <= 3)
        {
            matching += 1;
        }
    }
    (matching, coloured as f64 / total as f64)
}

#[test]
fn meshctl_graph_impact_and_the_dashboard_show_client_a_calling_reviews_across_nodes() {
    let _sandbox = Sandbox::up();
    apply_mesh_request_metrics();
    kubectl("apply", "reviews-v2", &reviews_pod("v2", "node-b"));
    kubectl("apply", "reviews", REVIEWS);
    kubectl(
        "apply",
        "routes",
        &reviews_routes("  - route:\n    - destination: {host: reviews, subset: v2}\n"),
    );
    // Routed by node-a's agent, and served request by request by node-b's once the
    // Telemetry reached it.
    eventually_eq(
        "node-b's agent reports what reviews-v2 serves (answers, node-b's count)",
        (5, true),
        || {
            let answers = reviews("/", 5, "{}", "new");
            let served = total(
                &metrics("node-b"),
                "istio_requests_total",
                &[
                    ("reporter", "destination"),
                    ("source_workload", "client-a"),
                    ("destination_workload", "reviews-v2"),
                ],
            );
            (answers.count("200 reviews-v2"), served > 0.0)
        },
    );
    let status = status_json();

    // The windows open before 30 requests answered 200 and 10 answered 500 (a status the
    // default retry policy does not retry), and close well after them.
    let graph = meshctl_watching(&status, &["graph"], "20s");
    let impact = meshctl_watching(&status, &["impact", "--rps", "1000"], "20s");
    let ok = reviews("/status/200", 30, "{}", "keepalive");
    let failed = reviews("/status/500", 10, "{}", "keepalive");
    assert_eq!(
        (ok.count("200 reviews-v2"), failed.count("500 reviews-v2")),
        (30, 10),
        "{:?} {:?}",
        ok.counts,
        failed.counts
    );
    let graph = watched(graph);
    let edge = graph["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .find(|e| {
            e["source"] == "demo/client-a" && e["destination"] == "reviews.demo.svc.cluster.local"
        })
        .unwrap_or_else(|| panic!("client-a → reviews in {graph}"))
        .clone();
    // Counted once, from node-a's agent (the source reporter), over mutual TLS.
    assert_eq!(edge["reporters"], serde_json::json!(["source"]), "{edge}");
    assert_eq!(
        (&edge["requests"], &edge["errors"]),
        (&40.0.into(), &10.0.into()),
        "{edge}"
    );
    assert_eq!(edge["error_rate"], 0.25, "{edge}");
    assert_eq!(edge["mutual_tls"], true, "{edge}");
    let window = graph["window_seconds"].as_f64().expect("window");
    let rate = edge["requests_per_second"].as_f64().expect("rate");
    assert!(
        (rate * window - 40.0).abs() < 0.5,
        "{rate} rps over {window} s"
    );
    assert!(edge["p99_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{edge}");
    let served = graph["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .find(|e| {
            e["source"] == "reviews.demo.svc.cluster.local" && e["destination"] == "demo/reviews-v2"
        })
        .unwrap_or_else(|| panic!("reviews → reviews-v2 in {graph}"));
    assert_eq!(served["requests"], 40.0, "{served}");

    // What the agents measured of those 40 requests: each timed once by the source agent
    // and once by the destination agent, which judged each against its policies.
    let impact = watched(impact);
    let measured = &impact["measured"];
    assert_eq!(measured["agents"], 2, "{measured}");
    assert_eq!(measured["source_agent"]["requests"], 40.0, "{measured}");
    assert_eq!(
        measured["destination_agent"]["requests"], 40.0,
        "{measured}"
    );
    assert_eq!(measured["policy_evaluations"], 40.0, "{measured}");
    for figure in [
        "cpu_cores",
        "memory_mib",
        "latency_added_p90_ms",
        "policy_evaluation_mean_us",
    ] {
        assert!(
            measured[figure].as_f64().is_some_and(|v| v > 0.0),
            "{figure}: {measured}"
        );
    }
    assert_eq!(impact["sidecar"]["cpu_cores"], 0.4, "{impact}");
    assert!(
        impact["mesh"]["monthly_cost"]
            .as_f64()
            .is_some_and(|v| v > 0.0),
        "{impact}"
    );

    // The dashboard, from node-a's loopback, while client-a keeps calling.
    let mut dashboard = in_node_netns(&status, "node-a", &meshctl_binary());
    dashboard.args(["dashboard", "--listen", "127.0.0.1:20001", "--window", "3s"]);
    for node in status["nodes"].as_array().expect("nodes") {
        dashboard.args([
            "--metrics",
            node["agent"]["metrics"].as_str().expect("metrics URL"),
        ]);
    }
    let _dashboard = Started(
        dashboard
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("meshctl dashboard"),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calling = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                reviews("/status/200", 10, "{}", "keepalive");
                reviews("/status/500", 5, "{}", "keepalive");
            }
        })
    };
    eventually("the dashboard's window holds client-a → reviews", || {
        let (_, state) = on_node_answer(
            "node-a",
            &["curl", "-sf", "http://127.0.0.1:20001/state.json"],
        );
        serde_json::from_str::<serde_json::Value>(&state).is_ok_and(|state| {
            state["graph"]["edges"].as_array().is_some_and(|edges| {
                edges.iter().any(|e| {
                    e["source"] == "demo/client-a" && e["errors"].as_f64().is_some_and(|n| n > 0.0)
                })
            })
        })
    });
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let chromium = |extra: &[&str]| {
        let mut command = in_node_netns(&status, "node-a", Path::new("/usr/bin/chromium"));
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1400,1200",
                "--virtual-time-budget=5000",
            ])
            .arg(format!(
                "--user-data-dir={}",
                Path::new(env!("CARGO_TARGET_TMPDIR"))
                    .join("chromium-profile")
                    .display()
            ))
            .args(extra)
            .arg("http://127.0.0.1:20001/");
        command
            .output()
            .expect("chromium (installed by cargo xtask setup)")
    };
    let shot = chromium(&[&format!("--screenshot={}", screenshot.display())]);
    let dom = chromium(&["--dump-dom"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    calling.join().expect("the calling thread");
    let png = std::fs::read(&screenshot).unwrap_or_else(|err| {
        panic!(
            "no screenshot ({err}): {}",
            String::from_utf8_lossy(&shot.stderr)
        )
    });
    let (workloads, coloured) = colour_count(&png, [0x4c, 0x78, 0xa8]);
    let (services, _) = colour_count(&png, [0x94, 0x67, 0xbd]);
    let (failing, _) = colour_count(&png, [0xd6, 0x27, 0x28]);
    assert!(
        coloured > 0.02,
        "the page is blank: {coloured} of it not white"
    );
    assert!(workloads > 1000, "workload nodes drawn: {workloads} pixels");
    assert!(services > 1000, "the Service node drawn: {services} pixels");
    assert!(
        failing > 300,
        "a red (failing) edge drawn: {failing} pixels"
    );
    let dom = String::from_utf8_lossy(&dom.stdout);
    for shown in [
        "data-id=\"demo/client-a\"",
        "data-id=\"demo/reviews-v2\"",
        "<td>reviews.demo.svc.cluster.local</td>",
        "sidecars (Istio's figures)",
        "class=\"lock\"",
    ] {
        assert!(
            dom.contains(shown),
            "{shown} missing from the rendered page:\n{dom}"
        );
    }
}
