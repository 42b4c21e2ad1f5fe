//! Capabilities: QUERY_HCA_CAP of this function (CUR, MAX, GENERAL and GENERAL_2) and
//! of another one through `other_function`, the SET_HCA_CAP of bring-up, and the
//! migration bits mlx5vf checks.

use mlx5_prm::cmd::caps::{
    cmd_hca_cap as cap, cmd_hca_cap_2 as cap2, query_op_mod, set_op_mod, CapMode, CapType,
    HCA_CAP_IN_FUNCTION_ID, HCA_CAP_IN_OTHER_FUNCTION, HCA_CAP_MSG_OFFSET, HCA_CAP_SIZE,
    QUERY_HCA_CAP_IN_LEN, QUERY_HCA_CAP_OUT_LEN, SET_HCA_CAP_IN_LEN, SET_HCA_CAP_OUT_LEN,
};
use mlx5_prm::ifc::{get, set};
use mlx5_prm::Opcode;

use super::{step, Hca, HcaError};
use crate::cmdif::new_input;

/// `log_max_qp` the kernel's default profile asks for (capped by MAX).
const PROFILE_LOG_MAX_QP: u64 = 18;

/// The migration capabilities the kernel's mlx5vf checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationCaps {
    /// `cmd_hca_cap.migration`.
    pub migration: bool,
    /// `cmd_hca_cap_2.migration_multi_load`.
    pub multi_load: bool,
    /// `cmd_hca_cap_2.migration_tracking_state`.
    pub tracking_state: bool,
    /// `cmd_hca_cap_2.migration_in_chunks`.
    pub in_chunks: bool,
}

impl MigrationCaps {
    pub(super) fn from_pages(general: &[u8], general2: Option<&[u8]>) -> Self {
        let g2 = |f| general2.is_some_and(|p| get(p, f) != 0);
        MigrationCaps {
            migration: get(general, cap::MIGRATION) != 0,
            multi_load: g2(cap2::MIGRATION_MULTI_LOAD),
            tracking_state: g2(cap2::MIGRATION_TRACKING_STATE),
            in_chunks: g2(cap2::MIGRATION_IN_CHUNKS),
        }
    }
}

/// Another function's capabilities, read through this one (`other_function`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherCaps {
    pub function_id: u16,
    pub vhca_id: u16,
    pub migration: MigrationCaps,
    pub caps: Vec<u8>,
    pub caps2: Option<Vec<u8>>,
}

/// The input of QUERY_HCA_CAP for capability page `t` in `mode`, of this function or,
/// with `other`, of function `other` (`other_function` = 1, `function_id`).
pub fn query_hca_cap_in(t: CapType, mode: CapMode, other: Option<u16>) -> Vec<u8> {
    let mut m = new_input(
        Opcode::QueryHcaCap,
        query_op_mod(t, mode),
        QUERY_HCA_CAP_IN_LEN,
    );
    if let Some(fid) = other {
        set(&mut m, HCA_CAP_IN_OTHER_FUNCTION, 1);
        set(&mut m, HCA_CAP_IN_FUNCTION_ID, fid.into());
    }
    m
}

impl Hca {
    /// Another function's GENERAL (and GENERAL_2) CUR capabilities, read through this
    /// one with `other_function` = 1 (the PF reading VF n names function n + 1).
    pub fn query_other_caps(&self, function_id: u16) -> Result<OtherCaps, HcaError> {
        const STEP: &str = "query other function caps failed";
        let caps = self.query_caps(CapType::General, CapMode::Cur, Some(function_id), STEP)?;
        let caps2 =
            if get(&caps, cap::HCA_CAP_2) != 0 || self.info().is_some_and(|i| i.caps2.is_some()) {
                Some(self.query_caps(CapType::General2, CapMode::Cur, Some(function_id), STEP)?)
            } else {
                None
            };
        Ok(OtherCaps {
            function_id,
            vhca_id: get(&caps, cap::VHCA_ID) as u16,
            migration: MigrationCaps::from_pages(&caps, caps2.as_deref()),
            caps,
            caps2,
        })
    }

    pub(super) fn query_caps(
        &self,
        t: CapType,
        mode: CapMode,
        other: Option<u16>,
        what: &'static str,
    ) -> Result<Vec<u8>, HcaError> {
        let out = self
            .cmd
            .exec(&query_hca_cap_in(t, mode, other), QUERY_HCA_CAP_OUT_LEN)
            .map_err(step(what))?;
        Ok(out[HCA_CAP_MSG_OFFSET..HCA_CAP_MSG_OFFSET + HCA_CAP_SIZE].to_vec())
    }

    /// SET_HCA_CAP GENERAL: a copy of CUR with the fields mlx5_core's `handle_hca_cap`
    /// changes.
    pub(super) fn set_general_caps(&self, cur: &[u8], max: &[u8]) -> Result<(), HcaError> {
        let mut m = new_input(
            Opcode::SetHcaCap,
            set_op_mod(CapType::General),
            SET_HCA_CAP_IN_LEN,
        );
        let caps = &mut m[HCA_CAP_MSG_OFFSET..HCA_CAP_MSG_OFFSET + HCA_CAP_SIZE];
        caps.copy_from_slice(cur);
        // 128-entry pkey table; no command checksums; 64-byte cache lines; 4 KiB UAR
        // pages (PAGE_SHIFT - 12); what MAX allows for the rest.
        set(caps, cap::PKEY_TABLE_SIZE, 0);
        set(caps, cap::CMDIF_CHECKSUM, 0);
        set(caps, cap::CACHE_LINE_128BYTE, 0);
        set(caps, cap::LOG_UAR_PAGE_SZ, 0);
        set(
            caps,
            cap::LOG_MAX_QP,
            PROFILE_LOG_MAX_QP.min(get(max, cap::LOG_MAX_QP)),
        );
        set(
            caps,
            cap::RELEASE_ALL_PAGES,
            get(max, cap::RELEASE_ALL_PAGES),
        );
        set(caps, cap::NUM_VHCA_PORTS, get(max, cap::NUM_VHCA_PORTS));
        self.cmd
            .exec(&m, SET_HCA_CAP_OUT_LEN)
            .map_err(step("set_hca_cap failed"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_caps_read_the_documented_bits() {
        let mut g = vec![0u8; HCA_CAP_SIZE];
        let mut g2 = vec![0u8; HCA_CAP_SIZE];
        assert_eq!(
            MigrationCaps::from_pages(&g, None),
            MigrationCaps::default()
        );
        set(&mut g, cap::MIGRATION, 1);
        set(&mut g2, cap2::MIGRATION_IN_CHUNKS, 1);
        let m = MigrationCaps::from_pages(&g, Some(&g2));
        assert!(m.migration && m.in_chunks && !m.multi_load && !m.tracking_state);
    }
}
