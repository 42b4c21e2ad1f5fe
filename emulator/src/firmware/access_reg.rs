//! ACCESS_REG (mlx5-pf.md §1.1, §2.5): the register a PF's `mlx5_core` writes before
//! anything else in `mlx5_function_open` (HOST_ENDIANNESS). Every other register stays
//! unsupported: its capability bit (`mcam_reg`, `pcam_reg`, `qcam_reg`, MCAM bits,
//! `cmd_q_init_to`) is 0, so a driver that follows the caps never asks for one.

use mlx5_prm::cmd::access_reg::*;
use mlx5_prm::ifc::{get, set};

use super::{syndrome, Cmd, CmdFail, CmdResult, Firmware};
use crate::pci::FunctionKind;

/// Why an ACCESS_REG is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegError {
    #[error("register_id {id:#06x} ({name}) is not implemented by this device")]
    Unsupported { id: u16, name: &'static str },
    #[error("register {name} is a PF register; a VF may not access it")]
    PfOnly { name: &'static str },
    #[error("{name}: argument {argument:#x}, expected 0")]
    Argument { name: &'static str, argument: u64 },
    #[error("HOST_ENDIANNESS he = {he:#04x}: expected 0x00 (little-endian) or 0x80 (big-endian)")]
    Endianness { he: u64 },
}

impl RegError {
    /// The status and syndrome ACCESS_REG completes with.
    pub fn fail(&self) -> CmdFail {
        match self {
            RegError::Unsupported { .. } => CmdFail::new(
                mlx5_prm::CmdStatus::BadParamErr,
                syndrome::UNSUPPORTED_REGISTER,
            ),
            RegError::PfOnly { .. } => CmdFail::bad_function(),
            RegError::Argument { .. } | RegError::Endianness { .. } => CmdFail::bad_param(),
        }
    }
}

/// A HOST_ENDIANNESS `he` this device accepts.
pub fn check_host_endianness(he: u64) -> Result<u8, RegError> {
    match u8::try_from(he) {
        Ok(v @ (HOST_ENDIANNESS_LITTLE | HOST_ENDIANNESS_BIG)) => Ok(v),
        _ => Err(RegError::Endianness { he }),
    }
}

impl Firmware {
    /// ACCESS_REG: HOST_ENDIANNESS read or write (PF only); any other register is
    /// refused with [`syndrome::UNSUPPORTED_REGISTER`].
    pub(super) fn access_reg(&mut self, cmd: &Cmd<'_>) -> CmdResult {
        cmd.need_in(ACCESS_REG_DATA_OFFSET)?;
        cmd.need_out(ACCESS_REG_DATA_OFFSET)?;
        let op = AccessRegOp::try_from(cmd.op_mod).map_err(|_| CmdFail::bad_op_mod())?;
        let raw = cmd.get(ACCESS_REG_IN_REGISTER_ID) as u16;
        let reg = match RegisterId::try_from(raw) {
            Ok(RegisterId::HostEndianness) => RegisterId::HostEndianness,
            Ok(r) => {
                return Err(self.refuse(RegError::Unsupported {
                    id: raw,
                    name: r.name(),
                }))
            }
            Err(_) => {
                return Err(self.refuse(RegError::Unsupported {
                    id: raw,
                    name: "unknown",
                }))
            }
        };
        if self.id.kind != FunctionKind::Pf {
            return Err(self.refuse(RegError::PfOnly { name: reg.name() }));
        }
        let argument = cmd.get(ACCESS_REG_IN_ARGUMENT);
        if argument != 0 {
            return Err(self.refuse(RegError::Argument {
                name: reg.name(),
                argument,
            }));
        }
        let mut out = cmd.lengths(HOST_ENDIANNESS_IN_LEN, HOST_ENDIANNESS_OUT_LEN)?;
        let data = &cmd.input[ACCESS_REG_DATA_OFFSET..HOST_ENDIANNESS_IN_LEN];
        if op == AccessRegOp::Write {
            let he =
                check_host_endianness(get(data, HOST_ENDIANNESS_HE)).map_err(|e| self.refuse(e))?;
            self.host_endianness = he;
            tracing::debug!(
                vhca_id = self.id.vhca_id,
                he = format_args!("{he:#04x}"),
                "HOST_ENDIANNESS written"
            );
        }
        set(
            &mut out[ACCESS_REG_DATA_OFFSET..],
            HOST_ENDIANNESS_HE,
            u64::from(self.host_endianness),
        );
        Ok(out)
    }

    fn refuse(&self, e: RegError) -> CmdFail {
        tracing::info!(vhca_id = self.id.vhca_id, error = %e, "ACCESS_REG refused");
        e.fail()
    }

    /// The byte order the PF's driver last wrote to HOST_ENDIANNESS (0x00 little,
    /// 0x80 big; 0x00 at power-on).
    pub fn host_endianness(&self) -> u8 {
        self.host_endianness
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{syndrome, HcaState};
    use super::*;
    use mlx5_prm::{CmdStatus, Opcode};

    fn host_endianness(b: &mut Bench, op_mod: u16, he: u8) -> super::super::Reply {
        b.run(
            Opcode::AccessReg,
            op_mod,
            HOST_ENDIANNESS_IN_LEN,
            HOST_ENDIANNESS_OUT_LEN,
            |m| {
                set(m, ACCESS_REG_IN_REGISTER_ID, 0x7004);
                m[ACCESS_REG_DATA_OFFSET] = he;
            },
        )
    }

    #[test]
    fn pf_writes_and_reads_host_endianness_as_set_hca_ctrl_does() {
        let mut b = Bench::pf();
        // Not before ENABLE_HCA.
        fails(
            &host_endianness(&mut b, 0, 0),
            CmdStatus::BadSysStateErr,
            syndrome::WRONG_STATE,
        );
        ok(&b.simple(Opcode::EnableHca));
        let r = host_endianness(&mut b, 0, HOST_ENDIANNESS_LITTLE);
        ok(&r);
        assert_eq!(r.out.len(), HOST_ENDIANNESS_OUT_LEN);
        assert_eq!(b.fw.host_endianness(), 0);
        ok(&host_endianness(&mut b, 0, HOST_ENDIANNESS_BIG));
        let r = host_endianness(&mut b, 1, 0);
        ok(&r);
        assert_eq!(r.out[ACCESS_REG_DATA_OFFSET], 0x80, "read back");
        assert_eq!(b.fw.host_endianness(), 0x80, "a read changes nothing");
        // Also after INIT_HCA (a driver may write it again).
        b.give_startup_pages();
        ok(&b.run(Opcode::InitHca, 0, 32, 16, |_| {}));
        assert_eq!(b.fw.state(), HcaState::Initialized);
        ok(&host_endianness(&mut b, 0, 0));
        assert_eq!(b.fw.host_endianness(), 0);
    }

    #[test]
    fn access_reg_refuses_bad_values_lengths_and_other_registers() {
        let mut b = Bench::pf();
        ok(&b.simple(Opcode::EnableHca));
        // he is 0x00 or 0x80; the value is kept on refusal.
        ok(&host_endianness(&mut b, 0, 0x80));
        fails(
            &host_endianness(&mut b, 0, 0x01),
            CmdStatus::BadParamErr,
            syndrome::BAD_PARAM,
        );
        assert_eq!(b.fw.host_endianness(), 0x80);
        fails(
            &host_endianness(&mut b, 2, 0),
            CmdStatus::BadParamErr,
            syndrome::BAD_OP_MOD,
        );
        // The data block must be there, and room for it in the output.
        let short_in = b.run(Opcode::AccessReg, 0, 16, HOST_ENDIANNESS_OUT_LEN, |m| {
            set(m, ACCESS_REG_IN_REGISTER_ID, 0x7004)
        });
        fails(&short_in, CmdStatus::BadInpLenErr, syndrome::SHORT_INPUT);
        let short_out = b.run(Opcode::AccessReg, 0, HOST_ENDIANNESS_IN_LEN, 16, |m| {
            set(m, ACCESS_REG_IN_REGISTER_ID, 0x7004)
        });
        fails(&short_out, CmdStatus::BadOutpLenErr, syndrome::SHORT_OUTPUT);
        let arg = b.run(
            Opcode::AccessReg,
            0,
            HOST_ENDIANNESS_IN_LEN,
            HOST_ENDIANNESS_OUT_LEN,
            |m| {
                set(m, ACCESS_REG_IN_REGISTER_ID, 0x7004);
                set(m, ACCESS_REG_IN_ARGUMENT, 1);
            },
        );
        fails(&arg, CmdStatus::BadParamErr, syndrome::BAD_PARAM);
        // Registers whose capability bit is 0, and ids no register has.
        for id in [0x907f_u64, 0xc00e, 0x902d, 0x1234] {
            let r = b.run(Opcode::AccessReg, 1, 16 + 80, 16 + 80, |m| {
                set(m, ACCESS_REG_IN_REGISTER_ID, id)
            });
            fails(&r, CmdStatus::BadParamErr, syndrome::UNSUPPORTED_REGISTER);
        }
        assert_eq!(b.fw.host_endianness(), 0x80);
    }

    #[test]
    fn a_vf_may_not_write_host_endianness() {
        let mut b = Bench::vf();
        ok(&b.simple(Opcode::EnableHca));
        fails(
            &host_endianness(&mut b, 0, 0),
            CmdStatus::BadParamErr,
            syndrome::BAD_FUNCTION,
        );
    }

    #[test]
    fn reset_returns_host_endianness_to_power_on() {
        let mut b = Bench::pf();
        ok(&b.simple(Opcode::EnableHca));
        ok(&host_endianness(&mut b, 0, 0x80));
        b.fw.reset();
        assert_eq!(b.fw.host_endianness(), 0);
    }
}
