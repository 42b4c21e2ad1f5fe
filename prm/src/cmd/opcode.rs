//! Command opcodes (`MLX5_CMD_OP_*`): every value named in mlx5-device.md §4/§7 and
//! kernel-mlx5vf.md §4.1. Opcodes the sheets name without a value are left out.

wire_enum! {
    /// A firmware command opcode, input bytes 0–1.
    pub enum Opcode: u16, field = "opcode" {
        /// Read a capability page (op_mod = cap_type << 1 | CUR).
        QueryHcaCap = 0x100 => "QUERY_HCA_CAP",
        /// Board id / PSID.
        QueryAdapter = 0x101 => "QUERY_ADAPTER",
        /// Initialize the HCA.
        InitHca = 0x102 => "INIT_HCA",
        /// Tear the HCA down.
        TeardownHca = 0x103 => "TEARDOWN_HCA",
        /// Enable a function.
        EnableHca = 0x104 => "ENABLE_HCA",
        /// Disable a function.
        DisableHca = 0x105 => "DISABLE_HCA",
        /// How many pages the function wants.
        QueryPages = 0x107 => "QUERY_PAGES",
        /// Give or take pages.
        ManagePages = 0x108 => "MANAGE_PAGES",
        /// Write a capability page.
        SetHcaCap = 0x109 => "SET_HCA_CAP",
        /// Query supported interface step sequence ids.
        QueryIssi = 0x10a => "QUERY_ISSI",
        /// Select the ISSI.
        SetIssi = 0x10b => "SET_ISSI",
        /// Tell the FW the driver version string.
        SetDriverVersion = 0x10d => "SET_DRIVER_VERSION",
        /// Suspend a VHCA (op_mod 0 initiator, 1 responder).
        SuspendVhca = 0x115 => "SUSPEND_VHCA",
        /// Resume a VHCA (op_mod 0 responder, 1 initiator).
        ResumeVhca = 0x116 => "RESUME_VHCA",
        /// Size of the next state image.
        QueryVhcaMigrationState = 0x117 => "QUERY_VHCA_MIGRATION_STATE",
        /// Save the VHCA state image.
        SaveVhcaState = 0x118 => "SAVE_VHCA_STATE",
        /// Load a VHCA state image.
        LoadVhcaState = 0x119 => "LOAD_VHCA_STATE",
        /// Create a memory key.
        CreateMkey = 0x200 => "CREATE_MKEY",
        /// Destroy a memory key.
        DestroyMkey = 0x202 => "DESTROY_MKEY",
        /// Create an event queue.
        CreateEq = 0x301 => "CREATE_EQ",
        /// Destroy an event queue.
        DestroyEq = 0x302 => "DESTROY_EQ",
        /// Create a completion queue.
        CreateCq = 0x400 => "CREATE_CQ",
        /// Destroy a completion queue.
        DestroyCq = 0x401 => "DESTROY_CQ",
        /// Read a completion queue's context.
        QueryCq = 0x402 => "QUERY_CQ",
        /// Create a queue pair.
        CreateQp = 0x500 => "CREATE_QP",
        /// Destroy a queue pair.
        DestroyQp = 0x501 => "DESTROY_QP",
        /// QP RESET -> INIT.
        Rst2InitQp = 0x502 => "RST2INIT_QP",
        /// QP INIT -> RTR.
        Init2RtrQp = 0x503 => "INIT2RTR_QP",
        /// QP RTR -> RTS.
        Rtr2RtsQp = 0x504 => "RTR2RTS_QP",
        /// QP any state -> ERR.
        Qp2ErrQp = 0x507 => "2ERR_QP",
        /// QP any state -> RESET.
        Qp2RstQp = 0x50a => "2RST_QP",
        /// Read a queue pair's context.
        QueryQp = 0x50b => "QUERY_QP",
        /// Modify the NIC vport context.
        ModifyNicVportContext = 0x755 => "MODIFY_NIC_VPORT_CONTEXT",
        /// Allocate a protection domain.
        AllocPd = 0x800 => "ALLOC_PD",
        /// Free a protection domain.
        DeallocPd = 0x801 => "DEALLOC_PD",
        /// Allocate a UAR page.
        AllocUar = 0x802 => "ALLOC_UAR",
        /// Free a UAR page.
        DeallocUar = 0x803 => "DEALLOC_UAR",
        /// Read or write a register (op_mod 1 = read).
        AccessReg = 0x805 => "ACCESS_REG",
        /// Create a general object (e.g. PAGE_TRACK 0x46).
        CreateGeneralObject = 0xa00 => "CREATE_GENERAL_OBJECT",
        /// Modify a general object.
        ModifyGeneralObject = 0xa01 => "MODIFY_GENERAL_OBJECT",
        /// Query a general object.
        QueryGeneralObject = 0xa02 => "QUERY_GENERAL_OBJECT",
        /// Destroy a general object.
        DestroyGeneralObject = 0xa03 => "DESTROY_GENERAL_OBJECT",
    }
}

#[cfg(test)]
mod tests {
    use super::Opcode;

    #[test]
    fn opcodes_match_the_sheets() {
        let expected: &[(Opcode, u16)] = &[
            (Opcode::QueryHcaCap, 0x100),
            (Opcode::EnableHca, 0x104),
            (Opcode::SetDriverVersion, 0x10d),
            (Opcode::SuspendVhca, 0x115),
            (Opcode::LoadVhcaState, 0x119),
            (Opcode::DestroyMkey, 0x202),
            (Opcode::DestroyEq, 0x302),
            (Opcode::Rtr2RtsQp, 0x504),
            (Opcode::ModifyNicVportContext, 0x755),
            (Opcode::AccessReg, 0x805),
            (Opcode::DestroyGeneralObject, 0xa03),
        ];
        for &(op, v) in expected {
            assert_eq!(u16::from(op), v, "{}", op.name());
        }
    }

    #[test]
    fn every_opcode_round_trips_and_names_are_unique() {
        for (i, &op) in Opcode::ALL.iter().enumerate() {
            assert_eq!(Opcode::try_from(u16::from(op)), Ok(op));
            assert!(Opcode::ALL[i + 1..].iter().all(|o| o.name() != op.name()));
        }
        assert_eq!(Opcode::SaveVhcaState.to_string(), "SAVE_VHCA_STATE(0x118)");
    }

    #[test]
    fn unknown_opcode_is_a_typed_error() {
        let err = Opcode::try_from(0x106).unwrap_err();
        assert_eq!(err.to_string(), "unknown opcode value 0x106");
    }
}
