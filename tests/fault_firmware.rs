//! Fault injection of firmware fatal (issue 12): health syndrome set, health counter
//! frozen, optionally every BAR0 read all-ones; injected at a command (which then
//! never completes) or at run time. The migration driver reports ERROR (the firmware
//! is untrustworthy); clearing the rule recovers the firmware, reset brings the
//! device back to RUNNING and a fresh migration succeeds.

use std::time::{Duration, Instant};

use mlx5_emulator::fault::{Plan, Rule};
use mlx5_emulator::MigState as FwState;
use mlx5_prm::iseg::{HEALTH_COUNTER_OFFSET, HEALTH_SYND_OFFSET};
use mlx5_prm::Opcode;
use mlx5_testbed::migrate::{errno_of, Rig};
use mlx5_testbed::{init_tracing, Testbed};
use mlx5vf::cmdif::HealthFault;
use mlx5vf::migration::fsm::MigState;
use mlx5vf::migration::MigError;
use vfu::uapi::VFIO_PCI_BAR0_REGION_INDEX;

fn bar0_u32(c: &mut vfu::Client, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(VFIO_PCI_BAR0_REGION_INDEX, off, &mut b)
        .expect("BAR0 read");
    u32::from_be_bytes(b)
}

fn health_synd(c: &mut vfu::Client) -> u8 {
    let word = HEALTH_SYND_OFFSET & !3;
    (bar0_u32(c, word) >> ((3 - (HEALTH_SYND_OFFSET & 3)) * 8)) as u8
}

/// Two health_counter reads some ticks apart: (first, second).
fn counter_twice(c: &mut vfu::Client) -> (u32, u32) {
    let a = bar0_u32(c, HEALTH_COUNTER_OFFSET);
    std::thread::sleep(Duration::from_millis(20));
    (a, bar0_u32(c, HEALTH_COUNTER_OFFSET))
}

/// A fatal added at run time (no command trigger: it fires at once) on VF 0: its
/// health syndrome reads as set and its health counter stops; clearing the rule
/// recovers it.
#[test]
fn a_fatal_added_at_run_time_sets_the_syndrome_and_freezes_the_health_counter() {
    init_tracing();
    let tb = Testbed::start(1);
    let mut c = tb.vf_client(0);
    let (a, b) = counter_twice(&mut c);
    assert_ne!(a, b, "the counter moves while healthy");
    assert_eq!(health_synd(&mut c), 0);
    tb.faults()
        .add(&[Rule::new("dead", "fatal").vhca_id(1).health(0x8, 0x77)])
        .unwrap();
    assert_eq!(health_synd(&mut c), 0x8);
    let (a, b) = counter_twice(&mut c);
    assert_eq!(a, b, "the counter still moves after a fatal");
    let log = tb.faults().log().lines();
    assert!(
        log.len() == 1 && log[0].contains("\"site\":\"now\""),
        "{log:?}"
    );
    tb.faults().clear(Some("dead"));
    assert_eq!(health_synd(&mut c), 0);
    let (a, b) = counter_twice(&mut c);
    assert_ne!(a, b, "the counter moves again after recovery");
}

/// A fatal with all-ones: every BAR0 read is 0xffffffff; the migration driver sees
/// it before its first arc (PCI communication error) and reports ERROR at once.
#[test]
fn a_fatal_with_all_ones_makes_the_pf_unreadable_and_the_device_error() {
    init_tracing();
    let r = Rig::start();
    r.tb.faults()
        .add(&[Rule::new("off the bus", "fatal").vhca_id(0).all_ones(true)])
        .unwrap();
    let e = r.dev.set_state(MigState::Stop).unwrap_err();
    assert!(
        matches!(e, MigError::Unhealthy(HealthFault::PciCommErr)),
        "{e:?}"
    );
    assert_eq!(e.errno(), -libc::ENXIO);
    assert_eq!(r.dev.state(), MigState::Error);
    assert_eq!(r.fw_state(), FwState::Running, "no arc ran");
    r.tb.faults().clear(None);
    r.dev.reset();
    r.assert_stops_and_runs("after recovery");
}

/// Firmware fatal at the first SAVE (STOP_COPY): the SAVE never completes, the driver
/// times out, reads the syndrome and reports ERROR; every SET is refused until reset.
/// With the firmware recovered (the rule cleared) and the VF reset, RUNNING again, and
/// a fresh migration carries the VF's device memory.
#[test]
fn a_fatal_at_save_puts_the_device_in_error_and_reset_recovers_once_cleared() {
    init_tracing();
    let r = Rig::on(
        Testbed::builder()
            .faults(
                Plan::new(1).rule(
                    Rule::new("fatal at save", "fatal")
                        .opcode(Opcode::SaveVhcaState)
                        .nth(1)
                        .health(0x1, 0xbeef),
                ),
            )
            .start(),
    );
    r.fill(21);
    r.set_timeout(Duration::from_millis(300));
    let t = Instant::now();
    let e = r.dev.set_state(MigState::StopCopy).unwrap_err();
    eprintln!(
        "STOP_COPY with a fatal at SAVE: {e} [{}] after {:?}",
        e.errno(),
        t.elapsed()
    );
    assert!(e.is_fatal(), "{e:?}");
    assert_eq!(r.dev.state(), MigState::Error);
    assert_eq!(errno_of(r.dev.set_state(MigState::Running)), -libc::EINVAL);
    let log = r.tb.faults().log().lines();
    assert!(
        log.len() == 1 && log[0].contains("\"effect\":\"fatal\""),
        "{log:?}"
    );
    // Reset while the firmware is still dead: RUNNING, but the next SET fails again.
    r.dev.reset();
    assert_eq!(r.dev.state(), MigState::Running);
    assert_eq!(errno_of(r.dev.set_state(MigState::Stop)), -libc::ENXIO);
    assert_eq!(r.dev.state(), MigState::Error);
    // The firmware recovers (the rule cleared); the VMM resets the VF (FLR) and the
    // driver's reset_done runs: RUNNING, and the VF migrates again.
    r.tb.faults().clear(None);
    r.vf().reset();
    r.dev.reset();
    r.set_timeout(mlx5_testbed::bringup::CMD_TIMEOUT);
    assert_eq!(r.dev.state(), MigState::Running);
    assert_eq!(r.fw_state(), FwState::Running);
    let data = r.fill(22);
    let b = Rig::start();
    b.load(&r.capture());
    assert!(b.dev_mem() == data, "the fresh migration lost data");
}
