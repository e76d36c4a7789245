//! The node agent's life: load the datapath, bind the listeners, then keep the kernel in
//! line with the configuration directory (watched, hot reloaded) — enrolling local pods
//! as they appear, detaching those that go — until told to stop.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use anyhow::Context;
use hyper::StatusCode;
use mesh_common::{pins, ADMIN_PORT, METRICS_PORT, OUTBOUND_CAPTURE_PORT, READY_PORT, TUNNEL_PORT};
use serde::Serialize;

use crate::{
    config::{self, Severity},
    datapath::{self, Datapath, PodAttachment},
    http::server::{self as http, Reply},
    identity::{ca::CaClient, certs::CertManager, tls::Identities},
    model::{MeshState, SharedState},
    policy::{check as policycheck, jwks, jwt::JwksCache},
    proxy::{
        hbone::{self, HbonePool},
        inbound::Guard,
        outbound::{self, Outbound},
        socket,
    },
    telemetry::{
        conns::ConnTable,
        metrics::{KernelMaps, Metrics},
    },
};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub node: String,
    pub config_dir: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup_root: PathBuf,
    pub trust_domain: String,
    pub root_namespace: String,
    /// Splice same-node flows that need no L7 work in the kernel (sockhash + stream
    /// verdict) instead of copying them.
    pub kernel_splice: bool,
    /// The mesh CA's address, its root certificate (the trust bundle) and this node's
    /// bootstrap token.
    pub ca_address: SocketAddr,
    pub ca_root: PathBuf,
    pub ca_token: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnrolledPod {
    pub ip: Ipv4Addr,
    pub veth: String,
    pub ifindex: u32,
    pub cgroup: PathBuf,
}

/// What `meshctl status` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentStatus {
    pub node: String,
    pub ready: bool,
    pub config_dir: PathBuf,
    pub bpffs: PathBuf,
    /// Increases with every accepted configuration.
    pub generation: u64,
    pub last_error: Option<String>,
    pub workloads: usize,
    pub services: usize,
    pub enrolled: BTreeMap<String, EnrolledPod>,
    /// Local pods not enrolled yet, with the reason.
    pub pending: BTreeMap<String, String>,
    pub warnings: Vec<String>,
    pub proxied_connections: usize,
}

const POLL_INTERVAL: Duration = Duration::from_millis(300);

pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    let shared = SharedState::default();
    let conns = Arc::new(ConnTable::default());
    let metrics = Arc::new(Metrics::new(
        shared.clone(),
        conns.clone(),
        &options.trust_domain,
    ));
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let root_pem = read(&options.ca_root)?;
    let identities = Arc::new(Identities::new(&options.trust_domain, &root_pem)?);
    let certificates_ready = Arc::new(AtomicBool::new(false));
    let cert_manager = CertManager {
        identities: identities.clone(),
        client: CaClient {
            address: options.ca_address,
            node: options.node.clone(),
            token: read(&options.ca_token)?.trim().to_owned(),
            root_pem,
        },
        state: shared.clone(),
        complete: certificates_ready.clone(),
    };
    let status = Arc::new(Mutex::new(AgentStatus {
        node: options.node.clone(),
        config_dir: options.config_dir.clone(),
        bpffs: options.bpffs.clone(),
        ..AgentStatus::default()
    }));
    let ready = Arc::new(AtomicBool::new(false));

    let mut datapath = Datapath::load(&options.bpffs).context("loading the eBPF datapath")?;
    let splicer = if options.kernel_splice {
        match datapath.splicer() {
            Ok(splicer) => Some(Arc::new(splicer)),
            Err(err) => {
                log::warn!(
                    "in-kernel splicing unavailable, same-node flows are copied: {}",
                    datapath::describe(&err)
                );
                None
            }
        }
    } else {
        None
    };
    datapath::install_capture_route()?;
    let kernel_maps = take_kernel_maps(&options.bpffs)?;

    let capture = socket::transparent_listener(SocketAddrV4::new(
        Ipv4Addr::UNSPECIFIED,
        OUTBOUND_CAPTURE_PORT,
    ))
    .with_context(|| format!("binding the capture listener on port {OUTBOUND_CAPTURE_PORT}"))?;
    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let metrics_listener = crate::http::listener(any(METRICS_PORT)).context("binding :15020")?;
    let ready_listener = crate::http::listener(any(READY_PORT)).context("binding :15021")?;
    let admin_listener = crate::http::listener(SocketAddr::from((Ipv4Addr::LOCALHOST, ADMIN_PORT)))
        .context("binding 127.0.0.1:15000")?;
    let tunnel_listener = crate::http::listener(any(TUNNEL_PORT)).context("binding :15008")?;

    let mut reconciler = Reconciler {
        options: options.clone(),
        datapath,
        enrolled: HashMap::new(),
        fingerprint: Vec::new(),
        shared: shared.clone(),
        status: status.clone(),
        metrics: metrics.clone(),
        has_config: false,
    };
    reconciler.poll();

    tokio::spawn(metrics.clone().run(kernel_maps));
    tokio::spawn(cert_manager.run());
    let jwks = Arc::new(JwksCache::default());
    tokio::spawn(jwks::keep_fresh(shared.clone(), jwks.clone()));
    let guard = Arc::new(Guard {
        jwks,
        metrics: metrics.clone(),
    });
    let outbound = Arc::new(Outbound {
        guard: guard.clone(),
        splicer,
        state: shared.clone(),
        conns: conns.clone(),
        pool: HbonePool::new(identities.clone()),
        identities: identities.clone(),
    });
    tokio::spawn(outbound::serve(capture, outbound));
    tokio::spawn(hbone::serve(
        tunnel_listener,
        identities.clone(),
        shared.clone(),
        conns.clone(),
        metrics.clone(),
        guard.clone(),
    ));
    let scrape = metrics.clone();
    tokio::spawn(http::serve(
        metrics_listener,
        Arc::new(move |path, _| match path {
            "/metrics" | "/stats/prometheus" => {
                Reply::ok("text/plain; version=0.0.4; charset=utf-8", scrape.encode())
            }
            _ => Reply::text(StatusCode::NOT_FOUND, "try /metrics\n".into()),
        }),
    ));
    let is_ready = ready.clone();
    tokio::spawn(http::serve(
        ready_listener,
        Arc::new(
            move |path, _| match (path, is_ready.load(Ordering::Relaxed)) {
                ("/healthz/ready", true) => Reply::text(StatusCode::OK, "ready\n".into()),
                ("/healthz/ready", false) => {
                    Reply::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
                }
                _ => Reply::text(StatusCode::NOT_FOUND, "try /healthz/ready\n".into()),
            },
        ),
    ));
    let admin_status = status.clone();
    let admin_state = shared.clone();
    let admin_conns = conns.clone();
    let admin_identities = identities.clone();
    let admin_jwks = guard.jwks.clone();
    tokio::spawn(http::serve(
        admin_listener,
        Arc::new(move |path, body| match (path, body) {
            ("/status", None) => {
                let mut status = lock(&admin_status).clone();
                status.proxied_connections = admin_conns.len();
                Reply::json(&status)
            }
            ("/config_dump", None) => Reply::json(&*admin_state.current()),
            ("/certs", None) => Reply::json(&certificates(&admin_identities)),
            ("/policy/check", Some(body)) => {
                match serde_json::from_slice::<policycheck::CheckRequest>(body) {
                    Ok(request) => match policycheck::check(
                        &admin_state.current(),
                        &admin_identities.trust_domain,
                        &admin_jwks,
                        &request,
                    ) {
                        Ok(report) => Reply::json(&report),
                        Err(err) => Reply::text(StatusCode::NOT_FOUND, format!("{err}\n")),
                    },
                    Err(err) => Reply::text(
                        StatusCode::BAD_REQUEST,
                        format!("malformed policy check: {err}\n"),
                    ),
                }
            }
            _ => Reply::text(
                StatusCode::NOT_FOUND,
                "try GET /status, /config_dump, /certs or POST /policy/check\n".into(),
            ),
        }),
    ));

    // Ready once every local identity holds a certificate: before that, connections of
    // this node's pods to other nodes would fail.
    while !certificates_ready.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        reconciler.poll();
    }
    ready.store(true, Ordering::Relaxed);
    lock(&status).ready = true;
    log::info!(
        "node agent for {} ready: capture :{OUTBOUND_CAPTURE_PORT}, tunnel :{TUNNEL_PORT}, metrics :{METRICS_PORT}",
        options.node
    );

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => reconciler.poll(),
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    log::info!("stopping; programs and maps stay pinned for the next agent");
    Ok(())
}

/// What `meshctl certs` shows: each identity's certificate, and the trust root.
#[derive(Serialize)]
pub struct CertificateReport {
    pub identity: String,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub issuer: String,
}

fn certificates(identities: &Identities) -> serde_json::Value {
    let certs: Vec<CertificateReport> = identities
        .all()
        .into_iter()
        .map(|(id, svid)| CertificateReport {
            identity: id.to_string(),
            serial: svid.facts.serial,
            not_before: svid.facts.not_before,
            not_after: svid.facts.not_after,
            issuer: svid.facts.issuer,
        })
        .collect();
    let root = rustls_pki_types::pem::PemObject::from_pem_slice(identities.root_pem.as_bytes())
        .ok()
        .and_then(|der: rustls_pki_types::CertificateDer| {
            crate::identity::spiffe::facts(&der).ok()
        });
    serde_json::json!({
        "trust_domain": identities.trust_domain,
        "trust_root": root.map(|r| serde_json::json!({"serial": r.serial, "not_after": r.not_after, "subject": r.issuer})),
        "certificates": certs,
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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

/// Keeps the kernel and the shared state in line with the configuration directory.
struct Reconciler {
    options: AgentOptions,
    datapath: Datapath,
    enrolled: HashMap<String, PodAttachment>,
    fingerprint: Vec<(PathBuf, SystemTime, u64)>,
    shared: SharedState,
    status: Arc<Mutex<AgentStatus>>,
    metrics: Arc<Metrics>,
    has_config: bool,
}

impl Reconciler {
    fn poll(&mut self) {
        let fingerprint = fingerprint(&self.options.config_dir);
        if fingerprint != self.fingerprint {
            self.fingerprint = fingerprint;
            self.reload();
        } else if !lock(&self.status).pending.is_empty() {
            self.enroll();
        }
    }

    fn reload(&mut self) {
        let config = match config::load_path(&self.options.config_dir) {
            Ok(config) => config,
            Err(err) => {
                self.reject(err.to_string());
                return;
            }
        };
        let errors: Vec<String> = config.errors().map(ToString::to_string).collect();
        for error in &errors {
            log::error!("{error}");
        }
        // The first configuration applies whatever is valid in it; later changes with an
        // error are rejected as a whole so that the last good configuration keeps serving.
        if !errors.is_empty() && self.has_config {
            self.reject(errors.join("\n"));
            return;
        }
        let state =
            MeshState::build_with_root(&self.options.node, &config, &self.options.root_namespace);
        let warnings: Vec<String> = config
            .diagnostics
            .iter()
            .chain(&state.diagnostics)
            .filter(|d| d.severity == Severity::Warning)
            .map(ToString::to_string)
            .collect();
        for warning in &warnings {
            log::warn!("{warning}");
        }
        {
            let mut status = lock(&self.status);
            status.generation += 1;
            status.last_error = (!errors.is_empty()).then(|| errors.join("\n"));
            status.workloads = state.workloads.len();
            status.services = state.services.len();
            status.warnings = warnings;
            self.metrics.config_generation.set(status.generation as i64);
        }
        self.shared.replace(state);
        self.has_config = true;
        self.metrics.config_reload(true);
        self.enroll();
    }

    fn reject(&mut self, error: String) {
        log::error!("configuration change rejected; the last good configuration keeps serving");
        self.metrics.config_reload(false);
        lock(&self.status).last_error = Some(error);
    }

    /// Attaches the programs of local pods that need it, detaches those of pods that went
    /// away, and refreshes the maps.
    fn enroll(&mut self) {
        let state = self.shared.current();
        let mut pending = BTreeMap::new();
        let mut desired = HashMap::new();
        for workload in state.local_workloads() {
            let key = workload.key();
            let Some((veth, ifindex)) = datapath::find_pod_veth(workload.ip) else {
                pending.insert(key, format!("no host route to {} yet", workload.ip));
                continue;
            };
            let Some(cgroup) = datapath::find_pod_cgroup(&self.options.cgroup_root, &workload.uid)
            else {
                pending.insert(
                    key,
                    format!(
                        "no cgroup for pod uid {:?} under {}",
                        workload.uid,
                        self.options.cgroup_root.display()
                    ),
                );
                continue;
            };
            desired.insert(
                key,
                (
                    workload.ip,
                    PodAttachment {
                        veth,
                        ifindex,
                        cgroup,
                    },
                ),
            );
        }
        for (key, (_, attachment)) in &desired {
            if self.enrolled.get(key) == Some(attachment) {
                continue;
            }
            match self.datapath.attach_pod(key, attachment) {
                Ok(()) => {
                    log::info!(
                        "enrolled {key} ({}, {})",
                        attachment.veth,
                        attachment.cgroup.display()
                    );
                    self.enrolled.insert(key.clone(), attachment.clone());
                }
                Err(err) => {
                    let reason = datapath::describe(&err);
                    log::error!("enrolling {key}: {reason}");
                    pending.insert(key.clone(), reason);
                }
            }
        }
        let mut gone: Vec<String> = self
            .datapath
            .attached_pods()
            .into_iter()
            .filter(|key| !desired.contains_key(key))
            .collect();
        gone.extend(
            self.enrolled
                .keys()
                .filter(|k| !desired.contains_key(*k))
                .cloned(),
        );
        gone.sort();
        gone.dedup();
        for key in gone {
            self.datapath.detach_pod(&key);
            self.enrolled.remove(&key);
            log::info!("detached {key}");
        }
        let ifindexes: HashMap<Ipv4Addr, u32> = desired
            .values()
            .map(|(ip, attachment)| (*ip, attachment.ifindex))
            .collect();
        if let Err(err) = self
            .datapath
            .sync_maps(&state, &ifindexes, &self.options.trust_domain)
        {
            log::error!("updating the kernel maps: {}", datapath::describe(&err));
        }
        self.metrics.enrolled_pods.set(self.enrolled.len() as i64);
        let mut status = lock(&self.status);
        status.pending = pending;
        status.enrolled = self
            .enrolled
            .iter()
            .filter_map(|(key, a)| {
                let (ip, _) = desired.get(key)?;
                Some((
                    key.clone(),
                    EnrolledPod {
                        ip: *ip,
                        veth: a.veth.clone(),
                        ifindex: a.ifindex,
                        cgroup: a.cgroup.clone(),
                    },
                ))
            })
            .collect();
    }
}

/// Names, modification times and sizes of the YAML files: a change to any means reload.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.path(), meta.modified().ok()?, meta.len()))
        })
        .collect();
    files.sort();
    files
}
