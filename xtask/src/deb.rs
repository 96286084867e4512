//! `cargo xtask deb`: a Debian package of the daemon, assembled here and built with
//! `dpkg-deb` (no debhelper, no cargo-deb: every file and script it holds is listed in
//! this module). The package test (`tests/tests/package.rs`) installs what this builds.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cargo, check, workspace};

const PACKAGE: &str = "lb-daemon";
/// The Debian revision of this packaging.
const REVISION: &str = "1";

/// Documents installed under /usr/share/doc/lb-daemon, from the repository root.
const DOCS: &[&str] = &["README.md", "CHANGELOG.md", "LICENSE-MIT", "LICENSE-APACHE"];
/// Files of `configs/` installed as examples (the unit and lb.yaml go elsewhere).
const EXAMPLES: &[&str] = &[
    "lab.yaml",
    "agentless-ssh.yaml",
    "prometheus.yml",
    "lb-alerts.yml",
    "grafana-dashboard.json",
    "bird-vip-routes.conf",
    "bird-router.conf",
    "frr-router.conf",
    "keepalived-lb.conf",
    "csync2.cfg",
    "csync2-lb-action.sh",
    "rolling-upgrade.sh",
];

/// Builds the package into `out` (default: target/deb); returns its path.
pub fn build(out: Option<PathBuf>) -> Result<PathBuf> {
    let root = workspace();
    cargo(&["build", "--release", "-p", "lb-daemon"])?;
    let binary = root.join("target/release/lb-daemon");
    let version = package_version(&root)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let out = out.unwrap_or_else(|| root.join("target/deb"));
    let stage = out.join(format!("{PACKAGE}_{version}_{arch}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }

    let write = |to: &str, text: &[u8], mode: u32| -> Result<()> {
        let dest = stage.join(to);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&dest, text).with_context(|| format!("writing {}", dest.display()))?;
        set_mode(&dest, mode)
    };
    let put = |from: &Path, to: &str, mode: u32| -> Result<()> {
        write(to, &std::fs::read(from).with_context(|| format!("reading {}", from.display()))?, mode)
    };
    let doc = format!("usr/share/doc/{PACKAGE}");

    put(&binary, "usr/sbin/lb-daemon", 0o755)?;
    check(Command::new("strip").arg("--strip-debug").arg(stage.join("usr/sbin/lb-daemon")))?;
    put(&root.join("configs/lb-daemon.service"), "usr/lib/systemd/system/lb-daemon.service", 0o644)?;
    put(&root.join("configs/lb.example.yaml"), "etc/lb-daemon/lb.yaml", 0o644)?;

    // Man pages, from the binary's own command line, compressed as policy wants.
    let man = out.join("man");
    if man.exists() {
        std::fs::remove_dir_all(&man)?;
    }
    check(Command::new(&binary).arg("man-pages").arg(&man))?;
    for entry in std::fs::read_dir(&man)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).context("a man page's name")?.to_owned();
        let section = name.rsplit('.').next().unwrap_or("8");
        write(&format!("usr/share/man/man{section}/{name}.gz"), &gzip(&std::fs::read(&path)?)?, 0o644)?;
    }

    // Completions, where each shell's packaged completions live.
    for (shell, to) in [
        ("bash", "usr/share/bash-completion/completions/lb-daemon"),
        ("zsh", "usr/share/zsh/vendor-completions/_lb-daemon"),
        ("fish", "usr/share/fish/vendor_completions.d/lb-daemon.fish"),
    ] {
        let script = Command::new(&binary).args(["completions", shell]).output()?;
        if !script.status.success() || script.stdout.is_empty() {
            bail!("lb-daemon completions {shell} failed: {}", String::from_utf8_lossy(&script.stderr));
        }
        write(to, &script.stdout, 0o644)?;
    }

    for name in DOCS {
        put(&root.join(name), &format!("{doc}/{name}"), 0o644)?;
    }
    for entry in std::fs::read_dir(root.join("docs")).context("reading docs/")? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).context("a doc's name")?.to_owned();
        put(&path, &format!("{doc}/{name}"), 0o644)?;
    }
    for name in EXAMPLES {
        let mode = if name.ends_with(".sh") { 0o755 } else { 0o644 };
        put(&root.join("configs").join(name), &format!("{doc}/examples/{name}"), mode)?;
    }
    write(&format!("{doc}/copyright"), copyright().as_bytes(), 0o644)?;
    write(&format!("{doc}/changelog.Debian.gz"), &gzip(debian_changelog(&version).as_bytes())?, 0o644)?;

    // What dpkg reads.
    write("DEBIAN/conffiles", b"/etc/lb-daemon/lb.yaml\n", 0o644)?;
    write("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    write("DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    write("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;
    write("DEBIAN/md5sums", md5sums(&stage)?.as_bytes(), 0o644)?;
    let glibc = glibc_needed(&stage.join("usr/sbin/lb-daemon"))?;
    let size_kib = installed_size_kib(&stage)?;
    write("DEBIAN/control", control(&version, &arch, &glibc, size_kib).as_bytes(), 0o644)?;

    let deb = out.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    check(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&stage).arg(&deb))?;
    println!("deb: {}", deb.display());
    Ok(deb)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    // -n: no name or time stamp in the header, so that a rebuild gives the same bytes.
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running gzip")?;
    let mut stdin = child.stdin.take().context("gzip's stdin")?;
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer.join().map_err(|_| anyhow::anyhow!("writing to gzip panicked"))??;
    if !out.status.success() {
        bail!("gzip failed");
    }
    Ok(out.stdout)
}

/// The workspace's version, with this packaging's revision.
fn package_version(root: &Path) -> Result<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .context("no version = \"...\" in the workspace's Cargo.toml")?;
    Ok(format!("{version}-{REVISION}"))
}

/// The newest glibc symbol version the binary needs: its `Depends: libc6 (>= ...)`.
fn glibc_needed(binary: &Path) -> Result<String> {
    let symbols = output(Command::new("objdump").arg("-T").arg(binary))?;
    let mut newest: Vec<u32> = vec![2, 17];
    for word in symbols.split_whitespace() {
        let Some(v) = word.trim_start_matches('(').trim_end_matches(')').strip_prefix("GLIBC_") else {
            continue;
        };
        let parsed: Option<Vec<u32>> = v.split('.').map(|p| p.parse().ok()).collect();
        if let Some(parsed) = parsed
            && parsed > newest
        {
            newest = parsed;
        }
    }
    Ok(newest.iter().map(u32::to_string).collect::<Vec<_>>().join("."))
}

/// Every file staged for the package (relative paths, sorted), the control area aside.
fn staged_files(stage: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut dirs = vec![stage.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name() == "DEBIAN" {
                continue;
            }
            if entry.metadata()?.is_dir() {
                dirs.push(entry.path());
            } else {
                files.push(entry.path().strip_prefix(stage)?.to_owned());
            }
        }
    }
    files.sort();
    Ok(files)
}

fn installed_size_kib(stage: &Path) -> Result<u64> {
    let mut total = 0;
    for file in staged_files(stage)? {
        total += std::fs::metadata(stage.join(file))?.len().div_ceil(1024);
    }
    Ok(total)
}

fn md5sums(stage: &Path) -> Result<String> {
    // Conffiles are not listed: dpkg keeps their sums itself.
    let files: Vec<PathBuf> = staged_files(stage)?.into_iter().filter(|f| !f.starts_with("etc")).collect();
    let sums = output(Command::new("md5sum").args(&files).current_dir(stage))?;
    Ok(format!("{sums}\n"))
}

fn control(version: &str, arch: &str, glibc: &str, size_kib: u64) -> String {
    let mut c = String::new();
    let _ = write!(
        c,
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: lb developers <lb-daemon@localhost>\n\
         Installed-Size: {size_kib}\n\
         Depends: libc6 (>= {glibc})\n\
         Suggests: bird2 | frr, keepalived, csync2, prometheus\n\
         Section: net\n\
         Priority: optional\n\
         Description: XDP layer-4 load balancer (IPVS and keepalived replacement)\n \
         lb-daemon balances TCP and UDP services in the kernel's XDP hook: Maglev\n \
         source hashing, a connection table that follows TCP, direct routing,\n \
         IP-in-IP tunnels and NAT. It health-checks real servers (tcp, http(s),\n \
         Nagios plugins, icmp; rise/fall, flap control), reloads its YAML without\n \
         dropping connections, announces VIPs, and exports Prometheus metrics.\n \
         .\n \
         The package is enabled but not started on first install: edit\n \
         /etc/lb-daemon/lb.yaml for the host, then start lb-daemon.\n"
    );
    c
}

fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
     Upstream-Name: lb-daemon\n\
     \n\
     Files: *\n\
     Copyright: the lb developers\n\
     License: MIT or Apache-2.0\n\
     \x20The full texts are in /usr/share/doc/lb-daemon/LICENSE-MIT and\n\
     \x20/usr/share/doc/lb-daemon/LICENSE-APACHE; Apache-2.0 also in\n\
     \x20/usr/share/common-licenses/Apache-2.0.\n"
        .to_owned()
}

fn debian_changelog(version: &str) -> String {
    format!(
        "{PACKAGE} ({version}) unstable; urgency=medium\n\n  \
         * Package built by cargo xtask deb; the upstream changes are in\n    \
         /usr/share/doc/lb-daemon/CHANGELOG.md.\n\n \
         -- lb developers <lb-daemon@localhost>  Tue, 01 Dec 2026 00:00:00 +0000\n"
    )
}

/// Enabled at boot on first install, but not started: the shipped lb.yaml is an example
/// (`lb-daemon run` refuses it unchanged). An upgrade restarts a running daemon, which
/// adopts the running data path: no connection is lost.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if [ -d /run/systemd/system ] && [ -z "${DPKG_ROOT:-}" ]; then
        systemctl daemon-reload >/dev/null || true
    fi
    if [ -z "$2" ]; then
        if [ -x /usr/bin/deb-systemd-helper ]; then
            deb-systemd-helper enable lb-daemon.service >/dev/null || true
        fi
        echo "lb-daemon: enabled at boot, not started. Edit /etc/lb-daemon/lb.yaml for this host"
        echo "  (the shipped example is refused), 'lb-daemon check', then 'systemctl start lb-daemon'."
    elif [ -d /run/systemd/system ] && [ -z "${DPKG_ROOT:-}" ]; then
        # A restart adopts the pinned data path: connections go on.
        systemctl try-restart lb-daemon.service || true
    fi
fi
exit 0
"#;

/// Removal stops the daemon and takes the XDP program off the interfaces: without the
/// package, nothing would manage it. An upgrade leaves everything running.
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -z "${DPKG_ROOT:-}" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop lb-daemon.service || true
    fi
    if [ -f /etc/lb-daemon/lb.yaml ]; then
        /usr/sbin/lb-daemon detach -c /etc/lb-daemon/lb.yaml || true
    fi
fi
exit 0
"#;

/// Purge also forgets the runtime overrides and the unit's enablement.
const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -rf "${DPKG_ROOT:-}/var/lib/lb-daemon"
    if [ -x /usr/bin/deb-systemd-helper ]; then
        deb-systemd-helper purge lb-daemon.service >/dev/null || true
    fi
fi
if [ -d /run/systemd/system ] && [ -z "${DPKG_ROOT:-}" ]; then
    systemctl daemon-reload >/dev/null || true
fi
exit 0
"#;
