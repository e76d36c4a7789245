//! `meshctl`: the mesh's command-line inspector (see `mesh_agent::meshctl`).

use clap::Parser;

fn main() {
    let cli = mesh_agent::meshctl::Cli::parse();
    if let Err(err) = mesh_agent::meshctl::main(cli) {
        eprintln!("meshctl: {err:#}");
        std::process::exit(1);
    }
}
