//! Per-CPU counters: plain adds on this CPU's copy, no atomics, no shared cache line.
use super::maps::{BACKEND_STATS, GLOBAL_STATS};

#[inline(always)]
pub fn global(index: u32) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this program on this CPU writes it.
        unsafe { *c += 1 };
    }
}

/// Counts a packet sent to `backend`; its service's counters are summed from its
/// backends' by the daemon (`lb_common::BACKEND_STATS_ENTRIES`).
#[inline(always)]
pub fn forwarded(backend: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: as in `global`.
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes;
        c.new_flows += new_flow as u64;
    }
}
