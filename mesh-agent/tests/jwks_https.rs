//! `https` `jwksUri`s: keys are fetched from a server whose certificate the system trust
//! store vouches for, and refused from one it does not. A test binary of its own, as the
//! trust store is chosen for the whole process (`SSL_CERT_FILE`).

use std::{path::Path, sync::Arc};

use mesh_agent::{model::MeshState, policy::jwks};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A certificate authority named `name` and a server certificate for 127.0.0.1 it
/// signed.
struct Pki {
    root_pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
}

fn pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let server_key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("server params");
    let server_cert = server
        .signed_by(&server_key, &ca_cert, &ca_key)
        .expect("server certificate");
    Pki {
        root_pem: ca_cert.pem(),
        server_chain: vec![server_cert.der().clone()],
        server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()).into(),
    }
}

/// Serves `body` over TLS with `pki`'s server certificate; returns the JWKS URI.
async fn serve(pki: &Pki, body: String) -> String {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // A handshake the client refuses ends here; the next client is served.
            let Ok(mut tls) = acceptor.accept(stream).await else {
                continue;
            };
            let mut buffer = [0u8; 4096];
            let _ = tls.read(&mut buffer).await;
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.write_all(reply.as_bytes()).await;
            let _ = tls.shutdown().await;
        }
    });
    format!("https://{address}/jwks.json")
}

#[tokio::test]
async fn https_keys_are_fetched_only_from_a_server_the_trust_store_vouches_for() {
    let trusted = pki("trusted root");
    let stranger = pki("stranger root");
    let store = std::env::temp_dir().join(format!("mesh-jwks-roots-{}.pem", std::process::id()));
    std::fs::write(&store, &trusted.root_pem).expect("trust store");
    // Before any fetch and in the only test of this binary: no other thread reads it.
    std::env::set_var("SSL_CERT_FILE", &store);
    let body = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/jwt/jwks.json"),
    )
    .expect("Istio's JWKS");

    let keys = jwks::fetch(&serve(&trusted, body.clone()).await, &MeshState::default())
        .await
        .expect("fetched over https");
    assert_eq!(keys.len(), 1, "Istio's one key");

    let refused = jwks::fetch(&serve(&stranger, body).await, &MeshState::default())
        .await
        .expect_err("a certificate of another authority is refused");
    let message = format!("{refused:#}");
    assert!(message.contains("UnknownIssuer"), "{message}");
    let _ = std::fs::remove_file(&store);
}
