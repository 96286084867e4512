//! Test harness: network namespaces that clean up after themselves, and helpers to run
//! code inside them.
//!
//! A network namespace is a per-thread attribute on Linux, so code "inside" a namespace
//! runs on a thread that called `setns`; sockets and XDP attachments made there stay in
//! that namespace. Namespaces get unique names (prefix, pid, counter) so tests can run in
//! parallel, and are deleted on drop, on panic too.

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, setns};

pub mod bird;
pub mod daemon;
pub mod fixture;
pub mod lab;
pub mod model;
pub mod site;
pub mod tcp;
pub mod test_object;
pub mod topology;
pub mod two_directors;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted (with every interface in it) when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

/// Runs a command; fails with its stderr if it exits non-zero.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A name unique to this process and call, at most 15 bytes (interface name limit).
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
    name.chars().take(15).collect()
}

impl NetNs {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique_name(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A link toward hosts that do not exist: a veth pair `link`/`peer`, both up, with
    /// `addrs` on `link` and each `(address, mac)` of `neighbours` a permanent neighbour
    /// there, so that the kernel's FIB answers for them as for real next hops.
    pub fn stub_link(
        &self,
        link: &str,
        peer: &str,
        addrs: &[&str],
        neighbours: &[(&str, &str)],
    ) -> Result<()> {
        self.ip(&["link", "add", link, "type", "veth", "peer", "name", peer])?;
        for dev in [link, peer, "lo"] {
            self.ip(&["link", "set", dev, "up"])?;
        }
        for a in addrs {
            self.ip(&["addr", "add", a, "dev", link, "nodad"])?;
        }
        for (addr, mac) in neighbours {
            self.ip(&["neigh", "add", addr, "lladdr", mac, "dev", link, "nud", "permanent"])?;
        }
        Ok(())
    }

    /// The MAC address of interface `link` in this namespace.
    pub fn mac(&self, link: &str) -> Result<[u8; 6]> {
        let out = self.exec(&["cat", &format!("/sys/class/net/{link}/address")])?;
        let bytes: Vec<u8> = out
            .trim()
            .split(':')
            .map(|h| u8::from_str_radix(h, 16))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("MAC of {link}: {out}: {e}"))?;
        bytes.try_into().map_err(|_| anyhow::anyhow!("MAC of {link}: {out}"))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]).map(drop)
    }

    /// Runs `f` on a new thread inside the namespace and waits for its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        self.spawn(f).join().map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }

    /// Runs `f` on a scoped thread inside the namespace (XDP attachments and interface
    /// names are per namespace), so that it may borrow from the caller.
    pub fn scoped<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&self.name)?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a thread in {} panicked", self.name))?
        })
    }

    /// Starts `f` on a new thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name)?;
            f()
        })
    }
}

/// Runs the calling thread on CPU `cpu` only: BPF_PROG_TEST_RUN and map updates act on
/// the caller's CPU, so per-CPU state (wrr cursors, LRU lists, flood windows) is then
/// that one CPU's.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// Moves the calling thread into the named namespace. Only for threads made for it.
pub fn enter(name: &str) -> Result<()> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    setns(file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Connects two namespaces with a veth pair and returns the two interface names.
pub fn veth(a: &NetNs, b: &NetNs, prefix: &str) -> Result<(String, String)> {
    veth_named(a, b, &unique_name(&format!("{prefix}a")), &unique_name(&format!("{prefix}b")))
}

/// A veth pair with chosen names: names are per namespace, so a fixed name (the one a
/// config file refers to) is fine inside a test's own namespace.
pub fn veth_named(a: &NetNs, b: &NetNs, name_a: &str, name_b: &str) -> Result<(String, String)> {
    let (name_a, name_b) = (name_a.to_owned(), name_b.to_owned());
    run(
        "ip",
        &[
            "link",
            "add",
            &name_a,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &name_b,
            "netns",
            b.name(),
        ],
    )?;
    a.ip(&["link", "set", &name_a, "up"])?;
    b.ip(&["link", "set", &name_b, "up"])?;
    Ok((name_a, name_b))
}
