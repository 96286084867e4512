//! Masquerading (`forward: nat`): the client's packets rewritten for the backend, its
//! replies translated back to the VIP and sent toward the client by the kernel's FIB,
//! byte for byte against frames built independently (fresh checksums), and the flow's
//! state following both halves of the conversation. Needs root.

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::{Context as _, Result, ensure};
use lb_common::{
    FLOW_CLOSED, FLOW_ESTABLISHED, FLOW_FIN_SERVER, FLOW_NAT_SYN_SENT, FLOW_SYN_RECV, FlowKey, stat,
};
use lb_daemon::dataplane::{Dataplane, LoadOptions};
use lb_daemon::model::{Forward, Neighbour, Protocol, ServiceMatch, ServiceSpec};
use lb_daemon::plan::{Plan, Planner};
use lb_ebpf::parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use lb_ebpf::testpkt::{self, Ipv4Opts, Ipv6Opts, L4};
use lb_tests::NetNs;
use lb_tests::fixture::{XDP_PASS, XDP_REDIRECT, XDP_TX, tcp_service, test_run};

const DIRECTOR_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0];
const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 2, 0x11];
const BACKEND6_MAC: [u8; 6] = [2, 0, 0, 0, 2, 0x61];
/// The client's next hop on the director's client-side link (a permanent neighbour).
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 7, 7];
const CLIENT_LINK: &str = "natc0";

const VIP: [u8; 4] = [192, 0, 2, 10];
const BACKEND: [u8; 4] = [10, 2, 0, 11];
const CLIENT: [u8; 4] = [203, 0, 113, 7];

fn v6(net: u16, last: u8) -> [u8; 16] {
    let mut a = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last];
    a[4..6].copy_from_slice(&net.to_be_bytes());
    a
}

fn vip6() -> [u8; 16] {
    v6(0, 0x10)
}
fn backend6() -> [u8; 16] {
    v6(2, 0x11)
}
fn client6() -> [u8; 16] {
    v6(0xc, 7)
}

/// `VIP:80 -> 10.2.0.11:8080` (TCP), `VIP:53 -> 10.2.0.11:5353` (UDP), and
/// `[2001:db8::10]:80 -> [2001:db8:2::11]:8080`.
fn services() -> Vec<ServiceSpec> {
    let nat = |mut s: ServiceSpec, port: u16| {
        s.forward = Forward::Nat;
        for b in &mut s.backends {
            b.forward = Forward::Nat;
            b.port = Some(port);
        }
        s
    };
    let mut dns = tcp_service("dns", IpAddr::from(VIP), 53, 4093, &[IpAddr::from(BACKEND)]);
    dns.matcher = ServiceMatch::Vip { addr: IpAddr::from(VIP), port: 53, proto: Protocol::Udp };
    vec![
        nat(tcp_service("web", IpAddr::from(VIP), 80, 4093, &[IpAddr::from(BACKEND)]), 8080),
        nat(dns, 5353),
        nat(tcp_service("web6", IpAddr::from(vip6()), 80, 4093, &[IpAddr::from(backend6())]), 8080),
    ]
}

struct Env {
    dp: Dataplane,
    plan: Plan,
    /// The MAC of the director's client-side link (the replies' new source).
    link_mac: [u8; 6],
}

/// A data path with the NAT services in a namespace of its own, whose kernel routes to
/// the clients through `natc0` (forwarding on, the next hop's MAC a permanent entry).
/// Backends sit on loopback, BPF_PROG_TEST_RUN's ingress: packets to them go out by TX.
fn with_env(f: impl FnOnce(&mut Env) -> Result<()> + Send + 'static) -> Result<()> {
    let ns = NetNs::new("nat")?;
    ns.ip(&["link", "add", CLIENT_LINK, "type", "veth", "peer", "name", "natc1"])?;
    for cmd in [
        vec!["link", "set", CLIENT_LINK, "up"],
        vec!["link", "set", "natc1", "up"],
        vec!["link", "set", "lo", "up"],
        vec!["addr", "add", "203.0.113.1/24", "dev", CLIENT_LINK],
        vec!["addr", "add", "2001:db8:c::1/64", "dev", CLIENT_LINK, "nodad"],
        vec!["neigh", "add", "203.0.113.7", "lladdr", "02:00:00:00:07:07", "dev", CLIENT_LINK, "nud", "permanent"],
        vec!["neigh", "add", "2001:db8:c::7", "lladdr", "02:00:00:00:07:07", "dev", CLIENT_LINK, "nud", "permanent"],
    ] {
        ns.ip(&cmd)?;
    }
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    let link_mac = mac_of(&ns, CLIENT_LINK)?;
    ns.run(move || {
        let mut dp = Dataplane::load(&LoadOptions { ring_slots: 8 * 4093, flow_entries: 1024, pin_dir: None })?;
        let neighbour = |mac| Neighbour { mac, ifindex: 1, if_mac: DIRECTOR_MAC, vlan: 0, mtu: 0 };
        let neighbours: HashMap<IpAddr, Neighbour> = [
            (IpAddr::from(BACKEND), neighbour(BACKEND_MAC)),
            (IpAddr::from(backend6()), neighbour(BACKEND6_MAC)),
        ]
        .into();
        let mut plan = Planner::default().plan(&services(), &[], &neighbours)?;
        plan.state.local_macs.insert(1, [testpkt::DIRECTOR_MAC].into_iter().collect());
        dp.apply(&plan.state)?;
        f(&mut Env { dp, plan, link_mac })
    })
}

fn mac_of(ns: &NetNs, link: &str) -> Result<[u8; 6]> {
    let out = ns.exec(&["cat", &format!("/sys/class/net/{link}/address")])?;
    let bytes: Vec<u8> =
        out.trim().split(':').map(|h| u8::from_str_radix(h, 16)).collect::<Result<_, _>>().context("MAC")?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("MAC of {link}: {out}"))
}

fn with_macs(mut f: Vec<u8>, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f
}

const ROUTED: Ipv4Opts = Ipv4Opts { vlan: None, options: 0, ihl: None, total_len_extra: 0, frag: 0, ttl: Some(63) };

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8, opts: Ipv4Opts) -> Vec<u8> {
    testpkt::ipv4(src, dst, L4::Tcp { sport, dport, flags, payload: 10 }, opts)
}

fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, flags: u8, hop_limit: u8) -> Vec<u8> {
    let opts = Ipv6Opts { hop_limit: Some(hop_limit), ..Ipv6Opts::default() };
    testpkt::ipv6(src, dst, L4::Tcp { sport, dport, flags, payload: 10 }, opts)
}

impl Env {
    fn expect(&self, what: &str, input: &[u8], action: u32, want: &[u8]) -> Result<()> {
        let (got_action, out) = test_run(&self.dp, input)?;
        ensure!(got_action == action, "{what}: action {got_action}, want {action}");
        ensure!(out == want, "{what}: got\n{out:02x?}\nwant\n{want:02x?}");
        Ok(())
    }

    fn state(&self, sport: u16) -> Result<u16> {
        let flows: Vec<(FlowKey, lb_common::Flow)> = self.dp.flows()?;
        flows
            .into_iter()
            .find(|(k, _)| u16::from_be(k.sport) == sport)
            .map(|(_, f)| f.state)
            .ok_or_else(|| anyhow::anyhow!("no flow from port {sport}"))
    }

    fn to_backend(&self, frame: Vec<u8>) -> Vec<u8> {
        with_macs(frame, BACKEND_MAC, DIRECTOR_MAC)
    }

    fn to_client(&self, frame: Vec<u8>) -> Vec<u8> {
        with_macs(frame, CLIENT_MAC, self.link_mac)
    }
}

#[test]
fn both_directions_are_translated_byte_for_byte_with_port_mapping() -> Result<()> {
    with_env(|env| {
        let d = ROUTED;
        // TCP over IPv4: VIP:80 -> 10.2.0.11:8080 and back.
        env.expect(
            "IPv4 SYN to the backend",
            &tcp4(CLIENT, VIP, 40000, 80, TCP_SYN, Ipv4Opts::default()),
            XDP_TX,
            &env.to_backend(tcp4(CLIENT, BACKEND, 40000, 8080, TCP_SYN, d.clone())),
        )?;
        env.expect(
            "IPv4 SYN-ACK back from the VIP",
            &tcp4(BACKEND, CLIENT, 8080, 40000, TCP_SYN | TCP_ACK, Ipv4Opts::default()),
            XDP_REDIRECT,
            &env.to_client(tcp4(VIP, CLIENT, 80, 40000, TCP_SYN | TCP_ACK, d.clone())),
        )?;
        // UDP with a checksum, and without one (IPv4 allows it; it stays without).
        let udp = |src, dst, sport, dport, opts| testpkt::ipv4(src, dst, L4::udp(sport, dport), opts);
        env.expect(
            "UDP query to the backend",
            &udp(CLIENT, VIP, 41000, 53, Ipv4Opts::default()),
            XDP_TX,
            &env.to_backend(udp(CLIENT, BACKEND, 41000, 5353, d.clone())),
        )?;
        env.expect(
            "UDP answer back from the VIP",
            &udp(BACKEND, CLIENT, 5353, 41000, Ipv4Opts::default()),
            XDP_REDIRECT,
            &env.to_client(udp(VIP, CLIENT, 53, 41000, d.clone())),
        )?;
        let no_checksum = |mut f: Vec<u8>| {
            f[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
            f
        };
        env.expect(
            "UDP without a checksum",
            &no_checksum(udp(CLIENT, VIP, 41001, 53, Ipv4Opts::default())),
            XDP_TX,
            &env.to_backend(no_checksum(udp(CLIENT, BACKEND, 41001, 5353, d.clone()))),
        )?;
        // TCP over IPv6.
        env.expect(
            "IPv6 SYN to the backend",
            &tcp6(client6(), vip6(), 40000, 80, TCP_SYN, 64),
            XDP_TX,
            &with_macs(tcp6(client6(), backend6(), 40000, 8080, TCP_SYN, 63), BACKEND6_MAC, DIRECTOR_MAC),
        )?;
        env.expect(
            "IPv6 SYN-ACK back from the VIP",
            &tcp6(backend6(), client6(), 8080, 40000, TCP_SYN | TCP_ACK, 64),
            XDP_REDIRECT,
            &env.to_client(tcp6(vip6(), client6(), 80, 40000, TCP_SYN | TCP_ACK, 63)),
        )?;
        // What belongs to no flow is the kernel's, untouched: another client port, and
        // the backend's own traffic to the same client from another port.
        for (what, frame) in [
            ("a reply of no flow", tcp4(BACKEND, CLIENT, 8080, 40999, TCP_ACK, Ipv4Opts::default())),
            ("the backend's other traffic", tcp4(BACKEND, CLIENT, 22, 40000, TCP_ACK, Ipv4Opts::default())),
            ("an IPv6 reply of no flow", tcp6(backend6(), client6(), 8080, 40999, TCP_ACK, 64)),
        ] {
            env.expect(what, &frame, XDP_PASS, &frame)?;
        }
        // A packet whose TTL would run out at the director is dropped, not forwarded.
        let last_hop = Ipv4Opts { ttl: Some(1), ..Ipv4Opts::default() };
        let (action, _) = test_run(&env.dp, &tcp4(CLIENT, VIP, 40000, 80, TCP_ACK, last_hop))?;
        ensure!(action == lb_tests::fixture::XDP_DROP, "TTL 1: action {action}");
        let counters = env.dp.global_counters()?;
        ensure!(counters[stat::DROP_TTL_EXPIRED as usize] == 1, "{:?}", &counters[..32]);
        ensure!(counters[stat::NAT_REPLY_SENT as usize] == 3, "{:?}", &counters[40..48]);
        Ok(())
    })
}

#[test]
fn a_nat_flow_follows_the_handshake_and_both_fins() -> Result<()> {
    with_env(|env| {
        let port = 42000;
        let client = |flags| tcp4(CLIENT, VIP, port, 80, flags, Ipv4Opts::default());
        let server = |flags| tcp4(BACKEND, CLIENT, 8080, port, flags, Ipv4Opts::default());
        let steps: [(&str, Vec<u8>, u16); 6] = [
            ("client SYN", client(TCP_SYN), FLOW_NAT_SYN_SENT),
            // Under direct routing this ACK would make the flow established; here the
            // server has not answered yet.
            ("client ACK before any answer", client(TCP_ACK), FLOW_NAT_SYN_SENT),
            ("server SYN-ACK", server(TCP_SYN | TCP_ACK), FLOW_SYN_RECV),
            ("client ACK", client(TCP_ACK), FLOW_ESTABLISHED),
            ("server FIN", server(TCP_FIN | TCP_ACK), FLOW_FIN_SERVER),
            ("client FIN", client(TCP_FIN | TCP_ACK), FLOW_CLOSED),
        ];
        for (what, frame, want) in steps {
            let (action, _) = test_run(&env.dp, &frame)?;
            ensure!(action == XDP_TX || action == XDP_REDIRECT, "{what}: action {action}");
            let got = env.state(port)?;
            ensure!(got == want, "{what}: state {got}, want {want}");
        }
        // A RST from the server ends a flow at once.
        let port = 42001;
        test_run(&env.dp, &tcp4(CLIENT, VIP, port, 80, TCP_SYN, Ipv4Opts::default()))?;
        test_run(&env.dp, &tcp4(BACKEND, CLIENT, 8080, port, TCP_RST, Ipv4Opts::default()))?;
        ensure!(env.state(port)? == FLOW_CLOSED, "RST");
        // The reverse index is keyed by the backend's own port: it is what replies carry.
        ensure!(env.plan.state.backends.values().all(|b| b.port == 8080u16.to_be() || b.port == 5353u16.to_be()));
        Ok(())
    })
}
