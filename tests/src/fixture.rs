//! Running packets through the loaded balancer with `BPF_PROG_TEST_RUN`, and predicting
//! what it should do with them.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::{Backend, FAMILY_V6, SERVICE_F_HASH_TUPLE, hash};
use lb_daemon::dataplane::Dataplane;
use lb_daemon::model::{BackendSpec, ServiceMatch, ServiceSpec, service_key};
use lb_daemon::plan::DataplaneState;
use lb_ebpf::parse;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Runs one frame through the balancer; returns the action and the frame as it left.
pub fn test_run(dp: &Dataplane, input: &[u8]) -> Result<(u32, Vec<u8>)> {
    run_program(dp, lb_common::programs::BALANCER, input, 1)
}

/// The `struct xdp_md` a test run takes to receive a frame of `len` bytes on `ifindex`
/// (its first queue).
pub fn xdp_md(len: usize, ifindex: u32) -> Vec<u8> {
    // data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let md: [u32; 6] = [0, len as u32, 0, ifindex, 0, 0];
    md.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// Runs one frame through the balancer as if received on interface `ifindex` (which must
/// exist in the calling thread's namespace); returns the action.
pub fn test_run_on(dp: &Dataplane, input: &[u8], ifindex: u32) -> Result<u32> {
    let ctx = xdp_md(input.len(), ifindex);
    let res = dp
        .program(lb_common::programs::BALANCER)?
        .test_run(TestRunOptions { data_in: Some(input), ctx_in: Some(&ctx), ..Default::default() })
        .with_context(|| format!("BPF_PROG_TEST_RUN of the balancer on interface {ifindex}"))?;
    Ok(res.return_value)
}

/// Runs one frame through a program `repeat` times (the frame is not restored between runs).
pub fn run_program(dp: &Dataplane, name: &'static str, input: &[u8], repeat: u32) -> Result<(u32, Vec<u8>)> {
    timed_run(dp, name, input, repeat).map(|(action, out, _)| (action, out))
}

/// Like [`run_program`], also returning the kernel's average run time in nanoseconds.
pub fn timed_run(
    dp: &Dataplane,
    name: &'static str,
    input: &[u8],
    repeat: u32,
) -> Result<(u32, Vec<u8>, f64)> {
    timed_run_xdp(dp.program(name)?, name, input, repeat)
}

/// [`timed_run`] of a program of any object (`name` only labels errors).
pub fn timed_run_xdp(prog: &Xdp, name: &str, input: &[u8], repeat: u32) -> Result<(u32, Vec<u8>, f64)> {
    let mut out = vec![0u8; input.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
    out.truncate(res.data_size_out as usize);
    Ok((res.return_value, out, res.duration.as_nanos() as f64))
}

/// A TCP service on `vip:port`, scheduled by source hash, every backend active at weight 100.
pub fn tcp_service(name: &str, vip: IpAddr, port: u16, ring_size: u32, backends: &[IpAddr]) -> ServiceSpec {
    ServiceSpec::tcp(
        name,
        vip,
        port,
        ring_size,
        backends.iter().map(|a| BackendSpec::active(*a, 100)).collect(),
    )
}

/// `s` with the service and each of its backends forwarded through a tunnel.
pub fn tunnelled(s: &mut ServiceSpec) {
    s.forward = lb_daemon::model::Forward::Tunnel;
    for b in &mut s.backends {
        b.forward = lb_daemon::model::Forward::Tunnel;
    }
}

/// The backend id the Maglev ring of `service` gives a frame, computed independently of
/// the data path from the planned ring and the shared flow hash.
pub fn predicted_backend(state: &DataplaneState, service: &ServiceMatch, frame: &[u8]) -> Option<u32> {
    let start = frame.as_ptr() as usize;
    let p = parse::parse(start, start + frame.len()).ok()?;
    let svc = state.services.get(&service_key(service))?;
    if svc.ring.is_empty() {
        return None;
    }
    let ipv6 = p.family == FAMILY_V6;
    let h = if svc.flags & SERVICE_F_HASH_TUPLE != 0 {
        hash::tuple_hash(&p.src, &p.dst, p.sport, p.dport, p.proto, ipv6)
    } else {
        hash::source_hash(&p.src, ipv6)
    };
    svc.ring.get((h % svc.ring.len() as u32) as usize).copied()
}

/// `frame` as direct routing sends it to `b`, written from docs/architecture.md's rules: the
/// Ethernet addresses replaced, and the 802.1Q tag made the backend's (pushed, rewritten
/// keeping its priority bits, or removed when the backend is untagged).
pub fn direct_routed(frame: &[u8], b: &Backend) -> Vec<u8> {
    let tagged = matches!(u16::from_be_bytes([frame[12], frame[13]]), 0x8100 | 0x88a8);
    let mut f = Vec::with_capacity(frame.len() + 4);
    f.extend_from_slice(&b.dst_mac);
    f.extend_from_slice(&b.src_mac);
    if b.vlan != 0 {
        let priority = if tagged { u16::from_be_bytes([frame[14], frame[15]]) & 0xf000 } else { 0 };
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&(priority | b.vlan).to_be_bytes());
    }
    f.extend_from_slice(&frame[if tagged { 16 } else { 12 }..]);
    f
}

/// `frame` with its Ethernet addresses replaced.
pub fn with_macs(frame: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f
}
