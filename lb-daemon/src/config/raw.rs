//! The YAML model: what serde reads, each value with its place in the file (`Spanned`), so
//! that validation can point at it. Nothing here decides what is valid beyond the shape.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use super::routing;
use crate::model::Protocol;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) director: RawDirector,
    #[serde(default)]
    pub(super) marks: Vec<RawMark>,
    #[serde(default)]
    pub(super) services: Vec<RawService>,
    #[serde(default)]
    pub(super) routing: Option<routing::RawRouting>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDirector {
    pub(super) interfaces: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) xdp_mode: Option<RawXdpMode>,
    #[serde(default)]
    pub(super) metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub(super) control_socket: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub(super) overrides_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub(super) connection_log: Option<Spanned<RawConnectionLog>>,
    #[serde(default)]
    pub(super) bpf_dir: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub(super) connection_table_size: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) ring_slots: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) accept_macs: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) flood_guard_flows_per_sec: Option<Spanned<u32>>,
    /// Outer sources of tunnel headers: an address or a prefix, one per family.
    #[serde(default)]
    pub(super) tunnel_source: Vec<Spanned<String>>,
    /// Sources of full-NAT flows: an address or a prefix the director owns, one per
    /// family.
    #[serde(default)]
    pub(super) fullnat_source: Vec<Spanned<String>>,
}

/// `forward:`, named as in keepalived's `lb_kind`.
#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawForward {
    Dr,
    Tunnel,
    Nat,
    Fullnat,
}

impl From<RawForward> for crate::model::Forward {
    fn from(f: RawForward) -> Self {
        match f {
            RawForward::Dr => Self::Dr,
            RawForward::Tunnel => Self::Tunnel,
            RawForward::Nat => Self::Nat,
            RawForward::Fullnat => Self::FullNat,
        }
    }
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawXdpMode {
    Native,
    Generic,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawProto {
    Tcp,
    Udp,
}

impl From<RawProto> for Protocol {
    fn from(p: RawProto) -> Self {
        match p {
            RawProto::Tcp => Protocol::Tcp,
            RawProto::Udp => Protocol::Udp,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMark {
    pub(super) mark: Spanned<u32>,
    pub(super) dst: Spanned<IpNet>,
    #[serde(default)]
    pub(super) src: Option<Spanned<IpNet>>,
    #[serde(default)]
    pub(super) proto: Option<RawProto>,
    #[serde(default)]
    pub(super) ports: Option<PortRanges>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: Spanned<String>,
    #[serde(rename = "match")]
    pub(super) matcher: Spanned<RawMatch>,
    #[serde(default)]
    pub(super) scheduler: Option<RawScheduler>,
    #[serde(default)]
    pub(super) forward: Option<Spanned<RawForward>>,
    #[serde(default)]
    pub(super) ring_size: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) backends: Vec<RawBackend>,
    #[serde(default)]
    pub(super) check: Option<RawCheck>,
    #[serde(default)]
    pub(super) fallback: Option<Spanned<IpAddr>>,
    #[serde(default)]
    pub(super) fallback_action: Option<RawFallbackAction>,
    /// One new connection in this many goes to `director.connection_log`.
    #[serde(default)]
    pub(super) log_connections: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnectionLog {
    pub(super) file: Spanned<PathBuf>,
    #[serde(default)]
    pub(super) max_file_bytes: Option<Spanned<u64>>,
    #[serde(default)]
    pub(super) keep_files: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) max_events_per_sec: Option<Spanned<u32>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawFallbackAction {
    Drop,
    Pass,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawCheckType {
    Tcp,
    Http,
    Exec,
    Icmp,
    Https,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheck {
    #[serde(rename = "type")]
    pub(super) kind: Spanned<RawCheckType>,
    #[serde(default)]
    pub(super) port: Option<Spanned<u16>>,
    #[serde(default)]
    pub(super) path: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) host: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) expect_status: Option<Spanned<Vec<u16>>>,
    #[serde(default)]
    pub(super) expect_body: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) argv: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) tls_verify: Option<Spanned<bool>>,
    #[serde(default)]
    pub(super) ca_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub(super) interval: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) jitter: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) source: Option<Spanned<IpAddr>>,
    #[serde(default)]
    pub(super) via_tunnel: Option<Spanned<bool>>,
    #[serde(default)]
    pub(super) warning_weight_percent: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) initial_state: Option<RawInitialState>,
    #[serde(default)]
    pub(super) rise: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) fall: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) fall_within: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) flap: Option<RawFlap>,
    #[serde(default)]
    pub(super) on_down: Option<RawOnDown>,
    #[serde(default)]
    pub(super) on_change: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) on_change_timeout: Option<Spanned<String>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawInitialState {
    Up,
    Down,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawOnDown {
    Reschedule,
    Keep,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFlap {
    pub(super) changes: Spanned<u32>,
    pub(super) within: Spanned<u32>,
    #[serde(default)]
    pub(super) hold: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    #[serde(default)]
    pub(super) vip: Option<Spanned<IpAddr>>,
    #[serde(default)]
    pub(super) port: Option<Spanned<u16>>,
    #[serde(default)]
    pub(super) proto: Option<RawProto>,
    #[serde(default)]
    pub(super) fwmark: Option<Spanned<u32>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawScheduler {
    Sh,
    Mh,
    Wrr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) address: Spanned<IpAddr>,
    #[serde(default)]
    pub(super) port: Option<Spanned<u16>>,
    #[serde(default)]
    pub(super) weight: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) state: Option<RawBackendState>,
    #[serde(default)]
    pub(super) forward: Option<Spanned<RawForward>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawBackendState {
    Active,
    Drain,
    Disabled,
}

/// Destination ports of a mark rule: `80`, `"8000-8099"`, `"80,443"`, or a list of those.
#[derive(Debug)]
pub(super) struct PortRanges(pub(super) Vec<(u16, u16)>);

pub(super) fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range 1-65535")),
        Err(_) => Err(format!("`{}` is not a port number", s.trim())),
    }
}

pub(super) fn parse_ranges(s: &str, out: &mut Vec<(u16, u16)>) -> Result<(), String> {
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("empty port range in `{s}`"));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (parse_port(lo)?, parse_port(hi)?),
            None => {
                let p = parse_port(part)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!("port range {lo}-{hi} is inverted (write {hi}-{lo})"));
        }
        out.push((lo, hi));
    }
    Ok(())
}

impl<'de> Deserialize<'de> for PortRanges {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PortRanges;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port, a range such as \"8000-8099\", or a list of them")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRanges, E> {
                let p = parse_port(&v.to_string()).map_err(E::custom)?;
                Ok(PortRanges(vec![(p, p)]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRanges, E> {
                Err(E::custom(format!("port {v} is out of range 1-65535")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRanges, E> {
                let mut out = Vec::new();
                parse_ranges(v, &mut out).map_err(E::custom)?;
                Ok(PortRanges(out))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PortRanges, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<PortRanges>()? {
                    out.extend(item.0);
                }
                if out.is_empty() {
                    return Err(de::Error::custom("the port list is empty; leave `ports` out to match all"));
                }
                Ok(PortRanges(out))
            }
        }
        d.deserialize_any(V)
    }
}
