//! Validation: the YAML model -> the model, every error located and kept, so that one run
//! reports them all. The health checks' keywords are in `check`, the routing section's in
//! `routing`.

use super::*;

/// Collects the file name for errors raised while validating.
/// What the services seen so far hold, for the checks that span services.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) defined_marks: HashSet<u32>,
    pub(super) names: HashMap<String, usize>,
    pub(super) matchers: HashMap<ServiceMatch, usize>,
    /// `director.ring_slots`, when the director section is valid.
    pub(super) ring_slots: Option<u32>,
    pub(super) ring_slots_used: u64,
    pub(super) backends_total: usize,
    /// `director.tunnel_source`'s IPv4 and IPv6 sources (when the director section is
    /// valid; otherwise tunnel backends are not held against it).
    pub(super) tunnel_sources: Option<(Option<ipnet::Ipv4Net>, Option<ipnet::Ipv6Net>)>,
    /// `director.fullnat_source`'s, likewise.
    pub(super) fullnat_sources: Option<(Option<ipnet::Ipv4Net>, Option<ipnet::Ipv6Net>)>,
    /// Whether `director.connection_log` is set (`None`: the director section is invalid).
    pub(super) connection_log: Option<bool>,
}

pub(super) struct Checker<'a> {
    pub(super) file: &'a str,
    /// Per mark: whether its rules match IPv4 and IPv6 destinations.
    pub(super) mark_families: HashMap<u32, (bool, bool)>,
    /// What validation found so far: it goes on past an error, wherever what follows does
    /// not depend on the refused value, so that one run reports them all.
    pub(super) errors: std::cell::RefCell<Vec<ConfigError>>,
    pub(super) tls_sources: std::cell::RefCell<Vec<TlsSource>>,
}

impl Checker<'_> {
    /// The value, or `None` with its error kept for the report.
    pub(super) fn keep<T>(&self, r: Result<T, ConfigError>) -> Option<T> {
        r.map_err(|e| self.errors.borrow_mut().push(e)).ok()
    }

    pub(super) fn location<T>(&self, at: &Spanned<T>, path: impl Into<String>) -> Location {
        Location {
            file: self.file.to_owned(),
            line: at.referenced.line(),
            column: at.referenced.column(),
            path: path.into(),
        }
    }

    pub(super) fn err<T>(
        &self,
        at: &Spanned<T>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        self.location(at, path).error(message)
    }
}

pub(super) fn valid_ifname(name: &str) -> Result<(), String> {
    // IFNAMSIZ is 16 with the terminating NUL; the kernel refuses '/', ':' and blanks.
    if name.is_empty() || name.len() > 15 {
        return Err(format!("interface name `{name}` must be 1 to 15 bytes"));
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) || name == "." || name == ".." {
        return Err(format!("`{name}` is not a valid interface name"));
    }
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff` (or with `-`), as `ip link` prints it.
pub(super) fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let bad = || format!("`{}` is not a MAC address (write aa:bb:cc:dd:ee:ff)", shorten(s));
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

pub(super) fn valid_service_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!("service name `{name}` must be 1 to 64 characters of A-Z a-z 0-9 - _ ."))
    }
}

pub(super) fn no_host_bits(net: &IpNet) -> Result<(), String> {
    if net.addr() != net.network() {
        return Err(format!("prefix {net} has host bits set (did you mean {}?)", net.trunc()));
    }
    Ok(())
}

impl Checker<'_> {
    /// The config, or `None` when an error was kept (in `self.errors`).
    pub(super) fn validate(&self, raw: RawConfig) -> Option<Config> {
        let director = self.keep(self.director(raw.director));
        let mut marks = Vec::new();
        // Every mark the file defines, valid or not: a service keyed by a mark whose rule
        // has an error is not also "keyed by an undefined mark".
        let defined_marks: HashSet<u32> = raw.marks.iter().map(|m| m.mark.value).collect();
        for (i, m) in raw.marks.into_iter().enumerate() {
            if let Some(rules) = self.keep(self.mark(i, m)) {
                marks.extend(rules);
            }
        }
        let mut tally = Tally {
            defined_marks,
            ring_slots: director.as_ref().map(|d| d.ring_slots),
            tunnel_sources: director.as_ref().map(|d| (d.tunnel_source_v4, d.tunnel_source_v6)),
            fullnat_sources: director.as_ref().map(|d| (d.fullnat_source_v4, d.fullnat_source_v6)),
            connection_log: director.as_ref().map(|d| d.connection_log.is_some()),
            ..Tally::default()
        };
        let (mut services, mut checks) = (Vec::new(), BTreeMap::new());
        for (i, s) in raw.services.into_iter().enumerate() {
            if let Some((service, check)) = self.service(i, s, &mut tally) {
                if let Some(c) = check {
                    checks.insert(service.name.clone(), c);
                }
                services.push(service);
            }
        }
        let routing = raw.routing.as_ref().map(|r| self.keep(self.routing(r)));
        if !self.errors.borrow().is_empty() {
            return None;
        }
        Some(Config {
            director: director?,
            marks,
            services,
            checks,
            routing: routing.flatten(),
            tls_sources: Vec::new(),
            digest: String::new(),
        })
    }

    /// Service `i`, and its health check; `None` when what the rest depends on is wrong.
    fn service(
        &self,
        i: usize,
        s: RawService,
        tally: &mut Tally,
    ) -> Option<(ServiceSpec, Option<HealthCheck>)> {
        let at = |key: &str| format!("services[{i}].{key}");
        self.keep(valid_service_name(&s.name.value).map_err(|msg| self.err(&s.name, at("name"), msg)));
        if let Some(first) = tally.names.insert(s.name.value.clone(), i) {
            self.keep::<()>(Err(self.err(
                &s.name,
                at("name"),
                format!("duplicate service name `{}` (also services[{first}])", s.name.value),
            )));
        }
        if i as u32 >= MAX_SERVICES {
            self.keep::<()>(Err(self.err(&s.name, at("name"), format!("more than {MAX_SERVICES} services"))));
        }
        let forward = s.forward.as_ref().map_or(Forward::Dr, |f| f.value.into());
        let ring_size = self.keep(self.ring_size(&s, i)).unwrap_or(DEFAULT_RING_SIZE);
        // What follows needs the match: its family decides which addresses fit.
        let matcher = self.keep(self.service_match(&s.matcher, i, &tally.defined_marks))?;
        if let Some(first) = tally.matchers.insert(matcher, i) {
            self.keep::<()>(Err(self.err(
                &s.matcher,
                at("match"),
                format!("{matcher} is already the match of services[{first}]"),
            )));
        }
        let check = s.check.as_ref().and_then(|c| self.keep(self.check(c, i, &matcher, tally)));
        let backends = self.keep(self.backends(&s, i, &matcher, forward, tally))?;
        let fallback = s.fallback.as_ref().and_then(|f| {
            self.keep(self.real_server(f, at("fallback"), &matcher, forward, tally).and_then(|addr| {
                match backends.iter().position(|b| b.addr == addr) {
                    Some(j) => Err(self.err(
                        f,
                        at("fallback"),
                        format!("{addr} is services[{i}].backends[{j}]: a fallback stands in for the backends, it cannot be one"),
                    )),
                    None => Ok(addr),
                }
            }))
        });
        self.capacity(i, &s, ring_size, backends.len(), fallback.is_some(), tally);
        let scheduler = match s.scheduler.unwrap_or(RawScheduler::Sh) {
            RawScheduler::Sh => Scheduler::Sh,
            RawScheduler::Mh => Scheduler::Mh,
            RawScheduler::Wrr => Scheduler::Wrr,
        };
        let fallback_action = match s.fallback_action {
            None | Some(RawFallbackAction::Drop) => FallbackAction::Drop,
            Some(RawFallbackAction::Pass) => FallbackAction::Pass,
        };
        let log_connections = match &s.log_connections {
            Some(n) if n.value > 0 && tally.connection_log == Some(false) => {
                self.keep::<()>(Err(self.err(
                    n,
                    at("log_connections"),
                    "there is no director.connection_log to write the connections to",
                )));
                0
            }
            Some(n) => n.value,
            None => 0,
        };
        let service = ServiceSpec {
            name: s.name.value,
            matcher,
            scheduler,
            ring_size,
            backends,
            fallback,
            fallback_action,
            forward,
            log_connections,
        };
        Some((service, check))
    }

    /// What service `i` takes of shared room: its ring's slots (two rings: live and idle),
    /// the director's ring array, and backend entries over all services.
    fn capacity(
        &self,
        i: usize,
        s: &RawService,
        ring_size: u32,
        backends: usize,
        fallback: bool,
        tally: &mut Tally,
    ) {
        let at = |key: &str| format!("services[{i}].{key}");
        let servers = backends + fallback as usize;
        let ring_error = |msg: String| match &s.ring_size {
            Some(r) => self.err(r, at("ring_size"), msg),
            None => self.err(&s.name, at("ring_size"), msg),
        };
        if servers > ring_size as usize {
            let plus = if fallback { " and the fallback" } else { "" };
            let msg = format!("{backends} backends{plus} do not fit a ring of {ring_size} slots");
            let default = if s.ring_size.is_none() { " (the default); set a larger prime" } else { "" };
            self.keep::<()>(Err(ring_error(format!("{msg}{default}"))));
        }
        let before = tally.ring_slots_used;
        tally.ring_slots_used += 2 * ring_size as u64;
        if let Some(slots) = tally.ring_slots
            && tally.ring_slots_used > slots as u64
            && before <= slots as u64
        {
            self.keep::<()>(Err(ring_error(format!(
                "the rings of services[0..={i}] need {} slots (two per ring slot), more than director.ring_slots ({slots})",
                tally.ring_slots_used
            ))));
        }
        let total_before = tally.backends_total;
        tally.backends_total += servers;
        if tally.backends_total > MAX_BACKENDS as usize && total_before <= MAX_BACKENDS as usize {
            self.keep::<()>(Err(self.err(
                &s.name,
                at("backends"),
                format!("more than {MAX_BACKENDS} backends over all services"),
            )));
        }
    }

    /// The rules of mark `m` (one per port range).
    pub(super) fn mark(&self, i: usize, m: RawMark) -> Result<Vec<MarkRuleSpec>, ConfigError> {
        let at = |key: &str| format!("marks[{i}].{key}");
        if m.mark.value == 0 {
            return Err(self.err(&m.mark, at("mark"), "mark 0 means \"no mark\"; use 1 or more"));
        }
        no_host_bits(&m.dst.value).map_err(|msg| self.err(&m.dst, at("dst"), msg))?;
        if let Some(src) = &m.src {
            no_host_bits(&src.value).map_err(|msg| self.err(src, at("src"), msg))?;
            if src.value.addr().is_ipv4() != m.dst.value.addr().is_ipv4() {
                return Err(self.err(
                    src,
                    at("src"),
                    "source and destination prefixes are of different address families",
                ));
            }
        }
        let ranges = m.ports.map_or_else(|| vec![(1, 65535)], |p| p.0);
        Ok(ranges
            .into_iter()
            .map(|ports| MarkRuleSpec {
                mark: m.mark.value,
                dst: m.dst.value,
                proto: m.proto.map(Protocol::from),
                ports,
                src: m.src.as_ref().map(|s| s.value),
            })
            .collect())
    }

    /// The configured ring size, if it is one Maglev (or `wrr`) can use.
    pub(super) fn ring_size(&self, s: &RawService, i: usize) -> Result<u32, ConfigError> {
        let Some(r) = &s.ring_size else { return Ok(DEFAULT_RING_SIZE) };
        let at = format!("services[{i}].ring_size");
        if !(3..=MAX_RING_SIZE).contains(&r.value) {
            return Err(self.err(r, at, format!("ring size {} is out of range 3-{MAX_RING_SIZE}", r.value)));
        }
        if !is_prime(r.value) && !matches!(s.scheduler, Some(RawScheduler::Wrr)) {
            return Err(self.err(
                r,
                at,
                format!("ring size {} is not a prime (Maglev needs one; e.g. 4093, 16381, 65537)", r.value),
            ));
        }
        Ok(r.value)
    }

    /// An optional count within `range`, or `default` when absent.
    pub(super) fn ranged(
        &self,
        v: &Option<Spanned<u32>>,
        path: impl Into<String>,
        default: u32,
        range: std::ops::RangeInclusive<u32>,
    ) -> Result<u32, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) if range.contains(&s.value) => Ok(s.value),
            Some(s) => Err(self.err(
                s,
                path,
                format!("{} is out of range {}-{}", s.value, range.start(), range.end()),
            )),
        }
    }

    pub(super) fn duration(&self, v: &Spanned<String>, path: String) -> Result<Duration, ConfigError> {
        let d = humantime::parse_duration(v.value.trim()).map_err(|e| {
            self.err(v, path.clone(), format!("`{}` is not a duration (e.g. 2s, 500ms): {e}", v.value))
        })?;
        if d.is_zero() {
            return Err(self.err(v, path, "must be more than zero"));
        }
        Ok(d)
    }

    pub(super) fn director(&self, d: RawDirector) -> Result<Director, ConfigError> {
        if d.interfaces.value.is_empty() {
            return Err(self.err(
                &d.interfaces,
                "director.interfaces",
                "name at least one interface to attach to",
            ));
        }
        let mut seen = HashSet::new();
        let mut interfaces = Vec::new();
        for (i, name) in d.interfaces.value.iter().enumerate() {
            let path = format!("director.interfaces[{i}]");
            valid_ifname(&name.value).map_err(|msg| self.err(name, path.clone(), msg))?;
            if !seen.insert(name.value.clone()) {
                return Err(self.err(name, path, format!("interface `{}` is listed twice", name.value)));
            }
            interfaces.push(name.value.clone());
        }
        let connection_table_size = self.ranged(
            &d.connection_table_size,
            "director.connection_table_size",
            DEFAULT_FLOW_ENTRIES,
            lb_common::FLOW_WAYS..=MAX_FLOW_ENTRIES,
        )?;
        if let Some(size) = &d.connection_table_size
            && !size.value.is_power_of_two()
        {
            return Err(self.err(
                size,
                "director.connection_table_size",
                format!(
                    "{} is not a power of two (the table is {}-way set-associative): use {} or {}",
                    size.value,
                    lb_common::FLOW_WAYS,
                    size.value.next_power_of_two() / 2,
                    size.value.next_power_of_two()
                ),
            ));
        }
        let ring_slots =
            self.ranged(&d.ring_slots, "director.ring_slots", DEFAULT_RING_SLOTS, 1..=MAX_RING_SLOTS)?;
        let bpf_dir = match d.bpf_dir {
            None => PathBuf::from(DEFAULT_BPF_DIR),
            Some(p) if p.value.is_absolute() => p.value,
            Some(p) => {
                return Err(self.err(&p, "director.bpf_dir", "must be an absolute path on a bpf filesystem"));
            }
        };
        let overrides_file = match d.overrides_file {
            None => PathBuf::from(DEFAULT_OVERRIDES_FILE),
            Some(p) if p.value.is_absolute() && p.value.file_name().is_some() => p.value,
            Some(p) => {
                return Err(self.err(&p, "director.overrides_file", "must be an absolute path to a file"));
            }
        };
        // sun_path holds 108 bytes with the terminating NUL.
        const MAX_SOCKET_PATH: usize = 107;
        let control_socket = match d.control_socket {
            None => PathBuf::from(DEFAULT_CONTROL_SOCKET),
            Some(p) if p.value.as_os_str().len() > MAX_SOCKET_PATH => {
                return Err(self.err(
                    &p,
                    "director.control_socket",
                    format!(
                        "a socket path may be at most {MAX_SOCKET_PATH} bytes, this one is {}",
                        p.value.as_os_str().len()
                    ),
                ));
            }
            Some(p) => p.value,
        };
        let mut accept_macs = Vec::new();
        for (i, m) in d.accept_macs.iter().enumerate() {
            let path = format!("director.accept_macs[{i}]");
            let mac = parse_mac(&m.value).map_err(|msg| self.err(m, path.clone(), msg))?;
            if mac[0] & 1 != 0 || mac == [0; 6] {
                return Err(self.err(m, path, format!("{} is not a unicast address", m.value)));
            }
            if accept_macs.contains(&mac) {
                return Err(self.err(m, path, format!("{} is listed twice", m.value)));
            }
            // One slot of each interface's set holds the interface's own address.
            if accept_macs.len() + 1 >= lb_common::MAX_LOCAL_MACS {
                return Err(self.err(
                    m,
                    path,
                    format!("at most {} extra MACs", lb_common::MAX_LOCAL_MACS - 1),
                ));
            }
            accept_macs.push(mac);
        }
        let flood_guard_flows_per_sec = self.ranged(
            &d.flood_guard_flows_per_sec,
            "director.flood_guard_flows_per_sec",
            DEFAULT_FLOOD_GUARD_FLOWS_PER_SEC,
            0..=u32::MAX,
        )?;
        let connection_log = match d.connection_log {
            None => None,
            Some(log) => {
                let at = |key: &str| format!("director.connection_log.{key}");
                let file = log.value.file;
                if !file.value.is_absolute() || file.value.file_name().is_none() {
                    return Err(self.err(&file, at("file"), "must be an absolute path to a file"));
                }
                let max_file_bytes = match log.value.max_file_bytes {
                    None => DEFAULT_CONNECTION_LOG_BYTES,
                    Some(n) if (MIN_CONNECTION_LOG_BYTES..=MAX_CONNECTION_LOG_BYTES).contains(&n.value) => {
                        n.value
                    }
                    Some(n) => {
                        return Err(self.err(
                            &n,
                            at("max_file_bytes"),
                            format!(
                                "{} is out of range {MIN_CONNECTION_LOG_BYTES}-{MAX_CONNECTION_LOG_BYTES}",
                                n.value
                            ),
                        ));
                    }
                };
                Some(ConnectionLog {
                    file: file.value,
                    max_file_bytes,
                    keep_files: self.ranged(&log.value.keep_files, at("keep_files"), 5, 0..=100)?,
                    max_events_per_sec: self.ranged(
                        &log.value.max_events_per_sec,
                        at("max_events_per_sec"),
                        DEFAULT_CONNECTION_LOG_RATE,
                        1..=MAX_CONNECTION_LOG_RATE,
                    )?,
                })
            }
        };
        let (tunnel_source_v4, tunnel_source_v6) = self.sources(&d.tunnel_source, "tunnel_source")?;
        let (fullnat_source_v4, fullnat_source_v6) = self.sources(&d.fullnat_source, "fullnat_source")?;
        Ok(Director {
            accept_macs,
            flood_guard_flows_per_sec,
            tunnel_source_v4,
            tunnel_source_v6,
            fullnat_source_v4,
            fullnat_source_v6,
            interfaces,
            xdp_mode: match d.xdp_mode.unwrap_or(RawXdpMode::Native) {
                RawXdpMode::Native => XdpMode::Native,
                RawXdpMode::Generic => XdpMode::Generic,
            },
            metrics_listen: d.metrics_listen.unwrap_or(DEFAULT_METRICS_LISTEN),
            control_socket,
            overrides_file,
            connection_log,
            bpf_dir,
            connection_table_size,
            ring_slots,
        })
    }

    pub(super) fn service_match(
        &self,
        m: &Spanned<RawMatch>,
        i: usize,
        defined_marks: &HashSet<u32>,
    ) -> Result<ServiceMatch, ConfigError> {
        let at = |key: &str| format!("services[{i}].match.{key}");
        let r = &m.value;
        match (&r.vip, &r.fwmark) {
            (Some(_), Some(f)) => Err(self.err(f, at("fwmark"), "match by `vip` or by `fwmark`, not both")),
            (None, None) => {
                Err(self.err(m, format!("services[{i}].match"), "needs `vip` (with `port`) or `fwmark`"))
            }
            (None, Some(f)) => {
                if let Some(p) = &r.port {
                    return Err(self.err(
                        p,
                        at("port"),
                        "a fwmark service takes its ports from the mark rules",
                    ));
                }
                if !defined_marks.contains(&f.value) {
                    return Err(self.err(
                        f,
                        at("fwmark"),
                        format!("fwmark {} is not defined under `marks`", f.value),
                    ));
                }
                Ok(ServiceMatch::Mark(f.value))
            }
            (Some(vip), None) => {
                let Some(port) = &r.port else {
                    return Err(self.err(vip, at("port"), "a vip service needs a `port`"));
                };
                if port.value == 0 {
                    return Err(self.err(port, at("port"), "port 0 is not a service port"));
                }
                let a = vip.value;
                if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                    return Err(self.err(vip, at("vip"), format!("{a} cannot be a virtual address")));
                }
                if let IpAddr::V4(v4) = a
                    && v4.is_broadcast()
                {
                    return Err(self.err(vip, at("vip"), format!("{a} cannot be a virtual address")));
                }
                Ok(ServiceMatch::Vip {
                    addr: a,
                    port: port.value,
                    proto: r.proto.unwrap_or(RawProto::Tcp).into(),
                })
            }
        }
    }

    /// `director.<key>`: at most one address or prefix per family.
    fn sources(
        &self,
        list: &[Spanned<String>],
        key: &str,
    ) -> Result<(Option<ipnet::Ipv4Net>, Option<ipnet::Ipv6Net>), ConfigError> {
        let (mut v4, mut v6) = (None, None);
        for (i, source) in list.iter().enumerate() {
            let path = format!("director.{key}[{i}]");
            match source_prefix(&source.value).map_err(|msg| self.err(source, path.clone(), msg))? {
                IpNet::V4(net) if v4.is_none() => v4 = Some(net),
                IpNet::V6(net) if v6.is_none() => v6 = Some(net),
                net => {
                    let family = if net.addr().is_ipv4() { "IPv4" } else { "IPv6" };
                    return Err(self.err(
                        source,
                        path,
                        format!("a second {family} source; give one per family"),
                    ));
                }
            }
        }
        Ok((v4, v6))
    }

    /// An address that can be a real server of the service (a backend or its fallback),
    /// reached by `forward`.
    pub(super) fn real_server(
        &self,
        addr: &Spanned<IpAddr>,
        path: String,
        matcher: &ServiceMatch,
        forward: Forward,
        tally: &Tally,
    ) -> Result<IpAddr, ConfigError> {
        let a = addr.value;
        if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
            return Err(self.err(addr, path, format!("{a} cannot be a real server")));
        }
        if let ServiceMatch::Vip { addr: vip, .. } = matcher
            && *vip == a
        {
            return Err(self.err(
                addr,
                path,
                format!("{a} is the service's own vip: the director would send its traffic to itself"),
            ));
        }
        if forward == Forward::FullNat
            && let Some((v4, v6)) = tally.fullnat_sources
            && !(if a.is_ipv4() { v4.is_some() } else { v6.is_some() })
        {
            return Err(self.err(
                addr,
                path,
                format!(
                    "{a} is reached by full NAT, which needs an {} address of the director in `director.fullnat_source`",
                    if a.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            ));
        }
        if forward == Forward::Tunnel {
            // Any family inside any other: the outer header is the backend's.
            return match tally.tunnel_sources {
                Some((v4, v6)) if !(if a.is_ipv4() { v4.is_some() } else { v6.is_some() }) => Err(self.err(
                    addr,
                    path,
                    format!(
                        "{a} is reached through a tunnel, which needs an {} address in `director.tunnel_source`",
                        if a.is_ipv4() { "IPv4" } else { "IPv6" }
                    ),
                )),
                _ => Ok(a),
            };
        }
        if let ServiceMatch::Mark(mark) = matcher {
            self.family_of_mark(addr, path.clone(), *mark, a.is_ipv4())?;
        }
        if let ServiceMatch::Vip { addr: vip, .. } = matcher
            && vip.is_ipv4() != a.is_ipv4()
        {
            return Err(self.err(
                addr,
                path,
                format!(
                    "{a} and the vip {vip} are of different address families (direct routing and NAT keep the family; a tunnel can carry one in the other)"
                ),
            ));
        }
        Ok(a)
    }

    /// Direct routing cannot translate between families: a fwmark service's real servers
    /// (and check sources) must be of the family its mark's rules match, and those rules
    /// of one family (as `ipvsadm -A -f N` services are, `-6` or not).
    pub(super) fn family_of_mark<T>(
        &self,
        at: &Spanned<T>,
        path: String,
        mark: u32,
        ipv4: bool,
    ) -> Result<(), ConfigError> {
        let (v4, v6) = self.mark_families.get(&mark).copied().unwrap_or_default();
        let family = |v4: bool| if v4 { "IPv4" } else { "IPv6" };
        if v4 && v6 {
            return Err(self.err(
                at,
                path,
                format!("fwmark {mark} has both IPv4 and IPv6 rules; use one mark per address family"),
            ));
        }
        if (ipv4 && !v4) || (!ipv4 && !v6) {
            return Err(self.err(
                at,
                path,
                format!(
                    "an {} address, but fwmark {mark} matches only {} destinations (only a tunnel carries one family in the other)",
                    family(ipv4),
                    family(!ipv4)
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn backends(
        &self,
        s: &RawService,
        i: usize,
        matcher: &ServiceMatch,
        service_forward: Forward,
        tally: &Tally,
    ) -> Result<Vec<BackendSpec>, ConfigError> {
        let mut out = Vec::new();
        let mut seen: HashMap<IpAddr, usize> = HashMap::new();
        for (j, b) in s.backends.iter().enumerate() {
            let at = |key: &str| format!("services[{i}].backends[{j}].{key}");
            let forward = b.forward.as_ref().map_or(service_forward, |f| f.value.into());
            let addr = self.real_server(&b.address, at("address"), matcher, forward, tally)?;
            // Masquerading rewrites the destination anyway, port included; the other
            // methods deliver the client's packet as it was sent.
            let port = match (&b.port, matcher) {
                (Some(p), _) if matches!(forward, Forward::Nat | Forward::FullNat) => Some(p.value),
                (Some(p), ServiceMatch::Vip { port, .. }) if p.value != *port => {
                    let how = if forward == Forward::Tunnel { "a tunnel" } else { "direct routing" };
                    return Err(self.err(
                        p,
                        at("port"),
                        format!(
                            "{how} keeps the destination port: the backend must listen on {port}, not {} \
                             (`forward: nat` maps ports)",
                            p.value
                        ),
                    ));
                }
                (Some(_), ServiceMatch::Vip { .. }) | (None, _) => None,
                (Some(p), ServiceMatch::Mark(_)) => {
                    return Err(self.err(
                        p,
                        at("port"),
                        "a fwmark service keeps each packet's destination port unless it masquerades \
                         (`forward: nat`); leave `port` out",
                    ));
                }
            };
            if let Some(first) = seen.insert(addr, j) {
                return Err(self.err(
                    &b.address,
                    at("address"),
                    format!("{addr} is already services[{i}].backends[{first}]"),
                ));
            }
            let weight = match &b.weight {
                None => 1,
                Some(w) if w.value <= MAX_WEIGHT => w.value,
                Some(w) => {
                    return Err(self.err(
                        w,
                        at("weight"),
                        format!("weight {} is out of range 0-{MAX_WEIGHT}", w.value),
                    ));
                }
            };
            let state = match b.state.unwrap_or(RawBackendState::Active) {
                RawBackendState::Active => BackendState::Active,
                RawBackendState::Drain => BackendState::Drain,
                RawBackendState::Disabled => BackendState::Disabled,
            };
            out.push(BackendSpec { addr, weight, state, forward, port });
        }
        Ok(out)
    }
}

/// Where `value` is, or, when it is absent, where `fallback` is.
pub(super) fn loc<T, U>(value: &Option<Spanned<T>>, fallback: &Spanned<U>) -> Spanned<()> {
    value.as_ref().map_or_else(|| fallback.clone_span(), |v| v.clone_span())
}

/// A location-only copy of a spanned value, for errors about a key that is absent.
pub(super) trait CloneSpan {
    fn clone_span(&self) -> Spanned<()>;
}

impl<T> CloneSpan for Spanned<T> {
    fn clone_span(&self) -> Spanned<()> {
        Spanned { value: (), referenced: self.referenced, defined: self.defined }
    }
}

/// Widest prefixes a tunnel or full-NAT source may be: the flow hash fills at most 16 host
/// bits (of IPv6's last word), which is all a receive-side scaling hash needs, and 65,536
/// addresses of 64,512 ports each are more flows than any connection table holds.
const MIN_TUNNEL_SOURCE_PREFIX_V4: u8 = 16;
const MIN_TUNNEL_SOURCE_PREFIX_V6: u8 = 112;

/// `192.0.2.1`, `2001:db8::1` or a prefix such as `198.51.100.0/28`.
fn source_prefix(s: &str) -> Result<IpNet, String> {
    let net = match s.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => IpNet::from(
            s.parse::<IpAddr>()
                .map_err(|_| format!("`{s}` is not an address or a prefix (192.0.2.1, 198.51.100.0/28)"))?,
        ),
    };
    let a = net.addr();
    if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
        return Err(format!("{a} cannot be the source of packets on the wire"));
    }
    if net.addr() != net.network() {
        return Err(format!("`{s}` has host bits set; write the prefix as {}", net.trunc()));
    }
    let min = if a.is_ipv4() { MIN_TUNNEL_SOURCE_PREFIX_V4 } else { MIN_TUNNEL_SOURCE_PREFIX_V6 };
    if net.prefix_len() < min {
        return Err(format!(
            "a source prefix may be at most /{min} wide (enough for any receive hash, and 65,536 addresses)"
        ));
    }
    Ok(net)
}
