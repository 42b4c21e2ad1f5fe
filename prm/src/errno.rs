//! Linux errno numbers (x86/arm generic values) used by the kernel's status mappings.
//!
//! Defined locally so this crate stays libc-free. The mapping functions return them
//! negated, exactly as `cmd_status_to_err` / `deliv_status_to_err` do.

/// I/O error.
pub const EIO: i32 = 5;
/// No such device or address (command interface down).
pub const ENXIO: i32 = 6;
/// Try again.
pub const EAGAIN: i32 = 11;
/// Out of memory.
pub const ENOMEM: i32 = 12;
/// Bad address.
pub const EFAULT: i32 = 14;
/// Device or resource busy.
pub const EBUSY: i32 = 16;
/// Invalid argument.
pub const EINVAL: i32 = 22;
/// No message of desired type.
pub const ENOMSG: i32 = 42;
/// Invalid request descriptor.
pub const EBADR: i32 = 53;
/// Link has been severed.
pub const ENOLINK: i32 = 67;
/// Operation not supported.
pub const EOPNOTSUPP: i32 = 95;
/// Connection timed out.
pub const ETIMEDOUT: i32 = 110;
/// Remote I/O error (`mlx5_cmd_do` when status != OK).
pub const EREMOTEIO: i32 = 121;
