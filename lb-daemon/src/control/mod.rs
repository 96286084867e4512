//! The running daemon: start (adopting a running data path), SIGHUP reloads, SIGTERM,
//! systemd notifications; the control socket and the metrics endpoint are in `endpoints`.
//!
//! One [`Daemon`] value holds the config in force, the planner and the data path, behind a
//! mutex. Slow work (reading the file, resolving neighbours) happens outside the lock; the
//! lock covers planning and applying, and the map reads of a scrape or status request.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use lb_common::stat;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, ConfigError};
use crate::dataplane::{ApplyReport, Attached, Dataplane, DataplaneError, LoadOptions};
use crate::health::board::Board;
use crate::health::state::Health;
use crate::health::supervisor::{ProbeResult, Supervisor};
use crate::model::{BackendSpec, BackendState, Neighbour};
use crate::plan::{Plan, PlanError, Planner};
use crate::routing::decl::Intent;
use crate::routing::neighbour::{self, NeighbourError};
use crate::routing::policy::{Report as RoutingReport, reconcile_once as reconcile_routing};
use crate::snapshot::{BackendSnapshot, BackendStatus, ServiceSnapshot, Snapshot};

/// How often exited leftovers of checks (adopted as a subreaper) are reaped.
const REAP_ORPHANS: Duration = Duration::from_secs(5);
/// How long a start or reload waits for backends' link-layer addresses.
const RESOLVE_WAIT: Duration = Duration::from_secs(3);
/// How often backends' link-layer addresses are looked up again (a server replaced, a
/// backend that did not answer ARP at start).
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("resolving backends' link-layer addresses")]
    Neighbour(#[from] NeighbourError),
    #[error("{what}")]
    Io { what: String, source: std::io::Error },
    #[error("another lb-daemon answers on {0}; stop it first")]
    AlreadyRunning(PathBuf),
    #[error("no lb-daemon answers on {path}")]
    NotRunning { path: PathBuf, source: std::io::Error },
    #[error("interface {0} (director.interfaces) does not exist")]
    NoInterface(String),
    #[error("rendering metrics")]
    Metrics(#[from] crate::metrics::MetricsError),
}

type Result<T> = std::result::Result<T, ControlError>;

mod conns;
mod endpoints;
pub use conns::CONN_COUNT_TTL;
use conns::{ConnCounter, ConnCounts};
use endpoints::{serve_control, serve_metrics};

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlError {
    let what = what.into();
    move |source| ControlError::Io { what, source }
}

/// Validates a file as `run` would, including planning, without touching the system.
pub fn check(path: &Path) -> Result<Config> {
    planned(load_config(path)?)
}

/// The file's config, with what its health checks need from other files (CA
/// certificates) read too: what start, reload and `check` accept.
fn load_config(path: &Path) -> Result<Config> {
    let config = Config::load(path)?;
    crate::health::tls::prepare(&config)?;
    Ok(config)
}

/// [`check`] of a file's text; `file` names it in errors.
pub fn check_text(text: &str, file: &str) -> Result<Config> {
    let config = Config::parse(text, file)?;
    crate::health::tls::prepare(&config)?;
    planned(config)
}

fn planned(config: Config) -> Result<Config> {
    // Assume every backend resolvable: what is left are the limits planning enforces.
    let resolved: HashMap<IpAddr, Neighbour> = backend_addrs(&config)
        .into_iter()
        .map(|addr| (addr, Neighbour { mac: [0; 6], ifindex: 1, if_mac: [0; 6], vlan: 0 }))
        .collect();
    Planner::default().plan(&config.services, &config.marks, &resolved)?;
    Ok(config)
}

/// Every real server's address (backends and fallbacks), once.
fn backend_addrs(config: &Config) -> Vec<IpAddr> {
    let set: BTreeSet<IpAddr> =
        config.services.iter().flat_map(|s| s.backends.iter().map(|b| b.addr).chain(s.fallback)).collect();
    set.into_iter().collect()
}

/// The config in force and everything derived from it.
pub struct Daemon {
    config_path: PathBuf,
    config: Config,
    planner: Planner,
    plan: Plan,
    dataplane: Dataplane,
    neighbours: HashMap<IpAddr, Neighbour>,
    /// Link-layer address of each attached interface, by ifindex: the destination MACs
    /// (with `director.accept_macs`) whose frames are the director's.
    interface_macs: std::collections::BTreeMap<u32, [u8; 6]>,
    reloads_ok: u64,
    reloads_failed: u64,
    last_reload_success: Option<SystemTime>,
    last_reload_error: Option<String>,
    /// Health of every checked (service, backend).
    board: Board,
    /// Probes whose last verdict is doubtful (see `Report::doubt`), logged once.
    doubted: std::collections::HashSet<crate::health::supervisor::ProbeKey>,
    started: std::time::Instant,
    /// What the kernel's routes and rules should be; the routing task follows it.
    routing_intent: tokio::sync::watch::Sender<Intent>,
    routing_state: Arc<Mutex<RoutingState>>,
}

/// What the routing task last did, for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct RoutingState {
    pub protocol: Option<u8>,
    pub last: Option<RoutingReport>,
    /// Why the last reconciliation could not even read the kernel's tables.
    pub failure: Option<String>,
    pub added: u64,
    pub replaced: u64,
    pub removed: u64,
}

impl Daemon {
    /// Loads (or adopts) the data path, fills it from the config and attaches it.
    pub async fn start(config_path: &Path) -> Result<Daemon> {
        let config = load_config(config_path)?;
        let d = &config.director;
        let dataplane = Dataplane::load(&LoadOptions {
            ring_slots: d.ring_slots,
            flow_entries: d.connection_table_size,
            pin_dir: Some(d.bpf_dir.clone()),
        })?;
        let loaded = dataplane.load_report().clone();
        let mut planner = Planner::default();
        let mut board = Board::default();
        if loaded.adopted {
            let ids = dataplane.adopted_ids();
            planner.seed(&ids);
            board.adopt_running(ids.serving.iter().filter_map(|(key, family, words)| {
                Some((crate::model::service_match_of(key)?, crate::model::addr_of(*family, words)?))
            }));
            tracing::info!(
                bpf_dir = %d.bpf_dir.display(),
                flow_entries = loaded.flow_entries,
                "adopted the running data path (connection table kept)"
            );
        }
        if loaded.flow_entries != d.connection_table_size || loaded.ring_slots != d.ring_slots {
            tracing::warn!(
                in_use_flow_entries = loaded.flow_entries,
                configured_flow_entries = d.connection_table_size,
                in_use_ring_slots = loaded.ring_slots,
                configured_ring_slots = d.ring_slots,
                "map sizes differ from the config; they change only after `lb-daemon detach` (which drops the connection table)"
            );
        }
        let mut neighbours = dataplane.adopted_neighbours();
        neighbours.extend(neighbour::resolve(&backend_addrs(&config), RESOLVE_WAIT).await?);
        let interface_macs = neighbour::interface_macs(&config.director.interfaces)?;
        let mut daemon = Daemon {
            config_path: config_path.to_owned(),
            plan: Plan::default(),
            config,
            planner,
            dataplane,
            neighbours,
            interface_macs,
            reloads_ok: 0,
            reloads_failed: 0,
            last_reload_success: None,
            last_reload_error: None,
            board,
            doubted: Default::default(),
            started: std::time::Instant::now(),
            routing_intent: tokio::sync::watch::Sender::new(Intent::default()),
            routing_state: Arc::default(),
        };
        let config = daemon.config.clone();
        // Maps are full before any interface gets the program.
        daemon.apply(&config, true)?;
        daemon.attach_interfaces(&config)?;
        daemon.reloads_ok = 1;
        daemon.last_reload_success = Some(SystemTime::now());
        Ok(daemon)
    }

    /// Plans `config` against the known neighbours and applies it; on success it is the
    /// config in force.
    /// `new_config`: the config was (re)loaded, so the health board follows it (which
    /// also ends flap timeouts); otherwise only health or neighbours changed.
    fn apply(&mut self, config: &Config, new_config: bool) -> Result<ApplyReport> {
        // Health enters here, and only here: a down backend is planned as disabled.
        let mut board = self.board.clone();
        if new_config {
            board.sync(&config.services, &config.checks);
        }
        let services = board.overlay(&config.services);
        let mut plan = self.planner.plan(&services, &config.marks, &self.neighbours)?;
        plan.state.local_macs = self
            .interface_macs
            .iter()
            .map(|(&ifindex, own)| {
                (ifindex, std::iter::once(*own).chain(config.director.accept_macs.iter().copied()).collect())
            })
            .collect();
        plan.state.flood_guard_flows_per_sec = config.director.flood_guard_flows_per_sec;
        for (service, addr) in &plan.unresolved {
            if !self.plan.unresolved.contains(&(service.clone(), *addr)) {
                tracing::warn!(service, backend = %addr, "backend's link-layer address is unknown: it gets no traffic until it answers ARP/ND");
            }
        }
        let report = self.dataplane.apply(&plan.state)?;
        self.plan = plan;
        self.config = config.clone();
        self.board = board;
        let intent = self.routing_intent();
        self.routing_intent.send_if_modified(|current| {
            let changed = *current != intent;
            *current = intent;
            changed
        });
        Ok(report)
    }

    /// The routes and rules the config declares, and a host route for each VIP with a
    /// real server taking new flows (a fallback does not count: a director whose servers
    /// are all down should stop attracting the VIP's traffic).
    fn routing_intent(&self) -> Intent {
        let Some(routing) = &self.config.routing else { return Intent::default() };
        if routing.vip_routes.is_none() {
            // Health changes then change nothing the routing task has to look at.
            return Intent { config: Some(routing.clone()), vips_up: Default::default() };
        }
        let vips_up = self
            .config
            .services
            .iter()
            .filter(|s| !self.plan.fallback_serving.contains(&s.name))
            .filter(|s| {
                self.plan
                    .state
                    .services
                    .get(&crate::model::service_key(&s.matcher))
                    .is_some_and(|st| !st.ring.is_empty())
            })
            .filter_map(|s| match s.matcher {
                crate::model::ServiceMatch::Vip { addr, .. } => Some(addr),
                crate::model::ServiceMatch::Mark(_) => None,
            })
            .collect();
        Intent { config: Some(routing.clone()), vips_up }
    }

    /// The probes the board wants now; doubts about probes a reload removed are forgotten.
    fn probes_after_reload(&mut self) -> Vec<crate::health::supervisor::ProbeKey> {
        let probes = self.board.probes();
        self.doubted.retain(|k| probes.contains(k));
        probes
    }

    /// Feeds a probe result in; re-plans when a state or a weight changed.
    fn observe(&mut self, result: &ProbeResult) {
        // Said once when it starts (every check repeats it), and when it stops.
        let doubted = result.report.doubt.is_some();
        if doubted != self.doubted.contains(&result.key) {
            if doubted {
                self.doubted.insert(result.key.clone());
                tracing::warn!(
                    target_addr = %result.key.target.addr,
                    output = result.report.message,
                    "a check's verdict is likely not the plugin's"
                );
            } else {
                self.doubted.remove(&result.key);
                tracing::info!(target_addr = %result.key.target.addr, "a check's verdict is the plugin's again");
            }
        }
        if result.report.outcome == crate::health::state::Outcome::DirectorError {
            tracing::warn!(
                error = result.report.message,
                "a health check could not run (the director's own error, not the backend's: its state is kept)"
            );
        }
        let (events, changed) = self.board.observe(result, self.started.elapsed());
        for e in &events {
            if let Some(hook) = self.board.hook(&e.service, e.backend) {
                crate::health::hooks::fire(hook, e);
            }
            let (from, to) = (e.transition.from.name(), e.transition.to.name());
            if e.transition.to.serving() {
                tracing::info!(service = e.service, backend = %e.backend, from, to, check = e.message, "backend state changed");
            } else {
                tracing::warn!(service = e.service, backend = %e.backend, from, to, check = e.message, "backend state changed");
            }
        }
        if changed {
            let config = self.config.clone();
            match self.apply(&config, false) {
                Ok(report) => tracing::debug!(?report, "health applied"),
                Err(e) => tracing::error!(error = %crate::error_chain(&e), "applying a health change"),
            }
        }
    }

    fn attach_interfaces(&mut self, config: &Config) -> Result<()> {
        for iface in &config.director.interfaces {
            match self.dataplane.attach(iface, config.director.xdp_mode)? {
                Attached::New => tracing::info!(iface, "balancer attached"),
                Attached::TookOver => tracing::info!(iface, "took over the running balancer's link"),
                Attached::Already => {}
            }
        }
        for iface in self.dataplane.pinned_interfaces() {
            if !config.director.interfaces.contains(&iface) {
                self.dataplane.detach(&iface)?;
                tracing::info!(iface, "interface left the config: balancer detached");
            }
        }
        Ok(())
    }

    /// Settings fixed at start; a reload that changes them says so and keeps the old ones.
    fn fixed_settings_changed(&self, new: &Config) -> Vec<&'static str> {
        let (a, b) = (&self.config.director, &new.director);
        let mut changed = Vec::new();
        if a.bpf_dir != b.bpf_dir {
            changed.push("director.bpf_dir");
        }
        if a.connection_table_size != b.connection_table_size {
            changed.push("director.connection_table_size");
        }
        if a.ring_slots != b.ring_slots {
            changed.push("director.ring_slots");
        }
        if a.metrics_listen != b.metrics_listen {
            changed.push("director.metrics_listen");
        }
        if a.control_socket != b.control_socket {
            changed.push("director.control_socket");
        }
        if a.xdp_mode != b.xdp_mode {
            changed.push("director.xdp_mode");
        }
        changed
    }

    fn record_failure(&mut self, e: &ControlError) {
        self.reloads_failed += 1;
        self.last_reload_error = Some(crate::error_chain(e));
    }

    fn record_success(&mut self) {
        self.reloads_ok += 1;
        self.last_reload_success = Some(SystemTime::now());
        self.last_reload_error = None;
    }

    /// One line for `systemctl status`.
    fn status_line(&self) -> String {
        let backends: usize = self.config.services.iter().map(|s| s.backends.len()).sum();
        let mut s = format!(
            "{} services, {} backends on {}",
            self.config.services.len(),
            backends,
            self.config.director.interfaces.join(",")
        );
        if let Some(e) = &self.last_reload_error {
            s.push_str(&format!("; last reload failed: {e}"));
        }
        s
    }

    /// Everything status and metrics show, read from the maps now, with the connection
    /// counts of a recent walk of the table (made outside the lock: see `conns`).
    fn snapshot(&self, conns: &ConnCounts) -> Result<Snapshot> {
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

fn lock(daemon: &Mutex<Daemon>) -> MutexGuard<'_, Daemon> {
    // A panic while holding the lock leaves plain data behind, still usable.
    daemon.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SIGHUP: read, validate, plan, apply. A refused file changes nothing.
async fn reload(daemon: &Arc<Mutex<Daemon>>) {
    notify(&[sd_notify::NotifyState::Reloading]);
    let path = lock(daemon).config_path.clone();
    let result = async {
        // Off the runtime's threads: a file on a slow disk must not hold up anything else.
        let file = path.clone();
        let config = tokio::task::spawn_blocking(move || load_config(&file))
            .await
            .map_err(|e| ControlError::Io { what: "reading the config".into(), source: std::io::Error::other(e) })??;
        // Checked before anything is written, so that a typo refuses the whole reload.
        for iface in &config.director.interfaces {
            if nix::net::if_::if_nametoindex(iface.as_str()).is_err() {
                return Err(ControlError::NoInterface(iface.clone()));
            }
        }
        // Apply at once with what the neighbour table knows now; servers it does not know
        // yet are resolved after the reload (below), so no reload waits for ARP.
        let addrs = backend_addrs(&config);
        let neighbours = neighbour::resolve(&addrs, Duration::ZERO).await?;
        let interface_macs = neighbour::interface_macs(&config.director.interfaces)?;
        let mut d = lock(daemon);
        d.interface_macs = interface_macs;
        let fixed = d.fixed_settings_changed(&config);
        if !fixed.is_empty() {
            tracing::warn!(settings = ?fixed, "these settings apply only after a restart; the rest of the reload goes ahead");
        }
        // Fixed settings stay as they are until a restart.
        let mut config = config;
        config.director = crate::config::Director {
            interfaces: config.director.interfaces.clone(),
            ..d.config.director.clone()
        };
        // As in the periodic refresh: an entry missing from the table now is no reason to
        // take a backend down.
        d.neighbours.extend(neighbours);
        let report = d.apply(&config, true)?;
        d.attach_interfaces(&config)?;
        Ok::<_, ControlError>(report)
    }
    .await;
    let mut d = lock(daemon);
    match result {
        Ok(report) => {
            d.record_success();
            tracing::info!(file = %path.display(), ?report, "configuration reloaded");
            if !d.plan.unresolved.is_empty() {
                // New servers join as soon as they answer ARP/ND, without another reload.
                let daemon = Arc::clone(daemon);
                tokio::spawn(async move { refresh_neighbours(&daemon, RESOLVE_WAIT).await });
            }
        }
        Err(e) => {
            d.record_failure(&e);
            tracing::error!(error = %crate::error_chain(&e), "reload refused; the previous configuration keeps serving");
        }
    }
    let status = d.status_line();
    drop(d);
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
}

/// Re-resolves backends' link-layer addresses (waiting up to `wait` for ones not in the
/// kernel's table yet) and the attached interfaces' own; re-applies if any changed.
async fn refresh_neighbours(daemon: &Arc<Mutex<Daemon>>, wait: Duration) {
    let (addrs, interfaces) = {
        let d = lock(daemon);
        (backend_addrs(&d.config), d.config.director.interfaces.clone())
    };
    let found = neighbour::resolve(&addrs, wait).await;
    let macs = neighbour::interface_macs(&interfaces);
    match (found, macs) {
        (Ok(found), Ok(macs)) => {
            let mut d = lock(daemon);
            // Keep entries that are briefly absent from the table (expired, being
            // re-probed): a server that really left is taken out by config or health.
            let mut merged = d.neighbours.clone();
            merged.extend(found);
            if merged != d.neighbours || macs != d.interface_macs {
                d.neighbours = merged;
                d.interface_macs = macs;
                let config = d.config.clone();
                match d.apply(&config, false) {
                    Ok(report) => {
                        tracing::info!(?report, "link-layer addresses changed; maps updated")
                    }
                    Err(e) => {
                        tracing::error!(error = %crate::error_chain(&e), "applying new link-layer addresses")
                    }
                }
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %crate::error_chain(&e), "refreshing link-layer addresses")
        }
    }
}

fn notify(state: &[sd_notify::NotifyState]) {
    let mut all = state.to_vec();
    let now = sd_notify::NotifyState::monotonic_usec_now().ok();
    // systemd wants RELOADING=1 to carry the time it was sent.
    if state.iter().any(|s| matches!(s, sd_notify::NotifyState::Reloading))
        && let Some(now) = now
    {
        all.push(now);
    }
    if let Err(e) = sd_notify::notify(&all) {
        tracing::debug!(error = %e, "sd_notify");
    }
}

/// What the endpoints read: the daemon, and connection counts walked outside its lock.
struct Views {
    daemon: Arc<Mutex<Daemon>>,
    conns: ConnCounter,
}

async fn snapshot_of(views: &Views) -> Result<Snapshot> {
    let conns = views.conns.counts().await?;
    let daemon = Arc::clone(&views.daemon);
    tokio::task::spawn_blocking(move || lock(&daemon).snapshot(&conns))
        .await
        .map_err(|e| ControlError::Io { what: "snapshot task".into(), source: std::io::Error::other(e) })?
}

/// Asks a running daemon over its control socket.
pub async fn request(socket: &Path, what: &str) -> Result<String> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ControlError::NotRunning { path: socket.to_owned(), source })?;
    stream.write_all(format!("{what}\n").as_bytes()).await.map_err(io("writing the request"))?;
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut out).await.map_err(io("reading the answer"))?;
    Ok(out)
}

async fn bind_control_socket(path: &Path) -> Result<UnixListener> {
    match UnixStream::connect(path).await {
        Ok(_) => return Err(ControlError::AlreadyRunning(path.to_owned())),
        // Someone else's socket (a daemon running as root, for one): say so, rather than
        // fail later with "address in use" when it cannot be replaced.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(ControlError::Io {
                what: format!("opening {} (run as root?)", path.display()),
                source: e,
            });
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    // Left by a daemon that was killed: nobody answers on it (checked above).
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ControlError::Io {
                what: format!("removing the stale {}", path.display()),
                source: e,
            });
        }
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("restricting {}", path.display())))?;
    Ok(listener)
}

/// What `run` does when told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    /// Leave the data path forwarding (restarts and upgrades lose nothing).
    KeepForwarding,
    /// Remove the XDP program and the pinned maps.
    Detach,
}

/// Descriptors below which the daemon warns: both listeners full (128), the data path's
/// maps and programs, and room for a few thousand concurrent health checks.
const WANTED_DESCRIPTORS: u64 = 4096;

/// Raises the soft descriptor limit to the hard one, as systemd advises services that need
/// many (its default soft limit is 1,024); warns when even that is low.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => return tracing::warn!(error = %e, "reading the descriptor limit"),
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "raising the descriptor limit");
                soft
            }
        }
    } else {
        soft
    };
    if limit < WANTED_DESCRIPTORS {
        tracing::warn!(limit, wanted = WANTED_DESCRIPTORS, "the descriptor limit is low: raise LimitNOFILE");
    }
}

/// `lb-daemon run`: until SIGTERM or SIGINT.
pub async fn run(config_path: &Path, on_exit: OnExit) -> Result<()> {
    raise_descriptor_limit();
    if let Err(e) = crate::health::children::become_subreaper() {
        tracing::warn!(error = %e, "cannot adopt what checks leave behind (ssh masters): they may outlive the daemon");
    }
    let config = Config::load(config_path)?;
    // Bound before the data path is touched: a second daemon must not adopt the maps.
    let control = bind_control_socket(&config.director.control_socket).await?;
    let metrics = tokio::net::TcpListener::bind(config.director.metrics_listen)
        .await
        .map_err(io(format!("binding the metrics address {}", config.director.metrics_listen)))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io("installing the SIGHUP handler"))?;
    let mut term = signal(SignalKind::terminate()).map_err(io("installing the SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("installing the SIGINT handler"))?;

    let daemon = Arc::new(Mutex::new(Daemon::start(config_path).await?));
    let (results_tx, mut results) = tokio::sync::mpsc::channel::<ProbeResult>(1024);
    let mut supervisor = Supervisor::new(results_tx);
    supervisor.reconcile(&lock(&daemon).board.probes());
    let (intent, routing_state) = {
        let d = lock(&daemon);
        (d.routing_intent.subscribe(), Arc::clone(&d.routing_state))
    };
    let (routing_stop, routing_stopped) = tokio::sync::oneshot::channel::<bool>();
    let routing_task = tokio::spawn(follow_routing(intent, routing_state, routing_stopped));
    let conns = ConnCounter::new(lock(&daemon).dataplane.flow_reader()?);
    let views = Arc::new(Views { daemon: Arc::clone(&daemon), conns });
    let control_task = tokio::spawn(serve_control(Arc::clone(&views), control));
    let metrics_task = tokio::spawn(serve_metrics(Arc::clone(&views), metrics));
    let status = lock(&daemon).status_line();
    tracing::info!(
        file = %config_path.display(),
        metrics = %config.director.metrics_listen,
        control = %config.director.control_socket.display(),
        "{status}; ready"
    );
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);

    // Half the watchdog period, as sd_watchdog_enabled(3) advises.
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut neighbour_tick = tokio::time::interval(NEIGHBOUR_REFRESH);
    neighbour_tick.reset();
    let mut reap_tick = tokio::time::interval(REAP_ORPHANS);
    // Reloads run beside the loop, never in it: SIGTERM is answered whatever a reload is
    // waiting for. A SIGHUP during a reload queues one more, after it.
    let mut reloading: Option<tokio::task::JoinHandle<()>> = None;
    let mut reload_again = false;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if reloading.is_some() {
                    reload_again = true;
                } else {
                    let daemon = Arc::clone(&daemon);
                    reloading = Some(tokio::spawn(async move { reload(&daemon).await }));
                }
            }
            _ = async { if let Some(r) = reloading.as_mut() { let _ = r.await; } }, if reloading.is_some() => {
                reloading = None;
                supervisor.reconcile(&lock(&daemon).probes_after_reload());
                if std::mem::take(&mut reload_again) {
                    let daemon = Arc::clone(&daemon);
                    reloading = Some(tokio::spawn(async move { reload(&daemon).await }));
                }
            }
            Some(result) = results.recv() => lock(&daemon).observe(&result),
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = neighbour_tick.tick() => refresh_neighbours(&daemon, Duration::from_millis(500)).await,
            // A scan of /proc: off the loop that answers signals.
            _ = reap_tick.tick() => { tokio::task::spawn_blocking(crate::health::children::reap_orphans); }
            _ = watchdog_tick.tick(), if watchdog.is_some() => notify(&[sd_notify::NotifyState::Watchdog]),
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(r) = reloading {
        r.abort();
    }
    drop(supervisor);
    // Outside systemd nothing else would: ssh masters and other leftovers of the checks.
    let stopped = crate::health::children::stop_orphans();
    if stopped > 0 {
        tracing::info!(processes = stopped, "stopped what the checks left running (ssh masters)");
    }
    // Routes stay by default: the data path goes on forwarding for their VIPs.
    let remove_routes = lock(&daemon).config.routing.as_ref().is_some_and(|r| r.remove_on_stop);
    if routing_stop.send(remove_routes).is_ok() {
        let _ = routing_task.await;
    }
    control_task.abort();
    metrics_task.abort();
    drop(views);
    let _ = std::fs::remove_file(&config.director.control_socket);
    let bpf_dir = lock(&daemon).config.director.bpf_dir.clone();
    drop(daemon);
    match on_exit {
        OnExit::KeepForwarding => tracing::info!("stopping; the data path keeps forwarding"),
        OnExit::Detach => {
            let detached = Dataplane::remove_pins(&bpf_dir)?;
            tracing::info!(interfaces = ?detached, "stopping; data path removed");
        }
    }
    Ok(())
}

/// How often a reconciliation that left errors (a device not there yet, a gateway not
/// reachable yet) is tried again.
const ROUTING_RETRY: Duration = Duration::from_secs(10);

/// Keeps the kernel's routes and rules equal to the intent, on a netlink connection of
/// its own. On stop, removes them all if told to.
async fn follow_routing(
    mut intent: tokio::sync::watch::Receiver<Intent>,
    state: Arc<Mutex<RoutingState>>,
    mut stop: tokio::sync::oneshot::Receiver<bool>,
) {
    let mut retry = tokio::time::interval(ROUTING_RETRY);
    retry.reset();
    let mut needs_retry = false;
    // The first round applies the intent in force when the task starts.
    let mut changed = true;
    loop {
        if changed || needs_retry {
            let want = intent.borrow_and_update().clone();
            needs_retry = apply_routing(&want, &state).await;
        }
        changed = false;
        tokio::select! {
            r = intent.changed() => match r {
                Ok(()) => changed = true,
                Err(_) => return,
            },
            _ = retry.tick(), if needs_retry => {}
            remove = &mut stop => {
                if remove.unwrap_or(false) {
                    let protocol = state.lock().unwrap_or_else(|p| p.into_inner()).protocol;
                    if protocol.is_some() {
                        tracing::info!("stopping: removing the daemon's routes and rules (routing.on_stop: remove)");
                        apply_routing(&Intent::default(), &state).await;
                    }
                }
                return;
            }
        }
    }
}

/// One reconciliation; returns whether it should be tried again.
async fn apply_routing(want: &Intent, state: &Mutex<RoutingState>) -> bool {
    let previous = state.lock().unwrap_or_else(|p| p.into_inner()).protocol;
    let result = reconcile_routing(want, previous).await;
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(report) => {
            if report.changes() > 0 {
                tracing::info!(
                    added = report.added,
                    replaced = report.replaced,
                    removed = report.removed,
                    routes = report.routes,
                    rules = report.rules,
                    "routing updated"
                );
            }
            for e in &report.errors {
                tracing::error!(object = e.what, why = e.why, "route or rule not applied; the others are");
            }
            for w in &report.warnings {
                tracing::warn!(object = w.what, why = w.why, "routing");
            }
            st.added += report.added as u64;
            st.replaced += report.replaced as u64;
            st.removed += report.removed as u64;
            st.protocol = want.config.as_ref().map(|c| c.protocol);
            st.failure = None;
            let retry = !report.errors.is_empty();
            st.last = Some(report);
            retry
        }
        Err(e) => {
            let why = crate::error_chain(&e);
            tracing::error!(error = why, "routing not reconciled");
            st.failure = Some(why);
            true
        }
    }
}

/// `lb-daemon detach`: removes what a stopped daemon left forwarding.
pub async fn detach(config_path: &Path) -> Result<Vec<String>> {
    let config = Config::load(config_path)?;
    if UnixStream::connect(&config.director.control_socket).await.is_ok() {
        return Err(ControlError::AlreadyRunning(config.director.control_socket.clone()));
    }
    Ok(Dataplane::remove_pins(&config.director.bpf_dir)?)
}
