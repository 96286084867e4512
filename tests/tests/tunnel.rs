//! Tunnel forwarding. Through `BPF_PROG_TEST_RUN`: a service's packet leaves inside an
//! outer IPv4 or IPv6 header from the director's tunnel source to the backend, byte for
//! byte as an independent builder makes it, and the decapsulator turns it back into the
//! packet the client sent; a packet too big for the way is answered. End to end: real
//! servers on another subnet behind a router, decapsulating with `lb-daemon decap`.

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::{Context as _, Result, ensure};
use lb_daemon::dataplane::decap::Decapsulator;
use lb_daemon::dataplane::{Dataplane, LoadOptions};
use lb_daemon::model::{Neighbour, addr_words};
use lb_daemon::plan::Planner;
use lb_ebpf::parse::TCP_SYN;
use lb_ebpf::testpkt::{self, Ipv4Opts, Ipv6Opts, L4, in_ipv4, in_ipv6, tagged};
use lb_tests::NetNs;
use lb_tests::fixture::{XDP_PASS, XDP_TX, tcp_service, test_run, timed_run_xdp, tunnelled, with_macs};
use lb_tests::lab::{DrLab, LabConfig, tunnel_service};
use lb_tests::tcp::EchoServer;
use lb_tests::topology::{Layout, ServerPath, VIP, server_addr};

const DIRECTOR_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0];
const SOURCE4: [u8; 4] = [10, 1, 0, 1];
const SOURCE6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

fn v6(last: u8) -> [u8; 16] {
    let mut a = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    a[15] = last;
    a
}

/// The frame a tunnel backend should receive: `inner`'s packet in an outer header, with
/// the backend's MAC and the director's, and its VLAN tag if it has one.
fn expected(outer: Vec<u8>, backend_mac: [u8; 6], vlan: u16) -> Vec<u8> {
    let f = with_macs(&outer, backend_mac, DIRECTOR_MAC);
    if vlan != 0 { tagged(&f, vlan) } else { f }
}

#[test]
fn a_tunnel_service_sends_its_packets_inside_an_outer_header_the_decapsulator_removes() -> Result<()> {
    let ns = NetNs::new("tn")?;
    ns.run(|| {
        let mut dp =
            Dataplane::load(&LoadOptions { ring_slots: 8 * 4093, flow_entries: 1024, pin_dir: None })?;
        let backends4: Vec<IpAddr> = vec![IpAddr::from([10, 1, 0, 11])];
        let backends6: Vec<IpAddr> = vec![IpAddr::from(v6(11))];
        let tagged_backends: Vec<IpAddr> = vec![IpAddr::from([10, 1, 0, 21])];
        // All on loopback (ifindex 1, which BPF_PROG_TEST_RUN's ingress is): XDP_TX.
        let neighbour = |last: u8, vlan: u16| Neighbour {
            mac: [2, 0, 0, 0, 2, last],
            ifindex: 1,
            if_mac: DIRECTOR_MAC,
            vlan,
            mtu: 0,
        };
        let neighbours: HashMap<IpAddr, Neighbour> = [
            (backends4[0], neighbour(11, 0)),
            (backends6[0], neighbour(12, 0)),
            (tagged_backends[0], neighbour(21, 100)),
        ]
        .into();
        let mut services = vec![
            tcp_service("v4", "192.0.2.10".parse()?, 80, 4093, &backends4),
            tcp_service("v6", IpAddr::from(v6(0x10)), 80, 4093, &backends6),
            tcp_service("v4-in-v6", "192.0.2.11".parse()?, 80, 4093, &backends6),
            tcp_service("tagged", "192.0.2.12".parse()?, 80, 4093, &tagged_backends),
            tcp_service("v6-in-v4", IpAddr::from(v6(0x11)), 80, 4093, &backends4),
        ];
        for s in &mut services {
            tunnelled(s);
        }
        let mut plan = Planner::default().plan(&services, &[], &neighbours)?;
        plan.state.tunnel_source_v4 = addr_words(IpAddr::from(SOURCE4)).1[0];
        plan.state.tunnel_source_v6 = addr_words(IpAddr::from(SOURCE6)).1;
        dp.apply(&plan.state)?;

        let syn4 = |vip: [u8; 4]| {
            testpkt::ipv4([198, 51, 100, 7], vip, L4::tcp(40000, 80, TCP_SYN), Ipv4Opts::default())
        };
        let syn6 = testpkt::ipv6(v6(0x77), v6(0x10), L4::tcp(40000, 80, TCP_SYN), Ipv6Opts::default());
        let syn6_to_11 = testpkt::ipv6(v6(0x77), v6(0x11), L4::tcp(40000, 80, TCP_SYN), Ipv6Opts::default());
        let tagged_in = testpkt::ipv4(
            [198, 51, 100, 8],
            [192, 0, 2, 12],
            L4::tcp(40001, 80, TCP_SYN),
            Ipv4Opts { vlan: Some(7), ..Ipv4Opts::default() },
        );
        let untagged_in = {
            let mut f = tagged_in[..12].to_vec();
            f.extend_from_slice(&tagged_in[16..]);
            f
        };
        let mac = |a: IpAddr| neighbours[&a].mac;
        // (what, input, inner packet as a frame, expected output)
        type Row = (&'static str, Vec<u8>, Vec<u8>, Vec<u8>);
        let rows: Vec<Row> = vec![
            (
                "IPv4 in IPv4",
                syn4([192, 0, 2, 10]),
                syn4([192, 0, 2, 10]),
                expected(in_ipv4(&syn4([192, 0, 2, 10]), SOURCE4, [10, 1, 0, 11], 0), mac(backends4[0]), 0),
            ),
            (
                "IPv6 in IPv6",
                syn6.clone(),
                syn6.clone(),
                expected(in_ipv6(&syn6, SOURCE6, v6(11)), mac(backends6[0]), 0),
            ),
            (
                "IPv4 in IPv6",
                syn4([192, 0, 2, 11]),
                syn4([192, 0, 2, 11]),
                expected(in_ipv6(&syn4([192, 0, 2, 11]), SOURCE6, v6(11)), mac(backends6[0]), 0),
            ),
            (
                "IPv6 in IPv4",
                syn6_to_11.clone(),
                syn6_to_11.clone(),
                expected(in_ipv4(&syn6_to_11, SOURCE4, [10, 1, 0, 11], 0), mac(backends4[0]), 0),
            ),
            (
                "a tagged client frame to a backend behind VLAN 100",
                tagged_in.clone(),
                untagged_in.clone(),
                expected(in_ipv4(&untagged_in, SOURCE4, [10, 1, 0, 21], 0), mac(tagged_backends[0]), 100),
            ),
        ];
        let mut decap = Decapsulator::load(None)?;
        decap.add_local_addrs(&[backends4[0], backends6[0], tagged_backends[0]])?;
        for (what, input, inner, want) in rows {
            let (action, out) = test_run(&dp, &input)?;
            ensure!(action == XDP_TX, "{what}: action {action}");
            ensure!(out == want, "{what}: got\n{out:02x?}\nwant\n{want:02x?}");
            // What the real server's decapsulator makes of it: the client's packet, with
            // the MACs (and tag) it arrived with.
            let (action, back, _) = timed_run_xdp(decap.program()?, "lb_decap", &out, 1)?;
            ensure!(action == XDP_PASS, "{what}: decap action {action}");
            let l2 = if back.len() > 14 && back[12..14] == [0x81, 0x00] { 18 } else { 14 };
            ensure!(
                back[l2 - 2..] == inner[12..],
                "{what}: decapsulated\n{back:02x?}\nclient sent\n{inner:02x?}"
            );
        }
        Ok(())
    })
}

#[test]
fn a_tunnel_backend_without_a_tunnel_source_is_dropped_and_counted() -> Result<()> {
    let ns = NetNs::new("tz")?;
    ns.run(|| {
        let mut dp =
            Dataplane::load(&LoadOptions { ring_slots: 2 * 4093, flow_entries: 1024, pin_dir: None })?;
        let backend = IpAddr::from([10, 1, 0, 11]);
        let n = Neighbour { mac: [2, 0, 0, 0, 2, 11], ifindex: 1, if_mac: DIRECTOR_MAC, vlan: 0, mtu: 0 };
        let mut svc = tcp_service("v4", "192.0.2.10".parse()?, 80, 4093, &[backend]);
        tunnelled(&mut svc);
        let plan = Planner::default().plan(&[svc], &[], &[(backend, n)].into())?;
        dp.apply(&plan.state)?;
        let syn = testpkt::ipv4(
            [198, 51, 100, 7],
            [192, 0, 2, 10],
            L4::tcp(40000, 80, TCP_SYN),
            Ipv4Opts::default(),
        );
        let before = dp.global_counters()?[lb_common::stat::DROP_BACKEND_INVALID as usize];
        let (action, _) = test_run(&dp, &syn)?;
        ensure!(action == lb_tests::fixture::XDP_DROP, "action {action}");
        let after = dp.global_counters()?[lb_common::stat::DROP_BACKEND_INVALID as usize];
        ensure!(after == before + 1, "counted {before} -> {after}");
        Ok(())
    })
    .context("tunnel without a source")
}

/// What the director answers a client whose packet does not fit the tunnel: an ICMP error
/// from the VIP, built independently here, with the Ethernet addresses of the client's
/// frame swapped. IPv4 answers carry the precedence of network control and IP id 0.
fn too_big_answer(client_frame: &[u8], answer: Vec<u8>, v6: bool) -> Vec<u8> {
    let mut f = answer;
    f[..6].copy_from_slice(&client_frame[6..12]);
    f[6..12].copy_from_slice(&client_frame[..6]);
    if !v6 {
        f[15] = 0xc0;
        f[18..20].copy_from_slice(&[0, 0]);
        testpkt::fix_ipv4_checksum(&mut f, 14);
    }
    f
}

#[test]
fn a_packet_too_big_for_the_tunnel_is_answered_with_the_mtu_the_client_can_use() -> Result<()> {
    let ns = NetNs::new("tb")?;
    ns.run(|| {
        let mut dp =
            Dataplane::load(&LoadOptions { ring_slots: 8 * 4093, flow_entries: 1024, pin_dir: None })?;
        let (b4, b6) = (IpAddr::from([10, 1, 0, 11]), IpAddr::from(v6(11)));
        // The way to both backends has an MTU of 1500 (a route's, as the daemon finds it).
        let n = |last: u8| Neighbour {
            mac: [2, 0, 0, 0, 2, last],
            ifindex: 1,
            if_mac: DIRECTOR_MAC,
            vlan: 0,
            mtu: 1500,
        };
        let neighbours: HashMap<IpAddr, Neighbour> = [(b4, n(11)), (b6, n(12))].into();
        let mut services = vec![
            tcp_service("v4", "192.0.2.10".parse()?, 80, 4093, &[b4]),
            tcp_service("v6", IpAddr::from(v6(0x10)), 80, 4093, &[b6]),
            tcp_service("v4-in-v6", "192.0.2.11".parse()?, 80, 4093, &[b6]),
        ];
        services.iter_mut().for_each(tunnelled);
        let mut plan = Planner::default().plan(&services, &[], &neighbours)?;
        plan.state.tunnel_source_v4 = addr_words(IpAddr::from(SOURCE4)).1[0];
        plan.state.tunnel_source_v6 = addr_words(IpAddr::from(SOURCE6)).1;
        dp.apply(&plan.state)?;

        const DF: u16 = 0x4000;
        let client = [198, 51, 100, 7];
        let seg4 = |vip: [u8; 4], payload: usize, frag: u16| {
            let tcp = L4::Tcp { sport: 40000, dport: 80, flags: lb_ebpf::parse::TCP_ACK, payload };
            testpkt::ipv4(client, vip, tcp, Ipv4Opts { frag, ..Ipv4Opts::default() })
        };
        let seg6 = |payload: usize| {
            let tcp = L4::Tcp { sport: 40000, dport: 80, flags: lb_ebpf::parse::TCP_ACK, payload };
            testpkt::ipv6(v6(0x77), v6(0x10), tcp, Ipv6Opts::default())
        };
        // 1500-byte packets: 20 (IPv4) or 40 (IPv6) bytes of outer header too many.
        let big4 = seg4([192, 0, 2, 10], 1460, DF);
        let big4_in_6 = seg4([192, 0, 2, 11], 1460, DF);
        let big6 = seg6(1440);
        let rows = [
            (
                "IPv4 with DF: fragmentation needed, next-hop MTU 1480",
                &big4,
                too_big_answer(
                    &big4,
                    testpkt::icmp4_error([192, 0, 2, 10], client, 3, 4, 1480, &big4[14..], 64),
                    false,
                ),
                lb_common::stat::TOO_BIG_SENT_V4,
            ),
            (
                "IPv4 with DF inside IPv6: fragmentation needed, next-hop MTU 1460",
                &big4_in_6,
                too_big_answer(
                    &big4_in_6,
                    testpkt::icmp4_error([192, 0, 2, 11], client, 3, 4, 1460, &big4_in_6[14..], 64),
                    false,
                ),
                lb_common::stat::TOO_BIG_SENT_V4,
            ),
            (
                "IPv6: packet too big, MTU 1460",
                &big6,
                too_big_answer(
                    &big6,
                    testpkt::icmp6_error(v6(0x10), v6(0x77), 2, 0, 1460, &big6[14..], 128),
                    true,
                ),
                lb_common::stat::TOO_BIG_SENT_V6,
            ),
        ];
        for (what, input, want, counter) in rows {
            let before = dp.global_counters()?[counter as usize];
            let (action, out) = test_run(&dp, input)?;
            ensure!(action == XDP_TX, "{what}: action {action}");
            ensure!(out == want, "{what}: got\n{out:02x?}\nwant\n{want:02x?}");
            let after = dp.global_counters()?[counter as usize];
            ensure!(after == before + 1, "{what}: counted {before} -> {after}");
        }

        // A packet that just fits goes through the tunnel; one without DF that does not is
        // dropped and counted (fragmenting it would leave the decapsulator pieces).
        let fits = seg4([192, 0, 2, 10], 1440, DF);
        let (action, out) = test_run(&dp, &fits)?;
        ensure!(
            action == XDP_TX && out.len() == fits.len() + 20,
            "1480 bytes: action {action}, {} bytes",
            out.len()
        );
        let before = dp.global_counters()?[lb_common::stat::DROP_TOO_BIG as usize];
        let (action, _) = test_run(&dp, &seg4([192, 0, 2, 10], 1460, 0))?;
        ensure!(action == lb_tests::fixture::XDP_DROP, "no DF: action {action}");
        let after = dp.global_counters()?[lb_common::stat::DROP_TOO_BIG as usize];
        ensure!(after == before + 1, "no DF: counted {before} -> {after}");
        Ok(())
    })
    .context("too big for the tunnel")
}

/// The size of the end-to-end upload: far more than any socket buffer, so that the
/// client's TCP must adapt to the too-big answers to finish it.
const UPLOAD_BYTES: usize = 10 << 20;
const UPLOAD_PORT: u16 = 7000;

#[test]
fn servers_behind_a_router_get_sticky_tunnelled_flows_a_big_upload_and_fragmented_datagrams() -> Result<()> {
    let path = ServerPath::Routed;
    let servers: Vec<IpAddr> = (0..3).map(|i| IpAddr::V4(server_addr(path, i))).collect();
    let services = format!(
        "services:\n{}{}{}",
        tunnel_service("web", 80, "sh", &servers),
        tunnel_service("upload", UPLOAD_PORT, "mh", &servers),
        tunnel_service("datagrams", DATAGRAM_PORT, "mh", &servers).replace("proto: tcp", "proto: udp"),
    );
    let layout = Layout { server_path: path, ..Layout::default() };
    let lab = DrLab::start_on(layout, servers.len(), 30, LabConfig::Services(services))?;
    let status = lab.daemon.status()?;
    ensure!(status.matches(" Tunnel ").count() == 3 * servers.len(), "{status}");

    // 300 connections from 30 sources: each source sticks to one server, all get a share.
    let answers =
        lab.connect_all(10).with_context(|| format!("connecting to the VIP\n{}", lab.daemon.log_text()))?;
    ensure!(answers.len() == 300, "{} answers", answers.len());
    let mut by_source: HashMap<IpAddr, std::collections::BTreeSet<String>> = HashMap::new();
    for (src, server) in &answers {
        by_source.entry(*src).or_default().insert(server.clone());
    }
    ensure!(by_source.values().all(|s| s.len() == 1), "a source moved between servers: {by_source:?}");
    let used: std::collections::BTreeSet<&String> = by_source.values().flatten().collect();
    ensure!(used.len() == servers.len(), "servers used: {used:?}");

    // 10 MB through a way whose MTU (1500) leaves no room for the outer header of the
    // client's full-sized segments: they come back as "fragmentation needed", the client
    // lowers its path MTU to the VIP, and every byte arrives (echoed back to check).
    let echo = EchoServer::on_each(&lab.topo.servers, UPLOAD_PORT)?;
    let src = IpAddr::V4(lab.topo.client_addrs[0]);
    let echoed = lab
        .topo
        .client
        .run(move || upload(src, std::net::SocketAddr::from((VIP, UPLOAD_PORT))))
        .with_context(|| {
            let m = lab.metrics().ok();
            let v = |k: &str| m.as_ref().and_then(|m| m.value(k).ok());
            format!(
                "uploading\n{}\ntoo big sent {:?}, dropped too big {:?}, route {:?}",
                lab.daemon.status().unwrap_or_default(),
                v("lb_xdp_too_big_sent_total{family=\"ipv4\"}"),
                v("lb_xdp_drops_total{reason=\"too_big\"}"),
                lab.topo.client.ip(&["route", "get", &VIP.to_string()]),
            )
        })?;
    ensure!(echoed == UPLOAD_BYTES, "echoed {echoed} of {UPLOAD_BYTES} bytes");
    let sent = lab.metrics()?.value("lb_xdp_too_big_sent_total{family=\"ipv4\"}")?;
    ensure!(sent >= 1.0, "no too-big answer counted");
    for e in echo {
        e.stop()?;
    }

    // UDP datagrams of 3,000 bytes, fragmented by the clients' kernel (their route to the
    // VIPs allows 1,400-byte packets, which fit the tunnel): each real server's kernel
    // reassembles them and says how long the datagram was and who it is.
    let responders = servers_answering_datagrams(&lab.topo.servers)?;
    lab.topo.client.ip(&["route", "replace", "192.0.2.0/24", "via", "10.0.1.1", "mtu", "1400"])?;
    let sources: Vec<IpAddr> = lab.topo.client_addrs.iter().take(10).map(|a| IpAddr::V4(*a)).collect();
    let answers = lab
        .topo
        .client
        .run(move || {
            let mut answers = Vec::new();
            for src in sources {
                let s = std::net::UdpSocket::bind((src, 0))?;
                s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
                s.connect((VIP, DATAGRAM_PORT))?;
                for _ in 0..3 {
                    s.send(&[7u8; DATAGRAM_BYTES])?;
                    let mut buf = [0u8; 64];
                    let n = s.recv(&mut buf).context("no answer to a fragmented datagram")?;
                    answers.push((src, String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
            }
            Ok(answers)
        })
        .with_context(|| {
            let m = lab.metrics().map(|m| m.0).unwrap_or_default();
            let lines: Vec<&str> = m
                .lines()
                .filter(|l| l.starts_with("lb_xdp_") && !l.ends_with(" 0") && !l.contains("bucket"))
                .collect();
            let nstat: Vec<String> = lab
                .topo
                .servers
                .iter()
                .map(|ns| {
                    ns.exec(&[
                        "nstat",
                        "-az",
                        "IpReasm*",
                        "UdpIn*",
                        "UdpNoPorts",
                        "IpInDelivers",
                        "IpInAddrErrors",
                        "IpInDiscards",
                    ])
                    .unwrap_or_default()
                })
                .collect();
            format!("fragmented datagrams\n{}\n{}", lines.join("\n"), nstat.join("\n"))
        })?;
    drop(responders);
    let mut by_socket: HashMap<IpAddr, std::collections::BTreeSet<String>> = HashMap::new();
    for (src, answer) in &answers {
        let (server, len) = answer.split_once(' ').context("answer")?;
        ensure!(len == DATAGRAM_BYTES.to_string(), "{server} got {len} bytes of {DATAGRAM_BYTES}");
        by_socket.entry(*src).or_default().insert(server.to_owned());
    }
    ensure!(
        by_socket.values().all(|s| s.len() == 1),
        "one flow's datagrams went to several servers: {by_socket:?}"
    );
    let m = lab.metrics()?;
    let (first, followed) = (
        m.value("lb_xdp_fragments_total{outcome=\"first\"}")?,
        m.value("lb_xdp_fragments_total{outcome=\"followed_first\"}")?,
    );
    ensure!(first >= 30.0 && followed >= 60.0, "fragments: {first} first, {followed} followed");

    // A kill -9 and a restart: the new daemon adopts the maps, every source still reaches
    // the server it had.
    let mut lab = lab;
    lab.daemon.kill9()?;
    lab.daemon.restart(&lab.topo.director)?;
    for (src, server) in lab.connect_all(1)? {
        ensure!(by_source[&src].contains(&server), "{src} moved to {server} across the restart");
    }
    Ok(())
}

const DATAGRAM_PORT: u16 = 5300;
const DATAGRAM_BYTES: usize = 3000;

/// A UDP responder on every real server: answers each datagram with "NAME LENGTH".
/// Stops when the returned guard drops.
fn servers_answering_datagrams(servers: &[NetNs]) -> Result<DatagramResponders> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for (i, ns) in servers.iter().enumerate() {
        // Bound to the VIP, so that answers come from it (from 0.0.0.0 they would leave
        // from the server's own address, which the client's connected socket ignores).
        let socket = ns.run(|| Ok(std::net::UdpSocket::bind((VIP, DATAGRAM_PORT))?))?;
        socket.set_read_timeout(Some(std::time::Duration::from_millis(100)))?;
        let stop = std::sync::Arc::clone(&stop);
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(format!("server{} {n}", i + 1).as_bytes(), from);
                }
            }
        }));
    }
    Ok(DatagramResponders { stop, threads })
}

struct DatagramResponders {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for DatagramResponders {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends `UPLOAD_BYTES` of a pattern to `dst` from `src` while reading the echo; returns
/// how many bytes came back equal to what was sent. Bounded by socket timeouts.
fn upload(src: IpAddr, dst: std::net::SocketAddr) -> Result<usize> {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&std::net::SocketAddr::new(src, 0).into())?;
    socket.connect_timeout(&dst.into(), std::time::Duration::from_secs(5))?;
    let stream: std::net::TcpStream = socket.into();
    let timeout = Some(std::time::Duration::from_secs(20));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let pattern = |i: usize| (i % 251) as u8;
    let mut reader = stream.try_clone()?;
    let echo = std::thread::spawn(move || -> Result<usize> {
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        while got < UPLOAD_BYTES {
            let n = reader.read(&mut buf)?;
            ensure!(n > 0, "closed after {got} bytes");
            ensure!(
                buf[..n].iter().enumerate().all(|(i, b)| *b == pattern(got + i)),
                "corrupted after {got} bytes"
            );
            got += n;
        }
        Ok(got)
    });
    let mut writer = stream;
    let mut sent = 0;
    while sent < UPLOAD_BYTES {
        let n = (UPLOAD_BYTES - sent).min(65536);
        let part: Vec<u8> = (sent..sent + n).map(pattern).collect();
        writer.write_all(&part)?;
        sent += n;
    }
    echo.join().map_err(|_| anyhow::anyhow!("the echo reader panicked"))?
}

/// The route to the servers moves to another link and gateway; the daemon follows it
/// without a reload (it watches the kernel's routes), and clients keep getting through.
#[test]
fn a_route_change_toward_tunnel_backends_is_followed_without_a_reload() -> Result<()> {
    let path = ServerPath::Routed;
    let servers: Vec<IpAddr> = (0..2).map(|i| IpAddr::V4(server_addr(path, i))).collect();
    let services = format!("services:\n{}", tunnel_service("web", 80, "sh", &servers));
    let layout = Layout { server_path: path, ..Layout::default() };
    let mut lab = DrLab::start_on(layout, servers.len(), 4, LabConfig::Services(services))?;
    ensure!(lab.connect_all(1)?.len() == 4);
    let reloads = "lb_config_reloads_total{result=\"success\"}";
    let before = lab.metrics()?.value(reloads)?;

    lab.reroute_servers()?;
    // Bounded: the daemon's periodic look would find the new way within 10 s too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let answers = loop {
        match lab.connect_all(1) {
            Ok(a) => break a,
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(e.context(format!("after the route change\n{}", lab.daemon.log_text())));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    };
    ensure!(answers.len() == 4, "{answers:?}");
    ensure!(lab.metrics()?.value(reloads)? == before, "the daemon was reloaded");
    Ok(())
}

/// A tunnel backend's next hop is its route's gateway, with the route's MTU (else the
/// device's); a backend without a route stays unresolved; a direct-routing backend is its
/// own next hop and carries no MTU.
#[test]
fn a_routed_target_resolves_to_its_gateway_with_the_way_s_mtu() -> Result<()> {
    use lb_daemon::routing::neighbour::{Target, resolve};
    let (host, gateway) = (NetNs::new("nh")?, NetNs::new("gw")?);
    let (host_if, gw_if) = lb_tests::veth(&host, &gateway, "nh")?;
    host.ip(&["addr", "add", "10.9.0.1/24", "dev", &host_if])?;
    gateway.ip(&["addr", "add", "10.9.0.2/24", "dev", &gw_if])?;
    host.ip(&["route", "add", "10.8.0.0/24", "via", "10.9.0.2", "mtu", "1400"])?;
    host.ip(&["route", "add", "10.7.0.0/24", "via", "10.9.0.2"])?;
    let link = gateway.ip(&["-o", "link", "show", "dev", &gw_if])?;
    let gw_mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .context("no MAC in `ip link`")?
        .to_owned();
    let target = |a: &str, routed| Target { addr: a.parse().unwrap(), routed };
    let targets = [
        target("10.8.0.5", true),
        target("10.7.0.9", true),
        target("10.9.0.2", false),
        target("10.6.0.1", true),
    ];
    let found = host.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(rt.block_on(resolve(&targets, std::time::Duration::from_secs(3)))?)
    })?;
    let mac = |a: &str| found.get(&a.parse::<IpAddr>().unwrap()).map(|n| (n.mac, n.mtu));
    let hex = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    ensure!(mac("10.8.0.5").map(|(m, mtu)| (hex(m), mtu)) == Some((gw_mac.clone(), 1400)), "{found:?}");
    ensure!(mac("10.7.0.9").map(|(m, mtu)| (hex(m), mtu)) == Some((gw_mac.clone(), 1500)), "{found:?}");
    ensure!(mac("10.9.0.2").map(|(m, mtu)| (hex(m), mtu)) == Some((gw_mac.clone(), 0)), "{found:?}");
    ensure!(mac("10.6.0.1").is_none(), "no route, yet resolved: {found:?}");
    Ok(())
}

/// `check.via_tunnel`: the probe goes through the tunnel like clients' packets, so a real
/// server whose decapsulation broke is taken out; a plain check of its address, beside,
/// keeps passing (the server itself is fine), which is why the tunnel check exists.
#[test]
fn a_via_tunnel_check_takes_out_a_real_server_that_stopped_decapsulating() -> Result<()> {
    let path = ServerPath::Routed;
    let servers: Vec<IpAddr> = (0..2).map(|i| IpAddr::V4(server_addr(path, i))).collect();
    let check = |via: bool| {
        format!(
            "    check: {{ type: tcp, via_tunnel: {via}, interval: 500ms, timeout: 400ms, rise: 1, fall: 1 }}\n"
        )
    };
    let services = format!(
        "services:\n{}{}{}{}",
        tunnel_service("through", 80, "sh", &servers),
        check(true),
        tunnel_service("plain", UPLOAD_PORT, "sh", &servers),
        check(false),
    );
    let layout = Layout { server_path: path, ..Layout::default() };
    let lab = DrLab::start_on(layout, servers.len(), 4, LabConfig::Services(services))?;
    let _echo = EchoServer::on_each(&lab.topo.servers, UPLOAD_PORT)?;
    let (a, b) = (format!("{}:80", servers[0]), format!("{}:80", servers[1]));
    lab.wait_state("through", &a, "active")?;
    lab.wait_state("through", &b, "active")?;
    let detached = lab.detach_decap(0)?;
    ensure!(detached.contains("detached"), "{detached}");
    lab.wait_state("through", &a, "down")?;
    let status = lab.daemon.status()?;
    let row = |endpoint: &str| status.lines().find(|l| l.contains(endpoint)).unwrap_or_default().to_owned();
    ensure!(row(&b).ends_with("active"), "{status}");
    let plain = format!("{}:{UPLOAD_PORT}", servers[0]);
    ensure!(row(&plain).ends_with("active"), "the plain check should not notice:\n{status}");
    ensure!(status.contains("no answer within"), "the reason shown:\n{status}");
    Ok(())
}
