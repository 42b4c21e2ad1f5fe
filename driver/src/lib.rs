//! mlx5vf: the mlx5 VFIO migration variant driver, over vfio-user.
//!
//! [`cmdif`] is the firmware command interface client, [`hca`] brings a function up
//! and down the way mlx5_core does, [`migration`] is the VFIO migration v2 side.

pub mod cmdif;
pub mod hca;
pub mod migration;
