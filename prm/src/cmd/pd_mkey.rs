//! ALLOC_PD / DEALLOC_PD and CREATE_MKEY / DESTROY_MKEY in MTT access mode [IFC
//! `alloc_pd_out`, `dealloc_pd_in`, `create_mkey_in/out`, `destroy_mkey_in`, `mkc`;
//! mlx5vf `_create_mkey`]; mlx5-device.md §4.1.

use crate::ifc::Field;

/// `alloc_pd_in`: 16 bytes.
pub const ALLOC_PD_IN_LEN: usize = 16;
/// `alloc_pd_out`: 16 bytes.
pub const ALLOC_PD_OUT_LEN: usize = 16;
/// `pd`, out bytes 9–11.
pub const ALLOC_PD_OUT_PD: Field = Field::new(0x48, 24);
/// `dealloc_pd_in`: 16 bytes.
pub const DEALLOC_PD_IN_LEN: usize = 16;
/// `dealloc_pd_out`: 16 bytes.
pub const DEALLOC_PD_OUT_LEN: usize = 16;
/// `pd`, in bytes 9–11.
pub const DEALLOC_PD_IN_PD: Field = Field::new(0x48, 24);

/// `create_mkey_in` without its translation list: 0x110 bytes; the MTT follows.
pub const CREATE_MKEY_IN_LEN: usize = 0x110;
/// `create_mkey_out`: 16 bytes.
pub const CREATE_MKEY_OUT_LEN: usize = 16;
/// `pg_access`, in byte 12 bit 7 (0 for an MTT list).
pub const CREATE_MKEY_IN_PG_ACCESS: Field = Field::new(0x60, 1);
/// `mkey_umem_valid`, in byte 12 bit 6 (0 for an MTT list).
pub const CREATE_MKEY_IN_MKEY_UMEM_VALID: Field = Field::new(0x61, 1);
/// Bit where the mkey context starts in `create_mkey_in` (byte 0x10).
pub const CREATE_MKEY_IN_MKC_BIT: u32 = 0x80;
/// Size of the mkey context.
pub const MKC_SIZE: usize = 64;
/// `translations_octword_actual_size`, in bytes 0x60–0x63.
pub const CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_ACTUAL_SIZE: Field = Field::new(0x300, 32);
/// `klm_pas_mtt[0]`: one be64 DMA address per page, from byte 0x110, padded to an even
/// count. Element i is `CREATE_MKEY_IN_MTT.nth(i)`.
pub const CREATE_MKEY_IN_MTT: Field = Field::new(0x880, 64);
/// Bytes per MTT entry.
pub const MTT_ENTRY_SIZE: usize = 8;
/// `mkey_index`, out bytes 9–11; the key is `mkey_index << 8 | mkey_7_0`.
pub const CREATE_MKEY_OUT_MKEY_INDEX: Field = Field::new(0x48, 24);

/// `destroy_mkey_in`: 16 bytes.
pub const DESTROY_MKEY_IN_LEN: usize = 16;
/// `destroy_mkey_out`: 16 bytes.
pub const DESTROY_MKEY_OUT_LEN: usize = 16;
/// `mkey_index`, in bytes 9–11.
pub const DESTROY_MKEY_IN_MKEY_INDEX: Field = Field::new(0x48, 24);

/// Fields of the mkey context, bit offsets inside it; the `CREATE_MKEY_IN_*` constants
/// below place them in `create_mkey_in`.
pub mod mkc {
    use crate::ifc::Field;

    /// `free`.
    pub const FREE: Field = Field::new(0x01, 1);
    /// `access_mode_4_2`: the high three bits of the access mode.
    pub const ACCESS_MODE_4_2: Field = Field::new(0x03, 3);
    /// `umr_en`.
    pub const UMR_EN: Field = Field::new(0x10, 1);
    /// `a` (atomic).
    pub const A: Field = Field::new(0x11, 1);
    /// `rw` (remote write).
    pub const RW: Field = Field::new(0x12, 1);
    /// `rr` (remote read).
    pub const RR: Field = Field::new(0x13, 1);
    /// `lw` (local write).
    pub const LW: Field = Field::new(0x14, 1);
    /// `lr` (local read).
    pub const LR: Field = Field::new(0x15, 1);
    /// `access_mode_1_0`: the low two bits of the access mode.
    pub const ACCESS_MODE_1_0: Field = Field::new(0x16, 2);
    /// `qpn` (0xffffff = none).
    pub const QPN: Field = Field::new(0x20, 24);
    /// `mkey_7_0`: the variant byte of the key.
    pub const MKEY_7_0: Field = Field::new(0x38, 8);
    /// `length64`: the mkey spans the whole 2^64 space.
    pub const LENGTH64: Field = Field::new(0x60, 1);
    /// `pd`.
    pub const PD: Field = Field::new(0x68, 24);
    /// `start_addr`: first virtual address.
    pub const START_ADDR: Field = Field::new(0x80, 64);
    /// `len`: length of the virtual range in bytes.
    pub const LEN: Field = Field::new(0xc0, 64);
    /// `bsf_octword_size`.
    pub const BSF_OCTWORD_SIZE: Field = Field::new(0x100, 32);
    /// `translations_octword_size` (mkc bytes 52–55): MTT entries / 2, rounded up.
    pub const TRANSLATIONS_OCTWORD_SIZE: Field = Field::new(0x1a0, 32);
    /// `log_page_size` (12 = 4 KiB). 6 bits at 0x1da in current headers; older headers
    /// had `reserved_at_1d9[1]` + 5 bits at 0x1db, which is the same value while the
    /// top bit is 0 [IFC, upstream "log_page_size 6 bits" patch].
    pub const LOG_PAGE_SIZE: Field = Field::new(0x1da, 6);
}

/// mkc `access_mode_4_2` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_ACCESS_MODE_4_2: Field =
    mkc::ACCESS_MODE_4_2.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `access_mode_1_0` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_ACCESS_MODE_1_0: Field =
    mkc::ACCESS_MODE_1_0.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `a` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_A: Field = mkc::A.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `rw` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_RW: Field = mkc::RW.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `rr` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_RR: Field = mkc::RR.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `lw` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_LW: Field = mkc::LW.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `lr` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_LR: Field = mkc::LR.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `qpn` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_QPN: Field = mkc::QPN.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `mkey_7_0` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_MKEY_7_0: Field = mkc::MKEY_7_0.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `length64` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_LENGTH64: Field = mkc::LENGTH64.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `pd` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_PD: Field = mkc::PD.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `start_addr` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_START_ADDR: Field = mkc::START_ADDR.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `len` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_LEN_FIELD: Field = mkc::LEN.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `translations_octword_size` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_SIZE: Field =
    mkc::TRANSLATIONS_OCTWORD_SIZE.offset(CREATE_MKEY_IN_MKC_BIT);
/// mkc `log_page_size` inside `create_mkey_in`.
pub const CREATE_MKEY_IN_LOG_PAGE_SIZE: Field = mkc::LOG_PAGE_SIZE.offset(CREATE_MKEY_IN_MKC_BIT);

/// `MLX5_MKC_ACCESS_MODE_PA`.
pub const ACCESS_MODE_PA: u8 = 0x0;
/// `MLX5_MKC_ACCESS_MODE_MTT`: the mkey maps its range through a page list.
pub const ACCESS_MODE_MTT: u8 = 0x1;
/// `MLX5_MKC_ACCESS_MODE_KLMS`.
pub const ACCESS_MODE_KLMS: u8 = 0x2;
/// `MLX5_MKC_ACCESS_MODE_KSM`.
pub const ACCESS_MODE_KSM: u8 = 0x3;
/// `qpn` meaning "no QP".
pub const MKC_QPN_NONE: u32 = 0x00ff_ffff;

/// The access mode from its two mkc parts.
pub const fn access_mode(mode_4_2: u8, mode_1_0: u8) -> u8 {
    ((mode_4_2 & 0x7) << 2) | (mode_1_0 & 0x3)
}

/// `translations_octword_size` for `npages` MTT entries: `ceil(npages / 2)`.
pub const fn mtt_octwords(npages: usize) -> usize {
    npages.div_ceil(2)
}

/// Input length of CREATE_MKEY with `npages` MTT entries (padded to an even count),
/// or `None` on overflow.
pub fn create_mkey_in_len(npages: usize) -> Option<usize> {
    mtt_octwords(npages)
        .checked_mul(2 * MTT_ENTRY_SIZE)?
        .checked_add(CREATE_MKEY_IN_LEN)
}

/// The 32-bit key: `mkey_index << 8 | mkey_7_0`.
pub const fn mkey_from_index(mkey_index: u32, variant: u8) -> u32 {
    (mkey_index << 8) | variant as u32
}

/// The index part of a key.
pub const fn mkey_to_index(mkey: u32) -> u32 {
    mkey >> 8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ifc::{get, set};

    #[test]
    fn create_mkey_layout_matches_the_sheet() {
        let mut m = vec![0u8; create_mkey_in_len(3).unwrap()];
        assert_eq!(m.len(), 0x110 + 32, "padded to an even MTT count");
        set(
            &mut m,
            CREATE_MKEY_IN_ACCESS_MODE_1_0,
            u64::from(ACCESS_MODE_MTT),
        );
        set(&mut m, CREATE_MKEY_IN_LR, 1);
        set(&mut m, CREATE_MKEY_IN_LW, 1);
        set(&mut m, CREATE_MKEY_IN_RR, 1);
        set(&mut m, CREATE_MKEY_IN_RW, 1);
        // dword 0 of the mkc (message bytes 0x10..0x14): rw rr lw lr = bits 0x12..0x15,
        // access_mode_1_0 = bits 0x16..0x17.
        assert_eq!(&m[0x10..0x14], &[0, 0, 0x3d, 0]);
        set(&mut m, CREATE_MKEY_IN_QPN, u64::from(MKC_QPN_NONE));
        set(&mut m, CREATE_MKEY_IN_MKEY_7_0, 0x42);
        assert_eq!(&m[0x14..0x18], &[0xff, 0xff, 0xff, 0x42]);
        set(&mut m, CREATE_MKEY_IN_PD, 0x12_3456);
        assert_eq!(&m[0x1c..0x20], &[0, 0x12, 0x34, 0x56]);
        set(&mut m, CREATE_MKEY_IN_START_ADDR, 0x1_0000_0000);
        assert_eq!(&m[0x20..0x28], &0x1_0000_0000u64.to_be_bytes());
        set(&mut m, CREATE_MKEY_IN_LEN_FIELD, 3 * 4096);
        assert_eq!(&m[0x28..0x30], &(3u64 * 4096).to_be_bytes());
        set(&mut m, CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_SIZE, 2);
        assert_eq!(&m[0x10 + 52..0x10 + 56], &[0, 0, 0, 2]);
        set(&mut m, CREATE_MKEY_IN_LOG_PAGE_SIZE, 12);
        assert_eq!(&m[0x10 + 56..0x10 + 60], &[0, 0, 0, 12]);
        set(&mut m, CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_ACTUAL_SIZE, 2);
        assert_eq!(&m[0x60..0x64], &[0, 0, 0, 2]);
        set(&mut m, CREATE_MKEY_IN_MTT.nth(2).unwrap(), 0xabc000);
        assert_eq!(&m[0x120..0x128], &0xabc000u64.to_be_bytes());
        assert_eq!(
            access_mode(
                get(&m, CREATE_MKEY_IN_ACCESS_MODE_4_2) as u8,
                get(&m, CREATE_MKEY_IN_ACCESS_MODE_1_0) as u8
            ),
            ACCESS_MODE_MTT
        );
        assert_eq!(MKC_SIZE * 8, 0x200);
        assert!(mkc::LOG_PAGE_SIZE.end_byte() <= MKC_SIZE);
    }

    #[test]
    fn keys_and_indices() {
        assert_eq!(mkey_from_index(5, 0x42), 0x542);
        assert_eq!(mkey_to_index(0x542), 5);
        let mut o = [0u8; 16];
        set(&mut o, CREATE_MKEY_OUT_MKEY_INDEX, 0xab_cdef);
        assert_eq!(&o[8..12], &[0, 0xab, 0xcd, 0xef]);
        assert_eq!(get(&o, DESTROY_MKEY_IN_MKEY_INDEX), 0xab_cdef);
        set(&mut o, ALLOC_PD_OUT_PD, 9);
        assert_eq!(get(&o, DEALLOC_PD_IN_PD), 9);
        assert_eq!(mtt_octwords(0), 0);
        assert_eq!(mtt_octwords(1), 1);
        assert_eq!(mtt_octwords(4), 2);
        assert_eq!(create_mkey_in_len(usize::MAX), None);
    }
}
