//! CREATE_EQ / DESTROY_EQ, the EQ context, the 64-byte EQE and the EQ doorbell [IFC
//! `create_eq_in/out`, `destroy_eq_in`, `eqc`; DEVICE_H `struct mlx5_eqe`; LEQ
//! `eq_update_ci`]; mlx5-device.md §3.7 and §4.1.

use crate::ifc::Field;

/// `create_eq_in` without its page list: 0x110 bytes; `pas[]` follows.
pub const CREATE_EQ_IN_LEN: usize = 0x110;
/// `create_eq_out`: 16 bytes.
pub const CREATE_EQ_OUT_LEN: usize = 16;
/// Bit where `eq_context_entry` (the eqc) starts in `create_eq_in` (byte 0x10).
pub const CREATE_EQ_IN_EQC_BIT: u32 = 0x80;
/// Size of the eqc.
pub const EQC_SIZE: usize = 64;
/// `event_bitmask[0]` (be64 at byte 0x58); the current IFC has four words, at 0x58,
/// 0x60, 0x68 and 0x70 (before ≈v5.1 only the first).
pub const CREATE_EQ_IN_EVENT_BITMASK: Field = Field::new(0x2c0, 64);
/// Number of `event_bitmask` words in the current IFC.
pub const CREATE_EQ_IN_EVENT_BITMASK_WORDS: usize = 4;
/// `pas[0]`: a be64 DMA address per EQ page, from byte 0x110. Element i is
/// `CREATE_EQ_IN_PAS.nth(i)`.
pub const CREATE_EQ_IN_PAS: Field = Field::new(0x880, 64);
/// `eq_number`, out byte 11.
pub const CREATE_EQ_OUT_EQ_NUMBER: Field = Field::new(0x58, 8);

/// `destroy_eq_in`: 16 bytes.
pub const DESTROY_EQ_IN_LEN: usize = 16;
/// `destroy_eq_out`: 16 bytes.
pub const DESTROY_EQ_OUT_LEN: usize = 16;
/// `eq_number`, in byte 11.
pub const DESTROY_EQ_IN_EQ_NUMBER: Field = Field::new(0x58, 8);

/// Fields of the eqc, bit offsets inside the context; `.offset(CREATE_EQ_IN_EQC_BIT)`
/// places them in `create_eq_in` (the `CREATE_EQ_IN_*` constants below do that).
pub mod eqc {
    use crate::ifc::Field;

    /// `status`.
    pub const STATUS: Field = Field::new(0x00, 4);
    /// `ec`.
    pub const EC: Field = Field::new(0x0d, 1);
    /// `oi` (overrun ignore).
    pub const OI: Field = Field::new(0x0e, 1);
    /// `st`: `MLX5_EQC_ST_ARMED` 0x9, `_FIRED` 0xa.
    pub const ST: Field = Field::new(0x14, 4);
    /// `page_offset` (0).
    pub const PAGE_OFFSET: Field = Field::new(0x54, 6);
    /// log2 of the EQE count (mlx5-device.md: byte 0x1c of the message, low 5 bits).
    pub const LOG_EQ_SIZE: Field = Field::new(0x63, 5);
    /// UAR index whose page holds this EQ's doorbell.
    pub const UAR_PAGE: Field = Field::new(0x68, 24);
    /// MSI-X vector. 12 bits (bits 0xb4–0xbf) in current headers; 8 bits (0xb8) before
    /// ≈2021 (upstream "eqc intr 12 bits" patch). Reading 12 bits is compatible with
    /// old drivers, which leave the upper nibble reserved (0).
    pub const INTR: Field = Field::new(0xb4, 12);
    /// log2 of the EQ page size relative to 4 KiB.
    pub const LOG_PAGE_SIZE: Field = Field::new(0xc3, 5);
    /// `consumer_counter`.
    pub const CONSUMER_COUNTER: Field = Field::new(0x148, 24);
    /// `producer_counter`.
    pub const PRODUCER_COUNTER: Field = Field::new(0x168, 24);
}

/// eqc `log_eq_size` inside `create_eq_in`.
pub const CREATE_EQ_IN_LOG_EQ_SIZE: Field = eqc::LOG_EQ_SIZE.offset(CREATE_EQ_IN_EQC_BIT);
/// eqc `uar_page` inside `create_eq_in`.
pub const CREATE_EQ_IN_UAR_PAGE: Field = eqc::UAR_PAGE.offset(CREATE_EQ_IN_EQC_BIT);
/// eqc `intr` inside `create_eq_in`.
pub const CREATE_EQ_IN_INTR: Field = eqc::INTR.offset(CREATE_EQ_IN_EQC_BIT);
/// eqc `log_page_size` inside `create_eq_in`.
pub const CREATE_EQ_IN_LOG_PAGE_SIZE: Field = eqc::LOG_PAGE_SIZE.offset(CREATE_EQ_IN_EQC_BIT);
/// eqc `page_offset` inside `create_eq_in`.
pub const CREATE_EQ_IN_PAGE_OFFSET: Field = eqc::PAGE_OFFSET.offset(CREATE_EQ_IN_EQC_BIT);

/// Input length of CREATE_EQ with `npas` page addresses, or `None` on overflow.
pub fn create_eq_in_len(npas: usize) -> Option<usize> {
    npas.checked_mul(8)?.checked_add(CREATE_EQ_IN_LEN)
}

/// Base EQ page size: the eqc `log_page_size` is relative to this.
pub const EQ_BASE_PAGE_SIZE: u64 = 4096;
/// Size of one EQE (`MLX5_EQE_SIZE`).
pub const EQE_SIZE: usize = 64;
/// Value the driver initializes every EQE owner byte to (`MLX5_EQE_OWNER_INIT_VAL`).
pub const EQE_OWNER_INIT_VAL: u8 = 1;
/// EQEs of the command EQ (`MLX5_NUM_CMD_EQE`).
pub const NUM_CMD_EQE: usize = 32;
/// Spare EQEs every EQ gets (`MLX5_NUM_SPARE_EQE`); the driver updates CI at least
/// this often.
pub const NUM_SPARE_EQE: usize = 128;

/// EQE `type`, byte 1.
pub const EQE_TYPE: Field = Field::new(0x08, 8);
/// EQE `sub_type`, byte 3.
pub const EQE_SUB_TYPE: Field = Field::new(0x18, 8);
/// Byte where EQE `data` (28 bytes) starts.
pub const EQE_DATA_OFFSET: usize = 32;
/// `data.cmd.vector`: be32 at byte 32, the bitmask of completed command slots.
pub const EQE_CMD_VECTOR: Field = Field::new(0x100, 32);
/// `data.req_pages.ec_function`: be16 at byte 32 (bit 15 EC function, bit 14
/// release-all).
pub const EQE_PAGES_EC_FUNCTION: Field = Field::new(0x100, 16);
/// `data.req_pages.func_id`: be16 at byte 34.
pub const EQE_PAGES_FUNC_ID: Field = Field::new(0x110, 16);
/// `data.req_pages.num_pages`: be32 (s32) at byte 36; > 0 give, < 0 reclaim.
pub const EQE_PAGES_NUM_PAGES: Field = Field::new(0x120, 32);
/// EQE `signature`, byte 62.
pub const EQE_SIGNATURE: Field = Field::new(0x1f0, 8);
/// EQE `owner`, byte 63: the device writes `(pi >> log_eq_size) & 1`.
pub const EQE_OWNER: Field = Field::new(0x1f8, 8);
/// Byte offset of the EQE owner byte.
pub const EQE_OWNER_OFFSET: usize = 63;

/// `MLX5_EVENT_TYPE_COMP`: a completion on an armed CQ (`data.comp.cqn`). Completion
/// events go to the EQ the CQ names (`c_eqn`), not by `event_bitmask`: mlx5_core creates
/// its completion EQs with an all-zero bitmask.
pub const EVENT_TYPE_COMP: u8 = 0x00;
/// `MLX5_EVENT_TYPE_CQ_ERROR`: a CQ overrun or access violation (`data.cq_err`).
pub const EVENT_TYPE_CQ_ERROR: u8 = 0x04;
/// `MLX5_EVENT_TYPE_WQ_CATAS_ERROR`: a QP went to error in a way no CQE reports
/// (`data.qp_srq`).
pub const EVENT_TYPE_WQ_CATAS_ERROR: u8 = 0x05;
/// `MLX5_EVENT_QUEUE_TYPE_QP`: `data.qp_srq.type` of a QP.
pub const EVENT_QUEUE_TYPE_QP: u8 = 0;
/// `data.comp.cqn`: be32 at byte 56 (after six reserved words), bits 23:0.
pub const EQE_COMP_CQN: Field = Field::new(0x1c8, 24);
/// `data.cq_err.cqn`: be32 at byte 32, bits 23:0.
pub const EQE_CQ_ERR_CQN: Field = Field::new(0x108, 24);
/// `data.cq_err.syndrome`: byte 43 (`MLX5_CQ_ERROR_*`).
pub const EQE_CQ_ERR_SYNDROME: Field = Field::new(0x158, 8);
/// `data.qp_srq.type`: byte 52.
pub const EQE_QP_SRQ_TYPE: Field = Field::new(0x1a0, 8);
/// `data.qp_srq.qp_srq_n`: be32 at byte 56, bits 23:0.
pub const EQE_QP_SRQ_N: Field = Field::new(0x1c8, 24);

/// Whether an EQ with `event_bitmask` may be named as a CQ's `c_eqn`: it takes no
/// asynchronous events (bit 0, `EVENT_TYPE_COMP`, may be set or not). mlx5_core's
/// completion EQs have an empty bitmask; its command, pages and async EQs subscribe to
/// asynchronous events and never carry a CQ's completions.
pub fn is_completion_eq(event_bitmask: &[u64]) -> bool {
    event_bitmask
        .iter()
        .enumerate()
        .all(|(i, &w)| if i == 0 { w & !1 == 0 } else { w == 0 })
}

/// `MLX5_EVENT_TYPE_CMD`: command completion.
pub const EVENT_TYPE_CMD: u8 = 0x0a;
/// `MLX5_EVENT_TYPE_PAGE_REQUEST`: the firmware wants pages given or taken.
pub const EVENT_TYPE_PAGE_REQUEST: u8 = 0x0b;

/// The EQE owner the device writes for producer index `pi` on an EQ of
/// 2^`log_eq_size` entries: 0 on the first pass, 1 on the second, ...
pub const fn eqe_owner(pi: u32, log_eq_size: u32) -> u8 {
    if log_eq_size >= 32 {
        0
    } else {
        ((pi >> log_eq_size) & 1) as u8
    }
}

/// Offset in the UAR page of the EQ doorbell that updates the consumer index and arms
/// the EQ (`MLX5_EQ_DOORBEL_OFFSET`).
pub const EQ_DOORBELL_ARM_OFFSET: u32 = 0x40;
/// Offset in the UAR page of the doorbell that updates the consumer index without
/// arming (doorbell + 2 dwords).
pub const EQ_DOORBELL_NOARM_OFFSET: u32 = 0x48;
/// Doorbell value: bits `[23:0]` consumer index.
pub const EQ_DOORBELL_CI_MASK: u32 = 0x00ff_ffff;
/// Doorbell value: bits `[31:24]` EQ number.
pub const EQ_DOORBELL_EQN_SHIFT: u32 = 24;

/// The doorbell word the driver writes: `(ci & 0xffffff) | eqn << 24`.
pub const fn eq_doorbell_value(eqn: u8, ci: u32) -> u32 {
    (ci & EQ_DOORBELL_CI_MASK) | ((eqn as u32) << EQ_DOORBELL_EQN_SHIFT)
}

/// Splits a doorbell word into (eqn, consumer index).
pub const fn split_eq_doorbell(value: u32) -> (u8, u32) {
    (
        (value >> EQ_DOORBELL_EQN_SHIFT) as u8,
        value & EQ_DOORBELL_CI_MASK,
    )
}

// The EQ doorbells lie inside their UAR page.
const _: () = assert!((EQ_DOORBELL_NOARM_OFFSET as u64) + 4 <= super::uar::UAR_PAGE_SIZE);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ifc::{get, set};

    #[test]
    fn create_eq_layout_matches_the_sheet() {
        let mut m = vec![0u8; create_eq_in_len(2).unwrap()];
        assert_eq!(m.len(), 272 + 16);
        set(&mut m, CREATE_EQ_IN_LOG_EQ_SIZE, 0x1f);
        assert_eq!(m[0x1c], 0x1f);
        set(&mut m, CREATE_EQ_IN_UAR_PAGE, 0x00_0003);
        assert_eq!(&m[0x1d..0x20], &[0, 0, 3]);
        set(&mut m, CREATE_EQ_IN_INTR, 0xabc);
        assert_eq!(&m[0x26..0x28], &[0x0a, 0xbc]);
        set(&mut m, CREATE_EQ_IN_LOG_PAGE_SIZE, 0x1f);
        assert_eq!(m[0x28], 0x1f);
        set(&mut m, CREATE_EQ_IN_EVENT_BITMASK, 1 << EVENT_TYPE_CMD);
        assert_eq!(&m[0x58..0x60], &(1u64 << 0x0a).to_be_bytes());
        assert_eq!(
            CREATE_EQ_IN_EVENT_BITMASK
                .nth(CREATE_EQ_IN_EVENT_BITMASK_WORDS - 1)
                .unwrap()
                .byte_off(),
            0x70
        );
        set(&mut m, CREATE_EQ_IN_PAS.nth(1).unwrap(), 0x1234_5000);
        assert_eq!(&m[0x118..0x120], &0x1234_5000u64.to_be_bytes());
        let mut o = [0u8; 16];
        set(&mut o, CREATE_EQ_OUT_EQ_NUMBER, 7);
        assert_eq!(o[11], 7);
        assert_eq!(get(&o, DESTROY_EQ_IN_EQ_NUMBER), 7);
        assert_eq!(EQC_SIZE * 8, 0x200);
        assert_eq!(eqc::PRODUCER_COUNTER.end_byte(), 0x30);
    }

    #[test]
    fn eqe_layout_and_owner_phase() {
        let mut e = [0u8; EQE_SIZE];
        set(&mut e, EQE_TYPE, u64::from(EVENT_TYPE_CMD));
        set(&mut e, EQE_CMD_VECTOR, 0x8000_0001);
        set(&mut e, EQE_OWNER, 1);
        assert_eq!(e[1], 0x0a);
        assert_eq!(&e[32..36], &[0x80, 0, 0, 1]);
        assert_eq!(e[EQE_OWNER_OFFSET], 1);
        set(&mut e, EQE_PAGES_FUNC_ID, 0x0102);
        set(&mut e, EQE_PAGES_NUM_PAGES, 4);
        assert_eq!(&e[34..40], &[1, 2, 0, 0, 0, 4]);
        assert_eq!(eqe_owner(0, 5), 0);
        assert_eq!(eqe_owner(31, 5), 0);
        assert_eq!(eqe_owner(32, 5), 1);
        assert_eq!(eqe_owner(64, 5), 0);
        assert_eq!(eqe_owner(u32::MAX, 40), 0);
    }

    #[test]
    fn completion_and_error_eqes_sit_where_mlx5_eqe_puts_them() {
        let mut e = [0u8; EQE_SIZE];
        set(&mut e, EQE_COMP_CQN, 0xab_cdef);
        assert_eq!(&e[56..60], &[0, 0xab, 0xcd, 0xef]);
        let mut e = [0u8; EQE_SIZE];
        set(&mut e, EQE_CQ_ERR_CQN, 0x12_3456);
        set(&mut e, EQE_CQ_ERR_SYNDROME, 2);
        assert_eq!(&e[32..36], &[0, 0x12, 0x34, 0x56]);
        assert_eq!(e[43], 2);
        let mut e = [0u8; EQE_SIZE];
        set(&mut e, EQE_QP_SRQ_TYPE, 6);
        set(&mut e, EQE_QP_SRQ_N, 0x42);
        assert_eq!(e[52], 6);
        assert_eq!(&e[56..60], &[0, 0, 0, 0x42]);
        assert!(is_completion_eq(&[0, 0, 0, 0]));
        assert!(is_completion_eq(&[1, 0, 0, 0]));
        assert!(!is_completion_eq(&[1 << EVENT_TYPE_CMD, 0, 0, 0]));
        assert!(!is_completion_eq(&[0, 0, 1, 0]));
    }

    #[test]
    fn doorbell_words() {
        assert_eq!(eq_doorbell_value(3, 0x0100_0005), 0x0300_0005);
        assert_eq!(split_eq_doorbell(0x0300_0005), (3, 5));
        assert_eq!(EQ_DOORBELL_NOARM_OFFSET - EQ_DOORBELL_ARM_OFFSET, 8);
    }
}
