//! A config change becomes the smallest set of map writes: YAML -> Config -> Plan ->
//! Dataplane, with the writes of each apply counted. Needs root (loads the maps).

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::{Result, anyhow, ensure};
use lb_daemon::config::Config;
use lb_daemon::dataplane::{ApplyReport, Dataplane, LoadOptions};
use lb_daemon::model::Neighbour;
use lb_daemon::plan::Planner;
use lb_tests::NetNs;

const BASE: &str = "
director: { interfaces: [eth0] }
marks:
  - { mark: 1, dst: 198.51.100.0/24, proto: tcp, ports: 443 }
services:
  - name: a
    match: { vip: 192.0.2.1, port: 80 }
    backends:
      - { address: 10.1.0.1, weight: 2 }
      - { address: 10.1.0.2 }
      - { address: 10.1.0.3 }
  - name: b
    match: { fwmark: 1 }
    scheduler: mh
    backends:
      - { address: 10.1.0.1 }
      - { address: 10.1.0.4 }
";

struct Applier {
    dp: Dataplane,
    planner: Planner,
    neighbours: HashMap<IpAddr, Neighbour>,
}

impl Applier {
    fn apply(&mut self, yaml: &str) -> Result<ApplyReport> {
        let config = Config::parse(yaml, "test.yaml").map_err(|e| anyhow!("{e}"))?;
        let plan = self.planner.plan(&config.services, &config.marks, &self.neighbours)?;
        Ok(self.dp.apply(&plan.state)?)
    }
}

/// `BASE` with `from` replaced by `to` (each must occur).
fn edit(base: &str, edits: &[(&str, &str)]) -> String {
    let mut s = base.to_owned();
    for (from, to) in edits {
        assert!(s.contains(from), "{from:?} not in the config");
        s = s.replacen(from, to, 1);
    }
    s
}

fn report(f: impl FnOnce(&mut ApplyReport)) -> ApplyReport {
    let mut r = ApplyReport::default();
    f(&mut r);
    r
}

#[test]
fn each_config_change_writes_only_what_it_changes() -> Result<()> {
    let ns = NetNs::new("mu")?;
    ns.run(|| {
        let dp = Dataplane::load(&LoadOptions { ring_slots: 8 * 4093, flow_entries: 1024, pin_dir: None })?;
        // All on loopback (ifindex 1): these tests only count writes.
        let neighbours = (1..=6)
            .map(|i| {
                let n = Neighbour { mac: [2, 0, 0, 0, 0, i], ifindex: 1, if_mac: [2, 0, 0, 0, 1, 0], vlan: 0, mtu: 0 };
                (IpAddr::from([10, 1, 0, i]), n)
            })
            .collect();
        let mut a = Applier { dp, planner: Planner::default(), neighbours };

        let first = a.apply(BASE)?;
        ensure!(
            first
                == report(|r| {
                    r.services_written = 2;
                    r.rings_written = 2;
                    r.backends_written = 5;
                    r.mark_prefixes_written = 1;
                }),
            "first apply: {first:?}"
        );
        let steps: Vec<(&str, String, ApplyReport)> = vec![
            ("the same file again", BASE.to_owned(), ApplyReport::default()),
            (
                "the services in another order",
                {
                    let (head, rest) = BASE.split_once("  - name: a").ok_or(anyhow!("layout"))?;
                    let (svc_a, svc_b) = rest.split_once("  - name: b").ok_or(anyhow!("layout"))?;
                    format!("{head}  - name: b{svc_b}  - name: a{svc_a}")
                },
                ApplyReport::default(),
            ),
            (
                "one weight",
                edit(BASE, &[("{ address: 10.1.0.1, weight: 2 }", "{ address: 10.1.0.1, weight: 5 }")]),
                report(|r| r.rings_written = 1),
            ),
            (
                "drain a backend (no new flows, still up)",
                edit(BASE, &[("{ address: 10.1.0.2 }", "{ address: 10.1.0.2, state: drain }")]),
                report(|r| r.rings_written = 1),
            ),
            (
                "disable a backend (down: its flows move)",
                edit(BASE, &[("{ address: 10.1.0.2 }", "{ address: 10.1.0.2, state: disabled }")]),
                report(|r| {
                    r.rings_written = 1;
                    r.backends_written = 1;
                }),
            ),
            (
                "scheduler sh -> mh (same ring)",
                edit(BASE, &[("match: { vip: 192.0.2.1, port: 80 }", "match: { vip: 192.0.2.1, port: 80 }\n    scheduler: mh")]),
                report(|r| r.services_written = 1),
            ),
            (
                "add a service",
                format!("{BASE}  - name: c\n    match: {{ vip: 192.0.2.3, port: 443 }}\n    backends: [{{ address: 10.1.0.5 }}, {{ address: 10.1.0.6 }}]\n"),
                report(|r| {
                    r.services_written = 1;
                    r.rings_written = 1;
                    r.backends_written = 2;
                }),
            ),
            (
                "remove a service",
                BASE.split_once("  - name: b").map(|(head, _)| head.to_owned()).ok_or(anyhow!("layout"))?,
                report(|r| {
                    r.services_removed = 1;
                    r.backends_removed = 2;
                }),
            ),
            (
                "add a mark rule on a new prefix",
                edit(BASE, &[("marks:\n", "marks:\n  - { mark: 1, dst: 203.0.113.0/24, proto: tcp, ports: 443 }\n")]),
                report(|r| r.mark_prefixes_written = 1),
            ),
        ];
        for (what, yaml, want) in steps {
            // Each change starts from BASE, so it is measured alone.
            a.apply(BASE)?;
            let got = a.apply(&yaml)?;
            ensure!(got == want, "{what}: wrote {got:?}, expected {want:?}");
        }
        Ok(())
    })
}

/// A ring change writes the slots whose backend changed, not the whole ring: a ring of the
/// same size changes in place. Checked for a weight change, a backend going down (as a
/// failed health check makes it) and its return, each against the number of slots whose
/// backend differs from the ring before (at most 1.2 times that).
#[test]
fn a_ring_change_writes_only_the_slots_that_change() -> Result<()> {
    let ns = NetNs::new("mr")?;
    ns.run(|| {
        let dp = Dataplane::load(&LoadOptions { ring_slots: 8 * 65537, flow_entries: 1024, pin_dir: None })?;
        let neighbours = (1..=10)
            .map(|i| {
                let n = Neighbour { mac: [2, 0, 0, 0, 0, i], ifindex: 1, if_mac: [2, 0, 0, 0, 1, 0], vlan: 0, mtu: 0 };
                (IpAddr::from([10, 1, 0, i]), n)
            })
            .collect();
        let mut a = Applier { dp, planner: Planner::default(), neighbours };
        let config = |weights: [u32; 10], down: Option<u8>| -> String {
            let mut y = String::from(
                "director: { interfaces: [eth0] }\nservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    ring_size: 65537\n    backends:\n",
            );
            for (i, w) in weights.iter().enumerate() {
                let state = if down == Some(i as u8 + 1) { ", state: disabled" } else { "" };
                y.push_str(&format!("      - {{ address: 10.1.0.{}, weight: {w}{state} }}\n", i + 1));
            }
            y
        };
        let ring_of = |a: &mut Applier, yaml: &str| -> Result<(lb_common::ServiceKey, Vec<u32>)> {
            let c = Config::parse(yaml, "t.yaml").map_err(|e| anyhow!("{e}"))?;
            let plan = a.planner.clone().plan(&c.services, &c.marks, &a.neighbours)?;
            let (key, s) = plan.state.services.iter().next().ok_or_else(|| anyhow!("no service"))?;
            Ok((*key, s.ring.clone()))
        };
        let steps = [
            ("start", config([1; 10], None)),
            ("the first change", config([1; 10], Some(3))),
            ("a weight change", config([1, 1, 1, 1, 3, 1, 1, 1, 1, 1], Some(3))),
            ("a backend down", config([1, 1, 1, 1, 3, 1, 1, 2, 1, 1], Some(7))),
            ("its return", config([1, 1, 1, 1, 3, 1, 1, 2, 1, 1], None)),
        ];
        let mut previous: Vec<u32> = Vec::new();
        for (i, (what, yaml)) in steps.iter().enumerate() {
            let (key, ring) = ring_of(&mut a, yaml)?;
            let before = a.dp.ring_slots_written();
            a.apply(yaml)?;
            let written = a.dp.ring_slots_written() - before;
            ensure!(a.dp.live_ring(&key)? == ring, "{what}: the ring in the map is not the planned one");
            // Slots whose backend changed (all of them for the first ring).
            let changed = if previous.len() == ring.len() {
                ring.iter().zip(&previous).filter(|(n, o)| n != o).count()
            } else {
                ring.len()
            };
            println!("{what}: {written} ring slots written, {changed} changed");
            ensure!(written as f64 <= 1.2 * changed as f64, "{what}: {written} slots written for {changed} changed");
            if i >= 2 {
                ensure!(written < 65537 / 2, "{what}: {written} of 65537 slots written");
            }
            previous = ring;
        }
        Ok(())
    })
}

/// A large site fits: 1,000 services of 100 real servers each (100,000 backends, beyond
/// the YAML parser's default budget and the old 16,384 backend entries) pass `check`, and
/// every one of them is planned.
#[test]
fn a_site_of_a_thousand_services_and_a_hundred_thousand_backends_is_accepted() -> Result<()> {
    let t = std::time::Instant::now();
    let yaml = lb_tests::site::large_site(1000, 100, 4093);
    let config = lb_daemon::control::check_text(&yaml, "site.yaml")
        .map_err(|e| anyhow!(lb_daemon::error_chain(&e)))?;
    println!("check of {} bytes: {:?}", yaml.len(), t.elapsed());
    ensure!(config.services.len() == 1000);
    ensure!(config.services.iter().map(|s| s.backends.len()).sum::<usize>() == 100_000);
    Ok(())
}
