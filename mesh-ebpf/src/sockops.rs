//! sockops on each meshed pod's cgroup: one `MESH_FLOWS` entry per TCP connection of the
//! pod (bytes, RTT, retransmits) and an event in `MESH_FLOW_EVENTS` when it opens and when
//! it closes, flagged when the kernel carries the connection between two pods of the node
//! without the agent. The entry is refreshed from incoming segments (data for a receiver,
//! ACKs for a sender) at most every `REFRESH_NS`, so long transfers show live byte counts.
//! Events do not wake the agent (see `emit`).

use aya_ebpf::{
    bindings::{
        BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::bpf_ktime_get_ns,
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{
    FlowEvent, FlowKey, FlowStats, FLOW_EVENTS_WAKEUP_BYTES, FLOW_EVENT_CLOSE, FLOW_EVENT_OPEN,
    FLOW_FLAG_DIRECT, FLOW_FLAG_FIN_RECEIVED, FLOW_ROLE_CLIENT, FLOW_ROLE_SERVER,
};

use crate::maps::{MESH_DIRECT_FLOWS, MESH_FLOWS, MESH_FLOW_EVENTS};

const AF_INET: u32 = 2;
/// How stale a live flow's counters may get.
const REFRESH_NS: u64 = 100_000_000;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;
const TCP_FLAG_FIN: u32 = 0x01;

#[sock_ops]
pub fn sockops_flows(ctx: SockOpsContext) -> u32 {
    if ctx.family() == AF_INET {
        on_event(&ctx);
    }
    1
}

#[inline(always)]
fn on_event(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => open(ctx, FLOW_ROLE_CLIENT),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => open(ctx, FLOW_ROLE_SERVER),
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB => refresh(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => close(ctx),
        _ => {}
    }
}

#[inline(always)]
fn flow_key(ctx: &SockOpsContext) -> FlowKey {
    FlowKey {
        local_ip: ctx.local_ip4(),
        remote_ip: ctx.remote_ip4(),
        local_port: ctx.local_port() as u16,
        // The kernel exposes the remote port in network byte order in the upper half.
        remote_port: u16::from_be((ctx.remote_port() >> 16) as u16),
    }
}

#[inline(always)]
fn fill(ctx: &SockOpsContext, stats: &mut FlowStats, now: u64) {
    // SAFETY: the context pointer is valid for the duration of the program.
    let ops = unsafe { &*ctx.ops };
    stats.updated_ns = now;
    // On the side that connected, the peer's acknowledgement of the SYN counts as one
    // byte acked; an accepted socket starts counting after the handshake.
    let syn = (stats.role == FLOW_ROLE_CLIENT) as u64;
    stats.bytes_sent = ops.bytes_acked.saturating_sub(syn);
    stats.bytes_received = ops.bytes_received;
    // The kernel keeps the smoothed RTT scaled by 8.
    stats.srtt_us = ops.srtt_us >> 3;
    stats.total_retrans = ops.total_retrans;
}

#[inline(always)]
fn open(ctx: &SockOpsContext, role: u32) {
    let now = unsafe { bpf_ktime_get_ns() };
    let mut stats = FlowStats {
        opened_ns: now,
        role,
        ..FlowStats::default()
    };
    fill(ctx, &mut stats, now);
    let key = flow_key(ctx);
    // `tc_from_pod` wrote both ends' entries from the client's SYN, before the handshake
    // completed.
    if MESH_DIRECT_FLOWS.get_ptr(key).is_some() {
        stats.flags |= FLOW_FLAG_DIRECT;
    }
    let _ = MESH_FLOWS.insert(key, stats, 0);
    let _ = ctx.set_cb_flags(
        (ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)
            as i32,
    );
    emit(key, FLOW_EVENT_OPEN, stats);
}

#[inline(always)]
fn refresh(ctx: &SockOpsContext) {
    let key = flow_key(ctx);
    if let Some(stats) = MESH_FLOWS.get_ptr_mut(key) {
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: the map value stays valid while this program runs.
        let stats = unsafe { &mut *stats };
        // SAFETY: the context pointer is valid for the duration of the program.
        let tcp_flags = unsafe { (*ctx.ops).skb_tcp_flags };
        // Remembered because the state at close does not always tell: FIN_WAIT2 closes
        // alike after the peer's FIN and after a reset.
        if tcp_flags & TCP_FLAG_FIN != 0 {
            stats.flags |= FLOW_FLAG_FIN_RECEIVED;
        }
        if now.wrapping_sub(stats.updated_ns) >= REFRESH_NS {
            fill(ctx, stats, now);
        }
    }
}

#[inline(always)]
fn close(ctx: &SockOpsContext) {
    let key = flow_key(ctx);
    let Some(stats) = MESH_FLOWS.get_ptr_mut(key) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the map value stays valid while this program runs.
    let stats = unsafe { &mut *stats };
    fill(ctx, stats, now);
    // TCP counts a FIN as one byte: ours in `bytes_acked` once the peer acknowledged
    // it, the peer's in `bytes_received`. Take off only the FINs that were: a connection
    // ended by a reset may have sent or received none.
    let old_state = ctx.arg(0);
    // SAFETY: the context pointer is valid for the duration of the program.
    let ops = unsafe { &*ctx.ops };
    let fin_sent = matches!(
        old_state,
        TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK | TCP_TIME_WAIT
    );
    // Everything sent, the FIN last, is acknowledged.
    if fin_sent && ops.snd_una == ops.snd_nxt {
        stats.bytes_sent = stats.bytes_sent.saturating_sub(1);
    }
    // These states are only reached after the peer's FIN.
    let fin_received = matches!(
        old_state,
        TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT
    ) || stats.flags & FLOW_FLAG_FIN_RECEIVED != 0;
    if fin_received {
        stats.bytes_received = stats.bytes_received.saturating_sub(1);
    }
    let final_stats = *stats;
    let _ = MESH_FLOWS.remove(key);
    emit(key, FLOW_EVENT_CLOSE, final_stats);
}

/// Writes an event without waking the agent, which drains the ring on a timer, unless
/// the ring fills past `FLOW_EVENTS_WAKEUP_BYTES`.
#[inline(always)]
fn emit(key: FlowKey, kind: u32, stats: FlowStats) {
    let wakeup = if MESH_FLOW_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= FLOW_EVENTS_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    let _ = MESH_FLOW_EVENTS.output::<FlowEvent>(
        &FlowEvent {
            key,
            kind,
            _pad: 0,
            stats,
        },
        wakeup as u64,
    );
}
