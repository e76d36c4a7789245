//! A connection served request by request (`Guard::serve_http`), end to end on a real
//! upstream socket: the workload receives the head as it was judged — the normalised
//! path, the query untouched — a request whose path cannot be normalised is answered
//! 400 by the agent and never reaches the workload, and each decision is counted once.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_agent::{
    config::load_str,
    model::{MeshState, SharedState},
    policy::{
        facts::{Arrival, Peer},
        jwt::JwksCache,
    },
    proxy::requests::Guard,
    telemetry::{conns::ConnTable, metrics::Metrics},
};
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

/// A workload that records the request line of each request it receives and answers
/// each with 200 `ok`, on one kept-alive connection.
async fn workload(listener: tokio::net::TcpListener, seen: Arc<Mutex<Vec<String>>>) {
    let (stream, _) = listener.accept().await.expect("the agent connects");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut in_head = false;
    while let Ok(Some(line)) = lines.next_line().await {
        if !in_head {
            seen.lock().expect("seen").push(line);
            in_head = true;
        } else if line.is_empty() {
            in_head = false;
            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if write.write_all(reply).await.is_err() {
                return;
            }
        }
    }
}

#[tokio::test]
async fn the_workload_receives_the_normalised_path_and_never_an_unnormalisable_one() {
    let config = load_str(Path::new("cluster.yaml"), CLUSTER);
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
        shared,
        Arc::new(ConnTable::default()),
        "cluster.local",
    ));
    let guard = Arc::new(Guard {
        jwks: Arc::new(JwksCache::default()),
        metrics: metrics.clone(),
    });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = tokio::net::TcpStream::connect(listener.local_addr().expect("address"))
        .await
        .expect("connect");
    let seen = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(workload(listener, seen.clone()));
    let (client, agent_side) = tokio::io::duplex(64 * 1024);
    tokio::spawn(guard.serve_http(agent_side, upstream, arrival));
    let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);

    let mut outcomes = Vec::new();
    for target in [
        // An escape that decodes to no byte: no path to judge it by.
        "/a%zz",
        "/public/./x/..//y?q=%2e%2e",
        // Judged as /admin/x, whatever the client wrote.
        "/public/../admin/x",
    ] {
        let request = http::Request::get(target)
            .header("host", "httpbin.default:8000")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = send.send_request(request).await.expect("a response");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        outcomes.push((status, String::from_utf8_lossy(&body).into_owned()));
    }
    assert_eq!(outcomes[0].0, 400, "{outcomes:?}");
    assert!(outcomes[0].1.starts_with("Bad Request: "), "{outcomes:?}");
    assert_eq!(
        outcomes[1..],
        [
            (200, "ok".to_owned()),
            (403, "RBAC: access denied".to_owned())
        ]
    );
    assert_eq!(
        *seen.lock().expect("seen"),
        ["GET /public/y?q=%2e%2e HTTP/1.1"],
        "only the allowed request reached the workload, with its normalised path"
    );

    let text = metrics.encode();
    let decisions: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("mesh_authz_decisions_total{"))
        .collect();
    let labels = |decision: &str, policy: &str| {
        format!(
            "mesh_authz_decisions_total{{decision=\"{decision}\",policy=\"{policy}\",layer=\"request\",destination_workload=\"{}\",destination_workload_namespace=\"default\"}} 1",
            httpbin.workload
        )
    };
    assert_eq!(
        decisions,
        [labels("allow", "-"), labels("deny", "default/deny-admin")],
        "one allowed and one denied request; the 400 is no decision"
    );
}
