//! Completion events: a CQ armed through its UAR doorbell raises one completion EQE and
//! one MSI-X interrupt per arm on its EQ's vector (the eventfd the client gave with
//! SET_IRQS); an unarmed CQ none; a re-arm needs the next arm sequence number;
//! ARM_SOLICITED waits for a solicited or error CQE; the event reaches a CQ on another
//! function; a CQ keeps its EQ; bad UAR writes are refused and recorded.

use mlx5_emulator::firmware::UarRefusal;
use mlx5_prm::cmd::cq::{cq_arm_word, CqArmCmd, CQ_DOORBELL_CQN_OFFSET, CQ_DOORBELL_OFFSET};
use mlx5_prm::cmd::eq::{DESTROY_EQ_IN_EQ_NUMBER, DESTROY_EQ_IN_LEN, DESTROY_EQ_OUT_LEN};
use mlx5_prm::cmd::uar::UAR_PAGE_SIZE;
use mlx5_prm::wqe::{CqeOpcode, UAR_BF_OFFSET};
use mlx5_prm::{CmdStatus, Opcode};
use mlx5_testbed::dma::{self, connect, end, loopback_pair, next, DmaNode, End, CQE_WAIT};
use mlx5_testbed::Testbed;
use mlx5vf::cmdif::CmdError;
use mlx5vf::cmdif::{new_input, BAR0};
use mlx5vf::dma::{DmaQueues, Event, QpSizes, SendWr, Sge};

const DATA: u64 = 2 << 20;

fn queues(n: &DmaNode) -> DmaQueues<'_> {
    let q = DmaQueues::new(&n.hca).expect("DMA queues");
    q.enable_events().expect("completion events");
    q
}

fn nop(q: &DmaQueues<'_>, e: &mut End) {
    q.post_send(&mut e.qp, &SendWr::Nop, true).expect("NOP");
    q.ring(&mut e.qp).expect("ring");
    let c = next(q, e);
    assert!(c.is_ok(), "{c:?}");
}

/// Waits for the completion vector's interrupt: exactly one.
fn one_interrupt(q: &DmaQueues<'_>) {
    assert_eq!(
        q.wait_interrupt(CQE_WAIT).expect("wait"),
        1,
        "one interrupt"
    );
}

fn sge(n: &DmaNode, addr: u64, len: u32) -> Sge {
    Sge {
        lkey: n.key,
        addr,
        len,
    }
}

fn teardown(q: DmaQueues<'_>, ends: Vec<End>) {
    for e in ends {
        q.destroy_qp(e.qp).expect("destroy QP");
        q.destroy_cq(e.cq).expect("destroy CQ");
    }
    q.close().expect("close queues");
}

#[test]
fn an_armed_cq_raises_one_interrupt_per_arm_and_an_unarmed_one_none() {
    let tb = Testbed::start(1);
    let n = dma::node(&tb.vf_socket(0), DATA);
    let q = queues(&n);
    let (mut a, b) = loopback_pair(&q);
    // Unarmed: the NOP completes, no event.
    nop(&q, &mut a);
    // Armed: two NOPs, one event, one interrupt.
    q.arm_cq(&a.cq, false).expect("arm");
    nop(&q, &mut a);
    nop(&q, &mut a);
    one_interrupt(&q);
    let cqn = a.cq.cqn;
    assert_eq!(
        q.take_events(&mut [&mut a.cq]).expect("EQEs"),
        vec![Event::Completion { cqn }],
        "one completion EQE for three CQEs, one of them armed"
    );
    assert_eq!(a.cq.arm_sn(), 1);
    // Re-armed with the next number: the next NOP fires again, once.
    q.arm_cq(&a.cq, false).expect("re-arm");
    nop(&q, &mut a);
    one_interrupt(&q);
    assert_eq!(
        q.take_events(&mut [&mut a.cq]).expect("EQEs"),
        vec![Event::Completion { cqn }]
    );
    // wait_event: arm, interrupt, EQE, CQE.
    q.post_send(&mut a.qp, &SendWr::Nop, true).expect("NOP");
    q.ring(&mut a.qp).expect("ring");
    let c = q
        .wait_event(&mut a.cq, Some(&mut a.qp), CQE_WAIT)
        .expect("a CQE by event");
    assert_eq!(c.opcode, CqeOpcode::Req);
    teardown(q, vec![a, b]);
}

#[test]
fn an_arm_that_repeats_a_spent_sequence_number_is_ignored() {
    let tb = Testbed::start(1);
    let n = dma::node(&tb.vf_socket(0), DATA);
    let q = queues(&n);
    let (mut a, b) = loopback_pair(&q);
    q.arm_cq(&a.cq, false).expect("arm");
    nop(&q, &mut a);
    one_interrupt(&q);
    // The EQE is taken (the EQ re-armed) but not counted for the CQ: its next arm
    // carries the spent number 0.
    assert_eq!(q.take_events(&mut []).expect("EQEs").len(), 1);
    q.arm_cq(&a.cq, false).expect("stale arm");
    nop(&q, &mut a);
    // With the right number the arm takes, and only the NOP after it fires.
    a.cq.event();
    q.arm_cq(&a.cq, false).expect("arm");
    nop(&q, &mut a);
    one_interrupt(&q);
    let cqn = a.cq.cqn;
    assert_eq!(
        q.take_events(&mut [&mut a.cq]).expect("EQEs"),
        vec![Event::Completion { cqn }],
        "the stale arm fired nothing"
    );
    teardown(q, vec![a, b]);
}

#[test]
fn arm_solicited_fires_on_a_solicited_receive_or_an_error_only() {
    let tb = Testbed::start(1);
    let n = dma::node(&tb.vf_socket(0), DATA);
    let q = queues(&n);
    let (mut a, mut b) = loopback_pair(&q);
    n.mem.write(0, b"solicited");
    let send = SendWr::Send {
        sges: vec![sge(&n, 0, 9)],
        imm: None,
    };
    q.arm_cq(&b.cq, true).expect("arm solicited");
    // A plain SEND: b's receive CQE is not solicited.
    q.post_recv(&mut b.qp, &[sge(&n, 4096, 64)]).expect("recv");
    q.post_send(&mut a.qp, &send, true).expect("send");
    q.ring(&mut a.qp).expect("ring");
    assert_eq!(next(&q, &mut a).opcode, CqeOpcode::Req);
    assert_eq!(next(&q, &mut b).opcode, CqeOpcode::RespSend);
    // The same SEND with the solicited-event bit fires b's CQ.
    q.post_recv(&mut b.qp, &[sge(&n, 4096, 64)]).expect("recv");
    q.post_send_solicited(&mut a.qp, &send, true)
        .expect("send solicited");
    q.ring(&mut a.qp).expect("ring");
    assert_eq!(next(&q, &mut a).opcode, CqeOpcode::Req);
    assert_eq!(next(&q, &mut b).opcode, CqeOpcode::RespSend);
    one_interrupt(&q);
    let cqn = b.cq.cqn;
    assert_eq!(
        q.take_events(&mut [&mut b.cq]).expect("EQEs"),
        vec![Event::Completion { cqn }],
        "only the solicited receive fired"
    );
    // Armed solicited again: b's own NOP completes unsolicited; a bad WQE's error CQE
    // fires.
    q.arm_cq(&b.cq, true).expect("arm solicited");
    nop(&q, &mut b);
    let bad = SendWr::RdmaWrite {
        sges: vec![Sge {
            lkey: n.key ^ 0x100,
            addr: 0,
            len: 8,
        }],
        raddr: 0,
        rkey: n.key,
        imm: None,
    };
    q.post_send(&mut b.qp, &bad, true).expect("bad WQE");
    q.ring(&mut b.qp).expect("ring");
    assert_eq!(next(&q, &mut b).opcode, CqeOpcode::ReqErr);
    one_interrupt(&q);
    assert_eq!(
        q.take_events(&mut [&mut b.cq]).expect("EQEs"),
        vec![Event::Completion { cqn }]
    );
    teardown(q, vec![a, b]);
}

#[test]
fn a_receive_completion_on_another_function_raises_that_functions_vector() {
    let tb = Testbed::start(2);
    let n0 = dma::node(&tb.vf_socket(0), DATA);
    let n1 = dma::node(&tb.vf_socket(1), DATA);
    let (q0, q1) = (queues(&n0), queues(&n1));
    let mut a = end(&q0, 6, QpSizes::default());
    let mut b = end(&q1, 6, QpSizes::default());
    connect(&q0, &a, &q1, &b);
    q1.arm_cq(&b.cq, false).expect("arm on VF 1");
    q1.post_recv(&mut b.qp, &[sge(&n1, 0, 64)]).expect("recv");
    n0.mem.write(0, b"across");
    let send = SendWr::Send {
        sges: vec![sge(&n0, 0, 6)],
        imm: None,
    };
    q0.post_send(&mut a.qp, &send, true).expect("send");
    q0.ring(&mut a.qp).expect("ring");
    assert_eq!(next(&q0, &mut a).opcode, CqeOpcode::Req);
    one_interrupt(&q1);
    let cqn = b.cq.cqn;
    assert_eq!(
        q1.take_events(&mut [&mut b.cq]).expect("EQEs"),
        vec![Event::Completion { cqn }]
    );
    assert_eq!(next(&q1, &mut b).opcode, CqeOpcode::RespSend);
    assert_eq!(
        q0.interrupts().expect("VF 0 vector"),
        0,
        "the sender's CQ was not armed"
    );
    teardown(q0, vec![a]);
    teardown(q1, vec![b]);
}

#[test]
fn a_cqs_eq_is_not_destroyed_before_it() {
    let tb = Testbed::start(1);
    let n = dma::node(&tb.vf_socket(0), DATA);
    let q = queues(&n);
    let (mut a, b) = loopback_pair(&q);
    let mut m = new_input(Opcode::DestroyEq, 0, DESTROY_EQ_IN_LEN);
    mlx5_prm::ifc::set(&mut m, DESTROY_EQ_IN_EQ_NUMBER, q.eqn().into());
    match n.hca.cmd().exec(&m, DESTROY_EQ_OUT_LEN) {
        Err(CmdError::Status {
            status, syndrome, ..
        }) => {
            assert_eq!(status, CmdStatus::ResBusy);
            assert_eq!(syndrome, mlx5_emulator::firmware::syndrome::BUSY);
        }
        other => panic!("DESTROY_EQ under two CQs: {other:?}"),
    }
    // The EQ still takes the CQ's events.
    q.arm_cq(&a.cq, false).expect("arm");
    nop(&q, &mut a);
    one_interrupt(&q);
    assert_eq!(q.take_events(&mut [&mut a.cq]).expect("EQEs").len(), 1);
    // With the CQs gone the EQ goes.
    teardown(q, vec![a, b]);
}

#[test]
fn bad_uar_writes_are_refused_recorded_and_change_nothing() {
    let tb = Testbed::start(1);
    let n = dma::node(&tb.vf_socket(0), DATA);
    let q = queues(&n);
    let (mut a, b) = loopback_pair(&q);
    let uar = n.hca.info().expect("up").uar;
    let page = u64::from(uar) * UAR_PAGE_SIZE;
    let cqn = a.cq.cqn;
    let arm = cq_arm_word(0, CqArmCmd::Next, 0);
    let word = |v: u32| v.to_be_bytes().to_vec();
    let pair = |w: u32, c: u32| [w.to_be_bytes(), c.to_be_bytes()].concat();
    let writes: Vec<(u64, Vec<u8>, UarRefusal)> = vec![
        (
            page + u64::from(CQ_DOORBELL_CQN_OFFSET),
            word(cqn),
            UarRefusal::CqnWithoutArm { value: cqn },
        ),
        (
            page + u64::from(CQ_DOORBELL_OFFSET),
            pair(0x0200_0000, cqn),
            UarRefusal::ArmCmd {
                word: 0x0200_0000,
                cmd: 2,
            },
        ),
        (
            page + u64::from(CQ_DOORBELL_OFFSET),
            vec![0xff; 8],
            UarRefusal::ArmReserved { word: 0xffff_ffff },
        ),
        (
            page + u64::from(CQ_DOORBELL_OFFSET),
            pair(arm, 0x77),
            UarRefusal::NoCq {
                cqn: 0x77,
                page: uar,
            },
        ),
        (
            page + 0x10,
            word(1),
            UarRefusal::NoRegister { offset: 0x10 },
        ),
        (
            page + 5 * UAR_PAGE_SIZE + u64::from(CQ_DOORBELL_OFFSET),
            word(arm),
            UarRefusal::NoUar { page: uar + 5 },
        ),
        (
            page + u64::from(UAR_BF_OFFSET) + 4,
            word(0x4242 << 8 | 1),
            UarRefusal::NoQp {
                qpn: 0x4242,
                page: uar,
            },
        ),
    ];
    for (off, bytes, _) in &writes {
        n.hca
            .cmd()
            .client()
            .region_write(BAR0, *off, bytes)
            .expect("a refused doorbell is still a completed BAR write");
    }
    let log = tb.vf(0).firmware().uar_log().recent();
    let why: Vec<UarRefusal> = log.iter().map(|w| w.why).collect();
    let want: Vec<UarRefusal> = writes.iter().map(|w| w.2).collect();
    assert_eq!(why, want);
    assert_eq!(log[1].offset, CQ_DOORBELL_CQN_OFFSET);
    // None of them armed the CQ: an unarmed NOP fires nothing, then a proper arm does.
    nop(&q, &mut a);
    q.arm_cq(&a.cq, false).expect("arm");
    nop(&q, &mut a);
    one_interrupt(&q);
    assert_eq!(
        q.take_events(&mut [&mut a.cq]).expect("EQEs"),
        vec![Event::Completion { cqn }]
    );
    teardown(q, vec![a, b]);
}
