//! Build orchestration, kept out of the library crates: `cargo xtask <command>`.

mod deb;
mod layers;

use std::process::{Command, ExitStatus};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Set up, build, test and benchmark the load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (apt packages, rust-src, bpf-linker). Idempotent.
    Setup,
    /// Build the daemon (with the XDP object embedded) in release mode.
    Build,
    /// Build the Debian package (target/deb/lb-daemon_VERSION_ARCH.deb): the binary, the
    /// systemd unit, /etc/lb-daemon/lb.yaml (a conffile), man pages, completions, docs.
    Deb {
        /// Where to put it.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// The daemon's import layers, formatting, clippy, then every test: unit, packet
    /// fixtures, end-to-end (needs root).
    Test,
    /// Only the import-layer check of `test` (see xtask/src/layers.rs).
    Layers,
    /// Benchmarks: ns per packet through BPF_PROG_TEST_RUN, as ratios to a floor program; end-to-end packet rates against the kernel's forwarding and nftables DNAT; health checks; the control plane.
    Bench {
        /// Only one part: `datapath` (ns per packet), `e2e` (packet rates), `control`.
        #[arg(value_parser = ["datapath", "e2e", "control"])]
        part: Option<String>,
    },
    /// The fuzzers at length: 10,000,000 mutated frames through the data path against its
    /// reference model, and 100,000 mutated configs through `check`.
    Fuzz {
        #[arg(long, default_value_t = 10_000_000)]
        frames: u64,
        #[arg(long, default_value_t = 100_000)]
        configs: u64,
        /// Start the generators here (a failure names the seed that finds it).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Build a client, a director and three real servers in network namespaces, forward
    /// real TCP connections through the XDP data path, print what happened, clean up
    /// (`--directors 2`: two directors behind an ECMP router).
    Lab {
        /// Leave the namespaces in place to explore (prints the commands to look around).
        #[arg(long)]
        keep: bool,
        /// 2: two directors behind a router that spreads flows over them by ECMP, learnt
        /// over BGP (BIRD), and one director's failure and return.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        directors: u8,
    },
}

/// Debian packages the build and the tests use: libLLVM 22 for bpf-linker, iproute2 and
/// ethtool for the namespace tests, util-linux's setpriv for running the daemon with only
/// the systemd unit's capabilities, systemd's systemd-analyze for verifying that unit,
/// ca-certificates for `https` checks that trust the system's roots, bird2 for the tests
/// that run `configs/bird-vip-routes.conf` and `configs/bird-router.conf` (two directors
/// behind ECMP), ssh and sshd for the test of `configs/agentless-ssh.yaml`'s checks,
/// nftables for the benchmark's comparison with the kernel's own NAT (and a test's
/// firewall rule), keepalived for the active/standby test, csync2 and openssl for the
/// test of `configs/csync2.cfg` between two directors, binutils (objdump, strip) for the
/// Debian package.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "ethtool",
    "procps",
    "util-linux",
    "systemd",
    "ca-certificates",
    "bird2",
    "openssh-client",
    "openssh-server",
    "nftables",
    "keepalived",
    "csync2",
    "openssl",
    "binutils",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const NIGHTLY: &str = "nightly";

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::Build => cargo(&["build", "--release"]),
        Cmd::Deb { out } => deb::build(out).map(drop),
        Cmd::Test => test(),
        Cmd::Layers => layers::check(&workspace()),
        Cmd::Bench { part } => {
            require_root("the benchmarks load BPF programs")?;
            let mut args = vec!["run", "--release", "--quiet", "-p", "lb-tests", "--bin", "lb-bench"];
            if let Some(part) = part.as_deref() {
                args.extend(["--", part]);
            }
            cargo(&args)
        }
        Cmd::Fuzz { frames, configs, seed } => fuzz(frames, configs, seed),
        Cmd::Lab { keep, directors } => {
            require_root("the lab creates network namespaces and loads XDP programs")?;
            cargo(&["build", "--release", "--quiet", "-p", "lb-daemon"])?;
            let directors = directors.to_string();
            let mut args = vec!["run", "--release", "--quiet", "-p", "lb-tests", "--bin", "lb-lab", "--"];
            args.extend(["--directors", &directors]);
            if keep {
                args.push("--keep");
            }
            cargo(&args)
        }
    }
}

fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status().with_context(|| format!("running {cmd:?}"))
}

fn check(cmd: &mut Command) -> Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    check(Command::new(env!("CARGO")).args(args))
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

fn apt_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

const BPFFS: &str = "/sys/fs/bpf";

fn setup() -> Result<()> {
    let mut changed = false;

    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !apt_installed(p)).collect();
    if missing.is_empty() {
        println!("setup: apt packages present ({})", APT_PACKAGES.join(", "));
    } else {
        require_root("setup installs apt packages")?;
        println!("setup: installing {}", missing.join(", "));
        check(Command::new("apt-get").args(["update", "-qq"]))?;
        check(
            Command::new("apt-get")
                .args(["install", "-y", "-qq"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        changed = true;
    }

    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        bail!(
            "no nightly toolchain: the eBPF crate needs the preinstalled nightly (rustup toolchain list shows {toolchains:?})"
        );
    }
    let components =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))
            .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: rust-src for {NIGHTLY} present");
    } else {
        println!("setup: adding rust-src to {NIGHTLY}");
        check(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
        changed = true;
    }

    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if linker.contains(BPF_LINKER_VERSION) {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
        check(
            Command::new(env!("CARGO"))
                .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--force"])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
        changed = true;
    }

    // The daemon pins its maps and XDP links here so that a restart adopts them. systemd
    // mounts it at boot; minimal VMs and containers may not.
    let fs_type = output(Command::new("stat").args(["-f", "-c", "%T", BPFFS])).unwrap_or_default();
    if fs_type.trim() == "bpf_fs" {
        println!("setup: bpf filesystem mounted at {BPFFS}");
    } else {
        require_root("setup mounts the bpf filesystem")?;
        println!("setup: mounting the bpf filesystem at {BPFFS}");
        check(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
        changed = true;
    }

    println!("setup: {}", if changed { "done" } else { "nothing to do, everything was already installed" });
    Ok(())
}

fn fuzz(frames: u64, configs: u64, seed: Option<u64>) -> Result<()> {
    require_root("the packet fuzz loads BPF programs into a network namespace")?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!("fuzz seed {seed} (repeat a run with --seed {seed})");
    let run = |env: (&str, u64), args: &[&str]| -> Result<()> {
        check(
            Command::new("cargo")
                .args(args)
                .env(env.0, env.1.to_string())
                .env("LB_FUZZ_SEED", seed.to_string()),
        )
    };
    run(
        ("LB_FUZZ_FRAMES", frames),
        &[
            "test",
            "--release",
            "-p",
            "lb-tests",
            "--test",
            "xdp_fixtures",
            "--",
            "--exact",
            "mutated_frames_do_what_the_model_of_the_data_path_says",
            "--nocapture",
        ],
    )?;
    run(
        ("LB_FUZZ_CONFIGS", configs),
        &["test", "--release", "-p", "lb-daemon", "--test", "config_fuzz", "--", "--nocapture"],
    )
}

fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn test() -> Result<()> {
    require_root("the packet fixtures load BPF programs and the end-to-end tests create namespaces")?;
    layers::check(&workspace())?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    // The end-to-end tests run the daemon binary itself; the package test installs the
    // package.
    cargo(&["build", "-p", "lb-daemon"])?;
    let deb = deb::build(None)?;
    check(Command::new(env!("CARGO")).args(["test", "--workspace"]).env("LB_DEB", &deb))
}
