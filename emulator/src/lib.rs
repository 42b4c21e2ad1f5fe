//! The emulated mlx5 adapter: one PF and N VFs, each served over vfio-user.
//!
//! Layers, outside in: [`adapter`] (the device complex and its sockets), [`server`]
//! (the vfio-user backend of a function), [`function`] (a function's state),
//! [`pci`] (config space) and [`bar0`] (the init segment and MSI-X).

pub mod adapter;
pub mod bar0;
pub mod function;
pub mod pci;
pub mod server;

pub use adapter::{Adapter, AdapterConfig, AdapterError};
pub use function::{Function, FunctionId};
