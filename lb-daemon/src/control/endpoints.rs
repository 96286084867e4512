//! The daemon's two listeners, the metrics endpoint (HTTP) and the control socket (one
//! request line), bounded like anything facing other processes: a connection limit, a
//! read timeout and a request size limit each, and an accept loop that backs off when the
//! director is out of descriptors instead of spinning. An unprivileged local user holding
//! thousands of idle connections costs the daemon a fixed number of descriptors, so the
//! health checks always have theirs.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, UnixListener};

use super::{Views, snapshot_of};

/// Scrapes served at once; more wait in the kernel's backlog.
pub const METRICS_MAX_CONNECTIONS: usize = 64;
/// A scraper sends its request head at once; a connection that has not within this is
/// closed (the same bound holds for an idle kept-alive connection).
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a metrics connection lives, however busy.
const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Request heads larger than this are refused (hyper's smallest read buffer).
const METRICS_MAX_HEAD: usize = 8192;

/// Connections the control socket serves at once; more wait in the kernel's backlog.
pub const CONTROL_MAX_CONNECTIONS: usize = 64;
/// A request is one short line; anything longer is not one.
const CONTROL_MAX_REQUEST: u64 = 256;
const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections, at most `max` open at a time, and runs `serve` on each on a task of
/// its own. An accept error (out of descriptors) is logged and retried after a pause that
/// doubles up to a second.
async fn serve_bounded<S, A, AF, H, HF>(what: &'static str, max: usize, mut accept: A, serve: H)
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

/// `GET /metrics` over HTTP/1.1.
pub(super) async fn serve_metrics(views: Arc<Views>, listener: TcpListener) {
    let accept = || async { listener.accept().await.map(|(s, _)| s) };
    serve_bounded("metrics endpoint", METRICS_MAX_CONNECTIONS, accept, |stream| {
        let views = Arc::clone(&views);
        async move {
            let service = hyper::service::service_fn(move |req| {
                let views = Arc::clone(&views);
                async move { Ok::<_, Infallible>(answer_metrics(&views, &req).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .max_buf_size(METRICS_MAX_HEAD)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A peer that reads its answer slowly, or keeps asking, still goes in the end.
            let _ = tokio::time::timeout(METRICS_CONNECTION_LIFETIME, connection).await;
        }
    })
    .await;
}

async fn answer_metrics<B>(views: &Views, req: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "only /metrics is here\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET /metrics\n".into());
    }
    match snapshot_of(views).await.and_then(|s| Ok(crate::metrics::render(&s)?)) {
        Ok(text) => reply(StatusCode::OK, "text/plain; version=0.0.4", text),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", crate::error_chain(&e)),
    }
}

/// The control socket speaks one request line and one answer: `status` or `metrics`.
pub(super) async fn serve_control(views: Arc<Views>, listener: UnixListener) {
    let accept = || async { listener.accept().await.map(|(s, _)| s) };
    serve_bounded("control socket", CONTROL_MAX_CONNECTIONS, accept, |stream| {
        let views = Arc::clone(&views);
        async move {
            let (read, mut write) = stream.into_split();
            let mut line = Vec::new();
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, CONTROL_MAX_REQUEST));
            let read = reader.read_until(b'\n', &mut line);
            if !matches!(tokio::time::timeout(CONTROL_READ_TIMEOUT, read).await, Ok(Ok(_))) {
                return;
            }
            let answer = match String::from_utf8_lossy(&line).trim() {
                "status" => snapshot_of(&views).await.map(|s| s.status_table()),
                "metrics" => snapshot_of(&views).await.and_then(|s| Ok(crate::metrics::render(&s)?)),
                _ if !line.ends_with(b"\n") && line.len() as u64 >= CONTROL_MAX_REQUEST => {
                    Ok(format!("error: request longer than {CONTROL_MAX_REQUEST} bytes\n"))
                }
                other => Ok(format!(
                    "error: unknown request `{}` (try status or metrics)\n",
                    crate::config::shorten(other)
                )),
            };
            let text = answer.unwrap_or_else(|e| format!("error: {}\n", crate::error_chain(&e)));
            let _ = tokio::time::timeout(CONTROL_READ_TIMEOUT, write.write_all(text.as_bytes())).await;
        }
    })
    .await;
}
