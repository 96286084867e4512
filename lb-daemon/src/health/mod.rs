//! Health checking of real servers: one module per checker behind one interface (as
//! keepalived's check_*.c), and the monit-style state machine they feed.
//!
//! Every checker is a future bounded by the check's timeout; thousands run on tokio
//! without a thread each.

pub mod board;
pub mod children;
pub mod exec;
pub mod hooks;
pub mod http;
pub mod icmp;
pub mod spec;
pub mod state;
pub mod supervisor;
pub mod tcp;
pub mod tls;
pub mod tunnel;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use spec::{CheckKind, CheckSpec};
use state::Outcome;

/// What one check run found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    /// A weight the check asked for (`weight=N` in an exec check's first output line).
    pub weight: Option<u32>,
    /// One line for logs and status: why it failed, or what it printed.
    pub message: String,
    /// Why the verdict may not be the check's own (see `exec::verdict_message`); said in
    /// status and logged.
    pub doubt: Option<&'static str>,
}

impl Report {
    pub fn ok(message: impl Into<String>) -> Self {
        Report { outcome: Outcome::Ok, weight: None, message: message.into(), doubt: None }
    }

    pub fn critical(message: impl Into<String>) -> Self {
        Report { outcome: Outcome::Critical, weight: None, message: message.into(), doubt: None }
    }
}

/// Why a check gave no answer from the backend.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The director could not run the check (see [`is_director_error`]).
    #[error("{0}")]
    Director(String),
    /// The backend, or the path to it, failed the check.
    #[error("{0}")]
    Backend(String),
}

impl ProbeError {
    /// `what` failed with `e`: the director's error or the backend's, by its kind.
    pub fn io(what: impl std::fmt::Display, e: &std::io::Error) -> Self {
        let message = format!("{what}: {e}");
        if is_director_error(e) { ProbeError::Director(message) } else { ProbeError::Backend(message) }
    }

    /// The report of a check that ended with this error: CRITICAL for the backend's.
    pub fn report(self) -> Report {
        match self {
            ProbeError::Director(m) => {
                Report { outcome: Outcome::DirectorError, weight: None, message: m, doubt: None }
            }
            ProbeError::Backend(m) => Report::critical(m),
        }
    }
}

/// Errors that mean the director ran out of something, not that a backend failed:
/// descriptors (EMFILE, ENFILE), memory and socket buffers (ENOMEM, ENOBUFS), processes
/// (EAGAIN from fork), local ports (EADDRNOTAVAIL from connect).
pub fn is_director_error(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|code| {
        [Errno::EMFILE, Errno::ENFILE, Errno::ENOMEM, Errno::ENOBUFS, Errno::EAGAIN, Errno::EADDRNOTAVAIL]
            .iter()
            .any(|known| *known as i32 == code)
    })
}

/// What a check is run against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub service: String,
    pub addr: IpAddr,
    /// The service's port (checks connect here unless they name another).
    pub port: Option<u16>,
    /// A tunnel backend checked through its tunnel (`check.via_tunnel`).
    pub tunnel: Option<TunnelPath>,
}

/// How a check reaches a tunnel backend through its tunnel: to the VIP, from `source`
/// (an address of the director the real server answers to).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TunnelPath {
    pub vip: IpAddr,
    pub source: IpAddr,
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
        CheckKind::Tcp { port } => match (endpoint(target, *port), &target.tunnel) {
            (Ok(addr), Some(path)) => tunnel::check(path, target.addr, addr.port(), spec.timeout).await,
            (Ok(addr), None) => tcp::check(addr, spec.source, spec.timeout).await,
            (Err(e), _) => {
                Report { outcome: Outcome::Unknown, weight: None, message: e.to_string(), doubt: None }
            }
        },
        CheckKind::Http(h) => match endpoint(target, h.port) {
            Ok(addr) => http::check(h, addr, spec.source, spec.timeout).await,
            Err(e) => Report { outcome: Outcome::Unknown, weight: None, message: e.to_string(), doubt: None },
        },
        CheckKind::Exec { argv } => exec::check(argv, target, spec.timeout).await,
        CheckKind::Icmp => icmp::check(target.addr, spec.source, spec.timeout).await,
    };
    (report, started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;

    #[test]
    fn running_out_of_something_is_the_directors_error_anything_else_the_backends() {
        for errno in
            [Errno::EMFILE, Errno::ENFILE, Errno::ENOMEM, Errno::ENOBUFS, Errno::EAGAIN, Errno::EADDRNOTAVAIL]
        {
            let e = std::io::Error::from_raw_os_error(errno as i32);
            assert!(matches!(ProbeError::io("connecting", &e), ProbeError::Director(_)), "{errno}");
            assert_eq!(ProbeError::io("connecting", &e).report().outcome, Outcome::DirectorError);
        }
        for errno in [
            Errno::ECONNREFUSED,
            Errno::EHOSTUNREACH,
            Errno::ENETUNREACH,
            Errno::ETIMEDOUT,
            Errno::ECONNRESET,
        ] {
            let e = std::io::Error::from_raw_os_error(errno as i32);
            assert_eq!(ProbeError::io("connecting", &e).report().outcome, Outcome::Critical, "{errno}");
        }
        assert!(!is_director_error(&std::io::Error::other("no errno")));
    }
}
