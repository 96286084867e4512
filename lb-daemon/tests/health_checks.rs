//! Each checker against real local servers on loopback: a TCP listener, an HTTP server
//! answering 200 then 500, plugins exiting 0/1/2/3 and printing weights, and servers that
//! never answer (the check ends at its timeout).

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use lb_daemon::health::spec::HttpCheck;
use lb_daemon::health::spec::{CheckKind, CheckSpec};
use lb_daemon::health::state::Outcome;
use lb_daemon::health::{Report, Target, run};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn target(port: Option<u16>) -> Target {
    Target { service: "web".into(), addr: LOCAL, port, tunnel: None }
}

fn spec(kind: CheckKind, timeout_ms: u64) -> CheckSpec {
    CheckSpec { kind, timeout: Duration::from_millis(timeout_ms), source: None, via_tunnel: None }
}

fn check(kind: CheckKind, port: Option<u16>, timeout_ms: u64) -> (Report, Duration) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(run(&spec(kind, timeout_ms), &target(port)))
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    TcpListener::bind((LOCAL, 0)).unwrap().local_addr().unwrap().port()
}

#[test]
fn tcp_passes_on_a_listener_and_fails_on_a_closed_port() {
    let l = TcpListener::bind((LOCAL, 0)).unwrap();
    let (r, _) = check(CheckKind::Tcp { port: None }, Some(l.local_addr().unwrap().port()), 1000);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    let (r, _) = check(CheckKind::Tcp { port: Some(closed_port()) }, Some(1), 1000);
    assert_eq!(r.outcome, Outcome::Critical);
    assert!(r.message.contains("refused"), "{r:?}");
}

#[test]
fn tcp_times_out_on_a_server_whose_queue_is_full() {
    // A listener with a full accept queue drops further SYNs: the connect never completes.
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&SocketAddr::new(LOCAL, 0).into()).unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr.into());
        fillers.push(s);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (r, _) = check(CheckKind::Tcp { port: None }, Some(addr.port()), 300);
    assert_eq!(r.outcome, Outcome::Critical, "{r:?}");
    assert!(r.message.contains("no answer within"), "{r:?}");
}

/// Serves `answers` in order, one connection each; returns the port.
fn http_server(answers: Vec<(u16, &'static str)>) -> u16 {
    let l = TcpListener::bind((LOCAL, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (status, body) in answers {
            let Ok((mut s, _)) = l.accept() else { return };
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut req = [0u8; 2048];
            let n = s.read(&mut req).unwrap_or(0);
            let req = String::from_utf8_lossy(&req[..n]).to_string();
            // Echo the request line and Host into the body so the test can see them.
            let seen = req.lines().take(2).collect::<Vec<_>>().join(" / ");
            let body = format!("{body}\n{seen}\n");
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

fn http(path: &str, host: Option<&str>, expect_body: Option<&str>) -> CheckKind {
    CheckKind::Http(HttpCheck {
        port: None,
        path: path.into(),
        host: host.map(str::to_owned),
        expect_status: vec![200, 204],
        expect_body: expect_body.map(str::to_owned),
        tls: None,
    })
}

/// A CA and a certificate it signed for `localhost` and 127.0.0.1: (CA PEM, leaf, key).
fn test_pki() -> (String, rustls_pki_types::CertificateDer<'static>, rustls_pki_types::PrivateKeyDer<'static>)
{
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    (ca.pem(), leaf.der().clone(), key)
}

/// Answers every TLS connection with 200 "healthy" (handshakes that fail are dropped).
fn https_server(
    cert: rustls_pki_types::CertificateDer<'static>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    connections: usize,
) -> u16 {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let config = std::sync::Arc::new(config);
    let l = TcpListener::bind((LOCAL, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for _ in 0..connections {
            let Ok((tcp, _)) = l.accept() else { return };
            tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut req = [0u8; 2048];
            if tls.read(&mut req).is_err() {
                continue;
            }
            let _ = write!(tls, "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nhealthy");
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    port
}

fn https(host: Option<&str>, verify: bool, ca_file: Option<&std::path::Path>) -> CheckKind {
    let CheckKind::Http(mut h) = http("/", host, Some("healthy")) else { unreachable!() };
    h.tls = Some(lb_daemon::health::spec::TlsSpec { verify, ca_file: ca_file.map(Into::into) });
    CheckKind::Http(h)
}

#[test]
fn https_verifies_against_a_ca_file_and_can_opt_out() {
    let (ca_pem, cert, key) = test_pki();
    let ca_file = std::env::temp_dir().join(format!("lb-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca_pem).unwrap();
    let port = https_server(cert, key, 5);
    let (r, _) = check(https(Some("localhost"), true, Some(&ca_file)), Some(port), 2000);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    assert!(r.message.starts_with("GET https://127.0.0.1:"), "{r:?}");
    // No host: the certificate must name the address.
    let (r, _) = check(https(None, true, Some(&ca_file)), Some(port), 2000);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    let (r, _) = check(https(Some("www.example:443"), true, Some(&ca_file)), Some(port), 2000);
    assert_eq!(r.outcome, Outcome::Critical);
    assert!(r.message.contains("TLS handshake") && r.message.contains("www.example"), "{r:?}");
    // The system's roots do not know this CA.
    let (r, _) = check(https(Some("localhost"), true, None), Some(port), 2000);
    assert_eq!(r.outcome, Outcome::Critical);
    assert!(r.message.contains("UnknownIssuer"), "{r:?}");
    let (r, _) = check(https(Some("www.example"), false, None), Some(port), 2000);
    assert_eq!(r.outcome, Outcome::Ok, "verification off: {r:?}");
    let _ = std::fs::remove_file(&ca_file);
}

#[test]
fn http_status_body_and_host_header() {
    let port = http_server(vec![(200, "healthy"), (500, "broken"), (200, "degraded"), (200, "x")]);
    let (r, _) = check(http("/health", Some("www.example"), Some("healthy")), Some(port), 2000);
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
    let (r, _) = check(http("/health", None, None), Some(port), 2000);
    assert_eq!(r.outcome, Outcome::Critical);
    assert!(r.message.contains("status 500"), "{r:?}");
    let (r, _) = check(http("/health", None, Some("healthy")), Some(port), 2000);
    assert_eq!(r.outcome, Outcome::Critical);
    assert!(r.message.contains("lacks \"healthy\""), "{r:?}");
    // The request line and Host header the server saw.
    let (r, _) = check(
        http("/status?full", Some("www.example"), Some("GET /status?full HTTP/1.1 / host: www.example")),
        Some(port),
        2000,
    );
    assert_eq!(r.outcome, Outcome::Ok, "{r:?}");
}

#[test]
fn http_times_out_on_a_server_that_never_answers() {
    let l = TcpListener::bind((LOCAL, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    // Accepts, reads, never answers.
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        std::thread::sleep(Duration::from_secs(3));
    });
    let (r, _) = check(http("/", None, None), Some(port), 300);
    assert_eq!(r.outcome, Outcome::Critical, "{r:?}");
    assert!(r.message.contains("no answer within"), "{r:?}");
}

fn sh(script: &str) -> CheckKind {
    CheckKind::Exec { argv: vec!["/bin/sh".into(), "-c".into(), script.into()] }
}

#[test]
fn exec_follows_nagios_exit_codes_and_reads_weights() {
    for (code, want) in [
        (0, Outcome::Ok),
        (1, Outcome::Warning),
        (2, Outcome::Critical),
        (3, Outcome::Unknown),
        (7, Outcome::Unknown),
    ] {
        let (r, _) = check(
            sh(&format!(
                "echo '{} {code} weight=1{code}'; echo second line; exit {code}",
                want.name().to_uppercase()
            )),
            Some(80),
            2000,
        );
        assert_eq!(r.outcome, want, "exit {code}: {r:?}");
        assert_eq!(r.weight, Some(10 + code as u32), "exit {code}");
        let line = format!("{} {code} weight=1{code}", want.name().to_uppercase());
        // Outside 0-3 the exit status is no verdict of a plugin's: status says which it was.
        let message = if code > 3 { format!("/bin/sh: exit status {code} (output: {line})") } else { line };
        assert_eq!(r.message, message);
    }
    let (r, _) = check(sh("echo OK; exit 0"), None, 2000);
    assert_eq!((r.outcome, r.weight), (Outcome::Ok, None));
}

/// Issue 17: why a plugin (ssh) failed is in its error output, and status shows it; a
/// WARNING that no plugin wrote (a `nologin` shell's refusal, exit 1) is flagged.
#[test]
fn exec_reports_the_error_output_and_doubts_a_warning_no_plugin_wrote() {
    let (r, _) = check(
        sh("echo 'debug1: noise' >&2; echo 'Host key verification failed.' >&2; echo >&2; exit 255"),
        None,
        2000,
    );
    assert_eq!(r.outcome, Outcome::Unknown);
    assert_eq!(r.message, "/bin/sh: exit status 255: Host key verification failed.");
    // A verdict with output keeps the plugin's line; its error output is not needed.
    let (r, _) = check(sh("echo 'Warning: Permanently added' >&2; echo 'HTTP OK: 200'; exit 0"), None, 2000);
    assert_eq!((r.outcome, r.message.as_str(), r.doubt), (Outcome::Ok, "HTTP OK: 200", None));
    let (r, _) = check(sh("echo 'This account is currently not available.'; exit 1"), None, 2000);
    assert_eq!(r.outcome, Outcome::Warning);
    assert!(r.doubt.is_some(), "{r:?}");
    assert!(r.message.starts_with("This account is currently not available. [exit 1 (WARNING)"), "{r:?}");
    // A long error line is cut; a flood of error output is read only so far.
    let (r, _) = check(sh("head -c 200000 /dev/zero | tr '\\0' x >&2; exit 255"), None, 4000);
    assert!(r.message.len() < 300, "{} bytes", r.message.len());
}

#[test]
fn exec_sees_the_service_and_server_and_runs_no_shell_of_its_own() {
    let (r, _) = check(sh("echo \"$LB_SERVICE $LB_BACKEND $LB_BACKEND_PORT\""), Some(8080), 2000);
    assert_eq!(r.message, "web 127.0.0.1 8080");
    // An argv with shell syntax is passed as is: echo prints it, nothing expands it.
    let (r, _) = check(
        CheckKind::Exec { argv: vec!["/bin/echo".into(), "$LB_SERVICE;".into(), "exit 2".into()] },
        None,
        2000,
    );
    assert_eq!((r.outcome, r.message.as_str()), (Outcome::Ok, "$LB_SERVICE; exit 2"));
    let (r, _) = check(CheckKind::Exec { argv: vec!["/nonexistent/check".into()] }, None, 2000);
    assert_eq!(r.outcome, Outcome::Unknown);
    assert!(r.message.contains("/nonexistent/check"), "{r:?}");
}

#[test]
fn exec_timeout_kills_the_whole_process_group() {
    let marker = std::env::temp_dir().join(format!("lb-exec-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    // A plugin whose child would write the marker after 1 s, unless killed with it.
    let script = format!("(sleep 1; touch {}) & sleep 5", marker.display());
    let (r, _) = check(sh(&script), None, 200);
    assert_eq!(r.outcome, Outcome::Critical, "{r:?}");
    assert!(r.message.contains("no verdict within"), "{r:?}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!marker.exists(), "the plugin's child outlived the timeout");
}

#[test]
fn hooks_get_the_change_in_env_and_arguments_and_are_bounded() {
    use lb_daemon::health::board::Event;
    use lb_daemon::health::exec::Run;
    use lb_daemon::health::hooks::run as run_hook;
    use lb_daemon::health::spec::Hook;
    use lb_daemon::health::state::{Health, Transition};
    let event = Event {
        service: "web".into(),
        backend: "10.0.2.11".parse().unwrap(),
        transition: Transition { from: Health::Up, to: Health::Down },
        message: "connection refused".into(),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let hook = Hook {
        argv: [
            "/bin/sh",
            "-c",
            "echo \"$LB_SERVICE $LB_BACKEND $LB_OLD_STATE $LB_NEW_STATE $LB_CHECK_MESSAGE | $1\"",
            "hook",
            "{service}:{backend}:{from}>{to}",
        ]
        .map(String::from)
        .to_vec(),
        timeout: Duration::from_secs(5),
    };
    match rt.block_on(run_hook(&hook, &event)) {
        Run::Exited { code: Some(0), first_line, .. } => {
            assert_eq!(first_line, "web 10.0.2.11 up down connection refused | web:10.0.2.11:up>down")
        }
        other => panic!("{other:?}"),
    }
    let slow =
        Hook { argv: ["/bin/sleep", "5"].map(String::from).to_vec(), timeout: Duration::from_millis(100) };
    assert!(matches!(rt.block_on(run_hook(&slow, &event)), Run::TimedOut));
}
