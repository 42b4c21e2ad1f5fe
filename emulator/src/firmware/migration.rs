//! SUSPEND_VHCA, RESUME_VHCA, QUERY_VHCA_MIGRATION_STATE, SAVE_VHCA_STATE and
//! LOAD_VHCA_STATE (kernel-mlx5vf.md §3.2–3.4, §4), and the per-function migration
//! state they drive.
//!
//! The commands run on the PF and name a VF by `vhca_id`; a VF naming any function, or
//! the PF naming itself, gets BAD_PARAM. They reach the VF only through
//! [`Peer`](super::Peer), and run in phases: the PF's firmware lock is taken to check
//! the command and translate its buffer, released while the VF drains, while device
//! memory is copied and while the image crosses DMA, and the result is committed after
//! checking again that the VF was not reset (or, for LOAD, resumed) meanwhile. So the
//! PF executes commands on its other slots the whole time. Two SUSPEND/RESUME/SAVE/LOAD
//! for one VF do not overlap: the second completes with RES_BUSY
//! ([`mig_syndrome::BUSY`]). The VF's locks are taken briefly, never across a DMA.
//!
//! # Suspend and resume
//!
//! ```text
//!  Running --SUSPEND(0 initiator)--> InitiatorSuspended --SUSPEND(1 responder)--> ResponderSuspended
//!     ^                                |      ^                                        |
//!     +-------RESUME(1 initiator)------+      +----------RESUME(0 responder)-----------+
//! ```
//!
//! Any other order completes with BAD_RES_STATE.
//!
//! * Initiator suspend (VFIO RUNNING_P2P) stops the function initiating new P2P DMA. Its
//!   own command queue keeps running: see `Function::suspend_initiator` for why.
//! * Responder suspend (VFIO STOP) completes only once the function's state can no
//!   longer change: new changes are refused from the start of the command, and the
//!   command waits ([`DRAIN_TIMEOUT`] at most, else INT_ERR and back to initiator
//!   suspend) for the ones admitted before, including command work queued on the
//!   function's firmware, to finish ([`Peer::freeze`]). A refused change
//!   (BAR2 write, queue-address register write, command or UAR doorbell) is recorded as
//!   a [`Violation`]. A refused command doorbell leaves its slots hardware-owned and is
//!   rung at RESUME_VHCA(responder) (`Function::command_doorbell`).
//!
//! # Save sessions
//!
//! A SAVE with `incremental` = 0 writes a *base* image and opens a save session: from
//! then on device-memory pages are compared with what the session has sent
//! ([`crate::devmem`]). SAVE with `incremental` = 1 writes a *delta* of the session
//! (the HCA state and objects in full, the pages that changed). Which calls are legal:
//!
//! | incremental | set_track | Running / InitiatorSuspended        | ResponderSuspended |
//! |---|---|---|---|
//! | 0 | 1 | base image, tracked session (pre-copy start) | BAD_RES_STATE |
//! | 0 | 0 | with a tracked session: ends it, writes nothing (mlx5vf's pre-copy cleanup); else BAD_RES_STATE | base image (stop-copy) |
//! | 1 | 1 | delta (pre-copy round); no session: BAD_RES_STATE | BAD_RES_STATE |
//! | 1 | 0 | delta; no session: BAD_RES_STATE | delta (final image, or the next chunk) |
//!
//! A SAVE writes at most `size` bytes. Pages that do not fit stay dirty: a tracked
//! session sends them in a later round, and in chunk mode (QUERY's `chunk` bit)
//! `next_required_umem_size` asks for the next chunk, which the driver fetches with
//! `incremental` = 1. Without chunk mode an untracked SAVE that does not fit fails
//! (BAD_PARAM) and changes nothing. A session without tracking ends when all is sent.
//!
//! # Loading
//!
//! LOAD is legal only while the function is responder-suspended. The image is read
//! from the buffer in pieces, never copied whole ([`crate::state::Staged`]): its
//! framing and small sections first, checked, with the firmware state built aside from
//! them ([`Firmware::from_image`] reruns the live commands' checks); then the pages,
//! each written into device memory as it passes while the checksum is summed, all of
//! them undone unless the whole image checks out ([`crate::devmem::Staging`]). Only
//! then is the firmware state swapped in under the lock. A base image may come at any time; a
//! delta must follow the image it was made against (multi-load), else BAD_RES_STATE.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mlx5_prm::cmd::caps::{HCA_CAP_MSG_OFFSET, SET_HCA_CAP_IN_LEN};
use mlx5_prm::cmd::hca::{SET_ISSI_IN_CURRENT_ISSI, SET_ISSI_IN_LEN};
use mlx5_prm::cmd::migration::*;
use mlx5_prm::cmd::pd_mkey::mkey_to_index;
use mlx5_prm::ifc::{self, hdr, set};
use mlx5_prm::{CmdStatus, Opcode};

use super::pd_mkey::Mkey;
use super::{Cmd, CmdFail, CmdResult, Env, Firmware, FunctionId, FwCell, HcaState, Peer};
use crate::pci::FunctionKind;
use crate::state::{
    self, HcaImage, ImageFunction, ImageHeader, ImageKind, ObjectsImage, StateError,
};

/// Syndromes of the migration commands (the high half spells "MG").
pub mod mig_syndrome {
    /// The command is not legal in the function's migration state (BAD_RES_STATE).
    pub const WRONG_MIG_STATE: u32 = 0x4d47_0001;
    /// A delta image that does not follow the last image loaded (BAD_RES_STATE).
    pub const OUT_OF_ORDER: u32 = 0x4d47_0002;
    /// The image failed validation (BAD_PARAM); the trace says why.
    pub const BAD_IMAGE: u32 = 0x4d47_0003;
    /// The image's checksum does not match (BAD_PARAM).
    pub const BAD_CHECKSUM: u32 = 0x4d47_0004;
    /// The image is for another kind of function or device-memory size (BAD_PARAM).
    pub const INCOMPATIBLE: u32 = 0x4d47_0005;
    /// The buffer is too small for the image (BAD_PARAM).
    pub const BUFFER_TOO_SMALL: u32 = 0x4d47_0006;
    /// The mkey does not exist, or va/size lie outside it (BAD_PARAM).
    pub const BAD_MKEY: u32 = 0x4d47_0007;
    /// Reading or writing the buffer faulted (BAD_PARAM).
    pub const DMA_FAULT: u32 = 0x4d47_0008;
    /// `size` is 0 or above the largest image (BAD_PARAM).
    pub const BAD_SIZE: u32 = 0x4d47_0009;
    /// SUSPEND_VHCA(responder): the function's queued work did not drain in time
    /// (INT_ERR); the function stays initiator-suspended.
    pub const DRAIN_TIMEOUT: u32 = 0x4d47_000a;
    /// Another SUSPEND/RESUME/SAVE/LOAD for the same function is executing (RES_BUSY).
    pub const BUSY: u32 = 0x4d47_000b;
    /// LOAD_VHCA_STATE failed after applying part of the image (INT_ERR): the
    /// function holds neither its old state nor the image's (an injected fault).
    pub const LOAD_PARTIAL: u32 = 0x4d47_000c;
}

/// How long SUSPEND_VHCA(responder) waits for the function's admitted work (queued and
/// executing commands, register writes in progress) to drain before it gives up and
/// fails, leaving the function initiator-suspended. Well below the driver's command
/// timeout, so the PF's queue is never stuck behind a VF that does not drain.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a suspend or resume transition of a function did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SuspendError {
    #[error("function is {got:?}, the transition needs {want:?}")]
    WrongState { got: MigState, want: MigState },
    #[error("{inflight} admitted work item(s) did not drain within {DRAIN_TIMEOUT:?}")]
    DrainTimeout { inflight: usize },
    #[error("function was reset while its work drained")]
    Reset,
}

/// Violations kept per function (the oldest are dropped; the total keeps counting).
pub const VIOLATION_LOG_CAPACITY: usize = 1024;

/// The migration state of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigState {
    /// Normal operation.
    Running,
    /// Initiates no new P2P DMA (VFIO RUNNING_P2P); otherwise runs, its command queue
    /// included, and accepts doorbells and writes.
    InitiatorSuspended,
    /// Internal state frozen (VFIO STOP): changes are refused and recorded.
    ResponderSuspended,
}

/// What tried to change a responder-suspended function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// A write to device memory (BAR2).
    DevMemWrite,
    /// The command doorbell (BAR0 `cmd_dbell`).
    CommandDoorbell,
    /// A UAR doorbell (EQ arm / consumer index).
    UarDoorbell,
    /// A write to a BAR0 register that holds state (`cmdq_addr_h`, `cmdq_addr_l_sz`).
    RegisterWrite,
    /// Another function's DMA (peer-to-peer) into device memory (BAR2).
    P2pWrite,
    /// A DMA request of a QP on another function (its writer names the function and
    /// the QP; the address is the request's remote address).
    PeerDma,
}

/// Numbers every violation of the process, in the order they were refused (shared by
/// every function, so the logs of several functions merge into one order).
static VIOLATION_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One refused change (a "P2P race violation").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub kind: ViolationKind,
    /// Who wrote: the socket of the client whose write was refused, or the function
    /// (and QP) whose DMA it was.
    pub writer: String,
    /// The function whose DMA it was (a P2P write), by `vhca_id`.
    pub writer_vhca_id: Option<u16>,
    /// The writer's QP, when a work request of its DMA engine did the write.
    pub qpn: Option<u32>,
    /// The function that refused it.
    pub target_vhca_id: u16,
    /// BAR offset of the write (BAR2 for device memory, BAR0 for registers).
    pub address: u64,
    /// Bytes of the write.
    pub len: u64,
    /// Order among every violation of the adapter (process-wide, from 1).
    pub seq: u64,
    pub at: SystemTime,
}

impl Violation {
    /// A write by a client at BAR `address` of `target_vhca_id` (seq and time are
    /// filled in when it is refused).
    pub fn by_client(
        kind: ViolationKind,
        writer: String,
        target_vhca_id: u16,
        address: u64,
        len: u64,
    ) -> Self {
        Violation {
            kind,
            writer,
            writer_vhca_id: None,
            qpn: None,
            target_vhca_id,
            address,
            len,
            seq: 0,
            at: SystemTime::UNIX_EPOCH,
        }
    }

    /// A P2P write by function `writer_vhca_id` (its QP `qpn`, if an engine wrote) into
    /// device memory of `target_vhca_id` at `address`.
    pub fn p2p(
        writer_vhca_id: u16,
        qpn: Option<u32>,
        target_vhca_id: u16,
        address: u64,
        len: u64,
    ) -> Self {
        let writer = match qpn {
            Some(q) => format!("vhca {writer_vhca_id} QP {q:#x}"),
            None => format!("vhca {writer_vhca_id}"),
        };
        Violation {
            writer_vhca_id: Some(writer_vhca_id),
            qpn,
            ..Violation::by_client(
                ViolationKind::P2pWrite,
                writer,
                target_vhca_id,
                address,
                len,
            )
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "#{} {:?}: {} wrote {:#x} bytes at {:#x} of vhca {} while it was responder-suspended (refused)",
            self.seq, self.kind, self.writer, self.len, self.address, self.target_vhca_id
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SaveSession {
    id: u64,
    /// Number of the last image written in this session.
    seq: u32,
    /// Tracking was asked for (set_track), so the session outlives a complete image.
    track: bool,
    /// [`state::state_digest`] of what the last image carried besides pages.
    sent_state: u64,
}

/// Per-function migration control: the suspend state, the admitted work, the save
/// session, what was loaded, and the violation log. Its lock is a leaf: nothing is taken
/// under it.
#[derive(Debug)]
pub struct MigCtl {
    state: MigState,
    /// Admitted state changes not yet ended (see `Function::admit`).
    inflight: usize,
    /// Command doorbell bits refused while responder-suspended, rung at resume.
    parked: u32,
    session: Option<SaveSession>,
    /// (session, seq) of the last image loaded.
    loaded: Option<(u64, u32)>,
    /// The saver said (QUERY `chunk`) it fetches images in chunks.
    chunk_mode: bool,
    violations: VecDeque<Violation>,
    violations_total: u64,
    /// Limits the warning of a refused write to one a second.
    violation_warnings: vfu::ratelimit::RateLimit,
    /// A SUSPEND, RESUME, SAVE or LOAD naming this function is executing.
    busy: bool,
}

impl Default for MigCtl {
    fn default() -> Self {
        MigCtl {
            state: MigState::Running,
            inflight: 0,
            parked: 0,
            session: None,
            loaded: None,
            chunk_mode: false,
            violations: VecDeque::new(),
            violations_total: 0,
            violation_warnings: vfu::ratelimit::RateLimit::per_second(),
            busy: false,
        }
    }
}

impl MigCtl {
    pub fn state(&self) -> MigState {
        self.state
    }

    /// The recorded violations, oldest first.
    pub fn violations(&self) -> Vec<Violation> {
        self.violations.iter().cloned().collect()
    }

    /// Violations ever recorded (including those dropped from the log).
    pub fn violations_total(&self) -> u64 {
        self.violations_total
    }

    pub(crate) fn set_state(&mut self, state: MigState) {
        self.state = state;
    }

    /// Goes from `from` to `to`, or says why not (an initiator suspend or resume).
    pub fn transition(&mut self, from: MigState, to: MigState) -> Result<(), SuspendError> {
        self.expect(from)?;
        self.state = to;
        Ok(())
    }

    /// Fails with [`SuspendError::WrongState`] unless the state is `want`.
    pub fn expect(&self, want: MigState) -> Result<(), SuspendError> {
        if self.state != want {
            return Err(SuspendError::WrongState {
                got: self.state,
                want,
            });
        }
        Ok(())
    }

    /// RESUME_VHCA(responder): back to InitiatorSuspended; returns the doorbell bits
    /// refused meanwhile (one admitted work item when non-zero; the caller rings them).
    pub fn thaw(&mut self) -> Result<u32, SuspendError> {
        self.transition(MigState::ResponderSuspended, MigState::InitiatorSuspended)?;
        Ok(self.unpark())
    }

    /// Whether a SUSPEND, RESUME, SAVE or LOAD naming this function is executing.
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Admitted changes not yet ended.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Admits a change unless the function is responder-suspended, in which case the
    /// attempt is recorded (numbered and timed) and false returned.
    pub fn admit(&mut self, attempt: Violation) -> bool {
        if self.refuse_if_frozen(attempt) {
            return false;
        }
        self.inflight += 1;
        true
    }

    /// [`MigCtl::admit`] for a command doorbell: a refused one is also parked.
    pub fn admit_doorbell(&mut self, mask: u32, attempt: Violation) -> bool {
        if self.admit(attempt) {
            return true;
        }
        self.parked |= mask;
        false
    }

    /// The sequence number of the last violation recorded here.
    pub fn last_violation_seq(&self) -> Option<u64> {
        self.violations.back().map(|v| v.seq)
    }

    /// Takes the parked doorbell bits; when there are some, they count as one admitted
    /// work item (the caller queues them).
    pub(crate) fn unpark(&mut self) -> u32 {
        let parked = std::mem::take(&mut self.parked);
        if parked != 0 {
            self.inflight += 1;
        }
        parked
    }

    /// Ends one admitted change; true when none is left.
    pub(crate) fn release(&mut self) -> bool {
        debug_assert!(self.inflight > 0, "release without admission");
        self.inflight = self.inflight.saturating_sub(1);
        self.inflight == 0
    }

    /// If the function is responder-suspended, records the write and returns true
    /// (the caller then refuses it).
    fn refuse_if_frozen(&mut self, mut v: Violation) -> bool {
        if self.state != MigState::ResponderSuspended {
            return false;
        }
        v.seq = VIOLATION_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        v.at = SystemTime::now();
        // One line a second at most: a frozen function written to in a loop (a 1 MiB
        // store is 262,144 refused doorbells) logs a count, and keeps every violation
        // in its bounded log.
        vfu::warn_limited!(
            self.violation_warnings,
            seq = v.seq,
            kind = ?v.kind,
            writer = %v.writer,
            writer_vhca_id = v.writer_vhca_id,
            qpn = v.qpn,
            target_vhca_id = v.target_vhca_id,
            address = format_args!("{:#x}", v.address),
            len = v.len,
            total = self.violations_total + 1,
            "P2P race violation: write to a responder-suspended function refused"
        );
        if self.violations.len() >= VIOLATION_LOG_CAPACITY {
            self.violations.pop_front();
        }
        self.violations.push_back(v);
        self.violations_total += 1;
        true
    }

    /// FLR / DEVICE_RESET: running, no session, nothing loaded, no parked doorbell. The
    /// log is kept, and so is the count of admitted work (each item still ends).
    pub fn reset(&mut self) {
        self.state = MigState::Running;
        self.parked = 0;
        self.session = None;
        self.loaded = None;
        self.chunk_mode = false;
    }
}

/// The status a refused suspend or resume completes with: BAD_RES_STATE for the wrong
/// state (mlx5vf's pre-copy logic depends on it) or a reset meanwhile, INT_ERR when the
/// function's work did not drain.
fn suspend_fail(r: &Result<(), SuspendError>) -> Result<(), CmdFail> {
    match r {
        Ok(()) => Ok(()),
        Err(SuspendError::WrongState { .. } | SuspendError::Reset) => Err(bad_res_state()),
        Err(SuspendError::DrainTimeout { .. }) => {
            Err(CmdFail::new(CmdStatus::IntErr, mig_syndrome::DRAIN_TIMEOUT))
        }
    }
}

fn bad_res_state() -> CmdFail {
    CmdFail::new(CmdStatus::BadResStateErr, mig_syndrome::WRONG_MIG_STATE)
}

fn bad(syndrome: u32) -> CmdFail {
    CmdFail::new(CmdStatus::BadParamErr, syndrome)
}

/// The status and syndrome a refused image completes with.
fn image_fail(e: &StateError) -> CmdFail {
    match e {
        StateError::Checksum { .. } => bad(mig_syndrome::BAD_CHECKSUM),
        StateError::DevMemSize { .. } | StateError::FunctionKind { .. } => {
            bad(mig_syndrome::INCOMPATIBLE)
        }
        _ => bad(mig_syndrome::BAD_IMAGE),
    }
}

/// A fresh session id: unique per process and unlikely to repeat across processes.
fn new_session_id(vhca_id: u16) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut b = [0u8; 26];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8..16].copy_from_slice(&t.to_le_bytes());
    b[16..20].copy_from_slice(&std::process::id().to_le_bytes());
    b[20..22].copy_from_slice(&vhca_id.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&b) | 1
}

/// What a SAVE will produce, decided before anything changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SavePlan {
    /// A base image; opens a session (tracked or not).
    Base { track: bool },
    /// A delta of the open session.
    Delta { session: SaveSession, track: bool },
    /// mlx5vf's pre-copy cleanup: end the tracked session, write nothing.
    EndTracking,
}

fn plan_save(ctl: &MigCtl, incremental: bool, track: bool) -> Result<SavePlan, CmdFail> {
    let frozen = ctl.state == MigState::ResponderSuspended;
    match (incremental, track) {
        (false, true) if frozen => Err(bad_res_state()),
        (false, true) => Ok(SavePlan::Base { track: true }),
        (false, false) if frozen => Ok(SavePlan::Base { track: false }),
        (false, false) => match ctl.session {
            Some(s) if s.track => Ok(SavePlan::EndTracking),
            _ => Err(bad_res_state()),
        },
        (true, true) if frozen => Err(bad_res_state()),
        (true, _) => match ctl.session {
            Some(session) => Ok(SavePlan::Delta { session, track }),
            None => Err(bad_res_state()),
        },
    }
}

/// Marks the target of a SAVE or LOAD busy until dropped: phased commands run without
/// the PF's firmware lock, so two transfers for one function are kept apart by this
/// flag instead (the second completes with RES_BUSY; no driver sends two at once).
struct Busy {
    peer: Arc<dyn Peer>,
}

impl Busy {
    fn take(peer: &Arc<dyn Peer>) -> Result<Busy, CmdFail> {
        let mut m = peer.migration();
        if m.busy {
            return Err(CmdFail::new(CmdStatus::ResBusy, mig_syndrome::BUSY));
        }
        m.busy = true;
        Ok(Busy {
            peer: Arc::clone(peer),
        })
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.peer.migration().busy = false;
    }
}

impl Firmware {
    /// The function a migration command names: a VF, named by the PF.
    fn mig_target(&self, env: &dyn Env, cmd: &Cmd<'_>) -> Result<Arc<dyn Peer>, CmdFail> {
        let vhca_id = cmd.get(IN_VHCA_ID) as u16;
        if self.id.kind != FunctionKind::Pf || vhca_id == self.id.vhca_id {
            return Err(CmdFail::bad_function());
        }
        if self.state == HcaState::Disabled {
            return Err(CmdFail::wrong_state());
        }
        env.peer(vhca_id).ok_or_else(CmdFail::bad_function)
    }

    /// The PF's mkey `key` (index and variant must both match).
    fn mig_mkey(&self, key: u32) -> Result<&Mkey, CmdFail> {
        self.mkey(mkey_to_index(key))
            .filter(|m| m.key() == key)
            .ok_or_else(|| bad(mig_syndrome::BAD_MKEY))
    }

    /// The IOVA runs of the PF's buffer: `size` bytes at `va` behind mkey `key`.
    fn mig_runs(&self, va: u64, size: u64, key: u32) -> Result<Vec<(u64, u64)>, CmdFail> {
        self.mig_mkey(key)?
            .translate(va, size)
            .map_err(|_| bad(mig_syndrome::BAD_MKEY))
    }
}

/// SUSPEND_VHCA. The PF's firmware lock is taken only to find the target; the
/// responder suspend's drain (up to [`DRAIN_TIMEOUT`]) waits with no lock held, so the
/// PF keeps executing commands on its other slots.
pub(super) fn suspend_vhca(cell: &FwCell, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
    let out = cmd.lengths(SUSPEND_VHCA_IN_LEN, SUSPEND_VHCA_OUT_LEN)?;
    let f = cell.lock().mig_target(env, cmd)?;
    let op_mod = SuspendOpMod::try_from(cmd.op_mod).map_err(|_| CmdFail::bad_op_mod())?;
    let _busy = Busy::take(&f)?;
    let from = f.migration().state();
    let done = match op_mod {
        SuspendOpMod::Initiator => f.suspend_initiator(),
        SuspendOpMod::Responder => f.freeze(DRAIN_TIMEOUT),
    };
    suspend_fail(&done)?;
    tracing::info!(vhca_id = f.id().vhca_id, ?from, to = ?f.migration().state(), "SUSPEND_VHCA");
    Ok(out)
}

/// RESUME_VHCA. Rings the doorbells the target refused while frozen with no lock held.
pub(super) fn resume_vhca(cell: &FwCell, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
    let out = cmd.lengths(RESUME_VHCA_IN_LEN, RESUME_VHCA_OUT_LEN)?;
    let f = cell.lock().mig_target(env, cmd)?;
    let op_mod = ResumeOpMod::try_from(cmd.op_mod).map_err(|_| CmdFail::bad_op_mod())?;
    let _busy = Busy::take(&f)?;
    let from = f.migration().state();
    let done = match op_mod {
        ResumeOpMod::Responder => f.thaw(),
        ResumeOpMod::Initiator => f.resume_initiator(),
    };
    suspend_fail(&done)?;
    tracing::info!(vhca_id = f.id().vhca_id, ?from, to = ?f.migration().state(), "RESUME_VHCA");
    Ok(out)
}

/// QUERY_VHCA_MIGRATION_STATE. Scanning device memory takes no firmware lock.
pub(super) fn query_vhca_migration_state(cell: &FwCell, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
    let mut out = cmd.lengths(
        QUERY_VHCA_MIGRATION_STATE_IN_LEN,
        QUERY_VHCA_MIGRATION_STATE_OUT_LEN,
    )?;
    if cmd.op_mod != 0 {
        return Err(CmdFail::bad_op_mod());
    }
    let f = cell.lock().mig_target(env, cmd)?;
    let incremental = cmd.get(QUERY_VHCA_MIGRATION_STATE_IN_INCREMENTAL) != 0;
    let chunk = cmd.get(QUERY_VHCA_MIGRATION_STATE_IN_CHUNK) != 0;
    let (session, frozen) = {
        let mut m = f.migration();
        m.chunk_mode = chunk;
        (m.session, m.state == MigState::ResponderSuspended)
    };
    let (hca, objects) = {
        let fw = f.firmware();
        (fw.image_hca(), fw.image_objects())
    };
    let objects_len = state::objects_len(&objects);
    // incremental: what a delta of the open session would carry now; otherwise what
    // a base image would (pages that are not all zeros).
    // Counted in place from the tracking state: nothing is copied.
    let pages = if incremental && session.is_some() {
        f.devmem().count_dirty()
    } else {
        f.devmem().count_nonzero()
    };
    // A running function with nothing changed since the last pre-copy image (no page,
    // no object, no register) has nothing to send: an idle function converges. A
    // frozen one always gets its final delta (stop-copy needs an image).
    let unchanged =
        || session.is_some_and(|s| s.sent_state == state::state_digest(&hca, &f.iseg(), &objects));
    let (required, remaining, mig_state) = if incremental && session.is_none() {
        (0, 0, VhcaMigrationState::OperMigrationIdle)
    } else if incremental && !frozen && pages == 0 && unchanged() {
        (0, 0, VhcaMigrationState::OperMigrationReady)
    } else {
        let total = state::image_len(objects_len, pages);
        // Chunking is a stop-copy matter, as in mlx5vf: a pre-copy SAVE (the function
        // still running) carries the whole base image or delta, so the driver counts
        // the first one as the initial bytes and an idle function converges in a
        // round; only a frozen function's image comes in MAX_CHUNK_SIZE pieces.
        let per_chunk = if chunk && frozen {
            total.min(MAX_CHUNK_SIZE as usize)
        } else {
            total
        };
        let st = match session {
            None => VhcaMigrationState::OperMigrationIdle,
            Some(_) if pages > 0 => VhcaMigrationState::OperMigrationDirty,
            Some(_) => VhcaMigrationState::OperMigrationReady,
        };
        (per_chunk, total, st)
    };
    set(
        &mut out,
        QUERY_VHCA_MIGRATION_STATE_OUT_REQUIRED_UMEM_SIZE,
        required as u64,
    );
    set(
        &mut out,
        QUERY_VHCA_MIGRATION_STATE_OUT_REMAINING_TOTAL_SIZE,
        remaining as u64,
    );
    set(
        &mut out,
        QUERY_VHCA_MIGRATION_STATE_OUT_MIGRATION_STATE,
        u64::from(u8::from(mig_state)),
    );
    tracing::debug!(
        vhca_id = f.id().vhca_id,
        incremental,
        chunk,
        required,
        remaining,
        "QUERY_VHCA_MIGRATION_STATE"
    );
    Ok(out)
}

/// SAVE_VHCA_STATE in three phases: check the command and find the buffer under the
/// PF's firmware lock; snapshot the target (each piece under its own short lock), copy
/// its device memory and DMA-write the image with no lock held; commit the session
/// under the target's migration lock, unless the target was reset meanwhile.
pub(super) fn save_vhca_state(cell: &FwCell, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
    let mut out = cmd.lengths(SAVE_VHCA_STATE_IN_LEN, SAVE_VHCA_STATE_OUT_LEN)?;
    if cmd.op_mod != 0 {
        return Err(CmdFail::bad_op_mod());
    }
    let incremental = cmd.get(SAVE_VHCA_STATE_IN_INCREMENTAL) != 0;
    let track = cmd.get(SAVE_VHCA_STATE_IN_SET_TRACK) != 0;
    let va = cmd.get(SAVE_VHCA_STATE_IN_VA);
    let size = cmd.get(SAVE_VHCA_STATE_IN_SIZE);
    let key = cmd.get(SAVE_VHCA_STATE_IN_MKEY) as u32;
    let f = cell.lock().mig_target(env, cmd)?;
    let _busy = Busy::take(&f)?;
    let epoch = f.epoch();
    let (plan, chunk_mode) = {
        let m = f.migration();
        (plan_save(&m, incremental, track)?, m.chunk_mode)
    };
    if plan == SavePlan::EndTracking {
        f.migration().session = None;
        f.devmem().end_session();
        tracing::info!(vhca_id = f.id().vhca_id, "SAVE_VHCA_STATE: tracking ended");
        return Ok(out);
    }
    if size == 0 {
        return Err(bad(mig_syndrome::BAD_SIZE));
    }
    let runs = cell.lock().mig_runs(va, size, key)?;
    // The function's state, each piece taken under its own short lock.
    let (hca, objects) = {
        let fw = f.firmware();
        (fw.image_hca(), fw.image_objects())
    };
    let iseg = f.iseg();
    let objects_len = state::objects_len(&objects);
    let fixed = state::image_len(objects_len, 0);
    let size = size as usize; // 32-bit field
    if size < fixed {
        return Err(bad(mig_syndrome::BUFFER_TOO_SMALL));
    }
    // Only a tracked session (later rounds) or a chunked fetch carries the rest.
    let keeps_track = matches!(plan, SavePlan::Base { track: true })
        || matches!(plan, SavePlan::Delta { track: true, .. });
    let (kind, session_id, seq, base_seq) = match plan {
        SavePlan::Base { .. } => (ImageKind::Base, new_session_id(f.id().vhca_id), 1, 0),
        SavePlan::Delta { session, .. } => (
            ImageKind::Delta,
            session.id,
            session.seq.checked_add(1).ok_or_else(bad_res_state)?,
            session.seq,
        ),
        // Returned above, before any image is built.
        SavePlan::EndTracking => return Ok(out),
    };
    let header = ImageHeader {
        function: image_function(f.id()),
        kind,
        session: session_id,
        seq,
        base_seq,
        dev_mem_size: f.devmem().size(),
    };
    // The pages this image carries, in page order, from `from`: a frozen function's
    // next chunk takes what the last chunk left, without another pass over device
    // memory (nothing can change it meanwhile).
    let frozen = f.migration().state == MigState::ResponderSuspended;
    let (list, from) = f.devmem().save_list(kind == ImageKind::Base, frozen);
    let want = list.len() - from;
    let fit = state::pages_fitting(objects_len, size).min(want);
    let remaining = want - fit;
    if remaining > 0 && !keeps_track && !chunk_mode {
        return Err(bad(mig_syndrome::BUFFER_TOO_SMALL));
    }
    // The digests of the pages as sent become the session's baseline. A save after
    // which the session ends (stop-copy, all of it fitting) needs none, and neither
    // does a frozen function's chunk (the next chunk takes the list's rest).
    let mut sent = Vec::new();
    let digests = keeps_track || (remaining > 0 && !frozen);
    // In place from device memory: each page copied once, into the buffer's run,
    // straight through the MTT, and digested when the session goes on.
    let image_len = f.devmem().with_pages(&list[from..from + fit], |pages| {
        let parts = state::ImageParts {
            header: &header,
            hca: &hca,
            iseg: &iseg,
            objects: &objects,
            pages,
        };
        let mut sink = RunSink::new(env, &runs);
        let run = if sink.in_place() {
            state::DIRECT_RUN
        } else {
            state::ENCODE_RUN
        };
        state::encode_into(&parts, digests.then_some(&mut sent), run, &mut sink)
    })?;
    if frozen && remaining > 0 {
        f.devmem().keep_rest(list, from + fit);
    }
    // The image is in the buffer: now the session moves on, unless the function was
    // reset while the image was built (its session is gone, and so is what was sent).
    if f.epoch() != epoch {
        tracing::info!(
            vhca_id = f.id().vhca_id,
            "SAVE_VHCA_STATE: function reset meanwhile"
        );
        return Err(bad_res_state());
    }
    let track_on = keeps_track;
    let open = track_on || remaining > 0;
    if kind == ImageKind::Base {
        f.devmem().begin_session();
    }
    f.devmem().commit(sent);
    if !open {
        f.devmem().end_session();
    }
    f.migration().session = open.then_some(SaveSession {
        id: session_id,
        seq,
        track: track_on,
        sent_state: state::state_digest(&hca, &iseg, &objects),
    });
    let next = if remaining > 0 && chunk_mode {
        state::image_len(objects_len, remaining)
            .min(size)
            .max(state::image_len(objects_len, 1))
    } else {
        0
    };
    set(
        &mut out,
        SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE,
        image_len as u64,
    );
    set(
        &mut out,
        SAVE_VHCA_STATE_OUT_NEXT_REQUIRED_UMEM_SIZE,
        next as u64,
    );
    tracing::info!(
        vhca_id = f.id().vhca_id,
        ?kind,
        seq,
        incremental,
        track,
        image = image_len,
        pages = fit,
        pages_left = remaining,
        next,
        "SAVE_VHCA_STATE"
    );
    Ok(out)
}

/// LOAD_VHCA_STATE in three phases: check and find the buffer under the PF's firmware
/// lock; read and validate the whole image with no lock held; apply it, after checking
/// again that the target is still responder-suspended and was not reset meanwhile.
pub(super) fn load_vhca_state(cell: &FwCell, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
    let out = cmd.lengths(LOAD_VHCA_STATE_IN_LEN, LOAD_VHCA_STATE_OUT_LEN)?;
    if cmd.op_mod != 0 {
        return Err(CmdFail::bad_op_mod());
    }
    let f = cell.lock().mig_target(env, cmd)?;
    let _busy = Busy::take(&f)?;
    let epoch = f.epoch();
    if f.migration().state != MigState::ResponderSuspended {
        return Err(bad_res_state());
    }
    let va = cmd.get(LOAD_VHCA_STATE_IN_VA);
    let size = cmd.get(LOAD_VHCA_STATE_IN_SIZE);
    let key = cmd.get(LOAD_VHCA_STATE_IN_MKEY) as u32;
    if size == 0 || size > state::MAX_IMAGE_LEN as u64 {
        return Err(bad(mig_syndrome::BAD_SIZE));
    }
    let runs = cell.lock().mig_runs(va, size, key)?;
    let len = size as usize; // at most MAX_IMAGE_LEN
    let mut src = RunSource::new(env, &runs);
    let id = f.id();
    let refused = |e: &StateError| {
        tracing::info!(vhca_id = id.vhca_id, error = %e, "LOAD_VHCA_STATE: image refused");
        image_fail(e)
    };
    let staged = state::Staged::open(len, &mut |at: usize, buf: &mut [u8]| src.read(at, buf))
        .map_err(|e| stream_fail(id, e))?;
    let h = staged.header;
    let new_fw = check_compatible(id, f.devmem().size(), &h)
        .and_then(|()| Firmware::from_image(env, id, &staged.hca, &staged.objects))
        .map_err(|e| refused(&e))?;
    let still_ours = |f: &Arc<dyn Peer>| {
        let m = f.migration();
        if m.state != MigState::ResponderSuspended || f.epoch() != epoch {
            tracing::info!(
                vhca_id = id.vhca_id,
                "LOAD_VHCA_STATE: function resumed or reset meanwhile"
            );
            return Err(bad_res_state());
        }
        if h.kind == ImageKind::Delta && m.loaded != Some((h.session, h.base_seq)) {
            tracing::info!(
                vhca_id = id.vhca_id,
                seq = h.seq,
                base_seq = h.base_seq,
                loaded = ?m.loaded,
                "LOAD_VHCA_STATE: delta does not follow the last image loaded"
            );
            return Err(CmdFail::new(
                CmdStatus::BadResStateErr,
                mig_syndrome::OUT_OF_ORDER,
            ));
        }
        Ok(())
    };
    // From the last check to the end of the apply no reset of the target can come in
    // between: an FLR waits, then wipes the whole image, never half of it.
    let _no_reset = f.hold_reset();
    still_ours(&f)?;
    // The pages go into device memory as the image streams past (read once, summed
    // and checked on the way); until the checksum and the last entry check out they
    // can all be undone: dropping `staging` puts device memory back as it was.
    let mut staging = f.devmem().stage();
    // The fault plan's LOAD that dies part-way keeps only the first half of the pages.
    let keep = if crate::fault::load_must_fail() {
        staged.pages / 2
    } else {
        usize::MAX
    };
    let mut seen = 0usize;
    let pages = staged
        .pages(&mut src, |batch| {
            let n = keep.saturating_sub(seen).min(batch.len());
            staging.put_all(&batch[..n]);
            seen += batch.len();
        })
        .map_err(|e| stream_fail(id, e))?;
    if f.epoch() != epoch {
        // Reset meanwhile: device memory is zeros now, and must stay so.
        staging.discard();
        tracing::info!(
            vhca_id = id.vhca_id,
            "LOAD_VHCA_STATE: function reset meanwhile"
        );
        return Err(bad_res_state());
    }
    still_ours(&f)?;
    // Everything is checked: apply. Nothing below can fail. The function is frozen
    // and this command holds it busy, so nothing else changes it.
    f.install_firmware(new_fw);
    f.load_iseg(&staged.iseg);
    staging.commit(h.kind == ImageKind::Base);
    if keep != usize::MAX {
        // The firmware state is in, half of the device memory (a base image's
        // clearing included) and no session record.
        f.migration().loaded = None;
        tracing::warn!(
            vhca_id = id.vhca_id,
            applied = keep,
            pages,
            "LOAD_VHCA_STATE failed part-way (fault plan)"
        );
        return Err(CmdFail::new(CmdStatus::IntErr, mig_syndrome::LOAD_PARTIAL));
    }
    f.migration().loaded = Some((h.session, h.seq));
    tracing::info!(
        vhca_id = id.vhca_id,
        kind = ?h.kind,
        seq = h.seq,
        image = len,
        pages,
        "LOAD_VHCA_STATE applied"
    );
    Ok(out)
}

/// What a LOAD completes with when its image was refused or its buffer faulted.
fn stream_fail(id: FunctionId, e: state::StreamError<CmdFail>) -> CmdFail {
    match e {
        state::StreamError::Read(fail) => fail,
        state::StreamError::Image(e) => {
            tracing::info!(vhca_id = id.vhca_id, error = %e, "LOAD_VHCA_STATE: image refused");
            image_fail(&e)
        }
    }
}

impl Firmware {
    /// The HCA section of this function's image.
    pub fn image_hca(&self) -> HcaImage {
        HcaImage {
            life_cycle: self.state,
            issi: self.issi,
            caps: self.general_cur.clone(),
        }
    }

    /// The OBJECTS section of this function's image.
    pub fn image_objects(&self) -> ObjectsImage {
        ObjectsImage {
            uars: self.uars.iter().copied().collect(),
            pds: self.pds.iter().copied().collect(),
            cmd_eq: self.cmd_eq,
            eqs: self.eqs.values().cloned().collect(),
            mkeys: self.mkeys.values().cloned().collect(),
            fw_pages: self.pages.iter().copied().collect(),
            cqs: self.cqs.values().cloned().collect(),
            qps: self.qps.values().cloned().collect(),
        }
    }

    /// Builds (aside) the firmware state of function `id` from an image's HCA and
    /// OBJECTS sections. [`state::validate`] has run every value through the live
    /// commands' validators ([`super::checks`]), so only the ISSI and the GENERAL page
    /// can still be refused here: they go in through SET_ISSI and SET_HCA_CAP themselves.
    pub fn from_image(
        env: &dyn Env,
        id: FunctionId,
        hca: &HcaImage,
        o: &ObjectsImage,
    ) -> Result<Firmware, StateError> {
        let bv = |what, got: u64, want| StateError::BadValue { what, got, want };
        let mut fw = Firmware::new(id);
        // ISSI and caps through the live commands (legal in the Enabled state).
        fw.state = HcaState::Enabled;
        let mut m = vec![0u8; SET_ISSI_IN_LEN];
        ifc::set(&mut m, hdr::OPCODE, u64::from(u16::from(Opcode::SetIssi)));
        ifc::set(&mut m, SET_ISSI_IN_CURRENT_ISSI, u64::from(hca.issi));
        fw.set_issi(&Cmd::new(&m, 16))
            .map_err(|_| bv("issi", hca.issi.into(), "a supported ISSI"))?;
        // op_mod 0: the GENERAL page (SET_HCA_CAP takes no mode bit).
        let mut m = vec![0u8; SET_HCA_CAP_IN_LEN];
        ifc::set(&mut m, hdr::OPCODE, u64::from(u16::from(Opcode::SetHcaCap)));
        m[HCA_CAP_MSG_OFFSET..].copy_from_slice(&hca.caps);
        fw.set_hca_cap(env, &Cmd::new(&m, 16))
            .map_err(|_| bv("GENERAL caps", 0, "values SET_HCA_CAP accepts"))?;
        fw.state = hca.life_cycle;
        fw.pages = o.fw_pages.iter().copied().collect();
        fw.uars = o.uars.iter().copied().collect();
        fw.pds = o.pds.iter().copied().collect();
        fw.eqs = o.eqs.iter().map(|e| (e.eqn, e.clone())).collect();
        fw.cmd_eq = o.cmd_eq;
        fw.mkeys = o.mkeys.iter().map(|m| (m.index, m.clone())).collect();
        fw.cqs = o.cqs.iter().map(|c| (c.cqn, c.clone())).collect();
        fw.qps = o.qps.iter().map(|q| (q.qpn, q.clone())).collect();
        Ok(fw)
    }
}

fn image_function(id: FunctionId) -> ImageFunction {
    match id.kind {
        FunctionKind::Pf => ImageFunction::Pf,
        FunctionKind::Vf => ImageFunction::Vf,
    }
}

fn check_compatible(id: FunctionId, dev_mem_size: u64, h: &ImageHeader) -> Result<(), StateError> {
    let mine = image_function(id);
    if h.function != mine {
        return Err(StateError::FunctionKind {
            image: h.function.name(),
            function: mine.name(),
        });
    }
    if h.dev_mem_size != dev_mem_size {
        return Err(StateError::DevMemSize {
            image: h.dev_mem_size,
            function: dev_mem_size,
        });
    }
    Ok(())
}

/// Bytes of the buffer a SAVE holds mapped at a time while it writes in place (a
/// [`vfu::Direct`] piece; an unmap of the window waits for it).
const DIRECT_PIECE: usize = 1 << 20;

/// Writes an image in order across the IOVA runs of its buffer: in place into the
/// client's mapping where the buffer is memory the client shared (non-temporal stores,
/// no bounce copy), through [`Env::dma_write`] elsewhere.
struct RunSink<'a> {
    env: &'a dyn Env,
    runs: &'a [(u64, u64)],
    /// The run being filled, and the bytes of it already written.
    run: usize,
    off: u64,
    /// The piece of the buffer being written in place, and the bytes of it written.
    piece: Option<(vfu::Direct, usize)>,
}

impl<'a> RunSink<'a> {
    fn new(env: &'a dyn Env, runs: &'a [(u64, u64)]) -> Self {
        RunSink {
            env,
            runs,
            run: 0,
            off: 0,
            piece: None,
        }
    }

    /// Whether the buffer's first bytes can be written in place (then the image is
    /// encoded in [`state::DIRECT_RUN`] runs, else in [`state::ENCODE_RUN`] ones).
    fn in_place(&self) -> bool {
        self.runs
            .first()
            .is_some_and(|&(iova, _)| matches!(self.env.dma_direct(iova, 1, true), Ok(Some(_))))
    }

    fn fault(at: u64, e: &vfu::DmaError) -> CmdFail {
        tracing::info!(iova = at, error = %e, "SAVE_VHCA_STATE: buffer write faulted");
        bad(mig_syndrome::DMA_FAULT)
    }

    fn put(&mut self, mut b: &[u8]) -> Result<(), CmdFail> {
        while !b.is_empty() {
            let Some(&(iova, len)) = self.runs.get(self.run) else {
                return Err(bad(mig_syndrome::BUFFER_TOO_SMALL));
            };
            let at = iova + self.off;
            let left = (len - self.off) as usize;
            if self.piece.as_ref().is_none_or(|(d, used)| *used == d.len()) {
                self.piece = None;
                let d = self.env.dma_direct(at, left.min(DIRECT_PIECE), true);
                self.piece = d.map_err(|e| Self::fault(at, &e))?.map(|d| (d, 0));
            }
            let n = match &mut self.piece {
                Some((d, used)) => {
                    let n = (d.len() - *used).min(b.len());
                    d.write(*used, &b[..n]);
                    *used += n;
                    n
                }
                None => {
                    let n = left.min(b.len());
                    self.env
                        .dma_write(at, &b[..n])
                        .map_err(|e| Self::fault(at, &e))?;
                    n
                }
            };
            b = &b[n..];
            self.off += n as u64;
            if self.off == len {
                self.run += 1;
                self.off = 0;
            }
        }
        Ok(())
    }
}

impl state::ImageSink for RunSink<'_> {
    type Error = CmdFail;

    fn put(&mut self, b: &[u8]) -> Result<(), CmdFail> {
        RunSink::put(self, b)
    }

    fn in_place(&self) -> bool {
        RunSink::in_place(self)
    }

    /// In place when the next 12 KiB lie in one run the client shared, 32-byte
    /// aligned (a page-aligned buffer: the pages start on 4 KiB image offsets).
    fn put_pages3(&mut self, pages: [&[u8]; 3]) -> Result<Option<[u32; 3]>, CmdFail> {
        let n = 3 * state::sum::BLOCK;
        if !state::sum::can_copy3() {
            return Ok(None);
        }
        let Some(&(iova, len)) = self.runs.get(self.run) else {
            return Err(bad(mig_syndrome::BUFFER_TOO_SMALL));
        };
        let at = iova + self.off;
        let left = (len - self.off) as usize;
        if left < n || !at.is_multiple_of(32) {
            return Ok(None);
        }
        if self
            .piece
            .as_ref()
            .is_none_or(|(d, used)| d.len() - *used < n)
        {
            self.piece = None;
            let d = self.env.dma_direct(at, left.min(DIRECT_PIECE), true);
            self.piece = d.map_err(|e| Self::fault(at, &e))?.map(|d| (d, 0));
        }
        let Some((d, used)) = &mut self.piece else {
            return Ok(None);
        };
        if d.len() - *used < n {
            return Ok(None);
        }
        let dst = d.dst_ptr(*used, n);
        // SAFETY: `dst` is `n` bytes of the piece (`dst_ptr` checked them), held for
        // this call; the pages are device memory, another mapping, so they do not overlap.
        let Some(crcs) = (unsafe { state::sum::copy3(dst, pages) }) else {
            return Ok(None);
        };
        *used += n;
        self.off += n as u64;
        if self.off == len {
            self.run += 1;
            self.off = 0;
        }
        Ok(Some(crcs))
    }
}

/// Reads an image at any offset from the IOVA runs of its buffer.
struct RunSource<'a> {
    env: &'a dyn Env,
    runs: &'a [(u64, u64)],
    /// Offset in the image of each run's start.
    starts: Vec<u64>,
}

impl<'a> RunSource<'a> {
    fn new(env: &'a dyn Env, runs: &'a [(u64, u64)]) -> Self {
        let mut at = 0u64;
        let starts = runs
            .iter()
            .map(|&(_, len)| {
                let s = at;
                at = at.saturating_add(len);
                s
            })
            .collect();
        RunSource { env, runs, starts }
    }

    /// The run holding image offset `at`: its IOVA and length, and `at`'s offset in it.
    fn run_at(&self, at: u64) -> Option<(u64, u64, u64)> {
        let r = self.starts.partition_point(|&s| s <= at).checked_sub(1)?;
        let (&(iova, len), &start) = (self.runs.get(r)?, self.starts.get(r)?);
        (at - start < len).then_some((iova, len, at - start))
    }
}

impl state::ImageSource for RunSource<'_> {
    type Error = CmdFail;

    fn read(&mut self, at: usize, buf: &mut [u8]) -> Result<(), CmdFail> {
        RunSource::read(self, at, buf)
    }

    /// In place when the `n` bytes lie in one run and one window the client shared.
    fn view<T>(
        &mut self,
        at: usize,
        n: usize,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>, CmdFail> {
        let Some((iova, len, off)) = self.run_at(at as u64) else {
            return Ok(None);
        };
        if off + n as u64 > len {
            return Ok(None);
        }
        let from = iova + off;
        match self.env.dma_direct(from, n, false) {
            Ok(Some(d)) if d.len() == n => Ok(Some(d.with(0, n, f))),
            Ok(_) => Ok(None),
            Err(e) => {
                tracing::info!(iova = from, error = %e, "LOAD_VHCA_STATE: buffer read faulted");
                Err(bad(mig_syndrome::DMA_FAULT))
            }
        }
    }
}

impl RunSource<'_> {
    /// Reads `buf.len()` bytes of the image at offset `at`.
    fn read(&mut self, at: usize, buf: &mut [u8]) -> Result<(), CmdFail> {
        let mut at = at as u64;
        let mut done = 0usize;
        // The run holding `at`: the last one starting at or before it.
        let mut r = self.starts.partition_point(|&s| s <= at).saturating_sub(1);
        while done < buf.len() {
            let (Some(&(iova, len)), Some(&start)) = (self.runs.get(r), self.starts.get(r)) else {
                return Err(bad(mig_syndrome::BUFFER_TOO_SMALL));
            };
            let off = at - start;
            if off >= len {
                r += 1;
                continue;
            }
            let n = ((len - off) as usize).min(buf.len() - done);
            let from = iova + off;
            self.env
                .dma_read(from, &mut buf[done..done + n])
                .map_err(|e| {
                    tracing::info!(iova = from, error = %e, "LOAD_VHCA_STATE: buffer read faulted");
                    bad(mig_syndrome::DMA_FAULT)
                })?;
            done += n;
            at += n as u64;
            r += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
