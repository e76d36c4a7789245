//! JWT extraction and verification (`policy::jwt::authenticate`) against
//! RequestAuthentication rules with the repository's test keys and an Ed25519 key.
//!
//! An input without a line break is a token, used as it is; `header JSON` + line break +
//! `claims JSON` is encoded and signed with the Ed25519 key here, so that mutations of the
//! claims reach the checks after the signature. The token is presented where the rules
//! look (the `Authorization` header, the `access_token` parameter, a header without
//! prefix, a cookie). A token that verifies must satisfy its rule's time and audience
//! checks, and its output headers are applied as the proxy applies them.

#![no_main]

use std::sync::{Arc, LazyLock};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    model::security::TokenRule,
    policy::jwt::{authenticate, output_headers, JwksCache, RequestParts},
};
use mesh_agent_fuzz::{sign_token, test_keys, token_rules, NOW};
use serde_json::Value;

static RULES: LazyLock<Vec<Arc<TokenRule>>> = LazyLock::new(|| token_rules(test_keys()));

fuzz_target!(|data: &[u8]| {
    let token = match data.iter().position(|b| *b == b'\n') {
        Some(line_end) => sign_token(&data[..line_end], &data[line_end + 1..]),
        None => match std::str::from_utf8(data) {
            Ok(token) => token.to_owned(),
            Err(_) => return,
        },
    };
    let cache = JwksCache::default();
    let header = |name: &str, value: String| {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                value,
            );
        }
        headers
    };
    let placements = [
        (header("authorization", format!("Bearer {token}")), None),
        (HeaderMap::new(), Some(format!("a=1&access_token={token}"))),
        (header("x-token", token.clone()), None),
        (
            header("cookie", format!("theme=dark; session={token}")),
            None,
        ),
    ];
    for (mut headers, query) in placements {
        let request = RequestParts {
            headers: &headers,
            query: query.as_deref(),
        };
        let Ok(Some(found)) = authenticate(&RULES, &cache, &request, NOW) else {
            continue;
        };
        let rule = RULES
            .iter()
            .find(|r| r.issuer == found.issuer)
            .expect("a verified token names a configured issuer");
        let claims = &found.facts.claims;
        let time = |name: &str| claims.get(name).and_then(Value::as_f64);
        if let Some(exp) = time("exp") {
            assert!(exp + 60.0 >= NOW as f64, "an expired token verified");
        }
        if let Some(nbf) = time("nbf") {
            assert!(nbf <= (NOW + 60) as f64, "a token not yet valid verified");
        }
        if !rule.audiences.is_empty() {
            assert!(
                found
                    .facts
                    .audiences
                    .iter()
                    .any(|a| rule.audiences.contains(a)),
                "a token of other audiences verified"
            );
        }
        // As `policy::facts::judge_request` edits the forwarded head.
        for name in output_headers(&RULES) {
            headers.remove(name.as_str());
        }
        if let Some(name) = &found.remove_header {
            headers.remove(name.as_str());
        }
        for (name, value) in &found.set_headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.insert(name, value);
            }
        }
    }
});
