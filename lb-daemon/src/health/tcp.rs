//! `tcp`: the server accepts a connection on the port.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

use super::Report;

/// Connects from `source` (any local address if `None`) within `timeout`.
pub async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .map_err(|e| format!("socket: {e}"))?;
    if let Some(src) = source {
        socket.bind(SocketAddr::new(src, 0)).map_err(|e| format!("binding {src}: {e}"))?;
    }
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(format!("connecting to {addr}: {e}")),
        Err(_) => Err(format!("connecting to {addr}: no answer within {timeout:?}")),
    }
}

pub async fn check(addr: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> Report {
    match connect(addr, source, timeout).await {
        Ok(_) => Report::ok(format!("{addr} accepts connections")),
        Err(e) => Report::critical(e),
    }
}
