//! Interrupts: MSI-X vector 0 with an eventfd (SET_IRQS, the table entry, the enable
//! bit in config space) and the command EQ on it, which switches the command
//! interface to completion by EQE.

use std::os::fd::AsRawFd;

use mlx5_prm::cmd::eq::{CREATE_EQ_OUT_EQ_NUMBER, CREATE_EQ_OUT_LEN, EVENT_TYPE_CMD};
use mlx5_prm::ifc::get;
use vfu::uapi::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{step, Hca, HcaError};
use crate::cmdif::eq::CMD_EQ_LOG_SIZE;
use crate::cmdif::{EventQueue, BAR0};

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

/// Where MSI-X was set up (its capability), to tear it down.
#[derive(Debug, Clone, Copy)]
pub struct MsixSetup {
    cap: u64,
}

impl Hca {
    /// MSI-X vector 0 with an eventfd, the command EQ on it (created by polling), the
    /// arm doorbell, then event mode (`create_async_eqs` for the cmd EQ).
    pub(super) fn start_cmd_eq(&self, uar: u32) -> Result<(), HcaError> {
        const STEP: &str = "Failed to create EQs";
        let eventfd =
            EventFd::new(EFD_NONBLOCK).map_err(|source| HcaError::Io { step: STEP, source })?;
        let msix = self.enable_msix(&eventfd)?;
        self.stages().msix = Some(msix);
        let mut eq = EventQueue::alloc(self.cmd.arena(), CMD_EQ_LOG_SIZE, uar, CMD_EQ_VECTOR)
            .map_err(|source| HcaError::Eq { step: STEP, source })?;
        let m = eq.create_input(1 << EVENT_TYPE_CMD);
        let out = match self.cmd.exec(&m, CREATE_EQ_OUT_LEN) {
            Ok(out) => out,
            Err(e) => {
                eq.free(self.cmd.arena());
                return Err(step(STEP)(e));
            }
        };
        let eqn = get(&out, CREATE_EQ_OUT_EQ_NUMBER) as u8;
        eq.set_eqn(eqn);
        self.stages().cmd_eqn = Some(eqn);
        let (off, v) = eq.doorbell(true);
        if let Err(source) = self.cmd.client().region_write(BAR0, off, &v) {
            eq.free(self.cmd.arena());
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
    fn enable_msix(&self, eventfd: &EventFd) -> Result<MsixSetup, HcaError> {
        self.attach_msix(CMD_EQ_VECTOR, eventfd)
    }

    /// Delivers MSI-X `vector` to `eventfd`: SET_IRQS for that one vector, its table
    /// entry unmasked, MSI-X enabled (and the function unmasked) in config space. The
    /// vectors already assigned keep their eventfds.
    pub fn attach_msix(&self, vector: u16, eventfd: &EventFd) -> Result<MsixSetup, HcaError> {
        const STEP: &str = "MSI-X setup failed";
        let vfu = |source| HcaError::Vfu { step: STEP, source };
        let mut c = self.cmd.client();
        let cap = find_msix_cap(&mut c)
            .map_err(vfu)?
            .ok_or(HcaError::NoMsix { step: STEP })?;
        let table = read_cfg32(&mut c, cap + PCI_MSIX_TABLE).map_err(vfu)?;
        if table & PCI_MSIX_TABLE_BIR != 0 {
            return Err(HcaError::MsixTableBar {
                step: STEP,
                bar: table & PCI_MSIX_TABLE_BIR,
            });
        }
        let entry =
            u64::from(table & !PCI_MSIX_TABLE_BIR) + u64::from(vector) * PCI_MSIX_ENTRY_SIZE;
        c.set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            u32::from(vector),
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
        let flags = read_cfg16(&mut c, cap + PCI_MSIX_FLAGS).map_err(vfu)?;
        let flags = (flags | PCI_MSIX_FLAGS_ENABLE) & !PCI_MSIX_FLAGS_MASKALL;
        c.region_write(CONFIG, cap + PCI_MSIX_FLAGS, &flags.to_le_bytes())
            .map_err(vfu)?;
        Ok(MsixSetup { cap })
    }

    pub(super) fn disable_msix(&self, m: MsixSetup) -> Result<(), HcaError> {
        const STEP: &str = "MSI-X teardown failed";
        let vfu = |source| HcaError::Vfu { step: STEP, source };
        let mut c = self.cmd.client();
        let flags = read_cfg16(&mut c, m.cap + PCI_MSIX_FLAGS).map_err(vfu)?;
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
