//! Which workloads a policy-like resource applies to, as Istio scopes them: the root
//! namespace without a selector (the whole mesh), a namespace, a `selector`, or
//! `targetRef(s)` naming Services (their selector's pods). Shared by AuthorizationPolicy,
//! RequestAuthentication and Telemetry.

use std::collections::BTreeMap;

use crate::{
    config::{istio::PolicyTargetReference, ClusterConfig},
    model::Workload,
};

/// The namespaces an `exportTo` list (of a resource in `namespace`) names, `.` being the
/// resource's own; none when it is empty or holds `*`: every namespace.
pub fn export_scope<C: FromIterator<String>>(export_to: &[String], namespace: &str) -> Option<C> {
    (!export_to.is_empty() && !export_to.iter().any(|e| e == "*")).then(|| {
        export_to
            .iter()
            .map(|e| {
                if e == "." {
                    namespace.to_owned()
                } else {
                    e.clone()
                }
            })
            .collect()
    })
}

/// Which workloads a policy applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    /// Every workload of the mesh (root namespace, no selector).
    Mesh,
    /// Workloads of `namespace` (any namespace when `None`) whose labels include these;
    /// empty labels select every workload of the namespace.
    Labels {
        namespace: Option<String>,
        labels: BTreeMap<String, String>,
    },
    /// Several scopes (one per `targetRefs` entry); a workload in any of them.
    Any(Vec<Scope>),
    /// Nothing (a `targetRef` to something that selects no workload).
    Nothing,
}

impl Scope {
    pub fn selects(&self, workload: &Workload) -> bool {
        match self {
            Scope::Mesh => true,
            Scope::Labels { namespace, labels } => {
                namespace
                    .as_ref()
                    .is_none_or(|ns| *ns == workload.namespace)
                    && labels
                        .iter()
                        .all(|(k, v)| workload.labels.get(k) == Some(v))
            }
            Scope::Any(scopes) => scopes.iter().any(|s| s.selects(workload)),
            Scope::Nothing => false,
        }
    }
}

/// The workloads a resource of `namespace` applies to.
pub fn scope_of<'a>(
    namespace: &str,
    selector: Option<&BTreeMap<String, String>>,
    target_refs: impl Iterator<Item = &'a PolicyTargetReference>,
    config: &ClusterConfig,
    root_namespace: &str,
) -> Scope {
    let refs: Vec<&PolicyTargetReference> = target_refs.collect();
    if !refs.is_empty() {
        return Scope::Any(
            refs.iter()
                .map(|r| target_scope(r, namespace, config))
                .collect(),
        );
    }
    let labels = selector.cloned().unwrap_or_default();
    if namespace == root_namespace && labels.is_empty() {
        Scope::Mesh
    } else {
        Scope::Labels {
            namespace: (namespace != root_namespace).then(|| namespace.to_owned()),
            labels,
        }
    }
}

fn target_scope(target: &PolicyTargetReference, namespace: &str, config: &ClusterConfig) -> Scope {
    let target_namespace = target.namespace.as_deref().unwrap_or(namespace);
    if target.kind != "Service" || target_namespace != namespace {
        return Scope::Nothing;
    }
    config
        .services
        .iter()
        .find(|s| s.metadata.namespace() == namespace && s.metadata.name == target.name)
        .map(|s| s.spec.selector.clone())
        .filter(|labels| !labels.is_empty())
        .map_or(Scope::Nothing, |labels| Scope::Labels {
            namespace: Some(namespace.to_owned()),
            labels,
        })
}
