//! Fragments of services' datagrams. The first fragment carries the ports: it is scheduled
//! like any packet, and where it went is recorded under the datagram's identity (source,
//! destination, protocol, IP id). Later fragments carry no ports: they follow the record.
//! One that arrives before its first (reordered, or the record evicted) can still be
//! placed when its address has a single `sh` service for its protocol, whose ring needs
//! only the source; otherwise it is dropped and counted, as the director cannot know
//! which service, let alone which server, its datagram belongs to.
use lb_common::{AddrKey, BACKEND_UP, FragEntry, FragKey, PROTO_TCP};
use lb_ebpf::parse::Parsed;

use super::{
    conntrack::Decision,
    maps::{BACKENDS, FRAGMENTS, VIP_ADDRS},
};

#[inline(always)]
fn key(p: &Parsed) -> FragKey {
    FragKey { src: p.src, dst: p.dst, id: p.frag_id, proto: p.proto, family: p.family, _pad: 0 }
}

/// Records where the first fragment of a datagram went.
#[inline(always)]
pub fn record(p: &Parsed, d: &Decision) {
    // A full table evicts its oldest record; a failed insert only costs a later fragment
    // its record, and it is counted where that fragment is dropped.
    let _ = FRAGMENTS.insert(&key(p), &FragEntry { service: d.service_id, backend: d.backend_id }, 0);
}

/// Where the first fragment of `p`'s datagram went, if recorded and its server still up.
#[inline(always)]
pub fn follow(p: &Parsed) -> Option<Decision> {
    // SAFETY: the value is copied out at once; the map hands out RCU-protected memory.
    let e = unsafe { FRAGMENTS.get(&key(p)) }.copied()?;
    let b = BACKENDS.get(e.backend).copied()?;
    if b.state != BACKEND_UP {
        return None;
    }
    Some(Decision { service_id: e.service, backend_id: e.backend, backend: b, new_flow: false })
}

/// The port (network order) of the only service on `p`'s address for its protocol, when
/// that service hashes the source alone (see `lb_common::vip_addr_value`).
#[inline(always)]
pub fn sole_source_hashed_port(p: &Parsed) -> Option<u16> {
    let k = AddrKey { addr: p.dst, family: p.family, _pad8: 0, _pad16: 0 };
    // SAFETY: the value is copied out at once.
    let v = unsafe { VIP_ADDRS.get(&k) }.copied()?;
    let port = if p.proto == PROTO_TCP { v as u16 } else { (v >> 16) as u16 };
    (port != 0).then(|| port.to_be())
}
