//! The only module that touches BPF: loads the embedded XDP object, attaches it, and makes
//! its maps equal to a [`DataplaneState`] by writing only what differs from the last apply.
//!
//! Order of writes, so that no packet ever meets a backend that is not there: backends
//! first, then rings, then the service values, and removals last. A ring of the same size
//! changes in place, slot by slot and only where it differs (as Katran's `programHashRing`
//! does): each slot is stored whole, so a packet in between is scheduled on the slot's old
//! backend or its new one. A new ring, or one of another size, is written into a window of
//! its own, which the service value then points at (one map update, swapped in whole).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, ProgramArray,
        lpm_trie::{Key, LpmTrie},
        xdp::XdpMapError,
    },
    programs::{
        ProgramError, Xdp,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    AddrKey, Backend, Counters, DEFAULT_FLOW_ENTRIES, DEFAULT_RING_SLOTS, DataplaneConfig, FAMILY_V4,
    FAMILY_V6, FLOW_WAYS, FloodWindow, Flow, FlowKey, FlowTable, FullNatPool, LocalMacs, MAP_LAYOUT_VERSION,
    MAX_ATTACHED_INTERFACES, MAX_BACKENDS, MAX_LOCAL_MACS, MAX_SERVICES, MarkRuleSet, Service, ServiceKey,
    departed_stats_slot, hash::vip_filter_slot, local_mac_slot, maps, programs, stat,
};

mod apply;
mod array_mapping;
mod attach;
mod counters;
pub mod decap;
mod events;
mod flow_memory;
pub mod probe;
mod ring_memory;
mod rings;

pub use counters::CounterReader;
pub use events::ConnEventReader;
pub use flow_memory::FlowReader;
use ring_memory::RingMemory;
use rings::{RingSpace, Window};

use crate::model::XdpMode;
use crate::plan::{AdoptedIds, DataplaneState, ServiceState};

/// The XDP object built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object")]
    Load(#[from] aya::EbpfError),
    #[error("{what} must be between 1 and {max}, not {value}")]
    Size { what: &'static str, value: u32, max: u32 },
    #[error("mapping the ring array into memory")]
    RingMemory(#[source] std::io::Error),
    #[error("mapping the connection table into memory")]
    FlowMemory(#[source] std::io::Error),
    #[error(
        "the connection table's size must be a power of two of at least {FLOW_WAYS} flows (it is {FLOW_WAYS}-way set-associative), not {0}"
    )]
    FlowEntries(u32),
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
    #[error("interface {ifindex}: {count} accepted MACs, at most {MAX_LOCAL_MACS}")]
    TooManyMacs { ifindex: u32, count: usize },
    #[error("{count} interfaces with accepted MACs, at most {MAX_ATTACHED_INTERFACES}")]
    TooManyInterfaces { count: usize },
    #[error("{path} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },
    #[error("{path}")]
    Pin { path: PathBuf, source: std::io::Error },
    #[error("pinning the XDP link of {iface} at {path}: {reason}")]
    PinLink { iface: String, path: PathBuf, reason: String },
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// Sizes fixed when the maps are created, and where they live.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Total Maglev slots for all services; each service needs twice its ring size.
    pub ring_slots: u32,
    /// Connection-table entries.
    pub flow_entries: u32,
    /// Pin maps and XDP links under this bpffs directory, adopting what a previous daemon
    /// left there. `None`: everything lives and dies with the [`Dataplane`].
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { ring_slots: DEFAULT_RING_SLOTS, flow_entries: DEFAULT_FLOW_ENTRIES, pin_dir: None }
    }
}

/// Maps a restarted daemon adopts. The benchmark maps are left out: they are per process.
const PINNED_MAPS: &[&str] = &[
    maps::SERVICES,
    maps::SERVICE_GENERATIONS,
    maps::BACKENDS,
    maps::RINGS,
    maps::FLOWS,
    maps::FLOW_TABLE,
    maps::MARK_RULES_V4,
    maps::MARK_RULES_V6,
    maps::VIP_ADDRS,
    maps::EGRESS,
    maps::BACKEND_STATS,
    maps::GLOBAL_STATS,
    maps::VIP_FILTER,
    maps::CONFIG,
    maps::WRR_CURSORS,
    maps::LOCAL_MACS,
    maps::LOCAL_MAC_SLOTS,
    maps::FLOOD_GUARD,
    maps::FRAGMENTS,
    maps::NAT_REPLIES,
    // Pinned, its slot outlives the process (a prog array is emptied when its last user
    // reference goes): a killed daemon's data path goes on translating replies.
    maps::NAT_PROGRAMS,
    // Shared by an old balancer and a new translator while an upgrade swaps programs.
    maps::NAT_JOBS,
    maps::FULLNAT_POOL,
    maps::FULLNAT_SOURCES,
    maps::NAT_SOURCE_FILTER,
];

/// The `NAT_SOURCE_FILTER` slots of the NAT backends among `backends`.
fn nat_source_slots(backends: &BTreeMap<u32, Backend>) -> BTreeSet<u32> {
    backends
        .values()
        .filter(|b| b.nat != 0)
        .map(|b| vip_filter_slot(&b.addr, b.family == FAMILY_V6))
        .collect()
}

/// Where pinned maps and links live under a pin directory.
fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("maps-v{MAP_LAYOUT_VERSION}"))
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn require_bpffs(path: &Path) -> Result<()> {
    let stat = nix::sys::statfs::statfs(path)
        .map_err(|e| DataplaneError::Pin { path: path.to_owned(), source: std::io::Error::from(e) })?;
    if stat.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(DataplaneError::NotBpffs { path: path.to_owned() });
    }
    Ok(())
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| DataplaneError::Pin { path: path.to_owned(), source })
}

/// What `load` found and made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Maps came from a previous daemon (their contents were read back).
    pub adopted: bool,
    /// Sizes of the maps in use, which for adopted maps are those they were created with.
    pub ring_slots: u32,
    pub flow_entries: u32,
}

/// What [`Dataplane::attach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new link.
    New,
    /// A link pinned by a previous daemon now runs this process's program.
    TookOver,
    /// This process had attached it already.
    Already,
}

trait AyaMode {
    fn aya(self) -> aya::programs::XdpMode;
}

impl AyaMode for XdpMode {
    fn aya(self) -> aya::programs::XdpMode {
        match self {
            XdpMode::Native => aya::programs::XdpMode::Driver,
            XdpMode::Generic => aya::programs::XdpMode::Skb,
        }
    }
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

/// What was last written for one service.
#[derive(Debug)]
struct AppliedService {
    state: ServiceState,
    /// The window the `Service` value points at.
    live: Window,
    generation: u32,
}

/// What `apply_services` needs to know of a service's last applied state.
#[derive(Clone, Copy)]
struct Current {
    unchanged: bool,
    same_ring: bool,
    live: Window,
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
    /// `VIP_ADDRS` as written: address -> sole source-hashed ports.
    vip_addrs: BTreeMap<AddrKey, u32>,
    vip_slots: BTreeSet<u32>,
    egress: BTreeSet<u32>,
    local_macs: BTreeMap<u32, LocalMacs>,
    /// `LOCAL_MAC_SLOTS` as written: the slots that are not empty.
    local_mac_slots: BTreeMap<u32, LocalMacs>,
    config: DataplaneConfig,
    /// Whether `NAT_PROGRAMS` holds this process's translators; `None` until the first
    /// apply (pinned slots may hold an earlier daemon's).
    nat_slots: Option<bool>,
    /// `FULLNAT_POOL[0]` as this process wrote it; `None` until the first apply.
    fullnat_pool: Option<FullNatPool>,
    /// `NAT_SOURCE_FILTER` slots set (those of the NAT backends' addresses).
    nat_source_slots: BTreeSet<u32>,
    /// Last service generation handed out (never zero once used).
    last_generation: u32,
    /// `RINGS`, mapped into this process.
    ring_memory: RingMemory,
    ring_slots_written: u64,
    pin_dir: Option<PathBuf>,
    /// Links this process attached or adopted, by interface. Their pins keep them after
    /// the process ends; dropping one whose pin is gone detaches it.
    links: BTreeMap<String, FdLink>,
    report: LoadReport,
}

/// The XDP program `name` of `ebpf`.
fn xdp<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a Xdp> {
    ebpf.program(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// Loads the XDP program `name` of `ebpf` into the kernel (the verifier runs here).
fn load_xdp(ebpf: &mut Ebpf, name: &'static str) -> Result<()> {
    xdp_mut(ebpf, name)?.load().map_err(|source| DataplaneError::Program { name, source })
}

/// Gives a connection table of `sets` sets its hash seed and set mask, unless it has them
/// already (adopted: a new seed would lose every flow recorded under the old one).
fn init_flow_table(ebpf: &mut Ebpf, sets: u32) -> Result<()> {
    use std::hash::BuildHasher as _;
    let mut map: Array<&mut MapData, FlowTable> = map_mut(ebpf, maps::FLOW_TABLE)?;
    let current = map.get(&0, 0).map_err(map_err(maps::FLOW_TABLE))?;
    if current.set_mask == sets - 1 && current.seed != 0 {
        return Ok(());
    }
    // The standard library's hasher keys come from the OS's random source.
    let seed = (std::collections::hash_map::RandomState::new().hash_one(std::process::id()) as u32).max(1);
    map.set(0, FlowTable { seed, set_mask: sets - 1 }, 0).map_err(map_err(maps::FLOW_TABLE))
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

impl Dataplane {
    /// Loads the object and every program in it into the kernel; attaches nothing. With a
    /// pin directory, maps a previous daemon pinned there are adopted with their contents
    /// (connection table included), and what they hold becomes the base of the next apply.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        use crate::model::{MAX_FLOW_ENTRIES, MAX_RING_SLOTS};
        for (what, value, max) in [
            ("ring slots", opts.ring_slots, MAX_RING_SLOTS),
            ("flow entries", opts.flow_entries, MAX_FLOW_ENTRIES),
        ] {
            if value == 0 || value > max {
                return Err(DataplaneError::Size { what, value, max });
            }
        }
        if !opts.flow_entries.is_power_of_two() || opts.flow_entries < FLOW_WAYS {
            return Err(DataplaneError::FlowEntries(opts.flow_entries));
        }
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(maps::RINGS, opts.ring_slots)
            .map_max_entries(maps::FLOWS, opts.flow_entries / FLOW_WAYS)
            .map_max_entries(maps::NAT_REPLIES, opts.flow_entries)
            .map_max_entries(maps::FULLNAT_SOURCES, opts.flow_entries);
        let mut adopted = false;
        if let Some(dir) = &opts.pin_dir {
            // Checked on the closest existing ancestor first: mkdir on, say, a sysfs
            // without bpffs mounted only says "No such file or directory".
            let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
            require_bpffs(existing).map_err(|_| DataplaneError::NotBpffs { path: dir.clone() })?;
            create_dir(dir)?;
            let maps_dir = maps_dir(dir);
            create_dir(&maps_dir)?;
            create_dir(&links_dir(dir))?;
            adopted = maps_dir.join(maps::SERVICES).exists();
            for name in PINNED_MAPS {
                loader.map_pin_path(name, maps_dir.join(name));
            }
        }
        let mut ebpf = loader.load(OBJECT)?;
        for name in programs::ALL {
            load_xdp(&mut ebpf, name)?;
        }
        let capacity = |ebpf: &Ebpf, name: &'static str| -> Result<u32> {
            let map = ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
            let info = match map {
                aya::maps::Map::Array(m) | aya::maps::Map::LruHashMap(m) => m.info(),
                _ => return Err(DataplaneError::MissingMap(name)),
            };
            Ok(info.map_err(map_err(name))?.max_entries())
        };
        let report = LoadReport {
            adopted,
            ring_slots: capacity(&ebpf, maps::RINGS)?,
            flow_entries: capacity(&ebpf, maps::FLOWS)? * FLOW_WAYS,
        };
        init_flow_table(&mut ebpf, report.flow_entries / FLOW_WAYS)?;
        let ring_memory = {
            let map = ebpf.map(maps::RINGS).ok_or(DataplaneError::MissingMap(maps::RINGS))?;
            let aya::maps::Map::Array(data) = map else {
                return Err(DataplaneError::MissingMap(maps::RINGS));
            };
            RingMemory::map(data, report.ring_slots)?
        };
        let mut dp = Dataplane {
            ebpf,
            rings: RingSpace::new(report.ring_slots),
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            mark_prefixes: BTreeMap::new(),
            vip_addrs: BTreeMap::new(),
            vip_slots: BTreeSet::new(),
            egress: BTreeSet::new(),
            local_macs: BTreeMap::new(),
            local_mac_slots: BTreeMap::new(),
            config: DataplaneConfig::default(),
            nat_slots: None,
            fullnat_pool: None,
            nat_source_slots: BTreeSet::new(),
            last_generation: 0,
            // Pinned maps may be an earlier daemon's, whatever was adopted: only a map this
            // process created without pinning is known to be zero.
            ring_memory,
            ring_slots_written: 0,
            pin_dir: opts.pin_dir.clone(),
            links: BTreeMap::new(),
            report,
        };
        if adopted {
            dp.adopt()?;
        }
        Ok(dp)
    }

    /// What `load` found: adopted or fresh maps, and their sizes.
    pub fn load_report(&self) -> &LoadReport {
        &self.report
    }

    /// Rebuilds the bookkeeping of the last apply from adopted maps, so that the next apply
    /// writes only what differs from what the previous daemon left.
    fn adopt(&mut self) -> Result<()> {
        let services: Vec<(ServiceKey, Service)> = {
            let map: HashMap<&MapData, ServiceKey, Service> = map_ref(&self.ebpf, maps::SERVICES)?;
            map.iter().collect::<std::result::Result<_, _>>().map_err(map_err(maps::SERVICES))?
        };
        {
            for (key, svc) in services {
                let live = Window { offset: svc.ring_offset, size: svc.ring_size };
                let ring = self.read_window(live)?;
                self.rings.reserve(live)?;
                self.services.insert(
                    key,
                    AppliedService {
                        state: ServiceState {
                            id: svc.id,
                            flags: svc.flags,
                            ring,
                            log_one_in: svc.log_one_in,
                        },
                        live,
                        generation: svc.generation,
                    },
                );
            }
        }
        let gens: Array<&MapData, u32> = map_ref(&self.ebpf, maps::SERVICE_GENERATIONS)?;
        for id in 0..MAX_SERVICES {
            let g = gens.get(&id, 0).map_err(map_err(maps::SERVICE_GENERATIONS))?;
            self.last_generation = self.last_generation.max(g);
        }
        let backends: Array<&MapData, Backend> = map_ref(&self.ebpf, maps::BACKENDS)?;
        for id in 0..MAX_BACKENDS {
            let b = backends.get(&id, 0).map_err(map_err(maps::BACKENDS))?;
            // A removed backend is left zeroed apart from its down state.
            if b.family != 0 {
                self.backends.insert(id, b);
            }
        }
        let vips: HashMap<&MapData, AddrKey, u32> = map_ref(&self.ebpf, maps::VIP_ADDRS)?;
        self.vip_addrs =
            vips.iter().collect::<std::result::Result<_, _>>().map_err(map_err(maps::VIP_ADDRS))?;
        self.vip_slots =
            self.vip_addrs.keys().map(|k| vip_filter_slot(&k.addr, k.family == FAMILY_V6)).collect();
        self.nat_source_slots = nat_source_slots(&self.backends);
        let v4: LpmTrie<&MapData, u32, MarkRuleSet> = map_ref(&self.ebpf, maps::MARK_RULES_V4)?;
        for entry in v4.iter() {
            let (key, rules) = entry.map_err(map_err(maps::MARK_RULES_V4))?;
            self.mark_prefixes.insert((FAMILY_V4, [key.data(), 0, 0, 0], key.prefix_len() as u8), rules);
        }
        let v6: LpmTrie<&MapData, [u32; 4], MarkRuleSet> = map_ref(&self.ebpf, maps::MARK_RULES_V6)?;
        for entry in v6.iter() {
            let (key, rules) = entry.map_err(map_err(maps::MARK_RULES_V6))?;
            self.mark_prefixes.insert((FAMILY_V6, key.data(), key.prefix_len() as u8), rules);
        }
        let egress: DevMapHash<&MapData> = map_ref(&self.ebpf, maps::EGRESS)?;
        self.egress = egress.keys().collect::<std::result::Result<_, _>>().map_err(map_err(maps::EGRESS))?;
        let cfg: Array<&MapData, DataplaneConfig> = map_ref(&self.ebpf, maps::CONFIG)?;
        self.config = cfg.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        let macs: HashMap<&MapData, u32, LocalMacs> = map_ref(&self.ebpf, maps::LOCAL_MACS)?;
        self.local_macs =
            macs.iter().collect::<std::result::Result<_, _>>().map_err(map_err(maps::LOCAL_MACS))?;
        let slots: Array<&MapData, LocalMacs> = map_ref(&self.ebpf, maps::LOCAL_MAC_SLOTS)?;
        self.local_mac_slots = (0..MAX_ATTACHED_INTERFACES)
            .zip(slots.iter())
            .map(|(slot, value)| value.map(|v| (slot, v)))
            .filter(|entry| !matches!(entry, Ok((_, v)) if v.ifindex == 0))
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(maps::LOCAL_MAC_SLOTS))?;
        Ok(())
    }

    /// Where adopted backends were being sent (MAC, interface), by address: until the
    /// neighbour table confirms or changes it, a restart keeps forwarding there rather
    /// than taking a backend down because its ARP entry happened to be absent.
    pub fn adopted_neighbours(&self) -> std::collections::HashMap<std::net::IpAddr, crate::model::Neighbour> {
        self.backends
            .values()
            .filter(|b| b.dst_mac != [0; 6] && b.ifindex != 0)
            .filter_map(|b| {
                let addr = crate::model::addr_of(b.family, &b.addr)?;
                Some((
                    addr,
                    crate::model::Neighbour {
                        mac: b.dst_mac,
                        ifindex: b.ifindex,
                        if_mac: b.src_mac,
                        vlan: b.vlan,
                        mtu: b.mtu,
                    },
                ))
            })
            .collect()
    }

    /// Service and backend ids found in adopted maps (empty for fresh ones).
    pub fn adopted_ids(&self) -> AdoptedIds {
        let by_id: BTreeMap<u32, ServiceKey> = self.services.iter().map(|(k, s)| (s.state.id, *k)).collect();
        AdoptedIds {
            services: self.services.iter().map(|(k, s)| (*k, s.state.id)).collect(),
            backends: self
                .backends
                .iter()
                .filter_map(|(id, b)| Some((*by_id.get(&(b.service as u32))?, b.family, b.addr, *id)))
                .collect(),
            serving: self
                .backends
                .values()
                .filter(|b| b.state == lb_common::BACKEND_UP)
                .filter_map(|b| Some((*by_id.get(&(b.service as u32))?, b.family, b.addr)))
                .collect(),
        }
    }

    /// A loaded program, for attaching elsewhere or for `BPF_PROG_TEST_RUN`.
    pub fn program(&self, name: &'static str) -> Result<&Xdp> {
        xdp(&self.ebpf, name)
    }

    fn program_mut(&mut self, name: &'static str) -> Result<&mut Xdp> {
        xdp_mut(&mut self.ebpf, name)
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
    fn the_production_object_holds_no_test_or_benchmark_program() {
        let has = |name: &str| OBJECT.windows(name.len()).any(|w| w == name.as_bytes());
        assert!(has(programs::BALANCER) && has(maps::FLOWS), "the search finds what is there");
        use lb_common::test_object::{maps as test_maps, programs as test_programs};
        for name in [
            test_programs::FLOOR,
            test_programs::BENCH_DRIVER,
            test_programs::TEST_TRUNK,
            test_maps::BENCH_CFG,
            test_maps::BENCH_TARGET,
            test_maps::TRUNK_PORTS,
        ] {
            assert!(!has(name), "{name} is in the object every director loads");
        }
    }
}
