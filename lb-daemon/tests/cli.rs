//! `lb-daemon check` and `decap`, as an operator or a deploy pipeline calls them: exit
//! status and message.

use std::process::Command;

fn check(yaml: &str) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!("lb-cli-{}-{}", std::process::id(), yaml.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("lb.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_lb-daemon")).arg("check").arg("-c").arg(&file).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).replace(&file.display().to_string(), "FILE"),
    )
}

#[test]
fn check_accepts_a_valid_file_and_says_what_it_holds() {
    let yaml = "director:\n  interfaces: [eth0]\nservices:\n  - name: web\n    match: { vip: 192.0.2.10, port: 80 }\n    backends: [{ address: 10.1.0.1 }, { address: 10.1.0.2 }]\n";
    let (ok, stdout, _) = check(yaml);
    assert!(ok);
    // The digest is the text's SHA-256, as sha256sum prints it for the file.
    let mut sha = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut sha.stdin.take().unwrap(), yaml.as_bytes()).unwrap();
    let sum = String::from_utf8(sha.wait_with_output().unwrap().stdout).unwrap();
    let digest = sum.split_whitespace().next().unwrap();
    assert!(
        stdout.ends_with(&format!(
            "ok (1 services, 2 backends, 0 mark rules, interfaces eth0); sha256 {digest}\n"
        )),
        "{stdout}"
    );
}

#[test]
fn check_refuses_with_location_and_a_failing_exit_status() {
    let (ok, _, stderr) = check(
        "director:\n  interfaces: [eth0]\nservices:\n  - name: web\n    match: { vip: 192.0.2.10, port: 80 }\n    ring_size: 4096\n",
    );
    assert!(!ok);
    assert_eq!(
        stderr.trim_end(),
        "lb-daemon: FILE:6:16: services[0].ring_size: ring size 4096 is not a prime (Maglev needs one; e.g. 4093, 16381, 65537)"
    );
}

#[test]
fn check_refuses_what_only_planning_finds() {
    // Nine rules under one destination prefix: more than the data path holds per prefix.
    let mut yaml = String::from("director:\n  interfaces: [eth0]\nmarks:\n");
    for m in 1..=9 {
        yaml.push_str(&format!("  - {{ mark: {m}, dst: 192.0.2.0/24, ports: {} }}\n", 1000 + m));
    }
    let (ok, _, stderr) = check(&yaml);
    assert!(!ok);
    assert!(stderr.contains("192.0.2.0/24 falls under more than 8 mark rules"), "{stderr}");
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/lb-daemon.service"))
        .unwrap();
    for key in ["Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure", "WatchdogSec="] {
        assert!(unit.lines().any(|l| l.starts_with(key)), "{key} missing from the unit");
    }
    // systemd-analyze checks that the binaries exist: point them at this build.
    let dir = std::env::temp_dir().join(format!("lb-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb-daemon.service");
    std::fs::write(&path, unit.replace("/usr/sbin/lb-daemon", env!("CARGO_BIN_EXE_lb-daemon"))).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        // The man pages it names are the package's (its test verifies the installed unit).
        .arg("--man=no")
        .arg(&path)
        .output()
        .expect("systemd-analyze (apt: systemd)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lb-daemon")).args(args).output().unwrap()
}

#[test]
fn decap_names_a_missing_interface_and_finds_nothing_attached() {
    let dir = std::env::temp_dir().join(format!("lb-decap-cli-{}", std::process::id()));
    let out = lb(&["decap", "attach", "nosuch0", "--bpf-dir", dir.to_str().unwrap_or_default()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("interface nosuch0 does not exist"), "{out:?}");
    let out = lb(&["decap", "status", "--bpf-dir", dir.to_str().unwrap_or_default()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("not attached anywhere"), "{out:?}");
    assert!(!dir.exists(), "status created {}", dir.display());
}

#[test]
fn verify_probes_every_kernel_feature_then_loads_the_object() {
    let out = lb(&["verify", "--ring-slots", "4093", "--flow-entries", "1024"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let features: Vec<&str> = stdout.lines().filter(|l| l.contains("(Linux ")).collect();
    assert_eq!(features.len(), 24, "{stdout}");
    assert!(
        features.iter().all(|l| l.trim_start().starts_with("ok ")),
        "this 6.x kernel has them all:\n{stdout}"
    );
    assert!(
        stdout.contains("bpf_ktime_get_coarse_ns (the connection table's clock) (Linux 5.11)"),
        "{stdout}"
    );
    assert!(
        stdout.lines().last().is_some_and(|l| l.starts_with("ok: ") && l.ends_with("nothing attached")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.ends_with("instructions verified  lb_balancer (the kernel's limit: 1000000)")),
        "{stdout}"
    );
    // The helper probe tells a helper XDP cannot call (bpf_override_return is for kprobes)
    // from one it can: what makes a missing one show as MISSING on an older kernel.
    use aya::sys::{BpfHelper, is_helper_supported};
    let xdp = aya::programs::ProgramType::Xdp;
    assert_eq!(is_helper_supported(xdp, BpfHelper::BPF_FUNC_override_return).ok(), Some(false));
    assert_eq!(is_helper_supported(xdp, BpfHelper::BPF_FUNC_ktime_get_coarse_ns).ok(), Some(true));
}
