//! Prometheus exposition of a [`Snapshot`].
//!
//! Every scrape renders a fresh registry from the snapshot: the counters live in BPF maps
//! (per-CPU, summed here), so a series is exactly what the maps say, and a service or
//! backend that left the config leaves the output with no bookkeeping to forget.

use prometheus::{Encoder as _, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::snapshot::{BackendStatus, Snapshot};

#[derive(Debug, thiserror::Error)]
#[error("rendering metrics")]
pub struct MetricsError(#[from] prometheus::Error);

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, MetricsError> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, MetricsError> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(g.clone()))?;
    Ok(g)
}

/// `lb_health_check_duration_seconds`, built from the board's bucket counts: the crate's
/// own histograms can only observe, and a scrape renders what the daemon already counted.
#[derive(Default)]
struct DurationFamily(Vec<prometheus::proto::Metric>);

impl DurationFamily {
    fn add(&mut self, service: &str, backend: &str, d: &crate::health::board::Durations) {
        use prometheus::proto::{Bucket, Histogram, LabelPair, Metric};
        let label = |name: &str, value: &str| {
            let mut l = LabelPair::default();
            l.set_name(name.into());
            l.set_value(value.into());
            l
        };
        let mut h = Histogram::default();
        h.set_sample_count(d.count);
        h.set_sample_sum(d.sum);
        h.set_bucket(
            d.cumulative()
                .map(|(le, n)| {
                    let mut b = Bucket::default();
                    b.set_upper_bound(le);
                    b.set_cumulative_count(n);
                    b
                })
                .collect(),
        );
        let mut m = Metric::from_label(vec![label("backend", backend), label("service", service)]);
        m.set_histogram(h);
        self.0.push(m);
    }

    fn family(self) -> Option<prometheus::proto::MetricFamily> {
        if self.0.is_empty() {
            return None;
        }
        let mut f = prometheus::proto::MetricFamily::default();
        f.set_name("lb_health_check_duration_seconds".into());
        f.set_help("How long health checks of the backend took.".into());
        f.set_field_type(prometheus::proto::MetricType::HISTOGRAM);
        f.set_metric(self.0);
        Some(f)
    }
}

/// The text exposition format (version 0.0.4).
pub fn render(snap: &Snapshot) -> Result<String, MetricsError> {
    let reg = Registry::new();
    let svc_packets =
        counter(&reg, "lb_service_packets_total", "Packets balanced for the service.", &["service"])?;
    let svc_bytes = counter(&reg, "lb_service_bytes_total", "Bytes balanced for the service.", &["service"])?;
    let svc_conns = counter(
        &reg,
        "lb_service_connections_total",
        "New connections scheduled for the service.",
        &["service"],
    )?;
    let labels = ["service", "backend"];
    let be_packets = counter(&reg, "lb_backend_packets_total", "Packets sent to the backend.", &labels)?;
    let be_bytes = counter(&reg, "lb_backend_bytes_total", "Bytes sent to the backend.", &labels)?;
    let be_conns =
        counter(&reg, "lb_backend_connections_total", "New connections sent to the backend.", &labels)?;
    let be_active = gauge(
        &reg,
        "lb_backend_active_connections",
        "Established TCP connections in the connection table (ipvsadm ActiveConn).",
        &labels,
    )?;
    let be_inactive = gauge(
        &reg,
        "lb_backend_inactive_connections",
        "Other live connection-table entries: TCP not established, UDP (ipvsadm InActConn).",
        &labels,
    )?;
    let be_weight = gauge(&reg, "lb_backend_weight", "Configured weight.", &labels)?;
    let be_state = gauge(
        &reg,
        "lb_backend_state",
        "1 for the backend's current state (active, drain, disabled, unresolved), 0 for the others.",
        &["service", "backend", "state"],
    )?;
    let checks = counter(
        &reg,
        "lb_health_checks_total",
        "Health-check results, by Nagios outcome (ok, warning, critical, unknown), and director_error: the director could not run the check (out of descriptors, memory, processes); the backend keeps its state.",
        &["service", "backend", "result"],
    )?;
    let changes =
        counter(&reg, "lb_health_state_changes_total", "Health state changes (up, down, timeout).", &labels)?;
    let flaps = counter(
        &reg,
        "lb_health_flaps_total",
        "Times flap control held the backend down (changes into timeout).",
        &labels,
    )?;
    let mut durations = DurationFamily::default();
    for s in &snap.services {
        let name = s.name.as_str();
        svc_packets.with_label_values(&[name]).inc_by(s.counters.packets);
        svc_bytes.with_label_values(&[name]).inc_by(s.counters.bytes);
        svc_conns.with_label_values(&[name]).inc_by(s.counters.new_flows);
        for b in &s.backends {
            let addr = b.addr.to_string();
            let l = [name, addr.as_str()];
            be_packets.with_label_values(&l).inc_by(b.counters.packets);
            be_bytes.with_label_values(&l).inc_by(b.counters.bytes);
            be_conns.with_label_values(&l).inc_by(b.counters.new_flows);
            be_active.with_label_values(&l).set(b.active as i64);
            be_inactive.with_label_values(&l).set(b.inactive as i64);
            be_weight.with_label_values(&l).set(b.weight as i64);
            for (result, n) in &b.checks {
                checks.with_label_values(&[name, addr.as_str(), result]).inc_by(*n);
            }
            if !b.checks.is_empty() {
                changes.with_label_values(&l).inc_by(b.state_changes);
                flaps.with_label_values(&l).inc_by(b.flaps);
                durations.add(name, &addr, &b.check_durations);
            }
            for st in BackendStatus::ALL {
                be_state.with_label_values(&[name, addr.as_str(), st.name()]).set((st == b.status) as i64);
            }
        }
    }
    let svc_info = gauge(
        &reg,
        "lb_service_info",
        "Always 1: what the service matches and how it schedules.",
        &["service", "match", "scheduler"],
    )?;
    for s in &snap.services {
        svc_info.with_label_values(&[s.name.as_str(), &s.matcher.to_string(), s.scheduler.name()]).set(1);
    }
    let actions =
        counter(&reg, "lb_xdp_actions_total", "Verdicts of the XDP program, all packets.", &["action"])?;
    for (name, v) in &snap.actions {
        actions.with_label_values(&[name]).inc_by(*v);
    }
    let drops =
        counter(&reg, "lb_xdp_drops_total", "Packets dropped by the XDP program, by reason.", &["reason"])?;
    for (name, v) in &snap.drops {
        drops.with_label_values(&[name]).inc_by(*v);
    }
    let passes = counter(
        &reg,
        "lb_xdp_passes_total",
        "Service packets handed to the director's stack on purpose, by reason (no_backend: fallback_action pass).",
        &["reason"],
    )?;
    for (name, v) in &snap.passes {
        passes.with_label_values(&[name]).inc_by(*v);
    }
    let entries = IntGauge::new("lb_connection_table_entries", "Entries in the connection table (any age).")?;
    entries.set(snap.flow_entries as i64);
    reg.register(Box::new(entries))?;
    let capacity = IntGauge::new("lb_connection_table_capacity", "Size of the connection table.")?;
    capacity.set(snap.flow_capacity as i64);
    reg.register(Box::new(capacity))?;
    let cpu_entries = gauge(
        &reg,
        "lb_connection_table_cpu_entries",
        "Entries recorded by each CPU; a CPU evicts from its own share once it holds lb_connection_table_cpu_capacity.",
        &["cpu"],
    )?;
    for (cpu, n) in snap.flow_entries_per_cpu.iter().enumerate() {
        cpu_entries.with_label_values(&[cpu.to_string().as_str()]).set(*n as i64);
    }
    let cpu_capacity = IntGauge::new(
        "lb_connection_table_cpu_capacity",
        "Each CPU's share of the connection table (per-CPU LRU lists): the capacity over the possible CPUs.",
    )?;
    cpu_capacity.set(snap.flow_capacity_per_cpu as i64);
    reg.register(Box::new(cpu_capacity))?;
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

    let mut families = reg.gather();
    families.extend(durations.family());
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Forward;
    use crate::model::{Protocol, Scheduler, ServiceMatch};
    use crate::snapshot::{BackendSnapshot, ServiceSnapshot};
    use lb_common::Counters;

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
                forward: Forward::Dr,
                counters: Counters { packets: 12, bytes: 3400, new_flows: 2 },
                backends: vec![BackendSnapshot {
                    addr: "10.0.2.11".parse().unwrap(),
                    weight: 5,
                    status: crate::snapshot::BackendStatus::Active,
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
                    last_check: None,
                    last_outcome: None,
                }],
            }],
            actions: vec![("tx", 9)],
            drops: vec![("malformed", 2)],
            passes: vec![("no_backend", 4)],
            reloads_ok: 3,
            reloads_failed: 1,
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
