//! `http`: GET a path with a Host header; expect a status (one of a list) and optionally
//! a substring of the body.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::header::{CONNECTION, HOST, USER_AGENT};

use super::Report;

/// Bodies are read up to this size when a substring is expected.
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpCheck {
    pub port: Option<u16>,
    pub path: String,
    /// `Host` header; the server's address if `None`.
    pub host: Option<String>,
    /// Statuses that pass.
    pub expect_status: Vec<u16>,
    pub expect_body: Option<String>,
}

pub async fn check(h: &HttpCheck, addr: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> Report {
    match tokio::time::timeout(timeout, get(h, addr, source, timeout)).await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => Report::critical(e),
        Err(_) => Report::critical(format!("GET http://{addr}{}: no answer within {timeout:?}", h.path)),
    }
}

async fn get(
    h: &HttpCheck,
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<Report, String> {
    let url = format!("http://{addr}{}", h.path);
    let stream = super::tcp::connect(addr, source, timeout).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    // The connection task ends with the response (Connection: close) or when dropped.
    let driver = tokio::spawn(conn);
    let host = h.host.clone().unwrap_or_else(|| addr.to_string());
    let request = hyper::Request::get(h.path.as_str())
        .header(HOST, host)
        .header(USER_AGENT, concat!("lb-daemon/", env!("CARGO_PKG_VERSION")))
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("GET {url}: {e}"))?;
    let result = async {
        let response = sender.send_request(request).await.map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status().as_u16();
        if !h.expect_status.contains(&status) {
            return Ok(Report::critical(format!(
                "GET {url}: status {status}, expected {:?}",
                h.expect_status
            )));
        }
        let Some(needle) = &h.expect_body else {
            return Ok(Report::ok(format!("GET {url}: {status}")));
        };
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("GET {url}: reading the body: {e}"))?
            .to_bytes();
        if body.windows(needle.len().max(1)).any(|w| w == needle.as_bytes()) {
            Ok(Report::ok(format!("GET {url}: {status}, body has {needle:?}")))
        } else {
            Ok(Report::critical(format!("GET {url}: {status}, but the body lacks {needle:?}")))
        }
    }
    .await;
    driver.abort();
    result
}
