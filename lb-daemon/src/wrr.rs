//! Weighted round-robin: the order in which new flows visit the backends.
//!
//! The data path walks the sequence with one cursor per CPU and service (no shared
//! counter, no lock), so each CPU deals new flows out in these proportions. The sequence
//! is the "smooth" interleaving of nginx's upstream module: weights 5, 1, 1 give
//! a a b a c a a, never five `a` in a row.

use crate::model::{RingCandidate, RingError};

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The sequence of backend ids, at most `max_len` long: weights are reduced by their
/// common divisor, then scaled down (each live backend keeping at least one turn) if
/// their sum is still larger. Empty when no backend has weight.
pub fn sequence(backends: &[RingCandidate], max_len: u32) -> Result<Vec<u32>, RingError> {
    let mut live: Vec<&RingCandidate> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() {
        return Ok(Vec::new());
    }
    if live.len() > max_len as usize {
        return Err(RingError::TooSmall { size: max_len, backends: live.len() });
    }
    // Every director builds the same sequence from the same config.
    live.sort_by(|a, b| a.key.cmp(&b.key));
    let g = live.iter().fold(0u64, |g, b| gcd(g, b.weight as u64));
    let mut weights: Vec<u64> = live.iter().map(|b| b.weight as u64 / g).collect();
    let total: u64 = weights.iter().sum();
    if total > max_len as u64 {
        for w in &mut weights {
            *w = (*w * max_len as u64 / total).max(1);
        }
        // Rounding each up to one turn may overshoot by a few: trim the largest.
        while weights.iter().sum::<u64>() > max_len as u64 {
            if let Some(w) = weights.iter_mut().max() {
                *w -= 1;
            }
        }
    }
    let total: i64 = weights.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; live.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..live.len() {
            current[i] += weights[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(live[best].id);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_candidates as backends;

    fn count(seq: &[u32], id: u32) -> usize {
        seq.iter().filter(|&&x| x == id).count()
    }

    #[test]
    fn smooth_interleaving() {
        assert_eq!(sequence(&backends(&[5, 1, 1]), 4093).unwrap(), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(sequence(&backends(&[1, 1, 1]), 4093).unwrap(), [0, 1, 2]);
    }

    #[test]
    fn weights_are_reduced_then_scaled_to_fit() {
        // 300:100 is 3:1.
        assert_eq!(sequence(&backends(&[300, 100]), 4093).unwrap(), [0, 0, 1, 0]);
        let seq = sequence(&backends(&[65535, 1, 30000]), 1000).unwrap();
        assert!(seq.len() <= 1000);
        assert!(count(&seq, 1) >= 1, "every live backend keeps a turn");
        let ratio = count(&seq, 0) as f64 / count(&seq, 2) as f64;
        assert!((ratio - 65535.0 / 30000.0).abs() < 0.05, "{ratio}");
    }

    #[test]
    fn zero_weights_and_too_many_backends() {
        assert!(sequence(&backends(&[0, 0]), 10).unwrap().is_empty());
        assert_eq!(sequence(&backends(&[0, 4]), 10).unwrap(), [1]);
        assert_eq!(sequence(&backends(&[1; 4]), 3), Err(RingError::TooSmall { size: 3, backends: 4 }));
    }

    #[test]
    fn order_in_the_config_does_not_matter() {
        let a = backends(&[3, 2, 1]);
        let mut b = a.clone();
        b.reverse();
        assert_eq!(sequence(&a, 100).unwrap(), sequence(&b, 100).unwrap());
    }
}
