//! The mlx5vf migration stream record header [HDR `struct mlx5_vf_migration_header`];
//! kernel-mlx5vf.md §3.4. Unlike the PRM, this is little-endian host data: mlx5vf writes
//! it into the saving fd.
//!
//! ```text
//! offset 0  le64 record_size   payload bytes that follow
//! offset 8  le32 flags         TAG_MANDATORY 0, TAG_OPTIONAL 1 << 0
//! offset 12 le32 tag           FW_DATA 0, STOP_COPY_SIZE 1 << 0
//! offset 16 record_size bytes
//! ```

use zerocopy::byteorder::{LittleEndian, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 16;
/// `MLX5_MIGF_HEADER_FLAGS_TAG_MANDATORY`: a reader that does not know the tag fails.
pub const FLAGS_TAG_MANDATORY: u32 = 0;
/// `MLX5_MIGF_HEADER_FLAGS_TAG_OPTIONAL`: a reader that does not know the tag skips it.
pub const FLAGS_TAG_OPTIONAL: u32 = 1 << 0;
/// `MLX5_MIGF_HEADER_TAG_FW_DATA`: the payload is one SAVE_VHCA_STATE image.
pub const TAG_FW_DATA: u32 = 0;
/// `MLX5_MIGF_HEADER_TAG_STOP_COPY_SIZE`: the payload is le64 stop-copy buffer size.
pub const TAG_STOP_COPY_SIZE: u32 = 1 << 0;
/// Payload bytes of a STOP_COPY_SIZE record.
pub const STOP_COPY_SIZE_PAYLOAD_LEN: usize = 8;

/// One record header.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RecordHeader {
    /// 0x0 `record_size`.
    pub record_size: U64<LittleEndian>,
    /// 0x8 `flags`.
    pub flags: U32<LittleEndian>,
    /// 0xc `tag`.
    pub tag: U32<LittleEndian>,
}

const _: () = assert!(core::mem::size_of::<RecordHeader>() == RECORD_HEADER_LEN);

impl RecordHeader {
    /// A header announcing `record_size` bytes of `tag` with `flags`.
    pub fn new(record_size: u64, flags: u32, tag: u32) -> Self {
        RecordHeader {
            record_size: U64::new(record_size),
            flags: U32::new(flags),
            tag: U32::new(tag),
        }
    }

    /// A mandatory FW_DATA header for an image of `image_size` bytes.
    pub fn fw_data(image_size: u64) -> Self {
        Self::new(image_size, FLAGS_TAG_MANDATORY, TAG_FW_DATA)
    }

    /// The optional STOP_COPY_SIZE header (its 8-byte payload follows).
    pub fn stop_copy_size() -> Self {
        Self::new(
            STOP_COPY_SIZE_PAYLOAD_LEN as u64,
            FLAGS_TAG_OPTIONAL,
            TAG_STOP_COPY_SIZE,
        )
    }

    /// Parses the first 16 bytes of `b`; `None` if fewer came.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let (h, _) = RecordHeader::read_from_prefix(b).ok()?;
        Some(h)
    }

    /// The 16 bytes.
    pub fn to_bytes(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut out = [0u8; RECORD_HEADER_LEN];
        out.copy_from_slice(self.as_bytes());
        out
    }

    /// Whether a reader may skip this record when it does not know the tag.
    pub fn is_optional(&self) -> bool {
        self.flags.get() & FLAGS_TAG_OPTIONAL != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_16_little_endian_bytes() {
        let h = RecordHeader::fw_data(0x0102_0304_0506);
        assert_eq!(
            h.to_bytes(),
            [6, 5, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let s = RecordHeader::stop_copy_size();
        assert_eq!(
            s.to_bytes(),
            [8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
        );
        assert!(s.is_optional());
        assert!(!h.is_optional());
        assert_eq!(RecordHeader::parse(&s.to_bytes()), Some(s));
        assert_eq!(RecordHeader::parse(&[0u8; 15]), None);
    }
}
