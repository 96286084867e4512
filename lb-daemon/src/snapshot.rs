//! A point-in-time view of the balancer (config, plan, counters, connection table), and
//! its rendering as the `ipvsadm -L -n`-style status table. Pure: the daemon gathers the
//! numbers, this module only shapes them.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use lb_common::{Counters, FLOW_CLOSED, FLOW_ESTABLISHED, FLOW_MIDSTREAM, FLOW_UDP, Flow};

use crate::model::{Forward, Scheduler, ServiceMatch, XdpMode};

/// How long an entry still counts as a connection, per state: IPVS's default timeouts
/// (`ipvsadm --timeout`: tcp 900 s, tcpfin 120 s, udp 300 s). Entries past these stay
/// in the table until a new flow takes their way.
pub const TCP_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(900);
pub const TCP_OTHER_TIMEOUT: Duration = Duration::from_secs(120);
pub const UDP_TIMEOUT: Duration = Duration::from_secs(300);
/// A connection closed by a RST, or by FINs from both sides (which only NAT flows show the
/// director): IPVS's CLOSE timeout.
pub const TCP_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection-table entry counts as, as `ipvsadm` counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnKind {
    /// TCP in ESTABLISHED.
    Active,
    /// Any other TCP state, and UDP.
    Inactive,
}

/// Now, on the clock the data path stamps flows and flood windows with
/// (`bpf_ktime_get_coarse_ns`: CLOCK_MONOTONIC_COARSE), in nanoseconds.
pub fn flow_clock_ns() -> std::io::Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)?;
    Ok(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// `now_ns` is on the clock the data path stamps entries with ([`flow_clock_ns`]).
/// A flow first seen mid-stream counts as nothing until the data path confirms it: junk
/// with the ACK flag must not inflate ActiveConn or InActConn.
pub fn classify(flow: &Flow, now_ns: u64) -> Option<ConnKind> {
    let age = Duration::from_nanos(now_ns.saturating_sub(flow.last_seen_ns));
    let (kind, timeout) = match flow.state {
        FLOW_MIDSTREAM => return None,
        FLOW_ESTABLISHED => (ConnKind::Active, TCP_ESTABLISHED_TIMEOUT),
        FLOW_UDP => (ConnKind::Inactive, UDP_TIMEOUT),
        FLOW_CLOSED => (ConnKind::Inactive, TCP_CLOSE_TIMEOUT),
        _ => (ConnKind::Inactive, TCP_OTHER_TIMEOUT),
    };
    (age <= timeout).then_some(kind)
}

/// Operator-facing state of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendStatus {
    Active,
    Drain,
    Disabled,
    /// Its link-layer address is unknown: it receives nothing until resolved.
    Unresolved,
    /// Its health check holds it down.
    Down,
    /// Flap control holds it down (monit's "timeout").
    Timeout,
    /// The service's fallback, taking its new flows: no backend can.
    Fallback,
    /// The service's fallback while backends serve (it only finishes flows it took).
    Standby,
}

impl BackendStatus {
    pub const ALL: [BackendStatus; 8] = [
        BackendStatus::Active,
        BackendStatus::Drain,
        BackendStatus::Disabled,
        BackendStatus::Unresolved,
        BackendStatus::Down,
        BackendStatus::Timeout,
        BackendStatus::Fallback,
        BackendStatus::Standby,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BackendStatus::Active => "active",
            BackendStatus::Drain => "drain",
            BackendStatus::Disabled => "disabled",
            BackendStatus::Unresolved => "unresolved",
            BackendStatus::Down => "down",
            BackendStatus::Timeout => "timeout",
            BackendStatus::Fallback => "fallback",
            BackendStatus::Standby => "standby",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendSnapshot {
    pub addr: IpAddr,
    /// A NAT backend's own port (`None`: the service's).
    pub port: Option<u16>,
    /// How packets reach it (a backend may differ from its service).
    pub forward: Forward,
    pub weight: u32,
    pub status: BackendStatus,
    pub counters: Counters,
    pub active: u64,
    pub inactive: u64,
    /// Health-check results by outcome (empty without a check).
    pub checks: Vec<(&'static str, u64)>,
    pub state_changes: u64,
    /// Changes into `timeout`.
    pub flaps: u64,
    /// How long this backend's checks took.
    pub check_durations: crate::health::board::Durations,
    /// What the last check said.
    pub last_check: Option<String>,
    /// Its outcome (`ok`, `warning`, `critical`, `unknown`, `director_error`).
    pub last_outcome: Option<&'static str>,
    /// What an operator's runtime override replaces of the file's state and weight.
    pub overridden: Option<crate::model::Override>,
}

impl BackendSnapshot {
    /// A backend without traffic, checks or overrides, for tests to change what they show.
    pub fn quiet(addr: IpAddr, weight: u32, status: BackendStatus) -> Self {
        BackendSnapshot {
            addr,
            port: None,
            forward: Forward::Dr,
            weight,
            status,
            counters: Counters::default(),
            active: 0,
            inactive: 0,
            checks: Vec::new(),
            state_changes: 0,
            flaps: 0,
            check_durations: Default::default(),
            last_check: None,
            last_outcome: None,
            overridden: None,
        }
    }
}

/// A runtime override, as `lb-daemon drain|disable|weight` left it.
#[derive(Clone, Debug, PartialEq)]
pub struct OverrideSnapshot {
    pub service: String,
    pub backend: IpAddr,
    pub set: crate::model::Override,
    /// The file no longer has this service or backend: kept, but changes nothing.
    pub stale: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceSnapshot {
    pub name: String,
    pub matcher: ServiceMatch,
    pub scheduler: Scheduler,
    pub ring_size: u32,
    /// What the ring holds, as `model::fingerprint` (0: empty); equal on directors that
    /// send a flow to the same backend.
    pub ring_fingerprint: u32,
    pub forward: Forward,
    pub counters: Counters,
    pub backends: Vec<BackendSnapshot>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub services: Vec<ServiceSnapshot>,
    /// XDP action totals by name.
    pub actions: Vec<(&'static str, u64)>,
    /// Drops by reason.
    pub drops: Vec<(&'static str, u64)>,
    /// Packets handed to the stack on purpose, by reason.
    pub passes: Vec<(&'static str, u64)>,
    pub flow_entries: u64,
    pub flow_capacity: u32,
    /// How old the connection counts (ActiveConn, InActConn, entries) are: one walk of the
    /// table serves every request for a few seconds.
    pub conn_counts_age: std::time::Duration,
    /// New flows that took the way of a flow seen in the last 10 s: the table is too
    /// small for the traffic (`stat::FLOWS_EVICTED_RECENT`).
    pub flows_evicted_recent: u64,
    /// CPUs whose new-flow rate is over the flood guard's limit now.
    pub flood_guard_active_cpus: u32,
    /// New flows forwarded without being recorded while the guard was active.
    pub flows_unrecorded: u64,
    /// ICMP errors about a service's flow forwarded to its backend, by (family, type).
    pub icmp_forwarded: Vec<(&'static str, &'static str, u64)>,
    /// "Too big" answers to clients whose packet did not fit a tunnel, by family.
    pub too_big_sent: Vec<(&'static str, u64)>,
    /// Fragments forwarded, by outcome (first, followed_first, by_ring).
    pub fragments: Vec<(&'static str, u64)>,
    /// NAT backends' replies translated, by where they went.
    pub nat_replies: Vec<(&'static str, u64)>,
    /// The connection log's events by outcome: written, dropped (and why), lost in the
    /// kernel's full ring buffer.
    pub conn_log: Vec<(&'static str, u64)>,
    pub interfaces: Vec<(String, XdpMode)>,
    /// SHA-256 of the config file in force (as `sha256sum` prints it).
    pub config_digest: String,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Unix time of the last successful load or reload.
    pub last_reload_success: Option<f64>,
    /// Why the last reload failed, if the last one did.
    pub last_reload_error: Option<String>,
    /// `None` while the daemon manages no route or rule.
    pub routing: Option<RoutingSnapshot>,
    /// Runtime overrides, in (service, backend) order.
    pub overrides: Vec<OverrideSnapshot>,
}

/// The daemon's routes and rules after its last reconciliation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutingSnapshot {
    pub protocol: u8,
    pub routes: u64,
    pub rules: u64,
    /// Objects the kernel refused (or that name a missing device): what and why.
    pub errors: Vec<String>,
    /// Applied, but worth a look (a declared table other programs use too).
    pub warnings: Vec<String>,
    /// Why the kernel's tables could not be read or changed at all.
    pub failure: Option<String>,
    pub added: u64,
    pub replaced: u64,
    pub removed: u64,
}

fn endpoint(addr: IpAddr, port: Option<u16>) -> String {
    match (addr, port) {
        (IpAddr::V4(a), Some(p)) => format!("{a}:{p}"),
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, None) => a.to_string(),
    }
}

impl Snapshot {
    /// The status table: `ipvsadm -L -n` columns, plus each backend's state.
    pub fn status_table(&self) -> String {
        let mut out = String::new();
        let ifaces: Vec<String> = self
            .interfaces
            .iter()
            .map(|(name, mode)| {
                format!("{name} ({})", if *mode == XdpMode::Native { "native" } else { "generic" })
            })
            .collect();
        let _ = writeln!(
            out,
            "lb-daemon {} on {}; connection table {}/{} entries",
            env!("CARGO_PKG_VERSION"),
            if ifaces.is_empty() { "no interface".to_owned() } else { ifaces.join(", ") },
            self.flow_entries,
            self.flow_capacity
        );
        if !self.config_digest.is_empty() {
            let _ = writeln!(out, "config sha256 {}", self.config_digest);
        }
        if let Some(e) = &self.last_reload_error {
            let _ = writeln!(out, "last reload FAILED (old config still serving): {e}");
        }
        if let Some(r) = &self.routing {
            let _ = writeln!(
                out,
                "routing (protocol {}): {} routes, {} rules{}",
                r.protocol,
                r.routes,
                r.rules,
                if r.errors.is_empty() {
                    String::new()
                } else {
                    format!("; {} NOT applied:", r.errors.len())
                }
            );
            for e in &r.errors {
                let _ = writeln!(out, "  ! {e}");
            }
            for w in &r.warnings {
                let _ = writeln!(out, "  ? {w}");
            }
            if let Some(f) = &r.failure {
                let _ = writeln!(out, "  ! routing not reconciled: {f}");
            }
        }
        if !self.overrides.is_empty() {
            let _ = writeln!(
                out,
                "{} runtime overrides, marked below (`lb-daemon enable` or `lb-daemon overrides clear` removes them)",
                self.overrides.len()
            );
            // The ones the table below cannot show: their backend left the file.
            for o in self.overrides.iter().filter(|o| o.stale) {
                let _ = writeln!(
                    out,
                    "  ? {} {}: {} (not in the config: kept, changes nothing)",
                    o.service, o.backend, o.set
                );
            }
        }
        let _ = writeln!(out, "Prot LocalAddress:Port Scheduler Flags");
        let _ = writeln!(
            out,
            "  -> {:<28} {:<7} {:>6} {:>10} {:>10} State",
            "RemoteAddress:Port", "Forward", "Weight", "ActiveConn", "InActConn"
        );
        for s in &self.services {
            let (prot, local, port) = match s.matcher {
                ServiceMatch::Vip { addr, port, proto } => {
                    (proto.name().to_uppercase(), endpoint(addr, Some(port)), Some(port))
                }
                ServiceMatch::Mark(m) => ("FWM".to_owned(), m.to_string(), None),
            };
            let _ = writeln!(
                out,
                "{prot:<4} {local} {} ring {} fp {:08x} ({})",
                s.scheduler.name(),
                s.ring_size,
                s.ring_fingerprint,
                s.name
            );
            for b in &s.backends {
                let _ = writeln!(
                    out,
                    "  -> {:<28} {:<7} {:>6} {:>10} {:>10} {}{}",
                    endpoint(b.addr, b.port.or(port)),
                    b.forward.ipvs_name(),
                    b.weight,
                    b.active,
                    b.inactive,
                    b.status.name(),
                    b.overridden.map(|o| format!(" (override: {o})")).unwrap_or_default()
                );
                // Why a backend is out; and for one still in, a check that said more than OK
                // (WARNING lowers the weight, and a WARNING that is no plugin's keeps a dead
                // server in: both must be visible).
                let noteworthy = matches!(b.status, BackendStatus::Down | BackendStatus::Timeout)
                    || b.last_outcome.is_some_and(|o| o != "ok");
                if noteworthy && let Some(why) = &b.last_check {
                    match b.last_outcome {
                        Some(outcome) if outcome != "critical" => {
                            let _ = writeln!(out, "     last check ({outcome}): {why}");
                        }
                        _ => {
                            let _ = writeln!(out, "     last check: {why}");
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use lb_common::{FLOW_FIN, FLOW_SYN_SENT};

    fn flow(state: u16, last_seen_ns: u64) -> Flow {
        Flow { state, last_seen_ns, ..Default::default() }
    }

    #[test]
    fn connections_count_by_state_and_age() {
        let now = 10_000 * 1_000_000_000u64;
        let s = |secs: u64| now - secs * 1_000_000_000;
        assert_eq!(classify(&flow(FLOW_ESTABLISHED, s(899)), now), Some(ConnKind::Active));
        assert_eq!(classify(&flow(FLOW_ESTABLISHED, s(901)), now), None);
        assert_eq!(classify(&flow(FLOW_SYN_SENT, s(5)), now), Some(ConnKind::Inactive));
        assert_eq!(classify(&flow(FLOW_FIN, s(121)), now), None);
        assert_eq!(classify(&flow(FLOW_CLOSED, s(9)), now), Some(ConnKind::Inactive));
        assert_eq!(classify(&flow(FLOW_CLOSED, s(11)), now), None, "closed connections go quickly");
        assert_eq!(classify(&flow(FLOW_UDP, s(299)), now), Some(ConnKind::Inactive));
        // A stamp from the future (another CPU's clock read) is fresh, not ancient.
        assert_eq!(classify(&flow(FLOW_ESTABLISHED, now + 5), now), Some(ConnKind::Active));
    }

    #[test]
    fn status_names_each_route_or_rule_not_applied() {
        let snap = Snapshot {
            routing: Some(RoutingSnapshot {
                protocol: 250,
                routes: 2,
                rules: 1,
                errors: vec![
                    "routing.routes[0] (10.0.0.0/8 via 10.99.0.1 table 100): Network is unreachable".into(),
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let table = snap.status_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[1], "routing (protocol 250): 2 routes, 1 rules; 1 NOT applied:");
        assert_eq!(
            lines[2],
            "  ! routing.routes[0] (10.0.0.0/8 via 10.99.0.1 table 100): Network is unreachable"
        );
        assert!(lines[3].starts_with("Prot "), "{table}");
    }

    #[test]
    fn the_table_reads_like_ipvsadm() {
        let snap = Snapshot {
            services: vec![ServiceSnapshot {
                name: "web".into(),
                matcher: ServiceMatch::Vip {
                    addr: "192.0.2.10".parse().unwrap(),
                    port: 80,
                    proto: Protocol::Tcp,
                },
                scheduler: Scheduler::Sh,
                ring_size: 4093,
                ring_fingerprint: 0x0a1b_2c3d,
                forward: Forward::Dr,
                counters: Counters::default(),
                backends: vec![BackendSnapshot {
                    active: 3,
                    inactive: 1,
                    ..BackendSnapshot::quiet("10.0.2.11".parse().unwrap(), 100, BackendStatus::Drain)
                }],
            }],
            flow_capacity: 65536,
            flow_entries: 4,
            interfaces: vec![("ext0".into(), XdpMode::Native)],
            config_digest: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            ..Default::default()
        };
        let table = snap.status_table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].ends_with("on ext0 (native); connection table 4/65536 entries"), "{table}");
        assert_eq!(
            lines[1],
            "config sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(lines[4], "TCP  192.0.2.10:80 sh ring 4093 fp 0a1b2c3d (web)");
        let cols: Vec<&str> = lines[5].split_whitespace().collect();
        assert_eq!(cols, ["->", "10.0.2.11:80", "Route", "100", "3", "1", "drain"]);
        assert_eq!(lines.len(), 6, "an OK check adds no line: {table}");

        // Overrides: marked on their backend's line; one whose backend left the file, listed.
        let mut overridden = snap.clone();
        let set = crate::model::Override { state: Some(crate::model::ForcedState::Drain), weight: Some(7) };
        overridden.services[0].backends[0].overridden = Some(set);
        overridden.overrides = vec![
            OverrideSnapshot {
                service: "web".into(),
                backend: "10.0.2.11".parse().unwrap(),
                set,
                stale: false,
            },
            OverrideSnapshot {
                service: "web".into(),
                backend: "10.0.2.99".parse().unwrap(),
                set: crate::model::Override {
                    state: Some(crate::model::ForcedState::Disabled),
                    weight: None,
                },
                stale: true,
            },
        ];
        let table = overridden.status_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[2],
            "2 runtime overrides, marked below (`lb-daemon enable` or `lb-daemon overrides clear` removes them)"
        );
        assert_eq!(lines[3], "  ? web 10.0.2.99: disabled (not in the config: kept, changes nothing)");
        assert!(lines[7].ends_with(" drain (override: drain, weight 7)"), "{table}");

        // An active backend whose check said WARNING shows it, with the message.
        let mut warned = snap.clone();
        let b = &mut warned.services[0].backends[0];
        b.status = BackendStatus::Active;
        b.last_outcome = Some("warning");
        b.last_check = Some("This account is currently not available. [exit 1 (WARNING) ...]".into());
        let table = warned.status_table();
        assert_eq!(
            table.lines().nth(6),
            Some(
                "     last check (warning): This account is currently not available. [exit 1 (WARNING) ...]"
            ),
            "{table}"
        );
    }
}
