//! End to end: real TCP connections from a client through the XDP balancer (native mode,
//! direct routing) to three real servers in network namespaces, the daemon configured by
//! YAML. Needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use anyhow::{Result, ensure};
use lb_tests::lab::DrLab;

const ROUNDS: usize = 8;
const SOURCES: usize = 40;

#[test]
fn tcp_connections_reach_real_servers_by_source_hash() -> Result<()> {
    let mut lab = DrLab::start(3, SOURCES)?;
    let answers = lab.connect_all(ROUNDS)?;
    let own = lab.connect_director()?;
    let metrics = lab.metrics()?;
    let (served, own_served) = lab.stop_servers()?;

    ensure!(answers.len() == ROUNDS * SOURCES && answers.len() >= 300);
    let mut by_source: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for (src, name) in &answers {
        by_source.entry(*src).or_default().insert(name.clone());
    }
    for (src, names) in &by_source {
        ensure!(names.len() == 1, "{src} reached {names:?}");
    }
    let used: BTreeSet<&String> = by_source.values().flatten().collect();
    ensure!(used.len() == 3, "servers that got a share: {used:?}");
    ensure!(own == "director" && own_served == 1, "the director's own address answered {own:?}");
    let new_flows = metrics.value("lb_service_connections_total{service=\"web\"}")?;
    ensure!(new_flows == answers.len() as f64, "new connections counted: {new_flows}");
    ensure!(served.iter().sum::<u64>() == answers.len() as u64, "servers answered {served:?}");
    ensure!(served.iter().all(|n| *n > 0));
    Ok(())
}
