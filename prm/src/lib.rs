//! mlx5 PRM layouts.
