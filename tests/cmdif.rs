//! Issue 4 acceptance, driver side: mlx5vf's command interface and function bring-up
//! against a real adapter over real sockets (mlx5-device.md §2–4).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mlx5_prm::cmd::caps::{CapMode, CapType, HCA_CAP_MSG_OFFSET, QUERY_HCA_CAP_OUT_LEN};
use mlx5_prm::cmd::hca::{
    INIT_HCA_IN_LEN, INIT_HCA_OUT_LEN, QUERY_ADAPTER_IN_LEN, QUERY_ADAPTER_OUT_LEN,
    QUERY_ISSI_OUT_LEN, QUERY_ISSI_OUT_SUPPORTED_ISSI_DW0,
};
use mlx5_prm::cmd::pages::{
    manage_pages_in_len, manage_pages_out_len, ManagePagesOpMod, QueryPagesOpMod,
    MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, MANAGE_PAGES_IN_LEN, MANAGE_PAGES_IN_PAS,
    MANAGE_PAGES_OUT_LEN, MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES, MANAGE_PAGES_OUT_PAS,
    QUERY_PAGES_IN_LEN, QUERY_PAGES_OUT_LEN, QUERY_PAGES_OUT_NUM_PAGES,
};
use mlx5_prm::ifc::{get, hdr, set};
use mlx5_prm::{CmdStatus, Opcode};
use mlx5_testbed::bringup::{cmdif, disable_hca_in, enable_hca_in, exec, query_issi_in, up, ARENA};
use mlx5_testbed::{faults, init_tracing, run_cli, Function, Testbed};
use mlx5vf::cmdif::{new_input, CmdError, Mode};
use mlx5vf::hca::caps::query_hca_cap_in;
use mlx5vf::hca::Hca;

fn assert_no_objects(f: &Function, when: &str) {
    let c = f.object_counts();
    assert!(c.is_empty(), "{when}: firmware still holds {c:?}");
}

/// QUERY_PAGES for the pages needed at run time.
fn query_pages() -> Vec<u8> {
    new_input(
        Opcode::QueryPages,
        QueryPagesOpMod::Regular.into(),
        QUERY_PAGES_IN_LEN,
    )
}

/// Brings `f` up and down `n` times on one vfio-user connection, re-creating the
/// command interface (DMA map, queue address) each time; nothing may leak, neither in
/// the firmware nor in the driver's arena. Returns the time per cycle.
fn cycle(f: &Function, socket: &std::path::Path, n: usize) -> Duration {
    let mut client = vfu::Client::connect(socket).expect("connect");
    let start = Instant::now();
    for i in 0..n {
        let events = i % 10 != 9; // every tenth cycle completes by polling only
        let hca = up(client, ARENA, events);
        let info = hca.info().expect("info").clone();
        assert_eq!(info.vhca_id, f.id.vhca_id);
        assert_eq!(info.pages_given, f.object_counts().pages);
        assert_eq!(
            hca.cmd().mode(),
            if events { Mode::Events } else { Mode::Polling }
        );
        hca.down().expect("teardown");
        assert_no_objects(f, &format!("cycle {i}"));
        let cmd = hca.into_cmdif();
        let arena = cmd.arena();
        assert_eq!(
            arena.free_pages(),
            arena.page_capacity(),
            "cycle {i}: arena pages leaked"
        );
        assert_eq!(cmd.in_flight(), 0);
        let (c, r) = cmd.into_client();
        r.expect("unmap");
        client = c;
    }
    start.elapsed() / n as u32
}

#[test]
fn pf_and_vf_bring_up_and_teardown_100_times_on_one_connection_leak_nothing() {
    init_tracing();
    let tb = Testbed::start(1);
    let pf = tb.pf();
    let vf = tb.vf(0);
    let per_pf = cycle(&pf, &tb.pf_socket(), 100);
    let per_vf = cycle(&vf, &tb.vf_socket(0), 100);
    eprintln!("bring-up + teardown: PF {per_pf:?}, VF {per_vf:?} per cycle");
    assert_no_objects(&pf, "end");
    assert_no_objects(&vf, "end");
}

#[test]
fn query_hca_cap_output_spans_eight_mailboxes_byte_exact() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let hca = up(tb.vf_client(0), ARENA, true);
    for (t, mode) in [
        (CapType::General, CapMode::Max),
        (CapType::General, CapMode::Cur),
        (CapType::General2, CapMode::Cur),
    ] {
        let out = hca
            .cmd()
            .exec(&query_hca_cap_in(t, mode, None), QUERY_HCA_CAP_OUT_LEN)
            .unwrap();
        assert_eq!(out.len(), QUERY_HCA_CAP_OUT_LEN);
        assert_eq!(&out[..8], &[0; 8], "status and syndrome");
        let want = vf.firmware().cap_page(t, mode);
        assert_eq!(&out[HCA_CAP_MSG_OFFSET..], &want[..], "{t:?} {mode:?}");
    }
    // One output block: QUERY_ISSI (112 bytes).
    let out = exec(hca.cmd(), query_issi_in()).unwrap();
    assert_eq!(out.len(), QUERY_ISSI_OUT_LEN);
    assert_eq!(get(&out, QUERY_ISSI_OUT_SUPPORTED_ISSI_DW0), 0x3);
    // No block at all: QUERY_PAGES (16 bytes each way), num_pages 0 at run time.
    let out = hca.cmd().exec(&query_pages(), QUERY_PAGES_OUT_LEN).unwrap();
    assert_eq!(out.len(), QUERY_PAGES_OUT_LEN);
    assert_eq!(&out[..8], &[0; 8]);
    assert_eq!(get(&out, QUERY_PAGES_OUT_NUM_PAGES), 0);
    hca.down().unwrap();
    assert_no_objects(&vf, "end");
}

/// MANAGE_PAGES GIVE of `n` pages in one command, then TAKE of all of them in one
/// command: the addresses come back exactly, through input and output chains of many
/// blocks.
fn give_and_take_in_one_command(hca: &mut Hca, f: &Function, n: usize) {
    let held_before = f.object_counts().pages;
    let cmd = hca.cmd();
    let pas: Vec<u64> = (0..n)
        .map(|_| cmd.arena().alloc_page().expect("page"))
        .collect();
    let mut m = new_input(
        Opcode::ManagePages,
        ManagePagesOpMod::Give.into(),
        manage_pages_in_len(n).unwrap(),
    );
    set(&mut m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, n as u64);
    for (i, &p) in pas.iter().enumerate() {
        set(&mut m, MANAGE_PAGES_IN_PAS.nth(i).unwrap(), p);
    }
    cmd.exec(&m, MANAGE_PAGES_OUT_LEN).expect("give");
    assert_eq!(f.object_counts().pages, held_before + n);

    let total = held_before + n;
    let mut m = new_input(
        Opcode::ManagePages,
        ManagePagesOpMod::Take.into(),
        MANAGE_PAGES_IN_LEN,
    );
    set(&mut m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, n as u64);
    let out = cmd
        .exec(&m, manage_pages_out_len(n).unwrap())
        .expect("take");
    let got = get(&out, MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES) as usize;
    assert_eq!(got, n);
    let back: BTreeSet<u64> = (0..got)
        .map(|i| get(&out, MANAGE_PAGES_OUT_PAS.nth(i).unwrap()))
        .collect();
    let given: BTreeSet<u64> = pas.iter().copied().collect();
    assert_eq!(f.object_counts().pages, total - n);
    assert_eq!(back, given, "TAKE returned other pages than the {n} given");
    for p in pas {
        cmd.arena().free_page(p).unwrap();
    }
}

#[test]
fn manage_pages_with_many_pages_round_trips_byte_exact() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    // The function is only enabled (no boot pages held), so TAKE can only return ours.
    let cmd = cmdif(tb.vf_client(0), ARENA);
    exec(&cmd, enable_hca_in()).unwrap();
    let mut hca = Hca::new(cmd);
    for n in [1usize, 63, 64, 65, 1000] {
        give_and_take_in_one_command(&mut hca, &vf, n);
    }
    exec(hca.cmd(), disable_hca_in()).unwrap();
    assert_no_objects(&vf, "end");
}

#[test]
fn create_mkey_with_a_long_mtt_list_reaches_the_firmware_intact() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf = tb.vf(0);
    let hca = up(tb.vf_client(0), ARENA, true);
    // 1000 pages: 0x110 + 8000 bytes of input = 16 blocks; not contiguous, reversed.
    let mut mtt: Vec<u64> = (0..1000)
        .map(|_| hca.cmd().arena().alloc_page().unwrap())
        .collect();
    mtt.reverse();
    let len = mtt.len() as u64 * 4096;
    let key = hca.create_mkey(&mtt, 12, len, 0x5a).expect("create mkey");
    {
        let fw = vf.firmware();
        let mk = fw.mkey(key >> 8).expect("mkey exists");
        assert_eq!(mk.key(), key);
        assert_eq!(mk.mtt, mtt);
        assert_eq!((mk.start, mk.len, mk.log_page_size), (0, len, 12));
        assert_eq!(mk.pd, hca.info().unwrap().pd);
    }
    assert_eq!(vf.object_counts().mkeys, 1);
    // An odd count exercises the padding entry.
    let key2 = hca.create_mkey(&mtt[..3], 12, 3 * 4096, 1).unwrap();
    assert_eq!(vf.firmware().mkey(key2 >> 8).unwrap().mtt, &mtt[..3]);
    hca.destroy_mkey(key2).unwrap();
    hca.destroy_mkey(key).unwrap();
    for p in mtt {
        hca.cmd().arena().free_page(p).unwrap();
    }
    hca.down().unwrap();
    assert_no_objects(&vf, "end");
}

/// The 32 commands: 31 regular ones whose outputs differ (caps of different
/// functions and types, ISSI, adapter, pages) and one MANAGE_PAGES, which must land
/// in slot 31.
fn thirty_two_commands(vfs: u16) -> Vec<(Vec<u8>, usize)> {
    let mut cmds = Vec::new();
    let variants = [
        (
            query_hca_cap_in(CapType::General, CapMode::Cur, None),
            QUERY_HCA_CAP_OUT_LEN,
        ),
        (
            query_hca_cap_in(CapType::General, CapMode::Max, None),
            QUERY_HCA_CAP_OUT_LEN,
        ),
        (
            query_hca_cap_in(CapType::General2, CapMode::Cur, None),
            QUERY_HCA_CAP_OUT_LEN,
        ),
        query_issi_in(),
        (
            new_input(Opcode::QueryAdapter, 0, QUERY_ADAPTER_IN_LEN),
            QUERY_ADAPTER_OUT_LEN,
        ),
        (query_pages(), QUERY_PAGES_OUT_LEN),
    ];
    let mut i = 0;
    while cmds.len() < 31 {
        if i % 3 == 2 {
            let fid = 1 + (i as u16 / 3) % vfs;
            let mode = if i % 2 == 0 {
                CapMode::Cur
            } else {
                CapMode::Max
            };
            cmds.push((
                query_hca_cap_in(CapType::General, mode, Some(fid)),
                QUERY_HCA_CAP_OUT_LEN,
            ));
        } else {
            cmds.push(variants[i % variants.len()].clone());
        }
        i += 1;
    }
    cmds.insert(
        13,
        (
            new_input(
                Opcode::ManagePages,
                ManagePagesOpMod::CantGive.into(),
                MANAGE_PAGES_IN_LEN,
            ),
            MANAGE_PAGES_OUT_LEN,
        ),
    );
    cmds
}

fn all_slots_in_flight(events: bool) {
    init_tracing();
    let vfs = 4;
    let tb = Testbed::start(vfs);
    let pf = tb.pf();
    let hca = up(tb.pf_client(), ARENA, events);
    let cmds = thirty_two_commands(vfs);
    let one_by_one: Vec<Vec<u8>> = cmds
        .iter()
        .map(|(m, n)| hca.cmd().exec(m, *n).expect("alone"))
        .collect();
    let log_before = pf.command_log().len();
    let stats_before = hca.cmd().stats();
    let refs: Vec<(&[u8], usize)> = cmds.iter().map(|(m, n)| (m.as_slice(), *n)).collect();
    let together = hca.cmd().exec_many(&refs);
    let stats = hca.cmd().stats();
    assert_eq!(
        stats.doorbells - stats_before.doorbells,
        1,
        "one doorbell for all 32"
    );
    for (i, (r, want)) in together.into_iter().zip(&one_by_one).enumerate() {
        let got = r.unwrap_or_else(|e| panic!("command {i}: {e}"));
        assert_eq!(&got, want, "command {i} got another command's output");
    }
    let log = pf.command_log();
    let batch = &log[log_before..];
    assert_eq!(batch.len(), 32);
    let slots: BTreeSet<u8> = batch.iter().map(|r| r.slot).collect();
    assert_eq!(slots.len(), 32, "every slot used once");
    let pages = batch
        .iter()
        .find(|r| r.opcode == u16::from(Opcode::ManagePages))
        .unwrap();
    assert_eq!(pages.slot, 31, "MANAGE_PAGES rides slot 31");
    if events {
        assert_eq!(stats.completed_by_eqe - stats_before.completed_by_eqe, 32);
        assert_eq!(
            stats.completed_by_polling,
            stats_before.completed_by_polling
        );
    } else {
        assert_eq!(
            stats.completed_by_polling - stats_before.completed_by_polling,
            32
        );
    }
    // More commands than slots: waves of 31 + 1.
    let many: Vec<(&[u8], usize)> = refs.iter().cycle().take(100).copied().collect();
    for (i, r) in hca.cmd().exec_many(&many).into_iter().enumerate() {
        assert_eq!(r.unwrap(), one_by_one[i % 32], "command {i} of 100");
    }
    hca.down().unwrap();
    assert_no_objects(&pf, "end");
}

#[test]
fn all_32_slots_in_flight_complete_each_with_its_own_output_polling() {
    all_slots_in_flight(false);
}

#[test]
fn all_32_slots_in_flight_complete_each_with_its_own_output_events() {
    all_slots_in_flight(true);
}

#[test]
fn commands_complete_by_eqe_and_msix_eventfd() {
    init_tracing();
    let tb = Testbed::start(1);
    let hca = up(tb.vf_client(0), ARENA, true);
    assert_eq!(hca.cmd().mode(), Mode::Events);
    let eqn = hca.info().unwrap().cmd_eqn.expect("cmd EQ");
    assert_eq!(hca.cmd().event_queue().unwrap().eqn(), Some(eqn));
    let before = hca.cmd().stats();
    let n = 300; // more than the 256-entry ring: the owner phase flips
                 // With the default spin window, then with none: every wait then arms the EQ and
                 // sleeps on the eventfd.
    for spin in [mlx5vf::cmdif::DEFAULT_SPIN, Duration::ZERO] {
        hca.cmd().set_spin(spin);
        assert_eq!(hca.cmd().spin(), spin);
        for _ in 0..n {
            exec(hca.cmd(), query_issi_in()).unwrap();
        }
    }
    let s = hca.cmd().stats();
    assert_eq!(s.completed_by_eqe - before.completed_by_eqe, 2 * n);
    assert_eq!(s.completed_by_polling, before.completed_by_polling);
    assert!(s.eqes - before.eqes >= 2 * n);
    assert!(s.interrupts > before.interrupts, "the eventfd fired");
    assert!(hca.cmd().event_queue().unwrap().ci() >= 600);
    // A window past the cap is cut to it.
    hca.cmd().set_spin(Duration::from_secs(1));
    assert_eq!(hca.cmd().spin(), mlx5vf::cmdif::MAX_SPIN);
    hca.down().unwrap();
    assert_eq!(hca.cmd().mode(), Mode::Polling);
    assert_no_objects(&tb.vf(0), "end");
}

#[test]
fn status_errors_map_to_the_kernel_errno_and_the_next_command_works() {
    init_tracing();
    let tb = Testbed::start(1);
    let hca = up(tb.vf_client(0), ARENA, true);
    let cases: Vec<(Vec<u8>, usize, CmdStatus, i32)> = vec![
        // Unknown opcode: BAD_OP -> -EINVAL.
        (
            {
                let mut m = vec![0u8; hdr::HDR_LEN];
                set(&mut m, hdr::OPCODE, 0x0999);
                m
            },
            hdr::HDR_LEN,
            CmdStatus::BadOpErr,
            -libc::EINVAL,
        ),
        // A VF naming another function: BAD_PARAM -> -EINVAL.
        (
            query_hca_cap_in(CapType::General, CapMode::Cur, Some(2)),
            QUERY_HCA_CAP_OUT_LEN,
            CmdStatus::BadParamErr,
            -libc::EINVAL,
        ),
        // INIT_HCA while initialized: BAD_SYS_STATE -> -EIO.
        (
            new_input(Opcode::InitHca, 0, INIT_HCA_IN_LEN),
            INIT_HCA_OUT_LEN,
            CmdStatus::BadSysStateErr,
            -libc::EIO,
        ),
    ];
    for (m, out, status, errno) in cases {
        match hca.cmd().exec(&m, out) {
            Err(e @ CmdError::Status { .. }) => {
                assert_eq!(e.status(), Some(status), "{e}");
                assert_eq!(e.errno(), errno, "{e}");
                let CmdError::Status {
                    syndrome, opcode, ..
                } = e
                else {
                    unreachable!()
                };
                assert_ne!(syndrome, 0);
                assert_eq!(u64::from(opcode), get(&m, hdr::OPCODE));
            }
            other => panic!("expected a status error, got {other:?}"),
        }
        exec(hca.cmd(), query_issi_in()).expect("next command");
    }
    hca.down().unwrap();
    assert_no_objects(&tb.vf(0), "end");
}

#[test]
fn a_command_the_device_never_completes_times_out_and_keeps_its_slot() {
    init_tracing();
    let tb = Testbed::start(1);
    let cmd = cmdif(tb.vf_client(0), ARENA);
    // The device's queue moved to an address nothing is mapped at: the doorbell cannot
    // be served, so the entry stays hardware-owned.
    let stuck = faults::unreachable_cmdq(&tb.vf(0));
    cmd.set_timeout(Duration::from_millis(200));
    let t = Instant::now();
    let e = exec(&cmd, enable_hca_in()).unwrap_err();
    assert!(matches!(e, CmdError::Timeout { slot: 0, .. }), "{e}");
    assert_eq!(e.errno(), -libc::ETIMEDOUT);
    assert!(t.elapsed() >= Duration::from_millis(200));
    assert_eq!(cmd.stuck_slots(), 1);
    stuck.restore();
    cmd.set_timeout(Duration::from_secs(10));
    // The next command takes another slot and completes.
    exec(&cmd, enable_hca_in()).expect("next command");
    exec(&cmd, disable_hca_in()).unwrap();
}

#[test]
fn pf_reads_a_vfs_caps_through_other_function() {
    init_tracing();
    let tb = Testbed::start(2);
    let hca = up(tb.pf_client(), ARENA, true);
    assert_eq!(hca.info().unwrap().vhca_id, 0);
    for n in 0..2u16 {
        let other = hca.query_other_caps(n + 1).expect("other caps");
        assert_eq!(other.vhca_id, n + 1);
        assert!(other.migration.migration && other.migration.multi_load);
        assert!(other.migration.tracking_state && other.migration.in_chunks);
    }
    let e = hca.query_other_caps(9).unwrap_err();
    assert_eq!(e.errno(), -libc::EINVAL, "{e}");
    hca.down().unwrap();
    assert_no_objects(&tb.pf(), "end");
}

#[test]
fn mlx5vf_info_prints_firmware_issi_vhca_id_and_migration_caps() {
    init_tracing();
    let tb = Testbed::start(1);
    let vf0 = tb.vf_socket(0);
    let (ok, stdout, stderr) = run_cli(&["info", "--socket", vf0.to_str().unwrap()]);
    assert!(ok, "mlx5vf info failed: {stderr}");
    for line in [
        "firmware version: 22.39.1002",
        "issi: 1",
        "vhca_id: 1",
        "migration: 1",
        "migration_multi_load: 1",
        "migration_tracking_state: 1",
        "migration_in_chunks: 1",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing {line:?} in:\n{stdout}"
        );
    }
    assert_no_objects(&tb.vf(0), "after info");

    let pf = tb.pf_socket();
    let (ok, stdout, stderr) = run_cli(&["info", "--socket", pf.to_str().unwrap(), "--vf", "0"]);
    assert!(ok, "mlx5vf info --vf 0 failed: {stderr}");
    for line in [
        "vhca_id: 0",
        "vf 0 vhca_id: 1",
        "vf 0 migration: 1",
        "vf 0 migration_in_chunks: 1",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing {line:?} in:\n{stdout}"
        );
    }
    assert_no_objects(&tb.pf(), "after info --vf");

    // Failures: a clear message with the errno name and a non-zero exit.
    let (ok, _, stderr) = run_cli(&["info", "--socket", pf.to_str().unwrap(), "--vf", "7"]);
    assert!(!ok);
    assert!(stderr.contains("EINVAL"), "{stderr}");
    assert!(stderr.contains("QUERY_HCA_CAP"), "{stderr}");
    assert_no_objects(&tb.pf(), "after a failed info --vf");
    let missing = tb.dir().join("nope.sock");
    let (ok, _, stderr) = run_cli(&["info", "--socket", missing.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("nope.sock"), "{stderr}");
}
