//! The firmware's pages: QUERY_PAGES at boot and init, MANAGE_PAGES GIVE (and
//! CANT_GIVE when the arena is out of pages), and TAKE at teardown until every page
//! is back. Every page the firmware returns must be one we gave.

use mlx5_prm::cmd::pages::{
    manage_pages_in_len, manage_pages_out_len, ManagePagesOpMod, QueryPagesOpMod,
    MANAGE_PAGES_IN_FUNCTION_ID, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, MANAGE_PAGES_IN_PAS,
    MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES, MANAGE_PAGES_OUT_PAS, QUERY_PAGES_FUNCTION_ID,
    QUERY_PAGES_IN_LEN, QUERY_PAGES_OUT_LEN, QUERY_PAGES_OUT_NUM_PAGES,
};
use mlx5_prm::ifc::{get, set};
use mlx5_prm::Opcode;

use super::{step, Hca, HcaError};
use crate::cmdif::new_input;

/// Pages per MANAGE_PAGES command (8 output/input mailbox blocks of addresses).
pub const PAGES_PER_COMMAND: usize = 512;

impl Hca {
    /// QUERY_PAGES `stage`, then MANAGE_PAGES GIVE of what it asks for.
    pub(super) fn satisfy_pages(
        &self,
        stage: QueryPagesOpMod,
        what: &'static str,
    ) -> Result<(), HcaError> {
        let m = new_input(Opcode::QueryPages, stage.into(), QUERY_PAGES_IN_LEN);
        let out = self.cmd.exec(&m, QUERY_PAGES_OUT_LEN).map_err(step(what))?;
        let func_id = get(&out, QUERY_PAGES_FUNCTION_ID) as u16;
        let npages = get(&out, QUERY_PAGES_OUT_NUM_PAGES) as u32 as i32;
        tracing::debug!(
            stage = stage.name(),
            func_id,
            npages,
            "firmware page request"
        );
        if npages > 0 {
            self.give_pages(func_id, npages as usize)
                .map_err(|e| match e {
                    HcaError::Cmd { source, .. } => HcaError::Cmd { step: what, source },
                    other => other,
                })?;
        }
        Ok(())
    }

    /// Gives `n` pages to `func_id`, [`PAGES_PER_COMMAND`] per MANAGE_PAGES.
    pub fn give_pages(&self, func_id: u16, n: usize) -> Result<(), HcaError> {
        const STEP: &str = "give pages failed";
        let mut left = n;
        while left > 0 {
            let chunk = left.min(PAGES_PER_COMMAND);
            let mut pas = Vec::with_capacity(chunk);
            for _ in 0..chunk {
                match self.cmd.arena().alloc_page() {
                    Some(p) => pas.push(p),
                    None => {
                        self.release_local(&pas);
                        self.cant_give(func_id);
                        return Err(HcaError::OutOfPages {
                            step: STEP,
                            asked: n,
                        });
                    }
                }
            }
            let len = manage_pages_in_len(chunk).unwrap_or(0);
            let mut m = new_input(Opcode::ManagePages, ManagePagesOpMod::Give.into(), len);
            set(&mut m, MANAGE_PAGES_IN_FUNCTION_ID, func_id.into());
            set(&mut m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, chunk as u64);
            for (i, &p) in pas.iter().enumerate() {
                if let Some(f) = MANAGE_PAGES_IN_PAS.nth(i) {
                    set(&mut m, f, p);
                }
            }
            if let Err(e) = self.cmd.exec(&m, manage_pages_out_len(0).unwrap_or(16)) {
                self.release_local(&pas);
                return Err(step(STEP)(e));
            }
            self.held().extend(pas);
            left -= chunk;
        }
        Ok(())
    }

    fn release_local(&self, pas: &[u64]) {
        for &p in pas {
            let _ = self.cmd.arena().free_page(p);
        }
    }

    /// MANAGE_PAGES CANT_GIVE, as the kernel sends when it cannot allocate.
    fn cant_give(&self, func_id: u16) {
        let mut m = new_input(
            Opcode::ManagePages,
            ManagePagesOpMod::CantGive.into(),
            manage_pages_in_len(0).unwrap_or(16),
        );
        set(&mut m, MANAGE_PAGES_IN_FUNCTION_ID, func_id.into());
        let _ = self.cmd.exec(&m, 16);
    }

    /// Takes pages back until the firmware holds none of ours (or stops returning
    /// them). Every returned address must be one we gave: anything else is corruption.
    pub fn reclaim_pages(&self) -> Result<usize, HcaError> {
        const STEP: &str = "reclaim pages failed";
        let mut reclaimed = 0;
        // Each successful round returns at least one page; bound the rounds anyway.
        let held = self.pages_held();
        let max_rounds = held / PAGES_PER_COMMAND + held + 1;
        for _ in 0..max_rounds {
            if self.held().is_empty() {
                break;
            }
            let want = self.held().len().min(PAGES_PER_COMMAND);
            let mut m = new_input(Opcode::ManagePages, ManagePagesOpMod::Take.into(), 16);
            set(&mut m, MANAGE_PAGES_IN_FUNCTION_ID, 0);
            set(&mut m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, want as u64);
            let out_len = manage_pages_out_len(want).unwrap_or(16);
            let out = self.cmd.exec(&m, out_len).map_err(step(STEP))?;
            let got = get(&out, MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES);
            if got > want as u64 {
                return Err(HcaError::TooManyPages {
                    step: STEP,
                    asked: want,
                    got,
                });
            }
            if got == 0 {
                break;
            }
            for i in 0..got as usize {
                let pa = MANAGE_PAGES_OUT_PAS.nth(i).map_or(0, |f| get(&out, f));
                if !self.held().remove(&pa) {
                    return Err(HcaError::ForeignPage {
                        step: STEP,
                        page: pa,
                    });
                }
                if let Err(e) = self.cmd.arena().free_page(pa) {
                    tracing::error!(error = %e, "page bookkeeping");
                }
                reclaimed += 1;
            }
        }
        if !self.held().is_empty() {
            return Err(HcaError::PagesStillHeld {
                step: STEP,
                held: self.pages_held(),
            });
        }
        Ok(reclaimed)
    }
}
