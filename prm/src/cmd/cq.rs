//! CREATE_CQ / DESTROY_CQ / QUERY_CQ and the CQ context [IFC `create_cq_in/out`,
//! `destroy_cq_in`, `query_cq_in/out`, `cqc`].
//!
//! A CQ is a ring of 2^`log_cq_size` 64-byte CQEs in guest memory (the PAS list after
//! the context), with a doorbell record (`dbr_addr`) whose first word is the consumer
//! index software writes.

use crate::ifc::Field;

/// `create_cq_in` without its PAS list: 0x110 bytes; the PAS (be64 page addresses)
/// follows.
pub const CREATE_CQ_IN_LEN: usize = 0x110;
/// `create_cq_out`: 16 bytes.
pub const CREATE_CQ_OUT_LEN: usize = 16;
/// Bit where the CQ context starts in `create_cq_in` and `query_cq_out` (byte 0x10).
pub const CQC_BIT: u32 = 0x80;
/// Size of the CQ context.
pub const CQC_SIZE: usize = 64;
/// `pas[i]` of `create_cq_in` / `query_cq_out`, from byte 0x110.
pub const CQ_PAS: Field = Field::new(0x880, 64);
/// `cqn`, out bytes 9–11 of CREATE_CQ; in bytes 9–11 of DESTROY_CQ and QUERY_CQ.
pub const CQ_CQN: Field = Field::new(0x48, 24);
/// `destroy_cq_in`: 16 bytes.
pub const DESTROY_CQ_IN_LEN: usize = 16;
/// `destroy_cq_out`: 16 bytes.
pub const DESTROY_CQ_OUT_LEN: usize = 16;
/// `query_cq_in`: 16 bytes.
pub const QUERY_CQ_IN_LEN: usize = 16;
/// `query_cq_out` without its PAS list: 0x110 bytes.
pub const QUERY_CQ_OUT_LEN: usize = 0x110;

/// Fields of the CQ context, bit offsets inside it ([`CQC_BIT`] places it in a message).
pub mod cqc {
    use crate::ifc::Field;

    /// `status`: [`super::CQ_STATUS_OK`], overflow or write failure.
    pub const STATUS: Field = Field::new(0x00, 4);
    /// `dbr_umem_valid` (must be 0: the doorbell record is `dbr_addr`).
    pub const DBR_UMEM_VALID: Field = Field::new(0x06, 1);
    /// `cqe_sz`: 0 = 64-byte CQEs (the only size here).
    pub const CQE_SZ: Field = Field::new(0x08, 3);
    /// `cc`: collapsed CQ (not supported).
    pub const CC: Field = Field::new(0x0b, 1);
    /// `oi`: overrun ignore.
    pub const OI: Field = Field::new(0x0f, 1);
    /// `cqe_comp_en`: CQE compression (not supported).
    pub const CQE_COMP_EN: Field = Field::new(0x12, 1);
    /// `st`: arm state.
    pub const ST: Field = Field::new(0x14, 4);
    /// `page_offset` of the ring in its first page (must be 0 here).
    pub const PAGE_OFFSET: Field = Field::new(0x54, 6);
    /// `log_cq_size`: the ring holds 2^this CQEs.
    pub const LOG_CQ_SIZE: Field = Field::new(0x63, 5);
    /// `uar_page`: the UAR whose doorbell arms the CQ.
    pub const UAR_PAGE: Field = Field::new(0x68, 24);
    /// `c_eqn_or_apu_element` (older headers: `c_eqn`, its low 8 bits): the EQ that gets
    /// the completion events.
    pub const C_EQN: Field = Field::new(0xa0, 32);
    /// `log_page_size`: ring pages are 4 KiB << this.
    pub const LOG_PAGE_SIZE: Field = Field::new(0xc3, 5);
    /// `last_notified_index`.
    pub const LAST_NOTIFIED_INDEX: Field = Field::new(0x108, 24);
    /// `last_solicit_index`.
    pub const LAST_SOLICIT_INDEX: Field = Field::new(0x128, 24);
    /// `consumer_counter`.
    pub const CONSUMER_COUNTER: Field = Field::new(0x148, 24);
    /// `producer_counter`: CQEs the device has written.
    pub const PRODUCER_COUNTER: Field = Field::new(0x168, 24);
    /// `dbr_addr`: IOVA of the 8-byte doorbell record (consumer index, arm word).
    pub const DBR_ADDR: Field = Field::new(0x1c0, 64);
}

/// A CQ context field placed in `create_cq_in` / `query_cq_out`.
pub const fn in_msg(f: Field) -> Field {
    f.offset(CQC_BIT)
}

/// `MLX5_CQC_STATUS_OK`.
pub const CQ_STATUS_OK: u8 = 0x0;
/// `MLX5_CQC_STATUS_CQ_OVERFLOW`.
pub const CQ_STATUS_OVERFLOW: u8 = 0x9;
/// `MLX5_CQC_STATUS_CQ_WRITE_FAIL`.
pub const CQ_STATUS_WRITE_FAIL: u8 = 0xa;
/// `MLX5_CQE_SIZE_64B`.
pub const CQE_SZ_64: u8 = 0;
/// Bytes per CQE.
pub const CQE_SIZE: usize = 64;
/// Bytes of a CQ doorbell record: `set_ci_db` (24-bit consumer index) then `arm_db`.
pub const CQ_DBR_LEN: usize = 8;

/// Byte offset in the CQ doorbell record of `set_ci_db`: be32, the consumer index
/// (bits 23:0) software has polled up to (rdma-core `MLX5_CQ_SET_CI` = word 0).
pub const CQ_DBR_SET_CI_OFFSET: usize = 0;
/// Byte offset in the CQ doorbell record of `arm_db`: be32, the last arm request in
/// the same format as the UAR doorbell's first word (rdma-core `MLX5_CQ_ARM_DB` = word
/// 1). Software writes it before ringing the UAR doorbell.
pub const CQ_DBR_ARM_OFFSET: usize = 4;

/// Offset in a UAR page of the CQ arm doorbell (`MLX5_CQ_DOORBELL`): an 8-byte register
/// written as two be32 words, `arm_sn << 28 | cmd << 24 | ci` at 0x20 and `cqn` at
/// 0x24 (`mlx5_cq_arm`). On a 64-bit store both words arrive together; a driver that
/// writes them one at a time writes 0x20 first.
pub const CQ_DOORBELL_OFFSET: u32 = 0x20;
/// Offset of the doorbell's second word (`cqn`, bits 23:0).
pub const CQ_DOORBELL_CQN_OFFSET: u32 = CQ_DOORBELL_OFFSET + 4;
/// Doorbell word 0: `cmd_sn` (the CQ's arm sequence number, 2 bits) at bits 29:28.
pub const CQ_DB_SN_SHIFT: u32 = 28;
/// Mask of `cmd_sn` after the shift.
pub const CQ_DB_SN_MASK: u32 = 0x3;
/// Doorbell word 0: `cmd` at bits 27:24 ([`CqArmCmd`]).
pub const CQ_DB_CMD_SHIFT: u32 = 24;
/// Mask of `cmd` after the shift.
pub const CQ_DB_CMD_MASK: u32 = 0xf;
/// Doorbell word 0: the consumer index, bits 23:0.
pub const CQ_DB_CI_MASK: u32 = 0x00ff_ffff;
/// Doorbell word 0: bits 31:30 are reserved (0).
pub const CQ_DB_RESERVED_MASK: u32 = 0xc000_0000;
/// Doorbell word 1: the CQ number, bits 23:0 (bits 31:24 reserved).
pub const CQ_DB_CQN_MASK: u32 = 0x00ff_ffff;

/// `cmd` of a CQ arm request (`MLX5_CQ_DB_REQ_NOT` = 0 << 24, `MLX5_CQ_DB_REQ_NOT_SOL`
/// = 1 << 24).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CqArmCmd {
    /// ARM_NEXT: an event for the next CQE of any kind.
    Next = 0,
    /// ARM_SOLICITED: an event for the next solicited CQE (a receive completion of a
    /// message sent with the solicited-event bit) or error CQE.
    Solicited = 1,
}

impl TryFrom<u32> for CqArmCmd {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        match v {
            0 => Ok(CqArmCmd::Next),
            1 => Ok(CqArmCmd::Solicited),
            other => Err(other),
        }
    }
}

/// The first doorbell word (and the doorbell record's `arm_db`) for an arm request.
pub const fn cq_arm_word(sn: u32, cmd: CqArmCmd, ci: u32) -> u32 {
    ((sn & CQ_DB_SN_MASK) << CQ_DB_SN_SHIFT)
        | ((cmd as u32) << CQ_DB_CMD_SHIFT)
        | (ci & CQ_DB_CI_MASK)
}

/// An arm request as the device decodes the doorbell's first word: (`cmd_sn`, raw
/// `cmd`, `ci`, reserved bits).
pub const fn split_cq_arm_word(w: u32) -> (u32, u32, u32, u32) {
    (
        (w >> CQ_DB_SN_SHIFT) & CQ_DB_SN_MASK,
        (w >> CQ_DB_CMD_SHIFT) & CQ_DB_CMD_MASK,
        w & CQ_DB_CI_MASK,
        w & CQ_DB_RESERVED_MASK,
    )
}

/// cqc `st` of a CQ armed for solicited completions
/// (`MLX5_CQC_ST_SOLICITED_NOTIFICATION_REQUEST_ARMED`).
pub const CQC_ST_SOLICITED_ARMED: u8 = 0x6;
/// cqc `st` of a CQ armed for its next completion
/// (`MLX5_CQC_ST_NOTIFICATION_REQUEST_ARMED`).
pub const CQC_ST_ARMED: u8 = 0x9;
/// cqc `st` of a CQ whose arm fired and was not renewed (`MLX5_CQC_ST_FIRED`).
pub const CQC_ST_FIRED: u8 = 0xa;

/// CQ error event syndrome: a CQE found the ring full (`MLX5_CQ_ERROR_CQ_OVERRUN`).
pub const CQ_ERROR_OVERRUN: u8 = 0x1;
/// CQ error event syndrome: the CQ's ring or doorbell record could not be accessed
/// (`MLX5_CQ_ERROR_CQ_ACCESS_VIOLATION`).
pub const CQ_ERROR_ACCESS_VIOLATION: u8 = 0x2;

// The CQ doorbell lies inside its UAR page, below the EQ doorbells.
const _: () = assert!(CQ_DOORBELL_CQN_OFFSET + 4 <= super::eq::EQ_DOORBELL_ARM_OFFSET);

/// Input length of CREATE_CQ with `npages` PAS entries, or `None` on overflow.
pub fn create_cq_in_len(npages: usize) -> Option<usize> {
    npages.checked_mul(8)?.checked_add(CREATE_CQ_IN_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ifc::{get, set};

    #[test]
    fn cq_context_fields_sit_where_the_ifc_puts_them() {
        assert_eq!(CQC_SIZE * 8, 0x200);
        assert!(cqc::DBR_ADDR.end_byte() == CQC_SIZE);
        let mut m = vec![0u8; create_cq_in_len(2).unwrap()];
        assert_eq!(m.len(), 0x120);
        set(&mut m, in_msg(cqc::LOG_CQ_SIZE), 10);
        set(&mut m, in_msg(cqc::UAR_PAGE), 0x12_3456);
        assert_eq!(&m[0x1c..0x20], &[10, 0x12, 0x34, 0x56]);
        set(&mut m, in_msg(cqc::C_EQN), 7);
        assert_eq!(&m[0x24..0x28], &[0, 0, 0, 7]);
        set(&mut m, in_msg(cqc::LOG_PAGE_SIZE), 3);
        assert_eq!(m[0x28], 3);
        set(&mut m, in_msg(cqc::DBR_ADDR), 0xdead_b000);
        assert_eq!(&m[0x48..0x50], &0xdead_b000u64.to_be_bytes());
        set(&mut m, CQ_PAS.nth(1).unwrap(), 0x5000);
        assert_eq!(&m[0x118..0x120], &0x5000u64.to_be_bytes());
        set(&mut m, CQ_CQN, 0x42);
        assert_eq!(get(&m[..16], CQ_CQN), 0x42);
        set(&mut m, in_msg(cqc::PRODUCER_COUNTER), 0xab_cdef);
        assert_eq!(&m[0x10 + 0x2c..0x10 + 0x30], &[0, 0xab, 0xcd, 0xef]);
        assert_eq!(create_cq_in_len(usize::MAX), None);
    }

    #[test]
    fn arm_doorbell_words_are_mlx5_cq_arms() {
        // mlx5_cq_arm: sn << 28 | cmd | ci, cmd REQ_NOT = 0 << 24, REQ_NOT_SOL = 1 << 24.
        assert_eq!(cq_arm_word(1, CqArmCmd::Next, 5), 0x1000_0005);
        assert_eq!(cq_arm_word(7, CqArmCmd::Solicited, 0x1ff_ffff), 0x31ff_ffff);
        assert_eq!(split_cq_arm_word(0x31ff_ffff), (3, 1, 0xff_ffff, 0));
        assert_eq!(split_cq_arm_word(0xc200_0001), (0, 2, 1, 0xc000_0000));
        assert_eq!(CqArmCmd::try_from(2), Err(2));
        assert_eq!((CQ_DOORBELL_OFFSET, CQ_DOORBELL_CQN_OFFSET), (0x20, 0x24));
        assert_eq!((CQ_DBR_SET_CI_OFFSET, CQ_DBR_ARM_OFFSET), (0, 4));
    }
}
