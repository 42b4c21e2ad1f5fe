//! The VFIO migration v2 state machine: which states exist, which of them a
//! device supports, and which single arcs a driver walks to get from one state
//! to another.
//!
//! This module is pure path logic. It decides *where* to go; carrying out an
//! arc (the firmware commands of `kernel-mlx5vf.md` §3.2) is the business of
//! the arc executor.
//!
//! Everything here mirrors `drivers/vfio/vfio_main.c`:
//! - [`MigState`] is `enum vfio_device_mig_state` from `include/uapi/linux/vfio.h`;
//! - [`MigFlags::supports`] is the `state_flags_table` check;
//! - [`RAW_NEXT`] is `vfio_from_fsm_table`;
//! - [`next_step`] is `vfio_mig_get_next_state`, with the 2026 fix for the
//!   STOP_COPY → PRE_COPY(_P2P) infinite loop;
//! - [`path`] is the loop of a driver's `set_state` (mlx5vf's
//!   `mlx5vf_pci_set_device_state`), which calls `vfio_mig_get_next_state`
//!   until the current state is the target;
//! - [`arcs`] is the list of arcs in the comment above `vfio_from_fsm_table`,
//!   which are exactly the cases of `mlx5vf_pci_step_device_state_locked`.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;
use vfu::uapi;

/// `EINVAL` from `<errno.h>` (Linux, all architectures). The driver crate has
/// no `libc` dependency, and every FSM refusal in the kernel is `-EINVAL`.
pub const EINVAL: i32 = 22;

/// A VFIO migration v2 device state, numbered as in the uAPI
/// (`enum vfio_device_mig_state`).
///
/// Values come from the outside (the `device_state` of
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`), so they enter through
/// [`TryFrom<u32>`] and an unknown number is a typed error.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MigState {
    /// `VFIO_DEVICE_STATE_ERROR`: the device can no longer be trusted; left only by reset.
    Error = uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR,
    /// `VFIO_DEVICE_STATE_STOP`.
    Stop = uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP,
    /// `VFIO_DEVICE_STATE_RUNNING`.
    Running = uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
    /// `VFIO_DEVICE_STATE_STOP_COPY`.
    StopCopy = uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
    /// `VFIO_DEVICE_STATE_RESUMING`.
    Resuming = uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING,
    /// `VFIO_DEVICE_STATE_RUNNING_P2P`.
    RunningP2p = uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P,
    /// `VFIO_DEVICE_STATE_PRE_COPY`.
    PreCopy = uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY,
    /// `VFIO_DEVICE_STATE_PRE_COPY_P2P`.
    PreCopyP2p = uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P,
}

/// Number of states, `VFIO_DEVICE_STATE_NR`. Also the bound on every walk.
pub const NR_STATES: usize = uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_NR as usize;

impl MigState {
    /// Every state, in uAPI order (index == numeric value).
    pub const ALL: [MigState; NR_STATES] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    /// The uAPI number.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// The uAPI name without the `VFIO_DEVICE_STATE_` prefix.
    pub const fn name(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// The migration flags a device must advertise for this state to exist:
    /// `state_flags_table` in `vfio_mig_get_next_state`. ERROR needs `~0U`,
    /// which no device has, so ERROR is never a supported current state nor
    /// a valid target.
    pub const fn required_flags(self) -> u32 {
        const SC: u32 = uapi::VFIO_MIGRATION_STOP_COPY;
        const P2P: u32 = uapi::VFIO_MIGRATION_P2P;
        const PC: u32 = uapi::VFIO_MIGRATION_PRE_COPY;
        match self {
            MigState::Error => !0,
            MigState::Stop | MigState::Running | MigState::StopCopy | MigState::Resuming => SC,
            MigState::RunningP2p => SC | P2P,
            MigState::PreCopy => SC | PC,
            MigState::PreCopyP2p => SC | P2P | PC,
        }
    }

    const fn idx(self) -> usize {
        self as usize
    }
}

impl TryFrom<u32> for MigState {
    type Error = FsmError;

    fn try_from(value: u32) -> Result<Self, FsmError> {
        usize::try_from(value)
            .ok()
            .and_then(|i| MigState::ALL.get(i).copied())
            .ok_or(FsmError::UnknownState { value })
    }
}

impl From<MigState> for u32 {
    fn from(state: MigState) -> u32 {
        state.as_u32()
    }
}

impl fmt::Display for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MigState {
    type Err = FsmError;

    /// Parses a uAPI name, case-insensitively, with or without the
    /// `VFIO_DEVICE_STATE_` prefix (for `mlx5vf state --set STATE`).
    fn from_str(s: &str) -> Result<Self, FsmError> {
        let upper = s.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("VFIO_DEVICE_STATE_").unwrap_or(&upper);
        MigState::ALL
            .into_iter()
            .find(|st| st.name() == bare)
            .ok_or_else(|| FsmError::UnknownStateName { name: s.to_owned() })
    }
}

/// The migration capability a device advertises
/// (`struct vfio_device_feature_migration.flags`, `VFIO_MIGRATION_*`).
///
/// Only validated sets exist: STOP_COPY present, no unknown bits. This is the
/// check `vfio_pci_core_register_device` makes on `migration_flags`
/// (STOP_COPY mandatory), tightened to refuse the bits the uAPI leaves "to be
/// defined in the future".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MigFlags(u32);

impl MigFlags {
    /// `VFIO_MIGRATION_STOP_COPY`: STOP, STOP_COPY and RESUMING. Mandatory.
    pub const STOP_COPY: u32 = uapi::VFIO_MIGRATION_STOP_COPY;
    /// `VFIO_MIGRATION_P2P`: adds RUNNING_P2P.
    pub const P2P: u32 = uapi::VFIO_MIGRATION_P2P;
    /// `VFIO_MIGRATION_PRE_COPY`: adds PRE_COPY (and PRE_COPY_P2P with P2P).
    pub const PRE_COPY: u32 = uapi::VFIO_MIGRATION_PRE_COPY;
    const KNOWN: u32 = Self::STOP_COPY | Self::P2P | Self::PRE_COPY;

    /// STOP_COPY | P2P | PRE_COPY, the set mlx5vf advertises (`kernel-mlx5vf.md` §3.1).
    pub const MLX5VF: MigFlags = MigFlags(Self::KNOWN);

    /// The four valid flag sets, largest first: STOP_COPY|P2P|PRE_COPY,
    /// STOP_COPY|P2P, STOP_COPY|PRE_COPY, STOP_COPY.
    pub const ALL_SETS: [MigFlags; 4] = [
        MigFlags(Self::STOP_COPY | Self::P2P | Self::PRE_COPY),
        MigFlags(Self::STOP_COPY | Self::P2P),
        MigFlags(Self::STOP_COPY | Self::PRE_COPY),
        MigFlags(Self::STOP_COPY),
    ];

    /// Validates raw `VFIO_MIGRATION_*` bits (the uAPI field is a `u64`).
    pub fn new(bits: u64) -> Result<Self, FsmError> {
        let known = u64::from(Self::KNOWN);
        if bits & !known != 0 {
            return Err(FsmError::UnknownFlags {
                bits,
                unknown: bits & !known,
            });
        }
        if bits & u64::from(Self::STOP_COPY) == 0 {
            return Err(FsmError::MissingStopCopy { bits });
        }
        // Fits: bits ⊆ KNOWN, which is a u32.
        Ok(MigFlags(bits as u32))
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// `VFIO_MIGRATION_P2P` is set.
    pub const fn has_p2p(self) -> bool {
        self.0 & Self::P2P != 0
    }

    /// `VFIO_MIGRATION_PRE_COPY` is set.
    pub const fn has_pre_copy(self) -> bool {
        self.0 & Self::PRE_COPY != 0
    }

    /// Whether `state` exists under these flags: the `state_flags_table` test
    /// of `vfio_mig_get_next_state`. Always false for ERROR.
    pub const fn supports(self, state: MigState) -> bool {
        let req = state.required_flags();
        self.0 & req == req
    }

    /// The states that exist under these flags, in uAPI order.
    pub fn states(self) -> impl Iterator<Item = MigState> {
        MigState::ALL.into_iter().filter(move |s| self.supports(*s))
    }
}

impl TryFrom<u64> for MigFlags {
    type Error = FsmError;

    fn try_from(bits: u64) -> Result<Self, FsmError> {
        MigFlags::new(bits)
    }
}

impl fmt::Display for MigFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::STOP_COPY, "STOP_COPY"),
            (Self::P2P, "P2P"),
            (Self::PRE_COPY, "PRE_COPY"),
        ];
        let mut sep = "";
        for (bit, name) in names {
            if self.0 & bit != 0 {
                write!(f, "{sep}{name}")?;
                sep = "|";
            }
        }
        Ok(())
    }
}

/// Why the state machine refused. Every variant maps to `EINVAL`, as the
/// kernel returns for each of them.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FsmError {
    /// A state number outside the uAPI enum.
    #[error("expected a VFIO device state 0..={}, got {value}", NR_STATES - 1)]
    UnknownState {
        /// The number received.
        value: u32,
    },
    /// A state name that is not one of the uAPI names.
    #[error("expected a VFIO device state name (STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P), got {name:?}")]
    UnknownStateName {
        /// The text received.
        name: String,
    },
    /// Migration flags with bits the uAPI does not define.
    #[error("expected migration flags within STOP_COPY|P2P|PRE_COPY (0x7), got {bits:#x} (unknown bits {unknown:#x})")]
    UnknownFlags {
        /// The flags received.
        bits: u64,
        /// The bits outside the known set.
        unknown: u64,
    },
    /// Migration flags without the mandatory STOP_COPY.
    #[error("expected migration flags including STOP_COPY (0x1), got {bits:#x}")]
    MissingStopCopy {
        /// The flags received.
        bits: u64,
    },
    /// The current state does not exist under the flags (ERROR never does).
    /// The kernel WARNs here: a driver must not ask for a step from ERROR or
    /// from a state it does not advertise.
    #[error("current state {cur} is not a supported state under {flags} (target {target}); ERROR is left only by reset")]
    UnsupportedCurrent {
        /// Where the device is.
        cur: MigState,
        /// Where it was asked to go.
        target: MigState,
        /// The device's flags.
        flags: MigFlags,
    },
    /// ERROR was requested; the uAPI never allows it as a target.
    #[error("ERROR can never be requested as a target (current state {cur}, target {target})")]
    ErrorRequested {
        /// Where the device is.
        cur: MigState,
        /// Always ERROR.
        target: MigState,
    },
    /// The target is an optional state the flags do not advertise.
    #[error("target {target} is not supported under {flags} (current state {cur})")]
    UnsupportedTarget {
        /// Where the device is.
        cur: MigState,
        /// Where it was asked to go.
        target: MigState,
        /// The device's flags.
        flags: MigFlags,
    },
    /// No arc leads from `cur` towards `target`: the table says ERROR
    /// (STOP_COPY → PRE_COPY or PRE_COPY_P2P, "not permitted" in the uAPI).
    #[error("no transition from {cur} to {target}: the uAPI does not permit it")]
    NoArc {
        /// Where the device is.
        cur: MigState,
        /// Where it was asked to go.
        target: MigState,
    },
    /// The skip loop or the path walk did not reach a supported state or the
    /// target within [`NR_STATES`] steps. Unreachable with the kernel table;
    /// it stands in for the soft lockup the unfixed kernel loop could cause.
    #[error("walk from {cur} to {target} did not converge within {limit} steps")]
    NoProgress {
        /// Where the walk started.
        cur: MigState,
        /// Where it was going.
        target: MigState,
        /// The step bound that was hit.
        limit: usize,
    },
}

impl FsmError {
    /// The errno the kernel returns for this refusal (positive; negate for a
    /// kernel-style return value). Always `EINVAL`.
    pub const fn errno(&self) -> i32 {
        EINVAL
    }
}

/// The raw next-step table, indexed `[cur][target]` by uAPI number.
pub type RawTable = [[MigState; NR_STATES]; NR_STATES];

/// `vfio_from_fsm_table` from `drivers/vfio/vfio_main.c`: the next state on
/// the way from `cur` (row) to `target` (column) *before* optional states the
/// device does not support are skipped. Rows and columns are in uAPI order:
/// ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY,
/// PRE_COPY_P2P.
#[rustfmt::skip]
pub const RAW_NEXT: RawTable = {
    use MigState::{
        Error as ERR, PreCopy as PC, PreCopyP2p as PCP, Resuming as RES, Running as RUN,
        RunningP2p as RP2P, Stop as STOP, StopCopy as SC,
    };
    [
        // target: ERROR STOP  RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY PRE_COPY_P2P
        /* ERROR        */ [ERR, ERR,  ERR,  ERR,  ERR,  ERR,  ERR,  ERR ],
        /* STOP         */ [ERR, STOP, RP2P, SC,   RES,  RP2P, RP2P, RP2P],
        /* RUNNING      */ [ERR, RP2P, RUN,  RP2P, RP2P, RP2P, PC,   RP2P],
        /* STOP_COPY    */ [ERR, STOP, STOP, SC,   STOP, STOP, ERR,  ERR ],
        /* RESUMING     */ [ERR, STOP, STOP, STOP, RES,  STOP, STOP, STOP],
        /* RUNNING_P2P  */ [ERR, STOP, RUN,  STOP, STOP, RP2P, RUN,  PCP ],
        /* PRE_COPY     */ [ERR, RUN,  RUN,  PCP,  RUN,  RUN,  PC,   PCP ],
        /* PRE_COPY_P2P */ [ERR, RP2P, RP2P, SC,   RP2P, RP2P, PC,   PCP ],
    ]
};

/// The next single arc from `cur` towards `target` under `flags`:
/// `vfio_mig_get_next_state` (`drivers/vfio/vfio_main.c`).
///
/// 1. `cur` must be supported (ERROR never is); the kernel WARNs here.
/// 2. `target` must be supported (ERROR never is).
/// 3. `next = table[cur][target]`; while `next` is unsupported, step again
///    with `next = table[next][target]`, skipping optional states.
/// 4. If `next` is ERROR, refuse.
///
/// The skip loop also stops at ERROR: the 2026 fix (Junrui Luo, "Fixes:
/// 4db52602a607") for the unfixed loop, which spun forever on
/// STOP_COPY → PRE_COPY(_P2P) because ERROR is both unsupported and a fixed
/// point of the table. The loop is bounded by [`NR_STATES`] as well.
///
/// Call only with `cur != target`; for `cur == target` the kernel's drivers
/// never call it and this returns `target` after validation.
pub fn next_step(cur: MigState, target: MigState, flags: MigFlags) -> Result<MigState, FsmError> {
    next_step_in(&RAW_NEXT, cur, target, flags)
}

fn validate(cur: MigState, target: MigState, flags: MigFlags) -> Result<(), FsmError> {
    if !flags.supports(cur) {
        tracing::warn!(%cur, %target, %flags, "migration FSM asked to step from an unsupported state");
        return Err(FsmError::UnsupportedCurrent { cur, target, flags });
    }
    if target == MigState::Error {
        return Err(FsmError::ErrorRequested { cur, target });
    }
    if !flags.supports(target) {
        return Err(FsmError::UnsupportedTarget { cur, target, flags });
    }
    Ok(())
}

fn next_step_in(
    table: &RawTable,
    cur: MigState,
    target: MigState,
    flags: MigFlags,
) -> Result<MigState, FsmError> {
    validate(cur, target, flags)?;
    let mut next = table[cur.idx()][target.idx()];
    let mut skipped = 0;
    // The fix: ERROR ends the skip loop instead of feeding itself forever.
    while next != MigState::Error && !flags.supports(next) {
        skipped += 1;
        if skipped >= NR_STATES {
            return Err(FsmError::NoProgress {
                cur,
                target,
                limit: NR_STATES,
            });
        }
        next = table[next.idx()][target.idx()];
    }
    if next == MigState::Error {
        return Err(FsmError::NoArc { cur, target });
    }
    Ok(next)
}

/// The states a driver walks from `cur` to `target`, one arc per element:
/// excludes `cur`, ends at `target`, empty when `cur == target`. This is the
/// loop of `mlx5vf_pci_set_device_state` (`drivers/vfio/pci/mlx5/main.c`),
/// which calls `vfio_mig_get_next_state` until it arrives.
///
/// Both states are validated first, even when they are equal, so ERROR → ERROR
/// is refused like every request involving ERROR (the kernel's loop would
/// treat it as a no-op, but mlx5vf never reaches ERROR; this driver does, and
/// only reset leaves it). The walk is computed whole before any arc runs, so a
/// refusal is all-or-nothing; with the kernel table only the first step can
/// be refused anyway. Bounded by [`NR_STATES`] steps.
pub fn path(cur: MigState, target: MigState, flags: MigFlags) -> Result<Vec<MigState>, FsmError> {
    path_in(&RAW_NEXT, cur, target, flags)
}

fn path_in(
    table: &RawTable,
    cur: MigState,
    target: MigState,
    flags: MigFlags,
) -> Result<Vec<MigState>, FsmError> {
    validate(cur, target, flags)?;
    let mut steps = Vec::new();
    let mut at = cur;
    while at != target {
        if steps.len() >= NR_STATES {
            return Err(FsmError::NoProgress {
                cur,
                target,
                limit: NR_STATES,
            });
        }
        at = next_step_in(table, at, target, flags)?;
        steps.push(at);
    }
    Ok(steps)
}

use MigState::{
    PreCopy as A_PC, PreCopyP2p as A_PCP, Resuming as A_RES, Running as A_RUN,
    RunningP2p as A_RP2P, Stop as A_STOP, StopCopy as A_SC,
};

/// Arcs every driver implements (comment above `vfio_from_fsm_table`).
const ARCS_ALWAYS: [(MigState, MigState); 4] = [
    (A_RES, A_STOP),
    (A_STOP, A_RES),
    (A_STOP, A_SC),
    (A_SC, A_STOP),
];
/// Arcs added by P2P.
const ARCS_P2P: [(MigState, MigState); 4] = [
    (A_RUN, A_RP2P),
    (A_RP2P, A_RUN),
    (A_RP2P, A_STOP),
    (A_STOP, A_RP2P),
];
/// Arcs used instead when P2P is absent.
const ARCS_NO_P2P: [(MigState, MigState); 2] = [(A_RUN, A_STOP), (A_STOP, A_RUN)];
/// Arcs added by PRE_COPY without P2P.
const ARCS_PRE_COPY: [(MigState, MigState); 3] = [(A_RUN, A_PC), (A_PC, A_RUN), (A_PC, A_SC)];
/// Arcs added by PRE_COPY with P2P (on top of [`ARCS_P2P`]).
const ARCS_PRE_COPY_P2P: [(MigState, MigState); 7] = [
    (A_PC, A_RUN),
    (A_PC, A_PCP),
    (A_PCP, A_PC),
    (A_PCP, A_RP2P),
    (A_PCP, A_SC),
    (A_RUN, A_PC),
    (A_RP2P, A_PCP),
];

/// The single arcs a driver must implement under `flags`: the list in the
/// comment above `vfio_from_fsm_table` (`drivers/vfio/vfio_main.c`). Under
/// STOP_COPY|P2P|PRE_COPY these are the 15 cases of
/// `mlx5vf_pci_step_device_state_locked`; every step of every [`path`] is one
/// of them, and each of them is a step of some path.
pub fn arcs(flags: MigFlags) -> Vec<(MigState, MigState)> {
    let mut out = ARCS_ALWAYS.to_vec();
    match (flags.has_p2p(), flags.has_pre_copy()) {
        (true, true) => {
            out.extend(ARCS_P2P);
            out.extend(ARCS_PRE_COPY_P2P);
        }
        (true, false) => out.extend(ARCS_P2P),
        (false, true) => {
            out.extend(ARCS_NO_P2P);
            out.extend(ARCS_PRE_COPY);
        }
        (false, false) => out.extend(ARCS_NO_P2P),
    }
    out
}

/// Whether `from → to` is one of the single arcs of [`arcs`] under `flags`.
/// mlx5vf WARNs and returns `-EINVAL` for any other step.
pub fn is_arc(from: MigState, to: MigState, flags: MigFlags) -> bool {
    arcs(flags).contains(&(from, to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn state_numbers() -> [(MigState, u32); NR_STATES] {
        [
            (MigState::Error, 0),
            (MigState::Stop, 1),
            (MigState::Running, 2),
            (MigState::StopCopy, 3),
            (MigState::Resuming, 4),
            (MigState::RunningP2p, 5),
            (MigState::PreCopy, 6),
            (MigState::PreCopyP2p, 7),
        ]
    }

    #[test]
    fn state_numbers_agree_with_uapi_and_the_fact_sheet() {
        let uapi_values = [
            uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR,
            uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP,
            uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
            uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
            uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING,
            uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P,
            uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY,
            uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P,
        ];
        for ((state, sheet), from_uapi) in state_numbers().into_iter().zip(uapi_values) {
            assert_eq!(state.as_u32(), sheet, "{state}");
            assert_eq!(state.as_u32(), from_uapi, "{state}");
        }
        assert_eq!(NR_STATES, 8);
        for (i, s) in MigState::ALL.into_iter().enumerate() {
            assert_eq!(s.idx(), i);
        }
    }

    #[test]
    fn flag_bits_agree_with_uapi_and_the_fact_sheet() {
        assert_eq!(MigFlags::STOP_COPY, 1);
        assert_eq!(MigFlags::P2P, 2);
        assert_eq!(MigFlags::PRE_COPY, 4);
        assert_eq!(MigFlags::MLX5VF.bits(), 7);
    }

    #[test]
    fn every_known_number_converts_and_round_trips() {
        for (state, n) in state_numbers() {
            assert_eq!(MigState::try_from(n), Ok(state));
            assert_eq!(u32::from(state), n);
        }
    }

    #[test]
    fn unknown_state_number_is_a_typed_einval() {
        for value in [8, 9, 0x100, u32::MAX] {
            let err = MigState::try_from(value).unwrap_err();
            assert_eq!(err, FsmError::UnknownState { value });
            assert_eq!(err.errno(), EINVAL);
            assert!(err.to_string().contains(&value.to_string()));
        }
    }

    #[test]
    fn display_uses_uapi_names_and_parses_back() {
        let names = [
            "ERROR",
            "STOP",
            "RUNNING",
            "STOP_COPY",
            "RESUMING",
            "RUNNING_P2P",
            "PRE_COPY",
            "PRE_COPY_P2P",
        ];
        for (state, name) in MigState::ALL.into_iter().zip(names) {
            assert_eq!(state.to_string(), name);
            assert_eq!(name.parse::<MigState>(), Ok(state));
            assert_eq!(name.to_lowercase().parse::<MigState>(), Ok(state));
            assert_eq!(
                format!("VFIO_DEVICE_STATE_{name}").parse::<MigState>(),
                Ok(state)
            );
        }
        assert!(matches!(
            "PAUSED".parse::<MigState>(),
            Err(FsmError::UnknownStateName { .. })
        ));
    }

    #[test]
    fn flags_without_stop_copy_are_refused() {
        for bits in [0, 2, 4, 6] {
            assert_eq!(MigFlags::new(bits), Err(FsmError::MissingStopCopy { bits }));
        }
    }

    #[test]
    fn flags_with_unknown_bits_are_refused() {
        for bits in [8, 0xf, 1 << 32 | 1, u64::MAX] {
            let err = MigFlags::new(bits).unwrap_err();
            assert!(matches!(err, FsmError::UnknownFlags { .. }), "{bits:#x}");
            assert_eq!(err.errno(), EINVAL);
        }
    }

    #[test]
    fn the_four_valid_flag_sets_construct_and_display() {
        let want = [
            (7, "STOP_COPY|P2P|PRE_COPY"),
            (3, "STOP_COPY|P2P"),
            (5, "STOP_COPY|PRE_COPY"),
            (1, "STOP_COPY"),
        ];
        for (set, (bits, name)) in MigFlags::ALL_SETS.into_iter().zip(want) {
            assert_eq!(MigFlags::new(bits), Ok(set));
            assert_eq!(MigFlags::try_from(bits), Ok(set));
            assert_eq!(set.to_string(), name);
        }
    }

    #[test]
    fn supported_states_follow_state_flags_table() {
        let counts = [7, 5, 5, 4];
        for (flags, n) in MigFlags::ALL_SETS.into_iter().zip(counts) {
            assert_eq!(flags.states().count(), n, "{flags}");
            assert!(!flags.supports(MigState::Error));
        }
        let sc = MigFlags::new(1).unwrap();
        assert!(!sc.supports(MigState::RunningP2p));
        assert!(!sc.supports(MigState::PreCopy));
        let pc = MigFlags::new(5).unwrap();
        assert!(pc.supports(MigState::PreCopy));
        assert!(!pc.supports(MigState::PreCopyP2p));
    }

    #[test]
    fn raw_table_keeps_states_fixed_and_error_absorbing() {
        for s in MigState::ALL {
            assert_eq!(RAW_NEXT[s.idx()][s.idx()], s, "diagonal {s}");
            assert_eq!(RAW_NEXT[MigState::Error.idx()][s.idx()], MigState::Error);
            assert_eq!(RAW_NEXT[s.idx()][MigState::Error.idx()], MigState::Error);
        }
        // The two cells behind the infinite loop.
        assert_eq!(RAW_NEXT[A_SC.idx()][A_PC.idx()], MigState::Error);
        assert_eq!(RAW_NEXT[A_SC.idx()][A_PCP.idx()], MigState::Error);
    }

    #[test]
    fn stop_copy_to_pre_copy_stops_at_error_sentinel() {
        for flags in [MigFlags::new(7).unwrap(), MigFlags::new(5).unwrap()] {
            assert_eq!(
                next_step(A_SC, A_PC, flags),
                Err(FsmError::NoArc {
                    cur: A_SC,
                    target: A_PC
                })
            );
        }
    }

    #[test]
    fn skip_loop_is_bounded_even_for_a_cyclic_table() {
        // A corrupted table in which two unsupported states point at each
        // other: the unfixed kernel loop would spin; this must not.
        let mut table = RAW_NEXT;
        table[A_STOP.idx()][A_RUN.idx()] = A_RP2P;
        table[A_RP2P.idx()][A_RUN.idx()] = A_PCP;
        table[A_PCP.idx()][A_RUN.idx()] = A_RP2P;
        let flags = MigFlags::new(1).unwrap();
        assert_eq!(
            next_step_in(&table, A_STOP, A_RUN, flags),
            Err(FsmError::NoProgress {
                cur: A_STOP,
                target: A_RUN,
                limit: NR_STATES
            })
        );
    }

    #[test]
    fn path_walk_is_bounded_even_for_a_cyclic_table() {
        // Supported states bouncing between each other without reaching the target.
        let mut table = RAW_NEXT;
        table[A_STOP.idx()][A_RES.idx()] = A_RUN;
        table[A_RUN.idx()][A_RES.idx()] = A_STOP;
        let flags = MigFlags::new(1).unwrap();
        assert_eq!(
            path_in(&table, A_STOP, A_RES, flags),
            Err(FsmError::NoProgress {
                cur: A_STOP,
                target: A_RES,
                limit: NR_STATES
            })
        );
    }

    #[test]
    fn arc_counts_per_flag_set() {
        let counts = [15, 8, 9, 6];
        for (flags, n) in MigFlags::ALL_SETS.into_iter().zip(counts) {
            let list = arcs(flags);
            assert_eq!(list.len(), n, "{flags}");
            let unique: HashSet<_> = list.iter().copied().collect();
            assert_eq!(unique.len(), n, "duplicate arc under {flags}");
            for (from, to) in list {
                assert!(flags.supports(from) && flags.supports(to), "{from}->{to}");
                assert_ne!(from, to);
            }
        }
    }

    #[test]
    fn path_steps_are_exactly_the_arcs() {
        for flags in MigFlags::ALL_SETS {
            let mut used = HashSet::new();
            for cur in flags.states() {
                for target in flags.states() {
                    let Ok(steps) = path(cur, target, flags) else {
                        continue;
                    };
                    let mut at = cur;
                    for s in steps {
                        assert!(is_arc(at, s, flags), "{at}->{s} under {flags}");
                        used.insert((at, s));
                        at = s;
                    }
                }
            }
            let all: HashSet<_> = arcs(flags).into_iter().collect();
            assert_eq!(used, all, "{flags}");
        }
    }

    #[test]
    fn only_the_first_step_of_a_walk_can_be_refused() {
        for flags in MigFlags::ALL_SETS {
            for cur in MigState::ALL {
                for target in MigState::ALL {
                    if cur == target {
                        continue;
                    }
                    match (next_step(cur, target, flags), path(cur, target, flags)) {
                        (Ok(first), Ok(p)) => assert_eq!(p.first(), Some(&first)),
                        (Err(a), Err(b)) => assert_eq!(a, b),
                        (a, b) => panic!("{cur}->{target} {flags}: {a:?} vs {b:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn every_refusal_is_einval() {
        let flags = MigFlags::MLX5VF;
        let errs = [
            path(MigState::Error, A_RUN, flags).unwrap_err(),
            path(A_RUN, MigState::Error, flags).unwrap_err(),
            path(A_SC, A_PCP, flags).unwrap_err(),
            path(A_RUN, A_PC, MigFlags::new(3).unwrap()).unwrap_err(),
        ];
        for e in errs {
            assert_eq!(e.errno(), EINVAL, "{e}");
        }
    }
}
