//! `mesh-agent`: the node agent of the mesh, one per node (`mesh-agent run`), and the mesh
//! CA (`mesh-agent ca`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_agent::{
    agent::{self, AgentOptions},
    ca, datapath,
};

#[derive(Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "eBPF-accelerated sidecarless service mesh: the node agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent for this node.
    Run {
        /// This node's name, as in the Pods' `spec.nodeName`.
        #[arg(long, env = "MESH_NODE_NAME")]
        node: String,
        /// Directory of Kubernetes-format YAML files, watched for changes.
        #[arg(long, env = "MESH_CONFIG_DIR", default_value = "/etc/mesh/config")]
        config_dir: PathBuf,
        /// bpffs directory where maps and links are pinned.
        #[arg(long, env = "MESH_BPFFS", default_value = "/sys/fs/bpf/mesh")]
        bpffs: PathBuf,
        /// Where to look for pod cgroups (default: the cgroup v2 mount).
        #[arg(long, env = "MESH_CGROUP_ROOT")]
        cgroup_root: Option<PathBuf>,
        /// The SPIFFE trust domain.
        #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
        /// The mesh CA's address.
        #[arg(long, env = "MESH_CA_ADDRESS")]
        ca_address: SocketAddr,
        /// The mesh CA's root certificate (PEM): the trust bundle.
        #[arg(
            long,
            env = "MESH_CA_ROOT",
            default_value = "/etc/mesh/ca/root-cert.pem"
        )]
        ca_root: PathBuf,
        /// This node's bootstrap token for the CA.
        #[arg(long, env = "MESH_CA_TOKEN", default_value = "/etc/mesh/token/token")]
        ca_token: PathBuf,
    },
    /// Run the mesh CA.
    Ca {
        /// Address of the CA's TLS API.
        #[arg(long, env = "MESH_CA_LISTEN", default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        /// Where the root is kept (created on first start).
        #[arg(long, env = "MESH_CA_STATE_DIR", default_value = "/var/lib/mesh-ca")]
        state_dir: PathBuf,
        /// An operator-supplied root (or intermediate) certificate, instead of the kept one.
        #[arg(long, requires = "root_key")]
        root_cert: Option<PathBuf>,
        /// Its private key.
        #[arg(long, requires = "root_cert")]
        root_key: Option<PathBuf>,
        #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
        /// Lifetime of workload certificates (e.g. 24h, 10m, 8s).
        #[arg(long, env = "MESH_CERT_TTL", default_value = "24h", value_parser = parse_ttl)]
        cert_ttl: Duration,
        /// Bootstrap tokens: one `node token` line per node.
        #[arg(long, env = "MESH_CA_TOKENS")]
        tokens: PathBuf,
        /// The cluster configuration, to know which pods run on which node.
        #[arg(long, env = "MESH_CONFIG_DIR", default_value = "/etc/mesh/config")]
        config_dir: PathBuf,
    },
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    mesh_agent::config::istio::parse_duration(text)
}

/// A runtime with one worker per core of the node.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Ca {
            listen,
            state_dir,
            root_cert,
            root_key,
            trust_domain,
            cert_ttl,
            tokens,
            config_dir,
        } => runtime()?.block_on(ca::run(ca::CaOptions {
            listen,
            state_dir,
            root_cert,
            root_key,
            trust_domain,
            cert_ttl,
            tokens,
            config_dir,
        })),
        Command::Run {
            node,
            config_dir,
            bpffs,
            cgroup_root,
            trust_domain,
            ca_address,
            ca_root,
            ca_token,
        } => {
            let cgroup_root = match cgroup_root {
                Some(root) => root,
                None => datapath::cgroup2_mount()
                    .context("no cgroup v2 hierarchy in /proc/mounts; pass --cgroup-root")?,
            };
            runtime()?.block_on(agent::run(AgentOptions {
                node,
                config_dir,
                bpffs,
                cgroup_root,
                trust_domain,
                ca_address,
                ca_root,
                ca_token,
            }))
        }
    }
}
