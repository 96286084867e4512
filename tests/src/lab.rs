//! A running direct-routing farm: the topology of [`crate::topology`], a name server on
//! every real server, and a director thread that owns the XDP data path. Used by the
//! end-to-end tests and by `cargo xtask lab`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use lb_common::{Counters, stat};
use lb_daemon::dataplane::{Dataplane, LoadOptions, XdpMode};
use lb_daemon::plan::Planner;
use lb_daemon::routing::neighbour;

use crate::fixture::tcp_service;
use crate::tcp::{NameServer, fetch_from};
use crate::topology::{DIRECTOR_CLIENT_SIDE, DrTopology, VIP};

/// Port of the service on the VIP; the director's own service listens on 8080.
pub const VIP_PORT: u16 = 80;
pub const DIRECTOR_PORT: u16 = 8080;

/// What the director reports when asked.
#[derive(Clone, Debug, Default)]
pub struct DirectorReport {
    pub service: Counters,
    /// Counters per backend address.
    pub backends: BTreeMap<IpAddr, Counters>,
    /// XDP action totals and drops, by name, non-zero only.
    pub global: Vec<(&'static str, u64)>,
}

enum Command {
    Report(mpsc::Sender<Result<DirectorReport>>),
    Stop,
}

pub struct DrLab {
    pub topo: DrTopology,
    servers: Vec<NameServer>,
    own_service: Option<NameServer>,
    commands: mpsc::Sender<Command>,
    director: Option<JoinHandle<Result<()>>>,
}

/// Everything the director thread does before it is ready to forward.
fn start_director(
    backends: &[IpAddr],
    dir_in: &str,
    lan_ns: &str,
    lan_port: &str,
) -> Result<(Dataplane, lb_daemon::plan::Plan)> {
    let mut dp = Dataplane::load(&LoadOptions { ring_slots: 4 * 4093, flow_entries: 65536, pin_dir: None })?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let neighbours = rt.block_on(neighbour::resolve(backends, Duration::from_secs(5)))?;
    ensure!(neighbours.len() == backends.len(), "resolved only {neighbours:?}");
    let web = tcp_service("web", IpAddr::V4(VIP), VIP_PORT, 4093, backends);
    let plan = Planner::default().plan(&[web], &[], &neighbours)?;
    dp.apply(&plan.state)?;
    dp.attach(dir_in, XdpMode::Native)?;
    // Redirected frames reach the LAN bridge only if its veth port runs XDP too.
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            crate::enter(lan_ns)?;
            Ok(dp.attach_pass_through(lan_port, XdpMode::Native)?)
        })
        .join()
        .map_err(|_| anyhow!("attach thread panicked"))?
    })?;
    Ok((dp, plan))
}

fn report(dp: &Dataplane, plan: &lb_daemon::plan::Plan) -> Result<DirectorReport> {
    let mut r =
        DirectorReport { service: dp.service_counters(plan.service_ids["web"])?, ..Default::default() };
    for ((_, addr), id) in &plan.backend_ids {
        r.backends.insert(*addr, dp.backend_counters(*id)?);
    }
    let g = dp.global_counters()?;
    for (index, name) in stat::ACTIONS.iter().chain(stat::DROP_REASONS.iter()) {
        if g[*index as usize] != 0 {
            r.global.push((name, g[*index as usize]));
        }
    }
    Ok(r)
}

impl DrLab {
    pub fn start(servers: usize, client_addrs: usize) -> Result<Self> {
        let topo = DrTopology::build(servers, client_addrs)?;
        let name_servers = topo
            .servers
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                NameServer::start(ns, SocketAddr::from(([0, 0, 0, 0], VIP_PORT)), &format!("server{}", i + 1))
            })
            .collect::<Result<Vec<_>>>()?;
        let own_service =
            NameServer::start(&topo.director, (DIRECTOR_CLIENT_SIDE, DIRECTOR_PORT).into(), "director")?;

        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (commands, command_rx) = mpsc::channel::<Command>();
        let backends: Vec<IpAddr> = topo.server_addrs.iter().map(|a| IpAddr::V4(*a)).collect();
        let (dir_in, lan_port, lan_ns) =
            (topo.director_in.clone(), topo.lan_port.clone(), topo.lan.name().to_owned());
        let director = topo.director.spawn(move || {
            let (dp, plan) = match start_director(&backends, &dir_in, &lan_ns, &lan_port) {
                Ok(v) => v,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            let _ = ready_tx.send(Ok(()));
            // Runs until told to stop, or until the lab is dropped (the sender goes away).
            while let Ok(cmd) = command_rx.recv() {
                match cmd {
                    Command::Report(reply) => {
                        let _ = reply.send(report(&dp, &plan));
                    }
                    Command::Stop => break,
                }
            }
            Ok(())
        });
        ready_rx.recv_timeout(Duration::from_secs(30)).context("the director did not start")??;
        Ok(DrLab {
            topo,
            servers: name_servers,
            own_service: Some(own_service),
            commands,
            director: Some(director),
        })
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

    /// One connection from the first client address to the director's own address.
    pub fn connect_director(&self) -> Result<String> {
        let src = IpAddr::V4(self.topo.client_addrs[0]);
        self.topo.client.run(move || fetch_from(src, (DIRECTOR_CLIENT_SIDE, DIRECTOR_PORT).into()))
    }

    pub fn report(&self) -> Result<DirectorReport> {
        let (tx, rx) = mpsc::channel();
        self.commands.send(Command::Report(tx)).map_err(|_| anyhow!("the director has stopped"))?;
        rx.recv_timeout(Duration::from_secs(10)).context("no report from the director")?
    }

    /// Stops everything; returns how many connections each real server answered and how
    /// many the director's own service answered.
    pub fn stop(mut self) -> Result<(Vec<u64>, u64)> {
        let _ = self.commands.send(Command::Stop);
        if let Some(d) = self.director.take() {
            d.join().map_err(|_| anyhow!("director thread panicked"))??;
        }
        let served =
            std::mem::take(&mut self.servers).into_iter().map(NameServer::stop).collect::<Result<_>>()?;
        let own = self.own_service.take().map(NameServer::stop).transpose()?.unwrap_or(0);
        Ok((served, own))
    }
}

impl Drop for DrLab {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(d) = self.director.take() {
            let _ = d.join();
        }
    }
}
