//! The sandbox's kubelet API, the part the API server calls for a pod's port-forward
//! (`kubectl port-forward`, `meshctl --node`): `/portForward/NAMESPACE/POD?port=P`
//! upgraded to a WebSocket with the kubelet's channel protocol (`v4.channel.k8s.io`: per
//! port a data and an error channel, each opened by the port number), over TLS with a
//! serving certificate of the cluster CA for the node's address, and for the API server's
//! client certificate only. Each port is a TCP connection to 127.0.0.1:PORT inside the
//! pod's network namespace: the node's own for its agent, which runs with hostNetwork.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    sync::Arc,
};

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{tcp::OwnedWriteHalf, TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_tungstenite::{
    tungstenite::{
        handshake::server::{Callback, ErrorResponse, Request, Response},
        http::{self, header::SEC_WEBSOCKET_PROTOCOL},
        Message,
    },
    WebSocketStream,
};

use crate::{
    control_plane::Layout,
    daemon::RUN_DIR,
    sandbox::{self, SandboxState},
};

/// The kubelet's port, which the API server uses when the Node names none.
pub const PORT: u16 = 10250;
/// The subject of the API server's client certificate to kubelets
/// (`--kubelet-client-certificate`): the one client this kubelet serves.
pub const API_SERVER_CLIENT: &str = "kube-apiserver-kubelet-client";
/// Binary channels, the kubelet's port-forward protocol for WebSocket clients.
const CHANNEL_PROTOCOL: &str = "v4.channel.k8s.io";

/// A port-forward request: which pod's ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub namespace: String,
    pub pod: String,
    pub ports: Vec<u16>,
}

/// `/portForward/NAMESPACE/POD[/UID]?port=P&port=Q`, as the API server asks it (a comma
/// list in one `port` is taken too).
pub fn parse_forward(path_and_query: &str) -> Result<Forward, String> {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (namespace, pod) = match parts.as_slice() {
        ["portForward", namespace, pod] | ["portForward", namespace, pod, _] => (*namespace, *pod),
        _ => return Err(format!("{path}: not /portForward/NAMESPACE/POD")),
    };
    if namespace.is_empty() || pod.is_empty() {
        return Err(format!("{path}: the namespace or the pod is empty"));
    }
    let mut ports = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let Some(("port" | "ports", values)) = pair.split_once('=') else {
            continue;
        };
        for value in values.split("%2C").flat_map(|v| v.split(',')) {
            match value.parse::<u16>() {
                Ok(port) if port > 0 => ports.push(port),
                _ => return Err(format!("port {value:?} is not a port number")),
            }
        }
    }
    if ports.is_empty() {
        return Err("no port to forward (port=P)".into());
    }
    Ok(Forward {
        namespace: namespace.to_owned(),
        pod: pod.to_owned(),
        ports,
    })
}

/// The subprotocol to answer, from the client's `Sec-WebSocket-Protocol` list.
pub fn choose_protocol(offered: Option<&str>) -> Result<&'static str, String> {
    let offered = offered.unwrap_or_default();
    if offered.split(',').any(|p| p.trim() == CHANNEL_PROTOCOL) {
        Ok(CHANNEL_PROTOCOL)
    } else {
        Err(format!(
            "Sec-WebSocket-Protocol {offered:?}: this kubelet speaks {CHANNEL_PROTOCOL}"
        ))
    }
}

/// The first frame of a port's channel: the channel and the port, little-endian.
fn opening_frame(channel: u8, port: u16) -> Message {
    let [low, high] = port.to_le_bytes();
    Message::binary(vec![channel, low, high])
}

/// The namespace of the agents' DaemonSet.
pub const AGENT_NAMESPACE: &str = "mesh-system";

/// The name of a node's agent pod in `mesh-system`, as the sandbox registers it.
pub fn agent_pod_name(node: &str) -> String {
    format!("mesh-agent-{node}")
}

/// Serves node `node`'s kubelet API until killed.
pub fn serve(node: &str) -> Result<()> {
    let state = SandboxState::load()?;
    let address = state.node(node)?.ip;
    let tls = Arc::new(tls_config(&Layout::new(Path::new(RUN_DIR)), address)?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind((address, PORT))
            .await
            .with_context(|| format!("listening on {address}:{PORT}"))?;
        eprintln!("kubelet API of {node} on {address}:{PORT}");
        loop {
            let (tcp, peer) = listener.accept().await?;
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            let node = node.to_owned();
            tokio::spawn(async move {
                if let Err(err) = handle(acceptor, tcp, &node).await {
                    eprintln!("{peer}: {err:#}");
                }
            });
        }
    })
}

/// A serving certificate for `address` from the cluster CA, and only client
/// certificates of the cluster CA accepted (the API server's is checked by name after
/// the handshake).
fn tls_config(layout: &Layout, address: Ipv4Addr) -> Result<rustls::ServerConfig> {
    let ca_pem = fs::read_to_string(layout.ca_cert())?;
    let ca_key = KeyPair::from_pem(&fs::read_to_string(layout.ca_key())?)?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("kubelet {address}"));
    params
        .subject_alt_names
        .push(SanType::IpAddress(address.into()));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
                .map_err(|err| anyhow::anyhow!("the kubelet's key: {err}"))?,
        )?)
}

async fn handle(acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream, node: &str) -> Result<()> {
    let tls = acceptor.accept(tcp).await.context("TLS handshake")?;
    let client = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .context("no client certificate")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(client)
        .map_err(|err| anyhow::anyhow!("the client certificate: {err}"))?;
    let subject = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default();
    if subject != API_SERVER_CLIENT {
        bail!("client {subject:?} is not the API server ({API_SERVER_CLIENT})");
    }
    let mut forward = None;
    let ws = tokio_tungstenite::accept_hdr_async(
        tls,
        Negotiation {
            forward: &mut forward,
        },
    )
    .await
    .context("WebSocket handshake")?;
    let forward = forward.context("the handshake named no forward")?;
    let netns = pod_netns(node, &forward)?;
    relay(ws, &forward, netns.as_deref()).await
}

/// The WebSocket handshake: the forward asked for and the subprotocol answered, or 400.
struct Negotiation<'a> {
    forward: &'a mut Option<Forward>,
}

impl Callback for Negotiation<'_> {
    fn on_request(
        self,
        request: &Request,
        mut response: Response,
    ) -> Result<Response, ErrorResponse> {
        let asked = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let offered = request
            .headers()
            .get(SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok());
        match parse_forward(&asked).and_then(|f| Ok((f, choose_protocol(offered)?))) {
            Ok((asked, protocol)) => {
                response.headers_mut().insert(
                    SEC_WEBSOCKET_PROTOCOL,
                    http::HeaderValue::from_static(protocol),
                );
                *self.forward = Some(asked);
                Ok(response)
            }
            Err(reason) => {
                let mut refused = ErrorResponse::new(Some(reason));
                *refused.status_mut() = http::StatusCode::BAD_REQUEST;
                Err(refused)
            }
        }
    }
}

/// The network namespace of the pod: `None` for the node's own (its agent), else the
/// pod's, if it runs on this node.
fn pod_netns(node: &str, forward: &Forward) -> Result<Option<String>> {
    if forward.namespace == AGENT_NAMESPACE && forward.pod == agent_pod_name(node) {
        return Ok(None);
    }
    let state = SandboxState::load()?;
    let pod = state.pod(&format!("{}/{}", forward.namespace, forward.pod))?;
    if pod.node != node {
        bail!(
            "pod {}/{} runs on {}, not on {node}",
            forward.namespace,
            forward.pod,
            pod.node
        );
    }
    Ok(Some(pod.netns.clone()))
}

/// Connects to 127.0.0.1:`port` in `netns` (this process's own for `None`).
async fn connect_in(netns: Option<&str>, port: u16) -> std::io::Result<TcpStream> {
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Some(netns) = netns else {
        return TcpStream::connect(target).await;
    };
    let file = fs::File::open(Path::new("/var/run/netns").join(netns))?;
    // A thread of its own enters the namespace, as setns changes the calling thread;
    // the socket stays in the namespace it was made in.
    let stream = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || {
            // SAFETY: setns on a namespace file this thread holds open; the thread exits
            // after the connection is made.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            std::net::TcpStream::connect(target)
        })
        .join()
        .map_err(|_| std::io::Error::other("the connecting thread panicked"))?
    })
    .await
    .map_err(std::io::Error::other)??;
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

/// Carries each port's bytes between its data channel and its connection; a port that
/// cannot be reached gets the reason on its error channel and the stream is closed, as
/// the kubelet does.
async fn relay<S>(ws: WebSocketStream<S>, forward: &Forward, netns: Option<&str>) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (from_pods, mut to_client) = mpsc::channel::<(u8, Vec<u8>)>(16);
    let mut writers: Vec<Option<OwnedWriteHalf>> = Vec::new();
    for (index, &port) in forward.ports.iter().enumerate() {
        let data = (index * 2) as u8;
        sink.send(opening_frame(data, port)).await?;
        sink.send(opening_frame(data + 1, port)).await?;
        let connection = match connect_in(netns, port).await {
            Ok(connection) => connection,
            Err(err) => {
                let reason = format!(
                    "error forwarding port {port} to pod {}/{}: {err}",
                    forward.namespace, forward.pod
                );
                let mut frame = vec![data + 1];
                frame.extend_from_slice(reason.as_bytes());
                sink.send(Message::binary(frame)).await?;
                sink.send(Message::Close(None)).await?;
                return Ok(());
            }
        };
        let (mut reader, writer) = connection.into_split();
        writers.push(Some(writer));
        let from_pods = from_pods.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 32 * 1024];
            loop {
                let read = reader.read(&mut buffer).await.unwrap_or(0);
                // An empty chunk tells the port's end.
                if from_pods
                    .send((data, buffer[..read].to_vec()))
                    .await
                    .is_err()
                    || read == 0
                {
                    break;
                }
            }
        });
    }
    drop(from_pods);
    let mut open = writers.len();
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Binary(frame))) if !frame.is_empty() => {
                    let channel = frame[0];
                    let writer = writers
                        .get_mut(usize::from(channel / 2))
                        .filter(|_| channel % 2 == 0)
                        .and_then(Option::as_mut);
                    if let Some(writer) = writer {
                        if writer.write_all(&frame[1..]).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            chunk = to_client.recv() => match chunk {
                Some((channel, bytes)) if bytes.is_empty() => {
                    if let Some(writer) = writers.get_mut(usize::from(channel / 2)) {
                        writer.take();
                    }
                    open -= 1;
                    if open == 0 {
                        sink.send(Message::Close(None)).await?;
                        break;
                    }
                }
                Some((channel, bytes)) => {
                    let mut frame = Vec::with_capacity(bytes.len() + 1);
                    frame.push(channel);
                    frame.extend_from_slice(&bytes);
                    sink.send(Message::binary(frame)).await?;
                }
                None => break,
            },
        }
    }
    Ok(())
}

/// Starts node `node`'s kubelet API in its namespace; returns its pid.
pub fn start(node: &sandbox::NodeState) -> Result<u32> {
    let cgroup = node.cgroup.join("kubelet");
    fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    crate::daemon::start_daemon(
        std::process::Command::new(crate::release_binaries().join("xtask"))
            .args(["sandbox", "kubelet", "--node", &node.name]),
        &format!("kubelet-{}.log", node.name),
        &node.netns,
        cgroup,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_servers_port_forward_request_is_read() {
        assert_eq!(
            parse_forward("/portForward/mesh-system/mesh-agent-node-a?port=15000"),
            Ok(Forward {
                namespace: "mesh-system".into(),
                pod: "mesh-agent-node-a".into(),
                ports: vec![15000],
            })
        );
        assert_eq!(
            parse_forward("/portForward/demo/web/1234-uid?port=80&port=8080").map(|f| f.ports),
            Ok(vec![80, 8080])
        );
        assert_eq!(
            parse_forward("/portForward/demo/web?ports=80%2C81").map(|f| f.ports),
            Ok(vec![80, 81])
        );
        for bad in [
            "/portForward/demo?port=80",
            "/exec/demo/web?port=80",
            "/portForward/demo/web",
            "/portForward/demo/web?port=0",
            "/portForward/demo/web?port=http",
            "/portForward//web?port=80",
        ] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn binary_channels_are_chosen_when_offered() {
        assert_eq!(
            choose_protocol(Some("v5.channel.k8s.io, v4.channel.k8s.io")),
            Ok(CHANNEL_PROTOCOL)
        );
        assert!(choose_protocol(Some("v4.base64.channel.k8s.io")).is_err());
        assert!(choose_protocol(None).is_err());
    }

    #[test]
    fn a_channel_opens_with_its_port_little_endian() {
        assert_eq!(
            opening_frame(3, 15000),
            Message::binary(vec![3, 0x98, 0x3a])
        );
    }
}
