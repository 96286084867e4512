//! The real servers' decapsulator (`lb-xdp-decap`): strips the outer IPv4/IPv6 header of
//! tunnelled packets addressed to this host and passes the inner packet to the stack, for
//! kernels without the `ipip`/`ip6_tunnel` modules (or to skip their cost). Loaded by
//! `lb-daemon decap attach`; never by a director. Built for `bpfel-unknown-none`; on the
//! host this is an empty program.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::xdp_action,
        helpers::bpf_xdp_adjust_head,
        macros::{map, xdp},
        maps::{HashMap, PerCpuArray},
        programs::XdpContext,
    };
    use lb_common::{AddrKey, decap};
    use lb_ebpf::decap::{Decap, plan};
    use lb_ebpf::parse::{self, ETH_HLEN, VLAN_HLEN, ptr_at};

    #[map]
    static DECAP_LOCAL: HashMap<AddrKey, u8> = HashMap::with_max_entries(decap::MAX_LOCAL_ADDRS, 0);

    #[map]
    static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(decap::COUNT, 0);

    #[inline(always)]
    fn count(index: u32) {
        if let Some(c) = DECAP_STATS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot, only this program on this CPU writes it.
            unsafe { *c += 1 };
        }
    }

    #[xdp]
    pub fn lb_decap(ctx: XdpContext) -> u32 {
        let (start, end) = (ctx.data(), ctx.data_end());
        let (l2, outer, ethertype, family, dst, counter) = match plan(start, end) {
            Decap::Pass(why) => {
                count(why);
                return xdp_action::XDP_PASS;
            }
            Decap::Strip { l2, outer, ethertype, family, dst, counter } => {
                (l2, outer, ethertype, family, dst, counter)
            }
        };
        let key = AddrKey { addr: dst, family, _pad8: 0, _pad16: 0 };
        // SAFETY: the value is only tested for presence.
        if unsafe { DECAP_LOCAL.get(&key) }.is_none() {
            count(decap::PASS_NOT_LOCAL);
            return xdp_action::XDP_PASS;
        }
        // The link-layer header moves forward over the outer IP header: MACs, the VLAN tag
        // if any, then the inner packet's EtherType. The two places do not overlap (the
        // outer header is at least 20 bytes, the link-layer one at most 18).
        let tagged = l2 == ETH_HLEN + VLAN_HLEN;
        let to = start + outer;
        if ptr_at::<[u8; ETH_HLEN + VLAN_HLEN]>(to, end, 0).is_none()
            || ptr_at::<[u8; ETH_HLEN + VLAN_HLEN]>(start, end, 0).is_none()
        {
            count(decap::PASS_MALFORMED);
            return xdp_action::XDP_PASS;
        }
        // SAFETY: both 18-byte ranges were bounds-checked above.
        unsafe {
            let (dst_mac, src_mac) = (parse::read_mac(start), parse::read_mac(start + 6));
            let tag = (start as *const [u8; VLAN_HLEN]).byte_add(12).read_unaligned();
            parse::write_mac(to, &dst_mac);
            parse::write_mac(to + 6, &src_mac);
            let mut at = to + 12;
            if tagged {
                (at as *mut [u8; VLAN_HLEN]).write_unaligned(tag);
                at += VLAN_HLEN;
            }
            (at as *mut u16).write_unaligned(ethertype.to_be());
        }
        // SAFETY: a helper call on this program's own context.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer as i32) } != 0 {
            count(decap::PASS_MALFORMED);
            return xdp_action::XDP_PASS;
        }
        count(counter);
        xdp_action::XDP_PASS
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
