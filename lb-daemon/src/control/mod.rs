//! The running daemon, on top of every other layer, one job per module: `daemon` (the
//! actor: config in force, planner, data path, health board), `tasks` (reloads, neighbour
//! refreshes, the routing follower), `run` (the run loop: signals, sd_notify, exit;
//! `detach`), `status` (snapshots for status and metrics), `socket` (the control socket,
//! server and client), `metrics_server` (HTTP), `bounded` (the accept loop both share),
//! `conns` (connection counts walked outside the lock). Here: errors and `check`.
//!
//! One [`Daemon`] value holds the config in force, the planner and the data path, behind a
//! mutex. Slow work (reading the file, resolving neighbours) happens outside the lock; the
//! lock covers planning and applying, and the map reads of a scrape or status request.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use lb_common::stat;
use tokio::net::UnixStream;
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
/// At most one refresh per this long for route and neighbour changes.
const NETWORK_CHANGE_QUIET: Duration = Duration::from_secs(1);

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
    #[error("interface {0} does not exist")]
    NoSuchInterface(String),
    #[error(
        "{} is the shipped example, unchanged: it names interfaces and addresses of no host in particular. Edit it for this host (see `man lb-daemon.yaml`), check it with `lb-daemon check`, then start", .0.display()
    )]
    ShippedExample(PathBuf),
    #[error("rendering metrics")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Override(#[from] crate::model::OverrideError),
    #[error("rendering the status as JSON")]
    Json(#[from] serde_json::Error),
    #[error("the daemon refused: {0}")]
    Refused(String),
}

type Result<T> = std::result::Result<T, ControlError>;

mod bounded;
pub mod conn_log;
mod conns;
mod daemon;
pub mod decap;
mod metrics_server;
mod overrides;
mod run;
mod socket;
mod status;
mod tasks;
mod vip_hold;
mod wait;

pub use conns::CONN_COUNT_TTL;
use conns::{ConnCounter, ConnCounts};
pub use daemon::{Daemon, RoutingState};
pub use metrics_server::METRICS_MAX_CONNECTIONS;
use metrics_server::serve_metrics;
use run::notify;
pub use run::{OnExit, detach, run};
pub use socket::{CONTROL_MAX_CONNECTIONS, command, request};
use socket::{bind_control_socket, serve_control};
use status::Views;
use tasks::{follow_routing, lock, refresh_neighbours, reload};
pub use wait::{Drained, WaitError, wait_drained};

/// Runs `work` on the blocking pool (it takes the daemon's lock, walks the table or reads a
/// file), so that the runtime's threads never wait on it; a task that panicked is an error
/// naming `what` it was doing.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ControlError::Io { what: what.into(), source: std::io::Error::other(e) })?
}

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
    let resolved: HashMap<IpAddr, Neighbour> = backend_targets(&config)
        .into_iter()
        .map(|t| (t.addr, Neighbour { mac: [0; 6], ifindex: 1, if_mac: [0; 6], vlan: 0, mtu: 0 }))
        .collect();
    Planner::default().plan(&config.services, &config.marks, &resolved)?;
    Ok(config)
}

/// Every real server (backends and fallbacks) once, with how it is reached. An address
/// that one service tunnels to and another routes directly is resolved by its route: on
/// a link that is the same entry, and off a link direct routing could not reach it.
fn backend_targets(config: &Config) -> Vec<neighbour::Target> {
    let mut routed: BTreeMap<IpAddr, bool> = BTreeMap::new();
    for s in &config.services {
        let fallback = s.fallback.map(|addr| (addr, s.forward));
        for (addr, forward) in s.backends.iter().map(|b| (b.addr, b.forward)).chain(fallback) {
            // NAT backends too: masquerading routes, and a private network behind a
            // router works as well as one on a link of the director.
            *routed.entry(addr).or_default() |= forward != crate::model::Forward::Dr;
        }
    }
    routed.into_iter().map(|(addr, routed)| neighbour::Target { addr, routed }).collect()
}
