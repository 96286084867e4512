//! Runs the probes the config asks for, each on its own interval, and reports results on
//! one channel. A probe is one check against one server: identical checks of several
//! services (same check, same server and port) run once and report to all of them.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::spec::{CheckKind, CheckSpec, HealthCheck};
use super::{Report, Target, run};

/// What makes two checks the same probe.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeKey {
    pub spec: CheckSpec,
    pub interval: Duration,
    pub jitter: Duration,
    pub target: Target,
}

impl ProbeKey {
    /// `service` matters only to exec checks (it is in their environment).
    pub fn new(check: &HealthCheck, mut target: Target) -> Self {
        if !matches!(check.spec.kind, CheckKind::Exec { .. }) {
            target.service.clear();
        }
        ProbeKey { spec: check.spec.clone(), interval: check.interval, jitter: check.jitter, target }
    }
}

/// A random delay below `jitter` (zero for none).
fn jitter_delay(jitter: Duration) -> Duration {
    use std::hash::{BuildHasher as _, Hasher as _};
    let nanos = jitter.as_nanos() as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    // Every RandomState has fresh keys: its empty hash is a random number.
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
    Duration::from_nanos(r % nanos)
}

#[derive(Clone, Debug)]
pub struct ProbeResult {
    pub key: ProbeKey,
    pub report: Report,
    pub took: Duration,
}

pub struct Supervisor {
    tasks: HashMap<ProbeKey, JoinHandle<()>>,
    results: mpsc::Sender<ProbeResult>,
}

impl Supervisor {
    pub fn new(results: mpsc::Sender<ProbeResult>) -> Self {
        Supervisor { tasks: HashMap::new(), results }
    }

    /// Starts the probes in `wanted` that do not run yet and stops those not in it.
    pub fn reconcile<'a>(&mut self, wanted: impl IntoIterator<Item = &'a ProbeKey>) {
        let wanted: HashMap<&ProbeKey, ()> = wanted.into_iter().map(|k| (k, ())).collect();
        self.tasks.retain(|k, task| {
            let keep = wanted.contains_key(k);
            if !keep {
                task.abort();
            }
            keep
        });
        for key in wanted.into_keys() {
            if !self.tasks.contains_key(key) {
                let task = tokio::spawn(probe(key.clone(), self.results.clone()));
                self.tasks.insert(key.clone(), task);
            }
        }
    }

    pub fn running(&self) -> usize {
        self.tasks.len()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

async fn probe(key: ProbeKey, results: mpsc::Sender<ProbeResult>) {
    // Probes of one interval started together would run in lockstep: spread the first
    // run over the interval by a hash of the key.
    let offset = {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        Duration::from_millis(h.finish() % (key.interval.as_millis().max(1) as u64))
    };
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, key.interval);
    // A slow check delays only its own next run, never the others.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        tokio::time::sleep(jitter_delay(key.jitter)).await;
        let (report, took) = run(&key.spec, &key.target).await;
        if results.send(ProbeResult { key: key.clone(), report, took }).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_below_its_bound_and_varies() {
        assert_eq!(jitter_delay(Duration::ZERO), Duration::ZERO);
        let bound = Duration::from_millis(500);
        let draws: Vec<Duration> = (0..200).map(|_| jitter_delay(bound)).collect();
        assert!(draws.iter().all(|d| *d < bound));
        let halves = draws.iter().filter(|d| **d < bound / 2).count();
        // Far from either end for any fair draw (p < 1e-12 of failing).
        assert!((40..=160).contains(&halves), "{halves} of 200 below half");
    }
}
