//! A connection served request by request (`Guard::serve_http`), end to end on a real
//! upstream socket: the workload receives the head as it was judged — the normalised
//! path, the query untouched — a request whose path cannot be normalised is answered
//! 400 by the agent and never reaches the workload, and each decision is counted once;
//! a verified token is removed (unless `forwardOriginalToken`) and its payload and
//! claims are set as headers, which a client can never forge; every request gets an
//! `x-request-id`, a sampled one keeps its trace id with the agent's server span as the
//! parent, and that span reaches an OTLP collector (a dead one costs spans, not
//! requests).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_agent::{
    config::load_str,
    model::{MeshState, SharedState, Workload},
    policy::{
        facts::{Arrival, Peer},
        jwt::JwksCache,
    },
    proxy::requests::{Exchange, Guard},
    telemetry::{
        conns::ConnTable,
        metrics::Metrics,
        request_metrics::{LabelSettings, RequestMetrics},
    },
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::any_value,
    trace::v1::{span, Span},
};
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const CLUSTER: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default, labels: {app: sleep}}
spec: {nodeName: node-1, serviceAccountName: sleep, containers: [{name: c}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: default, labels: {app: httpbin}}
spec: {nodeName: node-1, serviceAccountName: httpbin, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
status: {podIP: 10.244.1.20}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: default}
spec: {clusterIP: 10.96.0.20, selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: http}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec: {selector: {matchLabels: {app: httpbin}}, action: DENY, rules: [{to: [{operation: {paths: [\"/admin/*\"]}}]}]}
";

/// A workload that records the head of each request it receives (the request line,
/// then the header lines sorted) and answers each with 200 `ok`, on one kept-alive
/// connection.
async fn workload(listener: tokio::net::TcpListener, heads: Heads) {
    let (stream, _) = listener.accept().await.expect("the agent connects");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut head: Vec<String> = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        if !line.is_empty() {
            head.push(line);
            continue;
        }
        head[1..].sort();
        heads.lock().expect("heads").push(std::mem::take(&mut head));
        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        if write.write_all(reply).await.is_err() {
            return;
        }
    }
}

type Heads = Arc<Mutex<Vec<Vec<String>>>>;

/// httpbin's agent serving one connection from sleep request by request, under
/// `CLUSTER` and `extra` (policies), towards the recording workload.
struct Served {
    send: SendRequest<Empty<Bytes>>,
    heads: Heads,
    metrics: Arc<Metrics>,
    httpbin: Arc<Workload>,
}

async fn serve(extra: &str) -> Served {
    let config = load_str(Path::new("cluster.yaml"), &format!("{CLUSTER}{extra}"));
    assert!(config.errors().next().is_none(), "{:?}", config.diagnostics);
    let state = MeshState::build("node-1", &config);
    let sleep = state.workloads[&Ipv4Addr::new(10, 244, 1, 10)].clone();
    let httpbin = state.workloads[&Ipv4Addr::new(10, 244, 1, 20)].clone();
    let arrival = Arc::new(Arrival::new(
        &state,
        "cluster.local",
        sleep.ip,
        Peer::Pod(&sleep),
        httpbin.clone(),
        SocketAddrV4::new(httpbin.ip, 80),
        None,
    ));
    let shared = SharedState::default();
    shared.replace(state);
    let metrics = Arc::new(Metrics::new(
        shared.clone(),
        Arc::new(ConnTable::default()),
        request_metrics("cluster.local"),
    ));
    let guard = Arc::new(Guard {
        jwks: Arc::new(JwksCache::default()),
        metrics: metrics.clone(),
        state: shared,
        limiter: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = tokio::net::TcpStream::connect(listener.local_addr().expect("address"))
        .await
        .expect("connect");
    let heads = Heads::default();
    tokio::spawn(workload(listener, heads.clone()));
    let (client, agent_side) = tokio::io::duplex(64 * 1024);
    let exchange = Exchange {
        service: Some("httpbin.default.svc.cluster.local".into()),
        client: Some(SocketAddrV4::new(sleep.ip, 40000)),
        mutual_tls: true,
    };
    tokio::spawn(guard.serve_http(
        agent_side,
        upstream,
        arrival,
        exchange,
        mesh_agent::http::ConnectionDrain::never(),
    ));
    let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    Served {
        send,
        heads,
        metrics,
        httpbin,
    }
}

impl Served {
    /// GETs `target` with `headers` (and httpbin's Host): the status and the body.
    async fn get(&mut self, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut request = http::Request::get(target).header("host", "httpbin.default:8000");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::<Bytes>::new()).expect("request");
        let response = self.send.send_request(request).await.expect("a response");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The heads the workload received, each checked for the one `x-request-id` every
    /// request is given (the client's, else a UUID v4 the agent made), which is then left
    /// out.
    fn heads(&self) -> Vec<Vec<String>> {
        let heads = self.heads.lock().expect("heads").clone();
        heads
            .into_iter()
            .map(|head| {
                let (ids, rest): (Vec<String>, Vec<String>) = head
                    .into_iter()
                    .partition(|line| line.starts_with("x-request-id: "));
                assert_eq!(ids.len(), 1, "one x-request-id: {ids:?}");
                let id = &ids[0]["x-request-id: ".len()..];
                assert!(
                    id.starts_with("req-") || is_uuid_v4(id),
                    "{id} is not a UUID v4"
                );
                rest
            })
            .collect()
    }

    /// The metric lines of `name` (`mesh_authz_decisions_total`, ...).
    fn counted(&self, name: &str) -> Vec<String> {
        let prefix = format!("{name}{{");
        self.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test]
async fn the_workload_receives_the_normalised_path_and_never_an_unnormalisable_one() {
    let mut served = serve("").await;
    // An escape that decodes to no byte: no path to judge it by.
    let (status, body) = served.get("/a%zz", &[]).await;
    assert_eq!(status, 400);
    assert!(body.starts_with("Bad Request: "), "{body}");
    assert_eq!(
        served.get("/public/./x/..//y?q=%2e%2e", &[]).await,
        (200, "ok".to_owned())
    );
    // Judged as /admin/x, whatever the client wrote.
    assert_eq!(
        served.get("/public/../admin/x", &[]).await,
        (403, "RBAC: access denied".to_owned())
    );
    assert_eq!(
        served.heads(),
        [[
            "GET /public/y?q=%2e%2e HTTP/1.1",
            "host: httpbin.default:8000"
        ]],
        "only the allowed request reached the workload, with its normalised path"
    );
    let labels = |decision: &str, policy: &str| {
        format!(
            "mesh_authz_decisions_total{{decision=\"{decision}\",policy=\"{policy}\",layer=\"request\",destination_workload=\"{}\",destination_workload_namespace=\"default\"}} 1",
            served.httpbin.workload
        )
    };
    let mut decisions = served.counted("mesh_authz_decisions_total");
    decisions.sort();
    assert_eq!(
        decisions,
        [labels("allow", "-"), labels("deny", "default/deny-admin")],
        "one allowed and one denied request; the 400 is no decision"
    );
}

fn is_uuid_v4(id: &str) -> bool {
    let groups: Vec<&str> = id.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
        && groups[2].starts_with('4')
        && groups[3].starts_with(['8', '9', 'a', 'b'])
}

/// The value of the series of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// The sum of every series of `name`.
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn every_request_is_counted_by_the_destination_with_istios_labels() {
    let mut served = serve("").await;
    for _ in 0..3 {
        assert_eq!(served.get("/status", &[]).await.0, 200);
    }
    assert_eq!(served.get("/admin/x", &[]).await.0, 403);
    let peers = [
        "reporter=\"destination\"",
        "source_workload=\"sleep\"",
        "source_workload_namespace=\"default\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/sleep\"",
        "source_app=\"sleep\"",
        "source_canonical_service=\"sleep\"",
        "source_canonical_revision=\"latest\"",
        "source_cluster=\"Kubernetes\"",
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/httpbin\"",
        "destination_app=\"httpbin\"",
        "destination_version=\"unknown\"",
        "destination_service=\"httpbin.default.svc.cluster.local\"",
        "destination_service_name=\"httpbin\"",
        "destination_service_namespace=\"default\"",
        "request_protocol=\"http\"",
        "grpc_response_status=\"\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let with = |code: &'static str| {
        let mut labels = peers.to_vec();
        labels.push(code);
        labels
    };
    let (ok, denied) = (with("response_code=\"200\""), with("response_code=\"403\""));
    // A response is counted once its last byte has gone out, which may be a moment after
    // the client has it.
    let text = until(
        || served.metrics.encode(),
        |text| sample(text, "istio_requests_total", &ok) == Some(3.0),
    )
    .await;
    assert_eq!(
        sample(&text, "istio_requests_total", &ok),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_requests_total", &denied),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_request_duration_milliseconds_count", &ok),
        Some(3.0)
    );
    let mut le = ok.clone();
    le.push("le=\"+Inf\"");
    assert_eq!(
        sample(&text, "istio_request_duration_milliseconds_bucket", &le),
        Some(3.0)
    );
    // Each answer is `HTTP/1.1 200 OK`, `content-length: 2` and `ok`: 40 bytes as
    // HTTP/1.1 writes them.
    assert_eq!(sample(&text, "istio_response_bytes_sum", &ok), Some(120.0));
    assert_eq!(
        sample(&text, "istio_response_bytes_sum", &denied),
        Some(
            (b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n\r\nRBAC: access denied".len())
                as f64
        )
    );
    // The agent's own cost, for `meshctl impact`: each of the four requests timed inside
    // the agent and judged once, as the destination; none routed here as the source.
    assert_eq!(
        sample(
            &text,
            "mesh_request_agent_seconds_count",
            &["reporter=\"destination\""]
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "mesh_request_agent_seconds_count",
            &["reporter=\"source\""]
        ),
        Some(0.0)
    );
    assert!(
        text.lines()
            .any(|line| line == "mesh_policy_evaluation_seconds_count 4"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|line| line.starts_with("process_cpu_seconds_total ")),
        "{text}"
    );
}

#[tokio::test]
async fn tag_overrides_label_each_request_by_its_own_attributes() {
    let extra = "---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: labels, namespace: default}
spec:
  metrics:
  - overrides:
    - match: {metric: REQUEST_COUNT, mode: SERVER}
      tagOverrides:
        user: {value: \"request.headers['x-user']\"}
        outcome: {value: \"response.code >= 400 ? 'failed' : 'served'\"}
        source_principal: {operation: REMOVE}
    - match: {metric: RESPONSE_SIZE}
      disabled: true
";
    let mut served = serve(extra).await;
    for user in ["ada", "ada", "bob"] {
        assert_eq!(served.get("/status", &[("x-user", user)]).await.0, 200);
    }
    assert_eq!(served.get("/admin/x", &[("x-user", "bob")]).await.0, 403);
    assert_eq!(served.get("/status", &[]).await.0, 200);
    let text = until(
        || served.metrics.encode(),
        |text| total(text, "istio_request_duration_milliseconds_count") == 5.0,
    )
    .await;
    let count = |labels: &[&str]| sample(&text, "istio_requests_total", labels);
    assert_eq!(
        count(&["user=\"ada\"", "outcome=\"served\""]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        count(&["user=\"bob\"", "outcome=\"served\""]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        count(&[
            "user=\"bob\"",
            "outcome=\"failed\"",
            "response_code=\"403\""
        ]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        count(&["user=\"unknown\""]),
        Some(1.0),
        "a request without the header: {text}"
    );
    let requests: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect();
    assert_eq!(requests.len(), 4, "{text}");
    assert!(
        requests.iter().all(|l| !l.contains("source_principal=")),
        "{text}"
    );
    // Other metrics keep Istio's labels, and the size of responses is not reported.
    let durations: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("istio_request_duration_milliseconds_count{"))
        .collect();
    assert_eq!(durations.len(), 2, "one per response code: {text}");
    assert!(durations
        .iter()
        .all(|l| l.contains("source_principal=\"spiffe://") && !l.contains("user=")));
    assert!(!text.contains("istio_response_bytes_count{"), "{text}");
}

#[tokio::test]
async fn an_access_log_filter_keeps_only_the_errors_as_json_lines() {
    let log = std::env::temp_dir().join(format!("mesh-access-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let extra = format!(
        "---
apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    accessLogFile: {}
    accessLogEncoding: JSON
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: errors, namespace: default}}
spec:
  accessLogging:
  - providers: [{{name: envoy}}]
    filter: {{expression: 'response.code >= 400'}}
",
        log.display()
    );
    let mut served = serve(&extra).await;
    assert_eq!(
        served.get("/status", &[("user-agent", "probe/1")]).await.0,
        200
    );
    assert_eq!(
        served.get("/admin/x", &[("user-agent", "probe/2")]).await.0,
        403
    );
    until(
        || served.metrics.encode(),
        |text| text.contains("mesh_access_log_lines_written_total 1"),
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "only the 403 is kept: {text}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!(line["response_code"], 403);
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/admin/x");
    assert_eq!(line["user_agent"], "probe/2");
    assert_eq!(line["authority"], "httpbin.default:8000");
    assert_eq!(line["upstream_cluster"], "inbound|80||");
    assert_eq!(line["bytes_sent"], 19);
    assert_eq!(line["downstream_remote_address"], "10.244.1.10:40000");
    let _ = std::fs::remove_file(&log);
}

fn testdata(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata/jwt")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// A RequestAuthentication on httpbin for Istio's demo issuer (inline keys) that copies
/// the payload and the `sub` claim into headers; `extra` adds fields to the rule.
fn request_authentication(extra: &str) -> String {
    let jwks = testdata("jwks.json").replace('\'', "''");
    format!("---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: default}}\nspec: {{selector: {{matchLabels: {{app: httpbin}}}}, jwtRules: [{{issuer: testing@secure.istio.io, jwks: '{jwks}', outputPayloadToHeader: x-jwt-payload, outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]{extra}}}]}}\n")
}

#[tokio::test]
async fn a_verified_token_is_removed_and_its_claims_forwarded_and_forged_claim_headers_never_pass()
{
    let mut served = serve(&request_authentication("")).await;
    let token = testdata("demo.jwt");
    let payload = token.split('.').nth(1).expect("a payload").to_owned();
    let bearer = format!("Bearer {token}");
    let ok = (200, "ok".to_owned());
    assert_eq!(
        served
            .get("/", &[("authorization", &bearer), ("x-jwt-sub", "admin")])
            .await,
        ok
    );
    // No token: the client's own claim headers are stripped, not forwarded as facts.
    assert_eq!(
        served
            .get("/", &[("x-jwt-sub", "admin"), ("x-jwt-payload", "e30")])
            .await,
        ok
    );
    assert_eq!(
        served.heads(),
        [
            vec![
                "GET / HTTP/1.1".to_owned(),
                "host: httpbin.default:8000".to_owned(),
                format!("x-jwt-payload: {payload}"),
                "x-jwt-sub: testing@secure.istio.io".to_owned(),
            ],
            vec![
                "GET / HTTP/1.1".to_owned(),
                "host: httpbin.default:8000".to_owned(),
            ],
        ]
    );
    assert_eq!(
        served.counted("mesh_jwt_validations_total"),
        ["mesh_jwt_validations_total{result=\"accepted\",reason=\"-\"} 1"]
    );
}

#[tokio::test]
async fn forward_original_token_keeps_the_token_for_the_workload() {
    let mut served = serve(&request_authentication(", forwardOriginalToken: true")).await;
    let token = testdata("demo.jwt");
    let payload = token.split('.').nth(1).expect("a payload").to_owned();
    let bearer = format!("Bearer {token}");
    assert_eq!(
        served.get("/", &[("authorization", &bearer)]).await,
        (200, "ok".to_owned())
    );
    assert_eq!(
        served.heads(),
        [[
            "GET / HTTP/1.1".to_owned(),
            format!("authorization: {bearer}"),
            "host: httpbin.default:8000".to_owned(),
            format!("x-jwt-payload: {payload}"),
            "x-jwt-sub: testing@secure.istio.io".to_owned(),
        ]]
    );
}

fn request_metrics(trust_domain: &str) -> RequestMetrics {
    let settings = LabelSettings {
        trust_domain: trust_domain.into(),
        cluster: "Kubernetes".into(),
    };
    RequestMetrics::new(settings, std::time::Duration::from_secs(600))
}

type Exports = tokio::sync::mpsc::UnboundedReceiver<ExportTraceServiceRequest>;

/// An OTLP/HTTP collector on loopback: the port, and each export it takes, decoded.
async fn collector() -> (u16, Exports) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (sender, exports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sender = sender.clone();
            let service = service_fn(move |request: http::Request<Incoming>| {
                let sender = sender.clone();
                async move {
                    assert_eq!(request.uri().path(), "/v1/traces");
                    let body = request.into_body().collect().await?.to_bytes();
                    let export = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let _ = sender.send(export);
                    Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::new())))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (port, exports)
}

/// A MeshConfig naming a collector on loopback `port`, and a Telemetry tracing httpbin's
/// requests there at `sampling` percent, with custom tags.
fn tracing_to(port: u16, sampling: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    extensionProviders:
    - name: otel
      opentelemetry: {{service: 127.0.0.1, port: {port}, http: {{path: /v1/traces, timeout: 2s}}}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: tracing, namespace: default}}
spec:
  tracing:
  - providers: [{{name: otel}}]
    randomSamplingPercentage: {sampling}
    customTags:
      team: {{literal: {{value: payments}}}}
      tenant: {{header: {{name: x-tenant, defaultValue: none}}}}
"
    )
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            any_value::Value::BoolValue(b) => Some(b.to_string()),
            other => Some(format!("{other:?}")),
        })
}

#[tokio::test]
async fn a_sampled_request_keeps_its_trace_and_its_server_span_reaches_the_collector() {
    let (port, mut exports) = collector().await;
    // 0%: only the incoming decision samples.
    let mut served = serve(&tracing_to(port, "0")).await;
    // Without context, at 0%: a trace is started unsampled, so the next hop does not
    // roll again, and no span is reported.
    assert_eq!(served.get("/quiet", &[]).await.0, 200);
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let headers = [
        ("traceparent", parent),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("x-request-id", "req-1"),
        ("user-agent", "probe/1"),
    ];
    assert_eq!(served.get("/status?x=1", &headers).await.0, 200);
    let heads = served.heads.lock().expect("heads").clone();
    let forwarded = |head: &[String], name: &str| -> String {
        head.iter()
            .find_map(|line| line.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {head:?}"))
            .to_owned()
    };
    let quiet = forwarded(&heads[0], "traceparent");
    assert!(quiet.ends_with("-00") && quiet.len() == 55, "{quiet}");
    let onward = forwarded(&heads[1], "traceparent");
    let (trace, rest) = onward
        .strip_prefix("00-")
        .and_then(|t| t.split_once('-'))
        .expect("traceparent fields");
    assert_eq!(
        trace, "4bf92f3577b34da6a3ce929d0e0e4736",
        "the trace id is kept"
    );
    let (span_id, flags) = rest.split_once('-').expect("span and flags");
    assert_ne!(
        span_id, "00f067aa0ba902b7",
        "the agent's span is the next parent"
    );
    assert_eq!(flags, "01");
    assert_eq!(forwarded(&heads[1], "tracestate"), "congo=t61rcWkgMzE");
    assert_eq!(forwarded(&heads[1], "x-request-id"), "req-1");

    let export = tokio::time::timeout(std::time::Duration::from_secs(20), exports.recv())
        .await
        .expect("an export within 20 s")
        .expect("an export");
    assert_eq!(export.resource_spans.len(), 1, "{export:?}");
    let resource = &export.resource_spans[0];
    let service = resource
        .resource
        .as_ref()
        .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        });
    assert_eq!(service.as_deref(), Some("httpbin.default"));
    let spans: Vec<&Span> = resource.scope_spans.iter().flat_map(|s| &s.spans).collect();
    assert_eq!(spans.len(), 1, "only the sampled request: {spans:?}");
    let span = spans[0];
    assert_eq!(hex(&span.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(hex(&span.span_id), span_id);
    assert_eq!(span.kind, span::SpanKind::Server as i32);
    assert_eq!(span.name, "httpbin.default.svc.cluster.local:80/*");
    for (key, value) in [
        ("component", "proxy"),
        ("http.method", "GET"),
        ("http.url", "http://httpbin.default:8000/status?x=1"),
        ("http.protocol", "HTTP/1.1"),
        ("http.status_code", "200"),
        ("guid:x-request-id", "req-1"),
        ("user_agent", "probe/1"),
        ("peer.address", "10.244.1.10"),
        ("upstream_cluster", "inbound|80||"),
        ("upstream_cluster.name", "inbound|80||"),
        ("response_flags", "-"),
        ("response_size", "40"),
        ("istio.canonical_service", "httpbin"),
        ("istio.canonical_revision", "latest"),
        ("istio.namespace", "default"),
        ("istio.mesh_id", "cluster.local"),
        (
            "node_id",
            "sidecar~10.244.1.20~httpbin.default~default.svc.cluster.local",
        ),
        ("team", "payments"),
        ("tenant", "none"),
    ] {
        assert_eq!(attribute(span, key).as_deref(), Some(value), "{key}");
    }
    assert_eq!(attribute(span, "error"), None);
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
    // Counted once the collector has answered, a moment after it took the spans.
    let text = until(
        || served.metrics.encode(),
        |text| text.contains("mesh_spans_exported_total 1"),
    )
    .await;
    assert!(text.contains("mesh_spans_exported_total 1"), "{text}");
    assert!(text.contains("mesh_spans_dropped_total 0"), "{text}");
}

#[tokio::test]
async fn a_dead_collector_costs_spans_not_requests() {
    // A port nothing listens on any more.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let mut served = serve(&tracing_to(port, "100")).await;
    for _ in 0..5 {
        assert_eq!(served.get("/status", &[]).await, (200, "ok".to_owned()));
    }
    let text = until(
        || served.metrics.encode(),
        |text| text.contains("mesh_spans_export_failed_total 5"),
    )
    .await;
    assert!(text.contains("mesh_spans_export_failed_total 5"), "{text}");
    assert!(text.contains("mesh_spans_exported_total 0"), "{text}");
    assert!(text.contains("mesh_spans_dropped_total 0"), "{text}");
}

/// What `read` returns once `done` holds for it, or after 15 s whatever it returns then
/// (the assertion that follows says what was seen).
async fn until(read: impl Fn() -> String, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let text = read();
        if done(&text) || std::time::Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
