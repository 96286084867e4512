//! Routing: `decl` is what the configuration declares (plain data); `neighbour` and
//! `policy` are the only code in the daemon that talks rtnetlink.
pub mod decl;
pub mod neighbour;
pub mod policy;
