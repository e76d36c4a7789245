//! The kernel side, as the agent drives it: loading the eBPF object with its maps pinned
//! under the node's bpffs directory, attaching the programs to each local pod's veth and
//! cgroup with links pinned beside the maps (so a restarted agent replaces them in place),
//! filling the workload, service and policy maps, the policy route that delivers steered
//! packets to the agent's sockets, and the splice program of same-node flows.

pub mod maps;
pub mod splice;

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, MapError, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        CgroupAttachMode, LinkOrder, SchedClassifier, SkSkb, SockOps, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use mesh_common::{
    fill_name, pins, programs, PolicyKey, PortKey, ServiceInfo, ServiceKey, WorkloadInfo,
    CAPTURE_MARK, CAPTURE_ROUTE_TABLE, MAPS_LAYOUT_VERSION, POLICY_ALLOW, POLICY_DENY,
    PORT_MTLS_PERMISSIVE, PORT_MTLS_STRICT, WORKLOAD_FLAG_LOCAL, WORKLOAD_FLAG_MTLS_STRICT,
    WORKLOAD_FLAG_MTLS_STRICT_PORTS,
};

use crate::{
    model::{peerauth::Effective, MeshState},
    policy::kernel,
};

use self::splice::Splicer;

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
}

type Result<T> = std::result::Result<T, DatapathError>;

/// Where one local pod's programs attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAttachment {
    pub veth: String,
    pub ifindex: u32,
    pub cgroup: PathBuf,
}

pub struct Datapath {
    ebpf: Ebpf,
    links_dir: PathBuf,
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
    /// Loads the programs, creating the pinned maps or reusing those a previous agent left.
    pub fn load(bpffs: &Path) -> Result<Datapath> {
        ensure_bpffs(bpffs)?;
        let maps = maps_dir(bpffs);
        let links = links_dir(bpffs);
        for dir in [&maps, &links] {
            fs::create_dir_all(dir)
                .map_err(|e| DatapathError::Bpffs(format!("creating {}: {e}", dir.display())))?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps)
            .load(EBPF_OBJECT)?;
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
            links_dir: links,
        })
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
        Ok(Splicer::new(sources, targets, peers))
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
        let base = format!("{}@{}", pod_key.replacen('/', "_", 1), at.ifindex);
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
                        &at.veth,
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
        pin_link(link, &pin)
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

    /// Makes the workload, service, port mTLS and policy maps match `state`.
    pub fn sync_maps(
        &mut self,
        state: &MeshState,
        ifindexes: &HashMap<Ipv4Addr, u32>,
        trust_domain: &str,
    ) -> Result<()> {
        let mut workloads: BpfHashMap<_, u32, WorkloadInfo> = map(&mut self.ebpf, pins::WORKLOADS)?;
        let desired: HashMap<u32, WorkloadInfo> = state
            .workloads
            .values()
            .map(|w| {
                let mut info = WorkloadInfo {
                    namespace: [0; mesh_common::NAME_LEN],
                    name: [0; mesh_common::NAME_LEN],
                    workload: [0; mesh_common::NAME_LEN],
                    service_account: [0; mesh_common::NAME_LEN],
                    ifindex: 0,
                    flags: 0,
                };
                fill_name(&mut info.namespace, &w.namespace);
                fill_name(&mut info.name, &w.pod);
                fill_name(&mut info.workload, &w.workload);
                fill_name(&mut info.service_account, &w.service_account);
                if w.node == state.node {
                    info.flags |= WORKLOAD_FLAG_LOCAL;
                    info.ifindex = ifindexes.get(&w.ip).copied().unwrap_or(0);
                }
                if let Some(mtls) = state.mtls.get(&w.ip) {
                    if mtls.mode == Effective::Strict {
                        info.flags |= WORKLOAD_FLAG_MTLS_STRICT;
                    }
                    if mtls.ports.values().any(|mode| *mode == Effective::Strict) {
                        info.flags |= WORKLOAD_FLAG_MTLS_STRICT_PORTS;
                    }
                }
                (ip_key(w.ip), info)
            })
            .collect();
        sync(&mut workloads, pins::WORKLOADS, &desired)?;

        let mut services: BpfHashMap<_, ServiceKey, ServiceInfo> =
            map(&mut self.ebpf, pins::SERVICES)?;
        let desired: HashMap<ServiceKey, ServiceInfo> = state
            .services
            .values()
            .map(|s| {
                let mut info = ServiceInfo {
                    namespace: [0; mesh_common::NAME_LEN],
                    name: [0; mesh_common::NAME_LEN],
                };
                fill_name(&mut info.namespace, &s.namespace);
                fill_name(&mut info.name, &s.name);
                (service_key(SocketAddrV4::new(s.cluster_ip, s.port)), info)
            })
            .collect();
        sync(&mut services, pins::SERVICES, &desired)?;

        let mut service_ips: BpfHashMap<_, u32, u32> = map(&mut self.ebpf, pins::SERVICE_IPS)?;
        let mut desired: HashMap<u32, u32> = HashMap::new();
        for service in state.services.values() {
            *desired.entry(ip_key(service.cluster_ip)).or_default() += 1;
        }
        sync(&mut service_ips, pins::SERVICE_IPS, &desired)?;

        let mut ports: BpfHashMap<_, PortKey, u32> = map(&mut self.ebpf, pins::PORT_MTLS)?;
        let desired: HashMap<PortKey, u32> = state
            .local_workloads()
            .filter_map(|w| Some((w.ip, state.mtls.get(&w.ip)?)))
            .flat_map(|(ip, mtls)| {
                mtls.ports.iter().map(move |(port, mode)| {
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
            })
            .collect();
        sync(&mut ports, pins::PORT_MTLS, &desired)?;

        let mut policy: BpfHashMap<_, PolicyKey, u32> = map(&mut self.ebpf, pins::POLICY)?;
        let verdicts = kernel::kernel_verdicts(state, trust_domain);
        if verdicts.len() > kernel::KERNEL_VERDICTS_MAX {
            tracing::warn!(
                "{} L4 policy verdicts for the kernel; the first {} are loaded, the agent enforces all",
                verdicts.len(),
                kernel::KERNEL_VERDICTS_MAX
            );
        }
        let desired: HashMap<PolicyKey, u32> = verdicts
            .iter()
            .take(kernel::KERNEL_VERDICTS_MAX)
            .map(|v| {
                let key = PolicyKey {
                    src_ip: ip_key(v.source),
                    dst_ip: ip_key(v.destination),
                    dst_port: v.port,
                    _pad: 0,
                };
                (key, if v.deny { POLICY_DENY } else { POLICY_ALLOW })
            })
            .collect();
        sync(&mut policy, pins::POLICY, &desired)
    }
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

fn sync<K, V>(
    map: &mut BpfHashMap<&mut aya::maps::MapData, K, V>,
    name: &'static str,
    desired: &HashMap<K, V>,
) -> Result<()>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    let stale: Vec<K> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !desired.contains_key(k))
        .collect();
    for key in stale {
        map.remove(&key)
            .map_err(|source| DatapathError::Map { name, source })?;
    }
    for (key, value) in desired {
        if map.get(key, 0).ok().as_ref() != Some(value) {
            map.insert(key, value, 0)
                .map_err(|source| DatapathError::Map { name, source })?;
        }
    }
    Ok(())
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

/// The interface holding the host route to `ip` (a CNI's `/32` route to the pod's veth),
/// from this network namespace's IPv4 routing table.
pub fn find_pod_veth(ip: Ipv4Addr) -> Option<(String, u32)> {
    let routes = fs::read_to_string("/proc/net/route").ok()?;
    let want = format!("{:08X}", u32::from_le_bytes(ip.octets()));
    let iface = routes.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.len() > 7 && cols[1] == want && cols[7] == "FFFFFFFF").then(|| cols[0].to_owned())
    })?;
    let index = ifindex(&iface)?;
    Some((iface, index))
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

/// The cgroup v2 mount point, from /proc/mounts (`/sys/fs/cgroup` or, on hybrid hosts,
/// `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut cols = line.split_whitespace();
        let (_, point, kind) = (cols.next()?, cols.next()?, cols.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(point))
    })
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
}
