//! The kernel side, as the agent drives it: loading the eBPF object with its maps pinned
//! under the node's bpffs directory, attaching the programs to each local pod's veth
//! (found by `pod_links`) and cgroup with links pinned beside the maps (so a restarted
//! agent replaces them in place), filling the workload, service and policy maps (sized at load time, filled as far as
//! they hold, failing closed beyond: `capacity`), the policy route that delivers steered
//! packets to the agent's sockets, the splice program of same-node flows, and the node
//! namespace's socket lookup towards the agent's listeners (`capture_lookup`).

pub mod capacity;
pub mod capture_lookup;
pub mod maps;
pub mod pod_links;
pub mod preflight;
pub mod splice;
pub mod uninstall;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    maps::{Array as BpfArray, HashMap as BpfHashMap, MapData, MapError, MapInfo, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        CgroupAttachMode, LinkOrder, SchedClassifier, SkSkb, SockOps, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use mesh_common::{
    fill_name, pins, programs, PolicyKey, PortKey, ServiceInfo, ServiceKey, WorkloadInfo,
    AGENT_LEASE_KEY, CAPTURE_MARK, CAPTURE_ROUTE_TABLE, MAPS_LAYOUT_VERSION, POLICY_ALLOW,
    POLICY_DENY, POLICY_DIRECT, PORT_MTLS_PERMISSIVE, PORT_MTLS_STRICT, PROBE_PORTS_CAPACITY,
    SETTINGS_KEY, SETTING_CAPTURE_DNS, SETTING_CAPTURE_UNKNOWN, WORKLOAD_FLAG_LOCAL,
    WORKLOAD_FLAG_MTLS_STRICT, WORKLOAD_FLAG_MTLS_STRICT_PORTS,
};

use crate::{
    model::{peerauth::Effective, MeshState},
    policy::kernel::{self, KernelAction},
};

use self::{
    capacity::{Capacities, MapUsage, MapsReport},
    capture_lookup::CaptureLookup,
    pod_links::PodLink,
    splice::Splicer,
};

/// The eBPF object, built by build.rs from mesh-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("pinned link {path}: {message}")]
    Link { path: PathBuf, message: String },
    #[error("map {name}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("cgroup {path}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("policy routing: {0}")]
    Routing(String),
    #[error("this node cannot run the mesh: {0}")]
    Preflight(String),
}

type Result<T> = std::result::Result<T, DatapathError>;

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The pinned `MESH_AGENT_LEASE`: the agent renews it while it lives, and the kernel
/// lets new connections go direct by the agent's verdicts only while it is recent.
pub struct AgentLease(BpfArray<MapData, u64>);

impl AgentLease {
    pub fn open(bpffs: &Path) -> Result<AgentLease> {
        let name = pins::AGENT_LEASE;
        let map = MapData::from_pin(maps_dir(bpffs).join(name))
            .and_then(|data| BpfArray::try_from(aya::maps::Map::Array(data)))
            .map_err(|source| DatapathError::Map { name, source })?;
        Ok(AgentLease(map))
    }

    pub fn renew(&mut self) -> Result<()> {
        self.0
            .set(AGENT_LEASE_KEY, monotonic_ns(), 0)
            .map_err(|source| DatapathError::Map {
                name: pins::AGENT_LEASE,
                source,
            })
    }
}

/// Where one local pod's programs attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAttachment {
    pub link: PodLink,
    pub cgroup: PathBuf,
}

pub struct Datapath {
    ebpf: Ebpf,
    bpffs: PathBuf,
    links_dir: PathBuf,
    capacities: Capacities,
    /// What the agent last wrote to each map it fills (a `HashMap<K, V>` by map name),
    /// so that a change writes only what differs instead of reading every entry back from
    /// the kernel (tens of thousands of system calls with 10,000 pods). Missing for a map
    /// not synced yet, or whose writes failed: that map is read from the kernel again.
    written: HashMap<&'static str, Box<dyn std::any::Any + Send>>,
}

/// The pinned-map directory of a node's bpffs directory.
pub fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(format!("maps-v{MAPS_LAYOUT_VERSION}"))
}

/// The pinned-link directory of a node's bpffs directory.
pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(format!("links-v{MAPS_LAYOUT_VERSION}"))
}

impl Datapath {
    /// Loads the programs, creating the pinned maps or reusing those a previous agent left;
    /// the maps the agent fills get the sizes of `capacities`.
    pub fn load(bpffs: &Path, capacities: Capacities) -> Result<Datapath> {
        ensure_bpffs(bpffs)?;
        let missing: Vec<String> = preflight::judge(&preflight::gather(Path::new("/")))
            .into_iter()
            .filter(|finding| !finding.ok)
            .map(|finding| format!("{}: {}", finding.check, finding.detail))
            .collect();
        if !missing.is_empty() {
            return Err(DatapathError::Preflight(missing.join("; ")));
        }
        let maps = maps_dir(bpffs);
        let links = links_dir(bpffs);
        for dir in [&maps, &links] {
            fs::create_dir_all(dir)
                .map_err(|e| DatapathError::Bpffs(format!("creating {}: {e}", dir.display())))?;
        }
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps);
        for (name, size) in [
            (pins::WORKLOADS, capacities.workloads),
            (pins::SERVICES, capacities.services),
            (pins::SERVICE_IPS, capacities.services),
            (pins::PORT_MTLS, capacities.port_overrides),
            (pins::POLICY, capacities.policy),
        ] {
            unpin_if_resized(&maps.join(name), size)?;
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in [programs::TC_FROM_POD, programs::TC_TO_POD] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let sockops: &mut SockOps = program(&mut ebpf, programs::SOCKOPS)?;
        sockops.load().map_err(|source| DatapathError::Program {
            name: programs::SOCKOPS,
            source,
        })?;
        Ok(Datapath {
            ebpf,
            bpffs: bpffs.to_owned(),
            links_dir: links,
            capacities,
            written: HashMap::new(),
        })
    }

    /// Attaches the node namespace's socket lookup towards the agent's listeners.
    pub fn capture_lookup(&mut self) -> Result<CaptureLookup> {
        CaptureLookup::attach(&mut self.ebpf)
    }

    /// Loads the stream verdict program of spliced flows and attaches it to the sockhash
    /// (both maps belong to this agent: they go when it goes).
    pub fn splicer(&mut self) -> Result<Splicer> {
        let map = |name: &'static str, ebpf: &mut Ebpf| {
            ebpf.take_map(name).ok_or(DatapathError::Map {
                name,
                source: MapError::InvalidName { name: name.into() },
            })
        };
        let sockhash = |name: &'static str, ebpf: &mut Ebpf| {
            SockHash::<MapData, u64>::try_from(map(name, ebpf)?)
                .map_err(|source| DatapathError::Map { name, source })
        };
        let sources = sockhash(pins::SPLICE_SOURCES, &mut self.ebpf)?;
        let targets = sockhash(pins::SPLICE_TARGETS, &mut self.ebpf)?;
        let peers: BpfHashMap<MapData, u64, u64> =
            BpfHashMap::try_from(map(pins::SPLICE_PEERS, &mut self.ebpf)?).map_err(|source| {
                DatapathError::Map {
                    name: pins::SPLICE_PEERS,
                    source,
                }
            })?;
        let name = programs::SPLICE_VERDICT;
        let verdict: &mut SkSkb = program(&mut self.ebpf, name)?;
        verdict
            .load()
            .map_err(|source| DatapathError::Program { name, source })?;
        verdict
            .attach(sources.fd())
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok(Splicer::new(sources, targets, peers, splice::STALL_LIMIT))
    }

    /// Pods with programs attached, by `namespace/name`, from the pinned links.
    pub fn attached_pods(&self) -> HashSet<String> {
        let Ok(entries) = fs::read_dir(&self.links_dir) else {
            return HashSet::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (pod, _) = name.split_once('@')?;
                Some(pod.replacen('_', "/", 1))
            })
            .collect()
    }

    /// Attaches the tc and sockops programs for one pod; links pinned by an earlier agent
    /// for the same veth are replaced atomically (tc) or after the new one is in (sockops).
    pub fn attach_pod(&mut self, pod_key: &str, at: &PodAttachment) -> Result<()> {
        let base = format!("{}@{}", pod_key.replacen('/', "_", 1), at.link.ifindex);
        self.remove_pins(pod_key, Some(&base));
        for (name, attach_type, suffix) in [
            (programs::TC_FROM_POD, TcAttachType::Ingress, "tc-from"),
            (programs::TC_TO_POD, TcAttachType::Egress, "tc-to"),
        ] {
            let pin = self.links_dir.join(format!("{base}@{suffix}"));
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            let replaced = PinnedLink::from_pin(&pin)
                .ok()
                .and_then(|old| SchedClassifierLink::try_from(FdLink::from(old)).ok())
                .and_then(|old| prog.attach_to_link(old).ok());
            let id = match replaced {
                Some(id) => id,
                None => prog
                    .attach_with_options(
                        &at.link.veth,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|source| DatapathError::Program { name, source })?,
            };
            let link = prog
                .take_link(id)
                .map_err(|source| DatapathError::Program { name, source })?;
            let link = FdLink::try_from(link).map_err(|e| DatapathError::Link {
                path: pin.clone(),
                message: e.to_string(),
            })?;
            pin_link(link, &pin)?;
        }

        let pin = self.links_dir.join(format!("{base}@sockops"));
        let cgroup = fs::File::open(&at.cgroup).map_err(|source| DatapathError::Cgroup {
            path: at.cgroup.clone(),
            source,
        })?;
        let prog: &mut SockOps = program(&mut self.ebpf, programs::SOCKOPS)?;
        let id = prog
            // cgroup links are always multi-attach; the kernel wants no flags for them.
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| DatapathError::Program {
                name: programs::SOCKOPS,
                source,
            })?;
        let link = prog
            .take_link(id)
            .map_err(|source| DatapathError::Program {
                name: programs::SOCKOPS,
                source,
            })?;
        let link = FdLink::try_from(link).map_err(|e| DatapathError::Link {
            path: pin.clone(),
            message: e.to_string(),
        })?;
        // The previous agent's sockops link detaches when its pin goes: the new one is in.
        pin_link(link, &pin)?;
        self.remove_other_layout_links(pod_key);
        Ok(())
    }

    /// Detaches what an agent of another map layout attached for `pod_key`, now that this
    /// agent's programs are in: two generations of programs must not judge the same
    /// packets, the older one by maps nobody updates any more.
    fn remove_other_layout_links(&self, pod_key: &str) {
        let prefix = format!("{}@", pod_key.replacen('/', "_", 1));
        for dir in uninstall::other_layouts(&self.bpffs, MAPS_LAYOUT_VERSION) {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    if let Err(err) = fs::remove_file(entry.path()) {
                        tracing::warn!("removing pinned link {}: {err}", entry.path().display());
                    }
                }
            }
        }
    }

    /// Removes what agents of other map layouts left once this one enrolled the node's
    /// pods: the links of pods that are gone, then their maps.
    pub fn remove_other_layouts(&self) {
        for dir in uninstall::other_layouts(&self.bpffs, MAPS_LAYOUT_VERSION) {
            match uninstall::remove_pin_dir(&dir) {
                Ok(pins) => tracing::info!(
                    "removed {} ({} pins) left by an agent of another map layout",
                    dir.display(),
                    pins.len()
                ),
                Err(err) => tracing::warn!("{}", crate::errors::describe(&err)),
            }
        }
    }

    /// Detaches everything pinned for a pod.
    pub fn detach_pod(&self, pod_key: &str) {
        self.remove_pins(pod_key, None);
    }

    /// Removes the pins of `pod_key` except those of the `keep` attachment.
    fn remove_pins(&self, pod_key: &str, keep: Option<&str>) {
        let prefix = format!("{}@", pod_key.replacen('/', "_", 1));
        let Ok(entries) = fs::read_dir(&self.links_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let kept = keep.is_some_and(|base| name.starts_with(&format!("{base}@")));
            if name.starts_with(&prefix) && !kept {
                if let Err(err) = fs::remove_file(entry.path()) {
                    tracing::warn!("removing pinned link {}: {err}", entry.path().display());
                }
            }
        }
    }

    /// Makes the workload, service, port mTLS and policy maps match `state` as far as they
    /// hold (`capacity` decides what is written and how the rest fails closed), and says
    /// what they hold.
    pub fn sync_maps(
        &mut self,
        state: &MeshState,
        links: &HashMap<Ipv4Addr, PodLink>,
        probe_sources: &HashMap<Ipv4Addr, Ipv4Addr>,
        trust_domain: &str,
        kernel_bypass: bool,
    ) -> Result<MapsReport> {
        let caps = self.capacities;
        let mut report = MapsReport::default();

        let workloads: Vec<(Ipv4Addr, bool)> = state
            .workloads
            .values()
            .map(|w| (w.ip, w.node == state.node))
            .collect();
        let fit_workloads = capacity::fit_workloads(&workloads, caps.workloads);
        let overrides: BTreeMap<Ipv4Addr, Vec<(PortKey, u32)>> = state
            .local_workloads()
            .filter_map(|w| Some((w.ip, state.mtls.get(&w.ip)?)))
            .filter(|(_, mtls)| !mtls.ports.is_empty())
            .map(|(ip, mtls)| {
                let entries = mtls
                    .ports
                    .iter()
                    .map(|(port, mode)| {
                        let key = PortKey {
                            ip: ip_key(ip),
                            port: *port,
                            _pad: 0,
                        };
                        let value = if *mode == Effective::Strict {
                            PORT_MTLS_STRICT
                        } else {
                            PORT_MTLS_PERMISSIVE
                        };
                        (key, value)
                    })
                    .collect();
                (ip, entries)
            })
            .collect();
        let fit_overrides = capacity::fit_port_overrides(&overrides, caps.port_overrides);
        let all_strict: HashSet<Ipv4Addr> = fit_overrides.refused.iter().copied().collect();

        let mut service_keys: Vec<(u8, (Ipv4Addr, u16))> = state
            .services
            .values()
            .map(|s| (0, (s.cluster_ip, s.port)))
            .collect();
        service_keys.sort();
        service_keys.dedup();
        let fit_services = capacity::fit(service_keys, caps.services);
        let mut ports_per_ip: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        for service in state.services.values() {
            *ports_per_ip.entry(service.cluster_ip).or_default() += 1;
        }
        let fit_service_ips = capacity::fit(
            ports_per_ip.keys().map(|ip| (0, *ip)).collect(),
            caps.services,
        );

        // Before any write: a destination about to be left out of its map is captured all
        // the same from the moment it is missing.
        if capacity::must_capture_unknown(
            fit_workloads.refused.len(),
            fit_services.refused.len(),
            fit_service_ips.refused.len(),
        ) {
            self.set_capture_unknown(true)?;
        }

        let mut desired: HashMap<u32, WorkloadInfo> = HashMap::new();
        for ip in &fit_workloads.admitted {
            let Some(w) = state.workloads.get(ip) else {
                continue;
            };
            let mut info = WorkloadInfo {
                namespace: [0; mesh_common::NAME_LEN],
                name: [0; mesh_common::NAME_LEN],
                workload: [0; mesh_common::NAME_LEN],
                service_account: [0; mesh_common::NAME_LEN],
                ifindex: 0,
                flags: 0,
                pod_mac: [0; 6],
                port_mac: [0; 6],
                bridge_ifindex: 0,
            };
            fill_name(&mut info.namespace, &w.namespace);
            fill_name(&mut info.name, &w.pod);
            fill_name(&mut info.workload, &w.workload);
            fill_name(&mut info.service_account, &w.service_account);
            if w.node == state.node {
                info.flags |= WORKLOAD_FLAG_LOCAL;
                if let Some(link) = links.get(&w.ip) {
                    info.ifindex = link.ifindex;
                    if let Some(bridge) = link.bridge {
                        info.pod_mac = bridge.pod_mac;
                        info.port_mac = bridge.port_mac;
                        info.bridge_ifindex = bridge.bridge_ifindex;
                    }
                }
            }
            if let Some(mtls) = state.mtls.get(&w.ip) {
                if mtls.mode == Effective::Strict || all_strict.contains(&w.ip) {
                    info.flags |= WORKLOAD_FLAG_MTLS_STRICT;
                }
                if mtls.ports.values().any(|mode| *mode == Effective::Strict) {
                    info.flags |= WORKLOAD_FLAG_MTLS_STRICT_PORTS;
                }
            }
            desired.insert(ip_key(w.ip), info);
        }
        let failed_workloads = self.sync_map(pins::WORKLOADS, &desired)?;
        let mut refused_workloads = fit_workloads.refused.clone();
        refused_workloads.extend(failed_workloads.iter().map(|key| ip_from_key(*key)));
        for ip in &refused_workloads {
            if let Some(w) = state.workloads.get(ip).filter(|w| w.node == state.node) {
                report.failing_closed.insert(
                    w.key(),
                    format!(
                        "no room in {}: reached only through the agent, cannot send",
                        pins::WORKLOADS
                    ),
                );
            }
        }
        report.maps.push(MapUsage {
            map: pins::WORKLOADS,
            capacity: caps.workloads,
            entries: desired.len() - failed_workloads.len(),
            refused: refused_workloads.len(),
        });

        let desired: HashMap<ServiceKey, ServiceInfo> = fit_services
            .admitted
            .iter()
            .filter_map(|(ip, port)| {
                let addr = SocketAddrV4::new(*ip, *port);
                let s = state.services.get(&addr)?;
                let mut info = ServiceInfo {
                    namespace: [0; mesh_common::NAME_LEN],
                    name: [0; mesh_common::NAME_LEN],
                };
                fill_name(&mut info.namespace, &s.namespace);
                fill_name(&mut info.name, &s.name);
                Some((service_key(addr), info))
            })
            .collect();
        let failed_services = self.sync_map(pins::SERVICES, &desired)?.len();
        report.maps.push(MapUsage {
            map: pins::SERVICES,
            capacity: caps.services,
            entries: desired.len() - failed_services,
            refused: fit_services.refused.len() + failed_services,
        });

        let desired: HashMap<u32, u32> = fit_service_ips
            .admitted
            .iter()
            .map(|ip| (ip_key(*ip), ports_per_ip.get(ip).copied().unwrap_or(0)))
            .collect();
        let failed_service_ips = self.sync_map(pins::SERVICE_IPS, &desired)?.len();
        report.maps.push(MapUsage {
            map: pins::SERVICE_IPS,
            capacity: caps.services,
            entries: desired.len() - failed_service_ips,
            refused: fit_service_ips.refused.len() + failed_service_ips,
        });

        let desired: HashMap<PortKey, u32> = fit_overrides
            .admitted
            .iter()
            .filter_map(|ip| overrides.get(ip))
            .flatten()
            .copied()
            .collect();
        let failed_overrides = self.sync_map(pins::PORT_MTLS, &desired)?;
        // A pod whose override could not be written has lost it: STRICT everywhere then.
        let mut strict_fallback = fit_overrides.refused.clone();
        strict_fallback.extend(failed_overrides.iter().map(|key| ip_from_key(key.ip)));
        strict_fallback.sort();
        strict_fallback.dedup();
        let refused_overrides: usize = strict_fallback
            .iter()
            .filter_map(|ip| overrides.get(ip))
            .map(Vec::len)
            .sum();
        for ip in &strict_fallback {
            if !all_strict.contains(ip) {
                self.force_strict(*ip)?;
            }
            if let Some(w) = state.workloads.get(ip) {
                report.failing_closed.entry(w.key()).or_insert_with(|| {
                    format!("no room in {}: STRICT on every port", pins::PORT_MTLS)
                });
            }
        }
        report.maps.push(MapUsage {
            map: pins::PORT_MTLS,
            capacity: caps.port_overrides,
            entries: desired.len() - failed_overrides.len(),
            refused: refused_overrides,
        });

        let probes = probe_entries(state, probe_sources, PROBE_PORTS_CAPACITY);
        let failed_probes = self.sync_map(pins::PROBE_PORTS, &probes.admitted)?;
        let mut refused_probes = probes.refused;
        refused_probes.extend(
            failed_probes
                .iter()
                .map(|key| (ip_from_key(key.ip), key.port)),
        );
        for (ip, port) in &refused_probes {
            if let Some(w) = state.workloads.get(ip) {
                report.failing_closed.entry(w.key()).or_insert_with(|| {
                    format!(
                        "no room in {}: the node's probes of port {port} are dropped under STRICT",
                        pins::PROBE_PORTS
                    )
                });
            }
        }
        report.maps.push(MapUsage {
            map: pins::PROBE_PORTS,
            capacity: PROBE_PORTS_CAPACITY,
            entries: probes.admitted.len() - failed_probes.len(),
            refused: refused_probes.len(),
        });

        // A SYN without a verdict is captured and judged by the agent, so a pair of
        // verdicts left out fails safe: it costs the early drop and the kernel's direct
        // path only. Pairs are written whole (`whole_pairs_within`).
        let verdicts = kernel::kernel_verdicts(state, trust_domain, kernel_bypass);
        let room = usize::try_from(caps.policy).unwrap_or(usize::MAX);
        let desired: HashMap<PolicyKey, u32> = kernel::whole_pairs_within(&verdicts, room)
            .iter()
            .map(|v| {
                let key = PolicyKey {
                    src_ip: ip_key(v.source),
                    dst_ip: ip_key(v.destination),
                    dst_port: v.port,
                    _pad: 0,
                };
                let value = match v.action {
                    KernelAction::Deny => POLICY_DENY,
                    KernelAction::Agent => POLICY_ALLOW,
                    KernelAction::Direct => POLICY_DIRECT,
                };
                (key, value)
            })
            .collect();
        let failed_policy = self.sync_map(pins::POLICY, &desired)?.len();
        report.maps.push(MapUsage {
            map: pins::POLICY,
            capacity: caps.policy,
            entries: desired.len() - failed_policy,
            refused: verdicts.len() - desired.len() + failed_policy,
        });

        report.capture_unknown = capacity::must_capture_unknown(
            refused_workloads.len(),
            fit_services.refused.len() + failed_services,
            fit_service_ips.refused.len() + failed_service_ips,
        );
        self.set_capture_unknown(report.capture_unknown)?;
        for usage in report.maps.iter().filter(|m| m.refused > 0) {
            tracing::error!(
                "{} is full: {} entries refused (capacity {}); failing closed for them",
                usage.map,
                usage.refused,
                usage.capacity
            );
        }
        Ok(report)
    }

    fn sync_map<K, V>(&mut self, name: &'static str, desired: &HashMap<K, V>) -> Result<Vec<K>>
    where
        K: aya::Pod + Eq + std::hash::Hash + Send,
        V: aya::Pod + PartialEq + Send,
    {
        let mut map: BpfHashMap<_, K, V> = map(&mut self.ebpf, name)?;
        let written = self
            .written
            .remove(name)
            .and_then(|written| written.downcast::<HashMap<K, V>>().ok());
        let current = match written {
            Some(written) => *written,
            None => map
                .iter()
                .filter_map(|entry| entry.ok())
                .collect::<HashMap<K, V>>(),
        };
        let outcome = sync(&mut map, name, &current, desired);
        if outcome.clean {
            self.written.insert(name, Box::new(desired.clone()));
        }
        Ok(outcome.failed)
    }

    /// Sets or clears `SETTING_CAPTURE_UNKNOWN`.
    fn set_capture_unknown(&mut self, on: bool) -> Result<()> {
        self.set_setting(SETTING_CAPTURE_UNKNOWN, on)
    }

    /// Sets or clears `SETTING_CAPTURE_DNS`: whether pods' DNS goes to the agent's proxy.
    pub fn set_capture_dns(&mut self, on: bool) -> Result<()> {
        self.set_setting(SETTING_CAPTURE_DNS, on)
    }

    fn set_setting(&mut self, bit: u32, on: bool) -> Result<()> {
        let name = pins::SETTINGS;
        let m = self.ebpf.map_mut(name).ok_or(DatapathError::Map {
            name,
            source: MapError::InvalidName { name: name.into() },
        })?;
        let mut settings: BpfArray<_, u32> =
            BpfArray::try_from(m).map_err(|source| DatapathError::Map { name, source })?;
        let bits = settings.get(&SETTINGS_KEY, 0).unwrap_or(0);
        let bits = if on { bits | bit } else { bits & !bit };
        settings
            .set(SETTINGS_KEY, bits, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// Makes the workload at `ip` STRICT on every port, its overrides having been lost.
    fn force_strict(&mut self, ip: Ipv4Addr) -> Result<()> {
        self.written.remove(pins::WORKLOADS);
        let mut workloads: BpfHashMap<_, u32, WorkloadInfo> = map(&mut self.ebpf, pins::WORKLOADS)?;
        if let Ok(mut info) = workloads.get(&ip_key(ip), 0) {
            info.flags |= WORKLOAD_FLAG_MTLS_STRICT;
            workloads
                .insert(ip_key(ip), info, 0)
                .map_err(|source| DatapathError::Map {
                    name: pins::WORKLOADS,
                    source,
                })?;
        }
        Ok(())
    }
}

/// The `PROBE_PORTS` entries of the local pods: each port their kubelet probes use, with
/// the node address those probes come from; what does not fit in `room` is refused
/// (the node's probes of it are then dropped under STRICT: fail closed).
struct ProbeEntries {
    admitted: HashMap<PortKey, u32>,
    refused: Vec<(Ipv4Addr, u16)>,
}

fn probe_entries(
    state: &MeshState,
    sources: &HashMap<Ipv4Addr, Ipv4Addr>,
    room: u32,
) -> ProbeEntries {
    let mut wanted: Vec<(Ipv4Addr, u16, Ipv4Addr)> = state
        .local_workloads()
        .filter_map(|w| Some((w, *sources.get(&w.ip)?)))
        .flat_map(|(w, source)| w.probe_ports.iter().map(move |port| (w.ip, *port, source)))
        .collect();
    wanted.sort();
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    let refused = wanted
        .iter()
        .skip(room)
        .map(|(ip, port, _)| (*ip, *port))
        .collect();
    let admitted = wanted
        .into_iter()
        .take(room)
        .map(|(ip, port, source)| {
            let key = PortKey {
                ip: ip_key(ip),
                port,
                _pad: 0,
            };
            (key, ip_key(source))
        })
        .collect();
    ProbeEntries { admitted, refused }
}

/// The address this node sends from towards `ip`, which its kubelet's probes of a pod at
/// `ip` come from: the kernel's own choice, as a connected UDP socket learns it (no
/// packet is sent).
pub fn source_towards(ip: Ipv4Addr) -> Option<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((ip, DISCARD_PORT)).ok()?;
    match socket.local_addr().ok()? {
        std::net::SocketAddr::V4(local) => Some(*local.ip()),
        std::net::SocketAddr::V6(_) => None,
    }
}

/// Any port serves `source_towards`; nothing is sent to it.
const DISCARD_PORT: u16 = 9;

/// Removes the pin of a map whose size differs from `size`, so that the load creates it
/// anew at that size (aya reuses a pinned map as it is). Programs still attached keep the
/// old map until the new agent replaces them, right after it fills the new one.
fn unpin_if_resized(pin: &Path, size: u32) -> Result<()> {
    let Ok(info) = MapInfo::from_pin(pin) else {
        return Ok(());
    };
    if info.max_entries() == size {
        return Ok(());
    }
    tracing::info!(
        "resizing {} from {} to {size} entries",
        pin.display(),
        info.max_entries()
    );
    fs::remove_file(pin)
        .map_err(|e| DatapathError::Bpffs(format!("removing {}: {e}", pin.display())))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    prog.try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn map<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<&'a mut aya::maps::MapData, K, V>> {
    let m = ebpf.map_mut(name).ok_or(DatapathError::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    })?;
    BpfHashMap::try_from(m).map_err(|source| DatapathError::Map { name, source })
}

/// What a sync left: the keys the kernel refused, and whether the map now holds exactly
/// what was desired.
struct Synced<K> {
    failed: Vec<K>,
    clean: bool,
}

/// Writes `desired` into `map`, which holds `current`: stale entries removed first to make
/// room, then what differs written; every write is tried, and the keys the kernel refused
/// are returned (the caller fails closed for them).
fn sync<K, V>(
    map: &mut BpfHashMap<&mut aya::maps::MapData, K, V>,
    name: &'static str,
    current: &HashMap<K, V>,
    desired: &HashMap<K, V>,
) -> Synced<K>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    let mut clean = true;
    for key in current.keys().filter(|k| !desired.contains_key(k)) {
        if let Err(err) = map.remove(key) {
            tracing::warn!("removing a stale entry of {name}: {err}");
            clean = false;
        }
    }
    let mut failed = Vec::new();
    for (key, value) in desired {
        if current.get(key) != Some(value) {
            if let Err(err) = map.insert(key, value, 0) {
                tracing::warn!("writing an entry of {name}: {err}");
                failed.push(*key);
            }
        }
    }
    clean &= failed.is_empty();
    Synced { failed, clean }
}

fn pin_link(link: FdLink, pin: &Path) -> Result<()> {
    // Dropping the old pin (if any) releases the previous agent's link.
    let _ = fs::remove_file(pin);
    link.pin(pin).map_err(|e| DatapathError::Link {
        path: pin.to_owned(),
        message: match &e {
            aya::pin::PinError::SyscallError(s) => format!("{e}: {}", s.io_error),
            _ => e.to_string(),
        },
    })?;
    Ok(())
}

/// A map key for an IPv4 address: its bytes as on the wire.
pub fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn ip_from_key(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

pub fn service_key(addr: SocketAddrV4) -> ServiceKey {
    ServiceKey {
        ip: ip_key(*addr.ip()),
        port: addr.port(),
        _pad: 0,
    }
}

/// Mounts bpffs at `/sys/fs/bpf` when nothing is mounted there yet.
pub fn ensure_bpffs(bpffs: &Path) -> Result<()> {
    if !bpffs.starts_with("/sys/fs/bpf") {
        return Ok(());
    }
    let mounts = fs::read_to_string("/proc/mounts")
        .map_err(|e| DatapathError::Bpffs(format!("reading /proc/mounts: {e}")))?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpffs", "/sys/fs/bpf"])
        .status()
        .map_err(|e| DatapathError::Bpffs(format!("running mount: {e}")))?;
    if !status.success() {
        return Err(DatapathError::Bpffs(
            "mounting bpffs at /sys/fs/bpf failed".into(),
        ));
    }
    Ok(())
}

/// Installs (idempotently) the policy route that delivers packets the tc program marked to
/// the local socket it assigned, whatever their destination address.
pub fn install_capture_route() -> Result<()> {
    let mark = format!("{CAPTURE_MARK:#x}/{CAPTURE_MARK:#x}");
    let table = CAPTURE_ROUTE_TABLE.to_string();
    let rules = run_ip(&["-4", "rule", "show", "table", &table])?;
    if !rules.contains("fwmark") {
        run_ip(&[
            "-4", "rule", "add", "fwmark", &mark, "lookup", &table, "priority", "100",
        ])?;
    }
    run_ip(&[
        "-4",
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &table,
    ])?;
    Ok(())
}

fn run_ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| DatapathError::Routing(format!("running ip {}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(DatapathError::Routing(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ifindex(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The cgroup of a pod: the directory under `root` whose name carries the pod's UID the
/// way the kubelet names it (`pod<uid>`, or `…pod<uid with _>.slice` with systemd).
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    if uid.is_empty() {
        return None;
    }
    let plain = format!("pod{uid}");
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    let mut frontier = vec![(root.to_owned(), 0)];
    while let Some((dir, depth)) = frontier.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == plain || name.ends_with(&systemd) {
                return Some(entry.path());
            }
            if depth < 4 {
                frontier.push((entry.path(), depth + 1));
            }
        }
    }
    None
}

/// Where cgroup v2 is mounted in this mount namespace.
pub fn cgroup2_mount() -> Option<PathBuf> {
    preflight::gather(Path::new("/")).cgroup2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_wire_byte_order() {
        let ip = Ipv4Addr::new(10, 244, 1, 2);
        assert_eq!(ip_key(ip).to_ne_bytes(), [10, 244, 1, 2]);
        assert_eq!(ip_from_key(ip_key(ip)), ip);
    }

    #[test]
    fn pod_cgroup_is_found_by_uid_in_both_kubelet_layouts() {
        let root = std::env::temp_dir().join(format!("mesh-cg-test-{}", std::process::id()));
        let cgroupfs = root.join("kubepods/besteffort/pod1234-ab");
        let systemd =
            root.join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod99_cd.slice");
        fs::create_dir_all(&cgroupfs).expect("mkdir");
        fs::create_dir_all(&systemd).expect("mkdir");
        assert_eq!(find_pod_cgroup(&root, "1234-ab"), Some(cgroupfs));
        assert_eq!(find_pod_cgroup(&root, "99-cd"), Some(systemd));
        assert_eq!(find_pod_cgroup(&root, "missing"), None);
        fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn probe_ports_of_local_pods_are_admitted_with_the_node_source_until_the_map_is_full() {
        let yaml = "\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec:
  nodeName: node-1
  containers:
  - name: app
    ports: [{name: health, containerPort: 8081}]
    readinessProbe: {httpGet: {path: /ready, port: health}}
    livenessProbe: {tcpSocket: {port: 8080}}
  - name: side
    startupProbe: {grpc: {port: 9090}}
    livenessProbe: {httpGet: {port: health}}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: shop}
spec: {nodeName: node-2, containers: [{name: app, readinessProbe: {tcpSocket: {port: 80}}}]}
status: {podIP: 10.244.2.2}
";
        let config = crate::config::load_str(Path::new("test.yaml"), yaml);
        let state = MeshState::build("node-1", &config);
        let node = Ipv4Addr::new(169, 254, 1, 1);
        let pod = Ipv4Addr::new(10, 244, 1, 2);
        let sources = HashMap::from([(pod, node), (Ipv4Addr::new(10, 244, 2, 2), node)]);
        let key = |port| PortKey {
            ip: ip_key(pod),
            port,
            _pad: 0,
        };

        let all = probe_entries(&state, &sources, 16);
        // The named port of the second container does not resolve there: it has none.
        let expected: HashMap<PortKey, u32> = [8080, 8081, 9090]
            .into_iter()
            .map(|port| (key(port), ip_key(node)))
            .collect();
        assert_eq!(all.admitted, expected);
        assert!(all.refused.is_empty());

        let full = probe_entries(&state, &sources, 2);
        assert_eq!(full.admitted.len(), 2);
        assert_eq!(full.refused, [(pod, 9090)]);

        let unknown_source = probe_entries(&state, &HashMap::new(), 16);
        assert!(unknown_source.admitted.is_empty());
    }
}
