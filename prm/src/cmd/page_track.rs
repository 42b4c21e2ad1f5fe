//! The PAGE_TRACK general object (dirty page tracking of a function's DMA writes) and
//! the general-object commands that carry it [IFC `general_obj_in_cmd_hdr`,
//! `general_obj_out_cmd_hdr`, `page_track`, `page_track_range`,
//! `page_track_report_entry`, `create/modify_page_track_obj_in`,
//! `adv_virtualization_cap`, `mlx5_eqe_obj_change`]; kernel-mlx5vf.md §5.
//!
//! CREATE_GENERAL_OBJECT (0xa00), MODIFY (0xa01), QUERY (0xa02) and DESTROY (0xa03)
//! begin with the 16-byte general object header (opcode, uid, `obj_type`, `obj_id`);
//! CREATE and MODIFY carry the object context after it, QUERY returns it after the
//! 16-byte output header. A page tracker names the tracked function by `vhca_id`, the
//! IOVA ranges it watches (`track_range[num_ranges]` after the context), its page
//! size and the QP the firmware sends its reports from (`reporting_qpn`). MODIFY to
//! REPORTING with a range makes the firmware SEND the dirty page addresses of that
//! range (8-byte [`REPORT_ENTRY_LEN`] entries, at most 2^`log_msg_size` bytes a
//! message) to the QP connected to `reporting_qpn`, each message with the tracker's
//! state in the top 4 bits of its immediate ([`REPORT_IMM_STATE_SHIFT`]); the last
//! carries TRACKING (or ERROR) and ends the report.

use crate::ifc::Field;

/// `MLX5_OBJ_TYPE_PAGE_TRACK`.
pub const OBJ_TYPE_PAGE_TRACK: u16 = 0x46;

/// `general_obj_in_cmd_hdr`: 16 bytes (the whole input of QUERY and DESTROY).
pub const GENERAL_OBJ_IN_HDR_LEN: usize = 16;
/// `general_obj_out_cmd_hdr`: 16 bytes (the whole output of CREATE, MODIFY, DESTROY).
pub const GENERAL_OBJ_OUT_HDR_LEN: usize = 16;
/// `obj_type` of the input header, bytes 6–7 (where other commands have `op_mod`).
pub const GENERAL_OBJ_IN_OBJ_TYPE: Field = Field::new(0x30, 16);
/// `obj_id` of the input header, bytes 8–11 (MODIFY, QUERY, DESTROY).
pub const GENERAL_OBJ_IN_OBJ_ID: Field = Field::new(0x40, 32);
/// `obj_id` of the output header, bytes 8–11 (CREATE's answer).
pub const GENERAL_OBJ_OUT_OBJ_ID: Field = Field::new(0x40, 32);

/// Bit where the object context starts in the CREATE/MODIFY input and the QUERY
/// output (byte 16).
pub const PAGE_TRACK_CTX_BIT: u32 = 0x80;
/// Bytes of the `page_track` context without its range list.
pub const PAGE_TRACK_CTX_LEN: usize = 0x30;
/// `create_page_track_obj_in` / `modify_page_track_obj_in` without the range list.
pub const PAGE_TRACK_IN_LEN: usize = GENERAL_OBJ_IN_HDR_LEN + PAGE_TRACK_CTX_LEN;
/// `query_page_track_obj_out`.
pub const QUERY_PAGE_TRACK_OUT_LEN: usize = GENERAL_OBJ_OUT_HDR_LEN + PAGE_TRACK_CTX_LEN;
/// Bytes of one `page_track_range` (start_address, length).
pub const PAGE_TRACK_RANGE_LEN: usize = 16;

/// Fields of the `page_track` context, bit offsets inside it ([`in_msg`] places one in
/// a message).
pub mod ctx {
    use crate::ifc::Field;

    /// `modify_field_select`: which fields a MODIFY changes ([`super::MODIFY_STATE`],
    /// [`super::MODIFY_RANGE`]).
    pub const MODIFY_FIELD_SELECT: Field = Field::new(0x00, 64);
    /// `vhca_id`: the tracked function.
    pub const VHCA_ID: Field = Field::new(0x50, 16);
    /// `state`: [`super::PageTrackState`].
    pub const STATE: Field = Field::new(0x80, 4);
    /// `track_type` ([`super::TRACK_TYPE_DMA_WRITE`]).
    pub const TRACK_TYPE: Field = Field::new(0x84, 4);
    /// `log_addr_space_size`: log2 of the tracked address space (total range length
    /// rounded up to a power of two).
    pub const LOG_ADDR_SPACE_SIZE: Field = Field::new(0x88, 8);
    /// `log_page_size`: the tracking granule, 2^this bytes.
    pub const LOG_PAGE_SIZE: Field = Field::new(0x93, 5);
    /// `log_msg_size`: report messages are at most 2^this bytes.
    pub const LOG_MSG_SIZE: Field = Field::new(0x9b, 5);
    /// `reporting_qpn`: the QP the firmware sends reports from.
    pub const REPORTING_QPN: Field = Field::new(0xa8, 24);
    /// `num_ranges`: entries of `track_range` after the context.
    pub const NUM_RANGES: Field = Field::new(0xd8, 8);
    /// `range_start_address` (MODIFY to REPORTING: the range to report).
    pub const RANGE_START_ADDRESS: Field = Field::new(0x100, 64);
    /// `length` of that range.
    pub const LENGTH: Field = Field::new(0x140, 64);
    /// `track_range[0].start_address` (element i: `.nth(2 * i)`, or [`super::range_start`]).
    pub const TRACK_RANGE_START: Field = Field::new(0x180, 64);
}

/// A context field placed in the CREATE/MODIFY input or QUERY output.
pub const fn in_msg(f: Field) -> Field {
    f.offset(PAGE_TRACK_CTX_BIT)
}

/// `track_range[i].start_address` in a CREATE input, or `None` on overflow.
pub fn range_start(i: usize) -> Option<Field> {
    in_msg(ctx::TRACK_RANGE_START).nth(i.checked_mul(2)?)
}

/// `track_range[i].length` in a CREATE input, or `None` on overflow.
pub fn range_length(i: usize) -> Option<Field> {
    in_msg(ctx::TRACK_RANGE_START).nth(i.checked_mul(2)?.checked_add(1)?)
}

/// Input length of CREATE with `num_ranges` ranges.
pub const fn create_in_len(num_ranges: usize) -> usize {
    PAGE_TRACK_IN_LEN + num_ranges * PAGE_TRACK_RANGE_LEN
}

/// `modify_field_select` bit: MODIFY changes `state`.
pub const MODIFY_STATE: u64 = 0x1;
/// `modify_field_select` bit: MODIFY carries `range_start_address` / `length`.
pub const MODIFY_RANGE: u64 = 0x2;
/// The one `track_type` mlx5vf sets: DMA writes of the function.
pub const TRACK_TYPE_DMA_WRITE: u8 = 1;

wire_enum! {
    /// `page_track.state` (`MLX5_PAGE_TRACK_STATE_*`).
    pub enum PageTrackState: u8, field = "page tracker state" {
        /// Marking pages.
        Tracking = 0 => "TRACKING",
        /// Sending a report.
        Reporting = 1 => "REPORTING",
        /// `MLX5_PAGE_TRACK_STATE_ERROR`: dirty pages were lost; every later report
        /// fails until the tracker is destroyed.
        Failed = 2 => "ERROR",
    }
}

/// Bytes of one `page_track_report_entry`: `dirty_address_high`, `dirty_address_low`
/// (together the big-endian page address).
pub const REPORT_ENTRY_LEN: usize = 8;
/// The tracker state sits in bits 31:28 of a report message's immediate data.
pub const REPORT_IMM_STATE_SHIFT: u32 = 28;

/// The immediate of a report message sent in `state`.
pub const fn report_imm(state: PageTrackState) -> u32 {
    (state as u32) << REPORT_IMM_STATE_SHIFT
}

/// The tracker state a report message's immediate carries (raw: convert with
/// `PageTrackState::try_from`).
pub const fn imm_state(imm: u32) -> u8 {
    (imm >> REPORT_IMM_STATE_SHIFT) as u8
}

/// `MLX5_EVENT_TYPE_OBJECT_CHANGE`: a general object changed state (the page tracker
/// left REPORTING).
pub const EVENT_TYPE_OBJECT_CHANGE: u8 = 0x27;
/// `data.obj_change.obj_type` of the EQE: be16 at byte 34.
pub const EQE_OBJ_CHANGE_OBJ_TYPE: Field = Field::new(0x110, 16);
/// `data.obj_change.obj_id` of the EQE: be32 at byte 36.
pub const EQE_OBJ_CHANGE_OBJ_ID: Field = Field::new(0x120, 32);

/// Fields of the ADV_VIRTUALIZATION capability page (`adv_virtualization_cap`), bit
/// offsets inside the page. mlx5_core reads it when GENERAL `adv_virtualization` is
/// set; mlx5vf sizes its tracker from it.
pub mod adv_virt_cap {
    use crate::ifc::Field;

    /// log2 of the PAGE_TRACK objects the device holds.
    pub const PG_TRACK_LOG_MAX_NUM: Field = Field::new(0x03, 5);
    /// Ranges one tracker takes (mlx5vf merges ranges down to this).
    pub const PG_TRACK_MAX_NUM_RANGE: Field = Field::new(0x08, 8);
    /// Smallest `log_addr_space_size`.
    pub const PG_TRACK_LOG_MIN_ADDR_SPACE: Field = Field::new(0x10, 8);
    /// Largest `log_addr_space_size`.
    pub const PG_TRACK_LOG_MAX_ADDR_SPACE: Field = Field::new(0x18, 8);
    /// Smallest `log_msg_size`.
    pub const PG_TRACK_LOG_MIN_MSG_SIZE: Field = Field::new(0x23, 5);
    /// Largest `log_msg_size` (mlx5vf uses this one).
    pub const PG_TRACK_LOG_MAX_MSG_SIZE: Field = Field::new(0x2b, 5);
    /// Smallest `log_page_size`.
    pub const PG_TRACK_LOG_MIN_PAGE_SIZE: Field = Field::new(0x33, 5);
    /// Largest `log_page_size`.
    pub const PG_TRACK_LOG_MAX_PAGE_SIZE: Field = Field::new(0x3b, 5);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ifc::{get, set};

    #[test]
    fn page_track_fields_sit_where_the_ifc_puts_them() {
        assert_eq!(PAGE_TRACK_CTX_LEN * 8, 0x180);
        assert_eq!(PAGE_TRACK_IN_LEN, 0x40);
        assert_eq!(create_in_len(2), 0x60);
        let mut m = vec![0u8; create_in_len(2)];
        set(&mut m, GENERAL_OBJ_IN_OBJ_TYPE, OBJ_TYPE_PAGE_TRACK.into());
        set(&mut m, GENERAL_OBJ_IN_OBJ_ID, 0x0102_0304);
        assert_eq!(&m[6..12], &[0, 0x46, 1, 2, 3, 4]);
        set(&mut m, in_msg(ctx::MODIFY_FIELD_SELECT), 3);
        assert_eq!(m[0x17], 3);
        set(&mut m, in_msg(ctx::VHCA_ID), 0x0a0b);
        assert_eq!(&m[0x1a..0x1c], &[0x0a, 0x0b]);
        set(&mut m, in_msg(ctx::STATE), 2);
        set(&mut m, in_msg(ctx::TRACK_TYPE), 1);
        set(&mut m, in_msg(ctx::LOG_ADDR_SPACE_SIZE), 0x22);
        set(&mut m, in_msg(ctx::LOG_PAGE_SIZE), 0x15);
        set(&mut m, in_msg(ctx::LOG_MSG_SIZE), 0x0c);
        assert_eq!(&m[0x20..0x24], &[0x21, 0x22, 0x15, 0x0c]);
        set(&mut m, in_msg(ctx::REPORTING_QPN), 0xab_cdef);
        assert_eq!(&m[0x24..0x28], &[0, 0xab, 0xcd, 0xef]);
        set(&mut m, in_msg(ctx::NUM_RANGES), 2);
        assert_eq!(&m[0x28..0x2c], &[0, 0, 0, 2]);
        set(&mut m, in_msg(ctx::RANGE_START_ADDRESS), 0x1000);
        assert_eq!(&m[0x30..0x38], &0x1000u64.to_be_bytes());
        set(&mut m, in_msg(ctx::LENGTH), 0x2000);
        assert_eq!(&m[0x38..0x40], &0x2000u64.to_be_bytes());
        set(&mut m, range_start(1).unwrap(), 0x5000);
        set(&mut m, range_length(1).unwrap(), 0x6000);
        assert_eq!(&m[0x50..0x58], &0x5000u64.to_be_bytes());
        assert_eq!(&m[0x58..0x60], &0x6000u64.to_be_bytes());
        assert_eq!(get(&m, range_start(1).unwrap()), 0x5000);
        assert_eq!(range_start(usize::MAX), None);
    }

    #[test]
    fn report_immediate_and_event_fields() {
        assert_eq!(report_imm(PageTrackState::Reporting), 0x1000_0000);
        assert_eq!(imm_state(0x2000_0000), 2);
        assert_eq!(PageTrackState::try_from(2), Ok(PageTrackState::Failed));
        assert!(PageTrackState::try_from(3).is_err());
        let mut eqe = [0u8; 64];
        set(&mut eqe, EQE_OBJ_CHANGE_OBJ_TYPE, 0x46);
        set(&mut eqe, EQE_OBJ_CHANGE_OBJ_ID, 7);
        assert_eq!(&eqe[32..40], &[0, 0, 0, 0x46, 0, 0, 0, 7]);
    }

    #[test]
    fn adv_virtualization_caps_follow_the_ifc() {
        use adv_virt_cap as c;
        let mut p = [0u8; 8];
        set(&mut p, c::PG_TRACK_LOG_MAX_NUM, 0x1f);
        set(&mut p, c::PG_TRACK_MAX_NUM_RANGE, 0x10);
        set(&mut p, c::PG_TRACK_LOG_MIN_ADDR_SPACE, 0x0c);
        set(&mut p, c::PG_TRACK_LOG_MAX_ADDR_SPACE, 0x30);
        assert_eq!(&p[..4], &[0x1f, 0x10, 0x0c, 0x30]);
        set(&mut p, c::PG_TRACK_LOG_MIN_MSG_SIZE, 0x0c);
        set(&mut p, c::PG_TRACK_LOG_MAX_MSG_SIZE, 0x10);
        set(&mut p, c::PG_TRACK_LOG_MIN_PAGE_SIZE, 0x0c);
        set(&mut p, c::PG_TRACK_LOG_MAX_PAGE_SIZE, 0x1e);
        assert_eq!(&p[4..], &[0x0c, 0x10, 0x0c, 0x1e]);
    }
}
