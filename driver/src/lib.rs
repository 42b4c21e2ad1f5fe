//! mlx5vf.

pub mod migration;
