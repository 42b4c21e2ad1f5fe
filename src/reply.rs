//! vfio-user replies as tests check them.

use vfu::{Errno, VfuError};

/// The errno of the error reply `r` must be; panics (naming what came instead) if the
/// request succeeded or failed some other way.
pub fn remote_errno(r: Result<impl std::fmt::Debug, VfuError>) -> Errno {
    match r {
        Err(VfuError::Remote { errno, .. }) => errno,
        other => panic!("expected an error reply, got {other:?}"),
    }
}
