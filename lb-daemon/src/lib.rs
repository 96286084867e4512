//! The load balancer daemon as a library: the binary and the tests drive the same code.
//!
//! Layers, bottom up (`cargo xtask test` fails on an import that points up; see
//! docs/architecture.md): [`model`], `health::spec`, `routing::decl` (plain data) ->
//! [`maglev`], [`wrr`] (pure algorithms) -> [`config`] (YAML -> model), [`plan`] (model ->
//! the state the maps should hold) -> [`dataplane`] (the only BPF user), [`health`]
//! (checkers), [`routing`] (the only rtnetlink user) -> [`snapshot`] -> [`metrics`],
//! [`status_json`] -> [`control`] (the daemon).
pub mod config;
pub mod control;
pub mod dataplane;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod routing;
pub mod snapshot;
pub mod status_json;
pub mod wrr;

/// An error and its causes on one line (`what: why: root cause`), for logs and for
/// answers that go to operators.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // Some library errors repeat their cause in their own message.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
