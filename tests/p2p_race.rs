//! The race RUNNING_P2P exists for, made real: two VFs keep RDMA-writing into each
//! other's device memory (BAR2) while they are migrated.
//!
//! Each VF's guest driver (a test acting as `mlx5_core`) has a QP connected to a QP on
//! the other VF; the VMM has mapped each VF's BAR2 into that VF's own IOVA space (as
//! QEMU maps every mmapped BAR), and the driver registered it as an mkey, so a peer's
//! RDMA_WRITE with that rkey lands in device memory, through the function's DMA path
//! and its P2P window. Each writer posts seeded writes in batches, so the devices have
//! work queued when the migration stops them, and keeps the log of what was
//! acknowledged (a good CQE), refused (an error CQE), flushed behind a refusal, or left
//! unstarted. The VMM pauses the guest (no new doorbells) before it stops devices; the
//! writes already queued keep running into the stop.
//!
//! (a) Moved as a group through RUNNING_P2P, for 100 seeds: no violation anywhere, and
//!     each destination VF's device memory is exactly its writer's acknowledged writes.
//! (b) Stopped one after another (the target to STOP while its peer, still RUNNING,
//!     writes into it): the peer's next write is refused with an error CQE and recorded
//!     as a violation naming writer, QP, target, address and length; the destination
//!     holds the acknowledged writes and not the refused one.
//!
//! Bounded: at most `MAX_WRITES` writes per writer per seed, every wait with a timeout.
//! `MLX5_EMU_SEED=N` replays one seed. (a) takes about a minute on two cores.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mlx5_testbed::bringup::shared_pf_up;
use mlx5_testbed::devmem::dev_mem;
use mlx5_testbed::dma::{self, connect, end, pattern, DmaNode, End};
use mlx5_testbed::migrate::pump;
use mlx5_testbed::{init_tracing, seed, Testbed};
use mlx5vf::dma::{Completion, DmaQueues, QpSizes, SendWr, Sge};
use mlx5vf::migration::fsm::MigState;
use mlx5vf::migration::{MigrationDevice, MigrationGroup};
use rand::{Rng, SeedableRng};
use vfu::uapi::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_PCI_BAR2_REGION_INDEX};

/// Where the VMM maps each VF's own BAR2 in that VF's IOVA space.
const DEV_IOVA: u64 = 0x50_0000_0000;
/// Device memory per VF (the adapter's default).
const DEV: u64 = 1 << 20;
/// Guest data buffer per VF (source of the writes).
const DATA: u64 = 2 << 20;
/// Most writes one writer posts per seed.
const MAX_WRITES: usize = 2000;
/// Largest write.
const MAX_LEN: usize = 600;
/// Writes a writer posts before it rings and waits.
const BATCH: usize = 8;
/// Acknowledged writes each writer makes before the migration starts.
const WARMUP: usize = 8;
/// The longest a writer waits for one CQE (a bound, never reached when all is well).
const CQE_LIMIT: Duration = Duration::from_secs(30);
/// How often a writer waiting for a CQE looks at the stop flag.
const CQE_WAIT: Duration = Duration::from_millis(20);
/// Seeds of (a).
const SEEDS: u64 = 100;

/// One VF as its guest driver holds it, with its BAR2 registered as `devkey`.
struct Vf {
    node: DmaNode,
    devkey: u32,
}

fn vf(tb: &Testbed, n: u16) -> Vf {
    let node = dma::node(&tb.vf_socket(n), DATA);
    {
        let mut c = node.hca.cmd().client();
        let bar2 = c
            .region_info(VFIO_PCI_BAR2_REGION_INDEX)
            .expect("BAR2 info");
        let fd = bar2.fd.expect("BAR2 is mmappable");
        c.dma_map(
            DEV_IOVA,
            DEV,
            fd.as_raw_fd(),
            0,
            VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        )
        .expect("the VMM maps the VF's BAR2 into its IOVA space");
    }
    let mtt: Vec<u64> = (0..DEV / 4096).map(|i| DEV_IOVA + i * 4096).collect();
    let devkey = node
        .hca
        .create_mkey(&mtt, 12, DEV, 0x77)
        .expect("mkey over BAR2");
    Vf { node, devkey }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Write {
    off: u64,
    data: Vec<u8>,
}

/// What became of a writer's writes.
#[derive(Debug, Default)]
struct Log {
    acked: Vec<Write>,
    /// The write an error CQE refused (the QP is in ERR after it).
    refused: Option<(Write, Completion)>,
    /// Writes flushed behind the refused one (error CQEs, nothing moved).
    flushed: Vec<Write>,
    /// Writes posted whose CQE had not come when the writer stopped, oldest first.
    pending: Vec<Write>,
}

impl Log {
    /// Files the CQE of the oldest pending write.
    fn complete(&mut self, c: Completion) {
        let w = self.pending.remove(0);
        if c.is_ok() {
            self.acked.push(w);
        } else if self.refused.is_none() {
            self.refused = Some((w, c));
        } else {
            self.flushed.push(w);
        }
    }
}

/// The guest's vCPU, as far as a writer is concerned: while `paused` is false under
/// the lock, the writer may post and ring; the VMM pauses it before it stops devices.
struct Vcpu {
    paused: Mutex<bool>,
}

/// Posts seeded RDMA_WRITEs from `me` into the peer's `rkey` in batches of [`BATCH`]
/// (so the device has work queued when the migration stops it), until its vCPU is
/// paused, an error CQE, `stop`, or [`MAX_WRITES`]. `acked` counts the acknowledged
/// writes as they come.
#[allow(clippy::too_many_arguments)]
fn writer(
    q: &DmaQueues<'_>,
    e: &mut End,
    me: &DmaNode,
    rkey: u32,
    seed: u64,
    vcpu: &Vcpu,
    stop: &AtomicBool,
    acked: &AtomicUsize,
) -> Log {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut log = Log::default();
    let mut i = 0u64;
    while (i as usize) < MAX_WRITES && log.refused.is_none() {
        {
            let paused = vcpu.paused.lock().unwrap();
            if *paused {
                break;
            }
            for slot in 0..BATCH {
                let len = rng.gen_range(1..=MAX_LEN);
                let off = rng.gen_range(0..DEV - len as u64);
                let w = Write {
                    off,
                    data: pattern(seed.wrapping_mul(10_007).wrapping_add(i), len),
                };
                i += 1;
                let src = (slot * MAX_LEN) as u64;
                me.mem.write(src, &w.data);
                let wr = SendWr::RdmaWrite {
                    sges: vec![Sge {
                        lkey: me.key,
                        addr: src,
                        len: len as u32,
                    }],
                    raddr: off,
                    rkey,
                    imm: None,
                };
                q.post_send(&mut e.qp, &wr, true).expect("post");
                log.pending.push(w);
            }
            q.ring(&mut e.qp).expect("ring");
        }
        // Every CQE of the batch, however long the device takes, until the test says
        // the migration is over: a WQE not completed by then was never started (its
        // function stopped issuing) and stays pending.
        let since = Instant::now();
        while !log.pending.is_empty() {
            match q.poll_wait(&mut e.cq, Some(&mut e.qp), CQE_WAIT) {
                Ok(c) => {
                    let ok = c.is_ok();
                    log.complete(c);
                    if ok {
                        acked.fetch_add(1, Ordering::AcqRel);
                    }
                }
                Err(_) if stop.load(Ordering::Acquire) || since.elapsed() > CQE_LIMIT => {
                    return log
                }
                Err(_) => {}
            }
        }
    }
    log
}

/// Late CQEs for pending writes (started before the stop, completed in the drain).
fn settle(q: &DmaQueues<'_>, e: &mut End, log: &mut Log) {
    while !log.pending.is_empty() {
        match q.poll(&mut e.cq, Some(&mut e.qp)).expect("poll") {
            Some(c) => log.complete(c),
            None => break,
        }
    }
}

/// Device memory as the acknowledged writes leave it, from zeros.
fn expected(log: &Log) -> Vec<u8> {
    let mut m = vec![0u8; DEV as usize];
    for w in &log.acked {
        let o = w.off as usize;
        m[o..o + w.data.len()].copy_from_slice(&w.data);
    }
    m
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Both VFs of a source adapter with their cross-connected QPs, and a destination.
struct Pair {
    a: Testbed,
    b: Testbed,
    v: [Vf; 2],
}

fn pair() -> Pair {
    let a = Testbed::start(2);
    let b = Testbed::start(2);
    let v = [vf(&a, 0), vf(&a, 1)];
    Pair { a, b, v }
}

/// One seed of (a): the two writers run while the group migrates A to B.
fn group_round(seed: u64) {
    let p = pair();
    let (qa, qb) = (
        DmaQueues::new(&p.v[0].node.hca).unwrap(),
        DmaQueues::new(&p.v[1].node.hca).unwrap(),
    );
    let mut ea = end(&qa, 8, QpSizes::default());
    let mut eb = end(&qb, 8, QpSizes::default());
    connect(&qa, &ea, &qb, &eb);
    let src_pf = shared_pf_up(&p.a.pf_socket());
    let dst_pf = shared_pf_up(&p.b.pf_socket());
    let group = |pf: &std::sync::Arc<mlx5vf::hca::Hca>| {
        MigrationGroup::new(
            (0..2)
                .map(|n| MigrationDevice::new(pf.clone(), n).unwrap())
                .collect(),
        )
    };
    let (src, dst) = (group(&src_pf), group(&dst_pf));
    let stop = AtomicBool::new(false);
    let vcpu = Vcpu {
        paused: Mutex::new(false),
    };
    let (na, nb) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let (mut la, mut lb) = std::thread::scope(|s| {
        let wa = s.spawn(|| {
            let (v1, v0) = (&p.v[1], &p.v[0]);
            writer(
                &qa,
                &mut ea,
                &v0.node,
                v1.devkey,
                seed * 2,
                &vcpu,
                &stop,
                &na,
            )
        });
        let wb = s.spawn(|| {
            let (v1, v0) = (&p.v[1], &p.v[0]);
            writer(
                &qb,
                &mut eb,
                &v1.node,
                v0.devkey,
                seed * 2 + 1,
                &vcpu,
                &stop,
                &nb,
            )
        });
        wait_for("the writers to warm up", Duration::from_secs(20), || {
            (na.load(Ordering::Acquire) >= WARMUP && nb.load(Ordering::Acquire) >= WARMUP)
                || wa.is_finished()
                || wb.is_finished()
        });
        // The migration, while both write: pre-copy on each, then the group's stop.
        let mut outs = dst.resuming().expect("destinations to RESUMING");
        let mut ins: Vec<_> = src
            .walk(&[MigState::PreCopy])
            .expect("sources to PRE_COPY")
            .into_iter()
            .flatten()
            .collect();
        let mut keep = Vec::new();
        for (i, o) in ins.iter_mut().zip(outs.iter_mut()) {
            pump(i, Some(o), &mut keep);
        }
        // The VMM pauses the vCPUs (no new doorbells), then stops the devices, whose
        // queued writes are still running.
        *vcpu.paused.lock().unwrap() = true;
        src.stop_copy().expect("group stop");
        for (i, o) in ins.iter_mut().zip(outs.iter_mut()) {
            pump(i, Some(o), &mut keep);
        }
        dst.start().expect("destinations to RUNNING");
        stop.store(true, Ordering::Release);
        (wa.join().unwrap(), wb.join().unwrap())
    });
    settle(&qa, &mut ea, &mut la);
    settle(&qb, &mut eb, &mut lb);
    assert!(
        p.a.adapter.violations().is_empty() && p.b.adapter.violations().is_empty(),
        "seed {seed}: group migration raced: {:?} {:?}",
        p.a.adapter.violations(),
        p.b.adapter.violations()
    );
    assert!(la.refused.is_none() && lb.refused.is_none(), "seed {seed}");
    assert!(
        la.acked.len() >= WARMUP && lb.acked.len() >= WARMUP,
        "seed {seed}"
    );
    // VF 0 wrote into VF 1 and VF 1 into VF 0.
    assert!(
        dev_mem(&p.b.vf(1)) == expected(&la),
        "seed {seed}: destination VF 1 differs from VF 0's acknowledged writes"
    );
    assert!(
        dev_mem(&p.b.vf(0)) == expected(&lb),
        "seed {seed}: destination VF 0 differs from VF 1's acknowledged writes"
    );
    release(&p);
}

/// The VMM releases the stopped source VFs (a reset, as at device teardown); their
/// guest drivers, gone with the source VM, get no answer to their teardown commands,
/// so those wait briefly instead of a command timeout each.
fn release(p: &Pair) {
    for (n, v) in p.v.iter().enumerate() {
        p.a.vf(n as u16).reset();
        v.node.hca.cmd().set_timeout(Duration::from_millis(20));
    }
}

#[test]
fn group_migration_through_running_p2p_loses_no_write_and_raises_no_violation() {
    init_tracing();
    let first = seed(1);
    // MLX5_EMU_SEED replays one seed.
    let n = if std::env::var("MLX5_EMU_SEED").is_ok() {
        1
    } else {
        SEEDS
    };
    for s in first..first + n {
        group_round(s);
    }
}

#[test]
fn stopping_the_target_first_refuses_and_records_the_peers_next_write() {
    init_tracing();
    let s = seed(7);
    let p = pair();
    let (q0, q1) = (
        DmaQueues::new(&p.v[0].node.hca).unwrap(),
        DmaQueues::new(&p.v[1].node.hca).unwrap(),
    );
    let mut e0 = end(&q0, 8, QpSizes::default());
    let e1 = end(&q1, 8, QpSizes::default());
    connect(&q0, &e0, &q1, &e1);
    let src_pf = shared_pf_up(&p.a.pf_socket());
    let dst_pf = shared_pf_up(&p.b.pf_socket());
    let target = MigrationDevice::new(src_pf.clone(), 1).unwrap();
    let peer = MigrationDevice::new(src_pf.clone(), 0).unwrap();
    let dst = MigrationDevice::new(dst_pf.clone(), 1).unwrap();
    let stop = AtomicBool::new(false);
    // The writer's vCPU is not paused: the functions are stopped one after another while
    // the guest runs, which is exactly what the group order prevents.
    let vcpu = Vcpu {
        paused: Mutex::new(false),
    };
    let n = AtomicUsize::new(0);
    let mut log = std::thread::scope(|sc| {
        let w = sc.spawn(|| {
            writer(
                &q0,
                &mut e0,
                &p.v[0].node,
                p.v[1].devkey,
                s,
                &vcpu,
                &stop,
                &n,
            )
        });
        wait_for("the writer to warm up", Duration::from_secs(20), || {
            n.load(Ordering::Acquire) >= WARMUP || w.is_finished()
        });
        // No group order: the target goes to STOP while its peer is RUNNING.
        target.set_state(MigState::Stop).expect("target to STOP");
        // The writer keeps going until the device refuses one of its writes.
        w.join().unwrap()
    });
    settle(&q0, &mut e0, &mut log);
    let (refused, cqe) = log
        .refused
        .clone()
        .expect("a write after the freeze was refused, not lost");
    assert!(log.acked.len() >= WARMUP);
    assert!(!cqe.is_ok());
    assert_eq!(cqe.qpn, e0.qp.qpn);
    assert_eq!(
        q0.query_qp(e0.qp.qpn).unwrap().0,
        mlx5_prm::cmd::qp::QpState::Err,
        "the writer's QP went to its error state"
    );
    // Recorded, with writer, QP, target, address and length.
    let v = p.a.adapter.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    let (writer_vhca, target_vhca) = (p.a.vf(0).id.vhca_id, p.a.vf(1).id.vhca_id);
    assert_eq!(v[0].writer_vhca_id, Some(writer_vhca), "{}", v[0]);
    assert_eq!(v[0].qpn, Some(e0.qp.qpn), "{}", v[0]);
    assert_eq!(v[0].target_vhca_id, target_vhca);
    assert_eq!(v[0].address, refused.off, "{}", v[0]);
    assert_eq!(v[0].len, refused.data.len() as u64, "{}", v[0]);
    assert!(v[0].seq > 0);
    // The target's image holds every acknowledged write and not the refused one.
    let mut out = dst.set_state(MigState::Resuming).unwrap().unwrap();
    let mut input = target.set_state(MigState::StopCopy).unwrap().unwrap();
    let mut keep = Vec::new();
    pump(&mut input, Some(&mut out), &mut keep);
    dst.set_state(MigState::Running).unwrap();
    let landed = dev_mem(&p.b.vf(1));
    assert!(
        landed == expected(&log),
        "seed {s}: acknowledged writes only"
    );
    peer.set_state(MigState::Stop).unwrap();
    stop.store(true, Ordering::Release);
    release(&p);
}
