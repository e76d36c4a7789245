//! Keeps a certificate for every identity (namespace, service account) with pods on this
//! node: a fresh key and CSR per issue, renewal at half the lifetime, retries with backoff
//! while the CA is unreachable (current certificates keep serving until they expire),
//! and removal when the identity's last pod leaves.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{
    identity::{
        ca::CaClient,
        spiffe::{new_csr, SpiffeId},
        tls::Identities,
    },
    model::SharedState,
};

const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct CertManager {
    pub identities: Arc<Identities>,
    pub client: CaClient,
    pub state: SharedState,
    /// Every local identity has a certificate.
    pub complete: Arc<AtomicBool>,
}

struct Retry {
    at: Instant,
    backoff: Duration,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl CertManager {
    fn desired(&self) -> BTreeSet<SpiffeId> {
        let state = self.state.current();
        state
            .local_workloads()
            .map(|w| self.identities.spiffe_id(&w.namespace, &w.service_account))
            .collect()
    }

    fn needs_certificate(&self, id: &SpiffeId) -> bool {
        match self.identities.get(id) {
            None => true,
            Some(svid) => {
                let lifetime = svid.facts.not_after - svid.installed_at;
                unix_now() >= svid.installed_at + lifetime / 2
            }
        }
    }

    pub async fn run(self) {
        let mut retries: HashMap<SpiffeId, Retry> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let desired = self.desired();
            for (id, _) in self.identities.all() {
                if !desired.contains(&id) {
                    tracing::info!(
                        "dropping the certificate of {id}: no pod of it left on this node"
                    );
                    self.identities.remove(&id);
                }
            }
            for id in &desired {
                if !self.needs_certificate(id)
                    || retries.get(id).is_some_and(|r| Instant::now() < r.at)
                {
                    continue;
                }
                match self.issue(id).await {
                    Ok(()) => {
                        retries.remove(id);
                    }
                    Err(err) => {
                        let backoff = retries
                            .get(id)
                            .map_or(MIN_BACKOFF, |r| (r.backoff * 2).min(MAX_BACKOFF));
                        let still_valid = self
                            .identities
                            .get(id)
                            .is_some_and(|s| s.facts.not_after > unix_now());
                        tracing::warn!(
                            "certificate for {id}: {err:#}; retrying in {backoff:?}{}",
                            if still_valid {
                                " (the current one stays in use)"
                            } else {
                                ""
                            }
                        );
                        retries.insert(
                            id.clone(),
                            Retry {
                                at: Instant::now() + backoff,
                                backoff,
                            },
                        );
                    }
                }
            }
            let complete = desired.iter().all(|id| self.identities.get(id).is_some());
            self.complete.store(complete, Ordering::Relaxed);
        }
    }

    async fn issue(&self, id: &SpiffeId) -> anyhow::Result<()> {
        let (key, csr) = new_csr(id)?;
        let certificate = self.client.sign(id, &csr).await?;
        self.identities
            .install(id, &certificate, &key.serialize_pem())?;
        if let Some(svid) = self.identities.get(id) {
            tracing::info!(
                "certificate for {id}: serial {}, valid until {}",
                svid.facts.serial,
                svid.facts.not_after
            );
        }
        Ok(())
    }
}
