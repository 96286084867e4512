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

/// Path MTU discovery under direct routing: a router between the clients and the director
/// carries at most 1280 bytes toward the clients. The real server's 1500-byte replies
/// make it send "fragmentation needed" to their source, the VIP, that is to the
/// director, which must hand it to the server; otherwise the download stalls for good.
#[test]
fn a_download_through_a_router_with_a_small_mtu_completes() -> Result<()> {
    use lb_tests::lab::{LabConfig, web_service};
    use lb_tests::tcp::NameServer;
    use lb_tests::topology::{ClientPath, Layout, VIP};
    const BULK_PORT: u16 = 9000;
    const SIZE: usize = 1 << 20;
    let servers: Vec<IpAddr> = vec![IpAddr::from([10, 0, 2, 11]), IpAddr::from([10, 0, 2, 12])];
    let services = web_service(&servers).replace(
        "services:\n",
        &format!(
            "services:\n  - name: bulk\n    match: {{ vip: {VIP}, port: {BULK_PORT}, proto: tcp }}\n    backends:\n      \
             - {{ address: 10.0.2.11 }}\n      - {{ address: 10.0.2.12 }}\n"
        ),
    );
    let lab = DrLab::start_on(
        Layout { client_path: ClientPath::Router { mtu: 1280 }, ..Layout::default() },
        2,
        1,
        LabConfig::Services(services),
    )?;
    let payload: String = (0..SIZE).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let _bulk = lab
        .topo
        .servers
        .iter()
        .map(|ns| NameServer::start(ns, (std::net::Ipv4Addr::UNSPECIFIED, BULK_PORT).into(), &payload))
        .collect::<Result<Vec<_>>>()?;
    let got = lab.connect((VIP, BULK_PORT).into())?;
    ensure!(got.len() == SIZE, "received {} of {SIZE} bytes:\n{}", got.len(), lab.daemon.log_text());
    ensure!(got == payload, "the download arrived corrupted");
    let forwarded =
        lab.metrics()?.value("lb_xdp_icmp_forwarded_total{family=\"ipv4\",type=\"fragmentation_needed\"}")?;
    ensure!(forwarded >= 1.0, "no fragmentation-needed message was forwarded ({forwarded})");
    Ok(())
}

/// A tagged client side: the clients' IPv4 frames reach the director with an 802.1Q tag
/// (VLAN 100, from a trunk port), and the real servers sit on an untagged LAN. Frames go
/// to the servers without the tag, or the servers drop them and no connection answers.
#[test]
fn frames_from_a_tagged_client_side_reach_untagged_servers_without_the_tag() -> Result<()> {
    use lb_tests::topology::Layout;
    let layout = Layout { client_vlan: Some(100), ..Layout::default() };
    let mut lab = DrLab::start_on(layout, 3, 10, lb_tests::lab::LabConfig::Services(web_service3()))?;
    let answers = lab.connect_all(3)?;
    let (served, _) = lab.stop_servers()?;
    ensure!(answers.len() == 30, "{} answers", answers.len());
    ensure!(served.iter().sum::<u64>() == 30, "servers answered {served:?}");
    Ok(())
}

fn web_service3() -> String {
    let servers: Vec<IpAddr> = (11..14).map(|i| IpAddr::from([10, 0, 2, i])).collect();
    lb_tests::lab::web_service(&servers)
}
