//! Tiny TCP peers for end-to-end tests: a server that answers every connection with its
//! name, an echo server, long-lived client conversations, and a client that connects from
//! a chosen source address. Each runs on a [`Worker`] thread. Every wait is bounded.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result};
use socket2::{Domain, Socket, Type};

use crate::NetNs;

pub const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// A thread inside a namespace that says when it is set up, runs until told to stop (its
/// body polls the flag it is given), and is stopped and joined on drop.
pub struct Worker<T> {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<T>>>,
}

/// Handed to a worker's body: call `ready` once set up.
pub struct Ready(std::sync::mpsc::Sender<std::result::Result<(), String>>);

impl Ready {
    pub fn ready(&self) {
        let _ = self.0.send(Ok(()));
    }
}

impl<T: Send + 'static> Worker<T> {
    /// Starts `body` in `ns`; returns once it called `ready`, or its error if it failed
    /// before (or nothing came within `limit`).
    pub fn start(
        ns: &NetNs,
        what: &str,
        limit: Duration,
        body: impl FnOnce(&Ready, &AtomicBool) -> Result<T> + Send + 'static,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let handle = ns.spawn(move || {
            let ready = Ready(tx);
            let result = body(&ready, &flag);
            if let Err(e) = &result {
                // Ignored once the starter has stopped listening (it was ready then).
                let _ = ready.0.send(Err(format!("{e:#}")));
            }
            result
        });
        match rx.recv_timeout(limit) {
            Ok(Ok(())) => Ok(Worker { stop, handle: Some(handle) }),
            Ok(Err(e)) => anyhow::bail!("{what}: {e}"),
            Err(_) => anyhow::bail!("{what} did not start within {limit:?}"),
        }
    }

    /// Whether the body has returned (an error, or its own end).
    pub fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Tells the body to stop and returns what it returned.
    pub fn stop(mut self) -> Result<T> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| anyhow::anyhow!("worker thread panicked"))?,
            None => anyhow::bail!("already stopped"),
        }
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Answers each connection with `name` and closes it. Stops when dropped.
pub struct NameServer(Worker<u64>);

impl NameServer {
    /// Listens on `bind` inside `ns`; returns once the socket is listening.
    pub fn start(ns: &NetNs, bind: SocketAddr, name: &str) -> Result<Self> {
        let name = name.to_owned();
        let worker = Worker::start(ns, &format!("server {bind}"), IO_TIMEOUT, move |ready, stop| {
            let listener = TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?;
            ready.ready();
            listener.set_nonblocking(true)?;
            let mut served = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false)?;
                        s.set_write_timeout(Some(IO_TIMEOUT))?;
                        // A client that went away is its own test's failure, not ours.
                        let _ = s.write_all(name.as_bytes());
                        served += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(served)
        })?;
        Ok(NameServer(worker))
    }

    /// Stops the server and returns how many connections it answered.
    pub fn stop(self) -> Result<u64> {
        self.0.stop()
    }
}

/// Connects from `src` to `dst` (in the calling thread's namespace) and reads the answer.
pub fn fetch_from(src: IpAddr, dst: SocketAddr) -> Result<String> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(src, 0).into()).with_context(|| format!("binding {src}"))?;
    socket.connect_timeout(&dst.into(), IO_TIMEOUT).with_context(|| format!("{src} -> {dst}"))?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).with_context(|| format!("reading {src} -> {dst}"))?;
    Ok(answer)
}

/// Echoes whatever each connection sends, for long-lived connections. One thread serves
/// every connection (non-blocking sockets). Stops when dropped.
pub struct EchoServer(Worker<u64>);

impl EchoServer {
    pub fn start(ns: &NetNs, bind: SocketAddr) -> Result<Self> {
        let worker = Worker::start(ns, &format!("echo server {bind}"), IO_TIMEOUT, move |ready, stop| {
            let listener = TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?;
            ready.ready();
            listener.set_nonblocking(true)?;
            let mut conns: Vec<TcpStream> = Vec::new();
            let mut accepted = 0u64;
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let mut idle = true;
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(true)?;
                        conns.push(s);
                        accepted += 1;
                        idle = false;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
                let mut closed = Vec::new();
                for (i, c) in conns.iter_mut().enumerate() {
                    match c.read(&mut buf) {
                        Ok(0) => closed.push(i),
                        Ok(n) => {
                            idle = false;
                            // Small messages into an empty socket buffer: the write fits.
                            c.set_nonblocking(false)?;
                            c.set_write_timeout(Some(IO_TIMEOUT))?;
                            let written = c.write_all(&buf[..n]);
                            c.set_nonblocking(true)?;
                            if written.is_err() {
                                closed.push(i);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => closed.push(i),
                    }
                }
                for i in closed.into_iter().rev() {
                    conns.swap_remove(i);
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Ok(accepted)
        })?;
        Ok(EchoServer(worker))
    }

    /// One on `port` of every namespace in `hosts` (the real servers of a lab).
    pub fn on_each(hosts: &[NetNs], port: u16) -> Result<Vec<EchoServer>> {
        hosts.iter().map(|ns| EchoServer::start(ns, SocketAddr::from(([0, 0, 0, 0], port)))).collect()
    }

    /// Stops the server; returns how many connections it accepted.
    pub fn stop(self) -> Result<u64> {
        self.0.stop()
    }
}

/// Long-lived connections that each exchange one message per period with an echo
/// server, until stopped or `max_rounds`; the first error (a reset, a timeout, a wrong
/// echo) ends them and is reported.
pub struct Conversations {
    worker: Worker<ConversationReport>,
    rounds: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConversationReport {
    pub connections: usize,
    pub rounds: u64,
    /// Messages echoed correctly, over all connections.
    pub exchanges: u64,
}

impl Conversations {
    /// Opens `count` connections to `dst` from `sources` (round robin) inside `ns`.
    pub fn start(
        ns: &NetNs,
        sources: Vec<IpAddr>,
        dst: SocketAddr,
        count: usize,
        period: Duration,
        max_rounds: u64,
    ) -> Result<Self> {
        let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let done = rounds.clone();
        let worker =
            Worker::start(ns, "opening the connections", Duration::from_secs(30), move |ready, stop| {
                let mut conns = Vec::with_capacity(count);
                for i in 0..count {
                    let src = sources[i % sources.len()];
                    let opened = (|| -> Result<TcpStream> {
                        let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
                        socket.bind(&SocketAddr::new(src, 0).into())?;
                        socket.connect_timeout(&dst.into(), IO_TIMEOUT)?;
                        let s: TcpStream = socket.into();
                        s.set_read_timeout(Some(IO_TIMEOUT))?;
                        s.set_write_timeout(Some(IO_TIMEOUT))?;
                        s.set_nodelay(true)?;
                        Ok(s)
                    })()
                    .with_context(|| format!("connection {i} from {src} to {dst}"));
                    conns.push(opened?);
                }
                ready.ready();
                let mut exchanges = 0u64;
                let mut round = 0u64;
                let mut answer = Vec::new();
                while !stop.load(Ordering::Relaxed) && round < max_rounds {
                    let started = std::time::Instant::now();
                    for (i, c) in conns.iter_mut().enumerate() {
                        let msg = format!("connection {i} round {round}\n");
                        let exchange = (|| -> std::io::Result<()> {
                            c.write_all(msg.as_bytes())?;
                            answer.resize(msg.len(), 0);
                            c.read_exact(&mut answer)
                        })();
                        exchange.with_context(|| {
                            format!("connection {i} (from {:?}), round {round}", c.local_addr())
                        })?;
                        anyhow::ensure!(answer == msg.as_bytes(), "connection {i} round {round}: wrong echo");
                        exchanges += 1;
                    }
                    round += 1;
                    done.store(round, Ordering::Relaxed);
                    if let Some(rest) = period.checked_sub(started.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
                Ok(ConversationReport { connections: conns.len(), rounds: round, exchanges })
            })?;
        Ok(Conversations { worker, rounds })
    }

    /// Rounds completed so far by every connection.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Whether the conversations ended early (an error, or `max_rounds`).
    pub fn finished(&self) -> bool {
        self.worker.finished()
    }

    /// Waits (bounded) until `n` more rounds have completed; false if they ended first.
    pub fn wait_rounds(&self, n: u64, limit: Duration) -> bool {
        let target = self.rounds() + n;
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if self.rounds() >= target {
                return true;
            }
            if self.finished() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn stop(self) -> Result<ConversationReport> {
        self.worker.stop()
    }
}
