//! Link-layer addresses of backends, for direct routing.
//!
//! Direct routing rewrites only the Ethernet header, so each backend must be on a link of
//! the director. The kernel's neighbour table already knows most of them; for one it does
//! not, a zero-length UDP datagram to the discard port (9) makes the kernel resolve it
//! (ARP or neighbour discovery), the way `ping` would, without needing raw sockets.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::{
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
};

use crate::plan::Neighbour;

#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("opening a netlink socket")]
    Socket(#[from] std::io::Error),
    #[error("netlink")]
    Netlink(#[from] rtnetlink::Error),
}

fn usable(state: NeighbourState) -> bool {
    matches!(
        state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
    )
}

fn entry(msg: &NeighbourMessage) -> Option<(IpAddr, [u8; 6], u32)> {
    if !usable(msg.header.state) {
        return None;
    }
    let mut addr = None;
    let mut mac = None;
    for a in &msg.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => addr = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => addr = Some(IpAddr::V6(*v6)),
            NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                mac = Some([l[0], l[1], l[2], l[3], l[4], l[5]]);
            }
            _ => {}
        }
    }
    Some((addr?, mac?, msg.header.ifindex))
}

async fn link_mac(handle: &rtnetlink::Handle, ifindex: u32) -> Result<Option<[u8; 6]>, NeighbourError> {
    let mut links = handle.link().get().match_index(ifindex).execute();
    while let Some(msg) = links.try_next().await? {
        for a in msg.attributes {
            if let LinkAttribute::Address(l) = a
                && l.len() == 6
            {
                return Ok(Some([l[0], l[1], l[2], l[3], l[4], l[5]]));
            }
        }
    }
    Ok(None)
}

fn poke(addr: IpAddr) {
    let any: IpAddr =
        if addr.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    let bind = SocketAddr::new(any, 0);
    // Best effort: an error here only means the address stays unresolved, which the
    // caller reports.
    if let Ok(s) = UdpSocket::bind(bind) {
        let _ = s.send_to(&[], SocketAddr::new(addr, 9));
    }
}

/// Resolves `addrs` in the calling thread's network namespace, waiting up to `wait` for
/// addresses the kernel has to ask the network about. Addresses that stay unknown are
/// absent from the result.
pub async fn resolve(addrs: &[IpAddr], wait: Duration) -> Result<HashMap<IpAddr, Neighbour>, NeighbourError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn_task = tokio::spawn(conn);
    let result = resolve_with(&handle, addrs, wait).await;
    conn_task.abort();
    result
}

async fn resolve_with(
    handle: &rtnetlink::Handle,
    addrs: &[IpAddr],
    wait: Duration,
) -> Result<HashMap<IpAddr, Neighbour>, NeighbourError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut found: HashMap<IpAddr, ([u8; 6], u32)> = HashMap::new();
    let mut poked = false;
    loop {
        let mut dump = handle.neighbours().get().execute();
        while let Some(msg) = dump.try_next().await? {
            if let Some((addr, mac, ifindex)) = entry(&msg)
                && addrs.contains(&addr)
            {
                found.insert(addr, (mac, ifindex));
            }
        }
        let missing: Vec<IpAddr> = addrs.iter().filter(|a| !found.contains_key(a)).copied().collect();
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        if !poked {
            missing.iter().for_each(|a| poke(*a));
            poked = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut if_macs: HashMap<u32, Option<[u8; 6]>> = HashMap::new();
    let mut out = HashMap::new();
    for (addr, (mac, ifindex)) in found {
        let if_mac = match if_macs.get(&ifindex) {
            Some(m) => *m,
            None => {
                let m = link_mac(handle, ifindex).await?;
                if_macs.insert(ifindex, m);
                m
            }
        };
        if let Some(if_mac) = if_mac {
            out.insert(addr, Neighbour { mac, ifindex, if_mac });
        }
    }
    Ok(out)
}

/// The ifindex and link-layer address of each named interface that exists and has an
/// Ethernet address; the others are left out (the caller refuses missing interfaces).
pub fn interface_macs(names: &[String]) -> Result<std::collections::BTreeMap<u32, [u8; 6]>, NeighbourError> {
    let mut out = std::collections::BTreeMap::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        if !names.contains(&ifa.interface_name) {
            continue;
        }
        let Some(link) = ifa.address.as_ref().and_then(|a| a.as_link_addr()) else { continue };
        let (Some(mac), Ok(ifindex)) =
            (link.addr(), nix::net::if_::if_nametoindex(ifa.interface_name.as_str()))
        else {
            continue;
        };
        out.insert(ifindex, mac);
    }
    Ok(out)
}
