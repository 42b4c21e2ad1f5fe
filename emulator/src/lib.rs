//! The emulated mlx5 adapter: one PF and N VFs, each served over vfio-user.
//!
//! Layers, outside in: [`adapter`] (the device complex and its sockets), [`server`]
//! (the vfio-user backend of a function), [`function`] (a function's state),
//! [`pci`] (config space), [`bar0`] (the init segment and MSI-X), [`cmdq`] (the
//! command queue engine), [`dma`] (the DMA engine of RC QPs), [`firmware`] (command execution, which sees the rest of the
//! adapter only through [`firmware::env`]) and [`fabric`] (how functions find each
//! other) with [`p2p`] (DMA from one function into another's device memory).

pub mod adapter;
pub mod bar0;
pub mod cmdq;
pub mod devmem;
pub mod dma;
pub mod fabric;
pub mod fault;
pub mod firmware;
pub mod function;
pub mod limits;
pub mod p2p;
pub mod pci;
pub mod server;
pub mod state;

pub use adapter::{Adapter, AdapterConfig, AdapterError};
pub use firmware::{CmdRecord, HcaState, MigState, Mkey, ObjectCounts, Violation, ViolationKind};
pub use function::{Function, FunctionError, FunctionId};
