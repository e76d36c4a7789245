//! Workload identity: SPIFFE IDs (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`), the mesh CA's
//! key material (a root, persisted or supplied by the operator; workload SVIDs signed from
//! CSRs), and reading identity, serial and validity back from certificates.

use std::{fmt, path::Path, str::FromStr, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    BadSpiffeId(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("the CSR asks for {asked}, not {expected}")]
    WrongIdentity { asked: String, expected: String },
    #[error("CA files in {dir}: {message}")]
    Files { dir: String, message: String },
}

type Result<T> = std::result::Result<T, IdentityError>;

fn cert_error(e: impl fmt::Display) -> IdentityError {
    IdentityError::Certificate(e.to_string())
}

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(text: &str) -> Result<SpiffeId> {
        let bad = || IdentityError::BadSpiffeId(text.to_owned());
        let rest = text.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if [td, ns, sa].iter().all(|p| !p.is_empty()) => {
                Ok(SpiffeId::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

/// What a certificate says about itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertificateFacts {
    pub spiffe_id: Option<String>,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub issuer: String,
}

pub fn facts(der: &[u8]) -> Result<CertificateFacts> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(cert_error)?;
    let spiffe_id = cert
        .subject_alternative_name()
        .map_err(cert_error)?
        .and_then(|san| {
            san.value.general_names.iter().find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                    Some((*uri).to_owned())
                }
                _ => None,
            })
        });
    Ok(CertificateFacts {
        spiffe_id,
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        issuer: cert.issuer().to_string(),
    })
}

/// The SPIFFE ID a certificate carries in its URI SAN.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId> {
    facts(der)?
        .spiffe_id
        .ok_or_else(|| cert_error("no spiffe:// URI SAN"))?
        .parse()
}

/// A certificate serial: 16 random bytes with the top bit cleared, so a positive DER
/// integer of at most 16 octets (RFC 5280 asks for positive and at most 20) that nobody
/// can predict, as the CA/Browser Forum asks of public CAs (64 random bits at least) so
/// that a chosen-prefix collision cannot be aimed at a certificate before it is signed.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| cert_error("the system has no randomness for a serial"))?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from(bytes.to_vec()))
}

/// A new key and a CSR for `id`; the key never leaves the caller.
pub fn new_csr(id: &SpiffeId) -> Result<(KeyPair, String)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_error)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(cert_error)?)];
    let csr = params.serialize_request(&key).map_err(cert_error)?;
    Ok((key, csr.pem().map_err(cert_error)?))
}

/// The mesh CA's signing material.
pub struct CaKeys {
    pub root_pem: String,
    root: rcgen::Certificate,
    key: KeyPair,
}

impl CaKeys {
    pub fn generate(trust_domain: &str) -> Result<CaKeys> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params
            .distinguished_name
            .push(DnType::CommonName, "mesh root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial()?);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let root = params.self_signed(&key).map_err(cert_error)?;
        Ok(CaKeys {
            root_pem: root.pem(),
            root,
            key,
        })
    }

    /// Uses an operator's root (or intermediate) certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CaKeys> {
        let key = KeyPair::from_pem(key_pem).map_err(cert_error)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem).map_err(cert_error)?;
        // Re-signing the parameters only gives rcgen an issuer to sign with; the trust
        // anchor handed out stays the given PEM.
        let root = params.self_signed(&key).map_err(cert_error)?;
        Ok(CaKeys {
            root_pem: cert_pem.to_owned(),
            root,
            key,
        })
    }

    /// The root in `dir` (`root-cert.pem`, `root-key.pem`), created on first use, so that a
    /// restarted CA keeps the same trust anchor.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<CaKeys> {
        let files = |message: String| IdentityError::Files {
            dir: dir.display().to_string(),
            message,
        };
        let cert_path = dir.join("root-cert.pem");
        let key_path = dir.join("root-key.pem");
        if cert_path.exists() && key_path.exists() {
            let cert = std::fs::read_to_string(&cert_path).map_err(|e| files(e.to_string()))?;
            let key = std::fs::read_to_string(&key_path).map_err(|e| files(e.to_string()))?;
            return CaKeys::from_pem(&cert, &key);
        }
        let keys = CaKeys::generate(trust_domain)?;
        std::fs::create_dir_all(dir).map_err(|e| files(e.to_string()))?;
        write_private(&key_path, &keys.key.serialize_pem()).map_err(|e| files(e.to_string()))?;
        std::fs::write(&cert_path, &keys.root_pem).map_err(|e| files(e.to_string()))?;
        Ok(keys)
    }

    /// Signs a workload CSR for `expected`, which the CSR must ask for exactly.
    pub fn sign_csr(&self, csr_pem: &str, expected: &SpiffeId, ttl: Duration) -> Result<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(cert_error)?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [expected.to_string()] {
            return Err(IdentityError::WrongIdentity {
                asked: asked.join(", "),
                expected: expected.to_string(),
            });
        }
        let now = OffsetDateTime::now_utc();
        let params = &mut csr.params;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        // A minute of slack for clocks that disagree a little.
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::try_from(ttl).map_err(cert_error)?;
        let cert = csr.signed_by(&self.root, &self.key).map_err(cert_error)?;
        Ok(cert.pem())
    }

    /// A server certificate for the CA's own API, for `name` and `ip`.
    pub fn server_certificate(&self, name: &str, ip: std::net::IpAddr) -> Result<(String, String)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_error)?;
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(cert_error)?;
        params.subject_alt_names.push(SanType::IpAddress(ip));
        params.serial_number = Some(random_serial()?);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        let cert = params
            .signed_by(&key, &self.root, &self.key)
            .map_err(cert_error)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A certificate for `id` valid from `not_before` to `not_after` (tests of refusals).
    pub fn sign_with_validity(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(cert_error)?;
        csr.params.subject_alt_names =
            vec![SanType::URI(id.to_string().try_into().map_err(cert_error)?)];
        csr.params.serial_number = Some(random_serial()?);
        csr.params.not_before = not_before;
        csr.params.not_after = not_after;
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        Ok(csr
            .signed_by(&self.root, &self.key)
            .map_err(cert_error)?
            .pem())
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_bad_ones_are_refused() {
        let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/web"
            .parse()
            .expect("valid");
        assert_eq!(id, SpiffeId::new("cluster.local", "demo", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/web");
        for bad in [
            "spiffe://cluster.local/ns/demo",
            "http://x/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_ca_signs_exactly_the_identity_asked_for() {
        let ca = CaKeys::generate("cluster.local").expect("root");
        let web = SpiffeId::new("cluster.local", "demo", "web");
        let (_key, csr) = new_csr(&web).expect("csr");
        let pem = ca
            .sign_csr(&csr, &web, Duration::from_secs(3600))
            .expect("signed");
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer| c.to_vec())
            .expect("pem");
        assert_eq!(spiffe_id_of(&der).expect("id"), web);
        let facts = facts(&der).expect("facts");
        assert!((3500..=3700).contains(&(facts.not_after - facts.not_before)));
        let other = SpiffeId::new("cluster.local", "demo", "admin");
        assert!(matches!(
            ca.sign_csr(&csr, &other, Duration::from_secs(60)),
            Err(IdentityError::WrongIdentity { .. })
        ));
    }

    #[test]
    fn serials_are_random_positive_and_at_most_16_octets() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let serial = random_serial().expect("serial");
            let bytes = serial.as_ref();
            assert_eq!(bytes.len(), 16);
            assert_eq!(bytes[0] & 0x80, 0, "{serial}");
            assert!(seen.insert(bytes.to_vec()), "{serial} twice");
        }
    }

    #[test]
    fn signed_certificates_carry_distinct_positive_serials() {
        let ca = CaKeys::generate("cluster.local").expect("root");
        let web = SpiffeId::new("cluster.local", "demo", "web");
        let (_key, csr) = new_csr(&web).expect("csr");
        let serials: Vec<Vec<u8>> = (0..2)
            .map(|_| {
                let pem = ca
                    .sign_csr(&csr, &web, Duration::from_secs(60))
                    .expect("signed");
                let der: rustls_pki_types::CertificateDer =
                    rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).expect("pem");
                let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
                cert.raw_serial().to_vec()
            })
            .collect();
        for serial in &serials {
            // DER content octets: a positive integer, minimal, within RFC 5280's 20.
            assert!((1..=20).contains(&serial.len()), "{serial:?}");
            assert_eq!(serial[0] & 0x80, 0, "{serial:?}");
        }
        assert_ne!(serials[0], serials[1], "the same CSR signed twice");
    }

    #[test]
    fn a_persisted_root_is_reloaded_unchanged() {
        let dir = std::env::temp_dir().join(format!("mesh-ca-test-{}", std::process::id()));
        let first = CaKeys::load_or_create(&dir, "cluster.local").expect("create");
        let second = CaKeys::load_or_create(&dir, "cluster.local").expect("load");
        assert_eq!(first.root_pem, second.root_pem);
        let web = SpiffeId::new("cluster.local", "demo", "web");
        let (_key, csr) = new_csr(&web).expect("csr");
        second
            .sign_csr(&csr, &web, Duration::from_secs(60))
            .expect("signs with the reloaded key");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
