//! A `BPF_F_MMAPABLE` array map's values mapped into this process (the rings, the
//! connection table): whole pages, shared with the kernel, unmapped when dropped.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use aya::maps::MapData;
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

pub(super) struct ArrayMapping {
    base: NonNull<c_void>,
    len: usize,
}

// SAFETY: plain shared memory that lives as long as this value; its users read and write
// it through atomics or volatile reads, as the data path does from other CPUs anyway.
unsafe impl Send for ArrayMapping {}
unsafe impl Sync for ArrayMapping {}

impl ArrayMapping {
    /// Maps the first `bytes` of `map`'s values (rounded up to whole pages), for reading,
    /// and for writing too if `writable`.
    pub(super) fn new(map: &MapData, bytes: usize, writable: bool) -> std::io::Result<Self> {
        // SAFETY: sysconf reads a constant of the system.
        let page = usize::try_from(unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = bytes.div_ceil(page) * page;
        let size = NonZeroUsize::new(len)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "an empty array"))?;
        let prot = if writable { ProtFlags::PROT_READ | ProtFlags::PROT_WRITE } else { ProtFlags::PROT_READ };
        // SAFETY: a fresh shared mapping of the map's value area, no larger than the kernel
        // allows for it; nothing else in this process aliases it.
        let base = unsafe { mmap(None, size, prot, MapFlags::MAP_SHARED, map.fd(), 0) }?;
        Ok(ArrayMapping { base, len })
    }

    pub(super) fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr().cast()
    }
}

impl Drop for ArrayMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        if let Err(e) = unsafe { munmap(self.base, self.len) } {
            tracing::warn!(error = %e, "unmapping a BPF array");
        }
    }
}
