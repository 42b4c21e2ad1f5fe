//! The firmware commands of migration, issued through the PF's command interface and
//! naming the VF by its `vhca_id` (SUSPEND/RESUME_VHCA, QUERY_VHCA_MIGRATION_STATE,
//! SAVE/LOAD_VHCA_STATE), and the DMA buffers SAVE and LOAD use: pages of the PF's DMA
//! arena behind an MTT mkey in the migration file's own PD (mlx5vf's
//! `mlx5_vhca_data_buffer`).
//!
//! Layouts are `mlx5_prm::cmd::migration`'s; nothing here knows a byte offset.

use std::sync::atomic::{AtomicU8, Ordering};

use mlx5_prm::cmd::migration::{
    ResumeOpMod, SuspendOpMod, VhcaMigrationState, IN_VHCA_ID, LOAD_VHCA_STATE_IN_LEN,
    LOAD_VHCA_STATE_IN_MKEY, LOAD_VHCA_STATE_IN_SIZE, LOAD_VHCA_STATE_IN_VA,
    LOAD_VHCA_STATE_OUT_LEN, QUERY_VHCA_MIGRATION_STATE_IN_CHUNK,
    QUERY_VHCA_MIGRATION_STATE_IN_INCREMENTAL, QUERY_VHCA_MIGRATION_STATE_IN_LEN,
    QUERY_VHCA_MIGRATION_STATE_OUT_LEN, QUERY_VHCA_MIGRATION_STATE_OUT_MIGRATION_STATE,
    QUERY_VHCA_MIGRATION_STATE_OUT_REMAINING_TOTAL_SIZE,
    QUERY_VHCA_MIGRATION_STATE_OUT_REQUIRED_UMEM_SIZE, RESUME_VHCA_IN_LEN, RESUME_VHCA_OUT_LEN,
    SAVE_VHCA_STATE_IN_INCREMENTAL, SAVE_VHCA_STATE_IN_LEN, SAVE_VHCA_STATE_IN_MKEY,
    SAVE_VHCA_STATE_IN_SET_TRACK, SAVE_VHCA_STATE_IN_SIZE, SAVE_VHCA_STATE_IN_VA,
    SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE, SAVE_VHCA_STATE_OUT_LEN,
    SAVE_VHCA_STATE_OUT_NEXT_REQUIRED_UMEM_SIZE, SUSPEND_VHCA_IN_LEN, SUSPEND_VHCA_OUT_LEN,
};
use mlx5_prm::ifc::{get, set};
use mlx5_prm::Opcode;

use super::MigError;
use crate::cmdif::arena::PAGE_SIZE;
use crate::cmdif::{new_input, CmdError, DmaArena};
use crate::hca::Hca;

/// Largest SAVE buffer: `save_vhca_state_in.size` is 32 bits (`2^32 - PAGE_SIZE`).
pub const MAX_BUF_BYTES: u64 = (1 << 32) - PAGE_SIZE;
const LOG_PAGE_SIZE: u8 = 12;

/// The PF's command interface aimed at one VF.
pub struct Fw<'a> {
    pub hca: &'a Hca,
    pub vhca_id: u16,
    pub chunk_mode: bool,
}

/// What QUERY_VHCA_MIGRATION_STATE returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryOut {
    pub required_umem_size: u64,
    /// `remaining_total_size` in chunk mode, else `required_umem_size`.
    pub total: u64,
    /// The 2026 `migration_state` (UNINITIALIZED when the firmware does not report it).
    pub migration_state: VhcaMigrationState,
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
        set(&mut m, IN_VHCA_ID, self.vhca_id.into());
        m
    }

    fn exec(&self, what: &'static str, m: &[u8], out_len: usize) -> Result<Vec<u8>, MigError> {
        self.hca.cmd().exec(m, out_len).map_err(cmd_err(what))
    }

    /// SUSPEND_VHCA (initiator: RUNNING_P2P, responder: STOP).
    pub fn suspend(&self, op_mod: SuspendOpMod) -> Result<(), MigError> {
        let m = self.input(Opcode::SuspendVhca, op_mod.into(), SUSPEND_VHCA_IN_LEN);
        self.exec("suspend vhca", &m, SUSPEND_VHCA_OUT_LEN)
            .map(drop)
    }

    /// RESUME_VHCA (responder undoes STOP, initiator undoes RUNNING_P2P).
    pub fn resume(&self, op_mod: ResumeOpMod) -> Result<(), MigError> {
        let m = self.input(Opcode::ResumeVhca, op_mod.into(), RESUME_VHCA_IN_LEN);
        self.exec("resume vhca", &m, RESUME_VHCA_OUT_LEN).map(drop)
    }

    /// QUERY_VHCA_MIGRATION_STATE.
    pub fn query(&self, incremental: bool) -> Result<QueryOut, MigError> {
        let mut m = self.input(
            Opcode::QueryVhcaMigrationState,
            0,
            QUERY_VHCA_MIGRATION_STATE_IN_LEN,
        );
        set(
            &mut m,
            QUERY_VHCA_MIGRATION_STATE_IN_INCREMENTAL,
            incremental.into(),
        );
        set(
            &mut m,
            QUERY_VHCA_MIGRATION_STATE_IN_CHUNK,
            self.chunk_mode.into(),
        );
        let out = self.exec(
            "query vhca migration state",
            &m,
            QUERY_VHCA_MIGRATION_STATE_OUT_LEN,
        )?;
        let required = get(&out, QUERY_VHCA_MIGRATION_STATE_OUT_REQUIRED_UMEM_SIZE);
        let total = if self.chunk_mode {
            get(&out, QUERY_VHCA_MIGRATION_STATE_OUT_REMAINING_TOTAL_SIZE)
        } else {
            required
        };
        // A 4-bit field: the cast keeps every value the firmware can write.
        let raw = get(&out, QUERY_VHCA_MIGRATION_STATE_OUT_MIGRATION_STATE) as u8;
        let migration_state = VhcaMigrationState::try_from(raw)
            .map_err(|_| MigError::UnknownMigrationState { value: raw })?;
        Ok(QueryOut {
            required_umem_size: required,
            total,
            migration_state,
        })
    }

    /// SAVE_VHCA_STATE into `buf` (va 0, the buffer's mkey, its whole size).
    pub fn save(&self, buf: &MigBuf, incremental: bool, track: bool) -> Result<SaveOut, MigError> {
        self.save_into(buf.target(), incremental, track)
    }

    /// SAVE_VHCA_STATE into the buffer `target` names (what a SAVE running on another
    /// thread holds while the buffer itself stays with its file).
    pub fn save_into(
        &self,
        buf: SaveTarget,
        incremental: bool,
        track: bool,
    ) -> Result<SaveOut, MigError> {
        let mut m = self.input(Opcode::SaveVhcaState, 0, SAVE_VHCA_STATE_IN_LEN);
        set(&mut m, SAVE_VHCA_STATE_IN_INCREMENTAL, incremental.into());
        set(&mut m, SAVE_VHCA_STATE_IN_SET_TRACK, track.into());
        set(&mut m, SAVE_VHCA_STATE_IN_VA, 0);
        set(&mut m, SAVE_VHCA_STATE_IN_MKEY, buf.mkey.into());
        set(&mut m, SAVE_VHCA_STATE_IN_SIZE, buf.size());
        let out = self.exec("save vhca state", &m, SAVE_VHCA_STATE_OUT_LEN)?;
        let r = SaveOut {
            actual_image_size: get(&out, SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE),
            next_required_umem_size: get(&out, SAVE_VHCA_STATE_OUT_NEXT_REQUIRED_UMEM_SIZE),
        };
        // The device's word is checked before it is used to read our memory.
        if r.actual_image_size > buf.size() {
            return Err(MigError::ImageOverflow {
                image: r.actual_image_size,
                buffer: buf.size(),
            });
        }
        Ok(r)
    }

    /// LOAD_VHCA_STATE of the first `size` bytes of `buf`.
    pub fn load(&self, buf: &MigBuf, size: u64) -> Result<(), MigError> {
        if size > buf.size() {
            return Err(MigError::BufferRange {
                offset: 0,
                len: size,
                size: buf.size(),
            });
        }
        let mut m = self.input(Opcode::LoadVhcaState, 0, LOAD_VHCA_STATE_IN_LEN);
        set(&mut m, LOAD_VHCA_STATE_IN_VA, 0);
        set(&mut m, LOAD_VHCA_STATE_IN_MKEY, buf.mkey.into());
        set(&mut m, LOAD_VHCA_STATE_IN_SIZE, size);
        self.exec("load vhca state", &m, LOAD_VHCA_STATE_OUT_LEN)
            .map(drop)
    }

    pub fn alloc_pd(&self) -> Result<u32, MigError> {
        self.hca.alloc_pd().map_err(|source| MigError::Hca {
            what: "migration file PD",
            source,
        })
    }

    /// Best effort: a failure is logged (the PD leaks in the firmware).
    pub fn dealloc_pd(&self, pd: u32) {
        if let Err(e) = self.hca.dealloc_pd(pd) {
            tracing::warn!(pd, error = %e, "dealloc of a migration file PD failed");
        }
    }
}

/// What a SAVE needs of its buffer: the mkey and the size (va 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveTarget {
    mkey: u32,
    size: u64,
}

impl SaveTarget {
    fn size(&self) -> u64 {
        self.size
    }
}

/// A DMA buffer for SAVE or LOAD: arena pages behind one MTT mkey.
#[derive(Debug)]
pub struct MigBuf {
    pages: Vec<u64>,
    mkey: u32,
}

static MKEY_VARIANT: AtomicU8 = AtomicU8::new(0x5a);

fn free_pages(arena: &DmaArena, pages: &[u64]) {
    for &p in pages {
        if let Err(e) = arena.free_page(p) {
            tracing::error!(error = %e, "migration buffer page bookkeeping");
        }
    }
}

impl MigBuf {
    /// A buffer of at least `bytes` (at least one page) in `pd`.
    pub fn alloc(fw: &Fw<'_>, pd: u32, bytes: u64) -> Result<MigBuf, MigError> {
        let bytes = bytes.max(1);
        if bytes > MAX_BUF_BYTES {
            return Err(MigError::BufferTooLarge {
                bytes,
                max: MAX_BUF_BYTES,
            });
        }
        let npages = bytes.div_ceil(PAGE_SIZE) as usize;
        let arena = fw.hca.cmd().arena();
        let mut pages = Vec::with_capacity(npages);
        for _ in 0..npages {
            match arena.alloc_page() {
                Some(p) => pages.push(p),
                None => break,
            }
        }
        if pages.len() != npages {
            let free = arena.free_pages() + pages.len();
            free_pages(arena, &pages);
            return Err(MigError::ArenaExhausted {
                bytes,
                pages: npages,
                free,
            });
        }
        // In address order: pages freed by an earlier buffer come back from the pool in
        // any order, and an MTT of scattered pages makes the device write the image a
        // page at a time (no run long enough to copy three pages in place at once).
        pages.sort_unstable();
        let variant = MKEY_VARIANT.fetch_add(1, Ordering::Relaxed);
        let len = npages as u64 * PAGE_SIZE;
        match fw
            .hca
            .create_mkey_in_pd(pd, &pages, LOG_PAGE_SIZE, len, variant)
        {
            Ok(mkey) => Ok(MigBuf { pages, mkey }),
            Err(source) => {
                free_pages(arena, &pages);
                Err(MigError::Hca {
                    what: "migration buffer mkey",
                    source,
                })
            }
        }
    }

    /// Destroys the mkey and returns the pages. If DESTROY_MKEY fails the device may
    /// still reach the pages, so they are leaked rather than reused.
    pub fn free(self, fw: &Fw<'_>) {
        match fw.hca.destroy_mkey(self.mkey) {
            Ok(()) => free_pages(fw.hca.cmd().arena(), &self.pages),
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

    /// The buffer as a SAVE names it.
    pub fn target(&self) -> SaveTarget {
        SaveTarget {
            mkey: self.mkey,
            size: self.size(),
        }
    }

    /// Walks `off..off + len` in runs of pages that are contiguous in the arena:
    /// (arena IOVA, position in the caller's slice, length). The arena hands out pages
    /// in order, so a buffer is usually one run or a few.
    pub fn runs(&self, off: u64, len: usize) -> Result<Vec<(u64, usize, usize)>, MigError> {
        let range = MigError::BufferRange {
            offset: off,
            len: len as u64,
            size: self.size(),
        };
        match off.checked_add(len as u64) {
            Some(end) if end <= self.size() => {}
            _ => return Err(range),
        }
        let mut v: Vec<(u64, usize, usize)> = Vec::new();
        let mut done = 0usize;
        while done < len {
            let at = off + done as u64;
            let page = (at / PAGE_SIZE) as usize;
            let in_page = at % PAGE_SIZE;
            let n = ((PAGE_SIZE - in_page) as usize).min(len - done);
            // In range: `end <= size` was checked above.
            let Some(&base) = self.pages.get(page) else {
                return Err(range);
            };
            let iova = base + in_page;
            match v.last_mut() {
                Some((last, _, l)) if *last + *l as u64 == iova => *l += n,
                _ => v.push((iova, done, n)),
            }
            done += n;
        }
        Ok(v)
    }

    /// Reads `out.len()` bytes at buffer offset `off`.
    pub fn read(&self, arena: &DmaArena, off: u64, out: &mut [u8]) -> Result<(), MigError> {
        for (iova, at, n) in self.runs(off, out.len())? {
            arena
                .read(iova, &mut out[at..at + n])
                .map_err(|source| MigError::BufferAccess { source })?;
        }
        Ok(())
    }

    /// Writes `data` at buffer offset `off`.
    pub fn write(&self, arena: &DmaArena, off: u64, data: &[u8]) -> Result<(), MigError> {
        for (iova, at, n) in self.runs(off, data.len())? {
            arena
                .write(iova, &data[at..at + n])
                .map_err(|source| MigError::BufferAccess { source })?;
        }
        Ok(())
    }
}
