//! A direct-routing farm in namespaces:
//!
//! ```text
//!  client ──veth── director ──veth── lan (bridge) ──veth── server1..N
//!  10.0.1.10+      10.0.1.1 │ 10.0.2.1                       10.0.2.11+, VIP on lo
//! ```
//!
//! With [`ClientPath::Router`] a router stands between client and director (clients then
//! live on 10.0.3.0/24, the router at 10.0.1.2 and 10.0.3.1).
//!
//! With [`ServerPath::Routed`] the `lan` namespace is a router instead of a bridge: the
//! servers live on another subnet behind it, as tunnel backends do:
//!
//! ```text
//!  director ──veth── lan (router: 10.0.2.2 │ br0 10.0.4.1) ──veth── server1..N
//!  10.0.2.1                                                          10.0.4.11+
//! ```
//!
//! The client routes the VIP via the director. The director's XDP program sends VIP
//! traffic to a server by rewriting MACs and redirecting into its LAN interface; servers
//! hold the VIP on loopback (arp_ignore/arp_announce, as with LVS-DR) and answer the
//! client directly through their default gateway, the director, which routes the replies.

use std::net::Ipv4Addr;

use anyhow::Result;

use crate::{NetNs, veth, veth_named};

pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const DIRECTOR_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
pub const DIRECTOR_LAN_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// The director's interface names, fixed so that `configs/lab.yaml` can name them.
pub const DIRECTOR_IN: &str = "ext0";
pub const DIRECTOR_OUT: &str = "lan0";
/// Every address of this prefix is a possible VIP: servers hold all of it on loopback
/// and the client routes it via the director.
pub const VIP_PREFIX_LEN: u8 = 24;

/// How the clients reach the director.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientPath {
    /// One link from the client to the director's `ext0`.
    #[default]
    Direct,
    /// Through a router whose interface toward the clients carries at most `mtu` bytes
    /// per packet (the clients' own side stays at 1500, so they advertise a full MSS):
    /// a bigger reply makes the router send "fragmentation needed" to its source, the VIP.
    Router { mtu: u32 },
}

/// Where the real servers are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServerPath {
    /// On the director's LAN (a bridge), as direct routing needs.
    #[default]
    Lan,
    /// On another subnet behind a router: reached through tunnels.
    Routed,
}

/// The router of [`ServerPath::Routed`], on the director's LAN.
pub const SERVER_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The router's side of the servers' subnet.
pub const SERVER_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 4, 1);

/// Real server `i`'s address in a lab whose servers are where `path` says.
pub fn server_addr(path: ServerPath, i: usize) -> Ipv4Addr {
    let net = if path == ServerPath::Routed { 4 } else { 2 };
    Ipv4Addr::new(10, 0, net, 11 + i as u8)
}

/// The shape of a lab: how clients reach the director, whether their IPv4 frames reach
/// it tagged, and where the servers are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub client_path: ClientPath,
    pub server_path: ServerPath,
    /// A switch between the clients and the director tags the clients' IPv4 frames with
    /// this 802.1Q VLAN (and strips tags on the way back), as a trunk port would; ARP
    /// stays untagged. It is an XDP program (`lb_test_trunk`) because the test kernels
    /// have no VLAN devices. Only with `ClientPath::Direct`.
    pub client_vlan: Option<u16>,
    /// Masquerading real servers (`forward: nat`): no VIP on their loopback, nothing
    /// else but their default route through the director.
    pub masqueraded: bool,
}

/// The tagging switch of [`Layout::client_vlan`]: its namespace and its two ports.
pub struct TrunkSwitch {
    pub ns: NetNs,
    /// Faces the clients: frames from them get the tag.
    pub client_port: String,
    /// Faces the director: tags are removed from frames coming back.
    pub director_port: String,
    pub vlan: u16,
}

pub const ROUTER_DIRECTOR_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
pub const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 1);

pub struct DrTopology {
    pub client: NetNs,
    /// The router of [`ClientPath::Router`].
    pub router: Option<NetNs>,
    /// The tagging switch of [`Layout::client_vlan`]; its XDP programs are the lab's to
    /// attach, as is the pass-through one on `client_if` that lets it deliver frames.
    pub switch: Option<TrunkSwitch>,
    /// The client's interface.
    pub client_if: String,
    pub director: NetNs,
    pub lan: NetNs,
    pub servers: Vec<NetNs>,
    /// Director interface facing the client (the balancer attaches here).
    pub director_in: String,
    /// Director interface facing the servers.
    pub director_out: String,
    /// The bridge port that receives the director's redirected frames.
    pub lan_port: String,
    pub client_addrs: Vec<Ipv4Addr>,
    pub server_addrs: Vec<Ipv4Addr>,
    /// Each server's interface (in its own namespace).
    pub server_ifs: Vec<String>,
}

/// Veth offloads would leave checksums to "hardware" that XDP bypasses, and VLAN tags in
/// packet metadata where XDP does not look.
pub fn no_offloads(ns: &NetNs, iface: &str) -> Result<()> {
    ns.exec(&[
        "ethtool", "-K", iface, "tx", "off", "tso", "off", "gso", "off", "gro", "off", "txvlan", "off",
        "rxvlan", "off",
    ])
    .map(drop)
}

impl DrTopology {
    pub fn build(servers: usize, client_addrs: usize) -> Result<Self> {
        Self::build_with(servers, client_addrs, Layout::default())
    }

    pub fn build_with(servers: usize, client_addrs: usize, layout: Layout) -> Result<Self> {
        anyhow::ensure!(
            layout.client_vlan.is_none() || layout.client_path == ClientPath::Direct,
            "a tagged client side needs the direct client path"
        );
        let client = NetNs::new("cl")?;
        let director = NetNs::new("dr")?;
        let lan = NetNs::new("ln")?;
        let vip_net = ipnet::Ipv4Net::new(VIP, VIP_PREFIX_LEN)?.trunc().to_string();
        let mut switch = None;
        let (router, cl_if, dir_in, client_net) = match layout.client_path {
            ClientPath::Direct if layout.client_vlan.is_some() => {
                let ns = NetNs::new("sw")?;
                let (cl_if, client_port) = veth(&client, &ns, "sc")?;
                let (director_port, dir_in) =
                    veth_named(&ns, &director, &crate::unique_name("sd"), DIRECTOR_IN)?;
                for i in [&client_port, &director_port] {
                    no_offloads(&ns, i)?;
                }
                let vlan = layout.client_vlan.unwrap_or_default();
                switch = Some(TrunkSwitch { ns, client_port, director_port, vlan });
                (None, cl_if, dir_in, 1)
            }
            ClientPath::Direct => {
                let (cl_if, dir_in) = veth_named(&client, &director, &crate::unique_name("ca"), DIRECTOR_IN)?;
                (None, cl_if, dir_in, 1)
            }
            ClientPath::Router { mtu } => {
                let router = NetNs::new("rt")?;
                let (rt_out, dir_in) =
                    veth_named(&router, &director, &crate::unique_name("ra"), DIRECTOR_IN)?;
                let (cl_if, rt_in) = veth(&client, &router, "rc")?;
                for i in [&rt_out, &rt_in] {
                    no_offloads(&router, i)?;
                }
                router.ip(&["addr", "add", &format!("{ROUTER_DIRECTOR_SIDE}/24"), "dev", &rt_out])?;
                router.ip(&["addr", "add", &format!("{ROUTER_CLIENT_SIDE}/24"), "dev", &rt_in])?;
                router.ip(&["link", "set", &rt_in, "mtu", &mtu.to_string()])?;
                router.ip(&["route", "add", &vip_net, "via", &DIRECTOR_CLIENT_SIDE.to_string()])?;
                router.sysctl("net.ipv4.ip_forward", "1")?;
                (Some(router), cl_if, dir_in, 3)
            }
        };
        let (dir_out, lan_port) = veth_named(&director, &lan, DIRECTOR_OUT, &crate::unique_name("db"))?;
        for (ns, i) in [(&client, &cl_if), (&director, &dir_in), (&director, &dir_out), (&lan, &lan_port)] {
            no_offloads(ns, i)?;
        }

        director.sysctl("net.ipv4.ip_forward", "1")?;
        // Replies come from the VIP, which the director has no route back to.
        for scope in ["all", "default", dir_in.as_str(), dir_out.as_str()] {
            director.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
        }

        let client_addrs: Vec<Ipv4Addr> =
            (0..client_addrs).map(|i| Ipv4Addr::new(10, 0, client_net, 10 + i as u8)).collect();
        for a in &client_addrs {
            client.ip(&["addr", "add", &format!("{a}/24"), "dev", &cl_if])?;
        }
        if router.is_some() {
            let via = ROUTER_CLIENT_SIDE.to_string();
            client.ip(&["route", "add", &vip_net, "via", &via])?;
            client.ip(&["route", "add", "10.0.1.0/24", "via", &via])?;
        } else {
            client.ip(&["route", "add", &vip_net, "via", &DIRECTOR_CLIENT_SIDE.to_string()])?;
        }

        director.ip(&["addr", "add", &format!("{DIRECTOR_CLIENT_SIDE}/24"), "dev", &dir_in])?;
        director.ip(&["addr", "add", &format!("{DIRECTOR_LAN_SIDE}/24"), "dev", &dir_out])?;
        if router.is_some() {
            director.ip(&["route", "add", "10.0.3.0/24", "via", &ROUTER_DIRECTOR_SIDE.to_string()])?;
        }

        let bridge = "br0";
        lan.ip(&["link", "add", bridge, "type", "bridge"])?;
        lan.ip(&["link", "set", bridge, "up"])?;
        let routed = layout.server_path == ServerPath::Routed;
        let gateway = if routed {
            // The bridge joins only the servers; the director's link is routed to them.
            lan.ip(&["addr", "add", &format!("{SERVER_ROUTER}/24"), "dev", &lan_port])?;
            lan.ip(&["addr", "add", &format!("{SERVER_GATEWAY}/24"), "dev", bridge])?;
            lan.ip(&["route", "add", "default", "via", &DIRECTOR_LAN_SIDE.to_string()])?;
            lan.sysctl("net.ipv4.ip_forward", "1")?;
            director.ip(&["route", "add", "10.0.4.0/24", "via", &SERVER_ROUTER.to_string()])?;
            SERVER_GATEWAY
        } else {
            lan.ip(&["link", "set", &lan_port, "master", bridge])?;
            DIRECTOR_LAN_SIDE
        };

        let mut server_ns = Vec::new();
        let mut server_addrs = Vec::new();
        let mut server_ifs = Vec::new();
        for i in 0..servers {
            let s = NetNs::new("sv")?;
            let (port, sif) = veth(&lan, &s, "s")?;
            no_offloads(&lan, &port)?;
            no_offloads(&s, &sif)?;
            lan.ip(&["link", "set", &port, "master", bridge])?;
            let addr = server_addr(layout.server_path, i);
            s.ip(&["addr", "add", &format!("{addr}/24"), "dev", &sif])?;
            s.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
            if !layout.masqueraded {
                // On lo a prefix makes every address in it local.
                s.ip(&["addr", "add", &format!("{VIP}/{VIP_PREFIX_LEN}"), "dev", "lo"])?;
                // LVS-DR and LVS-TUN: never answer or announce ARP for the VIP held on
                // loopback.
                s.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
                s.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
            }
            server_addrs.push(addr);
            server_ns.push(s);
            server_ifs.push(sif);
        }
        Ok(DrTopology {
            client,
            router,
            switch,
            client_if: cl_if,
            director,
            lan,
            servers: server_ns,
            director_in: dir_in,
            director_out: dir_out,
            lan_port,
            client_addrs,
            server_addrs,
            server_ifs,
        })
    }
}
