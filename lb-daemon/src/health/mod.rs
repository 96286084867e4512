//! Health checking of real servers: one module per checker behind one interface (as
//! keepalived's check_*.c), and the monit-style state machine they feed.
//!
//! Every checker is a future bounded by the check's timeout; thousands run on tokio
//! without a thread each.

pub mod board;
pub mod exec;
pub mod hooks;
pub mod http;
pub mod icmp;
pub mod state;
pub mod supervisor;
pub mod tcp;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use state::Outcome;

/// What one check run found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    /// A weight the check asked for (`weight=N` in an exec check's first output line).
    pub weight: Option<u32>,
    /// One line for logs and status: why it failed, or what it printed.
    pub message: String,
}

impl Report {
    pub fn ok(message: impl Into<String>) -> Self {
        Report { outcome: Outcome::Ok, weight: None, message: message.into() }
    }

    pub fn critical(message: impl Into<String>) -> Self {
        Report { outcome: Outcome::Critical, weight: None, message: message.into() }
    }
}

/// What a check is run against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub service: String,
    pub addr: IpAddr,
    /// The service's port (checks connect here unless they name another).
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CheckKind {
    Tcp { port: Option<u16> },
    Http(http::HttpCheck),
    Exec { argv: Vec<String> },
    Icmp,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CheckSpec {
    pub kind: CheckKind,
    pub timeout: Duration,
    /// Local address to connect from (a director with several addresses on the LAN).
    pub source: Option<IpAddr>,
}

/// A service's health check: what to run, how often, and how results become states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub spec: CheckSpec,
    pub interval: Duration,
    /// Each run starts up to this much after its tick, at random: checks of many
    /// directors (or of one server by many services) do not arrive in step.
    pub jitter: Duration,
    pub policy: state::Policy,
    /// While the check says WARNING, the backend keeps this percentage of its weight.
    pub warning_weight_percent: Option<u32>,
    /// Backends new to the daemon start down until `rise` checks pass (keepalived's
    /// `alpha`), except those a running data path it adopted was already serving.
    pub start_down: bool,
    /// Keep a down backend's established flows (it only stops getting new ones), instead
    /// of moving them (the default, as IPVS's expire_nodest_conn).
    pub keep_flows: bool,
    /// Run on every state change.
    pub on_change: Option<hooks::Hook>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("no port to check: the service has none (a fwmark service) and the check names none")]
    NoPort,
}

fn endpoint(target: &Target, port: Option<u16>) -> Result<SocketAddr, CheckError> {
    let port = port.or(target.port).ok_or(CheckError::NoPort)?;
    Ok(SocketAddr::new(target.addr, port))
}

/// Runs one check; never takes (much) longer than its timeout. Returns the report and
/// how long the check took.
pub async fn run(spec: &CheckSpec, target: &Target) -> (Report, Duration) {
    let started = Instant::now();
    let report = match &spec.kind {
        CheckKind::Tcp { port } => match endpoint(target, *port) {
            Ok(addr) => tcp::check(addr, spec.source, spec.timeout).await,
            Err(e) => Report { outcome: Outcome::Unknown, weight: None, message: e.to_string() },
        },
        CheckKind::Http(h) => match endpoint(target, h.port) {
            Ok(addr) => http::check(h, addr, spec.source, spec.timeout).await,
            Err(e) => Report { outcome: Outcome::Unknown, weight: None, message: e.to_string() },
        },
        CheckKind::Exec { argv } => exec::check(argv, target, spec.timeout).await,
        CheckKind::Icmp => icmp::check(target.addr, spec.source, spec.timeout).await,
    };
    (report, started.elapsed())
}
