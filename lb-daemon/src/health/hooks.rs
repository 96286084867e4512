//! Hooks on state changes: an argv run on every up/down/timeout change of a backend, with
//! the service, the server and the old and new states in its environment (and as
//! `{service}`, `{backend}`, `{from}`, `{to}` in its arguments). Each runs in a task of its
//! own, bounded by a timeout: a slow hook never delays checks or other hooks.

use super::board::Event;
use super::exec::{Run, run_bounded};
use super::spec::Hook;

fn fill(arg: &str, e: &Event) -> String {
    arg.replace("{service}", &e.service)
        .replace("{backend}", &e.backend.to_string())
        .replace("{from}", e.transition.from.name())
        .replace("{to}", e.transition.to.name())
}

/// Runs the hook for `event`; returns how it ended (for logs and tests).
pub async fn run(hook: &Hook, event: &Event) -> Run {
    let argv: Vec<String> = hook.argv.iter().map(|a| fill(a, event)).collect();
    let env = [
        ("LB_SERVICE", event.service.clone()),
        ("LB_BACKEND", event.backend.to_string()),
        ("LB_OLD_STATE", event.transition.from.name().to_owned()),
        ("LB_NEW_STATE", event.transition.to.name().to_owned()),
        ("LB_CHECK_MESSAGE", event.message.clone()),
    ];
    run_bounded(&argv, &env, hook.timeout).await
}

/// Starts the hook in the background and logs how it ended.
pub fn fire(hook: &Hook, event: &Event) {
    let (hook, event) = (hook.clone(), event.clone());
    tokio::spawn(async move {
        let program = hook.argv.first().cloned().unwrap_or_default();
        let (service, backend, to) = (event.service.as_str(), event.backend, event.transition.to.name());
        match run(&hook, &event).await {
            Run::Exited { code: Some(0), .. } => {
                tracing::debug!(service, %backend, to, program, "state-change hook done");
            }
            Run::Exited { code, first_line, last_stderr } => {
                tracing::warn!(service, %backend, to, program, ?code, output = first_line, error = last_stderr, "state-change hook failed");
            }
            Run::Failed { message, .. } => {
                tracing::warn!(service, %backend, to, why = message, "state-change hook did not run")
            }
            Run::TimedOut => {
                tracing::warn!(service, %backend, to, program, timeout = ?hook.timeout, "state-change hook killed at its timeout")
            }
        }
    });
}
