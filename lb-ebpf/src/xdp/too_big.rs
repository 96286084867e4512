//! The answer to a packet that does not fit the tunnel to its backend: ICMP
//! "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet too big", from the address the
//! client sent to, carrying the MTU the client may use (the way's minus the outer
//! header), so that its TCP lowers the segment size (path MTU discovery, RFC 1191 / 8201).
//!
//! The frame is turned around in place, as Katran does: room for a new IP and ICMP header
//! is made in front, the original IP header and the start of its payload stay where they
//! land (quoted), the rest is cut off, and the frame goes back out where it came in.
use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{PROTO_ICMP, PROTO_ICMPV6, stat};
use lb_ebpf::parse::{
    ETH_P_IP, ETH_P_IPV6, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED_CODE, ICMP_HDR_LEN, ICMPV6_PACKET_TOO_BIG,
    IPV4_HDR_LEN, IPV6_HDR_LEN, ptr_at,
};

/// How much of the client's packet is quoted: its IP header and the ports and sequence
/// number after it, which is what the client's kernel matches the error to a socket by.
pub const QUOTE_V4: usize = 64;
pub const QUOTE_V6: usize = 128;
/// IPv4 ICMP errors go out with the precedence of network control, as Linux's do.
const TOS_INTERNET_CONTROL: u8 = 0xc0;
const ICMP_TTL: u8 = 64;

/// Answers the client whose packet (its IP header at `l3`) is too big for an `mtu`-byte
/// inner packet. Returns the counter of what happened: `TOO_BIG_SENT_V4`/`_V6` when the
/// frame is now the answer (to go back out with XDP_TX), else a drop reason. An IPv4
/// packet without DF (the client did not ask for the error) and an ICMP error (an error
/// about an error is never sent) are dropped as `DROP_TOO_BIG`.
///
/// A function of its own (a BPF-to-BPF call) returning a plain number: the rare path keeps
/// its stack out of the balancer's, and a subprogram may not return through the stack.
#[inline(never)]
pub fn answer(ctx: &XdpContext, l3: usize, inner_v6: bool, mtu: u16) -> u32 {
    match answer_in_place(ctx, l3, inner_v6, mtu) {
        Ok(counter) | Err(counter) => counter,
    }
}

#[inline(always)]
fn answer_in_place(ctx: &XdpContext, l3: usize, inner_v6: bool, mtu: u16) -> Result<u32, u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let proto_at = if inner_v6 { 6 } else { 9 };
    let proto = lb_ebpf::parse::read_u8(start, end, l3 + proto_at).ok_or(stat::DROP_TRUNCATED)?;
    if inner_v6 {
        if proto == PROTO_ICMPV6 {
            return Err(stat::DROP_TOO_BIG);
        }
        grow(ctx, l3, IPV6_HDR_LEN + ICMP_HDR_LEN, QUOTE_V6)?;
        write_v6(ctx, l3, mtu)?;
        Ok(stat::TOO_BIG_SENT_V6)
    } else {
        let flags = lb_ebpf::parse::read_u8(start, end, l3 + 6).ok_or(stat::DROP_TRUNCATED)?;
        if flags & 0x40 == 0 || proto == PROTO_ICMP {
            return Err(stat::DROP_TOO_BIG);
        }
        grow(ctx, l3, IPV4_HDR_LEN + ICMP_HDR_LEN, QUOTE_V4)?;
        write_v4(ctx, l3, mtu)?;
        Ok(stat::TOO_BIG_SENT_V4)
    }
}

/// Copies `n` bytes one at a time. Volatile keeps LLVM from fusing them into a memcpy
/// call or into wide loads it would spill to the stack.
///
/// # Safety
/// Both ranges must be inside the packet and checked.
#[inline(always)]
unsafe fn copy(from: usize, to: usize, n: usize) {
    for i in 0..n {
        // SAFETY: the caller checked both ranges.
        unsafe { ((to + i) as *mut u8).write_volatile(((from + i) as *const u8).read_volatile()) };
    }
}

/// Makes room for `room` bytes of new headers after the link-layer header (`l3` bytes,
/// which move to the new front with the addresses swapped) and cuts the frame to `quote`
/// bytes of the original IP packet after them.
#[inline(always)]
fn grow(ctx: &XdpContext, l3: usize, room: usize, quote: usize) -> Result<(), u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    // The client's packet is longer than any quote (it did not fit an MTU of at least
    // 68 bytes plus a header); a short one has nothing to answer about.
    if start + l3 + quote > end {
        return Err(stat::DROP_TOO_BIG);
    }
    let cut = (end - start - l3 - quote) as i32;
    // SAFETY: helper calls on this program's own context.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -cut) } != 0
        || unsafe { bpf_xdp_adjust_head(ctx.ctx, -(room as i32)) } != 0
    {
        return Err(stat::DROP_NO_HEADROOM);
    }
    // The old link-layer header is now `room` bytes in: its addresses come back swapped,
    // a VLAN tag as it was (the EtherType is written with the new IP header).
    let (start, end) = (ctx.data(), ctx.data_end());
    let at =
        ptr_at::<[u8; IPV6_HDR_LEN + ICMP_HDR_LEN + 18]>(start, end, 0).ok_or(stat::DROP_TRUNCATED)? as usize;
    // SAFETY: room + 18 bytes were bounds-checked above (room is 28 or 48); room > 18, so
    // the old header and the new one do not overlap.
    unsafe {
        copy(at + room + 6, at, 6);
        copy(at + room, at + 6, 6);
        copy(at + room + 12, at + 12, 4);
    }
    Ok(())
}

/// One's-complement sum (unfolded) of the `N` bytes at `at`, in memory order as the
/// checksum field is written (byte order does not matter to the sum, RFC 1071 §2(B)).
/// The kernel's `bpf_csum_diff` does it, as in Katran: an unrolled loop of loads leaves
/// LLVM spilling them to a stack the balancer has no room left on.
#[inline(always)]
fn sum<const N: usize>(start: usize, end: usize, at: usize) -> Result<u64, u32> {
    let p = ptr_at::<[u8; N]>(start, end, at).ok_or(stat::DROP_TRUNCATED)? as *mut u32;
    // SAFETY: N bytes at p were bounds-checked above; N is a multiple of 4 (the helper's
    // rule) for every caller, and nothing is written.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p, N as u32, 0) };
    if sum < 0 {
        return Err(stat::DROP_TRUNCATED);
    }
    Ok(sum as u64)
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The new IPv4 and ICMP headers in front of the quoted packet at `l3 + 28`.
#[inline(always)]
fn write_v4(ctx: &XdpContext, l3: usize, mtu: u16) -> Result<(), u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    const ALL: usize = 2 + IPV4_HDR_LEN + ICMP_HDR_LEN + IPV4_HDR_LEN;
    let at = ptr_at::<[u8; ALL]>(start, end, l3 - 2).ok_or(stat::DROP_TRUNCATED)? as usize + 2;
    let quoted = at + IPV4_HDR_LEN + ICMP_HDR_LEN;
    let total = (IPV4_HDR_LEN + ICMP_HDR_LEN + QUOTE_V4) as u32;
    let first = [
        (0x45u32 << 24 | (TOS_INTERNET_CONTROL as u32) << 16 | total).to_be(),
        0,
        ((ICMP_TTL as u32) << 24 | (PROTO_ICMP as u32) << 16).to_be(),
    ];
    let icmp = [
        ((ICMP_DEST_UNREACH as u32) << 24 | (ICMP_FRAG_NEEDED_CODE as u32) << 16).to_be(),
        (mtu as u32).to_be(),
    ];
    // SAFETY: the EtherType, both IP headers and the ICMP header were bounds-checked above.
    unsafe {
        ((at - 2) as *mut u16).write_unaligned(ETH_P_IP.to_be());
        (at as *mut [u32; 3]).write_unaligned(first);
        // From the address the client sent to, back to the client.
        copy(quoted + 16, at + 12, 4);
        copy(quoted + 12, at + 16, 4);
        ((at + IPV4_HDR_LEN) as *mut [u32; 2]).write_unaligned(icmp);
    }
    let ip_check = !fold(sum::<IPV4_HDR_LEN>(start, end, l3)?);
    // SAFETY: inside the IP header checked above.
    unsafe { ((at + 10) as *mut u16).write_unaligned(ip_check) };
    let check = !fold(sum::<{ ICMP_HDR_LEN + QUOTE_V4 }>(start, end, l3 + IPV4_HDR_LEN)?);
    // SAFETY: inside the ICMP header checked above.
    unsafe { ((at + IPV4_HDR_LEN + 2) as *mut u16).write_unaligned(check) };
    Ok(())
}

/// The new IPv6 and ICMPv6 headers in front of the quoted packet at `l3 + 48`.
#[inline(always)]
fn write_v6(ctx: &XdpContext, l3: usize, mtu: u16) -> Result<(), u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    const ALL: usize = 2 + IPV6_HDR_LEN + ICMP_HDR_LEN + IPV6_HDR_LEN;
    let at = ptr_at::<[u8; ALL]>(start, end, l3 - 2).ok_or(stat::DROP_TRUNCATED)? as usize + 2;
    let quoted = at + IPV6_HDR_LEN + ICMP_HDR_LEN;
    let payload = (ICMP_HDR_LEN + QUOTE_V6) as u32;
    let first =
        [(6u32 << 28).to_be(), (payload << 16 | (PROTO_ICMPV6 as u32) << 8 | ICMP_TTL as u32).to_be()];
    let icmp = [((ICMPV6_PACKET_TOO_BIG as u32) << 24).to_be(), (mtu as u32).to_be()];
    // SAFETY: the EtherType, both IPv6 headers and the ICMPv6 header were bounds-checked.
    unsafe {
        ((at - 2) as *mut u16).write_unaligned(ETH_P_IPV6.to_be());
        (at as *mut [u32; 2]).write_unaligned(first);
        copy(quoted + 24, at + 8, 16);
        copy(quoted + 8, at + 24, 16);
        ((at + IPV6_HDR_LEN) as *mut [u32; 2]).write_unaligned(icmp);
    }
    // The pseudo-header: both addresses (the header's last 32 bytes), the length, 58.
    let pseudo = sum::<32>(start, end, l3 + 8)?
        + ((payload as u16).to_be() as u64)
        + ((PROTO_ICMPV6 as u16).to_be() as u64);
    let check = !fold(pseudo + sum::<{ ICMP_HDR_LEN + QUOTE_V6 }>(start, end, l3 + IPV6_HDR_LEN)?);
    // SAFETY: inside the ICMPv6 header checked above.
    unsafe { ((at + IPV6_HDR_LEN + 2) as *mut u16).write_unaligned(check) };
    Ok(())
}
