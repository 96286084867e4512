//! The monit-style health state of one real server under one check. Pure: results and the
//! time come in, transitions come out.
//!
//! * Down after `fall` failures within the last `fall_within` cycles (monit's "if 3 failed
//!   within 5 cycles"; `fall_within == fall` is keepalived's and HAProxy's consecutive
//!   `fall`). Up again after `rise` consecutive passes.
//! * Flap control, monit's "if 4 restarts within 10 cycles then timeout": a server that
//!   changes state `changes` times within `within` cycles is held in `Timeout` for `hold`
//!   (or until the next reload), whatever its checks say; then it starts over as Down.
//! * Nagios results: OK and WARNING pass (WARNING may lower the weight, elsewhere);
//!   CRITICAL and UNKNOWN fail.

use std::collections::VecDeque;
use std::time::Duration;

use super::spec::Policy;

/// A check's verdict, as Nagios plugins give it (exit status 0-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Warning,
    Critical,
    Unknown,
    /// The director could not run the check: it is out of descriptors, memory, socket
    /// buffers, processes or local ports. That says nothing about the backend, so the
    /// state machine leaves the backend as it is (the daemon logs and counts it).
    DirectorError,
}

impl Outcome {
    /// Nagios plugin exit status; anything else is UNKNOWN, as Nagios treats it.
    pub fn from_exit_code(code: i32) -> Outcome {
        match code {
            0 => Outcome::Ok,
            1 => Outcome::Warning,
            2 => Outcome::Critical,
            _ => Outcome::Unknown,
        }
    }

    pub fn passed(self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Warning)
    }

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Warning => "warning",
            Outcome::Critical => "critical",
            Outcome::Unknown => "unknown",
            Outcome::DirectorError => "director_error",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
    /// Held down by flap control until this time (`None`: until the next reload).
    Timeout {
        until: Option<Duration>,
    },
}

impl Health {
    pub fn name(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Timeout { .. } => "timeout",
        }
    }

    /// Whether the server may receive traffic.
    pub fn serving(self) -> bool {
        self == Health::Up
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
}

#[derive(Clone, Debug)]
pub struct Tracker {
    policy: Policy,
    state: Health,
    /// Recent results, newest last: true for a pass.
    history: VecDeque<bool>,
    /// Cycle numbers of recent state changes, for flap control.
    changes: VecDeque<u64>,
    cycle: u64,
}

impl Tracker {
    /// A server starts Up: a daemon restart must not take healthy servers (and their
    /// established flows) out before a check has even run. It goes down after `fall`.
    pub fn new(policy: Policy) -> Self {
        Self::starting(policy, Health::Up)
    }

    pub fn starting(policy: Policy, state: Health) -> Self {
        Tracker { policy, state, history: VecDeque::new(), changes: VecDeque::new(), cycle: 0 }
    }

    pub fn state(&self) -> Health {
        self.state
    }

    /// Records one check result at `now` (any monotonic clock); returns the state change
    /// it caused, if any.
    pub fn observe(&mut self, outcome: Outcome, now: Duration) -> Option<Transition> {
        // Not a cycle of this backend's history: the check did not run.
        if outcome == Outcome::DirectorError {
            return None;
        }
        self.cycle += 1;
        if let Health::Timeout { until } = self.state {
            match until {
                Some(t) if now >= t => {
                    // The hold is over: start afresh, down until `rise` passes.
                    self.history.clear();
                    self.changes.clear();
                    self.state = Health::Down;
                    self.record(outcome);
                    let from = Health::Timeout { until };
                    // A pass right away may already satisfy rise = 1.
                    return Some(
                        self.evaluate(now)
                            .map_or(Transition { from, to: Health::Down }, |t| Transition { from, to: t.to }),
                    );
                }
                _ => return None,
            }
        }
        self.record(outcome);
        self.evaluate(now)
    }

    fn record(&mut self, outcome: Outcome) {
        let keep = self.policy.rise.max(self.policy.fall_within).max(1) as usize;
        self.history.push_back(outcome.passed());
        while self.history.len() > keep {
            self.history.pop_front();
        }
    }

    fn evaluate(&mut self, now: Duration) -> Option<Transition> {
        let next = match self.state {
            Health::Up => {
                let window = self.policy.fall_within as usize;
                let failures = self.history.iter().rev().take(window).filter(|p| !**p).count();
                (failures >= self.policy.fall.max(1) as usize).then_some(Health::Down)
            }
            Health::Down => {
                let rise = self.policy.rise.max(1) as usize;
                (self.history.len() >= rise && self.history.iter().rev().take(rise).all(|p| *p))
                    .then_some(Health::Up)
            }
            Health::Timeout { .. } => None,
        }?;
        let from = self.state;
        self.state = next;
        // After a change, only results from now on count towards the next one.
        self.history.clear();
        if let Some(flap) = self.policy.flap {
            self.changes.push_back(self.cycle);
            while self.changes.front().is_some_and(|c| self.cycle - c >= flap.within as u64) {
                self.changes.pop_front();
            }
            if self.changes.len() >= flap.changes as usize {
                self.changes.clear();
                self.state = Health::Timeout { until: flap.hold.map(|h| now + h) };
            }
        }
        Some(Transition { from, to: self.state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::spec::FlapPolicy;
    use Health::{Down, Up};

    const S: Duration = Duration::from_secs(1);

    /// `+` OK, `w` WARNING, `-` CRITICAL, `?` UNKNOWN, `E` the director's own error; one
    /// cycle per second.
    fn run(policy: Policy, start: Health, results: &str) -> Vec<Health> {
        let mut t = Tracker::starting(policy, start);
        results
            .chars()
            .enumerate()
            .map(|(i, c)| {
                let o = match c {
                    '+' => Outcome::Ok,
                    'w' => Outcome::Warning,
                    '-' => Outcome::Critical,
                    '?' => Outcome::Unknown,
                    'E' => Outcome::DirectorError,
                    _ => panic!("{c}"),
                };
                t.observe(o, S * i as u32);
                t.state()
            })
            .collect()
    }

    fn states(s: &str) -> Vec<Health> {
        s.chars()
            .map(|c| match c {
                'U' => Up,
                'D' => Down,
                'T' => Health::Timeout { until: None },
                _ => panic!("{c}"),
            })
            .collect()
    }

    /// Timeouts compare by kind only.
    fn kinds(v: &[Health]) -> Vec<&'static str> {
        v.iter().map(|h| h.name()).collect()
    }

    #[test]
    fn table() {
        let consecutive = Policy { rise: 2, fall: 3, fall_within: 3, flap: None };
        let within = Policy { rise: 1, fall: 3, fall_within: 5, flap: None };
        let flappy = Policy {
            rise: 1,
            fall: 1,
            fall_within: 1,
            flap: Some(FlapPolicy { changes: 4, within: 10, hold: None }),
        };
        #[rustfmt::skip]
        let rows: &[(&str, Policy, Health, &str, &str)] = &[
            ("three consecutive failures take it down", consecutive, Up, "+--+---", "UUUUUUD"),
            ("a pass in between resets the consecutive count", consecutive, Up, "--+--+", "UUUUUU"),
            ("two passes bring it back", consecutive, Down, "+-++", "DDDU"),
            ("WARNING passes", consecutive, Down, "ww", "DU"),
            ("UNKNOWN fails", consecutive, Up, "???", "UUD"),
            ("3 failures within 5 cycles, not consecutive", within, Up, "-+-+-", "UUUUD"),
            ("2 failures within 5 cycles is not enough", within, Up, "-+++-++", "UUUUUUU"),
            ("old failures slide out of the window", within, Up, "--+++-", "UUUUUU"),
            ("4 changes within 10 cycles: timeout", flappy, Up, "-+-+++", "DUDTTT"),
            ("3 changes within 10 cycles: no timeout", flappy, Up, "-+-", "DUD"),
            ("changes spread out do not count as flapping", flappy, Up, "-+++++++++-+++++++++-+", "DUUUUUUUUUDUUUUUUUUUDU"),
            ("the director's errors never take a server down", consecutive, Up, "EEEEEEEE", "UUUUUUUU"),
            ("nor bring one up", consecutive, Down, "EEEE", "DDDD"),
            ("nor break a run of failures", consecutive, Up, "--EEE-", "UUUUUD"),
            ("nor count as a cycle of the window", within, Up, "-E+E-EE-", "UUUUUUUD"),
        ];
        for (what, policy, start, results, want) in rows {
            let got = run(*policy, *start, results);
            assert_eq!(kinds(&got), kinds(&states(want)), "{what}");
        }
    }

    #[test]
    fn timeout_holds_then_starts_over_as_down() {
        let hold = Duration::from_secs(5);
        let policy = Policy {
            rise: 2,
            fall: 1,
            fall_within: 1,
            flap: Some(FlapPolicy { changes: 2, within: 10, hold: Some(hold) }),
        };
        let mut t = Tracker::new(policy);
        assert_eq!(t.observe(Outcome::Critical, S).map(|t| t.to), Some(Down));
        t.observe(Outcome::Ok, 2 * S);
        let up_again = t.observe(Outcome::Ok, 3 * S).unwrap();
        assert_eq!(up_again.from, Down);
        // The second change trips flap control: held until 3 s + 5 s.
        assert_eq!(up_again.to, Health::Timeout { until: Some(8 * S) });
        for i in 4..8 {
            assert_eq!(t.observe(Outcome::Ok, i * S), None, "held at {i} s whatever the checks say");
        }
        let over = t.observe(Outcome::Ok, 8 * S).unwrap();
        assert_eq!((over.from, over.to), (Health::Timeout { until: Some(8 * S) }, Down));
        assert_eq!(t.observe(Outcome::Ok, 9 * S).map(|t| t.to), Some(Up), "rise 2 counts the pass at 8 s");
    }

    #[test]
    fn nagios_exit_codes() {
        let got: Vec<Outcome> = [0, 1, 2, 3, 4, -1].into_iter().map(Outcome::from_exit_code).collect();
        use Outcome::*;
        assert_eq!(got, [Ok, Warning, Critical, Unknown, Unknown, Unknown]);
    }
}
