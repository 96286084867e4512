//! Two directors (`lb_tests::two_directors`). Behind ECMP: a router running BIRD learns
//! each VIP from both directors' BIRD over BGP and spreads flows over them; both
//! directors compute the same ring, so a source sticks to one server whichever director
//! carries it, and a flow that moves between directors mid-stream keeps its server.
//! Active/standby: keepalived moves the VIP, the standby forwards nothing, and flows
//! survive the move both ways. Needs root, BIRD and keepalived.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use lb_tests::tcp::{Conversations, EchoServer, fetch_from};
use lb_tests::topology::VIP;
use lb_tests::two_directors::{DIRECTOR_ADDRS, ECHO_PORT, Redundancy, SERVICE_PORT, TwoDirectors};

const SERVERS: usize = 3;
const SOURCES: usize = 30;
const ROUNDS: usize = 10;
const LONG_LIVED: usize = 50;

/// The server each source reached; fails if a source reached two.
fn sticky(answers: &[(IpAddr, String)]) -> Result<BTreeMap<IpAddr, String>> {
    let mut by_source = BTreeMap::new();
    for (src, server) in answers {
        ensure!(server.starts_with("server"), "{src} got {server:?}");
        let first = by_source.entry(*src).or_insert_with(|| server.clone());
        ensure!(first == server, "{src} reached {first} and {server}");
    }
    Ok(by_source)
}

#[test]
fn both_directors_carry_flows_and_agree_on_every_sources_server() -> Result<()> {
    // The second director's file lists the backends the other way round.
    let lab = TwoDirectors::start(Redundancy::Ecmp, SERVERS, SOURCES, true, true)?;
    ensure!(lab.next_hops()?.len() == 2, "{:?}", lab.next_hops()?);

    // Both directors' rings say the same, whatever order their files list the servers in.
    let fps: Vec<String> = lab.directors.iter().map(|d| d.ring_fingerprint("web")).collect::<Result<_>>()?;
    ensure!(fps[0] == fps[1] && fps[0] != "00000000", "fingerprints differ: {fps:?}");
    let metric = |i: usize| -> Result<f64> {
        lab.directors[i].metrics()?.value("lb_service_ring_fingerprint{service=\"web\"}")
    };
    ensure!(metric(0)? == metric(1)? && metric(0)? == u32::from_str_radix(&fps[0], 16)? as f64);
    // Their files differ (order, and this lab's per-director paths), and status says so.
    for d in &lab.directors {
        let sum = lb_tests::run("sha256sum", &[&d.config_path().to_string_lossy()])?;
        let digest = sum.split_whitespace().next().unwrap_or_default();
        let status = d.daemon.status()?;
        ensure!(status.contains(&format!("config sha256 {digest}")), "{sum}\n{status}");
    }

    let before = lab.scheduled("web")?;
    let answers = lab.connect_all(ROUNDS)?;
    ensure!(answers.len() == SOURCES * ROUNDS);
    let by_source = sticky(&answers)?;
    let servers: std::collections::BTreeSet<&String> = by_source.values().collect();
    ensure!(servers.len() == SERVERS, "the sources reached only {servers:?}");
    let after = lab.scheduled("web")?;
    let carried: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    ensure!(
        carried.iter().sum::<f64>() == (SOURCES * ROUNDS) as f64,
        "each connection is scheduled once, by one director: {carried:?}"
    );
    // The router hashes ports too: a source's connections go through both directors.
    ensure!(carried.iter().all(|&n| n >= (SOURCES * ROUNDS / 5) as f64), "one director idle: {carried:?}");
    Ok(())
}

/// Polls the VIP with short connections from every source until `stop`: (answered,
/// failed, slower than a second), bounded by `limit`.
fn probe_while(lab: &TwoDirectors, stop: &std::sync::atomic::AtomicBool, limit: Duration) -> (u64, u64, u64) {
    let (mut ok, mut failed, mut slow) = (0, 0, 0);
    let started = Instant::now();
    let vip: SocketAddr = (VIP, SERVICE_PORT).into();
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed() < limit {
        let src = IpAddr::V4(lab.client_addrs[i % lab.client_addrs.len()]);
        let t = Instant::now();
        match lab.client.run(move || fetch_from(src, vip)) {
            Ok(a) if a.starts_with("server") => ok += 1,
            _ => failed += 1,
        }
        if t.elapsed() > Duration::from_secs(1) {
            slow += 1;
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    (ok, failed, slow)
}

/// Echo servers on every real server (up on both directors), and `LONG_LIVED` connections
/// from the clients exchanging a message every 100 ms through the VIP.
fn converse(lab: &TwoDirectors) -> Result<(Vec<EchoServer>, Conversations)> {
    let echo = EchoServer::on_each(&lab.servers, ECHO_PORT)?;
    lab.wait_active("echo", SERVERS)?;
    let sources: Vec<IpAddr> = lab.client_addrs.iter().map(|a| IpAddr::V4(*a)).collect();
    let conv = Conversations::start(
        &lab.client,
        sources,
        (VIP, ECHO_PORT).into(),
        LONG_LIVED,
        Duration::from_millis(100),
        10_000,
    )?;
    Ok((echo, conv))
}

/// Stops the conversations: every connection lived and every exchange came back right.
fn all_exchanged(mut lab: TwoDirectors, echo: Vec<EchoServer>, conv: Conversations) -> Result<()> {
    let report = conv.stop()?;
    ensure!(report.connections == LONG_LIVED);
    ensure!(report.exchanges == report.rounds * LONG_LIVED as u64, "{report:?}");
    for e in echo {
        ensure!(e.stop()? > 0);
    }
    lab.stop_servers()?;
    Ok(())
}

#[test]
fn long_lived_connections_survive_a_director_failing_and_coming_back() -> Result<()> {
    let lab = TwoDirectors::start(Redundancy::Ecmp, SERVERS, 25, false, true)?;
    let (echo, conv) = converse(&lab)?;
    ensure!(conv.wait_rounds(3, Duration::from_secs(10)), "the connections did not start exchanging");
    // Without flows on lb1 its failure would prove nothing.
    let on_lb1 = lab.scheduled("echo")?[0];
    ensure!(on_lb1 > 0.0 && on_lb1 < LONG_LIVED as f64, "lb1 scheduled {on_lb1} of {LONG_LIVED}");

    // lb1 loses its link: the router's BFD notices, BGP withdraws its path, its flows hash
    // onto lb2 mid-stream, whose ring sends each to the server it was on.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (failover, (ok, failed, slow)) = std::thread::scope(|s| -> Result<_> {
        let probes = s.spawn(|| probe_while(&lab, &stop, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(500));
        lab.directors[0].set_link(false)?;
        let failover = lab.wait_next_hops(&DIRECTOR_ADDRS[1..], Duration::from_secs(20));
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let probes = probes.join().map_err(|_| anyhow::anyhow!("the probe thread panicked"))?;
        Ok((failover?, probes))
    })?;
    println!(
        "failover: the router dropped lb1 {} ms after its link went down; new connections meanwhile: \
         {ok} answered, {failed} failed, {slow} took over a second",
        failover.as_millis()
    );
    ensure!(conv.wait_rounds(5, Duration::from_secs(10)), "connections broke with lb1: {:?}", conv.stop());
    let on_lb2 = lab.directors[1].metrics()?;
    ensure!(
        on_lb2.value("lb_xdp_actions_total{action=\"tx\"}")? > 0.0,
        "lb2 forwarded nothing:\n{}",
        on_lb2.0
    );

    // lb1 comes back: its checks find the servers up, it announces the VIP again, and the
    // flows that hash to it return to it, to the same servers.
    lab.directors[0].set_link(true)?;
    let back = lab.wait_next_hops(&DIRECTOR_ADDRS, Duration::from_secs(60))?;
    println!("lb1 back as a next hop {} ms after its link came up", back.as_millis());
    let tx_lb1 = |lab: &TwoDirectors| -> Result<f64> {
        lab.directors[0].metrics()?.value("lb_xdp_actions_total{action=\"tx\"}")
    };
    let lb1_before = tx_lb1(&lab)?;
    ensure!(
        conv.wait_rounds(10, Duration::from_secs(15)),
        "connections broke when lb1 came back: {:?}",
        conv.stop()
    );
    ensure!(tx_lb1(&lab)? > lb1_before, "no flow returned to lb1");

    ensure!(failed == 0, "{failed} new connections failed during the failover");
    all_exchanged(lab, echo, conv)
}

#[test]
fn a_director_without_a_live_server_withdraws_and_the_other_carries_everything() -> Result<()> {
    let lab = TwoDirectors::start(Redundancy::Ecmp, SERVERS, SOURCES, false, false)?;
    // lb1's checks cannot reach any server (its own packets to port 80 are dropped; the
    // data path is XDP and unaffected): it sees every server down.
    let lb1 = &lab.directors[0];
    let rules = "table ip lbtest {\n  chain out {\n    type filter hook output priority 0; policy accept;\n    \
                 tcp dport 80 drop\n  }\n}\n";
    let rules_path = lb1.workdir.join("block-checks.nft");
    std::fs::write(&rules_path, rules)?;
    lb1.ns.exec(&["nft", "-f", &rules_path.to_string_lossy()]).context("nft (apt package nftables)")?;
    let withdrawn = lab.wait_next_hops(&DIRECTOR_ADDRS[1..], Duration::from_secs(20))?;
    ensure!(
        !lb1.ns.ip(&["route", "show", "table", "200"])?.contains(&VIP.to_string()),
        "lb1 still publishes the VIP"
    );
    let before = lab.scheduled("web")?;
    let answers = lab.connect_all(ROUNDS)?;
    sticky(&answers)?;
    let after = lab.scheduled("web")?;
    ensure!(after[0] == before[0], "lb1 took connections while withdrawn: {before:?} -> {after:?}");
    ensure!(after[1] - before[1] == (SOURCES * ROUNDS) as f64, "{before:?} -> {after:?}");
    println!("lb1 withdrawn {} ms after its checks were blocked", withdrawn.as_millis());

    // Checks pass again: lb1 announces the VIP and takes its share.
    lb1.ns.exec(&["nft", "delete", "table", "ip", "lbtest"])?;
    lab.wait_next_hops(&DIRECTOR_ADDRS, Duration::from_secs(60))?;
    let answers = lab.connect_all(ROUNDS)?;
    if let Err(e) = sticky(&answers) {
        for d in &lab.directors {
            eprintln!("{}\n{}", d.daemon.status()?, d.daemon.log_text());
        }
        return Err(e);
    }
    let again = lab.scheduled("web")?;
    ensure!(again[0] > after[0] && again[1] > after[1], "{after:?} -> {again:?}");
    Ok(())
}

/// Packets director `i` balanced for `service`.
fn balanced(lab: &TwoDirectors, i: usize, service: &str) -> Result<f64> {
    lab.directors[i].metrics()?.value(&format!("lb_service_packets_total{{service=\"{service}\"}}"))
}

#[test]
fn with_keepalived_moving_the_vip_the_standby_forwards_nothing_and_flows_survive_failover() -> Result<()> {
    let mut lab = TwoDirectors::start(Redundancy::Vrrp, SERVERS, 25, false, true)?;
    let (echo, conv) = converse(&lab)?;
    ensure!(conv.wait_rounds(5, Duration::from_secs(10)), "the connections did not start exchanging");
    // Only the master sees the VIP's frames: the standby's XDP program balanced none.
    ensure!(balanced(&lab, 0, "echo")? > 0.0);
    ensure!(balanced(&lab, 1, "echo")? == 0.0, "the standby forwarded VIP traffic");

    // The master's keepalived stops (as for maintenance): lb2 takes the VIP, the router
    // learns its MAC from the gratuitous ARP, the flows move mid-stream to lb2, whose
    // ring sends each to the server it was on.
    lab.directors[0].stop_peer();
    let failover = lab.wait_master(1, Duration::from_secs(10))?;
    ensure!(
        conv.wait_rounds(10, Duration::from_secs(15)),
        "connections broke in the failover: {:?}",
        conv.stop()
    );
    let on_lb1 = balanced(&lab, 0, "echo")?;
    ensure!(balanced(&lab, 1, "echo")? > 0.0, "lb2 took no traffic");
    ensure!(conv.wait_rounds(5, Duration::from_secs(10)), "{:?}", conv.stop());
    ensure!(balanced(&lab, 0, "echo")? == on_lb1, "lb1 still forwards as the standby");

    // lb1 back: its higher priority takes the VIP again, and the flows follow.
    lab.directors[0].start_peer()?;
    let failback = lab.wait_master(0, Duration::from_secs(20))?;
    ensure!(
        conv.wait_rounds(10, Duration::from_secs(15)),
        "connections broke in the failback: {:?}",
        conv.stop()
    );
    ensure!(balanced(&lab, 0, "echo")? > on_lb1, "the flows did not return to lb1");
    println!(
        "VRRP: lb2 held the VIP {} ms after lb1's keepalived stopped; lb1 took it back {} ms after it started",
        failover.as_millis(),
        failback.as_millis()
    );

    all_exchanged(lab, echo, conv)
}
