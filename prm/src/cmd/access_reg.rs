//! ACCESS_REG (0x805) and the registers a PF's `mlx5_core` reaches through it [IFC
//! `access_register_in/out`; core/port.c `mlx5_access_reg`; core/main.c
//! `struct mlx5_reg_host_endianness`, `set_hca_ctrl`]; mlx5-pf.md §1.1, §2.5.
//!
//! In: opcode, `op_mod` = !write (0 write, 1 read), `register_id` bytes 10–11,
//! `argument` bytes 12–15, the register data from byte 16. Out: status, syndrome, the
//! register data from byte 16. Fields are bit offsets in the whole message.

use crate::ifc::Field;

/// Byte where the register data starts, in the input and in the output.
pub const ACCESS_REG_DATA_OFFSET: usize = 16;
/// `register_id`, in bytes 10–11.
pub const ACCESS_REG_IN_REGISTER_ID: Field = Field::new(0x50, 16);
/// `argument`, in bytes 12–15.
pub const ACCESS_REG_IN_ARGUMENT: Field = Field::new(0x60, 32);

wire_enum! {
    /// ACCESS_REG `op_mod` (`MLX5_ACCESS_REG_SUMMARY_CTRL_*`: the driver sends `!write`).
    pub enum AccessRegOp: u16, field = "ACCESS_REG op_mod" {
        /// Write the register.
        Write = 0 => "WRITE",
        /// Read the register.
        Read = 1 => "READ",
    }
}

wire_enum! {
    /// Register ids (`MLX5_REG_*`, include/linux/mlx5/driver.h) the PF probe can send
    /// (mlx5-pf.md §2.5). Only HOST_ENDIANNESS is sent with the capabilities this device
    /// advertises; the others are named so a log says what was asked for.
    pub enum RegisterId: u16, field = "register_id" {
        /// QCAM: QoS capability mask (`qcam_reg`).
        Qcam = 0x4019 => "QCAM",
        /// PCAM: port capability mask (`pcam_reg`).
        Pcam = 0x507f => "PCAM",
        /// HOST_ENDIANNESS: the PF tells the device the host's byte order.
        HostEndianness = 0x7004 => "HOST_ENDIANNESS",
        /// MTCAP: temperature sensors (MCAM `mtmp`).
        Mtcap = 0x9009 => "MTCAP",
        /// MTMP: a temperature sensor.
        Mtmp = 0x900a => "MTMP",
        /// MCIA: cable module EEPROM (mlx5e ethtool only).
        Mcia = 0x9014 => "MCIA",
        /// MRTC: real-time clock for the firmware log (MCAM `mrtc`).
        Mrtc = 0x902d => "MRTC",
        /// MTPPS: pulse-per-second (clock).
        Mtpps = 0x9053 => "MTPPS",
        /// MTUTC: UTC time (clock, MCAM `mtutc`).
        Mtutc = 0x9055 => "MTUTC",
        /// MCQS: component query status (devlink info).
        Mcqs = 0x9060 => "MCQS",
        /// MCQI: component query information (devlink info).
        Mcqi = 0x9061 => "MCQI",
        /// MCAM: management capability mask (`mcam_reg`).
        Mcam = 0x907f => "MCAM",
        /// DTOR: default timeouts (iseg `cmd_q_init_to` ≠ 0).
        Dtor = 0xc00e => "DTOR",
    }
}

/// Size of the HOST_ENDIANNESS register data: byte 0 `he`, bytes 1–15 reserved.
pub const HOST_ENDIANNESS_LEN: usize = 16;
/// `he`, data byte 0.
pub const HOST_ENDIANNESS_HE: Field = Field::new(0, 8);
/// `he` a little-endian host writes (x86).
pub const HOST_ENDIANNESS_LITTLE: u8 = 0x00;
/// `he` a big-endian host writes (`MLX5_SET_HOST_ENDIANNESS`).
pub const HOST_ENDIANNESS_BIG: u8 = 0x80;
/// HOST_ENDIANNESS as the driver sends it: 16 + 16 bytes in, 16 + 16 bytes out.
pub const HOST_ENDIANNESS_IN_LEN: usize = ACCESS_REG_DATA_OFFSET + HOST_ENDIANNESS_LEN;
/// See [`HOST_ENDIANNESS_IN_LEN`].
pub const HOST_ENDIANNESS_OUT_LEN: usize = ACCESS_REG_DATA_OFFSET + HOST_ENDIANNESS_LEN;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ifc::set;

    #[test]
    fn layout_matches_the_ifc() {
        let mut m = [0u8; HOST_ENDIANNESS_IN_LEN];
        set(&mut m, ACCESS_REG_IN_REGISTER_ID, 0x7004);
        set(&mut m, ACCESS_REG_IN_ARGUMENT, 0x0102_0304);
        assert_eq!(&m[10..16], &[0x70, 0x04, 1, 2, 3, 4]);
        let mut d = [0u8; HOST_ENDIANNESS_LEN];
        set(&mut d, HOST_ENDIANNESS_HE, u64::from(HOST_ENDIANNESS_BIG));
        assert_eq!(d[0], 0x80);
        assert_eq!(HOST_ENDIANNESS_IN_LEN, 32);
        assert_eq!(u16::from(RegisterId::HostEndianness), 0x7004);
        assert_eq!(u16::from(RegisterId::Dtor), 0xc00e);
        assert_eq!(AccessRegOp::try_from(1), Ok(AccessRegOp::Read));
        assert!(AccessRegOp::try_from(2).is_err());
    }
}
