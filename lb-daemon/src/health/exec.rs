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
/// Error output read at most; only its last non-empty line is kept, cut to
/// [`MAX_LINE`] characters.
const MAX_STDERR: u64 = 64 * 1024;
const MAX_LINE: usize = 200;

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
    /// Exited (`None`: killed by a signal), with its first output line and the last
    /// non-empty line it wrote to stderr (where ssh says why it failed).
    Exited { code: Option<i32>, first_line: String, last_stderr: String },
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
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let (mut child, _registered) = match super::children::spawn_registered(|| cmd.spawn(), |c| c.id()) {
        Ok(c) => c,
        Err(e) => {
            return Run::Failed {
                message: format!("running {program}: {e}"),
                director: is_director_error(&e),
            };
        }
    };
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_out = async {
            if let Some(s) = stdout.as_mut() {
                // A program that closes stdout early still gets waited for below.
                let _ = s.take(MAX_OUTPUT).read_to_end(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.take(MAX_STDERR).read_to_end(&mut err).await;
            }
        };
        tokio::join!(read_out, read_err);
        let status = child.wait().await;
        (status, out, err)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((Ok(status), out, err)) => {
            let text = String::from_utf8_lossy(&out);
            let first_line = text.lines().next().unwrap_or("").trim().to_owned();
            let err = String::from_utf8_lossy(&err);
            let last = err.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("");
            let last_stderr = last.chars().take(MAX_LINE).collect();
            Run::Exited { code: status.code(), first_line, last_stderr }
        }
        Ok((Err(e), ..)) => {
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
        Run::Exited { code, first_line, last_stderr } => {
            let outcome = code.map_or(Outcome::Unknown, Outcome::from_exit_code);
            let (message, doubt) = verdict_message(&program, code, &first_line, &last_stderr);
            // Killed by a signal: not a verdict.
            Report { outcome, weight: weight_token(&first_line), message, doubt }
        }
        // A plugin that cannot start (missing, not executable) is UNKNOWN, as Nagios has
        // it; a director out of processes or descriptors has no verdict at all.
        Run::Failed { message, director } => Report {
            outcome: if director { Outcome::DirectorError } else { Outcome::Unknown },
            weight: None,
            message,
            doubt: None,
        },
        Run::TimedOut => {
            Report::critical(format!("{program}: no verdict within {timeout:?} (process group killed)"))
        }
    }
}

/// What status and the log say of a plugin's run: its first output line when it gave a
/// verdict (exit 0-3) with one; otherwise the exit status with the last line of its error
/// output (ssh says there why it failed: a refused connection, a changed host key, an
/// unreadable key). A WARNING whose line does not say WARNING is flagged: a plugin says its
/// state on its first line, and exit 1 with other words is likely not the plugin's, such as
/// a `nologin` shell refusing the forced command ("This account is currently not
/// available."), which would keep a dead server up.
pub fn verdict_message(
    program: &str,
    code: Option<i32>,
    first_line: &str,
    last_stderr: &str,
) -> (String, Option<&'static str>) {
    let verdict = code.is_some_and(|c| (0..=3).contains(&c));
    if verdict && !first_line.is_empty() {
        if code == Some(1) && !first_line.to_ascii_uppercase().contains("WARN") {
            let doubt = "exit 1 (WARNING) without a plugin's WARNING line: is the account's shell refusing the command?";
            return (format!("{first_line} [{doubt}]"), Some(doubt));
        }
        return (first_line.to_owned(), None);
    }
    let mut m =
        format!("{program}: exit status {}", code.map_or("none (signal)".to_owned(), |c| c.to_string()));
    if !last_stderr.is_empty() {
        m.push_str(": ");
        m.push_str(last_stderr);
    }
    if !first_line.is_empty() {
        m.push_str(&format!(" (output: {first_line})"));
    }
    (m, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_fill_single_arguments() {
        let t =
            Target { service: "web".into(), addr: "10.1.0.7".parse().unwrap(), port: Some(80), tunnel: None };
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

#[cfg(test)]
mod verdict_tests {
    use super::verdict_message;

    #[test]
    fn messages_say_why() {
        let m = |code, out: &str, err: &str| verdict_message("/usr/bin/ssh", code, out, err);
        assert_eq!(m(Some(0), "HTTP OK: 200", "Warning: Permanently added"), ("HTTP OK: 200".into(), None));
        assert_eq!(m(Some(2), "HTTP CRITICAL: refused", ""), ("HTTP CRITICAL: refused".into(), None));
        assert_eq!(m(Some(1), "HTTP WARNING: slow", ""), ("HTTP WARNING: slow".into(), None));
        let (msg, doubt) = m(Some(1), "This account is currently not available.", "");
        assert!(doubt.is_some() && msg.starts_with("This account is currently not available. ["), "{msg}");
        assert_eq!(
            m(Some(255), "", "Host key verification failed."),
            ("/usr/bin/ssh: exit status 255: Host key verification failed.".into(), None)
        );
        assert_eq!(
            m(Some(2), "", "lbcheck@10.1.0.11: Permission denied (publickey)."),
            ("/usr/bin/ssh: exit status 2: lbcheck@10.1.0.11: Permission denied (publickey).".into(), None)
        );
        assert_eq!(m(None, "", ""), ("/usr/bin/ssh: exit status none (signal)".into(), None));
        assert_eq!(
            m(Some(7), "partial", "boom"),
            ("/usr/bin/ssh: exit status 7: boom (output: partial)".into(), None)
        );
    }
}
