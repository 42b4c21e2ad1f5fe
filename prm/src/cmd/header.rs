//! Generic command input/output headers [IFC `mbox_in`/`mbox_out`], status codes
//! [`MLX5_CMD_STAT_*`, CMD `cmd_status_to_err`], mlx5-device.md §3.5 and §3.9.

use crate::errno::{EAGAIN, EBUSY, EINVAL, EIO, ENOMEM};
use crate::{Opcode, PrmError};
use zerocopy::byteorder::{BigEndian, U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of either header (the inline part of every message).
pub const CMD_HEADER_SIZE: usize = 16;
/// Syndrome the driver fabricates (with status 0xfe) when the interface is down.
pub const DRIVER_SYNDROME: u32 = 0xbadd_00de;

/// First 16 bytes of every command input.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CmdInHeader {
    /// 0x0 `opcode`.
    pub opcode: U16<BigEndian>,
    /// 0x2 `uid` (0 for the core driver).
    pub uid: U16<BigEndian>,
    /// 0x4 reserved.
    pub rsvd0: [u8; 2],
    /// 0x6 `op_mod`.
    pub op_mod: U16<BigEndian>,
    /// 0x8 command-specific.
    pub specific: [u8; 8],
}

impl CmdInHeader {
    /// A header with `opcode` and `op_mod` set, everything else zero.
    pub fn new(opcode: Opcode, op_mod: u16) -> Self {
        Self {
            opcode: U16::new(opcode.into()),
            uid: U16::ZERO,
            rsvd0: [0; 2],
            op_mod: U16::new(op_mod),
            specific: [0; 8],
        }
    }

    /// The opcode, if this crate knows it.
    pub fn opcode(&self) -> Result<Opcode, PrmError> {
        Opcode::try_from(self.opcode.get())
    }
}

/// First 16 bytes of every command output.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CmdOutHeader {
    /// 0x0 `status` ([`CmdStatus`]).
    pub status: u8,
    /// 0x1 reserved.
    pub rsvd0: [u8; 3],
    /// 0x4 `syndrome`: device-defined, non-zero on error.
    pub syndrome: U32<BigEndian>,
    /// 0x8 command-specific.
    pub specific: [u8; 8],
}

impl CmdOutHeader {
    /// A header carrying `status` and `syndrome`, everything else zero.
    pub fn new(status: CmdStatus, syndrome: u32) -> Self {
        Self {
            status: status.into(),
            rsvd0: [0; 3],
            syndrome: U32::new(syndrome),
            specific: [0; 8],
        }
    }

    /// The status, if this crate knows it.
    pub fn status(&self) -> Result<CmdStatus, PrmError> {
        CmdStatus::try_from(self.status)
    }
}

wire_enum! {
    /// Command output status, out byte 0 (`MLX5_CMD_STAT_*`), §3.9.
    pub enum CmdStatus: u8, field = "command status" {
        /// Success.
        Ok = 0x00 => "OK",
        /// Internal error.
        IntErr = 0x01 => "INT_ERR",
        /// Bad operation (unknown or unsupported opcode).
        BadOpErr = 0x02 => "BAD_OP_ERR",
        /// Bad parameter.
        BadParamErr = 0x03 => "BAD_PARAM_ERR",
        /// Bad system state.
        BadSysStateErr = 0x04 => "BAD_SYS_STATE_ERR",
        /// Bad resource.
        BadResErr = 0x05 => "BAD_RES_ERR",
        /// Resource busy.
        ResBusy = 0x06 => "RES_BUSY",
        /// FW not ready (newest kernels only).
        NotReady = 0x07 => "NOT_READY",
        /// Limits exceeded.
        LimErr = 0x08 => "LIM_ERR",
        /// Bad resource state.
        BadResStateErr = 0x09 => "BAD_RES_STATE_ERR",
        /// Bad index.
        IxErr = 0x0a => "IX_ERR",
        /// No resources.
        NoResErr = 0x0f => "NO_RES_ERR",
        /// Bad QP state.
        BadQpStateErr = 0x10 => "BAD_QP_STATE_ERR",
        /// Bad packet.
        BadPktErr = 0x30 => "BAD_PKT_ERR",
        /// Bad size (too many outstanding CQEs).
        BadSizeOutsCqesErr = 0x40 => "BAD_SIZE_OUTS_CQES_ERR",
        /// Bad input length.
        BadInpLenErr = 0x50 => "BAD_INP_LEN_ERR",
        /// Bad output length.
        BadOutpLenErr = 0x51 => "BAD_OUTP_LEN_ERR",
    }
}

impl CmdStatus {
    /// Negative errno the kernel's `cmd_status_to_err` gives for this status.
    pub const fn errno(self) -> i32 {
        cmd_status_to_errno(self as u8)
    }
}

/// `cmd_status_to_err` for any raw status byte (unknown values give -EIO).
pub const fn cmd_status_to_errno(status: u8) -> i32 {
    match status {
        0x00 => 0,
        0x02 | 0x03 | 0x05 | 0x09 | 0x0a | 0x10 | 0x30 | 0x40 => -EINVAL,
        0x06 => -EBUSY,
        0x07 | 0x0f => -EAGAIN,
        0x08 => -ENOMEM,
        _ => -EIO,
    }
}

const _: () = assert!(core::mem::size_of::<CmdInHeader>() == CMD_HEADER_SIZE);
const _: () = assert!(core::mem::size_of::<CmdOutHeader>() == CMD_HEADER_SIZE);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn headers_are_16_bytes() {
        assert_eq!(size_of::<CmdInHeader>(), CMD_HEADER_SIZE);
        assert_eq!(size_of::<CmdOutHeader>(), CMD_HEADER_SIZE);
    }

    #[test]
    fn in_header_layout_is_big_endian() {
        let h = CmdInHeader::new(Opcode::QueryHcaCap, 0x0001);
        assert_eq!(
            h.as_bytes(),
            &[1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(h.opcode(), Ok(Opcode::QueryHcaCap));
        let unknown = CmdInHeader::read_from_bytes(&[0xff; 16]).unwrap();
        assert_eq!(
            unknown.opcode(),
            Err(PrmError::UnknownValue {
                field: "opcode",
                value: 0xffff
            })
        );
    }

    #[test]
    fn out_header_puts_syndrome_at_bytes_4_to_7() {
        let h = CmdOutHeader::new(CmdStatus::BadOpErr, 0x1234_5678);
        assert_eq!(&h.as_bytes()[..8], &[2, 0, 0, 0, 0x12, 0x34, 0x56, 0x78]);
        assert_eq!(h.status(), Ok(CmdStatus::BadOpErr));
    }

    #[test]
    fn status_round_trips_and_maps_errno_like_the_kernel() {
        for &s in CmdStatus::ALL {
            assert_eq!(CmdStatus::try_from(u8::from(s)), Ok(s));
        }
        let expected = [
            (CmdStatus::Ok, 0),
            (CmdStatus::IntErr, -EIO),
            (CmdStatus::BadOpErr, -EINVAL),
            (CmdStatus::BadParamErr, -EINVAL),
            (CmdStatus::BadSysStateErr, -EIO),
            (CmdStatus::BadResErr, -EINVAL),
            (CmdStatus::ResBusy, -EBUSY),
            (CmdStatus::NotReady, -EAGAIN),
            (CmdStatus::LimErr, -ENOMEM),
            (CmdStatus::BadResStateErr, -EINVAL),
            (CmdStatus::IxErr, -EINVAL),
            (CmdStatus::NoResErr, -EAGAIN),
            (CmdStatus::BadQpStateErr, -EINVAL),
            (CmdStatus::BadPktErr, -EINVAL),
            (CmdStatus::BadSizeOutsCqesErr, -EINVAL),
            (CmdStatus::BadInpLenErr, -EIO),
            (CmdStatus::BadOutpLenErr, -EIO),
        ];
        assert_eq!(expected.len(), CmdStatus::ALL.len());
        for (s, e) in expected {
            assert_eq!(s.errno(), e, "{s}");
        }
        assert_eq!(cmd_status_to_errno(0x0b), -EIO);
        assert!(CmdStatus::try_from(0x0b).is_err());
    }
}
