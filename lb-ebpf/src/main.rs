//! The XDP object: the balancer and a pass-through program for veth peers (benchmark and
//! test helpers live in `lb-xdp-test`, which a director never loads). Built for
//! `bpfel-unknown-none`; on the host this is an empty program.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
