//! Rolling upgrades with runtime overrides: `configs/rolling-upgrade.sh` drains a real
//! server while long-lived connections run, the drain outlives a reload and a `kill -9`
//! restart, `wait-drained` lets the upgrade run only once its connections are gone, and
//! the server comes back; `status --json`, metrics, `weight`, `overrides clear` and the
//! refusals an operator can meet. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use lb_daemon::status_json::Status;
use lb_tests::lab::{DrLab, LabConfig, VIP_PORT};
use lb_tests::tcp::{Conversations, EchoServer};
use lb_tests::topology::VIP;

const ECHO_PORT: u16 = 7000;
const SERVERS: usize = 3;
const UPGRADED: &str = "10.0.2.11";

fn services() -> String {
    let mut y = String::from("services:\n");
    for (name, port) in [("echo", ECHO_PORT), ("web", VIP_PORT)] {
        y.push_str(&format!("  - name: {name}\n    match: {{ vip: {VIP}, port: {port} }}\n    backends:\n"));
        for i in 0..SERVERS {
            y.push_str(&format!("      - {{ address: 10.0.2.{} }}\n", 11 + i));
        }
    }
    y
}

/// `lb-daemon ARGS -c CONFIG`.
fn cli(config: &Path, args: &[&str]) -> Result<Output> {
    let out = Command::new(lb_tests::daemon::binary()?)
        .args(args)
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running lb-daemon {args:?}"))?;
    Ok(out)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn status(config: &Path) -> Result<Status> {
    let out = cli(config, &["status", "--json"])?;
    ensure!(out.status.success(), "status --json: {}", text(&out));
    serde_json::from_slice(&out.stdout).context("parsing status --json")
}

/// (state, active connections, override) of the upgraded server in `service`.
fn upgraded_in(status: &Status, service: &str) -> Result<(String, u64, Option<String>)> {
    let (_, b) = status
        .backends(Some(service), UPGRADED.parse()?)
        .next()
        .with_context(|| format!("{UPGRADED} missing from {service}"))?;
    Ok((b.state.clone(), b.active_connections, b.overridden.as_ref().and_then(|o| o.state.clone())))
}

fn servers_answering(lab: &DrLab) -> Result<Vec<String>> {
    let mut names: Vec<String> = lab.connect_all(2)?.into_iter().map(|(_, s)| s).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

#[test]
fn a_rolling_upgrade_drains_waits_upgrades_and_returns_without_losing_a_connection() -> Result<()> {
    let mut lab = DrLab::start_with(SERVERS, 10, LabConfig::Services(services()))?;
    let config = lab.config_path()?;
    let echo = EchoServer::on_each(&lab.topo.servers, ECHO_PORT)?;
    let sources: Vec<IpAddr> = lab.topo.client_addrs.iter().map(|a| IpAddr::V4(*a)).collect();
    let echo_vip: SocketAddr = (VIP, ECHO_PORT).into();
    let long_lived = Conversations::start(
        &lab.topo.client,
        sources.clone(),
        echo_vip,
        30,
        Duration::from_millis(100),
        10_000,
    )?;
    ensure!(long_lived.wait_rounds(3, Duration::from_secs(10)), "the connections did not start");
    ensure!(
        servers_answering(&lab)?.contains(&"server1".to_owned()),
        "server1 answers nobody before the drain"
    );
    // The connection counts are refreshed every few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    let on_upgraded = loop {
        let (state, active, _) = upgraded_in(&status(&config)?, "echo")?;
        ensure!(state == "active", "{state}");
        if active > 0 || Instant::now() > deadline {
            break active;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    ensure!(on_upgraded > 0, "no long-lived connection landed on {UPGRADED}");

    // The upgrade: its command records what the director said when it ran.
    let seen_by_upgrade = config.with_file_name("status-during-upgrade.json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/rolling-upgrade.sh");
    let record = format!(
        "{} status --json -c {} > {}",
        lb_tests::daemon::binary()?.display(),
        config.display(),
        seen_by_upgrade.display()
    );
    let mut upgrade = Command::new(script)
        .args(["-c", &config.to_string_lossy(), "-t", "90s", UPGRADED, "sh", "-c", &record])
        .env("LB_DAEMON", lb_tests::daemon::binary()?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting configs/rolling-upgrade.sh")?;
    let guard = KillOnDrop(&mut upgrade);

    let deadline = Instant::now() + Duration::from_secs(10);
    while upgraded_in(&status(&config)?, "web")?.2.is_none() {
        ensure!(Instant::now() < deadline, "the script did not drain {UPGRADED}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // `all`: every service with the server is drained, and says it is an override.
    let table = lab.daemon.status()?;
    ensure!(table.contains("2 runtime overrides"), "{table}");
    ensure!(
        table.lines().filter(|l| l.contains("10.0.2.11:") && l.ends_with("drain (override: drain)")).count()
            == 2,
        "{table}"
    );
    let metrics = lab.fresh_metrics()?;
    for service in ["echo", "web"] {
        let series = format!(
            "lb_backend_override_state{{backend=\"{UPGRADED}\",service=\"{service}\",state=\"drain\"}}"
        );
        ensure!(metrics.value(&series)? == 1.0, "{series}:\n{}", metrics.0);
    }
    ensure!(
        !servers_answering(&lab)?.contains(&"server1".to_owned()),
        "a new connection reached the drained server"
    );

    // The drain outlives a reload and a kill -9 restart; the long-lived connections go on.
    lab.write_services(&services())?;
    ensure!(lab.reload()?, "reload failed:\n{}", lab.daemon.log_text());
    ensure!(
        upgraded_in(&status(&config)?, "echo")?.2.as_deref() == Some("drain"),
        "a reload dropped the drain"
    );
    lab.daemon.kill9()?;
    lab.daemon.restart(&lab.topo.director)?;
    ensure!(lab.daemon.log_text().contains("runtime overrides kept"), "{}", lab.daemon.log_text());
    ensure!(
        upgraded_in(&status(&config)?, "echo")?.2.as_deref() == Some("drain"),
        "a restart dropped the drain"
    );
    ensure!(
        !servers_answering(&lab)?.contains(&"server1".to_owned()),
        "the restarted daemon sends to server1"
    );
    ensure!(long_lived.wait_rounds(5, Duration::from_secs(10)), "connections broke: {:?}", long_lived.stop());
    // New echo connections while drained go elsewhere (the echo servers count them at the end).
    let during = Conversations::start(&lab.topo.client, sources, echo_vip, 20, Duration::from_millis(50), 5)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !during.finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = during.stop()?;
    ensure!(during.exchanges == 20 * 5, "{during:?}");

    // wait-drained itself: the connections are still there, so it times out, non-zero.
    let out = cli(&config, &["wait-drained", "echo", UPGRADED, "--timeout", "2s"])?;
    ensure!(!out.status.success() && text(&out).contains("still has"), "{}", text(&out));
    ensure!(!seen_by_upgrade.exists(), "the upgrade ran while connections were left");

    // The clients finish: none was lost, and the upgrade goes ahead.
    let report = long_lived.stop()?;
    ensure!(report.connections == 30 && report.exchanges == report.rounds * 30, "{report:?}");
    ensure!(report.rounds >= 20, "{report:?}");
    let upgrade = guard.wait(Duration::from_secs(60))?;
    ensure!(upgrade.status.success(), "rolling-upgrade.sh failed: {}", text(&upgrade));
    let seen: Status = serde_json::from_str(&std::fs::read_to_string(&seen_by_upgrade)?)?;
    let (state, active, forced) = upgraded_in(&seen, "echo")?;
    ensure!((state.as_str(), active, forced.as_deref()) == ("drain", 0, Some("drain")), "{seen:?}");

    // Back: no override left, and new connections reach it again.
    let now = status(&config)?;
    ensure!(now.overrides.is_empty(), "{:?}", now.overrides);
    ensure!(upgraded_in(&now, "web")?.0 == "active");
    ensure!(servers_answering(&lab)?.contains(&"server1".to_owned()), "server1 did not come back");
    let accepted: Vec<u64> = echo.into_iter().map(EchoServer::stop).collect::<Result<_>>()?;
    ensure!(
        accepted[0] == on_upgraded,
        "the drained server accepted {} echo connections, {on_upgraded} of them before the drain",
        accepted[0]
    );
    Ok(())
}

#[test]
fn weights_clear_and_refusals_over_the_control_socket() -> Result<()> {
    let lab = DrLab::start_with(SERVERS, 10, LabConfig::Services(services()))?;
    let config = lab.config_path()?;

    let out = cli(&config, &["weight", "web", "10.0.2.12", "0"])?;
    ensure!(out.status.success(), "{}", text(&out));
    let out = cli(&config, &["disable", "all", "10.0.2.13"])?;
    ensure!(out.status.success() && text(&out).contains("in echo, web"), "{}", text(&out));
    // Only server1 is left taking new flows.
    ensure!(servers_answering(&lab)? == ["server1"], "{:?}", servers_answering(&lab)?);
    let s = status(&config)?;
    let (_, b) = s.backends(Some("web"), "10.0.2.12".parse()?).next().context("10.0.2.12")?;
    ensure!(b.weight == 0 && b.overridden.as_ref().and_then(|o| o.weight) == Some(0), "{b:?}");
    let persisted = std::fs::read_to_string(config.with_file_name("overrides.json"))?;
    ensure!(persisted.contains("\"disabled\"") && persisted.contains("10.0.2.12"), "{persisted}");
    let metrics = lab.fresh_metrics()?;
    ensure!(
        metrics.value("lb_backend_override_weight{backend=\"10.0.2.12\",service=\"web\"}")? == 0.0,
        "{}",
        metrics.0
    );

    // What an operator gets wrong is refused with the reason, and changes nothing.
    for (args, says) in [
        (vec!["drain", "db", "10.0.2.11"], "no service is named `db`"),
        (vec!["drain", "web", "10.0.2.99"], "service `web` has no backend 10.0.2.99"),
        (vec!["drain", "all", "10.0.2.99"], "no service has backend 10.0.2.99"),
        (vec!["weight", "web", "10.0.2.11", "70000"], "out of range"),
        (vec!["wait-drained", "web", "10.0.2.99", "--timeout", "1s"], "has no backend 10.0.2.99"),
    ] {
        let out = cli(&config, &args)?;
        ensure!(!out.status.success() && text(&out).contains(says), "{args:?}: {}", text(&out));
    }
    ensure!(status(&config)?.overrides.len() == 3, "a refused command changed the overrides");

    let out = cli(&config, &["overrides", "clear"])?;
    ensure!(out.status.success() && text(&out).contains("3 overrides cleared"), "{}", text(&out));
    ensure!(status(&config)?.overrides.is_empty());
    let names = servers_answering(&lab)?;
    ensure!(names.len() == SERVERS, "not every server is back: {names:?}");
    // An idle, enabled backend has nothing to wait for.
    let out = cli(&config, &["wait-drained", "all", "10.0.2.12", "--timeout", "5s"])?;
    ensure!(out.status.success(), "{}", text(&out));
    Ok(())
}

/// Kills the script if the test fails before it ends.
struct KillOnDrop<'a>(&'a mut std::process::Child);

impl KillOnDrop<'_> {
    /// Its exit and output, within `limit`.
    fn wait(self, limit: Duration) -> Result<Output> {
        let deadline = Instant::now() + limit;
        loop {
            if self.0.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                bail!("rolling-upgrade.sh did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut out = Output { status: self.0.wait()?, stdout: Vec::new(), stderr: Vec::new() };
        use std::io::Read as _;
        if let Some(mut s) = self.0.stdout.take() {
            s.read_to_end(&mut out.stdout)?;
        }
        if let Some(mut s) = self.0.stderr.take() {
            s.read_to_end(&mut out.stderr)?;
        }
        Ok(out)
    }
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn wait_drained_does_not_believe_a_count_older_than_the_drain() -> Result<()> {
    let lab = DrLab::start_with(SERVERS, 10, LabConfig::Services(services()))?;
    let config = lab.config_path()?;
    let _echo = EchoServer::on_each(&lab.topo.servers, ECHO_PORT)?;
    let source = vec![IpAddr::V4(lab.topo.client_addrs[0])];
    let echo_vip: SocketAddr = (VIP, ECHO_PORT).into();
    let open = || {
        Conversations::start(
            &lab.topo.client,
            source.clone(),
            echo_vip,
            1,
            Duration::from_millis(100),
            10_000,
        )
    };
    // Which server this source's connections reach (`sh`: always the same one).
    let first = open()?;
    ensure!(first.wait_rounds(2, Duration::from_secs(10)), "the connection did not start");
    let deadline = Instant::now() + Duration::from_secs(10);
    let server = loop {
        let s = status(&config)?;
        if let Some(b) = s
            .services
            .iter()
            .find(|s| s.name == "echo")
            .and_then(|s| s.backends.iter().find(|b| b.active_connections == 1))
        {
            break b.address;
        }
        ensure!(Instant::now() < deadline, "the connection never showed in the counts");
        std::thread::sleep(Duration::from_millis(300));
    };
    first.stop()?;
    // A count of the table that shows the server idle, then served for the next 3 s...
    std::thread::sleep(lb_daemon::control::CONN_COUNT_TTL + Duration::from_millis(500));
    let idle = status(&config)?;
    let (_, b) = idle.backends(Some("echo"), server).next().context("the server")?;
    ensure!(b.active_connections == 0, "{b:?}");
    // ... during which a connection opens and the server is drained: that count is stale.
    let second = open()?;
    ensure!(second.wait_rounds(1, Duration::from_secs(2)), "the second connection did not start");
    let target = server.to_string();
    let out = cli(&config, &["drain", "echo", &target])?;
    ensure!(out.status.success(), "{}", text(&out));
    let out = cli(&config, &["wait-drained", "echo", &target, "--timeout", "6s"])?;
    ensure!(
        !out.status.success() && text(&out).contains(&format!("{server} still has 1 connections")),
        "wait-drained believed a count from before the connection: {}",
        text(&out)
    );
    ensure!(
        second.wait_rounds(3, Duration::from_secs(5)),
        "the drained connection broke: {:?}",
        second.stop()
    );
    Ok(())
}
