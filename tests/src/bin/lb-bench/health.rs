//! Health-check throughput: 10,000 TCP checks against local listeners, run at once on one
//! tokio thread (as the daemon's probes share its runtime), next to a reference that only
//! connects with tokio and drops the stream, in the same rounds. Reports checks per
//! second and the thread's CPU time (user + system, from getrusage) per check.
//!
//! Runs in a namespace of its own: loopback only, and its TIME_WAIT sockets vanish with it.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use lb_daemon::health::spec::{CheckKind, CheckSpec};
use lb_daemon::health::state::Outcome;
use lb_daemon::health::{Target, run};
use lb_tests::NetNs;
use nix::sys::resource::{UsageWho, getrusage};

const CHECKS: usize = 10_000;
const LISTENERS: usize = 100;
const ROUNDS: usize = 5;

fn thread_cpu() -> Result<Duration> {
    let u = getrusage(UsageWho::RUSAGE_THREAD)?;
    let d = |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    Ok(d(u.user_time()) + d(u.system_time()))
}

/// Wall time and this thread's CPU time of one batch (every check in it passed).
struct Batch {
    wall: Duration,
    cpu: Duration,
}

fn batch<F: Future<Output = bool> + 'static>(
    rt: &tokio::runtime::Runtime,
    one: impl Fn(SocketAddr) -> F,
    addrs: &[SocketAddr],
) -> Result<Batch> {
    let (cpu0, t0) = (thread_cpu()?, Instant::now());
    let ok = rt.block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let tasks: Vec<_> =
                    (0..CHECKS).map(|i| tokio::task::spawn_local(one(addrs[i % addrs.len()]))).collect();
                let mut ok = 0;
                for t in tasks {
                    ok += usize::from(t.await.unwrap_or(false));
                }
                ok
            })
            .await
    });
    let b = Batch { wall: t0.elapsed(), cpu: thread_cpu()? - cpu0 };
    ensure!(ok == CHECKS, "{ok} of {CHECKS} succeeded");
    Ok(b)
}

fn in_namespace() -> Result<()> {
    // The packet cases pinned the process to one CPU; the listeners' accept threads should
    // not compete with the measured thread for it.
    let mut all = nix::sched::CpuSet::new();
    for cpu in 0..std::thread::available_parallelism().map_or(1, |n| n.get()) {
        all.set(cpu)?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &all)?;
    let listeners: Vec<std::net::TcpListener> = (0..LISTENERS)
        .map(|_| -> Result<std::net::TcpListener> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
            s.listen(4096)?;
            Ok(s.into())
        })
        .collect::<Result<_>>()?;
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?;
    // Accepting (and closing) happens on threads of their own: only the checking thread's
    // CPU is measured.
    for l in listeners {
        std::thread::spawn(move || while l.accept().is_ok() {});
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reference = |addr: SocketAddr| async move { tokio::net::TcpStream::connect(addr).await.is_ok() };
    let checker = |addr: SocketAddr| async move {
        let spec = CheckSpec {
            kind: CheckKind::Tcp { port: Some(addr.port()) },
            timeout: Duration::from_secs(5),
            source: None,
            via_tunnel: None,
        };
        let target = Target { service: "bench".into(), addr: addr.ip(), port: None, tunnel: None };
        run(&spec, &target).await.0.outcome == Outcome::Ok
    };
    // One untimed batch each: the first connections pay for growing kernel tables.
    batch(&rt, reference, &addrs)?;
    batch(&rt, checker, &addrs)?;
    let (mut refs, mut checks) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        refs.push(batch(&rt, reference, &addrs)?);
        checks.push(batch(&rt, checker, &addrs)?);
    }
    let per_sec = |b: &Batch| CHECKS as f64 / b.wall.as_secs_f64();
    let cpu_us = |b: &Batch| b.cpu.as_secs_f64() * 1e6 / CHECKS as f64;
    let med = |v: Vec<f64>| super::median(&v);
    let ratio = med(checks.iter().zip(&refs).map(|(c, r)| cpu_us(c) / cpu_us(r).max(1e-9)).collect());
    println!();
    println!(
        "Health checks: {CHECKS} TCP checks at once against {LISTENERS} local listeners, one tokio \
         thread, {ROUNDS} interleaved rounds; medians; CPU = the thread's user + system time"
    );
    println!("{:<40} {:>12} {:>14} {:>9}", "case", "checks/s", "CPU us/check", "x ref");
    for (name, runs) in [("reference: tokio connect, drop", &refs), ("lb-daemon tcp check", &checks)] {
        let r = if std::ptr::eq(runs, &refs) { 1.0 } else { ratio };
        println!(
            "{:<40} {:>12.0} {:>14.1} {:>9.2}",
            name,
            med(runs.iter().map(per_sec).collect()),
            med(runs.iter().map(cpu_us).collect()),
            r
        );
    }
    let us = med(checks.iter().map(cpu_us).collect());
    println!(
        "=> {CHECKS} backends checked every 2 s cost about {:.1}% of one core",
        us * CHECKS as f64 / 2e6 * 100.0
    );
    Ok(())
}

pub fn run_all() -> Result<()> {
    let ns = NetNs::new("bh").context("a namespace for the health-check benchmark")?;
    ns.run(in_namespace)
}
