//! Pure planning: (services, mark rules, neighbours) -> the state the maps should hold.
//!
//! No I/O. The [`Planner`] remembers which id it gave each service and backend, so that a
//! re-plan after any change keeps ids (and with them counters and connection-table
//! entries) for everything that stayed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use lb_common::{
    BACKEND_DOWN, BACKEND_UP, Backend, FullNatPool, MAX_BACKENDS, MAX_MARK_RULES_PER_PREFIX, MAX_SERVICES,
    MarkRule, MarkRuleSet, NAT_FULL, NAT_MASQ, SERVICE_F_HASH_TUPLE, SERVICE_F_PASS_WHEN_EMPTY,
    SERVICE_F_ROUND_ROBIN, ServiceKey,
};

use crate::maglev;
use crate::model::{
    BackendSpec, BackendState, FallbackAction, Forward, MarkRuleSpec, Neighbour, Protocol, RingCandidate,
    RingError, Scheduler, ServiceMatch, ServiceSpec, addr_of, addr_words, service_key, service_match_of,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("service {service}")]
    Ring { service: String, source: RingError },
    #[error("more than {max} services")]
    TooManyServices { max: u32 },
    #[error("more than {max} backends over all services")]
    TooManyBackends { max: u32 },
    #[error("destination prefix {prefix} falls under more than {max} mark rules")]
    TooManyRules { prefix: IpNet, max: usize },
    #[error("mark rule for {dst}: source {src} is not of the same address family")]
    MixedFamilies { dst: IpNet, src: IpNet },
}

/// One service as the data path should see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceState {
    /// Index of the service's counters; stable across applies.
    pub id: u32,
    pub flags: u32,
    /// Maglev ring (backend ids); its length is the ring size. Empty: no backend available.
    pub ring: Vec<u32>,
    /// One new flow in this many is reported to the connection log; 0: none.
    pub log_one_in: u32,
}

/// A fwmark-style rule as written into the tries. `dst` addresses are network-order words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkPrefix {
    pub family: u8,
    pub addr: [u32; 4],
    pub prefix_len: u8,
    pub rules: MarkRuleSet,
}

/// Everything the maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataplaneState {
    pub services: BTreeMap<ServiceKey, ServiceState>,
    pub backends: BTreeMap<u32, Backend>,
    pub mark_prefixes: Vec<MarkPrefix>,
    /// Interfaces that packets may be redirected to.
    pub egress_ifindexes: BTreeSet<u32>,
    /// Per receiving interface (ifindex), the destination MACs whose frames are the
    /// director's: its own address and any configured beside it. An interface absent here
    /// accepts every unicast frame.
    pub local_macs: BTreeMap<u32, BTreeSet<[u8; 6]>>,
    /// `DataplaneConfig::flood_guard_flows_per_sec`; zero: no guard.
    pub flood_guard_flows_per_sec: u32,
    /// Outer sources of tunnel headers and the host bits flows spread over
    /// (`DataplaneConfig::tunnel_source_*`, `tunnel_spread_*`); see [`DataplaneState::set_tunnel_sources`].
    pub tunnel_source_v4: u32,
    pub tunnel_source_v6: [u32; 4],
    pub tunnel_spread_v4: u32,
    pub tunnel_spread_v6: u32,
    /// `FULLNAT_POOL[0]`: `director.fullnat_source`; see [`DataplaneState::set_fullnat_sources`].
    pub fullnat_pool: FullNatPool,
}

/// Source prefixes as the data path holds them (network order): each family's base and
/// the host bits a flow's hash fills (IPv6: of the last word).
fn source_words(v4: Option<ipnet::Ipv4Net>, v6: Option<ipnet::Ipv6Net>) -> (u32, u32, [u32; 4], u32) {
    (
        v4.map_or(0, |n| u32::from_ne_bytes(n.network().octets())),
        v4.map_or(0, |n| u32::from_ne_bytes(n.hostmask().octets())),
        v6.map_or([0; 4], |n| addr_words(IpAddr::V6(n.network())).1),
        v6.map_or(0, |n| {
            let m = n.hostmask().octets();
            u32::from_ne_bytes([m[12], m[13], m[14], m[15]])
        }),
    )
}

impl DataplaneState {
    /// `director.fullnat_source` in the data path's words, as [`Self::set_tunnel_sources`].
    pub fn set_fullnat_sources(&mut self, v4: Option<ipnet::Ipv4Net>, v6: Option<ipnet::Ipv6Net>) {
        let (v4, spread_v4, v6, spread_v6) = source_words(v4, v6);
        self.fullnat_pool = FullNatPool { v4, spread_v4, v6, spread_v6 };
    }

    /// `director.tunnel_source` in the data path's words (network order); a prefix's host
    /// bits become the spread each flow's hash fills.
    pub fn set_tunnel_sources(&mut self, v4: Option<ipnet::Ipv4Net>, v6: Option<ipnet::Ipv6Net>) {
        (self.tunnel_source_v4, self.tunnel_spread_v4, self.tunnel_source_v6, self.tunnel_spread_v6) =
            source_words(v4, v6);
    }
}

/// Ids recorded in adopted maps, for [`crate::plan::Planner::seed`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdoptedIds {
    pub services: Vec<(ServiceKey, u32)>,
    /// (key of the owning service, backend address words and family, backend id).
    pub backends: Vec<(ServiceKey, u8, [u32; 4], u32)>,
    /// Backends the adopted maps were sending new and established flows to (up), by the
    /// same key and address.
    pub serving: Vec<(ServiceKey, u8, [u32; 4])>,
}

/// The result of planning: the state, and backends left out because their link-layer
/// address is unknown (they count as down until resolved).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub state: DataplaneState,
    pub unresolved: BTreeSet<(String, IpAddr)>,
    /// Backend id of each (service name, backend address), for status and metrics.
    pub backend_ids: BTreeMap<(String, IpAddr), u32>,
    pub service_ids: BTreeMap<String, u32>,
    /// Services whose new flows go to their fallback now.
    pub fallback_serving: BTreeSet<String>,
    /// Each service's ring fingerprint (`model::fingerprint`), by name: equal on every
    /// director that holds the same table.
    pub ring_fingerprints: BTreeMap<String, u32>,
}

/// Hands out small integer ids and reuses those whose owner is gone.
#[derive(Clone, Debug)]
struct Ids<K> {
    max: u32,
    by_key: HashMap<K, u32>,
}

impl<K: std::hash::Hash + Eq + Clone> Ids<K> {
    fn new(max: u32) -> Self {
        Ids { max, by_key: HashMap::new() }
    }

    /// Keeps the ids of `keys` that had one, gives free ids to the others, forgets the rest.
    fn assign(&mut self, keys: &[K]) -> Option<HashMap<K, u32>> {
        let wanted: std::collections::HashSet<&K> = keys.iter().collect();
        self.by_key.retain(|k, _| wanted.contains(k));
        let mut used: BTreeSet<u32> = self.by_key.values().copied().collect();
        let mut next = 0u32;
        for k in keys {
            if self.by_key.contains_key(k) {
                continue;
            }
            while used.contains(&next) {
                next += 1;
            }
            if next >= self.max {
                return None;
            }
            used.insert(next);
            self.by_key.insert(k.clone(), next);
        }
        Some(self.by_key.clone())
    }
}

/// What a service's ring is computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RingInputs {
    scheduler: Scheduler,
    size: u32,
    candidates: Vec<RingCandidate>,
}

/// Stateful in the ids it remembers between plans, and in the rings of the last plan
/// (reused where their inputs did not change: planning 1,000 services after one weight
/// change computes one ring).
#[derive(Clone, Debug)]
pub struct Planner {
    service_ids: Ids<ServiceMatch>,
    backend_ids: Ids<(ServiceMatch, IpAddr)>,
    /// The ring of each service and its fingerprint.
    rings: HashMap<ServiceMatch, (RingInputs, Vec<u32>, u32)>,
}

impl Default for Planner {
    fn default() -> Self {
        Planner {
            service_ids: Ids::new(MAX_SERVICES),
            backend_ids: Ids::new(MAX_BACKENDS),
            rings: HashMap::new(),
        }
    }
}

fn mark_rule(r: &MarkRuleSpec) -> Result<MarkRule, PlanError> {
    let (src, src_mask) = match r.src {
        None => ([0; 4], [0; 4]),
        Some(net) => {
            if net.addr().is_ipv4() != r.dst.addr().is_ipv4() {
                return Err(PlanError::MixedFamilies { dst: r.dst, src: net });
            }
            let (_, mask) = addr_words(net.netmask());
            let (_, addr) = addr_words(net.network());
            (addr, mask)
        }
    };
    Ok(MarkRule {
        src,
        src_mask,
        port_lo: r.ports.0,
        port_hi: r.ports.1,
        proto: r.proto.map_or(0, Protocol::number),
        _pad: [0; 3],
        mark: r.mark,
    })
}

/// One trie entry per distinct destination prefix, holding the rules of every prefix that
/// covers it, in config order: the trie returns only the longest match, and that entry
/// must still let an earlier, broader rule win.
fn mark_prefixes(rules: &[MarkRuleSpec]) -> Result<Vec<MarkPrefix>, PlanError> {
    let prefixes: BTreeSet<IpNet> = rules.iter().map(|r| r.dst.trunc()).collect();
    let mut out = Vec::with_capacity(prefixes.len());
    for prefix in prefixes {
        let mut set = MarkRuleSet::default();
        for r in rules.iter().filter(|r| r.dst.trunc().contains(&prefix)) {
            let slot = set.count as usize;
            if slot >= MAX_MARK_RULES_PER_PREFIX {
                return Err(PlanError::TooManyRules { prefix, max: MAX_MARK_RULES_PER_PREFIX });
            }
            set.rules[slot] = mark_rule(r)?;
            set.count += 1;
        }
        let (family, addr) = addr_words(prefix.network());
        out.push(MarkPrefix { family, addr, prefix_len: prefix.prefix_len(), rules: set });
    }
    Ok(out)
}

impl Planner {
    /// Starts from the ids a previous daemon wrote into the maps, so that flows recorded
    /// under them keep meaning the same service and backend after a restart.
    pub fn seed(&mut self, ids: &AdoptedIds) {
        for (key, id) in &ids.services {
            if let Some(m) = service_match_of(key) {
                self.service_ids.by_key.insert(m, *id);
            }
        }
        for (key, family, words, id) in &ids.backends {
            if let (Some(m), Some(addr)) = (service_match_of(key), addr_of(*family, words)) {
                self.backend_ids.by_key.insert((m, addr), *id);
            }
        }
    }

    pub fn plan(
        &mut self,
        services: &[ServiceSpec],
        mark_rules: &[MarkRuleSpec],
        neighbours: &HashMap<IpAddr, Neighbour>,
    ) -> Result<Plan, PlanError> {
        // Ids are assigned on copies and kept only if the whole plan succeeds: a refused
        // config must not move the ids (and with them the flows) of the running one.
        let (mut next_service_ids, mut next_backend_ids) =
            (self.service_ids.clone(), self.backend_ids.clone());
        let matchers: Vec<ServiceMatch> = services.iter().map(|s| s.matcher).collect();
        let service_ids =
            next_service_ids.assign(&matchers).ok_or(PlanError::TooManyServices { max: MAX_SERVICES })?;
        let backend_keys: Vec<(ServiceMatch, IpAddr)> = services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.addr).chain(s.fallback).map(|a| (s.matcher, a)))
            .collect();
        let backend_ids =
            next_backend_ids.assign(&backend_keys).ok_or(PlanError::TooManyBackends { max: MAX_BACKENDS })?;

        let mut plan = Plan::default();
        let mut rings = HashMap::with_capacity(services.len());
        for svc in services {
            let id = service_ids[&svc.matcher];
            plan.service_ids.insert(svc.name.clone(), id);
            // The fallback comes last and counts only while the others have no weight; it
            // stays up otherwise, so that flows it took finish there (as if drained).
            let fallback = svc.fallback.map(|addr| BackendSpec {
                addr,
                weight: 1,
                state: BackendState::Active,
                forward: svc.forward,
                port: None,
            });
            let mut candidates = Vec::new();
            for b in svc.backends.iter().chain(fallback.as_ref()) {
                let bid = backend_ids[&(svc.matcher, b.addr)];
                plan.backend_ids.insert((svc.name.clone(), b.addr), bid);
                let (family, addr) = addr_words(b.addr);
                let neighbour = neighbours.get(&b.addr);
                if neighbour.is_none() {
                    plan.unresolved.insert((svc.name.clone(), b.addr));
                }
                let up = b.state != BackendState::Disabled && neighbour.is_some();
                let n = neighbour.copied().unwrap_or(Neighbour {
                    mac: [0; 6],
                    ifindex: 0,
                    if_mac: [0; 6],
                    vlan: 0,
                    mtu: 0,
                });
                plan.state.backends.insert(
                    bid,
                    Backend {
                        addr,
                        dst_mac: n.mac,
                        src_mac: n.if_mac,
                        ifindex: n.ifindex,
                        family,
                        state: if up { BACKEND_UP } else { BACKEND_DOWN },
                        // Ids are below MAX_SERVICES (4096).
                        service: id as u16,
                        vlan: n.vlan,
                        tunnel: u8::from(b.forward == Forward::Tunnel),
                        nat: match b.forward {
                            Forward::Nat => NAT_MASQ,
                            Forward::FullNat => NAT_FULL,
                            Forward::Dr | Forward::Tunnel => 0,
                        },
                        mtu: n.mtu,
                        port: b.port.map_or(0, u16::to_be),
                    },
                );
                if up {
                    plan.state.egress_ifindexes.insert(n.ifindex);
                }
                let weight = if up && b.state == BackendState::Active { b.weight } else { 0 };
                candidates.push(RingCandidate { key: b.addr.to_string(), id: bid, weight });
            }
            if fallback.is_some()
                && let Some((sorry, real)) = candidates.split_last_mut()
            {
                if real.iter().any(|c| c.weight > 0) {
                    sorry.weight = 0;
                } else if sorry.weight > 0 {
                    plan.fallback_serving.insert(svc.name.clone());
                }
            }
            // A ring is a function of its inputs: one whose inputs did not change (every
            // service but the one whose weight or backend did) is not computed again.
            let inputs = RingInputs { scheduler: svc.scheduler, size: svc.ring_size, candidates };
            let (ring, fingerprint) = match self.rings.remove(&svc.matcher) {
                Some((cached, ring, fingerprint)) if cached == inputs => (ring, fingerprint),
                _ => {
                    let ring = match svc.scheduler {
                        Scheduler::Wrr => crate::wrr::sequence(&inputs.candidates, svc.ring_size),
                        Scheduler::Sh | Scheduler::Mh => maglev::populate(&inputs.candidates, svc.ring_size),
                    }
                    .map_err(|source| PlanError::Ring { service: svc.name.clone(), source })?;
                    let fingerprint = crate::model::fingerprint(&ring, &inputs.candidates);
                    (ring, fingerprint)
                }
            };
            plan.ring_fingerprints.insert(svc.name.clone(), fingerprint);
            rings.insert(svc.matcher, (inputs, ring.clone(), fingerprint));
            let mut flags = match svc.scheduler {
                Scheduler::Sh => 0,
                Scheduler::Mh => SERVICE_F_HASH_TUPLE,
                Scheduler::Wrr => SERVICE_F_ROUND_ROBIN,
            };
            if svc.fallback_action == FallbackAction::Pass {
                flags |= SERVICE_F_PASS_WHEN_EMPTY;
            }
            plan.state.services.insert(
                service_key(&svc.matcher),
                ServiceState { id, flags, ring, log_one_in: svc.log_connections },
            );
        }
        plan.state.mark_prefixes = mark_prefixes(mark_rules)?;
        self.service_ids = next_service_ids;
        self.backend_ids = next_backend_ids;
        self.rings = rings;
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn neighbours(addrs: &[IpAddr]) -> HashMap<IpAddr, Neighbour> {
        addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                (
                    *a,
                    Neighbour {
                        mac: [2, 0, 0, 0, 1, i as u8],
                        ifindex: 7,
                        if_mac: [2, 0, 0, 0, 0, 9],
                        vlan: 0,
                        mtu: 0,
                    },
                )
            })
            .collect()
    }

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn web(backends: &[(&str, u32, BackendState)]) -> ServiceSpec {
        let backends = backends
            .iter()
            .map(|(a, w, s)| BackendSpec { state: *s, ..BackendSpec::active(v4(a), *w) })
            .collect();
        ServiceSpec::tcp("web", v4("192.0.2.10"), 80, 4093, backends)
    }

    #[test]
    fn directors_reading_the_file_in_another_order_hold_the_same_rings() {
        use BackendState::Active;
        let addrs = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"];
        let backends: Vec<(&str, u32, BackendState)> =
            addrs.iter().zip([100, 50, 100, 25]).map(|(a, w)| (*a, w, Active)).collect();
        let mut api = web(&backends);
        api.name = "api".into();
        api.matcher = ServiceMatch::Vip { addr: v4("192.0.2.11"), port: 443, proto: Protocol::Tcp };
        let lb1 = vec![web(&backends), api.clone()];
        // lb2's file lists the services and each one's backends the other way round.
        let mut lb2: Vec<ServiceSpec> = lb1.iter().rev().cloned().collect();
        for s in &mut lb2 {
            s.backends.reverse();
        }
        let n = neighbours(&addrs.map(v4));
        let plan1 = Planner::default().plan(&lb1, &[], &n).unwrap();
        let plan2 = Planner::default().plan(&lb2, &[], &n).unwrap();
        // Each director numbers its backends in the order it reads them...
        assert_ne!(plan1.backend_ids, plan2.backend_ids);
        // ...and yet every slot holds the same server on both.
        for svc in &lb1 {
            let slots = |plan: &Plan| -> Vec<IpAddr> {
                let by_id: HashMap<u32, IpAddr> = plan
                    .backend_ids
                    .iter()
                    .filter(|((s, _), _)| *s == svc.name)
                    .map(|((_, a), id)| (*id, *a))
                    .collect();
                plan.state.services[&service_key(&svc.matcher)].ring.iter().map(|id| by_id[id]).collect()
            };
            assert_eq!(slots(&plan1), slots(&plan2), "{}", svc.name);
        }
        assert_eq!(plan1.ring_fingerprints, plan2.ring_fingerprints);
        assert!(plan1.ring_fingerprints.values().all(|&f| f != 0));
        // A different table shows: another weight, or a server drained.
        let mut heavier = lb1.clone();
        heavier[0].backends[3].weight = 26;
        let plan3 = Planner::default().plan(&heavier, &[], &n).unwrap();
        assert_ne!(plan3.ring_fingerprints["web"], plan1.ring_fingerprints["web"]);
        assert_eq!(plan3.ring_fingerprints["api"], plan1.ring_fingerprints["api"]);
        let mut drained = lb1.clone();
        drained[1].backends[0].state = BackendState::Drain;
        let plan4 = Planner::default().plan(&drained, &[], &n).unwrap();
        assert_ne!(plan4.ring_fingerprints["api"], plan1.ring_fingerprints["api"]);
        // A server listed with weight 0 holds no slot: the table, and its fingerprint, stay.
        let mut spare = lb1.clone();
        spare[0].backends.push(BackendSpec {
            addr: v4("10.1.0.9"),
            weight: 0,
            state: BackendState::Active,
            forward: Forward::Dr,
            port: None,
        });
        let with_spare = n.clone().into_iter().chain(neighbours(&[v4("10.1.0.9")])).collect();
        let plan5 = Planner::default().plan(&spare, &[], &with_spare).unwrap();
        assert_eq!(plan5.ring_fingerprints, plan1.ring_fingerprints);
        // No backend: no table, fingerprint 0.
        let empty = Planner::default().plan(&[web(&[])], &[], &n).unwrap();
        assert_eq!(empty.ring_fingerprints["web"], 0);
    }

    #[test]
    fn service_keys_and_addresses_read_back() {
        for m in [
            ServiceMatch::Vip { addr: v4("192.0.2.10"), port: 443, proto: Protocol::Tcp },
            ServiceMatch::Vip { addr: "2001:db8::7".parse().unwrap(), port: 53, proto: Protocol::Udp },
            ServiceMatch::Mark(77),
        ] {
            assert_eq!(service_match_of(&service_key(&m)), Some(m));
        }
    }

    #[test]
    fn a_seeded_planner_keeps_the_ids_of_the_maps() {
        use AdoptedIds;
        let all = [v4("10.1.0.1"), v4("10.1.0.2")];
        let n = neighbours(&all);
        let svc = web(&[("10.1.0.1", 1, BackendState::Active), ("10.1.0.2", 1, BackendState::Active)]);
        let key = service_key(&svc.matcher);
        let (f, w1) = addr_words(v4("10.1.0.1"));
        let (_, w2) = addr_words(v4("10.1.0.2"));
        // Ids a fresh planner would not choose: a previous daemon's history.
        let ids = AdoptedIds {
            services: vec![(key, 9)],
            backends: vec![(key, f, w1, 40), (key, f, w2, 3)],
            serving: vec![],
        };
        let mut p = Planner::default();
        p.seed(&ids);
        let plan = p.plan(&[svc], &[], &n).unwrap();
        assert_eq!(plan.service_ids["web"], 9);
        assert_eq!(plan.backend_ids[&("web".to_string(), v4("10.1.0.1"))], 40);
        assert_eq!(plan.backend_ids[&("web".to_string(), v4("10.1.0.2"))], 3);
        assert_eq!(plan.state.backends[&40].service, 9, "the backend records its owner");
    }

    #[test]
    fn ids_survive_replans_and_are_reused() {
        let all = [v4("10.1.0.1"), v4("10.1.0.2"), v4("10.1.0.3")];
        let n = neighbours(&all);
        let mut p = Planner::default();
        use BackendState::Active as A;
        let first = p.plan(&[web(&[("10.1.0.1", 1, A), ("10.1.0.2", 1, A)])], &[], &n).unwrap();
        let second = p.plan(&[web(&[("10.1.0.2", 1, A), ("10.1.0.3", 1, A)])], &[], &n).unwrap();
        let id = |plan: &Plan, a: &str| plan.backend_ids[&("web".to_string(), v4(a))];
        assert_eq!(id(&first, "10.1.0.2"), id(&second, "10.1.0.2"));
        assert_eq!(id(&second, "10.1.0.3"), id(&first, "10.1.0.1"), "the freed id is reused");
        assert_eq!(first.service_ids, second.service_ids);
    }

    #[test]
    fn a_failed_plan_changes_no_ids() {
        let all = [v4("10.1.0.1"), v4("10.1.0.2"), v4("10.1.0.3")];
        let n = neighbours(&all);
        use BackendState::Active as A;
        let named = |name: &str, last: u8, backend: &str| {
            let mut s = web(&[(backend, 1, A)]);
            s.name = name.into();
            s.matcher =
                ServiceMatch::Vip { addr: v4(&format!("192.0.2.{last}")), port: 80, proto: Protocol::Tcp };
            s
        };
        let (a, b, x) = (named("a", 1, "10.1.0.1"), named("b", 2, "10.1.0.2"), named("x", 3, "10.1.0.3"));
        let mut p = Planner::default();
        let first = p.plan(&[a.clone(), b.clone()], &[], &n).unwrap();
        // Refused (not a prime): a config without "a" that adds "x".
        let mut broken_b = b.clone();
        broken_b.ring_size = 4096;
        assert!(p.plan(&[x.clone(), broken_b], &[], &n).is_err());
        // The next valid config keeps "a" and "b" and adds "x": their ids must not move.
        let next = p.plan(&[a, b, x], &[], &n).unwrap();
        for name in ["a", "b"] {
            assert_eq!(first.service_ids[name], next.service_ids[name], "service {name}");
        }
        for (key, id) in &first.backend_ids {
            assert_eq!(next.backend_ids[key], *id, "backend {key:?}");
        }
    }

    #[test]
    fn the_fallback_fills_the_ring_only_while_no_backend_has_weight() {
        use BackendState::{Active, Drain};
        let all = [v4("10.1.0.1"), v4("10.1.0.2"), v4("10.1.0.9")];
        let n = neighbours(&all);
        let mut p = Planner::default();
        let with = |state, weight| {
            let mut s = web(&[("10.1.0.1", weight, state), ("10.1.0.2", 0, Active)]);
            s.fallback = Some(v4("10.1.0.9"));
            s
        };
        let ring = |plan: &Plan| plan.state.services[&service_key(&web(&[]).matcher)].ring.clone();
        let serving = p.plan(&[with(Drain, 5)], &[], &n).unwrap();
        let sorry = serving.backend_ids[&("web".to_string(), v4("10.1.0.9"))];
        assert!(ring(&serving).iter().all(|&b| b == sorry), "drained and weight 0: the fallback takes all");
        assert!(serving.fallback_serving.contains("web"));
        let standby = p.plan(&[with(Active, 5)], &[], &n).unwrap();
        let real = standby.backend_ids[&("web".to_string(), v4("10.1.0.1"))];
        assert!(ring(&standby).iter().all(|&b| b == real));
        assert!(standby.fallback_serving.is_empty());
        assert_eq!(standby.state.backends[&sorry].state, BACKEND_UP, "its flows finish there");
        // An unresolved fallback cannot serve: the ring stays empty and the action applies.
        let lost = p.plan(&[with(Drain, 5)], &[], &neighbours(&all[..2])).unwrap();
        assert!(ring(&lost).is_empty() && lost.fallback_serving.is_empty());
        let mut pass = with(Drain, 5);
        pass.fallback_action = FallbackAction::Pass;
        let plan = p.plan(&[pass], &[], &n).unwrap();
        let flags = plan.state.services[&service_key(&web(&[]).matcher)].flags;
        assert_eq!(flags & SERVICE_F_PASS_WHEN_EMPTY, SERVICE_F_PASS_WHEN_EMPTY);
    }

    #[test]
    fn drain_leaves_the_ring_but_stays_up_and_disabled_goes_down() {
        let all = [v4("10.1.0.1"), v4("10.1.0.2"), v4("10.1.0.3")];
        let mut p = Planner::default();
        let plan = p
            .plan(
                &[web(&[
                    ("10.1.0.1", 1, BackendState::Active),
                    ("10.1.0.2", 1, BackendState::Drain),
                    ("10.1.0.3", 1, BackendState::Disabled),
                ])],
                &[],
                &neighbours(&all),
            )
            .unwrap();
        let svc = plan.state.services.values().next().unwrap();
        let active = plan.backend_ids[&("web".to_string(), v4("10.1.0.1"))];
        assert!(svc.ring.iter().all(|&b| b == active));
        let state = |a: &str| plan.state.backends[&plan.backend_ids[&("web".to_string(), v4(a))]].state;
        assert_eq!(
            (state("10.1.0.1"), state("10.1.0.2"), state("10.1.0.3")),
            (BACKEND_UP, BACKEND_UP, BACKEND_DOWN)
        );
    }

    #[test]
    fn unresolved_backends_are_reported_and_kept_out() {
        let mut p = Planner::default();
        let plan = p.plan(&[web(&[("10.1.0.1", 1, BackendState::Active)])], &[], &HashMap::new()).unwrap();
        assert_eq!(plan.unresolved, BTreeSet::from([("web".to_string(), v4("10.1.0.1"))]));
        assert!(plan.state.services.values().next().unwrap().ring.is_empty());
    }

    #[test]
    fn broader_mark_rules_are_copied_under_narrower_prefixes() {
        let rule = |mark, dst: &str, ports| MarkRuleSpec {
            mark,
            dst: dst.parse().unwrap(),
            proto: Some(Protocol::Tcp),
            ports,
            src: None,
        };
        let rules = [rule(1, "192.0.2.0/24", (80, 80)), rule(2, "192.0.2.10/32", (443, 443))];
        let prefixes = mark_prefixes(&rules).unwrap();
        assert_eq!(prefixes.len(), 2);
        let narrow = prefixes.iter().find(|p| p.prefix_len == 32).unwrap();
        assert_eq!(narrow.rules.count, 2);
        assert_eq!((narrow.rules.rules[0].mark, narrow.rules.rules[1].mark), (1, 2));
        let broad = prefixes.iter().find(|p| p.prefix_len == 24).unwrap();
        assert_eq!(broad.rules.count, 1);
        assert_eq!(broad.addr[0], u32::from_ne_bytes(Ipv4Addr::new(192, 0, 2, 0).octets()));
    }

    #[test]
    fn source_prefix_is_masked_in_network_order() {
        let r = MarkRuleSpec {
            mark: 3,
            dst: "192.0.2.0/24".parse().unwrap(),
            proto: None,
            ports: (1, 65535),
            src: Some("198.51.100.77/25".parse().unwrap()),
        };
        let m = mark_rule(&r).unwrap();
        assert_eq!(m.src[0].to_ne_bytes(), [198, 51, 100, 0]);
        assert_eq!(m.src_mask[0].to_ne_bytes(), [255, 255, 255, 128]);
        assert_eq!(m.proto, 0);
        let bad = MarkRuleSpec { src: Some("2001:db8::/32".parse().unwrap()), ..r };
        assert!(matches!(mark_rule(&bad), Err(PlanError::MixedFamilies { .. })));
    }
}
