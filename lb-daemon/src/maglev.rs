//! Weighted Maglev table population (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! Pure and deterministic: every director that reads the same backends computes the same
//! table, whatever order the config lists them in, so ECMP may send a flow to any director.
//! Weights follow Katran's scheme: each round a backend earns its weight in credit and
//! claims one preferred slot per `max_weight` of credit, so slot counts track weights.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::model::{RingCandidate, RingError, is_prime};

/// Fills a table of `size` slots. With no weighted backend the table is empty (the data
/// path then has no backend for new flows).
pub fn populate(backends: &[RingCandidate], size: u32) -> Result<Vec<u32>, RingError> {
    if !is_prime(size) {
        return Err(RingError::NotPrime(size));
    }
    let mut live: Vec<&RingCandidate> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() {
        return Ok(Vec::new());
    }
    if live.len() > size as usize {
        return Err(RingError::TooSmall { size, backends: live.len() });
    }
    live.sort_by(|a, b| a.key.cmp(&b.key));
    let m = size as u64;
    let skip: Vec<u64> = live.iter().map(|b| xxh3_64_with_seed(b.key.as_bytes(), 1) % (m - 1) + 1).collect();
    let mut next: Vec<u64> = live.iter().map(|b| xxh3_64_with_seed(b.key.as_bytes(), 0) % m).collect();
    let max_weight = live.iter().map(|b| b.weight as u64).max().unwrap_or(1);
    let mut credit = vec![0u64; live.len()];

    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; size as usize];
    let mut filled = 0u32;
    loop {
        for (i, b) in live.iter().enumerate() {
            credit[i] += b.weight as u64;
            while credit[i] >= max_weight {
                credit[i] -= max_weight;
                // Walk this backend's permutation to its next free slot. Terminates: the
                // permutation visits every slot (m prime, skip in 1..m) and one is free.
                loop {
                    let slot = next[i] as usize;
                    next[i] = (next[i] + skip[i]) % m;
                    if table[slot] == EMPTY {
                        table[slot] = b.id;
                        filled += 1;
                        break;
                    }
                }
                if filled == size {
                    return Ok(table);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_candidates as backends;

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &id in table {
            c[id as usize] += 1;
        }
        c
    }

    fn assert_shares_follow_weights(weights: &[u32]) {
        const M: u32 = 65537;
        let table = populate(&backends(weights), M).unwrap();
        let total: u32 = weights.iter().sum();
        for (i, count) in shares(&table, weights.len()).into_iter().enumerate() {
            let expected = M as f64 * weights[i] as f64 / total as f64;
            let deviation = (count as f64 - expected).abs() / expected;
            assert!(
                deviation <= 0.01,
                "backend {i}: {count} slots, expected {expected:.0} ({:.2}%)",
                deviation * 100.0
            );
        }
    }

    #[test]
    fn equal_weights_share_equally() {
        assert_shares_follow_weights(&[100; 10]);
    }

    #[test]
    fn unequal_weights_are_honoured() {
        assert_shares_follow_weights(&[100, 200, 300, 50, 50, 100, 400, 100, 25, 75]);
        assert_shares_follow_weights(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn removing_one_of_ten_moves_about_a_tenth() {
        const M: u32 = 65537;
        let all = backends(&[100; 10]);
        let before = populate(&all, M).unwrap();
        for gone in 0..10u32 {
            let rest: Vec<_> = all.iter().filter(|b| b.id != gone).cloned().collect();
            let after = populate(&rest, M).unwrap();
            // Slots of the removed backend must move; count the others that moved too.
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let share = moved as f64 / M as f64;
            assert!(share <= 0.11, "removing {gone} moved {:.2}% of slots", share * 100.0);
            assert!(after.iter().all(|&id| id != gone));
        }
    }

    #[test]
    fn same_input_same_table_in_any_order() {
        let a = backends(&[100, 50, 25, 100, 10]);
        let mut b = a.clone();
        b.reverse();
        let t1 = populate(&a, 4093).unwrap();
        assert_eq!(t1, populate(&a, 4093).unwrap());
        assert_eq!(t1, populate(&b, 4093).unwrap());
        // And a pinned fingerprint, so a change to the hash or the algorithm (which would
        // move flows between directors running different versions) cannot go unnoticed.
        let fp = xxh3_64_with_seed(&t1.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(), 0);
        assert_eq!(fp, FINGERPRINT_4093);
    }

    const FINGERPRINT_4093: u64 = 8182670913809892076;

    #[test]
    fn zero_weights_and_bad_sizes() {
        assert_eq!(populate(&backends(&[0, 0]), 7).unwrap(), Vec::<u32>::new());
        let t = populate(&backends(&[0, 5]), 7).unwrap();
        assert!(t.iter().all(|&id| id == 1));
        assert_eq!(populate(&backends(&[1]), 4096), Err(RingError::NotPrime(4096)));
        assert_eq!(populate(&backends(&[1; 8]), 7), Err(RingError::TooSmall { size: 7, backends: 8 }));
        assert!(is_prime(65537) && is_prime(16381) && is_prime(4093) && !is_prime(65535) && !is_prime(1));
    }
}
