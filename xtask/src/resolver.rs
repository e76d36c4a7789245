//! The sandbox nodes' own resolver, as a node of a real cluster has one: dnsmasq (Debian's
//! `dnsmasq-base`) in a namespace of its own on the nodes' network (`msb-dns`,
//! 10.200.0.250:53), answering the names of [`NAMES`] from its own table and nothing else:
//! it asks no other server, so no query leaves the sandbox. The agents' DNS proxies
//! forward to it what is not the mesh's.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    daemon::{join_fabric, log_path, process_alive, start_daemon},
    ns, progress,
};

pub const NETNS: &str = "msb-dns";
const FABRIC_PORT: &str = "updns";
pub const IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 250);
const BINARY: &str = "/usr/sbin/dnsmasq";
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The names outside the cluster it answers: one outside the sandbox's networks, and
/// one the outside world gives web-b's address (as a DNS name in front of an endpoint a
/// ServiceEntry with `resolution: DNS` reaches).
pub const NAMES: [(&str, Ipv4Addr); 2] = [
    ("upstream.example.test", Ipv4Addr::new(10, 200, 0, 249)),
    ("shop.example.test", Ipv4Addr::new(10, 244, 2, 2)),
];

fn args() -> Vec<String> {
    let mut args: Vec<String> = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        "--user=root",
        "--group=root",
        "--pid-file=",
        "--log-facility=-",
        "--log-queries",
    ]
    .map(str::to_owned)
    .to_vec();
    args.push(format!("--listen-address={IP}"));
    args.extend(
        NAMES
            .iter()
            .map(|(name, address)| format!("--address=/{name}/{address}")),
    );
    args
}

/// Starts the resolver in its cgroup under `cgroups` and waits until it answers.
pub fn start(cgroups: &Path) -> Result<u32> {
    if !Path::new(BINARY).is_file() {
        bail!("{BINARY} is missing: `cargo xtask setup` installs dnsmasq-base");
    }
    progress(&format!(
        "starting the nodes' resolver (dnsmasq) at {IP}:53"
    ));
    join_fabric(NETNS, FABRIC_PORT, IP)?;
    let cgroup = cgroups.join("resolver");
    std::fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let pid = start_daemon(
        Command::new(BINARY).args(args()),
        "resolver.log",
        NETNS,
        cgroup,
    )?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ns::within(NETNS, answers)? {
            return Ok(pid);
        }
        if !process_alive(pid) || Instant::now() > deadline {
            bail!(
                "the nodes' resolver did not start (see {})",
                log_path("resolver.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the resolver answers a query for the first of its names.
fn answers() -> bool {
    let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
        return false;
    };
    let mut query = vec![0x4d, 0x53, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in NAMES[0].0.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut reply = [0u8; 512];
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .is_ok()
        && socket.send_to(&query, SocketAddr::from((IP, 53))).is_ok()
        && socket
            .recv(&mut reply)
            .is_ok_and(|len| len > 2 && reply[..2] == query[..2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resolver_listens_on_its_address_only_and_forwards_nothing() {
        let args = args();
        assert!(args.contains(&"--no-resolv".to_owned()));
        assert!(args.contains(&"--listen-address=10.200.0.250".to_owned()));
        assert!(args.contains(&"--address=/upstream.example.test/10.200.0.249".to_owned()));
        assert!(!args.iter().any(|a| a.starts_with("--server")));
    }
}
