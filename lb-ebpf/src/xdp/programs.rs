//! Entry points. `#[xdp]` wraps each function in the program's entry, which calls it:
//! without `inline(always)` LLVM kept the balancer's body, too large to inline, apart, and
//! every packet paid a BPF-to-BPF call and its return (through the kernel's return thunk
//! on CPUs with SRSO mitigations): a non-VIP packet 1.2x the benchmark floor with it,
//! 1.0x without.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    FlowKey,
    programs::{NAT_ICMP_SLOT, NAT_REPLY_SLOT},
    stat,
};
use lb_ebpf::parse::{self, FRAG_FIRST, FRAG_LATER, ParseError, Parsed};

use super::{
    classify,
    conntrack::{self, Decision},
    forward, fragments,
    maps::NAT_PROGRAMS,
    nat, stats,
};

#[xdp]
#[inline(always)]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    counted(balance(&ctx))
}

/// Entered by the balancer's tail call (`not_a_service`), never attached.
#[xdp]
#[inline(always)]
pub fn lb_nat_reply(ctx: XdpContext) -> u32 {
    counted(nat::reply(&ctx))
}

/// Entered by the balancer's tail call (`nat::hand_over`), never attached.
#[xdp]
#[inline(always)]
pub fn lb_nat_forward(ctx: XdpContext) -> u32 {
    counted(nat::forward(&ctx))
}

/// Entered by `lb_nat_reply`'s tail call for full-NAT flows, never attached.
#[xdp]
#[inline(always)]
pub fn lb_fullnat_reply(ctx: XdpContext) -> u32 {
    counted(nat::fullnat_reply(&ctx))
}

/// Entered by the balancer's tail call (`icmp_error`), never attached.
#[xdp]
#[inline(always)]
pub fn lb_nat_icmp(ctx: XdpContext) -> u32 {
    counted(nat::error_to_backend(&ctx))
}

#[inline(always)]
fn counted(action: u32) -> u32 {
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

/// A packet that is not a service's may be a NAT backend's reply, when its source may be
/// a NAT backend's address; else it passes.
#[inline(always)]
fn not_a_service(ctx: &XdpContext, p: &Parsed) -> u32 {
    if classify::maybe_nat_backend(p) { nat_reply(ctx) } else { xdp_action::XDP_PASS }
}

/// The reply translator takes the packet when some backend is a NAT one (its slot is
/// filled), else it passes. A tail call, so that the translator's stack is not the
/// balancer's.
#[inline(always)]
fn nat_reply(ctx: &XdpContext) -> u32 {
    // SAFETY: control returns here only when the slot is empty.
    unsafe { NAT_PROGRAMS.tail_call(ctx, NAT_REPLY_SLOT) };
    xdp_action::XDP_PASS
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let mut p = match parse::parse_unless(start, end, classify::certainly_not_ours_v4) {
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
    // A later fragment has no ports: it is a service's if its address is.
    let later_fragment = p.frag == FRAG_LATER;
    if later_fragment && !classify::is_service_address(p.family, &p.dst) {
        return xdp_action::XDP_PASS;
    }
    let maybe_vip = later_fragment || classify::maybe_vip(&p);
    // Not a VIP: a mark rule's service, or nothing, and then the packet is the kernel's
    // before any connection-table work.
    let mark_service = if maybe_vip {
        None
    } else {
        match classify::lookup_service(&p, false) {
            Some(svc) => Some(svc),
            None => return not_a_service(ctx, &p),
        }
    };
    if !classify::addressed_to_us(ctx) {
        return xdp_action::XDP_PASS;
    }
    // What the kernel would refuse is refused here too, for a service's packets only.
    if let Err(reason) = parse::check_ipv4_header(start, end, &p) {
        let ours = later_fragment || mark_service.is_some() || classify::lookup_service(&p, true).is_some();
        return drop_if_ours(ours, reason);
    }
    let key = p.flow_key();
    // One way out for every decision below: `forward` is inlined once (twice would not fit
    // the balancer's stack).
    let (d, counter) = if later_fragment {
        match later(&mut p) {
            Ok(decided) => decided,
            Err(reason) => return drop_if_ours(true, reason),
        }
    } else {
        // An established flow goes on without its service being looked up. Its source was
        // checked when its entry was made (the source is part of the key).
        let d = match conntrack::established(&p, &key) {
            Some(d) => d,
            None => {
                let svc = match mark_service.or_else(|| classify::lookup_service(&p, true)) {
                    Some(svc) => svc,
                    None => return not_a_service(ctx, &p),
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
        if p.frag == FRAG_FIRST {
            fragments::record(&p, &d);
            (d, stat::FRAG_FIRST)
        } else {
            (d, 0)
        }
    };
    forward(ctx, &d, &key, counter)
}

/// A fragment after the first of a service's datagram (addressed to us, its header
/// checked): where its first went, else by the ring of its address's only `sh` service
/// (whose port then stands in `p` for the one the fragment does not carry). The decision
/// and its counter, or the drop reason (`fragment` when neither places it).
#[inline(always)]
fn later(p: &mut Parsed) -> Result<(Decision, u32), u32> {
    if let Some(d) = fragments::follow(p) {
        return Ok((d, stat::FRAG_FOLLOWED));
    }
    let dport = fragments::sole_source_hashed_port(p).ok_or(stat::DROP_FRAGMENT)?;
    p.dport = dport;
    if parse::is_martian_source(p.family, &p.src) || classify::is_vip(p.family, &p.src) {
        return Err(stat::DROP_MARTIAN_SOURCE);
    }
    let svc = classify::lookup_service(p, true).ok_or(stat::DROP_FRAGMENT)?;
    let d = conntrack::pick(p, &svc).map_err(|_| stat::DROP_FRAGMENT)?;
    Ok((Decision { new_flow: false, ..d }, stat::FRAG_BY_RING))
}

/// Sends the frame to the decision's backend and counts it there, and under `counter`
/// too unless that is zero.
#[inline(always)]
fn forward(ctx: &XdpContext, d: &conntrack::Decision, key: &FlowKey, counter: u32) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let sent = if d.backend.tunnel != 0 {
        forward::tunnel(ctx, &d.backend, spread_hash(key))
    } else if d.backend.nat != 0 {
        return nat::hand_over(ctx, d, key, counter);
    } else {
        forward::direct_route(ctx, &d.backend)
    };
    forward::account(sent, d.backend_id, len, d.new_flow, counter)
}

/// An ICMP error about a service's flow (`p` is that flow, as the client sends it) goes
/// to the flow's backend: the recorded one, else the one the ring gives, as for a
/// mid-stream packet. Nothing is recorded: an error says nothing about the connection.
/// A round-robin ring says nothing about where an unrecorded flow went, and an error the
/// director cannot place is the kernel's, as before.
#[inline(always)]
fn icmp_error(ctx: &XdpContext, p: &Parsed) -> u32 {
    // An error from the servers' side comes from any router there: not filtered by source.
    let Some(svc) = classify::lookup_service(p, classify::maybe_vip(p)) else {
        return nat_reply(ctx);
    };
    if !classify::addressed_to_us(ctx) || parse::check_ipv4_header(ctx.data(), ctx.data_end(), p).is_err() {
        return xdp_action::XDP_PASS;
    }
    let key = p.flow_key();
    let Some(d) = conntrack::about_error(p, &key, &svc) else {
        return xdp_action::XDP_PASS;
    };
    // A NAT flow's error is translated by a program of its own, which finds the flow
    // again: handing the decision over from here costs the balancer's verification
    // more than it has to spare.
    if d.backend.nat != 0 {
        // SAFETY: control returns here only when the slot is empty.
        unsafe { NAT_PROGRAMS.tail_call(ctx, NAT_ICMP_SLOT) };
        return xdp_action::XDP_PASS;
    }
    forward(ctx, &d, &key, p.icmp_error as u32)
}

/// Bits that differ between a client's flows, for the tunnel source within a prefix: a
/// real server's receive hash over the outer header then spreads them over its queues.
/// A multiplicative mix is enough; nothing depends on it beyond spreading.
#[inline(always)]
fn spread_hash(key: &FlowKey) -> u32 {
    let w = key.src[0] ^ key.src[3] ^ ((key.sport as u32) << 16 | key.dport as u32);
    let h = w.wrapping_mul(0x9e37_79b1);
    h ^ (h >> 16)
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
