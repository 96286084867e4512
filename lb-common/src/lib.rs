//! Types shared by the XDP program (`lb-ebpf`) and the daemon (`lb-daemon`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields: the kernel hashes
//! and compares every byte of a key, so an uninitialised padding byte would make two equal
//! keys differ. Addresses are kept as the raw network-order bytes of the packet, viewed as
//! four `u32` words (IPv4 in the first word, the rest zero), so the data path never
//! byte-swaps an address.
#![no_std]

pub mod hash;

/// Map names, as the daemon looks them up in the loaded object.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RINGS: &str = "RINGS";
    pub const FLOWS: &str = "FLOWS";
    pub const FLOW_TABLE: &str = "FLOW_TABLE";
    pub const MARK_RULES_V4: &str = "MARK_RULES_V4";
    pub const MARK_RULES_V6: &str = "MARK_RULES_V6";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const EGRESS: &str = "EGRESS";
    /// Per backend id, and past those per service (`departed_stats_slot`).
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const CONFIG: &str = "CONFIG";
    pub const SERVICE_GENERATIONS: &str = "SERVICE_GENERATIONS";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const WRR_CURSORS: &str = "WRR_CURSORS";
    pub const LOCAL_MACS: &str = "LOCAL_MACS";
    pub const LOCAL_MAC_SLOTS: &str = "LOCAL_MAC_SLOTS";
    /// Per CPU: the last clock read and the tick it was made in; not pinned (a cache).
    pub const CLOCK: &str = "CLOCK";
    pub const FLOOD_GUARD: &str = "FLOOD_GUARD";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const NAT_REPLIES: &str = "NAT_REPLIES";
    pub const NAT_PROGRAMS: &str = "NAT_PROGRAMS";
    pub const NAT_JOBS: &str = "NAT_JOBS";
    pub const FULLNAT_POOL: &str = "FULLNAT_POOL";
    pub const FULLNAT_SOURCES: &str = "FULLNAT_SOURCES";
    pub const NAT_SOURCE_FILTER: &str = "NAT_SOURCE_FILTER";
    /// The connection log's ring buffer; not pinned (each daemon reads its own program's).
    pub const CONN_EVENTS: &str = "CONN_EVENTS";
}

/// Program names in the object.
pub mod programs {
    /// The balancer itself.
    pub const BALANCER: &str = "lb_balancer";
    /// Returns XDP_PASS. Attached to the peer of a veth that receives XDP_REDIRECT or
    /// XDP_TX frames, which the kernel requires before it delivers them.
    pub const PASS: &str = "lb_pass";
    /// Translates masqueraded backends' replies back to the VIP. Not attached: the
    /// balancer tail-calls it (`NAT_PROGRAMS[NAT_REPLY_SLOT]`) for packets that are not a
    /// service's, so one program per interface serves both directions.
    pub const NAT_REPLY: &str = "lb_nat_reply";
    pub const NAT_REPLY_SLOT: u32 = 0;
    /// Rewrites a client's packet for its NAT backend, as the balancer decided
    /// (`NAT_JOBS`); entered by the balancer's tail call (`NAT_PROGRAMS[NAT_FORWARD_SLOT]`).
    pub const NAT_FORWARD: &str = "lb_nat_forward";
    pub const NAT_FORWARD_SLOT: u32 = 1;
    /// Translates an ICMP error about a NAT flow that came from the clients' side (a
    /// router's "too big" about a reply) for the flow's backend; entered by the
    /// balancer's tail call (`NAT_PROGRAMS[NAT_ICMP_SLOT]`).
    pub const NAT_ICMP: &str = "lb_nat_icmp";
    pub const NAT_ICMP_SLOT: u32 = 2;
    /// Translates a full-NAT backend's reply; entered by `lb_nat_reply`'s tail call.
    pub const NAT_FULL_REPLY: &str = "lb_fullnat_reply";
    pub const NAT_FULL_REPLY_SLOT: u32 = 3;
    /// Every program a director loads.
    pub const ALL: [&str; 6] = [BALANCER, PASS, NAT_REPLY, NAT_FORWARD, NAT_ICMP, NAT_FULL_REPLY];
}

/// The real servers' decapsulation object (`lb-xdp-decap`): `lb-daemon decap attach`
/// loads it on a real server whose kernel lacks the `ipip`/`ip6_tunnel` modules.
pub mod decap {
    /// Layout of the decapsulator's maps; pinned under `maps-v<N>` like the balancer's.
    pub const MAP_LAYOUT_VERSION: u32 = 1;
    pub const PROGRAM: &str = "lb_decap";
    /// `DECAP_LOCAL[AddrKey]`: outer destinations that are this host's (value unused).
    pub const LOCAL_ADDRS: &str = "DECAP_LOCAL";
    /// Per-CPU counters, indexed as below.
    pub const STATS: &str = "DECAP_STATS";
    pub const MAX_LOCAL_ADDRS: u32 = 256;

    pub const IPIP: u32 = 0;
    pub const IP6IP6: u32 = 1;
    pub const IP6_IN_IP4: u32 = 2;
    pub const IP4_IN_IP6: u32 = 3;
    pub const PASS_NOT_TUNNEL: u32 = 4;
    pub const PASS_NOT_LOCAL: u32 = 5;
    pub const PASS_FRAGMENT: u32 = 6;
    pub const PASS_MALFORMED: u32 = 7;
    pub const PASS_OUTER_OPTIONS: u32 = 8;
    pub const COUNT: u32 = 9;

    /// Counter names as `decap status` and metrics print them.
    pub const NAMES: [(u32, &str); COUNT as usize] = [
        (IPIP, "decapsulated_ipv4_in_ipv4"),
        (IP6IP6, "decapsulated_ipv6_in_ipv6"),
        (IP6_IN_IP4, "decapsulated_ipv6_in_ipv4"),
        (IP4_IN_IP6, "decapsulated_ipv4_in_ipv6"),
        (PASS_NOT_TUNNEL, "passed_not_tunnelled"),
        (PASS_NOT_LOCAL, "passed_not_addressed_here"),
        (PASS_FRAGMENT, "passed_outer_fragment"),
        (PASS_MALFORMED, "passed_malformed"),
        (PASS_OUTER_OPTIONS, "passed_outer_options"),
    ];
}

/// The test and benchmark object (`lb-xdp-test`), which only the tests load.
pub mod test_object {
    /// Map names.
    pub mod maps {
        pub const BENCH_CFG: &str = "BENCH_CFG";
        pub const BENCH_TARGET: &str = "BENCH_TARGET";
        pub const TRUNK_PORTS: &str = "TRUNK_PORTS";
        pub const BENCH_FRAME: &str = "BENCH_FRAME";
        pub const BENCH_STATE: &str = "BENCH_STATE";
        pub const GEN_FLOWS: &str = "GEN_FLOWS";
        pub const GEN_FRAME: &str = "GEN_FRAME";
        pub const SINK_COUNTS: &str = "SINK_COUNTS";
        pub const SINK_EXPECT: &str = "SINK_EXPECT";
        pub const FLOOR_FWD: &str = "FLOOR_FWD";
        pub const FLOOR_EGRESS: &str = "FLOOR_EGRESS";
        pub const REFERENCE_FLOWS: &str = "REFERENCE_FLOWS";
        pub const REFERENCE_SETS: &str = "REFERENCE_SETS";
        pub const REFERENCE_TABLE: &str = "REFERENCE_TABLE";
    }

    /// Program names.
    pub mod programs {
        /// Benchmark floor: parse Ethernet/IPv4/TCP, swap MACs, XDP_TX.
        pub const FLOOR: &str = "lb_floor";
        /// Benchmark driver: varies the flow of the packet in place, then tail-calls the
        /// program in `BENCH_TARGET[0]`.
        pub const BENCH_DRIVER: &str = "lb_bench_driver";
        /// A two-port 802.1Q switch in XDP, for kernels without VLAN devices (see
        /// `TrunkPort`).
        pub const TEST_TRUNK: &str = "lb_test_trunk";
        /// The end-to-end benchmark's traffic generator, run with live frames: gives the
        /// UDP frame the next of `GEN_FLOWS[0]` source ports and sends it (XDP_TX).
        pub const GEN: &str = "lb_gen";
        /// The end-to-end benchmark's sink: counts frames that arrive as `SINK_EXPECT[0]`
        /// says (`SINK_COUNTS[0]`) and the others (`[1]`), and drops them.
        pub const SINK: &str = "lb_sink";
        /// The end-to-end benchmark's XDP floor: new MACs (`FLOOR_FWD[0]`) and out of
        /// another interface through a devmap, nothing else.
        pub const REDIRECT_FLOOR: &str = "lb_redirect_floor";
        /// The end-to-end floor plus one read of a flow's way in `REFERENCE_SETS` (a
        /// stand-in for the connection table, as large, never written): what keeping
        /// per-flow state costs at least.
        pub const REDIRECT_FLOOR_TABLE: &str = "lb_redirect_floor_table";
        /// The kernel's LRU map's own cost of a new flow (the connection table was one
        /// until map layout 9): a lookup that misses and an insert into `REFERENCE_FLOWS`
        /// (the table's key and value, per-CPU lists; its size set at load), with a key
        /// never seen before on every run.
        pub const LRU_INSERT: &str = "lb_lru_insert";
    }
}

pub const MAX_SERVICES: u32 = 4096;
// `Backend::service` holds a service id in 16 bits.
const _: () = assert!(MAX_SERVICES <= 1 << 16);
/// (service, backend) pairs over all services: a large site's 1,000 services of 100 real
/// servers each, with room. Costs 40 bytes each in `BACKENDS` and 24 per possible CPU in
/// `BACKEND_STATS` (5 MB, and 3 MB per CPU).
pub const MAX_BACKENDS: u32 = 1 << 17;

/// `BACKEND_STATS` entries: one per backend id, then one per service holding what the
/// service's backends had counted when they left it. The data path counts packets under
/// their backend only (one per-CPU update per packet, not two); a service's counters are
/// its departed slot plus its backends', summed by the daemon, so that they never go
/// back when a backend leaves.
pub const BACKEND_STATS_ENTRIES: u32 = MAX_BACKENDS + MAX_SERVICES;

/// The `BACKEND_STATS` slot of a service's departed backends (written by the daemon only;
/// no backend id reaches it, as `BACKENDS` has `MAX_BACKENDS` entries).
pub const fn departed_stats_slot(service: u32) -> u32 {
    MAX_BACKENDS + service
}
/// Rules kept per destination prefix in the mark tries (first match wins, in config order).
pub const MAX_MARK_RULES_PER_PREFIX: usize = 8;
pub const MAX_MARK_PREFIXES: u32 = 4096;
pub const MAX_EGRESS_INTERFACES: u32 = 64;
/// Interfaces the balancer may be attached to (entries of `LOCAL_MACS`, and slots of
/// `LOCAL_MAC_SLOTS`).
pub const MAX_ATTACHED_INTERFACES: u32 = 256;

/// The `LOCAL_MAC_SLOTS` slot an interface's MACs are kept in, unless an interface with a
/// lower index holds it (then only `LOCAL_MACS` has them).
pub const fn local_mac_slot(ifindex: u32) -> u32 {
    ifindex % MAX_ATTACHED_INTERFACES
}
/// Destination MACs accepted per receiving interface: its own and a few configured ones
/// (a VRRP virtual MAC, say).
pub const MAX_LOCAL_MACS: usize = 8;

/// Default number of Maglev ring slots shared by all services: room for four services
/// with the largest common ring (65537) double-buffered.
pub const DEFAULT_RING_SLOTS: u32 = 8 * 65537;
/// Default size of the connection table (flows; a power of two, `FLOW_WAYS` a set).
pub const DEFAULT_FLOW_ENTRIES: u32 = 1 << 20;

/// Version of the layout of every map's keys and values. Pinned maps are kept under a
/// directory named after it, so a daemon only ever adopts maps it understands: bump it
/// whenever a map's key or value type changes meaning or size.
pub const MAP_LAYOUT_VERSION: u32 = 9;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// `ServiceKey::kind` and `FlowKey::family` values.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
/// A service keyed by a fwmark-style rule mark instead of an address.
pub const KIND_MARK: u8 = 1;

/// Exact service key: (VIP, port, protocol), or a mark.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// VIP in network order; for `KIND_MARK`, `addr[0]` is the mark and the rest is zero.
    pub addr: [u32; 4],
    /// Destination port in network order; zero for marks.
    pub port: u16,
    /// IP protocol; zero for marks.
    pub proto: u8,
    /// `FAMILY_V4`, `FAMILY_V6` or `KIND_MARK`.
    pub kind: u8,
}

/// Scheduler flag: hash the 5-tuple (`mh`) instead of the source address (`sh`).
pub const SERVICE_F_HASH_TUPLE: u32 = 1;
/// Scheduler flag: new flows take the ring's slots in turn (`wrr`), with a cursor per
/// CPU in `WRR_CURSORS`; the ring holds the weighted round-robin sequence.
pub const SERVICE_F_ROUND_ROBIN: u32 = 2;
/// While the ring is empty (no backend can take new flows), new flows go to the kernel's
/// stack (`XDP_PASS`) instead of being dropped: the director itself, or a stack-level
/// balancer, answers them.
pub const SERVICE_F_PASS_WHEN_EMPTY: u32 = 4;

/// A service as the data path sees it. The ring is a window into the shared `RINGS`
/// array; the daemon writes a new ring into an idle window and then replaces this value,
/// so a packet sees either the whole old ring or the whole new one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into the per-service counters and `SERVICE_GENERATIONS`.
    pub id: u32,
    pub ring_offset: u32,
    /// A prime; zero means no backend is available.
    pub ring_size: u32,
    pub flags: u32,
    /// Equal to `SERVICE_GENERATIONS[id]` while this service exists; flows record it.
    pub generation: u32,
    /// One new flow in this many is reported in `CONN_EVENTS` (1: every one); zero: none.
    /// (Was padding before the connection log: maps of an older daemon hold zero here.)
    pub log_one_in: u32,
}

/// A new flow, as the data path reports it in `CONN_EVENTS` (the connection log). The
/// daemon names the service and backend from their ids.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    /// When, on the flows' clock (`bpf_ktime_get_coarse_ns`).
    pub time_ns: u64,
    /// The client's and the destination's (VIP's) addresses, as in `Parsed`.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub service: u32,
    pub backend: u32,
    /// Ports in network order, as on the wire.
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}

/// Bytes of the connection-event ring buffer: room for about 18,000 events between two
/// reads of the daemon (a power of two and a multiple of the page size, as the kernel
/// wants).
pub const CONN_EVENTS_BYTES: u32 = 1 << 20;

/// Backend states in the data path. Draining backends are absent from the ring but keep
/// their established flows; down backends lose them (they are rescheduled).
pub const BACKEND_UP: u8 = 0;
pub const BACKEND_DOWN: u8 = 1;

/// Where and how to send a packet for one backend (direct routing).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u32; 4],
    /// The backend's MAC address (new Ethernet destination).
    pub dst_mac: [u8; 6],
    /// The egress interface's MAC address (new Ethernet source).
    pub src_mac: [u8; 6],
    /// Egress interface; equal to the receiving interface means XDP_TX.
    pub ifindex: u32,
    pub family: u8,
    pub state: u8,
    /// Id of the service the backend belongs to. The data path ignores it; a restarted
    /// daemon reads it back to give every (service, backend) pair its old id.
    pub service: u16,
    /// The 802.1Q VLAN id frames to this backend carry on `ifindex` (the backend is
    /// reached through a VLAN device on top of it); zero sends them untagged. A frame's
    /// own tag is replaced by this one, or removed.
    pub vlan: u16,
    /// Non-zero: the packet goes inside an outer IP header to `addr` (IP-in-IP, or IPv6
    /// in IPv6), from `DataplaneConfig`'s tunnel source of `addr`'s family.
    pub tunnel: u8,
    /// `NAT_MASQ`: the destination becomes `addr` (and `port`), and the backend's replies,
    /// which route through the director, are translated back (`NAT_REPLIES`). Zero (what
    /// maps of older daemons hold here) leaves the packet's addresses alone.
    pub nat: u8,
    /// Tunnel backends: the MTU of the way to `addr` (the route's, else the egress
    /// device's); an outer packet longer than this is not sent. Zero: no limit known.
    pub mtu: u16,
    /// NAT backends: the destination port packets get (network order); zero keeps the
    /// packet's (the service's port, or a fwmark service's matched one).
    pub port: u16,
}

/// `Backend::nat`: masquerading (LVS `-m`, keepalived `lb_kind NAT`).
pub const NAT_MASQ: u8 = 1;
/// `Backend::nat`: full NAT: the source becomes an address and port of the director's
/// pool (`FULLNAT_POOL`) too, so that replies come back to the director whatever the
/// real server's routes.
pub const NAT_FULL: u8 = 2;

/// The director's full-NAT source addresses (`FULLNAT_POOL[0]`), as the tunnel sources
/// of `DataplaneConfig`: a base per family and the host bits a flow's hash fills.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FullNatPool {
    /// Network order; zero: no IPv4 pool.
    pub v4: u32,
    pub spread_v4: u32,
    /// Network-order words; zero: no IPv6 pool.
    pub v6: [u32; 4],
    /// Host bits of the IPv6 pool, over the last word.
    pub spread_v6: u32,
}

/// Where a full-NAT flow's packets come from toward its backend (`FULLNAT_SOURCES`,
/// keyed by the flow as the client sends it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FullNatSource {
    pub addr: [u32; 4],
    /// Network order.
    pub port: u16,
    pub _pad: u16,
}

/// Source ports a full-NAT flow may get: the unprivileged range, whole, so that 64,512
/// flows to one backend port fit on each pool address.
pub const FULLNAT_PORT_MIN: u16 = 1024;
/// Candidate ports tried for a new full-NAT flow before it is dropped (`nat_no_port`).
pub const FULLNAT_PORT_TRIES: u32 = 16;

/// What the balancer decided for a packet to a NAT backend, handed to the translator it
/// tail-calls (`NAT_JOBS[0]`, per CPU): a tail call keeps the rewrite's code out of the
/// balancer's verification and stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatJob {
    /// The flow as the client sends it (recorded for the backend's replies).
    pub key: FlowKey,
    pub service_id: u32,
    pub backend_id: u32,
    /// Non-zero: a flow just scheduled, whose replies must be recorded.
    pub new_flow: u32,
    /// A `stat::FRAG_*` counter to count once the packet is sent; zero: none.
    pub counter: u32,
}

/// Ways of a connection-table set (`FlowSet`).
pub const FLOW_WAYS: u32 = 4;

/// One flow of the connection table: 64 bytes, a cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowWay {
    pub key: FlowKey,
    pub flow: Flow,
}

/// A set of the connection table (`FLOWS`), a set-associative table in an array map: a
/// flow's hash picks its set, and a new flow takes its own way if its key is there (a
/// closed tuple reused), else the way seen least recently (a way never used is all
/// zeroes, the oldest of all). Nothing links the ways, so recording a flow keeps no lists and
/// takes no lock (the kernel's LRU map cost a new flow three times as much; see
/// docs/benchmarks.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSet {
    pub ways: [FlowWay; FLOW_WAYS as usize],
}

/// How the data path finds a flow's set (`FLOW_TABLE[0]`), written once by the daemon
/// that creates the table and kept with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTable {
    /// Seed of the flows' hash, drawn at random: from a public fixed seed an attacker
    /// who knows a flow could compute the few flows that evict it from its set.
    pub seed: u32,
    /// Sets minus one (their count is a power of two).
    pub set_mask: u32,
}

impl FlowTable {
    /// The set of a flow whose `hash::flow_hash` is `hash`.
    #[inline(always)]
    pub const fn set(&self, hash: u32) -> u32 {
        hash & self.set_mask
    }

    /// `Flow::check` of a flow whose `hash::flow_hash` is `hash`: the hash, never zero
    /// (without a branch, which the verifier would walk twice).
    #[inline(always)]
    pub const fn check(hash: u32) -> u32 {
        hash | 1
    }
}

/// A new flow that takes the way of one seen less than this long ago is counted
/// (`stat::FLOWS_EVICTED_RECENT`).
pub const FLOW_EVICTED_RECENT_NS: u64 = 10_000_000_000;

/// Connection-table key: the 5-tuple as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

/// Flow states, following what the director sees of a TCP connection (only the
/// client-to-server half passes through it in direct routing).
pub const FLOW_SYN_SENT: u16 = 1;
pub const FLOW_ESTABLISHED: u16 = 2;
pub const FLOW_FIN: u16 = 3;
pub const FLOW_CLOSED: u16 = 4;
/// UDP has no handshake: a flow is established from its first packet.
pub const FLOW_UDP: u16 = 5;
/// A TCP flow first seen mid-stream (no SYN: a director restart, a failover from another
/// director, or junk). It is forwarded and recorded, so that it keeps its server if the
/// ring changes, but counted as a connection only once it has shown it is real: a packet
/// at least [`MIDSTREAM_CONFIRM_NS`] after the first. Until then `last_seen_ns` holds the
/// time of its first packet.
pub const FLOW_MIDSTREAM: u16 = 6;
/// How long a mid-stream flow must go on before it counts as established.
pub const MIDSTREAM_CONFIRM_NS: u64 = 1_000_000_000;
/// NAT flows, whose replies the director sees too: the server answered the SYN
/// (SYN-ACK); the client's ACK then makes the flow established.
pub const FLOW_SYN_RECV: u16 = 7;
/// A NAT flow's SYN, not answered yet: unlike `FLOW_SYN_SENT` (direct routing, where the
/// client's ACK is all the director sees of the handshake) the client's segments leave
/// it as it is until the server's SYN-ACK.
pub const FLOW_NAT_SYN_SENT: u16 = 9;
/// NAT flows: the server sent FIN first (`FLOW_FIN` is the client's FIN); the other
/// side's FIN, or a RST from either, closes the flow.
pub const FLOW_FIN_SERVER: u16 = 8;

/// A recorded flow: the value of a connection-table way (`FlowWay`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub backend: u32,
    /// The key's `FlowTable::check`, never zero in a used way (zero: the way is empty).
    /// `backend` and `check` are one aligned 8-byte word, written last and read first as
    /// one: two CPUs recording different flows into one way at the same instant can
    /// leave one flow's key with the other's value, and a reader that finds the check
    /// not matching the key it compared takes the way for empty (the flow is scheduled
    /// afresh, to the same backend while the ring is unchanged), never the other flow's
    /// backend for its own.
    pub check: u32,
    pub service: u16,
    /// One of the `FLOW_*` states. Padding fields here and in other hot-path structs are
    /// integers, not byte arrays: zeroing an odd-sized byte array compiles to a call into
    /// a byte-at-a-time BPF `memset`.
    pub state: u16,
    /// The service's generation when the flow started: an established flow is forwarded
    /// without looking its service up, for as long as `SERVICE_GENERATIONS[service]`
    /// still holds this value (the service was neither removed nor its id reused).
    pub service_generation: u32,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of the last packet: lets user
    /// space tell active from idle flows. Coarse is a cached read; a tick of resolution
    /// is plenty for idle timeouts measured in seconds.
    pub last_seen_ns: u64,
}

/// One fwmark-style rule under a destination prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MarkRule {
    /// Source prefix, pre-masked; all zero with a zero mask matches any source.
    pub src: [u32; 4],
    pub src_mask: [u32; 4],
    /// Destination port range, host order, inclusive.
    pub port_lo: u16,
    pub port_hi: u16,
    /// Zero matches TCP and UDP.
    pub proto: u8,
    pub _pad: [u8; 3],
    pub mark: u32,
}

/// The rules for one destination prefix: the rules of every covering prefix too, flattened
/// in config order by the daemon, because an LPM lookup returns only the longest prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MarkRuleSet {
    pub count: u32,
    pub rules: [MarkRule; MAX_MARK_RULES_PER_PREFIX],
}

/// Key of the VIP address set, consulted only on the slow path of malformed or fragmented
/// packets, to decide whether they were meant for a service (drop) or not (pass).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad8: u8,
    pub _pad16: u16,
}

/// `VIP_ADDRS[addr]`: the port (host order) of the only TCP service on the address, in
/// the low half, and of the only UDP one in the high half, when that service hashes the
/// source alone (`sh`); zero otherwise. A later fragment, which carries no port, of a
/// datagram whose first fragment the director did not see is placed by that service's ring.
pub const fn vip_addr_value(sole_sh_tcp_port: u16, sole_sh_udp_port: u16) -> u32 {
    sole_sh_tcp_port as u32 | (sole_sh_udp_port as u32) << 16
}

/// Fragment-table key: what identifies the fragments of one datagram (RFC 791 / 8200).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// The IPv4 identification (16 bits, host order) or the IPv6 fragment header's (32).
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

/// Where the first fragment of a datagram went: the later ones follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    pub service: u32,
    pub backend: u32,
}

/// Entries of `FRAGMENTS`: datagrams in flight at once (each entry lives until LRU
/// eviction; a datagram's fragments arrive within milliseconds).
pub const FRAGMENT_ENTRIES: u32 = 16384;

/// Data-path switches kept in `CONFIG[0]`, so that work nobody configured costs nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Number of IPv4 / IPv6 mark-rule prefixes; zero skips the trie lookup.
    pub mark_prefixes_v4: u32,
    pub mark_prefixes_v6: u32,
    /// New flows a CPU records per second before it stops recording them (they are
    /// still forwarded by the ring), so that a SYN flood cannot evict established
    /// flows from the connection table. Zero: no limit.
    pub flood_guard_flows_per_sec: u32,
    /// Outer source of IPv4 tunnel headers (network order); zero: none configured.
    pub tunnel_source_v4: u32,
    /// Outer source of IPv6 tunnel headers (network-order words); zero: none configured.
    pub tunnel_source_v6: [u32; 4],
    /// Host bits of the IPv4 tunnel source prefix (network order): each flow's outer
    /// source takes these bits from its hash, so that a real server's RSS spreads
    /// tunnelled flows over its queues. Zero: one source for all.
    pub tunnel_spread_v4: u32,
    /// The same for IPv6, over the source's last word.
    pub tunnel_spread_v6: u32,
}

/// The destination MACs a receiving interface accepts (`LOCAL_MACS[ifindex]`, and
/// `LOCAL_MAC_SLOTS[local_mac_slot(ifindex)]`): frames to any other address are someone
/// else's (the kernel would mark them PACKET_OTHERHOST).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalMacs {
    /// The interface these are for: a slot is shared by every index that folds to it.
    /// Zero in an empty slot (no interface has index zero).
    pub ifindex: u32,
    pub count: u32,
    pub macs: [[u8; 6]; MAX_LOCAL_MACS],
}

/// One CPU's latest clock read (`CLOCK[0]`): a packet in the same tick takes its time
/// from here instead of calling the clock helper again (the tick is read inline).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockCache {
    /// `bpf_jiffies64` at the read.
    pub jiffies: u64,
    /// `bpf_ktime_get_coarse_ns` then.
    pub ns: u64,
}

/// One CPU's new-flow count in the current one-second window (`FLOOD_GUARD[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodWindow {
    /// `bpf_ktime_get_coarse_ns` when the window opened.
    pub start_ns: u64,
    /// New flows seen in the window, recorded or not.
    pub new_flows: u32,
    pub _pad: u32,
}

/// Per service and per backend counters (one copy per CPU, summed by user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl core::ops::Add for Counters {
    type Output = Counters;

    fn add(self, other: Counters) -> Counters {
        Counters {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
            new_flows: self.new_flows + other.new_flows,
        }
    }
}

/// Indices into `GLOBAL_STATS`: XDP action totals, then drops by reason.
pub mod stat {
    pub const ACTION_ABORTED: u32 = 0;
    pub const ACTION_DROP: u32 = 1;
    pub const ACTION_PASS: u32 = 2;
    pub const ACTION_TX: u32 = 3;
    pub const ACTION_REDIRECT: u32 = 4;

    pub const DROP_TRUNCATED: u32 = 8;
    pub const DROP_BAD_IHL: u32 = 9;
    pub const DROP_BAD_LENGTH: u32 = 10;
    /// A later fragment of a service's datagram whose first fragment was not seen, for an
    /// address without a sole `sh` service to place it by (see `FRAG_BY_RING`).
    pub const DROP_FRAGMENT: u32 = 11;
    pub const DROP_BAD_L4_HEADER: u32 = 12;
    pub const DROP_NO_BACKEND: u32 = 13;
    pub const DROP_BACKEND_INVALID: u32 = 14;
    pub const DROP_NO_EGRESS: u32 = 15;
    pub const DROP_IPV6_EXT_CHAIN: u32 = 16;
    /// The version nibble is not the EtherType's (4 under 0x0800, 6 under 0x86dd).
    pub const DROP_BAD_VERSION: u32 = 17;
    pub const DROP_BAD_IP_CHECKSUM: u32 = 18;
    /// UDP length below 8 or beyond the IP payload (the kernel drops both).
    pub const DROP_BAD_UDP_LENGTH: u32 = 19;
    /// IPv4 options that do not parse (an option running past the header, length < 2).
    pub const DROP_BAD_IP_OPTIONS: u32 = 20;
    /// IPv6 routing header type 0 with segments left (deprecated by RFC 5095).
    pub const DROP_IPV6_RH0: u32 = 21;
    /// A source no host may send from: 0/8, 127/8, multicast, limited broadcast, a VIP,
    /// ::, ::1, ff00::/8.
    pub const DROP_MARTIAN_SOURCE: u32 = 22;
    /// No room in front of the frame to push the egress's VLAN tag.
    pub const DROP_NO_HEADROOM: u32 = 23;
    /// An IPv4 packet without DF that the tunnel header would make longer than the way
    /// to the backend allows (fragmenting it would leave the decapsulator pieces).
    pub const DROP_TOO_BIG: u32 = 24;
    /// A packet to a NAT backend, or a NAT backend's reply, whose TTL / hop limit would
    /// reach zero at the director (which routes it, so it decrements it).
    pub const DROP_TTL_EXPIRED: u32 = 25;
    /// A NAT backend's reply for which the director's kernel has no route to the client
    /// (or forwarding is disabled: `net.ipv4.ip_forward`, `net.ipv6.conf.all.forwarding`).
    pub const DROP_NAT_NO_ROUTE: u32 = 26;
    /// A new full-NAT flow for which none of the source ports tried was free toward its
    /// backend (the pool is too small for the flows to that backend port).
    pub const DROP_NAT_NO_PORT: u32 = 27;

    /// New flows of a service with no backend up, passed to the stack (its
    /// `fallback_action` is `pass`).
    pub const PASS_NO_BACKEND: u32 = 32;

    /// New flows forwarded but not recorded because the CPU's new-flow rate was over
    /// `DataplaneConfig::flood_guard_flows_per_sec`.
    pub const FLOWS_UNRECORDED_FLOOD: u32 = 40;

    /// Fragments of services' datagrams: first fragments (scheduled like any packet, then
    /// recorded in `FRAGMENTS`), later ones that followed a recorded first, and later ones
    /// placed by the ring of their address's only `sh` service (their first was not seen).
    /// Later fragments placed by neither are dropped as `fragment`.
    pub const FRAG_FIRST: u32 = 41;
    pub const FRAG_FOLLOWED: u32 = 42;
    pub const FRAG_BY_RING: u32 = 43;

    /// NAT backends' replies translated back to the VIP and sent to the client's next hop.
    pub const NAT_REPLY_SENT: u32 = 44;
    /// Replies translated, then handed to the kernel to forward, because its neighbour
    /// table had no entry for the client's next hop yet (or the reply is longer than that
    /// route's MTU): the kernel resolves it (or answers "too big") where XDP cannot.
    pub const NAT_REPLY_TO_STACK: u32 = 45;

    /// New flows that took the connection-table way of a flow seen in the last
    /// `FLOW_EVICTED_RECENT_NS` (not closed). A few always do (sets fill unevenly); many
    /// mean the table is too small for the traffic.
    pub const FLOWS_EVICTED_RECENT: u32 = 46;

    /// ICMP errors that quote a service's flow, forwarded to that flow's backend (it
    /// answered from the VIP, so the error came back to the director), by kind.
    pub const ICMP_FRAG_NEEDED: u32 = 48;
    pub const ICMP_DEST_UNREACH: u32 = 49;
    pub const ICMP_TIME_EXCEEDED: u32 = 50;
    pub const ICMP_PARAM_PROBLEM: u32 = 51;
    pub const ICMP6_PACKET_TOO_BIG: u32 = 52;
    pub const ICMP6_DEST_UNREACH: u32 = 53;
    pub const ICMP6_TIME_EXCEEDED: u32 = 54;
    pub const ICMP6_PARAM_PROBLEM: u32 = 55;

    /// "Fragmentation needed" / "packet too big" answers the director sent to clients
    /// whose packet did not fit the tunnel to its backend.
    pub const TOO_BIG_SENT_V4: u32 = 56;
    pub const TOO_BIG_SENT_V6: u32 = 57;

    /// Connection events the ring buffer had no room for (the daemon reads too slowly, or
    /// none runs).
    pub const CONN_EVENTS_LOST: u32 = 58;

    pub const COUNT: u32 = 64;

    /// Drop reasons with the names the daemon exports them under.
    pub const DROP_REASONS: [(u32, &str); 20] = [
        (DROP_TRUNCATED, "truncated"),
        (DROP_BAD_IHL, "bad_ihl"),
        (DROP_BAD_LENGTH, "bad_length"),
        (DROP_FRAGMENT, "fragment"),
        (DROP_BAD_L4_HEADER, "bad_l4_header"),
        (DROP_NO_BACKEND, "no_backend"),
        (DROP_BACKEND_INVALID, "backend_invalid"),
        (DROP_NO_EGRESS, "no_egress"),
        (DROP_IPV6_EXT_CHAIN, "ipv6_ext_chain"),
        (DROP_BAD_VERSION, "bad_version"),
        (DROP_BAD_IP_CHECKSUM, "bad_ip_checksum"),
        (DROP_BAD_UDP_LENGTH, "bad_udp_length"),
        (DROP_BAD_IP_OPTIONS, "bad_ip_options"),
        (DROP_IPV6_RH0, "ipv6_rh0"),
        (DROP_MARTIAN_SOURCE, "martian_source"),
        (DROP_NO_HEADROOM, "no_headroom"),
        (DROP_TOO_BIG, "too_big"),
        (DROP_TTL_EXPIRED, "ttl_expired"),
        (DROP_NAT_NO_ROUTE, "nat_no_route"),
        (DROP_NAT_NO_PORT, "nat_no_port"),
    ];

    /// NAT replies translated, by where they went as exported.
    pub const NAT_REPLIES: [(u32, &str); 2] = [(NAT_REPLY_SENT, "sent"), (NAT_REPLY_TO_STACK, "to_stack")];

    /// Fragments forwarded, by outcome as exported.
    pub const FRAGMENTS: [(u32, &str); 3] =
        [(FRAG_FIRST, "first"), (FRAG_FOLLOWED, "followed_first"), (FRAG_BY_RING, "by_ring")];

    /// Too-big answers sent, by family as exported.
    pub const TOO_BIG_SENT: [(u32, &str); 2] = [(TOO_BIG_SENT_V4, "ipv4"), (TOO_BIG_SENT_V6, "ipv6")];

    /// Packets passed to the stack on purpose (not merely "not ours"), by reason.
    pub const PASS_REASONS: [(u32, &str); 1] = [(PASS_NO_BACKEND, "no_backend")];

    /// Forwarded ICMP errors by (counter, family, type) as exported.
    pub const ICMP_FORWARDED: [(u32, &str, &str); 8] = [
        (ICMP_FRAG_NEEDED, "ipv4", "fragmentation_needed"),
        (ICMP_DEST_UNREACH, "ipv4", "destination_unreachable"),
        (ICMP_TIME_EXCEEDED, "ipv4", "time_exceeded"),
        (ICMP_PARAM_PROBLEM, "ipv4", "parameter_problem"),
        (ICMP6_PACKET_TOO_BIG, "ipv6", "packet_too_big"),
        (ICMP6_DEST_UNREACH, "ipv6", "destination_unreachable"),
        (ICMP6_TIME_EXCEEDED, "ipv6", "time_exceeded"),
        (ICMP6_PARAM_PROBLEM, "ipv6", "parameter_problem"),
    ];

    pub const ACTIONS: [(u32, &str); 5] = [
        (ACTION_ABORTED, "aborted"),
        (ACTION_DROP, "drop"),
        (ACTION_PASS, "pass"),
        (ACTION_TX, "tx"),
        (ACTION_REDIRECT, "redirect"),
    ];
}

/// A port of the test switch (`TRUNK_PORTS[ingress ifindex]`): every frame is sent on to
/// `out_ifindex`; with `push_vlan` set IPv4 frames get that 802.1Q tag on the way,
/// otherwise a tag is removed. ARP stays untagged, so the hosts on both sides resolve
/// each other while their IPv4 traffic crosses tagged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrunkPort {
    pub out_ifindex: u32,
    pub push_vlan: u16,
    pub _pad: u16,
}

/// Benchmark driver settings (`BENCH_CFG[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchConfig {
    /// Zero leaves the packet as it is; otherwise run `i` rewrites the TCP source port and
    /// the low half of the IPv4 source address from `i % flows`, so `flows` distinct
    /// 5-tuples are visited in turn.
    pub flows: u32,
    /// Non-zero: a frame that the previous run put in an outer IPv4 header (protocol 4)
    /// loses it first, so that a tunnel service sees the client's packet on every run
    /// (BPF_PROG_TEST_RUN does not restore the frame between runs).
    pub untunnel: u32,
    /// Non-zero: the frame is overwritten with `BENCH_FRAME[0]` first (its
    /// `BENCH_FRAME_LEN` bytes), so that a case whose program rewrites addresses (NAT)
    /// sees the same packet on every run.
    pub restore: u32,
}

/// What the end-to-end benchmark's sink counts as delivered (`SINK_EXPECT[0]`): `proto`
/// (UDP or TCP) to `port` and to one of `addrs` consecutive addresses from `addr`, inside
/// an IPv4-in-IPv4 header addressed to one of `tunnel_dsts` from `tunnel_dst` when that
/// count is not zero (the director's tunnel mode). Addresses and port in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkExpect {
    pub addr: u32,
    pub tunnel_dst: u32,
    pub addrs: u16,
    pub tunnel_dsts: u16,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The end-to-end benchmark's XDP floor (`FLOOR_FWD[0]`): where frames go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloorForward {
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
}

/// Length of the end-to-end generator's frames: the minimum Ethernet frame.
pub const GEN_FRAME_LEN: usize = 64;

/// Length of the frame the benchmark driver restores: Ethernet, IPv4, TCP and 2 bytes of
/// payload, in whole words.
pub const BENCH_FRAME_LEN: usize = 56;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, contain no pointers, and have explicit
    // padding fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::FlowWay {}
    unsafe impl aya::Pod for super::FlowSet {}
    unsafe impl aya::Pod for super::FlowTable {}
    unsafe impl aya::Pod for super::ConnEvent {}
    unsafe impl aya::Pod for super::MarkRule {}
    unsafe impl aya::Pod for super::MarkRuleSet {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::BenchConfig {}
    unsafe impl aya::Pod for super::DataplaneConfig {}
    unsafe impl aya::Pod for super::LocalMacs {}
    unsafe impl aya::Pod for super::FloodWindow {}
    unsafe impl aya::Pod for super::TrunkPort {}
    unsafe impl aya::Pod for super::NatJob {}
    unsafe impl aya::Pod for super::FullNatPool {}
    unsafe impl aya::Pod for super::FullNatSource {}
    unsafe impl aya::Pod for super::SinkExpect {}
    unsafe impl aya::Pod for super::FloorForward {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The sizes are part of the kernel/user contract: a field added without its padding
    // shows up here before it shows up as a map that never matches.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<Service>(), 24);
        assert_eq!(size_of::<Backend>(), 44);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Flow>(), 24);
        assert_eq!(size_of::<FlowWay>(), 64, "a way is a cache line");
        assert_eq!(core::mem::offset_of!(FlowWay, flow), 40);
        assert_eq!(size_of::<FlowSet>(), 64 * FLOW_WAYS as usize);
        assert_eq!(size_of::<FlowTable>(), 8);
        assert_eq!(size_of::<MarkRule>(), 44);
        assert_eq!(size_of::<MarkRuleSet>(), 4 + 8 * 44);
        assert_eq!(size_of::<AddrKey>(), 20);
        assert_eq!(size_of::<Counters>(), 24);
        assert_eq!(size_of::<DataplaneConfig>(), 40);
        assert_eq!(size_of::<LocalMacs>(), 8 + 6 * MAX_LOCAL_MACS);
        assert_eq!(size_of::<FloodWindow>(), 16);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FragEntry>(), 8);
        assert_eq!(size_of::<NatJob>(), 40 + 16);
        assert_eq!(size_of::<FullNatPool>(), 28);
        assert_eq!(size_of::<FullNatSource>(), 20);
    }
}
