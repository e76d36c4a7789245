//! The mesh's kernel programs, one file per attach point: `tc` on each meshed pod's
//! host-side veth (capture towards the node agent, per-pod-pair accounting), `sockops`
//! on each meshed pod's cgroup (per-connection L4 facts and flow events), `splice`, the
//! stream verdict of the agent's spliced same-node flows, and `lookup`, the node
//! namespace's socket lookup towards the agent's listeners.
#![no_std]
#![no_main]

mod lookup;
mod maps;
mod packet;
mod sockops;
mod splice;
mod tc;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_sk_assign and the socket lookup helpers are available to GPL-compatible programs.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
