//! Suspend semantics of the emulator over real sockets. The PF suspends and resumes the
//! VF through its own command queue (mlx5vf's command client); the VF's queue is driven
//! by hand, as a guest driver would (a raw vfio-user client, the queue in a DMA-mapped
//! memfd, the doorbell rung with REGION_WRITE), so that every slot's ownership can be
//! watched.
//!
//! What is shown:
//! * command work queued on the VF before SUSPEND_VHCA(responder) has executed and
//!   completed before the SUSPEND command completes;
//! * a doorbell after it is refused and recorded as a violation (writer, address, time)
//!   and changes nothing: the slot stays hardware-owned, the firmware is untouched;
//! * RESUME_VHCA in reverse order lets the refused command proceed.

use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use mlx5_emulator::{HcaState, MigState, ViolationKind};
use mlx5_prm::cmd::migration::*;
use mlx5_prm::cmdq::*;
use mlx5_prm::iseg::{CMDQ_ADDR_H_OFFSET, CMDQ_ADDR_L_SZ_OFFSET, CMD_DBELL_OFFSET};
use mlx5_testbed::bringup::{disable_hca_in, enable_hca_in, pf_up, resume_vhca, suspend_vhca};
use mlx5_testbed::faults;
use mlx5_testbed::rawq::{self, RawQueue};
use mlx5_testbed::{init_tracing, Testbed};

/// IOVA of the VF's queue memfd.
const IOVA: u64 = 0x1_0000_0000;
const MEM_SIZE: u64 = 0x1_0000;
const VF_VHCA: u16 = 1;

/// The VF's command queue, driven by hand as its guest driver would.
fn vf_queue(tb: &Testbed) -> RawQueue {
    RawQueue::new(tb.vf_client(0), IOVA, MEM_SIZE)
}

#[test]
fn command_work_queued_before_responder_suspend_completes_before_suspend_does() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut q = vf_queue(&tb);
    let pf = pf_up(&tb.pf_socket());
    suspend_vhca(&pf, SuspendOpMod::Initiator, VF_VHCA).unwrap();

    // The guest posts ENABLE_HCA and rings. The firmware lock is held here, so the VF's
    // worker takes the work and blocks executing it: the work is queued, not done.
    let fw = faults::hold_firmware(&vf);
    let (input, outlen) = enable_hca_in();
    q.post(0, &input, outlen);
    q.ring(1);
    assert_eq!(vf.work_in_flight(), 1, "the doorbell's work is in flight");

    let (tx, rx) = mpsc::channel();
    let vf2 = vf.clone();
    let mem = q.mem.try_clone();
    let suspender = std::thread::spawn(move || {
        let r = suspend_vhca(&pf, SuspendOpMod::Responder, VF_VHCA);
        // What the device looks like the moment SUSPEND has completed.
        tx.send((
            r,
            rawq::status_own(&mem, 0),
            vf2.hca_state(),
            vf2.work_in_flight(),
        ))
        .unwrap();
        pf
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "SUSPEND_VHCA(responder) completed while command work was still queued"
    );
    assert_eq!(vf.migration_state(), MigState::ResponderSuspended);
    assert_eq!(q.status_own(0) & CMD_OWNER_HW, CMD_OWNER_HW);
    drop(fw);

    let (r, own, state, inflight) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    r.expect("SUSPEND_VHCA(responder)");
    assert_eq!(
        own & CMD_OWNER_HW,
        0,
        "the slot completed before SUSPEND did"
    );
    assert_eq!(
        DeliveryStatus::from_status_own(own).unwrap(),
        DeliveryStatus::Ok
    );
    assert_eq!(
        state,
        HcaState::Enabled,
        "the command ran before SUSPEND completed"
    );
    assert_eq!(inflight, 0);
    assert!(vf.violations().is_empty(), "{:?}", vf.violations());
    assert_eq!(q.wait_status(0), (DeliveryStatus::Ok, 0));
    let pf = suspender.join().unwrap();
    resume_vhca(&pf, ResumeOpMod::Responder, VF_VHCA).unwrap();
    resume_vhca(&pf, ResumeOpMod::Initiator, VF_VHCA).unwrap();
    assert_eq!(vf.migration_state(), MigState::Running);
}

#[test]
fn doorbell_after_responder_suspend_is_a_violation_and_runs_after_resume_in_reverse_order() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut q = vf_queue(&tb);
    let (input, outlen) = enable_hca_in();
    q.post(0, &input, outlen);
    q.ring(1);
    assert_eq!(q.wait_status(0), (DeliveryStatus::Ok, 0));
    assert_eq!(vf.hca_state(), HcaState::Enabled);

    let pf = pf_up(&tb.pf_socket());
    suspend_vhca(&pf, SuspendOpMod::Initiator, VF_VHCA).unwrap();
    suspend_vhca(&pf, SuspendOpMod::Responder, VF_VHCA).unwrap();
    let log_before = vf.command_log();

    // DISABLE_HCA would change the HCA state; the doorbell is refused and recorded.
    let (input, outlen) = disable_hca_in();
    q.post(1, &input, outlen);
    let t0 = SystemTime::now();
    q.ring(1 << 1);
    let t1 = SystemTime::now();
    let v = vf.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, ViolationKind::CommandDoorbell);
    assert_eq!(v[0].writer, "client of vf0.sock");
    assert_eq!(v[0].address, CMD_DBELL_OFFSET);
    assert!(t0 <= v[0].at && v[0].at <= t1, "violation time");

    // A new queue address would change state that the image carries: refused too.
    let addr_before = (
        q.read_reg(CMDQ_ADDR_H_OFFSET),
        q.read_reg(CMDQ_ADDR_L_SZ_OFFSET),
    );
    assert!(
        q.program(IOVA + 0x1000).is_err(),
        "queue address write refused"
    );
    assert_eq!(
        (
            q.read_reg(CMDQ_ADDR_H_OFFSET),
            q.read_reg(CMDQ_ADDR_L_SZ_OFFSET)
        ),
        addr_before
    );
    let v = vf.violations();
    assert_eq!(v.len(), 2, "{v:?}");
    assert_eq!(v[1].kind, ViolationKind::RegisterWrite);
    assert_eq!(v[1].address, CMDQ_ADDR_H_OFFSET);

    // Nothing changed, and nothing will while frozen.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        q.status_own(1) & CMD_OWNER_HW,
        CMD_OWNER_HW,
        "slot still hardware-owned"
    );
    assert_eq!(vf.hca_state(), HcaState::Enabled);
    assert_eq!(vf.command_log(), log_before);
    assert_eq!(vf.work_in_flight(), 0);

    // Resume in the wrong order is refused and still runs nothing.
    assert!(resume_vhca(&pf, ResumeOpMod::Initiator, VF_VHCA).is_err());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(q.status_own(1) & CMD_OWNER_HW, CMD_OWNER_HW);
    assert_eq!(vf.hca_state(), HcaState::Enabled);

    // RESUME(responder) rings the refused doorbell: the command proceeds.
    resume_vhca(&pf, ResumeOpMod::Responder, VF_VHCA).unwrap();
    assert_eq!(q.wait_status(1), (DeliveryStatus::Ok, 0));
    assert_eq!(vf.hca_state(), HcaState::Disabled);
    resume_vhca(&pf, ResumeOpMod::Initiator, VF_VHCA).unwrap();
    assert_eq!(vf.migration_state(), MigState::Running);
    assert_eq!(vf.violations().len(), 2, "resuming records nothing");

    // Running again: the queue works as before.
    let (input, outlen) = enable_hca_in();
    q.post(2, &input, outlen);
    q.ring(1 << 2);
    assert_eq!(q.wait_status(2), (DeliveryStatus::Ok, 0));
    assert_eq!(vf.hca_state(), HcaState::Enabled);
}

#[test]
fn initiator_suspended_function_still_runs_its_command_queue() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut q = vf_queue(&tb);
    let pf = pf_up(&tb.pf_socket());
    suspend_vhca(&pf, SuspendOpMod::Initiator, VF_VHCA).unwrap();
    let (input, outlen) = enable_hca_in();
    q.post(0, &input, outlen);
    q.ring(1);
    assert_eq!(q.wait_status(0), (DeliveryStatus::Ok, 0));
    assert_eq!(vf.hca_state(), HcaState::Enabled);
    assert!(vf.violations().is_empty());
}

#[test]
fn every_doorbell_rung_before_responder_suspend_has_completed_when_it_returns() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut q = vf_queue(&tb);
    let pf = pf_up(&tb.pf_socket());
    suspend_vhca(&pf, SuspendOpMod::Initiator, VF_VHCA).unwrap();
    // One doorbell per slot (one work item each); the VF is disabled, so each completes
    // with BAD_SYS_STATE, which is still a completion written by the device.
    let slots = mlx5_emulator::cmdq::CMDQ_SLOTS as u8;
    let (input, outlen) = disable_hca_in();
    for slot in 0..slots {
        q.post(slot, &input, outlen);
        q.ring(1 << slot);
    }
    suspend_vhca(&pf, SuspendOpMod::Responder, VF_VHCA).unwrap();
    for slot in 0..slots {
        assert_eq!(
            q.status_own(slot) & CMD_OWNER_HW,
            0,
            "slot {slot} still hardware-owned after SUSPEND(responder)"
        );
    }
    assert_eq!(vf.work_in_flight(), 0);
    assert!(vf.violations().is_empty());
}
