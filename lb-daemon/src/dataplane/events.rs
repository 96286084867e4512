//! The connection log's ring buffer, read from outside the `Dataplane` (a task of its own
//! drains it while the daemon's lock is free for everything else).

use aya::maps::RingBuf;
use lb_common::ConnEvent;

use super::*;

/// A handle of its own on `CONN_EVENTS`.
pub struct ConnEventReader {
    ring: RingBuf<MapData>,
}

impl ConnEventReader {
    /// Hands at most `max` waiting events to `visit`; says how many there were. Records of
    /// another size (none the program writes) are skipped.
    pub fn drain(&mut self, max: usize, mut visit: impl FnMut(ConnEvent)) -> usize {
        let mut n = 0;
        while n < max {
            let Some(item) = self.ring.next() else { break };
            if item.len() == std::mem::size_of::<ConnEvent>() {
                // SAFETY: a record the program wrote as one `ConnEvent` (plain integers:
                // any bytes are a valid value), read unaligned.
                visit(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ConnEvent>()) });
            }
            n += 1;
        }
        n
    }
}

impl std::os::fd::AsRawFd for ConnEventReader {
    /// Readable (epoll) when events are waiting.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

impl Dataplane {
    /// The connection log's reader. The ring buffer is this process's (it is not pinned):
    /// a restarted daemon reads its own program's.
    pub fn conn_event_reader(&mut self) -> Result<ConnEventReader> {
        let map =
            self.ebpf.take_map(maps::CONN_EVENTS).ok_or(DataplaneError::MissingMap(maps::CONN_EVENTS))?;
        let ring = RingBuf::try_from(map).map_err(map_err(maps::CONN_EVENTS))?;
        Ok(ConnEventReader { ring })
    }
}
