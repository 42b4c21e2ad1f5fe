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

use std::sync::atomic::{AtomicU8, Ordering};

use mlx5_prm::ifc::{get, set};
use mlx5_prm::Opcode;

use super::fsm::MigState;
use super::layout::*;
use super::precopy::SaveFile;
use super::resume::ResumeFile;
use super::{Inner, MigError};
use crate::cmdif::arena::PAGE_SIZE;
use crate::cmdif::{new_input, CmdError, DmaArena};
use crate::hca::Hca;

/// Largest SAVE buffer: `save_vhca_state_in.size` is 32 bits (`2^32 - PAGE_SIZE`).
pub const MAX_BUF_BYTES: u64 = (1 << 32) - PAGE_SIZE;
const LOG_PAGE_SIZE: u8 = 12;

/// The PF's command interface, locked, aimed at one VF.
pub struct Fw<'a> {
    pub hca: &'a mut Hca,
    pub vhca_id: u16,
    pub chunk_mode: bool,
}

/// What QUERY_VHCA_MIGRATION_STATE returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryOut {
    pub required_umem_size: u64,
    /// `remaining_total_size` in chunk mode, else `required_umem_size`.
    pub total: u64,
    /// The 2026 `migration_state` nibble (0 when the firmware does not report it).
    pub migration_state: u8,
}

/// What SAVE_VHCA_STATE returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveOut {
    pub actual_image_size: u64,
    pub next_required_umem_size: u64,
}

fn cmd_err(what: &'static str) -> impl Fn(CmdError) -> MigError {
    move |source| MigError::Cmd { what, source }
}

impl Fw<'_> {
    fn input(&self, op: Opcode, op_mod: u16, len: usize) -> Vec<u8> {
        let mut m = new_input(op, op_mod, len);
        set(&mut m, VHCA_ID, self.vhca_id.into());
        m
    }

    /// SUSPEND_VHCA with `op_mod` (initiator 0, responder 1).
    pub fn suspend(&mut self, op_mod: u16) -> Result<(), MigError> {
        let m = self.input(Opcode::SuspendVhca, op_mod, SUSPEND_RESUME_IN_LEN);
        self.hca
            .cmd()
            .exec(&m, SUSPEND_RESUME_OUT_LEN)
            .map(drop)
            .map_err(cmd_err("suspend vhca"))
    }

    /// RESUME_VHCA with `op_mod` (responder 0, initiator 1).
    pub fn resume(&mut self, op_mod: u16) -> Result<(), MigError> {
        let m = self.input(Opcode::ResumeVhca, op_mod, SUSPEND_RESUME_IN_LEN);
        self.hca
            .cmd()
            .exec(&m, SUSPEND_RESUME_OUT_LEN)
            .map(drop)
            .map_err(cmd_err("resume vhca"))
    }

    /// QUERY_VHCA_MIGRATION_STATE.
    pub fn query(&mut self, incremental: bool) -> Result<QueryOut, MigError> {
        let mut m = self.input(Opcode::QueryVhcaMigrationState, 0, QUERY_IN_LEN);
        set(&mut m, QUERY_IN_INCREMENTAL, incremental.into());
        set(&mut m, QUERY_IN_CHUNK, self.chunk_mode.into());
        let out = self
            .hca
            .cmd()
            .exec(&m, QUERY_OUT_LEN)
            .map_err(cmd_err("query vhca migration state"))?;
        let required = get(&out, QUERY_OUT_REQUIRED_UMEM_SIZE);
        let total = if self.chunk_mode {
            get(&out, QUERY_OUT_REMAINING_TOTAL_SIZE)
        } else {
            required
        };
        Ok(QueryOut {
            required_umem_size: required,
            total,
            migration_state: get(&out, QUERY_OUT_MIGRATION_STATE) as u8,
        })
    }

    /// SAVE_VHCA_STATE into `buf` (va 0, the buffer's mkey, its whole size).
    pub fn save(
        &mut self,
        buf: &MigBuf,
        incremental: bool,
        track: bool,
    ) -> Result<SaveOut, MigError> {
        let mut m = self.input(Opcode::SaveVhcaState, 0, SAVE_LOAD_IN_LEN);
        set(&mut m, SAVE_IN_INCREMENTAL, incremental.into());
        set(&mut m, SAVE_IN_SET_TRACK, track.into());
        set(&mut m, SAVE_LOAD_IN_VA, 0);
        set(&mut m, SAVE_LOAD_IN_MKEY, buf.mkey.into());
        set(&mut m, SAVE_LOAD_IN_SIZE, buf.size());
        let out = self
            .hca
            .cmd()
            .exec(&m, SAVE_OUT_LEN)
            .map_err(cmd_err("save vhca state"))?;
        let r = SaveOut {
            actual_image_size: get(&out, SAVE_OUT_ACTUAL_IMAGE_SIZE),
            next_required_umem_size: get(&out, SAVE_OUT_NEXT_REQUIRED_UMEM_SIZE),
        };
        // The device's word is checked before it is used to read our memory.
        if r.actual_image_size > buf.size() {
            return Err(MigError::Device {
                errno: -libc::EIO,
                why: format!(
                    "SAVE_VHCA_STATE reported an image of {} bytes in a {}-byte buffer",
                    r.actual_image_size,
                    buf.size()
                ),
            });
        }
        Ok(r)
    }

    /// LOAD_VHCA_STATE of the first `size` bytes of `buf`.
    pub fn load(&mut self, buf: &MigBuf, size: u64) -> Result<(), MigError> {
        if size > buf.size() {
            return Err(MigError::Device {
                errno: -libc::EINVAL,
                why: format!("LOAD of {size} bytes from a {}-byte buffer", buf.size()),
            });
        }
        let mut m = self.input(Opcode::LoadVhcaState, 0, SAVE_LOAD_IN_LEN);
        set(&mut m, SAVE_LOAD_IN_VA, 0);
        set(&mut m, SAVE_LOAD_IN_MKEY, buf.mkey.into());
        set(&mut m, SAVE_LOAD_IN_SIZE, size);
        self.hca
            .cmd()
            .exec(&m, LOAD_OUT_LEN)
            .map(drop)
            .map_err(cmd_err("load vhca state"))
    }

    pub fn alloc_pd(&mut self) -> Result<u32, MigError> {
        self.hca.alloc_pd().map_err(|source| MigError::Hca {
            what: "migration file PD",
            source,
        })
    }

    /// Best effort: a failure is logged (the PD leaks in the firmware).
    pub fn dealloc_pd(&mut self, pd: u32) {
        if let Err(e) = self.hca.dealloc_pd(pd) {
            tracing::warn!(pd, error = %e, "dealloc of a migration file PD failed");
        }
    }
}

/// A DMA buffer for SAVE or LOAD: arena pages behind one MTT mkey.
#[derive(Debug)]
pub struct MigBuf {
    pages: Vec<u64>,
    mkey: u32,
}

static MKEY_VARIANT: AtomicU8 = AtomicU8::new(0x5a);

impl MigBuf {
    /// A buffer of at least `bytes` (at least one page) in `pd`.
    pub fn alloc(fw: &mut Fw<'_>, pd: u32, bytes: u64) -> Result<MigBuf, MigError> {
        let bytes = bytes.max(1);
        if bytes > MAX_BUF_BYTES {
            return Err(MigError::Device {
                errno: -libc::ENOMEM,
                why: format!("a {bytes}-byte migration buffer exceeds {MAX_BUF_BYTES}"),
            });
        }
        let npages = bytes.div_ceil(PAGE_SIZE) as usize;
        let arena = fw.hca.cmd().arena_mut();
        if arena.free_pages() < npages {
            return Err(MigError::Device {
                errno: -libc::ENOMEM,
                why: format!(
                    "a {bytes}-byte migration buffer needs {npages} pages, the PF's DMA arena has {} free (raise its size)",
                    arena.free_pages()
                ),
            });
        }
        let mut pages = Vec::with_capacity(npages);
        for _ in 0..npages {
            match arena.alloc_page() {
                Some(p) => pages.push(p),
                None => break,
            }
        }
        let free = |arena: &mut DmaArena, pages: &[u64]| {
            for &p in pages {
                let _ = arena.free_page(p);
            }
        };
        if pages.len() != npages {
            free(arena, &pages);
            return Err(MigError::Device {
                errno: -libc::ENOMEM,
                why: "the PF's DMA arena ran out of pages".into(),
            });
        }
        let variant = MKEY_VARIANT.fetch_add(1, Ordering::Relaxed);
        let len = npages as u64 * PAGE_SIZE;
        match fw
            .hca
            .create_mkey_in_pd(pd, &pages, LOG_PAGE_SIZE, len, variant)
        {
            Ok(mkey) => Ok(MigBuf { pages, mkey }),
            Err(source) => {
                free(fw.hca.cmd().arena_mut(), &pages);
                Err(MigError::Hca {
                    what: "migration buffer mkey",
                    source,
                })
            }
        }
    }

    /// Destroys the mkey and returns the pages. If DESTROY_MKEY fails the device may
    /// still reach the pages, so they are leaked rather than reused.
    pub fn free(self, fw: &mut Fw<'_>) {
        match fw.hca.destroy_mkey(self.mkey) {
            Ok(()) => {
                let arena = fw.hca.cmd().arena_mut();
                for p in self.pages {
                    let _ = arena.free_page(p);
                }
            }
            Err(e) => tracing::warn!(
                mkey = format_args!("{:#x}", self.mkey), pages = self.pages.len(), error = %e,
                "destroy of a migration buffer mkey failed; its pages are leaked"
            ),
        }
    }

    pub fn size(&self) -> u64 {
        self.pages.len() as u64 * PAGE_SIZE
    }

    pub fn mkey(&self) -> u32 {
        self.mkey
    }

    /// Walks `off..off + len` page by page: (arena IOVA, position in the caller's slice, length).
    fn spans(&self, off: u64, len: usize) -> Result<Vec<(u64, usize, usize)>, MigError> {
        let end = off.checked_add(len as u64).filter(|&e| e <= self.size());
        if end.is_none() {
            return Err(MigError::Device {
                errno: -libc::EINVAL,
                why: format!(
                    "access of {len} bytes at {off} outside a {}-byte buffer",
                    self.size()
                ),
            });
        }
        let mut v = Vec::new();
        let mut done = 0usize;
        while done < len {
            let at = off + done as u64;
            let page = (at / PAGE_SIZE) as usize;
            let in_page = at % PAGE_SIZE;
            let n = ((PAGE_SIZE - in_page) as usize).min(len - done);
            let base = *self.pages.get(page).ok_or(MigError::Device {
                errno: -libc::EINVAL,
                why: "buffer page index out of range".into(),
            })?;
            v.push((base + in_page, done, n));
            done += n;
        }
        Ok(v)
    }

    /// Reads `out.len()` bytes at buffer offset `off`.
    pub fn read(&self, arena: &DmaArena, off: u64, out: &mut [u8]) -> Result<(), MigError> {
        for (iova, at, n) in self.spans(off, out.len())? {
            arena
                .read(iova, &mut out[at..at + n])
                .map_err(|e| MigError::Device {
                    errno: -libc::EIO,
                    why: format!("reading a migration buffer: {e}"),
                })?;
        }
        Ok(())
    }

    /// Writes `data` at buffer offset `off`.
    pub fn write(&self, arena: &DmaArena, off: u64, data: &[u8]) -> Result<(), MigError> {
        for (iova, at, n) in self.spans(off, data.len())? {
            arena
                .write(iova, &data[at..at + n])
                .map_err(|e| MigError::Device {
                    errno: -libc::EIO,
                    why: format!("writing a migration buffer: {e}"),
                })?;
        }
        Ok(())
    }
}

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
    let mut hca = super::lock(&pf);
    let mut fw = Fw {
        hca: &mut hca,
        vhca_id: inner.vhca_id,
        chunk_mode: inner.chunk_mode,
    };
    match (from, to) {
        (Running, RunningP2p) => fw.suspend(SUSPEND_INITIATOR).map(|_| None),
        (PreCopy, PreCopyP2p) => fw.suspend(SUSPEND_INITIATOR).map(|_| None),
        (RunningP2p, Stop) => fw.suspend(SUSPEND_RESPONDER).map(|_| None),
        (Stop, RunningP2p) => fw.resume(RESUME_RESPONDER).map(|_| None),
        (RunningP2p, Running) | (PreCopyP2p, PreCopy) => fw.resume(RESUME_INITIATOR).map(|_| None),
        (Stop, StopCopy) => {
            let f = SaveFile::open(&mut fw, false)?;
            inner.saving = Some(f);
            Ok(Some(Opened::Saving))
        }
        (Running, PreCopy) | (RunningP2p, PreCopyP2p) => {
            let f = SaveFile::open(&mut fw, true)?;
            inner.saving = Some(f);
            Ok(Some(Opened::Saving))
        }
        (PreCopy, Running) | (PreCopyP2p, RunningP2p) => {
            let result = match inner.saving.as_mut() {
                Some(f) => f.pre_copy_cleanup(&mut fw),
                None => Ok(()),
            };
            let was_error = inner.saving.as_ref().is_some_and(SaveFile::is_error);
            if result.as_ref().is_err_and(MigError::unreachable) {
                // The caller abandons the file: closing it would only time out again.
            } else {
                inner.disable_fds(&mut fw);
            }
            match result {
                Err(e) if e.is_fatal() => Err(e),
                Err(e) => Err(MigError::Device {
                    errno: -libc::EIO,
                    why: format!("pre-copy cleanup failed: {e}"),
                }),
                Ok(()) if was_error => Err(MigError::Device {
                    errno: -libc::EIO,
                    why: "the saving file had failed before pre-copy ended".into(),
                }),
                Ok(()) => Ok(None),
            }
        }
        (PreCopyP2p, StopCopy) => {
            fw.suspend(SUSPEND_RESPONDER)?;
            match inner.saving.as_mut() {
                Some(f) => f.save_final(&mut fw).map(|_| None),
                None => Err(MigError::NoDev),
            }
        }
        (StopCopy, Stop) => {
            inner.disable_fds(&mut fw);
            Ok(None)
        }
        (Stop, Resuming) => {
            let f = ResumeFile::open(&mut fw)?;
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
            inner.disable_fds(&mut fw);
            Ok(None)
        }
        _ => {
            tracing::warn!(%from, %to, "not an mlx5vf arc");
            Err(MigError::Device {
                errno: -libc::EINVAL,
                why: format!("{from} -> {to} is not an arc this driver implements"),
            })
        }
    }
}
