//! Issue 5, the failure paths of mlx5vf's migration driver (kernel-mlx5vf.md §2.3, §3;
//! CONVENTIONS items 12 and 16): one named test per path.
//!
//! The conditions are made with what a test can reach in process, all through
//! `mlx5_testbed::faults` (the PF's BAR0 health buffer and all-ones mode, its command
//! queue moved out of reach) and the PF's own command interface acting behind the
//! migration driver's back (a second vfio-user client of the PF is refused, so
//! "another PF user" is the same command client, taken between the driver's calls).
//! Every test runs with short command timeouts and finishes in a few seconds.

use std::io::Read;
use std::time::{Duration, Instant};

use mlx5_emulator::MigState as FwState;
use mlx5_prm::cmd::migration::{ResumeOpMod, SuspendOpMod};
use mlx5_prm::iseg::HEALTH_SYND_FW_INTERNAL_ERR;
use mlx5_prm::migration_stream::RecordHeader;
use mlx5_prm::Opcode;
use mlx5_testbed::bringup::{suspend_resume, CMD_TIMEOUT};
use mlx5_testbed::devmem::{self, pattern};
use mlx5_testbed::faults;
use mlx5_testbed::init_tracing;
use mlx5_testbed::migrate::{drain, errno_of, fw_data_records, write_in_chunks, Rig};
use mlx5_testbed::wait::bounded;
use mlx5vf::cmdif::{CmdError, HealthFault};
use mlx5vf::migration::fsm::MigState;
use mlx5vf::migration::MigError;

/// Commands that are expected never to complete.
const SHORT_TIMEOUT: Duration = Duration::from_millis(300);
/// What "promptly" means for a call that must not wait on the device.
const PROMPT: Duration = Duration::from_secs(1);

/// SUSPEND_VHCA / RESUME_VHCA on the VF through the PF, behind the driver's back.
fn behind_back(r: &Rig, op: Opcode, op_mod: u16) -> Result<(), CmdError> {
    suspend_resume(&r.pf, op, op_mod, r.dev.info().vhca_id)
}

/// PRE_COPY → STOP walks PRE_COPY → RUNNING → RUNNING_P2P → STOP. Another PF user
/// suspends the VF (initiator) while the driver is in PRE_COPY: the first arc (the
/// pre-copy cleanup SAVE) still succeeds, the second (SUSPEND_VHCA initiator) is
/// refused with BAD_RES_STATE. The device stays in RUNNING, the last state reached,
/// and the errno is returned, as mlx5vf does; not ERROR (the firmware answered).
#[test]
fn a_suspend_refused_mid_path_leaves_the_device_in_the_last_state_reached() {
    init_tracing();
    let r = Rig::start();
    r.fill(1);
    let objects = r.pf_fn().object_counts();
    let mut s = r
        .dev
        .set_state(MigState::PreCopy)
        .unwrap()
        .expect("saving stream");
    drain(&mut s, &mut Vec::new());

    behind_back(&r, Opcode::SuspendVhca, u16::from(SuspendOpMod::Initiator))
        .expect("SUSPEND behind the driver's back");
    assert_eq!(r.fw_state(), FwState::InitiatorSuspended);

    let e = r.dev.set_state(MigState::Stop).unwrap_err();
    eprintln!("PRE_COPY -> STOP: {e} [{}]", e.errno());
    assert_eq!(e.errno(), -libc::EINVAL, "{e}");
    assert!(
        matches!(&e, MigError::Cmd { source, .. } if source.status().map(u8::from) == Some(0x9)),
        "the firmware's refusal comes back as is: {e:?}"
    );
    assert_eq!(r.dev.state(), MigState::Running, "the intermediate state");
    assert_eq!(r.fw_state(), FwState::InitiatorSuspended);
    // PRE_COPY -> RUNNING ended the session: the stream is closed, its buffers and PD
    // are back to the firmware.
    assert_eq!(errno_of(s.read_data(&mut [0u8; 16])), -libc::ENODEV);
    assert_eq!(r.pf_fn().object_counts(), objects, "migration file leaked");

    // The user may retry from there once the other user is done.
    behind_back(&r, Opcode::ResumeVhca, u16::from(ResumeOpMod::Initiator))
        .expect("RESUME behind the driver's back");
    r.assert_stops_and_runs("on retry");
}

/// RUNNING → STOP_COPY walks RUNNING → RUNNING_P2P → STOP → STOP_COPY; with the PF's
/// DMA arena exhausted the last arc cannot allocate its SAVE buffer: ENOMEM, and the
/// device stays in STOP (suspended, as the two arcs left it), not ERROR.
#[test]
fn stop_copy_without_dma_memory_fails_with_enomem_and_stays_in_stop() {
    init_tracing();
    let r = Rig::start();
    r.fill(2);
    let objects = r.pf_fn().object_counts();
    let hoard: Vec<u64> = {
        let arena = r.pf.cmd().arena();
        std::iter::from_fn(|| arena.alloc_page()).collect()
    };
    assert!(!hoard.is_empty());
    let e = r.dev.set_state(MigState::StopCopy).unwrap_err();
    eprintln!("RUNNING -> STOP_COPY: {e} [{}]", e.errno());
    assert_eq!(e.errno(), -libc::ENOMEM, "{e}");
    assert_eq!(r.dev.state(), MigState::Stop);
    assert_eq!(r.fw_state(), FwState::ResponderSuspended);
    assert_eq!(r.pf_fn().object_counts(), objects, "the failed open leaked");
    {
        let arena = r.pf.cmd().arena();
        for p in hoard {
            arena.free_page(p).unwrap();
        }
    }
    let mut s = r
        .dev
        .set_state(MigState::StopCopy)
        .expect("STOP -> STOP_COPY with memory back")
        .expect("stream");
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    assert!(fw_data_records(&v).len() == 1);
    r.dev.set_state(MigState::Running).expect("RUNNING");
}

/// A SUSPEND_VHCA the device never completes (the PF's command queue unreachable) on
/// PRE_COPY → PRE_COPY_P2P, the first arc of PRE_COPY → STOP_COPY: CmdError::Timeout,
/// ETIMEDOUT, and the device reports ERROR (0) after that one timeout (the pre-copy
/// file is dropped without more commands, which could only time out too). Every SET
/// from ERROR is refused with EINVAL, as are MIG_DATA_SIZE and PRECOPY_INFO, and the
/// stream is dead; reset leaves ERROR for RUNNING, and once the queue is back the VF
/// migrates again.
#[test]
fn a_command_that_never_completes_puts_the_device_in_error_until_reset() {
    init_tracing();
    let r = Rig::start();
    let data = r.fill(3);
    let mut s = r
        .dev
        .set_state(MigState::PreCopy)
        .unwrap()
        .expect("saving stream");
    drain(&mut s, &mut Vec::new());
    r.set_timeout(SHORT_TIMEOUT);
    let stuck = faults::unreachable_cmdq(&r.pf_fn());

    let t = Instant::now();
    let e = r.dev.set_state(MigState::StopCopy).unwrap_err();
    eprintln!(
        "PRE_COPY -> STOP_COPY, queue unreachable: {e} after {:?}",
        t.elapsed()
    );
    assert!(
        matches!(
            &e,
            MigError::Cmd {
                source: CmdError::Timeout { .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.errno(), -libc::ETIMEDOUT);
    assert!(
        t.elapsed() < 2 * SHORT_TIMEOUT,
        "one timeout, no cleanup commands: {:?}",
        t.elapsed()
    );
    assert_eq!(r.dev.state(), MigState::Error);
    assert_eq!(errno_of(s.read_data(&mut [0u8; 16])), -libc::ENODEV);
    assert_eq!(u32::from(r.dev.state()), 0);

    for target in MigState::ALL {
        let t = Instant::now();
        let e = r.dev.set_state(target).unwrap_err();
        assert!(matches!(e, MigError::InError), "{target}: {e:?}");
        assert_eq!(e.errno(), -libc::EINVAL, "{target}");
        assert!(
            t.elapsed() < PROMPT,
            "{target}: refusal waited on the device"
        );
        assert_eq!(r.dev.state(), MigState::Error);
    }
    assert_eq!(errno_of(r.dev.data_size()), -libc::EINVAL);
    assert_eq!(errno_of(r.dev.precopy_info()), -libc::EINVAL);

    stuck.restore();
    r.set_timeout(CMD_TIMEOUT);
    r.dev.reset();
    assert_eq!(r.dev.state(), MigState::Running);
    // The SUSPEND never reached the firmware.
    assert_eq!(r.fw_state(), FwState::Running);
    assert_eq!(errno_of(s.read_data(&mut [0u8; 16])), -libc::ENODEV);

    let b = Rig::start();
    let stream = r.capture();
    b.load(&stream);
    assert!(b.dev_mem() == data, "device memory differs after the retry");
    assert_eq!(r.dev.state(), MigState::Running);
}

/// A health syndrome in the PF's BAR0 health buffer (firmware internal error) while the
/// VF is in PRE_COPY: the next SET reads it before its first arc, issues nothing, and
/// the device goes to ERROR with ENXIO (what mlx5_cmd_exec returns once mlx5_core is in
/// INTERNAL_ERROR); the pre-copy stream dies. A reset while the syndrome is still there
/// lands in RUNNING, but the next SET fails the same way; once it is cleared, reset
/// recovers and the VF migrates.
#[test]
fn a_firmware_health_syndrome_puts_the_device_in_error_and_reset_recovers_once_cleared() {
    init_tracing();
    let r = Rig::start();
    let data = r.fill(4);
    let mut s = r
        .dev
        .set_state(MigState::PreCopy)
        .unwrap()
        .expect("saving stream");
    drain(&mut s, &mut Vec::new());
    let fatal = faults::set_health_syndrome(&r.pf_fn(), HEALTH_SYND_FW_INTERNAL_ERR, 0xbeef);

    let e = r.dev.set_state(MigState::StopCopy).unwrap_err();
    eprintln!("PRE_COPY -> STOP_COPY with a syndrome: {e} [{}]", e.errno());
    assert_eq!(e.errno(), -libc::ENXIO);
    assert!(
        matches!(
            e,
            MigError::Unhealthy(HealthFault::Syndrome {
                synd: HEALTH_SYND_FW_INTERNAL_ERR,
                ext_synd: 0xbeef,
                rfr: false
            })
        ),
        "{e:?}"
    );
    assert_eq!(r.dev.state(), MigState::Error);
    assert_eq!(r.fw_state(), FwState::Running, "no arc ran");
    assert_eq!(errno_of(s.read_data(&mut [0u8; 16])), -libc::ENODEV);

    r.dev.reset();
    assert_eq!(r.dev.state(), MigState::Running);
    assert_eq!(errno_of(r.dev.set_state(MigState::Stop)), -libc::ENXIO);
    assert_eq!(r.dev.state(), MigState::Error, "the fault is still there");

    fatal.clear();
    r.dev.reset();
    assert_eq!(r.dev.state(), MigState::Running);
    let b = Rig::start();
    b.load(&r.capture());
    assert!(b.dev_mem() == data, "device memory differs after recovery");
}

/// The PF's BAR0 reading all-ones (the device fell off the bus): the health check
/// before the arc sees health.fw_ver == 0xffffffff and the device goes to ERROR at
/// once, without waiting out a command timeout (5 s here). Reset recovers once the
/// BAR reads again.
#[test]
fn a_pf_reading_all_ones_puts_the_device_in_error_without_waiting_for_a_timeout() {
    init_tracing();
    let r = Rig::start();
    let dead = faults::set_all_ones(&r.pf_fn());
    let t = Instant::now();
    let e = r.dev.set_state(MigState::Stop).unwrap_err();
    eprintln!("RUNNING -> STOP, all-ones: {e} after {:?}", t.elapsed());
    assert!(t.elapsed() < PROMPT, "waited {:?}", t.elapsed());
    assert!(
        matches!(e, MigError::Unhealthy(HealthFault::PciCommErr)),
        "{e:?}"
    );
    assert_eq!(e.errno(), -libc::ENXIO);
    assert_eq!(r.dev.state(), MigState::Error);
    assert_eq!(r.fw_state(), FwState::Running);

    dead.clear();
    r.dev.reset();
    assert_eq!(r.dev.state(), MigState::Running);
    r.assert_stops_and_runs("after recovery");
}

/// A command refusal that alone would not be fatal (a corrupted base image refused by
/// LOAD_VHCA_STATE, nothing applied yet: the device would stay in RESUMING) while the
/// PF reports a health syndrome: the health read after the failure makes the device
/// ERROR, and the write returns the LOAD's own errno.
#[test]
fn a_command_failure_while_the_firmware_reports_a_syndrome_is_fatal_and_keeps_its_errno() {
    init_tracing();
    let r = Rig::start();
    r.fill(8);
    let mut stream = r.capture();
    let (at, len) = fw_data_records(&stream)[0];
    stream[at + len / 2] ^= 0x01;
    let mut w = r
        .dev
        .set_state(MigState::Resuming)
        .unwrap()
        .expect("resuming stream");
    let fatal = faults::set_health_syndrome(&r.pf_fn(), HEALTH_SYND_FW_INTERNAL_ERR, 1);
    let e = w.write_data(&stream).unwrap_err();
    eprintln!("LOAD refused with a syndrome set: {e} [{}]", e.errno());
    assert_eq!(e.errno(), -libc::EINVAL, "{e}");
    assert!(!e.is_fatal(), "the refusal itself is not fatal");
    assert_eq!(r.dev.state(), MigState::Error);
    assert_eq!(errno_of(w.write_data(&[0u8; 4])), -libc::ENODEV);
    fatal.clear();
    r.dev.reset();
    assert_eq!(r.dev.state(), MigState::Running);
    assert_eq!(r.fw_state(), FwState::Running);
}

/// A pre-copy stream with two FW_DATA records: the tracked base image and the final
/// incremental one (after device memory changed). Returns (stream, final memory).
fn base_and_delta(src: &Rig) -> (Vec<u8>, Vec<u8>) {
    src.fill(5);
    let mut s = src
        .dev
        .set_state(MigState::PreCopy)
        .unwrap()
        .expect("saving stream");
    let mut stream = Vec::new();
    drain(&mut s, &mut stream);
    devmem::write(&src.vf(), 8192, &[0x5a; 8192]);
    src.dev.set_state(MigState::StopCopy).expect("STOP_COPY");
    drain(&mut s, &mut stream);
    let mem = src.dev_mem();
    src.dev.set_state(MigState::Stop).unwrap();
    src.dev.set_state(MigState::Running).unwrap();
    assert_eq!(fw_data_records(&stream).len(), 2, "a base and a delta");
    (stream, mem)
}

/// Multi-load: the base image is LOADed (the destination's memory is the source's
/// base), then the delta, corrupted, is refused by the firmware (checksum, BAD_PARAM):
/// the write returns EINVAL and, a record having already been applied, the
/// destination is ERROR. Later writes get ENODEV, RESUMING → STOP is refused (EINVAL),
/// and reset lands in RUNNING, after which the good stream loads.
#[test]
fn a_corrupted_delta_after_a_loaded_base_puts_the_destination_in_error() {
    init_tracing();
    let src = Rig::start();
    let dst = Rig::start();
    let (good, mem) = base_and_delta(&src);
    let recs = fw_data_records(&good);
    let (delta_at, delta_len) = recs[1];
    let mut bad = good.clone();
    bad[delta_at + delta_len / 2] ^= 0x01;
    let base_mem = pattern(mem.len(), 5);

    let mut w = dst
        .dev
        .set_state(MigState::Resuming)
        .unwrap()
        .expect("resuming stream");
    let e = write_in_chunks(&mut w, &bad, 4096).expect_err("the corrupted delta is refused");
    eprintln!("corrupted delta: {e} [{}]", e.errno());
    assert_eq!(e.errno(), -libc::EINVAL, "{e}");
    assert!(e.is_fatal());
    assert_eq!(dst.dev.state(), MigState::Error);
    assert!(
        dst.dev_mem() == base_mem,
        "the base was applied before the delta"
    );
    assert_eq!(errno_of(w.write_data(&[0u8; 16])), -libc::ENODEV);
    assert_eq!(errno_of(dst.dev.set_state(MigState::Stop)), -libc::EINVAL);
    assert_eq!(dst.dev.state(), MigState::Error);

    dst.dev.reset();
    assert_eq!(dst.dev.state(), MigState::Running);
    assert_eq!(dst.fw_state(), FwState::Running);
    dst.load(&good);
    assert!(dst.dev_mem() == mem, "the good stream did not land");
}

/// Multi-load again, the stream ending inside the delta: every write is accepted
/// (nothing to refuse yet), and RESUMING → STOP returns EINVAL; with the base already
/// applied the destination is part-way, so ERROR. Reset → RUNNING.
#[test]
fn a_stream_ending_inside_the_delta_fails_resuming_to_stop_with_error() {
    init_tracing();
    let src = Rig::start();
    let dst = Rig::start();
    let (good, mem) = base_and_delta(&src);
    let (delta_at, delta_len) = fw_data_records(&good)[1];
    let cut = &good[..delta_at + delta_len / 2];
    let mut w = dst
        .dev
        .set_state(MigState::Resuming)
        .unwrap()
        .expect("resuming stream");
    for part in cut.chunks(4096) {
        w.write_data(part)
            .expect("a truncated stream is not refused early");
    }
    let e = dst.dev.set_state(MigState::Stop).unwrap_err();
    eprintln!("RESUMING -> STOP, truncated delta: {e} [{}]", e.errno());
    assert_eq!(e.errno(), -libc::EINVAL);
    assert!(matches!(e, MigError::Incomplete { loaded: 1, .. }), "{e:?}");
    assert_eq!(dst.dev.state(), MigState::Error);
    assert_eq!(errno_of(w.write_data(&[0u8; 16])), -libc::ENODEV);
    dst.dev.reset();
    assert_eq!(dst.dev.state(), MigState::Running);
    dst.load(&good);
    assert!(dst.dev_mem() == mem);
}

/// STOP_COPY → PRE_COPY and → PRE_COPY_P2P: the kernel's table says ERROR, which the
/// pre-2026 loop spun on forever (kernel-mlx5vf.md §1.4). Here both return EINVAL
/// within a bounded wait, the device stays in STOP_COPY and its stream reads on to the
/// end.
#[test]
fn stop_copy_to_pre_copy_returns_einval_promptly_and_stays_in_stop_copy() {
    init_tracing();
    let r = Rig::start();
    r.fill(6);
    r.dev.set_state(MigState::Stop).unwrap();
    let mut s = r
        .dev
        .set_state(MigState::StopCopy)
        .unwrap()
        .expect("saving stream");
    for target in [MigState::PreCopy, MigState::PreCopyP2p] {
        let dev = r.dev.clone();
        let (errno, state) = bounded(Duration::from_secs(5), move || {
            let e = dev.set_state(target).unwrap_err();
            (e.errno(), dev.state())
        });
        assert_eq!(errno, -libc::EINVAL, "STOP_COPY -> {target}");
        assert_eq!(state, MigState::StopCopy, "STOP_COPY -> {target}");
    }
    let mut v = Vec::new();
    s.read_to_end(&mut v).expect("the stream is intact");
    assert_eq!(fw_data_records(&v).len(), 1);
    r.dev.set_state(MigState::Running).unwrap();
}

/// mlx5vf's deferred reset: a reset that arrives while set_state is blocked in a
/// command (a SUSPEND the device never completes) returns at once and is carried out
/// by set_state when it unlocks. set_state still reports its own failure (ETIMEDOUT);
/// the device then is in RUNNING, not ERROR and not RUNNING_P2P, the firmware never
/// saw the SUSPEND, and nothing was opened or leaked.
#[test]
fn a_reset_during_a_command_in_flight_takes_effect_when_the_command_ends() {
    init_tracing();
    let r = Rig::start();
    let objects = r.pf_fn().object_counts();
    let timeout = Duration::from_millis(1500);
    r.set_timeout(timeout);
    let stuck = faults::unreachable_cmdq(&r.pf_fn());
    let dev = r.dev.clone();
    let worker = std::thread::spawn(move || {
        let r = dev.set_state(MigState::Stop);
        (r.map(|_| ()), Instant::now())
    });
    // The SUSPEND is posted and its doorbell consumed; later commands will be served.
    std::thread::sleep(Duration::from_millis(300));
    stuck.restore();
    assert!(!worker.is_finished(), "set_state is blocked in the command");

    let t = Instant::now();
    r.dev.reset();
    let reset_returned = Instant::now();
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "reset waited {:?} for the command",
        t.elapsed()
    );
    assert!(!worker.is_finished(), "the reset did not end the command");

    let (res, ended) = worker.join().expect("set_state thread");
    let e = res.unwrap_err();
    eprintln!("set_state under reset: {e}");
    assert!(
        matches!(
            &e,
            MigError::Cmd {
                source: CmdError::Timeout { .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        ended > reset_returned,
        "the command outlived the reset call"
    );
    assert_eq!(r.dev.state(), MigState::Running);
    assert_eq!(r.fw_state(), FwState::Running);
    assert_eq!(r.pf_fn().object_counts(), objects);

    r.set_timeout(CMD_TIMEOUT);
    r.assert_stops_and_runs("after the reset");
}

/// Hostile use of the data streams and MIG_DATA_SIZE, with the kernel's errnos
/// (kernel-mlx5vf.md §2.2, §3.3, §3.4):
/// - a saving stream after STOP_COPY → STOP: ENODEV (mlx5vf_disable_fds marks the
///   file ERROR), also for PRECOPY_INFO on it (EINVAL: not in PRE_COPY);
/// - a saving stream after a reset, even once a new session is open: ENODEV;
/// - reading a resuming stream or writing a saving one: EINVAL;
/// - a resuming stream after a refused write: ENODEV; RESUMING → STOP then fails and
///   the device stays RESUMING (nothing was loaded) until reset;
/// - MIG_DATA_SIZE outside the saving states answers as mlx5vf does (a QUERY in any
///   state), and is refused (EINVAL) only in ERROR.
#[test]
fn hostile_data_stream_use_gets_the_kernels_errnos() {
    init_tracing();
    let r = Rig::start();
    r.fill(7);
    let running_size = r.dev.data_size().expect("MIG_DATA_SIZE in RUNNING");
    assert!(running_size > 0);

    r.dev.set_state(MigState::Stop).unwrap();
    assert_eq!(r.dev.data_size().expect("in STOP"), running_size);
    let mut s = r.dev.set_state(MigState::StopCopy).unwrap().unwrap();
    assert_eq!(r.dev.data_size().expect("in STOP_COPY"), running_size);
    assert_eq!(errno_of(s.write_data(&[0u8; 4])), -libc::EINVAL);
    assert_eq!(errno_of(s.precopy_info()), -libc::EINVAL);
    let mut head = [0u8; 10];
    assert_eq!(s.read_data(&mut head).unwrap(), 10);
    r.dev.set_state(MigState::Stop).unwrap();
    assert_eq!(errno_of(s.read_data(&mut head)), -libc::ENODEV);
    assert_eq!(errno_of(s.precopy_info()), -libc::EINVAL);

    // Reset closes the session; a newer stream does not revive the old one.
    let mut old = r.dev.set_state(MigState::StopCopy).unwrap().unwrap();
    r.dev.reset();
    assert_eq!(r.dev.state(), MigState::Running);
    r.dev.set_state(MigState::Stop).unwrap();
    let mut new = r.dev.set_state(MigState::StopCopy).unwrap().unwrap();
    assert_eq!(errno_of(old.read_data(&mut head)), -libc::ENODEV);
    let mut v = Vec::new();
    new.read_to_end(&mut v).expect("the new stream reads");
    r.dev.set_state(MigState::Stop).unwrap();

    let mut w = r.dev.set_state(MigState::Resuming).unwrap().unwrap();
    assert_eq!(
        r.dev.data_size().expect("MIG_DATA_SIZE in RESUMING"),
        running_size
    );
    assert_eq!(errno_of(w.read_data(&mut head)), -libc::EINVAL);
    let unknown = RecordHeader::new(0, 0, 0x4242).to_bytes();
    assert_eq!(errno_of(w.write_data(&unknown)), -libc::EOPNOTSUPP);
    assert_eq!(r.dev.state(), MigState::Resuming, "nothing was loaded");
    assert_eq!(errno_of(w.write_data(&v)), -libc::ENODEV);
    assert_eq!(errno_of(r.dev.set_state(MigState::Stop)), -libc::EINVAL);
    assert_eq!(r.dev.state(), MigState::Resuming);
    r.dev.reset();
    assert_eq!(r.dev.state(), MigState::Running);
    assert_eq!(errno_of(w.write_data(&v)), -libc::ENODEV);

    // In ERROR (a command that never completed), MIG_DATA_SIZE is refused.
    r.set_timeout(SHORT_TIMEOUT);
    let stuck = faults::unreachable_cmdq(&r.pf_fn());
    assert_eq!(errno_of(r.dev.data_size()), -libc::ETIMEDOUT);
    assert_eq!(r.dev.state(), MigState::Error);
    assert_eq!(errno_of(r.dev.data_size()), -libc::EINVAL);
    stuck.restore();
    r.set_timeout(CMD_TIMEOUT);
    r.dev.reset();
    assert_eq!(r.dev.data_size().expect("after reset"), running_size);
}
