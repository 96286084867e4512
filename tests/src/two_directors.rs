//! Two directors in front of the same real servers, the two ways farms run them:
//!
//! ```text
//!  client ──veth── router ──veth── core (bridge) ──veth── lb1 core0 198.51.100.2
//!  10.0.3.10+      10.0.3.1 │                     ├─veth── lb2 core0 198.51.100.3
//!                  198.51.100.1                    └─veth── server1..N 198.51.100.11+, VIP on lo
//! ```
//!
//! [`Redundancy::Ecmp`], active/active (the scale-out design of Maglev, GLB, or Cilium
//! with BIRD): each director runs BIRD with `configs/bird-vip-routes.conf` (the second
//! with its own address) and announces the VIPs `lb-daemon` publishes (table 200, while a
//! server is up); the router runs BIRD with `configs/bird-router.conf`, which installs
//! one multipath route per VIP, hashed on L4 (`fib_multipath_hash_policy=1`).
//!
//! [`Redundancy::Vrrp`], active/standby (for networks without BGP): keepalived on each
//! director runs `configs/keepalived-lb.conf` (the second with its own id and a lower
//! priority) and only moves the VIP addresses; the router reaches the VIP on its core
//! link, by ARP, so frames to the VIP go to whichever director holds it.
//!
//! The directors are one-armed (LVS-DR's "one arm"): VIP traffic arrives on `core0` and
//! leaves by XDP_TX to a real server on the same LAN; servers answer the clients through
//! the router, their default gateway. The shipped files are used as they are, but for
//! what differs per director: the lab's addresses are theirs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail, ensure};
use lb_daemon::dataplane::{Dataplane, LoadOptions};
use lb_daemon::model::XdpMode;

use crate::bird::{Bird, Keepalived};
use crate::daemon::{Daemon, DaemonOptions, Metrics};
use crate::tcp::{NameServer, fetch_from};
use crate::topology::{VIP, VIP_PREFIX_LEN, no_offloads};
use crate::{NetNs, veth, veth_named};

pub const ROUTER_CORE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 1);
/// Each director's address on the core LAN, as the shipped BIRD files name them.
pub const DIRECTOR_ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 51, 100, 2), Ipv4Addr::new(198, 51, 100, 3)];
/// The directors' one interface, fixed so that their configs can name it.
pub const DIRECTOR_IF: &str = "core0";
pub const SERVICE_PORT: u16 = 80;

pub fn server_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 11 + i as u8)
}

fn conf(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs")).join(name)
}

pub const ECHO_PORT: u16 = 7;

/// The `services:` and `routing:` sections the directors run: `web` on the VIP's port 80,
/// with `echo` (port 7) first when `echo`; `sh`, fast tcp checks, VIP routes for BIRD.
/// `reversed` lists the services and backends the other way round (a second director's
/// file in another order must still give the same rings).
pub fn services_yaml(servers: usize, reversed: bool, echo: bool) -> String {
    let mut addrs: Vec<Ipv4Addr> = (0..servers).map(server_addr).collect();
    if reversed {
        addrs.reverse();
    }
    let service = |name: &str, port: u16| {
        let mut y = format!(
            "  - name: {name}\n    match: {{ vip: {VIP}, port: {port} }}\n    scheduler: sh\n    \
             check: {{ type: tcp, interval: 200ms, timeout: 150ms, rise: 1, fall: 1 }}\n    backends:\n"
        );
        for a in &addrs {
            y.push_str(&format!("      - {{ address: {a} }}\n"));
        }
        y
    };
    let mut sections = vec![service("web", SERVICE_PORT)];
    if echo {
        sections.insert(0, service("echo", ECHO_PORT));
    }
    if reversed {
        sections.reverse();
    }
    format!("services:\n{}routing:\n  vip_routes: {{ table: 200 }}\n", sections.concat())
}

/// How the two directors share the VIPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redundancy {
    /// Both announce them over BGP; the router spreads flows by ECMP.
    Ecmp,
    /// keepalived (VRRP) gives them to one director at a time.
    Vrrp,
}

/// One director: its namespace, daemon, BIRD or keepalived, and files.
pub struct Director {
    pub ns: NetNs,
    pub addr: Ipv4Addr,
    pub daemon: Daemon,
    /// BIRD (ECMP) or keepalived (VRRP), while it runs.
    peer: Option<Peer>,
    redundancy: Redundancy,
    /// Its BIRD or keepalived configuration.
    peer_conf: PathBuf,
    pub workdir: PathBuf,
    pub bpf_dir: PathBuf,
}

/// What runs beside the daemon; stopped on drop.
enum Peer {
    Bird(Bird),
    Keepalived(Keepalived),
}

impl Director {
    pub fn config_path(&self) -> PathBuf {
        self.workdir.join("lb.yaml")
    }

    pub fn metrics(&self) -> Result<Metrics> {
        self.daemon.metrics(&self.ns)
    }

    /// Starts its BIRD or keepalived, as the lab does (or again after [`Director::stop_peer`]).
    pub fn start_peer(&mut self) -> Result<()> {
        if self.peer.is_none() {
            self.peer = Some(match self.redundancy {
                Redundancy::Ecmp => Peer::Bird(Bird::start(&self.ns, &self.peer_conf)?),
                Redundancy::Vrrp => {
                    Peer::Keepalived(Keepalived::start(&self.ns, &self.peer_conf, &self.workdir)?)
                }
            });
        }
        Ok(())
    }

    /// Stops its BIRD (the session drops as when the process dies) or keepalived (as
    /// `systemctl stop keepalived`: it gives the VIPs up and tells the other director).
    pub fn stop_peer(&mut self) {
        self.peer = None;
    }

    /// What its BIRD or keepalived says about itself, for a failure's message.
    pub fn peer_report(&self) -> String {
        match &self.peer {
            Some(Peer::Bird(b)) => b.ask(&["show", "protocols"]).unwrap_or_else(|e| e.to_string()),
            Some(Peer::Keepalived(k)) => k.log_text(),
            None => "(stopped)".to_owned(),
        }
    }

    /// Whether the VIP is one of its addresses (VRRP: it is the master).
    pub fn holds_vip(&self) -> Result<bool> {
        Ok(self.ns.ip(&["-4", "addr", "show", "dev", DIRECTOR_IF])?.contains(&format!(" {VIP}/32 ")))
    }

    /// Takes its only link down (`up` false) or up: as a director that dies or loses its
    /// link, for the router and the servers alike.
    pub fn set_link(&self, up: bool) -> Result<()> {
        self.ns.ip(&["link", "set", DIRECTOR_IF, if up { "up" } else { "down" }]).map(drop)
    }

    /// The ring fingerprint `status` prints for `service`.
    pub fn ring_fingerprint(&self, service: &str) -> Result<String> {
        let status = self.daemon.status()?;
        status
            .lines()
            .find_map(|l| {
                let (_, rest) = l.split_once(" fp ")?;
                let (fp, name) = rest.split_once(' ')?;
                (name == format!("({service})")).then(|| fp.to_owned())
            })
            .ok_or_else(|| anyhow!("no fingerprint for {service} in\n{status}"))
    }
}

pub struct TwoDirectors {
    pub client: NetNs,
    pub router: NetNs,
    pub core: NetNs,
    pub servers: Vec<NetNs>,
    pub directors: Vec<Director>,
    pub client_addrs: Vec<Ipv4Addr>,
    router_bird: Option<Bird>,
    name_servers: Vec<NameServer>,
    /// Pass-through programs on the bridge ports facing the directors: a veth delivers
    /// XDP_TX frames only to a peer that runs an XDP program.
    _pass_through: Dataplane,
}

impl TwoDirectors {
    /// Builds the topology, starts the servers, both directors (the second reading its
    /// file's services and backends in reverse order when `second_reversed`) and their
    /// BIRDs or keepalived, and waits until the router holds both directors as next hops
    /// of the VIP (ECMP) or the first director holds the VIP (VRRP).
    pub fn start(
        redundancy: Redundancy,
        servers: usize,
        client_addrs: usize,
        second_reversed: bool,
        echo: bool,
    ) -> Result<Self> {
        let client = NetNs::new("ec")?;
        let router = NetNs::new("er")?;
        let core = NetNs::new("eb")?;
        let bridge = "br0";
        core.ip(&["link", "add", bridge, "type", "bridge"])?;
        core.ip(&["link", "set", bridge, "up"])?;
        let attach = |ns: &NetNs, prefix: &str, name: Option<&str>| -> Result<(String, String)> {
            let (port, link) = match name {
                Some(n) => veth_named(&core, ns, &crate::unique_name(prefix), n)?,
                None => veth(&core, ns, prefix)?,
            };
            no_offloads(&core, &port)?;
            no_offloads(ns, &link)?;
            core.ip(&["link", "set", &port, "master", bridge])?;
            Ok((port, link))
        };

        // The router: clients on one side, the core LAN on the other.
        let (cl_if, rt_in) = veth(&client, &router, "ea")?;
        no_offloads(&client, &cl_if)?;
        no_offloads(&router, &rt_in)?;
        let (_, rt_core) = attach(&router, "ep", None)?;
        router.ip(&["addr", "add", &format!("{ROUTER_CLIENT_SIDE}/24"), "dev", &rt_in])?;
        router.ip(&["addr", "add", &format!("{ROUTER_CORE}/24"), "dev", &rt_core])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        // ECMP on the 5-tuple: a client's connections spread over the directors, so that
        // stickiness per source shows that both rings agree.
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        for scope in ["all", "default"] {
            router.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
        }
        let client_addrs: Vec<Ipv4Addr> =
            (0..client_addrs).map(|i| Ipv4Addr::new(10, 0, 3, 10 + i as u8)).collect();
        for a in &client_addrs {
            client.ip(&["addr", "add", &format!("{a}/24"), "dev", &cl_if])?;
        }
        let vip_net = ipnet::Ipv4Net::new(VIP, VIP_PREFIX_LEN)?.trunc().to_string();
        client.ip(&["route", "add", &vip_net, "via", &ROUTER_CLIENT_SIDE.to_string()])?;

        let mut server_ns = Vec::new();
        let mut name_servers = Vec::new();
        for i in 0..servers {
            let s = NetNs::new("es")?;
            let (_, sif) = attach(&s, "eq", None)?;
            s.ip(&["addr", "add", &format!("{}/24", server_addr(i)), "dev", &sif])?;
            s.ip(&["route", "add", "default", "via", &ROUTER_CORE.to_string()])?;
            s.ip(&["addr", "add", &format!("{VIP}/{VIP_PREFIX_LEN}"), "dev", "lo"])?;
            s.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            s.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
            name_servers.push(NameServer::start(
                &s,
                SocketAddr::from(([0, 0, 0, 0], SERVICE_PORT)),
                &format!("server{}", i + 1),
            )?);
            server_ns.push(s);
        }

        let mut pass = Dataplane::load(&LoadOptions { ring_slots: 7, flow_entries: 16, pin_dir: None })?;
        let router_bird = match redundancy {
            Redundancy::Ecmp => Some(Bird::start(&router, &conf("bird-router.conf"))?),
            Redundancy::Vrrp => {
                // Whoever holds the VIP answers ARP for it on the core LAN.
                router.ip(&["route", "add", &format!("{VIP}/32"), "dev", &rt_core])?;
                None
            }
        };
        let mut directors = Vec::new();
        for (n, addr) in DIRECTOR_ADDRS.into_iter().enumerate() {
            let ns = NetNs::new(&format!("el{}", n + 1))?;
            let (port, _) = attach(&ns, "ed", Some(DIRECTOR_IF))?;
            core.scoped(|| Ok(pass.attach_pass_through(&port, XdpMode::Native)?))?;
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", DIRECTOR_IF])?;
            ns.ip(&["route", "add", "default", "via", &ROUTER_CORE.to_string()])?;
            let workdir = std::env::temp_dir().join(crate::unique_name(&format!("lbe{}", n + 1)));
            std::fs::create_dir_all(&workdir)?;
            let bpf_dir = PathBuf::from("/sys/fs/bpf").join(workdir.file_name().unwrap_or_default());
            let path = workdir.join("lb.yaml");
            let mut services = services_yaml(servers, n == 1 && second_reversed, echo);
            if redundancy == Redundancy::Vrrp {
                // keepalived moves the VIPs; there is nothing to announce.
                services.truncate(services.find("routing:").unwrap_or(services.len()));
            }
            std::fs::write(&path, format!("{}{services}", director_yaml(&workdir, &bpf_dir)))?;
            // The shipped files; the second director differs only where they say so.
            let peer_conf = match redundancy {
                Redundancy::Ecmp => {
                    let shipped = std::fs::read_to_string(conf("bird-vip-routes.conf"))?;
                    let bird_conf = workdir.join("bird.conf");
                    std::fs::write(
                        &bird_conf,
                        shipped.replace(&DIRECTOR_ADDRS[0].to_string(), &addr.to_string()),
                    )?;
                    bird_conf
                }
                Redundancy::Vrrp => {
                    let mut text = std::fs::read_to_string(conf("keepalived-lb.conf"))?
                        .replace("interface eth0", &format!("interface {DIRECTOR_IF}"))
                        .replace("dev eth0", &format!("dev {DIRECTOR_IF}"));
                    if n == 1 {
                        text = text
                            .replace("router_id lb1", "router_id lb2")
                            .replace("priority 150", "priority 100");
                    }
                    let ka_conf = workdir.join("keepalived.conf");
                    std::fs::write(&ka_conf, text)?;
                    ka_conf
                }
            };
            Dataplane::remove_pins(&bpf_dir).map_err(|e| anyhow!(lb_daemon::error_chain(&e)))?;
            let daemon = Daemon::start_with(
                &ns,
                &path,
                &workdir.join("control.sock"),
                "127.0.0.1:9740".parse()?,
                &workdir.join("lb-daemon.log"),
                DaemonOptions::default(),
            )
            .inspect_err(|_| {
                // No Director owns them yet.
                let _ = Dataplane::remove_pins(&bpf_dir);
                let _ = std::fs::remove_dir_all(&workdir);
            })?;
            let mut d = Director { ns, addr, daemon, peer: None, redundancy, peer_conf, workdir, bpf_dir };
            d.start_peer()?;
            directors.push(d);
        }
        let lab = TwoDirectors {
            client,
            router,
            core,
            servers: server_ns,
            directors,
            client_addrs,
            router_bird,
            name_servers,
            _pass_through: pass,
        };
        match redundancy {
            Redundancy::Ecmp => lab.wait_next_hops(&DIRECTOR_ADDRS, Duration::from_secs(60))?,
            Redundancy::Vrrp => lab.wait_master(0, Duration::from_secs(30))?,
        };
        Ok(lab)
    }

    /// The router's next hops for the VIP now (none: no route).
    pub fn next_hops(&self) -> Result<Vec<Ipv4Addr>> {
        let route = self.router.ip(&["route", "show", &VIP.to_string()])?;
        Ok(route
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect())
    }

    /// Waits (bounded by `limit`) until the router's next hops for the VIP are exactly
    /// `want` (in any order); returns how long that took.
    pub fn wait_next_hops(&self, want: &[Ipv4Addr], limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        let mut want = want.to_vec();
        want.sort();
        loop {
            let mut hops = self.next_hops()?;
            hops.sort();
            if hops == want {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!(
                    "the router's next hops for {VIP} stayed {hops:?}, not {want:?}:\n{}\n{}",
                    self.router_bird
                        .as_ref()
                        .map(|b| b.ask(&["show", "protocols", "all"]).unwrap_or_default())
                        .unwrap_or_default(),
                    self.directors
                        .iter()
                        .map(|d| format!("{}\n{}", d.peer_report(), d.daemon.log_text()))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `rounds` connections from every client address to the VIP: (source, server) each.
    pub fn connect_all(&self, rounds: usize) -> Result<Vec<(IpAddr, String)>> {
        let addrs = self.client_addrs.clone();
        let vip: SocketAddr = (VIP, SERVICE_PORT).into();
        self.client.run(move || {
            let mut answers = Vec::with_capacity(rounds * addrs.len());
            for _ in 0..rounds {
                for a in &addrs {
                    answers.push((IpAddr::V4(*a), fetch_from(IpAddr::V4(*a), vip)?));
                }
            }
            Ok(answers)
        })
    }

    /// Waits (bounded by `limit`) until director `i` alone holds the VIP (VRRP); returns
    /// how long that took.
    pub fn wait_master(&self, i: usize, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let held: Vec<bool> = self.directors.iter().map(Director::holds_vip).collect::<Result<_>>()?;
            if held.iter().enumerate().all(|(j, &h)| h == (j == i)) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                let reports: Vec<String> = self.directors.iter().map(Director::peer_report).collect();
                bail!("director {i} never became the only master: {held:?}\n{}", reports.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits (bounded) until every director counts `n` backends of `service` active.
    pub fn wait_active(&self, service: &str, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let series = "lb_backend_state{backend=";
        for d in &self.directors {
            loop {
                let m = d.metrics()?;
                let active =
                    m.0.lines()
                        .filter(|l| {
                            l.starts_with(series)
                                && l.contains(&format!("service=\"{service}\",state=\"active\"}} 1"))
                        })
                        .count();
                if active == n {
                    break;
                }
                ensure!(Instant::now() < deadline, "{service} on {}: {active} of {n} active", d.addr);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// New connections scheduled by each director for `service` so far.
    pub fn scheduled(&self, service: &str) -> Result<Vec<f64>> {
        self.directors
            .iter()
            .map(|d| d.metrics()?.value(&format!("lb_service_connections_total{{service=\"{service}\"}}")))
            .collect()
    }

    /// Stops the name servers; how many connections each real server answered.
    pub fn stop_servers(&mut self) -> Result<Vec<u64>> {
        std::mem::take(&mut self.name_servers).into_iter().map(NameServer::stop).collect()
    }

    /// The router's BIRD (ECMP labs).
    pub fn router_bird(&self) -> Option<&Bird> {
        self.router_bird.as_ref()
    }
}

fn director_yaml(workdir: &Path, bpf_dir: &Path) -> String {
    format!(
        "director:\n  interfaces: [{DIRECTOR_IF}]\n  xdp_mode: native\n  metrics_listen: 127.0.0.1:9740\n  \
         control_socket: {}\n  overrides_file: {}\n  bpf_dir: {}\n  connection_table_size: 65536\n  ring_slots: 131072\n",
        workdir.join("control.sock").display(),
        workdir.join("overrides.json").display(),
        bpf_dir.display()
    )
}

impl Drop for Director {
    /// Also when the lab's start failed half way: its BIRD or keepalived and daemon stop,
    /// then what the daemon pinned and its files go.
    fn drop(&mut self) {
        self.stop_peer();
        let _ = self.daemon.kill9();
        if let Err(e) = Dataplane::remove_pins(&self.bpf_dir) {
            eprintln!("lab cleanup: {}", lb_daemon::error_chain(&e));
        }
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

impl Drop for TwoDirectors {
    fn drop(&mut self) {
        // The directors before their namespaces.
        self.directors.clear();
    }
}
