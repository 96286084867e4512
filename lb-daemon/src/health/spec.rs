//! What a health check is, as the configuration states it: pure data, no sockets, no
//! processes, no files. The checkers (`tcp`, `http`, `exec`, `icmp`), the state machine
//! (`state`) and the board run these specs; `config` builds them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CheckKind {
    Tcp { port: Option<u16> },
    Http(HttpCheck),
    Exec { argv: Vec<String> },
    Icmp,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CheckSpec {
    pub kind: CheckKind,
    pub timeout: Duration,
    /// Local address to connect from (a director with several addresses on the LAN).
    pub source: Option<IpAddr>,
    /// `check.via_tunnel`: tunnel backends are checked through their tunnel, the probe
    /// sent from this address (the one real servers answer to).
    pub via_tunnel: Option<IpAddr>,
}

/// A service's health check: what to run, how often, and how results become states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub spec: CheckSpec,
    pub interval: Duration,
    /// Each run starts up to this much after its tick, at random: checks of many
    /// directors (or of one server by many services) do not arrive in step.
    pub jitter: Duration,
    pub policy: Policy,
    /// While the check says WARNING, the backend keeps this percentage of its weight.
    pub warning_weight_percent: Option<u32>,
    /// Backends new to the daemon start down until `rise` checks pass (keepalived's
    /// `alpha`), except those a running data path it adopted was already serving.
    pub start_down: bool,
    /// Keep a down backend's established flows (it only stops getting new ones), instead
    /// of moving them (the default, as IPVS's expire_nodest_conn).
    pub keep_flows: bool,
    /// Run on every state change.
    pub on_change: Option<Hook>,
}

impl HealthCheck {
    /// The longest a recovered server takes to be confirmed up: `rise` checks, each up to
    /// its interval and jitter apart, the last one taking its whole timeout.
    pub fn confirm_time(&self) -> std::time::Duration {
        (self.interval + self.jitter) * self.policy.rise + self.spec.timeout
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpCheck {
    pub port: Option<u16>,
    pub path: String,
    /// `Host` header; the server's address if `None`.
    pub host: Option<String>,
    /// Statuses that pass.
    pub expect_status: Vec<u16>,
    pub expect_body: Option<String>,
    /// `https`: how to trust the server.
    pub tls: Option<TlsSpec>,
}

/// How an `https` check trusts servers. The client configuration built from it (a CA
/// file read, the system's roots) belongs to the runtime (`tls`), which builds it when a
/// config is loaded or reloaded, so that a rotated CA takes effect.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TlsSpec {
    pub verify: bool,
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Hook {
    pub argv: Vec<String>,
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlapPolicy {
    /// State changes ...
    pub changes: u32,
    /// ... within this many cycles put the server in timeout ...
    pub within: u32,
    /// ... for this long; `None`: until the next reload.
    pub hold: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub rise: u32,
    pub fall: u32,
    /// Window, in cycles, that `fall` failures must fall in; at least `fall`.
    pub fall_within: u32,
    pub flap: Option<FlapPolicy>,
}

impl Default for Policy {
    /// keepalived's and HAProxy's defaults: 2 to rise, 3 consecutive to fall, no flap control.
    fn default() -> Self {
        Policy { rise: 2, fall: 3, fall_within: 3, flap: None }
    }
}
