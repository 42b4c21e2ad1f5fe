//! The layouts of our C driver for Linux's VFIO selftests (fixtures/qemu/selftest-driver)
//! come from the `prm` crate, like every other offset in this project: its header
//! `mlx5_prm.h` is generated here from prm's constants, and this test fails when the
//! committed header differs from what prm says today.
//!
//! Regenerate after a change to prm (or to the list below):
//! `MLX5_EMU_BLESS=1 cargo test --test selftest_driver_header`.

use std::fmt::Write as _;
use std::path::PathBuf;

use mlx5_prm::cmd::caps::{self, cmd_hca_cap as cap, CapMode, CapType};
use mlx5_prm::cmd::cq::{self, cqc};
use mlx5_prm::cmd::eq;
use mlx5_prm::cmd::hca;
use mlx5_prm::cmd::pages::{self, ManagePagesOpMod, QueryPagesOpMod};
use mlx5_prm::cmd::pd_mkey as mk;
use mlx5_prm::cmd::qp::{self, ads, qpc};
use mlx5_prm::cmd::uar;
use mlx5_prm::cmdq;
use mlx5_prm::ifc::Field;
use mlx5_prm::iseg;
use mlx5_prm::wqe::{self, CqeOpcode, CqeSyndrome, WqeOpcode};
use mlx5_prm::{CmdInHeader, CmdOutHeader, Opcode};

fn header_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/qemu/selftest-driver/mlx5_prm.h")
}

/// A field of a struct at byte `byte`, `bytes` wide.
const fn bytes_field(byte: usize, bytes: usize) -> Field {
    Field::new((byte * 8) as u32, (bytes * 8) as u32)
}

/// The header's text: every field as `#define MLX5_F_NAME bit_offset, width` (the two
/// arguments of the driver's `mlx5_get` / `mlx5_set`), every constant as a number.
fn header() -> String {
    use core::mem::offset_of;

    let fields: &[(&str, Field)] = &[
        // Command headers [IFC mbox_in / mbox_out].
        ("IN_OPCODE", bytes_field(offset_of!(CmdInHeader, opcode), 2)),
        ("IN_OP_MOD", bytes_field(offset_of!(CmdInHeader, op_mod), 2)),
        (
            "OUT_STATUS",
            bytes_field(offset_of!(CmdOutHeader, status), 1),
        ),
        (
            "OUT_SYNDROME",
            bytes_field(offset_of!(CmdOutHeader, syndrome), 4),
        ),
        // HCA life cycle.
        ("ENABLE_HCA_IN_FUNCTION_ID", hca::ENABLE_HCA_IN_FUNCTION_ID),
        (
            "QUERY_ISSI_OUT_SUPPORTED_ISSI_DW0",
            hca::QUERY_ISSI_OUT_SUPPORTED_ISSI_DW0,
        ),
        ("SET_ISSI_IN_CURRENT_ISSI", hca::SET_ISSI_IN_CURRENT_ISSI),
        ("TEARDOWN_HCA_IN_PROFILE", hca::TEARDOWN_HCA_IN_PROFILE),
        // Pages.
        ("QUERY_PAGES_FUNCTION_ID", pages::QUERY_PAGES_FUNCTION_ID),
        (
            "QUERY_PAGES_OUT_NUM_PAGES",
            pages::QUERY_PAGES_OUT_NUM_PAGES,
        ),
        (
            "MANAGE_PAGES_IN_FUNCTION_ID",
            pages::MANAGE_PAGES_IN_FUNCTION_ID,
        ),
        (
            "MANAGE_PAGES_IN_INPUT_NUM_ENTRIES",
            pages::MANAGE_PAGES_IN_INPUT_NUM_ENTRIES,
        ),
        ("MANAGE_PAGES_IN_PAS", pages::MANAGE_PAGES_IN_PAS),
        (
            "MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES",
            pages::MANAGE_PAGES_OUT_OUTPUT_NUM_ENTRIES,
        ),
        ("MANAGE_PAGES_OUT_PAS", pages::MANAGE_PAGES_OUT_PAS),
        // Capabilities, inside the 4 KiB page at HCA_CAP_MSG_OFFSET.
        ("CAP_VHCA_ID", cap::VHCA_ID),
        ("CAP_LOG_MAX_QP_SZ", cap::LOG_MAX_QP_SZ),
        ("CAP_LOG_MAX_CQ_SZ", cap::LOG_MAX_CQ_SZ),
        ("CAP_LOG_MAX_MSG", cap::LOG_MAX_MSG),
        ("CAP_LOG_BF_REG_SIZE", cap::LOG_BF_REG_SIZE),
        // UAR, PD, mkey.
        ("ALLOC_UAR_OUT_UAR", uar::ALLOC_UAR_OUT_UAR),
        ("DEALLOC_UAR_IN_UAR", uar::DEALLOC_UAR_IN_UAR),
        ("ALLOC_PD_OUT_PD", mk::ALLOC_PD_OUT_PD),
        ("DEALLOC_PD_IN_PD", mk::DEALLOC_PD_IN_PD),
        (
            "CREATE_MKEY_IN_ACCESS_MODE_1_0",
            mk::CREATE_MKEY_IN_ACCESS_MODE_1_0,
        ),
        (
            "CREATE_MKEY_IN_ACCESS_MODE_4_2",
            mk::CREATE_MKEY_IN_ACCESS_MODE_4_2,
        ),
        ("CREATE_MKEY_IN_LR", mk::CREATE_MKEY_IN_LR),
        ("CREATE_MKEY_IN_LW", mk::CREATE_MKEY_IN_LW),
        ("CREATE_MKEY_IN_RR", mk::CREATE_MKEY_IN_RR),
        ("CREATE_MKEY_IN_RW", mk::CREATE_MKEY_IN_RW),
        ("CREATE_MKEY_IN_QPN", mk::CREATE_MKEY_IN_QPN),
        ("CREATE_MKEY_IN_MKEY_7_0", mk::CREATE_MKEY_IN_MKEY_7_0),
        ("CREATE_MKEY_IN_PD", mk::CREATE_MKEY_IN_PD),
        ("CREATE_MKEY_IN_START_ADDR", mk::CREATE_MKEY_IN_START_ADDR),
        ("CREATE_MKEY_IN_LEN", mk::CREATE_MKEY_IN_LEN_FIELD),
        (
            "CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_SIZE",
            mk::CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_SIZE,
        ),
        (
            "CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_ACTUAL_SIZE",
            mk::CREATE_MKEY_IN_TRANSLATIONS_OCTWORD_ACTUAL_SIZE,
        ),
        (
            "CREATE_MKEY_IN_LOG_PAGE_SIZE",
            mk::CREATE_MKEY_IN_LOG_PAGE_SIZE,
        ),
        ("CREATE_MKEY_IN_MTT", mk::CREATE_MKEY_IN_MTT),
        ("CREATE_MKEY_OUT_MKEY_INDEX", mk::CREATE_MKEY_OUT_MKEY_INDEX),
        ("DESTROY_MKEY_IN_MKEY_INDEX", mk::DESTROY_MKEY_IN_MKEY_INDEX),
        // EQ and EQE.
        ("CREATE_EQ_IN_LOG_EQ_SIZE", eq::CREATE_EQ_IN_LOG_EQ_SIZE),
        ("CREATE_EQ_IN_UAR_PAGE", eq::CREATE_EQ_IN_UAR_PAGE),
        ("CREATE_EQ_IN_INTR", eq::CREATE_EQ_IN_INTR),
        ("CREATE_EQ_IN_LOG_PAGE_SIZE", eq::CREATE_EQ_IN_LOG_PAGE_SIZE),
        ("CREATE_EQ_IN_EVENT_BITMASK", eq::CREATE_EQ_IN_EVENT_BITMASK),
        ("CREATE_EQ_IN_PAS", eq::CREATE_EQ_IN_PAS),
        ("CREATE_EQ_OUT_EQ_NUMBER", eq::CREATE_EQ_OUT_EQ_NUMBER),
        ("DESTROY_EQ_IN_EQ_NUMBER", eq::DESTROY_EQ_IN_EQ_NUMBER),
        ("EQE_TYPE", eq::EQE_TYPE),
        ("EQE_OWNER", eq::EQE_OWNER),
        ("EQE_COMP_CQN", eq::EQE_COMP_CQN),
        // CQ.
        ("CQC_LOG_CQ_SIZE", cq::in_msg(cqc::LOG_CQ_SIZE)),
        ("CQC_UAR_PAGE", cq::in_msg(cqc::UAR_PAGE)),
        ("CQC_C_EQN", cq::in_msg(cqc::C_EQN)),
        ("CQC_LOG_PAGE_SIZE", cq::in_msg(cqc::LOG_PAGE_SIZE)),
        ("CQC_DBR_ADDR", cq::in_msg(cqc::DBR_ADDR)),
        ("CQ_PAS", cq::CQ_PAS),
        ("CQ_CQN", cq::CQ_CQN),
        // QP, its context and address path.
        ("QP_QPN", qp::QP_QPN),
        ("QP_PAS", qp::QP_PAS),
        ("QPC_ST", qp::in_msg(qpc::ST)),
        ("QPC_PM_STATE", qp::in_msg(qpc::PM_STATE)),
        ("QPC_PD", qp::in_msg(qpc::PD)),
        ("QPC_MTU", qp::in_msg(qpc::MTU)),
        ("QPC_LOG_MSG_MAX", qp::in_msg(qpc::LOG_MSG_MAX)),
        ("QPC_LOG_SQ_SIZE", qp::in_msg(qpc::LOG_SQ_SIZE)),
        ("QPC_UAR_PAGE", qp::in_msg(qpc::UAR_PAGE)),
        ("QPC_LOG_PAGE_SIZE", qp::in_msg(qpc::LOG_PAGE_SIZE)),
        ("QPC_REMOTE_QPN", qp::in_msg(qpc::REMOTE_QPN)),
        ("QPC_RETRY_COUNT", qp::in_msg(qpc::RETRY_COUNT)),
        ("QPC_RNR_RETRY", qp::in_msg(qpc::RNR_RETRY)),
        ("QPC_CQN_SND", qp::in_msg(qpc::CQN_SND)),
        ("QPC_CQN_RCV", qp::in_msg(qpc::CQN_RCV)),
        ("QPC_RRE", qp::in_msg(qpc::RRE)),
        ("QPC_RWE", qp::in_msg(qpc::RWE)),
        ("QPC_DBR_ADDR", qp::in_msg(qpc::DBR_ADDR)),
        ("QPC_RQ_TYPE", qp::in_msg(qpc::RQ_TYPE)),
        ("ADS_FL", qp::path_in_msg(ads::FL)),
        ("ADS_VHCA_PORT_NUM", qp::path_in_msg(ads::VHCA_PORT_NUM)),
    ];

    let op = |o: Opcode| u64::from(u16::from(o));
    let consts: &[(&str, u64)] = &[
        // Initialization segment (BAR0).
        ("ISEG_FW_REV", iseg::FW_REV_OFFSET),
        ("ISEG_CMDIF_REV_FW_SUB", iseg::CMDIF_REV_FW_SUB_OFFSET),
        ("ISEG_CMDQ_ADDR_H", iseg::CMDQ_ADDR_H_OFFSET),
        ("ISEG_CMDQ_ADDR_L_SZ", iseg::CMDQ_ADDR_L_SZ_OFFSET),
        ("ISEG_CMD_DBELL", iseg::CMD_DBELL_OFFSET),
        ("ISEG_INITIALIZING", iseg::INITIALIZING_OFFSET),
        ("ISEG_HEALTH_SYND", iseg::HEALTH_SYND_OFFSET),
        ("CMDIF_REV", iseg::CMDIF_REV.into()),
        ("CMDIF_REV_SHIFT", iseg::CMDIF_REV_SHIFT.into()),
        ("INITIALIZING_BUSY", iseg::INITIALIZING_BUSY_MASK.into()),
        // Command queue entry and mailbox block.
        ("CMD_ENTRY_SIZE", cmdq::CMD_ENTRY_SIZE as u64),
        ("CMD_XPORT", cmdq::MLX5_PCI_CMD_XPORT.into()),
        ("CMD_OWNER_HW", cmdq::CMD_OWNER_HW.into()),
        ("CMD_DELIVERY_SHIFT", cmdq::DELIVERY_STATUS_SHIFT.into()),
        ("CMD_INLEN", cmdq::CMD_INLEN_OFFSET as u64),
        ("CMD_IN_PTR", cmdq::CMD_IN_PTR_OFFSET as u64),
        ("CMD_IN", cmdq::CMD_IN_OFFSET as u64),
        ("CMD_OUT", cmdq::CMD_OUT_OFFSET as u64),
        ("CMD_OUT_PTR", cmdq::CMD_OUT_PTR_OFFSET as u64),
        ("CMD_OUTLEN", cmdq::CMD_OUTLEN_OFFSET as u64),
        ("CMD_TOKEN", cmdq::CMD_TOKEN_OFFSET as u64),
        ("CMD_SIG", cmdq::CMD_SIG_OFFSET as u64),
        ("CMD_STATUS_OWN", cmdq::CMD_STATUS_OWN_OFFSET as u64),
        ("CMD_INLINE_SIZE", cmdq::INLINE_SIZE as u64),
        ("MAILBOX_DATA_SIZE", cmdq::MAILBOX_DATA_SIZE as u64),
        ("MAILBOX_BLOCK_SIZE", cmdq::MAILBOX_BLOCK_SIZE as u64),
        ("MAILBOX_BLOCK_ALIGN", cmdq::MAILBOX_BLOCK_ALIGN),
        ("BLOCK_CTRL", cmdq::BLOCK_CTRL_OFFSET as u64),
        ("BLOCK_NEXT", cmdq::BLOCK_NEXT_OFFSET as u64),
        ("BLOCK_NUM", cmdq::BLOCK_NUM_OFFSET as u64),
        ("BLOCK_TOKEN", cmdq::BLOCK_TOKEN_OFFSET as u64),
        ("BLOCK_CTRL_SIG", cmdq::BLOCK_CTRL_SIG_OFFSET as u64),
        ("BLOCK_SIG", cmdq::BLOCK_SIG_OFFSET as u64),
        // Opcodes.
        ("CMD_OP_QUERY_HCA_CAP", op(Opcode::QueryHcaCap)),
        ("CMD_OP_INIT_HCA", op(Opcode::InitHca)),
        ("CMD_OP_TEARDOWN_HCA", op(Opcode::TeardownHca)),
        ("CMD_OP_ENABLE_HCA", op(Opcode::EnableHca)),
        ("CMD_OP_DISABLE_HCA", op(Opcode::DisableHca)),
        ("CMD_OP_QUERY_PAGES", op(Opcode::QueryPages)),
        ("CMD_OP_MANAGE_PAGES", op(Opcode::ManagePages)),
        ("CMD_OP_QUERY_ISSI", op(Opcode::QueryIssi)),
        ("CMD_OP_SET_ISSI", op(Opcode::SetIssi)),
        ("CMD_OP_CREATE_MKEY", op(Opcode::CreateMkey)),
        ("CMD_OP_DESTROY_MKEY", op(Opcode::DestroyMkey)),
        ("CMD_OP_CREATE_EQ", op(Opcode::CreateEq)),
        ("CMD_OP_DESTROY_EQ", op(Opcode::DestroyEq)),
        ("CMD_OP_CREATE_CQ", op(Opcode::CreateCq)),
        ("CMD_OP_DESTROY_CQ", op(Opcode::DestroyCq)),
        ("CMD_OP_CREATE_QP", op(Opcode::CreateQp)),
        ("CMD_OP_DESTROY_QP", op(Opcode::DestroyQp)),
        ("CMD_OP_RST2INIT_QP", op(Opcode::Rst2InitQp)),
        ("CMD_OP_INIT2RTR_QP", op(Opcode::Init2RtrQp)),
        ("CMD_OP_RTR2RTS_QP", op(Opcode::Rtr2RtsQp)),
        ("CMD_OP_2RST_QP", op(Opcode::Qp2RstQp)),
        ("CMD_OP_ALLOC_PD", op(Opcode::AllocPd)),
        ("CMD_OP_DEALLOC_PD", op(Opcode::DeallocPd)),
        ("CMD_OP_ALLOC_UAR", op(Opcode::AllocUar)),
        ("CMD_OP_DEALLOC_UAR", op(Opcode::DeallocUar)),
        // Message lengths.
        ("ENABLE_HCA_IN_LEN", hca::ENABLE_HCA_IN_LEN as u64),
        ("ENABLE_HCA_OUT_LEN", hca::ENABLE_HCA_OUT_LEN as u64),
        ("DISABLE_HCA_IN_LEN", hca::DISABLE_HCA_IN_LEN as u64),
        ("DISABLE_HCA_OUT_LEN", hca::DISABLE_HCA_OUT_LEN as u64),
        ("INIT_HCA_IN_LEN", hca::INIT_HCA_IN_LEN as u64),
        ("INIT_HCA_OUT_LEN", hca::INIT_HCA_OUT_LEN as u64),
        ("TEARDOWN_HCA_IN_LEN", hca::TEARDOWN_HCA_IN_LEN as u64),
        ("TEARDOWN_HCA_OUT_LEN", hca::TEARDOWN_HCA_OUT_LEN as u64),
        (
            "TEARDOWN_PROFILE_GRACEFUL_CLOSE",
            hca::TEARDOWN_PROFILE_GRACEFUL_CLOSE.into(),
        ),
        ("QUERY_ISSI_IN_LEN", hca::QUERY_ISSI_IN_LEN as u64),
        ("QUERY_ISSI_OUT_LEN", hca::QUERY_ISSI_OUT_LEN as u64),
        ("SET_ISSI_IN_LEN", hca::SET_ISSI_IN_LEN as u64),
        ("SET_ISSI_OUT_LEN", hca::SET_ISSI_OUT_LEN as u64),
        ("QUERY_PAGES_IN_LEN", pages::QUERY_PAGES_IN_LEN as u64),
        ("QUERY_PAGES_OUT_LEN", pages::QUERY_PAGES_OUT_LEN as u64),
        ("MANAGE_PAGES_IN_LEN", pages::MANAGE_PAGES_IN_LEN as u64),
        ("MANAGE_PAGES_OUT_LEN", pages::MANAGE_PAGES_OUT_LEN as u64),
        ("PAS_ENTRY_SIZE", pages::PAS_ENTRY_SIZE as u64),
        ("FW_PAGE_SIZE", pages::FW_PAGE_SIZE),
        ("QUERY_PAGES_BOOT", u16::from(QueryPagesOpMod::Boot).into()),
        ("QUERY_PAGES_INIT", u16::from(QueryPagesOpMod::Init).into()),
        (
            "MANAGE_PAGES_GIVE",
            u16::from(ManagePagesOpMod::Give).into(),
        ),
        (
            "MANAGE_PAGES_TAKE",
            u16::from(ManagePagesOpMod::Take).into(),
        ),
        ("QUERY_HCA_CAP_IN_LEN", caps::QUERY_HCA_CAP_IN_LEN as u64),
        ("QUERY_HCA_CAP_OUT_LEN", caps::QUERY_HCA_CAP_OUT_LEN as u64),
        ("HCA_CAP_MSG_OFFSET", caps::HCA_CAP_MSG_OFFSET as u64),
        (
            "HCA_CAP_GENERAL_CUR",
            caps::query_op_mod(CapType::General, CapMode::Cur).into(),
        ),
        (
            "HCA_CAP_GENERAL_MAX",
            caps::query_op_mod(CapType::General, CapMode::Max).into(),
        ),
        ("ALLOC_UAR_IN_LEN", uar::ALLOC_UAR_IN_LEN as u64),
        ("ALLOC_UAR_OUT_LEN", uar::ALLOC_UAR_OUT_LEN as u64),
        ("DEALLOC_UAR_IN_LEN", uar::DEALLOC_UAR_IN_LEN as u64),
        ("DEALLOC_UAR_OUT_LEN", uar::DEALLOC_UAR_OUT_LEN as u64),
        ("UAR_PAGE_SIZE", uar::UAR_PAGE_SIZE),
        ("ALLOC_PD_IN_LEN", mk::ALLOC_PD_IN_LEN as u64),
        ("ALLOC_PD_OUT_LEN", mk::ALLOC_PD_OUT_LEN as u64),
        ("DEALLOC_PD_IN_LEN", mk::DEALLOC_PD_IN_LEN as u64),
        ("DEALLOC_PD_OUT_LEN", mk::DEALLOC_PD_OUT_LEN as u64),
        ("CREATE_MKEY_IN_LEN", mk::CREATE_MKEY_IN_LEN as u64),
        ("CREATE_MKEY_OUT_LEN", mk::CREATE_MKEY_OUT_LEN as u64),
        ("DESTROY_MKEY_IN_LEN", mk::DESTROY_MKEY_IN_LEN as u64),
        ("DESTROY_MKEY_OUT_LEN", mk::DESTROY_MKEY_OUT_LEN as u64),
        ("MTT_ENTRY_SIZE", mk::MTT_ENTRY_SIZE as u64),
        ("ACCESS_MODE_MTT", mk::ACCESS_MODE_MTT.into()),
        ("MKC_QPN_NONE", mk::MKC_QPN_NONE.into()),
        ("CREATE_EQ_IN_LEN", eq::CREATE_EQ_IN_LEN as u64),
        ("CREATE_EQ_OUT_LEN", eq::CREATE_EQ_OUT_LEN as u64),
        ("DESTROY_EQ_IN_LEN", eq::DESTROY_EQ_IN_LEN as u64),
        ("DESTROY_EQ_OUT_LEN", eq::DESTROY_EQ_OUT_LEN as u64),
        ("EQE_SIZE", eq::EQE_SIZE as u64),
        ("EQE_OWNER_INIT_VAL", eq::EQE_OWNER_INIT_VAL.into()),
        ("EVENT_TYPE_COMP", eq::EVENT_TYPE_COMP.into()),
        ("EQ_DOORBELL_ARM", eq::EQ_DOORBELL_ARM_OFFSET.into()),
        ("EQ_DOORBELL_EQN_SHIFT", eq::EQ_DOORBELL_EQN_SHIFT.into()),
        ("EQ_DOORBELL_CI_MASK", eq::EQ_DOORBELL_CI_MASK.into()),
        ("CREATE_CQ_IN_LEN", cq::CREATE_CQ_IN_LEN as u64),
        ("CREATE_CQ_OUT_LEN", cq::CREATE_CQ_OUT_LEN as u64),
        ("DESTROY_CQ_IN_LEN", cq::DESTROY_CQ_IN_LEN as u64),
        ("DESTROY_CQ_OUT_LEN", cq::DESTROY_CQ_OUT_LEN as u64),
        ("CQ_DBR_LEN", cq::CQ_DBR_LEN as u64),
        ("CQ_DBR_SET_CI", cq::CQ_DBR_SET_CI_OFFSET as u64),
        ("CQ_DBR_ARM", cq::CQ_DBR_ARM_OFFSET as u64),
        ("CQ_DOORBELL", cq::CQ_DOORBELL_OFFSET.into()),
        ("CQ_DOORBELL_CQN", cq::CQ_DOORBELL_CQN_OFFSET.into()),
        ("CQ_DB_SN_SHIFT", cq::CQ_DB_SN_SHIFT.into()),
        ("CQ_DB_SN_MASK", cq::CQ_DB_SN_MASK.into()),
        ("CQ_DB_CMD_SHIFT", cq::CQ_DB_CMD_SHIFT.into()),
        ("CQ_DB_CI_MASK", cq::CQ_DB_CI_MASK.into()),
        ("CQ_ARM_NEXT", cq::CqArmCmd::Next as u64),
        ("CREATE_QP_IN_LEN", qp::CREATE_QP_IN_LEN as u64),
        ("CREATE_QP_OUT_LEN", qp::CREATE_QP_OUT_LEN as u64),
        ("MODIFY_QP_IN_LEN", qp::MODIFY_QP_IN_LEN as u64),
        ("MODIFY_QP_OUT_LEN", qp::MODIFY_QP_OUT_LEN as u64),
        ("QP_SHORT_IN_LEN", qp::QP_SHORT_IN_LEN as u64),
        ("QP_SHORT_OUT_LEN", qp::QP_SHORT_OUT_LEN as u64),
        ("QP_ST_RC", qp::QP_ST_RC.into()),
        ("QP_PM_MIGRATED", qp::QP_PM_MIGRATED.into()),
        ("RQ_TYPE_ZERO_SIZE", qp::RQ_TYPE_ZERO_SIZE.into()),
        ("QP_DBR_LEN", qp::QP_DBR_LEN as u64),
        ("QP_DBR_SND", qp::QP_DBR_SND_OFFSET as u64),
        ("SEND_WQE_BB", qp::SEND_WQE_BB as u64),
        // Work queue and completion queue entries.
        ("WQE_DS", wqe::WQE_DS as u64),
        ("WQE_CTRL_CQ_UPDATE", wqe::CTRL_CQ_UPDATE.into()),
        ("UAR_BF_OFFSET", wqe::UAR_BF_OFFSET.into()),
        ("OPCODE_NOP", u8::from(WqeOpcode::Nop).into()),
        ("OPCODE_RDMA_WRITE", u8::from(WqeOpcode::RdmaWrite).into()),
        ("CQE_SIZE", wqe::CQE_LEN as u64),
        ("CQE_OP_OWN", wqe::CQE_OP_OWN_OFFSET as u64),
        ("CQE_INIT_OP_OWN", wqe::CQE_INIT_OP_OWN.into()),
        ("CQE_WQE_COUNTER", offset_of!(wqe::Cqe, wqe_counter) as u64),
        ("CQE_SYNDROME", offset_of!(wqe::ErrCqe, syndrome) as u64),
        (
            "CQE_VENDOR_SYND",
            offset_of!(wqe::ErrCqe, vendor_err_synd) as u64,
        ),
        ("CQE_REQ", u8::from(CqeOpcode::Req).into()),
        ("CQE_REQ_ERR", u8::from(CqeOpcode::ReqErr).into()),
        ("CQE_INVALID", u8::from(CqeOpcode::Invalid).into()),
        (
            "CQE_SYNDROME_WR_FLUSH_ERR",
            u8::from(CqeSyndrome::WrFlushErr).into(),
        ),
    ];

    let mut h = String::new();
    h.push_str(
        "/* SPDX-License-Identifier: GPL-2.0-only */\n\
         /*\n\
         \x20* mlx5 layouts for the mlx5 driver of the VFIO selftests, generated from the\n\
         \x20* mlx5-emu prm crate by tests/selftest_driver_header.rs. Do not edit: change prm\n\
         \x20* (or that test's list) and run\n\
         \x20*   MLX5_EMU_BLESS=1 cargo test --test selftest_driver_header\n\
         \x20*\n\
         \x20* MLX5_F_NAME is a field of a big-endian PRM message: its first bit (bit 0 is the\n\
         \x20* most significant bit of byte 0) and its width, the two arguments mlx5_get() and\n\
         \x20* mlx5_set() take. MLX5_NAME is a byte offset, a length or a value.\n\
         \x20*/\n\
         #ifndef MLX5EMU_SELFTEST_MLX5_PRM_H\n\
         #define MLX5EMU_SELFTEST_MLX5_PRM_H\n\n",
    );
    for (name, f) in fields {
        writeln!(h, "#define MLX5_F_{name} {:#x}, {}", f.bit_off, f.bits).unwrap();
    }
    h.push('\n');
    for (name, v) in consts {
        writeln!(h, "#define MLX5_{name} {v:#x}").unwrap();
    }
    h.push_str("\n#endif /* MLX5EMU_SELFTEST_MLX5_PRM_H */\n");
    h
}

#[test]
fn selftest_driver_header_matches_prm() {
    let want = header();
    let path = header_path();
    if std::env::var_os("MLX5_EMU_BLESS").is_some() {
        std::fs::write(&path, &want).expect("write the header");
        return;
    }
    let have =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        have == want,
        "{} differs from what prm says; regenerate it with \
         MLX5_EMU_BLESS=1 cargo test --test selftest_driver_header",
        path.display()
    );
}
