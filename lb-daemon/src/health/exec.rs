//! `exec`: run a program (never through a shell unless the argv names one) with the
//! service and server in its environment; its exit status is a Nagios plugin's (0 OK,
//! 1 WARNING, 2 CRITICAL, 3 UNKNOWN), and a `weight=N` token in its first output line sets
//! the server's weight (as HAProxy's agent-check and keepalived's misc_dynamic do).
//!
//! `{service}`, `{backend}` and `{port}` in an argument are replaced by the service's name,
//! the server's address and the port (no shell is involved: the replaced argument stays
//! one argument).
//!
//! The program runs in a process group of its own, and the whole group is killed when the
//! timeout expires: an `ssh` it started cannot outlive the check.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt as _;

use super::state::Outcome;
use super::{Report, Target, is_director_error};

/// Output beyond this is not read (the first line is what counts).
const MAX_OUTPUT: u64 = 4096;

/// The `weight=N` token of a plugin's first output line, if any.
pub fn weight_token(line: &str) -> Option<u32> {
    line.split(|c: char| c.is_whitespace() || c == ';' || c == ',' || c == '|')
        .find_map(|tok| tok.strip_prefix("weight=")?.parse().ok())
}

/// `argv` with the placeholders of one target filled in.
pub fn expand(argv: &[String], target: &Target) -> Vec<String> {
    let port = target.port.map(|p| p.to_string()).unwrap_or_default();
    argv.iter()
        .map(|a| {
            a.replace("{service}", &target.service)
                .replace("{backend}", &target.addr.to_string())
                .replace("{port}", &port)
        })
        .collect()
}

/// How a bounded run ended.
#[derive(Debug)]
pub enum Run {
    /// Exited (`None`: killed by a signal), with its first output line.
    Exited { code: Option<i32>, first_line: String },
    /// Could not be started or waited for; `director` when the director ran out of
    /// something (see `is_director_error`), not because of the program.
    Failed { message: String, director: bool },
    /// Still running at the timeout: its process group was killed.
    TimedOut,
}

/// Runs `argv` (no shell) with `env`, in a process group of its own that is killed if it
/// outlives `timeout`. Reads at most the first few KiB of its output.
pub async fn run_bounded(argv: &[String], env: &[(&str, String)], timeout: Duration) -> Run {
    let Some((program, args)) = argv.split_first() else {
        return Run::Failed { message: "empty argv".into(), director: false };
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Run::Failed {
                message: format!("running {program}: {e}"),
                director: is_director_error(&e),
            };
        }
    };
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    let mut stdout = child.stdout.take();
    let run = async {
        let mut out = Vec::new();
        if let Some(s) = stdout.as_mut() {
            // A program that closes stdout early still gets waited for below.
            let _ = s.take(MAX_OUTPUT).read_to_end(&mut out).await;
        }
        let status = child.wait().await;
        (status, out)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((Ok(status), out)) => {
            let text = String::from_utf8_lossy(&out);
            let first_line = text.lines().next().unwrap_or("").trim().to_owned();
            Run::Exited { code: status.code(), first_line }
        }
        Ok((Err(e), _)) => {
            Run::Failed { message: format!("waiting for {program}: {e}"), director: is_director_error(&e) }
        }
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            Run::TimedOut
        }
    }
}

pub async fn check(argv: &[String], target: &Target, timeout: Duration) -> Report {
    let argv = expand(argv, target);
    let env = [
        ("LB_SERVICE", target.service.clone()),
        ("LB_BACKEND", target.addr.to_string()),
        ("LB_BACKEND_PORT", target.port.map(|p| p.to_string()).unwrap_or_default()),
    ];
    let program = argv.first().cloned().unwrap_or_default();
    match run_bounded(&argv, &env, timeout).await {
        Run::Exited { code, first_line } => Report {
            // Killed by a signal: not a verdict.
            outcome: code.map_or(Outcome::Unknown, Outcome::from_exit_code),
            weight: weight_token(&first_line),
            message: if first_line.is_empty() {
                format!(
                    "{program}: exit status {}",
                    code.map_or("none (signal)".to_owned(), |c| c.to_string())
                )
            } else {
                first_line
            },
        },
        // A plugin that cannot start (missing, not executable) is UNKNOWN, as Nagios has
        // it; a director out of processes or descriptors has no verdict at all.
        Run::Failed { message, director } => Report {
            outcome: if director { Outcome::DirectorError } else { Outcome::Unknown },
            weight: None,
            message,
        },
        Run::TimedOut => {
            Report::critical(format!("{program}: no verdict within {timeout:?} (process group killed)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_fill_single_arguments() {
        let t = Target { service: "web".into(), addr: "10.1.0.7".parse().unwrap(), port: Some(80) };
        let argv: Vec<String> =
            ["ssh", "check@{backend}", "--svc={service} {port}", "$LB_BACKEND"].map(String::from).to_vec();
        assert_eq!(expand(&argv, &t), ["ssh", "check@10.1.0.7", "--svc=web 80", "$LB_BACKEND"]);
    }

    #[test]
    fn weight_tokens() {
        assert_eq!(weight_token("OK - load 0.3 weight=40"), Some(40));
        assert_eq!(weight_token("WARNING: busy; weight=5 | load=3"), Some(5));
        assert_eq!(weight_token("OK weight=abc"), None);
        assert_eq!(weight_token("OK heavyweight=3"), None);
        assert_eq!(weight_token(""), None);
    }
}
