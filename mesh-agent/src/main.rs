//! `mesh-agent`: the node agent of the mesh, one per node (`mesh-agent run`), and the mesh
//! CA (`mesh-agent ca`).

use clap::{Parser, Subcommand};
use mesh_agent::{
    app::{self, AgentOptions},
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
    Run(AgentOptions),
    /// Run the mesh CA.
    Ca(ca::CaOptions),
}

fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
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
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    match cli.command {
        Command::Ca(options) => runtime(cores)?.block_on(ca::run(options)),
        Command::Run(options) => runtime(options.workers_for(cores))?.block_on(app::run(options)),
    }
}
