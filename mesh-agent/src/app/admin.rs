//! The agent's small HTTP servers: Prometheus metrics (15020), readiness (15021) and the
//! localhost admin API (15000: status, configuration dump, certificates, JWKS fetches,
//! policy check, and the node's pinned maps and kernel checks for meshctl off the node).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use hyper::StatusCode;
use serde::Serialize;

use crate::{
    app::reconcile::{lock, SharedStatus},
    datapath::{
        maps::{NodeMaps, View},
        preflight,
    },
    http::server::{Handler, Reply},
    identity::{certs::SharedCaContact, spiffe::facts, tls::Identities},
    model::{
        routes_report::{route_check, routes_report, RouteQuery},
        SharedState,
    },
    policy::{check, jwt::JwksCache},
    telemetry::{conns::ConnTable, metrics::Metrics},
};

pub fn metrics(metrics: Arc<Metrics>) -> Handler {
    Arc::new(move |path, _| match path {
        "/metrics" | "/stats/prometheus" => {
            Reply::ok("text/plain; version=0.0.4; charset=utf-8", metrics.encode())
        }
        _ => Reply::text(StatusCode::NOT_FOUND, "try /metrics\n".into()),
    })
}

/// Ready once every local identity holds a certificate and every entry fits in the kernel
/// maps; otherwise 503 with the reason.
pub fn readiness(status: SharedStatus) -> Handler {
    Arc::new(move |path, _| {
        if path != "/healthz/ready" {
            return Reply::text(StatusCode::NOT_FOUND, "try /healthz/ready\n".into());
        }
        let status = lock(&status);
        match (&status.not_ready_reason, status.ready) {
            (None, true) => Reply::text(StatusCode::OK, "ready\n".into()),
            (reason, _) => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", reason.as_deref().unwrap_or("starting")),
            ),
        }
    })
}

/// What the admin API reads.
pub struct AdminView {
    pub status: SharedStatus,
    pub state: SharedState,
    pub conns: Arc<ConnTable>,
    pub identities: Arc<Identities>,
    pub jwks: Arc<JwksCache>,
    pub budgets: crate::model::circuit::Budgets,
    /// Where the node's maps and links are pinned.
    pub bpffs: PathBuf,
    pub ca: SharedCaContact,
    /// Whether the kernel carries same-node connections alone (`--kernel-bypass`).
    pub kernel_bypass: bool,
}

pub fn admin(view: AdminView) -> Handler {
    Arc::new(move |path, body| {
        match (path, body) {
        ("/status", None) => {
            let mut status = lock(&view.status).clone();
            status.proxied_connections = view.conns.len();
            status.ca = lock(&view.ca).clone();
            Reply::json(&status)
        }
        ("/config_dump", None) => Reply::json(&*view.state.current()),
        ("/certs", None) => Reply::json(&certificates(&view.identities)),
        ("/jwks", None) => Reply::json(&view.jwks.statuses()),
        ("/preflight", None) => Reply::json(&preflight::check_node(Path::new("/"))),
        (path, None) if path.starts_with("/bpf/") => match View::named(&path["/bpf/".len()..]) {
            Some(bpf_view) => {
                match NodeMaps::open(&view.bpffs).and_then(|maps| maps.view_json(bpf_view)) {
                    Ok(json) => Reply::json(&json),
                    Err(err) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
                }
            }
            None => Reply::text(
                StatusCode::NOT_FOUND,
                "try /bpf/programs, /bpf/workloads, /bpf/flows or /bpf/metrics\n".into(),
            ),
        },
        (path, None) if path.starts_with("/routes/") => {
            let host = &path["/routes/".len()..];
            match routes_report(&view.state.current(), &view.budgets, host) {
                Some(report) => Reply::json(&report),
                None => Reply::text(
                    StatusCode::NOT_FOUND,
                    format!("no Service or ServiceEntry host {host} in the mesh\n"),
                ),
            }
        }
        ("/routes/check", Some(body)) => match serde_json::from_slice::<RouteQuery>(body) {
            Ok(query) => match route_check(&view.state.current(), &query) {
                Ok(answer) => Reply::json(&answer),
                Err(err) => Reply::text(StatusCode::NOT_FOUND, format!("{err}\n")),
            },
            Err(err) => Reply::text(
                StatusCode::BAD_REQUEST,
                format!("malformed route check: {err}\n"),
            ),
        },
        ("/policy/check", Some(body)) => {
            match serde_json::from_slice::<check::CheckRequest>(body) {
                Ok(request) => match check::check(
                    &view.state.current(),
                    &view.identities.trust_domain,
                    view.kernel_bypass,
                    &view.jwks,
                    &request,
                ) {
                    Ok(report) => Reply::json(&report),
                    Err(err) => Reply::text(StatusCode::NOT_FOUND, format!("{err}\n")),
                },
                Err(err) => Reply::text(
                    StatusCode::BAD_REQUEST,
                    format!("malformed policy check: {err}\n"),
                ),
            }
        }
        _ => Reply::text(
            StatusCode::NOT_FOUND,
            "try GET /status, /config_dump, /certs, /jwks, /routes/HOST, /bpf/VIEW, /preflight or POST /policy/check, /routes/check\n"
                .into(),
        ),
    }
    })
}

/// What `meshctl certs` shows: each identity's certificate, and the trust root.
#[derive(Serialize)]
struct CertificateReport {
    identity: String,
    serial: String,
    not_before: i64,
    not_after: i64,
    issuer: String,
}

fn certificates(identities: &Identities) -> serde_json::Value {
    let certs: Vec<CertificateReport> = identities
        .all()
        .into_iter()
        .map(|(id, svid)| CertificateReport {
            identity: id.to_string(),
            serial: svid.facts.serial,
            not_before: svid.facts.not_before,
            not_after: svid.facts.not_after,
            issuer: svid.facts.issuer,
        })
        .collect();
    let root = rustls_pki_types::pem::PemObject::from_pem_slice(identities.root_pem.as_bytes())
        .ok()
        .and_then(|der: rustls_pki_types::CertificateDer| facts(&der).ok());
    serde_json::json!({
        "trust_domain": identities.trust_domain,
        "trust_root": root.map(|r| serde_json::json!({"serial": r.serial, "not_after": r.not_after, "subject": r.issuer})),
        "certificates": certs,
    })
}
