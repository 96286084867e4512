//! Runs the probes the config asks for, each on its own interval, and reports results on
//! one channel. A probe is one check against one server: identical checks of several
//! services (same check, same server and port) run once and report to all of them.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{CheckKind, CheckSpec, Report, Target, run};

/// What makes two checks the same probe.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeKey {
    pub spec: CheckSpec,
    pub interval: Duration,
    pub target: Target,
}

impl ProbeKey {
    /// `service` matters only to exec checks (it is in their environment).
    pub fn new(spec: &CheckSpec, interval: Duration, mut target: Target) -> Self {
        if !matches!(spec.kind, CheckKind::Exec { .. }) {
            target.service.clear();
        }
        ProbeKey { spec: spec.clone(), interval, target }
    }
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
        let (report, took) = run(&key.spec, &key.target).await;
        if results.send(ProbeResult { key: key.clone(), report, took }).await.is_err() {
            return;
        }
    }
}
