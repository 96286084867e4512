//! The Prometheus endpoint: `GET /metrics` over HTTP/1 (hyper), bounded in connections,
//! header size, header time and connection lifetime.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};
use tokio::net::TcpListener;

use super::bounded::serve_bounded;
use super::status::{Views, snapshot_of};

/// Scrapes served at once; more wait in the kernel's backlog.
pub const METRICS_MAX_CONNECTIONS: usize = 64;
/// A scraper sends its request head at once; a connection that has not within this is
/// closed (the same bound holds for an idle kept-alive connection).
pub(super) const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a metrics connection lives, however busy.
pub(super) const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Request heads larger than this are refused (hyper's smallest read buffer).
pub(super) const METRICS_MAX_HEAD: usize = 8192;

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

pub(super) async fn answer_metrics<B>(views: &Views, req: &Request<B>) -> Response<Full<Bytes>> {
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
