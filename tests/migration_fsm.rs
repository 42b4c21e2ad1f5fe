//! Issue 5 acceptance: all 64 (current, target) pairs under each of the four
//! migration flag sets walk exactly the kernel's path.
//!
//! The expected paths below are literal data transcribed by hand from
//! `shared/reference/kernel-mlx5vf.md` §1.3 (matrix A with its multi-step
//! path list; B as A restricted to the states without PRE_COPY; C and D
//! expanded by hand from their next-step cells), not computed from the
//! implementation's table.

use std::time::Duration;

use mlx5_testbed::wait::bounded;
use mlx5vf::migration::fsm::{arcs, is_arc, next_step, path, FsmError, MigFlags, MigState, EINVAL};

const ERROR: MigState = MigState::Error;
const STOP: MigState = MigState::Stop;
const RUN: MigState = MigState::Running;
const SC: MigState = MigState::StopCopy;
const RES: MigState = MigState::Resuming;
const RP2P: MigState = MigState::RunningP2p;
const PC: MigState = MigState::PreCopy;
const PCP2P: MigState = MigState::PreCopyP2p;

/// What a (current, target) request under a flag set must do.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Walk these states, one driver arc each (empty: no-op).
    Walk(&'static [MigState]),
    /// Refused with EINVAL because the table leads to ERROR.
    Einval,
}
use Expect::{Einval, Walk};

type Row = (MigState, MigState, Expect);

/// §1.3 A: STOP_COPY|P2P|PRE_COPY. Single-step cells from the matrix, the
/// multi-step ones from the "Full multi-step paths under A" list.
const PATHS_A: &[Row] = &[
    (STOP, STOP, Walk(&[])),
    (STOP, RUN, Walk(&[RP2P, RUN])),
    (STOP, SC, Walk(&[SC])),
    (STOP, RES, Walk(&[RES])),
    (STOP, RP2P, Walk(&[RP2P])),
    (STOP, PC, Walk(&[RP2P, RUN, PC])),
    (STOP, PCP2P, Walk(&[RP2P, PCP2P])),
    //
    (RUN, STOP, Walk(&[RP2P, STOP])),
    (RUN, RUN, Walk(&[])),
    (RUN, SC, Walk(&[RP2P, STOP, SC])),
    (RUN, RES, Walk(&[RP2P, STOP, RES])),
    (RUN, RP2P, Walk(&[RP2P])),
    (RUN, PC, Walk(&[PC])),
    (RUN, PCP2P, Walk(&[RP2P, PCP2P])),
    //
    (SC, STOP, Walk(&[STOP])),
    (SC, RUN, Walk(&[STOP, RP2P, RUN])),
    (SC, SC, Walk(&[])),
    (SC, RES, Walk(&[STOP, RES])),
    (SC, RP2P, Walk(&[STOP, RP2P])),
    (SC, PC, Einval),
    (SC, PCP2P, Einval),
    //
    (RES, STOP, Walk(&[STOP])),
    (RES, RUN, Walk(&[STOP, RP2P, RUN])),
    (RES, SC, Walk(&[STOP, SC])),
    (RES, RES, Walk(&[])),
    (RES, RP2P, Walk(&[STOP, RP2P])),
    (RES, PC, Walk(&[STOP, RP2P, RUN, PC])),
    (RES, PCP2P, Walk(&[STOP, RP2P, PCP2P])),
    //
    (RP2P, STOP, Walk(&[STOP])),
    (RP2P, RUN, Walk(&[RUN])),
    (RP2P, SC, Walk(&[STOP, SC])),
    (RP2P, RES, Walk(&[STOP, RES])),
    (RP2P, RP2P, Walk(&[])),
    (RP2P, PC, Walk(&[RUN, PC])),
    (RP2P, PCP2P, Walk(&[PCP2P])),
    //
    (PC, STOP, Walk(&[RUN, RP2P, STOP])),
    (PC, RUN, Walk(&[RUN])),
    (PC, SC, Walk(&[PCP2P, SC])),
    (PC, RES, Walk(&[RUN, RP2P, STOP, RES])),
    (PC, RP2P, Walk(&[RUN, RP2P])),
    (PC, PC, Walk(&[])),
    (PC, PCP2P, Walk(&[PCP2P])),
    //
    (PCP2P, STOP, Walk(&[RP2P, STOP])),
    (PCP2P, RUN, Walk(&[RP2P, RUN])),
    (PCP2P, SC, Walk(&[SC])),
    (PCP2P, RES, Walk(&[RP2P, STOP, RES])),
    (PCP2P, RP2P, Walk(&[RP2P])),
    (PCP2P, PC, Walk(&[PC])),
    (PCP2P, PCP2P, Walk(&[])),
];

/// §1.3 B: STOP_COPY|P2P. "The other cells are the same as A"; PRE_COPY and
/// PRE_COPY_P2P are refused as current state or target.
const PATHS_B: &[Row] = &[
    (STOP, STOP, Walk(&[])),
    (STOP, RUN, Walk(&[RP2P, RUN])),
    (STOP, SC, Walk(&[SC])),
    (STOP, RES, Walk(&[RES])),
    (STOP, RP2P, Walk(&[RP2P])),
    //
    (RUN, STOP, Walk(&[RP2P, STOP])),
    (RUN, RUN, Walk(&[])),
    (RUN, SC, Walk(&[RP2P, STOP, SC])),
    (RUN, RES, Walk(&[RP2P, STOP, RES])),
    (RUN, RP2P, Walk(&[RP2P])),
    //
    (SC, STOP, Walk(&[STOP])),
    (SC, RUN, Walk(&[STOP, RP2P, RUN])),
    (SC, SC, Walk(&[])),
    (SC, RES, Walk(&[STOP, RES])),
    (SC, RP2P, Walk(&[STOP, RP2P])),
    //
    (RES, STOP, Walk(&[STOP])),
    (RES, RUN, Walk(&[STOP, RP2P, RUN])),
    (RES, SC, Walk(&[STOP, SC])),
    (RES, RES, Walk(&[])),
    (RES, RP2P, Walk(&[STOP, RP2P])),
    //
    (RP2P, STOP, Walk(&[STOP])),
    (RP2P, RUN, Walk(&[RUN])),
    (RP2P, SC, Walk(&[STOP, SC])),
    (RP2P, RES, Walk(&[STOP, RES])),
    (RP2P, RP2P, Walk(&[])),
];

/// §1.3 C: STOP_COPY|PRE_COPY, expanded from the next-step cells
/// (e.g. STOP→PRE_COPY: cell RUN, then RUN→PRE_COPY: cell PRE_COPY).
const PATHS_C: &[Row] = &[
    (STOP, STOP, Walk(&[])),
    (STOP, RUN, Walk(&[RUN])),
    (STOP, SC, Walk(&[SC])),
    (STOP, RES, Walk(&[RES])),
    (STOP, PC, Walk(&[RUN, PC])),
    //
    (RUN, STOP, Walk(&[STOP])),
    (RUN, RUN, Walk(&[])),
    (RUN, SC, Walk(&[STOP, SC])),
    (RUN, RES, Walk(&[STOP, RES])),
    (RUN, PC, Walk(&[PC])),
    //
    (SC, STOP, Walk(&[STOP])),
    (SC, RUN, Walk(&[STOP, RUN])),
    (SC, SC, Walk(&[])),
    (SC, RES, Walk(&[STOP, RES])),
    (SC, PC, Einval),
    //
    (RES, STOP, Walk(&[STOP])),
    (RES, RUN, Walk(&[STOP, RUN])),
    (RES, SC, Walk(&[STOP, SC])),
    (RES, RES, Walk(&[])),
    (RES, PC, Walk(&[STOP, RUN, PC])),
    //
    (PC, STOP, Walk(&[RUN, STOP])),
    (PC, RUN, Walk(&[RUN])),
    (PC, SC, Walk(&[SC])),
    (PC, RES, Walk(&[RUN, STOP, RES])),
    (PC, PC, Walk(&[])),
];

/// §1.3 D: STOP_COPY only. STOP↔RUN, STOP↔STOP_COPY, STOP↔RESUMING are
/// direct; everything else goes through STOP.
const PATHS_D: &[Row] = &[
    (STOP, STOP, Walk(&[])),
    (STOP, RUN, Walk(&[RUN])),
    (STOP, SC, Walk(&[SC])),
    (STOP, RES, Walk(&[RES])),
    //
    (RUN, STOP, Walk(&[STOP])),
    (RUN, RUN, Walk(&[])),
    (RUN, SC, Walk(&[STOP, SC])),
    (RUN, RES, Walk(&[STOP, RES])),
    //
    (SC, STOP, Walk(&[STOP])),
    (SC, RUN, Walk(&[STOP, RUN])),
    (SC, SC, Walk(&[])),
    (SC, RES, Walk(&[STOP, RES])),
    //
    (RES, STOP, Walk(&[STOP])),
    (RES, RUN, Walk(&[STOP, RUN])),
    (RES, SC, Walk(&[STOP, SC])),
    (RES, RES, Walk(&[])),
];

const ALL_STATES: [MigState; 8] = [ERROR, STOP, RUN, SC, RES, RP2P, PC, PCP2P];

fn flags(bits: u64) -> MigFlags {
    MigFlags::new(bits).expect("valid flag set")
}

/// Checks `path()` for all 8×8 pairs under `f`: listed pairs walk as listed,
/// every other pair is refused for the reason §1.2 gives.
fn check_all_64_pairs(f: MigFlags, supported: &[MigState], table: &[Row]) {
    assert_eq!(
        table.len(),
        supported.len() * supported.len(),
        "the expected table must list every pair of supported states"
    );
    let mut checked = 0;
    for cur in ALL_STATES {
        for target in ALL_STATES {
            let got = path(cur, target, f);
            let listed = table.iter().find(|(c, t, _)| *c == cur && *t == target);
            match listed {
                Some((_, _, Walk(want))) => {
                    assert_eq!(got.as_deref(), Ok(*want), "{cur}->{target} under {f}");
                }
                Some((_, _, Einval)) => {
                    assert_eq!(got, Err(FsmError::NoArc { cur, target }), "{cur}->{target}");
                }
                None if cur == ERROR || !supported.contains(&cur) => {
                    assert_eq!(
                        got,
                        Err(FsmError::UnsupportedCurrent {
                            cur,
                            target,
                            flags: f
                        }),
                        "{cur}->{target} under {f}"
                    );
                }
                None if target == ERROR => {
                    assert_eq!(got, Err(FsmError::ErrorRequested { cur, target }));
                }
                None => {
                    assert!(!supported.contains(&target), "{cur}->{target} missing");
                    assert_eq!(
                        got,
                        Err(FsmError::UnsupportedTarget {
                            cur,
                            target,
                            flags: f
                        }),
                        "{cur}->{target} under {f}"
                    );
                }
            }
            if let Err(e) = got {
                assert_eq!(e.errno(), EINVAL, "{e}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 64);
}

#[test]
fn all_64_pairs_walk_kernel_path_under_stop_copy_p2p_pre_copy() {
    check_all_64_pairs(flags(7), &[STOP, RUN, SC, RES, RP2P, PC, PCP2P], PATHS_A);
}

#[test]
fn all_64_pairs_walk_kernel_path_under_stop_copy_p2p() {
    check_all_64_pairs(flags(3), &[STOP, RUN, SC, RES, RP2P], PATHS_B);
}

#[test]
fn all_64_pairs_walk_kernel_path_under_stop_copy_pre_copy() {
    check_all_64_pairs(flags(5), &[STOP, RUN, SC, RES, PC], PATHS_C);
}

#[test]
fn all_64_pairs_walk_kernel_path_under_stop_copy_only() {
    check_all_64_pairs(flags(1), &[STOP, RUN, SC, RES], PATHS_D);
}

#[test]
fn stop_copy_to_pre_copy_returns_einval_without_hanging() {
    let results = bounded(Duration::from_secs(10), || {
        let mut results = Vec::new();
        for f in [flags(7), flags(5)] {
            results.push(next_step(SC, PC, f));
            results.push(path(SC, PC, f).map(|_| PC));
        }
        results.push(next_step(SC, PCP2P, flags(7)));
        results.push(path(SC, PCP2P, flags(7)).map(|_| PCP2P));
        // Without P2P, PRE_COPY_P2P is refused as a target before any walk.
        results.push(path(SC, PCP2P, flags(5)).map(|_| PCP2P));
        results
    });
    assert_eq!(results.len(), 7);
    for r in &results[..6] {
        assert!(matches!(r, Err(FsmError::NoArc { cur: SC, .. })), "{r:?}");
    }
    assert!(matches!(
        results[6],
        Err(FsmError::UnsupportedTarget { target: PCP2P, .. })
    ));
    for r in results {
        assert_eq!(r.unwrap_err().errno(), EINVAL);
    }
}

#[test]
fn full_flag_set_has_exactly_the_fifteen_mlx5vf_arcs() {
    let want = [
        (RUN, RP2P),
        (RP2P, RUN),
        (RP2P, STOP),
        (STOP, RP2P),
        (STOP, SC),
        (SC, STOP),
        (STOP, RES),
        (RES, STOP),
        (RUN, PC),
        (PC, RUN),
        (PC, PCP2P),
        (PCP2P, PC),
        (PCP2P, RP2P),
        (PCP2P, SC),
        (RP2P, PCP2P),
    ];
    let got = arcs(flags(7));
    assert_eq!(got.len(), 15);
    for arc in want {
        assert!(got.contains(&arc), "missing {} -> {}", arc.0, arc.1);
    }
    assert!(
        !is_arc(RUN, STOP, flags(7)),
        "RUN->STOP goes through RUNNING_P2P"
    );
    assert!(
        !is_arc(PC, SC, flags(7)),
        "PRE_COPY->STOP_COPY goes through PRE_COPY_P2P"
    );
}

#[test]
fn smaller_flag_sets_have_the_arcs_of_section_1_3() {
    let mut b = arcs(flags(3));
    b.sort();
    let mut want_b = vec![
        (STOP, SC),
        (SC, STOP),
        (STOP, RES),
        (RES, STOP),
        (RUN, RP2P),
        (RP2P, RUN),
        (RP2P, STOP),
        (STOP, RP2P),
    ];
    want_b.sort();
    assert_eq!(b, want_b);

    let mut c = arcs(flags(5));
    c.sort();
    let mut want_c = vec![
        (STOP, SC),
        (SC, STOP),
        (STOP, RES),
        (RES, STOP),
        (RUN, STOP),
        (STOP, RUN),
        (RUN, PC),
        (PC, RUN),
        (PC, SC),
    ];
    want_c.sort();
    assert_eq!(c, want_c);

    let mut d = arcs(flags(1));
    d.sort();
    let mut want_d = vec![
        (STOP, SC),
        (SC, STOP),
        (STOP, RES),
        (RES, STOP),
        (RUN, STOP),
        (STOP, RUN),
    ];
    want_d.sort();
    assert_eq!(d, want_d);
}

#[test]
fn every_step_of_every_path_is_an_arc() {
    for (f, table) in [
        (flags(7), PATHS_A),
        (flags(3), PATHS_B),
        (flags(5), PATHS_C),
        (flags(1), PATHS_D),
    ] {
        for &(cur, target, _) in table {
            let Ok(steps) = path(cur, target, f) else {
                continue;
            };
            let mut at = cur;
            for next in steps {
                assert!(
                    is_arc(at, next, f),
                    "{cur}->{target} under {f} takes {at}->{next}, not an arc"
                );
                at = next;
            }
            assert_eq!(at, target);
        }
    }
}

#[test]
fn no_path_passes_through_a_saving_state() {
    // uAPI path rule: a saving-group state never sits in the interior of a path.
    for f in MigFlags::ALL_SETS {
        for cur in f.states() {
            for target in f.states() {
                let Ok(steps) = path(cur, target, f) else {
                    continue;
                };
                if let Some((_, interior)) = steps.split_last() {
                    for s in interior {
                        assert!(
                            ![SC, PC].contains(s),
                            "{cur}->{target} under {f} passes through {s}"
                        );
                        if *s == PCP2P {
                            // Only PRE_COPY → STOP_COPY may cross PRE_COPY_P2P,
                            // staying within the one saving session.
                            assert_eq!((cur, target), (PC, SC));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn uapi_state_numbers_map_through_try_from() {
    for (n, want) in ALL_STATES.into_iter().enumerate() {
        let n = u32::try_from(n).unwrap();
        assert_eq!(MigState::try_from(n), Ok(want));
    }
    assert_eq!(
        MigState::try_from(8),
        Err(FsmError::UnknownState { value: 8 })
    );
}
