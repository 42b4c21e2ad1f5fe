//! VHCA migration commands: SUSPEND_VHCA, RESUME_VHCA, QUERY_VHCA_MIGRATION_STATE,
//! SAVE_VHCA_STATE, LOAD_VHCA_STATE [IFC `suspend_vhca_in/out`, `resume_vhca_in/out`,
//! `query_vhca_migration_state_in/out`, `save_vhca_state_in/out`,
//! `load_vhca_state_in/out`]; kernel-mlx5vf.md §4.2.
//!
//! Bit offsets were checked against the mlx5_ifc.h patches that introduced them
//! ("Introduce migration bits and structures", the PRE_COPY patch adding `incremental` /
//! `set_track`, and the chunk-mode patch adding `chunk`, `remaining_total_size` and
//! `next_required_umem_size`). `migration_state` comes from the 2026 patch as the sheet
//! gives it.

use crate::ifc::Field;

/// `vhca_id`, in bytes 10–11 of every migration command input.
pub const IN_VHCA_ID: Field = Field::new(0x50, 16);

// ---- SUSPEND_VHCA / RESUME_VHCA ----

/// `suspend_vhca_in`: 0x80 bits.
pub const SUSPEND_VHCA_IN_LEN: usize = 16;
/// `suspend_vhca_out`: 0x80 bits.
pub const SUSPEND_VHCA_OUT_LEN: usize = 16;
/// `resume_vhca_in`: 0x80 bits.
pub const RESUME_VHCA_IN_LEN: usize = 16;
/// `resume_vhca_out`: 0x80 bits.
pub const RESUME_VHCA_OUT_LEN: usize = 16;
/// `suspend_vhca_in.vhca_id`.
pub const SUSPEND_VHCA_IN_VHCA_ID: Field = IN_VHCA_ID;
/// `resume_vhca_in.vhca_id`.
pub const RESUME_VHCA_IN_VHCA_ID: Field = IN_VHCA_ID;

wire_enum! {
    /// `suspend_vhca_in.op_mod` (`MLX5_SUSPEND_VHCA_IN_OP_MOD_SUSPEND_*`).
    pub enum SuspendOpMod: u16, field = "SUSPEND_VHCA op_mod" {
        /// Stop issuing DMA (VFIO RUNNING_P2P).
        Initiator = 0x0 => "SUSPEND_INITIATOR",
        /// Freeze internal state (VFIO STOP).
        Responder = 0x1 => "SUSPEND_RESPONDER",
    }
}

wire_enum! {
    /// `resume_vhca_in.op_mod` (`MLX5_RESUME_VHCA_IN_OP_MOD_RESUME_*`; numbered the other
    /// way round from [`SuspendOpMod`]).
    pub enum ResumeOpMod: u16, field = "RESUME_VHCA op_mod" {
        /// Let internal state change again (undoes a responder suspend).
        Responder = 0x0 => "RESUME_RESPONDER",
        /// Issue DMA again (undoes an initiator suspend).
        Initiator = 0x1 => "RESUME_INITIATOR",
    }
}

// ---- QUERY_VHCA_MIGRATION_STATE ----

/// `query_vhca_migration_state_in`: 0x80 bits.
pub const QUERY_VHCA_MIGRATION_STATE_IN_LEN: usize = 16;
/// `query_vhca_migration_state_out`: 0x200 bits.
pub const QUERY_VHCA_MIGRATION_STATE_OUT_LEN: usize = 64;
/// `query_vhca_migration_state_in.incremental`, byte 8 bit 7.
pub const QUERY_VHCA_MIGRATION_STATE_IN_INCREMENTAL: Field = Field::new(0x40, 1);
/// `query_vhca_migration_state_in.chunk`, byte 8 bit 6 (chunk-mode patch).
pub const QUERY_VHCA_MIGRATION_STATE_IN_CHUNK: Field = Field::new(0x41, 1);
/// `query_vhca_migration_state_in.vhca_id`.
pub const QUERY_VHCA_MIGRATION_STATE_IN_VHCA_ID: Field = IN_VHCA_ID;
/// `query_vhca_migration_state_out.migration_state`, byte 12 high nibble (2026).
pub const QUERY_VHCA_MIGRATION_STATE_OUT_MIGRATION_STATE: Field = Field::new(0x60, 4);
/// `query_vhca_migration_state_out.required_umem_size`, bytes 16–19.
pub const QUERY_VHCA_MIGRATION_STATE_OUT_REQUIRED_UMEM_SIZE: Field = Field::new(0x80, 32);
/// `query_vhca_migration_state_out.remaining_total_size`, bytes 24–31 (chunk-mode patch).
pub const QUERY_VHCA_MIGRATION_STATE_OUT_REMAINING_TOTAL_SIZE: Field = Field::new(0xc0, 64);

wire_enum! {
    /// `query_vhca_migration_state_out.migration_state` (`MLX5_QUERY_VHCA_MIG_STATE_*`, 2026).
    pub enum VhcaMigrationState: u8, field = "migration_state" {
        /// Not reported (firmware without the field) or not initialized.
        Uninitialized = 0x0 => "UNINITIALIZED",
        /// Operational, no migration in progress.
        OperMigrationIdle = 0x1 => "OPER_MIGRATION_IDLE",
        /// Operational, ready to be migrated.
        OperMigrationReady = 0x2 => "OPER_MIGRATION_READY",
        /// Operational, dirty state since the last SAVE.
        OperMigrationDirty = 0x3 => "OPER_MIGRATION_DIRTY",
        /// Re-initialized after a LOAD; the REINIT opt-in reports it.
        OperMigrationInit = 0x4 => "OPER_MIGRATION_INIT",
    }
}

// ---- SAVE_VHCA_STATE / LOAD_VHCA_STATE ----

/// `save_vhca_state_in`: 0x100 bits.
pub const SAVE_VHCA_STATE_IN_LEN: usize = 32;
/// `save_vhca_state_out`: 0x80 bits.
pub const SAVE_VHCA_STATE_OUT_LEN: usize = 16;
/// `save_vhca_state_in.incremental`, byte 8 bit 7.
pub const SAVE_VHCA_STATE_IN_INCREMENTAL: Field = Field::new(0x40, 1);
/// `save_vhca_state_in.set_track`, byte 8 bit 6.
pub const SAVE_VHCA_STATE_IN_SET_TRACK: Field = Field::new(0x41, 1);
/// `save_vhca_state_in.vhca_id`.
pub const SAVE_VHCA_STATE_IN_VHCA_ID: Field = IN_VHCA_ID;
/// `save_vhca_state_in.va`, bytes 16–23 (mlx5vf leaves it 0).
pub const SAVE_VHCA_STATE_IN_VA: Field = Field::new(0x80, 64);
/// `save_vhca_state_in.mkey`, bytes 24–27.
pub const SAVE_VHCA_STATE_IN_MKEY: Field = Field::new(0xc0, 32);
/// `save_vhca_state_in.size`, bytes 28–31.
pub const SAVE_VHCA_STATE_IN_SIZE: Field = Field::new(0xe0, 32);
/// `save_vhca_state_out.actual_image_size`, bytes 8–11.
pub const SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE: Field = Field::new(0x40, 32);
/// `save_vhca_state_out.next_required_umem_size`, bytes 12–15 (chunk-mode patch).
pub const SAVE_VHCA_STATE_OUT_NEXT_REQUIRED_UMEM_SIZE: Field = Field::new(0x60, 32);

/// `load_vhca_state_in`: 0x100 bits.
pub const LOAD_VHCA_STATE_IN_LEN: usize = 32;
/// `load_vhca_state_out`: 0x80 bits.
pub const LOAD_VHCA_STATE_OUT_LEN: usize = 16;
/// `load_vhca_state_in.vhca_id`.
pub const LOAD_VHCA_STATE_IN_VHCA_ID: Field = IN_VHCA_ID;
/// `load_vhca_state_in.va`, bytes 16–23.
pub const LOAD_VHCA_STATE_IN_VA: Field = Field::new(0x80, 64);
/// `load_vhca_state_in.mkey`, bytes 24–27.
pub const LOAD_VHCA_STATE_IN_MKEY: Field = Field::new(0xc0, 32);
/// `load_vhca_state_in.size`, bytes 28–31.
pub const LOAD_VHCA_STATE_IN_SIZE: Field = Field::new(0xe0, 32);

/// Largest LOAD mlx5vf issues (`MAX_LOAD_SIZE`, 2^32 − 1).
pub const MAX_LOAD_SIZE: u64 = u32::MAX as u64;
/// mlx5vf's chunk size in chunk mode (`MAX_CHUNK_SIZE`, 8 MiB).
pub const MAX_CHUNK_SIZE: u64 = 8 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ifc::{get, set};

    #[test]
    fn suspend_resume_layout() {
        let mut m = [0u8; SUSPEND_VHCA_IN_LEN];
        set(&mut m, SUSPEND_VHCA_IN_VHCA_ID, 0x1234);
        assert_eq!(&m[10..12], &[0x12, 0x34]);
        assert_eq!(SUSPEND_VHCA_IN_VHCA_ID.end_byte(), 12);
        assert_eq!(RESUME_VHCA_IN_VHCA_ID, SUSPEND_VHCA_IN_VHCA_ID);
        assert_eq!(SUSPEND_VHCA_OUT_LEN * 8, 0x80);
        assert_eq!(RESUME_VHCA_IN_LEN * 8, 0x80);
        assert_eq!(RESUME_VHCA_OUT_LEN, 16);
        // The inverted numbering.
        assert_eq!(
            (
                u16::from(SuspendOpMod::Initiator),
                u16::from(SuspendOpMod::Responder)
            ),
            (0, 1)
        );
        assert_eq!(
            (
                u16::from(ResumeOpMod::Responder),
                u16::from(ResumeOpMod::Initiator)
            ),
            (0, 1)
        );
        assert!(SuspendOpMod::try_from(2).is_err());
        assert!(ResumeOpMod::try_from(2).is_err());
        assert_eq!(
            VhcaMigrationState::try_from(0x4),
            Ok(VhcaMigrationState::OperMigrationInit)
        );
        assert!(VhcaMigrationState::try_from(5).is_err());
    }

    #[test]
    fn query_layout() {
        assert_eq!(QUERY_VHCA_MIGRATION_STATE_IN_LEN * 8, 0x80);
        assert_eq!(QUERY_VHCA_MIGRATION_STATE_OUT_LEN * 8, 0x200);
        let mut m = [0u8; QUERY_VHCA_MIGRATION_STATE_IN_LEN];
        set(&mut m, QUERY_VHCA_MIGRATION_STATE_IN_INCREMENTAL, 1);
        assert_eq!(m[8], 0x80);
        set(&mut m, QUERY_VHCA_MIGRATION_STATE_IN_CHUNK, 1);
        assert_eq!(m[8], 0xc0);
        set(&mut m, QUERY_VHCA_MIGRATION_STATE_IN_VHCA_ID, 2);
        assert_eq!(&m[8..12], &[0xc0, 0, 0, 2]);
        let mut o = [0u8; QUERY_VHCA_MIGRATION_STATE_OUT_LEN];
        set(
            &mut o,
            QUERY_VHCA_MIGRATION_STATE_OUT_MIGRATION_STATE,
            u64::from(u8::from(VhcaMigrationState::OperMigrationInit)),
        );
        assert_eq!(o[12], 0x40);
        set(
            &mut o,
            QUERY_VHCA_MIGRATION_STATE_OUT_REQUIRED_UMEM_SIZE,
            0x0102_0304,
        );
        assert_eq!(&o[16..20], &[1, 2, 3, 4]);
        set(
            &mut o,
            QUERY_VHCA_MIGRATION_STATE_OUT_REMAINING_TOTAL_SIZE,
            0x1_0000_0002,
        );
        assert_eq!(&o[24..32], &0x1_0000_0002u64.to_be_bytes());
        assert_eq!(get(&o, QUERY_VHCA_MIGRATION_STATE_OUT_MIGRATION_STATE), 4);
        assert!(o[32..].iter().all(|&b| b == 0));
    }

    #[test]
    fn save_load_layout() {
        assert_eq!(SAVE_VHCA_STATE_IN_LEN * 8, 0x100);
        assert_eq!(LOAD_VHCA_STATE_IN_LEN * 8, 0x100);
        assert_eq!(SAVE_VHCA_STATE_OUT_LEN, 16);
        assert_eq!(LOAD_VHCA_STATE_OUT_LEN, 16);
        let mut m = [0u8; SAVE_VHCA_STATE_IN_LEN];
        set(&mut m, SAVE_VHCA_STATE_IN_INCREMENTAL, 1);
        set(&mut m, SAVE_VHCA_STATE_IN_SET_TRACK, 1);
        set(&mut m, SAVE_VHCA_STATE_IN_VHCA_ID, 0xabcd);
        set(&mut m, SAVE_VHCA_STATE_IN_VA, 0x1122_3344_5566_7788);
        set(&mut m, SAVE_VHCA_STATE_IN_MKEY, 0x0000_0542);
        set(&mut m, SAVE_VHCA_STATE_IN_SIZE, 0x0010_0000);
        assert_eq!(&m[8..12], &[0xc0, 0, 0xab, 0xcd]);
        assert_eq!(&m[16..24], &0x1122_3344_5566_7788u64.to_be_bytes());
        assert_eq!(&m[24..28], &[0, 0, 5, 0x42]);
        assert_eq!(&m[28..32], &[0, 0x10, 0, 0]);
        assert_eq!(SAVE_VHCA_STATE_IN_SIZE.end_byte(), SAVE_VHCA_STATE_IN_LEN);
        // LOAD shares everything but the two flag bits.
        assert_eq!(LOAD_VHCA_STATE_IN_VA, SAVE_VHCA_STATE_IN_VA);
        assert_eq!(LOAD_VHCA_STATE_IN_MKEY, SAVE_VHCA_STATE_IN_MKEY);
        assert_eq!(LOAD_VHCA_STATE_IN_SIZE, SAVE_VHCA_STATE_IN_SIZE);
        assert_eq!(LOAD_VHCA_STATE_IN_VHCA_ID, SAVE_VHCA_STATE_IN_VHCA_ID);
        let mut o = [0u8; SAVE_VHCA_STATE_OUT_LEN];
        set(&mut o, SAVE_VHCA_STATE_OUT_ACTUAL_IMAGE_SIZE, 0x100);
        set(&mut o, SAVE_VHCA_STATE_OUT_NEXT_REQUIRED_UMEM_SIZE, 0x200);
        assert_eq!(&o[8..16], &[0, 0, 1, 0, 0, 0, 2, 0]);
    }
}
