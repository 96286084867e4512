//! Addresses and service keys as the data path holds them.

use std::net::IpAddr;

use lb_common::{FAMILY_V4, FAMILY_V6, KIND_MARK, PROTO_TCP, PROTO_UDP, ServiceKey};

use super::service::{Protocol, ServiceMatch};

/// The match a service key was made from (for ids read back from adopted maps).
pub fn service_match_of(key: &ServiceKey) -> Option<ServiceMatch> {
    if key.kind == KIND_MARK {
        return Some(ServiceMatch::Mark(key.addr[0]));
    }
    let proto = match key.proto {
        PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        _ => return None,
    };
    let addr = addr_of(key.kind, &key.addr)?;
    Some(ServiceMatch::Vip { addr, port: u16::from_be(key.port), proto })
}

/// Inverse of [`addr_words`].
pub fn addr_of(family: u8, words: &[u32; 4]) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(words[0].to_ne_bytes().into())),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(o.into()))
        }
        _ => None,
    }
}

/// Network-order words of an address, as the data path keeps it.
pub fn addr_words(addr: IpAddr) -> (u8, [u32; 4]) {
    match addr {
        IpAddr::V4(a) => (FAMILY_V4, [u32::from_ne_bytes(a.octets()), 0, 0, 0]),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (FAMILY_V6, [w(0), w(4), w(8), w(12)])
        }
    }
}

pub fn service_key(m: &ServiceMatch) -> ServiceKey {
    match *m {
        ServiceMatch::Vip { addr, port, proto } => {
            let (kind, words) = addr_words(addr);
            ServiceKey { addr: words, port: port.to_be(), proto: proto.number(), kind }
        }
        ServiceMatch::Mark(mark) => ServiceKey { addr: [mark, 0, 0, 0], port: 0, proto: 0, kind: KIND_MARK },
    }
}
