//! The control plane at scale, in this process and on maps of its own (no interface, no
//! netlink: static neighbours), as the daemon does it: parse the file, plan, load the maps,
//! apply; then a health change (one real server behind every service goes down: its
//! backends are planned as disabled, as the health board's overlay does) and a weight
//! change, each planned over every service and applied. Every figure comes with the map
//! writes done and the least any update could do (ring slots whose backend changed, plus
//! the service and backend entries that changed).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use lb_daemon::config::Config;
use lb_daemon::dataplane::{Dataplane, LoadOptions};
use lb_daemon::model::{BackendState, Neighbour, ServiceSpec};
use lb_daemon::plan::{DataplaneState, Planner};
use lb_tests::site::{large_site, real_server};

/// What one step cost.
struct Step {
    name: &'static str,
    took: Duration,
    writes: u64,
    minimum: u64,
}

/// Map entries that differ between two states: ring slots, service values, backends.
fn least_writes(before: &DataplaneState, after: &DataplaneState) -> u64 {
    let mut n = 0u64;
    for (key, s) in &after.services {
        match before.services.get(key) {
            // A ring of the same size can change in place: its slots, and the service value
            // only if its flags did.
            Some(old) if old.ring.len() == s.ring.len() => {
                n += old.ring.iter().zip(&s.ring).filter(|(a, b)| a != b).count() as u64;
                n += (old.flags != s.flags || old.id != s.id) as u64;
            }
            _ => n += s.ring.len() as u64 + 1,
        }
    }
    n + after.backends.iter().filter(|(id, b)| before.backends.get(id) != Some(b)).count() as u64
}

/// Writes an apply made, from the data path's own counts.
fn writes(dp: &Dataplane, slots_before: u64, report: &lb_daemon::dataplane::ApplyReport) -> u64 {
    dp.ring_slots_written() - slots_before + (report.services_written + report.backends_written) as u64
}

/// Kernel memory of this process's BPF maps (their `memlock` in fdinfo), in bytes.
fn bpf_map_memory() -> Result<u64> {
    let mut total = 0;
    for fd in std::fs::read_dir("/proc/self/fdinfo")? {
        let info = std::fs::read_to_string(fd?.path()).unwrap_or_default();
        if info.contains("map_type:") {
            total += info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn site(services: usize, backends: usize, ring: u32) -> Result<()> {
    let yaml = large_site(services, backends, ring);
    let neighbours: HashMap<IpAddr, Neighbour> = (0..backends)
        .map(|b| {
            let mac = [2, 0, 0, 1, (b >> 8) as u8, b as u8];
            (real_server(b), Neighbour { mac, ifindex: 1, if_mac: [2, 0, 0, 0, 0, 1], vlan: 0, mtu: 0 })
        })
        .collect();
    let mut steps = Vec::new();

    let t = Instant::now();
    let config =
        Config::parse(&yaml, "site.yaml").map_err(|e| anyhow::anyhow!(lb_daemon::error_chain(&e)))?;
    let parsed = t.elapsed();
    let mut planner = Planner::default();
    let plan = planner.plan(&config.services, &config.marks, &neighbours)?;
    let planned = t.elapsed();
    let mut dp = Dataplane::load(&LoadOptions {
        ring_slots: config.director.ring_slots,
        flow_entries: 1 << 16,
        pin_dir: None,
    })?;
    let loaded = t.elapsed();
    let report = dp.apply(&plan.state)?;
    steps.push(Step {
        name: "start-up: parse, plan, load, apply",
        took: t.elapsed(),
        writes: writes(&dp, 0, &report),
        minimum: least_writes(&DataplaneState::default(), &plan.state),
    });
    println!(
        "  start-up phases: parse {:.2} s, plan {:.2} s, load maps {:.2} s, apply {:.2} s",
        parsed.as_secs_f64(),
        (planned - parsed).as_secs_f64(),
        (loaded - planned).as_secs_f64(),
        (t.elapsed() - loaded).as_secs_f64()
    );

    let mut step =
        |name: &'static str, services: &[ServiceSpec], before: &DataplaneState| -> Result<DataplaneState> {
            let t = Instant::now();
            let slots = dp.ring_slots_written();
            let plan = planner.plan(services, &config.marks, &neighbours)?;
            let planned = t.elapsed();
            let report = dp.apply(&plan.state)?;
            println!(
                "  {name}: plan {:.3} s, apply {:.3} s",
                planned.as_secs_f64(),
                (t.elapsed() - planned).as_secs_f64()
            );
            steps.push(Step {
                name,
                took: t.elapsed(),
                writes: writes(&dp, slots, &report),
                minimum: least_writes(before, &plan.state),
            });
            Ok(plan.state)
        };
    let shared = real_server(0);
    let down: Vec<ServiceSpec> = config
        .services
        .iter()
        .map(|s| {
            let mut s = s.clone();
            for b in s.backends.iter_mut().filter(|b| b.addr == shared) {
                b.state = BackendState::Disabled;
            }
            s
        })
        .collect();
    let after_down = step("one real server behind every service down", &down, &plan.state)?;
    let mut weighted = down.clone();
    weighted[0].backends[1].weight = 50;
    step("one weight change", &weighted, &after_down)?;

    println!("{:<44} {:>9} {:>11} {:>11} {:>9}", "case", "seconds", "map writes", "least", "x least");
    for s in &steps {
        ensure!(s.minimum > 0, "{}: nothing changed", s.name);
        println!(
            "{:<44} {:>9.3} {:>11} {:>11} {:>9.2}",
            s.name,
            s.took.as_secs_f64(),
            s.writes,
            s.minimum,
            s.writes as f64 / s.minimum as f64
        );
    }
    println!(
        "  memory: BPF maps {:.0} MiB (ring array {:.0} MiB); this process's peak RSS {:.0} MiB",
        bpf_map_memory()? as f64 / (1 << 20) as f64,
        config.director.ring_slots as f64 * 4.0 / (1 << 20) as f64,
        status_kib("VmHWM:") as f64 / 1024.0
    );
    Ok(())
}

pub fn run_all() -> Result<()> {
    println!("\nControl plane: in-process, maps of its own, static neighbours; one run per size");
    for (services, backends, ring) in [(1000, 100, 4093), (160, 100, 65537)] {
        println!("{services} services x {backends} backends, ring {ring}:");
        site(services, backends, ring)?;
    }
    Ok(())
}
