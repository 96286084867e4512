//! A check that cannot run because the director is out of descriptors reports the
//! director's error, not a failed backend. Alone in its test binary (its own process):
//! it lowers the process's descriptor limit, which would break tests running beside it.

use std::net::{IpAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::time::Duration;

use lb_daemon::health::spec::{CheckKind, CheckSpec};
use lb_daemon::health::state::Outcome;
use lb_daemon::health::{Target, run};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

fn spec(kind: CheckKind) -> CheckSpec {
    CheckSpec { kind, timeout: Duration::from_secs(2), source: None, via_tunnel: None }
}

#[test]
fn checks_without_descriptors_blame_the_director() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("address").port();
    let target =
        Target { service: "web".into(), addr: IpAddr::from([127, 0, 0, 1]), port: Some(port), tunnel: None };
    let kinds = [
        ("tcp", CheckKind::Tcp { port: None }),
        ("exec", CheckKind::Exec { argv: vec!["/bin/true".into()] }),
        ("icmp", CheckKind::Icmp),
    ];
    // With descriptors to spare every check passes: the failures below are the limit's.
    for (name, kind) in kinds.clone() {
        let (report, _) = rt.block_on(run(&spec(kind), &target));
        assert_eq!(report.outcome, Outcome::Ok, "{name}: {}", report.message);
    }

    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("limit");
    let highest = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap_or(2);
    setrlimit(Resource::RLIMIT_NOFILE, highest + 1, hard).expect("lowering the limit");
    // Fill any hole below the limit, so that no new descriptor can be had at all.
    let mut fillers: Vec<OwnedFd> = Vec::new();
    while let Ok(fd) = nix::unistd::dup(std::io::stdin()) {
        fillers.push(fd);
    }
    let outcomes: Vec<(&str, Outcome, String)> = kinds
        .iter()
        .map(|(name, kind)| {
            let (report, _) = rt.block_on(run(&spec(kind.clone()), &target));
            (*name, report.outcome, report.message)
        })
        .collect();
    drop(fillers);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restoring the limit");

    for (name, outcome, message) in outcomes {
        assert_eq!(outcome, Outcome::DirectorError, "{name}: {message}");
        assert!(message.contains("Too many open files") || message.contains("EMFILE"), "{name}: {message}");
    }
    drop(listener);
}
