//! Pure, host-testable parts of the XDP data path. The programs themselves are in
//! `main.rs`, built for `bpfel-unknown-none` by `lb-daemon`'s build script.
#![cfg_attr(not(any(test, feature = "testpkt")), no_std)]

pub mod csum;
pub mod decap;
pub mod parse;
#[cfg(any(test, feature = "testpkt"))]
pub mod testpkt;

/// The one panic handler of every XDP object built from this crate. The verifier proves
/// every path terminates, so no panic is reachable at run time.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
