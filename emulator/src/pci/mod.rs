//! PCI configuration space of one mlx5 function: PF 15b3:101d or VF 15b3:101e.
//!
//! The 4 KiB space is a byte image plus two per-byte masks, all filled from register
//! tables (`Reg`): the power-on value, the guest-writable mask and the write-1-to-clear
//! mask. A write stores `(old & !wmask) | (val & wmask)` and then clears `val & w1c`, so
//! read-only bits, BAR sizing (address bits below the BAR size are read-only zero) and
//! RW1C status bits all fall out of the tables. Writes that mean something to the device
//! (Initiate FLR, MSI-X enable and function mask, the command register) are returned as
//! [`ConfigWriteEffects`]; the caller acts on them, typically by calling [`ConfigSpace::reset`]
//! as part of its FLR. Config space is little-endian. Nothing here does I/O.
//!
//! Layout: type 0 header (0x00..0x40), PCI Express capability at 0x60, MSI-X capability at
//! 0x9c (end of the chain), ARI extended capability at 0x100, on a PF built with VFs
//! the SR-IOV extended capability at 0x180 (see [`sriov`]), and ACS at 0x1c0 (end of the
//! extended chain; each function its own IOMMU group, see [`caps::ACS_EXT_CAP_OFFSET`]).
//! Names follow Linux `include/uapi/linux/pci_regs.h`; sections cite PCI Local Bus 3.0
//! and PCI Express Base 4.0.

pub mod caps;
pub mod sriov;

use std::fmt;
use std::ops::Range;

use thiserror::Error;

use caps::{
    MSIX_CAP_OFFSET, MSIX_FLAGS_ENABLE, MSIX_FLAGS_MASKALL, MSIX_FLAGS_OFFSET, PCIE_CAP_OFFSET,
    PCIE_DEVCTL_BCR_FLR, PCIE_DEVCTL_OFFSET, PCIE_DEVSTA_OFFSET, PCIE_DEVSTA_RW1C,
};
use sriov::{
    SriovControl, SRIOV_CTRL_MSE, SRIOV_CTRL_OFFSET, SRIOV_CTRL_VFE, SRIOV_EXT_CAP_OFFSET,
    SRIOV_MAX_VFS, SRIOV_NUM_VF_OFFSET, SRIOV_SYS_PGSIZE_OFFSET,
};

/// Size of PCI Express configuration space (PCI_CFG_SPACE_EXP_SIZE).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the conventional PCI part; extended capabilities start here (PCI_CFG_SPACE_SIZE).
pub const HEADER_SPACE_SIZE: usize = 256;

// Type 0 header, PCI Local Bus 3.0 §6.1.
/// Vendor ID (PCI_VENDOR_ID).
pub const VENDOR_ID_OFFSET: usize = 0x00;
/// Mellanox Technologies (PCI_VENDOR_ID_MELLANOX).
pub const PCI_VENDOR_ID_MELLANOX: u16 = 0x15b3;
/// Device ID (PCI_DEVICE_ID).
pub const DEVICE_ID_OFFSET: usize = 0x02;
/// ConnectX-6 Dx, the PF flavour (no VF flag in `mlx5_core_pci_table`).
pub const DEVICE_ID_PF: u16 = 0x101d;
/// "ConnectX Family mlx5Gen Virtual Function" (MLX5_PCI_DEV_IS_VF in `mlx5_core_pci_table`).
pub const DEVICE_ID_VF: u16 = 0x101e;

/// Command register (PCI_COMMAND).
pub const COMMAND_OFFSET: usize = 0x04;
/// I/O Space enable (PCI_COMMAND_IO); read-only zero, there are no I/O BARs.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Memory Space enable (PCI_COMMAND_MEMORY).
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Bus Master enable (PCI_COMMAND_MASTER).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Interrupt Disable (PCI_COMMAND_INTX_DISABLE).
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Guest-writable command bits; everything else is read-only zero.
pub const COMMAND_WRITABLE: u16 = COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;

/// Status register (PCI_STATUS).
pub const STATUS_OFFSET: usize = 0x06;
/// Interrupt Status (PCI_STATUS_INTERRUPT); read-only, INTx is never asserted.
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Capabilities List (PCI_STATUS_CAP_LIST); read-only one.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Master Data Parity Error (PCI_STATUS_PARITY), RW1C.
pub const STATUS_MASTER_DATA_PARITY: u16 = 1 << 8;
/// Signaled Target Abort (PCI_STATUS_SIG_TARGET_ABORT), RW1C.
pub const STATUS_SIG_TARGET_ABORT: u16 = 1 << 11;
/// Received Target Abort (PCI_STATUS_REC_TARGET_ABORT), RW1C.
pub const STATUS_REC_TARGET_ABORT: u16 = 1 << 12;
/// Received Master Abort (PCI_STATUS_REC_MASTER_ABORT), RW1C.
pub const STATUS_REC_MASTER_ABORT: u16 = 1 << 13;
/// Signaled System Error (PCI_STATUS_SIG_SYSTEM_ERROR), RW1C.
pub const STATUS_SIG_SYSTEM_ERROR: u16 = 1 << 14;
/// Detected Parity Error (PCI_STATUS_DETECTED_PARITY), RW1C.
pub const STATUS_DETECTED_PARITY: u16 = 1 << 15;
/// The error bits of the status register, all write-1-to-clear.
pub const STATUS_RW1C: u16 = STATUS_MASTER_DATA_PARITY
    | STATUS_SIG_TARGET_ABORT
    | STATUS_REC_TARGET_ABORT
    | STATUS_REC_MASTER_ABORT
    | STATUS_SIG_SYSTEM_ERROR
    | STATUS_DETECTED_PARITY;

/// Revision ID (PCI_REVISION_ID).
pub const REVISION_ID_OFFSET: usize = 0x08;
/// Revision of the emulated silicon.
pub const REVISION_ID: u8 = 0;
/// Class code, 3 bytes: prog-if, subclass, base class (PCI_CLASS_PROG).
pub const CLASS_CODE_OFFSET: usize = 0x09;
/// Network controller / Ethernet / prog-if 0 (PCI_CLASS_NETWORK_ETHERNET << 8).
pub const CLASS_CODE_ETHERNET: u32 = 0x02_00_00;
/// Cache Line Size (PCI_CACHE_LINE_SIZE); read-write, no effect on a PCIe function.
pub const CACHE_LINE_SIZE_OFFSET: usize = 0x0c;
/// Header Type (PCI_HEADER_TYPE).
pub const HEADER_TYPE_OFFSET: usize = 0x0e;
/// Type 0 (endpoint), single function (PCI_HEADER_TYPE_NORMAL).
pub const HEADER_TYPE_NORMAL: u8 = 0x00;

/// Base Address Register 0 (PCI_BASE_ADDRESS_0); 64-bit, so 0x14 is its upper half.
pub const BAR0_OFFSET: usize = 0x10;
/// Base Address Register 2 (PCI_BASE_ADDRESS_2); 64-bit when present, 0x1c is its upper half.
pub const BAR2_OFFSET: usize = 0x18;
/// Memory BAR type bits \[2:1\] = 10b: 64-bit decoder (PCI_BASE_ADDRESS_MEM_TYPE_64).
pub const BAR_MEM_TYPE_64: u32 = 0b10 << 1;
/// Prefetchable (PCI_BASE_ADDRESS_MEM_PREFETCH).
pub const BAR_MEM_PREFETCH: u32 = 1 << 3;
/// Address bits of the low dword of a memory BAR (PCI_BASE_ADDRESS_MEM_MASK).
pub const BAR_MEM_ADDRESS_MASK: u32 = !0xf;
/// Smallest memory BAR handed out: one page, so each BAR can be mmapped on its own.
pub const MIN_MEM_BAR_SIZE: u64 = 4096;

/// Subsystem Vendor ID (PCI_SUBSYSTEM_VENDOR_ID).
pub const SUBSYSTEM_VENDOR_ID_OFFSET: usize = 0x2c;
/// Subsystem ID (PCI_SUBSYSTEM_ID).
pub const SUBSYSTEM_ID_OFFSET: usize = 0x2e;
/// Subsystem ID of the emulated PF (`mlx5_core` matches any subsystem).
pub const SUBSYSTEM_ID_PF: u16 = 0x0001;
/// Subsystem ID of the emulated VF.
pub const SUBSYSTEM_ID_VF: u16 = 0x0002;
/// Expansion ROM base address (PCI_ROM_ADDRESS); read-only zero, there is no ROM.
pub const ROM_ADDRESS_OFFSET: usize = 0x30;
/// Capabilities Pointer (PCI_CAPABILITY_LIST).
pub const CAPABILITY_LIST_OFFSET: usize = 0x34;
/// Bits \[1:0\] of a capability pointer are reserved; mask them off when walking.
pub const CAPABILITY_POINTER_MASK: u8 = 0xfc;
/// Interrupt Line (PCI_INTERRUPT_LINE); read-write scratch for the OS.
pub const INTERRUPT_LINE_OFFSET: usize = 0x3c;
/// Interrupt Pin (PCI_INTERRUPT_PIN).
pub const INTERRUPT_PIN_OFFSET: usize = 0x3d;
/// INTA#, reported by the PF.
pub const INTERRUPT_PIN_INTA: u8 = 1;
/// No INTx: SR-IOV VFs do not implement legacy interrupts (mlx5 uses MSI-X only).
pub const INTERRUPT_PIN_NONE: u8 = 0;

/// Errors of the config space model; guest-visible oddities are not errors.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PciError {
    /// `offset + len` does not fit in a u64.
    #[error("config access of {len} bytes at offset {offset:#x} overflows u64")]
    AccessOverflow { offset: u64, len: usize },
    /// The MSI-X vector count is outside what the device and the driver accept.
    #[error("MSI-X vector count {got}: expected {min}..={max}")]
    MsixVectors { got: u16, min: u16, max: u16 },
    /// A BAR size is not a power of two of at least [`MIN_MEM_BAR_SIZE`].
    #[error("BAR{bar} size {size:#x}: expected a power of two >= {min:#x}")]
    BarSize { bar: u8, size: u64, min: u64 },
    /// The MSI-X table or PBA is misaligned or does not fit in BAR0.
    #[error(
        "MSI-X {what} at BAR0 offset {offset:#x}, {len:#x} bytes: expected 8-byte aligned \
         and inside BAR0 of {bar_size:#x} bytes"
    )]
    MsixPlacement {
        what: &'static str,
        offset: u32,
        len: u64,
        bar_size: u64,
    },
    /// The MSI-X table and PBA overlap.
    #[error("MSI-X table at {table:#x} and PBA at {pba:#x} overlap in BAR0")]
    MsixOverlap { table: u32, pba: u32 },
    /// Only a PF has an SR-IOV capability.
    #[error("a VF cannot have VFs (total_vfs {got}); only the PF carries SR-IOV")]
    SriovOnVf { got: u16 },
    /// More VFs than one bus of routing IDs holds.
    #[error("total_vfs {got}: expected at most {max}")]
    TooManyVfs { got: u16, max: u16 },
}

/// Which kind of function this config space belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FunctionKind {
    /// Physical function, 15b3:101d.
    Pf,
    /// Virtual function, 15b3:101e.
    Vf,
}

/// Sizes and placements fixed when the function is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigParams {
    /// MSI-X vectors, [`caps::MSIX_MIN_VECTORS`]..=[`caps::MSIX_MAX_VECTORS`].
    pub msix_vectors: u16,
    /// BAR0 size in bytes, a power of two.
    pub bar0_size: u64,
    /// BAR2 (device memory) size in bytes, a power of two; `None`: no BAR2.
    pub bar2_size: Option<u64>,
    /// Offset of the MSI-X table in BAR0, 8-byte aligned.
    pub msix_table_offset: u32,
    /// Offset of the MSI-X pending bit array in BAR0, 8-byte aligned.
    pub msix_pba_offset: u32,
    /// PF only: its VFs (TotalVFs of the SR-IOV capability, each VF with this
    /// function's BAR sizes); 0 means no SR-IOV capability.
    pub total_vfs: u16,
}

/// What a config write did that the device must act on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigWriteEffects {
    /// Initiate Function Level Reset was written as 1 (the bit itself reads back 0).
    pub flr: bool,
    /// MSI-X Enable changed to this value.
    pub msix_enable: Option<bool>,
    /// MSI-X Function Mask changed to this value.
    pub msix_function_mask: Option<bool>,
    /// The command register changed to this value.
    pub command: Option<u16>,
    /// SR-IOV Control or NumVFs changed (PF only) to this.
    pub sriov: Option<SriovControl>,
}

impl ConfigWriteEffects {
    /// True when the write needs no action from the device.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One register of a layout table: where it lives, its power-on value, and how guest writes
/// treat it. Bits in neither mask are read-only.
#[derive(Debug, Clone, Copy)]
struct Reg {
    offset: usize,
    /// Width in bytes, 1..=4.
    width: usize,
    reset: u32,
    wmask: u32,
    w1c: u32,
}

impl Reg {
    const fn ro(offset: usize, width: usize, reset: u32) -> Self {
        Self {
            offset,
            width,
            reset,
            wmask: 0,
            w1c: 0,
        }
    }

    const fn writable(mut self, wmask: u32) -> Self {
        self.wmask = wmask;
        self
    }

    const fn clear_on_one(mut self, w1c: u32) -> Self {
        self.w1c = w1c;
        self
    }
}

type Bytes = Box<[u8; CONFIG_SPACE_SIZE]>;

fn zeroed() -> Bytes {
    Box::new([0; CONFIG_SPACE_SIZE])
}

fn get_le(bytes: &[u8; CONFIG_SPACE_SIZE], offset: usize, width: usize) -> u32 {
    bytes[offset..offset + width]
        .iter()
        .rev()
        .fold(0, |acc, &b| (acc << 8) | u32::from(b))
}

fn put_le(bytes: &mut [u8; CONFIG_SPACE_SIZE], offset: usize, width: usize, value: u32) {
    for (i, b) in bytes[offset..offset + width].iter_mut().enumerate() {
        *b = (value >> (8 * i)) as u8;
    }
}

/// Builds the power-on image and masks from register tables.
struct Layout {
    image: Bytes,
    wmask: Bytes,
    w1c: Bytes,
    defined: Bytes,
}

impl Layout {
    fn new() -> Self {
        Self {
            image: zeroed(),
            wmask: zeroed(),
            w1c: zeroed(),
            defined: zeroed(),
        }
    }

    fn define(&mut self, regs: &[Reg]) {
        for r in regs {
            let bytes = r.offset..r.offset + r.width;
            assert!((1..=4).contains(&r.width) && bytes.end <= CONFIG_SPACE_SIZE);
            debug_assert!(
                r.wmask & r.w1c == 0,
                "register {:#x} is both RW and RW1C",
                r.offset
            );
            debug_assert!(
                self.defined[bytes.clone()].iter().all(|&d| d == 0),
                "register {:#x} overlaps another",
                r.offset
            );
            self.defined[bytes].fill(1);
            put_le(&mut self.image, r.offset, r.width, r.reset);
            put_le(&mut self.wmask, r.offset, r.width, r.wmask);
            put_le(&mut self.w1c, r.offset, r.width, r.w1c);
        }
    }
}

/// A 64-bit memory BAR at `offset` of `size` bytes: the address bits below the size are
/// read-only zero, so writing all-ones and reading back yields the size mask.
fn mem_bar64(offset: usize, size: u64) -> [Reg; 2] {
    let addr_mask = !(size - 1);
    [
        Reg::ro(offset, 4, BAR_MEM_TYPE_64 | BAR_MEM_PREFETCH)
            .writable(addr_mask as u32 & BAR_MEM_ADDRESS_MASK),
        Reg::ro(offset + 4, 4, 0).writable((addr_mask >> 32) as u32),
    ]
}

fn check_bar_size(bar: u8, size: u64) -> Result<(), PciError> {
    if size.is_power_of_two() && size >= MIN_MEM_BAR_SIZE {
        Ok(())
    } else {
        Err(PciError::BarSize {
            bar,
            size,
            min: MIN_MEM_BAR_SIZE,
        })
    }
}

/// The configuration space of one function.
#[derive(Clone)]
pub struct ConfigSpace {
    kind: FunctionKind,
    params: ConfigParams,
    regs: Bytes,
    power_on: Bytes,
    wmask: Bytes,
    w1c: Bytes,
}

impl fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("kind", &self.kind)
            .field("params", &self.params)
            .field("command", &format_args!("{:#06x}", self.command()))
            .field("msix_enabled", &self.msix_enabled())
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    /// Builds the power-on config space of a `kind` function, validating `params`.
    pub fn new(kind: FunctionKind, params: ConfigParams) -> Result<Self, PciError> {
        check_bar_size(0, params.bar0_size)?;
        if let Some(size) = params.bar2_size {
            check_bar_size(2, size)?;
        }
        caps::check_msix(&params)?;
        if params.total_vfs > 0 && kind == FunctionKind::Vf {
            return Err(PciError::SriovOnVf {
                got: params.total_vfs,
            });
        }
        if params.total_vfs > SRIOV_MAX_VFS {
            return Err(PciError::TooManyVfs {
                got: params.total_vfs,
                max: SRIOV_MAX_VFS,
            });
        }

        let (device_id, subsystem_id, pin) = match kind {
            FunctionKind::Pf => (DEVICE_ID_PF, SUBSYSTEM_ID_PF, INTERRUPT_PIN_INTA),
            FunctionKind::Vf => (DEVICE_ID_VF, SUBSYSTEM_ID_VF, INTERRUPT_PIN_NONE),
        };
        let mut layout = Layout::new();
        layout.define(&[
            Reg::ro(VENDOR_ID_OFFSET, 2, PCI_VENDOR_ID_MELLANOX.into()),
            Reg::ro(DEVICE_ID_OFFSET, 2, device_id.into()),
            Reg::ro(COMMAND_OFFSET, 2, 0).writable(COMMAND_WRITABLE.into()),
            Reg::ro(STATUS_OFFSET, 2, STATUS_CAP_LIST.into()).clear_on_one(STATUS_RW1C.into()),
            Reg::ro(REVISION_ID_OFFSET, 1, REVISION_ID.into()),
            Reg::ro(CLASS_CODE_OFFSET, 3, CLASS_CODE_ETHERNET),
            Reg::ro(CACHE_LINE_SIZE_OFFSET, 1, 0).writable(0xff),
            Reg::ro(HEADER_TYPE_OFFSET, 1, HEADER_TYPE_NORMAL.into()),
            Reg::ro(SUBSYSTEM_VENDOR_ID_OFFSET, 2, PCI_VENDOR_ID_MELLANOX.into()),
            Reg::ro(SUBSYSTEM_ID_OFFSET, 2, subsystem_id.into()),
            Reg::ro(ROM_ADDRESS_OFFSET, 4, 0),
            Reg::ro(CAPABILITY_LIST_OFFSET, 1, PCIE_CAP_OFFSET as u32),
            Reg::ro(INTERRUPT_LINE_OFFSET, 1, 0).writable(0xff),
            Reg::ro(INTERRUPT_PIN_OFFSET, 1, pin.into()),
        ]);
        // BARs not defined here (BAR4, BAR5, and BAR2/3 without device memory) stay
        // read-only zero: unimplemented, writes ignored.
        layout.define(&mem_bar64(BAR0_OFFSET, params.bar0_size));
        if let Some(size) = params.bar2_size {
            layout.define(&mem_bar64(BAR2_OFFSET, size));
        }
        layout.define(&caps::pcie_regs(MSIX_CAP_OFFSET as u8));
        layout.define(&caps::msix_regs(&params, caps::CAP_NEXT_END));
        if params.total_vfs > 0 {
            layout.define(&caps::ari_regs(SRIOV_EXT_CAP_OFFSET as u16));
            layout.define(&sriov::sriov_regs(
                params.total_vfs,
                params.bar0_size,
                params.bar2_size,
            ));
        } else {
            layout.define(&caps::ari_regs(caps::ACS_EXT_CAP_OFFSET as u16));
        }
        layout.define(&caps::acs_regs());

        Ok(Self {
            kind,
            params,
            regs: layout.image.clone(),
            power_on: layout.image,
            wmask: layout.wmask,
            w1c: layout.w1c,
        })
    }

    /// The function kind this space was built for.
    pub fn kind(&self) -> FunctionKind {
        self.kind
    }

    /// The parameters this space was built with.
    pub fn params(&self) -> &ConfigParams {
        &self.params
    }

    /// The in-range part of an access, or an error when `offset + len` overflows u64.
    fn clip(offset: u64, len: usize) -> Result<Range<usize>, PciError> {
        let end = offset
            .checked_add(len as u64)
            .ok_or(PciError::AccessOverflow { offset, len })?;
        let size = CONFIG_SPACE_SIZE as u64;
        Ok(offset.min(size) as usize..end.min(size) as usize)
    }

    /// Reads `data.len()` bytes at `offset`. Bytes beyond the 4 KiB space read as 0xff.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), PciError> {
        let range = Self::clip(offset, data.len())?;
        data.fill(0xff);
        if !range.is_empty() {
            data[..range.len()].copy_from_slice(&self.regs[range]);
        }
        Ok(())
    }

    /// Writes `data` at `offset`, byte by byte through the masks. Bytes beyond the 4 KiB
    /// space are dropped. Returns what the device must do about it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<ConfigWriteEffects, PciError> {
        let range = Self::clip(offset, data.len())?;
        if range.len() < data.len() {
            tracing::trace!(
                offset,
                len = data.len(),
                "config write beyond 4 KiB dropped"
            );
        }
        let old_command = self.command();
        let old_msix = self.msix_flags();
        let old_sriov = self.sriov_control();
        let old_pgsize = self.sriov_reg32(SRIOV_SYS_PGSIZE_OFFSET);
        for (i, &val) in range.clone().zip(data) {
            let kept = self.regs[i] & !self.wmask[i];
            self.regs[i] = (kept | (val & self.wmask[i])) & !(val & self.w1c[i]);
        }
        self.sriov_fixups(old_sriov, old_pgsize);

        let mut effects = ConfigWriteEffects::default();
        // Initiate FLR is a trigger: never stored (not in the writable mask), so it reads 0.
        let devctl = Self::written(&range, data, PCIE_CAP_OFFSET + PCIE_DEVCTL_OFFSET, 2);
        if devctl & u32::from(PCIE_DEVCTL_BCR_FLR) != 0 {
            tracing::debug!(kind = ?self.kind, "Initiate Function Level Reset written");
            effects.flr = true;
        }
        let command = self.command();
        if command != old_command {
            effects.command = Some(command);
        }
        let msix = self.msix_flags();
        for (bit, slot) in [
            (MSIX_FLAGS_ENABLE, &mut effects.msix_enable),
            (MSIX_FLAGS_MASKALL, &mut effects.msix_function_mask),
        ] {
            if (msix ^ old_msix) & bit != 0 {
                *slot = Some(msix & bit != 0);
            }
        }
        let sriov = self.sriov_control();
        if sriov != old_sriov {
            effects.sriov = sriov;
        }
        Ok(effects)
    }

    /// The SR-IOV capability's dword at `rel`, 0 without one.
    fn sriov_reg32(&self, rel: usize) -> u32 {
        if self.params.total_vfs == 0 {
            return 0;
        }
        get_le(&self.regs, SRIOV_EXT_CAP_OFFSET + rel, 4)
    }

    /// SR-IOV Control and NumVFs, on a PF with VFs.
    pub fn sriov_control(&self) -> Option<SriovControl> {
        if self.params.total_vfs == 0 {
            return None;
        }
        let ctrl = self.reg16(SRIOV_EXT_CAP_OFFSET + SRIOV_CTRL_OFFSET);
        Some(SriovControl {
            vf_enable: ctrl & SRIOV_CTRL_VFE != 0,
            vf_memory: ctrl & SRIOV_CTRL_MSE != 0,
            num_vfs: self.reg16(SRIOV_EXT_CAP_OFFSET + SRIOV_NUM_VF_OFFSET),
        })
    }

    /// What the byte masks cannot express: NumVFs is read-only while VF Enable was
    /// set (PCIe Base 4.0 §9.3.3.7), and System Page Size holds one supported size (a
    /// value with no or several size bits is dropped; the old size stays).
    fn sriov_fixups(&mut self, old: Option<SriovControl>, old_pgsize: u32) {
        let Some(old) = old else {
            return;
        };
        let num_at = SRIOV_EXT_CAP_OFFSET + SRIOV_NUM_VF_OFFSET;
        if old.vf_enable && self.reg16(num_at) != old.num_vfs {
            tracing::info!(
                num_vfs = self.reg16(num_at),
                kept = old.num_vfs,
                "SR-IOV NumVFs written while VF Enable is set: ignored"
            );
            put_le(&mut self.regs, num_at, 2, old.num_vfs.into());
        }
        let pg_at = SRIOV_EXT_CAP_OFFSET + SRIOV_SYS_PGSIZE_OFFSET;
        let pgsize = get_le(&self.regs, pg_at, 4);
        if !pgsize.is_power_of_two() {
            tracing::info!(
                value = format_args!("{pgsize:#x}"),
                "SR-IOV System Page Size must name one supported size: ignored"
            );
            put_le(&mut self.regs, pg_at, 4, old_pgsize);
        }
    }

    /// The bits a write in `range` (carrying `data`) put on the register at `reg`, with
    /// the bytes it did not cover as zero.
    fn written(range: &Range<usize>, data: &[u8], reg: usize, width: usize) -> u32 {
        (reg..reg + width)
            .filter(|i| range.contains(i))
            .fold(0, |acc, i| {
                acc | u32::from(data[i - range.start]) << (8 * (i - reg))
            })
    }

    /// Returns every register to its power-on value (FLR, DEVICE_RESET).
    pub fn reset(&mut self) {
        self.regs.copy_from_slice(&self.power_on[..]);
    }

    /// Latches status error bits (a subset of [`STATUS_RW1C`]) as the device detecting an
    /// error would; the guest clears them by writing 1.
    pub fn record_status_error(&mut self, bits: u16) {
        self.set_bits(STATUS_OFFSET, 2, bits & STATUS_RW1C);
    }

    /// Latches PCIe Device Status error bits (a subset of [`caps::PCIE_DEVSTA_RW1C`]).
    pub fn record_device_error(&mut self, bits: u16) {
        self.set_bits(
            PCIE_CAP_OFFSET + PCIE_DEVSTA_OFFSET,
            2,
            bits & PCIE_DEVSTA_RW1C,
        );
    }

    fn set_bits(&mut self, offset: usize, width: usize, bits: u16) {
        let value = get_le(&self.regs, offset, width) | u32::from(bits);
        put_le(&mut self.regs, offset, width, value);
    }

    fn reg16(&self, offset: usize) -> u16 {
        get_le(&self.regs, offset, 2) as u16
    }

    fn msix_flags(&self) -> u16 {
        self.reg16(MSIX_CAP_OFFSET + MSIX_FLAGS_OFFSET)
    }

    /// Vendor ID (always [`PCI_VENDOR_ID_MELLANOX`]).
    pub fn vendor_id(&self) -> u16 {
        self.reg16(VENDOR_ID_OFFSET)
    }

    /// Device ID ([`DEVICE_ID_PF`] or [`DEVICE_ID_VF`]).
    pub fn device_id(&self) -> u16 {
        self.reg16(DEVICE_ID_OFFSET)
    }

    /// Interrupt Pin ([`INTERRUPT_PIN_INTA`] for the PF, [`INTERRUPT_PIN_NONE`] for a VF).
    pub fn interrupt_pin(&self) -> u8 {
        self.regs[INTERRUPT_PIN_OFFSET]
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.reg16(COMMAND_OFFSET)
    }

    /// Memory Space enable: BAR accesses are decoded.
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY_SPACE != 0
    }

    /// The address the client programmed into BAR2 (device memory), while memory
    /// decoding is on; `None` without BAR2 or with decoding off.
    pub fn bar2_address(&self) -> Option<u64> {
        self.params.bar2_size?;
        if !self.memory_enabled() {
            return None;
        }
        let low = get_le(&self.regs, BAR2_OFFSET, 4) & BAR_MEM_ADDRESS_MASK;
        let high = get_le(&self.regs, BAR2_OFFSET + 4, 4);
        Some(u64::from(high) << 32 | u64::from(low))
    }

    /// Bus Master enable: the function may issue DMA and MSI-X writes.
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// INTx Disable.
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE != 0
    }

    /// MSI-X Enable.
    pub fn msix_enabled(&self) -> bool {
        self.msix_flags() & MSIX_FLAGS_ENABLE != 0
    }

    /// MSI-X Function Mask: every vector masked regardless of its own mask bit.
    pub fn msix_function_masked(&self) -> bool {
        self.msix_flags() & MSIX_FLAGS_MASKALL != 0
    }
}

#[cfg(test)]
mod tests;
