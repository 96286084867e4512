//! `tcp` checks through the tunnel (`check.via_tunnel`), for tunnel backends: the check's
//! TCP SYN goes to the VIP inside an outer header to the backend, as the data path sends
//! clients' packets, and the real server's SYN-ACK comes back from the VIP, straight, as
//! its answers to clients do. A server whose decapsulation is broken (no `ipip` module,
//! the decapsulator detached, the VIP missing on `lo`) never answers and goes down,
//! where a plain check of its own address would have passed.
//!
//! No tunnel device is needed: a raw socket of protocol 4 (IPv4 inside) or 41 (IPv6
//! inside) has the kernel write the outer header around the packet given to it, and a
//! raw TCP socket, filtered in the kernel to this one exchange (the VIP's port to this
//! probe's port), receives the answer. The director's own TCP answers that SYN-ACK with a
//! reset (it has no such connection), which also frees the server's half-open one: a SYN
//! probe, as `nmap -sS` does. Both sockets need CAP_NET_RAW.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockFilter, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{ProbeError, Report, TunnelPath};

const IPPROTO_IPIP: i32 = 4;
const IPPROTO_IPV6: i32 = 41;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Source ports of this process's probes, in turn from the top of the ephemeral range:
/// concurrent probes never share one, so each filter sees its own answer only.
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

fn next_port() -> u16 {
    const FIRST: u32 = 49152;
    (FIRST + NEXT_PORT.fetch_add(1, Ordering::Relaxed) % (65536 - FIRST)) as u16
}

pub async fn check(path: &TunnelPath, backend: IpAddr, port: u16, timeout: Duration) -> Report {
    let vip = SocketAddr::new(path.vip, port);
    match tokio::time::timeout(timeout, syn(path, backend, port)).await {
        Ok(Ok(rtt)) => {
            Report::ok(format!("{vip} answered a SYN through the tunnel to {backend} in {rtt:.1?}"))
        }
        Ok(Err(e)) => e.report(),
        Err(_) => Report::critical(format!(
            "{vip} through the tunnel to {backend}: no answer within {timeout:?} (is it decapsulating?)"
        )),
    }
}

async fn syn(path: &TunnelPath, backend: IpAddr, port: u16) -> Result<Duration, ProbeError> {
    let vip = SocketAddr::new(path.vip, port);
    let director = |what: &str, e: std::io::Error| {
        if e.kind() == ErrorKind::PermissionDenied {
            // Not the backend's fault, but a setup that never works: fail loudly rather
            // than leave every backend up unchecked.
            ProbeError::Backend(format!("{vip} through the tunnel: {what} needs CAP_NET_RAW ({e})"))
        } else {
            ProbeError::io(format_args!("{vip} through the tunnel: {what}"), &e)
        }
    };
    let sport = next_port();
    let seq = fastrand::u32(..);
    let answers = answer_socket(path.vip, port, sport).map_err(|e| director("a raw TCP socket", e))?;
    // SAFETY: the Socket owns its descriptor, which stays open until the AsyncFd (that
    // owns the Socket) drops.
    let answers = unsafe { AsyncFd::register_with_interest(answers, Interest::READABLE) }
        .map_err(|e| director("registering the raw TCP socket", e.into_parts().1))?;
    let inner = syn_packet(path.source, path.vip, sport, port, seq);
    let (domain, proto) = match (backend, path.vip) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (Domain::IPV4, IPPROTO_IPIP),
        (IpAddr::V4(_), IpAddr::V6(_)) => (Domain::IPV4, IPPROTO_IPV6),
        (IpAddr::V6(_), IpAddr::V4(_)) => (Domain::IPV6, IPPROTO_IPIP),
        (IpAddr::V6(_), IpAddr::V6(_)) => (Domain::IPV6, IPPROTO_IPV6),
    };
    let tunnel = Socket::new(domain, Type::RAW, Some(Protocol::from(proto)))
        .map_err(|e| director("a raw tunnel socket", e))?;
    let started = Instant::now();
    tunnel.send_to(&inner, &SocketAddr::new(backend, 0).into()).map_err(|e| {
        ProbeError::io(format_args!("{vip}: sending the SYN through the tunnel to {backend}"), &e)
    })?;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 128];
    loop {
        let mut ready = answers.readable().await.map_err(|e| director("waiting for the answer", e))?;
        let n = match ready.try_io(|s| s.get_ref().recv(&mut buf)) {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(director("reading the answer", e)),
            Err(_would_block) => continue,
        };
        // SAFETY: recv initialised the first n bytes.
        let got: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
        match answer(&got, path.vip.is_ipv4(), seq) {
            Some(Answer::Accepted) => return Ok(started.elapsed()),
            Some(Answer::Refused) => {
                return Err(ProbeError::Backend(format!(
                    "{vip} through the tunnel to {backend}: connection refused (reset)"
                )));
            }
            None => continue,
        }
    }
}

/// A raw TCP socket of the VIP's family that the kernel lets only segments from the VIP's
/// `port` to `sport` through (classic BPF; raw IPv4 sockets see the IP header, IPv6 ones
/// do not).
fn answer_socket(vip: IpAddr, port: u16, sport: u16) -> std::io::Result<Socket> {
    const LDX_MSH: u16 = 0xb1; // BPF_LDX | BPF_B | BPF_MSH: X = 4 * (pkt[k] & 0xf)
    const LD_H_IND: u16 = 0x48; // BPF_LD | BPF_H | BPF_IND: A = pkt[X + k] (16 bits)
    const LD_H_ABS: u16 = 0x28; // BPF_LD | BPF_H | BPF_ABS: A = pkt[k] (16 bits)
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    let (domain, filter) = if vip.is_ipv4() {
        (
            Domain::IPV4,
            vec![
                SockFilter::new(LDX_MSH, 0, 0, 0),
                SockFilter::new(LD_H_IND, 0, 0, 0),
                SockFilter::new(JEQ, 0, 3, port.into()),
                SockFilter::new(LD_H_IND, 0, 0, 2),
                SockFilter::new(JEQ, 0, 1, sport.into()),
                SockFilter::new(RET, 0, 0, 0xffff),
                SockFilter::new(RET, 0, 0, 0),
            ],
        )
    } else {
        (
            Domain::IPV6,
            vec![
                SockFilter::new(LD_H_ABS, 0, 0, 0),
                SockFilter::new(JEQ, 0, 3, port.into()),
                SockFilter::new(LD_H_ABS, 0, 0, 2),
                SockFilter::new(JEQ, 0, 1, sport.into()),
                SockFilter::new(RET, 0, 0, 0xffff),
                SockFilter::new(RET, 0, 0, 0),
            ],
        )
    };
    let s = Socket::new(domain, Type::RAW, Some(Protocol::TCP))?;
    s.attach_filter(&filter)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// What the server said.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Accepted,
    Refused,
}

/// The answer to our SYN (sequence `seq`) in what the raw socket read, if it is one: a
/// SYN-ACK acknowledging it, or a reset.
fn answer(read: &[u8], ipv4: bool, seq: u32) -> Option<Answer> {
    let tcp = if ipv4 { read.get(usize::from(read.first()? & 0x0f) * 4..)? } else { read };
    let ack = u32::from_be_bytes(tcp.get(8..12)?.try_into().ok()?);
    let flags = *tcp.get(13)?;
    if ack != seq.wrapping_add(1) {
        return None;
    }
    match flags & (TCP_SYN | TCP_ACK | TCP_RST) {
        f if f == TCP_SYN | TCP_ACK => Some(Answer::Accepted),
        f if f & TCP_RST != 0 => Some(Answer::Refused),
        _ => None,
    }
}

/// The SYN as the client side of the check sends it to the VIP: an IPv4 or IPv6 header
/// and a 20-byte TCP header, checksums included.
fn syn_packet(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, seq: u32) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_SYN;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(40 + 20);
    let mut header = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 6, 0, 20]);
            header.extend_from_slice(&[0x45, 0, 0, 40]);
            header.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
            header.extend_from_slice(&s.octets());
            header.extend_from_slice(&d.octets());
            let check = super::icmp::checksum(&header);
            header[10..12].copy_from_slice(&check.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, 6]);
            header.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
            header.extend_from_slice(&s.octets());
            header.extend_from_slice(&d.octets());
        }
        // The config gives a source of the VIP's family.
        _ => return Vec::new(),
    }
    pseudo.extend_from_slice(&tcp);
    let check = super::icmp::checksum(&pseudo);
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    header.extend_from_slice(&tcp);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_syn_carries_valid_checksums() {
        let p = syn_packet("10.0.2.1".parse().unwrap(), "192.0.2.10".parse().unwrap(), 50000, 80, 7);
        assert_eq!(p.len(), 40);
        assert_eq!(super::super::icmp::checksum(&p[..20]), 0, "IPv4 header");
        let mut pseudo = vec![10, 0, 2, 1, 192, 0, 2, 10, 0, 6, 0, 20];
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(super::super::icmp::checksum(&pseudo), 0, "TCP");
        let p6 = syn_packet("2001:db8::1".parse().unwrap(), "2001:db8::10".parse().unwrap(), 50000, 80, 7);
        assert_eq!(p6.len(), 60);
        assert_eq!(&p6[4..8], &[0, 20, 6, 64]);
    }

    #[test]
    fn only_an_answer_to_this_syn_counts() {
        let mut seg = vec![0x45u8; 20];
        seg.extend_from_slice(&[0, 80, 0xc3, 0x50, 0, 0, 0, 1, 0, 0, 0, 8, 0x50, TCP_SYN | TCP_ACK, 0, 0]);
        seg.extend_from_slice(&[0; 4]);
        assert_eq!(answer(&seg, true, 7), Some(Answer::Accepted));
        assert_eq!(answer(&seg, true, 8), None, "acknowledges another SYN");
        seg[33] = TCP_RST | TCP_ACK;
        assert_eq!(answer(&seg, true, 7), Some(Answer::Refused));
        assert_eq!(answer(&seg[20..], false, 7), Some(Answer::Refused), "IPv6: no IP header");
        assert_eq!(answer(&seg[..30], true, 7), None, "cut short");
    }
}
