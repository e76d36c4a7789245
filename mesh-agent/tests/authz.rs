//! AuthorizationPolicy and RequestAuthentication, table-driven: each case is a policy set
//! and a connection or request from one pod to another, and the decision a user would
//! see (allowed, reset, 403, 401) with the policy that made it. Evaluated by
//! `policy::check::check`, the code path of `meshctl policy check`, which judges through
//! the proxy's own steps (`facts::admit`, then `facts::judge_request`, which normalises).
//! Then JWKS fetching: keys kept through a failed refresh, retried, refreshed.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use mesh_agent::{
    config::load_str,
    model::{MeshState, SharedState},
    policy::{
        check::{check, CheckRequest},
        jwks,
        jwt::{self, JwksCache},
    },
};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair},
};
use serde_json::{json, Value};

const CLUSTER: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 10.200.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
status: {addresses: [{type: InternalIP, address: 10.200.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default, labels: {app: sleep}}
spec: {nodeName: node-1, serviceAccountName: sleep, containers: [{name: c}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: foo, labels: {app: client}}
spec: {nodeName: node-1, serviceAccountName: client, containers: [{name: c}]}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: bar, labels: {app: other}}
spec: {nodeName: node-2, serviceAccountName: other, containers: [{name: c}]}
status: {podIP: 10.244.2.12}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: default, labels: {app: httpbin, version: v1}}
spec: {nodeName: node-2, serviceAccountName: httpbin, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
status: {podIP: 10.244.2.20}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: default, labels: {app: db}}
spec: {nodeName: node-2, serviceAccountName: db, containers: [{name: c}]}
status: {podIP: 10.244.2.21}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: default}
spec: {clusterIP: 10.96.0.20, selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: 10.96.0.21, selector: {app: db}, ports: [{name: tcp, port: 5432}]}
";

const ISSUER: &str = "testing@secure.istio.io";

fn testdata(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata/jwt")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The keys the tests sign with, and the JWKS that publishes them (with Istio's key).
struct Keys {
    rsa: RsaKeyPair,
    es256: EcdsaKeyPair,
    es384: EcdsaKeyPair,
    ed25519: Ed25519KeyPair,
    jwks: String,
}

fn keys() -> Keys {
    let rng = SystemRandom::new();
    let der = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/jwt/test-rsa-2048.pk8"),
    )
    .expect("RSA test key");
    let rsa = RsaKeyPair::from_pkcs8(&der).expect("RSA key");
    let ec = |alg: &'static signature::EcdsaSigningAlgorithm| {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("EC key");
        EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("EC key")
    };
    let es256 = ec(&signature::ECDSA_P256_SHA256_FIXED_SIGNING);
    let es384 = ec(&signature::ECDSA_P384_SHA384_FIXED_SIGNING);
    let ed = Ed25519KeyPair::generate_pkcs8(&rng).expect("Ed25519 key");
    let ed25519 = Ed25519KeyPair::from_pkcs8(ed.as_ref()).expect("Ed25519 key");
    let rsa_public: signature::RsaPublicKeyComponents<Vec<u8>> = rsa.public().into();
    let ec_jwk = |kid: &str, crv: &str, key: &EcdsaKeyPair| {
        let point = key.public_key().as_ref();
        let half = (point.len() - 1) / 2;
        json!({"kty": "EC", "kid": kid, "crv": crv,
               "x": B64.encode(&point[1..1 + half]), "y": B64.encode(&point[1 + half..])})
    };
    let mut jwks: Value = serde_json::from_str(&testdata("jwks.json")).expect("Istio JWKS");
    let list = jwks["keys"].as_array_mut().expect("keys");
    list.push(json!({"kty": "RSA", "kid": "test-rsa", "n": B64.encode(&rsa_public.n), "e": B64.encode(&rsa_public.e)}));
    list.push(ec_jwk("test-es256", "P-256", &es256));
    list.push(ec_jwk("test-es384", "P-384", &es384));
    list.push(json!({"kty": "OKP", "crv": "Ed25519", "kid": "test-ed25519", "x": B64.encode(ed25519.public_key().as_ref())}));
    Keys {
        rsa,
        es256,
        es384,
        ed25519,
        jwks: jwks.to_string(),
    }
}

fn now() -> i64 {
    jwt::now_seconds() as i64
}

fn claims(extra: Value) -> Value {
    let mut claims = json!({"iss": ISSUER, "sub": "alice", "exp": now() + 3600, "iat": now()});
    if let (Some(base), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    claims
}

impl Keys {
    fn sign(&self, alg: &str, kid: &str, claims: &Value) -> String {
        let header = B64.encode(json!({"alg": alg, "kid": kid, "typ": "JWT"}).to_string());
        let payload = B64.encode(claims.to_string());
        let message = format!("{header}.{payload}");
        let rng = SystemRandom::new();
        let signature = match alg {
            "RS256" | "RS384" | "PS256" => {
                let padding: &'static dyn signature::RsaEncoding = match alg {
                    "RS256" => &signature::RSA_PKCS1_SHA256,
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    _ => &signature::RSA_PSS_SHA256,
                };
                let mut sig = vec![0; self.rsa.public().modulus_len()];
                self.rsa
                    .sign(padding, &rng, message.as_bytes(), &mut sig)
                    .expect("sign");
                sig
            }
            "ES256" => self
                .es256
                .sign(&rng, message.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec(),
            "ES384" => self
                .es384
                .sign(&rng, message.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec(),
            "EdDSA" => self.ed25519.sign(message.as_bytes()).as_ref().to_vec(),
            other => panic!("no signer for {other}"),
        };
        format!("{message}.{}", B64.encode(signature))
    }

    fn rs256(&self, extra: Value) -> String {
        self.sign("RS256", "test-rsa", &claims(extra))
    }
}

/// One case: a policy set, a check, and what the user sees.
struct Case {
    name: &'static str,
    policies: String,
    from: &'static str,
    to: &'static str,
    port: u16,
    method: Option<&'static str>,
    path: Option<&'static str>,
    headers: Vec<(&'static str, &'static str)>,
    jwt: Option<String>,
    /// `allow`, `deny`, and for requests the HTTP outcome: `403`, `401`.
    expect: &'static str,
    /// The deciding policy (`ns/name`), `-` for a default decision, `None` to skip.
    by: Option<&'static str>,
}

fn case(name: &'static str, policies: impl Into<String>, expect: &'static str) -> Case {
    Case {
        name,
        policies: policies.into(),
        from: "sleep",
        to: "default/httpbin",
        port: 80,
        method: None,
        path: None,
        headers: Vec::new(),
        jwt: None,
        expect,
        by: None,
    }
}

impl Case {
    fn from(mut self, from: &'static str) -> Case {
        self.from = from;
        self
    }
    fn to(mut self, to: &'static str, port: u16) -> Case {
        self.to = to;
        self.port = port;
        self
    }
    fn get(mut self, path: &'static str) -> Case {
        self.method = Some("GET");
        self.path = Some(path);
        self
    }
    fn method(mut self, method: &'static str) -> Case {
        self.method = Some(method);
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Case {
        self.headers.push((name, value));
        self
    }
    fn jwt(mut self, token: String) -> Case {
        self.jwt = Some(token);
        self
    }
    fn by(mut self, policy: &'static str) -> Case {
        self.by = Some(policy);
        self
    }
}

/// An AuthorizationPolicy in `namespace` with `spec` (flow-style YAML).
fn ap(namespace: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n")
}

fn allow_from(field: &str, values: &str) -> String {
    ap(
        "default",
        "allow",
        &format!("{{selector: {{matchLabels: {{app: httpbin}}}}, action: ALLOW, rules: [{{from: [{{source: {{{field}: {values}}}}}]}}]}}"),
    )
}

fn allow_to(field: &str, values: &str) -> String {
    ap(
        "default",
        "allow",
        &format!("{{selector: {{matchLabels: {{app: httpbin}}}}, rules: [{{to: [{{operation: {{{field}: {values}}}}}]}}]}}"),
    )
}

fn deny_to(field: &str, values: &str) -> String {
    ap(
        "default",
        "deny",
        &format!("{{action: DENY, rules: [{{to: [{{operation: {{{field}: {values}}}}}]}}]}}"),
    )
}

fn allow_when(key: &str, values: &str) -> String {
    ap(
        "default",
        "allow",
        &format!("{{selector: {{matchLabels: {{app: httpbin}}}}, rules: [{{when: [{{key: \"{key}\", {values}}}]}}]}}"),
    )
}

fn request_authentication(jwks: &str, rule_extra: &str) -> String {
    let jwks = jwks.replace('\'', "''");
    format!("---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: default}}\nspec: {{selector: {{matchLabels: {{app: httpbin}}}}, jwtRules: [{{issuer: \"{ISSUER}\", jwks: '{jwks}'{rule_extra}}}]}}\n")
}

const REQUIRE_JWT: &str = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: require-jwt, namespace: default}\nspec: {selector: {matchLabels: {app: httpbin}}, rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}\n";

fn cases(keys: &Keys) -> Vec<Case> {
    let ra = request_authentication(&keys.jwks, "");
    let with_jwt = |extra: &str| format!("{ra}{extra}");
    let demo = testdata("demo.jwt").trim().to_owned();
    let groups = testdata("groups-scope.jwt").trim().to_owned();
    let allow_nothing = ap("default", "allow-nothing", "{}");
    let disable = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: plain, namespace: default}\nspec: {selector: {matchLabels: {app: httpbin}}, mtls: {mode: DISABLE}}\n";
    let header = B64.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = B64.encode(claims(json!({})).to_string());
    let alg_none = format!("{header}.{payload}.");
    let hs256 = {
        let header = B64.encode(r#"{"alg":"HS256","typ":"JWT","kid":"test-rsa"}"#);
        let message = format!("{header}.{payload}");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, keys.jwks.as_bytes());
        let tag = ring::hmac::sign(&key, message.as_bytes());
        format!("{message}.{}", B64.encode(tag.as_ref()))
    };
    let valid = keys.rs256(json!({}));
    let tampered_payload = {
        let parts: Vec<&str> = valid.split('.').collect();
        let forged = B64.encode(claims(json!({"sub": "admin"})).to_string());
        format!("{}.{forged}.{}", parts[0], parts[2])
    };
    let tampered_signature = {
        let mut bytes = valid.clone().into_bytes();
        let last = bytes.len() - 5;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).expect("ascii")
    };
    let oversized = keys.rs256(json!({"padding": "x".repeat(20_000)}));
    vec![
        // Scope and defaults.
        case("no policy allows", "", "allow").by("-"),
        case("allow-nothing denies its namespace", allow_nothing.clone(), "deny").by("-"),
        case("allow-nothing elsewhere does not apply", ap("foo", "allow-nothing", "{}"), "allow"),
        case("mesh-wide allow-nothing (root namespace)", ap("istio-system", "allow-nothing", "{}"), "deny"),
        case("rules: [{}] allows everything", format!("{allow_nothing}{}", ap("default", "allow-all", "{rules: [{}]}")), "allow").by("default/allow-all"),
        case("selector picks the workload", ap("default", "only-db", "{selector: {matchLabels: {app: db}}}"), "allow"),
        case("selector applies to its workload", ap("default", "only-db", "{selector: {matchLabels: {app: db}}}"), "deny").to("default/db", 5432),
        case("root namespace selector spans namespaces", ap("istio-system", "httpbins", "{selector: {matchLabels: {app: httpbin}}}"), "deny"),
        case("targetRef to the Service applies", ap("default", "svc", "{targetRef: {kind: Service, group: \"\", name: httpbin}, action: DENY, rules: [{}]}"), "deny").by("default/svc"),
        case("targetRefs to another Service does not apply", ap("default", "svc", "{targetRefs: [{kind: Service, group: \"\", name: db}], action: DENY, rules: [{}]}"), "allow"),
        case("DENY with no rules matches nothing", ap("default", "deny-none", "{action: DENY}"), "allow"),
        // Sources.
        case("principals exact", allow_from("principals", "[cluster.local/ns/default/sa/sleep]"), "allow").by("default/allow"),
        case("principals exact, other source", allow_from("principals", "[cluster.local/ns/default/sa/sleep]"), "deny").from("foo/client"),
        case("principals prefix", allow_from("principals", "[\"cluster.local/ns/foo/*\"]"), "allow").from("foo/client"),
        case("principals suffix", allow_from("principals", "[\"*/sa/sleep\"]"), "allow"),
        case("principals presence with mTLS", allow_from("principals", "[\"*\"]"), "allow"),
        case("principals presence in plaintext (DISABLE)", format!("{disable}{}", allow_from("principals", "[\"*\"]")), "deny"),
        case("notPrincipals excludes", allow_from("notPrincipals", "[cluster.local/ns/default/sa/sleep]"), "deny"),
        case("notPrincipals lets others in", allow_from("notPrincipals", "[cluster.local/ns/default/sa/sleep]"), "allow").from("bar/other"),
        case("namespaces", allow_from("namespaces", "[foo]"), "allow").from("foo/client"),
        case("namespaces, other namespace", allow_from("namespaces", "[foo]"), "deny"),
        case("notNamespaces", allow_from("notNamespaces", "[foo]"), "deny").from("foo/client"),
        case("serviceAccounts", allow_from("serviceAccounts", "[default/sleep]"), "allow"),
        case("ipBlocks CIDR", allow_from("ipBlocks", "[10.244.1.0/24]"), "allow"),
        case("ipBlocks CIDR, outside", allow_from("ipBlocks", "[10.244.1.0/24]"), "deny").from("bar/other"),
        case("notIpBlocks", allow_from("notIpBlocks", "[10.244.2.12]"), "deny").from("bar/other"),
        case("remoteIpBlocks single address", allow_from("remoteIpBlocks", "[10.244.1.11]"), "allow").from("foo/client"),
        case("requestPrincipals without a token", format!("{ra}{REQUIRE_JWT}"), "403").get("/"),
        case("requestPrincipals with a token", format!("{ra}{REQUIRE_JWT}"), "allow").get("/").jwt(valid.clone()).by("default/require-jwt"),
        case("notRequestPrincipals", with_jwt(&allow_from("notRequestPrincipals", &format!("[\"{ISSUER}/alice\"]"))), "403").get("/").jwt(valid.clone()),
        // Operations.
        case("ports", allow_to("ports", "[\"80\"]"), "allow"),
        case("ports, other port", allow_to("ports", "[\"80\"]"), "deny").to("default/httpbin", 81),
        case("notPorts", allow_to("notPorts", "[\"80\"]"), "deny"),
        case("DENY by port and namespace at L4", ap("default", "deny-foo", "{action: DENY, rules: [{from: [{source: {namespaces: [foo]}}], to: [{operation: {ports: [\"5432\"]}}]}]}"), "deny").from("foo/client").to("default/db", 5432).by("default/deny-foo"),
        case("DENY by namespace spares others", ap("default", "deny-foo", "{action: DENY, rules: [{from: [{source: {namespaces: [foo]}}]}]}"), "allow"),
        case("DENY beats ALLOW", format!("{}{}", ap("default", "allow-all", "{rules: [{}]}"), ap("default", "deny-all", "{action: DENY, rules: [{}]}")), "deny").by("default/deny-all"),
        case("methods", allow_to("methods", "[GET]"), "allow").get("/"),
        case("methods, other method", allow_to("methods", "[GET]"), "403").get("/").method("POST"),
        // A method with lower-case letters is ambiguous (RFC 9110 §9.1): refused before
        // any policy, so a rule on GET cannot be walked around with "get".
        case("methods are case-sensitive", allow_to("methods", "[GET]"), "400").get("/").method("get"),
        case("notMethods", allow_to("notMethods", "[DELETE]"), "403").get("/").method("DELETE"),
        case("paths exact", allow_to("paths", "[/headers]"), "allow").get("/headers"),
        case("paths exact ignores the query", allow_to("paths", "[/headers]"), "allow").get("/headers?x=1"),
        case("paths exact, other path", allow_to("paths", "[/headers]"), "403").get("/ip"),
        case("paths prefix", allow_to("paths", "[\"/api/*\"]"), "allow").get("/api/v1"),
        case("paths prefix is not a string prefix of the segment", allow_to("paths", "[\"/api/*\"]"), "403").get("/apix"),
        case("paths suffix", allow_to("paths", "[\"*.png\"]"), "allow").get("/img/a.png"),
        case("paths template", allow_to("paths", "[\"/users/{*}/profile\"]"), "allow").get("/users/42/profile"),
        case("notPaths", allow_to("notPaths", "[\"/admin/*\"]"), "403").get("/admin/x"),
        case("dot segments cannot pass a DENY", deny_to("paths", "[\"/admin/*\"]"), "403").get("/public/../admin/x"),
        case("encoded slash cannot pass a DENY", deny_to("paths", "[/admin/secret]"), "403").get("/admin%2Fsecret"),
        case("lower-case escape cannot pass a DENY", deny_to("paths", "[/admin/secret]"), "403").get("/admin%2fsecret"),
        case("double slashes cannot pass a DENY", deny_to("paths", "[\"/admin/*\"]"), "403").get("//admin//x"),
        case("encoded dots cannot pass a DENY", deny_to("paths", "[\"/admin/*\"]"), "403").get("/x/%2e%2E/admin/x"),
        case("backslashes cannot pass a DENY", deny_to("paths", "[\"/admin/*\"]"), "403").get("/admin\\x"),
        case("encoded letters cannot pass a DENY", deny_to("paths", "[\"/admin/*\"]"), "403").get("/%61dmin/x"),
        case("paths are case-sensitive", deny_to("paths", "[\"/admin/*\"]"), "allow").get("/ADMIN/x"),
        case("hosts, Service hostname", allow_to("hosts", "[httpbin.default.svc.cluster.local]"), "allow").to("httpbin.default", 8000).get("/"),
        case("hosts ignore case and port", allow_to("hosts", "[HTTPBIN.default.svc.cluster.local]"), "allow").get("/").header("host", "httpbin.default.svc.cluster.local:8000"),
        case("hosts prefix", allow_to("hosts", "[\"httpbin.*\"]"), "allow").get("/").header("host", "httpbin.default"),
        case("notHosts", allow_to("notHosts", "[\"evil.*\"]"), "403").get("/").header("host", "evil.example"),
        // Conditions.
        case("request.headers", allow_when("request.headers[x-token]", "values: [secret]"), "allow").get("/").header("x-token", "secret"),
        case("request.headers missing", allow_when("request.headers[x-token]", "values: [secret]"), "403").get("/"),
        case("request.headers notValues", allow_when("request.headers[x-env]", "notValues: [\"test*\"]"), "403").get("/").header("x-env", "testing"),
        case("source.ip", allow_when("source.ip", "values: [10.244.1.10]"), "allow"),
        case("remote.ip", allow_when("remote.ip", "values: [10.244.0.0/16]"), "allow"),
        case("source.namespace", allow_when("source.namespace", "values: [foo]"), "deny"),
        case("source.principal", allow_when("source.principal", "values: [cluster.local/ns/default/sa/sleep]"), "allow"),
        case("destination.ip", allow_when("destination.ip", "values: [10.244.2.20]"), "allow"),
        case("destination.port", allow_when("destination.port", "notValues: [\"80\"]"), "deny"),
        case("connection.sni is absent on the same node", allow_when("connection.sni", "values: [\"*\"]"), "deny"),
        case("request.auth.principal", with_jwt(&allow_when("request.auth.principal", &format!("values: [\"{ISSUER}/alice\"]"))), "allow").get("/").jwt(valid.clone()),
        case("request.auth.audiences", with_jwt(&allow_when("request.auth.audiences", "values: [shop]")), "allow").get("/").jwt(keys.rs256(json!({"aud": ["shop", "bank"]}))),
        case("request.auth.presenter", with_jwt(&allow_when("request.auth.presenter", "values: [web-app]")), "403").get("/").jwt(keys.rs256(json!({"azp": "cli"}))),
        case("request.auth.claims list", with_jwt(&allow_when("request.auth.claims[groups]", "values: [group1]")), "allow").get("/").jwt(groups.clone()),
        case("request.auth.claims list, no match", with_jwt(&allow_when("request.auth.claims[groups]", "values: [group1]")), "403").get("/").jwt(demo.clone()),
        case("request.auth.claims nested", with_jwt(&allow_when("request.auth.claims[realm][role]", "values: [admin]")), "allow").get("/").jwt(keys.rs256(json!({"realm": {"role": "admin"}}))),
        case("request.auth.claims string", with_jwt(&allow_when("request.auth.claims[foo]", "values: [bar]")), "allow").get("/").jwt(demo.clone()),
        // AUDIT and CUSTOM.
        case("AUDIT does not change the decision", ap("default", "audit", "{action: AUDIT, rules: [{}]}"), "allow").by("-"),
        case("AUDIT beside a DENY", format!("{}{}", ap("default", "audit", "{action: AUDIT, rules: [{}]}"), ap("default", "deny-all", "{action: DENY, rules: [{}]}")), "deny"),
        case("CUSTOM fails closed", ap("default", "ext", "{action: CUSTOM, provider: {name: ext-authz}, rules: [{to: [{operation: {paths: [\"/secure/*\"]}}]}]}"), "403").get("/secure/x").by("default/ext"),
        case("CUSTOM leaves what it does not select", ap("default", "ext", "{action: CUSTOM, provider: {name: ext-authz}, rules: [{to: [{operation: {paths: [\"/secure/*\"]}}]}]}"), "allow").get("/public"),
        // RequestAuthentication.
        case("no token passes authentication", ra.clone(), "allow").get("/"),
        case("Istio's demo token", format!("{ra}{REQUIRE_JWT}"), "allow").get("/").jwt(demo.clone()),
        case("RS384", format!("{ra}{REQUIRE_JWT}"), "allow").get("/").jwt(keys.sign("RS384", "test-rsa", &claims(json!({})))),
        case("PS256", format!("{ra}{REQUIRE_JWT}"), "allow").get("/").jwt(keys.sign("PS256", "test-rsa", &claims(json!({})))),
        case("ES256", format!("{ra}{REQUIRE_JWT}"), "allow").get("/").jwt(keys.sign("ES256", "test-es256", &claims(json!({})))),
        case("ES384", format!("{ra}{REQUIRE_JWT}"), "allow").get("/").jwt(keys.sign("ES384", "test-es384", &claims(json!({})))),
        case("EdDSA", format!("{ra}{REQUIRE_JWT}"), "allow").get("/").jwt(keys.sign("EdDSA", "test-ed25519", &claims(json!({})))),
        case("expired", ra.clone(), "401").get("/").jwt(keys.rs256(json!({"exp": now() - 3600}))),
        case("not yet valid", ra.clone(), "401").get("/").jwt(keys.rs256(json!({"nbf": now() + 3600}))),
        case("alg none", ra.clone(), "401").get("/").jwt(alg_none),
        case("HS256 with the public key as secret", ra.clone(), "401").get("/").jwt(hs256),
        case("tampered payload", ra.clone(), "401").get("/").jwt(tampered_payload),
        case("tampered signature", ra.clone(), "401").get("/").jwt(tampered_signature),
        case("wrong issuer", ra.clone(), "401").get("/").jwt(keys.rs256(json!({"iss": "someone@else"}))),
        case("wrong audience", request_authentication(&keys.jwks, ", audiences: [shop]"), "401").get("/").jwt(keys.rs256(json!({"aud": "bank"}))),
        case("right audience", request_authentication(&keys.jwks, ", audiences: [shop]"), "allow").get("/").jwt(keys.rs256(json!({"aud": "shop"}))),
        case("unknown kid", ra.clone(), "401").get("/").jwt(keys.sign("RS256", "rotated-away", &claims(json!({})))),
        case("key of another type for the kid", ra.clone(), "401").get("/").jwt(keys.sign("RS256", "test-es256", &claims(json!({})))),
        case("oversized token", ra.clone(), "401").get("/").jwt(oversized),
        case("garbage token", ra.clone(), "401").get("/").jwt("not-a-jwt".into()),
        case("token in a custom header with prefix", format!("{}{REQUIRE_JWT}", request_authentication(&keys.jwks, ", fromHeaders: [{name: x-jwt, prefix: \"Token \"}]")), "allow").get("/").header("x-jwt", "Token PLACEHOLDER"),
        case("custom header only: Authorization is not read", format!("{}{REQUIRE_JWT}", request_authentication(&keys.jwks, ", fromHeaders: [{name: x-jwt}]")), "403").get("/").jwt(valid.clone()),
        case("token in the access_token parameter", format!("{ra}{REQUIRE_JWT}"), "allow").get("/?access_token=PLACEHOLDER"),
        case("token in a cookie", format!("{}{REQUIRE_JWT}", request_authentication(&keys.jwks, ", fromCookies: [session]")), "allow").get("/").header("cookie", "a=b; session=PLACEHOLDER"),
        // Port 81 is declared by no Service as HTTP: no request is parsed there, so the
        // ALLOW rule on requestPrincipals cannot match and the connection is refused.
        case("tokens are read on HTTP ports only", format!("{ra}{REQUIRE_JWT}"), "deny").to("default/httpbin", 81).jwt(valid.clone()),
    ]
}

fn evaluate(case: &Case, jwks: &JwksCache, valid: &str) -> Result<(String, String), String> {
    let config = load_str(
        Path::new("policies.yaml"),
        &format!("{CLUSTER}{}", case.policies),
    );
    let errors: Vec<String> = config.errors().map(|d| d.to_string()).collect();
    if !errors.is_empty() {
        return Err(format!("configuration errors: {errors:?}"));
    }
    let state = MeshState::build("node-1", &config);
    let headers = case
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.replace("PLACEHOLDER", valid)))
        .collect();
    let request = CheckRequest {
        from: case.from.into(),
        to: case.to.into(),
        port: case.port,
        method: case.method.map(str::to_owned),
        path: case.path.map(|p| p.replace("PLACEHOLDER", valid)),
        headers,
        jwt: case.jwt.clone(),
    };
    let report =
        check(&state, "cluster.local", false, jwks, &request).map_err(|e| e.to_string())?;
    let endpoint = report.endpoints.first().ok_or("no endpoint")?;
    let outcome = match endpoint.outcome.as_str() {
        "400" | "401" | "403" => endpoint.outcome.clone(),
        _ => endpoint.decision.clone(),
    };
    let by = endpoint
        .decided_by
        .as_ref()
        .map_or("-".into(), |m| m.policy.clone());
    Ok((outcome, by))
}

#[test]
fn authorization_and_authentication_table() {
    let keys = keys();
    let jwks = JwksCache::default();
    let valid = keys.rs256(json!({}));
    let cases = cases(&keys);
    assert_eq!(cases.len(), 106, "the cases written below");
    let mut failures = Vec::new();
    for case in &cases {
        match evaluate(case, &jwks, &valid) {
            Ok((outcome, by)) => {
                let by_ok = case.by.is_none_or(|expected| expected == by);
                if outcome != case.expect || !by_ok {
                    failures.push(format!(
                        "{}: expected {} (by {:?}), got {outcome} (by {by})",
                        case.name, case.expect, case.by
                    ));
                }
            }
            Err(err) => failures.push(format!("{}: {err}", case.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Serves `body` (read at each request, so a test can publish new keys) as a JWKS
/// document on `listener` until aborted; aborting closes the listener.
fn serve_jwks(
    listener: tokio::net::TcpListener,
    body: Arc<Mutex<String>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buffer = [0u8; 4096];
            let _ = stream.read(&mut buffer).await;
            let body = body.lock().expect("JWKS body").clone();
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
        }
    })
}

/// The live state of an agent on node-1 whose RequestAuthentication for every workload
/// fetches its keys from `uri`, with `keep_fresh` refreshing them every 200 ms.
fn fetching_from(uri: &str) -> (SharedState, Arc<JwksCache>, tokio::task::JoinHandle<()>) {
    let config = load_str(
        Path::new("ra.yaml"),
        &format!("{CLUSTER}---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: default}}\nspec: {{jwtRules: [{{issuer: \"{ISSUER}\", jwksUri: \"{uri}\"}}]}}\n{REQUIRE_JWT}"),
    );
    let shared = SharedState::default();
    shared.replace(MeshState::build("node-1", &config));
    let cache = Arc::new(JwksCache::default());
    let fresh = tokio::spawn(jwks::keep_fresh(
        shared.clone(),
        cache.clone(),
        Duration::from_millis(200),
    ));
    (shared, cache, fresh)
}

/// What a GET of httpbin from sleep carrying `token` gets: `allow`, `401` or `403`.
fn outcome(shared: &SharedState, cache: &JwksCache, token: &str) -> String {
    let request = CheckRequest {
        from: "sleep".into(),
        to: "default/httpbin".into(),
        port: 80,
        method: Some("GET".into()),
        path: Some("/".into()),
        jwt: Some(token.into()),
        ..CheckRequest::default()
    };
    let report = check(&shared.current(), "cluster.local", false, cache, &request).expect("check");
    let endpoint = report.endpoints.first().expect("one endpoint");
    match endpoint.outcome.as_str() {
        "400" | "401" | "403" => endpoint.outcome.clone(),
        _ => endpoint.decision.clone(),
    }
}

/// The cache's account of `uri`: (keys held, fetches failed since the last success).
fn fetches(cache: &JwksCache, uri: &str) -> (usize, u32) {
    cache
        .statuses()
        .into_iter()
        .find(|s| s.uri == uri)
        .map_or((0, 0), |s| (s.keys, s.failed_fetches))
}

/// Polls `condition` until it holds; a loaded 2-core machine gets 30 s.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Keys in Istio's published JWKS (testdata/jwt/jwks.json): the one that signs `demo.jwt`.
const ISTIO_KEYS: usize = 1;

#[test]
fn jwks_is_fetched_and_kept_when_the_server_goes_down() {
    runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let uri = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
        let server = serve_jwks(listener, Arc::new(Mutex::new(testdata("jwks.json"))));
        let (shared, cache, fresh) = fetching_from(&uri);
        let demo = testdata("demo.jwt").trim().to_owned();
        eventually("the keys fetched", || cache.get(&uri).is_some()).await;
        assert_eq!(fetches(&cache, &uri), (ISTIO_KEYS, 0));
        assert_eq!(outcome(&shared, &cache, &demo), "allow");

        server.abort();
        assert!(
            server.await.is_err_and(|e| e.is_cancelled()),
            "server stopped"
        );
        // A refresh is due every 200 ms: it runs, fails, and the keys stay.
        eventually("a refresh attempted and failed", || {
            fetches(&cache, &uri).1 >= 1
        })
        .await;
        assert_eq!(
            fetches(&cache, &uri).0,
            ISTIO_KEYS,
            "the last fetched keys are kept"
        );
        assert_eq!(
            outcome(&shared, &cache, &demo),
            "allow",
            "tokens still verify with the kept keys"
        );
        fresh.abort();
    });
}

#[test]
fn jwks_fetch_is_retried_and_refreshed_keys_are_used() {
    let keys = keys();
    runtime().block_on(async {
        // Nothing listens at the URI yet: the first fetch fails.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let uri = format!("http://{address}/jwks.json");
        let (shared, cache, fresh) = fetching_from(&uri);
        let demo = testdata("demo.jwt").trim().to_owned();
        let rotated = keys.rs256(json!({}));
        eventually("the first fetch failed", || fetches(&cache, &uri).1 >= 1).await;
        assert_eq!(fetches(&cache, &uri).0, 0);
        assert_eq!(
            outcome(&shared, &cache, &demo),
            "401",
            "no keys yet: tokens of the issuer are refused"
        );

        // The server comes up: the retry (after its backoff) fetches the keys.
        let listener = tokio::net::TcpListener::bind(address).await.expect("bind");
        let body = Arc::new(Mutex::new(testdata("jwks.json")));
        let server = serve_jwks(listener, body.clone());
        eventually("the retry fetched the keys", || {
            fetches(&cache, &uri) == (ISTIO_KEYS, 0)
        })
        .await;
        assert_eq!(outcome(&shared, &cache, &demo), "allow");
        assert_eq!(
            outcome(&shared, &cache, &rotated),
            "401",
            "a token signed with a key not yet published"
        );

        // The issuer publishes its new keys: the next refresh brings them.
        *body.lock().expect("JWKS body") = keys.jwks.clone();
        let published = serde_json::from_str::<Value>(&keys.jwks).expect("JWKS")["keys"]
            .as_array()
            .map_or(0, Vec::len);
        eventually("the refresh fetched the new keys", || {
            fetches(&cache, &uri).0 == published
        })
        .await;
        assert_eq!(outcome(&shared, &cache, &rotated), "allow");
        assert_eq!(outcome(&shared, &cache, &demo), "allow");
        server.abort();
        fresh.abort();
    });
}
