//! The real servers' side of tunnel forwarding: `lb-daemon decap attach|detach|status`
//! loads `lb-xdp-decap` on an interface of a real server, pins its link and maps (so it
//! stays after the command exits, and a later `attach` or `status` finds them), and keeps
//! the map of addresses that are this host's: only packets tunnelled to one of them are
//! decapsulated.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::Xdp;
use aya::programs::links::PinnedLink;
use aya::{Ebpf, EbpfLoader};
use lb_common::{AddrKey, decap};

use super::attach::{linked_interfaces, owned_link};
use super::{
    AyaMode as _, DataplaneError, Result, create_dir, links_dir, load_xdp, map_err, require_bpffs, xdp,
    xdp_mut,
};
use crate::model::{XdpMode, addr_words};

/// The decapsulation object built by `build.rs`.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp-decap"));

/// Where `decap` pins unless told otherwise.
pub const DEFAULT_DECAP_DIR: &str = "/sys/fs/bpf/lb-decap";

fn maps_dir(dir: &Path) -> PathBuf {
    dir.join(format!("maps-v{}", decap::MAP_LAYOUT_VERSION))
}

/// The loaded decapsulator. With a pin directory its maps are the pinned ones, shared by
/// every interface it is attached to.
pub struct Decapsulator {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
}

/// What `decap status` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecapStatus {
    pub interfaces: Vec<String>,
    pub local_addrs: Vec<IpAddr>,
    /// `lb_common::decap::NAMES` order, summed over CPUs.
    pub counters: Vec<(&'static str, u64)>,
}

impl Decapsulator {
    /// Loads the object and its program. With `pin_dir`, maps pinned there are reused.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
            require_bpffs(existing).map_err(|_| DataplaneError::NotBpffs { path: dir.to_owned() })?;
            for d in [dir.to_owned(), maps_dir(dir), links_dir(dir)] {
                create_dir(&d)?;
            }
            for name in [decap::LOCAL_ADDRS, decap::STATS] {
                loader.map_pin_path(name, maps_dir(dir).join(name));
            }
        }
        let mut ebpf = loader.load(DECAP_OBJECT)?;
        load_xdp(&mut ebpf, decap::PROGRAM)?;
        Ok(Decapsulator { ebpf, pin_dir: pin_dir.map(Path::to_owned) })
    }

    /// The program, for attaching or `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> Result<&Xdp> {
        xdp(&self.ebpf, decap::PROGRAM)
    }

    /// Adds outer destinations that are this host's.
    pub fn add_local_addrs(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let name = decap::LOCAL_ADDRS;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let mut local: HashMap<&mut MapData, AddrKey, u8> = HashMap::try_from(map).map_err(map_err(name))?;
        for addr in addrs {
            let (family, words) = addr_words(*addr);
            local
                .insert(AddrKey { addr: words, family, _pad8: 0, _pad16: 0 }, 1, 0)
                .map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Attaches to `iface` (in the calling thread's namespace) and pins the link, so that
    /// the program stays when this process ends. Already attached: nothing changes.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<bool> {
        let Some(dir) = self.pin_dir.clone() else {
            return Err(DataplaneError::PinLink {
                iface: iface.to_owned(),
                path: PathBuf::new(),
                reason: "no pin directory".into(),
            });
        };
        let pin = links_dir(&dir).join(iface);
        if PinnedLink::from_pin(&pin).is_ok() {
            return Ok(false);
        }
        let prog = xdp_mut(&mut self.ebpf, decap::PROGRAM)?;
        let id = prog
            .attach(iface, mode.aya())
            .map_err(|source| DataplaneError::Attach { iface: iface.to_owned(), source })?;
        owned_link(prog, id, iface, Some(&pin))?;
        Ok(true)
    }

    /// Removes the decapsulator from `iface`; says whether it was attached. The maps stay
    /// while another interface uses them, and go with the last one.
    pub fn detach(pin_dir: &Path, iface: &str) -> Result<bool> {
        let pin = links_dir(pin_dir).join(iface);
        match std::fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(DataplaneError::Pin { path: pin, source }),
        }
        if linked_interfaces(pin_dir).is_empty() {
            for name in [decap::LOCAL_ADDRS, decap::STATS] {
                let path = maps_dir(pin_dir).join(name);
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(DataplaneError::Pin { path, source: e });
                    }
                    _ => {}
                }
            }
            for d in [maps_dir(pin_dir), links_dir(pin_dir), pin_dir.to_owned()] {
                let _ = std::fs::remove_dir(d);
            }
        }
        Ok(true)
    }

    /// Counters, local addresses and interfaces of what `attach` pinned.
    pub fn status(&self) -> Result<DecapStatus> {
        let name = decap::STATS;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
        let mut counters = Vec::new();
        for (i, label) in decap::NAMES {
            counters.push((label, stats.get(&i, 0).map_err(map_err(name))?.iter().sum()));
        }
        let name = decap::LOCAL_ADDRS;
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        let local: HashMap<&MapData, AddrKey, u8> = HashMap::try_from(map).map_err(map_err(name))?;
        let mut local_addrs: Vec<IpAddr> = local
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| crate::model::addr_of(k.family, &k.addr))
            .collect();
        local_addrs.sort();
        Ok(DecapStatus {
            interfaces: self.pin_dir.as_deref().map(linked_interfaces).unwrap_or_default(),
            local_addrs,
            counters,
        })
    }
}

/// Whether anything is pinned for the decapsulator under `pin_dir`.
pub fn decap_pinned(pin_dir: &Path) -> bool {
    maps_dir(pin_dir).join(decap::STATS).exists()
}
