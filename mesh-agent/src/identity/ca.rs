//! The mesh CA (`mesh-agent ca`) and the agent's client of it.
//!
//! The CA serves `POST /v1/certificates` over TLS. A node agent authenticates
//! (`Authorization: Bearer`) and sends a CSR for one SPIFFE ID; the CA signs it only if a
//! pod of that namespace and service account runs on that node, according to the cluster
//! configuration it reads. Private keys stay with the agents. On Kubernetes the token is
//! the agent's projected ServiceAccount token, which the API server reviews and which
//! names the node ([`token_review`](super::token_review)); on the directory source it is
//! the node's bootstrap token, with the node named by `X-Mesh-Node`.
//!
//! Against a hostile or broken client: bootstrap tokens are compared in constant time,
//! reviews of tokens not seen lately have a budget of their own, each node
//! has a budget of requests (a token bucket; over it the answer is 429 with
//! `Retry-After`, which the agent's certificate manager backs off from like any refusal),
//! and a connection has a deadline for its handshake, its headers and its exchange, so
//! idle or slow connections cannot hold the CA.

use std::{
    collections::HashMap,
    convert::Infallible,
    hash::Hash,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use ring::digest::{digest, SHA256};
use rustls::{pki_types::PrivateKeyDer, ServerConfig};
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use crate::{
    config::{
        self,
        kube_api::{self, ApiClient, KubeSource, Scope},
        origin::SourceKind,
        source::ConfigSource,
        ClusterConfig,
    },
    http::client::{self, Transport},
    identity::{
        spiffe::{CaKeys, IdentityError, SpiffeId},
        tls::provider,
        token_review::{Expected, TokenReviewer},
    },
};

/// The API's TLS server name; agents verify the CA under this name.
pub const CA_SERVER_NAME: &str = "mesh-ca";
const MAX_BODY: usize = 64 * 1024;

/// Requests a node may make at once: a node starting with many identities, or renewing
/// them together, gets them in one go.
const NODE_BURST: u32 = 20;
/// Requests a node may make per second once its burst is spent: renewal needs one per
/// identity per half lifetime, so this only slows a node that is broken or taken over.
const NODE_PER_SECOND: u32 = 5;
/// Reviews of tokens the CA has no recent verdict on, across all clients: tokens that are
/// not a node's are not charged to any node, so they get one budget, which keeps a flood
/// of made-up tokens off the API server.
const REVIEW_BURST: u32 = 50;
const REVIEWS_PER_SECOND: u32 = 20;
/// Reviews one client address may cause: an agent needs one per token and verdict
/// lifetime, so a pod sending made-up tokens is held to this and cannot spend the budget
/// the nodes' agents need.
const PEER_REVIEW_BURST: u32 = 5;
const PEER_REVIEWS_PER_SECOND: u32 = 1;

/// How long a client may take over each step of a connection.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    handshake: Duration,
    headers: Duration,
    /// The whole HTTP exchange: headers, body, signing and answer.
    exchange: Duration,
}

/// Generous for an agent across a busy cluster, short enough that a flood of idle
/// connections is let go before it adds up.
const TIMEOUTS: Timeouts = Timeouts {
    handshake: Duration::from_secs(10),
    headers: Duration::from_secs(10),
    exchange: Duration::from_secs(30),
};

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
    /// Bootstrap tokens, one `node token` line per node: how agents authenticate on the
    /// directory source. On Kubernetes they present their ServiceAccount token instead.
    #[arg(long, env = "MESH_CA_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// The agents' ServiceAccount (`namespace/name`): on Kubernetes, only its tokens are
    /// accepted.
    #[arg(
        long,
        env = "MESH_CA_AGENT_SERVICE_ACCOUNT",
        default_value = "mesh-system/mesh-agent"
    )]
    pub agent_service_account: String,
    /// The audience the agents' projected tokens are bound to.
    #[arg(long, env = "MESH_CA_TOKEN_AUDIENCE", default_value = "mesh-ca")]
    pub token_audience: String,
    /// Where the CA learns which pods run on which node: a directory of YAML (`dir`) or
    /// the Kubernetes API (`kube`).
    #[arg(long, env = "MESH_CONFIG_SOURCE", value_enum, default_value_t = SourceKind::Dir)]
    pub config_source: SourceKind,
    /// The cluster configuration for `--config-source dir`.
    #[arg(long, env = "MESH_CONFIG_DIR", default_value = "/etc/mesh/config")]
    pub config_dir: PathBuf,
    /// The kubeconfig for `--config-source kube`; without it, the in-cluster
    /// ServiceAccount, else `$KUBECONFIG` or `~/.kube/config`.
    #[arg(long, env = "MESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

/// Which pods run where, as the CA reads it.
enum ClusterView {
    /// The directory, read at each request.
    Dir(PathBuf),
    /// The latest configuration of the watched Kubernetes API (none until first listed).
    Watched(Arc<Mutex<Option<Arc<ClusterConfig>>>>),
}

impl ClusterView {
    fn current(&self) -> Option<Arc<ClusterConfig>> {
        match self {
            ClusterView::Dir(dir) => config::load_path(dir).ok().map(Arc::new),
            ClusterView::Watched(latest) => {
                latest.lock().unwrap_or_else(|e| e.into_inner()).clone()
            }
        }
    }

    /// Watches the pods of the Kubernetes API in the background, keeping the latest.
    async fn watch(api: ApiClient) -> ClusterView {
        let mut source = KubeSource::watch(api, Scope::Pods).await;
        let latest = Arc::new(Mutex::new(None));
        let view = latest.clone();
        tokio::spawn(async move {
            loop {
                match source.poll() {
                    Some(Ok(config)) => {
                        *latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(config));
                    }
                    Some(Err(err)) => tracing::warn!("the cluster's objects: {err}"),
                    None => {}
                }
                tokio::time::sleep(SOURCE_POLL).await;
            }
        });
        ClusterView::Watched(view)
    }
}

/// How the CA knows which node asks.
enum NodeAuthentication {
    /// Each node's bootstrap token, read from this file at each request.
    BootstrapTokens(PathBuf),
    /// The agents' ServiceAccount tokens, reviewed by the API server.
    ServiceAccountTokens(Box<TokenReviewer>),
}

/// How often the watched source is asked for a change (its watches run meanwhile).
const SOURCE_POLL: Duration = Duration::from_millis(200);

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
    cluster: ClusterView,
    authentication: NodeAuthentication,
    /// By authenticated node, so that nobody can spend another node's budget.
    per_node: RateLimits<String>,
    reviews: RateLimits<()>,
    reviews_per_peer: RateLimits<IpAddr>,
}

impl Ca {
    fn new(
        keys: CaKeys,
        options: CaOptions,
        cluster: ClusterView,
        authentication: NodeAuthentication,
    ) -> Ca {
        Ca {
            keys,
            options,
            cluster,
            authentication,
            per_node: RateLimits::new(NODE_BURST, NODE_PER_SECOND),
            reviews: RateLimits::new(REVIEW_BURST, REVIEWS_PER_SECOND),
            reviews_per_peer: RateLimits::new(PEER_REVIEW_BURST, PEER_REVIEWS_PER_SECOND),
        }
    }
}

/// `namespace/name` of a ServiceAccount.
fn parse_service_account(text: &str) -> anyhow::Result<(String, String)> {
    match text.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
            Ok((namespace.to_owned(), name.to_owned()))
        }
        _ => anyhow::bail!("--agent-service-account {text:?}: expected namespace/name"),
    }
}

/// Which pods run where, and how nodes authenticate, for the configured source.
async fn cluster_and_authentication(
    options: &CaOptions,
) -> anyhow::Result<(ClusterView, NodeAuthentication)> {
    match options.config_source {
        SourceKind::Dir => {
            let tokens = options.tokens.clone().context(
                "--tokens (the nodes' bootstrap tokens) is required with --config-source dir",
            )?;
            Ok((
                ClusterView::Dir(options.config_dir.clone()),
                NodeAuthentication::BootstrapTokens(tokens),
            ))
        }
        SourceKind::Kube => {
            if options.tokens.is_some() {
                anyhow::bail!(
                    "--tokens: bootstrap tokens are for --config-source dir; on Kubernetes \
                     agents present their ServiceAccount token"
                );
            }
            let (namespace, service_account) =
                parse_service_account(&options.agent_service_account)?;
            let api = kube_api::connect(options.kubeconfig.as_deref())
                .await
                .context("connecting to the Kubernetes API")?;
            let reviewer = TokenReviewer::new(
                api.clone(),
                Expected {
                    namespace,
                    service_account,
                    audience: options.token_audience.clone(),
                },
            );
            Ok((
                ClusterView::watch(api).await,
                NodeAuthentication::ServiceAccountTokens(Box::new(reviewer)),
            ))
        }
    }
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
    let acceptor = tls_acceptor(&keys, options.listen.ip())?;
    let listener = crate::http::listener(options.listen)
        .with_context(|| format!("binding {}", options.listen))?;
    tracing::info!(
        "mesh CA for {} listening on {}",
        options.trust_domain,
        options.listen
    );
    let (cluster, authentication) = cluster_and_authentication(&options).await?;
    let ca = Arc::new(Ca::new(keys, options, cluster, authentication));
    let intake = crate::http::Intake::default();
    crate::http::accept_loop("CA", listener, intake, move |stream, peer| {
        serve(stream, peer, acceptor.clone(), ca.clone(), TIMEOUTS)
    })
    .await;
    Ok(())
}

/// The CA's TLS side, with a server certificate for [`CA_SERVER_NAME`] and `ip`.
fn tls_acceptor(keys: &CaKeys, ip: IpAddr) -> anyhow::Result<TlsAcceptor> {
    let (cert, key) = keys.server_certificate(CA_SERVER_NAME, ip)?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let tls = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(tls)))
}

/// One connection: TLS, then one request (agents open a connection per request, so
/// keep-alive would only let a connection linger), each step within its deadline.
async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    ca: Arc<Ca>,
    timeouts: Timeouts,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = match tokio::time::timeout(timeouts.handshake, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            tracing::debug!("CA handshake with {peer}: {err}");
            return;
        }
        Err(_) => {
            tracing::debug!(
                "CA handshake with {peer}: none within {:?}",
                timeouts.handshake
            );
            return;
        }
    };
    let service = service_fn(move |request| {
        let ca = ca.clone();
        async move { Ok::<_, Infallible>(ca.handle(request, peer.ip()).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.headers)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(timeouts.exchange, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!("CA connection from {peer}: {err}"),
        Err(_) => tracing::debug!(
            "CA connection from {peer}: not done within {:?}",
            timeouts.exchange
        ),
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

/// 429 with `Retry-After` in whole seconds, rounded up. Logged quietly: a node over its
/// budget would otherwise flood the log at the rate it is refused.
fn too_many(who: &str, wait: Duration) -> Response<Full<Bytes>> {
    tracing::debug!("CA: {who} over the request budget");
    let seconds = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
    let mut response = reply(
        StatusCode::TOO_MANY_REQUESTS,
        serde_json::json!({ "error": format!("{who}: too many requests") }).to_string(),
    );
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// A signing request the CA refuses: the status and the message it answers with.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

/// The CA's answer to an authenticated node's request `body` (a [`SignRequest`] in JSON):
/// the identity must be a SPIFFE ID of `trust_domain` that `hosts` says the node runs a pod
/// of, and the CSR must ask for exactly that identity; the certificate is valid for `ttl`.
/// Everything in `body` comes from the network, so every way it can be wrong is a
/// [`Refusal`].
pub fn sign_request(
    keys: &CaKeys,
    trust_domain: &str,
    ttl: Duration,
    body: &[u8],
    hosts: impl FnOnce(&SpiffeId) -> bool,
) -> Result<(SpiffeId, SignResponse), Refusal> {
    let refused = |status, message| Refusal { status, message };
    let sign: SignRequest = serde_json::from_slice(body)
        .map_err(|err| refused(StatusCode::BAD_REQUEST, format!("body: {err}")))?;
    let id: SpiffeId = sign
        .identity
        .parse()
        .map_err(|err: IdentityError| refused(StatusCode::BAD_REQUEST, err.to_string()))?;
    if id.trust_domain != trust_domain {
        return Err(refused(
            StatusCode::FORBIDDEN,
            format!("{id} is not in trust domain {trust_domain}"),
        ));
    }
    if !hosts(&id) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            format!("runs no pod of {id}"),
        ));
    }
    let certificate = keys
        .sign_csr(&sign.csr, &id, ttl)
        .map_err(|err| refused(StatusCode::BAD_REQUEST, err.to_string()))?;
    let response = SignResponse {
        certificate,
        root: keys.root_pem.clone(),
    };
    Ok((id, response))
}

impl Ca {
    async fn handle(&self, request: Request<Incoming>, peer: IpAddr) -> Response<Full<Bytes>> {
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
        let claimed = header("x-mesh-node");
        let token = header("authorization");
        let token = token.strip_prefix("Bearer ").unwrap_or_default();
        let node = match self.authenticate(&claimed, token, peer).await {
            Ok(node) => node,
            Err(refused) => return refused,
        };
        // Before the body is read, the configuration loaded and a certificate signed.
        if let Err(wait) = self.per_node.take(node.clone(), Instant::now()) {
            return too_many(&format!("node {node}"), wait);
        }
        let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(err) => return refuse(StatusCode::BAD_REQUEST, format!("body: {err}")),
        };
        let answer = sign_request(
            &self.keys,
            &self.options.trust_domain,
            self.options.cert_ttl,
            &body,
            |id| self.hosts(&node, id),
        );
        match answer {
            Ok((id, response)) => {
                tracing::info!("signed {id} for node {node}");
                reply(
                    StatusCode::OK,
                    serde_json::to_string(&response).unwrap_or_default(),
                )
            }
            Err(refusal) => refuse(refusal.status, format!("node {node}: {}", refusal.message)),
        }
    }

    /// The node `token` speaks for (`claimed` is the node the client says it is), or the
    /// answer that refuses it.
    async fn authenticate(
        &self,
        claimed: &str,
        token: &str,
        peer: IpAddr,
    ) -> Result<String, Response<Full<Bytes>>> {
        match &self.authentication {
            NodeAuthentication::BootstrapTokens(path) => {
                let known = !claimed.is_empty()
                    && !token.is_empty()
                    && read_tokens(path)
                        .get(claimed)
                        .is_some_and(|t| secrets_equal(t, token));
                if known {
                    Ok(claimed.to_owned())
                } else {
                    Err(refuse(
                        StatusCode::UNAUTHORIZED,
                        format!("node {claimed:?}: bad or missing bootstrap token"),
                    ))
                }
            }
            NodeAuthentication::ServiceAccountTokens(reviewer) => {
                if token.is_empty() {
                    return Err(refuse(
                        StatusCode::UNAUTHORIZED,
                        "no ServiceAccount token (Authorization: Bearer)".into(),
                    ));
                }
                let verdict = match reviewer.kept(token, Instant::now()) {
                    Some(verdict) => verdict,
                    None => {
                        let now = Instant::now();
                        if let Err(wait) = self.reviews_per_peer.take(peer, now) {
                            return Err(too_many(
                                &format!("reviews of new tokens from {peer}"),
                                wait,
                            ));
                        }
                        if let Err(wait) = self.reviews.take((), now) {
                            return Err(too_many("reviews of new tokens", wait));
                        }
                        let pod_node = |namespace: &str, name: &str| self.pod_node(namespace, name);
                        match reviewer.review(token, pod_node).await {
                            Ok(verdict) => verdict,
                            Err(err) => {
                                return Err(refuse(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    format!("reviewing a ServiceAccount token: {err:#}"),
                                ))
                            }
                        }
                    }
                };
                let node = verdict.map_err(|reason| {
                    refuse(
                        StatusCode::UNAUTHORIZED,
                        format!("ServiceAccount token refused: {reason}"),
                    )
                })?;
                if !claimed.is_empty() && claimed != node {
                    return Err(refuse(
                        StatusCode::FORBIDDEN,
                        format!("the token speaks for node {node}, not {claimed}"),
                    ));
                }
                Ok(node)
            }
        }
    }

    /// The node the pod `namespace/name` is scheduled on.
    fn pod_node(&self, namespace: &str, name: &str) -> Option<String> {
        let cluster = self.cluster.current()?;
        cluster
            .pods
            .iter()
            .find(|pod| pod.metadata.namespace() == namespace && pod.metadata.name == name)
            .and_then(|pod| pod.spec.node_name.clone())
    }

    /// Whether a pod of `id`'s namespace and service account runs on `node`.
    fn hosts(&self, node: &str, id: &SpiffeId) -> bool {
        let Some(cluster) = self.cluster.current() else {
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

/// Whether two secrets are equal, in a time that tells nothing of where they differ: both
/// are hashed (so their lengths do not show either) and every byte of the digests is
/// compared. ring's own `constant_time` is deprecated as not meant for outside use.
fn secrets_equal(a: &str, b: &str) -> bool {
    let (a, b) = (digest(&SHA256, a.as_bytes()), digest(&SHA256, b.as_bytes()));
    let difference = a
        .as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |difference, (x, y)| difference | (x ^ y));
    // Keeps the compiler from turning the fold into an early exit.
    std::hint::black_box(difference) == 0
}

/// Token buckets by key: `burst` requests at once, then `per_second`.
struct RateLimits<K> {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Eq + Hash> RateLimits<K> {
    fn new(burst: u32, per_second: u32) -> RateLimits<K> {
        RateLimits {
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Spends one request of `key` at `now` (the caller's clock, so tests can move it),
    /// or says how long until one is available.
    fn take(&self, key: K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = bucket.at.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
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
    /// `host:port`: a name (the CA's Service, resolved at each request, so a moved CA is
    /// found) or an address.
    pub address: String,
    pub node: String,
    /// The token's file, read at each request: a projected ServiceAccount token is
    /// rotated by the kubelet.
    pub token: PathBuf,
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
            client::Request::post_json(self.address.clone(), "/v1/certificates", body);
        request.host = CA_SERVER_NAME.into();
        let token = std::fs::read_to_string(&self.token)
            .with_context(|| format!("reading the CA token {}", self.token.display()))?;
        request.headers.push((
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", token.trim())).with_context(|| {
                format!(
                    "the CA token {} is not a valid header value",
                    self.token.display()
                )
            })?,
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_rustls::client::TlsStream;

    use super::*;

    #[test]
    fn tokens_are_equal_only_when_identical() {
        assert!(secrets_equal("secret-here", "secret-here"));
        for other in [
            "secret-herE",
            "secret-her",
            "secret-here ",
            "Secret-here",
            "",
            "x",
        ] {
            assert!(!secrets_equal("secret-here", other), "{other:?}");
        }
    }

    #[test]
    fn a_signing_request_is_answered_or_refused_with_its_status() {
        use crate::identity::spiffe::{new_csr, spiffe_id_of};
        let keys = CaKeys::generate("cluster.local").expect("root");
        let web = SpiffeId::new("cluster.local", "demo", "web");
        let (_key, csr) = new_csr(&web).expect("csr");
        let body = |identity: &str, csr: &str| {
            serde_json::to_vec(&SignRequest {
                identity: identity.into(),
                csr: csr.into(),
            })
            .expect("json")
        };
        let answer = |body: &[u8]| {
            sign_request(
                &keys,
                "cluster.local",
                Duration::from_secs(60),
                body,
                |id| id.namespace == "demo",
            )
        };
        let (id, response) = answer(&body(&web.to_string(), &csr)).expect("signed");
        assert_eq!(id, web);
        let der = CertificateDer::from_pem_slice(response.certificate.as_bytes()).expect("pem");
        assert_eq!(spiffe_id_of(&der).expect("id"), web);
        assert_eq!(response.root, keys.root_pem);
        let status = |body: &[u8]| answer(body).expect_err("refused").status;
        assert_eq!(status(b"{"), StatusCode::BAD_REQUEST, "not JSON");
        assert_eq!(status(&body("web", &csr)), StatusCode::BAD_REQUEST);
        assert_eq!(
            status(&body("spiffe://other.domain/ns/demo/sa/web", &csr)),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(&body("spiffe://cluster.local/ns/prod/sa/web", &csr)),
            StatusCode::FORBIDDEN,
            "no pod of it on the node"
        );
        assert_eq!(
            status(&body("spiffe://cluster.local/ns/demo/sa/admin", &csr)),
            StatusCode::BAD_REQUEST,
            "the CSR asks for another identity"
        );
        assert_eq!(
            status(&body(&web.to_string(), "-----BEGIN")),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn a_node_gets_its_burst_then_a_few_requests_per_second() {
        let limits = RateLimits::new(20, 5);
        let start = Instant::now();
        for _ in 0..20 {
            assert_eq!(limits.take("node-a", start), Ok(()));
        }
        let wait = limits.take("node-a", start).expect_err("burst spent");
        assert!(
            (Duration::from_millis(199)..=Duration::from_millis(200)).contains(&wait),
            "{wait:?}"
        );
        assert_eq!(limits.take("node-b", start), Ok(()), "a budget per node");
        let later = start + Duration::from_millis(200);
        assert_eq!(limits.take("node-a", later), Ok(()), "one back per 200 ms");
        assert!(limits.take("node-a", later).is_err());
        // A clock read before an earlier caller's (threads racing) refills nothing.
        assert!(limits.take("node-a", start).is_err());
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..20 {
            assert_eq!(limits.take("node-a", much_later), Ok(()));
        }
        assert!(
            limits.take("node-a", much_later).is_err(),
            "an idle hour refills the burst, no more"
        );
    }

    #[test]
    fn retry_after_is_in_whole_seconds_rounded_up() {
        for (wait, seconds) in [(0, "1"), (200, "1"), (1000, "1"), (1001, "2"), (2500, "3")] {
            let response = too_many("node node-a", Duration::from_millis(wait));
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(
                response.headers().get(http::header::RETRY_AFTER),
                Some(&HeaderValue::from_static(seconds)),
                "{wait} ms"
            );
        }
    }

    const NO_LIMIT: Duration = Duration::from_secs(600);

    /// A CA whose node `node-a` has the token `token-a`, its TLS side, and a client of it.
    fn test_ca(name: &str) -> (Arc<Ca>, TlsAcceptor, tokio_rustls::TlsConnector, PathBuf) {
        let dir = std::env::temp_dir().join(format!("mesh-ca-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("tokens"), "node-a token-a\n").expect("tokens");
        let keys = CaKeys::generate("cluster.local").expect("root");
        let acceptor = tls_acceptor(&keys, IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("acceptor");
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(keys.root_pem.as_bytes()) {
            roots.add(cert.expect("root pem")).expect("root");
        }
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let options = CaOptions {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            state_dir: dir.join("state"),
            root_cert: None,
            root_key: None,
            trust_domain: "cluster.local".into(),
            cert_ttl: Duration::from_secs(60),
            tokens: Some(dir.join("tokens")),
            agent_service_account: "mesh-system/mesh-agent".into(),
            token_audience: "mesh-ca".into(),
            config_source: SourceKind::Dir,
            config_dir: dir.join("config"),
            kubeconfig: None,
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let cluster = ClusterView::Dir(options.config_dir.clone());
        let authentication = NodeAuthentication::BootstrapTokens(dir.join("tokens"));
        (
            Arc::new(Ca::new(keys, options, cluster, authentication)),
            acceptor,
            connector,
            dir,
        )
    }

    /// Serves one connection in the background; the test holds the client end.
    fn connect(
        ca: &Arc<Ca>,
        acceptor: &TlsAcceptor,
        timeouts: Timeouts,
    ) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 40000));
        let served = tokio::spawn(serve(server, peer, acceptor.clone(), ca.clone(), timeouts));
        (client, served)
    }

    async fn handshake(
        connector: &tokio_rustls::TlsConnector,
        client: DuplexStream,
    ) -> TlsStream<DuplexStream> {
        let name = ServerName::try_from(CA_SERVER_NAME).expect("name");
        connector.connect(name, client).await.expect("handshake")
    }

    async fn let_go(served: tokio::task::JoinHandle<()>) {
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the CA let the connection go")
            .expect("served");
    }

    #[tokio::test]
    async fn idle_and_slow_connections_are_let_go() {
        let (ca, acceptor, connector, dir) = test_ca("timeouts");
        let short = Duration::from_millis(100);

        // Connected, then silent: no handshake.
        let timeouts = Timeouts {
            handshake: short,
            headers: NO_LIMIT,
            exchange: NO_LIMIT,
        };
        let (_client, served) = connect(&ca, &acceptor, timeouts);
        let_go(served).await;

        // Handshake done, then no request.
        let timeouts = Timeouts {
            handshake: NO_LIMIT,
            headers: short,
            exchange: NO_LIMIT,
        };
        let (client, served) = connect(&ca, &acceptor, timeouts);
        let _tls = handshake(&connector, client).await;
        let_go(served).await;

        // An authenticated request that never sends the body it announces.
        let timeouts = Timeouts {
            handshake: NO_LIMIT,
            headers: NO_LIMIT,
            exchange: short,
        };
        let (client, served) = connect(&ca, &acceptor, timeouts);
        let mut tls = handshake(&connector, client).await;
        tls.write_all(
            b"POST /v1/certificates HTTP/1.1\r\nhost: mesh-ca\r\n\
              authorization: Bearer token-a\r\nx-mesh-node: node-a\r\n\
              content-length: 100\r\n\r\n{",
        )
        .await
        .expect("write");
        let_go(served).await;
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[tokio::test]
    async fn a_node_over_its_budget_is_answered_429_with_retry_after() {
        let (ca, acceptor, connector, dir) = test_ca("limits");
        let timeouts = Timeouts {
            handshake: NO_LIMIT,
            headers: NO_LIMIT,
            exchange: NO_LIMIT,
        };
        // The bucket refills while the requests are made (5 a second): on a slow machine
        // a few more than the burst pass before the first 429.
        let mut answers = Vec::new();
        while answers.len() < 3 * NODE_BURST as usize {
            let (client, served) = connect(&ca, &acceptor, timeouts);
            let mut tls = handshake(&connector, client).await;
            tls.write_all(
                b"POST /v1/certificates HTTP/1.1\r\nhost: mesh-ca\r\n\
                  authorization: Bearer token-a\r\nx-mesh-node: node-a\r\n\
                  content-length: 2\r\n\r\n{}",
            )
            .await
            .expect("write");
            let mut answer = String::new();
            tls.read_to_string(&mut answer).await.expect("answer");
            let_go(served).await;
            let refused = answer.to_ascii_lowercase().starts_with("http/1.1 429");
            answers.push(answer.to_ascii_lowercase());
            if refused {
                break;
            }
        }
        let (last, within) = answers.split_last().expect("answers");
        assert!(within.len() >= NODE_BURST as usize, "{answers:?}");
        for answer in within {
            // Within the budget the request reaches the body's check.
            assert!(answer.starts_with("http/1.1 400"), "{answer}");
        }
        assert!(last.starts_with("http/1.1 429"), "{last}");
        assert!(last.contains("retry-after: 1\r\n"), "{last}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
