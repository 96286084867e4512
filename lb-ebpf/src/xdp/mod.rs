//! One concern per module, as in Katran's `lib/bpf`: maps, classification, connection
//! tracking and scheduling, forwarding, counters; `programs` wires them into entry points.
mod classify;
mod conntrack;
mod flow_table;
mod forward;
mod fragments;
mod maps;
mod nat;
mod programs;
mod stats;
mod too_big;
