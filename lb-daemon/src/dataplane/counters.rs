//! Reading back: counters, the connection table (also from outside the daemon's lock,
//! through a [`FlowReader`]) and the flood guard's state.

use super::flow_memory::FlowReader;
use super::*;

/// The possible CPUs, which per-CPU maps hold a value for each of; an error is `map`'s.
pub(super) fn possible_cpus(map: &'static str) -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| map_err(map)(MapError::IoError(e)))
}

fn sum_counters<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, Counters>,
    name: &'static str,
    id: u32,
) -> Result<Counters> {
    let per_cpu = map.get(&id, 0).map_err(map_err(name))?;
    Ok(per_cpu.iter().fold(Counters::default(), |a, c| a + *c))
}

fn global_counters<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, u64>,
) -> Result<[u64; stat::COUNT as usize]> {
    let mut out = [0u64; stat::COUNT as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = map.get(&(i as u32), 0).map_err(map_err(maps::GLOBAL_STATS))?.iter().sum();
    }
    Ok(out)
}

/// The service, backend and global counters, readable on their own (see
/// [`Dataplane::counter_reader`]).
pub struct CounterReader {
    backends: PerCpuArray<MapData, Counters>,
    global: PerCpuArray<MapData, u64>,
}

impl CounterReader {
    /// What the backends that left service `id` had counted; the service's counters are
    /// this plus its current backends' (`lb_common::BACKEND_STATS_ENTRIES`).
    pub fn departed(&self, id: u32) -> Result<Counters> {
        sum_counters(&self.backends, maps::BACKEND_STATS, departed_stats_slot(id))
    }

    pub fn backend(&self, id: u32) -> Result<Counters> {
        sum_counters(&self.backends, maps::BACKEND_STATS, id)
    }

    pub fn global(&self) -> Result<[u64; stat::COUNT as usize]> {
        global_counters(&self.global)
    }
}

impl Dataplane {
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

    /// Zeroes `BACKEND_STATS[slot]` (a backend id, or a service's departed slot).
    pub(super) fn zero_counters(&mut self, slot: u32) -> Result<()> {
        self.set_counters(slot, vec![Counters::default(); possible_cpus(maps::BACKEND_STATS)?])
    }

    fn set_counters(&mut self, slot: u32, per_cpu: Vec<Counters>) -> Result<()> {
        let name = maps::BACKEND_STATS;
        let values =
            aya::maps::PerCpuValues::try_from(per_cpu).map_err(|e| map_err(name)(MapError::IoError(e)))?;
        let mut map: PerCpuArray<&mut MapData, Counters> = map_mut(&mut self.ebpf, name)?;
        map.set(slot, values, 0).map_err(map_err(name))
    }

    /// Moves what backend `id` counted into `service`'s departed slot, so that the
    /// service's counters stay as they were when the backend leaves or its id goes to
    /// another (the data path must no longer count under the id as its old owner's).
    pub(super) fn retire_backend_counters(&mut self, id: u32, service: u32) -> Result<()> {
        let name = maps::BACKEND_STATS;
        let slot = departed_stats_slot(service);
        let map: PerCpuArray<&MapData, Counters> = map_ref(&self.ebpf, name)?;
        let (gone, kept) =
            (map.get(&id, 0).map_err(map_err(name))?, map.get(&slot, 0).map_err(map_err(name))?);
        let sum = kept.iter().zip(gone.iter()).map(|(k, g)| *k + *g).collect();
        // A reader between the two writes sees the backend's counts twice; the daemon's
        // readers drop what they read while an apply moved ids (`ids_epoch`), and a
        // backend's counts retire only in such an apply (it left, or its id changed hands).
        self.set_counters(slot, sum)?;
        self.zero_counters(id)
    }

    /// A mapping of its own of the connection table, for walking it without the
    /// `Dataplane` (and whatever lock guards it).
    pub fn flow_reader(&self) -> Result<FlowReader> {
        let map = self.ebpf.map(maps::FLOWS).ok_or(DataplaneError::MissingMap(maps::FLOWS))?;
        let aya::maps::Map::Array(data) = map else {
            return Err(map_err(maps::FLOWS)(MapError::InvalidName { name: maps::FLOWS.into() }));
        };
        FlowReader::map(data, self.report.flow_entries / FLOW_WAYS)
    }

    /// A service's counters summed over CPUs: its departed backends' and its current ones'.
    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        let map: PerCpuArray<&MapData, Counters> = map_ref(&self.ebpf, maps::BACKEND_STATS)?;
        let mut total = sum_counters(&map, maps::BACKEND_STATS, departed_stats_slot(id))?;
        for (bid, _) in self.backends.iter().filter(|(_, b)| b.service as u32 == id) {
            total = total + sum_counters(&map, maps::BACKEND_STATS, *bid)?;
        }
        Ok(total)
    }

    /// A backend's counters summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        sum_counters(&map_ref(&self.ebpf, maps::BACKEND_STATS)?, maps::BACKEND_STATS, id)
    }

    /// XDP action totals and drops by reason (`lb_common::stat` indices), summed over CPUs.
    pub fn global_counters(&self) -> Result<[u64; stat::COUNT as usize]> {
        global_counters(&map_ref(&self.ebpf, maps::GLOBAL_STATS)?)
    }

    /// The counter maps on descriptors of their own, readable without this `Dataplane`
    /// (and whatever lock guards it): a scrape of 100,000 backends reads 100,000 entries.
    pub fn counter_reader(&self) -> Result<CounterReader> {
        let own = |name: &'static str| -> Result<aya::maps::Map> {
            let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
            let aya::maps::Map::PerCpuArray(data) = map else {
                return Err(map_err(name)(MapError::InvalidName { name: name.into() }));
            };
            let fd =
                data.fd().as_fd().try_clone_to_owned().map_err(|e| map_err(name)(MapError::IoError(e)))?;
            aya::maps::Map::from_map_data(MapData::from_fd(fd).map_err(map_err(name))?).map_err(map_err(name))
        };
        Ok(CounterReader {
            backends: PerCpuArray::try_from(own(maps::BACKEND_STATS)?)
                .map_err(map_err(maps::BACKEND_STATS))?,
            global: PerCpuArray::try_from(own(maps::GLOBAL_STATS)?).map_err(map_err(maps::GLOBAL_STATS))?,
        })
    }

    /// The connection table's seed and set mask: with `lb_common::hash::flow_hash`, where
    /// a flow's set is.
    pub fn flow_table(&self) -> Result<FlowTable> {
        let map: Array<&MapData, FlowTable> = map_ref(&self.ebpf, maps::FLOW_TABLE)?;
        map.get(&0, 0).map_err(map_err(maps::FLOW_TABLE))
    }

    /// A snapshot of the connection table.
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let mut flows = Vec::new();
        self.flow_reader()?.for_each(|k, f| flows.push((*k, *f)));
        Ok(flows)
    }
}
