//! Which service, if any, a packet belongs to: exact (VIP, port, protocol) first, then the
//! fwmark-style rules (`iptables -t mangle ... -j MARK` + `ipvsadm -A -f`), done here.
use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    AddrKey, FAMILY_V4, KIND_MARK, MAX_MARK_RULES_PER_PREFIX, MarkRuleSet, Service, ServiceKey,
    hash::vip_filter_slot,
};
use lb_ebpf::parse::Parsed;

use super::maps::{CONFIG, MARK_RULES_V4, MARK_RULES_V6, SERVICES, VIP_ADDRS, VIP_FILTER};

/// False when the destination is certainly no exact-match VIP. Most traffic through a
/// director is for no VIP, and one inlined array load tells.
#[inline(always)]
pub fn maybe_vip(p: &Parsed) -> bool {
    let slot = vip_filter_slot(&p.dst, p.family != FAMILY_V4);
    VIP_FILTER.get(slot).is_some_and(|f| *f != 0)
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
    let key = AddrKey { addr: *dst, family, _pad8: 0, _pad16: 0 };
    // SAFETY: presence test only.
    unsafe { VIP_ADDRS.get(&key) }.is_some() || rules_for(family, dst).is_some()
}
