//! BIRD (apt package bird2) running a configuration in a namespace, asked through its
//! own control socket; killed on drop.

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
