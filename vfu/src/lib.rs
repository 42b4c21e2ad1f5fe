//! vfio-user, both ends: message codecs, framing with SCM_RIGHTS, a server that
//! validates every message before a [`server::Backend`] sees it, and a client.
//!
//! The protocol is QEMU's `docs/interop/vfio-user.rst`. This crate knows nothing about
//! mlx5.

pub mod caps;
pub mod channel;
pub mod client;
pub mod client_dma;
pub mod dma;
pub mod error;
pub mod irq;
pub mod limits;
pub mod proto;
pub mod ratelimit;
pub mod server;

pub use client::{Client, DmaHandler, DmaRequest, RegionInfo};
pub use dma::{
    Direct, Dma, DmaError, DmaRoute, DmaWindow, Initiator, UnsealedFiles, WriteObserver,
};
pub use error::{errno_name, Errno, VfuError};
pub use irq::{IrqAction, IrqData, IrqIndexShape, IrqTable, SetIrqs};
pub use server::{
    Backend, ClientInfo, Connection, IrqDesc, Listener, MapSource, RegionDesc, RegionMmap,
    ServerConfig,
};

/// VFIO uAPI constants and structures, from `vfio-bindings`.
pub use vfio_bindings::bindings::vfio as uapi;
