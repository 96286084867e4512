//! `cargo xtask lab`: a client, a director and three real servers in network namespaces;
//! real TCP connections through the XDP data path (direct routing); what happened is
//! printed, and everything is removed at the end (or on Enter, with `--keep`).

use std::collections::BTreeMap;
use std::io::BufRead as _;

use anyhow::Result;
use lb_tests::lab::{DIRECTOR_PORT, DrLab, VIP_PORT};
use lb_tests::topology::{DIRECTOR_CLIENT_SIDE, VIP};

const CLIENTS: usize = 30;
const ROUNDS: usize = 4;

fn main() -> Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    println!("building the lab: 1 client ({CLIENTS} addresses), 1 director, 3 real servers");
    let lab = DrLab::start(3, CLIENTS)?;
    let t = &lab.topo;
    println!(
        "  client    netns {:<14} {}..{}",
        t.client.name(),
        t.client_addrs[0],
        t.client_addrs[CLIENTS - 1]
    );
    println!(
        "  director  netns {:<14} XDP (native) on {}, LAN side {}",
        t.director.name(),
        t.director_in,
        t.director_out
    );
    for (ns, addr) in t.servers.iter().zip(&t.server_addrs) {
        println!("  server    netns {:<14} {addr}, VIP {VIP} on lo", ns.name());
    }

    println!(
        "\n{} TCP connections to {VIP}:{VIP_PORT} ({ROUNDS} from each client address)",
        CLIENTS * ROUNDS
    );
    let answers = lab.connect_all(ROUNDS)?;
    let mut per_server: BTreeMap<&str, usize> = BTreeMap::new();
    let mut per_source: BTreeMap<String, &str> = BTreeMap::new();
    for (src, name) in &answers {
        *per_server.entry(name).or_default() += 1;
        per_source.insert(src.to_string(), name);
    }
    for (name, n) in &per_server {
        println!("  {name}: {n} connections");
    }
    let sample: Vec<String> = per_source.iter().take(6).map(|(s, n)| format!("{s} -> {n}")).collect();
    println!("  source hashing, first clients: {}", sample.join(", "));
    println!(
        "  director's own address {DIRECTOR_CLIENT_SIDE}:{DIRECTOR_PORT} answers: {}",
        lab.connect_director()?
    );

    let r = lab.report()?;
    println!("\ndata-path counters (summed over CPUs)");
    println!(
        "  service web: {} packets, {} bytes, {} new flows",
        r.service.packets, r.service.bytes, r.service.new_flows
    );
    for (addr, c) in &r.backends {
        println!("  backend {addr}: {} packets, {} bytes, {} new flows", c.packets, c.bytes, c.new_flows);
    }
    let global: Vec<String> = r.global.iter().map(|(n, v)| format!("{n}={v}")).collect();
    println!("  XDP actions and drops: {}", global.join(" "));

    if keep {
        println!("\nthe lab stays up until you press Enter. To look around:");
        println!(
            "  ip netns exec {} ip -s link show {}     # XDP program and counters",
            t.director.name(),
            t.director_in
        );
        println!(
            "  ip netns exec {} bpftool net show            # attachments (needs bpftool)",
            t.director.name()
        );
        println!("  ip netns exec {} ip addr; ip netns exec {} ip route", t.client.name(), t.client.name());
        let _ = std::io::stdin().lock().lines().next();
    }
    let (served, _) = lab.stop()?;
    println!("\nservers answered {served:?}; namespaces removed");
    Ok(())
}
