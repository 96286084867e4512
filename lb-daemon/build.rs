//! Builds the XDP object with the nightly toolchain (`-Z build-std=core`,
//! `bpfel-unknown-none`, bpf-linker) and leaves it in OUT_DIR for `include_bytes_aligned!`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_root = std::path::Path::new(&dir).join("../lb-ebpf");
    let ebpf_root = ebpf_root.to_str().context("lb-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir: ebpf_root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
