//! The migration layouts the driver uses, under the driver's short names.
//!
//! Command layouts come from `mlx5_prm::cmd::migration` and the stream record header
//! from `mlx5_prm::migration_stream` (the emulator half of issue 5); the few limits the
//! PRM crate does not carry (`MAX_NUM_CHUNKS`, the BAD_RES_STATE status byte) are
//! mlx5vf's own and defined here.

use mlx5_prm::cmd::migration as m;
use mlx5_prm::ifc::Field;
use mlx5_prm::migration_stream as s;

pub const SUSPEND_RESUME_IN_LEN: usize = m::SUSPEND_VHCA_IN_LEN;
pub const SUSPEND_RESUME_OUT_LEN: usize = m::SUSPEND_VHCA_OUT_LEN;
pub const VHCA_ID: Field = m::IN_VHCA_ID;
pub const SUSPEND_INITIATOR: u16 = m::SUSPEND_OP_MOD_INITIATOR;
pub const SUSPEND_RESPONDER: u16 = m::SUSPEND_OP_MOD_RESPONDER;
pub const RESUME_RESPONDER: u16 = m::RESUME_OP_MOD_RESPONDER;
pub const RESUME_INITIATOR: u16 = m::RESUME_OP_MOD_INITIATOR;

pub const QUERY_IN_LEN: usize = m::QUERY_VHCA_MIGRATION_STATE_IN_LEN;
pub const QUERY_OUT_LEN: usize = m::QUERY_VHCA_MIGRATION_STATE_OUT_LEN;
pub const QUERY_IN_INCREMENTAL: Field = m::QUERY_VHCA_MIGRATION_STATE_IN_INCREMENTAL;
pub const QUERY_IN_CHUNK: Field = m::QUERY_VHCA_MIGRATION_STATE_IN_CHUNK;
pub const QUERY_OUT_MIGRATION_STATE: Field = m::QUERY_VHCA_MIGRATION_STATE_OUT_MIGRATION_STATE;
pub const QUERY_OUT_REQUIRED_UMEM_SIZE: Field =
    m::QUERY_VHCA_MIGRATION_STATE_OUT_REQUIRED_UMEM_SIZE;
pub const QUERY_OUT_REMAINING_TOTAL_SIZE: Field =
    m::QUERY_VHCA_MIGRATION_STATE_OUT_REMAINING_TOTAL_SIZE;

pub const SAVE_LOAD_IN_LEN: usize = m::SAVE_VHCA_STATE_IN_LEN;
pub const SAVE_OUT_LEN: usize = m::SAVE_VHCA_STATE_OUT_LEN;
pub const LOAD_OUT_LEN: usize = m::LOAD_VHCA_STATE_OUT_LEN;
pub const SAVE_IN_INCREMENTAL: Field = m::SAVE_VHCA_STATE_IN_INCREMENTAL;
pub const SAVE_IN_SET_TRACK: Field = m::SAVE_VHCA_STATE_IN_SET_TRACK;
/// SAVE and LOAD share va/mkey/size positions (checked in the tests below).
pub const SAVE_LOAD_IN_VA: Field = m::SAVE_VHCA_STATE_IN_VA;
pub const SAVE_LOAD_IN_MKEY: Field = m::SAVE_VHCA_STATE_IN_MKEY;
pub const SAVE_LOAD_IN_SIZE: Field = m::SAVE_VHCA_STATE_IN_SIZE;
pub const SAVE_OUT_ACTUAL_IMAGE_SIZE: Field = m::SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE;
pub const SAVE_OUT_NEXT_REQUIRED_UMEM_SIZE: Field = m::SAVE_VHCA_STATE_OUT_NEXT_REQUIRED_UMEM_SIZE;

pub const RECORD_HEADER_LEN: usize = s::RECORD_HEADER_LEN;
pub const FLAGS_TAG_MANDATORY: u32 = s::FLAGS_TAG_MANDATORY;
pub const FLAGS_TAG_OPTIONAL: u32 = s::FLAGS_TAG_OPTIONAL;
pub const TAG_FW_DATA: u32 = s::TAG_FW_DATA;
pub const TAG_STOP_COPY_SIZE: u32 = s::TAG_STOP_COPY_SIZE;
pub const STOP_COPY_SIZE_PAYLOAD: usize = s::STOP_COPY_SIZE_PAYLOAD_LEN;
/// `MAX_LOAD_SIZE` (`BIT_ULL(32) - 1`).
pub const MAX_LOAD_SIZE: u64 = m::MAX_LOAD_SIZE;
/// `MAX_CHUNK_SIZE`: 8 MiB.
pub const MAX_CHUNK_SIZE: u64 = m::MAX_CHUNK_SIZE;
/// mlx5vf's `MAX_NUM_CHUNKS`.
pub const MAX_NUM_CHUNKS: usize = 2;
/// Status `MLX5_CMD_STAT_BAD_RES_STATE_ERR`: a pre-copy SAVE failing with it is
/// recoverable (PRE_COPY_ERROR).
pub const STATUS_BAD_RES_STATE: u8 = 0x9;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_sit_at_the_documented_bytes() {
        assert_eq!(VHCA_ID.byte_off(), 10);
        assert_eq!(QUERY_OUT_REQUIRED_UMEM_SIZE.byte_off(), 16);
        assert_eq!(QUERY_OUT_REMAINING_TOTAL_SIZE.byte_off(), 24);
        assert_eq!(QUERY_OUT_MIGRATION_STATE.byte_off(), 12);
        assert_eq!(SAVE_LOAD_IN_VA.byte_off(), 16);
        assert_eq!(SAVE_LOAD_IN_MKEY.byte_off(), 24);
        assert_eq!(SAVE_LOAD_IN_SIZE.byte_off(), 28);
        assert_eq!(SAVE_LOAD_IN_SIZE.end_byte(), SAVE_LOAD_IN_LEN);
        assert_eq!(SAVE_OUT_ACTUAL_IMAGE_SIZE.byte_off(), 8);
        assert_eq!(SAVE_OUT_NEXT_REQUIRED_UMEM_SIZE.byte_off(), 12);
        assert_eq!(m::LOAD_VHCA_STATE_IN_VA, SAVE_LOAD_IN_VA);
        assert_eq!(m::LOAD_VHCA_STATE_IN_MKEY, SAVE_LOAD_IN_MKEY);
        assert_eq!(m::LOAD_VHCA_STATE_IN_SIZE, SAVE_LOAD_IN_SIZE);
        assert_eq!(m::LOAD_VHCA_STATE_IN_LEN, SAVE_LOAD_IN_LEN);
        assert_eq!(m::RESUME_VHCA_IN_LEN, SUSPEND_RESUME_IN_LEN);
        assert_eq!(MAX_LOAD_SIZE, (1 << 32) - 1);
        let mut b = [0u8; 16];
        mlx5_prm::ifc::set(&mut b, SAVE_IN_INCREMENTAL, 1);
        mlx5_prm::ifc::set(&mut b, SAVE_IN_SET_TRACK, 1);
        assert_eq!(b[8], 0xc0);
    }

    #[test]
    fn stream_header_matches_the_prm_crate() {
        let h = crate::migration::stream::RecordHeader::fw_data(0x1234).encode();
        assert_eq!(
            s::RecordHeader::parse(&h),
            Some(s::RecordHeader::fw_data(0x1234))
        );
        let h = crate::migration::stream::RecordHeader::stop_copy_size().encode();
        assert_eq!(s::RecordHeader::stop_copy_size().to_bytes(), h);
    }
}
