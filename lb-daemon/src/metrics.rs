//! Prometheus exposition of a [`Snapshot`].
//!
//! Every scrape renders a fresh registry from the snapshot: the counters live in BPF maps
//! (per-CPU, summed here), so a series is exactly what the maps say, and a service or
//! backend that left the config leaves the output with no bookkeeping to forget.

use prometheus::{Encoder as _, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use std::fmt::Write as _;

use crate::snapshot::{BackendSnapshot, BackendStatus, Snapshot};

#[derive(Debug, thiserror::Error)]
#[error("rendering metrics")]
pub struct MetricsError(#[from] prometheus::Error);

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, MetricsError> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

/// A counter family with one label, one series per `(label value, count)`.
fn counter_by(
    reg: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), MetricsError> {
    let c = counter(reg, name, help, &[label])?;
    for (value, n) in values {
        c.with_label_values(&[value]).inc_by(*n);
    }
    Ok(())
}

fn gauge(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, MetricsError> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(g.clone()))?;
    Ok(g)
}

/// One metric family written straight into the exposition text: a site of 100,000
/// backends has 3.3 million series, which a registry (a label hash map per series, then
/// sorting) renders in 18 s and 2 GiB; written in snapshot order they take a second.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
    started: bool,
    help: &'static str,
    kind: &'static str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'static str, kind: &'static str, help: &'static str) -> Self {
        Family { out, name, started: false, help, kind }
    }

    /// One series: `suffix` after the name (`_bucket`...), labels as (name, value) in
    /// name order, and the value as the exposition format writes it.
    fn series(&mut self, suffix: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        if !self.started {
            // A family with no series is left out, as the registry leaves it.
            let _ = writeln!(self.out, "# HELP {} {}", self.name, escape_help(self.help));
            let _ = writeln!(self.out, "# TYPE {} {}", self.name, self.kind);
            self.started = true;
        }
        self.out.push_str(self.name);
        self.out.push_str(suffix);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn escape_label(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(['\\', '"', '\n']) {
        v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n").into()
    } else {
        v.into()
    }
}

fn escape_help(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(['\\', '\n']) { v.replace('\\', "\\\\").replace('\n', "\\n").into() } else { v.into() }
}

/// A float as the exposition format writes it (`+Inf`, integers without a point).
struct Float(f64);

impl std::fmt::Display for Float {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_infinite() {
            return f.write_str(if self.0 > 0.0 { "+Inf" } else { "-Inf" });
        }
        write!(f, "{}", self.0)
    }
}

/// The families with a series per service or per (service, backend), in snapshot order.
fn write_service_families(out: &mut String, snap: &Snapshot) {
    type OfService = fn(&crate::snapshot::ServiceSnapshot) -> u64;
    let per_service: [(&'static str, &'static str, OfService); 3] = [
        ("lb_service_bytes_total", "Bytes balanced for the service.", |s| s.counters.bytes),
        ("lb_service_connections_total", "New connections scheduled for the service.", |s| {
            s.counters.new_flows
        }),
        ("lb_service_packets_total", "Packets balanced for the service.", |s| s.counters.packets),
    ];
    for (name, help, value) in per_service {
        let mut f = Family::new(out, name, "counter", help);
        for s in &snap.services {
            f.series("", &[("service", &s.name)], value(s));
        }
    }
    {
        let mut f = Family::new(
            out,
            "lb_service_info",
            "gauge",
            "Always 1: what the service matches and how it schedules.",
        );
        for s in &snap.services {
            let m = s.matcher.to_string();
            f.series("", &[("match", &m), ("scheduler", s.scheduler.name()), ("service", &s.name)], 1);
        }
    }
    {
        let mut f = Family::new(
            out,
            "lb_service_ring_fingerprint",
            "gauge",
            "What the service's ring holds (0: empty): equal on directors that send a flow to the same backend.",
        );
        for s in &snap.services {
            f.series("", &[("service", &s.name)], s.ring_fingerprint as u64);
        }
    }
    type Of = fn(&BackendSnapshot) -> Option<u64>;
    let per_backend: [(&'static str, &'static str, &'static str, Of); 8] = [
        (
            "lb_backend_active_connections",
            "gauge",
            "Established TCP connections in the connection table (ipvsadm ActiveConn).",
            |b| Some(b.active),
        ),
        ("lb_backend_bytes_total", "counter", "Bytes sent to the backend.", |b| Some(b.counters.bytes)),
        ("lb_backend_connections_total", "counter", "New connections sent to the backend.", |b| {
            Some(b.counters.new_flows)
        }),
        (
            "lb_backend_inactive_connections",
            "gauge",
            "Other live connection-table entries: TCP not established, UDP (ipvsadm InActConn).",
            |b| Some(b.inactive),
        ),
        ("lb_backend_packets_total", "counter", "Packets sent to the backend.", |b| Some(b.counters.packets)),
        ("lb_backend_weight", "gauge", "Configured weight.", |b| Some(b.weight as u64)),
        (
            "lb_health_flaps_total",
            "counter",
            "Times flap control held the backend down (changes into timeout).",
            |b| (!b.checks.is_empty()).then_some(b.flaps),
        ),
        ("lb_health_state_changes_total", "counter", "Health state changes (up, down, timeout).", |b| {
            (!b.checks.is_empty()).then_some(b.state_changes)
        }),
    ];
    for (name, kind, help, value) in per_backend {
        let mut f = Family::new(out, name, kind, help);
        for s in &snap.services {
            for b in &s.backends {
                if let Some(v) = value(b) {
                    f.series("", &[("backend", &b.addr.to_string()), ("service", &s.name)], v);
                }
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "lb_backend_state",
            "gauge",
            "1 for the backend's current state (active, drain, disabled, unresolved), 0 for the others.",
        );
        for s in &snap.services {
            for b in &s.backends {
                let addr = b.addr.to_string();
                for st in BackendStatus::ALL {
                    f.series(
                        "",
                        &[("backend", &addr), ("service", &s.name), ("state", st.name())],
                        (st == b.status) as u8,
                    );
                }
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "lb_backend_override_state",
            "gauge",
            "1 for a backend whose state a runtime override forces (lb-daemon drain|disable), by the forced state.",
        );
        for o in &snap.overrides {
            if let Some(state) = o.set.state {
                let addr = o.backend.to_string();
                f.series("", &[("backend", &addr), ("service", &o.service), ("state", state.name())], 1);
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "lb_backend_override_weight",
            "gauge",
            "The weight a runtime override sets (lb-daemon weight), in place of the file's.",
        );
        for o in &snap.overrides {
            if let Some(w) = o.set.weight {
                f.series("", &[("backend", &o.backend.to_string()), ("service", &o.service)], w);
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "lb_health_check_duration_seconds",
            "histogram",
            "How long health checks of the backend took.",
        );
        for s in &snap.services {
            for b in s.backends.iter().filter(|b| !b.checks.is_empty()) {
                let addr = b.addr.to_string();
                let d = &b.check_durations;
                for (le, n) in d.cumulative() {
                    let le = Float(le).to_string();
                    f.series("_bucket", &[("backend", &addr), ("service", &s.name), ("le", &le)], n);
                }
                f.series("_bucket", &[("backend", &addr), ("service", &s.name), ("le", "+Inf")], d.count);
                f.series("_sum", &[("backend", &addr), ("service", &s.name)], Float(d.sum));
                f.series("_count", &[("backend", &addr), ("service", &s.name)], d.count);
            }
        }
    }
    {
        let mut f = Family::new(
            out,
            "lb_health_checks_total",
            "counter",
            "Health-check results, by Nagios outcome (ok, warning, critical, unknown), and director_error: the director could not run the check (out of descriptors, memory, processes); the backend keeps its state.",
        );
        for s in &snap.services {
            for b in &s.backends {
                let addr = b.addr.to_string();
                for (result, n) in &b.checks {
                    f.series("", &[("backend", &addr), ("result", result), ("service", &s.name)], n);
                }
            }
        }
    }
}

/// The text exposition format (version 0.0.4).
pub fn render(snap: &Snapshot) -> Result<String, MetricsError> {
    let reg = Registry::new();
    counter_by(
        &reg,
        "lb_xdp_actions_total",
        "Verdicts of the XDP program, all packets.",
        "action",
        &snap.actions,
    )?;
    counter_by(
        &reg,
        "lb_xdp_drops_total",
        "Packets dropped by the XDP program, by reason.",
        "reason",
        &snap.drops,
    )?;
    counter_by(
        &reg,
        "lb_xdp_passes_total",
        "Service packets handed to the director's stack on purpose, by reason (no_backend: fallback_action pass).",
        "reason",
        &snap.passes,
    )?;
    let entries = IntGauge::new("lb_connection_table_entries", "Entries in the connection table (any age).")?;
    entries.set(snap.flow_entries as i64);
    reg.register(Box::new(entries))?;
    let capacity = IntGauge::new("lb_connection_table_capacity", "Size of the connection table.")?;
    capacity.set(snap.flow_capacity as i64);
    reg.register(Box::new(capacity))?;
    let evicted = counter(
        &reg,
        "lb_connection_table_evicted_recent_total",
        "New flows that took the connection-table way of a flow seen in the last 10 s (not closed): the table is too small for the traffic.",
        &[],
    )?;
    evicted.with_label_values::<&str>(&[]).inc_by(snap.flows_evicted_recent);
    let guard = IntGauge::new(
        "lb_xdp_flood_guard_active",
        "CPUs whose new-flow rate is over director.flood_guard_flows_per_sec now (their new flows go unrecorded).",
    )?;
    guard.set(snap.flood_guard_active_cpus as i64);
    reg.register(Box::new(guard))?;
    let unrecorded = counter(
        &reg,
        "lb_xdp_flows_unrecorded_total",
        "New flows forwarded by the ring but not recorded in the connection table (flood guard).",
        &[],
    )?;
    unrecorded.with_label_values::<&str>(&[]).inc_by(snap.flows_unrecorded);
    let icmp = counter(
        &reg,
        "lb_xdp_icmp_forwarded_total",
        "ICMP errors about a service's flow (fragmentation needed, unreachable, ...) forwarded to the flow's backend.",
        &["family", "type"],
    )?;
    for (family, kind, v) in &snap.icmp_forwarded {
        icmp.with_label_values(&[family, kind]).inc_by(*v);
    }
    counter_by(
        &reg,
        "lb_xdp_too_big_sent_total",
        "ICMP fragmentation-needed / ICMPv6 packet-too-big answers to clients whose packet did not fit the tunnel to its backend.",
        "family",
        &snap.too_big_sent,
    )?;
    counter_by(
        &reg,
        "lb_xdp_fragments_total",
        "Fragments of services' datagrams forwarded: first fragments, later ones that followed their first, later ones placed by an sh service's ring.",
        "outcome",
        &snap.fragments,
    )?;
    counter_by(
        &reg,
        "lb_xdp_nat_replies_total",
        "NAT backends' replies translated back to their VIP: sent to the client's next hop, or handed to the kernel to forward (no neighbour entry yet, or longer than the route's MTU).",
        "outcome",
        &snap.nat_replies,
    )?;
    counter_by(
        &reg,
        "lb_connection_log_events_total",
        "New connections reported to the connection log, by outcome: written; dropped over max_events_per_sec, on a write error, or naming a service a reload removed; lost because the kernel's ring buffer was full.",
        "outcome",
        &snap.conn_log,
    )?;
    if !snap.config_digest.is_empty() {
        let info = gauge(
            &reg,
            "lb_config_info",
            "Always 1: the SHA-256 of the configuration file in force (as sha256sum prints it).",
            &["digest"],
        )?;
        info.with_label_values(&[snap.config_digest.as_str()]).set(1);
    }
    let reloads =
        counter(&reg, "lb_config_reloads_total", "Configuration loads and reloads, by result.", &["result"])?;
    reloads.with_label_values(&["success"]).inc_by(snap.reloads_ok);
    reloads.with_label_values(&["failure"]).inc_by(snap.reloads_failed);
    if let Some(t) = snap.last_reload_success {
        let g = GaugeVec::new(
            Opts::new(
                "lb_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful configuration load.",
            ),
            &[],
        )?;
        g.with_label_values::<&str>(&[]).set(t);
        reg.register(Box::new(g))?;
    }
    if let Some(r) = &snap.routing {
        let objects =
            gauge(&reg, "lb_routing_objects", "The daemon's routes and rules in the kernel.", &["kind"])?;
        objects.with_label_values(&["route"]).set(r.routes as i64);
        objects.with_label_values(&["rule"]).set(r.rules as i64);
        let failed = IntGauge::new(
            "lb_routing_objects_failed",
            "Declared routes and rules the kernel refused (or whose device is missing) at the last reconciliation.",
        )?;
        failed.set(r.errors.len() as i64);
        reg.register(Box::new(failed))?;
        let clashes = IntGauge::new(
            "lb_routing_table_clashes",
            "Declared tables that also hold routes of other programs.",
        )?;
        clashes.set(r.warnings.len() as i64);
        reg.register(Box::new(clashes))?;
        let broken = IntGauge::new(
            "lb_routing_reconcile_failed",
            "1 when the last reconciliation could not read or change the kernel's tables.",
        )?;
        broken.set(i64::from(r.failure.is_some()));
        reg.register(Box::new(broken))?;
        let changes = counter(
            &reg,
            "lb_routing_changes_total",
            "Routes and rules the daemon added, replaced, removed.",
            &["op"],
        )?;
        changes.with_label_values(&["add"]).inc_by(r.added);
        changes.with_label_values(&["replace"]).inc_by(r.replaced);
        changes.with_label_values(&["remove"]).inc_by(r.removed);
    }
    let build = gauge(&reg, "lb_build_info", "Always 1: the running version.", &["version", "map_layout"])?;
    build.with_label_values(&[env!("CARGO_PKG_VERSION"), &lb_common::MAP_LAYOUT_VERSION.to_string()]).set(1);

    let mut text = String::new();
    write_service_families(&mut text, snap);
    let mut out = Vec::new();
    TextEncoder::new().encode(&reg.gather(), &mut out)?;
    text.push_str(&String::from_utf8_lossy(&out));
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Forward;
    use crate::model::{Protocol, Scheduler, ServiceMatch};
    use crate::snapshot::{BackendSnapshot, ServiceSnapshot};
    use lb_common::Counters;

    #[test]
    fn label_values_and_help_are_escaped_as_the_text_format_wants() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_label("10.1.0.1"), "10.1.0.1");
        assert_eq!(escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
        assert_eq!(Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!((Float(1.0).to_string(), Float(0.005).to_string()), ("1".into(), "0.005".into()));
    }

    #[test]
    fn series_carry_the_snapshot_values() {
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
                ring_fingerprint: 0xdead_beef,
                forward: Forward::Dr,
                counters: Counters { packets: 12, bytes: 3400, new_flows: 2 },
                backends: vec![BackendSnapshot {
                    counters: Counters { packets: 7, bytes: 700, new_flows: 1 },
                    active: 1,
                    inactive: 0,
                    checks: vec![("ok", 4), ("critical", 1)],
                    state_changes: 2,
                    flaps: 1,
                    check_durations: {
                        let mut d = crate::health::board::Durations::default();
                        d.observe(std::time::Duration::from_millis(3));
                        d.observe(std::time::Duration::from_millis(250));
                        d
                    },
                    ..BackendSnapshot::quiet(
                        "10.0.2.11".parse().unwrap(),
                        5,
                        crate::snapshot::BackendStatus::Active,
                    )
                }],
            }],
            overrides: vec![
                crate::snapshot::OverrideSnapshot {
                    service: "web".into(),
                    backend: "10.0.2.11".parse().unwrap(),
                    set: crate::model::Override {
                        state: Some(crate::model::ForcedState::Drain),
                        weight: Some(0),
                    },
                    stale: false,
                },
                crate::snapshot::OverrideSnapshot {
                    service: "web".into(),
                    backend: "10.0.2.99".parse().unwrap(),
                    set: crate::model::Override { state: None, weight: Some(3) },
                    stale: true,
                },
            ],
            actions: vec![("tx", 9)],
            drops: vec![("malformed", 2)],
            passes: vec![("no_backend", 4)],
            reloads_ok: 3,
            reloads_failed: 1,
            config_digest: "ab12".into(),
            last_reload_success: Some(1_700_000_000.5),
            routing: Some(crate::snapshot::RoutingSnapshot {
                protocol: 250,
                routes: 3,
                rules: 2,
                errors: vec!["routing.routes[1] (...): Network is unreachable".into()],
                warnings: vec![],
                failure: None,
                added: 5,
                replaced: 1,
                removed: 0,
            }),
            ..Default::default()
        };
        let text = render(&snap).unwrap();
        for line in [
            "lb_service_packets_total{service=\"web\"} 12",
            "lb_service_bytes_total{service=\"web\"} 3400",
            "lb_backend_packets_total{backend=\"10.0.2.11\",service=\"web\"} 7",
            "lb_backend_active_connections{backend=\"10.0.2.11\",service=\"web\"} 1",
            "lb_backend_state{backend=\"10.0.2.11\",service=\"web\",state=\"active\"} 1",
            "lb_backend_state{backend=\"10.0.2.11\",service=\"web\",state=\"drain\"} 0",
            "lb_xdp_actions_total{action=\"tx\"} 9",
            "lb_xdp_drops_total{reason=\"malformed\"} 2",
            "lb_xdp_passes_total{reason=\"no_backend\"} 4",
            "lb_config_reloads_total{result=\"failure\"} 1",
            "lb_config_last_reload_success_timestamp_seconds 1700000000.5",
            "lb_config_info{digest=\"ab12\"} 1",
            "lb_service_ring_fingerprint{service=\"web\"} 3735928559",
            "lb_backend_override_state{backend=\"10.0.2.11\",service=\"web\",state=\"drain\"} 1",
            "lb_backend_override_weight{backend=\"10.0.2.11\",service=\"web\"} 0",
            "lb_backend_override_weight{backend=\"10.0.2.99\",service=\"web\"} 3",
            "# TYPE lb_backend_bytes_total counter",
            "lb_health_checks_total{backend=\"10.0.2.11\",result=\"critical\",service=\"web\"} 1",
            "lb_health_state_changes_total{backend=\"10.0.2.11\",service=\"web\"} 2",
            "lb_health_flaps_total{backend=\"10.0.2.11\",service=\"web\"} 1",
            "lb_routing_objects{kind=\"route\"} 3",
            "lb_routing_objects{kind=\"rule\"} 2",
            "lb_routing_objects_failed 1",
            "lb_routing_table_clashes 0",
            "lb_routing_reconcile_failed 0",
            "lb_routing_changes_total{op=\"add\"} 5",
            "lb_routing_changes_total{op=\"remove\"} 0",
            "# TYPE lb_health_check_duration_seconds histogram",
            "lb_health_check_duration_seconds_bucket{backend=\"10.0.2.11\",service=\"web\",le=\"0.0025\"} 0",
            "lb_health_check_duration_seconds_bucket{backend=\"10.0.2.11\",service=\"web\",le=\"0.005\"} 1",
            "lb_health_check_duration_seconds_bucket{backend=\"10.0.2.11\",service=\"web\",le=\"0.25\"} 2",
            "lb_health_check_duration_seconds_bucket{backend=\"10.0.2.11\",service=\"web\",le=\"+Inf\"} 2",
            "lb_health_check_duration_seconds_sum{backend=\"10.0.2.11\",service=\"web\"} 0.253",
            "lb_health_check_duration_seconds_count{backend=\"10.0.2.11\",service=\"web\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
