//! The mesh CA (`mesh-agent ca`) and the agent's client of it.
//!
//! The CA serves `POST /v1/certificates` over TLS. A node agent authenticates with its
//! node's bootstrap token (`Authorization: Bearer`, `X-Mesh-Node`) and sends a CSR for one
//! SPIFFE ID; the CA signs it only if a pod of that namespace and service account runs on
//! that node, according to the cluster configuration it reads. Private keys stay with the
//! agents.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use rustls::{pki_types::PrivateKeyDer, ServerConfig};
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
use serde::{Deserialize, Serialize};

use crate::{
    config,
    http::client::{self, Transport},
    identity::{
        spiffe::{CaKeys, SpiffeId},
        tls::provider,
    },
};

/// The API's TLS server name; agents verify the CA under this name.
pub const CA_SERVER_NAME: &str = "mesh-ca";
const MAX_BODY: usize = 64 * 1024;

/// `mesh-agent ca` options.
#[derive(Debug, Clone, clap::Args)]
pub struct CaOptions {
    /// Address of the CA's TLS API.
    #[arg(long, env = "MESH_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Where the root is kept (created on first start).
    #[arg(long, env = "MESH_CA_STATE_DIR", default_value = "/var/lib/mesh-ca")]
    pub state_dir: PathBuf,
    /// An operator-supplied root (or intermediate) certificate, instead of the kept one.
    #[arg(long, requires = "root_key")]
    pub root_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, requires = "root_cert")]
    pub root_key: Option<PathBuf>,
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime of workload certificates (e.g. 24h, 10m, 8s).
    #[arg(long, env = "MESH_CERT_TTL", default_value = "24h", value_parser = parse_ttl)]
    pub cert_ttl: Duration,
    /// Bootstrap tokens: one `node token` line per node.
    #[arg(long, env = "MESH_CA_TOKENS")]
    pub tokens: PathBuf,
    /// The cluster configuration, to know which pods run on which node.
    #[arg(long, env = "MESH_CONFIG_DIR", default_value = "/etc/mesh/config")]
    pub config_dir: PathBuf,
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    crate::config::istio::parse_duration(text)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SignRequest {
    pub identity: String,
    pub csr: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SignResponse {
    pub certificate: String,
    pub root: String,
}

struct Ca {
    keys: CaKeys,
    options: CaOptions,
}

pub async fn run(options: CaOptions) -> anyhow::Result<()> {
    let keys = match (&options.root_cert, &options.root_key) {
        (Some(cert), Some(key)) => {
            let cert = std::fs::read_to_string(cert)
                .with_context(|| format!("reading {}", cert.display()))?;
            let key = std::fs::read_to_string(key)
                .with_context(|| format!("reading {}", key.display()))?;
            CaKeys::from_pem(&cert, &key)?
        }
        (None, None) => CaKeys::load_or_create(&options.state_dir, &options.trust_domain)?,
        _ => anyhow::bail!("--root-cert and --root-key go together"),
    };
    // The bundle agents trust, next to the persisted root.
    std::fs::create_dir_all(&options.state_dir)?;
    std::fs::write(options.state_dir.join("root-cert.pem"), &keys.root_pem)?;
    let (cert, key) = keys.server_certificate(CA_SERVER_NAME, options.listen.ip())?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let tls = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = crate::http::listener(options.listen)
        .with_context(|| format!("binding {}", options.listen))?;
    tracing::info!(
        "mesh CA for {} listening on {}",
        options.trust_domain,
        options.listen
    );
    let ca = Arc::new(Ca { keys, options });
    loop {
        let (stream, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let ca = ca.clone();
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::debug!("CA handshake with {peer}: {err}");
                    return;
                }
            };
            let service = service_fn(move |request| {
                let ca = ca.clone();
                async move { Ok::<_, Infallible>(ca.handle(request).await) }
            });
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("CA connection from {peer}: {err}");
            }
        });
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn refuse(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    tracing::warn!("CA refused a request: {message}");
    reply(status, serde_json::json!({ "error": message }).to_string())
}

impl Ca {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != hyper::Method::POST || request.uri().path() != "/v1/certificates" {
            return refuse(
                StatusCode::NOT_FOUND,
                "POST /v1/certificates is the only endpoint".into(),
            );
        }
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let node = header("x-mesh-node");
        let token = header("authorization");
        if !self.authenticated(&node, token.strip_prefix("Bearer ").unwrap_or_default()) {
            return refuse(
                StatusCode::UNAUTHORIZED,
                format!("node {node:?}: bad or missing bootstrap token"),
            );
        }
        let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(err) => return refuse(StatusCode::BAD_REQUEST, format!("body: {err}")),
        };
        let sign: SignRequest = match serde_json::from_slice(&body) {
            Ok(sign) => sign,
            Err(err) => return refuse(StatusCode::BAD_REQUEST, format!("body: {err}")),
        };
        let id: SpiffeId = match sign.identity.parse() {
            Ok(id) => id,
            Err(err) => return refuse(StatusCode::BAD_REQUEST, err.to_string()),
        };
        if id.trust_domain != self.options.trust_domain {
            return refuse(
                StatusCode::FORBIDDEN,
                format!("{id} is not in trust domain {}", self.options.trust_domain),
            );
        }
        if !self.hosts(&node, &id) {
            return refuse(
                StatusCode::FORBIDDEN,
                format!("node {node} runs no pod of {id}"),
            );
        }
        match self.keys.sign_csr(&sign.csr, &id, self.options.cert_ttl) {
            Ok(certificate) => {
                tracing::info!("signed {id} for node {node}");
                let response = SignResponse {
                    certificate,
                    root: self.keys.root_pem.clone(),
                };
                reply(
                    StatusCode::OK,
                    serde_json::to_string(&response).unwrap_or_default(),
                )
            }
            Err(err) => refuse(StatusCode::BAD_REQUEST, err.to_string()),
        }
    }

    fn authenticated(&self, node: &str, token: &str) -> bool {
        if node.is_empty() || token.is_empty() {
            return false;
        }
        read_tokens(&self.options.tokens)
            .get(node)
            .is_some_and(|t| t == token)
    }

    /// Whether a pod of `id`'s namespace and service account runs on `node`.
    fn hosts(&self, node: &str, id: &SpiffeId) -> bool {
        let Ok(cluster) = config::load_path(&self.options.config_dir) else {
            return false;
        };
        cluster.pods.iter().any(|pod| {
            pod.spec.node_name.as_deref() == Some(node)
                && pod.metadata.namespace() == id.namespace
                && pod
                    .spec
                    .service_account_name
                    .as_deref()
                    .unwrap_or("default")
                    == id.service_account
        })
    }
}

fn read_tokens(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (node, token) = line.trim().split_once(' ')?;
            Some((node.to_owned(), token.trim().to_owned()))
        })
        .collect()
}

/// How an agent reaches the CA.
#[derive(Debug, Clone)]
pub struct CaClient {
    pub address: SocketAddr,
    pub node: String,
    pub token: String,
    pub root_pem: String,
}

impl CaClient {
    /// Asks the CA to sign `csr` for `id`; returns the certificate PEM.
    pub async fn sign(&self, id: &SpiffeId, csr: &str) -> anyhow::Result<String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.root_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let transport = Transport::Tls {
            config: Arc::new(tls),
            server_name: ServerName::try_from(CA_SERVER_NAME)?,
        };
        let body = serde_json::to_string(&SignRequest {
            identity: id.to_string(),
            csr: csr.to_owned(),
        })?;
        let mut request =
            client::Request::post_json(self.address.to_string(), "/v1/certificates", body);
        request.host = CA_SERVER_NAME.into();
        request.headers.push((
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", self.token))
                .context("the CA token is not a valid header value")?,
        ));
        request.headers.push((
            HeaderName::from_static("x-mesh-node"),
            HeaderValue::from_str(&self.node)
                .context("the node name is not a valid header value")?,
        ));
        let response = client::send(&transport, request).await?;
        if response.status != StatusCode::OK {
            anyhow::bail!(
                "the CA refused {id}: {} {}",
                response.status,
                response.text()
            );
        }
        let signed: SignResponse =
            serde_json::from_slice(&response.body).context("the CA's answer")?;
        Ok(signed.certificate)
    }
}
