//! The emulated mlx5 adapter: one PF and N VFs, each served over vfio-user.

pub mod bar0;
pub mod pci;
