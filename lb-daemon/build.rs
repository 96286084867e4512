//! Builds the XDP objects with the nightly toolchain (`-Z build-std=core`,
//! `bpfel-unknown-none`, bpf-linker) and leaves them in OUT_DIR: `lb-xdp`, which the
//! daemon embeds, and `lb-xdp-test`, whose path goes to `lb-tests` and nowhere else.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_root = std::path::Path::new(&dir).join("../lb-ebpf");
    let ebpf_root = ebpf_root.to_str().context("lb-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir: ebpf_root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )?;
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    println!("cargo::metadata=test_object={out_dir}/lb-xdp-test");
    Ok(())
}
