//! The `icmp` checker against a host in another namespace, through both kinds of ICMP
//! socket (raw, and the unprivileged ping socket that `net.ipv4.ping_group_range`
//! allows), for IPv4 and IPv6; a host that ignores echo requests and an address nobody
//! holds fail at the timeout. Needs root.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use lb_daemon::health::spec::{CheckKind, CheckSpec};
use lb_daemon::health::state::Outcome;
use lb_daemon::health::{Report, Target, run};
use lb_tests::NetNs;

fn ping(from: &NetNs, addr: &str, timeout: Duration, parallel: usize) -> Result<Vec<Report>> {
    let addr: IpAddr = addr.parse()?;
    from.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let spec = CheckSpec { kind: CheckKind::Icmp, timeout, source: None, via_tunnel: None };
        let target = Target { service: "ping".into(), addr, port: None, tunnel: None };
        Ok(rt.block_on(async {
            let all = (0..parallel).map(|_| run(&spec, &target));
            futures_util::future::join_all(all).await.into_iter().map(|(r, _)| r).collect()
        }))
    })
}

#[test]
fn echo_to_a_namespace_host_passes_and_silence_fails_at_the_timeout() -> Result<()> {
    let (checker, host) = (NetNs::new("icc")?, NetNs::new("ich")?);
    let (veth_c, veth_h) = (lb_tests::unique_name("icc"), lb_tests::unique_name("ich"));
    checker.ip(&["link", "add", &veth_c, "type", "veth", "peer", "name", &veth_h, "netns", host.name()])?;
    for (ns, dev, v4, v6) in [
        (&checker, &veth_c, "10.77.0.1/24", "2001:db8:77::1/64"),
        (&host, &veth_h, "10.77.0.2/24", "2001:db8:77::2/64"),
    ] {
        ns.ip(&["addr", "add", v4, "dev", dev])?;
        ns.ip(&["addr", "add", v6, "dev", dev, "nodad"])?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    // A new link forwards IPv6 only after about a second: wait for one answer (bounded).
    for addr in ["10.77.0.2", "2001:db8:77::2"] {
        for _ in 0..5 {
            if ping(&checker, addr, Duration::from_secs(2), 1)?[0].outcome == Outcome::Ok {
                break;
            }
        }
    }
    let timeout = Duration::from_millis(500);
    for (range, socket) in [("1 0", "raw socket"), ("0 2147483647", "ping socket")] {
        checker.sysctl("net.ipv4.ping_group_range", range)?;
        for addr in ["10.77.0.2", "2001:db8:77::2"] {
            // Concurrent checks: each must take its own reply, never another's.
            let reports = ping(&checker, addr, timeout, 20)?;
            for r in &reports {
                ensure!(r.outcome == Outcome::Ok && r.message.contains(socket), "{addr} via {socket}: {r:?}");
            }
        }
        let r = ping(&checker, "10.77.0.3", timeout, 1)?.remove(0);
        ensure!(r.outcome == Outcome::Critical && r.message.contains("no echo reply within"), "{r:?}");
    }
    host.sysctl("net.ipv4.icmp_echo_ignore_all", "1")?;
    host.sysctl("net.ipv6.icmp.echo_ignore_all", "1")?;
    for addr in ["10.77.0.2", "2001:db8:77::2"] {
        let r = ping(&checker, addr, timeout, 1)?.remove(0);
        ensure!(
            r.outcome == Outcome::Critical && r.message.contains("no echo reply within"),
            "{addr}: {r:?}"
        );
    }
    Ok(())
}
