//! DMA dirty logging (VFIO DMA_LOGGING_START / REPORT / STOP) on the PF's page
//! tracker, as mlx5vf drives it: the report names exactly the pages the VF's DMA
//! engine wrote into its guest memory, against a known pattern of RDMA_WRITE,
//! RDMA_READ and SEND, at 4 KiB and larger bitmap and tracker page sizes; a report
//! clears what it reported; pages outside the ranges, stores the guest makes itself
//! and writes into device memory are not reported; hostile tracker objects are
//! refused with a status and syndrome.

use std::collections::BTreeSet;

use mlx5_emulator::firmware::page_track::pt_syndrome;
use mlx5_prm::cmd::page_track::{
    create_in_len, ctx, in_msg, range_length, range_start, GENERAL_OBJ_IN_OBJ_ID,
    GENERAL_OBJ_IN_OBJ_TYPE, GENERAL_OBJ_OUT_HDR_LEN, OBJ_TYPE_PAGE_TRACK,
};
use mlx5_prm::ifc::set;
use mlx5_prm::{CmdStatus, Opcode};
use mlx5_testbed::bringup;
use mlx5_testbed::dma::{
    self, connect, end, loopback_pair, next, pattern, DmaNode, End, DATA_IOVA,
};
use mlx5_testbed::Testbed;
use mlx5vf::cmdif::{new_input, CmdError};
use mlx5vf::dirty::DirtyTracker;
use mlx5vf::dma::{DmaQueues, SendWr, Sge};

const DATA: u64 = 16 << 20;
const PAGE: u64 = 4096;
/// The source area (the test's own stores, never device writes).
const SRC: u64 = 0;

fn sge(n: &DmaNode, addr: u64, len: usize) -> Sge {
    Sge {
        lkey: n.key,
        addr,
        len: len as u32,
    }
}

/// The pages of `page` bytes that `off..off+len` of the data buffer touches, as IOVAs.
fn pages(off: u64, len: u64, page: u64) -> BTreeSet<u64> {
    let first = (DATA_IOVA + off) / page;
    let last = (DATA_IOVA + off + len - 1) / page;
    (first..=last).map(|p| p * page).collect()
}

/// The IOVAs of the set bits of a report of `start..` at `page`.
fn bits(bitmap: &[u64], start: u64, page: u64) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for (w, &v) in bitmap.iter().enumerate() {
        for b in 0..64 {
            if v & (1 << b) != 0 {
                out.insert(start + (w as u64 * 64 + b) * page);
            }
        }
    }
    out
}

/// Reports `start..start+len` at `page`; the dirty pages' IOVAs.
fn report(t: &mut DirtyTracker<'_>, start: u64, len: u64, page: u64) -> BTreeSet<u64> {
    let mut bm = vec![0u64; (len / page).div_ceil(64) as usize];
    t.report(start, len, page, &mut bm).expect("report");
    bits(&bm, start, page)
}

fn rdma_write(n: &DmaNode, q: &DmaQueues<'_>, a: &mut End, src: u64, dst: u64, len: usize) {
    q.post_send(
        &mut a.qp,
        &SendWr::RdmaWrite {
            sges: vec![sge(n, src, len)],
            raddr: dst,
            rkey: n.key,
            imm: None,
        },
        true,
    )
    .unwrap();
    q.ring(&mut a.qp).unwrap();
    assert!(next(q, a).is_ok());
}

/// The known pattern: an RDMA_WRITE of one byte, one across four pages, an RDMA_READ
/// into one page and a SEND into a posted receive; returns the pages written.
fn device_writes(n: &DmaNode, q: &DmaQueues<'_>, a: &mut End, b: &mut End) -> BTreeSet<u64> {
    n.mem.write(SRC, &pattern(7, 1 << 20));
    let mut want = BTreeSet::new();
    let (o1, o2) = (
        2 * (1 << 20) + 5 * PAGE + 100,
        2 * (1 << 20) + 10 * PAGE + 4000,
    );
    rdma_write(n, q, a, SRC, o1, 1);
    want.extend(pages(o1, 1, PAGE));
    rdma_write(n, q, a, SRC + 17, o2, 8392);
    want.extend(pages(o2, 8392, PAGE));
    // RDMA_READ: the local destination is what the device writes.
    let o3 = 3 * (1 << 20) + 7 * PAGE;
    q.post_send(
        &mut a.qp,
        &SendWr::RdmaRead {
            sges: vec![sge(n, o3, 4096)],
            raddr: SRC + PAGE,
            rkey: n.key,
        },
        true,
    )
    .unwrap();
    q.ring(&mut a.qp).unwrap();
    assert!(next(q, a).is_ok());
    want.extend(pages(o3, 4096, PAGE));
    // SEND into b's receive at o4.
    let o4 = 4 * (1 << 20) + 3 * PAGE + 17;
    q.post_recv(&mut b.qp, &[sge(n, o4, 5000)]).unwrap();
    q.post_send(
        &mut a.qp,
        &SendWr::Send {
            sges: vec![sge(n, SRC, 5000)],
            imm: None,
        },
        true,
    )
    .unwrap();
    q.ring(&mut a.qp).unwrap();
    assert!(next(q, a).is_ok());
    assert!(next(q, b).is_ok());
    want.extend(pages(o4, 5000, PAGE));
    assert_eq!(n.mem.read(o4, 5000), n.mem.read(SRC, 5000));
    want
}

#[test]
fn dirty_logging_reports_exactly_the_pages_the_device_wrote() {
    let tb = Testbed::start(1);
    let pf = bringup::pf_up(&tb.pf_socket());
    let n = dma::node(&tb.vf_socket(0), DATA);
    let q = DmaQueues::new(&n.hca).unwrap();
    let (mut a, mut b) = loopback_pair(&q);
    let range = (DATA_IOVA, DATA);
    let mut t = DirtyTracker::start(&pf, n.vhca_id, &[range], PAGE).expect("start");
    assert_eq!(t.page_size(), PAGE);
    assert!(
        report(&mut t, DATA_IOVA, DATA, PAGE).is_empty(),
        "nothing yet"
    );
    let want = device_writes(&n, &q, &mut a, &mut b);
    assert_eq!(want.len(), 1 + 4 + 1 + 2);
    assert_eq!(report(&mut t, DATA_IOVA, DATA, PAGE), want);
    assert!(
        report(&mut t, DATA_IOVA, DATA, PAGE).is_empty(),
        "read-and-clear: the second report is empty"
    );
    // The same pattern reported in 2 MiB bitmap pages, in two halves.
    let want = device_writes(&n, &q, &mut a, &mut b);
    let big = 2u64 << 20;
    let want_big: BTreeSet<u64> = want.iter().map(|p| p & !(big - 1)).collect();
    let half = DATA / 2;
    let mut got = report(&mut t, DATA_IOVA, half, big);
    got.extend(report(&mut t, DATA_IOVA + half, half, big));
    assert_eq!(got, want_big);
    assert!(report(&mut t, DATA_IOVA, DATA, PAGE).is_empty());
    // Stop, write, start again: what was written while stopped is not reported.
    t.stop().unwrap();
    device_writes(&n, &q, &mut a, &mut b);
    let mut t = DirtyTracker::start(&pf, n.vhca_id, &[range], PAGE).expect("restart");
    assert!(report(&mut t, DATA_IOVA, DATA, PAGE).is_empty());
    let want = device_writes(&n, &q, &mut a, &mut b);
    assert_eq!(report(&mut t, DATA_IOVA, DATA, PAGE), want);
    t.stop().unwrap();
}

#[test]
fn pages_outside_the_ranges_and_the_guests_own_stores_are_not_reported() {
    let tb = Testbed::start(1);
    let pf = bringup::pf_up(&tb.pf_socket());
    let n = dma::node(&tb.vf_socket(0), DATA);
    let q = DmaQueues::new(&n.hca).unwrap();
    let (mut a, _b) = loopback_pair(&q);
    let mib = 1u64 << 20;
    // Two ranges with a gap between them: [2, 3) MiB and [5, 6) MiB.
    let ranges = [(DATA_IOVA + 5 * mib, mib), (DATA_IOVA + 2 * mib, mib)];
    let mut t = DirtyTracker::start(&pf, n.vhca_id, &ranges, PAGE).expect("start");
    n.mem.write(SRC, &pattern(3, 4096));
    for off in [2 * mib, 4 * mib, 5 * mib + PAGE, 7 * mib] {
        rdma_write(&n, &q, &mut a, SRC, off, 64);
    }
    // The guest's own stores (its CPU, not the device) into a tracked page.
    n.mem.write(2 * mib + 9 * PAGE, &[1; 64]);
    // And stores into the VF's device memory (BAR2), through the region and through
    // the client's mmap of it.
    n.hca
        .cmd()
        .client()
        .region_write(vfu::uapi::VFIO_PCI_BAR2_REGION_INDEX, 0, &[0xab; 64])
        .unwrap();
    let bar2 = mlx5_testbed::devmem::Bar2Map::new(&mut n.hca.cmd().client());
    bar2.write(4096, &[0xcd; 64]);
    let got = report(&mut t, DATA_IOVA, DATA, PAGE);
    let want: BTreeSet<u64> = [DATA_IOVA + 2 * mib, DATA_IOVA + 5 * mib + PAGE].into();
    assert_eq!(got, want);
    t.stop().unwrap();
}

#[test]
fn a_larger_tracker_page_is_reported_whole_in_a_4k_bitmap() {
    let tb = Testbed::start(1);
    let pf = bringup::pf_up(&tb.pf_socket());
    let n = dma::node(&tb.vf_socket(0), DATA);
    let q = DmaQueues::new(&n.hca).unwrap();
    let (mut a, _b) = loopback_pair(&q);
    let big = 2u64 << 20;
    let mut t = DirtyTracker::start(&pf, n.vhca_id, &[(DATA_IOVA, DATA)], big).expect("start");
    assert_eq!(t.page_size(), big);
    n.mem.write(SRC, &pattern(5, 64));
    rdma_write(&n, &q, &mut a, SRC, 3 * big + 12345, 1);
    let got = report(&mut t, DATA_IOVA, DATA, PAGE);
    assert_eq!(
        got,
        pages(3 * big, big, PAGE),
        "every 4 KiB page of the 2 MiB page"
    );
    t.stop().unwrap();
}

#[test]
fn many_dirty_pages_take_several_report_messages_and_all_arrive() {
    let tb = Testbed::start(1);
    let pf = bringup::pf_up(&tb.pf_socket());
    let n = dma::node(&tb.vf_socket(0), DATA);
    let q = DmaQueues::new(&n.hca).unwrap();
    let (mut a, _b) = loopback_pair(&q);
    let mut t = DirtyTracker::start(&pf, n.vhca_id, &[(DATA_IOVA, DATA)], PAGE).expect("start");
    // 8 MiB: 2048 pages, four messages of 512 entries.
    let len = 8usize << 20;
    rdma_write(&n, &q, &mut a, SRC, DATA - len as u64, len);
    let got = report(&mut t, DATA_IOVA, DATA, PAGE);
    assert_eq!(got.len(), 2048);
    assert_eq!(got, pages(DATA - len as u64, len as u64, PAGE));
    assert!(report(&mut t, DATA_IOVA, DATA, PAGE).is_empty());
    t.stop().unwrap();
}

/// A CREATE_GENERAL_OBJECT(PAGE_TRACK) with sane fields for `vhca_id`, reporting from
/// `qpn`, then `edit`.
fn create_input(vhca_id: u16, qpn: u32, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut m = new_input(Opcode::CreateGeneralObject, 0, create_in_len(1));
    set(&mut m, GENERAL_OBJ_IN_OBJ_TYPE, OBJ_TYPE_PAGE_TRACK.into());
    set(&mut m, in_msg(ctx::VHCA_ID), vhca_id.into());
    set(&mut m, in_msg(ctx::TRACK_TYPE), 1);
    set(&mut m, in_msg(ctx::LOG_PAGE_SIZE), 12);
    set(&mut m, in_msg(ctx::LOG_MSG_SIZE), 12);
    set(&mut m, in_msg(ctx::REPORTING_QPN), qpn.into());
    set(&mut m, in_msg(ctx::NUM_RANGES), 1);
    set(&mut m, in_msg(ctx::LOG_ADDR_SPACE_SIZE), 24);
    set(&mut m, range_start(0).unwrap(), DATA_IOVA);
    set(&mut m, range_length(0).unwrap(), DATA);
    edit(&mut m);
    m
}

#[test]
fn hostile_tracker_objects_are_refused_with_status_and_syndrome() {
    let tb = Testbed::start(1);
    let pf = bringup::pf_up(&tb.pf_socket());
    let n = dma::node(&tb.vf_socket(0), DATA);
    let vhca = n.vhca_id;
    // A real QP of the PF to name as the reporting QP.
    let pq = DmaQueues::new(&pf).unwrap();
    let (pa, _pb) = loopback_pair(&pq);
    let qpn = pa.qp.qpn;
    let refused =
        |m: Vec<u8>, status: CmdStatus, synd: u32| match pf.cmd().exec(&m, GENERAL_OBJ_OUT_HDR_LEN)
        {
            Err(CmdError::Status {
                status: s,
                syndrome,
                ..
            }) => assert_eq!((s, syndrome), (status, synd)),
            other => panic!("expected {status} {synd:#x}, got {other:?}"),
        };
    let bad = CmdStatus::BadParamErr;
    let m = create_input(vhca, qpn, |m| set(m, GENERAL_OBJ_IN_OBJ_TYPE, 0x47));
    refused(m, bad, pt_syndrome::UNKNOWN_OBJ_TYPE);
    let m = create_input(vhca, qpn, |m| set(m, in_msg(ctx::TRACK_TYPE), 2));
    refused(m, bad, pt_syndrome::BAD_TRACK_TYPE);
    let m = create_input(vhca, qpn, |m| set(m, in_msg(ctx::LOG_PAGE_SIZE), 31));
    refused(m, bad, pt_syndrome::BAD_PAGE_SIZE);
    let m = create_input(vhca, qpn, |m| set(m, in_msg(ctx::LOG_MSG_SIZE), 20));
    refused(m, bad, pt_syndrome::BAD_MSG_SIZE);
    let m = create_input(vhca, qpn, |m| set(m, in_msg(ctx::NUM_RANGES), 0));
    refused(m, bad, pt_syndrome::BAD_NUM_RANGES);
    // More ranges than the input carries: the input is too short.
    let m = create_input(vhca, qpn, |m| set(m, in_msg(ctx::NUM_RANGES), 16));
    refused(
        m,
        CmdStatus::BadInpLenErr,
        mlx5_emulator::firmware::syndrome::SHORT_INPUT,
    );
    let m = create_input(vhca, qpn, |m| {
        set(m, range_start(0).unwrap(), DATA_IOVA + 1)
    });
    refused(m, bad, pt_syndrome::BAD_RANGE);
    let m = create_input(vhca, qpn, |m| {
        set(m, range_start(0).unwrap(), u64::MAX - 0xfff);
        set(m, range_length(0).unwrap(), 0x2000);
    });
    refused(m, bad, pt_syndrome::BAD_RANGE);
    let m = create_input(vhca, qpn, |m| set(m, range_length(0).unwrap(), 0));
    refused(m, bad, pt_syndrome::BAD_RANGE);
    let m = create_input(vhca, qpn, |m| set(m, in_msg(ctx::LOG_ADDR_SPACE_SIZE), 20));
    refused(m, bad, pt_syndrome::BAD_ADDR_SPACE);
    let m = create_input(vhca, 0xdead, |_| {});
    refused(m, CmdStatus::BadResErr, pt_syndrome::BAD_REPORTING_QP);
    let m = create_input(0x77, qpn, |_| {});
    refused(m, bad, mlx5_emulator::firmware::syndrome::BAD_FUNCTION);
    let m = create_input(0, qpn, |_| {});
    refused(m, bad, pt_syndrome::NOT_TRACKABLE);
    // A VF cannot track anyone.
    match n
        .hca
        .cmd()
        .exec(&create_input(vhca, qpn, |_| {}), GENERAL_OBJ_OUT_HDR_LEN)
    {
        Err(CmdError::Status { syndrome, .. }) => {
            assert_eq!(syndrome, mlx5_emulator::firmware::syndrome::BAD_FUNCTION)
        }
        other => panic!("a VF created a tracker: {other:?}"),
    }
    // A real tracker; a second one for the same VF is refused; the first still works.
    let mut t = DirtyTracker::start(&pf, vhca, &[(DATA_IOVA, DATA)], PAGE).expect("start");
    let m = create_input(vhca, qpn, |_| {});
    refused(m, CmdStatus::ResBusy, pt_syndrome::ALREADY_TRACKED);
    assert!(report(&mut t, DATA_IOVA, DATA, PAGE).is_empty());
    // Hostile MODIFY / QUERY / DESTROY of it.
    let id = t.object_id().unwrap();
    let modify = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut m = new_input(Opcode::ModifyGeneralObject, 0, create_in_len(0));
        set(&mut m, GENERAL_OBJ_IN_OBJ_TYPE, OBJ_TYPE_PAGE_TRACK.into());
        set(&mut m, GENERAL_OBJ_IN_OBJ_ID, id.into());
        set(&mut m, in_msg(ctx::MODIFY_FIELD_SELECT), 3);
        set(&mut m, in_msg(ctx::STATE), 1);
        set(&mut m, in_msg(ctx::RANGE_START_ADDRESS), DATA_IOVA);
        set(&mut m, in_msg(ctx::LENGTH), DATA);
        edit(&mut m);
        m
    };
    refused(
        modify(&|m| set(m, GENERAL_OBJ_IN_OBJ_ID, 0x99)),
        CmdStatus::BadResErr,
        mlx5_emulator::firmware::syndrome::NO_SUCH_OBJECT,
    );
    refused(
        modify(&|m| set(m, in_msg(ctx::MODIFY_FIELD_SELECT), 0x2)),
        bad,
        pt_syndrome::BAD_FIELD_SELECT,
    );
    refused(
        modify(&|m| set(m, in_msg(ctx::MODIFY_FIELD_SELECT), 0x7)),
        bad,
        pt_syndrome::BAD_FIELD_SELECT,
    );
    refused(
        modify(&|m| set(m, in_msg(ctx::STATE), 0)),
        CmdStatus::BadResStateErr,
        pt_syndrome::BAD_STATE,
    );
    refused(
        modify(&|m| set(m, in_msg(ctx::STATE), 9)),
        bad,
        pt_syndrome::BAD_STATE,
    );
    refused(
        modify(&|m| set(m, in_msg(ctx::LENGTH), 0)),
        bad,
        pt_syndrome::BAD_RANGE,
    );
    refused(
        modify(&|m| set(m, in_msg(ctx::RANGE_START_ADDRESS), u64::MAX)),
        bad,
        pt_syndrome::BAD_RANGE,
    );
    refused(
        modify(&|m| set(m, GENERAL_OBJ_IN_OBJ_TYPE, 0x13)),
        bad,
        pt_syndrome::UNKNOWN_OBJ_TYPE,
    );
    let mut m = new_input(Opcode::DestroyGeneralObject, 0, 16);
    set(&mut m, GENERAL_OBJ_IN_OBJ_TYPE, OBJ_TYPE_PAGE_TRACK.into());
    set(&mut m, GENERAL_OBJ_IN_OBJ_ID, (id + 1).into());
    refused(
        m,
        CmdStatus::BadResErr,
        mlx5_emulator::firmware::syndrome::NO_SUCH_OBJECT,
    );
    // Bad reports: nothing reaches the device.
    let mut bm = [0u64; 1];
    assert!(t.report(DATA_IOVA + 1, PAGE, PAGE, &mut bm).is_err());
    assert!(
        t.report(DATA_IOVA, 128 * PAGE, PAGE, &mut bm).is_err(),
        "bitmap too small"
    );
    assert!(t.report(DATA_IOVA, PAGE, 1000, &mut bm).is_err());
    t.stop().unwrap();
}

#[test]
fn the_tracker_raises_object_change_on_an_eq_that_takes_it() {
    use mlx5_prm::cmd::eq::{CREATE_EQ_OUT_EQ_NUMBER, CREATE_EQ_OUT_LEN};
    use mlx5_prm::cmd::page_track::{
        EQE_OBJ_CHANGE_OBJ_ID, EQE_OBJ_CHANGE_OBJ_TYPE, EVENT_TYPE_OBJECT_CHANGE,
    };
    use mlx5vf::cmdif::EventQueue;
    let tb = Testbed::start(1);
    let pf = bringup::pf_up(&tb.pf_socket());
    let n = dma::node(&tb.vf_socket(0), DATA);
    let q = DmaQueues::new(&n.hca).unwrap();
    let (mut a, _b) = loopback_pair(&q);
    let uar = pf.info().unwrap().uar;
    let mut eq = EventQueue::alloc(pf.cmd().arena(), 6, uar, 2).unwrap();
    let out = pf
        .cmd()
        .exec(
            &eq.create_input(1 << EVENT_TYPE_OBJECT_CHANGE),
            CREATE_EQ_OUT_LEN,
        )
        .expect("async EQ");
    eq.set_eqn(mlx5_prm::ifc::get(&out, CREATE_EQ_OUT_EQ_NUMBER) as u8);
    let mut t = DirtyTracker::start(&pf, n.vhca_id, &[(DATA_IOVA, DATA)], PAGE).unwrap();
    let id = t.object_id().unwrap();
    for round in 0..2u64 {
        rdma_write(&n, &q, &mut a, SRC, (round + 1) << 20, 10);
        assert_eq!(report(&mut t, DATA_IOVA, DATA, PAGE).len(), 1);
        let deadline = std::time::Instant::now() + dma::CQE_WAIT;
        let e = loop {
            if let Some(e) = eq.next(pf.cmd().arena()).unwrap() {
                break e;
            }
            assert!(std::time::Instant::now() < deadline, "no OBJECT_CHANGE EQE");
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(e.event_type(), EVENT_TYPE_OBJECT_CHANGE);
        assert_eq!(mlx5_prm::ifc::get(&e.bytes, EQE_OBJ_CHANGE_OBJ_TYPE), 0x46);
        assert_eq!(
            mlx5_prm::ifc::get(&e.bytes, EQE_OBJ_CHANGE_OBJ_ID),
            u64::from(id)
        );
    }
    t.stop().unwrap();
}

#[test]
fn a_report_that_cannot_be_delivered_leaves_the_tracker_in_error_until_restarted() {
    use mlx5_prm::cmd::page_track::PageTrackState;
    let tb = Testbed::start(1);
    let pf = bringup::pf_up(&tb.pf_socket());
    let n = dma::node(&tb.vf_socket(0), DATA);
    let q = DmaQueues::new(&n.hca).unwrap();
    let (mut a, _b) = loopback_pair(&q);
    let mut t = DirtyTracker::start(&pf, n.vhca_id, &[(DATA_IOVA, DATA)], PAGE).unwrap();
    let (host, _fw) = t.qpns().unwrap();
    rdma_write(&n, &q, &mut a, SRC, 1 << 20, 10);
    // The host QP is taken to ERR behind the driver's back: the report has nowhere to go.
    let pq = DmaQueues::new(&pf).unwrap();
    pq.modify(host, Opcode::Qp2ErrQp, |_| {}).unwrap();
    let mut bm = vec![0u64; (DATA / PAGE / 64) as usize];
    let e = t.report(DATA_IOVA, DATA, PAGE, &mut bm).unwrap_err();
    assert_eq!(e.errno(), -5, "{e}");
    let id = t.object_id().unwrap();
    let deadline = std::time::Instant::now() + dma::CQE_WAIT;
    while t.query_state(id).unwrap() != PageTrackState::Failed {
        assert!(
            std::time::Instant::now() < deadline,
            "tracker never in ERROR"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let again = t.report(DATA_IOVA, DATA, PAGE, &mut bm).unwrap_err();
    assert_eq!(again.errno(), -5, "later reports fail too: {again}");
    t.stop().unwrap();
    // Stop and start: a working tracker again.
    let mut t = DirtyTracker::start(&pf, n.vhca_id, &[(DATA_IOVA, DATA)], PAGE).unwrap();
    rdma_write(&n, &q, &mut a, SRC, 2 << 20, 10);
    assert_eq!(
        report(&mut t, DATA_IOVA, DATA, PAGE),
        pages(2 << 20, 10, PAGE)
    );
    t.stop().unwrap();
}

#[test]
fn a_peers_writes_into_the_tracked_vf_are_its_dma_and_are_reported() {
    let tb = Testbed::start(2);
    let pf = bringup::pf_up(&tb.pf_socket());
    let n0 = dma::node(&tb.vf_socket(0), DATA);
    let n1 = dma::node(&tb.vf_socket(1), DATA);
    let (q0, q1) = (
        DmaQueues::new(&n0.hca).unwrap(),
        DmaQueues::new(&n1.hca).unwrap(),
    );
    let sizes = mlx5vf::dma::QpSizes::default();
    let (mut e0, mut e1) = (end(&q0, 6, sizes), end(&q1, 6, sizes));
    connect(&q0, &e0, &q1, &e1);
    let mut t = DirtyTracker::start(&pf, n0.vhca_id, &[(DATA_IOVA, DATA)], PAGE).unwrap();
    // VF1 writes into VF0 (VF0's memory is written by VF0's side of the fabric) ...
    n1.mem.write(SRC, &pattern(9, 3 * 4096));
    q1.post_send(
        &mut e1.qp,
        &SendWr::RdmaWrite {
            sges: vec![sge(&n1, SRC, 3 * 4096)],
            raddr: 6 << 20,
            rkey: n0.key,
            imm: None,
        },
        true,
    )
    .unwrap();
    q1.ring(&mut e1.qp).unwrap();
    assert!(next(&q1, &mut e1).is_ok());
    // ... and VF0 reads from VF1 (VF1's memory is only read: VF0's local pages are written).
    q0.post_send(
        &mut e0.qp,
        &SendWr::RdmaRead {
            sges: vec![sge(&n0, 9 << 20, 4096)],
            raddr: SRC,
            rkey: n1.key,
        },
        true,
    )
    .unwrap();
    q0.ring(&mut e0.qp).unwrap();
    assert!(next(&q0, &mut e0).is_ok());
    let mut want = pages(6 << 20, 3 * 4096, PAGE);
    want.extend(pages(9 << 20, 4096, PAGE));
    assert_eq!(report(&mut t, DATA_IOVA, DATA, PAGE), want);
    assert_eq!(n0.mem.read(6 << 20, 3 * 4096), pattern(9, 3 * 4096));
    t.stop().unwrap();
}

#[test]
fn a_report_nobody_receives_ends_in_error_instead_of_waiting_forever() {
    use mlx5_prm::cmd::page_track::{imm_state, PageTrackState, GENERAL_OBJ_OUT_OBJ_ID};
    use mlx5_prm::wqe::CqeOpcode;
    use mlx5vf::dma::{QpAddr, QpSizes};
    let tb = Testbed::start(1);
    let pf = bringup::pf_up(&tb.pf_socket());
    let n = dma::node(&tb.vf_socket(0), DATA);
    let q = DmaQueues::new(&n.hca).unwrap();
    let (mut a, _b) = loopback_pair(&q);
    // A host QP with a single receive posted, and the queueless fw QP, by hand.
    let pq = DmaQueues::new(&pf).unwrap();
    let mut cq = pq.create_cq(4).unwrap();
    let host_sizes = QpSizes {
        log_rq: 2,
        log_rq_stride: 0,
        no_sq: true,
        ..QpSizes::default()
    };
    let mut host = pq.create_qp(&cq, &cq, host_sizes).unwrap();
    let fw_sizes = QpSizes {
        no_sq: true,
        zero_rq: true,
        ..QpSizes::default()
    };
    let fw = pq.create_qp(&cq, &cq, fw_sizes).unwrap();
    let fl = |qpn| QpAddr {
        vhca_id: 0,
        qpn,
        loopback: true,
    };
    pq.connect(&host, fl(fw.qpn)).unwrap();
    pq.connect(&fw, fl(host.qpn)).unwrap();
    let page = pf.cmd().arena().alloc_page().unwrap();
    let key = pf.create_mkey(&[page], 12, 4096, 3).unwrap();
    pq.post_recv(
        &mut host,
        &[Sge {
            lkey: key,
            addr: 0,
            len: 4096,
        }],
    )
    .unwrap();
    let out = pf
        .cmd()
        .exec(
            &create_input(n.vhca_id, fw.qpn, |_| {}),
            GENERAL_OBJ_OUT_HDR_LEN,
        )
        .expect("create");
    let id = mlx5_prm::ifc::get(&out, GENERAL_OBJ_OUT_OBJ_ID) as u32;
    // 2048 dirty pages: four messages, room for one.
    rdma_write(&n, &q, &mut a, SRC, 8 << 20, 8 << 20);
    let mut m = new_input(Opcode::ModifyGeneralObject, 0, create_in_len(0));
    set(&mut m, GENERAL_OBJ_IN_OBJ_TYPE, OBJ_TYPE_PAGE_TRACK.into());
    set(&mut m, GENERAL_OBJ_IN_OBJ_ID, id.into());
    set(&mut m, in_msg(ctx::MODIFY_FIELD_SELECT), 3);
    set(&mut m, in_msg(ctx::STATE), 1);
    set(&mut m, in_msg(ctx::RANGE_START_ADDRESS), DATA_IOVA);
    set(&mut m, in_msg(ctx::LENGTH), DATA);
    pf.cmd().exec(&m, GENERAL_OBJ_OUT_HDR_LEN).expect("modify");
    let c = pq
        .poll_wait(&mut cq, Some(&mut host), dma::CQE_WAIT)
        .unwrap();
    assert_eq!(c.opcode, CqeOpcode::RespSendImm);
    assert_eq!(c.byte_cnt, 4096, "a full message of 512 entries");
    assert_eq!(imm_state(c.imm), PageTrackState::Reporting as u8);
    // The rest waits for receives that never come, then the tracker gives up.
    let query = || {
        let mut m = new_input(Opcode::QueryGeneralObject, 0, 16);
        set(&mut m, GENERAL_OBJ_IN_OBJ_TYPE, OBJ_TYPE_PAGE_TRACK.into());
        set(&mut m, GENERAL_OBJ_IN_OBJ_ID, id.into());
        let out = pf
            .cmd()
            .exec(&m, mlx5_prm::cmd::page_track::QUERY_PAGE_TRACK_OUT_LEN)
            .unwrap();
        mlx5_prm::ifc::get(&out, in_msg(ctx::STATE)) as u8
    };
    let deadline = std::time::Instant::now() + 3 * mlx5_emulator::dma::REPORT_RNR_TIMEOUT;
    while query() != PageTrackState::Failed as u8 {
        assert!(
            std::time::Instant::now() < deadline,
            "tracker still waiting"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        pq.poll(&mut cq, Some(&mut host)).unwrap().is_none(),
        "nothing more sent"
    );
    // A tracker in ERROR refuses to report again; it can still be destroyed.
    let r = pf.cmd().exec(&m, GENERAL_OBJ_OUT_HDR_LEN);
    assert!(
        matches!(r, Err(CmdError::Status { syndrome, .. }) if syndrome == pt_syndrome::BAD_STATE),
        "{r:?}"
    );
    let mut d = new_input(Opcode::DestroyGeneralObject, 0, 16);
    set(&mut d, GENERAL_OBJ_IN_OBJ_TYPE, OBJ_TYPE_PAGE_TRACK.into());
    set(&mut d, GENERAL_OBJ_IN_OBJ_ID, id.into());
    pf.cmd().exec(&d, GENERAL_OBJ_OUT_HDR_LEN).expect("destroy");
}
