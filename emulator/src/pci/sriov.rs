//! The SR-IOV extended capability of the PF (PCIe Base 4.0 §9.3.3; Linux
//! `drivers/pci/iov.c` `sriov_init`, `include/uapi/linux/pci_regs.h` PCI_SRIOV_*), as a
//! ConnectX adapter carries it: TotalVFs = InitialVFs = the VFs the adapter was built
//! with, VF Device ID 15b3:101e, the VFs at function 1, 2, ... of the PF's slot (First
//! VF Offset 1, VF Stride 1), VF BARs of the VFs' own sizes (BAR0, and BAR2 when the
//! functions have device memory), Supported Page Sizes 4 KiB..4 MiB (0x7ff), no VF
//! migration (the pre-IOV-migration mechanism; migration goes through the PF's
//! firmware commands instead).
//!
//! Registers are relative to the capability. Writable: SR-IOV Control (VF Enable, VF
//! Memory Space Enable, ARI Capable Hierarchy), NumVFs (only while VF Enable is clear,
//! as the spec requires), System Page Size (one of the supported sizes), the VF BARs'
//! address bits. The emulator serves every VF socket whatever the guest writes here:
//! a VMM decides which functions its guest sees.

use super::{Reg, DEVICE_ID_VF};

/// Where the SR-IOV capability lives: after ARI (0x100), at the offset a ConnectX-6 Dx
/// uses.
pub const SRIOV_EXT_CAP_OFFSET: usize = 0x180;
/// Single Root I/O Virtualization (PCI_EXT_CAP_ID_SRIOV).
pub const EXT_CAP_ID_SRIOV: u16 = 0x0010;
/// SR-IOV capability structure version.
pub const SRIOV_VERSION: u32 = 1;
/// Length of the capability (PCI_EXT_CAP_SRIOV_SIZEOF).
pub const SRIOV_CAP_LEN: usize = 0x40;

/// SR-IOV Capabilities (PCI_SRIOV_CAP); 0: no VF Migration, interrupt message 0.
pub const SRIOV_CAP_OFFSET: usize = 0x04;
/// SR-IOV Control (PCI_SRIOV_CTRL).
pub const SRIOV_CTRL_OFFSET: usize = 0x08;
/// VF Enable (PCI_SRIOV_CTRL_VFE).
pub const SRIOV_CTRL_VFE: u16 = 1 << 0;
/// VF Migration Enable (PCI_SRIOV_CTRL_VFM); read-only zero, no VF Migration.
pub const SRIOV_CTRL_VFM: u16 = 1 << 1;
/// VF Memory Space Enable (PCI_SRIOV_CTRL_MSE).
pub const SRIOV_CTRL_MSE: u16 = 1 << 3;
/// ARI Capable Hierarchy (PCI_SRIOV_CTRL_ARI).
pub const SRIOV_CTRL_ARI: u16 = 1 << 4;
/// Guest-writable SR-IOV Control bits.
pub const SRIOV_CTRL_WRITABLE: u16 = SRIOV_CTRL_VFE | SRIOV_CTRL_MSE | SRIOV_CTRL_ARI;
/// SR-IOV Status (PCI_SRIOV_STATUS); VF Migration Status is read-only zero.
pub const SRIOV_STATUS_OFFSET: usize = 0x0a;
/// InitialVFs (PCI_SRIOV_INITIAL_VF).
pub const SRIOV_INITIAL_VF_OFFSET: usize = 0x0c;
/// TotalVFs (PCI_SRIOV_TOTAL_VF).
pub const SRIOV_TOTAL_VF_OFFSET: usize = 0x0e;
/// NumVFs (PCI_SRIOV_NUM_VF).
pub const SRIOV_NUM_VF_OFFSET: usize = 0x10;
/// Function Dependency Link (PCI_SRIOV_FUNC_LINK): the PF's own function number, 0.
pub const SRIOV_FUNC_LINK_OFFSET: usize = 0x12;
/// First VF Offset (PCI_SRIOV_VF_OFFSET).
pub const SRIOV_VF_OFFSET_OFFSET: usize = 0x14;
/// VF Stride (PCI_SRIOV_VF_STRIDE).
pub const SRIOV_VF_STRIDE_OFFSET: usize = 0x16;
/// VF Device ID (PCI_SRIOV_VF_DID).
pub const SRIOV_VF_DID_OFFSET: usize = 0x1a;
/// Supported Page Sizes (PCI_SRIOV_SUP_PGSIZE).
pub const SRIOV_SUP_PGSIZE_OFFSET: usize = 0x1c;
/// System Page Size (PCI_SRIOV_SYS_PGSIZE).
pub const SRIOV_SYS_PGSIZE_OFFSET: usize = 0x20;
/// VF BAR0 (PCI_SRIOV_BAR); six dwords, 64-bit BARs take two.
pub const SRIOV_BAR_OFFSET: usize = 0x24;
/// VF Migration State Array Offset (PCI_SRIOV_VFM); 0, no VF Migration.
pub const SRIOV_VFM_OFFSET: usize = 0x3c;

/// The first VF is function PF + 1 (routing ID offset).
pub const SRIOV_FIRST_VF_OFFSET: u16 = 1;
/// VFs are consecutive functions.
pub const SRIOV_VF_STRIDE: u16 = 1;
/// Page sizes 4 KiB << n for n = 0..=10 (4 KiB to 4 MiB), as a ConnectX reports.
pub const SRIOV_SUPPORTED_PAGE_SIZES: u32 = 0x7ff;
/// Power-on System Page Size: 4 KiB.
pub const SRIOV_SYS_PGSIZE_4K: u32 = 0x1;
/// Most VFs a PF offers here: the routing IDs of one bus after the PF's (with ARI).
pub const SRIOV_MAX_VFS: u16 = 255;

const _: () = assert!(SRIOV_EXT_CAP_OFFSET + SRIOV_CAP_LEN <= super::caps::ACS_EXT_CAP_OFFSET);

/// A 64-bit prefetchable VF BAR at `offset` of `size` bytes per VF (as [`super`]'s
/// own BARs: address bits below the size read-only zero).
fn vf_bar64(offset: usize, size: u64) -> [Reg; 2] {
    let addr_mask = !(size - 1);
    [
        Reg::ro(offset, 4, super::BAR_MEM_TYPE_64 | super::BAR_MEM_PREFETCH)
            .writable(addr_mask as u32 & super::BAR_MEM_ADDRESS_MASK),
        Reg::ro(offset + 4, 4, 0).writable((addr_mask >> 32) as u32),
    ]
}

/// The SR-IOV capability registers for `total_vfs` VFs (≥ 1) whose BAR0 and BAR2 are
/// `bar0_size` and `bar2_size` bytes; the ACS capability follows it.
pub(super) fn sriov_regs(total_vfs: u16, bar0_size: u64, bar2_size: Option<u64>) -> Vec<Reg> {
    let at = |rel: usize| SRIOV_EXT_CAP_OFFSET + rel;
    let mut regs = vec![
        Reg::ro(
            SRIOV_EXT_CAP_OFFSET,
            4,
            u32::from(EXT_CAP_ID_SRIOV)
                | SRIOV_VERSION << super::caps::EXT_CAP_VERSION_SHIFT
                | (super::caps::ACS_EXT_CAP_OFFSET as u32) << super::caps::EXT_CAP_NEXT_SHIFT,
        ),
        Reg::ro(at(SRIOV_CAP_OFFSET), 4, 0),
        Reg::ro(at(SRIOV_CTRL_OFFSET), 2, 0).writable(SRIOV_CTRL_WRITABLE.into()),
        Reg::ro(at(SRIOV_STATUS_OFFSET), 2, 0),
        Reg::ro(at(SRIOV_INITIAL_VF_OFFSET), 2, total_vfs.into()),
        Reg::ro(at(SRIOV_TOTAL_VF_OFFSET), 2, total_vfs.into()),
        Reg::ro(at(SRIOV_NUM_VF_OFFSET), 2, 0).writable(0xffff),
        Reg::ro(at(SRIOV_FUNC_LINK_OFFSET), 1, 0),
        Reg::ro(at(SRIOV_VF_OFFSET_OFFSET), 2, SRIOV_FIRST_VF_OFFSET.into()),
        Reg::ro(at(SRIOV_VF_STRIDE_OFFSET), 2, SRIOV_VF_STRIDE.into()),
        Reg::ro(at(SRIOV_VF_DID_OFFSET), 2, DEVICE_ID_VF.into()),
        Reg::ro(at(SRIOV_SUP_PGSIZE_OFFSET), 4, SRIOV_SUPPORTED_PAGE_SIZES),
        Reg::ro(at(SRIOV_SYS_PGSIZE_OFFSET), 4, SRIOV_SYS_PGSIZE_4K)
            .writable(SRIOV_SUPPORTED_PAGE_SIZES),
        Reg::ro(at(SRIOV_VFM_OFFSET), 4, 0),
    ];
    regs.extend(vf_bar64(at(SRIOV_BAR_OFFSET), bar0_size));
    if let Some(size) = bar2_size {
        regs.extend(vf_bar64(at(SRIOV_BAR_OFFSET + 8), size));
    }
    regs
}

/// SR-IOV Control and NumVFs as a write left them, for the caller to act on (trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SriovControl {
    /// VF Enable.
    pub vf_enable: bool,
    /// VF Memory Space Enable.
    pub vf_memory: bool,
    /// NumVFs.
    pub num_vfs: u16,
}
