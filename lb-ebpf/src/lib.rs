//! Pure, host-testable parts of the XDP data path. The programs themselves are in
//! `main.rs`, built for `bpfel-unknown-none` by `lb-daemon`'s build script.
#![cfg_attr(not(any(test, feature = "testpkt")), no_std)]

pub mod csum;
pub mod parse;
#[cfg(any(test, feature = "testpkt"))]
pub mod testpkt;
