//! `cargo xtask bench e2e` keeps working: in quick mode every variant of the end-to-end
//! benchmark (the kernel's forwarding and nftables DNAT, the XDP floor, the floor with a
//! table read, our direct routing,
//! tunnel and masquerading, for UDP and TCP SYN frames) runs once, and the benchmark's own
//! checks hold: only frames in the form the variant must deliver count at the sink, and any
//! other frame arriving there fails the run. No rate is judged: too few frames to measure.

use std::process::Command;

#[test]
fn every_end_to_end_variant_delivers_its_frames_as_it_must() {
    let out = Command::new(env!("CARGO_BIN_EXE_lb-bench"))
        .args(["e2e", "--quick"])
        .output()
        .expect("running lb-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "lb-bench e2e --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for variant in [
        "kernel forwarding",
        "nftables DNAT",
        "XDP floor (",
        "XDP floor + a 1M-entry table read",
        "lb direct routing",
        "lb tunnel",
        "lb masquerade",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(variant))
            .unwrap_or_else(|| panic!("no row for {variant} in:\n{stdout}"));
        // UDP and TCP SYN, 1,024 and 65,536 flows: four rates, each of delivered frames.
        let rates: Vec<f64> =
            row.split_whitespace().rev().take(4).map(|v| v.parse().expect("a rate")).collect();
        assert!(rates.len() == 4 && rates.iter().all(|r| *r > 0.0), "{variant}: {row}");
    }
}
