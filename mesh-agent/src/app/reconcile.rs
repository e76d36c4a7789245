//! Keeping the agent in line with its configuration source: each new configuration is
//! validated, turned into the mesh state (or rejected whole, the last good one serving
//! on), swapped in, and the local pods enrolled; the status `meshctl status` shows is
//! kept here.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde::Serialize;

use crate::{
    app::enroll::{EnrolledPod, Enroller},
    config::{source::ConfigSource, Severity},
    datapath::capacity::MapUsage,
    model::{entry_addresses::ResolvedNames, lb::LbRegistry, MeshSettings, MeshState, SharedState},
    telemetry::metrics::Metrics,
};

/// What `meshctl status` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentStatus {
    pub node: String,
    /// The agent's process: during a handover two run on the node, and this names the
    /// one that answered.
    pub pid: u32,
    /// The agent's release (`meshctl version`, `meshctl check` compare it with theirs).
    pub version: String,
    /// The layout of the kernel maps it pins (`mesh_common::MAPS_LAYOUT_VERSION`).
    pub maps_layout: u32,
    /// Every local identity holds a certificate and every entry fits in the kernel maps.
    pub ready: bool,
    /// Why the agent is not ready.
    pub not_ready_reason: Option<String>,
    #[serde(skip)]
    pub certificates_ready: bool,
    /// The last exchange with the CA (filled in when the status is served).
    pub ca: crate::identity::certs::CaContact,
    /// Where the configuration comes from.
    pub config_dir: PathBuf,
    /// The source it is read from: the directory, or the Kubernetes API server.
    pub source: String,
    pub bpffs: PathBuf,
    /// Increases with every accepted configuration.
    pub generation: u64,
    pub last_error: Option<String>,
    pub workloads: usize,
    pub services: usize,
    pub enrolled: BTreeMap<String, EnrolledPod>,
    /// Local pods not enrolled yet, with the reason.
    pub pending: BTreeMap<String, String>,
    pub warnings: Vec<String>,
    /// Objects left out for their errors while the rest serves (Kubernetes API source).
    pub skipped: Vec<String>,
    pub proxied_connections: usize,
    /// What each kernel map the agent fills holds, against its capacity.
    pub maps: Vec<MapUsage>,
    /// Why the kernel maps could not be written at all, if they could not.
    #[serde(skip)]
    pub maps_error: Option<String>,
    /// Local pods whose entries did not fit, and how their traffic fails closed.
    pub failing_closed: BTreeMap<String, String>,
    /// Some entries did not fit: every new connection of the node's pods goes to the agent.
    pub capture_unknown: bool,
    /// Why the agent no longer takes connections (it drains its live ones), if it does not.
    pub draining: Option<String>,
}

impl AgentStatus {
    /// Sets `ready` and its reason from the certificates and the kernel maps.
    pub fn refresh_readiness(&mut self) {
        let full = self
            .maps_error
            .clone()
            .map(|err| format!("kernel maps not written: {err}"))
            .or_else(|| crate::datapath::capacity::problem(&self.maps));
        self.not_ready_reason = if let Some(why) = &self.draining {
            Some(format!("draining: {why}"))
        } else if !self.certificates_ready {
            Some("waiting for workload certificates".into())
        } else {
            full
        };
        self.ready = self.not_ready_reason.is_none();
    }
}

pub type SharedStatus = Arc<Mutex<AgentStatus>>;

pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Taking configurations from the source: each is validated, turned into the mesh state
/// and swapped in, or rejected whole (the last good one serving on); the status and the
/// reload metrics follow. No kernel work: [`Reconciler`] enrolls pods after it.
pub struct Reload {
    pub node: String,
    pub settings: MeshSettings,
    pub source: Box<dyn ConfigSource>,
    pub shared: SharedState,
    /// Balancer and endpoint state that outlives each configuration swap.
    pub balancers: LbRegistry,
    pub status: SharedStatus,
    pub metrics: Arc<Metrics>,
    pub has_config: bool,
    /// What the names of `resolution: DNS` ServiceEntries resolve to, kept by
    /// [`crate::app::resolve`]; a change rebuilds the state from the last configuration.
    pub resolved: SharedResolved,
    /// The generation of `resolved` the state was built with.
    pub resolved_generation: u64,
    /// The configuration serving, for those rebuilds.
    pub serving: Option<crate::config::ClusterConfig>,
}

/// Names resolved for ServiceEntries, with a generation that grows with each change.
pub type SharedResolved = Arc<Mutex<(u64, ResolvedNames)>>;

/// What one poll of the source did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    Unchanged,
    Applied,
    Rejected,
}

impl Reload {
    /// Takes a new configuration if the source has one.
    pub fn poll(&mut self) -> Reloaded {
        match self.source.poll() {
            Some(Ok(config)) => self.apply(config),
            Some(Err(err)) => self.reject(crate::errors::describe(&err)),
            None if lock(&self.resolved).0 != self.resolved_generation => {
                match self.serving.take() {
                    Some(config) => {
                        self.install(config);
                        Reloaded::Applied
                    }
                    None => Reloaded::Unchanged,
                }
            }
            None => Reloaded::Unchanged,
        }
    }

    fn apply(&mut self, config: crate::config::ClusterConfig) -> Reloaded {
        let errors: Vec<String> = config.errors().map(ToString::to_string).collect();
        for error in &errors {
            tracing::error!("{error}");
        }
        // The first configuration applies whatever is valid in it; later changes with an
        // error are rejected as a whole so that the last good configuration keeps serving.
        if !errors.is_empty() && self.has_config {
            return self.reject(errors.join("\n"));
        }
        let skipped: Vec<String> = config.skipped.iter().map(ToString::to_string).collect();
        {
            let mut status = lock(&self.status);
            // Logged once, when an object is first skipped, not at every change after.
            for object in skipped.iter().filter(|s| !status.skipped.contains(s)) {
                tracing::error!("{object}");
            }
            self.metrics
                .config_objects_skipped
                .set(skipped.len() as i64);
            status.skipped = skipped;
            status.generation += 1;
            status.last_error = (!errors.is_empty()).then(|| errors.join("\n"));
            self.metrics.config_generation.set(status.generation as i64);
        }
        self.install(config);
        self.has_config = true;
        self.metrics.config_reload(true);
        Reloaded::Applied
    }

    /// Builds the state of `config` with the names resolved so far and swaps it in.
    fn install(&mut self, config: crate::config::ClusterConfig) {
        let (generation, resolved) = lock(&self.resolved).clone();
        let state = MeshState::build_resolved(
            &self.node,
            &config,
            &self.settings,
            &self.balancers,
            &resolved,
            &self.shared.current(),
        );
        self.resolved_generation = generation;
        let warnings: Vec<String> = config
            .diagnostics
            .iter()
            .chain(&state.diagnostics)
            .filter(|d| d.severity == Severity::Warning)
            .map(ToString::to_string)
            .collect();
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        {
            let mut status = lock(&self.status);
            status.workloads = state.workloads.len();
            status.services = state.services.len();
            status.warnings = warnings;
        }
        let replaced = self.shared.replace(state);
        let served = self.serving.replace(config);
        drop_aside((replaced, served));
    }

    fn reject(&mut self, error: String) -> Reloaded {
        tracing::error!(
            "configuration change from {} rejected; the last good configuration keeps serving",
            self.source.describe()
        );
        self.metrics.config_reload(false);
        lock(&self.status).last_error = Some(error);
        Reloaded::Rejected
    }
}

/// Drops `garbage` on a thread of its own: the state and configuration a change replaced
/// take milliseconds to free with 10,000 pods, which the kernel maps need not wait for.
fn drop_aside<T: Send + 'static>(garbage: T) {
    let thrown = std::thread::Builder::new()
        .name("drop-aside".into())
        .spawn(move || drop(garbage));
    if let Err(err) = thrown {
        tracing::debug!("dropping in place, no thread for it: {err}");
    }
}

/// The agent in line with its configuration: reloads, then the local pods enrolled in
/// the kernel programs and maps.
pub struct Reconciler {
    pub reload: Reload,
    pub enroller: Enroller,
}

impl Reconciler {
    /// Takes a new configuration if there is one; enrolls pods still pending.
    pub fn poll(&mut self) {
        match self.reload.poll() {
            Reloaded::Applied => self.enroll(),
            Reloaded::Unchanged if !lock(&self.reload.status).pending.is_empty() => self.enroll(),
            Reloaded::Unchanged | Reloaded::Rejected => {}
        }
    }

    fn enroll(&mut self) {
        let enrollment = self.enroller.enroll(&self.reload.shared.current());
        self.reload
            .metrics
            .enrolled_pods
            .set(enrollment.enrolled.len() as i64);
        let metrics = &self.reload.metrics;
        let mut status = lock(&self.reload.status);
        status.pending = enrollment.pending;
        status.enrolled = enrollment.enrolled;
        match enrollment.maps {
            Ok(report) => {
                for usage in &report.maps {
                    metrics.map_usage(usage.map, usage.entries, usage.capacity, usage.refused);
                }
                status.maps = report.maps;
                status.failing_closed = report.failing_closed;
                status.capture_unknown = report.capture_unknown;
                status.maps_error = None;
            }
            Err(err) => status.maps_error = Some(err),
        }
        status.refresh_readiness();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::source::DirectorySource;
    use std::collections::BTreeSet;

    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";

    fn pod(name: &str, ip: &str) -> String {
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{nodeName: node-1}}\nstatus: {{podIP: {ip}}}\n")
    }

    /// The reload lines of the metrics, sorted: generation and loads by result.
    fn reload_metrics(metrics: &Metrics) -> Vec<String> {
        let mut lines: Vec<String> = metrics
            .encode()
            .lines()
            .filter(|l| {
                l.starts_with("mesh_config_generation ")
                    || l.starts_with("mesh_config_reloads_total{")
            })
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn a_change_with_a_broken_file_is_rejected_whole_and_its_valid_edit_does_not_apply() {
        let dir = std::env::temp_dir().join(format!("mesh-reload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("write");
        write(
            "a.yaml",
            &format!("{NAMESPACE}{}", pod("web", "10.244.1.2")),
        );
        let shared = SharedState::default();
        let metrics = Arc::new(Metrics::new(
            shared.clone(),
            Arc::default(),
            crate::telemetry::metrics::test_requests(),
        ));
        let mut reload = Reload {
            node: "node-1".into(),
            settings: MeshSettings::default(),
            source: Box::new(DirectorySource::new(&dir)),
            shared: shared.clone(),
            balancers: LbRegistry::default(),
            status: SharedStatus::default(),
            metrics: metrics.clone(),
            has_config: false,
            resolved: SharedResolved::default(),
            resolved_generation: 0,
            serving: None,
        };
        let pods = || {
            let mut names: Vec<String> = shared
                .current()
                .workloads
                .values()
                .map(|w| w.pod.clone())
                .collect();
            names.sort();
            names
        };
        assert_eq!(reload.poll(), Reloaded::Applied);
        assert_eq!(pods(), ["web"]);
        assert_eq!(reload.poll(), Reloaded::Unchanged);

        // One change: a valid edit (a second pod) beside a file with an error.
        write(
            "a.yaml",
            &format!(
                "{NAMESPACE}{}{}",
                pod("web", "10.244.1.2"),
                pod("db", "10.244.1.3")
            ),
        );
        write(
            "b.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec: {action: MAYBE}\n",
        );
        assert_eq!(reload.poll(), Reloaded::Rejected);
        assert_eq!(pods(), ["web"], "the valid edit did not apply either");
        {
            let status = lock(&reload.status);
            assert_eq!(status.generation, 1);
            assert_eq!(status.workloads, 1);
            let error = status.last_error.as_deref().unwrap_or_default();
            assert!(
                error.contains("b.yaml") && error.contains("MAYBE"),
                "{error}"
            );
        }
        assert_eq!(
            reload_metrics(&metrics),
            [
                "mesh_config_generation 1",
                "mesh_config_reloads_total{result=\"rejected\"} 1",
                "mesh_config_reloads_total{result=\"success\"} 1",
            ]
        );

        // The broken file fixed: the whole change applies.
        std::fs::remove_file(dir.join("b.yaml")).expect("remove");
        assert_eq!(reload.poll(), Reloaded::Applied);
        assert_eq!(pods(), ["db", "web"]);
        {
            let status = lock(&reload.status);
            assert_eq!((status.generation, status.workloads), (2, 2));
            assert_eq!(status.last_error, None);
        }
        assert_eq!(
            reload_metrics(&metrics),
            [
                "mesh_config_generation 2",
                "mesh_config_reloads_total{result=\"rejected\"} 1",
                "mesh_config_reloads_total{result=\"success\"} 2",
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_new_answer_for_a_dns_service_entry_rebuilds_the_state_with_its_endpoints() {
        let dir = std::env::temp_dir().join(format!("mesh-resolved-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("entry.yaml"),
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {name: shop, namespace: shop}\n\
             spec: {hosts: [shop.example.test], ports: [{number: 8080, name: http}], resolution: DNS}\n",
        )
        .expect("write");
        let shared = SharedState::default();
        let resolved = SharedResolved::default();
        let mut reload = Reload {
            node: "node-1".into(),
            settings: MeshSettings::default(),
            source: Box::new(DirectorySource::new(&dir)),
            shared: shared.clone(),
            balancers: LbRegistry::default(),
            status: SharedStatus::default(),
            metrics: Arc::new(Metrics::new(
                shared.clone(),
                Arc::default(),
                crate::telemetry::metrics::test_requests(),
            )),
            has_config: false,
            resolved: resolved.clone(),
            resolved_generation: 0,
            serving: None,
        };
        let endpoints = || -> Vec<String> {
            let state = shared.current();
            let port = state
                .services
                .values()
                .find(|s| s.hostname == "shop.example.test")
                .expect("the allocated address is captured");
            assert_eq!(port.cluster_ip.octets()[..2], [240, 240]);
            port.endpoints.iter().map(|e| e.addr.to_string()).collect()
        };
        assert_eq!(reload.poll(), Reloaded::Applied);
        assert!(endpoints().is_empty());
        assert_eq!(
            shared.current().names_to_resolve,
            BTreeSet::from(["shop.example.test".to_owned()])
        );
        assert_eq!(reload.poll(), Reloaded::Unchanged);

        *lock(&resolved) = (
            1,
            [(
                "shop.example.test".to_owned(),
                vec!["10.244.2.2".parse().expect("ip")],
            )]
            .into(),
        );
        assert_eq!(reload.poll(), Reloaded::Applied);
        assert_eq!(endpoints(), ["10.244.2.2:8080"]);
        assert_eq!(reload.poll(), Reloaded::Unchanged);
        assert_eq!(
            lock(&reload.status).generation,
            1,
            "not a new configuration"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
