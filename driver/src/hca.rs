//! Bringing a function up and down with the command sequence mlx5_core uses
//! (mlx5-device.md §4: `mlx5_function_enable`, `mlx5_function_open`, `mlx5_load`, and
//! their teardown in reverse).
//!
//! ```text
//! up:   ENABLE_HCA, QUERY_ISSI, [SET_ISSI 1], QUERY_PAGES boot, [MANAGE_PAGES give],
//!       QUERY_HCA_CAP general CUR+MAX, [GENERAL_2 CUR+MAX], SET_HCA_CAP,
//!       QUERY_PAGES init, [MANAGE_PAGES give], INIT_HCA, [SET_DRIVER_VERSION],
//!       QUERY_HCA_CAP general CUR [+ GENERAL_2 CUR], QUERY_ADAPTER, ALLOC_UAR,
//!       MSI-X vector 0 + CREATE_EQ (cmd EQ, by polling), arm, event mode, ALLOC_PD
//! down: DEALLOC_PD, polling mode + DESTROY_EQ, MSI-X off, DEALLOC_UAR, TEARDOWN_HCA,
//!       MANAGE_PAGES take until every page is back, DISABLE_HCA
//! ```
//!
//! A failing step unwinds the steps already done (best effort) and returns the step's
//! error; teardown runs every step it can and returns the first error.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;

use mlx5_prm::cmd::caps::{
    cmd_hca_cap as cap, cmd_hca_cap_2 as cap2, query_op_mod, set_op_mod, CapMode, CapType,
    HCA_CAP_IN_FUNCTION_ID, HCA_CAP_IN_OTHER_FUNCTION, HCA_CAP_MSG_OFFSET, HCA_CAP_SIZE,
    QUERY_HCA_CAP_IN_LEN, QUERY_HCA_CAP_OUT_LEN, SET_HCA_CAP_IN_LEN, SET_HCA_CAP_OUT_LEN,
};
use mlx5_prm::cmd::eq::{
    CREATE_EQ_OUT_EQ_NUMBER, CREATE_EQ_OUT_LEN, DESTROY_EQ_IN_EQ_NUMBER, DESTROY_EQ_IN_LEN,
    DESTROY_EQ_OUT_LEN, EVENT_TYPE_CMD,
};
use mlx5_prm::cmd::hca::*;
use mlx5_prm::cmd::pages::{
    manage_pages_in_len, manage_pages_out_len, ManagePagesOpMod, QueryPagesOpMod,
    MANAGE_PAGES_IN_FUNCTION_ID, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, MANAGE_PAGES_IN_PAS,
    MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES, MANAGE_PAGES_OUT_PAS, QUERY_PAGES_FUNCTION_ID,
    QUERY_PAGES_IN_LEN, QUERY_PAGES_OUT_LEN, QUERY_PAGES_OUT_NUM_PAGES,
};
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
use mlx5_prm::cmd::uar::{
    ALLOC_UAR_IN_LEN, ALLOC_UAR_OUT_LEN, ALLOC_UAR_OUT_UAR, DEALLOC_UAR_IN_LEN, DEALLOC_UAR_IN_UAR,
    DEALLOC_UAR_OUT_LEN,
};
use mlx5_prm::cmd::DRIVER_SYNDROME;
use mlx5_prm::ifc::{get, set};
use mlx5_prm::Opcode;
use vfu::uapi::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::cmdif::eq::CMD_EQ_LOG_SIZE;
use crate::cmdif::{new_input, CmdError, CmdIf, EqError, EventQueue, FwRev, BAR0};

/// Pages per MANAGE_PAGES command (8 output/input mailbox blocks of addresses).
pub const PAGES_PER_COMMAND: usize = 512;
/// `log_max_qp` the kernel's default profile asks for (capped by MAX).
const PROFILE_LOG_MAX_QP: u64 = 18;
/// ISSI bits in `supported_issi_dw0`.
const ISSI_0: u64 = 1 << 0;
const ISSI_1: u64 = 1 << 1;
/// PCI config space: capability pointer, and the MSI-X capability fields.
const PCI_CAPABILITY_LIST: u64 = 0x34;
const PCI_CAP_ID_MSIX: u8 = 0x11;
const PCI_MSIX_FLAGS: u64 = 2;
const PCI_MSIX_FLAGS_ENABLE: u16 = 1 << 15;
const PCI_MSIX_FLAGS_MASKALL: u16 = 1 << 14;
const PCI_MSIX_TABLE: u64 = 4;
const PCI_MSIX_TABLE_BIR: u32 = 0x7;
const PCI_MSIX_ENTRY_SIZE: u64 = 16;
const PCI_MSIX_ENTRY_VECTOR_CTRL: u64 = 12;
/// Most capabilities walked in the 256-byte header space.
const MAX_PCI_CAPS: usize = 48;
const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
/// The MSI-X vector of the command EQ (the kernel's `MLX5_IRQ_VEC_COMP_BASE` - 1 = 0).
pub const CMD_EQ_VECTOR: u16 = 0;

/// Errors of bring-up and teardown; `step` uses the kernel's message where it has one.
#[derive(Debug, thiserror::Error)]
pub enum HcaError {
    #[error("{step}: {source}")]
    Cmd {
        step: &'static str,
        #[source]
        source: CmdError,
    },
    #[error("{step}: vfio-user: {source}")]
    Vfu {
        step: &'static str,
        #[source]
        source: vfu::VfuError,
    },
    #[error("{step}: {why}")]
    Device { step: &'static str, why: String },
    #[error("{step}: {source}")]
    Eq {
        step: &'static str,
        #[source]
        source: EqError,
    },
    #[error("{step}: eventfd: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    State(&'static str),
}

impl HcaError {
    /// The negative errno the kernel would report.
    pub fn errno(&self) -> i32 {
        match self {
            HcaError::Cmd { source, .. } => source.errno(),
            HcaError::Vfu { source, .. } => match source {
                vfu::VfuError::Remote { errno, .. } => -errno.raw(),
                _ => -libc::EIO,
            },
            HcaError::Device { .. } => -libc::EOPNOTSUPP,
            HcaError::Eq { .. } => -libc::ENOMEM,
            HcaError::Io { source, .. } => -source.raw_os_error().unwrap_or(libc::EIO),
            HcaError::State(_) => -libc::EINVAL,
        }
    }

    /// The command error underneath, if a command failed.
    pub fn cmd_error(&self) -> Option<&CmdError> {
        match self {
            HcaError::Cmd { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn step(step: &'static str) -> impl Fn(CmdError) -> HcaError {
    move |source| HcaError::Cmd { step, source }
}

/// The migration capabilities the kernel's mlx5vf checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationCaps {
    /// `cmd_hca_cap.migration`.
    pub migration: bool,
    /// `cmd_hca_cap_2.migration_multi_load`.
    pub multi_load: bool,
    /// `cmd_hca_cap_2.migration_tracking_state`.
    pub tracking_state: bool,
    /// `cmd_hca_cap_2.migration_in_chunks`.
    pub in_chunks: bool,
}

impl MigrationCaps {
    fn from_pages(general: &[u8], general2: Option<&[u8]>) -> Self {
        let g2 = |f| general2.is_some_and(|p| get(p, f) != 0);
        MigrationCaps {
            migration: get(general, cap::MIGRATION) != 0,
            multi_load: g2(cap2::MIGRATION_MULTI_LOAD),
            tracking_state: g2(cap2::MIGRATION_TRACKING_STATE),
            in_chunks: g2(cap2::MIGRATION_IN_CHUNKS),
        }
    }
}

/// What bring-up learned about the function.
#[derive(Clone)]
pub struct HcaInfo {
    pub fw: FwRev,
    pub issi: u16,
    pub vhca_id: u16,
    pub board_id: String,
    pub migration: MigrationCaps,
    /// GENERAL capabilities, CUR after INIT_HCA (4096 bytes).
    pub caps: Vec<u8>,
    /// GENERAL capabilities, MAX.
    pub caps_max: Vec<u8>,
    /// GENERAL_2 capabilities, CUR, if the device has them.
    pub caps2: Option<Vec<u8>>,
    pub uar: u32,
    pub pd: u32,
    /// The command EQ, when bring-up switched to event mode.
    pub cmd_eqn: Option<u8>,
    /// Pages given to the firmware (boot + init).
    pub pages_given: usize,
}

impl std::fmt::Debug for HcaInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The capability pages are 4 KiB each; show their presence, not their bytes.
        f.debug_struct("HcaInfo")
            .field("fw", &format_args!("{}", self.fw))
            .field("issi", &self.issi)
            .field("vhca_id", &self.vhca_id)
            .field("board_id", &self.board_id)
            .field("migration", &self.migration)
            .field("caps2", &self.caps2.is_some())
            .field("uar", &self.uar)
            .field("pd", &self.pd)
            .field("cmd_eqn", &self.cmd_eqn)
            .field("pages_given", &self.pages_given)
            .finish_non_exhaustive()
    }
}

/// Another function's capabilities, read through this one (`other_function`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherCaps {
    pub function_id: u16,
    pub vhca_id: u16,
    pub migration: MigrationCaps,
    pub caps: Vec<u8>,
    pub caps2: Option<Vec<u8>>,
}

/// Bring-up options.
#[derive(Debug, Clone)]
pub struct HcaOptions {
    /// Create the command EQ and complete commands by EQE + MSI-X (as mlx5_core).
    pub events: bool,
    /// SET_DRIVER_VERSION string (when the device has the cap).
    pub driver_version: String,
}

impl Default for HcaOptions {
    fn default() -> Self {
        HcaOptions {
            events: true,
            driver_version: format!("Linux,mlx5vf,{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// What is currently set up, so teardown (and unwinding) knows what to undo.
#[derive(Debug, Default)]
struct Stages {
    enabled: bool,
    initialized: bool,
    uar: Option<u32>,
    msix: Option<MsixSetup>,
    cmd_eqn: Option<u8>,
    pd: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
struct MsixSetup {
    cap: u64,
}

/// One function driven through its command interface.
pub struct Hca {
    cmd: CmdIf,
    stages: Stages,
    /// Pages the firmware holds from us (given and not yet taken back).
    pages: BTreeSet<u64>,
    info: Option<HcaInfo>,
}

impl std::fmt::Debug for Hca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hca")
            .field("stages", &self.stages)
            .field("pages", &self.pages.len())
            .field("cmd", &self.cmd)
            .finish()
    }
}

impl Hca {
    /// A function that is down, driven through `cmd`.
    pub fn new(cmd: CmdIf) -> Self {
        Hca {
            cmd,
            stages: Stages::default(),
            pages: BTreeSet::new(),
            info: None,
        }
    }

    /// The command interface.
    pub fn cmd(&mut self) -> &mut CmdIf {
        &mut self.cmd
    }

    /// Hands the command interface back (bring the function down first).
    pub fn into_cmdif(self) -> CmdIf {
        self.cmd
    }

    /// What the last bring-up learned, while the function is up.
    pub fn info(&self) -> Option<&HcaInfo> {
        self.info.as_ref()
    }

    /// Whether the function is (at least partly) up.
    pub fn is_up(&self) -> bool {
        self.stages.enabled
    }

    /// Pages the firmware currently holds from us.
    pub fn pages_held(&self) -> usize {
        self.pages.len()
    }

    /// Brings the function up. On failure the steps already done are undone.
    pub fn up(&mut self, opts: &HcaOptions) -> Result<&HcaInfo, HcaError> {
        if self.stages.enabled {
            return Err(HcaError::State("the function is already up"));
        }
        match self.bring_up(opts) {
            Ok(info) => {
                self.info = Some(info);
                self.info.as_ref().ok_or(HcaError::State("no info"))
            }
            Err(e) => {
                tracing::warn!(error = %e, "bring-up failed; unwinding");
                if let Err(u) = self.down() {
                    tracing::warn!(error = %u, "unwinding after a failed bring-up");
                }
                Err(e)
            }
        }
    }

    fn bring_up(&mut self, opts: &HcaOptions) -> Result<HcaInfo, HcaError> {
        // ENABLE_HCA.
        let mut m = new_input(Opcode::EnableHca, 0, ENABLE_HCA_IN_LEN);
        set(&mut m, ENABLE_HCA_IN_FUNCTION_ID, 0);
        self.cmd
            .exec(&m, ENABLE_HCA_OUT_LEN)
            .map_err(step("enable hca failed"))?;
        self.stages.enabled = true;

        let issi = self.set_issi()?;
        self.satisfy_pages(QueryPagesOpMod::Boot, "failed to allocate boot pages")?;

        // handle_hca_cap: GENERAL CUR and MAX, GENERAL_2 if MAX says so, then SET.
        let cur = self.query_caps(CapType::General, CapMode::Cur, None, "set_hca_cap failed")?;
        let max = self.query_caps(CapType::General, CapMode::Max, None, "set_hca_cap failed")?;
        let has_cap2 = get(&max, cap::HCA_CAP_2) != 0;
        if has_cap2 {
            self.query_caps(CapType::General2, CapMode::Cur, None, "set_hca_cap failed")?;
            self.query_caps(CapType::General2, CapMode::Max, None, "set_hca_cap failed")?;
        }
        self.set_general_caps(&cur, &max)?;
        self.satisfy_pages(QueryPagesOpMod::Init, "failed to allocate init pages")?;

        // INIT_HCA, with a sw_owner_id when the device wants one.
        let mut m = new_input(Opcode::InitHca, 0, INIT_HCA_IN_LEN);
        if get(&max, cap::SW_OWNER_ID) != 0 {
            let id = sw_owner_id();
            m[INIT_HCA_IN_SW_OWNER_ID_OFFSET..INIT_HCA_IN_SW_OWNER_ID_OFFSET + 16]
                .copy_from_slice(&id);
        }
        self.cmd
            .exec(&m, INIT_HCA_OUT_LEN)
            .map_err(step("init hca failed"))?;
        self.stages.initialized = true;

        let cur = self.query_caps(CapType::General, CapMode::Cur, None, "query hca failed")?;
        if get(&cur, cap::DRIVER_VERSION) != 0 {
            self.set_driver_version(&opts.driver_version);
        }
        let caps2 = if has_cap2 {
            Some(self.query_caps(CapType::General2, CapMode::Cur, None, "query hca failed")?)
        } else {
            None
        };
        let board_id = self.query_board_id()?;

        // mlx5_load: UAR, IRQs and the command EQ, then a PD (as mlx5vf allocates one).
        let m = new_input(Opcode::AllocUar, 0, ALLOC_UAR_IN_LEN);
        let out = self
            .cmd
            .exec(&m, ALLOC_UAR_OUT_LEN)
            .map_err(step("Failed allocating uar, aborting"))?;
        let uar = get(&out, ALLOC_UAR_OUT_UAR) as u32;
        self.stages.uar = Some(uar);
        if opts.events {
            self.start_cmd_eq(uar)?;
        }
        let m = new_input(Opcode::AllocPd, 0, ALLOC_PD_IN_LEN);
        let out = self
            .cmd
            .exec(&m, ALLOC_PD_OUT_LEN)
            .map_err(step("alloc pd failed"))?;
        let pd = get(&out, ALLOC_PD_OUT_PD) as u32;
        self.stages.pd = Some(pd);

        let info = HcaInfo {
            fw: self.cmd.fw_rev(),
            issi,
            vhca_id: get(&cur, cap::VHCA_ID) as u16,
            board_id,
            migration: MigrationCaps::from_pages(&cur, caps2.as_deref()),
            caps_max: max,
            caps: cur,
            caps2,
            uar,
            pd,
            cmd_eqn: self.stages.cmd_eqn,
            pages_given: self.pages.len(),
        };
        tracing::info!(
            fw = %info.fw, issi, vhca_id = info.vhca_id, pages = info.pages_given,
            events = opts.events, "function up"
        );
        Ok(info)
    }

    /// `mlx5_core_set_issi`.
    fn set_issi(&mut self) -> Result<u16, HcaError> {
        const STEP: &str = "failed to set issi";
        let m = new_input(Opcode::QueryIssi, 0, QUERY_ISSI_IN_LEN);
        let out = match self.cmd.exec(&m, QUERY_ISSI_OUT_LEN) {
            Ok(out) => out,
            Err(CmdError::Status { syndrome, .. }) if syndrome != DRIVER_SYNDROME => {
                tracing::info!("Query ISSI is not supported by FW, ISSI is 0");
                return Ok(0);
            }
            Err(e) => return Err(step(STEP)(e)),
        };
        let supported = get(&out, QUERY_ISSI_OUT_SUPPORTED_ISSI_DW0);
        if supported & ISSI_1 != 0 {
            let mut m = new_input(Opcode::SetIssi, 0, SET_ISSI_IN_LEN);
            set(&mut m, SET_ISSI_IN_CURRENT_ISSI, 1);
            self.cmd.exec(&m, SET_ISSI_OUT_LEN).map_err(step(STEP))?;
            Ok(1)
        } else if supported == 0 || supported == ISSI_0 {
            Ok(0)
        } else {
            Err(HcaError::Device {
                step: STEP,
                why: format!("unsupported ISSI mask {supported:#x}"),
            })
        }
    }

    /// QUERY_PAGES `stage`, then MANAGE_PAGES GIVE of what it asks for.
    fn satisfy_pages(
        &mut self,
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
    pub fn give_pages(&mut self, func_id: u16, n: usize) -> Result<(), HcaError> {
        const STEP: &str = "give pages failed";
        let mut left = n;
        while left > 0 {
            let chunk = left.min(PAGES_PER_COMMAND);
            let mut pas = Vec::with_capacity(chunk);
            for _ in 0..chunk {
                match self.cmd.arena_mut().alloc_page() {
                    Some(p) => pas.push(p),
                    None => {
                        self.release_local(&pas);
                        self.cant_give(func_id);
                        return Err(HcaError::Device {
                            step: STEP,
                            why: format!("out of DMA pages for the firmware ({n} asked)"),
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
            self.pages.extend(pas);
            left -= chunk;
        }
        Ok(())
    }

    fn release_local(&mut self, pas: &[u64]) {
        for &p in pas {
            let _ = self.cmd.arena_mut().free_page(p);
        }
    }

    /// MANAGE_PAGES CANT_GIVE, as the kernel sends when it cannot allocate.
    fn cant_give(&mut self, func_id: u16) {
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
    pub fn reclaim_pages(&mut self) -> Result<usize, HcaError> {
        const STEP: &str = "reclaim pages failed";
        let mut reclaimed = 0;
        // Each successful round returns at least one page; bound the rounds anyway.
        let max_rounds = self.pages.len() / PAGES_PER_COMMAND + self.pages.len() + 1;
        for _ in 0..max_rounds {
            if self.pages.is_empty() {
                break;
            }
            let want = self.pages.len().min(PAGES_PER_COMMAND);
            let mut m = new_input(Opcode::ManagePages, ManagePagesOpMod::Take.into(), 16);
            set(&mut m, MANAGE_PAGES_IN_FUNCTION_ID, 0);
            set(&mut m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, want as u64);
            let out_len = manage_pages_out_len(want).unwrap_or(16);
            let out = self.cmd.exec(&m, out_len).map_err(step(STEP))?;
            let got = get(&out, MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES);
            if got > want as u64 {
                return Err(HcaError::Device {
                    step: STEP,
                    why: format!("corruption: asked for {want} pages, got {got}"),
                });
            }
            if got == 0 {
                break;
            }
            for i in 0..got as usize {
                let pa = MANAGE_PAGES_OUT_PAS.nth(i).map_or(0, |f| get(&out, f));
                if !self.pages.remove(&pa) {
                    return Err(HcaError::Device {
                        step: STEP,
                        why: format!("firmware returned page {pa:#x} it was never given"),
                    });
                }
                if let Err(e) = self.cmd.arena_mut().free_page(pa) {
                    tracing::error!(error = %e, "page bookkeeping");
                }
                reclaimed += 1;
            }
        }
        if !self.pages.is_empty() {
            return Err(HcaError::Device {
                step: STEP,
                why: format!("{} pages still held by the firmware", self.pages.len()),
            });
        }
        Ok(reclaimed)
    }

    fn query_caps(
        &mut self,
        t: CapType,
        mode: CapMode,
        other: Option<u16>,
        what: &'static str,
    ) -> Result<Vec<u8>, HcaError> {
        let mut m = new_input(
            Opcode::QueryHcaCap,
            query_op_mod(t, mode),
            QUERY_HCA_CAP_IN_LEN,
        );
        if let Some(fid) = other {
            set(&mut m, HCA_CAP_IN_OTHER_FUNCTION, 1);
            set(&mut m, HCA_CAP_IN_FUNCTION_ID, fid.into());
        }
        let out = self
            .cmd
            .exec(&m, QUERY_HCA_CAP_OUT_LEN)
            .map_err(step(what))?;
        Ok(out[HCA_CAP_MSG_OFFSET..HCA_CAP_MSG_OFFSET + HCA_CAP_SIZE].to_vec())
    }

    /// SET_HCA_CAP GENERAL: a copy of CUR with the fields mlx5_core's `handle_hca_cap`
    /// changes.
    fn set_general_caps(&mut self, cur: &[u8], max: &[u8]) -> Result<(), HcaError> {
        let mut m = new_input(
            Opcode::SetHcaCap,
            set_op_mod(CapType::General),
            SET_HCA_CAP_IN_LEN,
        );
        let caps = &mut m[HCA_CAP_MSG_OFFSET..HCA_CAP_MSG_OFFSET + HCA_CAP_SIZE];
        caps.copy_from_slice(cur);
        // 128-entry pkey table; no command checksums; 64-byte cache lines; 4 KiB UAR
        // pages (PAGE_SHIFT - 12); what MAX allows for the rest.
        set(caps, cap::PKEY_TABLE_SIZE, 0);
        set(caps, cap::CMDIF_CHECKSUM, 0);
        set(caps, cap::CACHE_LINE_128BYTE, 0);
        set(caps, cap::LOG_UAR_PAGE_SZ, 0);
        set(
            caps,
            cap::LOG_MAX_QP,
            PROFILE_LOG_MAX_QP.min(get(max, cap::LOG_MAX_QP)),
        );
        set(
            caps,
            cap::RELEASE_ALL_PAGES,
            get(max, cap::RELEASE_ALL_PAGES),
        );
        set(caps, cap::NUM_VHCA_PORTS, get(max, cap::NUM_VHCA_PORTS));
        self.cmd
            .exec(&m, SET_HCA_CAP_OUT_LEN)
            .map_err(step("set_hca_cap failed"))?;
        Ok(())
    }

    /// SET_DRIVER_VERSION; the kernel ignores its result, so do we (with a log).
    fn set_driver_version(&mut self, version: &str) {
        let mut m = new_input(Opcode::SetDriverVersion, 0, SET_DRIVER_VERSION_IN_LEN);
        let b = version.as_bytes();
        // Leave room for a terminating NUL.
        let n = b.len().min(SET_DRIVER_VERSION_IN_VERSION_LEN - 1);
        m[SET_DRIVER_VERSION_IN_VERSION_OFFSET..SET_DRIVER_VERSION_IN_VERSION_OFFSET + n]
            .copy_from_slice(&b[..n]);
        if let Err(e) = self.cmd.exec(&m, SET_DRIVER_VERSION_OUT_LEN) {
            tracing::warn!(error = %e, "set driver version failed");
        }
    }

    /// QUERY_ADAPTER: the board id (PSID), printable ASCII up to the first NUL.
    fn query_board_id(&mut self) -> Result<String, HcaError> {
        let m = new_input(Opcode::QueryAdapter, 0, QUERY_ADAPTER_IN_LEN);
        let out = self
            .cmd
            .exec(&m, QUERY_ADAPTER_OUT_LEN)
            .map_err(step("query board id failed"))?;
        let psid = &out[QUERY_ADAPTER_OUT_PSID_OFFSET
            ..QUERY_ADAPTER_OUT_PSID_OFFSET + QUERY_ADAPTER_OUT_PSID_LEN];
        Ok(psid
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| {
                if c.is_ascii_graphic() || c == b' ' {
                    c as char
                } else {
                    '?'
                }
            })
            .collect())
    }

    /// MSI-X vector 0 with an eventfd, the command EQ on it (created by polling), the
    /// arm doorbell, then event mode (`create_async_eqs` for the cmd EQ).
    fn start_cmd_eq(&mut self, uar: u32) -> Result<(), HcaError> {
        const STEP: &str = "Failed to create EQs";
        let eventfd =
            EventFd::new(EFD_NONBLOCK).map_err(|source| HcaError::Io { step: STEP, source })?;
        let msix = self.enable_msix(&eventfd)?;
        self.stages.msix = Some(msix);
        let mut eq = EventQueue::alloc(self.cmd.arena_mut(), CMD_EQ_LOG_SIZE, uar, CMD_EQ_VECTOR)
            .map_err(|source| HcaError::Eq { step: STEP, source })?;
        let m = eq.create_input(1 << EVENT_TYPE_CMD);
        let out = match self.cmd.exec(&m, CREATE_EQ_OUT_LEN) {
            Ok(out) => out,
            Err(e) => {
                eq.free(self.cmd.arena_mut());
                return Err(step(STEP)(e));
            }
        };
        let eqn = get(&out, CREATE_EQ_OUT_EQ_NUMBER) as u8;
        eq.set_eqn(eqn);
        self.stages.cmd_eqn = Some(eqn);
        let (off, v) = eq.doorbell(true);
        if let Err(source) = self.cmd.client().region_write(BAR0, off, &v) {
            eq.free(self.cmd.arena_mut());
            return Err(HcaError::Vfu { step: STEP, source });
        }
        if let Err(e) = self.cmd.use_events(eq, eventfd) {
            return Err(step(STEP)(e));
        }
        tracing::debug!(eqn, uar, "command EQ up; commands complete by EQE");
        Ok(())
    }

    /// SET_IRQS (MSI-X, vector 0 → `eventfd`), unmask vector 0 in the table and set
    /// MSI-X enable in config space.
    fn enable_msix(&mut self, eventfd: &EventFd) -> Result<MsixSetup, HcaError> {
        const STEP: &str = "MSI-X setup failed";
        let vfu = |source| HcaError::Vfu { step: STEP, source };
        let c = self.cmd.client();
        let cap = find_msix_cap(c)
            .map_err(vfu)?
            .ok_or_else(|| HcaError::Device {
                step: STEP,
                why: "no MSI-X capability in config space".into(),
            })?;
        let table = read_cfg32(c, cap + PCI_MSIX_TABLE).map_err(vfu)?;
        if table & PCI_MSIX_TABLE_BIR != 0 {
            return Err(HcaError::Device {
                step: STEP,
                why: format!(
                    "MSI-X table in BAR{}, expected BAR0",
                    table & PCI_MSIX_TABLE_BIR
                ),
            });
        }
        let entry =
            u64::from(table & !PCI_MSIX_TABLE_BIR) + u64::from(CMD_EQ_VECTOR) * PCI_MSIX_ENTRY_SIZE;
        c.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            u32::from(CMD_EQ_VECTOR),
            1,
            &[],
            &[eventfd.as_raw_fd()],
        )
        .map_err(vfu)?;
        c.region_write(
            BAR0,
            entry + PCI_MSIX_ENTRY_VECTOR_CTRL,
            &0u32.to_le_bytes(),
        )
        .map_err(vfu)?;
        let flags = read_cfg16(c, cap + PCI_MSIX_FLAGS).map_err(vfu)?;
        let flags = (flags | PCI_MSIX_FLAGS_ENABLE) & !PCI_MSIX_FLAGS_MASKALL;
        c.region_write(CONFIG, cap + PCI_MSIX_FLAGS, &flags.to_le_bytes())
            .map_err(vfu)?;
        Ok(MsixSetup { cap })
    }

    fn disable_msix(&mut self, m: MsixSetup) -> Result<(), HcaError> {
        const STEP: &str = "MSI-X teardown failed";
        let vfu = |source| HcaError::Vfu { step: STEP, source };
        let c = self.cmd.client();
        let flags = read_cfg16(c, m.cap + PCI_MSIX_FLAGS).map_err(vfu)?;
        c.region_write(
            CONFIG,
            m.cap + PCI_MSIX_FLAGS,
            &(flags & !PCI_MSIX_FLAGS_ENABLE).to_le_bytes(),
        )
        .map_err(vfu)?;
        c.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            0,
            &[],
            &[],
        )
        .map_err(vfu)
    }

    /// Brings the function down: every stage that is set up is undone, in reverse.
    /// Continues past failures and returns the first one.
    pub fn down(&mut self) -> Result<(), HcaError> {
        let mut first: Option<HcaError> = None;
        let mut note = |r: Result<(), HcaError>| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "teardown step failed");
                first.get_or_insert(e);
            }
        };
        if let Some(pd) = self.stages.pd.take() {
            let mut m = new_input(Opcode::DeallocPd, 0, DEALLOC_PD_IN_LEN);
            set(&mut m, DEALLOC_PD_IN_PD, pd.into());
            note(
                self.cmd
                    .exec(&m, DEALLOC_PD_OUT_LEN)
                    .map(drop)
                    .map_err(step("dealloc pd failed")),
            );
        }
        // Back to polling before destroying the EQ that carries completions.
        let eq = self.cmd.use_polling();
        if let Some(eqn) = self.stages.cmd_eqn.take() {
            let mut m = new_input(Opcode::DestroyEq, 0, DESTROY_EQ_IN_LEN);
            set(&mut m, DESTROY_EQ_IN_EQ_NUMBER, eqn.into());
            let r = self
                .cmd
                .exec(&m, DESTROY_EQ_OUT_LEN)
                .map(drop)
                .map_err(step("destroy eq failed"));
            let destroyed = r.is_ok();
            note(r);
            if let Some((eq, _eventfd)) = eq {
                if destroyed {
                    eq.free(self.cmd.arena_mut());
                } else {
                    // The device may still write the ring: keep its pages out of the pool.
                    tracing::warn!(eqn, "EQ buffer leaked after a failed DESTROY_EQ");
                }
            }
        }
        if let Some(m) = self.stages.msix.take() {
            note(self.disable_msix(m));
        }
        if let Some(uar) = self.stages.uar.take() {
            let mut m = new_input(Opcode::DeallocUar, 0, DEALLOC_UAR_IN_LEN);
            set(&mut m, DEALLOC_UAR_IN_UAR, uar.into());
            note(
                self.cmd
                    .exec(&m, DEALLOC_UAR_OUT_LEN)
                    .map(drop)
                    .map_err(step("dealloc uar failed")),
            );
        }
        if self.stages.initialized {
            self.stages.initialized = false;
            let mut m = new_input(Opcode::TeardownHca, 0, TEARDOWN_HCA_IN_LEN);
            set(
                &mut m,
                TEARDOWN_HCA_IN_PROFILE,
                TEARDOWN_PROFILE_GRACEFUL_CLOSE.into(),
            );
            note(
                self.cmd
                    .exec(&m, TEARDOWN_HCA_OUT_LEN)
                    .map(drop)
                    .map_err(step("tear_down_hca failed")),
            );
        }
        if !self.pages.is_empty() {
            note(self.reclaim_pages().map(drop));
        }
        if self.stages.enabled {
            self.stages.enabled = false;
            let mut m = new_input(Opcode::DisableHca, 0, DISABLE_HCA_IN_LEN);
            set(&mut m, ENABLE_HCA_IN_FUNCTION_ID, 0);
            note(
                self.cmd
                    .exec(&m, DISABLE_HCA_OUT_LEN)
                    .map(drop)
                    .map_err(step("disable hca failed")),
            );
        }
        self.info = None;
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// CREATE_MKEY in MTT mode, as mlx5vf `_create_mkey` fills it: local and remote
    /// read/write, no QP, the function's PD, virtual range `[0, len)` over `mtt` (one
    /// IOVA per 2^`log_page_size` page). Returns the 32-bit key.
    pub fn create_mkey(
        &mut self,
        mtt: &[u64],
        log_page_size: u8,
        len: u64,
        variant: u8,
    ) -> Result<u32, HcaError> {
        let pd = self
            .stages
            .pd
            .ok_or(HcaError::State("create mkey needs the function up (no PD)"))?;
        self.create_mkey_in_pd(pd, mtt, log_page_size, len, variant)
    }

    /// ALLOC_PD for a caller that owns it (mlx5vf allocates one per migration file).
    pub fn alloc_pd(&mut self) -> Result<u32, HcaError> {
        let m = new_input(Opcode::AllocPd, 0, ALLOC_PD_IN_LEN);
        let out = self
            .cmd
            .exec(&m, ALLOC_PD_OUT_LEN)
            .map_err(step("alloc pd failed"))?;
        Ok(get(&out, ALLOC_PD_OUT_PD) as u32)
    }

    /// DEALLOC_PD of a PD from [`Hca::alloc_pd`].
    pub fn dealloc_pd(&mut self, pd: u32) -> Result<(), HcaError> {
        let mut m = new_input(Opcode::DeallocPd, 0, DEALLOC_PD_IN_LEN);
        set(&mut m, DEALLOC_PD_IN_PD, pd.into());
        self.cmd
            .exec(&m, DEALLOC_PD_OUT_LEN)
            .map(drop)
            .map_err(step("dealloc pd failed"))
    }

    /// [`Hca::create_mkey`] in a caller-chosen PD.
    pub fn create_mkey_in_pd(
        &mut self,
        pd: u32,
        mtt: &[u64],
        log_page_size: u8,
        len: u64,
        variant: u8,
    ) -> Result<u32, HcaError> {
        const STEP: &str = "create mkey failed";
        let in_len = create_mkey_in_len(mtt.len()).ok_or(HcaError::State("MTT too long"))?;
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
    pub fn destroy_mkey(&mut self, mkey: u32) -> Result<(), HcaError> {
        let mut m = new_input(Opcode::DestroyMkey, 0, DESTROY_MKEY_IN_LEN);
        set(&mut m, DESTROY_MKEY_IN_MKEY_INDEX, u64::from(mkey >> 8));
        self.cmd
            .exec(&m, DESTROY_MKEY_OUT_LEN)
            .map(drop)
            .map_err(step("destroy mkey failed"))
    }

    /// Another function's GENERAL (and GENERAL_2) CUR capabilities, read through this
    /// one with `other_function` = 1 (the PF reading VF n names function n + 1).
    pub fn query_other_caps(&mut self, function_id: u16) -> Result<OtherCaps, HcaError> {
        const STEP: &str = "query other function caps failed";
        let caps = self.query_caps(CapType::General, CapMode::Cur, Some(function_id), STEP)?;
        let caps2 = if get(&caps, cap::HCA_CAP_2) != 0
            || self.info.as_ref().is_some_and(|i| i.caps2.is_some())
        {
            Some(self.query_caps(CapType::General2, CapMode::Cur, Some(function_id), STEP)?)
        } else {
            None
        };
        Ok(OtherCaps {
            function_id,
            vhca_id: get(&caps, cap::VHCA_ID) as u16,
            migration: MigrationCaps::from_pages(&caps, caps2.as_deref()),
            caps,
            caps2,
        })
    }
}

fn read_cfg8(c: &mut vfu::Client, off: u64) -> Result<u8, vfu::VfuError> {
    let mut b = [0u8; 1];
    c.region_read(CONFIG, off, &mut b)?;
    Ok(b[0])
}

fn read_cfg16(c: &mut vfu::Client, off: u64) -> Result<u16, vfu::VfuError> {
    let mut b = [0u8; 2];
    c.region_read(CONFIG, off, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn read_cfg32(c: &mut vfu::Client, off: u64) -> Result<u32, vfu::VfuError> {
    let mut b = [0u8; 4];
    c.region_read(CONFIG, off, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Walks the capability list (bounded, pointers checked) for MSI-X.
fn find_msix_cap(c: &mut vfu::Client) -> Result<Option<u64>, vfu::VfuError> {
    let mut ptr = read_cfg8(c, PCI_CAPABILITY_LIST)? & !3;
    for _ in 0..MAX_PCI_CAPS {
        if ptr < 0x40 {
            return Ok(None);
        }
        let id = read_cfg8(c, u64::from(ptr))?;
        if id == PCI_CAP_ID_MSIX {
            return Ok(Some(u64::from(ptr)));
        }
        ptr = read_cfg8(c, u64::from(ptr) + 1)? & !3;
    }
    Ok(None)
}

/// A 128-bit value per bring-up for INIT_HCA's sw_owner_id (no crypto strength needed:
/// it only tells driver instances apart).
fn sw_owner_id() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut id = [0u8; 16];
    for (i, half) in id.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        half.copy_from_slice(&h.finish().to_be_bytes());
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_caps_read_the_documented_bits() {
        let mut g = vec![0u8; HCA_CAP_SIZE];
        let mut g2 = vec![0u8; HCA_CAP_SIZE];
        assert_eq!(
            MigrationCaps::from_pages(&g, None),
            MigrationCaps::default()
        );
        set(&mut g, cap::MIGRATION, 1);
        set(&mut g2, cap2::MIGRATION_IN_CHUNKS, 1);
        let m = MigrationCaps::from_pages(&g, Some(&g2));
        assert!(m.migration && m.in_chunks && !m.multi_load && !m.tracking_state);
    }

    #[test]
    fn driver_objects_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<Hca>();
        send::<CmdIf>();
    }

    #[test]
    fn sw_owner_ids_differ() {
        assert_ne!(sw_owner_id(), sw_owner_id());
    }
}
