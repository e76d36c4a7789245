//! Which pods the mesh takes in, by Istio ambient's rule: the `istio.io/dataplane-mode`
//! label of the pod, else of its namespace, else the mesh-wide default. One rule for the
//! agent (which pods get an identity and the kernel programs) and the sandbox (which
//! pods wait for their enrollment).

/// The label Istio's ambient mode reads, on pods and namespaces.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The value that enrolls a namespace or a pod.
pub const AMBIENT: &str = "ambient";
/// The value that keeps a pod (or a namespace's pods) out, whatever else says.
pub const NONE: &str = "none";

/// What happens to a pod when neither it nor its namespace carries the label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultEnrollment {
    /// Out, as in Istio ambient: a namespace or pod joins with `ambient`.
    #[default]
    None,
    /// In, unless labelled `none`: the whole mesh enrolled by default.
    Ambient,
}

/// The labels and annotation of a pod that decide its enrollment.
#[derive(Debug, Clone, Copy, Default)]
pub struct PodEnrollment<'a> {
    /// The label's value on the pod.
    pub pod_label: Option<&'a str>,
    /// The label's value on the pod's namespace.
    pub namespace_label: Option<&'a str>,
    /// Whether Istio injected a sidecar (annotation `sidecar.istio.io/status`): the
    /// sidecar is the pod's proxy, so ambient leaves the pod alone.
    pub has_sidecar: bool,
}

/// The annotation Istio's injector leaves on a pod with a sidecar.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// Whether a pod is in the mesh. The pod's own label wins (`none` keeps it out of an
/// enrolled namespace, `ambient` takes it in from any namespace), then its namespace's,
/// then the default; an unknown value counts as absent. Pods with a sidecar stay out.
pub fn enrolled(pod: PodEnrollment, default: DefaultEnrollment) -> bool {
    if pod.has_sidecar {
        return false;
    }
    match (pod.pod_label, pod.namespace_label) {
        (Some(NONE), _) => false,
        (Some(AMBIENT), _) => true,
        (_, Some(NONE)) => false,
        (_, Some(AMBIENT)) => true,
        _ => default == DefaultEnrollment::Ambient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_label_then_the_namespace_label_then_the_default_decide() {
        use DefaultEnrollment as D;
        let cases = [
            (None, None, D::None, false),
            (None, None, D::Ambient, true),
            (None, Some(AMBIENT), D::None, true),
            (Some(AMBIENT), None, D::None, true),
            (Some(NONE), Some(AMBIENT), D::None, false),
            (Some(NONE), None, D::Ambient, false),
            (None, Some(NONE), D::Ambient, false),
            (Some(AMBIENT), Some(NONE), D::None, true),
            (Some("sidecar"), None, D::None, false),
            (Some("sidecar"), Some(AMBIENT), D::None, true),
        ];
        for (pod, namespace, default, expected) in cases {
            let labels = PodEnrollment {
                pod_label: pod,
                namespace_label: namespace,
                has_sidecar: false,
            };
            assert_eq!(
                enrolled(labels, default),
                expected,
                "pod {pod:?}, namespace {namespace:?}, default {default:?}"
            );
        }
    }

    #[test]
    fn a_pod_with_a_sidecar_stays_out_of_an_enrolled_namespace() {
        let pod = PodEnrollment {
            pod_label: None,
            namespace_label: Some(AMBIENT),
            has_sidecar: true,
        };
        assert!(!enrolled(pod, DefaultEnrollment::Ambient));
    }
}
