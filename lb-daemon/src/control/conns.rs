//! Connection counts (per backend, active and inactive) from a walk of the connection
//! table. The walk reads the table's memory (64 MB for a million flows): it runs outside
//! the daemon's lock, so that reloads, health changes and the watchdog never wait for it,
//! and its result serves every scrape and status request for a few seconds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dataplane::FlowReader;
use crate::snapshot::{ConnKind, classify, flow_clock_ns};

use super::{ControlError, Result};

/// How long one walk's counts are served.
pub const CONN_COUNT_TTL: Duration = Duration::from_secs(3);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnCounts {
    /// Backend id -> (active, inactive).
    pub by_backend: HashMap<u32, (u64, u64)>,
    pub entries: u64,
    /// When the walk started: what it counts is at least this fresh.
    pub walked_at: Option<Instant>,
}

pub struct ConnCounter {
    reader: Arc<FlowReader>,
    /// Held across a walk: callers that arrive meanwhile wait for its result instead of
    /// starting walks of their own.
    cache: tokio::sync::Mutex<Option<(Instant, Arc<ConnCounts>)>>,
}

impl ConnCounter {
    pub fn new(reader: FlowReader) -> Self {
        ConnCounter { reader: Arc::new(reader), cache: tokio::sync::Mutex::new(None) }
    }

    /// Counts at most [`CONN_COUNT_TTL`] old.
    pub async fn counts(&self) -> Result<Arc<ConnCounts>> {
        let mut cache = self.cache.lock().await;
        if let Some((at, counts)) = cache.as_ref()
            && at.elapsed() < CONN_COUNT_TTL
        {
            return Ok(Arc::clone(counts));
        }
        let reader = Arc::clone(&self.reader);
        let counts = super::blocking("counting connections", move || walk(&reader)).await?;
        let counts = Arc::new(counts);
        *cache = Some((Instant::now(), Arc::clone(&counts)));
        Ok(counts)
    }
}

fn walk(reader: &FlowReader) -> Result<ConnCounts> {
    let walked_at = Some(Instant::now());
    let now =
        flow_clock_ns().map_err(|source| ControlError::Io { what: "reading the clock".into(), source })?;
    let mut counts = ConnCounts { walked_at, ..Default::default() };
    counts.entries = reader.for_each(|_, flow| {
        let c = counts.by_backend.entry(flow.backend).or_default();
        match classify(flow, now) {
            Some(ConnKind::Active) => c.0 += 1,
            Some(ConnKind::Inactive) => c.1 += 1,
            None => {}
        }
    });
    Ok(counts)
}
