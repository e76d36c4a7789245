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
    kube_tools, ns, progress,
    sandbox::{log_path, process_alive, start_daemon},
    workspace,
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

    fn etcd_data(&self) -> PathBuf {
        self.file("etcd")
    }
}

/// PEM texts of the control plane's certificates and keys.
pub struct Pki {
    pub ca_cert: String,
    pub server_cert: String,
    pub server_key: String,
    pub admin_cert: String,
    pub admin_key: String,
    /// The key the API server signs ServiceAccount tokens with, and its public half.
    pub service_account_key: String,
    pub service_account_public: String,
}

/// A CA for the API server, its serving certificate (for its address and the names of
/// the `kubernetes` Service) and an admin client certificate (group `system:masters`).
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

    let service_account = KeyPair::generate()?;
    Ok(Pki {
        ca_cert: ca_cert.pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        admin_cert: admin_cert.pem(),
        admin_key: admin_key.serialize_pem(),
        service_account_key: service_account.serialize_pem(),
        service_account_public: service_account.public_key_pem(),
    })
}

/// A kubeconfig for `server`, naming the certificate files rather than embedding them.
pub fn kubeconfig(server: &str, ca: &Path, cert: &Path, key: &Path) -> Result<String> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "mesh-sandbox", "cluster": {
            "server": server,
            "certificate-authority": ca,
        }}],
        "users": [{"name": "mesh-sandbox-admin", "user": {
            "client-certificate": cert,
            "client-key": key,
        }}],
        "contexts": [{"name": "mesh-sandbox", "context": {
            "cluster": "mesh-sandbox",
            "user": "mesh-sandbox-admin",
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
    std::fs::create_dir_all(layout.file("certs"))?;
    let pki = generate_pki(API_IP)?;
    for (name, pem) in [
        ("ca.crt", &pki.ca_cert),
        ("apiserver.crt", &pki.server_cert),
        ("apiserver.key", &pki.server_key),
        ("admin.crt", &pki.admin_cert),
        ("admin.key", &pki.admin_key),
        ("sa.key", &pki.service_account_key),
        ("sa.pub", &pki.service_account_public),
    ] {
        std::fs::write(layout.file(name), pem)
            .with_context(|| format!("writing {}", layout.file(name).display()))?;
    }
    let kubeconfig_path = layout.kubeconfig();
    std::fs::write(
        &kubeconfig_path,
        kubeconfig(
            &format!("https://{API_IP}:{API_PORT}"),
            &layout.file("ca.crt"),
            &layout.file("admin.crt"),
            &layout.file("admin.key"),
        )?,
    )?;
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
    let apiserver_pid = start_daemon(
        Command::new(kube_tools::binary("kube-apiserver")).args(apiserver_args(layout)),
        "kube-apiserver.log",
        API_NETNS,
        cgroup("kube-apiserver")?,
    )?;
    let state = ControlPlaneState {
        etcd_pid,
        apiserver_pid,
        kubeconfig: kubeconfig_path,
    };
    wait_ready(&state)?;
    let mut apply = vec!["apply".to_owned()];
    for manifest in CRD_MANIFESTS {
        apply.push("-f".into());
        apply.push(workspace().join(manifest).display().to_string());
    }
    kubectl_quiet(&state, &apply)?;
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
    ns::place(
        &mut command,
        &ns::Placement {
            netns: API_NETNS.to_owned(),
            cgroup: None,
            detach: false,
        },
    )?;
    Ok(command)
}

fn kubectl_quiet(state: &ControlPlaneState, args: &[String]) -> Result<()> {
    crate::run(&mut command(state, args)?)
}

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
