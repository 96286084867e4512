//! Runtime overrides: what an operator asked with `lb-daemon drain|disable|enable|weight`,
//! on top of the file. An override replaces the file's state or weight of one backend of
//! one service; health checks still apply on top of it (a drained backend that fails its
//! check is disabled like any other). Overrides naming a backend the file no longer has
//! are kept (it may come back in a later reload, and must not come back enabled in the
//! middle of an upgrade) and listed as stale.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::{BackendState, MAX_WEIGHT, ServiceSpec};

/// The state an operator may force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForcedState {
    /// No new flows; established ones stay.
    Drain,
    /// No traffic at all: established flows move to other backends.
    Disabled,
}

impl ForcedState {
    pub fn name(self) -> &'static str {
        match self {
            ForcedState::Drain => "drain",
            ForcedState::Disabled => "disabled",
        }
    }

    fn backend_state(self) -> BackendState {
        match self {
            ForcedState::Drain => BackendState::Drain,
            ForcedState::Disabled => BackendState::Disabled,
        }
    }
}

/// What is overridden of one backend of one service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Override {
    pub state: Option<ForcedState>,
    pub weight: Option<u32>,
}

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(s) = self.state {
            parts.push(s.name().to_owned());
        }
        if let Some(w) = self.weight {
            parts.push(format!("weight {w}"));
        }
        f.write_str(&parts.join(", "))
    }
}

/// Which services a command is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceSelector {
    Named(String),
    /// Every service that has the backend.
    All,
}

impl std::fmt::Display for ServiceSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceSelector::Named(n) => f.write_str(n),
            ServiceSelector::All => f.write_str("all"),
        }
    }
}

/// An operator's command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverrideChange {
    Force(ForcedState),
    Weight(u32),
    /// Back to what the file says: every override of the backend goes.
    Enable,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverrideError {
    #[error("no service is named `{0}`")]
    NoService(String),
    #[error("service `{service}` has no backend {backend}")]
    NoBackend { service: String, backend: IpAddr },
    #[error("no service has backend {0}")]
    NoServiceHasBackend(IpAddr),
    #[error("weight {0} is out of range 0-{MAX_WEIGHT}")]
    Weight(u32),
}

/// Every override, by service name, then backend address (so that a lookup by a
/// borrowed name costs no allocation: a large site looks up 100,000 backends per apply).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    entries: BTreeMap<String, BTreeMap<IpAddr, Override>>,
}

impl Overrides {
    pub fn from_entries(entries: impl IntoIterator<Item = ((String, IpAddr), Override)>) -> Self {
        let mut o = Overrides::default();
        for ((service, backend), set) in entries {
            if set != Override::default() {
                o.entries.entry(service).or_default().insert(backend, set);
            }
        }
        o
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, service: &str, backend: IpAddr) -> Option<&Override> {
        self.entries.get(service)?.get(&backend)
    }

    /// Every override, in (service, backend) order.
    pub fn iter(&self) -> impl Iterator<Item = ((&str, IpAddr), &Override)> {
        self.entries
            .iter()
            .flat_map(|(s, by_backend)| by_backend.iter().map(move |(b, o)| ((s.as_str(), *b), o)))
    }

    fn entry(&mut self, service: &str, backend: IpAddr) -> &mut Override {
        self.entries.entry(service.to_owned()).or_default().entry(backend).or_default()
    }

    fn remove(&mut self, service: &str, backend: IpAddr) {
        if let Some(by_backend) = self.entries.get_mut(service) {
            by_backend.remove(&backend);
            if by_backend.is_empty() {
                self.entries.remove(service);
            }
        }
    }

    /// Applies `change` to `backend` in the services `selector` names; returns the
    /// services it touched. `services` is the file's: a named service and its backend must
    /// be in it, except that `enable` also removes a stale override.
    pub fn change(
        &mut self,
        services: &[ServiceSpec],
        selector: &ServiceSelector,
        backend: IpAddr,
        change: OverrideChange,
    ) -> Result<Vec<String>, OverrideError> {
        if let OverrideChange::Weight(w) = change
            && w > MAX_WEIGHT
        {
            return Err(OverrideError::Weight(w));
        }
        let mut names: Vec<String> = match selector {
            ServiceSelector::Named(name) => {
                let stale = change == OverrideChange::Enable && self.get(name, backend).is_some();
                match services.iter().find(|s| &s.name == name) {
                    Some(s) if s.backends.iter().any(|b| b.addr == backend) => vec![name.clone()],
                    _ if stale => vec![name.clone()],
                    Some(_) => {
                        return Err(OverrideError::NoBackend { service: name.clone(), backend });
                    }
                    None => return Err(OverrideError::NoService(name.clone())),
                }
            }
            ServiceSelector::All => services
                .iter()
                .filter(|s| s.backends.iter().any(|b| b.addr == backend))
                .map(|s| s.name.clone())
                .collect(),
        };
        if change == OverrideChange::Enable && *selector == ServiceSelector::All {
            names.extend(
                self.entries
                    .iter()
                    .filter(|(_, by_backend)| by_backend.contains_key(&backend))
                    .map(|(s, _)| s.clone()),
            );
            names.sort();
            names.dedup();
        }
        if names.is_empty() {
            return Err(OverrideError::NoServiceHasBackend(backend));
        }
        for name in &names {
            match change {
                OverrideChange::Enable => self.remove(name, backend),
                OverrideChange::Force(state) => self.entry(name, backend).state = Some(state),
                OverrideChange::Weight(w) => self.entry(name, backend).weight = Some(w),
            }
        }
        Ok(names)
    }

    /// Removes every override; says how many there were.
    pub fn clear(&mut self) -> usize {
        let n = self.iter().count();
        self.entries.clear();
        n
    }

    /// The services with the overrides in place of the file's states and weights.
    /// Borrowed when there is none (a large site's services are not copied for nothing).
    pub fn overlay<'a>(&self, services: &'a [ServiceSpec]) -> std::borrow::Cow<'a, [ServiceSpec]> {
        if self.entries.is_empty() {
            return services.into();
        }
        let mut out = services.to_vec();
        for svc in &mut out {
            let Some(by_backend) = self.entries.get(&svc.name) else { continue };
            for b in &mut svc.backends {
                let Some(o) = by_backend.get(&b.addr) else { continue };
                if let Some(state) = o.state {
                    b.state = state.backend_state();
                }
                if let Some(w) = o.weight {
                    b.weight = w;
                }
            }
        }
        out.into()
    }

    /// Overrides whose service or backend the file does not have (kept, but inert).
    pub fn is_stale(&self, services: &[ServiceSpec], service: &str, backend: IpAddr) -> bool {
        !services.iter().any(|s| s.name == service && s.backends.iter().any(|b| b.addr == backend))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BackendSpec;

    fn service(name: &str, port: u16, backends: &[&str]) -> ServiceSpec {
        let backends = backends.iter().map(|a| BackendSpec::active(ip(a), 1)).collect();
        ServiceSpec::tcp(name, ip("192.0.2.1"), port, 7, backends)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn all_reaches_every_service_with_the_backend_and_enable_undoes_everything() {
        let services =
            vec![service("web", 80, &["10.0.2.11", "10.0.2.12"]), service("tls", 443, &["10.0.2.11"])];
        let mut o = Overrides::default();
        let touched = o
            .change(
                &services,
                &ServiceSelector::All,
                ip("10.0.2.11"),
                OverrideChange::Force(ForcedState::Drain),
            )
            .unwrap();
        assert_eq!(touched, ["web", "tls"]);
        o.change(
            &services,
            &ServiceSelector::Named("web".into()),
            ip("10.0.2.11"),
            OverrideChange::Weight(5),
        )
        .unwrap();
        let laid = o.overlay(&services);
        assert_eq!(laid[0].backends[0].state, BackendState::Drain);
        assert_eq!(laid[0].backends[0].weight, 5);
        assert_eq!(laid[0].backends[1], services[0].backends[1], "another backend is untouched");
        assert_eq!(laid[1].backends[0].state, BackendState::Drain);
        assert_eq!(laid[1].backends[0].weight, 1);
        assert_eq!(o.get("web", ip("10.0.2.11")).unwrap().to_string(), "drain, weight 5");
        assert_eq!(o.iter().count(), 2);
        assert_eq!(o.clone().clear(), 2, "overrides are counted, not services");

        o.change(&services, &ServiceSelector::All, ip("10.0.2.11"), OverrideChange::Enable).unwrap();
        assert!(o.is_empty());
        assert!(matches!(o.overlay(&services), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn unknown_names_are_refused_and_stale_overrides_can_still_be_removed() {
        let services = vec![service("web", 80, &["10.0.2.11"])];
        let mut o = Overrides::default();
        let named = |n: &str| ServiceSelector::Named(n.into());
        let drain = OverrideChange::Force(ForcedState::Drain);
        assert_eq!(
            o.change(&services, &named("db"), ip("10.0.2.11"), drain),
            Err(OverrideError::NoService("db".into()))
        );
        assert_eq!(
            o.change(&services, &named("web"), ip("10.0.2.99"), drain),
            Err(OverrideError::NoBackend { service: "web".into(), backend: ip("10.0.2.99") })
        );
        assert_eq!(
            o.change(&services, &ServiceSelector::All, ip("10.0.2.99"), drain),
            Err(OverrideError::NoServiceHasBackend(ip("10.0.2.99")))
        );
        assert_eq!(
            o.change(&services, &named("web"), ip("10.0.2.11"), OverrideChange::Weight(70_000)),
            Err(OverrideError::Weight(70_000))
        );
        assert!(o.is_empty());

        // The backend leaves the file: its override stays, stale, until enabled.
        o.change(&services, &named("web"), ip("10.0.2.11"), OverrideChange::Force(ForcedState::Disabled))
            .unwrap();
        let reloaded = vec![service("web", 80, &["10.0.2.12"])];
        assert!(o.is_stale(&reloaded, "web", ip("10.0.2.11")));
        assert!(!o.is_empty());
        o.change(&reloaded, &named("web"), ip("10.0.2.11"), OverrideChange::Enable).unwrap();
        assert!(o.is_empty());
        o.change(&services, &named("web"), ip("10.0.2.11"), OverrideChange::Weight(0)).unwrap();
        o.change(&reloaded, &ServiceSelector::All, ip("10.0.2.11"), OverrideChange::Enable).unwrap();
        assert!(o.is_empty(), "`all` also finds stale overrides");
    }
}
