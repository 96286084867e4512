//! `cargo xtask bench`: nanoseconds per packet through BPF_PROG_TEST_RUN, each case next to
//! a floor program measured in the same rounds, reported as ratios.
//!
//! Repeat mode runs the program again and again on the same buffer without restoring it,
//! so every case is built to do each time what it claims:
//! * the floor swaps MACs back and forth (same work every run);
//! * non-VIP traffic is passed untouched;
//! * an established ACK only rewrites MACs to the same values, so it stays established;
//! * "65,536 flows" and "new flow" go through a driver program that rewrites the source
//!   port and address per run (checksums patched), then tail-calls the balancer. The
//!   driver's own cost is shown as "floor via driver". The cycling case and the SYN
//!   "with room" case run against a data path loaded afresh before every round (nothing
//!   another case did changes them); the SYN "with eviction" cases fill the table (every
//!   way of its sets, all but a few) before every round, so that every round evicts.
//!
//! * NAT cases (masquerading and full NAT, both directions) go through the driver too,
//!   which puts the client's (or the backend's) frame back before each run, as the
//!   direct-routing reference they are compared with does.
//!
//! The output of every round is checked. Ratios, not absolute numbers, are what compare
//! across machines. The data-path cases run in a namespace of their own, whose kernel
//! routes the NAT replies toward the client. Then the health checkers' throughput (see
//! `health`).

mod control;
mod e2e;
mod health;

use anyhow::{Result, ensure};
use aya::programs::Xdp;
use lb_common::programs::{BALANCER, PASS};
use lb_common::test_object::programs::{BENCH_DRIVER, FLOOR, LRU_INSERT};
use lb_daemon::dataplane::{Dataplane, LoadOptions};
use lb_daemon::model::{Forward, Neighbour, ServiceSpec};
use lb_daemon::plan::Planner;
use lb_ebpf::parse::{TCP_ACK, TCP_SYN};
use lb_ebpf::testpkt::{self, Ipv4Opts, L4};
use lb_tests::fixture::{XDP_PASS, XDP_REDIRECT, XDP_TX, tcp_service, timed_run_xdp, tunnelled};
use lb_tests::test_object::TestPrograms;
use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;

/// Even, so that the floor's MAC swaps cancel out and its output equals its input.
const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 9;
const CYCLED_FLOWS: u32 = 65_536;
/// The connection table of the bench's data path (the daemon's default).
const TABLE_ENTRIES: u32 = 1 << 20;
const DIRECTOR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xaa];
/// NAT cases: the client, behind a next hop on the bench namespace's client link.
const NAT_CLIENT: [u8; 4] = [10, 9, 0, 7];
const CLIENT_NEXT_HOP_MAC: [u8; 6] = [2, 0, 0, 0, 9, 7];
const CLIENT_LINK: &str = "benchc0";

/// What a case's output frame must look like after each timed run.
#[derive(Clone, Copy)]
enum Output {
    /// Byte for byte the input (pass, or an even number of MAC swaps).
    Unchanged,
    /// Ethernet addresses as in the input; the driver changed the rest.
    SameMacs,
    /// Sent to a backend: its MAC, then the director's, then the rest as the input
    /// (`whole`) or as the driver left it.
    Routed { whole: bool },
    /// Sent to a backend inside an outer IPv4 header (protocol 4).
    Tunnelled,
    /// A NAT reply on its way to the client's next hop.
    ToClient,
}

#[derive(Clone)]
struct Case {
    name: &'static str,
    program: &'static str,
    /// Driver setting before the case runs: `Some(flows)` points the driver at `target`.
    driver: Option<(&'static str, u32)>,
    /// The driver strips the outer header the previous run added (tunnel cases; set for
    /// their direct-routing references too, so that both pay for the check).
    untunnel: bool,
    /// `BenchConfig::restore`: the frame is put back before every run.
    restore: bool,
    /// Run once through the balancer before the case (the client's packet that makes
    /// the flow a NAT reply belongs to, which other cases may have evicted).
    prepare: Option<Vec<u8>>,
    /// The service whose new flows are counted.
    service: &'static str,
    frame: Vec<u8>,
    /// Untimed runs just before each timed one, undoing what other cases did meanwhile
    /// (the new-flow case evicts the others' flows from the connection table).
    warmup: u32,
    action: u32,
    output: Output,
    /// New flows the service must count per timed run; `None` where the balancer is not run.
    new_flows: Option<u64>,
    /// How many more new flows than `new_flows` a run may count: the flows of a set that
    /// holds more than its four ways take each other's way in turn (a set or two of the
    /// table for 65,536 flows).
    new_flows_slack: u64,
    /// Runs against a data path loaded afresh before each round, with a connection table
    /// of this many entries: what the case measures does not depend on the cases before.
    fresh: Option<u32>,
}

impl Case {
    fn output_ok(&self, out: &[u8], backend_macs: &[[u8; 6]], director_mac: [u8; 6]) -> bool {
        let input = &self.frame;
        match self.output {
            Output::Unchanged => out == input.as_slice(),
            Output::SameMacs => out.len() == input.len() && out[..12] == input[..12],
            Output::Routed { whole } => {
                out.len() == input.len()
                    && backend_macs.iter().any(|m| out[..6] == *m)
                    && out[6..12] == director_mac
                    && (!whole || out[12..] == input[12..])
            }
            Output::Tunnelled => {
                out.len() == input.len() + 20
                    && backend_macs.iter().any(|m| out[..6] == *m)
                    && out[6..12] == director_mac
                    && out[12..14] == [0x08, 0x00]
                    && out[14 + 9] == 4
            }
            Output::ToClient => out.len() == input.len() && out[..6] == CLIENT_NEXT_HOP_MAC,
        }
    }
}

/// A program of the production object, or of the test object (floor and driver).
fn program<'a>(dp: &'a Dataplane, test: &'a mut TestPrograms, name: &'static str) -> Result<&'a Xdp> {
    if [FLOOR, BENCH_DRIVER, LRU_INSERT].contains(&name) { test.program(name) } else { Ok(dp.program(name)?) }
}

fn main() -> Result<()> {
    // `lb-bench control`: only the control plane's section.
    let data_path_in_namespace = || -> Result<()> {
        // The NAT replies are sent where the kernel's FIB says: the data-path cases run in
        // a namespace whose routes and neighbour entry the bench sets up itself.
        let ns = lb_tests::NetNs::new("bench")?;
        ns.stub_link(CLIENT_LINK, "benchc1", &["10.9.0.1/24"], &[("10.9.0.7", "02:00:00:00:09:07")])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.run(data_path)
    };
    match std::env::args().nth(1).as_deref() {
        // `lb-bench datapath`: only the per-packet cases.
        Some("datapath") => return data_path_in_namespace(),
        Some("control") => return control::run_all(),
        // `lb-bench e2e`: only the end-to-end packet rates.
        // `lb-bench e2e --quick`: every variant checked once, with too few frames to measure.
        Some("e2e") => return e2e::run_all(std::env::args().any(|a| a == "--quick")),
        _ => {}
    }
    data_path_in_namespace()?;
    e2e::run_all(false)?;
    health::run_all()?;
    control::run_all()
}

/// The data-path cases, inside the bench namespace.
fn data_path() -> Result<()> {
    let mut test = TestPrograms::load_with_lru_reference(TABLE_ENTRIES)?;
    let load =
        |flow_entries| Dataplane::load(&LoadOptions { ring_slots: 4 * 65537, flow_entries, pin_dir: None });
    let mut dp = load(TABLE_ENTRIES)?;
    let backends: Vec<_> = (1..=10u8).map(|i| format!("10.1.0.{i}").parse().expect("literal")).collect();
    let neighbours = backends
        .iter()
        .enumerate()
        .map(|(i, a)| {
            (
                *a,
                Neighbour {
                    mac: [2, 0, 0, 0, 1, i as u8],
                    ifindex: 1,
                    if_mac: DIRECTOR_MAC,
                    vlan: 0,
                    mtu: 0,
                },
            )
        })
        .collect();
    let web = tcp_service("web", "192.0.2.10".parse()?, 80, 65537, &backends);
    // The same servers behind a tunnel service, and behind NAT (port 80 -> 8080).
    let mut tunnel = tcp_service("tunnel", "192.0.2.11".parse()?, 80, 65537, &backends);
    tunnelled(&mut tunnel);
    let nat = |name: &str, vip: &str, forward| -> Result<ServiceSpec> {
        let mut s = tcp_service(name, vip.parse()?, 80, 65537, &backends);
        s.forward = forward;
        for b in &mut s.backends {
            (b.forward, b.port) = (forward, Some(8080));
        }
        Ok(s)
    };
    let services = [
        web,
        tunnel,
        nat("nat", "192.0.2.12", Forward::Nat)?,
        nat("fullnat", "192.0.2.13", Forward::FullNat)?,
    ];
    let mut plan = Planner::default().plan(&services, &[], &neighbours)?;
    plan.state.set_tunnel_sources(Some("10.1.0.254/32".parse()?), None);
    plan.state.set_fullnat_sources(Some("10.1.0.253/32".parse()?), None);
    dp.apply(&plan.state)?;
    // The NAT frames: the client's ACK, and the reply of the backend the ring gives it
    // (to the pool port its flow got, for full NAT), 56 bytes as the driver restores them.
    let tcp56 = |src: [u8; 4], dst: [u8; 4], sport, dport| {
        testpkt::ipv4(src, dst, L4::Tcp { sport, dport, flags: TCP_ACK, payload: 2 }, Ipv4Opts::default())
    };
    let dr_ack56 = tcp56(NAT_CLIENT, [192, 0, 2, 10], 40000, 80);
    let nat_ack = tcp56(NAT_CLIENT, [192, 0, 2, 12], 40000, 80);
    let fullnat_ack = tcp56(NAT_CLIENT, [192, 0, 2, 13], 40000, 80);
    let (nat_reply, fullnat_reply) = {
        let (_, to_nat, _) = timed_run_xdp(dp.program(BALANCER)?, BALANCER, &nat_ack, 1)?;
        let (_, to_full, _) = timed_run_xdp(dp.program(BALANCER)?, BALANCER, &fullnat_ack, 1)?;
        let ip = |f: &[u8], at: usize| -> [u8; 4] { [f[at], f[at + 1], f[at + 2], f[at + 3]] };
        let pool_port = u16::from_be_bytes([to_full[34], to_full[35]]);
        (
            tcp56(ip(&to_nat, 30), NAT_CLIENT, 8080, 40000),
            tcp56(ip(&to_full, 30), ip(&to_full, 26), 8080, pool_port),
        )
    };

    let frame = |dst: [u8; 4], flags| {
        testpkt::ipv4([10, 0, 0, 1], dst, L4::tcp(40000, 80, flags), Ipv4Opts::default())
    };
    let vip = [192, 0, 2, 10];
    let tunnel_vip = [192, 0, 2, 11];
    let ack = frame(vip, TCP_ACK);
    let non_vip = frame([192, 0, 2, 99], TCP_ACK);
    let routed = Output::Routed { whole: true };
    let driven = Output::Routed { whole: false };
    let repeat = REPEAT as u64;
    // What most cases share; each case names what it changes.
    let base = Case {
        name: "",
        program: BALANCER,
        driver: None,
        untunnel: false,
        restore: false,
        prepare: None,
        service: "web",
        frame: ack.clone(),
        warmup: 0,
        action: XDP_TX,
        output: Output::Unchanged,
        new_flows: None,
        new_flows_slack: 0,
        fresh: None,
    };
    // The reference LRU map's lists are per CPU: this many SYNs fill the bench CPU's share.
    let possible_cpus = aya::util::nr_cpus().map_err(|(_, e)| e)? as u32;
    let share = TABLE_ENTRIES / possible_cpus;
    // Three new flows per way take every way of all but a few sets (a set's flows are
    // Poisson, mean 12: one in a thousand keeps a free way).
    let fill = 3 * TABLE_ENTRIES;
    // A quarter full after a round: nearly every insert finds a free way.
    let roomy = (2 * REPEAT * possible_cpus).next_power_of_two();
    let all_cases = [
        Case { name: "empty program (XDP_PASS)", program: PASS, action: XDP_PASS, ..base.clone() },
        Case { name: "floor (parse, swap MACs, XDP_TX)", program: FLOOR, ..base.clone() },
        Case { name: "non-VIP packet", frame: non_vip, action: XDP_PASS, new_flows: Some(0), ..base.clone() },
        Case {
            name: "ACK, one established flow",
            warmup: 1,
            output: routed,
            new_flows: Some(0),
            ..base.clone()
        },
        Case {
            name: "floor via driver",
            program: BENCH_DRIVER,
            driver: Some((FLOOR, CYCLED_FLOWS)),
            output: Output::SameMacs,
            ..base.clone()
        },
        Case {
            name: "ACK cycling over 65,536 flows (fresh)",
            program: BENCH_DRIVER,
            driver: Some((BALANCER, CYCLED_FLOWS)),
            warmup: CYCLED_FLOWS,
            output: driven,
            new_flows: Some(0),
            new_flows_slack: u64::from(REPEAT / 1000),
            fresh: Some(TABLE_ENTRIES),
            ..base.clone()
        },
        Case {
            name: "SYN, insert with room (fresh)",
            program: BENCH_DRIVER,
            driver: Some((BALANCER, u32::MAX)),
            frame: frame(vip, TCP_SYN),
            output: driven,
            new_flows: Some(repeat),
            // Room for nearly every run of the round.
            fresh: Some(roomy),
            ..base.clone()
        },
        Case {
            name: "SYN, insert with eviction (full)",
            program: BENCH_DRIVER,
            driver: Some((BALANCER, u32::MAX)),
            frame: frame(vip, TCP_SYN),
            // The table filled with new flows before every round.
            warmup: fill,
            output: driven,
            new_flows: Some(repeat),
            ..base.clone()
        },
        // What the kernel's LRU map alone costs that insert: the bound of the case above.
        Case {
            name: "reference: LRU miss + insert (full)",
            program: LRU_INSERT,
            warmup: share,
            new_flows: Some(0),
            ..base.clone()
        },
        // Tunnel against direct routing, both through the driver (which strips the outer
        // header the previous run added; the direct-routing case pays for the check).
        Case {
            name: "ACK, one flow, via driver",
            program: BENCH_DRIVER,
            driver: Some((BALANCER, 1)),
            untunnel: true,
            warmup: 1,
            output: driven,
            new_flows: Some(0),
            ..base.clone()
        },
        Case {
            name: "tunnel ACK, one flow, via driver",
            program: BENCH_DRIVER,
            driver: Some((BALANCER, 1)),
            untunnel: true,
            service: "tunnel",
            frame: frame(tunnel_vip, TCP_ACK),
            warmup: 1,
            output: Output::Tunnelled,
            new_flows: Some(0),
            ..base.clone()
        },
        Case {
            name: "tunnel SYN, with eviction (full)",
            program: BENCH_DRIVER,
            driver: Some((BALANCER, u32::MAX)),
            untunnel: true,
            service: "tunnel",
            frame: frame(tunnel_vip, TCP_SYN),
            warmup: fill,
            output: Output::Tunnelled,
            new_flows: Some(repeat),
            ..base.clone()
        },
        // NAT against direct routing, all restored by the driver before every run.
        Case {
            name: "ACK, one flow, restored via driver",
            program: BENCH_DRIVER,
            driver: Some((BALANCER, 0)),
            restore: true,
            frame: dr_ack56,
            warmup: 1,
            output: driven,
            new_flows: Some(0),
            ..base.clone()
        },
        Case {
            name: "masquerade: client ACK",
            program: BENCH_DRIVER,
            driver: Some((BALANCER, 0)),
            restore: true,
            service: "nat",
            frame: nat_ack.clone(),
            warmup: 1,
            output: driven,
            new_flows: Some(0),
            ..base.clone()
        },
        Case {
            name: "masquerade: server's reply",
            program: BENCH_DRIVER,
            driver: Some((BALANCER, 0)),
            restore: true,
            prepare: Some(nat_ack),
            service: "nat",
            frame: nat_reply,
            action: XDP_REDIRECT,
            output: Output::ToClient,
            new_flows: Some(0),
            ..base.clone()
        },
        Case {
            name: "full NAT: client ACK",
            program: BENCH_DRIVER,
            driver: Some((BALANCER, 0)),
            restore: true,
            service: "fullnat",
            frame: fullnat_ack.clone(),
            warmup: 1,
            output: driven,
            new_flows: Some(0),
            ..base.clone()
        },
        Case {
            name: "full NAT: server's reply",
            program: BENCH_DRIVER,
            driver: Some((BALANCER, 0)),
            restore: true,
            prepare: Some(fullnat_ack),
            service: "fullnat",
            frame: fullnat_reply,
            action: XDP_REDIRECT,
            output: Output::ToClient,
            new_flows: Some(0),
            ..base
        },
    ];
    // LB_BENCH_CASES=a|b: only the cases whose names contain one of these (and the empty
    // program and the floor, which every ratio needs), for quick experiments.
    let only = std::env::var("LB_BENCH_CASES").ok();
    let cases: Vec<Case> = all_cases
        .into_iter()
        .filter(|c| {
            [PASS, FLOOR].contains(&c.program) && c.driver.is_none()
                || only.as_deref().is_none_or(|o| o.split('|').any(|w| c.name.contains(w)))
        })
        .collect();
    // The kernel's own average per run, per case, one per round (integer nanoseconds).
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let backend_macs: Vec<[u8; 6]> = plan.state.backends.values().map(|b| b.dst_mac).collect();

    // One CPU for every run: BPF_PROG_TEST_RUN runs on the calling CPU, and per-CPU maps
    // (counters, LRU lists) should stay warm on the same one.
    let mut cpus = CpuSet::new();
    let last = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
    cpus.set(last)?;
    sched_setaffinity(Pid::from_raw(0), &cpus)?;

    for _ in 0..ROUNDS {
        for (case, samples) in cases.iter().zip(&mut samples) {
            let fresh = match case.fresh {
                Some(entries) => {
                    let mut fresh = load(entries)?;
                    fresh.apply(&plan.state)?;
                    Some(fresh)
                }
                None => None,
            };
            let dp = fresh.as_ref().unwrap_or(&dp);
            if let Some((target, flows)) = case.driver {
                let target = program(dp, &mut test, target)?.fd()?.try_clone()?;
                let restore = case.restore.then_some(case.frame.as_slice());
                test.configure_bench_driver_fd(target, flows, case.untunnel, restore)?;
            }
            if let Some(frame) = &case.prepare {
                timed_run_xdp(dp.program(BALANCER)?, BALANCER, frame, 1)?;
            }
            if case.warmup > 0 {
                timed_run_xdp(program(dp, &mut test, case.program)?, case.program, &case.frame, case.warmup)?;
            }
            let service = plan.service_ids[case.service];
            let flows_before = dp.service_counters(service)?.new_flows;
            let prog = program(dp, &mut test, case.program)?;
            let (action, out, kernel_ns) = timed_run_xdp(prog, case.program, &case.frame, REPEAT)?;
            let new_flows = dp.service_counters(service)?.new_flows - flows_before;
            ensure!(action == case.action, "{}: action {action}, want {}", case.name, case.action);
            ensure!(
                case.output_ok(&out, &backend_macs, DIRECTOR_MAC),
                "{}: unexpected output frame",
                case.name
            );
            if let Some(want) = case.new_flows {
                ensure!(
                    (want..=want + case.new_flows_slack).contains(&new_flows),
                    "{}: {new_flows} new flows in {REPEAT} runs, want {want} (+ at most {})",
                    case.name,
                    case.new_flows_slack
                );
            }
            samples.push(kernel_ns);
        }
    }

    let syn = frame(vip, TCP_SYN);
    let together = match only {
        None => {
            Some(concurrent_inserts(&dp, &mut test, &syn, plan.service_ids["web"], fill / possible_cpus)?)
        }
        Some(_) => None,
    };

    let floor = cases.iter().position(|c| c.program == FLOOR).unwrap_or(0);
    let empty = cases.iter().position(|c| c.program == PASS).unwrap_or(0);
    let floor_samples = &samples[floor];
    let ratio_to_floor = |s: &[f64]| median_ratio(s, floor_samples);
    println!(
        "BPF_PROG_TEST_RUN, {REPEAT} runs x {ROUNDS} interleaved rounds per case, CPU {last}; \
         kernel-measured ns per packet; ratio = median over rounds of case/floor in the same round; \
         - empty = median over rounds of case minus the empty program (the test-run loop's own cost); \
         (fresh) = a data path loaded afresh before every round; (full) = the \
         connection table (the LRU reference: this CPU's share of it) filled with new flows before \
         every round"
    );
    println!("{:<38} {:>10} {:>8} {:>9} {:>9}", "case", "median ns", "min ns", "- empty", "x floor");
    for (case, s) in cases.iter().zip(&samples) {
        let minus_empty: Vec<f64> = s.iter().zip(&samples[empty]).map(|(c, e)| c - e).collect();
        println!(
            "{:<38} {:>10.0} {:>8.0} {:>9.0} {:>9.2}",
            case.name,
            median(s),
            s.iter().copied().fold(f64::INFINITY, f64::min),
            median(&minus_empty),
            ratio_to_floor(s)
        );
    }
    // Every round, to show what a median hides: a slow or fast phase of the machine moves
    // every case of a round together (hence ratios within a round).
    println!("\nevery round, ns per packet (spread = slowest / fastest round):");
    for (case, s) in cases.iter().zip(&samples) {
        let (lo, hi) =
            (s.iter().copied().fold(f64::INFINITY, f64::min), s.iter().copied().fold(0.0, f64::max));
        let rounds: Vec<String> = s.iter().map(|v| format!("{v:.0}")).collect();
        println!("{:<38} {}  spread {:.2}", case.name, rounds.join(" "), hi / lo.max(1.0));
    }
    // Issue 16's goals, as ratios to the floor in the same rounds.
    println!("\ngoals (x floor, same rounds):");
    for (name, goal) in [
        ("ACK, one established flow", 3.0),
        ("non-VIP packet", 1.3),
        ("ACK cycling over 65,536 flows (fresh)", 8.0),
        ("SYN, insert with eviction (full)", 15.0),
    ] {
        let Some(i) = cases.iter().position(|c| c.name == name) else { continue };
        let r = ratio_to_floor(&samples[i]);
        println!("  {name:<38} {r:>6.2} (goal <= {goal}: {})", if r <= goal { "met" } else { "NOT met" });
    }
    // The goal for tunnels: an established ACK at most 1.3x direct routing's.
    let by_name = |name: &str| cases.iter().position(|c| c.name == name);
    if let (Some(syn), Some(lru)) =
        (by_name("SYN, insert with eviction (full)"), by_name("reference: LRU miss + insert (full)"))
    {
        println!(
            "SYN with eviction / the LRU map's own miss + insert (same rounds): {:.2}; the map alone: {:.2}x floor",
            median_ratio(&samples[syn], &samples[lru]),
            ratio_to_floor(&samples[lru])
        );
    }
    if let (Some(dr), Some(tun)) =
        (by_name("ACK, one flow, via driver"), by_name("tunnel ACK, one flow, via driver"))
    {
        println!(
            "tunnel ACK / direct-routing ACK (same rounds, both via driver): {:.2}",
            median_ratio(&samples[tun], &samples[dr])
        );
    }
    if let Some(dr) = by_name("ACK, one flow, restored via driver") {
        for name in [
            "masquerade: client ACK",
            "masquerade: server's reply",
            "full NAT: client ACK",
            "full NAT: server's reply",
        ] {
            let Some(nat) = by_name(name) else { continue };
            println!(
                "{name} / direct-routing ACK (same rounds, all restored via driver): {:.2}",
                median_ratio(&samples[nat], &samples[dr])
            );
        }
    }
    if let Some(together) = together {
        together.report();
    }
    Ok(())
}

/// New flows, each inserted into a full table, on every CPU at once against one CPU
/// alone, in the same rounds.
struct Together {
    cpus: usize,
    /// Per round: ns per insert of one CPU alone, and the mean over CPUs inserting at once.
    rounds: Vec<(f64, f64)>,
}

impl Together {
    fn report(&self) {
        if self.rounds.is_empty() {
            println!("\none CPU: no concurrent inserts measured");
            return;
        }
        let alone: Vec<f64> = self.rounds.iter().map(|r| r.0).collect();
        let both: Vec<f64> = self.rounds.iter().map(|r| r.1).collect();
        let list = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
        println!(
            "\nSYN with eviction on a full table, {} CPUs inserting at once against one alone ({ROUNDS} \
             rounds, the table filled first; each CPU its own flows):",
            self.cpus
        );
        println!("  one CPU alone, ns per insert      {:>6.0}   rounds: {}", median(&alone), list(&alone));
        println!("  each CPU, all at once, ns/insert  {:>6.0}   rounds: {}", median(&both), list(&both));
        println!("  all at once / alone (same rounds) {:>6.2}", median_ratio(&both, &alone));
    }
}

/// What the connection table's shared parts cost when every CPU inserts (a SYN flood
/// spread by RSS): the sets' lines, which every CPU writes. Every run is checked to be a
/// new flow. `fill`: each CPU's new flows before every round, to fill the table.
fn concurrent_inserts(
    dp: &Dataplane,
    test: &mut TestPrograms,
    syn: &[u8],
    service: u32,
    fill: u32,
) -> Result<Together> {
    // Not `available_parallelism`: this thread is already pinned to one CPU.
    let online: Vec<usize> =
        aya::util::online_cpus().map_err(|(_, e)| e)?.into_iter().map(|c| c as usize).collect();
    let cpus = online.len();
    let mut together = Together { cpus, rounds: Vec::new() };
    if cpus < 2 {
        return Ok(together);
    }
    let target = dp.program(BALANCER)?.fd()?.try_clone()?;
    test.configure_bench_driver_fd(target, u32::MAX, false, None)?;
    // Flow numbers 2^30 apart per CPU: no CPU sends a flow another one made (the driver's
    // counter is per CPU, indexed by CPU id).
    test.seed_bench_flows(|cpu| (cpu as u64) << 30)?;
    let prog = test.program(BENCH_DRIVER)?;
    let run_on = |cpu: usize, runs: u32| -> Result<f64> {
        let mut set = CpuSet::new();
        set.set(cpu)?;
        sched_setaffinity(Pid::from_raw(0), &set)?;
        let (action, _, ns) = timed_run_xdp(prog, BENCH_DRIVER, syn, runs)?;
        ensure!(action == XDP_TX, "concurrent SYN on CPU {cpu}: action {action}");
        Ok(ns)
    };
    // Runs `runs` SYNs on each of `on` at once; the kernel's ns per run of each.
    let at_once = |on: &[usize], runs: u32| -> Result<Vec<f64>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = on.iter().map(|&cpu| s.spawn(move || run_on(cpu, runs))).collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("a bench thread panicked"))?)
                .collect()
        })
    };
    let last = online[cpus - 1];
    for _ in 0..ROUNDS {
        at_once(&online, fill)?;
        let before = dp.service_counters(service)?.new_flows;
        let alone = at_once(&[last], REPEAT)?[0];
        let each = at_once(&online, REPEAT)?;
        let new_flows = dp.service_counters(service)?.new_flows - before;
        let want = REPEAT as u64 * (cpus as u64 + 1);
        ensure!(new_flows == want, "concurrent SYNs: {new_flows} new flows, want {want}");
        together.rounds.push((alone, each.iter().sum::<f64>() / each.len() as f64));
    }
    Ok(together)
}

/// The median over rounds of `a / b` within each round: both ran in the same round, so the
/// machine's slow and fast phases cancel.
fn median_ratio(a: &[f64], b: &[f64]) -> f64 {
    median(&a.iter().zip(b).map(|(a, b)| a / b.max(1.0)).collect::<Vec<_>>())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
