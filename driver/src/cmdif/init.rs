//! The init segment side of the command interface (mlx5-device.md §2): firmware
//! revision, queue geometry, programming the queue address and the `initializing`
//! waits of `mlx5_cmd_enable` / `wait_fw_init`. Register names and masks are
//! `mlx5_prm::iseg`'s.

use std::time::{Duration, Instant};

use mlx5_prm::cmdq::CMD_ENTRY_SIZE;
use mlx5_prm::iseg::{
    CMDIF_REV, CMDIF_REV_FW_SUB_OFFSET, CMDIF_REV_SHIFT, CMDQ_ADDR_H_OFFSET, CMDQ_ADDR_L_SZ_OFFSET,
    CMDQ_LOG_SIZE_MASK, CMDQ_LOG_SIZE_SHIFT, CMDQ_LOG_STRIDE_MASK, CMDQ_LOG_STRIDE_SHIFT,
    CMDQ_MAX_ENTRIES, CMDQ_MAX_LOG_BYTES, FW_REV_MAJOR_MASK, FW_REV_MINOR_SHIFT, FW_REV_OFFSET,
    FW_SUB_MASK, INITIALIZING_BUSY_MASK, INITIALIZING_OFFSET,
};
use vfu::uapi::VFIO_PCI_BAR0_REGION_INDEX;
use vfu::Client;

use super::error::CmdError;

/// BAR0 is region 0.
pub const BAR0: u32 = VFIO_PCI_BAR0_REGION_INDEX;
/// Poll period of the `initializing` wait (FW_PRE_INIT_WAIT).
const INIT_POLL: Duration = Duration::from_millis(2);

/// Firmware revision from the init segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FwRev {
    pub major: u16,
    pub minor: u16,
    pub sub: u16,
    pub cmdif_rev: u16,
}

impl std::fmt::Display for FwRev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{:04}", self.major, self.minor, self.sub)
    }
}

/// Queue geometry read from `cmdq_addr_l_sz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub log_sz: u32,
    pub log_stride: u32,
}

impl Geometry {
    /// Number of slots.
    pub fn slots(&self) -> usize {
        1 << self.log_sz
    }

    /// Slot reserved for MANAGE_PAGES (the last one); regular commands use the others.
    pub fn pages_slot(&self) -> usize {
        self.slots() - 1
    }

    /// Validates like `mlx5_cmd_enable`; additionally refuses a queue with no regular
    /// slot, on which the kernel would block forever.
    pub fn from_register(reg: u32) -> Result<Self, CmdError> {
        let g = Geometry {
            log_sz: (reg & CMDQ_LOG_SIZE_MASK) >> CMDQ_LOG_SIZE_SHIFT,
            log_stride: (reg & CMDQ_LOG_STRIDE_MASK) >> CMDQ_LOG_STRIDE_SHIFT,
        };
        let bad = |why| CmdError::Geometry {
            log_sz: g.log_sz,
            log_stride: g.log_stride,
            why,
        };
        if (1u32 << g.log_sz) > CMDQ_MAX_ENTRIES {
            return Err(bad("firmware reports too many outstanding commands"));
        }
        if g.log_sz + g.log_stride > CMDQ_MAX_LOG_BYTES {
            return Err(bad("command queue size overflow"));
        }
        if (1usize << g.log_stride) < CMD_ENTRY_SIZE {
            return Err(bad("entry stride smaller than an entry"));
        }
        if g.log_sz == 0 {
            return Err(bad("a single slot leaves no regular command slot"));
        }
        Ok(g)
    }
}

pub(super) fn read32(client: &mut Client, off: u64) -> Result<u32, CmdError> {
    let mut b = [0u8; 4];
    client.region_read(BAR0, off, &mut b)?;
    Ok(u32::from_be_bytes(b))
}

pub(super) fn write32(client: &mut Client, off: u64, v: u32) -> Result<(), CmdError> {
    client.region_write(BAR0, off, &v.to_be_bytes())?;
    Ok(())
}

fn wait_initializing(client: &mut Client, limit: Duration) -> Result<(), CmdError> {
    let start = Instant::now();
    loop {
        let v = read32(client, INITIALIZING_OFFSET)?;
        if v & INITIALIZING_BUSY_MASK == 0 {
            return Ok(());
        }
        if start.elapsed() >= limit {
            return Err(CmdError::FwInit {
                waited: start.elapsed(),
                value: v,
            });
        }
        std::thread::sleep(INIT_POLL);
    }
}

/// The firmware revision (`fw_rev`, `cmdif_rev_fw_sub`).
fn read_rev(client: &mut Client) -> Result<FwRev, CmdError> {
    let fw_rev = read32(client, FW_REV_OFFSET)?;
    let cmdif = read32(client, CMDIF_REV_FW_SUB_OFFSET)?;
    Ok(FwRev {
        major: (fw_rev & FW_REV_MAJOR_MASK) as u16,
        minor: (fw_rev >> FW_REV_MINOR_SHIFT) as u16,
        sub: (cmdif & FW_SUB_MASK) as u16,
        cmdif_rev: (cmdif >> CMDIF_REV_SHIFT) as u16,
    })
}

/// Reads the firmware revision and the queue geometry, without touching the queue.
pub(super) fn probe(client: &mut Client) -> Result<(FwRev, Geometry), CmdError> {
    let fw = read_rev(client)?;
    let geometry = Geometry::from_register(read32(client, CMDQ_ADDR_L_SZ_OFFSET)?)?;
    Ok((fw, geometry))
}

/// `mlx5_cmd_enable` plus `wait_fw_init`: checks the cmdif revision, waits for
/// `initializing` to clear, programs the queue at `queue_iova` (4 KiB aligned; low
/// bits 0 also request nic_interface FULL_DRIVER) and waits again.
pub(super) fn enable(
    client: &mut Client,
    queue_iova: u64,
    pre_init_timeout: Duration,
    init_timeout: Duration,
) -> Result<(FwRev, Geometry), CmdError> {
    let fw = read_rev(client)?;
    if fw.cmdif_rev != CMDIF_REV {
        return Err(CmdError::CmdifRev {
            found: fw.cmdif_rev,
            expected: CMDIF_REV,
        });
    }
    wait_initializing(client, pre_init_timeout)?;
    let geometry = Geometry::from_register(read32(client, CMDQ_ADDR_L_SZ_OFFSET)?)?;
    write32(client, CMDQ_ADDR_H_OFFSET, (queue_iova >> 32) as u32)?;
    write32(client, CMDQ_ADDR_L_SZ_OFFSET, queue_iova as u32)?;
    wait_initializing(client, init_timeout)?;
    Ok((fw, geometry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_is_validated_like_mlx5_cmd_enable() {
        let g = Geometry::from_register(0x56).unwrap();
        assert_eq!((g.slots(), g.pages_slot(), g.log_stride), (32, 31, 6));
        // nic_interface and address bits do not matter.
        assert_eq!(Geometry::from_register(0xdead_f756).unwrap(), g);
        assert!(Geometry::from_register(0x66).is_err()); // 64 slots
        assert!(Geometry::from_register(0x58).is_err()); // 5 + 8 > 12
        assert!(Geometry::from_register(0x55).is_err()); // 32-byte stride
        assert!(Geometry::from_register(0x06).is_err()); // one slot
        assert!(Geometry::from_register(0x16).is_ok());
    }
}
