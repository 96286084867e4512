//! `cargo xtask lab`: a client, a director running `lb-daemon` with `configs/lab.yaml`,
//! and three real servers in network namespaces; real TCP connections through the XDP
//! data path (direct routing); the status table and a metrics excerpt are printed, and
//! everything is removed at the end (or on Enter, with `--keep`). `--directors 2`: two
//! directors behind a router doing ECMP over BGP (see `lb_tests::ecmp`).

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::PathBuf;

use anyhow::Result;
use lb_tests::lab::{DIRECTOR_PORT, DrLab, LabConfig, VIP_PORT};
use lb_tests::topology::{DIRECTOR_CLIENT_SIDE, VIP};

const CLIENTS: usize = 30;
const ROUNDS: usize = 4;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let keep = args.iter().any(|a| a == "--keep");
    let directors = match args.iter().position(|a| a == "--directors") {
        Some(i) => args.get(i + 1).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0),
        None => 1,
    };
    match directors {
        1 => one_director(keep),
        2 => two_directors(keep),
        _ => anyhow::bail!("--directors takes 1 or 2"),
    }
}

/// Two directors behind a BIRD router doing ECMP (`lb_tests::ecmp`): connections spread
/// over both, each source on one server, then the first director's link goes down and
/// comes back while the router follows.
fn two_directors(keep: bool) -> Result<()> {
    use lb_tests::two_directors::{DIRECTOR_IF, Redundancy, SERVICE_PORT, TwoDirectors};
    println!(
        "building the lab: 1 client ({CLIENTS} addresses), a router (BIRD, ECMP), 2 directors (lb-daemon + BIRD), \
         3 real servers"
    );
    let lab = TwoDirectors::start(Redundancy::Ecmp, 3, CLIENTS, true, false)?;
    println!(
        "  client    netns {:<14} {}..{}",
        lab.client.name(),
        lab.client_addrs[0],
        lab.client_addrs[CLIENTS - 1]
    );
    println!("  router    netns {:<14} bird -c configs/bird-router.conf", lab.router.name());
    for d in &lab.directors {
        println!(
            "  director  netns {:<14} {} on {DIRECTOR_IF}: lb-daemon -c {}, bird (configs/bird-vip-routes.conf)",
            d.ns.name(),
            d.addr,
            d.config_path().display()
        );
    }
    println!("  (the second director's file lists the servers in reverse order)");
    println!("\nthe router's route to the VIP, learnt over BGP from both:");
    print!("{}", lab.router.ip(&["route", "show", &VIP.to_string()])?);

    let before = lab.scheduled("web")?;
    let answers = lab.connect_all(ROUNDS)?;
    let after = lab.scheduled("web")?;
    let mut per_server: BTreeMap<&str, usize> = BTreeMap::new();
    let mut servers_of: BTreeMap<String, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for (src, name) in &answers {
        *per_server.entry(name).or_default() += 1;
        servers_of.entry(src.to_string()).or_default().insert(name);
    }
    println!(
        "\n{} TCP connections to {VIP}:{SERVICE_PORT} ({ROUNDS} from each client address)",
        answers.len()
    );
    for (d, (a, b)) in lab.directors.iter().zip(after.iter().zip(&before)) {
        println!("  through {}: {} connections, ring fp {}", d.addr, a - b, d.ring_fingerprint("web")?);
    }
    for (name, n) in &per_server {
        println!("  {name}: {n} connections");
    }
    let split = servers_of.values().filter(|s| s.len() > 1).count();
    println!("  sources that reached more than one server: {split} of {}", servers_of.len());

    println!("\n{}'s link goes down (as if it died):", lab.directors[0].addr);
    lab.directors[0].set_link(false)?;
    let gone = lab
        .wait_next_hops(&lb_tests::two_directors::DIRECTOR_ADDRS[1..], std::time::Duration::from_secs(20))?;
    println!("  the router dropped it after {} ms (BFD):", gone.as_millis());
    print!("{}", lab.router.ip(&["route", "show", &VIP.to_string()])?);
    let answers = lab.connect_all(1)?;
    let moved =
        answers.iter().filter(|(src, name)| !servers_of[&src.to_string()].contains(name.as_str())).count();
    println!(
        "  {} connections through the other director, {moved} to another server than before",
        answers.len()
    );
    lab.directors[0].set_link(true)?;
    let back =
        lab.wait_next_hops(&lb_tests::two_directors::DIRECTOR_ADDRS, std::time::Duration::from_secs(60))?;
    println!("  link up again: back as a next hop after {} ms", back.as_millis());

    if keep {
        println!("\nthe lab stays up until you press Enter. To look around:");
        for d in &lab.directors {
            println!("  lb-daemon status --socket {}", d.workdir.join("control.sock").display());
        }
        println!("  ip -n {} route show {VIP}", lab.router.name());
        if let Some(bird) = lab.router_bird() {
            println!("  birdc -s {} show protocols", bird.socket().display());
        }
        let _ = std::io::stdin().lock().lines().next();
    }
    drop(lab);
    println!("\ndaemons and BIRDs stopped, namespaces removed");
    Ok(())
}

fn one_director(keep: bool) -> Result<()> {
    let config = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/lab.yaml"));
    let config = std::fs::canonicalize(&config)?;
    println!("building the lab: 1 client ({CLIENTS} addresses), 1 director, 3 real servers");
    let mut lab = DrLab::start_with(3, CLIENTS, LabConfig::File(config.clone()))?;
    let t = &lab.topo;
    println!(
        "  client    netns {:<14} {}..{}",
        t.client.name(),
        t.client_addrs[0],
        t.client_addrs[CLIENTS - 1]
    );
    println!(
        "  director  netns {:<14} lb-daemon -c {} (XDP on {}), LAN side {}",
        t.director.name(),
        config.display(),
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

    // Connection counts come from a walk of the table that status and scrapes share for a
    // few seconds: wait for one made after the connections above.
    std::thread::sleep(lb_daemon::control::CONN_COUNT_TTL);
    println!("\nlb-daemon status -c {}", config.display());
    print!("{}", lab.daemon.status()?);
    println!("\nip route show table 200 (VIP routes, for BIRD/FRR to announce):");
    print!("{}", t.director.ip(&["route", "show", "table", "200"])?);
    println!("\nGET http://127.0.0.1:9740/metrics (in the director namespace), excerpt:");
    let metrics = lab.metrics()?;
    for line in metrics.0.lines() {
        let interesting = [
            "lb_service_",
            "lb_backend_connections_total",
            "lb_xdp_actions_total",
            "lb_config_reloads",
            "lb_routing_objects",
        ];
        if !line.starts_with('#') && interesting.iter().any(|p| line.starts_with(p)) && !line.ends_with(" 0")
        {
            println!("  {line}");
        }
    }

    if keep {
        let dir = t.director.name();
        println!("\nthe lab stays up until you press Enter. To look around:");
        println!(
            "  lb-daemon status -c {}                       # (target/release/lb-daemon)",
            config.display()
        );
        println!("  nsenter --net=/run/netns/{dir} curl -s 127.0.0.1:9740/metrics");
        println!("  ip -n {dir} link show {}                     # the XDP program", t.director_in);
        println!("  ls -R /sys/fs/bpf/lb-lab                     # pinned maps and link");
        println!("  ip netns exec {} ip route", t.client.name());
        println!(
            "  lb-daemon drain all 10.0.2.11 -c {0}; lb-daemon wait-drained all 10.0.2.11 --timeout 30s -c {0}; lb-daemon enable all 10.0.2.11 -c {0}",
            config.display()
        );
        println!("  (edit {} and reload: kill -HUP {})", config.display(), lab.daemon.pid()?);
        let _ = std::io::stdin().lock().lines().next();
    }
    let (served, _) = lab.stop_servers()?;
    drop(lab);
    println!("\nservers answered {served:?}; daemon stopped, data path detached, namespaces removed");
    Ok(())
}
