//! Runtime overrides over the control socket: the request lines (`drain web 10.0.2.11`),
//! what the daemon does with them, and the state file that keeps them across reloads and
//! restarts (JSON, written whole to a temporary file and renamed, so that a crash leaves
//! the old file or the new one).

use std::io::Write as _;

use crate::model::{ForcedState, Override, OverrideChange, Overrides, ServiceSelector};

use super::*;

/// A state file is a few lines per override; anything this long is not one.
const MAX_STATE_FILE: u64 = 16 << 20;
/// The state file's format; a daemon refuses a file of a version it does not know.
const STATE_VERSION: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    overrides: Vec<StateEntry>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StateEntry {
    service: String,
    backend: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<ForcedState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
}

/// The overrides a state file holds; none when it does not exist. A file that cannot be
/// read is an error, not "no overrides": starting without them would put drained
/// servers back in the middle of an upgrade.
pub(super) fn load(path: &Path) -> Result<Overrides> {
    let what = || {
        format!("reading the overrides file {} (fix it, or remove it to drop every override)", path.display())
    };
    let file = match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Overrides::default()),
        other => other.map_err(io(what()))?,
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_STATE_FILE + 1), &mut text)
        .map_err(io(what()))?;
    if text.len() as u64 > MAX_STATE_FILE {
        return Err(ControlError::Io {
            what: what(),
            source: std::io::Error::other(format!("longer than {MAX_STATE_FILE} bytes")),
        });
    }
    let state: StateFile =
        serde_json::from_str(&text).map_err(|e| ControlError::Io { what: what(), source: e.into() })?;
    if state.version != STATE_VERSION {
        return Err(ControlError::Io {
            what: what(),
            source: std::io::Error::other(format!(
                "version {} (this daemon knows {STATE_VERSION})",
                state.version
            )),
        });
    }
    Ok(Overrides::from_entries(
        state
            .overrides
            .into_iter()
            .map(|e| ((e.service, e.backend), Override { state: e.state, weight: e.weight })),
    ))
}

/// Writes `overrides` to `path`, durably, replacing the file in one step.
pub(super) fn save(path: &Path, overrides: &Overrides) -> Result<()> {
    let what = || format!("writing the overrides file {}", path.display());
    let state = StateFile {
        version: STATE_VERSION,
        overrides: overrides
            .iter()
            .map(|((service, backend), o)| StateEntry {
                service: service.to_owned(),
                backend,
                state: o.state,
                weight: o.weight,
            })
            .collect(),
    };
    let text =
        serde_json::to_vec_pretty(&state).map_err(|e| ControlError::Io { what: what(), source: e.into() })?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io(what()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp).map_err(io(what()))?;
    file.write_all(&text)
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(io(what()))?;
    std::fs::rename(&tmp, path).map_err(io(what()))?;
    // The rename itself must reach the disk before the command says it is done.
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(what()))
}

/// A request line that changes overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum OverrideRequest {
    Change { selector: ServiceSelector, backend: IpAddr, change: OverrideChange },
    Clear,
}

/// `drain|disable|enable SERVICE|all BACKEND`, `weight SERVICE|all BACKEND N`,
/// `overrides clear`; `None` when the line is none of these, `Err` with what is wrong when
/// it is one of them badly written.
pub(super) fn parse_request(line: &str) -> Option<std::result::Result<OverrideRequest, String>> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (verb, args) = words.split_first()?;
    let change = |args: &[&str], change: OverrideChange| {
        let [service, backend] = args else {
            return Err(format!("usage: {verb} SERVICE|all BACKEND"));
        };
        let backend = backend.parse().map_err(|_| {
            format!(
                "`{}` is not an IP address (a backend is named by its address)",
                crate::config::shorten(backend)
            )
        })?;
        let selector = match *service {
            "all" => ServiceSelector::All,
            name => ServiceSelector::Named(name.to_owned()),
        };
        Ok(OverrideRequest::Change { selector, backend, change })
    };
    Some(match *verb {
        "drain" => change(args, OverrideChange::Force(ForcedState::Drain)),
        "disable" => change(args, OverrideChange::Force(ForcedState::Disabled)),
        "enable" => change(args, OverrideChange::Enable),
        "weight" => match args {
            [service, backend, weight] => match weight.parse::<u32>() {
                Ok(w) => change(&[service, backend], OverrideChange::Weight(w)),
                Err(_) => Err(format!("weight `{}` is not a number", crate::config::shorten(weight))),
            },
            _ => Err("usage: weight SERVICE|all BACKEND N".to_owned()),
        },
        "overrides" => match args {
            ["clear"] => Ok(OverrideRequest::Clear),
            _ => Err("usage: overrides clear".to_owned()),
        },
        _ => return None,
    })
}

impl Daemon {
    /// Carries out `request`: applied to the data path, then saved, or neither.
    pub(super) fn override_request(&mut self, request: &OverrideRequest) -> Result<String> {
        let before = self.overrides.clone();
        let answer = match request {
            OverrideRequest::Change { selector, backend, change } => {
                let touched = self.overrides.change(&self.config.services, selector, *backend, *change)?;
                let what = match change {
                    OverrideChange::Force(state) => state.name().to_owned(),
                    OverrideChange::Weight(w) => format!("weight {w}"),
                    OverrideChange::Enable => "enabled (overrides removed)".to_owned(),
                };
                format!("ok: {backend} {what} in {}\n", touched.join(", "))
            }
            OverrideRequest::Clear => format!("ok: {} overrides cleared\n", self.overrides.clear()),
        };
        if self.overrides == before {
            return Ok(answer);
        }
        let config = Arc::clone(&self.config);
        let applied =
            self.apply(&config, false).and_then(|_| save(&config.director.overrides_file, &self.overrides));
        if let Err(e) = applied {
            self.overrides = before;
            if let Err(again) = self.apply(&config, false) {
                tracing::error!(error = %crate::error_chain(&again), "restoring the data path after a failed override");
            }
            return Err(e);
        }
        tracing::info!(request = ?request, "runtime override changed");
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_or_say_what_is_wrong() {
        let ip: IpAddr = "10.0.2.11".parse().unwrap();
        assert_eq!(
            parse_request("drain web 10.0.2.11"),
            Some(Ok(OverrideRequest::Change {
                selector: ServiceSelector::Named("web".into()),
                backend: ip,
                change: OverrideChange::Force(ForcedState::Drain)
            }))
        );
        assert_eq!(
            parse_request("weight all 10.0.2.11 7"),
            Some(Ok(OverrideRequest::Change {
                selector: ServiceSelector::All,
                backend: ip,
                change: OverrideChange::Weight(7)
            }))
        );
        assert_eq!(parse_request("overrides clear"), Some(Ok(OverrideRequest::Clear)));
        assert_eq!(parse_request("status"), None);
        assert!(parse_request("drain web").unwrap().unwrap_err().contains("usage"));
        assert!(parse_request("disable web web1").unwrap().unwrap_err().contains("not an IP address"));
        assert!(parse_request("weight web 10.0.2.11 x").unwrap().unwrap_err().contains("not a number"));
    }

    #[test]
    fn the_state_file_round_trips_and_a_broken_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("lb-overrides-{}", std::process::id()));
        let path = dir.join("sub/overrides.json");
        assert!(load(&path).unwrap().is_empty(), "no file: no overrides");
        let o = Overrides::from_entries([
            (
                ("web".to_owned(), "10.0.2.11".parse().unwrap()),
                Override { state: Some(ForcedState::Drain), weight: None },
            ),
            (("dns".to_owned(), "2001:db8::1".parse().unwrap()), Override { state: None, weight: Some(3) }),
        ]);
        save(&path, &o).unwrap();
        assert_eq!(load(&path).unwrap(), o);
        std::fs::write(&path, "{\"version\": 1, \"overrides\": [{\"service\": \"web\"}]}").unwrap();
        let e = crate::error_chain(&load(&path).unwrap_err());
        assert!(e.contains("overrides.json") && e.contains("backend"), "{e}");
        std::fs::write(&path, "{\"version\": 2, \"overrides\": []}").unwrap();
        assert!(crate::error_chain(&load(&path).unwrap_err()).contains("version 2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
