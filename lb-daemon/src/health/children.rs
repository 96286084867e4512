//! What exec checks and hooks leave behind. ssh's ControlPersist master daemonizes out of
//! the check's process group (it forks and calls setsid), so killing the group at a
//! timeout does not reach it. Under systemd, stopping the unit kills it with the rest of
//! the cgroup; a daemon run otherwise would leave masters (and any plugin's runaway
//! children) behind. So the daemon is a child subreaper: orphans of its checks become its
//! own children, which it reaps when they exit and stops when it stops.
//!
//! Children that tokio waits for are registered while they live, under the same lock the
//! reaper holds, so the reaper never takes an exit status tokio is waiting for.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

/// Pids of live children that tokio waits for, with a count (a pid may be reused).
static SPAWNED: Mutex<BTreeMap<i32, u32>> = Mutex::new(BTreeMap::new());

fn spawned() -> MutexGuard<'static, BTreeMap<i32, u32>> {
    SPAWNED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes orphaned descendants of this process its children (PR_SET_CHILD_SUBREAPER).
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// A registered child; unregistered when dropped (after tokio reaped it, or killed it).
pub struct Registered(i32);

impl Drop for Registered {
    fn drop(&mut self) {
        let mut map = spawned();
        if let Some(n) = map.get_mut(&self.0) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.0);
            }
        }
    }
}

/// Spawns with `spawn` while the reaper cannot run, and registers the child's pid.
pub fn spawn_registered<T>(
    spawn: impl FnOnce() -> std::io::Result<T>,
    pid: impl Fn(&T) -> Option<u32>,
) -> std::io::Result<(T, Option<Registered>)> {
    let mut map = spawned();
    let child = spawn()?;
    let registered = pid(&child).map(|p| {
        *map.entry(p as i32).or_default() += 1;
        Registered(p as i32)
    });
    Ok((child, registered))
}

/// This process's children: (pid, state letter) from /proc.
fn children() -> Vec<(i32, char)> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| {
        let name = e.ok()?.file_name();
        let pid: i32 = name.to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let ppid: i32 = fields.next()?.parse().ok()?;
        (ppid == me).then_some((pid, state))
    })
    .collect()
}

/// Reaps orphans that have exited; returns how many. The scan of /proc runs without the
/// lock: a zombie's pid cannot be reused before it is reaped, so one seen unregistered
/// and still unregistered under the lock is an orphan's.
pub fn reap_orphans() -> usize {
    let found = children();
    let map = spawned();
    let mut reaped = 0;
    for (pid, state) in found {
        if state == 'Z'
            && !map.contains_key(&pid)
            && waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)).is_ok()
        {
            reaped += 1;
        }
    }
    reaped
}

/// Stops every orphan left (at exit); returns how many were signalled.
pub fn stop_orphans() -> usize {
    let found = children();
    let map = spawned();
    let mut stopped = 0;
    for (pid, state) in found {
        if state != 'Z' && !map.contains_key(&pid) && kill(Pid::from_raw(pid), Signal::SIGTERM).is_ok() {
            stopped += 1;
        }
    }
    stopped
}
