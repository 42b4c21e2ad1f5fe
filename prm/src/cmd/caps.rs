//! QUERY_HCA_CAP / SET_HCA_CAP and the capability pages they carry [IFC
//! `query_hca_cap_in/out`, `set_hca_cap_in`, `cmd_hca_cap`, `cmd_hca_cap_2`; DEVICE_H
//! `enum mlx5_cap_type`]; mlx5-device.md §4.1–4.3, kernel-mlx5vf.md §4.2.
//!
//! Message fields are bit offsets in the whole message. Capability fields
//! ([`cmd_hca_cap`], [`cmd_hca_cap_2`]) are bit offsets inside the 4096-byte
//! capability page, which starts at byte [`HCA_CAP_MSG_OFFSET`] of both the
//! QUERY_HCA_CAP output and the SET_HCA_CAP input: read one with
//! `ifc::get(&out[HCA_CAP_MSG_OFFSET..], cmd_hca_cap::VHCA_ID)`.

use crate::ifc::Field;

/// Size of one capability page (`hca_cap_union`, 0x8000 bits).
pub const HCA_CAP_SIZE: usize = 4096;
/// Byte where the capability page starts in QUERY_HCA_CAP out and SET_HCA_CAP in.
pub const HCA_CAP_MSG_OFFSET: usize = 16;

/// `query_hca_cap_in`: 16 bytes.
pub const QUERY_HCA_CAP_IN_LEN: usize = 16;
/// `query_hca_cap_out`: 16 + 4096 = 0x1010 bytes (8 output mailboxes).
pub const QUERY_HCA_CAP_OUT_LEN: usize = HCA_CAP_MSG_OFFSET + HCA_CAP_SIZE;
/// `set_hca_cap_in`: 0x1010 bytes.
pub const SET_HCA_CAP_IN_LEN: usize = HCA_CAP_MSG_OFFSET + HCA_CAP_SIZE;
/// `set_hca_cap_out`: 16 bytes.
pub const SET_HCA_CAP_OUT_LEN: usize = 16;

/// `other_function`, byte 8 bit 7: query/set the function named by `function_id`.
pub const HCA_CAP_IN_OTHER_FUNCTION: Field = Field::new(0x40, 1);
/// `ec_vf_function`, byte 8 bit 6.
pub const HCA_CAP_IN_EC_VF_FUNCTION: Field = Field::new(0x41, 1);
/// `function_id`, bytes 10–11. In this emulator the PF is function 0 and VF n is
/// function n + 1 (the same number as its `vhca_id`).
pub const HCA_CAP_IN_FUNCTION_ID: Field = Field::new(0x50, 16);

/// `op_mod` bit 0 of QUERY_HCA_CAP (`HCA_CAP_OPMOD_GET_CUR` / `_MAX`).
pub const HCA_CAP_OPMOD_MODE_MASK: u16 = 0x1;
/// `op_mod` shift of the capability type.
pub const HCA_CAP_OPMOD_TYPE_SHIFT: u32 = 1;

wire_enum! {
    /// Which limits QUERY_HCA_CAP reads, `op_mod` bit 0.
    pub enum CapMode: u16, field = "capability mode" {
        /// `HCA_CAP_OPMOD_GET_MAX`: what the device can do.
        Max = 0 => "MAX",
        /// `HCA_CAP_OPMOD_GET_CUR`: what is currently enabled.
        Cur = 1 => "CUR",
    }
}

wire_enum! {
    /// Capability page type, `op_mod >> 1` (`enum mlx5_cap_type`, §4.3).
    pub enum CapType: u16, field = "capability type" {
        /// `MLX5_CAP_GENERAL`.
        General = 0x00 => "GENERAL",
        /// `MLX5_CAP_ETHERNET_OFFLOADS`.
        EthernetOffloads = 0x01 => "ETHERNET_OFFLOADS",
        /// `MLX5_CAP_ODP`.
        Odp = 0x02 => "ODP",
        /// `MLX5_CAP_ATOMIC`.
        Atomic = 0x03 => "ATOMIC",
        /// `MLX5_CAP_ROCE`.
        Roce = 0x04 => "ROCE",
        /// `MLX5_CAP_IPOIB_ENHANCED_OFFLOADS`.
        IpoibEnhancedOffloads = 0x06 => "IPOIB_ENHANCED_OFFLOADS",
        /// `MLX5_CAP_FLOW_TABLE`.
        FlowTable = 0x07 => "FLOW_TABLE",
        /// `MLX5_CAP_ESWITCH_FLOW_TABLE`.
        EswitchFlowTable = 0x08 => "ESWITCH_FLOW_TABLE",
        /// `MLX5_CAP_ESWITCH`.
        Eswitch = 0x09 => "ESWITCH",
        /// `MLX5_CAP_QOS`.
        Qos = 0x0c => "QOS",
        /// `MLX5_CAP_DEBUG`.
        Debug = 0x0d => "DEBUG",
        /// `MLX5_CAP_DEV_MEM`.
        DevMem = 0x0f => "DEV_MEM",
        /// `MLX5_CAP_TLS`.
        Tls = 0x11 => "TLS",
        /// `MLX5_CAP_VDPA_EMULATION`.
        VdpaEmulation = 0x13 => "VDPA_EMULATION",
        /// `MLX5_CAP_DEV_EVENT`.
        DevEvent = 0x14 => "DEV_EVENT",
        /// `MLX5_CAP_IPSEC`.
        Ipsec = 0x15 => "IPSEC",
        /// `MLX5_CAP_DEV_SHAMPO`.
        Shampo = 0x1d => "SHAMPO",
        /// `MLX5_CAP_MACSEC`.
        Macsec = 0x1f => "MACSEC",
        /// `MLX5_CAP_GENERAL_2`.
        General2 = 0x20 => "GENERAL_2",
        /// `MLX5_CAP_PORT_SELECTION`.
        PortSelection = 0x25 => "PORT_SELECTION",
        /// `MLX5_CAP_ADV_VIRTUALIZATION`.
        AdvVirtualization = 0x26 => "ADV_VIRTUALIZATION",
    }
}

/// `op_mod` of QUERY_HCA_CAP: `(cap_type << 1) | mode`.
pub const fn query_op_mod(cap_type: CapType, mode: CapMode) -> u16 {
    ((cap_type as u16) << HCA_CAP_OPMOD_TYPE_SHIFT) | mode as u16
}

/// `op_mod` of SET_HCA_CAP: `cap_type << 1`.
pub const fn set_op_mod(cap_type: CapType) -> u16 {
    (cap_type as u16) << HCA_CAP_OPMOD_TYPE_SHIFT
}

/// Splits an `op_mod` into its raw capability type and mode (the type may be unknown:
/// convert with `CapType::try_from`).
pub const fn split_op_mod(op_mod: u16) -> (u16, CapMode) {
    let mode = if op_mod & HCA_CAP_OPMOD_MODE_MASK != 0 {
        CapMode::Cur
    } else {
        CapMode::Max
    };
    (op_mod >> HCA_CAP_OPMOD_TYPE_SHIFT, mode)
}

/// `MLX5_CAP_PORT_TYPE_IB`.
pub const PORT_TYPE_IB: u64 = 0;
/// `MLX5_CAP_PORT_TYPE_ETH`.
pub const PORT_TYPE_ETH: u64 = 1;

/// Fields of `cmd_hca_cap` (the GENERAL page), bit offsets inside the page. Offsets
/// from mlx5-device.md §4.2 (bindgen copy of the current IFC, cross-checked against
/// `reserved_at_*` anchors) unless a line says otherwise.
pub mod cmd_hca_cap {
    use crate::ifc::Field;

    /// 1 → the driver creates no pages EQ.
    pub const PAGE_REQUEST_DISABLE: Field = Field::new(0x006, 1);
    /// `abs_native_port_num`; keep 0.
    pub const ABS_NATIVE_PORT_NUM: Field = Field::new(0x007, 1);
    /// MAX = 1 → the driver queries/sets GENERAL_2.
    pub const HCA_CAP_2: Field = Field::new(0x020, 1);
    /// This function's `vhca_id`.
    pub const VHCA_ID: Field = Field::new(0x030, 16);
    /// DEV_EVENT caps present.
    pub const EVENT_CAP: Field = Field::new(0x090, 1);
    /// `log_max_qp_sz`: largest send/receive queue, log2 entries.
    pub const LOG_MAX_QP_SZ: Field = Field::new(0x088, 8);
    /// `log_max_cq_sz`: largest CQ, log2 CQEs.
    pub const LOG_MAX_CQ_SZ: Field = Field::new(0x0c8, 8);
    /// `log_max_cq`: log2 of the CQs a function may hold.
    pub const LOG_MAX_CQ: Field = Field::new(0x0db, 5);
    /// `log_max_msg`: largest message, log2 bytes.
    pub const LOG_MAX_MSG: Field = Field::new(0x1c3, 5);
    /// log2 of the QP count.
    pub const LOG_MAX_QP: Field = Field::new(0x09b, 5);
    /// log2 of the largest EQ.
    pub const LOG_MAX_EQ_SZ: Field = Field::new(0x0e0, 8);
    /// log2 of the mkey count: `log_max_eq_sz[8]` @0xe0, `relaxed_ordering_write` @0xe8,
    /// `relaxed_ordering_read` @0xe9, `log_max_mkey[6]` @0xea [IFC `cmd_hca_cap_bits`].
    pub const LOG_MAX_MKEY: Field = Field::new(0x0ea, 6);
    /// Fast teardown supported.
    pub const FAST_TEARDOWN: Field = Field::new(0x0fb, 1);
    /// log2 of the EQ count (used if `max_num_eqs` = 0).
    pub const LOG_MAX_EQ: Field = Field::new(0x0fc, 4);
    /// Force teardown supported.
    pub const FORCE_TEARDOWN: Field = Field::new(0x110, 1);
    /// `release_all_pages`; SET mirrors MAX.
    pub const RELEASE_ALL_PAGES: Field = Field::new(0x145, 1);
    /// `cache_line_128byte`; SET mirrors the host.
    pub const CACHE_LINE_128BYTE: Field = Field::new(0x164, 1);
    /// `qcam_reg`; keep 0.
    pub const QCAM_REG: Field = Field::new(0x16f, 1);
    /// `debug`; keep 0.
    pub const DEBUG: Field = Field::new(0x183, 1);
    /// `pkey_table_size`; SET writes 0.
    pub const PKEY_TABLE_SIZE: Field = Field::new(0x190, 16);
    /// eswitch / LAG / MSI-X management.
    pub const VPORT_GROUP_MANAGER: Field = Field::new(0x1a0, 1);
    /// FLOW_TABLE caps, FS init, eth aux device.
    pub const NIC_FLOW_TABLE: Field = Field::new(0x1a6, 1);
    /// eswitch caps / FDB.
    pub const ESWITCH_MANAGER: Field = Field::new(0x1a7, 1);
    /// DEV_MEM caps.
    pub const DEVICE_MEMORY: Field = Field::new(0x1a8, 1);
    /// ACCESS_REG MCAM at query_hca_caps.
    pub const MCAM_REG: Field = Field::new(0x1a9, 1);
    /// ACCESS_REG PCAM at query_hca_caps.
    pub const PCAM_REG: Field = Field::new(0x1aa, 1);
    /// `port_module_event`; keep 0.
    pub const PORT_MODULE_EVENT: Field = Field::new(0x1b0, 1);
    /// 0 IB, 1 ETH ([`super::PORT_TYPE_ETH`]).
    pub const PORT_TYPE: Field = Field::new(0x1b6, 2);
    /// Number of ports.
    pub const NUM_PORTS: Field = Field::new(0x1b8, 8);
    /// PPS event.
    pub const PPS: Field = Field::new(0x1c1, 1);
    /// PPS modify.
    pub const PPS_MODIFY: Field = Field::new(0x1c2, 1);
    /// Temperature warning event.
    pub const TEMP_WARN_EVENT: Field = Field::new(0x1d0, 1);
    /// General notification event.
    pub const GENERAL_NOTIFICATION_EVENT: Field = Field::new(0x1d2, 1);
    /// FPGA.
    pub const FPGA: Field = Field::new(0x1d5, 1);
    /// `pci_sync_for_fw_update_event`; keep 0.
    pub const PCI_SYNC_FOR_FW_UPDATE_EVENT: Field = Field::new(0x1f1, 1);
    /// IPoIB enhanced offloads.
    pub const IPOIB_ENHANCED_OFFLOADS: Field = Field::new(0x203, 1);
    /// `cmdif_checksum`; SET writes 0.
    pub const CMDIF_CHECKSUM: Field = Field::new(0x210, 2);
    /// DC transport.
    pub const DCT: Field = Field::new(0x21a, 1);
    /// QOS caps.
    pub const QOS: Field = Field::new(0x21b, 1);
    /// ETHERNET_OFFLOADS caps, mlx5e.
    pub const ETH_NET_OFFLOADS: Field = Field::new(0x21c, 1);
    /// ROCE caps.
    pub const ROCE: Field = Field::new(0x21d, 1);
    /// ATOMIC caps.
    pub const ATOMIC: Field = Field::new(0x21e, 1);
    /// ODP (`pg`).
    pub const PG: Field = Field::new(0x227, 1);
    /// 4 KiB UAR addressing.
    pub const UAR_4K: Field = Field::new(0x240, 1);
    /// PORT_SELECTION caps.
    pub const PORT_SELECTION_CAP: Field = Field::new(0x250, 1);
    /// BlueFlame.
    pub const BF: Field = Field::new(0x260, 1);
    /// 1 → the driver sends SET_DRIVER_VERSION.
    pub const DRIVER_VERSION: Field = Field::new(0x261, 1);
    /// `mkey_by_name`; keep 0.
    pub const MKEY_BY_NAME: Field = Field::new(0x266, 1);
    /// log2 of the BlueFlame register size.
    pub const LOG_BF_REG_SIZE: Field = Field::new(0x26b, 5);
    /// SHAMPO caps.
    pub const SHAMPO: Field = Field::new(0x2ab, 1);
    /// log2 of the PD count: `reserved_at_320[3]`, `log_max_transport_domain[5]` @0x323,
    /// `reserved_at_328[2]`, `relaxed_ordering_read` @0x32a, `log_max_pd[5]` @0x32b
    /// [IFC `cmd_hca_cap_bits`].
    pub const LOG_MAX_PD: Field = Field::new(0x32b, 5);
    /// `pcie_reset_using_hotreset_method`; keep 0.
    pub const PCIE_RESET_USING_HOTRESET_METHOD: Field = Field::new(0x335, 1);
    /// `pci_sync_for_fw_update_with_driver_unload`; keep 0.
    pub const PCI_SYNC_FOR_FW_UPDATE_WITH_DRIVER_UNLOAD: Field = Field::new(0x336, 1);
    /// `roce_rw_supported`; keep 0.
    pub const ROCE_RW_SUPPORTED: Field = Field::new(0x3a1, 1);
    /// Local loopback unicast disable → MODIFY_NIC_VPORT_CONTEXT at load.
    pub const DISABLE_LOCAL_LB_UC: Field = Field::new(0x3e1, 1);
    /// Local loopback multicast disable → MODIFY_NIC_VPORT_CONTEXT at load.
    pub const DISABLE_LOCAL_LB_MC: Field = Field::new(0x3e2, 1);
    /// VHCA_STATE event.
    pub const VHCA_STATE: Field = Field::new(0x3ea, 1);
    /// General object type bitmap.
    pub const GENERAL_OBJ_TYPES: Field = Field::new(0x400, 64);
    /// log2 of the user context count.
    pub const LOG_MAX_UCTX: Field = Field::new(0x463, 5);
    /// Crypto caps.
    pub const CRYPTO: Field = Field::new(0x469, 1);
    /// IPsec offload caps.
    pub const IPSEC_OFFLOAD: Field = Field::new(0x46a, 1);
    /// EQ count (overrides `log_max_eq` if non-zero).
    pub const MAX_NUM_EQS: Field = Field::new(0x470, 16);
    /// TLS TX.
    pub const TLS_TX: Field = Field::new(0x481, 1);
    /// TLS RX.
    pub const TLS_RX: Field = Field::new(0x482, 1);
    /// `log_uar_page_sz`; SET writes PAGE_SHIFT − 12.
    pub const LOG_UAR_PAGE_SZ: Field = Field::new(0x490, 16);
    /// Device clock in kHz (0 → no HW clock).
    pub const DEVICE_FREQUENCY_KHZ: Field = Field::new(0x4e0, 32);
    /// UARs per page (only with `uar_4k`).
    pub const NUM_OF_UARS_PER_PAGE: Field = Field::new(0x520, 32);
    /// ADV_RDMA caps.
    pub const ADV_RDMA: Field = Field::new(0x571, 1);
    /// ADV_VIRTUALIZATION caps (the page tracker): `reserved_at_570[0x9]`,
    /// `adv_virtualization` @0x579 [IFC "Introduce ifc bits for page tracker"].
    /// mlx5_core then reads the ADV_VIRTUALIZATION page; mlx5vf offers DMA logging.
    pub const ADV_VIRTUALIZATION: Field = Field::new(0x579, 1);
    /// `num_vhca_ports`; SET mirrors MAX.
    pub const NUM_VHCA_PORTS: Field = Field::new(0x610, 8);
    /// INIT_HCA carries `sw_owner_id`.
    pub const SW_OWNER_ID: Field = Field::new(0x61e, 1);
    /// Monitor counters (async event mask).
    pub const MAX_NUM_OF_MONITOR_COUNTERS: Field = Field::new(0x620, 16);
    /// VHCA migration supported: `sf` @0x680, `sf_set_partition`, reserved, `log_max_sf[5]`,
    /// `apu` @0x688, `reserved_at_689[4]`, `migration` @0x68d [IFC `cmd_hca_cap_bits`,
    /// upstream "Introduce migration bits and structures"; kernel-mlx5vf.md §4.2].
    pub const MIGRATION: Field = Field::new(0x68d, 1);
    /// ≠ 0 → "fwctl" auxiliary device.
    pub const UCTX_CAP: Field = Field::new(0x6a0, 32);
}

/// Fields of `cmd_hca_cap_2` (the GENERAL_2 page), bit offsets inside the page
/// [IFC `cmd_hca_cap_2_bits`: `reserved_at_c0[0x8]`, `migration_multi_load` @0xc8,
/// `migration_tracking_state` @0xc9, `reserved_at_ca[0x6]`, `migration_in_chunks`
/// @0xd0 (chunk-mode patch, Sep 2023); kernel-mlx5vf.md §4.2].
pub mod cmd_hca_cap_2 {
    use crate::ifc::Field;

    /// This function can be migrated (`migratable` @0x80, byte 0x10 bit 7): what
    /// mlx5_vfio_pci reads from a VF's GENERAL_2 MAX through the PF before it offers
    /// migration (mlx5-pf.md §4.2 step 6).
    pub const MIGRATABLE: Field = Field::new(0x80, 1);

    /// LOAD_VHCA_STATE may be called more than once (PRE_COPY).
    pub const MIGRATION_MULTI_LOAD: Field = Field::new(0xc8, 1);
    /// SAVE_VHCA_STATE can track state changes (PRE_COPY).
    pub const MIGRATION_TRACKING_STATE: Field = Field::new(0xc9, 1);
    /// Images may be saved in chunks.
    pub const MIGRATION_IN_CHUNKS: Field = Field::new(0xd0, 1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ifc::{get, set};

    #[test]
    fn sizes_match_the_ifc() {
        assert_eq!(QUERY_HCA_CAP_OUT_LEN, 0x1010);
        assert_eq!(SET_HCA_CAP_IN_LEN, 0x1010);
        assert_eq!(HCA_CAP_SIZE * 8, 0x8000);
        assert!(HCA_CAP_IN_FUNCTION_ID.end_byte() <= QUERY_HCA_CAP_IN_LEN);
        for f in [
            cmd_hca_cap::MIGRATION,
            cmd_hca_cap::UCTX_CAP,
            cmd_hca_cap::GENERAL_OBJ_TYPES,
            cmd_hca_cap_2::MIGRATION_IN_CHUNKS,
        ] {
            assert!(f.end_byte() <= HCA_CAP_SIZE);
        }
    }

    #[test]
    fn op_mods_match_the_sheet() {
        assert_eq!(query_op_mod(CapType::General, CapMode::Cur), 0x01);
        assert_eq!(query_op_mod(CapType::General, CapMode::Max), 0x00);
        assert_eq!(query_op_mod(CapType::EthernetOffloads, CapMode::Cur), 0x03);
        assert_eq!(query_op_mod(CapType::DevEvent, CapMode::Cur), 0x29);
        assert_eq!(query_op_mod(CapType::General2, CapMode::Cur), 0x41);
        assert_eq!(query_op_mod(CapType::General2, CapMode::Max), 0x40);
        assert_eq!(set_op_mod(CapType::General), 0);
        assert_eq!(split_op_mod(0x41), (0x20, CapMode::Cur));
        assert_eq!(split_op_mod(0x40), (0x20, CapMode::Max));
        assert_eq!(split_op_mod(0xffff), (0x7fff, CapMode::Cur));
        assert!(CapType::try_from(0x7fff).is_err());
    }

    #[test]
    fn cap_fields_land_on_the_sheet_bytes_and_masks() {
        let mut cap = vec![0u8; HCA_CAP_SIZE];
        let cases: &[(Field, usize, u8)] = &[
            (cmd_hca_cap::PAGE_REQUEST_DISABLE, 0x00, 0x02),
            (cmd_hca_cap::HCA_CAP_2, 0x04, 0x80),
            (cmd_hca_cap::EVENT_CAP, 0x12, 0x80),
            (cmd_hca_cap::FAST_TEARDOWN, 0x1f, 0x10),
            (cmd_hca_cap::FORCE_TEARDOWN, 0x22, 0x80),
            (cmd_hca_cap::RELEASE_ALL_PAGES, 0x28, 0x04),
            (cmd_hca_cap::CACHE_LINE_128BYTE, 0x2c, 0x08),
            (cmd_hca_cap::VPORT_GROUP_MANAGER, 0x34, 0x80),
            (cmd_hca_cap::NIC_FLOW_TABLE, 0x34, 0x02),
            (cmd_hca_cap::ESWITCH_MANAGER, 0x34, 0x01),
            (cmd_hca_cap::DEVICE_MEMORY, 0x35, 0x80),
            (cmd_hca_cap::IPOIB_ENHANCED_OFFLOADS, 0x40, 0x10),
            (cmd_hca_cap::DCT, 0x43, 0x20),
            (cmd_hca_cap::ETH_NET_OFFLOADS, 0x43, 0x08),
            (cmd_hca_cap::ATOMIC, 0x43, 0x02),
            (cmd_hca_cap::PG, 0x44, 0x01),
            (cmd_hca_cap::UAR_4K, 0x48, 0x80),
            (cmd_hca_cap::DRIVER_VERSION, 0x4c, 0x40),
            (cmd_hca_cap::SHAMPO, 0x55, 0x10),
            (cmd_hca_cap::VHCA_STATE, 0x7d, 0x20),
            (cmd_hca_cap::SW_OWNER_ID, 0xc3, 0x02),
            (cmd_hca_cap::MIGRATION, 0xd1, 0x04),
            (cmd_hca_cap_2::MIGRATION_MULTI_LOAD, 0x19, 0x80),
            (cmd_hca_cap_2::MIGRATION_TRACKING_STATE, 0x19, 0x40),
            (cmd_hca_cap_2::MIGRATION_IN_CHUNKS, 0x1a, 0x80),
        ];
        for &(f, byte, mask) in cases {
            cap.fill(0);
            set(&mut cap, f, 1);
            assert_eq!(cap[byte], mask, "{f:?}");
            assert_eq!(cap.iter().filter(|&&b| b != 0).count(), 1, "{f:?}");
        }
        cap.fill(0);
        set(&mut cap, cmd_hca_cap::VHCA_ID, 0x1234);
        assert_eq!(&cap[6..8], &[0x12, 0x34]);
        set(&mut cap, cmd_hca_cap::PORT_TYPE, PORT_TYPE_ETH);
        assert_eq!(cap[0x36], 0x01);
        set(&mut cap, cmd_hca_cap::LOG_MAX_QP, 0x1f);
        assert_eq!(cap[0x13], 0x1f);
        set(&mut cap, cmd_hca_cap::LOG_MAX_EQ, 0xf);
        assert_eq!(cap[0x1f], 0x0f);
        set(&mut cap, cmd_hca_cap::LOG_BF_REG_SIZE, 0x1f);
        assert_eq!(cap[0x4d], 0x1f);
        set(&mut cap, cmd_hca_cap::MAX_NUM_EQS, 0xabcd);
        assert_eq!(&cap[0x8e..0x90], &[0xab, 0xcd]);
        set(&mut cap, cmd_hca_cap::DEVICE_FREQUENCY_KHZ, 0x0102_0304);
        assert_eq!(&cap[0x9c..0xa0], &[1, 2, 3, 4]);
        set(&mut cap, cmd_hca_cap::LOG_MAX_PD, 0x1f);
        assert_eq!(get(&cap, cmd_hca_cap::LOG_MAX_PD), 0x1f);
        assert_eq!(&cap[0x65..0x67], &[0x1f, 0x00]);
    }

    #[test]
    fn in_message_fields() {
        let mut m = [0u8; QUERY_HCA_CAP_IN_LEN];
        set(&mut m, HCA_CAP_IN_OTHER_FUNCTION, 1);
        set(&mut m, HCA_CAP_IN_FUNCTION_ID, 2);
        assert_eq!(m[8], 0x80);
        assert_eq!(&m[10..12], &[0, 2]);
    }
}
