//! Policy routing the config declares (tables, routes, rules) and one host route per VIP
//! that has a backend up, kept equal to the kernel's over rtnetlink.
//!
//! The daemon owns exactly the routes and rules that carry its rtnetlink protocol number
//! (`routing.protocol`): it creates what is missing, replaces what changed, removes those
//! of its own that the config no longer declares, and never touches any other. Applying
//! the same intent twice sends nothing the second time. An object the kernel refuses (a
//! missing device, an unreachable gateway) is reported with what and why, and the others
//! are applied anyway.

use std::collections::BTreeMap;
use std::net::IpAddr;

use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::IpVersion;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};

/// Kernel default metric of IPv6 routes added without one (`ip -6 route` shows 1024).
const IPV6_DEFAULT_METRIC: u32 = 1024;

use super::decl::{Intent, RouteDecl, RoutingConfig, RuleDecl};

/// A route as the kernel identifies it (table, destination, metric) and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    table: u32,
    dst: IpNet,
    metric: u32,
    via: Option<IpAddr>,
    oif: Option<u32>,
    src: Option<IpAddr>,
}

impl Route {
    fn key(&self) -> (u32, IpNet, u32) {
        (self.table, self.dst, self.metric)
    }

    /// Whether the kernel's `current` says what this one asks for. The kernel fills in an
    /// output interface for a gateway route; it matters only when one was asked for.
    fn satisfied_by(&self, current: &Route) -> bool {
        self.key() == current.key()
            && self.via == current.via
            && self.src == current.src
            && (self.oif.is_none() || self.oif == current.oif)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    v6: bool,
    priority: u32,
    from: Option<IpNet>,
    to: Option<IpNet>,
    fwmark: Option<(u32, u32)>,
    iif: Option<String>,
    oif: Option<String>,
    table: u32,
}

/// One object that could not be applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    /// `routing.routes[1] (default via 198.51.100.1 table isp_a (100))`.
    pub what: String,
    pub why: String,
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.why)
    }
}

/// What one reconciliation did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub added: usize,
    pub replaced: usize,
    pub removed: usize,
    /// Objects in the kernel now, the daemon's own.
    pub routes: usize,
    pub rules: usize,
    pub errors: Vec<ObjectError>,
    /// Applied, but worth a look (a declared table other programs use too).
    pub warnings: Vec<ObjectError>,
}

impl Report {
    pub fn changes(&self) -> usize {
        self.added + self.replaced + self.removed
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("opening a netlink socket")]
    Socket(#[from] std::io::Error),
    #[error("reading the kernel's routes and rules")]
    Netlink(#[from] rtnetlink::Error),
}

fn describe_route(d: &RouteDecl, cfg: &RoutingConfig) -> String {
    let mut s = if d.dst.prefix_len() == 0 { "default".to_owned() } else { d.dst.to_string() };
    if let Some(via) = d.via {
        s.push_str(&format!(" via {via}"));
    }
    if let Some(dev) = &d.dev {
        s.push_str(&format!(" dev {dev}"));
    }
    format!("{} ({s} table {})", d.at, cfg.table_name(d.table))
}

fn describe_rule(d: &RuleDecl, cfg: &RoutingConfig) -> String {
    let from = d.from.map_or_else(|| "all".to_owned(), |n| n.to_string());
    format!("{} (priority {} from {from} lookup {})", d.at, d.priority, cfg.table_name(d.table))
}

fn ifindex(dev: &str) -> Result<u32, String> {
    nix::net::if_::if_nametoindex(dev).map_err(|_| format!("interface {dev} does not exist"))
}

fn default_metric(dst: &IpNet) -> u32 {
    if dst.addr().is_ipv6() { IPV6_DEFAULT_METRIC } else { 0 }
}

/// The routes and rules an intent asks for, each with the name errors should carry, and
/// the declared objects that cannot even be asked for (a device that does not exist).
#[derive(Default)]
struct Desired {
    routes: Vec<(String, Route)>,
    rules: Vec<(String, Rule)>,
    errors: Vec<ObjectError>,
}

fn desired(intent: &Intent) -> Desired {
    let (mut routes, mut rules, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    let Some(cfg) = &intent.config else { return Desired::default() };
    for d in &cfg.routes {
        let oif = match d.dev.as_deref().map(ifindex).transpose() {
            Ok(oif) => oif,
            Err(why) => {
                errors.push(ObjectError { what: describe_route(d, cfg), why });
                continue;
            }
        };
        let route = Route {
            table: d.table,
            dst: d.dst.trunc(),
            metric: d.metric.unwrap_or_else(|| default_metric(&d.dst)),
            via: d.via,
            oif,
            src: d.src,
        };
        routes.push((describe_route(d, cfg), route));
    }
    if let Some(v) = &cfg.vip_routes {
        match ifindex(&v.dev) {
            Ok(oif) => {
                for vip in &intent.vips_up {
                    let dst = IpNet::from(*vip);
                    let route = Route {
                        table: v.table,
                        metric: default_metric(&dst),
                        dst,
                        via: None,
                        oif: Some(oif),
                        src: None,
                    };
                    routes.push((format!("VIP route {vip} (table {})", cfg.table_name(v.table)), route));
                }
            }
            Err(why) => errors.push(ObjectError { what: "routing.vip_routes".into(), why }),
        }
    }
    for d in &cfg.rules {
        let rule = Rule {
            v6: d.v6,
            priority: d.priority,
            from: d.from.map(|n| n.trunc()),
            to: d.to.map(|n| n.trunc()),
            fwmark: d.fwmark,
            iif: d.iif.clone(),
            oif: d.oif.clone(),
            table: d.table,
        };
        rules.push((describe_rule(d, cfg), rule));
    }
    Desired { routes, rules, errors }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn to_route_addr(a: IpAddr) -> RouteAddress {
    match a {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}

fn parse_route(m: &RouteMessage) -> Option<Route> {
    let v6 = m.header.address_family == AddressFamily::Inet6;
    let mut table = u32::from(m.header.table);
    let (mut dst, mut via, mut oif, mut src, mut metric) = (None, None, None, None, 0);
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dst = route_addr(d),
            RouteAttribute::Gateway(g) => via = route_addr(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::PrefSource(s) => src = route_addr(s),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    let unspecified: IpAddr =
        if v6 { std::net::Ipv6Addr::UNSPECIFIED.into() } else { std::net::Ipv4Addr::UNSPECIFIED.into() };
    let dst = IpNet::new(dst.unwrap_or(unspecified), m.header.destination_prefix_length).ok()?;
    Some(Route { table, dst, metric, via, oif, src })
}

fn route_message(r: &Route, protocol: u8) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = if r.dst.addr().is_ipv6() { AddressFamily::Inet6 } else { AddressFamily::Inet };
    m.header.destination_prefix_length = r.dst.prefix_len();
    m.header.table = if r.table > 255 { RouteHeader::RT_TABLE_UNSPEC } else { r.table as u8 };
    m.header.protocol = RouteProtocol::from(protocol);
    m.header.scope = if r.via.is_some() { RouteScope::Universe } else { RouteScope::Link };
    m.header.kind = RouteType::Unicast;
    m.attributes.push(RouteAttribute::Table(r.table));
    if r.dst.prefix_len() > 0 {
        m.attributes.push(RouteAttribute::Destination(to_route_addr(r.dst.addr())));
    }
    if let Some(via) = r.via {
        m.attributes.push(RouteAttribute::Gateway(to_route_addr(via)));
    }
    if let Some(oif) = r.oif {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(src) = r.src {
        m.attributes.push(RouteAttribute::PrefSource(to_route_addr(src)));
    }
    if r.metric != 0 {
        m.attributes.push(RouteAttribute::Priority(r.metric));
    }
    m
}

fn parse_rule(m: &RuleMessage) -> Rule {
    let v6 = m.header.family == AddressFamily::Inet6;
    let mut r = Rule {
        v6,
        priority: 0,
        from: None,
        to: None,
        fwmark: None,
        iif: None,
        oif: None,
        table: u32::from(m.header.table),
    };
    let (mut mark, mut mask) = (None, u32::MAX);
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => r.priority = *p,
            RuleAttribute::Source(s) => r.from = IpNet::new(*s, m.header.src_len).ok(),
            RuleAttribute::Destination(d) => r.to = IpNet::new(*d, m.header.dst_len).ok(),
            RuleAttribute::FwMark(v) => mark = Some(*v),
            RuleAttribute::FwMask(v) => mask = *v,
            RuleAttribute::Iifname(i) => r.iif = Some(i.clone()),
            RuleAttribute::Oifname(o) => r.oif = Some(o.clone()),
            RuleAttribute::Table(t) => r.table = *t,
            _ => {}
        }
    }
    r.fwmark = mark.map(|m| (m, mask));
    r
}

fn rule_message(r: &Rule, protocol: u8) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = if r.v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
    m.header.action = RuleAction::ToTable;
    m.header.table = if r.table > 255 { 0 } else { r.table as u8 };
    m.attributes.push(RuleAttribute::Table(r.table));
    m.attributes.push(RuleAttribute::Priority(r.priority));
    m.attributes.push(RuleAttribute::Protocol(RouteProtocol::from(protocol)));
    if let Some(from) = r.from {
        m.header.src_len = from.prefix_len();
        m.attributes.push(RuleAttribute::Source(from.addr()));
    }
    if let Some(to) = r.to {
        m.header.dst_len = to.prefix_len();
        m.attributes.push(RuleAttribute::Destination(to.addr()));
    }
    if let Some((mark, mask)) = r.fwmark {
        m.attributes.push(RuleAttribute::FwMark(mark));
        m.attributes.push(RuleAttribute::FwMask(mask));
    }
    if let Some(i) = &r.iif {
        m.attributes.push(RuleAttribute::Iifname(i.clone()));
    }
    if let Some(o) = &r.oif {
        m.attributes.push(RuleAttribute::Oifname(o.clone()));
    }
    m
}

/// The daemon's own routes (both families, every table) and rules now in the kernel,
/// and how many routes of other programs each table holds.
struct Kernel {
    routes: Vec<(RouteMessage, Route)>,
    rules: Vec<(RuleMessage, Rule)>,
    foreign: BTreeMap<u32, usize>,
}

async fn current(handle: &rtnetlink::Handle, protocol: u8) -> Result<Kernel, RoutingError> {
    let ours = RouteProtocol::from(protocol);
    let mut routes = Vec::new();
    let mut foreign: BTreeMap<u32, usize> = BTreeMap::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut query = RouteMessage::default();
        query.header.address_family = family;
        let mut dump = handle.route().get(query).execute();
        while let Some(m) = dump.try_next().await? {
            let Some(r) = parse_route(&m) else { continue };
            if m.header.protocol == ours {
                routes.push((m, r));
            } else {
                *foreign.entry(r.table).or_default() += 1;
            }
        }
    }
    let mut rules = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let mut dump = handle.rule().get(version).execute();
        while let Some(m) = dump.try_next().await? {
            if m.attributes.contains(&RuleAttribute::Protocol(ours)) {
                let r = parse_rule(&m);
                rules.push((m, r));
            }
        }
    }
    Ok(Kernel { routes, rules, foreign })
}

/// Declared tables that other programs put routes in too: not an error (an operator may
/// do so on purpose), but worth saying, since their routes meet the daemon's there.
fn table_clashes(cfg: &RoutingConfig, foreign: &BTreeMap<u32, usize>) -> Vec<ObjectError> {
    let vip_table = cfg.vip_routes.as_ref().map(|v| v.table);
    cfg.tables
        .keys()
        .copied()
        .chain(vip_table.filter(|t| !cfg.tables.contains_key(t) && *t != 254))
        .filter_map(|id| {
            let n = *foreign.get(&id)?;
            Some(ObjectError {
                what: format!("table {}", cfg.table_name(id)),
                why: format!("also holds {n} route(s) of other programs (a table id clash?)"),
            })
        })
        .collect()
}

fn netlink_why(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.to_io() {
            io if io.raw_os_error().is_some() => io.to_string(),
            _ => m.to_string(),
        },
        other => other.to_string(),
    }
}

/// Makes the kernel hold what `intent` asks for, under the intent's protocol; objects of
/// `previous_protocol` (a config that changed it) are the daemon's too and are removed.
pub async fn reconcile(
    handle: &rtnetlink::Handle,
    intent: &Intent,
    previous_protocol: Option<u8>,
) -> Result<Report, RoutingError> {
    let mut report = Report::default();
    let protocol = match (&intent.config, previous_protocol) {
        (Some(c), _) => c.protocol,
        (None, Some(p)) => p,
        (None, None) => return Ok(report),
    };
    if let Some(old) = previous_protocol.filter(|p| *p != protocol) {
        let old = current(handle, old).await?;
        for (m, _) in old.routes {
            handle.route().del(m).execute().await?;
            report.removed += 1;
        }
        for (m, _) in old.rules {
            handle.rule().del(m).execute().await?;
            report.removed += 1;
        }
    }
    let Desired { routes: want_routes, rules: want_rules, errors } = desired(intent);
    report.errors = errors;
    let Kernel { routes: have_routes, rules: have_rules, foreign } = current(handle, protocol).await?;
    if let Some(cfg) = &intent.config {
        report.warnings = table_clashes(cfg, &foreign);
    }

    let mut have: BTreeMap<(u32, IpNet, u32), (RouteMessage, Route)> =
        have_routes.into_iter().map(|(m, r)| (r.key(), (m, r))).collect();
    for (what, want) in &want_routes {
        let existing = have.remove(&want.key());
        if existing.as_ref().is_some_and(|(_, r)| want.satisfied_by(r)) {
            report.routes += 1;
            continue;
        }
        let replacing = existing.is_some();
        match handle.route().add(route_message(want, protocol)).replace().execute().await {
            Ok(()) => {
                report.routes += 1;
                if replacing { report.replaced += 1 } else { report.added += 1 }
            }
            Err(e) => report.errors.push(ObjectError { what: what.clone(), why: netlink_why(&e) }),
        }
    }
    for (_, (m, _)) in have {
        handle.route().del(m).execute().await?;
        report.removed += 1;
    }

    let mut have: BTreeMap<(bool, u32), (RuleMessage, Rule)> =
        have_rules.into_iter().map(|(m, r)| ((r.v6, r.priority), (m, r))).collect();
    for (what, want) in &want_rules {
        let existing = have.remove(&(want.v6, want.priority));
        if existing.as_ref().is_some_and(|(_, r)| r == want) {
            report.rules += 1;
            continue;
        }
        // Rules cannot be replaced in place: the old one goes, then the new one comes.
        let replacing = existing.is_some();
        if let Some((m, _)) = existing {
            handle.rule().del(m).execute().await?;
        }
        let mut add = handle.rule().add();
        *add.message_mut() = rule_message(want, protocol);
        match add.execute().await {
            Ok(()) => {
                report.rules += 1;
                if replacing { report.replaced += 1 } else { report.added += 1 }
            }
            Err(e) => {
                report.removed += usize::from(replacing);
                report.errors.push(ObjectError { what: what.clone(), why: netlink_why(&e) })
            }
        }
    }
    for (_, (m, _)) in have {
        handle.rule().del(m).execute().await?;
        report.removed += 1;
    }
    Ok(report)
}

/// [`reconcile`] on a netlink connection of its own.
pub async fn reconcile_once(intent: &Intent, previous_protocol: Option<u8>) -> Result<Report, RoutingError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn_task = tokio::spawn(conn);
    let result = reconcile(&handle, intent, previous_protocol).await;
    conn_task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(table: u32, dst: &str, via: Option<&str>) -> Route {
        Route {
            table,
            dst: dst.parse().unwrap(),
            metric: 0,
            via: via.map(|v| v.parse().unwrap()),
            oif: None,
            src: None,
        }
    }

    #[test]
    fn routes_and_rules_read_back_as_they_were_written() {
        let mut r = route(100, "0.0.0.0/0", Some("198.51.100.1"));
        r.oif = Some(3);
        assert_eq!(parse_route(&route_message(&r, 250)), Some(r.clone()));
        let mut big = route(70000, "2001:db8::/32", None);
        big.metric = 1024;
        assert_eq!(parse_route(&route_message(&big, 250)), Some(big));
        let rule = Rule {
            v6: false,
            priority: 1000,
            from: Some("203.0.113.248/32".parse().unwrap()),
            to: None,
            fwmark: Some((7, 0xff)),
            iif: Some("ext0".into()),
            oif: None,
            table: 100,
        };
        assert_eq!(parse_rule(&rule_message(&rule, 250)), rule);
    }

    #[test]
    fn a_gateway_route_is_satisfied_whatever_interface_the_kernel_chose() {
        let want = route(100, "0.0.0.0/0", Some("198.51.100.1"));
        let mut have = want.clone();
        have.oif = Some(4);
        assert!(want.satisfied_by(&have));
        let mut pinned = want.clone();
        pinned.oif = Some(5);
        assert!(!pinned.satisfied_by(&have), "a device asked for must be the one in use");
        assert!(!route(100, "0.0.0.0/0", Some("198.51.100.2")).satisfied_by(&have));
    }

    #[test]
    fn a_missing_device_is_an_error_for_that_route_only() {
        let cfg = RoutingConfig {
            protocol: 250,
            tables: BTreeMap::from([(100, "isp_a".into())]),
            routes: vec![
                RouteDecl {
                    at: "routing.routes[0]".into(),
                    table: 100,
                    dst: "0.0.0.0/0".parse().unwrap(),
                    via: Some("198.51.100.1".parse().unwrap()),
                    dev: Some("nonexistent9".into()),
                    src: None,
                    metric: None,
                },
                RouteDecl {
                    at: "routing.routes[1]".into(),
                    table: 100,
                    dst: "10.0.0.0/8".parse().unwrap(),
                    via: Some("198.51.100.1".parse().unwrap()),
                    dev: None,
                    src: None,
                    metric: None,
                },
            ],
            rules: vec![],
            vip_routes: None,
            remove_on_stop: false,
        };
        let d = desired(&Intent { config: Some(cfg), ..Default::default() });
        assert_eq!(d.routes.len(), 1);
        assert_eq!(
            d.errors,
            [ObjectError {
                what: "routing.routes[0] (default via 198.51.100.1 dev nonexistent9 table isp_a (100))"
                    .into(),
                why: "interface nonexistent9 does not exist".into()
            }]
        );
    }
}
