//! Frame builders for tests and benchmarks: valid checksums unless a field is broken on
//! purpose, so a fixture differs from a real packet only where it says so.

use crate::csum;
use std::vec::Vec;

/// Ethernet source of built frames (the client, or the router in front of the director).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Ethernet destination of built frames (the director's receiving interface).
pub const DIRECTOR_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        payload: usize,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: usize,
    },
    /// An ICMP (IPv4) or ICMPv6 message: type, code, the four bytes after the checksum
    /// (unused, or an MTU), then `body` (for an error, the quoted packet).
    Icmp {
        v6: bool,
        kind: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    /// Any other protocol with `len` zero bytes of payload.
    Other {
        proto: u8,
        len: usize,
    },
}

impl L4 {
    pub fn tcp(sport: u16, dport: u16, flags: u8) -> Self {
        L4::Tcp { sport, dport, flags, payload: 0 }
    }

    pub fn udp(sport: u16, dport: u16) -> Self {
        L4::Udp { sport, dport, payload: 4 }
    }

    fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Icmp { v6: false, .. } => 1,
            L4::Icmp { v6: true, .. } => 58,
            L4::Other { proto, .. } => *proto,
        }
    }

    /// Header and payload with a zero checksum field; returns the checksum offset.
    fn bytes(&self) -> (Vec<u8>, Option<usize>) {
        match *self {
            L4::Tcp { sport, dport, flags, payload } => {
                let mut b = Vec::with_capacity(20 + payload);
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
                b.extend_from_slice(&0u32.to_be_bytes()); // ack
                b.push(5 << 4);
                b.push(flags);
                b.extend_from_slice(&64240u16.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                b.extend((0..payload).map(|i| i as u8));
                (b, Some(16))
            }
            L4::Udp { sport, dport, payload } => {
                let mut b = Vec::with_capacity(8 + payload);
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend((0..payload).map(|i| i as u8));
                (b, Some(6))
            }
            L4::Icmp { kind, code, rest, ref body, .. } => {
                let mut b = vec![kind, code, 0, 0];
                b.extend_from_slice(&rest);
                b.extend_from_slice(body);
                (b, Some(2))
            }
            L4::Other { len, .. } => (vec![0; len], None),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Ipv4Opts {
    pub vlan: Option<u16>,
    /// Bytes of IP options (a multiple of 4, filled with NOPs).
    pub options: usize,
    /// Overrides the IHL nibble (to build broken headers).
    pub ihl: Option<u8>,
    /// Added to the total length field (to claim more bytes than the frame has).
    pub total_len_extra: usize,
    /// Flags and fragment offset field, host order.
    pub frag: u16,
    /// Time to live; `None`: 64.
    pub ttl: Option<u8>,
}

#[derive(Clone, Debug, Default)]
pub struct Ipv6Opts {
    pub vlan: Option<u16>,
    /// Extension header types in order, 8 bytes each.
    pub ext: Vec<u8>,
    /// Hop limit; `None`: 64.
    pub hop_limit: Option<u8>,
}

fn ethernet(vlan: Option<u16>, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&DIRECTOR_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    if let Some(tag) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&tag.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut s = csum::sum_be(src, 0);
    s = csum::sum_be(dst, s);
    s + proto as u32 + len as u32
}

fn finish_l4(l4: &L4, src: &[u8], dst: &[u8]) -> Vec<u8> {
    let (mut b, check_at) = l4.bytes();
    if let Some(at) = check_at {
        // ICMP for IPv4 is the one checksum here without a pseudo-header.
        let pseudo = if l4.proto() == 1 { 0 } else { pseudo_sum(src, dst, l4.proto(), b.len()) };
        let c = csum::checksum(&b, pseudo);
        b[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    b
}

pub fn ipv4(src: [u8; 4], dst: [u8; 4], l4: L4, opts: Ipv4Opts) -> Vec<u8> {
    let mut f = ethernet(opts.vlan, 0x0800);
    let payload = finish_l4(&l4, &src, &dst);
    let hlen = 20 + opts.options;
    let ihl = opts.ihl.unwrap_or((hlen / 4) as u8);
    let tot = (hlen + payload.len() + opts.total_len_extra) as u16;
    let mut h = vec![0x40 | ihl, 0];
    h.extend_from_slice(&tot.to_be_bytes());
    h.extend_from_slice(&0x1c46u16.to_be_bytes());
    h.extend_from_slice(&opts.frag.to_be_bytes());
    h.extend_from_slice(&[opts.ttl.unwrap_or(64), l4.proto(), 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend(std::iter::repeat_n(1u8, opts.options));
    let c = csum::checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&h);
    f.extend_from_slice(&payload);
    f
}

/// An ICMP error from `router` to `dst` quoting `packet` (an IP packet, from its IP
/// header on), cut to `quote_len` bytes as a router does.
pub fn icmp4_error(
    router: [u8; 4],
    dst: [u8; 4],
    kind: u8,
    code: u8,
    mtu: u16,
    packet: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let mut rest = [0; 4];
    rest[2..].copy_from_slice(&mtu.to_be_bytes());
    let body = packet[..quote_len.min(packet.len())].to_vec();
    ipv4(router, dst, L4::Icmp { v6: false, kind, code, rest, body }, Ipv4Opts::default())
}

/// The ICMPv6 form of [`icmp4_error`]; `mtu` fills the four bytes after the checksum.
pub fn icmp6_error(
    router: [u8; 16],
    dst: [u8; 16],
    kind: u8,
    code: u8,
    mtu: u32,
    packet: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let body = packet[..quote_len.min(packet.len())].to_vec();
    ipv6(router, dst, L4::Icmp { v6: true, kind, code, rest: mtu.to_be_bytes(), body }, Ipv6Opts::default())
}

/// Rewrites the IPv4 total length (and header checksum) of `f` to match its length.
pub fn fix_ipv4_total_len(f: &mut [u8], l3: usize) {
    let tot = (f.len() - l3) as u16;
    f[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
    fix_ipv4_checksum(f, l3);
}

/// Recomputes the IPv4 header checksum of `f` after header bytes were changed on purpose.
pub fn fix_ipv4_checksum(f: &mut [u8], l3: usize) {
    let ihl = (f[l3] & 0xf) as usize * 4;
    f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&f[l3..l3 + ihl], 0);
    f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

pub fn ipv6(src: [u8; 16], dst: [u8; 16], l4: L4, opts: Ipv6Opts) -> Vec<u8> {
    let mut f = ethernet(opts.vlan, 0x86dd);
    let payload = finish_l4(&l4, &src, &dst);
    let mut ext = Vec::new();
    for (i, _) in opts.ext.iter().enumerate() {
        let next = opts.ext.get(i + 1).copied().unwrap_or(l4.proto());
        ext.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]); // PadN filling the rest
    }
    let first = opts.ext.first().copied().unwrap_or(l4.proto());
    let plen = (ext.len() + payload.len()) as u16;
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&plen.to_be_bytes());
    f.extend_from_slice(&[first, opts.hop_limit.unwrap_or(64)]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&ext);
    f.extend_from_slice(&payload);
    f
}

/// The IPv4 datagram of `frame` (untagged, from these builders) cut as a sender's kernel
/// cuts it: fragments of at most `size` payload bytes (a multiple of 8), each with the
/// datagram's header, identification `id`, its offset, MF on all but the last, and its
/// own total length and checksum.
pub fn fragments_v4(frame: &[u8], size: usize, id: u16) -> Vec<Vec<u8>> {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let payload = &frame[14 + ihl..14 + total];
    let chunks: Vec<&[u8]> = payload.chunks(size).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut f = frame[..14 + ihl].to_vec();
        let more = if i + 1 < chunks.len() { 0x2000 } else { 0 };
        f[16..18].copy_from_slice(&((ihl + chunk.len()) as u16).to_be_bytes());
        f[18..20].copy_from_slice(&id.to_be_bytes());
        f[20..22].copy_from_slice(&(more | (i * size / 8) as u16).to_be_bytes());
        fix_ipv4_checksum(&mut f, 14);
        f.extend_from_slice(chunk);
        out.push(f);
    }
    out
}

/// The IPv6 form of [`fragments_v4`]: each fragment carries a fragment header (RFC 8200)
/// with the datagram's next header, its offset, M on all but the last, and `id`.
pub fn fragments_v6(frame: &[u8], size: usize, id: u32) -> Vec<Vec<u8>> {
    let next = frame[20];
    let payload = &frame[54..];
    let chunks: Vec<&[u8]> = payload.chunks(size).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut f = frame[..54].to_vec();
        f[18..20].copy_from_slice(&((8 + chunk.len()) as u16).to_be_bytes());
        f[20] = 44;
        let more = u16::from(i + 1 < chunks.len());
        let field = ((i * size / 8) as u16) << 3 | more;
        f.extend_from_slice(&[next, 0]);
        f.extend_from_slice(&field.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(chunk);
        out.push(f);
    }
    out
}

/// `inner` (a frame from these builders, untagged) tunnelled over IPv4: its IP packet
/// behind an outer header from `src` to `dst` (protocol 4 for IPv4 inside, 41 for IPv6; DF
/// set, TTL 64, `frag` in the flags and offset field), in a frame with the same Ethernet
/// addresses.
pub fn in_ipv4(inner: &[u8], src: [u8; 4], dst: [u8; 4], frag: u16) -> Vec<u8> {
    let packet = &inner[14..];
    let proto = if packet[0] >> 4 == 6 { 41 } else { 4 };
    let len = (20 + packet.len()) as u16;
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&len.to_be_bytes());
    h[6..8].copy_from_slice(&(0x4000 | frag).to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let c = csum::checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = ethernet(None, 0x0800);
    f.extend_from_slice(&h);
    f.extend_from_slice(packet);
    f
}

/// As [`in_ipv4`], over IPv6 (next header 4 or 41, hop limit 64).
pub fn in_ipv6(inner: &[u8], src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
    let packet = &inner[14..];
    let next = if packet[0] >> 4 == 6 { 41 } else { 4 };
    let mut f = ethernet(None, 0x86dd);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(packet.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next, 64]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(packet);
    f
}

/// `frame` with an 802.1Q tag inserted after its Ethernet addresses.
pub fn tagged(frame: &[u8], vlan: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&vlan.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}
