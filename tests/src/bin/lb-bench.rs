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
//!   driver's own cost is shown as "floor via driver".
//!
//! The output of every round is checked. Ratios, not absolute numbers, are what compare
//! across machines.

use anyhow::{Result, ensure};
use lb_common::programs::{BALANCER, BENCH_DRIVER, FLOOR, PASS};
use lb_daemon::dataplane::{Dataplane, LoadOptions};
use lb_daemon::plan::{
    BackendSpec, BackendState, Neighbour, Planner, Protocol, Scheduler, ServiceMatch, ServiceSpec,
};
use lb_ebpf::parse::{TCP_ACK, TCP_SYN};
use lb_ebpf::testpkt::{self, Ipv4Opts, L4};
use lb_tests::fixture::{XDP_PASS, XDP_TX, run_program, timed_run};
use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 9;
const CYCLED_FLOWS: u32 = 65_536;

struct Case {
    name: &'static str,
    program: &'static str,
    /// Driver setting before the case runs: `Some(flows)` points the driver at `target`.
    driver: Option<(&'static str, u32)>,
    frame: Vec<u8>,
    check: fn(u32, &[u8], &[u8]) -> bool,
    /// The kernel's own average per run, one per round (integer nanoseconds).
    samples: Vec<f64>,
}

impl Case {
    fn new(
        name: &'static str,
        program: &'static str,
        driver: Option<(&'static str, u32)>,
        frame: Vec<u8>,
        check: fn(u32, &[u8], &[u8]) -> bool,
    ) -> Self {
        Case { name, program, driver, frame, check, samples: Vec::new() }
    }
}

fn tx(action: u32, _input: &[u8], _out: &[u8]) -> bool {
    action == XDP_TX
}

fn pass_unchanged(action: u32, input: &[u8], out: &[u8]) -> bool {
    action == XDP_PASS && input == out
}

fn main() -> Result<()> {
    let mut dp = Dataplane::load(&LoadOptions { ring_slots: 4 * 65537, flow_entries: 1 << 20 })?;
    let backends: Vec<_> = (1..=10u8).map(|i| format!("10.1.0.{i}").parse().expect("literal")).collect();
    let neighbours = backends
        .iter()
        .enumerate()
        .map(|(i, a)| {
            (*a, Neighbour { mac: [2, 0, 0, 0, 1, i as u8], ifindex: 1, if_mac: [2, 0, 0, 0, 0, 0xaa] })
        })
        .collect();
    let web = ServiceSpec {
        name: "web".into(),
        matcher: ServiceMatch::Vip { addr: "192.0.2.10".parse()?, port: 80, proto: Protocol::Tcp },
        scheduler: Scheduler::Sh,
        ring_size: 65537,
        backends: backends
            .iter()
            .map(|a| BackendSpec { addr: *a, weight: 100, state: BackendState::Active })
            .collect(),
    };
    let plan = Planner::default().plan(&[web], &[], &neighbours)?;
    dp.apply(&plan.state)?;

    let frame = |dst: [u8; 4], flags| {
        testpkt::ipv4([10, 0, 0, 1], dst, L4::tcp(40000, 80, flags), Ipv4Opts::default())
    };
    let vip = [192, 0, 2, 10];
    // Establish the single flow of the "established ACK" case.
    let (action, _) = run_program(&dp, BALANCER, &frame(vip, TCP_SYN), 1)?;
    ensure!(action == XDP_TX, "the VIP must be forwarded");

    let ack = frame(vip, TCP_ACK);
    let mut cases = vec![
        Case::new("empty program (XDP_PASS)", PASS, None, ack.clone(), pass_unchanged),
        Case::new("floor (parse, swap MACs, XDP_TX)", FLOOR, None, ack.clone(), tx),
        Case::new("non-VIP packet", BALANCER, None, frame([192, 0, 2, 99], TCP_ACK), pass_unchanged),
        Case::new("ACK, one established flow", BALANCER, None, ack.clone(), tx),
        Case::new("floor via driver", BENCH_DRIVER, Some((FLOOR, CYCLED_FLOWS)), ack.clone(), tx),
        Case::new(
            "ACK cycling over 65,536 flows",
            BENCH_DRIVER,
            Some((BALANCER, CYCLED_FLOWS)),
            ack.clone(),
            tx,
        ),
        Case::new(
            "SYN of a new flow (table miss)",
            BENCH_DRIVER,
            Some((BALANCER, u32::MAX)),
            frame(vip, TCP_SYN),
            tx,
        ),
    ];

    // Warm the 65,536 flows so the cycling case measures established lookups.
    dp.configure_bench_driver(BALANCER, CYCLED_FLOWS)?;
    run_program(&dp, BENCH_DRIVER, &frame(vip, TCP_ACK), CYCLED_FLOWS)?;

    // One CPU for every run: BPF_PROG_TEST_RUN runs on the calling CPU, and per-CPU maps
    // (counters, LRU lists) should stay warm on the same one.
    let mut cpus = CpuSet::new();
    let last = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
    cpus.set(last)?;
    sched_setaffinity(Pid::from_raw(0), &cpus)?;

    for _ in 0..ROUNDS {
        for case in &mut cases {
            if let Some((target, flows)) = case.driver {
                dp.configure_bench_driver(target, flows)?;
            }
            let (action, out, kernel_ns) = timed_run(&dp, case.program, &case.frame, REPEAT)?;
            ensure!(
                (case.check)(action, &case.frame, &out),
                "{}: unexpected result (action {action})",
                case.name
            );
            case.samples.push(kernel_ns);
        }
    }

    let floor = cases.iter().position(|c| c.program == FLOOR).unwrap_or(0);
    let floor_samples = cases[floor].samples.clone();
    println!(
        "BPF_PROG_TEST_RUN, {REPEAT} runs x {ROUNDS} interleaved rounds per case, CPU {last}; \
         kernel-measured ns per packet; ratio = median over rounds of case/floor in the same round"
    );
    println!("{:<36} {:>10} {:>8} {:>9}", "case", "median ns", "min ns", "x floor");
    for case in &cases {
        let ratios: Vec<f64> = case.samples.iter().zip(&floor_samples).map(|(c, f)| c / f.max(1.0)).collect();
        println!(
            "{:<36} {:>10.0} {:>8.0} {:>9.2}",
            case.name,
            median(&case.samples),
            case.samples.iter().copied().fold(f64::INFINITY, f64::min),
            median(&ratios)
        );
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
