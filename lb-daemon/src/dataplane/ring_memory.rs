//! The ring array mapped into this process. `RINGS` is created `BPF_F_MMAPABLE`, so ring
//! slots are read and written as memory: a ring of 65,537 slots costs microseconds to
//! write, where one `bpf()` call per slot cost a second per 10^6 slots. Stores are atomic
//! per slot (aligned 32-bit), so a reader in the data path sees a slot's old or new value,
//! never a torn one; the window flip stays a map update of the service (a syscall, which
//! orders the stores before it).

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use aya::maps::MapData;
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use super::{DataplaneError, Result};

/// The kernel keeps array values 8-byte aligned: slot `i`'s u32 is at byte `8 * i`.
const SLOT_STRIDE: usize = 8;

pub(super) struct RingMemory {
    base: NonNull<c_void>,
    len: usize,
    slots: usize,
}

// SAFETY: the mapping is plain shared memory that lives as long as this value; every access
// goes through atomics.
unsafe impl Send for RingMemory {}
unsafe impl Sync for RingMemory {}

impl RingMemory {
    pub(super) fn map(map: &MapData, slots: u32) -> Result<Self> {
        // SAFETY: sysconf reads a constant of the system.
        let page = usize::try_from(unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (slots as usize * SLOT_STRIDE).div_ceil(page) * page;
        let len =
            NonZeroUsize::new(bytes).ok_or(DataplaneError::Size { what: "ring slots", value: 0, max: 0 })?;
        // SAFETY: a fresh shared mapping of the map's value area, of the size the kernel
        // allows for it; nothing else in this process aliases it.
        let base = unsafe {
            mmap(None, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, map.fd(), 0)
        }
        .map_err(|e| DataplaneError::RingMemory(std::io::Error::from(e)))?;
        Ok(RingMemory { base, len: bytes, slots: slots as usize })
    }

    fn slot(&self, i: u32) -> Option<&AtomicU32> {
        let i = i as usize;
        if i >= self.slots {
            return None;
        }
        // SAFETY: in bounds of the mapping (checked above), 8-byte aligned, and only ever
        // accessed atomically here; the kernel's readers load it whole.
        Some(unsafe { &*self.base.as_ptr().cast::<u8>().add(i * SLOT_STRIDE).cast::<AtomicU32>() })
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

impl Drop for RingMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        if let Err(e) = unsafe { munmap(self.base, self.len) } {
            tracing::warn!(error = %e, "unmapping the ring array");
        }
    }
}
