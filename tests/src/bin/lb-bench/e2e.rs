//! End to end: packets per second through a director between a generator and a sink, in
//! three namespaces, for the kernel's own ways and ours, interleaved in the same rounds.
//!
//! ```text
//!  generator ──veth── director ──veth── sink
//!  (lb_gen, live      d0 10.10.1.1      (lb_sink: counts what arrives as expected,
//!   frames, XDP_TX)   d1 10.10.2.1       drops everything; "servers" 10.10.2.2-4)
//! ```
//!
//! The director's d0 runs the benchmark driver, whose tail call picks the variant:
//! `lb_pass` for the kernel's (plain forwarding; nftables DNAT with conntrack over three
//! backends), the XDP floor (new MACs, a devmap redirect: what any XDP forwarder does at
//! least), or the balancer, with three services over the same three servers: direct
//! routing, an IPv4-in-IPv4 tunnel, and masquerading (`VIP:80 -> server:8080`). The
//! generator sends 64-byte UDP frames, or 64-byte TCP SYNs (10 bytes of data, as TCP Fast
//! Open sends), cycling over `flows` source ports, each to the address its variant wants.
//! A frame counts only when the sink sees it as that variant must deliver it (the right
//! server addresses and port, inside a tunnel header or not); anything else arriving
//! there fails the run. Everything runs on the generator's CPU (veth delivers in the
//! sender's softirq), so a rate is the inverse of the whole path's cost per packet:
//! generator and sink cost the same in every variant.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use lb_common::programs::{BALANCER, PASS};
use lb_common::test_object::programs::{BENCH_DRIVER, REDIRECT_FLOOR, REDIRECT_FLOOR_TABLE, SINK};
use lb_daemon::dataplane::{Dataplane, LoadOptions};
use lb_daemon::model::{Forward, Neighbour, Protocol, ServiceMatch, ServiceSpec};
use lb_daemon::plan::Planner;
use lb_ebpf::parse::TCP_SYN;
use lb_ebpf::testpkt::{self, Ipv4Opts, L4};
use lb_tests::NetNs;
use lb_tests::fixture::tcp_service;
use lb_tests::test_object::TestPrograms;

/// The services' addresses: masquerading (and nftables DNAT), direct routing, tunnel.
const NAT_VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 9, 10);
const DR_VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 9, 11);
const TUNNEL_VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 9, 12);
const VIP_PORT: u16 = 80;
/// Three servers, all on the sink's link (one MAC answers for them).
const SERVERS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 10, 2, 2), Ipv4Addr::new(10, 10, 2, 3), Ipv4Addr::new(10, 10, 2, 4)];
const SERVER_PORT: u16 = 8080;
/// Frames per run and rounds: the benchmark's, and `--quick`'s (a check that every variant
/// still delivers as it must, too short to measure anything).
const FRAMES: u32 = 1_000_000;
const ROUNDS: usize = 5;
const QUICK_FRAMES: u32 = 20_000;
const FLOW_COUNTS: [u32; 2] = [1024, 65_536];
/// The daemon's default connection table, which holds the flows of all services and
/// protocols (3 x 2 x 65,536) with room: with a smaller table each run would start by
/// re-inserting what the other variants' runs evicted. `lb_redirect_floor_table`'s table
/// is as large.
const TABLE_ENTRIES: u32 = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    KernelForwarding,
    NftablesDnat,
    XdpFloor,
    FloorWithTableRead,
    DirectRouting,
    Tunnel,
    Masquerade,
}

impl Variant {
    const ALL: [Variant; 7] = [
        Variant::KernelForwarding,
        Variant::NftablesDnat,
        Variant::XdpFloor,
        Variant::FloorWithTableRead,
        Variant::DirectRouting,
        Variant::Tunnel,
        Variant::Masquerade,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::KernelForwarding => "kernel forwarding (no NAT)",
            Variant::NftablesDnat => "nftables DNAT + conntrack",
            Variant::XdpFloor => "XDP floor (MACs + devmap redirect)",
            Variant::FloorWithTableRead => "XDP floor + a 1M-entry table read",
            Variant::DirectRouting => "lb direct routing (forward: dr)",
            Variant::Tunnel => "lb tunnel (forward: tunnel)",
            Variant::Masquerade => "lb masquerade (forward: nat)",
        }
    }

    /// Where the generator sends.
    fn destination(self) -> (Ipv4Addr, u16) {
        match self {
            Variant::KernelForwarding | Variant::XdpFloor | Variant::FloorWithTableRead => {
                (SERVERS[0], SERVER_PORT)
            }
            Variant::NftablesDnat | Variant::Masquerade => (NAT_VIP, VIP_PORT),
            Variant::DirectRouting => (DR_VIP, VIP_PORT),
            Variant::Tunnel => (TUNNEL_VIP, VIP_PORT),
        }
    }

    /// What the sink must see: the destination addresses (the first and how many) and
    /// port, and the tunnel's destinations if any.
    fn delivered_as(self) -> ((Ipv4Addr, u16), u16, Option<(Ipv4Addr, u16)>) {
        let servers = (SERVERS[0], SERVERS.len() as u16);
        match self {
            Variant::KernelForwarding
            | Variant::XdpFloor
            | Variant::FloorWithTableRead
            | Variant::NftablesDnat
            | Variant::Masquerade => (servers, SERVER_PORT, None),
            // Direct routing changes only the MACs: the server owns the VIP.
            Variant::DirectRouting => ((DR_VIP, 1), VIP_PORT, None),
            Variant::Tunnel => ((TUNNEL_VIP, 1), VIP_PORT, Some(servers)),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    Udp,
    TcpSyn,
}

impl Traffic {
    const ALL: [Traffic; 2] = [Traffic::Udp, Traffic::TcpSyn];

    fn proto(self) -> u8 {
        match self {
            Traffic::Udp => 17,
            Traffic::TcpSyn => 6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Traffic::Udp => "UDP",
            Traffic::TcpSyn => "TCP SYN",
        }
    }
}

fn ifindex_in(ns: &NetNs, link: &str) -> Result<u32> {
    ns.scoped(|| Ok(nix::net::if_::if_nametoindex(link)?))
}

/// What an operator would write for the same service with the kernel's own NAT: one DNAT
/// rule spreading new connections over the three servers, conntrack keeping them there.
fn nft_ruleset() -> String {
    let map = SERVERS.iter().enumerate().map(|(i, s)| format!("{i} : {s}")).collect::<Vec<_>>().join(", ");
    let rule = |proto: &str| {
        format!(
            "    ip daddr {NAT_VIP} {proto} dport {VIP_PORT} dnat to numgen random mod {} map {{ {map} }} : {SERVER_PORT}\n",
            SERVERS.len()
        )
    };
    format!(
        "table ip lbbench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n{}{}  }}\n}}\n",
        rule("udp"),
        rule("tcp")
    )
}

fn nftables(ns: &NetNs, on: bool) -> Result<()> {
    // Deleting a table that is not there fails; only the state after matters.
    let _ = ns.exec(&["nft", "delete", "table", "ip", "lbbench"]);
    if on {
        let path = std::env::temp_dir().join(lb_tests::unique_name("lbnft"));
        std::fs::write(&path, nft_ruleset())?;
        let res = ns.exec(&["nft", "-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        res.context("loading the nftables DNAT rule (is the nftables package installed?)")?;
    }
    Ok(())
}

/// The director's services: each mode for UDP and TCP, over the same three servers.
fn services() -> Vec<ServiceSpec> {
    let servers: Vec<_> = SERVERS.iter().map(|s| (*s).into()).collect();
    let mut out = Vec::new();
    for (vip, forward) in [(DR_VIP, Forward::Dr), (TUNNEL_VIP, Forward::Tunnel), (NAT_VIP, Forward::Nat)] {
        for (proto, name) in [(Protocol::Udp, "udp"), (Protocol::Tcp, "tcp")] {
            let mut svc = tcp_service(&format!("{vip}-{name}"), vip.into(), VIP_PORT, 4093, &servers);
            svc.matcher = ServiceMatch::Vip { addr: vip.into(), port: VIP_PORT, proto };
            svc.forward = forward;
            for b in &mut svc.backends {
                b.forward = forward;
                b.port = (forward == Forward::Nat).then_some(SERVER_PORT);
            }
            out.push(svc);
        }
    }
    out
}

/// Packets per second delivered, per traffic kind, flow count and variant, every round.
struct Rates(Vec<Vec<Vec<Vec<f64>>>>);

impl Rates {
    fn new() -> Self {
        Rates(vec![vec![vec![Vec::new(); Variant::ALL.len()]; FLOW_COUNTS.len()]; Traffic::ALL.len()])
    }

    fn index<T: PartialEq>(all: &[T], x: T) -> usize {
        all.iter().position(|a| *a == x).unwrap_or(0)
    }

    fn push(&mut self, t: usize, f: usize, v: usize, rate: f64) {
        self.0[t][f][v].push(rate);
    }

    fn median(&self, t: usize, f: usize, v: Variant) -> f64 {
        super::median(&self.0[t][f][Self::index(&Variant::ALL, v)])
    }

    fn ratio(&self, t: usize, f: usize, a: Variant, b: Variant) -> f64 {
        let rates = &self.0[t][f];
        super::median_ratio(&rates[Self::index(&Variant::ALL, a)], &rates[Self::index(&Variant::ALL, b)])
    }
}

pub fn run_all(quick: bool) -> Result<()> {
    let (frames, rounds) = if quick { (QUICK_FRAMES, 1) } else { (FRAMES, ROUNDS) };
    let (gen_ns, dir_ns, sink_ns) = (NetNs::new("bg")?, NetNs::new("bd")?, NetNs::new("bs")?);
    let (g0, d0) = lb_tests::veth(&gen_ns, &dir_ns, "eg")?;
    let (d1, s0) = lb_tests::veth(&dir_ns, &sink_ns, "es")?;
    for (ns, link) in [(&gen_ns, &g0), (&dir_ns, &d0), (&dir_ns, &d1), (&sink_ns, &s0)] {
        lb_tests::topology::no_offloads(ns, link)?;
    }
    let (s0_mac, d1_mac, d0_mac, g0_mac) =
        (sink_ns.mac(&s0)?, dir_ns.mac(&d1)?, dir_ns.mac(&d0)?, gen_ns.mac(&g0)?);
    dir_ns.ip(&["addr", "add", "10.10.1.1/24", "dev", &d0])?;
    dir_ns.ip(&["addr", "add", "10.10.2.1/24", "dev", &d1])?;
    let s0_mac_text = s0_mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    for server in SERVERS {
        let server = server.to_string();
        dir_ns.ip(&["neigh", "add", &server, "lladdr", &s0_mac_text, "dev", &d1, "nud", "permanent"])?;
    }
    dir_ns.sysctl("net.ipv4.ip_forward", "1")?;
    for scope in ["all", "default", d0.as_str()] {
        dir_ns.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
    }
    let (d1_index, g0_index) = (ifindex_in(&dir_ns, &d1)?, ifindex_in(&gen_ns, &g0)?);

    let mut test = TestPrograms::load_with_set_reference(TABLE_ENTRIES)?;
    sink_ns.scoped(|| test.attach(SINK, &s0))?;
    // Devmap entries name interfaces of the writer's namespace.
    dir_ns.scoped(|| {
        test.configure_redirect_floor(d1_index, s0_mac, d1_mac)?;
        test.attach(BENCH_DRIVER, &d0)
    })?;
    let dp = dir_ns.scoped(|| {
        let mut dp = Dataplane::load(&LoadOptions {
            ring_slots: 6 * 4093,
            flow_entries: TABLE_ENTRIES,
            pin_dir: None,
        })?;
        let neighbours = SERVERS
            .iter()
            .map(|s| {
                ((*s).into(), Neighbour { mac: s0_mac, ifindex: d1_index, if_mac: d1_mac, vlan: 0, mtu: 0 })
            })
            .collect();
        let mut plan = Planner::default().plan(&services(), &[], &neighbours)?;
        plan.state.set_tunnel_sources(Some("10.10.2.1/32".parse()?), None);
        dp.apply(&plan.state)?;
        Ok(dp)
    })?;

    let frame = |traffic: Traffic, (dst, port): (Ipv4Addr, u16)| {
        let l4 = match traffic {
            Traffic::Udp => L4::Udp { sport: 10_000, dport: port, payload: 22 },
            Traffic::TcpSyn => L4::Tcp { sport: 10_000, dport: port, flags: TCP_SYN, payload: 10 },
        };
        let f = testpkt::ipv4([10, 10, 1, 2], dst.octets(), l4, Ipv4Opts::default());
        lb_tests::fixture::with_macs(&f, d0_mac, g0_mac)
    };

    let mut rates = Rates::new();
    for _ in 0..rounds {
        for (ti, &traffic) in Traffic::ALL.iter().enumerate() {
            for (fi, &flows) in FLOW_COUNTS.iter().enumerate() {
                for (vi, &variant) in Variant::ALL.iter().enumerate() {
                    nftables(&dir_ns, variant == Variant::NftablesDnat)?;
                    let target = match variant {
                        Variant::KernelForwarding | Variant::NftablesDnat => {
                            dp.program(PASS)?.fd()?.try_clone()?
                        }
                        Variant::XdpFloor => test.program(REDIRECT_FLOOR)?.fd()?.try_clone()?,
                        Variant::FloorWithTableRead => {
                            test.program(REDIRECT_FLOOR_TABLE)?.fd()?.try_clone()?
                        }
                        Variant::DirectRouting | Variant::Tunnel | Variant::Masquerade => {
                            dp.program(BALANCER)?.fd()?.try_clone()?
                        }
                    };
                    test.configure_bench_driver_fd(target, 0, false, None)?;
                    let (addrs, port, tunnel) = variant.delivered_as();
                    test.expect_at_sink(traffic.proto(), addrs, port, tunnel)?;
                    let frame = frame(traffic, variant.destination());
                    ensure!(frame.len() == 64, "a 64-byte frame, not {}", frame.len());
                    test.configure_generator(&frame, flows)?;
                    let (before, other_before) = test.sink_counts()?;
                    let elapsed = gen_ns.scoped(|| test.generate(g0_index, &frame, frames))?;
                    // What is still in flight lands within a few milliseconds.
                    std::thread::sleep(Duration::from_millis(50));
                    let (after, other_after) = test.sink_counts()?;
                    let delivered = after - before;
                    let what = format!("{} {} over {flows} flows", variant.name(), traffic.name());
                    ensure!(
                        other_after == other_before,
                        "{what}: {} frames reached the sink otherwise than the variant delivers them",
                        other_after - other_before
                    );
                    ensure!(delivered > frames as u64 / 10, "{what}: {delivered} of {frames} delivered");
                    rates.push(ti, fi, vi, delivered as f64 / elapsed.as_secs_f64());
                }
            }
        }
    }
    nftables(&dir_ns, false)?;
    drop(dp);
    report(&rates, frames, rounds);
    Ok(())
}

fn report(rates: &Rates, frames: u32, rounds: usize) {
    println!();
    println!(
        "End to end: {frames} 64-byte frames per run from a generator (live frames) through the \
         director to a sink, {rounds} interleaved rounds, one CPU; Mpps delivered (median of rounds)"
    );
    let mut header = format!("{:<38}", "variant");
    for t in Traffic::ALL {
        for f in FLOW_COUNTS {
            header += &format!(" {:>18}", format!("{} {f} flows", t.name()));
        }
    }
    println!("{header}");
    for v in Variant::ALL {
        let mut line = format!("{:<38}", v.name());
        for ti in 0..Traffic::ALL.len() {
            for fi in 0..FLOW_COUNTS.len() {
                line += &format!(" {:>18.2}", rates.median(ti, fi, v) / 1e6);
            }
        }
        println!("{line}");
    }
    println!("Ratios (median of the per-round ratios):");
    let goals: [(&str, Variant, Variant, Option<f64>); 6] = [
        ("direct routing / XDP floor", Variant::DirectRouting, Variant::XdpFloor, Some(0.85)),
        // What a table of the connection table's size costs by itself: the best any
        // director that keeps per-flow state in one could do.
        ("floor + table read / XDP floor", Variant::FloorWithTableRead, Variant::XdpFloor, None),
        ("direct routing / floor + table read", Variant::DirectRouting, Variant::FloorWithTableRead, None),
        ("direct routing / nftables DNAT", Variant::DirectRouting, Variant::NftablesDnat, Some(4.0)),
        ("masquerade / nftables DNAT", Variant::Masquerade, Variant::NftablesDnat, Some(3.0)),
        ("tunnel / direct routing", Variant::Tunnel, Variant::DirectRouting, None),
    ];
    for (name, a, b, goal) in goals {
        let mut line = format!("{name:<38}");
        let mut met = true;
        for ti in 0..Traffic::ALL.len() {
            for fi in 0..FLOW_COUNTS.len() {
                let r = rates.ratio(ti, fi, a, b);
                met &= goal.is_none_or(|g| r >= g);
                line += &format!(" {r:>18.2}");
            }
        }
        if let Some(g) = goal {
            line += &format!("  goal >= {g}: {}", if met { "met" } else { "NOT met" });
        }
        println!("{line}");
    }
}
