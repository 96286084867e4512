//! Direct routing: the IP packet is left as the client sent it (the real server holds the
//! VIP on a loopback and answers the client itself); only the Ethernet addresses change.
//!
//! The backend's MAC and the egress interface come from the daemon, which resolves them
//! from the neighbour table, rather than from `bpf_fib_lookup`: a FIB lookup on the
//! packet's destination finds the VIP (local), not the backend, and a lookup of the
//! backend address returns NO_NEIGH whenever the kernel has let an idle entry expire,
//! which would turn a quiet backend's first packet into a drop.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Backend, stat};
use lb_ebpf::parse::write_mac;

use super::maps::EGRESS;

#[inline(always)]
pub fn direct_route(ctx: &XdpContext, b: &Backend) -> Result<u32, u32> {
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
