//! Which objects of the Kubernetes API the agent serves. A directory is one change that
//! is taken or rejected whole; the API is many writers each changing their own objects,
//! so one invalid VirtualService must not hold back every pod that comes and goes after
//! it. Each object is judged on its own: a valid one is served as the API has it; an
//! invalid one is skipped — its last good version keeps serving, or, new, it is left
//! out — and reported, while everything else goes on.

use std::{collections::BTreeMap, sync::Arc};

use super::{ClusterConfig, Diagnostic, DocumentCache};

/// The objects of a source: name → text, one object each. The texts are shared, so that
/// passing every object at each change copies none.
pub type Objects = BTreeMap<String, Arc<str>>;

/// The last good version of each object, by the name its document is loaded under.
#[derive(Default)]
pub struct Admission {
    accepted: Objects,
    documents: DocumentCache,
}

/// A configuration without errors, and the objects skipped to get it.
#[derive(Debug)]
pub struct Admitted {
    pub config: ClusterConfig,
    pub skipped: Vec<Diagnostic>,
}

impl Admission {
    /// From the documents the API holds now (name → text, one object each), the
    /// configuration to serve. An object with an error falls back to its last good
    /// version, or is left out when it has none (or that one fails too, for a change
    /// elsewhere); then the rest is judged again, until nothing fails.
    pub fn admit(&mut self, current: &Objects) -> Admitted {
        let mut candidate = current.clone();
        let mut skipped: Vec<Diagnostic> = Vec::new();
        loop {
            let config = self
                .documents
                .load(candidate.iter().map(|(n, t)| (n.as_str(), t)));
            let failing: Vec<(String, Diagnostic)> = config
                .errors()
                .filter_map(|d| {
                    let name = d.file.to_str()?;
                    candidate
                        .contains_key(name)
                        .then(|| (name.to_owned(), d.clone()))
                })
                .collect();
            // Every round drops or reverts each failing object, and a reverted one is
            // dropped if it fails again: the loop ends within two rounds per object.
            if failing.is_empty() {
                self.accepted = candidate;
                return Admitted { config, skipped };
            }
            for (name, mut diagnostic) in failing {
                let kept = self
                    .accepted
                    .get(&name)
                    .filter(|last| candidate.get(&name) != Some(*last))
                    .cloned();
                diagnostic.message.push_str(match kept {
                    Some(_) => " (change skipped: the last good version keeps serving)",
                    None => " (object skipped)",
                });
                match kept {
                    Some(last) => candidate.insert(name, last),
                    None => candidate.remove(&name),
                };
                if !skipped.contains(&diagnostic) {
                    skipped.push(diagnostic);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {nodeName: n1, containers: []}\nstatus: {podIP: 10.244.1.2, phase: Running}\n";

    fn route(weight: i32) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: shop}}\n\
             spec:\n  hosts: [web]\n  http:\n  - route:\n    - destination: {{host: web}}\n      weight: {weight}\n"
        )
    }

    fn objects(entries: &[(&str, &str)]) -> Objects {
        entries
            .iter()
            .map(|(n, t)| (n.to_string(), Arc::from(*t)))
            .collect()
    }

    #[test]
    fn an_invalid_change_keeps_the_last_good_version_and_the_rest_moves_on() {
        let mut admission = Admission::default();
        let first = admission.admit(&objects(&[("vs", &route(100))]));
        assert!(first.skipped.is_empty(), "{:?}", first.skipped);
        assert_eq!(first.config.istio.virtual_services.len(), 1);

        // The route's weight is out of range, and a pod arrives at the same time.
        let second = admission.admit(&objects(&[("vs", &route(140)), ("pod", POD)]));
        assert_eq!(second.skipped.len(), 1, "{:?}", second.skipped);
        assert!(
            second.skipped[0]
                .message
                .contains("last good version keeps serving"),
            "{}",
            second.skipped[0]
        );
        assert_eq!(second.config.errors().count(), 0);
        assert_eq!(second.config.pods.len(), 1, "the pod is served");
        let weight = &second.config.istio.virtual_services[0].spec.http[0].route[0].weight;
        assert_eq!(*weight, Some(100), "the last good route serves");

        // Fixed: served as the API has it.
        let third = admission.admit(&objects(&[("vs", &route(100)), ("pod", POD)]));
        assert!(third.skipped.is_empty());
    }

    #[test]
    fn a_new_invalid_object_is_left_out_and_a_deleted_one_is_gone() {
        let mut admission = Admission::default();
        let admitted = admission.admit(&objects(&[("vs", &route(107)), ("pod", POD)]));
        assert_eq!(admitted.config.istio.virtual_services.len(), 0);
        assert_eq!(admitted.config.pods.len(), 1);
        assert!(admitted.skipped[0].message.ends_with("(object skipped)"));
        assert!(admitted.skipped[0]
            .to_string()
            .contains("VirtualService shop/web"));

        let admitted = admission.admit(&objects(&[]));
        assert_eq!(admitted.config.pods.len(), 0);
        assert!(admitted.skipped.is_empty());
    }
}
