//! The sandbox's daemons and its fabric: starting a process in a network namespace and
//! cgroup with its log, telling whether it still lives, wiring a namespace onto the
//! bridge that links the nodes, and asking a daemon over HTTP from a namespace. Used by the sandbox and by the servers it runs beside
//! the nodes (the control plane, Jaeger, Prometheus).

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    ns::{self, Placement},
    run,
};

/// Where the sandbox keeps its state, configuration and logs.
pub const RUN_DIR: &str = "/run/mesh-sandbox";
/// The namespace holding the bridge between the nodes.
pub const FABRIC_NETNS: &str = "msb-fabric";

/// The log file `name` of the sandbox's daemons.
pub fn log_path(name: &str) -> PathBuf {
    logs_dir().join(name)
}

fn log_file(name: &str) -> Result<fs::File> {
    let path = log_path(name);
    fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
}

/// Starts `command` in its own session inside `netns` and `cgroup`, its output in the
/// log `log_name`; returns its pid.
pub fn start_daemon(
    command: &mut Command,
    log_name: &str,
    netns: &str,
    cgroup: PathBuf,
) -> Result<u32> {
    start_placed_daemon(
        command,
        log_name,
        &Placement {
            netns: netns.to_owned(),
            cgroup: Some(cgroup),
            detach: true,
            resolv_conf: None,
        },
    )
}

/// [`start_daemon`] at a placement of the caller's (a pod's, with its resolver).
pub fn start_placed_daemon(
    command: &mut Command,
    log_name: &str,
    placement: &Placement,
) -> Result<u32> {
    let log = log_file(log_name)?;
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(ns::spawn(command, placement)?.id())
}

/// Creates network namespace `netns` with an `eth0` at `address`/24 on the bridge that
/// links the nodes (its other end, `port`, in the fabric namespace).
pub fn join_fabric(netns: &str, port: &str, address: Ipv4Addr) -> Result<()> {
    ip(&["netns", "add", netns])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    ip(&[
        "link",
        "add",
        "eth0",
        "netns",
        netns,
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        FABRIC_NETNS,
    ])?;
    ip(&[
        "-n",
        FABRIC_NETNS,
        "link",
        "set",
        port,
        "master",
        "br0",
        "up",
    ])?;
    ip(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("{address}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", netns, "link", "set", "eth0", "up"])
}

pub fn process_alive(pid: u32) -> bool {
    // A zombie is dead for our purposes.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

pub fn logs_dir() -> PathBuf {
    Path::new(RUN_DIR).join("logs")
}

pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

/// GET on an address reached from network namespace `netns`; the status code and body.
pub fn http_get(netns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    ns::within(netns, move || -> Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })?
}
