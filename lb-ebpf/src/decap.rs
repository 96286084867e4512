//! What the real servers' decapsulator does with a frame: strip an outer IPv4 or IPv6
//! header carrying IPv4 (protocol 4) or IPv6 (protocol 41), or leave the frame alone.
//! The program (`decap_main.rs`) adds the one thing this cannot know: whether the outer
//! destination is the host's.

use lb_common::{FAMILY_V4, FAMILY_V6, decap};

use crate::parse::{
    ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV6_HDR_LEN, ipv4_header_sum, parse_eth, ptr_at,
    read_be16, read_raw32, read_u8,
};

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decap {
    /// Hand it to the stack untouched; the `decap::*` counter that says why.
    Pass(u32),
    /// Remove the `outer` bytes after the link-layer header (`l2` bytes, a VLAN tag
    /// included) and give the frame the EtherType `ethertype`, if `dst` is the host's.
    Strip { l2: usize, outer: usize, ethertype: u16, family: u8, dst: [u32; 4], counter: u32 },
}

/// The inner packet's EtherType and counter, if `proto` carries one whose first byte (at
/// `inner`) says the same IP version.
#[inline(always)]
fn inner(start: usize, end: usize, at: usize, proto: u8, outer_v6: bool) -> Result<(u16, u32), u32> {
    let version = read_u8(start, end, at).ok_or(decap::PASS_MALFORMED)? >> 4;
    match (proto, version, outer_v6) {
        (IPPROTO_IPIP, 4, false) => Ok((ETH_P_IP, decap::IPIP)),
        (IPPROTO_IPIP, 4, true) => Ok((ETH_P_IP, decap::IP4_IN_IP6)),
        (IPPROTO_IPV6, 6, false) => Ok((ETH_P_IPV6, decap::IP6_IN_IP4)),
        (IPPROTO_IPV6, 6, true) => Ok((ETH_P_IPV6, decap::IP6IP6)),
        (IPPROTO_IPIP | IPPROTO_IPV6, _, _) => Err(decap::PASS_MALFORMED),
        _ => Err(decap::PASS_NOT_TUNNEL),
    }
}

/// Decides what happens to the frame in `[start, end)`.
#[inline(always)]
pub fn plan(start: usize, end: usize) -> Decap {
    match plan_inner(start, end) {
        Ok(d) => d,
        Err(counter) => Decap::Pass(counter),
    }
}

#[inline(always)]
fn plan_inner(start: usize, end: usize) -> Result<Decap, u32> {
    let (l2, ethertype) = parse_eth(start, end).ok_or(decap::PASS_NOT_TUNNEL)?;
    match ethertype {
        ETH_P_IP => {
            let proto = read_u8(start, end, l2 + 9).ok_or(decap::PASS_NOT_TUNNEL)?;
            if proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
                return Err(decap::PASS_NOT_TUNNEL);
            }
            let vhl = read_u8(start, end, l2).ok_or(decap::PASS_MALFORMED)?;
            let ihl = (vhl & 0x0f) as usize * 4;
            if vhl >> 4 != 4 || ihl < 20 {
                return Err(decap::PASS_MALFORMED);
            }
            // A director sends no options; a header with some is left to the stack.
            if ihl != 20 {
                return Err(decap::PASS_OUTER_OPTIONS);
            }
            // What the stack checks of the header it would have received (the outer one is
            // gone after this): its checksum.
            let words = ptr_at::<[u32; 5]>(start, end, l2).ok_or(decap::PASS_MALFORMED)?;
            // SAFETY: bounds checked by ptr_at; packet data has no alignment guarantee.
            let words = unsafe { words.read_unaligned() };
            if ipv4_header_sum(&words) != 0xffff {
                return Err(decap::PASS_MALFORMED);
            }
            // The kernel would reassemble an outer fragment; here it is left to it.
            if read_be16(start, end, l2 + 6).ok_or(decap::PASS_MALFORMED)? & 0x3fff != 0 {
                return Err(decap::PASS_FRAGMENT);
            }
            // Every read before the length check: from that check LLVM would infer the
            // reads in bounds and drop the checks the verifier needs.
            let (ethertype, counter) = inner(start, end, l2 + ihl, proto, false)?;
            let dst = [read_raw32(start, end, l2 + 16).ok_or(decap::PASS_MALFORMED)?, 0, 0, 0];
            let tot_len = read_be16(start, end, l2 + 2).ok_or(decap::PASS_MALFORMED)? as usize;
            if tot_len < ihl + 20 || start + l2 + tot_len > end {
                return Err(decap::PASS_MALFORMED);
            }
            Ok(Decap::Strip { l2, outer: 20, ethertype, family: FAMILY_V4, dst, counter })
        }
        ETH_P_IPV6 => {
            // Only a tunnel header right after the fixed one: extension headers before it
            // are the stack's business.
            let next = read_u8(start, end, l2 + 6).ok_or(decap::PASS_NOT_TUNNEL)?;
            if next != IPPROTO_IPIP && next != IPPROTO_IPV6 {
                return Err(decap::PASS_NOT_TUNNEL);
            }
            if read_u8(start, end, l2).ok_or(decap::PASS_MALFORMED)? >> 4 != 6 {
                return Err(decap::PASS_MALFORMED);
            }
            // Reads first, as for IPv4.
            let (ethertype, counter) = inner(start, end, l2 + IPV6_HDR_LEN, next, true)?;
            let mut dst = [0u32; 4];
            for (i, w) in dst.iter_mut().enumerate() {
                *w = read_raw32(start, end, l2 + 24 + 4 * i).ok_or(decap::PASS_MALFORMED)?;
            }
            let payload = read_be16(start, end, l2 + 4).ok_or(decap::PASS_MALFORMED)? as usize;
            if payload < 20 || start + l2 + IPV6_HDR_LEN + payload > end {
                return Err(decap::PASS_MALFORMED);
            }
            Ok(Decap::Strip { l2, outer: IPV6_HDR_LEN, ethertype, family: FAMILY_V6, dst, counter })
        }
        _ => Err(decap::PASS_NOT_TUNNEL),
    }
}
