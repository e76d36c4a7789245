//! What `meshctl routes HOST` shows, read from the live state: the VirtualService of a
//! host with its routes and weighted destinations, and each port of the host with its
//! endpoints, their outlier state and the connection pool occupancy of each cluster.

use std::{sync::Arc, time::Instant};

use serde::Serialize;

use crate::model::{
    circuit::{BudgetSnapshot, Budgets},
    outlier::EndpointOutlierState,
    routing::{HttpRule, TcpRule},
    MeshState,
};

#[derive(Debug, Serialize)]
pub struct RoutesReport {
    pub host: String,
    /// `namespace/name` of the VirtualService pods of the host's namespace use.
    pub virtual_service: Option<String>,
    pub http: Vec<HttpRule>,
    pub tcp: Vec<TcpRule>,
    pub ports: Vec<PortReport>,
}

#[derive(Debug, Serialize)]
pub struct PortReport {
    pub port: u16,
    pub address: String,
    pub http: bool,
    pub endpoints: Vec<EndpointReport>,
    pub clusters: Vec<ClusterReport>,
}

#[derive(Debug, Serialize)]
pub struct EndpointReport {
    pub address: String,
    pub pod: Option<String>,
    pub subsets: Vec<String>,
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
            endpoints: service
                .endpoints
                .iter()
                .map(|e| EndpointReport {
                    address: e.addr.to_string(),
                    pod: e.workload.as_ref().map(|w| w.key()),
                    subsets: service
                        .subsets
                        .iter()
                        .filter(|(_, s)| s.labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
                        .map(|(name, _)| name.clone())
                        .collect(),
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
        tcp: routes.as_ref().map(|r| r.tcp.clone()).unwrap_or_default(),
        ports,
    })
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
}
