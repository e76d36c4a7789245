//! Mutual TLS between agents and the mesh CA, in-process on loopback: a proxied stream
//! works end to end; every kind of bad peer is refused and counted by reason; the client
//! refuses a server that proves another identity; the CA signs only what a node hosts.
//! (Transparent sockets need CAP_NET_ADMIN: run as root, as `cargo xtask test` does.)

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    sync::Arc,
    time::Duration,
};

use mesh_agent::{
    config::{load_str, origin::SourceKind},
    http::listener,
    identity::{
        ca::{self, CaClient, CaOptions},
        spiffe::{new_csr, CaKeys, SpiffeId},
        tls::{provider, sni_for, Identities},
    },
    model::{MeshState, SharedState},
    policy::jwt::JwksCache,
    proxy::{
        copy::copy_to_tunnel,
        inbound,
        plan::{PlanSettings, TunnelRequest},
        pool::{HbonePool, PoolError},
        requests::Guard,
        socket, Proxy,
    },
    telemetry::{
        conns::ConnTable,
        metrics::Metrics,
        request_metrics::{LabelSettings, RequestMetrics},
    },
};
use rustls::pki_types::ServerName;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TD: &str = "cluster.local";
const WEB_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

fn cluster() -> String {
    // The client's node is where the peer agents of these tests connect from.
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: there}}\n\
         status: {{addresses: [{{type: InternalIP, address: 127.0.0.1}}]}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: demo}}\n\
         spec: {{nodeName: here, serviceAccountName: web}}\nstatus: {{podIP: {WEB_IP}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: demo}}\n\
         spec: {{nodeName: there, serviceAccountName: client}}\nstatus: {{podIP: {CLIENT_IP}}}\n"
    )
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "demo", sa)
}

/// Certificates of `ca` for `sa`, valid from `from` to `to` (relative to now).
fn identities_with(
    ca: &CaKeys,
    sa: &str,
    from: time::Duration,
    to: time::Duration,
) -> Arc<Identities> {
    let identities = Arc::new(Identities::new(TD, &ca.root_pem).expect("bundle"));
    let (key, csr) = new_csr(&id(sa)).expect("csr");
    let now = OffsetDateTime::now_utc();
    let cert = ca
        .sign_with_validity(&csr, &id(sa), now + from, now + to)
        .expect("cert");
    identities
        .install(&id(sa), &cert, &key.serialize_pem())
        .expect("install");
    identities
}

fn valid(ca: &CaKeys, sa: &str) -> Arc<Identities> {
    identities_with(
        ca,
        sa,
        time::Duration::minutes(-1),
        time::Duration::hours(1),
    )
}

struct Agent {
    tunnel: SocketAddrV4,
    metrics: Arc<Metrics>,
    target: SocketAddrV4,
}

/// The HBONE server of the node `here`, where `web` runs (a TCP echo on 127.0.0.2).
async fn destination_agent(ca: &CaKeys) -> Agent {
    destination_agent_with(ca, "").await
}

/// The same, with more configuration (policies).
async fn destination_agent_with(ca: &CaKeys, extra: &str) -> Agent {
    let state = SharedState::default();
    state.replace(MeshState::build(
        "here",
        &load_str(Path::new("cluster.yaml"), &format!("{}{extra}", cluster())),
    ));
    let conns = Arc::new(ConnTable::default());
    let settings = LabelSettings {
        trust_domain: TD.into(),
        cluster: "Kubernetes".into(),
    };
    let requests = RequestMetrics::new(settings, std::time::Duration::from_secs(600));
    let metrics = Arc::new(Metrics::new(state.clone(), conns.clone(), requests));
    let echo = tokio::net::TcpListener::bind((WEB_IP, 0))
        .await
        .expect("echo");
    let target = socket::v4(echo.local_addr().expect("addr")).expect("v4");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let listener = listener(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("listener");
    let tunnel = socket::v4(listener.local_addr().expect("addr")).expect("v4");
    let identities = valid(ca, "web");
    let proxy = Proxy {
        state: state.clone(),
        settings: PlanSettings {
            trust_domain: TD.into(),
            kernel_splice: false,
        },
        pool: HbonePool::new(identities.clone()),
        upstreams: Arc::default(),
        budgets: Default::default(),
        identities,
        guard: Arc::new(Guard {
            jwks: Arc::new(JwksCache::default()),
            metrics: metrics.clone(),
            state,
            limiter: Default::default(),
        }),
        conns,
        splicer: None,
        intake: Default::default(),
    };
    tokio::spawn(inbound::serve(listener, Arc::new(proxy)));
    Agent {
        tunnel,
        metrics,
        target,
    }
}

fn refusals(metrics: &Metrics, reason: &str) -> u64 {
    let text = metrics.encode();
    let prefix = format!("mesh_tunnel_refusals_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn request(agent: &Agent, client: Ipv4Addr) -> TunnelRequest {
    TunnelRequest {
        target: agent.target,
        client: SocketAddrV4::new(client, 0),
        service: None,
        http: false,
    }
}

#[tokio::test]
async fn a_stream_crosses_with_both_identities_verified() {
    let ca = CaKeys::generate(TD).expect("root");
    let agent = destination_agent(&ca).await;
    let pool = HbonePool::new(valid(&ca, "client"));
    for round in 0..3 {
        let (send, recv, _lease) = pool
            .open(
                agent.tunnel,
                None,
                &id("client"),
                &id("web"),
                &request(&agent, CLIENT_IP),
            )
            .await
            .expect("the stream opens");
        let (mut near, mut far) = tokio::io::duplex(1 << 16);
        let carried = tokio::spawn(async move { copy_to_tunnel(&mut far, send, recv).await });
        let payload = vec![round as u8; 300_000];
        near.write_all(&payload).await.expect("write");
        near.shutdown().await.expect("shutdown");
        let mut echoed = Vec::new();
        near.read_to_end(&mut echoed).await.expect("read");
        assert_eq!(echoed, payload, "bytes intact through HBONE");
        carried.await.expect("join").expect("splice");
    }
}

async fn handshake_with(agent: &Agent, identities: Option<Arc<Identities>>) {
    let config = match identities {
        Some(identities) => identities
            .client_config(&id("client"), &id("web"))
            .expect("config"),
        // No client certificate at all; the server's own is not checked, to get that far.
        None => Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("tls13")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnything))
                .with_no_client_auth(),
        ),
    };
    let tcp = tokio::net::TcpStream::connect(agent.tunnel)
        .await
        .expect("tcp");
    let name = ServerName::try_from(sni_for(&id("web"))).expect("sni");
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        // TLS 1.3: the server's verdict on our certificate arrives after our Finished.
        let mut byte = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(2), tls.read(&mut byte)).await;
    }
}

/// Waits (up to 10 s: a loaded machine) for the one attempt of the test to be refused
/// for `reason`, then checks it was counted exactly once.
async fn eventually_refused(agent: &Agent, reason: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while refusals(&agent.metrics, reason) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal counted as {reason}:\n{}",
            agent.metrics.encode()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        refusals(&agent.metrics, reason),
        1,
        "{reason}:\n{}",
        agent.metrics.encode()
    );
}

#[tokio::test]
async fn a_peer_without_a_certificate_is_refused() {
    let ca = CaKeys::generate(TD).expect("root");
    let agent = destination_agent(&ca).await;
    handshake_with(&agent, None).await;
    eventually_refused(&agent, "no_certificate").await;
}

#[tokio::test]
async fn a_certificate_from_another_root_is_refused() {
    let ca = CaKeys::generate(TD).expect("root");
    let agent = destination_agent(&ca).await;
    let stranger = CaKeys::generate(TD).expect("other root");
    let identities = Identities::new(TD, &ca.root_pem).expect("bundle");
    let (key, csr) = new_csr(&id("client")).expect("csr");
    let cert = stranger
        .sign_csr(&csr, &id("client"), Duration::from_secs(3600))
        .expect("cert");
    identities
        .install(&id("client"), &cert, &key.serialize_pem())
        .expect("install");
    handshake_with(&agent, Some(Arc::new(identities))).await;
    eventually_refused(&agent, "untrusted_root").await;
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let ca = CaKeys::generate(TD).expect("root");
    let agent = destination_agent(&ca).await;
    let expired = identities_with(
        &ca,
        "client",
        time::Duration::hours(-2),
        time::Duration::hours(-1),
    );
    handshake_with(&agent, Some(expired)).await;
    eventually_refused(&agent, "expired").await;
    let early = identities_with(
        &ca,
        "client",
        time::Duration::hours(1),
        time::Duration::hours(2),
    );
    handshake_with(&agent, Some(early)).await;
    eventually_refused(&agent, "not_yet_valid").await;
}

#[tokio::test]
async fn an_identity_that_is_not_the_workload_behind_the_address_is_refused() {
    let ca = CaKeys::generate(TD).expect("root");
    let agent = destination_agent(&ca).await;
    // A genuine certificate of demo/admin, claiming to carry the client pod's traffic.
    let pool = HbonePool::new(valid(&ca, "admin"));
    let err = pool
        .open(
            agent.tunnel,
            None,
            &id("admin"),
            &id("web"),
            &request(&agent, CLIENT_IP),
        )
        .await
        .expect_err("refused");
    assert!(
        matches!(err, PoolError::Refused { status, .. } if status == 403),
        "{err}"
    );
    eventually_refused(&agent, "wrong_source_identity").await;
}

#[tokio::test]
async fn the_right_identity_from_another_nodes_address_is_refused() {
    let ca = CaKeys::generate(TD).expect("root");
    let agent = destination_agent(&ca).await;
    // The client's own certificate, as an agent of another node holding a pod of the same
    // service account would have it, but connecting from an address that is not the
    // client's node (127.0.0.1).
    let pool = HbonePool::new(valid(&ca, "client"));
    let err = pool
        .open(
            agent.tunnel,
            Some(Ipv4Addr::new(127, 0, 0, 9)),
            &id("client"),
            &id("web"),
            &request(&agent, CLIENT_IP),
        )
        .await
        .expect_err("refused");
    assert!(
        matches!(err, PoolError::Refused { status, .. } if status == 403),
        "{err}"
    );
    eventually_refused(&agent, "wrong_source_node").await;
    // From the client's node, the same stream is carried.
    let _carried = pool
        .open(
            agent.tunnel,
            Some(Ipv4Addr::LOCALHOST),
            &id("client"),
            &id("web"),
            &request(&agent, CLIENT_IP),
        )
        .await
        .expect("carried from the client's node");
}

#[tokio::test]
async fn a_server_proving_another_identity_is_refused_by_the_client() {
    let ca = CaKeys::generate(TD).expect("root");
    let agent = destination_agent(&ca).await;
    // The agent holds web's certificate; a client expecting demo/db must not accept it.
    let identities = valid(&ca, "client");
    let config = identities
        .client_config(&id("client"), &id("db"))
        .expect("config");
    let tcp = tokio::net::TcpStream::connect(agent.tunnel)
        .await
        .expect("tcp");
    let name = ServerName::try_from(sni_for(&id("web"))).expect("sni");
    let err = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect_err("the client refuses");
    assert!(
        err.to_string()
            .contains("not spiffe://cluster.local/ns/demo/sa/db"),
        "{err}"
    );
}

#[tokio::test]
async fn the_ca_signs_only_identities_the_node_hosts() {
    let dir = std::env::temp_dir().join(format!("mesh-ca-it-{}", std::process::id()));
    let config_dir = dir.join("config");
    std::fs::create_dir_all(&config_dir).expect("dirs");
    std::fs::write(config_dir.join("pods.yaml"), cluster()).expect("config");
    std::fs::write(dir.join("tokens"), "here secret-here\nthere secret-there\n").expect("tokens");
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        probe.local_addr().expect("addr").port()
    };
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    tokio::spawn(ca::run(CaOptions {
        listen,
        state_dir: dir.join("state"),
        root_cert: None,
        root_key: None,
        trust_domain: TD.into(),
        cert_ttl: Duration::from_secs(600),
        tokens: Some(dir.join("tokens")),
        agent_service_account: "mesh-system/mesh-agent".into(),
        token_audience: "mesh-ca".into(),
        config_source: SourceKind::Dir,
        config_dir: config_dir.clone(),
        kubeconfig: None,
    }));
    let root = dir.join("state/root-cert.pem");
    // The CA is up once its root is written and it listens (10 s: a loaded machine).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(root.exists() && std::net::TcpStream::connect(listen).is_ok()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CA did not start on {listen}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // By name, as agents reach the CA's Service (`mesh-ca.mesh-system.svc:15012`).
    // The agent reads its token from a file at each request.
    let client = |node: &str, token: &str| {
        let file = dir.join(format!("token-{node}-{token}"));
        std::fs::write(&file, format!("{token}\n")).expect("token file");
        CaClient {
            address: format!("localhost:{}", listen.port()),
            node: node.into(),
            token: file,
            root_pem: std::fs::read_to_string(&root).expect("root"),
        }
    };
    let (_key, web_csr) = new_csr(&id("web")).expect("csr");
    let cert = client("here", "secret-here")
        .sign(&id("web"), &web_csr)
        .await
        .expect("web runs here");
    assert!(cert.contains("BEGIN CERTIFICATE"));
    let refused = client("there", "secret-there")
        .sign(&id("web"), &web_csr)
        .await
        .expect_err("web does not run there");
    assert!(refused.to_string().contains("403"), "{refused}");
    let refused = client("here", "wrong")
        .sign(&id("web"), &web_csr)
        .await
        .expect_err("bad token");
    assert!(refused.to_string().contains("401"), "{refused}");
    let (_key, admin_csr) = new_csr(&id("admin")).expect("csr");
    let refused = client("here", "secret-here")
        .sign(&id("web"), &admin_csr)
        .await
        .expect_err("CSR for another identity");
    assert!(refused.to_string().contains("asks for"), "{refused}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// Verifies nothing: lets a test get past the server's certificate to be judged itself.
#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn a_connection_the_destination_policy_denies_is_refused_before_the_workload() {
    let ca = CaKeys::generate(TD).expect("root");
    let agent = destination_agent_with(
        &ca,
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-client, namespace: demo}\nspec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]}\n",
    )
    .await;
    let pool = HbonePool::new(valid(&ca, "client"));
    let err = pool
        .open(
            agent.tunnel,
            None,
            &id("client"),
            &id("web"),
            &request(&agent, CLIENT_IP),
        )
        .await
        .expect_err("refused");
    assert!(
        matches!(err, PoolError::Refused { status, .. } if status == 403),
        "{err}"
    );
    eventually_refused(&agent, "policy_denied").await;
    let text = agent.metrics.encode();
    assert!(
        text.contains("mesh_authz_decisions_total{decision=\"deny\",policy=\"demo/no-client\",layer=\"connection\",destination_workload=\"web\",destination_workload_namespace=\"demo\"} 1"),
        "{text}"
    );
}
