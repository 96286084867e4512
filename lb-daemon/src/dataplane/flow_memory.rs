//! The connection table mapped into this process, read only. `FLOWS` is created
//! `BPF_F_MMAPABLE`, so reading a million flows (for the connection counts, the status)
//! is a walk over 64 MB of memory instead of a `bpf()` call per flow. The data path
//! writes ways while they are read: a way read mid-write shows a mix of two flows, which
//! the counts tolerate (a connection counted once under another backend for a few
//! seconds); the data path itself never trusts such a way (see `lb_common::Flow::check`).

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use aya::maps::MapData;
use lb_common::{Flow, FlowKey, FlowSet};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use super::{DataplaneError, Result};

pub(super) struct FlowMemory {
    base: NonNull<c_void>,
    len: usize,
    sets: usize,
}

// SAFETY: the mapping is plain shared memory that lives as long as this value; it is only
// read, through volatile reads.
unsafe impl Send for FlowMemory {}
unsafe impl Sync for FlowMemory {}

impl FlowMemory {
    pub(super) fn map(map: &MapData, sets: u32) -> Result<Self> {
        // SAFETY: sysconf reads a constant of the system.
        let page = usize::try_from(unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (sets as usize * size_of::<FlowSet>()).div_ceil(page) * page;
        let len = NonZeroUsize::new(bytes).ok_or(DataplaneError::Size {
            what: "flow entries",
            value: 0,
            max: 0,
        })?;
        // SAFETY: a fresh shared read-only mapping of the map's value area, of the size the
        // kernel allows for it.
        let base = unsafe { mmap(None, len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, map.fd(), 0) }
            .map_err(|e| DataplaneError::FlowMemory(std::io::Error::from(e)))?;
        Ok(FlowMemory { base, len: bytes, sets: sets as usize })
    }

    /// Visits every used way (its check is not zero); returns how many there were.
    pub(super) fn for_each(&self, mut visit: impl FnMut(&FlowKey, &Flow)) -> u64 {
        let sets = self.base.as_ptr().cast::<FlowSet>();
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

impl Drop for FlowMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        if let Err(e) = unsafe { munmap(self.base, self.len) } {
            tracing::warn!(error = %e, "unmapping the connection table");
        }
    }
}
