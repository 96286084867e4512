//! Masquerading (`forward: nat`): the client's packets rewritten for the backend, its
//! replies translated back to the VIP and sent toward the client by the kernel's FIB,
//! byte for byte against frames built independently (fresh checksums), and the flow's
//! state following both halves of the conversation. Needs root.

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::{Result, ensure};
use lb_common::{
    FLOW_CLOSED, FLOW_ESTABLISHED, FLOW_FIN_SERVER, FLOW_NAT_SYN_SENT, FLOW_SYN_RECV, FlowKey, stat,
};
use lb_daemon::dataplane::{Dataplane, LoadOptions};
use lb_daemon::model::{Forward, Neighbour, Protocol, ServiceMatch, ServiceSpec};
use lb_daemon::plan::{Plan, Planner};
use lb_ebpf::parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use lb_ebpf::testpkt::{self, Ipv4Opts, Ipv6Opts, L4};
use lb_tests::NetNs;
use lb_tests::fixture::{XDP_PASS, XDP_REDIRECT, XDP_TX, tcp_service, test_run, with_macs};

const DIRECTOR_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0];
const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 2, 0x11];
const BACKEND6_MAC: [u8; 6] = [2, 0, 0, 0, 2, 0x61];
/// The client's next hop on the director's client-side link (a permanent neighbour).
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 7, 7];
const CLIENT_LINK: &str = "natc0";

const VIP: [u8; 4] = [192, 0, 2, 10];
/// The full-NAT service's VIP, and the director's full-NAT source.
const FULL_VIP: [u8; 4] = [192, 0, 2, 11];
const POOL: [u8; 4] = [198, 51, 100, 50];
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
fn pool6() -> [u8; 16] {
    v6(0xf, 0x50)
}

/// `VIP:80 -> 10.2.0.11:8080` (TCP), `VIP:53 -> 10.2.0.11:5353` (UDP),
/// `[2001:db8::10]:80 -> [2001:db8:2::11]:8080`, and by full NAT
/// `FULL_VIP:80 -> 10.2.0.11:8080` from `POOL`.
fn services() -> Vec<ServiceSpec> {
    let with = |mut s: ServiceSpec, port: u16, forward| {
        s.forward = forward;
        for b in &mut s.backends {
            b.forward = forward;
            b.port = Some(port);
        }
        s
    };
    let nat = |s, port| with(s, port, Forward::Nat);
    let mut dns = tcp_service("dns", IpAddr::from(VIP), 53, 4093, &[IpAddr::from(BACKEND)]);
    dns.matcher = ServiceMatch::Vip { addr: IpAddr::from(VIP), port: 53, proto: Protocol::Udp };
    vec![
        nat(tcp_service("web", IpAddr::from(VIP), 80, 4093, &[IpAddr::from(BACKEND)]), 8080),
        nat(dns, 5353),
        nat(tcp_service("web6", IpAddr::from(vip6()), 80, 4093, &[IpAddr::from(backend6())]), 8080),
        with(
            tcp_service("full", IpAddr::from(FULL_VIP), 80, 4093, &[IpAddr::from(BACKEND)]),
            8080,
            Forward::FullNat,
        ),
        with(
            tcp_service("full6", IpAddr::from(v6(0, 0x11)), 80, 4093, &[IpAddr::from(backend6())]),
            8080,
            Forward::FullNat,
        ),
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
    ns.stub_link(
        CLIENT_LINK,
        "natc1",
        &["203.0.113.1/24", "2001:db8:c::1/64"],
        &[("203.0.113.7", "02:00:00:00:07:07"), ("2001:db8:c::7", "02:00:00:00:07:07")],
    )?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    let link_mac = ns.mac(CLIENT_LINK)?;
    ns.run(move || {
        let mut dp =
            // Room for the full-NAT test's 10,000 flows in every table.
            Dataplane::load(&LoadOptions { ring_slots: 8 * 4093, flow_entries: 65536, pin_dir: None })?;
        let neighbour = |mac| Neighbour { mac, ifindex: 1, if_mac: DIRECTOR_MAC, vlan: 0, mtu: 0 };
        let neighbours: HashMap<IpAddr, Neighbour> = [
            (IpAddr::from(BACKEND), neighbour(BACKEND_MAC)),
            (IpAddr::from(backend6()), neighbour(BACKEND6_MAC)),
        ]
        .into();
        let mut plan = Planner::default().plan(&services(), &[], &neighbours)?;
        plan.state.local_macs.insert(1, [testpkt::DIRECTOR_MAC].into_iter().collect());
        plan.state.set_fullnat_sources(
            Some(format!("{}/32", IpAddr::from(POOL)).parse()?),
            Some(format!("{}/128", IpAddr::from(pool6())).parse()?),
        );
        dp.apply(&plan.state)?;
        f(&mut Env { dp, plan, link_mac })
    })
}

const ROUTED: Ipv4Opts =
    Ipv4Opts { vlan: None, options: 0, ihl: None, total_len_extra: 0, frag: 0, ttl: Some(63) };

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
        with_macs(&frame, BACKEND_MAC, DIRECTOR_MAC)
    }

    fn to_client(&self, frame: Vec<u8>) -> Vec<u8> {
        with_macs(&frame, CLIENT_MAC, self.link_mac)
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
            &with_macs(&tcp6(client6(), backend6(), 40000, 8080, TCP_SYN, 63), BACKEND6_MAC, DIRECTOR_MAC),
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
        ensure!(
            env.plan.state.backends.values().all(|b| b.port == 8080u16.to_be() || b.port == 5353u16.to_be())
        );
        Ok(())
    })
}

/// ICMP errors about NAT flows, both ways, with their quotes translated: the backend's
/// "port unreachable" reaches the client about the packet the client sent (to the VIP),
/// and a client-side router's "fragmentation needed" / "packet too big" about a reply
/// reaches the backend about the packet the backend sent.
#[test]
fn icmp_errors_about_nat_flows_are_translated_with_their_quotes() -> Result<()> {
    const ROUTER: [u8; 4] = [198, 51, 100, 1];
    with_env(|env| {
        let d = ROUTED;
        let plain = Ipv4Opts::default();
        let udp = |src, dst, sport, dport, opts| testpkt::ipv4(src, dst, L4::udp(sport, dport), opts);
        // The flows exist first.
        test_run(&env.dp, &udp(CLIENT, VIP, 41000, 53, plain.clone()))?;
        test_run(&env.dp, &tcp4(CLIENT, VIP, 40000, 80, TCP_SYN, plain.clone()))?;
        test_run(&env.dp, &tcp6(client6(), vip6(), 40000, 80, TCP_SYN, 64))?;

        // The backend's port unreachable about the query it got (quoted whole: 28 bytes
        // hold the UDP checksum); the client's kernel matches it to its socket only if it
        // quotes what the client sent.
        let got = udp(CLIENT, BACKEND, 41000, 5353, d.clone());
        let sent = udp(CLIENT, VIP, 41000, 53, d.clone());
        let unreachable = |from, quoted: &[u8], opts: Ipv4Opts| {
            let mut f = testpkt::icmp4_error(from, CLIENT, 3, 3, 0, &quoted[14..], 28);
            if opts.ttl.is_some() {
                f[14 + 8] = 63;
                testpkt::fix_ipv4_checksum(&mut f, 14);
            }
            f
        };
        env.expect(
            "port unreachable from the backend",
            &unreachable(BACKEND, &got, plain.clone()),
            XDP_REDIRECT,
            &env.to_client(unreachable(VIP, &sent, d.clone())),
        )?;

        // A router on the clients' side: the reply was too big for its next link. The
        // quote (576 bytes of a 1400-byte segment) holds the TCP checksum, patched too.
        let reply = |src, sport| tcp4_sized(src, CLIENT, sport, 40000, TCP_ACK, 1400);
        let frag_needed = |to, quoted: &[u8], ttl: u8| {
            let mut f = testpkt::icmp4_error(ROUTER, to, 3, 4, 1400, &quoted[14..], 576);
            f[14 + 8] = ttl;
            testpkt::fix_ipv4_checksum(&mut f, 14);
            f
        };
        env.expect(
            "fragmentation needed about a reply",
            &frag_needed(VIP, &reply(VIP, 80), 64),
            XDP_TX,
            &env.to_backend(frag_needed(BACKEND, &reply(BACKEND, 8080), 63)),
        )?;
        // The same with a quote cut before the TCP checksum (8 bytes after the header).
        let short = |to, quoted: &[u8], ttl: u8| {
            let mut f = testpkt::icmp4_error(ROUTER, to, 3, 4, 1400, &quoted[14..], 28);
            f[14 + 8] = ttl;
            testpkt::fix_ipv4_checksum(&mut f, 14);
            f
        };
        let (_, out) = test_run(&env.dp, &short(VIP, &reply(VIP, 80), 64))?;
        let mut want = env.to_backend(short(BACKEND, &reply(BACKEND, 8080), 63));
        ensure!(out.len() == want.len(), "short quote: length");
        // The quote ends before the checksum, so only the ICMP checksum can tell: the
        // frame must be what a fresh computation over the translated quote gives.
        let icmp = 14 + 20;
        want[icmp + 2..icmp + 4].copy_from_slice(&[0, 0]);
        let c = lb_ebpf::csum::checksum(&want[icmp..], 0);
        want[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
        ensure!(out == want, "short quote: got\n{out:02x?}\nwant\n{want:02x?}");

        // IPv6: packet too big about a reply, and the backend's port unreachable.
        let router6 = v6(0x98, 1);
        let reply6 = |src, sport| {
            let opts = Ipv6Opts { hop_limit: Some(63), ..Ipv6Opts::default() };
            testpkt::ipv6(
                src,
                client6(),
                L4::Tcp { sport, dport: 40000, flags: TCP_ACK, payload: 1400 },
                opts,
            )
        };
        let ptb = |to, quoted: &[u8], hop: u8| {
            let mut f = testpkt::icmp6_error(router6, to, 2, 0, 1280, &quoted[14..], 1232);
            f[14 + 7] = hop;
            f
        };
        env.expect(
            "IPv6 packet too big about a reply",
            &ptb(vip6(), &reply6(vip6(), 80), 64),
            XDP_TX,
            &with_macs(&ptb(backend6(), &reply6(backend6(), 8080), 63), BACKEND6_MAC, DIRECTOR_MAC),
        )?;
        let got6 = tcp6(client6(), backend6(), 40000, 8080, TCP_SYN, 63);
        let sent6 = tcp6(client6(), vip6(), 40000, 80, TCP_SYN, 63);
        let unreachable6 = |from, quoted: &[u8], hop: u8| {
            let mut f = testpkt::icmp6_error(from, client6(), 1, 4, 0, &quoted[14..], 1232);
            f[14 + 7] = hop;
            f
        };
        env.expect(
            "IPv6 port unreachable from the backend",
            &unreachable6(backend6(), &got6, 64),
            XDP_REDIRECT,
            &env.to_client(unreachable6(vip6(), &sent6, 63)),
        )?;
        let counters = env.dp.global_counters()?;
        for (counter, n) in [
            (stat::ICMP_DEST_UNREACH, 1),
            (stat::ICMP_FRAG_NEEDED, 2),
            (stat::ICMP6_PACKET_TOO_BIG, 1),
            (stat::ICMP6_DEST_UNREACH, 1),
        ] {
            ensure!(counters[counter as usize] == n, "counter {counter}: {}", counters[counter as usize]);
        }
        Ok(())
    })
}

fn tcp4_sized(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8, payload: usize) -> Vec<u8> {
    testpkt::ipv4(
        src,
        dst,
        L4::Tcp { sport, dport, flags, payload },
        Ipv4Opts { ttl: Some(63), ..Ipv4Opts::default() },
    )
}

/// Full NAT: the backend sees the flow come from the pool, whatever its routes; its
/// reply, addressed to the pool, goes back to the client from the VIP.
#[test]
fn full_nat_rewrites_both_addresses_and_its_replies_come_back_to_the_pool() -> Result<()> {
    with_env(|env| {
        let syn = tcp4(CLIENT, FULL_VIP, 40000, 80, TCP_SYN, Ipv4Opts::default());
        let (action, out) = test_run(&env.dp, &syn)?;
        ensure!(action == XDP_TX, "SYN: action {action}");
        let port = u16::from_be_bytes([out[14 + 20], out[14 + 21]]);
        ensure!(port >= lb_common::FULLNAT_PORT_MIN, "source port {port}");
        let want = env.to_backend(tcp4(POOL, BACKEND, port, 8080, TCP_SYN, ROUTED));
        ensure!(out == want, "SYN: got\n{out:02x?}\nwant\n{want:02x?}");
        // A retransmitted SYN keeps its source, or the server would see two connections.
        ensure!(test_run(&env.dp, &syn)?.1 == want, "the retransmitted SYN got another source");
        env.expect(
            "SYN-ACK to the pool, back to the client",
            &tcp4(BACKEND, POOL, 8080, port, TCP_SYN | TCP_ACK, Ipv4Opts::default()),
            XDP_REDIRECT,
            &env.to_client(tcp4(FULL_VIP, CLIENT, 80, 40000, TCP_SYN | TCP_ACK, ROUTED)),
        )?;
        env.expect(
            "the client's ACK",
            &tcp4(CLIENT, FULL_VIP, 40000, 80, TCP_ACK, Ipv4Opts::default()),
            XDP_TX,
            &env.to_backend(tcp4(POOL, BACKEND, port, 8080, TCP_ACK, ROUTED)),
        )?;
        ensure!(env.state(40000)? == FLOW_ESTABLISHED);
        // A reply to another pool port is no flow's.
        let stray = tcp4(BACKEND, POOL, 8080, port ^ 1, TCP_ACK, Ipv4Opts::default());
        env.expect("a reply to a port no flow holds", &stray, XDP_PASS, &stray)?;

        // ICMP errors, both ways. A router on the backends' side: "fragmentation needed"
        // to the pool about the director's packet reaches the client, from the VIP, about
        // the client's own packet.
        const ROUTER: [u8; 4] = [10, 2, 0, 1];
        let frag_needed = |from, to, quoted: Vec<u8>, ttl: u8| {
            let mut f = testpkt::icmp4_error(from, to, 3, 4, 1400, &quoted[14..], 576);
            f[14 + 8] = ttl;
            testpkt::fix_ipv4_checksum(&mut f, 14);
            f
        };
        let sized = |src, dst, sport, dport| tcp4_sized(src, dst, sport, dport, TCP_ACK, 1400);
        env.expect(
            "fragmentation needed on the backends' side",
            &frag_needed(ROUTER, POOL, sized(POOL, BACKEND, port, 8080), 64),
            XDP_REDIRECT,
            &env.to_client(frag_needed(FULL_VIP, CLIENT, sized(CLIENT, FULL_VIP, 40000, 80), 63)),
        )?;
        // A router on the clients' side: about the reply, to the backend, from the pool.
        env.expect(
            "fragmentation needed on the clients' side",
            &frag_needed([198, 51, 100, 1], FULL_VIP, sized(FULL_VIP, CLIENT, 80, 40000), 64),
            XDP_TX,
            &env.to_backend(frag_needed(POOL, BACKEND, sized(BACKEND, POOL, 8080, port), 63)),
        )?;
        Ok(())
    })
}

/// Full NAT over IPv6: the source becomes the IPv6 pool's, and the reply comes back.
#[test]
fn full_nat_over_ipv6() -> Result<()> {
    with_env(|env| {
        let (action, out) = test_run(&env.dp, &tcp6(client6(), v6(0, 0x11), 40000, 80, TCP_SYN, 64))?;
        ensure!(action == XDP_TX, "SYN: action {action}");
        let port = u16::from_be_bytes([out[14 + 40], out[14 + 41]]);
        let want = with_macs(&tcp6(pool6(), backend6(), port, 8080, TCP_SYN, 63), BACKEND6_MAC, DIRECTOR_MAC);
        ensure!(out == want, "SYN: got\n{out:02x?}\nwant\n{want:02x?}");
        env.expect(
            "SYN-ACK to the IPv6 pool",
            &tcp6(backend6(), pool6(), 8080, port, TCP_SYN | TCP_ACK, 64),
            XDP_REDIRECT,
            &env.to_client(tcp6(v6(0, 0x11), client6(), 80, 40000, TCP_SYN | TCP_ACK, 63)),
        )
    })
}

/// A fragmented datagram to a NAT service: the first fragment's UDP checksum (which
/// covers the whole datagram) is patched for the new address and port, the later
/// fragments' headers get the new address; the backend reassembles the datagram it would
/// have got unfragmented.
#[test]
fn fragments_of_a_datagram_to_a_nat_service_are_translated() -> Result<()> {
    with_env(|env| {
        let datagram = |dst, dport, opts| {
            testpkt::ipv4(CLIENT, dst, L4::Udp { sport: 41500, dport, payload: 3000 }, opts)
        };
        let sent = testpkt::fragments_v4(&datagram(VIP, 53, Ipv4Opts::default()), 1480, 0x4242);
        let want = testpkt::fragments_v4(&datagram(BACKEND, 5353, ROUTED), 1480, 0x4242);
        ensure!(sent.len() == 3 && want.len() == 3);
        for (i, (frag, want)) in sent.iter().zip(want).enumerate() {
            env.expect(&format!("fragment {i}"), frag, XDP_TX, &env.to_backend(want))?;
        }
        Ok(())
    })
}

/// 10,000 flows at once from one client address to one backend port: each gets a pool
/// port no other flow to that backend holds (its replies could not be told apart), and
/// each one's reply finds its way back to it.
#[test]
fn full_nat_gives_10000_concurrent_flows_from_one_client_distinct_ports() -> Result<()> {
    with_env(|env| {
        let mut ports = Vec::with_capacity(10_000);
        let mut seen = std::collections::HashSet::new();
        for sport in 1..=10_000u16 {
            let syn = tcp4(CLIENT, FULL_VIP, sport, 80, TCP_SYN, Ipv4Opts::default());
            let (action, out) = test_run(&env.dp, &syn)?;
            ensure!(action == XDP_TX, "flow {sport}: action {action}");
            ensure!(out[14 + 12..14 + 16] == POOL, "flow {sport}: source {:?}", &out[14 + 12..14 + 16]);
            let port = u16::from_be_bytes([out[14 + 20], out[14 + 21]]);
            ensure!(seen.insert(port), "flow {sport} got port {port}, already another flow's");
            ports.push((sport, port));
        }
        ensure!(env.dp.global_counters()?[stat::DROP_NAT_NO_PORT as usize] == 0);
        for (sport, port) in ports.into_iter().step_by(97) {
            let reply = tcp4(BACKEND, POOL, 8080, port, TCP_ACK, Ipv4Opts::default());
            env.expect(
                "a reply of one of the 10,000",
                &reply,
                XDP_REDIRECT,
                &env.to_client(tcp4(FULL_VIP, CLIENT, 80, sport, TCP_ACK, ROUTED)),
            )?;
        }
        Ok(())
    })
}

// ---- End to end: masqueraded real servers in namespaces ----------------------------

use std::net::SocketAddr;
use std::time::Duration;

use lb_tests::lab::{DrLab, LabConfig, NAT_SERVER_PORT, VIP_PORT};
use lb_tests::tcp::{Conversations, EchoServer, NameServer, fetch_from};
use lb_tests::topology::{Layout, VIP as LAB_VIP};

const LAB_SERVERS: usize = 3;
const ECHO_PORT: u16 = 7000;
/// The echo service's VIP port, mapped to `ECHO_PORT` on the servers.
const ECHO_VIP_PORT: u16 = 7100;

fn nat_layout() -> Layout {
    Layout { masqueraded: true, ..Layout::default() }
}

fn server_addrs() -> Vec<IpAddr> {
    (0..LAB_SERVERS).map(|i| IpAddr::from([10, 0, 2, 11 + i as u8])).collect()
}

/// `web` (VIP:80 -> :8080) and `echo` (VIP:7100 -> :7000), both masquerading, checked
/// by TCP on the backends' own ports; `weights` per server; `disabled` takes one out.
fn nat_services(weights: [u32; LAB_SERVERS], disabled: Option<usize>) -> String {
    let check = "    check: { type: tcp, interval: 300ms, timeout: 250ms, rise: 1, fall: 2 }\n";
    let mut y = String::from("services:\n");
    for (name, vip_port, port) in [("web", VIP_PORT, NAT_SERVER_PORT), ("echo", ECHO_VIP_PORT, ECHO_PORT)] {
        y.push_str(&format!(
            "  - name: {name}\n    match: {{ vip: {LAB_VIP}, port: {vip_port}, proto: tcp }}\n    scheduler: sh\n    forward: nat\n{check}    backends:\n"
        ));
        for (i, a) in server_addrs().iter().enumerate() {
            let state = if disabled == Some(i) { ", state: disabled" } else { "" };
            y.push_str(&format!("      - {{ address: {a}, port: {port}, weight: {}{state} }}\n", weights[i]));
        }
    }
    y
}

/// `lb_backend_{kind}_connections` summed over the `echo` service's backends.
fn echo_connections(m: &lb_tests::daemon::Metrics, kind: &str) -> f64 {
    let prefix = format!("lb_backend_{kind}_connections{{");
    m.0.lines()
        .filter(|l| l.starts_with(&prefix) && l.contains("service=\"echo\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Sources grouped by the one server that answered them; fails if a source saw two.
fn by_source(answers: &[(IpAddr, String)]) -> Result<HashMap<IpAddr, String>> {
    let mut seen: HashMap<IpAddr, String> = HashMap::new();
    for (src, server) in answers {
        ensure!(server.starts_with("server"), "{src} got {server:?}");
        if let Some(first) = seen.insert(*src, server.clone()) {
            ensure!(first == *server, "{src} was answered by {first} and by {server}");
        }
    }
    Ok(seen)
}

/// Once `backend` of `web` is up: 300 connections from the lab's 30 sources, each source
/// answered by one server, every server used, and `status` showing `backend` forwarded
/// by `method`.
fn serves_300_stickily(lab: &DrLab, backend: &str, method: &str) -> Result<()> {
    lab.wait_state("web", backend, "active")?;
    let answers = lab.connect_all(10)?;
    ensure!(answers.len() == 300);
    let sticky = by_source(&answers)?;
    let used: std::collections::HashSet<&String> = sticky.values().collect();
    ensure!(used.len() == LAB_SERVERS, "30 sources used only {used:?}");
    let status = lab.daemon.status()?;
    ensure!(status.contains(backend) && status.contains(method), "{status}");
    Ok(())
}

#[test]
fn masqueraded_servers_answer_300_connections_from_30_sources_through_a_port_mapping() -> Result<()> {
    let lab =
        DrLab::start_on(nat_layout(), LAB_SERVERS, 30, LabConfig::Services(nat_services([1; 3], None)))?;
    // The real servers hold no VIP: only the director's translation can make this work.
    for s in &lab.topo.servers {
        let addrs = s.ip(&["-4", "addr", "show"])?;
        ensure!(!addrs.contains(&LAB_VIP.to_string()), "a server holds the VIP:\n{addrs}");
    }
    serves_300_stickily(&lab, "10.0.2.11:8080", "Masq")?;
    let m = lab.metrics()?;
    let sent = m.value("lb_xdp_nat_replies_total{outcome=\"sent\"}")?;
    ensure!(sent >= 300.0 * 3.0, "replies translated: {sent}");

    // Without a neighbour entry for the client the kernel forwards the translated reply
    // (and resolves the client); the connection does not notice.
    lab.topo.director.ip(&["neigh", "flush", "dev", "ext0"])?;
    let answers = lab.connect_all(1)?;
    by_source(&answers)?;
    let to_stack = lab.metrics()?.value("lb_xdp_nat_replies_total{outcome=\"to_stack\"}")?;
    ensure!(to_stack >= 1.0, "no reply went through the kernel after the flush");
    Ok(())
}

#[test]
fn nat_connections_survive_50_reloads_and_kill_9_and_a_backend_going_down_moves_only_its_own() -> Result<()> {
    let mut lab =
        DrLab::start_on(nat_layout(), LAB_SERVERS, 10, LabConfig::Services(nat_services([1; 3], None)))?;
    let echo = EchoServer::on_each(&lab.topo.servers, ECHO_PORT)?;
    lab.wait_state("echo", "10.0.2.13:7000", "active")?;
    // Which server each source reaches (the web service hashes sources the same way).
    let sticky = by_source(&lab.connect_all(1)?)?;
    let (on_first, elsewhere): (Vec<IpAddr>, Vec<IpAddr>) =
        lab.topo.client_addrs.iter().map(|a| IpAddr::V4(*a)).partition(|a| sticky[a] == "server1");
    ensure!(!on_first.is_empty() && !elsewhere.is_empty(), "{sticky:?}");
    let dst: SocketAddr = (LAB_VIP, ECHO_VIP_PORT).into();
    let start = |sources: Vec<IpAddr>, count| {
        Conversations::start(&lab.topo.client, sources, dst, count, Duration::from_millis(100), 10_000)
    };
    let staying = start(elsewhere, 40)?;
    let moving = start(on_first, 10)?;
    ensure!(staying.wait_rounds(3, Duration::from_secs(10)), "no exchange: {:?}", staying.stop());

    for i in 0..50u32 {
        let weights = [1 + i % 5, 1 + (i + 2) % 7, 1 + (i + 4) % 3];
        lab.write_services(&nat_services(weights, None))?;
        ensure!(lab.reload()?, "reload {i} failed:\n{}", lab.daemon.log_text());
        ensure!(!staying.finished() && !moving.finished(), "connections broke at reload {i}");
    }
    ensure!(staying.wait_rounds(2, Duration::from_secs(10)), "after the reloads: {:?}", staying.stop());

    // Both directions' maps are pinned: with no daemon at all the replies still go back.
    lab.daemon.kill9()?;
    ensure!(staying.wait_rounds(5, Duration::from_secs(10)), "stopped with the daemon: {:?}", staying.stop());
    lab.write_services(&nat_services([1; 3], None))?;
    lab.daemon.restart(&lab.topo.director)?;
    ensure!(staying.wait_rounds(5, Duration::from_secs(10)), "broke over the restart: {:?}", staying.stop());
    ensure!(moving.wait_rounds(2, Duration::from_secs(10)), "broke over the restart: {:?}", moving.stop());
    // The director saw both halves of every handshake: the 50 are ActiveConn, exactly.
    let active = echo_connections(&lab.fresh_metrics()?, "active");
    ensure!(active == 50.0, "ActiveConn of echo: {active}");

    // server1 goes: its own connections move (and break, their server is gone), the others
    // go on.
    lab.write_services(&nat_services([1; 3], Some(0)))?;
    ensure!(lab.reload()?);
    ensure!(staying.wait_rounds(5, Duration::from_secs(10)), "others broke: {:?}", staying.stop());
    let moved = moving.stop();
    ensure!(moved.is_err(), "server1's connections went on without it: {moved:?}");
    let report = staying.stop()?;
    ensure!(report.exchanges == report.rounds * 40, "{report:?}");
    // Closed from both sides (the clients' FIN, the echo servers' FIN): none is active any
    // more, each counted as closed (inactive) for IPVS's 10 s.
    let metrics = lab.fresh_metrics()?;
    let (active, inactive) = (echo_connections(&metrics, "active"), echo_connections(&metrics, "inactive"));
    ensure!(active == 0.0 && inactive >= 40.0, "after closing: ActiveConn {active}, InActConn {inactive}");
    for e in echo {
        e.stop()?;
    }
    // New connections from server1's sources land elsewhere; the others stay put.
    let after = by_source(&lab.connect_all(1)?)?;
    for (src, server) in &after {
        if sticky[src] == "server1" {
            ensure!(server != "server1", "{src} still reached server1");
        } else {
            ensure!(*server == sticky[src], "{src} moved from {} to {server}", sticky[src]);
        }
    }
    Ok(())
}

/// The classic LVS scenario: `ipvsadm -A -f 1 -s sh` with `-m` real servers, the mark
/// covering two ports of the VIP (http and https, say): a client sticks to one server on
/// both, ports unchanged.
#[test]
fn an_fwmark_service_over_two_ports_masquerades_with_source_stickiness() -> Result<()> {
    let (http, https) = (8081u16, 8443u16);
    let mut y =
        format!("marks:\n  - {{ mark: 1, dst: {LAB_VIP}/32, proto: tcp, ports: [{http}, {https}] }}\n");
    y.push_str("services:\n  - name: fwm1\n    match: { fwmark: 1 }\n    scheduler: sh\n    forward: nat\n    backends:\n");
    for a in server_addrs() {
        y.push_str(&format!("      - {{ address: {a} }}\n"));
    }
    let lab = DrLab::start_on(nat_layout(), LAB_SERVERS, 20, LabConfig::Services(y))?;
    let mut servers = Vec::new();
    for (i, ns) in lab.topo.servers.iter().enumerate() {
        for port in [http, https] {
            servers.push(NameServer::start(
                ns,
                SocketAddr::from(([0, 0, 0, 0], port)),
                &format!("server{}", i + 1),
            )?);
        }
    }
    let sources: Vec<IpAddr> = lab.topo.client_addrs.iter().map(|a| IpAddr::V4(*a)).collect();
    let answers = lab.topo.client.run(move || {
        let mut out = Vec::new();
        for src in sources {
            for port in [http, https, http] {
                out.push((src, fetch_from(src, (LAB_VIP, port).into())?));
            }
        }
        Ok(out)
    })?;
    let sticky = by_source(&answers)?;
    let used: std::collections::HashSet<&String> = sticky.values().collect();
    ensure!(used.len() >= 2, "20 sources used only {used:?}");
    ensure!(lab.daemon.status()?.contains("Masq"));
    for s in servers {
        s.stop()?;
    }
    Ok(())
}

/// Full NAT: real servers on another subnet behind a router that has no route to the
/// clients at all (nor do they): only the director's pool address is reachable from
/// them, so every answer must come back through it.
#[test]
fn full_nat_servers_without_a_route_to_the_clients_answer_300_connections() -> Result<()> {
    let layout = Layout {
        masqueraded: true,
        server_path: lb_tests::topology::ServerPath::Routed,
        ..Layout::default()
    };
    let servers: Vec<IpAddr> = (0..LAB_SERVERS).map(|i| IpAddr::from([10, 0, 4, 11 + i as u8])).collect();
    let mut y = format!(
        "services:\n  - name: web\n    match: {{ vip: {LAB_VIP}, port: {VIP_PORT}, proto: tcp }}\n    scheduler: sh\n    forward: fullnat\n    check: {{ type: tcp, interval: 300ms, timeout: 250ms }}\n    backends:\n"
    );
    for s in &servers {
        y.push_str(&format!("      - {{ address: {s}, port: {NAT_SERVER_PORT} }}\n"));
    }
    let lab = DrLab::start_on(layout, LAB_SERVERS, 30, LabConfig::Services(y))?;
    // The servers' side knows the director's LAN, where the pool is, and nothing else.
    lab.topo.lan.ip(&["route", "del", "default"])?;
    let routes = lab.topo.lan.ip(&["route", "show"])?;
    ensure!(!routes.contains("default") && !routes.contains("10.0.1."), "{routes}");
    serves_300_stickily(&lab, "10.0.4.11:8080", "FullNat")
}
