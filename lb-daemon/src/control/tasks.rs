//! Work the run loop starts: SIGHUP reloads, neighbour refreshes, and the routing follower
//! that keeps the kernel's routes equal to the routing intent.

use super::*;

pub(super) fn lock(daemon: &Mutex<Daemon>) -> MutexGuard<'_, Daemon> {
    // A panic while holding the lock leaves plain data behind, still usable.
    daemon.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SIGHUP: read, validate, plan, apply. A refused file changes nothing.
pub(super) async fn reload(daemon: &Arc<Mutex<Daemon>>) {
    notify(&[sd_notify::NotifyState::Reloading]);
    let path = lock(daemon).config_path.clone();
    let result = async {
        // Off the runtime's threads: a file on a slow disk must not hold up anything else.
        let file = path.clone();
        let config = super::blocking("reading the config", move || load_config(&file)).await?;
        // Checked before anything is written, so that a typo refuses the whole reload.
        for iface in &config.director.interfaces {
            if nix::net::if_::if_nametoindex(iface.as_str()).is_err() {
                return Err(ControlError::NoInterface(iface.clone()));
            }
        }
        // Apply at once with what the neighbour table knows now; servers it does not know
        // yet are resolved after the reload (below), so no reload waits for ARP.
        let neighbours = neighbour::resolve(&backend_targets(&config), Duration::ZERO).await?;
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
            tunnel_source_v4: config.director.tunnel_source_v4,
            tunnel_source_v6: config.director.tunnel_source_v6,
            fullnat_source_v4: config.director.fullnat_source_v4,
            fullnat_source_v6: config.director.fullnat_source_v6,
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
pub(super) async fn refresh_neighbours(daemon: &Arc<Mutex<Daemon>>, wait: Duration) {
    let (addrs, interfaces) = {
        let d = lock(daemon);
        (backend_targets(&d.config), d.config.director.interfaces.clone())
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

/// How often a reconciliation that left errors (a device not there yet, a gateway not
/// reachable yet) is tried again.
pub(super) const ROUTING_RETRY: Duration = Duration::from_secs(10);

/// Keeps the kernel's routes and rules equal to the intent, on a netlink connection of
/// its own. On stop, removes them all if told to.
pub(super) async fn follow_routing(
    mut intent: tokio::sync::watch::Receiver<Intent>,
    state: Arc<Mutex<RoutingState>>,
    mut stop: tokio::sync::oneshot::Receiver<bool>,
) {
    let mut retry = tokio::time::interval(ROUTING_RETRY);
    retry.reset();
    let mut needs_retry = false;
    let mut hold = super::vip_hold::VipHold::default();
    // When the next VIP held back (see `vip_hold`) is due.
    let mut held_until: Option<std::time::Instant> = None;
    // The first round applies the intent in force when the task starts.
    let mut changed = true;
    loop {
        if changed || needs_retry {
            let mut want = intent.borrow_and_update().clone();
            let (announced, next) = hold.announce(&want.vips_up, &want.vip_settle, std::time::Instant::now());
            want.vips_up = announced;
            held_until = next;
            needs_retry = apply_routing(&want, &state).await;
        }
        changed = false;
        let hold_over =
            tokio::time::sleep_until(held_until.map_or_else(tokio::time::Instant::now, Into::into));
        tokio::select! {
            r = intent.changed() => match r {
                Ok(()) => changed = true,
                Err(_) => return,
            },
            _ = hold_over, if held_until.is_some() => changed = true,
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
pub(super) async fn apply_routing(want: &Intent, state: &Mutex<RoutingState>) -> bool {
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
