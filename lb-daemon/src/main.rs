//! `lb-daemon`: the load balancer daemon. This build offers `verify`; running from a
//! YAML configuration arrives with the configuration work.

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use lb_daemon::dataplane::{Dataplane, LoadOptions};

#[derive(Parser)]
#[command(version, about = "XDP layer-4 load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    match Cli::parse().command {
        Cmd::Verify { ring_slots, flow_entries } => {
            let dp = Dataplane::load(&LoadOptions { ring_slots, flow_entries })
                .context("loading the XDP data path")?;
            println!(
                "ok: {} bytes of XDP object loaded and verified ({} ring slots, {} flow entries); nothing attached",
                lb_daemon::dataplane::OBJECT.len(),
                ring_slots,
                flow_entries
            );
            drop(dp);
            Ok(())
        }
    }
}
