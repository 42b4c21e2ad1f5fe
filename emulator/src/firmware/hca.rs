//! ENABLE/DISABLE_HCA, INIT/TEARDOWN_HCA, QUERY/SET_ISSI, SET_DRIVER_VERSION,
//! QUERY_ADAPTER (mlx5-device.md §4, §4.1).

use mlx5_prm::cmd::hca::*;
use mlx5_prm::ifc::set;

use super::{caps, pages, Cmd, CmdFail, CmdResult, Env, Firmware, HcaState};

/// ISSIs this firmware supports: 0 and 1 (`supported_issi_dw0` = 0x3).
pub const SUPPORTED_ISSI_DW0: u32 = 0x3;
/// Highest supported ISSI.
pub const MAX_ISSI: u16 = 1;

/// Why an ISSI is refused: by SET_ISSI, and by LOAD_VHCA_STATE for an image's ISSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HcaError {
    #[error("ISSI {got}: this firmware supports 0..={MAX_ISSI}")]
    Issi { got: u64 },
}

impl HcaError {
    /// The status and syndrome the live command completes with.
    pub fn fail(&self) -> CmdFail {
        CmdFail::bad_param()
    }
}

/// An ISSI SET_ISSI accepts.
pub fn check_issi(issi: u64) -> Result<u16, HcaError> {
    if issi > u64::from(MAX_ISSI) {
        return Err(HcaError::Issi { got: issi });
    }
    Ok(issi as u16)
}
/// `ieee_vendor_id` QUERY_ADAPTER reports (Mellanox's OUI).
pub const IEEE_VENDOR_ID: u32 = 0x02c9;
/// `vsd_vendor_id` QUERY_ADAPTER reports (the PCI vendor).
pub const VSD_VENDOR_ID: u16 = 0x15b3;
/// The board id (PSID) QUERY_ADAPTER reports.
pub const PSID: &[u8] = b"MLX5EMU0000001";
/// The vendor-specific data string.
pub const VSD: &[u8] = b"mlx5-emu software adapter";

impl Firmware {
    /// ENABLE_HCA. `function_id` 0 enables this function. A PF may name a VF (n + 1):
    /// that succeeds if the VF exists and changes nothing, because each VF's own driver
    /// enables its HCA (as in a guest).
    pub(super) fn enable_hca(&mut self, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
        let out = cmd.lengths(ENABLE_HCA_IN_LEN, ENABLE_HCA_OUT_LEN)?;
        if self.names_other_function(env, cmd)? {
            return Ok(out);
        }
        if self.state != HcaState::Disabled {
            return Err(CmdFail::wrong_state());
        }
        self.state = HcaState::Enabled;
        Ok(out)
    }

    /// ENABLE_HCA and DISABLE_HCA share their input layout: no embedded-CPU function,
    /// and `function_id` 0 for this function. A PF naming an existing VF (n + 1) is
    /// accepted and changes nothing (the VF's own driver enables it): `Ok(true)`.
    fn names_other_function(&self, env: &dyn Env, cmd: &Cmd<'_>) -> Result<bool, CmdFail> {
        if cmd.get(ENABLE_HCA_IN_EMBEDDED_CPU_FUNCTION) != 0 {
            return Err(CmdFail::bad_param());
        }
        let fid = cmd.get(ENABLE_HCA_IN_FUNCTION_ID) as u16;
        if fid != 0 {
            self.check_other_function(env, fid)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// DISABLE_HCA: Enabled → Disabled; the ISSI and current caps return to defaults.
    pub(super) fn disable_hca(&mut self, env: &dyn Env, cmd: &Cmd<'_>) -> CmdResult {
        let out = cmd.lengths(DISABLE_HCA_IN_LEN, DISABLE_HCA_OUT_LEN)?;
        if self.names_other_function(env, cmd)? {
            return Ok(out);
        }
        if self.state != HcaState::Enabled {
            return Err(CmdFail::wrong_state());
        }
        self.state = HcaState::Disabled;
        self.issi = 0;
        self.general_cur = caps::general_max(self.id);
        Ok(out)
    }

    /// A PF naming function `fid` (VF n = n + 1). VFs may not name other functions.
    pub(super) fn check_other_function(&self, env: &dyn Env, fid: u16) -> Result<(), CmdFail> {
        if self.id.kind != crate::pci::FunctionKind::Pf || fid == self.id.vhca_id {
            return Err(CmdFail::bad_function());
        }
        env.peer(fid).map(|_| ()).ok_or_else(CmdFail::bad_function)
    }

    /// INIT_HCA: Enabled → Initialized, once the boot and init pages were given.
    pub(super) fn init_hca(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let out = cmd.lengths(INIT_HCA_IN_LEN, INIT_HCA_OUT_LEN)?;
        pages::check_startup_pages(self.pages.len()).map_err(|e| e.fail())?;
        self.state = HcaState::Initialized;
        Ok(out)
    }

    /// TEARDOWN_HCA: Initialized → Enabled. Only the graceful profile is supported
    /// (`fast_teardown` and `force_teardown` are advertised as 0).
    pub(super) fn teardown_hca(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let mut out = cmd.lengths(TEARDOWN_HCA_IN_LEN, TEARDOWN_HCA_OUT_LEN)?;
        if cmd.get(TEARDOWN_HCA_IN_PROFILE) != u64::from(TEARDOWN_PROFILE_GRACEFUL_CLOSE) {
            return Err(CmdFail::bad_param());
        }
        self.state = HcaState::Enabled;
        set(&mut out, TEARDOWN_HCA_OUT_STATE, 0);
        Ok(out)
    }

    pub(super) fn query_issi(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let mut out = cmd.lengths(QUERY_ISSI_IN_LEN, QUERY_ISSI_OUT_LEN)?;
        set(&mut out, QUERY_ISSI_OUT_CURRENT_ISSI, u64::from(self.issi));
        set(
            &mut out,
            QUERY_ISSI_OUT_SUPPORTED_ISSI_DW0,
            u64::from(SUPPORTED_ISSI_DW0),
        );
        Ok(out)
    }

    pub(super) fn set_issi(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let out = cmd.lengths(SET_ISSI_IN_LEN, SET_ISSI_OUT_LEN)?;
        self.issi = check_issi(cmd.get(SET_ISSI_IN_CURRENT_ISSI)).map_err(|e| e.fail())?;
        Ok(out)
    }

    pub(super) fn set_driver_version(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let out = cmd.lengths(SET_DRIVER_VERSION_IN_LEN, SET_DRIVER_VERSION_OUT_LEN)?;
        let raw = &cmd.input[SET_DRIVER_VERSION_IN_VERSION_OFFSET
            ..SET_DRIVER_VERSION_IN_VERSION_OFFSET + SET_DRIVER_VERSION_IN_VERSION_LEN];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let version: String = raw[..end]
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '?'
                }
            })
            .collect();
        tracing::info!(vhca_id = self.id.vhca_id, %version, "driver version");
        Ok(out)
    }

    pub(super) fn query_adapter(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        let mut out = cmd.lengths(QUERY_ADAPTER_IN_LEN, QUERY_ADAPTER_OUT_LEN)?;
        set(
            &mut out,
            QUERY_ADAPTER_OUT_IEEE_VENDOR_ID,
            u64::from(IEEE_VENDOR_ID),
        );
        set(
            &mut out,
            QUERY_ADAPTER_OUT_VSD_VENDOR_ID,
            u64::from(VSD_VENDOR_ID),
        );
        out[QUERY_ADAPTER_OUT_VSD_OFFSET..QUERY_ADAPTER_OUT_VSD_OFFSET + VSD.len()]
            .copy_from_slice(VSD);
        out[QUERY_ADAPTER_OUT_PSID_OFFSET..QUERY_ADAPTER_OUT_PSID_OFFSET + PSID.len()]
            .copy_from_slice(PSID);
        Ok(out)
    }
}

const _: () = assert!(VSD.len() <= QUERY_ADAPTER_OUT_VSD_LEN);
const _: () = assert!(PSID.len() <= QUERY_ADAPTER_OUT_PSID_LEN);

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{syndrome, HcaState};
    use super::*;
    use mlx5_prm::ifc::get;
    use mlx5_prm::{CmdStatus, Opcode};

    #[test]
    fn query_issi_reports_0_and_1_and_set_issi_checks_the_value() {
        let mut b = Bench::vf();
        ok(&b.simple(Opcode::EnableHca));
        let r = b.run(Opcode::QueryIssi, 0, 16, QUERY_ISSI_OUT_LEN, |_| {});
        ok(&r);
        assert_eq!(r.out.len(), QUERY_ISSI_OUT_LEN);
        assert_eq!(get(&r.out, QUERY_ISSI_OUT_SUPPORTED_ISSI_DW0), 3);
        assert_eq!(get(&r.out, QUERY_ISSI_OUT_CURRENT_ISSI), 0);
        let r = b.run(Opcode::QueryIssi, 0, 16, 16, |_| {});
        fails(&r, CmdStatus::BadOutpLenErr, syndrome::SHORT_OUTPUT);
        let r = b.run(Opcode::SetIssi, 0, 16, 16, |m| {
            set(m, SET_ISSI_IN_CURRENT_ISSI, 2)
        });
        fails(&r, CmdStatus::BadParamErr, syndrome::BAD_PARAM);
        ok(&b.run(Opcode::SetIssi, 0, 16, 16, |m| {
            set(m, SET_ISSI_IN_CURRENT_ISSI, 1)
        }));
        assert_eq!(b.fw.issi(), 1);
        let r = b.run(Opcode::QueryIssi, 0, 16, QUERY_ISSI_OUT_LEN, |_| {});
        assert_eq!(get(&r.out, QUERY_ISSI_OUT_CURRENT_ISSI), 1);
    }

    #[test]
    fn init_needs_pages_and_teardown_returns_to_enabled() {
        let mut b = Bench::vf();
        ok(&b.simple(Opcode::EnableHca));
        let r = b.run(Opcode::InitHca, 0, INIT_HCA_IN_LEN, 16, |_| {});
        fails(&r, CmdStatus::BadSysStateErr, syndrome::PAGES_MISSING);
        let r = b.run(Opcode::InitHca, 0, 16, 16, |_| {});
        fails(&r, CmdStatus::BadInpLenErr, syndrome::SHORT_INPUT);
        b.give_startup_pages();
        ok(&b.run(Opcode::InitHca, 0, INIT_HCA_IN_LEN, 16, |_| {}));
        assert_eq!(b.fw.state(), HcaState::Initialized);
        let r = b.run(Opcode::TeardownHca, 0, 16, 16, |m| {
            set(m, TEARDOWN_HCA_IN_PROFILE, 2)
        });
        fails(&r, CmdStatus::BadParamErr, syndrome::BAD_PARAM);
        ok(&b.simple(Opcode::TeardownHca));
        assert_eq!(b.fw.state(), HcaState::Enabled);
    }

    #[test]
    fn vf_may_not_name_another_function_and_pf_needs_an_existing_one() {
        let mut b = Bench::vf();
        let r = b.run(Opcode::EnableHca, 0, 16, 16, |m| {
            set(m, ENABLE_HCA_IN_FUNCTION_ID, 2)
        });
        fails(&r, CmdStatus::BadParamErr, syndrome::BAD_FUNCTION);
        let mut p = Bench::pf();
        let by_vf =
            |p: &mut Bench, op| p.run(op, 0, 16, 16, |m| set(m, ENABLE_HCA_IN_FUNCTION_ID, 1));
        // A PF that is not enabled itself sends nothing for its VFs.
        fails(
            &by_vf(&mut p, Opcode::EnableHca),
            CmdStatus::BadSysStateErr,
            syndrome::WRONG_STATE,
        );
        assert_eq!(p.fw.state(), HcaState::Disabled);
        // An initialized PF (as when `sriov_numvfs` is written) names only existing VFs.
        p.bring_up();
        fails(
            &by_vf(&mut p, Opcode::EnableHca),
            CmdStatus::BadParamErr,
            syndrome::BAD_FUNCTION,
        );
        fails(
            &by_vf(&mut p, Opcode::DisableHca),
            CmdStatus::BadParamErr,
            syndrome::BAD_FUNCTION,
        );
        assert_eq!(
            p.fw.state(),
            HcaState::Initialized,
            "its own state unchanged"
        );
    }

    #[test]
    fn query_adapter_reports_the_psid_and_enable_accepts_a_12_byte_output() {
        let mut b = Bench::vf();
        ok(&b.run(Opcode::EnableHca, 0, 16, 12, |_| {}));
        let r = b.run(Opcode::QueryAdapter, 0, 16, QUERY_ADAPTER_OUT_LEN, |_| {});
        ok(&r);
        assert_eq!(&r.out[0x100..0x100 + PSID.len()], PSID);
        assert_eq!(get(&r.out, QUERY_ADAPTER_OUT_VSD_VENDOR_ID), 0x15b3);
        let r = b.run(Opcode::SetDriverVersion, 0, 80, 16, |m| {
            m[16..40].copy_from_slice(b"Linux,mlx5_core,6.8\x01\xff\0\0\0")
        });
        ok(&r);
    }
}
