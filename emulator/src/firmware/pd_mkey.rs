//! ALLOC_PD / DEALLOC_PD and CREATE_MKEY / DESTROY_MKEY in MTT access mode
//! (mlx5-device.md §4.1). An mkey maps the virtual range `[start, start + len)` onto a
//! list of page IOVAs; [`Mkey::translate`] resolves a range of it for SAVE/LOAD and the
//! DMA engines.

use std::collections::BTreeSet;

use mlx5_prm::cmd::pd_mkey::*;
use mlx5_prm::ifc::set;
use mlx5_prm::CmdStatus;

use super::caps::{LOG_MAX_MKEY, LOG_MAX_PD};
use super::{first_free, syndrome, Cmd, CmdFail, CmdResult, Firmware};

/// PDs one function may hold (`log_max_pd`).
pub const MAX_PDS: u32 = 1 << LOG_MAX_PD;
/// Mkeys one function may hold (`log_max_mkey`).
pub const MAX_MKEYS: u32 = 1 << LOG_MAX_MKEY;
/// Smallest mkey page size accepted (4 KiB).
pub const MKEY_MIN_LOG_PAGE_SIZE: u64 = 12;
/// Largest mkey page size accepted (1 GiB).
pub const MKEY_MAX_LOG_PAGE_SIZE: u64 = 30;
/// Low bits of an MTT entry that carry permissions (`MLX5_MTT_PERM_READ/WRITE`), not
/// address.
pub const MTT_PERM_MASK: u64 = 0x3;

/// Why a translation through an mkey failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MkeyError {
    #[error("range {va:#x}+{len:#x} is outside the mkey's {start:#x}+{mkey_len:#x}")]
    OutOfRange {
        va: u64,
        len: u64,
        start: u64,
        mkey_len: u64,
    },
}

/// Why a PD or an mkey context is refused: by DEALLOC_PD / CREATE_MKEY, and by
/// LOAD_VHCA_STATE for the PDs and mkeys of an image (the same checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PdMkeyError {
    #[error("PD {pd} is outside 1..={max}")]
    PdOutOfRange { pd: u32, max: u32 },
    #[error("PD {pd} is not allocated")]
    NoPd { pd: u32 },
    #[error("access mode {mode:#x}: only MTT is supported")]
    AccessMode { mode: u8 },
    #[error("{what} is set: not supported")]
    Unsupported { what: &'static str },
    #[error("log_page_size {got} is outside {min}..={max}")]
    LogPageSize { got: u64, min: u64, max: u64 },
    #[error("the range {start:#x}+{len:#x} is empty or wraps")]
    BadRange { start: u64, len: u64 },
    #[error("the MTT has {have} entries, the range needs {needed}")]
    MttShort { have: u64, needed: u64 },
    #[error("MTT entry {index} is {entry:#x}: expected a page-aligned address")]
    BadMttEntry { index: usize, entry: u64 },
}

impl PdMkeyError {
    /// The status and syndrome the live command completes with.
    pub fn fail(&self) -> CmdFail {
        match self {
            PdMkeyError::PdOutOfRange { .. } | PdMkeyError::NoPd { .. } => {
                CmdFail::no_such_object()
            }
            PdMkeyError::BadMttEntry { .. } => {
                CmdFail::new(CmdStatus::BadParamErr, syndrome::BAD_PAGE)
            }
            _ => CmdFail::bad_param(),
        }
    }
}

/// A PD number this function can hold (the range ALLOC_PD hands out).
pub fn check_pd_index(pd: u32) -> Result<(), PdMkeyError> {
    if !(1..=MAX_PDS).contains(&pd) {
        return Err(PdMkeyError::PdOutOfRange { pd, max: MAX_PDS });
    }
    Ok(())
}

/// A PD number this function can hold and has allocated.
pub fn check_pd(pds: &BTreeSet<u32>, pd: u32) -> Result<(), PdMkeyError> {
    check_pd_index(pd)?;
    if !pds.contains(&pd) {
        return Err(PdMkeyError::NoPd { pd });
    }
    Ok(())
}

/// The mkey context CREATE_MKEY checks: page size and range. Returns the number of
/// pages (MTT entries) the range touches, counted from the page holding `start`.
pub fn check_mkey_range(log_page_size: u64, start: u64, len: u64) -> Result<u64, PdMkeyError> {
    if !(MKEY_MIN_LOG_PAGE_SIZE..=MKEY_MAX_LOG_PAGE_SIZE).contains(&log_page_size) {
        return Err(PdMkeyError::LogPageSize {
            got: log_page_size,
            min: MKEY_MIN_LOG_PAGE_SIZE,
            max: MKEY_MAX_LOG_PAGE_SIZE,
        });
    }
    if len == 0 || start.checked_add(len).is_none() {
        return Err(PdMkeyError::BadRange { start, len });
    }
    let page = 1u64 << log_page_size;
    Ok(((start & (page - 1)) + len).div_ceil(page))
}

/// The MTT holds at least the `needed` entries of the range.
pub fn check_mtt_len(have: u64, needed: u64) -> Result<(), PdMkeyError> {
    if have < needed {
        return Err(PdMkeyError::MttShort { have, needed });
    }
    Ok(())
}

/// MTT entry `index`, permission bits cleared: a page-aligned address. IOVA 0 is one:
/// behind an IOMMU it is as good a DMA address as any (Linux's VFIO selftests map
/// their first buffer there).
pub fn check_mtt_entry(index: usize, iova: u64, log_page_size: u64) -> Result<(), PdMkeyError> {
    let page_mask = (1u64 << log_page_size.min(63)) - 1;
    if iova & page_mask != 0 {
        return Err(PdMkeyError::BadMttEntry { index, entry: iova });
    }
    Ok(())
}

/// A memory key in MTT mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mkey {
    pub index: u32,
    /// `mkey_7_0`: the key is `index << 8 | variant`.
    pub variant: u8,
    pub pd: u32,
    pub start: u64,
    pub len: u64,
    pub log_page_size: u32,
    /// IOVA of each page of the range, permission bits cleared.
    pub mtt: Vec<u64>,
}

impl Mkey {
    /// The 32-bit key.
    pub fn key(&self) -> u32 {
        mkey_from_index(self.index, self.variant)
    }

    /// IOVA runs backing `[va, va + len)`, adjacent pages merged. Byte k of the range
    /// lives at `mtt[(k >> lps) - (start >> lps)] + (k & page_mask)`.
    pub fn translate(&self, va: u64, len: u64) -> Result<Vec<(u64, u64)>, MkeyError> {
        let err = MkeyError::OutOfRange {
            va,
            len,
            start: self.start,
            mkey_len: self.len,
        };
        let end = va.checked_add(len).ok_or(err)?;
        let mkey_end = self.start.checked_add(self.len).ok_or(err)?;
        if va < self.start || end > mkey_end {
            return Err(err);
        }
        let page = 1u64 << self.log_page_size;
        let first_page = self.start >> self.log_page_size;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut k = va;
        while k < end {
            let idx = usize::try_from((k >> self.log_page_size) - first_page).map_err(|_| err)?;
            let off = k & (page - 1);
            let n = (page - off).min(end - k);
            let iova = self.mtt.get(idx).ok_or(err)?.checked_add(off).ok_or(err)?;
            match runs.last_mut() {
                Some((a, l)) if a.checked_add(*l) == Some(iova) => *l += n,
                _ => runs.push((iova, n)),
            }
            k += n;
        }
        Ok(runs)
    }
}

impl Firmware {
    pub(super) fn alloc_pd(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let mut out = cmd.lengths(ALLOC_PD_IN_LEN, ALLOC_PD_OUT_LEN)?;
        let pd = first_free(self.pds.iter(), 1, MAX_PDS).ok_or_else(CmdFail::no_resources)?;
        self.pds.insert(pd);
        set(&mut out, ALLOC_PD_OUT_PD, u64::from(pd));
        Ok(out)
    }

    pub(super) fn dealloc_pd(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let out = cmd.lengths(DEALLOC_PD_IN_LEN, DEALLOC_PD_OUT_LEN)?;
        let pd = cmd.get(DEALLOC_PD_IN_PD) as u32;
        check_pd(&self.pds, pd).map_err(|e| e.fail())?;
        if self.mkeys.values().any(|m| m.pd == pd) {
            return Err(CmdFail::new(CmdStatus::ResBusy, syndrome::BUSY));
        }
        self.pds.remove(&pd);
        Ok(out)
    }

    pub(super) fn create_mkey(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let mut out = cmd.lengths(CREATE_MKEY_IN_LEN, CREATE_MKEY_OUT_LEN)?;
        let mode = access_mode(
            cmd.get(CREATE_MKEY_IN_ACCESS_MODE_4_2) as u8,
            cmd.get(CREATE_MKEY_IN_ACCESS_MODE_1_0) as u8,
        );
        let lps = cmd.get(CREATE_MKEY_IN_LOG_PAGE_SIZE);
        let start = cmd.get(CREATE_MKEY_IN_START_ADDR);
        let len = cmd.get(CREATE_MKEY_IN_LEN_FIELD);
        let refuse = |e: PdMkeyError| {
            tracing::info!(error = %e, "CREATE_MKEY refused");
            e.fail()
        };
        if mode != ACCESS_MODE_MTT {
            return Err(refuse(PdMkeyError::AccessMode { mode }));
        }
        for (f, what) in [
            (CREATE_MKEY_IN_PG_ACCESS, "pg_access"),
            (CREATE_MKEY_IN_MKEY_UMEM_VALID, "mkey_umem_valid"),
            (CREATE_MKEY_IN_LENGTH64, "length64"),
        ] {
            if cmd.get(f) != 0 {
                return Err(refuse(PdMkeyError::Unsupported { what }));
            }
        }
        let needed = check_mkey_range(lps, start, len).map_err(refuse)?;
        let pd = cmd.get(CREATE_MKEY_IN_PD) as u32;
        check_pd(&self.pds, pd).map_err(refuse)?;
        let needed = usize::try_from(needed).map_err(|_| CmdFail::bad_param())?;
        let octwords = cmd.get(CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_SIZE);
        check_mtt_len(octwords.saturating_mul(2), needed as u64).map_err(refuse)?;
        let in_len = needed
            .checked_mul(MTT_ENTRY_SIZE)
            .and_then(|b| b.checked_add(CREATE_MKEY_IN_LEN))
            .ok_or_else(CmdFail::bad_param)?;
        cmd.need_in(in_len)?;
        let mut mtt = Vec::with_capacity(needed);
        for i in 0..needed {
            let e = CREATE_MKEY_IN_MTT.nth(i).map_or(0, |f| cmd.get(f));
            let iova = e & !MTT_PERM_MASK;
            check_mtt_entry(i, iova, lps).map_err(refuse)?;
            mtt.push(iova);
        }
        let index =
            first_free(self.mkeys.keys(), 1, MAX_MKEYS).ok_or_else(CmdFail::no_resources)?;
        let mkey = Mkey {
            index,
            variant: cmd.get(CREATE_MKEY_IN_MKEY_7_0) as u8,
            pd,
            start,
            len,
            log_page_size: lps as u32,
            mtt,
        };
        self.mkeys.insert(index, mkey);
        set(&mut out, CREATE_MKEY_OUT_MKEY_INDEX, u64::from(index));
        Ok(out)
    }

    pub(super) fn destroy_mkey(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let out = cmd.lengths(DESTROY_MKEY_IN_LEN, DESTROY_MKEY_OUT_LEN)?;
        let index = cmd.get(DESTROY_MKEY_IN_MKEY_INDEX) as u32;
        self.mkeys
            .remove(&index)
            .ok_or_else(CmdFail::no_such_object)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{syndrome, Reply};
    use super::*;
    use mlx5_prm::ifc::get;
    use mlx5_prm::Opcode;

    fn create(b: &mut Bench, pd: u32, start: u64, len: u64, mtt: &[u64]) -> Reply {
        let inlen = create_mkey_in_len(mtt.len()).unwrap();
        b.run(Opcode::CreateMkey, 0, inlen, 16, |m| {
            set(
                m,
                CREATE_MKEY_IN_ACCESS_MODE_1_0,
                u64::from(ACCESS_MODE_MTT),
            );
            set(m, CREATE_MKEY_IN_LR, 1);
            set(m, CREATE_MKEY_IN_LW, 1);
            set(m, CREATE_MKEY_IN_QPN, u64::from(MKC_QPN_NONE));
            set(m, CREATE_MKEY_IN_MKEY_7_0, 0x5a);
            set(m, CREATE_MKEY_IN_PD, u64::from(pd));
            set(m, CREATE_MKEY_IN_START_ADDR, start);
            set(m, CREATE_MKEY_IN_LEN_FIELD, len);
            set(m, CREATE_MKEY_IN_LOG_PAGE_SIZE, 12);
            set(
                m,
                CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_SIZE,
                mtt_octwords(mtt.len()) as u64,
            );
            for (i, &a) in mtt.iter().enumerate() {
                set(m, CREATE_MKEY_IN_MTT.nth(i).unwrap(), a);
            }
        })
    }

    #[test]
    fn create_mkey_refuses_with_the_reasons_load_gives() {
        let mut b = Bench::vf();
        b.bring_up();
        let expect = |r: &Reply, why: PdMkeyError| {
            let want = why.fail();
            fails(r, want.status, want.syndrome);
        };
        expect(
            &create(&mut b, 1, 0, 4096, &[0x5000]),
            check_pd(&b.fw.pds, 1).unwrap_err(),
        );
        ok(&b.simple(Opcode::AllocPd));
        // A length beyond the MTT: three pages, two entries.
        expect(
            &create(&mut b, 1, 0, 3 * 4096, &[0x5000, 0x6000]),
            check_mtt_len(2, 3).unwrap_err(),
        );
        expect(
            &create(&mut b, 1, 0, 0, &[0x5000]),
            check_mkey_range(12, 0, 0).unwrap_err(),
        );
        expect(
            &create(&mut b, 1, 0, 4096, &[0x5800]),
            check_mtt_entry(0, 0x5800, 12).unwrap_err(),
        );
        ok(&create(&mut b, 1, 0, 4096, &[0x5000]));
    }

    #[test]
    fn mkey_maps_a_range_onto_scattered_pages() {
        let mut b = Bench::vf();
        b.bring_up();
        let r = b.simple(Opcode::AllocPd);
        ok(&r);
        let pd = get(&r.out, ALLOC_PD_OUT_PD) as u32;
        assert_eq!(pd, 1);
        // Pages 0x5000, 0x6000 (contiguous), 0x1000, with permission bits set on one.
        let r = create(&mut b, pd, 0, 3 * 4096, &[0x5000 | 0x3, 0x6000, 0x1000]);
        ok(&r);
        let index = get(&r.out, CREATE_MKEY_OUT_MKEY_INDEX) as u32;
        let m = b.fw.mkey(index).unwrap().clone();
        assert_eq!(m.key(), index << 8 | 0x5a);
        assert_eq!(
            m.translate(0, 3 * 4096).unwrap(),
            vec![(0x5000, 0x2000), (0x1000, 0x1000)]
        );
        assert_eq!(
            m.translate(0x1ff0, 0x20).unwrap(),
            vec![(0x6ff0, 0x10), (0x1000, 0x10)]
        );
        assert_eq!(m.translate(5, 0).unwrap(), vec![]);
        assert!(m.translate(0x2000, 0x1001).is_err());
        assert!(m.translate(u64::MAX, 2).is_err());
        // The PD is busy while the mkey exists.
        let r = b.run(Opcode::DeallocPd, 0, 16, 16, |x| {
            set(x, DEALLOC_PD_IN_PD, 1)
        });
        fails(&r, CmdStatus::ResBusy, syndrome::BUSY);
        ok(&b.run(Opcode::DestroyMkey, 0, 16, 16, |x| {
            set(x, DESTROY_MKEY_IN_MKEY_INDEX, u64::from(index))
        }));
        ok(&b.run(Opcode::DeallocPd, 0, 16, 16, |x| {
            set(x, DEALLOC_PD_IN_PD, 1)
        }));
        assert!(b.fw.object_counts().is_empty() || b.fw.object_counts().pages > 0);
        assert_eq!(b.fw.object_counts().mkeys, 0);
    }

    #[test]
    fn mkey_maps_a_page_at_iova_zero() {
        let mut b = Bench::vf();
        b.bring_up();
        ok(&b.simple(Opcode::AllocPd));
        // An identity map of IOVA [0, 8 KiB): its first page is at IOVA 0.
        let r = create(&mut b, 1, 0, 2 * 4096, &[0, 0x1000]);
        ok(&r);
        let index = get(&r.out, CREATE_MKEY_OUT_MKEY_INDEX) as u32;
        let m = b.fw.mkey(index).unwrap();
        assert_eq!(m.translate(0, 2 * 4096).unwrap(), vec![(0, 2 * 4096)]);
        assert_eq!(m.translate(0x10, 0x20).unwrap(), vec![(0x10, 0x20)]);
    }

    #[test]
    fn unaligned_start_uses_the_page_offset() {
        let mut b = Bench::vf();
        b.bring_up();
        ok(&b.simple(Opcode::AllocPd));
        // start 0x10_0800, len 0x1000: touches two pages.
        ok(&create(&mut b, 1, 0x10_0800, 0x1000, &[0xa000, 0xc000]));
        let m = b.fw.mkey(1).unwrap();
        assert_eq!(
            m.translate(0x10_0800, 0x1000).unwrap(),
            vec![(0xa800, 0x800), (0xc000, 0x800)]
        );
    }

    #[test]
    fn create_mkey_refuses_bad_contexts() {
        let mut b = Bench::vf();
        b.bring_up();
        fails(
            &create(&mut b, 1, 0, 4096, &[0x1000]),
            CmdStatus::BadResErr,
            syndrome::NO_SUCH_OBJECT,
        );
        ok(&b.simple(Opcode::AllocPd));
        // Three pages, one octword (two entries): the MTT is too short.
        fails(
            &create(&mut b, 1, 0, 3 * 4096, &[0x1000]),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        // Two pages, the second entry (the padding of an odd count) not page aligned.
        fails(
            &create(&mut b, 1, 0, 2 * 4096, &[0x1000, 0x2008]),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        fails(
            &create(&mut b, 1, 0, 4096, &[0x1100]),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        fails(
            &create(&mut b, 1, 0, 0, &[0x1000]),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        fails(
            &create(&mut b, 1, u64::MAX, 2, &[0x1000]),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        // The octword count claims more entries than the input carries.
        let r = b.run(Opcode::CreateMkey, 0, CREATE_MKEY_IN_LEN, 16, |m| {
            set(
                m,
                CREATE_MKEY_IN_ACCESS_MODE_1_0,
                u64::from(ACCESS_MODE_MTT),
            );
            set(m, CREATE_MKEY_IN_PD, 1);
            set(m, CREATE_MKEY_IN_LEN_FIELD, 1 << 40);
            set(m, CREATE_MKEY_IN_LOG_PAGE_SIZE, 12);
            set(m, CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_SIZE, 0xffff_ffff);
        });
        fails(&r, CmdStatus::BadInpLenErr, syndrome::SHORT_INPUT);
        // KLM mode is not modelled.
        let r = b.run(Opcode::CreateMkey, 0, CREATE_MKEY_IN_LEN + 16, 16, |m| {
            set(
                m,
                CREATE_MKEY_IN_ACCESS_MODE_1_0,
                u64::from(ACCESS_MODE_KLMS),
            );
            set(m, CREATE_MKEY_IN_PD, 1);
            set(m, CREATE_MKEY_IN_LEN_FIELD, 4096);
            set(m, CREATE_MKEY_IN_LOG_PAGE_SIZE, 12);
        });
        fails(&r, CmdStatus::BadParamErr, syndrome::BAD_PARAM);
        assert_eq!(b.fw.object_counts().mkeys, 0);
    }
}
