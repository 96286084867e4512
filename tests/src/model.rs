//! A reference model of the data path, written from docs/architecture.md's rules ("The data path")
//! rather than from the XDP code: for a frame it predicts the verdict, and for a forwarded
//! frame the backend and the bytes that leave. The packet fuzz compares the two.
//!
//! The model knows the configuration (services, mark rules, backends, the planned rings)
//! but not the connection table: with every backend up and no ring change during a fuzz
//! run, a recorded flow goes where the ring sends it anyway, so the table never changes a
//! verdict. `wrr` services are outside the model (their ring is dealt in turns). It does
//! keep a fragment table: where each datagram's first fragment went.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use lb_common::{SERVICE_F_HASH_TUPLE, SERVICE_F_PASS_WHEN_EMPTY, SERVICE_F_ROUND_ROBIN, hash};
use lb_daemon::model::{MarkRuleSpec, Protocol, ServiceMatch, ServiceSpec, addr_words, service_key};
use lb_daemon::plan::DataplaneState;

use crate::fixture::direct_routed;

/// What the model says the data path does with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// To the kernel, byte for byte as it came.
    Pass,
    Drop,
    /// To `backend`, as `frame`; by XDP_TX when `tx`, else XDP_REDIRECT.
    Forward {
        backend: u32,
        frame: Vec<u8>,
        tx: bool,
    },
}

pub struct Model {
    services: Vec<ServiceSpec>,
    marks: Vec<MarkRuleSpec>,
    state: DataplaneState,
    /// MACs the receiving interface accepts (none: any unicast).
    local_macs: Option<BTreeSet<[u8; 6]>>,
    /// The ifindex frames come in on (BPF_PROG_TEST_RUN: loopback).
    ingress: u32,
    /// (source, destination, IP id, protocol) of each datagram whose first fragment was
    /// forwarded -> its backend.
    fragments: RefCell<HashMap<(IpAddr, IpAddr, u32, u8), u32>>,
}

/// A fragment's place in its datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fragment {
    None,
    /// Offset zero, more to come: the transport header is here.
    First {
        id: u32,
    },
    /// No transport header.
    Later {
        id: u32,
    },
}

/// A frame's addresses and ports, as far as the model needs them.
#[derive(Clone, Copy, Debug)]
struct Flow {
    v6: bool,
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
}

enum Parsed {
    /// Not IPv4/IPv6 TCP/UDP/ICMP error, or too short to say where it went.
    NotOurs,
    /// Broken: ours to drop only if `dst` is a service's address.
    Malformed {
        dst: IpAddr,
    },
    Packet {
        flow: Flow,
        icmp_error: bool,
        ipv4_header: Option<(usize, usize)>,
        fragment: Fragment,
    },
}

fn be16(f: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]))
}

fn be32(f: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(f.get(at..at + 4)?.try_into().ok()?))
}

fn addr4(f: &[u8], at: usize) -> Option<IpAddr> {
    let b: [u8; 4] = f.get(at..at + 4)?.try_into().ok()?;
    Some(IpAddr::from(b))
}

fn addr6(f: &[u8], at: usize) -> Option<IpAddr> {
    let b: [u8; 16] = f.get(at..at + 16)?.try_into().ok()?;
    Some(IpAddr::from(b))
}

const TCP: u8 = 6;
const UDP: u8 = 17;

impl Model {
    pub fn new(
        services: Vec<ServiceSpec>,
        marks: Vec<MarkRuleSpec>,
        state: DataplaneState,
        ingress: u32,
    ) -> Self {
        let local_macs = state.local_macs.get(&ingress).cloned();
        Model { services, marks, state, local_macs, ingress, fragments: RefCell::default() }
    }

    /// Datagrams whose first fragment the model saw forwarded.
    pub fn fragments_recorded(&self) -> usize {
        self.fragments.borrow().len()
    }

    pub fn predict(&self, f: &[u8]) -> Verdict {
        let (flow, icmp_error, ipv4_header, fragment) = match parse(f) {
            Parsed::NotOurs => return Verdict::Pass,
            Parsed::Malformed { dst } => {
                return if self.is_service_address(dst) && self.to_us(f) {
                    Verdict::Drop
                } else {
                    Verdict::Pass
                };
            }
            Parsed::Packet { flow, icmp_error, ipv4_header, fragment } => {
                (flow, icmp_error, ipv4_header, fragment)
            }
        };
        if let Fragment::Later { id } = fragment {
            return self.later_fragment(f, flow, ipv4_header, id);
        }
        let verdict = self.whole(f, flow, icmp_error, ipv4_header);
        if let (Fragment::First { id }, Verdict::Forward { backend, .. }) = (fragment, &verdict) {
            self.fragments.borrow_mut().insert((flow.src, flow.dst, id, flow.proto), *backend);
        }
        verdict
    }

    /// A later fragment of a service's address: where its first went, else by the ring of
    /// the address's only `sh` service for its protocol, else dropped.
    fn later_fragment(&self, f: &[u8], flow: Flow, ipv4_header: Option<(usize, usize)>, id: u32) -> Verdict {
        if !self.is_service_address(flow.dst) || !self.to_us(f) {
            return Verdict::Pass;
        }
        if !ipv4_header.is_none_or(|(l3, ihl)| ipv4_header_ok(&f[l3..l3 + ihl])) {
            return Verdict::Drop;
        }
        if let Some(&backend) = self.fragments.borrow().get(&(flow.src, flow.dst, id, flow.proto)) {
            let b = &self.state.backends[&backend];
            return Verdict::Forward { backend, frame: direct_routed(f, b), tx: b.ifindex == self.ingress };
        }
        let proto = if flow.proto == TCP { Protocol::Tcp } else { Protocol::Udp };
        let on_address: Vec<&ServiceSpec> = self
            .services
            .iter()
            .filter(|s| matches!(s.matcher, ServiceMatch::Vip { addr, proto: p, .. } if addr == flow.dst && p == proto))
            .collect();
        let [sole] = on_address[..] else { return Verdict::Drop };
        let Some(state) = self.state.services.get(&service_key(&sole.matcher)) else { return Verdict::Drop };
        if state.flags & (SERVICE_F_HASH_TUPLE | SERVICE_F_ROUND_ROBIN) != 0 {
            return Verdict::Drop;
        }
        if martian(flow.src) || self.is_vip(flow.src) || state.ring.is_empty() {
            return Verdict::Drop;
        }
        self.forward(f, &flow, state)
    }

    /// A packet with its transport header (whole, a first fragment, or an ICMP error).
    fn whole(&self, f: &[u8], flow: Flow, icmp_error: bool, ipv4_header: Option<(usize, usize)>) -> Verdict {
        let Some(service) = self.service_of(&flow) else { return Verdict::Pass };
        if !self.to_us(f) {
            return Verdict::Pass;
        }
        let header_ok = ipv4_header.is_none_or(|(l3, ihl)| ipv4_header_ok(&f[l3..l3 + ihl]));
        let Some(state) = self.state.services.get(&service_key(&service)) else { return Verdict::Pass };
        if icmp_error {
            // An error the director cannot place is the kernel's.
            if !header_ok || state.ring.is_empty() || state.flags & SERVICE_F_ROUND_ROBIN != 0 {
                return Verdict::Pass;
            }
            return self.forward(f, &flow, state);
        }
        if !header_ok || martian(flow.src) || self.is_vip(flow.src) {
            return Verdict::Drop;
        }
        if state.ring.is_empty() {
            return if state.flags & SERVICE_F_PASS_WHEN_EMPTY != 0 { Verdict::Pass } else { Verdict::Drop };
        }
        self.forward(f, &flow, state)
    }

    fn forward(&self, f: &[u8], flow: &Flow, state: &lb_daemon::plan::ServiceState) -> Verdict {
        let (src, dst) = (addr_words(flow.src).1, addr_words(flow.dst).1);
        let h = if state.flags & SERVICE_F_HASH_TUPLE != 0 {
            hash::tuple_hash(&src, &dst, flow.sport.to_be(), flow.dport.to_be(), flow.proto, flow.v6)
        } else {
            hash::source_hash(&src, flow.v6)
        };
        let id = state.ring[(h % state.ring.len() as u32) as usize];
        let b = &self.state.backends[&id];
        Verdict::Forward { backend: id, frame: direct_routed(f, b), tx: b.ifindex == self.ingress }
    }

    /// Destination MAC the receiving interface's own (or configured beside it), unicast.
    fn to_us(&self, f: &[u8]) -> bool {
        let Some(dst) = f.get(0..6).and_then(|d| <[u8; 6]>::try_from(d).ok()) else { return false };
        dst[0] & 1 == 0 && self.local_macs.as_ref().is_none_or(|m| m.contains(&dst))
    }

    fn is_vip(&self, addr: IpAddr) -> bool {
        self.services.iter().any(|s| matches!(s.matcher, ServiceMatch::Vip { addr: a, .. } if a == addr))
    }

    fn is_service_address(&self, dst: IpAddr) -> bool {
        self.is_vip(dst) || self.marks.iter().any(|r| r.dst.contains(&dst))
    }

    /// Exact (VIP, port, protocol) first; then the first mark rule in config order that
    /// matches, whose mark must key a service.
    fn service_of(&self, flow: &Flow) -> Option<ServiceMatch> {
        let proto = if flow.proto == TCP { Protocol::Tcp } else { Protocol::Udp };
        let exact = ServiceMatch::Vip { addr: flow.dst, port: flow.dport, proto };
        if self.services.iter().any(|s| s.matcher == exact) {
            return Some(exact);
        }
        let rule = self.marks.iter().find(|r| {
            r.dst.contains(&flow.dst)
                && r.proto.is_none_or(|p| p == proto)
                && (r.ports.0..=r.ports.1).contains(&flow.dport)
                && r.src.is_none_or(|s| s.contains(&flow.src))
        })?;
        let by_mark = ServiceMatch::Mark(rule.mark);
        self.services.iter().any(|s| s.matcher == by_mark).then_some(by_mark)
    }
}

/// The martian sources of docs/architecture.md: 0/8, 127/8, multicast, limited broadcast; ::, ::1, ff00::/8.
fn martian(src: IpAddr) -> bool {
    match src {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] == 0 || o[0] == 127 || (224..=239).contains(&o[0]) || a.is_broadcast()
        }
        IpAddr::V6(a) => a.is_unspecified() || a.is_loopback() || a.octets()[0] == 0xff,
    }
}

/// The IPv4 header checksum verifies and its options parse (RFC 791: END ends them, NOP is
/// one byte, any other option carries a length of at least 2 that stays in the header).
fn ipv4_header_ok(h: &[u8]) -> bool {
    let mut sum: u32 = h.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if sum != 0xffff {
        return false;
    }
    let opts = &h[20..];
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return true,
            1 => i += 1,
            _ => match opts.get(i + 1) {
                Some(&len) if len >= 2 && i + len as usize <= opts.len() => i += len as usize,
                _ => return false,
            },
        }
    }
    true
}

fn parse(f: &[u8]) -> Parsed {
    let Some(outer) = be16(f, 12) else { return Parsed::NotOurs };
    let (l3, ethertype) = if outer == 0x8100 || outer == 0x88a8 {
        match be16(f, 16) {
            Some(inner) => (18, inner),
            None => return Parsed::NotOurs,
        }
    } else {
        (14, outer)
    };
    match ethertype {
        0x0800 => parse_v4(f, l3),
        0x86dd => parse_v6(f, l3),
        _ => Parsed::NotOurs,
    }
}

fn parse_v4(f: &[u8], l3: usize) -> Parsed {
    let (Some(dst), Some(&vhl)) = (addr4(f, l3 + 16), f.get(l3)) else { return Parsed::NotOurs };
    let malformed = Parsed::Malformed { dst };
    let ihl = (vhl & 0x0f) as usize * 4;
    if vhl >> 4 != 4 || ihl < 20 {
        return malformed;
    }
    let (Some(total), Some(frag), Some(&proto), Some(src)) =
        (be16(f, l3 + 2), be16(f, l3 + 6), f.get(l3 + 9), addr4(f, l3 + 12))
    else {
        return Parsed::NotOurs;
    };
    let total = total as usize;
    if total < ihl || l3 + total > f.len() {
        return malformed;
    }
    let ip = &f[..l3 + total];
    let (offset, more) = (frag & 0x1fff, frag & 0x2000 != 0);
    let fragment = match (offset, more) {
        (0, false) => Fragment::None,
        (0, true) => Fragment::First { id: be16(f, l3 + 4).map_or(0, u32::from) },
        _ => Fragment::Later { id: be16(f, l3 + 4).map_or(0, u32::from) },
    };
    match fragmented(ip, l3 + ihl, proto, false, src, dst, fragment) {
        Parsed::Packet { flow, icmp_error, fragment, .. } => {
            Parsed::Packet { flow, icmp_error, ipv4_header: Some((l3, ihl)), fragment }
        }
        other => other,
    }
}

/// The transport of a packet that may be a fragment: the first parsed with a UDP length
/// that covers the whole datagram, a later one without transport header; fragments of
/// anything but TCP and UDP are not ours.
fn fragmented(
    ip: &[u8],
    l4: usize,
    proto: u8,
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    fragment: Fragment,
) -> Parsed {
    if fragment == Fragment::None {
        return transport(ip, l4, proto, v6, src, dst, false);
    }
    if proto != TCP && proto != UDP {
        return Parsed::NotOurs;
    }
    match fragment {
        Fragment::Later { .. } => Parsed::Packet {
            flow: Flow { v6, proto, src, dst, sport: 0, dport: 0 },
            icmp_error: false,
            ipv4_header: None,
            fragment,
        },
        _ => match transport(ip, l4, proto, v6, src, dst, true) {
            Parsed::Packet { flow, icmp_error, ipv4_header, .. } => {
                Parsed::Packet { flow, icmp_error, ipv4_header, fragment }
            }
            other => other,
        },
    }
}

fn parse_v6(f: &[u8], l3: usize) -> Parsed {
    let (Some(dst), Some(&vtc)) = (addr6(f, l3 + 24), f.get(l3)) else { return Parsed::NotOurs };
    let malformed = Parsed::Malformed { dst };
    if vtc >> 4 != 6 {
        return malformed;
    }
    let (Some(payload), Some(&first), Some(src)) = (be16(f, l3 + 4), f.get(l3 + 6), addr6(f, l3 + 8)) else {
        return Parsed::NotOurs;
    };
    let end = l3 + 40 + payload as usize;
    if payload == 0 || end > f.len() {
        return malformed;
    }
    let ip = &f[..end];
    let (mut next, mut off) = (first, l3 + 40);
    // Up to four hop-by-hop, routing or destination-options headers; a fragment header,
    // a fifth, or a routing header of type 0 with segments left is refused.
    for _ in 0..4 {
        match next {
            0 | 43 | 60 => {
                let (Some(&nh), Some(&len)) = (ip.get(off), ip.get(off + 1)) else { return malformed };
                if next == 43 {
                    match (ip.get(off + 2), ip.get(off + 3)) {
                        (Some(0), Some(&left)) if left != 0 => return malformed,
                        (Some(_), Some(_)) => {}
                        _ => return malformed,
                    }
                }
                next = nh;
                off += (len as usize + 1) * 8;
            }
            44 => {
                let (Some(&nh), Some(field), Some(id)) = (ip.get(off), be16(ip, off + 2), be32(ip, off + 4))
                else {
                    return malformed;
                };
                next = nh;
                off += 8;
                // An atomic fragment (RFC 6946) is a whole packet; the walk goes on.
                let fragment = match (field >> 3, field & 1) {
                    (0, 0) => continue,
                    (0, _) => Fragment::First { id },
                    _ => Fragment::Later { id },
                };
                return fragmented(ip, off, next, true, src, dst, fragment);
            }
            _ => return transport(ip, off, next, true, src, dst, false),
        }
    }
    match next {
        0 | 43 | 60 | 44 => malformed,
        _ => transport(ip, off, next, true, src, dst, false),
    }
}

/// The transport header at `l4` of `ip` (the frame up to the end of the IP packet).
fn transport(
    ip: &[u8],
    l4: usize,
    proto: u8,
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    first_fragment: bool,
) -> Parsed {
    let malformed = Parsed::Malformed { dst };
    match proto {
        TCP => {
            let Some(&doff) = ip.get(l4 + 12) else { return malformed };
            if ip.get(l4 + 13).is_none() || (doff >> 4) < 5 || l4 + (doff >> 4) as usize * 4 > ip.len() {
                return malformed;
            }
        }
        UDP => {
            let Some(len) = be16(ip, l4 + 4) else { return malformed };
            if len < 8 || l4 + 8 > ip.len() || (l4 + len as usize > ip.len() && !first_fragment) {
                return malformed;
            }
        }
        1 if !v6 => return icmp_error(ip, l4, false, dst),
        58 if v6 => return icmp_error(ip, l4, true, dst),
        _ => return Parsed::NotOurs,
    }
    let (Some(sport), Some(dport)) = (be16(ip, l4), be16(ip, l4 + 2)) else { return malformed };
    Parsed::Packet {
        flow: Flow { v6, proto, src, dst, sport, dport },
        icmp_error: false,
        ipv4_header: None,
        fragment: Fragment::None,
    }
}

/// Destination unreachable, time exceeded, parameter problem (ICMPv4 3, 11, 12; ICMPv6
/// 1 to 4, packet too big among them) quoting a TCP or UDP packet that `to` sent: the
/// flow as its client sends it.
fn icmp_error(ip: &[u8], l4: usize, v6: bool, to: IpAddr) -> Parsed {
    let Some(&kind) = ip.get(l4) else { return Parsed::NotOurs };
    let error = if v6 { (1..=4).contains(&kind) } else { matches!(kind, 3 | 11 | 12) };
    if !error {
        return Parsed::NotOurs;
    }
    let q = l4 + 8;
    let quoted = if v6 {
        match (ip.get(q), ip.get(q + 6), addr6(ip, q + 8), addr6(ip, q + 24)) {
            (Some(&vtc), Some(&next), Some(src), Some(dst)) if vtc >> 4 == 6 => {
                Some((next, src, dst, q + 40))
            }
            _ => None,
        }
    } else {
        match (ip.get(q), be16(ip, q + 6), ip.get(q + 9), addr4(ip, q + 12), addr4(ip, q + 16)) {
            (Some(&vhl), Some(frag), Some(&proto), Some(src), Some(dst))
                if vhl >> 4 == 4 && vhl & 0x0f >= 5 && frag & 0x1fff == 0 =>
            {
                Some((proto, src, dst, q + (vhl & 0x0f) as usize * 4))
            }
            _ => None,
        }
    };
    let Some((proto, src, dst, ports)) = quoted else { return Parsed::NotOurs };
    let (Some(sport), Some(dport)) = (be16(ip, ports), be16(ip, ports + 2)) else { return Parsed::NotOurs };
    if (proto != TCP && proto != UDP) || src != to {
        return Parsed::NotOurs;
    }
    let flow = Flow { v6, proto, src: dst, dst: src, sport: dport, dport: sport };
    Parsed::Packet { flow, icmp_error: true, ipv4_header: None, fragment: Fragment::None }
}
