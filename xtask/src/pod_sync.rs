//! The sandbox's scheduler and kubelet sync loop, for pods made through the API server
//! itself (`kubectl apply`, `kubectl run`, `kubectl delete`) rather than `sandbox apply`.
//!
//! One process (`sandbox pod-sync`, started by `sandbox up` on the API source) watches
//! every Pod. A pod with no node is bound to the sandbox node running the fewest pods, as
//! the scheduler would; a pod bound to a sandbox node and not yet running there is wired
//! and started the way `sandbox apply` does it, then reported Ready once its readiness
//! probe passes; a pod being deleted is stopped (its cgroup killed, its namespace
//! removed) and its deletion confirmed, as the kubelet confirms it once the containers
//! are gone. Every change of the sandbox's state happens under its lock, so `sandbox
//! apply` and `delete` never race the loop for a pod.

use std::{
    collections::BTreeMap,
    io::{BufReader, Write},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::{
    control_plane::{self, ControlPlaneState},
    daemon::start_daemon,
    sandbox::{self, Object, SandboxState},
};

/// What the loop does about one event of one pod.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Bind the pod to this node (the scheduler's part).
    Bind(String),
    /// Wire and start the pod on its node.
    Run,
    /// Stop the running pod; with `confirm`, then delete it from the API at once (the
    /// API server waits for the kubelet's word before a graceful deletion ends).
    Stop {
        confirm: bool,
    },
    /// Confirm the deletion of a pod the sandbox never ran.
    Confirm,
}

/// The facts of a pod the decision needs, as the API server reported them.
#[derive(Debug, Default)]
pub struct PodFacts<'a> {
    pub uid: &'a str,
    pub node: Option<&'a str>,
    pub host_network: bool,
    pub terminating: bool,
    /// `Succeeded` or `Failed`: nothing more to run.
    pub finished: bool,
}

/// Decides what a kubelet and the scheduler do about a pod event (`ADDED`, `MODIFIED`,
/// `DELETED`), given the UID of the pod of that name the sandbox runs (if any) and the
/// number of pods each sandbox node runs.
pub fn decide(
    event: &str,
    pod: &PodFacts,
    running_uid: Option<&str>,
    load: &BTreeMap<String, usize>,
) -> Action {
    // hostNetwork pods (the agents') run outside the sandbox's pod wiring.
    if pod.host_network {
        return Action::Nothing;
    }
    let runs_this_pod = running_uid == Some(pod.uid);
    if event == "DELETED" {
        return match runs_this_pod {
            true => Action::Stop { confirm: false },
            false => Action::Nothing,
        };
    }
    let on_sandbox_node = pod.node.is_some_and(|node| load.contains_key(node));
    if pod.terminating {
        return match (runs_this_pod, on_sandbox_node) {
            (true, _) => Action::Stop { confirm: true },
            (false, true) => Action::Confirm,
            (false, false) => Action::Nothing,
        };
    }
    if pod.node.is_none() {
        let least_loaded = load
            .iter()
            .min_by_key(|(name, pods)| (**pods, *name))
            .map(|(name, _)| name.clone());
        return least_loaded.map_or(Action::Nothing, Action::Bind);
    }
    // A pod of that name with another UID is one `sandbox apply` runs or one about to
    // be stopped; the sandbox runs one pod per name.
    if on_sandbox_node && running_uid.is_none() && !pod.finished {
        return Action::Run;
    }
    Action::Nothing
}

/// One event of a `kubectl get --watch --output-watch-events -o json` stream.
#[derive(Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

fn facts(object: &serde_json::Value) -> PodFacts<'_> {
    let text = |pointer: &str| object.pointer(pointer).and_then(|v| v.as_str());
    PodFacts {
        uid: text("/metadata/uid").unwrap_or_default(),
        node: text("/spec/nodeName").filter(|n| !n.is_empty()),
        host_network: object
            .pointer("/spec/hostNetwork")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        terminating: object.pointer("/metadata/deletionTimestamp").is_some(),
        finished: matches!(text("/status/phase"), Some("Succeeded" | "Failed")),
    }
}

/// The sandbox's control plane, while the agents read the API.
fn api_of(state: &SandboxState) -> Result<ControlPlaneState> {
    state
        .api()
        .cloned()
        .context("the sandbox's agents do not read the Kubernetes API")
}

/// Watches every pod until killed, restarting the watch when it ends (an API server
/// restart ends it; the list that starts the next watch repeats what is known, which
/// each decision takes as it is).
pub fn serve() -> Result<()> {
    loop {
        let api = api_of(&SandboxState::load()?)?;
        let args = [
            "get",
            "pods",
            "--all-namespaces",
            "--watch",
            "--output-watch-events",
            "-o",
            "json",
        ]
        .map(str::to_owned);
        let mut watch = control_plane::command(&api, &args)?
            .stdout(Stdio::piped())
            .spawn()
            .context("starting kubectl's watch")?;
        let stdout = watch.stdout.take().context("kubectl's output")?;
        for event in
            serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter::<WatchEvent>()
        {
            match event {
                Ok(event) => {
                    if let Err(err) = handle(&api, &event) {
                        eprintln!("{} {}: {err:#}", event.kind, describe(&event.object));
                    }
                }
                Err(err) => {
                    eprintln!("reading the watch: {err}");
                    break;
                }
            }
        }
        let _ = watch.kill();
        let _ = watch.wait();
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn describe(object: &serde_json::Value) -> String {
    let text = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_owned()
    };
    format!(
        "pod {}/{}",
        text("/metadata/namespace"),
        text("/metadata/name")
    )
}

fn handle(api: &ControlPlaneState, event: &WatchEvent) -> Result<()> {
    let object = &event.object;
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(|v| v.as_str())
        .context("a pod without a namespace")?;
    let name = object
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .context("a pod without a name")?;
    let _lock = sandbox::lock_state()?;
    let mut state = SandboxState::load()?;
    let running_uid = state
        .pods
        .iter()
        .find(|p| p.namespace == namespace && p.name == name)
        .map(|p| p.uid.clone());
    let mut load: BTreeMap<String, usize> =
        state.nodes.iter().map(|n| (n.name.clone(), 0)).collect();
    for pod in &state.pods {
        *load.entry(pod.node.clone()).or_default() += 1;
    }
    match decide(&event.kind, &facts(object), running_uid.as_deref(), &load) {
        Action::Nothing => Ok(()),
        Action::Bind(node) => {
            eprintln!("binding {} to {node}", describe(object));
            control_plane::bind_pod(api, namespace, name, &node)
        }
        Action::Run => {
            eprintln!("starting {}", describe(object));
            drop(state);
            start_pod(object)
        }
        Action::Stop { confirm } => {
            eprintln!("stopping {}", describe(object));
            sandbox::remove_pod(&mut state, namespace, name)?;
            if confirm {
                control_plane::delete_object(api, "Pod", namespace, name)?;
            }
            Ok(())
        }
        Action::Confirm => control_plane::delete_object(api, "Pod", namespace, name),
    }
}

/// Starts the pod in a process of its own (`sandbox pod-start`), so that the pod's
/// processes are not this long-lived loop's children: they outlive their starter and
/// leave their cgroup as soon as they are killed.
fn start_pod(object: &serde_json::Value) -> Result<()> {
    let mut child = Command::new(crate::release_binaries().join("xtask"))
        .args(["sandbox", "pod-start"])
        .stdin(Stdio::piped())
        .spawn()
        .context("starting `sandbox pod-start`")?;
    child
        .stdin
        .take()
        .context("pod-start's input")?
        .write_all(object.to_string().as_bytes())?;
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "`sandbox pod-start` failed ({status})");
    Ok(())
}

/// Wires and starts the pod given as JSON on standard input, with the UID the API server
/// gave it; reports it Ready once its probe passes, or Failed with the reason. The
/// caller holds the sandbox's lock.
pub fn start_from_stdin() -> Result<()> {
    let json: serde_json::Value =
        serde_json::from_reader(std::io::stdin()).context("reading the pod")?;
    let value: serde_norway::Value = serde_norway::to_value(&json).context("converting the pod")?;
    let field = |pointer: &str| {
        json.pointer(pointer)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .with_context(|| format!("the pod has no {pointer}"))
    };
    let object = Object {
        kind: "Pod".into(),
        namespace: field("/metadata/namespace")?,
        name: field("/metadata/name")?,
        value,
        source: PathBuf::from("the API server"),
    };
    let uid = field("/metadata/uid")?;
    let mut state = SandboxState::load()?;
    let api = api_of(&state)?;
    let started = sandbox::run_scheduled_pod(&mut state, &object, uid);
    if let Err(err) = &started {
        control_plane::patch_status(
            &api,
            "Pod",
            Some(&object.namespace),
            &object.name,
            &serde_json::json!({"phase": "Failed", "reason": "SandboxStartFailed", "message": format!("{err:#}")}),
        )?;
    }
    started
}

/// Starts the loop in the sandbox's cgroup `cgroup`; returns its pid.
pub fn start(cgroup: PathBuf) -> Result<u32> {
    std::fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    start_daemon(
        Command::new(crate::release_binaries().join("xtask")).args(["sandbox", "pod-sync"]),
        "pod-sync.log",
        control_plane::API_NETNS,
        cgroup,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load() -> BTreeMap<String, usize> {
        [("node-a".to_owned(), 3), ("node-b".to_owned(), 1)].into()
    }

    #[test]
    fn an_unscheduled_pod_is_bound_to_the_node_running_the_fewest_pods() {
        let pod = PodFacts {
            uid: "u1",
            ..PodFacts::default()
        };
        assert_eq!(
            decide("ADDED", &pod, None, &load()),
            Action::Bind("node-b".into())
        );
        let even = [("node-b".to_owned(), 2), ("node-a".to_owned(), 2)].into();
        assert_eq!(
            decide("ADDED", &pod, None, &even),
            Action::Bind("node-a".into())
        );
        assert_eq!(
            decide("ADDED", &pod, None, &BTreeMap::new()),
            Action::Nothing
        );
    }

    #[test]
    fn a_pod_bound_to_a_sandbox_node_runs_once() {
        let pod = PodFacts {
            uid: "u1",
            node: Some("node-a"),
            ..PodFacts::default()
        };
        assert_eq!(decide("MODIFIED", &pod, None, &load()), Action::Run);
        assert_eq!(
            decide("MODIFIED", &pod, Some("u1"), &load()),
            Action::Nothing
        );
        assert_eq!(
            decide("ADDED", &pod, Some("another"), &load()),
            Action::Nothing,
            "the sandbox runs one pod per name"
        );
        let elsewhere = PodFacts {
            node: Some("node-z"),
            ..pod
        };
        assert_eq!(decide("ADDED", &elsewhere, None, &load()), Action::Nothing);
    }

    #[test]
    fn finished_and_host_network_pods_are_left_alone() {
        let finished = PodFacts {
            uid: "u1",
            node: Some("node-a"),
            finished: true,
            ..PodFacts::default()
        };
        assert_eq!(
            decide("MODIFIED", &finished, None, &load()),
            Action::Nothing
        );
        let agent = PodFacts {
            uid: "u2",
            host_network: true,
            ..PodFacts::default()
        };
        assert_eq!(decide("ADDED", &agent, None, &load()), Action::Nothing);
    }

    #[test]
    fn a_terminating_pod_is_stopped_then_its_deletion_confirmed() {
        let pod = PodFacts {
            uid: "u1",
            node: Some("node-a"),
            terminating: true,
            ..PodFacts::default()
        };
        assert_eq!(
            decide("MODIFIED", &pod, Some("u1"), &load()),
            Action::Stop { confirm: true }
        );
        assert_eq!(decide("MODIFIED", &pod, None, &load()), Action::Confirm);
        assert_eq!(
            decide("DELETED", &pod, Some("u1"), &load()),
            Action::Stop { confirm: false }
        );
        assert_eq!(decide("DELETED", &pod, None, &load()), Action::Nothing);
        assert_eq!(
            decide("DELETED", &pod, Some("another"), &load()),
            Action::Nothing,
            "a deleted pod's name may already be another pod's"
        );
    }
}
