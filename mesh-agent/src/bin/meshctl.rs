//! `meshctl`: the mesh's command-line inspector (see `mesh_agent::meshctl`).

use clap::Parser;

fn main() {
    let cli = mesh_agent::cli::Cli::parse();
    if let Err(err) = mesh_agent::cli::main(cli) {
        eprintln!("meshctl: {err:#}");
        std::process::exit(mesh_agent::cli::exit_code(&err));
    }
}
