//! The device's health as the init segment shows it (mlx5-device.md §2.2, §5.1):
//! mlx5_core's fatal sensors (`mlx5_health_check_fatal_sensors`) and the health
//! syndrome, read on demand (there is no poll timer here).
//!
//! The migration driver reads it before each arc and after a failed command: a device
//! whose BAR reads all-ones, whose interface was disabled or reset, or whose firmware
//! reported a syndrome can no longer be trusted with a migration image.

use mlx5_prm::iseg::{
    nic_interface_bits, CMDQ_ADDR_L_SZ_OFFSET, HEALTH_EXT_SYND_OFFSET, HEALTH_FW_VER_OFFSET,
    HEALTH_OFFSET, HEALTH_RFR_MASK, HEALTH_RFR_SEVERITY_OFFSET, HEALTH_SIZE, HEALTH_SYND_OFFSET,
};
use mlx5_prm::NicInterface;

use super::init::{read32, BAR0};
use super::{CmdError, CmdIf};

/// What `health.fw_ver` (0x230) reads on a dead link (`sensor_pci_not_working`).
pub const FW_VER_DEAD: u32 = 0xffff_ffff;

/// Byte positions inside the 64-byte health buffer, which is read whole.
const FW_VER_AT: usize = (HEALTH_FW_VER_OFFSET - HEALTH_OFFSET) as usize;
const RFR_SEVERITY_AT: usize = (HEALTH_RFR_SEVERITY_OFFSET - HEALTH_OFFSET) as usize;
const SYND_AT: usize = (HEALTH_SYND_OFFSET - HEALTH_OFFSET) as usize;
const EXT_SYND_AT: usize = (HEALTH_EXT_SYND_OFFSET - HEALTH_OFFSET) as usize;
const _: () = assert!(EXT_SYND_AT + 2 <= HEALTH_SIZE);

/// Why the device is not healthy, in mlx5_core's sensor order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HealthFault {
    /// MLX5_SENSOR_PCI_COMM_ERR: `health.fw_ver` reads 0xffffffff (all-ones BAR).
    #[error("the device reads all-ones (health.fw_ver {FW_VER_DEAD:#x}): PCI link dead")]
    PciCommErr,
    /// MLX5_SENSOR_NIC_DISABLED / NIC_SW_RESET: `nic_interface` is DISABLED or SW_RESET.
    #[error("nic_interface is {}", .0.name())]
    NicInterface(NicInterface),
    /// `health.synd` is non-zero. With RFR set this is MLX5_SENSOR_FW_SYND_RFR; without
    /// it mlx5_core only reports it, but a migration driver does not trust an image
    /// taken from (or loaded into) firmware that reported an internal error.
    #[error("firmware health syndrome {synd:#x} (ext_synd {ext_synd:#x}, rfr {rfr})")]
    Syndrome { synd: u8, ext_synd: u16, rfr: bool },
}

impl CmdIf {
    /// Reads the health buffer and `nic_interface`: `Ok(None)` when healthy. Two BAR0
    /// reads; it does not touch the command queue.
    pub fn health(&self) -> Result<Option<HealthFault>, CmdError> {
        let mut raw = [0u8; HEALTH_SIZE];
        let mut client = self.client();
        client.region_read(BAR0, HEALTH_OFFSET, &mut raw)?;
        let fw_ver = u32::from_be_bytes([
            raw[FW_VER_AT],
            raw[FW_VER_AT + 1],
            raw[FW_VER_AT + 2],
            raw[FW_VER_AT + 3],
        ]);
        if fw_ver == FW_VER_DEAD {
            return Ok(Some(HealthFault::PciCommErr));
        }
        let nic = NicInterface::try_from(nic_interface_bits(read32(
            &mut client,
            CMDQ_ADDR_L_SZ_OFFSET,
        )?));
        if let Ok(n @ (NicInterface::Disabled | NicInterface::SwReset)) = nic {
            return Ok(Some(HealthFault::NicInterface(n)));
        }
        let synd = raw[SYND_AT];
        if synd != 0 {
            return Ok(Some(HealthFault::Syndrome {
                synd,
                ext_synd: u16::from_be_bytes([raw[EXT_SYND_AT], raw[EXT_SYND_AT + 1]]),
                rfr: raw[RFR_SEVERITY_AT] & HEALTH_RFR_MASK != 0,
            }));
        }
        Ok(None)
    }
}
