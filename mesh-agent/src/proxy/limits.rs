//! Per-source connection limits: one pod (or one peer address) may hold only so many of
//! the agent's connections at once, so a flood from it runs into its own limit before it
//! runs the agent out of file descriptors and memory for the other pods of the node.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// Connections held per source address.
pub struct PerSource {
    limit: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection of a source, counted until it is dropped.
pub struct Permit {
    limits: Arc<PerSource>,
    source: IpAddr,
}

impl PerSource {
    pub fn new(limit: usize) -> Arc<PerSource> {
        Arc::new(PerSource {
            limit,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a new connection of `source`; `None` when it already holds the limit.
    pub fn acquire(self: &Arc<Self>, source: IpAddr) -> Option<Permit> {
        let mut held = self.lock();
        let count = held.entry(source).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Permit {
            limits: self.clone(),
            source,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // The map stays consistent across a panic (each change is one statement).
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut held = self.limits.lock();
        if let Some(count) = held.get_mut(&self.source) {
            *count -= 1;
            // Sources come and go (pods are replaced): keep only those holding some.
            if *count == 0 {
                held.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 3));

    #[test]
    fn a_source_at_its_limit_is_refused() {
        let limits = PerSource::new(3);
        let held: Vec<Permit> = (0..3).filter_map(|_| limits.acquire(A)).collect();
        assert_eq!(held.len(), 3);
        assert!(limits.acquire(A).is_none());
    }

    #[test]
    fn a_dropped_connection_makes_room_again() {
        let limits = PerSource::new(2);
        let first = limits.acquire(A).expect("first");
        let _second = limits.acquire(A).expect("second");
        assert!(limits.acquire(A).is_none());
        drop(first);
        let _third = limits.acquire(A).expect("room after a drop");
        assert!(limits.acquire(A).is_none());
    }

    #[test]
    fn other_sources_are_unaffected() {
        let limits = PerSource::new(1);
        let _a = limits.acquire(A).expect("a");
        assert!(limits.acquire(A).is_none());
        let _b = limits.acquire(B).expect("b has its own limit");
    }

    #[test]
    fn sources_holding_nothing_are_forgotten() {
        let limits = PerSource::new(2);
        let permits: Vec<Permit> = [A, B]
            .into_iter()
            .filter_map(|s| limits.acquire(s))
            .collect();
        assert_eq!(limits.lock().len(), 2);
        drop(permits);
        assert!(limits.lock().is_empty());
    }
}
