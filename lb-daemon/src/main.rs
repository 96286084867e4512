//! `lb-daemon`: the load balancer daemon and its operator commands.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
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
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Ask this control socket instead of the one the config names.
        #[arg(long)]
        socket: Option<PathBuf>,
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
    /// Load the embedded XDP object into this kernel (verifier included), report, unload.
    /// Attaches nothing and changes no traffic: a pre-deployment check for a kernel.
    Verify {
        /// Maglev ring slots to size the ring map with.
        #[arg(long, default_value_t = LoadOptions::default().ring_slots)]
        ring_slots: u32,
        /// Connection-table entries.
        #[arg(long, default_value_t = LoadOptions::default().flow_entries)]
        flow_entries: u32,
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
        Cmd::Status { config, socket } => {
            let socket = match socket {
                Some(s) => s,
                None => match lb_daemon::config::Config::load(&config) {
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
                },
            };
            print!("{}", runtime()?.block_on(control::request(&socket, "status"))?);
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
            let dp = Dataplane::load(&LoadOptions { ring_slots, flow_entries, pin_dir: None })
                .context("loading the XDP data path")?;
            println!(
                "ok: {} bytes of XDP object loaded and verified ({} ring slots, {} flow entries); nothing attached",
                lb_daemon::dataplane::OBJECT.len(),
                ring_slots,
                flow_entries
            );
            drop(dp);
        }
    }
    Ok(())
}
