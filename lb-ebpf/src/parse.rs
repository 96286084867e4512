//! Header parsing over a raw `[start, end)` byte range.
//!
//! The same code runs in the XDP program (over `ctx.data()..ctx.data_end()`) and in host
//! unit tests (over a slice), so every bounds check the verifier demands is also exercised
//! by ordinary tests. Each read is preceded by an explicit comparison against `end`; the
//! verifier needs to see that comparison on the exact pointer it dereferences.

use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, stat};

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const IPV6_HDR_LEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers skipped before the chain counts as too long; a legitimate client
/// rarely sends more than one.
const MAX_IPV6_EXT_HEADERS: usize = 4;

/// A TCP or UDP packet, with what classification, hashing and counting need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub family: u8,
    pub proto: u8,
    /// Addresses as raw network-order words; IPv4 in word 0.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Ports in network order, as on the wire.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (zero for UDP).
    pub tcp_flags: u8,
}

/// Why a packet was not turned into a [`Parsed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not IPv4/IPv6 TCP/UDP, or too short to say where it was going: the kernel's business.
    NotOurs,
    /// Broken, or not forwardable statelessly. `reason` is a `stat::DROP_*` index; the
    /// packet is dropped only if `dst` turns out to be a service address.
    Malformed { reason: u32, family: u8, dst: [u32; 4] },
}

/// Returns a pointer to a `T` at `start + offset` if it lies wholly before `end`.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*const T> {
    let at = start + offset;
    if at + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(at as *const T)
}

#[inline(always)]
fn read_u8(start: usize, end: usize, offset: usize) -> Option<u8> {
    // SAFETY: ptr_at checked that the byte lies inside [start, end).
    ptr_at::<u8>(start, end, offset).map(|p| unsafe { *p })
}

/// Reads two consecutive bytes. At a variable offset, use this rather than two `read_u8`:
/// LLVM turns a one-byte check `at + 1 > end` into `at >= end`, from which the verifier
/// learns no readable range.
#[inline(always)]
fn read_2u8(start: usize, end: usize, offset: usize) -> Option<[u8; 2]> {
    // SAFETY: bounds checked by ptr_at; byte arrays have no alignment requirement.
    ptr_at::<[u8; 2]>(start, end, offset).map(|p| unsafe { p.read_unaligned() })
}

/// Reads a big-endian u16 and returns it in host order.
#[inline(always)]
fn read_be16(start: usize, end: usize, offset: usize) -> Option<u16> {
    // SAFETY: bounds checked by ptr_at; packet data has no alignment guarantee.
    ptr_at::<u16>(start, end, offset).map(|p| u16::from_be(unsafe { p.read_unaligned() }))
}

/// Reads a u16 as it sits on the wire (network order).
#[inline(always)]
fn read_raw16(start: usize, end: usize, offset: usize) -> Option<u16> {
    // SAFETY: as read_be16.
    ptr_at::<u16>(start, end, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn read_raw32(start: usize, end: usize, offset: usize) -> Option<u32> {
    // SAFETY: as read_be16.
    ptr_at::<u32>(start, end, offset).map(|p| unsafe { p.read_unaligned() })
}

/// Writes a MAC address at `at`, a byte at a time. A `[u8; 6]` copy would become a call
/// into a BPF `memcpy` subprogram; six byte stores cost less than the call.
///
/// # Safety
/// `at..at + 6` must be writable.
#[inline(always)]
pub unsafe fn write_mac(at: usize, mac: &[u8; 6]) {
    let p = at as *mut u8;
    // Volatile keeps LLVM from fusing the stores back into a memcpy call.
    for (i, b) in mac.iter().enumerate() {
        // SAFETY: the caller guarantees the six bytes are writable.
        unsafe { p.add(i).write_volatile(*b) };
    }
}

/// Reads a MAC address at `at` (see [`write_mac`]).
///
/// # Safety
/// `at..at + 6` must be readable.
#[inline(always)]
pub unsafe fn read_mac(at: usize) -> [u8; 6] {
    let p = at as *const u8;
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        // SAFETY: the caller guarantees the six bytes are readable.
        *b = unsafe { p.add(i).read_volatile() };
    }
    mac
}

/// Returns the L3 offset and EtherType, skipping at most one VLAN tag.
#[inline(always)]
pub fn parse_eth(start: usize, end: usize) -> Option<(usize, u16)> {
    let proto = read_be16(start, end, 12)?;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        let inner = read_be16(start, end, ETH_HLEN + 2)?;
        return Some((ETH_HLEN + VLAN_HLEN, inner));
    }
    Some((ETH_HLEN, proto))
}

/// Parses a frame down to its TCP/UDP ports.
#[inline(always)]
pub fn parse(start: usize, end: usize) -> Result<Parsed, ParseError> {
    let (l3, ethertype) = parse_eth(start, end).ok_or(ParseError::NotOurs)?;
    match ethertype {
        ETH_P_IP => parse_ipv4(start, end, l3),
        ETH_P_IPV6 => parse_ipv6(start, end, l3),
        _ => Err(ParseError::NotOurs),
    }
}

#[inline(always)]
fn parse_ipv4(start: usize, end: usize, l3: usize) -> Result<Parsed, ParseError> {
    // Without the fixed header there is no trustworthy destination, so nothing says the
    // packet was meant for a service: leave it to the kernel, which drops it.
    let dst0 = read_raw32(start, end, l3 + 16).ok_or(ParseError::NotOurs)?;
    let dst = [dst0, 0, 0, 0];
    let malformed = |reason| ParseError::Malformed { reason, family: FAMILY_V4, dst };
    let vhl = read_u8(start, end, l3).ok_or(ParseError::NotOurs)?;
    let ihl = (vhl & 0x0f) as usize * 4;
    if vhl >> 4 != 4 || ihl < 20 {
        return Err(malformed(stat::DROP_BAD_IHL));
    }
    let tot_len = read_be16(start, end, l3 + 2).ok_or(ParseError::NotOurs)? as usize;
    // Frames may carry Ethernet padding past tot_len, never fewer bytes than it.
    if tot_len < ihl || start + l3 + tot_len > end {
        return Err(malformed(stat::DROP_BAD_LENGTH));
    }
    let frag = read_be16(start, end, l3 + 6).ok_or(ParseError::NotOurs)?;
    // MF set or a non-zero offset: later fragments carry no ports, so no fragment can be
    // scheduled consistently with the others.
    if frag & 0x3fff != 0 {
        return Err(malformed(stat::DROP_FRAGMENT));
    }
    let proto = read_u8(start, end, l3 + 9).ok_or(ParseError::NotOurs)?;
    let src0 = read_raw32(start, end, l3 + 12).ok_or(ParseError::NotOurs)?;
    parse_l4(start, end, l3 + ihl, l3 + tot_len, proto, FAMILY_V4, [src0, 0, 0, 0], dst)
}

#[inline(always)]
fn read_addr6(start: usize, end: usize, offset: usize) -> Option<[u32; 4]> {
    Some([
        read_raw32(start, end, offset)?,
        read_raw32(start, end, offset + 4)?,
        read_raw32(start, end, offset + 8)?,
        read_raw32(start, end, offset + 12)?,
    ])
}

#[inline(always)]
fn parse_ipv6(start: usize, end: usize, l3: usize) -> Result<Parsed, ParseError> {
    let dst = read_addr6(start, end, l3 + 24).ok_or(ParseError::NotOurs)?;
    let malformed = |reason| ParseError::Malformed { reason, family: FAMILY_V6, dst };
    let vtc = read_u8(start, end, l3).ok_or(ParseError::NotOurs)?;
    if vtc >> 4 != 6 {
        return Err(malformed(stat::DROP_BAD_IHL));
    }
    let payload_len = read_be16(start, end, l3 + 4).ok_or(ParseError::NotOurs)? as usize;
    // Zero is a jumbogram's marker; we do not forward those.
    if payload_len == 0 || start + l3 + IPV6_HDR_LEN + payload_len > end {
        return Err(malformed(stat::DROP_BAD_LENGTH));
    }
    let ip_end = l3 + IPV6_HDR_LEN + payload_len;
    let src = read_addr6(start, end, l3 + 8).ok_or(ParseError::NotOurs)?;
    let mut next = read_u8(start, end, l3 + 6).ok_or(ParseError::NotOurs)?;
    let mut off = l3 + IPV6_HDR_LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => match read_2u8(start, end, off) {
                Some([nh, len]) if off + 2 <= ip_end => {
                    next = nh;
                    off += (len as usize + 1) * 8;
                }
                _ => return Err(malformed(stat::DROP_TRUNCATED)),
            },
            NEXTHDR_FRAGMENT => return Err(malformed(stat::DROP_FRAGMENT)),
            _ => return parse_l4(start, end, off, ip_end, next, FAMILY_V6, src, dst),
        }
    }
    match next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT => {
            Err(malformed(stat::DROP_IPV6_EXT_CHAIN))
        }
        _ => parse_l4(start, end, off, ip_end, next, FAMILY_V6, src, dst),
    }
}

/// `ip_end` is the offset where the IP payload ends: Ethernet padding after it must never
/// be taken for transport header bytes. Reads are still checked against `end`, the frame's
/// end, because that comparison is the only one the verifier learns bounds from.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn parse_l4(
    start: usize,
    end: usize,
    l4: usize,
    ip_end: usize,
    proto: u8,
    family: u8,
    src: [u32; 4],
    dst: [u32; 4],
) -> Result<Parsed, ParseError> {
    let malformed = |reason| ParseError::Malformed { reason, family, dst };
    // Read first, against the frame end, then check the IP length on plain offsets.
    // The other order lets LLVM prove the frame-end checks redundant (they follow from
    // the IP length check) and delete them, and the verifier cannot follow that proof.
    let (tcp_flags, min_len) = match proto {
        PROTO_TCP => {
            let [doff, flags] = read_2u8(start, end, l4 + 12).ok_or(malformed(stat::DROP_TRUNCATED))?;
            let doff = doff >> 4;
            if doff < 5 {
                return Err(malformed(stat::DROP_BAD_L4_HEADER));
            }
            (flags, doff as usize * 4)
        }
        PROTO_UDP => (0, 8),
        _ => return Err(ParseError::NotOurs),
    };
    let sport = read_raw16(start, end, l4).ok_or(malformed(stat::DROP_TRUNCATED))?;
    let dport = read_raw16(start, end, l4 + 2).ok_or(malformed(stat::DROP_TRUNCATED))?;
    if l4 + min_len > ip_end {
        return Err(malformed(stat::DROP_TRUNCATED));
    }
    Ok(Parsed { family, proto, src, dst, sport, dport, tcp_flags })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testpkt::{self, Ipv4Opts, Ipv6Opts, L4};

    fn run(frame: &[u8]) -> Result<Parsed, ParseError> {
        let start = frame.as_ptr() as usize;
        parse(start, start + frame.len())
    }

    fn v4(a: [u8; 4]) -> [u32; 4] {
        [u32::from_ne_bytes(a), 0, 0, 0]
    }

    #[test]
    fn ipv4_tcp_syn() {
        let f = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::tcp(1234, 80, TCP_SYN), Ipv4Opts::default());
        let p = run(&f).unwrap();
        assert_eq!(p.family, FAMILY_V4);
        assert_eq!(p.proto, PROTO_TCP);
        assert_eq!(p.src, v4([10, 0, 0, 1]));
        assert_eq!(p.dst, v4([192, 0, 2, 1]));
        assert_eq!(u16::from_be(p.sport), 1234);
        assert_eq!(u16::from_be(p.dport), 80);
        assert_eq!(p.tcp_flags, TCP_SYN);
    }

    #[test]
    fn ipv4_options_move_the_transport_header() {
        let opts = Ipv4Opts { options: 8, ..Default::default() };
        let f = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::udp(53, 5353), opts);
        let p = run(&f).unwrap();
        assert_eq!((u16::from_be(p.sport), u16::from_be(p.dport)), (53, 5353));
    }

    #[test]
    fn vlan_tag_is_skipped() {
        let opts = Ipv4Opts { vlan: Some(42), ..Default::default() };
        let f = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::tcp(1, 443, TCP_ACK), opts);
        assert_eq!(u16::from_be(run(&f).unwrap().dport), 443);
    }

    #[test]
    fn ethernet_padding_is_not_transport_data() {
        // A 54-byte TCP frame padded to 60 is normal; a 20-byte-short UDP claim is not.
        let mut f =
            testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::tcp(1, 80, TCP_ACK), Ipv4Opts::default());
        f.extend_from_slice(&[0; 6]);
        assert!(run(&f).is_ok());
    }

    #[test]
    fn malformed_ipv4_reports_reason_and_destination() {
        let dst = v4([192, 0, 2, 1]);
        let cases: [(Ipv4Opts, u32); 4] = [
            (Ipv4Opts { ihl: Some(4), ..Default::default() }, stat::DROP_BAD_IHL),
            (Ipv4Opts { total_len_extra: 40, ..Default::default() }, stat::DROP_BAD_LENGTH),
            (Ipv4Opts { frag: 0x0010, ..Default::default() }, stat::DROP_FRAGMENT),
            (Ipv4Opts { frag: 0x2000, ..Default::default() }, stat::DROP_FRAGMENT),
        ];
        for (opts, reason) in cases {
            let f = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::tcp(1, 80, TCP_SYN), opts.clone());
            assert_eq!(run(&f), Err(ParseError::Malformed { reason, family: FAMILY_V4, dst }), "{opts:?}");
        }
    }

    #[test]
    fn truncated_tcp_header_is_malformed() {
        let mut f =
            testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::tcp(1, 80, TCP_SYN), Ipv4Opts::default());
        f.truncate(f.len() - 8);
        testpkt::fix_ipv4_total_len(&mut f, 14);
        assert!(matches!(run(&f), Err(ParseError::Malformed { reason: stat::DROP_TRUNCATED, .. })));
    }

    #[test]
    fn tcp_data_offset_below_five_is_malformed() {
        let mut f =
            testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::tcp(1, 80, TCP_SYN), Ipv4Opts::default());
        f[14 + 20 + 12] = 4 << 4;
        assert!(matches!(run(&f), Err(ParseError::Malformed { reason: stat::DROP_BAD_L4_HEADER, .. })));
    }

    #[test]
    fn short_frames_and_other_protocols_are_not_ours() {
        let f = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::tcp(1, 80, TCP_SYN), Ipv4Opts::default());
        for len in [0, 13, 14, 33] {
            assert_eq!(run(&f[..len]), Err(ParseError::NotOurs), "len {len}");
        }
        let icmp =
            testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::Other { proto: 1, len: 8 }, Ipv4Opts::default());
        assert_eq!(run(&icmp), Err(ParseError::NotOurs));
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(run(&arp), Err(ParseError::NotOurs));
    }

    #[test]
    fn ipv6_with_and_without_extension_headers() {
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        let plain = testpkt::ipv6(src, dst, L4::tcp(1000, 80, TCP_SYN), Ipv6Opts::default());
        let p = run(&plain).unwrap();
        assert_eq!(p.family, FAMILY_V6);
        assert_eq!(u16::from_be(p.dport), 80);
        let hbh = Ipv6Opts { ext: vec![NEXTHDR_HOP, NEXTHDR_DEST], ..Default::default() };
        let p2 = run(&testpkt::ipv6(src, dst, L4::tcp(1000, 80, TCP_SYN), hbh)).unwrap();
        assert_eq!(p, p2);
        let frag = Ipv6Opts { ext: vec![NEXTHDR_FRAGMENT], ..Default::default() };
        assert!(matches!(
            run(&testpkt::ipv6(src, dst, L4::tcp(1000, 80, TCP_SYN), frag)),
            Err(ParseError::Malformed { reason: stat::DROP_FRAGMENT, .. })
        ));
        let long = Ipv6Opts { ext: vec![NEXTHDR_DEST; 5], ..Default::default() };
        assert!(matches!(
            run(&testpkt::ipv6(src, dst, L4::tcp(1000, 80, TCP_SYN), long)),
            Err(ParseError::Malformed { reason: stat::DROP_IPV6_EXT_CHAIN, .. })
        ));
    }
}
