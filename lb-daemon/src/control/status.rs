//! Status and metrics assembly. Under the daemon's lock only what it owns is copied (the
//! services, their backends' states, ids); the counters, one map entry per service and
//! backend (100,000 at a large site), are read after the lock is let go, and the
//! connection counts come from a walk made outside it (`conns`). A health change or a
//! reload therefore never waits for a scrape's map reads.

use std::sync::Arc;

use crate::dataplane::CounterReader;

use lb_common::Counters;

use super::*;

/// What the endpoints read: the daemon, and counters and connection counts read outside
/// its lock.
pub(super) struct Views {
    pub(super) daemon: Arc<Mutex<Daemon>>,
    pub(super) conns: ConnCounter,
    pub(super) counters: Arc<CounterReader>,
}

/// A snapshot's counter ids: per service, its id and its backends' ids, in order.
pub(super) struct CounterIds {
    services: Vec<(u32, Vec<u32>)>,
    epoch: u64,
}

/// Reads tried outside the lock before one is made under it (ids moved each time).
const UNLOCKED_TRIES: usize = 3;

pub(super) async fn snapshot_of(views: &Views) -> Result<Snapshot> {
    let conns = views.conns.counts().await?;
    let (daemon, counters) = (Arc::clone(&views.daemon), Arc::clone(&views.counters));
    super::blocking("snapshot task", move || {
        for _ in 0..UNLOCKED_TRIES {
            let (mut snapshot, ids) = lock(&daemon).snapshot_shape(&conns)?;
            fill_counters(&mut snapshot, &ids, &counters)?;
            // A reload that gave an id to another service or backend meanwhile would make
            // these counters someone else's: read again.
            if lock(&daemon).ids_epoch == ids.epoch {
                return Ok(snapshot);
            }
        }
        let d = lock(&daemon);
        let (mut snapshot, ids) = d.snapshot_shape(&conns)?;
        fill_counters(&mut snapshot, &ids, &counters)?;
        Ok(snapshot)
    })
    .await
}

/// What [`snapshot_of`] gives but the counters (left at zero): services, backends and
/// their connection counts, without reading a counter per backend.
pub(super) async fn shape_of(views: &Views) -> Result<Snapshot> {
    let conns = views.conns.counts().await?;
    let daemon = Arc::clone(&views.daemon);
    super::blocking("snapshot task", move || Ok(lock(&daemon).snapshot_shape(&conns)?.0)).await
}

/// Puts the counters of the services and backends named by `ids` into `snapshot`.
fn fill_counters(snapshot: &mut Snapshot, ids: &CounterIds, counters: &CounterReader) -> Result<()> {
    for (service, (id, backend_ids)) in snapshot.services.iter_mut().zip(&ids.services) {
        // A service's counters are its backends' (current and departed), so they never go
        // back when one leaves.
        let mut total = counters.departed(*id)?;
        for (backend, bid) in service.backends.iter_mut().zip(backend_ids) {
            backend.counters = counters.backend(*bid)?;
            total = total + backend.counters;
        }
        service.counters = total;
    }
    let global = counters.global()?;
    let pick = |table: &[(u32, &'static str)]| -> Vec<(&'static str, u64)> {
        table.iter().map(|(i, name)| (*name, global[*i as usize])).collect()
    };
    snapshot.actions = pick(&stat::ACTIONS);
    snapshot.drops = pick(&stat::DROP_REASONS);
    snapshot.passes = pick(&stat::PASS_REASONS);
    snapshot.flows_unrecorded = global[stat::FLOWS_UNRECORDED_FLOOD as usize];
    snapshot.flows_evicted_recent = global[stat::FLOWS_EVICTED_RECENT as usize];
    snapshot.icmp_forwarded =
        stat::ICMP_FORWARDED.iter().map(|(i, family, kind)| (*family, *kind, global[*i as usize])).collect();
    snapshot.too_big_sent = pick(&stat::TOO_BIG_SENT);
    snapshot.fragments = pick(&stat::FRAGMENTS);
    snapshot.nat_replies = pick(&stat::NAT_REPLIES);
    snapshot.conn_log.push(("lost_ring_full", global[stat::CONN_EVENTS_LOST as usize]));
    Ok(())
}

impl Daemon {
    /// Everything status and metrics show but the counters (zero here; see
    /// [`fill_counters`]), with the connection counts of a recent walk of the table.
    pub(super) fn snapshot_shape(&self, conns: &ConnCounts) -> Result<(Snapshot, CounterIds)> {
        let mut ids =
            CounterIds { services: Vec::with_capacity(self.config.services.len()), epoch: self.ids_epoch };
        let now = crate::snapshot::flow_clock_ns()
            .map_err(|source| ControlError::Io { what: "reading the clock".into(), source })?;
        let mut services = Vec::new();
        // States and weights as planned: the file's, with the operator's overrides.
        let laid = self.overrides.overlay(&self.config.services);
        for spec in laid.iter() {
            let Some(&id) = self.plan.service_ids.get(&spec.name) else { continue };
            let mut backends = Vec::new();
            let mut backend_ids = Vec::with_capacity(spec.backends.len() + 1);
            let serving = self.plan.fallback_serving.contains(&spec.name);
            let fallback = spec.fallback.map(|addr| BackendSpec {
                addr,
                weight: serving as u32,
                state: BackendState::Active,
                forward: spec.forward,
                port: None,
            });
            for b in spec.backends.iter().chain(fallback.as_ref()) {
                let Some(&bid) = self.plan.backend_ids.get(&(spec.name.clone(), b.addr)) else { continue };
                let unresolved = self.plan.unresolved.contains(&(spec.name.clone(), b.addr));
                let health = self.board.get(&spec.name, b.addr);
                let is_fallback = spec.fallback == Some(b.addr);
                let status = match (b.state, health.map(|h| h.tracker.state())) {
                    (BackendState::Disabled, _) => BackendStatus::Disabled,
                    _ if unresolved => BackendStatus::Unresolved,
                    _ if is_fallback && serving => BackendStatus::Fallback,
                    _ if is_fallback => BackendStatus::Standby,
                    (_, Some(Health::Down)) => BackendStatus::Down,
                    (_, Some(Health::Timeout { .. })) => BackendStatus::Timeout,
                    (BackendState::Drain, _) => BackendStatus::Drain,
                    (BackendState::Active, _) => BackendStatus::Active,
                };
                let (active, inactive) = conns.by_backend.get(&bid).copied().unwrap_or_default();
                backend_ids.push(bid);
                backends.push(BackendSnapshot {
                    addr: b.addr,
                    port: b.port,
                    forward: b.forward,
                    weight: self.board.weight(&spec.name, b.addr, b.weight),
                    checks: health
                        .map(|h| h.results.iter().map(|(k, v)| (*k, *v)).collect())
                        .unwrap_or_default(),
                    state_changes: health.map_or(0, |h| h.state_changes),
                    flaps: health.map_or(0, |h| h.flaps),
                    check_durations: health.map(|h| h.durations.clone()).unwrap_or_default(),
                    last_check: health.and_then(|h| h.last.as_ref().map(|r| r.message.clone())),
                    last_outcome: health.and_then(|h| h.last.as_ref().map(|r| r.outcome.name())),
                    overridden: self.overrides.get(&spec.name, b.addr).copied(),
                    status,
                    counters: Counters::default(),
                    active,
                    inactive,
                });
            }
            services.push(ServiceSnapshot {
                name: spec.name.clone(),
                matcher: spec.matcher,
                scheduler: spec.scheduler,
                ring_size: spec.ring_size,
                ring_fingerprint: self.plan.ring_fingerprints.get(&spec.name).copied().unwrap_or(0),
                forward: spec.forward,
                counters: Counters::default(),
                backends,
            });
            ids.services.push((id, backend_ids));
        }
        let snapshot = Snapshot {
            services,
            actions: Vec::new(),
            drops: Vec::new(),
            passes: Vec::new(),
            flow_entries: conns.entries,
            conn_counts_age: conns.walked_at.map_or(Duration::ZERO, |t| t.elapsed()),
            flow_capacity: self.dataplane.load_report().flow_entries,
            flows_evicted_recent: 0,
            flood_guard_active_cpus: self.dataplane.flood_guard_active_cpus(now)?,
            flows_unrecorded: 0,
            icmp_forwarded: Vec::new(),
            too_big_sent: Vec::new(),
            fragments: Vec::new(),
            nat_replies: Vec::new(),
            conn_log: {
                use std::sync::atomic::Ordering::Relaxed;
                let c = &self.log_counters;
                vec![
                    ("written", c.written.load(Relaxed)),
                    ("dropped_rate", c.dropped_rate.load(Relaxed)),
                    ("dropped_write_error", c.dropped_write.load(Relaxed)),
                    ("dropped_unknown_id", c.dropped_unknown.load(Relaxed)),
                ]
            },
            interfaces: self
                .config
                .director
                .interfaces
                .iter()
                .map(|i| (i.clone(), self.config.director.xdp_mode))
                .collect(),
            config_digest: self.config.digest.clone(),
            overrides: self
                .overrides
                .iter()
                .map(|((service, backend), set)| crate::snapshot::OverrideSnapshot {
                    service: service.to_owned(),
                    backend,
                    set: *set,
                    stale: self.overrides.is_stale(&self.config.services, service, backend),
                })
                .collect(),
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            last_reload_success: self
                .last_reload_success
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64()),
            last_reload_error: self.last_reload_error.clone(),
            routing: {
                let r = self.routing_state.lock().unwrap_or_else(|p| p.into_inner());
                r.protocol.map(|protocol| crate::snapshot::RoutingSnapshot {
                    protocol,
                    routes: r.last.as_ref().map_or(0, |l| l.routes as u64),
                    rules: r.last.as_ref().map_or(0, |l| l.rules as u64),
                    errors: r.last.iter().flat_map(|l| l.errors.iter().map(ToString::to_string)).collect(),
                    warnings: r
                        .last
                        .iter()
                        .flat_map(|l| l.warnings.iter().map(ToString::to_string))
                        .collect(),
                    failure: r.failure.clone(),
                    added: r.added,
                    replaced: r.replaced,
                    removed: r.removed,
                })
            },
        };
        Ok((snapshot, ids))
    }
}
