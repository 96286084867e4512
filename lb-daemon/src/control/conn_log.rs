//! The connection log: new flows the data path reports (`CONN_EVENTS`, for services with
//! `log_connections`) written as JSON lines to `director.connection_log.file`, rotated by
//! size; and `lb-daemon events`, which reads them back. Bounded: the kernel's ring buffer
//! is fixed (a full one loses events, counted), a batch is at most `BATCH` events, lines
//! past `max_events_per_sec` are counted and dropped, and a failing disk costs a counter
//! and one warning a minute, never the daemon.

use std::collections::HashMap;
use std::io::{BufRead as _, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use lb_common::ConnEvent;
use tokio::io::unix::AsyncFd;

use crate::config::ConnectionLog;
use crate::dataplane::ConnEventReader;
use crate::model::Forward;

use super::*;

/// Events taken from the ring buffer per wakeup, at most.
const BATCH: usize = 4096;
/// A line of the log is about 200 bytes; `events` refuses to hold a longer one than this.
const MAX_LINE: u64 = 64 * 1024;
/// How often `events --follow` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnLogLine {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub service: String,
    /// The client's address and port.
    pub client: String,
    /// The address and port the client connected to (the VIP).
    pub destination: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The real server's address.
    pub backend: IpAddr,
    /// `Route`, `Tunnel`, `Masq` or `FullNat`.
    pub forward: String,
}

/// Service names and backends by the ids the data path reports, as of the last apply.
#[derive(Clone, Debug, Default)]
pub struct LogNames {
    services: HashMap<u32, String>,
    backends: HashMap<u32, (IpAddr, Forward)>,
}

impl LogNames {
    pub(super) fn of(config: &Config, plan: &crate::plan::Plan) -> LogNames {
        let mut names = LogNames::default();
        for s in &config.services {
            if let Some(&id) = plan.service_ids.get(&s.name) {
                names.services.insert(id, s.name.clone());
            }
            let fallback = s.fallback.map(|addr| (addr, s.forward));
            for (addr, forward) in s.backends.iter().map(|b| (b.addr, b.forward)).chain(fallback) {
                if let Some(&id) = plan.backend_ids.get(&(s.name.clone(), addr)) {
                    names.backends.insert(id, (addr, forward));
                }
            }
        }
        names
    }
}

/// What the log has done, for metrics.
#[derive(Debug, Default)]
pub struct ConnLogCounters {
    pub written: AtomicU64,
    /// Over `max_events_per_sec`.
    pub dropped_rate: AtomicU64,
    /// The file could not be written (disk full, permissions).
    pub dropped_write: AtomicU64,
    /// Naming a service or backend a reload removed meanwhile.
    pub dropped_unknown: AtomicU64,
}

fn endpoint(family: u8, words: &[u32; 4], port_be: u16) -> Option<std::net::SocketAddr> {
    Some(std::net::SocketAddr::new(crate::model::addr_of(family, words)?, u16::from_be(port_be)))
}

/// The line for `event`, or `None` when its ids name nothing known now.
pub fn line_of(event: &ConnEvent, names: &LogNames, wall_minus_flow_clock: Duration) -> Option<ConnLogLine> {
    let service = names.services.get(&event.service)?;
    let (backend, forward) = *names.backends.get(&event.backend)?;
    let time = SystemTime::UNIX_EPOCH + wall_minus_flow_clock + Duration::from_nanos(event.time_ns);
    Some(ConnLogLine {
        time: humantime::format_rfc3339_millis(time).to_string(),
        service: service.clone(),
        client: endpoint(event.family, &event.src, event.sport)?.to_string(),
        destination: endpoint(event.family, &event.dst, event.dport)?.to_string(),
        protocol: if event.proto == lb_common::PROTO_UDP { "udp" } else { "tcp" }.to_owned(),
        backend,
        forward: forward.ipvs_name().to_owned(),
    })
}

/// The log file, rotated by size: `file` -> `file.1` -> ... -> `file.<keep>`.
pub struct RotatingFile {
    settings: ConnectionLog,
    out: Option<std::io::BufWriter<std::fs::File>>,
    size: u64,
}

impl RotatingFile {
    pub fn new(settings: ConnectionLog) -> Self {
        RotatingFile { settings, out: None, size: 0 }
    }

    fn open(&mut self) -> std::io::Result<&mut std::io::BufWriter<std::fs::File>> {
        if self.out.is_none() {
            if let Some(dir) = self.settings.file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            use std::os::unix::fs::OpenOptionsExt as _;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(&self.settings.file)?;
            self.size = file.metadata()?.len();
            self.out = Some(std::io::BufWriter::with_capacity(64 * 1024, file));
        }
        self.out.as_mut().ok_or_else(|| std::io::Error::other("the log file is not open"))
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.settings.file.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(mut out) = self.out.take() {
            out.flush()?;
        }
        let keep = self.settings.keep_files;
        if keep == 0 {
            std::fs::remove_file(&self.settings.file)?;
        } else {
            for n in (1..keep).rev() {
                match std::fs::rename(self.rotated(n), self.rotated(n + 1)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.settings.file, self.rotated(1))?;
        }
        self.size = 0;
        Ok(())
    }

    /// Appends one line (a newline is added), rotating first if it would not fit.
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        self.open()?;
        if self.size > 0 && self.size + len > self.settings.max_file_bytes {
            self.rotate()?;
        }
        let out = self.open()?;
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

/// At most `per_sec` a second (a window per wall second).
struct RateLimit {
    per_sec: u32,
    window: Instant,
    used: u32,
}

impl RateLimit {
    fn allow(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.used = 0;
        }
        self.used < self.per_sec && {
            self.used += 1;
            true
        }
    }
}

/// Drains the data path's events into the log until the daemon stops.
pub(super) async fn follow_conn_events(
    reader: ConnEventReader,
    settings: ConnectionLog,
    daemon: Arc<Mutex<Daemon>>,
    counters: Arc<ConnLogCounters>,
) {
    // SAFETY: the reader owns its map's descriptor, which stays open and the same until it
    // is dropped with the `AsyncFd`.
    let registered = unsafe { AsyncFd::register_with_interest(reader, tokio::io::Interest::READABLE) };
    let mut ready = match registered {
        Ok(fd) => fd,
        Err(e) => {
            let (_, e) = e.into_parts();
            return tracing::error!(error = %e, "cannot wait on the connection log's ring buffer: no connection is logged");
        }
    };
    let mut limit = RateLimit { per_sec: settings.max_events_per_sec, window: Instant::now(), used: 0 };
    let mut file = RotatingFile::new(settings);
    let mut warned: Option<Instant> = None;
    loop {
        let mut guard = match ready.readable_mut().await {
            Ok(g) => g,
            Err(e) => return tracing::error!(error = %e, "the connection log's ring buffer failed"),
        };
        let names = Arc::clone(&lock(&daemon).log_names);
        let offset = match (
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH),
            crate::snapshot::flow_clock_ns(),
        ) {
            (Ok(wall), Ok(flow)) => wall.saturating_sub(Duration::from_nanos(flow)),
            _ => Duration::ZERO,
        };
        let mut failure = None;
        let taken = guard.get_inner_mut().drain(BATCH, |event| {
            if !limit.allow() {
                counters.dropped_rate.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let Some(line) = line_of(&event, &names, offset) else {
                counters.dropped_unknown.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let written =
                serde_json::to_string(&line).map_err(std::io::Error::other).and_then(|l| file.write_line(&l));
            match written {
                Ok(()) => counters.written.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    failure = Some(e);
                    counters.dropped_write.fetch_add(1, Ordering::Relaxed)
                }
            };
        });
        if let Err(e) = file.flush() {
            failure = Some(e);
        }
        if let Some(e) = failure
            && warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            warned = Some(Instant::now());
            tracing::warn!(error = %e, "writing the connection log (lines are counted as dropped)");
        }
        if taken < BATCH {
            guard.clear_ready();
        }
    }
}

/// What `lb-daemon events` prints.
#[derive(Clone, Debug)]
pub struct ShowEvents {
    pub file: PathBuf,
    pub service: Option<String>,
    pub follow: bool,
    /// The lines as written, rather than one readable line each.
    pub json: bool,
    /// With `follow`: stop after this long (`None`: until killed).
    pub follow_for: Option<Duration>,
}

fn readable(line: &ConnLogLine) -> String {
    format!(
        "{} {} {} {} -> {} -> {} ({})",
        line.time, line.service, line.protocol, line.client, line.destination, line.backend, line.forward
    )
}

/// Prints the log's lines (of one service), then with `follow` the new ones as they come,
/// across rotations.
pub fn show_events(what: &ShowEvents, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let start = Instant::now();
    let mut reader: Option<(std::io::BufReader<std::fs::File>, u64)> = None;
    let mut line = Vec::new();
    loop {
        if reader.is_none() {
            match std::fs::File::open(&what.file) {
                Ok(f) => {
                    use std::os::unix::fs::MetadataExt as _;
                    let inode = f.metadata()?.ino();
                    reader = Some((std::io::BufReader::new(f), inode));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && what.follow => {}
                Err(e) => {
                    return Err(std::io::Error::new(e.kind(), format!("{}: {e}", what.file.display())));
                }
            }
        }
        if let Some((r, _)) = reader.as_mut() {
            loop {
                line.clear();
                let n = std::io::Read::take(&mut *r, MAX_LINE).read_until(b'\n', &mut line)?;
                if n == 0 {
                    break;
                }
                if !line.ends_with(b"\n") {
                    // A line still being written (or one longer than any the daemon writes):
                    // read it again whole next time.
                    r.seek_relative(-(n as i64))?;
                    break;
                }
                let text = String::from_utf8_lossy(&line);
                let parsed: Option<ConnLogLine> = serde_json::from_str(text.trim_end()).ok();
                if let Some(s) = &what.service
                    && parsed.as_ref().is_none_or(|p| &p.service != s)
                {
                    continue;
                }
                match (&parsed, what.json) {
                    (Some(p), false) => writeln!(out, "{}", readable(p))?,
                    _ => out.write_all(&line)?,
                }
            }
            out.flush()?;
        }
        if !what.follow || what.follow_for.is_some_and(|d| start.elapsed() >= d) {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
        // Rotated: the path names another file now. What was left in the old one was read.
        if let Some((_, inode)) = &reader {
            use std::os::unix::fs::MetadataExt as _;
            if std::fs::metadata(&what.file).map(|m| m.ino()).ok() != Some(*inode) {
                reader = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, max: u64, keep: u32) -> ConnectionLog {
        ConnectionLog {
            file: dir.join("conn.log"),
            max_file_bytes: max,
            keep_files: keep,
            max_events_per_sec: 10,
        }
    }

    #[test]
    fn the_file_rotates_by_size_and_keeps_as_many_as_asked() {
        let dir = std::env::temp_dir().join(format!("lb-connlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut f = RotatingFile::new(settings(&dir, 100, 2));
        for i in 0..10 {
            f.write_line(&format!("{i:039}")).unwrap(); // 40 bytes with the newline
        }
        f.flush().unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        // Two lines a file: 8,9 current; 6,7 in .1; 4,5 in .2; older ones gone.
        assert_eq!(read("conn.log").lines().count(), 2);
        assert!(read("conn.log").starts_with(&format!("{:039}", 8)));
        assert!(read("conn.log.1").starts_with(&format!("{:039}", 6)));
        assert!(read("conn.log.2").starts_with(&format!("{:039}", 4)));
        assert!(!dir.join("conn.log.3").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn events_follow_the_log_across_a_rotation_and_filter_by_service() {
        let dir = std::env::temp_dir().join(format!("lb-connlog-follow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let line = |service: &str, n: u32| {
            serde_json::to_string(&ConnLogLine {
                time: "2026-12-02T00:00:00.000Z".into(),
                service: service.into(),
                client: format!("10.0.1.10:{n}"),
                destination: "192.0.2.10:80".into(),
                protocol: "tcp".into(),
                backend: "10.0.2.11".parse().unwrap(),
                forward: "Route".into(),
            })
            .unwrap()
        };
        let mut file = RotatingFile::new(settings(&dir, 600, 1));
        file.write_line(&line("web", 1)).unwrap();
        file.write_line(&line("dns", 2)).unwrap();
        file.flush().unwrap();
        let writer = std::thread::spawn(move || {
            // Written while `show_events` follows: the third line rotates the file.
            for n in 3..=6 {
                std::thread::sleep(Duration::from_millis(150));
                file.write_line(&line("web", n)).unwrap();
                file.flush().unwrap();
            }
        });
        let what = ShowEvents {
            file: dir.join("conn.log"),
            service: Some("web".into()),
            follow: true,
            json: false,
            follow_for: Some(Duration::from_secs(2)),
        };
        let mut out = Vec::new();
        show_events(&what, &mut out).unwrap();
        writer.join().unwrap();
        let text = String::from_utf8(out).unwrap();
        let ports: Vec<&str> =
            text.lines().map(|l| l.split_whitespace().nth(3).unwrap().rsplit(':').next().unwrap()).collect();
        assert_eq!(ports, ["1", "3", "4", "5", "6"], "{text}");
        assert!(dir.join("conn.log.1").exists(), "the file did rotate");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rate_limit_counts_per_second() {
        let mut l = RateLimit { per_sec: 3, window: Instant::now(), used: 0 };
        assert_eq!((0..5).filter(|_| l.allow()).count(), 3);
        l.window -= Duration::from_secs(1);
        assert!(l.allow());
    }

    #[test]
    fn an_event_becomes_a_line_with_names_and_wall_time() {
        let mut names = LogNames::default();
        names.services.insert(3, "web".into());
        names.backends.insert(7, ("10.0.2.11".parse().unwrap(), Forward::Nat));
        let event = ConnEvent {
            time_ns: 2_000_000_000,
            src: [u32::from_ne_bytes([10, 0, 1, 10]), 0, 0, 0],
            dst: [u32::from_ne_bytes([192, 0, 2, 10]), 0, 0, 0],
            service: 3,
            backend: 7,
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            family: lb_common::FAMILY_V4,
            proto: lb_common::PROTO_TCP,
            _pad: [0; 2],
        };
        let line = line_of(&event, &names, Duration::from_secs(1_700_000_000)).unwrap();
        assert_eq!(line.time, "2023-11-14T22:13:22.000Z");
        assert_eq!((line.client.as_str(), line.destination.as_str()), ("10.0.1.10:40000", "192.0.2.10:80"));
        assert_eq!((line.service.as_str(), line.forward.as_str()), ("web", "Masq"));
        assert_eq!(
            readable(&line),
            "2023-11-14T22:13:22.000Z web tcp 10.0.1.10:40000 -> 192.0.2.10:80 -> 10.0.2.11 (Masq)"
        );
        assert!(
            line_of(&ConnEvent { backend: 8, ..event }, &names, Duration::ZERO).is_none(),
            "an unknown id"
        );
    }
}
