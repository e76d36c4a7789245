//! Fetching the JWKS documents that RequestAuthentication's `jwksUri`s name, and keeping
//! them fresh: new URIs at once, then on a refresh interval, with the last good keys kept
//! while a fetch fails.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    config::jwks::{parse_jwks, Jwks},
    http::client::{self, Request, Transport},
    model::{MeshState, SharedState},
    policy::jwt::{uris, JwksCache},
};

/// How soon a failed fetch is tried again (doubling up to the last figure).
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often the configuration is looked at for new URIs and due refreshes.
const TICK: Duration = Duration::from_millis(500);
/// A JWKS document larger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// The system's trust store, for `https` JWKS URIs.
fn system_roots() -> anyhow::Result<rustls::RootCertStore> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let path = std::env::var("SSL_CERT_FILE")
        .unwrap_or_else(|_| "/etc/ssl/certs/ca-certificates.crt".into());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&path)? {
        roots.add(cert?)?;
    }
    Ok(roots)
}

/// Fetches a JWKS document over `http` or `https` (verified against the system's trust
/// store); a host that names a Service of `state` is reached at one of its endpoints.
pub async fn fetch(uri: &str, state: &MeshState) -> anyhow::Result<Jwks> {
    let parsed: http::Uri = uri.parse()?;
    let host = parsed
        .host()
        .ok_or_else(|| anyhow::anyhow!("no host in {uri:?}"))?
        .to_owned();
    let transport = match parsed.scheme_str() {
        Some("http") => Transport::Plain,
        Some("https") => {
            let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(system_roots()?)
            .with_no_client_auth();
            Transport::Tls {
                config: Arc::new(tls),
                server_name: rustls_pki_types::ServerName::try_from(host.clone())?,
            }
        }
        _ => anyhow::bail!("{uri:?}: only http and https are supported"),
    };
    let port = parsed
        .port_u16()
        .unwrap_or(if parsed.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let path = parsed.path_and_query().map_or("/", |p| p.as_str());
    let address = state.dial(&host, port).map_err(anyhow::Error::msg)?;
    let mut request = Request::get(address, path);
    request.host = parsed.authority().map_or(host, |a| a.to_string());
    request.max_body = MAX_JWKS_BYTES;
    request.headers.push((
        http::header::ACCEPT,
        http::HeaderValue::from_static("application/json"),
    ));
    let response = client::send(&transport, request).await?;
    if !response.status.is_success() {
        anyhow::bail!("answered {}", response.status);
    }
    Ok(parse_jwks(&response.text())?)
}

/// Keeps the keys of every `jwksUri` in the live configuration fetched: new URIs at
/// once, then every `refresh` (the agent's `--jwks-refresh-interval`); a failed fetch keeps
/// the last good keys, is recorded in the cache (the admin API's `/jwks`) and is retried
/// with backoff.
pub async fn keep_fresh(state: SharedState, cache: Arc<JwksCache>, refresh: Duration) {
    // An interval shorter than the tick would otherwise be stretched to the tick.
    let tick = TICK.min(refresh);
    let mut retry: HashMap<String, (Duration, Instant)> = HashMap::new();
    loop {
        let current = state.current();
        let mut wanted: Vec<(String, Duration)> = current
            .security
            .values()
            .flat_map(|s| uris(&s.jwt_rules))
            .collect();
        wanted.sort();
        wanted.dedup_by(|a, b| a.0 == b.0);
        for (uri, timeout) in wanted {
            let fresh = cache.age(&uri).is_some_and(|age| age < refresh);
            let waiting = retry.get(&uri).is_some_and(|(_, at)| Instant::now() < *at);
            if fresh || waiting {
                continue;
            }
            match tokio::time::timeout(timeout, fetch(&uri, &current)).await {
                Ok(Ok(keys)) => {
                    tracing::info!("JWKS {uri}: {} keys", keys.len());
                    cache.store(&uri, keys);
                    retry.remove(&uri);
                }
                outcome => {
                    let error = match outcome {
                        Ok(Err(err)) => err.to_string(),
                        _ => format!("no answer within {timeout:?}"),
                    };
                    let delay = retry
                        .get(&uri)
                        .map_or(RETRY_FIRST, |(d, _)| (*d * 2).min(RETRY_MAX));
                    let kept = if cache.get(&uri).is_some() {
                        "keeping the last fetched keys"
                    } else {
                        "tokens of this issuer are refused until it answers"
                    };
                    tracing::warn!("JWKS {uri}: {error}; {kept}; retrying in {delay:?}");
                    cache.record_failure(&uri, error);
                    retry.insert(uri, (delay, Instant::now() + delay));
                }
            }
        }
        tokio::time::sleep(tick).await;
    }
}
