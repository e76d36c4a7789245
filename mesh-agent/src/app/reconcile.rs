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
    model::{lb::LbRegistry, MeshState, SharedState},
    telemetry::metrics::Metrics,
};

/// What `meshctl status` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentStatus {
    pub node: String,
    pub ready: bool,
    /// Where the configuration comes from.
    pub config_dir: PathBuf,
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
    pub proxied_connections: usize,
}

pub type SharedStatus = Arc<Mutex<AgentStatus>>;

pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Reconciler {
    pub node: String,
    pub root_namespace: String,
    pub source: Box<dyn ConfigSource>,
    pub enroller: Enroller,
    pub shared: SharedState,
    /// Balancer and endpoint state that outlives each configuration swap.
    pub balancers: LbRegistry,
    pub status: SharedStatus,
    pub metrics: Arc<Metrics>,
    pub has_config: bool,
}

impl Reconciler {
    /// Takes a new configuration if there is one; enrolls pods still pending.
    pub fn poll(&mut self) {
        match self.source.poll() {
            Some(Ok(config)) => self.apply(config),
            Some(Err(err)) => self.reject(crate::errors::describe(&err)),
            None if !lock(&self.status).pending.is_empty() => self.enroll(),
            None => {}
        }
    }

    fn apply(&mut self, config: crate::config::ClusterConfig) {
        let errors: Vec<String> = config.errors().map(ToString::to_string).collect();
        for error in &errors {
            tracing::error!("{error}");
        }
        // The first configuration applies whatever is valid in it; later changes with an
        // error are rejected as a whole so that the last good configuration keeps serving.
        if !errors.is_empty() && self.has_config {
            self.reject(errors.join("\n"));
            return;
        }
        let state =
            MeshState::build_with(&self.node, &config, &self.root_namespace, &self.balancers);
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
            status.generation += 1;
            status.last_error = (!errors.is_empty()).then(|| errors.join("\n"));
            status.workloads = state.workloads.len();
            status.services = state.services.len();
            status.warnings = warnings;
            self.metrics.config_generation.set(status.generation as i64);
        }
        self.shared.replace(state);
        self.has_config = true;
        self.metrics.config_reload(true);
        self.enroll();
    }

    fn reject(&mut self, error: String) {
        tracing::error!(
            "configuration change from {} rejected; the last good configuration keeps serving",
            self.source.describe()
        );
        self.metrics.config_reload(false);
        lock(&self.status).last_error = Some(error);
    }

    fn enroll(&mut self) {
        let enrollment = self.enroller.enroll(&self.shared.current());
        self.metrics
            .enrolled_pods
            .set(enrollment.enrolled.len() as i64);
        let mut status = lock(&self.status);
        status.pending = enrollment.pending;
        status.enrolled = enrollment.enrolled;
    }
}
