//! `lb-daemon run` and `detach`: descriptors, the listeners, signals, systemd
//! notifications, the tasks, and what happens on exit.

use super::*;

pub(super) fn notify(state: &[sd_notify::NotifyState]) {
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
pub(super) const WANTED_DESCRIPTORS: u64 = 4096;

/// Raises the soft descriptor limit to the hard one, as systemd advises services that need
/// many (its default soft limit is 1,024); warns when even that is low.
pub(super) fn raise_descriptor_limit() {
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

/// Check results taken into one health apply at most (a bound on the time the lock is held
/// for a burst; the rest go into the next).
const HEALTH_BATCH: usize = 1024;

/// `lb-daemon run`: until SIGTERM or SIGINT.
pub async fn run(config_path: &Path, on_exit: OnExit) -> Result<()> {
    raise_descriptor_limit();
    if let Err(e) = crate::health::children::become_subreaper() {
        tracing::warn!(error = %e, "cannot adopt what checks leave behind (ssh masters): they may outlive the daemon");
    }
    let config = load_config(config_path)?;
    if config.is_shipped_example() {
        return Err(ControlError::ShippedExample(config_path.to_owned()));
    }
    // Bound before the data path is touched: a second daemon must not adopt the maps.
    let control = bind_control_socket(&config.director.control_socket).await?;
    let metrics = tokio::net::TcpListener::bind(config.director.metrics_listen)
        .await
        .map_err(io(format!("binding the metrics address {}", config.director.metrics_listen)))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io("installing the SIGHUP handler"))?;
    let mut term = signal(SignalKind::terminate()).map_err(io("installing the SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("installing the SIGINT handler"))?;

    let (metrics_listen, control_socket) =
        (config.director.metrics_listen, config.director.control_socket.clone());
    let daemon = Arc::new(Mutex::new(Daemon::start(config_path, config).await?));
    let (results_tx, mut results) = tokio::sync::mpsc::channel::<ProbeResult>(1024);
    let mut supervisor = Supervisor::new(results_tx);
    supervisor.reconcile(&lock(&daemon).board.probes());
    let (intent, routing_state) = {
        let d = lock(&daemon);
        (d.routing_intent.subscribe(), Arc::clone(&d.routing_state))
    };
    let (routing_stop, routing_stopped) = tokio::sync::oneshot::channel::<bool>();
    let routing_task = tokio::spawn(follow_routing(intent, routing_state, routing_stopped));
    let log_task = {
        let mut d = lock(&daemon);
        match d.config.director.connection_log.clone() {
            Some(settings) => {
                let reader = d.dataplane.conn_event_reader()?;
                let counters = Arc::clone(&d.log_counters);
                Some(tokio::spawn(super::conn_log::follow_conn_events(
                    reader,
                    settings,
                    Arc::clone(&daemon),
                    counters,
                )))
            }
            None => None,
        }
    };
    let conns = ConnCounter::new(lock(&daemon).dataplane.flow_reader()?);
    let counters = Arc::new(lock(&daemon).dataplane.counter_reader()?);
    let views = Arc::new(Views { daemon: Arc::clone(&daemon), conns, counters });
    let control_task = tokio::spawn(serve_control(Arc::clone(&views), control));
    let metrics_task = tokio::spawn(serve_metrics(Arc::clone(&views), metrics));
    let status = lock(&daemon).status_line();
    tracing::info!(
        file = %config_path.display(),
        metrics = %metrics_listen,
        control = %control_socket.display(),
        "{status}; ready"
    );
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);

    // Half the watchdog period, as sd_watchdog_enabled(3) advises.
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut neighbour_tick = tokio::time::interval(NEIGHBOUR_REFRESH);
    neighbour_tick.reset();
    // A route or neighbour change is followed at once; the tick stays for what no event
    // announces (a next hop that answers ARP only later).
    let mut network_changes = match neighbour::watch_changes(NETWORK_CHANGE_QUIET) {
        Ok(rx) => Some(rx),
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot watch route and neighbour changes; following them every {NEIGHBOUR_REFRESH:?}");
            None
        }
    };
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
            Some(result) = results.recv() => {
                let mut d = lock(&daemon);
                let mut changed = d.observe(&result);
                // Verdicts that arrived meanwhile go into the same apply: a hundred servers
                // failing together cost one plan over every service, not a hundred.
                for _ in 0..HEALTH_BATCH {
                    match results.try_recv() {
                        Ok(more) => changed |= d.observe(&more),
                        Err(_) => break,
                    }
                }
                if changed {
                    d.apply_health();
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = neighbour_tick.tick() => refresh_neighbours(&daemon, Duration::from_millis(500)).await,
            Some(()) = async { network_changes.as_mut()?.recv().await }, if network_changes.is_some() => {
                refresh_neighbours(&daemon, Duration::from_millis(500)).await;
            }
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
    if let Some(t) = log_task {
        t.abort();
    }
    drop(views);
    let _ = std::fs::remove_file(&control_socket);
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

/// `lb-daemon detach`: removes what a stopped daemon left forwarding.
pub async fn detach(config_path: &Path) -> Result<Vec<String>> {
    let config = Config::load(config_path)?;
    if UnixStream::connect(&config.director.control_socket).await.is_ok() {
        return Err(ControlError::AlreadyRunning(config.director.control_socket.clone()));
    }
    Ok(Dataplane::remove_pins(&config.director.bpf_dir)?)
}
