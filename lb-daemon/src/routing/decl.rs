//! What the configuration declares about routing (tables, routes, rules, VIP routes) and
//! what the kernel should hold: plain data for `config` to build and `policy` to reconcile.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

/// A route the config declares; `at` names it in errors (`routing.routes[2]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteDecl {
    pub at: String,
    pub table: u32,
    pub dst: IpNet,
    pub via: Option<IpAddr>,
    pub dev: Option<String>,
    pub src: Option<IpAddr>,
    pub metric: Option<u32>,
}

/// A rule the config declares (`ip rule add ...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleDecl {
    pub at: String,
    pub priority: u32,
    /// The address family: rules exist per family.
    pub v6: bool,
    pub from: Option<IpNet>,
    pub to: Option<IpNet>,
    /// (mark, mask).
    pub fwmark: Option<(u32, u32)>,
    pub iif: Option<String>,
    pub oif: Option<String>,
    pub table: u32,
}

/// Where VIP host routes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipRoutes {
    pub table: u32,
    pub dev: String,
}

/// The `routing:` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingConfig {
    pub protocol: u8,
    /// Table names by id, for logs and status.
    pub tables: BTreeMap<u32, String>,
    pub routes: Vec<RouteDecl>,
    pub rules: Vec<RuleDecl>,
    pub vip_routes: Option<VipRoutes>,
    /// On a clean stop, remove every route and rule of the daemon's protocol (default:
    /// leave them, as forwarding goes on).
    pub remove_on_stop: bool,
}

impl RoutingConfig {
    pub fn table_name(&self, id: u32) -> String {
        match self.tables.get(&id) {
            Some(name) => format!("{name} ({id})"),
            None => id.to_string(),
        }
    }
}

/// What the kernel should hold: the config's objects plus the VIP routes of `vips_up`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intent {
    pub config: Option<RoutingConfig>,
    pub vips_up: BTreeSet<IpAddr>,
    /// How long a VIP that had no server up must be up again before its route goes back:
    /// the time its services' checks take to confirm a recovered server (see
    /// `control::vip_hold`). VIPs without checks have none.
    pub vip_settle: BTreeMap<IpAddr, std::time::Duration>,
}
