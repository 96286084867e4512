//! `http` and `https`: GET a path with a Host header; expect a status (one of a list) and
//! optionally a substring of the body. `https` is the same over TLS, with the Host (when
//! it is a name) as the server name to verify and send in SNI.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::header::{CONNECTION, HOST, USER_AGENT};

use super::spec::HttpCheck;
use super::{ProbeError, Report};

/// Bodies are read up to this size when a substring is expected.
pub const MAX_BODY: usize = 64 * 1024;

/// A connection hyper can speak HTTP/1 over: plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The name to verify the certificate against: the Host if it is a name (a port after
/// it left off), else the server's address.
fn server_name(h: &HttpCheck, addr: SocketAddr) -> rustls_pki_types::ServerName<'static> {
    let host = h.host.as_deref().map(|host| match host.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() && !name.contains(':') => name,
        _ => host,
    });
    host.and_then(|name| rustls_pki_types::ServerName::try_from(name.to_owned()).ok())
        .unwrap_or_else(|| addr.ip().into())
}

async fn connect(
    h: &HttpCheck,
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<Box<dyn Io>, ProbeError> {
    let stream = super::tcp::connect(addr, source, timeout).await?;
    let Some(tls) = &h.tls else { return Ok(Box::new(stream)) };
    // Not the backend's fault: a CA file that went missing since the config was loaded.
    let config = super::tls::client_config(tls).map_err(|e| ProbeError::Director(e.to_string()))?;
    let name = server_name(h, addr);
    let connector = tokio_rustls::TlsConnector::from(config);
    match connector.connect(name.clone(), stream).await {
        Ok(s) => Ok(Box::new(s)),
        Err(e) => Err(ProbeError::Backend(format!("TLS handshake with {addr} as {}: {e}", name.to_str()))),
    }
}

pub async fn check(h: &HttpCheck, addr: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> Report {
    match tokio::time::timeout(timeout, get(h, addr, source, timeout)).await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => e.report(),
        Err(_) => Report::critical(format!("GET {}: no answer within {timeout:?}", url(h, addr))),
    }
}

fn url(h: &HttpCheck, addr: SocketAddr) -> String {
    format!("{}://{addr}{}", if h.tls.is_some() { "https" } else { "http" }, h.path)
}

async fn get(
    h: &HttpCheck,
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<Report, ProbeError> {
    let url = url(h, addr);
    let stream = connect(h, addr, source, timeout).await?;
    let failed = |e: &dyn std::fmt::Display| ProbeError::Backend(format!("GET {url}: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| failed(&e))?;
    // The connection task ends with the response (Connection: close) or when dropped.
    let driver = tokio::spawn(conn);
    let host = h.host.clone().unwrap_or_else(|| addr.to_string());
    let request = hyper::Request::get(h.path.as_str())
        .header(HOST, host)
        .header(USER_AGENT, concat!("lb-daemon/", env!("CARGO_PKG_VERSION")))
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(&e))?;
    let result = async {
        let response = sender.send_request(request).await.map_err(|e| failed(&e))?;
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
            .map_err(|e| failed(&format_args!("reading the body: {e}")))?
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
