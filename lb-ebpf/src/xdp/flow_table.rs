//! The connection table's ways: finding a flow, recording one (see `lb_common::FlowSet`).
//!
//! The search of a set (`lb_flow_find`) and the choice of a way for a new flow
//! (`lb_flow_place`) are global functions, which the kernel verifies once, on their own:
//! inlined, the hash and the four ways' compares were walked again at every state of the
//! balancer that reaches a lookup, past the verifier's million instructions. A global
//! function returns a number, not a pointer: the slot, from which the caller makes the
//! way's pointer (one array lookup the kernel inlines). Their stack is what the
//! balancer's leaves of the 512 bytes, so they keep next to nothing on it; writing the new
//! flow there too took more, so `record` writes it inline.
//!
//! Ways are read and written through raw pointers, the head word (`backend`, `check`)
//! whole and last: other CPUs read and write the same ways at the same time.
use core::ptr::{read_volatile, write_volatile};

use lb_common::{
    FLOW_CLOSED, FLOW_EVICTED_RECENT_NS, FLOW_WAYS, Flow, FlowKey, FlowTable, FlowWay, hash::flow_hash, stat,
};

use super::maps::{FLOW_TABLE, FLOWS};
use super::stats;

const WAYS: usize = FLOW_WAYS as usize;
/// A key's 4-byte words.
const KEY_WORDS: usize = size_of::<FlowKey>() / 4;

/// The recorded flow of `key`, and its backend id as read together with the check that
/// vouches for it.
#[inline(always)]
pub fn find(key: &FlowKey) -> Option<(*mut Flow, u32)> {
    way_of(lb_flow_find(key))
}

/// `find`, inlined: for a program that looks up one flow, from few states (the NAT
/// translator), where the call of a global function costs its verification more.
#[inline(always)]
pub fn find_inline(key: &FlowKey) -> Option<(*mut Flow, u32)> {
    way_of(find_slot(key))
}

/// The way `lb_flow_find` found, and the backend id it read.
#[inline(always)]
fn way_of(found: u64) -> Option<(*mut Flow, u32)> {
    let way = way_at(found)?;
    // SAFETY: a way of the table, valid for this program run.
    Some((unsafe { &raw mut (*way).flow }, found as u32))
}

/// What the global functions return: zero for none, else the way's slot (set *
/// FLOW_WAYS + way) plus one in the upper half, and `low` in the lower.
#[inline(always)]
fn slot_word(set: u32, way: usize, low: u32) -> u64 {
    (u64::from(set * FLOW_WAYS + way as u32 + 1) << 32) | u64::from(low)
}

/// The way a [`slot_word`] names, `None` for zero.
#[inline(always)]
fn way_at(word: u64) -> Option<*mut FlowWay> {
    if word == 0 {
        return None;
    }
    let slot = ((word >> 32) as u32).wrapping_sub(1);
    let set = FLOWS.get_ptr_mut(slot / FLOW_WAYS)?;
    // SAFETY: `slot % FLOW_WAYS` < WAYS: a way of the set, valid for this program run.
    Some(unsafe { set.cast::<FlowWay>().add((slot % FLOW_WAYS) as usize) })
}

/// Records `flow` (its `check` is set here) under `key`: over the key's own way if it is
/// in its set, else over the way seen least recently (a way never used is all zeroes,
/// the oldest of all). A new flow that takes the way of one seen in the last
/// `FLOW_EVICTED_RECENT_NS` (not closed) is counted.
#[inline(always)]
pub fn record(key: &FlowKey, flow: &Flow) {
    let placed = lb_flow_place(key, flow.last_seen_ns);
    let Some(way) = way_at(placed) else { return };
    let check = placed as u32;
    // SAFETY: a way of the table, valid for this program run. Every field is written
    // whole, the head last.
    unsafe {
        let f = &raw mut (*way).flow;
        let (to, from) = (way.cast::<u32>(), (key as *const FlowKey).cast::<u32>());
        for i in 0..KEY_WORDS {
            write_volatile(to.add(i), *from.add(i));
        }
        write_volatile(&raw mut (*f).service, flow.service);
        write_volatile(&raw mut (*f).state, flow.state);
        write_volatile(&raw mut (*f).service_generation, flow.service_generation);
        write_volatile(&raw mut (*f).last_seen_ns, flow.last_seen_ns);
        write_volatile(f.cast::<u64>(), u64::from(flow.backend) | u64::from(check) << 32);
    }
}

/// A set's first way, the check its flow must carry, and the set's index.
#[inline(always)]
fn locate(key: &FlowKey) -> Option<(*mut FlowWay, u32, u32)> {
    let table = FLOW_TABLE.get(0)?;
    let hash = flow_hash(key, table.seed);
    let index = table.set(hash);
    let set = FLOWS.get_ptr_mut(index)?;
    Some((set.cast::<FlowWay>(), FlowTable::check(hash), index))
}

/// The way's head word: `backend` in the low half, `check` in the high one.
#[inline(always)]
fn head(way: *mut FlowWay) -> u64 {
    // SAFETY: `way` is a way of a map value, valid for this program run; the head is
    // 8-aligned (offset 40 of a 64-byte, 8-aligned way).
    unsafe { read_volatile((&raw const (*way).flow).cast::<u64>()) }
}

/// Whether the way's key is `key`: one branch, not ten.
#[inline(always)]
fn holds(way: *mut FlowWay, key: *const FlowKey) -> bool {
    let (have, want) = (way.cast::<u32>(), key.cast::<u32>());
    let mut diff = 0;
    for i in 0..KEY_WORDS {
        // SAFETY: both are `FlowKey`s (the way's first 40 bytes), read word by word. Not
        // volatile: a way rewritten meanwhile is caught by its check (`head`).
        diff |= unsafe { *have.add(i) ^ *want.add(i) };
    }
    diff == 0
}

/// Where `key`'s flow is: zero if it is not recorded, else its [`slot_word`] with its
/// backend id.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_flow_find(key: *const FlowKey) -> u64 {
    find_slot(key)
}

#[inline(always)]
fn find_slot(key: *const FlowKey) -> u64 {
    if key.is_null() {
        return 0;
    }
    // SAFETY: the verifier checks that every caller passes a readable `FlowKey`.
    let Some((ways, check, set)) = locate(unsafe { &*key }) else { return 0 };
    for w in 0..WAYS {
        // SAFETY: `w` < WAYS: a way of the set.
        let way = unsafe { ways.add(w) };
        let head = head(way);
        if (head >> 32) as u32 == check && holds(way, key) {
            return slot_word(set, w, head as u32);
        }
    }
    0
}

/// Where `key`'s flow goes: its own way if it is in its set, else the way seen least
/// recently; zero if the table is missing, else its [`slot_word`] with the check. Counts a flow seen within `FLOW_EVICTED_RECENT_NS` of `now`
/// (not closed) that loses its way.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_flow_place(key: *const FlowKey, now: u64) -> u64 {
    if key.is_null() {
        return 0;
    }
    // SAFETY: the verifier checks that every caller passes a readable `FlowKey`.
    let Some((ways, check, set)) = locate(unsafe { &*key }) else { return 0 };
    let (mut victim, mut oldest, mut own) = (0, u64::MAX, false);
    for w in 0..WAYS {
        // SAFETY: `w` < WAYS: a way of the set.
        let way = unsafe { ways.add(w) };
        if (head(way) >> 32) as u32 == check && holds(way, key) {
            (victim, own) = (w, true);
            break;
        }
        // SAFETY: as above.
        let seen = unsafe { read_volatile(&raw const (*way).flow.last_seen_ns) };
        if seen < oldest {
            (victim, oldest) = (w, seen);
        }
    }
    let victim = victim & (WAYS - 1);
    // SAFETY: as above.
    let evicts_recent = unsafe {
        let way = ways.add(victim);
        !own && head(way) >> 32 != 0
            && read_volatile(&raw const (*way).flow.state) != FLOW_CLOSED
            && now.wrapping_sub(oldest) < FLOW_EVICTED_RECENT_NS
    };
    if evicts_recent {
        stats::global(stat::FLOWS_EVICTED_RECENT);
    }
    slot_word(set, victim, check)
}
