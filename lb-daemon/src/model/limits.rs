//! Defaults an operator can rely on and the limits of what the daemon accepts.

use std::net::SocketAddr;
use std::time::Duration;

/// Defaults stated in the example file.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9740));
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lb-daemon/control.sock";
pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/lb";
/// Where runtime overrides (`lb-daemon drain` and the like) outlive the process: the unit's
/// `StateDirectory=lb-daemon`.
pub const DEFAULT_OVERRIDES_FILE: &str = "/var/lib/lb-daemon/overrides.json";
/// The connection log's file size before rotation, and its bounds.
pub const DEFAULT_CONNECTION_LOG_BYTES: u64 = 100 << 20;
pub const MIN_CONNECTION_LOG_BYTES: u64 = 4096;
pub const MAX_CONNECTION_LOG_BYTES: u64 = 1 << 40;
/// Connection-log lines per second: past this they are counted and dropped, so that a
/// flood of new flows cannot fill the disk faster than rotation expects.
pub const DEFAULT_CONNECTION_LOG_RATE: u32 = 10_000;
pub const MAX_CONNECTION_LOG_RATE: u32 = 1_000_000;
pub const DEFAULT_RING_SIZE: u32 = 4093;
/// Largest accepted ring: beyond this a table costs more memory than balance it buys.
pub const MAX_RING_SIZE: u32 = 1 << 20;
pub const MAX_WEIGHT: u32 = 65535;
/// Sizes above these make the kernel refuse the map with a bare EINVAL or ENOMEM.
pub const MAX_RING_SLOTS: u32 = 1 << 26;
pub const MAX_FLOW_ENTRIES: u32 = 1 << 28;
/// Katran's default: new flows one CPU records per second before the flood guard stops
/// recording them.
pub const DEFAULT_FLOOD_GUARD_FLOWS_PER_SEC: u32 = 125_000;

pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(10);
