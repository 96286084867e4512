//! NAT. Masquerading (LVS `-m`): the client's packet goes to the backend's own address
//! (and port), and the backend, whose route back to the client runs through the
//! director, has its replies translated back to the VIP here. Full NAT: the source
//! becomes an address and port of the director's pool too, so that the replies come back
//! whatever the backend's routes.
//!
//! Each rewrite changes an address and a port and patches the checksums for the words
//! that changed (RFC 1624): the IPv4 header's, and the transport's, which covers the
//! addresses through its pseudo-header. The director routes these packets, so it
//! decrements their TTL (hop limit) once, as a router does.
//!
//! Replies are found through `NAT_REPLIES`: (backend, backend port, client or pool
//! address, its port) -> the flow's key as the client sends it, which is also the key of
//! its `FLOWS` entry, whose state the reply's flags move on (the director sees both
//! halves of the conversation). Masquerading writes it when a flow is scheduled; full NAT
//! when it claims the flow's pool port.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
        xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    Backend, FAMILY_V6, FULLNAT_PORT_MIN, FULLNAT_PORT_TRIES, Flow, FlowKey, FullNatSource, NAT_FULL,
    NAT_MASQ, PROTO_TCP, PROTO_UDP,
    hash::tuple_hash,
    programs::{NAT_FORWARD_SLOT, NAT_FULL_REPLY_SLOT},
    stat,
};
use lb_ebpf::{
    csum::{update16, update32},
    parse::{
        self, ETH_HLEN, ICMP_HDR_LEN, IPV6_HDR_LEN, Parsed, TCP_ACK, TCP_SYN, ptr_at, read_u8, write_mac,
    },
};

use super::{
    classify,
    conntrack::{self, Decision},
    flow_table, forward,
    maps::{
        BACKENDS, FULLNAT_POOL, FULLNAT_SOURCES, NAT_JOBS, NAT_PROGRAMS, NAT_REPLIES, SERVICE_GENERATIONS,
    },
    stats,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The balancer's way to a NAT backend: its decision goes into this CPU's `NAT_JOBS`
/// slot and the translator (`lb_nat_forward`) takes the packet over. Returns only when
/// it could not (no translator loaded: the packet is dropped).
#[inline(always)]
pub fn hand_over(ctx: &XdpContext, d: &Decision, key: &FlowKey, counter: u32) -> u32 {
    if stash(d, key, counter) != 0 {
        // SAFETY: control returns here only when the slot is empty. The tail call stays
        // in the balancer's own frame: from a subprogram it would be refused (the
        // balancer's stack is above the 256 bytes the verifier then allows).
        unsafe { NAT_PROGRAMS.tail_call(ctx, NAT_FORWARD_SLOT) };
    }
    stats::global(stat::DROP_BACKEND_INVALID);
    xdp_action::XDP_DROP
}

/// Writes the job into this CPU's slot, field by field (a whole `NatJob` built first
/// would take 64 bytes of the balancer's nearly full stack). Non-zero when written.
#[inline(never)]
fn stash(d: &Decision, key: &FlowKey, counter: u32) -> u32 {
    let Some(job) = NAT_JOBS.get_ptr_mut(0) else { return 0 };
    // SAFETY: this CPU's own slot; nothing else runs on this CPU until the translator
    // has read it.
    let job = unsafe { &mut *job };
    job.key.src = key.src;
    job.key.dst = key.dst;
    job.key.sport = key.sport;
    job.key.dport = key.dport;
    job.key.proto = key.proto;
    job.key.family = key.family;
    job.key._pad = 0;
    job.service_id = d.service_id;
    job.backend_id = d.backend_id;
    job.new_flow = d.new_flow as u32;
    job.counter = counter;
    1
}

/// `lb_nat_forward`: the client's packet, addressed to the VIP, rewritten for the NAT
/// backend the balancer chose (destination address, and port when the backend has one),
/// recorded for the backend's replies when the flow is new, and sent on.
#[inline(always)]
pub fn forward(ctx: &XdpContext) -> u32 {
    let Some(job) = NAT_JOBS.get_ptr(0) else {
        stats::global(stat::DROP_BACKEND_INVALID);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: this CPU's slot, written by the balancer just before the tail call.
    let job = unsafe { *job };
    let Some(b) = BACKENDS.get(job.backend_id).copied() else {
        stats::global(stat::DROP_BACKEND_INVALID);
        return xdp_action::XDP_DROP;
    };
    let (start, end) = (ctx.data(), ctx.data_end());
    let len = (end - start) as u64;
    // Parsed again rather than handed over: carrying the transport header's offset
    // through the balancer multiplies the states its verification explores.
    let (l4, proto, flags) = match parse::parse(start, end) {
        Ok(p) => (p.l4 as usize, p.proto, p.tcp_flags),
        Err(_) => {
            stats::global(stat::DROP_BACKEND_INVALID);
            return xdp_action::XDP_DROP;
        }
    };
    let v6 = b.family == FAMILY_V6;
    if let Err(reason) = translate(ctx, l4, v6, Side::Destination, &b.addr, b.port, true) {
        stats::global(reason);
        return xdp_action::XDP_DROP;
    }
    if b.nat == NAT_FULL {
        let mut source = FullNatSource::default();
        if fullnat_source(&job.key, &b, &mut source) == 0 {
            stats::global(stat::DROP_NAT_NO_PORT);
            return xdp_action::XDP_DROP;
        }
        if let Err(reason) = translate(ctx, l4, v6, Side::Source, &source.addr, source.port, false) {
            stats::global(reason);
            return xdp_action::XDP_DROP;
        }
    }
    if job.new_flow != 0 && proto == PROTO_TCP && flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        conntrack::nat_syn(&job.key);
    }
    if job.new_flow != 0 && b.nat == NAT_MASQ {
        let key = &job.key;
        let reply = FlowKey {
            src: b.addr,
            dst: key.src,
            sport: if b.port != 0 { b.port } else { key.dport },
            dport: key.sport,
            proto: key.proto,
            family: key.family,
            _pad: 0,
        };
        // A full table evicts its least recent entry; a reply that finds none is the
        // kernel's, as a reply of no flow is.
        let _ = NAT_REPLIES.insert(&reply, key, 0);
    }
    let sent = forward::direct_route(ctx, &b);
    forward::account(sent, job.backend_id, len, job.new_flow != 0, job.counter)
}

/// The pool address and port a full-NAT flow goes to its backend from: the one it has,
/// else a new one. A new one is a pool address and a port drawn from the flow's hash,
/// then the next candidates, each claimed by inserting the reply's key into
/// `NAT_REPLIES` only if no flow holds it (BPF_NOEXIST): the map itself is the
/// collision check, atomic across CPUs, with no port ranges to share out and nothing
/// to release (a closed flow's key leaves with LRU eviction). Only replies must be told
/// apart, so a port is unique per backend address and port, not per pool address.
///
/// A call of its own (into `out`; non-zero when found): its loop of map updates inlined
/// in the translator leaves LLVM short of registers, and what it then emits the verifier
/// refuses.
#[inline(never)]
fn fullnat_source(key: &FlowKey, b: &Backend, out: &mut FullNatSource) -> u32 {
    match find_fullnat_source(key, b) {
        Some(s) => {
            *out = s;
            1
        }
        None => 0,
    }
}

#[inline(always)]
fn find_fullnat_source(key: &FlowKey, b: &Backend) -> Option<FullNatSource> {
    if let Some(s) = FULLNAT_SOURCES.get_ptr(key) {
        // SAFETY: the element stays valid for this program run (RCU).
        return Some(unsafe { *s });
    }
    let pool = FULLNAT_POOL.get(0)?;
    let v6 = key.family == FAMILY_V6;
    let h = tuple_hash(&key.src, &key.dst, key.sport, key.dport, key.proto, v6);
    let spread = h.rotate_left(16);
    let addr = if v6 {
        [pool.v6[0], pool.v6[1], pool.v6[2], pool.v6[3] | (spread & pool.spread_v6)]
    } else {
        [pool.v4 | (spread & pool.spread_v4), 0, 0, 0]
    };
    if addr == [0; 4] {
        return None;
    }
    let span = (u16::MAX - FULLNAT_PORT_MIN) as u32 + 1;
    let mut reply = FlowKey {
        src: b.addr,
        dst: addr,
        sport: if b.port != 0 { b.port } else { key.dport },
        dport: 0,
        proto: key.proto,
        family: key.family,
        _pad: 0,
    };
    for i in 0..FULLNAT_PORT_TRIES {
        // A prime stride: the candidates of flows whose hashes are close do not queue up
        // behind each other.
        let port = (FULLNAT_PORT_MIN as u32 + h.wrapping_add(i.wrapping_mul(7919)) % span) as u16;
        reply.dport = port.to_be();
        if NAT_REPLIES.insert(&reply, key, BPF_NOEXIST as u64).is_ok() {
            let source = FullNatSource { addr, port: reply.dport, _pad: 0 };
            let _ = FULLNAT_SOURCES.insert(key, &source, 0);
            return Some(source);
        }
    }
    None
}

/// `lb_nat_icmp`: an ICMP error from the clients' side about a NAT flow's reply (a
/// router's "fragmentation needed" to the VIP), which the balancer found is a NAT
/// backend's: to that backend, about the packet as the backend sent it.
#[inline(always)]
pub fn error_to_backend(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let Ok(p) = parse::parse(start, end) else {
        return xdp_action::XDP_PASS;
    };
    if p.icmp_error == 0 {
        return xdp_action::XDP_PASS;
    }
    let Some(svc) = classify::lookup_service(&p, classify::maybe_vip(&p)) else {
        return xdp_action::XDP_PASS;
    };
    let key = p.flow_key();
    let Some(d) = conntrack::about_error(&p, &key, &svc) else {
        return xdp_action::XDP_PASS;
    };
    let b = d.backend;
    if b.nat == 0 {
        return xdp_action::XDP_PASS;
    }
    let len = (end - start) as u64;
    let (l4, v6) = (p.l4 as usize, b.family == FAMILY_V6);
    // Full NAT: the backend sent the quoted packet to the pool, and hears of the error
    // from the director's pool address (the client's side is not its to know).
    let mut source = FullNatSource::default();
    if b.nat == NAT_FULL {
        let Some(s) = FULLNAT_SOURCES.get_ptr(&key) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: the element stays valid for this program run (RCU).
        source = unsafe { *s };
    }
    let translated = translate_icmp(ctx, l4, v6, Side::Destination, &b.addr, b.port, true).and_then(|()| {
        if b.nat == NAT_FULL {
            translate_icmp(ctx, l4, v6, Side::Source, &source.addr, source.port, false)
        } else {
            Ok(())
        }
    });
    if let Err(reason) = translated {
        stats::global(reason);
        return xdp_action::XDP_DROP;
    }
    let sent = forward::direct_route(ctx, &b);
    forward::account(sent, d.backend_id, len, false, p.icmp_error as u32)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Source => Side::Destination,
            Side::Destination => Side::Source,
        }
    }
}

/// An ICMP error about a NAT flow (its ICMP header at `icmp`): the quoted packet's
/// address and port on the side opposite `outer` become `addr` and `port` (when
/// non-zero), as does the outer header's `outer` address, whose TTL (hop limit) goes
/// down by one. Every checksum that covers a changed word is patched: the quoted IPv4
/// header's, the quoted transport checksum when the quote holds it, the outer IPv4
/// header's, and the ICMP checksum (with its IPv6 pseudo-header). The quote is what the
/// other side sent, translated as its packets are: a backend's "port unreachable" about
/// `client -> RS:8080` reaches the client about `client -> VIP:80`.
#[inline(always)]
fn translate_icmp(
    ctx: &XdpContext,
    icmp: usize,
    v6: bool,
    outer: Side,
    addr: &[u32; 4],
    port: u16,
    hop: bool,
) -> Result<(), u32> {
    let inner = outer.other();
    let (start, end) = (ctx.data(), ctx.data_end());
    let (l3, _) = parse::parse_eth(start, end).ok_or(stat::DROP_TRUNCATED)?;
    // Masked for the verifier: header offsets, below any frame length.
    let icmp = icmp & 0x3fff;
    let quote = icmp + ICMP_HDR_LEN;
    let mut ic = raw16(start, end, icmp + 2)?;
    // The quoted IP header's address. Two-byte reads: at a variable offset a one-byte
    // bounds check compiles to a form the verifier learns no range from.
    let (inner_l4, proto) = if v6 {
        let [next, _] = two_bytes(start, end, quote + 6)?;
        (quote + IPV6_HDR_LEN, next)
    } else {
        let [vhl, _] = two_bytes(start, end, quote)?;
        let [_, proto] = two_bytes(start, end, quote + 8)?;
        (quote + ((vhl & 0x0f) as usize * 4), proto)
    };
    let old_inner = swap_addr(start, end, quote, v6, inner, addr)?;
    for i in 0..4 {
        ic = update32(ic, old_inner[i], addr[i]);
    }
    if !v6 {
        let c = ptr_at::<u16>(start, end, quote + 10).ok_or(stat::DROP_TRUNCATED)? as *mut u16;
        // SAFETY: bounds-checked by ptr_at.
        unsafe {
            let old = c.read_unaligned();
            let new = update32(old, old_inner[0], addr[0]);
            c.write_unaligned(new);
            ic = update16(ic, old, new);
        }
    }
    // The quoted port; the parser saw both ports, so they are there.
    let mut old_port = port;
    if port != 0 {
        let p = ptr_at::<u16>(start, end, inner_l4 + if inner == Side::Source { 0 } else { 2 })
            .ok_or(stat::DROP_TRUNCATED)? as *mut u16;
        // SAFETY: bounds-checked by ptr_at.
        unsafe {
            old_port = p.read_unaligned();
            p.write_unaligned(port);
        }
        ic = update16(ic, old_port, port);
    }
    // The quoted transport checksum, when the quote is long enough to hold it (a UDP one
    // of zero over IPv4 means none).
    let quoted_check = match proto {
        PROTO_TCP => inner_l4 + 16,
        PROTO_UDP => inner_l4 + 6,
        _ => 0,
    };
    if quoted_check != 0
        && let Some(c) = ptr_at::<u16>(start, end, quoted_check)
    {
        let c = c as *mut u16;
        // SAFETY: bounds-checked by ptr_at.
        let old = unsafe { c.read_unaligned() };
        if !(proto == PROTO_UDP && old == 0 && !v6) {
            let mut new = old;
            for i in 0..4 {
                new = update32(new, old_inner[i], addr[i]);
            }
            new = update16(new, old_port, port);
            if proto == PROTO_UDP && new == 0 {
                new = 0xffff;
            }
            // SAFETY: as above.
            unsafe { c.write_unaligned(new) };
            ic = update16(ic, old, new);
        }
    }
    // The outer header; ICMPv6's checksum covers its addresses, ICMP's does not.
    let old_outer = swap_addr(start, end, l3, v6, outer, addr)?;
    if v6 {
        for i in 0..4 {
            ic = update32(ic, old_outer[i], addr[i]);
        }
    }
    let c = ptr_at::<u16>(start, end, icmp + 2).ok_or(stat::DROP_TRUNCATED)? as *mut u16;
    // SAFETY: bounds-checked by ptr_at.
    unsafe { c.write_unaligned(ic) };
    routed(start, end, l3, v6, &old_outer, addr, hop)
}

/// Sets `side`'s address of the IP header at `ip` to `addr`; returns the old one (IPv4
/// in the first word, the rest zero, as `addr`'s).
#[inline(always)]
fn swap_addr(
    start: usize,
    end: usize,
    ip: usize,
    v6: bool,
    side: Side,
    addr: &[u32; 4],
) -> Result<[u32; 4], u32> {
    if v6 {
        let at = ip + if side == Side::Source { 8 } else { 24 };
        let a = ptr_at::<[u32; 4]>(start, end, at).ok_or(stat::DROP_TRUNCATED)? as *mut [u32; 4];
        // SAFETY: bounds-checked by ptr_at; packet data has no alignment guarantee.
        unsafe {
            let old = a.read_unaligned();
            a.write_unaligned(*addr);
            Ok(old)
        }
    } else {
        let at = ip + if side == Side::Source { 12 } else { 16 };
        let a = ptr_at::<u32>(start, end, at).ok_or(stat::DROP_TRUNCATED)? as *mut u32;
        // SAFETY: as above.
        unsafe {
            let old = a.read_unaligned();
            a.write_unaligned(addr[0]);
            Ok([old, 0, 0, 0])
        }
    }
}

/// The IP header at `l3`, whose address changed from `old` to `new`: the IPv4 header
/// checksum patched for it and, with `hop`, the TTL (hop limit) down by one as a router
/// passes the packet on.
#[inline(always)]
fn routed(
    start: usize,
    end: usize,
    l3: usize,
    v6: bool,
    old: &[u32; 4],
    new: &[u32; 4],
    hop: bool,
) -> Result<(), u32> {
    if v6 {
        if hop {
            let limit = ptr_at::<u8>(start, end, l3 + 7).ok_or(stat::DROP_TRUNCATED)? as *mut u8;
            // SAFETY: bounds-checked by ptr_at.
            unsafe {
                if limit.read() <= 1 {
                    return Err(stat::DROP_TTL_EXPIRED);
                }
                limit.write(limit.read() - 1);
            }
        }
        return Ok(());
    }
    let h = ptr_at::<[u8; 20]>(start, end, l3).ok_or(stat::DROP_TRUNCATED)? as usize;
    // SAFETY: the 20 bytes of the fixed header were bounds-checked above.
    unsafe {
        let ip_check = (h + 10) as *mut u16;
        let mut c = ip_check.read_unaligned();
        if hop {
            let ttl_proto = (h + 8) as *mut u16;
            let old_ttl_proto = ttl_proto.read_unaligned();
            let ttl = (h + 8) as *mut u8;
            if ttl.read() <= 1 {
                return Err(stat::DROP_TTL_EXPIRED);
            }
            ttl.write(ttl.read() - 1);
            c = update16(c, old_ttl_proto, ttl_proto.read_unaligned());
        }
        ip_check.write_unaligned(update32(c, old[0], new[0]));
    }
    Ok(())
}

/// Sets the packet's source or destination address to `addr` and, when `port` is
/// non-zero and there is a transport header, that side's port, and patches the
/// checksums; with `hop`, decrements the TTL (hop limit) too, as a router does (once per
/// packet, however many of its addresses change).
#[inline(always)]
fn translate(
    ctx: &XdpContext,
    l4: usize,
    v6: bool,
    side: Side,
    addr: &[u32; 4],
    port: u16,
    hop: bool,
) -> Result<(), u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let (l3, _) = parse::parse_eth(start, end).ok_or(stat::DROP_TRUNCATED)?;
    // Masked for the verifier: a header offset, below any frame length.
    let l4 = l4 & 0x3fff;
    let proto = read_u8(start, end, l3 + if v6 { 6 } else { 9 }).ok_or(stat::DROP_TRUNCATED)?;
    // The transport checksum's offset; zero: none to patch (a later fragment, or an IPv4
    // UDP datagram sent without one).
    let mut l4_check = match proto {
        PROTO_TCP if l4 != 0 => l4 + 16,
        PROTO_UDP if l4 != 0 => l4 + 6,
        _ => 0,
    };
    let mut check = 0u16;
    if l4_check != 0 {
        check = raw16(start, end, l4_check)?;
        if proto == PROTO_UDP && check == 0 && !v6 {
            l4_check = 0;
        }
    }
    // The TTL first: a packet that dies here is dropped before anything changed.
    let ttl = read_u8(start, end, l3 + if v6 { 7 } else { 8 }).ok_or(stat::DROP_TRUNCATED)?;
    if hop && ttl <= 1 {
        return Err(stat::DROP_TTL_EXPIRED);
    }
    let old = swap_addr(start, end, l3, v6, side, addr)?;
    for i in 0..4 {
        check = update32(check, old[i], addr[i]);
    }
    routed(start, end, l3, v6, &old, addr, hop)?;
    if port != 0 && l4 != 0 {
        let p = ptr_at::<u16>(start, end, l4 + if side == Side::Source { 0 } else { 2 })
            .ok_or(stat::DROP_TRUNCATED)? as *mut u16;
        // SAFETY: bounds-checked by ptr_at.
        unsafe {
            check = update16(check, p.read_unaligned(), port);
            p.write_unaligned(port);
        }
    }
    if l4_check != 0 {
        // A UDP checksum that comes out zero is sent as all ones (zero means none).
        if proto == PROTO_UDP && check == 0 {
            check = 0xffff;
        }
        let c = ptr_at::<u16>(start, end, l4_check).ok_or(stat::DROP_TRUNCATED)? as *mut u16;
        // SAFETY: bounds-checked by ptr_at.
        unsafe { c.write_unaligned(check) };
    }
    Ok(())
}

#[inline(always)]
fn two_bytes(start: usize, end: usize, at: usize) -> Result<[u8; 2], u32> {
    let p = ptr_at::<[u8; 2]>(start, end, at).ok_or(stat::DROP_TRUNCATED)?;
    // SAFETY: bounds-checked by ptr_at; byte arrays have no alignment requirement.
    Ok(unsafe { p.read_unaligned() })
}

#[inline(always)]
fn raw16(start: usize, end: usize, at: usize) -> Result<u16, u32> {
    let p = ptr_at::<u16>(start, end, at).ok_or(stat::DROP_TRUNCATED)?;
    // SAFETY: bounds-checked by ptr_at; packet data has no alignment guarantee.
    Ok(unsafe { p.read_unaligned() })
}

/// A packet that is not a service's, seen by the balancer: the reply of a NAT flow is
/// translated back to its VIP and sent toward the client; anything else passes.
#[inline(always)]
pub fn reply(ctx: &XdpContext) -> u32 {
    let r = match reply_of(ctx) {
        Ok(r) => r,
        Err(action) => return action,
    };
    if r.full {
        // SAFETY: control returns here only when the slot is empty.
        unsafe { NAT_PROGRAMS.tail_call(ctx, NAT_FULL_REPLY_SLOT) };
        stats::global(stat::DROP_BACKEND_INVALID);
        return xdp_action::XDP_DROP;
    }
    back_to_client(ctx, &r, false)
}

/// `lb_fullnat_reply`: a full-NAT backend's reply, addressed to the pool, from the VIP to
/// the client. A program of its own: both rewrites inlined in one program are more
/// states than the verifier explores.
#[inline(always)]
pub fn fullnat_reply(ctx: &XdpContext) -> u32 {
    match reply_of(ctx) {
        Ok(r) if r.full => back_to_client(ctx, &r, true),
        Ok(_) => xdp_action::XDP_PASS,
        Err(action) => action,
    }
}

/// A NAT flow's reply, as `reply_of` found it.
struct ReplyOf {
    p: Parsed,
    /// The flow as the client sends it.
    flow: FlowKey,
    entry: *mut Flow,
    /// Its backend is a full-NAT one.
    full: bool,
}

/// The NAT flow a packet (or an ICMP error about one) from a backend belongs to, or what
/// to do with the packet when there is none: pass it (it is the kernel's), or drop it
/// (counted).
#[inline(always)]
fn reply_of(ctx: &XdpContext) -> Result<ReplyOf, u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let p = parse::parse(start, end).map_err(|_| xdp_action::XDP_PASS)?;
    // Fragmented replies are left to the kernel.
    if p.frag != 0 || !classify::addressed_to_us(ctx) {
        return Err(xdp_action::XDP_PASS);
    }
    let flow = NAT_REPLIES.get_ptr(&p.flow_key()).ok_or(xdp_action::XDP_PASS)?;
    // SAFETY: the element stays valid for this program run (RCU); copied once, so that
    // the lookups below use a stable key.
    let flow = unsafe { *flow };
    let (entry, backend_id) = flow_table::find(&flow).ok_or(xdp_action::XDP_PASS)?;
    // SAFETY: a connection-table way, valid for this program run; fields are read once.
    let (service, generation) = unsafe { ((*entry).service, (*entry).service_generation) };
    // The flow must still be this backend's: one moved elsewhere (its backend went down)
    // or a service since removed leaves a stale reverse entry behind.
    if SERVICE_GENERATIONS.get(service as u32).copied() != Some(generation) {
        return Err(xdp_action::XDP_PASS);
    }
    let b = BACKENDS.get(backend_id).ok_or(xdp_action::XDP_PASS)?;
    if b.nat == 0 || b.addr != p.src {
        return Err(xdp_action::XDP_PASS);
    }
    if let Err(reason) = parse::check_ipv4_header(start, end, &p) {
        stats::global(reason);
        return Err(xdp_action::XDP_DROP);
    }
    Ok(ReplyOf { p, flow, entry, full: b.nat == NAT_FULL })
}

/// The reply translated back (source: the VIP and its port; with `full`, destination:
/// the client and its port) and sent toward the client. An ICMP error from the
/// backend's side (its "port unreachable", a router's "too big") has its quote
/// translated the same way and says nothing about the connection's state.
#[inline(always)]
fn back_to_client(ctx: &XdpContext, r: &ReplyOf, full: bool) -> u32 {
    let (p, flow) = (&r.p, &r.flow);
    let v6 = p.family == FAMILY_V6;
    let l4 = p.l4 as usize;
    let translated = if p.icmp_error != 0 {
        translate_icmp(ctx, l4, v6, Side::Source, &flow.dst, flow.dport, true).and_then(|()| {
            if full {
                translate_icmp(ctx, l4, v6, Side::Destination, &flow.src, flow.sport, false)
            } else {
                Ok(())
            }
        })
    } else {
        if p.proto == PROTO_TCP {
            conntrack::server_segment(r.entry, p.tcp_flags);
        }
        translate(ctx, l4, v6, Side::Source, &flow.dst, flow.dport, true).and_then(|()| {
            if full {
                translate(ctx, l4, v6, Side::Destination, &flow.src, flow.sport, false)
            } else {
                Ok(())
            }
        })
    };
    if let Err(reason) = translated {
        stats::global(reason);
        return xdp_action::XDP_DROP;
    }
    let action = toward_client(ctx, flow, v6);
    if p.icmp_error != 0 && action != xdp_action::XDP_DROP {
        stats::global(p.icmp_error as u32);
    }
    action
}

/// Sends a translated reply to the client's next hop as the kernel's routing and
/// neighbour tables give it (`bpf_fib_lookup`). Without a neighbour entry (or for a
/// reply longer than the route allows) the kernel forwards the frame itself.
#[inline(always)]
fn toward_client(ctx: &XdpContext, flow: &FlowKey, v6: bool) -> u32 {
    // The client's side is untagged: a tag the reply came with is the backends' VLAN's.
    if super::forward::retag(ctx, 0).is_err() {
        stats::global(stat::DROP_NO_HEADROOM);
        return xdp_action::XDP_DROP;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut fib: aya_ebpf::bindings::bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.l4_protocol = flow.proto;
    fib.sport = flow.dport;
    fib.dport = flow.sport;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    let ip_len = if v6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = flow.dst;
        fib.__bindgen_anon_4.ipv6_dst = flow.src;
        parse::read_be16(start, end, ETH_HLEN + 4).map(|n| n + 40)
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = flow.dst[0];
        fib.__bindgen_anon_4.ipv4_dst = flow.src[0];
        fib.__bindgen_anon_2.tos = read_u8(start, end, ETH_HLEN + 1).unwrap_or(0);
        parse::read_be16(start, end, ETH_HLEN + 2)
    };
    fib.__bindgen_anon_1.tot_len = ip_len.unwrap_or(0);
    // SAFETY: a helper call on this program's context with a stack buffer of its size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut fib,
            core::mem::size_of::<aya_ebpf::bindings::bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            stats::global(stat::NAT_REPLY_TO_STACK);
            return xdp_action::XDP_PASS;
        }
        _ => {
            stats::global(stat::DROP_NAT_NO_ROUTE);
            return xdp_action::XDP_DROP;
        }
    }
    if start + 12 > end {
        stats::global(stat::DROP_TRUNCATED);
        return xdp_action::XDP_DROP;
    }
    // SAFETY: the 12 bytes of Ethernet addresses were bounds-checked above.
    unsafe {
        write_mac(start, &fib.dmac);
        write_mac(start + 6, &fib.smac);
    }
    stats::global(stat::NAT_REPLY_SENT);
    if fib.ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(fib.ifindex, 0) as u32 }
}
