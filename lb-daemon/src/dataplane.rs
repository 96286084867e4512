//! The only module that touches BPF: loads the embedded XDP object, attaches it, and makes
//! its maps equal to a [`DataplaneState`] by writing only what differs from the last apply.
//!
//! Order of writes, so that no packet ever sees a half-built service: backends first, then
//! each changed ring into the service's idle window, then the service value that points at
//! it (one map update, which the kernel swaps in whole), and removals last.

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, ProgramArray,
        lpm_trie::{Key, LpmTrie},
        xdp::XdpMapError,
    },
    programs::{ProgramError, Xdp},
};
use lb_common::{
    AddrKey, Backend, BenchConfig, Counters, DEFAULT_FLOW_ENTRIES, DEFAULT_RING_SLOTS, DataplaneConfig,
    FAMILY_V4, FAMILY_V6, Flow, FlowKey, MAX_BACKENDS, MAX_SERVICES, MarkRuleSet, Service, ServiceKey,
    hash::vip_filter_slot, maps, programs, stat,
};

/// The XDP object built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object")]
    Load(#[from] aya::EbpfError),
    #[error("{what} must be between 1 and {max}, not {value}")]
    Size { what: &'static str, value: u32, max: u32 },
    #[error("program {name}")]
    Program { name: &'static str, source: ProgramError },
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("map {map}")]
    Map { map: &'static str, source: MapError },
    #[error("attaching to interface {iface}")]
    Attach { iface: String, source: ProgramError },
    #[error("no room for a ring of {size} slots (ring capacity {capacity}, {free} free)")]
    RingSpace { size: u32, capacity: u32, free: u32 },
    #[error("egress interface {ifindex}: {reason}")]
    Egress { ifindex: u32, reason: String },
    #[error("{what} id {id} is out of range (max {max})")]
    IdRange { what: &'static str, id: u32, max: u32 },
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// Sizes fixed when the maps are created.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Total Maglev slots for all services; each service needs twice its ring size.
    pub ring_slots: u32,
    /// Connection-table entries.
    pub flow_entries: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { ring_slots: DEFAULT_RING_SLOTS, flow_entries: DEFAULT_FLOW_ENTRIES }
    }
}

/// XDP attach mode, as an operator names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver, before an skb exists (the fast path).
    Native,
    /// After the skb is built: works on any interface, for tests and odd NICs.
    Generic,
}

impl XdpMode {
    fn aya(self) -> aya::programs::XdpMode {
        match self {
            XdpMode::Native => aya::programs::XdpMode::Driver,
            XdpMode::Generic => aya::programs::XdpMode::Skb,
        }
    }
}

/// One service as the data path should see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceState {
    /// Index of the service's counters; stable across applies.
    pub id: u32,
    pub flags: u32,
    /// Maglev ring (backend ids); its length is the ring size. Empty: no backend available.
    pub ring: Vec<u32>,
}

/// A fwmark-style rule as written into the tries. `dst` addresses are network-order words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkPrefix {
    pub family: u8,
    pub addr: [u32; 4],
    pub prefix_len: u8,
    pub rules: MarkRuleSet,
}

/// Everything the maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataplaneState {
    pub services: BTreeMap<ServiceKey, ServiceState>,
    pub backends: BTreeMap<u32, Backend>,
    pub mark_prefixes: Vec<MarkPrefix>,
    /// Interfaces that packets may be redirected to.
    pub egress_ifindexes: BTreeSet<u32>,
}

/// How many map writes an apply made, for logs and tests of minimal updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub services_written: usize,
    pub services_removed: usize,
    pub rings_written: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    pub mark_prefixes_written: usize,
    pub mark_prefixes_removed: usize,
}

/// A window of the shared ring array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    offset: u32,
    size: u32,
}

/// First-fit allocator over the ring array; services keep two windows each.
#[derive(Debug)]
struct RingSpace {
    capacity: u32,
    /// Free windows by offset, coalesced.
    free: BTreeMap<u32, u32>,
}

impl RingSpace {
    fn new(capacity: u32) -> Self {
        RingSpace { capacity, free: BTreeMap::from([(0, capacity)]) }
    }

    fn alloc(&mut self, size: u32) -> Result<Window> {
        if size == 0 {
            return Ok(Window { offset: 0, size: 0 });
        }
        let found = self.free.iter().find(|(_, len)| **len >= size).map(|(o, l)| (*o, *l));
        let Some((offset, len)) = found else {
            let free = self.free.values().sum();
            return Err(DataplaneError::RingSpace { size, capacity: self.capacity, free });
        };
        self.free.remove(&offset);
        if len > size {
            self.free.insert(offset + size, len - size);
        }
        Ok(Window { offset, size })
    }

    fn release(&mut self, w: Window) {
        if w.size == 0 {
            return;
        }
        let mut offset = w.offset;
        let mut size = w.size;
        if let Some((&o, &l)) = self.free.range(..offset).next_back()
            && o + l == offset
        {
            self.free.remove(&o);
            offset = o;
            size += l;
        }
        if let Some(&l) = self.free.get(&(w.offset + w.size)) {
            self.free.remove(&(w.offset + w.size));
            size += l;
        }
        self.free.insert(offset, size);
    }
}

/// What was last written for one service.
#[derive(Debug)]
struct AppliedService {
    state: ServiceState,
    /// The window the live `Service` value points at, and the idle one.
    live: Window,
    idle: Window,
    generation: u32,
}

/// What `apply_services` needs to know of a service's last applied state.
#[derive(Clone, Copy)]
struct Current {
    unchanged: bool,
    same_id: bool,
    same_ring: bool,
    live: Window,
    idle: Window,
    generation: u32,
}

fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

fn map_ref<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<&'a aya::maps::Map, Error = MapError>,
{
    let map = ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// The loaded, possibly attached, data path.
pub struct Dataplane {
    ebpf: Ebpf,
    rings: RingSpace,
    services: BTreeMap<ServiceKey, AppliedService>,
    backends: BTreeMap<u32, Backend>,
    mark_prefixes: BTreeMap<(u8, [u32; 4], u8), MarkRuleSet>,
    vip_addrs: BTreeSet<AddrKey>,
    vip_slots: BTreeSet<u32>,
    egress: BTreeSet<u32>,
    config: DataplaneConfig,
    /// Last service generation handed out (never zero once used).
    last_generation: u32,
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

impl Dataplane {
    /// Loads the object and every program in it into the kernel; attaches nothing.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        // Beyond these the kernel answers a bare EINVAL or ENOMEM.
        const MAX_RING_SLOTS: u32 = 1 << 26;
        const MAX_FLOW_ENTRIES: u32 = 1 << 28;
        for (what, value, max) in [
            ("ring slots", opts.ring_slots, MAX_RING_SLOTS),
            ("flow entries", opts.flow_entries, MAX_FLOW_ENTRIES),
        ] {
            if value == 0 || value > max {
                return Err(DataplaneError::Size { what, value, max });
            }
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::RINGS, opts.ring_slots)
            .map_max_entries(maps::FLOWS, opts.flow_entries)
            .load(OBJECT)?;
        for name in [programs::BALANCER, programs::PASS, programs::FLOOR, programs::BENCH_DRIVER] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            prog.load().map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(Dataplane {
            ebpf,
            rings: RingSpace::new(opts.ring_slots),
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            mark_prefixes: BTreeMap::new(),
            vip_addrs: BTreeSet::new(),
            vip_slots: BTreeSet::new(),
            egress: BTreeSet::new(),
            config: DataplaneConfig::default(),
            last_generation: 0,
        })
    }

    /// A loaded program, for attaching elsewhere or for `BPF_PROG_TEST_RUN`.
    pub fn program(&self, name: &'static str) -> Result<&Xdp> {
        self.ebpf
            .program(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    fn program_mut(&mut self, name: &'static str) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Attaches the balancer to `iface` (resolved in the calling thread's network namespace).
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        self.attach_program(programs::BALANCER, iface, mode)
    }

    /// Attaches the pass-through program: the peer of a veth that receives redirected
    /// frames needs one before the kernel delivers them.
    pub fn attach_pass_through(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        self.attach_program(programs::PASS, iface, mode)
    }

    fn attach_program(&mut self, name: &'static str, iface: &str, mode: XdpMode) -> Result<()> {
        let prog = self.program_mut(name)?;
        // The program owns the link: it stays attached for as long as this Dataplane lives.
        prog.attach(iface, mode.aya())
            .map_err(|source| DataplaneError::Attach { iface: iface.to_owned(), source })?;
        Ok(())
    }

    /// Makes the maps equal to `desired`, writing only the differences.
    pub fn apply(&mut self, desired: &DataplaneState) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        self.add_egress(&desired.egress_ifindexes)?;
        self.apply_backends(desired, &mut report)?;
        self.apply_services(desired, &mut report)?;
        self.apply_vip_addrs(desired)?;
        self.apply_mark_prefixes(desired, &mut report)?;
        self.remove_backends(desired, &mut report)?;
        self.remove_egress(&desired.egress_ifindexes)?;
        Ok(report)
    }

    /// New egress interfaces go in before any backend refers to them.
    fn add_egress(&mut self, wanted: &BTreeSet<u32>) -> Result<()> {
        let new: Vec<u32> = wanted.difference(&self.egress).copied().collect();
        let mut map: DevMapHash<&mut MapData> = map_mut(&mut self.ebpf, maps::EGRESS)?;
        for ifindex in new {
            map.insert(ifindex, ifindex, None, 0).map_err(|e| match e {
                XdpMapError::MapError(source) => DataplaneError::Map { map: maps::EGRESS, source },
                other => DataplaneError::Egress { ifindex, reason: other.to_string() },
            })?;
            self.egress.insert(ifindex);
        }
        Ok(())
    }

    /// Old ones leave after no backend refers to them any more.
    fn remove_egress(&mut self, wanted: &BTreeSet<u32>) -> Result<()> {
        let gone: Vec<u32> = self.egress.difference(wanted).copied().collect();
        let mut map: DevMapHash<&mut MapData> = map_mut(&mut self.ebpf, maps::EGRESS)?;
        for ifindex in gone {
            match map.remove(ifindex) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::EGRESS)(e)),
            }
            self.egress.remove(&ifindex);
        }
        Ok(())
    }

    fn apply_backends(&mut self, desired: &DataplaneState, report: &mut ApplyReport) -> Result<()> {
        let mut changed = Vec::new();
        for (&id, b) in &desired.backends {
            if id >= MAX_BACKENDS {
                return Err(DataplaneError::IdRange { what: "backend", id, max: MAX_BACKENDS - 1 });
            }
            if self.backends.get(&id) != Some(b) {
                changed.push((id, *b));
            }
        }
        let mut map: Array<&mut MapData, Backend> = map_mut(&mut self.ebpf, maps::BACKENDS)?;
        for (id, b) in changed {
            map.set(id, b, 0).map_err(map_err(maps::BACKENDS))?;
            self.backends.insert(id, b);
            report.backends_written += 1;
        }
        Ok(())
    }

    /// Backends leave after the services that referenced them have stopped doing so. The
    /// array slot is marked down rather than zeroed, so a flow still pointing at it is
    /// rescheduled instead of being sent to a zero MAC.
    fn remove_backends(&mut self, desired: &DataplaneState, report: &mut ApplyReport) -> Result<()> {
        let gone: Vec<u32> =
            self.backends.keys().filter(|id| !desired.backends.contains_key(id)).copied().collect();
        let mut map: Array<&mut MapData, Backend> = map_mut(&mut self.ebpf, maps::BACKENDS)?;
        for id in gone {
            let down = Backend { state: lb_common::BACKEND_DOWN, ..Default::default() };
            map.set(id, down, 0).map_err(map_err(maps::BACKENDS))?;
            self.backends.remove(&id);
            report.backends_removed += 1;
        }
        Ok(())
    }

    fn apply_services(&mut self, desired: &DataplaneState, report: &mut ApplyReport) -> Result<()> {
        for (key, want) in &desired.services {
            if want.id >= MAX_SERVICES {
                return Err(DataplaneError::IdRange { what: "service", id: want.id, max: MAX_SERVICES - 1 });
            }
            let size = want.ring.len() as u32;
            // Bookkeeping changes only once the maps did: a failed apply leaves it true.
            let current = self.services.get(key).map(|c| Current {
                unchanged: c.state == *want,
                same_id: c.state.id == want.id,
                same_ring: c.state.ring == want.ring,
                live: c.live,
                idle: c.idle,
                generation: c.generation,
            });
            // Established flows follow a service through ring, weight and flag changes;
            // a new service, or one moved to another id, starts a new generation so that
            // flows recorded under the old one are scheduled afresh.
            let generation = match current {
                Some(c) if c.same_id => c.generation,
                _ => {
                    self.last_generation = self.last_generation.wrapping_add(1).max(1);
                    let mut gens: Array<&mut MapData, u32> =
                        map_mut(&mut self.ebpf, maps::SERVICE_GENERATIONS)?;
                    gens.set(want.id, self.last_generation, 0).map_err(map_err(maps::SERVICE_GENERATIONS))?;
                    self.last_generation
                }
            };
            // Windows of the new size are all taken before anything is given back, and old
            // ones are given back only once the service points elsewhere: a failure at any
            // step leaves the maps and this bookkeeping as they were.
            let (live, idle, retired) = match current {
                Some(c) if c.unchanged => continue,
                // Only the flags (or the id) changed: the live ring stays.
                Some(c) if c.same_ring => (c.live, c.idle, Vec::new()),
                Some(c) => {
                    let (target, spare) = self.take_windows(size, [c.idle, c.live])?;
                    if let Err(e) = self.write_ring(target, &want.ring) {
                        self.give_back([(target, c.idle), (spare, c.live)]);
                        return Err(e);
                    }
                    report.rings_written += 1;
                    // Flip: the old live window becomes the idle one, if it fits.
                    let retired = [(c.idle, target), (c.live, spare)]
                        .into_iter()
                        .filter(|(old, new)| old != new)
                        .map(|(old, _)| old)
                        .collect();
                    (target, spare, retired)
                }
                None => {
                    let empty = Window { offset: 0, size: 0 };
                    let (target, spare) = self.take_windows(size, [empty, empty])?;
                    if let Err(e) = self.write_ring(target, &want.ring) {
                        self.give_back([(target, empty), (spare, empty)]);
                        return Err(e);
                    }
                    report.rings_written += 1;
                    (target, spare, Vec::new())
                }
            };
            let value = Service {
                id: want.id,
                ring_offset: live.offset,
                ring_size: size,
                flags: want.flags,
                generation,
                _pad: 0,
            };
            let mut map: HashMap<&mut MapData, ServiceKey, Service> =
                map_mut(&mut self.ebpf, maps::SERVICES)?;
            map.insert(*key, value, 0).map_err(map_err(maps::SERVICES))?;
            report.services_written += 1;
            for w in retired {
                self.rings.release(w);
            }
            self.services.insert(*key, AppliedService { state: want.clone(), live, idle, generation });
        }
        let gone: Vec<ServiceKey> =
            self.services.keys().filter(|k| !desired.services.contains_key(k)).copied().collect();
        for key in gone {
            let mut map: HashMap<&mut MapData, ServiceKey, Service> =
                map_mut(&mut self.ebpf, maps::SERVICES)?;
            match map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::SERVICES)(e)),
            }
            if let Some(old) = self.services.remove(&key) {
                self.rings.release(old.live);
                self.rings.release(old.idle);
                // Unless another service took the id in this apply, retire its flows.
                if !self.services.values().any(|s| s.state.id == old.state.id) {
                    let mut gens: Array<&mut MapData, u32> =
                        map_mut(&mut self.ebpf, maps::SERVICE_GENERATIONS)?;
                    gens.set(old.state.id, 0, 0).map_err(map_err(maps::SERVICE_GENERATIONS))?;
                }
            }
            report.services_removed += 1;
        }
        Ok(())
    }

    /// Two windows of `size` slots, reusing `current` ones of that size (which no packet
    /// reads from once the flip is done) and allocating the others. All or nothing.
    fn take_windows(&mut self, size: u32, current: [Window; 2]) -> Result<(Window, Window)> {
        let first = if current[0].size == size { current[0] } else { self.rings.alloc(size)? };
        let second = if current[1].size == size {
            current[1]
        } else {
            match self.rings.alloc(size) {
                Ok(w) => w,
                Err(e) => {
                    self.give_back([(first, current[0])]);
                    return Err(e);
                }
            }
        };
        Ok((first, second))
    }

    /// Returns windows `take_windows` allocated (those that differ from what they replaced).
    fn give_back<const N: usize>(&mut self, taken: [(Window, Window); N]) {
        for (new, old) in taken {
            if new != old {
                self.rings.release(new);
            }
        }
    }

    fn write_ring(&mut self, w: Window, ring: &[u32]) -> Result<()> {
        let mut map: Array<&mut MapData, u32> = map_mut(&mut self.ebpf, maps::RINGS)?;
        for (i, &backend) in ring.iter().enumerate() {
            map.set(w.offset + i as u32, backend, 0).map_err(map_err(maps::RINGS))?;
        }
        Ok(())
    }

    fn apply_vip_addrs(&mut self, desired: &DataplaneState) -> Result<()> {
        let wanted: BTreeSet<AddrKey> = desired
            .services
            .keys()
            .filter(|k| k.kind != lb_common::KIND_MARK)
            .map(|k| AddrKey { addr: k.addr, family: k.kind, _pad8: 0, _pad16: 0 })
            .collect();
        let mut map: HashMap<&mut MapData, AddrKey, u32> = map_mut(&mut self.ebpf, maps::VIP_ADDRS)?;
        for k in wanted.difference(&self.vip_addrs) {
            map.insert(*k, 1, 0).map_err(map_err(maps::VIP_ADDRS))?;
        }
        for k in self.vip_addrs.difference(&wanted) {
            match map.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::VIP_ADDRS)(e)),
            }
        }
        // Slots for new VIPs are set here, after their services were written; stale slots
        // are cleared after their services left: the filter never hides a live service.
        let slots: BTreeSet<u32> =
            wanted.iter().map(|k| vip_filter_slot(&k.addr, k.family == FAMILY_V6)).collect();
        let mut filter: Array<&mut MapData, u8> = map_mut(&mut self.ebpf, maps::VIP_FILTER)?;
        for &slot in slots.difference(&self.vip_slots) {
            filter.set(slot, 1, 0).map_err(map_err(maps::VIP_FILTER))?;
        }
        for &slot in self.vip_slots.difference(&slots) {
            filter.set(slot, 0, 0).map_err(map_err(maps::VIP_FILTER))?;
        }
        self.vip_slots = slots;
        self.vip_addrs = wanted;
        Ok(())
    }

    fn apply_mark_prefixes(&mut self, desired: &DataplaneState, report: &mut ApplyReport) -> Result<()> {
        let wanted: BTreeMap<(u8, [u32; 4], u8), MarkRuleSet> =
            desired.mark_prefixes.iter().map(|p| ((p.family, p.addr, p.prefix_len), p.rules)).collect();
        for (&(family, addr, len), rules) in &wanted {
            if self.mark_prefixes.get(&(family, addr, len)) == Some(rules) {
                continue;
            }
            if family == FAMILY_V4 {
                let mut map: LpmTrie<&mut MapData, u32, MarkRuleSet> =
                    map_mut(&mut self.ebpf, maps::MARK_RULES_V4)?;
                map.insert(&Key::new(len as u32, addr[0]), rules, 0).map_err(map_err(maps::MARK_RULES_V4))?;
            } else {
                let mut map: LpmTrie<&mut MapData, [u32; 4], MarkRuleSet> =
                    map_mut(&mut self.ebpf, maps::MARK_RULES_V6)?;
                map.insert(&Key::new(len as u32, addr), rules, 0).map_err(map_err(maps::MARK_RULES_V6))?;
            }
            report.mark_prefixes_written += 1;
        }
        let gone: Vec<(u8, [u32; 4], u8)> =
            self.mark_prefixes.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for (family, addr, len) in gone {
            let res = if family == FAMILY_V4 {
                let mut map: LpmTrie<&mut MapData, u32, MarkRuleSet> =
                    map_mut(&mut self.ebpf, maps::MARK_RULES_V4)?;
                map.remove(&Key::new(len as u32, addr[0]))
            } else {
                let mut map: LpmTrie<&mut MapData, [u32; 4], MarkRuleSet> =
                    map_mut(&mut self.ebpf, maps::MARK_RULES_V6)?;
                map.remove(&Key::new(len as u32, addr))
            };
            match res {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::MARK_RULES_V4)(e)),
            }
            report.mark_prefixes_removed += 1;
        }
        // Enable the trie lookups only once the tries hold what they should.
        let count = |f| wanted.keys().filter(|(family, _, _)| *family == f).count() as u32;
        let cfg = DataplaneConfig { mark_prefixes_v4: count(FAMILY_V4), mark_prefixes_v6: count(FAMILY_V6) };
        if cfg != self.config {
            let mut map: Array<&mut MapData, DataplaneConfig> = map_mut(&mut self.ebpf, maps::CONFIG)?;
            map.set(0, cfg, 0).map_err(map_err(maps::CONFIG))?;
            self.config = cfg;
        }
        self.mark_prefixes = wanted;
        Ok(())
    }

    fn sum_counters(&self, name: &'static str, id: u32) -> Result<Counters> {
        let map: PerCpuArray<&MapData, Counters> = map_ref(&self.ebpf, name)?;
        let per_cpu = map.get(&id, 0).map_err(map_err(name))?;
        Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
            new_flows: a.new_flows + c.new_flows,
        }))
    }

    /// A service's counters summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        self.sum_counters(maps::SERVICE_STATS, id)
    }

    /// A backend's counters summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        self.sum_counters(maps::BACKEND_STATS, id)
    }

    /// XDP action totals and drops by reason (`lb_common::stat` indices), summed over CPUs.
    pub fn global_counters(&self) -> Result<[u64; stat::COUNT as usize]> {
        let map: PerCpuArray<&MapData, u64> = map_ref(&self.ebpf, maps::GLOBAL_STATS)?;
        let mut out = [0u64; stat::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = map.get(&(i as u32), 0).map_err(map_err(maps::GLOBAL_STATS))?.iter().sum();
        }
        Ok(out)
    }

    /// A snapshot of the connection table.
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let map: HashMap<&MapData, FlowKey, Flow> = map_ref(&self.ebpf, maps::FLOWS)?;
        map.iter().collect::<std::result::Result<_, _>>().map_err(map_err(maps::FLOWS))
    }

    /// Points the benchmark driver at `target` and sets how many flows it cycles through.
    pub fn configure_bench_driver(&mut self, target: &'static str, flows: u32) -> Result<()> {
        let fd =
            self.program(target)?.fd().map_err(|source| DataplaneError::Program { name: target, source })?;
        let fd = fd
            .try_clone()
            .map_err(|e| DataplaneError::Program { name: target, source: ProgramError::IOError(e) })?;
        let mut targets: ProgramArray<&mut MapData> = map_mut(&mut self.ebpf, maps::BENCH_TARGET)?;
        targets.set(0, &fd, 0).map_err(map_err(maps::BENCH_TARGET))?;
        let mut cfg: Array<&mut MapData, BenchConfig> = map_mut(&mut self.ebpf, maps::BENCH_CFG)?;
        cfg.set(0, BenchConfig { flows, _pad: 0 }, 0).map_err(map_err(maps::BENCH_CFG))
    }
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("services", &self.services.len())
            .field("backends", &self.backends.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_space_allocates_and_coalesces() {
        let mut s = RingSpace::new(100);
        let a = s.alloc(30).unwrap();
        let b = s.alloc(30).unwrap();
        let c = s.alloc(30).unwrap();
        assert_eq!((a.offset, b.offset, c.offset), (0, 30, 60));
        assert!(matches!(s.alloc(11), Err(DataplaneError::RingSpace { free: 10, .. })));
        s.release(b);
        s.release(a);
        assert_eq!(s.alloc(60).unwrap().offset, 0, "freed neighbours merge");
        s.release(c);
        s.release(Window { offset: 0, size: 60 });
        assert_eq!(s.free, BTreeMap::from([(0, 100)]));
    }
}
