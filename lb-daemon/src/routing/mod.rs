//! Everything that talks rtnetlink lives here.
pub mod neighbour;
pub mod policy;
