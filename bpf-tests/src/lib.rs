//! Helpers for the kernel-program tests: loading the mesh's eBPF object with its maps
//! pinned in a private bpffs directory, crafting packets, and running code in a fresh
//! network namespace. These tests need root; they fail (never skip) without it.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{Ebpf, EbpfLoader};
use mesh_agent::datapath::{ensure_bpffs, EBPF_OBJECT};

/// The eBPF object loaded for one test; its pinned maps go away with it.
pub struct Loaded {
    pub ebpf: Ebpf,
    dir: PathBuf,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn load() -> Loaded {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "the eBPF tests need root (run them through `cargo xtask test`)"
    );
    let root = PathBuf::from("/sys/fs/bpf");
    ensure_bpffs(&root).expect("bpffs mounted at /sys/fs/bpf");
    let dir = root.join(format!(
        "mesh-tests-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("creating the pin directory");
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(&dir)
        .load(EBPF_OBJECT)
        .expect("loading the eBPF object");
    Loaded { ebpf, dir }
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let check = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip
}

fn ethernet(ether_type: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

/// An Ethernet + IPv4 + TCP segment (checksums of TCP are not checked by the programs).
pub fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut frame = ethernet(0x0800);
    frame.extend(ipv4_header(src, dst, 6, 20));
    frame.extend_from_slice(&sport.to_be_bytes());
    frame.extend_from_slice(&dport.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    frame
}

pub fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut frame = ethernet(0x0800);
    frame.extend(ipv4_header(src, dst, 17, 8));
    frame.extend_from_slice(&sport.to_be_bytes());
    frame.extend_from_slice(&dport.to_be_bytes());
    frame.extend_from_slice(&[0, 8, 0, 0]);
    frame
}

pub fn ipv6_frame() -> Vec<u8> {
    let mut frame = ethernet(0x86dd);
    frame.extend_from_slice(&[0x60; 40]);
    frame
}

/// Runs `f` on a thread inside a new, empty network namespace.
pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare on this thread only.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("test thread panicked")
}
