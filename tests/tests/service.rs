//! The daemon as systemd runs it: only the capabilities `configs/lb-daemon.service`
//! grants, the sd_notify protocol (READY, STATUS, WATCHDOG, RELOADING with its time,
//! STOPPING), SIGTERM leaving the data path in place and `lb-daemon detach` removing it.
//! Needs root.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use lb_tests::NetNs;
use lb_tests::daemon::{Daemon, DaemonOptions, binary};
use nix::sys::signal::Signal;

/// Notifications, one datagram each, until one contains `want` (bounded).
fn wait_for(sock: &UnixDatagram, want: &str, seen: &mut Vec<String>) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.push(msg.clone());
                if msg.lines().any(|l| l == want || l.starts_with(want)) {
                    return Ok(msg);
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
            }
            Err(e) => return Err(e.into()),
        }
    }
    bail!("no {want} within 30 s; got {seen:?}")
}

fn xdp_attached(ns: &NetNs, iface: &str) -> Result<bool> {
    Ok(ns.ip(&["link", "show", iface])?.contains("prog/xdp"))
}

#[test]
fn runs_with_the_units_capabilities_and_speaks_sd_notify() -> Result<()> {
    let ns = NetNs::new("sd")?;
    ns.ip(&["link", "add", "ext0", "type", "veth", "peer", "name", "ext0p"])?;
    for i in ["lo", "ext0", "ext0p"] {
        ns.ip(&["link", "set", i, "up"])?;
    }
    let dir = std::env::temp_dir().join(lb_tests::unique_name("lbsd"));
    std::fs::create_dir_all(&dir)?;
    let bpf_dir = PathBuf::from("/sys/fs/bpf").join(dir.file_name().unwrap_or_default());
    let socket = dir.join("control.sock");
    let config = dir.join("lb.yaml");
    std::fs::write(
        &config,
        format!(
            "director:\n  interfaces: [ext0]\n  control_socket: {}\n  bpf_dir: {}\n  connection_table_size: 4096\n  \
             ring_slots: 16384\nservices:\n  - name: web\n    match: {{ vip: 192.0.2.10, port: 80 }}\n",
            socket.display(),
            bpf_dir.display()
        ),
    )?;
    let cleanup = Cleanup { dir: dir.clone(), bpf_dir: bpf_dir.clone() };
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_millis(200)))?;

    let options = DaemonOptions {
        wrapper: vec!["setpriv".into(), format!("--bounding-set={}", lb_tests::daemon::unit_capabilities()?)],
        env: vec![
            ("NOTIFY_SOCKET".into(), notify_path.display().to_string()),
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
    };
    let mut daemon = Daemon::start_with(
        &ns,
        &config,
        &socket,
        "127.0.0.1:9740".parse()?,
        &dir.join("lb-daemon.log"),
        options,
    )?;
    let mut seen = Vec::new();
    let ready = wait_for(&notify, "READY=1", &mut seen)?;
    ensure!(ready.contains("STATUS=1 services, 0 backends on ext0"), "{ready:?}");
    ensure!(xdp_attached(&ns, "ext0")?, "attached with only the unit's capabilities");
    wait_for(&notify, "WATCHDOG=1", &mut seen)?;

    daemon.signal(Signal::SIGHUP)?;
    let reloading = wait_for(&notify, "RELOADING=1", &mut seen)?;
    ensure!(
        reloading
            .lines()
            .any(|l| l.strip_prefix("MONOTONIC_USEC=").is_some_and(|v| v.parse::<u64>().is_ok())),
        "RELOADING=1 must carry MONOTONIC_USEC: {reloading:?}"
    );
    wait_for(&notify, "READY=1", &mut seen)?;

    let status = daemon.terminate()?;
    ensure!(status.success(), "exit status {status}:\n{}", daemon.log_text());
    wait_for(&notify, "STOPPING=1", &mut seen)?;
    ensure!(xdp_attached(&ns, "ext0")?, "SIGTERM must leave the data path in place");
    ensure!(bpf_dir.join("links/ext0").exists());

    let out = Command::new(binary()?).args(["detach", "-c"]).arg(&config).output()?;
    ensure!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(String::from_utf8_lossy(&out.stdout).contains("detached from ext0"));
    ensure!(!xdp_attached(&ns, "ext0")?, "detach removes the program");
    ensure!(!bpf_dir.exists(), "detach removes the pins");
    drop(cleanup);
    Ok(())
}

/// Removes the test's files and pins, also when it fails.
struct Cleanup {
    dir: PathBuf,
    bpf_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = lb_daemon::dataplane::Dataplane::remove_pins(&self.bpf_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
