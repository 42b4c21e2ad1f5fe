//! `mlx5-kmig`: drives Linux's VFIO migration uAPI (v2: `VFIO_DEVICE_FEATURE`
//! MIGRATION, MIG_DEVICE_STATE, MIG_DATA_SIZE, `VFIO_MIG_GET_PRECOPY_INFO`, the data
//! fd's read and write, `VFIO_DEVICE_RESET`) on devices bound to a variant driver such
//! as Linux's own `mlx5_vfio_pci`, through a type1 container. It is built as a small
//! static binary and runs inside the test guest (fixtures/qemu), where it migrates one
//! emulated VF's state into another through the kernel driver.
//!
//! [`vfio`] holds the system calls; [`codec`] the pure parts the host side shares
//! (the mlx5 migration stream's records, the console's base64, the device-memory
//! pattern and digest); this file the state names and the errors, each naming the
//! call, the device, its migration state and the errno.

pub mod codec;
pub mod vfio;

use std::fmt;

/// The VFIO migration states (`enum vfio_device_mig_state`), by their uAPI numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum State {
    /// 0: only a reset leaves it.
    Error = 0,
    /// 1: stopped, no DMA or interrupts.
    Stop = 1,
    /// 2: fully operational.
    Running = 2,
    /// 3: stopped, the saving session streams the final state.
    StopCopy = 3,
    /// 4: the resuming session takes a stream.
    Resuming = 4,
    /// 5: running, but initiating no peer-to-peer DMA.
    RunningP2p = 5,
    /// 6: running, the saving session streams the initial state.
    PreCopy = 6,
    /// 7: pre-copy, P2P-quiesced.
    PreCopyP2p = 7,
}

impl State {
    /// Every state, by number.
    pub const ALL: [State; 8] = [
        State::Error,
        State::Stop,
        State::Running,
        State::StopCopy,
        State::Resuming,
        State::RunningP2p,
        State::PreCopy,
        State::PreCopyP2p,
    ];

    /// The state numbered `v`, or `None` for a number the uAPI does not define.
    pub fn from_raw(v: u32) -> Option<State> {
        State::ALL.get(usize::try_from(v).ok()?).copied()
    }

    /// The uAPI name without its `VFIO_DEVICE_STATE_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            State::Error => "ERROR",
            State::Stop => "STOP",
            State::Running => "RUNNING",
            State::StopCopy => "STOP_COPY",
            State::Resuming => "RESUMING",
            State::RunningP2p => "RUNNING_P2P",
            State::PreCopy => "PRE_COPY",
            State::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// The state named `s` (as [`State::name`], any case).
    pub fn parse(s: &str) -> Option<State> {
        State::ALL
            .into_iter()
            .find(|st| st.name().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `VFIO_MIGRATION_STOP_COPY`.
pub const MIGRATION_STOP_COPY: u64 = vfio_bindings::bindings::vfio::VFIO_MIGRATION_STOP_COPY as u64;
/// `VFIO_MIGRATION_P2P`.
pub const MIGRATION_P2P: u64 = vfio_bindings::bindings::vfio::VFIO_MIGRATION_P2P as u64;
/// `VFIO_MIGRATION_PRE_COPY`.
pub const MIGRATION_PRE_COPY: u64 = vfio_bindings::bindings::vfio::VFIO_MIGRATION_PRE_COPY as u64;

/// Migration flags as `STOP_COPY|P2P|PRE_COPY` (unknown bits in hex; `0` for none).
pub fn flag_names(flags: u64) -> String {
    let mut out = Vec::new();
    let mut rest = flags;
    for (bit, name) in [
        (MIGRATION_STOP_COPY, "STOP_COPY"),
        (MIGRATION_P2P, "P2P"),
        (MIGRATION_PRE_COPY, "PRE_COPY"),
    ] {
        if flags & bit != 0 {
            out.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        out.push(format!("{rest:#x}"));
    }
    if out.is_empty() {
        "0".into()
    } else {
        out.join("|")
    }
}

/// The symbolic name of errno `e` (the ones VFIO and its drivers return), or `E?`.
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::ENOTTY => "ENOTTY",
        libc::E2BIG => "E2BIG",
        libc::ENOMSG => "ENOMSG",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EREMOTEIO => "EREMOTEIO",
        _ => "E?",
    }
}

/// What failed: the call, on which device (PCI address) in which migration state, and
/// the kernel's errno, or a check of ours.
#[derive(Debug)]
pub enum Error {
    /// A system call failed.
    Sys {
        /// The call and its arguments, e.g. `VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE
        /// -> RESUMING)`.
        call: String,
        /// The device (or the group / container path).
        on: String,
        /// The device's migration state when the call was made, where known.
        state: Option<State>,
        /// The errno.
        errno: i32,
    },
    /// Something the kernel returned or the device holds is not what it must be.
    Check {
        /// What was checked, on which device, and what was found.
        what: String,
    },
}

impl Error {
    /// A failed call with the current `errno`.
    pub fn last_os(call: impl Into<String>, on: impl Into<String>, state: Option<State>) -> Error {
        Error::Sys {
            call: call.into(),
            on: on.into(),
            state,
            errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        }
    }

    /// A failed check.
    pub fn check(what: impl Into<String>) -> Error {
        Error::Check { what: what.into() }
    }

    /// The errno of a failed call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Sys { errno, .. } => Some(*errno),
            Error::Check { .. } => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Sys {
                call,
                on,
                state,
                errno,
            } => {
                write!(f, "{call} on {on}")?;
                if let Some(s) = state {
                    write!(f, " in state {s}")?;
                }
                write!(
                    f,
                    " failed: {} ({errno}, {})",
                    errno_name(*errno),
                    std::io::Error::from_raw_os_error(*errno)
                )?;
                let hint = match *errno {
                    libc::ENOENT => "; is the device bound to a VFIO driver (driver_override) and is vfio loaded?",
                    libc::ENOTTY => "; the driver offers no migration (mlx5_vfio_pci: is the VF a virtfn of a PF bound to mlx5_core?)",
                    libc::EBUSY => "; another user holds the group or device",
                    libc::EINVAL if state.is_some() => "; the arc may not be allowed from this state (see the uAPI's FSM)",
                    _ => "",
                };
                f.write_str(hint)
            }
            Error::Check { what } => f.write_str(what),
        }
    }
}

impl std::error::Error for Error {}

/// This crate's result.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_numbers_and_names() {
        for s in State::ALL {
            assert_eq!(State::from_raw(s as u32), Some(s));
            assert_eq!(State::parse(s.name()), Some(s));
            assert_eq!(State::parse(&s.name().to_lowercase()), Some(s));
        }
        assert_eq!(State::from_raw(8), None);
        assert_eq!(State::from_raw(u32::MAX), None);
        assert_eq!(State::parse("SAVING"), None);
        // The uAPI's numbers.
        assert_eq!(
            State::PreCopyP2p as u32,
            vfio_bindings::bindings::vfio::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P
        );
        assert_eq!(
            State::Resuming as u32,
            vfio_bindings::bindings::vfio::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING
        );
    }

    #[test]
    fn flags_are_named() {
        assert_eq!(flag_names(7), "STOP_COPY|P2P|PRE_COPY");
        assert_eq!(flag_names(1), "STOP_COPY");
        assert_eq!(flag_names(0), "0");
        assert_eq!(flag_names(0x11), "STOP_COPY|0x10");
    }

    #[test]
    fn errors_name_the_call_device_state_and_errno() {
        let e = Error::Sys {
            call: "VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE -> PRE_COPY)".into(),
            on: "0000:00:04.1".into(),
            state: Some(State::StopCopy),
            errno: libc::EINVAL,
        };
        let s = e.to_string();
        for want in [
            "SET MIG_DEVICE_STATE -> PRE_COPY",
            "0000:00:04.1",
            "in state STOP_COPY",
            "EINVAL (22",
            "FSM",
        ] {
            assert!(s.contains(want), "{want:?} missing from {s:?}");
        }
        assert_eq!(e.errno(), Some(libc::EINVAL));
        let e = Error::Sys {
            call: "VFIO_DEVICE_FEATURE(GET MIGRATION)".into(),
            on: "0000:00:04.1".into(),
            state: None,
            errno: libc::ENOTTY,
        };
        assert!(e.to_string().contains("ENOTTY") && e.to_string().contains("virtfn"));
        assert_eq!(errno_name(libc::ENOMSG), "ENOMSG");
        assert_eq!(errno_name(4095), "E?");
    }
}
