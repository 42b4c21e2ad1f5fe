//! ALLOC_UAR / DEALLOC_UAR (mlx5-device.md §4.1, probe step 23). UAR index i is the
//! 4 KiB page at BAR0 + i × 4 KiB; indices start at 3 because lower pages would alias
//! the init segment.

use mlx5_prm::cmd::uar::*;
use mlx5_prm::ifc::set;
use mlx5_prm::CmdStatus;

use super::{first_free, syndrome, Cmd, CmdFail, CmdResult, Firmware};
use crate::bar0::UAR_FIRST_INDEX;

/// UARs one function may hold.
pub const MAX_UARS: u32 = 64;
/// First UAR index handed out.
pub const FIRST_UAR: u32 = UAR_FIRST_INDEX as u32;
/// Last UAR index handed out.
pub const LAST_UAR: u32 = FIRST_UAR + MAX_UARS - 1;

/// Why a UAR index is refused: by DEALLOC_UAR, and by LOAD_VHCA_STATE for the UARs of
/// an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UarError {
    #[error("UAR {index} is outside {FIRST_UAR}..={LAST_UAR}")]
    OutOfRange { index: u32 },
    #[error("UAR {index} is not allocated")]
    NotAllocated { index: u32 },
}

impl UarError {
    /// The status and syndrome DEALLOC_UAR completes with.
    pub fn fail(&self) -> CmdFail {
        CmdFail::no_such_object()
    }
}

/// A UAR index this function can hold (the range ALLOC_UAR hands out).
pub fn check_uar_index(index: u32) -> Result<(), UarError> {
    if !(FIRST_UAR..=LAST_UAR).contains(&index) {
        return Err(UarError::OutOfRange { index });
    }
    Ok(())
}

const _: () = assert!((LAST_UAR as u64 + 1) * crate::bar0::UAR_PAGE_SIZE <= crate::bar0::UAR_END);

impl Firmware {
    /// Whether UAR `index` is allocated (doorbell writes to other pages are ignored).
    pub fn has_uar(&self, index: u32) -> bool {
        self.uars.contains(&index)
    }

    pub(super) fn alloc_uar(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let mut out = cmd.lengths(ALLOC_UAR_IN_LEN, ALLOC_UAR_OUT_LEN)?;
        let index =
            first_free(self.uars.iter(), FIRST_UAR, LAST_UAR).ok_or_else(CmdFail::no_resources)?;
        self.uars.insert(index);
        set(&mut out, ALLOC_UAR_OUT_UAR, u64::from(index));
        Ok(out)
    }

    pub(super) fn dealloc_uar(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let out = cmd.lengths(DEALLOC_UAR_IN_LEN, DEALLOC_UAR_OUT_LEN)?;
        let index = cmd.get(DEALLOC_UAR_IN_UAR) as u32;
        check_uar_index(index).map_err(|e| e.fail())?;
        if !self.uars.contains(&index) {
            return Err(UarError::NotAllocated { index }.fail());
        }
        if self.eqs.values().any(|eq| eq.uar == index) {
            return Err(CmdFail::new(CmdStatus::ResBusy, syndrome::BUSY));
        }
        self.uars.remove(&index);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::syndrome;
    use super::super::test_support::*;
    use super::*;
    use mlx5_prm::ifc::get;
    use mlx5_prm::Opcode;

    #[test]
    fn uars_start_at_3_are_reused_and_bounded() {
        let mut b = Bench::vf();
        b.bring_up();
        let r = b.simple(Opcode::AllocUar);
        ok(&r);
        assert_eq!(get(&r.out, ALLOC_UAR_OUT_UAR), 3);
        let r = b.simple(Opcode::AllocUar);
        assert_eq!(get(&r.out, ALLOC_UAR_OUT_UAR), 4);
        ok(&b.run(Opcode::DeallocUar, 0, 16, 16, |m| {
            set(m, DEALLOC_UAR_IN_UAR, 3)
        }));
        let r = b.run(Opcode::DeallocUar, 0, 16, 16, |m| {
            set(m, DEALLOC_UAR_IN_UAR, 3)
        });
        fails(&r, CmdStatus::BadResErr, syndrome::NO_SUCH_OBJECT);
        let r = b.simple(Opcode::AllocUar);
        assert_eq!(get(&r.out, ALLOC_UAR_OUT_UAR), 3);
        for _ in 2..MAX_UARS {
            ok(&b.simple(Opcode::AllocUar));
        }
        fails(
            &b.simple(Opcode::AllocUar),
            CmdStatus::NoResErr,
            syndrome::NO_RESOURCES,
        );
        assert_eq!(b.fw.object_counts().uars, MAX_UARS as usize);
    }
}
