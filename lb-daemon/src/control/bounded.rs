//! The accept loop both listeners share, bounded like anything facing other processes: a
//! connection limit, and an accept loop that backs off when the director is out of
//! descriptors instead of spinning. An unprivileged local user holding thousands of idle
//! connections costs the daemon a fixed number of descriptors, so the health checks
//! always have theirs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Accepts connections, at most `max` open at a time, and runs `serve` on each on a task of
/// its own. An accept error (out of descriptors) is logged and retried after a pause that
/// doubles up to a second.
pub(super) async fn serve_bounded<S, A, AF, H, HF>(what: &'static str, max: usize, mut accept: A, serve: H)
where
    A: FnMut() -> AF,
    AF: Future<Output = std::io::Result<S>>,
    H: Fn(S) -> HF,
    HF: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let mut backoff = Duration::from_millis(10);
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
        match accept().await {
            Ok(stream) => {
                backoff = Duration::from_millis(10);
                let connection = serve(stream);
                tokio::spawn(async move {
                    connection.await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "{what}: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
