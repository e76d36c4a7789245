//! `cargo xtask demo`: sets up and builds, starts the default sandbox (two nodes, pods on
//! each, Services, the mesh CA), sends real traffic through the mesh — same node, across
//! nodes over mutual TLS, to a Service address — checks every byte arrived, shows what the
//! mesh saw (open flows from the kernel maps, certificates, tc counters, the agents'
//! Istio metrics) and tears the sandbox down.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    build, daemon, progress, require_root,
    sandbox::{self, command_in, ExecTarget, SandboxState},
    setup, workspace,
};

/// Sends 2 MiB through a TCP echo server and checks the echo; prints `ok <bytes>`.
pub const ECHO_CHECK: &str = include_str!("../tests/echo_check.py");

fn output(target: &ExecTarget, program: &str, args: &[&str]) -> Result<String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = command_in(target, program, &args)?
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pod(name: &str) -> ExecTarget {
    ExecTarget::Pod(name.into())
}

fn node(name: &str) -> ExecTarget {
    ExecTarget::Node(name.into())
}

/// Fetches /blob from `url` in `client` and compares it with the server pod's file.
fn check_download(client: &str, url: &str, servers: &[&str]) -> Result<String> {
    let fetched = output(
        &pod(client),
        "sh",
        &["-c", &format!("curl -sf --max-time 30 {url} | sha256sum")],
    )?;
    let fetched = fetched
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    for server in servers {
        let file = format!("/run/mesh-sandbox/pods/demo-{server}/blob");
        let original = Command::new("sha256sum").arg(&file).output()?;
        if String::from_utf8_lossy(&original.stdout).starts_with(&fetched) {
            return Ok((*server).to_owned());
        }
    }
    bail!("{client} fetched {url} but its checksum matches none of {servers:?}")
}

pub fn run() -> Result<()> {
    require_root()?;
    setup::ensure()?;
    build(crate::cross::Arch::Amd64)?;
    sandbox::up(
        &workspace().join("deploy/sandbox"),
        sandbox::ConfigSource::Dir,
    )?;
    let result = traffic();
    progress("tearing the sandbox down");
    sandbox::down()?;
    result?;
    progress("demo finished");
    Ok(())
}

fn traffic() -> Result<()> {
    let state = SandboxState::load()?;
    sandbox::status(false)?;
    let ip_of = |name: &str| state.pod(name).map(|p| p.ip);
    let (web_a, web_b, echo_b) = (ip_of("web-a")?, ip_of("web-b")?, ip_of("echo-b")?);
    let echo_vip = state
        .services
        .get("demo/echo")
        .copied()
        .context("Service demo/echo has no address")?;

    progress("same node, through node-a's agent, spliced in the kernel: client-a → web-a (4 MiB over HTTP)");
    check_download("client-a", &format!("http://{web_a}:8080/blob"), &["web-a"])?;
    println!("    4 MiB intact");
    progress(&format!(
        "same node, carried pod to pod by the kernel alone: web-b → echo-b ({echo_b}:9000)"
    ));
    check_echo("web-b", echo_b)?;
    progress("across nodes, HBONE over mutual TLS: client-a (node-a) → web-b (node-b)");
    check_download("client-a", &format!("http://{web_b}:8080/blob"), &["web-b"])?;
    println!("    4 MiB intact");
    progress("through a Service: client-a → web.demo (10.96.0.100:80), four requests");
    for _ in 0..4 {
        let server = check_download("client-a", "http://10.96.0.100/blob", &["web-a", "web-b"])?;
        println!("    served by {server}, 4 MiB intact");
    }
    progress(&format!(
        "raw TCP across nodes: client-a → echo.demo ({echo_vip}:9000) → echo-b ({echo_b})"
    ));
    check_echo("client-a", echo_vip)?;

    progress("a slow download left running, to see open flows in the kernel maps");
    let mut slow = command_in(
        &pod("client-a"),
        "curl",
        &[
            "-s",
            "--limit-rate",
            "256k",
            "-o",
            "/dev/null",
            &format!("http://{web_b}:8080/blob"),
        ]
        .map(String::from),
    )?
    .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    for n in ["node-a", "node-b"] {
        progress(&format!("meshctl bpf flows on {n}"));
        println!("{}", output(&node(n), "meshctl", &["bpf", "flows"])?);
    }
    // The slow download is this process's own child.
    slow.kill()?;
    slow.wait()?;
    progress("meshctl certs on node-b (workload certificates from the mesh CA)");
    println!("{}", output(&node("node-b"), "meshctl", &["certs"])?);
    progress("meshctl bpf metrics on node-a (tc counters per address pair)");
    println!(
        "{}",
        output(&node("node-a"), "meshctl", &["bpf", "metrics"])?
    );
    std::thread::sleep(Duration::from_millis(1500));
    for n in &state.nodes {
        progress(&format!(
            "Istio TCP metrics of the agent on {} (reporter, workloads, Service, bytes)",
            n.name
        ));
        let (_, body) = daemon::http_get(
            &n.netns,
            SocketAddr::from((Ipv4Addr::LOCALHOST, 15020)),
            "/metrics",
        )?;
        for line in body.lines().filter(|l| l.starts_with("istio_tcp_")) {
            println!("    {}", compact(line));
        }
    }
    Ok(())
}

/// Pushes 2 MiB from `from` to the TCP echo at `to`:9000 and checks what comes back.
fn check_echo(from: &str, to: Ipv4Addr) -> Result<()> {
    let echoed = output(
        &pod(from),
        "python3",
        &["-c", ECHO_CHECK, &to.to_string(), "9000"],
    )?;
    if !echoed.starts_with("ok") {
        bail!("echo from {from} to {to}:9000: {echoed}");
    }
    println!("    2 MiB echoed intact");
    Ok(())
}

/// Drops the labels whose value is `unknown` or constant, to fit a terminal.
fn compact(line: &str) -> String {
    let Some((name, rest)) = line.split_once('{') else {
        return line.to_owned();
    };
    let Some((labels, value)) = rest.rsplit_once('}') else {
        return line.to_owned();
    };
    let kept: Vec<&str> = labels
        .split(',')
        .filter(|l| {
            [
                "reporter=",
                "source_workload=",
                "destination_workload=",
                "destination_service=",
                "connection_security_policy=",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .collect();
    format!("{name}{{{}}}{value}", kept.join(","))
}
