//! `lb-daemon decap attach|detach|status`, run on a real server: no config file, no
//! daemon; the program and its maps stay pinned between commands.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use crate::dataplane::decap::{Decapsulator, decap_pinned};
use crate::model::XdpMode;

use super::{ControlError, Result};

/// The addresses `iface` holds now: tunnelled packets to any of them are decapsulated.
fn interface_addrs(iface: &str) -> Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| ControlError::Io { what: "listing interface addresses".into(), source: e.into() })?;
    let mut out: Vec<IpAddr> = addrs
        .filter(|a| a.interface_name == iface)
        .filter_map(|a| {
            let a = a.address?;
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Attaches the decapsulator to `iface` (or, attached already, refreshes the addresses it
/// decapsulates for: the interface's own and `extra`).
pub fn attach(pin_dir: &Path, iface: &str, mode: XdpMode, extra: &[IpAddr]) -> Result<String> {
    if nix::net::if_::if_nametoindex(iface).is_err() {
        return Err(ControlError::NoSuchInterface(iface.to_owned()));
    }
    let mut addrs = interface_addrs(iface)?;
    addrs.extend_from_slice(extra);
    if addrs.is_empty() {
        return Err(ControlError::Io {
            what: format!("{iface} has no address, and none was given with --local"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let mut d = Decapsulator::load(Some(pin_dir))?;
    d.add_local_addrs(&addrs)?;
    let new = d.attach(iface, mode)?;
    let list = addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    Ok(if new {
        format!("decapsulating on {iface} for {list}")
    } else {
        format!("already attached to {iface}; decapsulating for {list}")
    })
}

pub fn detach(pin_dir: &Path, iface: &str) -> Result<String> {
    Ok(if Decapsulator::detach(pin_dir, iface)? {
        format!("detached from {iface}")
    } else {
        format!("nothing was attached to {iface}")
    })
}

pub fn status(pin_dir: &Path) -> Result<String> {
    if !decap_pinned(pin_dir) {
        return Ok(format!("not attached anywhere (nothing pinned under {})\n", pin_dir.display()));
    }
    let s = Decapsulator::load(Some(pin_dir))?.status()?;
    let mut out = String::new();
    let list = |v: Vec<String>| if v.is_empty() { "none".to_owned() } else { v.join(", ") };
    let _ = writeln!(out, "interfaces: {}", list(s.interfaces));
    let _ =
        writeln!(out, "local addresses: {}", list(s.local_addrs.iter().map(ToString::to_string).collect()));
    for (name, n) in s.counters {
        let _ = writeln!(out, "{name:<28} {n}");
    }
    Ok(out)
}
