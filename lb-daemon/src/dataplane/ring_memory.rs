//! The ring array mapped into this process. `RINGS` is created `BPF_F_MMAPABLE`, so ring
//! slots are read and written as memory: a ring of 65,537 slots costs microseconds to
//! write, where one `bpf()` call per slot cost a second per 10^6 slots. Stores are atomic
//! per slot (aligned 32-bit), so a reader in the data path sees a slot's old or new value,
//! never a torn one; the window flip stays a map update of the service (a syscall, which
//! orders the stores before it).

use std::sync::atomic::{AtomicU32, Ordering};

use aya::maps::MapData;

use super::array_mapping::ArrayMapping;
use super::{DataplaneError, Result};

/// The kernel keeps array values 8-byte aligned: slot `i`'s u32 is at byte `8 * i`.
const SLOT_STRIDE: usize = 8;

pub(super) struct RingMemory {
    mapping: ArrayMapping,
    slots: usize,
}

impl RingMemory {
    pub(super) fn map(map: &MapData, slots: u32) -> Result<Self> {
        let mapping =
            ArrayMapping::new(map, slots as usize * SLOT_STRIDE, true).map_err(DataplaneError::RingMemory)?;
        Ok(RingMemory { mapping, slots: slots as usize })
    }

    fn slot(&self, i: u32) -> Option<&AtomicU32> {
        let i = i as usize;
        if i >= self.slots {
            return None;
        }
        // SAFETY: in bounds of the mapping (checked above), 8-byte aligned, and only ever
        // accessed atomically here; the kernel's readers load it whole.
        Some(unsafe { &*self.mapping.as_ptr().add(i * SLOT_STRIDE).cast::<AtomicU32>() })
    }

    pub(super) fn get(&self, i: u32) -> Option<u32> {
        self.slot(i).map(|s| s.load(Ordering::Relaxed))
    }

    /// Stores `value` unless the slot holds it already; says whether it stored.
    pub(super) fn set(&self, i: u32, value: u32) -> Result<bool> {
        let slot = self.slot(i).ok_or(DataplaneError::IdRange {
            what: "ring slot",
            id: i,
            max: self.slots as u32,
        })?;
        if slot.load(Ordering::Relaxed) == value {
            return Ok(false);
        }
        slot.store(value, Ordering::Release);
        Ok(true)
    }
}
