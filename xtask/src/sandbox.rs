//! The sandbox: a real multi-node mesh on one machine, built from Kubernetes-format YAML.
//!
//! Nodes and pods are network namespaces; pods are wired to their node with a veth pair,
//! routed (host side `mp<N>` holding the pods' link-local gateway 169.254.1.1, a `/32`
//! route to the pod: the way Calico does it) or bridged (host sides on the bridge `cni0`,
//! as flannel does it) as the Node's annotation says (`PodNetwork`), and nodes to each
//! other through a bridge in a fabric namespace. No namespace has a
//! route to the host or beyond. Each pod gets a cgroup v2 directory named after its UID
//! (`pod<uid>`, as the kubelet names it); each node runs one mesh-agent. Every object is
//! written, with the status a kubelet would add (pod IP, UID, node address, cluster IP),
//! into the configuration directory the agents watch.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use mesh_common::enrollment;
use serde::{Deserialize, Serialize};
use serde_norway::Value;

use crate::{
    control_plane::{self, ControlPlaneState},
    daemon::{
        http_get, ip, join_fabric, log_path, logs_dir, process_alive, start_daemon,
        start_placed_daemon, FABRIC_NETNS, RUN_DIR,
    },
    jaeger::{self, JaegerState},
    kubelet,
    ns::{self, Placement},
    pod_sync, progress,
    prometheus::{self, PrometheusState},
    release_binaries, resolver, run, supervise,
};

const PREFIX: &str = "msb";
const CA_NETNS: &str = "msb-ca";
const CA_ADDRESS: &str = "10.200.0.254:15012";
/// Lifetime of workload certificates in the sandbox; short values exercise rotation.
const CERT_TTL_VARIABLE: &str = "MESH_SANDBOX_CERT_TTL";
const BPFFS_DIR: &str = "/sys/fs/bpf/mesh-sandbox";
const CGROUP_DIR: &str = "mesh-sandbox";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub index: u8,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub uplink: String,
    /// The process that runs the node's agent (and its successors): see `supervise`.
    #[serde(alias = "agent_pid")]
    pub supervisor_pid: u32,
    pub bpffs: PathBuf,
    pub cgroup: PathBuf,
    /// Pod addresses handed out so far on this node.
    pub pods_allocated: u8,
    /// How the node's pods are wired to it.
    #[serde(default)]
    pub pod_network: PodNetwork,
}

/// How a node's pods are wired, as the two families of CNIs do it (the Node annotation
/// `sandbox.mesh.dev/pod-network`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodNetwork {
    /// Each pod's veth holds a `/32` route to it and answers for the pod's link-local
    /// gateway (Calico).
    #[default]
    Routed,
    /// The pods' veths are ports of the bridge `cni0`, which holds the gateway address of
    /// the node's pod subnet; pods reach each other on the subnet directly (flannel, the
    /// `bridge` plugin).
    Bridge,
}

/// The annotation of a sandbox Node that chooses its `PodNetwork`.
const POD_NETWORK_ANNOTATION: &str = "sandbox.mesh.dev/pod-network";
/// The bridge of a `PodNetwork::Bridge` node.
const POD_BRIDGE: &str = "cni0";

impl PodNetwork {
    fn of(node: &Object) -> Result<PodNetwork> {
        let chosen = node
            .value
            .get("metadata")
            .and_then(|m| m.get("annotations"))
            .and_then(|a| a.get(POD_NETWORK_ANNOTATION));
        match chosen.map(|v| v.as_str()) {
            None | Some(Some("routed")) => Ok(PodNetwork::Routed),
            Some(Some("bridge")) => Ok(PodNetwork::Bridge),
            _ => bail!(
                "{}: Node {}: annotation {POD_NETWORK_ANNOTATION} must be \"routed\" or \
                 \"bridge\"",
                node.source.display(),
                node.name
            ),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    pub veth: String,
    pub uid: String,
    pub cgroup: PathBuf,
    pub pid: Option<u32>,
}

/// Where the agents read the cluster from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ConfigSource {
    /// The configuration directory the sandbox writes every object to.
    #[default]
    Dir,
    /// The API server, which the sandbox then creates every object through, setting pod
    /// and node status as a kubelet does.
    Kube,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SandboxState {
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    /// Cluster IPs by `namespace/name`.
    pub services: BTreeMap<String, Ipv4Addr>,
    pub next_veth: u32,
    pub next_service_ip: u8,
    /// The Kubernetes API server and etcd, once started.
    #[serde(default)]
    pub control_plane: Option<ControlPlaneState>,
    #[serde(default)]
    pub config_source: ConfigSource,
    /// The trace collector, once started.
    #[serde(default)]
    pub jaeger: Option<JaegerState>,
    /// The metrics server scraping the agents, once started.
    #[serde(default)]
    pub prometheus: Option<PrometheusState>,
    /// The lifetime of the certificates the CA issues (`MESH_SANDBOX_CERT_TTL` at `up`),
    /// kept for `start-ca`.
    #[serde(default)]
    pub cert_ttl: Option<String>,
}

fn state_path() -> PathBuf {
    Path::new(RUN_DIR).join("state.json")
}

pub fn config_dir() -> PathBuf {
    Path::new(RUN_DIR).join("config")
}

/// The CA's state: its root (the trust bundle agents use) and the bootstrap tokens.
pub fn ca_dir() -> PathBuf {
    Path::new(RUN_DIR).join("ca")
}

impl SandboxState {
    pub fn load() -> Result<SandboxState> {
        let text = fs::read_to_string(state_path())
            .context("no sandbox is running (`cargo xtask sandbox up` starts one)")?;
        serde_json::from_str(&text).context("reading the sandbox state")
    }

    fn save(&self) -> Result<()> {
        write_atomic(&state_path(), &serde_json::to_string_pretty(self)?)
    }

    pub fn pod(&self, spec: &str) -> Result<&PodState> {
        let (namespace, name) = match spec.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, spec),
        };
        let matches: Vec<&PodState> = self
            .pods
            .iter()
            .filter(|p| p.name == name && namespace.is_none_or(|ns| ns == p.namespace))
            .collect();
        match matches.as_slice() {
            [pod] => Ok(pod),
            [] => bail!("no pod {spec} in the sandbox"),
            _ => bail!("pod name {spec} is ambiguous: use namespace/name"),
        }
    }

    /// The API server the sandbox keeps its objects in, when the agents read from it.
    pub fn api(&self) -> Option<&ControlPlaneState> {
        self.control_plane
            .as_ref()
            .filter(|_| self.config_source == ConfigSource::Kube)
    }

    pub fn node(&self, name: &str) -> Result<&NodeState> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in the sandbox"))
    }
}

/// Held while a command changes the sandbox's pods: `apply`, `delete` and the pod sync
/// loop (`pod_sync`) each load, change and save the state under it.
pub struct StateLock(fs::File);

impl Drop for StateLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: flock(2) on a descriptor this lock owns.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Waits for and takes the sandbox's state lock.
pub fn lock_state() -> Result<StateLock> {
    use std::os::fd::AsRawFd;
    let path = Path::new(RUN_DIR).join("state.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", path.display()));
    }
    Ok(StateLock(file))
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// One Kubernetes object of the cluster description, kept whole.
#[derive(Debug, Clone)]
pub struct Object {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub value: Value,
    pub source: PathBuf,
}

/// The file under the configuration directory that holds an object of `kind`.
fn object_file_name(kind: &str, namespace: &str, name: &str) -> String {
    format!("{}-{namespace}-{name}.yaml", kind.to_lowercase())
}

impl Object {
    fn file_name(&self) -> String {
        object_file_name(&self.kind, &self.namespace, &self.name)
    }

    fn node_name(&self) -> Option<String> {
        self.value
            .get("spec")?
            .get("nodeName")?
            .as_str()
            .map(str::to_owned)
    }

    /// The first container's readiness probe (`tcpSocket`, or `httpGet` with its path),
    /// its port a number or the name of one of the container's ports.
    fn readiness_probe(&self) -> Option<ReadinessProbe> {
        let container = self.value.get("spec")?.get("containers")?.get(0)?;
        let probe = container.get("readinessProbe")?;
        let port_of = |action: &Value| {
            let port = match action.get("port")? {
                Value::String(name) => container
                    .get("ports")?
                    .as_sequence()?
                    .iter()
                    .find(|p| p.get("name").and_then(Value::as_str) == Some(name.as_str()))?
                    .get("containerPort")?
                    .as_u64()?,
                number => number.as_u64()?,
            };
            u16::try_from(port).ok()
        };
        if let Some(action) = probe.get("httpGet") {
            let path = action
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or("/")
                .to_owned();
            return Some(ReadinessProbe::Http {
                port: port_of(action)?,
                path,
            });
        }
        Some(ReadinessProbe::Tcp {
            port: port_of(probe.get("tcpSocket")?)?,
        })
    }

    /// The first container's command and arguments.
    fn command(&self) -> Vec<String> {
        let Some(container) = self
            .value
            .get("spec")
            .and_then(|s| s.get("containers"))
            .and_then(|c| c.get(0))
        else {
            return Vec::new();
        };
        ["command", "args"]
            .iter()
            .filter_map(|key| container.get(*key)?.as_sequence())
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    fn set(&mut self, path: &[&str], value: Value) {
        let mut node = &mut self.value;
        for key in &path[..path.len() - 1] {
            if node.get(*key).is_none_or(|v| !v.is_mapping()) {
                node[*key] = Value::Mapping(Default::default());
            }
            node = &mut node[*key];
        }
        node[path[path.len() - 1]] = value;
    }
}

/// Reads the objects of a file or of every YAML file of a directory.
pub fn read_objects(path: &Path) -> Result<Vec<Object>> {
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    let mut objects = Vec::new();
    for file in files {
        let text =
            fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        for (index, document) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(document)
                .with_context(|| format!("{}: document {}", file.display(), index + 1))?;
            if value.is_null() {
                continue;
            }
            let field =
                |v: &Value, key: &str| v.get(key).and_then(|x| x.as_str()).map(str::to_owned);
            let kind = field(&value, "kind").with_context(|| {
                format!("{}: document {} has no kind", file.display(), index + 1)
            })?;
            let meta = value.get("metadata").cloned().unwrap_or_default();
            let name = field(&meta, "name").with_context(|| {
                format!(
                    "{}: {kind} in document {} has no metadata.name",
                    file.display(),
                    index + 1
                )
            })?;
            objects.push(Object {
                namespace: field(&meta, "namespace").unwrap_or_else(|| "default".into()),
                kind,
                name,
                value,
                source: file.clone(),
            });
        }
    }
    Ok(objects)
}

fn cgroup_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    let mount = mounts
        .lines()
        .find_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.len() > 2 && cols[2] == "cgroup2").then(|| PathBuf::from(cols[1]))
        })
        .context("no cgroup v2 hierarchy in /proc/mounts")?;
    Ok(mount.join(CGROUP_DIR))
}

fn sysctl(netns: &str, settings: &[&str]) -> Result<()> {
    run(Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-qw"])
        .args(settings))
}

fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run(Command::new("mount").args(["-t", "bpf", "bpffs", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// The gateway address of the pods of the node at `index` on a bridge (their subnet's
/// first address; the first pod gets the second).
fn pod_gateway(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, index + 1, 1)
}

/// Creates a pod's namespace and wires it to its node the way the node's CNI family does.
fn wire_pod(pod: &PodState, node_netns: &str, node_index: u8, network: PodNetwork) -> Result<()> {
    let pod_ip = pod.ip;
    ip(&["netns", "add", &pod.netns])?;
    ip(&["-n", &pod.netns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", node_netns, "link", "add", &pod.veth, "type", "veth", "peer", "name", "eth0",
        "netns", &pod.netns,
    ])?;
    if network == PodNetwork::Bridge {
        let gateway = pod_gateway(node_index).to_string();
        ip(&[
            "-n",
            &pod.netns,
            "addr",
            "add",
            &format!("{pod_ip}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &pod.netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &pod.netns, "route", "add", "default", "via", &gateway])?;
        ip(&[
            "-n", node_netns, "link", "set", &pod.veth, "master", POD_BRIDGE,
        ])?;
        ip(&["-n", node_netns, "link", "set", &pod.veth, "up"])?;
        return Ok(());
    }
    ip(&[
        "-n",
        &pod.netns,
        "addr",
        "add",
        &format!("{pod_ip}/32"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &pod.netns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        &pod.netns,
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ])?;
    ip(&[
        "-n",
        &pod.netns,
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])?;
    ip(&["-n", node_netns, "link", "set", &pod.veth, "up"])?;
    ip(&[
        "-n",
        node_netns,
        "route",
        "add",
        &format!("{pod_ip}/32"),
        "dev",
        &pod.veth,
    ])?;
    // The pod's gateway answers ARP on every pod veth of the node.
    ip(&[
        "-n",
        node_netns,
        "addr",
        "add",
        "169.254.1.1/32",
        "dev",
        &pod.veth,
        "scope",
        "link",
    ])?;
    Ok(())
}

fn new_uid() -> Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/random/uuid")?
        .trim()
        .to_owned())
}

pub fn up(config: &Path, source: ConfigSource) -> Result<()> {
    let objects = read_objects(config)?;
    let nodes: Vec<&Object> = objects.iter().filter(|o| o.kind == "Node").collect();
    if nodes.is_empty() {
        bail!(
            "{}: the sandbox needs at least one Node object",
            config.display()
        );
    }
    if nodes.len() > 200 {
        bail!("the sandbox supports up to 200 nodes");
    }
    let binaries = release_binaries();
    let agent = binaries.join("mesh-agent");
    if !agent.exists() {
        bail!(
            "{} is missing: run `cargo build --release` first",
            agent.display()
        );
    }
    if leftovers() {
        progress("removing the leftovers of an earlier sandbox");
        down()?;
    }
    progress(&format!("creating {} nodes", nodes.len()));
    ensure_bpffs()?;
    for dir in [config_dir(), logs_dir()] {
        fs::create_dir_all(&dir)?;
    }
    let cgroups = cgroup_root()?;
    let mut state = SandboxState {
        next_service_ip: 10,
        config_source: source,
        ..SandboxState::default()
    };
    ip(&["netns", "add", FABRIC_NETNS])?;
    ip(&["-n", FABRIC_NETNS, "link", "set", "lo", "up"])?;
    ip(&["-n", FABRIC_NETNS, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", FABRIC_NETNS, "link", "set", "br0", "up"])?;
    for (index, node) in nodes.iter().enumerate() {
        let index = index as u8;
        let netns = format!("{PREFIX}-node-{}", node.name);
        let node_ip = Ipv4Addr::new(10, 200, 0, index + 1);
        let fabric_port = format!("up{index}");
        let pod_network = PodNetwork::of(node)?;
        join_fabric(&netns, &fabric_port, node_ip)?;
        if pod_network == PodNetwork::Bridge {
            ip(&["-n", &netns, "link", "add", POD_BRIDGE, "type", "bridge"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{}/24", pod_gateway(index)),
                "dev",
                POD_BRIDGE,
            ])?;
            ip(&["-n", &netns, "link", "set", POD_BRIDGE, "up"])?;
        }
        sysctl(
            &netns,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        let cgroup = cgroups.join(&node.name);
        fs::create_dir_all(cgroup.join("agent"))
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        state.nodes.push(NodeState {
            name: node.name.clone(),
            index,
            netns,
            ip: node_ip,
            uplink: "eth0".into(),
            supervisor_pid: 0,
            bpffs: Path::new(BPFFS_DIR).join(&node.name),
            cgroup,
            pods_allocated: 1,
            pod_network,
        });
    }
    for node in &state.nodes {
        for other in &state.nodes {
            if other.index != node.index {
                let cidr = format!("10.244.{}.0/24", other.index + 1);
                ip(&[
                    "-n",
                    &node.netns,
                    "route",
                    "add",
                    &cidr,
                    "via",
                    &other.ip.to_string(),
                ])?;
            }
        }
    }
    join_fabric(
        control_plane::API_NETNS,
        control_plane::API_FABRIC_PORT,
        control_plane::API_IP,
    )?;
    state.control_plane = Some(control_plane::start(
        &control_plane::Layout::new(Path::new(RUN_DIR)),
        &cgroups,
    )?);
    state.save()?;
    // On the API source the CA learns which pods run where from the API, as agents do.
    state.cert_ttl = Some(std::env::var(CERT_TTL_VARIABLE).unwrap_or_else(|_| "1h".into()));
    start_ca(&agent, &cgroups, &state)?;
    state.jaeger = Some(jaeger::start(Path::new(RUN_DIR), &cgroups)?);
    let targets: Vec<prometheus::Target> = state
        .nodes
        .iter()
        .map(|n| prometheus::Target {
            node: &n.name,
            ip: n.ip,
        })
        .collect();
    state.prometheus = Some(prometheus::start(Path::new(RUN_DIR), &cgroups, &targets)?);
    resolver::start(&cgroups)?;
    state.save()?;
    // Nodes first, so that the agents start with their own address known.
    for node in &nodes {
        let mut node = (*node).clone();
        let address = state.node(&node.name)?.ip;
        node.set(
            &["status", "addresses"],
            serde_norway::from_str(&format!("[{{type: InternalIP, address: \"{address}\"}}]"))?,
        );
        write_object(&node)?;
        if let Some(api) = state.api() {
            control_plane::apply_object(api, &node.value)?;
            control_plane::patch_status(
                api,
                "Node",
                None,
                &node.name,
                &serde_json::json!({
                    "addresses": [{"type": "InternalIP", "address": address}],
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet::PORT}},
                }),
            )?;
            control_plane::apply_object(api, &agent_pod(&node.name)?)?;
            // What the DaemonSet's projected token would be: bound to the node, for
            // the CA.
            fs::write(
                agent_token_file(&node.name),
                control_plane::agent_token(api, &node.name)?,
            )?;
        }
    }
    let mut pods = Vec::new();
    // Namespaces before the objects in them, as the API server requires.
    let mut rest: Vec<&Object> = objects.iter().filter(|o| o.kind != "Node").collect();
    rest.sort_by_key(|o| o.kind != "Namespace");
    for object in rest {
        if object.kind == "Pod" {
            pods.push((add_pod(&mut state, object, None)?, object));
        } else {
            store(&mut state, object)?;
        }
    }
    state.save()?;
    progress("starting one mesh-agent per node");
    let kubeconfig = state.api().map(|api| api.agent_kubeconfig.clone());
    for node in state.nodes.iter_mut() {
        node.supervisor_pid = start_agent(node, &agent, kubeconfig.as_deref())?;
    }
    state.save()?;
    for node in &state.nodes {
        wait_ready(node)?;
    }
    if let Some(api) = state.api() {
        // Each node's kubelet API, for port-forwards to its pods and its agent; the agent
        // pod reports ready as its readiness probe now passes.
        for node in &state.nodes {
            kubelet::start(node)?;
            let mut status = ready_status(&agent_pod(&node.name)?);
            status["phase"] = "Running".into();
            status["hostIP"] = serde_json::json!(node.ip);
            status["podIP"] = serde_json::json!(node.ip);
            status["podIPs"] = serde_json::json!([{"ip": node.ip}]);
            control_plane::patch_status(
                api,
                "Pod",
                Some(kubelet::AGENT_NAMESPACE),
                &kubelet::agent_pod_name(&node.name),
                &status,
            )?;
        }
    }
    progress(&format!("starting {} pods", pods.len()));
    for ((pod, start), object) in pods {
        start_pod(&mut state, &pod, &start)?;
        if let Some(api) = state.api() {
            report_ready(api, &pod, object)?;
        }
    }
    state.save()?;
    if state.api().is_some() {
        // From now on pods made with kubectl run too.
        pod_sync::start(cgroups.join("pod-sync"))?;
    }
    progress("sandbox is up (`cargo xtask sandbox status`)");
    Ok(())
}

/// A node's agent as the DaemonSet (deploy/mesh-agent.yaml) would create it: its labels,
/// scheduled on the node, in the node's network namespace.
fn agent_pod(node: &str) -> Result<Value> {
    Ok(serde_norway::to_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": kubelet::agent_pod_name(node),
            "namespace": kubelet::AGENT_NAMESPACE,
            "labels": {"app.kubernetes.io/name": "mesh-agent"},
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": true,
            "serviceAccountName": "mesh-agent",
            "containers": [{"name": "agent", "image": "mesh-agent"}],
        },
    }))?)
}

/// The object as the API server would store it: a Service gets its cluster IP.
fn admit(state: &mut SandboxState, object: &Object) -> Result<Object> {
    let mut object = object.clone();
    if object.kind == "Service" {
        let key = format!("{}/{}", object.namespace, object.name);
        let given = object
            .value
            .get("spec")
            .and_then(|s| s.get("clusterIP"))
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let cluster_ip = match (given, state.services.get(&key)) {
            (Some(ip), _) => ip.parse().with_context(|| {
                format!("Service {key}: spec.clusterIP {ip:?} is not an IPv4 address")
            })?,
            (None, Some(ip)) => *ip,
            (None, None) => {
                let ip = Ipv4Addr::new(10, 96, 0, state.next_service_ip);
                state.next_service_ip = state
                    .next_service_ip
                    .checked_add(1)
                    .context("out of service addresses")?;
                ip
            }
        };
        state.services.insert(key, cluster_ip);
        object.set(
            &["spec", "clusterIP"],
            Value::String(cluster_ip.to_string()),
        );
    }
    Ok(object)
}

/// Stores an object other than a Pod or Node as the API server would: written to the
/// configuration directory and, when the agents read the API, created there.
fn store(state: &mut SandboxState, object: &Object) -> Result<()> {
    let admitted = admit(state, object)?;
    write_object(&admitted)?;
    if let Some(api) = state.api() {
        control_plane::apply_object(api, &admitted.value)?;
    }
    Ok(())
}

fn write_object(object: &Object) -> Result<()> {
    let path = config_dir().join(object.file_name());
    write_atomic(&path, &serde_norway::to_string(&object.value)?)
}

/// A readiness probe the sandbox runs as a kubelet does: from the node, to the pod's
/// address (so under STRICT it must pass the kernel programs as the node's probe).
#[derive(Debug, Clone)]
enum ReadinessProbe {
    Tcp { port: u16 },
    Http { port: u16, path: String },
}

impl ReadinessProbe {
    /// Whether one probe succeeds: a connection, and for HTTP a status from 200 to 399.
    fn succeeds(&self, pod: Ipv4Addr) -> bool {
        let timeout = Duration::from_millis(500);
        match self {
            ReadinessProbe::Tcp { port } => {
                TcpStream::connect_timeout(&SocketAddr::from((pod, *port)), timeout).is_ok()
            }
            ReadinessProbe::Http { port, path } => {
                let Ok(mut stream) =
                    TcpStream::connect_timeout(&SocketAddr::from((pod, *port)), timeout)
                else {
                    return false;
                };
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: {pod}:{port}\r\nUser-Agent: kube-probe/1.37\r\nConnection: close\r\n\r\n"
                );
                let mut head = [0u8; 12];
                stream.set_read_timeout(Some(timeout)).is_ok()
                    && stream.write_all(request.as_bytes()).is_ok()
                    && stream.read_exact(&mut head).is_ok()
                    && std::str::from_utf8(&head[9..12])
                        .ok()
                        .and_then(|code| code.parse::<u16>().ok())
                        .is_some_and(|code| (200..400).contains(&code))
            }
        }
    }

    fn port(&self) -> u16 {
        match self {
            ReadinessProbe::Tcp { port } | ReadinessProbe::Http { port, .. } => *port,
        }
    }
}

/// How a pod starts: its command, and the probe that succeeds once it is ready.
pub struct PodStart {
    command: Vec<String>,
    readiness: Option<ReadinessProbe>,
    service_account: String,
    /// Whether the mesh takes the pod in (`enrolled`): only then is there an enrollment
    /// and a certificate to wait for.
    meshed: bool,
}

/// The `istio.io/dataplane-mode` label of an object, if it has one.
fn dataplane_mode(value: &Value) -> Option<String> {
    value
        .get("metadata")?
        .get("labels")?
        .get(enrollment::DATAPLANE_MODE_LABEL)?
        .as_str()
        .map(str::to_owned)
}

/// Whether the agents take the pod in, by the rule they apply (`mesh_common::enrollment`):
/// its label, its namespace's as written to the configuration directory, and the default
/// the agents get from `MESH_DEFAULT_ENROLLMENT` in this process's environment.
fn enrolled(pod: &Object) -> bool {
    let namespace_file = config_dir().join(format!("namespace-default-{}.yaml", pod.namespace));
    let namespace_label = fs::read_to_string(namespace_file)
        .ok()
        .and_then(|text| serde_norway::from_str::<Value>(&text).ok())
        .and_then(|ns| dataplane_mode(&ns));
    let pod_label = dataplane_mode(&pod.value);
    let has_sidecar = pod
        .value
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(enrollment::SIDECAR_STATUS_ANNOTATION))
        .is_some();
    let default = match std::env::var("MESH_DEFAULT_ENROLLMENT").as_deref() {
        Ok(enrollment::AMBIENT) => enrollment::DefaultEnrollment::Ambient,
        _ => enrollment::DefaultEnrollment::None,
    };
    enrollment::enrolled(
        enrollment::PodEnrollment {
            pod_label: pod_label.as_deref(),
            namespace_label: namespace_label.as_deref(),
            has_sidecar,
        },
        default,
    )
}

/// Wires a pod (namespace, veth, address, cgroup) and writes it; returns the pod and how
/// to start it once its node's agent enrolled it. A pod the API server already holds
/// comes with its `uid` and is reported not Ready until it starts (`report_ready`); any
/// other is created through the API first when the agents read it.
fn add_pod(
    state: &mut SandboxState,
    object: &Object,
    uid: Option<String>,
) -> Result<(PodState, PodStart)> {
    let node_name = object.node_name().with_context(|| {
        format!(
            "{}: Pod {}/{} has no spec.nodeName",
            object.source.display(),
            object.namespace,
            object.name
        )
    })?;
    let veth_index = state.next_veth;
    let node = state
        .nodes
        .iter_mut()
        .find(|n| n.name == node_name)
        .with_context(|| {
            format!(
                "Pod {}/{}: node {node_name} is not in the sandbox",
                object.namespace, object.name
            )
        })?;
    node.pods_allocated = node
        .pods_allocated
        .checked_add(1)
        .filter(|n| *n < 255)
        .context("node is out of pod addresses")?;
    let pod_ip = Ipv4Addr::new(10, 244, node.index + 1, node.pods_allocated);
    let node_ip = node.ip;
    let node_index = node.index;
    let pod_network = node.pod_network;
    let node_netns = node.netns.clone();
    let cgroup = node.cgroup.clone();
    state.next_veth += 1;
    // The kubelet names a pod's cgroup after the UID the API server gave the pod.
    let scheduled = uid.is_some();
    let uid = match (uid, state.api()) {
        (Some(uid), _) => uid,
        (None, Some(api)) => control_plane::create_pod(api, &object.value)?,
        (None, None) => new_uid()?,
    };
    let pod = PodState {
        name: object.name.clone(),
        namespace: object.namespace.clone(),
        node: node_name,
        ip: pod_ip,
        netns: format!("{PREFIX}-pod-{}-{}", object.namespace, object.name),
        veth: format!("mp{veth_index}"),
        cgroup: cgroup.join(format!("pod{uid}")),
        uid,
        pid: None,
    };
    wire_pod(&pod, &node_netns, node_index, pod_network)?;
    fs::create_dir_all(&pod.cgroup)
        .with_context(|| format!("creating cgroup {}", pod.cgroup.display()))?;
    fs::create_dir_all(pod_dir(&pod))?;

    let mut stored = object.clone();
    stored.set(&["metadata", "uid"], Value::String(pod.uid.clone()));
    stored.set(&["status", "podIP"], Value::String(pod_ip.to_string()));
    stored.set(&["status", "phase"], Value::String("Running".into()));
    write_object(&stored)?;
    if let Some(api) = state.api() {
        control_plane::patch_status(
            api,
            "Pod",
            Some(&pod.namespace),
            &pod.name,
            &running_status(pod_ip, node_ip, scheduled),
        )?;
    }
    state.pods.push(pod.clone());
    let start = PodStart {
        command: object.command(),
        readiness: object.readiness_probe(),
        service_account: object
            .value
            .get("spec")
            .and_then(|s| s.get("serviceAccountName"))
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_owned(),
        meshed: enrolled(object),
    };
    Ok((pod, start))
}

/// A wired pod's status: running at its address, and, for a pod the API server already
/// held, not Ready until its containers start and its probe passes.
fn running_status(pod_ip: Ipv4Addr, node_ip: Ipv4Addr, not_ready_yet: bool) -> serde_json::Value {
    let mut status = serde_json::json!({
        "phase": "Running",
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "hostIP": node_ip,
    });
    if not_ready_yet {
        status["conditions"] = serde_json::json!([{"type": "Ready", "status": "False"}]);
    }
    status
}

/// A started pod's status: Ready, with its first container running (what `kubectl get
/// pods` counts in READY).
fn ready_status(pod: &Value) -> serde_json::Value {
    let container = pod
        .get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(|c| c.get(0));
    let text = |key: &str| {
        container
            .and_then(|c| c.get(key))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    serde_json::json!({
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{
            "name": text("name"),
            "image": text("image"),
            "imageID": "",
            "ready": true,
            "started": true,
            "restartCount": 0,
            "state": {"running": {}},
        }],
    })
}

/// Reports a started pod Ready.
fn report_ready(api: &ControlPlaneState, pod: &PodState, object: &Object) -> Result<()> {
    control_plane::patch_status(
        api,
        "Pod",
        Some(&pod.namespace),
        &pod.name,
        &ready_status(&object.value),
    )
}

/// Wires and starts a pod the API server holds and bound to one of the sandbox's nodes
/// (`pod_sync`), and reports it Ready once started.
pub fn run_scheduled_pod(state: &mut SandboxState, object: &Object, uid: String) -> Result<()> {
    let api = state
        .api()
        .cloned()
        .context("the sandbox's agents do not read the Kubernetes API")?;
    let (pod, start) = add_pod(state, object, Some(uid))?;
    state.save()?;
    start_pod(state, &pod, &start)?;
    state.save()?;
    report_ready(&api, &pod, object)
}

/// Stops a pod and removes everything of it (processes, cgroup, namespace, the copy in
/// the configuration directory); saves the state. Nothing happens for a pod the sandbox
/// does not run.
pub fn remove_pod(state: &mut SandboxState, namespace: &str, name: &str) -> Result<()> {
    let Some(index) = state
        .pods
        .iter()
        .position(|p| p.name == name && p.namespace == namespace)
    else {
        return Ok(());
    };
    let pod = state.pods.remove(index);
    remove_cgroup_tree(&pod.cgroup);
    ip(&["netns", "del", &pod.netns])?;
    let _ = fs::remove_dir_all(pod_dir(&pod));
    let _ = fs::remove_file(config_dir().join(object_file_name("Pod", namespace, name)));
    state.save()
}

fn pod_dir(pod: &PodState) -> PathBuf {
    Path::new(RUN_DIR)
        .join("pods")
        .join(format!("{}-{}", pod.namespace, pod.name))
}

fn path_with_binaries() -> String {
    let binaries = release_binaries();
    match std::env::var("PATH") {
        Ok(path) => format!("{}:{path}", binaries.display()),
        Err(_) => binaries.display().to_string(),
    }
}

/// Starts the mesh CA in its own namespace on the nodes' network, on the configuration
/// directory with one bootstrap token per node or, on the API, reviewing the agents'
/// ServiceAccount tokens, and waits until it serves.
fn start_ca(binary: &Path, cgroups: &Path, state: &SandboxState) -> Result<()> {
    join_fabric(CA_NETNS, "upca", Ipv4Addr::new(10, 200, 0, 254))?;
    let dir = ca_dir();
    fs::create_dir_all(&dir)?;
    if state.api().is_none() {
        let mut tokens = String::new();
        for node in &state.nodes {
            let token = new_uid()?.replace('-', "");
            fs::write(agent_token_file(&node.name), &token)?;
            tokens.push_str(&format!("{} {token}\n", node.name));
        }
        fs::write(dir.join("tokens"), tokens)?;
    }
    run_ca(binary, cgroups, state)
}

/// The token a node's agent presents to the CA.
fn agent_token_file(node: &str) -> PathBuf {
    ca_dir().join(format!("token-{node}"))
}

/// Starts the CA daemon on the state `start_ca` prepared (its root, kept in its state
/// directory, and the nodes' bootstrap tokens on the directory source) and waits until
/// it serves.
fn run_ca(binary: &Path, cgroups: &Path, state: &SandboxState) -> Result<()> {
    let dir = ca_dir();
    let kubeconfig = state.api().map(|api| api.mesh_ca_kubeconfig.clone());
    let cgroup = cgroups.join("ca");
    fs::create_dir_all(&cgroup)?;
    let ttl = state.cert_ttl.clone().unwrap_or_else(|| "1h".into());
    let mut command = Command::new(binary);
    command
        .args(["ca", "--listen", CA_ADDRESS, "--cert-ttl", &ttl])
        .arg("--state-dir")
        .arg(&dir)
        .arg("--config-dir")
        .arg(config_dir());
    match &kubeconfig {
        Some(kubeconfig) => command
            .args(["--config-source", "kube", "--kubeconfig"])
            .arg(kubeconfig),
        None => command.arg("--tokens").arg(dir.join("tokens")),
    };
    let pid = start_daemon(&mut command, "ca.log", CA_NETNS, cgroup)?;
    let addr: SocketAddr = CA_ADDRESS.parse()?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let up = ns::within(CA_NETNS, move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })?;
        if up && dir.join("root-cert.pem").exists() {
            return Ok(());
        }
        if !process_alive(pid) || Instant::now() > deadline {
            let log = fs::read_to_string(logs_dir().join("ca.log")).unwrap_or_default();
            bail!("the mesh CA did not start:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a node's agent under its supervisor, on the configuration directory or, given a
/// kubeconfig, on the API server; returns the supervisor's pid.
fn start_agent(node: &NodeState, agent: &Path, kubeconfig: Option<&Path>) -> Result<u32> {
    // The xtask beside the binaries, not this process's own file: `cargo xtask test`
    // rebuilds that file while it runs (its tests need the binary), so the path of the
    // running executable may name a deleted file by the time a sandbox starts.
    let mut command = Command::new(release_binaries().join("xtask"));
    command
        .args(["sandbox", "supervise", "--pid-file"])
        .arg(supervise::pid_file(&node.name))
        .arg("--")
        .arg(agent)
        .args(["run", "--node", &node.name, "--ca-address", CA_ADDRESS])
        .arg("--dns-upstream")
        .arg(resolver::IP.to_string());
    if let Some(kubeconfig) = kubeconfig {
        command
            .args(["--config-source", "kube", "--kubeconfig"])
            .arg(kubeconfig);
    }
    command
        .arg("--ca-root")
        .arg(ca_dir().join("root-cert.pem"))
        .arg("--ca-token")
        .arg(agent_token_file(&node.name))
        .arg("--config-dir")
        .arg(config_dir())
        .arg("--bpffs")
        .arg(&node.bpffs)
        .arg("--cgroup-root")
        .arg(&node.cgroup)
        .arg("--handover-socket")
        .arg(supervise::handover_socket(&node.name))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
    let log = format!("agent-{}.log", node.name);
    start_daemon(&mut command, &log, &node.netns, node.cgroup.join("agent"))
}

fn wait_ready(node: &NodeState) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 15021));
    loop {
        if let Ok((200, _)) = http_get(&node.netns, addr, "/healthz/ready") {
            return Ok(());
        }
        if !process_alive(node.supervisor_pid) || Instant::now() > deadline {
            let log = fs::read_to_string(logs_dir().join(format!("agent-{}.log", node.name)))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "the agent of node {} did not become ready; its log ends with:\n{}",
                node.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the node agent pinned the pod's links, i.e. its traffic is captured.
fn wait_enrolled(state: &SandboxState, pod: &PodState) -> Result<()> {
    let node = state.node(&pod.node)?;
    // Links are pinned under links-v<layout version>; any version will do.
    let link_dirs = || -> Vec<PathBuf> {
        fs::read_dir(&node.bpffs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("links-v"))
            })
            .collect()
    };
    let prefix = format!("{}_{}@", pod.namespace, pod.name);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let enrolled = link_dirs()
            .iter()
            .flat_map(fs::read_dir)
            .flatten()
            .flatten()
            .any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(&prefix) && name.ends_with("@sockops")
            });
        if enrolled {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "node agent {} did not enroll pod {}/{} (see {}/agent-{}.log)",
                node.name,
                pod.namespace,
                pod.name,
                logs_dir().display(),
                node.name
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the node agent holds the certificate of the pod's identity, so that
/// connections to the pod from other nodes can be authenticated from its first moment.
fn wait_certificate(state: &SandboxState, pod: &PodState, service_account: &str) -> Result<()> {
    let node = state.node(&pod.node)?;
    let identity = format!(
        "spiffe://cluster.local/ns/{}/sa/{service_account}",
        pod.namespace
    );
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, 15000));
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok((200, body)) = http_get(&node.netns, admin, "/certs") {
            if body.contains(&format!("\"{identity}\"")) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "node agent {} has no certificate for {identity} (see {}/agent-{}.log)",
                node.name,
                logs_dir().display(),
                node.name
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The cluster DNS address pods are told about, as kubeadm's `kube-dns` Service has it;
/// whatever address they ask, the node agent's DNS proxy answers.
const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// The pod's resolv.conf, as the kubelet writes it for `dnsPolicy: ClusterFirst`.
fn pod_resolv_conf(pod: &PodState) -> Result<PathBuf> {
    let dir = Path::new(RUN_DIR).join("resolv");
    let path = dir.join(format!("{}-{}.conf", pod.namespace, pod.name));
    let text = format!(
        "nameserver {CLUSTER_DNS}\nsearch {}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
        pod.namespace
    );
    fs::create_dir_all(&dir)?;
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn start_pod(state: &mut SandboxState, pod: &PodState, start: &PodStart) -> Result<()> {
    if start.meshed {
        wait_enrolled(state, pod)?;
        wait_certificate(state, pod, &start.service_account)?;
    }
    let Some((program, args)) = start.command.split_first() else {
        return Ok(());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(pod_dir(pod))
        .env("PATH", path_with_binaries())
        .env("POD_NAME", &pod.name)
        .env("POD_NAMESPACE", &pod.namespace)
        .env("POD_IP", pod.ip.to_string());
    let log = format!("pod-{}-{}.log", pod.namespace, pod.name);
    let placement = Placement {
        netns: pod.netns.clone(),
        cgroup: Some(pod.cgroup.clone()),
        detach: true,
        resolv_conf: Some(pod_resolv_conf(pod)?),
    };
    let pid = start_placed_daemon(&mut cmd, &log, &placement)?;
    if let Some(stored) = state
        .pods
        .iter_mut()
        .find(|p| p.name == pod.name && p.namespace == pod.namespace)
    {
        stored.pid = Some(pid);
    }
    if let Some(probe) = &start.readiness {
        let node_netns = state
            .nodes
            .iter()
            .find(|n| n.name == pod.node)
            .map(|n| n.netns.clone())
            .with_context(|| format!("pod {}/{}: no node {}", pod.namespace, pod.name, pod.node))?;
        wait_pod_ready(pod, pid, &node_netns, probe)?;
    }
    Ok(())
}

/// Waits for the pod's readiness probe, run from its node's namespace as the kubelet runs it.
fn wait_pod_ready(
    pod: &PodState,
    pid: u32,
    node_netns: &str,
    probe: &ReadinessProbe,
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let ip = pod.ip;
        let attempt = probe.clone();
        let ready = ns::within(node_netns, move || attempt.succeeds(ip))?;
        if ready {
            return Ok(());
        }
        if !process_alive(pid) || Instant::now() > deadline {
            bail!(
                "pod {}/{} did not become ready: its probe of port {} from the node failed (see {}/pod-{}-{}.log)",
                pod.namespace,
                pod.name,
                probe.port(),
                logs_dir().display(),
                pod.namespace,
                pod.name
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether anything of an earlier sandbox is left on the machine.
fn leftovers() -> bool {
    state_path().exists()
        || Path::new(BPFFS_DIR).exists()
        || cgroup_root().is_ok_and(|c| c.exists())
        || sandbox_netns().is_ok_and(|n| !n.is_empty())
}

fn sandbox_netns() -> Result<Vec<String>> {
    let entries = match fs::read_dir("/run/netns") {
        Ok(entries) => entries,
        Err(_) => return Ok(Vec::new()),
    };
    Ok(entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .collect())
}

/// Kills every process of a cgroup (the agent or pod, and anything they started).
fn kill_cgroup(dir: &Path) {
    let kill = dir.join("cgroup.kill");
    if kill.exists() {
        let _ = fs::write(&kill, "1");
    } else if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: plain kill(2) on processes of a cgroup this sandbox created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + CGROUP_EMPTY_TIMEOUT;
    while fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long killed processes get to leave their cgroup: a pod's process tears down its
/// mount namespace on the way out, and the machine's init reaps orphans when it gets to
/// them; a leftover cgroup would stop every later `sandbox up`.
const CGROUP_EMPTY_TIMEOUT: Duration = Duration::from_secs(30);

/// Removes a cgroup subtree, leaves first, after killing what runs in it.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    kill_cgroup(dir);
    // Killed processes leave the cgroup once their parents reaped them: retry a while.
    let deadline = Instant::now() + CGROUP_EMPTY_TIMEOUT;
    while fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn down() -> Result<()> {
    // The API server and etcd stop on SIGTERM first (etcd closes its database cleanly);
    // the cgroups then take whatever else is left.
    if let Some(control_plane) = SandboxState::load().ok().and_then(|s| s.control_plane) {
        control_plane::stop(&control_plane);
    }
    if let Ok(root) = cgroup_root() {
        remove_cgroup_tree(&root);
        if root.exists() {
            bail!("could not remove cgroup {}", root.display());
        }
    }
    for netns in sandbox_netns()? {
        ip(&["netns", "del", &netns])?;
    }
    if Path::new(BPFFS_DIR).exists() {
        fs::remove_dir_all(BPFFS_DIR).with_context(|| format!("removing {BPFFS_DIR}"))?;
    }
    if Path::new(RUN_DIR).exists() {
        fs::remove_dir_all(RUN_DIR).with_context(|| format!("removing {RUN_DIR}"))?;
    }
    Ok(())
}

/// A command that will run inside a pod (its network namespace and cgroup) or a node,
/// with the project's binaries on its PATH and meshctl pointed at the node's maps.
pub fn command_in(target: &ExecTarget, program: &str, args: &[String]) -> Result<Command> {
    let state = SandboxState::load()?;
    let (placement, bpffs) = match target {
        ExecTarget::Pod(spec) => {
            let pod = state.pod(spec)?;
            let placement = Placement {
                netns: pod.netns.clone(),
                cgroup: Some(pod.cgroup.clone()),
                detach: false,
                resolv_conf: Some(pod_resolv_conf(pod)?),
            };
            (placement, state.node(&pod.node)?.bpffs.clone())
        }
        ExecTarget::Node(name) => {
            let node = state.node(name)?;
            let placement = Placement {
                netns: node.netns.clone(),
                cgroup: None,
                detach: false,
                resolv_conf: None,
            };
            (placement, node.bpffs.clone())
        }
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("PATH", path_with_binaries())
        .env("MESH_BPFFS", bpffs);
    ns::place(&mut cmd, &placement)?;
    Ok(cmd)
}

pub fn exec(target: &ExecTarget, command: &[String]) -> Result<i32> {
    let (program, args) = command.split_first().context("exec needs a command")?;
    let status = command_in(target, program, args)?
        .status()
        .with_context(|| format!("running {program}"))?;
    Ok(status.code().unwrap_or(128 + status.signal_number()))
}

trait SignalNumber {
    fn signal_number(&self) -> i32;
}

impl SignalNumber for std::process::ExitStatus {
    fn signal_number(&self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        self.signal().unwrap_or(0)
    }
}

/// kubectl against the sandbox's API server; its exit code.
pub fn kubectl(args: &[String]) -> Result<i32> {
    let state = SandboxState::load()?;
    let control_plane = state
        .control_plane
        .context("this sandbox runs no Kubernetes API server")?;
    let status = control_plane::command(&control_plane, args)?
        .status()
        .context("running kubectl")?;
    Ok(status.code().unwrap_or(128 + status.signal_number()))
}

pub enum ExecTarget {
    Pod(String),
    Node(String),
}

pub fn status(json: bool) -> Result<()> {
    let state = SandboxState::load()?;
    let nodes: Vec<serde_json::Value> = state
        .nodes
        .iter()
        .map(|n| {
            serde_json::json!({
                "name": n.name, "netns": n.netns, "ip": n.ip.to_string(), "uplink": n.uplink,
                "agent": {"pid": supervise::agent_pid(&n.name), "supervisor": n.supervisor_pid, "metrics": format!("http://{}:15020/metrics", n.ip)},
            })
        })
        .collect();
    let pods: Vec<serde_json::Value> = state
        .pods
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name, "namespace": p.namespace, "node": p.node,
                "ip": p.ip.to_string(), "netns": p.netns,
            })
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "nodes": nodes,
                "pods": pods,
                "kubeconfig": state.control_plane.as_ref().map(|c| &c.kubeconfig),
                "operator_kubeconfig": state.control_plane.as_ref().map(|c| &c.operator_kubeconfig),
                "config_source": state.config_source,
                "jaeger": state.jaeger.as_ref().map(|_| serde_json::json!({
                    "otlp": jaeger::otlp_url(),
                    "query": jaeger::query_url(),
                })),
                "prometheus": state.prometheus.as_ref().map(|_| serde_json::json!({
                    "url": prometheus::url(),
                })),
            }))?
        );
        return Ok(());
    }
    println!(
        "{:<10} {:<22} {:<12} {:<7} {:<8} METRICS",
        "NODE", "NETNS", "IP", "UPLINK", "AGENT"
    );
    for n in &state.nodes {
        let pid = supervise::agent_pid(&n.name);
        let alive = if process_alive(pid) {
            pid.to_string()
        } else {
            format!("{pid} (dead)")
        };
        println!(
            "{:<10} {:<22} {:<12} {:<7} {:<8} http://{}:15020/metrics",
            n.name, n.netns, n.ip, n.uplink, alive, n.ip
        );
    }
    println!();
    println!(
        "{:<20} {:<12} {:<10} {:<14} NETNS",
        "POD", "NAMESPACE", "NODE", "IP"
    );
    for p in &state.pods {
        println!(
            "{:<20} {:<12} {:<10} {:<14} {}",
            p.name, p.namespace, p.node, p.ip, p.netns
        );
    }
    if let Some(control_plane) = &state.control_plane {
        println!();
        println!(
            "kube-apiserver https://{}:6443 (pid {}), etcd (pid {}), kubeconfig {}",
            control_plane::API_IP,
            control_plane.apiserver_pid,
            control_plane.etcd_pid,
            control_plane.kubeconfig.display()
        );
    }
    if let Some(jaeger) = &state.jaeger {
        println!();
        println!(
            "jaeger {} (pid {}): OTLP {}, query API and UI {}",
            jaeger::JAEGER_VERSION,
            jaeger.pid,
            jaeger::otlp_url(),
            jaeger::query_url()
        );
    }
    if let Some(prometheus) = &state.prometheus {
        println!();
        println!(
            "prometheus (pid {}): query API and UI {}, job {:?} scraping every agent",
            prometheus.pid,
            prometheus::url(),
            prometheus::JOB
        );
    }
    if !state.services.is_empty() {
        println!();
        println!("{:<30} CLUSTER IP", "SERVICE");
        for (name, ip) in &state.services {
            println!("{name:<30} {ip}");
        }
    }
    Ok(())
}

pub fn apply(path: &Path) -> Result<()> {
    let _lock = lock_state()?;
    let mut state = SandboxState::load()?;
    let objects = read_objects(path)?;
    let mut started = Vec::new();
    for object in &objects {
        match object.kind.as_str() {
            "Node" => bail!(
                "{}: nodes are fixed when the sandbox starts (Node {})",
                object.source.display(),
                object.name
            ),
            "Pod" => {
                let existing = state
                    .pods
                    .iter()
                    .find(|p| p.name == object.name && p.namespace == object.namespace)
                    .cloned();
                match existing {
                    Some(pod) => {
                        let mut stored = object.clone();
                        stored.set(&["metadata", "uid"], Value::String(pod.uid.clone()));
                        stored.set(&["status", "podIP"], Value::String(pod.ip.to_string()));
                        stored.set(&["status", "phase"], Value::String("Running".into()));
                        write_object(&stored)?;
                        if let Some(api) = state.api() {
                            control_plane::apply_object(api, &object.value)?;
                        }
                    }
                    None => started.push((add_pod(&mut state, object, None)?, object)),
                }
            }
            _ => store(&mut state, object)?,
        }
        println!(
            "{} {}/{} applied",
            object.kind.to_lowercase(),
            object.namespace,
            object.name
        );
    }
    state.save()?;
    for ((pod, start), object) in started {
        start_pod(&mut state, &pod, &start)?;
        if let Some(api) = state.api() {
            report_ready(api, &pod, object)?;
        }
    }
    state.save()
}

pub fn delete(path: &Path) -> Result<()> {
    let _lock = lock_state()?;
    let mut state = SandboxState::load()?;
    for object in read_objects(path)? {
        // The API first: the agents drop the pod before its namespace goes.
        if let Some(api) = state.api() {
            control_plane::delete_object(api, &object.kind, &object.namespace, &object.name)?;
        }
        let file = config_dir().join(object.file_name());
        match fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!(
                    "{} {}/{} not found",
                    object.kind.to_lowercase(),
                    object.namespace,
                    object.name
                );
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
        }
        if object.kind == "Pod" {
            remove_pod(&mut state, &object.namespace, &object.name)?;
        }
        if object.kind == "Service" {
            state
                .services
                .remove(&format!("{}/{}", object.namespace, object.name));
        }
        println!(
            "{} {}/{} deleted",
            object.kind.to_lowercase(),
            object.namespace,
            object.name
        );
    }
    state.save()
}

/// How long a restart may take until the new agent serves.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);

/// What the agent serving a node says of itself (`meshctl status`), if one answers.
pub fn agent_status(node: &NodeState) -> Option<serde_json::Value> {
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, 15000));
    let (code, body) = http_get(&node.netns, admin, "/status").ok()?;
    serde_json::from_str(&body).ok().filter(|_| code == 200)
}

/// What a node's admin API says about the agent serving it: its pid and readiness.
fn serving_agent(node: &NodeState) -> Option<(u32, bool)> {
    let status = agent_status(node)?;
    let pid = u32::try_from(status["pid"].as_u64()?).ok()?;
    Some((pid, status["ready"].as_bool()?))
}

/// Replaces a node's agent: with `graceful`, a successor starts beside it and takes its
/// listeners, then the old one gets SIGTERM (it drains); without, the agent is killed (SIGKILL) and the
/// supervisor starts a new one. Returns once the new agent serves the node, saying how
/// long that took.
pub fn restart_agent(node: &str, graceful: bool) -> Result<Duration> {
    let state = SandboxState::load()?;
    let node = state.node(node)?;
    let old = supervise::agent_pid(&node.name);
    if old == 0 || !process_alive(node.supervisor_pid) {
        bail!("node {} has no supervised agent", node.name);
    }
    let asked = Instant::now();
    let signal = if graceful { node.supervisor_pid } else { old };
    let number = if graceful {
        supervise::SUCCESSOR_SIGNAL
    } else {
        libc::SIGKILL
    };
    // SAFETY: plain kill(2) on the sandbox's own supervisor or agent.
    if unsafe { libc::kill(signal as libc::pid_t, number) } != 0 {
        bail!("signalling {signal}: {}", std::io::Error::last_os_error());
    }
    loop {
        let new = supervise::agent_pid(&node.name);
        if new != old && serving_agent(node) == Some((new, true)) {
            if graceful {
                // As the DaemonSet controller deletes the old pod once the new one is
                // ready: the old agent, draining since the handover, drains on.
                // SAFETY: plain kill(2) on the sandbox's own agent.
                unsafe { libc::kill(old as libc::pid_t, libc::SIGTERM) };
            }
            println!(
                "node {}: agent {new} serves the node {} ms after agent {old} was {}",
                node.name,
                asked.elapsed().as_millis(),
                if graceful {
                    "asked to hand over"
                } else {
                    "killed"
                }
            );
            return Ok(asked.elapsed());
        }
        if asked.elapsed() > RESTART_TIMEOUT {
            bail!(
                "node {}: no new agent served within {RESTART_TIMEOUT:?} (see {})",
                node.name,
                log_path(&format!("agent-{}.log", node.name)).display()
            );
        }
        std::thread::sleep(supervise::TICK);
    }
}

/// Kills the sandbox's kube-apiserver and starts it again (its etcd keeps the objects),
/// waiting until it serves: agents watching it must ride it out.
pub fn restart_api() -> Result<()> {
    let _lock = lock_state()?;
    let mut state = SandboxState::load()?;
    let Some(control_plane) = state.control_plane.as_mut() else {
        bail!("the sandbox runs no API server");
    };
    control_plane::restart_apiserver(
        &control_plane::Layout::new(Path::new(RUN_DIR)),
        &cgroup_root()?,
        control_plane,
    )?;
    state.save()
}

/// Stops the mesh CA (kills it, as a lost CA node would): agents keep their certificates
/// and fail to renew them until `start-ca`.
pub fn stop_ca() -> Result<()> {
    SandboxState::load()?;
    let cgroup = cgroup_root()?.join("ca");
    let running = |cgroup: &Path| {
        fs::read_to_string(cgroup.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
    };
    if !running(&cgroup) {
        bail!("the mesh CA is not running");
    }
    kill_cgroup(&cgroup);
    if running(&cgroup) {
        bail!("the mesh CA did not stop");
    }
    Ok(())
}

/// Starts the mesh CA again after `stop-ca`, with the same root, tokens and certificate
/// lifetime, and waits until it serves.
pub fn start_ca_again() -> Result<()> {
    let state = SandboxState::load()?;
    let cgroups = cgroup_root()?;
    if fs::read_to_string(cgroups.join("ca/cgroup.procs")).is_ok_and(|p| !p.trim().is_empty()) {
        bail!("the mesh CA is already running");
    }
    run_ca(&release_binaries().join("mesh-agent"), &cgroups, &state)
}

/// Stops a node's agent for good (its supervisor asks it to drain, then leaves), as
/// deleting the node's agent pod does.
pub fn stop_agent(node: &str) -> Result<()> {
    let state = SandboxState::load()?;
    let node = state.node(node)?;
    let supervisor = node.supervisor_pid;
    // SAFETY: plain kill(2) on the sandbox's own supervisor.
    if !process_alive(supervisor)
        || unsafe { libc::kill(supervisor as libc::pid_t, libc::SIGTERM) } != 0
    {
        bail!("node {} has no running agent supervisor", node.name);
    }
    let deadline = Instant::now() + RESTART_TIMEOUT;
    while process_alive(supervisor) {
        if Instant::now() > deadline {
            bail!(
                "node {}: the agent did not stop within {RESTART_TIMEOUT:?}",
                node.name
            );
        }
        std::thread::sleep(supervise::TICK);
    }
    Ok(())
}
