//! The bench's Kubernetes API scale scenario: 10,000 pods and 1,000 Services (1,000 and
//! 100 with `--quick`) in the sandbox's real API server, the pods on nodes that exist
//! only in the API, as a large cluster's other nodes are to an agent. Figures for node-a's
//! agent, each against the sandbox's own few objects: its memory once it holds them, and
//! the time a restarted agent takes to serve again; and the time from a pod's status in
//! the API (Running, an address) to its entry in the kernel's workload map, p50 and p99
//! over a series of pods, read from the pinned map itself every millisecond.

use std::{
    ffi::CString,
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{
    bench::{rss_megabytes, Measurement},
    control_plane::{self, ApiRequest, Layout},
    daemon::RUN_DIR,
    progress,
    sandbox::{self, SandboxState},
    supervise, workspace,
};

/// The namespace the scale objects are made in (enrolled, as Istio ambient's label says).
const NAMESPACE: &str = "scale";
/// Nodes that exist only in the API, for the scale pods.
const NODES: usize = 10;
/// How long the agent may take to hold every object before the bench gives up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one pod may take to reach the kernel map before the bench gives up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Between a probe pod's creation and its status.
const POD_START: Duration = Duration::from_secs(1);
/// Objects sent in one bulk request batch.
const BATCH: usize = 500;

#[derive(Debug, Clone, Copy)]
pub struct ApiScale {
    pub pods: usize,
    pub services: usize,
    /// Pods whose way from the API to the kernel map is timed.
    pub changes: usize,
}

/// The scenario's figures, as (scenario, metric, unit).
pub const FIGURES: [(&str, &str, &str); 4] = [
    (
        "api-scale",
        "agent-rss",
        "MB (node-a's agent: the sandbox's objects → with the scale objects)",
    ),
    (
        "api-scale",
        "time-to-ready",
        "s (node-a's agent killed until it serves again: before → with them)",
    ),
    (
        "api-pod-change",
        "p50",
        "ms (pod status in the API → kernel map)",
    ),
    (
        "api-pod-change",
        "p99",
        "ms (pod status in the API → kernel map)",
    ),
];
/// The path the scenario's figures are reported on.
pub const PATH: &str = "kube-api";

pub fn run(scale: &ApiScale) -> Result<Vec<Measurement>> {
    sandbox::up(
        &workspace().join("deploy/sandbox"),
        sandbox::ConfigSource::Kube,
    )?;
    let outcome = measure(scale);
    progress("tearing the API scale sandbox down");
    sandbox::down()?;
    outcome
}

fn measure(scale: &ApiScale) -> Result<Vec<Measurement>> {
    let layout = Layout::new(Path::new(RUN_DIR));
    let state = SandboxState::load()?;
    let node = state.node("node-a")?;
    let workloads = || -> u64 {
        sandbox::agent_status(node)
            .and_then(|status| status["workloads"].as_u64())
            .unwrap_or(0)
    };
    let rss = || rss_megabytes(supervise::agent_pid("node-a"));
    let rss_before = rss()?;
    let ready_before = sandbox::restart_agent("node-a", false)?;
    let base = workloads();

    progress(&format!(
        "{PATH}: {} pods and {} Services through the API server",
        scale.pods, scale.services
    ));
    let made = Instant::now();
    control_plane::send_all(&layout, &scale_nodes())?;
    control_plane::send_all(&layout, &scale_node_statuses())?;
    for batch in services(scale.services).chunks(BATCH) {
        control_plane::send_all(&layout, batch)?;
    }
    for batch in pods(scale).chunks(BATCH) {
        control_plane::send_all(&layout, batch)?;
    }
    for batch in pod_statuses(scale).chunks(BATCH) {
        control_plane::send_all(&layout, batch)?;
    }
    let wanted = base + scale.pods as u64;
    while workloads() < wanted {
        if made.elapsed() > CATCH_UP_TIMEOUT {
            bail!(
                "{PATH}: node-a's agent holds {} of {wanted} workloads after {CATCH_UP_TIMEOUT:?}",
                workloads()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    progress(&format!(
        "{PATH}: node-a's agent holds them {:.1} s after the first request",
        made.elapsed().as_secs_f64()
    ));
    // The allocator gives back what loading freed every few seconds: let it.
    std::thread::sleep(Duration::from_secs(6));
    let rss_after = rss()?;
    let ready_after = sandbox::restart_agent("node-a", false)?;
    while workloads() < wanted {
        if made.elapsed() > CATCH_UP_TIMEOUT * 2 {
            bail!(
                "{PATH}: the restarted agent holds {} of {wanted} workloads",
                workloads()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    progress(&format!(
        "{PATH}: {} pod changes to the kernel map",
        scale.changes
    ));
    let map = PinnedMap::open(
        &node
            .bpffs
            .join(format!("maps-v{}", mesh_common::MAPS_LAYOUT_VERSION))
            .join(mesh_common::pins::WORKLOADS),
    )?;
    let mut latencies = Vec::new();
    for change in 0..scale.changes {
        let name = format!("probe-{change}");
        let ip = std::net::Ipv4Addr::new(10, 247, (change / 250) as u8, (change % 250 + 1) as u8);
        control_plane::send_all(&layout, &[pod(&name, "app-0", "scale-node-0")])?;
        // As a kubelet takes a moment to start a pod's containers: the pod's creation is
        // one change and its status (an address, Running, Ready) the one timed.
        std::thread::sleep(POD_START);
        let sent = control_plane::send_timed(&layout, &pod_status(&name, ip))?;
        let key = u32::from_ne_bytes(ip.octets());
        loop {
            if map.holds(key)? {
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if sent.elapsed() > CHANGE_TIMEOUT {
                bail!(
                    "{PATH}: pod {name} ({ip}) not in node-a's kernel map after {CHANGE_TIMEOUT:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let figure = |index: usize| (FIGURES[index].0, PATH, FIGURES[index].1, FIGURES[index].2);
    // One measurement each: no spread.
    let with_baseline = |index: usize, before: f64, after: f64| {
        Measurement::against_baseline(figure(index), (before, 0.0), (after, 0.0))
    };
    let alone = |index: usize, value: f64| Measurement::mesh_only(figure(index), (value, 0.0));
    Ok(vec![
        with_baseline(0, rss_before, rss_after),
        with_baseline(1, ready_before.as_secs_f64(), ready_after.as_secs_f64()),
        alone(2, at(0.5)),
        alone(3, at(0.99)),
    ])
}

/// The nodes of the scale pods, with an address each (never dialled: no pod of theirs
/// is asked for in the bench).
fn scale_nodes() -> Vec<ApiRequest> {
    let mut requests = vec![ApiRequest {
        method: "POST",
        path: "/api/v1/namespaces".into(),
        body: json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": {"istio.io/dataplane-mode": "ambient"}},
        }),
    }];
    for index in 0..NODES {
        let name = format!("scale-node-{index}");
        requests.push(ApiRequest {
            method: "POST",
            path: "/api/v1/nodes".into(),
            body: json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}),
        });
    }
    requests
}

/// The nodes' addresses, as their kubelets would report them.
fn scale_node_statuses() -> Vec<ApiRequest> {
    (0..NODES)
        .map(|index| ApiRequest {
            method: "PATCH",
            path: format!("/api/v1/nodes/scale-node-{index}/status"),
            body: json!({"status": {"addresses": [
                {"type": "InternalIP", "address": format!("10.201.0.{}", index + 1)},
            ]}}),
        })
        .collect()
}

/// Services `svc-N`, each selecting the pods labelled `app-N`.
fn services(count: usize) -> Vec<ApiRequest> {
    (0..count)
        .map(|index| ApiRequest {
            method: "POST",
            path: format!("/api/v1/namespaces/{NAMESPACE}/services"),
            body: json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("svc-{index}"), "namespace": NAMESPACE},
                "spec": {
                    "selector": {"app": format!("app-{index}")},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                },
            }),
        })
        .collect()
}

fn pod(name: &str, app: &str, node: &str) -> ApiRequest {
    ApiRequest {
        method: "POST",
        path: format!("/api/v1/namespaces/{NAMESPACE}/pods"),
        body: json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": app}},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "app", "image": "mesh-sandbox/local"}],
            },
        }),
    }
}

/// The status a kubelet reports for a running, ready pod at `ip`.
fn pod_status(name: &str, ip: std::net::Ipv4Addr) -> ApiRequest {
    ApiRequest {
        method: "PATCH",
        path: format!("/api/v1/namespaces/{NAMESPACE}/pods/{name}/status"),
        body: json!({"status": {
            "phase": "Running",
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }}),
    }
}

/// The address of scale pod `index`: 10.246.0.0/16 holds 65,535 (never 10.246.0.0).
fn scale_pod_ip(index: usize) -> std::net::Ipv4Addr {
    let [_, _, third, fourth] = (index as u32 + 1).to_be_bytes();
    std::net::Ipv4Addr::new(10, 246, third, fourth)
}

fn pods(scale: &ApiScale) -> Vec<ApiRequest> {
    (0..scale.pods)
        .map(|index| {
            pod(
                &format!("pod-{index}"),
                &format!("app-{}", index % scale.services.max(1)),
                &format!("scale-node-{}", index % NODES),
            )
        })
        .collect()
}

fn pod_statuses(scale: &ApiScale) -> Vec<ApiRequest> {
    (0..scale.pods)
        .map(|index| pod_status(&format!("pod-{index}"), scale_pod_ip(index)))
        .collect()
}

/// A pinned BPF hash map with `u32` keys, read through bpf(2) directly: a lookup costs
/// microseconds, so the bench can watch for a key every millisecond.
struct PinnedMap {
    fd: OwnedFd,
}

/// `union bpf_attr` as `BPF_OBJ_GET` reads it.
#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` as `BPF_MAP_LOOKUP_ELEM` reads it.
#[repr(C)]
struct Lookup {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_GET: libc::c_long = 7;

impl PinnedMap {
    fn open(path: &Path) -> Result<PinnedMap> {
        let name = CString::new(path.as_os_str().as_encoded_bytes())
            .context("a map path with a NUL byte")?;
        let attr = ObjGet {
            pathname: name.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: 0,
        };
        // SAFETY: bpf(2) reads `attr`, whose path outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET,
                &attr as *const ObjGet,
                std::mem::size_of::<ObjGet>(),
            )
        };
        if fd < 0 {
            bail!(
                "opening {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: a descriptor bpf(2) just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(PinnedMap { fd })
    }

    fn holds(&self, key: u32) -> Result<bool> {
        use std::os::fd::AsRawFd;
        let mut value = [0u8; std::mem::size_of::<mesh_common::WorkloadInfo>()];
        let attr = Lookup {
            map_fd: self.fd.as_raw_fd() as u32,
            pad: 0,
            key: &key as *const u32 as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: bpf(2) reads the key and writes at most the map's value size, which
        // `value` holds.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                &attr as *const Lookup,
                std::mem::size_of::<Lookup>(),
            )
        };
        if result == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOENT) => Ok(false),
            _ => Err(err).context("looking a workload up in the kernel map"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_pods_have_distinct_addresses_and_spread_over_services_and_nodes() {
        let scale = ApiScale {
            pods: 1_000,
            services: 100,
            changes: 0,
        };
        let addresses: std::collections::BTreeSet<_> = (0..scale.pods).map(scale_pod_ip).collect();
        assert_eq!(addresses.len(), scale.pods);
        assert_eq!(scale_pod_ip(0), std::net::Ipv4Addr::new(10, 246, 0, 1));
        assert_eq!(scale_pod_ip(256), std::net::Ipv4Addr::new(10, 246, 1, 1));
        let pods = pods(&scale);
        assert_eq!(pods[101].body["metadata"]["labels"]["app"], "app-1");
        assert_eq!(pods[101].body["spec"]["nodeName"], "scale-node-1");
        let statuses = pod_statuses(&scale);
        assert_eq!(statuses[3].method, "PATCH");
        assert_eq!(
            statuses[3].path,
            "/api/v1/namespaces/scale/pods/pod-3/status"
        );
        assert_eq!(statuses[3].body["status"]["podIP"], "10.246.0.4");
    }
}
