//! VFIO migration v2, as mlx5vf implements it: the state machine, the arcs as
//! firmware commands, and the migration stream.

pub mod fsm;
