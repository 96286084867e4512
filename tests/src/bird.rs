//! The routing daemons beside a director, each running a configuration in a namespace:
//! BIRD (apt package bird2), asked through its own control socket, and keepalived (VRRP
//! only). Stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};

use crate::NetNs;

pub struct Bird {
    child: Child,
    socket: PathBuf,
}

impl Bird {
    /// `bird -f -c conf` inside `ns`, with a control socket of its own.
    pub fn start(ns: &NetNs, conf: &Path) -> Result<Self> {
        let socket = std::env::temp_dir().join(format!("{}.ctl", crate::unique_name("bird")));
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "bird", "-f", "-c"])
            .arg(conf)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()
            .context("starting bird (apt package bird2; `cargo xtask setup` installs it)")?;
        Ok(Bird { child, socket })
    }

    /// `birdc` with these words (`show route table lbvips`); its output.
    pub fn ask(&self, words: &[&str]) -> Result<String> {
        let out = Command::new("birdc").arg("-s").arg(&self.socket).args(words).output()?;
        ensure!(out.status.success(), "birdc {}: {}", words.join(" "), String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits (bounded) until `birdc show route table TABLE` satisfies `ok`.
    pub fn wait_routes(&self, table: &str, ok: impl Fn(&str) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.ask(&["show", "route", "table", table]).unwrap_or_default();
            if ok(&text) {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "BIRD's table {table} never got there:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// keepalived's VRRP, with pid files of its own (several run on one host).
pub struct Keepalived {
    child: Child,
    log: PathBuf,
}

impl Keepalived {
    /// `keepalived --vrrp --dont-fork -f conf` inside `ns`; logs to `dir/keepalived.log`.
    pub fn start(ns: &NetNs, conf: &Path, dir: &Path) -> Result<Self> {
        let log_path = dir.join("keepalived.log");
        let log = std::fs::File::options().create(true).append(true).open(&log_path)?;
        let pid = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "keepalived", "--vrrp", "--dont-fork", "--log-console", "-f"])
            .arg(conf)
            .args(["--pid", &pid("keepalived.pid"), "--vrrp_pid", &pid("vrrp.pid")])
            .args(["--checkers_pid", &pid("checkers.pid")])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting keepalived (apt package keepalived; `cargo xtask setup` installs it)")?;
        Ok(Keepalived { child, log: log_path })
    }

    /// What it logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Keepalived {
    /// SIGTERM, as systemd stops it: it removes its VIPs and sends a priority-0 advert,
    /// so that the backup takes over at once. SIGKILL if it has not exited within 5 s.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
