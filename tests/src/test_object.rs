//! The test and benchmark XDP object (`lb-xdp-test`): the benchmark floor and driver and
//! the test switch. A director never loads it; `lb-daemon`'s build script builds it next to
//! the production object and hands its path to this crate.

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{Array, DevMap, HashMap, MapData, PerCpuArray, PerCpuValues, ProgramArray};
use aya::programs::{ProgramFd, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use lb_common::test_object::{maps, programs};
use lb_common::{
    BENCH_FRAME_LEN, BenchConfig, FLOW_WAYS, FloorForward, FlowTable, GEN_FRAME_LEN, SinkExpect, TrunkPort,
};

pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_XDP_TEST_OBJECT"));

/// The loaded test object. Programs load on first use; links and maps live as long as it.
pub struct TestPrograms {
    ebpf: Ebpf,
}

impl TestPrograms {
    pub fn load() -> Result<Self> {
        Self::load_from(&mut EbpfLoader::new())
    }

    /// As [`TestPrograms::load`], with `lb_lru_insert`'s LRU map as large as a connection
    /// table of `entries`.
    pub fn load_with_lru_reference(entries: u32) -> Result<Self> {
        Self::load_from(EbpfLoader::new().map_max_entries(maps::REFERENCE_FLOWS, entries))
    }

    /// As [`TestPrograms::load`], with `lb_redirect_floor_table`'s sets as many as a
    /// connection table of `entries` has (a power of two, at least `FLOW_WAYS`).
    pub fn load_with_set_reference(entries: u32) -> Result<Self> {
        let sets = entries / FLOW_WAYS;
        anyhow::ensure!(sets.is_power_of_two(), "a reference table of {entries} entries: not a power of two");
        let mut programs = Self::load_from(EbpfLoader::new().map_max_entries(maps::REFERENCE_SETS, sets))?;
        let mut table: Array<&mut MapData, FlowTable> =
            Array::try_from(programs.map_mut(maps::REFERENCE_TABLE)?)?;
        // Any seed does: nothing is ever found in the table.
        table.set(0, FlowTable { seed: 0x5eed_f10e, set_mask: sets - 1 }, 0)?;
        Ok(programs)
    }

    fn load_from(loader: &mut EbpfLoader) -> Result<Self> {
        let ebpf = loader.load(OBJECT).context("loading the test XDP object")?;
        Ok(TestPrograms { ebpf })
    }

    fn loaded(&mut self, name: &'static str) -> Result<&mut Xdp> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the test object has no program {name}"))?
            .try_into()
            .with_context(|| format!("{name} is not an XDP program"))?;
        if prog.fd().is_err() {
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        Ok(prog)
    }

    /// A program, loaded, for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self, name: &'static str) -> Result<&Xdp> {
        Ok(self.loaded(name)?)
    }

    /// Makes `iface` (in the calling thread's namespace) a port of the XDP test switch that
    /// sends every frame on to `out_ifindex`, tagging IPv4 frames with `push_vlan` (or, with
    /// zero, removing tags). See `lb_common::TrunkPort`.
    pub fn attach_trunk_port(&mut self, iface: &str, out_ifindex: u32, push_vlan: u16) -> Result<()> {
        let ifindex = nix::net::if_::if_nametoindex(iface).with_context(|| format!("interface {iface}"))?;
        let map =
            self.ebpf.map_mut(maps::TRUNK_PORTS).ok_or_else(|| anyhow!("no map {}", maps::TRUNK_PORTS))?;
        let mut ports: HashMap<&mut MapData, u32, TrunkPort> = HashMap::try_from(map)?;
        ports.insert(ifindex, TrunkPort { out_ifindex, push_vlan, _pad: 0 }, 0)?;
        let prog = self.loaded(programs::TEST_TRUNK)?;
        // The program owns the link: it stays attached for as long as this object lives.
        prog.attach(iface, XdpMode::Driver)
            .with_context(|| format!("attaching the test switch to {iface}"))?;
        Ok(())
    }

    /// Points the benchmark driver at `target` (a program of any object) and sets how many
    /// flows it cycles through.
    pub fn configure_bench_driver(&mut self, target: &Xdp, flows: u32) -> Result<()> {
        let fd = target.fd().context("the driver's target is not loaded")?.try_clone()?;
        self.configure_bench_driver_fd(fd, flows, false, None)
    }

    /// [`Self::configure_bench_driver`] with the target's descriptor (the floor is in this
    /// object, so a borrow of it cannot be passed in).
    /// `untunnel`: see `BenchConfig::untunnel`.
    /// `restore`: a frame of `BENCH_FRAME_LEN` bytes the driver puts back before each run.
    pub fn configure_bench_driver_fd(
        &mut self,
        fd: ProgramFd,
        flows: u32,
        untunnel: bool,
        restore: Option<&[u8]>,
    ) -> Result<()> {
        let map =
            self.ebpf.map_mut(maps::BENCH_TARGET).ok_or_else(|| anyhow!("no map {}", maps::BENCH_TARGET))?;
        let mut targets: ProgramArray<&mut MapData> = ProgramArray::try_from(map)?;
        targets.set(0, &fd, 0)?;
        let map = self.ebpf.map_mut(maps::BENCH_CFG).ok_or_else(|| anyhow!("no map {}", maps::BENCH_CFG))?;
        let mut cfg: Array<&mut MapData, BenchConfig> = Array::try_from(map)?;
        cfg.set(
            0,
            BenchConfig { flows, untunnel: u32::from(untunnel), restore: u32::from(restore.is_some()) },
            0,
        )?;
        if let Some(frame) = restore {
            anyhow::ensure!(frame.len() == BENCH_FRAME_LEN, "a restored frame is {BENCH_FRAME_LEN} bytes");
            let words: [u32; BENCH_FRAME_LEN / 4] = std::array::from_fn(|i| {
                u32::from_ne_bytes([frame[4 * i], frame[4 * i + 1], frame[4 * i + 2], frame[4 * i + 3]])
            });
            let map = self
                .ebpf
                .map_mut(maps::BENCH_FRAME)
                .ok_or_else(|| anyhow!("no map {}", maps::BENCH_FRAME))?;
            let mut frames: Array<&mut MapData, [u32; BENCH_FRAME_LEN / 4]> = Array::try_from(map)?;
            frames.set(0, words, 0)?;
        }
        Ok(())
    }

    /// A map of this object, for writing.
    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or_else(|| anyhow!("no map {name}"))
    }

    /// Attaches a program of this object to `iface` (in the calling thread's namespace),
    /// natively; it stays attached for as long as this object lives.
    pub fn attach(&mut self, name: &'static str, iface: &str) -> Result<()> {
        let prog = self.loaded(name)?;
        prog.attach(iface, XdpMode::Driver).with_context(|| format!("attaching {name} to {iface}"))?;
        Ok(())
    }

    /// The generator's frame (`GEN_FRAME_LEN` bytes, UDP) and flows: its frames take
    /// source ports 10000..10000 + `flows`.
    pub fn configure_generator(&mut self, frame: &[u8], flows: u32) -> Result<()> {
        anyhow::ensure!(frame.len() == GEN_FRAME_LEN, "a generated frame is {GEN_FRAME_LEN} bytes");
        let words: [u32; GEN_FRAME_LEN / 4] = std::array::from_fn(|i| {
            u32::from_ne_bytes([frame[4 * i], frame[4 * i + 1], frame[4 * i + 2], frame[4 * i + 3]])
        });
        let mut m: Array<&mut MapData, [u32; GEN_FRAME_LEN / 4]> =
            Array::try_from(self.map_mut(maps::GEN_FRAME)?)?;
        m.set(0, words, 0)?;
        let mut m: Array<&mut MapData, u32> = Array::try_from(self.map_mut(maps::GEN_FLOWS)?)?;
        m.set(0, flows, 0)?;
        Ok(())
    }

    /// Sends `frame` `count` times out of `ifindex` (in the calling thread's namespace)
    /// through the generator, with live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`); returns how
    /// long the kernel took.
    pub fn generate(&mut self, ifindex: u32, frame: &[u8], count: u32) -> Result<std::time::Duration> {
        use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};
        let ctx = crate::fixture::xdp_md(frame.len(), ifindex);
        let prog = self.loaded(programs::GEN)?;
        let started = std::time::Instant::now();
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat: count,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN of the generator with live frames")?;
        Ok(started.elapsed())
    }

    /// What the sink counts as delivered: `proto` (6 or 17) to `port` and to one of
    /// `addrs.1` consecutive addresses from `addrs.0`, inside an IPv4-in-IPv4 header to one
    /// of `tunnel.1` addresses from `tunnel.0` if a tunnel is given.
    pub fn expect_at_sink(
        &mut self,
        proto: u8,
        addrs: (std::net::Ipv4Addr, u16),
        port: u16,
        tunnel: Option<(std::net::Ipv4Addr, u16)>,
    ) -> Result<()> {
        let mut m: Array<&mut MapData, SinkExpect> = Array::try_from(self.map_mut(maps::SINK_EXPECT)?)?;
        let word = |a: std::net::Ipv4Addr| u32::from_ne_bytes(a.octets());
        let expect = SinkExpect {
            addr: word(addrs.0),
            addrs: addrs.1,
            tunnel_dst: tunnel.map_or(0, |t| word(t.0)),
            tunnel_dsts: tunnel.map_or(0, |t| t.1),
            port: port.to_be(),
            proto,
            _pad: 0,
        };
        m.set(0, expect, 0)?;
        Ok(())
    }

    /// Starts the benchmark driver's flow counter on each CPU at `start(cpu)`, so that runs
    /// on different CPUs send different flows.
    pub fn seed_bench_flows(&mut self, start: impl Fn(usize) -> u64) -> Result<()> {
        let mut m: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(self.map_mut(maps::BENCH_STATE)?)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        m.set(0, PerCpuValues::try_from((0..cpus).map(start).collect::<Vec<_>>())?, 0)?;
        Ok(())
    }

    /// Frames the sink counted so far: (delivered as expected, others), over all CPUs.
    pub fn sink_counts(&mut self) -> Result<(u64, u64)> {
        let m: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(self.map_mut(maps::SINK_COUNTS)?)?;
        let sum = |i: u32| -> Result<u64> { Ok(m.get(&i, 0)?.iter().sum()) };
        Ok((sum(0)?, sum(1)?))
    }

    /// Where the end-to-end floor sends frames: out of `ifindex`, with these MACs.
    pub fn configure_redirect_floor(
        &mut self,
        ifindex: u32,
        dst_mac: [u8; 6],
        src_mac: [u8; 6],
    ) -> Result<()> {
        let mut fwd: Array<&mut MapData, FloorForward> = Array::try_from(self.map_mut(maps::FLOOR_FWD)?)?;
        fwd.set(0, FloorForward { ifindex, dst_mac, src_mac }, 0)?;
        let mut egress: DevMap<&mut MapData> = DevMap::try_from(self.map_mut(maps::FLOOR_EGRESS)?)?;
        egress.set(0, ifindex, None, 0)?;
        Ok(())
    }
}
