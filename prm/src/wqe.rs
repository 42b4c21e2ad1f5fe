//! Work queue entries and completion queue entries as the device reads and writes them
//! in guest memory [`mlx5_wqe_ctrl_seg`, `mlx5_wqe_raddr_seg`, `mlx5_wqe_data_seg`,
//! `mlx5_cqe64`, `mlx5_err_cqe`, `MLX5_OPCODE_*`, `MLX5_CQE_*` in the kernel's
//! `include/linux/mlx5/qp.h` and `cq.h`].
//!
//! A send WQE is a control segment, then (for RDMA) a remote-address segment, then data
//! segments, each 16 bytes; `ds` in the control segment counts them all. It occupies
//! `ceil(ds / 4)` 64-byte basic blocks of the send queue and may wrap around its end.
//! A receive WQE is a list of data segments (a zero `byte_count` with the invalid lkey
//! ends it early).

use zerocopy::byteorder::{BigEndian, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Bytes of one WQE segment (`MLX5_SEND_WQE_DS`).
pub const WQE_DS: usize = 16;
/// Segments in one 64-byte basic block.
pub const DS_PER_BB: usize = 4;
/// Most segments one send WQE may have here (16 basic blocks, `MLX5_SEND_WQE_MAX_WQEBBS`).
pub const MAX_WQE_DS: usize = 64;
/// Byte 11 of the control segment: `fm_ce_se`; bits 3:2 are the completion mode.
pub const CTRL_CE_MASK: u8 = 0x0c;
/// `MLX5_WQE_CTRL_CQ_UPDATE`: this WQE completes with a CQE.
pub const CTRL_CQ_UPDATE: u8 = 0x08;
/// `MLX5_WQE_CTRL_SOLICITED`: the message's receive completion is solicited (it fires
/// a CQ armed with ARM_SOLICITED).
pub const CTRL_SOLICITED: u8 = 0x02;
/// `MLX5_INLINE_SEG`: a data segment with this bit in `byte_count` is inline data.
pub const INLINE_SEG: u32 = 0x8000_0000;
/// UAR page offset of the first BlueFlame / doorbell register (`MLX5_BF_OFFSET`): the
/// driver writes the first 8 bytes of the control segment of its last WQE there (the
/// second word carries the QP number); registers of `1 << log_bf_reg_size` bytes
/// alternate from here.
pub const UAR_BF_OFFSET: u32 = 0x800;
/// `MLX5_INVALID_LKEY`: ends a receive scatter list.
pub const INVALID_LKEY: u32 = 0x100;

wire_enum! {
    /// A send WQE opcode, control segment byte 3 (`MLX5_OPCODE_*`).
    pub enum WqeOpcode: u8, field = "WQE opcode" {
        /// `MLX5_OPCODE_NOP`.
        Nop = 0x00 => "NOP",
        /// `MLX5_OPCODE_RDMA_WRITE`.
        RdmaWrite = 0x08 => "RDMA_WRITE",
        /// `MLX5_OPCODE_RDMA_WRITE_IMM`.
        RdmaWriteImm = 0x09 => "RDMA_WRITE_IMM",
        /// `MLX5_OPCODE_SEND`.
        Send = 0x0a => "SEND",
        /// `MLX5_OPCODE_SEND_IMM`.
        SendImm = 0x0b => "SEND_IMM",
        /// `MLX5_OPCODE_RDMA_READ`.
        RdmaRead = 0x10 => "RDMA_READ",
    }
}

/// The control segment (`mlx5_wqe_ctrl_seg`), 16 bytes.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct CtrlSeg {
    /// `opmod_idx_opcode`: op_mod (31:24), WQE index (23:8), opcode (7:0).
    pub opmod_idx_opcode: U32<BigEndian>,
    /// `qpn_ds`: QP number (31:8), segment count (5:0).
    pub qpn_ds: U32<BigEndian>,
    /// `signature`.
    pub signature: u8,
    /// Reserved (`dci_stream_channel_id`).
    pub rsvd: [u8; 2],
    /// `fm_ce_se`: fence (7:5), completion (3:2), solicited (1).
    pub fm_ce_se: u8,
    /// `imm`: immediate data of the _IMM opcodes.
    pub imm: U32<BigEndian>,
}

impl CtrlSeg {
    /// A control segment.
    pub fn new(opcode: WqeOpcode, wqe_index: u16, qpn: u32, ds: u8, signal: bool) -> Self {
        CtrlSeg {
            opmod_idx_opcode: U32::new((u32::from(wqe_index) << 8) | u32::from(u8::from(opcode))),
            qpn_ds: U32::new((qpn << 8) | u32::from(ds & 0x3f)),
            signature: 0,
            rsvd: [0; 2],
            fm_ce_se: if signal { CTRL_CQ_UPDATE } else { 0 },
            imm: U32::new(0),
        }
    }

    /// The raw opcode byte.
    pub fn opcode(&self) -> u8 {
        self.opmod_idx_opcode.get() as u8
    }

    /// The WQE index software wrote.
    pub fn wqe_index(&self) -> u16 {
        (self.opmod_idx_opcode.get() >> 8) as u16
    }

    /// The QP number.
    pub fn qpn(&self) -> u32 {
        self.qpn_ds.get() >> 8
    }

    /// Segments in the WQE, this one included.
    pub fn ds(&self) -> usize {
        (self.qpn_ds.get() & 0x3f) as usize
    }

    /// Whether the WQE asks for a CQE.
    pub fn signaled(&self) -> bool {
        self.fm_ce_se & CTRL_CE_MASK == CTRL_CQ_UPDATE
    }

    /// Whether the solicited-event bit is set.
    pub fn solicited(&self) -> bool {
        self.fm_ce_se & CTRL_SOLICITED != 0
    }
}

/// The remote-address segment (`mlx5_wqe_raddr_seg`), 16 bytes.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct RaddrSeg {
    /// `raddr`: the peer's virtual address.
    pub raddr: U64<BigEndian>,
    /// `rkey`: the peer's mkey.
    pub rkey: U32<BigEndian>,
    /// Reserved.
    pub rsvd: U32<BigEndian>,
}

/// A data segment (`mlx5_wqe_data_seg`), 16 bytes.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct DataSeg {
    /// `byte_count`.
    pub byte_count: U32<BigEndian>,
    /// `lkey`: the local mkey.
    pub lkey: U32<BigEndian>,
    /// `addr`: the virtual address in the mkey.
    pub addr: U64<BigEndian>,
}

/// Bytes of a CQE here (`cqe_sz` 64).
pub const CQE_LEN: usize = 64;
/// Byte of `op_own` in a CQE: opcode (7:4), owner bit (0).
pub const CQE_OP_OWN_OFFSET: usize = 63;
/// `op_own` a software-initialized CQE holds (`MLX5_CQE_INVALID << 4 | 1`).
pub const CQE_INIT_OP_OWN: u8 = 0xf1;

wire_enum! {
    /// A CQE opcode, `op_own` bits 7:4 (`MLX5_CQE_*`).
    pub enum CqeOpcode: u8, field = "CQE opcode" {
        /// `MLX5_CQE_REQ`: a send WQE completed.
        Req = 0x0 => "REQ",
        /// `MLX5_CQE_RESP_WR_IMM`: an RDMA_WRITE_IMM was received.
        RespWrImm = 0x1 => "RESP_WR_IMM",
        /// `MLX5_CQE_RESP_SEND`: a SEND was received.
        RespSend = 0x2 => "RESP_SEND",
        /// `MLX5_CQE_RESP_SEND_IMM`.
        RespSendImm = 0x3 => "RESP_SEND_IMM",
        /// `MLX5_CQE_REQ_ERR`: a send WQE failed.
        ReqErr = 0xd => "REQ_ERR",
        /// `MLX5_CQE_RESP_ERR`: a receive WQE failed.
        RespErr = 0xe => "RESP_ERR",
        /// `MLX5_CQE_INVALID`: not written by the device.
        Invalid = 0xf => "INVALID",
    }
}

wire_enum! {
    /// The syndrome of an error CQE (`MLX5_CQE_SYNDROME_*`), byte 55.
    pub enum CqeSyndrome: u8, field = "CQE syndrome" {
        /// A message longer than the receive buffer or `log_msg_max`.
        LocalLengthErr = 0x01 => "LOCAL_LENGTH_ERR",
        /// A malformed WQE (bad opcode, segment count, QP number).
        LocalQpOpErr = 0x02 => "LOCAL_QP_OP_ERR",
        /// A bad lkey, or a range outside the lkey's mkey.
        LocalProtErr = 0x04 => "LOCAL_PROT_ERR",
        /// The WQE was flushed: its QP is in the error state.
        WrFlushErr = 0x05 => "WR_FLUSH_ERR",
        /// A local buffer address that is not mapped for DMA.
        LocalAccessErr = 0x11 => "LOCAL_ACCESS_ERR",
        /// The peer refused the request (no receive WQE, operation not enabled).
        RemoteInvalReqErr = 0x12 => "REMOTE_INVAL_REQ_ERR",
        /// A bad rkey, a range outside it, or a remote address not mapped.
        RemoteAccessErr = 0x13 => "REMOTE_ACCESS_ERR",
        /// The peer could not carry out the request (its function is frozen).
        RemoteOpErr = 0x14 => "REMOTE_OP_ERR",
        /// No peer QP answers at the path and QPN.
        TransportRetryExcErr = 0x15 => "TRANSPORT_RETRY_EXC_ERR",
        /// The peer had no receive WQE posted for a SEND.
        RnrRetryExcErr = 0x16 => "RNR_RETRY_EXC_ERR",
    }
}

/// A successful CQE (`mlx5_cqe64`, the fields this device fills), 64 bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Cqe {
    /// 0x00 reserved / offload fields.
    pub rsvd0: [u8; 0x24],
    /// 0x24 `immediate`.
    pub imm: U32<BigEndian>,
    /// 0x28 reserved.
    pub rsvd1: [u8; 4],
    /// 0x2c `byte_cnt`: bytes moved (responder: bytes received; RDMA_READ: bytes read).
    pub byte_cnt: U32<BigEndian>,
    /// 0x30 `timestamp`.
    pub timestamp: U64<BigEndian>,
    /// 0x38 `sop_drop_qpn`: QP number (23:0).
    pub sop_drop_qpn: U32<BigEndian>,
    /// 0x3c `wqe_counter`: index of the completed WQE.
    pub wqe_counter: U16<BigEndian>,
    /// 0x3e `signature`.
    pub signature: u8,
    /// 0x3f `op_own`: [`CqeOpcode`] (7:4), owner (0).
    pub op_own: u8,
}

/// An error CQE (`mlx5_err_cqe`), 64 bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ErrCqe {
    /// 0x00 reserved.
    pub rsvd0: [u8; 32],
    /// 0x20 `srqn`.
    pub srqn: U32<BigEndian>,
    /// 0x24 reserved.
    pub rsvd1: [u8; 18],
    /// 0x36 `vendor_err_synd`: this device's reason within the syndrome.
    pub vendor_err_synd: u8,
    /// 0x37 `syndrome`: [`CqeSyndrome`].
    pub syndrome: u8,
    /// 0x38 `s_wqe_opcode_qpn`: the WQE's opcode (31:24), QP number (23:0).
    pub s_wqe_opcode_qpn: U32<BigEndian>,
    /// 0x3c `wqe_counter`.
    pub wqe_counter: U16<BigEndian>,
    /// 0x3e `signature`.
    pub signature: u8,
    /// 0x3f `op_own`.
    pub op_own: u8,
}

/// `op_own` of a CQE with `opcode` written at producer index `pi` of a ring of
/// 2^`log_size` entries (owner bit = `(pi >> log_size) & 1`).
pub const fn op_own(opcode: CqeOpcode, pi: u32, log_size: u8) -> u8 {
    ((opcode as u8) << 4) | ((pi >> log_size) & 1) as u8
}

/// Whether the CQE whose `op_own` is `op_own` at consumer index `ci` of a ring of
/// 2^`log_size` entries belongs to software (the device wrote it in this pass).
pub const fn cqe_is_sw_owned(op_own: u8, ci: u32, log_size: u8) -> bool {
    (op_own >> 4) != CqeOpcode::Invalid as u8 && (op_own & 1) as u32 == (ci >> log_size) & 1
}

/// Reasons inside one [`CqeSyndrome`], written to `vendor_err_synd` so a test can tell
/// them apart.
pub mod vendor_synd {
    /// The lkey/rkey names no mkey, a mkey of another PD, or the wrong variant byte.
    pub const BAD_KEY: u8 = 0x01;
    /// The range is outside the mkey.
    pub const OUT_OF_MKEY: u8 = 0x02;
    /// The translated IOVA is not mapped for DMA.
    pub const UNMAPPED: u8 = 0x03;
    /// The WQE's opcode is unknown or not supported.
    pub const BAD_OPCODE: u8 = 0x04;
    /// `ds` is 0, too small for the opcode, or above [`super::MAX_WQE_DS`] / the ring.
    pub const BAD_DS: u8 = 0x05;
    /// The control segment names another QP.
    pub const BAD_QPN: u8 = 0x06;
    /// The message is longer than `log_msg_max` or the receive buffers.
    pub const TOO_LONG: u8 = 0x07;
    /// The peer has no receive WQE posted.
    pub const NO_RECV: u8 = 0x08;
    /// The peer QP does not allow the operation (`rwe` / `rre`) or is not ready.
    pub const NOT_ENABLED: u8 = 0x09;
    /// The peer function is responder-suspended: the write is refused (a P2P race
    /// violation).
    pub const PEER_FROZEN: u8 = 0x0a;
    /// No QP at the path and remote QPN.
    pub const NO_PEER: u8 = 0x0b;
    /// Inline data segments are not supported.
    pub const INLINE: u8 = 0x0c;
    /// The QP went to the error state with the WQE outstanding.
    pub const FLUSHED: u8 = 0x0d;
    /// The doorbell record's send counter is more than a ring ahead of the device.
    pub const OVERRUN: u8 = 0x0e;
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn segment_and_cqe_layouts_match_the_kernel() {
        assert_eq!(size_of::<CtrlSeg>(), WQE_DS);
        assert_eq!(size_of::<RaddrSeg>(), WQE_DS);
        assert_eq!(size_of::<DataSeg>(), WQE_DS);
        assert_eq!(size_of::<Cqe>(), CQE_LEN);
        assert_eq!(size_of::<ErrCqe>(), CQE_LEN);
        assert_eq!(offset_of!(Cqe, byte_cnt), 0x2c);
        assert_eq!(offset_of!(Cqe, sop_drop_qpn), 0x38);
        assert_eq!(offset_of!(Cqe, wqe_counter), 0x3c);
        assert_eq!(offset_of!(Cqe, op_own), CQE_OP_OWN_OFFSET);
        assert_eq!(offset_of!(ErrCqe, syndrome), 0x37);
        assert_eq!(offset_of!(ErrCqe, vendor_err_synd), 0x36);
        assert_eq!(offset_of!(ErrCqe, s_wqe_opcode_qpn), 0x38);
        assert_eq!(offset_of!(CtrlSeg, fm_ce_se), 11);
    }

    #[test]
    fn control_segment_packs_index_opcode_qpn_ds() {
        let c = CtrlSeg::new(WqeOpcode::RdmaWrite, 0x1234, 0xab_cdef, 3, true);
        assert_eq!(
            c.as_bytes()[..8],
            [0, 0x12, 0x34, 0x08, 0xab, 0xcd, 0xef, 3]
        );
        assert_eq!(
            (c.opcode(), c.wqe_index(), c.qpn(), c.ds()),
            (8, 0x1234, 0xab_cdef, 3)
        );
        assert!(c.signaled());
        assert_eq!(c.as_bytes()[11], CTRL_CQ_UPDATE);
    }

    #[test]
    fn owner_bit_flips_each_pass() {
        assert_eq!(op_own(CqeOpcode::Req, 0, 2), 0x00);
        assert_eq!(op_own(CqeOpcode::Req, 4, 2), 0x01);
        assert_eq!(op_own(CqeOpcode::ReqErr, 5, 2), 0xd1);
        assert!(!cqe_is_sw_owned(CQE_INIT_OP_OWN, 0, 2));
        assert!(cqe_is_sw_owned(op_own(CqeOpcode::Req, 0, 2), 0, 2));
        assert!(!cqe_is_sw_owned(op_own(CqeOpcode::Req, 0, 2), 4, 2));
        assert!(cqe_is_sw_owned(op_own(CqeOpcode::Req, 4, 2), 4, 2));
    }
}
