//! Firmware objects a caller owns: protection domains and MTT memory keys (mlx5vf's
//! migration buffers live behind them).

use mlx5_prm::cmd::pd_mkey::{
    create_mkey_in_len, mkey_from_index, mtt_octwords, ACCESS_MODE_MTT, ALLOC_PD_IN_LEN,
    ALLOC_PD_OUT_LEN, ALLOC_PD_OUT_PD, CREATE_MKEY_IN_ACCESS_MODE_1_0,
    CREATE_MKEY_IN_ACCESS_MODE_4_2, CREATE_MKEY_IN_LEN_FIELD, CREATE_MKEY_IN_LOG_PAGE_SIZE,
    CREATE_MKEY_IN_LR, CREATE_MKEY_IN_LW, CREATE_MKEY_IN_MKEY_7_0, CREATE_MKEY_IN_MTT,
    CREATE_MKEY_IN_PD, CREATE_MKEY_IN_QPN, CREATE_MKEY_IN_RR, CREATE_MKEY_IN_RW,
    CREATE_MKEY_IN_START_ADDR, CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_ACTUAL_SIZE,
    CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_SIZE, CREATE_MKEY_OUT_LEN, CREATE_MKEY_OUT_MKEY_INDEX,
    DEALLOC_PD_IN_LEN, DEALLOC_PD_IN_PD, DEALLOC_PD_OUT_LEN, DESTROY_MKEY_IN_LEN,
    DESTROY_MKEY_IN_MKEY_INDEX, DESTROY_MKEY_OUT_LEN, MKC_QPN_NONE,
};
use mlx5_prm::ifc::{get, set};
use mlx5_prm::Opcode;

use super::{step, Hca, HcaError};
use crate::cmdif::new_input;

impl Hca {
    /// CREATE_MKEY in MTT mode, as mlx5vf `_create_mkey` fills it: local and remote
    /// read/write, no QP, the function's PD, virtual range `[0, len)` over `mtt` (one
    /// IOVA per 2^`log_page_size` page). Returns the 32-bit key.
    pub fn create_mkey(
        &self,
        mtt: &[u64],
        log_page_size: u8,
        len: u64,
        variant: u8,
    ) -> Result<u32, HcaError> {
        let pd = self.stages().pd.ok_or(HcaError::NotUp {
            what: "CREATE_MKEY in the function's PD",
        })?;
        self.create_mkey_in_pd(pd, mtt, log_page_size, len, variant)
    }

    /// ALLOC_PD for a caller that owns it (mlx5vf allocates one per migration file).
    pub fn alloc_pd(&self) -> Result<u32, HcaError> {
        let m = new_input(Opcode::AllocPd, 0, ALLOC_PD_IN_LEN);
        let out = self
            .cmd
            .exec(&m, ALLOC_PD_OUT_LEN)
            .map_err(step("alloc pd failed"))?;
        Ok(get(&out, ALLOC_PD_OUT_PD) as u32)
    }

    /// DEALLOC_PD of a PD from [`Hca::alloc_pd`].
    pub fn dealloc_pd(&self, pd: u32) -> Result<(), HcaError> {
        let mut m = new_input(Opcode::DeallocPd, 0, DEALLOC_PD_IN_LEN);
        set(&mut m, DEALLOC_PD_IN_PD, pd.into());
        self.cmd
            .exec(&m, DEALLOC_PD_OUT_LEN)
            .map(drop)
            .map_err(step("dealloc pd failed"))
    }

    /// [`Hca::create_mkey`] in a caller-chosen PD.
    pub fn create_mkey_in_pd(
        &self,
        pd: u32,
        mtt: &[u64],
        log_page_size: u8,
        len: u64,
        variant: u8,
    ) -> Result<u32, HcaError> {
        const STEP: &str = "create mkey failed";
        let in_len =
            create_mkey_in_len(mtt.len()).ok_or(HcaError::MttTooLong { entries: mtt.len() })?;
        let mut m = new_input(Opcode::CreateMkey, 0, in_len);
        let oct = mtt_octwords(mtt.len()) as u64;
        set(
            &mut m,
            CREATE_MKEY_IN_ACCESS_MODE_1_0,
            u64::from(ACCESS_MODE_MTT & 0x3),
        );
        set(
            &mut m,
            CREATE_MKEY_IN_ACCESS_MODE_4_2,
            u64::from(ACCESS_MODE_MTT >> 2),
        );
        for f in [
            CREATE_MKEY_IN_LR,
            CREATE_MKEY_IN_LW,
            CREATE_MKEY_IN_RR,
            CREATE_MKEY_IN_RW,
        ] {
            set(&mut m, f, 1);
        }
        set(&mut m, CREATE_MKEY_IN_QPN, u64::from(MKC_QPN_NONE));
        set(&mut m, CREATE_MKEY_IN_MKEY_7_0, variant.into());
        set(&mut m, CREATE_MKEY_IN_PD, pd.into());
        set(&mut m, CREATE_MKEY_IN_START_ADDR, 0);
        set(&mut m, CREATE_MKEY_IN_LEN_FIELD, len);
        set(&mut m, CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_SIZE, oct);
        set(&mut m, CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_ACTUAL_SIZE, oct);
        set(&mut m, CREATE_MKEY_IN_LOG_PAGE_SIZE, log_page_size.into());
        for (i, &pa) in mtt.iter().enumerate() {
            if let Some(f) = CREATE_MKEY_IN_MTT.nth(i) {
                set(&mut m, f, pa);
            }
        }
        let out = self.cmd.exec(&m, CREATE_MKEY_OUT_LEN).map_err(step(STEP))?;
        let index = get(&out, CREATE_MKEY_OUT_MKEY_INDEX) as u32;
        Ok(mkey_from_index(index, variant))
    }

    /// DESTROY_MKEY of a key from [`Hca::create_mkey`].
    pub fn destroy_mkey(&self, mkey: u32) -> Result<(), HcaError> {
        let mut m = new_input(Opcode::DestroyMkey, 0, DESTROY_MKEY_IN_LEN);
        set(&mut m, DESTROY_MKEY_IN_MKEY_INDEX, u64::from(mkey >> 8));
        self.cmd
            .exec(&m, DESTROY_MKEY_OUT_LEN)
            .map(drop)
            .map_err(step("destroy mkey failed"))
    }
}
