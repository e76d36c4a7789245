//! `mesh-agent`: the node agent of the mesh, one per node.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_agent::{
    agent::{self, AgentOptions},
    datapath,
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
    },
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            node,
            config_dir,
            bpffs,
            cgroup_root,
        } => {
            let cgroup_root = match cgroup_root {
                Some(root) => root,
                None => datapath::cgroup2_mount()
                    .context("no cgroup v2 hierarchy in /proc/mounts; pass --cgroup-root")?,
            };
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()?
                .block_on(agent::run(AgentOptions {
                    node,
                    config_dir,
                    bpffs,
                    cgroup_root,
                }))
        }
    }
}
