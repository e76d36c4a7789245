//! What the proxy decided for each pod connection it carried (which workload and
//! Service it reached, and whether over mutual TLS), by the pod socket's flow key: the
//! metrics join it with the kernel's flow events to label Istio's TCP metrics.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use mesh_common::FlowKey;

use crate::{datapath::ip_key, model::Workload};

/// A pod connection as its socket sees it: `local` is the pod's end.
pub fn flow_key(local: SocketAddrV4, remote: SocketAddrV4) -> FlowKey {
    FlowKey {
        local_ip: ip_key(*local.ip()),
        remote_ip: ip_key(*remote.ip()),
        local_port: local.port(),
        remote_port: remote.port(),
    }
}

/// What the proxy decided for one pod connection.
#[derive(Debug, Clone)]
pub struct ConnRecord {
    /// The meshed pod reached; `None` for an endpoint outside the mesh.
    pub destination: Option<Arc<Workload>>,
    pub service: Option<String>,
    /// Carried over mutual TLS between node agents (both identities verified).
    pub mutual_tls: bool,
    finished: Option<Instant>,
}

/// Pod connections the proxy carried, by the pod socket's [`FlowKey`]. The metrics take a
/// record when the kernel reports the connection closed; records of connections that
/// ended long ago without such a report are swept.
#[derive(Default)]
pub struct ConnTable {
    records: Mutex<HashMap<FlowKey, ConnRecord>>,
}

const FINISHED_RECORD_TTL: Duration = Duration::from_secs(30);

impl ConnTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FlowKey, ConnRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(
        &self,
        key: FlowKey,
        destination: Option<Arc<Workload>>,
        service: Option<String>,
        mutual_tls: bool,
    ) {
        self.lock().insert(
            key,
            ConnRecord {
                destination,
                service,
                mutual_tls,
                finished: None,
            },
        );
    }

    pub fn finish(&self, key: &FlowKey) {
        if let Some(record) = self.lock().get_mut(key) {
            record.finished = Some(Instant::now());
        }
    }

    pub fn get(&self, key: &FlowKey) -> Option<ConnRecord> {
        self.lock().get(key).cloned()
    }

    pub fn remove(&self, key: &FlowKey) {
        self.lock().remove(key);
    }

    pub fn sweep(&self) {
        self.lock()
            .retain(|_, r| r.finished.is_none_or(|t| t.elapsed() < FINISHED_RECORD_TTL));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
