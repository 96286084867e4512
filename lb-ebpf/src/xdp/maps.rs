//! Every map of the object. Sizes are defaults; the daemon may override them at load time.
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use lb_common::{
    AddrKey, BACKEND_STATS_ENTRIES, Backend, CONN_EVENTS_BYTES, ClockCache, Counters, DEFAULT_FLOW_ENTRIES,
    DEFAULT_RING_SLOTS, DataplaneConfig, FLOW_WAYS, FRAGMENT_ENTRIES, FloodWindow, FlowKey, FlowSet,
    FlowTable, FragEntry, FragKey, FullNatPool, FullNatSource, LocalMacs, MAX_ATTACHED_INTERFACES,
    MAX_BACKENDS, MAX_EGRESS_INTERFACES, MAX_MARK_PREFIXES, MAX_SERVICES, MarkRuleSet, NatJob, Service,
    ServiceKey, hash::VIP_FILTER_SLOTS, stat,
};

/// Per-CPU LRU lists (the NAT tables): no cross-CPU lock on insert, at the price of each
/// CPU evicting from its own share of the table (flows stay on one CPU through RSS anyway).
const BPF_F_NO_COMMON_LRU: u32 = 2;

#[map]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Service id -> generation of the service holding that id now; zero: none.
#[map]
pub static SERVICE_GENERATIONS: Array<u32> = Array::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// All Maglev rings, back to back (`BPF_F_MMAPABLE`: the daemon maps them, as the
/// connection table, into its memory); each service owns two windows and flips between them.
#[map]
pub static RINGS: Array<u32> = Array::with_max_entries(DEFAULT_RING_SLOTS, BPF_F_MMAPABLE);

/// The connection table (see `lb_common::FlowSet`): `DEFAULT_FLOW_ENTRIES / FLOW_WAYS`
/// sets by default, the daemon sizes it. Mapped by the daemon, which reads it as memory.
#[map]
pub static FLOWS: Array<FlowSet> = Array::with_max_entries(DEFAULT_FLOW_ENTRIES / FLOW_WAYS, BPF_F_MMAPABLE);

/// `FLOW_TABLE[0]`: the connection table's hash seed and set mask.
#[map]
pub static FLOW_TABLE: Array<FlowTable> = Array::with_max_entries(1, 0);

/// Destination prefix (IPv4 address bytes) -> the fwmark rules that apply under it.
#[map]
pub static MARK_RULES_V4: LpmTrie<u32, MarkRuleSet> = LpmTrie::with_max_entries(MAX_MARK_PREFIXES, 0);

#[map]
pub static MARK_RULES_V6: LpmTrie<[u32; 4], MarkRuleSet> = LpmTrie::with_max_entries(MAX_MARK_PREFIXES, 0);

/// Datagram (first fragment) -> where it went, for its later fragments. One LRU for all
/// CPUs: a NIC may hash a datagram's first fragment (with ports) and the later ones
/// (without) to different queues.
#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FragEntry> = LruHashMap::with_max_entries(FRAGMENT_ENTRIES, 0);

/// Addresses of exact-match services, for deciding whether a malformed packet was ours;
/// the value: see `lb_common::vip_addr_value`.
#[map]
pub static VIP_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Egress interfaces for XDP_REDIRECT, keyed by ifindex.
#[map]
pub static EGRESS: DevMapHash = DevMapHash::with_max_entries(MAX_EGRESS_INTERFACES, 0);

/// Per backend id: what was sent to it. Past `MAX_BACKENDS`: see `lb_common::BACKEND_STATS_ENTRIES`.
#[map]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(BACKEND_STATS_ENTRIES, 0);

#[map]
pub static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Non-zero where some exact-match VIP folds to the slot (`hash::vip_filter_slot`):
/// lets packets for no VIP skip the service hash lookup with one inlined array load.
#[map]
pub static VIP_FILTER: Array<u8> = Array::with_max_entries(VIP_FILTER_SLOTS, 0);

/// Per CPU and service id: the next round-robin slot of a `wrr` service.
#[map]
pub static WRR_CURSORS: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
pub static CONFIG: Array<DataplaneConfig> = Array::with_max_entries(1, 0);

/// Receiving ifindex -> the destination MACs that make a frame the director's.
#[map]
pub static LOCAL_MACS: HashMap<u32, LocalMacs> = HashMap::with_max_entries(MAX_ATTACHED_INTERFACES, 0);

/// The same by `lb_common::local_mac_slot(ifindex)`, for the interface with the lowest
/// index among those that fold to a slot: an array lookup is inlined, where the hash's
/// costs about a fifth of an established packet's time. Empty (`ifindex` zero) only where
/// no registered interface folds.
#[map]
pub static LOCAL_MAC_SLOTS: Array<LocalMacs> = Array::with_max_entries(MAX_ATTACHED_INTERFACES, 0);

/// Per CPU: the latest clock read (`conntrack::now`).
#[map]
pub static CLOCK: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the current one-second window of new flows, for the flood guard.
#[map]
pub static FLOOD_GUARD: PerCpuArray<FloodWindow> = PerCpuArray::with_max_entries(1, 0);

/// A NAT backend's reply (its 5-tuple as the backend sends it) -> the flow's key as the
/// client sends it. Sized as `FLOWS` by default, whose entries it mirrors.
#[map]
pub static NAT_REPLIES: LruHashMap<FlowKey, FlowKey> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, BPF_F_NO_COMMON_LRU);

/// The NAT translators the balancer tail-calls (`programs::NAT_REPLY_SLOT`,
/// `NAT_FORWARD_SLOT`, `NAT_ICMP_SLOT`, and `NAT_FULL_REPLY_SLOT` which the reply one calls), filled while some backend is a NAT one. With the reply slot empty
/// the tail call falls through and a packet that is not a service's passes.
#[map]
pub static NAT_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(4, 0);

/// Per CPU: the balancer's decision for the packet it hands to `lb_nat_forward`.
#[map]
pub static NAT_JOBS: PerCpuArray<NatJob> = PerCpuArray::with_max_entries(1, 0);

/// `FULLNAT_POOL[0]`: the director's full-NAT source addresses.
#[map]
pub static FULLNAT_POOL: Array<FullNatPool> = Array::with_max_entries(1, 0);

/// A full-NAT flow (as the client sends it) -> the pool address and port it goes to its
/// backend from. Sized as `FLOWS` by default.
#[map]
pub static FULLNAT_SOURCES: LruHashMap<FlowKey, FullNatSource> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, BPF_F_NO_COMMON_LRU);

/// Non-zero where some NAT backend's address folds to the slot (`hash::vip_filter_slot`):
/// a packet that is no service's goes to the reply translator only when its source may be
/// a NAT backend, so the rest of the traffic pays one array load, not a tail call, a parse
/// and a hash lookup.
#[map]
pub static NAT_SOURCE_FILTER: Array<u8> = Array::with_max_entries(VIP_FILTER_SLOTS, 0);

/// New flows of services that log them (`Service::log_one_in`), for the daemon's
/// connection log. A full buffer loses the event, counted (`stat::CONN_EVENTS_LOST`).
#[map]
pub static CONN_EVENTS: RingBuf = RingBuf::with_byte_size(CONN_EVENTS_BYTES, 0);
