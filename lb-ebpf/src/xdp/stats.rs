//! Per-CPU counters: plain adds on this CPU's copy, no atomics, no shared cache line.
use lb_common::Counters;

use super::maps::{BACKEND_STATS, GLOBAL_STATS, SERVICE_STATS};

#[inline(always)]
pub fn global(index: u32) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this program on this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add(c: Option<*mut Counters>, bytes: u64, new_flow: bool) {
    if let Some(c) = c {
        // SAFETY: as in `global`.
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes;
        c.new_flows += new_flow as u64;
    }
}

#[inline(always)]
pub fn forwarded(service: u32, backend: u32, bytes: u64, new_flow: bool) {
    add(SERVICE_STATS.get_ptr_mut(service), bytes, new_flow);
    add(BACKEND_STATS.get_ptr_mut(backend), bytes, new_flow);
}
