//! The node agent's wiring and life: load the datapath, bind the listeners, start the
//! proxy, the metrics, the certificate manager and the admin servers, then keep the
//! agent in line with its configuration source (`reconcile`, enrolling local pods with
//! `enroll`) until told to stop or replaced (`handover`), then drain. Freed memory goes
//! back to the system after bursts (`memory`).

pub mod admin;
pub mod enroll;
pub mod fdlimit;
pub mod handover;
mod memory;
pub mod reconcile;
pub mod resolve;

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use mesh_common::{
    capture_listener,
    enrollment::{self, DefaultEnrollment},
    pins, METRICS_PORT, OUTBOUND_CAPTURE_PORT, TUNNEL_PORT,
};
use tokio_util::sync::CancellationToken;

use crate::{
    app::{
        admin::AdminView,
        enroll::Enroller,
        handover::Listeners,
        reconcile::{lock, AgentStatus, Reconciler, Reload, SharedResolved, SharedStatus},
    },
    config::origin::{self, SourceKind},
    datapath::{self, capacity::Capacities, capture_lookup::CaptureLookup, AgentLease, Datapath},
    errors::describe,
    http::{server, Intake},
    identity::{
        ca::CaClient,
        certs::{CaContact, CertManager},
        tls::Identities,
    },
    model::{lb::LbRegistry, MeshSettings, SharedState},
    policy::{jwks, jwt::JwksCache},
    proxy::{
        dns::{self, DnsProxy},
        inbound, outbound,
        plan::PlanSettings,
        pool::HbonePool,
        requests::Guard,
        Proxy,
    },
    telemetry::{
        conns::ConnTable,
        metrics::{KernelMaps, Metrics},
        request_metrics::{LabelSettings, RequestMetrics},
    },
};

/// The node agent's settings: its command-line flags, each also an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentOptions {
    /// This node's name, as in the Pods' `spec.nodeName`.
    #[arg(long, env = "MESH_NODE_NAME")]
    pub node: String,
    /// Where the cluster's objects come from: a directory of YAML files (`dir`) or the
    /// Kubernetes API (`kube`).
    #[arg(long, env = "MESH_CONFIG_SOURCE", value_enum, default_value_t = SourceKind::Dir)]
    pub config_source: SourceKind,
    /// Directory of Kubernetes-format YAML files, watched for changes (`--config-source dir`).
    #[arg(long, env = "MESH_CONFIG_DIR", default_value = "/etc/mesh/config")]
    pub config_dir: PathBuf,
    /// The kubeconfig for `--config-source kube`; without it, the in-cluster
    /// ServiceAccount, else `$KUBECONFIG` or `~/.kube/config`.
    #[arg(long, env = "MESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// bpffs directory where maps and links are pinned.
    #[arg(long, env = "MESH_BPFFS", default_value = "/sys/fs/bpf/mesh")]
    pub bpffs: PathBuf,
    /// Where to look for pod cgroups (default: the cgroup v2 mount).
    #[arg(long, env = "MESH_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// The SPIFFE trust domain.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Istio's `rootNamespace`: its PeerAuthentications, AuthorizationPolicies and
    /// RequestAuthentications without a selector apply mesh wide.
    #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,
    /// Whether a pod is in the mesh when neither it nor its namespace carries
    /// `istio.io/dataplane-mode`: `none` (Istio ambient's rule: label a namespace or pod
    /// `ambient` to enroll it) or `ambient` (every pod unless labelled `none`).
    #[arg(long, env = "MESH_DEFAULT_ENROLLMENT", default_value = "none", value_parser = parse_default_enrollment)]
    pub default_enrollment: DefaultEnrollment,
    /// Splice same-node flows that need no L7 work in the kernel instead of copying
    /// them through the agent.
    #[arg(long, env = "MESH_KERNEL_SPLICE", default_value_t = true, action = clap::ArgAction::Set)]
    pub kernel_splice: bool,
    /// Let the kernel carry same-node connections between pods by itself (no agent socket,
    /// no splice) when they are allowed on L4 facts and need no L7 work or token check of
    /// the agent's; a pod labelled `mesh/bypass: "false"` opts out.
    #[arg(long, env = "MESH_KERNEL_BYPASS", default_value_t = true, action = clap::ArgAction::Set)]
    pub kernel_bypass: bool,
    /// Answer the local pods' DNS (UDP and TCP port 53, captured in tc): the mesh's
    /// names here, the rest through the node's resolvers.
    #[arg(long, env = "MESH_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_capture: bool,
    /// The resolvers the DNS proxy forwards names outside the mesh to (`ip` or
    /// `ip:port`, comma-separated); by default the nameservers of /etc/resolv.conf.
    #[arg(long, env = "MESH_DNS_UPSTREAM", value_delimiter = ',', value_parser = dns::parse_upstream)]
    pub dns_upstream: Vec<std::net::SocketAddrV4>,
    /// The mesh CA's `host:port`: its Service's DNS name (e.g.
    /// `mesh-ca.mesh-system.svc:15012`) or an address.
    #[arg(long, env = "MESH_CA_ADDRESS", value_parser = parse_host_port)]
    pub ca_address: String,
    /// The mesh CA's root certificate (PEM): the trust bundle.
    #[arg(
        long,
        env = "MESH_CA_ROOT",
        default_value = "/etc/mesh/ca/root-cert.pem"
    )]
    pub ca_root: PathBuf,
    /// The token the agent presents to the CA, read at each request: on Kubernetes its
    /// projected ServiceAccount token (audience `mesh-ca`), on the directory source its
    /// node's bootstrap token.
    #[arg(long, env = "MESH_CA_TOKEN", default_value = "/etc/mesh/token/token")]
    pub ca_token: PathBuf,
    /// How often keys fetched from RequestAuthentication `jwksUri`s are refreshed (e.g.
    /// 20m, Istio's default; 30s).
    #[arg(
        long,
        env = "MESH_JWKS_REFRESH_INTERVAL",
        default_value = "20m",
        value_parser = parse_positive_duration
    )]
    pub jwks_refresh_interval: Duration,
    /// The cluster's ID: Istio's `source_cluster` and `destination_cluster` labels.
    #[arg(long, env = "MESH_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// How long the request metrics of a workload that left the mesh are still reported
    /// after its last request (bounds the series as pods come and go).
    #[arg(
        long,
        env = "MESH_METRICS_SERIES_EXPIRY",
        default_value = "10m",
        value_parser = parse_positive_duration
    )]
    pub metrics_series_expiry: Duration,
    /// Entries of the kernel's workload map (`MESH_WORKLOADS`): pods of the whole mesh.
    /// Pods beyond it fail closed (see README, Limits).
    #[arg(long, env = "MESH_MAX_WORKLOADS", default_value_t = Capacities::default().workloads, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_workloads: u32,
    /// Entries of the kernel's Service maps (`MESH_SERVICES`: cluster IP and port;
    /// `MESH_SERVICE_IPS`: cluster IP).
    #[arg(long, env = "MESH_MAX_SERVICES", default_value_t = Capacities::default().services, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_services: u32,
    /// Entries of the kernel's per-port PeerAuthentication map (`MESH_PORT_MTLS`).
    #[arg(long, env = "MESH_MAX_PORT_OVERRIDES", default_value_t = Capacities::default().port_overrides, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_port_overrides: u32,
    /// Entries of the kernel's L4 policy map (`MESH_POLICY`); verdicts beyond it are left
    /// to the agent.
    #[arg(long, env = "MESH_MAX_POLICY_ENTRIES", default_value_t = Capacities::default().policy, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_policy_entries: u32,
    /// The unix socket through which a new agent on this node takes over this one's
    /// listeners (a directory only the agent mounts).
    #[arg(
        long,
        env = "MESH_HANDOVER_SOCKET",
        default_value = "/run/mesh/agent.sock"
    )]
    pub handover_socket: PathBuf,
    /// How long a replaced or stopped agent lets its live connections finish before it
    /// exits (keep it under the pod's terminationGracePeriodSeconds).
    #[arg(
        long,
        env = "MESH_DRAIN_TIMEOUT",
        default_value = "25s",
        value_parser = parse_positive_duration
    )]
    pub drain_timeout: Duration,
    /// The runtime's worker threads (default: half the node's cores, from 1 to 4).
    #[arg(long, env = "MESH_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: Option<u16>,
}

impl AgentOptions {
    /// How many worker threads the agent's runtime gets on a node of `cores` cores.
    ///
    /// The agent shares the node with the pods it serves, and its work on a request is
    /// short: with a worker per core, most requests hand over between workers (a futex
    /// and an eventfd wake-up each) and compete with the pods for every core. Measured on
    /// 2 cores, one worker instead of two served 27% more keep-alive requests across
    /// nodes at 23% less CPU per request, with the same throughput (README,
    /// Performance). ztunnel runs 2 by default.
    pub fn workers_for(&self, cores: usize) -> usize {
        match self.worker_threads {
            Some(chosen) => usize::from(chosen),
            None => (cores / 2).clamp(1, 4),
        }
    }

    /// The sizes of the maps the agent fills.
    pub fn capacities(&self) -> Capacities {
        Capacities {
            workloads: self.max_workloads,
            services: self.max_services,
            port_overrides: self.max_port_overrides,
            policy: self.max_policy_entries,
        }
    }
}

/// `host:port` with a host name or IPv4 address and a port.
fn parse_host_port(text: &str) -> Result<String, String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?}: expected host:port"))?;
    port.parse::<u16>()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("{text:?}: {port:?} is not a port"))?;
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid_host {
        return Err(format!(
            "{text:?}: {host:?} is not a host name or IPv4 address"
        ));
    }
    Ok(text.to_owned())
}

fn parse_default_enrollment(text: &str) -> Result<DefaultEnrollment, String> {
    match text {
        enrollment::NONE => Ok(DefaultEnrollment::None),
        enrollment::AMBIENT => Ok(DefaultEnrollment::Ambient),
        other => Err(format!(
            "{other:?}: expected {:?} or {:?}",
            enrollment::NONE,
            enrollment::AMBIENT
        )),
    }
}

/// A positive duration: a zero refresh interval would fetch every key set on every tick,
/// a zero expiry would forget series between scrapes.
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match crate::config::istio::parse_duration(text)? {
        interval if interval.is_zero() => Err(format!("{text:?}: the duration must be positive")),
        interval => Ok(interval),
    }
}

const POLL_INTERVAL: Duration = Duration::from_millis(300);

pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    // Before any listener: every connection carried costs descriptors, and running out
    // would stop the agent serving every pod of the node, not only the busy one.
    match fdlimit::raise() {
        Ok(limit) if limit.is_low() => tracing::warn!(
            "file-descriptor limit is only {} (hard limit reached): a few thousand concurrent connections will exhaust it; raise the hard RLIMIT_NOFILE (LimitNOFILE=, ulimit -Hn) to at least {}",
            limit.after,
            fdlimit::LOW_FD_LIMIT
        ),
        Ok(limit) => tracing::info!(
            "file-descriptor limit {} (was {})",
            limit.after,
            limit.before
        ),
        Err(err) => tracing::warn!("raising the file-descriptor limit: {err}"),
    }
    let shared = SharedState::default();
    let conns = Arc::new(ConnTable::default());
    let metrics = Arc::new(Metrics::new(
        shared.clone(),
        conns.clone(),
        RequestMetrics::new(
            LabelSettings {
                trust_domain: options.trust_domain.clone(),
                cluster: options.cluster_id.clone(),
            },
            options.metrics_series_expiry,
        ),
    ));
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let root_pem = read(&options.ca_root)?;
    let identities = Arc::new(Identities::new(&options.trust_domain, &root_pem)?);
    let certificates_ready = Arc::new(AtomicBool::new(false));
    let ca_contact = Arc::new(Mutex::new(CaContact {
        address: options.ca_address.clone(),
        ..CaContact::default()
    }));
    let cert_manager = CertManager {
        identities: identities.clone(),
        client: CaClient {
            address: options.ca_address.clone(),
            node: options.node.clone(),
            token: options.ca_token.clone(),
            root_pem,
        },
        state: shared.clone(),
        complete: certificates_ready.clone(),
        metrics: metrics.clone(),
        contact: ca_contact.clone(),
    };
    let status = Arc::new(Mutex::new(AgentStatus {
        node: options.node.clone(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        maps_layout: mesh_common::MAPS_LAYOUT_VERSION,
        config_dir: options.config_dir.clone(),
        bpffs: options.bpffs.clone(),
        ..AgentStatus::default()
    }));

    let mut datapath = Datapath::load(&options.bpffs, options.capacities())
        .context("loading the eBPF datapath")?;
    datapath
        .set_capture_dns(options.dns_capture)
        .context("turning the DNS capture on or off")?;
    let splicer = if options.kernel_splice {
        match datapath.splicer() {
            Ok(splicer) => Some(Arc::new(splicer)),
            Err(err) => {
                tracing::warn!(
                    "in-kernel splicing unavailable, same-node flows are copied: {}",
                    describe(&err)
                );
                None
            }
        }
    } else {
        None
    };
    let mut capture_lookup = match datapath.capture_lookup() {
        Ok(lookup) => Some(lookup),
        Err(err) => {
            tracing::warn!(
                "no socket lookup towards the agent's listeners: a pod's new connection that reuses the addresses of one the agent closed is delayed by a retransmission: {}",
                describe(&err)
            );
            None
        }
    };
    datapath::install_capture_route()?;
    let kernel_maps = take_kernel_maps(&options.bpffs)?;
    let agent_lease = AgentLease::open(&options.bpffs).context("opening the agent's lease")?;

    // With an agent still serving the node, its listeners are taken once this one is
    // ready; until then it serves on.
    let predecessor = handover::find_predecessor(&options.handover_socket);
    let fresh = match predecessor {
        None => Some(Listeners::bind()?),
        Some(_) => {
            tracing::info!(
                "an agent serves this node ({}): taking over its listeners once ready",
                options.handover_socket.display()
            );
            None
        }
    };

    let cgroup_root = match &options.cgroup_root {
        Some(root) => root.clone(),
        None => datapath::cgroup2_mount()
            .context("no cgroup v2 hierarchy in /proc/mounts; pass --cgroup-root")?,
    };
    let source = origin::open(
        options.config_source,
        &options.config_dir,
        options.kubeconfig.as_deref(),
    )
    .await
    .context("watching the Kubernetes API")?;
    lock(&status).source = source.describe();
    let resolved = SharedResolved::default();
    let mut reconciler = Reconciler {
        reload: Reload {
            node: options.node.clone(),
            settings: MeshSettings {
                root_namespace: options.root_namespace.clone(),
                default_enrollment: options.default_enrollment,
            },
            source,
            shared: shared.clone(),
            balancers: LbRegistry::default(),
            status: status.clone(),
            metrics: metrics.clone(),
            has_config: false,
            resolved: resolved.clone(),
            resolved_generation: 0,
            serving: None,
        },
        enroller: Enroller::new(
            datapath,
            cgroup_root,
            options.trust_domain.clone(),
            options.kernel_bypass,
        ),
    };
    reconciler.poll();

    tokio::spawn(metrics.clone().run(kernel_maps));
    if options.kernel_bypass {
        tokio::spawn(renew_agent_lease(agent_lease));
    }
    tokio::spawn(cert_manager.run());
    let jwks_cache = Arc::new(JwksCache::default());
    tokio::spawn(jwks::keep_fresh(
        shared.clone(),
        jwks_cache.clone(),
        options.jwks_refresh_interval,
    ));
    let budgets = crate::model::circuit::Budgets::default();
    let intake = Intake::default();
    let proxy = Arc::new(Proxy {
        state: shared.clone(),
        settings: PlanSettings {
            trust_domain: options.trust_domain.clone(),
            kernel_splice: splicer.is_some(),
        },
        identities: identities.clone(),
        guard: Arc::new(Guard {
            jwks: jwks_cache.clone(),
            metrics: metrics.clone(),
            state: shared.clone(),
            limiter: Default::default(),
        }),
        conns: conns.clone(),
        pool: HbonePool::new(identities.clone()),
        upstreams: Arc::default(),
        budgets: budgets.clone(),
        splicer,
        intake: intake.clone(),
    });
    tokio::spawn(expire_idle_routing_state(proxy.clone()));
    let dns = dns_proxy(&options, shared.clone(), metrics.clone());
    if options.dns_capture {
        start_dns_proxy(dns.clone(), capture_lookup.as_mut())?;
    }
    tokio::spawn(resolve::keep_names_resolved(shared.clone(), dns, resolved));
    tokio::spawn(retire_stale_tunnels(proxy.clone()));
    tokio::spawn(memory::return_free_memory());
    let servers = Servers {
        proxy,
        intake: intake.clone(),
        metrics: admin::metrics(metrics),
        readiness: admin::readiness(status.clone()),
        admin: admin::admin(AdminView {
            status: status.clone(),
            state: shared,
            conns,
            identities,
            jwks: jwks_cache,
            budgets,
            bpffs: options.bpffs.clone(),
            ca: ca_contact,
            kernel_bypass: options.kernel_bypass,
        }),
    };
    let handed_over = CancellationToken::new();
    if let Some(listeners) = fresh {
        servers.start(
            listeners,
            &options.handover_socket,
            &handed_over,
            capture_lookup.as_mut(),
        )?;
    }

    // Ready once every local identity holds a certificate: before that, connections of
    // this node's pods to other nodes would fail.
    while !certificates_ready.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        reconciler.poll();
    }
    {
        let mut status = lock(&status);
        status.certificates_ready = true;
        status.refresh_readiness();
    }
    if let Some(predecessor) = predecessor {
        let taken =
            handover::take_over(predecessor, &options.handover_socket, handover::addresses()).await;
        let listeners = match taken {
            Ok(listeners) => listeners,
            // The predecessor went away meanwhile (its sockets closed with it): bind.
            Err(err) => {
                tracing::warn!(
                    "taking over the running agent's listeners: {}; binding them",
                    describe(&err)
                );
                Listeners::bind().context("binding the listeners after a failed handover")?
            }
        };
        servers.start(
            listeners,
            &options.handover_socket,
            &handed_over,
            capture_lookup.as_mut(),
        )?;
    }
    tracing::info!(
        "node agent for {} ready: capture :{OUTBOUND_CAPTURE_PORT}, tunnel :{TUNNEL_PORT}, metrics :{METRICS_PORT}",
        options.node
    );

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    // A change the source announces is taken at once; the tick finds the rest (a
    // directory's files, names resolved, pods still pending).
    let changes = reconciler.reload.source.changes().unwrap_or_default();
    let why = loop {
        tokio::select! {
            _ = ticker.tick() => reconciler.poll(),
            () = changes.notified() => reconciler.poll(),
            _ = terminate.recv() => break "stopping",
            _ = tokio::signal::ctrl_c() => break "stopping",
            () = handed_over.cancelled() => break "replaced by a new agent",
        }
    };
    drain(why, &intake, &status, options.drain_timeout, || {
        // The kernel is the successor's once it took over: only an agent still in charge
        // keeps the maps and links in line with the configuration.
        if !handed_over.is_cancelled() {
            reconciler.poll();
        }
    })
    .await;
    tracing::info!("stopped; programs and maps stay pinned for the next agent");
    Ok(())
}

/// The DNS proxy: the mesh's names, and the node's resolvers for the rest (the pods'
/// questions, and the agent's own lookups).
fn dns_proxy(options: &AgentOptions, state: SharedState, metrics: Arc<Metrics>) -> Arc<DnsProxy> {
    let upstreams = if options.dns_upstream.is_empty() {
        dns::nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
    } else {
        options.dns_upstream.clone()
    };
    if upstreams.is_empty() {
        tracing::warn!("the node has no resolver for names outside the mesh: they fail");
    }
    Arc::new(DnsProxy::new(
        state,
        upstreams,
        options.node.clone(),
        metrics,
    ))
}

/// Starts the DNS proxy on its own sockets (shared with a successor through
/// `SO_REUSEPORT`, not handed over: a query is one datagram or one short connection).
fn start_dns_proxy(
    proxy: Arc<DnsProxy>,
    capture_lookup: Option<&mut CaptureLookup>,
) -> anyhow::Result<()> {
    let udp = dns::DnsUdpSocket::bind().context("binding the DNS proxy's UDP socket")?;
    let tcp = dns::tcp_listener().context("binding the DNS proxy's TCP listener")?;
    if let Some(lookup) = capture_lookup {
        claim(lookup, capture_listener::DNS, &tcp);
        claim(lookup, capture_listener::DNS_UDP, &udp);
    }
    tokio::spawn(dns::serve_udp(udp, proxy.clone()));
    tokio::spawn(dns::serve_tcp(tcp, proxy));
    Ok(())
}

/// The agent's servers, ready to start on listeners bound or taken over.
struct Servers {
    proxy: Arc<Proxy>,
    intake: Intake,
    metrics: server::Handler,
    readiness: server::Handler,
    admin: server::Handler,
}

impl Servers {
    /// Serves on `listeners` and offers them to a successor at `handover_socket`
    /// (cancelling `handed_over` once one took them); the capture listener answers the
    /// node's socket lookups of captured connections.
    fn start(
        &self,
        listeners: Listeners,
        handover_socket: &Path,
        handed_over: &CancellationToken,
        capture_lookup: Option<&mut CaptureLookup>,
    ) -> anyhow::Result<()> {
        if let Some(lookup) = capture_lookup {
            claim(lookup, capture_listener::OUTBOUND, &listeners.capture);
        }
        let copies = listeners
            .duplicates()
            .context("keeping the listeners for a successor")?;
        tokio::spawn(outbound::serve(listeners.capture, self.proxy.clone()));
        tokio::spawn(inbound::serve(listeners.tunnel, self.proxy.clone()));
        let intake = &self.intake;
        tokio::spawn(server::serve(
            listeners.metrics,
            intake.clone(),
            self.metrics.clone(),
        ));
        tokio::spawn(server::serve(
            listeners.ready,
            intake.clone(),
            self.readiness.clone(),
        ));
        tokio::spawn(server::serve(
            listeners.admin,
            intake.clone(),
            self.admin.clone(),
        ));
        let (path, taken) = (handover_socket.to_owned(), handed_over.clone());
        tokio::spawn(async move {
            if let Err(err) = handover::offer(path, copies, taken).await {
                tracing::warn!(
                    "no successor can take this agent's listeners: {}",
                    describe(&err)
                );
            }
        });
        Ok(())
    }
}

/// Names `listener` in `slot` of the socket lookup. Without it, routed pods' reopened
/// connections are slower and bridged pods' connections and queries are refused (the
/// mesh fails closed), which the error says.
fn claim(lookup: &mut CaptureLookup, slot: u32, listener: &impl AsRawFd) {
    if let Err(err) = lookup.claim(slot, listener) {
        tracing::error!(
            "the socket lookup cannot name listener {slot}: {} (pods on a bridge cannot \
             reach the agent through it)",
            describe(&err)
        );
    }
}

/// Stops taking connections (HTTP clients are told to reconnect, to the successor if one
/// took the listeners) and waits until the live ones end or `timeout` passes; `tick`
/// runs meanwhile, as the main loop's poll does.
async fn drain(
    why: &str,
    intake: &Intake,
    status: &SharedStatus,
    timeout: Duration,
    mut tick: impl FnMut(),
) {
    {
        let mut status = lock(status);
        status.draining = Some(why.to_owned());
        status.refresh_readiness();
    }
    intake.stop.cancel();
    intake.live.close();
    tracing::info!(
        "{why}: draining {} live connections for up to {timeout:?}",
        intake.live.len()
    );
    let deadline = Instant::now() + timeout;
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    loop {
        tokio::select! {
            () = intake.live.wait() => break,
            _ = ticker.tick() => tick(),
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                "drain deadline passed with {} connections still open; closing them",
                intake.live.len()
            );
            break;
        }
    }
}

/// The maps the metrics read, opened from their pins so the loaded object keeps its own.
fn take_kernel_maps(bpffs: &Path) -> anyhow::Result<KernelMaps> {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf};
    let dir = datapath::maps_dir(bpffs);
    let open = |name: &str| {
        MapData::from_pin(dir.join(name)).with_context(|| format!("opening pinned map {name}"))
    };
    Ok(KernelMaps {
        flow_events: RingBuf::try_from(Map::RingBuf(open(pins::FLOW_EVENTS)?))?,
        flows: BpfHashMap::try_from(Map::LruHashMap(open(pins::FLOWS)?))?,
        verdicts: PerCpuArray::try_from(Map::PerCpuArray(open(pins::TC_VERDICTS)?))?,
    })
}

/// Tells the kernel every second that the agent lives, so that it lets connections go
/// direct by the agent's verdicts (`mesh_common::AGENT_LEASE_NS`).
async fn renew_agent_lease(mut lease: AgentLease) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_nanos(
        mesh_common::AGENT_LEASE_RENEW_NS,
    ));
    loop {
        ticker.tick().await;
        if let Err(err) = lease.renew() {
            tracing::warn!(
                "renewing the agent's lease in the kernel: {}",
                describe(&err)
            );
        }
    }
}

/// Lets routed requests' idle upstream connections go once they are past their idle
/// timeout (to within a second), whether or not another request comes for them, and
/// forgets the pool budgets of pods that left the node (every half minute).
async fn expire_idle_routing_state(proxy: Arc<Proxy>) {
    const BUDGETS_EVERY: u32 = 30;
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut ticks = 0u32;
    loop {
        ticker.tick().await;
        proxy.upstreams.expire();
        ticks = ticks.wrapping_add(1);
        if !ticks.is_multiple_of(BUDGETS_EVERY) {
            continue;
        }
        let state = proxy.state.current();
        let pods: std::collections::HashSet<String> =
            state.local_workloads().map(|w| w.key()).collect();
        proxy.budgets.prune(|key| pods.contains(&key.source));
    }
}

/// Closes pooled HBONE connections whose identities a new configuration no longer places
/// where they go (a certificate's expiry closes them on its own).
async fn retire_stale_tunnels(proxy: Arc<Proxy>) {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    let mut seen = proxy.state.current();
    loop {
        ticker.tick().await;
        let state = proxy.state.current();
        if Arc::ptr_eq(&state, &seen) {
            continue;
        }
        let trust_domain = &proxy.settings.trust_domain;
        proxy.pool.retire_stale(|source, destination, agent| {
            crate::proxy::pool::identities_hold(&state, trust_domain, source, destination, agent)
        });
        seen = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_takes_half_the_cores_as_workers_unless_told() {
        #[derive(clap::Parser)]
        struct Agent {
            #[command(flatten)]
            options: AgentOptions,
        }
        let parse = |args: &[&str]| {
            use clap::Parser;
            Agent::try_parse_from(
                [&["agent", "--node", "n", "--ca-address", "ca:15012"], args].concat(),
            )
            .map(|a| a.options)
        };
        let options = parse(&[]).expect("options");
        let workers: Vec<usize> = [1, 2, 3, 4, 8, 64]
            .iter()
            .map(|cores| options.workers_for(*cores))
            .collect();
        assert_eq!(workers, [1, 1, 1, 2, 4, 4]);
        let chosen = parse(&["--worker-threads", "6"]).expect("options");
        assert_eq!(chosen.workers_for(2), 6);
        assert!(parse(&["--worker-threads", "0"]).is_err());
    }

    #[test]
    fn the_ca_address_is_a_host_name_or_address_with_a_port() {
        for good in [
            "mesh-ca.mesh-system.svc:15012",
            "10.96.0.12:15012",
            "localhost:1",
        ] {
            assert_eq!(parse_host_port(good).as_deref(), Ok(good));
        }
        for (bad, why) in [
            ("mesh-ca.mesh-system.svc", "expected host:port"),
            ("mesh-ca:0", "is not a port"),
            ("mesh-ca:http", "is not a port"),
            (":15012", "is not a host name"),
            ("mesh_ca:15012", "is not a host name"),
            ("-ca.svc:15012", "is not a host name"),
        ] {
            let err = parse_host_port(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn the_default_enrollment_takes_istios_label_values() {
        assert_eq!(
            parse_default_enrollment("none"),
            Ok(DefaultEnrollment::None)
        );
        assert_eq!(
            parse_default_enrollment("ambient"),
            Ok(DefaultEnrollment::Ambient)
        );
        let err = parse_default_enrollment("all").expect_err("not a label value");
        assert!(err.contains("expected \"none\" or \"ambient\""), "{err}");
    }
}
