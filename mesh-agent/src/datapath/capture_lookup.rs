//! The node namespace's socket lookup (`capture_lookup`) and the agent's listeners it
//! names: a pod's SYN that reopens the addresses of a connection whose agent-side socket
//! is still in TIME_WAIT reaches the agent's listener, instead of drawing a stale ACK and
//! a retransmission from the client. Both live as long as this agent: the program
//! detaches when it ends (a successor attaches its own).

use std::os::fd::AsRawFd;

use aya::{
    maps::{MapData, MapError, SockMap},
    programs::{sk_lookup::SkLookupLink, SkLookup},
    Ebpf,
};
use mesh_common::{pins, programs};

use super::{program, DatapathError, Result};

pub struct CaptureLookup {
    listeners: SockMap<MapData>,
    _link: SkLookupLink,
}

impl CaptureLookup {
    /// Loads `capture_lookup` of the mesh's object and attaches it to the caller's network
    /// namespace (the node's), its listener slots empty until [`CaptureLookup::claim`]
    /// fills them.
    pub fn attach(ebpf: &mut Ebpf) -> Result<CaptureLookup> {
        let name = pins::CAPTURE_LISTENERS;
        let map = ebpf.take_map(name).ok_or(DatapathError::Map {
            name,
            source: MapError::InvalidName { name: name.into() },
        })?;
        let listeners =
            SockMap::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        let netns = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| DatapathError::Bpffs(format!("opening /proc/thread-self/ns/net: {e}")))?;
        let name = programs::CAPTURE_LOOKUP;
        let lookup: &mut SkLookup = program(ebpf, name)?;
        lookup
            .load()
            .map_err(|source| DatapathError::Program { name, source })?;
        let id = lookup
            .attach(netns)
            .map_err(|source| DatapathError::Program { name, source })?;
        let link = lookup
            .take_link(id)
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok(CaptureLookup {
            listeners,
            _link: link,
        })
    }

    /// Names `listener` for the lookups of its `slot` (`mesh_common::capture_listener`).
    pub fn claim(&mut self, slot: u32, listener: &impl AsRawFd) -> Result<()> {
        self.listeners
            .set(slot, listener, 0)
            .map_err(|source| DatapathError::Map {
                name: pins::CAPTURE_LISTENERS,
                source,
            })
    }
}
