//! The test harness that joins the mlx5 emulator and the mlx5vf driver: the one
//! test-support module every file under `tests/` and `benches/` uses.
//!
//! | module | what it gives |
//! |---|---|
//! | [`testbed`] | an adapter on sockets in a temporary directory ([`Testbed`]) |
//! | [`bringup`] | mlx5vf's command interface and bring-up of a PF or a guest-side VF |
//! | [`rawq`] | a command queue driven by hand (entries, mailboxes, doorbells) for hostile tests |
//! | [`mem`] | guest memory: a memfd DMA-mapped into a function |
//! | [`dma`] | guest-side functions with a data mkey, QP pairs connected for RDMA |
//! | [`devmem`] | device memory (BAR2): seeded patterns, reads, the VMM's mmap |
//! | [`migrate`] | moving a VF with mlx5vf: stream pumps, whole migrations, stream records |
//! | [`reply`] | vfio-user error replies: the errno a refused request got |
//! | [`irq`] | MSI-X as a guest enables it, eventfds on vectors |
//! | [`faults`] | every way a test makes the device fail, in one place |
//! | [`child`] | child processes (`mlx5-emu`, scripts) killed and reaped on every way out |
//! | [`wait`] | bounded waits: a hang fails the test instead of stalling the run |
//! | [`bins`] | the workspace's binaries, built on demand, and the `mlx5vf` CLI |
//! | [`fuzzing`] | the fuzz targets' bodies, shared by `fuzz/` and the corpus replay test |
//! | [`guest`] | what the QEMU guest gets beyond its cache: the static `mlx5-kmig`, an extra initramfs archive |

pub mod bins;
pub mod bringup;
pub mod child;
pub mod devmem;
pub mod dma;
pub mod faults;
pub mod fuzzing;
pub mod guest;
pub mod irq;
pub mod mem;
pub mod migrate;
pub mod rawq;
pub mod reply;
pub mod testbed;
pub mod wait;

pub use bins::{emu_binary, mlx5vf_binary, run_cli, run_emu, target_profile_dir, workspace_root};
pub use mlx5_emulator::{Adapter, AdapterConfig, Function, FunctionId};
pub use testbed::{init_tracing, seed, Sockets, Testbed, TestbedBuilder};
