//! `icmp`: the server answers an echo request (ping).
//!
//! An unprivileged ICMP socket (`SOCK_DGRAM`, what `ping` uses) when
//! `net.ipv4.ping_group_range` admits the daemon's group; otherwise a raw socket, which
//! needs CAP_NET_RAW. The kernel routes replies of a datagram socket to it alone; a raw
//! socket sees every ICMP message of its family, so replies are matched by identifier,
//! sequence and payload as well as by source.

use std::io::{ErrorKind, Read as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{ProbeError, Report};

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;
const HEADER: usize = 8;
const PAYLOAD: usize = 16;

/// Identifiers and sequence numbers of this process's requests: distinct per request, so
/// that concurrent checks on raw sockets never take each other's replies.
static NEXT: AtomicU16 = AtomicU16::new(0);

pub async fn check(addr: IpAddr, source: Option<IpAddr>, timeout: Duration) -> Report {
    match tokio::time::timeout(timeout, echo(addr, source)).await {
        Ok(Ok((rtt, raw))) => Report::ok(format!(
            "{addr} answered an echo request in {rtt:.1?} ({} socket)",
            if raw { "raw" } else { "ping" }
        )),
        Ok(Err(e)) => e.report(),
        Err(_) => Report::critical(format!("ping {addr}: no echo reply within {timeout:?}")),
    }
}

/// An ICMP socket for `addr`'s family and whether it is raw.
fn open(addr: IpAddr) -> Result<(Socket, bool), ProbeError> {
    let (domain, proto) = match addr {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    match Socket::new(domain, Type::DGRAM, Some(proto)) {
        Ok(s) => Ok((s, false)),
        Err(dgram) if matches!(dgram.kind(), ErrorKind::PermissionDenied) => {
            match Socket::new(domain, Type::RAW, Some(proto)) {
                Ok(s) => Ok((s, true)),
                Err(raw) if super::is_director_error(&raw) => {
                    Err(ProbeError::io(format_args!("ping {addr}: raw ICMP socket"), &raw))
                }
                // Not the backend's fault either, but a setup that never works: it fails
                // the check, loudly, rather than leaving every backend up unchecked.
                Err(raw) => Err(ProbeError::Backend(format!(
                    "ping {addr}: no ICMP socket: the daemon's group is outside net.ipv4.ping_group_range \
                     ({dgram}) and a raw socket needs CAP_NET_RAW ({raw})"
                ))),
            }
        }
        Err(e) => Err(ProbeError::io(format_args!("ping {addr}: ICMP socket"), &e)),
    }
}

/// The internet checksum (RFC 1071) of an ICMPv4 message (and of the headers the tunnel
/// probe writes).
pub(super) fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 =
        data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The ICMP message in what a socket read: raw IPv4 sockets deliver the IP header too.
fn icmp_part(buf: &[u8], raw_v4: bool) -> Option<&[u8]> {
    if !raw_v4 {
        return Some(buf);
    }
    let ihl = usize::from(buf.first()? & 0x0f) * 4;
    buf.get(ihl..)
}

/// The round-trip time, and whether a raw socket measured it.
async fn echo(addr: IpAddr, source: Option<IpAddr>) -> Result<(Duration, bool), ProbeError> {
    let failed = |e: std::io::Error| ProbeError::io(format_args!("ping {addr}"), &e);
    let (socket, raw) = open(addr)?;
    socket.set_nonblocking(true).map_err(failed)?;
    if let Some(src) = source {
        socket
            .bind(&SocketAddr::new(src, 0).into())
            .map_err(|e| ProbeError::Backend(format!("ping {addr}: binding {src}: {e}")))?;
    }
    // Connected: the kernel delivers only this peer's messages (and its ICMP errors).
    socket.connect(&SocketAddr::new(addr, 0).into()).map_err(failed)?;
    // SAFETY: the Socket owns its descriptor, which stays open until the AsyncFd (that
    // owns the Socket) drops.
    let fd = unsafe { AsyncFd::register(socket) }.map_err(|e| failed(e.into_parts().1))?;

    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let (ident, seq) = ((std::process::id() as u16).wrapping_add(n), n);
    let (request, reply) =
        if addr.is_ipv4() { (ECHO_REQUEST_V4, ECHO_REPLY_V4) } else { (ECHO_REQUEST_V6, ECHO_REPLY_V6) };
    let mut msg = [0u8; HEADER + PAYLOAD];
    msg[0] = request;
    msg[4..6].copy_from_slice(&ident.to_be_bytes());
    msg[6..8].copy_from_slice(&seq.to_be_bytes());
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    msg[8..24].copy_from_slice(&stamp.as_nanos().to_be_bytes());
    // ICMPv6 checksums cover a pseudo-header: the kernel fills them in.
    if addr.is_ipv4() {
        let c = checksum(&msg);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
    }

    let sent = Instant::now();
    fd.async_io(Interest::WRITABLE, |s| s.send(&msg))
        .await
        .map_err(|e| ProbeError::io(format_args!("ping {addr}: sending"), &e))?;
    let mut buf = [0u8; 1500];
    loop {
        let len = fd.async_io(Interest::READABLE, |mut s| s.read(&mut buf)).await.map_err(failed)?;
        let Some(m) = icmp_part(&buf[..len], raw && addr.is_ipv4()) else { continue };
        if m.len() < HEADER + PAYLOAD || m[0] != reply || m[6..8] != msg[6..8] || m[8..24] != msg[8..24] {
            continue;
        }
        // A datagram socket's identifier is the kernel's (its "port"); a raw one's is ours.
        if raw && m[4..6] != msg[4..6] {
            continue;
        }
        return Ok((sent.elapsed(), raw));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_an_echo_request() {
        // `ping -c1` with identifier 0x1234, sequence 1 and no payload.
        let mut m = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
        let c = checksum(&m);
        assert_eq!(c, 0xe5ca);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&m), 0, "a message with its checksum sums to zero");
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn raw_ipv4_reads_skip_the_ip_header() {
        let mut buf = vec![0x46u8; 24];
        buf.extend_from_slice(&[0, 0, 1, 2]);
        assert_eq!(icmp_part(&buf, true), Some(&[0u8, 0, 1, 2][..]));
        assert_eq!(icmp_part(&buf, false), Some(&buf[..]));
        assert_eq!(icmp_part(&[0x4f], true), None, "a header longer than the read");
    }
}
