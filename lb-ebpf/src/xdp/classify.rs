//! Which service, if any, a packet belongs to: exact (VIP, port, protocol) first, then the
//! fwmark-style rules (`iptables -t mangle ... -j MARK` + `ipvsadm -A -f`), done here.
use aya_ebpf::{maps::lpm_trie::Key, programs::XdpContext};
use lb_common::{
    AddrKey, FAMILY_V4, KIND_MARK, MAX_LOCAL_MACS, MAX_MARK_RULES_PER_PREFIX, MarkRuleSet, PROTO_ICMP,
    Service, ServiceKey, hash::vip_filter_slot, local_mac_slot,
};
use lb_ebpf::parse::{Parsed, ptr_at};

use super::maps::{
    CONFIG, LOCAL_MAC_SLOTS, LOCAL_MACS, MARK_RULES_V4, MARK_RULES_V6, NAT_SOURCE_FILTER, SERVICES,
    VIP_ADDRS, VIP_FILTER,
};

/// False when the destination is certainly no exact-match VIP. Most traffic through a
/// director is for no VIP, and one inlined array load tells.
#[inline(always)]
pub fn maybe_vip(p: &Parsed) -> bool {
    maybe_vip_address(&p.dst, p.family != FAMILY_V4)
}

#[inline(always)]
fn maybe_vip_address(addr: &[u32; 4], ipv6: bool) -> bool {
    VIP_FILTER.get(vip_filter_slot(addr, ipv6)).is_some_and(|f| *f != 0)
}

/// False when the source is certainly no NAT backend (see `NAT_SOURCE_FILTER`).
#[inline(always)]
pub fn maybe_nat_backend(p: &Parsed) -> bool {
    let slot = vip_filter_slot(&p.src, p.family != FAMILY_V4);
    NAT_SOURCE_FILTER.get(slot).is_some_and(|f| *f != 0)
}

/// True for an IPv4 packet (given its protocol and raw addresses) that can be neither a
/// service's nor a NAT backend's reply: its destination is no VIP and in no mark rule's
/// prefix (none exist), its source is no NAT backend's, and it is no ICMP message (an
/// error quotes a flow of its own). Whatever the rest of its header holds (a fragment,
/// a malformed header), `balance` would pass it; told by three inlined array loads, so
/// that most traffic through a director, which is for no service, skips the rest of the
/// parse. False when not sure.
#[inline(always)]
pub fn certainly_not_ours_v4(proto: u8, src: u32, dst: u32) -> bool {
    if proto == PROTO_ICMP || maybe_vip_address(&[dst, 0, 0, 0], false) {
        return false;
    }
    match CONFIG.get(0) {
        Some(cfg) if cfg.mark_prefixes_v4 == 0 => {}
        _ => return false,
    }
    NAT_SOURCE_FILTER.get(vip_filter_slot(&[src, 0, 0, 0], false)).is_some_and(|f| *f == 0)
}

/// The service of a packet: by exact VIP if `maybe_vip(p)`, else by mark rules.
#[inline(always)]
pub fn lookup_service(p: &Parsed, maybe_vip: bool) -> Option<Service> {
    if maybe_vip {
        let exact = ServiceKey { addr: p.dst, port: p.dport, proto: p.proto, kind: p.family };
        // SAFETY: the value is copied out at once; the map hands out RCU-protected memory.
        if let Some(s) = unsafe { SERVICES.get(&exact) } {
            return Some(*s);
        }
    }
    let mark = match_mark(p)?;
    let by_mark = ServiceKey { addr: [mark, 0, 0, 0], port: 0, proto: 0, kind: KIND_MARK };
    // SAFETY: as above.
    unsafe { SERVICES.get(&by_mark) }.copied()
}

#[inline(always)]
fn rules_for(family: u8, dst: &[u32; 4]) -> Option<&'static MarkRuleSet> {
    // An array lookup the verifier inlines, in place of a trie walk on every packet
    // that is not for a VIP when no mark rules exist.
    let cfg = CONFIG.get(0)?;
    if family == FAMILY_V4 {
        if cfg.mark_prefixes_v4 == 0 {
            return None;
        }
        MARK_RULES_V4.get(Key::new(32, dst[0]))
    } else {
        if cfg.mark_prefixes_v6 == 0 {
            return None;
        }
        MARK_RULES_V6.get(Key::new(128, *dst))
    }
}

/// First rule in config order whose protocol, port range and source prefix match.
#[inline(always)]
fn match_mark(p: &Parsed) -> Option<u32> {
    let set = rules_for(p.family, &p.dst)?;
    let dport = u16::from_be(p.dport);
    for i in 0..MAX_MARK_RULES_PER_PREFIX {
        if i as u32 >= set.count {
            break;
        }
        let r = &set.rules[i];
        if (r.proto != 0 && r.proto != p.proto) || dport < r.port_lo || dport > r.port_hi {
            continue;
        }
        if p.src[0] & r.src_mask[0] == r.src[0]
            && p.src[1] & r.src_mask[1] == r.src[1]
            && p.src[2] & r.src_mask[2] == r.src[2]
            && p.src[3] & r.src_mask[3] == r.src[3]
        {
            return Some(r.mark);
        }
    }
    None
}

/// Was a packet we could not parse meant for one of our services? Only then is it ours
/// to drop; anything else belongs to the kernel.
#[inline(always)]
pub fn is_service_address(family: u8, dst: &[u32; 4]) -> bool {
    is_vip(family, dst) || rules_for(family, dst).is_some()
}

/// Is `addr` the address of an exact-match service?
#[inline(always)]
pub fn is_vip(family: u8, addr: &[u32; 4]) -> bool {
    // The filter (which has every VIP's address) rules most addresses out with an inlined
    // array load; a new flow's source check would otherwise pay a hash lookup.
    if !maybe_vip_address(addr, family != FAMILY_V4) {
        return false;
    }
    let key = AddrKey { addr: *addr, family, _pad8: 0, _pad16: 0 };
    // SAFETY: presence test only.
    unsafe { VIP_ADDRS.get(&key) }.is_some()
}

/// Is the frame addressed to this director at the link layer: to the receiving
/// interface's own MAC or one configured beside it? Broadcast, multicast and other hosts'
/// unicast (flooded by a switch that has not learnt them) are not, and the kernel drops
/// them as PACKET_OTHERHOST; balancing them would make a standby director forward too.
/// An interface the daemon registered no MACs for accepts every unicast frame.
#[inline(always)]
pub fn addressed_to_us(ctx: &XdpContext) -> bool {
    let start = ctx.data();
    let Some(p) = ptr_at::<[u8; 6]>(start, ctx.data_end(), 0) else { return false };
    // SAFETY: the six bytes were bounds-checked by ptr_at; byte arrays are unaligned.
    let dst = unsafe { p.read_unaligned() };
    // The group bit: broadcast and multicast.
    if dst[0] & 1 != 0 {
        return false;
    }
    let ifindex = ctx.ingress_ifindex() as u32;
    let local = match LOCAL_MAC_SLOTS.get(local_mac_slot(ifindex)) {
        Some(slot) if slot.ifindex == ifindex => slot,
        // No registered interface folds to the slot.
        Some(slot) if slot.ifindex == 0 => return true,
        // Another interface holds the slot: the hash has every interface's.
        // SAFETY: the value is read at once; the map hands out RCU-protected memory.
        _ => match unsafe { LOCAL_MACS.get(&ifindex) } {
            Some(local) => local,
            None => return true,
        },
    };
    let want = mac_word(&dst);
    for i in 0..MAX_LOCAL_MACS {
        if i as u32 >= local.count {
            break;
        }
        if mac_word(&local.macs[i]) == want {
            return true;
        }
    }
    false
}

/// A MAC as one integer: comparing `[u8; 6]` arrays may become a `bcmp` call, which BPF
/// does not have.
#[inline(always)]
fn mac_word(m: &[u8; 6]) -> u64 {
    u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as u64 | (u16::from_ne_bytes([m[4], m[5]]) as u64) << 32
}
