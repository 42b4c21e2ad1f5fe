//! CREATE_QP / DESTROY_QP / QUERY_QP, the state transitions RST2INIT, INIT2RTR,
//! RTR2RTS, 2ERR and 2RST, and the QP context with its address path [IFC
//! `create_qp_in/out`, `destroy_qp_in`, `query_qp_in/out`, `rst2init_qp_in`,
//! `init2rtr_qp_in`, `rtr2rts_qp_in`, `qp_2err_in`, `qp_2rst_in`, `qpc`, `ads`].
//!
//! An RC QP's work queue buffer holds its receive queue first (2^`log_rq_size` WQEs of
//! 16 << `log_rq_stride` bytes) and its send queue after it (2^`log_sq_size` 64-byte
//! basic blocks), described by the PAS list after the context. Its doorbell record
//! (`dbr_addr`) holds the receive counter (word 0) and the send counter (word 1).

use crate::ifc::Field;

/// `create_qp_in` without its PAS list: 0x110 bytes; the PAS (be64 page addresses)
/// follows.
pub const CREATE_QP_IN_LEN: usize = 0x110;
/// `create_qp_out`: 16 bytes.
pub const CREATE_QP_OUT_LEN: usize = 16;
/// `qpn`, out bytes 9–11 of CREATE_QP; in bytes 9–11 of every other QP command.
pub const QP_QPN: Field = Field::new(0x48, 24);
/// `opt_param_mask`, bytes 0x10–0x13 of the modify commands and QUERY_QP's output.
pub const QP_OPT_PARAM_MASK: Field = Field::new(0x80, 32);
/// Bit where the QP context starts in `create_qp_in`, the modify commands and
/// `query_qp_out` (byte 0x18).
pub const QPC_BIT: u32 = 0xc0;
/// Size of the QP context (bits 0xc0..0x800 of the message).
pub const QPC_SIZE: usize = 0xe8;
/// `wq_umem_valid` of `create_qp_in` (must be 0: the buffer is the PAS list).
pub const CREATE_QP_IN_WQ_UMEM_VALID: Field = Field::new(0x860, 1);
/// `qpc_ext` of `create_qp_in` (must be 0: no context extension before the PAS).
pub const CREATE_QP_IN_QPC_EXT: Field = Field::new(0x40, 1);
/// `pas[i]` of `create_qp_in` / `query_qp_out`, from byte 0x110.
pub const QP_PAS: Field = Field::new(0x880, 64);
/// `rst2init_qp_in`, `init2rtr_qp_in`, `rtr2rts_qp_in`: 0x110 bytes each.
pub const MODIFY_QP_IN_LEN: usize = 0x110;
/// Their outputs: 16 bytes.
pub const MODIFY_QP_OUT_LEN: usize = 16;
/// `qp_2err_in`, `qp_2rst_in`, `destroy_qp_in`, `query_qp_in`: 16 bytes.
pub const QP_SHORT_IN_LEN: usize = 16;
/// `qp_2err_out`, `qp_2rst_out`, `destroy_qp_out`: 16 bytes.
pub const QP_SHORT_OUT_LEN: usize = 16;
/// `query_qp_out` without its PAS list: 0x110 bytes.
pub const QUERY_QP_OUT_LEN: usize = 0x110;

/// Fields of the QP context, bit offsets inside it ([`in_msg`] places one in a message).
pub mod qpc {
    use crate::ifc::Field;

    /// `state`: [`super::QpState`].
    pub const STATE: Field = Field::new(0x00, 4);
    /// `st`: service type, [`super::QP_ST_RC`] only.
    pub const ST: Field = Field::new(0x08, 8);
    /// `pm_state`: path migration state.
    pub const PM_STATE: Field = Field::new(0x13, 2);
    /// `pd`.
    pub const PD: Field = Field::new(0x28, 24);
    /// `mtu`.
    pub const MTU: Field = Field::new(0x40, 3);
    /// `log_msg_max`: largest message, 2^this bytes.
    pub const LOG_MSG_MAX: Field = Field::new(0x43, 5);
    /// `log_rq_size`: receive WQEs, 2^this.
    pub const LOG_RQ_SIZE: Field = Field::new(0x49, 4);
    /// `log_rq_stride`: a receive WQE is 16 << this bytes.
    pub const LOG_RQ_STRIDE: Field = Field::new(0x4d, 3);
    /// `no_sq`: the QP has no send queue.
    pub const NO_SQ: Field = Field::new(0x50, 1);
    /// `log_sq_size`: send queue basic blocks (64 bytes), 2^this.
    pub const LOG_SQ_SIZE: Field = Field::new(0x51, 4);
    /// `uar_page`: the UAR whose doorbell rings the send queue.
    pub const UAR_PAGE: Field = Field::new(0x68, 24);
    /// `user_index`.
    pub const USER_INDEX: Field = Field::new(0x88, 24);
    /// `log_page_size`: buffer pages are 4 KiB << this.
    pub const LOG_PAGE_SIZE: Field = Field::new(0xa3, 5);
    /// `remote_qpn`: the connected QP (INIT2RTR).
    pub const REMOTE_QPN: Field = Field::new(0xa8, 24);
    /// Bit where `primary_address_path` (an [`super::ads`]) starts.
    pub const PRIMARY_ADDRESS_PATH_BIT: u32 = 0xc0;
    /// `log_ack_req_freq`.
    pub const LOG_ACK_REQ_FREQ: Field = Field::new(0x380, 4);
    /// `retry_count` (RTR2RTS).
    pub const RETRY_COUNT: Field = Field::new(0x38d, 3);
    /// `rnr_retry` (RTR2RTS).
    pub const RNR_RETRY: Field = Field::new(0x390, 3);
    /// `next_send_psn` (RTR2RTS).
    pub const NEXT_SEND_PSN: Field = Field::new(0x3c8, 24);
    /// `cqn_snd`: the CQ of send completions.
    pub const CQN_SND: Field = Field::new(0x3e8, 24);
    /// `rre`: remote reads allowed.
    pub const RRE: Field = Field::new(0x490, 1);
    /// `rwe`: remote writes allowed.
    pub const RWE: Field = Field::new(0x491, 1);
    /// `rae`: remote atomics allowed.
    pub const RAE: Field = Field::new(0x492, 1);
    /// `page_offset` of the buffer in its first page (must be 0 here).
    pub const PAGE_OFFSET: Field = Field::new(0x494, 6);
    /// `next_rcv_psn` (INIT2RTR).
    pub const NEXT_RCV_PSN: Field = Field::new(0x4a8, 24);
    /// `cqn_rcv`: the CQ of receive completions.
    pub const CQN_RCV: Field = Field::new(0x4e8, 24);
    /// `dbr_addr`: IOVA of the 8-byte doorbell record.
    pub const DBR_ADDR: Field = Field::new(0x500, 64);
    /// `rq_type`: [`super::RQ_TYPE_REGULAR`] or [`super::RQ_TYPE_ZERO_SIZE`].
    pub const RQ_TYPE: Field = Field::new(0x565, 3);
    /// `hw_sq_wqebb_counter`: send basic blocks the device has consumed.
    pub const HW_SQ_WQEBB_COUNTER: Field = Field::new(0x5a0, 16);
    /// `sw_sq_wqebb_counter`: the send counter last read from the doorbell record.
    pub const SW_SQ_WQEBB_COUNTER: Field = Field::new(0x5b0, 16);
    /// `hw_rq_counter`: receive WQEs the device has consumed.
    pub const HW_RQ_COUNTER: Field = Field::new(0x5c0, 32);
    /// `sw_rq_counter`: the receive counter last read from the doorbell record.
    pub const SW_RQ_COUNTER: Field = Field::new(0x5e0, 32);
    /// `dbr_umem_valid` (must be 0).
    pub const DBR_UMEM_VALID: Field = Field::new(0x683, 1);
}

/// Fields of an address path (`ads`), bit offsets inside it.
pub mod ads {
    use crate::ifc::Field;

    /// `fl`: force loopback — the peer QP is on this function, whatever the path says.
    pub const FL: Field = Field::new(0x00, 1);
    /// `pkey_index`.
    pub const PKEY_INDEX: Field = Field::new(0x10, 16);
    /// `grh`: the path names the peer by GID (`rgid_rip`), else by LID (`rlid`).
    pub const GRH: Field = Field::new(0x28, 1);
    /// `mlid`.
    pub const MLID: Field = Field::new(0x29, 7);
    /// `rlid`: the peer's LID.
    pub const RLID: Field = Field::new(0x30, 16);
    /// `src_addr_index`: GID index of this side.
    pub const SRC_ADDR_INDEX: Field = Field::new(0x48, 8);
    /// `hop_limit`.
    pub const HOP_LIMIT: Field = Field::new(0x58, 8);
    /// `rgid_rip`, high half (bytes 0–7 of the peer's GID).
    pub const RGID_HI: Field = Field::new(0x80, 64);
    /// `rgid_rip`, low half (bytes 8–15 of the peer's GID).
    pub const RGID_LO: Field = Field::new(0xc0, 64);
    /// `vhca_port_num`.
    pub const VHCA_PORT_NUM: Field = Field::new(0x128, 8);
}

/// A QP context field placed in a QP message.
pub const fn in_msg(f: Field) -> Field {
    f.offset(QPC_BIT)
}

/// An address-path field of the primary path placed in a QP message.
pub const fn path_in_msg(f: Field) -> Field {
    f.offset(QPC_BIT + qpc::PRIMARY_ADDRESS_PATH_BIT)
}

/// `MLX5_QP_ST_RC`.
pub const QP_ST_RC: u8 = 0x0;
/// `MLX5_QPC_PM_STATE_MIGRATED`.
pub const QP_PM_MIGRATED: u8 = 0x3;
/// `MLX5_NON_ZERO_RQ`: a regular receive queue.
pub const RQ_TYPE_REGULAR: u8 = 0x0;
/// `MLX5_ZERO_LEN_RQ`: no receive queue.
pub const RQ_TYPE_ZERO_SIZE: u8 = 0x3;
/// Bytes of a send-queue basic block (`MLX5_SEND_WQE_BB`).
pub const SEND_WQE_BB: usize = 64;
/// Bytes of a QP doorbell record: the receive counter (`MLX5_RCV_DBR`, word 0) and the
/// send counter (`MLX5_SND_DBR`, word 1), both big-endian.
pub const QP_DBR_LEN: usize = 8;
/// Byte of the receive counter in the doorbell record.
pub const QP_DBR_RCV_OFFSET: usize = 0;
/// Byte of the send counter in the doorbell record.
pub const QP_DBR_SND_OFFSET: usize = 4;

wire_enum! {
    /// `qpc.state` (`MLX5_QPC_STATE_*`).
    pub enum QpState: u8, field = "QP state" {
        /// Reset.
        Rst = 0x0 => "RST",
        /// Initialized.
        Init = 0x1 => "INIT",
        /// Ready to receive.
        Rtr = 0x2 => "RTR",
        /// Ready to send.
        Rts = 0x3 => "RTS",
        /// Send queue error.
        Sqer = 0x4 => "SQER",
        /// Send queue drained.
        SqDrained = 0x5 => "SQDRAINED",
        /// Error.
        Err = 0x6 => "ERR",
    }
}

/// Input length of CREATE_QP with `npages` PAS entries, or `None` on overflow.
pub fn create_qp_in_len(npages: usize) -> Option<usize> {
    npages.checked_mul(8)?.checked_add(CREATE_QP_IN_LEN)
}

/// The LID this adapter gives function `vhca_id` (its port's LID: `vhca_id + 1`, LID 0
/// being invalid).
pub const fn lid_of(vhca_id: u16) -> u16 {
    vhca_id.wrapping_add(1)
}

/// The function a LID names, if any.
pub const fn vhca_of_lid(lid: u16) -> Option<u16> {
    match lid {
        0 => None,
        l => Some(l - 1),
    }
}

/// The GID this adapter gives function `vhca_id` (GID index 0): the link-local
/// `fe80::` prefix, the function's LID in the last two bytes. As (high, low) halves.
pub const fn gid_of(vhca_id: u16) -> (u64, u64) {
    (0xfe80_0000_0000_0000, lid_of(vhca_id) as u64)
}

/// The function a GID names, if it is one of this adapter's.
pub const fn vhca_of_gid(hi: u64, lo: u64) -> Option<u16> {
    if hi != 0xfe80_0000_0000_0000 || lo > 0xffff {
        return None;
    }
    vhca_of_lid(lo as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ifc::{get, set};

    #[test]
    fn qp_context_fields_sit_where_the_ifc_puts_them() {
        assert_eq!(QPC_BIT as usize / 8 + QPC_SIZE, 0x100);
        assert_eq!(CREATE_QP_IN_WQ_UMEM_VALID.byte_off(), 0x10c);
        let mut m = vec![0u8; create_qp_in_len(1).unwrap()];
        assert_eq!(m.len(), 0x118);
        set(&mut m, in_msg(qpc::ST), u64::from(QP_ST_RC));
        set(&mut m, in_msg(qpc::PM_STATE), u64::from(QP_PM_MIGRATED));
        assert_eq!(&m[0x18..0x1b], &[0, 0, 0x18]);
        set(&mut m, in_msg(qpc::PD), 0x12_3456);
        assert_eq!(&m[0x1c..0x20], &[0, 0x12, 0x34, 0x56]);
        set(&mut m, in_msg(qpc::LOG_RQ_SIZE), 0xf);
        set(&mut m, in_msg(qpc::LOG_RQ_STRIDE), 0x7);
        set(&mut m, in_msg(qpc::LOG_SQ_SIZE), 0xf);
        assert_eq!(&m[0x20..0x23], &[0, 0x7f, 0x78]);
        set(&mut m, in_msg(qpc::REMOTE_QPN), 0xab_cdef);
        assert_eq!(&m[0x2c..0x30], &[0, 0xab, 0xcd, 0xef]);
        set(&mut m, path_in_msg(ads::FL), 1);
        assert_eq!(m[0x30], 0x80);
        set(&mut m, path_in_msg(ads::RLID), 0x0203);
        assert_eq!(&m[0x36..0x38], &[2, 3]);
        set(&mut m, path_in_msg(ads::RGID_LO), 9);
        assert_eq!(&m[0x48..0x50], &9u64.to_be_bytes());
        set(&mut m, in_msg(qpc::CQN_SND), 0x11);
        assert_eq!(&m[0x18 + 0x7c..0x18 + 0x80], &[0, 0, 0, 0x11]);
        set(&mut m, in_msg(qpc::RWE), 1);
        assert_eq!(m[0x18 + 0x92], 0x40);
        set(&mut m, in_msg(qpc::CQN_RCV), 0x12);
        assert_eq!(&m[0x18 + 0x9c..0x18 + 0xa0], &[0, 0, 0, 0x12]);
        set(&mut m, in_msg(qpc::DBR_ADDR), 0x7000);
        assert_eq!(&m[0x18 + 0xa0..0x18 + 0xa8], &0x7000u64.to_be_bytes());
        set(&mut m, in_msg(qpc::HW_SQ_WQEBB_COUNTER), 0x1234);
        assert_eq!(&m[0x18 + 0xb4..0x18 + 0xb6], &[0x12, 0x34]);
        set(&mut m, QP_PAS.nth(0).unwrap(), 0x9000);
        assert_eq!(&m[0x110..0x118], &0x9000u64.to_be_bytes());
        assert_eq!(get(&m, in_msg(qpc::PD)), 0x12_3456);
        assert!(in_msg(qpc::DBR_UMEM_VALID).end_byte() <= CREATE_QP_IN_LEN);
    }

    #[test]
    fn lids_and_gids_name_functions() {
        assert_eq!(lid_of(0), 1);
        assert_eq!(vhca_of_lid(lid_of(5)), Some(5));
        assert_eq!(vhca_of_lid(0), None);
        let (hi, lo) = gid_of(3);
        assert_eq!(vhca_of_gid(hi, lo), Some(3));
        assert_eq!(vhca_of_gid(0, lo), None);
        assert_eq!(QpState::try_from(6), Ok(QpState::Err));
        assert!(QpState::try_from(7).is_err());
    }
}
