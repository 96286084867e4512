//! `lb-daemon status --json`: the status for scripts. These types are the schema (the
//! doc comments become its descriptions; `docs/status.schema.json` is generated from them
//! and a test keeps it equal). Fields are added in later versions; none is removed or
//! changes meaning without `schema_version` going up.

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::{ForcedState, ServiceMatch};
use crate::snapshot::Snapshot;

/// This module's `schema_version`.
pub const SCHEMA_VERSION: u32 = 1;

/// What `lb-daemon status --json` prints: one object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "lb-daemon status")]
pub struct Status {
    /// The version of this schema (1).
    pub schema_version: u32,
    /// The daemon's version.
    pub version: String,
    /// SHA-256 of the config file in force, as `sha256sum` prints it.
    pub config_sha256: String,
    /// Why the last reload failed (the previous config still serves); absent after a
    /// successful one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload_error: Option<String>,
    /// Attached interfaces.
    pub interfaces: Vec<Interface>,
    /// Entries in the connection table, and how many it holds.
    pub connection_table: Table,
    /// How old the connection counts are, in milliseconds: one walk of the connection
    /// table (about a second per million entries) serves every request for 3 seconds.
    /// A count taken before a change (a drain) does not show it yet.
    pub connection_counts_age_ms: u64,
    /// Services in the config's order.
    pub services: Vec<Service>,
    /// Runtime overrides (`lb-daemon drain|disable|weight`), stale ones included.
    pub overrides: Vec<OverrideEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Interface {
    pub name: String,
    /// `native` or `generic`.
    pub xdp_mode: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Table {
    pub entries: u64,
    pub capacity: u64,
    /// New flows that took the way of a flow seen in the last 10 s, counted since the
    /// data path's maps were created: when it grows, the table is too small for the
    /// traffic.
    #[serde(default)]
    pub evicted_recent: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Service {
    pub name: String,
    /// What the service matches: a VIP, port and protocol, or a fwmark.
    #[serde(rename = "match")]
    pub matcher: Match,
    /// `sh`, `mh` or `wrr`.
    pub scheduler: String,
    /// The service's forwarding method as `ipvsadm -L` names it: `Route`, `Tunnel`,
    /// `Masq`, `FullNat`.
    pub forward: String,
    pub ring_size: u32,
    /// What the ring holds, 8 hex digits; equal on directors that send every flow to
    /// the same backend. `00000000`: no backend takes new flows.
    pub ring_fingerprint: String,
    /// Packets, bytes and new connections balanced since the data path was loaded.
    pub counters: Counters,
    pub backends: Vec<Backend>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Match {
    Vip {
        vip: IpAddr,
        port: u16,
        /// `tcp` or `udp`.
        protocol: String,
    },
    Fwmark {
        fwmark: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Backend {
    pub address: IpAddr,
    /// The port packets are sent to when it is not the service's (NAT backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `Route`, `Tunnel`, `Masq` or `FullNat`.
    pub forward: String,
    /// The weight in force (the file's, an override's, or what a check asked for).
    pub weight: u32,
    /// `active`, `drain`, `disabled`, `unresolved`, `down`, `timeout`, `fallback` or
    /// `standby` (see docs/operating.md, "Status").
    pub state: String,
    /// Established TCP connections (ipvsadm ActiveConn), from a walk of the connection
    /// table at most 3 seconds old.
    pub active_connections: u64,
    /// Other live entries: TCP not established, UDP (ipvsadm InActConn).
    pub inactive_connections: u64,
    pub counters: Counters,
    /// What a runtime override replaces of the file's state and weight; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "override")]
    pub overridden: Option<Override>,
    /// The last health check's outcome (`ok`, `warning`, `critical`, `unknown`,
    /// `director_error`); absent for an unchecked backend or before the first check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_outcome: Option<String>,
    /// What the last check said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Override {
    /// `drain` or `disabled`; absent when only the weight is overridden.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OverrideEntry {
    pub service: String,
    pub backend: IpAddr,
    #[serde(flatten)]
    pub set: Override,
    /// The file no longer has this service or backend: the override is kept (for when
    /// it comes back) but changes nothing.
    pub stale: bool,
}

fn override_of(o: &crate::model::Override) -> Override {
    Override { state: o.state.map(|s: ForcedState| s.name().to_owned()), weight: o.weight }
}

fn counters_of(c: &lb_common::Counters) -> Counters {
    Counters { packets: c.packets, bytes: c.bytes, connections: c.new_flows }
}

impl Status {
    pub fn of(snap: &Snapshot) -> Status {
        Status {
            schema_version: SCHEMA_VERSION,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config_sha256: snap.config_digest.clone(),
            last_reload_error: snap.last_reload_error.clone(),
            interfaces: snap
                .interfaces
                .iter()
                .map(|(name, mode)| Interface {
                    name: name.clone(),
                    xdp_mode: match mode {
                        crate::model::XdpMode::Native => "native",
                        crate::model::XdpMode::Generic => "generic",
                    }
                    .to_owned(),
                })
                .collect(),
            connection_table: Table {
                entries: snap.flow_entries,
                capacity: snap.flow_capacity.into(),
                evicted_recent: snap.flows_evicted_recent,
            },
            connection_counts_age_ms: snap.conn_counts_age.as_millis() as u64,
            services: snap
                .services
                .iter()
                .map(|s| Service {
                    name: s.name.clone(),
                    matcher: match s.matcher {
                        ServiceMatch::Vip { addr, port, proto } => {
                            Match::Vip { vip: addr, port, protocol: proto.name().to_owned() }
                        }
                        ServiceMatch::Mark(fwmark) => Match::Fwmark { fwmark },
                    },
                    scheduler: s.scheduler.name().to_owned(),
                    forward: s.forward.ipvs_name().to_owned(),
                    ring_size: s.ring_size,
                    ring_fingerprint: format!("{:08x}", s.ring_fingerprint),
                    counters: counters_of(&s.counters),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| Backend {
                            address: b.addr,
                            port: b.port,
                            forward: b.forward.ipvs_name().to_owned(),
                            weight: b.weight,
                            state: b.status.name().to_owned(),
                            active_connections: b.active,
                            inactive_connections: b.inactive,
                            counters: counters_of(&b.counters),
                            overridden: b.overridden.as_ref().map(override_of),
                            last_check_outcome: b.last_outcome.map(str::to_owned),
                            last_check: b.last_check.clone(),
                        })
                        .collect(),
                })
                .collect(),
            overrides: snap
                .overrides
                .iter()
                .map(|o| OverrideEntry {
                    service: o.service.clone(),
                    backend: o.backend,
                    set: override_of(&o.set),
                    stale: o.stale,
                })
                .collect(),
        }
    }

    /// The backend `addr` of every service `service` names (`None`: all services).
    pub fn backends<'a>(
        &'a self,
        service: Option<&'a str>,
        addr: IpAddr,
    ) -> impl Iterator<Item = (&'a Service, &'a Backend)> {
        self.services
            .iter()
            .filter(move |s| service.is_none_or(|n| s.name == n))
            .flat_map(move |s| s.backends.iter().filter(move |b| b.address == addr).map(move |b| (s, b)))
    }
}

/// The control socket's `connections json`: each backend's connection counts and state,
/// without the packet counters (reading those for every backend is most of what a `status
/// json` costs the daemon), for `lb-daemon wait-drained`, which asks every second.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Connections {
    /// As in [`Status`].
    pub connection_counts_age_ms: u64,
    pub backends: Vec<BackendConnections>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendConnections {
    pub service: String,
    pub address: IpAddr,
    pub weight: u32,
    /// As [`Backend::state`].
    pub state: String,
    pub active_connections: u64,
    pub inactive_connections: u64,
}

impl Connections {
    pub fn of(snap: &Snapshot) -> Connections {
        Connections {
            connection_counts_age_ms: snap.conn_counts_age.as_millis() as u64,
            backends: snap
                .services
                .iter()
                .flat_map(|s| {
                    s.backends.iter().map(|b| BackendConnections {
                        service: s.name.clone(),
                        address: b.addr,
                        weight: b.weight,
                        state: b.status.name().to_owned(),
                        active_connections: b.active,
                        inactive_connections: b.inactive,
                    })
                })
                .collect(),
        }
    }

    /// The backend `addr` of every service `service` names (`None`: all services).
    pub fn backends<'a>(
        &'a self,
        service: Option<&'a str>,
        addr: IpAddr,
    ) -> impl Iterator<Item = &'a BackendConnections> {
        self.backends.iter().filter(move |b| b.address == addr && service.is_none_or(|n| b.service == n))
    }
}

/// [`Connections::of`] as one line of JSON.
pub fn render_connections(snap: &Snapshot) -> Result<String, serde_json::Error> {
    let mut text = serde_json::to_string(&Connections::of(snap))?;
    text.push('\n');
    Ok(text)
}

/// The JSON Schema of [`Status`], pretty-printed, as `docs/status.schema.json` holds it.
pub fn schema() -> String {
    let schema = schemars::schema_for!(Status);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// [`Status::of`] as one line of JSON.
pub fn render(snap: &Snapshot) -> Result<String, serde_json::Error> {
    let mut text = serde_json::to_string(&Status::of(snap))?;
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_schema_is_the_one_the_types_make() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/status.schema.json");
        let documented = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            documented == schema(),
            "docs/status.schema.json differs from the types: run `cargo run -p lb-daemon -- status --json-schema > docs/status.schema.json`"
        );
    }

    #[test]
    fn a_status_survives_the_round_trip_and_names_fields_as_documented() {
        let snap = Snapshot {
            services: vec![crate::snapshot::ServiceSnapshot {
                name: "web".into(),
                matcher: ServiceMatch::Mark(7),
                scheduler: crate::model::Scheduler::Sh,
                ring_size: 4093,
                ring_fingerprint: 0xab,
                forward: crate::model::Forward::Nat,
                counters: lb_common::Counters { packets: 3, bytes: 300, new_flows: 1 },
                backends: vec![crate::snapshot::BackendSnapshot {
                    port: Some(8080),
                    forward: crate::model::Forward::Nat,
                    active: 2,
                    inactive: 1,
                    overridden: Some(crate::model::Override {
                        state: Some(ForcedState::Drain),
                        weight: None,
                    }),
                    ..crate::snapshot::BackendSnapshot::quiet(
                        "10.0.2.11".parse().unwrap(),
                        0,
                        crate::snapshot::BackendStatus::Drain,
                    )
                }],
            }],
            config_digest: "ab12".into(),
            ..Default::default()
        };
        let text = render(&snap).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["services"][0]["match"]["fwmark"], 7);
        assert_eq!(value["services"][0]["ring_fingerprint"], "000000ab");
        let b = &value["services"][0]["backends"][0];
        assert_eq!((b["state"].as_str(), b["active_connections"].as_u64()), (Some("drain"), Some(2)));
        assert_eq!(b["override"]["state"], "drain");
        assert!(b.get("last_check").is_none(), "absent, not null: {b}");
        let back: Status = serde_json::from_str(&text).unwrap();
        assert_eq!(back, Status::of(&snap));
        assert_eq!(back.backends(None, "10.0.2.11".parse().unwrap()).count(), 1);
        assert_eq!(back.backends(Some("other"), "10.0.2.11".parse().unwrap()).count(), 0);

        // `connections json` tells what `status json` does of each backend's connections.
        let conns: Connections = serde_json::from_str(&render_connections(&snap).unwrap()).unwrap();
        let addr = "10.0.2.11".parse().unwrap();
        let found: Vec<_> = conns.backends(Some("web"), addr).collect();
        assert_eq!(found.len(), 1);
        let (_, full) = back.backends(Some("web"), addr).next().unwrap();
        assert_eq!(
            (
                found[0].state.as_str(),
                found[0].weight,
                found[0].active_connections,
                found[0].inactive_connections
            ),
            (full.state.as_str(), full.weight, full.active_connections, full.inactive_connections)
        );
        assert_eq!(conns.backends(Some("other"), addr).count(), 0);
    }
}
