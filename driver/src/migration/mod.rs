//! VFIO migration v2, as mlx5vf implements it: the state machine ([`fsm`]), the arcs
//! as firmware commands ([`arcs`]), the migration stream ([`stream`]), the saving side
//! with pre-copy and chunk mode ([`precopy`]), the resuming side ([`resume`]), and
//! several VFs moved together through RUNNING_P2P ([`group`]).
//!
//! [`MigrationDevice`] is mlx5vf's per-VF device (`struct mlx5vf_pci_core_device`):
//! it drives one VF through the PF's command interface, naming it by `vhca_id`.
//!
//! # Locking and reset
//! Lock order: `Shared::inner` (this VF's `state_mutex`), then `Shared::reset_pending`
//! (`reset_lock`), then the PF command interface's own short locks ([`crate::cmdif`]).
//!
//! `state_mutex` guards this VF's state and migration files and serialises the VF's
//! operations, as mlx5vf does: it is held while an arc's commands run, because the
//! arc's outcome decides the state. It is per VF, so it never delays another VF: the
//! PF is shared as an `Arc<Hca>` whose command interface takes no lock across a wait,
//! and commands for different VFs are in flight on different slots together.
//! [`MigrationDevice::reset`]
//! is mlx5vf's `reset_done`: it marks a reset as pending and, if the state mutex is
//! busy (a command in flight), leaves it to the holder, which carries it out when it
//! unlocks (`mlx5vf_state_mutex_unlock`). A reset lands in RUNNING, closes the data
//! streams (later reads and writes get ENODEV) and is the only way out of ERROR.
//!
//! # ERROR
//! mlx5vf never reports ERROR. This driver does when the device can no longer be
//! trusted: a command that never completed or whose transport failed (it may or may
//! not have run), a LOAD that failed after part of the stream was applied or that
//! the firmware failed internally (INT_ERR: part of the image may be in), or a PF
//! whose health says the firmware failed ([`crate::cmdif::HealthFault`]: all-ones
//! reads, interface disabled or reset, a health syndrome). Health is read before each
//! arc and after any failure that came from the device (mlx5_core's poll timer plays
//! that part in the kernel, where a fatal sensor makes every later command fail with
//! ENXIO). After a command that never completed or with an unhealthy PF, the files are
//! dropped without firmware cleanup (more commands could only time out; their pages
//! are leaked, not reused). Any other failed arc leaves the device in the last state
//! reached and returns the errno.

//!
//! # Deliberate differences from mlx5vf
//! Each place this driver reports ERROR where mlx5vf reports only an errno (and stays
//! in, or walks back to, a state it cannot vouch for). The fault-injection suites
//! (`tests/fault_*.rs`) have one named test per row.
//!
//! | condition | mlx5vf | this driver |
//! |---|---|---|
//! | a command times out (`CmdError::Timeout`) | errno (-ETIMEDOUT), state unchanged | ERROR, files dropped without firmware cleanup |
//! | the PF's vfio-user transport fails mid-command (`CmdError::Vfu`, `Aborted`) | (no equivalent: PCIe does not fail that way) | ERROR |
//! | the PF's health shows a firmware fatal (syndrome, frozen counter seen by the health read, all-ones BAR0, interface disabled) | mlx5_core enters INTERNAL_ERROR, every later command -ENXIO; the VFIO state stays as it was | ERROR with -ENXIO, before any arc runs |
//! | a LOAD fails after an earlier LOAD of the stream applied | errno, RESUMING | ERROR |
//! | a LOAD fails with INT_ERR (the firmware failed inside it) | errno, RESUMING | ERROR |
//! | the resuming stream ends inside a record at RESUMING → STOP, some of it loaded | errno | ERROR |
//!
//! Everything else (a refusal such as BAD_PARAM or BAD_RES_STATE, ENOMEM, a stream
//! the parser refuses before any LOAD) leaves the device in the last state reached
//! with the errno, as mlx5vf does; reset is the only way out of ERROR.

pub mod arcs;
pub mod fsm;
pub mod fw;
pub mod group;
pub mod live;
pub mod precopy;
pub mod resume;
pub mod stream;

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use mlx5_prm::cmd::migration::ResumeOpMod;

use crate::cmdif::{ArenaError, CmdError, HealthFault};
use crate::hca::{Hca, HcaError, MigrationCaps};
use arcs::Opened;
use fsm::{FsmError, MigFlags, MigState};
use fw::Fw;
pub use group::{GroupError, MigrationGroup};
pub use precopy::{PrecopyInfo, SaveState, SaveStats};
use precopy::{ReadStep, SaveFile};
use resume::ResumeFile;
pub use stream::StreamError;

/// Deferred resets carried out by one unlock at most (each needs a new `reset()` call).
const MAX_DEFERRED_RESETS: usize = 64;

/// Locks a mutex; a poisoned one (a panic elsewhere) is taken over as is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Errors of the migration driver; [`MigError::errno`] is what the kernel returns.
#[derive(Debug, thiserror::Error)]
pub enum MigError {
    #[error("{what}: {source}")]
    Cmd {
        what: &'static str,
        #[source]
        source: CmdError,
    },
    #[error("{what}: {source}")]
    Hca {
        what: &'static str,
        #[source]
        source: HcaError,
    },
    #[error("migration state machine: {0}")]
    Fsm(#[from] FsmError),
    #[error("resume stream refused: {0}")]
    Stream(#[from] StreamError),
    #[error("resume stream incomplete at RESUMING -> STOP ({loaded} records loaded): {source}")]
    Incomplete {
        loaded: u64,
        #[source]
        source: StreamError,
    },
    #[error("VF {vf} does not support migration: {why}")]
    NotSupported { vf: u16, why: &'static str },
    #[error("a migration device starts in RUNNING, RUNNING_P2P or STOP, not {state}")]
    BadInitialState { state: MigState },
    #[error("{from} -> {to} is not an arc this driver implements (the state machine offered it; a driver bug)")]
    NotAnArc { from: MigState, to: MigState },
    #[error("{from} -> {to} opened a data stream inside a path; the stream was closed")]
    StreamInsidePath { from: MigState, to: MigState },
    #[error("{op} on a {dir:?} stream")]
    WrongDirection { op: &'static str, dir: Opened },
    #[error("QUERY_VHCA_MIGRATION_STATE reported migration_state {value:#x}, which this driver does not know")]
    UnknownMigrationState { value: u8 },
    #[error("SAVE_VHCA_STATE reported an image of {image} bytes in a {buffer}-byte buffer")]
    ImageOverflow { image: u64, buffer: u64 },
    #[error("a {bytes}-byte migration buffer exceeds the largest SAVE/LOAD buffer ({max} bytes)")]
    BufferTooLarge { bytes: u64, max: u64 },
    #[error("a {bytes}-byte migration buffer needs {pages} pages, the PF's DMA arena has {free} free (raise the arena size)")]
    ArenaExhausted {
        bytes: u64,
        pages: usize,
        free: usize,
    },
    #[error("access of {len} bytes at offset {offset} outside a {size}-byte migration buffer")]
    BufferRange { offset: u64, len: u64, size: u64 },
    #[error("migration buffer access: {source}")]
    BufferAccess {
        #[source]
        source: ArenaError,
    },
    #[error("stop-copy buffer size overflows (device state of {state_size} bytes plus 10%)")]
    StopCopySizeOverflow { state_size: u64 },
    #[error("pre-copy cleanup SAVE failed: {source}")]
    PreCopyCleanup {
        #[source]
        source: Box<MigError>,
    },
    #[error(
        "the saving file had failed before pre-copy ended; the data read so far is not usable"
    )]
    SaveFailedEarlier,
    #[error("no stream data queued yet; read again")]
    NoDataYet,
    #[error("the device is in ERROR; only a reset leaves it")]
    InError,
    #[error("{0} is only valid in PRE_COPY or PRE_COPY_P2P")]
    NotPreCopy(&'static str),
    #[error("the migration data stream is closed or failed")]
    NoDev,
    #[error("no more pre-copy data for now (temporary end of stream)")]
    NoMsg,
    #[error("the PF's firmware is not healthy: {0}")]
    Unhealthy(HealthFault),
}

impl MigError {
    /// The negative errno the kernel would return.
    pub fn errno(&self) -> i32 {
        match self {
            MigError::Cmd { source, .. } => source.errno(),
            MigError::Hca { source, .. } => source.errno(),
            MigError::Fsm(e) => -e.errno().abs(),
            MigError::Stream(e) => e.errno(),
            MigError::Incomplete { .. } => -libc::EINVAL,
            MigError::NotSupported { .. } => -libc::EOPNOTSUPP,
            MigError::BadInitialState { .. }
            | MigError::NotAnArc { .. }
            | MigError::StreamInsidePath { .. }
            | MigError::WrongDirection { .. }
            | MigError::BufferRange { .. } => -libc::EINVAL,
            MigError::UnknownMigrationState { .. }
            | MigError::ImageOverflow { .. }
            | MigError::BufferAccess { .. }
            | MigError::PreCopyCleanup { .. }
            | MigError::SaveFailedEarlier => -libc::EIO,
            MigError::BufferTooLarge { .. } | MigError::ArenaExhausted { .. } => -libc::ENOMEM,
            MigError::StopCopySizeOverflow { .. } => -libc::EOVERFLOW,
            MigError::NoDataYet => -libc::EAGAIN,
            MigError::InError | MigError::NotPreCopy(_) => -libc::EINVAL,
            MigError::NoDev => -libc::ENODEV,
            MigError::NoMsg => -libc::ENOMSG,
            // mlx5_cmd_exec once the core device is in INTERNAL_ERROR.
            MigError::Unhealthy(_) => -libc::ENXIO,
        }
    }

    /// Whether the device can no longer be trusted after this failure.
    pub fn is_fatal(&self) -> bool {
        match self {
            MigError::Cmd { source, .. } => cmd_is_fatal(source),
            MigError::Hca { source, .. } => source.cmd_error().is_some_and(cmd_is_fatal),
            MigError::Stream(e) => e.is_fatal(),
            MigError::Incomplete { loaded, .. } => *loaded > 0,
            MigError::Unhealthy(_) => true,
            _ => false,
        }
    }

    /// Whether the firmware cannot be reached any more: a command that never completed,
    /// a failed transport, an unhealthy PF.
    pub(crate) fn unreachable(&self) -> bool {
        match self {
            MigError::Cmd { source, .. } => cmd_is_fatal(source),
            MigError::Hca { source, .. } => source.cmd_error().is_some_and(cmd_is_fatal),
            MigError::Stream(StreamError::Sink { source, .. }) => source.unreachable,
            MigError::Unhealthy(_) => true,
            _ => false,
        }
    }

    /// Whether the failure came from the device or the command interface (as opposed
    /// to the caller's request, the stream's content or the end of the data).
    fn is_device_failure(&self) -> bool {
        matches!(
            self,
            MigError::Cmd { .. }
                | MigError::Hca { .. }
                | MigError::Stream(StreamError::Sink { .. })
                | MigError::NotAnArc { .. }
                | MigError::StreamInsidePath { .. }
                | MigError::UnknownMigrationState { .. }
                | MigError::ImageOverflow { .. }
                | MigError::BufferTooLarge { .. }
                | MigError::ArenaExhausted { .. }
                | MigError::BufferRange { .. }
                | MigError::BufferAccess { .. }
                | MigError::StopCopySizeOverflow { .. }
                | MigError::PreCopyCleanup { .. }
                | MigError::SaveFailedEarlier
                | MigError::NoDataYet
        )
    }

    /// As an `io::Error` carrying this error (kind from the errno).
    pub fn into_io(self) -> io::Error {
        let kind = io::Error::from_raw_os_error(-self.errno()).kind();
        io::Error::new(kind, self)
    }

    /// The errno of an `io::Error` from a [`DataStream`].
    pub fn io_errno(e: &io::Error) -> Option<i32> {
        e.get_ref()
            .and_then(|r| r.downcast_ref::<MigError>())
            .map(MigError::errno)
            .or_else(|| e.raw_os_error().map(|n| -n))
    }
}

/// A command that never completed (it may still run), or a transport that failed.
fn cmd_is_fatal(e: &CmdError) -> bool {
    matches!(
        e,
        CmdError::Timeout { .. } | CmdError::Vfu(_) | CmdError::Aborted { .. } | CmdError::Irq(_)
    )
}

/// The VF a [`MigrationDevice`] drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfInfo {
    pub vf: u16,
    pub vhca_id: u16,
    pub caps: MigrationCaps,
    pub chunk_mode: bool,
}

/// State under `state_mutex`.
pub(crate) struct Inner {
    pub(crate) pf: Arc<Hca>,
    pub(crate) vhca_id: u16,
    pub(crate) chunk_mode: bool,
    pub(crate) state: MigState,
    pub(crate) saving: Option<SaveFile>,
    pub(crate) resuming: Option<ResumeFile>,
    /// Bumped whenever the files are closed; a stream of an older generation is dead.
    pub(crate) generation: u64,
}

impl Inner {
    /// `mlx5vf_disable_fds`: closes both files and frees their buffers and PDs.
    pub(crate) fn disable_fds(&mut self, fw: &Fw<'_>) {
        if let Some(f) = self.saving.take() {
            f.close(fw);
        }
        if let Some(f) = self.resuming.take() {
            f.close(fw);
        }
        self.generation += 1;
    }

    fn disable_fds_locked(&mut self) {
        if self.saving.is_none() && self.resuming.is_none() {
            self.generation += 1;
            return;
        }
        let pf = self.pf.clone();
        let fw = Fw {
            hca: &pf,
            vhca_id: self.vhca_id,
            chunk_mode: self.chunk_mode,
        };
        self.disable_fds(&fw);
    }

    /// Drops both files without a firmware command: the device cannot be reached (or
    /// trusted), so their buffers' pages are leaked rather than reused (the device may
    /// still write them) and their mkeys and PDs stay in the firmware.
    fn abandon_fds(&mut self) {
        let saving = self.saving.take().is_some();
        let resuming = self.resuming.take().is_some();
        if saving || resuming {
            tracing::warn!(
                vhca_id = self.vhca_id,
                saving,
                resuming,
                "migration files abandoned without firmware cleanup; their DMA pages are leaked"
            );
        }
        self.generation += 1;
    }

    /// The deferred reset: RUNNING, files closed. The function reset itself (FLR) is
    /// the caller's; RESUME_VHCA responder then initiator are issued best effort so a
    /// function that was not reset is not left suspended (not if the PF is unhealthy:
    /// they could only time out).
    fn do_reset(&mut self) {
        tracing::info!(vhca_id = self.vhca_id, from = %self.state, "reset: migration state back to RUNNING");
        if let Err(e) = self.check_health() {
            tracing::warn!(vhca_id = self.vhca_id, error = %e, "reset: PF unhealthy; RUNNING without RESUME_VHCA");
            self.abandon_fds();
            self.state = MigState::Running;
            return;
        }
        self.disable_fds_locked();
        let pf = self.pf.clone();
        let fw = Fw {
            hca: &pf,
            vhca_id: self.vhca_id,
            chunk_mode: self.chunk_mode,
        };
        for op_mod in [ResumeOpMod::Responder, ResumeOpMod::Initiator] {
            if let Err(e) = fw.resume(op_mod) {
                tracing::debug!(error = %e, "reset: RESUME_VHCA (already running?)");
            }
        }
        self.state = MigState::Running;
    }

    fn fw_call<T>(&mut self, f: impl FnOnce(&Fw<'_>, &mut Self) -> T) -> T {
        let pf = self.pf.clone();
        let fw = Fw {
            hca: &pf,
            vhca_id: self.vhca_id,
            chunk_mode: self.chunk_mode,
        };
        f(&fw, self)
    }

    /// The PF's health (BAR0 health buffer and nic_interface). A failure to read it is
    /// a transport failure, itself fatal.
    fn check_health(&mut self) -> Result<(), MigError> {
        let fault = self.pf.cmd().health().map_err(|source| MigError::Cmd {
            what: "read the PF's health",
            source,
        })?;
        match fault {
            None => Ok(()),
            Some(f) => Err(MigError::Unhealthy(f)),
        }
    }

    /// After a failure: a fatal one, or a device failure while the PF's health is bad
    /// (the refusal may come from a failing firmware), puts the device in ERROR and
    /// closes the files. The caller returns the original error.
    fn note_failure(&mut self, e: &MigError) {
        if self.state == MigState::Error {
            return;
        }
        // Whether the firmware can still be asked to free the files' buffers: not after
        // a command that never completed (the queue may be wedged, the command may
        // still write into them) nor when the PF is unhealthy.
        let (untrusted, reachable) = if e.is_fatal() {
            (Some(e.to_string()), !e.unreachable())
        } else if !e.is_device_failure() {
            (None, true)
        } else {
            match self.check_health() {
                Ok(()) => (None, true),
                Err(h) => (Some(format!("{e}; {h}")), false),
            }
        };
        if let Some(why) = untrusted {
            tracing::error!(vhca_id = self.vhca_id, from = %self.state, error = %why, "device can no longer be trusted: ERROR");
            if reachable {
                self.disable_fds_locked();
            } else {
                self.abandon_fds();
            }
            self.state = MigState::Error;
        }
    }
}

struct Shared {
    inner: Mutex<Inner>,
    /// `reset_lock` + `deferred_reset`.
    reset_pending: Mutex<bool>,
    info: VfInfo,
}

/// `state_mutex` held; unlocking carries out a reset that arrived meanwhile.
struct Guard<'a> {
    shared: &'a Shared,
    inner: Option<MutexGuard<'a, Inner>>,
}

impl std::ops::Deref for Guard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        // Present until drop.
        self.inner.as_deref().unwrap_or_else(|| unreachable_inner())
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        match self.inner.as_deref_mut() {
            Some(i) => i,
            None => unreachable_inner(),
        }
    }
}

#[cold]
fn unreachable_inner() -> ! {
    // The guard only gives up its MutexGuard in Drop, after which it is never used.
    std::process::abort()
}

impl Drop for Guard<'_> {
    /// `mlx5vf_state_mutex_unlock`.
    fn drop(&mut self) {
        for _ in 0..MAX_DEFERRED_RESETS {
            let mut pending = lock(&self.shared.reset_pending);
            if *pending {
                *pending = false;
                drop(pending);
                if let Some(inner) = self.inner.as_deref_mut() {
                    inner.do_reset();
                }
                continue;
            }
            // Unlock the state while holding reset_lock, so a reset that finds the
            // state busy is sure to be seen by this loop or to get the lock itself.
            self.inner.take();
            drop(pending);
            return;
        }
        tracing::warn!("too many resets while unlocking; the last one stays pending");
        self.inner.take();
    }
}

/// A VF's migration driver.
#[derive(Clone)]
pub struct MigrationDevice {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MigrationDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationDevice")
            .field("info", &self.shared.info)
            .finish_non_exhaustive()
    }
}

impl MigrationDevice {
    /// Probes VF `vf` through the PF (up): its vhca_id (QUERY_HCA_CAP other_function,
    /// function_id = vf + 1) and the caps mlx5vf requires (migration, multi_load,
    /// tracking_state); chunk mode if migration_in_chunks. Starts in RUNNING.
    pub fn new(pf: Arc<Hca>, vf: u16) -> Result<Self, MigError> {
        Self::with_state(pf, vf, MigState::Running)
    }

    /// As [`MigrationDevice::new`], starting from `state` (RUNNING, RUNNING_P2P or
    /// STOP: e.g. what `mlx5vf state` inferred from the firmware).
    pub fn with_state(pf: Arc<Hca>, vf: u16, state: MigState) -> Result<Self, MigError> {
        if !matches!(
            state,
            MigState::Running | MigState::RunningP2p | MigState::Stop
        ) {
            return Err(MigError::BadInitialState { state });
        }
        let function_id = vf.checked_add(1).ok_or(MigError::NotSupported {
            vf,
            why: "VF number too large",
        })?;
        let other = pf
            .query_other_caps(function_id)
            .map_err(|source| MigError::Hca {
                what: "query the VF's caps",
                source,
            })?;
        let caps = other.migration;
        if !caps.migration {
            return Err(MigError::NotSupported {
                vf,
                why: "cmd_hca_cap.migration is 0",
            });
        }
        if !(caps.multi_load && caps.tracking_state) {
            return Err(MigError::NotSupported {
                vf,
                why: "PRE_COPY needs migration_multi_load and migration_tracking_state",
            });
        }
        let info = VfInfo {
            vf,
            vhca_id: other.vhca_id,
            caps,
            chunk_mode: caps.in_chunks,
        };
        tracing::debug!(?info, "migration device probed");
        Ok(MigrationDevice {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    pf,
                    vhca_id: info.vhca_id,
                    chunk_mode: info.chunk_mode,
                    state,
                    saving: None,
                    resuming: None,
                    generation: 0,
                }),
                reset_pending: Mutex::new(false),
                info,
            }),
        })
    }

    fn lock(&self) -> Guard<'_> {
        Guard {
            shared: &self.shared,
            inner: Some(lock(&self.shared.inner)),
        }
    }

    pub fn info(&self) -> VfInfo {
        self.shared.info
    }

    /// The migration flags: STOP_COPY | P2P | PRE_COPY, as mlx5vf.
    pub fn flags(&self) -> MigFlags {
        MigFlags::MLX5VF
    }

    /// VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE GET.
    pub fn state(&self) -> MigState {
        self.lock().state
    }

    /// VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE SET: walks [`fsm::path`] one arc at a
    /// time. Returns the data stream the last arc opened (saving or resuming).
    pub fn set_state(&self, target: MigState) -> Result<Option<DataStream>, MigError> {
        let mut g = self.lock();
        if g.state == MigState::Error {
            return Err(MigError::InError);
        }
        let path = fsm::path(g.state, target, MigFlags::MLX5VF)?;
        let last = path.len().saturating_sub(1);
        let mut opened = None;
        for (i, &to) in path.iter().enumerate() {
            let from = g.state;
            let span = tracing::info_span!(
                "migration_arc",
                %from,
                %to,
                vhca_id = g.vhca_id,
                result = tracing::field::Empty
            );
            let _enter = span.enter();
            match g.check_health().and_then(|()| arcs::step(&mut g, from, to)) {
                Ok(o) => {
                    g.state = to;
                    span.record("result", "ok");
                    if o.is_some() && i != last {
                        tracing::warn!(%from, %to, "a data stream opened inside a path");
                        g.disable_fds_locked();
                        return Err(MigError::StreamInsidePath { from, to });
                    }
                    opened = o;
                }
                Err(e) => {
                    span.record("result", tracing::field::display(&e));
                    tracing::info!(%from, %to, errno = e.errno(), error = %e, "arc failed");
                    g.note_failure(&e);
                    return Err(e);
                }
            }
        }
        Ok(opened.map(|dir| DataStream {
            shared: self.shared.clone(),
            generation: g.generation,
            dir,
        }))
    }

    /// VFIO_MIG_GET_PRECOPY_INFO (issued on the saving stream in the uAPI; see also
    /// [`DataStream::precopy_info`]).
    pub fn precopy_info(&self) -> Result<PrecopyInfo, MigError> {
        let mut g = self.lock();
        precopy_info_locked(&mut g, None)
    }

    /// VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: QUERY (non-incremental) →
    /// remaining_total_size in chunk mode, else required_umem_size.
    pub fn data_size(&self) -> Result<u64, MigError> {
        let mut g = self.lock();
        if g.state == MigState::Error {
            return Err(MigError::InError);
        }
        let r = g.fw_call(|fw, _| fw.query(false));
        match r {
            Ok(q) => Ok(q.total),
            Err(e) => {
                g.note_failure(&e);
                Err(e)
            }
        }
    }

    /// Reset done (FLR / VFIO_DEVICE_RESET): RUNNING, streams closed. If a command is
    /// in flight the reset is carried out when it ends.
    pub fn reset(&self) {
        let mut pending = lock(&self.shared.reset_pending);
        *pending = true;
        match self.shared.inner.try_lock() {
            Ok(inner) => {
                drop(pending);
                drop(Guard {
                    shared: &self.shared,
                    inner: Some(inner),
                });
            }
            Err(std::sync::TryLockError::Poisoned(p)) => {
                drop(pending);
                drop(Guard {
                    shared: &self.shared,
                    inner: Some(p.into_inner()),
                });
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                tracing::debug!("reset deferred: a command is in flight");
            }
        }
    }

    /// Counters of the current saving file, if any.
    pub fn save_stats(&self) -> Option<SaveStats> {
        self.lock().saving.as_ref().map(SaveFile::stats)
    }
}

fn precopy_info_locked(
    g: &mut Guard<'_>,
    generation: Option<u64>,
) -> Result<PrecopyInfo, MigError> {
    let state = g.state;
    if !matches!(state, MigState::PreCopy | MigState::PreCopyP2p) {
        return Err(MigError::NotPreCopy("VFIO_MIG_GET_PRECOPY_INFO"));
    }
    if generation.is_some_and(|gen| gen != g.generation) || g.saving.is_none() {
        return Err(MigError::NoDev);
    }
    let r = g.fw_call(|fw, inner| match inner.saving.as_mut() {
        Some(f) => f.precopy_info(fw, state == MigState::PreCopy),
        None => Err(MigError::NoDev),
    });
    if let Err(e) = &r {
        g.note_failure(e);
    }
    r
}

/// Direction of a [`DataStream`].
pub use arcs::Opened as Direction;

/// A migration data stream (the data_fd): [`io::Read`] when saving, [`io::Write`]
/// when resuming. Closed by the arc that ends the session, by reset, or by ERROR;
/// after that every call returns ENODEV.
pub struct DataStream {
    shared: Arc<Shared>,
    generation: u64,
    dir: Opened,
}

impl std::fmt::Debug for DataStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataStream")
            .field("dir", &self.dir)
            .field("generation", &self.generation)
            .finish()
    }
}

impl DataStream {
    pub fn direction(&self) -> Direction {
        self.dir
    }

    fn lock(&self) -> Guard<'_> {
        Guard {
            shared: &self.shared,
            inner: Some(lock(&self.shared.inner)),
        }
    }

    /// Reads the saving stream: ENOMSG at the pre-copy temporary end, 0 at the end of
    /// STOP_COPY, ENODEV once closed or failed. Image bytes are copied once, from the
    /// DMA buffer the SAVE wrote straight into `buf`, with no lock held
    /// ([`precopy`]'s "Reads and chunk mode"); a read that finds a chunk SAVE still
    /// running waits for it.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, MigError> {
        if self.dir != Opened::Saving {
            return Err(MigError::WrongDirection {
                op: "read",
                dir: self.dir,
            });
        }
        let mut done = 0usize;
        for _ in 0..precopy::MAX_READ_STEPS {
            let (step, pf) = {
                let mut g = self.lock_saving()?;
                let r = g.fw_call(|fw, inner| match inner.saving.as_mut() {
                    Some(f) => f.read_step(fw, &mut buf[done..], done),
                    None => Err(MigError::NoDev),
                });
                match r {
                    Ok(step) => (step, g.pf.clone()),
                    Err(e) => {
                        g.note_failure(&e);
                        return Err(e);
                    }
                }
            };
            match step {
                ReadStep::Copied(n) => done += n,
                ReadStep::Wait(save) => save.wait(),
                ReadStep::End => break,
                ReadStep::Arena { seq, runs, len } => {
                    let out = &mut buf[done..done + len];
                    let copied = runs.iter().try_for_each(|&(iova, at, n)| {
                        pf.cmd()
                            .arena()
                            .read(iova, &mut out[at..at + n])
                            .map_err(|source| MigError::BufferAccess { source })
                    });
                    let mut g = self.lock_saving()?;
                    let r = copied.and_then(|()| {
                        g.fw_call(|fw, inner| match inner.saving.as_mut() {
                            Some(f) => f.commit(fw, seq, len),
                            None => Err(MigError::NoDev),
                        })
                    });
                    match r {
                        Ok(()) => done += len,
                        Err(e) => {
                            g.note_failure(&e);
                            return Err(e);
                        }
                    }
                }
            }
            if done == buf.len() {
                break;
            }
        }
        if done > 0 || buf.is_empty() {
            return Ok(done);
        }
        let g = self.lock_saving()?;
        match g.saving.as_ref() {
            Some(f) => f.end_of_data(),
            None => Err(MigError::NoDev),
        }
    }

    /// The state lock, if this saving stream's session is still open (else ENODEV).
    fn lock_saving(&self) -> Result<Guard<'_>, MigError> {
        let g = self.lock();
        if g.generation != self.generation || g.saving.is_none() {
            return Err(MigError::NoDev);
        }
        Ok(g)
    }

    /// Writes any part of the resuming stream; one LOAD per complete FW_DATA record.
    pub fn write_data(&mut self, data: &[u8]) -> Result<usize, MigError> {
        self.stream_io(Opened::Resuming, "write", |fw, inner| {
            match inner.resuming.as_mut() {
                Some(f) => f.write(fw, data),
                None => Err(MigError::NoDev),
            }
        })
    }

    /// One read or write of this stream: EINVAL in the wrong direction, ENODEV once the
    /// stream's session is gone; a failure is noted on the device (it may mean ERROR).
    fn stream_io(
        &mut self,
        dir: Opened,
        wrong_dir: &'static str,
        f: impl FnOnce(&Fw<'_>, &mut Inner) -> Result<usize, MigError>,
    ) -> Result<usize, MigError> {
        if self.dir != dir {
            return Err(MigError::WrongDirection {
                op: wrong_dir,
                dir: self.dir,
            });
        }
        let mut g = self.lock();
        let open = match dir {
            Opened::Saving => g.saving.is_some(),
            Opened::Resuming => g.resuming.is_some(),
        };
        if g.generation != self.generation || !open {
            return Err(MigError::NoDev);
        }
        let r = g.fw_call(f);
        if let Err(e) = &r {
            g.note_failure(e);
        }
        r
    }

    /// VFIO_MIG_GET_PRECOPY_INFO on this stream.
    pub fn precopy_info(&self) -> Result<PrecopyInfo, MigError> {
        if self.dir != Opened::Saving {
            return Err(MigError::NotPreCopy("VFIO_MIG_GET_PRECOPY_INFO"));
        }
        let mut g = self.lock();
        precopy_info_locked(&mut g, Some(self.generation))
    }
}

impl io::Read for DataStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_data(buf).map_err(MigError::into_io)
    }
}

impl io::Write for DataStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_data(buf).map_err(MigError::into_io)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
