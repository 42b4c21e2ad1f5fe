//! What can go wrong with a command, and the errno the kernel would return for it
//! (`cmd_status_to_err`, `deliv_status_to_err`, the ETIMEDOUT of a command that never
//! completes).

use std::sync::Arc;
use std::time::Duration;

use mlx5_prm::{CmdStatus, DeliveryStatus, Opcode};

use super::arena::ArenaError;
use super::eq::EqError;

/// The name of an errno as the kernel returns it (negative) or as a positive value:
/// `OK` for 0, `E?` for a value without a name ([`vfu::errno_name`]).
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        0 => "OK",
        e => i32::try_from(e.unsigned_abs())
            .ok()
            .and_then(vfu::errno_name)
            .unwrap_or("E?"),
    }
}

/// `NAME(0xOPCODE)` for logs and errors; unknown opcodes are shown by number.
pub fn opcode_name(opcode: u16) -> String {
    match Opcode::try_from(opcode) {
        Ok(op) => format!("{}({opcode:#x})", op.name()),
        Err(_) => format!("UNKNOWN_OPCODE({opcode:#x})"),
    }
}

/// Errors of the command interface.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("vfio-user: {0}")]
    Vfu(#[from] vfu::VfuError),
    #[error("DMA arena: {0}")]
    Arena(#[from] ArenaError),
    #[error("firmware cmdif revision is {found}, this driver speaks {expected}")]
    CmdifRev { found: u16, expected: u16 },
    #[error("command queue geometry log_sz {log_sz}, log_stride {log_stride}: {why}")]
    Geometry {
        log_sz: u32,
        log_stride: u32,
        why: &'static str,
    },
    #[error("firmware over {waited:?} in initializing state (register {value:#010x}), aborting")]
    FwInit { waited: Duration, value: u32 },
    #[error("{}: {why} (input {in_len} bytes, output {out_len} bytes)", opcode_name(*.opcode))]
    BadRequest {
        opcode: u16,
        in_len: usize,
        out_len: usize,
        why: &'static str,
    },
    #[error("{}: no free command slot ({why}); retry once a command completes", opcode_name(*.opcode))]
    NoSlot { opcode: u16, why: &'static str },
    #[error("{}: out of mailbox blocks ({need} needed, {free} free); raise ArenaConfig::mailbox_blocks", opcode_name(*.opcode))]
    NoMailbox {
        opcode: u16,
        need: usize,
        free: usize,
    },
    #[error(
        "{}(op_mod {op_mod:#x}) delivery failed: {status}, err({}) {}",
        opcode_name(*.opcode), .status.errno(), errno_name(.status.errno())
    )]
    Delivery {
        opcode: u16,
        op_mod: u16,
        status: DeliveryStatus,
    },
    #[error(
        "{}(op_mod {op_mod:#x}) delivery failed with a status this driver does not know ({raw:#x})",
        opcode_name(*.opcode)
    )]
    UnknownDelivery { opcode: u16, op_mod: u16, raw: u8 },
    #[error(
        "{}(op_mod {op_mod:#x}) failed, status {}({:#x}), syndrome ({syndrome:#x}), err({}) {}",
        opcode_name(*.opcode), .status.name(), u8::from(*.status), .status.errno(), errno_name(.status.errno())
    )]
    Status {
        opcode: u16,
        op_mod: u16,
        status: CmdStatus,
        syndrome: u32,
    },
    #[error(
        "{}(op_mod {op_mod:#x}) failed with a status this driver does not know ({raw:#x}), syndrome ({syndrome:#x})",
        opcode_name(*.opcode)
    )]
    UnknownStatus {
        opcode: u16,
        op_mod: u16,
        raw: u8,
        syndrome: u32,
    },
    #[error(
        "{}(op_mod {op_mod:#x}) timeout after {elapsed:?}; slot {slot} stays busy until the device completes it",
        opcode_name(*.opcode)
    )]
    Timeout {
        opcode: u16,
        op_mod: u16,
        slot: u8,
        elapsed: Duration,
    },
    #[error(
        "{}(op_mod {op_mod:#x}) on slot {slot} abandoned: the command interface failed while it was in flight ({cause}); it may or may not have run",
        opcode_name(*.opcode)
    )]
    Aborted {
        opcode: u16,
        op_mod: u16,
        slot: u8,
        cause: Arc<CmdError>,
    },
    #[error("waiting for the command interrupt: {0}")]
    Irq(std::io::Error),
    #[error("event queue: {0}")]
    Eq(#[from] EqError),
    #[error("already completing commands by EQE")]
    AlreadyEvents,
    #[error("the command EQ has no EQ number: create it in the firmware first")]
    EqNotCreated,
    #[error("{busy} commands in flight while switching to event mode; wait for them first")]
    BusyModeSwitch { busy: usize },
    #[error("ticket for slot {slot} names no command in flight (already collected?)")]
    UnknownTicket { slot: u8 },
}

impl CmdError {
    /// The negative errno the kernel would return for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            CmdError::Status { status, .. } => status.errno(),
            CmdError::UnknownStatus { raw, .. } => mlx5_prm::cmd::header::cmd_status_to_errno(*raw),
            CmdError::Delivery { status, .. } => status.errno(),
            CmdError::UnknownDelivery { raw, .. } => mlx5_prm::cmdq::delivery_status_to_errno(*raw),
            CmdError::Timeout { .. } | CmdError::FwInit { .. } => -libc::ETIMEDOUT,
            CmdError::CmdifRev { .. } | CmdError::Geometry { .. } => -libc::EINVAL,
            CmdError::BadRequest { .. } | CmdError::UnknownTicket { .. } => -libc::EINVAL,
            CmdError::AlreadyEvents | CmdError::EqNotCreated => -libc::EINVAL,
            CmdError::NoSlot { .. } | CmdError::BusyModeSwitch { .. } => -libc::EBUSY,
            CmdError::NoMailbox { .. } | CmdError::Eq(EqError::NoPages { .. }) => -libc::ENOMEM,
            CmdError::Vfu(vfu::VfuError::Remote { errno, .. }) => -errno.raw(),
            CmdError::Aborted { cause, .. } => cause.errno(),
            _ => -libc::EIO,
        }
    }

    /// The command status, for `Status` errors.
    pub fn status(&self) -> Option<CmdStatus> {
        match self {
            CmdError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The syndrome, for errors carrying a command status.
    pub fn syndrome(&self) -> Option<u32> {
        match self {
            CmdError::Status { syndrome, .. } | CmdError::UnknownStatus { syndrome, .. } => {
                Some(*syndrome)
            }
            _ => None,
        }
    }

    /// Whether the command may still be running in the device (it never completed, or
    /// the transport failed under it).
    pub fn never_completed(&self) -> bool {
        matches!(
            self,
            CmdError::Timeout { .. }
                | CmdError::Vfu(_)
                | CmdError::Aborted { .. }
                | CmdError::Irq(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_the_kernel_errno_and_read_like_its_log() {
        let e = CmdError::Status {
            opcode: 0x100,
            op_mod: 1,
            status: CmdStatus::BadParamErr,
            syndrome: 0x1234,
        };
        assert_eq!(e.errno(), -libc::EINVAL);
        assert_eq!(e.status(), Some(CmdStatus::BadParamErr));
        assert_eq!(
            e.to_string(),
            "QUERY_HCA_CAP(0x100)(op_mod 0x1) failed, status BAD_PARAM_ERR(0x3), syndrome (0x1234), err(-22) EINVAL"
        );
        let d = CmdError::Delivery {
            opcode: 0x104,
            op_mod: 0,
            status: DeliveryStatus::TokenErr,
        };
        assert_eq!(d.errno(), -libc::EBADR);
        assert!(d.to_string().contains("TOK_ERR"));
        assert_eq!(opcode_name(0x9999), "UNKNOWN_OPCODE(0x9999)");
        let u = CmdError::UnknownStatus {
            opcode: 0x100,
            op_mod: 0,
            raw: 0x0b,
            syndrome: 1,
        };
        assert_eq!(u.errno(), -libc::EIO);
        assert!(u.to_string().contains("0xb"), "{u}");
        let a = CmdError::Aborted {
            opcode: 0x100,
            op_mod: 0,
            slot: 3,
            cause: Arc::new(CmdError::Irq(std::io::Error::from_raw_os_error(
                libc::EBADF,
            ))),
        };
        assert!(a.never_completed());
        assert!(a.to_string().contains("slot 3"), "{a}");
    }

    #[test]
    fn errno_names_are_vfus_with_ok_for_zero_and_a_mark_for_the_unnamed() {
        assert_eq!(errno_name(0), "OK");
        assert_eq!(errno_name(-libc::EINVAL), "EINVAL");
        assert_eq!(errno_name(libc::EREMOTEIO), "EREMOTEIO");
        assert_eq!(errno_name(-libc::EOPNOTSUPP), "EOPNOTSUPP");
        assert_eq!(errno_name(-4095), "E?");
        assert_eq!(errno_name(i32::MIN), "E?");
        assert_eq!(vfu::Errno::EINVAL.to_string(), "EINVAL(22)");
    }
}
