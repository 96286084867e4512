//! Link-layer addresses of backends' next hops.
//!
//! Direct routing rewrites only the Ethernet header, so each backend must be on a link of
//! the director: its own entry in the neighbour table is the next hop. A tunnel backend
//! may be anywhere the kernel has a route to: the next hop is that route's gateway (or
//! the backend itself on a link), and the way's MTU (the route's, else the device's)
//! bounds the packets sent in the tunnel. The kernel's neighbour table already knows
//! most next hops; for one it does not, a zero-length UDP datagram to the discard port
//! (9) of the backend makes the kernel resolve it (ARP or neighbour discovery), the way
//! `ping` would, without needing raw sockets.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt};
use rtnetlink::packet_route::{
    link::{InfoData, InfoVlan, LinkAttribute, LinkInfo, VlanProtocol},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteType},
};

use crate::model::Neighbour;

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

/// What the data path needs of the interface a neighbour was found on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Egress {
    /// The interface frames leave by: the VLAN device's parent for a VLAN device, since
    /// XDP can only redirect into a device that transmits frames itself.
    ifindex: u32,
    /// The interface's own MAC (the new Ethernet source).
    mac: [u8; 6],
    /// The 802.1Q tag the VLAN device would have added; zero for none.
    vlan: u16,
    /// The MTU of the interface the neighbour was found on (the VLAN device's own).
    mtu: u32,
}

/// The egress for a neighbour on `ifindex`; `None` for an interface without an Ethernet
/// address or one the data path cannot send through (an 802.1ad VLAN device: only
/// 802.1Q tags are written).
async fn egress_of(handle: &rtnetlink::Handle, ifindex: u32) -> Result<Option<Egress>, NeighbourError> {
    let mut links = handle.link().get().match_index(ifindex).execute();
    let mut found = None;
    while let Some(msg) = links.try_next().await? {
        found = egress_from(ifindex, msg.attributes);
    }
    Ok(found)
}

/// The egress of interface `ifindex` from its link attributes (see [`egress_of`]).
fn egress_from(ifindex: u32, attributes: Vec<LinkAttribute>) -> Option<Egress> {
    let (mut mac, mut parent, mut vlan, mut qinq, mut mtu) = (None, None, None, false, 0);
    for a in attributes {
        match a {
            LinkAttribute::Mtu(m) => mtu = m,
            LinkAttribute::Address(l) if l.len() == 6 => mac = Some([l[0], l[1], l[2], l[3], l[4], l[5]]),
            LinkAttribute::Link(p) => parent = Some(p),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    let LinkInfo::Data(InfoData::Vlan(v)) = info else { continue };
                    for attr in v {
                        match attr {
                            InfoVlan::Id(id) => vlan = Some(id),
                            InfoVlan::Protocol(VlanProtocol::Ieee8021Ad) => qinq = true,
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    match (mac?, vlan, parent) {
        (_, Some(_), _) if qinq => None,
        (mac, Some(vlan), Some(parent)) => Some(Egress { ifindex: parent, mac, vlan, mtu }),
        (_, Some(_), None) => None,
        (mac, None, _) => Some(Egress { ifindex, mac, vlan: 0, mtu }),
    }
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

/// A real server to resolve, and how it is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub addr: IpAddr,
    /// Through a tunnel: by the kernel's route to it (its gateway's link-layer address,
    /// the way's MTU); otherwise on a link (its own entry).
    pub routed: bool,
}

/// Resolves `targets` in the calling thread's network namespace, waiting up to `wait` for
/// next hops the kernel has to ask the network about. Targets that stay unknown (or, when
/// routed, have no unicast route) are absent from the result.
pub async fn resolve(
    targets: &[Target],
    wait: Duration,
) -> Result<HashMap<IpAddr, Neighbour>, NeighbourError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn_task = tokio::spawn(conn);
    let result = resolve_with(&handle, targets, wait).await;
    conn_task.abort();
    result
}

/// Where the kernel would send a packet to `addr`: the next hop (the route's gateway, or
/// `addr` on a link) and the route's MTU, if it sets one. `None` without a unicast route.
async fn next_hop(handle: &rtnetlink::Handle, addr: IpAddr) -> Result<Option<(IpAddr, u32)>, NeighbourError> {
    let message = rtnetlink::RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(addr, if addr.is_ipv4() { 32 } else { 128 })
        .map_err(|e| NeighbourError::Socket(std::io::Error::other(e.to_string())))?
        .build();
    let mut routes = handle.route().get(message).execute();
    let mut found = None;
    loop {
        match routes.try_next().await {
            Ok(Some(route)) => found = hop_of(&route, addr),
            Ok(None) => break,
            // No route at all (ENETUNREACH, EHOSTUNREACH): nothing to send to.
            Err(rtnetlink::Error::NetlinkError(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(found)
}

/// The next hop and route MTU (zero: the device's) of a route lookup's answer.
fn hop_of(route: &RouteMessage, addr: IpAddr) -> Option<(IpAddr, u32)> {
    if route.header.kind != RouteType::Unicast {
        return None;
    }
    let (mut hop, mut mtu) = (addr, 0);
    for a in &route.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => hop = IpAddr::V4(*g),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => hop = IpAddr::V6(*g),
            RouteAttribute::Metrics(metrics) => {
                for m in metrics {
                    if let RouteMetric::Mtu(m) = m {
                        mtu = *m;
                    }
                }
            }
            _ => {}
        }
    }
    Some((hop, mtu))
}

/// Route lookups in flight at once.
const ROUTE_LOOKUPS_AT_ONCE: usize = 64;

async fn resolve_with(
    handle: &rtnetlink::Handle,
    targets: &[Target],
    wait: Duration,
) -> Result<HashMap<IpAddr, Neighbour>, NeighbourError> {
    let deadline = tokio::time::Instant::now() + wait;
    // Each target's next hop (and route MTU); on-link targets are their own. Route
    // lookups go out many at a time: a farm of tunnel backends asks one per backend.
    let mut hops: HashMap<IpAddr, (IpAddr, u32)> =
        targets.iter().filter(|t| !t.routed).map(|t| (t.addr, (t.addr, 0))).collect();
    // Owned addresses and handles: a spawned refresh needs a future free of borrows.
    let routed: Vec<IpAddr> = targets.iter().filter(|t| t.routed).map(|t| t.addr).collect();
    let mut lookups = futures_util::stream::iter(routed)
        .map(|addr| {
            let handle = handle.clone();
            async move { next_hop(&handle, addr).await.map(|hop| (addr, hop)) }
        })
        .buffer_unordered(ROUTE_LOOKUPS_AT_ONCE);
    while let Some((addr, hop)) = lookups.try_next().await? {
        if let Some(hop) = hop {
            hops.insert(addr, hop);
        }
    }
    // Neighbour entries are matched against this set: a table of many entries and a farm
    // of many backends must not multiply.
    let wanted: std::collections::HashSet<IpAddr> = hops.values().map(|(hop, _)| *hop).collect();
    let mut found: HashMap<IpAddr, ([u8; 6], u32)> = HashMap::new();
    let mut poked = false;
    loop {
        let mut dump = handle.neighbours().get().execute();
        while let Some(msg) = dump.try_next().await? {
            if let Some((addr, mac, ifindex)) = entry(&msg)
                && wanted.contains(&addr)
            {
                found.insert(addr, (mac, ifindex));
            }
        }
        let missing: Vec<IpAddr> =
            hops.iter().filter(|(_, (hop, _))| !found.contains_key(hop)).map(|(addr, _)| *addr).collect();
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        if !poked {
            // A datagram to the target makes the kernel resolve its next hop, whichever.
            missing.iter().for_each(|a| poke(*a));
            poked = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut egresses: HashMap<u32, Option<Egress>> = HashMap::new();
    let mut out = HashMap::new();
    for t in targets {
        let Some(&(hop, route_mtu)) = hops.get(&t.addr) else { continue };
        let Some(&(mac, ifindex)) = found.get(&hop) else { continue };
        let egress = match egresses.get(&ifindex) {
            Some(e) => *e,
            None => {
                let e = egress_of(handle, ifindex).await?;
                egresses.insert(ifindex, e);
                e
            }
        };
        if let Some(e) = egress {
            // Direct routing forwards packets as they came: no MTU of its own to keep. A
            // route's MTU cannot make the device send longer frames than its own.
            let mtu = match (t.routed, route_mtu) {
                (false, _) => 0,
                (true, 0) => e.mtu,
                (true, m) => m.min(e.mtu),
            };
            let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
            out.insert(t.addr, Neighbour { mac, ifindex: e.ifindex, if_mac: e.mac, vlan: e.vlan, mtu });
        }
    }
    Ok(out)
}

/// Changes of the kernel's routes, neighbours or links, as a channel that holds one
/// pending signal: however many changes arrive, the receiver sees one, and at most one
/// per `quiet` (a refresh that pokes an unresolved next hop causes neighbour changes
/// itself; this keeps that from becoming a loop). Ends when the receiver is dropped.
pub fn watch_changes(quiet: Duration) -> Result<tokio::sync::mpsc::Receiver<()>, NeighbourError> {
    use futures_util::StreamExt as _;
    use rtnetlink::MulticastGroup;
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Neigh,
        MulticastGroup::Link,
    ])?;
    let conn_task = tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while messages.next().await.is_some() {
            match tx.try_send(()) {
                Ok(()) => tokio::time::sleep(quiet).await,
                Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => break,
            }
        }
        conn_task.abort();
    });
    Ok(rx)
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

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];

    fn vlan_link(parent: u32, info: Vec<InfoVlan>) -> Vec<LinkAttribute> {
        vec![
            LinkAttribute::Address(MAC.to_vec()),
            LinkAttribute::Link(parent),
            LinkAttribute::LinkInfo(vec![LinkInfo::Data(InfoData::Vlan(info))]),
        ]
    }

    #[test]
    fn a_neighbour_behind_a_vlan_device_leaves_by_its_parent_with_the_tag() {
        let e = egress_from(
            9,
            vlan_link(3, vec![InfoVlan::Id(200), InfoVlan::Protocol(VlanProtocol::Ieee8021Q)]),
        );
        assert_eq!(e, Some(Egress { ifindex: 3, mac: MAC, vlan: 200, mtu: 0 }));
    }

    #[test]
    fn a_plain_interface_is_its_own_untagged_egress() {
        // A veth has IFLA_LINK too (its peer): only VLAN data makes the parent the egress.
        let attrs = vec![LinkAttribute::Address(MAC.to_vec()), LinkAttribute::Link(12)];
        assert_eq!(egress_from(4, attrs), Some(Egress { ifindex: 4, mac: MAC, vlan: 0, mtu: 0 }));
        assert_eq!(egress_from(4, vec![LinkAttribute::Link(12)]), None, "no Ethernet address");
    }

    #[test]
    fn an_802_1ad_device_is_not_an_egress() {
        let e = egress_from(
            9,
            vlan_link(3, vec![InfoVlan::Id(10), InfoVlan::Protocol(VlanProtocol::Ieee8021Ad)]),
        );
        assert_eq!(e, None);
    }
}
