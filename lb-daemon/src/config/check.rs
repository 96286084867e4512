//! The `check:` keywords of a service: one health check, validated into a
//! `health::spec::HealthCheck`.

use super::*;

impl Checker<'_> {
    pub(super) fn check(
        &self,
        c: &RawCheck,
        i: usize,
        matcher: &ServiceMatch,
        tally: &Tally,
    ) -> Result<HealthCheck, ConfigError> {
        let at = |key: &str| format!("services[{i}].check.{key}");
        let kind = c.kind.value;
        let only = |at_key: Option<Spanned<()>>, key: &str, for_what: &str| -> Result<(), ConfigError> {
            match at_key {
                Some(span) => {
                    Err(self.err(&span, at(key), format!("`{key}` applies only to {for_what} checks")))
                }
                None => Ok(()),
            }
        };
        let present = |on: bool, span: Spanned<()>| on.then_some(span);
        let is_http = matches!(kind, RawCheckType::Http | RawCheckType::Https);
        let web = "http and https";
        only(c.path.as_ref().and_then(|v| present(!is_http, v.clone_span())), "path", web)?;
        only(c.host.as_ref().and_then(|v| present(!is_http, v.clone_span())), "host", web)?;
        only(c.expect_status.as_ref().and_then(|v| present(!is_http, v.clone_span())), "expect_status", web)?;
        only(c.expect_body.as_ref().and_then(|v| present(!is_http, v.clone_span())), "expect_body", web)?;
        let is_https = matches!(kind, RawCheckType::Https);
        only(c.tls_verify.as_ref().and_then(|v| present(!is_https, v.clone_span())), "tls_verify", "https")?;
        only(c.ca_file.as_ref().and_then(|v| present(!is_https, v.clone_span())), "ca_file", "https")?;
        if let (Some(v), Some(f)) = (&c.tls_verify, &c.ca_file)
            && !v.value
        {
            return Err(self.err(f, at("ca_file"), "a CA file is for verifying, and tls_verify is false"));
        }
        let is_exec = matches!(kind, RawCheckType::Exec);
        only(c.argv.as_ref().and_then(|v| present(!is_exec, v.clone_span())), "argv", "exec")?;
        let has_port = matches!(kind, RawCheckType::Tcp | RawCheckType::Http | RawCheckType::Https);
        only(
            c.port.as_ref().and_then(|v| present(!has_port, v.clone_span())),
            "port",
            "tcp, http and https",
        )?;
        let port = c.port.as_ref().map(|p| p.value);
        if port == Some(0) {
            return Err(self.err(&loc(&c.port, &c.kind), at("port"), "port 0 cannot be checked"));
        }
        let needs_port = has_port;
        if needs_port && port.is_none() && matches!(matcher, ServiceMatch::Mark(_)) {
            return Err(self.err(
                &c.kind,
                at("port"),
                "a fwmark service has no port of its own: name the port to check",
            ));
        }
        let kind = match kind {
            RawCheckType::Tcp => CheckKind::Tcp { port },
            RawCheckType::Http | RawCheckType::Https => {
                let path = c.path.as_ref().map_or_else(|| "/".to_owned(), |p| p.value.clone());
                if !path.starts_with('/') || path.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                    let p = loc(&c.path, &c.kind);
                    return Err(self.err(
                        &p,
                        at("path"),
                        format!("`{path}` is not an absolute request path"),
                    ));
                }
                let expect_status = match &c.expect_status {
                    None => vec![200],
                    Some(s) if s.value.is_empty() => {
                        return Err(self.err(s, at("expect_status"), "list at least one status"));
                    }
                    Some(s) => {
                        if let Some(bad) = s.value.iter().find(|v| !(100..=599).contains(*v)) {
                            return Err(self.err(
                                s,
                                at("expect_status"),
                                format!("{bad} is not an HTTP status"),
                            ));
                        }
                        s.value.clone()
                    }
                };
                CheckKind::Http(HttpCheck {
                    port,
                    path,
                    host: c.host.as_ref().map(|h| h.value.clone()),
                    expect_status,
                    expect_body: c.expect_body.as_ref().map(|b| b.value.clone()),
                    tls: if is_https {
                        let verify = c.tls_verify.as_ref().is_none_or(|v| v.value);
                        if let Some(f) = &c.ca_file
                            && !f.value.is_absolute()
                        {
                            return Err(self.err(f, at("ca_file"), "give an absolute path"));
                        }
                        let ca_file = c.ca_file.as_ref().map(|f| f.value.clone());
                        let spec = TlsSpec { verify, ca_file };
                        // Read by the health runtime, not here: where to point its errors.
                        let span = loc(&c.ca_file, &c.kind);
                        let key = if c.ca_file.is_some() { "ca_file" } else { "type" };
                        self.tls_sources
                            .borrow_mut()
                            .push(TlsSource { spec: spec.clone(), at: self.location(&span, at(key)) });
                        Some(spec)
                    } else {
                        None
                    },
                })
            }
            RawCheckType::Exec => match &c.argv {
                Some(a) if a.value.iter().any(|arg| arg.contains('\0')) => {
                    return Err(self.err(
                        a,
                        at("argv"),
                        "an argument holds a NUL byte, which no program can receive",
                    ));
                }
                Some(a) if !a.value.is_empty() && !a.value[0].is_empty() => {
                    CheckKind::Exec { argv: a.value.clone() }
                }
                Some(a) => return Err(self.err(a, at("argv"), "name the program to run")),
                None => return Err(self.err(&c.kind, at("argv"), "an exec check needs `argv`")),
            },
            RawCheckType::Icmp => CheckKind::Icmp,
        };
        let interval = match &c.interval {
            Some(v) => self.duration(v, at("interval"))?,
            None => DEFAULT_CHECK_INTERVAL,
        };
        let timeout = match &c.timeout {
            Some(v) => self.duration(v, at("timeout"))?,
            None => DEFAULT_CHECK_TIMEOUT.min(interval),
        };
        if timeout > interval {
            let t = loc(&c.timeout, &c.kind);
            return Err(self.err(
                &t,
                at("timeout"),
                format!("timeout {timeout:?} is longer than the interval {interval:?}"),
            ));
        }
        let rise = self.ranged(&c.rise, at("rise"), Policy::default().rise, 1..=1000)?;
        let fall = self.ranged(&c.fall, at("fall"), Policy::default().fall, 1..=1000)?;
        let fall_within = self.ranged(&c.fall_within, at("fall_within"), fall, 1..=1000)?;
        if fall_within < fall {
            let f = loc(&c.fall_within, &c.kind);
            return Err(self.err(
                &f,
                at("fall_within"),
                format!("{fall} failures cannot fit in {fall_within} cycles"),
            ));
        }
        let flap = match &c.flap {
            None => None,
            Some(f) => {
                if f.changes.value < 2 || f.changes.value > 1000 {
                    return Err(self.err(
                        &f.changes,
                        at("flap.changes"),
                        "flap control needs 2 to 1000 changes",
                    ));
                }
                if f.within.value < f.changes.value || f.within.value > 10000 {
                    return Err(self.err(
                        &f.within,
                        at("flap.within"),
                        format!("{} changes cannot fit in {} cycles", f.changes.value, f.within.value),
                    ));
                }
                let hold = match &f.hold {
                    Some(h) => Some(self.duration(h, at("flap.hold"))?),
                    None => None,
                };
                Some(FlapPolicy { changes: f.changes.value, within: f.within.value, hold })
            }
        };
        let on_change = match &c.on_change {
            None => None,
            Some(a) if a.value.is_empty() || a.value[0].is_empty() => {
                return Err(self.err(a, at("on_change"), "name the program to run"));
            }
            Some(a) if a.value.iter().any(|arg| arg.contains('\0')) => {
                return Err(self.err(
                    a,
                    at("on_change"),
                    "an argument holds a NUL byte, which no program can receive",
                ));
            }
            Some(a) => Some(Hook {
                argv: a.value.clone(),
                timeout: match &c.on_change_timeout {
                    Some(t) => self.duration(t, at("on_change_timeout"))?,
                    None => DEFAULT_HOOK_TIMEOUT,
                },
            }),
        };
        if on_change.is_none()
            && let Some(t) = &c.on_change_timeout
        {
            return Err(self.err(t, at("on_change_timeout"), "there is no `on_change` hook to time"));
        }
        let jitter = match &c.jitter {
            None => Duration::ZERO,
            Some(j) => {
                let d = self.duration(j, at("jitter"))?;
                if d >= interval {
                    return Err(self.err(
                        j,
                        at("jitter"),
                        format!("jitter {d:?} must be shorter than the interval {interval:?}"),
                    ));
                }
                d
            }
        };
        let warning_weight_percent = match &c.warning_weight_percent {
            None => None,
            Some(p) if p.value <= 100 => Some(p.value),
            Some(p) => {
                return Err(self.err(
                    p,
                    at("warning_weight_percent"),
                    format!("{} is not a percentage (0-100)", p.value),
                ));
            }
        };
        if let Some(src) = &c.source {
            let ipv4 = src.value.is_ipv4();
            match matcher {
                ServiceMatch::Vip { addr, .. } if addr.is_ipv4() != ipv4 => {
                    return Err(self.err(
                        src,
                        at("source"),
                        format!(
                            "{} and the service's backends ({addr}) are of different address families",
                            src.value
                        ),
                    ));
                }
                ServiceMatch::Mark(mark) => self.family_of_mark(src, at("source"), *mark, ipv4)?,
                ServiceMatch::Vip { .. } => {}
            }
        }
        let via_tunnel = match &c.via_tunnel {
            Some(v) if v.value => Some(self.via_tunnel(c, v, i, matcher, tally)?),
            _ => None,
        };
        Ok(HealthCheck {
            spec: CheckSpec { kind, timeout, source: c.source.as_ref().map(|s| s.value), via_tunnel },
            interval,
            jitter,
            policy: Policy { rise, fall, fall_within, flap },
            warning_weight_percent,
            start_down: matches!(c.initial_state, Some(RawInitialState::Down)),
            keep_flows: matches!(c.on_down, Some(RawOnDown::Keep)),
            on_change,
        })
    }

    /// `via_tunnel: true`: a `tcp` check of a VIP service; the address the real servers
    /// answer the probe to (`source`, else the director's tunnel source of the VIP's
    /// family).
    fn via_tunnel(
        &self,
        c: &RawCheck,
        v: &Spanned<bool>,
        i: usize,
        matcher: &ServiceMatch,
        tally: &Tally,
    ) -> Result<IpAddr, ConfigError> {
        let at = format!("services[{i}].check.via_tunnel");
        if !matches!(c.kind.value, RawCheckType::Tcp) {
            return Err(self.err(
                v,
                at,
                "only tcp checks go through the tunnel (a SYN to the VIP, encapsulated)",
            ));
        }
        let ServiceMatch::Vip { addr: vip, .. } = matcher else {
            return Err(self.err(
                v,
                at,
                "a fwmark service has no VIP to send the check to through the tunnel",
            ));
        };
        if let Some(src) = &c.source {
            return Ok(src.value);
        }
        let source = match tally.tunnel_sources {
            Some((v4, _)) if vip.is_ipv4() => v4.map(|n| IpAddr::V4(n.network())),
            Some((_, v6)) => v6.map(|n| IpAddr::V6(n.network())),
            // The director section has an error of its own: nothing to hold against this.
            None => Some(*vip),
        };
        source.ok_or_else(|| {
            self.err(
                v,
                at,
                format!(
                    "the check needs an address the real servers answer to: set `source`, or an {} `director.tunnel_source`",
                    if vip.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            )
        })
    }
}
