//! The sandbox's Kubernetes control plane: a real etcd and kube-apiserver (built by
//! `kube_tools`) in a network namespace of their own on the nodes' network
//! (`msb-api`, 10.200.0.253:6443), with a certificate authority of their own, an admin
//! kubeconfig, and the mesh's CustomResourceDefinitions applied. kubectl runs inside that
//! namespace, so API traffic never leaves the sandbox.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};

use crate::{
    daemon::{log_path, process_alive, start_daemon},
    kube_tools, kubelet, ns, progress, workspace,
};

pub const API_NETNS: &str = "msb-api";
/// The fabric port of the API namespace, beside the nodes' `up<N>` and the CA's `upca`.
pub const API_FABRIC_PORT: &str = "upapi";
pub const API_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 253);
const API_PORT: u16 = 6443;
/// etcd listens on loopback of the API namespace only: the API server is its one client.
const ETCD_CLIENT_URL: &str = "http://127.0.0.1:2379";
const ETCD_PEER_URL: &str = "http://127.0.0.1:2380";
/// Cluster IPs the API server hands out; the sandbox's own Services use 10.96.0.0/24 and
/// the API server takes 10.96.0.1 for the `kubernetes` Service.
const SERVICE_CIDR: &str = "10.96.0.0/16";
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// The mesh's own CRDs and those of the Istio kinds it reads, applied at start.
const CRD_MANIFESTS: [&str; 2] = ["deploy/mesh-crds.yaml", "deploy/istio-crds.yaml"];

/// What a running control plane left for `status` and `down`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlPlaneState {
    pub etcd_pid: u32,
    pub apiserver_pid: u32,
    pub kubeconfig: PathBuf,
    /// The agents' kubeconfig: the identity of deploy/mesh-agent.yaml's ServiceAccount,
    /// with only the ClusterRole it grants.
    pub agent_kubeconfig: PathBuf,
    /// The mesh CA's kubeconfig: the identity of deploy/mesh-ca.yaml's ServiceAccount.
    pub mesh_ca_kubeconfig: PathBuf,
    /// An operator's kubeconfig: a user bound to deploy/mesh-agent.yaml's `mesh-operator`
    /// roles only, what `meshctl --node` needs.
    #[serde(default)]
    pub operator_kubeconfig: PathBuf,
}

/// The control plane's files under the sandbox's run directory.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(run_dir: &Path) -> Layout {
        Layout {
            dir: run_dir.join("api"),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.file("kubeconfig")
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.file("ca.crt")
    }

    /// The cluster CA's key: the sandbox's kubelets sign their serving certificates with
    /// it, as a kubelet's certificate signing request would be approved.
    pub fn ca_key(&self) -> PathBuf {
        self.file("ca.key")
    }

    fn etcd_data(&self) -> PathBuf {
        self.file("etcd")
    }
}

/// PEM texts of the control plane's certificates and keys.
pub struct Pki {
    pub ca_cert: String,
    pub ca_key: String,
    pub server_cert: String,
    pub server_key: String,
    pub admin_cert: String,
    pub admin_key: String,
    pub agent_cert: String,
    pub agent_key: String,
    pub mesh_ca_cert: String,
    pub mesh_ca_key: String,
    pub operator_cert: String,
    pub operator_key: String,
    /// What the API server presents to kubelets (port-forward).
    pub kubelet_client_cert: String,
    pub kubelet_client_key: String,
    /// The key the API server signs ServiceAccount tokens with, and its public half.
    pub service_account_key: String,
    pub service_account_public: String,
}

/// The user the agents are: deploy/mesh-agent.yaml's ServiceAccount, whose ClusterRole
/// binding names it so (a ServiceAccount subject matches this user name).
const AGENT_USER: &str = "system:serviceaccount:mesh-system:mesh-agent";
/// The user the mesh CA is: deploy/mesh-ca.yaml's ServiceAccount.
const MESH_CA_USER: &str = "system:serviceaccount:mesh-system:mesh-ca";
/// The operator the sandbox's `operator-kubeconfig` names, bound to the `mesh-operator`
/// roles.
const OPERATOR_USER: &str = "mesh-sandbox-operator";
/// The agents' ServiceAccount and the audience of the tokens they present to the mesh CA.
const AGENT_SERVICE_ACCOUNT: &str = "mesh-agent";
const MESH_SYSTEM: &str = "mesh-system";
const MESH_CA_AUDIENCE: &str = "mesh-ca";

/// A CA for the API server, its serving certificate (for its address and the names of
/// the `kubernetes` Service), an admin client certificate (group `system:masters`), the
/// agents' client certificate ([`AGENT_USER`], no group), the mesh CA's
/// ([`MESH_CA_USER`]), an operator's ([`OPERATOR_USER`]) and the API server's own to the
/// kubelets.
pub fn generate_pki(api_ip: Ipv4Addr) -> Result<Pki> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "mesh-sandbox-kubernetes-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(vec![
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
        "localhost".to_owned(),
    ])?;
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    for ip in [api_ip, Ipv4Addr::LOCALHOST, Ipv4Addr::new(10, 96, 0, 1)] {
        server
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(ip)));
    }
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    // The API server reads the user from the CN and the groups from the O's.
    admin
        .distinguished_name
        .push(DnType::CommonName, "mesh-sandbox-admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &ca_cert, &ca_key)?;

    let client = |user: &str| -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok((
            params.signed_by(&key, &ca_cert, &ca_key)?.pem(),
            key.serialize_pem(),
        ))
    };
    let (agent_cert, agent_key) = client(AGENT_USER)?;
    let (mesh_ca_cert, mesh_ca_key) = client(MESH_CA_USER)?;
    let (kubelet_client_cert, kubelet_client_key) = client(kubelet::API_SERVER_CLIENT)?;
    let (operator_cert, operator_key) = client(OPERATOR_USER)?;

    let service_account = KeyPair::generate()?;
    Ok(Pki {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        admin_cert: admin_cert.pem(),
        admin_key: admin_key.serialize_pem(),
        agent_cert,
        agent_key,
        mesh_ca_cert,
        mesh_ca_key,
        operator_cert,
        operator_key,
        kubelet_client_cert,
        kubelet_client_key,
        service_account_key: service_account.serialize_pem(),
        service_account_public: service_account.public_key_pem(),
    })
}

/// A kubeconfig for `server`, naming the certificate files rather than embedding them.
fn kubeconfig(server: &str, ca: &Path, cert: &Path, key: &Path) -> Result<String> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "mesh-sandbox", "cluster": {
            "server": server,
            "certificate-authority": ca,
        }}],
        "users": [{"name": "mesh-sandbox-user", "user": {
            "client-certificate": cert,
            "client-key": key,
        }}],
        "contexts": [{"name": "mesh-sandbox", "context": {
            "cluster": "mesh-sandbox",
            "user": "mesh-sandbox-user",
        }}],
        "current-context": "mesh-sandbox",
    });
    Ok(serde_norway::to_string(&config)?)
}

fn etcd_args(layout: &Layout) -> Vec<String> {
    vec![
        "--name=sandbox".into(),
        format!("--data-dir={}", layout.etcd_data().display()),
        format!("--listen-client-urls={ETCD_CLIENT_URL}"),
        format!("--advertise-client-urls={ETCD_CLIENT_URL}"),
        format!("--listen-peer-urls={ETCD_PEER_URL}"),
        format!("--initial-advertise-peer-urls={ETCD_PEER_URL}"),
        format!("--initial-cluster=sandbox={ETCD_PEER_URL}"),
        // The data lives in /run (memory) and dies with the sandbox: syncing buys nothing.
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ]
}

fn apiserver_args(layout: &Layout) -> Vec<String> {
    let file = |name: &str| layout.file(name).display().to_string();
    vec![
        format!("--etcd-servers={ETCD_CLIENT_URL}"),
        format!("--advertise-address={API_IP}"),
        "--bind-address=0.0.0.0".into(),
        format!("--secure-port={API_PORT}"),
        format!("--cert-dir={}", file("certs")),
        format!("--tls-cert-file={}", file("apiserver.crt")),
        format!("--tls-private-key-file={}", file("apiserver.key")),
        format!("--client-ca-file={}", file("ca.crt")),
        // Port-forwards go to the sandbox's kubelets (kubelet.rs), verified both ways.
        format!(
            "--kubelet-client-certificate={}",
            file("kubelet-client.crt")
        ),
        format!("--kubelet-client-key={}", file("kubelet-client.key")),
        format!("--kubelet-certificate-authority={}", file("ca.crt")),
        "--kubelet-preferred-address-types=InternalIP".into(),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!("--service-account-key-file={}", file("sa.pub")),
        format!("--service-account-signing-key-file={}", file("sa.key")),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        "--authorization-mode=RBAC".into(),
        // No controller manager runs to create each namespace's `default` ServiceAccount,
        // which this plugin would require of every pod.
        "--disable-admission-plugins=ServiceAccount".into(),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        // Request queuing across priority levels costs CPU and buys nothing for the few
        // clients of a sandbox.
        "--enable-priority-and-fairness=false".into(),
    ]
}

/// Starts etcd and kube-apiserver in the API namespace (already joined to the fabric),
/// each in its own cgroup under `cgroups`, waits until the API server is ready, and
/// applies the CRDs.
pub fn start(layout: &Layout, cgroups: &Path) -> Result<ControlPlaneState> {
    progress(&format!(
        "starting etcd and kube-apiserver {} at {API_IP}:{API_PORT}",
        kube_tools::KUBERNETES_VERSION
    ));
    for name in ["etcd", "kube-apiserver", "kubectl"] {
        if !kube_tools::binary(name).is_file() {
            bail!(
                "{} is missing: `cargo xtask setup` builds it",
                kube_tools::binary(name).display()
            );
        }
    }
    std::fs::create_dir_all(layout.file("certs"))?;
    let pki = generate_pki(API_IP)?;
    for (name, pem) in [
        ("ca.crt", &pki.ca_cert),
        ("ca.key", &pki.ca_key),
        ("kubelet-client.crt", &pki.kubelet_client_cert),
        ("kubelet-client.key", &pki.kubelet_client_key),
        ("apiserver.crt", &pki.server_cert),
        ("apiserver.key", &pki.server_key),
        ("admin.crt", &pki.admin_cert),
        ("admin.key", &pki.admin_key),
        ("agent.crt", &pki.agent_cert),
        ("agent.key", &pki.agent_key),
        ("mesh-ca.crt", &pki.mesh_ca_cert),
        ("mesh-ca.key", &pki.mesh_ca_key),
        ("operator.crt", &pki.operator_cert),
        ("operator.key", &pki.operator_key),
        ("sa.key", &pki.service_account_key),
        ("sa.pub", &pki.service_account_public),
    ] {
        std::fs::write(layout.file(name), pem)
            .with_context(|| format!("writing {}", layout.file(name).display()))?;
    }
    let server = format!("https://{API_IP}:{API_PORT}");
    let kubeconfig_path = layout.kubeconfig();
    let agent_kubeconfig = layout.file("agent-kubeconfig");
    let mesh_ca_kubeconfig = layout.file("mesh-ca-kubeconfig");
    let operator_kubeconfig = layout.file("operator-kubeconfig");
    for (path, user) in [
        (&kubeconfig_path, "admin"),
        (&agent_kubeconfig, "agent"),
        (&mesh_ca_kubeconfig, "mesh-ca"),
        (&operator_kubeconfig, "operator"),
    ] {
        let text = kubeconfig(
            &server,
            &layout.file("ca.crt"),
            &layout.file(&format!("{user}.crt")),
            &layout.file(&format!("{user}.key")),
        )?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let cgroup = |name: &str| -> Result<PathBuf> {
        let dir = cgroups.join("api").join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    };
    let etcd_pid = start_daemon(
        Command::new(kube_tools::binary("etcd")).args(etcd_args(layout)),
        "etcd.log",
        API_NETNS,
        cgroup("etcd")?,
    )?;
    wait_listening(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 2379)),
        etcd_pid,
        "etcd",
    )?;
    let apiserver_pid = start_apiserver(layout, cgroup("kube-apiserver")?)?;
    let state = ControlPlaneState {
        etcd_pid,
        apiserver_pid,
        kubeconfig: kubeconfig_path,
        agent_kubeconfig,
        mesh_ca_kubeconfig,
        operator_kubeconfig,
    };
    wait_ready(&state)?;
    let mut apply = vec!["apply".to_owned()];
    for manifest in CRD_MANIFESTS {
        apply.push("-f".into());
        apply.push(workspace().join(manifest).display().to_string());
    }
    kubectl_quiet(&state, &apply)?;
    kubectl_with_input(&state, &["apply", "-f", "-"], &mesh_identities()?)?;
    kubectl_with_input(&state, &["apply", "-f", "-"], &operator_bindings())?;
    kubectl_quiet(
        &state,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ]
        .map(str::to_owned),
    )?;
    Ok(state)
}

/// The agents' and the mesh CA's namespace, ServiceAccounts, ClusterRoles and bindings,
/// as deploy/ holds them (the rest of those files is the DaemonSet and the Deployment,
/// which have no place in the sandbox).
fn mesh_identities() -> Result<String> {
    let mut documents = String::new();
    for manifest in IDENTITY_MANIFESTS {
        let path = workspace().join(manifest);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let identity = identity_documents(&text);
        if !identity.contains("kind: ClusterRole\n") {
            bail!("{} holds no ClusterRole", path.display());
        }
        documents.push_str(&identity);
    }
    Ok(documents)
}

/// Binds the sandbox's operator to the `mesh-operator` roles, as a platform team binds
/// its people.
fn operator_bindings() -> String {
    let subjects = format!(
        "subjects:\n  - {{kind: User, name: {OPERATOR_USER}, apiGroup: rbac.authorization.k8s.io}}\n"
    );
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\n\
         metadata: {{name: {OPERATOR_USER}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: mesh-operator}}\n\
         {subjects}---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\n\
         metadata: {{name: {OPERATOR_USER}, namespace: {MESH_SYSTEM}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: mesh-operator}}\n\
         {subjects}"
    )
}

/// In the order they are applied: the agents' file creates the namespace.
const IDENTITY_MANIFESTS: [&str; 2] = ["deploy/mesh-agent.yaml", "deploy/mesh-ca.yaml"];

/// The Namespace, ServiceAccount, ClusterRole, ClusterRoleBinding and Role documents of
/// a manifest.
fn identity_documents(manifest: &str) -> String {
    const KINDS: [&str; 5] = [
        "kind: Namespace",
        "kind: ServiceAccount",
        "kind: ClusterRole",
        "kind: ClusterRoleBinding",
        "kind: Role",
    ];
    manifest
        .split("\n---")
        .filter(|doc| doc.lines().any(|l| KINDS.contains(&l)))
        .map(|doc| format!("---\n{}\n", doc.trim_start_matches('\n')))
        .collect()
}

/// A token of the agents' ServiceAccount for the mesh CA's audience, bound to `node`, as
/// the API server issues it (a DaemonSet pod's projected token is bound to the pod, and
/// through it to the node; the sandbox has no agent pods, so the node itself).
pub fn agent_token(state: &ControlPlaneState, node: &str) -> Result<String> {
    let args = [
        "create",
        "token",
        AGENT_SERVICE_ACCOUNT,
        "-n",
        MESH_SYSTEM,
        "--audience",
        MESH_CA_AUDIENCE,
        "--bound-object-kind",
        "Node",
        "--bound-object-name",
        node,
        "--duration",
        "48h",
    ];
    let token = kubectl_with_input(state, &args, "")?;
    let token = token.trim();
    if token.is_empty() {
        bail!("the API server issued no token for node {node}");
    }
    Ok(token.to_owned())
}

fn wait_listening(addr: SocketAddr, pid: u32, what: &str) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let up = ns::within(API_NETNS, move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })?;
        if up {
            return Ok(());
        }
        if !process_alive(pid) || Instant::now() > deadline {
            bail!(
                "{what} did not start (see {})",
                log_path(&format!("{what}.log")).display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `/readyz` answers: etcd reached, the built-in objects and CRD informers up.
fn wait_ready(state: &ControlPlaneState) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let ready = command(state, &["get".into(), "--raw".into(), "/readyz".into()])?
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(());
        }
        if !process_alive(state.apiserver_pid) || Instant::now() > deadline {
            bail!(
                "kube-apiserver did not become ready (see {})",
                log_path("kube-apiserver.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// kubectl inside the API namespace, with the sandbox's kubeconfig.
pub fn command(state: &ControlPlaneState, args: &[String]) -> Result<Command> {
    let mut command = Command::new(kube_tools::binary("kubectl"));
    command.args(args).env("KUBECONFIG", &state.kubeconfig);
    in_api_netns(command)
}

/// `command`, run in the API namespace (where the API server's address is reached).
fn in_api_netns(mut command: Command) -> Result<Command> {
    ns::place(
        &mut command,
        &ns::Placement {
            netns: API_NETNS.to_owned(),
            cgroup: None,
            detach: false,
            resolv_conf: None,
        },
    )?;
    Ok(command)
}

fn kubectl_quiet(state: &ControlPlaneState, args: &[String]) -> Result<()> {
    crate::run(&mut command(state, args)?)
}

/// kubectl with `input` on its standard input; its standard output.
fn kubectl_with_input(state: &ControlPlaneState, args: &[&str], input: &str) -> Result<String> {
    use std::io::Write;
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let mut child = command(state, &args)?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kubectl")?;
    child
        .stdin
        .take()
        .context("kubectl's standard input")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The object as a client sends it: what the API server and the kubelet fill in (UID,
/// status) left out, and, for a Pod, an `image` for each container that has none (the
/// sandbox runs the container's command on the machine; the API server requires one).
pub fn request_body(object: &serde_norway::Value) -> serde_norway::Value {
    let mut object = object.clone();
    if let Some(fields) = object.as_mapping_mut() {
        fields.remove("status");
        if let Some(meta) = fields.get_mut("metadata").and_then(|m| m.as_mapping_mut()) {
            meta.remove("uid");
        }
    }
    let is_pod = object.get("kind").and_then(|k| k.as_str()) == Some("Pod");
    let containers = object
        .get_mut("spec")
        .and_then(|s| s.get_mut("containers"))
        .and_then(|c| c.as_sequence_mut());
    if let (true, Some(containers)) = (is_pod, containers) {
        for container in containers.iter_mut().filter_map(|c| c.as_mapping_mut()) {
            if !container.contains_key("image") {
                container.insert("image".into(), SANDBOX_IMAGE.into());
            }
        }
    }
    object
}

/// The image the sandbox names for containers that name none; never pulled.
const SANDBOX_IMAGE: &str = "mesh-sandbox/local";

/// Creates or updates an object through the API server, as `kubectl apply` does.
pub fn apply_object(state: &ControlPlaneState, object: &serde_norway::Value) -> Result<()> {
    let text = serde_norway::to_string(&request_body(object))?;
    kubectl_with_input(state, &["apply", "-f", "-"], &text).map(drop)
}

/// Creates a Pod through the API server; the UID the server gave it.
pub fn create_pod(state: &ControlPlaneState, object: &serde_norway::Value) -> Result<String> {
    let text = serde_norway::to_string(&request_body(object))?;
    let uid = kubectl_with_input(
        state,
        &["create", "-f", "-", "-o", "jsonpath={.metadata.uid}"],
        &text,
    )?;
    if uid.trim().is_empty() {
        bail!("the API server gave the pod no UID");
    }
    Ok(uid.trim().to_owned())
}

/// Binds a pod to a node, as the scheduler does.
pub fn bind_pod(state: &ControlPlaneState, namespace: &str, name: &str, node: &str) -> Result<()> {
    let binding = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": namespace},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    let path = format!("/api/v1/namespaces/{namespace}/pods/{name}/binding");
    kubectl_with_input(
        state,
        &["create", "--raw", &path, "-f", "-"],
        &binding.to_string(),
    )
    .map(drop)
}

/// Sets an object's status, as the kubelet (Pods, Nodes) does.
pub fn patch_status(
    state: &ControlPlaneState,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
    status: &serde_json::Value,
) -> Result<()> {
    let patch = serde_json::json!({ "status": status }).to_string();
    let kind = kind.to_lowercase();
    let mut args = vec!["patch", &kind, name, "--subresource=status", "--type=merge"];
    if let Some(namespace) = namespace {
        args.extend(["-n", namespace]);
    }
    args.extend(["-p", &patch]);
    kubectl_with_input(state, &args, "").map(drop)
}

/// Deletes an object at once: the sandbox has stopped the pod itself, as the kubelet
/// confirms a deletion once the containers are gone.
pub fn delete_object(
    state: &ControlPlaneState,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<()> {
    let kind = kind.to_lowercase();
    kubectl_with_input(
        state,
        &[
            "delete",
            &kind,
            name,
            "-n",
            namespace,
            "--grace-period=0",
            "--force",
            "--ignore-not-found",
        ],
        "",
    )
    .map(drop)
}

/// One request to the API server, as the sandbox's admin: a method, a path, and a JSON
/// body (a merge patch for `PATCH`).
pub struct ApiRequest {
    pub method: &'static str,
    pub path: String,
    pub body: serde_json::Value,
}

impl ApiRequest {
    /// curl's configuration for this request (a `--config` file block): the admin's
    /// certificate, the body, and a line saying the answer's status.
    fn curl_config(&self, layout: &Layout) -> String {
        let quoted =
            |text: &str| format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""));
        let content_type = if self.method == "PATCH" {
            "application/merge-patch+json"
        } else {
            "application/json"
        };
        [
            format!(
                "url = {}",
                quoted(&format!("https://{API_IP}:{API_PORT}{}", self.path))
            ),
            format!("request = {}", quoted(self.method)),
            format!(
                "cacert = {}",
                quoted(&layout.file("ca.crt").to_string_lossy())
            ),
            format!(
                "cert = {}",
                quoted(&layout.file("admin.crt").to_string_lossy())
            ),
            format!(
                "key = {}",
                quoted(&layout.file("admin.key").to_string_lossy())
            ),
            format!(
                "header = {}",
                quoted(&format!("Content-Type: {content_type}"))
            ),
            format!("data = {}", quoted(&self.body.to_string())),
            "output = \"/dev/null\"".to_owned(),
            format!(
                "write-out = {}",
                quoted(&format!("%{{http_code}} {} {}\\n", self.method, self.path))
            ),
        ]
        .join("\n")
    }
}

/// curl in the API namespace, with `config` as its configuration file.
fn curl(layout: &Layout, name: &str, config: &str, extra: &[&str]) -> Result<Command> {
    let file = layout.file(name);
    std::fs::write(&file, config).with_context(|| format!("writing {}", file.display()))?;
    let mut command = Command::new("curl");
    command
        .args(["--silent", "--show-error", "--config"])
        .arg(&file)
        .args(extra);
    in_api_netns(command)
}

/// The requests whose answer (`CODE METHOD PATH` lines) was not a success.
fn failed_requests(write_out: &str) -> Vec<&str> {
    write_out
        .lines()
        .filter(|line| !line.starts_with('2'))
        .collect()
}

/// Sends `requests` to the API server, several at once over few connections: thousands
/// of objects in seconds, where a kubectl per object would take minutes. Fails naming
/// the requests the server did not accept.
pub fn send_all(layout: &Layout, requests: &[ApiRequest]) -> Result<()> {
    let config: Vec<String> = requests.iter().map(|r| r.curl_config(layout)).collect();
    let output = curl(
        layout,
        "bulk-requests.curlrc",
        &config.join("\nnext\n"),
        &["--parallel", "--parallel-max", "16"],
    )?
    .output()
    .context("running curl")?;
    let write_out = String::from_utf8_lossy(&output.stdout);
    let failed = failed_requests(&write_out);
    if !output.status.success() || !failed.is_empty() || write_out.lines().count() != requests.len()
    {
        bail!(
            "the API server refused {} of {} requests (first: {:?}): {}",
            failed.len(),
            requests.len(),
            failed.first(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Sends one request and says when it went out: curl's start plus the time it took to
/// be ready to send (connection and TLS), so that the moment excludes both.
pub fn send_timed(layout: &Layout, request: &ApiRequest) -> Result<Instant> {
    let mut config = request.curl_config(layout);
    config.push_str("\nwrite-out = \"%{http_code} %{time_pretransfer}\"\n");
    let mut command = curl(layout, "timed-request.curlrc", &config, &[])?;
    let started = Instant::now();
    let output = command.output().context("running curl")?;
    let write_out = String::from_utf8_lossy(&output.stdout);
    let (code, pretransfer) = write_out
        .trim()
        .split_once(' ')
        .with_context(|| format!("curl wrote {write_out:?}"))?;
    if !code.starts_with('2') {
        bail!(
            "{} {}: the API server answered {code}",
            request.method,
            request.path
        );
    }
    let pretransfer: f64 = pretransfer.parse().context("curl's time_pretransfer")?;
    Ok(started + Duration::from_secs_f64(pretransfer))
}

fn start_apiserver(layout: &Layout, cgroup: PathBuf) -> Result<u32> {
    start_daemon(
        Command::new(kube_tools::binary("kube-apiserver")).args(apiserver_args(layout)),
        "kube-apiserver.log",
        API_NETNS,
        cgroup,
    )
}

/// Kills kube-apiserver (SIGKILL, as a crashed control-plane node would go) and starts it
/// again on the same etcd, certificates and address; returns once it is ready. Clients
/// see their watches break and connections refused meanwhile.
pub fn restart_apiserver(
    layout: &Layout,
    cgroups: &Path,
    state: &mut ControlPlaneState,
) -> Result<()> {
    if process_alive(state.apiserver_pid) {
        // SAFETY: kill(2) on the API server this sandbox started and recorded.
        unsafe { libc::kill(state.apiserver_pid as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(state.apiserver_pid) {
            if Instant::now() > deadline {
                bail!("kube-apiserver (pid {}) did not exit", state.apiserver_pid);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // A restart under load has been seen to end without a ready server now and then;
    // each attempt's log goes into the error if none succeeds.
    let mut failures = Vec::new();
    for _ in 0..RESTART_ATTEMPTS {
        state.apiserver_pid = start_apiserver(layout, cgroups.join("api").join("kube-apiserver"))?;
        match wait_ready(state) {
            Ok(()) => return Ok(()),
            Err(err) => {
                let log =
                    std::fs::read_to_string(log_path("kube-apiserver.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                failures.push(format!(
                    "{err}; the log ends with:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
                if process_alive(state.apiserver_pid) {
                    // SAFETY: kill(2) on the API server this function started.
                    unsafe { libc::kill(state.apiserver_pid as i32, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    bail!(
        "kube-apiserver did not restart:\n{}",
        failures.join("\n---\n")
    )
}

const RESTART_ATTEMPTS: usize = 3;

/// Stops what [`start`] started, API server first, by the pids it recorded; the
/// sandbox's cgroup clean-up then takes anything left.
pub fn stop(state: &ControlPlaneState) {
    for pid in [state.apiserver_pid, state.etcd_pid] {
        if !process_alive(pid) {
            continue;
        }
        // SAFETY: kill(2) on a pid this sandbox started and recorded, still alive.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serving_certificate_names_every_address_clients_use() {
        let pki = generate_pki(API_IP).expect("pki");
        let server = CertificateParams::from_ca_cert_pem(&pki.server_cert).expect("parse");
        let ips: Vec<_> = server
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::IpAddress(ip) => Some(ip.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(ips, ["10.200.0.253", "127.0.0.1", "10.96.0.1"]);
        let agent = CertificateParams::from_ca_cert_pem(&pki.agent_cert).expect("parse");
        assert_eq!(
            agent.distinguished_name.get(&DnType::CommonName).cloned(),
            Some(rcgen::DnValue::Utf8String(AGENT_USER.into()))
        );
        let admin = CertificateParams::from_ca_cert_pem(&pki.admin_cert).expect("parse");
        let org = admin
            .distinguished_name
            .get(&DnType::OrganizationName)
            .cloned();
        assert_eq!(
            org,
            Some(rcgen::DnValue::Utf8String("system:masters".into()))
        );
        assert!(pki.service_account_public.contains("BEGIN PUBLIC KEY"));
    }

    #[test]
    fn the_kubeconfig_points_at_the_sandbox_api_with_the_admin_files() {
        let text = kubeconfig(
            "https://10.200.0.253:6443",
            Path::new("/run/x/ca.crt"),
            Path::new("/run/x/admin.crt"),
            Path::new("/run/x/admin.key"),
        )
        .expect("render");
        let value: serde_norway::Value = serde_norway::from_str(&text).expect("yaml");
        assert_eq!(value["current-context"].as_str(), Some("mesh-sandbox"));
        assert_eq!(
            value["clusters"][0]["cluster"]["server"].as_str(),
            Some("https://10.200.0.253:6443")
        );
        assert_eq!(
            value["users"][0]["user"]["client-key"].as_str(),
            Some("/run/x/admin.key")
        );
    }

    #[test]
    fn objects_are_sent_without_what_the_server_and_kubelet_fill_in() {
        let pod: serde_norway::Value = serde_norway::from_str(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, uid: u1}\n\
             spec: {containers: [{name: a}, {name: b, image: busybox}]}\n\
             status: {podIP: 10.244.1.2}\n",
        )
        .expect("yaml");
        let body = request_body(&pod);
        assert!(body.get("status").is_none());
        assert!(body["metadata"].get("uid").is_none());
        assert_eq!(
            body["spec"]["containers"][0]["image"].as_str(),
            Some(SANDBOX_IMAGE)
        );
        assert_eq!(
            body["spec"]["containers"][1]["image"].as_str(),
            Some("busybox")
        );
        let service: serde_norway::Value = serde_norway::from_str(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {containers: [{name: a}]}\n",
        )
        .expect("yaml");
        assert!(request_body(&service)["spec"]["containers"][0]
            .get("image")
            .is_none());
    }

    #[test]
    fn the_agents_the_ca_and_operators_get_the_identities_of_the_manifests_and_nothing_else() {
        let identities = mesh_identities().expect("identities");
        let kinds: Vec<&str> = identities
            .lines()
            .filter_map(|l| l.strip_prefix("kind: "))
            .collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "ClusterRole",
                "Role",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding"
            ]
        );
        assert!(identities.contains("name: mesh-operator"));
        assert!(identities.contains("name: mesh-agent"));
        assert!(identities.contains("name: mesh-ca"));
        assert!(identities.contains("tokenreviews"));
    }

    #[test]
    fn etcd_serves_only_the_api_namespace_loopback() {
        let layout = Layout::new(Path::new("/run/s"));
        let etcd = etcd_args(&layout);
        assert!(etcd.contains(&"--listen-client-urls=http://127.0.0.1:2379".to_owned()));
        assert!(etcd.contains(&"--data-dir=/run/s/api/etcd".to_owned()));
        let api = apiserver_args(&layout);
        assert!(api.contains(&"--etcd-servers=http://127.0.0.1:2379".to_owned()));
        assert!(api.contains(&"--advertise-address=10.200.0.253".to_owned()));
    }
}
