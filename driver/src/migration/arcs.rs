//! The 15 arcs of mlx5vf (`kernel-mlx5vf.md` §3.2) as firmware commands, issued
//! through the PF's command interface and naming the VF by its `vhca_id`, plus the
//! DMA buffers SAVE and LOAD use: pages of the PF's DMA arena behind an MTT mkey in
//! the migration file's own PD (mlx5vf's `mlx5_vhca_data_buffer`).
//!
//! | arc                                   | commands                                      |
//! |---------------------------------------|-----------------------------------------------|
//! | RUNNING→RUNNING_P2P, PRE_COPY→PRE_COPY_P2P | SUSPEND_VHCA initiator                   |
//! | RUNNING_P2P→STOP                      | SUSPEND_VHCA responder                        |
//! | STOP→RUNNING_P2P                      | RESUME_VHCA responder                         |
//! | RUNNING_P2P→RUNNING, PRE_COPY_P2P→PRE_COPY | RESUME_VHCA initiator                    |
//! | STOP→STOP_COPY                        | saving file: ALLOC_PD, QUERY, SAVE            |
//! | RUNNING→PRE_COPY, RUNNING_P2P→PRE_COPY_P2P | saving file, tracked: ALLOC_PD, QUERY, SAVE(set_track) |
//! | PRE_COPY→RUNNING, PRE_COPY_P2P→RUNNING_P2P | QUERY(inc), cleanup SAVE, close the file |
//! | PRE_COPY_P2P→STOP_COPY                | SUSPEND_VHCA responder, QUERY(inc, final), SAVE(inc) |
//! | STOP_COPY→STOP                        | close the file                                |
//! | STOP→RESUMING                         | resuming file: ALLOC_PD                       |
//! | RESUMING→STOP                         | check the stream is complete, close the file  |
//!
//! Deviation: mlx5vf issues SAVE asynchronously and reports its failure on the next
//! read; here SAVE completes before the arc (or the read, or PRECOPY_INFO) returns, so
//! its failure is the arc's error.

use mlx5_prm::cmd::migration::{ResumeOpMod, SuspendOpMod};

use super::fsm::MigState;
use super::fw::Fw;
use super::precopy::SaveFile;
use super::resume::ResumeFile;
use super::{Inner, MigError};

/// Which data stream an arc opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Saving,
    Resuming,
}

/// Carries out one arc `from → to` (`mlx5vf_pci_step_device_state_locked`). The caller
/// moves the state on success; on failure it stays at `from`, or goes to ERROR when
/// the error is fatal.
pub(crate) fn step(
    inner: &mut Inner,
    from: MigState,
    to: MigState,
) -> Result<Option<Opened>, MigError> {
    use MigState::*;
    let pf = inner.pf.clone();
    let fw = Fw {
        hca: &pf,
        vhca_id: inner.vhca_id,
        chunk_mode: inner.chunk_mode,
    };
    match (from, to) {
        (Running, RunningP2p) => fw.suspend(SuspendOpMod::Initiator).map(|_| None),
        (PreCopy, PreCopyP2p) => fw.suspend(SuspendOpMod::Initiator).map(|_| None),
        (RunningP2p, Stop) => fw.suspend(SuspendOpMod::Responder).map(|_| None),
        (Stop, RunningP2p) => fw.resume(ResumeOpMod::Responder).map(|_| None),
        (RunningP2p, Running) | (PreCopyP2p, PreCopy) => {
            fw.resume(ResumeOpMod::Initiator).map(|_| None)
        }
        (Stop, StopCopy) => {
            let f = SaveFile::open(&fw, pf.clone(), false)?;
            inner.saving = Some(f);
            Ok(Some(Opened::Saving))
        }
        (Running, PreCopy) | (RunningP2p, PreCopyP2p) => {
            let f = SaveFile::open(&fw, pf.clone(), true)?;
            inner.saving = Some(f);
            Ok(Some(Opened::Saving))
        }
        (PreCopy, Running) | (PreCopyP2p, RunningP2p) => {
            let result = match inner.saving.as_mut() {
                Some(f) => f.pre_copy_cleanup(&fw),
                None => Ok(()),
            };
            let was_error = inner.saving.as_ref().is_some_and(SaveFile::is_error);
            if result.as_ref().is_err_and(MigError::unreachable) {
                // The caller abandons the file: closing it would only time out again.
            } else {
                inner.disable_fds(&fw);
            }
            match result {
                Err(e) if e.is_fatal() => Err(e),
                Err(e) => Err(MigError::PreCopyCleanup {
                    source: Box::new(e),
                }),
                Ok(()) if was_error => Err(MigError::SaveFailedEarlier),
                Ok(()) => Ok(None),
            }
        }
        (PreCopyP2p, StopCopy) => {
            fw.suspend(SuspendOpMod::Responder)?;
            match inner.saving.as_mut() {
                Some(f) => f.save_final(&fw).map(|_| None),
                None => Err(MigError::NoDev),
            }
        }
        (StopCopy, Stop) => {
            inner.disable_fds(&fw);
            Ok(None)
        }
        (Stop, Resuming) => {
            let f = ResumeFile::open(&fw)?;
            inner.resuming = Some(f);
            Ok(Some(Opened::Resuming))
        }
        (Resuming, Stop) => {
            let check = match inner.resuming.as_ref() {
                Some(f) => f.check_complete(),
                None => Ok(()),
            };
            // The device keeps RESUMING (a reset aborts it) unless part of the
            // stream was already loaded, which `is_fatal` reports.
            check?;
            inner.disable_fds(&fw);
            Ok(None)
        }
        _ => {
            tracing::warn!(%from, %to, "not an mlx5vf arc");
            Err(MigError::NotAnArc { from, to })
        }
    }
}
