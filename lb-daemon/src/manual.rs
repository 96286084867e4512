//! Man pages and shell completions, generated from the command line's own definition (so
//! they cannot drift from it) and, for the configuration file, from the documented
//! example the package installs.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};

/// Writes `lb-daemon.8`, one `lb-daemon-COMMAND.8` per command, and `lb-daemon.yaml.5`
/// into `dir`.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let mut write = |name: String, page: &dyn Fn(&mut Vec<u8>) -> std::io::Result<()>| -> Result<()> {
        let mut out = Vec::new();
        page(&mut out).with_context(|| format!("rendering {name}"))?;
        std::fs::write(dir.join(&name), out)
            .with_context(|| format!("writing {}", dir.join(&name).display()))?;
        written.push(name);
        Ok(())
    };
    let cmd = cmd.display_name("lb-daemon");
    write("lb-daemon.8".into(), &|out| clap_mangen::Man::new(cmd.clone()).section("8").render(out))?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("lb-daemon-{}", sub.get_name());
        let page = sub.clone().display_name(name.clone()).bin_name(format!("lb-daemon {}", sub.get_name()));
        write(format!("{name}.8"), &|out| clap_mangen::Man::new(page.clone()).section("8").render(out))?;
    }
    write("lb-daemon.yaml.5".into(), &|out| out.write_all(config_page().as_bytes()))?;
    Ok(written)
}

/// roff escapes for text inside a no-fill block: backslashes, and a leading `.` or `'`
/// that would read as a request.
fn roff_literal(line: &str) -> String {
    let line = line.replace('\\', "\\e");
    if line.starts_with('.') || line.starts_with('\'') { format!("\\&{line}") } else { line }
}

/// `lb-daemon.yaml(5)`: how the file is read, then the annotated example, every key with
/// its default.
fn config_page() -> String {
    let mut page = format!(
        ".TH LB-DAEMON.YAML 5 \"\" \"lb-daemon {}\" \"File formats\"\n\
         .SH NAME\n\
         lb-daemon.yaml \\- configuration of the lb-daemon XDP load balancer\n\
         .SH SYNOPSIS\n\
         /etc/lb\\-daemon/lb.yaml\n\
         .SH DESCRIPTION\n\
         YAML: the director (interfaces, listeners, map sizes), fwmark\\-style classifier rules, \
         services with their backends and health checks, and policy routing. \
         Unknown and duplicate keys are errors; errors name file:line:column and the key path.\n\
         .PP\n\
         .B lb\\-daemon check \\-c FILE\n\
         validates a file without touching the system;\n\
         .B systemctl reload lb\\-daemon\n\
         applies it (a refused file changes nothing).\n\
         The file the package installs is this page's example:\n\
         .B lb\\-daemon run\n\
         refuses it until it is edited for the host.\n\
         .SH EXAMPLE\n\
         Every key, with its default and what it does:\n\
         .PP\n\
         .nf\n",
        env!("CARGO_PKG_VERSION")
    );
    for line in lb_daemon::config::SHIPPED_EXAMPLE.lines() {
        page.push_str(&roff_literal(line));
        page.push('\n');
    }
    page.push_str(
        ".fi\n\
         .SH FILES\n\
         /etc/lb\\-daemon/lb.yaml, /var/lib/lb\\-daemon/overrides.json (runtime overrides), \
         /run/lb\\-daemon/control.sock, /sys/fs/bpf/lb\n\
         .SH SEE ALSO\n\
         .BR lb\\-daemon (8),\n\
         /usr/share/doc/lb\\-daemon/operating.md\n",
    );
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roff_requests_in_the_example_are_escaped() {
        assert_eq!(roff_literal(".SH x"), "\\&.SH x");
        assert_eq!(roff_literal("a \\ b"), "a \\e b");
        assert_eq!(roff_literal("  key: 1"), "  key: 1");
    }
}
