//! The only module that touches BPF: loads the embedded XDP object, attaches it, and makes
//! its maps equal to a [`DataplaneState`] by writing only what differs from the last apply.
//!
//! Order of writes, so that no packet ever sees a half-built service: backends first, then
//! each changed ring into the service's idle window, then the service value that points at
//! it (one map update, which the kernel swaps in whole), and removals last.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray,
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
    FAMILY_V6, FloodWindow, Flow, FlowKey, LocalMacs, MAP_LAYOUT_VERSION, MAX_ATTACHED_INTERFACES,
    MAX_BACKENDS, MAX_LOCAL_MACS, MAX_SERVICES, MarkRuleSet, Service, ServiceKey, hash::vip_filter_slot,
    maps, programs, stat,
};

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
    maps::MARK_RULES_V4,
    maps::MARK_RULES_V6,
    maps::VIP_ADDRS,
    maps::EGRESS,
    maps::SERVICE_STATS,
    maps::BACKEND_STATS,
    maps::GLOBAL_STATS,
    maps::VIP_FILTER,
    maps::CONFIG,
    maps::WRR_CURSORS,
    maps::LOCAL_MACS,
    maps::FLOOD_GUARD,
];

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

    /// Marks `w` as taken (an adopted service's live ring).
    fn reserve(&mut self, w: Window) -> Result<()> {
        if w.size == 0 {
            return Ok(());
        }
        let found = self.free.range(..=w.offset).next_back().map(|(o, l)| (*o, *l));
        match found {
            Some((o, l)) if o + l >= w.offset + w.size => {
                self.free.remove(&o);
                if w.offset > o {
                    self.free.insert(o, w.offset - o);
                }
                if o + l > w.offset + w.size {
                    self.free.insert(w.offset + w.size, o + l - w.offset - w.size);
                }
                Ok(())
            }
            _ => Err(DataplaneError::RingSpace {
                size: w.size,
                capacity: self.capacity,
                free: self.free.values().sum(),
            }),
        }
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

/// The possible CPUs, which per-CPU maps hold a value for each of; an error is `map`'s.
fn possible_cpus(map: &'static str) -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| map_err(map)(MapError::IoError(e)))
}

/// Visits the entries of a connection table; returns how many there were.
fn walk_flows<T: std::borrow::Borrow<MapData>>(
    map: &HashMap<T, FlowKey, Flow>,
    mut visit: impl FnMut(&FlowKey, &Flow),
) -> Result<u64> {
    let mut n = 0;
    for entry in map.iter() {
        match entry {
            Ok((k, f)) => {
                visit(&k, &f);
                n += 1;
            }
            // An entry evicted between the key walk and its lookup.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(maps::FLOWS)(e)),
        }
    }
    Ok(n)
}

/// The connection table, readable on its own (see [`Dataplane::flow_reader`]).
pub struct FlowReader {
    flows: HashMap<MapData, FlowKey, Flow>,
    /// Possible CPUs: each holds `capacity / cpus` entries of the table.
    cpus: u32,
}

impl FlowReader {
    pub fn for_each(&self, visit: impl FnMut(&FlowKey, &Flow)) -> Result<u64> {
        walk_flows(&self.flows, visit)
    }

    /// CPUs the kernel splits the table's LRU lists over.
    pub fn cpus(&self) -> u32 {
        self.cpus
    }
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
    local_macs: BTreeMap<u32, LocalMacs>,
    config: DataplaneConfig,
    /// Last service generation handed out (never zero once used).
    last_generation: u32,
    /// What each slot of `RINGS` holds, as far as known: zero in a map this process
    /// created, unknown (`None`) in a pinned one but for the live rings adoption read and
    /// the slots written since.
    ring_shadow: Vec<Option<u32>>,
    ring_slots_written: u64,
    pin_dir: Option<PathBuf>,
    /// Links this process attached or adopted, by interface. Their pins keep them after
    /// the process ends; dropping one whose pin is gone detaches it.
    links: BTreeMap<String, FdLink>,
    report: LoadReport,
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
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(maps::RINGS, opts.ring_slots).map_max_entries(maps::FLOWS, opts.flow_entries);
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
        for name in [programs::BALANCER, programs::PASS] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            prog.load().map_err(|source| DataplaneError::Program { name, source })?;
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
            flow_entries: capacity(&ebpf, maps::FLOWS)?,
        };
        let mut dp = Dataplane {
            ebpf,
            rings: RingSpace::new(report.ring_slots),
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            mark_prefixes: BTreeMap::new(),
            vip_addrs: BTreeSet::new(),
            vip_slots: BTreeSet::new(),
            egress: BTreeSet::new(),
            local_macs: BTreeMap::new(),
            config: DataplaneConfig::default(),
            last_generation: 0,
            // Pinned maps may be an earlier daemon's, whatever was adopted: only a map this
            // process created without pinning is known to be zero.
            ring_shadow: vec![
                if opts.pin_dir.is_none() { Some(0) } else { None };
                report.ring_slots as usize
            ],
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
            let rings: Array<&MapData, u32> = map_ref(&self.ebpf, maps::RINGS)?;
            for (key, svc) in services {
                let live = Window { offset: svc.ring_offset, size: svc.ring_size };
                let ring = (svc.ring_offset..svc.ring_offset + svc.ring_size)
                    .map(|i| rings.get(&i, 0))
                    .collect::<std::result::Result<Vec<u32>, _>>()
                    .map_err(map_err(maps::RINGS))?;
                for (i, &backend) in ring.iter().enumerate() {
                    if let Some(s) = self.ring_shadow.get_mut(svc.ring_offset as usize + i) {
                        *s = Some(backend);
                    }
                }
                self.rings.reserve(live)?;
                self.services.insert(
                    key,
                    AppliedService {
                        state: ServiceState { id: svc.id, flags: svc.flags, ring },
                        live,
                        // The old idle window is unknown (nothing points at it): the next
                        // ring change takes a fresh one.
                        idle: Window { offset: 0, size: 0 },
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
            vips.keys().collect::<std::result::Result<_, _>>().map_err(map_err(maps::VIP_ADDRS))?;
        self.vip_slots =
            self.vip_addrs.iter().map(|k| vip_filter_slot(&k.addr, k.family == FAMILY_V6)).collect();
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
    ///
    /// With a pin directory the link is pinned, and a link a previous daemon pinned for
    /// `iface` is taken over by swapping this program into it (`bpf_link_update`): the
    /// interface never runs without a balancer.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<Attached> {
        let Some(dir) = self.pin_dir.clone() else {
            self.attach_program(programs::BALANCER, iface, mode)?;
            return Ok(Attached::New);
        };
        if self.links.contains_key(iface) {
            return Ok(Attached::Already);
        }
        let pin = links_dir(&dir).join(iface);
        let link_err =
            |reason: String| DataplaneError::PinLink { iface: iface.to_owned(), path: pin.clone(), reason };
        let prog = self.program_mut(programs::BALANCER)?;
        let mut reused = false;
        let id = match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let fd: FdLink = pinned.into();
                match XdpLink::try_from(fd)
                    .map_err(|e| crate::error_chain(&e))
                    .and_then(|link| prog.attach_to_link(link).map_err(|e| crate::error_chain(&e)))
                {
                    Ok(id) => {
                        reused = true;
                        Some(id)
                    }
                    Err(reason) => {
                        // The interface went away (and maybe came back): its old link is
                        // defunct. Attach afresh.
                        tracing::warn!(iface, %reason, "pinned XDP link is unusable, attaching anew");
                        std::fs::remove_file(&pin)
                            .map_err(|source| DataplaneError::Pin { path: pin.clone(), source })?;
                        None
                    }
                }
            }
            Err(_) => None,
        };
        let id = match id {
            Some(id) => id,
            None => prog
                .attach(iface, mode.aya())
                .map_err(|source| DataplaneError::Attach { iface: iface.to_owned(), source })?,
        };
        let link = prog
            .take_link(id)
            .map_err(|source| DataplaneError::Attach { iface: iface.to_owned(), source })?;
        let fd = FdLink::try_from(link)
            .map_err(|e| link_err(format!("{e} (the kernel offers no bpf_link for XDP)")))?;
        let fd = if reused { fd } else { fd.pin(&pin).map_err(|e| link_err(crate::error_chain(&e)))?.into() };
        self.links.insert(iface.to_owned(), fd);
        Ok(if reused { Attached::TookOver } else { Attached::New })
    }

    /// Interfaces with a link pinned under the pin directory (attached by any daemon run).
    pub fn pinned_interfaces(&self) -> Vec<String> {
        let Some(dir) = &self.pin_dir else { return Vec::new() };
        std::fs::read_dir(links_dir(dir))
            .map(|rd| rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default()
    }

    /// Removes every pin under `pin_dir`: links first (the interfaces stop balancing), then
    /// the maps (freed once no program uses them). For `lb-daemon detach`.
    pub fn remove_pins(pin_dir: &Path) -> Result<Vec<String>> {
        let mut detached = Vec::new();
        for dir in [links_dir(pin_dir), maps_dir(pin_dir)] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(DataplaneError::Pin { path: dir, source }),
            };
            for entry in entries {
                let entry = entry.map_err(|source| DataplaneError::Pin { path: dir.clone(), source })?;
                std::fs::remove_file(entry.path())
                    .map_err(|source| DataplaneError::Pin { path: entry.path(), source })?;
                if dir.ends_with("links") {
                    detached.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
            std::fs::remove_dir(&dir).map_err(|source| DataplaneError::Pin { path: dir.clone(), source })?;
        }
        // Only if empty: anything else in there is not ours to delete.
        let _ = std::fs::remove_dir(pin_dir);
        Ok(detached)
    }

    /// Removes the balancer from `iface`: unpins its link, whichever daemon attached it.
    pub fn detach(&mut self, iface: &str) -> Result<()> {
        let Some(dir) = &self.pin_dir else { return Ok(()) };
        let pin = links_dir(dir).join(iface);
        self.links.remove(iface);
        match std::fs::remove_file(&pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DataplaneError::Pin { path: pin, source }),
        }
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
        self.apply_local_macs(desired)?;
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
                other => DataplaneError::Egress { ifindex, reason: crate::error_chain(&other) },
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
        for (id, b) in changed {
            // A new owner of the id starts from zero, not from its predecessor's counts.
            let same_owner =
                self.backends.get(&id).is_some_and(|old| old.addr == b.addr && old.service == b.service);
            if !same_owner {
                self.zero_counters(maps::BACKEND_STATS, id)?;
            }
            let mut map: Array<&mut MapData, Backend> = map_mut(&mut self.ebpf, maps::BACKENDS)?;
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
                    self.zero_counters(maps::SERVICE_STATS, want.id)?;
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

    /// Writes `ring` into window `w`: only the slots whose value differs from what the
    /// shadow says they hold. A window reused for a service's next ring holds its ring
    /// before last, and Maglev moves few slots between neighbouring rings, so a weight or
    /// health change writes about the slots that changed, not the whole ring.
    fn write_ring(&mut self, w: Window, ring: &[u32]) -> Result<()> {
        let mut map: Array<&mut MapData, u32> = map_mut(&mut self.ebpf, maps::RINGS)?;
        for (i, &backend) in ring.iter().enumerate() {
            let slot = w.offset + i as u32;
            let shadow = self.ring_shadow.get_mut(slot as usize);
            if shadow.as_deref() == Some(&Some(backend)) {
                continue;
            }
            map.set(slot, backend, 0).map_err(map_err(maps::RINGS))?;
            // Kept true slot by slot, so that a failed write leaves it right.
            if let Some(s) = shadow {
                *s = Some(backend);
            }
            self.ring_slots_written += 1;
        }
        Ok(())
    }

    /// Ring slots written since the data path was loaded (for tests of minimal updates).
    pub fn ring_slots_written(&self) -> u64 {
        self.ring_slots_written
    }

    /// The ring a service's packets are scheduled on now, read back from the map.
    pub fn live_ring(&self, key: &ServiceKey) -> Result<Vec<u32>> {
        let Some(applied) = self.services.get(key) else { return Ok(Vec::new()) };
        let rings: Array<&MapData, u32> = map_ref(&self.ebpf, maps::RINGS)?;
        let w = applied.live;
        (w.offset..w.offset + w.size).map(|i| rings.get(&i, 0).map_err(map_err(maps::RINGS))).collect()
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
        let cfg = DataplaneConfig {
            mark_prefixes_v4: count(FAMILY_V4),
            mark_prefixes_v6: count(FAMILY_V6),
            flood_guard_flows_per_sec: desired.flood_guard_flows_per_sec,
            _pad: 0,
        };
        if cfg != self.config {
            let mut map: Array<&mut MapData, DataplaneConfig> = map_mut(&mut self.ebpf, maps::CONFIG)?;
            map.set(0, cfg, 0).map_err(map_err(maps::CONFIG))?;
            self.config = cfg;
        }
        self.mark_prefixes = wanted;
        Ok(())
    }

    /// Writes the accepted MACs of every interface that has some, and removes the others.
    fn apply_local_macs(&mut self, desired: &DataplaneState) -> Result<()> {
        if desired.local_macs.len() > MAX_ATTACHED_INTERFACES as usize {
            return Err(DataplaneError::TooManyInterfaces { count: desired.local_macs.len() });
        }
        let mut wanted = BTreeMap::new();
        for (&ifindex, macs) in &desired.local_macs {
            if macs.len() > MAX_LOCAL_MACS {
                return Err(DataplaneError::TooManyMacs { ifindex, count: macs.len() });
            }
            let mut value = LocalMacs { count: macs.len() as u32, ..Default::default() };
            for (slot, mac) in value.macs.iter_mut().zip(macs) {
                *slot = *mac;
            }
            wanted.insert(ifindex, value);
        }
        let mut map: HashMap<&mut MapData, u32, LocalMacs> = map_mut(&mut self.ebpf, maps::LOCAL_MACS)?;
        for (ifindex, value) in &wanted {
            if self.local_macs.get(ifindex) != Some(value) {
                map.insert(ifindex, value, 0).map_err(map_err(maps::LOCAL_MACS))?;
            }
        }
        for ifindex in self.local_macs.keys().filter(|i| !wanted.contains_key(i)) {
            match map.remove(ifindex) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::LOCAL_MACS)(e)),
            }
        }
        self.local_macs = wanted;
        Ok(())
    }

    /// How many CPUs have recorded more new flows in their current one-second window than
    /// the flood guard allows (`now_ns`: CLOCK_MONOTONIC_COARSE, as the data path reads).
    pub fn flood_guard_active_cpus(&self, now_ns: u64) -> Result<u32> {
        let limit = self.config.flood_guard_flows_per_sec;
        if limit == 0 {
            return Ok(0);
        }
        let map: PerCpuArray<&MapData, FloodWindow> = map_ref(&self.ebpf, maps::FLOOD_GUARD)?;
        let windows = map.get(&0, 0).map_err(map_err(maps::FLOOD_GUARD))?;
        // A window that ended more than a second ago says nothing about now.
        let current = |w: &FloodWindow| now_ns.saturating_sub(w.start_ns) < 2_000_000_000;
        Ok(windows.iter().filter(|w| current(w) && w.new_flows > limit).count() as u32)
    }

    fn zero_counters(&mut self, name: &'static str, id: u32) -> Result<()> {
        let cpus = possible_cpus(name)?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![Counters::default(); cpus])
            .map_err(|e| map_err(name)(MapError::IoError(e)))?;
        let mut map: PerCpuArray<&mut MapData, Counters> = map_mut(&mut self.ebpf, name)?;
        map.set(id, zeros, 0).map_err(map_err(name))
    }

    /// A handle of its own on the connection table, for walking it without the
    /// `Dataplane` (and whatever lock guards it): a walk of a million entries takes about
    /// a second.
    pub fn flow_reader(&self) -> Result<FlowReader> {
        let map = self.ebpf.map(maps::FLOWS).ok_or(DataplaneError::MissingMap(maps::FLOWS))?;
        let aya::maps::Map::LruHashMap(data) = map else {
            return Err(map_err(maps::FLOWS)(MapError::InvalidName { name: maps::FLOWS.into() }));
        };
        let fd =
            data.fd().as_fd().try_clone_to_owned().map_err(|e| map_err(maps::FLOWS)(MapError::IoError(e)))?;
        let own = MapData::from_fd(fd).map_err(map_err(maps::FLOWS))?;
        let map = aya::maps::Map::from_map_data(own).map_err(map_err(maps::FLOWS))?;
        let flows = HashMap::try_from(map).map_err(map_err(maps::FLOWS))?;
        Ok(FlowReader { flows, cpus: possible_cpus(maps::FLOWS)? as u32 })
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
