//! JSON Web Key Set parsing (`config::jwks::parse_jwks`, what inline `jwks` and fetched
//! `jwksUri` documents go through), then the keys put to use: the repository's test tokens
//! and an Ed25519-signed token are verified against whatever keys parsed, so that odd key
//! material (short moduli, zero exponents, points off the curve) meets the verifier.

#![no_main]

use std::sync::LazyLock;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    config::jwks::parse_jwks,
    policy::jwt::{authenticate, JwksCache, RequestParts},
};
use mesh_agent_fuzz::{sign_token, token_rules, ISSUER, NOW, TEST_TOKENS};

static TOKENS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut tokens: Vec<String> = TEST_TOKENS.iter().map(|t| t.trim().to_owned()).collect();
    let claims = format!(r#"{{"iss":"{ISSUER}","sub":"alice","exp":4000000000}}"#);
    tokens.push(sign_token(
        br#"{"alg":"EdDSA","kid":"fuzz"}"#,
        claims.as_bytes(),
    ));
    tokens.push(sign_token(br#"{"alg":"EdDSA"}"#, claims.as_bytes()));
    tokens
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(jwks) = parse_jwks(text) else {
        return;
    };
    let rules = token_rules(jwks);
    let cache = JwksCache::default();
    for token in TOKENS.iter() {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_str(&format!("Bearer {token}")).expect("a token is ASCII");
        headers.insert("authorization", value);
        let request = RequestParts {
            headers: &headers,
            query: None,
        };
        let _ = authenticate(&rules, &cache, &request, NOW);
    }
});
