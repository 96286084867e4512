//! `tcp`: the server accepts a connection on the port.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

use super::{ProbeError, Report};

/// Connects from `source` (any local address if `None`) within `timeout`.
pub async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, ProbeError> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .map_err(|e| ProbeError::io("opening a socket", &e))?;
    if let Some(src) = source {
        // A source address the director lacks fails the check, as keepalived's does: a
        // standby director whose addresses moved away should not claim healthy servers.
        socket
            .bind(SocketAddr::new(src, 0))
            .map_err(|e| ProbeError::Backend(format!("binding {src}: {e}")))?;
    }
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(ProbeError::io(format_args!("connecting to {addr}"), &e)),
        Err(_) => Err(ProbeError::Backend(format!("connecting to {addr}: no answer within {timeout:?}"))),
    }
}

pub async fn check(addr: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> Report {
    match connect(addr, source, timeout).await {
        Ok(_) => Report::ok(format!("{addr} accepts connections")),
        Err(e) => e.report(),
    }
}
