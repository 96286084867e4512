//! The connection table mapped into this process, read only. `FLOWS` is created
//! `BPF_F_MMAPABLE`, so reading a million flows (for the connection counts, the status)
//! is a walk over 64 MB of memory instead of a `bpf()` call per flow. The data path
//! writes ways while they are read: a way read mid-write shows a mix of two flows, which
//! the counts tolerate (a connection counted once under another backend for a few
//! seconds); the data path itself never trusts such a way (see `lb_common::Flow::check`).

use aya::maps::MapData;
use lb_common::{Flow, FlowKey, FlowSet};

use super::array_mapping::ArrayMapping;
use super::{DataplaneError, Result};

/// The connection table, readable on its own (see `Dataplane::flow_reader`).
pub struct FlowReader {
    mapping: ArrayMapping,
    sets: usize,
}

impl FlowReader {
    pub(super) fn map(map: &MapData, sets: u32) -> Result<Self> {
        let mapping = ArrayMapping::new(map, sets as usize * size_of::<FlowSet>(), false)
            .map_err(DataplaneError::FlowMemory)?;
        Ok(FlowReader { mapping, sets: sets as usize })
    }

    /// Visits every recorded flow (a way whose check is not zero); returns how many there
    /// were.
    pub fn for_each(&self, mut visit: impl FnMut(&FlowKey, &Flow)) -> u64 {
        let sets = self.mapping.as_ptr().cast::<FlowSet>();
        let mut n = 0;
        for i in 0..self.sets {
            // SAFETY: set `i` is inside the mapping (`sets` sets were mapped); the kernel
            // keeps array values 8-aligned and a set's size is a multiple of 8, so the
            // set is at `i * size_of::<FlowSet>()`. Read volatile: the data path writes it.
            let set = unsafe { std::ptr::read_volatile(sets.add(i)) };
            for way in &set.ways {
                if way.flow.check != 0 {
                    visit(&way.key, &way.flow);
                    n += 1;
                }
            }
        }
        n
    }
}
