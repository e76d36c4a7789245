//! Read-only access to the pinned maps and links of a node, for meshctl, the agent's admin
//! API (`/bpf/VIEW`, for meshctl off the node) and tests: opens them from the bpffs
//! directory and decodes them into plain rows.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap},
    programs::{links::PinnedLink, loaded_programs},
};
use mesh_common::{
    name_str, pins, verdict, FlowKey, FlowStats, PortKey, ServiceInfo, ServiceKey, TrafficCounters,
    TrafficKey, WorkloadInfo, DIRECTION_FROM_POD, FLOW_FLAG_DIRECT, FLOW_ROLE_CLIENT,
    WORKLOAD_FLAG_LOCAL, WORKLOAD_FLAG_MTLS_STRICT, WORKLOAD_FLAG_MTLS_STRICT_PORTS,
};
use serde::{Deserialize, Serialize};

use crate::datapath::{ip_from_key, links_dir, maps_dir, monotonic_ns};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("no mesh maps at {0}: is the mesh agent running on this node? (see --bpffs)")]
    Missing(PathBuf),
    #[error(
        "permission denied opening {0}: reading BPF maps needs root (CAP_BPF and CAP_SYS_ADMIN)"
    )]
    Permission(PathBuf),
    #[error("{path}: {message}")]
    Other { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, MapsError>;

fn open(dir: &Path, name: &str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|err| {
        let io_kind = match &err {
            aya::maps::MapError::SyscallError(e) => Some(e.io_error.kind()),
            _ => None,
        };
        match io_kind {
            Some(io::ErrorKind::NotFound) => MapsError::Missing(dir.to_owned()),
            Some(io::ErrorKind::PermissionDenied) => MapsError::Permission(path),
            _ => MapsError::Other {
                path,
                message: err.to_string(),
            },
        }
    })
}

fn other(path: &Path, err: impl std::fmt::Display) -> MapsError {
    MapsError::Other {
        path: path.to_owned(),
        message: err.to_string(),
    }
}

/// What `meshctl bpf` shows, by the name the admin API serves it under (`/bpf/NAME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Programs,
    Workloads,
    Flows,
    Metrics,
}

impl View {
    pub const ALL: [View; 4] = [View::Programs, View::Workloads, View::Flows, View::Metrics];

    pub fn name(self) -> &'static str {
        match self {
            View::Programs => "programs",
            View::Workloads => "workloads",
            View::Flows => "flows",
            View::Metrics => "metrics",
        }
    }

    pub fn named(name: &str) -> Option<View> {
        View::ALL.into_iter().find(|view| view.name() == name)
    }
}

/// The workloads and Services the kernel programs know.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadsReport {
    pub workloads: Vec<WorkloadRow>,
    pub services: Vec<ServiceRow>,
}

/// Packets and bytes per address pair, and packets per tc verdict by its name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelMetricsReport {
    pub traffic: Vec<TrafficRow>,
    pub verdicts: BTreeMap<String, u64>,
}

impl KernelMetricsReport {
    /// The verdicts in the kernel's order (passes, then drops by reason); names this
    /// release does not know (a newer agent's) last.
    pub fn verdicts_in_order(&self) -> impl Iterator<Item = (&str, u64)> {
        let rank = |name: &str| {
            verdict::NAMES
                .iter()
                .position(|known| *known == name)
                .unwrap_or(usize::MAX)
        };
        let mut verdicts: Vec<(&str, u64)> = self
            .verdicts
            .iter()
            .map(|(name, packets)| (name.as_str(), *packets))
            .collect();
        verdicts.sort_by_key(|(name, _)| rank(name));
        verdicts.into_iter()
    }
}

/// The pinned maps of one node.
pub struct NodeMaps {
    dir: PathBuf,
    bpffs: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadRow {
    pub ip: Ipv4Addr,
    pub namespace: String,
    pub pod: String,
    pub workload: String,
    pub service_account: String,
    pub local: bool,
    pub ifindex: u32,
    /// What tc enforces on plaintext to the pod: `STRICT`, `STRICT on some ports`, or
    /// `PERMISSIVE`.
    pub mtls: String,
    /// Ports the node's probes reach in plaintext under STRICT.
    pub probe_ports: Vec<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceRow {
    pub address: SocketAddrV4,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowRow {
    /// The pod's end of the connection.
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    /// `client` when the pod opened the connection, `server` when it accepted it.
    pub role: String,
    /// `namespace/pod` of the local end.
    pub local_workload: String,
    /// `namespace/pod`, or `Service namespace/name`, of the remote end; `-` if unknown.
    pub remote_workload: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub srtt_us: u32,
    pub retransmits: u32,
    pub age_seconds: f64,
    /// Carried pod to pod by the kernel alone (`FLOW_FLAG_DIRECT`).
    pub direct: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrafficRow {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    /// `from-pod` or `to-pod`, relative to the veth's pod.
    pub direction: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramRow {
    /// What the link attaches: `namespace/pod` and hook.
    pub attachment: String,
    pub program: String,
    pub program_id: u32,
    pub link_id: u32,
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl NodeMaps {
    pub fn open(bpffs: &Path) -> Result<NodeMaps> {
        let dir = maps_dir(bpffs);
        match std::fs::metadata(&dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(MapsError::Permission(dir))
            }
            Err(_) => return Err(MapsError::Missing(dir)),
        }
        // Opening one map proves both presence and privilege before anything is printed.
        open(&dir, pins::WORKLOADS)?;
        Ok(NodeMaps {
            dir,
            bpffs: bpffs.to_owned(),
        })
    }

    pub fn workloads(&self) -> Result<Vec<WorkloadRow>> {
        let map: BpfHashMap<_, u32, WorkloadInfo> =
            BpfHashMap::try_from(Map::HashMap(open(&self.dir, pins::WORKLOADS)?))
                .map_err(|e| other(&self.dir, e))?;
        let probes: BpfHashMap<_, PortKey, u32> =
            BpfHashMap::try_from(Map::HashMap(open(&self.dir, pins::PROBE_PORTS)?))
                .map_err(|e| other(&self.dir, e))?;
        let mut probe_ports: HashMap<u32, Vec<u16>> = HashMap::new();
        for (key, _) in probes.iter().filter_map(|entry| entry.ok()) {
            probe_ports.entry(key.ip).or_default().push(key.port);
        }
        let mut rows: Vec<WorkloadRow> = map
            .iter()
            .filter_map(|entry| entry.ok())
            .map(|(ip, info)| {
                let mut probe_ports = probe_ports.remove(&ip).unwrap_or_default();
                probe_ports.sort_unstable();
                WorkloadRow {
                    ip: ip_from_key(ip),
                    namespace: name_str(&info.namespace).to_owned(),
                    pod: name_str(&info.name).to_owned(),
                    workload: name_str(&info.workload).to_owned(),
                    service_account: name_str(&info.service_account).to_owned(),
                    local: info.flags & WORKLOAD_FLAG_LOCAL != 0,
                    ifindex: info.ifindex,
                    mtls: if info.flags & WORKLOAD_FLAG_MTLS_STRICT != 0 {
                        "STRICT"
                    } else if info.flags & WORKLOAD_FLAG_MTLS_STRICT_PORTS != 0 {
                        "STRICT on some ports"
                    } else {
                        "PERMISSIVE"
                    }
                    .into(),
                    probe_ports,
                }
            })
            .collect();
        rows.sort_by_key(|r| r.ip);
        Ok(rows)
    }

    pub fn services(&self) -> Result<Vec<ServiceRow>> {
        let map: BpfHashMap<_, ServiceKey, ServiceInfo> =
            BpfHashMap::try_from(Map::HashMap(open(&self.dir, pins::SERVICES)?))
                .map_err(|e| other(&self.dir, e))?;
        let mut rows: Vec<ServiceRow> = map
            .iter()
            .filter_map(|entry| entry.ok())
            .map(|(key, info)| ServiceRow {
                address: SocketAddrV4::new(ip_from_key(key.ip), key.port),
                namespace: name_str(&info.namespace).to_owned(),
                name: name_str(&info.name).to_owned(),
            })
            .collect();
        rows.sort_by_key(|r| r.address);
        Ok(rows)
    }

    pub fn flows(&self) -> Result<Vec<FlowRow>> {
        let workloads = self.workloads()?;
        let services = self.services()?;
        let name_of = |addr: SocketAddrV4| {
            if let Some(w) = workloads.iter().find(|w| w.ip == *addr.ip()) {
                format!("{}/{}", w.namespace, w.pod)
            } else if let Some(s) = services.iter().find(|s| s.address == addr) {
                format!("Service {}/{}", s.namespace, s.name)
            } else {
                "-".into()
            }
        };
        let map: BpfHashMap<_, FlowKey, FlowStats> =
            BpfHashMap::try_from(Map::LruHashMap(open(&self.dir, pins::FLOWS)?))
                .map_err(|e| other(&self.dir, e))?;
        let now = monotonic_ns();
        let mut rows: Vec<FlowRow> = map
            .iter()
            .filter_map(|entry| entry.ok())
            .map(|(key, stats)| {
                let local = SocketAddrV4::new(ip_from_key(key.local_ip), key.local_port);
                let remote = SocketAddrV4::new(ip_from_key(key.remote_ip), key.remote_port);
                FlowRow {
                    local,
                    remote,
                    role: if stats.role == FLOW_ROLE_CLIENT {
                        "client"
                    } else {
                        "server"
                    }
                    .into(),
                    local_workload: name_of(local),
                    remote_workload: name_of(remote),
                    bytes_sent: stats.bytes_sent,
                    bytes_received: stats.bytes_received,
                    srtt_us: stats.srtt_us,
                    retransmits: stats.total_retrans,
                    age_seconds: now.saturating_sub(stats.opened_ns) as f64 / 1e9,
                    direct: stats.flags & FLOW_FLAG_DIRECT != 0,
                }
            })
            .collect();
        rows.sort_by_key(|r| (r.local, r.remote));
        Ok(rows)
    }

    pub fn traffic(&self) -> Result<Vec<TrafficRow>> {
        let map: PerCpuHashMap<_, TrafficKey, TrafficCounters> =
            PerCpuHashMap::try_from(Map::PerCpuLruHashMap(open(&self.dir, pins::TRAFFIC)?))
                .map_err(|e| other(&self.dir, e))?;
        let mut rows: Vec<TrafficRow> = map
            .iter()
            .filter_map(|entry| entry.ok())
            .map(|(key, per_cpu)| TrafficRow {
                source: ip_from_key(key.src_ip),
                destination: ip_from_key(key.dst_ip),
                direction: if key.direction == DIRECTION_FROM_POD {
                    "from-pod"
                } else {
                    "to-pod"
                }
                .into(),
                packets: per_cpu.iter().map(|c| c.packets).sum(),
                bytes: per_cpu.iter().map(|c| c.bytes).sum(),
            })
            .collect();
        rows.sort_by(|a, b| {
            (a.source, a.destination, &a.direction).cmp(&(b.source, b.destination, &b.direction))
        });
        Ok(rows)
    }

    pub fn workloads_report(&self) -> Result<WorkloadsReport> {
        Ok(WorkloadsReport {
            workloads: self.workloads()?,
            services: self.services()?,
        })
    }

    pub fn metrics_report(&self) -> Result<KernelMetricsReport> {
        Ok(KernelMetricsReport {
            traffic: self.traffic()?,
            verdicts: self
                .verdicts()?
                .into_iter()
                .map(|(name, packets)| (name.to_owned(), packets))
                .collect(),
        })
    }

    /// One view as JSON, as the admin API serves it.
    pub fn view_json(&self, view: View) -> Result<serde_json::Value> {
        let json = |value: std::result::Result<serde_json::Value, serde_json::Error>| {
            value.map_err(|err| other(&self.dir, err))
        };
        match view {
            View::Programs => json(serde_json::to_value(self.programs()?)),
            View::Workloads => json(serde_json::to_value(self.workloads_report()?)),
            View::Flows => json(serde_json::to_value(self.flows()?)),
            View::Metrics => json(serde_json::to_value(self.metrics_report()?)),
        }
    }

    /// Packets by tc verdict, drops by reason included.
    pub fn verdicts(&self) -> Result<Vec<(&'static str, u64)>> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(open(&self.dir, pins::TC_VERDICTS)?))
                .map_err(|e| other(&self.dir, e))?;
        (0..verdict::COUNT)
            .map(|i| {
                let values = map.get(&i, 0).map_err(|e| other(&self.dir, e))?;
                Ok((verdict::NAMES[i as usize], values.iter().sum()))
            })
            .collect()
    }

    /// The programs attached through pinned links, with the kernel's run statistics
    /// (non-zero while `kernel.bpf_stats_enabled` is 1).
    pub fn programs(&self) -> Result<Vec<ProgramRow>> {
        let dir = links_dir(&self.bpffs);
        let entries = std::fs::read_dir(&dir).map_err(|e| other(&dir, e))?;
        let programs: Vec<_> = loaded_programs().filter_map(|p| p.ok()).collect();
        let mut rows = Vec::new();
        for entry in entries.flatten() {
            let pin = entry.path();
            let link = PinnedLink::from_pin(&pin).map_err(|e| other(&pin, e))?;
            let info = aya::programs::links::FdLink::from(link)
                .info()
                .map_err(|e| other(&pin, e))?;
            let program = programs.iter().find(|p| p.id() == info.program_id());
            let file = entry.file_name().to_string_lossy().into_owned();
            // Pins are named `<namespace>_<pod>@<ifindex>@<hook>` (bpffs refuses dots).
            let mut parts = file.split('@');
            let pod = parts.next().unwrap_or_default().replacen('_', "/", 1);
            let hook = parts.nth(1).unwrap_or_default();
            rows.push(ProgramRow {
                attachment: format!("{pod} {hook}"),
                program: program
                    .and_then(|p| p.name_as_str())
                    .unwrap_or("?")
                    .to_owned(),
                program_id: info.program_id(),
                link_id: info.id(),
                run_count: program.map_or(0, |p| p.run_count()),
                run_time_ns: program.map_or(0, |p| p.run_time().as_nanos() as u64),
            });
        }
        rows.sort_by(|a, b| a.attachment.cmp(&b.attachment));
        Ok(rows)
    }
}
