//! The YAML configuration: its serde model (`raw`), and validation (`validate`, `check`,
//! `routing`) into the model ([`crate::model`], `health::spec`, `routing::decl`). It reads
//! the file and nothing else. Every error names the file, line, column and key path of
//! what it refuses.
//!
//! `configs/lb.example.yaml` documents every key. Parsing uses `serde-saphyr`: it is
//! maintained, panic-free on hostile input (bounded alias expansion and nesting), refuses
//! duplicate keys, and reports locations that [`Spanned`] carries into the semantic checks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use lb_common::{DEFAULT_FLOW_ENTRIES, DEFAULT_RING_SLOTS, MAX_BACKENDS, MAX_SERVICES};
use serde_saphyr::{MessageFormatter as _, Spanned};

mod check;
mod locate;
mod raw;
mod routing;
mod validate;

use crate::health::spec::{CheckKind, CheckSpec, FlapPolicy, HealthCheck, Hook, HttpCheck, Policy, TlsSpec};
use crate::model::{
    BackendSpec, BackendState, FallbackAction, MarkRuleSpec, Protocol, Scheduler, ServiceMatch, ServiceSpec,
};
use crate::model::{
    DEFAULT_BPF_DIR, DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT, DEFAULT_CONNECTION_LOG_BYTES,
    DEFAULT_CONNECTION_LOG_RATE, DEFAULT_CONTROL_SOCKET, DEFAULT_FLOOD_GUARD_FLOWS_PER_SEC,
    DEFAULT_HOOK_TIMEOUT, DEFAULT_METRICS_LISTEN, DEFAULT_OVERRIDES_FILE, DEFAULT_RING_SIZE, Forward,
    MAX_CONNECTION_LOG_BYTES, MAX_CONNECTION_LOG_RATE, MAX_FLOW_ENTRIES, MAX_RING_SIZE, MAX_RING_SLOTS,
    MAX_WEIGHT, MIN_CONNECTION_LOG_BYTES, XdpMode, is_prime,
};
use crate::routing::decl::RoutingConfig;
use locate::{key_path, node_start};
use raw::*;
pub use routing::DEFAULT_ROUTING_PROTOCOL;
use validate::*;

/// Largest configuration file read; anything larger is refused before it is parsed.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;
/// YAML nodes (scalars, sequences, mappings) a file may hold. A site at the limits (1,000
/// services, 100,000 backends of a few keys each) needs under a million; the parser's
/// default (250,000) refuses it. The bound stays: with the alias limits it caps what a
/// hostile file can make the parser build (each node costs a few hundred bytes).
pub const MAX_YAML_NODES: usize = 2_000_000;
/// Parser events (a node's start and end, scalars); twice the nodes.
pub const MAX_YAML_EVENTS: usize = 2 * MAX_YAML_NODES;

fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = MAX_YAML_NODES;
    budget.max_events = MAX_YAML_EVENTS;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}
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
    /// Per service name: how its backends are checked (services without are always up).
    pub checks: BTreeMap<String, HealthCheck>,
    /// Policy routing and VIP routes; `None`: the daemon manages no route or rule.
    pub routing: Option<RoutingConfig>,
    /// The TLS settings of `https` checks and where the file states them: the health
    /// runtime reads their CA files (`health::tls::prepare`), and its errors point here.
    pub tls_sources: Vec<TlsSource>,
    /// SHA-256 of the file's text, in hex: what `sha256sum` prints for the file, so that
    /// directors meant to run the same file can be compared (status, `lb_config_info`).
    pub digest: String,
}

/// `configs/lb.example.yaml`, which the Debian package installs as `/etc/lb-daemon/lb.yaml`:
/// valid, but written for no host in particular (`run` refuses it unchanged).
pub const SHIPPED_EXAMPLE: &str = include_str!("../../../configs/lb.example.yaml");

impl Config {
    /// Whether this is the shipped example, not one byte changed.
    pub fn is_shipped_example(&self) -> bool {
        self.digest == file_digest(SHIPPED_EXAMPLE)
    }
}

fn file_digest(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
    /// Runtime overrides, kept across reloads and restarts.
    pub overrides_file: PathBuf,
    /// Where new connections are logged (services say which and how many); `None`: nowhere.
    pub connection_log: Option<ConnectionLog>,
    pub bpf_dir: PathBuf,
    pub connection_table_size: u32,
    pub ring_slots: u32,
    /// Destination MACs accepted on every attached interface beside its own (a VRRP
    /// virtual MAC); frames to any other MAC are not the director's.
    pub accept_macs: Vec<[u8; 6]>,
    /// New flows per second and CPU recorded in the connection table; zero: no limit.
    pub flood_guard_flows_per_sec: u32,
    /// Outer sources of tunnel headers, per family: one address (a /32 or /128) or a
    /// prefix whose host bits each flow draws from its hash.
    pub tunnel_source_v4: Option<ipnet::Ipv4Net>,
    pub tunnel_source_v6: Option<ipnet::Ipv6Net>,
    /// Sources of full-NAT flows, per family: one address or a prefix whose host bits
    /// each flow draws from its hash; the director must own them (replies come to them).
    pub fullnat_source_v4: Option<ipnet::Ipv4Net>,
    pub fullnat_source_v6: Option<ipnet::Ipv6Net>,
}

/// The connection log: JSON lines, one per logged new connection, rotated by size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLog {
    pub file: PathBuf,
    /// The file is rotated (to `.1`, `.2`, ...) when a line would take it past this.
    pub max_file_bytes: u64,
    /// Rotated files kept beside the current one.
    pub keep_files: u32,
    /// Lines written per second at most; the rest are counted and dropped.
    pub max_events_per_sec: u32,
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
        let raw = serde_saphyr::with_deserializer_from_str_with_options(text, yaml_options(), |de| {
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
                config.digest = file_digest(text);
                Ok(config)
            }
            _ => Err(ConfigError::from_many(errors)),
        }
    }
}
