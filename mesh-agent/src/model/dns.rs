//! The cluster's names, as the node agent's DNS proxy answers them: each Service's
//! `name.namespace.svc.cluster.local` (its cluster IP, or a headless Service's ready pods),
//! a headless Service's named pods (`hostname.service.namespace.svc.cluster.local`, a
//! StatefulSet's `web-0.web…`) and each ServiceEntry host (its addresses), and how a
//! pod's question maps onto them: short names (`name`, `name.namespace`,
//! `name.namespace.svc`, `web-0.web`) complete through Kubernetes' search path from the
//! asking pod's namespace; an unknown name under the cluster domain does not exist; any
//! other name is the node's resolvers' to answer.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use crate::{
    config::{validate::fqdn, ClusterConfig},
    model::{discovery::ConfigIndex, entry_addresses::EntryAddresses, scope::export_scope},
};

/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// What the proxy does with a question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// A name of the mesh, with its IPv4 addresses (none: it exists, without addresses).
    Addresses(Vec<Ipv4Addr>),
    /// A name under the cluster domain that names nothing: NXDOMAIN.
    NoSuchName,
    /// Not the mesh's name: the node's resolvers answer it.
    Forward,
}

/// The mesh's names (lower case, without a trailing dot), what they answer and to whom.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsRecords {
    names: HashMap<String, Record>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Record {
    addresses: BTreeSet<Ipv4Addr>,
    /// The namespaces whose pods get the answer; none: every namespace.
    visible_to: Option<BTreeSet<String>>,
    /// The cluster's DNS answers it (an `ExternalName` Service: a CNAME).
    forwarded: bool,
}

impl Record {
    fn visible_to(&self, namespace: Option<&str>) -> bool {
        match &self.visible_to {
            None => true,
            Some(namespaces) => namespace.is_some_and(|ns| namespaces.contains(ns)),
        }
    }
}

impl DnsRecords {
    /// The names of `config`: Services (a headless one by its ready pods) and ServiceEntry
    /// hosts with addresses, their own or `allocated`.
    pub fn of(
        config: &ClusterConfig,
        index: &ConfigIndex,
        allocated: &EntryAddresses,
    ) -> DnsRecords {
        let mut names: HashMap<String, Record> = HashMap::new();
        for service in &config.services {
            let namespace = service.metadata.namespace();
            let name = format!("{}.{namespace}.svc.{CLUSTER_DOMAIN}", service.metadata.name)
                .to_ascii_lowercase();
            let record = names.entry(name).or_default();
            if service.spec.service_type.as_deref() == Some("ExternalName") {
                record.forwarded = true;
                continue;
            }
            match service.spec.cluster_ip.as_deref() {
                Some("None") => {
                    let members = headless_members(index, service);
                    record
                        .addresses
                        .extend(members.iter().map(|(address, _)| *address));
                    for (address, hostname) in members {
                        let Some(hostname) = hostname else { continue };
                        let own = format!(
                            "{hostname}.{}.{namespace}.svc.{CLUSTER_DOMAIN}",
                            service.metadata.name
                        )
                        .to_ascii_lowercase();
                        names.entry(own).or_default().addresses.insert(address);
                    }
                }
                Some(ip) => record.addresses.extend(ip.parse::<Ipv4Addr>().ok()),
                None => {}
            }
        }
        // A Service's own name is never a ServiceEntry's to answer.
        let services: BTreeSet<String> = names.keys().cloned().collect();
        for entry in &config.istio.service_entries {
            let namespace = entry.namespace();
            let given: Vec<Ipv4Addr> = entry
                .spec
                .addresses
                .iter()
                .filter_map(|block| {
                    let single = block.0.strip_suffix("/32").unwrap_or(&block.0);
                    single.parse().ok()
                })
                .collect();
            let scope: Option<BTreeSet<String>> = export_scope(&entry.spec.export_to, namespace);
            for host in entry.spec.hosts.iter().filter(|h| !h.contains('*')) {
                let name = fqdn(host, namespace).to_ascii_lowercase();
                if services.contains(&name) {
                    continue;
                }
                let given: Vec<Ipv4Addr> = match allocated.get(namespace, &name) {
                    Some(ip) => vec![ip],
                    None => given.clone(),
                };
                if given.is_empty() {
                    continue;
                }
                let record = names.entry(name).or_insert_with(|| Record {
                    visible_to: Some(BTreeSet::new()),
                    ..Record::default()
                });
                record.addresses.extend(given.iter().copied());
                // Entries of the same host add up, addresses and audiences both.
                record.visible_to = match (record.visible_to.take(), &scope) {
                    (Some(mut seen), Some(more)) => {
                        seen.extend(more.iter().cloned());
                        Some(seen)
                    }
                    _ => None,
                };
            }
        }
        DnsRecords { names }
    }

    /// The record `name` gives a pod of `namespace`, if that pod may see it.
    fn visible(&self, name: &str, namespace: Option<&str>) -> Option<&Record> {
        self.names
            .get(name)
            .filter(|record| record.visible_to(namespace))
    }

    /// What to answer a pod of `namespace` (none: a client the mesh does not know) asking
    /// for `name`.
    pub fn resolve(&self, name: &str, namespace: Option<&str>) -> Resolution {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let answer = |record: &Record| {
            if record.forwarded {
                Resolution::Forward
            } else {
                Resolution::Addresses(record.addresses.iter().copied().collect())
            }
        };
        if let Some(record) = self.visible(&name, namespace) {
            return answer(record);
        }
        // The search path of a pod's resolv.conf, in its order.
        let search = [
            namespace.map(|namespace| format!("{namespace}.svc.{CLUSTER_DOMAIN}")),
            Some(format!("svc.{CLUSTER_DOMAIN}")),
            Some(CLUSTER_DOMAIN.to_owned()),
        ];
        if let Some(record) = search
            .iter()
            .flatten()
            .find_map(|domain| self.visible(&format!("{name}.{domain}"), namespace))
        {
            return answer(record);
        }
        if name == CLUSTER_DOMAIN || name.ends_with(&format!(".{CLUSTER_DOMAIN}")) {
            Resolution::NoSuchName
        } else {
            Resolution::Forward
        }
    }
}

/// A headless Service's members: its ready pods (the selector's), or the ready endpoints
/// of its EndpointSlices when it has no selector; each with its own name under the
/// Service, if it has one (a pod's `hostname` when its `subdomain` is the Service).
fn headless_members(
    index: &ConfigIndex,
    service: &crate::config::kube::Service,
) -> Vec<(Ipv4Addr, Option<String>)> {
    let namespace = service.metadata.namespace();
    let selector = &service.spec.selector;
    if !selector.is_empty() {
        return index
            .selected(namespace, selector)
            .into_iter()
            .filter(|pod| {
                service.spec.publish_not_ready_addresses
                    || (pod.is_ready() && !pod.is_terminating())
            })
            .filter_map(|pod| {
                let named = pod.spec.subdomain.as_deref() == Some(&service.metadata.name);
                let hostname = pod.spec.hostname.clone().filter(|_| named);
                Some((pod.running_address()?, hostname))
            })
            .collect();
    }
    index
        .slices_of(service)
        .iter()
        .flat_map(|slice| slice.endpoints.iter())
        .filter(|endpoint| endpoint.is_ready())
        .flat_map(|endpoint| {
            endpoint
                .addresses
                .iter()
                .filter_map(|address| Some((address.parse().ok()?, endpoint.hostname.clone())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: tcp, port: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {nodeName: node-a, hostname: db-0, subdomain: db, containers: [{name: db}]}
status: {phase: Running, podIP: 10.244.1.7}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {nodeName: node-a, containers: [{name: db}]}
status:
  phase: Running
  podIP: 10.244.1.8
  conditions: [{type: Ready, status: "False"}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [pay.example.com]
  addresses: [240.0.0.9]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.9}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ledger, namespace: shop}
spec:
  hosts: [ledger.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: shop}
spec:
  hosts: [legacy.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
"#;

    fn records() -> DnsRecords {
        let config = crate::config::load_documents([("cluster.yaml", CLUSTER)]);
        assert!(
            config
                .diagnostics
                .iter()
                .all(|d| d.severity != crate::config::Severity::Error),
            "{:?}",
            config.diagnostics
        );
        DnsRecords::of(
            &config,
            &ConfigIndex::of(&config),
            &EntryAddresses::of(&config),
        )
    }

    fn addresses(list: &[[u8; 4]]) -> Resolution {
        Resolution::Addresses(list.iter().map(|a| Ipv4Addr::from(*a)).collect())
    }

    #[test]
    fn a_service_answers_to_every_form_of_its_name_from_its_namespace() {
        let records = records();
        let reviews = addresses(&[[10, 96, 0, 20]]);
        for name in [
            "reviews.shop.svc.cluster.local",
            "reviews.shop.svc.cluster.local.",
            "Reviews.Shop.SVC.cluster.local",
            "reviews.shop.svc",
            "reviews.shop",
        ] {
            assert_eq!(records.resolve(name, Some("web")), reviews, "{name}");
        }
        assert_eq!(records.resolve("reviews", Some("shop")), reviews);
        // A short name is the asking pod's namespace's.
        assert_eq!(records.resolve("reviews", Some("web")), Resolution::Forward);
        assert_eq!(records.resolve("reviews", None), Resolution::Forward);
    }

    #[test]
    fn a_headless_service_answers_with_its_ready_pods() {
        assert_eq!(
            records().resolve("db.shop.svc.cluster.local", None),
            addresses(&[[10, 244, 1, 7]])
        );
    }

    #[test]
    fn a_headless_services_named_pods_answer_to_their_own_names() {
        let records = records();
        let db_0 = addresses(&[[10, 244, 1, 7]]);
        for name in [
            "db-0.db.shop.svc.cluster.local",
            "db-0.db.shop.svc",
            "db-0.db.shop",
        ] {
            assert_eq!(records.resolve(name, Some("web")), db_0, "{name}");
        }
        assert_eq!(records.resolve("db-0.db", Some("shop")), db_0);
        // Only a pod whose subdomain is the Service has a name under it.
        assert_eq!(
            records.resolve("db-0.reviews.shop.svc.cluster.local", None),
            Resolution::NoSuchName
        );
        assert_eq!(
            records.resolve("db-1.db.shop.svc.cluster.local", None),
            Resolution::NoSuchName
        );
    }

    #[test]
    fn service_entry_hosts_answer_with_their_addresses() {
        let records = records();
        assert_eq!(
            records.resolve("pay.example.com", None),
            addresses(&[[240, 0, 0, 9]])
        );
        // Without addresses, the host has one allocated (resolution DNS), unless its
        // resolution is NONE: then it is the node's resolvers' to answer.
        match records.resolve("ledger.example.com", None) {
            Resolution::Addresses(ips) => {
                assert_eq!(ips.len(), 1);
                assert_eq!(ips[0].octets()[..2], [240, 240]);
            }
            other => panic!("ledger: {other:?}"),
        }
        assert_eq!(
            records.resolve("legacy.example.com", None),
            Resolution::Forward
        );
    }

    #[test]
    fn a_service_entry_answers_only_where_exported_and_never_for_a_service() {
        let cluster = format!(
            "{CLUSTER}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: private, namespace: shop}}
spec:
  hosts: [ledger.internal, reviews.shop.svc.cluster.local]
  addresses: [240.0.0.7]
  exportTo: [.]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 10.0.0.7}}]
---
apiVersion: v1
kind: Service
metadata: {{name: mail, namespace: shop}}
spec: {{type: ExternalName, externalName: mail.example.com}}
"
        );
        let config = crate::config::load_documents([("cluster.yaml", cluster.as_str())]);
        let records = DnsRecords::of(
            &config,
            &ConfigIndex::of(&config),
            &EntryAddresses::of(&config),
        );
        assert_eq!(
            records.resolve("ledger.internal", Some("shop")),
            addresses(&[[240, 0, 0, 7]])
        );
        assert_eq!(
            records.resolve("ledger.internal", Some("web")),
            Resolution::Forward
        );
        assert_eq!(
            records.resolve("ledger.internal", None),
            Resolution::Forward
        );
        // The Service keeps its own name, whatever an entry says.
        assert_eq!(
            records.resolve("reviews.shop.svc.cluster.local", Some("shop")),
            addresses(&[[10, 96, 0, 20]])
        );
        // An ExternalName Service is the cluster DNS's to answer (with its CNAME).
        assert_eq!(
            records.resolve("mail.shop", Some("web")),
            Resolution::Forward
        );
    }

    #[test]
    fn unknown_cluster_names_do_not_exist_and_the_rest_is_forwarded() {
        let records = records();
        for name in [
            "nope.shop.svc.cluster.local",
            "reviews.shop.svc.cluster.local.shop.svc.cluster.local",
            "cluster.local",
        ] {
            assert_eq!(
                records.resolve(name, Some("shop")),
                Resolution::NoSuchName,
                "{name}"
            );
        }
        for name in ["example.com", "www.example.com.", "localhost"] {
            assert_eq!(
                records.resolve(name, Some("shop")),
                Resolution::Forward,
                "{name}"
            );
        }
    }
}
