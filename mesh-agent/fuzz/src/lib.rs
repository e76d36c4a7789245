//! What the fuzz targets share: request heads built from text the way the proxy is handed
//! them (hyper's HTTP/1 parser is `httparse`; the h2 crate builds a head from its
//! pseudo-headers), the test cluster, and fixed key material.
//!
//! Inputs are text so that the repository's test data and hand-written seeds are corpus
//! entries as they are:
//!
//! - an HTTP/1 head is its bytes (`GET /p HTTP/1.1\r\nHost: svc\r\n\r\n`); a head cut short
//!   is completed with the blank line, so mutations need not keep it;
//! - an HTTP/2 head is one field per line, pseudo-headers first (`:method: GET`,
//!   `:scheme: http`, `:authority: svc`, `:path: /p`, then `name: value`);
//! - lines starting with `@` are settings of the target, not part of the head.

use std::sync::Arc;

use http::{
    request::Parts,
    uri::{self, Authority, PathAndQuery, Scheme},
    HeaderName, HeaderValue, Method, Request, Uri, Version,
};
use mesh_agent::{
    config::jwks::{parse_jwks, Jwk, Jwks, KeyMaterial},
    model::security::{KeySource, Location, TokenRule},
};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// The most header fields a head is read with (hyper's HTTP/1 server reads 100).
const MAX_HEADERS: usize = 100;

/// The cluster the tunnel target plans against; node-a is this node.
pub const CLUSTER: &str = include_str!("../seeds/config_loader/cluster.yaml");

/// The issuer of the repository's JWT test data.
pub const ISSUER: &str = "testing@secure.istio.io";

/// The JWKS of the repository's JWT test data (one RSA key).
pub const TEST_JWKS: &str = include_str!("../../tests/testdata/jwt/jwks.json");

/// Tokens of the repository's JWT test data, signed by [`TEST_JWKS`]'s key.
pub const TEST_TOKENS: [&str; 2] = [
    include_str!("../../tests/testdata/jwt/demo.jwt"),
    include_str!("../../tests/testdata/jwt/groups-scope.jwt"),
];

/// The clock the JWT targets judge `exp` and `nbf` by (November 2023): the test tokens
/// are valid then.
pub const NOW: u64 = 1_700_000_000;

/// A request head from `text`: HTTP/2 when it starts with a pseudo-header, HTTP/1
/// otherwise. `None` for what hyper or h2 would refuse before the proxy sees a head.
pub fn head(text: &[u8]) -> Option<Parts> {
    if text.starts_with(b":") {
        h2_head(text)
    } else {
        h1_head(text).or_else(|| {
            let mut completed = text.to_vec();
            completed.extend_from_slice(b"\r\n\r\n");
            h1_head(&completed)
        })
    }
}

/// An HTTP/1 head as hyper builds it from `httparse`'s reading of a complete head.
fn h1_head(text: &[u8]) -> Option<Parts> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    if !request.parse(text).ok()?.is_complete() {
        return None;
    }
    let method = Method::from_bytes(request.method?.as_bytes()).ok()?;
    let uri =
        Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(request.path?.as_bytes())).ok()?;
    let version = match request.version? {
        0 => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut builder = Request::builder().method(method).uri(uri).version(version);
    for field in request.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(field.value).ok()?;
        builder = builder.header(name, value);
    }
    Some(builder.body(()).ok()?.into_parts().0)
}

/// The fields of a text head: `(name, value)` per line, `@` settings and empty lines left
/// out, a `\r` before the line end dropped.
fn fields(text: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    text.split(|b| *b == b'\n').filter_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line.starts_with(b"@") {
            return None;
        }
        // A pseudo-header's name starts with its colon.
        let from = usize::from(line.starts_with(b":"));
        let colon = from + line[from..].iter().position(|b| *b == b':')?;
        let value = &line[colon + 1..];
        Some((&line[..colon], value.strip_prefix(b" ").unwrap_or(value)))
    })
}

/// The value of setting `@name value` in `text`.
pub fn setting<'a>(text: &'a [u8], name: &str) -> Option<&'a [u8]> {
    text.split(|b| *b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.strip_prefix(b"@")?
            .strip_prefix(name.as_bytes())?
            .strip_prefix(b" ")
    })
}

/// An HTTP/2 head as the h2 crate's server builds it (`convert_poll_message`): `:method`
/// required; `:scheme` and `:path` required but for CONNECT, which must have neither
/// (extended CONNECT, with `:protocol`, has both); `:scheme` kept only with an
/// `:authority`; field names in lower case.
fn h2_head(text: &[u8]) -> Option<Parts> {
    let (mut method, mut scheme, mut authority, mut path, mut protocol) =
        (None, None, None, None, false);
    let mut regular = Vec::new();
    for (name, value) in fields(text) {
        let slot = match name {
            b":method" => &mut method,
            b":scheme" => &mut scheme,
            b":authority" => &mut authority,
            b":path" => &mut path,
            b":protocol" => {
                protocol = true;
                continue;
            }
            _ if name.starts_with(b":") => return None,
            _ => {
                // Pseudo-headers come first.
                regular.push((
                    HeaderName::from_lowercase(name).ok()?,
                    HeaderValue::from_bytes(value).ok()?,
                ));
                continue;
            }
        };
        if !regular.is_empty() || slot.replace(value).is_some() {
            return None;
        }
    }
    let method = Method::from_bytes(method?).ok()?;
    let connect = method == Method::CONNECT && !protocol;
    let mut parts = uri::Parts::default();
    if let Some(authority) = authority {
        parts.authority = Some(Authority::try_from(authority).ok()?);
    }
    match scheme {
        Some(_) if connect => return None,
        Some(scheme) => {
            let scheme = Scheme::try_from(scheme).ok()?;
            if parts.authority.is_some() {
                parts.scheme = Some(scheme);
            }
        }
        None if !connect => return None,
        None => {}
    }
    match path {
        Some(_) if connect => return None,
        Some(b"") => return None,
        Some(path) => parts.path_and_query = Some(PathAndQuery::try_from(path).ok()?),
        None if method == Method::CONNECT && protocol => return None,
        None => {}
    }
    let mut builder = Request::builder()
        .method(method)
        .uri(Uri::from_parts(parts).ok()?)
        .version(Version::HTTP_2);
    for (name, value) in regular {
        builder = builder.header(name, value);
    }
    Some(builder.body(()).ok()?.into_parts().0)
}

/// The Ed25519 key the targets sign tokens with: fixed, so a crash reproduces.
pub fn signing_key() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("a 32-byte seed is a key")
}

/// [`signing_key`]'s public half as a JWK (kid `fuzz`).
pub fn signing_jwk() -> Jwk {
    Jwk {
        kid: Some("fuzz".into()),
        alg: None,
        key: KeyMaterial::Ed25519(signing_key().public_key().as_ref().to_vec()),
    }
}

/// A token of `header` and `claims` (JSON texts, encoded as they are) signed by
/// [`signing_key`].
pub fn sign_token(header: &[u8], claims: &[u8]) -> String {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = signing_key().sign(signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// The keys of the repository's test data and [`signing_jwk`].
pub fn test_keys() -> Jwks {
    let mut jwks = parse_jwks(TEST_JWKS).expect("the test JWKS parses");
    jwks.keys.push(signing_jwk());
    jwks
}

/// RequestAuthentication rules as compiled from configuration: Istio's default locations
/// for [`ISSUER`] with output headers, and a second issuer with an audience, read from a
/// header without prefix and from a cookie.
pub fn token_rules(keys: Jwks) -> Vec<Arc<TokenRule>> {
    let keys = Arc::new(keys);
    vec![
        Arc::new(TokenRule {
            policy: "shop/default".into(),
            issuer: ISSUER.into(),
            audiences: Vec::new(),
            keys: KeySource::Inline(keys.clone()),
            locations: vec![
                Location::Header {
                    name: "authorization".into(),
                    prefix: "Bearer ".into(),
                },
                Location::Param("access_token".into()),
            ],
            output_payload_to_header: Some("x-jwt-payload".into()),
            output_claim_to_headers: vec![
                ("x-jwt-foo".into(), "foo".into()),
                ("x-jwt-groups".into(), "groups".into()),
            ],
            forward_original_token: false,
        }),
        Arc::new(TokenRule {
            policy: "shop/audience".into(),
            issuer: "fuzz-issuer".into(),
            audiences: vec!["mesh".into(), "shop".into()],
            keys: KeySource::Inline(keys),
            locations: vec![
                Location::Header {
                    name: "x-token".into(),
                    prefix: String::new(),
                },
                Location::Cookie("session".into()),
            ],
            output_payload_to_header: None,
            output_claim_to_headers: vec![("x-jwt-sub".into(), "sub".into())],
            forward_original_token: true,
        }),
    ]
}
