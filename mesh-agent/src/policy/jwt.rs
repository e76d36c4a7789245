//! RequestAuthentication: JSON Web Tokens found where `jwtRules` say (by default the
//! `Authorization: Bearer` header and the `access_token` parameter), verified against the
//! rule's JWKS (inline, or fetched from `jwksUri` and cached by [`JwksCache`]) with
//! RS256/384/512, PS256/384/512, ES256/384 or EdDSA; symmetric and `none` algorithms are
//! refused. A request without a token passes with no `request.auth` facts; a request with
//! a token that does not verify is refused (401).

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::Value;

use crate::{
    config::jwks::{b64, Jwk, Jwks, KeyMaterial},
    model::security::{KeySource, Location, TokenRule},
    policy::{authz::AuthFacts, path::escaped_byte},
};

/// Tokens longer than this are refused without being parsed.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Tolerated clock difference for `exp` and `nbf`, as Envoy's default.
const CLOCK_SKEW_SECONDS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("the token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not accepted")]
    Algorithm(String),
    #[error("no issuer {0:?} is configured for this workload")]
    UnknownIssuer(String),
    #[error("no key of the issuer's JWKS matches kid {kid:?} and alg {alg}")]
    UnknownKey { kid: Option<String>, alg: String },
    #[error("the issuer's JWKS is not available yet")]
    NoKeys,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the token expired at {0}")]
    Expired(u64),
    #[error("the token is not valid before {0}")]
    NotYetValid(u64),
    #[error("the token's audiences {0:?} are not accepted")]
    Audience(Vec<String>),
    /// More than one token where the rules look: two `Authorization` headers, a parameter
    /// given twice, or a header and a parameter. Which one the workload reads is its own
    /// choice, so verifying one of them proves nothing about the other.
    #[error("the request carries {0} tokens where one is expected")]
    Ambiguous(usize),
}

impl JwtError {
    /// The `reason` label of `mesh_jwt_validations_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::TooLarge => "too_large",
            JwtError::Malformed(_) => "malformed",
            JwtError::Algorithm(_) => "bad_algorithm",
            JwtError::UnknownIssuer(_) => "unknown_issuer",
            JwtError::UnknownKey { .. } => "unknown_key",
            JwtError::NoKeys => "no_keys",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired(_) => "expired",
            JwtError::NotYetValid(_) => "not_yet_valid",
            JwtError::Audience(_) => "wrong_audience",
            JwtError::Ambiguous(_) => "ambiguous_token",
        }
    }
}

fn verify_with(jwk: &Jwk, alg: &str, message: &[u8], sig: &[u8]) -> Option<bool> {
    let rsa = |params: &'static signature::RsaParameters, n: &[u8], e: &[u8]| {
        RsaPublicKeyComponents { n, e }
            .verify(params, message, sig)
            .is_ok()
    };
    let unparsed = |alg: &'static dyn signature::VerificationAlgorithm, key: &[u8]| {
        UnparsedPublicKey::new(alg, key)
            .verify(message, sig)
            .is_ok()
    };
    Some(match (&jwk.key, alg) {
        (KeyMaterial::Rsa { n, e }, "RS256") => rsa(&signature::RSA_PKCS1_2048_8192_SHA256, n, e),
        (KeyMaterial::Rsa { n, e }, "RS384") => rsa(&signature::RSA_PKCS1_2048_8192_SHA384, n, e),
        (KeyMaterial::Rsa { n, e }, "RS512") => rsa(&signature::RSA_PKCS1_2048_8192_SHA512, n, e),
        (KeyMaterial::Rsa { n, e }, "PS256") => rsa(&signature::RSA_PSS_2048_8192_SHA256, n, e),
        (KeyMaterial::Rsa { n, e }, "PS384") => rsa(&signature::RSA_PSS_2048_8192_SHA384, n, e),
        (KeyMaterial::Rsa { n, e }, "PS512") => rsa(&signature::RSA_PSS_2048_8192_SHA512, n, e),
        (KeyMaterial::Ec { p384: false, point }, "ES256") => {
            unparsed(&signature::ECDSA_P256_SHA256_FIXED, point)
        }
        (KeyMaterial::Ec { p384: true, point }, "ES384") => {
            unparsed(&signature::ECDSA_P384_SHA384_FIXED, point)
        }
        (KeyMaterial::Ed25519(key), "EdDSA") => unparsed(&signature::ED25519, key),
        _ => return None,
    })
}

const ALGORITHMS: [&str; 9] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// A token's parts, decoded but not yet trusted.
struct Token<'a> {
    signed: &'a str,
    signature: Vec<u8>,
    alg: String,
    kid: Option<String>,
    payload_b64: &'a str,
    claims: Value,
}

fn decode(token: &str) -> Result<Token<'_>, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::TooLarge);
    }
    let malformed = |what: &str| JwtError::Malformed(what.to_owned());
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("expected three dot-separated parts"));
    };
    let header: Value =
        serde_json::from_slice(&b64(header).map_err(|e| malformed(&format!("the header: {e}")))?)
            .map_err(|_| malformed("the header is not JSON"))?;
    let claims: Value =
        serde_json::from_slice(&b64(payload).map_err(|e| malformed(&format!("the payload: {e}")))?)
            .map_err(|_| malformed("the payload is not JSON"))?;
    if !claims.is_object() {
        return Err(malformed("the payload is not a JSON object"));
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("the header has no alg"))?
        .to_owned();
    Ok(Token {
        signed: &token[..token.len() - signature.len() - 1],
        signature: b64(signature).map_err(|e| malformed(&format!("the signature: {e}")))?,
        kid: header.get("kid").and_then(Value::as_str).map(str::to_owned),
        alg,
        payload_b64: payload,
        claims,
    })
}

fn audiences(claims: &Value) -> Vec<String> {
    match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.clone()],
        Some(Value::Array(auds)) => auds
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// Checks `token`'s signature with `jwks` and its time and audience claims.
fn verify(token: &Token, jwks: &Jwks, rule: &TokenRule, now: u64) -> Result<(), JwtError> {
    if !ALGORITHMS.contains(&token.alg.as_str()) {
        return Err(JwtError::Algorithm(token.alg.clone()));
    }
    if jwks.is_empty() {
        return Err(JwtError::NoKeys);
    }
    let candidates: Vec<&Jwk> = jwks
        .keys
        .iter()
        .filter(|k| token.kid.is_none() || k.kid == token.kid)
        .filter(|k| k.alg.as_ref().is_none_or(|a| *a == token.alg))
        .collect();
    let mut tried = false;
    let mut verified = false;
    for jwk in candidates {
        if let Some(ok) = verify_with(jwk, &token.alg, token.signed.as_bytes(), &token.signature) {
            tried = true;
            if ok {
                verified = true;
                break;
            }
        }
    }
    if !tried {
        return Err(JwtError::UnknownKey {
            kid: token.kid.clone(),
            alg: token.alg.clone(),
        });
    }
    if !verified {
        return Err(JwtError::BadSignature);
    }
    let time = |name: &str| token.claims.get(name).and_then(Value::as_f64);
    if let Some(exp) = time("exp") {
        if (now as f64) > exp + CLOCK_SKEW_SECONDS as f64 {
            return Err(JwtError::Expired(exp as u64));
        }
    }
    if let Some(nbf) = time("nbf") {
        if ((now + CLOCK_SKEW_SECONDS) as f64) < nbf {
            return Err(JwtError::NotYetValid(nbf as u64));
        }
    }
    if !rule.audiences.is_empty() {
        let aud = audiences(&token.claims);
        if !aud.iter().any(|a| rule.audiences.contains(a)) {
            return Err(JwtError::Audience(aud));
        }
    }
    Ok(())
}

/// What the request carries, as the token extraction needs it.
pub struct RequestParts<'a> {
    pub headers: &'a http::HeaderMap,
    pub query: Option<&'a str>,
}

/// Where in the request a token was found: the same place read by two rules (or by two
/// locations of one rule, such as one header with two prefixes) is one token, two places
/// are two.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    /// The `index`th value of header `name`.
    Header { name: String, index: usize },
    /// The `index`th `&`-separated pair of the query.
    Param(usize),
    /// The `index`th `;`-separated pair of all `Cookie` headers.
    Cookie(usize),
}

/// A header value as text. `policy::request::normalise` refuses values that are not UTF-8
/// before authentication runs; should one come here anyway, a token place the rules read
/// but cannot is refused rather than taken as "no token" (that would forward a token
/// nobody verified).
fn text(value: &http::HeaderValue) -> Result<&str, JwtError> {
    std::str::from_utf8(value.as_bytes())
        .map_err(|_| JwtError::Malformed("the token's header value is not UTF-8".into()))
}

/// A query parameter's name with its percent-escapes decoded: `access%5Ftoken` is the
/// `access_token` a backend decoding its query reads (RFC 3986 §6.2.2.2), so it must count
/// as one. An invalid escape leaves the name as it is.
fn param_name(raw: &str) -> std::borrow::Cow<'_, str> {
    if !raw.contains('%') {
        return raw.into();
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| escaped_byte(&bytes[i + 1..]))
            .flatten();
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_or(raw.into(), Into::into)
}

/// Every token `location` finds in `request`, with where it was found.
fn tokens<'a>(
    location: &Location,
    request: &RequestParts<'a>,
) -> Result<Vec<(Place, &'a str)>, JwtError> {
    let mut found = Vec::new();
    match location {
        Location::Header { name, prefix } => {
            for (index, value) in request.headers.get_all(name.as_str()).iter().enumerate() {
                let value = text(value)?;
                let token = if prefix.is_empty() {
                    value
                } else {
                    match value.get(..prefix.len()) {
                        Some(head) if head.eq_ignore_ascii_case(prefix) => &value[prefix.len()..],
                        // Another scheme (`Basic ...`): not a token for this location.
                        _ => continue,
                    }
                };
                let place = Place::Header {
                    name: name.clone(),
                    index,
                };
                found.push((place, token.trim()));
            }
        }
        Location::Param(name) => {
            let pairs = request.query.into_iter().flat_map(|q| q.split('&'));
            for (index, pair) in pairs.enumerate() {
                if let Some((key, value)) = pair.split_once('=') {
                    if param_name(key) == name.as_str() {
                        found.push((Place::Param(index), value));
                    }
                }
            }
        }
        Location::Cookie(name) => {
            let mut index = 0;
            for value in request.headers.get_all(http::header::COOKIE) {
                for pair in text(value)?.split(';') {
                    if let Some((key, value)) = pair.trim().split_once('=') {
                        if key == name {
                            found.push((Place::Cookie(index), value));
                        }
                    }
                    index += 1;
                }
            }
        }
    }
    Ok(found)
}

/// A verified token and what the rule asks done to the request.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub facts: AuthFacts,
    pub issuer: String,
    /// Headers to set on the forwarded request.
    pub set_headers: Vec<(String, String)>,
    /// The header carrying the token, removed unless `forwardOriginalToken`.
    pub remove_header: Option<String>,
}

/// Keys fetched from `jwksUri`s, by URI; the last good keys stay when a refresh fails.
#[derive(Default)]
pub struct JwksCache {
    entries: RwLock<HashMap<String, CachedKeys>>,
}

#[derive(Default)]
struct CachedKeys {
    /// The keys of the last successful fetch, and when it happened.
    keys: Option<(Arc<Jwks>, Instant)>,
    /// Fetches that failed since then, and why the last one did: an operator reading
    /// `/jwks` on the admin port sees that keys are going stale before tokens fail.
    failed_fetches: u32,
    last_error: Option<String>,
}

/// One `jwksUri` as the admin API shows it (`GET /jwks`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JwksStatus {
    pub uri: String,
    /// Keys of the last successful fetch, used while later fetches fail.
    pub keys: usize,
    /// Seconds since that fetch; `None` before the first success.
    pub fetched_seconds_ago: Option<u64>,
    /// Fetches that failed since the last success.
    pub failed_fetches: u32,
    pub last_error: Option<String>,
}

impl JwksCache {
    pub fn get(&self, uri: &str) -> Option<Arc<Jwks>> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .get(uri)
            .and_then(|c| c.keys.as_ref())
            .map(|(keys, _)| keys.clone())
    }

    /// Keeps `keys` as `uri`'s, fetched now.
    pub fn store(&self, uri: &str, keys: Jwks) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.insert(
            uri.to_owned(),
            CachedKeys {
                keys: Some((Arc::new(keys), Instant::now())),
                failed_fetches: 0,
                last_error: None,
            },
        );
    }

    /// Records a failed fetch of `uri`; its last good keys, if any, stay.
    pub fn record_failure(&self, uri: &str, error: String) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let entry = entries.entry(uri.to_owned()).or_default();
        entry.failed_fetches = entry.failed_fetches.saturating_add(1);
        entry.last_error = Some(error);
    }

    /// How long ago `uri` was last fetched successfully.
    pub fn age(&self, uri: &str) -> Option<Duration> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .get(uri)
            .and_then(|c| c.keys.as_ref())
            .map(|(_, fetched)| fetched.elapsed())
    }

    /// Every URI fetched or tried, by URI.
    pub fn statuses(&self) -> Vec<JwksStatus> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut statuses: Vec<JwksStatus> = entries
            .iter()
            .map(|(uri, c)| JwksStatus {
                uri: uri.clone(),
                keys: c.keys.as_ref().map_or(0, |(keys, _)| keys.len()),
                fetched_seconds_ago: c
                    .keys
                    .as_ref()
                    .map(|(_, fetched)| fetched.elapsed().as_secs()),
                failed_fetches: c.failed_fetches,
                last_error: c.last_error.clone(),
            })
            .collect();
        statuses.sort_by(|a, b| a.uri.cmp(&b.uri));
        statuses
    }
}

pub fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Applies `rules` to a request: `Ok(None)` when it carries no token any rule looks for,
/// `Ok(Some(..))` for a token that verifies, an error for any other token and for more
/// than one token ([`JwtError::Ambiguous`]).
pub fn authenticate(
    rules: &[Arc<TokenRule>],
    cache: &JwksCache,
    request: &RequestParts,
    now: u64,
) -> Result<Option<Authenticated>, JwtError> {
    // One token at most, wherever the rules look: Istio leaves requests with several
    // undefined ("requests with more than one token are not supported, the output
    // principal of such requests is undefined", istio/api#2220), and Envoy's jwt_authn
    // verifies all of them since envoyproxy/envoy#12089 because a valid token beside an
    // invalid one let the backend read the invalid one. Refusing the request is the same
    // answer (401) for the attack and needs no guess at which token the principal is.
    let mut places: Vec<Place> = Vec::new();
    for location in rules.iter().flat_map(|r| &r.locations) {
        for (place, _) in tokens(location, request)? {
            if !places.contains(&place) {
                places.push(place);
            }
        }
    }
    if places.len() > 1 {
        return Err(JwtError::Ambiguous(places.len()));
    }
    let mut presented: Option<JwtError> = None;
    for rule in rules {
        for location in &rule.locations {
            let Some(&(_, raw)) = tokens(location, request)?.first() else {
                continue;
            };
            let token = decode(raw)?;
            let issuer = token
                .claims
                .get("iss")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if issuer != rule.issuer {
                presented.get_or_insert(JwtError::UnknownIssuer(issuer.to_owned()));
                continue;
            }
            let jwks = match &rule.keys {
                KeySource::Inline(keys) => Some(keys.clone()),
                KeySource::Uri { uri, .. } => cache.get(uri),
                KeySource::Invalid => None,
            };
            let jwks = jwks.unwrap_or_default();
            verify(&token, &jwks, rule, now)?;
            return Ok(Some(accepted(rule, location, &token)));
        }
    }
    presented.map_or(Ok(None), Err)
}

fn accepted(rule: &TokenRule, location: &Location, token: &Token) -> Authenticated {
    let claim = |name: &str| token.claims.get(name).and_then(Value::as_str);
    let issuer = claim("iss").unwrap_or_default().to_owned();
    let facts = AuthFacts {
        principal: format!("{issuer}/{}", claim("sub").unwrap_or_default()),
        audiences: audiences(&token.claims),
        presenter: claim("azp").map(str::to_owned),
        claims: token.claims.clone(),
    };
    let mut set_headers = Vec::new();
    if let Some(header) = &rule.output_payload_to_header {
        set_headers.push((header.clone(), token.payload_b64.to_owned()));
    }
    for (header, name) in &rule.output_claim_to_headers {
        let value = match token.claims.get(name) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(","),
            Some(other) => other.to_string(),
            None => continue,
        };
        set_headers.push((header.clone(), value));
    }
    let remove_header = match location {
        Location::Header { name, .. } if !rule.forward_original_token => Some(name.clone()),
        _ => None,
    };
    Authenticated {
        facts,
        issuer,
        set_headers,
        remove_header,
    }
}

/// Headers a verified token would set: removed from requests without one, so a client
/// cannot pose as authenticated by sending them itself.
pub fn output_headers(rules: &[Arc<TokenRule>]) -> Vec<String> {
    rules
        .iter()
        .flat_map(|r| {
            r.output_payload_to_header
                .iter()
                .cloned()
                .chain(r.output_claim_to_headers.iter().map(|(h, _)| h.clone()))
        })
        .collect()
}

/// Every `jwksUri` of the rules, with its fetch timeout.
pub fn uris(rules: &[Arc<TokenRule>]) -> Vec<(String, Duration)> {
    rules
        .iter()
        .filter_map(|r| match &r.keys {
            KeySource::Uri { uri, timeout } => Some((uri.clone(), *timeout)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule reading `locations`; its keys never matter here: every case below is settled
    /// before a signature is checked.
    fn rule(issuer: &str, locations: Vec<Location>) -> Arc<TokenRule> {
        Arc::new(TokenRule {
            policy: "default/ra".into(),
            issuer: issuer.into(),
            audiences: Vec::new(),
            keys: KeySource::Invalid,
            locations,
            output_payload_to_header: None,
            output_claim_to_headers: Vec::new(),
            forward_original_token: false,
        })
    }

    fn authorization() -> Location {
        Location::Header {
            name: "authorization".into(),
            prefix: "Bearer ".into(),
        }
    }

    /// Istio's default locations.
    fn defaults(issuer: &str) -> Arc<TokenRule> {
        rule(
            issuer,
            vec![authorization(), Location::Param("access_token".into())],
        )
    }

    fn run(
        rules: &[Arc<TokenRule>],
        headers: &[(&str, &str)],
        query: Option<&str>,
    ) -> Result<Option<Authenticated>, JwtError> {
        let mut map = http::HeaderMap::new();
        for (name, value) in headers {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                http::HeaderValue::from_str(value).expect("value"),
            );
        }
        let request = RequestParts {
            headers: &map,
            query,
        };
        authenticate(rules, &JwksCache::default(), &request, 0)
    }

    fn ambiguous(result: Result<Option<Authenticated>, JwtError>) -> Option<usize> {
        match result {
            Err(JwtError::Ambiguous(n)) => Some(n),
            _ => None,
        }
    }

    /// A well-formed token of issuer `iss` (unsigned: it fails at the keys, which shows it
    /// was found and taken alone).
    fn token(iss: &str) -> String {
        use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#);
        let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"iss":"{iss}","sub":"alice"}}"#));
        format!("{header}.{claims}.c2ln")
    }

    #[test]
    fn two_authorization_headers_are_ambiguous() {
        let (a, b) = (token("a"), token("a"));
        let rules = [defaults("a")];
        let headers = [
            ("authorization", format!("Bearer {a}")),
            ("authorization", format!("Bearer {b}")),
        ];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(ambiguous(run(&rules, &headers, None)), Some(2));
        assert_eq!(JwtError::Ambiguous(2).reason(), "ambiguous_token");
    }

    #[test]
    fn a_parameter_given_twice_is_ambiguous_even_when_encoded() {
        let rules = [defaults("a")];
        let t = token("a");
        let twice = format!("access_token={t}&x=1&access_token={t}");
        assert_eq!(ambiguous(run(&rules, &[], Some(&twice))), Some(2));
        let encoded = format!("access_token={t}&access%5Ftoken=other");
        assert_eq!(ambiguous(run(&rules, &[], Some(&encoded))), Some(2));
    }

    #[test]
    fn parameter_names_decode_only_valid_escapes() {
        assert_eq!(param_name("access%5ftoken"), "access_token");
        // Not escapes (a sign is not a hex digit): the name stays as it is.
        for raw in [
            "access%+5Ftoken",
            "access%-5token",
            "access_token%",
            "access%5",
        ] {
            assert_eq!(param_name(raw), raw, "{raw:?}");
        }
    }

    #[test]
    fn a_header_and_a_parameter_are_ambiguous() {
        let rules = [defaults("a")];
        let t = token("a");
        let bearer = format!("Bearer {t}");
        let query = format!("access_token={t}");
        assert_eq!(
            ambiguous(run(&rules, &[("authorization", &bearer)], Some(&query))),
            Some(2)
        );
        // A token in a place one rule reads and one in a place another rule reads.
        let rules = [
            rule("a", vec![authorization()]),
            rule("b", vec![Location::Cookie("session".into())]),
        ];
        let cookie = format!("theme=dark; session={t}");
        assert_eq!(
            ambiguous(run(
                &rules,
                &[("authorization", &bearer), ("cookie", &cookie)],
                None
            )),
            Some(2)
        );
        let cookies = [
            ("cookie", format!("session={t}")),
            ("cookie", format!("session={t}")),
        ];
        let cookies: Vec<(&str, &str)> = cookies.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(ambiguous(run(&rules, &cookies, None)), Some(2));
    }

    #[test]
    fn one_place_read_by_several_rules_is_one_token() {
        // Two issuers with the default locations both read `Authorization`: one token, and
        // it is judged by the rule of its issuer (here it fails at the keys, not before).
        let rules = [defaults("a"), defaults("b")];
        let bearer = format!("Bearer {}", token("b"));
        assert_eq!(
            run(&rules, &[("authorization", &bearer)], None).map(|_| ()),
            Err(JwtError::NoKeys)
        );
        // One header read with two prefixes is still one place.
        let rules = [rule(
            "b",
            vec![
                authorization(),
                Location::Header {
                    name: "authorization".into(),
                    prefix: String::new(),
                },
            ],
        )];
        assert_eq!(
            run(&rules, &[("authorization", &bearer)], None).map(|_| ()),
            Err(JwtError::NoKeys)
        );
    }

    #[test]
    fn a_value_of_another_scheme_is_not_a_token() {
        // `Basic` first and `Bearer` second: the bearer token is found (it used to be
        // missed, the first value only was read, and forwarded unverified).
        let rules = [defaults("a")];
        let bearer = format!("Bearer {}", token("a"));
        assert_eq!(
            run(
                &rules,
                &[
                    ("authorization", "Basic YWxpY2U6cHc="),
                    ("authorization", &bearer)
                ],
                None
            )
            .map(|_| ()),
            Err(JwtError::NoKeys)
        );
        assert!(matches!(
            run(&rules, &[("authorization", "Basic YWxpY2U6cHc=")], None),
            Ok(None)
        ));
        // Parameters other rules do not read are no tokens either.
        assert!(matches!(
            run(&rules, &[], Some("token=x&access_tokens=y")),
            Ok(None)
        ));
    }

    #[test]
    fn a_token_header_that_is_not_utf8_is_refused() {
        let rules = [defaults("a")];
        let mut map = http::HeaderMap::new();
        map.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_bytes(b"Bearer \xff").expect("value"),
        );
        let request = RequestParts {
            headers: &map,
            query: None,
        };
        assert!(matches!(
            authenticate(&rules, &JwksCache::default(), &request, 0),
            Err(JwtError::Malformed(_))
        ));
    }
}
