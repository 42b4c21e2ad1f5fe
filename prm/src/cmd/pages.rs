//! QUERY_PAGES and MANAGE_PAGES [IFC `query_pages_in/out`, `manage_pages_in/out`;
//! PAGES `give_pages`, `reclaim_pages`]; mlx5-device.md §4.1.

use crate::ifc::Field;

/// Size of a page the driver gives the firmware (`MLX5_ADAPTER_PAGE_SIZE`).
pub const FW_PAGE_SIZE: u64 = 4096;

/// `query_pages_in`: 16 bytes.
pub const QUERY_PAGES_IN_LEN: usize = 16;
/// `query_pages_out`: 16 bytes.
pub const QUERY_PAGES_OUT_LEN: usize = 16;
/// `embedded_cpu_function`, byte 8 bit 7 (in and out).
pub const QUERY_PAGES_EMBEDDED_CPU_FUNCTION: Field = Field::new(0x40, 1);
/// `function_id`, bytes 10–11 (in and out).
pub const QUERY_PAGES_FUNCTION_ID: Field = Field::new(0x50, 16);
/// `num_pages` (s32), out bytes 12–15.
pub const QUERY_PAGES_OUT_NUM_PAGES: Field = Field::new(0x60, 32);

wire_enum! {
    /// QUERY_PAGES `op_mod` (`MLX5_QUERY_PAGES_IN_OP_MOD_*`).
    pub enum QueryPagesOpMod: u16, field = "QUERY_PAGES op_mod" {
        /// Pages needed before INIT_HCA can start (probe step 8).
        Boot = 1 => "BOOT_PAGES",
        /// Pages needed by INIT_HCA (probe step 16).
        Init = 2 => "INIT_PAGES",
        /// Pages needed at run time.
        Regular = 3 => "REGULAR_PAGES",
    }
}

/// `manage_pages_in` header: 16 bytes, then `pas[]`.
pub const MANAGE_PAGES_IN_LEN: usize = 16;
/// `manage_pages_out` header: 16 bytes, then `pas[]` (TAKE).
pub const MANAGE_PAGES_OUT_LEN: usize = 16;
/// `embedded_cpu_function`, in byte 8 bit 7.
pub const MANAGE_PAGES_IN_EMBEDDED_CPU_FUNCTION: Field = Field::new(0x40, 1);
/// `function_id`, in bytes 10–11.
pub const MANAGE_PAGES_IN_FUNCTION_ID: Field = Field::new(0x50, 16);
/// `input_num_entries`, in bytes 12–15: pages given (GIVE) or wanted back (TAKE).
pub const MANAGE_PAGES_IN_INPUT_NUM_ENTRIES: Field = Field::new(0x60, 32);
/// `pas[0]` of the input (GIVE): a be64 DMA address per 4 KiB page, from byte 16.
/// Element i is `MANAGE_PAGES_IN_PAS.nth(i)`.
pub const MANAGE_PAGES_IN_PAS: Field = Field::new(0x80, 64);
/// `output_num_entries`, out bytes 8–11: pages returned (TAKE).
pub const MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES: Field = Field::new(0x40, 32);
/// `pas[0]` of the output (TAKE), from byte 16.
pub const MANAGE_PAGES_OUT_PAS: Field = Field::new(0x80, 64);
/// Bytes per `pas[]` entry.
pub const PAS_ENTRY_SIZE: usize = 8;

wire_enum! {
    /// MANAGE_PAGES `op_mod` (`MLX5_PAGES_*`).
    pub enum ManagePagesOpMod: u16, field = "MANAGE_PAGES op_mod" {
        /// The driver could not allocate what was asked.
        CantGive = 0 => "CANT_GIVE",
        /// The driver gives `input_num_entries` pages.
        Give = 1 => "GIVE",
        /// The driver takes back up to `input_num_entries` pages.
        Take = 2 => "TAKE",
    }
}

/// Input length of a GIVE of `npages` pages, or `None` on overflow.
pub fn manage_pages_in_len(npages: usize) -> Option<usize> {
    npages
        .checked_mul(PAS_ENTRY_SIZE)?
        .checked_add(MANAGE_PAGES_IN_LEN)
}

/// Output length of a TAKE of `npages` pages, or `None` on overflow.
pub fn manage_pages_out_len(npages: usize) -> Option<usize> {
    npages
        .checked_mul(PAS_ENTRY_SIZE)?
        .checked_add(MANAGE_PAGES_OUT_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ifc::{get, set};

    #[test]
    fn layout_matches_the_sheet() {
        let mut m = vec![0u8; manage_pages_in_len(3).unwrap()];
        assert_eq!(m.len(), 40);
        set(&mut m, MANAGE_PAGES_IN_FUNCTION_ID, 0x0102);
        set(&mut m, MANAGE_PAGES_IN_INPUT_NUM_ENTRIES, 3);
        for i in 0..3 {
            set(
                &mut m,
                MANAGE_PAGES_IN_PAS.nth(i).unwrap(),
                0x1000 * (i as u64 + 1),
            );
        }
        assert_eq!(&m[10..16], &[1, 2, 0, 0, 0, 3]);
        assert_eq!(&m[16..24], &0x1000u64.to_be_bytes());
        assert_eq!(&m[32..40], &0x3000u64.to_be_bytes());
        assert_eq!(
            get(&m, MANAGE_PAGES_IN_PAS.nth(3).unwrap()),
            0,
            "past the end"
        );
        let mut o = [0u8; QUERY_PAGES_OUT_LEN];
        set(&mut o, QUERY_PAGES_OUT_NUM_PAGES, (-5i32) as u32 as u64);
        assert_eq!(&o[12..16], &(-5i32).to_be_bytes());
        set(&mut o, MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES, 7);
        assert_eq!(&o[8..12], &[0, 0, 0, 7]);
        assert_eq!(manage_pages_out_len(usize::MAX), None);
        assert_eq!(QueryPagesOpMod::try_from(2), Ok(QueryPagesOpMod::Init));
        assert_eq!(ManagePagesOpMod::try_from(2), Ok(ManagePagesOpMod::Take));
        assert!(ManagePagesOpMod::try_from(3).is_err());
    }
}
