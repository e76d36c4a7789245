//! Keeping the names of `resolution: DNS` ServiceEntries resolved: their hosts (or their
//! endpoints given by name) looked up through the node's resolvers when they first
//! appear and every [`REFRESH`] after, as Envoy re-resolves a DNS cluster. A change in
//! an answer rebuilds the mesh state; a failed lookup keeps the last answer.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    app::reconcile::{lock, SharedResolved},
    model::{entry_addresses::ResolvedNames, SharedState},
    proxy::dns::DnsProxy,
};

/// How often a name is asked again (Istio's default `dnsRefreshRate` is 60 s; endpoints
/// behind a name that moves are found in half that).
const REFRESH: Duration = Duration::from_secs(30);
/// How often the names wanted are compared with those asked.
const CHECK: Duration = Duration::from_secs(1);

pub async fn keep_names_resolved(state: SharedState, dns: Arc<DnsProxy>, resolved: SharedResolved) {
    let mut asked: HashMap<String, Instant> = HashMap::new();
    let mut ticker = tokio::time::interval(CHECK);
    loop {
        ticker.tick().await;
        let wanted = state.current().names_to_resolve.clone();
        asked.retain(|name, _| wanted.contains(name));
        let mut answers = Vec::new();
        for name in &wanted {
            if asked.get(name).is_some_and(|at| at.elapsed() < REFRESH) {
                continue;
            }
            asked.insert(name.clone(), Instant::now());
            match dns.lookup_ipv4(name).await {
                Ok(ips) => answers.push((name.clone(), ips)),
                Err(err) => tracing::warn!(
                    "resolving {name} for a ServiceEntry: {err}; its last answer stays"
                ),
            }
        }
        let mut shared = lock(&resolved);
        let names = merged(&shared.1, &wanted, answers);
        if names != shared.1 {
            shared.1 = names;
            shared.0 += 1;
        }
    }
}

/// The names resolved after new `answers`: only names still `wanted`, each with its
/// addresses sorted (a resolver rotating its answers changes nothing), a name without a
/// new answer keeping its last.
fn merged(
    previous: &ResolvedNames,
    wanted: &BTreeSet<String>,
    answers: Vec<(String, Vec<Ipv4Addr>)>,
) -> ResolvedNames {
    let mut names: ResolvedNames = previous
        .iter()
        .filter(|(name, _)| wanted.contains(*name))
        .map(|(name, ips)| (name.clone(), ips.clone()))
        .collect();
    for (name, mut ips) in answers {
        ips.sort();
        ips.dedup();
        names.insert(name, ips);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_replace_the_last_in_order_and_names_no_longer_wanted_go() {
        let ip = |last: u8| Ipv4Addr::new(10, 0, 0, last);
        let previous: ResolvedNames = [
            ("kept.example".to_owned(), vec![ip(1)]),
            ("gone.example".to_owned(), vec![ip(2)]),
            ("moved.example".to_owned(), vec![ip(3)]),
        ]
        .into();
        let wanted: BTreeSet<String> = ["kept.example", "moved.example", "new.example"]
            .map(str::to_owned)
            .into();
        let names = merged(
            &previous,
            &wanted,
            vec![
                ("moved.example".to_owned(), vec![ip(9), ip(4), ip(9)]),
                ("new.example".to_owned(), vec![]),
            ],
        );
        let expected: ResolvedNames = [
            ("kept.example".to_owned(), vec![ip(1)]),
            ("moved.example".to_owned(), vec![ip(4), ip(9)]),
            ("new.example".to_owned(), vec![]),
        ]
        .into();
        assert_eq!(names, expected);
        let rotated = merged(
            &names,
            &wanted,
            vec![("moved.example".to_owned(), vec![ip(9), ip(4)])],
        );
        assert_eq!(rotated, names);
    }
}
