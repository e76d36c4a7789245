//! The project's commands, run as `cargo xtask <command>`: `demo` and `test` (the README's
//! two commands), `setup` (prerequisites), `build`, `bench`, `fuzz` (the parsers' fuzz
//! targets), and `sandbox` (the local multi-node mesh the demo, the tests and the
//! benchmarks run on).

mod api_scale;
mod bench;
mod control_plane;
mod cross;
mod daemon;
mod demo;
mod fuzz;
mod go_build;
mod helm;
mod jaeger;
mod kube_tools;
mod kubelet;
mod ns;
mod pod_sync;
mod prometheus;
mod resolver;
mod sandbox;
mod setup;
mod supervise;
mod test;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, demo, test and sandbox commands of the mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (Debian packages, nightly rust-src, bpf-linker, and etcd,
    /// kube-apiserver, kubectl and helm built from their Go modules).
    Setup,
    /// Build the agent, meshctl and the eBPF object (release; with `cargo xtask-dist`, the
    /// `dist` profile that ships) for a node architecture, staged in `target/image/ARCH/`
    /// for deploy/Containerfile (arm64's cross-built, then run under qemu-user).
    Build {
        #[arg(long, value_enum, default_value_t = cross::Arch::Amd64)]
        arch: cross::Arch,
    },
    /// Set everything up, run a 2-node sandbox mesh with traffic, show what the mesh saw.
    Demo,
    /// Run every check and test: formatting, lints, the fuzz targets briefly, unit, eBPF
    /// and sandbox tests.
    Test,
    /// Measure the mesh against a no-mesh baseline of the same run.
    Bench {
        /// A second per measurement, once: proves the harness works (CI).
        #[arg(long)]
        quick: bool,
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
        /// Only the Kubernetes API scale scenario (`api-scale`, `api-pod-change`), on its
        /// own sandbox.
        #[arg(long)]
        only_api_scale: bool,
    },
    /// Fuzz the parsers of untrusted input (cargo-fuzz, pinned nightly), each target on its
    /// corpus seeded from the repository's test data.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60, conflicts_with = "quick")]
        seconds: u64,
        /// What `cargo xtask test` runs: built cheaply (no sanitizer, no optimisation),
        /// each target over its seeds and a fixed number of mutations.
        #[arg(long)]
        quick: bool,
        /// One target (config_loader, request, jwt, jwks, tunnel, ca_csr); all by default.
        target: Option<String>,
    },
    /// Render the Helm chart (deploy/chart) with the pinned helm, as `helm template mesh
    /// deploy/chart --namespace mesh-system [ARGS…]` would (e.g. `--set
    /// defaultEnrollment=ambient`).
    Chart {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Manage the local multi-node sandbox cluster.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Create nodes and pods from Kubernetes-format YAML and start the agents.
    Up {
        /// Cluster description (file or directory).
        #[arg(long, default_value = "deploy/sandbox")]
        config: PathBuf,
        /// Where the agents read the cluster from: the configuration directory, or the
        /// sandbox's API server (every object created through it, pod and node status
        /// set as a kubelet does).
        #[arg(long, value_enum, default_value_t = sandbox::ConfigSource::Dir)]
        config_source: sandbox::ConfigSource,
    },
    /// Stop everything and remove every namespace, cgroup and pin of the sandbox.
    Down,
    /// Run a command in a pod (`name` or `namespace/name`) or, with --node, a node.
    Exec {
        /// Run in this node's network namespace instead of a pod.
        #[arg(long)]
        node: Option<String>,
        /// The pod (omit with --node).
        pod: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Nodes and pods of the running sandbox.
    Status {
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Create or update objects, as `kubectl apply` would.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete objects, as `kubectl delete` would.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Run kubectl against the sandbox's Kubernetes API server (inside its namespace).
    Kubectl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Replace a node's agent: with --graceful a new agent takes over the running one's
    /// listeners, then the old one gets SIGTERM and drains (a rolling update); without,
    /// the agent is killed (SIGKILL) and started again (a crash).
    RestartAgent {
        node: String,
        #[arg(long)]
        graceful: bool,
    },
    /// Stop a node's agent for good: it drains and exits, and is not started again.
    StopAgent { node: String },
    /// Kill the mesh CA (agents keep their certificates and retry renewals).
    StopCa,
    /// Kill the sandbox's kube-apiserver and start it again on the same etcd (agents
    /// watching it must catch up without losing or replaying state).
    RestartApi,
    /// Start the mesh CA again after stop-ca: same root, tokens and certificate lifetime.
    StartCa,
    /// Run an agent command line and keep one running (the sandbox's DaemonSet; started
    /// by `sandbox up`).
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        pid_file: PathBuf,
        #[arg(last = true, required = true)]
        agent: Vec<String>,
    },
    /// Serve a node's kubelet API for the API server's port-forwards (started by `sandbox
    /// up` on the API source).
    #[command(hide = true)]
    Kubelet {
        #[arg(long)]
        node: String,
    },
    /// Schedule, start and stop the pods made through the API server, as the scheduler
    /// and the kubelets do (started by `sandbox up` on the API source).
    #[command(hide = true)]
    PodSync,
    /// Wire and start the pod given as JSON on standard input (run by pod-sync).
    #[command(hide = true)]
    PodStart,
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where the release binaries are: beside this xtask binary, which `cargo xtask` builds
/// in the same profile and target directory (so a `CARGO_TARGET_DIR` is followed).
pub fn release_binaries() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| workspace().join("target/release"))
}

/// The cargo profile this xtask was built in (`release`, or `dist` through `cargo
/// xtask-dist`): the binaries it builds and runs are of the same profile.
pub fn profile() -> String {
    release_binaries()
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("release")
        .to_owned()
}

/// A progress line on standard error.
pub fn progress(message: &str) {
    eprintln!("\x1b[1m==> {message}\x1b[0m");
}

/// Runs a command to completion; an error names the command and its output.
pub fn run(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(())
}

/// Runs a command with its output on the terminal.
pub fn run_visible(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root (network namespaces, cgroups and eBPF)");
    }
    Ok(())
}

/// Builds and stages the binaries for `arch`; arm64's are then run under qemu-user.
pub fn build(arch: cross::Arch) -> Result<()> {
    let staged = cross::build(arch, &profile())?;
    if arch == cross::Arch::Arm64 {
        cross::check_arm64(&staged)?;
    }
    progress(&format!("staged in {}", staged.display()));
    Ok(())
}

fn main() {
    if let Err(err) = dispatch(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Task::Setup => setup::ensure(),
        Task::Build { arch } => {
            setup::ensure()?;
            build(arch)
        }
        Task::Demo => demo::run(),
        Task::Test => test::run(),
        Task::Bench {
            quick,
            output,
            only_api_scale,
        } => bench::run(quick, output == "json", only_api_scale),
        Task::Fuzz {
            seconds,
            quick,
            target,
        } => {
            let mode = if quick {
                fuzz::Mode::Quick
            } else {
                fuzz::Mode::Fuzz { seconds }
            };
            fuzz::run_targets(mode, target.as_deref())
        }
        Task::Chart { args } => {
            helm::ensure()?;
            print!("{}", helm::template(&args)?);
            Ok(())
        }
        Task::Sandbox { command } => {
            require_root()?;
            let in_workspace = |p: PathBuf| {
                if p.is_relative() && !p.exists() {
                    workspace().join(p)
                } else {
                    p
                }
            };
            match command {
                SandboxCommand::Up {
                    config,
                    config_source,
                } => sandbox::up(&in_workspace(config), config_source),
                SandboxCommand::Down => sandbox::down(),
                SandboxCommand::Exec { node, pod, command } => {
                    let target = match (node, pod) {
                        (Some(node), None) => sandbox::ExecTarget::Node(node),
                        (None, Some(pod)) => sandbox::ExecTarget::Pod(pod),
                        _ => bail!("name either a pod or --node NODE"),
                    };
                    let code = sandbox::exec(&target, &command)?;
                    std::process::exit(code);
                }
                SandboxCommand::Status { output } => sandbox::status(output == "json"),
                SandboxCommand::Apply { file } => sandbox::apply(&file),
                SandboxCommand::Delete { file } => sandbox::delete(&file),
                SandboxCommand::Kubectl { args } => std::process::exit(sandbox::kubectl(&args)?),
                SandboxCommand::RestartAgent { node, graceful } => {
                    sandbox::restart_agent(&node, graceful).map(drop)
                }
                SandboxCommand::StopAgent { node } => sandbox::stop_agent(&node),
                SandboxCommand::StopCa => sandbox::stop_ca(),
                SandboxCommand::RestartApi => sandbox::restart_api(),
                SandboxCommand::StartCa => sandbox::start_ca_again(),
                SandboxCommand::Supervise { pid_file, agent } => {
                    supervise::supervise(&pid_file, &agent)
                }
                SandboxCommand::Kubelet { node } => kubelet::serve(&node),
                SandboxCommand::PodSync => pod_sync::serve(),
                SandboxCommand::PodStart => pod_sync::start_from_stdin(),
            }
        }
    }
}
