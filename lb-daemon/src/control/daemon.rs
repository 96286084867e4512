//! The daemon actor: one [`Daemon`] value holds the config in force, the planner, the data
//! path and the health board, behind a mutex; start, apply, and what health results do.

use super::*;

/// The config in force and everything derived from it.
pub struct Daemon {
    pub(super) config_path: PathBuf,
    /// Shared, so that a health apply reads it without copying 100,000 backends.
    pub(super) config: Arc<Config>,
    pub(super) planner: Planner,
    pub(super) plan: Plan,
    pub(super) dataplane: Dataplane,
    pub(super) neighbours: HashMap<IpAddr, Neighbour>,
    /// Link-layer address of each attached interface, by ifindex: the destination MACs
    /// (with `director.accept_macs`) whose frames are the director's.
    pub(super) interface_macs: std::collections::BTreeMap<u32, [u8; 6]>,
    pub(super) reloads_ok: u64,
    pub(super) reloads_failed: u64,
    pub(super) last_reload_success: Option<SystemTime>,
    pub(super) last_reload_error: Option<String>,
    /// Health of every checked (service, backend).
    pub(super) board: Board,
    /// Probes whose last verdict is doubtful (see `Report::doubt`), logged once.
    pub(super) doubted: std::collections::HashSet<crate::health::supervisor::ProbeKey>,
    pub(super) started: std::time::Instant,
    /// What the kernel's routes and rules should be; the routing task follows it.
    pub(super) routing_intent: tokio::sync::watch::Sender<Intent>,
    pub(super) routing_state: Arc<Mutex<RoutingState>>,
    /// Bumped whenever an apply gives a service or backend id to another owner: counters
    /// read outside the lock belong to the ids seen under it only while this stays.
    pub(super) ids_epoch: u64,
    /// What `lb-daemon drain|disable|weight` asked, on top of the file (and saved in
    /// `director.overrides_file`).
    pub(super) overrides: crate::model::Overrides,
    /// Names of the ids in force, for the connection log (rebuilt when a reload or a
    /// health change gives ids to others).
    pub(super) log_names: Arc<super::conn_log::LogNames>,
    pub(super) log_counters: Arc<super::conn_log::ConnLogCounters>,
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
    /// `config` is what `load_config` read from `config_path` (read once: a large site's
    /// file takes a second to parse).
    pub async fn start(config_path: &Path, config: Config) -> Result<Daemon> {
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
        let overrides = super::overrides::load(&d.overrides_file)?;
        if !overrides.is_empty() {
            tracing::info!(
                file = %d.overrides_file.display(),
                count = overrides.iter().count(),
                "runtime overrides kept from before (lb-daemon status lists them)"
            );
        }
        let mut neighbours = dataplane.adopted_neighbours();
        neighbours.extend(neighbour::resolve(&backend_targets(&config), RESOLVE_WAIT).await?);
        let interface_macs = neighbour::interface_macs(&config.director.interfaces)?;
        let mut daemon = Daemon {
            config_path: config_path.to_owned(),
            plan: Plan::default(),
            config: Arc::new(config),
            planner,
            dataplane,
            neighbours,
            interface_macs,
            reloads_ok: 0,
            reloads_failed: 0,
            last_reload_success: None,
            last_reload_error: None,
            ids_epoch: 0,
            overrides,
            log_names: Arc::default(),
            log_counters: Arc::default(),
            board,
            doubted: Default::default(),
            started: std::time::Instant::now(),
            routing_intent: tokio::sync::watch::Sender::new(Intent::default()),
            routing_state: Arc::default(),
        };
        let config = Arc::clone(&daemon.config);
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
    pub(super) fn apply(&mut self, config: &Config, new_config: bool) -> Result<ApplyReport> {
        // Health enters here, and only here: a down backend is planned as disabled. A new
        // config gets a synced copy of the board, kept only if the apply succeeds.
        let synced = new_config.then(|| {
            let mut board = self.board.clone();
            board.sync(&config.services, &config.checks);
            board
        });
        let services =
            synced.as_ref().unwrap_or(&self.board).overlay(&self.overrides.overlay(&config.services));
        let mut plan = self.planner.plan(&services, &config.marks, &self.neighbours)?;
        plan.state.local_macs = self
            .interface_macs
            .iter()
            .map(|(&ifindex, own)| {
                (ifindex, std::iter::once(*own).chain(config.director.accept_macs.iter().copied()).collect())
            })
            .collect();
        plan.state.flood_guard_flows_per_sec = config.director.flood_guard_flows_per_sec;
        if config.director.connection_log.is_none() {
            // No log was opened at start (it is fixed then): events would only be lost.
            for s in plan.state.services.values_mut() {
                s.log_one_in = 0;
            }
        }
        plan.state.set_tunnel_sources(config.director.tunnel_source_v4, config.director.tunnel_source_v6);
        plan.state.set_fullnat_sources(config.director.fullnat_source_v4, config.director.fullnat_source_v6);
        for (service, addr) in &plan.unresolved {
            if !self.plan.unresolved.contains(&(service.clone(), *addr)) {
                tracing::warn!(service, backend = %addr, "backend's next hop is unknown (no route to a tunnel backend, or no ARP/ND answer yet): it gets no traffic until it is found");
            }
        }
        let report = self.dataplane.apply(&plan.state)?;
        let ids_moved =
            plan.service_ids != self.plan.service_ids || plan.backend_ids != self.plan.backend_ids;
        if ids_moved {
            self.ids_epoch += 1;
        }
        self.plan = plan;
        if ids_moved || new_config {
            self.log_names = Arc::new(super::conn_log::LogNames::of(config, &self.plan));
        }
        if let Some(board) = synced {
            self.config = Arc::new(config.clone());
            self.board = board;
        }
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
    pub(super) fn routing_intent(&self) -> Intent {
        let Some(routing) = &self.config.routing else { return Intent::default() };
        if routing.vip_routes.is_none() {
            // Health changes then change nothing the routing task has to look at.
            return Intent { config: Some(routing.clone()), ..Default::default() };
        }
        let vips_up: std::collections::BTreeSet<IpAddr> = self
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
        let mut vip_settle: BTreeMap<IpAddr, Duration> = BTreeMap::new();
        for s in &self.config.services {
            if let (crate::model::ServiceMatch::Vip { addr, .. }, Some(check)) =
                (s.matcher, self.config.checks.get(&s.name))
                && vips_up.contains(&addr)
            {
                let settle = vip_settle.entry(addr).or_default();
                *settle = (*settle).max(check.confirm_time());
            }
        }
        Intent { config: Some(routing.clone()), vips_up, vip_settle }
    }

    /// The probes the board wants now; doubts about probes a reload removed are forgotten.
    pub(super) fn probes_after_reload(&mut self) -> Vec<crate::health::supervisor::ProbeKey> {
        let probes = self.board.probes();
        self.doubted.retain(|k| probes.contains(k));
        probes
    }

    /// Feeds a probe result in; re-plans when a state or a weight changed.
    /// Takes a check's result into the board; says whether a backend's state or weight
    /// changed (then [`Self::apply_health`] is due).
    pub(super) fn observe(&mut self, result: &ProbeResult) -> bool {
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
        changed
    }

    /// Plans and applies what the board says now.
    pub(super) fn apply_health(&mut self) {
        let config = Arc::clone(&self.config);
        match self.apply(&config, false) {
            Ok(report) => tracing::debug!(?report, "health applied"),
            Err(e) => tracing::error!(error = %crate::error_chain(&e), "applying a health change"),
        }
    }

    pub(super) fn attach_interfaces(&mut self, config: &Config) -> Result<()> {
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
    pub(super) fn fixed_settings_changed(&self, new: &Config) -> Vec<&'static str> {
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
        if a.overrides_file != b.overrides_file {
            changed.push("director.overrides_file");
        }
        if a.connection_log != b.connection_log {
            changed.push("director.connection_log");
        }
        if a.xdp_mode != b.xdp_mode {
            changed.push("director.xdp_mode");
        }
        changed
    }

    pub(super) fn record_failure(&mut self, e: &ControlError) {
        self.reloads_failed += 1;
        self.last_reload_error = Some(crate::error_chain(e));
    }

    pub(super) fn record_success(&mut self) {
        self.reloads_ok += 1;
        self.last_reload_success = Some(SystemTime::now());
        self.last_reload_error = None;
    }

    /// One line for `systemctl status`.
    pub(super) fn status_line(&self) -> String {
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
}
