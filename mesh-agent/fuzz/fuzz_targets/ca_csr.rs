//! The CA's handling of a signing request (`identity::ca::sign_request`): the JSON body a
//! node sends (`{"identity": "spiffe://...", "csr": "-----BEGIN CERTIFICATE REQUEST..."}`),
//! the SPIFFE ID, the CSR's PEM, DER, signature and extensions. The node is taken as
//! authenticated and as running pods of every identity but those of namespace `kube-system`.
//! A certificate the CA signs must carry exactly the identity asked for and be no CA.

#![no_main]

use std::{sync::LazyLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use mesh_agent::identity::{
    ca::sign_request,
    spiffe::{spiffe_id_of, CaKeys},
};
use rustls_pki_types::{pem::PemObject, CertificateDer};

const TRUST_DOMAIN: &str = "cluster.local";

static KEYS: LazyLock<CaKeys> = LazyLock::new(|| CaKeys::generate(TRUST_DOMAIN).expect("a CA key"));

fuzz_target!(|data: &[u8]| {
    let answer = sign_request(&KEYS, TRUST_DOMAIN, Duration::from_secs(3600), data, |id| {
        id.namespace != "kube-system"
    });
    let Ok((id, response)) = answer else {
        return;
    };
    assert_eq!(id.trust_domain, TRUST_DOMAIN);
    assert_ne!(
        id.namespace, "kube-system",
        "signed for a node without such pods"
    );
    let der = CertificateDer::from_pem_slice(response.certificate.as_bytes())
        .expect("the CA's certificate is PEM");
    assert_eq!(
        spiffe_id_of(&der).expect("the certificate carries a SPIFFE ID"),
        id,
        "signed another identity"
    );
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("the certificate parses");
    assert!(!cert.is_ca(), "signed a CA certificate");
    let names = cert
        .subject_alternative_name()
        .expect("one SAN extension")
        .map_or(0, |san| san.value.general_names.len());
    assert_eq!(names, 1, "signed more names than the identity");
});
