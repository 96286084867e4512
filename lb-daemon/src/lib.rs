//! The load balancer daemon as a library: the binary and the tests drive the same code.
//!
//! Data flows one way: specs -> [`plan`] (pure, with [`maglev`]) -> [`dataplane`] (the
//! only module that touches BPF maps). [`routing`] is the only one that talks rtnetlink.
pub mod dataplane;
pub mod maglev;
pub mod plan;
pub mod routing;
