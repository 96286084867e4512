//! The daemon's layers, checked: every `crate::` and `super::` path in `lb-daemon/src`
//! must point at its own layer's group or at a lower layer. One crate keeps one binary,
//! one test harness and one set of features; this check gives the boundaries a crate per
//! layer would give, and `cargo xtask test` runs it first.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// Module path prefix -> layer. Lower layers never name higher ones; modules of one layer
/// name only themselves (their group, the first path segment) and lower layers. The
/// crate root (`error_chain`) is below everything.
pub const LAYERS: &[(&str, u8)] = &[
    // Plain types, limits, conversions; the health checks' and routing's declarations.
    ("model", 0),
    ("health::spec", 0),
    ("routing::decl", 0),
    // Pure algorithms over the model.
    ("maglev", 1),
    ("wrr", 1),
    // YAML -> model; model -> the state the maps should hold.
    ("config", 2),
    ("plan", 2),
    // The runtimes: BPF maps, health checkers, netlink.
    ("dataplane", 3),
    ("health", 3),
    ("routing", 3),
    // Readers.
    ("snapshot", 4),
    ("metrics", 5),
    ("status_json", 5),
    // The daemon itself.
    ("control", 6),
    // The binary's own: its man pages.
    ("manual", 7),
];

/// The layer of a module path (`health::board`); `None` for one the table does not know.
fn layer(module: &str) -> Option<u8> {
    if module.is_empty() {
        return Some(0);
    }
    LAYERS
        .iter()
        .filter(|(prefix, _)| module == *prefix || module.starts_with(&format!("{prefix}::")))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|&(_, l)| l)
}

fn group(module: &str) -> &str {
    module.split("::").next().unwrap_or("")
}

/// `health/board.rs` -> `health::board`, `health/mod.rs` -> `health`, `lib.rs` -> ``.
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if stem != "mod" && stem != "lib" {
            parts.push(stem.to_owned());
        }
    }
    parts.join("::")
}

fn parent(module: &str) -> String {
    module.rsplit_once("::").map_or(String::new(), |(p, _)| p.to_owned())
}

/// The first path after each `crate::`/`super::` (the items of a `{...}` group each
/// count), as full paths from the crate root. `base` is what `super` means here.
fn references(code: &str, base: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for (root, prefix) in [("crate::", String::new()), ("super::", base.to_owned())] {
        let mut from = 0;
        while let Some(i) = code[from..].find(root).map(|i| i + from) {
            from = i + root.len();
            let word_start = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
            // `super::super::` is resolved by the first match's continuation below.
            if !word_start || (root == "super::" && i >= 7 && &code[i - 7..i] == "super::") {
                continue;
            }
            let join =
                |path: &str| if prefix.is_empty() { path.to_owned() } else { format!("{prefix}::{path}") };
            let rest = &code[from..];
            if let Some(group) = rest.strip_prefix('{') {
                let mut depth = 1;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 || (depth == 1 && c == ',') {
                        let path = path_of(item.trim_start_matches(['{', ' ', '\n']));
                        if !path.is_empty() && path != "self" {
                            out.push(join(&path));
                        }
                        item.clear();
                        if depth == 0 {
                            break;
                        }
                    } else {
                        item.push(c);
                    }
                }
            } else {
                let mut path = path_of(rest);
                let mut base = prefix.clone();
                while let Some(up) = path.strip_prefix("super::") {
                    base = parent(&base);
                    path = up.to_owned();
                }
                out.push(if base.is_empty() || root == "crate::" {
                    join(&path)
                } else {
                    format!("{base}::{path}")
                });
            }
        }
    }
    out
}

/// The leading `a::b::c` of `s` (identifiers and `::`, stopping at anything else).
fn path_of(s: &str) -> String {
    let mut end = 0;
    let b = s.as_bytes();
    while end < b.len() {
        if b[end].is_ascii_alphanumeric() || b[end] == b'_' {
            end += 1;
        } else if s[end..].starts_with("::")
            && s[end + 2..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        {
            end += 2;
        } else {
            break;
        }
    }
    s[..end].to_owned()
}

/// Lines that are comments say nothing about imports (doc links may name any module).
fn code_of(text: &str) -> String {
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// Every reference that points up or sideways, as `file: module -> target`.
pub fn violations(files: &[(String, String)]) -> Vec<String> {
    let modules: BTreeSet<&str> = files.iter().map(|(m, _)| m.as_str()).collect();
    let mut found = Vec::new();
    for (module, text) in files {
        let code = code_of(text);
        // The test module of a file sees its file's module as `super`.
        let (main, tests) = match code.find("#[cfg(test)]\nmod tests") {
            Some(i) => code.split_at(i),
            None => (code.as_str(), ""),
        };
        let Some(own) = layer(module) else {
            found.push(format!("{module}: not in the layer table (xtask/src/layers.rs)"));
            continue;
        };
        for (part, base) in [(main, parent(module)), (tests, module.clone())] {
            for target in references(part, &base) {
                // The longest prefix that is a module; what follows is an item in it.
                let segments: Vec<&str> = target.split("::").collect();
                let target_module = (0..=segments.len())
                    .rev()
                    .map(|n| segments[..n].join("::"))
                    .find(|m| m.is_empty() || modules.contains(m.as_str()))
                    .unwrap_or_default();
                let Some(theirs) = layer(&target_module) else { continue };
                let same_group = !target_module.is_empty() && group(&target_module) == group(module);
                let allowed = theirs < own || (same_group && theirs <= own) || target_module == *module;
                if !allowed {
                    found.push(format!(
                        "{module} (layer {own}) uses {target} (layer {theirs}{})",
                        if theirs == own { ", another module of the same layer" } else { "" }
                    ));
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Fails, listing them, when any module of `lb-daemon/src` imports upward.
pub fn check(workspace: &Path) -> Result<()> {
    let src = workspace.join("lb-daemon/src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths)?;
    let mut files = Vec::new();
    for path in paths {
        let rel = path.strip_prefix(&src)?;
        if rel == Path::new("main.rs") {
            // The binary is its own crate, on top of the library.
            continue;
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        files.push((module_of(rel), text));
    }
    let found = violations(&files);
    if !found.is_empty() {
        bail!("imports that point up a layer (see xtask/src/layers.rs):\n  {}", found.join("\n  "));
    }
    println!("layers: {} modules of lb-daemon, no import points up", files.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(m, t)| (m.to_string(), t.to_string())).collect()
    }

    const TREE: &[(&str, &str)] = &[
        ("", "pub mod model; pub mod plan; pub mod config; pub mod health; pub mod control;"),
        ("model", "pub struct Spec;"),
        ("health", "pub mod spec; pub mod board;"),
        ("health::spec", "pub struct Check;"),
        ("plan", ""),
        ("config", ""),
        ("dataplane", ""),
        ("control", ""),
    ];

    fn with(module: &str, text: &str) -> Vec<String> {
        let mut list = files(TREE);
        list.retain(|(m, _)| m != module);
        list.push((module.to_owned(), text.to_owned()));
        violations(&list)
    }

    #[test]
    fn downward_and_own_group_imports_pass() {
        assert!(with("plan", "use crate::model::Spec;\nuse crate::error_chain;").is_empty());
        assert!(
            with("health::board", "use super::spec::Check;\nuse crate::{model::Spec, config::Config};")
                .is_empty()
        );
        assert!(with("control", "use crate::{health::board::Board, plan::{Plan, Planner}};").is_empty());
    }

    #[test]
    fn upward_and_sideways_imports_are_named() {
        let v = with("plan", "use crate::dataplane::DataplaneState;");
        assert_eq!(v, ["plan (layer 2) uses dataplane::DataplaneState (layer 3)"]);
        let v = with("config", "use crate::{model::Spec, plan::Planner};");
        assert_eq!(v, ["config (layer 2) uses plan::Planner (layer 2, another module of the same layer)"]);
        let v = with("health::spec", "use super::board::Entry;");
        assert_eq!(v, ["health::spec (layer 0) uses health::board::Entry (layer 3)"]);
        let v = with("model", "fn f() { crate::control::run() }");
        assert_eq!(v, ["model (layer 0) uses control::run (layer 6)"]);
    }

    #[test]
    fn comments_do_not_count_and_tests_see_their_file_as_super() {
        assert!(with("model", "/// See [`crate::control::run`].\npub struct A;").is_empty());
        let text =
            "pub struct A;\n#[cfg(test)]\nmod tests {\n    use super::*;\n    use crate::plan::Planner;\n}";
        assert_eq!(with("model", text), ["model (layer 0) uses plan::Planner (layer 2)"]);
    }

    #[test]
    fn an_unknown_module_must_be_placed() {
        assert_eq!(with("tunnel", ""), ["tunnel: not in the layer table (xtask/src/layers.rs)"]);
    }
}
