//! Status and metrics assembly: a [`Snapshot`] read from the maps under the lock, with
//! connection counts walked outside it.

use super::*;

/// What the endpoints read: the daemon, and connection counts walked outside its lock.
pub(super) struct Views {
    pub(super) daemon: Arc<Mutex<Daemon>>,
    pub(super) conns: ConnCounter,
}

pub(super) async fn snapshot_of(views: &Views) -> Result<Snapshot> {
    let conns = views.conns.counts().await?;
    let daemon = Arc::clone(&views.daemon);
    tokio::task::spawn_blocking(move || lock(&daemon).snapshot(&conns))
        .await
        .map_err(|e| ControlError::Io { what: "snapshot task".into(), source: std::io::Error::other(e) })?
}

impl Daemon {
    /// Everything status and metrics show, read from the maps now, with the connection
    /// counts of a recent walk of the table (made outside the lock: see `conns`).
    pub(super) fn snapshot(&self, conns: &ConnCounts) -> Result<Snapshot> {
        let now = crate::snapshot::flow_clock_ns()
            .map_err(|source| ControlError::Io { what: "reading the clock".into(), source })?;
        let mut services = Vec::new();
        for spec in &self.config.services {
            let Some(&id) = self.plan.service_ids.get(&spec.name) else { continue };
            let mut backends = Vec::new();
            let serving = self.plan.fallback_serving.contains(&spec.name);
            let fallback = spec.fallback.map(|addr| BackendSpec {
                addr,
                weight: serving as u32,
                state: BackendState::Active,
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
                backends.push(BackendSnapshot {
                    addr: b.addr,
                    weight: self.board.weight(&spec.name, b.addr, b.weight),
                    checks: health
                        .map(|h| h.results.iter().map(|(k, v)| (*k, *v)).collect())
                        .unwrap_or_default(),
                    state_changes: health.map_or(0, |h| h.state_changes),
                    flaps: health.map_or(0, |h| h.flaps),
                    check_durations: health.map(|h| h.durations.clone()).unwrap_or_default(),
                    last_check: health.and_then(|h| h.last.as_ref().map(|r| r.message.clone())),
                    last_outcome: health.and_then(|h| h.last.as_ref().map(|r| r.outcome.name())),
                    status,
                    counters: self.dataplane.backend_counters(bid)?,
                    active,
                    inactive,
                });
            }
            services.push(ServiceSnapshot {
                name: spec.name.clone(),
                matcher: spec.matcher,
                scheduler: spec.scheduler,
                ring_size: spec.ring_size,
                forward: self.config.forward.get(&spec.name).copied().unwrap_or(crate::model::Forward::Dr),
                counters: self.dataplane.service_counters(id)?,
                backends,
            });
        }
        let global = self.dataplane.global_counters()?;
        let pick = |table: &[(u32, &'static str)]| -> Vec<(&'static str, u64)> {
            table.iter().map(|(i, name)| (*name, global[*i as usize])).collect()
        };
        Ok(Snapshot {
            services,
            actions: pick(&stat::ACTIONS),
            drops: pick(&stat::DROP_REASONS),
            passes: pick(&stat::PASS_REASONS),
            flow_entries: conns.entries,
            flow_capacity: self.dataplane.load_report().flow_entries,
            flow_entries_per_cpu: conns.per_cpu.clone(),
            flow_capacity_per_cpu: self.dataplane.load_report().flow_entries
                / (conns.per_cpu.len() as u32).max(1),
            flood_guard_active_cpus: self.dataplane.flood_guard_active_cpus(now)?,
            flows_unrecorded: global[stat::FLOWS_UNRECORDED_FLOOD as usize],
            icmp_forwarded: stat::ICMP_FORWARDED
                .iter()
                .map(|(i, family, kind)| (*family, *kind, global[*i as usize]))
                .collect(),
            interfaces: self
                .config
                .director
                .interfaces
                .iter()
                .map(|i| (i.clone(), self.config.director.xdp_mode))
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
        })
    }
}
