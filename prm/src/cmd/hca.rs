//! HCA life-cycle commands: ENABLE/DISABLE_HCA, INIT/TEARDOWN_HCA, QUERY/SET_ISSI,
//! SET_DRIVER_VERSION, QUERY_ADAPTER [IFC `enable_hca_in`, `init_hca_in`,
//! `teardown_hca_in/out`, `query_issi_out`, `set_issi_in`, `set_driver_version_in`,
//! `query_adapter_out`, `query_adapter_param_block`]; mlx5-device.md §4.1.
//!
//! Lengths are whole messages in bytes (16 inline header bytes included); fields are
//! bit offsets in the whole message.

use crate::ifc::Field;

/// `enable_hca_in` / `disable_hca_in`: 16 bytes.
pub const ENABLE_HCA_IN_LEN: usize = 16;
/// `enable_hca_out`: 12 bytes in the current IFC (`reserved_at_40[0x20]`); older
/// kernels sent 16. A device accepts either.
pub const ENABLE_HCA_OUT_LEN: usize = 12;
/// `disable_hca_in`: same layout as enable.
pub const DISABLE_HCA_IN_LEN: usize = 16;
/// `disable_hca_out`.
pub const DISABLE_HCA_OUT_LEN: usize = 12;
/// `embedded_cpu_function` (enable/disable in, bit 0x40: byte 8 bit 7).
pub const ENABLE_HCA_IN_EMBEDDED_CPU_FUNCTION: Field = Field::new(0x40, 1);
/// `function_id_type` (newest header, bit 0x43).
pub const ENABLE_HCA_IN_FUNCTION_ID_TYPE: Field = Field::new(0x43, 1);
/// `function_id`, bytes 10–11 (0 = self).
pub const ENABLE_HCA_IN_FUNCTION_ID: Field = Field::new(0x50, 16);

/// `init_hca_in`: 32 bytes.
pub const INIT_HCA_IN_LEN: usize = 32;
/// `init_hca_out`.
pub const INIT_HCA_OUT_LEN: usize = 16;
/// `sw_vhca_id`, bit 0x62, 14 bits (bytes 12–13).
pub const INIT_HCA_IN_SW_VHCA_ID: Field = Field::new(0x62, 14);
/// `sw_owner_id[4]`: 16 bytes at byte 16.
pub const INIT_HCA_IN_SW_OWNER_ID_OFFSET: usize = 16;
/// Length of `sw_owner_id`.
pub const INIT_HCA_IN_SW_OWNER_ID_LEN: usize = 16;

/// `teardown_hca_in`: 16 bytes.
pub const TEARDOWN_HCA_IN_LEN: usize = 16;
/// `teardown_hca_out`: 16 bytes.
pub const TEARDOWN_HCA_OUT_LEN: usize = 16;
/// `profile`, bytes 10–11.
pub const TEARDOWN_HCA_IN_PROFILE: Field = Field::new(0x50, 16);
/// `state` (force state), byte 15 bit 0: 0 SUCCESS, 1 FAIL.
pub const TEARDOWN_HCA_OUT_STATE: Field = Field::new(0x7f, 1);
/// `MLX5_TEARDOWN_HCA_IN_PROFILE_GRACEFUL_CLOSE`.
pub const TEARDOWN_PROFILE_GRACEFUL_CLOSE: u16 = 0;
/// `MLX5_TEARDOWN_HCA_IN_PROFILE_FORCE_CLOSE`.
pub const TEARDOWN_PROFILE_FORCE_CLOSE: u16 = 1;
/// `MLX5_TEARDOWN_HCA_IN_PROFILE_PREPARE_FAST_TEARDOWN`.
pub const TEARDOWN_PROFILE_PREPARE_FAST_TEARDOWN: u16 = 2;

/// `query_issi_in`: 16 bytes.
pub const QUERY_ISSI_IN_LEN: usize = 16;
/// `query_issi_out`: 112 bytes (0x380 bits), so it needs one output mailbox.
pub const QUERY_ISSI_OUT_LEN: usize = 0x70;
/// `current_issi`, bytes 10–11.
pub const QUERY_ISSI_OUT_CURRENT_ISSI: Field = Field::new(0x50, 16);
/// `supported_issi_dw0`, bytes 0x6c–0x6f: bit n = ISSI n supported.
pub const QUERY_ISSI_OUT_SUPPORTED_ISSI_DW0: Field = Field::new(0x360, 32);

/// `set_issi_in`: 16 bytes.
pub const SET_ISSI_IN_LEN: usize = 16;
/// `set_issi_out`.
pub const SET_ISSI_OUT_LEN: usize = 16;
/// `current_issi`, bytes 10–11.
pub const SET_ISSI_IN_CURRENT_ISSI: Field = Field::new(0x50, 16);

/// `set_driver_version_in`: 80 bytes.
pub const SET_DRIVER_VERSION_IN_LEN: usize = 80;
/// `set_driver_version_out`.
pub const SET_DRIVER_VERSION_OUT_LEN: usize = 16;
/// `driver_version[64]`: ASCII, byte 16.
pub const SET_DRIVER_VERSION_IN_VERSION_OFFSET: usize = 16;
/// Length of `driver_version`.
pub const SET_DRIVER_VERSION_IN_VERSION_LEN: usize = 64;

/// `query_adapter_in`: 16 bytes.
pub const QUERY_ADAPTER_IN_LEN: usize = 16;
/// `query_adapter_out`: 0x110 bytes; the parameter block starts at byte 16.
pub const QUERY_ADAPTER_OUT_LEN: usize = 0x110;
/// `query_adapter_struct.ieee_vendor_id`: 24 bits at bytes 0x29–0x2b.
pub const QUERY_ADAPTER_OUT_IEEE_VENDOR_ID: Field = Field::new(0x148, 24);
/// `vsd_vendor_id`: bytes 0x2e–0x2f.
pub const QUERY_ADAPTER_OUT_VSD_VENDOR_ID: Field = Field::new(0x170, 16);
/// `vsd[208]`: byte 0x30.
pub const QUERY_ADAPTER_OUT_VSD_OFFSET: usize = 0x30;
/// Length of `vsd`.
pub const QUERY_ADAPTER_OUT_VSD_LEN: usize = 208;
/// `vsd_contd_psid[16]`: byte 0x100, the board id (`dev->board_id`).
pub const QUERY_ADAPTER_OUT_PSID_OFFSET: usize = 0x100;
/// Length of `vsd_contd_psid`.
pub const QUERY_ADAPTER_OUT_PSID_LEN: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ifc::{get, set};

    #[test]
    fn sizes_match_the_ifc() {
        assert_eq!(QUERY_ISSI_OUT_LEN, 0x380 / 8);
        assert_eq!(
            QUERY_ISSI_OUT_SUPPORTED_ISSI_DW0.end_byte(),
            QUERY_ISSI_OUT_LEN
        );
        assert_eq!(
            INIT_HCA_IN_SW_OWNER_ID_OFFSET + INIT_HCA_IN_SW_OWNER_ID_LEN,
            INIT_HCA_IN_LEN
        );
        assert_eq!(
            SET_DRIVER_VERSION_IN_VERSION_OFFSET + SET_DRIVER_VERSION_IN_VERSION_LEN,
            SET_DRIVER_VERSION_IN_LEN
        );
        assert_eq!(
            QUERY_ADAPTER_OUT_PSID_OFFSET + QUERY_ADAPTER_OUT_PSID_LEN,
            QUERY_ADAPTER_OUT_LEN
        );
        assert_eq!(
            QUERY_ADAPTER_OUT_VSD_OFFSET + QUERY_ADAPTER_OUT_VSD_LEN,
            QUERY_ADAPTER_OUT_PSID_OFFSET
        );
        assert_eq!(TEARDOWN_HCA_OUT_STATE.end_byte(), TEARDOWN_HCA_OUT_LEN);
        assert!(ENABLE_HCA_IN_FUNCTION_ID.end_byte() <= ENABLE_HCA_IN_LEN);
    }

    #[test]
    fn byte_positions_match_the_sheet() {
        let mut m = [0u8; QUERY_ADAPTER_OUT_LEN];
        set(&mut m, QUERY_ADAPTER_OUT_IEEE_VENDOR_ID, 0x02c9);
        assert_eq!(&m[0x29..0x2c], &[0x00, 0x02, 0xc9]);
        set(&mut m, QUERY_ADAPTER_OUT_VSD_VENDOR_ID, 0x15b3);
        assert_eq!(&m[0x2e..0x30], &[0x15, 0xb3]);
        let mut q = [0u8; QUERY_ISSI_OUT_LEN];
        set(&mut q, QUERY_ISSI_OUT_SUPPORTED_ISSI_DW0, 3);
        assert_eq!(q[0x6f], 3);
        set(&mut q, QUERY_ISSI_OUT_CURRENT_ISSI, 1);
        assert_eq!(&q[10..12], &[0, 1]);
        let mut i = [0u8; INIT_HCA_IN_LEN];
        set(&mut i, INIT_HCA_IN_SW_VHCA_ID, 0x3fff);
        assert_eq!(&i[12..14], &[0x3f, 0xff]);
        let mut t = [0u8; 16];
        set(&mut t, TEARDOWN_HCA_OUT_STATE, 1);
        assert_eq!(t[15], 1);
        set(&mut t, ENABLE_HCA_IN_EMBEDDED_CPU_FUNCTION, 1);
        assert_eq!(t[8], 0x80);
        set(&mut t, ENABLE_HCA_IN_FUNCTION_ID, 0x1234);
        assert_eq!(get(&t, TEARDOWN_HCA_IN_PROFILE), 0x1234);
    }
}
