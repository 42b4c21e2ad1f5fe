//! The DMA engine moves data: RDMA_WRITE, RDMA_READ and SEND between RC QPs on one
//! function and across two, byte-exact, with the CQEs the PRM defines; bad WQEs
//! complete with error CQEs and move only their QP to ERR; hostile rings never hang the
//! engine.

use mlx5_prm::cmd::qp::QpState;
use mlx5_prm::wqe::{vendor_synd as vs, CqeOpcode, CqeSyndrome, CtrlSeg, WqeOpcode};
use mlx5_testbed::dma::{self, connect, end, loopback_pair, next, pattern, DmaNode, End};
use mlx5_testbed::Testbed;
use mlx5vf::dma::{DmaQueues, QpSizes, SendWr, Sge};
use zerocopy::IntoBytes;

/// Data buffer per function: room for a 16 MiB source, destination and read-back.
const DATA: u64 = 48 << 20;
const MIB16: usize = 16 << 20;
/// Sizes every operation is tried with.
const SIZES: &[usize] = &[1, 7, 4095, 4096, 65537, 1 << 20, MIB16];

fn sge(n: &DmaNode, addr: u64, len: usize) -> Sge {
    Sge {
        lkey: n.key,
        addr,
        len: len as u32,
    }
}

/// RDMA_WRITE then RDMA_READ then SEND of each size from `a` to `b`, checked byte for
/// byte and CQE by CQE.
fn moves_every_size(
    a: &DmaNode,
    qa: &DmaQueues<'_>,
    ea: &mut End,
    b: &DmaNode,
    qb: &DmaQueues<'_>,
    eb: &mut End,
) {
    // Offsets in each buffer: source, destination, read-back.
    let (src, dst, back) = (0u64, 16 << 20, 32 << 20);
    for (i, &len) in SIZES.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        a.mem.write(src, &data);
        b.mem.write(dst, &vec![0u8; len]);
        // RDMA_WRITE a[src] -> b[dst].
        let w = qa
            .post_send(
                &mut ea.qp,
                &SendWr::RdmaWrite {
                    sges: vec![sge(a, src, len)],
                    raddr: dst,
                    rkey: b.key,
                    imm: None,
                },
                true,
            )
            .unwrap();
        qa.ring(&mut ea.qp).unwrap();
        let c = next(qa, ea);
        assert_eq!(
            (c.opcode, c.qpn, c.wqe_counter),
            (CqeOpcode::Req, ea.qp.qpn, w),
            "{len} bytes: {c:?}"
        );
        assert_eq!(c.byte_cnt as usize, len);
        assert!(
            b.mem.read(dst, len) == data,
            "RDMA_WRITE of {len} bytes landed byte-exact"
        );
        // RDMA_READ b[dst] -> a[back].
        a.mem.write(back, &vec![0u8; len]);
        let r = qa
            .post_send(
                &mut ea.qp,
                &SendWr::RdmaRead {
                    sges: vec![sge(a, back, len)],
                    raddr: dst,
                    rkey: b.key,
                },
                true,
            )
            .unwrap();
        qa.ring(&mut ea.qp).unwrap();
        let c = next(qa, ea);
        assert_eq!(
            (c.opcode, c.wqe_counter, c.byte_cnt as usize),
            (CqeOpcode::Req, r, len)
        );
        assert!(
            a.mem.read(back, len) == data,
            "RDMA_READ of {len} bytes byte-exact"
        );
        // SEND a[src] into a receive WQE at b[back], split over two scatter entries.
        b.mem.write(back, &vec![0u8; len]);
        let half = len / 2;
        let scatter = if half == 0 {
            vec![sge(b, back, len)]
        } else {
            vec![sge(b, back, half), sge(b, back + half as u64, len - half)]
        };
        let rw = qb.post_recv(&mut eb.qp, &scatter).unwrap();
        let s = qa
            .post_send(
                &mut ea.qp,
                &SendWr::Send {
                    sges: vec![sge(a, src, len)],
                    imm: Some(0xc0ff_ee00 + i as u32),
                },
                true,
            )
            .unwrap();
        qa.ring(&mut ea.qp).unwrap();
        let c = next(qa, ea);
        assert_eq!((c.opcode, c.wqe_counter), (CqeOpcode::Req, s));
        let rc = next(qb, eb);
        assert_eq!(
            (
                rc.opcode,
                rc.qpn,
                rc.wqe_counter,
                rc.byte_cnt as usize,
                rc.imm
            ),
            (
                CqeOpcode::RespSendImm,
                eb.qp.qpn,
                rw,
                len,
                0xc0ff_ee00 + i as u32
            )
        );
        assert!(
            b.mem.read(back, len) == data,
            "SEND of {len} bytes byte-exact"
        );
    }
}

#[test]
fn rdma_write_read_and_send_move_bytes_exactly_across_two_functions() {
    let tb = Testbed::start(2);
    let a = dma::node(&tb.vf_socket(0), DATA);
    let b = dma::node(&tb.vf_socket(1), DATA);
    let qa = DmaQueues::new(&a.hca).unwrap();
    let qb = DmaQueues::new(&b.hca).unwrap();
    let mut ea = end(&qa, 6, QpSizes::default());
    let mut eb = end(&qb, 6, QpSizes::default());
    connect(&qa, &ea, &qb, &eb);
    moves_every_size(&a, &qa, &mut ea, &b, &qb, &mut eb);
    // And back the other way.
    moves_every_size(&b, &qb, &mut eb, &a, &qa, &mut ea);
    assert!(tb.vf(0).violations().is_empty() && tb.vf(1).violations().is_empty());
}

#[test]
fn rdma_write_read_and_send_move_bytes_exactly_on_one_function() {
    let tb = Testbed::start(1);
    let a = dma::node(&tb.vf_socket(0), DATA);
    let q = DmaQueues::new(&a.hca).unwrap();
    let mut e1 = end(&q, 6, QpSizes::default());
    let mut e2 = end(&q, 6, QpSizes::default());
    connect(&q, &e1, &q, &e2);
    moves_every_size(&a, &q, &mut e1, &a, &q, &mut e2);
}

#[test]
fn unsignaled_wqes_complete_silently_and_a_signaled_one_reports_its_index() {
    let tb = Testbed::start(1);
    let a = dma::node(&tb.vf_socket(0), 2 << 20);
    let q = DmaQueues::new(&a.hca).unwrap();
    let mut e1 = end(&q, 6, QpSizes::default());
    let e2 = end(&q, 6, QpSizes::default());
    connect(&q, &e1, &q, &e2);
    a.mem.write(0, b"hello");
    for i in 0..5u64 {
        q.post_send(
            &mut e1.qp,
            &SendWr::RdmaWrite {
                sges: vec![sge(&a, 0, 5)],
                raddr: 4096 * (i + 1),
                rkey: a.key,
                imm: None,
            },
            false,
        )
        .unwrap();
    }
    let nop = q.post_send(&mut e1.qp, &SendWr::Nop, true).unwrap();
    q.ring(&mut e1.qp).unwrap();
    let c = next(&q, &mut e1);
    assert_eq!((c.opcode, c.wqe_counter), (CqeOpcode::Req, nop));
    for i in 1..=5u64 {
        assert_eq!(a.mem.read(4096 * i, 5), b"hello");
    }
    assert!(q.poll(&mut e1.cq, None).unwrap().is_none(), "one CQE only");
}

/// A connected pair on one VF, plus a second pair that must keep working.
struct Rig<'a> {
    q: DmaQueues<'a>,
    a: End,
    b: End,
}

fn rig(n: &DmaNode) -> Rig<'_> {
    let q = DmaQueues::new(&n.hca).unwrap();
    let (a, b) = loopback_pair(&q);
    Rig { q, a, b }
}

fn expect_err(r: &mut Rig<'_>, syndrome: CqeSyndrome, vendor: u8) {
    let c = next(&r.q, &mut r.a);
    assert_eq!(c.opcode, CqeOpcode::ReqErr, "{c:?}");
    assert_eq!(
        (c.syndrome, c.vendor_err),
        (Some(syndrome), vendor),
        "{c:?}"
    );
    assert_eq!(r.q.query_qp(r.a.qp.qpn).unwrap().0, QpState::Err);
}

/// `other` still moves data after `r`'s QP went to ERR.
fn still_works(n: &DmaNode, other: &mut Rig<'_>) {
    n.mem.write(0, b"alive");
    other
        .q
        .post_send(
            &mut other.a.qp,
            &SendWr::RdmaWrite {
                sges: vec![sge(n, 0, 5)],
                raddr: 8192,
                rkey: n.key,
                imm: None,
            },
            true,
        )
        .unwrap();
    other.q.ring(&mut other.a.qp).unwrap();
    let c = next(&other.q, &mut other.a);
    assert!(c.is_ok(), "{c:?}");
    assert_eq!(n.mem.read(8192, 5), b"alive");
}

#[test]
fn bad_wqes_complete_with_error_cqes_and_only_their_qp_goes_to_err() {
    let tb = Testbed::start(1);
    let n = dma::node(&tb.vf_socket(0), 2 << 20);
    let mut good = rig(&n);
    let cases: Vec<(SendWr, CqeSyndrome, u8)> = vec![
        (
            SendWr::RdmaWrite {
                sges: vec![Sge {
                    lkey: n.key ^ 0x100,
                    addr: 0,
                    len: 8,
                }],
                raddr: 0,
                rkey: n.key,
                imm: None,
            },
            CqeSyndrome::LocalProtErr,
            vs::BAD_KEY,
        ),
        (
            SendWr::RdmaWrite {
                sges: vec![sge(&n, 0, 8)],
                raddr: 0,
                rkey: n.key + 1,
                imm: None,
            },
            CqeSyndrome::RemoteAccessErr,
            vs::BAD_KEY,
        ),
        (
            SendWr::RdmaWrite {
                sges: vec![sge(&n, (2 << 20) - 4, 8)],
                raddr: 0,
                rkey: n.key,
                imm: None,
            },
            CqeSyndrome::LocalProtErr,
            vs::OUT_OF_MKEY,
        ),
        (
            SendWr::RdmaRead {
                sges: vec![sge(&n, 0, 8)],
                raddr: (2 << 20) - 4,
                rkey: n.key,
            },
            CqeSyndrome::RemoteAccessErr,
            vs::OUT_OF_MKEY,
        ),
        (
            SendWr::Send {
                sges: vec![sge(&n, 0, 8)],
                imm: None,
            },
            CqeSyndrome::RnrRetryExcErr,
            vs::NO_RECV,
        ),
    ];
    for (wr, syndrome, vendor) in cases {
        let mut r = rig(&n);
        let bad = r.q.post_send(&mut r.a.qp, &wr, false).unwrap();
        // Posted behind the bad one: flushed, never executed.
        n.mem.write(4096, &[0xee; 4]);
        r.q.post_send(
            &mut r.a.qp,
            &SendWr::RdmaWrite {
                sges: vec![sge(&n, 4096, 4)],
                raddr: 12288,
                rkey: n.key,
                imm: None,
            },
            true,
        )
        .unwrap();
        r.q.ring(&mut r.a.qp).unwrap();
        let c = next(&r.q, &mut r.a);
        assert_eq!(c.wqe_counter, bad);
        assert_eq!(
            (c.opcode, c.syndrome, c.vendor_err),
            (CqeOpcode::ReqErr, Some(syndrome), vendor),
            "{wr:?}"
        );
        let f = next(&r.q, &mut r.a);
        assert_eq!(f.syndrome, Some(CqeSyndrome::WrFlushErr), "{f:?}");
        assert_ne!(
            n.mem.read(12288, 4),
            [0xee; 4],
            "a flushed WQE moves nothing"
        );
        assert_eq!(r.q.query_qp(r.a.qp.qpn).unwrap().0, QpState::Err);
        assert_eq!(
            r.q.query_qp(r.b.qp.qpn).unwrap().0,
            QpState::Rts,
            "the peer QP is not touched"
        );
        still_works(&n, &mut good);
    }
}

#[test]
fn an_mkey_over_unmapped_iova_gives_a_local_access_error() {
    let tb = Testbed::start(1);
    let n = dma::node(&tb.vf_socket(0), 2 << 20);
    // An mkey whose page lies where nothing is DMA-mapped.
    let hole = n
        .hca
        .create_mkey(&[0x7700_0000_0000], 12, 4096, 0x11)
        .unwrap();
    let mut r = rig(&n);
    r.q.post_send(
        &mut r.a.qp,
        &SendWr::RdmaWrite {
            sges: vec![Sge {
                lkey: hole,
                addr: 0,
                len: 64,
            }],
            raddr: 0,
            rkey: n.key,
            imm: None,
        },
        true,
    )
    .unwrap();
    r.q.ring(&mut r.a.qp).unwrap();
    expect_err(&mut r, CqeSyndrome::LocalAccessErr, vs::UNMAPPED);
    let mut good = rig(&n);
    still_works(&n, &mut good);
}

/// IOVA 0 is a DMA address like any other (Linux's VFIO selftests map their first
/// buffer there, behind a vIOMMU): an mkey page at IOVA 0 is accepted, and data moves
/// from and to it.
#[test]
fn an_mkey_page_at_iova_zero_moves_data_both_ways() {
    let tb = Testbed::start(1);
    let n = dma::node(&tb.vf_socket(0), 2 << 20);
    let zero = mlx5_testbed::mem::GuestMem::mapped(&mut n.hca.cmd().client(), "iova0", 0, 4096);
    let key0 = n.hca.create_mkey(&[0], 12, 4096, 0x22).unwrap();
    let mut r = rig(&n);
    let data = pattern(9, 4096);
    zero.write(0, &data);
    // From IOVA 0 into the data buffer, then back from there to IOVA 0 + 2 KiB.
    for (lkey, laddr, rkey, raddr) in [(key0, 0, n.key, 4096), (n.key, 4096, key0, 2048)] {
        r.q.post_send(
            &mut r.a.qp,
            &SendWr::RdmaWrite {
                sges: vec![Sge {
                    lkey,
                    addr: laddr,
                    len: 2048,
                }],
                raddr,
                rkey,
                imm: None,
            },
            true,
        )
        .unwrap();
        r.q.ring(&mut r.a.qp).unwrap();
        let c = next(&r.q, &mut r.a);
        assert!(c.is_ok(), "{c:?}");
    }
    assert_eq!(n.mem.read(4096, 2048), &data[..2048]);
    assert_eq!(zero.read(2048, 2048), &data[..2048]);
}

#[test]
fn hostile_rings_complete_with_errors_and_never_hang_the_engine() {
    let tb = Testbed::start(1);
    let n = dma::node(&tb.vf_socket(0), 2 << 20);
    // A counter a whole ring (and more) ahead of what was posted.
    let mut r = rig(&n);
    r.q.ring_counter(&mut r.a.qp, 0xfff0).unwrap();
    expect_err(&mut r, CqeSyndrome::LocalQpOpErr, vs::OVERRUN);
    // A WQE claiming zero segments.
    let mut r = rig(&n);
    let c = CtrlSeg::new(WqeOpcode::Nop, 0, r.a.qp.qpn, 0, true);
    r.q.write_wqe(&mut r.a.qp, c.as_bytes()).unwrap();
    r.q.ring(&mut r.a.qp).unwrap();
    expect_err(&mut r, CqeSyndrome::LocalQpOpErr, vs::BAD_DS);
    // A WQE claiming 63 segments (16 basic blocks) with one posted.
    let mut r = rig(&n);
    let c = CtrlSeg::new(WqeOpcode::RdmaWrite, 0, r.a.qp.qpn, 63, true);
    r.q.write_wqe(&mut r.a.qp, c.as_bytes()).unwrap();
    r.q.ring(&mut r.a.qp).unwrap();
    expect_err(&mut r, CqeSyndrome::LocalQpOpErr, vs::BAD_DS);
    // An unknown opcode, and a control segment naming another QP.
    for (op, qpn, vendor) in [
        (0x3fu8, None, vs::BAD_OPCODE),
        (0x08, Some(0x7777), vs::BAD_QPN),
    ] {
        let mut r = rig(&n);
        let mut c = CtrlSeg::new(WqeOpcode::Nop, 0, qpn.unwrap_or(r.a.qp.qpn), 1, true);
        c.opmod_idx_opcode.set(u32::from(op));
        r.q.write_wqe(&mut r.a.qp, c.as_bytes()).unwrap();
        r.q.ring(&mut r.a.qp).unwrap();
        expect_err(&mut r, CqeSyndrome::LocalQpOpErr, vendor);
    }
    // A ring of seeded garbage, rung with a full ring's counter: every WQE completes
    // (with an error and flushes), bounded by the ring; the engine stays responsive.
    let seed = mlx5_testbed::testbed::seed(0x5eed);
    for round in 0..4u64 {
        let mut r = rig(&n);
        let junk = pattern(seed + round, 64 * 64);
        for bb in junk.chunks(64) {
            r.q.write_wqe(&mut r.a.qp, bb).unwrap();
        }
        r.q.ring(&mut r.a.qp).unwrap();
        let mut seen = 0;
        while let Ok(c) = r.q.poll_wait(
            &mut r.a.cq,
            Some(&mut r.a.qp),
            std::time::Duration::from_secs(2),
        ) {
            seen += 1;
            assert!(seen <= 64, "more CQEs than basic blocks: {c:?}");
        }
        assert!(
            seen >= 1,
            "the garbage ring completed nothing (seed {seed:#x})"
        );
        assert_eq!(
            r.q.query_qp(r.a.qp.qpn).unwrap().0,
            QpState::Err,
            "seed {seed:#x}"
        );
    }
    let mut good = rig(&n);
    still_works(&n, &mut good);
}

#[test]
fn a_request_into_a_responder_suspended_function_is_refused_and_recorded() {
    let tb = Testbed::start(2);
    let a = dma::node(&tb.vf_socket(0), 2 << 20);
    let b = dma::node(&tb.vf_socket(1), 2 << 20);
    let qa = DmaQueues::new(&a.hca).unwrap();
    let qb = DmaQueues::new(&b.hca).unwrap();
    let mut ea = end(&qa, 6, QpSizes::default());
    let eb = end(&qb, 6, QpSizes::default());
    connect(&qa, &ea, &qb, &eb);
    let vf1 = tb.vf(1);
    vf1.suspend_initiator().unwrap();
    vf1.freeze(std::time::Duration::from_secs(5)).unwrap();
    a.mem.write(0, &[1, 2, 3, 4]);
    qa.post_send(
        &mut ea.qp,
        &SendWr::RdmaWrite {
            sges: vec![sge(&a, 0, 4)],
            raddr: 64,
            rkey: b.key,
            imm: None,
        },
        true,
    )
    .unwrap();
    qa.ring(&mut ea.qp).unwrap();
    let c = next(&qa, &mut ea);
    assert_eq!(
        (c.opcode, c.syndrome, c.vendor_err),
        (
            CqeOpcode::ReqErr,
            Some(CqeSyndrome::RemoteOpErr),
            vs::PEER_FROZEN
        )
    );
    assert_eq!(
        b.mem.read(64, 4),
        [0; 4],
        "nothing landed in the frozen function"
    );
    let v = vf1.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, mlx5_emulator::ViolationKind::PeerDma);
    assert_eq!(v[0].address, 64);
    assert!(
        v[0].writer.contains(&format!("QP {:#x}", ea.qp.qpn)),
        "{}",
        v[0].writer
    );
}

#[test]
fn a_send_longer_than_the_receive_buffer_fails_at_both_ends() {
    let tb = Testbed::start(2);
    let a = dma::node(&tb.vf_socket(0), 2 << 20);
    let b = dma::node(&tb.vf_socket(1), 2 << 20);
    let qa = DmaQueues::new(&a.hca).unwrap();
    let qb = DmaQueues::new(&b.hca).unwrap();
    let mut ea = end(&qa, 6, QpSizes::default());
    let mut eb = end(&qb, 6, QpSizes::default());
    connect(&qa, &ea, &qb, &eb);
    let rw = qb.post_recv(&mut eb.qp, &[sge(&b, 0, 4)]).unwrap();
    qb.post_recv(&mut eb.qp, &[sge(&b, 4096, 64)]).unwrap();
    a.mem.write(0, &[9; 8]);
    qa.post_send(
        &mut ea.qp,
        &SendWr::Send {
            sges: vec![sge(&a, 0, 8)],
            imm: None,
        },
        true,
    )
    .unwrap();
    qa.ring(&mut ea.qp).unwrap();
    let c = next(&qa, &mut ea);
    assert_eq!(
        (c.opcode, c.syndrome, c.vendor_err),
        (
            CqeOpcode::ReqErr,
            Some(CqeSyndrome::RemoteInvalReqErr),
            vs::TOO_LONG
        )
    );
    let r = next(&qb, &mut eb);
    assert_eq!(
        (r.opcode, r.syndrome, r.wqe_counter),
        (CqeOpcode::RespErr, Some(CqeSyndrome::LocalLengthErr), rw)
    );
    // The responder QP is in ERR: its other receive WQE is flushed.
    let f = next(&qb, &mut eb);
    assert_eq!(
        (f.opcode, f.syndrome),
        (CqeOpcode::RespErr, Some(CqeSyndrome::WrFlushErr))
    );
    assert_eq!(qb.query_qp(eb.qp.qpn).unwrap().0, QpState::Err);
    assert_eq!(qa.query_qp(ea.qp.qpn).unwrap().0, QpState::Err);
    assert_eq!(b.mem.read(0, 4), [0; 4], "nothing scattered");
}
