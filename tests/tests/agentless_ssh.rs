//! `configs/agentless-ssh.yaml`, as an operator copies it: its exec argv (paths moved into
//! a scratch directory laid out as the example says) run as a check by the daemon's own
//! checker, with exactly the shipped unit's capability bounding set, against an sshd in a
//! namespace whose root account has the example's restricted `authorized_keys` line. So
//! the example cannot silently break again. Needs root, ssh and sshd.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use lb_daemon::config::Config;
use lb_daemon::health::spec::{CheckKind, CheckSpec};
use lb_daemon::health::state::Outcome;
use lb_daemon::health::{Report, Target};
use lb_tests::{NetNs, run, veth};

const DIRECTOR: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 11);

/// sshd in the server namespace; killed on drop.
struct Sshd(Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn keygen(path: &Path) -> Result<String> {
    run(
        "ssh-keygen",
        &["-q", "-t", "ed25519", "-N", "", "-C", "lb-check@director", "-f", &path.display().to_string()],
    )?;
    Ok(std::fs::read_to_string(path.with_extension("pub"))?.trim().to_owned())
}

/// The example's argv with its paths moved under `dir` and its account replaced by root.
fn example_argv(etc: &Path, run_dir: &Path) -> Result<Vec<String>> {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/agentless-ssh.yaml");
    let config = Config::load(Path::new(file)).map_err(|e| anyhow::anyhow!(lb_daemon::error_chain(&e)))?;
    let CheckKind::Exec { argv } = &config.checks["web"].spec.kind else {
        bail!("the example's check is not exec")
    };
    ensure!(argv.iter().any(|a| a == "-b"), "the example binds the address from= names");
    Ok(argv
        .iter()
        .map(|a| match a.as_str() {
            "10.1.0.1" => DIRECTOR.to_string(),
            a => a
                .replace("/etc/lb-daemon/ssh", &etc.display().to_string())
                .replace("/run/lb-daemon", &run_dir.display().to_string())
                .replace("lbcheck@", "root@"),
        })
        .collect())
}

/// Runs the check as the daemon would, under the unit's capability bounding set, from the
/// director namespace.
fn check(director: &NetNs, argv: &[String]) -> Result<Report> {
    let mut full =
        vec!["setpriv".to_owned(), format!("--bounding-set={}", lb_tests::daemon::unit_capabilities()?)];
    full.extend_from_slice(argv);
    let spec = CheckSpec {
        kind: CheckKind::Exec { argv: full },
        timeout: Duration::from_secs(8),
        source: None,
        via_tunnel: None,
    };
    let target = Target { service: "web".into(), addr: IpAddr::V4(SERVER), port: Some(80), tunnel: None };
    director.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(rt.block_on(lb_daemon::health::run(&spec, &target)).0)
    })
}

#[test]
fn the_agentless_ssh_example_works_under_the_units_capabilities_and_says_why_it_fails() -> Result<()> {
    let director = NetNs::new("sd")?;
    let server = NetNs::new("ss")?;
    let (d_if, s_if) = veth(&director, &server, "sh")?;
    director.ip(&["addr", "add", &format!("{DIRECTOR}/24"), "dev", &d_if])?;
    server.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", &s_if])?;

    let scratch = Scratch(std::env::temp_dir().join(lb_tests::unique_name("lbssh")));
    let dir = &scratch.0;
    let (etc, run_dir, srv) = (dir.join("etc"), dir.join("run"), dir.join("server"));
    for d in [&etc, &run_dir, &srv] {
        std::fs::create_dir_all(d)?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    // The real server: a host key, the forced plugin, the restricted key line.
    keygen(&srv.join("host"))?;
    let plugin = srv.join("plugin");
    write(&plugin, "#!/bin/sh\necho 'HTTP OK: 200 via the forced command'\nexit 0\n", 0o755)?;
    let key = keygen(&etc.join("id_ed25519"))?;
    let line = format!("restrict,command=\"{}\",from=\"{DIRECTOR}\" {key}\n", plugin.display());
    write(&srv.join("authorized_keys"), &line, 0o600)?;
    let sshd_config = format!(
        "Port 22\nListenAddress {SERVER}\nHostKey {host}\nAuthorizedKeysFile {keys}\nPidFile {pid}\nUsePAM no\n\
         StrictModes no\nPermitRootLogin forced-commands-only\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n",
        host = srv.join("host").display(),
        keys = srv.join("authorized_keys").display(),
        pid = srv.join("sshd.pid").display(),
    );
    write(&srv.join("sshd_config"), &sshd_config, 0o600)?;
    // sshd wants its privilege separation directory.
    std::fs::create_dir_all("/run/sshd")?;
    let config_path = srv.join("sshd_config");
    let log = std::fs::File::create(srv.join("sshd.log"))?;
    let _sshd = Sshd(server.run(move || {
        Ok(Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()?)
    })?);
    let deadline = Instant::now() + Duration::from_secs(10);
    while director.run(|| {
        Ok(std::net::TcpStream::connect_timeout(&SocketAddr::from((SERVER, 22)), Duration::from_millis(200))
            .is_err())
    })? {
        ensure!(
            Instant::now() < deadline,
            "sshd did not listen:\n{}",
            std::fs::read_to_string(srv.join("sshd.log"))?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The director's known_hosts, by address, as the example says.
    let scanned = director.exec(&["ssh-keyscan", "-t", "ed25519", &SERVER.to_string()])?;
    write(&etc.join("known_hosts"), &scanned, 0o644)?;

    let argv = example_argv(&etc, &run_dir)?;
    let r = check(&director, &argv)?;
    ensure!(r.outcome == Outcome::Ok && r.message == "HTTP OK: 200 via the forced command", "{r:?}");
    // One master for every later check.
    let masters = std::fs::read_dir(&run_dir)?.count();
    ensure!(masters == 1, "{masters} control sockets in {}", run_dir.display());
    ensure!(check(&director, &argv)?.outcome == Outcome::Ok);

    // The plugin's verdicts come back; a nologin-like refusal is flagged, not trusted.
    write(&plugin, "#!/bin/sh\necho 'HTTP CRITICAL: connection refused'\nexit 2\n", 0o755)?;
    let r = check(&director, &argv)?;
    ensure!(r.outcome == Outcome::Critical && r.message == "HTTP CRITICAL: connection refused", "{r:?}");
    write(&plugin, "#!/bin/sh\necho 'This account is currently not available.'\nexit 1\n", 0o755)?;
    let r = check(&director, &argv)?;
    ensure!(r.outcome == Outcome::Warning && r.doubt.is_some(), "{r:?}");

    // Failures of ssh itself say why (each with a fresh ControlPath: a master would
    // answer without reading the key or the host key again).
    let fresh = |name: &str| -> Result<Vec<String>> {
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        example_argv(&etc, &d)
    };
    // The old example's layout: the key in another user's 0700 directory. Root without
    // CAP_DAC_OVERRIDE (the unit's bounding set) cannot read it.
    let other = dir.join("other");
    std::fs::create_dir_all(&other)?;
    std::fs::copy(etc.join("id_ed25519"), other.join("id_ed25519"))?;
    std::os::unix::fs::chown(other.join("id_ed25519"), Some(65534), None)?;
    std::os::unix::fs::chown(&other, Some(65534), None)?;
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o700))?;
    let their_key: Vec<String> = fresh("run-other")?
        .into_iter()
        .map(|a| {
            a.replace(
                &etc.join("id_ed25519").display().to_string(),
                &other.join("id_ed25519").display().to_string(),
            )
        })
        .collect();
    let r = check(&director, &their_key)?;
    ensure!(r.outcome != Outcome::Ok && r.message.contains("Permission denied"), "{r:?}");
    // A changed host key.
    keygen(&dir.join("impostor"))?;
    let impostor = std::fs::read_to_string(dir.join("impostor.pub"))?;
    let key_type_and_key: Vec<&str> = impostor.split_whitespace().take(2).collect();
    write(&etc.join("known_hosts"), &format!("{SERVER} {}\n", key_type_and_key.join(" ")), 0o644)?;
    let r = check(&director, &fresh("run-impostor")?)?;
    ensure!(r.outcome != Outcome::Ok && r.message.contains("Host key verification failed"), "{r:?}");

    // Stop the master, as docs/operating.md says to after changing a server.
    let control = argv.iter().find(|a| a.starts_with("ControlPath=")).context("no ControlPath")?;
    let _ =
        director.exec(&["ssh", "-F", "/dev/null", "-o", control, "-O", "exit", &format!("root@{SERVER}")]);
    Ok(())
}
