//! mlx5vf.
