//! ALLOC_UAR / DEALLOC_UAR [IFC `alloc_uar_out`, `dealloc_uar_in`; UAR
//! `mlx5_cmd_alloc_uar`]; mlx5-device.md §4.1.

use crate::ifc::Field;

/// Size of one UAR page (`MLX5_ADAPTER_PAGE_SIZE`, the `uar_4k` layout): UAR index i is
/// BAR0 + i × this; the EQ doorbells lie inside it.
pub const UAR_PAGE_SIZE: u64 = 4096;

/// `alloc_uar_in`: 16 bytes.
pub const ALLOC_UAR_IN_LEN: usize = 16;
/// `alloc_uar_out`: 16 bytes.
pub const ALLOC_UAR_OUT_LEN: usize = 16;
/// `uar` index, out bytes 9–11 (24 bits). UAR page i is BAR0 + i × 4 KiB.
pub const ALLOC_UAR_OUT_UAR: Field = Field::new(0x48, 24);
/// `dealloc_uar_in`: 16 bytes.
pub const DEALLOC_UAR_IN_LEN: usize = 16;
/// `dealloc_uar_out`: 16 bytes.
pub const DEALLOC_UAR_OUT_LEN: usize = 16;
/// `uar` index, in bytes 9–11.
pub const DEALLOC_UAR_IN_UAR: Field = Field::new(0x48, 24);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ifc::set;

    #[test]
    fn uar_index_is_bytes_9_to_11() {
        let mut m = [0u8; 16];
        set(&mut m, ALLOC_UAR_OUT_UAR, 0x00ab_cdef);
        assert_eq!(&m[8..12], &[0, 0xab, 0xcd, 0xef]);
        assert_eq!(ALLOC_UAR_OUT_UAR, DEALLOC_UAR_IN_UAR);
        assert!(DEALLOC_UAR_IN_UAR.end_byte() <= DEALLOC_UAR_IN_LEN);
    }
}
