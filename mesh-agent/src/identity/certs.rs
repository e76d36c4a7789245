//! Keeps a certificate for every identity (namespace, service account) with pods on this
//! node: a fresh key and CSR per issue, renewal at half the lifetime, retries with backoff
//! while the CA is unreachable (current certificates keep serving until they expire),
//! and removal when the identity's last pod leaves.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    identity::{
        ca::CaClient,
        spiffe::{new_csr, SpiffeId},
        tls::Identities,
    },
    model::SharedState,
    telemetry::metrics::Metrics,
};

const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct CertManager {
    pub identities: Arc<Identities>,
    pub client: CaClient,
    pub state: SharedState,
    /// Every local identity has a certificate.
    pub complete: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub contact: SharedCaContact,
}

/// The agent's last word with the CA, for `meshctl status` and `check`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CaContact {
    pub address: String,
    /// Unix time the CA last signed a certificate for this agent.
    pub last_signed: Option<i64>,
    /// Why the last request failed, until one succeeds again.
    pub failing: Option<String>,
}

pub type SharedCaContact = Arc<Mutex<CaContact>>;

impl CaContact {
    fn record(&mut self, outcome: &anyhow::Result<()>, unix_now: i64) {
        match outcome {
            Ok(()) => {
                self.last_signed = Some(unix_now);
                self.failing = None;
            }
            Err(err) => self.failing = Some(format!("{err:#}")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Retry {
    at: Instant,
    backoff: Duration,
}

/// A held certificate's lifetime, in Unix seconds, as the renewal decision sees it.
#[derive(Debug, Clone, Copy)]
struct Lifetime {
    /// When it was installed: its lifetime counts from there, as its `notBefore` carries
    /// slack for clocks that disagree.
    installed_at: i64,
    not_after: i64,
}

impl Lifetime {
    /// Renewal is due at half the lifetime: the other half covers a CA outage.
    fn renewal_due(&self, now: i64) -> bool {
        now >= self.installed_at + (self.not_after - self.installed_at) / 2
    }
}

/// What one pass of the manager does, decided from the facts alone (no clock read, no
/// CA) so that it can be checked as such.
#[derive(Debug, Default, PartialEq, Eq)]
struct Pass {
    /// Certificates of identities with no pod left on this node.
    drop: Vec<SpiffeId>,
    /// Identities to ask the CA for a certificate now: none held yet, or past half its
    /// lifetime, and not waiting out the backoff of a failed request. A held
    /// certificate is never dropped for a failed request: it serves until replaced.
    request: Vec<SpiffeId>,
}

fn decide(
    desired: &BTreeSet<SpiffeId>,
    held: &BTreeMap<SpiffeId, Lifetime>,
    retries: &HashMap<SpiffeId, Retry>,
    unix_now: i64,
    now: Instant,
) -> Pass {
    Pass {
        drop: held
            .keys()
            .filter(|id| !desired.contains(*id))
            .cloned()
            .collect(),
        request: desired
            .iter()
            .filter(|id| held.get(*id).is_none_or(|l| l.renewal_due(unix_now)))
            .filter(|id| retries.get(*id).is_none_or(|r| now >= r.at))
            .cloned()
            .collect(),
    }
}

/// The wait after a failed request: 1 s, doubling with each failure in a row, at most
/// 30 s.
fn backoff_after(previous: Option<&Retry>) -> Duration {
    previous.map_or(MIN_BACKOFF, |r| (r.backoff * 2).min(MAX_BACKOFF))
}

/// Seconds since the UNIX epoch, the unit of certificates' validity.
pub fn unix_now() -> i64 {
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

    fn held(&self) -> BTreeMap<SpiffeId, Lifetime> {
        self.identities
            .all()
            .into_iter()
            .map(|(id, svid)| {
                let lifetime = Lifetime {
                    installed_at: svid.installed_at,
                    not_after: svid.facts.not_after,
                };
                (id, lifetime)
            })
            .collect()
    }

    pub async fn run(self) {
        let mut retries: HashMap<SpiffeId, Retry> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let desired = self.desired();
            let held = self.held();
            // A pod of an identity that left and came back starts without backoff.
            retries.retain(|id, _| desired.contains(id));
            let pass = decide(&desired, &held, &retries, unix_now(), Instant::now());
            for id in &pass.drop {
                tracing::info!("dropping the certificate of {id}: no pod of it left on this node");
                self.identities.remove(id);
            }
            for id in pass.request {
                let issued = self.issue(&id).await;
                self.metrics.certificate_requested(issued.is_ok());
                self.contact
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(&issued, unix_now());
                match issued {
                    Ok(()) => {
                        retries.remove(&id);
                    }
                    Err(err) => {
                        let backoff = backoff_after(retries.get(&id));
                        let still_valid = held.get(&id).is_some_and(|l| l.not_after > unix_now());
                        tracing::warn!(
                            "certificate for {id}: {err:#}; retrying in {backoff:?}{}",
                            if still_valid {
                                " (the current one stays in use)"
                            } else {
                                ""
                            }
                        );
                        retries.insert(
                            id,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(service_account: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", service_account)
    }

    #[test]
    fn the_ca_contact_keeps_the_last_signature_and_the_failure_until_the_next_success() {
        let mut contact = CaContact::default();
        contact.record(&Ok(()), 100);
        contact.record(&Err(anyhow::anyhow!("connecting to the CA: refused")), 160);
        assert_eq!(contact.last_signed, Some(100));
        assert_eq!(
            contact.failing.as_deref(),
            Some("connecting to the CA: refused")
        );
        contact.record(&Ok(()), 200);
        assert_eq!((contact.last_signed, contact.failing), (Some(200), None));
    }

    /// A one-hour certificate installed at Unix time 1000: renewal due at 2800.
    const INSTALLED: i64 = 1000;
    const HOUR: Lifetime = Lifetime {
        installed_at: INSTALLED,
        not_after: INSTALLED + 3600,
    };

    fn ids(names: &[&str]) -> BTreeSet<SpiffeId> {
        names.iter().map(|n| id(n)).collect()
    }

    fn held(names: &[&str]) -> BTreeMap<SpiffeId, Lifetime> {
        names.iter().map(|n| (id(n), HOUR)).collect()
    }

    #[test]
    fn a_certificate_is_requested_for_a_new_identity_and_renewed_at_half_life() {
        let now = Instant::now();
        let none = HashMap::new();
        let pass = |unix_now| decide(&ids(&["web", "db"]), &held(&["web"]), &none, unix_now, now);
        assert_eq!(
            pass(INSTALLED + 1799),
            Pass {
                drop: vec![],
                request: vec![id("db")]
            },
            "web's certificate is not half-way through its hour"
        );
        assert_eq!(pass(INSTALLED + 1800).request, [id("db"), id("web")]);
        assert_eq!(pass(INSTALLED + 7200).request, [id("db"), id("web")]);
    }

    #[test]
    fn failed_requests_back_off_from_1_to_30_seconds() {
        let mut previous: Option<Retry> = None;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let backoff = backoff_after(previous.as_ref());
            waits.push(backoff.as_secs());
            previous = Some(Retry {
                at: Instant::now() + backoff,
                backoff,
            });
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn while_the_ca_is_down_the_current_certificate_stays_and_is_retried_after_the_backoff() {
        // web's certificate is due; its last request failed 4 s ago with an 8 s backoff.
        let failed_at = Instant::now();
        let retries = HashMap::from([(
            id("web"),
            Retry {
                at: failed_at + Duration::from_secs(8),
                backoff: Duration::from_secs(8),
            },
        )]);
        let due = INSTALLED + 3000;
        let pass = |now| decide(&ids(&["web"]), &held(&["web"]), &retries, due, now);
        assert_eq!(
            pass(failed_at + Duration::from_secs(4)),
            Pass::default(),
            "waiting: nothing requested, and the certificate is not dropped"
        );
        assert_eq!(
            pass(failed_at + Duration::from_secs(8)),
            Pass {
                drop: vec![],
                request: vec![id("web")]
            }
        );
        // Past its expiry with the CA still down it is still not dropped: only a new
        // certificate replaces it.
        let expired = INSTALLED + 4000;
        let pass = decide(
            &ids(&["web"]),
            &held(&["web"]),
            &retries,
            expired,
            failed_at,
        );
        assert_eq!(pass, Pass::default());
    }

    #[test]
    fn a_certificate_is_dropped_when_the_last_pod_of_its_identity_leaves() {
        let now = Instant::now();
        let none = HashMap::new();
        let fresh = INSTALLED + 10;
        assert_eq!(
            decide(&ids(&["web"]), &held(&["web", "db"]), &none, fresh, now),
            Pass {
                drop: vec![id("db")],
                request: vec![]
            }
        );
        assert_eq!(
            decide(&ids(&[]), &held(&["web", "db"]), &none, fresh, now),
            Pass {
                drop: vec![id("db"), id("web")],
                request: vec![]
            }
        );
    }
}
