//! The firmware of one function: command dispatch by opcode, the HCA life cycle, and the
//! objects the commands create. One file per command family.
//!
//! Commands arrive as whole input messages (gathered by [`crate::cmdq`]) and leave as
//! whole output messages; this module never touches the queue. Guest mistakes become a
//! PRM status and a non-zero syndrome (see [`syndrome`]), never a panic or an `Err`.
//!
//! # Life cycle
//!
//! ```text
//!   Disabled --ENABLE_HCA--> Enabled --INIT_HCA--> Initialized
//!      ^                      |  ^                      |
//!      +-----DISABLE_HCA------+  +-----TEARDOWN_HCA-----+
//! ```
//!
//! A command issued in a state that does not allow it completes with BAD_SYS_STATE
//! ([`syndrome::WRONG_STATE`]). Objects (EQs, UARs, PDs, mkeys, pages) are not freed by
//! TEARDOWN_HCA or DISABLE_HCA: a driver that forgets to destroy one leaves it visible in
//! [`ObjectCounts`] (the leak checks depend on that). DISABLE_HCA returns the ISSI and the
//! current capabilities to their defaults. Only FLR / DEVICE_RESET
//! ([`Firmware::reset`]) returns everything to power-on.
//!
//! # Functions
//!
//! The PF is function 0 and VF n is function n + 1, which is also its `vhca_id`.
//! Only the PF may name another function (`other_function` in QUERY/SET_HCA_CAP,
//! `function_id` in ENABLE/DISABLE_HCA); a VF doing so gets BAD_PARAM. That keeps the
//! lock order acyclic: the PF's firmware lock may be held while a VF's is taken, never
//! the reverse.

mod access_reg;
mod caps;
mod cq_event;
mod cq_qp;
pub mod env;
mod eq;
mod hca;
mod migration;
pub mod page_track;
mod pages;
mod pd_mkey;
mod uar;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use mlx5_prm::cmdq::DeliveryStatus;
use mlx5_prm::ifc::{self, hdr, Field};
use mlx5_prm::{CmdStatus, Opcode};

pub use caps::LOG_BF_REG_SIZE;
pub use cq_event::{
    comp_eqe, cq_error_eqe, qp_event_eqe, CqArm, UarAction, UarLog, UarRefusal, UarWrite,
    UAR_LOG_CAPACITY,
};
pub use cq_qp::{Cq, Qp, QpPeer, QueueError, Ring};
pub use env::{Env, FunctionId, P2pRefusal, P2pSource, Peer, MSIX_VECTORS};
pub use eq::{EqState, EqeSlot};
pub use migration::{
    mig_syndrome, MigCtl, MigState, SuspendError, Violation, ViolationKind, DRAIN_TIMEOUT,
    VIOLATION_LOG_CAPACITY,
};
pub use page_track::{DirtyLog, PageTrack, ReportJob};
pub use pd_mkey::{Mkey, MkeyError};
/// The table sizes of the objects a function holds (`crate::limits` lists them all).
pub mod tables {
    pub use super::caps::MAX_NUM_EQS;
    pub use super::cq_qp::{MAX_CQS, MAX_QPS};
    pub use super::pages::MAX_FW_PAGES;
    pub use super::pd_mkey::{MAX_MKEYS, MAX_PDS};
    pub use super::uar::MAX_UARS;
}

/// The checks the live commands and LOAD_VHCA_STATE share: `state` reruns them on every
/// object of an image, so a restored function holds only what the commands would have
/// created. Each error's `fail()` is the status and syndrome of the live command.
pub mod checks {
    pub use super::access_reg::{check_host_endianness, RegError};
    pub use super::caps::{check_general_caps, CapsError, MAX_NUM_EQS};
    pub use super::cq_qp::{
        check_cq, check_dbr, check_qp, check_ring, QueueError, FIRST_QPN, MAX_CQS, MAX_QPS,
    };
    pub use super::eq::{
        check_cmd_eq, check_eq_page, check_eq_uar, check_eqc, eq_page_count, EqError, FIRST_EQN,
    };
    pub use super::hca::{check_issi, HcaError};
    pub use super::pages::{check_fw_page, check_page_count, check_startup_pages, PageError};
    pub use super::pd_mkey::{
        check_mkey_range, check_mtt_entry, check_mtt_len, check_pd, check_pd_index, PdMkeyError,
        MAX_MKEYS, MTT_PERM_MASK,
    };
    pub use super::uar::{check_uar_index, UarError};
}

/// Commands kept in the command log (oldest dropped first).
pub const CMD_LOG_CAPACITY: usize = 4096;

/// Non-zero syndromes this firmware reports, one per failure reason, so a test can tell
/// them apart. The high half spells "FW", the low half is the reason.
pub mod syndrome {
    /// The opcode is unknown or not implemented.
    pub const UNKNOWN_OPCODE: u32 = 0x4657_0001;
    /// The command is not allowed in the current life-cycle state.
    pub const WRONG_STATE: u32 = 0x4657_0002;
    /// The input is shorter than the command's layout.
    pub const SHORT_INPUT: u32 = 0x4657_0003;
    /// The output the driver allowed is shorter than the command's layout.
    pub const SHORT_OUTPUT: u32 = 0x4657_0004;
    /// A parameter has a value this firmware refuses (see the trace for which).
    pub const BAD_PARAM: u32 = 0x4657_0005;
    /// `op_mod` is not one the command defines.
    pub const BAD_OP_MOD: u32 = 0x4657_0006;
    /// The named function does not exist, or a VF named another function.
    pub const BAD_FUNCTION: u32 = 0x4657_0007;
    /// The named object (EQ, UAR, PD, mkey) does not exist.
    pub const NO_SUCH_OBJECT: u32 = 0x4657_0008;
    /// A table of objects is full.
    pub const NO_RESOURCES: u32 = 0x4657_0009;
    /// A page address is 0, misaligned, unmapped or given twice.
    pub const BAD_PAGE: u32 = 0x4657_000a;
    /// INIT_HCA before the boot and init pages were given.
    pub const PAGES_MISSING: u32 = 0x4657_000b;
    /// An object is still in use.
    pub const BUSY: u32 = 0x4657_000c;
    /// ACCESS_REG named a register this device does not implement.
    pub const UNSUPPORTED_REGISTER: u32 = 0x4657_000d;
    /// CREATE_CQ named an EQ that takes asynchronous events, not completions.
    pub const NOT_COMPLETION_EQ: u32 = 0x4657_000e;
}

/// The HCA life-cycle state of a function (Disabled, Enabled, Initialized). A state
/// image carries it by number, so the type is the image codec's wire enum.
pub use mlx5_prm::state_image::LifeCycle as HcaState;

/// How many objects a function's firmware holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObjectCounts {
    pub eqs: usize,
    pub uars: usize,
    pub pds: usize,
    pub mkeys: usize,
    pub cqs: usize,
    pub qps: usize,
    /// 4 KiB pages given with MANAGE_PAGES and not taken back.
    pub pages: usize,
}

impl ObjectCounts {
    /// Nothing held at all.
    pub fn is_empty(&self) -> bool {
        *self == ObjectCounts::default()
    }
}

/// One completed (or refused) command, as the command log keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdRecord {
    /// Queue slot it arrived in.
    pub slot: u8,
    /// Raw opcode (0 if the input could not be gathered).
    pub opcode: u16,
    pub op_mod: u16,
    /// The function that executed it.
    pub vhca_id: u16,
    /// Delivery status written to `status_own`. When it is not OK, the command did not
    /// execute and `status`/`syndrome` are 0.
    pub delivery: DeliveryStatus,
    /// Command status (output byte 0).
    pub status: CmdStatus,
    pub syndrome: u32,
}

impl CmdRecord {
    /// The opcode name, or "UNKNOWN".
    pub fn opcode_name(&self) -> &'static str {
        opcode_name(self.opcode)
    }
}

/// Name of a raw opcode for logs.
pub fn opcode_name(opcode: u16) -> &'static str {
    Opcode::try_from(opcode).map_or("UNKNOWN", Opcode::name)
}

/// A failed command: the status and syndrome it completes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdFail {
    pub status: CmdStatus,
    pub syndrome: u32,
}

impl CmdFail {
    pub const fn new(status: CmdStatus, syndrome: u32) -> Self {
        CmdFail { status, syndrome }
    }

    pub const fn bad_param() -> Self {
        CmdFail::new(CmdStatus::BadParamErr, syndrome::BAD_PARAM)
    }

    pub const fn bad_op_mod() -> Self {
        CmdFail::new(CmdStatus::BadParamErr, syndrome::BAD_OP_MOD)
    }

    pub const fn no_such_object() -> Self {
        CmdFail::new(CmdStatus::BadResErr, syndrome::NO_SUCH_OBJECT)
    }

    pub const fn no_resources() -> Self {
        CmdFail::new(CmdStatus::NoResErr, syndrome::NO_RESOURCES)
    }

    pub const fn bad_function() -> Self {
        CmdFail::new(CmdStatus::BadParamErr, syndrome::BAD_FUNCTION)
    }

    pub const fn wrong_state() -> Self {
        CmdFail::new(CmdStatus::BadSysStateErr, syndrome::WRONG_STATE)
    }
}

/// What a handler returns: the whole output message (its header is filled in by the
/// dispatcher) or the failure.
pub type CmdResult = Result<Vec<u8>, CmdFail>;

/// One command as the firmware sees it.
#[derive(Debug, Clone, Copy)]
pub struct Cmd<'a> {
    pub opcode: u16,
    pub op_mod: u16,
    /// The whole input message (header included), exactly `inlen` bytes.
    pub input: &'a [u8],
    /// `outlen` from the entry: how much output the driver accepts.
    pub outlen: usize,
}

impl<'a> Cmd<'a> {
    /// Parses the header of a gathered input (`input.len()` >= 16 is checked by the queue;
    /// a shorter one reads as zeros).
    pub fn new(input: &'a [u8], outlen: usize) -> Self {
        Cmd {
            opcode: ifc::get(input, hdr::OPCODE) as u16,
            op_mod: ifc::get(input, hdr::OP_MOD) as u16,
            input,
            outlen,
        }
    }

    /// Input field `f`, 0 past the end.
    pub fn get(&self, f: Field) -> u64 {
        ifc::get(self.input, f)
    }

    /// The `vhca_id` of the function this command acts on, as its input names it
    /// (`function_id` of ENABLE/DISABLE_HCA, `other_function` + `function_id` of
    /// QUERY/SET_HCA_CAP, `vhca_id` of the migration commands), else `own`. Not
    /// validated: the handler decides whether the naming is allowed.
    pub fn target_vhca_id(&self, own: u16) -> u16 {
        use mlx5_prm::cmd::caps::{HCA_CAP_IN_FUNCTION_ID, HCA_CAP_IN_OTHER_FUNCTION};
        use mlx5_prm::cmd::hca::ENABLE_HCA_IN_FUNCTION_ID;
        use mlx5_prm::cmd::migration::IN_VHCA_ID;
        match Opcode::try_from(self.opcode) {
            Ok(Opcode::EnableHca | Opcode::DisableHca) => {
                match self.get(ENABLE_HCA_IN_FUNCTION_ID) as u16 {
                    0 => own,
                    fid => fid,
                }
            }
            Ok(Opcode::QueryHcaCap | Opcode::SetHcaCap)
                if self.get(HCA_CAP_IN_OTHER_FUNCTION) != 0 =>
            {
                self.get(HCA_CAP_IN_FUNCTION_ID) as u16
            }
            Ok(
                Opcode::SuspendVhca
                | Opcode::ResumeVhca
                | Opcode::QueryVhcaMigrationState
                | Opcode::SaveVhcaState
                | Opcode::LoadVhcaState,
            ) => self.get(IN_VHCA_ID) as u16,
            _ => own,
        }
    }

    /// Requires at least `len` input bytes (BAD_INP_LEN otherwise).
    pub fn need_in(&self, len: usize) -> Result<(), CmdFail> {
        if self.input.len() < len {
            return Err(CmdFail::new(CmdStatus::BadInpLenErr, syndrome::SHORT_INPUT));
        }
        Ok(())
    }

    /// Requires room for at least `len` output bytes (BAD_OUTP_LEN otherwise).
    pub fn need_out(&self, len: usize) -> Result<(), CmdFail> {
        if self.outlen < len {
            return Err(CmdFail::new(
                CmdStatus::BadOutpLenErr,
                syndrome::SHORT_OUTPUT,
            ));
        }
        Ok(())
    }

    /// Both length checks, then a zeroed output buffer of `out_len` bytes.
    pub fn lengths(&self, in_len: usize, out_len: usize) -> Result<Vec<u8>, CmdFail> {
        self.need_in(in_len)?;
        self.need_out(out_len)?;
        Ok(vec![0; out_len])
    }
}

/// The result of one command: the output message and its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The whole output message, header (status, syndrome) included.
    pub out: Vec<u8>,
    pub status: CmdStatus,
    pub syndrome: u32,
}

/// The firmware of one function with its locks: what a function holds, and what the
/// command queue engine executes commands on.
///
/// # Locks, outermost first
///
/// 1. `eqe`: one command-completion EQE at a time (reserve, DMA write, commit), so EQEs
///    are committed in ring order and an interrupt never announces an EQE not yet in
///    memory. Held across one 64-byte DMA write, never across a wait.
/// 2. `state`: the firmware state. Held for one short command, or for one phase (check,
///    snapshot, commit) of a long one: never across a drain, a copy of device memory or
///    an image transfer. A PF may take a peer VF's `state` while holding its own, never
///    the reverse (only a PF names other functions).
/// 3. A peer's migration control ([`Peer::migration`]) and the function's own locks
///    (BAR0 state, MSI-X) are leaves below these. Eventfds are written after every lock
///    is released.
pub struct FwCell {
    state: Mutex<Firmware>,
    eqe: Mutex<()>,
    /// Whether the firmware has a command EQ (decides completion by EQE). A copy kept
    /// outside `state` so that a doorbell never waits for a command; refreshed after
    /// every command that may change it, by LOAD and by reset.
    cmd_events: AtomicBool,
}

impl FwCell {
    /// Power-on firmware of function `id`.
    pub fn new(id: FunctionId) -> Self {
        FwCell::from(Firmware::new(id))
    }

    /// The firmware lock (see the lock order above).
    pub fn lock(&self) -> MutexGuard<'_, Firmware> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the firmware has a command EQ (see `cmd_events`).
    pub fn cmd_events(&self) -> bool {
        self.cmd_events.load(Ordering::Acquire)
    }

    fn refresh(&self, fw: &Firmware) {
        self.cmd_events
            .store(fw.cmd_eq.is_some(), Ordering::Release);
    }

    /// Replaces the firmware state (LOAD), keeping the command log.
    pub fn install(&self, new: Firmware) {
        let mut fw = self.lock();
        let log = std::mem::take(&mut fw.log);
        let uar_log = std::mem::take(&mut fw.uar_log);
        *fw = new;
        fw.log = log;
        fw.uar_log = uar_log;
        self.refresh(&fw);
    }

    /// FLR / DEVICE_RESET (see [`Firmware::reset`]).
    pub fn reset(&self) {
        let mut fw = self.lock();
        fw.reset();
        self.refresh(&fw);
    }

    /// Executes one command on the function `env` and returns its output. Short
    /// commands run under the firmware lock; the migration commands run in phases
    /// and take it only to check and to commit. Never panics on guest input.
    pub fn execute(&self, env: &dyn Env, cmd: &Cmd<'_>) -> Reply {
        let result = match Opcode::try_from(cmd.opcode) {
            Err(_) => Err(CmdFail::new(CmdStatus::BadOpErr, syndrome::UNKNOWN_OPCODE)),
            Ok(op) => match op {
                Opcode::SuspendVhca => migration::suspend_vhca(self, env, cmd),
                Opcode::ResumeVhca => migration::resume_vhca(self, env, cmd),
                Opcode::QueryVhcaMigrationState => {
                    migration::query_vhca_migration_state(self, env, cmd)
                }
                Opcode::SaveVhcaState => migration::save_vhca_state(self, env, cmd),
                Opcode::LoadVhcaState => migration::load_vhca_state(self, env, cmd),
                _ => {
                    let mut fw = self.lock();
                    let r = fw.execute_short(env, op, cmd);
                    self.refresh(&fw);
                    r
                }
            },
        };
        reply(env.id(), cmd, result)
    }

    /// Posts a command-completion EQE for `vector` on the command EQ (see
    /// [`FwCell::post_eqe`]).
    pub fn post_cmd_eqe(&self, env: &dyn Env, vector: u32) {
        let Some(eqn) = self.lock().cmd_eq() else {
            return;
        };
        self.post_eqe(env, eqn, EqeSlot::cmd_eqe_body(vector));
    }

    /// Posts `eqe` (its owner byte filled in here) at the producer index of EQ `eqn`,
    /// then raises the EQ's MSI-X vector if it was armed (and disarms it). The EQE is
    /// written outside the firmware lock, its owner byte last, and committed after, so
    /// an interrupt never announces an EQE not yet in memory; the vector is raised with
    /// no lock held. False if there is no such EQ or it would overrun (the EQE is then
    /// dropped with a warning).
    pub fn post_eqe(
        &self,
        env: &dyn Env,
        eqn: u8,
        mut eqe: [u8; mlx5_prm::cmd::eq::EQE_SIZE],
    ) -> bool {
        use mlx5_prm::cmd::eq::EQE_OWNER_OFFSET;
        let fire = {
            let _order = self.eqe.lock().unwrap_or_else(|p| p.into_inner());
            let Some(slot) = self.lock().reserve_eqe(eqn) else {
                return false;
            };
            eqe[EQE_OWNER_OFFSET] = slot.owner;
            let written = env
                .dma_write(slot.addr, &eqe[..EQE_OWNER_OFFSET])
                .and_then(|()| {
                    env.dma_write(
                        slot.addr + EQE_OWNER_OFFSET as u64,
                        &eqe[EQE_OWNER_OFFSET..],
                    )
                });
            if let Err(e) = written {
                tracing::warn!(vhca_id = env.id().vhca_id, eqn = slot.eqn, error = %e, "cannot write EQE");
            }
            self.lock().commit_eqe(&slot)
        };
        if let Some(v) = fire {
            env.raise_msix(v);
        }
        true
    }
}

impl FwCell {
    /// Posts an OBJECT_CHANGE EQE for general object `obj_id` on the first EQ that
    /// takes the event (none: nothing is posted), as [`FwCell::post_eqe`] posts every EQE.
    pub fn post_obj_change_eqe(&self, env: &dyn Env, obj_type: u16, obj_id: u32) {
        let event = mlx5_prm::cmd::page_track::EVENT_TYPE_OBJECT_CHANGE;
        let Some(eqn) = self.lock().async_eq(event) else {
            return;
        };
        self.post_eqe(env, eqn, EqeSlot::obj_change_eqe_body(obj_type, obj_id));
    }
}

impl From<Firmware> for FwCell {
    fn from(fw: Firmware) -> Self {
        let cell = FwCell {
            cmd_events: AtomicBool::new(false),
            state: Mutex::new(fw),
            eqe: Mutex::new(()),
        };
        cell.refresh(&cell.lock());
        cell
    }
}

impl FwCell {
    /// The firmware state, the cell consumed (tests).
    pub fn into_inner(self) -> Firmware {
        self.state.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

/// The output header of a command that failed with `status` and `syndrome` without
/// executing (an injected failure).
pub fn failed_output(status: CmdStatus, syndrome: u32, _outlen: usize) -> Vec<u8> {
    let mut out = vec![0; hdr::HDR_LEN];
    ifc::set(&mut out, hdr::STATUS, u64::from(u8::from(status)));
    ifc::set(&mut out, hdr::SYNDROME, u64::from(syndrome));
    out
}

/// The output message of a command that ended with `result`, its header filled in.
fn reply(id: FunctionId, cmd: &Cmd<'_>, result: CmdResult) -> Reply {
    let (mut out, status, synd) = match result {
        Ok(out) => (out, CmdStatus::Ok, 0),
        Err(f) => (vec![0; hdr::HDR_LEN], f.status, f.syndrome),
    };
    if out.len() < hdr::HDR_LEN {
        out.resize(hdr::HDR_LEN, 0);
    }
    ifc::set(&mut out, hdr::STATUS, u64::from(u8::from(status)));
    ifc::set(&mut out, hdr::SYNDROME, u64::from(synd));
    if status == CmdStatus::Ok {
        tracing::debug!(
            opcode = opcode_name(cmd.opcode),
            op_mod = cmd.op_mod,
            vhca_id = id.vhca_id,
            status = status.name(),
            syndrome = format_args!("{synd:#x}"),
            "firmware command"
        );
    } else {
        tracing::info!(
            opcode = opcode_name(cmd.opcode),
            raw_opcode = format_args!("{:#x}", cmd.opcode),
            op_mod = cmd.op_mod,
            vhca_id = id.vhca_id,
            status = status.name(),
            syndrome = format_args!("{synd:#x}"),
            "firmware command failed"
        );
    }
    Reply {
        out,
        status,
        syndrome: synd,
    }
}

/// The firmware state of one function.
pub struct Firmware {
    id: FunctionId,
    state: HcaState,
    issi: u16,
    /// The GENERAL capability page as SET_HCA_CAP left it (CUR).
    general_cur: Box<[u8]>,
    /// Pages given with MANAGE_PAGES, by DMA address.
    pages: BTreeSet<u64>,
    eqs: BTreeMap<u8, EqState>,
    /// The EQ that gets command-completion EQEs (event_bitmask bit 0x0a).
    cmd_eq: Option<u8>,
    uars: BTreeSet<u32>,
    pds: BTreeSet<u32>,
    mkeys: BTreeMap<u32, Mkey>,
    cqs: BTreeMap<u32, Cq>,
    qps: BTreeMap<u32, Qp>,
    /// PAGE_TRACK general objects (a PF's trackers of its VFs), by object id.
    page_tracks: BTreeMap<u32, PageTrack>,
    /// HOST_ENDIANNESS `he` as the PF's driver wrote it (ACCESS_REG).
    host_endianness: u8,
    log: VecDeque<CmdRecord>,
    /// The first word of the CQ doorbell (UAR + 0x20) by UAR page, until its `cqn` word
    /// (UAR + 0x24) arrives.
    cq_arm_words: BTreeMap<u32, u32>,
    /// The UAR writes refused (kept, like the command log, across reset and LOAD).
    uar_log: UarLog,
    uar_warnings: vfu::ratelimit::RateLimit,
}

impl Firmware {
    /// Power-on firmware of function `id`.
    pub fn new(id: FunctionId) -> Self {
        Firmware {
            id,
            state: HcaState::Disabled,
            issi: 0,
            general_cur: caps::general_max(id),
            pages: BTreeSet::new(),
            eqs: BTreeMap::new(),
            cmd_eq: None,
            uars: BTreeSet::new(),
            pds: BTreeSet::new(),
            mkeys: BTreeMap::new(),
            cqs: BTreeMap::new(),
            qps: BTreeMap::new(),
            page_tracks: BTreeMap::new(),
            host_endianness: 0,
            log: VecDeque::new(),
            cq_arm_words: BTreeMap::new(),
            uar_log: UarLog::default(),
            uar_warnings: vfu::ratelimit::RateLimit::per_second(),
        }
    }

    /// FLR / DEVICE_RESET: back to power-on, every object freed. The command log is kept
    /// (it is a test observation point, not device state).
    pub fn reset(&mut self) {
        let log = std::mem::take(&mut self.log);
        let uar_log = std::mem::take(&mut self.uar_log);
        *self = Firmware::new(self.id);
        self.log = log;
        self.uar_log = uar_log;
    }

    pub fn state(&self) -> HcaState {
        self.state
    }

    pub fn issi(&self) -> u16 {
        self.issi
    }

    pub fn object_counts(&self) -> ObjectCounts {
        ObjectCounts {
            eqs: self.eqs.len(),
            uars: self.uars.len(),
            pds: self.pds.len(),
            mkeys: self.mkeys.len(),
            cqs: self.cqs.len(),
            qps: self.qps.len(),
            pages: self.pages.len(),
        }
    }

    /// The command log, oldest first.
    pub fn command_log(&self) -> Vec<CmdRecord> {
        self.log.iter().copied().collect()
    }

    /// Appends to the bounded command log.
    pub fn record(&mut self, r: CmdRecord) {
        if self.log.len() >= CMD_LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(r);
    }

    /// The mkey with index `mkey_index`, for SAVE/LOAD and the DMA engines.
    pub fn mkey(&self, mkey_index: u32) -> Option<&Mkey> {
        self.mkeys.get(&mkey_index)
    }

    /// The command EQ, if one exists: decides polling versus event completion.
    pub fn cmd_eq(&self) -> Option<u8> {
        self.cmd_eq
    }

    /// A short command (every one but the migration commands), under the lock.
    fn execute_short(&mut self, env: &dyn Env, op: Opcode, cmd: &Cmd<'_>) -> CmdResult {
        // ENABLE/DISABLE_HCA naming another function (what `sriov_numvfs` sends) act on
        // that VF, not on this function: they run on any live PF, whatever its own
        // state. A VF naming another function is refused by the handler (BAD_FUNCTION).
        let names_other = matches!(op, Opcode::EnableHca | Opcode::DisableHca)
            && cmd.get(mlx5_prm::cmd::hca::ENABLE_HCA_IN_FUNCTION_ID) != 0;
        if names_other {
            if self.id.kind == crate::pci::FunctionKind::Pf && self.state == HcaState::Disabled {
                return Err(CmdFail::wrong_state());
            }
        } else if !allowed(op, self.state) {
            return Err(CmdFail::wrong_state());
        }
        self.dispatch(env, op, cmd)
    }

    fn dispatch(&mut self, env: &dyn Env, op: Opcode, cmd: &Cmd<'_>) -> CmdResult {
        match op {
            Opcode::EnableHca => self.enable_hca(env, cmd),
            Opcode::DisableHca => self.disable_hca(env, cmd),
            Opcode::InitHca => self.init_hca(cmd),
            Opcode::TeardownHca => self.teardown_hca(cmd),
            Opcode::QueryIssi => self.query_issi(cmd),
            Opcode::SetIssi => self.set_issi(cmd),
            Opcode::SetDriverVersion => self.set_driver_version(cmd),
            Opcode::QueryAdapter => self.query_adapter(cmd),
            Opcode::QueryHcaCap => self.query_hca_cap(env, cmd),
            Opcode::SetHcaCap => self.set_hca_cap(env, cmd),
            Opcode::QueryPages => self.query_pages(cmd),
            Opcode::ManagePages => self.manage_pages(env, cmd),
            Opcode::AllocUar => self.alloc_uar(cmd),
            Opcode::DeallocUar => self.dealloc_uar(cmd),
            Opcode::CreateEq => self.create_eq(env, cmd),
            Opcode::DestroyEq => self.destroy_eq(cmd),
            Opcode::AllocPd => self.alloc_pd(cmd),
            Opcode::DeallocPd => self.dealloc_pd(cmd),
            Opcode::CreateMkey => self.create_mkey(cmd),
            Opcode::DestroyMkey => self.destroy_mkey(cmd),
            Opcode::CreateCq => self.create_cq(env, cmd),
            Opcode::DestroyCq => self.destroy_cq(cmd),
            Opcode::QueryCq => self.query_cq(cmd),
            Opcode::CreateQp => self.create_qp(env, cmd),
            Opcode::DestroyQp => self.destroy_qp(cmd),
            Opcode::QueryQp => self.query_qp(cmd),
            Opcode::Rst2InitQp
            | Opcode::Init2RtrQp
            | Opcode::Rtr2RtsQp
            | Opcode::Qp2ErrQp
            | Opcode::Qp2RstQp => self.modify_qp(env, op, cmd),
            Opcode::AccessReg => self.access_reg(cmd),
            Opcode::CreateGeneralObject => self.create_general_object(env, cmd),
            Opcode::ModifyGeneralObject => self.modify_general_object(env, cmd),
            Opcode::QueryGeneralObject => self.query_general_object(cmd),
            Opcode::DestroyGeneralObject => self.destroy_general_object(env, cmd),
            _ => Err(CmdFail::new(CmdStatus::BadOpErr, syndrome::UNKNOWN_OPCODE)),
        }
    }
}

/// The life-cycle states in which `op` may run. Unimplemented opcodes pass here and
/// fail with BAD_OP in dispatch.
fn allowed(op: Opcode, s: HcaState) -> bool {
    use HcaState::*;
    match op {
        Opcode::EnableHca => s == Disabled,
        Opcode::DisableHca => s == Enabled,
        Opcode::InitHca => s == Enabled,
        Opcode::TeardownHca => s == Initialized,
        // The ISSI and the capabilities are chosen before INIT_HCA.
        Opcode::SetIssi | Opcode::SetHcaCap => s == Enabled,
        Opcode::QueryIssi
        | Opcode::QueryHcaCap
        | Opcode::QueryPages
        | Opcode::ManagePages
        | Opcode::QueryAdapter
        | Opcode::SetDriverVersion
        | Opcode::AccessReg => s != Disabled,
        // Objects are created on an initialized HCA; they may be destroyed after a
        // teardown (they outlive it, see the module docs).
        Opcode::AllocUar
        | Opcode::CreateEq
        | Opcode::AllocPd
        | Opcode::CreateMkey
        | Opcode::CreateCq
        | Opcode::CreateQp
        | Opcode::Rst2InitQp
        | Opcode::Init2RtrQp
        | Opcode::Rtr2RtsQp
        | Opcode::CreateGeneralObject
        | Opcode::ModifyGeneralObject => s == Initialized,
        Opcode::DeallocUar
        | Opcode::DestroyEq
        | Opcode::DeallocPd
        | Opcode::DestroyMkey
        | Opcode::DestroyCq
        | Opcode::DestroyQp
        | Opcode::QueryCq
        | Opcode::QueryQp
        | Opcode::Qp2ErrQp
        | Opcode::Qp2RstQp
        | Opcode::QueryGeneralObject
        | Opcode::DestroyGeneralObject => s != Disabled,
        _ => true,
    }
}

/// Smallest free number in `lo..=hi` of a set of allocated numbers.
fn first_free<'a>(used: impl Iterator<Item = &'a u32>, lo: u32, hi: u32) -> Option<u32> {
    let mut want = lo;
    for &u in used {
        if u < want {
            continue;
        }
        if u > want {
            break;
        }
        want = want.checked_add(1)?;
    }
    (want <= hi).then_some(want)
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::devmem::DevMem;
    use crate::state::IsegImage;
    use mlx5_prm::ifc::set;
    use std::sync::atomic::{AtomicU64, AtomicUsize};
    use std::sync::Arc;
    use std::time::Duration;
    use vfu::{Dma, DmaError};

    /// A fake of the function a command runs on: a real (memfd-backed) IOVA space, the
    /// peers the test gives it, and the interrupts raised. No threads, no sockets.
    pub struct FakeEnv {
        pub id: FunctionId,
        pub dma: Dma,
        pub peers: Vec<Arc<FakePeer>>,
        pub raised: Mutex<Vec<u16>>,
        pub epoch: AtomicU64,
        /// QPs the firmware asked the DMA engine to look at.
        pub kicked: Mutex<Vec<u32>>,
    }

    impl FakeEnv {
        pub fn new(id: FunctionId) -> Self {
            FakeEnv {
                id,
                dma: Dma::default(),
                peers: Vec::new(),
                raised: Mutex::new(Vec::new()),
                epoch: AtomicU64::new(0),
                kicked: Mutex::new(Vec::new()),
            }
        }

        /// Maps a memfd of `size` bytes at `iova`; returns it.
        pub fn map(&self, iova: u64, size: u64) -> std::fs::File {
            let f = vfu::dma::memfd("fw-test", size).unwrap();
            self.dma
                .map(
                    iova,
                    size,
                    f.try_clone().unwrap(),
                    0,
                    vfu::dma::VFIO_DMA_MAP_FLAG_READ | vfu::dma::VFIO_DMA_MAP_FLAG_WRITE,
                )
                .unwrap();
            f
        }
    }

    impl Env for FakeEnv {
        fn id(&self) -> FunctionId {
            self.id
        }

        fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            self.dma.read(iova, buf)
        }

        fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
            self.dma.write(iova, data)
        }

        fn raise_msix(&self, vector: u16) -> bool {
            self.raised.lock().unwrap().push(vector);
            true
        }

        fn epoch(&self) -> u64 {
            self.epoch.load(Ordering::Acquire)
        }

        fn dma_kick(&self, qpn: u32) {
            self.kicked.lock().unwrap().push(qpn);
        }

        fn peer(&self, vhca_id: u16) -> Option<Arc<dyn Peer>> {
            self.peers
                .iter()
                .find(|p| p.id.vhca_id == vhca_id)
                .map(|p| Arc::clone(p) as Arc<dyn Peer>)
        }
    }

    /// A fake peer function: real firmware state, migration control and (memfd)
    /// device memory; its admitted work is a number the test sets, and a freeze with
    /// work in flight reports the drain timeout at once instead of waiting.
    pub struct FakePeer {
        pub id: FunctionId,
        pub fw: FwCell,
        pub mig: Mutex<MigCtl>,
        pub devmem: DevMem,
        pub reset_gate: std::sync::RwLock<()>,
        pub iseg: Mutex<IsegImage>,
        pub epoch: AtomicU64,
        /// Admitted work that will not drain.
        pub stuck: AtomicUsize,
        /// Doorbell bits rung by a thaw.
        pub rung: Mutex<Vec<u32>>,
        /// Simulates a reset between a SAVE's snapshot and its commit: the next
        /// [`Peer::iseg`] bumps the epoch.
        pub reset_on_snapshot: std::sync::atomic::AtomicBool,
    }

    impl FakePeer {
        pub fn new(id: FunctionId, dev_mem: u64) -> Arc<Self> {
            Arc::new(FakePeer {
                id,
                fw: FwCell::new(id),
                mig: Mutex::new(MigCtl::default()),
                devmem: DevMem::new("fake-peer", dev_mem).unwrap(),
                reset_gate: std::sync::RwLock::new(()),
                iseg: Mutex::new(IsegImage::default()),
                epoch: AtomicU64::new(0),
                stuck: AtomicUsize::new(0),
                rung: Mutex::new(Vec::new()),
                reset_on_snapshot: std::sync::atomic::AtomicBool::new(false),
            })
        }

        pub fn migration_state(&self) -> MigState {
            self.mig.lock().unwrap().state()
        }

        pub fn object_counts(&self) -> ObjectCounts {
            self.fw.lock().object_counts()
        }
    }

    impl Peer for FakePeer {
        fn id(&self) -> FunctionId {
            self.id
        }

        fn hold_reset(&self) -> std::sync::RwLockReadGuard<'_, ()> {
            self.reset_gate.read().unwrap_or_else(|p| p.into_inner())
        }

        fn firmware(&self) -> MutexGuard<'_, Firmware> {
            self.fw.lock()
        }

        fn post_eqe(&self, _eqn: u8, _eqe: [u8; mlx5_prm::cmd::eq::EQE_SIZE]) -> bool {
            false
        }

        fn install_firmware(&self, fw: Firmware) {
            self.fw.install(fw);
        }

        fn migration(&self) -> MutexGuard<'_, MigCtl> {
            self.mig.lock().unwrap()
        }

        fn suspend_initiator(&self) -> Result<(), SuspendError> {
            self.migration()
                .transition(MigState::Running, MigState::InitiatorSuspended)
        }

        fn resume_initiator(&self) -> Result<(), SuspendError> {
            self.migration()
                .transition(MigState::InitiatorSuspended, MigState::Running)
        }

        fn freeze(&self, _timeout: Duration) -> Result<(), SuspendError> {
            let mut m = self.migration();
            m.transition(MigState::InitiatorSuspended, MigState::ResponderSuspended)?;
            let inflight = self.stuck.load(Ordering::Acquire);
            if inflight > 0 {
                m.set_state(MigState::InitiatorSuspended);
                return Err(SuspendError::DrainTimeout { inflight });
            }
            Ok(())
        }

        fn thaw(&self) -> Result<(), SuspendError> {
            let parked = self.migration().thaw()?;
            if parked != 0 {
                self.rung.lock().unwrap().push(parked);
                self.migration().release();
            }
            Ok(())
        }

        fn devmem(&self) -> &DevMem {
            &self.devmem
        }

        fn p2p_write(
            &self,
            from: super::P2pSource,
            offset: u64,
            data: &[u8],
        ) -> Result<(), super::P2pRefusal> {
            let attempt = Violation::p2p(
                from.vhca_id,
                from.qpn,
                self.id.vhca_id,
                offset,
                data.len() as u64,
            );
            let mut m = self.migration();
            if !m.admit(attempt) {
                return Err(super::P2pRefusal::Frozen {
                    seq: m.last_violation_seq().unwrap_or(0),
                });
            }
            let r = self.devmem.write(offset, data);
            m.release();
            r.map_err(|_| super::P2pRefusal::OutOfRange)
        }

        fn client_pid(&self) -> Option<i32> {
            None
        }

        fn bar2_address(&self) -> Option<u64> {
            None
        }

        fn iseg(&self) -> IsegImage {
            if self.reset_on_snapshot.load(Ordering::Acquire) {
                self.epoch.fetch_add(1, Ordering::AcqRel);
            }
            *self.iseg.lock().unwrap()
        }

        fn load_iseg(&self, iseg: &IsegImage) {
            *self.iseg.lock().unwrap() = *iseg;
        }

        fn epoch(&self) -> u64 {
            self.epoch.load(Ordering::Acquire)
        }

        fn dma_read(&self, _iova: u64, _buf: &mut [u8]) -> Result<(), DmaError> {
            Err(DmaError::NoBacking { iova: _iova })
        }

        fn dma_write(&self, iova: u64, _data: &[u8]) -> Result<(), DmaError> {
            Err(DmaError::NoBacking { iova })
        }

        fn dma_kick(&self, _qpn: u32) {}

        fn admit_dma(&self, writer: P2pSource, address: u64, len: u64) -> bool {
            let mut v = Violation::p2p(writer.vhca_id, writer.qpn, self.id.vhca_id, address, len);
            v.kind = ViolationKind::PeerDma;
            self.migration().admit(v)
        }

        fn end_dma(&self) {
            self.migration().release();
        }
    }

    /// Firmware of `id` with an initialized HCA and some objects: UAR 3, PDs 1 and 2,
    /// command EQ 1 (armed, on UAR 3, ci 3) and mkey 7.
    pub fn populated(id: FunctionId) -> Firmware {
        use mlx5_prm::cmd::eq::EVENT_TYPE_CMD;
        let mut fw = Firmware::new(id);
        fw.state = HcaState::Initialized;
        fw.issi = 1;
        fw.pages = (1..=pages::STARTUP_PAGES as u64)
            .map(|i| i * 0x1000)
            .collect();
        fw.uars.insert(3);
        fw.pds.extend([1, 2]);
        fw.eqs.insert(
            1,
            EqState {
                eqn: 1,
                uar: 3,
                intr: 0,
                log_size: 6,
                page_size: 4096,
                pas: vec![0x9000],
                event_bitmask: [1 << EVENT_TYPE_CMD, 0, 0, 0],
                pi: 3,
                written: 3,
                ci: 3,
                armed: true,
            },
        );
        fw.cmd_eq = Some(1);
        fw.mkeys.insert(
            7,
            Mkey {
                index: 7,
                variant: 1,
                pd: 2,
                start: 0x800,
                len: 0x1000,
                log_page_size: 12,
                mtt: vec![0xa000, 0xb000],
            },
        );
        fw
    }

    /// A function's firmware on a fake environment with no peers.
    pub struct Bench {
        pub fw: Firmware,
        pub env: FakeEnv,
        pub id: FunctionId,
    }

    impl Bench {
        pub fn vf() -> Self {
            Self::of(FunctionId::vf(0))
        }

        pub fn pf() -> Self {
            Self::of(FunctionId::pf())
        }

        fn of(id: FunctionId) -> Self {
            Bench {
                fw: Firmware::new(id),
                env: FakeEnv::new(id),
                id,
            }
        }

        /// Runs a command built by `build` on a zeroed input of `inlen` bytes.
        pub fn run(
            &mut self,
            op: Opcode,
            op_mod: u16,
            inlen: usize,
            outlen: usize,
            build: impl FnOnce(&mut [u8]),
        ) -> Reply {
            let mut input = vec![0u8; inlen];
            set(&mut input, hdr::OPCODE, u64::from(u16::from(op)));
            set(&mut input, hdr::OP_MOD, u64::from(op_mod));
            build(&mut input);
            let cell = FwCell::from(std::mem::replace(&mut self.fw, Firmware::new(self.id)));
            let reply = cell.execute(&self.env, &Cmd::new(&input, outlen));
            self.fw = cell.into_inner();
            reply
        }

        /// ENABLE_HCA, the startup pages, INIT_HCA.
        pub fn bring_up(&mut self) {
            ok(&self.simple(Opcode::EnableHca));
            self.give_startup_pages();
            ok(&self.run(Opcode::InitHca, 0, 32, 16, |_| {}));
        }

        pub fn simple(&mut self, op: Opcode) -> Reply {
            self.run(op, 0, 16, 16, |_| {})
        }

        /// Maps a memfd of `size` bytes at `iova`.
        pub fn map(&mut self, iova: u64, size: u64) {
            self.env.map(iova, size);
        }
    }

    pub fn ok(r: &Reply) {
        assert_eq!(r.status, CmdStatus::Ok, "syndrome {:#x}", r.syndrome);
        assert_eq!(r.out[0], 0);
    }

    pub fn fails(r: &Reply, status: CmdStatus, synd: u32) {
        assert_eq!((r.status, r.syndrome), (status, synd));
        assert_eq!(ifc::get(&r.out, hdr::STATUS), u64::from(u8::from(status)));
        assert_eq!(ifc::get(&r.out, hdr::SYNDROME), u64::from(synd));
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn unknown_opcode_is_bad_op_with_a_syndrome_in_any_state() {
        let mut b = Bench::vf();
        let r = b.run(Opcode::EnableHca, 0, 16, 16, |m| {
            ifc::set(m, hdr::OPCODE, 0x7777)
        });
        fails(&r, CmdStatus::BadOpErr, syndrome::UNKNOWN_OPCODE);
        assert_eq!(r.out.len(), 16);
        // Known to the PRM crate but not implemented here.
        let r = b.simple(Opcode::ModifyNicVportContext);
        fails(&r, CmdStatus::BadOpErr, syndrome::UNKNOWN_OPCODE);
    }

    #[test]
    fn life_cycle_refuses_commands_in_the_wrong_state() {
        let mut b = Bench::vf();
        assert_eq!(b.fw.state(), HcaState::Disabled);
        fails(
            &b.simple(Opcode::QueryIssi),
            CmdStatus::BadSysStateErr,
            syndrome::WRONG_STATE,
        );
        fails(
            &b.run(Opcode::InitHca, 0, 32, 16, |_| {}),
            CmdStatus::BadSysStateErr,
            syndrome::WRONG_STATE,
        );
        fails(
            &b.simple(Opcode::DisableHca),
            CmdStatus::BadSysStateErr,
            syndrome::WRONG_STATE,
        );
        ok(&b.simple(Opcode::EnableHca));
        assert_eq!(b.fw.state(), HcaState::Enabled);
        fails(
            &b.simple(Opcode::EnableHca),
            CmdStatus::BadSysStateErr,
            syndrome::WRONG_STATE,
        );
        fails(
            &b.simple(Opcode::AllocPd),
            CmdStatus::BadSysStateErr,
            syndrome::WRONG_STATE,
        );
        fails(
            &b.simple(Opcode::TeardownHca),
            CmdStatus::BadSysStateErr,
            syndrome::WRONG_STATE,
        );
        ok(&b.simple(Opcode::DisableHca));
        assert_eq!(b.fw.state(), HcaState::Disabled);
    }

    #[test]
    fn first_free_finds_gaps_and_respects_bounds() {
        let s: BTreeSet<u32> = [3, 4, 6].into_iter().collect();
        assert_eq!(first_free(s.iter(), 3, 10), Some(5));
        assert_eq!(first_free(s.iter(), 1, 10), Some(1));
        assert_eq!(first_free(s.iter(), 3, 4), None);
        let full: BTreeSet<u32> = [u32::MAX].into_iter().collect();
        assert_eq!(first_free(full.iter(), u32::MAX, u32::MAX), None);
    }

    #[test]
    fn command_log_is_bounded() {
        let mut fw = Firmware::new(FunctionId::vf(0));
        for i in 0..CMD_LOG_CAPACITY + 10 {
            fw.record(CmdRecord {
                slot: 0,
                opcode: i as u16,
                op_mod: 0,
                vhca_id: 1,
                delivery: DeliveryStatus::Ok,
                status: CmdStatus::Ok,
                syndrome: 0,
            });
        }
        let log = fw.command_log();
        assert_eq!(log.len(), CMD_LOG_CAPACITY);
        assert_eq!(log[0].opcode, 10);
        fw.reset();
        assert_eq!(
            fw.command_log().len(),
            CMD_LOG_CAPACITY,
            "reset keeps the log"
        );
    }
}
