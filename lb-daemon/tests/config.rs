//! The configuration loader: a valid file, and malformed ones each refused with the
//! message, key path and location an operator needs to fix it.

use std::net::IpAddr;

use lb_daemon::config::{Config, ConfigError};
use lb_daemon::control::ControlError;
use std::time::Duration;

use lb_daemon::health::spec::CheckKind;
use lb_daemon::health::spec::HttpCheck;
use lb_daemon::health::spec::{FlapPolicy, Policy};
use lb_daemon::model::XdpMode;
use lb_daemon::model::{BackendState, Forward, Neighbour, Protocol, Scheduler, ServiceMatch};

const DIRECTOR: &str = "director:\n  interfaces: [eth0]\n";

/// Refused as `check` refuses it: the config, and what its health checks read beside it
/// (CA files) and planning.
fn refused(yaml: &str) -> (u64, u64, String, String) {
    match lb_daemon::control::check_text(yaml, "lb.yaml") {
        Ok(c) => panic!("accepted:\n{yaml}\n{c:?}"),
        Err(ControlError::Config(ConfigError::Invalid { file, line, column, path, message })) => {
            assert_eq!(file, "lb.yaml");
            (line, column, path, message)
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn the_example_files_are_valid() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs");
    for name in ["lb.example.yaml", "lab.yaml", "agentless-ssh.yaml"] {
        let path = std::path::Path::new(root).join(name);
        if let Err(e) = Config::load(&path) {
            panic!("{e}");
        }
    }
}

#[test]
fn the_digest_is_the_files_sha256_as_sha256sum_prints_it() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/lb.example.yaml");
    let out = std::process::Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let expected = printed.split_whitespace().next().unwrap();
    assert_eq!(Config::load(std::path::Path::new(path)).unwrap().digest, expected);
    // One changed byte, another digest.
    let text = std::fs::read_to_string(path).unwrap();
    let other = Config::parse(&format!("{text}\n"), "other.yaml").unwrap();
    assert_ne!(other.digest, expected);
}

#[test]
fn a_full_config_parses_with_defaults() {
    let yaml = r#"
director:
  interfaces: [eth0, eth1]
  xdp_mode: generic
  metrics_listen: "[::1]:9100"
marks:
  - { mark: 1, dst: 192.0.2.0/24, proto: tcp, ports: "80,443" }
  - { mark: 2, dst: 2001:db8::/64, src: 2001:db8:1::/48, ports: [53, "5000-5099"] }
services:
  - name: web
    match: { fwmark: 1 }
    scheduler: mh
    ring_size: 65537
    backends:
      - { address: 10.1.0.11, weight: 100 }
      - { address: 10.1.0.12, weight: 50, state: drain }
  - name: dns
    match: { vip: 192.0.2.53, port: 53, proto: udp }
    backends:
      - address: 10.1.0.21
        port: 53
        state: disabled
  - name: api
    match: { vip: 192.0.2.54, port: 443 }
    scheduler: wrr
    ring_size: 1000
    backends: [{ address: 10.1.0.31, weight: 3 }, { address: 10.1.0.32 }]
    check:
      type: http
      path: /health
      host: api.example
      expect_status: [200, 204]
      expect_body: ok
      interval: 500ms
      timeout: 200ms
      rise: 1
      fall: 2
      fall_within: 4
      flap: { changes: 4, within: 20, hold: 1m }
"#;
    let c = Config::parse(yaml, "lb.yaml").unwrap();
    assert_eq!(c.director.interfaces, ["eth0", "eth1"]);
    assert_eq!(c.director.xdp_mode, XdpMode::Generic);
    assert_eq!(c.director.metrics_listen.to_string(), "[::1]:9100");
    let ports: Vec<(u32, (u16, u16))> = c.marks.iter().map(|m| (m.mark, m.ports)).collect();
    assert_eq!(ports, [(1, (80, 80)), (1, (443, 443)), (2, (53, 53)), (2, (5000, 5099))]);
    assert_eq!(c.marks[0].proto, Some(Protocol::Tcp));
    assert_eq!(c.marks[2].proto, None);
    let web = &c.services[0];
    assert_eq!((web.matcher, web.scheduler, web.ring_size), (ServiceMatch::Mark(1), Scheduler::Mh, 65537));
    assert_eq!(web.backends[1].weight, 50);
    assert_eq!(web.backends[1].state, BackendState::Drain);
    let dns = &c.services[1];
    let vip: IpAddr = "192.0.2.53".parse().unwrap();
    assert_eq!(dns.matcher, ServiceMatch::Vip { addr: vip, port: 53, proto: Protocol::Udp });
    assert_eq!((dns.scheduler, dns.ring_size), (Scheduler::Sh, 4093));
    assert_eq!((dns.backends[0].weight, dns.backends[0].state), (1, BackendState::Disabled));
    // wrr's ring is a sequence, not a Maglev table: its size need not be a prime.
    assert_eq!((c.services[2].scheduler, c.services[2].ring_size), (Scheduler::Wrr, 1000));
    let check = &c.checks["api"];
    assert_eq!(
        check.spec.kind,
        CheckKind::Http(HttpCheck {
            port: None,
            path: "/health".into(),
            host: Some("api.example".into()),
            expect_status: vec![200, 204],
            expect_body: Some("ok".into()),
            tls: None,
        })
    );
    assert_eq!(
        (check.interval, check.spec.timeout),
        (Duration::from_millis(500), Duration::from_millis(200))
    );
    assert_eq!(
        check.policy,
        Policy {
            rise: 1,
            fall: 2,
            fall_within: 4,
            flap: Some(FlapPolicy { changes: 4, within: 20, hold: Some(Duration::from_secs(60)) })
        }
    );
    assert!(!c.checks.contains_key("web"), "no check: always up");
}

/// One malformed file per row: (what it shows, yaml, line, column, key path, message part).
#[rustfmt::skip]
const MALFORMED: &[(&str, &str, u64, u64, &str, &str)] = &[
    ("empty file", "", 1, 1, "(document)", "unexpected end of file"),
    ("not YAML", "director:\n  interfaces: [eth0\n", 2, 15, "director.interfaces", "unclosed bracket"),
    ("missing director", "services: []\n", 1, 1, "(document)", "missing field `director`"),
    ("missing key, located at its mapping", "director:\n  xdp_mode: native\n  metrics_listen: 127.0.0.1:9740\n", 2, 3, "director", "missing field `interfaces`"),
    ("missing key deep in a list", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n  - match: { vip: 192.0.2.2, port: 80 }\n    scheduler: mh\n    backends: []\n", 6, 5, "services[1]", "missing field `name`"),
    ("unknown top-level key", "director:\n  interfaces: [eth0]\nservice: []\n", 3, 1, "service", "unknown field `service`"),
    ("unknown director key", "director:\n  interfaces: [eth0]\n  xdp: native\n", 3, 3, "director.xdp", "unknown field `xdp`"),
    ("no interfaces", "director:\n  interfaces: []\n", 2, 15, "director.interfaces", "at least one interface"),
    ("interface name too long", "director:\n  interfaces: [abcdefghijklmnop]\n", 2, 16, "director.interfaces[0]", "1 to 15 bytes"),
    ("interface with a slash", "director:\n  interfaces: [eth0, a/b]\n", 2, 22, "director.interfaces[1]", "not a valid interface name"),
    ("interface twice", "director:\n  interfaces: [eth0, eth0]\n", 2, 22, "director.interfaces[1]", "listed twice"),
    ("unknown xdp mode", "director:\n  interfaces: [eth0]\n  xdp_mode: offload\n", 3, 13, "director.xdp_mode", "offload"),
    ("bad metrics address", "director:\n  interfaces: [eth0]\n  metrics_listen: localhost\n", 3, 19, "director.metrics_listen", "socket address"),
    ("relative bpf dir", "director:\n  interfaces: [eth0]\n  bpf_dir: lb\n", 3, 12, "director.bpf_dir", "absolute path"),
    ("zero connection table", "director:\n  interfaces: [eth0]\n  connection_table_size: 0\n", 3, 26, "director.connection_table_size", "out of range"),
    ("connection table not a power of two", "director:\n  interfaces: [eth0]\n  connection_table_size: 1000000\n", 3, 26, "director.connection_table_size", "1000000 is not a power of two (the table is 4-way set-associative): use 524288 or 1048576"),
    ("mark zero", "DIRECTORmarks:\n  - { mark: 0, dst: 192.0.2.0/24 }\n", 4, 13, "marks[0].mark", "mark 0"),
    ("bad prefix", "DIRECTORmarks:\n  - { mark: 1, dst: 192.0.2.0/33 }\n", 4, 21, "marks[0].dst", "invalid IP address"),
    ("prefix with host bits", "DIRECTORmarks:\n  - { mark: 1, dst: 192.0.2.1/24 }\n", 4, 21, "marks[0].dst", "did you mean 192.0.2.0/24"),
    ("mixed families in a rule", "DIRECTORmarks:\n  - { mark: 1, dst: 192.0.2.0/24, src: 2001:db8::/32 }\n", 4, 40, "marks[0].src", "different address families"),
    ("inverted port range", "DIRECTORmarks:\n  - { mark: 1, dst: 192.0.2.0/24, ports: \"90-80\" }\n", 4, 42, "marks[0].ports", "inverted"),
    ("empty port range", "DIRECTORmarks:\n  - { mark: 1, dst: 192.0.2.0/24, ports: \"80,\" }\n", 4, 42, "marks[0].ports", "empty port range"),
    ("empty port list", "DIRECTORmarks:\n  - { mark: 1, dst: 192.0.2.0/24, ports: [] }\n", 4, 42, "marks[0].ports", "port list is empty"),
    ("port out of range", "DIRECTORmarks:\n  - { mark: 1, dst: 192.0.2.0/24, ports: 70000 }\n", 4, 42, "marks[0].ports", "out of range 1-65535"),
    ("unknown protocol", "DIRECTORmarks:\n  - { mark: 1, dst: 192.0.2.0/24, proto: sctp }\n", 4, 42, "marks[0].proto", "sctp"),
    ("service without name", "DIRECTORservices:\n  - match: { vip: 192.0.2.1, port: 80 }\n", 4, 5, "services[0]", "missing field `name`"),
    ("bad service name", "DIRECTORservices:\n  - name: \"web farm\"\n    match: { vip: 192.0.2.1, port: 80 }\n", 4, 11, "services[0].name", "service name"),
    ("duplicate service name", "DIRECTORservices:\n  - { name: a, match: { vip: 192.0.2.1, port: 80 } }\n  - { name: a, match: { vip: 192.0.2.2, port: 80 } }\n", 5, 13, "services[1].name", "duplicate service name `a`"),
    ("duplicate vip", "DIRECTORservices:\n  - { name: a, match: { vip: 192.0.2.1, port: 80 } }\n  - { name: b, match: { vip: 192.0.2.1, port: 80 } }\n", 5, 23, "services[1].match", "192.0.2.1:80/tcp is already the match of services[0]"),
    ("bad vip address", "DIRECTORservices:\n  - { name: a, match: { vip: 192.0.2.300, port: 80 } }\n", 4, 30, "services[0].match.vip", "invalid IP address"),
    ("loopback vip", "DIRECTORservices:\n  - { name: a, match: { vip: 127.0.0.1, port: 80 } }\n", 4, 30, "services[0].match.vip", "cannot be a virtual address"),
    ("vip without port", "DIRECTORservices:\n  - { name: a, match: { vip: 192.0.2.1 } }\n", 4, 30, "services[0].match.port", "needs a `port`"),
    ("vip and fwmark", "DIRECTORmarks: [{ mark: 1, dst: 192.0.2.0/24 }]\nservices:\n  - { name: a, match: { vip: 192.0.2.1, port: 80, fwmark: 1 } }\n", 5, 59, "services[0].match.fwmark", "not both"),
    ("empty match", "DIRECTORservices:\n  - { name: a, match: {} }\n", 4, 23, "services[0].match", "needs `vip`"),
    ("undefined mark", "DIRECTORservices:\n  - { name: a, match: { fwmark: 7 } }\n", 4, 33, "services[0].match.fwmark", "fwmark 7 is not defined"),
    ("duplicate fwmark service", "DIRECTORmarks: [{ mark: 1, dst: 192.0.2.0/24 }]\nservices:\n  - { name: a, match: { fwmark: 1 } }\n  - { name: b, match: { fwmark: 1 } }\n", 6, 23, "services[1].match", "fwmark 1 is already the match"),
    ("unknown scheduler", "DIRECTORservices:\n  - { name: a, match: { vip: 192.0.2.1, port: 80 }, scheduler: rr }\n", 4, 64, "services[0].scheduler", "rr"),
    ("nat backend of the other family", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends:\n      - { address: \"2001:db8::1\", forward: nat }\n", 7, 20, "services[0].backends[0].address", "NAT keep the family"),
    ("tunnel without a source", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    forward: tunnel\n    backends:\n      - { address: 10.0.0.1 }\n", 8, 20, "services[0].backends[0].address", "needs an IPv4 address in `director.tunnel_source`"),
    ("tunnel without a source of the backend's family", "director:\n  interfaces: [eth0]\n  tunnel_source: [192.0.2.100]\nservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends:\n      - { address: \"2001:db8::1\", forward: tunnel }\n", 8, 20, "services[0].backends[0].address", "needs an IPv6 address"),
    ("tunnel fallback without a source", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    forward: tunnel\n    fallback: 10.0.0.9\n", 7, 15, "services[0].fallback", "needs an IPv4 address"),
    ("tunnel port mapping", "director:\n  interfaces: [eth0]\n  tunnel_source: [192.0.2.100]\nservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    forward: tunnel\n    backends:\n      - { address: 10.0.0.1, port: 8080 }\n", 9, 36, "services[0].backends[0].port", "a tunnel keeps the destination port"),
    ("full NAT without a source", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    forward: fullnat\n    backends:\n      - { address: 10.0.0.1 }\n", 8, 20, "services[0].backends[0].address", "needs an IPv4 address of the director in `director.fullnat_source`"),
    ("full NAT across families", "director:\n  interfaces: [eth0]\n  fullnat_source: [198.51.100.1, \"2001:db8::1\"]\nservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends:\n      - { address: \"2001:db8::5\", forward: fullnat }\n", 8, 20, "services[0].backends[0].address", "NAT keep the family"),
    ("two full-NAT sources of one family", "director:\n  interfaces: [eth0]\n  fullnat_source: [192.0.2.1, 192.0.2.2]\n", 3, 31, "director.fullnat_source[1]", "a second IPv4 source"),
    ("bad tunnel source", "director:\n  interfaces: [eth0]\n  tunnel_source: [192.0.2]\n", 3, 19, "director.tunnel_source[0]", "not an address or a prefix"),
    ("two tunnel sources of one family", "director:\n  interfaces: [eth0]\n  tunnel_source: [192.0.2.1, 192.0.2.2]\n", 3, 30, "director.tunnel_source[1]", "a second IPv4 source"),
    ("tunnel source prefix with host bits", "director:\n  interfaces: [eth0]\n  tunnel_source: [192.0.2.1/28]\n", 3, 19, "director.tunnel_source[0]", "write the prefix as 192.0.2.0/28"),
    ("tunnel source prefix too wide", "director:\n  interfaces: [eth0]\n  tunnel_source: [10.0.0.0/8]\n", 3, 19, "director.tunnel_source[0]", "at most /16 wide"),
    ("via_tunnel on an http check", "director:\n  interfaces: [eth0]\n  tunnel_source: [192.0.2.100]\nservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: http, via_tunnel: true }\n", 7, 38, "services[0].check.via_tunnel", "only tcp checks go through the tunnel"),
    ("via_tunnel of a fwmark service", "director:\n  interfaces: [eth0]\n  tunnel_source: [192.0.2.100]\nmarks: [{ mark: 1, dst: 192.0.2.0/24 }]\nservices:\n  - name: a\n    match: { fwmark: 1 }\n    check: { type: tcp, port: 80, via_tunnel: true }\n", 8, 47, "services[0].check.via_tunnel", "a fwmark service has no VIP"),
    ("via_tunnel without a source", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, via_tunnel: true }\n", 6, 37, "services[0].check.via_tunnel", "set `source`, or an IPv4 `director.tunnel_source`"),
    ("multicast tunnel source", "director:\n  interfaces: [eth0]\n  tunnel_source: [\"ff02::1\"]\n", 3, 19, "director.tunnel_source[0]", "cannot be the source"),
    ("ring size not prime", "DIRECTORservices:\n  - { name: a, match: { vip: 192.0.2.1, port: 80 }, ring_size: 4096 }\n", 4, 64, "services[0].ring_size", "not a prime"),
    ("ring size too large", "DIRECTORservices:\n  - { name: a, match: { vip: 192.0.2.1, port: 80 }, ring_size: 2000003 }\n", 4, 64, "services[0].ring_size", "out of range"),
    ("rings beyond ring_slots", "director:\n  interfaces: [eth0]\n  ring_slots: 10000\nservices:\n  - { name: a, match: { vip: 192.0.2.1, port: 80 }, ring_size: 4093 }\n  - { name: b, match: { vip: 192.0.2.2, port: 80 }, ring_size: 4093 }\n", 6, 64, "services[1].ring_size", "more than director.ring_slots (10000)"),
    ("more backends than ring slots", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    ring_size: 3\n    backends: [{address: 10.0.0.1}, {address: 10.0.0.2}, {address: 10.0.0.3}, {address: 10.0.0.4}]\n", 6, 16, "services[0].ring_size", "4 backends do not fit"),
    ("unknown backend key", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends:\n      - { address: 10.0.0.1, wieght: 5 }\n", 7, 30, "services[0].backends[0].wieght", "unknown field `wieght`"),
    ("bad backend address", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends:\n      - { address: 10.0.0 }\n", 7, 20, "services[0].backends[0].address", "invalid IP address"),
    ("backend of the other family", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends:\n      - { address: \"2001:db8::1\" }\n", 7, 20, "services[0].backends[0].address", "different address families"),
    ("duplicate backend", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends:\n      - { address: 10.0.0.1 }\n      - { address: 10.0.0.1 }\n", 8, 20, "services[0].backends[1].address", "already services[0].backends[0]"),
    ("weight out of range", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends:\n      - { address: 10.0.0.1, weight: 70000 }\n", 7, 38, "services[0].backends[0].weight", "out of range 0-65535"),
    ("negative weight", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends:\n      - { address: 10.0.0.1, weight: -1 }\n", 7, 38, "services[0].backends[0].weight", "u32"),
    ("unknown backend state", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends:\n      - { address: 10.0.0.1, state: down }\n", 7, 37, "services[0].backends[0].state", "down"),
    ("backend port differs under dr", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends:\n      - { address: 10.0.0.1, port: 8080 }\n", 7, 36, "services[0].backends[0].port", "must listen on 80"),
    ("duplicate key", "director:\n  interfaces: [eth0]\n  interfaces: [eth1]\n", 3, 3, "director", "duplicate mapping key `interfaces`"),
    ("empty on_change", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, on_change: [] }\n", 6, 36, "services[0].check.on_change", "name the program to run"),
    ("on_change_timeout without a hook", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, on_change_timeout: 5s }\n", 6, 44, "services[0].check.on_change_timeout", "no `on_change` hook"),
    ("fallback is a backend", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends: [{ address: 10.0.0.1 }]\n    fallback: 10.0.0.1\n", 7, 15, "services[0].fallback", "is services[0].backends[0]"),
    ("fallback of another family", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    fallback: 2001:db8::1\n", 6, 15, "services[0].fallback", "different address families"),
    ("loopback fallback", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    fallback: 127.0.0.1\n", 6, 15, "services[0].fallback", "cannot be a real server"),
    ("log_connections without a log", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    log_connections: 1\n", 6, 22, "services[0].log_connections", "no director.connection_log"),
    ("relative connection log", "director:\n  interfaces: [eth0]\n  connection_log: { file: conn.log }\n", 3, 27, "director.connection_log.file", "absolute path"),
    ("tiny connection log", "director:\n  interfaces: [eth0]\n  connection_log: { file: /var/log/c.log, max_file_bytes: 10 }\n", 3, 59, "director.connection_log.max_file_bytes", "out of range 4096-"),
    ("unknown fallback_action", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    fallback_action: reject\n", 6, 22, "services[0].fallback_action", "unknown variant `reject`"),
    ("unknown on_down", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, on_down: drop }\n", 6, 34, "services[0].check.on_down", "unknown variant `drop`"),
    ("unknown check type", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: ping }\n", 6, 20, "services[0].check.type", "unknown variant `ping`"),
    ("tls_verify on an http check", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: http, tls_verify: false }\n", 6, 38, "services[0].check.tls_verify", "applies only to https checks"),
    ("relative ca_file", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 443 }\n    check: { type: https, ca_file: ca.pem }\n", 6, 36, "services[0].check.ca_file", "absolute path"),
    ("missing ca_file", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 443 }\n    check: { type: https, ca_file: /nonexistent/ca.pem }\n", 6, 36, "services[0].check.ca_file", "reading CA certificates from /nonexistent/ca.pem"),
    ("ca_file without verification", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 443 }\n    check: { type: https, tls_verify: false, ca_file: /etc/ssl/ca.pem }\n", 6, 55, "services[0].check.ca_file", "tls_verify is false"),
    ("path on an icmp check", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: icmp, path: / }\n", 6, 32, "services[0].check.path", "applies only to http and https checks"),
    ("jitter as long as the interval", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, interval: 2s, jitter: 2s }\n", 6, 47, "services[0].check.jitter", "shorter than the interval"),
    ("warning weight over 100%", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, warning_weight_percent: 150 }\n", 6, 49, "services[0].check.warning_weight_percent", "not a percentage"),
    ("unknown initial_state", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, initial_state: unknown }\n", 6, 40, "services[0].check.initial_state", "unknown variant `unknown`"),
    ("protocol of another daemon", "DIRECTORrouting:\n  protocol: 12\n", 4, 13, "routing.protocol", "belongs to bird"),
    ("reserved table id", "DIRECTORrouting:\n  tables: [{ id: 254, name: isp_a }]\n", 4, 18, "routing.tables[0].id", "reserved"),
    ("table id declared twice", "DIRECTORrouting:\n  tables:\n    - { id: 100, name: a }\n    - { id: 100, name: b }\n", 6, 13, "routing.tables[1].id", "already `a`"),
    ("unknown table name", "DIRECTORrouting:\n  routes: [{ table: isp_z, to: default, via: 192.0.2.1 }]\n", 4, 21, "routing.routes[0].table", "no table named `isp_z`"),
    ("route prefix with host bits", "DIRECTORrouting:\n  routes: [{ table: 100, to: 10.1.2.3/8, via: 192.0.2.1 }]\n", 4, 30, "routing.routes[0].to", "host bits"),
    ("route gateway of another family", "DIRECTORrouting:\n  routes: [{ table: 100, to: 10.0.0.0/8, via: 2001:db8::1 }]\n", 4, 47, "routing.routes[0].via", "different address families"),
    ("route without via or dev", "DIRECTORrouting:\n  routes: [{ table: 100, to: 10.0.0.0/8 }]\n", 4, 30, "routing.routes[0].via", "needs `via`"),
    ("rule priority of the main rule", "DIRECTORrouting:\n  rules: [{ priority: 32766, table: 100 }]\n", 4, 23, "routing.rules[0].priority", "32766"),
    ("two rules with one priority", "DIRECTORrouting:\n  rules:\n    - { priority: 10, table: 100 }\n    - { priority: 10, from: 192.0.2.0/24, table: 100 }\n", 6, 19, "routing.rules[1].priority", "already has priority 10"),
    ("rule source of the other family", "DIRECTORrouting:\n  rules: [{ priority: 10, family: ipv6, from: 192.0.2.0/24, table: 100 }]\n", 4, 47, "routing.rules[0].from", "not of the rule's address family"),
    ("fwmask without fwmark", "DIRECTORrouting:\n  rules: [{ priority: 10, fwmask: 255, table: 100 }]\n", 4, 35, "routing.rules[0].fwmask", "needs an `fwmark`"),
    ("unknown routing key", "DIRECTORrouting:\n  tabels: []\n", 4, 3, "routing.tabels", "unknown field `tabels`"),
    ("port on an icmp check", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: icmp, port: 80 }\n", 6, 32, "services[0].check.port", "applies only to tcp, http and https checks"),
    ("path on a tcp check", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, path: /health }\n", 6, 31, "services[0].check.path", "applies only to http and https checks"),
    ("argv on an http check", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: http, argv: [x] }\n", 6, 32, "services[0].check.argv", "applies only to exec checks"),
    ("port on an exec check", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: exec, argv: [/bin/true], port: 80 }\n", 6, 51, "services[0].check.port", "applies only to tcp, http and https checks"),
    ("exec without argv", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: exec }\n", 6, 20, "services[0].check.argv", "needs `argv`"),
    ("bad duration", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, interval: 2x }\n", 6, 35, "services[0].check.interval", "`2x` is not a duration"),
    ("timeout longer than interval", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, interval: 1s, timeout: 2s }\n", 6, 48, "services[0].check.timeout", "longer than the interval 1s"),
    ("relative http path", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: http, path: health }\n", 6, 32, "services[0].check.path", "not an absolute request path"),
    ("not an http status", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: http, expect_status: [200, 700] }\n", 6, 41, "services[0].check.expect_status", "700 is not an HTTP status"),
    ("fall_within below fall", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, fall: 3, fall_within: 2 }\n", 6, 47, "services[0].check.fall_within", "3 failures cannot fit in 2 cycles"),
    ("rise zero", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, rise: 0 }\n", 6, 31, "services[0].check.rise", "out of range 1-1000"),
    ("flap window too small", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, flap: { changes: 4, within: 3 } }\n", 6, 53, "services[0].check.flap.within", "4 changes cannot fit in 3 cycles"),
    ("unknown check key", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, intervall: 2s }\n", 6, 25, "services[0].check.intervall", "unknown field `intervall`"),
    ("control socket path too long", "director:\n  interfaces: [eth0]\n  control_socket: /run/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.sock\n", 3, 19, "director.control_socket", "at most 107 bytes"),
    ("accepted MAC malformed", "director:\n  interfaces: [eth0]\n  accept_macs: [\"00:00:5e:00:01\"]\n", 3, 17, "director.accept_macs[0]", "not a MAC address"),
    ("accepted MAC multicast", "director:\n  interfaces: [eth0]\n  accept_macs: [\"01:00:5e:00:00:01\"]\n", 3, 17, "director.accept_macs[0]", "not a unicast address"),
    ("backend is the vip", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    backends:\n      - { address: 192.0.2.1 }\n", 7, 20, "services[0].backends[0].address", "the service's own vip"),
    ("NUL in an exec argv", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: exec, argv: [\"/bin/ch\\0eck\"] }\n", 6, 32, "services[0].check.argv", "NUL byte"),
    ("NUL in an on_change argv", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, on_change: [\"/bin/x\", \"a\\0\"] }\n", 6, 36, "services[0].check.on_change", "NUL byte"),
    ("check source of the other family", "DIRECTORservices:\n  - name: a\n    match: { vip: 192.0.2.1, port: 80 }\n    check: { type: tcp, source: \"2001:db8::5\" }\n", 6, 33, "services[0].check.source", "different address families"),
    ("fwmark backend of the other family", "DIRECTORmarks: [{ mark: 1, dst: 192.0.2.0/24 }]\nservices:\n  - name: a\n    match: { fwmark: 1 }\n    backends: [{ address: \"2001:db8::1\" }]\n", 7, 27, "services[0].backends[0].address", "fwmark 1 matches only IPv4"),
    ("fwmark fallback of the other family", "DIRECTORmarks: [{ mark: 1, dst: \"2001:db8::/64\" }]\nservices:\n  - name: a\n    match: { fwmark: 1 }\n    fallback: 10.0.0.1\n", 7, 15, "services[0].fallback", "fwmark 1 matches only IPv6"),
    ("fwmark of both families", "DIRECTORmarks:\n  - { mark: 1, dst: 192.0.2.0/24 }\n  - { mark: 1, dst: \"2001:db8::/64\" }\nservices:\n  - name: a\n    match: { fwmark: 1 }\n    backends: [{ address: 10.0.0.1 }]\n", 9, 27, "services[0].backends[0].address", "both IPv4 and IPv6 rules"),
    ("fwmark check source of the other family", "DIRECTORmarks: [{ mark: 1, dst: 192.0.2.0/24 }]\nservices:\n  - name: a\n    match: { fwmark: 1 }\n    check: { type: icmp, source: \"2001:db8::5\" }\n", 7, 34, "services[0].check.source", "fwmark 1 matches only IPv4"),
    ("fwmark tcp check without port", "DIRECTORmarks: [{ mark: 1, dst: 192.0.2.0/24 }]\nservices:\n  - name: a\n    match: { fwmark: 1 }\n    check: { type: tcp }\n", 7, 20, "services[0].check.port", "no port of its own"),
];

#[test]
fn malformed_configs_are_refused_with_location_and_path() {
    assert!(MALFORMED.len() >= 30);
    let mut failures = Vec::new();
    for (what, yaml, line, column, path, message) in MALFORMED {
        let yaml = yaml.replace("DIRECTOR", DIRECTOR);
        let got = refused(&yaml);
        if (got.0, got.1, got.2.as_str()) != (*line, *column, *path) || !got.3.contains(message) {
            failures.push(format!(
                "{what}: got {}:{} {} \"{}\"; want {line}:{column} {path} \"{message}\"",
                got.0, got.1, got.2, got.3
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} rows:\n{}", failures.len(), MALFORMED.len(), failures.join("\n"));
}

/// Parsing reads the file and nothing else: CA files are the health runtime's to read
/// (when `check`, start or a reload prepare the checks), and its errors point at the key.
#[test]
fn parsing_reads_no_other_file_and_the_runtime_locates_what_it_cannot_read() {
    let yaml = format!(
        "{DIRECTOR}services:\n  - name: a\n    match: {{ vip: 192.0.2.1, port: 443 }}\n    check: {{ type: https, ca_file: /nonexistent/ca.pem }}\n"
    );
    let config = Config::parse(&yaml, "lb.yaml").expect("pure parsing accepts a path it does not open");
    let e = lb_daemon::health::tls::prepare(&config).unwrap_err();
    assert!(
        e.to_string().starts_with(
            "lb.yaml:6:36: services[0].check.ca_file: reading CA certificates from /nonexistent/ca.pem"
        ),
        "{e}"
    );
}

#[test]
fn the_error_names_file_line_column_and_path() {
    let e = Config::parse("director:\n  interfaces: [eth0]\n  xdp: native\n", "/etc/lb/lb.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "/etc/lb/lb.yaml:3:3: director.xdp: unknown field `xdp`, expected one of interfaces, xdp_mode, metrics_listen, control_socket, overrides_file, connection_log, bpf_dir, connection_table_size, ring_slots, accept_macs, flood_guard_flows_per_sec, tunnel_source, fullnat_source"
    );
}

/// As `keepalived -t`: one run names every error of a file that parses, in file order,
/// each with its location, and stops listing after a bounded number.
#[test]
fn every_error_of_a_file_is_reported_in_file_order() {
    let yaml = "director:
  interfaces: [eth0]
  connection_table_size: 0
marks:
  - { mark: 0, dst: 198.51.100.0/24 }
  - { mark: 2, dst: 198.51.100.1/24 }
services:
  - name: web
    match: { vip: 192.0.2.1, port: 80 }
    ring_size: 100
    backends:
      - { address: 10.0.0.1, weight: 100000 }
  - name: web
    match: { vip: 192.0.2.2, port: 80 }
    check: { type: tcp, interval: soon }
    backends:
      - { address: 2001:db8::1 }
";
    let e = Config::parse(yaml, "lb.yaml").unwrap_err();
    let ConfigError::Several { errors, more } = &e else { panic!("one error only: {e}") };
    let got: Vec<(u64, u64, &str)> = errors
        .iter()
        .map(|e| match e {
            ConfigError::Invalid { line, column, path, .. } => (*line, *column, path.as_str()),
            other => panic!("{other}"),
        })
        .collect();
    let want = [
        (3, 26, "director.connection_table_size"),
        (5, 13, "marks[0].mark"),
        (6, 21, "marks[1].dst"),
        (10, 16, "services[0].ring_size"),
        (12, 38, "services[0].backends[0].weight"),
        (13, 11, "services[1].name"),
        (15, 35, "services[1].check.interval"),
        (17, 20, "services[1].backends[0].address"),
    ];
    let paths: Vec<&str> = got.iter().map(|g| g.2).collect();
    assert_eq!(paths, want.iter().map(|w| w.2).collect::<Vec<_>>(), "{e}");
    assert_eq!(got, want, "{e}");
    assert_eq!(*more, 0);
    assert!(e.to_string().starts_with("8 errors:\n  lb.yaml:3:26: director.connection_table_size: "), "{e}");

    // Thirty bad services: twenty listed, the rest counted.
    let mut many = String::from("director:\n  interfaces: [eth0]\nservices:\n");
    for i in 0..30 {
        many.push_str(&format!(
            "  - {{ name: s{i}, match: {{ vip: 192.0.2.{i}, port: 80 }}, ring_size: 4 }}\n"
        ));
    }
    let e = Config::parse(&many, "lb.yaml").unwrap_err();
    let ConfigError::Several { errors, more } = &e else { panic!("{e}") };
    assert_eq!((errors.len(), *more), (lb_daemon::config::MAX_REPORTED_ERRORS, 10));
    assert!(e.to_string().ends_with("... and 10 more"), "{e}");
}

#[test]
fn a_missing_file_is_named() {
    let e = Config::load(std::path::Path::new("/nonexistent/lb.yaml")).unwrap_err();
    let text = lb_daemon::error_chain(&e);
    assert!(text.starts_with("/nonexistent/lb.yaml: No such file"), "{text}");
}

#[derive(serde::Deserialize)]
struct AlertFile {
    groups: Vec<AlertGroup>,
}

#[derive(serde::Deserialize)]
struct AlertGroup {
    rules: Vec<AlertRule>,
}

#[derive(serde::Deserialize)]
struct AlertRule {
    alert: String,
    expr: String,
}

#[test]
fn alert_rules_and_dashboard_name_only_metrics_the_daemon_exports() {
    use lb_daemon::snapshot::{BackendSnapshot, BackendStatus, ServiceSnapshot, Snapshot};
    let snap = Snapshot {
        services: vec![ServiceSnapshot {
            name: "web".into(),
            matcher: ServiceMatch::Mark(1),
            scheduler: Scheduler::Sh,
            ring_size: 7,
            ring_fingerprint: 1,
            forward: Forward::Dr,
            counters: Default::default(),
            backends: vec![BackendSnapshot {
                checks: vec![("ok", 1)],
                ..BackendSnapshot::quiet("10.1.0.1".parse().unwrap(), 1, BackendStatus::Active)
            }],
        }],
        overrides: vec![lb_daemon::snapshot::OverrideSnapshot {
            service: "web".into(),
            backend: "10.1.0.1".parse().unwrap(),
            set: lb_daemon::model::Override {
                state: Some(lb_daemon::model::ForcedState::Drain),
                weight: Some(1),
            },
            stale: false,
        }],
        passes: vec![("no_backend", 0)],
        routing: Some(Default::default()),
        actions: vec![("tx", 0)],
        drops: vec![("truncated", 0)],
        icmp_forwarded: vec![("ipv4", "fragmentation_needed", 0)],
        too_big_sent: vec![("ipv4", 0)],
        fragments: vec![("first", 0)],
        nat_replies: vec![("sent", 0)],
        conn_log: vec![("written", 0)],
        last_reload_success: Some(0.0),
        config_digest: "00".into(),
        ..Default::default()
    };
    let exported = lb_daemon::metrics::render(&snap).unwrap();
    let families: std::collections::HashSet<&str> =
        exported.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next()).collect();
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/lb-alerts.yml")).unwrap();
    let file: AlertFile = serde_saphyr::from_str(&text).unwrap();
    let mut exprs: Vec<(String, String)> = file
        .groups
        .iter()
        .flat_map(|g| &g.rules)
        .map(|r| (format!("alert {}", r.alert), r.expr.clone()))
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/grafana-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push((format!("panel {}", p["title"]), t["expr"].as_str().unwrap().to_owned()));
        }
    }
    let query = dashboard["templating"]["list"][1]["query"].as_str().unwrap().to_owned();
    exprs.push(("the instance variable".into(), query));
    let mut checked = 0;
    for (what, expr) in &exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("lb_") {
            let name: String =
                rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            // A histogram's series carry suffixes its family name does not.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|base| families.contains(base)))
                .unwrap_or(&name);
            assert!(families.contains(family), "{what} uses {name}, which is not exported");
            checked += 1;
            rest = &rest[at + name.len()..];
        }
    }
    assert!(checked >= 15, "only {checked} metric references found");
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-config-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn only_regular_files_of_bounded_size_are_read() {
    let dir = scratch("kinds");
    let fifo = dir.join("lb.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // A FIFO with no writer: refused at once, where reading it would block forever.
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(Config::load(&path).map(|_| ()).map_err(|e| lb_daemon::error_chain(&e)));
    });
    let got = rx.recv_timeout(Duration::from_secs(10)).expect("loading a FIFO must not block");
    let text = got.expect_err("a FIFO is no config file");
    assert!(text.contains("is a FIFO, not a regular file"), "{text}");

    for (path, kind) in [("/dev/zero", "a device"), ("/tmp", "a directory")] {
        let text = lb_daemon::error_chain(&Config::load(std::path::Path::new(path)).unwrap_err());
        assert!(text.contains(&format!("{path} is {kind}")), "{text}");
    }

    // Larger than the limit: refused from its size, without reading it (sparse here).
    let big = dir.join("big.yaml");
    let f = std::fs::File::create(&big).expect("create");
    f.set_len(lb_daemon::config::MAX_CONFIG_BYTES + 1).expect("set_len");
    let text = lb_daemon::error_chain(&Config::load(&big).unwrap_err());
    assert!(text.contains("is larger than 67108864 bytes"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invalid_utf8_is_located() {
    let dir = scratch("utf8");
    let path = dir.join("lb.yaml");
    std::fs::write(&path, b"director:\n  interfaces: [eth0]\n  bpf_dir: /sys/fs/bpf/l\xc3b\n")
        .expect("write");
    match Config::load(&path).unwrap_err() {
        ConfigError::Invalid { line, column, message, .. } => {
            assert_eq!((line, column), (3, 25), "{message}");
            assert!(message.contains("invalid UTF-8 (byte 0xc3)"), "{message}");
        }
        e => panic!("{e}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn long_values_are_cut_in_errors() {
    let name = "x".repeat(1_000_000);
    let yaml =
        format!("{DIRECTOR}services:\n  - name: \"{name}\"\n    match: {{ vip: 192.0.2.1, port: 80 }}\n");
    let text = Config::parse(&yaml, "lb.yaml").unwrap_err().to_string();
    assert!(text.len() < 400, "{} bytes: {}", text.len(), &text[..200]);
    assert!(text.contains("(1000000 bytes)"), "{text}");
    // Values the YAML parser quotes in its own messages are cut too.
    let yaml = format!("director:\n  interfaces: [eth0]\n  xdp_mode: {}\n", "y".repeat(100_000));
    let text = Config::parse(&yaml, "lb.yaml").unwrap_err().to_string();
    assert!(text.len() < 1200, "{} bytes", text.len());
}

#[test]
fn a_file_of_more_yaml_nodes_than_the_budget_is_refused_by_name() {
    let nodes = lb_daemon::config::MAX_YAML_NODES + 1;
    let yaml = format!("director:\n  interfaces: [{}]\n", vec!["e"; nodes].join(","));
    let e = Config::parse(&yaml, "lb.yaml").unwrap_err().to_string();
    assert!(e.starts_with("lb.yaml:") && e.contains("nodes"), "{e}");
}

/// `forward: tunnel` per service with a per-backend override (IPVS decides per real
/// server); a tunnel crosses families; the sources land in the data path's words.
#[test]
fn tunnel_services_take_a_per_backend_override_and_cross_families() {
    let yaml = "director:\n  interfaces: [eth0]\n  tunnel_source: [198.51.100.16/28, \"2001:db8::1\"]\nservices:\n  - name: web\n    match: { vip: 192.0.2.1, port: 80 }\n    forward: tunnel\n    fallback: 10.0.9.9\n    backends:\n      - { address: 10.0.1.1 }\n      - { address: \"2001:db8::11\" }\n      - { address: 10.0.0.5, forward: dr }\n";
    let config = Config::parse(yaml, "lb.yaml").expect("valid");
    let web = &config.services[0];
    assert_eq!(web.forward, Forward::Tunnel);
    let forwards: Vec<Forward> = web.backends.iter().map(|b| b.forward).collect();
    assert_eq!(forwards, [Forward::Tunnel, Forward::Tunnel, Forward::Dr]);
    let mut state = lb_daemon::plan::DataplaneState::default();
    state.set_tunnel_sources(config.director.tunnel_source_v4, config.director.tunnel_source_v6);
    assert_eq!(state.tunnel_source_v4, u32::from_ne_bytes([198, 51, 100, 16]));
    assert_eq!(state.tunnel_spread_v4, u32::from_ne_bytes([0, 0, 0, 15]));
    assert_eq!(state.tunnel_source_v6, lb_daemon::model::addr_words("2001:db8::1".parse().unwrap()).1);
    assert_eq!(state.tunnel_spread_v6, 0);
    // The override is the data path's too: only the tunnel backends get an outer header.
    let neighbours = web
        .backends
        .iter()
        .map(|b| b.addr)
        .chain(web.fallback)
        .map(|a| {
            (
                a,
                Neighbour {
                    mac: [2, 0, 0, 0, 0, 1],
                    ifindex: 1,
                    if_mac: [2, 0, 0, 0, 0, 2],
                    vlan: 0,
                    mtu: 1500,
                },
            )
        })
        .collect();
    let plan =
        lb_daemon::plan::Planner::default().plan(&config.services, &config.marks, &neighbours).unwrap();
    let tunnel: Vec<(std::net::IpAddr, u8)> =
        plan.backend_ids.iter().map(|((_, addr), id)| (*addr, plan.state.backends[id].tunnel)).collect();
    for (addr, t) in tunnel {
        assert_eq!(t, u8::from(addr != "10.0.0.5".parse::<std::net::IpAddr>().unwrap()), "{addr}");
    }
}

/// `forward: nat` (LVS `-m`): a backend may listen on its own port, for VIP services and
/// fwmark ones alike; one without a port keeps the packet's.
#[test]
fn masquerading_backends_may_map_ports() {
    let yaml = "director:\n  interfaces: [eth0]\nmarks:\n  - { mark: 1, dst: 192.0.2.1/32, ports: [80, 443] }\nservices:\n  - name: web\n    match: { vip: 192.0.2.1, port: 80 }\n    forward: nat\n    backends:\n      - { address: 10.0.2.11, port: 8080 }\n      - { address: 10.0.2.12 }\n      - { address: 10.0.2.13, port: 80, forward: dr }\n  - name: both\n    match: { fwmark: 1 }\n    scheduler: sh\n    forward: nat\n    backends:\n      - { address: 10.0.2.11 }\n";
    let config = lb_daemon::control::check_text(yaml, "lb.yaml").expect("valid");
    let web = &config.services[0];
    let got: Vec<(Forward, Option<u16>)> = web.backends.iter().map(|b| (b.forward, b.port)).collect();
    assert_eq!(got, [(Forward::Nat, Some(8080)), (Forward::Nat, None), (Forward::Dr, None)]);
    assert_eq!(config.services[1].backends[0].forward, Forward::Nat);
    assert_eq!(Forward::Nat.ipvs_name(), "Masq");
}

/// `forward: fullnat` with `director.fullnat_source` (a prefix: each flow draws an
/// address from it); a full-NAT backend may map ports as a masquerading one.
#[test]
fn full_nat_backends_take_their_source_from_the_director() {
    let yaml = "director:\n  interfaces: [eth0]\n  fullnat_source: [198.51.100.16/28]\nservices:\n  - name: web\n    match: { vip: 192.0.2.1, port: 80 }\n    forward: fullnat\n    backends:\n      - { address: 10.9.0.11, port: 8080 }\n";
    let config = lb_daemon::control::check_text(yaml, "lb.yaml").expect("valid");
    assert_eq!(config.director.fullnat_source_v4, Some("198.51.100.16/28".parse().unwrap()));
    let b = &config.services[0].backends[0];
    assert_eq!((b.forward, b.port), (Forward::FullNat, Some(8080)));
    assert_eq!(Forward::FullNat.ipvs_name(), "FullNat");
}
