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
