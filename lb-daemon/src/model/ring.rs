//! What Maglev and weighted round-robin build their tables from.

/// One candidate for a Maglev table or a weighted round-robin sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingCandidate {
    /// Stable identity (e.g. `"10.1.0.11"`): decides the backend's slot preferences, so it
    /// must not depend on anything local to one director.
    pub key: String,
    /// The value written into the table's slots.
    pub id: u32,
    /// Relative weight; zero keeps the backend out of the table.
    pub weight: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("ring size {0} is not a prime")]
    NotPrime(u32),
    #[error("ring size {size} is smaller than the {backends} backends it must hold")]
    TooSmall { size: u32, backends: usize },
}

/// A short digest of what a table means: which backend (by `key`, not by this director's
/// ids) holds each slot. Directors behind ECMP must hold equal tables for a flow to reach
/// the same backend through any of them; equal fingerprints say they do, whatever ids each
/// director gave its backends and whatever order its file lists them in. An empty table
/// (no backend available) is 0.
pub fn fingerprint(table: &[u32], candidates: &[RingCandidate]) -> u32 {
    if table.is_empty() {
        return 0;
    }
    // The servers in the table only: a candidate without slots (weight 0, down) changes
    // nothing a flow sees.
    let present: std::collections::HashSet<u32> = table.iter().copied().collect();
    let mut keys: Vec<(&str, u32)> =
        candidates.iter().filter(|c| present.contains(&c.id)).map(|c| (c.key.as_str(), c.id)).collect();
    keys.sort_unstable();
    keys.dedup_by_key(|k| k.1);
    let mut bytes = Vec::with_capacity(table.len() * 4 + keys.len() * 16);
    for (key, _) in &keys {
        bytes.extend_from_slice(key.as_bytes());
        bytes.push(b'\n');
    }
    let rank: std::collections::HashMap<u32, u32> =
        keys.iter().enumerate().map(|(rank, (_, id))| (*id, rank as u32)).collect();
    for id in table {
        // Each slot by the rank of its backend's key; an id with no candidate (none is
        // written) ranks past them all.
        let r = rank.get(id).copied().unwrap_or(keys.len() as u32);
        bytes.extend_from_slice(&r.to_le_bytes());
    }
    // The low 32 bits: short enough to read across directors, and exact as a metric value.
    xxhash_rust::xxh3::xxh3_64(&bytes) as u32
}

/// Deterministic primality test; ring sizes are at most a few million.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    let mut d = 2u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Candidates 10.1.0.10, 10.1.0.11, ... with ids 0, 1, ... and these weights, for tests.
#[cfg(test)]
pub(crate) fn test_candidates(weights: &[u32]) -> Vec<RingCandidate> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| RingCandidate { key: format!("10.1.0.{}", 10 + i), id: i as u32, weight: w })
        .collect()
}
