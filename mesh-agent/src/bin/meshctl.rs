//! `meshctl`: the mesh's command-line inspector (see `mesh_agent::cli`).

use clap::Parser;

fn main() {
    // Output piped into `head` or `less` that stops reading ends meshctl quietly, as it
    // does any command-line tool, rather than as a panic on the failed write.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = mesh_agent::cli::Cli::parse();
    if let Err(err) = mesh_agent::cli::main(cli) {
        eprintln!("meshctl: {err:#}");
        std::process::exit(mesh_agent::cli::exit_code(&err));
    }
}
