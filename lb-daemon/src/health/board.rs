//! The health of every (service, backend) pair: which probe feeds it, its state machine,
//! the weight its check asked for, and counts for metrics. Pure: probe results and the
//! time come in; state changes come out, and [`Board::overlay`] turns the config's
//! backends into what the planner should see.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use super::spec::HealthCheck;
use super::state::{Health, Outcome, Tracker, Transition};
use super::supervisor::{ProbeKey, ProbeResult};
use super::{Report, Target, TunnelPath};
use crate::model::{BackendState, Forward, MAX_WEIGHT, ServiceMatch, ServiceSpec};

#[derive(Clone, Debug)]
pub struct Entry {
    pub probe: ProbeKey,
    check: HealthCheck,
    pub tracker: Tracker,
    /// Weight from the last result that named one (`weight=N`).
    pub weight: Option<u32>,
    /// The last passing result was WARNING.
    pub warning: bool,
    pub last: Option<Report>,
    /// Check results by outcome name.
    pub results: BTreeMap<&'static str, u64>,
    pub state_changes: u64,
    /// Changes into `timeout` (flap control holding the backend down).
    pub flaps: u64,
    pub durations: Durations,
}

/// Upper bounds (seconds) of the check-duration histogram: from a local TCP connect to a
/// slow plugin.
pub const DURATION_BUCKETS: [f64; 13] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// How long checks took: counts per bucket of [`DURATION_BUCKETS`] (not cumulative), and
/// the count and sum of all.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Durations {
    pub buckets: [u64; DURATION_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Durations {
    pub fn observe(&mut self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = DURATION_BUCKETS.iter().position(|le| secs <= *le) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += secs;
    }

    /// (upper bound, checks at most that long), as Prometheus buckets are.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        DURATION_BUCKETS.iter().zip(self.buckets.iter()).scan(0u64, |total, (le, n)| {
            *total += n;
            Some((*le, *total))
        })
    }
}

/// A state change, for logs and hooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub service: String,
    pub backend: IpAddr,
    pub transition: Transition,
    pub message: String,
}

#[derive(Clone, Debug, Default)]
pub struct Board {
    entries: HashMap<(String, IpAddr), Entry>,
    /// The pairs each probe serves: a result touches those, not every entry (a server
    /// behind 1,000 services is one probe and 1,000 pairs of 100,000).
    by_probe: HashMap<ProbeKey, Vec<(String, IpAddr)>>,
    /// Backends an adopted data path was sending traffic to: they start up even where
    /// the check says `initial_state: down`, so that a restart takes none out.
    running_up: HashSet<(ServiceMatch, IpAddr)>,
}

fn port_of(m: &ServiceMatch) -> Option<u16> {
    match m {
        ServiceMatch::Vip { port, .. } => Some(*port),
        ServiceMatch::Mark(_) => None,
    }
}

impl Board {
    /// Makes the board follow a (new) config: pairs whose check is unchanged keep their
    /// state, except a flap timeout, which lasts until a reload (they start over as
    /// down); new pairs start up (see [`Tracker::new`]); others are forgotten.
    /// Records what a running data path the daemon adopted was serving (before the first
    /// [`Board::sync`]).
    pub fn adopt_running(&mut self, up: impl IntoIterator<Item = (ServiceMatch, IpAddr)>) {
        self.running_up = up.into_iter().collect();
    }

    pub fn sync(&mut self, services: &[ServiceSpec], checks: &BTreeMap<String, HealthCheck>) {
        let mut next = HashMap::new();
        for svc in services {
            let Some(check) = checks.get(&svc.name) else { continue };
            for b in &svc.backends {
                let tunnel = match (check.spec.via_tunnel, svc.matcher) {
                    (Some(source), ServiceMatch::Vip { addr: vip, .. }) if b.forward == Forward::Tunnel => {
                        Some(TunnelPath { vip, source })
                    }
                    _ => None,
                };
                // A NAT backend is checked where its traffic goes (VIP:80 -> RS:8080).
                let port = b.port.or(port_of(&svc.matcher));
                let target = Target { service: svc.name.clone(), addr: b.addr, port, tunnel };
                let probe = ProbeKey::new(check, target);
                let key = (svc.name.clone(), b.addr);
                let entry = match self.entries.remove(&key) {
                    // Hooks and the flow option may change freely; a new check starts over.
                    Some(mut e) if e.probe == probe && e.check.policy == check.policy => {
                        if matches!(e.tracker.state(), Health::Timeout { .. }) {
                            e.tracker = Tracker::starting(check.policy, Health::Down);
                        }
                        e.check = check.clone();
                        e
                    }
                    _ => Entry {
                        probe,
                        check: check.clone(),
                        tracker: if check.start_down && !self.running_up.contains(&(svc.matcher, b.addr)) {
                            Tracker::starting(check.policy, Health::Down)
                        } else {
                            Tracker::new(check.policy)
                        },
                        weight: None,
                        warning: false,
                        last: None,
                        results: BTreeMap::new(),
                        state_changes: 0,
                        flaps: 0,
                        durations: Durations::default(),
                    },
                };
                next.insert(key, entry);
            }
        }
        let mut by_probe: HashMap<ProbeKey, Vec<(String, IpAddr)>> = HashMap::new();
        for (key, e) in &next {
            by_probe.entry(e.probe.clone()).or_default().push(key.clone());
        }
        // Results reach a probe's pairs in one order whatever the hash map's.
        for pairs in by_probe.values_mut() {
            pairs.sort();
        }
        self.entries = next;
        self.by_probe = by_probe;
        // Only the first config after adopting meets the old daemon's backends.
        self.running_up.clear();
    }

    /// The hook to run for a service's state changes.
    pub fn hook(&self, service: &str, backend: IpAddr) -> Option<&super::spec::Hook> {
        self.entries.get(&(service.to_owned(), backend))?.check.on_change.as_ref()
    }

    /// The probes the board needs running.
    pub fn probes(&self) -> Vec<ProbeKey> {
        let mut v: Vec<ProbeKey> = self.by_probe.keys().cloned().collect();
        v.sort_by_cached_key(|k| format!("{k:?}"));
        v
    }

    /// Feeds a result to every pair its probe serves. Returns the state changes, and
    /// whether what the planner sees changed (a state or a weight).
    pub fn observe(&mut self, result: &ProbeResult, now: Duration) -> (Vec<Event>, bool) {
        let mut events = Vec::new();
        let mut changed = false;
        let pairs = self.by_probe.get(&result.key).map(Vec::as_slice).unwrap_or_default();
        for (service, backend) in pairs {
            let Some(e) = self.entries.get_mut(&(service.clone(), *backend)) else { continue };
            let r = &result.report;
            *e.results.entry(r.outcome.name()).or_default() += 1;
            e.durations.observe(result.took);
            if r.outcome.passed() && r.weight != e.weight {
                e.weight = r.weight;
                changed = true;
            }
            let warning = r.outcome == Outcome::Warning;
            if r.outcome.passed() && warning != e.warning {
                e.warning = warning;
                changed |= e.check.warning_weight_percent.is_some();
            }
            if let Some(t) = e.tracker.observe(r.outcome, now) {
                e.state_changes += 1;
                if matches!(t.to, Health::Timeout { .. }) {
                    e.flaps += 1;
                }
                changed = true;
                events.push(Event {
                    service: service.clone(),
                    backend: *backend,
                    transition: t,
                    message: r.message.clone(),
                });
            }
            e.last = Some(r.clone());
        }
        (events, changed)
    }

    pub fn get(&self, service: &str, backend: IpAddr) -> Option<&Entry> {
        self.entries.get(&(service.to_owned(), backend))
    }

    /// The weight a backend has after its checks: `weight=N` replaces the configured one,
    /// and WARNING keeps `warning_weight_percent` of it (rounded up: a warning alone
    /// never takes the last new flow away; 0% does).
    pub fn weight(&self, service: &str, backend: IpAddr, configured: u32) -> u32 {
        let Some(e) = self.get(service, backend) else { return configured };
        let w = e.weight.unwrap_or(configured).min(MAX_WEIGHT);
        match e.check.warning_weight_percent {
            Some(pct) if e.warning => (w * pct).div_ceil(100),
            _ => w,
        }
    }

    /// The services as the planner should see them: a backend its check holds down is
    /// `disabled` (its flows move, as IPVS's expire_nodest_conn), or with `keep_flows`
    /// drained (no new flows, established ones stay); a weight the check asked for
    /// replaces the configured one. WARNING keeps a backend up.
    pub fn overlay(&self, services: &[ServiceSpec]) -> Vec<ServiceSpec> {
        services
            .iter()
            .map(|svc| {
                let mut svc = svc.clone();
                for b in &mut svc.backends {
                    let Some(e) = self.entries.get(&(svc.name.clone(), b.addr)) else { continue };
                    if !e.tracker.state().serving() {
                        b.state = match (e.check.keep_flows, b.state) {
                            (true, BackendState::Active | BackendState::Drain) => BackendState::Drain,
                            _ => BackendState::Disabled,
                        };
                    } else {
                        b.weight = self.weight(&svc.name, b.addr, b.weight);
                    }
                }
                svc
            })
            .collect()
    }
}

/// Every result, for metrics (in order).
pub const OUTCOMES: [Outcome; 5] =
    [Outcome::Ok, Outcome::Warning, Outcome::Critical, Outcome::Unknown, Outcome::DirectorError];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_into_cumulative_buckets() {
        let mut d = Durations::default();
        for ms in [0, 3, 3, 40, 20_000] {
            d.observe(Duration::from_millis(ms));
        }
        let c: Vec<(f64, u64)> = d.cumulative().collect();
        assert_eq!(c[0], (0.001, 1));
        assert_eq!(c[2], (0.005, 3));
        assert_eq!(c[5], (0.05, 4));
        assert_eq!(c.last(), Some(&(10.0, 4)), "20 s is above every bound: only in the count");
        assert_eq!((d.count, d.sum), (5, 20.046));
    }
    use crate::health::spec::Policy;
    use crate::health::spec::{CheckKind, CheckSpec};
    use crate::model::{BackendSpec, Protocol};

    fn svc(name: &str, port: u16) -> ServiceSpec {
        let backends =
            ["10.0.0.1", "10.0.0.2"].iter().map(|a| BackendSpec::active(a.parse().unwrap(), 10)).collect();
        ServiceSpec::tcp(name, "192.0.2.1".parse().unwrap(), port, 7, backends)
    }

    fn tcp(policy: Policy) -> HealthCheck {
        HealthCheck {
            spec: CheckSpec {
                kind: CheckKind::Tcp { port: None },
                timeout: Duration::from_secs(1),
                source: None,
                via_tunnel: None,
            },
            interval: Duration::from_secs(2),
            jitter: Duration::ZERO,
            policy,
            warning_weight_percent: None,
            start_down: false,
            keep_flows: false,
            on_change: None,
        }
    }

    fn result(board: &Board, backend: &str, outcome: Outcome, weight: Option<u32>) -> ProbeResult {
        let addr: IpAddr = backend.parse().unwrap();
        let key = board.probes().into_iter().find(|k| k.target.addr == addr).unwrap();
        ProbeResult {
            key,
            report: Report { outcome, weight, message: "m".into(), doubt: None },
            took: Duration::from_millis(5),
        }
    }

    #[test]
    fn identical_checks_of_two_services_share_one_probe() {
        let mut b = Board::default();
        let mut other = svc("b", 80);
        other.matcher =
            ServiceMatch::Vip { addr: "192.0.2.2".parse().unwrap(), port: 80, proto: Protocol::Tcp };
        let checks = BTreeMap::from([
            ("a".to_string(), tcp(Policy::default())),
            ("b".to_string(), tcp(Policy::default())),
        ]);
        b.sync(&[svc("a", 80), other], &checks);
        assert_eq!(b.probes().len(), 2, "one probe per server, not per service");
        // One result moves both services' view of the server.
        let p = Policy { rise: 1, fall: 1, fall_within: 1, flap: None };
        let checks = BTreeMap::from([("a".to_string(), tcp(p)), ("b".to_string(), tcp(p))]);
        let mut other = svc("b", 80);
        other.matcher =
            ServiceMatch::Vip { addr: "192.0.2.2".parse().unwrap(), port: 80, proto: Protocol::Tcp };
        b.sync(&[svc("a", 80), other], &checks);
        let (events, changed) = b.observe(&result(&b, "10.0.0.1", Outcome::Critical, None), Duration::ZERO);
        assert!(changed);
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn down_backends_are_disabled_and_weights_follow_the_check() {
        let mut b = Board::default();
        let p = Policy { rise: 1, fall: 1, fall_within: 1, flap: None };
        b.sync(&[svc("a", 80)], &BTreeMap::from([("a".to_string(), tcp(p))]));
        b.observe(&result(&b, "10.0.0.1", Outcome::Critical, None), Duration::ZERO);
        let (_, changed) = b.observe(&result(&b, "10.0.0.2", Outcome::Warning, Some(3)), Duration::ZERO);
        assert!(changed, "a new weight changes the plan");
        let view = b.overlay(&[svc("a", 80)]);
        assert_eq!(view[0].backends[0].state, BackendState::Disabled);
        assert_eq!((view[0].backends[1].state, view[0].backends[1].weight), (BackendState::Active, 3));
        let (_, changed) = b.observe(&result(&b, "10.0.0.2", Outcome::Ok, Some(3)), Duration::ZERO);
        assert!(!changed, "same state, same weight: nothing to re-plan");
        // With keep_flows the down backend is drained instead: its flows stay. Changing
        // only that option keeps the state the checks established.
        let mut keep = tcp(p);
        keep.keep_flows = true;
        b.sync(&[svc("a", 80)], &BTreeMap::from([("a".to_string(), keep)]));
        let view = b.overlay(&[svc("a", 80)]);
        assert_eq!(view[0].backends[0].state, BackendState::Drain);
    }

    #[test]
    fn warning_keeps_a_share_of_the_weight_when_asked_to() {
        let p = Policy { rise: 1, fall: 1, fall_within: 1, flap: None };
        let mut check = tcp(p);
        check.warning_weight_percent = Some(25);
        let mut b = Board::default();
        b.sync(&[svc("a", 80)], &BTreeMap::from([("a".to_string(), check)]));
        let (_, changed) = b.observe(&result(&b, "10.0.0.1", Outcome::Warning, None), Duration::ZERO);
        assert!(changed, "a warning changes the weight");
        let view = b.overlay(&[svc("a", 80)]);
        assert_eq!((view[0].backends[0].weight, view[0].backends[1].weight), (3, 10), "25% of 10, up");
        let (_, changed) = b.observe(&result(&b, "10.0.0.1", Outcome::Warning, Some(40)), Duration::ZERO);
        assert!(changed);
        assert_eq!(b.overlay(&[svc("a", 80)])[0].backends[0].weight, 10, "25% of the check's weight=40");
        let (_, changed) = b.observe(&result(&b, "10.0.0.1", Outcome::Ok, Some(40)), Duration::ZERO);
        assert!(changed, "back to OK: full weight");
        assert_eq!(b.overlay(&[svc("a", 80)])[0].backends[0].weight, 40);
        // Without the option a warning changes nothing.
        b.sync(&[svc("a", 80)], &BTreeMap::from([("a".to_string(), tcp(p))]));
        let (_, changed) = b.observe(&result(&b, "10.0.0.1", Outcome::Warning, Some(40)), Duration::ZERO);
        assert!(!changed);
        assert_eq!(b.overlay(&[svc("a", 80)])[0].backends[0].weight, 40);
    }

    #[test]
    fn initial_state_down_spares_what_an_adopted_data_path_was_serving() {
        let mut check = tcp(Policy { rise: 1, fall: 1, fall_within: 1, flap: None });
        check.start_down = true;
        let checks = BTreeMap::from([("a".to_string(), check)]);
        let (one, two): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut b = Board::default();
        b.adopt_running([(svc("a", 80).matcher, one)]);
        b.sync(&[svc("a", 80)], &checks);
        assert_eq!(b.get("a", one).unwrap().tracker.state(), Health::Up, "was being served: stays");
        assert_eq!(b.get("a", two).unwrap().tracker.state(), Health::Down, "new: waits for its check");
        assert_eq!(b.overlay(&[svc("a", 80)])[0].backends[1].state, BackendState::Disabled);
        // Removed, then added again by later reloads: new again, so down.
        let mut without = svc("a", 80);
        without.backends.remove(0);
        b.sync(&[without], &checks);
        b.sync(&[svc("a", 80)], &checks);
        assert_eq!(b.get("a", one).unwrap().tracker.state(), Health::Down);
    }

    #[test]
    fn a_reload_keeps_states_but_ends_timeouts() {
        let flappy = Policy {
            rise: 1,
            fall: 1,
            fall_within: 1,
            flap: Some(crate::health::spec::FlapPolicy { changes: 2, within: 10, hold: None }),
        };
        let checks = BTreeMap::from([("a".to_string(), tcp(flappy))]);
        let mut b = Board::default();
        b.sync(&[svc("a", 80)], &checks);
        b.observe(&result(&b, "10.0.0.1", Outcome::Critical, None), Duration::ZERO);
        b.observe(&result(&b, "10.0.0.1", Outcome::Ok, None), Duration::ZERO);
        b.observe(&result(&b, "10.0.0.2", Outcome::Critical, None), Duration::ZERO);
        let addr1: IpAddr = "10.0.0.1".parse().unwrap();
        let addr2: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(matches!(b.get("a", addr1).unwrap().tracker.state(), Health::Timeout { until: None }));
        assert_eq!(b.get("a", addr1).unwrap().flaps, 1);
        b.sync(&[svc("a", 80)], &checks);
        assert_eq!(b.get("a", addr1).unwrap().tracker.state(), Health::Down, "timeout ends with the reload");
        assert_eq!(b.get("a", addr2).unwrap().tracker.state(), Health::Down, "other states stay");
        // A changed check starts over.
        b.sync(&[svc("a", 80)], &BTreeMap::from([("a".to_string(), tcp(Policy::default()))]));
        assert_eq!(b.get("a", addr2).unwrap().tracker.state(), Health::Up);
    }
}
