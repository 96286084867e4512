//! The YAML configuration: its serde model, and validation into the specs [`crate::plan`]
//! takes. Every error names the file, line, column and key path of what it refuses.
//!
//! `configs/lb.example.yaml` documents every key. Parsing uses `serde-saphyr`: it is
//! maintained, panic-free on hostile input (bounded alias expansion and nesting), refuses
//! duplicate keys, and reports locations that [`Spanned`] carries into the semantic checks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use lb_common::{DEFAULT_FLOW_ENTRIES, DEFAULT_RING_SLOTS, MAX_BACKENDS, MAX_SERVICES};
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_saphyr::{MessageFormatter as _, Spanned};

mod routing;
use crate::health::spec::{CheckKind, CheckSpec, FlapPolicy, HealthCheck, Hook, HttpCheck, Policy, TlsSpec};
use crate::model::{
    BackendSpec, BackendState, FallbackAction, MarkRuleSpec, Protocol, Scheduler, ServiceMatch, ServiceSpec,
};
use crate::model::{
    DEFAULT_BPF_DIR, DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT, DEFAULT_CONTROL_SOCKET,
    DEFAULT_FLOOD_GUARD_FLOWS_PER_SEC, DEFAULT_HOOK_TIMEOUT, DEFAULT_METRICS_LISTEN, DEFAULT_RING_SIZE,
    Forward, MAX_FLOW_ENTRIES, MAX_RING_SIZE, MAX_RING_SLOTS, MAX_WEIGHT, XdpMode, is_prime,
};
use crate::routing::decl::RoutingConfig;
pub use routing::DEFAULT_ROUTING_PROTOCOL;

/// Largest configuration file read; anything larger is refused before it is parsed.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;
/// Quoted values in error messages are cut to this many characters: a 50 MB name must
/// not become a 50 MB log line.
pub const MAX_QUOTED_CHARS: usize = 80;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}")]
    Read { file: String, source: std::io::Error },
    #[error("{file} is {kind}, not a regular file")]
    NotAFile { file: String, kind: &'static str },
    #[error("{file} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge { file: String },
    #[error("{file}:{line}:{column}: {path}: {message}")]
    Invalid { file: String, line: u64, column: u64, path: String, message: String },
    /// Every error validation found (more than one), in file order; `more` were found
    /// beyond the [`MAX_REPORTED_ERRORS`] listed.
    #[error("{}", several(errors, *more))]
    Several { errors: Vec<ConfigError>, more: usize },
}

/// Errors listed when a file has many; the count of the rest follows them.
pub const MAX_REPORTED_ERRORS: usize = 20;

fn several(errors: &[ConfigError], more: usize) -> String {
    let total = errors.len() + more;
    let mut out = format!("{total} errors:");
    for e in errors {
        out.push_str("\n  ");
        out.push_str(&e.to_string());
    }
    if more > 0 {
        out.push_str(&format!("\n  ... and {more} more"));
    }
    out
}

impl ConfigError {
    /// One error as itself, several as [`ConfigError::Several`] (the first
    /// [`MAX_REPORTED_ERRORS`] and a count).
    pub fn from_many(mut errors: Vec<ConfigError>) -> ConfigError {
        if errors.len() == 1 {
            return errors.remove(0);
        }
        let more = errors.len().saturating_sub(MAX_REPORTED_ERRORS);
        errors.truncate(MAX_REPORTED_ERRORS);
        ConfigError::Several { errors, more }
    }

    /// The key path (`services[1].backends[0].weight`) of an invalid value.
    pub fn path(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { path, .. } => Some(path),
            ConfigError::Read { .. }
            | ConfigError::NotAFile { .. }
            | ConfigError::TooLarge { .. }
            | ConfigError::Several { .. } => None,
        }
    }
}

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub director: Director,
    pub marks: Vec<MarkRuleSpec>,
    pub services: Vec<ServiceSpec>,
    /// Per service name: how it forwards (for status; only direct routing exists).
    pub forward: BTreeMap<String, Forward>,
    /// Per service name: how its backends are checked (services without are always up).
    pub checks: BTreeMap<String, HealthCheck>,
    /// Policy routing and VIP routes; `None`: the daemon manages no route or rule.
    pub routing: Option<RoutingConfig>,
    /// The TLS settings of `https` checks and where the file states them: the health
    /// runtime reads their CA files (`health::tls::prepare`), and its errors point here.
    pub tls_sources: Vec<TlsSource>,
}

/// Where a value sits in the file, for errors found after parsing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub path: String,
}

impl Location {
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            line: self.line,
            column: self.column,
            path: self.path.clone(),
            message: bound_message(&message.into()),
        }
    }
}

/// The TLS settings of one `https` check, and where they are stated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSource {
    pub spec: TlsSpec,
    pub at: Location,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Director {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub metrics_listen: SocketAddr,
    pub control_socket: PathBuf,
    pub bpf_dir: PathBuf,
    pub connection_table_size: u32,
    pub ring_slots: u32,
    /// Destination MACs accepted on every attached interface beside its own (a VRRP
    /// virtual MAC); frames to any other MAC are not the director's.
    pub accept_macs: Vec<[u8; 6]>,
    /// New flows per second and CPU recorded in the connection table; zero: no limit.
    pub flood_guard_flows_per_sec: u32,
}

// ---- the YAML model ------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    director: RawDirector,
    #[serde(default)]
    marks: Vec<RawMark>,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    routing: Option<routing::RawRouting>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirector {
    interfaces: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    xdp_mode: Option<RawXdpMode>,
    #[serde(default)]
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    control_socket: Option<Spanned<PathBuf>>,
    #[serde(default)]
    bpf_dir: Option<Spanned<PathBuf>>,
    #[serde(default)]
    connection_table_size: Option<Spanned<u32>>,
    #[serde(default)]
    ring_slots: Option<Spanned<u32>>,
    #[serde(default)]
    accept_macs: Vec<Spanned<String>>,
    #[serde(default)]
    flood_guard_flows_per_sec: Option<Spanned<u32>>,
}

/// `forward:`, named as in keepalived's `lb_kind`.
#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawForward {
    Dr,
    Tunnel,
    Nat,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawXdpMode {
    Native,
    Generic,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawProto {
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
struct RawMark {
    mark: Spanned<u32>,
    dst: Spanned<IpNet>,
    #[serde(default)]
    src: Option<Spanned<IpNet>>,
    #[serde(default)]
    proto: Option<RawProto>,
    #[serde(default)]
    ports: Option<PortRanges>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    #[serde(rename = "match")]
    matcher: Spanned<RawMatch>,
    #[serde(default)]
    scheduler: Option<RawScheduler>,
    #[serde(default)]
    forward: Option<Spanned<RawForward>>,
    #[serde(default)]
    ring_size: Option<Spanned<u32>>,
    #[serde(default)]
    backends: Vec<RawBackend>,
    #[serde(default)]
    check: Option<RawCheck>,
    #[serde(default)]
    fallback: Option<Spanned<IpAddr>>,
    #[serde(default)]
    fallback_action: Option<RawFallbackAction>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawFallbackAction {
    Drop,
    Pass,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawCheckType {
    Tcp,
    Http,
    Exec,
    Icmp,
    Https,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    #[serde(rename = "type")]
    kind: Spanned<RawCheckType>,
    #[serde(default)]
    port: Option<Spanned<u16>>,
    #[serde(default)]
    path: Option<Spanned<String>>,
    #[serde(default)]
    host: Option<Spanned<String>>,
    #[serde(default)]
    expect_status: Option<Spanned<Vec<u16>>>,
    #[serde(default)]
    expect_body: Option<Spanned<String>>,
    #[serde(default)]
    argv: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    tls_verify: Option<Spanned<bool>>,
    #[serde(default)]
    ca_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    interval: Option<Spanned<String>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    jitter: Option<Spanned<String>>,
    #[serde(default)]
    source: Option<Spanned<IpAddr>>,
    #[serde(default)]
    warning_weight_percent: Option<Spanned<u32>>,
    #[serde(default)]
    initial_state: Option<RawInitialState>,
    #[serde(default)]
    rise: Option<Spanned<u32>>,
    #[serde(default)]
    fall: Option<Spanned<u32>>,
    #[serde(default)]
    fall_within: Option<Spanned<u32>>,
    #[serde(default)]
    flap: Option<RawFlap>,
    #[serde(default)]
    on_down: Option<RawOnDown>,
    #[serde(default)]
    on_change: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    on_change_timeout: Option<Spanned<String>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawInitialState {
    Up,
    Down,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawOnDown {
    Reschedule,
    Keep,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlap {
    changes: Spanned<u32>,
    within: Spanned<u32>,
    #[serde(default)]
    hold: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    vip: Option<Spanned<IpAddr>>,
    #[serde(default)]
    port: Option<Spanned<u16>>,
    #[serde(default)]
    proto: Option<RawProto>,
    #[serde(default)]
    fwmark: Option<Spanned<u32>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawScheduler {
    Sh,
    Mh,
    Wrr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<IpAddr>,
    #[serde(default)]
    port: Option<Spanned<u16>>,
    #[serde(default)]
    weight: Option<Spanned<u32>>,
    #[serde(default)]
    state: Option<RawBackendState>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawBackendState {
    Active,
    Drain,
    Disabled,
}

/// Destination ports of a mark rule: `80`, `"8000-8099"`, `"80,443"`, or a list of those.
#[derive(Debug)]
struct PortRanges(Vec<(u16, u16)>);

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range 1-65535")),
        Err(_) => Err(format!("`{}` is not a port number", s.trim())),
    }
}

fn parse_ranges(s: &str, out: &mut Vec<(u16, u16)>) -> Result<(), String> {
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

/// The path as an operator writes it: without the `value` that [`Spanned`] wraps values
/// in, and without the `?` serde_path_to_error writes for a key it could not name (a
/// duplicate key, reported at the mapping that holds it).
fn key_path(raw: &str) -> String {
    let parts: Vec<&str> = raw.split('.').filter(|p| !p.is_empty() && *p != "value" && *p != "?").collect();
    if parts.is_empty() { "(document)".to_owned() } else { parts.join(".") }
}

/// Where the node at `path` (as [`key_path`] writes it: `services[2].check`, or
/// `(document)`) starts in `text`, as a 1-based line and column: a second, cheap pass over
/// the YAML events, made only to place an error.
fn node_start(text: &str, path: &str) -> Option<(u64, u64)> {
    use serde_saphyr::granit_parser::{Event, Parser};
    enum Step<'a> {
        Key(&'a str),
        Index(usize),
    }
    let mut steps = Vec::new();
    if path != "(document)" {
        for part in path.split('.') {
            let (key, indices) = part.split_once('[').unwrap_or((part, ""));
            if !key.is_empty() {
                steps.push(Step::Key(key));
            }
            for index in indices.split('[').filter(|i| !i.is_empty()) {
                steps.push(Step::Index(index.trim_end_matches(']').parse().ok()?));
            }
        }
    }
    let mut events = Parser::new_from_str(text)
        .filter_map(|e| e.ok())
        .filter(|(e, _)| !matches!(e, Event::StreamStart | Event::DocumentStart(..) | Event::Anchor(..)));
    // Skips one node whose first event was just read.
    fn skip<'a>(
        first: &Event<'a>,
        events: &mut impl Iterator<Item = (Event<'a>, serde_saphyr::granit_parser::Span)>,
    ) {
        let mut depth = usize::from(matches!(first, Event::MappingStart(..) | Event::SequenceStart(..)));
        while depth > 0 {
            match events.next() {
                Some((Event::MappingStart(..) | Event::SequenceStart(..), _)) => depth += 1,
                Some((Event::MappingEnd | Event::SequenceEnd, _)) => depth -= 1,
                Some(_) => {}
                None => return,
            }
        }
    }
    let (mut node, mut span) = events.next()?;
    for step in steps {
        match (step, node) {
            (Step::Key(want), Event::MappingStart(..)) => loop {
                let (key, _) = events.next()?;
                let Event::Scalar(name, ..) = &key else { return None };
                let found = name == want;
                let (value, value_span) = events.next()?;
                if found {
                    (node, span) = (value, value_span);
                    break;
                }
                skip(&value, &mut events);
            },
            (Step::Index(want), Event::SequenceStart(..)) => {
                for _ in 0..want {
                    let (item, _) = events.next()?;
                    if matches!(item, Event::SequenceEnd) {
                        return None;
                    }
                    skip(&item, &mut events);
                }
                (node, span) = events.next()?;
            }
            _ => return None,
        }
    }
    Some((span.start.line() as u64, span.start.col() as u64 + 1))
}

// ---- validation ----------------------------------------------------------------------

/// Collects the file name for errors raised while validating.
struct Checker<'a> {
    file: &'a str,
    /// Per mark: whether its rules match IPv4 and IPv6 destinations.
    mark_families: HashMap<u32, (bool, bool)>,
    /// What validation found so far: it goes on past an error, wherever what follows does
    /// not depend on the refused value, so that one run reports them all.
    errors: std::cell::RefCell<Vec<ConfigError>>,
    tls_sources: std::cell::RefCell<Vec<TlsSource>>,
}

impl Checker<'_> {
    /// The value, or `None` with its error kept for the report.
    fn keep<T>(&self, r: Result<T, ConfigError>) -> Option<T> {
        r.map_err(|e| self.errors.borrow_mut().push(e)).ok()
    }

    fn location<T>(&self, at: &Spanned<T>, path: impl Into<String>) -> Location {
        Location {
            file: self.file.to_owned(),
            line: at.referenced.line(),
            column: at.referenced.column(),
            path: path.into(),
        }
    }

    fn err<T>(&self, at: &Spanned<T>, path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        self.location(at, path).error(message)
    }
}

/// `s`, or its first [`MAX_QUOTED_CHARS`] characters and how long it really was.
pub fn shorten(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(MAX_QUOTED_CHARS) {
        None => s.into(),
        Some((cut, _)) => format!("{}... ({} bytes)", &s[..cut], s.len()).into(),
    }
}

/// A message with every quoted value (between backticks or double quotes) shortened,
/// then cut as a whole if still long: values come from the file, which may be hostile.
fn bound_message(message: &str) -> String {
    const MAX_MESSAGE: usize = 1024;
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE));
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest.as_bytes()[open] as char;
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let close = rest.find(quote).unwrap_or(rest.len());
        out.push_str(&shorten(&rest[..close]));
        rest = &rest[close..];
        if let Some(q) = rest.strip_prefix(quote) {
            out.push(quote);
            rest = q;
        }
    }
    out.push_str(rest);
    if out.len() > MAX_MESSAGE {
        let cut = (0..=MAX_MESSAGE).rev().find(|&i| out.is_char_boundary(i)).unwrap_or(0);
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

/// Reads a configuration file: a regular file (a FIFO would block, a device never end) of
/// at most [`MAX_CONFIG_BYTES`], in UTF-8 (a bad byte is reported by line and column).
fn read_config(path: &Path, file: &str) -> Result<String, ConfigError> {
    use std::io::Read as _;
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let read_err = |source| ConfigError::Read { file: file.to_owned(), source };
    // Non-blocking, so that opening a FIFO without a writer returns at once.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(read_err)?;
    let meta = f.metadata().map_err(read_err)?;
    let t = meta.file_type();
    let kind = if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() || t.is_block_device() {
        Some("a device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    };
    if let Some(kind) = kind {
        return Err(ConfigError::NotAFile { file: file.to_owned(), kind });
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge { file: file.to_owned() });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow while it is read.
    f.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge { file: file.to_owned() });
    }
    String::from_utf8(bytes).map_err(|e| {
        let bad = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..bad];
        let line = before.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        // Columns count characters, as the YAML parser's do.
        let column = String::from_utf8_lossy(&before[line_start..]).chars().count() as u64 + 1;
        ConfigError::Invalid {
            file: file.to_owned(),
            line,
            column,
            path: "(document)".to_owned(),
            message: format!("invalid UTF-8 (byte {:#04x}); the file must be UTF-8 text", e.as_bytes()[bad]),
        }
    })
}

fn valid_ifname(name: &str) -> Result<(), String> {
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
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
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

fn valid_service_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!("service name `{name}` must be 1 to 64 characters of A-Z a-z 0-9 - _ ."))
    }
}

fn no_host_bits(net: &IpNet) -> Result<(), String> {
    if net.addr() != net.network() {
        return Err(format!("prefix {net} has host bits set (did you mean {}?)", net.trunc()));
    }
    Ok(())
}

impl Config {
    /// Reads and validates `path`. Touches nothing else.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = read_config(path, &file)?;
        Config::parse(&text, &file)
    }

    /// Validates YAML `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let mut path = String::new();
        let raw = serde_saphyr::with_deserializer_from_str(text, |de| {
            serde_path_to_error::deserialize::<_, RawConfig>(de).map_err(|e| {
                path = e.path().to_string();
                e.into_inner()
            })
        })
        .map_err(|e| {
            let (mut line, mut column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            let message = bound_message(&serde_saphyr::UserMessageFormatter.format_message(&e));
            let path = key_path(&path);
            // serde notices a missing key when the mapping ends, at its last key; the
            // operator looks for the mapping, where the key belongs.
            if message.starts_with("missing field")
                && let Some((l, c)) = node_start(text, &path)
            {
                (line, column) = (l, c);
            }
            ConfigError::Invalid { file: file.to_owned(), line, column, path: bound_message(&path), message }
        })?;
        let mut mark_families: HashMap<u32, (bool, bool)> = HashMap::new();
        for m in &raw.marks {
            let f = mark_families.entry(m.mark.value).or_default();
            if m.dst.value.addr().is_ipv4() {
                f.0 = true;
            } else {
                f.1 = true;
            }
        }
        let checker =
            Checker { file, mark_families, errors: Default::default(), tls_sources: Default::default() };
        let config = checker.validate(raw);
        let mut errors = checker.errors.borrow_mut().split_off(0);
        // File order, whichever part of the validation found them.
        errors.sort_by_key(|e| match e {
            ConfigError::Invalid { line, column, .. } => (*line, *column),
            _ => (0, 0),
        });
        match (config, errors.is_empty()) {
            (Some(mut config), true) => {
                config.tls_sources = checker.tls_sources.into_inner();
                Ok(config)
            }
            _ => Err(ConfigError::from_many(errors)),
        }
    }
}

impl Checker<'_> {
    /// The config, or `None` when an error was kept (in `self.errors`).
    fn validate(&self, raw: RawConfig) -> Option<Config> {
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

        let mut services = Vec::new();
        let mut forward = BTreeMap::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut matchers: HashMap<ServiceMatch, usize> = HashMap::new();
        let mut checks = BTreeMap::new();
        let mut ring_slots_used: u64 = 0;
        let mut backends_total = 0usize;
        for (i, s) in raw.services.into_iter().enumerate() {
            let at = |key: &str| format!("services[{i}].{key}");
            self.keep(valid_service_name(&s.name.value).map_err(|msg| self.err(&s.name, at("name"), msg)));
            if let Some(first) = names.insert(s.name.value.clone(), i) {
                self.keep::<()>(Err(self.err(
                    &s.name,
                    at("name"),
                    format!("duplicate service name `{}` (also services[{first}])", s.name.value),
                )));
            }
            if i as u32 >= MAX_SERVICES {
                self.keep::<()>(Err(self.err(
                    &s.name,
                    at("name"),
                    format!("more than {MAX_SERVICES} services"),
                )));
            }
            if let Some(f) = &s.forward
                && f.value != RawForward::Dr
            {
                self.keep::<()>(Err(self.err(
                    f,
                    at("forward"),
                    "only `dr` (direct routing) is implemented so far",
                )));
            }
            let ring_size = self.keep(self.ring_size(&s, i)).unwrap_or(DEFAULT_RING_SIZE);
            // What follows needs the match: its family decides which addresses fit.
            let Some(matcher) = self.keep(self.service_match(&s.matcher, i, &defined_marks)) else {
                continue;
            };
            if let Some(first) = matchers.insert(matcher, i) {
                self.keep::<()>(Err(self.err(
                    &s.matcher,
                    at("match"),
                    format!("{matcher} is already the match of services[{first}]"),
                )));
            }
            let check = s.check.as_ref().and_then(|c| self.keep(self.check(c, i, &matcher)));
            let Some(backends) = self.keep(self.backends(&s, i, &matcher)) else { continue };
            let fallback = match &s.fallback {
                None => None,
                Some(f) => self.keep(self.real_server(f, at("fallback"), &matcher).and_then(|addr| {
                    match backends.iter().position(|b| b.addr == addr) {
                        Some(j) => Err(self.err(
                            f,
                            at("fallback"),
                            format!("{addr} is services[{i}].backends[{j}]: a fallback stands in for the backends, it cannot be one"),
                        )),
                        None => Ok(addr),
                    }
                })),
            };
            let servers = backends.len() + fallback.is_some() as usize;
            let ring_error = |msg: String| match &s.ring_size {
                Some(r) => self.err(r, at("ring_size"), msg),
                None => self.err(&s.name, at("ring_size"), msg),
            };
            if servers > ring_size as usize {
                let plus = if fallback.is_some() { " and the fallback" } else { "" };
                let msg = format!("{} backends{plus} do not fit a ring of {ring_size} slots", backends.len());
                let default = if s.ring_size.is_none() { " (the default); set a larger prime" } else { "" };
                self.keep::<()>(Err(ring_error(format!("{msg}{default}"))));
            }
            // Each service holds two rings (live and idle) in the shared ring map.
            let before = ring_slots_used;
            ring_slots_used += 2 * ring_size as u64;
            if let Some(d) = &director
                && ring_slots_used > d.ring_slots as u64
                && before <= d.ring_slots as u64
            {
                self.keep::<()>(Err(ring_error(format!(
                    "the rings of services[0..={i}] need {ring_slots_used} slots (two per ring slot), more than director.ring_slots ({})",
                    d.ring_slots
                ))));
            }
            let total_before = backends_total;
            backends_total += servers;
            if backends_total > MAX_BACKENDS as usize && total_before <= MAX_BACKENDS as usize {
                self.keep::<()>(Err(self.err(
                    &s.name,
                    at("backends"),
                    format!("more than {MAX_BACKENDS} backends over all services"),
                )));
            }
            let scheduler = match s.scheduler.unwrap_or(RawScheduler::Sh) {
                RawScheduler::Sh => Scheduler::Sh,
                RawScheduler::Mh => Scheduler::Mh,
                RawScheduler::Wrr => Scheduler::Wrr,
            };
            forward.insert(s.name.value.clone(), Forward::Dr);
            if let Some(c) = check {
                checks.insert(s.name.value.clone(), c);
            }
            let fallback_action = match s.fallback_action {
                None | Some(RawFallbackAction::Drop) => FallbackAction::Drop,
                Some(RawFallbackAction::Pass) => FallbackAction::Pass,
            };
            services.push(ServiceSpec {
                name: s.name.value,
                matcher,
                scheduler,
                ring_size,
                backends,
                fallback,
                fallback_action,
            });
        }
        let routing = raw.routing.as_ref().map(|r| self.keep(self.routing(r)));
        if !self.errors.borrow().is_empty() {
            return None;
        }
        Some(Config {
            director: director?,
            marks,
            services,
            forward,
            checks,
            routing: routing.flatten(),
            tls_sources: Vec::new(),
        })
    }

    /// The rules of mark `m` (one per port range).
    fn mark(&self, i: usize, m: RawMark) -> Result<Vec<MarkRuleSpec>, ConfigError> {
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
    fn ring_size(&self, s: &RawService, i: usize) -> Result<u32, ConfigError> {
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
    fn ranged(
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

    fn duration(&self, v: &Spanned<String>, path: String) -> Result<Duration, ConfigError> {
        let d = humantime::parse_duration(v.value.trim()).map_err(|e| {
            self.err(v, path.clone(), format!("`{}` is not a duration (e.g. 2s, 500ms): {e}", v.value))
        })?;
        if d.is_zero() {
            return Err(self.err(v, path, "must be more than zero"));
        }
        Ok(d)
    }

    fn check(&self, c: &RawCheck, i: usize, matcher: &ServiceMatch) -> Result<HealthCheck, ConfigError> {
        let at = |key: &str| format!("services[{i}].check.{key}");
        let kind = c.kind.value;
        let only = |at_key: Option<Spanned<()>>, key: &str, for_what: &str| -> Result<(), ConfigError> {
            match at_key {
                Some(span) => {
                    Err(self.err(&span, at(key), format!("`{key}` applies only to {for_what} checks")))
                }
                None => Ok(()),
            }
        };
        let present = |on: bool, span: Spanned<()>| on.then_some(span);
        let is_http = matches!(kind, RawCheckType::Http | RawCheckType::Https);
        let web = "http and https";
        only(c.path.as_ref().and_then(|v| present(!is_http, v.clone_span())), "path", web)?;
        only(c.host.as_ref().and_then(|v| present(!is_http, v.clone_span())), "host", web)?;
        only(c.expect_status.as_ref().and_then(|v| present(!is_http, v.clone_span())), "expect_status", web)?;
        only(c.expect_body.as_ref().and_then(|v| present(!is_http, v.clone_span())), "expect_body", web)?;
        let is_https = matches!(kind, RawCheckType::Https);
        only(c.tls_verify.as_ref().and_then(|v| present(!is_https, v.clone_span())), "tls_verify", "https")?;
        only(c.ca_file.as_ref().and_then(|v| present(!is_https, v.clone_span())), "ca_file", "https")?;
        if let (Some(v), Some(f)) = (&c.tls_verify, &c.ca_file)
            && !v.value
        {
            return Err(self.err(f, at("ca_file"), "a CA file is for verifying, and tls_verify is false"));
        }
        let is_exec = matches!(kind, RawCheckType::Exec);
        only(c.argv.as_ref().and_then(|v| present(!is_exec, v.clone_span())), "argv", "exec")?;
        let has_port = matches!(kind, RawCheckType::Tcp | RawCheckType::Http | RawCheckType::Https);
        only(
            c.port.as_ref().and_then(|v| present(!has_port, v.clone_span())),
            "port",
            "tcp, http and https",
        )?;
        let port = c.port.as_ref().map(|p| p.value);
        if port == Some(0) {
            return Err(self.err(&loc(&c.port, &c.kind), at("port"), "port 0 cannot be checked"));
        }
        let needs_port = has_port;
        if needs_port && port.is_none() && matches!(matcher, ServiceMatch::Mark(_)) {
            return Err(self.err(
                &c.kind,
                at("port"),
                "a fwmark service has no port of its own: name the port to check",
            ));
        }
        let kind = match kind {
            RawCheckType::Tcp => CheckKind::Tcp { port },
            RawCheckType::Http | RawCheckType::Https => {
                let path = c.path.as_ref().map_or_else(|| "/".to_owned(), |p| p.value.clone());
                if !path.starts_with('/') || path.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                    let p = loc(&c.path, &c.kind);
                    return Err(self.err(
                        &p,
                        at("path"),
                        format!("`{path}` is not an absolute request path"),
                    ));
                }
                let expect_status = match &c.expect_status {
                    None => vec![200],
                    Some(s) if s.value.is_empty() => {
                        return Err(self.err(s, at("expect_status"), "list at least one status"));
                    }
                    Some(s) => {
                        if let Some(bad) = s.value.iter().find(|v| !(100..=599).contains(*v)) {
                            return Err(self.err(
                                s,
                                at("expect_status"),
                                format!("{bad} is not an HTTP status"),
                            ));
                        }
                        s.value.clone()
                    }
                };
                CheckKind::Http(HttpCheck {
                    port,
                    path,
                    host: c.host.as_ref().map(|h| h.value.clone()),
                    expect_status,
                    expect_body: c.expect_body.as_ref().map(|b| b.value.clone()),
                    tls: if is_https {
                        let verify = c.tls_verify.as_ref().is_none_or(|v| v.value);
                        if let Some(f) = &c.ca_file
                            && !f.value.is_absolute()
                        {
                            return Err(self.err(f, at("ca_file"), "give an absolute path"));
                        }
                        let ca_file = c.ca_file.as_ref().map(|f| f.value.clone());
                        let spec = TlsSpec { verify, ca_file };
                        // Read by the health runtime, not here: where to point its errors.
                        let span = loc(&c.ca_file, &c.kind);
                        let key = if c.ca_file.is_some() { "ca_file" } else { "type" };
                        self.tls_sources
                            .borrow_mut()
                            .push(TlsSource { spec: spec.clone(), at: self.location(&span, at(key)) });
                        Some(spec)
                    } else {
                        None
                    },
                })
            }
            RawCheckType::Exec => match &c.argv {
                Some(a) if a.value.iter().any(|arg| arg.contains('\0')) => {
                    return Err(self.err(
                        a,
                        at("argv"),
                        "an argument holds a NUL byte, which no program can receive",
                    ));
                }
                Some(a) if !a.value.is_empty() && !a.value[0].is_empty() => {
                    CheckKind::Exec { argv: a.value.clone() }
                }
                Some(a) => return Err(self.err(a, at("argv"), "name the program to run")),
                None => return Err(self.err(&c.kind, at("argv"), "an exec check needs `argv`")),
            },
            RawCheckType::Icmp => CheckKind::Icmp,
        };
        let interval = match &c.interval {
            Some(v) => self.duration(v, at("interval"))?,
            None => DEFAULT_CHECK_INTERVAL,
        };
        let timeout = match &c.timeout {
            Some(v) => self.duration(v, at("timeout"))?,
            None => DEFAULT_CHECK_TIMEOUT.min(interval),
        };
        if timeout > interval {
            let t = loc(&c.timeout, &c.kind);
            return Err(self.err(
                &t,
                at("timeout"),
                format!("timeout {timeout:?} is longer than the interval {interval:?}"),
            ));
        }
        let rise = self.ranged(&c.rise, at("rise"), Policy::default().rise, 1..=1000)?;
        let fall = self.ranged(&c.fall, at("fall"), Policy::default().fall, 1..=1000)?;
        let fall_within = self.ranged(&c.fall_within, at("fall_within"), fall, 1..=1000)?;
        if fall_within < fall {
            let f = loc(&c.fall_within, &c.kind);
            return Err(self.err(
                &f,
                at("fall_within"),
                format!("{fall} failures cannot fit in {fall_within} cycles"),
            ));
        }
        let flap = match &c.flap {
            None => None,
            Some(f) => {
                if f.changes.value < 2 || f.changes.value > 1000 {
                    return Err(self.err(
                        &f.changes,
                        at("flap.changes"),
                        "flap control needs 2 to 1000 changes",
                    ));
                }
                if f.within.value < f.changes.value || f.within.value > 10000 {
                    return Err(self.err(
                        &f.within,
                        at("flap.within"),
                        format!("{} changes cannot fit in {} cycles", f.changes.value, f.within.value),
                    ));
                }
                let hold = match &f.hold {
                    Some(h) => Some(self.duration(h, at("flap.hold"))?),
                    None => None,
                };
                Some(FlapPolicy { changes: f.changes.value, within: f.within.value, hold })
            }
        };
        let on_change = match &c.on_change {
            None => None,
            Some(a) if a.value.is_empty() || a.value[0].is_empty() => {
                return Err(self.err(a, at("on_change"), "name the program to run"));
            }
            Some(a) if a.value.iter().any(|arg| arg.contains('\0')) => {
                return Err(self.err(
                    a,
                    at("on_change"),
                    "an argument holds a NUL byte, which no program can receive",
                ));
            }
            Some(a) => Some(Hook {
                argv: a.value.clone(),
                timeout: match &c.on_change_timeout {
                    Some(t) => self.duration(t, at("on_change_timeout"))?,
                    None => DEFAULT_HOOK_TIMEOUT,
                },
            }),
        };
        if on_change.is_none()
            && let Some(t) = &c.on_change_timeout
        {
            return Err(self.err(t, at("on_change_timeout"), "there is no `on_change` hook to time"));
        }
        let jitter = match &c.jitter {
            None => Duration::ZERO,
            Some(j) => {
                let d = self.duration(j, at("jitter"))?;
                if d >= interval {
                    return Err(self.err(
                        j,
                        at("jitter"),
                        format!("jitter {d:?} must be shorter than the interval {interval:?}"),
                    ));
                }
                d
            }
        };
        let warning_weight_percent = match &c.warning_weight_percent {
            None => None,
            Some(p) if p.value <= 100 => Some(p.value),
            Some(p) => {
                return Err(self.err(
                    p,
                    at("warning_weight_percent"),
                    format!("{} is not a percentage (0-100)", p.value),
                ));
            }
        };
        if let Some(src) = &c.source {
            let ipv4 = src.value.is_ipv4();
            match matcher {
                ServiceMatch::Vip { addr, .. } if addr.is_ipv4() != ipv4 => {
                    return Err(self.err(
                        src,
                        at("source"),
                        format!(
                            "{} and the service's backends ({addr}) are of different address families",
                            src.value
                        ),
                    ));
                }
                ServiceMatch::Mark(mark) => self.family_of_mark(src, at("source"), *mark, ipv4)?,
                ServiceMatch::Vip { .. } => {}
            }
        }
        Ok(HealthCheck {
            spec: CheckSpec { kind, timeout, source: c.source.as_ref().map(|s| s.value) },
            interval,
            jitter,
            policy: Policy { rise, fall, fall_within, flap },
            warning_weight_percent,
            start_down: matches!(c.initial_state, Some(RawInitialState::Down)),
            keep_flows: matches!(c.on_down, Some(RawOnDown::Keep)),
            on_change,
        })
    }

    fn director(&self, d: RawDirector) -> Result<Director, ConfigError> {
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
            1..=MAX_FLOW_ENTRIES,
        )?;
        let ring_slots =
            self.ranged(&d.ring_slots, "director.ring_slots", DEFAULT_RING_SLOTS, 1..=MAX_RING_SLOTS)?;
        let bpf_dir = match d.bpf_dir {
            None => PathBuf::from(DEFAULT_BPF_DIR),
            Some(p) if p.value.is_absolute() => p.value,
            Some(p) => {
                return Err(self.err(&p, "director.bpf_dir", "must be an absolute path on a bpf filesystem"));
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
        Ok(Director {
            accept_macs,
            flood_guard_flows_per_sec,
            interfaces,
            xdp_mode: match d.xdp_mode.unwrap_or(RawXdpMode::Native) {
                RawXdpMode::Native => XdpMode::Native,
                RawXdpMode::Generic => XdpMode::Generic,
            },
            metrics_listen: d.metrics_listen.unwrap_or(DEFAULT_METRICS_LISTEN),
            control_socket,
            bpf_dir,
            connection_table_size,
            ring_slots,
        })
    }

    fn service_match(
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

    /// An address that can be a real server of the service (a backend or its fallback).
    fn real_server(
        &self,
        addr: &Spanned<IpAddr>,
        path: String,
        matcher: &ServiceMatch,
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
                    "{a} and the vip {vip} are of different address families (direct routing cannot translate)"
                ),
            ));
        }
        Ok(a)
    }

    /// Direct routing cannot translate between families: a fwmark service's real servers
    /// (and check sources) must be of the family its mark's rules match, and those rules
    /// of one family (as `ipvsadm -A -f N` services are, `-6` or not).
    fn family_of_mark<T>(
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
                    "an {} address, but fwmark {mark} matches only {} destinations (direct routing cannot translate)",
                    family(ipv4),
                    family(!ipv4)
                ),
            ));
        }
        Ok(())
    }

    fn backends(
        &self,
        s: &RawService,
        i: usize,
        matcher: &ServiceMatch,
    ) -> Result<Vec<BackendSpec>, ConfigError> {
        let mut out = Vec::new();
        let mut seen: HashMap<IpAddr, usize> = HashMap::new();
        for (j, b) in s.backends.iter().enumerate() {
            let at = |key: &str| format!("services[{i}].backends[{j}].{key}");
            let addr = self.real_server(&b.address, at("address"), matcher)?;
            if let ServiceMatch::Vip { port, .. } = matcher {
                if let Some(p) = &b.port
                    && p.value != *port
                {
                    return Err(self.err(p, at("port"), format!("direct routing keeps the destination port: the backend must listen on {port}, not {}", p.value)));
                }
            } else if let Some(p) = &b.port {
                return Err(self.err(
                    p,
                    at("port"),
                    "a fwmark service keeps each packet's destination port; leave `port` out",
                ));
            }
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
            out.push(BackendSpec { addr, weight, state });
        }
        Ok(out)
    }
}

/// Where `value` is, or, when it is absent, where `fallback` is.
fn loc<T, U>(value: &Option<Spanned<T>>, fallback: &Spanned<U>) -> Spanned<()> {
    value.as_ref().map_or_else(|| fallback.clone_span(), |v| v.clone_span())
}

/// A location-only copy of a spanned value, for errors about a key that is absent.
trait CloneSpan {
    fn clone_span(&self) -> Spanned<()>;
}

impl<T> CloneSpan for Spanned<T> {
    fn clone_span(&self) -> Spanned<()> {
        Spanned { value: (), referenced: self.referenced, defined: self.defined }
    }
}
