//! QPs, CQs, their counters and posted-but-unstarted WQEs migrate with the function:
//! work rung while the source was initiator-suspended runs on the destination after
//! resume, each WQE exactly once.

use std::os::fd::AsRawFd;
use std::time::Duration;

use mlx5_prm::cmd::qp::QpState;
use mlx5_prm::wqe::CqeOpcode;
use mlx5_testbed::dma::{self, connect, end, next, pattern, DATA_IOVA};
use mlx5_testbed::migrate::{pump, Rig};
use mlx5vf::dma::{DmaQueues, QpSizes, SendWr, Sge};
use mlx5vf::migration::fsm::MigState;
use vfu::uapi::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};

const DATA: u64 = 2 << 20;
/// WQEs that run on the source, and WQEs rung while it is initiator-suspended.
const BEFORE: u16 = 3;
const AFTER: u16 = 5;
const LEN: usize = 3000;

fn write(n: &dma::DmaNode, i: u16) -> SendWr {
    SendWr::RdmaWrite {
        sges: vec![Sge {
            lkey: n.key,
            addr: u64::from(i) * 4096,
            len: LEN as u32,
        }],
        raddr: (1 << 20) + u64::from(i) * 4096,
        rkey: n.key,
        imm: None,
    }
}

#[test]
fn unstarted_wqes_migrate_and_complete_on_the_destination_exactly_once() {
    let src = Rig::start();
    let dst = Rig::start();
    let n = dma::node(&src.tb.vf_socket(0), DATA);
    // The guest's RAM moves with it: the destination VF sees the same memory (the
    // guest's DMA arena: queues, CQs, doorbell records; and its data buffer).
    let mut dclient = dst.tb.vf_client(0);
    let arena = n.hca.cmd().arena();
    let rw = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
    dclient
        .dma_map(arena.iova(), arena.size(), arena.file().as_raw_fd(), 0, rw)
        .expect("map the guest's arena at the destination");
    dclient
        .dma_map(DATA_IOVA, DATA, n.mem.file().as_raw_fd(), 0, rw)
        .expect("map the guest's data at the destination");

    let q = DmaQueues::new(&n.hca).unwrap();
    let mut a = end(&q, 6, QpSizes::default());
    let b = end(&q, 6, QpSizes::default());
    connect(&q, &a, &q, &b);
    for i in 0..BEFORE + AFTER {
        n.mem
            .write(u64::from(i) * 4096, &pattern(u64::from(i) + 100, LEN));
    }
    for i in 0..BEFORE {
        q.post_send(&mut a.qp, &write(&n, i), true).unwrap();
    }
    q.ring(&mut a.qp).unwrap();
    for i in 0..BEFORE {
        let c = next(&q, &mut a);
        assert_eq!((c.opcode, c.wqe_counter), (CqeOpcode::Req, i));
    }

    let mut out = dst
        .dev
        .set_state(MigState::Resuming)
        .expect("RESUMING")
        .expect("resume stream");
    src.dev
        .set_state(MigState::RunningP2p)
        .expect("RUNNING_P2P");
    // Rung while the source's engine is stopped: posted, not started.
    for i in BEFORE..BEFORE + AFTER {
        q.post_send(&mut a.qp, &write(&n, i), true).unwrap();
    }
    q.ring(&mut a.qp).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        q.poll(&mut a.cq, None).unwrap().is_none(),
        "an initiator-suspended function starts no WQE"
    );
    for i in BEFORE..BEFORE + AFTER {
        assert_ne!(
            n.mem.read((1 << 20) + u64::from(i) * 4096, LEN),
            pattern(u64::from(i) + 100, LEN)
        );
    }
    let mut input = src
        .dev
        .set_state(MigState::StopCopy)
        .expect("STOP_COPY")
        .expect("save stream");
    let mut keep = Vec::new();
    pump(&mut input, Some(&mut out), &mut keep);
    let loaded = dst
        .tb
        .vf(0)
        .firmware()
        .qp(a.qp.qpn)
        .cloned()
        .expect("the QP migrated");
    assert_eq!(
        (loaded.state, loaded.sq_ci),
        (QpState::Rts, BEFORE),
        "its counter migrated"
    );
    dst.dev
        .set_state(MigState::Running)
        .expect("destination RUNNING");

    for i in BEFORE..BEFORE + AFTER {
        let c = next(&q, &mut a);
        assert_eq!(
            (c.opcode, c.wqe_counter, c.byte_cnt as usize),
            (CqeOpcode::Req, i, LEN),
            "{c:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        q.poll(&mut a.cq, None).unwrap().is_none(),
        "each WQE completed once"
    );
    for i in 0..BEFORE + AFTER {
        assert_eq!(
            n.mem.read((1 << 20) + u64::from(i) * 4096, LEN),
            pattern(u64::from(i) + 100, LEN),
            "WQE {i} landed"
        );
    }
    let on_dst = dst.tb.vf(0).firmware().qp(a.qp.qpn).cloned().unwrap();
    assert_eq!(
        on_dst.sq_ci,
        BEFORE + AFTER,
        "the destination consumed exactly the rest"
    );
    let on_src = src.tb.vf(0).firmware().qp(a.qp.qpn).cloned().unwrap();
    assert_eq!(on_src.sq_ci, BEFORE, "the source ran none of them");
    // The source stays stopped, as after a migration: its queues are not torn down.
    std::mem::forget(q);
}
