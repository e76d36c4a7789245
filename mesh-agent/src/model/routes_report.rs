//! What `meshctl routes HOST` shows, read from the live state: the VirtualService of a
//! host with its routes and weighted destinations, and each port of the host with its
//! endpoints, their outlier state and the connection pool occupancy of each cluster; and
//! what `meshctl route check` answers: which route a given request would take, and why.

use std::{sync::Arc, time::Instant};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::model::{
    circuit::{BudgetSnapshot, Budgets},
    lb::LbSettings,
    outlier::EndpointOutlierState,
    routing::{Action, HttpRule, RequestFacts, TcpRule, TlsRule, WeightedDestination},
    MeshState, PortProtocol,
};

#[derive(Debug, Serialize)]
pub struct RoutesReport {
    pub host: String,
    /// `namespace/name` of the VirtualService pods of the host's namespace use.
    pub virtual_service: Option<String>,
    pub http: Vec<HttpRule>,
    pub tls: Vec<TlsRule>,
    pub tcp: Vec<TcpRule>,
    pub ports: Vec<PortReport>,
}

#[derive(Debug, Serialize)]
pub struct PortReport {
    pub port: u16,
    pub address: String,
    pub http: bool,
    pub protocol: PortProtocol,
    pub endpoints: Vec<EndpointReport>,
    pub clusters: Vec<ClusterReport>,
    /// The host's load balancing, then each subset's.
    pub load_balancers: Vec<BalancerReport>,
}

/// How one cluster of the port balances: its settings, and a line saying them.
#[derive(Debug, Serialize)]
pub struct BalancerReport {
    pub subset: Option<String>,
    pub summary: String,
    pub settings: LbSettings,
}

#[derive(Debug, Serialize)]
pub struct EndpointReport {
    pub address: String,
    pub pod: Option<String>,
    pub subsets: Vec<String>,
    /// `region/zone/subzone`.
    pub locality: String,
}

#[derive(Debug, Serialize)]
pub struct ClusterReport {
    pub name: String,
    pub outliers: Vec<EndpointOutlierState>,
    /// Pool occupancy per source pod.
    pub pools: Vec<BudgetSnapshot>,
}

/// The report for `host` (a Service or ServiceEntry hostname); `None` when the mesh
/// knows no such host.
pub fn routes_report(state: &MeshState, budgets: &Budgets, host: &str) -> Option<RoutesReport> {
    let mut ports: Vec<_> = state
        .services
        .values()
        .filter(|s| s.hostname == host)
        .collect();
    if ports.is_empty() {
        return None;
    }
    ports.sort_by_key(|s| (s.port, s.cluster_ip));
    let namespace = ports[0].namespace.clone();
    let routes = state.routes.for_host(host, &namespace).map(Arc::clone);
    let pools = budgets.snapshot();
    let now = Instant::now();
    let ports = ports
        .into_iter()
        .map(|service| PortReport {
            port: service.port,
            address: format!("{}:{}", service.cluster_ip, service.port),
            http: service.http,
            protocol: service.protocol,
            endpoints: service
                .endpoints
                .iter()
                .map(|e| EndpointReport {
                    address: e.addr.to_string(),
                    pod: e.workload.as_ref().map(|w| w.key()),
                    subsets: service
                        .subsets
                        .iter()
                        .filter(|(_, s)| e.has_labels(&s.labels))
                        .map(|(name, _)| name.clone())
                        .collect(),
                    locality: e.locality.to_string(),
                })
                .collect(),
            load_balancers: std::iter::once((None, &service.lb))
                .chain(
                    service
                        .subsets
                        .iter()
                        .map(|(name, s)| (Some(name.clone()), &s.lb)),
                )
                .map(|(subset, lb)| BalancerReport {
                    subset,
                    summary: lb.describe(),
                    settings: lb.clone(),
                })
                .collect(),
            clusters: service
                .clusters
                .values()
                .map(|cluster| ClusterReport {
                    name: cluster.name.clone(),
                    outliers: cluster
                        .outliers
                        .as_ref()
                        .map(|t| t.snapshot(now).endpoints)
                        .unwrap_or_default(),
                    pools: pools
                        .iter()
                        .filter(|p| p.cluster == cluster.name)
                        .cloned()
                        .collect(),
                })
                .collect(),
        })
        .collect();
    Some(RoutesReport {
        host: host.to_owned(),
        virtual_service: routes.as_ref().map(|r| r.virtual_service.clone()),
        http: routes.as_ref().map(|r| r.http.clone()).unwrap_or_default(),
        tls: routes.as_ref().map(|r| r.tls.clone()).unwrap_or_default(),
        tcp: routes.as_ref().map(|r| r.tcp.clone()).unwrap_or_default(),
        ports,
    })
}

/// A request `meshctl route check` asks about.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteQuery {
    /// The client pod, `namespace/name`.
    pub from: String,
    /// The destination hostname.
    pub host: String,
    /// The Service port; the host's only port when absent.
    pub port: Option<u16>,
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// Which route the request takes and where it goes.
#[derive(Debug, Serialize)]
pub struct RouteAnswer {
    pub host: String,
    pub port: u16,
    /// `None`: no VirtualService applies; the request goes to the Service as it is,
    /// balanced per connection.
    pub virtual_service: Option<String>,
    /// The route that matched (`None` with a VirtualService: 404 `NR`).
    pub route: Option<String>,
    /// Why: the routes before it that did not match, and the one that did.
    pub why: Vec<String>,
    /// Where a routed request would go, with each destination's share.
    pub destinations: Vec<WeightedDestination>,
    /// A redirect or direct response instead of a destination.
    pub answer: Option<String>,
}

/// Answers `query` from `state`; an error names what could not be found.
pub fn route_check(state: &MeshState, query: &RouteQuery) -> Result<RouteAnswer, String> {
    let (namespace, pod) = query
        .from
        .split_once('/')
        .unwrap_or(("default", query.from.as_str()));
    let source = state
        .workloads
        .values()
        .find(|w| w.namespace == namespace && w.pod == pod)
        .ok_or_else(|| format!("no meshed pod {namespace}/{pod}"))?;
    let mut ports: Vec<_> = state
        .services
        .values()
        .filter(|s| s.hostname == query.host)
        .collect();
    ports.sort_by_key(|s| s.port);
    let port = match query.port {
        Some(port) => ports.into_iter().find(|s| s.port == port),
        None if ports.len() == 1 => ports.pop(),
        None => {
            let known: Vec<String> = ports.iter().map(|s| s.port.to_string()).collect();
            return Err(format!(
                "{} has ports {}: say which with --port",
                query.host,
                known.join(", ")
            ));
        }
    }
    .ok_or_else(|| format!("no Service port {:?} of {}", query.port, query.host))?;
    let mut answer = RouteAnswer {
        host: query.host.clone(),
        port: port.port,
        virtual_service: None,
        route: None,
        why: Vec::new(),
        destinations: Vec::new(),
        answer: None,
    };
    let Some(routes) = state.routes.for_host(&query.host, &source.namespace) else {
        answer
            .why
            .push("no VirtualService for this host is visible from the client's namespace".into());
        return Ok(answer);
    };
    answer.virtual_service = Some(routes.virtual_service.clone());
    match port.protocol {
        PortProtocol::Http => {}
        PortProtocol::Undeclared => answer.why.push(format!(
            "port {} declares no protocol: a connection that opens with HTTP is routed so",
            port.port
        )),
        PortProtocol::Tls | PortProtocol::Opaque => {
            answer.why.push(format!(
                "port {} is not declared HTTP: requests are not routed (tls and tcp routes apply)",
                port.port
            ));
            return Ok(answer);
        }
    }
    let mut headers = HeaderMap::new();
    for (name, value) in &query.headers {
        let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("{name:?} is not a header name"))?;
        let value =
            HeaderValue::from_str(value).map_err(|_| format!("{value:?} is not a header value"))?;
        headers.append(name, value);
    }
    let (path, query_string) = match query.path.split_once('?') {
        Some((path, q)) => (path, Some(q)),
        None => (query.path.as_str(), None),
    };
    let authority = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map_or_else(|| format!("{}:{}", query.host, port.port), str::to_owned);
    let facts = RequestFacts {
        method: &query.method,
        scheme: "http",
        authority: &authority,
        path,
        query: query_string,
        headers: &headers,
        port: port.port,
        source,
    };
    for rule in &routes.http {
        if routes.select_rule(rule, &facts) {
            answer.route = Some(rule.name.clone());
            answer.why.push(format!("route {} matches", rule.name));
            match &rule.action {
                Action::Route(destinations) => answer.destinations = destinations.clone(),
                Action::Redirect(redirect) => {
                    answer.answer = Some(format!(
                        "{} redirect to {}",
                        redirect.status.as_u16(),
                        redirect.location(&facts)
                    ))
                }
                Action::DirectResponse { status, .. } => {
                    answer.answer = Some(format!("{} direct response", status.as_u16()))
                }
            }
            return Ok(answer);
        }
        answer
            .why
            .push(format!("route {} does not match", rule.name));
    }
    answer.answer = Some("404 no route matched (NR)".into());
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    #[test]
    fn a_host_s_routes_endpoints_and_subsets_are_reported() {
        let yaml = "\
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: shop, labels: {app: reviews, version: v1}}
spec: {nodeName: node-a}
status: {podIP: 10.244.1.20}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.20, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 2}}
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http: [{name: all, route: [{destination: {host: reviews, subset: v1}}]}]
";
        let config = load_str(std::path::Path::new("routes.yaml"), yaml);
        assert!(config.errors().next().is_none(), "{:?}", config.diagnostics);
        let state = MeshState::build("node-a", &config);
        let report = routes_report(
            &state,
            &Budgets::default(),
            "reviews.shop.svc.cluster.local",
        )
        .expect("known host");
        assert_eq!(report.virtual_service.as_deref(), Some("shop/reviews"));
        assert_eq!(report.http[0].name, "all");
        let port = &report.ports[0];
        assert!(port.http);
        assert_eq!(port.endpoints[0].address, "10.244.1.20:9080");
        assert_eq!(port.endpoints[0].subsets, ["v1"]);
        assert_eq!(
            port.clusters[0].name,
            "outbound|9080||reviews.shop.svc.cluster.local"
        );
        assert_eq!(port.clusters[0].outliers.len(), 1);
        assert!(!port.clusters[0].outliers[0].ejected);
        assert!(routes_report(
            &state,
            &Budgets::default(),
            "nothing.shop.svc.cluster.local"
        )
        .is_none());
    }
    #[test]
    fn tls_routes_cors_and_ports_declaring_nothing_are_reported() {
        let yaml = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.30, selector: {app: web}, ports: [{name: web, port: 443}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - name: site
    corsPolicy: {allowOrigins: [{exact: 'https://shop.example'}], allowMethods: [GET, POST]}
    route: [{destination: {host: web}}]
  tls:
  - match: [{sniHosts: [a.example]}]
    route: [{destination: {host: web}}]
";
        let config = load_str(std::path::Path::new("routes.yaml"), yaml);
        assert!(config.errors().next().is_none(), "{:?}", config.diagnostics);
        let state = MeshState::build("node-a", &config);
        let report = routes_report(&state, &Budgets::default(), "web.shop.svc.cluster.local")
            .expect("known host");
        let json = serde_json::to_value(&report).expect("JSON");
        assert_eq!(json["ports"][0]["protocol"], "undeclared");
        assert_eq!(json["tls"][0]["matches"][0]["sni_hosts"][0], "a.example");
        assert_eq!(
            json["tls"][0]["destinations"][0]["host"],
            "web.shop.svc.cluster.local"
        );
        let cors = &json["http"][0]["cors"];
        assert_eq!(cors["allow_origins"][0], "exact https://shop.example");
        assert_eq!(cors["allow_methods"], "GET,POST");
        assert_eq!(cors["forward_unmatched_preflights"], true);
    }
}
