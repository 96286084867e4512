//! End to end: real TCP connections from a client through the XDP balancer (native mode,
//! direct routing) to three real servers in network namespaces. Needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use lb_daemon::dataplane::{Dataplane, LoadOptions, XdpMode};
use lb_daemon::plan::{BackendSpec, BackendState, Planner, Protocol, Scheduler, ServiceMatch, ServiceSpec};
use lb_daemon::routing::neighbour;
use lb_tests::tcp::{NameServer, fetch_from};
use lb_tests::topology::{DIRECTOR_CLIENT_SIDE, DrTopology, VIP};

const ROUNDS: usize = 8;
const SOURCES: usize = 40;

#[test]
fn tcp_connections_reach_real_servers_by_source_hash() -> Result<()> {
    let topo = DrTopology::build(3, SOURCES)?;
    let vip: SocketAddr = (VIP, 80).into();
    let servers = topo
        .servers
        .iter()
        .enumerate()
        .map(|(i, ns)| NameServer::start(ns, "0.0.0.0:80".parse()?, &format!("server{}", i + 1)))
        .collect::<Result<Vec<_>>>()?;
    let own_service = NameServer::start(&topo.director, (DIRECTOR_CLIENT_SIDE, 8080).into(), "director")?;

    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let backends: Vec<IpAddr> = topo.server_addrs.iter().map(|a| IpAddr::V4(*a)).collect();
    let (dir_in, lan_port, lan_ns) =
        (topo.director_in.clone(), topo.lan_port.clone(), topo.lan.name().to_owned());
    let director = topo.director.spawn(move || {
        let mut dp = Dataplane::load(&LoadOptions { ring_slots: 4 * 4093, flow_entries: 65536 })?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let neighbours = rt.block_on(neighbour::resolve(&backends, Duration::from_secs(5)))?;
        ensure!(neighbours.len() == backends.len(), "resolved only {neighbours:?}");
        let web = ServiceSpec {
            name: "web".into(),
            matcher: ServiceMatch::Vip { addr: IpAddr::V4(VIP), port: 80, proto: Protocol::Tcp },
            scheduler: Scheduler::Sh,
            ring_size: 4093,
            backends: backends
                .iter()
                .map(|a| BackendSpec { addr: *a, weight: 100, state: BackendState::Active })
                .collect(),
        };
        let plan = Planner::default().plan(&[web], &[], &neighbours)?;
        dp.apply(&plan.state)?;
        dp.attach(&dir_in, XdpMode::Native)?;
        // Redirected frames reach the LAN bridge only if its veth port runs XDP too.
        std::thread::scope(|s| {
            s.spawn(|| -> Result<()> {
                lb_tests::enter(&lan_ns)?;
                Ok(dp.attach_pass_through(&lan_port, XdpMode::Native)?)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("attach thread panicked"))?
        })?;
        ready_tx.send(())?;
        // Bounded: the test ends well within this, or fails.
        let _ = done_rx.recv_timeout(Duration::from_secs(120));
        Ok(dp.service_counters(plan.service_ids["web"])?)
    });
    ready_rx.recv_timeout(Duration::from_secs(30)).context("director did not get ready")?;

    let addrs = topo.client_addrs.clone();
    let answers = topo.client.run(move || {
        let mut answers: Vec<(IpAddr, String)> = Vec::new();
        for _ in 0..ROUNDS {
            for a in &addrs {
                answers.push((IpAddr::V4(*a), fetch_from(IpAddr::V4(*a), vip)?));
            }
        }
        let own = fetch_from(IpAddr::V4(addrs[0]), (DIRECTOR_CLIENT_SIDE, 8080).into())?;
        Ok((answers, own))
    });
    done_tx.send(()).ok();
    let counters = director.join().map_err(|_| anyhow::anyhow!("director panicked"))??;
    let (answers, own) = answers?;

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
    ensure!(own == "director", "the director's own address answered {own:?}");
    ensure!(counters.new_flows == answers.len() as u64, "new flows counted: {counters:?}");

    let served: u64 = servers.into_iter().map(NameServer::stop).sum::<Result<u64>>()?;
    ensure!(served == answers.len() as u64, "servers answered {served}");
    ensure!(own_service.stop()? == 1);
    Ok(())
}
