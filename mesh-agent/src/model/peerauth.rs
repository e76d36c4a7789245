//! PeerAuthentication with Istio's precedence: a workload's own policy (selector) over its
//! namespace's over the mesh-wide one (root namespace); `UNSET` inherits; `portLevelMtls`
//! of the workload's policy overrides per port. The default is PERMISSIVE.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    config::{
        istio::{MtlsMode, PeerAuthentication},
        ClusterConfig, Resource,
    },
    model::Workload,
};

/// A workload's effective modes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WorkloadMtls {
    pub mode: Effective,
    /// Ports whose mode differs from `mode`.
    pub ports: BTreeMap<u16, Effective>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Effective {
    #[default]
    Permissive,
    Strict,
    Disable,
}

impl WorkloadMtls {
    pub fn for_port(&self, port: u16) -> Effective {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

fn set(mode: Option<MtlsMode>) -> Option<Effective> {
    match mode? {
        MtlsMode::Unset => None,
        MtlsMode::Permissive => Some(Effective::Permissive),
        MtlsMode::Strict => Some(Effective::Strict),
        MtlsMode::Disable => Some(Effective::Disable),
    }
}

fn mode_of(policy: Option<&Resource<PeerAuthentication>>) -> Option<Effective> {
    set(policy?.spec.mtls.as_ref()?.mode)
}

/// Policies are taken oldest-name-first when several apply at one level, so the choice is
/// stable across reloads.
fn first(
    mut candidates: Vec<&Resource<PeerAuthentication>>,
) -> Option<&Resource<PeerAuthentication>> {
    candidates.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    candidates.into_iter().next()
}

pub fn modes(config: &ClusterConfig, workload: &Workload, root_namespace: &str) -> WorkloadMtls {
    let policies = &config.istio.peer_authentications;
    let selects = |pa: &Resource<PeerAuthentication>| {
        pa.spec.selector.as_ref().is_some_and(|s| {
            !s.match_labels.is_empty()
                && s.match_labels
                    .iter()
                    .all(|(k, v)| workload.labels.get(k) == Some(v))
        })
    };
    let unselected = |pa: &Resource<PeerAuthentication>| {
        pa.spec
            .selector
            .as_ref()
            .is_none_or(|s| s.match_labels.is_empty())
    };
    let own = first(
        policies
            .iter()
            .filter(|pa| pa.namespace() == workload.namespace && selects(pa))
            .collect(),
    );
    let namespace = first(
        policies
            .iter()
            .filter(|pa| pa.namespace() == workload.namespace && unselected(pa))
            .collect(),
    );
    let mesh = first(
        policies
            .iter()
            .filter(|pa| pa.namespace() == root_namespace && unselected(pa))
            .collect(),
    );
    let mode = mode_of(own)
        .or(mode_of(namespace))
        .or(mode_of(mesh))
        .unwrap_or_default();
    let ports = own
        .map(|pa| {
            pa.spec
                .port_level_mtls
                .iter()
                .filter_map(|(port, mtls)| Some((u16::try_from(*port).ok()?, set(mtls.mode)?)))
                .filter(|(_, m)| *m != mode)
                .collect()
        })
        .unwrap_or_default();
    WorkloadMtls { mode, ports }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::load_str, model::MeshState};

    fn modes_of(yaml: &str, pod: &str) -> WorkloadMtls {
        let config = load_str(std::path::Path::new("t.yaml"), yaml);
        let state = MeshState::build("n", &config);
        let workload = state
            .workloads
            .values()
            .find(|w| w.pod == pod)
            .expect("pod");
        modes(&config, workload, crate::config::DEFAULT_ROOT_NAMESPACE)
    }

    const PODS: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: n}
status: {podIP: 10.244.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: misc}
spec: {nodeName: n}
status: {podIP: 10.244.1.4}
";

    fn pa(name: &str, namespace: &str, rest: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{rest}"
        )
    }

    #[test]
    fn permissive_by_default_and_mesh_wide_strict_applies_everywhere() {
        assert_eq!(modes_of(PODS, "web").mode, Effective::Permissive);
        let yaml = format!(
            "{PODS}{}",
            pa("default", "istio-system", "  mtls: {mode: STRICT}\n")
        );
        assert_eq!(modes_of(&yaml, "web").mode, Effective::Strict);
        assert_eq!(modes_of(&yaml, "other").mode, Effective::Strict);
    }

    #[test]
    fn workload_over_namespace_over_mesh_and_unset_inherits() {
        let yaml = format!(
            "{PODS}{}{}{}",
            pa("default", "istio-system", "  mtls: {mode: STRICT}\n"),
            pa("ns", "shop", "  mtls: {mode: PERMISSIVE}\n"),
            pa(
                "db",
                "shop",
                "  selector: {matchLabels: {app: db}}\n  mtls: {mode: DISABLE}\n"
            ),
        );
        assert_eq!(modes_of(&yaml, "web").mode, Effective::Permissive);
        assert_eq!(modes_of(&yaml, "db").mode, Effective::Disable);
        assert_eq!(modes_of(&yaml, "other").mode, Effective::Strict);
        let unset = format!(
            "{PODS}{}{}",
            pa("ns", "shop", "  mtls: {mode: STRICT}\n"),
            pa(
                "web",
                "shop",
                "  selector: {matchLabels: {app: web}}\n  mtls: {mode: UNSET}\n"
            ),
        );
        assert_eq!(modes_of(&unset, "web").mode, Effective::Strict);
    }

    #[test]
    fn port_level_mtls_overrides_the_workload_mode() {
        let yaml = format!(
            "{PODS}{}",
            pa(
                "web",
                "shop",
                "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n    9090: {mode: STRICT}\n"
            )
        );
        let web = modes_of(&yaml, "web");
        assert_eq!(web.mode, Effective::Strict);
        assert_eq!(web.for_port(8080), Effective::Permissive);
        assert_eq!(web.for_port(9090), Effective::Strict);
        assert_eq!(
            web.ports.len(),
            1,
            "a port equal to the workload mode needs no entry"
        );
    }
}
