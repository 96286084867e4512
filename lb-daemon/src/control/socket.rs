//! The control socket: one request line, one answer; the server, bounded like the
//! metrics endpoint, and the client the CLI uses. Requests: `status`, `status json`,
//! `metrics`, and the overrides' (`drain web 10.0.2.11`, see `overrides`). An answer
//! that starts with `error: ` is a refusal.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::bounded::serve_bounded;
use super::overrides::parse_request;
use super::status::{Views, shape_of, snapshot_of};
use super::{ControlError, Result, io, lock};

/// Connections the control socket serves at once; more wait in the kernel's backlog.
pub const CONTROL_MAX_CONNECTIONS: usize = 64;
/// A request is one short line; anything longer is not one.
pub(super) const CONTROL_MAX_REQUEST: u64 = 256;
pub(super) const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The control socket speaks one request line and one answer.
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
                "status json" => snapshot_of(&views).await.and_then(|s| Ok(crate::status_json::render(&s)?)),
                "metrics" => snapshot_of(&views).await.and_then(|s| Ok(crate::metrics::render(&s)?)),
                "connections json" => {
                    shape_of(&views).await.and_then(|s| Ok(crate::status_json::render_connections(&s)?))
                }
                _ if !line.ends_with(b"\n") && line.len() as u64 >= CONTROL_MAX_REQUEST => {
                    Ok(format!("error: request longer than {CONTROL_MAX_REQUEST} bytes\n"))
                }
                other => match parse_request(other) {
                    Some(Ok(request)) => {
                        let daemon = Arc::clone(&views.daemon);
                        super::blocking("override task", move || lock(&daemon).override_request(&request)).await
                    }
                    Some(Err(usage)) => Ok(format!("error: {usage}\n")),
                    None => Ok(format!(
                        "error: unknown request `{}` (try status, status json, connections json, metrics, drain, disable, enable, weight, overrides clear)\n",
                        crate::config::shorten(other)
                    )),
                },
            };
            let text = answer.unwrap_or_else(|e| format!("error: {}\n", crate::error_chain(&e)));
            let _ = tokio::time::timeout(CONTROL_READ_TIMEOUT, write.write_all(text.as_bytes())).await;
        }
    })
    .await;
}

/// Asks a running daemon over its control socket; its refusal (`error: ...`) is an error.
pub async fn command(socket: &Path, what: &str) -> Result<String> {
    let answer = request(socket, what).await?;
    match answer.strip_prefix("error: ") {
        Some(why) => Err(ControlError::Refused(why.trim_end().to_owned())),
        None if answer.is_empty() => Err(ControlError::Refused("no answer (the daemon stopped?)".into())),
        None => Ok(answer),
    }
}

/// Asks a running daemon over its control socket.
pub async fn request(socket: &Path, what: &str) -> Result<String> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ControlError::NotRunning { path: socket.to_owned(), source })?;
    stream.write_all(format!("{what}\n").as_bytes()).await.map_err(io("writing the request"))?;
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut out).await.map_err(io("reading the answer"))?;
    Ok(out)
}

pub(super) async fn bind_control_socket(path: &Path) -> Result<UnixListener> {
    match UnixStream::connect(path).await {
        Ok(_) => return Err(ControlError::AlreadyRunning(path.to_owned())),
        // Someone else's socket (a daemon running as root, for one): say so, rather than
        // fail later with "address in use" when it cannot be replaced.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(ControlError::Io {
                what: format!("opening {} (run as root?)", path.display()),
                source: e,
            });
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    // Left by a daemon that was killed: nobody answers on it (checked above).
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ControlError::Io {
                what: format!("removing the stale {}", path.display()),
                source: e,
            });
        }
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("restricting {}", path.display())))?;
    Ok(listener)
}
