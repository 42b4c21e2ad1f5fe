//! Several VFs migrated as one group (`mlx5vf::migration::group`): every source VF is
//! initiator-suspended (RUNNING_P2P / PRE_COPY_P2P) before any is responder-suspended,
//! and every destination VF is loaded and responder-resumed before any is
//! initiator-resumed, as the firmware's own command log shows. The library and the CLI
//! (`mlx5vf migrate --vf 0,1`).

use mlx5_emulator::MigState as EmuState;
use mlx5_prm::cmd::migration::{ResumeOpMod, SuspendOpMod};
use mlx5_prm::Opcode;
use mlx5_testbed::bins::arg;
use mlx5_testbed::bringup::shared_pf_up;
use mlx5_testbed::devmem::{fill_bar2, read_bar2};
use mlx5_testbed::migrate::pump;
use mlx5_testbed::{init_tracing, run_cli, Testbed};
use mlx5vf::migration::fsm::MigState;
use mlx5vf::migration::{MigrationDevice, MigrationGroup};

/// The op_mods of the PF's SUSPEND_VHCA (`'S'`) and RESUME_VHCA (`'R'`) commands, in
/// the order they executed.
fn suspend_resume_log(tb: &Testbed) -> Vec<(char, u16)> {
    tb.pf()
        .command_log()
        .iter()
        .filter_map(|r| {
            if r.opcode == u16::from(Opcode::SuspendVhca) {
                Some(('S', r.op_mod))
            } else if r.opcode == u16::from(Opcode::ResumeVhca) {
                Some(('R', r.op_mod))
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn a_group_suspends_every_initiator_before_any_responder_and_resumes_in_reverse() {
    init_tracing();
    let (a, b) = (Testbed::start(2), Testbed::start(2));
    let mut guests: Vec<_> = (0..2).map(|n| a.vf_client(n)).collect();
    let patterns: Vec<_> = guests
        .iter_mut()
        .enumerate()
        .map(|(n, g)| fill_bar2(g, 40 + n as u64))
        .collect();
    let (src_pf, dst_pf) = (shared_pf_up(&a.pf_socket()), shared_pf_up(&b.pf_socket()));
    let group = |pf: &std::sync::Arc<mlx5vf::hca::Hca>| {
        MigrationGroup::new(
            (0..2)
                .map(|vf| MigrationDevice::new(pf.clone(), vf).unwrap())
                .collect(),
        )
    };
    let (src, dst) = (group(&src_pf), group(&dst_pf));
    let mut outs = dst.resuming().unwrap();
    let mut ins: Vec<_> = src
        .walk(&[MigState::PreCopy])
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    assert_eq!((ins.len(), outs.len()), (2, 2));
    let mut keep = Vec::new();
    for (i, o) in ins.iter_mut().zip(outs.iter_mut()) {
        pump(i, Some(o), &mut keep);
    }
    let before = suspend_resume_log(&a).len();
    src.stop_copy().unwrap();
    assert_eq!(src.states(), vec![MigState::StopCopy; 2]);
    let (init, resp) = (
        u16::from(SuspendOpMod::Initiator),
        u16::from(SuspendOpMod::Responder),
    );
    assert_eq!(
        suspend_resume_log(&a)[before..],
        [('S', init), ('S', init), ('S', resp), ('S', resp)],
        "every initiator suspend before any responder suspend"
    );
    for n in 0..2 {
        assert_eq!(a.vf(n).migration_state(), EmuState::ResponderSuspended);
    }
    for (i, o) in ins.iter_mut().zip(outs.iter_mut()) {
        pump(i, Some(o), &mut keep);
    }
    let before = suspend_resume_log(&b).len();
    dst.start().unwrap();
    assert_eq!(dst.states(), vec![MigState::Running; 2]);
    let (resp, init) = (
        u16::from(ResumeOpMod::Responder),
        u16::from(ResumeOpMod::Initiator),
    );
    assert_eq!(
        suspend_resume_log(&b)[before..],
        [('R', resp), ('R', resp), ('R', init), ('R', init)],
        "every responder resume before any initiator resume"
    );
    for (n, p) in patterns.iter().enumerate() {
        let mut c = b.vf_client(n as u16);
        assert!(read_bar2(&mut c) == *p, "VF {n}'s memory arrived");
    }
    // The sources are stopped together as well, and none saw a violation.
    src.walk(&[MigState::Stop]).unwrap();
    assert!(a.adapter.violations().is_empty());
    assert!(b.adapter.violations().is_empty());
}

#[test]
fn a_failing_member_undoes_the_step_for_the_members_already_moved() {
    init_tracing();
    let a = Testbed::start(2);
    let pf = shared_pf_up(&a.pf_socket());
    let m0 = MigrationDevice::new(pf.clone(), 0).unwrap();
    let m1 = MigrationDevice::new(pf.clone(), 1).unwrap();
    // VF 1 is already suspended behind the driver's back: its RUNNING_P2P arc fails.
    mlx5_testbed::bringup::suspend_resume(
        &pf,
        Opcode::SuspendVhca,
        SuspendOpMod::Initiator.into(),
        a.vf(1).id.vhca_id,
    )
    .unwrap();
    let g = MigrationGroup::new(vec![m0, m1]);
    let e = g.stop().expect_err("VF 1 cannot go to RUNNING_P2P");
    assert_eq!(e.vf, 1);
    assert_eq!(e.to, MigState::RunningP2p);
    assert!(e.to_string().contains("vf 1"), "{e}");
    assert_eq!(g.states()[0], MigState::Running, "VF 0 walked back");
    assert_eq!(a.vf(0).migration_state(), EmuState::Running);
}

#[test]
fn cli_migrates_two_vfs_as_a_group() {
    init_tracing();
    let (a, b) = (Testbed::start(2), Testbed::start(2));
    let patterns: Vec<_> = (0..2)
        .map(|n| fill_bar2(&mut a.vf_client(n), 60 + n as u64))
        .collect();
    let (ok, out, err) = run_cli(&[
        "migrate",
        "--from",
        &arg(a.dir()),
        "--to",
        &arg(b.dir()),
        "--vf",
        "0,1",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("migrated vf 0") && out.contains("migrated vf 1"),
        "{out}"
    );
    assert!(out.contains("migrated group of 2 VFs"), "{out}");
    let log = suspend_resume_log(&a);
    let first_responder = log
        .iter()
        .position(|&(c, m)| c == 'S' && m == u16::from(SuspendOpMod::Responder))
        .expect("a responder suspend");
    let initiators = log
        .iter()
        .filter(|&&(c, m)| c == 'S' && m == u16::from(SuspendOpMod::Initiator))
        .count();
    assert!(
        log[..first_responder]
            .iter()
            .filter(|&&(c, m)| c == 'S' && m == u16::from(SuspendOpMod::Initiator))
            .count()
            == initiators,
        "{log:?}"
    );
    for (n, p) in patterns.iter().enumerate() {
        assert!(read_bar2(&mut b.vf_client(n as u16)) == *p, "VF {n}");
    }
    let (ok, _, err) = run_cli(&[
        "migrate",
        "--from",
        &arg(a.dir()),
        "--to",
        &arg(b.dir()),
        "--vf",
        "1,1",
    ]);
    assert!(!ok);
    assert!(err.contains("distinct"), "{err}");
}
