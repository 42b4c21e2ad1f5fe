//! The resource limits of a vfio-user server, in one place. Each bounds what one
//! client can make the server hold or do; a request past a limit gets an errno and
//! the connection stays in sync.
//!
//! | limit | value | enforced by |
//! |---|---|---|
//! | message payload | [`MAX_DATA_XFER`] + 64 KiB fixed part | larger payloads are drained and answered `E2BIG` |
//! | fds per message | [`MAX_MSG_FDS`] | fds past it are closed as they arrive; the message is `EINVAL` |
//! | fds per client | [`MAX_BACKING_FILES`] (windows of one file share its fd) + interrupt eventfds (one per vector) | |
//! | DMA windows | [`MAX_DMA_MAPS`] | `ENOSPC` |
//! | distinct DMA backing files | [`MAX_BACKING_FILES`] (one fd each) | `EMFILE` |
//! | REGION_WRITE_MULTI entries | [`MAX_WRITE_MULTI`] | `EINVAL` |
//! | refusals at once | [`MAX_REFUSALS`], each within [`REFUSE_DEADLINE`] | further clients are closed unanswered |
//! | VERSION | within [`HANDSHAKE_DEADLINE`] of connecting | the connection is closed |

pub use crate::caps::{
    MAX_VERSION_JSON, SERVER_MAX_DATA_XFER as MAX_DATA_XFER, SERVER_MAX_MSG_FDS as MAX_MSG_FDS,
};
pub use crate::dma::{MAX_BACKING_FILES, MAX_DMA_MAPS};
pub use crate::server::{HANDSHAKE_DEADLINE, MAX_REFUSALS, MAX_WRITE_MULTI, REFUSE_DEADLINE};

/// Raises this process's soft fd limit to its hard limit (a server holds fds for every
/// client's DMA files and eventfds); returns the limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limits into `lim`, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads `lim`, which we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}
