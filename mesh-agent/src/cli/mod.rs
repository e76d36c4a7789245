//! `meshctl`: inspects a node's mesh — the pinned BPF maps directly (`meshctl bpf …`) and
//! the running agent through its localhost admin API (`meshctl status`), or both through
//! the agent from anywhere a kubeconfig works (`--node`, `--pod`: `remote`) — checks
//! configuration files (`meshctl validate`), and shows the traffic of every agent from
//! their metrics endpoints (`meshctl graph`, `impact`, `dashboard`: `scrape` reads them,
//! `graph`, `svg` and `impact` decide and draw, `dashboard` serves the page). Tables by
//! default, `-o json` for tools.

pub mod dashboard;
pub mod graph;
pub mod impact;
pub mod remote;
pub mod scrape;
pub mod svg;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    rc::Rc,
    sync::Arc,
};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{de::DeserializeOwned, Serialize};

use crate::{
    config::{self, Severity},
    datapath::{
        maps::{self, NodeMaps},
        preflight::{self, Finding},
    },
    http::client::{self, ClientError, Transport},
    model::routes_report::RouteQuery,
    policy::check::CheckRequest,
};

/// Exit codes scripts can tell apart; clap exits with 2 on a bad command line too.
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_INVALID_INPUT: i32 = 2;
pub const EXIT_AGENT_UNREACHABLE: i32 = 3;
pub const EXIT_DENIED: i32 = 4;
pub const EXIT_CHECK_FAILED: i32 = 5;

/// A failure with its own exit code (`EXIT_*`); any other error exits with `EXIT_FAILURE`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: i32,
    message: String,
}

impl Exit {
    fn new(code: i32, message: impl Into<String>) -> Exit {
        Exit {
            code,
            message: message.into(),
        }
    }
}

/// The exit code for an error `main` returned.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    // An `Exit` is either the error or a context added to another (anyhow finds both).
    err.downcast_ref::<Exit>()
        .or_else(|| err.chain().find_map(|cause| cause.downcast_ref::<Exit>()))
        .map_or(EXIT_FAILURE, |exit| exit.code)
}

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Inspect the mesh on this node")]
pub struct Cli {
    /// The node's bpffs directory (where the agent pins maps and links).
    #[arg(
        long,
        global = true,
        env = "MESH_BPFFS",
        default_value = "/sys/fs/bpf/mesh"
    )]
    bpffs: PathBuf,
    /// The agent's admin address.
    #[arg(
        long,
        global = true,
        env = "MESH_ADMIN",
        default_value = "127.0.0.1:15000"
    )]
    admin: SocketAddr,
    /// Reach the agent of this node (and its maps) through the Kubernetes API, by
    /// port-forward to the agent pod, rather than on this machine. `graph`, `impact` and
    /// `dashboard` take several (`--node a,b`) and read those agents' metrics.
    #[arg(long, global = true, value_delimiter = ',', conflicts_with = "pod")]
    node: Vec<String>,
    /// Reach the agent of the node this pod (`namespace/name`, or `name` in `default`)
    /// runs on, as `--node` does.
    #[arg(long, global = true, value_parser = remote::Target::pod)]
    pod: Option<remote::Target>,
    /// The kubeconfig for `--node`, `--pod` and `validate --kube`; without it,
    /// in-cluster, `$KUBECONFIG` or `~/.kube/config`.
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Reach the agent of every node, as `--node` does: for `version`, `check`, `graph`,
    /// `impact` and `dashboard`.
    #[arg(long, global = true, conflicts_with_all = ["node", "pod"])]
    all_nodes: bool,
    /// The namespace of the agent's DaemonSet, for `--node`, `--pod` and `--all-nodes`.
    #[arg(long, global = true, default_value = "mesh-system")]
    agent_namespace: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
    /// Graphviz text (`meshctl graph` only).
    Dot,
    /// An SVG drawing (`meshctl graph` only).
    Svg,
}

impl Output {
    /// JSON or YAML: the whole structure, for tools.
    fn structured(self) -> bool {
        self != Output::Table
    }
}

#[derive(Subcommand)]
enum Command {
    /// Read the pinned BPF maps and links of this node.
    Bpf {
        #[command(subcommand)]
        what: BpfCommand,
    },
    /// Ask the agent for its state: configuration generation, enrolled pods, last error.
    Status,
    /// The agent's serving state as it enforces it: workloads, Services, policies, routes.
    ConfigDump,
    /// The workload certificates the agent holds: identity, serial, validity, trust root.
    Certs,
    /// Authorization: what the destination's policies decide, from the agent's live
    /// configuration.
    Policy {
        #[command(subcommand)]
        what: PolicyCommand,
    },
    /// A Service's traffic management, from the agent's live state: its VirtualService
    /// routes and weighted destinations, its endpoints with their subsets and outlier state,
    /// and the connection pool occupancy of each cluster.
    Routes {
        /// The Service: `namespace/name`, `name.namespace`, or a hostname.
        service: String,
    },
    /// Traffic management: which route and destinations a request would take.
    Route {
        #[command(subcommand)]
        what: RouteCommand,
    },
    /// Check configuration files (Kubernetes and Istio YAML), or the objects of a cluster's
    /// Kubernetes API (`--kube`), as the agent would load them.
    Validate {
        /// A YAML file or a directory of them.
        #[arg(short = 'f', long = "filename", required_unless_present = "kube")]
        path: Option<PathBuf>,
        /// Read the objects from the Kubernetes API instead, as `--config-source kube` does
        /// (with `--kubeconfig`).
        #[arg(long, conflicts_with = "path")]
        kube: bool,
        /// Fail on warnings too.
        #[arg(long)]
        strict: bool,
    },
    /// Print the CustomResourceDefinitions of the Istio kinds the mesh reads (for a
    /// cluster without Istio; `deploy/istio-crds.yaml` holds the same).
    Crds,
    /// Whether this node can run the mesh (kernel, BTF, cgroup v2, bpffs; a CNI whose pods
    /// it can attach, no other program on their interfaces) and, unless `--pre`, whether
    /// its agent runs well: ready, every local pod enrolled, the CA answering, the same
    /// release and map layout as this meshctl. Exits with 5 when a check fails.
    Check {
        /// Only what the node offers, before installing.
        #[arg(long)]
        pre: bool,
        /// Where the host's `/proc` and `/sys` are (a pod mounting the host elsewhere).
        #[arg(long, default_value = "/")]
        host_root: PathBuf,
    },
    /// meshctl's release and map layout, and the agent's.
    Version,
    /// Print the shell completion script (e.g. `source <(meshctl completion bash)`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The service graph from every agent's live metrics: workloads and Services, and
    /// between them requests per second, 5xx share, p99 latency, TCP bytes per second and
    /// whether the traffic is mutual TLS (`-o json|yaml|table|dot|svg`).
    Graph {
        #[command(flatten)]
        sampling: Sampling,
    },
    /// What the mesh costs, measured by its agents — CPU, memory, time inside the agent
    /// and in policy evaluation per request — projected to a request rate, beside the
    /// same figures for a sidecar mesh from Istio's published numbers.
    Impact {
        #[command(flatten)]
        sampling: Sampling,
        #[command(flatten)]
        projection: Projection,
    },
    /// A local web page with the live service graph, each Service's golden signals and
    /// the impact, refreshed every window. Served on a loopback address only.
    Dashboard {
        #[command(flatten)]
        sampling: Sampling,
        #[command(flatten)]
        projection: Projection,
        /// Where to serve the page (a loopback address).
        #[arg(long, default_value = "127.0.0.1:20001")]
        listen: SocketAddr,
    },
    /// Take the mesh off this node once its agent is stopped: detach every program (the
    /// pinned links), remove the pinned maps, the capture route and its rule. Pods then
    /// talk directly, as before the mesh. Run in the node's network namespace.
    Uninstall {
        /// Go ahead although an agent answers on the admin address (it would attach
        /// its programs again at its next configuration change).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum RouteCommand {
    /// Which VirtualService route a request from a pod to a Service would take, where it
    /// would go (destinations and weights), and why the routes before it did not match.
    Check {
        /// The client pod: `namespace/name` (or `name` in `default`).
        #[arg(long)]
        from: String,
        /// The Service: `namespace/name`, `name.namespace`, or a hostname.
        #[arg(long)]
        to: String,
        /// The Service port (needed when the Service has several).
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, default_value = "GET")]
        method: String,
        /// The request's path, with its query if any.
        #[arg(long, default_value = "/")]
        path: String,
        /// A request header, `name=value`; repeatable.
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Would a connection (and a request) from one pod to a pod or Service be allowed?
    /// Answers allow or deny, the policy and rule that decided, and why the others did
    /// not match.
    Check {
        /// The client pod: `namespace/name` (or `name` in `default`).
        #[arg(long)]
        from: String,
        /// The destination: a pod (`namespace/name`) or a Service (`namespace/name`,
        /// `name.namespace` or its hostname).
        #[arg(long)]
        to: String,
        /// The destination port (the Service's port for a Service).
        #[arg(long)]
        port: u16,
        /// The request's method (an HTTP request is assumed when the policies need one).
        #[arg(long)]
        method: Option<String>,
        /// The request's path, with its query if any.
        #[arg(long)]
        path: Option<String>,
        /// A request header, `name=value`; repeatable.
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// A file holding a JWT, sent as `Authorization: Bearer`.
        #[arg(long)]
        jwt: Option<PathBuf>,
    },
}

/// Where the agents' metrics are and how long to watch them.
#[derive(Args)]
struct Sampling {
    /// An agent's metrics endpoint; repeat for every node's agent.
    #[arg(
        long = "metrics",
        env = "MESH_METRICS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:15020/metrics"
    )]
    urls: Vec<String>,
    /// How long to watch: rates are what the counters gained over it (`5s`, `500ms`, `1m`).
    #[arg(long, default_value = "5s", value_parser = parse_window)]
    window: std::time::Duration,
}

/// The request rate and prices the impact is projected to.
#[derive(Args)]
struct Projection {
    /// Requests per second to project to (default: the rate measured).
    #[arg(long)]
    rps: Option<f64>,
    /// Price of a vCPU for an hour.
    #[arg(long, default_value_t = impact::DEFAULT_VCPU_HOUR)]
    price_vcpu_hour: f64,
    /// Price of a GB (GiB) of memory for an hour.
    #[arg(long, default_value_t = impact::DEFAULT_GIB_HOUR)]
    price_gb_hour: f64,
}

impl Projection {
    fn prices(&self) -> impact::Prices {
        impact::Prices {
            vcpu_hour: self.price_vcpu_hour,
            gib_hour: self.price_gb_hour,
        }
    }
}

fn parse_window(text: &str) -> Result<std::time::Duration, String> {
    let window = config::istio::parse_duration(text)?;
    if window.is_zero() {
        return Err("the window must be longer than zero".into());
    }
    Ok(window)
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected name=value"))?;
    if name.trim().is_empty() {
        return Err(format!("{text:?}: the header name is empty"));
    }
    Ok((name.trim().to_owned(), value.to_owned()))
}

#[derive(Subcommand)]
enum BpfCommand {
    /// Programs attached to pods (tc on veths, sockops on cgroups) with run statistics.
    Programs,
    /// Workloads and Services the kernel programs know.
    Workloads,
    /// Open TCP connections of local pods: bytes, RTT, retransmits, and whether the
    /// kernel carries them pod to pod alone.
    Flows,
    /// Packets and bytes per address pair and direction, and tc verdicts.
    Metrics,
}

pub fn main(cli: Cli) -> anyhow::Result<()> {
    let format = cli.output;
    if matches!(format, Output::Dot | Output::Svg) && !matches!(cli.command, Command::Graph { .. })
    {
        return Err(Exit::new(
            EXIT_INVALID_INPUT,
            "-o dot and -o svg are for meshctl graph; use table, json or yaml",
        )
        .into());
    }
    let remoting = Remoting::of(&cli);
    let link = || AgentLink::new(cli.admin, &remoting);
    match &cli.command {
        Command::Graph { sampling } => show_graph(&remoting, sampling, format),
        Command::Impact {
            sampling,
            projection,
        } => show_impact(&remoting, sampling, projection, format),
        Command::Dashboard {
            sampling,
            projection,
            listen,
        } => serve_dashboard(&remoting, sampling, projection, *listen),
        Command::Status => status(&link()?, format),
        Command::ConfigDump => {
            let body = link()?.get("/config_dump")?;
            emit_raw(format, &body)
        }
        Command::Certs => certs(&link()?, format),
        Command::Validate {
            path,
            kube: _,
            strict,
        } => {
            let (config, origin) = match path {
                Some(path) => (config::load_path(path)?, path.display().to_string()),
                None => api_config(cli.kubeconfig.as_deref())?,
            };
            validate(&config, &origin, *strict, format)
        }
        Command::Crds => {
            print!("{}", crate::config::kinds::istio_crds());
            Ok(())
        }
        Command::Uninstall { force } => {
            if remoting.remote() {
                return Err(Exit::new(
                    EXIT_INVALID_INPUT,
                    "meshctl uninstall works on the node itself, once its agent is stopped: \
                     run it in a shell on each node, not with --node or --pod",
                )
                .into());
            }
            uninstall(&cli.bpffs, cli.admin, *force, format)
        }
        Command::Check { pre, host_root } if remoting.several() => {
            check_every(&AgentLink::every(&remoting)?, *pre, host_root, format)
        }
        Command::Check { pre, host_root } => check(&link()?, *pre, host_root, format),
        Command::Version if remoting.several() => {
            version_every(&AgentLink::every(&remoting)?, format)
        }
        Command::Version => version(&link()?, format),
        Command::Completion { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "meshctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Routes { service } => routes(&link()?, service, format),
        Command::Route {
            what:
                RouteCommand::Check {
                    from,
                    to,
                    port,
                    method,
                    path,
                    headers,
                },
        } => {
            let query = RouteQuery {
                from: from.clone(),
                host: service_hostname(to)?,
                port: *port,
                method: method.clone(),
                path: path.clone(),
                headers: headers.clone(),
            };
            route_check(&link()?, &query, format)
        }
        Command::Policy {
            what:
                PolicyCommand::Check {
                    from,
                    to,
                    port,
                    method,
                    path,
                    headers,
                    jwt,
                },
        } => {
            let jwt = match jwt {
                Some(file) => Some(
                    std::fs::read_to_string(file)
                        .with_context(|| format!("--jwt {}", file.display()))?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            let request = CheckRequest {
                from: from.clone(),
                to: to.clone(),
                port: *port,
                method: method.clone(),
                path: path.clone(),
                headers: headers.clone(),
                jwt,
            };
            policy_check(&link()?, &request, format)
        }
        Command::Bpf { what } => {
            let maps = if remoting.remote() {
                KernelView::Agent(link()?)
            } else {
                KernelView::Pins(NodeMaps::open(&cli.bpffs)?)
            };
            show_bpf(&maps, what, format)
        }
    }
}

/// Where `meshctl bpf` reads a node's maps: the pins on this machine, or the agent of a
/// node elsewhere, which reads its own (the admin API's `/bpf/VIEW`).
enum KernelView {
    Pins(NodeMaps),
    Agent(AgentLink),
}

impl KernelView {
    fn read<T: DeserializeOwned>(
        &self,
        view: maps::View,
        pins: impl FnOnce(&NodeMaps) -> maps::Result<T>,
    ) -> anyhow::Result<T> {
        match self {
            KernelView::Pins(maps) => Ok(pins(maps)?),
            KernelView::Agent(link) => {
                let body = link.get(&format!("/bpf/{}", view.name()))?;
                serde_json::from_str(&body).with_context(|| {
                    format!(
                        "{}'s /bpf/{} is not the report meshctl {} reads",
                        link.describe(),
                        view.name(),
                        env!("CARGO_PKG_VERSION")
                    )
                })
            }
        }
    }
}

fn show_bpf(maps: &KernelView, what: &BpfCommand, format: Output) -> anyhow::Result<()> {
    match what {
        BpfCommand::Programs => {
            let rows = maps.read(maps::View::Programs, NodeMaps::programs)?;
            print(
                format,
                &rows,
                &[
                    "ATTACHMENT",
                    "PROGRAM",
                    "PROG ID",
                    "LINK ID",
                    "RUNS",
                    "AVG NS",
                ],
                |r| {
                    vec![
                        r.attachment.clone(),
                        r.program.clone(),
                        r.program_id.to_string(),
                        r.link_id.to_string(),
                        r.run_count.to_string(),
                        r.run_time_ns
                            .checked_div(r.run_count)
                            .map_or("-".into(), |ns| ns.to_string()),
                    ]
                },
            )
        }
        BpfCommand::Workloads => {
            let report = maps.read(maps::View::Workloads, NodeMaps::workloads_report)?;
            if format.structured() {
                return emit(format, &report);
            }
            table(
                &[
                    "IP",
                    "NAMESPACE",
                    "POD",
                    "WORKLOAD",
                    "SERVICE ACCOUNT",
                    "LOCAL",
                    "IFINDEX",
                    "MTLS",
                    "PROBE PORTS",
                ],
                report.workloads.iter().map(|w| {
                    let probes: Vec<String> = w.probe_ports.iter().map(u16::to_string).collect();
                    vec![
                        w.ip.to_string(),
                        w.namespace.clone(),
                        w.pod.clone(),
                        w.workload.clone(),
                        w.service_account.clone(),
                        if w.local { "yes" } else { "no" }.into(),
                        w.ifindex.to_string(),
                        w.mtls.clone(),
                        probes.join(","),
                    ]
                }),
            );
            println!();
            table(
                &["SERVICE ADDRESS", "NAMESPACE", "SERVICE"],
                report
                    .services
                    .iter()
                    .map(|s| vec![s.address.to_string(), s.namespace.clone(), s.name.clone()]),
            );
            Ok(())
        }
        BpfCommand::Flows => {
            let rows = maps.read(maps::View::Flows, NodeMaps::flows)?;
            print(
                format,
                &rows,
                &[
                    "LOCAL",
                    "REMOTE",
                    "ROLE",
                    "LOCAL WORKLOAD",
                    "REMOTE WORKLOAD",
                    "SENT",
                    "RECEIVED",
                    "SRTT US",
                    "RETRANS",
                    "AGE S",
                    "DIRECT",
                ],
                |r| {
                    vec![
                        r.local.to_string(),
                        r.remote.to_string(),
                        r.role.clone(),
                        r.local_workload.clone(),
                        r.remote_workload.clone(),
                        r.bytes_sent.to_string(),
                        r.bytes_received.to_string(),
                        r.srtt_us.to_string(),
                        r.retransmits.to_string(),
                        format!("{:.1}", r.age_seconds),
                        if r.direct { "yes" } else { "-" }.into(),
                    ]
                },
            )
        }
        BpfCommand::Metrics => {
            let report = maps.read(maps::View::Metrics, NodeMaps::metrics_report)?;
            if format.structured() {
                return emit(format, &report);
            }
            table(
                &["SOURCE", "DESTINATION", "DIRECTION", "PACKETS", "BYTES"],
                report.traffic.iter().map(|t| {
                    vec![
                        t.source.to_string(),
                        t.destination.to_string(),
                        t.direction.clone(),
                        t.packets.to_string(),
                        t.bytes.to_string(),
                    ]
                }),
            );
            println!();
            table(
                &["TC VERDICT", "PACKETS"],
                report
                    .verdicts_in_order()
                    .map(|(k, v)| vec![k.to_owned(), v.to_string()]),
            );
            Ok(())
        }
    }
}

/// The agent's admin port (`--admin`'s default), which a port-forward reaches on its node.
const ADMIN_PORT: u16 = 15000;

/// Where the agent is: on this machine (`--admin`), or on a node reached through the
/// Kubernetes API (`--node`, `--pod`). One runtime serves every request, as the
/// Kubernetes client lives on it.
struct AgentLink {
    runtime: Rc<tokio::runtime::Runtime>,
    reach: Reach,
}

enum Reach {
    Local(SocketAddr),
    Remote(Arc<remote::Remote>),
}

/// The nodes whose agents are reached through the Kubernetes API (`--node`, `--pod`), and
/// how.
struct Remoting {
    targets: Vec<remote::Target>,
    all_nodes: bool,
    kubeconfig: Option<PathBuf>,
    namespace: String,
}

impl Remoting {
    fn of(cli: &Cli) -> Remoting {
        let mut targets: Vec<remote::Target> =
            cli.node.iter().cloned().map(remote::Target::Node).collect();
        targets.extend(cli.pod.clone());
        Remoting {
            targets,
            all_nodes: cli.all_nodes,
            kubeconfig: cli.kubeconfig.clone(),
            namespace: cli.agent_namespace.clone(),
        }
    }

    /// Whether agents are reached through the Kubernetes API.
    fn remote(&self) -> bool {
        self.all_nodes || !self.targets.is_empty()
    }

    /// Whether more than one agent is asked for.
    fn several(&self) -> bool {
        self.all_nodes || self.targets.len() > 1
    }

    /// Every target's agent; a failure carries the exit code it deserves.
    async fn find(&self) -> anyhow::Result<Vec<Arc<remote::Remote>>> {
        let found = if self.all_nodes {
            remote::Remote::find_every(self.kubeconfig.as_deref(), &self.namespace).await
        } else {
            remote::Remote::find_all(self.kubeconfig.as_deref(), &self.namespace, &self.targets)
                .await
        };
        found.map_err(|err| {
            let code = match &err {
                remote::RemoteError::Pod {
                    source: kube::Error::Api(status),
                    ..
                } if status.is_not_found() => EXIT_INVALID_INPUT,
                _ => EXIT_AGENT_UNREACHABLE,
            };
            anyhow::Error::new(err).context(Exit::new(
                code,
                "reaching the node's agent through the Kubernetes API",
            ))
        })
    }

    /// Where `graph`, `impact` and `dashboard` read metrics: the targets' agents, or else
    /// the `--metrics` URLs.
    async fn metrics_sources(&self, sampling: &Sampling) -> anyhow::Result<Vec<scrape::Source>> {
        if !self.remote() {
            return Ok(sampling
                .urls
                .iter()
                .cloned()
                .map(scrape::Source::Url)
                .collect());
        }
        Ok(self
            .find()
            .await?
            .into_iter()
            .map(scrape::Source::Agent)
            .collect())
    }
}

/// The runtime of a CLI command: one thread, the command waits on it.
fn cli_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

impl AgentLink {
    fn new(admin: SocketAddr, remoting: &Remoting) -> anyhow::Result<AgentLink> {
        if remoting.several() {
            return Err(Exit::new(
                EXIT_INVALID_INPUT,
                "--node names one node here (several, or --all-nodes, are for version, \
                 check, graph, impact and dashboard)",
            )
            .into());
        }
        let runtime = Rc::new(cli_runtime()?);
        let reach = if remoting.remote() {
            let mut found = runtime.block_on(remoting.find())?;
            Reach::Remote(found.remove(0))
        } else {
            Reach::Local(admin)
        };
        Ok(AgentLink { runtime, reach })
    }

    /// A link to each agent `remoting` names (`--node a,b`, `--all-nodes`), on one
    /// runtime, where the Kubernetes client lives.
    fn every(remoting: &Remoting) -> anyhow::Result<Vec<AgentLink>> {
        let runtime = Rc::new(cli_runtime()?);
        let found = runtime.block_on(remoting.find())?;
        Ok(found
            .into_iter()
            .map(|remote| AgentLink {
                runtime: runtime.clone(),
                reach: Reach::Remote(remote),
            })
            .collect())
    }

    /// The node of a remote agent.
    fn node(&self) -> &str {
        match &self.reach {
            Reach::Local(_) => "-",
            Reach::Remote(remote) => &remote.node,
        }
    }

    fn describe(&self) -> String {
        match &self.reach {
            Reach::Local(admin) => format!("the agent at {admin}"),
            Reach::Remote(remote) => remote.describe(),
        }
    }

    /// A GET to the agent's admin API; the body on 200.
    fn get(&self, path: &str) -> anyhow::Result<String> {
        self.request("GET", path, "")
    }

    /// A request to the agent's admin API; the body on 200.
    fn request(&self, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
        let address = match &self.reach {
            Reach::Local(admin) => admin.to_string(),
            Reach::Remote(remote) => format!("{}:{ADMIN_PORT}", remote.pod),
        };
        let mut request = match method {
            "POST" => client::Request::post_json(address, path, body.to_owned()),
            _ => client::Request::get(address, path),
        };
        request.max_body = 64 << 20;
        let response = match &self.reach {
            Reach::Local(admin) => {
                match self
                    .runtime
                    .block_on(client::send(&Transport::Plain, request))
                {
                    Ok(response) => response,
                    Err(err @ ClientError::Connect { .. }) => {
                        return Err(anyhow::Error::new(err).context(Exit::new(
                            EXIT_AGENT_UNREACHABLE,
                            format!(
                                "no mesh agent answers at {admin}: is it running on this node? \
                                 (see --admin, or reach a node's agent with --node)"
                            ),
                        )))
                    }
                    Err(err) => return Err(err.into()),
                }
            }
            Reach::Remote(remote) => self
                .runtime
                .block_on(remote.send(ADMIN_PORT, request))
                .map_err(|err| {
                    let message = format!("{} does not answer", remote.describe());
                    anyhow::Error::new(err).context(Exit::new(EXIT_AGENT_UNREACHABLE, message))
                })?,
        };
        if response.status != http::StatusCode::OK {
            bail!(
                "{} answered {}: {}",
                self.describe(),
                response.status,
                response.text()
            );
        }
        Ok(response.text())
    }
}

/// The objects of the Kubernetes API as the agent's API source reads them, and the server.
fn api_config(
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<(config::ClusterConfig, String)> {
    use config::source::ConfigSource;
    let runtime = cli_runtime()?;
    runtime.block_on(async {
        let mut source = config::kube_api::KubeSource::start(kubeconfig).await?;
        let config = source
            .poll()
            .context("the Kubernetes API source gave no configuration")??;
        Ok((config, source.describe()))
    })
}

fn validate(
    config: &config::ClusterConfig,
    origin: &str,
    strict: bool,
    format: Output,
) -> anyhow::Result<()> {
    // Objects the API source skipped are errors of the objects as the API holds them.
    let mut diagnostics: Vec<_> = config
        .diagnostics
        .iter()
        .chain(&config.skipped)
        .cloned()
        .collect();
    diagnostics.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    let errors = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let warnings = diagnostics.len() - errors;
    if format.structured() {
        emit(
            format,
            &serde_json::json!({"errors": errors, "warnings": warnings, "diagnostics": diagnostics}),
        )?;
    } else {
        for diagnostic in &diagnostics {
            println!("{diagnostic}");
        }
        println!("{origin}: {errors} errors, {warnings} warnings");
    }
    if errors > 0 || (strict && warnings > 0) {
        return Err(Exit::new(
            EXIT_INVALID_INPUT,
            format!("validation failed: {errors} errors, {warnings} warnings"),
        )
        .into());
    }
    Ok(())
}

fn certs(agent: &AgentLink, format: Output) -> anyhow::Result<()> {
    let body = agent.get("/certs")?;
    if format.structured() {
        emit_raw(format, &body)?;
        return Ok(());
    }
    let report: serde_json::Value =
        serde_json::from_str(&body).context("the agent's /certs is not JSON")?;
    let root = &report["trust_root"];
    println!(
        "trust domain {}, trust root {} (serial {}, expires {})",
        report["trust_domain"].as_str().unwrap_or("?"),
        root["subject"].as_str().unwrap_or("?"),
        root["serial"].as_str().unwrap_or("?"),
        expiry(root["not_after"].as_i64()),
    );
    let rows = report["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    table(
        &["IDENTITY", "SERIAL", "EXPIRES", "ISSUER"],
        rows.iter().map(|c| {
            vec![
                c["identity"].as_str().unwrap_or("?").to_owned(),
                c["serial"].as_str().unwrap_or("?").to_owned(),
                expiry(c["not_after"].as_i64()),
                c["issuer"].as_str().unwrap_or("?").to_owned(),
            ]
        }),
    );
    Ok(())
}

/// A UNIX time as UTC and as time left.
fn expiry(unix: Option<i64>) -> String {
    let Some(unix) = unix else {
        return "?".into();
    };
    let now = crate::identity::certs::unix_now();
    let when = time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| unix.to_string());
    format!("{when} (in {}s)", unix - now)
}

/// The hostname a user means: `namespace/name` and `name.namespace` name a Kubernetes
/// Service; anything else is taken as a hostname as it is.
fn service_hostname(service: &str) -> anyhow::Result<String> {
    if let Some((namespace, name)) = service.split_once('/') {
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            anyhow::bail!("{service:?}: expected namespace/name, name.namespace or a hostname");
        }
        return Ok(format!("{name}.{namespace}.svc.cluster.local"));
    }
    match service.matches('.').count() {
        0 => {
            anyhow::bail!("{service:?}: name the namespace too (namespace/name or name.namespace)")
        }
        1 => Ok(format!("{service}.svc.cluster.local")),
        _ => Ok(service.to_owned()),
    }
}

fn routes(agent: &AgentLink, service: &str, format: Output) -> anyhow::Result<()> {
    let host = service_hostname(service)?;
    let body = agent.get(&format!("/routes/{host}"))?;
    if format.structured() {
        emit_raw(format, &body)?;
        return Ok(());
    }
    let report: serde_json::Value =
        serde_json::from_str(&body).context("the agent's /routes is not JSON")?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    println!(
        "{host}  VirtualService: {}",
        report["virtual_service"]
            .as_str()
            .unwrap_or("none (balanced per connection)")
    );
    let destinations_text = |destinations: &Vec<serde_json::Value>| {
        destinations
            .iter()
            .map(|d| {
                let subset = d["subset"]
                    .as_str()
                    .map(|s| format!(" subset {s}"))
                    .unwrap_or_default();
                format!("{}{subset} {}%", text(&d["host"]), d["weight"])
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    for rule in report["http"].as_array().into_iter().flatten() {
        let action = &rule["action"];
        let what = if let Some(destinations) = action["route"].as_array() {
            destinations_text(destinations)
        } else if action.get("redirect").is_some() {
            format!("redirect {}", action["redirect"]["status"])
        } else {
            format!("direct response {}", action["direct_response"]["status"])
        };
        println!(
            "  route {:<16} → {what}  (retries {}, timeout {})",
            text(&rule["name"]),
            rule["retries"]["attempts"],
            duration_text(&rule["timeout"])
        );
        let cors = &rule["cors"];
        if !cors.is_null() {
            println!(
                "    CORS origins {}, methods {}, headers {}, expose {}, max age {}, credentials {}",
                cors["allow_origins"],
                text(&cors["allow_methods"]),
                text(&cors["allow_headers"]),
                text(&cors["expose_headers"]),
                text(&cors["max_age"]),
                cors["allow_credentials"]
            );
        }
    }
    for rule in report["tls"].as_array().into_iter().flatten() {
        let names: Vec<String> = rule["matches"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|m| m["sni_hosts"].as_array().cloned().unwrap_or_default())
            .map(|name| text(&name))
            .collect();
        let destinations = rule["destinations"].as_array().cloned().unwrap_or_default();
        println!(
            "  tls sni {:<14} → {}",
            names.join(","),
            destinations_text(&destinations)
        );
    }
    for port in report["ports"].as_array().into_iter().flatten() {
        println!(
            "port {} ({}{})",
            port["port"],
            text(&port["address"]),
            match port["protocol"].as_str() {
                Some("http") => ", HTTP",
                Some("tls") => ", TLS",
                Some("undeclared") => ", sniffed when routes need it",
                _ => "",
            }
        );
        for balancer in port["load_balancers"].as_array().into_iter().flatten() {
            let cluster = match balancer["subset"].as_str() {
                Some(subset) => format!("subset {subset}"),
                None => "host".to_owned(),
            };
            println!(
                "  load balancer ({cluster}): {}",
                text(&balancer["summary"])
            );
        }
        let clusters = port["clusters"].as_array().cloned().unwrap_or_default();
        for endpoint in port["endpoints"].as_array().into_iter().flatten() {
            let address = text(&endpoint["address"]);
            let ejected = clusters
                .iter()
                .flat_map(|c| c["outliers"].as_array().cloned().unwrap_or_default())
                .find(|o| o["address"] == endpoint["address"] && o["ejected"] == true)
                .map(|o| format!("  EJECTED (returns in {} ms)", o["returnsInMs"]))
                .unwrap_or_default();
            println!(
                "  {address:<22} {:<28} {:<12} subsets {}{ejected}",
                text(&endpoint["pod"]),
                text(&endpoint["locality"]),
                endpoint["subsets"]
            );
        }
        for cluster in &clusters {
            for pool in cluster["pools"].as_array().into_iter().flatten() {
                println!(
                    "  pool {} from {}: connections {}/{}, pending {}/{}, overflows {}",
                    text(&cluster["name"]),
                    text(&pool["source"]),
                    pool["connections"]["inUse"],
                    pool["connections"]["limit"],
                    pool["pendingRequests"]["inUse"],
                    pool["pendingRequests"]["limit"],
                    pool["connections"]["overflows"].as_u64().unwrap_or(0)
                        + pool["pendingRequests"]["overflows"].as_u64().unwrap_or(0)
                        + pool["requests"]["overflows"].as_u64().unwrap_or(0)
                );
            }
        }
    }
    Ok(())
}

fn route_check(agent: &AgentLink, query: &RouteQuery, format: Output) -> anyhow::Result<()> {
    let answer = agent.request("POST", "/routes/check", &serde_json::to_string(query)?)?;
    if format.structured() {
        emit_raw(format, &answer)?;
        return Ok(());
    }
    let answer: serde_json::Value =
        serde_json::from_str(&answer).context("malformed answer from the agent")?;
    println!(
        "{} → {}:{}  VirtualService: {}",
        query.from,
        query.host,
        answer["port"],
        answer["virtual_service"].as_str().unwrap_or("none")
    );
    for reason in answer["why"].as_array().into_iter().flatten() {
        println!("  {}", reason.as_str().unwrap_or_default());
    }
    for destination in answer["destinations"].as_array().into_iter().flatten() {
        let subset = destination["subset"]
            .as_str()
            .map(|s| format!(" subset {s}"))
            .unwrap_or_default();
        println!(
            "  → {}{subset}: {}%",
            destination["host"].as_str().unwrap_or("?"),
            destination["weight"]
        );
    }
    if let Some(text) = answer["answer"].as_str() {
        println!("  → {text}");
    }
    Ok(())
}

/// A serialised `Duration` (`{"secs", "nanos"}`) as `1.5s`; `none` when absent.
fn duration_text(value: &serde_json::Value) -> String {
    match (value["secs"].as_u64(), value["nanos"].as_u64()) {
        (Some(secs), Some(nanos)) => format!("{}s", secs as f64 + nanos as f64 / 1e9),
        _ => "none".into(),
    }
}

/// What `meshctl version` and `check` compare: this build's release and map layout.
fn own_version() -> serde_json::Value {
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "maps_layout": mesh_common::MAPS_LAYOUT_VERSION,
    })
}

/// An agent's node, release and map layout, from its status.
fn agent_version(link: &AgentLink) -> Option<serde_json::Value> {
    link.get("/status")
        .ok()
        .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
        .map(|status| {
            serde_json::json!({
                "node": status["node"],
                "version": status["version"],
                "maps_layout": status["maps_layout"],
            })
        })
}

fn print_own_version() {
    let own = own_version();
    println!(
        "meshctl {} (maps layout {})",
        own["version"].as_str().unwrap_or("?"),
        own["maps_layout"]
    );
}

/// meshctl's release and every agent's (`--all-nodes`, `--node a,b`), an unreachable one
/// named as such.
fn version_every(links: &[AgentLink], format: Output) -> anyhow::Result<()> {
    let agents: Vec<serde_json::Value> = links
        .iter()
        .map(|link| {
            agent_version(link).unwrap_or_else(
                || serde_json::json!({"node": link.node(), "unreachable": link.describe()}),
            )
        })
        .collect();
    if format.structured() {
        return emit(
            format,
            &serde_json::json!({"meshctl": own_version(), "agents": agents}),
        );
    }
    print_own_version();
    for agent in &agents {
        match agent["unreachable"].as_str() {
            Some(what) => println!("agent   not reachable: {what}"),
            None => println!(
                "agent   {} (maps layout {}) on {}",
                agent["version"].as_str().unwrap_or("?"),
                agent["maps_layout"],
                agent["node"].as_str().unwrap_or("?")
            ),
        }
    }
    Ok(())
}

fn version(link: &AgentLink, format: Output) -> anyhow::Result<()> {
    let agent = agent_version(link);
    if format.structured() {
        return emit(
            format,
            &serde_json::json!({"meshctl": own_version(), "agent": agent}),
        );
    }
    print_own_version();
    match agent {
        Some(agent) => println!(
            "agent   {} (maps layout {}) on {}",
            agent["version"].as_str().unwrap_or("?"),
            agent["maps_layout"],
            agent["node"].as_str().unwrap_or("?")
        ),
        None => println!("agent   not reachable: {}", link.describe()),
    }
    Ok(())
}

/// The agent's side of `meshctl check`: reachable, ready, every pod enrolled, and the
/// same release and map layout as this meshctl.
fn agent_findings(agent: &AgentLink) -> Vec<Finding> {
    let status = match agent.get("/status").and_then(|body| {
        serde_json::from_str::<serde_json::Value>(&body).context("the agent's /status is not JSON")
    }) {
        Ok(status) => status,
        Err(err) => {
            return vec![Finding {
                check: "agent".into(),
                ok: false,
                detail: format!("{err:#}"),
            }]
        }
    };
    let own = own_version();
    let same = status["version"] == own["version"] && status["maps_layout"] == own["maps_layout"];
    let ca = &status["ca"];
    let ca_address = ca["address"].as_str().unwrap_or("?");
    let pending: Vec<String> = status["pending"]
        .as_object()
        .map(|pods| {
            pods.iter()
                .map(|(pod, why)| format!("{pod} ({})", why.as_str().unwrap_or("?")))
                .collect()
        })
        .unwrap_or_default();
    vec![
        Finding {
            check: "agent".into(),
            ok: status["ready"] == true,
            detail: match status["not_ready_reason"].as_str() {
                Some(reason) => format!("not ready: {reason}"),
                None => format!(
                    "ready on {}, configuration generation {}",
                    status["node"].as_str().unwrap_or("?"),
                    status["generation"]
                ),
            },
        },
        Finding {
            check: "enrollment".into(),
            ok: pending.is_empty(),
            detail: if pending.is_empty() {
                format!(
                    "{} local pods enrolled",
                    status["enrolled"].as_object().map_or(0, |pods| pods.len())
                )
            } else {
                format!("not enrolled: {}", pending.join(", "))
            },
        },
        Finding {
            check: "ca".into(),
            ok: ca["failing"].is_null(),
            detail: match (ca["failing"].as_str(), ca["last_signed"].as_i64()) {
                (Some(failing), _) => format!(
                    "{ca_address}: {failing}; the certificates in hand serve until they expire"
                ),
                (None, Some(signed)) => format!(
                    "{ca_address}: last certificate signed {}s ago",
                    crate::identity::certs::unix_now() - signed
                ),
                (None, None) => {
                    format!("{ca_address}: not asked yet (no local workload needs a certificate)")
                }
            },
        },
        Finding {
            check: "version".into(),
            ok: same,
            detail: format!(
                "agent {} (maps layout {}), meshctl {} (maps layout {})",
                status["version"].as_str().unwrap_or("?"),
                status["maps_layout"],
                own["version"].as_str().unwrap_or("?"),
                own["maps_layout"]
            ),
        },
    ]
}

/// One node's findings. The node's own come from this machine, or, for a node reached
/// with `--node`, from its agent, which judges the node it runs on (`/preflight`); then,
/// unless `pre`, the agent's.
fn findings_of(agent: &AgentLink, pre: bool, host_root: &Path) -> Vec<Finding> {
    let mut findings = match agent.reach {
        Reach::Local(_) => preflight::check_node(host_root),
        Reach::Remote(_) => match agent.get("/preflight").and_then(|body| {
            serde_json::from_str::<Vec<Finding>>(&body).with_context(|| {
                format!(
                    "{}'s /preflight is not a list of findings",
                    agent.describe()
                )
            })
        }) {
            Ok(found) => found,
            Err(err) => vec![Finding {
                check: "node".into(),
                ok: false,
                detail: format!("{err:#}"),
            }],
        },
    };
    if !pre {
        findings.extend(agent_findings(agent));
    }
    findings
}

fn checks_failed(failed: usize, total: usize) -> anyhow::Result<()> {
    if failed > 0 {
        return Err(Exit::new(
            EXIT_CHECK_FAILED,
            format!("{failed} of {total} checks failed"),
        )
        .into());
    }
    Ok(())
}

/// Every node's checks (`--all-nodes`, `--node a,b`), by node.
fn check_every(
    links: &[AgentLink],
    pre: bool,
    host_root: &Path,
    format: Output,
) -> anyhow::Result<()> {
    let nodes: Vec<(&str, Vec<Finding>)> = links
        .iter()
        .map(|link| (link.node(), findings_of(link, pre, host_root)))
        .collect();
    let all = || {
        nodes
            .iter()
            .flat_map(|(node, findings)| findings.iter().map(move |f| (*node, f)))
    };
    if format.structured() {
        let report: Vec<serde_json::Value> = nodes
            .iter()
            .map(|(node, findings)| serde_json::json!({"node": node, "findings": findings}))
            .collect();
        emit(format, &report)?;
    } else {
        table(
            &["NODE", "CHECK", "RESULT", "DETAIL"],
            all().map(|(node, f)| {
                vec![
                    node.to_owned(),
                    f.check.clone(),
                    if f.ok { "ok" } else { "FAIL" }.to_owned(),
                    f.detail.clone(),
                ]
            }),
        );
    }
    checks_failed(all().filter(|(_, f)| !f.ok).count(), all().count())
}

fn check(agent: &AgentLink, pre: bool, host_root: &Path, format: Output) -> anyhow::Result<()> {
    let findings = findings_of(agent, pre, host_root);
    let failed = findings.iter().filter(|f| !f.ok).count();
    if format.structured() {
        emit(format, &findings)?;
    } else {
        table(
            &["CHECK", "RESULT", "DETAIL"],
            findings.iter().map(|f| {
                vec![
                    f.check.clone(),
                    if f.ok { "ok" } else { "FAIL" }.to_owned(),
                    f.detail.clone(),
                ]
            }),
        );
    }
    checks_failed(failed, findings.len())
}

fn uninstall(bpffs: &Path, admin: SocketAddr, force: bool, format: Output) -> anyhow::Result<()> {
    let agent_running =
        std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(1)).is_ok();
    if agent_running && !force {
        anyhow::bail!(
            "an agent answers on {admin}: stop it first (delete the DaemonSet, or stop the \
             agent on this node), or pass --force"
        );
    }
    let done = crate::datapath::uninstall::uninstall(bpffs)?;
    if format.structured() {
        return emit(format, &done);
    }
    println!(
        "removed {} pinned links (programs detached), {} pinned maps, {} routing rules{}",
        done.links.len(),
        done.maps.len(),
        done.rules,
        if done.routes_flushed {
            " and the capture route table"
        } else {
            ""
        }
    );
    for path in &done.left {
        println!("left {} (not the mesh's)", path.display());
    }
    Ok(())
}

fn status(agent: &AgentLink, format: Output) -> anyhow::Result<()> {
    let body = agent.get("/status")?;
    let status: serde_json::Value =
        serde_json::from_str(&body).context("the agent's /status is not JSON")?;
    if format.structured() {
        emit_raw(format, &body)?;
    } else {
        print_status(&status);
    }
    if status.get("ready") != Some(&serde_json::Value::Bool(true)) {
        return Err(Exit::new(EXIT_CHECK_FAILED, "the agent is not ready").into());
    }
    Ok(())
}

fn print_status(status: &serde_json::Value) {
    let field = |name: &str| status.get(name).cloned().unwrap_or(serde_json::Value::Null);
    println!("node:          {}", field("node").as_str().unwrap_or("?"));
    println!("source:        {}", field("source").as_str().unwrap_or("?"));
    match field("not_ready_reason").as_str() {
        Some(reason) => println!("ready:         {} ({reason})", field("ready")),
        None => println!("ready:         {}", field("ready")),
    }
    println!("generation:    {}", field("generation"));
    println!(
        "last error:    {}",
        field("last_error").as_str().unwrap_or("none")
    );
    println!(
        "workloads:     {} known, services: {}",
        field("workloads"),
        field("services")
    );
    println!("connections:   {} proxied", field("proxied_connections"));
    if let Some(skipped) = status.get("skipped").and_then(|s| s.as_array()) {
        for object in skipped {
            println!("  skipped {}", object.as_str().unwrap_or("?"));
        }
    }
    if let Some(enrolled) = status.get("enrolled").and_then(|e| e.as_object()) {
        println!("enrolled pods: {}", enrolled.len());
        for (pod, info) in enrolled {
            let wiring = if info.get("bridged") == Some(&serde_json::Value::Bool(true)) {
                " (bridge port)"
            } else {
                ""
            };
            println!(
                "  {pod:<30} {:<15} {}{wiring}",
                info.get("ip").and_then(|v| v.as_str()).unwrap_or("?"),
                info.get("veth").and_then(|v| v.as_str()).unwrap_or("?")
            );
        }
    }
    if let Some(pending) = status.get("pending").and_then(|e| e.as_object()) {
        for (pod, reason) in pending {
            println!("  pending {pod}: {}", reason.as_str().unwrap_or("?"));
        }
    }
    if let Some(maps) = status.get("maps").and_then(|m| m.as_array()) {
        println!("kernel maps:");
        for map in maps {
            let number = |key: &str| map.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
            let refused = number("refused");
            println!(
                "  {:<18} {:>7} / {:<7}{}",
                map.get("map").and_then(|v| v.as_str()).unwrap_or("?"),
                number("entries"),
                number("capacity"),
                if refused > 0 {
                    format!(" FULL: {refused} refused")
                } else {
                    String::new()
                }
            );
        }
    }
    if field("capture_unknown").as_bool() == Some(true) {
        println!("  maps incomplete: every new connection of the node's pods goes to the agent");
    }
    if let Some(failing) = status.get("failing_closed").and_then(|e| e.as_object()) {
        for (pod, how) in failing {
            println!("  failing closed {pod}: {}", how.as_str().unwrap_or("?"));
        }
    }
}

fn policy_check(agent: &AgentLink, request: &CheckRequest, format: Output) -> anyhow::Result<()> {
    let body = serde_json::to_string(request)?;
    let answer = agent.request("POST", "/policy/check", &body)?;
    let report: serde_json::Value =
        serde_json::from_str(&answer).context("malformed answer from the agent")?;
    if format.structured() {
        emit_raw(format, &answer)?;
    } else {
        print_policy_report(&report);
    }
    if report.get("decision").and_then(|d| d.as_str()) == Some("deny") {
        return Err(Exit::new(EXIT_DENIED, "denied").into());
    }
    Ok(())
}

fn print_policy_report(report: &serde_json::Value) {
    let text = |v: &serde_json::Value, key: &str| {
        v.get(key)
            .and_then(|s| s.as_str())
            .unwrap_or("-")
            .to_owned()
    };
    println!(
        "{}: {} ({}) → {}",
        text(report, "decision").to_uppercase(),
        text(report, "source"),
        text(report, "source_principal"),
        text(report, "destination")
    );
    let empty = Vec::new();
    for endpoint in report
        .get("endpoints")
        .and_then(|e| e.as_array())
        .unwrap_or(&empty)
    {
        println!(
            "  {} {}: {} ({}, decided per {}, carried by the {}) — {}",
            text(endpoint, "workload"),
            text(endpoint, "address"),
            text(endpoint, "decision"),
            text(endpoint, "outcome"),
            text(endpoint, "layer"),
            text(endpoint, "carried_by"),
            text(endpoint, "reason")
        );
        if let Some(auth) = endpoint.get("authentication").and_then(|a| a.as_str()) {
            println!("    authentication: {auth}");
        }
        for audit in endpoint
            .get("audited")
            .and_then(|a| a.as_array())
            .unwrap_or(&empty)
        {
            println!(
                "    audited by {} rules[{}]",
                text(audit, "policy"),
                audit.get("rule").map_or("?".into(), |r| r.to_string())
            );
        }
        for miss in endpoint
            .get("not_matched")
            .and_then(|a| a.as_array())
            .unwrap_or(&empty)
        {
            println!(
                "    {} {} did not match:",
                text(miss, "action"),
                text(miss, "policy")
            );
            for reason in miss
                .get("reasons")
                .and_then(|r| r.as_array())
                .unwrap_or(&empty)
            {
                println!("      {}", reason.as_str().unwrap_or("?"));
            }
        }
    }
}

/// Prints `value` as JSON or YAML, as `-o` asks.
fn emit(format: Output, value: &impl Serialize) -> anyhow::Result<()> {
    match format {
        Output::Yaml => print!("{}", serde_norway::to_string(value)?),
        Output::Json | Output::Table | Output::Dot | Output::Svg => {
            println!("{}", serde_json::to_string_pretty(value)?)
        }
    }
    Ok(())
}

/// Every agent's window, read as `sampling` says from the agents `remoting` names or the
/// `--metrics` URLs; an agent that does not answer exits with `EXIT_AGENT_UNREACHABLE`,
/// naming it.
fn watch(remoting: &Remoting, sampling: &Sampling) -> anyhow::Result<Vec<scrape::Window>> {
    check_metrics_urls(remoting, sampling)?;
    let runtime = cli_runtime()?;
    let window = sampling.window;
    runtime.block_on(async {
        let sources = remoting.metrics_sources(sampling).await?;
        let agents = graph::agents(sources.len());
        scrape::measure(&sources, window, || {
            eprintln!("read the metrics of {agents}; reading again in {window:?}");
        })
        .await
        .map_err(|err| {
            if err.unreachable() {
                anyhow::Error::new(err).context(Exit::new(
                    EXIT_AGENT_UNREACHABLE,
                    "an agent's metrics are out of reach (see --metrics, or --node)",
                ))
            } else {
                err.into()
            }
        })
    })
}

/// `--metrics` URLs are checked before anything is read (unless `--node` replaces them).
fn check_metrics_urls(remoting: &Remoting, sampling: &Sampling) -> anyhow::Result<()> {
    if !remoting.remote() {
        for url in &sampling.urls {
            scrape::split_url(url)
                .map_err(|err| Exit::new(EXIT_INVALID_INPUT, format!("--metrics {err}")))?;
        }
    }
    Ok(())
}

fn show_graph(remoting: &Remoting, sampling: &Sampling, format: Output) -> anyhow::Result<()> {
    let graph = graph::build(&watch(remoting, sampling)?);
    match format {
        Output::Dot => print!("{}", graph::dot(&graph)),
        Output::Svg => print!("{}", svg::render(&graph)),
        Output::Json | Output::Yaml => emit(format, &graph)?,
        Output::Table => table(
            &[
                "SOURCE",
                "DESTINATION",
                "PROTO",
                "RPS",
                "5XX",
                "P99 MS",
                "BYTES/S",
                "MTLS",
            ],
            graph.edges.iter().map(|e| {
                vec![
                    e.source.clone(),
                    e.destination.clone(),
                    e.protocol.to_owned(),
                    format!("{:.2}", e.requests_per_second),
                    graph::figure(e.error_rate.map(|r| r * 100.0), 1) + "%",
                    graph::figure(e.p99_ms, 2),
                    format!("{:.0}", e.bytes_per_second),
                    if e.mutual_tls { "yes" } else { "no" }.to_owned(),
                ]
            }),
        ),
    }
    Ok(())
}

fn show_impact(
    remoting: &Remoting,
    sampling: &Sampling,
    projection: &Projection,
    format: Output,
) -> anyhow::Result<()> {
    let windows = watch(remoting, sampling)?;
    let graph = graph::build(&windows);
    let measured = impact::measure(&windows, graph::total_requests_per_second(&graph));
    let impact = impact::project(measured, projection.rps, projection.prices());
    if format.structured() {
        return emit(format, &impact);
    }
    let m = &impact.measured;
    println!(
        "measured over {:.1} s by {}: {:.2} requests/s, {} CPU cores, {} MiB; time \
         inside the agent per request p90: source {} ms, destination {} ms",
        m.window_seconds,
        graph::agents(m.agents),
        m.requests_per_second,
        graph::figure(m.cpu_cores, 3),
        graph::figure(m.memory_mib, 1),
        graph::figure(m.source_agent.p90_ms, 3),
        graph::figure(m.destination_agent.p90_ms, 3),
    );
    println!();
    table(
        &["", "THIS MESH (MEASURED)", "SIDECARS (ISTIO'S FIGURES)"],
        impact::rows(&impact).into_iter().map(Vec::from),
    );
    Ok(())
}

fn serve_dashboard(
    remoting: &Remoting,
    sampling: &Sampling,
    projection: &Projection,
    listen: SocketAddr,
) -> anyhow::Result<()> {
    dashboard::check_listen(listen).map_err(|err| Exit::new(EXIT_INVALID_INPUT, err))?;
    check_metrics_urls(remoting, sampling)?;
    let runtime = cli_runtime()?;
    runtime.block_on(async {
        let settings = dashboard::Settings {
            sources: remoting.metrics_sources(sampling).await?,
            window: sampling.window,
            rps: projection.rps,
            prices: projection.prices(),
        };
        let listener =
            crate::http::listener(listen).with_context(|| format!("listening on {listen}"))?;
        eprintln!(
            "dashboard on http://{listen}/ reading {} every {:?}",
            graph::agents(settings.sources.len()),
            settings.window
        );
        dashboard::run(listener, settings).await;
        Ok(())
    })
}

/// Prints the agent's JSON answer as `-o` asks.
fn emit_raw(format: Output, body: &str) -> anyhow::Result<()> {
    match format {
        Output::Yaml => {
            let value: serde_json::Value =
                serde_json::from_str(body).context("the agent's answer is not JSON")?;
            emit(format, &value)
        }
        Output::Json | Output::Table | Output::Dot | Output::Svg => {
            println!("{}", body.trim_end());
            Ok(())
        }
    }
}

fn print<T: Serialize>(
    format: Output,
    rows: &[T],
    headers: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    if format.structured() {
        return emit(format, &rows);
    }
    table(headers, rows.iter().map(cells));
    Ok(())
}

/// Prints left-aligned columns sized to their widest cell.
fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}
