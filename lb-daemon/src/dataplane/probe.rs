//! What the data path needs of the kernel, probed one feature at a time (as bpftool's
//! `feature probe` does: a tiny map or program per feature, the verifier's answer read), so
//! that `lb-daemon verify` names a missing feature and the Linux version that brought it,
//! rather than leaving an operator with a verifier log. What cannot be probed without
//! attaching something is judged by the kernel's version.

use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported};
use aya::util::KernelVersion;

/// The oldest kernel the data path runs on: every feature below is there.
pub const MINIMUM_KERNEL: (u8, u8) = (5, 11);

/// One requirement and whether this kernel meets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    /// The Linux version that brought it.
    pub since: &'static str,
    /// `Err`: the probe itself failed (the error says why); not counted as missing.
    pub present: Result<bool, String>,
}

enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(BpfHelper),
    /// Not probed (it would attach something): the kernel's version decides.
    Version(u8, u8),
}

/// What the data path uses, in the order a missing one matters.
fn requirements() -> Vec<(&'static str, &'static str, Probe)> {
    vec![
        ("XDP programs", "4.8", Probe::Program(ProgramType::Xdp)),
        ("array maps", "3.19", Probe::Map(MapType::Array)),
        ("per-CPU array maps", "4.6", Probe::Map(MapType::PerCpuArray)),
        ("hash maps", "3.19", Probe::Map(MapType::Hash)),
        ("LRU hash maps (NAT replies, fragments)", "4.10", Probe::Map(MapType::LruHash)),
        ("LPM trie maps (mark rules, VIP filter)", "4.11", Probe::Map(MapType::LpmTrie)),
        ("device hash maps (XDP_REDIRECT by ifindex)", "5.4", Probe::Map(MapType::DevMapHash)),
        ("program arrays (tail calls)", "4.2", Probe::Map(MapType::ProgramArray)),
        ("BPF ring buffers (the connection log)", "5.8", Probe::Map(MapType::RingBuf)),
        ("bpf_xdp_adjust_head", "4.10", Probe::Helper(BpfHelper::BPF_FUNC_xdp_adjust_head)),
        ("bpf_xdp_adjust_tail", "4.18", Probe::Helper(BpfHelper::BPF_FUNC_xdp_adjust_tail)),
        ("bpf_redirect", "4.14", Probe::Helper(BpfHelper::BPF_FUNC_redirect)),
        ("bpf_redirect_map", "4.14", Probe::Helper(BpfHelper::BPF_FUNC_redirect_map)),
        ("bpf_tail_call", "4.2", Probe::Helper(BpfHelper::BPF_FUNC_tail_call)),
        (
            "bpf_fib_lookup (next hops of tunnels and NAT replies)",
            "4.18",
            Probe::Helper(BpfHelper::BPF_FUNC_fib_lookup),
        ),
        ("bpf_csum_diff", "4.6", Probe::Helper(BpfHelper::BPF_FUNC_csum_diff)),
        ("bpf_get_smp_processor_id", "4.1", Probe::Helper(BpfHelper::BPF_FUNC_get_smp_processor_id)),
        (
            "bpf_get_prandom_u32 (the connection log's sampling)",
            "4.1",
            Probe::Helper(BpfHelper::BPF_FUNC_get_prandom_u32),
        ),
        ("bpf_ringbuf_reserve", "5.8", Probe::Helper(BpfHelper::BPF_FUNC_ringbuf_reserve)),
        (
            "bpf_ktime_get_coarse_ns (the connection table's clock)",
            "5.11",
            Probe::Helper(BpfHelper::BPF_FUNC_ktime_get_coarse_ns),
        ),
        ("bpf_jiffies64 (the clock read once a tick)", "5.5", Probe::Helper(BpfHelper::BPF_FUNC_jiffies64)),
        ("memory-mapped arrays (BPF_F_MMAPABLE, the rings)", "5.5", Probe::Version(5, 5)),
        ("BPF links for XDP (restarts swap programs without a gap)", "5.9", Probe::Version(5, 9)),
        ("BPF memory charged to the cgroup, not RLIMIT_MEMLOCK", "5.11", Probe::Version(5, 11)),
    ]
}

/// Every requirement, probed on this kernel.
pub fn probe() -> Vec<Feature> {
    let version = KernelVersion::current().map_err(|e| e.to_string());
    requirements()
        .into_iter()
        .map(|(name, since, probe)| {
            let present = match probe {
                Probe::Program(t) => is_program_supported(t).map_err(|e| crate::error_chain(&e)),
                Probe::Map(t) => is_map_supported(t).map_err(|e| crate::error_chain(&e)),
                Probe::Helper(h) => {
                    is_helper_supported(ProgramType::Xdp, h).map_err(|e| crate::error_chain(&e))
                }
                Probe::Version(major, minor) => match &version {
                    Ok(v) => Ok(*v >= KernelVersion::new(major, minor, 0)),
                    Err(e) => Err(format!("reading the kernel's version: {e}")),
                },
            };
            Feature { name, since, present }
        })
        .collect()
}

/// `None` when every feature is there; otherwise one line naming each missing one.
pub fn missing(features: &[Feature]) -> Option<String> {
    let lacking: Vec<String> = features
        .iter()
        .filter(|f| f.present == Ok(false))
        .map(|f| format!("{} (Linux {})", f.name, f.since))
        .collect();
    (!lacking.is_empty()).then(|| {
        format!(
            "this kernel lacks {}; lb-daemon needs Linux {}.{} or later",
            lacking.join(", "),
            MINIMUM_KERNEL.0,
            MINIMUM_KERNEL.1
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_feature_is_named_with_its_version() {
        let f = |name, since, present| Feature { name, since, present };
        let all = [f("XDP programs", "4.8", Ok(true)), f("bpf_fib_lookup", "4.18", Err("EPERM".into()))];
        assert_eq!(missing(&all), None, "a probe that could not run is not a missing feature");
        let old = [
            f("XDP programs", "4.8", Ok(true)),
            f("bpf_ktime_get_coarse_ns (the connection table's clock)", "5.11", Ok(false)),
            f("BPF links for XDP", "5.9", Ok(false)),
        ];
        assert_eq!(
            missing(&old).unwrap(),
            "this kernel lacks bpf_ktime_get_coarse_ns (the connection table's clock) (Linux 5.11), BPF links for XDP (Linux 5.9); lb-daemon needs Linux 5.11 or later"
        );
    }

    #[test]
    fn the_minimum_is_the_newest_requirement() {
        let newest = requirements()
            .iter()
            .map(|(_, since, _)| {
                let (major, minor) = since.split_once('.').unwrap();
                (major.parse::<u8>().unwrap(), minor.parse::<u8>().unwrap())
            })
            .max()
            .unwrap();
        assert_eq!(newest, MINIMUM_KERNEL);
    }
}
