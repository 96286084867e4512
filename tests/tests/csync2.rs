//! `configs/csync2.cfg` and `configs/csync2-lb-action.sh` between two directors in
//! namespaces: a file edited on lb1 and pushed with `csync2 -x` reaches lb2, whose
//! running `lb-daemon` reloads it (its status then shows the file's digest); a file
//! `lb-daemon check` refuses reaches lb2 too but is not loaded. Needs root and csync2.
//!
//! Each namespace resolves `lb1` and `lb2` through `/etc/netns/NAME/hosts` (what `ip
//! netns exec` mounts over `/etc/hosts`), and each csync2 reads its own system directory
//! (`CSYNC2_SYSTEM_DIR`): the shipped file, with only its paths moved under this test's
//! directory (the two "directors" share one filesystem).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use lb_tests::NetNs;
use lb_tests::daemon::Daemon;

/// Files of this test: removed on drop, with the per-namespace hosts files and what the
/// daemon pinned.
struct Scratch {
    dir: PathBuf,
    netns_etc: Vec<PathBuf>,
    server: Option<Child>,
    bpf_dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for d in &self.netns_etc {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Err(e) = lb_daemon::dataplane::Dataplane::remove_pins(&self.bpf_dir) {
            eprintln!("cleanup: {}", lb_daemon::error_chain(&e));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const BASE: &str = "services:\n  - name: web\n    match: { vip: 192.0.2.10, port: 80 }\n    backends:\n      \
                    - { address: 198.51.100.11 }\n";

fn director_section(dir: &Path) -> String {
    format!(
        "director:\n  interfaces: [core0]\n  xdp_mode: generic\n  metrics_listen: 127.0.0.1:9740\n  \
         control_socket: {}\n  bpf_dir: /sys/fs/bpf/{}\n  connection_table_size: 4096\n",
        dir.join("control.sock").display(),
        dir.file_name().unwrap_or_default().to_string_lossy()
    )
}

/// `csync2 ARGS` as host `name` in `ns`, with its system directory and the action's
/// environment.
fn csync2(ns: &NetNs, sys: &Path, env: &[(&str, String)], args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns.name(), "csync2"]).args(args).env("CSYNC2_SYSTEM_DIR", sys);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Waits (bounded) until the daemon's reload counters reach `ok` successes.
fn wait_reloads(lb2: &NetNs, daemon: &Daemon, ok: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = daemon.metrics(lb2)?;
        if m.value("lb_config_reloads_total{result=\"success\"}")? >= ok {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "no reload:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_edit_pushed_with_csync2_is_checked_and_reloaded_on_the_other_director() -> Result<()> {
    let (lb1, lb2) = (NetNs::new("cs1")?, NetNs::new("cs2")?);
    lb_tests::veth_named(&lb1, &lb2, "core0", "core0")?;
    for (ns, addr) in [(&lb1, "198.51.100.2/24"), (&lb2, "198.51.100.3/24")] {
        ns.ip(&["addr", "add", addr, "dev", "core0"])?;
    }
    let dir = std::env::temp_dir().join(lb_tests::unique_name("lbcs"));
    let bpf_dir = PathBuf::from("/sys/fs/bpf").join(dir.file_name().unwrap_or_default());
    let mut scratch = Scratch { dir: dir.clone(), netns_etc: Vec::new(), server: None, bpf_dir };
    for ns in [&lb1, &lb2] {
        let etc = PathBuf::from("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&etc)?;
        scratch.netns_etc.push(etc.clone());
        std::fs::write(etc.join("hosts"), "127.0.0.1 localhost\n198.51.100.2 lb1\n198.51.100.3 lb2\n")?;
    }
    let repo = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let (sys1, sys2, conf1, conf2) =
        (dir.join("sys1"), dir.join("sys2"), dir.join("conf1"), dir.join("conf2"));
    for d in [&sys1, &sys2, &conf1, &conf2, &dir.join("db1"), &dir.join("db2"), &dir.join("backup")] {
        std::fs::create_dir_all(d)?;
    }
    let key = dir.join("key_lb");
    lb_tests::run("csync2", &["-k", &key.to_string_lossy()]).context("csync2 (apt package csync2)")?;
    // One key and certificate for both: csync2's TLS client sends its certificate only if
    // the server's CA list names its issuer, so two self-signed ones never meet.
    lb_tests::run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=lb-directors",
            "-keyout",
            &sys1.join("csync2_ssl_key.pem").to_string_lossy(),
            "-out",
            &sys1.join("csync2_ssl_cert.pem").to_string_lossy(),
        ],
    )?;
    for f in ["csync2_ssl_key.pem", "csync2_ssl_cert.pem"] {
        std::fs::copy(sys1.join(f), sys2.join(f))?;
    }
    let shipped = std::fs::read_to_string(repo.join("configs/csync2.cfg"))?;
    let cfg = shipped
        .replace(
            "on *: /etc/lb-daemon;",
            &format!("on lb1: {};\n    on lb2: {};", conf1.display(), conf2.display()),
        )
        .replace("/etc/csync2.key_lb", &key.to_string_lossy())
        .replace(
            "/usr/local/lib/lb-daemon/csync2-lb-action.sh",
            &repo.join("configs/csync2-lb-action.sh").to_string_lossy(),
        )
        .replace("/var/log/csync2-lb-action.log", &dir.join("action.log").to_string_lossy())
        .replace("/var/backups/csync2", &dir.join("backup").to_string_lossy());
    ensure!(
        cfg != shipped && !cfg.contains("/etc/lb-daemon;"),
        "the shipped csync2.cfg changed shape:\n{cfg}"
    );
    std::fs::write(sys1.join("csync2.cfg"), &cfg)?;
    std::fs::write(sys2.join("csync2.cfg"), &cfg)?;

    // Both directors start from the same file; lb2 runs the daemon.
    let base = format!("{}{BASE}", director_section(&dir));
    std::fs::write(conf1.join("lb.yaml"), &base)?;
    std::fs::write(conf2.join("lb.yaml"), &base)?;
    let mut daemon = Daemon::start(
        &lb2,
        &conf2.join("lb.yaml"),
        &dir.join("control.sock"),
        "127.0.0.1:9740".parse()?,
        &dir.join("lb-daemon.log"),
    )?;
    let binary = lb_tests::daemon::binary()?.to_string_lossy().into_owned();
    let action_env = |conf: &Path, reload: String| {
        vec![
            ("LB_CONFIG", conf.join("lb.yaml").to_string_lossy().into_owned()),
            ("LB_DAEMON", binary.clone()),
            ("LB_RELOAD", reload),
        ]
    };
    // lb1 has no daemon in this test: its reload leaves a mark instead.
    let lb1_env = action_env(&conf1, format!("touch {}", dir.join("lb1-reloaded").display()));
    let lb2_env = action_env(&conf2, format!("kill -HUP {}", daemon.pid()?));
    let server =
        csync2(&lb2, &sys2, &lb2_env, &["-ii", "-N", "lb2", "-D", &dir.join("db2").to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("csync2-lb2.log"))?)
            .spawn()
            .context("csync2 -ii")?;
    scratch.server = Some(server);
    let push = || -> Result<String> {
        // The server may still be starting: csync2 leaves a failed host dirty, so again.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = csync2(
                &lb1,
                &sys1,
                &lb1_env,
                &["-x", "-v", "-N", "lb1", "-D", &dir.join("db1").to_string_lossy()],
            )
            .output()?;
            let text =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            if text.contains("Finished with 0 errors") {
                return Ok(text);
            }
            ensure!(Instant::now() < deadline, "csync2 -x on lb1 failed:\n{text}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    push()?;
    let reloads = |what| daemon.metrics(&lb2).and_then(|m| m.value(what));
    let ok_before = reloads("lb_config_reloads_total{result=\"success\"}")?;

    // An edit on lb1: a second service. Pushed, checked and loaded on lb2.
    let edited = format!(
        "{base}  - name: api\n    match: {{ vip: 192.0.2.11, port: 443 }}\n    backends:\n      - {{ address: 198.51.100.12 }}\n"
    );
    std::fs::write(conf1.join("lb.yaml"), &edited)?;
    let out = push()?;
    ensure!(std::fs::read_to_string(conf2.join("lb.yaml"))? == edited, "lb2's file is not lb1's:\n{out}");
    wait_reloads(&lb2, &daemon, ok_before + 1.0)?;
    let digest = lb_tests::run("sha256sum", &[&conf1.join("lb.yaml").to_string_lossy()])?;
    let digest = digest.split_whitespace().next().unwrap_or_default().to_owned();
    let status = daemon.status()?;
    ensure!(status.contains(&format!("config sha256 {digest}")) && status.contains("(api)"), "{status}");
    ensure!(dir.join("lb1-reloaded").exists(), "the action did not run on lb1 (do-local)");

    // A file the check refuses: it reaches lb2, but nothing is reloaded there.
    let failures = reloads("lb_config_reloads_total{result=\"failure\"}")?;
    let ok = reloads("lb_config_reloads_total{result=\"success\"}")?;
    std::fs::write(conf1.join("lb.yaml"), edited.replace("port: 443", "port: 70000"))?;
    push()?;
    ensure!(std::fs::read_to_string(conf2.join("lb.yaml"))?.contains("70000"));
    let log = std::fs::read_to_string(dir.join("action.log"))?;
    ensure!(log.contains("refused by lb-daemon check; not reloaded"), "{log}");
    std::thread::sleep(Duration::from_millis(500));
    ensure!(reloads("lb_config_reloads_total{result=\"failure\"}")? == failures, "a refused file was loaded");
    ensure!(reloads("lb_config_reloads_total{result=\"success\"}")? == ok);
    ensure!(daemon.status()?.contains(&format!("config sha256 {digest}")), "{}", daemon.status()?);
    daemon.kill9()?;
    drop(scratch);
    Ok(())
}
