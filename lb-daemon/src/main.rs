//! `lb-daemon`: the load balancer daemon and its operator commands.

mod manual;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser, Subcommand};
use lb_daemon::control::{self, OnExit};
use lb_daemon::dataplane::{Dataplane, LoadOptions};

const DEFAULT_CONFIG: &str = "/etc/lb-daemon/lb.yaml";

#[derive(Parser)]
#[command(version, about = "XDP layer-4 load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run: load or adopt the data path, fill it from the config, attach, serve metrics.
    /// SIGHUP reloads the file; SIGTERM stops the daemon and leaves traffic flowing.
    Run {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// On SIGTERM/SIGINT, also remove the XDP program and the pinned maps (the
        /// connection table is lost). Without it, the data path keeps forwarding.
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Validate a configuration file without touching the system (like `nginx -t`).
    Check {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print the running daemon's services and backends, in the spirit of `ipvsadm -L -n`.
    Status {
        #[command(flatten)]
        daemon: DaemonSocket,
        /// One JSON object instead of the table (schema: `--json-schema`).
        #[arg(long, conflicts_with = "json_schema")]
        json: bool,
        /// Print the JSON Schema of `--json`'s output and exit (no daemon asked).
        #[arg(long)]
        json_schema: bool,
    },
    /// Stop sending new flows to BACKEND (established ones stay): a runtime override on
    /// top of the file, kept across reloads and restarts until `enable`.
    Drain {
        #[command(flatten)]
        target: BackendTarget,
    },
    /// Take BACKEND out entirely: its established flows move to other backends.
    Disable {
        #[command(flatten)]
        target: BackendTarget,
    },
    /// Remove every runtime override of BACKEND: back to what the file says.
    Enable {
        #[command(flatten)]
        target: BackendTarget,
    },
    /// Set BACKEND's weight at run time (0-65535), in place of the file's.
    Weight {
        #[command(flatten)]
        target: BackendTarget,
        weight: u32,
    },
    /// Runtime overrides: `lb-daemon overrides clear` removes them all.
    Overrides {
        #[command(subcommand)]
        command: OverridesCmd,
    },
    /// Wait until BACKEND has no established connections left (exit status 1 when
    /// TIMEOUT passes first).
    WaitDrained {
        #[command(flatten)]
        target: BackendTarget,
        /// How long to wait at most, e.g. 90s, 10m.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Also wait for InActConn: closing TCP connections and UDP flows.
        #[arg(long)]
        inactive: bool,
    },
    /// Remove the XDP program and pinned maps a stopped daemon left forwarding.
    Detach {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// On a real server: strip the outer header of packets tunnelled to it (IPv4/IPv6 in
    /// IPv4/IPv6), for kernels without the ipip/ip6_tunnel modules. No config file.
    Decap {
        #[command(subcommand)]
        command: DecapCmd,
        /// Where the program's link and maps are pinned (a bpf filesystem).
        #[arg(long, global = true, default_value = lb_daemon::dataplane::decap::DEFAULT_DECAP_DIR)]
        bpf_dir: PathBuf,
    },
    /// Probe the kernel for every feature the data path needs (naming a missing one and
    /// the Linux version that brought it), then load the embedded XDP object (verifier
    /// included), report, unload. Attaches nothing: a pre-deployment check for a kernel.
    Verify {
        /// Maglev ring slots to size the ring map with.
        #[arg(long, default_value_t = LoadOptions::default().ring_slots)]
        ring_slots: u32,
        /// Connection-table entries.
        #[arg(long, default_value_t = LoadOptions::default().flow_entries)]
        flow_entries: u32,
    },
    /// Print the connection log (director.connection_log): one line per logged new
    /// connection, with its service, client, destination and real server.
    Events {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Read this file instead of the one the config names.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Keep printing new connections as they are logged (across rotations).
        #[arg(short, long)]
        follow: bool,
        /// Only this service's connections.
        #[arg(long)]
        service: Option<String>,
        /// The JSON lines as written, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (lb-daemon(8), one per command, lb-daemon.yaml(5)) into DIR:
    /// for packaging.
    #[command(hide = true)]
    ManPages { dir: PathBuf },
}

/// Which running daemon to ask.
#[derive(clap::Args)]
struct DaemonSocket {
    /// The config whose `director.control_socket` to ask.
    #[arg(short, long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Ask this control socket instead of the one the config names.
    #[arg(long)]
    socket: Option<PathBuf>,
}

/// One backend of one service (or of every service that has it).
#[derive(clap::Args)]
struct BackendTarget {
    /// A service's name, or `all`: every service that has the backend.
    service: String,
    /// The backend's address.
    backend: std::net::IpAddr,
    #[command(flatten)]
    daemon: DaemonSocket,
}

impl BackendTarget {
    fn request(&self, verb: &str) -> String {
        format!("{verb} {} {}", self.service, self.backend)
    }
}

#[derive(Subcommand)]
enum OverridesCmd {
    /// Remove every runtime override: every backend is as the file says.
    Clear {
        #[command(flatten)]
        daemon: DaemonSocket,
    },
}

#[derive(Subcommand)]
enum DecapCmd {
    /// Attach to IFACE (again: refresh the addresses it decapsulates for).
    Attach {
        iface: String,
        /// `native` (in the driver) or `generic` (any interface, slower).
        #[arg(long, default_value = "native", value_parser = ["native", "generic"])]
        xdp_mode: String,
        /// Also decapsulate packets tunnelled to this address (repeatable); the
        /// interface's own addresses always count.
        #[arg(long = "local")]
        local: Vec<std::net::IpAddr>,
    },
    /// Detach from IFACE (the maps go with the last interface).
    Detach { iface: String },
    /// Interfaces, local addresses and counters.
    Status,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // journald stamps every line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting tokio")
}

fn config_path(path: PathBuf) -> Result<PathBuf> {
    // The daemon re-reads the file on SIGHUP, from whatever directory it runs in.
    std::path::absolute(&path).with_context(|| format!("resolving {}", path.display()))
}

impl DaemonSocket {
    fn socket(&self) -> PathBuf {
        if let Some(s) = &self.socket {
            return s.clone();
        }
        match lb_daemon::config::Config::load(&self.config) {
            Ok(c) => c.director.control_socket,
            // The running daemon still serves its old config: ask it anyway.
            Err(e) => {
                let fallback = PathBuf::from(lb_daemon::model::DEFAULT_CONTROL_SOCKET);
                eprintln!(
                    "lb-daemon: {}; asking {} (use --socket to choose)",
                    lb_daemon::error_chain(&e),
                    fallback.display()
                );
                fallback
            }
        }
    }
}

/// Sends one request to the running daemon and prints its answer.
fn ask(daemon: &DaemonSocket, request: &str) -> Result<()> {
    print!("{}", runtime()?.block_on(control::command(&daemon.socket(), request))?);
    Ok(())
}

fn main() -> ExitCode {
    init_logging();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-daemon: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Run { config, detach_on_exit } => {
            let config = config_path(config)?;
            let on_exit = if detach_on_exit { OnExit::Detach } else { OnExit::KeepForwarding };
            runtime()?.block_on(control::run(&config, on_exit))?;
        }
        Cmd::Check { config } => {
            let c = control::check(&config)?;
            if c.is_shipped_example() {
                eprintln!(
                    "lb-daemon: note: {} is the shipped example, unchanged; `lb-daemon run` refuses it until it is edited for this host",
                    config.display()
                );
            }
            let backends: usize = c.services.iter().map(|s| s.backends.len()).sum();
            println!(
                "{}: ok ({} services, {} backends, {} mark rules, interfaces {}); sha256 {}",
                config.display(),
                c.services.len(),
                backends,
                c.marks.len(),
                c.director.interfaces.join(","),
                c.digest
            );
        }
        Cmd::Status { daemon, json, json_schema } => {
            if json_schema {
                print!("{}", lb_daemon::status_json::schema());
                return Ok(());
            }
            ask(&daemon, if json { "status json" } else { "status" })?
        }
        Cmd::Drain { target } => ask(&target.daemon, &target.request("drain"))?,
        Cmd::Disable { target } => ask(&target.daemon, &target.request("disable"))?,
        Cmd::Enable { target } => ask(&target.daemon, &target.request("enable"))?,
        Cmd::Weight { target, weight } => {
            ask(&target.daemon, &format!("{} {weight}", target.request("weight")))?
        }
        Cmd::Overrides { command: OverridesCmd::Clear { daemon } } => ask(&daemon, "overrides clear")?,
        Cmd::WaitDrained { target, timeout, inactive } => {
            let what = control::Drained {
                service: (target.service != "all").then(|| target.service.clone()),
                backend: target.backend,
                inactive_too: inactive,
                timeout,
            };
            let socket = target.daemon.socket();
            runtime()?
                .block_on(control::wait_drained(&socket, &what, |s| eprintln!("lb-daemon: waiting: {s}")))?;
            println!(
                "{} has no {}connections left",
                target.backend,
                if inactive { "" } else { "established " }
            );
        }
        Cmd::Detach { config } => {
            let detached = runtime()?.block_on(control::detach(&config))?;
            if detached.is_empty() {
                println!("nothing was attached");
            } else {
                println!("detached from {}; pinned maps removed", detached.join(", "));
            }
        }
        Cmd::Decap { command, bpf_dir } => {
            use lb_daemon::control::decap;
            let out = match command {
                DecapCmd::Attach { iface, xdp_mode, local } => {
                    let mode = if xdp_mode == "generic" {
                        lb_daemon::model::XdpMode::Generic
                    } else {
                        lb_daemon::model::XdpMode::Native
                    };
                    decap::attach(&bpf_dir, &iface, mode, &local)?
                }
                DecapCmd::Detach { iface } => decap::detach(&bpf_dir, &iface)?,
                DecapCmd::Status => decap::status(&bpf_dir)?,
            };
            println!("{}", out.trim_end());
        }
        Cmd::Verify { ring_slots, flow_entries } => {
            use lb_daemon::dataplane::probe;
            let features = probe::probe();
            for f in &features {
                let state = match &f.present {
                    Ok(true) => "ok".to_owned(),
                    Ok(false) => "MISSING".to_owned(),
                    Err(e) => format!("not probed ({e})"),
                };
                println!("{state:>7}  {} (Linux {})", f.name, f.since);
            }
            if let Some(missing) = probe::missing(&features) {
                anyhow::bail!("{missing}");
            }
            let dp = Dataplane::load(&LoadOptions { ring_slots, flow_entries, pin_dir: None })
                .context("loading the XDP data path")?;
            // How close each program came to the verifier's limit: what a change to the
            // data path must stay under.
            for name in lb_common::programs::ALL {
                if let Some(n) = dp.program(name)?.info()?.verified_instruction_count() {
                    println!("{n:>9} instructions verified  {name} (the kernel's limit: 1000000)");
                }
            }
            println!(
                "ok: {} bytes of XDP object loaded and verified ({} ring slots, {} flow entries); nothing attached",
                lb_daemon::dataplane::OBJECT.len(),
                ring_slots,
                flow_entries
            );
            drop(dp);
        }
        Cmd::Events { config, file, follow, service, json } => {
            let file = match file {
                Some(f) => f,
                None => {
                    lb_daemon::config::Config::load(&config)
                        .map_err(|e| anyhow::anyhow!(lb_daemon::error_chain(&e)))?
                        .director
                        .connection_log
                        .with_context(|| format!("{} sets no director.connection_log", config.display()))?
                        .file
                }
            };
            let what = control::conn_log::ShowEvents { file, service, follow, json, follow_for: None };
            control::conn_log::show_events(&what, &mut std::io::stdout().lock())?;
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lb-daemon", &mut std::io::stdout());
        }
        Cmd::ManPages { dir } => {
            for page in manual::write_man_pages(Cli::command(), &dir)? {
                println!("{}", dir.join(page).display());
            }
        }
    }
    Ok(())
}
