//! Packet fixtures through BPF_PROG_TEST_RUN: input frame -> expected action and exact
//! output bytes, one row per case (the way Katran's `lib/testing/fixtures` are laid out),
//! then scenarios that need several packets or a config change.
//!
//! Each test runs in its own network namespace (for its loopback, which is the ingress
//! device of BPF_PROG_TEST_RUN, and a dummy device to redirect to). Needs root.

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::{Result, ensure};
use lb_common::{FLOW_CLOSED, FLOW_ESTABLISHED, FLOW_FIN, FLOW_SYN_SENT, stat};
use lb_daemon::dataplane::{Dataplane, LoadOptions};
use lb_daemon::model::{
    BackendSpec, BackendState, FallbackAction, MarkRuleSpec, Neighbour, Protocol, Scheduler, ServiceMatch,
    ServiceSpec,
};
use lb_daemon::plan::{Plan, Planner};
use lb_ebpf::parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use lb_ebpf::testpkt::{self, Ipv4Opts, Ipv6Opts, L4};
use lb_tests::NetNs;
use lb_tests::fixture::{
    XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, direct_routed, predicted_backend, test_run, test_run_on,
};

const DIRECTOR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const VIP: [u8; 4] = [192, 0, 2, 10];
const VIP6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01];
const MARKED_NET: [u8; 4] = [198, 51, 100, 5];
const MARKED_NET6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x05];
const DUMMY: &str = "lbfx0";
/// A second MAC the director accepts on its receiving interface (a VRRP virtual MAC).
const VRRP_MAC: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x0a];
/// How many new flows per second a CPU records in these fixtures (the flood guard).
const FLOOD_GUARD: u32 = 5000;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address literal")
}

fn web() -> ServiceMatch {
    ServiceMatch::Vip { addr: ip("192.0.2.10"), port: 80, proto: Protocol::Tcp }
}
fn dns() -> ServiceMatch {
    ServiceMatch::Vip { addr: ip("192.0.2.10"), port: 53, proto: Protocol::Udp }
}
fn web6() -> ServiceMatch {
    ServiceMatch::Vip { addr: ip("2001:db8::10"), port: 80, proto: Protocol::Tcp }
}
const TAGGED_VIP: [u8; 4] = [192, 0, 2, 40];
/// A service whose one backend is reached through a VLAN device (tag 200).
fn tagged() -> ServiceMatch {
    ServiceMatch::Vip { addr: ip("192.0.2.40"), port: 80, proto: Protocol::Tcp }
}
fn empty() -> ServiceMatch {
    ServiceMatch::Vip { addr: ip("192.0.2.20"), port: 80, proto: Protocol::Tcp }
}

fn service(
    name: &str,
    matcher: ServiceMatch,
    scheduler: Scheduler,
    backends: &[(&str, BackendState)],
) -> ServiceSpec {
    let backends =
        backends.iter().map(|(a, s)| BackendSpec { state: *s, ..BackendSpec::active(ip(a), 100) }).collect();
    // The address and port stand in until `matcher` replaces them.
    ServiceSpec { matcher, scheduler, ..ServiceSpec::tcp(name, ip("0.0.0.0"), 0, 4093, backends) }
}

use BackendState::{Active, Disabled, Drain};

fn services() -> Vec<ServiceSpec> {
    let three = [("10.1.0.11", Active), ("10.1.0.12", Active), ("10.1.0.13", Active)];
    vec![
        service("web", web(), Scheduler::Sh, &three),
        service("dns", dns(), Scheduler::Sh, &three[..2]),
        service("web6", web6(), Scheduler::Mh, &[("2001:db8:1::11", Active), ("2001:db8:1::12", Active)]),
        service("marked7", ServiceMatch::Mark(7), Scheduler::Sh, &three),
        service("marked8", ServiceMatch::Mark(8), Scheduler::Sh, &[("10.2.0.21", Active)]),
        service("empty", empty(), Scheduler::Sh, &[("10.1.0.11", Disabled)]),
        service("tagged", tagged(), Scheduler::Sh, &[("10.1.0.16", Active)]),
    ]
}

fn mark_rules() -> Vec<MarkRuleSpec> {
    vec![
        MarkRuleSpec {
            mark: 7,
            dst: "198.51.100.0/24".parse().expect("prefix"),
            proto: Some(Protocol::Tcp),
            ports: (8000, 8099),
            src: None,
        },
        MarkRuleSpec {
            mark: 7,
            dst: "2001:db8:77::/48".parse().expect("prefix"),
            proto: Some(Protocol::Tcp),
            ports: (443, 443),
            src: None,
        },
        MarkRuleSpec {
            mark: 8,
            dst: "198.51.100.0/24".parse().expect("prefix"),
            proto: None,
            ports: (9000, 9000),
            src: Some("203.0.113.0/24".parse().expect("prefix")),
        },
    ]
}

/// Backends on loopback (ifindex 1, the BPF_PROG_TEST_RUN ingress: XDP_TX) except
/// 10.2.0.21, reached through a veth in the namespace (XDP_REDIRECT).
fn neighbours(dummy_ifindex: u32) -> HashMap<IpAddr, Neighbour> {
    let on = |last: u8, ifindex| Neighbour {
        mac: [0x02, 0, 0, 0, 0x01, last],
        ifindex,
        if_mac: DIRECTOR_MAC,
        vlan: 0,
        mtu: 0,
    };
    HashMap::from([
        (ip("10.1.0.11"), on(0x11, 1)),
        (ip("10.1.0.12"), on(0x12, 1)),
        (ip("10.1.0.13"), on(0x13, 1)),
        (ip("10.1.0.14"), on(0x14, 1)),
        (ip("10.1.0.15"), on(0x15, 1)),
        (ip("10.1.0.16"), Neighbour { vlan: 200, ..on(0x16, 1) }),
        (ip("2001:db8:1::11"), on(0x61, 1)),
        (ip("2001:db8:1::12"), on(0x62, 1)),
        (ip("10.2.0.21"), on(0x21, dummy_ifindex)),
    ])
}

struct Env {
    dp: Dataplane,
    planner: Planner,
    plan: Plan,
    neighbours: HashMap<IpAddr, Neighbour>,
}

/// What the daemon adds to a plan from the host and the director settings: the MACs the
/// receiving interface (loopback, BPF_PROG_TEST_RUN's ingress) accepts, and the flood guard.
fn with_director_settings(mut plan: Plan) -> Plan {
    plan.state.local_macs.insert(1, [testpkt::DIRECTOR_MAC, VRRP_MAC].into_iter().collect());
    plan.state.flood_guard_flows_per_sec = FLOOD_GUARD;
    plan
}

impl Env {
    fn replan(&mut self, services: &[ServiceSpec]) -> Result<()> {
        self.plan = with_director_settings(self.planner.plan(services, &mark_rules(), &self.neighbours)?);
        self.dp.apply(&self.plan.state)?;
        Ok(())
    }

    fn backend_id(&self, service: &str, addr: &str) -> u32 {
        self.plan.backend_ids[&(service.to_string(), ip(addr))]
    }

    /// The services with a fourth, heavy backend on `web` (10.1.0.14, already a known
    /// neighbour), which changes its ring; a SYN from 10.`net`.0.x to port 80 whose client
    /// that ring moves; and the backend the current ring gives it.
    fn heavy_backend_and_a_client_it_moves(
        &self,
        net: u8,
        sport: u16,
    ) -> Result<(Vec<ServiceSpec>, Vec<u8>, u32)> {
        let mut more = services();
        more[0].backends.push(BackendSpec {
            addr: ip("10.1.0.14"),
            weight: 300,
            state: Active,
            forward: lb_daemon::model::Forward::Dr,
            port: None,
        });
        let next = self.planner.clone().plan(&more, &mark_rules(), &self.neighbours)?;
        let (syn, before) = (0..=255u8)
            .map(|i| tcp4([10, net, 0, i], VIP, sport, 80, TCP_SYN))
            .find_map(|syn| {
                let now = predicted_backend(&self.plan.state, &web(), &syn)?;
                let later = predicted_backend(&next.state, &web(), &syn)?;
                (now != later).then_some((syn, now))
            })
            .ok_or_else(|| anyhow::anyhow!("no client moves on the new ring"))?;
        Ok((more, syn, before))
    }

    /// The frame as direct routing should emit it towards backend `id`.
    fn routed(&self, frame: &[u8], id: u32) -> Vec<u8> {
        let b = &self.plan.state.backends[&id];
        direct_routed(frame, b)
    }

    /// Sends `frame`; asserts it was forwarded (TX) unchanged but for the MACs, and
    /// returns the backend id it went to.
    fn forward(&self, frame: &[u8]) -> Result<u32> {
        let (action, out) = test_run(&self.dp, frame)?;
        ensure!(action == XDP_TX, "expected XDP_TX, got {action}");
        let id = self
            .plan
            .state
            .backends
            .iter()
            .find(|(_, b)| out[0..6] == b.dst_mac)
            .map(|(id, _)| *id)
            .ok_or_else(|| anyhow::anyhow!("unknown destination MAC {:02x?}", &out[0..6]))?;
        ensure!(out == self.routed(frame, id), "only the MACs and the VLAN tag may change");
        Ok(id)
    }
}

/// Runs `f` with a freshly loaded data path in a namespace of its own.
fn with_env(f: impl FnOnce(&mut Env) -> Result<()> + Send + 'static) -> Result<()> {
    with_env_pinned(None, f)
}

/// [`with_env`], with the maps pinned under `pin_dir`.
fn with_env_pinned(
    pin_dir: Option<std::path::PathBuf>,
    f: impl FnOnce(&mut Env) -> Result<()> + Send + 'static,
) -> Result<()> {
    let ns = NetNs::new("fx")?;
    ns.ip(&["link", "add", DUMMY, "type", "veth", "peer", "name", "lbfx1"])?;
    ns.ip(&["link", "set", DUMMY, "up"])?;
    ns.run(move || {
        let dummy = nix::net::if_::if_nametoindex(DUMMY)?;
        let dp = Dataplane::load(&LoadOptions { ring_slots: 18 * 4093, flow_entries: 65536, pin_dir })?;
        let neighbours = neighbours(dummy);
        let mut planner = Planner::default();
        let plan = with_director_settings(planner.plan(&services(), &mark_rules(), &neighbours)?);
        let mut env = Env { dp, planner, plan, neighbours };
        env.dp.apply(&env.plan.state)?;
        f(&mut env)
    })
}

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    testpkt::ipv4(src, dst, L4::tcp(sport, dport, flags), Ipv4Opts::default())
}

fn tcp4_with(src: [u8; 4], dst: [u8; 4], dport: u16, opts: Ipv4Opts) -> Vec<u8> {
    testpkt::ipv4(src, dst, L4::tcp(40000, dport, TCP_SYN), opts)
}

/// What a fixture row expects.
#[derive(Debug)]
enum Expect {
    /// XDP_PASS with the frame byte for byte unchanged.
    Pass,
    /// XDP_DROP, counted under this reason.
    Drop(u32),
    /// Forwarded to the backend the ring of this service predicts, by TX or REDIRECT.
    Forward(ServiceMatch, u32),
    /// A fragment forwarded by TX where the ring of this service puts its source, counted
    /// under this `stat::FRAG_*` outcome.
    Fragment(ServiceMatch, u32),
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    expect: Expect,
}

fn cases() -> Vec<Case> {
    let c = [10, 0, 0, 1];
    let truncated_tcp = {
        let mut f = tcp4(c, VIP, 40000, 80, TCP_SYN);
        f.truncate(f.len() - 8);
        testpkt::fix_ipv4_total_len(&mut f, 14);
        f
    };
    let truncated_tcp_other = {
        let mut f = tcp4(c, [192, 0, 2, 99], 40000, 80, TCP_SYN);
        f.truncate(f.len() - 8);
        testpkt::fix_ipv4_total_len(&mut f, 14);
        f
    };
    let bad_doff = {
        let mut f = tcp4(c, VIP, 40001, 80, TCP_SYN);
        f[14 + 20 + 12] = 4 << 4;
        f
    };
    let arp = {
        let mut f = tcp4(c, VIP, 1, 80, TCP_SYN);
        f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        f
    };
    let v6 = |opts: Ipv6Opts| testpkt::ipv6(CLIENT6, VIP6, L4::tcp(5000, 80, TCP_SYN), opts);
    let frag = |frag| Ipv4Opts { frag, ..Default::default() };
    let to_mac = |mac: [u8; 6]| {
        let mut f = tcp4([10, 0, 0, 7], VIP, 40007, 80, TCP_SYN);
        f[0..6].copy_from_slice(&mac);
        f
    };
    let bad_version = {
        let mut f = tcp4(c, VIP, 40008, 80, TCP_SYN);
        f[14] = 0x65;
        f
    };
    let bad_checksum = |dport| {
        let mut f = tcp4(c, VIP, 40009, dport, TCP_SYN);
        f[14 + 10] ^= 0x40;
        f
    };
    let bad_options = {
        let mut f = tcp4_with(c, VIP, 80, Ipv4Opts { options: 4, ..Default::default() });
        // A timestamp option claiming 12 bytes in a 4-byte options area.
        f[34..38].copy_from_slice(&[68, 12, 5, 0]);
        testpkt::fix_ipv4_checksum(&mut f, 14);
        f
    };
    let udp_too_long = {
        let mut f = testpkt::ipv4(c, VIP, L4::udp(5354, 53), Ipv4Opts::default());
        f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
        f
    };
    let rh0 = {
        let mut f = v6(Ipv6Opts { ext: vec![43], ..Default::default() });
        f[14 + 40 + 2] = 0;
        f[14 + 40 + 3] = 1;
        f
    };
    let from6 = |src: &str| {
        let src: std::net::Ipv6Addr = src.parse().expect("address literal");
        testpkt::ipv6(src.octets(), VIP6, L4::tcp(5000, 80, TCP_SYN), Ipv6Opts::default())
    };
    vec![
        Case {
            name: "IPv4 SYN to a VIP",
            frame: tcp4(c, VIP, 40000, 80, TCP_SYN),
            expect: Expect::Forward(web(), XDP_TX),
        },
        Case {
            name: "IPv4 ACK with no flow entry (director restarted)",
            frame: tcp4([10, 0, 0, 2], VIP, 40000, 80, TCP_ACK),
            expect: Expect::Forward(web(), XDP_TX),
        },
        Case {
            name: "IPv4 UDP to a VIP",
            frame: testpkt::ipv4(c, VIP, L4::udp(5353, 53), Ipv4Opts::default()),
            expect: Expect::Forward(dns(), XDP_TX),
        },
        Case {
            name: "IPv4 with 12 bytes of options",
            frame: tcp4_with([10, 0, 0, 3], VIP, 80, Ipv4Opts { options: 12, ..Default::default() }),
            expect: Expect::Forward(web(), XDP_TX),
        },
        Case {
            name: "802.1Q-tagged IPv4 SYN to an untagged backend loses its tag",
            frame: tcp4_with([10, 0, 0, 4], VIP, 80, Ipv4Opts { vlan: Some(100), ..Default::default() }),
            expect: Expect::Forward(web(), XDP_TX),
        },
        Case {
            name: "untagged SYN to a backend behind VLAN 200 gains tag 200",
            frame: tcp4(c, TAGGED_VIP, 40020, 80, TCP_SYN),
            expect: Expect::Forward(tagged(), XDP_TX),
        },
        Case {
            name: "VLAN 100 SYN with priority 5 to a VLAN-200 backend: retagged, priority kept",
            frame: tcp4_with(
                [10, 0, 0, 21],
                TAGGED_VIP,
                80,
                Ipv4Opts { vlan: Some(5 << 13 | 100), ..Default::default() },
            ),
            expect: Expect::Forward(tagged(), XDP_TX),
        },
        Case {
            name: "802.1ad-tagged SYN to a VLAN-200 backend leaves with an 802.1Q tag",
            frame: {
                let mut f = tcp4_with(
                    [10, 0, 0, 22],
                    TAGGED_VIP,
                    80,
                    Ipv4Opts { vlan: Some(300), ..Default::default() },
                );
                f[12..14].copy_from_slice(&0x88a8u16.to_be_bytes());
                f
            },
            expect: Expect::Forward(tagged(), XDP_TX),
        },
        Case {
            name: "IPv6 SYN to a VIP (mh)",
            frame: v6(Ipv6Opts::default()),
            expect: Expect::Forward(web6(), XDP_TX),
        },
        Case {
            name: "IPv6 with hop-by-hop and destination options",
            frame: v6(Ipv6Opts { ext: vec![0, 60], ..Default::default() }),
            expect: Expect::Forward(web6(), XDP_TX),
        },
        Case {
            name: "VLAN-tagged IPv6 to an untagged backend loses its tag",
            frame: v6(Ipv6Opts { vlan: Some(7), ..Default::default() }),
            expect: Expect::Forward(web6(), XDP_TX),
        },
        Case {
            name: "IPv6 fragment header to a VIP",
            frame: v6(Ipv6Opts { ext: vec![44], ..Default::default() }),
            expect: Expect::Drop(stat::DROP_FRAGMENT),
        },
        Case {
            name: "IPv6 chain of five extension headers",
            frame: v6(Ipv6Opts { ext: vec![60; 5], ..Default::default() }),
            expect: Expect::Drop(stat::DROP_IPV6_EXT_CHAIN),
        },
        Case {
            name: "VIP address, port without a service",
            frame: tcp4(c, VIP, 40000, 8080, TCP_SYN),
            expect: Expect::Pass,
        },
        Case { name: "not a VIP", frame: tcp4(c, [192, 0, 2, 99], 40000, 80, TCP_SYN), expect: Expect::Pass },
        Case {
            name: "ICMP to a VIP",
            frame: testpkt::ipv4(c, VIP, L4::Other { proto: 1, len: 16 }, Ipv4Opts::default()),
            expect: Expect::Pass,
        },
        Case { name: "ARP", frame: arp, expect: Expect::Pass },
        // (BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.)
        Case {
            name: "Ethernet header claiming IPv4, nothing after it",
            frame: tcp4(c, VIP, 40000, 80, TCP_SYN)[..14].to_vec(),
            expect: Expect::Pass,
        },
        Case {
            name: "IPv4 header cut short",
            frame: tcp4(c, VIP, 40000, 80, TCP_SYN)[..30].to_vec(),
            expect: Expect::Pass,
        },
        Case {
            name: "truncated TCP header to a VIP",
            frame: truncated_tcp,
            expect: Expect::Drop(stat::DROP_TRUNCATED),
        },
        Case { name: "truncated TCP header elsewhere", frame: truncated_tcp_other, expect: Expect::Pass },
        Case {
            name: "IHL below 5",
            frame: tcp4_with(c, VIP, 80, Ipv4Opts { ihl: Some(4), ..Default::default() }),
            expect: Expect::Drop(stat::DROP_BAD_IHL),
        },
        Case {
            name: "total length beyond the frame",
            frame: tcp4_with(c, VIP, 80, Ipv4Opts { total_len_extra: 100, ..Default::default() }),
            expect: Expect::Drop(stat::DROP_BAD_LENGTH),
        },
        Case {
            name: "later IPv4 fragment, its first not seen: by the ring of the VIP's only (sh) TCP service",
            frame: tcp4_with(c, VIP, 80, frag(0x00b9)),
            expect: Expect::Fragment(web(), stat::FRAG_BY_RING),
        },
        Case {
            name: "first IPv4 fragment (MF): scheduled as a whole packet, and recorded",
            frame: tcp4_with(c, VIP, 80, frag(0x2000)),
            expect: Expect::Fragment(web(), stat::FRAG_FIRST),
        },
        Case {
            name: "later IPv4 fragment of that datagram: follows its first",
            frame: tcp4_with(c, VIP, 80, frag(0x0100)),
            expect: Expect::Fragment(web(), stat::FRAG_FOLLOWED),
        },
        Case {
            name: "later IPv6 fragment to an mh VIP, its first not seen",
            frame: testpkt::fragments_v6(
                &testpkt::ipv6(
                    [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
                    [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10],
                    L4::Tcp { sport: 40000, dport: 80, flags: TCP_ACK, payload: 64 },
                    Ipv6Opts::default(),
                ),
                32,
                9,
            )[1]
            .clone(),
            expect: Expect::Drop(stat::DROP_FRAGMENT),
        },
        Case {
            name: "later IPv4 fragment to a mark rule's prefix, its first not seen",
            frame: tcp4_with(c, [198, 51, 100, 7], 8000, frag(0x0010)),
            expect: Expect::Drop(stat::DROP_FRAGMENT),
        },
        Case {
            name: "later IPv4 fragment of ICMP to the VIP: the kernel's",
            frame: testpkt::fragments_v4(
                &testpkt::ipv4(
                    c,
                    VIP,
                    L4::Icmp { v6: false, kind: 8, code: 0, rest: [0; 4], body: vec![0; 64] },
                    Ipv4Opts::default(),
                ),
                32,
                3,
            )[1]
            .clone(),
            expect: Expect::Pass,
        },
        Case {
            name: "fragment not for a VIP",
            frame: tcp4_with(c, [192, 0, 2, 99], 80, frag(0x00b9)),
            expect: Expect::Pass,
        },
        Case {
            name: "TCP data offset below 5",
            frame: bad_doff,
            expect: Expect::Drop(stat::DROP_BAD_L4_HEADER),
        },
        Case {
            name: "fwmark rule: prefix, protocol and port range match",
            frame: tcp4([10, 0, 0, 5], MARKED_NET, 40000, 8042, TCP_SYN),
            expect: Expect::Forward(ServiceMatch::Mark(7), XDP_TX),
        },
        Case {
            name: "fwmark rule: port above the range",
            frame: tcp4([10, 0, 0, 5], MARKED_NET, 40000, 8100, TCP_SYN),
            expect: Expect::Pass,
        },
        Case {
            name: "fwmark rule: wrong protocol",
            frame: testpkt::ipv4([10, 0, 0, 5], MARKED_NET, L4::udp(40000, 8042), Ipv4Opts::default()),
            expect: Expect::Pass,
        },
        Case {
            name: "fwmark rule: source prefix matches, redirected to another interface",
            frame: testpkt::ipv4([203, 0, 113, 9], MARKED_NET, L4::udp(40000, 9000), Ipv4Opts::default()),
            expect: Expect::Forward(ServiceMatch::Mark(8), XDP_REDIRECT),
        },
        Case {
            name: "fwmark rule: source prefix misses",
            frame: testpkt::ipv4([192, 0, 2, 99], MARKED_NET, L4::udp(40000, 9000), Ipv4Opts::default()),
            expect: Expect::Pass,
        },
        Case {
            name: "fwmark rule: destination outside every prefix",
            frame: tcp4([10, 0, 0, 5], [198, 51, 101, 5], 40000, 8042, TCP_SYN),
            expect: Expect::Pass,
        },
        Case {
            name: "IPv6 fwmark rule: prefix, protocol and port match",
            frame: testpkt::ipv6(CLIENT6, MARKED_NET6, L4::tcp(5001, 443, TCP_SYN), Ipv6Opts::default()),
            expect: Expect::Forward(ServiceMatch::Mark(7), XDP_TX),
        },
        Case {
            name: "IPv6 fwmark rule: port misses",
            frame: testpkt::ipv6(CLIENT6, MARKED_NET6, L4::tcp(5001, 444, TCP_SYN), Ipv6Opts::default()),
            expect: Expect::Pass,
        },
        Case { name: "broadcast destination MAC", frame: to_mac([0xff; 6]), expect: Expect::Pass },
        Case {
            name: "multicast destination MAC",
            frame: to_mac([0x01, 0, 0x5e, 0, 0, 0x12]),
            expect: Expect::Pass,
        },
        Case {
            name: "another host's unicast MAC (flooded by a switch)",
            frame: to_mac([0x02, 0, 0, 0, 0, 0x99]),
            expect: Expect::Pass,
        },
        Case {
            name: "a configured extra MAC (VRRP)",
            frame: to_mac(VRRP_MAC),
            expect: Expect::Forward(web(), XDP_TX),
        },
        Case {
            name: "malformed, to a VIP on another host's MAC",
            frame: {
                let mut f = tcp4_with(c, VIP, 80, Ipv4Opts { ihl: Some(4), ..Default::default() });
                f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
                f
            },
            expect: Expect::Pass,
        },
        Case {
            name: "IP version 6 under EtherType IPv4",
            frame: bad_version,
            expect: Expect::Drop(stat::DROP_BAD_VERSION),
        },
        Case {
            name: "IPv4 header checksum wrong",
            frame: bad_checksum(80),
            expect: Expect::Drop(stat::DROP_BAD_IP_CHECKSUM),
        },
        Case {
            name: "IPv4 header checksum wrong, VIP port without a service",
            frame: bad_checksum(8080),
            expect: Expect::Pass,
        },
        Case {
            name: "IPv4 option running past the header",
            frame: bad_options,
            expect: Expect::Drop(stat::DROP_BAD_IP_OPTIONS),
        },
        Case {
            name: "UDP length beyond the IP payload",
            frame: udp_too_long,
            expect: Expect::Drop(stat::DROP_BAD_UDP_LENGTH),
        },
        Case {
            name: "IPv6 routing header type 0, segments left",
            frame: rh0,
            expect: Expect::Drop(stat::DROP_IPV6_RH0),
        },
        Case {
            name: "martian source 127.0.0.1",
            frame: tcp4([127, 0, 0, 1], VIP, 40010, 80, TCP_SYN),
            expect: Expect::Drop(stat::DROP_MARTIAN_SOURCE),
        },
        Case {
            name: "martian source 0.0.0.0",
            frame: tcp4([0, 0, 0, 0], VIP, 40010, 80, TCP_ACK),
            expect: Expect::Drop(stat::DROP_MARTIAN_SOURCE),
        },
        Case {
            name: "martian source: multicast",
            frame: tcp4([224, 0, 0, 9], VIP, 40010, 80, TCP_SYN),
            expect: Expect::Drop(stat::DROP_MARTIAN_SOURCE),
        },
        Case {
            name: "martian source: limited broadcast",
            frame: testpkt::ipv4([255; 4], VIP, L4::udp(68, 53), Ipv4Opts::default()),
            expect: Expect::Drop(stat::DROP_MARTIAN_SOURCE),
        },
        Case {
            name: "martian source: the VIP itself",
            frame: tcp4(VIP, VIP, 40010, 80, TCP_SYN),
            expect: Expect::Drop(stat::DROP_MARTIAN_SOURCE),
        },
        Case {
            name: "martian source ::1",
            frame: from6("::1"),
            expect: Expect::Drop(stat::DROP_MARTIAN_SOURCE),
        },
        Case {
            name: "martian source ff02::1",
            frame: from6("ff02::1"),
            expect: Expect::Drop(stat::DROP_MARTIAN_SOURCE),
        },
        Case {
            name: "martian source, VIP port without a service",
            frame: tcp4([127, 0, 0, 1], VIP, 40010, 8080, TCP_SYN),
            expect: Expect::Pass,
        },
        Case {
            name: "truncated TCP header, VIP port without a service (ports untrusted)",
            frame: {
                let mut f = tcp4(c, VIP, 40000, 8080, TCP_SYN);
                f.truncate(f.len() - 8);
                testpkt::fix_ipv4_total_len(&mut f, 14);
                f
            },
            expect: Expect::Drop(stat::DROP_TRUNCATED),
        },
        Case {
            name: "service whose only backend is disabled",
            frame: tcp4(c, [192, 0, 2, 20], 40000, 80, TCP_SYN),
            expect: Expect::Drop(stat::DROP_NO_BACKEND),
        },
    ]
}

#[test]
fn fixtures() -> Result<()> {
    with_env(|env| {
        let cases = cases();
        let mut expected_global = [0u64; stat::COUNT as usize];
        let mut failures = Vec::new();
        for case in &cases {
            let (action, out) = test_run(&env.dp, &case.frame)?;
            let (want_action, want_out) = match &case.expect {
                Expect::Pass => (XDP_PASS, Some(case.frame.clone())),
                Expect::Drop(reason) => {
                    expected_global[*reason as usize] += 1;
                    (XDP_DROP, None)
                }
                Expect::Forward(svc, action) => {
                    let id = predicted_backend(&env.plan.state, svc, &case.frame)
                        .ok_or_else(|| anyhow::anyhow!("{}: no prediction", case.name))?;
                    (*action, Some(env.routed(&case.frame, id)))
                }
                Expect::Fragment(svc, counter) => {
                    expected_global[*counter as usize] += 1;
                    let id = predicted_backend(&env.plan.state, svc, &case.frame)
                        .ok_or_else(|| anyhow::anyhow!("{}: no prediction", case.name))?;
                    (XDP_TX, Some(env.routed(&case.frame, id)))
                }
            };
            expected_global[match want_action {
                XDP_DROP => stat::ACTION_DROP,
                XDP_PASS => stat::ACTION_PASS,
                XDP_TX => stat::ACTION_TX,
                _ => stat::ACTION_REDIRECT,
            } as usize] += 1;
            if action != want_action || want_out.as_ref().is_some_and(|w| *w != out) {
                let what = if action == want_action { "output differs" } else { "wrong action" };
                failures.push(format!("{}: {what}: action {action} (want {want_action})", case.name));
            }
        }
        ensure!(failures.is_empty(), "failed fixtures:\n{}", failures.join("\n"));
        ensure!(cases.len() >= 50);
        let got = env.dp.global_counters()?;
        ensure!(got == expected_global, "global counters\n got {got:?}\nwant {expected_global:?}");
        Ok(())
    })
}

#[test]
fn same_source_same_backend_and_every_backend_gets_a_share() -> Result<()> {
    with_env(|env| {
        let mut used = std::collections::BTreeSet::new();
        for i in 0..200u16 {
            let src = [10, 7, (i >> 8) as u8, i as u8];
            let first = env.forward(&tcp4(src, VIP, 30000, 80, TCP_SYN))?;
            for port in [30001, 40000, 65000] {
                ensure!(env.forward(&tcp4(src, VIP, port, 80, TCP_SYN))? == first, "source {src:?} moved");
            }
            used.insert(first);
        }
        ensure!(used.len() == 3, "backends used: {used:?}");
        Ok(())
    })
}

#[test]
fn established_flow_keeps_its_backend_when_the_ring_changes() -> Result<()> {
    with_env(|env| {
        let (more, syn, before) = env.heavy_backend_and_a_client_it_moves(8, 41000)?;
        ensure!(env.forward(&syn)? == before);
        env.replan(&more)?;
        let ack = {
            let mut f = syn.clone();
            f[14 + 20 + 13] = TCP_ACK;
            f
        };
        ensure!(env.forward(&ack)? == before, "the established flow moved");
        // A new connection from the same client follows the new ring.
        let mut fresh = syn.clone();
        fresh[14 + 20..14 + 20 + 2].copy_from_slice(&41001u16.to_be_bytes());
        let want = predicted_backend(&env.plan.state, &web(), &fresh).expect("prediction");
        ensure!(env.forward(&fresh)? == want);
        ensure!(want != before, "the chosen client should have moved on the new ring");
        Ok(())
    })
}

fn flow_state(env: &Env, sport: u16) -> Result<Option<u16>> {
    Ok(env.dp.flows()?.into_iter().find(|(k, _)| u16::from_be(k.sport) == sport).map(|(_, f)| f.state))
}

#[test]
fn tcp_state_follows_syn_ack_fin_rst_and_a_new_syn_reschedules() -> Result<()> {
    with_env(|env| {
        let src = [10, 9, 0, 1];
        let seg = |flags| tcp4(src, VIP, 42000, 80, flags);
        let id = env.forward(&seg(TCP_SYN))?;
        ensure!(flow_state(env, 42000)? == Some(FLOW_SYN_SENT));
        env.forward(&seg(TCP_ACK))?;
        ensure!(flow_state(env, 42000)? == Some(FLOW_ESTABLISHED));
        env.forward(&seg(TCP_FIN | TCP_ACK))?;
        ensure!(flow_state(env, 42000)? == Some(FLOW_FIN));
        let svc = env.plan.service_ids["web"];
        let new_before = env.dp.service_counters(svc)?.new_flows;
        ensure!(env.forward(&seg(TCP_SYN))? == id, "sh sends the same client to the same backend");
        ensure!(flow_state(env, 42000)? == Some(FLOW_SYN_SENT), "a SYN after FIN opens a new flow");
        ensure!(env.dp.service_counters(svc)?.new_flows == new_before + 1);
        env.forward(&seg(TCP_RST))?;
        ensure!(flow_state(env, 42000)? == Some(FLOW_CLOSED));
        Ok(())
    })
}

#[test]
fn drained_backend_keeps_its_flows_and_disabled_one_loses_them() -> Result<()> {
    with_env(|env| {
        // One flow on each backend.
        let mut flows: HashMap<u32, Vec<u8>> = HashMap::new();
        for i in 0..=255u8 {
            let syn = tcp4([10, 10, 0, i], VIP, 43000, 80, TCP_SYN);
            let id = env.forward(&syn)?;
            flows.entry(id).or_insert(syn);
            if flows.len() == 3 {
                break;
            }
        }
        let drained = env.backend_id("web", "10.1.0.11");
        let disabled = env.backend_id("web", "10.1.0.12");
        let mut changed = services();
        changed[0].backends[0].state = Drain;
        changed[0].backends[1].state = Disabled;
        env.replan(&changed)?;
        ensure!(
            env.plan.state.services[&lb_daemon::model::service_key(&web())]
                .ring
                .iter()
                .all(|&b| b != drained)
        );
        let ack = |f: &Vec<u8>| {
            let mut f = f.clone();
            f[14 + 20 + 13] = TCP_ACK;
            f
        };
        ensure!(env.forward(&ack(&flows[&drained]))? == drained, "draining keeps established flows");
        let moved = env.forward(&ack(&flows[&disabled]))?;
        ensure!(moved != disabled && moved != drained, "a disabled backend's flow goes to a live one");
        Ok(())
    })
}

#[test]
fn fallback_takes_new_flows_while_no_backend_can_and_pass_hands_them_to_the_stack() -> Result<()> {
    with_env(|env| {
        let sorry = ServiceMatch::Vip { addr: ip("192.0.2.22"), port: 80, proto: Protocol::Tcp };
        let closed = ServiceMatch::Vip { addr: ip("192.0.2.21"), port: 80, proto: Protocol::Tcp };
        let with = |real: BackendState| {
            let mut all = services();
            // Servers of this service only: `forward` tells backends apart by MAC.
            let mut s = service("sorry", sorry, Scheduler::Sh, &[("10.1.0.15", real)]);
            s.fallback = Some(ip("10.1.0.14"));
            all.push(s);
            let mut c = service("closed", closed, Scheduler::Sh, &[("10.1.0.12", Disabled)]);
            c.fallback_action = FallbackAction::Pass;
            all.push(c);
            all
        };
        env.replan(&with(Disabled))?;
        let fallback = env.backend_id("sorry", "10.1.0.14");
        ensure!(env.plan.fallback_serving.contains("sorry"));
        let first = tcp4([10, 12, 0, 1], [192, 0, 2, 22], 45000, 80, TCP_SYN);
        ensure!(env.forward(&first)? == fallback, "the only way in is the fallback");

        let passed_before = env.dp.global_counters()?[stat::PASS_NO_BACKEND as usize];
        let knock = tcp4([10, 12, 0, 1], [192, 0, 2, 21], 45000, 80, TCP_SYN);
        let (action, out) = test_run(&env.dp, &knock)?;
        ensure!(action == XDP_PASS && out == knock, "no backend and `pass`: the stack gets it untouched");
        let passed = env.dp.global_counters()?[stat::PASS_NO_BACKEND as usize];
        ensure!(passed == passed_before + 1, "counted as a no_backend pass ({passed_before} -> {passed})");

        // A real server returns: it takes the new flows; the fallback's flow ends there.
        env.replan(&with(Active))?;
        ensure!(!env.plan.fallback_serving.contains("sorry"));
        let real = env.backend_id("sorry", "10.1.0.15");
        for i in 2..20u8 {
            let syn = tcp4([10, 12, 0, i], [192, 0, 2, 22], 45000, 80, TCP_SYN);
            ensure!(env.forward(&syn)? == real, "new flows go to the real server again");
        }
        let mut ack = first.clone();
        ack[14 + 20 + 13] = TCP_ACK;
        ensure!(env.forward(&ack)? == fallback, "a flow the fallback took finishes there");
        Ok(())
    })
}

#[test]
fn counters_equal_the_packets_sent() -> Result<()> {
    with_env(|env| {
        let svc = env.plan.service_ids["web"];
        let (mut packets, mut bytes, mut new_flows) = (0u64, 0u64, 0u64);
        let mut per_backend: HashMap<u32, u64> = HashMap::new();
        for i in 0..50u8 {
            for (n, flags) in [TCP_SYN, TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK].into_iter().enumerate() {
                let f = tcp4([10, 11, 0, i], VIP, 44000, 80, flags);
                let id = env.forward(&f)?;
                packets += 1;
                bytes += f.len() as u64;
                new_flows += (n == 0) as u64;
                *per_backend.entry(id).or_default() += 1;
            }
        }
        let c = env.dp.service_counters(svc)?;
        ensure!((c.packets, c.bytes, c.new_flows) == (packets, bytes, new_flows), "service counters {c:?}");
        for (&id, &n) in &per_backend {
            ensure!(env.dp.backend_counters(id)?.packets == n, "backend {id}");
        }
        ensure!(env.dp.global_counters()?[stat::ACTION_TX as usize] == packets);

        // A backend that counted leaves the service: the service's counters stay.
        let leaving = *per_backend.keys().next().ok_or_else(|| anyhow::anyhow!("no backend was sent to"))?;
        let leaving_addr = env.plan.state.backends[&leaving].addr;
        let mut fewer = services();
        fewer[0].backends.retain(|b| lb_daemon::model::addr_words(b.addr).1 != leaving_addr);
        ensure!(fewer[0].backends.len() == 2);
        env.replan(&fewer)?;
        let c = env.dp.service_counters(svc)?;
        ensure!(
            (c.packets, c.bytes, c.new_flows) == (packets, bytes, new_flows),
            "after a backend left {c:?}"
        );
        ensure!(env.dp.backend_counters(leaving)?.packets == 0, "a departed backend's id counts nothing");
        // The service goes and, in the same reload, another (on another port, over the
        // same servers) takes its id: it starts from zero, whatever the backends had
        // counted. (A service renamed on the same VIP and port is the same service.)
        let mut renamed = services();
        renamed[0].name = "web2".into();
        renamed[0].matcher = ServiceMatch::Vip { addr: ip("192.0.2.10"), port: 81, proto: Protocol::Tcp };
        env.replan(&renamed)?;
        let web2 = env.plan.service_ids["web2"];
        ensure!(web2 == svc, "the new service reuses the id ({web2} against {svc})");
        ensure!(
            env.dp.service_counters(web2)? == lb_common::Counters::default(),
            "a new service starts from zero"
        );
        for (&bid, _) in env.plan.state.backends.iter().filter(|(_, b)| b.service as u32 == web2) {
            ensure!(env.dp.backend_counters(bid)? == lb_common::Counters::default(), "backend {bid} of web2");
        }
        Ok(())
    })
}

#[test]
fn vip_filter_collisions_pass_and_removed_services_stop_matching() -> Result<()> {
    with_env(|env| {
        use lb_common::hash::vip_filter_slot;
        let slot = |a: [u8; 4]| vip_filter_slot(&[u32::from_ne_bytes(a), 0, 0, 0], false);
        // An address that is no VIP but folds to the VIP's filter slot.
        let twin = (0..=u16::MAX)
            .map(|i| [10, 99, (i >> 8) as u8, i as u8])
            .find(|a| slot(*a) == slot(VIP))
            .ok_or_else(|| anyhow::anyhow!("no colliding address in 10.99/16"))?;
        let to_twin = tcp4([10, 0, 0, 1], twin, 45000, 80, TCP_SYN);
        ensure!(test_run(&env.dp, &to_twin)? == (XDP_PASS, to_twin.clone()), "a filter collision must pass");

        // Remove every service on the VIP address: its traffic goes to the kernel untouched.
        let without: Vec<ServiceSpec> =
            services().into_iter().filter(|s| !["web", "dns"].contains(&s.name.as_str())).collect();
        env.replan(&without)?;
        let syn = tcp4([10, 0, 0, 1], VIP, 45001, 80, TCP_SYN);
        ensure!(test_run(&env.dp, &syn)? == (XDP_PASS, syn.clone()), "a removed service must stop matching");

        // And back.
        env.replan(&services())?;
        let id = env.forward(&syn)?;
        ensure!(Some(id) == predicted_backend(&env.plan.state, &web(), &syn));
        Ok(())
    })
}

#[test]
fn a_recreated_service_does_not_inherit_the_old_ones_flows() -> Result<()> {
    with_env(|env| {
        let syn = tcp4([10, 12, 0, 1], VIP, 46000, 80, TCP_SYN);
        let mut ack = syn.clone();
        ack[14 + 20 + 13] = TCP_ACK;
        env.forward(&syn)?;
        let new_flows = |env: &Env| -> Result<u64> {
            Ok(env.dp.service_counters(env.plan.service_ids["web"])?.new_flows)
        };
        let before = new_flows(env)?;
        env.forward(&ack)?;
        ensure!(new_flows(env)? == before, "an ACK of a live flow is no new flow");

        let without: Vec<ServiceSpec> = services().into_iter().filter(|s| s.name != "web").collect();
        env.replan(&without)?;
        env.replan(&services())?;
        let before = new_flows(env)?;
        env.forward(&ack)?;
        ensure!(new_flows(env)? == before + 1, "the old flow entry must not carry over to the new service");
        // Scheduled afresh without a handshake: mid-stream until it shows it is real.
        ensure!(flow_state(env, 46000)? == Some(lb_common::FLOW_MIDSTREAM));
        Ok(())
    })
}

#[test]
fn an_apply_that_runs_out_of_ring_space_changes_nothing() -> Result<()> {
    use lb_daemon::dataplane::{ApplyReport, DataplaneError};
    with_env(|env| {
        let syn = tcp4([10, 13, 0, 1], VIP, 47000, 80, TCP_SYN);
        let first = env.forward(&syn)?;
        // The environment has 18 x 4093 slots; six rings of 4093 take 6 x 4093 of them, and
        // a ring of 65537 does not fit in the rest.
        let with_ring = |size| {
            let mut s = services();
            s[0].ring_size = size;
            s
        };
        let too_big = env.planner.clone().plan(&with_ring(65537), &mark_rules(), &env.neighbours)?;
        let err = env.dp.apply(&too_big.state).expect_err("65537 slots do not fit");
        ensure!(matches!(err, DataplaneError::RingSpace { size: 65537, .. }), "{err}");

        let mut ack = syn.clone();
        ack[14 + 20 + 13] = TCP_ACK;
        ensure!(env.forward(&ack)? == first, "the established flow must not notice");
        let other = tcp4([10, 13, 0, 2], VIP, 47000, 80, TCP_SYN);
        ensure!(Some(env.forward(&other)?) == predicted_backend(&env.plan.state, &web(), &other), "old ring");
        let again = env.dp.apply(&env.plan.state)?;
        ensure!(again == ApplyReport::default(), "the failed apply left its bookkeeping changed: {again:?}");

        env.replan(&with_ring(8191))?;
        let third = tcp4([10, 13, 0, 3], VIP, 47000, 80, TCP_SYN);
        ensure!(Some(env.forward(&third)?) == predicted_backend(&env.plan.state, &web(), &third), "new ring");
        ensure!(env.plan.state.services[&lb_daemon::model::service_key(&web())].ring.len() == 8191);
        Ok(())
    })
}

/// Frames the fuzz starts from: every fixture row, and the kinds of frame the rows lack
/// (ICMP errors about service flows, UDP to the marked range, tagged IPv6, options).
fn fuzz_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = cases().into_iter().map(|c| c.frame).filter(|f| f.len() >= 14).collect();
    let reply = reply_of(&tcp4([10, 20, 0, 1], VIP, 44000, 80, TCP_ACK), 64);
    seeds.push(testpkt::icmp4_error([203, 0, 113, 1], VIP, 3, 4, 1400, &reply, 576));
    seeds.push(testpkt::icmp4_error([203, 0, 113, 1], VIP, 11, 0, 0, &reply, 28));
    let syn6 = testpkt::ipv6(CLIENT6, VIP6, L4::tcp(5100, 80, TCP_SYN), Ipv6Opts::default());
    let router6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    seeds.push(testpkt::icmp6_error(router6, VIP6, 2, 0, 1280, &reply_of(&syn6, 64), 200));
    seeds.push(testpkt::ipv4([10, 20, 0, 2], MARKED_NET, L4::udp(5000, 8001), Ipv4Opts::default()));
    seeds.push(testpkt::ipv4(
        [203, 0, 113, 9],
        MARKED_NET,
        L4::tcp(5001, 9000, TCP_SYN),
        Ipv4Opts::default(),
    ));
    seeds.push(testpkt::ipv4(
        [10, 20, 0, 3],
        [192, 0, 2, 10],
        L4::udp(5002, 53),
        Ipv4Opts { options: 8, vlan: Some(9), ..Default::default() },
    ));
    seeds.push(testpkt::ipv6(
        CLIENT6,
        MARKED_NET6,
        L4::tcp(5003, 443, TCP_ACK),
        Ipv6Opts { vlan: Some(7), ext: vec![0], ..Ipv6Opts::default() },
    ));
    seeds.push(tcp4([10, 20, 0, 4], TAGGED_VIP, 5004, 80, TCP_SYN));
    seeds
}

/// Values a structure-aware mutation writes over an address: the services' and the mark
/// rules', martian ones, and the clients'.
const FUZZ_ADDRS4: [[u8; 4]; 8] = [
    VIP,
    TAGGED_VIP,
    [192, 0, 2, 20],
    MARKED_NET,
    [203, 0, 113, 7],
    [127, 0, 0, 1],
    [224, 0, 0, 1],
    [10, 0, 0, 1],
];
const FUZZ_PORTS: [u16; 8] = [80, 53, 443, 8000, 8099, 9000, 0, 65535];

/// Changes one field where the parser looks, or the bytes anywhere, then (often) mends
/// the IPv4 header checksum so that the change reaches the checks after it.
fn mutate(rng: &mut fastrand::Rng, f: &mut Vec<u8>) {
    let l3_of = |f: &Vec<u8>| {
        if f.len() >= 18 && matches!(u16::from_be_bytes([f[12], f[13]]), 0x8100 | 0x88a8) { 18 } else { 14 }
    };
    for _ in 0..1 + rng.usize(..3) {
        let l3 = l3_of(f);
        let v4 = f.len() >= l3 + 20 && f[l3] >> 4 == 4;
        let l4 = if v4 { l3 + (f[l3] & 0x0f) as usize * 4 } else { l3 + 40 };
        match rng.usize(..10) {
            0 => {
                let i = rng.usize(..f.len());
                f[i] ^= 1 << rng.usize(..8);
            }
            1 => {
                let i = rng.usize(..f.len());
                f[i] = rng.u8(..);
            }
            2 => f.truncate(14 + rng.usize(..f.len() - 13)),
            3 => f.extend((0..rng.usize(..24)).map(|_| rng.u8(..))),
            4 if v4 => {
                let which = if rng.usize(..2) == 0 { 12 } else { 16 };
                f[l3 + which..l3 + which + 4].copy_from_slice(&FUZZ_ADDRS4[rng.usize(..FUZZ_ADDRS4.len())]);
            }
            5 if f.len() >= l4 + 4 => {
                let which = if rng.usize(..2) == 0 { 0 } else { 2 };
                f[l4 + which..l4 + which + 2]
                    .copy_from_slice(&FUZZ_PORTS[rng.usize(..FUZZ_PORTS.len())].to_be_bytes());
            }
            6 if v4 => f[l3 + 9] = [1, 6, 17, 47][rng.usize(..4)],
            7 if l3 == 14 => {
                let tag = [0x81, 0x00, 0, rng.u8(..)];
                f.splice(12..12, tag);
            }
            8 if l3 == 18 => {
                f.drain(12..16);
            }
            _ => {
                let macs = [testpkt::DIRECTOR_MAC, VRRP_MAC, [0xff; 6], [2, 0, 0, 0, 0, 0x77]];
                f[0..6].copy_from_slice(&macs[rng.usize(..macs.len())]);
            }
        }
    }
    let l3 = l3_of(f);
    let ihl = f.get(l3).map_or(0, |b| (b & 0x0f) as usize * 4);
    if rng.usize(..3) != 0 && f.get(l3).is_some_and(|b| b >> 4 == 4) && ihl >= 20 && f.len() >= l3 + ihl {
        testpkt::fix_ipv4_checksum(f, l3);
    }
}

/// The model-based packet fuzz: mutated frames through BPF_PROG_TEST_RUN against the
/// reference model (`lb_tests::model`, written from docs/architecture.md's rules), which predicts the
/// verdict and, for forwarded frames, the backend and every output byte. `LB_FUZZ_FRAMES`
/// (default 1,000,000; `cargo xtask fuzz` runs 10,000,000) and `LB_FUZZ_SEED` set the run.
#[test]
fn mutated_frames_do_what_the_model_of_the_data_path_says() -> Result<()> {
    let frames: u64 = std::env::var("LB_FUZZ_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let seed: u64 =
        std::env::var("LB_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x005e_ed1b_0a1d);
    with_env(move |env| {
        use lb_tests::model::{Model, Verdict};
        let model = Model::new(services(), mark_rules(), env.plan.state.clone(), 1);
        let seeds = fuzz_seeds();
        let mut rng = fastrand::Rng::with_seed(seed);
        let (mut forwarded, mut dropped, mut passed) = (0u64, 0u64, 0u64);
        for i in 0..frames {
            let mut f = seeds[rng.usize(..seeds.len())].clone();
            mutate(&mut rng, &mut f);
            let (action, out) = test_run(&env.dp, &f)?;
            let want = model.predict(&f);
            let agree = match (&want, action) {
                (Verdict::Pass, XDP_PASS) => out == f,
                (Verdict::Drop, XDP_DROP) => true,
                (Verdict::Forward { frame, tx, .. }, XDP_TX | XDP_REDIRECT) => {
                    out == *frame && (action == XDP_TX) == *tx
                }
                _ => false,
            };
            if !agree {
                let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
                anyhow::bail!(
                    "frame {i} (LB_FUZZ_SEED={seed}): the data path gave action {action}, the model {want:?}\n in  {}\n out {}",
                    hex(&f),
                    hex(&out)
                );
            }
            match action {
                XDP_PASS => passed += 1,
                XDP_DROP => dropped += 1,
                _ => forwarded += 1,
            }
        }
        let datagrams = model.fragments_recorded();
        println!(
            "{frames} frames: {forwarded} forwarded, {dropped} dropped, {passed} passed; {datagrams} fragmented datagrams recorded"
        );
        // Mutated fragment fields must reach the fragment table, or its rules go unchecked.
        ensure!(datagrams > 0 || frames < 100_000, "no first fragment was forwarded");
        // The mutations must reach every outcome often, or the fuzz proves little.
        let tenth = frames / 20;
        ensure!(
            forwarded > tenth && dropped > tenth && passed > tenth,
            "{forwarded} forwarded, {dropped} dropped, {passed} passed"
        );
        Ok(())
    })
}

/// Fragments of a datagram, IPv4 and IPv6, on services that hash ports (`mh`): in order
/// they all reach the backend of the datagram's 5-tuple, byte for byte as they came but
/// for the MACs; an overlapping one follows too; a later fragment before its first is
/// dropped and counted, and the rest of its datagram then goes on from the first. On an
/// `sh` service a later fragment before its first reaches the same backend by the ring.
#[test]
fn fragments_go_where_their_datagram_s_first_fragment_went() -> Result<()> {
    with_env(|env| {
        let udp_mh = ServiceMatch::Vip { addr: ip("192.0.2.50"), port: 5300, proto: Protocol::Udp };
        let three = [("10.1.0.11", Active), ("10.1.0.12", Active), ("10.1.0.13", Active)];
        let mut all = services();
        all.push(service("frag", udp_mh, Scheduler::Mh, &three));
        env.replan(&all)?;
        let counter = |env: &Env, i: u32| -> Result<u64> { Ok(env.dp.global_counters()?[i as usize]) };
        let sent = |env: &Env, frame: &[u8], want: u32, what: &str| -> Result<()> {
            let (action, out) = test_run(&env.dp, frame)?;
            ensure!(action == XDP_TX, "{what}: action {action}");
            ensure!(out == env.routed(frame, want), "{what}: not as it came, or to another backend");
            Ok(())
        };
        let v6 = |last: u8| {
            let mut a = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            a[15] = last;
            a
        };
        // Whole datagrams of several sources, each cut in three, both families.
        let mut datagrams = Vec::new();
        for i in 0..8u8 {
            let udp = L4::Udp { sport: 40000 + i as u16, dport: 5300, payload: 120 };
            let whole = testpkt::ipv4([10, 20, 0, i], [192, 0, 2, 50], udp, Ipv4Opts::default());
            datagrams.push((udp_mh, testpkt::fragments_v4(&whole, 48, 0x100 + i as u16), whole));
            let tcp = L4::Tcp { sport: 41000 + i as u16, dport: 80, flags: TCP_ACK, payload: 120 };
            let whole = testpkt::ipv6(v6(0x70 + i), v6(0x10), tcp, Ipv6Opts::default());
            datagrams.push((web6(), testpkt::fragments_v6(&whole, 48, 0x0200_0000 + i as u32), whole));
        }
        let followed = counter(env, stat::FRAG_FOLLOWED)?;
        for (svc, parts, whole) in &datagrams {
            ensure!(parts.len() == 3);
            let want =
                predicted_backend(&env.plan.state, svc, whole).ok_or_else(|| anyhow::anyhow!("no ring"))?;
            for (n, part) in parts.iter().enumerate() {
                sent(env, part, want, &format!("{svc} fragment {n} in order"))?;
            }
            // The middle fragment again, its offset one block back: overlapping what the
            // first carried. The real server's reassembly decides; it goes to the same one.
            let mut overlapping = parts[1].clone();
            let (l3, ipv4) = (14, whole[12..14] == [0x08, 0x00]);
            if ipv4 {
                let field = u16::from_be_bytes([overlapping[l3 + 6], overlapping[l3 + 7]]) - 1;
                overlapping[l3 + 6..l3 + 8].copy_from_slice(&field.to_be_bytes());
                testpkt::fix_ipv4_checksum(&mut overlapping, l3);
            } else {
                let at = l3 + 40 + 2;
                let field = u16::from_be_bytes([overlapping[at], overlapping[at + 1]]) - (1 << 3);
                overlapping[at..at + 2].copy_from_slice(&field.to_be_bytes());
            }
            sent(env, &overlapping, want, &format!("{svc} overlapping fragment"))?;
        }
        ensure!(counter(env, stat::FRAG_FOLLOWED)? == followed + 3 * datagrams.len() as u64);

        // Reordered on mh: the last fragment first has nowhere to go; the first then
        // records the datagram and the others follow it.
        let udp = L4::Udp { sport: 40999, dport: 5300, payload: 120 };
        let whole = testpkt::ipv4([10, 20, 1, 1], [192, 0, 2, 50], udp, Ipv4Opts::default());
        let parts = testpkt::fragments_v4(&whole, 48, 0x999);
        let want =
            predicted_backend(&env.plan.state, &udp_mh, &whole).ok_or_else(|| anyhow::anyhow!("no ring"))?;
        let dropped = counter(env, stat::DROP_FRAGMENT)?;
        let (action, _) = test_run(&env.dp, &parts[2])?;
        ensure!(action == XDP_DROP, "mh: a later fragment before its first: action {action}");
        ensure!(counter(env, stat::DROP_FRAGMENT)? == dropped + 1, "counted as fragment");
        for (n, part) in parts.iter().enumerate() {
            sent(env, part, want, &format!("mh reordered, fragment {n} after the first"))?;
        }

        // Reordered on sh (the VIP's only UDP service): the ring places it by its source.
        let udp = L4::Udp { sport: 40998, dport: 53, payload: 120 };
        let whole = testpkt::ipv4([10, 20, 1, 2], VIP, udp, Ipv4Opts::default());
        let parts = testpkt::fragments_v4(&whole, 48, 0x998);
        let want =
            predicted_backend(&env.plan.state, &dns(), &whole).ok_or_else(|| anyhow::anyhow!("no ring"))?;
        let by_ring = counter(env, stat::FRAG_BY_RING)?;
        for n in [2, 1, 0] {
            sent(env, &parts[n], want, &format!("sh reordered, fragment {n}"))?;
        }
        ensure!(counter(env, stat::FRAG_BY_RING)? == by_ring + 2, "two placed by the ring");
        Ok(())
    })
}

#[test]
fn wrr_deals_new_flows_in_weighted_turns_and_keeps_established_ones() -> Result<()> {
    with_env(|env| {
        // One CPU, so one cursor.
        lb_tests::pin_to_cpu(0)?;
        let wrr_vip = ServiceMatch::Vip { addr: ip("192.0.2.30"), port: 80, proto: Protocol::Tcp };
        let mut rr = service("rr", wrr_vip, Scheduler::Wrr, &[("10.1.0.11", Active), ("10.1.0.12", Active)]);
        rr.backends[0].weight = 300;
        rr.backends[1].weight = 100;
        let mut all = services();
        all.push(rr);
        env.replan(&all)?;
        // Backends are told apart by address: the same server behind several services
        // has one MAC.
        let addr_of = |env: &Env, id: u32| env.plan.state.backends[&id].addr;
        let (a, b) = (
            addr_of(env, env.backend_id("rr", "10.1.0.11")),
            addr_of(env, env.backend_id("rr", "10.1.0.12")),
        );
        // 3:1, smoothly interleaved (a a b a), from each new flow's first packet.
        let syn = |i: u8| tcp4([10, 14, 0, i], [192, 0, 2, 30], 48000, 80, TCP_SYN);
        let mut got = Vec::new();
        for i in 0..8 {
            got.push(addr_of(env, env.forward(&syn(i))?));
        }
        ensure!(got == [a, a, b, a, a, a, b, a], "turns {got:?} (a={a:?}, b={b:?})");
        // Established flows stay where their first packet went, whatever the cursor says.
        let mut ack = syn(2);
        ack[14 + 20 + 13] = TCP_ACK;
        for _ in 0..3 {
            ensure!(addr_of(env, env.forward(&ack)?) == b, "the flow of the third SYN went to b");
        }
        ensure!(addr_of(env, env.forward(&syn(100))?) == a, "the cursor moved on by new flows only");
        Ok(())
    })
}

#[test]
fn an_established_flow_is_stamped_again_only_once_its_stamp_is_a_second_old() -> Result<()> {
    with_env(|env| {
        let seg = |flags| tcp4([10, 16, 0, 1], VIP, 49100, 80, flags);
        let seen = |env: &Env| -> Result<u64> {
            env.dp
                .flows()?
                .into_iter()
                .find(|(k, _)| u16::from_be(k.sport) == 49100)
                .map(|(_, f)| f.last_seen_ns)
                .ok_or_else(|| anyhow::anyhow!("no entry for the flow"))
        };
        env.forward(&seg(TCP_SYN))?;
        env.forward(&seg(TCP_ACK))?;
        let stamped = seen(env)?;
        // Many clock ticks later, but within the second: the entry is not written again.
        std::thread::sleep(std::time::Duration::from_millis(100));
        env.forward(&seg(TCP_ACK))?;
        ensure!(seen(env)? == stamped, "an ACK 100 ms later rewrote last_seen_ns");
        std::thread::sleep(std::time::Duration::from_millis(1_050));
        env.forward(&seg(TCP_ACK))?;
        let again = seen(env)?;
        ensure!(again >= stamped + 1_000_000_000, "a second later the stamp stays {stamped}, now {again}");
        Ok(())
    })
}

#[test]
fn a_segment_without_handshake_counts_as_a_connection_only_once_it_goes_on() -> Result<()> {
    use lb_common::FLOW_MIDSTREAM;
    use lb_daemon::snapshot::{ConnKind, classify};
    with_env(|env| {
        let ack = tcp4([10, 15, 0, 1], VIP, 49000, 80, TCP_ACK);
        let first = env.forward(&ack)?;
        ensure!(Some(first) == predicted_backend(&env.plan.state, &web(), &ack), "forwarded by the ring");
        let entry = |env: &Env| -> Result<lb_common::Flow> {
            env.dp
                .flows()?
                .into_iter()
                .find(|(k, _)| u16::from_be(k.sport) == 49000)
                .map(|(_, f)| f)
                .ok_or_else(|| anyhow::anyhow!("no entry for the mid-stream flow"))
        };
        let now = lb_daemon::snapshot::flow_clock_ns;
        let f = entry(env)?;
        ensure!(f.state == FLOW_MIDSTREAM, "state {}", f.state);
        ensure!(classify(&f, now()?).is_none(), "junk must not count as a connection");
        // More segments at once: still unconfirmed, still on the same backend.
        for _ in 0..3 {
            ensure!(env.forward(&ack)? == first);
        }
        ensure!(entry(env)?.state == FLOW_MIDSTREAM);
        // A segment after the confirmation time: a real connection (a restart, a failover).
        std::thread::sleep(std::time::Duration::from_nanos(lb_common::MIDSTREAM_CONFIRM_NS + 100_000_000));
        ensure!(env.forward(&ack)? == first);
        let f = entry(env)?;
        ensure!(f.state == FLOW_ESTABLISHED, "state {}", f.state);
        ensure!(classify(&f, now()?) == Some(ConnKind::Active));
        Ok(())
    })
}

#[test]
fn the_flood_guard_keeps_established_flows_through_a_syn_flood() -> Result<()> {
    use lb_common::programs::BALANCER;
    use lb_common::test_object::programs::BENCH_DRIVER;
    use lb_tests::fixture::timed_run_xdp;
    use lb_tests::test_object::TestPrograms;
    let mut driver = TestPrograms::load()?;
    with_env(move |env| {
        // One CPU, so one LRU list and one flood window.
        lb_tests::pin_to_cpu(0)?;
        // BPF_PROG_TEST_RUN hands the frame it forwarded (backend MAC) to the next run:
        // let the receiving interface accept any unicast MAC, as without the daemon.
        env.plan.state.local_macs.clear();
        env.dp.apply(&env.plan.state)?;
        let established: Vec<u16> = (0..50u16).map(|i| 50000 + i).collect();
        let open_all = |env: &Env| -> Result<()> {
            for &port in &established {
                env.forward(&tcp4([10, 16, 0, 1], VIP, port, 80, TCP_SYN))?;
                env.forward(&tcp4([10, 16, 0, 1], VIP, port, 80, TCP_ACK))?;
            }
            Ok(())
        };
        let surviving = |env: &Env| -> Result<usize> {
            let flows = env.dp.flows()?;
            Ok(established
                .iter()
                .filter(|&&p| {
                    flows.iter().any(|(k, f)| {
                        u16::from_be(k.sport) == p
                            && k.src[0] == u32::from_ne_bytes([10, 16, 0, 1])
                            && f.state == FLOW_ESTABLISHED
                    })
                })
                .count())
        };
        // 200,000 distinct SYNs from 10.17.x.y, several times the table (65,536 entries).
        let mut flood = |env: &mut Env| -> Result<()> {
            driver.configure_bench_driver(env.dp.program(BALANCER)?, 200_000)?;
            let syn = tcp4([10, 17, 0, 0], VIP, 1, 80, TCP_SYN);
            let (action, _, _) = timed_run_xdp(driver.program(BENCH_DRIVER)?, BENCH_DRIVER, &syn, 200_000)?;
            ensure!(action == XDP_TX, "the flood is forwarded (action {action})");
            Ok(())
        };
        open_all(env)?;
        ensure!(surviving(env)? == established.len());
        let unrecorded_before = env.dp.global_counters()?[stat::FLOWS_UNRECORDED_FLOOD as usize];
        flood(env)?;
        let unrecorded = env.dp.global_counters()?[stat::FLOWS_UNRECORDED_FLOOD as usize] - unrecorded_before;
        ensure!(surviving(env)? == established.len(), "the guard let the flood evict established flows");
        ensure!(unrecorded > 100_000, "only {unrecorded} of 200,000 new flows went unrecorded");
        ensure!(
            env.dp.flood_guard_active_cpus(lb_daemon::snapshot::flow_clock_ns()?)? >= 1,
            "the guard is reported active"
        );
        // The same flood without the guard evicts them: the guard is what kept them.
        env.plan.state.flood_guard_flows_per_sec = 0;
        env.dp.apply(&env.plan.state)?;
        flood(env)?;
        let left = surviving(env)?;
        ensure!(left < established.len(), "without the guard the flood should evict ({left} survived)");
        Ok(())
    })
}

/// The packet a real server sends back from the VIP, from its IP header on.
fn reply_of(client_frame: &[u8], payload: usize) -> Vec<u8> {
    let start = client_frame.as_ptr() as usize;
    let p = lb_ebpf::parse::parse(start, start + client_frame.len()).expect("a client frame");
    let (sport, dport) = (u16::from_be(p.dport), u16::from_be(p.sport));
    if p.family == lb_common::FAMILY_V4 {
        let (src, dst) = (p.dst[0].to_ne_bytes(), p.src[0].to_ne_bytes());
        testpkt::ipv4(src, dst, L4::Tcp { sport, dport, flags: TCP_ACK, payload }, Ipv4Opts::default())[14..]
            .to_vec()
    } else {
        let bytes = |w: [u32; 4]| -> [u8; 16] { std::array::from_fn(|i| w[i / 4].to_ne_bytes()[i % 4]) };
        testpkt::ipv6(
            bytes(p.dst),
            bytes(p.src),
            L4::Tcp { sport, dport, flags: TCP_ACK, payload },
            Ipv6Opts::default(),
        )[14..]
            .to_vec()
    }
}

#[test]
fn icmp_errors_about_a_service_flow_go_to_its_backend() -> Result<()> {
    const ROUTER: [u8; 4] = [203, 0, 113, 1];
    const ROUTER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01];
    with_env(|env| {
        let counted =
            |env: &Env, counter: u32| -> Result<u64> { Ok(env.dp.global_counters()?[counter as usize]) };
        // A recorded flow whose client the ring moves after a change: the error follows
        // the connection table, not the new ring.
        let (more, syn, before) = env.heavy_backend_and_a_client_it_moves(18, 43000)?;
        ensure!(env.forward(&syn)? == before);
        env.replan(&more)?;
        let reply = reply_of(&syn, 1400);
        let frag_needed = testpkt::icmp4_error(ROUTER, VIP, 3, 4, 1400, &reply, 576);
        ensure!(env.forward(&frag_needed)? == before, "fragmentation needed went elsewhere than the flow");
        ensure!(counted(env, stat::ICMP_FRAG_NEEDED)? == 1);

        // An unrecorded flow (the director restarted): the ring's backend, as a
        // mid-stream segment would get.
        let unseen = tcp4([10, 18, 1, 1], VIP, 43001, 80, TCP_ACK);
        let want = predicted_backend(&env.plan.state, &web(), &unseen).expect("prediction");
        let time_exceeded = testpkt::icmp4_error(ROUTER, VIP, 11, 0, 0, &reply_of(&unseen, 10), 28);
        ensure!(env.forward(&time_exceeded)? == want);
        ensure!(counted(env, stat::ICMP_TIME_EXCEEDED)? == 1);
        ensure!(
            !env.dp.flows()?.iter().any(|(k, _)| u16::from_be(k.sport) == 43001),
            "an ICMP error must not record a flow"
        );

        // IPv6: packet too big about a flow of the mh service.
        let syn6 = testpkt::ipv6(CLIENT6, VIP6, L4::tcp(5100, 80, TCP_SYN), Ipv6Opts::default());
        let id6 = env.forward(&syn6)?;
        let ptb = testpkt::icmp6_error(ROUTER6, VIP6, 2, 0, 1280, &reply_of(&syn6, 1400), 1232);
        ensure!(env.forward(&ptb)? == id6);
        ensure!(counted(env, stat::ICMP6_PACKET_TOO_BIG)? == 1);

        // What is not about a service's flow stays the kernel's, byte for byte.
        let other_port = tcp4([10, 18, 2, 1], VIP, 43002, 8080, TCP_SYN);
        let not_ours = [
            ("echo request", testpkt::icmp4_error(ROUTER, VIP, 8, 0, 0, &reply, 28)),
            (
                "a port without a service",
                testpkt::icmp4_error(ROUTER, VIP, 3, 4, 1400, &reply_of(&other_port, 0), 28),
            ),
            (
                "addressed to another host",
                testpkt::icmp4_error(ROUTER, [192, 0, 2, 99], 3, 4, 1400, &reply, 28),
            ),
            ("a quote cut before the ports", testpkt::icmp4_error(ROUTER, VIP, 3, 4, 1400, &reply, 22)),
        ];
        for (what, frame) in not_ours {
            let (action, out) = test_run(&env.dp, &frame)?;
            ensure!(action == XDP_PASS && out == frame, "{what}: action {action}");
        }
        let mut other_mac = frag_needed.clone();
        other_mac[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
        ensure!(test_run(&env.dp, &other_mac)?.0 == XDP_PASS, "an error sent to another host's MAC");
        ensure!(counted(env, stat::ICMP_FRAG_NEEDED)? == 1);
        Ok(())
    })
}

/// `count` clients (source address and port) whose flows to the VIP's port 80 share one
/// connection-table set, found by the table's own hash.
fn flows_sharing_a_set(dp: &Dataplane, count: usize) -> Result<Vec<([u8; 4], u16)>> {
    let table = dp.flow_table()?;
    let set = |(src, sport): ([u8; 4], u16)| {
        let key = lb_common::FlowKey {
            src: [u32::from_ne_bytes(src), 0, 0, 0],
            dst: [u32::from_ne_bytes(VIP), 0, 0, 0],
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: lb_common::PROTO_TCP,
            family: lb_common::FAMILY_V4,
            _pad: 0,
        };
        table.set(lb_common::hash::flow_hash(&key, table.seed))
    };
    // A million candidates: about 60 for each of the fixtures' 16,384 sets.
    let candidates =
        (1..=250u8).flat_map(|host| (40000..44000u16).map(move |port| ([10, 20, 0, host], port)));
    let first = set(([10, 20, 0, 1], 40000));
    let flows: Vec<_> = candidates.filter(|c| set(*c) == first).take(count).collect();
    ensure!(flows.len() == count, "only {} of a million flows share a set", flows.len());
    Ok(flows)
}

/// The connection table is 4-way set-associative: a fifth flow in a full set takes the
/// way seen least recently, counted as a recent flow evicted, and the evicted flow's next
/// packet still reaches its server (the ring gives it the same one while it is
/// unchanged). A flow recorded from one CPU is found from another (one shared table).
#[test]
fn a_new_flow_in_a_full_set_takes_the_way_seen_least_recently() -> Result<()> {
    with_env(|env| {
        let flows = flows_sharing_a_set(&env.dp, 5)?;
        let recorded = |dp: &Dataplane, (src, sport): ([u8; 4], u16)| -> Result<bool> {
            Ok(dp
                .flows()?
                .iter()
                .any(|(k, _)| u16::from_be(k.sport) == sport && k.src[0] == u32::from_ne_bytes(src)))
        };
        let mut first_backend = Vec::new();
        for (i, (src, port)) in flows[..4].iter().enumerate() {
            lb_tests::pin_to_cpu(i % 2)?;
            first_backend.push(env.forward(&tcp4(*src, VIP, *port, 80, TCP_SYN))?);
        }
        for flow in &flows[..4] {
            ensure!(recorded(&env.dp, *flow)?, "flow {flow:?} not recorded");
        }
        // The first flow goes on, from the other CPU, past the one-second refresh: it is
        // now the set's most recently seen, and was not taken for a new flow.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        lb_tests::pin_to_cpu(1)?;
        let svc = env.plan.service_ids["web"];
        let new_before = env.dp.service_counters(svc)?.new_flows;
        let (src, port) = flows[0];
        ensure!(env.forward(&tcp4(src, VIP, port, 80, TCP_ACK))? == first_backend[0]);
        ensure!(env.dp.service_counters(svc)?.new_flows == new_before, "the ACK started a new flow");
        let evicted_before = env.dp.global_counters()?[stat::FLOWS_EVICTED_RECENT as usize];
        let (src, port) = flows[4];
        env.forward(&tcp4(src, VIP, port, 80, TCP_SYN))?;
        let still: Vec<bool> = flows.iter().map(|f| recorded(&env.dp, *f)).collect::<Result<_>>()?;
        ensure!(still == [true, false, true, true, true], "recorded after the fifth flow: {still:?}");
        ensure!(
            env.dp.global_counters()?[stat::FLOWS_EVICTED_RECENT as usize] == evicted_before + 1,
            "the eviction was not counted"
        );
        // The evicted flow's next packet: the same server, by the ring.
        let (src, port) = flows[1];
        ensure!(env.forward(&tcp4(src, VIP, port, 80, TCP_ACK))? == first_backend[1]);
        Ok(())
    })
}

/// Two CPUs recording different flows into one way at the same instant can leave one
/// flow's key with the other's head (backend and check). Such a way is taken for empty:
/// the flow's packet goes where the ring sends it and is recorded afresh, never to the
/// backend the way names. (The test writes the way through the pinned map: first a
/// backend with the flow's own check, which is followed, then the same with another
/// flow's check, which is not.)
#[test]
fn a_way_whose_check_does_not_vouch_for_its_key_is_taken_for_empty() -> Result<()> {
    use aya::maps::{Array, Map, MapData};
    use lb_common::{FlowSet, maps};
    let pins = Pins(std::path::PathBuf::from("/sys/fs/bpf").join(lb_tests::unique_name("lbtorn")));
    let flows_pin = pins.0.join(format!("maps-v{}", lb_common::MAP_LAYOUT_VERSION)).join(maps::FLOWS);
    with_env_pinned(Some(pins.0.clone()), move |env| {
        let src = [10, 21, 0, 1];
        let port = 41000;
        let ring_backend = env.forward(&tcp4(src, VIP, port, 80, TCP_SYN))?;
        let other = *env
            .plan
            .state
            .backends
            .iter()
            .find(|(id, b)| **id != ring_backend && b.service as u32 == env.plan.service_ids["web"])
            .map(|(id, _)| id)
            .ok_or_else(|| anyhow::anyhow!("web has one backend"))?;
        let mut table: Array<MapData, FlowSet> =
            Array::try_from(Map::from_map_data(MapData::from_pin(&flows_pin)?)?)?;
        let (set_index, way) = {
            let (key, _) = env
                .dp
                .flows()?
                .into_iter()
                .find(|(k, _)| u16::from_be(k.sport) == port)
                .ok_or_else(|| anyhow::anyhow!("the SYN was not recorded"))?;
            let t = env.dp.flow_table()?;
            let set_index = t.set(lb_common::hash::flow_hash(&key, t.seed));
            let set = table.get(&set_index, 0)?;
            let way = set
                .ways
                .iter()
                .position(|w| w.key == key)
                .ok_or_else(|| anyhow::anyhow!("not in its set"))?;
            (set_index, way)
        };
        let mut rewrite = |backend: u32, check_flip: u32| -> Result<()> {
            let mut set = table.get(&set_index, 0)?;
            set.ways[way].flow.backend = backend;
            set.ways[way].flow.check ^= check_flip;
            table.set(set_index, set, 0)?;
            Ok(())
        };
        let svc = env.plan.service_ids["web"];
        rewrite(other, 0)?;
        ensure!(
            env.forward(&tcp4(src, VIP, port, 80, TCP_ACK))? == other,
            "a way with its own check is the flow's"
        );
        // Another flow's check (a different hash, still odd, as every check is).
        rewrite(other, 0x8000_0000)?;
        let new_before = env.dp.service_counters(svc)?.new_flows;
        let to = env.forward(&tcp4(src, VIP, port, 80, TCP_ACK))?;
        ensure!(to == ring_backend, "the flow went to {to}, not where the ring sends it ({ring_backend})");
        ensure!(
            env.dp.service_counters(svc)?.new_flows == new_before + 1,
            "the flow was not recorded afresh"
        );
        ensure!(
            table
                .get(&set_index, 0)?
                .ways
                .iter()
                .any(|w| w.key.sport == port.to_be() && w.flow.backend == ring_backend)
        );
        Ok(())
    })
}

/// Pinned maps under a bpffs directory of this test's own, removed on drop.
struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Dataplane::remove_pins(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The own-MAC filter looks interfaces up by slot (index modulo 256), with the hash
/// behind for interfaces whose slot another holds: each interface accepts its own MACs
/// whichever way it is found, also after a daemon adopted the maps and the interfaces
/// went away and came back.
#[test]
fn interfaces_sharing_an_own_mac_slot_each_accept_only_their_own_macs() -> Result<()> {
    let ns = NetNs::new("fxslot")?;
    // 44 and 300 fold to slot 44: the lower index holds it.
    let (low, high) = (44u32, 300u32);
    ns.ip(&[
        "link", "add", "lbslotlo", "index", "44", "type", "veth", "peer", "name", "lbslothi", "index", "300",
    ])?;
    ns.ip(&["link", "set", "lbslotlo", "up"])?;
    ns.ip(&["link", "set", "lbslothi", "up"])?;
    let pins = Pins(std::path::PathBuf::from("/sys/fs/bpf").join(lb_tests::unique_name("lbslot")));
    let pin_dir = pins.0.clone();
    ns.run(move || {
        let options = LoadOptions { ring_slots: 18 * 4093, flow_entries: 1024, pin_dir: Some(pin_dir) };
        let mut planner = Planner::default();
        let mut plan = planner.plan(&services(), &mark_rules(), &neighbours(high))?;
        let other_mac = [0x02, 0, 0, 0, 0, 0x44];
        plan.state.local_macs.insert(low, [other_mac].into_iter().collect());
        plan.state.local_macs.insert(high, [testpkt::DIRECTOR_MAC].into_iter().collect());
        let to_director = tcp4([10, 0, 0, 1], VIP, 40000, 80, TCP_SYN);
        let mut to_other = to_director.clone();
        to_other[0..6].copy_from_slice(&other_mac);
        // Balanced (sent on to a backend) or passed, for each frame on each interface.
        let balanced = |dp: &Dataplane| -> Result<[bool; 4]> {
            let mut out = [false; 4];
            for (slot, (frame, ifindex)) in out.iter_mut().zip([
                (&to_director, low),
                (&to_other, low),
                (&to_director, high),
                (&to_other, high),
            ]) {
                let action = test_run_on(dp, frame, ifindex)?;
                ensure!(matches!(action, XDP_TX | XDP_REDIRECT | XDP_PASS), "action {action}");
                *slot = action != XDP_PASS;
            }
            Ok(out)
        };
        let registered = plan.state.local_macs.clone();
        {
            let mut dp = Dataplane::load(&options)?;
            dp.apply(&plan.state)?;
            let got = balanced(&dp)?;
            ensure!(got == [false, true, true, false], "both registered: {got:?}");
            // A daemon stops; the maps stay pinned.
        }
        // The next adopts them, and both interfaces are gone: the slot is emptied, not
        // left with its holder's MACs, and every unicast frame is accepted.
        let mut dp = Dataplane::load(&options)?;
        plan.state.local_macs.clear();
        dp.apply(&plan.state)?;
        let got = balanced(&dp)?;
        ensure!(got == [true; 4], "none registered: {got:?}");
        // Only the higher index comes back: it takes the slot.
        plan.state.local_macs.insert(high, registered[&high].clone());
        dp.apply(&plan.state)?;
        let got = balanced(&dp)?;
        ensure!(got == [true, true, true, false], "only {high} registered: {got:?}");
        // Both again: the lower index takes the slot back, the higher is found by hash.
        plan.state.local_macs = registered;
        dp.apply(&plan.state)?;
        let got = balanced(&dp)?;
        ensure!(got == [false, true, true, false], "both registered again: {got:?}");
        Ok(())
    })
}
