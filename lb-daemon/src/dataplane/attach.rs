//! Attaching programs to interfaces, pinning their links, taking over a previous daemon's
//! links, and removing what a stopped daemon left.

use super::*;

/// The link of attachment `id` as a descriptor this process owns, pinned at `pin` if given
/// (so that it outlives the process).
pub(super) fn owned_link(
    prog: &mut Xdp,
    id: aya::programs::xdp::XdpLinkId,
    iface: &str,
    pin: Option<&Path>,
) -> Result<FdLink> {
    let link_err = |reason: String| DataplaneError::PinLink {
        iface: iface.to_owned(),
        path: pin.map(Path::to_owned).unwrap_or_default(),
        reason,
    };
    let link =
        prog.take_link(id).map_err(|source| DataplaneError::Attach { iface: iface.to_owned(), source })?;
    let fd = FdLink::try_from(link)
        .map_err(|e| link_err(format!("{e} (the kernel offers no bpf_link for XDP)")))?;
    match pin {
        Some(path) => Ok(fd.pin(path).map_err(|e| link_err(crate::error_chain(&e)))?.into()),
        None => Ok(fd),
    }
}

/// Interfaces with a link pinned under `pin_dir`'s `links/`, in name order.
pub(super) fn linked_interfaces(pin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(links_dir(pin_dir))
        .map(|rd| rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

impl Dataplane {
    /// Attaches the balancer to `iface` (resolved in the calling thread's network namespace).
    ///
    /// With a pin directory the link is pinned, and a link a previous daemon pinned for
    /// `iface` is taken over by swapping this program into it (`bpf_link_update`): the
    /// interface never runs without a balancer.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<Attached> {
        let Some(dir) = self.pin_dir.clone() else {
            self.attach_program(programs::BALANCER, iface, mode)?;
            return Ok(Attached::New);
        };
        if self.links.contains_key(iface) {
            return Ok(Attached::Already);
        }
        let pin = links_dir(&dir).join(iface);
        let prog = self.program_mut(programs::BALANCER)?;
        let mut reused = false;
        let id = match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let fd: FdLink = pinned.into();
                match XdpLink::try_from(fd)
                    .map_err(|e| crate::error_chain(&e))
                    .and_then(|link| prog.attach_to_link(link).map_err(|e| crate::error_chain(&e)))
                {
                    Ok(id) => {
                        reused = true;
                        Some(id)
                    }
                    Err(reason) => {
                        // The interface went away (and maybe came back): its old link is
                        // defunct. Attach afresh.
                        tracing::warn!(iface, %reason, "pinned XDP link is unusable, attaching anew");
                        std::fs::remove_file(&pin)
                            .map_err(|source| DataplaneError::Pin { path: pin.clone(), source })?;
                        None
                    }
                }
            }
            Err(_) => None,
        };
        let id = match id {
            Some(id) => id,
            None => prog
                .attach(iface, mode.aya())
                .map_err(|source| DataplaneError::Attach { iface: iface.to_owned(), source })?,
        };
        let fd = owned_link(prog, id, iface, (!reused).then_some(pin.as_path()))?;
        self.links.insert(iface.to_owned(), fd);
        Ok(if reused { Attached::TookOver } else { Attached::New })
    }

    /// Interfaces with a link pinned under the pin directory (attached by any daemon run).
    pub fn pinned_interfaces(&self) -> Vec<String> {
        self.pin_dir.as_deref().map(linked_interfaces).unwrap_or_default()
    }

    /// Removes every pin under `pin_dir`: links first (the interfaces stop balancing), then
    /// the maps (freed once no program uses them). For `lb-daemon detach`.
    pub fn remove_pins(pin_dir: &Path) -> Result<Vec<String>> {
        let mut detached = Vec::new();
        for dir in [links_dir(pin_dir), maps_dir(pin_dir)] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(DataplaneError::Pin { path: dir, source }),
            };
            for entry in entries {
                let entry = entry.map_err(|source| DataplaneError::Pin { path: dir.clone(), source })?;
                std::fs::remove_file(entry.path())
                    .map_err(|source| DataplaneError::Pin { path: entry.path(), source })?;
                if dir.ends_with("links") {
                    detached.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
            std::fs::remove_dir(&dir).map_err(|source| DataplaneError::Pin { path: dir.clone(), source })?;
        }
        // Only if empty: anything else in there is not ours to delete.
        let _ = std::fs::remove_dir(pin_dir);
        Ok(detached)
    }

    /// Removes the balancer from `iface`: unpins its link, whichever daemon attached it.
    pub fn detach(&mut self, iface: &str) -> Result<()> {
        let Some(dir) = &self.pin_dir else { return Ok(()) };
        let pin = links_dir(dir).join(iface);
        self.links.remove(iface);
        match std::fs::remove_file(&pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DataplaneError::Pin { path: pin, source }),
        }
    }

    /// Attaches the pass-through program: the peer of a veth that receives redirected
    /// frames needs one before the kernel delivers them.
    pub fn attach_pass_through(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        self.attach_program(programs::PASS, iface, mode)
    }

    pub(super) fn attach_program(&mut self, name: &'static str, iface: &str, mode: XdpMode) -> Result<()> {
        let prog = self.program_mut(name)?;
        // The program owns the link: it stays attached for as long as this Dataplane lives.
        prog.attach(iface, mode.aya())
            .map_err(|source| DataplaneError::Attach { iface: iface.to_owned(), source })?;
        Ok(())
    }
}
