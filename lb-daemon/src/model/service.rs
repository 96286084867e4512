//! Services, backends and how they are matched, scheduled and forwarded.

use std::net::IpAddr;

use ipnet::IpNet;
use lb_common::{PROTO_TCP, PROTO_UDP};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

/// How a new flow picks its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduler {
    /// Source hashing: one client address, one backend (IPVS `sh`).
    Sh,
    /// Maglev over the 5-tuple: connections of one client spread out (IPVS `mh`).
    Mh,
    /// Weighted round-robin over new flows, a cursor per CPU (IPVS `wrr`). Not
    /// consistent: a flow the connection table lost may land elsewhere.
    Wrr,
}

impl Scheduler {
    /// The name in the config and in IPVS.
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Sh => "sh",
            Scheduler::Mh => "mh",
            Scheduler::Wrr => "wrr",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceMatch {
    Vip {
        addr: IpAddr,
        port: u16,
        proto: Protocol,
    },
    /// Traffic classified by a fwmark-style rule with this mark.
    Mark(u32),
}

/// `192.0.2.10:80/tcp`, `[2001:db8::10]:443/tcp`, `fwmark 7`: for errors and labels.
impl std::fmt::Display for ServiceMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ServiceMatch::Vip { addr, port, proto } => {
                write!(f, "{}/{}", std::net::SocketAddr::new(addr, port), proto.name())
            }
            ServiceMatch::Mark(m) => write!(f, "fwmark {m}"),
        }
    }
}

/// What an operator asked of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Active,
    /// No new flows; established ones stay (soft stop for rolling upgrades).
    Drain,
    /// No traffic at all: established flows move to other backends.
    Disabled,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: IpAddr,
    pub weight: u32,
    pub state: BackendState,
    /// How packets reach this backend: the service's `forward`, or the backend's own
    /// (IPVS decides per real server).
    pub forward: Forward,
    /// NAT backends: the port the service's packets are sent to (VIP:80 -> RS:8080);
    /// `None` keeps each packet's own. Other methods leave ports as they are.
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub matcher: ServiceMatch,
    pub scheduler: Scheduler,
    /// A prime: the Maglev table size. For `wrr`, the longest sequence.
    pub ring_size: u32,
    pub backends: Vec<BackendSpec>,
    /// The sorry server: takes the new flows while no backend can (all down, disabled,
    /// drained or at weight 0). Not health-checked, as keepalived's `sorry_server`.
    pub fallback: Option<IpAddr>,
    /// What happens to new flows while neither a backend nor the fallback can take them.
    pub fallback_action: FallbackAction,
    /// How packets reach the backends that do not say otherwise (and the fallback).
    pub forward: Forward,
    /// One new connection in this many is logged (`director.connection_log`); 0: none.
    pub log_connections: u32,
}

impl BackendSpec {
    /// An active backend reached by direct routing (the default `forward`), its packets'
    /// ports kept.
    pub fn active(addr: IpAddr, weight: u32) -> Self {
        BackendSpec { addr, weight, state: BackendState::Active, forward: Forward::Dr, port: None }
    }
}

impl ServiceSpec {
    /// A TCP service on `vip:port`: source hashing over a `ring_size` ring, direct routing,
    /// no fallback (new flows dropped while no backend can), no connection log. The plain
    /// service that tests, benchmarks and examples start from and change what they need.
    pub fn tcp(name: &str, vip: IpAddr, port: u16, ring_size: u32, backends: Vec<BackendSpec>) -> Self {
        ServiceSpec {
            name: name.into(),
            matcher: ServiceMatch::Vip { addr: vip, port, proto: Protocol::Tcp },
            scheduler: Scheduler::Sh,
            ring_size,
            backends,
            fallback: None,
            fallback_action: FallbackAction::Drop,
            forward: Forward::Dr,
            log_connections: 0,
        }
    }
}

/// New flows of a service with nowhere to go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FallbackAction {
    /// Dropped (counted as `no_backend` drops): clients retry or fail fast.
    #[default]
    Drop,
    /// Handed to the director's own stack (counted as `no_backend` passes).
    Pass,
}

/// `iptables -t mangle -A PREROUTING -d DST [-s SRC] -p PROTO --dport LO:HI -j MARK --set-mark N`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkRuleSpec {
    pub mark: u32,
    pub dst: IpNet,
    /// `None` matches TCP and UDP.
    pub proto: Option<Protocol>,
    /// Inclusive destination port range.
    pub ports: (u16, u16),
    pub src: Option<IpNet>,
}

/// Where a backend's frames go: resolved by the daemon from the neighbour table (direct
/// routing), or from the route to the backend and its next hop's entry (tunnels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub mac: [u8; 6],
    pub ifindex: u32,
    /// MAC of the interface the neighbour was found on (the new Ethernet source).
    pub if_mac: [u8; 6],
    /// The 802.1Q tag to send with when the neighbour is behind a VLAN device, whose
    /// parent is then `ifindex`; zero for none.
    pub vlan: u16,
    /// The MTU of the way there (the route's, else the device's); zero when not looked
    /// up (direct routing leaves packets as long as they came).
    pub mtu: u16,
}

/// Forwarding method, named as in keepalived (`lb_kind DR|TUN|NAT`), and full NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    Dr,
    Tunnel,
    Nat,
    /// The source is translated too, to an address of `director.fullnat_source`.
    FullNat,
}

impl Forward {
    /// The name `ipvsadm -L` prints.
    pub fn ipvs_name(self) -> &'static str {
        match self {
            Forward::Dr => "Route",
            Forward::Tunnel => "Tunnel",
            Forward::Nat => "Masq",
            // Not an IPVS method; named as the full-NAT patches of LVS name it.
            Forward::FullNat => "FullNat",
        }
    }
}

/// XDP attach mode, as an operator names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver, before an skb exists (the fast path).
    Native,
    /// After the skb is built: works on any interface, for tests and odd NICs.
    Generic,
}
