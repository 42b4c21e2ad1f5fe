//! Initialization segment at BAR0 + 0 [DEVICE_H `struct mlx5_init_seg`], mlx5-device.md §2.
//!
//! Every register is a big-endian u32 (`ioread32be`); offsets are from the start of BAR0.

use zerocopy::byteorder::{BigEndian, U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `fw_rev`: `[15:0]` FW major, `[31:16]` FW minor.
pub const FW_REV_OFFSET: u64 = 0x0000;
/// `cmdif_rev_fw_sub`: `[31:16]` cmdif revision, `[15:0]` FW subminor.
pub const CMDIF_REV_FW_SUB_OFFSET: u64 = 0x0004;
/// `cmdq_addr_h`: upper 32 bits of the command-queue DMA address.
pub const CMDQ_ADDR_H_OFFSET: u64 = 0x0010;
/// `cmdq_addr_l_sz`: low address bits, nic_interface, queue geometry (§2.1).
pub const CMDQ_ADDR_L_SZ_OFFSET: u64 = 0x0014;
/// `cmd_dbell`: bit i set = command slot i posted.
pub const CMD_DBELL_OFFSET: u64 = 0x0018;
/// `initializing`: FW busy / reset supported / embedded CPU bits.
pub const INITIALIZING_OFFSET: u64 = 0x01fc;
/// `health`: the 64-byte [`HealthBuffer`].
pub const HEALTH_OFFSET: u64 = 0x0200;
/// `cmd_exec_to`: command execution timeout (§2.3 encoding).
pub const CMD_EXEC_TO_OFFSET: u64 = 0x0ff8;
/// `cmd_q_init_to`: command-queue init timeout; 0 = "no FW timeouts".
pub const CMD_Q_INIT_TO_OFFSET: u64 = 0x0ffc;
/// `internal_timer_h`: free-running device clock, high word.
pub const INTERNAL_TIMER_H_OFFSET: u64 = 0x1000;
/// `internal_timer_l`: free-running device clock, low word.
pub const INTERNAL_TIMER_L_OFFSET: u64 = 0x1004;
/// `health_counter`: must keep changing while the device is alive.
pub const HEALTH_COUNTER_OFFSET: u64 = 0x1010;
/// `real_time_h`: real-time clock, high word.
pub const REAL_TIME_H_OFFSET: u64 = 0x1040;
/// `real_time_l`: real-time clock, low word.
pub const REAL_TIME_L_OFFSET: u64 = 0x1044;
/// `ieee1588_clk` (u64).
pub const IEEE1588_CLK_OFFSET: u64 = 0x2000;
/// `ieee1588_clk_type`.
pub const IEEE1588_CLK_TYPE_OFFSET: u64 = 0x2008;
/// `clr_intx`: legacy INTx clear (write only).
pub const CLR_INTX_OFFSET: u64 = 0x200c;
/// Size of `struct mlx5_init_seg`.
pub const ISEG_SIZE: u64 = 0x2010;

/// `fw_rev` `[15:0]`: FW major.
pub const FW_REV_MAJOR_MASK: u32 = 0x0000_ffff;
/// `fw_rev` `[31:16]`: FW minor.
pub const FW_REV_MINOR_SHIFT: u32 = 16;
/// `cmdif_rev_fw_sub` `[31:16]`: command interface revision.
pub const CMDIF_REV_SHIFT: u32 = 16;
/// `cmdif_rev_fw_sub` `[15:0]`: FW subminor.
pub const FW_SUB_MASK: u32 = 0x0000_ffff;
/// The only command interface revision the driver accepts (`CMD_IF_REV`).
pub const CMDIF_REV: u16 = 5;

/// `cmdq_addr_l_sz` `[3:0]`: log2 of the entry stride.
pub const CMDQ_LOG_STRIDE_MASK: u32 = 0x0000_000f;
/// Shift of the log stride field.
pub const CMDQ_LOG_STRIDE_SHIFT: u32 = 0;
/// `cmdq_addr_l_sz` `[7:4]`: log2 of the number of entries.
pub const CMDQ_LOG_SIZE_MASK: u32 = 0x0000_00f0;
/// Shift of the log size field.
pub const CMDQ_LOG_SIZE_SHIFT: u32 = 4;
/// `cmdq_addr_l_sz` `[10:8]`: nic_interface (`MLX5_NIC_IFC_OFFSET` = 8).
pub const NIC_INTERFACE_MASK: u32 = 0x0000_0700;
/// Shift of the nic_interface field.
pub const NIC_INTERFACE_SHIFT: u32 = 8;
/// `cmdq_addr_l_sz` `[31:12]`: low bits of the 4 KiB-aligned queue address.
pub const CMDQ_ADDR_L_MASK: u32 = 0xffff_f000;
/// Geometry we report: 32 entries (`1 << 5`).
pub const CMDQ_LOG_SIZE_DEFAULT: u32 = 5;
/// Geometry we report: 64-byte stride (`1 << 6`).
pub const CMDQ_LOG_STRIDE_DEFAULT: u32 = 6;
/// The driver rejects more than 32 entries.
pub const CMDQ_MAX_ENTRIES: u32 = 32;
/// The whole queue lives in one page: log_size + log_stride <= 12.
pub const CMDQ_MAX_LOG_BYTES: u32 = 12;

/// `initializing` bit 31: FW still initializing.
pub const INITIALIZING_BUSY_MASK: u32 = 1 << 31;
/// `initializing` bit 30: FW reset supported (`MLX5_FW_RESET_SUPPORTED_OFFSET`).
pub const INITIALIZING_FW_RESET_SUPPORTED_MASK: u32 = 1 << 30;
/// `initializing` bit 23: embedded-CPU function (`MLX5_ECPU_BIT_NUM`).
pub const INITIALIZING_ECPU_MASK: u32 = 1 << 23;

/// Timeout registers `[19:0]`: the value (`tout_convert_iseg_to_ms`).
pub const TIMEOUT_VALUE_MASK: u32 = 0x000f_ffff;
/// Timeout registers `[31:29]`: the unit (0 ms, 1 s, 2 min, 3 h).
pub const TIMEOUT_MULT_SHIFT: u32 = 29;

/// Decodes `cmd_exec_to` / `cmd_q_init_to` into milliseconds; `None` for an unknown unit.
pub const fn timeout_to_ms(reg: u32) -> Option<u64> {
    let value = (reg & TIMEOUT_VALUE_MASK) as u64;
    match reg >> TIMEOUT_MULT_SHIFT {
        0 => Some(value),
        1 => Some(value * 1_000),
        2 => Some(value * 60_000),
        3 => Some(value * 3_600_000),
        _ => None,
    }
}

/// The raw nic_interface bits of a `cmdq_addr_l_sz` value (`mlx5_get_nic_state`).
pub const fn nic_interface_bits(cmdq_addr_l_sz: u32) -> u8 {
    ((cmdq_addr_l_sz & NIC_INTERFACE_MASK) >> NIC_INTERFACE_SHIFT) as u8
}

wire_enum! {
    /// `cmdq_addr_l_sz` `[10:8]` (`MLX5_INITIAL_SEG_NIC_INTERFACE_*`).
    pub enum NicInterface: u8, field = "nic_interface" {
        /// Normal operation.
        FullDriver = 0 => "FULL_DRIVER",
        /// Interface disabled (fast teardown, FW reset done).
        Disabled = 1 => "DISABLED",
        /// No-DRAM NIC mode.
        NoDramNic = 2 => "NO_DRAM_NIC",
        /// SW reset requested.
        SwReset = 7 => "SW_RESET",
    }
}

/// Health buffer field offsets from BAR0 (§2.2, current layout).
pub const HEALTH_ASSERT_VAR_OFFSET: u64 = 0x200;
/// Number of `assert_var` words.
pub const HEALTH_ASSERT_VAR_COUNT: usize = 6;
/// `assert_exit_ptr`.
pub const HEALTH_ASSERT_EXIT_PTR_OFFSET: u64 = 0x220;
/// `assert_callra`.
pub const HEALTH_ASSERT_CALLRA_OFFSET: u64 = 0x224;
/// `time`.
pub const HEALTH_TIME_OFFSET: u64 = 0x22c;
/// `fw_ver`; 0xffffffff means "PCI link dead" to the driver.
pub const HEALTH_FW_VER_OFFSET: u64 = 0x230;
/// `hw_id`.
pub const HEALTH_HW_ID_OFFSET: u64 = 0x234;
/// `rfr_severity` (u8).
pub const HEALTH_RFR_SEVERITY_OFFSET: u64 = 0x238;
/// `irisc_index` (u8).
pub const HEALTH_IRISC_INDEX_OFFSET: u64 = 0x23c;
/// `synd` (u8); 0 = healthy.
pub const HEALTH_SYND_OFFSET: u64 = 0x23d;
/// `ext_synd` (be16).
pub const HEALTH_EXT_SYND_OFFSET: u64 = 0x23e;
/// Size of the health buffer.
pub const HEALTH_SIZE: usize = 0x40;

/// `rfr_severity` bit 7: recovery flow required (old layout: `MLX5_RFR_OFFSET` 31).
pub const HEALTH_RFR_MASK: u8 = 0x80;
/// `rfr_severity` bit 6: cold reset required.
pub const HEALTH_CRR_MASK: u8 = 0x40;
/// `rfr_severity` bit 3: severity valid.
pub const HEALTH_SEVERITY_VALID_MASK: u8 = 0x08;
/// `rfr_severity` `[2:0]`: severity (kernel log level).
pub const HEALTH_SEVERITY_MASK: u8 = 0x07;

/// Health syndrome: healthy.
pub const HEALTH_SYND_NONE: u8 = 0x00;
/// FW internal error.
pub const HEALTH_SYND_FW_INTERNAL_ERR: u8 = 0x01;
/// iRISC not responding.
pub const HEALTH_SYND_DEAD_IRISC: u8 = 0x07;
/// Unrecoverable HW error.
pub const HEALTH_SYND_HW_FATAL_ERR: u8 = 0x08;
/// FW CRC error.
pub const HEALTH_SYND_FW_CRC_ERR: u8 = 0x09;
/// ICM fetch PCI error.
pub const HEALTH_SYND_ICM_FETCH_PCI_ERR: u8 = 0x0a;
/// ICM page error ("HW fatal error").
pub const HEALTH_SYND_ICM_PAGE_ERR: u8 = 0x0b;
/// Async EQ buffer overrun.
pub const HEALTH_SYND_ASYNC_EQ_OVERRUN: u8 = 0x0c;
/// EQ error.
pub const HEALTH_SYND_EQ_IN_ERR: u8 = 0x0d;
/// Invalid EQ referenced.
pub const HEALTH_SYND_EQ_INV: u8 = 0x0e;
/// FFSER error.
pub const HEALTH_SYND_FFSER_ERR: u8 = 0x0f;
/// High temperature.
pub const HEALTH_SYND_HIGH_TEMP_ERR: u8 = 0x10;

/// `struct health_buffer` at iseg 0x200, 64 bytes, big-endian.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct HealthBuffer {
    /// 0x00 `assert_var[6]`.
    pub assert_var: [U32<BigEndian>; HEALTH_ASSERT_VAR_COUNT],
    /// 0x18 reserved.
    pub rsvd0: [U32<BigEndian>; 2],
    /// 0x20 `assert_exit_ptr`.
    pub assert_exit_ptr: U32<BigEndian>,
    /// 0x24 `assert_callra`.
    pub assert_callra: U32<BigEndian>,
    /// 0x28 reserved.
    pub rsvd1: U32<BigEndian>,
    /// 0x2c `time`.
    pub time: U32<BigEndian>,
    /// 0x30 `fw_ver`.
    pub fw_ver: U32<BigEndian>,
    /// 0x34 `hw_id`.
    pub hw_id: U32<BigEndian>,
    /// 0x38 `rfr_severity` (see `HEALTH_RFR_MASK` and friends).
    pub rfr_severity: u8,
    /// 0x39 reserved.
    pub rsvd2: [u8; 3],
    /// 0x3c `irisc_index`.
    pub irisc_index: u8,
    /// 0x3d `synd`.
    pub synd: u8,
    /// 0x3e `ext_synd`.
    pub ext_synd: U16<BigEndian>,
}

const _: () = assert!(core::mem::size_of::<HealthBuffer>() == HEALTH_SIZE);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};
    use zerocopy::FromZeros;

    #[test]
    fn health_buffer_is_64_bytes_with_sheet_offsets() {
        assert_eq!(size_of::<HealthBuffer>(), HEALTH_SIZE);
        let at = |off: usize| HEALTH_OFFSET + off as u64;
        assert_eq!(
            at(offset_of!(HealthBuffer, assert_var)),
            HEALTH_ASSERT_VAR_OFFSET
        );
        assert_eq!(
            at(offset_of!(HealthBuffer, assert_exit_ptr)),
            HEALTH_ASSERT_EXIT_PTR_OFFSET
        );
        assert_eq!(
            at(offset_of!(HealthBuffer, assert_callra)),
            HEALTH_ASSERT_CALLRA_OFFSET
        );
        assert_eq!(at(offset_of!(HealthBuffer, time)), HEALTH_TIME_OFFSET);
        assert_eq!(at(offset_of!(HealthBuffer, fw_ver)), HEALTH_FW_VER_OFFSET);
        assert_eq!(at(offset_of!(HealthBuffer, hw_id)), HEALTH_HW_ID_OFFSET);
        assert_eq!(
            at(offset_of!(HealthBuffer, rfr_severity)),
            HEALTH_RFR_SEVERITY_OFFSET
        );
        assert_eq!(
            at(offset_of!(HealthBuffer, irisc_index)),
            HEALTH_IRISC_INDEX_OFFSET
        );
        assert_eq!(at(offset_of!(HealthBuffer, synd)), HEALTH_SYND_OFFSET);
        assert_eq!(
            at(offset_of!(HealthBuffer, ext_synd)),
            HEALTH_EXT_SYND_OFFSET
        );
    }

    #[test]
    fn health_buffer_fields_are_big_endian() {
        let mut h = HealthBuffer::new_zeroed();
        h.fw_ver.set(0x1122_3344);
        h.synd = HEALTH_SYND_FW_INTERNAL_ERR;
        h.ext_synd.set(0xabcd);
        let b = h.as_bytes();
        assert_eq!(&b[0x30..0x34], &[0x11, 0x22, 0x33, 0x44]);
        assert_eq!(&b[0x3d..0x40], &[0x01, 0xab, 0xcd]);
    }

    #[test]
    fn health_buffer_ends_before_reserved_area() {
        assert_eq!(HEALTH_OFFSET + HEALTH_SIZE as u64, 0x240);
        const { assert!(CMD_EXEC_TO_OFFSET > 0x240 && ISEG_SIZE == CLR_INTX_OFFSET + 4) };
    }

    #[test]
    fn nic_interface_round_trips_and_rejects_unknown() {
        for &n in NicInterface::ALL {
            assert_eq!(NicInterface::try_from(u8::from(n)), Ok(n));
        }
        let reg = 0xdead_b000 | (7 << NIC_INTERFACE_SHIFT) | 0x56;
        assert_eq!(
            NicInterface::try_from(nic_interface_bits(reg)),
            Ok(NicInterface::SwReset)
        );
        assert_eq!(
            NicInterface::try_from(3),
            Err(crate::PrmError::UnknownValue {
                field: "nic_interface",
                value: 3
            })
        );
    }

    #[test]
    fn default_geometry_fits_one_page() {
        let geo = (CMDQ_LOG_SIZE_DEFAULT << CMDQ_LOG_SIZE_SHIFT) | CMDQ_LOG_STRIDE_DEFAULT;
        assert_eq!(geo, 0x56);
        assert_eq!((geo & CMDQ_LOG_SIZE_MASK) >> CMDQ_LOG_SIZE_SHIFT, 5);
        assert_eq!((geo & CMDQ_LOG_STRIDE_MASK) >> CMDQ_LOG_STRIDE_SHIFT, 6);
        const { assert!(CMDQ_LOG_SIZE_DEFAULT + CMDQ_LOG_STRIDE_DEFAULT <= CMDQ_MAX_LOG_BYTES) };
        assert_eq!(1 << CMDQ_LOG_SIZE_DEFAULT, CMDQ_MAX_ENTRIES);
        assert_eq!(geo & CMDQ_ADDR_L_MASK, 0);
    }

    #[test]
    fn timeouts_decode_units() {
        assert_eq!(timeout_to_ms(0), Some(0));
        assert_eq!(timeout_to_ms(60_000), Some(60_000));
        assert_eq!(timeout_to_ms((1 << 29) | 2), Some(2_000));
        assert_eq!(timeout_to_ms((3 << 29) | 1), Some(3_600_000));
        assert_eq!(timeout_to_ms(4 << 29), None);
    }
}
