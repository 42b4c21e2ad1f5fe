//! QUERY_PAGES and MANAGE_PAGES (mlx5-device.md §4.1, probe steps 8, 9, 16, 17).
//!
//! The firmware asks for [`BOOT_PAGES`] before INIT_HCA can start and [`INIT_PAGES`] more
//! for INIT_HCA itself, so MANAGE_PAGES is exercised on every bring-up. It needs no
//! pages at run time (`page_request_disable` = 1, QUERY_PAGES REGULAR = 0). Pages are
//! only recorded: this firmware never writes into them.

use std::collections::BTreeSet;

use mlx5_prm::cmd::pages::*;
use mlx5_prm::ifc::set;
use mlx5_prm::CmdStatus;

use super::{syndrome, Cmd, CmdFail, CmdResult, Env, Firmware, HcaState};

/// Pages QUERY_PAGES(BOOT) asks for.
pub const BOOT_PAGES: usize = 4;
/// Further pages QUERY_PAGES(INIT) asks for.
pub const INIT_PAGES: usize = 4;
/// Pages INIT_HCA needs held.
pub const STARTUP_PAGES: usize = BOOT_PAGES + INIT_PAGES;
/// Most pages a function may hold (1 GiB): a bound on what a driver can make us track.
pub const MAX_FW_PAGES: usize = 1 << 18;

/// Why firmware pages are refused: by MANAGE_PAGES(GIVE) and INIT_HCA, and by
/// LOAD_VHCA_STATE for the pages of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("page {pa:#x}: expected non-zero and 4 KiB aligned")]
    BadAddress { pa: u64 },
    #[error("page {pa:#x} is held already")]
    Duplicate { pa: u64 },
    #[error("{count} pages: at most {max} may be held")]
    TooMany { count: usize, max: usize },
    #[error("{held} pages held, an initialized HCA holds at least {need}")]
    StartupMissing { held: usize, need: usize },
}

impl PageError {
    /// The status and syndrome the live command completes with.
    pub fn fail(&self) -> CmdFail {
        match self {
            PageError::TooMany { .. } => CmdFail::no_resources(),
            PageError::StartupMissing { .. } => {
                CmdFail::new(CmdStatus::BadSysStateErr, syndrome::PAGES_MISSING)
            }
            PageError::BadAddress { .. } | PageError::Duplicate { .. } => {
                CmdFail::new(CmdStatus::BadParamErr, syndrome::BAD_PAGE)
            }
        }
    }
}

/// Holding `count` pages stays within `MAX_FW_PAGES`.
pub fn check_page_count(count: usize) -> Result<(), PageError> {
    if count > MAX_FW_PAGES {
        return Err(PageError::TooMany {
            count,
            max: MAX_FW_PAGES,
        });
    }
    Ok(())
}

/// A page given to the firmware: non-zero, 4 KiB aligned, neither `held` already nor
/// given twice (it joins `new`). MANAGE_PAGES also probes that it is DMA-mapped, which
/// only the live command can.
pub fn check_fw_page(
    held: &BTreeSet<u64>,
    new: &mut BTreeSet<u64>,
    pa: u64,
) -> Result<(), PageError> {
    if pa == 0 || !pa.is_multiple_of(FW_PAGE_SIZE) {
        return Err(PageError::BadAddress { pa });
    }
    if held.contains(&pa) || !new.insert(pa) {
        return Err(PageError::Duplicate { pa });
    }
    Ok(())
}

/// INIT_HCA needs the boot and init pages held, and an initialized HCA keeps them.
pub fn check_startup_pages(held: usize) -> Result<(), PageError> {
    if held < STARTUP_PAGES {
        return Err(PageError::StartupMissing {
            held,
            need: STARTUP_PAGES,
        });
    }
    Ok(())
}

impl Firmware {
    pub(super) fn query_pages(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let mut out = cmd.lengths(QUERY_PAGES_IN_LEN, QUERY_PAGES_OUT_LEN)?;
        let stage = QueryPagesOpMod::try_from(cmd.op_mod).map_err(|_| CmdFail::bad_op_mod())?;
        if cmd.get(QUERY_PAGES_FUNCTION_ID) != 0 || cmd.get(QUERY_PAGES_EMBEDDED_CPU_FUNCTION) != 0
        {
            return Err(CmdFail::bad_function());
        }
        let held = self.pages.len();
        let wanted = match stage {
            QueryPagesOpMod::Boot => BOOT_PAGES.saturating_sub(held),
            QueryPagesOpMod::Init => STARTUP_PAGES.saturating_sub(held),
            QueryPagesOpMod::Regular => 0,
        };
        set(&mut out, QUERY_PAGES_FUNCTION_ID, 0);
        set(&mut out, QUERY_PAGES_OUT_NUM_PAGES, wanted as u64);
        Ok(out)
    }

    pub(super) fn manage_pages(&mut self, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
        cmd.need_in(MANAGE_PAGES_IN_LEN)?;
        let op = ManagePagesOpMod::try_from(cmd.op_mod).map_err(|_| CmdFail::bad_op_mod())?;
        if cmd.get(MANAGE_PAGES_IN_FUNCTION_ID) != 0
            || cmd.get(MANAGE_PAGES_IN_EMBEDDED_CPU_FUNCTION) != 0
        {
            return Err(CmdFail::bad_function());
        }
        let n = usize::try_from(cmd.get(MANAGE_PAGES_IN_INPUT_NUM_ENTRIES))
            .map_err(|_| CmdFail::bad_param())?;
        match op {
            ManagePagesOpMod::CantGive => cmd.lengths(MANAGE_PAGES_IN_LEN, MANAGE_PAGES_OUT_LEN),
            ManagePagesOpMod::Give => self.give_pages(env, cmd, n),
            ManagePagesOpMod::Take => self.take_pages(cmd, n),
        }
    }

    /// GIVE: every address non-zero, 4 KiB aligned, DMA-mapped and new; all or nothing.
    fn give_pages(&mut self, env: &dyn Env, cmd: &Cmd<'_>, n: usize) -> CmdResult {
        let in_len = manage_pages_in_len(n).ok_or_else(CmdFail::bad_param)?;
        let out = cmd.lengths(in_len, MANAGE_PAGES_OUT_LEN)?;
        check_page_count(self.pages.len().saturating_add(n)).map_err(|e| e.fail())?;
        let mut new = BTreeSet::new();
        for i in 0..n {
            let f = MANAGE_PAGES_IN_PAS.nth(i).ok_or_else(CmdFail::bad_param)?;
            let pa = cmd.get(f);
            let mut probe = [0u8; 1];
            let checked = check_fw_page(&self.pages, &mut new, pa).map_err(|e| e.fail());
            // A 4 KiB-aligned page lies inside one DMA window (windows are 4 KiB
            // aligned), so its first byte tells whether all of it is mapped.
            let mapped = checked.and_then(|()| {
                env.dma_read(pa, &mut probe)
                    .map_err(|_| PageError::BadAddress { pa }.fail())
            });
            if let Err(fail) = mapped {
                tracing::info!(
                    vhca_id = self.id.vhca_id,
                    pa = format_args!("{pa:#x}"),
                    "MANAGE_PAGES: bad page"
                );
                return Err(fail);
            }
        }
        self.pages.append(&mut new);
        Ok(out)
    }

    /// TAKE: returns up to `n` pages, never the startup pages of an initialized HCA.
    fn take_pages(&mut self, cmd: &Cmd<'_>, n: usize) -> CmdResult {
        cmd.need_in(MANAGE_PAGES_IN_LEN)?;
        let releasable = if self.state == HcaState::Initialized {
            self.pages.len().saturating_sub(STARTUP_PAGES)
        } else {
            self.pages.len()
        };
        let k = n.min(releasable);
        let out_len = manage_pages_out_len(k).ok_or_else(CmdFail::bad_param)?;
        cmd.need_out(out_len)?;
        let mut out = vec![0u8; out_len];
        set(&mut out, MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES, k as u64);
        for i in 0..k {
            // The field first: a page is taken only when it can be reported.
            let Some(f) = MANAGE_PAGES_OUT_PAS.nth(i) else {
                break;
            };
            let Some(pa) = self.pages.pop_last() else {
                break;
            };
            set(&mut out, f, pa);
        }
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

    impl Bench {
        /// Gives `n` pages at `base`, `base + 4 KiB`, ... (mapped first).
        pub fn give(&mut self, base: u64, n: usize) -> super::super::Reply {
            let len = manage_pages_in_len(n).unwrap();
            self.run(Opcode::ManagePages, 1, len, 16, |m| {
                set(m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, n as u64);
                for i in 0..n {
                    set(
                        m,
                        MANAGE_PAGES_IN_PAS.nth(i).unwrap(),
                        base + 4096 * i as u64,
                    );
                }
            })
        }

        pub fn give_startup_pages(&mut self) {
            self.map(0x10_0000, 0x10_0000);
            ok(&self.give(0x10_0000, STARTUP_PAGES));
        }
    }

    fn query(b: &mut Bench, stage: u16) -> i32 {
        let r = b.run(Opcode::QueryPages, stage, 16, 16, |_| {});
        ok(&r);
        get(&r.out, QUERY_PAGES_OUT_NUM_PAGES) as u32 as i32
    }

    #[test]
    fn boot_and_init_pages_are_asked_for_given_and_taken_back() {
        let mut b = Bench::vf();
        ok(&b.simple(Opcode::EnableHca));
        b.map(0x10_0000, 0x10_0000);
        assert_eq!(query(&mut b, 1), BOOT_PAGES as i32);
        ok(&b.give(0x10_0000, BOOT_PAGES));
        assert_eq!(query(&mut b, 1), 0);
        assert_eq!(query(&mut b, 2), INIT_PAGES as i32);
        ok(&b.give(0x20_0000 - 0x8000, INIT_PAGES));
        assert_eq!(query(&mut b, 2), 0);
        assert_eq!(query(&mut b, 3), 0);
        assert_eq!(b.fw.object_counts().pages, STARTUP_PAGES);
        ok(&b.run(Opcode::InitHca, 0, 32, 16, |_| {}));
        // Startup pages stay while initialized.
        let r = b.run(Opcode::ManagePages, 2, 16, 16 + 8 * 8, |m| {
            set(m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, 8)
        });
        ok(&r);
        assert_eq!(get(&r.out, MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES), 0);
        ok(&b.simple(Opcode::TeardownHca));
        let r = b.run(Opcode::ManagePages, 2, 16, 16 + 8 * 5, |m| {
            set(m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, 5)
        });
        ok(&r);
        assert_eq!(get(&r.out, MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES), 5);
        assert_eq!(r.out.len(), 16 + 40);
        let first = get(&r.out, MANAGE_PAGES_OUT_PAS);
        assert!(first >= 0x10_0000 && first.is_multiple_of(4096));
        let r = b.run(Opcode::ManagePages, 2, 16, 16 + 8 * 5, |m| {
            set(m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, 5)
        });
        assert_eq!(get(&r.out, MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES), 3);
        assert_eq!(b.fw.object_counts().pages, 0);
    }

    #[test]
    fn bad_pages_are_refused_all_or_nothing() {
        let mut b = Bench::vf();
        ok(&b.simple(Opcode::EnableHca));
        b.map(0x10_0000, 0x4000);
        // Unmapped page.
        fails(
            &b.give(0x20_0000, 1),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        // Runs off the end of the mapping: nothing is kept.
        fails(
            &b.give(0x10_0000, 5),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        assert_eq!(b.fw.object_counts().pages, 0);
        // Misaligned, zero, duplicate.
        fails(
            &b.give(0x10_0800, 1),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        fails(&b.give(0, 1), CmdStatus::BadParamErr, syndrome::BAD_PAGE);
        ok(&b.give(0x10_0000, 1));
        fails(
            &b.give(0x10_0000, 1),
            CmdStatus::BadParamErr,
            syndrome::BAD_PAGE,
        );
        // A count the input does not carry.
        let r = b.run(Opcode::ManagePages, 1, 24, 16, |m| {
            set(m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, 0xffff_ffff)
        });
        fails(&r, CmdStatus::BadInpLenErr, syndrome::SHORT_INPUT);
        let r = b.run(Opcode::ManagePages, 7, 16, 16, |_| {});
        fails(&r, CmdStatus::BadParamErr, syndrome::BAD_OP_MOD);
        // TAKE with too little output room.
        let r = b.run(Opcode::ManagePages, 2, 16, 16, |m| {
            set(m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, 1)
        });
        fails(&r, CmdStatus::BadOutpLenErr, syndrome::SHORT_OUTPUT);
    }
}
