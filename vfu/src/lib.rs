//! vfio-user.
