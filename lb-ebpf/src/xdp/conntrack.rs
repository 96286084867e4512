//! The connection table and Maglev scheduling: an existing flow keeps its backend while
//! that backend is up; a new one (or one whose backend went down) is hashed onto the ring.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns};
use lb_common::{
    BACKEND_UP, Backend, ConnEvent, FAMILY_V6, FLOW_CLOSED, FLOW_ESTABLISHED, FLOW_FIN, FLOW_FIN_SERVER,
    FLOW_MIDSTREAM, FLOW_NAT_SYN_SENT, FLOW_SYN_RECV, FLOW_SYN_SENT, FLOW_UDP, Flow, FlowKey,
    MIDSTREAM_CONFIRM_NS, PROTO_TCP, SERVICE_F_HASH_TUPLE, SERVICE_F_PASS_WHEN_EMPTY, SERVICE_F_ROUND_ROBIN,
    Service,
    hash::{source_hash, tuple_hash},
    stat,
};
use lb_ebpf::parse::{Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use super::flow_table;
use super::maps::{
    BACKENDS, CLOCK, CONFIG, CONN_EVENTS, FLOOD_GUARD, RINGS, SERVICE_GENERATIONS, WRR_CURSORS,
};
use super::stats;

pub struct Decision {
    pub service_id: u32,
    pub backend_id: u32,
    pub backend: Backend,
    pub new_flow: bool,
}

/// The coarse clock, which only moves once a tick: within the tick of this CPU's latest
/// read, that read. The kernel inlines `bpf_jiffies64` (a load) and this per-CPU array's
/// lookup, where the clock helper is a call that cost an established packet 10-20 ns.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: a plain helper call with no arguments (inlined by the kernel).
    let tick = unsafe { bpf_jiffies64() };
    let Some(c) = CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's own slot; nothing else runs on this CPU during the program.
    unsafe {
        if (*c).jiffies != tick {
            (*c).jiffies = tick;
            (*c).ns = bpf_ktime_get_coarse_ns();
        }
        (*c).ns
    }
}

#[inline(always)]
fn is_syn(p: &Parsed) -> bool {
    p.proto == PROTO_TCP && p.tcp_flags & TCP_SYN != 0 && p.tcp_flags & TCP_ACK == 0
}

/// TCP state after a client's segment with `flags`. Under direct routing that half is
/// all the director sees, so the client's ACK after its SYN makes the flow established.
/// A NAT flow starts in `FLOW_NAT_SYN_SENT` instead, which only the server's SYN-ACK
/// (`server_segment`) moves on, to `FLOW_SYN_RECV`, which the client's ACK completes.
/// One function for both: a branch on the forwarding method here would double the
/// states the balancer's verification explores.
#[inline(always)]
fn next_tcp_state(state: u16, flags: u8) -> u16 {
    if flags & TCP_RST != 0 {
        FLOW_CLOSED
    } else if flags & TCP_FIN != 0 {
        if state == FLOW_FIN_SERVER || state == FLOW_CLOSED { FLOW_CLOSED } else { FLOW_FIN }
    } else if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        if state == 0 { FLOW_SYN_SENT } else { state }
    } else if state == 0 {
        // No handshake seen: real (a restart, a failover) or junk; time tells.
        FLOW_MIDSTREAM
    } else if state == FLOW_SYN_RECV || state == FLOW_SYN_SENT {
        FLOW_ESTABLISHED
    } else {
        state
    }
}

/// A new NAT flow's SYN waits for the server's answer (see `next_tcp_state`).
#[inline(always)]
pub fn nat_syn(key: &FlowKey) {
    if let Some((f, _)) = flow_table::find_inline(key) {
        // SAFETY: as in `server_segment`.
        unsafe {
            if (*f).state == FLOW_SYN_SENT {
                (*f).state = FLOW_NAT_SYN_SENT;
            }
        }
    }
}

/// A NAT flow's state after the server's segment with `flags`: its SYN-ACK answers the
/// client's SYN, its FIN closes its half (the flow once the client's is closed too), a
/// RST ends the flow.
#[inline(always)]
pub fn server_segment(f: *mut Flow, flags: u8) {
    // SAFETY: a connection-table way, valid for this program run; read and written
    // through the pointer (other CPUs may write it too), as in `established`.
    let state = unsafe { (*f).state };
    let next = if flags & TCP_RST != 0 {
        FLOW_CLOSED
    } else if flags & TCP_FIN != 0 {
        if state == FLOW_FIN || state == FLOW_CLOSED { FLOW_CLOSED } else { FLOW_FIN_SERVER }
    } else if flags & TCP_SYN != 0 && flags & TCP_ACK != 0 && state == FLOW_NAT_SYN_SENT {
        FLOW_SYN_RECV
    } else {
        state
    };
    if next != state {
        // SAFETY: as above.
        unsafe { (*f).state = next };
    }
    if state != FLOW_MIDSTREAM {
        refresh(f, now());
    }
}

/// How stale `last_seen_ns` may get before a packet writes it again: the connection
/// counts' timeouts are 10 s and more, and a write on every packet dirties a cache line
/// that the CPUs of both directions of a flow share.
const LAST_SEEN_REFRESH_NS: u64 = 1_000_000_000;

/// Stamps the flow as seen `now`, unless its stamp is fresh enough.
#[inline(always)]
fn refresh(f: *mut Flow, now: u64) {
    // SAFETY: a connection-table way, valid for this program run; a plain 8-byte field.
    unsafe {
        if now.wrapping_sub((*f).last_seen_ns) >= LAST_SEEN_REFRESH_NS {
            (*f).last_seen_ns = now;
        }
    }
}

#[inline(always)]
fn backend(id: u32) -> Option<Backend> {
    BACKENDS.get(id).copied()
}

/// The entry of a flow that may go on, with its backend: its service still exists (same
/// generation) and its backend is up.
#[inline(always)]
fn live_entry(key: &FlowKey) -> Option<(*mut Flow, u32, Backend)> {
    let (f, backend_id) = flow_table::find(key)?;
    // SAFETY: a connection-table way, valid for this program run; fields are read once.
    let (service, generation) = unsafe { ((*f).service, (*f).service_generation) };
    if *SERVICE_GENERATIONS.get(service as u32)? != generation {
        return None;
    }
    let b = backend(backend_id)?;
    if b.state != BACKEND_UP {
        return None;
    }
    Some((f, backend_id, b))
}

/// The backend of a recorded flow, read only: for an ICMP error about the flow, which
/// says nothing about the connection's state.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<Decision> {
    let (f, backend_id, b) = live_entry(key)?;
    // SAFETY: as in live_entry.
    let service_id = unsafe { (*f).service } as u32;
    Some(Decision { service_id, backend_id, backend: b, new_flow: false })
}

/// Where an ICMP error about a service's flow (`p` is that flow, as the client sends it)
/// goes: the recorded flow's backend, else the one the ring gives, as for a mid-stream
/// packet. Nothing is recorded: an error says nothing about the connection. A
/// round-robin ring says nothing about where an unrecorded flow went.
#[inline(always)]
pub fn about_error(p: &Parsed, key: &FlowKey, svc: &Service) -> Option<Decision> {
    match lookup(key) {
        Some(d) => Some(d),
        None if svc.flags & SERVICE_F_ROUND_ROBIN != 0 => None,
        None => pick(p, svc).ok().map(|d| Decision { new_flow: false, ..d }),
    }
}

/// The decision for a packet of a flow already in the table, if that flow may go on (see
/// `live_entry`) and the packet is not a new SYN on a closed tuple (a new connection
/// reusing the ports, to be scheduled afresh).
#[inline(always)]
pub fn established(p: &Parsed, key: &FlowKey) -> Option<Decision> {
    let (f, backend_id, b) = live_entry(key)?;
    // SAFETY: a connection-table way, valid for this program run. Other CPUs may write
    // it at the same time (the two directions of a NAT flow, RSS moving a flow, a new
    // flow taking the way), so no `&mut` is made of it: each field is read and written
    // through the pointer, and the races are on a timestamp or a state word, each
    // written whole (the backend comes with its check, see `flow_table::find`).
    let (state, service_id) = unsafe { ((*f).state, (*f).service as u32) };
    if is_syn(p) && (state == FLOW_FIN || state == FLOW_FIN_SERVER || state == FLOW_CLOSED) {
        return None;
    }
    let now = now();
    let next = if p.proto == PROTO_TCP { next_tcp_state(state, p.tcp_flags) } else { state };
    if next == FLOW_MIDSTREAM {
        // `last_seen_ns` keeps the first packet's time until the flow is confirmed.
        // SAFETY: as above.
        unsafe {
            if now.wrapping_sub((*f).last_seen_ns) >= MIDSTREAM_CONFIRM_NS {
                (*f).state = FLOW_ESTABLISHED;
                (*f).last_seen_ns = now;
            }
        }
    } else {
        if next != state {
            // SAFETY: as above.
            unsafe { (*f).state = next };
        }
        refresh(f, now);
    }
    Some(Decision { service_id, backend_id, backend: b, new_flow: false })
}

/// Picks a backend for a new flow on the service's ring (a Maglev table, or for `wrr` the
/// weighted round-robin sequence) and records the flow. The error is the counter to bump:
/// `stat::PASS_NO_BACKEND` means the packet goes to the stack, any other a drop.
#[inline(always)]
pub fn schedule(p: &Parsed, key: &FlowKey, svc: &Service) -> Result<Decision, u32> {
    let d = pick(p, svc)?;
    let state = if p.proto == PROTO_TCP { next_tcp_state(0, p.tcp_flags) } else { FLOW_UDP };
    let now = now();
    if flood_guard_allows(now) {
        let flow = Flow {
            backend: d.backend_id,
            check: 0,
            // Service ids are below `MAX_SERVICES` (16 bits).
            service: svc.id as u16,
            state,
            service_generation: svc.generation,
            last_seen_ns: now,
        };
        // A full set is no reason to drop: the way seen least recently goes, and the hash
        // sends its flow's next packet to the same backend while the ring is unchanged.
        flow_table::record(key, &flow);
        // Junk without a handshake is no connection to log; nor are the flows the flood
        // guard leaves unrecorded (a flood would only fill the log).
        if svc.log_one_in != 0 && state != FLOW_MIDSTREAM {
            log_new_flow(p, d.service_id, d.backend_id, svc.log_one_in, now);
        }
    } else {
        stats::global(stat::FLOWS_UNRECORDED_FLOOD);
    }
    Ok(d)
}

/// Reports a new flow to the connection log, one in `one_in` (random: no state to keep).
/// The event is written straight into the ring buffer's memory: no copy on the stack,
/// where the balancer has no room left.
#[inline(always)]
fn log_new_flow(p: &Parsed, service: u32, backend: u32, one_in: u32, now: u64) {
    // SAFETY: a plain helper call with no arguments.
    if one_in > 1 && unsafe { bpf_get_prandom_u32() } % one_in != 0 {
        return;
    }
    let Some(mut entry) = CONN_EVENTS.reserve::<ConnEvent>(0) else {
        stats::global(stat::CONN_EVENTS_LOST);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved record, as long as a `ConnEvent` and ours until submitted;
    // every field is written before it is.
    unsafe {
        (*e).time_ns = now;
        (*e).src = p.src;
        (*e).dst = p.dst;
        (*e).service = service;
        (*e).backend = backend;
        (*e).sport = p.sport;
        (*e).dport = p.dport;
        (*e).family = p.family;
        (*e).proto = p.proto;
        (*e)._pad = [0; 2];
    }
    entry.submit(0);
}

/// The backend the ring gives a flow, without recording anything. Errors as `schedule`.
#[inline(always)]
pub fn pick(p: &Parsed, svc: &Service) -> Result<Decision, u32> {
    if svc.ring_size == 0 {
        return Err(if svc.flags & SERVICE_F_PASS_WHEN_EMPTY != 0 {
            stat::PASS_NO_BACKEND
        } else {
            stat::DROP_NO_BACKEND
        });
    }
    let ipv6 = p.family == FAMILY_V6;
    let h = if svc.flags & SERVICE_F_ROUND_ROBIN != 0 {
        // SAFETY: this CPU's own slot; nothing else runs on this CPU during the program.
        let cursor = unsafe { &mut *WRR_CURSORS.get_ptr_mut(svc.id).ok_or(stat::DROP_BACKEND_INVALID)? };
        let turn = *cursor;
        // Kept below the ring size; after a ring shrank, the modulo below covers it.
        *cursor = turn.wrapping_add(1) % svc.ring_size;
        turn
    } else if svc.flags & SERVICE_F_HASH_TUPLE != 0 {
        tuple_hash(&p.src, &p.dst, p.sport, p.dport, p.proto, ipv6)
    } else {
        source_hash(&p.src, ipv6)
    };
    let backend_id = *RINGS.get(svc.ring_offset + h % svc.ring_size).ok_or(stat::DROP_BACKEND_INVALID)?;
    let b = backend(backend_id).ok_or(stat::DROP_BACKEND_INVALID)?;
    Ok(Decision { service_id: svc.id, backend_id, backend: b, new_flow: true })
}

/// Katran's guard against SYN floods: past a number of new flows per second on this CPU,
/// new flows are forwarded by the ring without being recorded, so that they cannot evict
/// the established flows from the table. Each CPU counts in its own window.
#[inline(always)]
fn flood_guard_allows(now: u64) -> bool {
    let limit = CONFIG.get(0).map_or(0, |c| c.flood_guard_flows_per_sec);
    if limit == 0 {
        return true;
    }
    let Some(w) = FLOOD_GUARD.get_ptr_mut(0) else { return true };
    // SAFETY: this CPU's own slot; nothing else runs on this CPU during the program.
    let w = unsafe { &mut *w };
    if now.wrapping_sub(w.start_ns) >= 1_000_000_000 {
        w.start_ns = now;
        w.new_flows = 0;
    }
    w.new_flows = w.new_flows.saturating_add(1);
    w.new_flows <= limit
}
