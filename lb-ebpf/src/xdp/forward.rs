//! Direct routing: the IP packet is left as the client sent it (the real server holds the
//! VIP on a loopback and answers the client itself); only the Ethernet addresses change.
//!
//! The backend's MAC and the egress interface come from the daemon, which resolves them
//! from the neighbour table, rather than from `bpf_fib_lookup`: a FIB lookup on the
//! packet's destination finds the VIP (local), not the backend, and a lookup of the
//! backend address returns NO_NEIGH whenever the kernel has let an idle entry expire,
//! which would turn a quiet backend's first packet into a drop.
use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Backend, FAMILY_V6, stat};
use lb_ebpf::parse::{
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HDR_LEN,
    IPV6_HDR_LEN, VLAN_HLEN, ipv4_header_sum, ptr_at, write_mac,
};

use super::{
    maps::{CONFIG, EGRESS},
    stats, too_big,
};

/// What became of a packet that was not dropped.
pub enum Sent {
    /// On its way to the backend, with this XDP action.
    Forwarded(u32),
    /// Turned into an answer to the client (too big for the tunnel), counted under `counter`.
    Answered { action: u32, counter: u32 },
}

/// Counts what became of a frame and returns its action: a forwarded one under its
/// backend (`new_flow` for a flow's first packet), an answer under its own
/// counter, a drop under its reason; and, unless it was dropped, under `counter` too
/// when that is not zero (a fragment's outcome, an ICMP error's kind).
#[inline(always)]
pub fn account(sent: Result<Sent, u32>, backend: u32, len: u64, new_flow: bool, counter: u32) -> u32 {
    let action = match sent {
        Ok(Sent::Forwarded(action)) => {
            stats::forwarded(backend, len, new_flow);
            action
        }
        Ok(Sent::Answered { action, counter }) => {
            stats::global(counter);
            action
        }
        Err(reason) => {
            stats::global(reason);
            xdp_action::XDP_DROP
        }
    };
    if counter != 0 && action != xdp_action::XDP_DROP {
        stats::global(counter);
    }
    action
}

#[inline(always)]
pub fn direct_route(ctx: &XdpContext, b: &Backend) -> Result<Sent, u32> {
    retag(ctx, b.vlan)?;
    send(ctx, b).map(Sent::Forwarded)
}

/// New Ethernet addresses, then out of the backend's interface.
#[inline(always)]
fn send(ctx: &XdpContext, b: &Backend) -> Result<u32, u32> {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return Err(stat::DROP_TRUNCATED);
    }
    // SAFETY: the 12 bytes of Ethernet addresses were bounds-checked above.
    unsafe {
        write_mac(start, &b.dst_mac);
        write_mac(start + 6, &b.src_mac);
    }
    if b.ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(xdp_action::XDP_TX);
    }
    EGRESS.redirect(b.ifindex, 0).map_err(|_| stat::DROP_NO_EGRESS)
}

/// Outer TTL / hop limit: a tunnel crosses a few routers at most.
const OUTER_TTL: u8 = 64;

/// IP-in-IP (or IPv6 in IPv6, or across families): the packet as the client sent it goes
/// inside an outer header from the director's tunnel source to the backend's address. The
/// outer header copies the inner DSCP/ECN and always sets DF (IPv4): a fragmented tunnel
/// packet would reach a decapsulating XDP program in pieces it cannot join. A packet the
/// outer header would make longer than the way to the backend allows is answered with
/// "too big" instead (see `too_big`). `flow_hash` picks the outer source within a
/// configured prefix.
#[inline(always)]
pub fn tunnel(ctx: &XdpContext, b: &Backend, flow_hash: u32) -> Result<Sent, u32> {
    let cfg = CONFIG.get(0).ok_or(stat::DROP_BACKEND_INVALID)?;
    let outer_v6 = b.family == FAMILY_V6;
    let (mut src_v4, mut src_v6) = (cfg.tunnel_source_v4, cfg.tunnel_source_v6);
    if (outer_v6 && src_v6 == [0; 4]) || (!outer_v6 && src_v4 == 0) {
        return Err(stat::DROP_BACKEND_INVALID);
    }
    src_v4 |= flow_hash & cfg.tunnel_spread_v4;
    src_v6[3] |= flow_hash & cfg.tunnel_spread_v6;
    let (start, end) = (ctx.data(), ctx.data_end());
    let tpid = ptr_at::<u16>(start, end, 12).ok_or(stat::DROP_TRUNCATED)?;
    // SAFETY: bounds-checked by ptr_at; packet data has no alignment guarantee.
    let tagged = matches!(u16::from_be(unsafe { tpid.read_unaligned() }), ETH_P_8021Q | ETH_P_8021AD);
    let l3 = if tagged { ETH_HLEN + VLAN_HLEN } else { ETH_HLEN };
    let h = ptr_at::<[u8; 8]>(start, end, l3).ok_or(stat::DROP_TRUNCATED)?;
    // SAFETY: bounds checked by ptr_at; byte arrays have no alignment requirement.
    let h = unsafe { h.read_unaligned() };
    let inner_v6 = h[0] >> 4 == 6;
    let (inner_len, tos, proto) = if inner_v6 {
        let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
        (payload + IPV6_HDR_LEN, (h[0] << 4) | (h[1] >> 4), IPPROTO_IPV6)
    } else {
        (u16::from_be_bytes([h[2], h[3]]) as usize, h[1], IPPROTO_IPIP)
    };
    let outer = if outer_v6 { IPV6_HDR_LEN } else { IPV4_HDR_LEN };
    if b.mtu != 0 && inner_len + outer > b.mtu as usize {
        let counter = too_big::answer(ctx, l3, inner_v6, b.mtu.saturating_sub(outer as u16));
        return match counter {
            stat::TOO_BIG_SENT_V4 | stat::TOO_BIG_SENT_V6 => {
                Ok(Sent::Answered { action: xdp_action::XDP_TX, counter })
            }
            reason => Err(reason),
        };
    }
    // The inner packet right after an untagged Ethernet header, then room in front.
    retag(ctx, 0)?;
    let tag = if b.vlan != 0 { VLAN_HLEN } else { 0 };
    // SAFETY: a helper call on this program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((outer + tag) as i32)) } != 0 {
        return Err(stat::DROP_NO_HEADROOM);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let l3 = ETH_HLEN + tag;
    if outer_v6 {
        let at =
            ptr_at::<[u8; ETH_HLEN + VLAN_HLEN + IPV6_HDR_LEN]>(start, end, 0).ok_or(stat::DROP_TRUNCATED)?;
        let at = at as usize;
        let mut w = [0u32; 10];
        w[0] = (6u32 << 28 | (tos as u32) << 20).to_be();
        w[1] = ((inner_len as u32) << 16 | (proto as u32) << 8 | OUTER_TTL as u32).to_be();
        w[2..6].copy_from_slice(&src_v6);
        w[6..10].copy_from_slice(&b.addr);
        // SAFETY: the Ethernet header, a tag and 40 bytes were bounds-checked above.
        unsafe {
            ((at + l3) as *mut [u32; 10]).write_unaligned(w);
            ((at + l3 - 2) as *mut u16).write_unaligned(ETH_P_IPV6.to_be());
        }
    } else {
        let at =
            ptr_at::<[u8; ETH_HLEN + VLAN_HLEN + IPV4_HDR_LEN]>(start, end, 0).ok_or(stat::DROP_TRUNCATED)?;
        let at = at as usize;
        let total = (inner_len + IPV4_HDR_LEN) as u32;
        let mut w = [
            (0x45u32 << 24 | (tos as u32) << 16 | total).to_be(),
            0x4000u32.to_be(),
            ((OUTER_TTL as u32) << 24 | (proto as u32) << 16).to_be(),
            src_v4,
            b.addr[0],
        ];
        let check = !ipv4_header_sum(&w);
        // The checksum's 16 bits sit in the third word's second half, in memory order.
        w[2] |= (check as u32) << 16;
        // SAFETY: the Ethernet header, a tag and 20 bytes were bounds-checked above.
        unsafe {
            ((at + l3) as *mut [u32; 5]).write_unaligned(w);
            ((at + l3 - 2) as *mut u16).write_unaligned(ETH_P_IP.to_be());
        }
    }
    if tag != 0 {
        // SAFETY: within the bounds checked above.
        unsafe {
            ((start + ETH_HLEN - 2) as *mut [u16; 2])
                .write_unaligned([ETH_P_8021Q.to_be(), (b.vlan & 0x0fff).to_be()]);
        }
    }
    send(ctx, b).map(Sent::Forwarded)
}

/// Gives the frame the egress's 802.1Q tag: `vlan`, or none when it is zero. A tag that
/// came in is the ingress VLAN's business only: a real server on an untagged port drops a
/// tagged frame. The MACs are rewritten after this, so pushing or popping a tag only moves
/// the frame's start by four bytes and writes the tag; a rewritten tag keeps its priority.
#[inline(always)]
pub(super) fn retag(ctx: &XdpContext, vlan: u16) -> Result<(), u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let tpid = ptr_at::<u16>(start, end, 12).ok_or(stat::DROP_TRUNCATED)? as *mut u16;
    // SAFETY: bounds-checked by ptr_at; packet data has no alignment guarantee.
    let tagged = matches!(u16::from_be(unsafe { tpid.read_unaligned() }), ETH_P_8021Q | ETH_P_8021AD);
    let delta: i32 = match (tagged, vlan != 0) {
        (false, false) => return Ok(()),
        (true, true) => 0,
        (true, false) => VLAN_HLEN as i32,
        (false, true) => -(VLAN_HLEN as i32),
    };
    if delta != 0 {
        // SAFETY: a helper call on this program's own context.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
            return Err(stat::DROP_NO_HEADROOM);
        }
        if delta > 0 {
            return Ok(());
        }
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let tag = ptr_at::<[u16; 2]>(start, end, 12).ok_or(stat::DROP_TRUNCATED)? as *mut [u16; 2];
    // SAFETY: the four bytes of the tag were bounds-checked by ptr_at.
    unsafe {
        let [_, old_tci] = tag.read_unaligned();
        // A pushed tag has no priority of its own: the four bytes there are the old MACs'.
        let pcp = if delta == 0 { u16::from_be(old_tci) & 0xf000 } else { 0 };
        tag.write_unaligned([ETH_P_8021Q.to_be(), (pcp | (vlan & 0x0fff)).to_be()]);
    }
    Ok(())
}
