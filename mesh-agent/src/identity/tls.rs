//! Mutual TLS between node agents (TLS 1.3 only, rustls): the agent's current workload
//! certificates ([`Identities`]), the server side (certificate chosen by the destination
//! identity the client names in SNI; client certificate required and chained to the mesh
//! root), and the client side (our workload's certificate; the server must prove exactly
//! the destination's SPIFFE ID).

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor, ResolvesClientCert,
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;

use crate::identity::spiffe::{facts, spiffe_id_of, CertificateFacts, SpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust bundle: {0}")]
    Bundle(String),
    #[error("certificate for {id}: {message}")]
    Certificate { id: String, message: String },
}

pub const ALPN_H2: &[u8] = b"h2";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A workload certificate the agent holds.
#[derive(Debug, Clone)]
pub struct Svid {
    pub key: Arc<CertifiedKey>,
    pub facts: CertificateFacts,
    /// When it was installed (UNIX seconds): its lifetime counts from there, as its
    /// `notBefore` carries slack for clocks that disagree.
    pub installed_at: i64,
}

/// The trust bundle and the workload certificates of this node's identities.
#[derive(Debug)]
pub struct Identities {
    pub trust_domain: String,
    pub root_pem: String,
    roots: Arc<RootCertStore>,
    current: RwLock<BTreeMap<SpiffeId, Svid>>,
}

impl Identities {
    pub fn new(trust_domain: &str, root_pem: &str) -> Result<Identities, TlsError> {
        let mut roots = RootCertStore::empty();
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
            let cert = cert.map_err(|e| TlsError::Bundle(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| TlsError::Bundle(e.to_string()))?;
            found += 1;
        }
        if found == 0 {
            return Err(TlsError::Bundle(
                "no certificate in the trust bundle".into(),
            ));
        }
        Ok(Identities {
            trust_domain: trust_domain.to_owned(),
            root_pem: root_pem.to_owned(),
            roots: Arc::new(roots),
            current: RwLock::new(BTreeMap::new()),
        })
    }

    /// Installs a certificate (leaf PEM) and its private key for `id`; the next handshakes
    /// use it, established connections keep theirs.
    pub fn install(&self, id: &SpiffeId, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let bad = |message: String| TlsError::Certificate {
            id: id.to_string(),
            message,
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(e.to_string()))?;
        let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
        let facts = facts(leaf).map_err(|e| bad(e.to_string()))?;
        if spiffe_id_of(leaf).ok().as_ref() != Some(id) {
            return Err(bad(format!("it carries {:?}", facts.spiffe_id)));
        }
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let signing_key = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| bad(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(chain, signing_key));
        self.current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id.clone(),
                Svid {
                    key: certified,
                    facts,
                    installed_at: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64),
                },
            );
        Ok(())
    }

    pub fn remove(&self, id: &SpiffeId) {
        self.current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    pub fn get(&self, id: &SpiffeId) -> Option<Svid> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    pub fn all(&self) -> BTreeMap<SpiffeId, Svid> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId::new(&self.trust_domain, namespace, service_account)
    }

    /// The server side of the tunnel port.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Bundle(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Bundle(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(ByDestination(self.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// The client side: presenting `source`, requiring the server to be `destination`.
    pub fn client_config(
        self: &Arc<Self>,
        source: &SpiffeId,
        destination: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Bundle(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: self.roots.clone(),
                expected: destination.clone(),
                provider: provider(),
            }))
            .with_client_cert_resolver(Arc::new(AsSource {
                identities: self.clone(),
                source: source.clone(),
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }
}

/// What every SNI naming a workload identity ends with.
const SNI_SUFFIX: &str = ".sa.mesh";

/// The SNI naming a destination identity: `<sa>.<ns>.sa.mesh`. A namespace is a DNS label
/// (no dot) while a service account name is a DNS subdomain (dots allowed), so the label
/// right before the suffix is the namespace and all before it the service account: the
/// pair decodes unambiguously ([`identity_from_sni`]). Names longer than 244 characters
/// together make an SNI longer than DNS allows (253), which the client refuses to send:
/// such a connection fails closed rather than naming another identity.
pub fn sni_for(id: &SpiffeId) -> String {
    format!("{}.{}{SNI_SUFFIX}", id.service_account, id.namespace)
}

/// The identity an SNI made by [`sni_for`] names; `None` for any other name, including
/// ones Kubernetes could not have given (empty, upper-case or over-long labels).
pub fn identity_from_sni(sni: &str, trust_domain: &str) -> Option<SpiffeId> {
    let (sa, ns) = sni.strip_suffix(SNI_SUFFIX)?.rsplit_once('.')?;
    (is_dns_label(ns) && is_dns_subdomain(sa)).then(|| SpiffeId::new(trust_domain, ns, sa))
}

/// An RFC 1123 label as Kubernetes checks a namespace: 1 to 63 of `a-z`, `0-9` and `-`,
/// alphanumeric at both ends.
fn is_dns_label(text: &str) -> bool {
    let alphanumeric = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = text.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(alphanumeric)
        && bytes.last().is_some_and(alphanumeric)
        && bytes.iter().all(|b| alphanumeric(b) || *b == b'-')
}

/// An RFC 1123 subdomain as Kubernetes checks a service account name: labels joined by
/// dots, 253 characters at most.
fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_dns_label)
}

/// The SPIFFE ID of the peer of an established TLS connection.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    spiffe_id_of(certs?.first()?).ok()
}

#[derive(Debug)]
struct ByDestination(Arc<Identities>);

impl ResolvesServerCert for ByDestination {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let id = identity_from_sni(hello.server_name()?, &self.0.trust_domain)?;
        Some(self.0.get(&id)?.key)
    }
}

#[derive(Debug)]
struct AsSource {
    identities: Arc<Identities>,
    source: SpiffeId,
}

impl ResolvesClientCert for AsSource {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.identities.get(&self.source)?.key)
    }

    fn has_certs(&self) -> bool {
        self.identities.get(&self.source).is_some()
    }
}

/// Chains the server's certificate to the mesh root and requires its SPIFFE ID to be the
/// expected destination (SPIFFE certificates carry no DNS name to check).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match spiffe_id_of(end_entity) {
            Ok(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(id) => Err(rustls::Error::General(format!(
                "the server is {id}, not {}",
                self.expected
            ))),
            Err(e) => Err(rustls::Error::General(e.to_string())),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why a handshake was refused, as the `reason` label of the refusal counter.
pub fn refusal_reason(err: &std::io::Error) -> &'static str {
    let text = err.to_string();
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::NoCertificatesPresented) => "no_certificate",
        Some(rustls::Error::InvalidCertificate(cert)) => {
            match cert {
                rustls::CertificateError::UnknownIssuer
                | rustls::CertificateError::BadSignature => "untrusted_root",
                rustls::CertificateError::Expired
                | rustls::CertificateError::ExpiredContext { .. } => "expired",
                rustls::CertificateError::NotValidYet
                | rustls::CertificateError::NotValidYetContext { .. } => "not_yet_valid",
                _ => "bad_certificate",
            }
        }
        Some(rustls::Error::PeerIncompatible(_)) | Some(rustls::Error::NoApplicationProtocol) => {
            "incompatible"
        }
        _ if text.contains("CertificateRequired") || text.contains("certificate required") => {
            "no_certificate"
        }
        _ => "handshake_failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_names_the_destination_identity() {
        let id = SpiffeId::new("cluster.local", "demo", "web");
        assert_eq!(sni_for(&id), "web.demo.sa.mesh");
        assert_eq!(
            identity_from_sni("web.demo.sa.mesh", "cluster.local"),
            Some(id)
        );
        assert_eq!(identity_from_sni("example.com", "cluster.local"), None);
    }

    #[test]
    fn service_accounts_with_dots_and_dashes_round_trip() {
        let longest_label = "a".repeat(63);
        let many_labels = ["x1"; 60].join(".");
        for (ns, sa) in [
            ("shop", "api.v1"),
            ("payments-prod", "svc.payments-v2.internal"),
            ("a", "b"),
            ("0-9", "1.2.3"),
            ("sa", "mesh.sa"),
            ("mesh", "x.sa.mesh"),
            (longest_label.as_str(), "web"),
            ("ns", many_labels.as_str()),
        ] {
            let id = SpiffeId::new("cluster.local", ns, sa);
            let sni = sni_for(&id);
            assert!(ServerName::try_from(sni.as_str()).is_ok(), "{sni}");
            assert_eq!(identity_from_sni(&sni, "cluster.local"), Some(id), "{sni}");
        }
        // Split at the first dot, this would have named `spiffe://.../ns/v1.shop/sa/api`.
        assert_eq!(
            identity_from_sni("api.v1.shop.sa.mesh", "cluster.local"),
            Some(SpiffeId::new("cluster.local", "shop", "api.v1"))
        );
    }

    #[test]
    fn an_sni_kubernetes_names_could_not_make_is_refused() {
        let long_namespace = format!("web.{}.sa.mesh", "n".repeat(64));
        let long_account = format!("{}.ns.sa.mesh", ["a"; 128].join("."));
        for sni in [
            "sa.mesh",
            ".sa.mesh",
            "demo.sa.mesh",
            ".demo.sa.mesh",
            "web..demo.sa.mesh",
            "web.demo..sa.mesh",
            "web.-demo.sa.mesh",
            "web-.demo.sa.mesh",
            "Web.demo.sa.mesh",
            "web_1.demo.sa.mesh",
            "web.demo.sa.mesh.evil",
            "web.demo.sa.mesh.",
            long_namespace.as_str(),
            long_account.as_str(),
        ] {
            assert_eq!(identity_from_sni(sni, "cluster.local"), None, "{sni}");
        }
    }

    #[test]
    fn names_too_long_for_an_sni_fail_closed_at_the_client() {
        let id = SpiffeId::new("cluster.local", "demo", &["a"; 125].join("."));
        assert!(ServerName::try_from(sni_for(&id)).is_err());
    }
}
