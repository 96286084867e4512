//! Tiny TCP peers for end-to-end tests: a server that answers every connection with its
//! name, and a client that connects from a chosen source address. Every wait is bounded.

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

/// Answers each connection with `name` and closes it. Stops when dropped.
pub struct NameServer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<u64>>>,
}

impl NameServer {
    /// Listens on `bind` inside `ns`; returns once the socket is listening.
    pub fn start(ns: &NetNs, bind: SocketAddr, name: &str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let name = name.to_owned();
        let handle = ns.spawn(move || {
            let listener = TcpListener::bind(bind).with_context(|| format!("binding {bind}"));
            let listener = match listener {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return Err(e);
                }
            };
            listener.set_nonblocking(true)?;
            let mut served = 0u64;
            while !flag.load(Ordering::Relaxed) {
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
        });
        match ready_rx.recv_timeout(IO_TIMEOUT) {
            Ok(Ok(())) => Ok(NameServer { stop, handle: Some(handle) }),
            Ok(Err(e)) => anyhow::bail!("server {bind}: {e}"),
            Err(_) => anyhow::bail!("server {bind} did not start"),
        }
    }

    /// Stops the server and returns how many connections it answered.
    pub fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| anyhow::anyhow!("server thread panicked"))?,
            None => Ok(0),
        }
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
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
