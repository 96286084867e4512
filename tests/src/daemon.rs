//! The real `lb-daemon` binary, run in a test's director namespace: started, signalled,
//! killed and asked questions the way an operator would. Killed on drop (also on panic);
//! what it pinned is removed then.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::NetNs;

/// The `lb-daemon` binary of this build: `LB_DAEMON_BIN`, or the one cargo put next to
/// the running executable (test binaries live one level down, in `deps/`).
pub fn binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LB_DAEMON_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("lb-daemon");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("no lb-daemon binary next to {} (cargo build -p lb-daemon)", exe.display())
}

/// The shipped unit's `CapabilityBoundingSet=`, as setpriv spells it (`-all,+bpf,...`).
pub fn unit_capabilities() -> Result<String> {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/lb-daemon.service"))?;
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("no CapabilityBoundingSet in the unit")?;
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    anyhow::ensure!(!caps.is_empty(), "an empty CapabilityBoundingSet");
    Ok(format!("-all,{}", caps.join(",")))
}

/// How the daemon process is started, beyond its config.
#[derive(Clone, Debug, Default)]
pub struct DaemonOptions {
    /// A command to run it under (e.g. `setpriv --bounding-set=...`).
    pub wrapper: Vec<String>,
    pub env: Vec<(String, String)>,
}

pub struct Daemon {
    child: Option<Child>,
    options: DaemonOptions,
    pub config: PathBuf,
    pub log: PathBuf,
    pub socket: PathBuf,
    pub metrics: SocketAddr,
}

impl Daemon {
    /// Starts `lb-daemon run -c config` inside `ns` and waits until it answers on its
    /// control socket.
    pub fn start(ns: &NetNs, config: &Path, socket: &Path, metrics: SocketAddr, log: &Path) -> Result<Self> {
        Self::start_with(ns, config, socket, metrics, log, DaemonOptions::default())
    }

    pub fn start_with(
        ns: &NetNs,
        config: &Path,
        socket: &Path,
        metrics: SocketAddr,
        log: &Path,
        options: DaemonOptions,
    ) -> Result<Self> {
        let mut d = Daemon {
            child: None,
            options,
            config: config.to_owned(),
            log: log.to_owned(),
            socket: socket.to_owned(),
            metrics,
        };
        d.spawn(ns)?;
        Ok(d)
    }

    fn spawn(&mut self, ns: &NetNs) -> Result<()> {
        let bin = binary()?;
        let log = File::options().create(true).append(true).open(&self.log)?;
        let config = self.config.clone();
        let options = self.options.clone();
        // Spawned from a thread inside the namespace: the child inherits it (and nothing
        // else: unlike `ip netns exec`, the mount namespace stays, with /sys/fs/bpf).
        let child = ns.run(move || {
            let mut cmd = match options.wrapper.split_first() {
                Some((first, rest)) => {
                    let mut c = Command::new(first);
                    c.args(rest).arg(bin);
                    c
                }
                None => Command::new(bin),
            };
            cmd.args(["run", "-c"])
                .arg(&config)
                .env("RUST_LOG", "info")
                .envs(options.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting lb-daemon")
        })?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Starts the daemon again after [`Daemon::kill9`] or [`Daemon::terminate`].
    pub fn restart(&mut self, ns: &NetNs) -> Result<()> {
        if self.child.is_some() {
            bail!("the daemon is still running");
        }
        self.spawn(ns)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("lb-daemon exited ({status}) while starting:\n{}", self.log_text());
            }
            if self.status().is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("lb-daemon did not answer within 30 s:\n{}", self.log_text())
    }

    pub fn pid(&self) -> Result<Pid> {
        let child = self.child.as_ref().ok_or_else(|| anyhow!("the daemon is not running"))?;
        Ok(Pid::from_raw(child.id() as i32))
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(self.pid()?, sig).with_context(|| format!("sending {sig} to lb-daemon"))
    }

    /// SIGKILL: no chance to clean anything up.
    pub fn kill9(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)?;
        if let Some(mut child) = self.child.take() {
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        let mut child = self.child.take().ok_or_else(|| anyhow!("the daemon is not running"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        bail!("lb-daemon ignored SIGTERM for 10 s")
    }

    /// The daemon's control socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Resident memory of the daemon process, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> Result<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        let line = text.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow!("no VmRSS"))?;
        Ok(line.split_whitespace().nth(1).ok_or_else(|| anyhow!("bad VmRSS line"))?.parse()?)
    }

    /// What `lb-daemon status` prints.
    pub fn status(&self) -> Result<String> {
        self.request("status")
    }

    fn request(&self, what: &str) -> Result<String> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(format!("{what}\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// GET /metrics from inside the director namespace.
    pub fn metrics(&self, ns: &NetNs) -> Result<Metrics> {
        let addr = self.metrics;
        let text = ns.run(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("not HTTP: {text:?}"))?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET /metrics: {head}\n{body}");
        }
        Ok(Metrics(body.to_owned()))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A /metrics answer.
#[derive(Clone, Debug)]
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the series written exactly as `series` (name and labels in the
    /// exposition's order), if present.
    pub fn get(&self, series: &str) -> Option<f64> {
        self.0.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    /// Like [`Metrics::get`], but absent is an error.
    pub fn value(&self, series: &str) -> Result<f64> {
        self.get(series).ok_or_else(|| anyhow!("no series {series} in\n{}", self.0))
    }
}

/// Runs `lb-daemon decap ARGS --bpf-dir DIR` in `ns` (entering only its network namespace:
/// `ip netns exec` would mount a /sys without the bpf filesystem); its standard output.
pub fn decap(ns: &NetNs, dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", ns.name()))
        .arg(binary()?)
        .arg("decap")
        .args(args)
        .arg("--bpf-dir")
        .arg(dir)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "decap {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
    Ok(text)
}
