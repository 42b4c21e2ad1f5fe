//! The firmware executes commands on different slots concurrently, as hardware does,
//! and holds no lock across a long command: over real sockets, with mlx5vf's command
//! interface posting several commands at once (submit / wait tickets).
//!
//! * A QUERY_ISSI posted while a SAVE_VHCA_STATE of 256 MiB of device memory is
//!   executing on another slot of the same PF completes while the SAVE is still
//!   running.
//! * While a VF's SUSPEND_VHCA(responder) waits for the VF's admitted work to drain
//!   (a VF command held in the VF's firmware by the delay hook), the PF answers
//!   QUERY_ISSI and QUERY_HCA_CAP.

use std::time::{Duration, Instant};

use mlx5_emulator::{CmdRecord, Function, MigState};
use mlx5_prm::cmd::caps::{CapMode, CapType, QUERY_HCA_CAP_OUT_LEN};
use mlx5_prm::cmd::migration::*;
use mlx5_prm::ifc::{get, hdr, set};
use mlx5_prm::{CmdStatus, Opcode};
use mlx5_testbed::bringup::{cmdif, enable_hca_in, exec, pf_up, query_issi_in, vhca_input, ARENA};
use mlx5_testbed::mem::GuestMem;
use mlx5_testbed::{devmem, faults, init_tracing, AdapterConfig, Testbed};
use mlx5vf::hca::caps::query_hca_cap_in;

const VF_VHCA: u16 = 1;
/// Device memory of every function in the SAVE test: the largest the emulator offers.
const DEV_MEM: u64 = 256 << 20;
/// The PF's SAVE buffer: the image of 256 MiB of pages and their headers fits.
const BUF_LEN: u64 = 320 << 20;
/// Its IOVA, aligned to the mkey's 1 GiB page.
const BUF_IOVA: u64 = 0x40_0000_0000;
const MKEY_LOG_PAGE: u8 = 30;

/// A debug build SAVEs 256 MiB in seconds: the PF's command timeout for that test.
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);

fn query_hca_cap() -> Vec<u8> {
    query_hca_cap_in(CapType::General, CapMode::Cur, None)
}

fn naming_vf(op: Opcode, op_mod: u16, len: usize) -> Vec<u8> {
    vhca_input(op, op_mod, len, VF_VHCA)
}

/// Where in `f`'s command log the first record of `op` (with `op_mod`) is.
fn logged(f: &Function, op: Opcode, op_mod: u16) -> Option<usize> {
    f.command_log()
        .iter()
        .position(|r: &CmdRecord| r.opcode == u16::from(op) && r.op_mod == op_mod)
}

fn ok_status(out: &[u8]) {
    assert_eq!(get(out, hdr::STATUS), u64::from(u8::from(CmdStatus::Ok)));
}

#[test]
fn query_issi_completes_while_a_256_mib_save_runs_on_another_slot() {
    init_tracing();
    let tb = Testbed::start_with(AdapterConfig {
        vfs: 1,
        dev_mem: DEV_MEM,
        ..AdapterConfig::default()
    });
    let pf_fn = tb.pf();
    let vf = tb.vf(0);
    // Non-zero device memory, so that the base image carries every page.
    devmem::fill(&vf, 0x5a);

    let pf = pf_up(&tb.pf_socket());
    pf.cmd().set_timeout(SAVE_TIMEOUT);
    let _buf = GuestMem::mapped(&mut pf.cmd().client(), "fwc-save-buffer", BUF_IOVA, BUF_LEN);
    let key = pf
        .create_mkey(&[BUF_IOVA], MKEY_LOG_PAGE, BUF_LEN, 0x42)
        .unwrap();

    // A pre-copy base image (set_track, the VF running): every non-zero page.
    let mut save = naming_vf(Opcode::SaveVhcaState, 0, SAVE_VHCA_STATE_IN_LEN);
    set(&mut save, SAVE_VHCA_STATE_IN_SET_TRACK, 1);
    set(&mut save, SAVE_VHCA_STATE_IN_MKEY, key.into());
    set(&mut save, SAVE_VHCA_STATE_IN_SIZE, BUF_LEN);
    let t0 = Instant::now();
    let t_save = pf.cmd().submit(&save, SAVE_VHCA_STATE_OUT_LEN).unwrap();
    // Wait until the SAVE is executing (the VF is busy with it).
    while !vf.migration().busy() {
        assert!(t0.elapsed() < Duration::from_secs(60), "SAVE never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let t1 = Instant::now();
    let (m, n) = query_issi_in();
    let t_issi = pf.cmd().submit(&m, n).unwrap();
    assert_ne!(t_issi.slot(), t_save.slot());
    let out = pf.cmd().wait(t_issi).expect("QUERY_ISSI");
    let issi_took = t1.elapsed();
    ok_status(&out);
    // The short command is back while the long one still runs: the SAVE has not
    // completed (not in the log, the VF still busy with it).
    assert!(
        vf.migration().busy(),
        "the SAVE was over before QUERY_ISSI completed"
    );
    assert_eq!(
        logged(&pf_fn, Opcode::SaveVhcaState, 0),
        None,
        "the SAVE completed before QUERY_ISSI"
    );

    let out = pf.cmd().wait(t_save).expect("SAVE_VHCA_STATE");
    let save_took = t0.elapsed();
    ok_status(&out);
    let image = get(&out, SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE);
    assert!(image > DEV_MEM, "image of {image} bytes carries every page");
    let log_issi = logged(&pf_fn, Opcode::QueryIssi, 0).unwrap();
    let log_save = logged(&pf_fn, Opcode::SaveVhcaState, 0).unwrap();
    // Bring-up ran a QUERY_ISSI too; the last one is ours.
    let last_issi = pf_fn
        .command_log()
        .iter()
        .rposition(|r| r.opcode == u16::from(Opcode::QueryIssi))
        .unwrap();
    assert!(
        log_issi <= last_issi && last_issi < log_save,
        "QUERY_ISSI completed first"
    );
    eprintln!(
        "QUERY_ISSI took {issi_took:?} while SAVE_VHCA_STATE ran; the SAVE of {image} bytes \
         ({} MiB of device memory) took {save_took:?}",
        DEV_MEM >> 20
    );
}

#[test]
fn pf_answers_commands_while_a_vf_responder_suspend_waits_on_its_drain() {
    init_tracing();
    let tb = Testbed::start(1);
    let pf_fn = tb.pf();
    let vf = tb.vf(0);
    let pf = pf_up(&tb.pf_socket());
    let guest = cmdif(tb.vf_client(0), ARENA);

    // The guest's ENABLE_HCA is held in the VF's firmware: admitted work in flight.
    let hold = Duration::from_secs(3);
    faults::delay_commands(&vf, Opcode::EnableHca, None, hold, 1);
    let (m, n) = enable_hca_in();
    let t_guest = guest.submit(&m, n).unwrap();
    assert_eq!(vf.work_in_flight(), 1);

    pf.cmd()
        .exec(
            &naming_vf(
                Opcode::SuspendVhca,
                u16::from(SuspendOpMod::Initiator),
                SUSPEND_VHCA_IN_LEN,
            ),
            SUSPEND_VHCA_OUT_LEN,
        )
        .expect("SUSPEND_VHCA(initiator)");
    let responder = naming_vf(
        Opcode::SuspendVhca,
        u16::from(SuspendOpMod::Responder),
        SUSPEND_VHCA_IN_LEN,
    );
    let t_suspend = pf.cmd().submit(&responder, SUSPEND_VHCA_OUT_LEN).unwrap();
    let t0 = Instant::now();
    while vf.migration_state() != MigState::ResponderSuspended {
        assert!(t0.elapsed() < hold, "the responder suspend never started");
        std::thread::sleep(Duration::from_millis(1));
    }

    // The suspend is draining: the PF still answers.
    let t1 = Instant::now();
    ok_status(&exec(pf.cmd(), query_issi_in()).unwrap());
    ok_status(
        &pf.cmd()
            .exec(&query_hca_cap(), QUERY_HCA_CAP_OUT_LEN)
            .unwrap(),
    );
    let answered = t1.elapsed();
    assert_eq!(
        logged(
            &pf_fn,
            Opcode::SuspendVhca,
            u16::from(SuspendOpMod::Responder)
        ),
        None,
        "the PF answered only after the suspend completed"
    );
    assert_eq!(vf.work_in_flight(), 1, "the VF's command is still held");

    // The held command completes, then the drain ends and the suspend with it.
    let out = guest.wait(t_guest).expect("guest ENABLE_HCA");
    ok_status(&out);
    pf.cmd().wait(t_suspend).expect("SUSPEND_VHCA(responder)");
    let suspended = t0.elapsed();
    assert_eq!(vf.migration_state(), MigState::ResponderSuspended);
    let log = pf_fn.command_log();
    let pos = |op: Opcode, op_mod: u16| {
        log.iter()
            .rposition(|r| r.opcode == u16::from(op) && r.op_mod == op_mod)
            .unwrap()
    };
    let cap_op_mod = get(&query_hca_cap(), mlx5_prm::ifc::hdr::OP_MOD) as u16;
    let suspend_at = pos(Opcode::SuspendVhca, u16::from(SuspendOpMod::Responder));
    assert!(pos(Opcode::QueryIssi, 0) < suspend_at);
    assert!(pos(Opcode::QueryHcaCap, cap_op_mod) < suspend_at);
    eprintln!(
        "PF answered QUERY_ISSI + QUERY_HCA_CAP in {answered:?} while the responder \
         suspend drained; the suspend took {suspended:?} (VF command held {hold:?})"
    );
}
