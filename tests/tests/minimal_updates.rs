//! A config change becomes the smallest set of map writes: YAML -> Config -> Plan ->
//! Dataplane, with the writes of each apply counted. Needs root (loads the maps).

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::{Result, anyhow, ensure};
use lb_daemon::config::Config;
use lb_daemon::dataplane::{ApplyReport, Dataplane, LoadOptions};
use lb_daemon::plan::{Neighbour, Planner};
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
                let n = Neighbour { mac: [2, 0, 0, 0, 0, i], ifindex: 1, if_mac: [2, 0, 0, 0, 1, 0], vlan: 0 };
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
                report(|r| {
                    r.rings_written = 1;
                    r.services_written = 1;
                }),
            ),
            (
                "drain a backend (no new flows, still up)",
                edit(BASE, &[("{ address: 10.1.0.2 }", "{ address: 10.1.0.2, state: drain }")]),
                report(|r| {
                    r.rings_written = 1;
                    r.services_written = 1;
                }),
            ),
            (
                "disable a backend (down: its flows move)",
                edit(BASE, &[("{ address: 10.1.0.2 }", "{ address: 10.1.0.2, state: disabled }")]),
                report(|r| {
                    r.rings_written = 1;
                    r.services_written = 1;
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
