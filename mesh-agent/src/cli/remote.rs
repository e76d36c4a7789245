//! Reaching a node's agent from anywhere a kubeconfig works: `meshctl --node NODE` (or
//! `--pod POD`, for that pod's node) finds the agent pod scheduled on the node through the
//! Kubernetes API and reaches its ports by port-forward through the API server. The
//! kubelet connects to the port inside the agent pod's network namespace, which is the
//! node's own (the agent runs with hostNetwork), so the admin API stays on the node's
//! loopback; the user needs `get`/`list` on pods and `create` on `pods/portforward` in the
//! agent's namespace, as for `kubectl port-forward`.

use std::{path::Path, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use crate::{
    config::kube_api::{self, KubeSourceError},
    http::client::{self, ClientError, Request, Response},
};

/// The label of the agent's DaemonSet pods (deploy/mesh-agent.yaml and the chart).
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=mesh-agent";

/// Which node's agent to reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Node(String),
    /// The agent of the node this pod is scheduled on.
    Pod {
        namespace: String,
        name: String,
    },
}

impl Target {
    /// `namespace/name`, or `name` in `default`.
    pub fn pod(text: &str) -> Result<Target, String> {
        let (namespace, name) = text.split_once('/').unwrap_or(("default", text));
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(format!("--pod {text:?}: expected namespace/name or name"));
        }
        Ok(Target::Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Api(#[from] KubeSourceError),
    #[error("reading pod {pod} from the Kubernetes API at {server}")]
    Pod {
        pod: String,
        server: String,
        source: kube::Error,
    },
    #[error("pod {0} is not scheduled on a node yet, so no agent serves it")]
    Unscheduled(String),
    #[error("listing the mesh agents ({AGENT_SELECTOR}) in namespace {namespace} at {server}")]
    List {
        namespace: String,
        server: String,
        source: kube::Error,
    },
    #[error("{0}")]
    NoAgent(String),
    #[error("port-forward to {pod} port {port} through the API server at {server}")]
    PortForward {
        pod: String,
        port: u16,
        server: String,
        source: kube::Error,
    },
    #[error("the port-forward to {pod} port {port} gave no stream")]
    NoStream { pod: String, port: u16 },
    #[error("{pod} port {port}: {reason}")]
    Forwarded {
        pod: String,
        port: u16,
        reason: String,
    },
    #[error(transparent)]
    Exchange(#[from] ClientError),
}

/// How long the kubelet's reason for a failed forward is waited for.
const FORWARD_ERROR_WAIT: Duration = Duration::from_secs(2);

/// One node's agent pod, reached through the API server.
pub struct Remote {
    pods: Api<Pod>,
    pub pod: String,
    pub node: String,
    pub server: String,
}

impl Remote {
    /// Finds the agent pod of each target's node in `namespace`, with `kubeconfig` (else
    /// in-cluster, `$KUBECONFIG` or `~/.kube/config`).
    pub async fn find_all(
        kubeconfig: Option<&Path>,
        namespace: &str,
        targets: &[Target],
    ) -> Result<Vec<Arc<Remote>>, RemoteError> {
        let api = kube_api::connect(kubeconfig).await?;
        let mut found = Vec::with_capacity(targets.len());
        for target in targets {
            found.push(Arc::new(Remote::find(&api, namespace, target).await?));
        }
        Ok(found)
    }

    /// The agent of every node that has one, by node name.
    pub async fn find_every(
        kubeconfig: Option<&Path>,
        namespace: &str,
    ) -> Result<Vec<Arc<Remote>>, RemoteError> {
        let api = kube_api::connect(kubeconfig).await?;
        let pods = Api::<Pod>::namespaced(api.client.clone(), namespace);
        let agents = list_agents(&pods, namespace, &api.server).await?;
        let mut nodes: Vec<&str> = agents.iter().filter_map(node_of).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let mut found = Vec::new();
        for node in nodes {
            // A node whose only agent pod is not running yet is left out.
            if let Ok(pod) = pick_agent(&agents, node, namespace) {
                found.push(Arc::new(Remote {
                    pods: pods.clone(),
                    pod,
                    node: node.to_owned(),
                    server: api.server.clone(),
                }));
            }
        }
        if found.is_empty() {
            return Err(RemoteError::NoAgent(format!(
                "no mesh agent runs on any node: no running pod labelled {AGENT_SELECTOR} in \
                 namespace {namespace}"
            )));
        }
        Ok(found)
    }

    async fn find(
        api: &kube_api::ApiClient,
        namespace: &str,
        target: &Target,
    ) -> Result<Remote, RemoteError> {
        let server = api.server.clone();
        let node = match target {
            Target::Node(node) => node.clone(),
            Target::Pod {
                namespace: pod_namespace,
                name,
            } => {
                let pod = format!("{pod_namespace}/{name}");
                let found = Api::<Pod>::namespaced(api.client.clone(), pod_namespace)
                    .get(name)
                    .await
                    .map_err(|source| RemoteError::Pod {
                        pod: pod.clone(),
                        server: server.clone(),
                        source,
                    })?;
                found
                    .spec
                    .and_then(|spec| spec.node_name)
                    .ok_or(RemoteError::Unscheduled(pod))?
            }
        };
        let pods = Api::<Pod>::namespaced(api.client.clone(), namespace);
        let agents = list_agents(&pods, namespace, &server).await?;
        let pod = pick_agent(&agents, &node, namespace).map_err(RemoteError::NoAgent)?;
        Ok(Remote {
            pods,
            pod,
            node,
            server,
        })
    }

    /// Sends `request` to the agent's `port` over a port-forward of its own.
    pub async fn send(&self, port: u16, request: Request) -> Result<Response, RemoteError> {
        let mut forwarder = self
            .pods
            .portforward(&self.pod, &[port])
            .await
            .map_err(|source| RemoteError::PortForward {
                pod: self.pod.clone(),
                port,
                server: self.server.clone(),
                source,
            })?;
        let stream = forwarder
            .take_stream(port)
            .ok_or_else(|| RemoteError::NoStream {
                pod: self.pod.clone(),
                port,
            })?;
        let kubelet_error = forwarder.take_error(port);
        match client::send_over(stream, request).await {
            Ok(response) => {
                forwarder.abort();
                Ok(response)
            }
            Err(err) => {
                // The kubelet says why on the port's error channel (nothing listens there,
                // say); that beats the HTTP client's "connection closed".
                let reason = match kubelet_error {
                    Some(reason) => tokio::time::timeout(FORWARD_ERROR_WAIT, reason)
                        .await
                        .ok()
                        .flatten(),
                    None => None,
                };
                forwarder.abort();
                Err(match reason {
                    Some(reason) => RemoteError::Forwarded {
                        pod: self.pod.clone(),
                        port,
                        reason,
                    },
                    None => RemoteError::Exchange(err),
                })
            }
        }
    }

    /// The agent as messages name it.
    pub fn describe(&self) -> String {
        format!(
            "the agent {} on node {} (through {})",
            self.pod, self.node, self.server
        )
    }
}

async fn list_agents(
    pods: &Api<Pod>,
    namespace: &str,
    server: &str,
) -> Result<Vec<Pod>, RemoteError> {
    Ok(pods
        .list(&ListParams::default().labels(AGENT_SELECTOR))
        .await
        .map_err(|source| RemoteError::List {
            namespace: namespace.to_owned(),
            server: server.to_owned(),
            source,
        })?
        .items)
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// The agent pod serving `node`: of the agent pods listed, one scheduled there and
/// running, a ready one first (a rolling update briefly has two). The error names the
/// nodes that have an agent.
pub fn pick_agent(pods: &[Pod], node: &str, namespace: &str) -> Result<String, String> {
    let status = |pod: &Pod| pod.status.clone().unwrap_or_default();
    let running = |pod: &Pod| status(pod).phase.as_deref() == Some("Running");
    let ready = |pod: &Pod| {
        status(pod)
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    };
    let deleting = |pod: &Pod| pod.metadata.deletion_timestamp.is_some();
    let mut candidates: Vec<&Pod> = pods
        .iter()
        .filter(|p| node_of(p) == Some(node) && running(p))
        .collect();
    candidates.sort_by_key(|p| (!ready(p), deleting(p)));
    if let Some(pod) = candidates.first() {
        return Ok(pod.metadata.name.clone().unwrap_or_default());
    }
    let mut nodes: Vec<&str> = pods
        .iter()
        .filter(|p| running(p))
        .filter_map(node_of)
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    let elsewhere = if nodes.is_empty() {
        "no agent runs on any node".to_owned()
    } else {
        format!("agents run on {}", nodes.join(", "))
    };
    Err(format!(
        "no mesh agent runs on node {node}: no running pod labelled {AGENT_SELECTOR} in \
         namespace {namespace} is scheduled there ({elsewhere})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str, node: &str, phase: &str, ready: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "mesh-system"},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": phase, "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }}
            ]},
        }))
        .expect("a pod")
    }

    #[test]
    fn the_running_agent_on_the_node_is_picked_a_ready_one_first() {
        let pods = [
            agent("mesh-agent-a", "node-a", "Running", true),
            agent("mesh-agent-old", "node-b", "Running", false),
            agent("mesh-agent-b", "node-b", "Running", true),
            agent("mesh-agent-pending", "node-b", "Pending", false),
        ];
        assert_eq!(
            pick_agent(&pods, "node-b", "mesh-system"),
            Ok("mesh-agent-b".into())
        );
        assert_eq!(
            pick_agent(&pods[..2], "node-b", "mesh-system"),
            Ok("mesh-agent-old".into())
        );
    }

    #[test]
    fn a_node_without_a_running_agent_is_named_with_the_nodes_that_have_one() {
        let pods = [
            agent("mesh-agent-a", "node-a", "Running", true),
            agent("mesh-agent-c", "node-c", "Pending", false),
        ];
        let err = pick_agent(&pods, "node-c", "mesh-system").expect_err("no agent");
        assert!(err.contains("no mesh agent runs on node node-c"), "{err}");
        assert!(err.contains("agents run on node-a)"), "{err}");
        let err = pick_agent(&[], "node-x", "mesh").expect_err("no agent");
        assert!(err.contains("in namespace mesh"), "{err}");
        assert!(err.contains("no agent runs on any node"), "{err}");
    }

    #[test]
    fn a_pod_target_is_namespace_slash_name_or_a_name_in_default() {
        assert_eq!(
            Target::pod("shop/web-1"),
            Ok(Target::Pod {
                namespace: "shop".into(),
                name: "web-1".into()
            })
        );
        assert_eq!(
            Target::pod("web-1"),
            Ok(Target::Pod {
                namespace: "default".into(),
                name: "web-1".into()
            })
        );
        for bad in ["", "/x", "x/", "a/b/c"] {
            assert!(Target::pod(bad).is_err(), "{bad:?}");
        }
    }
}
