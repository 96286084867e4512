//! Entry points.
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_redirect, bpf_xdp_adjust_head},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{SERVICE_F_ROUND_ROBIN, stat};
use lb_ebpf::{
    csum,
    parse::{self, ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ParseError, Parsed, VLAN_HLEN},
};

use super::{
    classify,
    conntrack::{self, Decision},
    forward,
    maps::{BENCH_CFG, BENCH_STATE, BENCH_TARGET, TRUNK_PORTS},
    stats,
};

#[xdp]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    let action = balance(&ctx);
    let index = match action {
        xdp_action::XDP_DROP => stat::ACTION_DROP,
        xdp_action::XDP_PASS => stat::ACTION_PASS,
        xdp_action::XDP_TX => stat::ACTION_TX,
        xdp_action::XDP_REDIRECT => stat::ACTION_REDIRECT,
        _ => stat::ACTION_ABORTED,
    };
    stats::global(index);
    action
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let p = match parse::parse(start, end) {
        Ok(p) => p,
        Err(ParseError::NotOurs) => return xdp_action::XDP_PASS,
        // A malformed frame's ports cannot be trusted: it is ours if its destination
        // address is a service's (a VIP, or inside a mark rule's prefix), whatever the port.
        Err(ParseError::Malformed { reason, family, dst }) => {
            return drop_if_ours(
                classify::is_service_address(family, &dst) && classify::addressed_to_us(ctx),
                reason,
            );
        }
    };
    if p.icmp_error != 0 {
        return icmp_error(ctx, &p);
    }
    let maybe_vip = classify::maybe_vip(&p);
    // Not a VIP: a mark rule's service, or nothing, and then the packet is the kernel's
    // before any connection-table work.
    let mark_service = if maybe_vip {
        None
    } else {
        match classify::lookup_service(&p, false) {
            Some(svc) => Some(svc),
            None => return xdp_action::XDP_PASS,
        }
    };
    if !classify::addressed_to_us(ctx) {
        return xdp_action::XDP_PASS;
    }
    // What the kernel would refuse is refused here too, for a service's packets only.
    if let Err(reason) = parse::check_ipv4_header(start, end, &p) {
        return drop_if_ours(mark_service.is_some() || classify::lookup_service(&p, true).is_some(), reason);
    }
    let key = conntrack::flow_key(&p);
    // An established flow goes on without its service being looked up. Its source was
    // checked when its entry was made (the source is part of the key).
    let d = match conntrack::established(&p, &key) {
        Some(d) => d,
        None => {
            let svc = match mark_service.or_else(|| classify::lookup_service(&p, true)) {
                Some(svc) => svc,
                None => return xdp_action::XDP_PASS,
            };
            if parse::is_martian_source(p.family, &p.src) || classify::is_vip(p.family, &p.src) {
                return drop_if_ours(true, stat::DROP_MARTIAN_SOURCE);
            }
            match conntrack::schedule(&p, &key, &svc) {
                Ok(d) => d,
                Err(reason) => {
                    stats::global(reason);
                    return if reason == stat::PASS_NO_BACKEND {
                        xdp_action::XDP_PASS
                    } else {
                        xdp_action::XDP_DROP
                    };
                }
            }
        }
    };
    forward(ctx, &d)
}

/// Sends the frame to the decision's backend and counts it there.
#[inline(always)]
fn forward(ctx: &XdpContext, d: &conntrack::Decision) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    match forward::direct_route(ctx, &d.backend) {
        Ok(action) => {
            stats::forwarded(d.service_id, d.backend_id, len, d.new_flow);
            action
        }
        Err(reason) => {
            stats::global(reason);
            xdp_action::XDP_DROP
        }
    }
}

/// An ICMP error about a service's flow (`p` is that flow, as the client sends it) goes
/// to the flow's backend: the recorded one, else the one the ring gives, as for a
/// mid-stream packet. Nothing is recorded: an error says nothing about the connection.
/// A round-robin ring says nothing about where an unrecorded flow went, and an error the
/// director cannot place is the kernel's, as before.
#[inline(always)]
fn icmp_error(ctx: &XdpContext, p: &Parsed) -> u32 {
    let Some(svc) = classify::lookup_service(p, classify::maybe_vip(p)) else {
        return xdp_action::XDP_PASS;
    };
    if !classify::addressed_to_us(ctx) || parse::check_ipv4_header(ctx.data(), ctx.data_end(), p).is_err() {
        return xdp_action::XDP_PASS;
    }
    let d = match conntrack::lookup(&conntrack::flow_key(p)) {
        Some(d) => d,
        None if svc.flags & SERVICE_F_ROUND_ROBIN != 0 => return xdp_action::XDP_PASS,
        None => match conntrack::pick(p, &svc) {
            Ok(d) => Decision { new_flow: false, ..d },
            Err(_) => return xdp_action::XDP_PASS,
        },
    };
    let action = forward(ctx, &d);
    if action != xdp_action::XDP_DROP {
        stats::global(p.icmp_error as u32);
    }
    action
}

/// Drops and counts under `reason` a frame that is ours; passes anything else untouched.
#[inline(always)]
fn drop_if_ours(ours: bool, reason: u32) -> u32 {
    if ours {
        stats::global(reason);
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The benchmark floor: what any XDP forwarder must do at least.
#[xdp]
pub fn lb_floor(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if parse::parse(start, end).is_err() || start + 12 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: 12 bytes bounds-checked above.
    unsafe {
        let (dst, src) = (parse::read_mac(start), parse::read_mac(start + 6));
        parse::write_mac(start, &src);
        parse::write_mac(start + 6, &dst);
    }
    xdp_action::XDP_TX
}

/// Fixed offsets of the benchmark frame: Ethernet, a 20-byte IPv4 header, TCP.
const BENCH_IP_SRC_LOW: usize = 14 + 14;
const BENCH_IP_CHECK: usize = 14 + 10;
const BENCH_TCP_SPORT: usize = 14 + 20;
const BENCH_TCP_CHECK: usize = 14 + 20 + 16;

/// Turns the one packet that BPF_PROG_TEST_RUN repeats into a stream of flows, then runs
/// the target program. Checksums are patched (RFC 1624), so the frames stay valid.
#[xdp]
pub fn lb_bench_driver(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let flows = BENCH_CFG.get(0).map_or(0, |c| c.flows);
    if flows != 0 && start + BENCH_TCP_CHECK + 2 <= end {
        if let Some(state) = BENCH_STATE.get_ptr_mut(0) {
            // SAFETY: per-CPU slot; the frame offsets were bounds-checked above.
            unsafe {
                let i = (*state % flows as u64) as u32;
                *state += 1;
                let sport = (start + BENCH_TCP_SPORT) as *mut u16;
                let src_low = (start + BENCH_IP_SRC_LOW) as *mut u16;
                let ip_check = (start + BENCH_IP_CHECK) as *mut u16;
                let tcp_check = (start + BENCH_TCP_CHECK) as *mut u16;
                let (old_port, new_port) = (sport.read_unaligned(), (i as u16).to_be());
                let (old_src, new_src) = (src_low.read_unaligned(), ((i >> 16) as u16).to_be());
                sport.write_unaligned(new_port);
                src_low.write_unaligned(new_src);
                ip_check.write_unaligned(csum::update16(ip_check.read_unaligned(), old_src, new_src));
                let c = csum::update16(tcp_check.read_unaligned(), old_src, new_src);
                tcp_check.write_unaligned(csum::update16(c, old_port, new_port));
            }
        }
    }
    // SAFETY: on success the tail call does not return.
    let _ = unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// The test switch: a trunk port tags IPv4 frames on their way to the director, the other
/// port strips tags on the way back. It stands in for VLAN devices on test kernels built
/// without them (no 8021q), so that the director receives tagged frames as from a trunk.
#[xdp]
pub fn lb_test_trunk(ctx: XdpContext) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the value is copied out at once.
    let Some(port) = (unsafe { TRUNK_PORTS.get(&ifindex) }).copied() else {
        return xdp_action::XDP_PASS;
    };
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + VLAN_HLEN > end {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: the Ethernet header and a tag's worth were bounds-checked above.
    let (dst, src, ethertype) = unsafe {
        (
            parse::read_mac(start),
            parse::read_mac(start + 6),
            u16::from_be((start as *const u8).add(12).cast::<u16>().read_unaligned()),
        )
    };
    let tagged = ethertype == ETH_P_8021Q;
    let delta: i32 = if port.push_vlan != 0 && ethertype == ETH_P_IP {
        -(VLAN_HLEN as i32)
    } else if port.push_vlan == 0 && tagged {
        VLAN_HLEN as i32
    } else {
        0
    };
    if delta != 0 {
        // SAFETY: a helper call on this program's own context.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
            return xdp_action::XDP_DROP;
        }
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + ETH_HLEN + VLAN_HLEN > end {
            return xdp_action::XDP_DROP;
        }
        // SAFETY: bounds-checked just above.
        unsafe {
            parse::write_mac(start, &dst);
            parse::write_mac(start + 6, &src);
            if delta < 0 {
                let tag = (start + 12) as *mut [u16; 2];
                tag.write_unaligned([ETH_P_8021Q.to_be(), (port.push_vlan & 0x0fff).to_be()]);
            }
        }
    }
    // SAFETY: a helper call with plain integers.
    unsafe { bpf_redirect(port.out_ifindex, 0) as u32 }
}
