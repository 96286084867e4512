//! The test and benchmark object: programs that a production director never loads, kept
//! out of its object as Katran keeps `xdp_pktcntr` out of its balancer. Only `lb-tests`
//! loads it. Built for `bpfel-unknown-none`; on the host this is an empty program.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::maps::DevMap;
    use aya_ebpf::{
        bindings::{BPF_F_MMAPABLE, xdp_action},
        helpers::{bpf_redirect, bpf_xdp_adjust_head},
        macros::{map, xdp},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
        programs::XdpContext,
    };
    use lb_common::{
        BENCH_FRAME_LEN, BenchConfig, FloorForward, Flow, FlowKey, FlowSet, FlowTable, FlowWay,
        GEN_FRAME_LEN, SinkExpect, TrunkPort, hash::flow_hash,
    };
    use lb_ebpf::{
        csum,
        parse::{self, ETH_HLEN, ETH_P_8021Q, ETH_P_IP, VLAN_HLEN},
    };

    #[map]
    static BENCH_CFG: Array<BenchConfig> = Array::with_max_entries(1, 0);

    #[map]
    static BENCH_STATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    /// The frame `BenchConfig::restore` puts back before each run.
    #[map]
    static BENCH_FRAME: Array<[u32; BENCH_FRAME_LEN / 4]> = Array::with_max_entries(1, 0);

    /// Slot 0: the program under test, from the production object (tail calls cross objects).
    #[map]
    static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

    #[map]
    static GEN_FLOWS: Array<u32> = Array::with_max_entries(1, 0);

    #[map]
    static GEN_STATE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

    /// The generator's frame, written over the page before every send: live frames
    /// recycle pages with whatever the director (or the kernel) left in them.
    #[map]
    static GEN_FRAME: Array<[u32; GEN_FRAME_LEN / 4]> = Array::with_max_entries(1, 0);

    #[map]
    static SINK_EXPECT: Array<SinkExpect> = Array::with_max_entries(1, 0);

    /// Per CPU: frames delivered as expected, and the others.
    #[map]
    static SINK_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

    #[map]
    static FLOOR_FWD: Array<FloorForward> = Array::with_max_entries(1, 0);

    #[map]
    static FLOOR_EGRESS: DevMap = DevMap::with_max_entries(1, 0);

    /// Offsets of the generator's frame: Ethernet, a 20-byte IPv4 header, UDP or TCP.
    const GEN_IP_PROTO: usize = 14 + 9;
    const GEN_L4: usize = 14 + 20;
    const GEN_UDP_CHECK: usize = GEN_L4 + 6;
    const GEN_TCP_CHECK: usize = GEN_L4 + 16;

    /// The traffic generator (`BPF_PROG_TEST_RUN` with live frames): `GEN_FRAME[0]` (UDP or
    /// TCP) with the next source port of `GEN_FLOWS[0]` (checksum patched), out of the
    /// interface the run names.
    #[xdp]
    pub fn lb_gen(ctx: XdpContext) -> u32 {
        let flows = GEN_FLOWS.get(0).copied().unwrap_or(1).max(1);
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + GEN_FRAME_LEN > end {
            return xdp_action::XDP_ABORTED;
        }
        let Some(frame) = GEN_FRAME.get(0) else { return xdp_action::XDP_ABORTED };
        // SAFETY: GEN_FRAME_LEN bytes bounds-checked above; packet data is unaligned.
        unsafe { (start as *mut [u32; GEN_FRAME_LEN / 4]).write_unaligned(*frame) };
        let Some(state) = GEN_STATE.get_ptr_mut(0) else { return xdp_action::XDP_ABORTED };
        // SAFETY: per-CPU slot; the frame offsets were bounds-checked above.
        unsafe {
            let i = *state % flows;
            *state = state.read().wrapping_add(1);
            let sport = (start + GEN_L4) as *mut u16;
            let tcp = *((start + GEN_IP_PROTO) as *const u8) == 6;
            let check = (start + if tcp { GEN_TCP_CHECK } else { GEN_UDP_CHECK }) as *mut u16;
            let (old, new) = (sport.read_unaligned(), (10_000 + i as u16).to_be());
            sport.write_unaligned(new);
            check.write_unaligned(csum::update16(check.read_unaligned(), old, new));
        }
        xdp_action::XDP_TX
    }

    /// An IPv4 header without options at `ip`, and the first 4 bytes after it: its
    /// protocol, destination address and (UDP or TCP) destination port, as on the wire.
    #[inline(always)]
    fn ipv4_dst(ip: usize, end: usize) -> Option<(u8, u32, u16)> {
        if ip + 20 + 4 > end {
            return None;
        }
        // SAFETY: 24 bytes from `ip` bounds-checked above; packet data is unaligned.
        unsafe {
            if *(ip as *const u8) != 0x45 {
                return None;
            }
            let proto = *((ip + 9) as *const u8);
            let dst = ((ip + 16) as *const u32).read_unaligned();
            Some((proto, dst, ((ip + 20 + 2) as *const u16).read_unaligned()))
        }
    }

    /// The sink: of the UDP, TCP and IPv4-in-IPv4 frames that arrive (untagged IPv4, no
    /// options), counts those that match `SINK_EXPECT` and the others, and drops them; the
    /// kernel's own chatter on the link (neighbour discovery, say) passes uncounted.
    #[xdp]
    pub fn lb_sink(ctx: XdpContext) -> u32 {
        let (start, end) = (ctx.data(), ctx.data_end());
        let want = SINK_EXPECT.get(0).copied().unwrap_or_default();
        if start + ETH_HLEN > end {
            return xdp_action::XDP_PASS;
        }
        // SAFETY: the Ethernet header was bounds-checked above.
        if unsafe { ((start + 12) as *const u16).read_unaligned() } != ETH_P_IP.to_be() {
            return xdp_action::XDP_PASS;
        }
        let Some((proto, dst, dport)) = ipv4_dst(start + ETH_HLEN, end) else {
            return xdp_action::XDP_PASS;
        };
        // One of `count` consecutive addresses from `first` (all in network order).
        let among = |addr: u32, first: u32, count: u16| {
            u32::from_be(addr).wrapping_sub(u32::from_be(first)) < u32::from(count)
        };
        let inner_matches = |proto: u8, dst: u32, dport: u16| {
            proto == want.proto && dport == want.port && among(dst, want.addr, want.addrs)
        };
        let delivered = match proto {
            4 => match ipv4_dst(start + ETH_HLEN + 20, end) {
                Some((proto, inner_dst, dport)) => {
                    among(dst, want.tunnel_dst, want.tunnel_dsts) && inner_matches(proto, inner_dst, dport)
                }
                None => false,
            },
            6 | 17 => want.tunnel_dsts == 0 && inner_matches(proto, dst, dport),
            _ => return xdp_action::XDP_PASS,
        };
        if let Some(c) = SINK_COUNTS.get_ptr_mut(if delivered { 0 } else { 1 }) {
            // SAFETY: per-CPU slot.
            unsafe { *c += 1 };
        }
        xdp_action::XDP_DROP
    }

    /// The end-to-end floor: what any XDP forwarder must do at least (new MACs, out of
    /// another interface through a devmap).
    #[xdp]
    pub fn lb_redirect_floor(ctx: XdpContext) -> u32 {
        redirect_to_floor_egress(&ctx)
    }

    /// A stand-in for the connection table's memory, as many sets as the benchmark's
    /// table (sized at load time), never written: for `lb_redirect_floor_table`.
    #[map]
    static REFERENCE_SETS: Array<FlowSet> = Array::with_max_entries(1, BPF_F_MMAPABLE);

    /// `REFERENCE_SETS`' seed and set mask.
    #[map]
    static REFERENCE_TABLE: Array<FlowTable> = Array::with_max_entries(1, 0);

    /// The end-to-end floor plus the least that keeping per-flow state costs: the flow's
    /// hash and one read of the way it picks in a table as large as the connection
    /// table (a cache line, and a TLB entry, of its own for each of many flows).
    #[xdp]
    pub fn lb_redirect_floor_table(ctx: XdpContext) -> u32 {
        let Some(table) = REFERENCE_TABLE.get(0).copied() else { return xdp_action::XDP_PASS };
        let Ok(p) = parse::parse(ctx.data(), ctx.data_end()) else { return xdp_action::XDP_PASS };
        let key = p.flow_key();
        let Some(set) = REFERENCE_SETS.get_ptr(table.set(flow_hash(&key, table.seed))) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: a set of the map, valid for this program run; read as the balancer reads
        // a way (its head word, then its key), volatile so that the reads stay.
        let (head, first_key_word) = unsafe {
            let way = set.cast::<FlowWay>();
            (
                core::ptr::read_volatile((&raw const (*way).flow).cast::<u64>()),
                core::ptr::read_volatile(way.cast::<u32>()),
            )
        };
        // Never true (the table is all zeroes): the values are used, so the reads stay.
        if head == u64::MAX && first_key_word == key.src[0] {
            return xdp_action::XDP_DROP;
        }
        redirect_to_floor_egress(&ctx)
    }

    /// New MACs (`FLOOR_FWD[0]`), then out of `FLOOR_EGRESS[0]`.
    #[inline(always)]
    fn redirect_to_floor_egress(ctx: &XdpContext) -> u32 {
        let Some(fwd) = FLOOR_FWD.get(0).copied() else { return xdp_action::XDP_PASS };
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + 12 > end {
            return xdp_action::XDP_DROP;
        }
        // SAFETY: 12 bytes bounds-checked above.
        unsafe {
            parse::write_mac(start, &fwd.dst_mac);
            parse::write_mac(start + 6, &fwd.src_mac);
        }
        FLOOR_EGRESS.redirect(0, 0).unwrap_or(xdp_action::XDP_DROP)
    }

    /// Per-CPU LRU lists, as the balancer's `FLOWS` had until map layout 9.
    const BPF_F_NO_COMMON_LRU: u32 = 2;

    /// A stand-in for the connection table, for `lb_lru_insert`; the benchmark sizes it as
    /// the table at load time (small here: a preallocated LRU map costs its full size).
    #[map]
    static REFERENCE_FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(64, BPF_F_NO_COMMON_LRU);

    /// Per CPU: the next key `lb_lru_insert` makes.
    #[map]
    static REFERENCE_NEXT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    /// What the kernel's LRU map costs a new flow, with nothing of the balancer around it:
    /// a lookup that misses, then an insert (evicting once the CPU's share is full).
    #[xdp]
    pub fn lb_lru_insert(_ctx: XdpContext) -> u32 {
        let Some(next) = REFERENCE_NEXT.get_ptr_mut(0) else { return xdp_action::XDP_ABORTED };
        // SAFETY: this CPU's own slot; nothing else runs on this CPU during the program.
        let i = unsafe {
            let i = *next;
            *next = i + 1;
            i
        };
        // Distinct on every run of this CPU (the benchmark runs on one).
        let key = FlowKey {
            src: [i as u32, (i >> 32) as u32, 0, 0],
            dst: [0x0a00_02c0, 0, 0, 0],
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            family: 4,
            _pad: 0,
        };
        // SAFETY: presence test only.
        if unsafe { REFERENCE_FLOWS.get(&key) }.is_none() {
            let flow =
                Flow { backend: 1, check: 1, service: 1, state: 1, service_generation: 1, last_seen_ns: i };
            let _ = REFERENCE_FLOWS.insert(&key, &flow, 0);
        }
        xdp_action::XDP_TX
    }

    /// Ports of the test switch (`lb_test_trunk`), by ingress ifindex.
    #[map]
    static TRUNK_PORTS: HashMap<u32, TrunkPort> = HashMap::with_max_entries(4, 0);

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
        let cfg = BENCH_CFG.get(0).copied().unwrap_or_default();
        if cfg.untunnel != 0 {
            untunnel(&ctx);
        }
        if cfg.restore != 0 {
            restore(&ctx);
        }
        let (start, end) = (ctx.data(), ctx.data_end());
        let flows = cfg.flows;
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

    /// Puts the configured frame back (a NAT case's previous run rewrote it).
    #[inline(always)]
    fn restore(ctx: &XdpContext) {
        let (start, end) = (ctx.data(), ctx.data_end());
        let Some(frame) = BENCH_FRAME.get(0) else { return };
        if start + BENCH_FRAME_LEN > end {
            return;
        }
        // SAFETY: BENCH_FRAME_LEN bytes bounds-checked above; packet data is unaligned.
        unsafe { (start as *mut [u32; BENCH_FRAME_LEN / 4]).write_unaligned(*frame) };
    }

    /// Removes the outer IPv4 header (protocol 4) the previous run added: the Ethernet
    /// addresses move forward over it, the EtherType stays IPv4.
    #[inline(always)]
    fn untunnel(ctx: &XdpContext) {
        const OUTER: usize = 20;
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + ETH_HLEN + OUTER > end {
            return;
        }
        // SAFETY: the Ethernet header and 20 bytes after it were bounds-checked above.
        let (ethertype, proto) = unsafe {
            (
                u16::from_be((start as *const u8).add(12).cast::<u16>().read_unaligned()),
                *(start as *const u8).add(ETH_HLEN + 9),
            )
        };
        if ethertype != ETH_P_IP || proto != 4 {
            return;
        }
        // SAFETY: as above; the 12 MAC bytes are copied before the head moves past them.
        let (dst, src) = unsafe { (parse::read_mac(start), parse::read_mac(start + 6)) };
        // SAFETY: a helper call on this program's own context.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, OUTER as i32) } != 0 {
            return;
        }
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + ETH_HLEN > end {
            return;
        }
        // SAFETY: 14 bytes bounds-checked above.
        unsafe {
            parse::write_mac(start, &dst);
            parse::write_mac(start + 6, &src);
            (start as *mut u8).add(12).cast::<u16>().write_unaligned(ETH_P_IP.to_be());
        }
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
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
