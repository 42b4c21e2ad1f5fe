//! The command queue engine driven by hand over a real VF socket: a raw vfio-user
//! client, a DMA-mapped memfd holding the queue and mailboxes, the doorbell rung with
//! REGION_WRITE. Valid commands work; broken entries and chains complete with the
//! delivery status that names the problem, and the next valid command still works.

use std::time::Duration;

use mlx5_emulator::firmware::syndrome;
use mlx5_emulator::HcaState;
use mlx5_prm::cmd::caps::{
    cmd_hca_cap, query_op_mod, CapMode, CapType, HCA_CAP_MSG_OFFSET, QUERY_HCA_CAP_OUT_LEN,
};
use mlx5_prm::cmd::eq::*;
use mlx5_prm::cmd::hca::*;
use mlx5_prm::cmd::pages::*;
use mlx5_prm::cmd::uar::ALLOC_UAR_OUT_UAR;
use mlx5_prm::cmdq::*;
use mlx5_prm::ifc::{get, hdr, set};
use mlx5_prm::{CmdStatus, Opcode};
use mlx5_testbed::irq::{enable_msix, msix_eventfd};
use mlx5_testbed::rawq::{entry_off, input, status, Entry, RawQueue, MAILBOXES, TOKEN};
use mlx5_testbed::wait::{wait_for, wait_until};
use mlx5_testbed::{init_tracing, Testbed};
use vfu::uapi::*;

const BAR0: u32 = VFIO_PCI_BAR0_REGION_INDEX;
/// IOVA of the memfd.
const IOVA: u64 = 0x1_0000_0000;
const MEM_SIZE: u64 = 0x10_0000;
/// Offsets inside the memfd.
const CMDQ: u64 = 0;
const PAGES: u64 = 0x8_0000;
const EQ_RING: u64 = 0xf_0000;

/// A hand-driven command queue on VF 0.
fn queue(tb: &Testbed) -> RawQueue {
    RawQueue::new(tb.vf_client(0), IOVA, MEM_SIZE)
}

fn ok(out: &[u8]) {
    assert_eq!(status(out), (0, 0));
}

#[test]
fn enable_hca_then_query_issi_through_an_output_mailbox() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut q = queue(&tb);
    let out = q.exec(
        0,
        &input(Opcode::EnableHca, 0, ENABLE_HCA_IN_LEN),
        ENABLE_HCA_OUT_LEN,
    );
    ok(&out);
    assert_eq!(vf.hca_state(), HcaState::Enabled);
    // QUERY_ISSI's 112-byte output needs one output block.
    let out = q.exec(
        1,
        &input(Opcode::QueryIssi, 0, QUERY_ISSI_IN_LEN),
        QUERY_ISSI_OUT_LEN,
    );
    ok(&out);
    assert_eq!(get(&out, QUERY_ISSI_OUT_SUPPORTED_ISSI_DW0), 0x3);
    // QUERY_HCA_CAP: 8 output blocks, the VF reports its vhca_id and migration.
    let op_mod = query_op_mod(CapType::General, CapMode::Cur);
    let out = q.exec(
        2,
        &input(Opcode::QueryHcaCap, op_mod, 16),
        QUERY_HCA_CAP_OUT_LEN,
    );
    ok(&out);
    let cap = &out[HCA_CAP_MSG_OFFSET..];
    assert_eq!(get(cap, cmd_hca_cap::VHCA_ID), 1);
    assert_eq!(get(cap, cmd_hca_cap::MIGRATION), 1);
    let log = vf.command_log();
    let ops: Vec<u16> = log.iter().map(|r| r.opcode).collect();
    assert_eq!(ops, [0x104, 0x10a, 0x100]);
    assert!(log
        .iter()
        .all(|r| r.delivery == DeliveryStatus::Ok && r.vhca_id == 1));
    assert_eq!(log[2].op_mod, 1);
}

#[test]
fn hostile_entries_and_chains_complete_with_their_delivery_status() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut q = queue(&tb);
    ok(&q.exec(0, &input(Opcode::EnableHca, 0, 16), 16));
    let issi = input(Opcode::QueryIssi, 0, 16);
    let good_next = |q: &mut RawQueue| {
        let out = q.exec(3, &issi, QUERY_ISSI_OUT_LEN);
        ok(&out);
        assert_eq!(get(&out, QUERY_ISSI_OUT_SUPPORTED_ISSI_DW0), 3);
    };
    let mb = |k: u64| MAILBOXES + k * 0x400;
    let set_issi = {
        let mut m = input(Opcode::SetIssi, 0, 16 + 1100);
        set(&mut m, SET_ISSI_IN_CURRENT_ISSI, 1);
        m
    };
    let run =
        |q: &mut RawQueue, slot: u8, in_ptr: u64, inlen: u32, outlen: u32, out_ptr: u64, ty: u8| {
            let e = Entry {
                ty,
                inlen,
                in_ptr,
                outlen,
                out_ptr,
                ..Entry::new(&set_issi, 0)
            };
            q.entry(slot, &e);
            q.ring(1 << slot);
            q.wait(slot)
        };

    // A chain that loops: 0 → 1 → 0.
    q.block(mb(0), &[0; 512], 0, TOKEN, IOVA + mb(1));
    q.block(mb(1), &[0; 512], 1, TOKEN, IOVA + mb(0));
    let d = run(
        &mut q,
        1,
        IOVA + mb(0),
        16 + 512 * 4,
        16,
        0,
        MLX5_PCI_CMD_XPORT,
    );
    assert_eq!(d, DeliveryStatus::BadBlockNumErr);
    good_next(&mut q);

    // Blocks out of order: the second block says it is block 2.
    q.block(mb(0), &[0; 512], 0, TOKEN, IOVA + mb(1));
    q.block(mb(1), &[0; 512], 2, TOKEN, 0);
    let d = run(
        &mut q,
        1,
        IOVA + mb(0),
        16 + 1000,
        16,
        0,
        MLX5_PCI_CMD_XPORT,
    );
    assert_eq!(d, DeliveryStatus::BadBlockNumErr);
    good_next(&mut q);

    // A declared length beyond the chain: next = 0 after one block of three.
    q.block(mb(0), &[0; 512], 0, TOKEN, 0);
    let d = run(
        &mut q,
        1,
        IOVA + mb(0),
        16 + 1100,
        16,
        0,
        MLX5_PCI_CMD_XPORT,
    );
    assert_eq!(d, DeliveryStatus::InLengthErr);
    // The same for the output chain.
    let d = run(
        &mut q,
        1,
        0,
        16,
        16 + 1100,
        IOVA + mb(0),
        MLX5_PCI_CMD_XPORT,
    );
    assert_eq!(d, DeliveryStatus::OutLengthErr);
    good_next(&mut q);

    // An in_ptr / out_ptr that is not DMA-mapped.
    let d = run(&mut q, 1, 0x7000_0000, 16 + 1100, 16, 0, MLX5_PCI_CMD_XPORT);
    assert_eq!(d, DeliveryStatus::InPtrAlignErr);
    let d = run(&mut q, 1, 0, 16, 200, IOVA + MEM_SIZE, MLX5_PCI_CMD_XPORT);
    assert_eq!(d, DeliveryStatus::OutPtrAlignErr);
    good_next(&mut q);

    // A bad type, a zero token, a block with another token.
    let d = run(&mut q, 2, 0, 16, 16, 0, 6);
    assert_eq!(d, DeliveryStatus::CmdDescrErr);
    q.entry(
        2,
        &Entry {
            token: 0,
            ..Entry::new(&issi, 16)
        },
    );
    q.ring(1 << 2);
    assert_eq!(q.wait(2), DeliveryStatus::TokenErr);
    q.block(mb(0), &[0; 512], 0, TOKEN ^ 1, 0);
    let d = run(&mut q, 2, IOVA + mb(0), 16 + 100, 16, 0, MLX5_PCI_CMD_XPORT);
    assert_eq!(d, DeliveryStatus::TokenErr);
    // Lengths out of bounds.
    let d = run(&mut q, 2, 0, 8, 16, 0, MLX5_PCI_CMD_XPORT);
    assert_eq!(d, DeliveryStatus::InLengthErr);
    let d = run(&mut q, 2, 0, 16, u32::MAX, 0, MLX5_PCI_CMD_XPORT);
    assert_eq!(d, DeliveryStatus::OutLengthErr);
    good_next(&mut q);
    // None of the refused commands executed: the ISSI is still 0.
    assert_eq!(vf.firmware().issi(), 0);

    // A doorbell for a slot never written: nothing changes, and the worker moves on.
    let before = q.read(entry_off(9), 64);
    assert_eq!(before, vec![0; 64]);
    let log_len = vf.command_log().len();
    q.ring(1 << 9);
    good_next(&mut q); // queued after slot 9, so slot 9 was handled first
    assert_eq!(q.read(entry_off(9), 64), before);
    assert_eq!(
        vf.command_log().len(),
        log_len + 1,
        "only the valid command was logged"
    );

    let refused: Vec<DeliveryStatus> = vf
        .command_log()
        .iter()
        .map(|r| r.delivery)
        .filter(|&d| d != DeliveryStatus::Ok)
        .collect();
    assert_eq!(refused.len(), 11);
}

#[test]
fn a_queue_address_that_is_not_mapped_drops_the_slot_and_the_queue_recovers() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut q = queue(&tb);
    q.entry(0, &Entry::new(&input(Opcode::EnableHca, 0, 16), 16));
    q.program(0x7700_0000).unwrap();
    q.ring(1);
    // Give the worker a moment; nothing can be written anywhere.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(q.status_own(0), CMD_OWNER_HW);
    assert_eq!(vf.hca_state(), HcaState::Disabled);
    q.program(IOVA + CMDQ).unwrap();
    q.ring(1);
    assert_eq!(q.wait(0), DeliveryStatus::Ok);
    assert_eq!(vf.hca_state(), HcaState::Enabled);
}

#[test]
fn unknown_opcode_and_wrong_state_get_command_statuses() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut q = queue(&tb);
    let mut unknown = vec![0u8; 16];
    set(&mut unknown, hdr::OPCODE, 0x0999);
    let out = q.exec(0, &unknown, 16);
    assert_eq!(
        status(&out),
        (CmdStatus::BadOpErr.into(), syndrome::UNKNOWN_OPCODE)
    );
    // INIT_HCA and QUERY_ISSI before ENABLE_HCA.
    let out = q.exec(1, &input(Opcode::InitHca, 0, INIT_HCA_IN_LEN), 16);
    assert_eq!(
        status(&out),
        (CmdStatus::BadSysStateErr.into(), syndrome::WRONG_STATE)
    );
    let out = q.exec(2, &input(Opcode::QueryIssi, 0, 16), QUERY_ISSI_OUT_LEN);
    assert_eq!(
        status(&out),
        (CmdStatus::BadSysStateErr.into(), syndrome::WRONG_STATE)
    );
    ok(&q.exec(3, &input(Opcode::EnableHca, 0, 16), 16));
    let out = q.exec(4, &input(Opcode::EnableHca, 0, 16), 16);
    assert_eq!(
        status(&out),
        (CmdStatus::BadSysStateErr.into(), syndrome::WRONG_STATE)
    );
    // A short output for QUERY_ISSI is a command error, not a delivery error.
    let out = q.exec(5, &input(Opcode::QueryIssi, 0, 16), 16);
    assert_eq!(
        status(&out),
        (CmdStatus::BadOutpLenErr.into(), syndrome::SHORT_OUTPUT)
    );
    let log = vf.command_log();
    assert_eq!(log[0].opcode, 0x999);
    assert_eq!(log[0].status, mlx5_prm::CmdStatus::BadOpErr);
    assert_ne!(log[0].syndrome, 0);
    assert_eq!(log[1].status, mlx5_prm::CmdStatus::BadSysStateErr);
}

/// Full bring-up by hand up to event mode: the command EQ's EQEs land in the ring with
/// the right owner phase, and MSI-X fires on a real eventfd only while armed.
#[test]
fn command_completion_switches_to_eqe_and_msix_once_the_cmd_eq_exists() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut q = queue(&tb);
    // MSI-X vector 0 → an eventfd.
    let efd = msix_eventfd(&mut q.client, 0);
    enable_msix(&mut q.client);

    ok(&q.exec(0, &input(Opcode::EnableHca, 0, 16), 16));
    for stage in [1u16, 2] {
        let out = q.exec(0, &input(Opcode::QueryPages, stage, 16), 16);
        ok(&out);
        let n = get(&out, QUERY_PAGES_OUT_NUM_PAGES) as usize;
        assert_eq!(n, 4);
        let mut m = input(Opcode::ManagePages, 1, manage_pages_in_len(n).unwrap());
        set(&mut m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, n as u64);
        for i in 0..n {
            let pa = IOVA + PAGES + (u64::from(stage) * 8 + i as u64) * 4096;
            set(&mut m, MANAGE_PAGES_IN_PAS.nth(i).unwrap(), pa);
        }
        ok(&q.exec(31, &m, 16));
    }
    ok(&q.exec(0, &input(Opcode::InitHca, 0, INIT_HCA_IN_LEN), 16));
    let out = q.exec(0, &input(Opcode::AllocUar, 0, 16), 16);
    ok(&out);
    let uar = get(&out, ALLOC_UAR_OUT_UAR) as u32;
    assert_eq!(uar, 3);

    // The command EQ: 4 entries (so the owner phase flips quickly), MSI-X 0.
    let log_size = 2u32;
    let mut m = input(Opcode::CreateEq, 0, create_eq_in_len(1).unwrap());
    set(&mut m, CREATE_EQ_IN_LOG_EQ_SIZE, u64::from(log_size));
    set(&mut m, CREATE_EQ_IN_UAR_PAGE, u64::from(uar));
    set(&mut m, CREATE_EQ_IN_INTR, 0);
    set(&mut m, CREATE_EQ_IN_EVENT_BITMASK, 1 << EVENT_TYPE_CMD);
    set(&mut m, CREATE_EQ_IN_PAS, IOVA + EQ_RING);
    for i in 0..4 {
        q.write(EQ_RING + i * 64 + 63, &[EQE_OWNER_INIT_VAL]);
    }
    let out = q.exec(0, &m, 16);
    ok(&out);
    let eqn = get(&out, CREATE_EQ_OUT_EQ_NUMBER) as u8;
    // CREATE_EQ itself completed by polling: no EQE, no interrupt.
    assert_eq!(q.read(EQ_RING, 64)[63], 1);
    assert!(efd.read().is_err());
    assert_eq!(vf.object_counts().eqs, 1);

    let doorbell = |q: &mut RawQueue, off: u32, ci: u32| {
        let addr = u64::from(uar) * 4096 + u64::from(off);
        q.client
            .region_write(BAR0, addr, &eq_doorbell_value(eqn, ci).to_be_bytes())
            .unwrap();
    };
    let wait_irq = || wait_for("MSI-X", Duration::from_secs(5), || efd.read().ok());
    doorbell(&mut q, EQ_DOORBELL_ARM_OFFSET, 0);
    let issi = input(Opcode::QueryIssi, 0, 16);
    let mut ci = 0u32;
    for round in 0..6u32 {
        let slot = (round % 3) as u8 + 4;
        let out = q.exec(slot, &issi, QUERY_ISSI_OUT_LEN);
        ok(&out);
        assert_eq!(wait_irq(), 1, "round {round}");
        let idx = u64::from(ci % 4);
        let eqe = q.read(EQ_RING + idx * 64, 64);
        assert_eq!(eqe[1], EVENT_TYPE_CMD);
        assert_eq!(get(&eqe, EQE_CMD_VECTOR), 1 << slot);
        assert_eq!(
            u32::from(eqe[63]),
            eqe_owner(ci, log_size) as u32,
            "round {round}"
        );
        ci += 1;
        // The last round only updates the consumer index: the EQ stays disarmed (an
        // interrupt disarms it until the next +0x40 write).
        let off = if round < 5 {
            EQ_DOORBELL_ARM_OFFSET
        } else {
            EQ_DOORBELL_NOARM_OFFSET
        };
        doorbell(&mut q, off, ci);
    }
    // Not armed: the EQE is written, no interrupt.
    ok(&q.exec(4, &issi, QUERY_ISSI_OUT_LEN));
    // The EQE is posted just after status_own; wait for it.
    wait_until("the EQE", Duration::from_secs(5), || {
        get(
            &q.read(EQ_RING + u64::from(ci % 4) * 64, 64),
            EQE_CMD_VECTOR,
        ) == 1 << 4
    });
    std::thread::sleep(Duration::from_millis(20));
    assert!(efd.read().is_err());
    // Arming while that EQE is unconsumed fires at once.
    doorbell(&mut q, EQ_DOORBELL_ARM_OFFSET, ci);
    assert_eq!(wait_irq(), 1);
    ci += 1;
    doorbell(&mut q, EQ_DOORBELL_NOARM_OFFSET, ci);

    // Destroy the command EQ; completion is polled again.
    let mut m = input(Opcode::DestroyEq, 0, 16);
    set(&mut m, DESTROY_EQ_IN_EQ_NUMBER, u64::from(eqn));
    ok(&q.exec(0, &m, 16));
    ok(&q.exec(0, &issi, QUERY_ISSI_OUT_LEN));
    assert_eq!(vf.object_counts().eqs, 0);
    assert_eq!(vf.object_counts().pages, 8);
    assert_eq!(vf.object_counts().uars, 1);
    // FLR returns the firmware to power-on.
    vf.reset();
    assert_eq!(vf.hca_state(), HcaState::Disabled);
    assert!(vf.object_counts().is_empty());
}

/// An output chain is checked whole before the command runs: a block whose control
/// tail is readable but whose data the device cannot write (here a read-only window)
/// refuses the command at delivery, so MANAGE_PAGES does not take pages it then could
/// not report.
#[test]
fn an_output_block_the_device_cannot_write_refuses_the_command_before_it_runs() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let mut q = queue(&tb);
    ok(&q.exec(0, &input(Opcode::EnableHca, 0, 16), 16));
    const RO_IOVA: u64 = 0x2_0000_0000;
    let ro = mlx5_testbed::mem::memfd("hostile-ro-out", 0x1000);
    let block = mlx5_testbed::rawq::encode_block(&[], 0, TOKEN, 0);
    std::os::unix::fs::FileExt::write_all_at(&ro, &block, 0).unwrap();
    use std::os::fd::AsRawFd;
    q.client
        .dma_map(RO_IOVA, 0x1000, ro.as_raw_fd(), 0, VFIO_DMA_MAP_FLAG_READ)
        .unwrap();

    let mut m = input(Opcode::ManagePages, 1, manage_pages_in_len(1).unwrap());
    set(&mut m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, 1);
    set(&mut m, MANAGE_PAGES_IN_PAS.nth(0).unwrap(), IOVA + PAGES);
    let in_ptr = q.chain(0, &m[16..], m.len());
    let e = Entry {
        in_ptr,
        outlen: 16 + 512,
        out_ptr: RO_IOVA,
        ..Entry::new(&m, 16 + 512)
    };
    q.entry(2, &e);
    q.ring(1 << 2);
    assert_eq!(q.wait(2), DeliveryStatus::OutPtrAlignErr);
    assert_eq!(vf.object_counts().pages, 0, "the command did not run");
    // The same command with a writable output runs.
    ok(&q.exec(3, &m, 16 + 512));
    assert_eq!(vf.object_counts().pages, 1);
}
