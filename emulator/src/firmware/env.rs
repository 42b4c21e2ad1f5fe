//! What the firmware of one function sees of the rest of the adapter: the one narrow
//! interface every command handler goes through.
//!
//! [`Env`] is the function the firmware runs on: DMA into its IOVA space, the
//! interrupt it raises, and the other functions of the adapter as [`Peer`]s (what a
//! PF does to a VF it names by `vhca_id`: suspend, resume, freeze, thaw, save and load
//! of its firmware state, its BAR0 queue registers and its device memory).
//! The adapter's `Function` implements both; the firmware's unit tests implement
//! them with fakes (no threads, no sockets). Nothing under `firmware/` knows the
//! function, the fabric or the vfio-user backend.
//!
//! The types these traits speak in (the function's name, its vector count) live here,
//! a leaf, so that the function module and the firmware share them without importing
//! each other.

use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use vfu::DmaError;

use super::migration::{MigCtl, SuspendError};
use super::page_track::{DirtyLog, ReportJob};
use super::Firmware;
use crate::devmem::DevMem;
use crate::pci::FunctionKind;
use crate::state::IsegImage;

/// MSI-X vectors of every function.
pub const MSIX_VECTORS: u16 = 16;

/// Static description of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionId {
    pub kind: FunctionKind,
    /// VF number (0 for the PF).
    pub index: u16,
    /// The firmware's name for the function (`vhca_id`): 0 for the PF, 1 + n for VF n.
    pub vhca_id: u16,
}

impl FunctionId {
    pub fn pf() -> Self {
        FunctionId {
            kind: FunctionKind::Pf,
            index: 0,
            vhca_id: 0,
        }
    }

    pub fn vf(n: u16) -> Self {
        FunctionId {
            kind: FunctionKind::Vf,
            index: n,
            vhca_id: n + 1,
        }
    }

    /// Socket file name: `pf.sock` or `vfN.sock`.
    pub fn socket_name(&self) -> String {
        match self.kind {
            FunctionKind::Pf => "pf.sock".into(),
            FunctionKind::Vf => format!("vf{}.sock", self.index),
        }
    }
}

/// Who issues a P2P access: a function, and its QP when a work request of its DMA
/// engine does it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P2pSource {
    pub vhca_id: u16,
    pub qpn: Option<u32>,
}

/// Why a function refused a P2P access into its device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum P2pRefusal {
    /// It is responder-suspended: the write was refused and recorded as violation `seq`.
    #[error("the target is responder-suspended (P2P race violation #{seq})")]
    Frozen { seq: u64 },
    /// The access does not lie inside its device memory.
    #[error("outside the target's device memory")]
    OutOfRange,
}

/// The function a command executes on.
pub trait Env: Sync {
    /// Who this function is.
    fn id(&self) -> FunctionId;

    /// Reads guest memory through this function's IOVA space.
    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError>;

    /// Writes guest memory through this function's IOVA space.
    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError>;

    /// The piece of `iova..iova + len` (up to its window's end) for a transfer to
    /// access in place, without a bounce buffer ([`vfu::Direct`]): SAVE encodes into
    /// it, LOAD reads from it. `Ok(None)` when the transfer must go through
    /// [`Env::dma_read`] / [`Env::dma_write`] instead: a routed window (a peer's
    /// device memory, the client's own memory), or a fault plan that may hit the
    /// transfer's DMAs. An environment without a mapping of its own says `None`.
    fn dma_direct(
        &self,
        _iova: u64,
        _len: usize,
        _write: bool,
    ) -> Result<Option<vfu::Direct>, DmaError> {
        Ok(None)
    }

    /// Whether all of `iova..iova+len` could be written now, touching nothing (what
    /// the queue checks of an entry and its output chain before a command runs). An
    /// environment without an IOVA space of its own says yes.
    fn dma_writable(&self, _iova: u64, _len: usize) -> Result<(), DmaError> {
        Ok(())
    }

    /// [`Env::dma_write`] by a work request of QP `qpn` of this function's DMA engine
    /// (a P2P window records the QP with a violation).
    fn dma_write_by(&self, iova: u64, data: &[u8], qpn: u32) -> Result<(), DmaError> {
        let _ = qpn;
        self.dma_write(iova, data)
    }

    /// Raises MSI-X `vector` of this function (or leaves it pending in the PBA); true
    /// if it was delivered. Called with no firmware lock held.
    fn raise_msix(&self, vector: u16) -> bool;

    /// The reset epoch of this function: bumped by every FLR / DEVICE_RESET.
    fn epoch(&self) -> u64;

    /// Asks this function's DMA engine to look at QP `qpn` (it went to ERR and its
    /// outstanding WQEs are to be flushed). Returns at once: it only queues.
    fn dma_kick(&self, qpn: u32);

    /// Another live function of the adapter by `vhca_id` (the PF naming a VF, a QP's
    /// peer on another function).
    fn peer(&self, vhca_id: u16) -> Option<Arc<dyn Peer>>;

    /// Hands a page tracker's report to this function's reporter, which sends it from
    /// the tracker's QP after the command completes. Returns at once; false if the
    /// function has no reporter (the tracker then goes to ERROR).
    fn page_report(&self, job: ReportJob) -> bool {
        let _ = job;
        false
    }
}

/// Another function, as the PF's firmware acts on it.
///
/// Lock order: a caller may hold its own firmware lock while it takes a peer's
/// firmware lock (only a PF names a peer, so this is acyclic), and must hold nothing
/// while it calls [`Peer::freeze`] or [`Peer::thaw`] (they wait, or queue work).
/// [`Peer::migration`] is a leaf: take nothing while holding it.
pub trait Peer: Send + Sync {
    fn id(&self) -> FunctionId;

    /// Its firmware state (held for a short read or update).
    fn firmware(&self) -> MutexGuard<'_, Firmware>;

    /// Replaces its firmware state with `fw` (LOAD). The command log is kept.
    fn install_firmware(&self, fw: Firmware);

    /// Posts `eqe` on its EQ `eqn` and raises that EQ's MSI-X vector if it is armed
    /// (a DMA engine completing into this function's CQ; see `FwCell::post_eqe`).
    /// Takes its EQE and firmware locks: call it holding none of its locks. False if
    /// the EQ is gone or full.
    fn post_eqe(&self, eqn: u8, eqe: [u8; mlx5_prm::cmd::eq::EQE_SIZE]) -> bool;

    /// Its migration control (a leaf lock).
    fn migration(&self) -> MutexGuard<'_, MigCtl>;

    /// SUSPEND_VHCA(initiator): Running to InitiatorSuspended.
    fn suspend_initiator(&self) -> Result<(), SuspendError>;

    /// RESUME_VHCA(initiator): InitiatorSuspended to Running.
    fn resume_initiator(&self) -> Result<(), SuspendError>;

    /// SUSPEND_VHCA(responder): freezes the function, waiting at most `timeout` for its
    /// admitted work to drain. Blocks: call it holding no lock.
    fn freeze(&self, timeout: Duration) -> Result<(), SuspendError>;

    /// RESUME_VHCA(responder): thaws the function and rings the doorbells refused
    /// while it was frozen. May wait for queue room: call it holding no lock.
    fn thaw(&self) -> Result<(), SuspendError>;

    /// Its device memory (BAR2).
    fn devmem(&self) -> &DevMem;

    /// The BAR0 registers its image carries (queue address, `nic_interface`).
    fn iseg(&self) -> IsegImage;

    /// Programs those registers as an image carries them (LOAD).
    fn load_iseg(&self, iseg: &IsegImage);

    /// Its reset epoch (see [`Env::epoch`]).
    fn epoch(&self) -> u64;

    /// A P2P write by `from` into its device memory at BAR2 offset `offset`, admitted
    /// like every change from outside: while it is responder-suspended the write is
    /// refused and recorded as a violation (writer, QP, address, length, sequence);
    /// otherwise it holds off SUSPEND_VHCA(responder) until it has landed. Takes only
    /// leaf locks.
    fn p2p_write(&self, from: P2pSource, offset: u64, data: &[u8]) -> Result<(), P2pRefusal>;

    /// A P2P read of its device memory (a read changes nothing, so a frozen function
    /// answers it).
    fn p2p_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), P2pRefusal> {
        self.devmem()
            .read(offset, buf)
            .map_err(|_| P2pRefusal::OutOfRange)
    }

    /// The process of the client attached to its socket, if one is.
    fn client_pid(&self) -> Option<i32>;

    /// Where its BAR2 (device memory) sits in the client's address space, as the
    /// client programmed it, while memory decoding is on.
    fn bar2_address(&self) -> Option<u64>;

    /// Holds off a reset (FLR, DEVICE_RESET) of this function while the guard lives, so
    /// that a LOAD's last check and its apply come wholly before or after one. Taken
    /// holding no lock; outermost of the function's locks.
    fn hold_reset(&self) -> std::sync::RwLockReadGuard<'_, ()>;

    /// Reads its guest memory through its DMA path (a DMA engine serving a request of a
    /// QP on another function).
    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError>;

    /// Writes its guest memory through its DMA path.
    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError>;

    /// See [`Env::dma_kick`].
    fn dma_kick(&self, qpn: u32);

    /// Admits a request of `len` bytes at `address` from `writer` (a QP on another
    /// function) into this function. Refused while it is responder-suspended: recorded
    /// as a violation, and false returned. While admitted, its responder suspend waits;
    /// [`Peer::end_dma`] ends it. A leaf: take no lock of this function meanwhile
    /// other than its firmware lock and DMA path.
    fn admit_dma(&self, writer: P2pSource, address: u64, len: u64) -> bool;

    /// Ends an admission [`Peer::admit_dma`] granted.
    fn end_dma(&self);

    /// The log a page tracker of the PF marks this function's DMA writes in (`None`:
    /// the function cannot be tracked). A leaf lock.
    fn dirty_log(&self) -> Option<&DirtyLog> {
        None
    }
}
