//! mlx5vf: the mlx5 VFIO migration variant driver, over vfio-user.
//!
//! [`cmdif`] is the firmware command interface client, [`hca`] brings a function up
//! and down the way mlx5_core does, [`migration`] is the VFIO migration v2 side, [`report`] draws a
//! migration's timeline.
//!
//! A PF is shared as an `Arc<`[`hca::Hca`]`>`: its command interface takes `&self`
//! and no lock across a wait, so the migration devices of several VFs (one thread
//! each) have commands in flight on different slots of the PF's queue together. Each
//! module writes its locks and their order down where they are declared.

pub mod cmdif;
pub mod dirty;
pub mod dma;
pub mod hca;
pub mod migration;
pub mod report;
