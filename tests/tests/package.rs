//! The Debian package (`cargo xtask deb`, which `cargo xtask test` builds first and names
//! in LB_DEB): installed into a scratch root with dpkg, it holds what an operator needs,
//! its binary validates its own example, its unit verifies, its maintainer scripts enable
//! without starting, an upgrade keeps the operator's edits, and a purge leaves nothing.
//! Needs root (dpkg, a mount namespace).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context as _, Result, bail, ensure};

/// The package under test: LB_DEB, else the newest one `cargo xtask deb` left.
fn package() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LB_DEB") {
        return Ok(PathBuf::from(p));
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/deb");
    let mut debs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)
        .with_context(|| format!("no {} (run `cargo xtask deb`)", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    debs.sort();
    debs.pop().map(|(_, p)| p).context("no .deb in target/deb (run `cargo xtask deb`)")
}

/// A dpkg database of its own under a temporary directory, removed on drop.
struct ScratchRoot(PathBuf);

impl ScratchRoot {
    fn new() -> Result<Self> {
        let root = std::env::temp_dir().join(lb_tests::unique_name("lbdeb"));
        for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        for file in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
            std::fs::write(root.join(file), "")?;
        }
        Ok(ScratchRoot(root))
    }

    /// `dpkg --root` with the maintainer scripts run outside a chroot (the root has no
    /// shell of its own) and DPKG_ROOT set, which the scripts honour; the root has no
    /// libc6 package, hence --force-depends.
    fn dpkg(&self, args: &[&str]) -> Result<Output> {
        let out = Command::new("dpkg")
            .arg(format!("--root={}", self.0.display()))
            .args(["--force-script-chrootless", "--force-depends", "--log=/dev/null"])
            .args(args)
            .output()
            .context("running dpkg")?;
        Ok(out)
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.0.join(inside.trim_start_matches('/'))
    }
}

impl Drop for ScratchRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_package_installs_verifies_upgrades_and_purges_in_a_scratch_root() -> Result<()> {
    let deb = package()?;
    let deb = std::fs::canonicalize(&deb).with_context(|| format!("{}", deb.display()))?;
    let deb = deb.to_str().context("the package's path")?;
    let root = ScratchRoot::new()?;

    let out = root.dpkg(&["-i", deb])?;
    ensure!(out.status.success(), "dpkg -i: {}", text(&out));
    ensure!(text(&out).contains("enabled at boot, not started"), "{}", text(&out));
    ensure!(
        root.path("etc/systemd/system/multi-user.target.wants/lb-daemon.service").is_symlink(),
        "postinst did not enable the unit"
    );

    // The file list: what an operator reaches for.
    let out = root.dpkg(&["-L", "lb-daemon"])?;
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    for file in [
        "/usr/sbin/lb-daemon",
        "/usr/lib/systemd/system/lb-daemon.service",
        "/etc/lb-daemon/lb.yaml",
        "/usr/share/man/man8/lb-daemon.8.gz",
        "/usr/share/man/man8/lb-daemon-drain.8.gz",
        "/usr/share/man/man8/lb-daemon-wait-drained.8.gz",
        "/usr/share/man/man5/lb-daemon.yaml.5.gz",
        "/usr/share/bash-completion/completions/lb-daemon",
        "/usr/share/zsh/vendor-completions/_lb-daemon",
        "/usr/share/fish/vendor_completions.d/lb-daemon.fish",
        "/usr/share/doc/lb-daemon/README.md",
        "/usr/share/doc/lb-daemon/CHANGELOG.md",
        "/usr/share/doc/lb-daemon/LICENSE-MIT",
        "/usr/share/doc/lb-daemon/LICENSE-APACHE",
        "/usr/share/doc/lb-daemon/copyright",
        "/usr/share/doc/lb-daemon/operating.md",
        "/usr/share/doc/lb-daemon/real-servers.md",
        "/usr/share/doc/lb-daemon/status.schema.json",
        "/usr/share/doc/lb-daemon/examples/rolling-upgrade.sh",
        "/usr/share/doc/lb-daemon/examples/keepalived-lb.conf",
    ] {
        ensure!(listed.lines().any(|l| l == file), "{file} is not in the package:\n{listed}");
        ensure!(root.path(file).is_file(), "{file} was not installed");
    }
    let unit = std::fs::read_to_string(root.path("usr/lib/systemd/system/lb-daemon.service"))?;
    // What the unit points at is installed (systemd-analyze below checks the man pages).
    let docs = unit.lines().find_map(|l| l.strip_prefix("Documentation=")).context("no Documentation=")?;
    for file in docs.split_whitespace().filter_map(|d| d.strip_prefix("file://")) {
        ensure!(root.path(file).is_file(), "the unit's Documentation= names {file}, which is not installed");
    }
    let conffiles = Command::new("dpkg-query")
        .arg(format!("--admindir={}", root.path("var/lib/dpkg").display()))
        .args(["-W", "-f=${Conffiles}", "lb-daemon"])
        .output()?;
    ensure!(text(&conffiles).contains("/etc/lb-daemon/lb.yaml"), "not a conffile: {}", text(&conffiles));
    let man = std::fs::read(root.path("usr/share/man/man5/lb-daemon.yaml.5.gz"))?;
    ensure!(man.starts_with(&[0x1f, 0x8b]), "the man page is not gzipped");

    // The installed binary validates the installed example, and says run refuses it.
    let binary = root.path("usr/sbin/lb-daemon");
    let example = root.path("etc/lb-daemon/lb.yaml");
    let out = Command::new(&binary).arg("check").arg("-c").arg(&example).output()?;
    ensure!(out.status.success() && text(&out).contains(": ok ("), "check: {}", text(&out));
    ensure!(text(&out).contains("shipped example"), "{}", text(&out));
    // In a network namespace of its own: a run that went ahead would find no interface.
    let out =
        Command::new("unshare").arg("--net").arg(&binary).arg("run").arg("-c").arg(&example).output()?;
    ensure!(
        !out.status.success() && text(&out).contains("is the shipped example, unchanged"),
        "run: {}",
        text(&out)
    );
    let out = Command::new(&binary).args(["completions", "bash"]).output()?;
    ensure!(out.status.success() && text(&out).contains("wait-drained"), "{}", text(&out));

    // The installed unit verifies, its ExecStart= binaries and Documentation= man pages
    // being the installed ones.
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /usr/sbin && mount --bind {} /usr/share/man && systemd-analyze verify {}",
            root.path("usr/sbin").display(),
            root.path("usr/share/man").display(),
            root.path("usr/lib/systemd/system/lb-daemon.service").display()
        ))
        .output()?;
    ensure!(out.status.success() && out.stderr.is_empty(), "systemd-analyze verify: {}", text(&out));

    // An upgrade (the same package again) keeps the operator's edit of the conffile and
    // does not repeat the first-install message.
    let edited =
        std::fs::read_to_string(&example)?.replace("interfaces: [eth0, eth1]", "interfaces: [bond0]");
    std::fs::write(&example, &edited)?;
    let out = root.dpkg(&["-i", deb])?;
    ensure!(out.status.success(), "reinstall: {}", text(&out));
    ensure!(!text(&out).contains("enabled at boot"), "{}", text(&out));
    ensure!(std::fs::read_to_string(&example)? == edited, "the upgrade replaced the edited lb.yaml");
    let out = Command::new(&binary).arg("check").arg("-c").arg(&example).output()?;
    ensure!(out.status.success() && !text(&out).contains("shipped example"), "{}", text(&out));

    // Purge: nothing of it is left, not even its state or enablement.
    std::fs::create_dir_all(root.path("var/lib/lb-daemon"))?;
    std::fs::write(root.path("var/lib/lb-daemon/overrides.json"), "{}")?;
    let out = root.dpkg(&["--purge", "lb-daemon"])?;
    ensure!(out.status.success(), "purge: {}", text(&out));
    for gone in [
        "usr/sbin/lb-daemon",
        "etc/lb-daemon/lb.yaml",
        "var/lib/lb-daemon",
        "etc/systemd/system/multi-user.target.wants/lb-daemon.service",
    ] {
        if root.path(gone).exists() || root.path(gone).is_symlink() {
            bail!("{gone} is left after the purge");
        }
    }
    Ok(())
}
