//! The diff writers: make the maps equal to a [`DataplaneState`], writing only what differs
//! from the last apply, in an order that never shows a packet a half-built service.

use super::*;

impl Dataplane {
    /// Makes the maps equal to `desired`, writing only the differences.
    pub fn apply(&mut self, desired: &DataplaneState) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        // Service ids that start a new generation this apply (a service new to its id): a
        // backend of theirs leaving or changing owner belonged to the id's previous holder,
        // whose counters went with it.
        let renumbered: BTreeSet<u32> = desired
            .services
            .iter()
            .filter(|(key, want)| self.services.get(key).map(|c| c.state.id) != Some(want.id))
            .map(|(_, want)| want.id)
            .collect();
        // The translator is in before the first NAT flow can start, and out only once no
        // backend is a NAT one.
        let nat = desired.backends.values().any(|b| b.nat != 0);
        if nat {
            self.set_nat_slots(true)?;
        }
        // Slots of new NAT backends before their flows can start; stale ones go at the end.
        let nat_sources = nat_source_slots(&desired.backends);
        self.set_nat_source_slots(nat_sources.difference(&self.nat_source_slots).copied().collect(), 1)?;
        // The pool before the backends that take their sources from it.
        if self.fullnat_pool != Some(desired.fullnat_pool) {
            let mut map: Array<&mut MapData, FullNatPool> = map_mut(&mut self.ebpf, maps::FULLNAT_POOL)?;
            map.set(0, desired.fullnat_pool, 0).map_err(map_err(maps::FULLNAT_POOL))?;
            self.fullnat_pool = Some(desired.fullnat_pool);
        }
        self.add_egress(&desired.egress_ifindexes)?;
        self.apply_backends(desired, &renumbered, &mut report)?;
        self.apply_services(desired, &renumbered, &mut report)?;
        self.apply_vip_addrs(desired)?;
        self.apply_mark_prefixes(desired, &mut report)?;
        self.apply_local_macs(desired)?;
        self.remove_backends(desired, &renumbered, &mut report)?;
        self.remove_egress(&desired.egress_ifindexes)?;
        let stale: Vec<u32> = self.nat_source_slots.difference(&nat_sources).copied().collect();
        self.set_nat_source_slots(stale, 0)?;
        if !nat {
            self.set_nat_slots(false)?;
        }
        Ok(report)
    }

    fn set_nat_source_slots(&mut self, slots: Vec<u32>, value: u8) -> Result<()> {
        let mut filter: Array<&mut MapData, u8> = map_mut(&mut self.ebpf, maps::NAT_SOURCE_FILTER)?;
        for slot in slots {
            filter.set(slot, value, 0).map_err(map_err(maps::NAT_SOURCE_FILTER))?;
            if value != 0 {
                self.nat_source_slots.insert(slot);
            } else {
                self.nat_source_slots.remove(&slot);
            }
        }
        Ok(())
    }

    /// Fills or empties the balancer's tail-call slots for NAT: empty, packets that are not
    /// a service's pass at the cost of one failed tail call.
    fn set_nat_slots(&mut self, filled: bool) -> Result<()> {
        if self.nat_slots == Some(filled) {
            return Ok(());
        }
        for (slot, name) in [
            (programs::NAT_FORWARD_SLOT, programs::NAT_FORWARD),
            (programs::NAT_ICMP_SLOT, programs::NAT_ICMP),
            (programs::NAT_FULL_REPLY_SLOT, programs::NAT_FULL_REPLY),
            (programs::NAT_REPLY_SLOT, programs::NAT_REPLY),
        ] {
            let program = xdp(&self.ebpf, name)?
                .fd()
                .and_then(|fd| fd.try_clone().map_err(ProgramError::from))
                .map_err(|source| DataplaneError::Program { name, source })?;
            let mut slots: ProgramArray<&mut MapData> = map_mut(&mut self.ebpf, maps::NAT_PROGRAMS)?;
            let res = if filled { slots.set(slot, &program, 0) } else { slots.clear_index(&slot) };
            match res {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                // Emptying an empty slot.
                Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) => {}
                Err(e) => return Err(map_err(maps::NAT_PROGRAMS)(e)),
            }
        }
        self.nat_slots = Some(filled);
        Ok(())
    }

    /// New egress interfaces go in before any backend refers to them.
    pub(super) fn add_egress(&mut self, wanted: &BTreeSet<u32>) -> Result<()> {
        let new: Vec<u32> = wanted.difference(&self.egress).copied().collect();
        let mut map: DevMapHash<&mut MapData> = map_mut(&mut self.ebpf, maps::EGRESS)?;
        for ifindex in new {
            map.insert(ifindex, ifindex, None, 0).map_err(|e| match e {
                XdpMapError::MapError(source) => DataplaneError::Map { map: maps::EGRESS, source },
                other => DataplaneError::Egress { ifindex, reason: crate::error_chain(&other) },
            })?;
            self.egress.insert(ifindex);
        }
        Ok(())
    }

    /// Old ones leave after no backend refers to them any more.
    pub(super) fn remove_egress(&mut self, wanted: &BTreeSet<u32>) -> Result<()> {
        let gone: Vec<u32> = self.egress.difference(wanted).copied().collect();
        let mut map: DevMapHash<&mut MapData> = map_mut(&mut self.ebpf, maps::EGRESS)?;
        for ifindex in gone {
            match map.remove(ifindex) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::EGRESS)(e)),
            }
            self.egress.remove(&ifindex);
        }
        Ok(())
    }

    pub(super) fn apply_backends(
        &mut self,
        desired: &DataplaneState,
        renumbered: &BTreeSet<u32>,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let mut changed = Vec::new();
        for (&id, b) in &desired.backends {
            if id >= MAX_BACKENDS {
                return Err(DataplaneError::IdRange { what: "backend", id, max: MAX_BACKENDS - 1 });
            }
            // Also unchanged entries of a service new to its id: their counters restart.
            if self.backends.get(&id) != Some(b) || renumbered.contains(&(b.service as u32)) {
                changed.push((id, *b));
            }
        }
        for (id, b) in changed {
            // A new owner of the id starts from zero, not from its predecessor's counts; a
            // backend of a service new to its id is a new owner too.
            let old = self.backends.get(&id).copied();
            let renumbered = |service: u16| renumbered.contains(&(service as u32));
            let same_owner = old
                .is_some_and(|old| old.addr == b.addr && old.service == b.service && !renumbered(b.service));
            if !same_owner {
                // The predecessor's service keeps what it counted, unless that service's
                // id goes to another now.
                match old {
                    Some(old) if !renumbered(old.service) => {
                        self.retire_backend_counters(id, old.service as u32)?
                    }
                    _ => self.zero_counters(id)?,
                }
            }
            let mut map: Array<&mut MapData, Backend> = map_mut(&mut self.ebpf, maps::BACKENDS)?;
            map.set(id, b, 0).map_err(map_err(maps::BACKENDS))?;
            self.backends.insert(id, b);
            report.backends_written += 1;
        }
        Ok(())
    }

    /// Backends leave after the services that referenced them have stopped doing so. The
    /// array slot is marked down rather than zeroed, so a flow still pointing at it is
    /// rescheduled instead of being sent to a zero MAC.
    pub(super) fn remove_backends(
        &mut self,
        desired: &DataplaneState,
        renumbered: &BTreeSet<u32>,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let gone: Vec<(u32, u32)> = self
            .backends
            .iter()
            .filter(|(id, _)| !desired.backends.contains_key(id))
            .map(|(id, b)| (*id, b.service as u32))
            .collect();
        for (id, service) in gone {
            let down = Backend { state: lb_common::BACKEND_DOWN, ..Default::default() };
            let mut map: Array<&mut MapData, Backend> = map_mut(&mut self.ebpf, maps::BACKENDS)?;
            map.set(id, down, 0).map_err(map_err(maps::BACKENDS))?;
            // Down, it counts no more: its service keeps what it counted, unless the
            // service's id went to another this apply.
            if renumbered.contains(&service) {
                self.zero_counters(id)?;
            } else {
                self.retire_backend_counters(id, service)?;
            }
            self.backends.remove(&id);
            report.backends_removed += 1;
        }
        Ok(())
    }

    pub(super) fn apply_services(
        &mut self,
        desired: &DataplaneState,
        renumbered: &BTreeSet<u32>,
        report: &mut ApplyReport,
    ) -> Result<()> {
        for (key, want) in &desired.services {
            if want.id >= MAX_SERVICES {
                return Err(DataplaneError::IdRange { what: "service", id: want.id, max: MAX_SERVICES - 1 });
            }
            let size = want.ring.len() as u32;
            // Bookkeeping changes only once the maps did: a failed apply leaves it true.
            let current = self.services.get(key).map(|c| Current {
                unchanged: c.state == *want,
                same_ring: c.state.ring == want.ring,
                live: c.live,
                generation: c.generation,
            });
            // Established flows follow a service through ring, weight and flag changes;
            // a new service, or one moved to another id, starts a new generation so that
            // flows recorded under the old one are scheduled afresh.
            let same_id = current.is_some() && !renumbered.contains(&want.id);
            let generation = match current {
                Some(c) if same_id => c.generation,
                _ => {
                    self.zero_counters(departed_stats_slot(want.id))?;
                    self.last_generation = self.last_generation.wrapping_add(1).max(1);
                    let mut gens: Array<&mut MapData, u32> =
                        map_mut(&mut self.ebpf, maps::SERVICE_GENERATIONS)?;
                    gens.set(want.id, self.last_generation, 0).map_err(map_err(maps::SERVICE_GENERATIONS))?;
                    self.last_generation
                }
            };
            // A window of a new size is filled before the service points at it, and the old
            // one is given back only after: a failure at any step leaves the maps and this
            // bookkeeping as they were.
            let (live, retired) = match current {
                Some(c) if c.unchanged => continue,
                // Only the flags (or the id) changed: the ring stays.
                Some(c) if c.same_ring => (c.live, None),
                // The same size: the slots that change, in place.
                Some(c) if c.live.size == size => {
                    self.write_ring(c.live, &want.ring)?;
                    report.rings_written += 1;
                    (c.live, None)
                }
                _ => {
                    let window = self.rings.alloc(size)?;
                    if let Err(e) = self.write_ring(window, &want.ring) {
                        self.rings.release(window);
                        return Err(e);
                    }
                    report.rings_written += 1;
                    (window, current.map(|c| c.live))
                }
            };
            let value = Service {
                id: want.id,
                ring_offset: live.offset,
                ring_size: size,
                flags: want.flags,
                generation,
                log_one_in: want.log_one_in,
            };
            let unmoved = current.is_some_and(|c| {
                same_id
                    && c.live == live
                    && self
                        .services
                        .get(key)
                        .is_some_and(|a| a.state.flags == want.flags && a.state.log_one_in == want.log_one_in)
            });
            if !unmoved {
                let mut map: HashMap<&mut MapData, ServiceKey, Service> =
                    map_mut(&mut self.ebpf, maps::SERVICES)?;
                map.insert(*key, value, 0).map_err(map_err(maps::SERVICES))?;
                report.services_written += 1;
            }
            if let Some(w) = retired {
                self.rings.release(w);
            }
            self.services.insert(*key, AppliedService { state: want.clone(), live, generation });
        }
        let gone: Vec<ServiceKey> =
            self.services.keys().filter(|k| !desired.services.contains_key(k)).copied().collect();
        for key in gone {
            let mut map: HashMap<&mut MapData, ServiceKey, Service> =
                map_mut(&mut self.ebpf, maps::SERVICES)?;
            match map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::SERVICES)(e)),
            }
            if let Some(old) = self.services.remove(&key) {
                self.rings.release(old.live);
                // Unless another service took the id in this apply, retire its flows.
                if !self.services.values().any(|s| s.state.id == old.state.id) {
                    let mut gens: Array<&mut MapData, u32> =
                        map_mut(&mut self.ebpf, maps::SERVICE_GENERATIONS)?;
                    gens.set(old.state.id, 0, 0).map_err(map_err(maps::SERVICE_GENERATIONS))?;
                }
            }
            report.services_removed += 1;
        }
        Ok(())
    }

    /// Writes `ring` into window `w`: only the slots whose value differs from what they
    /// hold. Maglev moves few slots between neighbouring rings, so a weight or health
    /// change writes the slots that changed, not the whole ring.
    pub(super) fn write_ring(&mut self, w: Window, ring: &[u32]) -> Result<()> {
        for (i, &backend) in ring.iter().enumerate() {
            if self.ring_memory.set(w.offset + i as u32, backend)? {
                self.ring_slots_written += 1;
            }
        }
        Ok(())
    }

    /// Ring slots written since the data path was loaded (for tests of minimal updates).
    pub fn ring_slots_written(&self) -> u64 {
        self.ring_slots_written
    }

    /// The ring a service's packets are scheduled on now, read back from the map.
    pub fn live_ring(&self, key: &ServiceKey) -> Result<Vec<u32>> {
        let Some(applied) = self.services.get(key) else { return Ok(Vec::new()) };
        self.read_window(applied.live)
    }

    pub(super) fn read_window(&self, w: Window) -> Result<Vec<u32>> {
        (w.offset..w.offset + w.size)
            .map(|i| {
                self.ring_memory.get(i).ok_or(DataplaneError::IdRange {
                    what: "ring slot",
                    id: i,
                    max: self.report.ring_slots.saturating_sub(1),
                })
            })
            .collect()
    }

    pub(super) fn apply_vip_addrs(&mut self, desired: &DataplaneState) -> Result<()> {
        let wanted = vip_addr_values(desired);
        let mut map: HashMap<&mut MapData, AddrKey, u32> = map_mut(&mut self.ebpf, maps::VIP_ADDRS)?;
        for (k, v) in &wanted {
            if self.vip_addrs.get(k) != Some(v) {
                map.insert(*k, *v, 0).map_err(map_err(maps::VIP_ADDRS))?;
            }
        }
        for k in self.vip_addrs.keys().filter(|k| !wanted.contains_key(k)) {
            match map.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::VIP_ADDRS)(e)),
            }
        }
        // Slots for new VIPs are set here, after their services were written; stale slots
        // are cleared after their services left: the filter never hides a live service.
        let slots: BTreeSet<u32> =
            wanted.keys().map(|k| vip_filter_slot(&k.addr, k.family == FAMILY_V6)).collect();
        let mut filter: Array<&mut MapData, u8> = map_mut(&mut self.ebpf, maps::VIP_FILTER)?;
        for &slot in slots.difference(&self.vip_slots) {
            filter.set(slot, 1, 0).map_err(map_err(maps::VIP_FILTER))?;
        }
        for &slot in self.vip_slots.difference(&slots) {
            filter.set(slot, 0, 0).map_err(map_err(maps::VIP_FILTER))?;
        }
        self.vip_slots = slots;
        self.vip_addrs = wanted;
        Ok(())
    }

    pub(super) fn apply_mark_prefixes(
        &mut self,
        desired: &DataplaneState,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let wanted: BTreeMap<(u8, [u32; 4], u8), MarkRuleSet> =
            desired.mark_prefixes.iter().map(|p| ((p.family, p.addr, p.prefix_len), p.rules)).collect();
        for (&(family, addr, len), rules) in &wanted {
            if self.mark_prefixes.get(&(family, addr, len)) == Some(rules) {
                continue;
            }
            if family == FAMILY_V4 {
                let mut map: LpmTrie<&mut MapData, u32, MarkRuleSet> =
                    map_mut(&mut self.ebpf, maps::MARK_RULES_V4)?;
                map.insert(&Key::new(len as u32, addr[0]), rules, 0).map_err(map_err(maps::MARK_RULES_V4))?;
            } else {
                let mut map: LpmTrie<&mut MapData, [u32; 4], MarkRuleSet> =
                    map_mut(&mut self.ebpf, maps::MARK_RULES_V6)?;
                map.insert(&Key::new(len as u32, addr), rules, 0).map_err(map_err(maps::MARK_RULES_V6))?;
            }
            report.mark_prefixes_written += 1;
        }
        let gone: Vec<(u8, [u32; 4], u8)> =
            self.mark_prefixes.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for (family, addr, len) in gone {
            let res = if family == FAMILY_V4 {
                let mut map: LpmTrie<&mut MapData, u32, MarkRuleSet> =
                    map_mut(&mut self.ebpf, maps::MARK_RULES_V4)?;
                map.remove(&Key::new(len as u32, addr[0]))
            } else {
                let mut map: LpmTrie<&mut MapData, [u32; 4], MarkRuleSet> =
                    map_mut(&mut self.ebpf, maps::MARK_RULES_V6)?;
                map.remove(&Key::new(len as u32, addr))
            };
            match res {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::MARK_RULES_V4)(e)),
            }
            report.mark_prefixes_removed += 1;
        }
        // Enable the trie lookups only once the tries hold what they should.
        let count = |f| wanted.keys().filter(|(family, _, _)| *family == f).count() as u32;
        let cfg = DataplaneConfig {
            mark_prefixes_v4: count(FAMILY_V4),
            mark_prefixes_v6: count(FAMILY_V6),
            flood_guard_flows_per_sec: desired.flood_guard_flows_per_sec,
            tunnel_source_v4: desired.tunnel_source_v4,
            tunnel_source_v6: desired.tunnel_source_v6,
            tunnel_spread_v4: desired.tunnel_spread_v4,
            tunnel_spread_v6: desired.tunnel_spread_v6,
        };
        if cfg != self.config {
            let mut map: Array<&mut MapData, DataplaneConfig> = map_mut(&mut self.ebpf, maps::CONFIG)?;
            map.set(0, cfg, 0).map_err(map_err(maps::CONFIG))?;
            self.config = cfg;
        }
        self.mark_prefixes = wanted;
        Ok(())
    }

    /// Writes the accepted MACs of every interface that has some, and removes the others.
    pub(super) fn apply_local_macs(&mut self, desired: &DataplaneState) -> Result<()> {
        if desired.local_macs.len() > MAX_ATTACHED_INTERFACES as usize {
            return Err(DataplaneError::TooManyInterfaces { count: desired.local_macs.len() });
        }
        let mut wanted = BTreeMap::new();
        for (&ifindex, macs) in &desired.local_macs {
            if macs.len() > MAX_LOCAL_MACS {
                return Err(DataplaneError::TooManyMacs { ifindex, count: macs.len() });
            }
            let mut value = LocalMacs { ifindex, count: macs.len() as u32, ..Default::default() };
            for (slot, mac) in value.macs.iter_mut().zip(macs) {
                *slot = *mac;
            }
            wanted.insert(ifindex, value);
        }
        // The lowest index folding to a slot holds it (`wanted` is in index order).
        let mut wanted_slots = BTreeMap::new();
        for (&ifindex, value) in &wanted {
            wanted_slots.entry(local_mac_slot(ifindex)).or_insert(*value);
        }
        // The hash gains an interface before a slot sends lookups there, and loses one
        // only after: a frame never finds its interface in neither.
        let mut map: HashMap<&mut MapData, u32, LocalMacs> = map_mut(&mut self.ebpf, maps::LOCAL_MACS)?;
        for (ifindex, value) in &wanted {
            if self.local_macs.get(ifindex) != Some(value) {
                map.insert(ifindex, value, 0).map_err(map_err(maps::LOCAL_MACS))?;
            }
        }
        let mut slots: Array<&mut MapData, LocalMacs> = map_mut(&mut self.ebpf, maps::LOCAL_MAC_SLOTS)?;
        let changed = wanted_slots.iter().filter(|(s, v)| self.local_mac_slots.get(s) != Some(v));
        let emptied = self.local_mac_slots.keys().filter(|s| !wanted_slots.contains_key(s));
        for (slot, value) in changed.map(|(s, v)| (*s, *v)).chain(emptied.map(|s| (*s, LocalMacs::default())))
        {
            slots.set(slot, value, 0).map_err(map_err(maps::LOCAL_MAC_SLOTS))?;
        }
        self.local_mac_slots = wanted_slots;
        let mut map: HashMap<&mut MapData, u32, LocalMacs> = map_mut(&mut self.ebpf, maps::LOCAL_MACS)?;
        for ifindex in self.local_macs.keys().filter(|i| !wanted.contains_key(i)) {
            match map.remove(ifindex) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::LOCAL_MACS)(e)),
            }
        }
        self.local_macs = wanted;
        Ok(())
    }
}

/// Each VIP address with its `VIP_ADDRS` value (`lb_common::vip_addr_value`): per
/// protocol, the port of the address's only service, if that service hashes the source
/// alone (`sh`): later fragments whose first was not seen are placed by its ring.
fn vip_addr_values(desired: &DataplaneState) -> BTreeMap<AddrKey, u32> {
    // Per address and protocol: the services' ports and whether each is source-hashed.
    let mut by_addr: BTreeMap<AddrKey, [Vec<(u16, bool)>; 2]> = BTreeMap::new();
    for (k, s) in desired.services.iter().filter(|(k, _)| k.kind != lb_common::KIND_MARK) {
        let key = AddrKey { addr: k.addr, family: k.kind, _pad8: 0, _pad16: 0 };
        let source_hashed =
            s.flags & (lb_common::SERVICE_F_HASH_TUPLE | lb_common::SERVICE_F_ROUND_ROBIN) == 0;
        let proto = usize::from(k.proto != lb_common::PROTO_TCP);
        by_addr.entry(key).or_default()[proto].push((u16::from_be(k.port), source_hashed));
    }
    let sole = |services: &[(u16, bool)]| match services {
        [(port, true)] => *port,
        _ => 0,
    };
    by_addr
        .into_iter()
        .map(|(k, [tcp, udp])| (k, lb_common::vip_addr_value(sole(&tcp), sole(&udp))))
        .collect()
}
