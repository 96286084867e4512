//! End to end, the daemon as operators run it: long-lived connections through SIGHUP
//! reloads, a refused file, `kill -9` and a restart; and metrics that count exactly the
//! packets sent. Needs root.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use lb_tests::lab::{DrLab, LabConfig, VIP_PORT};
use lb_tests::tcp::{Conversations, EchoServer};
use lb_tests::topology::VIP;

const ECHO_PORT: u16 = 7000;
const CONNECTIONS: usize = 50;
const RELOADS: usize = 50;
const SERVERS: usize = 3;

fn servers() -> Vec<IpAddr> {
    (0..SERVERS).map(|i| IpAddr::from([10, 0, 2, 11 + i as u8])).collect()
}

/// The echo service with these weights, the name service, and when `extra` is given one
/// more service on its own VIP (192.0.2.20 + extra). `web_first` lists the name service
/// first: a fresh daemon would then number the services differently.
fn services_in_order(weights: [u32; SERVERS], extra: Option<u8>, web_first: bool) -> String {
    let mut echo = format!("  - name: echo\n    match: {{ vip: {VIP}, port: {ECHO_PORT} }}\n    backends:\n");
    for (addr, w) in servers().iter().zip(weights) {
        echo.push_str(&format!("      - {{ address: {addr}, weight: {w} }}\n"));
    }
    let mut web = format!("  - name: web\n    match: {{ vip: {VIP}, port: {VIP_PORT} }}\n    backends:\n");
    for addr in servers().iter().rev() {
        web.push_str(&format!("      - {{ address: {addr} }}\n"));
    }
    let mut y = String::from("services:\n");
    if web_first {
        y.push_str(&web);
        y.push_str(&echo);
    } else {
        y.push_str(&echo);
        y.push_str(&web);
    }
    if let Some(n) = extra {
        y.push_str(&format!(
            "  - name: extra{n}\n    match: {{ vip: 192.0.2.{}, port: {VIP_PORT} }}\n    scheduler: mh\n    backends:\n",
            20 + n
        ));
        for addr in servers() {
            y.push_str(&format!("      - {{ address: {addr} }}\n"));
        }
    }
    y
}

fn services(weights: [u32; SERVERS], extra: Option<u8>) -> String {
    services_in_order(weights, extra, false)
}

/// The services and backends of a status table without the connection counts, which
/// move on their own.
fn shape(status: &str) -> Vec<String> {
    status
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            match cols.first() {
                Some(&"->") if cols.len() == 7 && cols[1] != "RemoteAddress:Port" => {
                    Some(format!("{} {} {} {}", cols[1], cols[2], cols[3], cols[6]))
                }
                Some(&("TCP" | "UDP" | "FWM")) => Some(l.to_owned()),
                _ => None,
            }
        })
        .collect()
}

fn sum_series(metrics: &lb_tests::daemon::Metrics, prefix: &str) -> f64 {
    metrics
        .0
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn long_lived_connections_survive_reloads_a_refused_file_and_kill_9() -> Result<()> {
    let mut lab = DrLab::start_with(SERVERS, 10, LabConfig::Services(services([1, 1, 1], None)))?;
    let echo = EchoServer::on_each(&lab.topo.servers, ECHO_PORT)?;
    let sources: Vec<IpAddr> = lab.topo.client_addrs.iter().map(|a| IpAddr::V4(*a)).collect();
    let conv = Conversations::start(
        &lab.topo.client,
        sources,
        (VIP, ECHO_PORT).into(),
        CONNECTIONS,
        Duration::from_millis(100),
        5_000,
    )?;
    ensure!(conv.wait_rounds(3, Duration::from_secs(10)), "the connections did not start exchanging");

    // Weights change on every reload, and a service comes and goes on every other one.
    for i in 0..RELOADS {
        let weights = [1 + (i % 5) as u32, 1 + ((i + 2) % 7) as u32, 1 + ((i + 4) % 3) as u32];
        let extra = (i % 2 == 0).then_some(i as u8);
        lab.write_services(&services(weights, extra))?;
        ensure!(lab.reload()?, "reload {i} failed:\n{}", lab.daemon.log_text());
        if let Some(n) = extra
            && i % 10 == 0
        {
            let vip: SocketAddr = (IpAddr::from([192, 0, 2, 20 + n]), VIP_PORT).into();
            let answer = lab.connect(vip).with_context(|| format!("the service added by reload {i}"))?;
            ensure!(answer.starts_with("server"), "{vip} answered {answer:?}");
        }
        ensure!(!conv.finished(), "the connections broke at reload {i}: {:?}", conv.stop());
    }
    ensure!(conv.wait_rounds(2, Duration::from_secs(10)), "no exchange after the reloads: {:?}", conv.stop());

    // A refused file changes nothing and is counted.
    let before = lab.metrics()?;
    let status_before = lab.daemon.status()?;
    lab.write_raw_config(
        "director:\n  interfaces: [ext0]\nservices:\n  - name: echo\n    match: { vip: 192.0.2.300 }\n",
    )?;
    ensure!(!lab.reload()?, "an invalid file was accepted");
    let after = lab.metrics()?;
    let failures = after.value("lb_config_reloads_total{result=\"failure\"}")?;
    ensure!(failures == before.value("lb_config_reloads_total{result=\"failure\"}")? + 1.0);
    ensure!(failures == 1.0);
    // So is a valid file naming an interface this host lacks: refused before any write.
    lab.write_services(&services([9, 9, 9], Some(99)))?;
    let path = lab.config_path()?;
    let text = std::fs::read_to_string(&path)?.replace("interfaces: [ext0]", "interfaces: [ext0, ext9]");
    lab.write_raw_config(&text)?;
    ensure!(!lab.reload()?, "a missing interface was accepted");
    ensure!(lab.daemon.status()?.contains("interface ext9 (director.interfaces) does not exist"));
    let status_after = lab.daemon.status()?;
    ensure!(status_after.contains("last reload FAILED"), "{status_after}");
    ensure!(
        shape(&status_before) == shape(&status_after),
        "a refused reload changed the services:\n{status_before}\n{status_after}"
    );
    ensure!(
        conv.wait_rounds(2, Duration::from_secs(10)),
        "no exchange after the refused reload: {:?}",
        conv.stop()
    );

    // kill -9: the pinned data path keeps forwarding without any daemon.
    lab.daemon.kill9()?;
    ensure!(
        conv.wait_rounds(5, Duration::from_secs(10)),
        "connections stopped with the daemon: {:?}",
        conv.stop()
    );
    // The restarted daemon reads a file in another order: only the ids it adopts from the
    // maps keep the connection table's entries meaning the same service and server.
    lab.write_services(&services_in_order([1, 1, 1], None, true))?;
    lab.daemon.restart(&lab.topo.director)?;
    ensure!(lab.daemon.log_text().contains("adopted the running data path"), "{}", lab.daemon.log_text());
    ensure!(
        conv.wait_rounds(5, Duration::from_secs(10)),
        "connections broke over the restart: {:?}",
        conv.stop()
    );

    let metrics = lab.fresh_metrics()?;
    let active = sum_series(&metrics, "lb_backend_active_connections{backend=");
    let report = conv.stop()?;
    ensure!(report.connections == CONNECTIONS);
    ensure!(report.exchanges == report.rounds * CONNECTIONS as u64, "{report:?}");
    ensure!(report.rounds >= 20, "{report:?}");
    // The echo connections, as the adopted connection table still knows them.
    ensure!(active >= CONNECTIONS as f64, "active connections {active}:\n{}", metrics.0);
    for e in echo {
        let accepted = e.stop()?;
        ensure!(accepted > 0);
    }
    let (served, _) = lab.stop_servers()?;
    ensure!(served.iter().sum::<u64>() >= 5, "the added services answered {served:?}");
    Ok(())
}

#[test]
fn metrics_count_exactly_the_packets_sent() -> Result<()> {
    const DATAGRAMS: u64 = 37;
    const PAYLOAD: usize = 100;
    let mut y = String::from(
        "services:\n  - name: udp\n    match: { vip: 192.0.2.10, port: 9000, proto: udp }\n    backends:\n",
    );
    for addr in servers() {
        y.push_str(&format!("      - {{ address: {addr} }}\n"));
    }
    let lab = DrLab::start_with(SERVERS, 1, LabConfig::Services(y))?;
    let src = IpAddr::V4(lab.topo.client_addrs[0]);
    lab.topo.client.run(move || {
        let s = UdpSocket::bind(SocketAddr::new(src, 0))?;
        for _ in 0..DATAGRAMS {
            s.send_to(&[7u8; PAYLOAD], (VIP, 9000))?;
        }
        Ok(())
    })?;
    // Counted by the XDP program before send_to returned; the scrape reads them now (and
    // walks the connection table anew).
    let m = lab.fresh_metrics()?;
    let frame = (14 + 20 + 8 + PAYLOAD) as f64;
    ensure!(m.value("lb_service_packets_total{service=\"udp\"}")? == DATAGRAMS as f64, "{}", m.0);
    ensure!(m.value("lb_service_bytes_total{service=\"udp\"}")? == DATAGRAMS as f64 * frame);
    ensure!(m.value("lb_service_connections_total{service=\"udp\"}")? == 1.0, "one flow: {}", m.0);
    ensure!(sum_series(&m, "lb_backend_packets_total{") == DATAGRAMS as f64);
    ensure!(m.value("lb_xdp_actions_total{action=\"redirect\"}")? == DATAGRAMS as f64);
    ensure!(m.value("lb_connection_table_entries")? == 1.0);

    // What lets an operator compare directors: the file's digest, as sha256sum prints it,
    // and the ring's fingerprint, the same in status and metrics.
    let path = lab.config_path()?;
    let sum = lb_tests::run("sha256sum", &[&path.to_string_lossy()])?;
    let digest = sum.split_whitespace().next().context("sha256sum printed nothing")?;
    ensure!(digest.len() == 64, "{sum}");
    let status = lab.daemon.status()?;
    ensure!(status.lines().any(|l| l == format!("config sha256 {digest}")), "{status}");
    ensure!(m.value(&format!("lb_config_info{{digest=\"{digest}\"}}"))? == 1.0, "{}", m.0);
    let fp = status
        .lines()
        .find_map(|l| l.strip_prefix("UDP  192.0.2.10:9000 sh ring 4093 fp ")?.strip_suffix(" (udp)"))
        .with_context(|| format!("no fingerprint in\n{status}"))?;
    let fp = u32::from_str_radix(fp, 16)?;
    ensure!(fp != 0, "{status}");
    ensure!(m.value("lb_service_ring_fingerprint{service=\"udp\"}")? == fp as f64, "{}", m.0);
    Ok(())
}

#[test]
fn hostile_control_clients_and_a_fifo_config_neither_block_nor_bloat_the_daemon() -> Result<()> {
    use std::io::Write as _;
    let mut lab = DrLab::start_with(SERVERS, 1, LabConfig::Services(services([1, 1, 1], None)))?;
    let socket = lab.daemon.socket_path().to_owned();
    let rss_before = lab.daemon.rss_kib()?;
    // Idle clients beyond the connection limit, and one sending 16 MB without a newline.
    let idle: Vec<std::os::unix::net::UnixStream> =
        (0..100).map(|_| std::os::unix::net::UnixStream::connect(&socket)).collect::<std::io::Result<_>>()?;
    let mut flood = std::os::unix::net::UnixStream::connect(&socket)?;
    flood.set_write_timeout(Some(Duration::from_secs(2)))?;
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    for _ in 0..16 {
        match flood.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    // The daemon reads at most one short line: it stops reading long before 16 MB.
    ensure!(sent < 16 << 20, "the daemon swallowed {sent} bytes of one request");
    // Idle connections time out and free their slots: status answers again.
    let status = lab.daemon.status()?;
    ensure!(status.contains("echo"), "status while under hostile clients:\n{status}");
    let rss_after = lab.daemon.rss_kib()?;
    ensure!(rss_after < rss_before + 8 * 1024, "the daemon grew from {rss_before} KiB to {rss_after} KiB");
    drop(idle);
    drop(flood);

    // The config path becomes a FIFO with no writer: the reload is refused at once (it
    // does not block on the open), and SIGTERM is answered.
    let path = lab.config_path()?;
    std::fs::remove_file(&path)?;
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    ensure!(!lab.reload()?, "a FIFO was accepted as a config");
    ensure!(lab.daemon.log_text().contains("is a FIFO, not a regular file"), "{}", lab.daemon.log_text());
    let st = lab.daemon.terminate()?;
    ensure!(st.success(), "lb-daemon exited with {st}");
    Ok(())
}

/// Opens up to `n` connections to `addr` without waiting for any (the listener's backlog
/// holds only so many; the rest are left pending in the kernel), and keeps them idle.
fn idle_tcp_clients(addr: std::net::SocketAddr, n: usize) -> Result<Vec<socket2::Socket>> {
    use socket2::{Domain, Socket, Type};
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        match s.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) => {}
            Err(e) => return Err(e.into()),
        }
        out.push(s);
    }
    Ok(out)
}

/// Up to `n` idle connections to a Unix socket; those the full backlog refuses are left out.
fn idle_unix_clients(path: &std::path::Path, n: usize) -> Result<(Vec<socket2::Socket>, usize)> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let addr = SockAddr::unix(path)?;
    let (mut out, mut refused) = (Vec::with_capacity(n), 0);
    for _ in 0..n {
        let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        match s.connect(&addr) {
            Ok(()) => out.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => refused += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok((out, refused))
}

/// A local user holds 5,000 idle connections to the metrics endpoint and 5,000 to the
/// control socket of a daemon under systemd's default descriptor limit (1,024). Both
/// endpoints are bounded, so the health checks keep their descriptors: a reload and a
/// health change go through while the connections are held, and no other backend changes
/// state. (Before the bounds, the metrics endpoint took every descriptor and every check
/// failed with "Too many open files", taking all backends down.)
#[test]
fn thousands_of_idle_local_clients_take_no_backend_down() -> Result<()> {
    use lb_tests::daemon::DaemonOptions;
    use lb_tests::topology::Layout;
    const IDLE: usize = 5000;
    let check = "    check: { type: tcp, interval: 300ms, timeout: 250ms, rise: 2, fall: 2 }\n";
    // Only the name service on port 80 is checked (the servers answer there).
    let web = format!("  - name: web\n    match: {{ vip: {VIP}, port: {VIP_PORT} }}\n");
    let with_check = |weights| services(weights, None).replace(&web, &format!("{web}{check}"));
    let options = DaemonOptions {
        wrapper: ["prlimit", "--nofile=1024:1024", "--"].map(String::from).to_vec(),
        env: Vec::new(),
    };
    let mut lab = DrLab::start_custom(
        Layout::default(),
        options,
        SERVERS,
        4,
        LabConfig::Services(with_check([1, 1, 1])),
    )?;
    // This process needs its own descriptors for the clients.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    ensure!(
        hard >= 2 * IDLE as u64 + 1000,
        "this test needs {} descriptors, the limit is {hard}",
        2 * IDLE + 1000
    );

    let metrics = lab.daemon.metrics;
    let idle_http = lab.topo.director.run(move || idle_tcp_clients(metrics, IDLE))?;
    let (idle_control, refused) = idle_unix_clients(lab.daemon.socket_path(), IDLE)?;
    // While they are held: a reload (new weights) and a health change (server 2's
    // service stops). Neither needs the endpoints; their effect is read afterwards.
    lab.write_services(&with_check([1, 3, 1]))?;
    lab.daemon.signal(nix::sys::signal::Signal::SIGHUP)?;
    let stopped = lab.topo.server_addrs[1].to_string();
    lab.stop_server(1)?;
    // Down after two failed checks (0.6 s); the clients then reach only the others.
    std::thread::sleep(Duration::from_secs(3));
    let answers = lab.connect_all(3).with_context(|| lab.daemon.log_text())?;
    ensure!(answers.iter().all(|(_, server)| server != "server2"), "the stopped server still got clients");
    drop(idle_http);
    drop(idle_control);

    // The endpoints answer again once the idle connections are gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let m = loop {
        match lab.metrics() {
            Ok(m) => break m,
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(e.context("metrics after the idle clients left"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    ensure!(m.value("lb_config_reloads_total{result=\"success\"}")? == 2.0, "the reload did not go through");
    for addr in &lab.topo.server_addrs {
        let a = addr.to_string();
        let changes =
            m.value(&format!("lb_health_state_changes_total{{backend=\"{a}\",service=\"web\"}}"))?;
        let want = if a == stopped { 1.0 } else { 0.0 };
        ensure!(
            changes == want,
            "backend {a} changed state {changes} times (want {want}):\n{}",
            lab.daemon.log_text()
        );
        let director_errors = m.value(&format!(
            "lb_health_checks_total{{backend=\"{a}\",result=\"director_error\",service=\"web\"}}"
        ));
        ensure!(director_errors.is_err(), "checks ran short of descriptors ({a}): {director_errors:?}");
    }
    let weight = m.value(&format!("lb_backend_weight{{backend=\"{stopped}\",service=\"echo\"}}"))?;
    ensure!(weight == 3.0, "the reloaded weight is {weight}");
    println!("{IDLE} idle connections each; the control socket's backlog refused {refused}");

    // A second daemon started by an unprivileged user says what is wrong: it may not use
    // the running daemon's socket (it used to say "Address already in use").
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(lb_tests::daemon::binary()?)
        .args(["run", "-c"])
        .arg(lab.config_path()?)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "an unprivileged second daemon started");
    ensure!(
        stderr.contains("Permission denied") && stderr.contains("run as root") && !stderr.contains("in use"),
        "unprivileged run said:\n{stderr}"
    );
    Ok(())
}

/// Fills the pinned connection table as the data path would: `n` established flows from
/// sources 10.100.x.y, each in a free way of the set its hash gives it (a flow whose set is
/// full is left out). Every flow of a set written, those already there included, is
/// stamped as seen when its set is written: a fill of millions of flows takes seconds, and
/// a stamp taken when it began could be past `FLOW_EVICTED_RECENT_NS` by the time the
/// caller's next connection evicts a flow. Returns how many were placed.
fn fill_flows(bpf_dir: &std::path::Path, n: u32) -> Result<u64> {
    use aya::maps::{Array, Map, MapData};
    use lb_common::{FLOW_ESTABLISHED, Flow, FlowKey, FlowSet, FlowTable, hash::flow_hash, maps};
    let dir = bpf_dir.join(format!("maps-v{}", lb_common::MAP_LAYOUT_VERSION));
    let open = |name: &str| -> Result<Map> { Ok(Map::from_map_data(MapData::from_pin(dir.join(name))?)?) };
    let table: FlowTable = Array::<MapData, FlowTable>::try_from(open(maps::FLOW_TABLE)?)?.get(&0, 0)?;
    let mut flows: Array<MapData, FlowSet> = Array::try_from(open(maps::FLOWS)?)?;
    let mut sets: std::collections::BTreeMap<u32, FlowSet> = std::collections::BTreeMap::new();
    let mut placed = 0;
    for i in 0..n {
        let src = u32::from_ne_bytes([10, 100, (i >> 16) as u8, (i >> 8) as u8]);
        let key = FlowKey {
            src: [src, 0, 0, 0],
            dst: [u32::from_ne_bytes(VIP.octets()), 0, 0, 0],
            sport: (i as u16).to_be(),
            dport: VIP_PORT.to_be(),
            proto: 6,
            family: lb_common::FAMILY_V4,
            _pad: 0,
        };
        let hash = flow_hash(&key, table.seed);
        let index = table.set(hash);
        let set = match sets.entry(index) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(flows.get(&index, 0)?),
        };
        if let Some(way) = set.ways.iter_mut().find(|w| w.flow.check == 0) {
            way.key = key;
            way.flow = Flow {
                backend: lb_common::MAX_BACKENDS - 1,
                check: FlowTable::check(hash),
                service: 0,
                state: FLOW_ESTABLISHED,
                service_generation: 0,
                last_seen_ns: 0,
            };
            placed += 1;
        }
    }
    for (index, mut set) in sets {
        let now = lb_daemon::snapshot::flow_clock_ns()?;
        for way in set.ways.iter_mut().filter(|w| w.flow.check != 0) {
            way.flow.last_seen_ns = now;
        }
        flows.set(index, set, 0)?;
    }
    Ok(placed)
}

/// Items 17 and 18 (the connection table's successor: a set-associative table read as
/// memory). A half-filled table shows its entries and capacity; a full one of flows seen
/// just now shows, once a new connection takes a way, a recent flow evicted (what the
/// alert on a too-small table reads). Then, with the table at about a million entries,
/// four scrapes run while a reload and a health change go through, and every one of them
/// answers with the table: the walk runs outside the daemon's lock. (It used to take
/// seconds under the LRU map, so that the scrapes answered after the reload; a memory
/// walk of a million flows does not, and the order is no longer asserted.)
#[test]
fn a_full_connection_table_walked_by_four_scrapes_stalls_neither_reload_nor_health() -> Result<()> {
    const TABLE: u32 = 1 << 20;
    let check = "    check: { type: tcp, interval: 100ms, timeout: 90ms, rise: 1, fall: 1 }\n";
    let web = format!("  - name: web\n    match: {{ vip: {VIP}, port: {VIP_PORT} }}\n");
    let with_check = |weights| services(weights, None).replace(&web, &format!("{web}{check}"));
    let config = LabConfig::SizedServices { services: with_check([1, 1, 1]), connection_table_size: TABLE };
    let mut lab = DrLab::start_with(SERVERS, 4, config)?;
    let half = fill_flows(lab.bpf_dir(), TABLE / 2)?;
    let m = lab.fresh_metrics()?;
    let (entries, capacity) =
        (m.value("lb_connection_table_entries")?, m.value("lb_connection_table_capacity")?);
    ensure!(capacity == TABLE as f64, "capacity {capacity}, want {TABLE}");
    // A few sets overflow at half the capacity; the rest of the table is the lab's own.
    ensure!(
        entries >= half as f64 && entries <= half as f64 + 64.0 && half > u64::from(TABLE / 2) * 9 / 10,
        "{entries} entries after placing {half}"
    );
    ensure!(m.value("lb_connection_table_evicted_recent_total")? == 0.0, "an eviction in a half-full table");
    // Every way taken by a flow seen just now: the next connection evicts one of them.
    fill_flows(lab.bpf_dir(), TABLE * 4)?;
    lab.connect_all(1)?;
    let evicted = lab.fresh_metrics()?.value("lb_connection_table_evicted_recent_total")?;
    ensure!(evicted >= 1.0, "no recent flow evicted by a new connection into a full table");

    std::thread::sleep(lb_daemon::control::CONN_COUNT_TTL);
    let ns = lab.topo.director.name().to_owned();
    let metrics = lab.daemon.metrics;
    let scrapes: Vec<_> = (0..4)
        .map(|_| {
            let ns = ns.clone();
            std::thread::spawn(move || -> Result<String> {
                lb_tests::enter(&ns)?;
                use std::io::{Read as _, Write as _};
                let mut s = std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })
        })
        .collect();
    // Give the scrapes time to start their walk, then reload and stop server 2's service.
    std::thread::sleep(Duration::from_millis(100));
    lab.write_services(&with_check([1, 2, 1]))?;
    lab.daemon.signal(nix::sys::signal::Signal::SIGHUP)?;
    let stopped = lab.topo.server_addrs[1].to_string();
    lab.stop_server(1)?;
    let log_has = |needle: &str| lab.daemon.log_text().lines().any(|l| l.contains(needle));
    let (mut reloaded, mut changed) = (false, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !(reloaded && changed) && std::time::Instant::now() < deadline {
        reloaded |= log_has("configuration reloaded");
        changed |= log_has(&format!("backend={stopped} from=\"up\" to=\"down\""));
        std::thread::sleep(Duration::from_millis(5));
    }
    for s in scrapes {
        let text = s.join().map_err(|_| anyhow::anyhow!("a scrape thread panicked"))??;
        ensure!(text.starts_with("HTTP/1.1 200"), "scrape: {}", text.lines().next().unwrap_or(""));
        ensure!(text.contains("lb_connection_table_entries "), "scrape without the table");
    }
    let log = lab.daemon.log_text();
    ensure!(reloaded, "no reload:\n{log}");
    ensure!(changed, "no health change:\n{log}");
    let entries = lab.metrics()?.value("lb_connection_table_entries")?;
    ensure!(entries >= f64::from(TABLE) * 0.9, "the table holds {entries} entries");
    Ok(())
}
