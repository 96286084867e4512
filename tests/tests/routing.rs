//! Policy routing over rtnetlink, in namespaces: the seeds' two-uplink scenario proven
//! with real packets reaching the gateways; reconciliation that adds, replaces and removes
//! only the daemon's own objects, sends nothing when nothing changed, and reports an
//! invalid object while applying the rest. Needs root.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use lb_daemon::config::Config;
use lb_daemon::routing::decl::{Intent, RoutingConfig};
use lb_daemon::routing::policy::{Report, reconcile_once};
use lb_tests::bird::Bird;
use lb_tests::{NetNs, veth_named};

/// Where both gateways answer: a datagram to it shows which gateway the director chose.
const FAR: &str = "192.0.2.200:5000";
const SPECIAL_SOURCE: &str = "203.0.113.248";
const OTHER_SOURCE: &str = "203.0.113.10";

/// A director with two uplinks: `upa` to gateway A (10.88.1.2), `upb` to gateway B
/// (10.88.2.2), no default route of its own; both gateways hold 192.0.2.200.
struct TwoUplinks {
    director: NetNs,
    gw_a: NetNs,
    gw_b: NetNs,
}

impl TwoUplinks {
    fn build() -> Result<Self> {
        let (director, gw_a, gw_b) = (NetNs::new("rtd")?, NetNs::new("rta")?, NetNs::new("rtb")?);
        veth_named(&director, &gw_a, "upa", "wan")?;
        veth_named(&director, &gw_b, "upb", "wan")?;
        director.ip(&["addr", "add", "10.88.1.1/24", "dev", "upa"])?;
        director.ip(&["addr", "add", "10.88.2.1/24", "dev", "upb"])?;
        for a in [SPECIAL_SOURCE, OTHER_SOURCE] {
            director.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
        }
        for (gw, own) in [(&gw_a, "10.88.1.2/24"), (&gw_b, "10.88.2.2/24")] {
            gw.ip(&["addr", "add", own, "dev", "wan"])?;
            gw.ip(&["addr", "add", "192.0.2.200/32", "dev", "lo"])?;
        }
        Ok(TwoUplinks { director, gw_a, gw_b })
    }

    /// Sends one datagram from `source` to [`FAR`]; returns which gateways received it.
    fn which_gateway(&self, source: &'static str) -> Result<(bool, bool)> {
        let listen = |ns: &NetNs| -> Result<UdpSocket> {
            let s = ns.run(|| Ok(UdpSocket::bind(FAR)?))?;
            s.set_read_timeout(Some(Duration::from_millis(1500)))?;
            Ok(s)
        };
        let (a, b) = (listen(&self.gw_a)?, listen(&self.gw_b)?);
        self.director.run(move || {
            let s = UdpSocket::bind(SocketAddr::new(source.parse()?, 0))?;
            s.send_to(source.as_bytes(), FAR).with_context(|| format!("sending from {source}"))?;
            Ok(())
        })?;
        let got = |s: &UdpSocket| {
            let mut buf = [0u8; 64];
            matches!(s.recv_from(&mut buf), Ok((n, _)) if &buf[..n] == source.as_bytes())
        };
        Ok((got(&a), got(&b)))
    }

    fn reconcile(&self, routing: &RoutingConfig) -> Result<Report> {
        let intent = Intent { config: Some(routing.clone()), ..Default::default() };
        self.director.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            Ok(rt.block_on(reconcile_once(&intent, None))?)
        })
    }

    fn remove_all(&self, protocol: u8) -> Result<Report> {
        self.director.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            Ok(rt.block_on(reconcile_once(&Intent::default(), Some(protocol)))?)
        })
    }
}

fn routing(section: &str) -> Result<RoutingConfig> {
    let text = format!("director:\n  interfaces: [upa]\nrouting:\n{section}");
    let config =
        Config::parse(&text, "test.yaml").map_err(|e| anyhow::anyhow!(lb_daemon::error_chain(&e)))?;
    config.routing.context("no routing section")
}

/// The seeds' shell script, as config: sourced from .248 leaves through A, the rest through B.
const SEEDS: &str = "  tables:
    - { id: 100, name: isp_a }
    - { id: 101, name: isp_b }
  routes:
    - { table: isp_a, to: default, via: 10.88.1.2, dev: upa }
    - { table: isp_b, to: default, via: 10.88.2.2 }
  rules:
    - { priority: 1000, from: 203.0.113.248, table: isp_a }
    - { priority: 1001, from: all, table: isp_b }
";

#[test]
fn traffic_from_one_address_leaves_through_gateway_a_and_the_rest_through_b() -> Result<()> {
    let net = TwoUplinks::build()?;
    // Without the daemon's tables there is no route at all.
    ensure!(net.which_gateway(OTHER_SOURCE).is_err(), "sent without a route");
    let report = net.reconcile(&routing(SEEDS)?)?;
    ensure!((report.added, report.errors.len()) == (4, 0), "{report:?}");
    ensure!(net.which_gateway(SPECIAL_SOURCE)? == (true, false), "{SPECIAL_SOURCE} must leave through A");
    ensure!(net.which_gateway(OTHER_SOURCE)? == (false, true), "{OTHER_SOURCE} must leave through B");
    Ok(())
}

#[test]
fn reconciling_touches_only_its_own_objects_and_nothing_twice() -> Result<()> {
    let net = TwoUplinks::build()?;
    // An operator's own route and rule in the daemon's table.
    net.director.ip(&["route", "add", "198.51.100.0/24", "via", "10.88.1.2", "table", "100"])?;
    net.director.ip(&["rule", "add", "priority", "500", "from", "198.51.100.7", "table", "100"])?;
    let foreign = |net: &TwoUplinks| -> Result<bool> {
        Ok(net.director.ip(&["route", "show", "table", "100"])?.contains("198.51.100.0/24 via 10.88.1.2")
            && net.director.ip(&["rule", "show"])?.contains("500:\tfrom 198.51.100.7 lookup 100"))
    };

    // The seeds' objects and an IPv6 route (the kernel gives those a metric of its own).
    let seeds = routing(
        &SEEDS.replace("  rules:\n", "    - { table: isp_a, to: 2001:db8:99::/48, dev: upa }\n  rules:\n"),
    )?;
    let first = net.reconcile(&seeds)?;
    ensure!(first.added == 5 && first.changes() == 5, "{first:?}");
    let clash: Vec<String> = first.warnings.iter().map(ToString::to_string).collect();
    ensure!(
        clash == ["table isp_a (100): also holds 1 route(s) of other programs (a table id clash?)"],
        "the operator's route in table 100 is worth a warning: {clash:?}"
    );
    let again = net.reconcile(&seeds)?;
    ensure!(
        again.changes() == 0 && (again.routes, again.rules) == (3, 2),
        "a second apply changed {again:?}"
    );

    // A reload that drops a rule and moves a gateway.
    let changed = routing(
        "  tables:
    - { id: 100, name: isp_a }
    - { id: 101, name: isp_b }
  routes:
    - { table: isp_a, to: default, via: 10.88.1.2, dev: upa }
    - { table: isp_b, to: default, via: 10.88.1.2 }
  rules:
    - { priority: 1001, from: all, table: isp_b }
",
    )?;
    let report = net.reconcile(&changed)?;
    ensure!((report.added, report.replaced, report.removed) == (0, 1, 2), "{report:?}");
    ensure!(net.director.ip(&["-6", "route", "show", "table", "100"])?.trim().is_empty(), "IPv6 route left");
    let rules = net.director.ip(&["rule", "show"])?;
    ensure!(!rules.contains("1000:"), "the dropped rule is still there:\n{rules}");
    ensure!(rules.contains("1001:\tfrom all lookup 101 proto 250"), "{rules}");
    ensure!(net.director.ip(&["route", "show", "table", "101"])?.contains("default via 10.88.1.2"));
    ensure!(net.which_gateway(OTHER_SOURCE)? == (true, false), "the moved gateway carries the traffic");
    ensure!(foreign(&net)?, "a foreign route or rule was touched");
    // A restart (a new connection, the same config) applies nothing new.
    ensure!(net.reconcile(&changed)?.changes() == 0);

    // Objects the kernel refuses are reported; the rest applies.
    let invalid = routing(
        "  tables:
    - { id: 100, name: isp_a }
  routes:
    - { table: isp_a, to: 10.0.0.0/8, via: 10.99.0.1 }
    - { table: isp_a, to: 10.1.0.0/16, via: 10.88.1.2, dev: nothere0 }
    - { table: isp_a, to: default, via: 10.88.1.2 }
  rules:
    - { priority: 1001, from: all, table: isp_a }
",
    )?;
    let report = net.reconcile(&invalid)?;
    let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
    ensure!(errors.len() == 2, "{errors:?}");
    ensure!(
        errors[0].starts_with("routing.routes[1] (10.1.0.0/16 via 10.88.1.2 dev nothere0 table isp_a (100))"),
        "{errors:?}"
    );
    ensure!(errors[0].ends_with("interface nothere0 does not exist"), "{errors:?}");
    ensure!(
        errors[1].starts_with("routing.routes[0] (10.0.0.0/8 via 10.99.0.1 table isp_a (100))"),
        "{errors:?}"
    );
    ensure!(errors[1].contains("unreachable"), "{errors:?}");
    ensure!((report.routes, report.rules) == (1, 1), "{report:?}");
    ensure!(
        net.director
            .ip(&["route", "show", "table", "100", "proto", "250"])?
            .contains("default via 10.88.1.2")
    );
    ensure!(foreign(&net)?, "a foreign route or rule was touched");

    // routing.on_stop: remove takes everything of the daemon's, and only that.
    let removed = net.remove_all(invalid.protocol)?;
    ensure!(removed.removed == 2, "{removed:?}");
    ensure!(net.director.ip(&["route", "show", "table", "all", "proto", "250"])?.trim().is_empty());
    ensure!(!net.director.ip(&["rule", "show"])?.contains("proto 250"));
    ensure!(foreign(&net)?, "a foreign route or rule was touched");
    Ok(())
}

/// Waits (bounded) until `ip route show table 200` in the director does or does not
/// list the VIP's host route.
fn wait_vip_route(lab: &lb_tests::lab::DrLab, present: bool) -> Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let want = format!("{} dev lo proto 250", lb_tests::topology::VIP);
    loop {
        let table = lab.topo.director.ip(&["route", "show", "table", "200"])?;
        if table.contains(&want) == present {
            return Ok(table);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "VIP route never {}:\n{table}\n{}",
            if present { "appeared" } else { "went away" },
            lab.daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vip_route_follows_whether_any_server_is_up() -> Result<()> {
    use lb_tests::lab::{DrLab, LabConfig, VIP_PORT};
    use lb_tests::topology::VIP;
    let services = format!(
        "services:\n  - name: web\n    match: {{ vip: {VIP}, port: {VIP_PORT} }}\n    \
         check: {{ type: tcp, interval: 200ms, timeout: 150ms, rise: 1, fall: 1 }}\n    backends:\n\
         \x20     - {{ address: 10.0.2.11 }}\n      - {{ address: 10.0.2.12 }}\n\
         routing:\n  vip_routes: {{ table: 200 }}\n"
    );
    let mut lab = DrLab::start_with(2, 4, LabConfig::Services(services.clone()))?;
    wait_vip_route(&lab, true)?;
    let m = lab.metrics()?;
    ensure!(m.value("lb_routing_objects{kind=\"route\"}")? == 1.0);
    // Another program's route in the same table: BIRD must not announce it.
    lab.topo.director.ip(&["route", "add", "192.0.2.99/32", "dev", "lo", "table", "200"])?;
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/bird-vip-routes.conf");
    let bird = Bird::start(&lab.topo.director, std::path::Path::new(conf))?;
    let vip_route = format!("{VIP}/32");
    bird.wait_routes("lbvips", |r| r.contains(&vip_route) && !r.contains("192.0.2.99"))?;

    lab.stop_server(0)?;
    lab.stop_server(1)?;
    wait_vip_route(&lab, false)?;
    bird.wait_routes("lbvips", |r| !r.contains(&vip_route))?;
    lab.start_server(1)?;
    wait_vip_route(&lab, true)?;
    bird.wait_routes("lbvips", |r| r.contains(&vip_route))?;
    drop(bird);

    // A restart finds its route in place and sends nothing.
    lab.daemon.kill9()?;
    lab.daemon.restart(&lab.topo.director)?;
    // The routing series appear once the first reconciliation is done.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = lab.metrics()?;
        if m.value("lb_routing_objects{kind=\"route\"}").is_ok() {
            break m;
        }
        ensure!(std::time::Instant::now() < deadline, "no routing metrics:\n{}", lab.daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(m.value("lb_routing_objects{kind=\"route\"}")? == 1.0, "{}", lab.daemon.log_text());
    for op in ["add", "replace", "remove"] {
        let n = m.value(&format!("lb_routing_changes_total{{op=\"{op}\"}}"))?;
        ensure!(n == 0.0, "the restart made {n} {op} changes:\n{}", lab.daemon.log_text());
    }
    wait_vip_route(&lab, true)?;

    // A clean stop leaves the route by default (forwarding goes on) ...
    ensure!(lab.daemon.terminate()?.success());
    wait_vip_route(&lab, true)?;
    // ... and removes it with on_stop: remove.
    lab.write_services(&format!("{services}  on_stop: remove\n"))?;
    lab.daemon.restart(&lab.topo.director)?;
    ensure!(lab.daemon.terminate()?.success());
    let table = lab.topo.director.ip(&["route", "show", "table", "all", "proto", "250"])?;
    ensure!(table.trim().is_empty(), "left after on_stop: remove:\n{table}\n{}", lab.daemon.log_text());
    ensure!(
        lab.topo.director.ip(&["route", "show", "table", "200"])?.contains("192.0.2.99"),
        "foreign route gone"
    );
    Ok(())
}
