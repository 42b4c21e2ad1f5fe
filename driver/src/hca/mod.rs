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
//!
//! The files: this one the bring-up and teardown sequences, [`caps`] capabilities
//! (this function's and another's through `other_function`), [`pages`] the firmware's
//! page requests, [`objects`] PDs and mkeys, [`irq`] MSI-X and the command EQ.
//!
//! # Sharing and locks
//! An [`Hca`] is shared by reference (`Arc<Hca>`): every method takes `&self`, and its
//! commands go through the shared [`CmdIf`], so threads issue commands for different
//! functions at once. Its own locks are leaves, each held for one update and never
//! across a command: `stages` (what bring-up has set up), `pages` (the pages the
//! firmware holds from us), `info`. Bring-up and teardown are exclusive with each
//! other through a busy flag, not a lock.

pub mod caps;
pub mod irq;
pub mod objects;
pub mod pages;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mlx5_prm::cmd::caps::{cmd_hca_cap as cap, CapMode, CapType};
use mlx5_prm::cmd::eq::{DESTROY_EQ_IN_EQ_NUMBER, DESTROY_EQ_IN_LEN, DESTROY_EQ_OUT_LEN};
use mlx5_prm::cmd::hca::*;
use mlx5_prm::cmd::pages::QueryPagesOpMod;
use mlx5_prm::cmd::uar::{
    ALLOC_UAR_IN_LEN, ALLOC_UAR_OUT_LEN, ALLOC_UAR_OUT_UAR, DEALLOC_UAR_IN_LEN, DEALLOC_UAR_IN_UAR,
    DEALLOC_UAR_OUT_LEN,
};
use mlx5_prm::cmd::DRIVER_SYNDROME;
use mlx5_prm::ifc::{get, set};
use mlx5_prm::Opcode;

use crate::cmdif::{new_input, CmdError, CmdIf, EqError, FwRev};
pub use caps::{MigrationCaps, OtherCaps};
use irq::MsixSetup;
pub use irq::CMD_EQ_VECTOR;
pub use pages::PAGES_PER_COMMAND;

/// ISSI bits in `supported_issi_dw0`.
const ISSI_0: u64 = 1 << 0;
const ISSI_1: u64 = 1 << 1;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each guarded value is updated in one step, so a panic leaves it consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
    #[error("{step}: the firmware supports ISSI mask {mask:#x}, neither 0 nor 1")]
    UnsupportedIssi { step: &'static str, mask: u64 },
    #[error("{step}: out of DMA pages for the firmware ({asked} asked); raise the arena size")]
    OutOfPages { step: &'static str, asked: usize },
    #[error("{step}: corruption: asked for {asked} pages, the firmware returned {got}")]
    TooManyPages {
        step: &'static str,
        asked: usize,
        got: u64,
    },
    #[error("{step}: the firmware returned page {page:#x}, which it was never given")]
    ForeignPage { step: &'static str, page: u64 },
    #[error("{step}: {held} pages still held by the firmware; they stay out of the arena")]
    PagesStillHeld { step: &'static str, held: usize },
    #[error("{step}: no MSI-X capability in config space")]
    NoMsix { step: &'static str },
    #[error("{step}: MSI-X table in BAR{bar}, expected BAR0")]
    MsixTableBar { step: &'static str, bar: u32 },
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
    #[error("the function is already up; bring it down first")]
    AlreadyUp,
    #[error("another bring-up or teardown of this function is running; retry when it ends")]
    LifecycleBusy,
    #[error("{what} needs the function up (bring-up allocates its PD)")]
    NotUp { what: &'static str },
    #[error("an MTT of {entries} entries overflows the CREATE_MKEY input length")]
    MttTooLong { entries: usize },
    #[error("VF {vf} has no function number (function_id = VF + 1 overflows)")]
    BadVf { vf: u16 },
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
            HcaError::UnsupportedIssi { .. }
            | HcaError::NoMsix { .. }
            | HcaError::MsixTableBar { .. } => -libc::EOPNOTSUPP,
            HcaError::OutOfPages { .. } => -libc::ENOMEM,
            HcaError::TooManyPages { .. }
            | HcaError::ForeignPage { .. }
            | HcaError::PagesStillHeld { .. } => -libc::EIO,
            HcaError::Eq { .. } => -libc::ENOMEM,
            HcaError::Io { source, .. } => -source.raw_os_error().unwrap_or(libc::EIO),
            HcaError::AlreadyUp | HcaError::NotUp { .. } | HcaError::BadVf { .. } => -libc::EINVAL,
            HcaError::LifecycleBusy => -libc::EBUSY,
            HcaError::MttTooLong { .. } => -libc::E2BIG,
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
pub(in crate::hca) struct Stages {
    pub(in crate::hca) enabled: bool,
    pub(in crate::hca) initialized: bool,
    pub(in crate::hca) uar: Option<u32>,
    pub(in crate::hca) msix: Option<MsixSetup>,
    pub(in crate::hca) cmd_eqn: Option<u8>,
    pub(in crate::hca) pd: Option<u32>,
}

/// One function driven through its command interface.
pub struct Hca {
    cmd: CmdIf,
    /// A leaf lock (see the module docs).
    stages: Mutex<Stages>,
    /// Pages the firmware holds from us (given and not yet taken back). A leaf lock.
    pages: Mutex<BTreeSet<u64>>,
    /// A leaf lock.
    info: Mutex<Option<Arc<HcaInfo>>>,
    /// A bring-up or teardown is running.
    lifecycle: AtomicBool,
}

/// Clears the lifecycle flag when a bring-up or teardown ends.
struct Lifecycle<'a>(&'a AtomicBool);

impl Drop for Lifecycle<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl std::fmt::Debug for Hca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hca")
            .field("stages", &*self.stages())
            .field("pages", &self.pages_held())
            .field("cmd", &self.cmd)
            .finish()
    }
}

impl Hca {
    /// A function that is down, driven through `cmd`.
    pub fn new(cmd: CmdIf) -> Self {
        Hca {
            cmd,
            stages: Mutex::new(Stages::default()),
            pages: Mutex::new(BTreeSet::new()),
            info: Mutex::new(None),
            lifecycle: AtomicBool::new(false),
        }
    }

    /// The command interface.
    pub fn cmd(&self) -> &CmdIf {
        &self.cmd
    }

    pub(in crate::hca) fn stages(&self) -> MutexGuard<'_, Stages> {
        lock(&self.stages)
    }

    /// The pages the firmware holds from us.
    pub(in crate::hca) fn held(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        lock(&self.pages)
    }

    fn info_slot(&self) -> MutexGuard<'_, Option<Arc<HcaInfo>>> {
        lock(&self.info)
    }

    /// Marks a bring-up or teardown as running; refused while another one is.
    fn lifecycle(&self) -> Result<Lifecycle<'_>, HcaError> {
        if self.lifecycle.swap(true, Ordering::AcqRel) {
            return Err(HcaError::LifecycleBusy);
        }
        Ok(Lifecycle(&self.lifecycle))
    }

    /// Hands the command interface back (bring the function down first).
    pub fn into_cmdif(self) -> CmdIf {
        self.cmd
    }

    /// What the last bring-up learned, while the function is up.
    pub fn info(&self) -> Option<Arc<HcaInfo>> {
        self.info_slot().clone()
    }

    /// Whether the function is (at least partly) up.
    pub fn is_up(&self) -> bool {
        self.stages().enabled
    }

    /// Pages the firmware currently holds from us.
    pub fn pages_held(&self) -> usize {
        self.held().len()
    }

    /// Brings the function up. On failure the steps already done are undone.
    pub fn up(&self, opts: &HcaOptions) -> Result<Arc<HcaInfo>, HcaError> {
        let _busy = self.lifecycle()?;
        if self.stages().enabled {
            return Err(HcaError::AlreadyUp);
        }
        match self.bring_up(opts) {
            Ok(info) => {
                let info = Arc::new(info);
                *self.info_slot() = Some(info.clone());
                Ok(info)
            }
            Err(e) => {
                tracing::warn!(error = %e, "bring-up failed; unwinding");
                if let Err(u) = self.teardown() {
                    tracing::warn!(error = %u, "unwinding after a failed bring-up");
                }
                Err(e)
            }
        }
    }

    fn bring_up(&self, opts: &HcaOptions) -> Result<HcaInfo, HcaError> {
        // ENABLE_HCA.
        let mut m = new_input(Opcode::EnableHca, 0, ENABLE_HCA_IN_LEN);
        set(&mut m, ENABLE_HCA_IN_FUNCTION_ID, 0);
        self.cmd
            .exec(&m, ENABLE_HCA_OUT_LEN)
            .map_err(step("enable hca failed"))?;
        self.stages().enabled = true;

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
        self.stages().initialized = true;

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
        self.stages().uar = Some(uar);
        if opts.events {
            self.start_cmd_eq(uar)?;
        }
        let pd = self.alloc_pd()?;
        self.stages().pd = Some(pd);

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
            cmd_eqn: self.stages().cmd_eqn,
            pages_given: self.pages_held(),
        };
        tracing::info!(
            fw = %info.fw, issi, vhca_id = info.vhca_id, pages = info.pages_given,
            events = opts.events, "function up"
        );
        Ok(info)
    }

    /// `mlx5_core_set_issi`.
    fn set_issi(&self) -> Result<u16, HcaError> {
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
            Err(HcaError::UnsupportedIssi {
                step: STEP,
                mask: supported,
            })
        }
    }

    /// SET_DRIVER_VERSION; the kernel ignores its result, so do we (with a log).
    fn set_driver_version(&self, version: &str) {
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
    fn query_board_id(&self) -> Result<String, HcaError> {
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

    /// Brings the function down: every stage that is set up is undone, in reverse.
    /// Continues past failures and returns the first one.
    pub fn down(&self) -> Result<(), HcaError> {
        let _busy = self.lifecycle()?;
        self.teardown()
    }

    fn teardown(&self) -> Result<(), HcaError> {
        let mut first: Option<HcaError> = None;
        let mut note = |r: Result<(), HcaError>| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "teardown step failed");
                first.get_or_insert(e);
            }
        };
        let pd = self.stages().pd.take();
        if let Some(pd) = pd {
            note(self.dealloc_pd(pd));
        }
        // Back to polling before destroying the EQ that carries completions.
        let eq = self.cmd.use_polling();
        let cmd_eqn = self.stages().cmd_eqn.take();
        if let Some(eqn) = cmd_eqn {
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
                    eq.free(self.cmd.arena());
                } else {
                    // The device may still write the ring: keep its pages out of the pool.
                    tracing::warn!(eqn, "EQ buffer leaked after a failed DESTROY_EQ");
                }
            }
        }
        let msix = self.stages().msix.take();
        if let Some(m) = msix {
            note(self.disable_msix(m));
        }
        let uar = self.stages().uar.take();
        if let Some(uar) = uar {
            let mut m = new_input(Opcode::DeallocUar, 0, DEALLOC_UAR_IN_LEN);
            set(&mut m, DEALLOC_UAR_IN_UAR, uar.into());
            note(
                self.cmd
                    .exec(&m, DEALLOC_UAR_OUT_LEN)
                    .map(drop)
                    .map_err(step("dealloc uar failed")),
            );
        }
        if std::mem::take(&mut self.stages().initialized) {
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
        if self.pages_held() > 0 {
            note(self.reclaim_pages().map(drop));
        }
        if std::mem::take(&mut self.stages().enabled) {
            let mut m = new_input(Opcode::DisableHca, 0, DISABLE_HCA_IN_LEN);
            set(&mut m, ENABLE_HCA_IN_FUNCTION_ID, 0);
            note(
                self.cmd
                    .exec(&m, DISABLE_HCA_OUT_LEN)
                    .map(drop)
                    .map_err(step("disable hca failed")),
            );
        }
        *self.info_slot() = None;
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
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
    fn a_function_is_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Hca>();
    }

    #[test]
    fn sw_owner_ids_differ() {
        assert_ne!(sw_owner_id(), sw_owner_id());
    }
}
