//! `lb-daemon wait-drained`: polls the daemon's connection counts (`connections json`)
//! until a backend has no connections left, for rolling upgrades driven by scripts.

use std::time::Instant;

use super::*;
use crate::status_json::Connections;

/// How often the counts are asked again (the daemon walks its table at most every
/// `CONN_COUNT_TTL` anyway).
const POLL: Duration = Duration::from_secs(1);
/// How often a wait that goes on says so.
const PROGRESS: Duration = Duration::from_secs(10);

/// What to wait for.
#[derive(Clone, Debug)]
pub struct Drained {
    /// `None`: every service that has the backend.
    pub service: Option<String>,
    pub backend: IpAddr,
    /// Also wait for InActConn (TCP closing, UDP flows); otherwise ActiveConn only.
    pub inactive_too: bool,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("the daemon's connection counts are not the JSON this lb-daemon reads")]
    Status(#[from] serde_json::Error),
    #[error("{0}")]
    NoBackend(String),
    #[error("{backend} still has {left} connections after {}", humantime::format_duration(*.after))]
    TimedOut { backend: IpAddr, left: u64, after: Duration },
    #[error(
        "{backend} showed no connections, but no count of the table newer than the wait came within {} (the daemon counts every 3 s): wait longer",
        humantime::format_duration(*.after)
    )]
    Unconfirmed { backend: IpAddr, after: Duration },
}

/// Connections of `what`'s backend, and whether any of its services still sends it new
/// flows.
fn left(status: &Connections, what: &Drained) -> std::result::Result<(u64, bool), WaitError> {
    let mut found = false;
    let (mut left, mut taking) = (0, false);
    for b in status.backends(what.service.as_deref(), what.backend) {
        found = true;
        left += b.active_connections + if what.inactive_too { b.inactive_connections } else { 0 };
        taking |= b.state == "active" && b.weight > 0;
    }
    if !found {
        return Err(WaitError::NoBackend(match &what.service {
            Some(s) => format!("service `{s}` has no backend {} (or no such service)", what.backend),
            None => format!("no service has backend {}", what.backend),
        }));
    }
    Ok((left, taking))
}

/// Returns when the backend has no connections left; `progress` hears how many are.
pub async fn wait_drained(
    socket: &Path,
    what: &Drained,
    progress: impl Fn(&str),
) -> std::result::Result<(), WaitError> {
    let start = Instant::now();
    let mut said = None::<Instant>;
    loop {
        let status: Connections = serde_json::from_str(&command(socket, "connections json").await?)?;
        let (n, taking) = left(&status, what)?;
        // Counts from a walk of the table that began before this wait may predate a
        // connection opened just before the drain: only a later walk's zero is believed.
        let counted_since_start = Duration::from_millis(status.connection_counts_age_ms) < start.elapsed();
        if n == 0 && counted_since_start {
            return Ok(());
        }
        if start.elapsed() >= what.timeout {
            return Err(match n {
                0 => WaitError::Unconfirmed { backend: what.backend, after: what.timeout },
                left => WaitError::TimedOut { backend: what.backend, left, after: what.timeout },
            });
        }
        if said.is_none_or(|t| t.elapsed() >= PROGRESS) {
            said = Some(Instant::now());
            progress(&format!(
                "{} has {n} connections{}",
                what.backend,
                if taking { " and still takes new ones (drain it first?)" } else { "" }
            ));
        }
        tokio::time::sleep(POLL.min(what.timeout.saturating_sub(start.elapsed()))).await;
    }
}
