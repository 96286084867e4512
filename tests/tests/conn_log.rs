//! The connection log end to end: a service with `log_connections: 1` has each of 100
//! TCP connections from 10 clients logged with the real server that answered it;
//! `lb-daemon events` shows them (by service, as JSON or readable, and `--follow` sees new
//! ones); metrics count them; a reload that turns logging off stops it. Needs root.

use std::io::{BufRead as _, Read as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use lb_daemon::control::conn_log::ConnLogLine;
use lb_tests::lab::{DrLab, LabConfig, VIP_PORT};
use lb_tests::topology::VIP;

const SERVERS: usize = 3;
const CONNECTIONS: usize = 100;

fn services(log_one_in: u32) -> String {
    let mut y = format!(
        "services:\n  - name: web\n    match: {{ vip: {VIP}, port: {VIP_PORT} }}\n    log_connections: {log_one_in}\n    backends:\n"
    );
    for i in 0..SERVERS {
        y.push_str(&format!("      - {{ address: 10.0.2.{} }}\n", 11 + i));
    }
    // A second service that logs nothing: `--service` tells them apart.
    y.push_str(&format!("  - name: quiet\n    match: {{ vip: {VIP}, port: 8081 }}\n    backends:\n      - {{ address: 10.0.2.11 }}\n"));
    y
}

/// `count` connections from the client addresses in turn: (client address and port, the
/// server that answered).
fn connect(lab: &DrLab, count: usize) -> Result<Vec<(SocketAddr, String)>> {
    let sources = lab.topo.client_addrs.clone();
    let vip: SocketAddr = (VIP, VIP_PORT).into();
    lab.topo.client.run(move || {
        let mut made = Vec::with_capacity(count);
        for i in 0..count {
            let src = IpAddr::V4(sources[i % sources.len()]);
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(src, 0).into())?;
            socket
                .connect_timeout(&vip.into(), Duration::from_secs(5))
                .with_context(|| format!("{src} -> {vip}"))?;
            let mut stream: TcpStream = socket.into();
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let local = stream.local_addr()?;
            let mut name = String::new();
            stream.read_to_string(&mut name)?;
            made.push((local, name.trim().to_owned()));
        }
        Ok(made)
    })
}

/// `lb-daemon events ARGS -c CONFIG`.
fn events(lab: &DrLab, args: &[&str]) -> Result<String> {
    let out = Command::new(lb_tests::daemon::binary()?)
        .arg("events")
        .args(args)
        .arg("-c")
        .arg(lab.config_path()?)
        .output()?;
    ensure!(out.status.success(), "lb-daemon events: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

/// The log's lines once there are `n` of them (it is written in batches, as the data path
/// reports).
fn logged(lab: &DrLab, n: usize) -> Result<Vec<ConnLogLine>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = events(lab, &["--json"])?;
        let lines: Vec<ConnLogLine> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<std::result::Result<_, _>>()
            .context("a log line")?;
        if lines.len() >= n || Instant::now() > deadline {
            return Ok(lines);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn server_address(name: &str) -> Result<IpAddr> {
    let i: u8 = name
        .strip_prefix("server")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("answer {name:?}"))?;
    Ok(IpAddr::from([10, 0, 2, 10 + i]))
}

#[test]
fn every_logged_connection_names_the_server_that_answered_it() -> Result<()> {
    let lab = DrLab::start_with(SERVERS, 10, LabConfig::Services(services(1)))?;
    let made = connect(&lab, CONNECTIONS)?;
    let lines = logged(&lab, CONNECTIONS)?;
    ensure!(lines.len() == CONNECTIONS, "{} lines for {CONNECTIONS} connections", lines.len());
    for (client, server) in &made {
        let line = lines
            .iter()
            .find(|l| l.client == client.to_string())
            .with_context(|| format!("the connection from {client} is not in the log"))?;
        ensure!(
            line.backend == server_address(server)?,
            "{client} was answered by {server}, logged {line:?}"
        );
        ensure!(
            (line.service.as_str(), line.destination.as_str(), line.protocol.as_str(), line.forward.as_str())
                == ("web", "192.0.2.10:80", "tcp", "Route"),
            "{line:?}"
        );
        ensure!(humantime::parse_rfc3339(&line.time).is_ok(), "{line:?}");
    }
    let metrics = lab.fresh_metrics()?;
    let written = metrics.value("lb_connection_log_events_total{outcome=\"written\"}")?;
    ensure!(written == CONNECTIONS as f64, "written {written}:\n{}", metrics.0);
    ensure!(metrics.value("lb_connection_log_events_total{outcome=\"lost_ring_full\"}")? == 0.0);

    // Readable by default, one line a connection; by service.
    let readable = events(&lab, &[])?;
    ensure!(readable.lines().count() == CONNECTIONS, "{readable}");
    ensure!(readable.lines().all(|l| l.contains(" web tcp ") && l.ends_with("(Route)")), "{readable}");
    ensure!(events(&lab, &["--service", "quiet"])?.is_empty());
    ensure!(events(&lab, &["--service", "web", "--json"])?.lines().count() == CONNECTIONS);

    // --follow prints what is there, then new connections as they come.
    let mut follow = Command::new(lb_tests::daemon::binary()?)
        .args(["events", "--follow", "--json", "-c"])
        .arg(lab.config_path()?)
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = follow.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(std::result::Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let more = connect(&lab, 5)?;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < CONNECTIONS + 5 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(line);
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    ensure!(seen.len() == CONNECTIONS + 5, "--follow printed {} lines", seen.len());
    for (client, _) in &more {
        ensure!(seen.iter().any(|l| l.contains(&format!("\"{client}\""))), "--follow missed {client}");
    }

    // Logging off: the next connections are not logged.
    lab.write_services(&services(0))?;
    ensure!(lab.reload()?, "reload failed:\n{}", lab.daemon.log_text());
    connect(&lab, 10)?;
    std::thread::sleep(Duration::from_millis(500));
    let after = logged(&lab, CONNECTIONS + 5)?;
    if after.len() != CONNECTIONS + 5 {
        bail!("{} lines after logging was turned off, {} before", after.len(), CONNECTIONS + 5);
    }
    Ok(())
}
