//! Header parsing over a raw `[start, end)` byte range.
//!
//! The same code runs in the XDP program (over `ctx.data()..ctx.data_end()`) and in host
//! unit tests (over a slice), so every bounds check the verifier demands is also exercised
//! by ordinary tests. Each read is preceded by an explicit comparison against `end`; the
//! verifier needs to see that comparison on the exact pointer it dereferences.

use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, stat};

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

pub const IPV4_HDR_LEN: usize = 20;
pub const IPV6_HDR_LEN: usize = 40;
/// IP-in-IP: the protocol numbers of an inner IPv4 and an inner IPv6 packet.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
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
    /// Offset of the IP header in the frame, and for IPv4 its length in bytes (IHL x 4;
    /// zero for IPv6): what [`check_ipv4_header`] needs, later, for packets that turn out
    /// to be a service's.
    pub l3: u16,
    pub ihl: u8,
    /// Offset of the transport header in the frame (of the ICMP header for an ICMP
    /// error); zero for a later fragment, which has none.
    pub l4: u16,
    /// Non-zero for an ICMP error that quotes a packet of a TCP/UDP flow addressed from the
    /// ICMP message's own destination: then the fields above describe that flow as the
    /// client sends it (the quoted packet went the other way, so its addresses and ports
    /// are swapped back), `tcp_flags` is zero, and this is the `stat::ICMP_*` counter of
    /// the error's kind.
    pub icmp_error: u8,
    /// `FRAG_FIRST` for the first fragment of a datagram (its transport header is there,
    /// its UDP length covers the whole datagram), `FRAG_LATER` for the others (no
    /// transport header: ports and flags are zero), zero for a whole packet.
    pub frag: u8,
    /// The datagram's identification (IPv4: 16 bits; IPv6: the fragment header's 32),
    /// for fragments.
    pub frag_id: u32,
}

impl Parsed {
    /// The packet's connection-table key.
    #[inline(always)]
    pub fn flow_key(&self) -> FlowKey {
        FlowKey {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            family: self.family,
            _pad: 0,
        }
    }
}

pub const FRAG_FIRST: u8 = 1;
pub const FRAG_LATER: u8 = 2;

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
pub fn read_u8(start: usize, end: usize, offset: usize) -> Option<u8> {
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
pub fn read_be16(start: usize, end: usize, offset: usize) -> Option<u16> {
    // SAFETY: bounds checked by ptr_at; packet data has no alignment guarantee.
    ptr_at::<u16>(start, end, offset).map(|p| u16::from_be(unsafe { p.read_unaligned() }))
}

/// Reads a big-endian u32 and returns it in host order.
#[inline(always)]
pub fn read_be32(start: usize, end: usize, offset: usize) -> Option<u32> {
    // SAFETY: bounds checked by ptr_at; packet data has no alignment guarantee.
    ptr_at::<u32>(start, end, offset).map(|p| u32::from_be(unsafe { p.read_unaligned() }))
}

/// Reads a u16 as it sits on the wire (network order).
#[inline(always)]
fn read_raw16(start: usize, end: usize, offset: usize) -> Option<u16> {
    // SAFETY: as read_be16.
    ptr_at::<u16>(start, end, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
pub fn read_raw32(start: usize, end: usize, offset: usize) -> Option<u32> {
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
    parse_unless(start, end, |_, _, _| false)
}

/// As [`parse`], but an IPv4 packet for which `not_ours(protocol, source, destination)`
/// holds (addresses as raw network-order words) is `NotOurs` as soon as those three fields
/// are read, before the rest of its header is looked at: a caller that passes most packets
/// untouched spares them the rest of the parse.
#[inline(always)]
pub fn parse_unless(
    start: usize,
    end: usize,
    not_ours: impl Fn(u8, u32, u32) -> bool,
) -> Result<Parsed, ParseError> {
    let (l3, ethertype) = parse_eth(start, end).ok_or(ParseError::NotOurs)?;
    match ethertype {
        ETH_P_IP => parse_ipv4(start, end, l3, not_ours),
        ETH_P_IPV6 => parse_ipv6(start, end, l3),
        _ => Err(ParseError::NotOurs),
    }
}

#[inline(always)]
fn parse_ipv4(
    start: usize,
    end: usize,
    l3: usize,
    not_ours: impl Fn(u8, u32, u32) -> bool,
) -> Result<Parsed, ParseError> {
    // Without the fixed header there is no trustworthy destination, so nothing says the
    // packet was meant for a service: leave it to the kernel, which drops it.
    let dst0 = read_raw32(start, end, l3 + 16).ok_or(ParseError::NotOurs)?;
    let proto = read_u8(start, end, l3 + 9).ok_or(ParseError::NotOurs)?;
    let src0 = read_raw32(start, end, l3 + 12).ok_or(ParseError::NotOurs)?;
    if not_ours(proto, src0, dst0) {
        return Err(ParseError::NotOurs);
    }
    let dst = [dst0, 0, 0, 0];
    let malformed = |reason| ParseError::Malformed { reason, family: FAMILY_V4, dst };
    let vhl = read_u8(start, end, l3).ok_or(ParseError::NotOurs)?;
    let ihl = (vhl & 0x0f) as usize * 4;
    if vhl >> 4 != 4 {
        return Err(malformed(stat::DROP_BAD_VERSION));
    }
    if ihl < 20 {
        return Err(malformed(stat::DROP_BAD_IHL));
    }
    let tot_len = read_be16(start, end, l3 + 2).ok_or(ParseError::NotOurs)? as usize;
    // Frames may carry Ethernet padding past tot_len, never fewer bytes than it.
    if tot_len < ihl || start + l3 + tot_len > end {
        return Err(malformed(stat::DROP_BAD_LENGTH));
    }
    let frag = read_be16(start, end, l3 + 6).ok_or(ParseError::NotOurs)?;
    let src = [src0, 0, 0, 0];
    // A fragment: MF set (the first, offset zero, or a middle one) or an offset.
    let (offset, more) = (frag & 0x1fff, frag & 0x2000 != 0);
    if offset != 0 || more {
        let id = read_be16(start, end, l3 + 4).ok_or(ParseError::NotOurs)? as u32;
        return fragment(start, end, l3, l3 + ihl, l3 + tot_len, proto, FAMILY_V4, src, dst, offset == 0, id)
            .map(|p| Parsed { ihl: ihl as u8, ..p });
    }
    let mut p = parse_l4(start, end, l3 + ihl, l3 + tot_len, proto, FAMILY_V4, src, dst, false)?;
    p.l3 = l3 as u16;
    p.ihl = ihl as u8;
    Ok(p)
}

/// A fragment of a TCP or UDP datagram (anything else is the kernel's): the first one
/// parsed to its ports, a later one to its addresses. `l4` is where the fragment's
/// payload starts, `ip_end` where the IP packet ends.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fragment(
    start: usize,
    end: usize,
    l3: usize,
    l4: usize,
    ip_end: usize,
    proto: u8,
    family: u8,
    src: [u32; 4],
    dst: [u32; 4],
    first: bool,
    id: u32,
) -> Result<Parsed, ParseError> {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(ParseError::NotOurs);
    }
    let p = if first {
        Parsed { frag: FRAG_FIRST, ..parse_l4(start, end, l4, ip_end, proto, family, src, dst, true)? }
    } else {
        Parsed { family, proto, src, dst, frag: FRAG_LATER, ..Parsed::default() }
    };
    Ok(Parsed { l3: l3 as u16, frag_id: id, ..p })
}

/// IPv4 header words summed as the header checksum covers them, at most 15 (IHL 15).
const MAX_IPV4_WORDS: usize = 15;
/// Room for the options' words (at most 10) and past them, up to the largest index the
/// verifier may assume (15); the words past the options are zero (END).
const OPTION_WORDS: usize = 16;
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;

/// What the kernel checks of an IPv4 header before it accepts a packet, beyond what
/// [`parse`] already did: the header checksum, and options that parse (each option's
/// length at least 2 and within the header). Run only for packets that may be a
/// service's, so that traffic for no service pays nothing for it. `Err` is a
/// `stat::DROP_*` reason.
#[inline(always)]
pub fn check_ipv4_header(start: usize, end: usize, p: &Parsed) -> Result<(), u32> {
    if p.family != FAMILY_V4 {
        return Ok(());
    }
    let (l3, ihl) = (p.l3 as usize, p.ihl as usize);
    if ihl == 20 {
        // Nearly every packet: five words, no options, nothing copied.
        // One bounds check for the whole header: five separate ones let LLVM merge them
        // into arithmetic on the packet end, which the verifier refuses.
        let h = ptr_at::<[u32; 5]>(start, end, l3).ok_or(stat::DROP_TRUNCATED)?;
        // SAFETY: the 20 bytes were bounds-checked by ptr_at; packet data is unaligned.
        let words = unsafe { h.read_unaligned() };
        return if ipv4_header_sum(&words) == 0xffff { Ok(()) } else { Err(stat::DROP_BAD_IP_CHECKSUM) };
    }
    let mut sum: u64 = 0;
    // Options copied out as the checksum loop reads them: parsing them from the stack
    // needs no further packet bounds checks.
    let mut opts = [0u32; OPTION_WORDS];
    for i in 0..MAX_IPV4_WORDS {
        if i * 4 >= ihl {
            break;
        }
        let w = read_raw32(start, end, l3 + i * 4).ok_or(stat::DROP_TRUNCATED)?;
        sum += (w & 0xffff) as u64 + (w >> 16) as u64;
        if i >= 5 {
            opts[i - 5] = w;
        }
    }
    if fold(sum) != 0xffff {
        return Err(stat::DROP_BAD_IP_CHECKSUM);
    }
    if ihl > 20 && !ipv4_options_parse(&opts, ihl - 20) {
        return Err(stat::DROP_BAD_IP_OPTIONS);
    }
    Ok(())
}

/// The one's-complement sum of a 20-byte IPv4 header read as five words in memory order:
/// 0xffff when its checksum is right; with a zero checksum field, its complement is the
/// checksum to store (in the same order).
#[inline(always)]
pub fn ipv4_header_sum(words: &[u32; 5]) -> u16 {
    fold(words.iter().fold(0u64, |a, w| a + (w & 0xffff) as u64 + (w >> 16) as u64)) as u16
}

/// A one's-complement sum of 16-bit words folded to 16 bits. Byte order does not matter
/// to it (RFC 1071 §2(B)); at most 15 words of 17 bits fit two folds.
#[inline(always)]
fn fold(mut sum: u64) -> u64 {
    sum = (sum & 0xffff) + (sum >> 16);
    (sum & 0xffff) + (sum >> 16)
}

/// Walks the options TLVs as the kernel's `ip_options_compile` does: END stops, NOP is one
/// byte, every other option has a length byte of at least 2 and must end within `len`.
///
/// The loop has one path that goes on (NOP is an option of length one) and no iteration
/// counter, so that the verifier can prune its states instead of walking every sequence.
#[inline(always)]
fn ipv4_options_parse(words: &[u32; OPTION_WORDS], len: usize) -> bool {
    // Shifts rather than indexing the word's bytes, which LLVM turns into a pointer OR
    // that the verifier refuses. The words hold network order as loaded (little endian).
    // LLVM drops the bounds check of `get` that `i < len <= 40` makes redundant, and the
    // verifier, which widens `i` across iterations, may then see an index up to 15: the
    // array has room for that (see OPTION_WORDS).
    let byte = |i: usize| -> u8 { words.get(i / 4).map_or(IPOPT_END, |w| (w >> ((i & 3) * 8)) as u8) };
    let len = len.min((MAX_IPV4_WORDS - 5) * 4);
    let mut i = 0;
    while i < len {
        let kind = byte(i);
        if kind == IPOPT_END {
            return true;
        }
        let opt_len = if kind == IPOPT_NOOP { 1 } else { byte(i + 1) as usize };
        if opt_len == 0 || (kind != IPOPT_NOOP && opt_len < 2) || i + opt_len > len {
            return false;
        }
        i += opt_len;
    }
    true
}

/// A source address no host sends from, which the kernel drops as martian: 0.0.0.0/8,
/// 127.0.0.0/8, multicast, 255.255.255.255; ::, ::1, ff00::/8. (A VIP as the source is
/// martian too; that needs a map lookup, done by the caller.)
#[inline(always)]
pub fn is_martian_source(family: u8, src: &[u32; 4]) -> bool {
    let first = src[0].to_ne_bytes();
    if family == FAMILY_V4 {
        return first[0] == 0 || first[0] == 127 || (first[0] & 0xf0) == 0xe0 || src[0] == u32::MAX;
    }
    let low = src[3].to_ne_bytes();
    let upper_zero = src[0] == 0 && src[1] == 0 && src[2] == 0;
    first[0] == 0xff || (upper_zero && (src[3] == 0 || low == [0, 0, 0, 1]))
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
        return Err(malformed(stat::DROP_BAD_VERSION));
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
    // The walk only finds where the transport header is (and whether this is a fragment);
    // the transport is parsed once, after it, so that its code is not repeated per step.
    let (mut fragmented, mut first, mut frag_id) = (false, false, 0);
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if next == NEXTHDR_ROUTING {
            // Type 0 with segments left would make the real server forward the packet on
            // (RFC 5095 deprecated it for that); the kernel refuses it.
            match read_2u8(start, end, off + 2) {
                Some(_) if off + 4 > ip_end => return Err(malformed(stat::DROP_TRUNCATED)),
                Some([0, segments_left]) if segments_left != 0 => return Err(malformed(stat::DROP_IPV6_RH0)),
                Some(_) => {}
                None => return Err(malformed(stat::DROP_TRUNCATED)),
            }
        }
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => match read_2u8(start, end, off) {
                Some([nh, len]) if off + 2 <= ip_end => {
                    next = nh;
                    off += (len as usize + 1) * 8;
                }
                _ => return Err(malformed(stat::DROP_TRUNCATED)),
            },
            NEXTHDR_FRAGMENT => {
                // Next header, reserved, offset (13 bits) with M in the lowest bit, id.
                let (Some([nh, _]), Some(field), Some(id)) = (
                    read_2u8(start, end, off),
                    read_be16(start, end, off + 2),
                    read_be32(start, end, off + 4),
                ) else {
                    return Err(malformed(stat::DROP_TRUNCATED));
                };
                if off + 8 > ip_end {
                    return Err(malformed(stat::DROP_TRUNCATED));
                }
                next = nh;
                off += 8;
                // An atomic fragment (no offset, no M: RFC 6946) is a whole packet.
                let (offset, more) = (field >> 3, field & 1 != 0);
                if offset != 0 || more {
                    (fragmented, first, frag_id) = (true, offset == 0, id);
                    break;
                }
            }
            _ => break,
        }
    }
    if fragmented {
        return fragment(start, end, l3, off, ip_end, next, FAMILY_V6, src, dst, first, frag_id);
    }
    match next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT => {
            Err(malformed(stat::DROP_IPV6_EXT_CHAIN))
        }
        _ => with_l3(parse_l4(start, end, off, ip_end, next, FAMILY_V6, src, dst, false), l3),
    }
}

#[inline(always)]
fn with_l3(p: Result<Parsed, ParseError>, l3: usize) -> Result<Parsed, ParseError> {
    p.map(|p| Parsed { l3: l3 as u16, ..p })
}

/// `ip_end` is the offset where the IP payload ends: Ethernet padding after it must never
/// be taken for transport header bytes. Reads are still checked against `end`, the frame's
/// end, because that comparison is the only one the verifier learns bounds from. In a
/// first fragment (`first_fragment`) the UDP length is the whole datagram's.
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
    first_fragment: bool,
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
        PROTO_ICMP if family == FAMILY_V4 => return parse_icmp_error(start, end, l4, ip_end, family, dst),
        PROTO_ICMPV6 if family == FAMILY_V6 => return parse_icmp_error(start, end, l4, ip_end, family, dst),
        _ => return Err(ParseError::NotOurs),
    };
    let sport = read_raw16(start, end, l4).ok_or(malformed(stat::DROP_TRUNCATED))?;
    let dport = read_raw16(start, end, l4 + 2).ok_or(malformed(stat::DROP_TRUNCATED))?;
    let udp_len = if proto == PROTO_UDP {
        read_be16(start, end, l4 + 4).ok_or(malformed(stat::DROP_TRUNCATED))? as usize
    } else {
        0
    };
    if l4 + min_len > ip_end {
        return Err(malformed(stat::DROP_TRUNCATED));
    }
    // As the kernel's UDP receive: shorter than its header, or claiming more than the IP
    // payload, is refused (a shorter length with trailing bytes is trimmed, not refused).
    if proto == PROTO_UDP && (udp_len < 8 || (l4 + udp_len > ip_end && !first_fragment)) {
        return Err(malformed(stat::DROP_BAD_UDP_LENGTH));
    }
    Ok(Parsed { family, proto, src, dst, sport, dport, tcp_flags, l4: l4 as u16, ..Parsed::default() })
}

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED_CODE: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
/// Type, code, checksum and four bytes (unused, or the next-hop MTU) before the quote.
pub const ICMP_HDR_LEN: usize = 8;

/// The counter of an ICMP error kind that quotes the packet that caused it; `None` for
/// every other message (echo, redirects, neighbour discovery...).
#[inline(always)]
fn icmp_error_counter(family: u8, kind: u8, code: u8) -> Option<u8> {
    let counter = match (family, kind) {
        (FAMILY_V4, ICMP_DEST_UNREACH) if code == ICMP_FRAG_NEEDED_CODE => stat::ICMP_FRAG_NEEDED,
        (FAMILY_V4, ICMP_DEST_UNREACH) => stat::ICMP_DEST_UNREACH,
        (FAMILY_V4, ICMP_TIME_EXCEEDED) => stat::ICMP_TIME_EXCEEDED,
        (FAMILY_V4, ICMP_PARAMETER_PROBLEM) => stat::ICMP_PARAM_PROBLEM,
        (FAMILY_V6, ICMPV6_PACKET_TOO_BIG) => stat::ICMP6_PACKET_TOO_BIG,
        (FAMILY_V6, ICMPV6_DEST_UNREACH) => stat::ICMP6_DEST_UNREACH,
        (FAMILY_V6, ICMPV6_TIME_EXCEEDED) => stat::ICMP6_TIME_EXCEEDED,
        (FAMILY_V6, ICMPV6_PARAMETER_PROBLEM) => stat::ICMP6_PARAM_PROBLEM,
        _ => return None,
    };
    Some(counter as u8)
}

/// An ICMP error about a packet that `outer_dst` sent: under direct routing a real server
/// answers from the VIP, so a router's "fragmentation needed" about a reply comes to the
/// VIP, that is to the director, and must go on to the server or path MTU discovery
/// breaks. The quote is read as far as the ports (RFC 792 guarantees 8 bytes after the
/// IP header); an IPv6 quote must carry its transport header right after the fixed one.
/// Anything else, including a quote of some other host's packet, is the kernel's.
#[inline(always)]
fn parse_icmp_error(
    start: usize,
    end: usize,
    l4: usize,
    ip_end: usize,
    family: u8,
    outer_dst: [u32; 4],
) -> Result<Parsed, ParseError> {
    let [kind, code] = read_2u8(start, end, l4).ok_or(ParseError::NotOurs)?;
    let icmp_error = icmp_error_counter(family, kind, code).ok_or(ParseError::NotOurs)?;
    let quote = l4 + ICMP_HDR_LEN;
    let (proto, src, dst, quote_l4) = if family == FAMILY_V4 {
        let [vhl, _] = read_2u8(start, end, quote).ok_or(ParseError::NotOurs)?;
        let ihl = (vhl & 0x0f) as usize * 4;
        let frag = read_be16(start, end, quote + 6).ok_or(ParseError::NotOurs)?;
        // A later fragment carries no ports.
        if vhl >> 4 != 4 || ihl < 20 || frag & 0x1fff != 0 {
            return Err(ParseError::NotOurs);
        }
        let [_, proto] = read_2u8(start, end, quote + 8).ok_or(ParseError::NotOurs)?;
        let src = read_raw32(start, end, quote + 12).ok_or(ParseError::NotOurs)?;
        let dst = read_raw32(start, end, quote + 16).ok_or(ParseError::NotOurs)?;
        (proto, [src, 0, 0, 0], [dst, 0, 0, 0], quote + ihl)
    } else {
        let [vtc, _] = read_2u8(start, end, quote).ok_or(ParseError::NotOurs)?;
        let [next, _] = read_2u8(start, end, quote + 6).ok_or(ParseError::NotOurs)?;
        if vtc >> 4 != 6 {
            return Err(ParseError::NotOurs);
        }
        let src = read_addr6(start, end, quote + 8).ok_or(ParseError::NotOurs)?;
        let dst = read_addr6(start, end, quote + 24).ok_or(ParseError::NotOurs)?;
        (next, src, dst, quote + IPV6_HDR_LEN)
    };
    let sport = read_raw16(start, end, quote_l4).ok_or(ParseError::NotOurs)?;
    let dport = read_raw16(start, end, quote_l4 + 2).ok_or(ParseError::NotOurs)?;
    let from_destination =
        src[0] == outer_dst[0] && src[1] == outer_dst[1] && src[2] == outer_dst[2] && src[3] == outer_dst[3];
    if (proto != PROTO_TCP && proto != PROTO_UDP) || !from_destination || quote_l4 + 4 > ip_end {
        return Err(ParseError::NotOurs);
    }
    Ok(Parsed {
        family,
        proto,
        src: dst,
        dst: src,
        sport: dport,
        dport: sport,
        icmp_error,
        l4: l4 as u16,
        ..Parsed::default()
    })
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
    fn a_packet_the_caller_disowns_stops_at_its_addresses_even_when_malformed() {
        let start_of = |f: &[u8]| (f.as_ptr() as usize, f.as_ptr() as usize + f.len());
        let seen = core::cell::Cell::new(None);
        let disown_192_0_2_9 = |proto, src, dst| {
            seen.set(Some((proto, src, dst)));
            dst == u32::from_ne_bytes([192, 0, 2, 9])
        };
        let vlan = Ipv4Opts { vlan: Some(7), ..Default::default() };
        let f = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 9], L4::udp(53, 5353), vlan.clone());
        let (start, end) = start_of(&f);
        assert_eq!(parse_unless(start, end, disown_192_0_2_9), Err(ParseError::NotOurs));
        let fields = (PROTO_UDP, u32::from_ne_bytes([10, 0, 0, 1]), u32::from_ne_bytes([192, 0, 2, 9]));
        assert_eq!(seen.get(), Some(fields));
        // A header the full parse would call malformed: disowned all the same.
        let bad_ihl = Ipv4Opts { ihl: Some(4), ..Default::default() };
        let f = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 9], L4::tcp(1, 80, TCP_SYN), bad_ihl.clone());
        let (start, end) = start_of(&f);
        assert_eq!(parse_unless(start, end, disown_192_0_2_9), Err(ParseError::NotOurs));
        // Another destination is parsed in full, malformed or not.
        let f = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::tcp(1, 80, TCP_SYN), bad_ihl);
        let (start, end) = start_of(&f);
        let malformed =
            ParseError::Malformed { reason: stat::DROP_BAD_IHL, family: FAMILY_V4, dst: v4([192, 0, 2, 1]) };
        assert_eq!(parse_unless(start, end, disown_192_0_2_9), Err(malformed));
        let f = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::udp(53, 5353), vlan);
        let (start, end) = start_of(&f);
        assert_eq!(parse_unless(start, end, disown_192_0_2_9).map(|p| u16::from_be(p.dport)), Ok(5353));
    }

    #[test]
    fn malformed_ipv4_reports_reason_and_destination() {
        let dst = v4([192, 0, 2, 1]);
        let cases: [(Ipv4Opts, u32); 2] = [
            (Ipv4Opts { ihl: Some(4), ..Default::default() }, stat::DROP_BAD_IHL),
            (Ipv4Opts { total_len_extra: 40, ..Default::default() }, stat::DROP_BAD_LENGTH),
        ];
        for (opts, reason) in cases {
            let f = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::tcp(1, 80, TCP_SYN), opts.clone());
            assert_eq!(run(&f), Err(ParseError::Malformed { reason, family: FAMILY_V4, dst }), "{opts:?}");
        }
    }

    #[test]
    fn fragments_are_first_with_ports_or_later_without() {
        let udp = L4::Udp { sport: 5000, dport: 53, payload: 100 };
        let whole4 = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], udp.clone(), Ipv4Opts::default());
        let parts = testpkt::fragments_v4(&whole4, 48, 0x4242);
        assert_eq!(parts.len(), 3);
        let first = run(&parts[0]).unwrap();
        // The first fragment's UDP length covers the whole datagram: not refused.
        assert_eq!((first.frag, first.frag_id, u16::from_be(first.dport)), (FRAG_FIRST, 0x4242, 53));
        for later in &parts[1..] {
            let p = run(later).unwrap();
            assert_eq!((p.frag, p.frag_id, p.sport, p.dport, p.proto), (FRAG_LATER, 0x4242, 0, 0, 17));
            assert_eq!((p.l3, p.ihl), (14, 20));
        }
        let src6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        let whole6 = testpkt::ipv6(src6, dst6, udp, Ipv6Opts::default());
        let parts = testpkt::fragments_v6(&whole6, 48, 0x0102_0304);
        let first = run(&parts[0]).unwrap();
        assert_eq!((first.frag, first.frag_id, u16::from_be(first.dport)), (FRAG_FIRST, 0x0102_0304, 53));
        let p = run(&parts[2]).unwrap();
        assert_eq!((p.frag, p.frag_id, p.dport, p.family), (FRAG_LATER, 0x0102_0304, 0, FAMILY_V6));
        // A first fragment too short for its transport header is malformed; fragments of
        // other protocols are the kernel's.
        let tcp = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::tcp(1, 80, TCP_ACK), Ipv4Opts::default());
        let cut = testpkt::fragments_v4(&tcp, 8, 1);
        assert!(matches!(run(&cut[0]), Err(ParseError::Malformed { reason: stat::DROP_TRUNCATED, .. })));
        let icmp = L4::Icmp { v6: false, kind: 8, code: 0, rest: [0; 4], body: vec![0; 64] };
        let ping = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], icmp, Ipv4Opts::default());
        assert_eq!(run(&testpkt::fragments_v4(&ping, 32, 1)[1]), Err(ParseError::NotOurs));
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
        // The same packet, its transport header two 8-byte extension headers later.
        assert_eq!(p.l4 as usize, 14 + 40);
        assert_eq!(p2, Parsed { l4: p.l4 + 16, ..p });
        // An atomic fragment (offset 0, no M: RFC 6946) is a whole packet.
        let mut atomic = testpkt::ipv6(src, dst, L4::tcp(1000, 80, TCP_SYN), Ipv6Opts::default());
        let l4 = atomic.split_off(54);
        atomic[20] = NEXTHDR_FRAGMENT;
        atomic[18..20].copy_from_slice(&((8 + l4.len()) as u16).to_be_bytes());
        atomic.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 9]);
        atomic.extend_from_slice(&l4);
        assert_eq!(run(&atomic).unwrap(), Parsed { l4: p.l4 + 8, ..p });
        let long = Ipv6Opts { ext: vec![NEXTHDR_DEST; 5], ..Default::default() };
        assert!(matches!(
            run(&testpkt::ipv6(src, dst, L4::tcp(1000, 80, TCP_SYN), long)),
            Err(ParseError::Malformed { reason: stat::DROP_IPV6_EXT_CHAIN, .. })
        ));
    }

    fn header_check(frame: &[u8]) -> Result<(), u32> {
        let start = frame.as_ptr() as usize;
        let p = parse(start, start + frame.len()).expect("parses");
        check_ipv4_header(start, start + frame.len(), &p)
    }

    fn syn4(opts: Ipv4Opts) -> Vec<u8> {
        testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::tcp(1, 80, TCP_SYN), opts)
    }

    #[test]
    fn wrong_ip_version_has_its_own_reason() {
        let mut f = syn4(Ipv4Opts::default());
        f[14] = 0x65;
        assert!(matches!(run(&f), Err(ParseError::Malformed { reason: stat::DROP_BAD_VERSION, .. })));
        let mut f6 = testpkt::ipv6([0x20; 16], [0x20; 16], L4::tcp(1, 80, TCP_SYN), Ipv6Opts::default());
        f6[14] = 0x40;
        assert!(matches!(run(&f6), Err(ParseError::Malformed { reason: stat::DROP_BAD_VERSION, .. })));
    }

    #[test]
    fn ipv4_header_checksum_is_verified() {
        let good = syn4(Ipv4Opts { options: 8, ..Default::default() });
        assert_eq!(header_check(&good), Ok(()));
        for at in [14 + 1, 14 + 8, 14 + 10, 14 + 12, 14 + 22] {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            assert_eq!(header_check(&bad), Err(stat::DROP_BAD_IP_CHECKSUM), "byte {at}");
        }
        // The checksum does not cover the transport header.
        let mut tcp_changed = good.clone();
        tcp_changed[14 + 28 + 5] ^= 0xff;
        assert_eq!(header_check(&tcp_changed), Ok(()));
        // A header without options takes the fast path: the same verdicts.
        let plain = syn4(Ipv4Opts::default());
        assert_eq!(header_check(&plain), Ok(()));
        for at in [14 + 1, 14 + 5, 14 + 8, 14 + 11, 14 + 15] {
            let mut bad = plain.clone();
            bad[at] ^= 0x10;
            assert_eq!(header_check(&bad), Err(stat::DROP_BAD_IP_CHECKSUM), "byte {at}");
        }
    }

    #[test]
    fn ipv4_options_must_parse() {
        let with = |bytes: &[u8]| {
            let mut f = syn4(Ipv4Opts { options: 8, ..Default::default() });
            f[34..34 + bytes.len()].copy_from_slice(bytes);
            testpkt::fix_ipv4_checksum(&mut f, 14);
            header_check(&f)
        };
        // NOPs; a record-route option of 7 bytes then END; END then garbage (ignored).
        assert_eq!(with(&[1; 8]), Ok(()));
        assert_eq!(with(&[7, 7, 4, 0, 0, 0, 0, 0]), Ok(()));
        assert_eq!(with(&[0, 0xff, 0xff, 0xff]), Ok(()));
        // Length 0 or 1, an option running past the header, a lone type byte at the end.
        assert_eq!(with(&[7, 0, 1, 1]), Err(stat::DROP_BAD_IP_OPTIONS));
        assert_eq!(with(&[7, 1, 1, 1]), Err(stat::DROP_BAD_IP_OPTIONS));
        assert_eq!(with(&[1, 1, 1, 7, 9, 0, 0, 0]), Err(stat::DROP_BAD_IP_OPTIONS));
        assert_eq!(with(&[1, 1, 1, 1, 1, 1, 1, 7]), Err(stat::DROP_BAD_IP_OPTIONS));
    }

    #[test]
    fn udp_length_must_fit_the_ip_payload() {
        let udp = |len: u16| {
            let mut f = testpkt::ipv4([10, 0, 0, 1], [192, 0, 2, 1], L4::udp(53, 53), Ipv4Opts::default());
            f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&len.to_be_bytes());
            run(&f)
        };
        assert!(udp(12).is_ok());
        // Shorter than the payload: the kernel trims, so do we accept it.
        assert!(udp(8).is_ok());
        for bad in [0, 7, 13, 0xffff] {
            assert!(
                matches!(udp(bad), Err(ParseError::Malformed { reason: stat::DROP_BAD_UDP_LENGTH, .. })),
                "udp length {bad}"
            );
        }
    }

    #[test]
    fn routing_header_type_0_with_segments_left_is_refused() {
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let rh = |kind: u8, left: u8| {
            let opts = Ipv6Opts { ext: vec![NEXTHDR_ROUTING], ..Default::default() };
            let mut f = testpkt::ipv6(src, src, L4::tcp(1, 80, TCP_SYN), opts);
            f[14 + 40 + 2] = kind;
            f[14 + 40 + 3] = left;
            run(&f)
        };
        assert!(matches!(rh(0, 1), Err(ParseError::Malformed { reason: stat::DROP_IPV6_RH0, .. })));
        assert!(rh(0, 0).is_ok(), "type 0 with nothing left to visit is harmless");
        assert!(rh(2, 1).is_ok(), "type 2 (mobility) is not type 0");
    }

    #[test]
    fn martian_sources() {
        let v4 = |a: [u8; 4]| is_martian_source(FAMILY_V4, &[u32::from_ne_bytes(a), 0, 0, 0]);
        for m in [[0, 1, 2, 3], [127, 0, 0, 1], [224, 0, 0, 5], [239, 255, 0, 1], [255, 255, 255, 255]] {
            assert!(v4(m), "{m:?}");
        }
        for ok in [[10, 0, 0, 1], [192, 0, 2, 1], [223, 255, 255, 255], [240, 0, 0, 1], [1, 0, 0, 0]] {
            assert!(!v4(ok), "{ok:?}");
        }
        let v6 = |a: [u8; 16]| {
            let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
            is_martian_source(FAMILY_V6, &[w(0), w(4), w(8), w(12)])
        };
        let mut lo = [0u8; 16];
        lo[15] = 1;
        let mut mc = [0u8; 16];
        mc[0] = 0xff;
        mc[1] = 0x02;
        assert!(v6([0; 16]) && v6(lo) && v6(mc));
        let mut doc = [0u8; 16];
        doc[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        doc[15] = 1;
        let mut mapped_one = [0u8; 16];
        mapped_one[15] = 2;
        assert!(!v6(doc) && !v6(mapped_one));
    }

    /// The packet a real server sends back from the VIP, as a router would quote it.
    fn reply4(proto_l4: L4) -> Vec<u8> {
        testpkt::ipv4([192, 0, 2, 1], [10, 0, 0, 1], proto_l4, Ipv4Opts::default())[14..].to_vec()
    }

    #[test]
    fn icmp_errors_quoting_a_reply_describe_the_clients_flow() {
        let reply = reply4(L4::Tcp { sport: 80, dport: 40000, flags: TCP_ACK, payload: 1400 });
        let router = [10, 9, 9, 9];
        let frag_needed = testpkt::icmp4_error(router, [192, 0, 2, 1], 3, 4, 1400, &reply, 28);
        let p = run(&frag_needed).unwrap();
        assert_eq!((p.proto, p.src, p.dst), (PROTO_TCP, v4([10, 0, 0, 1]), v4([192, 0, 2, 1])));
        assert_eq!((u16::from_be(p.sport), u16::from_be(p.dport)), (40000, 80));
        assert_eq!((p.tcp_flags, p.icmp_error as u32), (0, stat::ICMP_FRAG_NEEDED));
        assert_eq!((p.l3, p.ihl), (14, 20), "the outer header is the one the kernel checks");
        let kinds = [
            (3, 1, stat::ICMP_DEST_UNREACH),
            (11, 0, stat::ICMP_TIME_EXCEEDED),
            (12, 0, stat::ICMP_PARAM_PROBLEM),
        ];
        for (kind, code, counter) in kinds {
            let f = testpkt::icmp4_error(router, [192, 0, 2, 1], kind, code, 0, &reply, 576);
            assert_eq!(run(&f).map(|p| p.icmp_error as u32), Ok(counter), "type {kind}");
        }
        let udp = testpkt::icmp4_error(router, [192, 0, 2, 1], 3, 3, 0, &reply4(L4::udp(53, 5353)), 28);
        let p = run(&udp).unwrap();
        assert_eq!((p.proto, u16::from_be(p.sport), u16::from_be(p.dport)), (PROTO_UDP, 5353, 53));
    }

    #[test]
    fn icmp_messages_that_quote_no_flow_of_the_destination_are_not_ours() {
        let reply = reply4(L4::Tcp { sport: 80, dport: 40000, flags: TCP_ACK, payload: 100 });
        let to = |dst: [u8; 4], kind: u8, quote: &[u8], len: usize| {
            run(&testpkt::icmp4_error([10, 9, 9, 9], dst, kind, 0, 0, quote, len))
        };
        // Echo request; a quote of someone else's packet; a quote cut before the ports.
        assert_eq!(to([192, 0, 2, 1], 8, &reply, 28), Err(ParseError::NotOurs));
        assert_eq!(to([192, 0, 2, 2], 3, &reply, 28), Err(ParseError::NotOurs));
        assert_eq!(to([192, 0, 2, 1], 3, &reply, 23), Err(ParseError::NotOurs));
        // A later fragment (no ports), and a quoted protocol other than TCP and UDP.
        let mut fragment = reply.clone();
        fragment[7] = 0x10;
        assert_eq!(to([192, 0, 2, 1], 3, &fragment, 28), Err(ParseError::NotOurs));
        let gre = testpkt::ipv4(
            [192, 0, 2, 1],
            [10, 0, 0, 1],
            L4::Other { proto: 47, len: 8 },
            Ipv4Opts::default(),
        );
        assert_eq!(to([192, 0, 2, 1], 3, &gre[14..], 28), Err(ParseError::NotOurs));
    }

    #[test]
    fn icmpv6_packet_too_big_describes_the_clients_flow() {
        let vip = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        let client = [0x20, 0x01, 0x0d, 0xb8, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let router = [0x20, 0x01, 0x0d, 0xb8, 0, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let reply = testpkt::ipv6(
            vip,
            client,
            L4::Tcp { sport: 443, dport: 50000, flags: TCP_ACK, payload: 1400 },
            Ipv6Opts::default(),
        );
        let ptb = testpkt::icmp6_error(router, vip, 2, 0, 1280, &reply[14..], 1232);
        let p = run(&ptb).unwrap();
        let w = |a: [u8; 16]| [0, 4, 8, 12].map(|i| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]));
        assert_eq!((p.family, p.proto, p.src, p.dst), (FAMILY_V6, PROTO_TCP, w(client), w(vip)));
        assert_eq!((u16::from_be(p.sport), u16::from_be(p.dport)), (50000, 443));
        assert_eq!(p.icmp_error as u32, stat::ICMP6_PACKET_TOO_BIG);
        for (kind, counter) in
            [(1, stat::ICMP6_DEST_UNREACH), (3, stat::ICMP6_TIME_EXCEEDED), (4, stat::ICMP6_PARAM_PROBLEM)]
        {
            let f = testpkt::icmp6_error(router, vip, kind, 0, 0, &reply[14..], 1232);
            assert_eq!(run(&f).map(|p| p.icmp_error as u32), Ok(counter), "type {kind}");
        }
        // Echo request (128) and a quote of another address.
        assert_eq!(
            run(&testpkt::icmp6_error(router, vip, 128, 0, 0, &reply[14..], 64)),
            Err(ParseError::NotOurs)
        );
        assert_eq!(
            run(&testpkt::icmp6_error(router, client, 2, 0, 1280, &reply[14..], 64)),
            Err(ParseError::NotOurs)
        );
    }
}
