//! Capability structures: PCI Express (v2, endpoint) at 0x60, MSI-X at 0x9c, the ARI
//! extended capability at 0x100 and the ACS extended capability at 0x1c0, last in the
//! extended chain (SR-IOV, on a PF, sits between them at 0x180: [`super::sriov`]).
//! Register offsets are relative to each capability.

use super::{ConfigParams, PciError, Reg, HEADER_SPACE_SIZE};

/// Capability header: ID in byte 0, next pointer in byte 1 (PCI_CAP_LIST_ID/NEXT).
pub const CAP_NEXT_SHIFT: u32 = 8;
/// Next pointer ending the capability chain.
pub const CAP_NEXT_END: u8 = 0x00;

fn cap_header(base: usize, id: u8, next: u8) -> Reg {
    Reg::ro(base, 2, u32::from(id) | u32::from(next) << CAP_NEXT_SHIFT)
}

// ---- PCI Express capability, PCIe Base 4.0 §7.5.3 ------------------------------------

/// Where the PCI Express capability lives (first in the chain).
pub const PCIE_CAP_OFFSET: usize = 0x60;
/// PCI Express capability ID (PCI_CAP_ID_EXP).
pub const CAP_ID_PCIE: u8 = 0x10;
/// Length of a v2 endpoint PCIe capability (PCI_CAP_EXP_ENDPOINT_SIZEOF_V2).
pub const PCIE_CAP_LEN: usize = 0x3c;

/// PCI Express Capabilities register (PCI_EXP_FLAGS).
pub const PCIE_FLAGS_OFFSET: usize = 0x02;
/// Capability version 2 (PCI_EXP_FLAGS_VERS).
pub const PCIE_FLAGS_VERSION_2: u16 = 0x0002;
/// Device/Port Type \[7:4\] = 0: PCI Express Endpoint (PCI_EXP_TYPE_ENDPOINT).
pub const PCIE_FLAGS_TYPE_ENDPOINT: u16 = 0x0000;

/// Device Capabilities (PCI_EXP_DEVCAP).
pub const PCIE_DEVCAP_OFFSET: usize = 0x04;
/// Max_Payload_Size Supported = 010b, 512 bytes (PCI_EXP_DEVCAP_PAYLOAD).
pub const PCIE_DEVCAP_PAYLOAD_512: u32 = 0b010;
/// Extended Tag Field Supported (PCI_EXP_DEVCAP_EXT_TAG).
pub const PCIE_DEVCAP_EXT_TAG: u32 = 1 << 5;
/// Role-Based Error Reporting (PCI_EXP_DEVCAP_RBER).
pub const PCIE_DEVCAP_RBER: u32 = 1 << 15;
/// Function Level Reset Capability (PCI_EXP_DEVCAP_FLR).
pub const PCIE_DEVCAP_FLR: u32 = 1 << 28;

/// Device Control (PCI_EXP_DEVCTL).
pub const PCIE_DEVCTL_OFFSET: usize = 0x08;
/// Correctable/Non-Fatal/Fatal/Unsupported Request reporting enables
/// (PCI_EXP_DEVCTL_CERE | NFERE | FERE | URRE).
pub const PCIE_DEVCTL_ERR_REPORTING: u16 = 0x000f;
/// Enable Relaxed Ordering (PCI_EXP_DEVCTL_RELAX_EN).
pub const PCIE_DEVCTL_RELAX_EN: u16 = 1 << 4;
/// Max_Payload_Size \[7:5\] (PCI_EXP_DEVCTL_PAYLOAD).
pub const PCIE_DEVCTL_PAYLOAD: u16 = 0b111 << 5;
/// Extended Tag Field Enable (PCI_EXP_DEVCTL_EXT_TAG).
pub const PCIE_DEVCTL_EXT_TAG: u16 = 1 << 8;
/// Enable No Snoop (PCI_EXP_DEVCTL_NOSNOOP_EN).
pub const PCIE_DEVCTL_NOSNOOP_EN: u16 = 1 << 11;
/// Max_Read_Request_Size \[14:12\] (PCI_EXP_DEVCTL_READRQ).
pub const PCIE_DEVCTL_READRQ: u16 = 0b111 << 12;
/// Max_Read_Request_Size = 010b, 512 bytes: the spec's default (PCI_EXP_DEVCTL_READRQ_512B).
pub const PCIE_DEVCTL_READRQ_512: u16 = 0b010 << 12;
/// Initiate Function Level Reset (PCI_EXP_DEVCTL_BCR_FLR): a trigger that reads 0.
pub const PCIE_DEVCTL_BCR_FLR: u16 = 1 << 15;
/// Guest-writable Device Control bits. Phantom Functions and Aux Power PM are not
/// supported, so read-only zero; Initiate FLR is handled as an event, not stored.
pub const PCIE_DEVCTL_WRITABLE: u16 = PCIE_DEVCTL_ERR_REPORTING
    | PCIE_DEVCTL_RELAX_EN
    | PCIE_DEVCTL_PAYLOAD
    | PCIE_DEVCTL_EXT_TAG
    | PCIE_DEVCTL_NOSNOOP_EN
    | PCIE_DEVCTL_READRQ;
/// Power-on Device Control: relaxed ordering and no snoop enabled, 128-byte payload,
/// 512-byte read requests (the spec's defaults).
pub const PCIE_DEVCTL_RESET: u16 =
    PCIE_DEVCTL_RELAX_EN | PCIE_DEVCTL_NOSNOOP_EN | PCIE_DEVCTL_READRQ_512;

/// Device Status (PCI_EXP_DEVSTA).
pub const PCIE_DEVSTA_OFFSET: usize = 0x0a;
/// Correctable Error Detected (PCI_EXP_DEVSTA_CED), RW1C.
pub const PCIE_DEVSTA_CED: u16 = 1 << 0;
/// Non-Fatal Error Detected (PCI_EXP_DEVSTA_NFED), RW1C.
pub const PCIE_DEVSTA_NFED: u16 = 1 << 1;
/// Fatal Error Detected (PCI_EXP_DEVSTA_FED), RW1C.
pub const PCIE_DEVSTA_FED: u16 = 1 << 2;
/// Unsupported Request Detected (PCI_EXP_DEVSTA_URD), RW1C.
pub const PCIE_DEVSTA_URD: u16 = 1 << 3;
/// The error bits of Device Status; AUX Power and Transactions Pending stay read-only 0.
pub const PCIE_DEVSTA_RW1C: u16 =
    PCIE_DEVSTA_CED | PCIE_DEVSTA_NFED | PCIE_DEVSTA_FED | PCIE_DEVSTA_URD;

/// Link speed code 4 (16.0 GT/s) used in LNKCAP, LNKSTA and LNKCTL2 (PCI_EXP_LNKCAP_SLS_16_0GB).
pub const PCIE_LINK_SPEED_16GT: u32 = 4;
/// Link width x8, shifted into place for LNKCAP \[9:4\] and LNKSTA \[9:4\].
pub const PCIE_LINK_WIDTH_X8: u32 = 8 << 4;
/// Link Capabilities (PCI_EXP_LNKCAP).
pub const PCIE_LNKCAP_OFFSET: usize = 0x0c;
/// ASPM Optionality Compliance (PCI_EXP_LNKCAP_ASPM_OPTIONALITY); no ASPM supported.
pub const PCIE_LNKCAP_ASPM_OPTIONALITY: u32 = 1 << 22;
/// Link Control (PCI_EXP_LNKCTL).
pub const PCIE_LNKCTL_OFFSET: usize = 0x10;
/// Guest-writable Link Control: ASPM Control, Common Clock Configuration, Extended Synch
/// (PCI_EXP_LNKCTL_ASPMC | CCC | ES).
pub const PCIE_LNKCTL_WRITABLE: u16 = 0x0003 | 1 << 6 | 1 << 7;
/// Link Status (PCI_EXP_LNKSTA).
pub const PCIE_LNKSTA_OFFSET: usize = 0x12;
/// Slot Clock Configuration (PCI_EXP_LNKSTA_SLC).
pub const PCIE_LNKSTA_SLC: u32 = 1 << 12;

/// Device Capabilities 2 (PCI_EXP_DEVCAP2).
pub const PCIE_DEVCAP2_OFFSET: usize = 0x24;
/// Completion Timeout Ranges A-D supported (PCI_EXP_DEVCAP2_COMP_TMOUT_RANGES).
pub const PCIE_DEVCAP2_COMP_TMOUT_RANGES: u32 = 0xf;
/// Completion Timeout Disable Supported (PCI_EXP_DEVCAP2_COMP_TMOUT_DIS).
pub const PCIE_DEVCAP2_COMP_TMOUT_DIS: u32 = 1 << 4;
/// Device Control 2 (PCI_EXP_DEVCTL2).
pub const PCIE_DEVCTL2_OFFSET: usize = 0x28;
/// Guest-writable Device Control 2: Completion Timeout Value and Disable, AtomicOp
/// Requester Enable (PCI_EXP_DEVCTL2_COMP_TIMEOUT | COMP_TMOUT_DIS | ATOMIC_REQ).
pub const PCIE_DEVCTL2_WRITABLE: u16 = 0x000f | 1 << 4 | 1 << 6;
/// Link Capabilities 2 (PCI_EXP_LNKCAP2).
pub const PCIE_LNKCAP2_OFFSET: usize = 0x2c;
/// Supported Link Speeds Vector: 2.5, 5, 8 and 16 GT/s (PCI_EXP_LNKCAP2_SLS_*).
pub const PCIE_LNKCAP2_SLS_TO_16GT: u32 = 0b1111 << 1;
/// Link Control 2 (PCI_EXP_LNKCTL2); Target Link Speed read-only at 16 GT/s.
pub const PCIE_LNKCTL2_OFFSET: usize = 0x30;
/// Link Status 2 (PCI_EXP_LNKSTA2).
pub const PCIE_LNKSTA2_OFFSET: usize = 0x32;
/// Equalization 8.0 GT/s Complete and Phase 1-3 Successful, bits \[4:1\].
pub const PCIE_LNKSTA2_EQ_COMPLETE: u32 = 0b1111 << 1;

/// The PCIe capability registers; registers not listed (slot, root) are read-only zero.
pub(super) fn pcie_regs(next: u8) -> [Reg; 13] {
    let at = |rel: usize| PCIE_CAP_OFFSET + rel;
    let link = PCIE_LINK_SPEED_16GT | PCIE_LINK_WIDTH_X8;
    [
        cap_header(PCIE_CAP_OFFSET, CAP_ID_PCIE, next),
        Reg::ro(
            at(PCIE_FLAGS_OFFSET),
            2,
            (PCIE_FLAGS_VERSION_2 | PCIE_FLAGS_TYPE_ENDPOINT).into(),
        ),
        Reg::ro(
            at(PCIE_DEVCAP_OFFSET),
            4,
            PCIE_DEVCAP_PAYLOAD_512 | PCIE_DEVCAP_EXT_TAG | PCIE_DEVCAP_RBER | PCIE_DEVCAP_FLR,
        ),
        Reg::ro(at(PCIE_DEVCTL_OFFSET), 2, PCIE_DEVCTL_RESET.into())
            .writable(PCIE_DEVCTL_WRITABLE.into()),
        Reg::ro(at(PCIE_DEVSTA_OFFSET), 2, 0).clear_on_one(PCIE_DEVSTA_RW1C.into()),
        Reg::ro(
            at(PCIE_LNKCAP_OFFSET),
            4,
            link | PCIE_LNKCAP_ASPM_OPTIONALITY,
        ),
        Reg::ro(at(PCIE_LNKCTL_OFFSET), 2, 0).writable(PCIE_LNKCTL_WRITABLE.into()),
        Reg::ro(at(PCIE_LNKSTA_OFFSET), 2, link | PCIE_LNKSTA_SLC),
        Reg::ro(
            at(PCIE_DEVCAP2_OFFSET),
            4,
            PCIE_DEVCAP2_COMP_TMOUT_RANGES | PCIE_DEVCAP2_COMP_TMOUT_DIS,
        ),
        Reg::ro(at(PCIE_DEVCTL2_OFFSET), 2, 0).writable(PCIE_DEVCTL2_WRITABLE.into()),
        Reg::ro(at(PCIE_LNKCAP2_OFFSET), 4, PCIE_LNKCAP2_SLS_TO_16GT),
        Reg::ro(at(PCIE_LNKCTL2_OFFSET), 2, PCIE_LINK_SPEED_16GT),
        Reg::ro(at(PCIE_LNKSTA2_OFFSET), 2, PCIE_LNKSTA2_EQ_COMPLETE),
    ]
}

// ---- MSI-X capability, PCI Local Bus 3.0 §6.8.2 --------------------------------------

/// Where the MSI-X capability lives (right after the PCIe capability).
pub const MSIX_CAP_OFFSET: usize = PCIE_CAP_OFFSET + PCIE_CAP_LEN;
/// MSI-X capability ID (PCI_CAP_ID_MSIX).
pub const CAP_ID_MSIX: u8 = 0x11;
/// Length of the MSI-X capability (PCI_CAP_MSIX_SIZEOF).
pub const MSIX_CAP_LEN: usize = 12;
/// Message Control (PCI_MSIX_FLAGS).
pub const MSIX_FLAGS_OFFSET: usize = 0x02;
/// Table Size \[10:0\], encoded as N-1 (PCI_MSIX_FLAGS_QSIZE); read-only.
pub const MSIX_FLAGS_QSIZE: u16 = 0x07ff;
/// Function Mask (PCI_MSIX_FLAGS_MASKALL).
pub const MSIX_FLAGS_MASKALL: u16 = 1 << 14;
/// MSI-X Enable (PCI_MSIX_FLAGS_ENABLE).
pub const MSIX_FLAGS_ENABLE: u16 = 1 << 15;
/// Table Offset / Table BIR (PCI_MSIX_TABLE).
pub const MSIX_TABLE_OFFSET: usize = 0x04;
/// PBA Offset / PBA BIR (PCI_MSIX_PBA).
pub const MSIX_PBA_OFFSET: usize = 0x08;
/// BIR field \[2:0\] of the table and PBA registers (PCI_MSIX_TABLE_BIR).
pub const MSIX_BIR_MASK: u32 = 0x7;
/// Offset field \[31:3\] (PCI_MSIX_TABLE_OFFSET).
pub const MSIX_OFFSET_MASK: u32 = !MSIX_BIR_MASK;
/// The table and the PBA both live in BAR0.
pub const MSIX_BIR_BAR0: u32 = 0;
/// Bytes per MSI-X table entry (PCI_MSIX_ENTRY_SIZE).
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Largest table the Table Size field can describe.
pub const MSIX_MAX_VECTORS: u16 = MSIX_FLAGS_QSIZE + 1;
/// Fewest vectors offered: old kernels need fixed vectors before the completion ones
/// (mlx5-device.md §1.3).
pub const MSIX_MIN_VECTORS: u16 = 8;

/// Bytes of the MSI-X table for `vectors` entries.
pub fn msix_table_len(vectors: u16) -> u64 {
    u64::from(vectors) * MSIX_ENTRY_SIZE
}

/// Bytes of the pending bit array for `vectors` entries: one bit each, in whole qwords.
pub fn msix_pba_len(vectors: u16) -> u64 {
    u64::from(vectors).div_ceil(64) * 8
}

/// Validates the vector count and the placement of the table and PBA in BAR0.
pub(super) fn check_msix(p: &ConfigParams) -> Result<(), PciError> {
    let n = p.msix_vectors;
    if !(MSIX_MIN_VECTORS..=MSIX_MAX_VECTORS).contains(&n) {
        return Err(PciError::MsixVectors {
            got: n,
            min: MSIX_MIN_VECTORS,
            max: MSIX_MAX_VECTORS,
        });
    }
    let mut ranges = [(0, 0); 2];
    for (slot, (what, offset, len)) in ranges.iter_mut().zip([
        ("table", p.msix_table_offset, msix_table_len(n)),
        ("PBA", p.msix_pba_offset, msix_pba_len(n)),
    ]) {
        let end = u64::from(offset) + len;
        if offset & MSIX_BIR_MASK != 0 || end > p.bar0_size {
            return Err(PciError::MsixPlacement {
                what,
                offset,
                len,
                bar_size: p.bar0_size,
            });
        }
        *slot = (u64::from(offset), end);
    }
    let [(t0, t1), (p0, p1)] = ranges;
    if t0 < p1 && p0 < t1 {
        return Err(PciError::MsixOverlap {
            table: p.msix_table_offset,
            pba: p.msix_pba_offset,
        });
    }
    Ok(())
}

/// The MSI-X capability registers for validated `p`.
pub(super) fn msix_regs(p: &ConfigParams, next: u8) -> [Reg; 4] {
    let at = |rel: usize| MSIX_CAP_OFFSET + rel;
    [
        cap_header(MSIX_CAP_OFFSET, CAP_ID_MSIX, next),
        Reg::ro(at(MSIX_FLAGS_OFFSET), 2, u32::from(p.msix_vectors - 1))
            .writable((MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL).into()),
        Reg::ro(
            at(MSIX_TABLE_OFFSET),
            4,
            p.msix_table_offset | MSIX_BIR_BAR0,
        ),
        Reg::ro(at(MSIX_PBA_OFFSET), 4, p.msix_pba_offset | MSIX_BIR_BAR0),
    ]
}

// ---- ARI extended capability, PCIe Base 4.0 §7.8.8 -----------------------------------

/// Where the ARI extended capability lives: the first (and only) extended capability.
pub const ARI_EXT_CAP_OFFSET: usize = HEADER_SPACE_SIZE;
/// Alternative Routing-ID Interpretation (PCI_EXT_CAP_ID_ARI).
pub const EXT_CAP_ID_ARI: u16 = 0x000e;
/// Extended capability header: version \[19:16\], next offset \[31:20\] (PCI_EXT_CAP_VER/NEXT).
pub const EXT_CAP_VERSION_SHIFT: u32 = 16;
/// Extended capability header next-offset field shift (PCI_EXT_CAP_NEXT); 0 ends the chain.
pub const EXT_CAP_NEXT_SHIFT: u32 = 20;
/// ARI capability structure version.
pub const ARI_VERSION: u32 = 1;
/// ARI Capability register (PCI_ARI_CAP); Next Function Number \[15:8\] = 0: last function.
pub const ARI_CAP_OFFSET: usize = 0x04;
/// ARI Control register (PCI_ARI_CTRL); MFVC and ACS groups unsupported, read-only zero.
pub const ARI_CTRL_OFFSET: usize = 0x06;

/// The ARI extended capability; `next` is the next extended capability's offset (0
/// ends the extended chain).
pub(super) fn ari_regs(next: u16) -> [Reg; 3] {
    [
        Reg::ro(
            ARI_EXT_CAP_OFFSET,
            4,
            u32::from(EXT_CAP_ID_ARI)
                | ARI_VERSION << EXT_CAP_VERSION_SHIFT
                | u32::from(next) << EXT_CAP_NEXT_SHIFT,
        ),
        Reg::ro(ARI_EXT_CAP_OFFSET + ARI_CAP_OFFSET, 2, 0),
        Reg::ro(ARI_EXT_CAP_OFFSET + ARI_CTRL_OFFSET, 2, 0),
    ]
}

// ---- ACS extended capability, PCIe Base 4.0 §7.7.7 -----------------------------------

/// Where the ACS extended capability lives, on every function: after the PF's SR-IOV
/// capability (0x180..0x1c0), the last of the extended chain. No ACS control is
/// implemented, so the functions of the slot get IOMMU groups of their own (see
/// `acs_regs`).
pub const ACS_EXT_CAP_OFFSET: usize = 0x1c0;
/// Access Control Services (PCI_EXT_CAP_ID_ACS).
pub const EXT_CAP_ID_ACS: u16 = 0x000d;
/// ACS capability structure version.
pub const ACS_VERSION: u32 = 1;
/// Length of the capability without an Egress Control Vector (PCI_ACS_EGRESS_CTL_V).
pub const ACS_CAP_LEN: usize = 8;
/// ACS Capability register (PCI_ACS_CAP).
pub const ACS_CAP_OFFSET: usize = 0x04;
/// ACS Control register (PCI_ACS_CTRL).
pub const ACS_CTRL_OFFSET: usize = 0x06;

const _: () = assert!(ACS_EXT_CAP_OFFSET + ACS_CAP_LEN <= super::CONFIG_SPACE_SIZE);

/// The ACS extended capability of a function of a multi-function adapter, as a ConnectX
/// carries it: no ACS control is implemented (Capability and Control read-only zero),
/// which the spec (§6.12.1.2) reads as "the function never forwards a request to
/// another function of the device": the functions of the slot cannot reach each other
/// by peer-to-peer, so each may be isolated on its own. Linux's `pci_acs_enabled` then
/// counts every required ACS feature as hard-wired on (a feature the Capability
/// register lacks is "assumed as hard-wired enabled"), and the IOMMU code gives each
/// function its own group; without this capability the PF and its VFs in one slot
/// share one group, and no VF can be handed to a VFIO user while the PF is bound.
pub(super) fn acs_regs() -> [Reg; 3] {
    [
        Reg::ro(
            ACS_EXT_CAP_OFFSET,
            4,
            u32::from(EXT_CAP_ID_ACS) | ACS_VERSION << EXT_CAP_VERSION_SHIFT,
        ),
        Reg::ro(ACS_EXT_CAP_OFFSET + ACS_CAP_OFFSET, 2, 0),
        Reg::ro(ACS_EXT_CAP_OFFSET + ACS_CTRL_OFFSET, 2, 0),
    ]
}
