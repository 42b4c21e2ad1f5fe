//! Errors: `Errno` is what goes back to the peer; `VfuError` is a host-side failure.

use std::fmt;

/// A POSIX errno carried in an error reply. Never zero: QEMU reads an error reply
/// with errno 0 as success.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    pub const EFAULT: Errno = Errno(libc::EFAULT);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const ENODEV: Errno = Errno(libc::ENODEV);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EMFILE: Errno = Errno(libc::EMFILE);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    pub const ENOMSG: Errno = Errno(libc::ENOMSG);
    pub const ENOTSUP: Errno = Errno(libc::ENOTSUP);
    pub const ETIMEDOUT: Errno = Errno(libc::ETIMEDOUT);
    pub const EPROTO: Errno = Errno(libc::EPROTO);

    /// An errno from a raw value; zero or negative values become `EIO` so that an
    /// error is never reported as success.
    pub fn new(v: i32) -> Self {
        if v > 0 {
            Errno(v)
        } else {
            Errno::EIO
        }
    }

    pub fn raw(self) -> i32 {
        self.0
    }

    /// The errno of an `io::Error`, `EIO` when it has none.
    pub fn from_io(e: &std::io::Error) -> Self {
        Errno::new(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", errno_name(self.0).unwrap_or("errno"), self.0)
    }
}

/// The symbolic name of a (positive) errno, for logs and errors; `None` for values this
/// crate and the drivers built on it do not name. 95 is `EOPNOTSUPP` (Linux's `ENOTSUP`
/// is the same number).
pub fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::ENOMSG => "ENOMSG",
        libc::EBADR => "EBADR",
        libc::ENOLINK => "ENOLINK",
        libc::EPROTO => "EPROTO",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ECONNRESET => "ECONNRESET",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EREMOTEIO => "EREMOTEIO",
        _ => return None,
    })
}

impl std::error::Error for Errno {}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}

/// Host-side failures of the protocol layer.
#[derive(Debug, thiserror::Error)]
pub enum VfuError {
    #[error("socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Disconnected,
    #[error("message size {size} is outside {min}..={max}")]
    BadMessageSize { size: u32, min: usize, max: usize },
    #[error("peer sent {got} fds, at most {max} allowed")]
    TooManyFds { got: usize, max: usize },
    #[error("{command} failed: the server answered {errno}")]
    Remote { command: &'static str, errno: Errno },
    #[error("malformed {what}: expected {expected}, got {got}")]
    Malformed {
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("version negotiation failed: {0}")]
    Version(String),
    #[error("socket path {0} is served by a live process")]
    SocketInUse(String),
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    #[error("the peer did not send a whole message before its deadline")]
    DeadlinePassed,
}
