//! A running direct-routing farm: the topology of [`crate::topology`], a name server on
//! every real server, and the real `lb-daemon` on the director, configured by YAML. Used
//! by the end-to-end tests and by `cargo xtask lab`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use lb_daemon::config::Config;
use lb_daemon::dataplane::{Dataplane, LoadOptions};
use lb_daemon::model::XdpMode;
use nix::sys::signal::Signal;

use crate::daemon::{Daemon, DaemonOptions, Metrics};
use crate::tcp::{NameServer, fetch_from};
use crate::test_object::TestPrograms;
use crate::topology::{
    DIRECTOR_CLIENT_SIDE, DIRECTOR_IN, DIRECTOR_LAN_SIDE, DIRECTOR_OUT, DrTopology, Layout, ServerPath, VIP,
};

/// Port of the service on the VIP; the director's own service listens on 8080.
pub const VIP_PORT: u16 = 80;
pub const DIRECTOR_PORT: u16 = 8080;
/// Where masqueraded real servers ([`Layout::masqueraded`]) serve the VIP's port 80:
/// the director maps the port (`VIP:80 -> RS:8080`).
pub const NAT_SERVER_PORT: u16 = 8080;
/// The director's full-NAT source in labs of NAT servers (on its LAN link, which the
/// servers' side reaches without any route to the clients).
pub const FULLNAT_SOURCE: &str = "10.0.2.100";

/// Where the daemon's config comes from.
pub enum LabConfig {
    /// This file, as it is (`cargo xtask lab` runs `configs/lab.yaml`).
    File(PathBuf),
    /// A file the lab writes: a `director:` section with paths unique to this lab, then
    /// these `services:` (and `marks:`) lines.
    Services(String),
    /// As `Services`, with a connection table of this size (65,536 otherwise).
    SizedServices { services: String, connection_table_size: u32 },
}

/// The lab's connection table unless a config sizes it.
const LAB_TABLE_SIZE: u32 = 65536;

pub struct DrLab {
    pub topo: DrTopology,
    /// Name servers on port 80 of each real server; `None` while stopped.
    servers: Vec<Option<NameServer>>,
    own_service: Option<NameServer>,
    pub daemon: Daemon,
    /// Holds the pass-through program on the LAN bridge port (see `start`).
    _pass_through: Dataplane,
    /// The test switch in front of a tagged client side, if any.
    _switch: Option<TestPrograms>,
    bpf_dir: PathBuf,
    /// Config, log and socket of a generated config; removed on drop.
    workdir: Option<PathBuf>,
    connection_table_size: u32,
    /// Per server behind a router: where `lb-daemon decap` pinned its decapsulator.
    decap_dirs: Vec<PathBuf>,
    /// The port the real servers' name servers listen on.
    server_port: u16,
    /// `director.interfaces` of a generated config, and lines added to its director
    /// section.
    interfaces: String,
    director_extra: String,
}

/// The `services:` section of the default lab: one VIP, sh, every server at weight 1.
pub fn web_service(servers: &[IpAddr]) -> String {
    let mut y = format!(
        "services:\n  - name: web\n    match: {{ vip: {VIP}, port: {VIP_PORT}, proto: tcp }}\n    scheduler: sh\n    backends:\n"
    );
    for s in servers {
        y.push_str(&format!("      - {{ address: {s} }}\n"));
    }
    y
}

/// A service of the lab's VIP on `port` whose packets reach `servers` through tunnels,
/// without the `services:` line (to follow [`web_service`] or another).
pub fn tunnel_service(name: &str, port: u16, scheduler: &str, servers: &[IpAddr]) -> String {
    let mut y = format!(
        "  - name: {name}\n    match: {{ vip: {VIP}, port: {port}, proto: tcp }}\n    scheduler: {scheduler}\n    forward: tunnel\n    backends:\n"
    );
    for s in servers {
        y.push_str(&format!("      - {{ address: {s} }}\n"));
    }
    y
}

impl DrLab {
    /// The default lab: service `web` on the VIP over every server.
    pub fn start(servers: usize, client_addrs: usize) -> Result<Self> {
        let addrs: Vec<IpAddr> = (0..servers).map(|i| IpAddr::from([10, 0, 2, 11 + i as u8])).collect();
        Self::start_with(servers, client_addrs, LabConfig::Services(web_service(&addrs)))
    }

    pub fn start_with(servers: usize, client_addrs: usize, config: LabConfig) -> Result<Self> {
        Self::start_on(Layout::default(), servers, client_addrs, config)
    }

    /// A lab of another shape (a router in front, VLANs).
    pub fn start_on(layout: Layout, servers: usize, client_addrs: usize, config: LabConfig) -> Result<Self> {
        Self::start_custom(layout, DaemonOptions::default(), servers, client_addrs, config)
    }

    /// A lab of another shape whose daemon is started with `options` (a wrapper command).
    pub fn start_custom(
        layout: Layout,
        options: DaemonOptions,
        servers: usize,
        client_addrs: usize,
        config: LabConfig,
    ) -> Result<Self> {
        let topo = DrTopology::build_with(servers, client_addrs, layout)?;
        // Servers behind a router get their packets through tunnels: each strips them
        // with the shipped decapsulator (the test kernels have no ipip module).
        let mut decap_dirs = Vec::new();
        if layout.server_path == ServerPath::Routed {
            for (ns, iface) in topo.servers.iter().zip(&topo.server_ifs) {
                let dir = PathBuf::from("/sys/fs/bpf").join(crate::unique_name("lbdecap"));
                decap_dirs.push(dir.clone());
                crate::daemon::decap(ns, &dir, &["attach", iface])?;
            }
        }
        let server_port = if layout.masqueraded { NAT_SERVER_PORT } else { VIP_PORT };
        // Masqueraded servers answer through the director: it translates on the LAN too.
        let (interfaces, director_extra) = if layout.masqueraded {
            // The full-NAT source is the director's own address.
            topo.director.ip(&["addr", "add", &format!("{FULLNAT_SOURCE}/32"), "dev", DIRECTOR_OUT])?;
            (format!("[{DIRECTOR_IN}, {DIRECTOR_OUT}]"), format!("  fullnat_source: [{FULLNAT_SOURCE}]\n"))
        } else {
            (format!("[{DIRECTOR_IN}]"), String::new())
        };
        let name_servers = topo
            .servers
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                NameServer::start(
                    ns,
                    SocketAddr::from(([0, 0, 0, 0], server_port)),
                    &format!("server{}", i + 1),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let own_service =
            NameServer::start(&topo.director, (DIRECTOR_CLIENT_SIDE, DIRECTOR_PORT).into(), "director")?;

        let (services, connection_table_size) = match config {
            LabConfig::File(p) => (Err(p), LAB_TABLE_SIZE),
            LabConfig::Services(services) => (Ok(services), LAB_TABLE_SIZE),
            LabConfig::SizedServices { services, connection_table_size } => {
                (Ok(services), connection_table_size)
            }
        };
        let (path, workdir) = match services {
            Err(p) => (p, None),
            Ok(services) => {
                let dir = std::env::temp_dir().join(crate::unique_name("lbt"));
                std::fs::create_dir_all(&dir)?;
                let bpf = PathBuf::from("/sys/fs/bpf").join(dir.file_name().unwrap_or_default());
                let path = dir.join("lb.yaml");
                std::fs::write(
                    &path,
                    format!(
                        "{}{services}",
                        director_yaml(&dir, &bpf, connection_table_size, &interfaces, &director_extra)
                    ),
                )?;
                (path, Some(dir))
            }
        };
        let parsed = Config::load(&path).map_err(|e| anyhow!(lb_daemon::error_chain(&e)))?;
        let d = &parsed.director;
        // The lab owns its pin directory: whatever an earlier, interrupted run left there
        // points at interfaces that no longer exist.
        Dataplane::remove_pins(&d.bpf_dir).map_err(|e| anyhow!(lb_daemon::error_chain(&e)))?;
        let log = match &workdir {
            Some(dir) => dir.join("lb-daemon.log"),
            None => std::env::temp_dir().join(format!("{}.log", crate::unique_name("lb-lab"))),
        };

        // Frames the director redirects into its LAN veth reach the bridge only if the
        // peer runs an XDP program: the lab loads a pass-through one there.
        let mut pass = Dataplane::load(&LoadOptions { ring_slots: 7, flow_entries: 16, pin_dir: None })?;
        topo.lan.scoped(|| Ok(pass.attach_pass_through(&topo.lan_port, XdpMode::Native)?))?;
        let mut switch = None;
        if let Some(sw) = &topo.switch {
            let mut trunk = TestPrograms::load()?;
            sw.ns.scoped(|| {
                let index = |name: &str| nix::net::if_::if_nametoindex(name);
                let (to_client, to_director) = (index(&sw.client_port)?, index(&sw.director_port)?);
                trunk.attach_trunk_port(&sw.client_port, to_director, sw.vlan)?;
                trunk.attach_trunk_port(&sw.director_port, to_client, 0)
            })?;
            switch = Some(trunk);
        }
        if topo.router.is_none() {
            // The same for frames the director sends straight back out of `ext0` with
            // XDP_TX (a too-big answer): without a program there the client never gets them.
            topo.client.scoped(|| Ok(pass.attach_pass_through(&topo.client_if, XdpMode::Native)?))?;
        }

        let daemon =
            Daemon::start_with(&topo.director, &path, &d.control_socket, d.metrics_listen, &log, options)?;
        let lab = DrLab {
            topo,
            servers: name_servers.into_iter().map(Some).collect(),
            own_service: Some(own_service),
            daemon,
            _pass_through: pass,
            _switch: switch,
            bpf_dir: d.bpf_dir.clone(),
            workdir,
            connection_table_size,
            decap_dirs,
            server_port,
            interfaces,
            director_extra,
        };
        lab.wait_resolved()?;
        Ok(lab)
    }

    /// Backends count as down until their MAC is known; the daemon looks again every 10 s.
    fn wait_resolved(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(25);
        loop {
            let status = self.daemon.status()?;
            if !status.contains("unresolved") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("backends stayed unresolved:\n{status}\n{}", self.daemon.log_text());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Where the daemon pinned its maps.
    pub fn bpf_dir(&self) -> &Path {
        &self.bpf_dir
    }

    /// The connection log of a generated config (services log with `log_connections`).
    pub fn connection_log_path(&self) -> Result<PathBuf> {
        Ok(self.config_path()?.with_file_name("connections.log"))
    }

    /// The config file the daemon reads (only for labs with a generated config).
    pub fn config_path(&self) -> Result<PathBuf> {
        Ok(self.workdir.as_ref().ok_or_else(|| anyhow!("the lab runs a fixed file"))?.join("lb.yaml"))
    }

    /// Replaces the services of a generated config (the director section stays).
    pub fn write_services(&self, services: &str) -> Result<()> {
        let dir = self.workdir.as_ref().ok_or_else(|| anyhow!("the lab runs a fixed file"))?;
        let director = director_yaml(
            dir,
            &self.bpf_dir,
            self.connection_table_size,
            &self.interfaces,
            &self.director_extra,
        );
        std::fs::write(self.config_path()?, format!("{director}{services}"))?;
        Ok(())
    }

    /// Writes raw text as the config file (for refused reloads).
    pub fn write_raw_config(&self, text: &str) -> Result<()> {
        std::fs::write(self.config_path()?, text)?;
        Ok(())
    }

    pub fn metrics(&self) -> Result<Metrics> {
        self.daemon.metrics(&self.topo.director)
    }

    /// Metrics whose connection counts come from a walk of the table made after this call:
    /// the daemon serves one walk's counts for `CONN_COUNT_TTL`, so this waits that long.
    pub fn fresh_metrics(&self) -> Result<Metrics> {
        std::thread::sleep(lb_daemon::control::CONN_COUNT_TTL);
        self.metrics()
    }

    /// SIGHUP, then waits until the daemon has counted the reload; returns whether it
    /// succeeded.
    pub fn reload(&self) -> Result<bool> {
        let count = |m: &Metrics| -> Result<(f64, f64)> {
            Ok((
                m.value("lb_config_reloads_total{result=\"success\"}")?,
                m.value("lb_config_reloads_total{result=\"failure\"}")?,
            ))
        };
        let before = count(&self.metrics()?)?;
        self.daemon.signal(Signal::SIGHUP)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let now = count(&self.metrics()?)?;
            if now.0 > before.0 {
                return Ok(true);
            }
            if now.1 > before.1 {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the daemon did not finish a reload within 15 s:\n{}", self.daemon.log_text())
    }

    /// Makes `rounds` connections from every client address to the VIP, in the client
    /// namespace; returns (source, answering server) for each.
    pub fn connect_all(&self, rounds: usize) -> Result<Vec<(IpAddr, String)>> {
        let addrs = self.topo.client_addrs.clone();
        let vip: SocketAddr = (VIP, VIP_PORT).into();
        self.topo.client.run(move || {
            let mut answers = Vec::with_capacity(rounds * addrs.len());
            for _ in 0..rounds {
                for a in &addrs {
                    answers.push((IpAddr::V4(*a), fetch_from(IpAddr::V4(*a), vip)?));
                }
            }
            Ok(answers)
        })
    }

    /// One connection from the first client address to `dst`.
    pub fn connect(&self, dst: SocketAddr) -> Result<String> {
        let src = IpAddr::V4(self.topo.client_addrs[0]);
        self.topo.client.run(move || fetch_from(src, dst))
    }

    /// One connection from the first client address to the director's own address.
    pub fn connect_director(&self) -> Result<String> {
        self.connect((DIRECTOR_CLIENT_SIDE, DIRECTOR_PORT).into())
    }

    /// Stops real server `i`'s service on port 80 (the server itself stays up); returns
    /// how many connections it answered.
    pub fn stop_server(&mut self, i: usize) -> Result<u64> {
        let s = self
            .servers
            .get_mut(i)
            .and_then(Option::take)
            .ok_or_else(|| anyhow!("server {i} is not running"))?;
        s.stop()
    }

    /// Starts real server `i`'s service on port 80 again.
    pub fn start_server(&mut self, i: usize) -> Result<()> {
        let ns = self.topo.servers.get(i).ok_or_else(|| anyhow!("no server {i}"))?;
        let port = self.server_port;
        let s = NameServer::start(ns, SocketAddr::from(([0, 0, 0, 0], port)), &format!("server{}", i + 1))?;
        self.servers[i] = Some(s);
        Ok(())
    }

    /// Waits (bounded) until `lb-daemon status` shows `backend` of `service` in `state`.
    pub fn wait_state(&self, service: &str, backend: &str, state: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut status = String::new();
        while Instant::now() < deadline {
            status = self.daemon.status()?;
            let mut in_service = false;
            for line in status.lines() {
                let cols: Vec<&str> = line.split_whitespace().collect();
                if matches!(cols.first(), Some(&"TCP")) {
                    in_service = line.ends_with(&format!("({service})"));
                } else if in_service
                    && cols.first() == Some(&"->")
                    && cols.get(1).is_some_and(|a| a.starts_with(backend))
                    && cols.last() == Some(&state)
                {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{service} {backend} never became {state}:\n{status}\n{}", self.daemon.log_text())
    }

    /// Servers behind a router: takes real server `i`'s decapsulator away (`lb-daemon decap
    /// detach`), as a broken real server would have none.
    pub fn detach_decap(&self, i: usize) -> Result<String> {
        let (dir, ns, iface) = (
            self.decap_dirs.get(i).ok_or_else(|| anyhow!("server {i} has no decapsulator"))?,
            &self.topo.servers[i],
            &self.topo.server_ifs[i],
        );
        crate::daemon::decap(ns, dir, &["detach", iface])
    }

    /// Servers behind a router: gives the director a second link to the router
    /// (10.0.5.1 - 10.0.5.2), moves the route to the servers' subnet onto it and takes
    /// the first link's router side down, so that only the new way works. The daemon is
    /// not told.
    pub fn reroute_servers(&mut self) -> Result<()> {
        let (director, router) = (&self.topo.director, &self.topo.lan);
        let (dir_if, rt_if) = crate::veth(director, router, "rr")?;
        for (ns, iface) in [(director, &dir_if), (router, &rt_if)] {
            crate::topology::no_offloads(ns, iface)?;
        }
        director.ip(&["addr", "add", "10.0.5.1/24", "dev", &dir_if])?;
        router.ip(&["addr", "add", "10.0.5.2/24", "dev", &rt_if])?;
        director.sysctl(&format!("net.ipv4.conf.{dir_if}.rp_filter"), "0")?;
        let pass = &mut self._pass_through;
        router.scoped(|| Ok(pass.attach_pass_through(&rt_if, XdpMode::Native)?))?;
        director.ip(&["route", "replace", "10.0.4.0/24", "via", "10.0.5.2", "dev", &dir_if])?;
        router.ip(&["link", "set", &self.topo.lan_port, "down"])?;
        // The servers' replies (from the VIP, to the clients) return by the new link too.
        router.ip(&["route", "replace", "default", "via", "10.0.5.1"])?;
        Ok(())
    }

    /// Stops the name servers; returns how many connections each real server answered
    /// and how many the director's own service answered. The daemon stops on drop.
    pub fn stop_servers(&mut self) -> Result<(Vec<u64>, u64)> {
        let served = std::mem::take(&mut self.servers)
            .into_iter()
            .map(|s| s.map_or(Ok(0), NameServer::stop))
            .collect::<Result<_>>()?;
        let own = self.own_service.take().map(NameServer::stop).transpose()?.unwrap_or(0);
        Ok((served, own))
    }
}

fn director_yaml(
    workdir: &Path,
    bpf_dir: &Path,
    connection_table_size: u32,
    interfaces: &str,
    extra: &str,
) -> String {
    format!(
        "director:\n  interfaces: {interfaces}\n  xdp_mode: native\n  metrics_listen: 127.0.0.1:9740\n  \
         control_socket: {}\n  overrides_file: {}\n  connection_log: {{ file: {} }}\n  bpf_dir: {}\n  \
         connection_table_size: {connection_table_size}\n  ring_slots: 131072\n  tunnel_source: [{DIRECTOR_LAN_SIDE}]\n{extra}",
        workdir.join("control.sock").display(),
        workdir.join("overrides.json").display(),
        workdir.join("connections.log").display(),
        bpf_dir.display()
    )
}

impl Drop for DrLab {
    fn drop(&mut self) {
        // The daemon first (it holds the links), then what it pinned, then its files; the
        // namespaces go when the topology drops.
        let _ = self.daemon.kill9();
        let _ = std::fs::remove_file(&self.daemon.socket);
        if let Err(e) = Dataplane::remove_pins(&self.bpf_dir) {
            eprintln!("lab cleanup: {}", lb_daemon::error_chain(&e));
        }
        if let Some(dir) = &self.workdir {
            let _ = std::fs::remove_dir_all(dir);
        }
        for (dir, iface) in self.decap_dirs.iter().zip(&self.topo.server_ifs) {
            if let Err(e) = lb_daemon::dataplane::decap::Decapsulator::detach(dir, iface) {
                eprintln!("lab cleanup: {}", lb_daemon::error_chain(&e));
            }
        }
    }
}
