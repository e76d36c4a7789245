//! Enrollment: the kernel programs attached to each local pod (its host veth and its
//! cgroup) as pods appear, detached as they go, and the kernel maps kept in line with
//! the mesh state.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
};

use serde::Serialize;

use crate::{
    datapath::{self, capacity::MapsReport, pod_links::PodLinks, Datapath, PodAttachment},
    errors::describe,
    model::MeshState,
};

#[derive(Debug, Clone, Serialize)]
pub struct EnrolledPod {
    pub ip: Ipv4Addr,
    pub veth: String,
    pub ifindex: u32,
    /// Whether the veth is a port of a bridge (a bridge-based CNI).
    pub bridged: bool,
    pub cgroup: PathBuf,
}

/// What one pass of enrollment left: the enrolled pods, those still waiting with the
/// reason, and what the kernel maps hold (or why they could not be written).
#[derive(Debug)]
pub struct Enrollment {
    pub enrolled: BTreeMap<String, EnrolledPod>,
    pub pending: BTreeMap<String, String>,
    pub maps: Result<MapsReport, String>,
}

pub struct Enroller {
    datapath: Datapath,
    cgroup_root: PathBuf,
    trust_domain: String,
    /// Whether connections that need nothing of the agent go from pod to pod in the kernel.
    kernel_bypass: bool,
    attached: HashMap<String, PodAttachment>,
    links: PodLinks,
    /// Whether what agents of other map layouts left was removed (after the first pass).
    took_over: bool,
}

impl Enroller {
    pub fn new(
        datapath: Datapath,
        cgroup_root: PathBuf,
        trust_domain: String,
        kernel_bypass: bool,
    ) -> Enroller {
        Enroller {
            datapath,
            cgroup_root,
            trust_domain,
            kernel_bypass,
            attached: HashMap::new(),
            links: PodLinks::default(),
            took_over: false,
        }
    }

    /// Attaches the programs of local pods that need it, detaches those of pods that
    /// went away, and refreshes the maps.
    pub fn enroll(&mut self, state: &MeshState) -> Enrollment {
        let mut pending = BTreeMap::new();
        let mut desired = HashMap::new();
        let local_ips: Vec<Ipv4Addr> = state.local_workloads().map(|w| w.ip).collect();
        let mut links = self.links.find(&local_ips);
        for workload in state.local_workloads() {
            let key = workload.key();
            let Some(link) = links.remove(&workload.ip) else {
                pending.insert(
                    key,
                    format!(
                        "no interface for {} yet (no host route to it, and no pod network \
                         namespace holding it)",
                        workload.ip
                    ),
                );
                continue;
            };
            let Some(cgroup) = datapath::find_pod_cgroup(&self.cgroup_root, &workload.uid) else {
                pending.insert(
                    key,
                    format!(
                        "no cgroup for pod uid {:?} under {}",
                        workload.uid,
                        self.cgroup_root.display()
                    ),
                );
                continue;
            };
            let attachment = PodAttachment { link, cgroup };
            desired.insert(key, (workload.ip, attachment));
        }
        // The maps first: tc judges a pod's packets by the veth the maps record for it,
        // so they must name the veth before the programs are attached to it.
        let pod_links: HashMap<Ipv4Addr, datapath::pod_links::PodLink> = desired
            .values()
            .map(|(ip, attachment)| (*ip, attachment.link.clone()))
            .collect();
        let probe_sources: HashMap<Ipv4Addr, Ipv4Addr> = desired
            .values()
            .filter_map(|(ip, _)| Some((*ip, datapath::source_towards(*ip)?)))
            .collect();
        // Pods left out of a full map still get their programs below: with no entry of
        // their own, the programs let nothing but the agent reach them (fail closed).
        let maps = self
            .datapath
            .sync_maps(
                state,
                &pod_links,
                &probe_sources,
                &self.trust_domain,
                self.kernel_bypass,
            )
            .map_err(|err| {
                let reason = describe(&err);
                tracing::error!("updating the kernel maps: {reason}");
                reason
            });
        for (key, (_, attachment)) in &desired {
            if self.attached.get(key) == Some(attachment) {
                continue;
            }
            match self.datapath.attach_pod(key, attachment) {
                Ok(()) => {
                    tracing::info!(
                        "enrolled {key} ({}, {})",
                        attachment.link.veth,
                        attachment.cgroup.display()
                    );
                    self.attached.insert(key.clone(), attachment.clone());
                }
                Err(err) => {
                    let reason = describe(&err);
                    tracing::error!("enrolling {key}: {reason}");
                    pending.insert(key.clone(), reason);
                }
            }
        }
        let mut gone: Vec<String> = self
            .datapath
            .attached_pods()
            .into_iter()
            .filter(|key| !desired.contains_key(key))
            .collect();
        gone.extend(
            self.attached
                .keys()
                .filter(|k| !desired.contains_key(*k))
                .cloned(),
        );
        gone.sort();
        gone.dedup();
        for key in gone {
            self.datapath.detach_pod(&key);
            self.attached.remove(&key);
            tracing::info!("detached {key}");
        }
        // An upgrade across map layouts: each pod attached above dropped the old links;
        // what is left belongs to pods that are gone.
        if !self.took_over {
            self.datapath.remove_other_layouts();
            self.took_over = true;
        }
        let enrolled = self
            .attached
            .iter()
            .filter_map(|(key, a)| {
                let (ip, _) = desired.get(key)?;
                Some((
                    key.clone(),
                    EnrolledPod {
                        ip: *ip,
                        veth: a.link.veth.clone(),
                        ifindex: a.link.ifindex,
                        bridged: a.link.bridge.is_some(),
                        cgroup: a.cgroup.clone(),
                    },
                ))
            })
            .collect();
        Enrollment {
            enrolled,
            pending,
            maps,
        }
    }
}
