//! Config fuzzing: structure-aware mutations of the example configs (keys dropped or
//! added, values swapped for hostile ones, subtrees moved, lists grown, aliases) and
//! text-level ones, each run through `check` as the CLI runs it. Every input must end in
//! success or an error that says where (a line and column, or the service it concerns),
//! without a panic, within a bounded time. `LB_FUZZ_CONFIGS` sets how many (default
//! 2,000; `cargo xtask fuzz` runs 100,000), `LB_FUZZ_SEED` the seed.

use std::sync::mpsc;
use std::time::Duration;

use lb_daemon::config::ConfigError;
use lb_daemon::control::{ControlError, check_text};
use serde_json::Value;

const EXAMPLES: [&str; 3] = [
    include_str!("../../configs/lb.example.yaml"),
    include_str!("../../configs/lab.yaml"),
    include_str!("../../configs/agentless-ssh.yaml"),
];

/// How long one input may take before the run counts as hung.
const HANG: Duration = Duration::from_secs(20);

/// Values written over a scalar: wrong types, limits and just past them, hostile strings.
fn hostile_value(rng: &mut fastrand::Rng) -> Value {
    let pick: [Value; 24] = [
        Value::Null,
        Value::Bool(true),
        0.into(),
        (-1).into(),
        65535.into(),
        65536.into(),
        4294967295u64.into(),
        u64::MAX.into(),
        1.5.into(),
        "".into(),
        "x".repeat(300).into(),
        "0.0.0.0".into(),
        "255.255.255.255".into(),
        "::".into(),
        "192.0.2.1/33".into(),
        "10.0.0.1/8".into(),
        "2001:db8::1".into(),
        "eth0\u{0}".into(),
        "1-0".into(),
        "65535-65536".into(),
        "0s".into(),
        "1000000h".into(),
        Value::Array(vec![]),
        serde_json::json!({"unknown": 1}),
    ];
    pick[rng.usize(..pick.len())].clone()
}

/// Every node of the tree, as a path of indices and keys.
fn paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                at.push(k.clone());
                paths(child, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                at.push(i.to_string());
                paths(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn node<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, step| match v {
        Value::Object(m) => m.get_mut(step),
        Value::Array(a) => a.get_mut(step.parse::<usize>().ok()?),
        _ => None,
    })
}

fn mutate_tree(rng: &mut fastrand::Rng, v: &mut Value) {
    for _ in 0..1 + rng.usize(..4) {
        let mut all = Vec::new();
        paths(v, &mut Vec::new(), &mut all);
        let target = all[rng.usize(..all.len())].clone();
        let donor = all[rng.usize(..all.len())].clone();
        let donor_value = node(v, &donor).cloned().unwrap_or(Value::Null);
        let Some(n) = node(v, &target) else { continue };
        match rng.usize(..6) {
            0 => *n = hostile_value(rng),
            1 => *n = donor_value,
            2 => match n {
                Value::Object(m) if !m.is_empty() => {
                    let k = m.keys().nth(rng.usize(..m.len())).cloned().unwrap_or_default();
                    m.remove(&k);
                }
                Value::Array(a) if !a.is_empty() => {
                    let i = rng.usize(..a.len());
                    a.remove(i);
                }
                _ => *n = Value::Null,
            },
            3 => match n {
                Value::Array(a) if !a.is_empty() => {
                    let item = a[rng.usize(..a.len())].clone();
                    for _ in 0..1 + rng.usize(..50) {
                        a.push(item.clone());
                    }
                }
                Value::Object(m) => {
                    m.insert(
                        ["bogus", "name", "backends", "check", "weight"][rng.usize(..5)].into(),
                        hostile_value(rng),
                    );
                }
                _ => *n = Value::Array(vec![n.clone()]),
            },
            4 => *n = Value::Array(vec![n.clone(), n.clone()]),
            _ => {
                if let Value::Object(m) = n {
                    m.insert("extra".into(), donor_value);
                }
            }
        }
    }
}

/// Text-level damage: YAML punctuation, indentation, aliases, cut short.
fn mutate_text(rng: &mut fastrand::Rng, text: &str) -> String {
    let mut t: Vec<char> = text.chars().collect();
    for _ in 0..1 + rng.usize(..4) {
        let at = rng.usize(..t.len() + 1);
        match rng.usize(..5) {
            0 => {
                let bits = [
                    ":", "- ", "[", "{", "}", "]", "&a ", "*a", "!!str ", "\t", "'", "\"", "\n", "#", "  ",
                    "\u{feff}", "?",
                ];
                t.splice(at..at, bits[rng.usize(..bits.len())].chars());
            }
            1 if at < t.len() => {
                t.remove(at);
            }
            2 => t.truncate(at),
            3 => {
                let bomb = "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c]\n";
                let line_start = t[..at].iter().rposition(|c| *c == '\n').map_or(0, |i| i + 1);
                t.splice(line_start..line_start, bomb.chars());
            }
            _ if at < t.len() => t[at] = char::from(b' ' + rng.usize(..95) as u8),
            _ => {}
        }
    }
    t.into_iter().collect()
}

/// Whether an error says where: a line and column for everything the file holds, the
/// service or limit by name for what planning refuses.
fn located(e: &ControlError) -> bool {
    fn config_located(e: &ConfigError) -> bool {
        match e {
            ConfigError::Invalid { line, path, message, .. } => {
                *line >= 1 && !path.is_empty() && !message.is_empty()
            }
            ConfigError::Several { errors, .. } => errors.len() >= 2 && errors.iter().all(config_located),
            _ => false,
        }
    }
    match e {
        ControlError::Config(c) => config_located(c),
        ControlError::Plan(p) => !lb_daemon::error_chain(p).is_empty(),
        _ => false,
    }
}

#[test]
fn mutated_configs_end_in_success_or_a_located_error() {
    let count: u64 = std::env::var("LB_FUZZ_CONFIGS").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000);
    let seed: u64 = std::env::var("LB_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0xc0f1_9f22);
    let trees: Vec<Value> = EXAMPLES
        .iter()
        .map(|t| serde_saphyr::from_str::<Value>(t).expect("an example config parses as a tree"))
        .collect();
    let (jobs, inbox) = mpsc::channel::<String>();
    let (results, outbox) = mpsc::channel::<Result<bool, String>>();
    // One worker runs the checks, so that a hang is seen (by the timeout below) rather than
    // waited for forever, and a panic is caught and reported with its input.
    let worker = std::thread::spawn(move || {
        for text in inbox {
            let outcome = std::panic::catch_unwind(|| check_text(&text, "fuzz.yaml"));
            let verdict = match outcome {
                Ok(Ok(_)) => Ok(true),
                Ok(Err(e)) if located(&e) => Ok(false),
                Ok(Err(e)) => Err(format!("an error without a location: {}", lb_daemon::error_chain(&e))),
                Err(_) => Err("a panic".to_owned()),
            };
            if results.send(verdict).is_err() {
                return;
            }
        }
    });
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut ok, mut refused) = (0u64, 0u64);
    for i in 0..count {
        let which = rng.usize(..EXAMPLES.len());
        let text = if rng.usize(..2) == 0 {
            let mut tree = trees[which].clone();
            mutate_tree(&mut rng, &mut tree);
            // JSON is YAML: the mutated tree goes to `check` as a one-line file.
            serde_json::to_string(&tree).expect("a tree serializes")
        } else {
            mutate_text(&mut rng, EXAMPLES[which])
        };
        jobs.send(text.clone()).expect("the worker is alive");
        match outbox.recv_timeout(HANG) {
            Ok(Ok(true)) => ok += 1,
            Ok(Ok(false)) => refused += 1,
            Ok(Err(why)) => panic!("input {i} (LB_FUZZ_SEED={seed}): {why}\n{text}"),
            Err(_) => panic!("input {i} (LB_FUZZ_SEED={seed}) did not finish within {HANG:?}:\n{text}"),
        }
    }
    drop(jobs);
    worker.join().expect("the worker ends");
    println!("{count} configs: {ok} accepted, {refused} refused with a location");
    assert!(ok > 0 && refused > count / 2, "{ok} accepted, {refused} refused: the mutations miss");
    // Memory stays bounded: alias expansion and long values are capped by the parser.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(peak_kib < 1 << 20, "the check run peaked at {peak_kib} KiB");
}
