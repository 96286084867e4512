//! Direct routing: the IP packet is left as the client sent it (the real server holds the
//! VIP on a loopback and answers the client itself); only the Ethernet addresses change.
//!
//! The backend's MAC and the egress interface come from the daemon, which resolves them
//! from the neighbour table, rather than from `bpf_fib_lookup`: a FIB lookup on the
//! packet's destination finds the VIP (local), not the backend, and a lookup of the
//! backend address returns NO_NEIGH whenever the kernel has let an idle entry expire,
//! which would turn a quiet backend's first packet into a drop.
use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Backend, stat};
use lb_ebpf::parse::{ETH_P_8021AD, ETH_P_8021Q, VLAN_HLEN, ptr_at, write_mac};

use super::maps::EGRESS;

#[inline(always)]
pub fn direct_route(ctx: &XdpContext, b: &Backend) -> Result<u32, u32> {
    retag(ctx, b.vlan)?;
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

/// Gives the frame the egress's 802.1Q tag: `vlan`, or none when it is zero. A tag that
/// came in is the ingress VLAN's business only: a real server on an untagged port drops a
/// tagged frame. The MACs are rewritten after this, so pushing or popping a tag only moves
/// the frame's start by four bytes and writes the tag; a rewritten tag keeps its priority.
#[inline(always)]
fn retag(ctx: &XdpContext, vlan: u16) -> Result<(), u32> {
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
