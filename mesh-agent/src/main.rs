//! `mesh-agent`: the node agent of the mesh, one per node (`mesh-agent run`), and the mesh
//! CA (`mesh-agent ca`).

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_agent::{
    app::{self, AgentOptions},
    datapath,
    identity::ca,
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
        /// Istio's `rootNamespace`: its PeerAuthentications, AuthorizationPolicies and
        /// RequestAuthentications without a selector apply mesh wide.
        #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = "istio-system")]
        root_namespace: String,
        /// Splice same-node flows that need no L7 work in the kernel instead of copying
        /// them through the agent.
        #[arg(long, env = "MESH_KERNEL_SPLICE", default_value_t = true, action = clap::ArgAction::Set)]
        kernel_splice: bool,
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
    Ca(ca::CaOptions),
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
    // `RUST_LOG` selects what is logged, as before (e.g. `info,mesh::access=debug`).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Ca(options) => runtime()?.block_on(ca::run(options)),
        Command::Run {
            node,
            config_dir,
            bpffs,
            cgroup_root,
            trust_domain,
            root_namespace,
            kernel_splice,
            ca_address,
            ca_root,
            ca_token,
        } => {
            let cgroup_root = match cgroup_root {
                Some(root) => root,
                None => datapath::cgroup2_mount()
                    .context("no cgroup v2 hierarchy in /proc/mounts; pass --cgroup-root")?,
            };
            runtime()?.block_on(app::run(AgentOptions {
                node,
                config_dir,
                bpffs,
                cgroup_root,
                trust_domain,
                root_namespace,
                kernel_splice,
                ca_address,
                ca_root,
                ca_token,
            }))
        }
    }
}
