//! The real servers' decapsulator: fixtures through `BPF_PROG_TEST_RUN` (a tunnelled frame
//! in, the inner frame out, byte for byte; everything else passed untouched and counted),
//! and `lb-daemon decap attach|status|detach` on a namespace's interface, with an IPIP
//! datagram sent by the kernel of another namespace reaching a UDP socket on the VIP.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use lb_daemon::dataplane::decap::Decapsulator;
use lb_ebpf::parse::TCP_ACK;
use lb_ebpf::testpkt::{self, Ipv4Opts, Ipv6Opts, L4, in_ipv4, in_ipv6, tagged};
use lb_tests::NetNs;
use lb_tests::daemon::decap;
use lb_tests::fixture::{XDP_PASS, timed_run_xdp};

const HOST4: [u8; 4] = [10, 2, 0, 2];
const HOST6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const DIRECTOR4: [u8; 4] = [10, 2, 0, 1];
const DIRECTOR6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

fn inner4() -> Vec<u8> {
    testpkt::ipv4([198, 51, 100, 7], [192, 0, 2, 10], L4::tcp(40000, 80, TCP_ACK), Ipv4Opts::default())
}

fn inner6() -> Vec<u8> {
    let mut vip = [0u8; 16];
    vip[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    vip[15] = 0x10;
    let mut client = vip;
    client[15] = 0x77;
    testpkt::ipv6(client, vip, L4::udp(40000, 53), Ipv6Opts::default())
}

fn counters(d: &Decapsulator) -> Result<Vec<(&'static str, u64)>> {
    Ok(d.status()?.counters)
}

fn count(d: &Decapsulator, name: &str) -> Result<u64> {
    counters(d)?.into_iter().find(|(n, _)| *n == name).map(|(_, v)| v).context("no such counter")
}

#[test]
fn tunnelled_frames_come_out_as_their_inner_frame_and_the_rest_passes_untouched() -> Result<()> {
    let mut d = Decapsulator::load(None)?;
    d.add_local_addrs(&[IpAddr::from(HOST4), IpAddr::from(HOST6)])?;
    let bad_checksum = {
        let mut f = in_ipv4(&inner4(), DIRECTOR4, HOST4, 0);
        f[14 + 10] ^= 0xff;
        f
    };
    let inner_v6_claimed_v4 = {
        let mut f = in_ipv4(&inner6(), DIRECTOR4, HOST4, 0);
        f[14 + 9] = 4;
        // Header checksum again, so that only the mismatch is wrong.
        f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let c = lb_ebpf::csum::checksum(&f[14..34], 0);
        f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        f
    };
    let truncated = {
        let f = in_ipv4(&inner4(), DIRECTOR4, HOST4, 0);
        f[..f.len() - 10].to_vec()
    };
    // (what, input, expected output, counter)
    let rows: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        ("IPv4 in IPv4", in_ipv4(&inner4(), DIRECTOR4, HOST4, 0), inner4(), "decapsulated_ipv4_in_ipv4"),
        ("IPv6 in IPv6", in_ipv6(&inner6(), DIRECTOR6, HOST6), inner6(), "decapsulated_ipv6_in_ipv6"),
        ("IPv6 in IPv4", in_ipv4(&inner6(), DIRECTOR4, HOST4, 0), inner6(), "decapsulated_ipv6_in_ipv4"),
        ("IPv4 in IPv6", in_ipv6(&inner4(), DIRECTOR6, HOST6), inner4(), "decapsulated_ipv4_in_ipv6"),
        (
            "tagged IPv4 in IPv4 keeps its tag",
            tagged(&in_ipv4(&inner4(), DIRECTOR4, HOST4, 0), 100),
            tagged(&inner4(), 100),
            "decapsulated_ipv4_in_ipv4",
        ),
        (
            "tunnelled to another host",
            in_ipv4(&inner4(), DIRECTOR4, [10, 2, 0, 3], 0),
            in_ipv4(&inner4(), DIRECTOR4, [10, 2, 0, 3], 0),
            "passed_not_addressed_here",
        ),
        ("not tunnelled", inner4(), inner4(), "passed_not_tunnelled"),
        (
            "an outer fragment",
            in_ipv4(&inner4(), DIRECTOR4, HOST4, 0x2000),
            in_ipv4(&inner4(), DIRECTOR4, HOST4, 0x2000),
            "passed_outer_fragment",
        ),
        ("a bad outer checksum", bad_checksum.clone(), bad_checksum, "passed_malformed"),
        ("protocol 4 carrying IPv6", inner_v6_claimed_v4.clone(), inner_v6_claimed_v4, "passed_malformed"),
        ("cut short", truncated.clone(), truncated, "passed_malformed"),
    ];
    for (what, input, want, counter) in rows {
        let before = count(&d, counter)?;
        let (action, out, _) = timed_run_xdp(d.program()?, "lb_decap", &input, 1)?;
        ensure!(action == XDP_PASS, "{what}: action {action}");
        ensure!(out == want, "{what}: got\n{out:02x?}\nwant\n{want:02x?}");
        ensure!(count(&d, counter)? == before + 1, "{what}: {counter} did not count it");
    }
    Ok(())
}

#[test]
fn an_ipip_datagram_reaches_the_vip_on_a_real_server_with_the_decapsulator_attached() -> Result<()> {
    let (director, server) = (NetNs::new("dcd")?, NetNs::new("dcs")?);
    lb_tests::veth_named(&director, &server, "dc0", "rs0")?;
    director.ip(&["addr", "add", "10.2.0.1/24", "dev", "dc0"])?;
    server.ip(&["addr", "add", "10.2.0.2/24", "dev", "rs0"])?;
    server.ip(&["link", "set", "lo", "up"])?;
    server.ip(&["addr", "add", "192.0.2.10/32", "dev", "lo"])?;
    let dir = std::path::PathBuf::from("/sys/fs/bpf").join(server.name());
    let _cleanup = scopeguard(&dir);

    let vip: SocketAddr = "192.0.2.10:5300".parse()?;
    let listener = server.run(move || Ok(UdpSocket::bind(vip)?))?;
    let send = |sport: u16| -> Result<()> {
        // The director's kernel builds the outer header (protocol 4) around what we give it.
        let inner = testpkt::ipv4(
            [10, 2, 0, 1],
            [192, 0, 2, 10],
            L4::Udp { sport, dport: 5300, payload: 4 },
            Ipv4Opts::default(),
        );
        director.run(move || {
            let raw = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::RAW,
                Some(socket2::Protocol::from(4)),
            )?;
            let to = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 2, 0, 2)), 0);
            raw.send_to(&inner[14..], &to.into())?;
            Ok(())
        })
    };
    let mut buf = [0u8; 64];
    // Without the program the datagram is lost where the kernel has no ipip module to
    // decapsulate it (with one, a tunl0 device shows in every namespace).
    if server.ip(&["link", "show", "tunl0"]).is_err() {
        listener.set_read_timeout(Some(Duration::from_secs(1)))?;
        send(41001)?;
        ensure!(listener.recv_from(&mut buf).is_err(), "delivered without the decapsulator");
    }

    let attached = decap(&server, &dir, &["attach", "rs0"])?;
    ensure!(attached.contains("decapsulating on rs0 for 10.2.0.2"), "{attached}");
    ensure!(decap(&server, &dir, &["attach", "rs0"])?.contains("already attached"), "attach twice");

    listener.set_read_timeout(Some(Duration::from_secs(5)))?;
    send(41000)?;
    let (n, from) = listener.recv_from(&mut buf).context("the inner datagram never reached the VIP")?;
    ensure!(n == 4 && from == "10.2.0.1:41000".parse()?, "{n} bytes from {from}");

    let status = decap(&server, &dir, &["status"])?;
    ensure!(status.contains("interfaces: rs0"), "{status}");
    ensure!(status.contains("local addresses: 10.2.0.2"), "{status}");
    let decapsulated = status
        .lines()
        .find_map(|l| l.strip_prefix("decapsulated_ipv4_in_ipv4"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .context("no counter")?;
    ensure!(decapsulated >= 1, "{status}");

    ensure!(decap(&server, &dir, &["detach", "rs0"])?.contains("detached from rs0"));
    ensure!(decap(&server, &dir, &["status"])?.contains("not attached anywhere"));
    ensure!(decap(&server, &dir, &["detach", "rs0"])?.contains("nothing was attached"));
    Ok(())
}

/// Removes the pin directory when the test ends, also on panic.
fn scopeguard(dir: &std::path::Path) -> impl Drop + use<> {
    struct Guard(std::path::PathBuf);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    Guard(dir.to_owned())
}
