//! Command queue entry and mailbox block [DEVICE_H `mlx5_cmd_layout`, `mlx5_cmd_prot_block`],
//! mlx5-device.md §3.1–3.4 and §3.8.

use crate::errno::{EBADR, EFAULT, EINVAL, EIO, ENOMSG};
use zerocopy::byteorder::{BigEndian, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `type` of every command entry (`MLX5_PCI_CMD_XPORT`).
pub const MLX5_PCI_CMD_XPORT: u8 = 7;
/// `status_own` bit 0: 1 = owned by hardware (`CMD_OWNER_HW`), 0 = by software.
pub const CMD_OWNER_HW: u8 = 0x01;
/// `status_own` `[7:1]`: delivery status.
pub const DELIVERY_STATUS_SHIFT: u32 = 1;
/// Size of one command entry.
pub const CMD_ENTRY_SIZE: usize = 64;
/// log2 of the smallest entry stride that holds an entry.
pub const LOG_CMD_ENTRY_STRIDE_MIN: u32 = 6;
/// Input/output bytes carried inline in the entry (`in[4]`, `out[4]`).
pub const INLINE_SIZE: usize = 16;
/// Data bytes per mailbox block (`MLX5_CMD_DATA_BLOCK_SIZE`).
pub const MAILBOX_DATA_SIZE: usize = 512;
/// Size of `struct mlx5_cmd_prot_block`.
pub const MAILBOX_BLOCK_SIZE: usize = 576;
/// Alignment the driver's dma_pool gives mailbox blocks (`roundup_pow_of_two(576)`).
pub const MAILBOX_BLOCK_ALIGN: u64 = 1024;

/// Entry byte offsets, for single-byte accesses without the whole struct.
pub const CMD_INLEN_OFFSET: usize = 0x04;
/// `in_ptr`.
pub const CMD_IN_PTR_OFFSET: usize = 0x08;
/// `in[4]`.
pub const CMD_IN_OFFSET: usize = 0x10;
/// `out[4]`.
pub const CMD_OUT_OFFSET: usize = 0x20;
/// `out_ptr`.
pub const CMD_OUT_PTR_OFFSET: usize = 0x30;
/// `outlen`.
pub const CMD_OUTLEN_OFFSET: usize = 0x38;
/// `token`.
pub const CMD_TOKEN_OFFSET: usize = 0x3c;
/// `sig`.
pub const CMD_SIG_OFFSET: usize = 0x3d;
/// `status_own`.
pub const CMD_STATUS_OWN_OFFSET: usize = 0x3f;

/// Mailbox block byte offsets: `rsvd0` (start of the control area).
pub const BLOCK_CTRL_OFFSET: usize = 0x200;
/// `next`.
pub const BLOCK_NEXT_OFFSET: usize = 0x230;
/// `block_num`.
pub const BLOCK_NUM_OFFSET: usize = 0x238;
/// `token`.
pub const BLOCK_TOKEN_OFFSET: usize = 0x23d;
/// `ctrl_sig`.
pub const BLOCK_CTRL_SIG_OFFSET: usize = 0x23e;
/// `sig`.
pub const BLOCK_SIG_OFFSET: usize = 0x23f;

/// One 64-byte command queue entry, `struct mlx5_cmd_layout`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CmdLayout {
    /// 0x00 `type`: must be [`MLX5_PCI_CMD_XPORT`].
    pub type_: u8,
    /// 0x01 reserved.
    pub rsvd0: [u8; 3],
    /// 0x04 `inlen`: total input length, inline bytes included.
    pub inlen: U32<BigEndian>,
    /// 0x08 `in_ptr`: DMA address of the first input mailbox block, 0 if none.
    pub in_ptr: U64<BigEndian>,
    /// 0x10 `in[4]`: the first 16 input bytes.
    pub in_: [u8; INLINE_SIZE],
    /// 0x20 `out[4]`: the first 16 output bytes (written by the device).
    pub out: [u8; INLINE_SIZE],
    /// 0x30 `out_ptr`: DMA address of the first output mailbox block, 0 if none.
    pub out_ptr: U64<BigEndian>,
    /// 0x38 `outlen`: total output length the driver expects.
    pub outlen: U32<BigEndian>,
    /// 0x3c `token`: 1..=255, also stamped into every mailbox block.
    pub token: u8,
    /// 0x3d `sig`: see [`entry_signature`].
    pub sig: u8,
    /// 0x3e reserved.
    pub rsvd1: u8,
    /// 0x3f `status_own`: bit 0 ownership, `[7:1]` delivery status.
    pub status_own: u8,
}

/// One 576-byte mailbox block, `struct mlx5_cmd_prot_block`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CmdProtBlock {
    /// 0x000 `data`: message bytes `16 + 512 * block_num ..`.
    pub data: [u8; MAILBOX_DATA_SIZE],
    /// 0x200 reserved.
    pub rsvd0: [u8; 48],
    /// 0x230 `next`: DMA address of the next block, 0 on the last.
    pub next: U64<BigEndian>,
    /// 0x238 `block_num`: 0, 1, 2, ... along the chain.
    pub block_num: U32<BigEndian>,
    /// 0x23c reserved.
    pub rsvd1: u8,
    /// 0x23d `token`: same as the entry token.
    pub token: u8,
    /// 0x23e `ctrl_sig`: see [`block_signatures`].
    pub ctrl_sig: u8,
    /// 0x23f `sig`: see [`block_signatures`].
    pub sig: u8,
}

wire_enum! {
    /// Delivery status, `status_own` `[7:1]` (`MLX5_CMD_DELIVERY_STAT_*`), §3.8.
    pub enum DeliveryStatus: u8, field = "delivery status" {
        /// Delivered; the output status byte tells the command result.
        Ok = 0x0 => "OK",
        /// Entry or block signature error.
        SignatureErr = 0x1 => "SIGNAT_ERR",
        /// Token mismatch.
        TokenErr = 0x2 => "TOK_ERR",
        /// Bad mailbox block number.
        BadBlockNumErr = 0x3 => "BAD_BLK_NUM_ERR",
        /// Output pointer not aligned.
        OutPtrAlignErr = 0x4 => "OUT_PTR_ALIGN_ERR",
        /// Input pointer not aligned.
        InPtrAlignErr = 0x5 => "IN_PTR_ALIGN_ERR",
        /// FW internal error.
        FwErr = 0x6 => "FW_ERR",
        /// Input length error.
        InLengthErr = 0x7 => "IN_LENGTH_ERR",
        /// Output length error.
        OutLengthErr = 0x8 => "OUT_LENGTH_ERR",
        /// Reserved fields not cleared.
        ResFldNotClrErr = 0x9 => "RES_FLD_NOT_CLR_ERR",
        /// Bad descriptor type (entry `type` != 7).
        CmdDescrErr = 0x10 => "CMD_DESCR_ERR",
    }
}

impl DeliveryStatus {
    /// The `status_own` byte the device writes on completion: `(status << 1)`, owner = SW.
    pub const fn status_own(self) -> u8 {
        (self as u8) << DELIVERY_STATUS_SHIFT
    }

    /// The delivery status carried by a `status_own` byte.
    pub fn from_status_own(status_own: u8) -> Result<Self, crate::PrmError> {
        Self::try_from(status_own >> DELIVERY_STATUS_SHIFT)
    }

    /// Negative errno the kernel's `deliv_status_to_err` gives for this status.
    pub const fn errno(self) -> i32 {
        delivery_status_to_errno(self as u8)
    }
}

/// `MLX5_DRIVER_STATUS_ABORTED`: driver-internal delivery status, maps to 0.
pub const DRIVER_STATUS_ABORTED: u8 = 0xfe;

/// `deliv_status_to_err` for any raw delivery status (unknown values give -EINVAL).
pub const fn delivery_status_to_errno(status: u8) -> i32 {
    match status {
        0x0 | DRIVER_STATUS_ABORTED => 0,
        0x1 | 0x2 => -EBADR,
        0x3..=0x5 => -EFAULT,
        0x6 => -EIO,
        0x7..=0x9 | 0x10 => -ENOMSG,
        _ => -EINVAL,
    }
}

/// Number of mailbox blocks for a message of `len` bytes: `ceil(max(0, len - 16) / 512)`.
pub const fn block_count(len: usize) -> usize {
    len.saturating_sub(INLINE_SIZE).div_ceil(MAILBOX_DATA_SIZE)
}

fn xor8(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |acc, b| acc ^ b)
}

/// The entry `sig`: `~XOR` of all 64 bytes, taken with `sig` = 0 and `status_own` =
/// [`CMD_OWNER_HW`] (as the driver computes it before ringing). A correctly signed
/// entry with `status_own` = 1 XORs to 0xff.
pub fn entry_signature(entry: &[u8; CMD_ENTRY_SIZE]) -> u8 {
    let rest = entry[CMD_SIG_OFFSET] ^ entry[CMD_STATUS_OWN_OFFSET];
    !(xor8(entry) ^ rest ^ CMD_OWNER_HW)
}

/// `(ctrl_sig, sig)` for a mailbox block: `ctrl_sig = ~XOR(0x200..=0x23d)`, then
/// `sig = ~XOR(0x000..=0x23e)` taken with the new `ctrl_sig`. The stored signature
/// bytes are ignored.
pub fn block_signatures(block: &[u8; MAILBOX_BLOCK_SIZE]) -> (u8, u8) {
    let ctrl_sig = !xor8(&block[BLOCK_CTRL_OFFSET..BLOCK_CTRL_SIG_OFFSET]);
    let sig = !(xor8(&block[..BLOCK_CTRL_SIG_OFFSET]) ^ ctrl_sig);
    (ctrl_sig, sig)
}

const _: () = assert!(core::mem::size_of::<CmdLayout>() == CMD_ENTRY_SIZE);
const _: () = assert!(core::mem::size_of::<CmdProtBlock>() == MAILBOX_BLOCK_SIZE);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};
    use zerocopy::FromZeros;

    #[test]
    fn entry_is_64_bytes_with_sheet_offsets() {
        assert_eq!(size_of::<CmdLayout>(), CMD_ENTRY_SIZE);
        assert_eq!(1 << LOG_CMD_ENTRY_STRIDE_MIN, CMD_ENTRY_SIZE);
        assert_eq!(offset_of!(CmdLayout, inlen), CMD_INLEN_OFFSET);
        assert_eq!(offset_of!(CmdLayout, in_ptr), CMD_IN_PTR_OFFSET);
        assert_eq!(offset_of!(CmdLayout, in_), CMD_IN_OFFSET);
        assert_eq!(offset_of!(CmdLayout, out), CMD_OUT_OFFSET);
        assert_eq!(offset_of!(CmdLayout, out_ptr), CMD_OUT_PTR_OFFSET);
        assert_eq!(offset_of!(CmdLayout, outlen), CMD_OUTLEN_OFFSET);
        assert_eq!(offset_of!(CmdLayout, token), CMD_TOKEN_OFFSET);
        assert_eq!(offset_of!(CmdLayout, sig), CMD_SIG_OFFSET);
        assert_eq!(offset_of!(CmdLayout, status_own), CMD_STATUS_OWN_OFFSET);
    }

    #[test]
    fn block_is_576_bytes_with_sheet_offsets() {
        assert_eq!(size_of::<CmdProtBlock>(), MAILBOX_BLOCK_SIZE);
        assert_eq!(offset_of!(CmdProtBlock, rsvd0), BLOCK_CTRL_OFFSET);
        assert_eq!(offset_of!(CmdProtBlock, next), BLOCK_NEXT_OFFSET);
        assert_eq!(offset_of!(CmdProtBlock, block_num), BLOCK_NUM_OFFSET);
        assert_eq!(offset_of!(CmdProtBlock, token), BLOCK_TOKEN_OFFSET);
        assert_eq!(offset_of!(CmdProtBlock, ctrl_sig), BLOCK_CTRL_SIG_OFFSET);
        assert_eq!(offset_of!(CmdProtBlock, sig), BLOCK_SIG_OFFSET);
        const { assert!(MAILBOX_BLOCK_ALIGN >= MAILBOX_BLOCK_SIZE as u64) };
    }

    #[test]
    fn entry_fields_are_big_endian() {
        let mut e = CmdLayout::new_zeroed();
        e.inlen.set(0x1010);
        e.in_ptr.set(0x0102_0304_0506_0708);
        let b = e.as_bytes();
        assert_eq!(&b[4..8], &[0, 0, 0x10, 0x10]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn signed_entry_xors_to_ff() {
        let mut e = CmdLayout::new_zeroed();
        e.type_ = MLX5_PCI_CMD_XPORT;
        e.inlen.set(16);
        e.in_[..2].copy_from_slice(&[0x01, 0x04]);
        e.outlen.set(16);
        e.token = 0x42;
        e.status_own = CMD_OWNER_HW;
        e.sig = entry_signature(&e.as_bytes().try_into().unwrap());
        assert_eq!(xor8(e.as_bytes()), 0xff);
        // The device's completion write must not change what the signature covers.
        let signed = e.sig;
        e.status_own = DeliveryStatus::TokenErr.status_own();
        assert_eq!(entry_signature(&e.as_bytes().try_into().unwrap()), signed);
    }

    #[test]
    fn block_signatures_cover_the_documented_ranges() {
        let mut b = CmdProtBlock::new_zeroed();
        b.data[7] = 0x5a;
        b.next.set(0x1234_5000);
        b.block_num.set(3);
        b.token = 0x42;
        let (ctrl, sig) = block_signatures(&b.as_bytes().try_into().unwrap());
        b.ctrl_sig = ctrl;
        b.sig = sig;
        let bytes = b.as_bytes();
        assert_eq!(
            xor8(&bytes[BLOCK_CTRL_OFFSET..=BLOCK_CTRL_SIG_OFFSET]),
            0xff
        );
        assert_eq!(xor8(&bytes[..=BLOCK_SIG_OFFSET]), 0xff);
    }

    #[test]
    fn block_count_matches_kernel_examples() {
        assert_eq!(block_count(0), 0);
        assert_eq!(block_count(16), 0);
        assert_eq!(block_count(17), 1);
        assert_eq!(block_count(112), 1); // QUERY_ISSI out
        assert_eq!(block_count(16 + 512), 1);
        assert_eq!(block_count(16 + 513), 2);
        assert_eq!(block_count(0x1010), 8); // QUERY_HCA_CAP out
    }

    #[test]
    fn delivery_status_round_trips_and_maps_errno() {
        for &d in DeliveryStatus::ALL {
            assert_eq!(
                DeliveryStatus::from_status_own(d.status_own() | CMD_OWNER_HW),
                Ok(d)
            );
            assert_eq!(d.status_own() & CMD_OWNER_HW, 0);
        }
        assert_eq!(DeliveryStatus::Ok.errno(), 0);
        assert_eq!(DeliveryStatus::TokenErr.errno(), -EBADR);
        assert_eq!(DeliveryStatus::InPtrAlignErr.errno(), -EFAULT);
        assert_eq!(DeliveryStatus::FwErr.errno(), -EIO);
        assert_eq!(DeliveryStatus::CmdDescrErr.errno(), -ENOMSG);
        assert_eq!(delivery_status_to_errno(0x0a), -EINVAL);
        assert_eq!(delivery_status_to_errno(DRIVER_STATUS_ABORTED), 0);
        assert!(DeliveryStatus::try_from(0x0a).is_err());
    }
}
