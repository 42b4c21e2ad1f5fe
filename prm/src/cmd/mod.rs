//! Firmware command messages: the generic headers, status codes and opcodes.
//!
//! One layout file per command family goes beside these (`hca.rs`, `migration.rs`, ...).

pub mod access_reg;
pub mod caps;
pub mod cq;
pub mod eq;
pub mod hca;
pub mod header;
pub mod migration;
pub mod opcode;
pub mod page_track;
pub mod pages;
pub mod pd_mkey;
pub mod qp;
pub mod uar;

pub use header::{cmd_status_to_errno, CmdInHeader, CmdOutHeader, CmdStatus, DRIVER_SYNDROME};
pub use opcode::Opcode;
