//! The `routing:` section: tables, routes, rules and VIP routes, validated into a
//! [`RoutingConfig`] with every error located.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{Checker, ConfigError, valid_ifname};
use crate::routing::decl::{RouteDecl, RoutingConfig, RuleDecl, VipRoutes};

/// Not in iproute2's rt_protos: other software is unlikely to claim it.
pub const DEFAULT_ROUTING_PROTOCOL: u8 = 250;
const MAIN_TABLE: u32 = 254;

/// Protocol numbers others own (iproute2's rt_protos): claiming one would make the daemon
/// remove their routes.
const TAKEN_PROTOCOLS: &[(u8, &str)] = &[
    (0, "unspec"),
    (1, "redirect"),
    (2, "kernel"),
    (3, "boot (ip route add without proto)"),
    (4, "static"),
    (8, "gated"),
    (9, "ra"),
    (10, "mrt"),
    (11, "zebra (FRR)"),
    (12, "bird"),
    (13, "dnrouted"),
    (14, "xorp"),
    (15, "ntk"),
    (16, "dhcp"),
    (17, "mrouted"),
    (18, "keepalived"),
    (42, "babel"),
    (99, "openr"),
    (186, "bgp (FRR)"),
    (187, "isis (FRR)"),
    (188, "ospf (FRR)"),
    (189, "rip (FRR)"),
    (192, "eigrp (FRR)"),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    #[serde(default)]
    protocol: Option<Spanned<u8>>,
    #[serde(default)]
    tables: Vec<RawTable>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    vip_routes: Option<RawVipRoutes>,
    #[serde(default)]
    on_stop: Option<RawOnStop>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    id: Spanned<u32>,
    name: Spanned<String>,
}

/// A table by number or by a name from `routing.tables` (or `main`).
#[derive(Clone, Deserialize)]
#[serde(untagged)]
enum RawTableRef {
    Id(u32),
    Name(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    table: Spanned<RawTableRef>,
    to: Spanned<String>,
    #[serde(default)]
    via: Option<Spanned<IpAddr>>,
    #[serde(default)]
    dev: Option<Spanned<String>>,
    #[serde(default)]
    src: Option<Spanned<IpAddr>>,
    #[serde(default)]
    metric: Option<Spanned<u32>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawFamily {
    Ipv4,
    Ipv6,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    priority: Spanned<u32>,
    table: Spanned<RawTableRef>,
    #[serde(default)]
    from: Option<Spanned<String>>,
    #[serde(default)]
    to: Option<Spanned<String>>,
    #[serde(default)]
    fwmark: Option<Spanned<u32>>,
    #[serde(default)]
    fwmask: Option<Spanned<u32>>,
    #[serde(default)]
    iif: Option<Spanned<String>>,
    #[serde(default)]
    oif: Option<Spanned<String>>,
    #[serde(default)]
    family: Option<Spanned<RawFamily>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVipRoutes {
    table: Spanned<RawTableRef>,
    #[serde(default)]
    dev: Option<Spanned<String>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawOnStop {
    Keep,
    Remove,
}

impl Checker<'_> {
    fn table_ref(
        &self,
        t: &Spanned<RawTableRef>,
        path: String,
        names: &HashMap<String, u32>,
    ) -> Result<u32, ConfigError> {
        match &t.value {
            RawTableRef::Id(0 | 255) => {
                Err(self.err(t, path, "tables 0 (unspec) and 255 (local) cannot be managed"))
            }
            RawTableRef::Id(id) => Ok(*id),
            RawTableRef::Name(n) if n == "main" => Ok(MAIN_TABLE),
            RawTableRef::Name(n) => names.get(n).copied().ok_or_else(|| {
                self.err(t, path, format!("no table named `{n}` in routing.tables (or give its number)"))
            }),
        }
    }

    /// `default`, `all` or a prefix without host bits.
    fn prefix(&self, v: &Spanned<String>, path: String, any: &str) -> Result<Option<IpNet>, ConfigError> {
        if v.value == any {
            return Ok(None);
        }
        let net: IpNet =
            v.value.parse().or_else(|_| v.value.parse::<IpAddr>().map(IpNet::from)).map_err(|_| {
                self.err(
                    v,
                    path.clone(),
                    format!("`{}` is neither `{any}` nor an address or prefix", v.value),
                )
            })?;
        super::no_host_bits(&net).map_err(|m| self.err(v, path, m))?;
        Ok(Some(net))
    }

    fn ifname(&self, v: &Option<Spanned<String>>, path: String) -> Result<Option<String>, ConfigError> {
        match v {
            None => Ok(None),
            Some(n) => {
                valid_ifname(&n.value).map_err(|m| self.err(n, path, m))?;
                Ok(Some(n.value.clone()))
            }
        }
    }

    pub(super) fn routing(&self, r: &RawRouting) -> Result<RoutingConfig, ConfigError> {
        let protocol = match &r.protocol {
            None => DEFAULT_ROUTING_PROTOCOL,
            Some(p) => {
                if let Some((_, owner)) = TAKEN_PROTOCOLS.iter().find(|(n, _)| *n == p.value) {
                    return Err(self.err(
                        p,
                        "routing.protocol",
                        format!(
                            "protocol {} belongs to {owner}: the daemon would remove its routes",
                            p.value
                        ),
                    ));
                }
                p.value
            }
        };
        let mut tables = BTreeMap::new();
        let mut names: HashMap<String, u32> = HashMap::new();
        for (i, t) in r.tables.iter().enumerate() {
            let at = |k: &str| format!("routing.tables[{i}].{k}");
            if matches!(t.id.value, 0 | 253..=255) {
                return Err(self.err(
                    &t.id,
                    at("id"),
                    format!("table {} is reserved (0 unspec, 253 default, 254 main, 255 local)", t.id.value),
                ));
            }
            let name = &t.name.value;
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')) {
                return Err(self.err(
                    &t.name,
                    at("name"),
                    format!("table name `{name}` must be A-Z a-z 0-9 - _"),
                ));
            }
            if name == "main" || name.parse::<u32>().is_ok() {
                return Err(self.err(
                    &t.name,
                    at("name"),
                    format!("`{name}` would be read as another table"),
                ));
            }
            if let Some(other) = tables.insert(t.id.value, name.clone()) {
                return Err(self.err(
                    &t.id,
                    at("id"),
                    format!("table id {} is already `{other}`", t.id.value),
                ));
            }
            if names.insert(name.clone(), t.id.value).is_some() {
                return Err(self.err(&t.name, at("name"), format!("table name `{name}` is declared twice")));
            }
        }

        let mut routes = Vec::new();
        let mut route_keys: HashMap<(u32, IpNet, Option<u32>), usize> = HashMap::new();
        for (i, rt) in r.routes.iter().enumerate() {
            let at = |k: &str| format!("routing.routes[{i}].{k}");
            let table = self.table_ref(&rt.table, at("table"), &names)?;
            let dst = match self.prefix(&rt.to, at("to"), "default")? {
                Some(net) => net,
                None => {
                    let v6 = rt.via.as_ref().is_some_and(|v| v.value.is_ipv6())
                        || rt.src.as_ref().is_some_and(|s| s.value.is_ipv6());
                    if v6 { IpNet::V6(ipnet::Ipv6Net::default()) } else { IpNet::default() }
                }
            };
            for (key, addr) in [("via", &rt.via), ("src", &rt.src)] {
                if let Some(a) = addr
                    && a.value.is_ipv4() != dst.addr().is_ipv4()
                {
                    return Err(self.err(
                        a,
                        at(key),
                        format!("{} and {dst} are of different address families", a.value),
                    ));
                }
            }
            let dev = self.ifname(&rt.dev, at("dev"))?;
            if rt.via.is_none() && dev.is_none() {
                return Err(self.err(&rt.to, at("via"), "a route needs `via` (a gateway), `dev`, or both"));
            }
            let metric = rt.metric.as_ref().map(|m| m.value);
            if let Some(first) = route_keys.insert((table, dst, metric), i) {
                return Err(self.err(
                    &rt.to,
                    at("to"),
                    format!("routing.routes[{first}] is already {dst} in this table with this metric"),
                ));
            }
            routes.push(RouteDecl {
                at: format!("routing.routes[{i}]"),
                table,
                dst,
                via: rt.via.as_ref().map(|v| v.value),
                dev,
                src: rt.src.as_ref().map(|s| s.value),
                metric,
            });
        }

        let mut rules = Vec::new();
        let mut rule_keys: HashMap<(bool, u32), usize> = HashMap::new();
        for (i, ru) in r.rules.iter().enumerate() {
            let at = |k: &str| format!("routing.rules[{i}].{k}");
            if !(1..=32765).contains(&ru.priority.value) {
                return Err(self.err(
                    &ru.priority,
                    at("priority"),
                    "priority must be 1-32765 (0, 32766 and 32767 hold the kernel's local, main and default rules)",
                ));
            }
            let table = self.table_ref(&ru.table, at("table"), &names)?;
            let from = match &ru.from {
                Some(f) => self.prefix(f, at("from"), "all")?,
                None => None,
            };
            let to = match &ru.to {
                Some(t) => self.prefix(t, at("to"), "all")?,
                None => None,
            };
            let v6 = match (ru.family.as_ref().map(|f| f.value), from.or(to)) {
                (Some(RawFamily::Ipv6), _) => true,
                (Some(RawFamily::Ipv4), _) | (None, None) => false,
                (None, Some(net)) => net.addr().is_ipv6(),
            };
            for (key, net, span) in [("from", from, &ru.from), ("to", to, &ru.to)] {
                if let (Some(net), Some(span)) = (net, span)
                    && net.addr().is_ipv6() != v6
                {
                    return Err(self.err(
                        span,
                        at(key),
                        format!("{net} is not of the rule's address family"),
                    ));
                }
            }
            let fwmark = match (&ru.fwmark, &ru.fwmask) {
                (Some(m), mask) => Some((m.value, mask.as_ref().map_or(u32::MAX, |k| k.value))),
                (None, Some(k)) => return Err(self.err(k, at("fwmask"), "a mask needs an `fwmark`")),
                (None, None) => None,
            };
            if let Some(first) = rule_keys.insert((v6, ru.priority.value), i) {
                return Err(self.err(
                    &ru.priority,
                    at("priority"),
                    format!(
                        "routing.rules[{first}] already has priority {} (the daemon tells its rules apart by priority)",
                        ru.priority.value
                    ),
                ));
            }
            rules.push(RuleDecl {
                at: format!("routing.rules[{i}]"),
                priority: ru.priority.value,
                v6,
                from,
                to,
                fwmark,
                iif: self.ifname(&ru.iif, at("iif"))?,
                oif: self.ifname(&ru.oif, at("oif"))?,
                table,
            });
        }

        let vip_routes = match &r.vip_routes {
            None => None,
            Some(v) => Some(VipRoutes {
                table: self.table_ref(&v.table, "routing.vip_routes.table".into(), &names)?,
                dev: self.ifname(&v.dev, "routing.vip_routes.dev".into())?.unwrap_or_else(|| "lo".into()),
            }),
        };
        Ok(RoutingConfig {
            protocol,
            tables,
            routes,
            rules,
            vip_routes,
            remove_on_stop: matches!(r.on_stop, Some(RawOnStop::Remove)),
        })
    }
}
