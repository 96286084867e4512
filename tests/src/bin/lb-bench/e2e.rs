//! End to end: packets per second through a director between a generator and a sink, in
//! three namespaces, for the kernel's own ways and ours, interleaved in the same rounds.
//!
//! ```text
//!  generator ──veth── director ──veth── sink
//!  (lb_gen, live      d0 10.10.1.1      (lb_sink: counts what arrives
//!   frames, XDP_TX)   d1 10.10.2.1       as UDP to 10.10.2.2:8080, drops)
//! ```
//!
//! The director's d0 runs the benchmark driver, whose tail call picks the variant:
//! `lb_pass` for the kernel's (plain forwarding; nftables DNAT with conntrack), the XDP
//! floor (new MACs, a devmap redirect: what any XDP forwarder does at least), or the
//! balancer (a masquerading service `VIP:80 -> 10.10.2.2:8080`). The generator sends 64-byte
//! UDP frames cycling over `flows` source ports, to the VIP (NAT variants) or straight to
//! the sink's address (the others). A frame counts once the sink sees it at
//! `10.10.2.2:8080`; anything else arriving there fails the run. Everything runs on the
//! generator's CPU (veth delivers in the sender's softirq), so a rate is the inverse of the
//! whole path's cost per packet: generator and sink cost the same in every variant.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use lb_common::programs::{BALANCER, PASS};
use lb_common::test_object::programs::{BENCH_DRIVER, REDIRECT_FLOOR, SINK};
use lb_daemon::dataplane::{Dataplane, LoadOptions};
use lb_daemon::model::{Forward, Neighbour, Protocol, ServiceMatch};
use lb_daemon::plan::Planner;
use lb_ebpf::testpkt::{self, Ipv4Opts, L4};
use lb_tests::NetNs;
use lb_tests::fixture::tcp_service;
use lb_tests::test_object::TestPrograms;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 9, 10);
const SINK_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 2);
const SINK_PORT: u16 = 8080;
const FRAMES: u32 = 1_000_000;
const ROUNDS: usize = 5;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    KernelForwarding,
    NftablesDnat,
    XdpFloor,
    Masquerade,
}

impl Variant {
    const ALL: [Variant; 4] =
        [Variant::KernelForwarding, Variant::NftablesDnat, Variant::XdpFloor, Variant::Masquerade];

    fn name(self) -> &'static str {
        match self {
            Variant::KernelForwarding => "kernel forwarding (no NAT)",
            Variant::NftablesDnat => "nftables DNAT + conntrack",
            Variant::XdpFloor => "XDP floor (MACs + devmap redirect)",
            Variant::Masquerade => "lb masquerade (forward: nat)",
        }
    }

    /// Whether the generator addresses the VIP (the director translates) or the sink.
    fn to_vip(self) -> bool {
        matches!(self, Variant::NftablesDnat | Variant::Masquerade)
    }
}

fn ifindex_in(ns: &NetNs, link: &str) -> Result<u32> {
    ns.scoped(|| Ok(nix::net::if_::if_nametoindex(link)?))
}

const NFT_RULESET: &str = "table ip lbbench {\n  chain pre {\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr 10.10.9.10 udp dport 80 dnat to 10.10.2.2:8080\n  }\n}\n";

fn nftables(ns: &NetNs, on: bool) -> Result<()> {
    // Deleting a table that is not there fails; only the state after matters.
    let _ = ns.exec(&["nft", "delete", "table", "ip", "lbbench"]);
    if on {
        let path = std::env::temp_dir().join(lb_tests::unique_name("lbnft"));
        std::fs::write(&path, NFT_RULESET)?;
        let res = ns.exec(&["nft", "-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        res.context("loading the nftables DNAT rule (is the nftables package installed?)")?;
    }
    Ok(())
}

pub fn run_all() -> Result<()> {
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
    dir_ns.ip(&[
        "neigh",
        "add",
        &SINK_ADDR.to_string(),
        "lladdr",
        &s0_mac_text,
        "dev",
        &d1,
        "nud",
        "permanent",
    ])?;
    dir_ns.sysctl("net.ipv4.ip_forward", "1")?;
    for scope in ["all", "default", d0.as_str()] {
        dir_ns.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
    }
    let (d1_index, g0_index) = (ifindex_in(&dir_ns, &d1)?, ifindex_in(&gen_ns, &g0)?);

    let mut test = TestPrograms::load()?;
    sink_ns.scoped(|| {
        test.expect_at_sink(SINK_ADDR, SINK_PORT)?;
        test.attach(SINK, &s0)
    })?;
    // Devmap entries name interfaces of the writer's namespace.
    dir_ns.scoped(|| {
        test.configure_redirect_floor(d1_index, s0_mac, d1_mac)?;
        test.attach(BENCH_DRIVER, &d0)
    })?;
    // The director's data path: a masquerading UDP service, its one backend the sink.
    let dp = dir_ns.scoped(|| {
        let mut dp =
            Dataplane::load(&LoadOptions { ring_slots: 4 * 4093, flow_entries: 1 << 18, pin_dir: None })?;
        let mut svc = tcp_service("udp", VIP.into(), 80, 4093, &[SINK_ADDR.into()]);
        svc.matcher = ServiceMatch::Vip { addr: VIP.into(), port: 80, proto: Protocol::Udp };
        svc.forward = Forward::Nat;
        for b in &mut svc.backends {
            (b.forward, b.port) = (Forward::Nat, Some(SINK_PORT));
        }
        let neighbours = [(
            SINK_ADDR.into(),
            Neighbour { mac: s0_mac, ifindex: d1_index, if_mac: d1_mac, vlan: 0, mtu: 0 },
        )]
        .into();
        let plan = Planner::default().plan(&[svc], &[], &neighbours)?;
        dp.apply(&plan.state)?;
        Ok(dp)
    })?;

    let frame = |dst: Ipv4Addr, port: u16| {
        let f = testpkt::ipv4(
            [10, 10, 1, 2],
            dst.octets(),
            L4::Udp { sport: 10_000, dport: port, payload: 22 },
            Ipv4Opts::default(),
        );
        lb_tests::fixture::with_macs(&f, d0_mac, g0_mac)
    };
    let (to_vip, to_sink) = (frame(VIP, 80), frame(SINK_ADDR, SINK_PORT));
    ensure!(to_vip.len() == 64, "a 64-byte frame, not {}", to_vip.len());

    // Per (flows, variant): packets per second of each round.
    let flow_counts = [1024u32, 65_536];
    let mut rates = vec![vec![Vec::new(); Variant::ALL.len()]; flow_counts.len()];
    for _ in 0..ROUNDS {
        for (fi, &flows) in flow_counts.iter().enumerate() {
            for (vi, &variant) in Variant::ALL.iter().enumerate() {
                nftables(&dir_ns, variant == Variant::NftablesDnat)?;
                let target = match variant {
                    Variant::KernelForwarding | Variant::NftablesDnat => {
                        dp.program(PASS)?.fd()?.try_clone()?
                    }
                    Variant::XdpFloor => test.program(REDIRECT_FLOOR)?.fd()?.try_clone()?,
                    Variant::Masquerade => dp.program(BALANCER)?.fd()?.try_clone()?,
                };
                test.configure_bench_driver_fd(target, 0, false, None)?;
                let frame = if variant.to_vip() { &to_vip } else { &to_sink };
                test.configure_generator(frame, flows)?;
                let (before, other_before) = test.sink_counts()?;
                let elapsed = gen_ns.scoped(|| test.generate(g0_index, frame, FRAMES))?;
                // What is still in flight lands within a few milliseconds.
                std::thread::sleep(Duration::from_millis(50));
                let (after, other_after) = test.sink_counts()?;
                let delivered = after - before;
                ensure!(
                    other_after == other_before,
                    "{}: frames reached the sink untranslated",
                    variant.name()
                );
                ensure!(
                    delivered > FRAMES as u64 / 10,
                    "{}: {delivered} of {FRAMES} delivered",
                    variant.name()
                );
                rates[fi][vi].push(delivered as f64 / elapsed.as_secs_f64());
            }
        }
    }
    nftables(&dir_ns, false)?;
    drop(dp);

    println!();
    println!(
        "End to end: {FRAMES} 64-byte UDP frames per run from a generator (live frames) through the \
         director to a sink, {ROUNDS} interleaved rounds, one CPU; Mpps delivered (median)"
    );
    println!("{:<38} {:>12} {:>12}", "variant", "1,024 flows", "65,536 flows");
    for (vi, variant) in Variant::ALL.iter().enumerate() {
        let cell = |fi: usize| format!("{:.2}", super::median(&rates[fi][vi]) / 1e6);
        println!("{:<38} {:>12} {:>12}", variant.name(), cell(0), cell(1));
    }
    let ratio = |a: Variant, b: Variant, fi: usize| {
        let (ia, ib) = (Variant::ALL.iter().position(|v| *v == a), Variant::ALL.iter().position(|v| *v == b));
        match (ia, ib) {
            (Some(ia), Some(ib)) => super::median(&rates[fi][ia]) / super::median(&rates[fi][ib]).max(1.0),
            _ => f64::NAN,
        }
    };
    for (fi, flows) in flow_counts.iter().enumerate() {
        println!(
            "{flows} flows: masquerade / nftables DNAT {:.2} (goal 3), masquerade / XDP floor {:.2}",
            ratio(Variant::Masquerade, Variant::NftablesDnat, fi),
            ratio(Variant::Masquerade, Variant::XdpFloor, fi)
        );
    }
    Ok(())
}
